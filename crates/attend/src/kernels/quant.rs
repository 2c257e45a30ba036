//! Quantized-weight × Q8-activation matrix multiplication for CPU (Q4_1 and
//! Q8_0 GGUF weights), AVX2 + FMA with a portable fallback. candle runs Q4_1
//! through a scalar `vec_dot_unopt` (69% of SmolLM2's decode time here); this
//! kernel does what llama.cpp does: quantize each activation row once to 8
//! bits per block of 32, then multiply-add bytes (maddubs) and scale per block.
//!
//! A Q4_1 block holds 32 weights as w_i = d·q_i + m with q_i ∈ [0, 15]
//! (GGUF layout: f16 d, f16 m, 16 bytes, low nibbles = elements 0..16, high
//! nibbles = 16..32); a Q8_0 block as w_i = d·q_i with q_i ∈ [-127, 127]
//! (f16 d, 32 signed bytes). At load the blocks are repacked into separate
//! arrays of f32 scales (and minimums) and quant bytes. For an activation
//! block x_i ≈ dx·p_i (p_i ∈ [-127, 127]):
//!   Q4_1: Σ w_i x_i ≈ d·dx·Σ q_i p_i + m·dx·Σ p_i;   Q8_0: d·dx·Σ q_i p_i.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

const QK: usize = 32;

/// A (rows, cols) quantized matrix, repacked for the kernel.
#[derive(Debug)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    /// Per-block scales.
    d: Vec<f32>,
    blocks: Blocks,
}

#[derive(Debug)]
enum Blocks {
    /// Minimums and nibbles.
    Q41 {
        m: Vec<f32>,
        qs: Vec<[u8; 16]>,
    },
    Q80 {
        qs: Vec<[i8; 32]>,
    },
}

fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

impl QMatrix {
    /// Repack a 2-D Q4_1 or Q8_0 `QTensor` (None for any other type).
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let dims = q.shape().dims();
        let block_bytes = match q.dtype() {
            GgmlDType::Q4_1 => 20,
            GgmlDType::Q8_0 => 34,
            _ => return Ok(None),
        };
        if dims.len() != 2 || !dims[1].is_multiple_of(QK) {
            return Ok(None);
        }
        let (rows, cols) = (dims[0], dims[1]);
        let bytes = q.data()?;
        let n = rows * cols / QK;
        if bytes.len() != n * block_bytes {
            candle_core::bail!(
                "{:?} tensor holds {} bytes, expected {}",
                q.dtype(),
                bytes.len(),
                n * block_bytes
            );
        }
        let mut d = Vec::with_capacity(n);
        let blocks = if block_bytes == 20 {
            let (mut m, mut qs) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for b in bytes.chunks_exact(20) {
                d.push(f16_to_f32(u16::from_le_bytes([b[0], b[1]])));
                m.push(f16_to_f32(u16::from_le_bytes([b[2], b[3]])));
                qs.push(b[4..20].try_into().unwrap());
            }
            Blocks::Q41 { m, qs }
        } else {
            let mut qs = Vec::with_capacity(n);
            for b in bytes.chunks_exact(34) {
                d.push(f16_to_f32(u16::from_le_bytes([b[0], b[1]])));
                let mut q = [0i8; 32];
                for (o, &v) in q.iter_mut().zip(&b[2..34]) {
                    *o = v as i8;
                }
                qs.push(q);
            }
            Blocks::Q80 { qs }
        };
        Ok(Some(Self {
            rows,
            cols,
            d,
            blocks,
        }))
    }

    /// The weights as f32 (rows, cols), for tests.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in 0..self.d.len() {
            let mut block = [0f32; QK];
            match &self.blocks {
                Blocks::Q41 { m, qs } => {
                    for (i, &byte) in qs[b].iter().enumerate() {
                        block[i] = self.d[b] * (byte & 0x0F) as f32 + m[b];
                        block[i + 16] = self.d[b] * (byte >> 4) as f32 + m[b];
                    }
                }
                Blocks::Q80 { qs } => {
                    for (o, &q) in block.iter_mut().zip(&qs[b]) {
                        *o = self.d[b] * q as f32;
                    }
                }
            }
            out.extend_from_slice(&block);
        }
        out
    }

    /// Row r's blocks.
    fn row(&self, r: usize) -> Row<'_> {
        let nb = self.cols / QK;
        let d = &self.d[r * nb..][..nb];
        match &self.blocks {
            Blocks::Q41 { m, qs } => Row::Q41 {
                d,
                m: &m[r * nb..][..nb],
                qs: &qs[r * nb..][..nb],
            },
            Blocks::Q80 { qs } => Row::Q80 {
                d,
                qs: &qs[r * nb..][..nb],
            },
        }
    }

    /// x (n, cols) f32 → x Wᵀ (n, rows).
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (n, k) = x.dims2()?;
        if k != self.cols {
            candle_core::bail!(
                "quantized matmul: input has {k} columns, the weight {}",
                self.cols
            );
        }
        let xs: Vec<f32> = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let xq = Q8Rows::quantize(&xs, n, k);
        let mut out = vec![0f32; n * self.rows];
        matmul_many(&xq, &mut [(self, &mut out)]);
        Tensor::from_vec(out, (n, self.rows), &Device::Cpu)
    }
}

