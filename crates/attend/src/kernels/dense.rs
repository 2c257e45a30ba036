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
    // n = round(x log2 e), as a float and (from the same sum's bits) as an
    // integer: `as i32` would saturate and check NaN element by element,
    // which keeps loops over exp scalar.
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let ni = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
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
    f32::from_bits(((ni + 127) << 23) as u32) * p
}

/// Softmax of one row in place: x ← e^(x − max x) / Σ e^(x − max x).
pub fn softmax_row(x: &mut [f32]) {
    let (_, sum) = exp_shifted(x);
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// x ← e^(x − m) in place with m = max x; returns (m, Σ e^(x − m)), the
/// statistics a partial softmax carries (flash-decoding's merge). The max
/// and sum run in 16 lanes (a fold over `f32::max` stays scalar), so the
/// whole row vectorises.
pub fn exp_shifted(x: &mut [f32]) -> (f32, f32) {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l = l.max(*v);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sums = [0f32; 16];
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c) {
            *v = exp(*v - max);
            *s += *v;
        }
    }
    let mut sum = sums.iter().sum::<f32>();
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
        sum += *v;
    }
    (max, sum)
}

/// GELU(x) = x Φ(x) = ½ x (1 + erf(x / √2)), in place, with erf by
/// Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7):
/// erf(z) = 1 - (a₁t + … + a₅t⁵) e^{-z²}, t = 1 / (1 + p z), z ≥ 0.
#[inline(always)]
pub fn gelu(x: &mut f32) {
    let v = *x;
    // erfc(|z|) = q; 1 + erf(z) = 2 - q for z ≥ 0 and q for z < 0
    let (q, _) = erfc_pos(v.abs() * std::f32::consts::FRAC_1_SQRT_2);
    let c = if v >= 0.0 { 2.0 - q } else { q };
    *x = 0.5 * v * c;
}

/// (erfc(z), e^{−z²}) for z ≥ 0, erfc by Abramowitz & Stegun 7.1.26
/// (absolute error ≤ 1.5e-7): (a₁t + … + a₅t⁵) e^{−z²}, t = 1 / (1 + p z).
/// Branch-free.
#[inline(always)]
pub fn erfc_pos(z: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_72,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let t = 1.0 / (1.0 + P * z);
    let mut poly = A[4];
    for a in [A[3], A[2], A[1], A[0]] {
        poly = poly * t + a;
    }
    let e = exp(-z * z);
    (poly * t * e, e)
}

/// GELU by its tanh approximation (Hendrycks & Gimpel; Gemma's
/// `gelu_pytorch_tanh`): ½ x (1 + tanh(√(2/π) (x + 0.044715 x³))), in
/// place, with tanh(u) = 1 − 2 / (e^{2u} + 1) (exact at both ends: e^{2u}
/// clamps to 0 or a huge finite value).
#[inline(always)]
pub fn gelu_tanh(x: &mut f32) {
    const C: f32 = 0.797_884_6; // √(2/π)
    let v = *x;
    let u = C * (v + 0.044_715 * v * v * v);
    let tanh = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
    *x = 0.5 * v * (1.0 + tanh);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// gelu_tanh against the formula with std's tanh.
    #[test]
    fn gelu_tanh_matches_the_formula() {
        for i in -2000..=2000 {
            let v = i as f32 * 0.01;
            let x = v as f64;
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let want = 0.5 * x * (1.0 + (c * (x + 0.044_715 * x * x * x)).tanh());
            let mut got = v;
            gelu_tanh(&mut got);
            let err = (got as f64 - want).abs();
            assert!(err <= 1e-6 * (1.0 + want.abs()), "{v}: {got} vs {want}");
        }
    }

    /// `exp` against the standard library's over its whole range, to a few
    /// ulp, and clamped (not NaN or garbage) outside it.
    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (a, b) = (exp(x), x.exp());
            worst = worst.max((a - b).abs() / b);
        }
        assert!(worst < 4.0 * f32::EPSILON, "relative error {worst}");
        assert!(exp(-1e9) > 0.0 && exp(-1e9) < 1e-37);
        assert!(exp(1e9).is_finite() && exp(1e9) > 1e38);
    }

    /// softmax_row / exp_shifted against the naive two-pass form in f64, at
    /// lengths around the 16-lane chunk (remainders included).
    #[test]
    fn softmax_row_matches_naive() {
        for n in [1, 5, 16, 17, 31, 64, 100] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
                .collect();
            let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let z: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
            let mut e = x.clone();
            let (m2, z2) = exp_shifted(&mut e);
            assert_eq!(m2 as f64, m);
            assert!((z2 as f64 - z).abs() / z < 1e-6, "n {n}: sum {z2} vs {z}");
            let mut p = x.clone();
            softmax_row(&mut p);
            for (a, v) in p.iter().zip(&x) {
                let want = (*v as f64 - m).exp() / z;
                assert!((*a as f64 - want).abs() < 1e-6, "n {n}: {a} vs {want}");
            }
        }
    }
}
