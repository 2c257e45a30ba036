//! The model's one forward pass on its two executors (`exec::graph`,
//! `exec::cpu`): every model shape, norm, FFN, position and token mixer
//! gives the same outputs on both from the same random weights (relative
//! error ≤ 1e-4), prefill and decode steps included; quantized weights go
//! through the same kernels on both. (On the real SmolLM2 and MiniLM files
//! both executors are also checked against PyTorch in `real_models.rs`.)

mod common;

use attend::config::{ModelConfig, Shape};
use attend::model::{Executor, Memory};
use attend::Transformer;
use candle_core::{DType, Device, Tensor};
use common::quantized_llama;
use rand::Rng;

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    rel(&a, &b)
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The model of `cfg` with f32 weights, every parameter perturbed so that
/// biases and gains are not 0 and 1.
fn perturbed(cfg: &ModelConfig, seed: u64) -> Transformer {
    let (model, store) = common::build(cfg, seed, DType::F32);
    let mut r = common::rng(seed + 100);
    for (_, v) in store.vars() {
        let t = v.as_tensor();
        let noise: Vec<f32> = (0..t.elem_count())
            .map(|_| r.random_range(-0.2f32..0.2))
            .collect();
        let noise = Tensor::from_vec(noise, t.shape(), &Device::Cpu).unwrap();
        v.set(&(t + noise).unwrap()).unwrap();
    }
    let mut model = model;
    model.kv_dtype = attend::kernels::kv::KvDType::F32;
    model
}

/// Feed a batch of 2 sequences in chunks of `lens` through decode states
/// on both executors; the largest relative difference of the logits.
fn steps_on_both(m: &Transformer, memory: Option<&Memory>, lens: &[usize], seed: u64) -> f32 {
    step_diffs(m, memory, lens, seed)
        .into_iter()
        .fold(0f32, f32::max)
}

/// Per step: the relative difference of the two executors' logits.
fn step_diffs(m: &Transformer, memory: Option<&Memory>, lens: &[usize], seed: u64) -> Vec<f32> {
    let mut r = common::rng(seed);
    let (mut sg, mut sc) = (m.new_state(memory).unwrap(), m.new_state(memory).unwrap());
    let mut diffs = vec![];
    for &len in lens {
        let x = common::random_ids(&mut r, 2, len, m.cfg.vocab_size);
        let g = m.step_on(Executor::Graph, &x, &mut sg, false).unwrap();
        let c = m.step_on(Executor::Cpu, &x, &mut sc, false).unwrap();
        assert_eq!(g.dims(), c.dims());
        diffs.push(max_rel_diff(&c, &g));
    }
    assert_eq!(sg.pos, sc.pos);
    diffs
}

/// Packed encoding of sequences of different lengths on both executors.
fn encode_on_both(m: &Transformer, seed: u64) -> f32 {
    let mut r = common::rng(seed);
    let seqs: Vec<Vec<u32>> = [5usize, 1, 13]
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| r.random_range(0..m.cfg.vocab_size as u32))
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| &s[..]).collect();
    let g = m.encode_packed_on(Executor::Graph, &refs).unwrap();
    let c = m.encode_packed_on(Executor::Cpu, &refs).unwrap();
    rel(&c, &g)
}

/// Every norm × placement × FFN × position combination and every token
/// mixer (and mixed stacks), for each model shape; with and without biases,
/// √d-scaled embeddings and an embedding norm.
fn all_variants(shape: Shape) -> Vec<ModelConfig> {
    let mut out = common::variants(shape);
    out.extend(common::mechanism_variants(shape));
    let extra: Vec<ModelConfig> = out
        .iter()
        .step_by(3)
        .map(|c| ModelConfig {
            bias: true,
            scale_embeddings: true,
            embed_norm: true,
            tie_embeddings: !c.tie_embeddings,
            ..c.clone()
        })
        .collect();
    out.extend(extra);
    out
}

#[test]
fn decoders_run_the_same_on_both_executors() {
    for (i, cfg) in all_variants(Shape::Decoder).iter().enumerate() {
        let m = perturbed(cfg, i as u64);
        // a prefill, single steps, and a second prefill over the cache
        let d = steps_on_both(&m, None, &[7, 1, 1, 3, 1], i as u64);
        assert!(d <= 1e-4, "variant {i} {cfg:?}: {d}");
    }
}

