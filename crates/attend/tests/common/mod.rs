//! Helpers shared by the integration tests.
#![allow(dead_code)]

use attend::config::*;
use attend::kernels::quant::QMatrix;
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

/// The model of `cfg` from seeded weights. Its KV caches keep f32 keys and
/// values (tests compare decoding with full recomputation; a test about
/// KV types sets `kv_dtype` itself).
pub fn build(cfg: &ModelConfig, seed: u64, dtype: DType) -> (Transformer, ParamStore) {
    let store = ParamStore::new(seed, dtype, Device::Cpu);
    let mut model = Transformer::new(cfg, &store).unwrap();
    model.kv_dtype = attend::kernels::kv::KvDType::F32;
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
    // Gemma 3's block (after the others, which tests pick by index): heads
    // wider than d_model / n_heads, RMSNorm on queries and keys, sandwich
    // norms, GeGLU with tanh GELU, one KV head
    for (position, norm) in [
        (PositionKind::Rope, NormKind::Rmsnorm),
        (PositionKind::Sinusoidal, NormKind::Layernorm),
    ] {
        out.push(ModelConfig {
            position,
            norm,
            norm_position: NormPosition::Sandwich,
            ffn: FfnKind::Geglu,
            n_kv_heads: Some(1),
            head_dim: Some(8),
            qk_norm: true,
            ..tiny(shape)
        });
    }
    // structured FFN weights: low-rank (SwiGLU) and block-diagonal (GELU)
    out.push(ModelConfig {
        ffn: FfnKind::Swiglu,
        ffn_weights: FfnWeights::Lowrank { rank: 3 },
        position: PositionKind::Rope,
        ..tiny(shape)
    });
    out.push(ModelConfig {
        ffn: FfnKind::Gelu,
        ffn_weights: FfnWeights::Blockdiag { blocks: 4 },
        norm: NormKind::Rmsnorm,
        ..tiny(shape)
    });
    // a dropless mixture of 4 SwiGLU experts, 2 per token
    out.push(ModelConfig {
        ffn: FfnKind::Swiglu,
        moe: Some(attend::config::MoeConfig {
            experts: 4,
            top_k: 2,
            ..Default::default()
        }),
        position: PositionKind::Rope,
        ..tiny(shape)
    });
    out
}

/// A small Llama-shaped decoder whose projections are Q4_1 (the output
/// projection Q8_0, tied as in GGUF), from a seeded dense initialisation.
pub fn quantized_llama(interleaved: bool, seed: u64) -> Transformer {
    llama_in(interleaved, seed, GgmlDType::Q4_1, GgmlDType::Q8_0)
}

/// As `quantized_llama`, with the projections in `proj` and the tied
/// output projection in `head` (GGUF weight types, F32 included).
pub fn llama_in(interleaved: bool, seed: u64, proj: GgmlDType, head: GgmlDType) -> Transformer {
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
            store.insert_quantized(
                &name,
                QMatrix::from_qtensor(&QTensor::quantize(&t, head).unwrap()).unwrap(),
            );
            plain.insert(name, t);
        } else if t.rank() == 2 {
            store.insert_quantized(
                &name,
                QMatrix::from_qtensor(&QTensor::quantize(&t, proj).unwrap()).unwrap(),
            );
        } else {
            plain.insert(name, t);
        }
    }
    store.insert(plain).unwrap();
    Transformer::new(&cfg, &store).unwrap()
}

pub type T4 = Vec<Vec<Vec<Vec<f64>>>>;

