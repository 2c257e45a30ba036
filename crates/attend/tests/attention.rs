//! Softmax attention against the textbook formula, with causal and padding
//! masks, ALiBi biases and grouped-query / multi-query heads.

mod common;

use attend::attention::softmax;
use attend::position::alibi_slopes;
use candle_core::{DType, Device, Tensor};
use common::{rand4_scaled, rng, to4, T4};
use rand::Rng;

/// Uniform(-2, 2) values as nested vectors and a (b, h, t, d) f64 tensor.
fn rand4(r: &mut impl Rng, b: usize, h: usize, t: usize, d: usize) -> (T4, Tensor) {
    rand4_scaled(r, (b, h, t, d), 2.0, DType::F64)
}

fn check(h: usize, h_kv: usize, causal: bool, padded: bool, alibi: bool, tq: usize, tk: usize) {
    let mut r = rng((h * 100 + h_kv * 10 + tq) as u64);
    let (b, d) = (2, 8);
    let (qv, q) = rand4(&mut r, b, h, tq, d);
    let (kv, k) = rand4(&mut r, b, h_kv, tk, d);
    let (vv, v) = rand4(&mut r, b, h_kv, tk, d);
    // sequence 1 has its last 3 keys padded
    let lens = [tk, tk - 3];
    let pad: Vec<f32> = (0..b)
        .flat_map(|i| (0..tk).map(move |j| if j < lens[i] { 1.0 } else { 0.0 }))
        .collect();
    let pad = Tensor::from_vec(pad, (b, tk), &Device::Cpu).unwrap();
    let slopes = alibi_slopes(h);
    let q_offset = tk - tq;
    let bias = softmax::score_bias(
        tq,
        tk,
        q_offset,
        causal,
        padded.then_some(&pad),
        alibi.then_some(slopes.as_slice()),
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let got = to4(&softmax::forward(&q, &k, &v, bias.as_ref()).unwrap());
    let allowed =
        |bi: usize, i: usize, j: usize| (!causal || j <= q_offset + i) && (!padded || j < lens[bi]);
    let bias_fn = |hi: usize, i: usize, j: usize| {
        if alibi {
            -slopes[hi] * ((q_offset + i) as f64 - j as f64).abs()
        } else {
            0.0
        }
    };
    let want = softmax::naive(&qv, &kv, &vv, &allowed, &bias_fn);
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..tq {
                // a query may see no key at all only if everything is padded; never here
                for c in 0..d {
                    let (g, w) = (got[bi][hi][i][c], want[bi][hi][i][c]);
                    assert!((g - w).abs() < 1e-9, "h {h} h_kv {h_kv} causal {causal} pad {padded} alibi {alibi}: [{bi},{hi},{i},{c}] {g} vs {w}");
                }
            }
        }
    }
}

#[test]
fn softmax_matches_naive_for_every_mask_and_head_layout() {
    for (h, h_kv) in [(4, 4), (4, 2), (4, 1), (6, 3)] {
        for causal in [false, true] {
            for padded in [false, true] {
                for alibi in [false, true] {
                    check(h, h_kv, causal, padded, alibi, 9, 9);
                    // queries at the end of a longer key sequence (chunked prefill)
                    check(h, h_kv, causal, padded, alibi, 4, 9);
                }
            }
        }
    }
}

#[test]
fn masked_keys_get_no_weight() {
    // values of padded keys are huge: if any weight leaked the output would show it
    let (b, h, t, d) = (1, 2, 5, 4);
    let q = Tensor::ones((b, h, t, d), DType::F32, &Device::Cpu).unwrap();
    let k = Tensor::ones((b, h, t, d), DType::F32, &Device::Cpu).unwrap();
    let mut vals = vec![1f32; b * h * t * d];
    for hh in 0..h {
        for c in 0..d {
            vals[(hh * t + 4) * d + c] = 1e6;
        }
    }
    let v = Tensor::from_vec(vals, (b, h, t, d), &Device::Cpu).unwrap();
    let pad = Tensor::new(&[[1f32, 1., 1., 1., 0.]], &Device::Cpu).unwrap();
    let bias =
        softmax::score_bias(t, t, 0, false, Some(&pad), None, DType::F32, &Device::Cpu).unwrap();
    let y = softmax::forward(&q, &k, &v, bias.as_ref()).unwrap();
    let m = y
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((m - 1.0).abs() < 1e-5, "{m}");
}
