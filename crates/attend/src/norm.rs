//! LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019).

use crate::config::NormKind;
use crate::error::Result;
use crate::nn::{Builder, Init};
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct Norm {
    kind: NormKind,
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    pub fn new(vb: &Builder, kind: NormKind, d: usize, eps: f64) -> Result<Self> {
        let weight = vb.get("weight", &[d], Init::Ones)?;
        let bias = match kind {
            NormKind::Layernorm => Some(vb.get("bias", &[d], Init::Zeros)?),
            NormKind::Rmsnorm => None,
        };
        Ok(Self {
            kind,
            weight,
            bias,
            eps,
        })
    }

    pub fn kind(&self) -> NormKind {
        self.kind
    }

    /// The gain γ, (d).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias β (LayerNorm only), (d).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// x: (..., d) -> (..., d), normalised over the last dimension.
    /// The width it normalises over.
    pub fn width(&self) -> usize {
        self.weight.dims1().unwrap_or(0)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match self.kind {
            NormKind::Layernorm => crate::kernels::layer_normalize(x, self.eps)?,
            NormKind::Rmsnorm => crate::kernels::rms_normalize(x, self.eps)?,
        };
        let x = crate::kernels::mul_rows(&x, &self.weight)?;
        Ok(match &self.bias {
            Some(b) => crate::kernels::add_rows(&x, b)?,
            None => x,
        })
    }
}
