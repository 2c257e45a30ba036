//! The delta rule: DeltaNet (Schlag et al. 2021; Yang et al. 2024,
//! "Parallelizing Linear Transformers with the Delta Rule over Sequence
//! Length") and Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024). The state
//! is a fast-weight memory S (d_k × d_v per kv head) that each token edits
//! instead of only adding to: it reads what S holds at its key, and writes
//! back a β-weighted correction towards its value,
//!
//!   S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,   o_t = S_tᵀ q_t / √d_k,
//!   y_t = o_t / rms(o_t)
//!
//! with q, k ← L2-normalised SiLU(q), SiLU(k), β_t = sigmoid(w_β·x_t) per
//! kv head, and α_t = 1 (DeltaNet) or sigmoid(w_α·x_t + b_α)^(1/τ) per kv
//! head (Gated DeltaNet's data-dependent decay, with GLA's gate form).
//! Causal only; a padded position is transparent (k = 0, α = 1).
//!
//! * `naive`   — the recurrence itself, token by token in f64 (as fla's
//!   reference for the delta rule: there is no closed quadratic form);
//! * `forward` — chunked with the WY representation (as fla's chunk_delta_rule
//!   and chunk_gated_delta_rule): inside a chunk of C tokens, with γ_i the
//!   cumulative log-decay from the chunk start and A_ij = β_i (k_i·k_j)
//!   e^(γ_i−γ_j) for j < i, the solves (I + A) W = diag(β e^γ) K and
//!   (I + A) U = diag(β) V (forward substitution: A is strictly lower
//!   triangular) give the chunk's pseudo-values U' = U − W S from the
//!   incoming state, then O = e^γ ⊙ (Q S) + (Q Kᵀ ⊙ e^(γ_i−γ_j) ⊙ M) U' and
//!   S ← e^(γ_C) S + (e^(γ_C−γ_j) K)ᵀ U'. Every exponent is ≤ 0. The
//!   intra-chunk parts of all chunks are computed at once; the scan over
//!   chunks is four small products each;
//!   From a zero state (training, scoring) `forward` runs the fused
//!   recurrence instead (`kernels::recurrence`, forward and backward by
//!   hand); the chunked form serves prefill;
//! * `step`    — S ← α (S − β k (kᵀS)) + β k vᵀ, o = Sᵀq;
//! * the state is `RecurrentState` with S (b, h_kv, d_k, d_v).

use super::decay::{head_rms_norm, head_rms_norm_naive};
use super::linear::{causal_rows, fold_heads, key_mask, unfold_heads, Chunks, RecurrentState};
use super::Heads;
use crate::config::{DeltaConfig, ModelConfig};
use crate::error::Result;
use crate::kernels::recurrence;
use crate::nn::{Builder, Linear};
use candle_core::{Tensor, D};

/// ε of the L2 norm of q and k.
pub const L2_EPS: f64 = 1e-6;

#[derive(Clone, Debug)]
pub struct DeltaRule {
    /// w_β: d_model -> h_kv (with bias).
    pub beta: Linear,
    /// Gated DeltaNet: w_α, d_model -> h_kv (with bias); τ of its gate.
    pub gate: Option<(Linear, f64)>,
    /// C: tokens per chunk of `forward`.
    pub chunk: usize,
    n_kv_heads: usize,
}

/// log sigmoid(x), stable for any x.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.neg()?.relu()? + soft)?.neg()?)
}

/// x (…, d) -> x / sqrt(Σx² + ε): the L2 norm of each head's vector.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = (x.sqr()?.sum_keepdim(D::Minus1)? + L2_EPS)?.sqrt()?;
    Ok(x.broadcast_div(&n)?)
}

impl DeltaRule {
    pub fn new(vb: &Builder, cfg: &DeltaConfig, model: &ModelConfig) -> Result<Self> {
        let (d, h_kv) = (model.d_model, model.kv_heads());
        Ok(Self {
            beta: Linear::new(&vb.pp("beta"), d, h_kv, true)?,
            gate: if cfg.gated {
                Some((Linear::new(&vb.pp("gate"), d, h_kv, true)?, cfg.tau))
            } else {
                None
            },
            chunk: cfg.chunk.max(1),
            n_kv_heads: h_kv,
        })
    }

    /// The feature map of q and k: (…, d) -> L2-normalised SiLU.
    pub fn features(x: &Tensor) -> Result<Tensor> {
        l2_normalize(&x.silu()?)
    }

