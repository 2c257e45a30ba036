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
//! | softmax | `softmax.rs` | the KV cache (`cache::kv`), optionally under an eviction policy |
//! | sliding window | `window.rs` | ring buffer of the last w keys/values |
//! | linear (elu, relu, taylor, performer) | `linear.rs` | S = Σ φ(k) [v, 1]ᵀ |
//! | BASED | `based.rs` | conv inputs + linear state + window ring |
//! | decayed linear (RetNet) | `decay.rs` | S = Σ γ^(i-j) k vᵀ |
//! | gated linear (GLA) | `gla.rs` | S = Σ diag(Π α) k vᵀ |
//! | delta rule (DeltaNet, Gated DeltaNet) | `delta.rs` | S ← α (I − β k kᵀ) S + β k vᵀ |
//! | Mamba2 (SSD) | `mamba2.rs` | conv inputs + S ← a S + Δ B xᵀ |
//!
//! Grouped key/value heads work for every mechanism: the state is kept per
//! kv head, and the g = n_heads / n_kv_heads query heads of a group read it.
//!
//! `Attention::forward` is written once for both executors (`exec`):
//! softmax attention is the executor's `attend` op (tensors, or buffers and
//! the KV cache in place); the other mechanisms run in their tensor form,
//! which the CPU executor calls through `Exec::graph`.

pub mod based;
pub mod decay;
pub mod delta;
pub mod gla;
pub mod linear;
pub mod mamba2;
pub mod softmax;
pub mod window;

use crate::cache::kv::KvCache;
use crate::config::{MechanismConfig, ModelConfig, PositionKind};
use crate::error::{Error, Result};
use crate::exec::{AttnOp, Ctx, Exec};
use crate::kernels::kv::KvDType;
use crate::nn::{Builder, Linear};
use crate::norm::Norm;
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
    Delta(delta::DeltaRule),
    Mamba2(mamba2::Mamba2),
}

impl Mechanism {
    /// Build the mechanism `m` of a layer; its parameters (if any) live
    /// under `vb`.
    pub fn new(vb: &Builder, m: &MechanismConfig, cfg: &ModelConfig) -> Result<Self> {
        Ok(match m {
            MechanismConfig::Softmax => Mechanism::Softmax,
            // a window as long as the context sees all of it: wider ones
            // are that one (and never allocate for more)
            MechanismConfig::Window(c) => Mechanism::Window(window::WindowAttention::new(
                &crate::config::WindowConfig {
                    window: c.window.min(cfg.max_len),
                },
            )?),
            MechanismConfig::Linear(c) => Mechanism::Linear(linear::LinearAttention::new(vb, c)?),
            MechanismConfig::Based(c) => Mechanism::Based(based::Based::new(vb, c, cfg)?),
            MechanismConfig::Decay(c) => {
                Mechanism::Decay(decay::DecayAttention::new(c, cfg.kv_heads())?)
            }
            MechanismConfig::Gla(c) => Mechanism::Gla(gla::Gla::new(vb, c, cfg)?),
            MechanismConfig::Delta(c) => Mechanism::Delta(delta::DeltaRule::new(vb, c, cfg)?),
            MechanismConfig::Mamba2(c) => Mechanism::Mamba2(mamba2::Mamba2::new(vb, c, cfg)?),
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
            Mechanism::Delta(m) if m.gate.is_some() => "gated-deltanet",
            Mechanism::Delta(_) => "deltanet",
            Mechanism::Mamba2(_) => "mamba2",
        }
    }
}

/// What a self-attention layer keeps between decode steps.
#[derive(Clone, Debug)]
pub enum MixerState {
    /// Softmax: the KV cache of each sequence of the batch (a fresh state
    /// holds one empty cache, copied for every sequence at the first step).
    Kv(Vec<KvCache>),
    /// Sliding window: the last w keys and values.
    Window(window::WindowCache),
    /// Linear, decayed and gated linear attention: one matrix per kv head.
    Recurrent(linear::RecurrentState),
    /// BASED: convolution inputs, linear state and window ring.
    Based(based::BasedState),
}

impl MixerState {
    /// Bytes held in the state's buffers.
    pub fn state_bytes(&self) -> usize {
        match self {
            MixerState::Kv(c) => c.iter().map(|c| c.state_bytes()).sum(),
            MixerState::Window(c) => c.state_bytes(),
            MixerState::Recurrent(s) => s.state_bytes(),
            MixerState::Based(s) => s.state_bytes(),
        }
    }