/// Activation rows quantized once to 8 bits per block of 32, shared by every
/// matrix that reads them (q, k and v read the same normalised input).
pub struct Q8Rows {
    n: usize,
    /// Blocks per row.
    nb: usize,
    blocks: Vec<Q8Block>,
}

impl Q8Rows {
    /// xs (n, k) row-major, k a multiple of 32.
    pub fn quantize(xs: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(xs.len(), n * k, "Q8Rows::quantize: {} != {n}·{k}", xs.len());
        Self {
            n,
            nb: k / QK,
            blocks: quantize_rows(xs, n, k),
        }
    }

    fn row(&self, j: usize) -> &[Q8Block] {
        &self.blocks[j * self.nb..][..self.nb]
    }
}

/// A pointer that parallel tasks write through at disjoint indices.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// Safety: every task writes a disjoint set of indices (its own weight rows).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// Activation rows per tile: a tile's blocks stay in L2 while every weight
/// row of a task passes over them.
const ROW_TILE: usize = 64;

/// Several products over the same activations in one parallel region:
/// for each job (W, out), out (n, W.rows) = x Wᵀ with x (n, W.cols).
/// One region instead of one per matrix: a decode step makes ~150 of these.
pub fn matmul_many(x: &Q8Rows, jobs: &mut [(&QMatrix, &mut [f32])]) {
    let n = x.n;
    let total: usize = jobs.iter().map(|(w, _)| w.rows).sum();
    // Few, large tasks (rayon's per-task cost shows at a few rows a task).
    let per_task = total.div_ceil(2 * rayon::current_num_threads()).max(16);
    let mut tasks = vec![];
    for (i, (w, out)) in jobs.iter().enumerate() {
        assert_eq!(w.cols, x.nb * QK, "matmul_many: input width");
        assert_eq!(out.len(), n * w.rows, "matmul_many: output size");
        let mut r = 0;
        while r < w.rows {
            tasks.push((i, r, (r + per_task).min(w.rows)));
            r += per_task;
        }
    }
    let outs: Vec<SharedOut> = jobs
        .iter_mut()
        .map(|(_, o)| SharedOut(o.as_mut_ptr()))
        .collect();
    let mats: Vec<&QMatrix> = jobs.iter().map(|(w, _)| *w).collect();
    let (dot1, dot4) = dot_fns();
    let run = |&(i, r0, r1): &(usize, usize, usize)| {
        let (w, out) = (mats[i], outs[i]);
        for jt in (0..n).step_by(ROW_TILE) {
            let jt_end = (jt + ROW_TILE).min(n);
            for r in r0..r1 {
                let row = w.row(r);
                // Safety (writes): (j, r) lies in this task's rows, inside out.
                let mut j = jt;
                while j + 4 <= jt_end {
                    let y = dot4(&row, std::array::from_fn(|a| x.row(j + a)));
                    for (a, &v) in y.iter().enumerate() {
                        unsafe { *out.0.add((j + a) * w.rows + r) = v };
                    }
                    j += 4;
                }
                for j in j..jt_end {
                    unsafe { *out.0.add(j * w.rows + r) = dot1(&row, x.row(j)) };
                }
            }
        }
    };
    if tasks.len() > 1 {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

/// One activation block: x_i ≈ d·q_i; `s` = d·Σ q_i.
#[derive(Clone, Copy)]
struct Q8Block {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

fn quantize_rows(xs: &[f32], n: usize, k: usize) -> Vec<Q8Block> {
    let mut out = Vec::with_capacity(n * k / QK);
    for block in xs.chunks_exact(QK) {
        let amax = block.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; QK];
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(block) {
            *q = (v * inv).round() as i8;
            sum += *q as i32;
        }
        out.push(Q8Block {
            d,
            s: d * sum as f32,
            qs,
        });
    }
    out
}

enum Row<'a> {
    Q41 {
        d: &'a [f32],
        m: &'a [f32],
        qs: &'a [[u8; 16]],
    },
    Q80 {
        d: &'a [f32],
        qs: &'a [[i8; 32]],
    },
}

type Dot1 = fn(&Row, &[Q8Block]) -> f32;
type Dot4 = fn(&Row, [&[Q8Block]; 4]) -> [f32; 4];

/// The best 1 × 1 and 1 × 4 dot products for this CPU, chosen once per matmul.
fn dot_fns() -> (Dot1, Dot4) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // Safety: the CPU has AVX2 and FMA (checked just above).
            return (
                |w, x| unsafe { dot_avx2(w, x) },
                |w, x| unsafe { dot4_avx2(w, x) },
            );
        }
    }
    (dot_scalar, |w, x| x.map(|x| dot_scalar(w, x)))
}

