//! The two primitives speculative decoding stands on (issue 14), on the
//! tiny Llama 3 (q8_0 GGUF, so every row's numbers are its own): a step
//! of several tokens computed one by one (`DecodeState::set_one_by_one`)
//! gives each position exactly the logits of plain one-token decoding,
//! and rolling a state back (`DecodeState::truncate`) leaves it equal to a
//! state that never saw the rolled-back tokens — contiguous and paged.

use attend::formats::gguf;
use attend::kernels::kv::KvDType;
use attend::model::DecodeState;
use attend::Transformer;
use candle_core::{Device, Tensor};
use std::path::PathBuf;

fn llama(kv: KvDType) -> Transformer {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-decoders/llama3-q8_0.gguf");
    let mut m = gguf::load(&p, false, &Device::Cpu)
        .unwrap()
        .build()
        .unwrap();
    m.kv_dtype = kv;
    m
}

fn ids(t: &[u32]) -> Tensor {
    Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

/// Logits of every position of a step: (t, vocab) as rows.
fn step_all(m: &Transformer, st: &mut DecodeState, t: &[u32]) -> Vec<Vec<f32>> {
    m.step(&ids(t), st)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn step_one(m: &Transformer, st: &mut DecodeState, t: u32) -> Vec<f32> {
    m.step_last(&ids(&[t]), st)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n)
        .map(|j| ((j * 37 + j * j) % 290 + 3) as u32)
        .collect()
}

#[test]
fn one_by_one_steps_equal_plain_decoding_and_rollback_forgets() {
    for kv in [KvDType::F32, KvDType::F16, KvDType::Bf16] {
        let m = llama(kv);
        let pool = m.kv_pool(8, 1000).unwrap();
        // prompts that leave the draft inside one block, across blocks,
        // and near the end of the context (256)
        for (n, paged) in [
            (30, false),
            (30, true),
            (61, true),
            (200, false),
            (240, true),
        ] {
            let p = prompt(n);
            let draft = [5u32, 9, 13, 2, 40];
            let fresh = || {
                let mut st = if paged {
                    m.new_state_paged(&pool, None).unwrap()
                } else {
                    m.new_state(None).unwrap()
                };
                m.step_last(&ids(&p), &mut st).unwrap();
                st
            };
            // plain decoding: one token a step
            let mut plain = fresh();
            let want: Vec<Vec<f32>> = draft.iter().map(|&t| step_one(&m, &mut plain, t)).collect();
            // verification: the draft in one step, one by one
            let mut spec = fresh();
            spec.set_one_by_one(true);
            let got = step_all(&m, &mut spec, &draft);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(g == w, "{kv} n {n} paged {paged}: position {i} differs");
            }
            // roll back to 2 of the 5 drafted tokens: the state equals one
            // that only ever saw those two
            assert!(spec.truncate(n + 2).unwrap());
            spec.set_one_by_one(false);
            assert_eq!(spec.pos, n + 2);
            let mut twin = fresh();
            for &t in &draft[..2] {
                step_one(&m, &mut twin, t);
            }
            for (a, b) in spec.layers.iter().zip(&twin.layers) {
                match (&a.mixer, &b.mixer) {
                    (
                        attend::attention::MixerState::Kv(x),
                        attend::attention::MixerState::Kv(y),
                    ) => {
                        assert_eq!(x[0].len(), y[0].len());
                        assert!(x[0].to_f32() == y[0].to_f32(), "{kv} n {n}: cache differs");
                    }
                    _ => panic!("a softmax layer without a KV cache"),
                }
            }
            // and it goes on as the twin does
            for t in [77u32, 3, 150] {
                assert!(
                    step_one(&m, &mut spec, t) == step_one(&m, &mut twin, t),
                    "{kv} n {n}: after rollback"
                );
            }
        }
        // the rolled-back blocks went back to the pool: no leak
        assert_eq!(pool.used(), 0, "{kv}");
    }
}

#[test]
fn rollback_is_refused_where_rows_are_gone_and_past_the_end() {
    let m = llama(KvDType::F32);
    let mut st = m.new_state(None).unwrap();
    m.step_last(&ids(&prompt(10)), &mut st).unwrap();
    assert!(st.truncate(11).is_err());
    assert!(st.truncate(10).unwrap());
    // a policy cache has evicted: Ok(false), the state untouched
    let policy: attend::cache::policy::KvPolicy = "sinks=2,window=4".parse().unwrap();
    let mut capped = m.new_state_with_policy(&policy, None).unwrap();
    m.step_last(&ids(&prompt(10)), &mut capped).unwrap();
    assert!(!capped.truncate(8).unwrap());
    assert_eq!(capped.pos, 10);
}

#[test]
fn one_by_one_steps_equal_plain_decoding_through_sliding_window_rings() {
    // the tiny Gemma 3 (windows of 8 on 5 of 6 layers, kept in rings)
    let q8 = attend::formats::hf_decoder::quant_type("q8_0").unwrap();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-decoders/gemma3");
    let m = attend::formats::hf_decoder::load(&dir, Some(q8), &Device::Cpu)
        .unwrap()
        .build()
        .unwrap();
    for n in [3, 6, 20] {
        let p = prompt(n);
        let draft = [5u32, 9, 13, 2, 40, 7, 7, 1, 90, 3];
        let fresh = || {
            let mut st = m.new_state(None).unwrap();
            m.step_last(&ids(&p), &mut st).unwrap();
            st
        };
        let mut plain = fresh();
        let want: Vec<Vec<f32>> = draft.iter().map(|&t| step_one(&m, &mut plain, t)).collect();
        let mut spec = fresh();
        spec.set_one_by_one(true);
        let got = step_all(&m, &mut spec, &draft);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g == w, "n {n}: position {i} differs");
        }
        // rings cannot roll back: the caller restores a copy
        assert!(!spec.can_truncate());
    }
}