    /// Keep the sequences at `idx` (beam search reordering).
    pub fn select(&mut self, idx: &Tensor) -> Result<()> {
        match self {
            MixerState::Kv(c) => {
                let idx = idx.to_vec1::<u32>()?;
                if c.iter().any(|c| c.policy.is_some()) && idx != [0] {
                    return Err(Error::msg(
                        "a policy-capped KV cache holds one sequence; it cannot be reordered",
                    ));
                }
                if let [one] = c.as_slice() {
                    if one.is_empty() {
                        // nothing held yet: every sequence starts empty
                        *c = vec![one.clone(); idx.len()];
                        return Ok(());
                    }
                }
                let picked = idx
                    .iter()
                    .map(|&i| {
                        c.get(i as usize).cloned().ok_or_else(|| {
                            Error::msg(format!("sequence {i} is not in the decode state"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                *c = picked;
                Ok(())
            }
            MixerState::Window(c) => c.select(idx),
            MixerState::Recurrent(s) => s.select(idx),
            MixerState::Based(s) => s.select(idx),
        }
    }

    /// The device of the state's tensors (None while empty).
    pub fn device(&self) -> Option<Device> {
        let t = match self {
            MixerState::Kv(_) => return None,
            MixerState::Window(c) => c.k.as_ref(),
            MixerState::Recurrent(s) => s.s.as_ref(),
            MixerState::Based(s) => s.linear.s.as_ref().or(s.conv.buf.as_ref()),
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
    /// RMSNorm of each query and key head before RoPE (Gemma 3, Qwen3).
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
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
        let qk_norm = |name: &str| {
            cfg.qk_norm
                .then(|| Norm::new(&vb.pp(name), cfg.norm, qk_dim, cfg.norm_eps))
                .transpose()
        };
        let rope_qk = match &rope {
            Some(r) if qk_dim != hd => {
                let q = Rope::new(
                    qk_dim,
                    r.max_len(),
                    cfg.rope_theta,
                    r.interleaved,
                    vb.dtype(),
                    vb.device(),
                )?;
                Some(Arc::new(q))
            }
            r => r.clone(),
        };
        let qkv_bias = cfg.bias || cfg.qkv_bias;
        Ok(Self {
            q_proj: Linear::new(&vb.pp("q_proj"), d, h * qk_dim, qkv_bias)?,
            k_proj: Linear::new(&vb.pp("k_proj"), d, h_kv * qk_dim, qkv_bias)?,
            v_proj: Linear::new(&vb.pp("v_proj"), d, h_kv * hd, qkv_bias)?,
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
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
        })
    }

    /// A fresh decode state; softmax layers keep keys and values in `dtype`.
    pub fn new_state(&self, dtype: KvDType) -> Result<MixerState> {
        Ok(match &self.mechanism {
            Mechanism::Softmax => {
                MixerState::Kv(vec![KvCache::new(dtype, self.n_kv_heads, self.head_dim)?])
            }
            Mechanism::Window(m) => MixerState::Kv(vec![KvCache::windowed(
                dtype,
                self.n_kv_heads,
                self.head_dim,
                m.window,
            )?]),
            Mechanism::Linear(_)
            | Mechanism::Decay(_)
            | Mechanism::Gla(_)
            | Mechanism::Delta(_) => MixerState::Recurrent(linear::RecurrentState::default()),
            Mechanism::Based(_) | Mechanism::Mamba2(_) => {
                MixerState::Based(based::BasedState::default())
            }
        })
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
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        if let Some(rope) = &self.rope_qk {
            q = rope.apply(&q, offset)?;
            k = rope.apply(&k, offset)?;
        }
        Ok((q, k, v))
    }

    /// Self-attention of a batch on executor `e`: x (tokens, d), already
    /// normed -> (tokens, d). With `state`, the new tokens are appended to it
    /// and the queries read everything it holds (prefill; a single token
    /// takes the mechanism's `step`); without, each sequence attends to
    /// itself (training, encoders).
    pub fn forward<E: Exec>(
        &self,
        e: &E,
        x: &E::X,
        b: &E::Batch,
        state: Option<&mut MixerState>,
    ) -> Result<E::X> {
        if !self.causal
            && matches!(
                self.mechanism,
                Mechanism::Decay(_)
                    | Mechanism::Gla(_)
                    | Mechanism::Delta(_)
                    | Mechanism::Mamba2(_)
            )
        {
            return Err(Error::msg(format!(
                "`{}` attention is causal only; it cannot run bidirectionally",
                self.mechanism.name()
            )));
        }
        // softmax attention, sliding window or not, is the executor's op
        let window = match &self.mechanism {
            Mechanism::Softmax => Some(None),
            Mechanism::Window(m) => Some(Some(m.window)),
            _ => None,
        };
        if let Some(window) = window {
            let caches = match state {
                None => None,
                Some(MixerState::Kv(c)) => Some(c),
                Some(_) => return Err(state_mismatch(&self.mechanism)),
            };
            let [mut q, mut k, v] =
                three(e.linear(x, &[&self.q_proj, &self.k_proj, &self.v_proj])?);
            if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
                q = e.norm_heads(qn, q)?;
                k = e.norm_heads(kn, k)?;
            }
            let op = AttnOp {
                heads: self.n_heads,
                kv_heads: self.n_kv_heads,
                head_dim: self.head_dim,
                causal: self.causal,
                rope: self.rope.as_deref(),
                alibi: self.alibi.as_deref(),
                window,
            };
            let y = e.attend(&op, q, k, v, b, caches)?;
            return Ok(one(e.linear(&y, &[&self.o_proj])?));
        }
        let mut state = state;
        e.graph(x, b, &mut |x, ctx| self.mix(x, ctx, state.as_deref_mut()))
    }

    /// `forward` on the graph executor for a (b, t, d) tensor at positions
    /// offset..; `key_padding` (b, t), 1 = token.
    pub fn forward_graph(
        &self,
        x: &Tensor,
        offset: usize,
        key_padding: Option<&Tensor>,
        state: Option<&mut MixerState>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let batch = crate::exec::graph::GraphBatch {
            ids: Tensor::zeros((b, t), candle_core::DType::U32, x.device())?,
            offset,
            padding: key_padding.cloned(),
        };
        self.forward(&crate::exec::graph::Graph, x, &batch, state)
    }

    /// The tensor form of the mechanisms other than softmax:
    /// x (b, t, d) at positions ctx.offset.. -> (b, t, d). `ctx.padding`:
    /// (b, t), 1 = token.
    pub fn mix(&self, x: &Tensor, ctx: Ctx, state: Option<&mut MixerState>) -> Result<Tensor> {
        let (offset, key_padding) = (ctx.offset, ctx.padding);
        let (_, t, _) = x.dims3()?;
        let decode = t == 1;
        let y = match &self.mechanism {
            Mechanism::Softmax | Mechanism::Window(_) => {
                return Err(Error::msg(
                    "softmax attention is the executor's attend op, not a graph mixer",
                ))
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
            Mechanism::Delta(m) => {
                let st = self.recurrent(state)?;
                let (q, k, v) = self.qkv(x, offset)?;
                let (q, k) = (
                    delta::DeltaRule::features(&q)?,
                    delta::DeltaRule::features(&k)?,
                );
                let (beta, log_alpha) = m.beta_alpha(x)?;
                match st {
                    Some(s) if decode => m.step(&q, &k, &v, &beta, &log_alpha, s)?,
                    st => m.forward(&q, &k, &v, &beta, &log_alpha, key_padding, st)?,
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
            Mechanism::Mamba2(m) => {
                let st = match state {
                    None => None,
                    Some(MixerState::Based(s)) => Some(s),
                    Some(_) => return Err(state_mismatch(&self.mechanism)),
                };
                m.layer(self, x, offset, key_padding, st)?
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

/// The one output of a single linear map.
pub(crate) fn one<X>(mut v: Vec<X>) -> X {
    v.pop().expect("one map, one output")
}

/// The three outputs of a q/k/v group.
pub(crate) fn three<X>(v: Vec<X>) -> [X; 3] {
    let mut it = v.into_iter();
    let mut next = || it.next().expect("three maps, three outputs");
    [next(), next(), next()]
}
