//! The CPU executor: the model's ops on plain f32 buffers, for inference.
//!
//! Sequences are packed end to end into one (tokens, width) buffer — no
//! padding, so linear layers do no wasted work and attention runs per
//! sequence without a mask (as ByteTransformer does). A quantized weight is
//! multiplied on attend's kernels (`kernels::quant`: the activations are
//! quantized once per group of maps, e.g. q/k/v), a dense f32 one on gemm;
//! softmax attention reads and grows the KV cache in place
//! (`cache::kv`). Buffers come from a per-thread pool and go back to it
//! when an activation is dropped, so a decode step allocates nothing.
//!
//! Softmax attention, with or without a sliding window, runs on buffers;
//! ops without a buffer form here (the linear-attention family, BASED,
//! ALiBi scores, cross-attention) run in their graph form (`Exec::graph`).
//! Dropout is a training op: this executor is for inference and leaves
//! activations as they are.

use super::graph::{Graph, GraphBatch};
use super::{caches_for, Act, AttnOp, Ctx, Exec, GraphOp};
use crate::cache::kv::KvCache;
use crate::config::NormKind;
use crate::error::{Error, Result};
use crate::kernels::attention::{attend_f32, Mask, Seq, Strided};
use crate::kernels::dense::{gelu, matmul_t, norm_rows};
use crate::kernels::quant::{matmul_many, Activations};
use crate::kernels::scratch;
use crate::nn::{Dropout, Embedding, Linear, Weight};
use crate::norm::Norm;
use crate::position::Additive;
use candle_core::{DType, Device, Tensor};

/// One sequence of a packed batch: `len` tokens at positions pos0...
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    pub pos0: usize,
    pub len: usize,
}

/// The tokens of several sequences, one after another.
#[derive(Clone, Debug)]
pub struct Packed {
    pub ids: Vec<u32>,
    pub seqs: Vec<Span>,
}

impl Packed {
    /// Sequences of ids, each starting at position 0.
    pub fn new(seqs: &[&[u32]]) -> Self {
        Self {
            ids: seqs.concat(),
            seqs: seqs
                .iter()
                .map(|s| Span {
                    pos0: 0,
                    len: s.len(),
                })
                .collect(),
        }
    }

    /// b sequences of t tokens (row-major ids), all starting at pos0.
    pub fn rect(ids: Vec<u32>, b: usize, pos0: usize) -> Self {
        let len = ids.len() / b.max(1);
        Self {
            ids,
            seqs: vec![Span { pos0, len }; b],
        }
    }

    /// Same length and start for every sequence (a (b, t) batch).
    fn rectangular(&self) -> Option<Span> {
        let first = *self.seqs.first()?;
        self.seqs.iter().all(|s| *s == first).then_some(first)
    }

    /// (first row, span) of each sequence.
    pub(crate) fn rows(&self) -> impl Iterator<Item = (usize, Span)> + '_ {
        self.seqs.iter().scan(0, |at, &s| {
            let r = (*at, s);
            *at += s.len;
            Some(r)
        })
    }
}

/// Activations: one row of `width` numbers per token, in a pooled buffer.
#[derive(Debug)]
pub struct Rows {
    pub data: Vec<f32>,
    pub width: usize,
}

impl Rows {
    /// n rows of zeros.
    pub fn zeros(n: usize, width: usize) -> Self {
        Self {
            data: scratch::take(n * width),
            width,
        }
    }

    pub fn n(&self) -> usize {
        self.data.len() / self.width.max(1)
    }

    /// As a (b, t, width) tensor of b equal sequences.
    pub fn to_tensor(&self, b: usize) -> Result<Tensor> {
        let t = self.n() / b.max(1);
        Ok(Tensor::from_slice(
            &self.data,
            (b, t, self.width),
            &Device::Cpu,
        )?)
    }

    fn from_tensor(x: &Tensor) -> Result<Self> {
        let w = *x.dims().last().unwrap_or(&1);
        let x = x.to_dtype(DType::F32)?.flatten_all()?;
        let mut r = Self::zeros(x.elem_count() / w.max(1), w);
        r.data.copy_from_slice(&x.to_vec1::<f32>()?);
        Ok(r)
    }
}

