//! Token mixing. An `Attention` layer owns the projections every mechanism
//! shares (W_q, W_k, W_v, W_o) and the positional treatment of q and k; the
//! `Mechanism` decides how queries read keys and values and what is kept
//! between tokens while decoding (`MixerState`). Adding a mechanism means one
//! file beside `softmax.rs`, one `Mechanism` case and its tests.
//!
//! Every mechanism file follows the pattern of flash-linear-attention:
//! `naive` (the quadratic textbook formula in f64 loops, for tests),
//! `forward` (the whole-sequence form: chunked, linear in length, for the
//! linear family), `step` (one token against a fixed-size decode state) and
//! the state's `state_bytes`.
//!
//! | mechanism | file | decode state |
//! | --- | --- | --- |
//! | softmax | `softmax.rs` | every key and value (`KvCache`) |
//! | sliding window | `window.rs` | ring buffer of the last w keys/values |
//! | linear (elu, relu, taylor, performer) | `linear.rs` | S = Σ φ(k) [v, 1]ᵀ |
//! | BASED | `based.rs` | conv inputs + linear state + window ring |
//! | decayed linear (RetNet) | `decay.rs` | S = Σ γ^(i-j) k vᵀ |
//! | gated linear (GLA) | `gla.rs` | S = Σ diag(Π α) k vᵀ |
//!
//! Grouped key/value heads work for every mechanism: the state is kept per
//! kv head, and the g = n_heads / n_kv_heads query heads of a group read it.

pub mod based;
pub mod decay;
pub mod gla;
pub mod linear;
pub mod softmax;
pub mod window;

use crate::config::{MechanismConfig, ModelConfig, PositionKind};
use crate::error::{Error, Result};
use crate::nn::{Builder, Linear};
use crate::position::{alibi_slopes, Rope};
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// Per-head vectors as nested vectors, [batch][head][position][channel]:
/// the inputs and outputs of the `naive` references.
pub type Heads = Vec<Vec<Vec<Vec<f64>>>>;

/// A token mixer with its settings and any parameters of its own.
#[derive(Clone, Debug)]
pub enum Mechanism {
    Softmax,
    Window(window::WindowAttention),
    Linear(linear::LinearAttention),
    Based(based::Based),
    Decay(decay::DecayAttention),
    Gla(gla::Gla),
}

impl Mechanism {
    /// Build the mechanism `m` of a layer; its parameters (if any) live
    /// under `vb`.
    pub fn new(vb: &Builder, m: &MechanismConfig, cfg: &ModelConfig) -> Result<Self> {
        Ok(match m {
            MechanismConfig::Softmax => Mechanism::Softmax,
            MechanismConfig::Window(c) => Mechanism::Window(window::WindowAttention::new(c)?),
            MechanismConfig::Linear(c) => Mechanism::Linear(linear::LinearAttention::new(vb, c)?),
            MechanismConfig::Based(c) => Mechanism::Based(based::Based::new(vb, c, cfg)?),
            MechanismConfig::Decay(c) => {
                Mechanism::Decay(decay::DecayAttention::new(c, cfg.kv_heads())?)
            }
            MechanismConfig::Gla(c) => Mechanism::Gla(gla::Gla::new(vb, c, cfg)?),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Mechanism::Softmax => "softmax",
            Mechanism::Window(_) => "window",
            Mechanism::Linear(_) => "linear",
            Mechanism::Based(_) => "based",
            Mechanism::Decay(_) => "decay",
            Mechanism::Gla(_) => "gla",
        }
    }
}

/// What a self-attention layer keeps between decode steps.
#[derive(Clone, Debug)]
pub enum MixerState {
    /// Softmax: every past key and value.
    Kv(softmax::KvCache),
    /// Sliding window: the last w keys and values.
    Window(window::WindowCache),
    /// Linear, decayed and gated linear attention: one matrix per kv head.
    Recurrent(linear::RecurrentState),
    /// BASED: convolution inputs, linear state and window ring.
    Based(based::BasedState),
    /// Softmax with a KV cache capped by an eviction policy (batch 1).
    Policy(crate::cache::policy::PolicyCache),
}

impl MixerState {
    /// Bytes held in the state's buffers.
    pub fn state_bytes(&self) -> usize {
        match self {
            MixerState::Kv(c) => c.state_bytes(),
            MixerState::Window(c) => c.state_bytes(),
            MixerState::Recurrent(s) => s.state_bytes(),
            MixerState::Based(s) => s.state_bytes(),
            MixerState::Policy(c) => c.state_bytes(),
        }
    }

