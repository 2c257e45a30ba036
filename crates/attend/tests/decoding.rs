//! Incremental decoding with the KV cache gives the same logits (and so the
//! same tokens) as recomputing the whole sequence, for every position scheme,
//! norm placement, FFN and head layout; decoders are causal.

mod common;

use attend::config::Shape;
use attend::decode::{generate, greedy_batch, Sampler, SamplingParams};
use candle_core::{DType, Device, Tensor, D};
use common::*;

#[test]
fn decoder_kv_cache_equals_full_recomputation() {
    for cfg in variants(Shape::Decoder) {
        let (mut model, _) = build(&cfg, 1, DType::F32);
        model.kv_dtype = attend::kernels::kv::KvDType::F32;
        let ids = random_ids(&mut rng(2), 2, 13, cfg.vocab_size);
        let full = model.decode(&ids, None).unwrap();
        // prefill 5 tokens, then one at a time
        let mut state = model.new_state(None).unwrap();
        let mut parts = vec![model
            .step(&ids.narrow(1, 0, 5).unwrap(), &mut state)
            .unwrap()];
        for t in 5..13 {
            parts.push(
                model
                    .step(&ids.narrow(1, t, 1).unwrap(), &mut state)
                    .unwrap(),
            );
        }
        let inc = Tensor::cat(&parts, 1).unwrap();
        let diff = max_abs_diff(&full, &inc);
        assert!(diff < 1e-4, "{cfg:?}: {diff}");
        // the cache holds 2 (k, v) × layers × b × kv_heads × t × head_dim floats
        let want = 2 * cfg.n_decoder_layers * 2 * cfg.kv_heads() * 13 * cfg.head_dim() * 4;
        assert_eq!(state.state_bytes(), want);
    }
}

