//! LLM.int8() (Dettmers et al., 2022): vector-wise int8 matrix products,
//! with the outlier feature dimensions kept out of int8.
//!
//! For y = X Wᵀ, X (n, k) activations, W (m, k) weights:
//!
//!   O   = { j : max_i |X_ij| > τ }                        (outlier columns)
//!   y  ≈ diag(s_x) · (Q_x Q_wᵀ) · diag(s_w)  +  X[:, O] · W[:, O]ᵀ
//!
//! with Q_x = round(X / s_x) row by row over the columns not in O (s_x =
//! absmax of the row / 127) and Q_w = round(W / s_w), one scale per
//! output (s_w = absmax of W's row / 127; the paper's "columns" of W in
//! its X·W). Without a threshold, O is empty: plain vector-wise int8.
//!
//! The int8 part runs on the Q8_0 kernels (`vpdpbusd` on AVX-512 VNNI): a
//! Q8_0 matrix whose blocks of a row all carry that row's scale, times
//! activation blocks that all carry their row's scale, is exactly the
//! product above. The outlier part multiplies the f32 activations by a
//! 16-bit copy of W (the paper keeps outliers in 16 bits), stored
//! transposed so that an outlier column is one contiguous row.

use super::{matmul_many, Activations, Format, Q8Rows, QMatrix, ShapeError};
use half::f16;
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// A weight matrix in vector-wise int8 (and, for LLM.int8, its 16-bit copy).
pub struct Int8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// The int8 values and per-row scales, as Q8_0 tiles.
    q: QMatrix,
    /// s_w per row, as the tiles hold it (rounded to f16).
    scale: Vec<f32>,
    /// W as 16-bit floats, transposed (cols, rows): LLM.int8's outlier
    /// columns. `None` for plain vector-wise int8.
    wt: Option<Vec<f16>>,
    /// Activation columns whose largest |x| exceeds this go to the 16-bit
    /// path (LLM.int8); `None`: none do.
    pub threshold: Option<f32>,
    products: AtomicU64,
    outlier_cols: AtomicU64,
    with_outliers: AtomicU64,
}

impl std::fmt::Debug for Int8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Int8Matrix({}×{}, threshold {:?})",
            self.rows, self.cols, self.threshold
        )
    }
}

/// How often a matrix met outliers.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct OutlierStats {
    /// Products run.
    pub products: u64,
    /// Outlier columns, summed over the products.
    pub outlier_cols: u64,
    /// Products with at least one outlier column.
    pub with_outliers: u64,
}

impl OutlierStats {
    pub fn add(&mut self, o: OutlierStats) {
        self.products += o.products;
        self.outlier_cols += o.outlier_cols;
        self.with_outliers += o.with_outliers;
    }
}

impl Int8Matrix {
    /// Quantize w (rows, cols) row-major, cols a multiple of 32; with a
    /// threshold, keep the 16-bit copy for outlier columns.
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        threshold: Option<f32>,
    ) -> Result<Self, ShapeError> {
        if w.len() != rows * cols {
            return Err(ShapeError(format!(
                "int8: {} values for a {rows}×{cols} matrix",
                w.len()
            )));
        }
        if cols == 0 || !cols.is_multiple_of(32) {
            return Err(ShapeError(format!(
                "int8: rows of {cols} weights cannot be tiled (a multiple of 32)"
            )));
        }
        if let Some(v) = w.iter().find(|v| !v.is_finite()) {
            return Err(ShapeError(format!("int8: a weight is {v}")));
        }
        // Q8_0 blocks: f16 d, then 32 signed bytes; every block of a row
        // carries the row's scale
        let mut bytes = vec![0u8; rows * cols / 32 * 34];
        let mut scale = vec![0f32; rows];
        bytes
            .par_chunks_mut(cols / 32 * 34)
            .zip(scale.par_iter_mut())
            .zip(w.par_chunks(cols))
            .for_each(|((out, s), row)| {
                let amax = row.iter().fold(0f32, |a, &v| a.max(v.abs()));
                let d = f16::from_f32(amax / 127.0);
                let df = d.to_f32();
                *s = df;
                let inv = if df > 0.0 { 1.0 / df } else { 0.0 };
                for (blk, vals) in out.chunks_exact_mut(34).zip(row.chunks_exact(32)) {
                    blk[..2].copy_from_slice(&d.to_le_bytes());
                    for (o, &v) in blk[2..].iter_mut().zip(vals) {
                        *o = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8 as u8;
                    }
                }
            });
        let q = QMatrix::from_ggml(Format::Q8_0, rows, cols, &bytes)?;
        let wt = threshold.map(|_| {
            let mut t = vec![f16::ZERO; rows * cols];
            for (r, row) in w.chunks_exact(cols).enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    t[c * rows + r] = f16::from_f32(v);
                }
            }
            t
        });
        Ok(Self {
            rows,
            cols,
            q,
            scale,
            wt,
            threshold,
            products: AtomicU64::new(0),
            outlier_cols: AtomicU64::new(0),
            with_outliers: AtomicU64::new(0),
        })
    }

    /// Bytes held: the int8 tiles with their scales, and the 16-bit copy.
    pub fn bytes(&self) -> usize {
        self.q.bytes() + self.wt.as_ref().map_or(0, |t| t.len() * 2)
    }

    /// Bytes of the int8 values and scales alone (what a product reads
    /// when no column is an outlier).
    pub fn int8_bytes(&self) -> usize {
        self.q.bytes()
    }

    /// Row r's scale and int8 values (tests, references).
    pub fn row_q(&self, r: usize) -> (f32, Vec<i8>) {
        let mut v = vec![0f32; self.cols];
        self.q.dequantize_row(r, &mut v);
        let s = self.scale[r];
        let q = v
            .iter()
            .map(|&x| if s > 0.0 { (x / s).round() as i8 } else { 0 })
            .collect();
        (s, q)
    }

    /// Row r as f32 (s_w · Q_w).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        self.q.dequantize_row(r, out)
    }

    /// Outliers met so far; `reset` starts the counts again.
    pub fn stats(&self, reset: bool) -> OutlierStats {
        let get = |a: &AtomicU64| {
            if reset {
                a.swap(0, Ordering::Relaxed)
            } else {
                a.load(Ordering::Relaxed)
            }
        };
        OutlierStats {
            products: get(&self.products),
            outlier_cols: get(&self.outlier_cols),
            with_outliers: get(&self.with_outliers),
        }
    }

    /// x (n, cols) → x Wᵀ (n, rows), as candle tensors (the graph path).
    pub fn matmul(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        super::tensor_product(x, self.rows, self.cols, |xs, n, out| {
            matmul_int8(xs, n, self.cols, &mut [(self, out)])
        })
    }
}