    /// Keep the sequences at `idx` (beam search reordering).
    pub fn select(&mut self, idx: &Tensor) -> Result<()> {
        match self {
            MixerState::Kv(c) => c.select(idx),
            MixerState::Window(c) => c.select(idx),
            MixerState::Recurrent(s) => s.select(idx),
            MixerState::Based(s) => s.select(idx),
            MixerState::Policy(_) => {
                if idx.to_vec1::<u32>()? == [0] {
                    Ok(())
                } else {
                    Err(crate::error::Error::msg(
                        "a policy-capped KV cache holds one sequence; it cannot be reordered",
                    ))
                }
            }
        }
    }

    /// The device of the state's tensors (None while empty).
    pub fn device(&self) -> Option<Device> {
        let t = match self {
            MixerState::Kv(c) => return c.keys().map(|k| k.device().clone()),
            MixerState::Window(c) => c.k.as_ref(),
            MixerState::Recurrent(s) => s.s.as_ref(),
            MixerState::Based(s) => s.linear.s.as_ref().or(s.conv.buf.as_ref()),
            MixerState::Policy(_) => None,
        };
        t.map(|t| t.device().clone())
    }
}

fn state_mismatch(m: &Mechanism) -> Error {
    Error::msg(format!(
        "the decode state does not belong to a `{}` attention layer",
        m.name()
    ))
}

/// Multi-head (grouped-query) attention.
#[derive(Clone, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Width of q and k per head: `head_dim`, or the feature dimension d'
    /// of linear attention and BASED.
    pub qk_dim: usize,
    pub mechanism: Mechanism,
    /// Causal self-attention (decoder) or bidirectional (encoder, cross).
    pub causal: bool,
    /// RoPE for head_dim-wide vectors (the model's table).
    rope: Option<Arc<Rope>>,
    /// RoPE for q and k as projected (qk_dim wide).
    rope_qk: Option<Arc<Rope>>,
    alibi: Option<Vec<f64>>,
}

impl Attention {
    /// `is_self`: self-attention (positions and `mechanism` apply) or
    /// cross-attention (always softmax).
    pub fn new(
        vb: &Builder,
        cfg: &ModelConfig,
        config: &MechanismConfig,
        causal: bool,
        is_self: bool,
        rope: Option<Arc<Rope>>,
    ) -> Result<Self> {
        let (d, h, h_kv, hd) = (cfg.d_model, cfg.n_heads, cfg.kv_heads(), cfg.head_dim());
        let mechanism = if is_self {
            Mechanism::new(vb, config, cfg)?
        } else {
            Mechanism::Softmax
        };
        let qk_dim = match &mechanism {
            Mechanism::Softmax => hd,
            _ => config.qk_dim().unwrap_or(hd),
        };
        let rope = if is_self { rope } else { None };
        let rope_qk = match &rope {
            Some(r) if qk_dim != hd => {
                let mut q =
                    Rope::new(qk_dim, r.max_len(), cfg.rope_theta, vb.dtype(), vb.device())?;
                q.interleaved = r.interleaved;
                Some(Arc::new(q))
            }
            r => r.clone(),
        };
        Ok(Self {
            q_proj: Linear::new(&vb.pp("q_proj"), d, h * qk_dim, cfg.bias)?,
            k_proj: Linear::new(&vb.pp("k_proj"), d, h_kv * qk_dim, cfg.bias)?,
            v_proj: Linear::new(&vb.pp("v_proj"), d, h_kv * hd, cfg.bias)?,
            o_proj: Linear::new(&vb.pp("o_proj"), h * hd, d, cfg.bias)?,
            n_heads: h,
            n_kv_heads: h_kv,
            head_dim: hd,
            qk_dim,
            mechanism,
            causal,
            rope,
            rope_qk,
            alibi: (is_self && cfg.position == PositionKind::Alibi).then(|| alibi_slopes(h)),
        })
    }

