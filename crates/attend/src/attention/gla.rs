//! Gated linear attention (GLA, Yang et al. 2024, "Gated Linear Attention
//! Transformers with Hardware-Efficient Training"): a data-dependent decay
//! per key channel,
//!
//!   α_t = sigmoid(W_α x_t)^(1/τ),   W_α = W_up W_down (low rank),
//!   S_t = diag(α_t) S_{t-1} + k_t v_tᵀ,   o_t = q_tᵀ S_t / √d_k,
//!   y_t = o_t / rms(o_t)
//!
//! (τ = 16 as in the paper; the paper's output gate is left out and its
//! GroupNorm is a per-head RMS norm without gain, as in `decay`). Causal
//! only. Padded positions are transparent: their key is zero and their
//! decay 1.
//!
//! * `naive`   — o_t = Σ_{j≤t} Σ_c q_tc k_jc exp(Σ_{s=j+1..t} log α_sc) v_j;
//! * `forward` — chunked, in log space relative to the chunk start (as fla's
//!   chunk_gla): with B_i = Σ_{s≤i} log α_s cumulated inside the chunk,
//!   inter-chunk (q_i ⊙ e^(B_i)) S, intra-chunk A_ij = Σ_c q_ic k_jc
//!   e^(B_ic - B_jc) for j ≤ i (the exponent masked before exp, so it is
//!   never positive), and S ← diag(e^(B_C)) S + (K ⊙ e^(B_C - B_j))ᵀ V.
//!   Every exponent is ≤ 0: nothing overflows however strong the decay.
//!   All chunks are computed at once; only the state update is a scan. The
//!   intra-chunk term is explicit per channel, O(t·C·d_k), so chunks are
//!   small (8 by default);
//!   From a zero state (training, scoring) `forward` runs the fused
//!   recurrence instead (`kernels::recurrence`): O(t·d_k·d_v), no
//!   intermediate tensors; the chunked form serves prefill;
//! * `step`    — S ← diag(α) S + k vᵀ, o = qᵀS;
//! * the state is `RecurrentState` with S (b, h_kv, d_k, d_v).

use super::decay::{head_rms_norm, head_rms_norm_naive};
use super::linear::{fold_heads, key_mask, unfold_heads, RecurrentState};
use super::Heads;
use crate::config::{GlaConfig, ModelConfig};
use crate::error::Result;
use crate::kernels::recurrence;
use crate::nn::{Builder, Linear};
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct Gla {
    /// W_down: d_model -> rank.
    pub gate_down: Linear,
    /// W_up: rank -> h_kv·d_k (with bias).
    pub gate_up: Linear,
    /// τ: α = sigmoid(·)^(1/τ).
    pub tau: f64,
    /// C: tokens per chunk of `forward`.
    pub chunk: usize,
    n_kv_heads: usize,
}

/// log sigmoid(x) = -(relu(-x) + log(1 + e^(-|x|))), stable for any x.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.neg()?.relu()? + soft)?.neg()?)
}

impl Gla {
    pub fn new(vb: &Builder, cfg: &GlaConfig, model: &ModelConfig) -> Result<Self> {
        let dk = model.head_dim();
        let h_kv = model.kv_heads();
        Ok(Self {
            gate_down: Linear::new(&vb.pp("gate_down"), model.d_model, cfg.gate_rank, false)?,
            gate_up: Linear::new(&vb.pp("gate_up"), cfg.gate_rank, h_kv * dk, true)?,
            tau: cfg.tau,
            chunk: cfg.chunk.max(1),
            n_kv_heads: h_kv,
        })
    }

