//! Decayed linear attention: the retention of RetNet (Sun et al. 2023) and
//! the decayed linear attention of TransNormerLLM / Lightning Attention-2
//! (Qin et al. 2024). With a fixed decay γ per kv head,
//!
//!   S_i = γ S_{i-1} + k_i v_iᵀ,   o_i = q_iᵀ S_i / √d_k,
//!   y_i = o_i / rms(o_i)
//!
//! i.e. o_i = Σ_{j≤i} γ^(i-j) (q_i·k_j / √d_k) v_j. There is no normaliser;
//! RetNet puts a GroupNorm after the heads, here each head's output is RMS
//! normalised (no learned gain: W_o follows). Causal only. RetNet's default
//! decays are γ_h = 1 - 2^(-5-h).
//!
//! * `naive`   — the quadratic sum with γ^(i-j);
//! * `forward` — chunked (Lightning Attention-2): inside a chunk of C tokens
//!   (Q Kᵀ ⊙ D) V with D_ij = γ^(i-j) for j ≤ i; across chunks the state S,
//!   read as (γ^(i+1) Q) S and carried as S ← γ^C S + (γ^(C-1-j) K)ᵀ V. All
//!   powers of γ have non-negative exponents, so nothing overflows;
//!   `forward` from a zero state (training, scoring) runs the fused
//!   recurrence instead (`kernels::recurrence`), the same sum token by token;
//! * `step`    — S ← γ S + k vᵀ, o = qᵀS;
//! * the state is `RecurrentState` with S (b, h_kv, d_k, d_v).

use super::linear::{fold_heads, key_mask, unfold_heads, RecurrentState};
use super::Heads;
use crate::config::DecayConfig;
use crate::error::{Error, Result};
use crate::kernels::recurrence;
use candle_core::{Device, Tensor};

/// ε of the per-head RMS norm.
pub const NORM_EPS: f64 = 1e-6;

#[derive(Clone, Debug)]
pub struct DecayAttention {
    /// γ of each kv head.
    pub gammas: Vec<f64>,
    /// C: tokens per chunk of `forward`.
    pub chunk: usize,
}

/// RetNet's decays γ_h = 1 - 2^(-5-h).
pub fn retnet_gammas(heads: usize) -> Vec<f64> {
    (0..heads).map(|h| 1.0 - 2f64.powi(-5 - h as i32)).collect()
}

/// x (…, d) -> x / sqrt(mean(x²) + ε), the per-head output norm.
pub(crate) fn head_rms_norm(x: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::rms_normalize(x, NORM_EPS)?)
}

/// The same norm in f64 loops.
pub(crate) fn head_rms_norm_naive(x: &[f64]) -> Vec<f64> {
    let ms = x.iter().map(|a| a * a).sum::<f64>() / x.len() as f64;
    x.iter().map(|a| a / (ms + NORM_EPS).sqrt()).collect()
}

/// A tensor from host values in the given dtype.
fn host(v: Vec<f64>, shape: &[usize], like: &Tensor, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, dev)?.to_dtype(like.dtype())?)
}

impl DecayAttention {
    pub fn new(cfg: &DecayConfig, n_kv_heads: usize) -> Result<Self> {
        let gammas = match cfg.decay {
            Some(g) if !(g > 0.0 && g < 1.0) => {
                return Err(Error::config(
                    "decay",
                    format!("must be in (0, 1), got {g}"),
                ))
            }
            Some(g) => vec![g; n_kv_heads],
            None => retnet_gammas(n_kv_heads),
        };
        Ok(Self {
            gammas,
            chunk: cfg.chunk.max(1),
        })
    }

