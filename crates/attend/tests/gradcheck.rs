//! Finite-difference gradient check on tiny f64 models: autograd's gradient
//! of the loss for a sample of every parameter's entries matches
//! (L(θ+h) - L(θ-h)) / 2h. Also: every parameter receives a gradient.

mod common;

use attend::config::{FfnKind, NormKind, NormPosition, PositionKind, Shape};
use attend::train::cross_entropy;
use candle_core::{DType, Device, Tensor};
use common::*;
use rand::Rng;

fn loss_of(
    model: &attend::Transformer,
    cfg: &attend::ModelConfig,
    src: &Tensor,
    pad: &Tensor,
    tgt: &Tensor,
    out: &Tensor,
    w: &Tensor,
) -> Tensor {
    let logits = if cfg.shape == Shape::EncoderDecoder {
        let m = model.encode(src, Some(pad)).unwrap();
        model.decode(tgt, Some(&m)).unwrap()
    } else {
        model.decode(tgt, None).unwrap()
    };
    cross_entropy(&logits, out, w, 0.1).unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    let configs = [
        attend::ModelConfig {
            position: PositionKind::Sinusoidal,
            norm_position: NormPosition::Post,
            ..tiny(Shape::EncoderDecoder)
        },
        attend::ModelConfig {
            position: PositionKind::Rope,
            norm: NormKind::Rmsnorm,
            ffn: FfnKind::Swiglu,
            n_kv_heads: Some(2),
            tie_embeddings: false,
            ..tiny(Shape::Decoder)
        },
        attend::ModelConfig {
            position: PositionKind::Alibi,
            ffn: FfnKind::Gelu,
            n_kv_heads: Some(1),
            ..tiny(Shape::Decoder)
        },
        attend::ModelConfig {
            position: PositionKind::Learned,
            ..tiny(Shape::Decoder)
        },
        attend::ModelConfig {
            ffn: FfnKind::Swiglu,
            ffn_weights: attend::config::FfnWeights::Lowrank { rank: 3 },
            ..tiny(Shape::Decoder)
        },
        attend::ModelConfig {
            ffn_weights: attend::config::FfnWeights::Blockdiag { blocks: 4 },
            ..tiny(Shape::EncoderDecoder)
        },
    ];
    check_configs(configs.to_vec());
}

/// The attention zoo: every mechanism's parameters (projections, BASED's
/// convolution and window projections, GLA's gate, the delta rule's β and
/// α) get the gradient finite
/// differences give, through the chunked forms (chunks of 2-3 tokens, so the
/// 4-token targets cross chunk boundaries).
#[test]
fn mechanism_gradients_match_finite_differences() {
    let mech = |spec: &str, position: PositionKind| attend::ModelConfig {
        mechanism: spec.parse().unwrap(),
        position,
        ..tiny(Shape::Decoder)
    };
    let configs = vec![
        mech("linear:map=taylor,dim=4,chunk=3", PositionKind::Rope),
        mech("linear:map=elu,dim=2,chunk=2", PositionKind::Learned),
        mech("linear:map=performer,dim=4,m=6,chunk=3", PositionKind::None),
        mech("gla:rank=2,chunk=3", PositionKind::Rope),
        mech("gla:rank=3,tau=2,chunk=2", PositionKind::Learned),
        mech("decay:chunk=3", PositionKind::Rope),
        mech("deltanet:chunk=3", PositionKind::Rope),
        mech("gated-deltanet:tau=2,chunk=2", PositionKind::Learned),
        mech("mamba2:conv=3,chunk=3", PositionKind::None),
        mech("window:w=2", PositionKind::Rope),
        mech("based:dim=2,w=2,conv=3,chunk=3", PositionKind::Rope),
        mech("based:dim=2,w=0,conv=3,chunk=3", PositionKind::Rope),
        attend::ModelConfig {
            layer_mechanisms: attend::config::MechanismConfig::parse_list(
                "linear:map=taylor,dim=2,chunk=2,based:dim=2,w=2,chunk=2,gla:rank=2,chunk=3,window:w=2",
            )
            .unwrap(),
            position: PositionKind::Rope,
            ..tiny(Shape::EncoderDecoder)
        },
    ];
    check_configs(configs);
}

fn check_configs(configs: Vec<attend::ModelConfig>) {
    for cfg in configs {
        let cfg = attend::ModelConfig {
            d_model: 8,
            d_ff: 12,
            n_heads: 2,
            n_kv_heads: cfg.n_kv_heads.map(|k| k.min(2)),
            ..cfg
        };
        let (model, store) = build(&cfg, 11, DType::F64);
        let mut r = rng(12);
        let src = random_ids(&mut r, 2, 5, cfg.vocab_size);
        let pad = Tensor::new(
            &[[1f64, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        let tgt = random_ids(&mut r, 2, 4, cfg.vocab_size);
        let out = random_ids(&mut r, 2, 4, cfg.vocab_size);
        let w = Tensor::new(&[[1f64, 1., 1., 1.], [1., 1., 0., 0.]], &Device::Cpu).unwrap();
        let loss = loss_of(&model, &cfg, &src, &pad, &tgt, &out, &w);
        let grads = loss.backward().unwrap();
        let h = 1e-5;
        for (name, var) in store.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient"));
            let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                g.iter().any(|x| x.abs() > 0.0),
                "{name}: gradient is all zero"
            );
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for _ in 0..3 {
                let i = r.random_range(0..base.len());
                let at = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss_of(&model, &cfg, &src, &pad, &tgt, &out, &w)
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let err = (fd - g[i]).abs() / (fd.abs() + g[i].abs()).max(1e-6);
                assert!(
                    err < 1e-5 || (fd - g[i]).abs() < 1e-9,
                    "{cfg:?} {name}[{i}]: autograd {} vs finite difference {fd}",
                    g[i]
                );
            }
        }
    }
}