    /// The log decays: x (b, t, d_model) -> log α (b, h_kv, t, d_k),
    /// log sigmoid(W_up W_down x) / τ.
    pub fn log_alpha(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let z = self.gate_up.forward(&self.gate_down.forward(x)?)?;
        let la = (log_sigmoid(&z)? / self.tau)?;
        let dk = la.dim(2)? / self.n_kv_heads;
        Ok(la
            .reshape((b, t, self.n_kv_heads, dk))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Whole sequence, causal. q: (b, h, t, d_k), k: (b, h_kv, t, d_k),
    /// v: (b, h_kv, t, d_v), log_alpha: (b, h_kv, t, d_k); key_padding
    /// (b, t). With `state` the sequence continues it and leaves it updated.
    /// -> (b, h, t, d_v)
    ///
    /// As fla's chunk kernels: the sequence is cut into n chunks of l tokens
    /// (the last zero-padded: a zero key adds nothing, a zero log-decay
    /// keeps the state); every chunk's intra-chunk part and state increment
    /// are computed at once, a scan over the n chunks carries the state, and
    /// every chunk reads its incoming state at once.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        log_alpha: &Tensor,
        key_padding: Option<&Tensor>,
        state: Option<&mut RecurrentState>,
    ) -> Result<Tensor> {
        let (b, h, t, dk) = q.dims4()?;
        let (_, h_kv, _, dv) = v.dims4()?;
        let (g, bk) = (h / h_kv, b * h_kv);
        let l = self.chunk.min(t).max(1);
        let n = t.div_ceil(l);
        let pad = n * l - t;
        let (k, la) = match key_mask(key_padding, k.dtype())? {
            Some(m) => (k.broadcast_mul(&m)?, log_alpha.broadcast_mul(&m)?),
            None => (k.clone(), log_alpha.clone()),
        };
        if state.is_none() && recurrence::usable(q) {
            // from a zero state, nothing to leave behind: the fused recurrence
            let q = (q * (1.0 / (dk as f64).sqrt()))?;
            return head_rms_norm(&recurrence::fused_recurrence(&q, &k, v, &la, None)?);
        }
        // chunked views: q (bk, g, n, l, d_k), the rest (bk, n, l, ·)
        let chunks = |x: &Tensor, heads: usize| -> Result<Tensor> {
            let d = x.dim(3)?;
            Ok(x.pad_with_zeros(2, 0, pad)?.reshape((b * heads, n, l, d))?)
        };
        let q = (chunks(q, h)? * (1.0 / (dk as f64).sqrt()))?.reshape((bk, g, n, l, dk))?;
        let (k, v, la) = (chunks(&k, h_kv)?, chunks(v, h_kv)?, chunks(&la, h_kv)?);
        // B_i = Σ_{s≤i} log α_s inside each chunk: (bk, n, l, d_k)
        let bcum = la.cumsum(2)?;
        // intra: A_ij = Σ_c q_ic k_jc e^(B_ic - B_jc) for j ≤ i, the exponent
        // masked to 0 before exp (so never positive) and the term after
        let mask =
            super::linear::causal_rows(1, l, q.dtype(), q.device())?.reshape((1, 1, l, l, 1))?;
        let diff = bcum.unsqueeze(3)?.broadcast_sub(&bcum.unsqueeze(2)?)?; // (bk, n, i, j, d_k)
        let e = diff.broadcast_mul(&mask)?.exp()?.broadcast_mul(&mask)?;
        let ke = e.broadcast_mul(&k.unsqueeze(2)?)?; // (bk, n, i, j, d_k)
        let a = q
            .unsqueeze(4)? // (bk, g, n, i, 1, d_k)
            .broadcast_mul(&ke.unsqueeze(1)?)?
            .sum(5)? // (bk, g, n, i, j)
            .transpose(1, 2)?
            .reshape((bk, n, g * l, l))?;
        let intra = a.matmul(&v)?; // (bk, n, g·l, d_v)
                                   // per chunk: ΔS = (K ⊙ e^(B_l - B_j))ᵀ V and the decay e^(B_l) of S
        let b_last = bcum.narrow(2, l - 1, 1)?; // (bk, n, 1, d_k)
        let kd = k.broadcast_mul(&b_last.broadcast_sub(&bcum)?.exp()?)?;
        let ds = kd.t()?.matmul(&v)?; // (bk, n, d_k, d_v)
        let decay = b_last.exp()?.t()?; // (bk, n, d_k, 1)
                                        // the scan over chunks: S entering chunk c, then S ← e^(B_l) S + ΔS
        let mut s = match state.as_ref().and_then(|st| st.s.clone()) {
            Some(s) => s.reshape((bk, dk, dv))?,
            None => Tensor::zeros((bk, dk, dv), q.dtype(), q.device())?,
        };
        let mut entering = Vec::with_capacity(n);
        for c in 0..n {
            entering.push(s.clone());
            s = (decay.get_on_dim(1, c)?.broadcast_mul(&s)? + ds.get_on_dim(1, c)?)?;
        }
        let entering = Tensor::stack(&entering, 1)?; // (bk, n, d_k, d_v)
                                                     // inter: (q_i ⊙ e^(B_i)) S_entering
        let qd = q
            .broadcast_mul(&bcum.exp()?.unsqueeze(1)?)?
            .transpose(1, 2)?
            .reshape((bk, n, g * l, dk))?;
        let o = (intra + qd.matmul(&entering)?)? // (bk, n, g·l, d_v)
            .reshape((bk, n, g, l, dv))?
            .transpose(1, 2)?
            .reshape((b, h, n * l, dv))?
            .narrow(2, 0, t)?;
        if let Some(st) = state {
            st.s = Some(s.reshape((b, h_kv, dk, dv))?.detach()); // no autograd graph in a decode state
        }
        head_rms_norm(&o)
    }

    /// One token: q (b, h, 1, d_k), k (b, h_kv, 1, d_k), v (b, h_kv, 1, d_v),
    /// log_alpha (b, h_kv, 1, d_k) -> (b, h, 1, d_v); S ← diag(α) S + k vᵀ.
    pub fn step(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        log_alpha: &Tensor,
        state: &mut RecurrentState,
    ) -> Result<Tensor> {
        let (_, h, _, dk) = q.dims4()?;
        let h_kv = k.dim(1)?;
        let ds = k.t()?.matmul(v)?; // (b, h_kv, d_k, d_v)
        let s = match state.s.take() {
            Some(s) => (s.broadcast_mul(&log_alpha.exp()?.t()?)? + ds)?,
            None => ds,
        };
        let q = (q * (1.0 / (dk as f64).sqrt()))?;
        let o = unfold_heads(&fold_heads(&q, h_kv)?.matmul(&s)?, h)?;
        state.s = Some(s.detach()); // else each step's S would keep all earlier ones alive
        head_rms_norm(&o)
    }
}

/// The quadratic form: o_i = Σ_{j≤i, key_ok} Σ_c q_ic k_jc
/// exp(Σ_{s=j+1..i} la_sc) v_j / √d_k with la_s = 0 at padded s; y = norm(o).
/// log_alpha: [b][h_kv][t][d_k].
#[allow(clippy::needless_range_loop)] // indices mirror the formula
pub fn naive(
    q: &Heads,
    k: &Heads,
    v: &Heads,
    log_alpha: &Heads,
    key_ok: &dyn Fn(usize, usize) -> bool,
) -> Heads {
    let (h, h_kv) = (q[0].len(), k[0].len());
    let mut out = vec![];
    for bi in 0..q.len() {
        let mut heads = vec![];
        for hi in 0..h {
            let kv = hi / (h / h_kv);
            let la = |s: usize, c: usize| {
                if key_ok(bi, s) {
                    log_alpha[bi][kv][s][c]
                } else {
                    0.0
                }
            };
            let mut rows = vec![];
            for (i, qi) in q[bi][hi].iter().enumerate() {
                let dk = qi.len();
                let mut o = vec![0.0; v[bi][kv][0].len()];
                for j in 0..=i {
                    if !key_ok(bi, j) {
                        continue;
                    }
                    let mut w = 0.0;
                    for c in 0..dk {
                        let decay: f64 = (j + 1..=i).map(|s| la(s, c)).sum();
                        w += qi[c] * k[bi][kv][j][c] * decay.exp();
                    }
                    w /= (dk as f64).sqrt();
                    for (x, y) in o.iter_mut().zip(&v[bi][kv][j]) {
                        *x += w * y;
                    }
                }
                rows.push(head_rms_norm_naive(&o));
            }
            heads.push(rows);
        }
        out.push(heads);
    }
    out
}
