//! KV-cache policies through a whole model (a small quantized Llama-shaped
//! decoder, on the fused and the composed path, and a dense LayerNorm
//! decoder): every policy stays within its budget at every step; `full`
//! streaming equals the whole-text forward pass; a budget longer than the
//! text equals `full`; both paths agree. (Each policy's choice of tokens is checked on
//! hand-built score sequences in `cache::policy`'s unit tests.)

mod common;

use attend::cache::policy::KvPolicy;
use attend::eval::streaming::{retrieval_heads, streaming_perplexity};
use attend::Transformer;
use candle_core::{Device, Tensor, D};
use common::quantized_llama;

fn text(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + i / 5) % 50) as u32).collect()
}

const POLICIES: [&str; 6] = [
    "window=16",
    "sinks=4,window=12",
    "h2o=8,window=8",
    "a2sf=8,window=8,forget=0.5",
    "razor,sinks=4,window=11",
    "full",
];

#[test]
fn every_policy_stays_within_its_budget_at_every_step() {
    let m = quantized_llama(true, 11);
    let retrieval = retrieval_heads(&m, 0.5).unwrap();
    for spec in POLICIES {
        let p: KvPolicy = spec.parse().unwrap();
        let mut st = m.new_state_with_policy(&p, Some(&retrieval)).unwrap();
        for (i, &id) in text(60).iter().enumerate() {
            m.step_last(&Tensor::new(&[[id]], &Device::Cpu).unwrap(), &mut st)
                .unwrap();
            let caches = st.fused.as_ref().unwrap().policy.as_ref().unwrap();
            for (l, c) in caches.iter().enumerate() {
                for (g, h) in c.heads.iter().enumerate() {
                    // razor's retrieval heads keep everything
                    assert_eq!(h.retrieval, spec.starts_with("razor") && retrieval[l][g]);
                    let cap = match p.budget() {
                        Some(b) if !h.retrieval => b,
                        _ => i + 1,
                    };
                    assert!(
                        h.len() <= cap,
                        "{spec} step {i} layer {l} head {g}: {} > {cap}",
                        h.len()
                    );
                    // and what a capped head holds is the budget once full
                    if p.budget().is_some() && i + 1 >= cap && !h.retrieval {
                        assert_eq!(h.len(), cap, "{spec} step {i}");
                    }
                }
            }
        }
    }
}

/// Mean NLL of the whole text in one forward pass (composed path).
fn whole_text_nll(m: &Transformer, ids: &[u32]) -> f64 {
    let x = Tensor::new(&ids[..ids.len() - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&m.decode(&x, None).unwrap(), D::Minus1)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let rows: Vec<Vec<f64>> = logp
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec2()
        .unwrap();
    -rows
        .iter()
        .zip(&ids[1..])
        .map(|(r, &t)| r[t as usize])
        .sum::<f64>()
        / (ids.len() - 1) as f64
}

#[test]
fn full_streaming_equals_the_whole_text_forward_pass() {
    let m = quantized_llama(false, 12);
    let ids = text(50);
    let s = streaming_perplexity(&m, &ids, &KvPolicy::Full, None, |_| {}).unwrap();
    let want = whole_text_nll(&m, &ids);
    assert!(
        (s.mean_nll - want).abs() <= 1e-4 * want,
        "streaming {} vs whole text {want}",
        s.mean_nll
    );
    assert_eq!(s.n_tokens, 50);
    assert_eq!(s.cache_tokens, 49); // the last token is never fed
}

#[test]
fn a_budget_longer_than_the_text_equals_full() {
    let m = quantized_llama(true, 13);
    let ids = text(40);
    let full = streaming_perplexity(&m, &ids, &KvPolicy::Full, None, |_| {}).unwrap();
    let retrieval = retrieval_heads(&m, 0.5).unwrap();
    for spec in [
        "window=64",
        "sinks=4,window=60",
        "h2o=32,window=32",
        "a2sf=32,window=32,forget=0.5",
        "razor,budget=64",
    ] {
        let p: KvPolicy = spec.parse().unwrap();
        let r = streaming_perplexity(&m, &ids, &p, Some(&retrieval), |_| {}).unwrap();
        assert_eq!(r.mean_nll, full.mean_nll, "{spec}");
    }
    // and a budget that bites changes the result
    let r = streaming_perplexity(&m, &ids, &"window=4".parse().unwrap(), None, |_| {}).unwrap();
    assert_ne!(r.mean_nll, full.mean_nll);
    assert!(r.cache_bytes_max < full.cache_bytes_max);
}

#[test]
fn the_composed_path_applies_the_same_policies() {
    // the same quantized model without its fused path
    let fused = quantized_llama(true, 14);
    let mut composed = fused.clone();
    composed.fused = None;
    let ids = text(60);
    let retrieval = retrieval_heads(&fused, 0.5).unwrap();
    assert_eq!(retrieval, retrieval_heads(&composed, 0.5).unwrap());
    for spec in POLICIES {
        let p: KvPolicy = spec.parse().unwrap();
        let a = streaming_perplexity(&fused, &ids, &p, Some(&retrieval), |_| {}).unwrap();
        let b = streaming_perplexity(&composed, &ids, &p, Some(&retrieval), |_| {}).unwrap();
        // same policy code, same kernels; only rounding-order differences
        assert!(
            (a.mean_nll - b.mean_nll).abs() <= 1e-4 * a.mean_nll,
            "{spec}: fused {} vs composed {}",
            a.mean_nll,
            b.mean_nll
        );
        assert_eq!(a.cache_tokens, b.cache_tokens, "{spec}");
    }
}

#[test]
fn any_softmax_decoder_takes_a_policy() {
    // a dense f64 model with learned positions and LayerNorm (not Llama-shaped)
    let cfg = attend::config::ModelConfig {
        max_len: 64,
        vocab_size: 50,
        position: attend::config::PositionKind::Learned,
        ..common::tiny(attend::config::Shape::Decoder)
    };
    let (m, _) = common::build(&cfg, 3, candle_core::DType::F64);
    assert!(m.fused.is_none());
    let ids = text(40);
    let full = streaming_perplexity(&m, &ids, &KvPolicy::Full, None, |_| {}).unwrap();
    let want = whole_text_nll(&m, &ids);
    assert!(
        (full.mean_nll - want).abs() <= 1e-4 * want,
        "{} vs {want}",
        full.mean_nll
    );
    let w =
        streaming_perplexity(&m, &ids, &"sinks=2,window=6".parse().unwrap(), None, |_| {}).unwrap();
    assert_eq!(w.cache_tokens, 8);
    assert!(w.cache_bytes_max < full.cache_bytes_max);
}