impl Clone for Rows {
    fn clone(&self) -> Self {
        let mut r = Self::zeros(self.n(), self.width);
        r.data.copy_from_slice(&self.data);
        r
    }
}

impl Drop for Rows {
    fn drop(&mut self) {
        scratch::give(std::mem::take(&mut self.data));
    }
}

pub use crate::nn::with_f32;

/// Runs the ops on plain buffers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Cpu {
    /// An op in its graph form on a rectangular batch: tensors in, tensors out.
    fn via_graph<R>(
        &self,
        b: &Packed,
        f: impl FnOnce(GraphBatch, usize) -> Result<R>,
    ) -> Result<R> {
        let s = b.rectangular().ok_or_else(|| {
            Error::msg("this op runs in graph form, which needs sequences of equal length")
        })?;
        let n = b.seqs.len();
        let gb = GraphBatch {
            ids: Tensor::zeros((n, s.len), DType::U32, &Device::Cpu)?,
            offset: s.pos0,
            padding: None,
        };
        f(gb, n)
    }
}

impl Exec for Cpu {
    type X = Rows;
    type Batch = Packed;

    fn end(&self, b: &Packed) -> usize {
        b.seqs.iter().map(|s| s.pos0 + s.len).max().unwrap_or(0)
    }

    fn embed(&self, e: &Embedding, b: &Packed) -> Result<Rows> {
        let mut x = Rows::zeros(b.ids.len(), e.dims()?.1);
        e.rows_into(&b.ids, &mut x.data)?;
        Ok(x)
    }

    fn scale(&self, mut x: Rows, s: f64) -> Result<Rows> {
        let s = s as f32;
        x.data.iter_mut().for_each(|v| *v *= s);
        Ok(x)
    }

    fn add_positions(&self, p: &Additive, mut x: Rows, b: &Packed) -> Result<Rows> {
        let Additive::Table(table) = p else {
            return Ok(x);
        };
        let (max_len, d) = table.dims2()?;
        let end = self.end(b);
        if end > max_len {
            return Err(Error::msg(format!(
                "sequence of {end} positions exceeds the model's max_len {max_len}"
            )));
        }
        with_f32(table, |tab| {
            for (r0, s) in b.rows() {
                for i in 0..s.len {
                    let row = &mut x.data[(r0 + i) * d..][..d];
                    for (a, &p) in row.iter_mut().zip(&tab[(s.pos0 + i) * d..][..d]) {
                        *a += p;
                    }
                }
            }
        })?;
        Ok(x)
    }

    fn norm(&self, n: &Norm, x: Rows) -> Result<Rows> {
        let mut y = x;
        let center = n.kind() == NormKind::Layernorm;
        let eps = n.eps() as f32;
        with_f32(n.weight(), |g| match n.bias() {
            Some(bias) => with_f32(bias, |b| norm_rows(&mut y.data, g, Some(b), eps, center)),
            None => {
                norm_rows(&mut y.data, g, None, eps, center);
                Ok(())
            }
        })??;
        Ok(y)
    }

    fn norm_heads(&self, n: &Norm, x: Rows) -> Result<Rows> {
        // norm_rows walks the data in rows of the norm's width: the heads
        self.norm(n, x)
    }

    fn dropout(&self, _: &Dropout, x: Rows) -> Result<Rows> {
        Ok(x)
    }

