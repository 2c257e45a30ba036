//! Fused CPU kernels behind the same interfaces as the composed tensor ops
//! they replace. candle builds softmax and norms out of 5–9 primitive ops,
//! each allocating a full tensor (and twice as many again in the backward
//! pass); these do one pass over each row, forward and backward.
//!
//! Every kernel is tested against its composed form (values and gradients)
//! in `tests/kernels.rs`.

pub mod attention;
pub mod dense;
pub mod kv;
pub mod quant;
pub mod recurrence;
pub mod rope;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

/// Σ a_i b_i with eight independent accumulators (vectorises), then the
/// tail: the attention inner product of the fused path and the policy caches.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n = a.len() / 8 * 8;
    for (x, y) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Reusable f32 buffers, one pool per thread: the hot paths ask for the
/// same few sizes at every call (a prefill's activations, attention's score
/// blocks), and fresh allocations of them cost page faults every time.
pub mod scratch {
    use std::cell::RefCell;

    thread_local! {
        static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    }

    /// The smallest buffer of capacity ≥ len this thread used before, if
    /// any (best fit: a small request taking a large buffer would send the
    /// next large one to a fresh allocation, and its page faults).
    fn reuse(len: usize) -> Option<Vec<f32>> {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            let (i, _) = p
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= len)
                .min_by_key(|(_, v)| v.capacity())?;
            Some(p.swap_remove(i))
        })
    }

    /// `len` zeros, in a buffer this thread used before when one is large enough.
    pub fn take(len: usize) -> Vec<f32> {
        match reuse(len) {
            Some(mut v) => {
                v.clear();
                v.resize(len, 0.0);
                v
            }
            None => vec![0.0; len],
        }
    }

    /// `len` numbers of unspecified value (what the buffer held before, or
    /// zeros), for a caller that writes every one: no memset.
    pub fn take_dirty(len: usize) -> Vec<f32> {
        match reuse(len) {
            Some(mut v) => {
                v.truncate(len);
                v.resize(len, 0.0);
                v
            }
            None => vec![0.0; len],
        }
    }

    /// Return a buffer for reuse (the pool keeps at most 32).
    pub fn give(v: Vec<f32>) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < 32 {
                p.push(v);
            }
        })
    }
}

/// o += p · v
pub fn axpy(o: &mut [f32], p: f32, v: &[f32]) {
    for (a, &b) in o.iter_mut().zip(v) {
        *a += p * b;
    }
}

/// Rows below this many elements in total run on one thread.
const PAR_MIN: usize = 1 << 15;

fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("fused kernel input must be contiguous"),
    }
}

/// Apply `f(src_row, dst_row)` to every row of the last dimension.
fn map_rows<T: Send + Sync + Copy + Default>(
    src: &[T],
    n: usize,
    f: impl Fn(&[T], &mut [T]) + Sync,
) -> Vec<T> {
    map_rows_at(src, &[], n, |_, s, _, d| f(s, d))
}

/// As `map_rows` with a second input of the same shape.
fn map_rows2<T: Send + Sync + Copy + Default>(
    a: &[T],
    b: &[T],
    n: usize,
    f: impl Fn(&[T], &[T], &mut [T]) + Sync,
) -> Vec<T> {
    map_rows_at(a, b, n, |_, x, y, d| f(x, y, d))
}

/// Apply `f(row_index, a_row, b_row, dst_row)` to every row of the last
/// dimension (b may be empty: then b_row is too); rows in parallel when
/// there are `PAR_MIN` elements or more.
fn map_rows_at<T: Send + Sync + Copy + Default>(
    a: &[T],
    b: &[T],
    n: usize,
    f: impl Fn(usize, &[T], &[T], &mut [T]) + Sync,
) -> Vec<T> {
    let mut dst = vec![T::default(); a.len()];
    let row_b = |i: usize| {
        if b.is_empty() {
            &b[..0]
        } else {
            &b[i * n..(i + 1) * n]
        }
    };
    if a.len() >= PAR_MIN {
        a.par_chunks(n)
            .zip(dst.par_chunks_mut(n))
            .enumerate()
            .for_each(|(i, (x, d))| f(i, x, row_b(i), d));
    } else {
        a.chunks(n)
            .zip(dst.chunks_mut(n))
            .enumerate()
            .for_each(|(i, (x, d))| f(i, x, row_b(i), d));
    }
    dst
}