/// Uniform(-a, a) values as nested vectors and as a (b, h, t, d) tensor.
pub fn rand4_scaled(
    r: &mut impl Rng,
    (b, h, t, d): (usize, usize, usize, usize),
    a: f64,
    dtype: DType,
) -> (T4, Tensor) {
    let v: T4 = (0..b)
        .map(|_| {
            (0..h)
                .map(|_| {
                    (0..t)
                        .map(|_| (0..d).map(|_| r.random_range(-a..a)).collect())
                        .collect()
                })
                .collect()
        })
        .collect();
    let flat: Vec<f64> = v.iter().flatten().flatten().flatten().cloned().collect();
    let t = Tensor::from_vec(flat, (b, h, t, d), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    (v, t)
}

/// A (b, h, t, d) tensor as nested vectors.
pub fn to4(t: &Tensor) -> T4 {
    let (b, h, n, d) = t.dims4().unwrap();
    let v: Vec<f64> = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    (0..b)
        .map(|i| {
            (0..h)
                .map(|j| {
                    (0..n)
                        .map(|k| v[((i * h + j) * n + k) * d..][..d].to_vec())
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// max |got - want| / max |want|: the error relative to the output's scale.
pub fn rel_err(got: &T4, want: &T4) -> f64 {
    let flat = |x: &T4| -> Vec<f64> { x.iter().flatten().flatten().flatten().cloned().collect() };
    let (g, w) = (flat(got), flat(want));
    assert_eq!(g.len(), w.len(), "shapes differ");
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-300);
    let diff = g.iter().zip(&w).fold(0f64, |m, (a, b)| {
        if a.is_nan() || b.is_nan() {
            f64::INFINITY
        } else {
            m.max((a - b).abs())
        }
    });
    diff / scale
}

/// One decoder (and encoder, where it makes sense) configuration per
/// mechanism, small enough for every test: chunks of 4 tokens, windows of 4,
/// feature dimension 4, so 13-token sequences cross several chunks.
pub fn mechanism_variants(shape: Shape) -> Vec<ModelConfig> {
    let specs: &[(&str, PositionKind, Option<usize>)] = &[
        ("window:w=4", PositionKind::Rope, None),
        ("window:w=3", PositionKind::Learned, Some(2)),
        ("linear:map=elu,dim=4,chunk=4", PositionKind::Rope, None),
        (
            "linear:map=relu,dim=6,chunk=4",
            PositionKind::Sinusoidal,
            Some(2),
        ),
        (
            "linear:map=taylor,dim=4,chunk=4",
            PositionKind::Learned,
            None,
        ),
        (
            "linear:map=performer,dim=4,m=8,chunk=4",
            PositionKind::None,
            Some(1),
        ),
        ("based:dim=4,w=4,conv=3,chunk=4", PositionKind::Rope, None),
        (
            "based:dim=4,w=3,conv=2,chunk=5",
            PositionKind::Learned,
            Some(2),
        ),
        (
            "based:dim=4,w=0,conv=3,chunk=4",
            PositionKind::Rope,
            Some(2),
        ),
        ("decay:chunk=4", PositionKind::Rope, None),
        ("decay:gamma=0.8,chunk=3", PositionKind::None, Some(2)),
        ("gla:rank=4,chunk=4", PositionKind::Rope, None),
        ("gla:rank=2,tau=4,chunk=5", PositionKind::Learned, Some(1)),
        ("deltanet:chunk=4", PositionKind::Rope, None),
        (
            "gated-deltanet:tau=4,chunk=5",
            PositionKind::Learned,
            Some(1),
        ),
    ];
    let mut out = vec![];
    for (spec, position, kv) in specs {
        let mechanism: MechanismConfig = spec.parse().unwrap();
        if shape != Shape::Decoder && !mechanism.supports_bidirectional() {
            continue;
        }
        out.push(ModelConfig {
            mechanism,
            position: *position,
            n_kv_heads: *kv,
            ..tiny(shape)
        });
    }
    // mixed stacks
    let n = match shape {
        Shape::Encoder => 2,
        Shape::Decoder => 2,
        Shape::EncoderDecoder => 4,
    };
    let mixed: Vec<&str> = match shape {
        Shape::Decoder => vec!["softmax,based:dim=4,w=4,chunk=4", "gla:chunk=4;window:w=4"],
        Shape::Encoder => vec![
            "softmax,based:dim=4,w=4,chunk=4",
            "linear:map=taylor,dim=4;window:w=4",
        ],
        Shape::EncoderDecoder => vec!["linear:dim=4,window,decay:chunk=4,based:dim=4,w=4,chunk=4"],
    };
    for spec in mixed {
        let layer_mechanisms = MechanismConfig::parse_list(spec).unwrap();
        assert_eq!(layer_mechanisms.len(), n, "{spec}");
        out.push(ModelConfig {
            layer_mechanisms,
            position: PositionKind::Rope,
            ..tiny(shape)
        });
    }
    out
}
