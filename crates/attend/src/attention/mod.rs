//! Token mixing. An `Attention` layer owns the projections every mechanism
//! shares (W_q, W_k, W_v, W_o) and the positional treatment of q and k; the
//! `Mechanism` decides how queries read keys and values and what is kept
//! between tokens while decoding (`MixerState`). Adding a mechanism means one
//! file beside `softmax.rs`, one `Mechanism` case and its tests.

pub mod softmax;

use crate::config::{MechanismKind, ModelConfig, PositionKind};
use crate::error::Result;
use crate::nn::{Builder, Linear};
use crate::position::{alibi_slopes, Rope};
use candle_core::Tensor;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Softmax,
}

impl From<MechanismKind> for Mechanism {
    fn from(k: MechanismKind) -> Self {
        match k {
            MechanismKind::Softmax => Mechanism::Softmax,
        }
    }
}

/// What a self-attention layer keeps between decode steps.
#[derive(Clone, Debug)]
pub enum MixerState {
    Kv(softmax::KvCache),
}

impl MixerState {
    pub fn state_bytes(&self) -> usize {
        match self {
            MixerState::Kv(c) => c.state_bytes(),
        }
    }

    pub fn select(&mut self, idx: &Tensor) -> Result<()> {
        match self {
            MixerState::Kv(c) => c.select(idx),
        }
    }
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
    pub mechanism: Mechanism,
    /// Causal self-attention (decoder) or bidirectional (encoder, cross).
    pub causal: bool,
    rope: Option<Arc<Rope>>,
    alibi: Option<Vec<f64>>,
}

impl Attention {
    /// `is_self`: self-attention (positions apply) or cross-attention.
    pub fn new(
        vb: &Builder,
        cfg: &ModelConfig,
        causal: bool,
        is_self: bool,
        rope: Option<Arc<Rope>>,
    ) -> Result<Self> {
        let (d, h, h_kv, hd) = (cfg.d_model, cfg.n_heads, cfg.kv_heads(), cfg.head_dim());
        Ok(Self {
            q_proj: Linear::new(&vb.pp("q_proj"), d, h * hd, cfg.bias)?,
            k_proj: Linear::new(&vb.pp("k_proj"), d, h_kv * hd, cfg.bias)?,
            v_proj: Linear::new(&vb.pp("v_proj"), d, h_kv * hd, cfg.bias)?,
            o_proj: Linear::new(&vb.pp("o_proj"), h * hd, d, cfg.bias)?,
            n_heads: h,
            n_kv_heads: h_kv,
            head_dim: hd,
            mechanism: cfg.mechanism.into(),
            causal,
            rope: if is_self { rope } else { None },
            alibi: (is_self && cfg.position == PositionKind::Alibi).then(|| alibi_slopes(h)),
        })
    }

    pub fn new_state(&self) -> MixerState {
        match self.mechanism {
            Mechanism::Softmax => MixerState::Kv(softmax::KvCache::default()),
        }
    }

    /// x: (b, t, d_model) -> (b, heads, t, head_dim)
    fn split(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        Ok(x.reshape((b, t, heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// (b, heads, t, head_dim) -> (b, t, d_model) through W_o
    fn merge(&self, y: &Tensor) -> Result<Tensor> {
        let (b, h, t, hd) = y.dims4()?;
        self.o_proj
            .forward(&y.transpose(1, 2)?.reshape((b, t, h * hd))?)
    }

    /// Self-attention over x: (b, t, d) at positions offset..offset+t.
    /// With `state`, the new keys/values are appended to it and the queries
    /// read everything it holds (prefill and decode); without, the sequence
    /// attends to itself (training). `key_padding`: (b, t_keys), 1 = token.
    pub fn forward(
        &self,
        x: &Tensor,
        offset: usize,
        key_padding: Option<&Tensor>,
        state: Option<&mut MixerState>,
    ) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let mut q = self.split(&self.q_proj.forward(x)?, self.n_heads)?;
        let mut k = self.split(&self.k_proj.forward(x)?, self.n_kv_heads)?;
        let v = self.split(&self.v_proj.forward(x)?, self.n_kv_heads)?;
        if let Some(rope) = &self.rope {
            q = rope.apply(&q, offset)?;
            k = rope.apply(&k, offset)?;
        }
        let (k, v) = match state {
            Some(MixerState::Kv(cache)) => cache.append(&k, &v)?,
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
        let y = match self.mechanism {
            Mechanism::Softmax => softmax::forward(&q, &k, &v, bias.as_ref())?,
        };
        self.merge(&y)
    }

    /// Keys and values of the encoder memory for cross-attention, computed once
    /// per source: memory (b, s, d) -> 2 × (b, h_kv, s, head_dim).
    pub fn memory_kv(&self, memory: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = self.split(&self.k_proj.forward(memory)?, self.n_kv_heads)?;
        let v = self.split(&self.v_proj.forward(memory)?, self.n_kv_heads)?;
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
        let q = self.split(&self.q_proj.forward(x)?, self.n_heads)?;
        let s = kv.0.dim(2)?;
        let bias =
            softmax::score_bias(t, s, 0, false, memory_padding, None, q.dtype(), q.device())?;
        let y = softmax::forward(&q, &kv.0, &kv.1, bias.as_ref())?;
        self.merge(&y)
    }
}
