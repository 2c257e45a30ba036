//! Fused kernels against the composed tensor ops they replace: values and
//! gradients (through candle's autograd of the composed form).

mod common;

use attend::kernels;
use candle_core::{DType, Device, Tensor, Var, D};
use common::max_abs_diff as max_diff;

fn composed_softmax(x: &Tensor) -> Tensor {
    let e = x
        .broadcast_sub(&x.max_keepdim(D::Minus1).unwrap())
        .unwrap()
        .exp()
        .unwrap();
    e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
}

fn composed_log_softmax(x: &Tensor) -> Tensor {
    let s = x.broadcast_sub(&x.max_keepdim(D::Minus1).unwrap()).unwrap();
    s.broadcast_sub(
        &s.exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap(),
    )
    .unwrap()
}

fn composed_norm(x: &Tensor, center: bool, eps: f64) -> Tensor {
    let xc = if center {
        x.broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap())
            .unwrap()
    } else {
        x.clone()
    };
    let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    xc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap()
}

/// Compare fused vs composed on one random input of `shape` (entries of
/// standard deviation `std`): values, and the gradient of a random weighted
/// sum of the output.
fn compare_at(
    shape: &[usize],
    dtype: DType,
    std: f32,
    fused: impl Fn(&Tensor) -> Tensor,
    composed: impl Fn(&Tensor) -> Tensor,
    name: &str,
) {
    let rand = |std: f32| {
        Tensor::randn(0f32, std, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let x = Var::from_tensor(&rand(std)).unwrap();
    let w = rand(1.0);
    let yf = fused(x.as_tensor());
    let yc = composed(x.as_tensor());
    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
    assert!(
        max_diff(&yf, &yc) < tol,
        "{name} {dtype:?} values: {}",
        max_diff(&yf, &yc)
    );
    let gf = (yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let (gf, gc) = (
        gf.get(x.as_tensor()).unwrap(),
        gc.get(x.as_tensor()).unwrap(),
    );
    assert!(
        max_diff(gf, gc) < tol * 10.0,
        "{name} {dtype:?} grads: {}",
        max_diff(gf, gc)
    );
}

/// `compare_at` for shapes below and above the parallel threshold, f32 and f64.
fn check(fused: impl Fn(&Tensor) -> Tensor, composed: impl Fn(&Tensor) -> Tensor, name: &str) {
    for (rows, n) in [(3usize, 7usize), (256, 200)] {
        for dtype in [DType::F32, DType::F64] {
            compare_at(&[rows, n], dtype, 3.0, &fused, &composed, name);
        }
    }
}

#[test]
fn softmax_matches_composed() {
    check(
        |x| kernels::softmax_last(x).unwrap(),
        composed_softmax,
        "softmax",
    );
}

#[test]
fn log_softmax_matches_composed() {
    check(
        |x| kernels::log_softmax_last(x).unwrap(),
        composed_log_softmax,
        "log_softmax",
    );
}

#[test]
fn norms_match_composed() {
    check(
        |x| kernels::layer_normalize(x, 1e-5).unwrap(),
        |x| composed_norm(x, true, 1e-5),
        "layernorm",
    );
    check(
        |x| kernels::rms_normalize(x, 1e-6).unwrap(),
        |x| composed_norm(x, false, 1e-6),
        "rmsnorm",
    );
}

/// Taylor linear attention's causal in-chunk weights, (1 + s + s²/2) ⊙ M,
/// against the composed form with the mask written out by its definition
/// (key j ≤ query position, rows = g heads × l positions), values and
/// gradients, below and above the parallel threshold; a mask off by one
/// position or a missing s²/2 term fails it.
#[test]
fn taylor_causal_weights_match_composed() {
    for (b, g, l) in [(2usize, 3usize, 7usize), (2, 2, 200)] {
        for dtype in [DType::F32, DType::F64] {
            let mask: Vec<f32> = (0..b * g * l)
                .flat_map(|r| (0..l).map(move |j| if j <= r % l { 1.0 } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (b, g * l, l), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let composed = |s: &Tensor| {
                ((s + 1.0).unwrap() + (s.sqr().unwrap() * 0.5).unwrap())
                    .unwrap()
                    .mul(&mask)
                    .unwrap()
            };
            let name = format!("taylor ({b}, {g}·{l}, {l})");
            let fused = |s: &Tensor| kernels::taylor_causal(s).unwrap();
            compare_at(&[b, g * l, l], dtype, 2.0, fused, composed, &name);
        }
    }
    // scores whose rows are not g whole chunks are refused, not misread
    let bad = Tensor::zeros((5, 7), DType::F32, &Device::Cpu).unwrap();
    assert!(kernels::taylor_causal(&bad).is_err());
}

#[test]
fn kernels_accept_non_contiguous_inputs() {
    let x = Tensor::randn(0f32, 1.0, (5, 6), &Device::Cpu).unwrap();
    let xt = x.t().unwrap();
    assert!(
        max_diff(
            &kernels::softmax_last(&xt).unwrap(),
            &composed_softmax(&xt.contiguous().unwrap())
        ) < 1e-6
    );
}

/// The fused encoder's vectorisable exp and GELU against libm in f64.
#[test]
fn polynomial_exp_and_gelu_match_libm() {
    use attend::kernels::dense::{exp, gelu};
    let (mut worst_exp, mut worst_gelu) = (0f64, 0f64);
    // normal results inside the clamp (below -87 they go subnormal)
    for i in -86_000..=87_990 {
        let x = i as f32 * 1e-3;
        let want = (x as f64).exp();
        worst_exp = worst_exp.max(((exp(x) as f64) - want).abs() / want);
    }
    for i in -20_000..=20_000 {
        let x = i as f32 * 1e-3;
        let xf = x as f64;
        let want = 0.5 * xf * (1.0 + libm::erf(xf / std::f64::consts::SQRT_2));
        let mut g = x;
        gelu(&mut g);
        worst_gelu = worst_gelu.max((g as f64 - want).abs() / xf.abs().max(1.0));
    }
    // a few f32 ulps; A&S 7.1.26's erf is within 1.5e-7
    assert!(worst_exp < 5e-7, "exp: max rel. error {worst_exp}");
    assert!(worst_gelu < 5e-7, "gelu: max error {worst_gelu}");
    // saturation instead of inf/NaN outside the range
    assert!(exp(-200.0) >= 0.0 && exp(-200.0) < 1e-37);
    assert!(exp(200.0).is_finite());
}

/// add_rows / mul_rows against candle's broadcast ops: values, and the
/// gradients of both inputs (x and the broadcast parameter), for a 1-d
/// parameter over 3-d input and a 2-d one (a position table) over 3-d.
#[test]
fn broadcast_over_rows_matches_candle() {
    type Op = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;
    let ops: [(&str, Op, Op); 2] = [
        ("add", kernels::add_rows, |x, p| x.broadcast_add(p)),
        ("mul", kernels::mul_rows, |x, p| x.broadcast_mul(p)),
    ];
    for (name, fused, composed) in ops {
        for p_shape in [vec![48usize], vec![13, 48]] {
            for dtype in [DType::F32, DType::F64] {
                let r = |shape: &[usize]| {
                    Var::from_tensor(
                        &Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap(),
                    )
                    .unwrap()
                };
                let (x, p) = (r(&[5, 13, 48]), r(&p_shape));
                let w = r(&[5, 13, 48]);
                let yf = fused(x.as_tensor(), p.as_tensor()).unwrap();
                let yc = composed(x.as_tensor(), p.as_tensor()).unwrap();
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                assert!(
                    max_diff(&yf, &yc) < tol,
                    "{name} {p_shape:?} {dtype:?} values"
                );
                let loss = |y: Tensor| (y * w.as_tensor()).unwrap().sum_all().unwrap();
                let (gf, gc) = (loss(yf).backward().unwrap(), loss(yc).backward().unwrap());
                for (which, v) in [("x", &x), ("p", &p)] {
                    let (a, b) = (
                        gf.get(v.as_tensor()).unwrap(),
                        gc.get(v.as_tensor()).unwrap(),
                    );
                    assert_eq!(a.dims(), b.dims());
                    assert!(
                        max_diff(a, b) < tol * 10.0,
                        "{name} {p_shape:?} {dtype:?} grad of {which}: {}",
                        max_diff(a, b)
                    );
                }
            }
        }
    }
    // a parameter that is not the tail of x's shape is refused, not broadcast
    let x = Tensor::zeros((4, 6), DType::F32, &Device::Cpu).unwrap();
    let p = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    assert!(kernels::add_rows(&x, &p).is_err());
}
