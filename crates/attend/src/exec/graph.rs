//! The graph executor: the model's ops on candle tensors (b, t, d), with
//! autograd — training, scoring whole sequences, any dtype and device,
//! padded batches with masks.

use super::{caches_for, Act, AttnOp, Ctx, Exec, GraphOp};
use crate::cache::kv::KvCache;
use crate::error::{Error, Result};
use crate::nn::{Dropout, Embedding, Linear};
use crate::norm::Norm;
use crate::position::Additive;
use candle_core::{DType, Device, Tensor};

// (score_bias and softmax_attention, the tensor form of softmax attention,
// are at the end of this file; `attention::softmax` re-exports them.)

/// A batch of b sequences of t tokens, all starting at `offset`.
#[derive(Clone, Debug)]
pub struct GraphBatch {
    /// (b, t) u32
    pub ids: Tensor,
    pub offset: usize,
    /// (b, t), 1 = token, 0 = padding
    pub padding: Option<Tensor>,
}

impl GraphBatch {
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            offset: self.offset,
            padding: self.padding.as_ref(),
        }
    }
}

/// Runs the ops on candle tensors.
#[derive(Clone, Copy, Debug, Default)]
pub struct Graph;

/// x: (b, t, heads·dim) -> (b, heads, t, dim)
fn split(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, hd) = x.dims3()?;
    Ok(x.reshape((b, t, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// (b, heads, t, dim) -> (b, t, heads·dim)
fn merge(y: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = y.dims4()?;
    Ok(y.transpose(1, 2)?.reshape((b, t, h * hd))?)
}

/// (b, t, w) as f32 numbers, one Vec per sequence.
fn rows_f32(x: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(x.to_dtype(DType::F32)?
        .to_vec3::<f32>()?
        .into_iter()
        .map(|s| s.concat())
        .collect())
}

impl Exec for Graph {
    type X = Tensor;
    type Batch = GraphBatch;

    fn end(&self, b: &GraphBatch) -> usize {
        b.offset + b.ids.dims().get(1).copied().unwrap_or(0)
    }

    fn embed(&self, e: &Embedding, b: &GraphBatch) -> Result<Tensor> {
        e.forward(&b.ids)
    }

    fn scale(&self, x: Tensor, s: f64) -> Result<Tensor> {
        Ok((x * s)?)
    }

    fn add_positions(&self, p: &Additive, x: Tensor, b: &GraphBatch) -> Result<Tensor> {
        p.forward(&x, b.offset)
    }

    fn norm(&self, n: &Norm, x: Tensor) -> Result<Tensor> {
        n.forward(&x)
    }

    fn norm_heads(&self, n: &Norm, x: Tensor) -> Result<Tensor> {
        // (b, t, h·hd) -> (b, t, h, hd), normed over hd, and back
        let (b, t, w) = x.dims3()?;
        let hd = n.width();
        n.forward(&x.reshape((b, t, w / hd, hd))?)?
            .reshape((b, t, w))
            .map_err(Into::into)
    }

    fn dropout(&self, d: &Dropout, x: Tensor) -> Result<Tensor> {
        d.forward(&x)
    }

    fn add(&self, x: Tensor, y: &Tensor) -> Result<Tensor> {
        Ok((x + y)?)
    }

    fn linear(&self, x: &Tensor, maps: &[&Linear]) -> Result<Vec<Tensor>> {
        maps.iter().map(|l| l.forward(x)).collect()
    }

    fn act(&self, f: Act, h: Tensor, up: Option<&Tensor>) -> Result<Tensor> {
        let a = match f {
            Act::Relu => h.relu()?,
            Act::Gelu => h.gelu_erf()?,
            Act::GeluTanh => h.gelu()?,
            Act::Silu => h.silu()?,
        };
        Ok(match up {
            Some(u) => (a * u)?,
            None => a,
        })
    }

    fn attend(
        &self,
        op: &AttnOp,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        b: &GraphBatch,
        caches: Option<&mut Vec<KvCache>>,
    ) -> Result<Tensor> {
        let (nb, t, _) = q.dims3()?;
        let caches = match caches {
            // a policy cache (one sequence) and a window's ring attend on
            // their buffers
            Some(c) if op.window.is_some() || c.iter().any(|c| c.policy.is_some()) => {
                return buffer_attend(op, &q, &k, &v, c)
            }
            c => c,
        };
        let mut q = split(&q, op.heads)?;
        let mut k = split(&k, op.kv_heads)?;
        let v = split(&v, op.kv_heads)?;
        if let Some(rope) = op.rope {
            q = rope.apply(&q, b.offset)?;
            k = rope.apply(&k, b.offset)?;
        }
        let (k, v) = match caches {
            None => (k, v),
            Some(caches) => {
                // store the new rows (token-major per sequence), read all back
                caches_for(caches, nb)?;
                let kt = rows_f32(&k.transpose(1, 2)?.flatten_from(2)?)?;
                let vt = rows_f32(&v.transpose(1, 2)?.flatten_from(2)?)?;
                let (mut ks, mut vs) = (vec![], vec![]);
                for ((c, kr), vr) in caches.iter_mut().zip(&kt).zip(&vt) {
                    c.append(kr, vr)?;
                    let (kf, vf) = c.to_f32();
                    let n = c.len();
                    let dev = q.device();
                    let shape = (1, op.kv_heads, n, op.head_dim);
                    ks.push(Tensor::from_vec(kf, shape, dev)?);
                    vs.push(Tensor::from_vec(vf, shape, dev)?);
                }
                (
                    Tensor::cat(&ks, 0)?.to_dtype(q.dtype())?,
                    Tensor::cat(&vs, 0)?.to_dtype(q.dtype())?,
                )
            }
        };
        if let (Some(w), None) = (op.window, op.alibi) {
            // the blocked band: O(t·w), not O(t²)
            let y = banded(&q, &k, &v, 0, w, op.causal, b.padding.as_ref())?;
            return merge(&y);
        }
        let tk = k.dim(2)?;
        let mut bias = score_bias(
            t,
            tk,
            tk - t,
            op.causal,
            b.padding.as_ref(),
            op.alibi,
            q.dtype(),
            q.device(),
        )?;
        if let Some(w) = op.window {
            // ALiBi within a window: the band on top of the scores' bias
            let band = band_bias(t, tk, tk - t, w, q.dtype(), q.device())?;
            bias = Some(match bias {
                Some(x) => x.broadcast_add(&band)?,
                None => band,
            });
        }
        merge(&softmax_attention(&q, &k, &v, bias.as_ref())?)
    }

    fn graph(&self, x: &Tensor, b: &GraphBatch, f: &mut GraphOp) -> Result<Tensor> {
        f(x, b.ctx())
    }

    fn last(&self, x: Tensor, _: &GraphBatch) -> Result<Tensor> {
        let t = x.dim(1)?;
        Ok(x.narrow(1, t - 1, 1)?)
    }

    fn positions(&self, b: &GraphBatch) -> Vec<usize> {
        let (n, t) = b.ids.dims2().unwrap_or((0, 0));
        (0..n).flat_map(|_| b.offset..b.offset + t).collect()
    }

    fn cos_rows(&self, a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
        // (b, t, d) each -> rows of d
        let d = a.dim(candle_core::D::Minus1)?;
        let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(a.chunks_exact(d)
            .zip(b.chunks_exact(d))
            .map(|(a, b)| super::cos(a, b))
            .collect())
    }

    fn keep_rows(&self, y: Tensor, x: &Tensor, keep: &[bool]) -> Result<Tensor> {
        // y (b, t, d), x (b, t, d): y ⊙ (1 − m) + x ⊙ m, m (b, t, 1)
        let (nb, t, _) = y.dims3()?;
        let m: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        let m = Tensor::from_vec(m, (nb, t, 1), y.device())?.to_dtype(y.dtype())?;
        let keep_y = (1.0 - &m)?;
        Ok((y.broadcast_mul(&keep_y)? + x.broadcast_mul(&m)?)?)
    }
}

/// Attention through caches that attend on their own buffers (a policy's,
/// one sequence; a sliding window's ring): q (b, t, h·hd), k and v
/// (b, t, h_kv·hd) before RoPE -> (b, t, h·hd).
fn buffer_attend(
    op: &AttnOp,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    caches: &mut Vec<KvCache>,
) -> Result<Tensor> {
    let (nb, t, qd) = q.dims3()?;
    if caches.iter().any(|c| c.policy.is_some()) && (nb != 1 || caches.len() != 1) {
        return Err(Error::msg(
            "a policy-capped KV cache decodes one sequence at a time (batch 1)",
        ));
    }
    if op.alibi.is_some() {
        return Err(Error::msg(
            "KV-cache policies and sliding-window caches take positions from RoPE or the \
             embeddings, not ALiBi",
        ));
    }
    caches_for(caches, nb)?;
    let flat =
        |x: &Tensor| -> Result<Vec<f32>> { Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
    let (mut qf, mut kf, vf) = (flat(q)?, flat(k)?, flat(v)?);
    let mut out = vec![0f32; qf.len()];
    let kvd = kf.len() / (nb * t).max(1);
    for (i, c) in caches.iter_mut().enumerate() {
        c.attend(
            &mut qf[i * t * qd..][..t * qd],
            &mut kf[i * t * kvd..][..t * kvd],
            &vf[i * t * kvd..][..t * kvd],
            op.rope.map(|r| &*r.tables),
            op.heads,
            &mut out[i * t * qd..][..t * qd],
        )?;
    }
    Ok(Tensor::from_vec(out, (nb, t, qd), q.device())?.to_dtype(q.dtype())?)
}

/// The sliding window as an additive bias (1, 1, tq, tk): query i (at key
/// position q_offset + i) sees keys j with |q_offset + i − j| < w; the
/// causal mask, if any, comes from `score_bias`.
fn band_bias(
    tq: usize,
    tk: usize,
    q_offset: usize,
    w: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let mut m = vec![0f32; tq * tk];
    for i in 0..tq {
        for j in 0..tk {
            if (q_offset + i).abs_diff(j) >= w {
                m[i * tk + j] = -1e9;
            }
        }
    }
    Ok(Tensor::from_vec(m, (1, 1, tq, tk), dev)?.to_dtype(dtype)?)
}

/// Additive bias for the score matrix, broadcastable to (b, h, tq, tk):
/// -inf-like where a key is masked (future positions when `causal`, padding
/// where `key_padding` is 0), plus ALiBi distances when `alibi` is given.
/// `q_offset` is the absolute position of the first query.
#[allow(clippy::too_many_arguments)]
pub fn score_bias(
    tq: usize,
    tk: usize,
    q_offset: usize,
    causal: bool,
    key_padding: Option<&Tensor>,
    alibi: Option<&[f64]>,
    dtype: DType,
    dev: &Device,
) -> Result<Option<Tensor>> {
    const NEG: f32 = -1e9;
    let mut bias: Option<Tensor> = None;
    if causal && q_offset + 1 < tk {
        let mut m = vec![0f32; tq * tk];
        for i in 0..tq {
            for j in (q_offset + i + 1).min(tk)..tk {
                m[i * tk + j] = NEG;
            }
        }
        bias = Some(Tensor::from_vec(m, (1, 1, tq, tk), dev)?.to_dtype(dtype)?);
    }
    if let Some(slopes) = alibi {
        let a = crate::position::alibi_bias(slopes, tq, tk, q_offset, dtype, dev)?;
        bias = Some(match bias {
            Some(b) => b.broadcast_add(&a)?,
            None => a,
        });
    }
    if let Some(pad) = key_padding {
        // pad: (b, tk), 1 = real token, 0 = padding
        let b = pad.dim(0)?;
        let p = ((pad.to_dtype(dtype)? - 1.0)? * (-NEG as f64))?.reshape((b, 1, 1, tk))?;
        bias = Some(match bias {
            Some(x) => x.broadcast_add(&p)?,
            None => p,
        });
    }
    Ok(bias)
}

/// q: (b, h, tq, d), k: (b, h_kv, tk, d), v: (b, h_kv, tk, d_v), bias:
/// broadcastable to (b, h, tq, tk) -> (b, h, tq, d_v)
pub fn softmax_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let (_, h_kv, tk, _) = k.dims4()?;
    let dv = v.dim(3)?;
    let g = h / h_kv;
    let scale = 1.0 / (d as f64).sqrt();
    // Fold the g query heads of each kv group into the row dimension, so k and
    // v are never copied per query head.
    let qg = q.reshape((b, h_kv, g * tq, d))?;
    let scores = (qg.matmul(&k.t()?)? * scale)?.reshape((b, h, tq, tk))?;
    let scores = match bias {
        Some(bias) => scores.broadcast_add(bias)?,
        None => scores,
    };
    let p = crate::nn::softmax_last(&scores)?.reshape((b, h_kv, g * tq, tk))?;
    Ok(p.matmul(v)?.reshape((b, h, tq, dv))?)
}

/// Does query position p see key position j?
fn in_window(p: usize, j: usize, w: usize, causal: bool) -> bool {
    if causal {
        j <= p && p - j < w
    } else {
        p.abs_diff(j) < w
    }
}

/// Blocked sliding-window attention. q: (b, h, tq, d) are the queries at
/// key positions q0..q0 + tq of k, v: (b, h_kv, tk, d); key_padding (b, tk).
/// Queries go in blocks of B = w; block m reads the key blocks starting at
/// q0 + (m - 1)·B: two of them when causal (the previous block and its own),
/// three when bidirectional (and the next). -> (b, h, tq, d)
pub fn banded(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q0: usize,
    w: usize,
    causal: bool,
    key_padding: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let (_, h_kv, tk, dv) = v.dims4()?;
    let g = h / h_kv;
    let bl = w;
    let n = tq.div_ceil(bl);
    let nb = if causal { 2 } else { 3 };
    let span = (n + nb - 1) * bl;
    // key positions q0 - B .. q0 - B + span, zeros outside 0..tk
    let start = q0 as isize - bl as isize;
    let window_of = |x: &Tensor| -> Result<Tensor> {
        let from = start.max(0) as usize;
        let to = ((start + span as isize).max(0) as usize).min(tk);
        let left = (from as isize - start) as usize;
        let avail = to.saturating_sub(from);
        let x = x.narrow(2, from.min(tk), avail)?;
        let x = x.pad_with_zeros(2, left, span - left - avail)?;
        let dx = x.dim(3)?;
        let blocks = x.reshape((b, h_kv, n + nb - 1, bl, dx))?;
        let shifted: Vec<Tensor> = (0..nb)
            .map(|s| blocks.narrow(2, s, n))
            .collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&shifted, 3)?.contiguous()?) // (b, h_kv, n, nb·B, dx)
    };
    let kb = window_of(k)?;
    let vb = window_of(v)?;
    // queries padded to n·B, the g heads of a kv group stacked as rows
    let qb = q
        .pad_with_zeros(2, 0, n * bl - tq)?
        .reshape((b, h_kv, g, n, bl, d))?
        .transpose(2, 3)?
        .reshape((b, h_kv, n, g * bl, d))?;
    let kw = nb * bl;
    let scores = (crate::nn::matmul_nd(&qb, &kb.t()?)? * (1.0 / (d as f64).sqrt()))?
        .reshape((b, h_kv, n, g, bl, kw))?;
    // the band, key range and padding as an additive bias (bb, 1, n, 1, B, nb·B)
    let pad: Option<Vec<Vec<f32>>> = key_padding
        .map(|p| p.to_dtype(DType::F32)?.to_vec2::<f32>())
        .transpose()?;
    let bb = if pad.is_some() { b } else { 1 };
    let mut bias = vec![-1e9f32; bb * n * bl * kw];
    for bi in 0..bb {
        for m in 0..n {
            for r in 0..bl {
                let i = m * bl + r;
                if i >= tq {
                    continue;
                }
                let p = q0 + i;
                for c in 0..kw {
                    let j = start + (m * bl + c) as isize;
                    if j < 0 || j as usize >= tk {
                        continue;
                    }
                    let j = j as usize;
                    let ok = in_window(p, j, w, causal)
                        && pad.as_ref().is_none_or(|pad| pad[bi][j] > 0.5);
                    if ok {
                        bias[((bi * n + m) * bl + r) * kw + c] = 0.0;
                    }
                }
            }
        }
    }
    let bias = Tensor::from_vec(bias, (bb, 1, n, 1, bl, kw), q.device())?.to_dtype(q.dtype())?;
    let p = crate::nn::softmax_last(&scores.broadcast_add(&bias)?)?.reshape((
        b,
        h_kv,
        n,
        g * bl,
        kw,
    ))?;
    let y = crate::nn::matmul_nd(&p, &vb)?
        .reshape((b, h_kv, n, g, bl, dv))?
        .transpose(2, 3)?
        .reshape((b, h, n * bl, dv))?;
    Ok(y.narrow(2, 0, tq)?)
}