macro_rules! dispatch1 {
    ($storage:expr, $layout:expr, $body:ident) => {
        match $storage {
            CpuStorage::F32(s) => Ok((
                CpuStorage::F32($body::<f32>(contiguous(s, $layout)?, $layout)?),
                $layout.shape().clone(),
            )),
            CpuStorage::F64(s) => Ok((
                CpuStorage::F64($body::<f64>(contiguous(s, $layout)?, $layout)?),
                $layout.shape().clone(),
            )),
            other => candle_core::bail!("fused kernel: unsupported dtype {:?}", other.dtype()),
        }
    };
}

macro_rules! dispatch2 {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => Ok((
                CpuStorage::F32($body(contiguous(a, $l1)?, contiguous(b, $l2)?, $l1)?),
                $l1.shape().clone(),
            )),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => Ok((
                CpuStorage::F64($body(contiguous(a, $l1)?, contiguous(b, $l2)?, $l1)?),
                $l1.shape().clone(),
            )),
            _ => candle_core::bail!("fused kernel: unsupported or mismatched dtypes"),
        }
    };
}

fn last_dim(l: &Layout) -> usize {
    *l.dims().last().unwrap_or(&1)
}

// ---------------------------------------------------------------- softmax

/// y = softmax(x) over the last dimension.
struct Softmax;

fn softmax_rows<T: Float + Send + Sync + Default>(x: &[T], l: &Layout) -> Result<Vec<T>> {
    Ok(map_rows(x, last_dim(l), |s, d| {
        let max = s.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let mut sum = T::zero();
        for (o, &v) in d.iter_mut().zip(s) {
            *o = (v - max).exp();
            sum = sum + *o;
        }
        let inv = T::one() / sum;
        d.iter_mut().for_each(|o| *o = *o * inv);
    }))
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "attend-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch1!(s, l, softmax_rows)
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd)?))
    }
}

/// dx = y ⊙ (g - Σ g ⊙ y)
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "attend-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn f<T: Float + Send + Sync + Default>(y: &[T], g: &[T], l: &Layout) -> Result<Vec<T>> {
            Ok(map_rows2(y, g, last_dim(l), |y, g, d| {
                let dot = y.iter().zip(g).fold(T::zero(), |a, (&y, &g)| a + y * g);
                for ((o, &y), &g) in d.iter_mut().zip(y).zip(g) {
                    *o = y * (g - dot);
                }
            }))
        }
        dispatch2!(s1, l1, s2, l2, f)
    }
}

/// Softmax over the last dimension. x: (..., n) -> (..., n)
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

// ------------------------------------------------- Taylor kernel weights

/// The in-chunk weights of Taylor linear attention (BASED's feature map):
/// w_ij = 1 + s_ij + s_ij²/2 where key j ≤ query i, else 0, over scores s
/// (..., g·l, l) whose rows are g query heads × l positions (row r is
/// position r mod l). Composed, this is six tensor ops and a mask product
/// forward and as many again backward, each a full (g·l × l) tensor.
struct TaylorCausal {
    l: usize,
}

impl TaylorCausal {
    fn check(&self, layout: &Layout) -> Result<()> {
        let dims = layout.dims();
        let r = dims.len();
        if r < 2 || dims[r - 1] != self.l || !dims[r - 2].is_multiple_of(self.l) {
            candle_core::bail!(
                "taylor weights: scores {dims:?} are not (…, g·{0}, {0})",
                self.l
            )
        }
        Ok(())
    }
}

impl CustomOp1 for TaylorCausal {
    fn name(&self) -> &'static str {
        "attend-taylor-causal"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check(l)?;
        let n = self.l;
        match s {
            CpuStorage::F32(x) => Ok((
                CpuStorage::F32(taylor_fwd(contiguous(x, l)?, n)),
                l.shape().clone(),
            )),
            CpuStorage::F64(x) => Ok((
                CpuStorage::F64(taylor_fwd(contiguous(x, l)?, n)),
                l.shape().clone(),
            )),
            other => candle_core::bail!("fused kernel: unsupported dtype {:?}", other.dtype()),
        }
    }
    fn bwd(&self, s: &Tensor, _w: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = TaylorCausalBwd { l: self.l };
        Ok(Some(
            s.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &op)?,
        ))
    }
}

