//! BASED (Arora et al. 2024, "Simple linear attention language models
//! balance the recall-throughput tradeoff"). The paper's model interleaves
//! three kinds of layers: short gated convolutions (BaseConv), Taylor linear
//! attention and small sliding-window softmax attention. Here one `based`
//! layer holds all three, so that a uniform stack (or a mixed one, with
//! `layer_mechanisms`) is BASED:
//!
//!   u = ShortConv(x)                         causal depthwise, kernel K
//!   q, k, v = W_q u, W_k u, W_v u            q, k of width d' per head
//!   q_w, k_w = W_qw u, W_kw u                head_dim per head, RoPE
//!   y = LinearAttn_taylor(q, k, v) + WindowAttn_w(q_w, k_w, v)
//!
//! summed per head before W_o. With w = 0 the layer has no window branch
//! (no W_qw, W_kw, no ring): a short convolution before Taylor linear
//! attention — the paper's linear-attention layers, which a stack
//! interleaves with `window` layers (the BASED stack of the README). The
//! convolution gives every position a view of
//! the K - 1 inputs before it (the token-shift that recall needs, as in H3
//! and BaseConv); the linear branch is global and fixed-size; the window
//! branch is exact softmax over the last w tokens. In an encoder the linear
//! and window branches are bidirectional while the convolution stays causal.
//!
//! * `naive_conv` — the convolution in f64 loops; the branches' references
//!   are `linear::naive` and `window::naive`;
//! * `forward`    — conv, then the chunked linear form and the blocked
//!   window form (a single token with a state takes the branches' `step`);
//! * `BasedState` — the last K - 1 conv inputs, the linear state and the
//!   window ring: b·((K-1)·d_model + h_kv·F·(d+1) + 2·h_kv·w·d) numbers.

use super::linear::{LinearAttention, RecurrentState};
use super::window::{WindowAttention, WindowCache};
use super::{Attention, Heads};
use crate::config::{BasedConfig, FeatureMap, LinearConfig, ModelConfig};
use crate::error::Result;
use crate::nn::{Builder, Init, Linear};
use candle_core::Tensor;

/// Causal depthwise convolution over time: y_t = Σ_{j<K} w_j ⊙ x_{t-K+1+j}
/// + bias, per channel.
#[derive(Clone, Debug)]
pub struct ShortConv {
    /// (d, K); column K-1 multiplies the current input.
    pub weight: Tensor,
    /// (d)
    pub bias: Tensor,
}

/// The convolution's decode state: the last K - 1 inputs.
#[derive(Clone, Debug, Default)]
pub struct ConvState {
    pub buf: Option<Tensor>, // (b, K - 1, d)
}

impl ShortConv {
    pub fn new(vb: &Builder, d: usize, kernel: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get(
                "weight",
                &[d, kernel],
                Init::Normal(1.0 / (kernel as f64).sqrt()),
            )?,
            bias: vb.get("bias", &[d], Init::Zeros)?,
        })
    }

    pub fn kernel(&self) -> usize {
        self.weight.dims()[1]
    }

    /// x: (b, t, d) -> (b, t, d); padded inputs (key_padding (b, t) = 0)
    /// count as zeros. With `state`, the K - 1 inputs before x come from it
    /// and it keeps the last K - 1 afterwards.
    pub fn forward(
        &self,
        x: &Tensor,
        key_padding: Option<&Tensor>,
        state: Option<&mut ConvState>,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let kernel = self.kernel();
        let x = match key_padding {
            Some(p) => x.broadcast_mul(&p.to_dtype(x.dtype())?.reshape((b, t, 1))?)?,
            None => x.clone(),
        };
        let xp = match state.as_ref().and_then(|s| s.buf.clone()) {
            _ if kernel == 1 => x.clone(),
            Some(prev) => Tensor::cat(&[&prev, &x], 1)?,
            None => x.pad_with_zeros(1, kernel - 1, 0)?,
        }; // (b, K - 1 + t, d)
           // Σ_j x_{t-K+1+j} ⊙ w_j + bias, the per-channel taps broadcast over
           // rows (`kernels::mul_rows`: a row-sum backward, not candle's)
        let mut y: Option<Tensor> = None;
        for j in 0..kernel {
            let w = self.weight.narrow(1, j, 1)?.reshape(d)?;
            let term = crate::kernels::mul_rows(&xp.narrow(1, j, t)?, &w)?;
            y = Some(match y {
                Some(y) => (y + term)?,
                None => term,
            });
        }
        let y = crate::kernels::add_rows(&y.expect("kernel >= 1"), &self.bias)?;
        if let (Some(s), true) = (state, kernel > 1) {
            s.buf = Some(xp.narrow(1, t, kernel - 1)?.contiguous()?.detach());
        }
        Ok(y)
    }
}

