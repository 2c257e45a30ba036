//! Mamba2 (Dao & Gu 2024, "Transformers are SSMs"): a selective state
//! space model in its state-space-duality (SSD) form — a linear attention
//! whose decay is one data-dependent scalar per token and head:
//!
//!   u = SiLU(ShortConv(x))                     causal depthwise, kernel K
//!   C, B, X = W_q u, W_k u, W_v u              (q, k, v of the layer)
//!   Δ_t = softplus(w_Δ·u_t + b_Δ − 4),  a_t = exp(−Δ_t · e^(A_log))   per kv head
//!   S_t = a_t S_{t−1} + Δ_t B_t X_tᵀ,   y_t = S_tᵀ C_t + D ⊙ X_t
//!   out = rms(y ⊙ SiLU(W_z x))                  per head, then W_o
//!
//! Here B and C have a head of their own per kv / query head (Mamba2's
//! `ngroups` = heads), the convolution runs on the layer's input before the
//! projections (as BASED's does, rather than on X, B, C after them), and the
//! −4 puts Δ near 0.02 at initialisation (Mamba2 draws it in [0.001, 0.1]).
//! Causal only; a padded position is transparent (no input, a = 1).
//!
//! * `naive`   — the recurrence, token by token in f64;
//! * `forward` — chunked SSD: inside a chunk, with γ_i the cumulative
//!   log-decay, Y = e^γ ⊙ (C S) + (C Bᵀ ⊙ e^(γ_i−γ_j) ⊙ M) X; across chunks
//!   S ← e^(γ_C) S + (e^(γ_C−γ_j) B)ᵀ X (every exponent ≤ 0);
//!   From a zero state (training, scoring) `forward` runs the fused
//!   recurrence instead (`kernels::recurrence`); the chunked form serves
//!   prefill;
//! * `step`    — S ← a S + Δ B Xᵀ, y = SᵀC;
//! * the state is `BasedState` (the conv inputs and S; no window).

use super::based::{BasedState, ConvState, ShortConv};
use super::decay::{head_rms_norm, head_rms_norm_naive};
use super::linear::{fold_heads, key_mask, unfold_heads, Chunks, RecurrentState};
use super::{Attention, Heads};
use crate::config::{Mamba2Config, ModelConfig};
use crate::error::Result;
use crate::kernels::recurrence;
use crate::nn::{Builder, Init, Linear};
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct Mamba2 {
    pub conv: ShortConv,
    /// w_Δ: d_model -> h_kv (with bias).
    pub dt: Linear,
    /// A_log per kv head: a = exp(−Δ e^(A_log)).
    pub a_log: Tensor,
    /// D per query head: the skip y += D x.
    pub d_skip: Tensor,
    /// W_z: d_model -> h·head_dim, the output gate.
    pub z_proj: Linear,
    /// C: tokens per chunk of `forward`.
    pub chunk: usize,
}

/// The offset inside Δ's softplus.
pub const DT_SHIFT: f64 = -4.0;