fn taylor_fwd<T: Float + Send + Sync + Default>(s: &[T], l: usize) -> Vec<T> {
    let half = T::from(0.5).unwrap_or_else(T::zero);
    map_rows_at(s, &[], l, |r, s, _, d| {
        let i = r % l;
        for (o, &x) in d[..=i].iter_mut().zip(&s[..=i]) {
            *o = T::one() + x + half * x * x;
        }
    })
}

/// ds = g ⊙ (1 + s) where j ≤ i, else 0.
struct TaylorCausalBwd {
    l: usize,
}

impl CustomOp2 for TaylorCausalBwd {
    fn name(&self) -> &'static str {
        "attend-taylor-causal-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        TaylorCausal { l: self.l }.check(l1)?;
        let n = self.l;
        match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => Ok((
                CpuStorage::F32(taylor_bwd(contiguous(a, l1)?, contiguous(b, l2)?, n)),
                l1.shape().clone(),
            )),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => Ok((
                CpuStorage::F64(taylor_bwd(contiguous(a, l1)?, contiguous(b, l2)?, n)),
                l1.shape().clone(),
            )),
            _ => candle_core::bail!("fused kernel: unsupported or mismatched dtypes"),
        }
    }
}

fn taylor_bwd<T: Float + Send + Sync + Default>(s: &[T], g: &[T], l: usize) -> Vec<T> {
    map_rows_at(s, g, l, |r, s, g, d| {
        let i = r % l;
        for ((o, &x), &dy) in d[..=i].iter_mut().zip(&s[..=i]).zip(&g[..=i]) {
            *o = dy * (T::one() + x);
        }
    })
}

/// Taylor linear attention's causal in-chunk weights from its scores:
/// s (..., g·l, l) -> w (..., g·l, l), w = (1 + s + s²/2) ⊙ M (M: key
/// j ≤ query r mod l). CPU f32/f64 only (see `usable_cpu`).
pub fn taylor_causal(s: &Tensor) -> Result<Tensor> {
    let l = s.dim(candle_core::D::Minus1)?;
    s.contiguous()?.apply_op1(TaylorCausal { l })
}

/// Whether the fused CPU kernels take this tensor (CPU, f32 or f64).
pub fn usable_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

// ------------------------------------------------------------ log-softmax

struct LogSoftmax;

fn log_softmax_rows<T: Float + Send + Sync + Default>(x: &[T], l: &Layout) -> Result<Vec<T>> {
    Ok(map_rows(x, last_dim(l), |s, d| {
        let max = s.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let sum = s.iter().fold(T::zero(), |a, &v| a + (v - max).exp());
        let lse = max + sum.ln();
        for (o, &v) in d.iter_mut().zip(s) {
            *o = v - lse;
        }
    }))
}

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "attend-log-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch1!(s, l, log_softmax_rows)
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &LogSoftmaxBwd)?))
    }
}

/// dx = g - exp(y) Σ g
struct LogSoftmaxBwd;

impl CustomOp2 for LogSoftmaxBwd {
    fn name(&self) -> &'static str {
        "attend-log-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn f<T: Float + Send + Sync + Default>(y: &[T], g: &[T], l: &Layout) -> Result<Vec<T>> {
            Ok(map_rows2(y, g, last_dim(l), |y, g, d| {
                let sum = g.iter().fold(T::zero(), |a, &g| a + g);
                for ((o, &y), &g) in d.iter_mut().zip(y).zip(g) {
                    *o = g - y.exp() * sum;
                }
            }))
        }
        dispatch2!(s1, l1, s2, l2, f)
    }
}

/// log-softmax over the last dimension. x: (..., n) -> (..., n)
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(LogSoftmax)
}

// ------------------------------------------------------------------ norms