#[test]
fn encoders_run_the_same_on_both_executors() {
    for (i, cfg) in all_variants(Shape::Encoder).iter().enumerate() {
        let m = perturbed(cfg, i as u64);
        let d = encode_on_both(&m, i as u64);
        assert!(d <= 1e-4, "variant {i} {cfg:?}: {d}");
    }
}

#[test]
fn encoder_decoders_run_the_same_on_both_executors() {
    for (i, cfg) in all_variants(Shape::EncoderDecoder).iter().enumerate() {
        let m = perturbed(cfg, i as u64);
        let d = encode_on_both(&m, i as u64);
        assert!(d <= 1e-4, "encoder of variant {i} {cfg:?}: {d}");
        let mut r = common::rng(i as u64);
        let src = common::random_ids(&mut r, 2, 9, cfg.vocab_size);
        let memory = m.encode(&src, None).unwrap();
        let d = steps_on_both(&m, Some(&memory), &[4, 1, 1, 2], i as u64);
        assert!(d <= 1e-4, "decoder of variant {i} {cfg:?}: {d}");
    }
}

#[test]
fn quantized_decoders_run_the_same_on_both_executors() {
    use candle_core::quantized::GgmlDType;
    for (interleaved, seed) in [(true, 7), (false, 7), (true, 8), (false, 9)] {
        // f32 GGUF weights: a broken rotation, gain, mask or cache shows far
        // above rounding. A prefill of 37 (blocked attention, no multiple
        // of a tile), single steps, and a second prefill of 17 over a cache.
        let mut exact = common::llama_in(interleaved, seed, GgmlDType::F32, GgmlDType::F32);
        exact.kv_dtype = attend::kernels::kv::KvDType::F32;
        let d = steps_on_both(&exact, None, &[37, 1, 1, 1, 2, 1, 17], seed);
        assert!(d < 1e-5, "f32 interleaved={interleaved} seed {seed}: {d}");
        // quantized: both executors quantize the activations to 8 bits for
        // the same kernels, so they agree to f32 rounding, except where a
        // value sits on a rounding edge of that quantization and the two
        // attention forms' last-bit differences put it on either side: one
        // step of 1/127 of a block's largest value, which in this tiny
        // model moves the logits by up to ~1.4e-2 (measured: seed 7's
        // two-token step), and the steps after it read the flipped cache.
        // So: every step within 2e-2, and most at f32 rounding (a broken
        // rotation, mask or cache is off at every step, by far more)
        let mut q = quantized_llama(interleaved, seed);
        q.kv_dtype = attend::kernels::kv::KvDType::F32;
        let d = step_diffs(&q, None, &[13, 1, 1, 1, 2, 1, 1], seed);
        let exact = d.iter().filter(|&&x| x < 1e-5).count();
        assert!(
            d.iter().all(|&x| x < 2e-2) && exact >= 4,
            "q4_1 interleaved={interleaved} seed {seed}: per step {d:?}"
        );
    }
}

#[test]
fn a_decode_state_keeps_its_batch() {
    let m = quantized_llama(true, 5);
    for exec in [Executor::Cpu, Executor::Graph] {
        let mut st = m.new_state(None).unwrap();
        let x = Tensor::new(&[[1u32, 2, 3], [4, 5, 6]], &Device::Cpu).unwrap();
        let y = m.step_on(exec, &x, &mut st, false).unwrap();
        assert_eq!(y.dims(), &[2, 3, 50]);
        let y = m
            .step_on(
                exec,
                &Tensor::new(&[[7u32], [8]], &Device::Cpu).unwrap(),
                &mut st,
                true,
            )
            .unwrap();
        assert_eq!(y.dims(), &[2, 1, 50]);
        // a batch-1 state with tokens refuses to grow into a batch
        let mut st = m.new_state(None).unwrap();
        m.step_on(
            exec,
            &Tensor::new(&[[1u32]], &Device::Cpu).unwrap(),
            &mut st,
            false,
        )
        .unwrap();
        let e = m.step_on(exec, &x, &mut st, false).unwrap_err().to_string();
        assert!(
            e.contains("holds 1 sequences, the batch has 2"),
            "{exec:?}: {e}"
        );
    }
}