fn softplus(x: &Tensor) -> Result<Tensor> {
    // log(1 + e^x) = relu(x) + log(1 + e^(−|x|))
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

impl Mamba2 {
    pub fn new(vb: &Builder, cfg: &Mamba2Config, model: &ModelConfig) -> Result<Self> {
        let (d, h, h_kv, hd) = (
            model.d_model,
            model.n_heads,
            model.kv_heads(),
            model.head_dim(),
        );
        Ok(Self {
            conv: ShortConv::new(&vb.pp("conv"), d, cfg.conv)?,
            dt: Linear::new(&vb.pp("dt"), d, h_kv, true)?,
            a_log: vb.get("a_log", &[h_kv], Init::Zeros)?,
            d_skip: vb.get("d_skip", &[h], Init::Ones)?,
            z_proj: Linear::new(&vb.pp("z_proj"), d, h * hd, false)?,
            chunk: cfg.chunk.max(1),
        })
    }

    /// u (b, t, d_model) -> (Δ, log a), each (b, h_kv, t, 1).
    pub fn dt_decay(&self, u: &Tensor) -> Result<(Tensor, Tensor)> {
        let dt = softplus(&(self.dt.forward(u)? + DT_SHIFT)?)?
            .transpose(1, 2)?
            .unsqueeze(3)?
            .contiguous()?; // (b, h_kv, t, 1)
        let a = self.a_log.exp()?.reshape((1, (), 1, 1))?;
        let la = dt.broadcast_mul(&a)?.neg()?;
        Ok((dt, la))
    }

    /// The layer: x (b, t, d_model) at positions offset.. -> (b, h, t,
    /// head_dim), before W_o. `attn` supplies W_q (C), W_k (B), W_v (X).
    pub fn layer(
        &self,
        attn: &Attention,
        x: &Tensor,
        offset: usize,
        key_padding: Option<&Tensor>,
        state: Option<&mut BasedState>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (conv_st, lin_st): (Option<&mut ConvState>, Option<&mut RecurrentState>) = match state {
            Some(s) => (Some(&mut s.conv), Some(&mut s.linear)),
            None => (None, None),
        };
        let u = self.conv.forward(x, key_padding, conv_st)?.silu()?;
        let (c, bm, xs) = attn.qkv(&u, offset)?;
        let (dt, la) = self.dt_decay(&u)?;
        let y = match lin_st {
            Some(s) if t == 1 => self.step(&c, &bm, &xs, &dt, &la, s)?,
            s => self.forward(&c, &bm, &xs, &dt, &la, key_padding, s)?,
        };
        // y + D x, gated by SiLU(W_z x), normed per head
        let h = y.dim(1)?;
        let xh = unfold_heads(&repeat_kv(&xs, h)?, h)?;
        let y = (y + xh.broadcast_mul(&self.d_skip.reshape((1, h, 1, 1))?)?)?;
        let z = self
            .z_proj
            .forward(x)?
            .reshape((b, t, h, ()))?
            .transpose(1, 2)?
            .silu()?;
        head_rms_norm(&(y * z)?)
    }

    /// Whole sequence, causal. c: (b, h, t, n), bm: (b, h_kv, t, n), xs:
    /// (b, h_kv, t, p), dt and log_a: (b, h_kv, t, 1); key_padding (b, t).
    /// With `state` the sequence continues it and leaves it updated.
    /// -> y (b, h, t, p), before the skip, gate and norm.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        c: &Tensor,
        bm: &Tensor,
        xs: &Tensor,
        dt: &Tensor,
        log_a: &Tensor,
        key_padding: Option<&Tensor>,
        state: Option<&mut RecurrentState>,
    ) -> Result<Tensor> {
        let (b, h, t, n_st) = c.dims4()?;
        let (_, h_kv, _, p) = xs.dims4()?;
        let (g, bk) = (h / h_kv, b * h_kv);
        let ch = Chunks::new(b, t, self.chunk);
        let (n, l) = (ch.n, ch.l);
        // Δ B as the key; a padded position: no key, no decay
        let k = bm.broadcast_mul(dt)?;
        let (k, la) = match key_mask(key_padding, k.dtype())? {
            Some(m) => (k.broadcast_mul(&m)?, log_a.broadcast_mul(&m)?),
            None => (k, log_a.clone()),
        };
        if state.is_none() && recurrence::usable(c) {
            // from a zero state, nothing to leave behind: the fused recurrence
            return Ok(recurrence::fused_recurrence(c, &k, xs, &la, None)?);
        }
        let q = ch.queries(c, h_kv)?; // (bk, n, g·l, n_st)
        let (k, v, la) = (ch.view(&k)?, ch.view(xs)?, ch.view(&la)?);
        let gamma = la.cumsum(2)?; // (bk, n, l, 1)
        let (_, dq, eg) = ch.decay_rows(&gamma, g)?;
        let intra = q.matmul(&k.t()?)?.mul(&dq)?.matmul(&v)?; // (bk, n, g·l, p)
        let g_last = gamma.narrow(2, l - 1, 1)?;
        let ds = k
            .broadcast_mul(&g_last.broadcast_sub(&gamma)?.exp()?)?
            .t()?
            .matmul(&v)?; // (bk, n, n_st, p)
        let decay = g_last.exp()?; // (bk, n, 1, 1)
        let mut s = match state.as_ref().and_then(|st| st.s.clone()) {
            Some(s) => s.reshape((bk, n_st, p))?,
            None => Tensor::zeros((bk, n_st, p), q.dtype(), q.device())?,
        };
        let mut entering = Vec::with_capacity(n);
        for ci in 0..n {
            entering.push(s.clone());
            s = (s.broadcast_mul(&decay.get_on_dim(1, ci)?)? + ds.get_on_dim(1, ci)?)?;
        }
        let entering = Tensor::stack(&entering, 1)?; // (bk, n, n_st, p)
        let y = ch.outputs(&(intra + q.matmul(&entering)?.broadcast_mul(&eg)?)?, h, t)?;
        if let Some(st) = state {
            st.s = Some(s.reshape((b, h_kv, n_st, p))?.detach());
        }
        Ok(y)
    }

    /// One token: S ← a S + Δ B Xᵀ, y = SᵀC -> (b, h, 1, p).
    pub fn step(
        &self,
        c: &Tensor,
        bm: &Tensor,
        xs: &Tensor,
        dt: &Tensor,
        log_a: &Tensor,
        state: &mut RecurrentState,
    ) -> Result<Tensor> {
        let (_, h, _, _) = c.dims4()?;
        let h_kv = bm.dim(1)?;
        let ds = bm.broadcast_mul(dt)?.t()?.matmul(xs)?; // (b, h_kv, n, p)
        let s = match state.s.take() {
            Some(s) => (s.broadcast_mul(&log_a.exp()?)? + ds)?,
            None => ds,
        };
        let y = unfold_heads(&fold_heads(c, h_kv)?.matmul(&s)?, h)?;
        state.s = Some(s.detach());
        Ok(y)
    }
}

