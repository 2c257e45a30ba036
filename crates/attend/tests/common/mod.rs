//! Helpers shared by the integration tests.
#![allow(dead_code)]

use attend::config::*;
use attend::nn::ParamStore;
use attend::Transformer;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

pub fn tiny(shape: Shape) -> ModelConfig {
    let (enc, dec) = match shape {
        Shape::Encoder => (2, 0),
        Shape::Decoder => (0, 2),
        Shape::EncoderDecoder => (2, 2),
    };
    ModelConfig {
        shape,
        d_model: 16,
        n_encoder_layers: enc,
        n_decoder_layers: dec,
        n_heads: 4,
        n_kv_heads: None,
        d_ff: 32,
        vocab_size: 11,
        max_len: 32,
        ..ModelConfig::default()
    }
}

pub fn build(cfg: &ModelConfig, seed: u64, dtype: DType) -> (Transformer, ParamStore) {
    let store = ParamStore::new(seed, dtype, Device::Cpu);
    let model = Transformer::new(cfg, &store).unwrap();
    (model, store)
}

pub fn random_ids(rng: &mut ChaCha8Rng, b: usize, t: usize, vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..b * t)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Every combination of the settings that change the forward pass.
pub fn variants(shape: Shape) -> Vec<ModelConfig> {
    let mut out = vec![];
    for position in [
        PositionKind::Sinusoidal,
        PositionKind::Learned,
        PositionKind::Rope,
        PositionKind::Alibi,
        PositionKind::None,
    ] {
        for (norm, norm_position, ffn, kv) in [
            (NormKind::Layernorm, NormPosition::Pre, FfnKind::Relu, None),
            (
                NormKind::Rmsnorm,
                NormPosition::Post,
                FfnKind::Swiglu,
                Some(2),
            ),
            (
                NormKind::Layernorm,
                NormPosition::Post,
                FfnKind::Gelu,
                Some(1),
            ),
        ] {
            out.push(ModelConfig {
                position,
                norm,
                norm_position,
                ffn,
                n_kv_heads: kv,
                ..tiny(shape)
            });
        }
    }
    out
}

/// A small Llama-shaped decoder whose projections are Q4_1 (the output
/// projection Q8_0, tied as in GGUF), from a seeded dense initialisation.
pub fn quantized_llama(interleaved: bool, seed: u64) -> Transformer {
    let cfg = ModelConfig {
        shape: Shape::Decoder,
        d_model: 64,
        n_decoder_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        d_ff: 96,
        vocab_size: 50,
        max_len: 64,
        position: PositionKind::Rope,
        rope_interleaved: interleaved,
        ffn: FfnKind::Swiglu,
        norm: NormKind::Rmsnorm,
        norm_position: NormPosition::Pre,
        bias: false,
        scale_embeddings: false,
        tie_embeddings: true,
        ..ModelConfig::default()
    };
    let (_, dense) = build(&cfg, seed, DType::F32);
    let store = ParamStore::new(seed, DType::F32, Device::Cpu);
    let mut plain = BTreeMap::new();
    for (name, var) in dense.vars() {
        let t = var.as_tensor().clone();
        // norms get non-trivial gains, so a missed gain shows
        let t = if name.contains("ln_") || name.contains("norm") {
            let n = t.elem_count();
            let g: Vec<f32> = (0..n)
                .map(|i| 1.0 + 0.3 * ((i * 7 + 1) as f32).sin())
                .collect();
            let g = Tensor::from_vec(g, t.shape(), &Device::Cpu).unwrap();
            (t * g).unwrap()
        } else {
            t
        };
        if name == "embed.weight" {
            store.insert_quantized(&name, QTensor::quantize(&t, GgmlDType::Q8_0).unwrap());
            plain.insert(name, t);
        } else if t.rank() == 2 {
            store.insert_quantized(&name, QTensor::quantize(&t, GgmlDType::Q4_1).unwrap());
        } else {
            plain.insert(name, t);
        }
    }
    store.insert(plain).unwrap();
    Transformer::new(&cfg, &store).unwrap()
}