/// The columns of x (n, k) whose largest |x| exceeds τ.
pub fn outlier_columns(x: &[f32], n: usize, k: usize, tau: f32) -> Vec<usize> {
    let mut amax = vec![0f32; k];
    for row in x.chunks_exact(k).take(n) {
        for (a, &v) in amax.iter_mut().zip(row) {
            *a = a.max(v.abs());
        }
    }
    (0..k).filter(|&j| amax[j] > tau).collect()
}

/// x (n, k) quantized row-wise, the `zero` columns left out: every block
/// of row i carries s_x(i) = absmax / 127 of the row's other columns.
pub fn quantize_rows(x: &[f32], n: usize, k: usize, zero: &[usize]) -> Q8Rows {
    assert!(x.len() == n * k && k.is_multiple_of(32));
    let nb = k / 32;
    let mut mask = vec![false; k];
    zero.iter().for_each(|&j| mask[j] = true);
    let mut q = Q8Rows::zeroed(n, k);
    q.qs.par_chunks_mut(k)
        .zip(q.d.par_chunks_mut(nb))
        .zip(q.s.par_chunks_mut(nb))
        .zip(q.sum.par_chunks_mut(nb))
        .zip(x.par_chunks(k))
        .for_each(|((((qs, d), s), sum), row)| {
            let amax = row
                .iter()
                .zip(&mask)
                .filter(|(_, &m)| !m)
                .fold(0f32, |a, (&v, _)| a.max(v.abs()));
            let dx = amax / 127.0;
            let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
            for (j, (o, &v)) in qs.iter_mut().zip(row).enumerate() {
                *o = if mask[j] {
                    0
                } else {
                    (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8
                };
            }
            for b in 0..nb {
                d[b] = dx;
                for h in 0..2 {
                    let p: i32 = qs[b * 32 + h * 16..][..16].iter().map(|&v| v as i32).sum();
                    sum[b][h] = p;
                    s[b][h] = dx * p as f32;
                }
            }
        });
    q
}

/// Several int8 products over the same x (n, k): out (n, W.rows) = x Wᵀ
/// for each job. Jobs with the same threshold share the activations'
/// quantization (q, k and v; gate and up).
pub fn matmul_int8(x: &[f32], n: usize, k: usize, jobs: &mut [(&Int8Matrix, &mut [f32])]) {
    let mut done = vec![false; jobs.len()];
    for i in 0..jobs.len() {
        if done[i] {
            continue;
        }
        let tau = jobs[i].0.threshold;
        let outliers = match tau {
            Some(t) => outlier_columns(x, n, k, t),
            None => vec![],
        };
        let acts = Activations::with_q8(x, n, k, quantize_rows(x, n, k, &outliers));
        let mut group: Vec<(&QMatrix, &mut [f32])> = vec![];
        let mut members = vec![];
        for (j, (w, out)) in jobs.iter_mut().enumerate() {
            if !done[j] && w.threshold == tau {
                done[j] = true;
                assert_eq!(
                    w.cols, k,
                    "int8: input has {k} columns, the weight {}",
                    w.cols
                );
                group.push((&w.q, &mut out[..]));
                members.push(j);
            }
        }
        matmul_many(&acts, &mut group);
        drop(group);
        for j in members {
            let (w, out) = &mut jobs[j];
            w.products.fetch_add(1, Ordering::Relaxed);
            if outliers.is_empty() {
                continue;
            }
            w.outlier_cols
                .fetch_add(outliers.len() as u64, Ordering::Relaxed);
            w.with_outliers.fetch_add(1, Ordering::Relaxed);
            let wt = w.wt.as_ref().expect("a threshold keeps the 16-bit copy");
            let m = w.rows;
            // y[i, :] += x[i, c] · W[:, c] for each outlier column c
            let cols: Vec<Vec<f32>> = outliers
                .iter()
                .map(|&c| wt[c * m..(c + 1) * m].iter().map(|v| v.to_f32()).collect())
                .collect();
            out.par_chunks_mut(m)
                .zip(x.par_chunks(k))
                .for_each(|(y, xr)| {
                    for (&c, col) in outliers.iter().zip(&cols) {
                        let a = xr[c];
                        for (o, &w) in y.iter_mut().zip(col) {
                            *o += a * w;
                        }
                    }
                });
        }
    }
}