/// (b, h_kv, t, p) -> (b, h_kv, g·t, p): each kv head's rows once per
/// query head of its group, laid out as `fold_heads` lays out queries.
fn repeat_kv(x: &Tensor, h: usize) -> Result<Tensor> {
    let (b, h_kv, t, p) = x.dims4()?;
    let g = h / h_kv;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, h_kv, g, t, p))?
        .reshape((b, h_kv, g * t, p))?)
}

/// The recurrence in f64, before the skip, gate and norm: S_t = a_t
/// S_{t−1} + Δ_t B_t X_tᵀ, y_t = S_tᵀ C_t; a position without `key_ok`
/// leaves S as it is. dt, log_a: [b][h_kv][t].
#[allow(clippy::needless_range_loop)]
pub fn naive(
    c: &Heads,
    bm: &Heads,
    xs: &Heads,
    dt: &[Vec<Vec<f64>>],
    log_a: &[Vec<Vec<f64>>],
    key_ok: &dyn Fn(usize, usize) -> bool,
) -> Heads {
    let (h, h_kv) = (c[0].len(), bm[0].len());
    let (ns, p) = (bm[0][0][0].len(), xs[0][0][0].len());
    let mut out = vec![];
    for bi in 0..c.len() {
        let mut s = vec![vec![vec![0.0; p]; ns]; h_kv];
        let mut heads = vec![vec![]; h];
        for i in 0..c[bi][0].len() {
            if key_ok(bi, i) {
                for kv in 0..h_kv {
                    let a = log_a[bi][kv][i].exp();
                    for r in 0..ns {
                        for col in 0..p {
                            s[kv][r][col] = a * s[kv][r][col]
                                + dt[bi][kv][i] * bm[bi][kv][i][r] * xs[bi][kv][i][col];
                        }
                    }
                }
            }
            for hi in 0..h {
                let kv = hi / (h / h_kv);
                let y: Vec<f64> = (0..p)
                    .map(|col| (0..ns).map(|r| c[bi][hi][i][r] * s[kv][r][col]).sum())
                    .collect();
                heads[hi].push(y);
            }
        }
        out.push(heads);
    }
    out
}

/// The whole layer's output head in f64 from y (the SSM's output): y + D x,
/// times SiLU(z), normed.
pub fn naive_output(y: &[f64], x: &[f64], d: f64, z: &[f64]) -> Vec<f64> {
    let g: Vec<f64> = y
        .iter()
        .zip(x)
        .zip(z)
        .map(|((y, x), z)| (y + d * x) * (z / (1.0 + (-z).exp())))
        .collect();
    head_rms_norm_naive(&g)
}
