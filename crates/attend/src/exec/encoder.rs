//! The fused forward pass of a post-norm BERT-style encoder (learned
//! positions, LayerNorm after each sublayer, softmax attention, GELU or ReLU
//! feed-forward; the sentence-embedding models `attend embed` runs).
//!
//! It computes what `Transformer::encode` computes, from the same weights,
//! but padding-free: the sequences of a batch are packed one after another
//! into a (tokens, d) buffer, so the linear layers do no work on padding and
//! attention runs per sequence without a mask. The matrix products go to the
//! `gemm` crate directly (the GEMM candle uses, here with its AVX-512
//! kernels) on weights stored transposed once at load; bias and residual are
//! written into the output before the product accumulates onto them; GELU's
//! erf and softmax's exp are polynomial forms that vectorise (libm's `erff`
//! alone was 15% of the composed path's time).
//!
//! `Embedder::load` builds one when the model qualifies (`from_model`).
//! Tests compare it with the composed path (`tests/fused.rs`) and the
//! PyTorch references (`tests/real_models.rs`).

use crate::config::{FfnKind, MechanismConfig, NormKind, NormPosition, PositionKind, Shape};
use crate::error::{Error, Result};
use crate::kernels::attention::gemm_strided;
use crate::kernels::dense::{exp, gelu, layer_norm_rows, linear, par_rows, Dense, Ln};
use crate::model::Transformer;
use crate::nn::{Linear, Weight};
use crate::norm::Norm;
use crate::position::Additive;
use candle_core::{DType, Tensor};
use rayon::prelude::*;

struct Layer {
    /// [W_q; W_k; W_v]ᵀ: (d, 3d)
    qkv: Dense,
    o: Dense,
    ln_1: Ln,
    ff_1: Dense,
    ff_2: Dense,
    ln_2: Ln,
}

/// The weights of a qualifying encoder, copied into GEMM layout.
pub struct FusedEncoder {
    d: usize,
    h: usize,
    hd: usize,
    d_ff: usize,
    eps: f32,
    act: FfnKind,
    vocab: usize,
    max_len: usize,
    /// (vocab, d), times √d when the model scales its embeddings
    embed: Vec<f32>,
    /// (max_len, d)
    pos: Vec<f32>,
    embed_norm: Option<Ln>,
    layers: Vec<Layer>,
}

impl std::fmt::Debug for FusedEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FusedEncoder({} layers)", self.layers.len())
    }
}

fn f32_vec(t: &Tensor) -> Option<Vec<f32>> {
    t.to_dtype(DType::F32)
        .ok()?
        .flatten_all()
        .ok()?
        .to_vec1()
        .ok()
}

fn ln(n: &Norm) -> Option<Ln> {
    if n.kind() != NormKind::Layernorm {
        return None;
    }
    Some(Ln {
        gain: f32_vec(n.weight())?,
        bias: f32_vec(n.bias()?)?,
    })
}

/// Stack the (out_i, in) weights of `ls` into one (in, Σ out_i) matrix.
fn dense(ls: &[&Linear]) -> Option<Dense> {
    let mut parts = vec![];
    for l in ls {
        let Weight::Dense(w) = &l.w else { return None };
        let (d_out, d_in) = w.dims2().ok()?;
        parts.push((f32_vec(w)?, f32_vec(l.b.as_ref()?)?, d_out, d_in));
    }
    let d_in = parts[0].3;
    if parts.iter().any(|p| p.3 != d_in) {
        return None;
    }
    let d_out: usize = parts.iter().map(|p| p.2).sum();
    let mut wt = vec![0f32; d_in * d_out];
    let mut b = Vec::with_capacity(d_out);
    let mut col = 0;
    for (w, bias, n, _) in &parts {
        for o in 0..*n {
            for i in 0..d_in {
                wt[i * d_out + col + o] = w[o * d_in + i];
            }
        }
        b.extend_from_slice(bias);
        col += n;
    }
    Some(Dense { wt, b, d_in, d_out })
}

