//! KV-cache policies through a whole model (a small quantized Llama-shaped
//! decoder on both executors, and a dense LayerNorm decoder): every policy
//! stays within its budget at every step; `full` streaming equals the
//! whole-text forward pass; a budget longer than the text equals `full`;
//! both executors agree; every policy works with every KV type. (Each policy's choice of tokens is checked on
//! hand-built score sequences in `cache::policy`'s unit tests.)

mod common;

use attend::cache::policy::KvPolicy;
use attend::eval::streaming::{retrieval_heads, streaming_perplexity};
use attend::kernels::kv::KvDType;
use attend::model::Executor;
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
            let caches = st.policy_caches();
            assert_eq!(caches.len(), m.cfg.n_decoder_layers);
            for (l, c) in caches.iter().enumerate() {
                assert_eq!(c.kv_heads(), retrieval[l].len());
                for (g, &marked) in retrieval[l].iter().enumerate() {
                    // razor's retrieval heads keep everything
                    let r = c.is_retrieval(g);
                    assert_eq!(r, spec.starts_with("razor") && marked);
                    let cap = match p.budget() {
                        Some(b) if !r => b,
                        _ => i + 1,
                    };
                    let held = c.head_len(g);
                    assert!(
                        held <= cap,
                        "{spec} step {i} layer {l} head {g}: {held} > {cap}"
                    );
                    // and what a capped head holds is the budget once full
                    if p.budget().is_some() && i + 1 >= cap && !r {
                        assert_eq!(held, cap, "{spec} step {i}");
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
    let mut m = quantized_llama(false, 12);
    m.kv_dtype = KvDType::F32;
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

/// Feed `ids` one token at a time through a `policy` state on `exec`:
/// the logits of every step, flattened.
fn stream(m: &Transformer, exec: Executor, p: &KvPolicy, r: &[Vec<bool>], ids: &[u32]) -> Vec<f32> {
    let mut st = m.new_state_with_policy(p, Some(r)).unwrap();
    let mut out = vec![];
    for &id in ids {
        let l = m
            .step_on(
                exec,
                &Tensor::new(&[[id]], &Device::Cpu).unwrap(),
                &mut st,
                true,
            )
            .unwrap();
        out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn both_executors_apply_the_same_policies_with_every_kv_type() {
    let mut m = quantized_llama(true, 14);
    let ids = text(40);
    let retrieval = retrieval_heads(&m, 0.5).unwrap();
    for dtype in [KvDType::F32, KvDType::F16, KvDType::Bf16] {
        m.kv_dtype = dtype;
        for spec in POLICIES {
            let p: KvPolicy = spec.parse().unwrap();
            let cpu = stream(&m, Executor::Cpu, &p, &retrieval, &ids);
            let graph = stream(&m, Executor::Graph, &p, &retrieval, &ids);
            // the same cache and policy code; the layers around it differ
            let d = max_rel(&cpu, &graph);
            assert!(d <= 1e-4, "{dtype} {spec}: cpu vs graph {d}");
        }
        // `full` under a policy equals the plain cache (in f32: in another
        // type the plain cache rounds keys after RoPE, a policy cache before)
        if dtype != KvDType::F32 {
            continue;
        }
        let full = stream(&m, Executor::Cpu, &KvPolicy::Full, &retrieval, &ids);
        let mut st = m.new_state(None).unwrap();
        let mut plain = vec![];
        for &id in &ids {
            let l = m
                .step_last(&Tensor::new(&[[id]], &Device::Cpu).unwrap(), &mut st)
                .unwrap();
            plain.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        let d = max_rel(&full, &plain);
        assert!(d <= 1e-4, "{dtype}: full policy vs plain cache {d}");
    }
}

#[test]
fn policies_work_with_a_q8_0_cache() {
    // q8_0 stores blocks of 32: a model with 32-wide heads
    let cfg = attend::config::ModelConfig {
        d_model: 64,
        n_heads: 2,
        n_kv_heads: Some(1),
        max_len: 64,
        vocab_size: 50,
        ..common::tiny(attend::config::Shape::Decoder)
    };
    let (mut m, _) = common::build(&cfg, 5, candle_core::DType::F32);
    let ids = text(40);
    m.kv_dtype = KvDType::F32;
    let exact = streaming_perplexity(&m, &ids, &KvPolicy::Full, None, |_| {}).unwrap();
    m.kv_dtype = KvDType::Q8_0;
    for spec in POLICIES {
        let p: KvPolicy = spec.parse().unwrap();
        let r = streaming_perplexity(&m, &ids, &p, None, |_| {}).unwrap();
        assert!(r.mean_nll.is_finite(), "{spec}");
        if spec == "full" {
            // 8-bit keys and values move the loss a little, not a lot
            let rel = (r.mean_nll - exact.mean_nll).abs() / exact.mean_nll;
            assert!(rel < 1e-2, "q8_0 full vs f32: {rel}");
        }
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
    let (mut m, _) = common::build(&cfg, 3, candle_core::DType::F64);
    assert_eq!(m.executor(), Executor::Graph);
    m.kv_dtype = KvDType::F32;
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

/// `reset_state` empties a used state in place: streaming a second text
/// through it gives bit for bit what a fresh state gives, for the plain
/// cache and under every policy, on both executors.
#[test]
fn a_reset_state_equals_a_fresh_one() {
    let m = quantized_llama(true, 15);
    let retrieval = retrieval_heads(&m, 0.5).unwrap();
    let (first, second) = (
        text(37),
        text(29).iter().map(|i| (i + 3) % 50).collect::<Vec<_>>(),
    );
    let feed = |st: &mut attend::model::DecodeState, exec: Executor, ids: &[u32]| -> Vec<f32> {
        let mut out = vec![];
        for &id in ids {
            let l = m
                .step_on(exec, &Tensor::new(&[[id]], &Device::Cpu).unwrap(), st, true)
                .unwrap();
            out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        out
    };
    for exec in [Executor::Cpu, Executor::Graph] {
        for spec in std::iter::once(None).chain(POLICIES.iter().map(Some)) {
            let fresh_state = || match spec {
                None => m.new_state(None).unwrap(),
                Some(s) => m
                    .new_state_with_policy(&s.parse().unwrap(), Some(&retrieval))
                    .unwrap(),
            };
            let want = feed(&mut fresh_state(), exec, &second);
            let mut st = fresh_state();
            feed(&mut st, exec, &first);
            m.reset_state(&mut st).unwrap();
            assert_eq!(st.pos, 0);
            assert_eq!(st.state_bytes(), fresh_state().state_bytes(), "{spec:?}");
            let got = feed(&mut st, exec, &second);
            assert_eq!(
                got, want,
                "{exec:?} {spec:?}: reset state differs from a fresh one"
            );
        }
    }
}