/// The portable form (and the reference for the SIMD one).
fn dot_scalar(w: &Row, x: &[Q8Block]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in x.iter().enumerate() {
        acc += match w {
            Row::Q41 { d, m, qs } => {
                let mut isum = 0i32;
                for (i, &byte) in qs[b].iter().enumerate() {
                    isum += (byte & 0x0F) as i32 * xb.qs[i] as i32;
                    isum += (byte >> 4) as i32 * xb.qs[i + 16] as i32;
                }
                d[b] * xb.d * isum as f32 + m[b] * xb.s
            }
            Row::Q80 { d, qs } => {
                let isum: i32 = qs[b]
                    .iter()
                    .zip(&xb.qs)
                    .map(|(&a, &b)| a as i32 * b as i32)
                    .sum();
                d[b] * xb.d * isum as f32
            }
        };
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(w: &Row, x: &[Q8Block]) -> f32 {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut msum = 0f32;
    // one loop per format, so the block loop has no branch
    match w {
        Row::Q41 { d, m, qs } => {
            let low = _mm_set1_epi8(0x0F);
            for (b, xb) in x.iter().enumerate() {
                let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                let q = _mm_loadu_si128(qs[b].as_ptr() as *const __m128i);
                let lo = _mm_and_si128(q, low);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
                let wq = _mm256_set_m128i(hi, lo); // u8 0..15, element order 0..32
                let p16 = _mm256_maddubs_epi16(wq, xq); // ≤ 2·15·127: no saturation
                let p32 = _mm256_madd_epi16(p16, ones);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d[b] * xb.d), _mm256_cvtepi32_ps(p32), acc);
                msum += m[b] * xb.s;
            }
        }
        Row::Q80 { d, qs } => {
            for (b, xb) in x.iter().enumerate() {
                let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                // maddubs wants u8 × i8: |w| × (x · sign w)
                let wq = _mm256_loadu_si256(qs[b].as_ptr() as *const __m256i);
                let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq));
                let p32 = _mm256_madd_epi16(p16, ones);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d[b] * xb.d), _mm256_cvtepi32_ps(p32), acc);
            }
        }
    }
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s) + msum
}

