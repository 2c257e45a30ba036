//! Helpers shared by the integration tests.
#![allow(dead_code)]

use attend::config::*;
use attend::nn::ParamStore;
use attend::Transformer;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