    pub fn new_state(&self) -> MixerState {
        match self.mechanism {
            Mechanism::Softmax => MixerState::Kv(softmax::KvCache::default()),
            Mechanism::Window(_) => MixerState::Window(window::WindowCache::default()),
            Mechanism::Linear(_) | Mechanism::Decay(_) | Mechanism::Gla(_) => {
                MixerState::Recurrent(linear::RecurrentState::default())
            }
            Mechanism::Based(_) => MixerState::Based(based::BasedState::default()),
        }
    }

    /// The RoPE table for head_dim-wide vectors, if the model uses RoPE.
    pub fn rope(&self) -> Option<&Rope> {
        self.rope.as_deref()
    }

    /// x: (b, t, heads·dim) -> (b, heads, t, dim)
    fn split(x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, t, hd) = x.dims3()?;
        Ok(x.reshape((b, t, heads, hd / heads))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// (b, heads, t, head_dim) -> (b, t, d_model) through W_o
    fn merge(&self, y: &Tensor) -> Result<Tensor> {
        let (b, h, t, hd) = y.dims4()?;
        self.o_proj
            .forward(&y.transpose(1, 2)?.reshape((b, t, h * hd))?)
    }

    /// x: (b, t, d) at positions offset.. -> q (b, h, t, qk_dim),
    /// k (b, h_kv, t, qk_dim), v (b, h_kv, t, head_dim), RoPE applied.
    pub fn qkv(&self, x: &Tensor, offset: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let mut q = Self::split(&self.q_proj.forward(x)?, self.n_heads)?;
        let mut k = Self::split(&self.k_proj.forward(x)?, self.n_kv_heads)?;
        let v = Self::split(&self.v_proj.forward(x)?, self.n_kv_heads)?;
        if let Some(rope) = &self.rope_qk {
            q = rope.apply(&q, offset)?;
            k = rope.apply(&k, offset)?;
        }
        Ok((q, k, v))
    }

    /// Self-attention over x: (b, t, d) at positions offset..offset+t.
    /// With `state`, the new tokens are appended to it and the queries read
    /// everything it holds (prefill; a single token takes the mechanism's
    /// `step`); without, the sequence attends to itself (training).
    /// `key_padding`: 1 = token, 0 = padding; (b, t_keys) for softmax (all
    /// keys, cached ones included), (b, t) for the other mechanisms.
    pub fn forward(
        &self,
        x: &Tensor,
        offset: usize,
        key_padding: Option<&Tensor>,
        state: Option<&mut MixerState>,
    ) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let decode = t == 1;
        if !self.causal && matches!(self.mechanism, Mechanism::Decay(_) | Mechanism::Gla(_)) {
            return Err(Error::msg(format!(
                "`{}` attention is causal only; it cannot run bidirectionally",
                self.mechanism.name()
            )));
        }
        let y = match &self.mechanism {
            Mechanism::Softmax => return self.forward_softmax(x, offset, key_padding, state),
            Mechanism::Window(m) => {
                let st = match state {
                    None => None,
                    Some(MixerState::Window(c)) => Some(c),
                    Some(_) => return Err(state_mismatch(&self.mechanism)),
                };
                let (q, k, v) = self.qkv(x, offset)?;
                match st {
                    Some(c) if decode => m.step(&q, &k, &v, c)?,
                    st => m.forward(&q, &k, &v, self.causal, key_padding, st)?,
                }
            }
            Mechanism::Linear(m) => {
                let st = self.recurrent(state)?;
                let (q, k, v) = self.qkv(x, offset)?;
                match st {
                    Some(s) if decode => m.step(&q, &k, &v, s)?,
                    st => m.forward(&q, &k, &v, self.causal, key_padding, st)?,
                }
            }
            Mechanism::Decay(m) => {
                let st = self.recurrent(state)?;
                let (q, k, v) = self.qkv(x, offset)?;
                match st {
                    Some(s) if decode => m.step(&q, &k, &v, s)?,
                    st => m.forward(&q, &k, &v, key_padding, st)?,
                }
            }
            Mechanism::Gla(m) => {
                let st = self.recurrent(state)?;
                let (q, k, v) = self.qkv(x, offset)?;
                let log_alpha = m.log_alpha(x)?;
                match st {
                    Some(s) if decode => m.step(&q, &k, &v, &log_alpha, s)?,
                    st => m.forward(&q, &k, &v, &log_alpha, key_padding, st)?,
                }
            }
            Mechanism::Based(m) => {
                let st = match state {
                    None => None,
                    Some(MixerState::Based(s)) => Some(s),
                    Some(_) => return Err(state_mismatch(&self.mechanism)),
                };
                m.forward(self, x, offset, key_padding, st)?
            }
        };
        self.merge(&y)
    }

