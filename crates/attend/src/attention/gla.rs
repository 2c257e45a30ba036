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
//!   Every exponent is ≤ 0: nothing overflows however strong the decay;
//! * `step`    — S ← diag(α) S + k vᵀ, o = qᵀS;
//! * the state is `RecurrentState` with S (b, h_kv, d_k, d_v).

use super::decay::{head_rms_norm, head_rms_norm_naive};
use super::linear::{causal_rows, fold_heads, key_mask, matmul_nd, unfold_heads, RecurrentState};
use super::Heads;
use crate::config::{GlaConfig, ModelConfig};
use crate::error::Result;
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
        let g = h / h_kv;
        let q = (q * (1.0 / (dk as f64).sqrt()))?;
        let (k, la) = match key_mask(key_padding, k.dtype())? {
            Some(m) => (k.broadcast_mul(&m)?, log_alpha.broadcast_mul(&m)?),
            None => (k.clone(), log_alpha.clone()),
        };
        let mut s = state.as_ref().and_then(|st| st.s.clone());
        let mut outs = vec![];
        for start in (0..t).step_by(self.chunk) {
            let l = self.chunk.min(t - start);
            let qc = q.narrow(2, start, l)?; // (b, h, l, d_k)
            let kc = k.narrow(2, start, l)?; // (b, h_kv, l, d_k)
            let vc = v.narrow(2, start, l)?; // (b, h_kv, l, d_v)
                                             // B_i = Σ_{s≤i} log α_s, relative to the chunk start: (b, h_kv, l, d_k)
            let bcum = la.narrow(2, start, l)?.cumsum(2)?;
            // intra: E_ijc = e^(B_ic - B_jc) for j ≤ i, else 0: (b, h_kv, l, l, d_k)
            let mask = causal_rows(1, l, q.dtype(), q.device())?.reshape((1, 1, l, l, 1))?;
            let diff = bcum.unsqueeze(3)?.broadcast_sub(&bcum.unsqueeze(2)?)?;
            let e = diff.broadcast_mul(&mask)?.exp()?.broadcast_mul(&mask)?;
            // (K ⊙ E) arranged (b, h_kv, i, c, j) so that, per query position i,
            // the g heads' q rows (g, d_k) multiply it: A (b, h_kv, i, g, j)
            let ke = e.broadcast_mul(&kc.unsqueeze(2)?)?.transpose(3, 4)?;
            let q_rows = qc
                .reshape((b, h_kv, g, l, dk))?
                .transpose(2, 3)?
                .contiguous()?; // (b, h_kv, l, g, d_k)
            let a = matmul_nd(&q_rows, &ke)?
                .transpose(2, 3)?
                .reshape((b, h_kv, g * l, l))?; // (b, h_kv, g·l, l)
            let mut o = a.matmul(&vc)?; // (b, h_kv, g·l, d_v)
            if let Some(s) = &s {
                // inter: (q_i ⊙ e^(B_i)) S
                let qd = qc
                    .reshape((b, h_kv, g, l, dk))?
                    .broadcast_mul(&bcum.exp()?.unsqueeze(2)?)?
                    .reshape((b, h_kv, g * l, dk))?;
                o = (o + qd.matmul(s)?)?;
            }
            // S ← diag(e^(B_l)) S + (K ⊙ e^(B_l - B_j))ᵀ V
            let b_last = bcum.narrow(2, l - 1, 1)?; // (b, h_kv, 1, d_k)
            let kd = kc.broadcast_mul(&b_last.broadcast_sub(&bcum)?.exp()?)?;
            let ds = kd.t()?.matmul(&vc)?; // (b, h_kv, d_k, d_v)
            s = Some(match s {
                Some(s) => (s.broadcast_mul(&b_last.exp()?.t()?)? + ds)?,
                None => ds,
            });
            outs.push(unfold_heads(&o, h)?);
        }
        debug_assert!(outs.iter().all(|o| o.dim(3).ok() == Some(dv)));
        if let Some(st) = state {
            st.s = s;
        }
        head_rms_norm(&Tensor::cat(&outs, 2)?)
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
        state.s = Some(s);
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