impl FusedEncoder {
    /// The fused form of `m`, if it is a post-LayerNorm encoder with biases,
    /// learned or sinusoidal positions, softmax multi-head attention and a
    /// GELU/ReLU feed-forward, with dense weights on the CPU and no
    /// dropout. None otherwise.
    pub fn from_model(m: &Transformer) -> Option<Self> {
        let c = &m.cfg;
        let qualifies = c.shape == Shape::Encoder
            && c.norm == NormKind::Layernorm
            && c.norm_position == NormPosition::Post
            && matches!(c.ffn, FfnKind::Gelu | FfnKind::Relu)
            && matches!(c.position, PositionKind::Learned | PositionKind::Sinusoidal)
            && (0..c.n_encoder_layers)
                .all(|i| *c.layer_mechanism(true, i) == MechanismConfig::Softmax)
            && c.kv_heads() == c.n_heads
            && c.bias
            && c.dropout == 0.0
            && m.embed.table.device().is_cpu();
        if !qualifies {
            return None;
        }
        let Additive::Table(pos) = m.pos_enc() else {
            return None;
        };
        let layers = m
            .encoder
            .iter()
            .map(|b| {
                let a = &b.self_attn;
                Some(Layer {
                    qkv: dense(&[&a.q_proj, &a.k_proj, &a.v_proj])?,
                    o: dense(&[&a.o_proj])?,
                    ln_1: ln(&b.ln_1)?,
                    ff_1: dense(&[&b.ffn.w1])?,
                    ff_2: dense(&[&b.ffn.w2])?,
                    ln_2: ln(&b.ln_2)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let embed_norm = match m.embed_norm() {
            Some(n) => Some(ln(n)?),
            None => None,
        };
        Some(Self {
            d: c.d_model,
            h: c.n_heads,
            hd: c.head_dim(),
            d_ff: c.d_ff,
            eps: c.norm_eps as f32,
            act: c.ffn,
            vocab: c.vocab_size,
            max_len: c.max_len,
            embed: {
                let mut e = f32_vec(&m.embed.table)?;
                if c.scale_embeddings {
                    let s = (c.d_model as f64).sqrt() as f32;
                    e.iter_mut().for_each(|v| *v *= s);
                }
                e
            },
            pos: f32_vec(pos)?,
            embed_norm,
            layers,
        })
    }

    pub fn d_model(&self) -> usize {
        self.d
    }

    /// Encode a batch of sequences packed end to end.
    /// seqs: n sequences of token ids -> (Σ len, d) hidden states, the rows
    /// of sequence i following those of sequence i-1.
    pub fn encode(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let d = self.d;
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let t: usize = lens.iter().sum();
        for s in seqs {
            if s.len() > self.max_len {
                return Err(Error::msg(format!(
                    "sequence of {} positions exceeds the model's max_len {}",
                    s.len(),
                    self.max_len
                )));
            }
            if let Some(&id) = s.iter().find(|&&id| id as usize >= self.vocab) {
                return Err(Error::msg(format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.vocab
                )));
            }
        }
        // x (t, d) = embed[id] + pos[p], then the embedding LayerNorm
        let mut x = vec![0f32; t * d];
        let mut rows = x.chunks_exact_mut(d);
        for s in seqs {
            for (p, &id) in s.iter().enumerate() {
                let row = rows.next().expect("t rows");
                let e = &self.embed[id as usize * d..][..d];
                let q = &self.pos[p * d..][..d];
                for ((r, a), b) in row.iter_mut().zip(e).zip(q) {
                    *r = a + b;
                }
            }
        }
        if let Some(n) = &self.embed_norm {
            layer_norm_rows(&mut x, n, self.eps);
        }
        let mut qkv = vec![0f32; t * 3 * d];
        let mut ctx = vec![0f32; t * d];
        let mut y = vec![0f32; t * d];
        let mut hid = vec![0f32; t * self.d_ff];
        for l in &self.layers {
            // attention sublayer: x = LN(x + attn(x) W_oᵀ + b_o)
            linear(&x, &l.qkv, &mut qkv, None);
            self.attention(&qkv, &lens, &mut ctx);
            linear(&ctx, &l.o, &mut y, Some(&x));
            layer_norm_rows(&mut y, &l.ln_1, self.eps);
            std::mem::swap(&mut x, &mut y);
            // feed-forward sublayer: x = LN(x + act(x W_1ᵀ + b_1) W_2ᵀ + b_2)
            linear(&x, &l.ff_1, &mut hid, None);
            match self.act {
                FfnKind::Gelu => par_rows(&mut hid, self.d_ff, |r| r.iter_mut().for_each(gelu)),
                _ => par_rows(&mut hid, self.d_ff, |r| {
                    r.iter_mut().for_each(|v| *v = v.max(0.0))
                }),
            }
            linear(&hid, &l.ff_2, &mut y, Some(&x));
            layer_norm_rows(&mut y, &l.ln_2, self.eps);
            std::mem::swap(&mut x, &mut y);
        }
        Ok(x)
    }

    /// Bidirectional softmax attention within each packed sequence.
    /// qkv (t, 3d) as [q | k | v] per row, lens (n) -> ctx (t, d)
    fn attention(&self, qkv: &[f32], lens: &[usize], ctx: &mut [f32]) {
        let (d, hd) = (self.d, self.hd);
        let scale = 1.0 / (hd as f32).sqrt();
        // one task per sequence: its own rows of ctx
        let mut tasks = Vec::with_capacity(lens.len());
        let (mut rest, mut start) = (ctx, 0);
        for &len in lens {
            let (mine, tail) = rest.split_at_mut(len * d);
            tasks.push((start, len, mine));
            rest = tail;
            start += len;
        }
        tasks.into_par_iter().for_each(|(start, len, out)| {
            if len == 0 {
                return;
            }
            let rows = &qkv[start * 3 * d..(start + len) * 3 * d];
            let (ld, len_i) = (3 * d as isize, len as isize);
            // scores, then probabilities: (len, len)
            let mut s = vec![0f32; len * len];
            for h in 0..self.h {
                let (q, k, v) = (
                    &rows[h * hd..],
                    &rows[d + h * hd..],
                    &rows[2 * d + h * hd..],
                );
                // Safety: every operand lies inside `rows`, `s` or `out`
                // with the strides given (rows of 3d, len, d).
                unsafe {
                    // S = scale · Q_h K_hᵀ: K_hᵀ (hd, len) read in place
                    gemm_strided(
                        (len, len, hd),
                        (s.as_mut_ptr(), len_i),
                        (q.as_ptr(), ld, 1),
                        (k.as_ptr(), 1, ld),
                        scale,
                    );
                }
                for row in s.chunks_exact_mut(len) {
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    row.iter_mut().for_each(|v| *v = exp(*v - max));
                    let inv = 1.0 / row.iter().sum::<f32>();
                    row.iter_mut().for_each(|v| *v *= inv);
                }
                unsafe {
                    // O_h = P V_h, written into the head's columns of ctx
                    let o = &mut out[h * hd..];
                    gemm_strided(
                        (len, hd, len),
                        (o.as_mut_ptr(), d as isize),
                        (s.as_ptr(), len_i, 1),
                        (v.as_ptr(), ld, 1),
                        1.0,
                    );
                }
            }
        });
    }
}