    /// x (b, t, d_model) -> (β, log α), each (b, h_kv, t, 1); log α = 0
    /// without the gate.
    pub fn beta_alpha(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let per_head = |y: Tensor| -> Result<Tensor> {
            Ok(y.transpose(1, 2)?.unsqueeze(3)?.contiguous()?) // (b, h_kv, t, 1)
        };
        let beta = per_head(candle_nn::ops::sigmoid(&self.beta.forward(x)?)?)?;
        let la = match &self.gate {
            Some((g, tau)) => per_head((log_sigmoid(&g.forward(x)?)? / *tau)?)?,
            None => beta.zeros_like()?,
        };
        debug_assert_eq!(beta.dim(1).ok(), Some(self.n_kv_heads));
        Ok((beta, la))
    }

    /// Whole sequence, causal. q: (b, h, t, d_k), k: (b, h_kv, t, d_k),
    /// v: (b, h_kv, t, d_v), beta and log_alpha: (b, h_kv, t, 1) (q and k
    /// already through `features`); key_padding (b, t). With `state` the
    /// sequence continues it and leaves it updated. -> (b, h, t, d_v)
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        beta: &Tensor,
        log_alpha: &Tensor,
        key_padding: Option<&Tensor>,
        state: Option<&mut RecurrentState>,
    ) -> Result<Tensor> {
        let (b, h, t, dk) = q.dims4()?;
        let (_, h_kv, _, dv) = v.dims4()?;
        let (g, bk) = (h / h_kv, b * h_kv);
        let ch = Chunks::new(b, t, self.chunk);
        let (n, l) = (ch.n, ch.l);
        // a padded position: no key, no decay
        let (k, la) = match key_mask(key_padding, k.dtype())? {
            Some(m) => (k.broadcast_mul(&m)?, log_alpha.broadcast_mul(&m)?),
            None => (k.clone(), log_alpha.clone()),
        };
        if state.is_none() && recurrence::usable(q) {
            // from a zero state, nothing to leave behind: the fused recurrence
            let q = (q * (1.0 / (dk as f64).sqrt()))?;
            let o = recurrence::fused_recurrence(&q, &k, v, &la, Some(beta))?;
            return head_rms_norm(&o);
        }
        let q = (ch.queries(q, h_kv)? * (1.0 / (dk as f64).sqrt()))?; // (bk, n, g·l, d_k)
        let (k, v) = (ch.view(&k)?, ch.view(v)?);
        let (beta, la) = (ch.view(beta)?, ch.view(&la)?); // (bk, n, l, 1)
                                                          // γ_i: cumulative log-decay inside the chunk, (bk, n, l, 1);
                                                          // D_ij = e^(γ_i − γ_j) for j ≤ i
        let gamma = la.cumsum(2)?;
        let (dmat, dq, eg) = ch.decay_rows(&gamma, g)?;
        let mask = causal_rows(1, l, q.dtype(), q.device())?.reshape((1, 1, l, l))?;
        // A_ij = β_i (k_i·k_j) D_ij for j < i
        let strict = (&mask - Tensor::eye(l, q.dtype(), q.device())?.reshape((1, 1, l, l))?)?;
        let a = k
            .matmul(&k.t()?)?
            .broadcast_mul(&dmat)?
            .broadcast_mul(&strict)?
            .broadcast_mul(&beta)?;
        // (I + A) [W | U] = [diag(β e^γ) K | diag(β) V], row by row
        let rhs = Tensor::cat(
            &[
                k.broadcast_mul(&beta.broadcast_mul(&gamma.exp()?)?)?,
                v.broadcast_mul(&beta)?,
            ],
            3,
        )?; // (bk, n, l, d_k + d_v)
        let mut rows: Vec<Tensor> = Vec::with_capacity(l);
        for i in 0..l {
            let r = rhs.narrow(2, i, 1)?;
            let r = if i == 0 {
                r
            } else {
                let prev = Tensor::cat(&rows, 2)?; // (bk, n, i, ·)
                (r - a.narrow(2, i, 1)?.narrow(3, 0, i)?.matmul(&prev)?)?
            };
            rows.push(r);
        }
        let wu = Tensor::cat(&rows, 2)?;
        let (w, u) = (wu.narrow(3, 0, dk)?, wu.narrow(3, dk, dv)?);
        // intra-chunk scores of every chunk at once: (Q Kᵀ ⊙ D) for the g
        // query heads, (bk, n, g·l, l)
        let p = q.matmul(&k.t()?)?.mul(&dq)?;
        let g_last = gamma.narrow(2, l - 1, 1)?; // (bk, n, 1, 1)
        let kd = k.broadcast_mul(&g_last.broadcast_sub(&gamma)?.exp()?)?; // e^(γ_C−γ_j) k_j
        let decay = g_last.exp()?; // (bk, n, 1, 1)
        let mut s = match state.as_ref().and_then(|st| st.s.clone()) {
            Some(s) => s.reshape((bk, dk, dv))?,
            None => Tensor::zeros((bk, dk, dv), q.dtype(), q.device())?,
        };
        let mut outs = Vec::with_capacity(n);
        for c in 0..n {
            let at = |x: &Tensor| x.get_on_dim(1, c);
            let u2 = (at(&u)? - at(&w)?.matmul(&s)?)?; // U' (bk, l, d_v)
            let o = (at(&q)?.matmul(&s)?.broadcast_mul(&at(&eg)?)? + at(&p)?.matmul(&u2)?)?;
            outs.push(o);
            s = (s.broadcast_mul(&at(&decay)?)? + at(&kd)?.t()?.matmul(&u2)?)?;
        }
        let o = ch.outputs(&Tensor::stack(&outs, 1)?, h, t)?; // (b, h, t, d_v)
        if let Some(st) = state {
            st.s = Some(s.reshape((b, h_kv, dk, dv))?.detach());
        }
        head_rms_norm(&o)
    }

    /// One token: q (b, h, 1, d_k), k (b, h_kv, 1, d_k), v (b, h_kv, 1, d_v),
    /// beta and log_alpha (b, h_kv, 1, 1) -> (b, h, 1, d_v);
    /// S ← α (S − β k (kᵀS)) + β k vᵀ.
    pub fn step(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        beta: &Tensor,
        log_alpha: &Tensor,
        state: &mut RecurrentState,
    ) -> Result<Tensor> {
        let (b, h, _, dk) = q.dims4()?;
        let (_, h_kv, _, dv) = v.dims4()?;
        let s = match state.s.take() {
            Some(s) => s,
            None => Tensor::zeros((b, h_kv, dk, dv), q.dtype(), q.device())?,
        };
        let kt = k.t()?; // (b, h_kv, d_k, 1)
        let read = k.matmul(&s)?; // kᵀS (b, h_kv, 1, d_v)
        let s = (s - kt.matmul(&read)?.broadcast_mul(beta)?)?;
        let s = (s.broadcast_mul(&log_alpha.exp()?)? + kt.matmul(v)?.broadcast_mul(beta)?)?;
        let q = (q * (1.0 / (dk as f64).sqrt()))?;
        let o = unfold_heads(&fold_heads(&q, h_kv)?.matmul(&s)?, h)?;
        state.s = Some(s.detach());
        head_rms_norm(&o)
    }
}

