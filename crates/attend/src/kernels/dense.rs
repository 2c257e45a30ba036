//! Dense f32 layers on plain buffers: the GEMM glue (gemm's AVX-512
//! kernels), norm rows, and the vectorisable exp and GELU.

use rayon::prelude::*;

/// Apply `f` to each row of width `n`, rows split over the rayon pool.
pub fn par_rows(x: &mut [f32], n: usize, f: impl Fn(&mut [f32]) + Sync) {
    x.par_chunks_mut(n * 16)
        .for_each(|block| block.chunks_exact_mut(n).for_each(&f));
}

/// In place, per row of gain.len(): LayerNorm ((x - mean) / sqrt(var + eps),
/// `center`) or RMSNorm (x / sqrt(mean(x²) + eps)), times gain, plus bias.
/// The row statistics are those of the norm kernel the graph runs.
pub fn norm_rows(x: &mut [f32], gain: &[f32], bias: Option<&[f32]>, eps: f32, center: bool) {
    let stats = super::Normalize {
        center,
        eps: eps as f64,
    };
    let f = |row: &mut [f32]| {
        let (mean, inv) = stats.stats(row);
        match bias {
            Some(b) => {
                for ((v, g), b) in row.iter_mut().zip(gain).zip(b) {
                    *v = (*v - mean) * inv * g + b;
                }
            }
            None => {
                for (v, g) in row.iter_mut().zip(gain) {
                    *v = (*v - mean) * inv * g;
                }
            }
        }
    };
    if x.len() < 1 << 14 {
        x.chunks_exact_mut(gain.len()).for_each(f);
    } else {
        par_rows(x, gain.len(), f);
    }
}

/// y (m, n) = x (m, k) · wᵀ (+ b): w row-major (n, k), as checkpoints store
/// linear weights, read in place through strides by gemm.
pub fn matmul_t(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (m, n, k): (usize, usize, usize),
    y: &mut [f32],
) {
    assert!(x.len() == m * k && y.len() == m * n && w.len() == n * k);
    assert!(b.is_none_or(|b| b.len() == n));
    match b {
        Some(b) => y.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(b)),
        None => y.fill(0.0),
    }
    if m == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k > 1 << 16 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // Safety: x is (m, k) row-major, w (n, k) row-major read as wᵀ (k, n)
    // (row stride 1, column stride k), y (m, n) row-major; sizes asserted.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// eˣ to ~1 ulp for x in [-87, 88] (clamped outside): x = n ln2 + r with
/// |r| ≤ ln2/2, e^r by its degree-7 Taylor polynomial, 2ⁿ through the
/// exponent bits. Branch-free, so loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    f32::from_bits(((n as i32 + 127) << 23) as u32) * p
}

/// GELU(x) = x Φ(x) = ½ x (1 + erf(x / √2)), in place, with erf by
/// Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7):
/// erf(z) = 1 - (a₁t + … + a₅t⁵) e^{-z²}, t = 1 / (1 + p z), z ≥ 0.
#[inline(always)]
pub fn gelu(x: &mut f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_72,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let v = *x;
    let z = v.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * z);
    let mut poly = A[4];
    for a in [A[3], A[2], A[1], A[0]] {
        poly = poly * t + a;
    }
    // erfc(|z|) = q; 1 + erf(z) = 2 - q for z ≥ 0 and q for z < 0
    let q = poly * t * exp(-z * z);
    let c = if v >= 0.0 { 2.0 - q } else { q };
    *x = 0.5 * v * c;
}