/// One weight row against four activation rows: each weight block is
/// unpacked once and multiplied into four accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2(w: &Row, x: [&[Q8Block]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut msum = [0f32; 4];
    let nb = x[0].len();
    // one loop per format, so the block loop has no branch
    match w {
        Row::Q41 { d, m, qs } => {
            let low = _mm_set1_epi8(0x0F);
            for b in 0..nb {
                let q = _mm_loadu_si128(qs[b].as_ptr() as *const __m128i);
                let lo = _mm_and_si128(q, low);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
                let wq = _mm256_set_m128i(hi, lo); // u8 0..15, element order 0..32
                for a in 0..4 {
                    let xb = &x[a][b];
                    let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                    let p16 = _mm256_maddubs_epi16(wq, xq); // ≤ 2·15·127: no saturation
                    let p32 = _mm256_madd_epi16(p16, ones);
                    acc[a] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d[b] * xb.d),
                        _mm256_cvtepi32_ps(p32),
                        acc[a],
                    );
                    msum[a] += m[b] * xb.s;
                }
            }
        }
        Row::Q80 { d, qs } => {
            for b in 0..nb {
                // maddubs wants u8 × i8: |w| × (x · sign w)
                let wq = _mm256_loadu_si256(qs[b].as_ptr() as *const __m256i);
                let wabs = _mm256_sign_epi8(wq, wq);
                for a in 0..4 {
                    let xb = &x[a][b];
                    let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                    let p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xq, wq));
                    let p32 = _mm256_madd_epi16(p16, ones);
                    acc[a] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d[b] * xb.d),
                        _mm256_cvtepi32_ps(p32),
                        acc[a],
                    );
                }
            }
        }
    }
    std::array::from_fn(|a| {
        let v = acc[a];
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s) + msum[a]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_q(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> (QMatrix, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
        // the repacked blocks dequantize to what candle dequantizes
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(m.dequantize(), want);
        (m, want)
    }

    #[test]
    fn matmul_matches_dequantized_f32() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            matmul_case(dtype);
        }
    }

    fn matmul_case(dtype: GgmlDType) {
        let (rows, cols, n) = (40, 96, 5);
        let (m, w) = random_q(dtype, rows, cols, 1);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let x: Vec<f32> = (0..n * cols)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect();
        let got: Vec<f32> = m
            .matmul(&Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for j in 0..n {
            for r in 0..rows {
                let exact: f32 = (0..cols).map(|c| w[r * cols + c] * x[j * cols + c]).sum();
                let scale: f32 = (0..cols)
                    .map(|c| (w[r * cols + c] * x[j * cols + c]).abs())
                    .sum();
                // 8-bit activations: error ≲ 1% of Σ|w x|
                assert!(
                    (got[j * rows + r] - exact).abs() <= 0.01 * scale,
                    "[{j},{r}] {} vs {exact}",
                    got[j * rows + r]
                );
            }
        }
    }

    #[test]
    fn simd_equals_scalar() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, _) = random_q(dtype, 8, 256, 3);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
            let x: Vec<f32> = (0..256).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let xq = quantize_rows(&x, 1, 256);
            for r in 0..8 {
                let w = m.row(r);
                let (dot1, dot4) = dot_fns();
                let (a, b) = (dot1(&w, &xq), dot_scalar(&w, &xq));
                let c = dot4(&w, [&xq; 4]);
                assert!(c
                    .iter()
                    .all(|&c| c == c.clamp(a - 1e-4 * a.abs(), a + 1e-4 * a.abs())));
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{dtype:?}: {a} vs {b}"
                );
            }
        }
    }
}
