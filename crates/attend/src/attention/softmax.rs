//! Exact softmax attention, softmax(q kᵀ / √d + bias) v (Vaswani et al. 2017),
//! with grouped-query heads (Ainslie et al. 2023): query head h reads key/value
//! head h / (n_heads / n_kv_heads).
//!
//! * `naive`   — the textbook formula in plain loops (reference for tests);
//! * `forward` — batched tensor form, used for whole sequences and for decode
//!   steps alike (a decode step is a forward over the KV cache);
//! * `KvCache` — the decode state; `state_bytes` is its real buffer size.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};

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
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
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

/// The quadratic textbook form, one score at a time, in f64.
#[allow(clippy::needless_range_loop)] // indices mirror the formula
/// q: [b][h][tq][d], k: [b][h_kv][tk][d], v: [b][h_kv][tk][d_v]; `allowed(b, i, j)` says whether
/// query i may see key j; `bias(h, i, j)` is added to the score.
pub fn naive(
    q: &[Vec<Vec<Vec<f64>>>],
    k: &[Vec<Vec<Vec<f64>>>],
    v: &[Vec<Vec<Vec<f64>>>],
    allowed: &dyn Fn(usize, usize, usize) -> bool,
    bias: &dyn Fn(usize, usize, usize) -> f64,
) -> Vec<Vec<Vec<Vec<f64>>>> {
    let (h, h_kv) = (q[0].len(), k[0].len());
    let d = q[0][0][0].len();
    let mut out = vec![];
    for bi in 0..q.len() {
        let mut heads = vec![];
        for hi in 0..h {
            let kv = hi / (h / h_kv);
            let mut rows = vec![];
            for (i, qi) in q[bi][hi].iter().enumerate() {
                let scores: Vec<Option<f64>> = k[bi][kv]
                    .iter()
                    .enumerate()
                    .map(|(j, kj)| {
                        allowed(bi, i, j).then(|| {
                            qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                                + bias(hi, i, j)
                        })
                    })
                    .collect();
                let max = scores
                    .iter()
                    .flatten()
                    .cloned()
                    .fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores
                    .iter()
                    .map(|s| s.map_or(0.0, |s| (s - max).exp()))
                    .collect();
                let z: f64 = w.iter().sum();
                let dv = v[bi][kv][0].len();
                let mut o = vec![0.0; dv];
                for (j, wj) in w.iter().enumerate() {
                    for c in 0..dv {
                        o[c] += wj / z * v[bi][kv][j][c];
                    }
                }
                rows.push(o);
            }
            heads.push(rows);
        }
        out.push(heads);
    }
    out
}

/// The decode state of softmax attention: every past key and value, in
/// buffers with room to grow (capacity doubles when full), written in place
/// with `slice_set`; a step copies only its own keys and values, not the
/// whole cache. `Clone` copies the held part, so clones never share the
/// buffers they write into.
#[derive(Debug, Default)]
pub struct KvCache {
    k: Option<Tensor>, // (b, h_kv, capacity, d)
    v: Option<Tensor>, // (b, h_kv, capacity, d_v)
    len: usize,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        let held = |t: &Option<Tensor>| {
            t.as_ref()
                .map(|t| t.narrow(2, 0, self.len).and_then(|t| t.copy()))
                .transpose()
                .expect("narrowing a cache to its length")
        };
        Self {
            k: held(&self.k),
            v: held(&self.v),
            len: self.len,
        }
    }
}

/// `x` (b, h, t, d) written at position `at` of `buf` (b, h, cap, d), into a
/// buffer twice as large (or just large enough) when it does not fit.
fn write_at(buf: Option<Tensor>, x: &Tensor, at: usize) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let buf = match buf {
        Some(buf) if buf.dim(2)? >= at + t => buf,
        old => {
            let cap = old.as_ref().map_or(0, |o| o.dim(2).unwrap_or(0));
            let grown = Tensor::zeros((b, h, (2 * cap).max(at + t), d), x.dtype(), x.device())?;
            if let Some(old) = old {
                grown.slice_set(&old.narrow(2, 0, at)?.contiguous()?, 2, 0)?;
            }
            grown
        }
    };
    buf.slice_set(&x.contiguous()?, 2, at)?;
    Ok(buf)
}

impl KvCache {
    /// Append k/v (b, h_kv, t_new, d); returns the whole cache (views of
    /// its buffers, (b, h_kv, t, d)).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t_new = k.dim(2)?;
        self.k = Some(write_at(self.k.take(), k, self.len)?);
        self.v = Some(write_at(self.v.take(), v, self.len)?);
        self.len += t_new;
        Ok((self.keys().unwrap(), self.values().unwrap()))
    }

    /// Keys held: (b, h_kv, t, d).
    pub fn keys(&self) -> Option<Tensor> {
        self.k.as_ref().and_then(|k| k.narrow(2, 0, self.len).ok())
    }

    /// Values held: (b, h_kv, t, d_v).
    pub fn values(&self) -> Option<Tensor> {
        self.v.as_ref().and_then(|v| v.narrow(2, 0, self.len).ok())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the keys and values held (the mechanism's state; the
    /// buffers' spare capacity, under 2×, is not counted).
    pub fn state_bytes(&self) -> usize {
        [&self.k, &self.v]
            .iter()
            .filter_map(|t| t.as_ref())
            .map(|t| {
                let per_position = t.elem_count() / t.dim(2).unwrap_or(1).max(1);
                per_position * self.len * t.dtype().size_in_bytes()
            })
            .sum()
    }

    /// Keep the sequences at `idx` (beam search reordering).
    pub fn select(&mut self, idx: &Tensor) -> Result<()> {
        if let Some(k) = &self.k {
            self.k = Some(k.index_select(idx, 0)?);
        }
        if let Some(v) = &self.v {
            self.v = Some(v.index_select(idx, 0)?);
        }
        Ok(())
    }
}
