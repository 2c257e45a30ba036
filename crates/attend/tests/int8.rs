//! Vector-wise int8 and LLM.int8() (`kernels::quant::int8`, issue 15):
//! the kernels against an f64 reference of the same formula, the outlier
//! decomposition's two limits (a threshold above every activation is plain
//! int8; threshold 0 is the float product), and whole models.

mod common;

use attend::kernels::quant::int8::{matmul_int8, outlier_columns, Int8Matrix};
use attend::model::Executor;
use attend::nn::{Int8Mode, Weight};
use attend::Transformer;
use candle_core::Tensor;
use half::f16;
use rand::Rng;

fn uniform(n: usize, a: f32, seed: u64) -> Vec<f32> {
    let mut r = common::rng(seed);
    (0..n).map(|_| r.random_range(-a..a)).collect()
}

/// The paper's formula in f64 from the int8 values the matrix holds:
/// y = s_x s_w Σ q_x q_w over the non-outlier columns + Σ_O x w16.
fn reference(w: &Int8Matrix, w16: &[f32], x: &[f32], n: usize, tau: Option<f32>) -> Vec<f64> {
    let k = w.cols;
    let outl = tau.map_or(vec![], |t| outlier_columns(x, n, k, t));
    let mut y = vec![0f64; n * w.rows];
    for i in 0..n {
        let row = &x[i * k..(i + 1) * k];
        let amax = (0..k)
            .filter(|j| !outl.contains(j))
            .fold(0f32, |a, j| a.max(row[j].abs()));
        let sx = amax / 127.0;
        let qx: Vec<f64> = (0..k)
            .map(|j| {
                if outl.contains(&j) || sx == 0.0 {
                    0.0
                } else {
                    (row[j] / sx).round_ties_even().clamp(-127.0, 127.0) as f64
                }
            })
            .collect();
        for r in 0..w.rows {
            let (sw, qw) = w.row_q(r);
            let int: f64 = qx.iter().zip(&qw).map(|(a, &b)| a * b as f64).sum();
            let mut v = sx as f64 * sw as f64 * int;
            for &j in &outl {
                v += row[j] as f64 * w16[r * k + j] as f64;
            }
            y[i * w.rows + r] = v;
        }
    }
    y
}

/// x (n, k) · w (m, k)ᵀ in f64.
fn exact_product(x: &[f32], w: &[f32], n: usize, m: usize, k: usize) -> Vec<f64> {
    (0..n * m)
        .map(|i| {
            let (a, r) = (i / m, i % m);
            (0..k)
                .map(|j| x[a * k + j] as f64 * w[r * k + j] as f64)
                .sum()
        })
        .collect()
}

fn run(w: &Int8Matrix, x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * w.rows];
    matmul_int8(x, n, w.cols, &mut [(w, &mut out)]);
    out
}

fn close(got: &[f32], want: &[f64], tol: f64) {
    let scale = want.iter().fold(1e-3f64, |a, v| a.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * scale,
            "[{i}] {g} vs {w} (scale {scale})"
        );
    }
}

fn f16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
}

#[test]
fn int8_products_match_an_f64_reference() {
    let (m, k) = (40, 96);
    let w = uniform(m * k, 0.5, 1);
    for n in [1, 3, 8, 17] {
        let mut x = uniform(n * k, 2.0, 10 + n as u64);
        // two outlier columns, present in some rows only
        x[5] = 9.0;
        x[(n - 1) * k + 70] = -12.5;
        let plain = Int8Matrix::quantize(&w, m, k, None).unwrap();
        close(
            &run(&plain, &x, n),
            &reference(&plain, &w, &x, n, None),
            1e-5,
        );
        let llm = Int8Matrix::quantize(&w, m, k, Some(6.0)).unwrap();
        assert_eq!(outlier_columns(&x, n, k, 6.0), vec![5, 70]);
        let w16 = f16_round(&w);
        close(
            &run(&llm, &x, n),
            &reference(&llm, &w16, &x, n, Some(6.0)),
            1e-5,
        );
        let s = llm.stats(true);
        assert_eq!((s.products, s.outlier_cols, s.with_outliers), (1, 2, 1));
        // and int8 is close to the float product, the outliers closer
        let exact = exact_product(&x, &w, n, m, k);
        let err = |y: &[f32]| {
            y.iter()
                .zip(&exact)
                .map(|(&g, &e)| (g as f64 - e).abs())
                .fold(0.0, f64::max)
        };
        let (e_plain, e_llm) = (err(&run(&plain, &x, n)), err(&run(&llm, &x, n)));
        assert!(e_llm < e_plain, "n={n}: LLM.int8 {e_llm} vs int8 {e_plain}");
    }
}

