//! Executors: how the model's one forward pass is run.
//!
//! The model (`model`, `attention`, `ffn`) is written once against the small
//! set of ops below — embed, positions, norm, a group of linear maps over
//! one input, activation / GLU, residual add, attention over a KV cache —
//! and two executors implement them:
//!
//! * [`graph::Graph`] — candle tensors (b, t, d): autograd, training, any
//!   dtype and device, padded batches with masks;
//! * [`cpu::Cpu`] — plain f32 buffers, sequences packed end to end (no
//!   padding): quantized weights on attend's kernels, the KV cache read and
//!   grown in place, parallel regions over whole rows.
//!
//! Whether an op runs fused is the executor's decision, per op: the CPU
//! executor multiplies a quantized weight on `kernels::quant` and a dense
//! one on gemm, and hands the ops it has no buffer form of (the linear-
//! attention family, BASED, ALiBi scores, cross-attention) to the graph
//! form through [`Exec::graph`] — one conversion each way, same numbers.
//! Nothing here looks at the model's configuration.

pub mod cpu;
pub mod graph;

use crate::cache::kv::KvCache;
use crate::error::Result;
use crate::nn::{Dropout, Embedding, Linear};
use crate::norm::Norm;
use crate::position::{Additive, Rope};
use candle_core::Tensor;

/// The pointwise function of a feed-forward layer: act(h), or act(h) ⊙ up
/// for a gated (GLU) one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    Relu,
    Gelu,
    /// GELU's tanh approximation.
    GeluTanh,
    Silu,
}

/// What an attention op needs to know about its layer.
#[derive(Clone, Copy, Debug)]
pub struct AttnOp<'a> {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Decoder self-attention (each query sees the keys up to its own).
    pub causal: bool,
    pub rope: Option<&'a Rope>,
    /// ALiBi slopes per head.
    pub alibi: Option<&'a [f64]>,
    /// Sliding-window attention: each query sees only the last w positions
    /// (and a decode state is a ring of w tokens).
    pub window: Option<usize>,
}

/// Where a batch's tokens sit, as the graph form of an op sees it.
#[derive(Clone, Copy, Debug)]
pub struct Ctx<'a> {
    /// Position of the first token of every sequence.
    pub offset: usize,
    /// (b, t), 1 = token, 0 = padding.
    pub padding: Option<&'a Tensor>,
}

/// A graph-form op handed over by `Exec::graph`: x (b, t, d) -> (b, t, d').
pub type GraphOp<'f> = dyn FnMut(&Tensor, Ctx) -> Result<Tensor> + 'f;

/// The ops the model is written against. Shapes below are per token: an
/// activation `X` holds one row of `width` numbers per token of the batch.
pub trait Exec {
    /// Activations: a (b, t, width) tensor, or packed rows.
    type X: Clone;
    /// The tokens of a batch and their positions.
    type Batch;

    /// The position after the last token of the longest sequence.
    fn end(&self, b: &Self::Batch) -> usize;
    /// Token embeddings: ids -> (tokens, d).
    fn embed(&self, e: &Embedding, b: &Self::Batch) -> Result<Self::X>;
    /// x · s
    fn scale(&self, x: Self::X, s: f64) -> Result<Self::X>;
    /// x + the additive position rows of each token.
    fn add_positions(&self, p: &Additive, x: Self::X, b: &Self::Batch) -> Result<Self::X>;
    /// The norm of x, in x's place (clone x to keep it).
    fn norm(&self, n: &Norm, x: Self::X) -> Result<Self::X>;
    /// The norm of every head-wide slice of each row (query/key norms): the
    /// norm's width divides the row's.
    fn norm_heads(&self, n: &Norm, x: Self::X) -> Result<Self::X>;
    fn dropout(&self, d: &Dropout, x: Self::X) -> Result<Self::X>;
    /// The residual: x + y.
    fn add(&self, x: Self::X, y: &Self::X) -> Result<Self::X>;
    /// [W_i x + b_i for each linear map]: the maps of one group (q/k/v,
    /// gate/up) share their input, so it is prepared once.
    fn linear(&self, x: &Self::X, maps: &[&Linear]) -> Result<Vec<Self::X>>;
    /// act(h), or act(h) ⊙ up.
    fn act(&self, f: Act, h: Self::X, up: Option<&Self::X>) -> Result<Self::X>;
    /// Softmax attention: q (tokens, h·hd), k and v (tokens, h_kv·hd)
    /// before RoPE -> (tokens, h·hd), heads concatenated. With `caches`
    /// (one per sequence of the batch) the new keys and values are stored
    /// and the queries read everything held; without, each sequence attends
    /// to itself.
    fn attend(
        &self,
        op: &AttnOp,
        q: Self::X,
        k: Self::X,
        v: Self::X,
        b: &Self::Batch,
        caches: Option<&mut Vec<KvCache>>,
    ) -> Result<Self::X>;
    /// Run an op in its graph form: x as a (b, t, d) tensor -> f -> back.
    fn graph(&self, x: &Self::X, b: &Self::Batch, f: &mut GraphOp) -> Result<Self::X>;
    /// Only the last token of each sequence.
    fn last(&self, x: Self::X, b: &Self::Batch) -> Result<Self::X>;
    /// Each row's position in its sequence, in row order.
    fn positions(&self, b: &Self::Batch) -> Vec<usize>;
    /// The cosine similarity of each row of a with the same row of b
    /// (0 where either row is zero).
    fn cos_rows(&self, a: &Self::X, b: &Self::X) -> Result<Vec<f32>>;
    /// y, with the rows marked in `keep` taken from x instead.
    fn keep_rows(&self, y: Self::X, x: &Self::X, keep: &[bool]) -> Result<Self::X>;
}

/// cos(a, b) of two rows, in f64 (0 when either is zero).
pub(crate) fn cos(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        (ab / (aa.sqrt() * bb.sqrt())) as f32
    }
}

/// A decode state's per-sequence caches for a batch of `n`: the one empty
/// cache a fresh state holds is copied for every sequence.
pub(crate) fn caches_for(caches: &mut Vec<KvCache>, n: usize) -> Result<()> {
    if caches.len() == n {
        return Ok(());
    }
    match caches.as_slice() {
        [one] if one.is_empty() => {
            let one = one.clone();
            caches.resize(n, one);
            Ok(())
        }
        _ => Err(crate::error::Error::msg(format!(
            "the decode state holds {} sequences, the batch has {n}",
            caches.len()
        ))),
    }
}