/// The convolution in f64 loops: x [b][t][d], weight [d][K], bias [d];
/// inputs where `key_ok(b, t)` is false count as zeros.
#[allow(clippy::needless_range_loop)] // indices mirror the formula
pub fn naive_conv(
    x: &[Vec<Vec<f64>>],
    weight: &[Vec<f64>],
    bias: &[f64],
    key_ok: &dyn Fn(usize, usize) -> bool,
) -> Vec<Vec<Vec<f64>>> {
    let kernel = weight[0].len();
    x.iter()
        .enumerate()
        .map(|(bi, seq)| {
            (0..seq.len())
                .map(|t| {
                    (0..bias.len())
                        .map(|c| {
                            let mut y = bias[c];
                            for j in 0..kernel {
                                // tap j reads position t - (K - 1 - j)
                                let back = kernel - 1 - j;
                                if t >= back && key_ok(bi, t - back) {
                                    y += weight[c][j] * seq[t - back][c];
                                }
                            }
                            y
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// The decode state of a BASED layer.
#[derive(Clone, Debug, Default)]
pub struct BasedState {
    pub conv: ConvState,
    pub linear: RecurrentState,
    pub window: WindowCache,
}

impl BasedState {
    pub fn state_bytes(&self) -> usize {
        let conv = self
            .conv
            .buf
            .as_ref()
            .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes());
        conv + self.linear.state_bytes() + self.window.state_bytes()
    }

    pub fn select(&mut self, idx: &Tensor) -> Result<()> {
        if let Some(b) = &self.conv.buf {
            self.conv.buf = Some(b.index_select(idx, 0)?);
        }
        self.linear.select(idx)?;
        self.window.select(idx)
    }
}

#[derive(Clone, Debug)]
pub struct Based {
    pub conv: ShortConv,
    /// Taylor linear attention over the layer's q, k (width d').
    pub linear: LinearAttention,
    /// The window branch (w > 0).
    pub window: Option<WindowBranch>,
}

/// BASED's sliding-window branch: the window and its own query and key
/// projections (head_dim wide).
#[derive(Clone, Debug)]
pub struct WindowBranch {
    pub attn: WindowAttention,
    pub q_win: Linear,
    pub k_win: Linear,
}

impl Based {
    pub fn new(vb: &Builder, cfg: &BasedConfig, model: &ModelConfig) -> Result<Self> {
        let (d, h, h_kv, hd) = (
            model.d_model,
            model.n_heads,
            model.kv_heads(),
            model.head_dim(),
        );
        let linear = LinearConfig {
            feature_map: FeatureMap::Taylor,
            feature_dim: cfg.feature_dim,
            chunk: cfg.chunk,
            ..LinearConfig::default()
        };
        let window = if cfg.window == 0 {
            None
        } else {
            Some(WindowBranch {
                // at most the context (a wider window sees the same keys)
                attn: WindowAttention::new(&crate::config::WindowConfig {
                    window: cfg.window.min(model.max_len),
                })?,
                q_win: Linear::new(&vb.pp("q_win"), d, h * hd, model.bias)?,
                k_win: Linear::new(&vb.pp("k_win"), d, h_kv * hd, model.bias)?,
            })
        };
        Ok(Self {
            conv: ShortConv::new(&vb.pp("conv"), d, cfg.conv)?,
            linear: LinearAttention::new(vb, &linear)?,
            window,
        })
    }

    /// u (b, t, d) at positions offset.. -> the window branch's q_w
    /// (b, h, t, head_dim), k_w (b, h_kv, t, head_dim), RoPE applied.
    pub fn window_qk(
        w: &WindowBranch,
        attn: &Attention,
        u: &Tensor,
        offset: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = u.dims3()?;
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, heads, attn.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let mut q = split(w.q_win.forward(u)?, attn.n_heads)?;
        let mut k = split(w.k_win.forward(u)?, attn.n_kv_heads)?;
        if let Some(rope) = attn.rope() {
            q = rope.apply(&q, offset)?;
            k = rope.apply(&k, offset)?;
        }
        Ok((q, k))
    }

    /// The layer: x (b, t, d_model) at positions offset.. -> (b, h, t,
    /// head_dim), before W_o. `attn` supplies W_q, W_k, W_v and RoPE.
    pub fn forward(
        &self,
        attn: &Attention,
        x: &Tensor,
        offset: usize,
        key_padding: Option<&Tensor>,
        state: Option<&mut BasedState>,
    ) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let causal = attn.causal;
        let (conv_st, lin_st, win_st) = match state {
            Some(s) => (Some(&mut s.conv), Some(&mut s.linear), Some(&mut s.window)),
            None => (None, None, None),
        };
        let u = self.conv.forward(x, key_padding, conv_st)?;
        let (q, k, v) = attn.qkv(&u, offset)?;
        let lin = match lin_st {
            Some(ls) if t == 1 => self.linear.step(&q, &k, &v, ls)?,
            ls => self.linear.forward(&q, &k, &v, causal, key_padding, ls)?,
        };
        let Some(w) = &self.window else {
            return Ok(lin);
        };
        let (qw, kw) = Self::window_qk(w, attn, &u, offset)?;
        let win = match win_st {
            Some(ws) if t == 1 => w.attn.step(&qw, &kw, &v, ws)?,
            ws => w.attn.forward(&qw, &kw, &v, causal, key_padding, ws)?,
        };
        Ok((lin + win)?)
    }
}

/// BASED's output given the branches' inputs, in f64 loops: the Taylor
/// linear attention of (q, k, v) plus the window attention of (q_w, k_w, v).
#[allow(clippy::too_many_arguments)]
pub fn naive(
    q: &Heads,
    k: &Heads,
    qw: &Heads,
    kw: &Heads,
    v: &Heads,
    window: usize,
    causal: bool,
    key_ok: &dyn Fn(usize, usize) -> bool,
) -> Heads {
    let phi = |x: &[f64]| super::linear::phi_naive(FeatureMap::Taylor, x, None);
    let lin = super::linear::naive(q, k, v, &phi, causal, key_ok);
    if window == 0 {
        return lin;
    }
    let win = super::window::naive(qw, kw, v, window, causal, key_ok);
    lin.iter()
        .zip(&win)
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(a, b)| {
                    a.iter()
                        .zip(b)
                        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x + y).collect())
                        .collect()
                })
                .collect()
        })
        .collect()
}