/// Normalisation without the affine part: LayerNorm y = (x - μ) / √(σ² + ε),
/// RMSNorm y = x / √(mean(x²) + ε), over the last dimension.
#[derive(Clone, Copy)]
struct Normalize {
    center: bool,
    eps: f64,
}

impl Normalize {
    /// (mean, 1/std) of one row.
    fn stats<T: Float>(&self, x: &[T]) -> (T, T) {
        let n = T::from(x.len()).unwrap();
        let mean = if self.center {
            lane_sum(x, |v| v) / n
        } else {
            T::zero()
        };
        let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
        (mean, T::one() / (var + T::from(self.eps).unwrap()).sqrt())
    }
}

/// Σ f(x) in 16 independent lanes, so that the loop vectorises (a single
/// running sum is one long dependency chain, one add latency an element).
#[inline(always)]
fn lane_sum<T: Float>(x: &[T], f: impl Fn(T) -> T) -> T {
    let mut lanes = [T::zero(); 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = *l + f(v);
        }
    }
    let rest = chunks.remainder().iter().fold(T::zero(), |a, &v| a + f(v));
    lanes.iter().fold(rest, |a, &l| a + l)
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "attend-normalize"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(x) => Ok((
                CpuStorage::F32(norm_rows(*self, contiguous(x, l)?, l)),
                l.shape().clone(),
            )),
            CpuStorage::F64(x) => Ok((
                CpuStorage::F64(norm_rows(*self, contiguous(x, l)?, l)),
                l.shape().clone(),
            )),
            other => candle_core::bail!("fused kernel: unsupported dtype {:?}", other.dtype()),
        }
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(
            &g.contiguous()?,
            &NormalizeBwd(*self),
        )?))
    }
}

fn norm_rows<T: Float + Send + Sync + Default>(op: Normalize, x: &[T], l: &Layout) -> Vec<T> {
    map_rows(x, last_dim(l), |s, d| {
        let (mean, inv) = op.stats(s);
        for (o, &v) in d.iter_mut().zip(s) {
            *o = (v - mean) * inv;
        }
    })
}

/// dx = inv · (g - mean(g)·[center] - y · mean(g ⊙ y)), y recomputed from x.
struct NormalizeBwd(Normalize);

impl CustomOp2 for NormalizeBwd {
    fn name(&self) -> &'static str {
        "attend-normalize-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.0;
        match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => Ok((
                CpuStorage::F32(norm_bwd_rows(
                    op,
                    contiguous(a, l1)?,
                    contiguous(b, l2)?,
                    l1,
                )),
                l1.shape().clone(),
            )),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => Ok((
                CpuStorage::F64(norm_bwd_rows(
                    op,
                    contiguous(a, l1)?,
                    contiguous(b, l2)?,
                    l1,
                )),
                l1.shape().clone(),
            )),
            _ => candle_core::bail!("fused kernel: unsupported or mismatched dtypes"),
        }
    }
}

fn norm_bwd_rows<T: Float + Send + Sync + Default>(
    op: Normalize,
    x: &[T],
    g: &[T],
    l: &Layout,
) -> Vec<T> {
    map_rows2(x, g, last_dim(l), |x, g, d| {
        let n = T::from(x.len()).unwrap();
        let (mean, inv) = op.stats(x);
        let g_mean = if op.center {
            g.iter().fold(T::zero(), |a, &v| a + v) / n
        } else {
            T::zero()
        };
        let gy_mean = x
            .iter()
            .zip(g)
            .fold(T::zero(), |a, (&x, &g)| a + g * (x - mean) * inv)
            / n;
        for ((o, &x), &g) in d.iter_mut().zip(x).zip(g) {
            let y = (x - mean) * inv;
            *o = inv * (g - g_mean - y * gy_mean);
        }
    })
}

/// (x - mean) / √(var + ε) over the last dimension (LayerNorm without affine).
pub fn layer_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Normalize { center: true, eps })
}

/// x / √(mean(x²) + ε) over the last dimension (RMSNorm without affine).
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Normalize { center: false, eps })
}

// ------------------------------------------- parameters broadcast over rows