/// A BERT-shaped encoder (post-LayerNorm, biases, embedding norm) with every
/// parameter perturbed, so that biases and norm gains are not 0/1.
fn bert_like(d: usize, heads: usize, ffn: attend::config::FfnKind, seed: u64) -> Transformer {
    use attend::config::*;
    use rand::Rng;
    let cfg = ModelConfig {
        d_model: d,
        n_heads: heads,
        d_ff: 2 * d,
        vocab_size: 23,
        max_len: 40,
        norm: NormKind::Layernorm,
        norm_position: NormPosition::Post,
        ffn,
        bias: true,
        embed_norm: true,
        position: PositionKind::Learned,
        dropout: 0.0,
        ..common::tiny(Shape::Encoder)
    };
    let (model, store) = common::build(&cfg, seed, candle_core::DType::F32);
    let mut r = common::rng(seed);
    for (_, v) in store.vars() {
        let t = v.as_tensor();
        let noise: Vec<f32> = (0..t.elem_count())
            .map(|_| r.random_range(-0.3f32..0.3))
            .collect();
        let noise = Tensor::from_vec(noise, t.shape(), &Device::Cpu).unwrap();
        v.set(&(t + noise).unwrap()).unwrap();
    }
    model
}

#[test]
fn a_bert_encoder_packed_equals_the_padded_batch() {
    use attend::config::FfnKind;
    for (d, heads, ffn, seed) in [
        (48, 3, FfnKind::Gelu, 1),
        (32, 8, FfnKind::Gelu, 2),
        (32, 4, FfnKind::Relu, 3),
    ] {
        let model = bert_like(d, heads, ffn, seed);
        // lengths 1..=37 in one batch: packed by the CPU executor, padded to
        // 37 with a mask by the graph one
        let lens = [5usize, 1, 37, 12, 2, 20];
        let seqs: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(s, &n)| (0..n).map(|i| ((i * 7 + s * 5 + 1) % 23) as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(|s| &s[..]).collect();
        let want = model.encode_packed_on(Executor::Graph, &refs).unwrap();
        let got = model.encode_packed_on(Executor::Cpu, &refs).unwrap();
        assert_eq!(got.len(), lens.iter().sum::<usize>() * d);
        // outputs are LayerNorm-ed (unit scale): f32 summation-order noise
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst < 2e-5,
            "d {d}, heads {heads}, {ffn:?}: max |diff| {worst}"
        );
    }
}

#[test]
fn packed_encoding_handles_empty_and_bad_sequences() {
    let f = bert_like(32, 4, attend::config::FfnKind::Gelu, 4);
    for exec in [Executor::Cpu, Executor::Graph] {
        // an empty sequence contributes no rows; the others are unaffected
        let alone = f.encode_packed_on(exec, &[&[1, 2, 3]]).unwrap();
        let with_empty = f.encode_packed_on(exec, &[&[], &[1, 2, 3], &[]]).unwrap();
        assert_eq!(alone.len(), with_empty.len());
        assert!(rel(&with_empty, &alone) < 1e-6);
        assert!(f.encode_packed_on(exec, &[]).unwrap().is_empty());
        // bad input: one line, no panic
        let err = f
            .encode_packed_on(exec, &[&[1, 2, 99]])
            .unwrap_err()
            .to_string();
        assert!(err.contains("99"), "{exec:?}: {err}");
        let long = vec![1u32; 41];
        let err = f.encode_packed_on(exec, &[&long]).unwrap_err().to_string();
        assert!(err.contains("max_len 40"), "{exec:?}: {err}");
    }
}

#[test]
fn a_q8_0_cache_refuses_heads_that_are_not_whole_blocks() {
    // the test decoder's heads have 16 numbers; q8_0 stores blocks of 32
    let mut m = quantized_llama(true, 4);
    m.kv_dtype = attend::kernels::kv::KvDType::Q8_0;
    let e = m.new_state(None).unwrap_err().to_string();
    assert!(e.contains("q8_0") && e.contains("16"), "{e}");
    let x = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    // f16 and bf16 store any width
    for t in [
        attend::kernels::kv::KvDType::F16,
        attend::kernels::kv::KvDType::Bf16,
    ] {
        m.kv_dtype = t;
        let mut st = m.new_state(None).unwrap();
        assert!(m.step(&x, &mut st).is_ok());
    }
}