    /// Whole sequence, causal. q: (b, h, t, d_k), k: (b, h_kv, t, d_k),
    /// v: (b, h_kv, t, d_v); key_padding (b, t). With `state` the sequence
    /// continues it and leaves it updated. -> (b, h, t, d_v)
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_padding: Option<&Tensor>,
        state: Option<&mut RecurrentState>,
    ) -> Result<Tensor> {
        let (b, h, t, dk) = q.dims4()?;
        let h_kv = k.dim(1)?;
        let g = h / h_kv;
        let dev = q.device();
        let q = (q * (1.0 / (dk as f64).sqrt()))?;
        let k = match key_mask(key_padding, k.dtype())? {
            Some(m) => k.broadcast_mul(&m)?,
            None => k.clone(),
        };
        if state.is_none() && recurrence::usable(&q) {
            // from a zero state, nothing to leave behind: the fused recurrence
            let la: Vec<f64> = self.gammas.iter().map(|g| g.ln()).collect();
            let la = host(la, &[1, h_kv, 1, 1], &q, dev)?.broadcast_as((b, h_kv, t, 1))?;
            return head_rms_norm(&recurrence::fused_recurrence(&q, &k, v, &la, None)?);
        }
        let mut s = state.as_ref().and_then(|st| st.s.clone());
        let mut outs = vec![];
        for start in (0..t).step_by(self.chunk) {
            let l = self.chunk.min(t - start);
            // D (1, h_kv, g·l, l): γ^(i-j) for j ≤ i; q_dec (1, h_kv, g·l, 1):
            // γ^(i+1); k_dec (1, h_kv, l, 1): γ^(l-1-j); s_dec: γ^l
            let mut d = vec![0.0; h_kv * g * l * l];
            let mut q_dec = vec![0.0; h_kv * g * l];
            let mut k_dec = vec![0.0; h_kv * l];
            let mut s_dec = vec![0.0; h_kv];
            for (kv, &gamma) in self.gammas.iter().enumerate() {
                for r in 0..g * l {
                    let i = r % l;
                    for j in 0..=i {
                        d[(kv * g * l + r) * l + j] = gamma.powi((i - j) as i32);
                    }
                    q_dec[kv * g * l + r] = gamma.powi(i as i32 + 1);
                }
                for j in 0..l {
                    k_dec[kv * l + j] = gamma.powi((l - 1 - j) as i32);
                }
                s_dec[kv] = gamma.powi(l as i32);
            }
            let d = host(d, &[1, h_kv, g * l, l], &q, dev)?;
            let qc = fold_heads(&q.narrow(2, start, l)?, h_kv)?; // (b, h_kv, g·l, d_k)
            let kc = k.narrow(2, start, l)?; // (b, h_kv, l, d_k)
            let vc = v.narrow(2, start, l)?; // (b, h_kv, l, d_v)
            let mut o = qc.matmul(&kc.t()?)?.broadcast_mul(&d)?.matmul(&vc)?;
            if let Some(s) = &s {
                let q_dec = host(q_dec, &[1, h_kv, g * l, 1], &q, dev)?;
                o = (o + qc.broadcast_mul(&q_dec)?.matmul(s)?)?;
            }
            let k_dec = host(k_dec, &[1, h_kv, l, 1], &q, dev)?;
            let ds = kc.broadcast_mul(&k_dec)?.t()?.matmul(&vc)?; // (b, h_kv, d_k, d_v)
            s = Some(match s {
                Some(s) => (s.broadcast_mul(&host(s_dec, &[1, h_kv, 1, 1], &q, dev)?)? + ds)?,
                None => ds,
            });
            outs.push(unfold_heads(&o, h)?);
        }
        if let Some(st) = state {
            st.s = s.map(|s| s.detach()); // a decode state keeps no autograd graph
        }
        head_rms_norm(&Tensor::cat(&outs, 2)?)
    }

    /// One token: q (b, h, 1, d_k), k (b, h_kv, 1, d_k), v (b, h_kv, 1, d_v)
    /// -> (b, h, 1, d_v); S ← γ S + k vᵀ, o = qᵀS / √d_k.
    pub fn step(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        state: &mut RecurrentState,
    ) -> Result<Tensor> {
        let (_, h, _, dk) = q.dims4()?;
        let h_kv = k.dim(1)?;
        let ds = k.t()?.matmul(v)?; // (b, h_kv, d_k, d_v)
        let s = match state.s.take() {
            Some(s) => {
                let gamma = host(self.gammas.clone(), &[1, h_kv, 1, 1], q, q.device())?;
                (s.broadcast_mul(&gamma)? + ds)?
            }
            None => ds,
        };
        let q = (q * (1.0 / (dk as f64).sqrt()))?;
        let o = unfold_heads(&fold_heads(&q, h_kv)?.matmul(&s)?, h)?;
        state.s = Some(s.detach()); // else each step's S would keep all earlier ones alive
        head_rms_norm(&o)
    }
}

/// The quadratic form: y_i = norm(Σ_{j≤i, key_ok(b, j)} γ^(i-j)
/// (q_i·k_j/√d_k) v_j), γ = gammas[kv head].
#[allow(clippy::needless_range_loop)] // indices mirror the formula
pub fn naive(
    q: &Heads,
    k: &Heads,
    v: &Heads,
    gammas: &[f64],
    key_ok: &dyn Fn(usize, usize) -> bool,
) -> Heads {
    let (h, h_kv) = (q[0].len(), k[0].len());
    let mut out = vec![];
    for bi in 0..q.len() {
        let mut heads = vec![];
        for hi in 0..h {
            let kv = hi / (h / h_kv);
            let mut rows = vec![];
            for (i, qi) in q[bi][hi].iter().enumerate() {
                let dk = qi.len() as f64;
                let mut o = vec![0.0; v[bi][kv][0].len()];
                for j in 0..=i {
                    if !key_ok(bi, j) {
                        continue;
                    }
                    let dot: f64 = qi.iter().zip(&k[bi][kv][j]).map(|(a, b)| a * b).sum();
                    let w = gammas[kv].powi((i - j) as i32) * dot / dk.sqrt();
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