    fn add(&self, mut x: Rows, y: &Rows) -> Result<Rows> {
        for (a, &b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
        Ok(x)
    }

    fn linear(&self, x: &Rows, maps: &[&Linear]) -> Result<Vec<Rows>> {
        let (t, k) = (x.n(), x.width);
        let mut outs = maps
            .iter()
            .map(|l| {
                let n = l.w.dims()?.0;
                Ok(Rows::zeros(t, n))
            })
            .collect::<Result<Vec<_>>>()?;
        // quantized weights: one pass, the activations quantized once
        let acts = Activations::new(&x.data, t, k);
        let mut jobs: Vec<_> = maps
            .iter()
            .zip(outs.iter_mut())
            .filter_map(|(l, o)| match &l.w {
                Weight::Q(m) => Some((&**m, &mut o.data[..])),
                _ => None,
            })
            .collect();
        if !jobs.is_empty() {
            matmul_many(&acts, &mut jobs);
        }
        drop(jobs);
        // int8 weights (LLM.int8): their own row-wise activation quantization
        let mut int8: Vec<_> = maps
            .iter()
            .zip(outs.iter_mut())
            .filter_map(|(l, o)| match &l.w {
                Weight::Int8(m) => Some((&**m, &mut o.data[..])),
                _ => None,
            })
            .collect();
        if !int8.is_empty() {
            crate::kernels::quant::int8::matmul_int8(&x.data, t, k, &mut int8);
        }
        drop(int8);
        for (l, o) in maps.iter().zip(outs.iter_mut()) {
            let n = o.width;
            match (&l.w, &l.b) {
                (Weight::Dense(w), b) => with_f32(w, |w| match b {
                    Some(b) => {
                        with_f32(b, |b| matmul_t(&x.data, w, Some(b), (t, n, k), &mut o.data))
                    }
                    None => {
                        matmul_t(&x.data, w, None, (t, n, k), &mut o.data);
                        Ok(())
                    }
                })??,
                (Weight::Q(_) | Weight::Int8(_), Some(b)) => with_f32(b, |b| {
                    for row in o.data.chunks_exact_mut(n) {
                        for (a, &c) in row.iter_mut().zip(b) {
                            *a += c;
                        }
                    }
                })?,
                (Weight::Q(_) | Weight::Int8(_), None) => {}
                (Weight::LowRank { down, up }, b) => {
                    // y = (x downᵀ) upᵀ
                    let r = down.dim(0)?;
                    let mut mid = vec![0f32; t * r];
                    with_f32(down, |w| matmul_t(&x.data, w, None, (t, r, k), &mut mid))?;
                    let bias = b
                        .as_ref()
                        .map(|b| with_f32(b, |b| b.to_vec()))
                        .transpose()?;
                    with_f32(up, |w| {
                        matmul_t(&mid, w, bias.as_deref(), (t, n, r), &mut o.data)
                    })?;
                }
                (Weight::BlockDiag(w), b) => {
                    // block j: y[:, j·bo..] = x[:, j·bi..] W_jᵀ
                    let (nb, bo, bi) = w.dims3()?;
                    let (mut xs, mut ys) = (vec![0f32; t * bi], vec![0f32; t * bo]);
                    with_f32(w, |w| {
                        for j in 0..nb {
                            for (dst, src) in xs.chunks_exact_mut(bi).zip(x.data.chunks_exact(k)) {
                                dst.copy_from_slice(&src[j * bi..][..bi]);
                            }
                            matmul_t(
                                &xs,
                                &w[j * bo * bi..][..bo * bi],
                                None,
                                (t, bo, bi),
                                &mut ys,
                            );
                            for (dst, src) in o.data.chunks_exact_mut(n).zip(ys.chunks_exact(bo)) {
                                dst[j * bo..][..bo].copy_from_slice(src);
                            }
                        }
                    })?;
                    if let Some(b) = b {
                        with_f32(b, |b| {
                            for row in o.data.chunks_exact_mut(n) {
                                row.iter_mut().zip(b).for_each(|(a, c)| *a += c);
                            }
                        })?;
                    }
                }
            }
        }
        Ok(outs)
    }

    fn act(&self, f: Act, mut h: Rows, up: Option<&Rows>) -> Result<Rows> {
        // one loop per function (so each vectorises), over blocks of rows
        // split across the pool when there are many
        let apply = |x: &mut [f32], u: Option<&[f32]>| {
            match f {
                Act::Relu => x.iter_mut().for_each(|v| *v = v.max(0.0)),
                Act::Gelu => x.iter_mut().for_each(gelu),
                Act::GeluTanh => x.iter_mut().for_each(crate::kernels::dense::gelu_tanh),
                Act::Silu => x
                    .iter_mut()
                    .for_each(|v| *v /= 1.0 + crate::kernels::dense::exp(-*v)),
            }
            if let Some(u) = u {
                for (a, &b) in x.iter_mut().zip(u) {
                    *a *= b;
                }
            }
        };
        const BLOCK: usize = 1 << 14;
        if h.data.len() <= BLOCK {
            apply(&mut h.data, up.map(|u| &u.data[..]));
            return Ok(h);
        }
        use rayon::prelude::*;
        match up {
            Some(u) => h
                .data
                .par_chunks_mut(BLOCK)
                .zip(u.data.par_chunks(BLOCK))
                .for_each(|(x, u)| apply(x, Some(u))),
            None => h.data.par_chunks_mut(BLOCK).for_each(|x| apply(x, None)),
        }
        Ok(h)
    }

    fn attend(
        &self,
        op: &AttnOp,
        mut q: Rows,
        mut k: Rows,
        v: Rows,
        b: &Packed,
        caches: Option<&mut Vec<KvCache>>,
    ) -> Result<Rows> {
        let (h, h_kv, hd) = (op.heads, op.kv_heads, op.head_dim);
        if op.alibi.is_some() && caches.is_none() {
            // no buffer form of ALiBi's scores: the graph form, per op (and
            // per sequence: packed sequences differ in length)
            let mut out = Rows::zeros(q.n(), h * hd);
            for (r0, s) in b.rows() {
                let part = |x: &Rows| {
                    Tensor::from_slice(
                        &x.data[r0 * x.width..(r0 + s.len) * x.width],
                        (1, s.len, x.width),
                        &Device::Cpu,
                    )
                };
                let gb = GraphBatch {
                    ids: Tensor::zeros((1, s.len), DType::U32, &Device::Cpu)?,
                    offset: s.pos0,
                    padding: None,
                };
                let y = Graph.attend(op, part(&q)?, part(&k)?, part(&v)?, &gb, None)?;
                let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
                out.data[r0 * h * hd..][..y.len()].copy_from_slice(&y);
            }
            return Ok(out);
        }
        if op.alibi.is_some() {
            // with decode states the batch is rectangular
            return self.via_graph(b, |gb, n| {
                let y = Graph.attend(
                    op,
                    q.to_tensor(n)?,
                    k.to_tensor(n)?,
                    v.to_tensor(n)?,
                    &gb,
                    caches,
                )?;
                Rows::from_tensor(&y)
            });
        }
        let mut out = Rows::zeros(q.n(), h * hd);
        let (qd, kvd) = (h * hd, h_kv * hd);
        match caches {
            Some(caches) => {
                caches_for(caches, b.seqs.len())?;
                // each sequence's rows of q, k, v and out, with its cache
                let (mut qr, mut kr, mut vr, mut or) = (
                    &mut q.data[..],
                    &mut k.data[..],
                    &v.data[..],
                    &mut out.data[..],
                );
                let mut jobs = Vec::with_capacity(caches.len());
                for ((_, s), c) in b.rows().zip(caches.iter_mut()) {
                    if c.seen != s.pos0 {
                        return Err(Error::msg(format!(
                            "the KV cache holds {} tokens, the batch continues at position {}",
                            c.seen, s.pos0
                        )));
                    }
                    let (qa, qb) = std::mem::take(&mut qr).split_at_mut(s.len * qd);
                    let (ka, kb) = std::mem::take(&mut kr).split_at_mut(s.len * kvd);
                    let (va, vb) = vr.split_at(s.len * kvd);
                    let (oa, ob) = std::mem::take(&mut or).split_at_mut(s.len * qd);
                    (qr, kr, vr, or) = (qb, kb, vb, ob);
                    jobs.push((c, qa, ka, va, oa));
                }
                let rope = op.rope.map(|r| &*r.tables);
                let run = |(c, q, k, v, o): (
                    &mut KvCache,
                    &mut [f32],
                    &mut [f32],
                    &[f32],
                    &mut [f32],
                )| { c.attend(q, k, v, rope, h, o) };
                // several sequences (a server's decode step): one parallel
                // region over them, not one (tiny) region per sequence;
                // each sequence's arithmetic is the same either way
                if jobs.len() > 1 {
                    use rayon::prelude::*;
                    jobs.into_par_iter().map(run).collect::<Result<Vec<()>>>()?;
                } else {
                    jobs.into_iter().try_for_each(run)?;
                }
            }
            None => {
                // each sequence over its own keys, RoPE at its positions
                let mut seqs = Vec::with_capacity(b.seqs.len());
                for (r0, s) in b.rows() {
                    if let Some(rope) = op.rope {
                        let r = &rope.tables;
                        if s.pos0 + s.len > r.max_len {
                            return Err(Error::msg(format!(
                                "sequence of {} positions exceeds the model's max_len {}",
                                s.pos0 + s.len,
                                r.max_len
                            )));
                        }
                        for (x, w) in [(&mut q, qd), (&mut k, kvd)] {
                            for i in 0..s.len {
                                for head in x.data[(r0 + i) * w..][..w].chunks_exact_mut(hd) {
                                    r.rotate(head, s.pos0 + i);
                                }
                            }
                        }
                    }
                    seqs.push(Seq {
                        q0: r0,
                        t: s.len,
                        k0: r0,
                        pos0: 0,
                    });
                }
                let st = |data| Strided {
                    data,
                    head: hd,
                    row: kvd,
                };
                attend_f32(
                    &q.data,
                    st(&k.data),
                    st(&v.data),
                    (h, h_kv, hd),
                    &seqs,
                    Mask {
                        causal: op.causal,
                        window: op.window,
                    },
                    &mut out.data,
                );
            }
        }
        Ok(out)
    }

    fn graph(&self, x: &Rows, b: &Packed, f: &mut GraphOp) -> Result<Rows> {
        if let Some(s) = b.rectangular() {
            let ctx = Ctx {
                offset: s.pos0,
                padding: None,
            };
            return Rows::from_tensor(&f(&x.to_tensor(b.seqs.len())?, ctx)?);
        }
        // sequences of different lengths: one at a time
        let mut parts = vec![];
        for (r0, s) in b.rows() {
            let xs = Tensor::from_slice(
                &x.data[r0 * x.width..(r0 + s.len) * x.width],
                (1, s.len, x.width),
                &Device::Cpu,
            )?;
            let ctx = Ctx {
                offset: s.pos0,
                padding: None,
            };
            parts.push(f(&xs, ctx)?.squeeze(0)?);
        }
        Rows::from_tensor(&Tensor::cat(&parts, 0)?)
    }

    fn last(&self, x: Rows, b: &Packed) -> Result<Rows> {
        let w = x.width;
        let mut y = Rows::zeros(b.seqs.len(), w);
        for (i, (r0, s)) in b.rows().enumerate() {
            let last = r0 + s.len - 1;
            y.data[i * w..][..w].copy_from_slice(&x.data[last * w..][..w]);
        }
        Ok(y)
    }

    fn positions(&self, b: &Packed) -> Vec<usize> {
        b.seqs.iter().flat_map(|s| s.pos0..s.pos0 + s.len).collect()
    }

    fn cos_rows(&self, a: &Rows, b: &Rows) -> Result<Vec<f32>> {
        let w = a.width;
        Ok(a.data
            .chunks_exact(w)
            .zip(b.data.chunks_exact(w))
            .map(|(a, b)| super::cos(a, b))
            .collect())
    }

    fn keep_rows(&self, mut y: Rows, x: &Rows, keep: &[bool]) -> Result<Rows> {
        let w = y.width;
        for ((yr, xr), &k) in y
            .data
            .chunks_exact_mut(w)
            .zip(x.data.chunks_exact(w))
            .zip(keep)
        {
            if k {
                yr.copy_from_slice(xr);
            }
        }
        Ok(y)
    }
}
