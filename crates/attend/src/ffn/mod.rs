//! Position-wise feed-forward networks: FFN(x) = W2 act(W1 x) for ReLU/GELU,
//! and W2 (silu(W1 x) ⊙ W3 x) for SwiGLU (Shazeer 2020).

use crate::config::{FfnKind, ModelConfig};
use crate::error::Result;
use crate::nn::{Builder, Linear};
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct Ffn {
    kind: FfnKind,
    pub w1: Linear,
    pub w2: Linear,
    pub w3: Option<Linear>,
}

impl Ffn {
    pub fn new(vb: &Builder, cfg: &ModelConfig) -> Result<Self> {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        Ok(Self {
            kind: cfg.ffn,
            w1: Linear::new(&vb.pp("w1"), d, f, cfg.bias)?,
            w2: Linear::new(&vb.pp("w2"), f, d, cfg.bias)?,
            w3: match cfg.ffn {
                FfnKind::Swiglu => Some(Linear::new(&vb.pp("w3"), d, f, cfg.bias)?),
                _ => None,
            },
        })
    }

    /// x: (b, t, d) -> (b, t, d)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.w1.forward(x)?;
        let h = match (self.kind, &self.w3) {
            (FfnKind::Relu, _) => h.relu()?,
            (FfnKind::Gelu, _) => h.gelu_erf()?,
            (FfnKind::Swiglu, Some(w3)) => (h.silu()? * w3.forward(x)?)?,
            (FfnKind::Swiglu, None) => unreachable!("swiglu is built with w3"),
        };
        self.w2.forward(&h)
    }
}
