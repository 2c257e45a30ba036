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
    /// The block it belongs to (encoder blocks first): which nested width
    /// it runs at under `with_widths`.
    pub block: usize,
}

thread_local! {
    /// MatFormer: the nested FFN widths this thread runs (empty: the full
    /// ones; one: every block; else one per block, encoder first).
    static ACTIVE_WIDTHS: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run f with every FFN on this thread at its first `width` hidden units
/// (MatFormer's nested submodel; None, or a width at least an FFN's own:
/// the whole FFN).
pub fn with_width<R>(width: Option<usize>, f: impl FnOnce() -> R) -> R {
    with_widths(width.as_slice(), f)
}

/// As `with_width`, block i at `widths[i]` (Mix'n'Match); one width: every
/// block.
pub fn with_widths<R>(widths: &[usize], f: impl FnOnce() -> R) -> R {
    let before = ACTIVE_WIDTHS.with(|w| w.replace(widths.to_vec()));
    let r = f();
    ACTIVE_WIDTHS.with(|w| *w.borrow_mut() = before);
    r
}

/// The nested width block `i` runs at on this thread (None: its own).
pub fn active_width(i: usize) -> Option<usize> {
    ACTIVE_WIDTHS.with(|w| {
        let w = w.borrow();
        match w.len() {
            0 => None,
            1 => Some(w[0]),
            _ => w.get(i).copied(),
        }
    })
}

impl Ffn {
    /// Block 0's FFN (every block's, unless the model has per-layer widths).
    pub fn new(vb: &Builder, cfg: &ModelConfig) -> Result<Self> {
        Self::for_block(vb, cfg, 0)
    }

    /// The FFN of block `i` (encoder blocks first), `cfg.block_d_ff(i)` wide.
    pub fn for_block(vb: &Builder, cfg: &ModelConfig, i: usize) -> Result<Self> {
        let (d, f, shape) = (cfg.d_model, cfg.block_d_ff(i), cfg.ffn_weights);
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
                block: i,
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
            block: i,
        })
    }

    /// x (tokens, d) -> (tokens, d) on executor `e` (a mixture of experts
    /// runs in its graph form).
    pub fn forward<E: Exec>(&self, e: &E, x: &E::X, b: &E::Batch) -> Result<E::X> {
        match &self.moe {
            Some(m) => e.graph(x, b, &mut |x, ctx| m.forward(self, x, ctx.padding)),
            None => match active_width(self.block) {
                Some(m) if m < self.width()? => self.nested(m)?.dense(e, x),
                _ => self.dense(e, x),
            },
        }
    }

    /// d_ff: the hidden width.
    pub fn width(&self) -> Result<usize> {
        Ok(self.w1.w.dims()?.0)
    }

    /// MatFormer's nested FFN of the first m hidden units: rows [0, m) of
    /// w1 and w3, columns [0, m) of w2 (views of the same parameters, so
    /// training it trains them).
    pub fn nested(&self, m: usize) -> Result<Ffn> {
        let dense = |l: &Linear| -> Result<candle_core::Tensor> {
            match &l.w {
                crate::nn::Weight::Dense(w) => Ok(w.clone()),
                _ => Err(crate::error::Error::msg(
                    "a nested (MatFormer) FFN needs dense float weights",
                )),
            }
        };
        let rows = |l: &Linear| -> Result<Linear> {
            Ok(Linear {
                w: crate::nn::Weight::Dense(dense(l)?.narrow(0, 0, m)?),
                b: l.b.as_ref().map(|b| b.narrow(0, 0, m)).transpose()?,
            })
        };
        Ok(Ffn {
            kind: self.kind,
            w1: rows(&self.w1)?,
            w2: Linear {
                w: crate::nn::Weight::Dense(dense(&self.w2)?.narrow(1, 0, m)?),
                b: self.w2.b.clone(),
            },
            w3: self.w3.as_ref().map(rows).transpose()?,
            moe: None,
            block: self.block,
        })
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