/// The KV cache writes into buffers with spare room; a cloned state must not
/// share them, or two branches would overwrite each other's next keys.
#[test]
fn cloned_decode_states_branch_independently() {
    let cfg = tiny(Shape::Decoder);
    let (model, _) = build(&cfg, 5, DType::F32);
    let ids = random_ids(&mut rng(6), 1, 9, cfg.vocab_size);
    let mut a = model.new_state(None).unwrap();
    // prefill 5, one step: the buffers now have room for 10
    model.step(&ids.narrow(1, 0, 5).unwrap(), &mut a).unwrap();
    model.step(&ids.narrow(1, 5, 1).unwrap(), &mut a).unwrap();
    let mut b = a.clone();
    // branch a continues with ids[6..9], branch b with each of them + 1
    let tail: Vec<u32> = ids
        .narrow(1, 6, 3)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let other: Vec<u32> = tail
        .iter()
        .map(|t| (t + 1) % cfg.vocab_size as u32)
        .collect();
    let prefix: Vec<u32> = ids
        .narrow(1, 0, 6)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (mut la, mut lb) = (vec![], vec![]);
    for i in 0..3 {
        let step = |tok: u32, st: &mut attend::model::DecodeState| {
            model
                .step(&Tensor::new(&[[tok]], &Device::Cpu).unwrap(), st)
                .unwrap()
        };
        // interleaved, so a shared buffer would be overwritten in between
        la.push(step(tail[i], &mut a));
        lb.push(step(other[i], &mut b));
    }
    for (branch, logits) in [(&tail, &la), (&other, &lb)] {
        let seq: Vec<u32> = prefix.iter().chain(branch.iter()).copied().collect();
        let full = model
            .decode(
                &Tensor::new(&seq[..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
            )
            .unwrap();
        let inc = Tensor::cat(logits, 1).unwrap();
        let diff = max_abs_diff(&full.narrow(1, 6, 3).unwrap(), &inc);
        assert!(diff < 1e-4, "branch {branch:?}: {diff}");
    }
}

/// An encoder–decoder built from `cfg` over a padded source batch (2 × 9, the
/// second padded after 6): its model, encoder memory, and the largest
/// difference between full decoding and 7 single steps on the KV cache.
fn enc_dec_step_diff(
    cfg: &attend::config::ModelConfig,
) -> (attend::Transformer, attend::model::Memory, f64) {
    let (model, _) = build(cfg, 3, DType::F32);
    let mut r = rng(4);
    let src = random_ids(&mut r, 2, 9, cfg.vocab_size);
    let pad = Tensor::new(
        &[[1f32; 9], [1., 1., 1., 1., 1., 1., 0., 0., 0.]],
        &Device::Cpu,
    )
    .unwrap();
    let memory = model.encode(&src, Some(&pad)).unwrap();
    let tgt = random_ids(&mut r, 2, 7, cfg.vocab_size);
    let full = model.decode(&tgt, Some(&memory)).unwrap();
    let mut state = model.new_state(Some(&memory)).unwrap();
    let parts: Vec<Tensor> = (0..7)
        .map(|t| {
            model
                .step(&tgt.narrow(1, t, 1).unwrap(), &mut state)
                .unwrap()
        })
        .collect();
    let diff = max_abs_diff(&full, &Tensor::cat(&parts, 1).unwrap());
    (model, memory, diff)
}

#[test]
fn encoder_decoder_kv_cache_equals_full_recomputation() {
    for cfg in variants(Shape::EncoderDecoder) {
        let (_, _, diff) = enc_dec_step_diff(&cfg);
        assert!(diff < 1e-4, "{cfg:?}: {diff}");
    }
}

#[test]
fn greedy_generation_equals_argmax_of_full_recomputation() {
    let cfg = variants(Shape::Decoder).remove(6);
    let (model, _) = build(&cfg, 5, DType::F32);
    let prompt = [3u32, 1, 4];
    let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
    let out = generate(&model, &prompt, None, 10, &mut sampler, None, |_| Ok(())).unwrap();
    let mut seq = prompt.to_vec();
    for &tok in &out {
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.decode(&ids, None).unwrap();
        let last = logits
            .narrow(1, seq.len() - 1, 1)
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()[0];
        assert_eq!(last, tok);
        seq.push(tok);
    }
}

#[test]
fn batched_greedy_equals_one_at_a_time() {
    let cfg = variants(Shape::EncoderDecoder).remove(0);
    let (model, _) = build(&cfg, 6, DType::F32);
    let src = random_ids(&mut rng(7), 3, 6, cfg.vocab_size);
    let memory = model.encode(&src, None).unwrap();
    let batched = greedy_batch(&model, &memory, 1, 2, 8).unwrap();
    for (i, want) in batched.iter().enumerate() {
        let m1 = model.encode(&src.narrow(0, i, 1).unwrap(), None).unwrap();
        let one = greedy_batch(&model, &m1, 1, 2, 8).unwrap();
        assert_eq!(&one[0], want);
    }
}

#[test]
fn decoder_is_causal_and_encoder_is_not() {
    for cfg in variants(Shape::Decoder) {
        let (model, _) = build(&cfg, 8, DType::F32);
        let a = random_ids(&mut rng(9), 1, 10, cfg.vocab_size);
        let mut v = a.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        for x in &mut v[6..] {
            *x = (*x + 1) % cfg.vocab_size as u32;
        }
        let b = Tensor::from_vec(v, (1, 10), &Device::Cpu).unwrap();
        let (la, lb) = (
            model.decode(&a, None).unwrap(),
            model.decode(&b, None).unwrap(),
        );
        let early = max_abs_diff(&la.narrow(1, 0, 6).unwrap(), &lb.narrow(1, 0, 6).unwrap());
        let late = max_abs_diff(&la.narrow(1, 6, 4).unwrap(), &lb.narrow(1, 6, 4).unwrap());
        assert!(
            early < 1e-6,
            "{cfg:?}: future tokens changed the past by {early}"
        );
        assert!(late > 1e-4);
    }
    let cfg = tiny(Shape::Encoder);
    let (model, _) = build(&cfg, 8, DType::F32);
    let a = random_ids(&mut rng(9), 1, 10, cfg.vocab_size);
    let mut v = a.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    v[9] = (v[9] + 1) % cfg.vocab_size as u32;
    let b = Tensor::from_vec(v, (1, 10), &Device::Cpu).unwrap();
    let (ea, eb) = (
        model.encoder_logits(&a, None).unwrap(),
        model.encoder_logits(&b, None).unwrap(),
    );
    assert!(max_abs_diff(&ea.narrow(1, 0, 1).unwrap(), &eb.narrow(1, 0, 1).unwrap()) > 1e-5);
}

#[test]
fn generation_runs_past_the_context_by_sliding() {
    let cfg = attend::ModelConfig {
        max_len: 8,
        ..variants(Shape::Decoder).remove(6)
    };
    let (model, _) = build(&cfg, 5, DType::F32);
    let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
    let out = generate(&model, &[1, 2, 3], None, 20, &mut sampler, None, |_| Ok(())).unwrap();
    assert_eq!(out.len(), 20);
    // seq[8] fills the context; the token after it is what a fresh pass over
    // the kept half-context seq[5..9] predicts
    let mut seq = vec![1u32, 2, 3];
    seq.extend(&out);
    let kept = &seq[5..9];
    let ids = Tensor::new(kept, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let want = model
        .decode(&ids, None)
        .unwrap()
        .narrow(1, 3, 1)
        .unwrap()
        .argmax(D::Minus1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()[0];
    assert_eq!(seq[9], want);
    let long: Vec<u32> = (0..9).collect();
    assert!(generate(&model, &long, None, 1, &mut sampler, None, |_| Ok(())).is_err());
}

/// The closed form of a decoder's decode-state bytes after n tokens, f32.
fn closed_form_bytes(cfg: &attend::ModelConfig, b: usize, n: usize) -> usize {
    use attend::config::{FeatureMap, MechanismConfig as M};
    let (kv, hd) = (cfg.kv_heads(), cfg.head_dim());
    (0..cfg.n_decoder_layers)
        .map(|i| {
            4 * match cfg.layer_mechanism(false, i) {
                M::Softmax => 2 * b * kv * n * hd,
                M::Window(c) => 2 * b * kv * c.window * hd,
                M::Linear(c) => {
                    let f = match c.feature_map {
                        FeatureMap::Elu | FeatureMap::Relu => c.feature_dim,
                        FeatureMap::Taylor => 1 + c.feature_dim + c.feature_dim.pow(2),
                        FeatureMap::Performer => c.n_features,
                    };
                    b * kv * f * (hd + 1)
                }
                M::Based(c) => {
                    let f = 1 + c.feature_dim + c.feature_dim.pow(2);
                    b * (c.conv - 1) * cfg.d_model
                        + b * kv * f * (hd + 1)
                        + 2 * b * kv * c.window * hd
                }
                M::Decay(_) | M::Gla(_) | M::Delta(_) => b * kv * hd * hd,
                M::Mamba2(c) => b * (c.conv - 1) * cfg.d_model + b * kv * hd * hd,
            }
        })
        .sum()
}

#[test]
fn every_mechanism_decodes_like_full_recomputation() {
    for cfg in mechanism_variants(Shape::Decoder) {
        let (mut model, _) = build(&cfg, 1, DType::F32);
        model.kv_dtype = attend::kernels::kv::KvDType::F32;
        let ids = random_ids(&mut rng(2), 2, 13, cfg.vocab_size);
        let full = model.decode(&ids, None).unwrap();
        // prefill 5 tokens, a second prefill of 3 that continues the state,
        // then one at a time
        let mut state = model.new_state(None).unwrap();
        let mut parts = vec![
            model
                .step(&ids.narrow(1, 0, 5).unwrap(), &mut state)
                .unwrap(),
            model
                .step(&ids.narrow(1, 5, 3).unwrap(), &mut state)
                .unwrap(),
        ];
        let mut sizes = vec![];
        for t in 8..13 {
            parts.push(
                model
                    .step(&ids.narrow(1, t, 1).unwrap(), &mut state)
                    .unwrap(),
            );
            sizes.push((t + 1, state.state_bytes()));
        }
        let inc = Tensor::cat(&parts, 1).unwrap();
        let diff = max_abs_diff(&full, &inc);
        assert!(diff < 1e-4, "{}: {diff}", describe(&cfg));
        for (n, bytes) in sizes {
            assert_eq!(
                bytes,
                closed_form_bytes(&cfg, 2, n),
                "{} after {n} tokens",
                describe(&cfg)
            );
        }
    }
}

#[test]
fn every_mechanism_in_an_encoder_decoder_decodes_like_full_recomputation() {
    for cfg in mechanism_variants(Shape::EncoderDecoder) {
        let (model, memory, diff) = enc_dec_step_diff(&cfg);
        assert!(diff < 1e-4, "{}: {diff}", describe(&cfg));
        // beam search reorders every kind of state
        let one = attend::model::Memory {
            hidden: memory.hidden.narrow(0, 0, 1).unwrap(),
            padding: memory.padding.as_ref().map(|p| p.narrow(0, 0, 1).unwrap()),
        };
        let out = attend::decode::beam_search(&model, &one, 1, 2, 3, 0.6, 6);
        assert!(out.is_ok(), "{}: {:?}", describe(&cfg), out.err());
    }
}

#[test]
fn every_mechanism_decoder_is_causal() {
    for cfg in mechanism_variants(Shape::Decoder) {
        let (model, _) = build(&cfg, 8, DType::F32);
        let a = random_ids(&mut rng(9), 1, 10, cfg.vocab_size);
        let mut v = a.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        for x in &mut v[6..] {
            *x = (*x + 1) % cfg.vocab_size as u32;
        }
        let b = Tensor::from_vec(v, (1, 10), &Device::Cpu).unwrap();
        let (la, lb) = (
            model.decode(&a, None).unwrap(),
            model.decode(&b, None).unwrap(),
        );
        let early = max_abs_diff(&la.narrow(1, 0, 6).unwrap(), &lb.narrow(1, 0, 6).unwrap());
        let late = max_abs_diff(&la.narrow(1, 6, 4).unwrap(), &lb.narrow(1, 6, 4).unwrap());
        assert!(
            early < 1e-6,
            "{}: future tokens changed the past by {early}",
            describe(&cfg)
        );
        assert!(late > 1e-4, "{}", describe(&cfg));
    }
}

#[test]
fn every_bidirectional_mechanism_encoder_sees_both_ways_and_ignores_padding() {
    for cfg in mechanism_variants(Shape::Encoder) {
        let (model, _) = build(&cfg, 8, DType::F32);
        let a = random_ids(&mut rng(9), 2, 10, cfg.vocab_size);
        let pad = Tensor::new(
            &[[1f32; 10], [1., 1., 1., 1., 1., 1., 1., 0., 0., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        // other tokens at the padded positions of sequence 1
        let mut v = a.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        for x in &mut v[17..] {
            *x = (*x + 1) % cfg.vocab_size as u32;
        }
        let b = Tensor::from_vec(v.clone(), (2, 10), &Device::Cpu).unwrap();
        let (ea, eb) = (
            model.encoder_logits(&a, Some(&pad)).unwrap(),
            model.encoder_logits(&b, Some(&pad)).unwrap(),
        );
        let real = max_abs_diff(&ea.narrow(1, 0, 7).unwrap(), &eb.narrow(1, 0, 7).unwrap());
        assert!(real < 1e-6, "{}: padding leaked {real}", describe(&cfg));
        // a later token of sequence 0 (inside every window) changes the
        // first position's output
        v[2] = (v[2] + 1) % cfg.vocab_size as u32;
        let c = Tensor::from_vec(v, (2, 10), &Device::Cpu).unwrap();
        let ec = model.encoder_logits(&c, Some(&pad)).unwrap();
        let first = max_abs_diff(&eb.narrow(1, 0, 1).unwrap(), &ec.narrow(1, 0, 1).unwrap());
        // BASED's convolution is causal but its attention branches are not
        assert!(first > 1e-5, "{}: not bidirectional", describe(&cfg));
    }
}

fn describe(cfg: &attend::ModelConfig) -> String {
    let mechs: Vec<String> = if cfg.layer_mechanisms.is_empty() {
        vec![cfg.mechanism.to_string()]
    } else {
        cfg.layer_mechanisms.iter().map(|m| m.to_string()).collect()
    };
    format!(
        "[{}] position {:?} kv heads {}",
        mechs.join(" | "),
        cfg.position,
        cfg.kv_heads()
    )
}

/// A decode state holds values, not autograd graphs: were a recurrent state
/// S_t to track the op that made it, it would keep S_{t-1}, S_{t-2}, … (and
/// every step's activations) alive, and decoding would leak memory linearly
/// (it did: ~1.5 MB a step for BASED). Backward from each state tensor must
/// reach no parameter.
#[test]
fn decode_states_keep_no_autograd_graph() {
    use attend::attention::MixerState;
    for spec in [
        "softmax",
        "window:w=4",
        "linear:map=taylor,dim=4",
        "decay",
        "gla",
        "based:dim=4,w=4",
    ] {
        let cfg = attend::config::ModelConfig {
            mechanism: spec.parse().unwrap(),
            ..tiny(Shape::Decoder)
        };
        let (model, store) = build(&cfg, 7, DType::F32);
        let ids = random_ids(&mut rng(8), 1, 9, cfg.vocab_size);
        // the graph executor, where the mixers' tensors carry autograd
        let g = attend::model::Executor::Graph;
        let mut state = model.new_state(None).unwrap();
        model
            .step_on(g, &ids.narrow(1, 0, 5).unwrap(), &mut state, false)
            .unwrap();
        for t in 5..9 {
            model
                .step_on(g, &ids.narrow(1, t, 1).unwrap(), &mut state, false)
                .unwrap();
        }
        let mut held = vec![];
        for layer in &state.layers {
            match &layer.mixer {
                // the KV cache (a window's ring too) holds bytes in its KV
                // type: no graph to keep
                MixerState::Kv(c) => {
                    let held = c[0].window.map_or(9, |w| w.min(9));
                    assert!(c[0].len() == held && c[0].state_bytes() > 0)
                }
                MixerState::Window(w) => held.extend([w.k.clone(), w.v.clone()]),
                MixerState::Recurrent(r) => held.push(r.s.clone()),
                MixerState::Based(b) => held.extend([
                    b.conv.buf.clone(),
                    b.linear.s.clone(),
                    b.window.k.clone(),
                    b.window.v.clone(),
                ]),
            }
        }
        let held: Vec<Tensor> = held.into_iter().flatten().collect();
        assert!(
            !held.is_empty() || spec == "softmax" || spec.starts_with("window"),
            "{spec}: a state was kept"
        );
        for t in held {
            let grads = t.sum_all().unwrap().backward().unwrap();
            for (name, v) in store.vars() {
                assert!(
                    grads.get(v.as_tensor()).is_none(),
                    "{spec}: the decode state still depends on `{name}` through autograd"
                );
            }
        }
    }
}