/// x ⊕ p with p broadcast over the leading dimensions of x (p's shape is the
/// trailing part of x's): biases, norm gains, position tables. Forward is
/// candle's broadcast op in one pass; the backward sums the gradient over
/// the rows directly. candle's own backward reduces over leading dimensions
/// with a divmod per element, and that reduction was ~40% of a training
/// step on the small presets.
#[derive(Clone, Copy)]
enum RowOp {
    Add,
    Mul,
}

struct BroadcastRows(RowOp);

/// The row width: p's element count, if p's shape is the tail of x's.
fn row_width(x: &Layout, p: &Layout) -> Result<usize> {
    let (xd, pd) = (x.dims(), p.dims());
    if pd.len() > xd.len() || xd[xd.len() - pd.len()..] != *pd {
        candle_core::bail!("broadcast over rows: {:?} is not the tail of {:?}", pd, xd)
    }
    Ok(p.shape().elem_count().max(1))
}

fn rows_apply<T: Float + Send + Sync + Default>(op: RowOp, x: &[T], p: &[T], n: usize) -> Vec<T> {
    map_rows(x, n, |s, d| match op {
        RowOp::Add => d
            .iter_mut()
            .zip(s)
            .zip(p)
            .for_each(|((o, &a), &b)| *o = a + b),
        RowOp::Mul => d
            .iter_mut()
            .zip(s)
            .zip(p)
            .for_each(|((o, &a), &b)| *o = a * b),
    })
}

impl CustomOp2 for BroadcastRows {
    fn name(&self) -> &'static str {
        match self.0 {
            RowOp::Add => "attend-add-rows",
            RowOp::Mul => "attend-mul-rows",
        }
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = row_width(l1, l2)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(p)) => CpuStorage::F32(rows_apply(
                self.0,
                contiguous(x, l1)?,
                contiguous(p, l2)?,
                n,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(p)) => CpuStorage::F64(rows_apply(
                self.0,
                contiguous(x, l1)?,
                contiguous(p, l2)?,
                n,
            )),
            _ => candle_core::bail!("fused kernel: unsupported or mismatched dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let sum = |t: &Tensor| t.apply_op1_no_bwd(&SumRows(p.shape().clone()));
        Ok(match self.0 {
            RowOp::Add => (Some(g.clone()), Some(sum(&g)?)),
            RowOp::Mul => (
                Some(g.apply_op2_no_bwd(&p.contiguous()?, &BroadcastRows(RowOp::Mul))?),
                Some(sum(&(&g * x)?)?),
            ),
        })
    }
}

/// Σ over rows: x (..., shape) -> shape.
struct SumRows(Shape);

fn sum_rows<T: Float>(x: &[T], n: usize) -> Vec<T> {
    let mut acc = vec![T::zero(); n];
    for row in x.chunks_exact(n) {
        acc.iter_mut().zip(row).for_each(|(a, &v)| *a = *a + v);
    }
    acc
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "attend-sum-rows"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.0.elem_count().max(1);
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(sum_rows(contiguous(x, l)?, n)),
            CpuStorage::F64(x) => CpuStorage::F64(sum_rows(contiguous(x, l)?, n)),
            other => candle_core::bail!("fused kernel: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, self.0.clone()))
    }
}

fn broadcast_rows(x: &Tensor, p: &Tensor, op: RowOp) -> Result<Tensor> {
    let cpu_float = x.device().is_cpu()
        && x.dtype() == p.dtype()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64);
    if !cpu_float {
        return match op {
            RowOp::Add => x.broadcast_add(p),
            RowOp::Mul => x.broadcast_mul(p),
        };
    }
    x.contiguous()?
        .apply_op2(&p.contiguous()?, BroadcastRows(op))
}

/// x + p, p's shape the tail of x's (a bias, a position table):
/// x (..., *p.shape) -> same.
pub fn add_rows(x: &Tensor, p: &Tensor) -> Result<Tensor> {
    broadcast_rows(x, p, RowOp::Add)
}

/// x ⊙ p, p's shape the tail of x's (a norm gain): x (..., *p.shape) -> same.
pub fn mul_rows(x: &Tensor, p: &Tensor) -> Result<Tensor> {
    broadcast_rows(x, p, RowOp::Mul)
}