/// The recurrence in f64: S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,
/// o_t = S_tᵀ q_t / √d_k, y = norm(o); a position without `key_ok` leaves S
/// as it is. beta, log_alpha: [b][h_kv][t] (one number per position).
#[allow(clippy::needless_range_loop)] // indices mirror the formula
pub fn naive(
    q: &Heads,
    k: &Heads,
    v: &Heads,
    beta: &[Vec<Vec<f64>>],
    log_alpha: &[Vec<Vec<f64>>],
    key_ok: &dyn Fn(usize, usize) -> bool,
    s0: Option<&[Vec<Vec<Vec<f64>>>]>,
) -> (Heads, Vec<Vec<Vec<Vec<f64>>>>) {
    let (h, h_kv) = (q[0].len(), k[0].len());
    let (dk, dv) = (k[0][0][0].len(), v[0][0][0].len());
    let mut out = vec![];
    let mut finals = vec![];
    for bi in 0..q.len() {
        let mut s: Vec<Vec<Vec<f64>>> = match s0 {
            Some(s) => s[bi].clone(),
            None => vec![vec![vec![0.0; dv]; dk]; h_kv],
        };
        let t = q[bi][0].len();
        let mut heads = vec![vec![]; h];
        for i in 0..t {
            for kv in 0..h_kv {
                if !key_ok(bi, i) {
                    continue;
                }
                let (kk, vv) = (&k[bi][kv][i], &v[bi][kv][i]);
                let (b_, a_) = (beta[bi][kv][i], log_alpha[bi][kv][i].exp());
                let sk = &mut s[kv];
                // kᵀS
                let read: Vec<f64> = (0..dv)
                    .map(|c| (0..dk).map(|r| kk[r] * sk[r][c]).sum())
                    .collect();
                for r in 0..dk {
                    for c in 0..dv {
                        sk[r][c] = a_ * (sk[r][c] - b_ * kk[r] * read[c]) + b_ * kk[r] * vv[c];
                    }
                }
            }
            for hi in 0..h {
                let kv = hi / (h / h_kv);
                let qi = &q[bi][hi][i];
                let o: Vec<f64> = (0..dv)
                    .map(|c| (0..dk).map(|r| qi[r] * s[kv][r][c]).sum::<f64>() / (dk as f64).sqrt())
                    .collect();
                heads[hi].push(head_rms_norm_naive(&o));
            }
        }
        out.push(heads);
        finals.push(s);
    }
    (out, finals)
}