    fn recurrent<'s>(
        &self,
        state: Option<&'s mut MixerState>,
    ) -> Result<Option<&'s mut linear::RecurrentState>> {
        match state {
            None => Ok(None),
            Some(MixerState::Recurrent(s)) => Ok(Some(s)),
            Some(_) => Err(state_mismatch(&self.mechanism)),
        }
    }

    fn forward_softmax(
        &self,
        x: &Tensor,
        offset: usize,
        key_padding: Option<&Tensor>,
        state: Option<&mut MixerState>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if let Some(MixerState::Policy(cache)) = state {
            return self.forward_policy(x, b, t, cache);
        }
        let (q, k, v) = self.qkv(x, offset)?;
        let (k, v) = match state {
            Some(MixerState::Kv(cache)) => cache.append(&k, &v)?,
            Some(_) => return Err(state_mismatch(&self.mechanism)),
            None => (k, v),
        };
        let tk = k.dim(2)?;
        let bias = softmax::score_bias(
            t,
            tk,
            tk - t,
            self.causal,
            key_padding,
            self.alibi.as_deref(),
            q.dtype(),
            q.device(),
        )?;
        let y = softmax::forward(&q, &k, &v, bias.as_ref())?;
        self.merge(&y)
    }

    /// Softmax attention through a policy-capped cache, token by token (the
    /// cache applies RoPE by slot): x (1, t, d) -> (1, t, d).
    fn forward_policy(
        &self,
        x: &Tensor,
        b: usize,
        t: usize,
        cache: &mut crate::cache::policy::PolicyCache,
    ) -> Result<Tensor> {
        if b != 1 {
            return Err(crate::error::Error::msg(
                "a policy-capped KV cache decodes one sequence at a time (batch 1)",
            ));
        }
        if self.alibi.is_some() {
            return Err(crate::error::Error::msg(
                "KV-cache policies take positions from RoPE or the embeddings, not ALiBi",
            ));
        }
        let rows = |lin: &Linear| -> Result<Vec<f32>> {
            Ok(lin
                .forward(x)?
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        };
        let (q, k, v) = (
            rows(&self.q_proj)?,
            rows(&self.k_proj)?,
            rows(&self.v_proj)?,
        );
        let (qd, kvd) = (q.len() / t, k.len() / t);
        let mut out = vec![0f32; q.len()];
        for i in 0..t {
            cache.step(
                &q[i * qd..][..qd],
                &k[i * kvd..][..kvd],
                &v[i * kvd..][..kvd],
                &mut out[i * qd..][..qd],
            )?;
        }
        let y = Tensor::from_vec(out, (1, t, qd), x.device())?.to_dtype(x.dtype())?;
        self.o_proj.forward(&y)
    }

    /// Keys and values of the encoder memory for cross-attention, computed once
    /// per source: memory (b, s, d) -> 2 × (b, h_kv, s, head_dim).
    pub fn memory_kv(&self, memory: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = Self::split(&self.k_proj.forward(memory)?, self.n_kv_heads)?;
        let v = Self::split(&self.v_proj.forward(memory)?, self.n_kv_heads)?;
        Ok((k, v))
    }

    /// Cross-attention: x (b, t, d) reads the encoder memory's keys/values;
    /// `memory_padding`: (b, s), 1 = token.
    pub fn cross(
        &self,
        x: &Tensor,
        kv: &(Tensor, Tensor),
        memory_padding: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let q = Self::split(&self.q_proj.forward(x)?, self.n_heads)?;
        let s = kv.0.dim(2)?;
        let bias =
            softmax::score_bias(t, s, 0, false, memory_padding, None, q.dtype(), q.device())?;
        let y = softmax::forward(&q, &kv.0, &kv.1, bias.as_ref())?;
        self.merge(&y)
    }
}
