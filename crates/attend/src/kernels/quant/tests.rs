//! Every format's repacked tiles against candle's dequantization, and every
//! kernel (portable, AVX2, AVX-512, whichever this CPU has) against the
//! dequantized weights times the activations, at shapes that are not
//! multiples of the tiles.

use super::*;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

fn ggml(f: Format) -> GgmlDType {
    match f {
        Format::F32 => GgmlDType::F32,
        Format::F16 => GgmlDType::F16,
        Format::BF16 => GgmlDType::BF16,
        Format::Q4_0 => GgmlDType::Q4_0,
        Format::Q4_1 => GgmlDType::Q4_1,
        Format::Q5_0 => GgmlDType::Q5_0,
        Format::Q5_1 => GgmlDType::Q5_1,
        Format::Q8_0 => GgmlDType::Q8_0,
        Format::Q2K => GgmlDType::Q2K,
        Format::Q3K => GgmlDType::Q3K,
        Format::Q4K => GgmlDType::Q4K,
        Format::Q5K => GgmlDType::Q5K,
        Format::Q6K => GgmlDType::Q6K,
    }
}

/// A random (rows, cols) matrix in `f` (quantized by candle), repacked, and
/// what candle dequantizes it to.
fn random(f: Format, rows: usize, cols: usize, seed: u64) -> (QMatrix, Vec<f32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // rows of different scales and signs, so that mins and scales vary
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let r = i / cols;
            let scale = 0.2 + (r % 5) as f32 * 0.4;
            rng.random_range(-1.0f32..1.0) * scale + if r.is_multiple_of(3) { 0.3 } else { 0.0 }
        })
        .collect();
    let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, ggml(f)).unwrap();
    let want: Vec<f32> = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (QMatrix::from_qtensor(&q).unwrap(), want)
}

fn cols_for(f: Format) -> usize {
    if f.is_k() {
        512
    } else {
        96
    }
}

#[test]
fn repacked_tiles_dequantize_to_what_candle_dequantizes() {
    for f in Format::ALL {
        let (rows, cols) = (37, cols_for(f));
        let (m, want) = random(f, rows, cols, 1);
        let got = m.dequantize();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // d·u + m and candle's d·(u − offset) round differently only for
            // the 16-wide sub-blocks' products (Q3_K, Q6_K): one f32 ulp
            assert!(
                (a - b).abs() <= 2.0 * f32::EPSILON * b.abs(),
                "{}: element {i} ({}, {}): {a} vs {b}",
                f.name(),
                i / cols,
                i % cols
            );
        }
    }
}

fn activations(n: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n * k).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

#[test]
fn every_kernel_matches_the_dequantized_product() {
    for f in Format::ALL {
        let (rows, cols) = (37, cols_for(f));
        let (m, w) = random(f, rows, cols, 2);
        // every pass width (1 to 8) and rests after passes of 8
        for n in (1..=17).chain([23]) {
            let x = activations(n, cols, 3 + n as u64);
            let acts = Activations::new(&x, n, cols);
            let mut reference = vec![0f32; n * rows];
            matmul_many_isa(Isa::Portable, &acts, &mut [(&m, &mut reference)]);
            for j in 0..n {
                for r in 0..rows {
                    let exact: f32 = (0..cols).map(|c| w[r * cols + c] * x[j * cols + c]).sum();
                    let scale: f32 = (0..cols)
                        .map(|c| (w[r * cols + c] * x[j * cols + c]).abs())
                        .sum();
                    // 8-bit activations: error ≲ 1% of Σ|w x|; floats exact
                    let tol = if f.is_float() { 1e-5 } else { 0.01 } * scale;
                    let got = reference[j * rows + r];
                    assert!(
                        (got - exact).abs() <= tol,
                        "{} portable [{j},{r}]: {got} vs {exact}",
                        f.name()
                    );
                }
            }
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; n * rows];
                matmul_many_isa(isa, &acts, &mut [(&m, &mut out)]);
                for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
                    let scale = reference.iter().fold(0f32, |s, v| s.max(v.abs()));
                    assert!(
                        (a - b).abs() <= 1e-5 * scale,
                        "{} {isa:?} n={n} [{}, {}]: {a} vs portable {b}",
                        f.name(),
                        i / rows,
                        i % rows
                    );
                }
            }
        }
    }
}

#[test]
fn several_matrices_share_one_quantized_input() {
    let (a, _) = random(Format::Q4K, 20, 256, 4);
    let (b, _) = random(Format::Q5_0, 33, 256, 5);
    let (c, _) = random(Format::F16, 7, 256, 6);
    let x = activations(5, 256, 7);
    let acts = Activations::new(&x, 5, 256);
    let (mut oa, mut ob, mut oc) = (vec![0f32; 100], vec![0f32; 165], vec![0f32; 35]);
    matmul_many(&acts, &mut [(&a, &mut oa), (&b, &mut ob), (&c, &mut oc)]);
    for (m, o) in [(&a, &oa), (&b, &ob), (&c, &oc)] {
        let mut alone = vec![0f32; o.len()];
        matmul_many(&Activations::new(&x, 5, 256), &mut [(m, &mut alone)]);
        assert_eq!(o, &alone, "{}", m.fmt.name());
    }
}

#[test]
fn bad_shapes_are_refused() {
    assert!(QMatrix::from_ggml(Format::Q4K, 2, 96, &[0; 2 * 54]).is_err()); // 96 % 256
    assert!(QMatrix::from_ggml(Format::Q4_0, 2, 64, &[0; 10]).is_err()); // too few bytes
    assert!(QMatrix::from_ggml(Format::Q4_0, 2, 64, &[0; 2 * 2 * 18]).is_ok());
}