#[test]
fn llm_int8_reduces_to_plain_int8_and_to_the_float_product() {
    let (m, k, n) = (32, 64, 5);
    // weights that 16 bits hold exactly, so the float product is the
    // limit the 16-bit copy reaches
    let w = f16_round(&uniform(m * k, 0.4, 3));
    let x = uniform(n * k, 3.0, 4);
    let plain = Int8Matrix::quantize(&w, m, k, None).unwrap();
    // a threshold above every activation: no outlier, plain int8 bit for bit
    let high = Int8Matrix::quantize(&w, m, k, Some(1e9)).unwrap();
    assert_eq!(run(&high, &x, n), run(&plain, &x, n));
    // threshold 0: every column an outlier, the float product
    let zero = Int8Matrix::quantize(&w, m, k, Some(0.0)).unwrap();
    let exact = exact_product(&x, &w, n, m, k);
    close(&run(&zero, &x, n), &exact, 1e-6);
    // bytes: 1 per weight and the scales; the 16-bit copy adds 2
    assert!(plain.bytes() < m * k * 5 / 4);
    assert_eq!(zero.bytes(), plain.bytes() + 2 * m * k);
}

/// A small Llama-shaped model with f16-exact float weights.
fn model() -> Transformer {
    let mut m = common::llama_in(
        false,
        5,
        candle_core::quantized::GgmlDType::F32,
        candle_core::quantized::GgmlDType::F32,
    );
    for l in m.block_linears_mut() {
        let (r, c) = l.w.dims().unwrap();
        let Weight::Q(q) = &l.w else {
            panic!("f32 GGUF weights")
        };
        let v = f16_round(&q.dequantize());
        l.w = Weight::Dense(Tensor::from_vec(v, (r, c), &candle_core::Device::Cpu).unwrap());
    }
    m
}

#[test]
fn int8_models_meet_the_limits_on_both_executors() {
    let f32m = model();
    let x = common::random_ids(&mut common::rng(6), 1, 20, 50);
    let logits = |m: &Transformer, e: Executor| {
        m.step_on(e, &x, &mut m.new_state(None).unwrap(), false)
            .unwrap()
    };
    let mut plain = f32m.clone();
    plain.quantize_int8(Int8Mode::Plain).unwrap();
    let mut high = f32m.clone();
    high.quantize_int8(Int8Mode::LlmInt8 { threshold: 1e30 })
        .unwrap();
    let mut zero = f32m.clone();
    zero.quantize_int8(Int8Mode::LlmInt8 { threshold: 0.0 })
        .unwrap();
    for e in [Executor::Cpu, Executor::Graph] {
        let want = logits(&f32m, e);
        assert_eq!(
            common::max_abs_diff(&logits(&high, e), &logits(&plain, e)),
            0.0
        );
        let d0 = common::max_abs_diff(&logits(&zero, e), &want);
        assert!(d0 < 1e-4, "{e:?}: threshold 0 vs f32: {d0}");
        let dp = common::max_abs_diff(&logits(&plain, e), &want);
        assert!(
            dp > 1e-4 && dp < 0.5,
            "{e:?}: int8 is close, not equal: {dp}"
        );
    }
    // both executors run the same int8 numbers
    let d = common::max_abs_diff(
        &logits(&plain, Executor::Cpu),
        &logits(&plain, Executor::Graph),
    );
    assert!(d < 1e-4, "{d}");
    // weight bytes: int8 holds about a quarter of f32's block weights
    let blocks = |m: &Transformer| -> usize { m.block_linears().iter().map(|l| l.w.bytes()).sum() };
    assert!(blocks(&plain) * 3 < blocks(&f32m));
    assert!(f32m.weight_bytes() > plain.weight_bytes());
}

#[test]
fn int8_refuses_quantized_weights() {
    let mut q = common::quantized_llama(false, 7);
    let e = q.quantize_int8(Int8Mode::Plain).unwrap_err().to_string();
    assert_eq!(
        e,
        "the weights are already quantized (q4_1); int8 starts from float weights"
    );
}
