//! Exact softmax attention, softmax(q kᵀ / √d + bias) v (Vaswani et al. 2017),
//! with grouped-query heads (Ainslie et al. 2023): query head h reads key/value
//! head h / (n_heads / n_kv_heads).
//!
//! * `naive`   — the textbook formula in plain loops (reference for tests);
//! * `forward` — batched tensor form (the graph executor's op, `exec::graph`);
//!   the CPU executor's buffer form is `kernels::attention`;
//! * the decode state is the KV cache (`cache::kv`), shared by both.

pub use crate::exec::graph::{score_bias, softmax_attention as forward};

/// The quadratic textbook form, one score at a time, in f64.
#[allow(clippy::needless_range_loop)] // indices mirror the formula
/// q: [b][h][tq][d], k: [b][h_kv][tk][d], v: [b][h_kv][tk][d_v]; `allowed(b, i, j)` says whether
/// query i may see key j; `bias(h, i, j)` is added to the score.
pub fn naive(
    q: &[Vec<Vec<Vec<f64>>>],
    k: &[Vec<Vec<Vec<f64>>>],
    v: &[Vec<Vec<Vec<f64>>>],
    allowed: &dyn Fn(usize, usize, usize) -> bool,
    bias: &dyn Fn(usize, usize, usize) -> f64,
) -> Vec<Vec<Vec<Vec<f64>>>> {
    let (h, h_kv) = (q[0].len(), k[0].len());
    let d = q[0][0][0].len();
    let mut out = vec![];
    for bi in 0..q.len() {
        let mut heads = vec![];
        for hi in 0..h {
            let kv = hi / (h / h_kv);
            let mut rows = vec![];
            for (i, qi) in q[bi][hi].iter().enumerate() {
                let scores: Vec<Option<f64>> = k[bi][kv]
                    .iter()
                    .enumerate()
                    .map(|(j, kj)| {
                        allowed(bi, i, j).then(|| {
                            qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                                + bias(hi, i, j)
                        })
                    })
                    .collect();
                let max = scores
                    .iter()
                    .flatten()
                    .cloned()
                    .fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores
                    .iter()
                    .map(|s| s.map_or(0.0, |s| (s - max).exp()))
                    .collect();
                let z: f64 = w.iter().sum();
                let dv = v[bi][kv][0].len();
                let mut o = vec![0.0; dv];
                for (j, wj) in w.iter().enumerate() {
                    for c in 0..dv {
                        o[c] += wj / z * v[bi][kv][j][c];
                    }
                }
                rows.push(o);
            }
            heads.push(rows);
        }
        out.push(heads);
    }
    out
}
