//! Position-wise feed-forward networks: FFN(x) = W2 act(W1 x) for ReLU/GELU,
//! and W2 (act(W1 x) ⊙ W3 x) for the gated forms (Shazeer 2020): SwiGLU
//! with SiLU, GeGLU with GELU's tanh approximation (Gemma). Each weight
//! matrix is dense, low-rank or block-diagonal (`FfnWeights`).

pub mod moe;

use crate::config::{FfnKind, ModelConfig};
use crate::error::Result;
use crate::exec::{Act, Exec};
use crate::nn::{Builder, Linear};
use moe::Moe;

#[derive(Clone, Debug)]
pub struct Ffn {
    pub kind: FfnKind,
    /// With `moe`, every expert's matrix stacked by rows: w1 and w3
    /// (E·d_ff, d), w2 (E·d, d_ff), so expert e's are row blocks (and each
    /// row belongs to one expert, as row-wise int8 wants).
    pub w1: Linear,
    pub w2: Linear,
    pub w3: Option<Linear>,
    /// The router of a mixture of experts (`moe`).
    pub moe: Option<Moe>,
}

impl Ffn {
    pub fn new(vb: &Builder, cfg: &ModelConfig) -> Result<Self> {
        let (d, f, shape) = (cfg.d_model, cfg.d_ff, cfg.ffn_weights);
        let gated = matches!(cfg.ffn, FfnKind::Swiglu | FfnKind::Geglu);
        if let Some(m) = &cfg.moe {
            let e = m.experts;
            return Ok(Self {
                kind: cfg.ffn,
                w1: moe::stacked(&vb.pp("w1"), e, f, d, cfg.bias)?,
                w2: moe::stacked(&vb.pp("w2"), e, d, f, cfg.bias)?,
                w3: gated
                    .then(|| moe::stacked(&vb.pp("w3"), e, f, d, cfg.bias))
                    .transpose()?,
                moe: Some(Moe::new(&vb.pp("router"), d, m)?),
            });
        }
        let lin = |name: &str, i: usize, o: usize| {
            Linear::structured(&vb.pp(name), i, o, cfg.bias, shape)
        };
        Ok(Self {
            kind: cfg.ffn,
            w1: lin("w1", d, f)?,
            w2: lin("w2", f, d)?,
            w3: gated.then(|| lin("w3", d, f)).transpose()?,
            moe: None,
        })
    }

    /// x (tokens, d) -> (tokens, d) on executor `e` (a mixture of experts
    /// runs in its graph form).
    pub fn forward<E: Exec>(&self, e: &E, x: &E::X, b: &E::Batch) -> Result<E::X> {
        match &self.moe {
            Some(m) => e.graph(x, b, &mut |x, ctx| m.forward(self, x, ctx.padding)),
            None => self.dense(e, x),
        }
    }

    /// The dense FFN: x (tokens, d) -> (tokens, d).
    pub fn dense<E: Exec>(&self, e: &E, x: &E::X) -> Result<E::X> {
        let h = match (self.kind, &self.w3) {
            (FfnKind::Swiglu | FfnKind::Geglu, Some(w3)) => {
                let mut gu = e.linear(x, &[&self.w1, w3])?;
                let up = gu.pop().expect("two maps");
                let f = if self.kind == FfnKind::Swiglu {
                    Act::Silu
                } else {
                    Act::GeluTanh
                };
                e.act(f, gu.pop().expect("two maps"), Some(&up))?
            }
            (FfnKind::Swiglu | FfnKind::Geglu, None) => {
                unreachable!("gated FFNs are built with w3")
            }
            (kind, _) => {
                let f = if kind == FfnKind::Relu {
                    Act::Relu
                } else {
                    Act::Gelu
                };
                let h = e.linear(x, &[&self.w1])?.pop().expect("one map");
                e.act(f, h, None)?
            }
        };
        Ok(e.linear(&h, &[&self.w2])?.pop().expect("one map"))
    }
}
