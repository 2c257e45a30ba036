//! The fused decode path (`exec::decoder`) against the composed model on the
//! same quantized weights: prefill and step logits, both RoPE layouts, GQA,
//! and greedy generation. (On the real SmolLM2 file it is also checked
//! against the PyTorch reference in `real_models.rs`.)

mod common;

use attend::Transformer;
use candle_core::{Device, Tensor};
use common::quantized_llama;

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Feed `ids` in chunks of `lens` to the fused and the composed form of `m`
/// and return the largest relative difference of the logits.
fn fused_vs_composed(fused: &Transformer, ids: &[u32], lens: &[usize]) -> f32 {
    assert!(
        fused.fused.is_some(),
        "the model qualifies for the fused path"
    );
    // the composed path keeps f32 keys and values; so does the fused one here
    let mut fused = fused.clone();
    fused.kv_dtype = attend::kernels::kv::KvDType::F32;
    let mut composed = fused.clone();
    composed.fused = None;
    let (mut sf, mut sc) = (
        fused.new_state(None).unwrap(),
        composed.new_state(None).unwrap(),
    );
    let (mut at, mut worst) = (0, 0f32);
    for &len in lens {
        let x = Tensor::new(&ids[at..at + len], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let (a, b) = (
            fused.step(&x, &mut sf).unwrap(),
            composed.step(&x, &mut sc).unwrap(),
        );
        assert_eq!(a.dims(), b.dims());
        worst = worst.max(max_rel_diff(&a, &b));
        at += len;
    }
    assert!(sf.fused.is_some() && sc.fused.is_none());
    assert_eq!(sf.pos, at);
    // the fused cache holds every token's keys and values (at least)
    let kv = 2 * 2 * 2 * 16 * 4 * at; // layers · (k, v) · h_kv · hd · f32 · t
    assert!(sf.state_bytes() >= kv, "{} < {kv}", sf.state_bytes());
    worst
}

#[test]
fn fused_prefill_and_steps_equal_the_composed_model() {
    use candle_core::quantized::GgmlDType;
    let ids: Vec<u32> = (0..60).map(|i| (i * 7 + 3) % 50).collect();
    for (interleaved, seed) in [(true, 7), (false, 7), (true, 8), (false, 8), (false, 9)] {
        // f32 weights: both paths compute in f32, so a broken rotation,
        // gain, mask or cache shows far above rounding. A prefill of 37
        // (blocked attention, no multiple of a tile), single steps, and a
        // second prefill of 17 over a cache.
        let exact = common::llama_in(interleaved, seed, GgmlDType::F32, GgmlDType::F32);
        let diff = fused_vs_composed(&exact, &ids, &[37, 1, 1, 1, 2, 1, 17]);
        assert!(
            diff < 1e-5,
            "f32 interleaved={interleaved} seed {seed}: {diff}"
        );
        // quantized: both paths quantize the same activations to 8 bits, so
        // they agree to f32 rounding unless a value sits on a rounding edge
        // (then ~1%); these seeds and lengths have none
        let q = quantized_llama(interleaved, seed);
        let diff = fused_vs_composed(&q, &ids[..20], &[13, 1, 1, 1, 2, 1, 1]);
        assert!(
            diff < 1e-5,
            "q4_1 interleaved={interleaved} seed {seed}: {diff}"
        );
    }
}

#[test]
fn fused_greedy_generation_equals_composed() {
    let mut fused = quantized_llama(true, 3);
    fused.kv_dtype = attend::kernels::kv::KvDType::F32;
    let mut composed = fused.clone();
    composed.fused = None;
    let gen = |m: &Transformer| {
        let mut s = attend::decode::Sampler::new(Default::default()).unwrap();
        attend::decode::generate(m, &[1, 5, 9, 2], None, 30, &mut s, None, |_| Ok(())).unwrap()
    };
    assert_eq!(gen(&fused), gen(&composed));
}

#[test]
fn batches_fall_back_to_the_composed_path() {
    let m = quantized_llama(true, 5);
    let mut st = m.new_state(None).unwrap();
    let x = Tensor::new(&[[1u32, 2, 3], [4, 5, 6]], &Device::Cpu).unwrap();
    let y = m.step(&x, &mut st).unwrap();
    assert_eq!(y.dims(), &[2, 3, 50]);
    assert!(st.fused.is_none());
    // and a batch-1 state refuses to grow into a batch
    let mut st = m.new_state(None).unwrap();
    m.step(&Tensor::new(&[[1u32]], &Device::Cpu).unwrap(), &mut st)
        .unwrap();
    assert!(m.step(&x, &mut st).is_err());
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
fn fused_encoder_equals_the_composed_encoder_on_a_padded_batch() {
    use attend::config::FfnKind;
    use attend::exec::encoder::FusedEncoder;
    for (d, heads, ffn, seed) in [
        (48, 3, FfnKind::Gelu, 1),
        (32, 8, FfnKind::Gelu, 2),
        (32, 4, FfnKind::Relu, 3),
    ] {
        let model = bert_like(d, heads, ffn, seed);
        let fused = FusedEncoder::from_model(&model).expect("a BERT-shaped encoder qualifies");
        // lengths 1..=37 in one batch: packed by the fused path, padded to 37
        // with a mask by the composed one
        let lens = [5usize, 1, 37, 12, 2, 20];
        let t = *lens.iter().max().unwrap();
        let seqs: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(s, &n)| (0..n).map(|i| ((i * 7 + s * 5 + 1) % 23) as u32).collect())
            .collect();
        let (mut ids, mut mask) = (vec![0u32; lens.len() * t], vec![0f32; lens.len() * t]);
        for (s, q) in seqs.iter().enumerate() {
            for (i, &id) in q.iter().enumerate() {
                ids[s * t + i] = id;
                mask[s * t + i] = 1.0;
            }
        }
        let ids = Tensor::from_vec(ids, (lens.len(), t), &Device::Cpu).unwrap();
        let mask = Tensor::from_vec(mask, (lens.len(), t), &Device::Cpu).unwrap();
        let want = model.encode(&ids, Some(&mask)).unwrap().hidden;
        let refs: Vec<&[u32]> = seqs.iter().map(|s| &s[..]).collect();
        let got = fused.encode(&refs).unwrap();
        assert_eq!(got.len(), lens.iter().sum::<usize>() * d);
        let mut row = 0;
        let mut worst = 0f32;
        for (s, &n) in lens.iter().enumerate() {
            let w: Vec<f32> = want
                .get(s)
                .unwrap()
                .narrow(0, 0, n)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in got[row * d..(row + n) * d].iter().zip(&w) {
                worst = worst.max((a - b).abs());
            }
            row += n;
        }
        // outputs are LayerNorm-ed (unit scale): f32 summation-order noise
        assert!(
            worst < 2e-5,
            "d {d}, heads {heads}, {ffn:?}: max |diff| {worst}"
        );
    }
}

#[test]
fn fused_encoder_rejects_what_it_does_not_compute() {
    use attend::config::*;
    use attend::exec::encoder::FusedEncoder;
    let bert = bert_like(32, 4, FfnKind::Gelu, 4);
    let mut cfg = bert.cfg.clone();
    cfg.norm_position = NormPosition::Pre;
    let (pre, _) = common::build(&cfg, 4, candle_core::DType::F32);
    assert!(FusedEncoder::from_model(&pre).is_none(), "pre-norm");
    let mut cfg = bert.cfg.clone();
    cfg.ffn = FfnKind::Swiglu;
    let (swiglu, _) = common::build(&cfg, 4, candle_core::DType::F32);
    assert!(FusedEncoder::from_model(&swiglu).is_none(), "SwiGLU");
    let (dec, _) = common::build(&common::tiny(Shape::Decoder), 4, candle_core::DType::F32);
    assert!(FusedEncoder::from_model(&dec).is_none(), "a decoder");
    // an empty sequence contributes no rows; the others are unaffected
    let f = FusedEncoder::from_model(&bert).unwrap();
    let alone = f.encode(&[&[1, 2, 3]]).unwrap();
    let with_empty = f.encode(&[&[], &[1, 2, 3], &[]]).unwrap();
    assert_eq!(alone.len(), with_empty.len());
    let diff = alone
        .iter()
        .zip(&with_empty)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff < 1e-6, "{diff}");
    assert!(f.encode(&[]).unwrap().is_empty());
    // bad input: one line, no panic
    let err = f.encode(&[&[1, 2, 99]]).unwrap_err().to_string();
    assert!(err.contains("token id 99"), "{err}");
    let long = vec![1u32; 41];
    let err = f.encode(&[&long]).unwrap_err().to_string();
    assert!(err.contains("max_len 40"), "{err}");
}

#[test]
fn a_q8_0_cache_refuses_heads_that_are_not_whole_blocks() {
    // the test decoder's heads have 16 numbers; q8_0 stores blocks of 32
    let mut m = quantized_llama(true, 4);
    m.kv_dtype = attend::kernels::kv::KvDType::Q8_0;
    let mut st = m.new_state(None).unwrap();
    let x = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let e = m.step(&x, &mut st).unwrap_err().to_string();
    assert!(e.contains("q8_0") && e.contains("16"), "{e}");
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
