//! The fused trainer (train::fused) against candle's autograd on the same
//! model and batch: the loss and the gradient of every parameter, for each
//! kind of model it accepts; the models it refuses; and a few optimisation
//! steps through each giving the same weights.

mod common;

use attend::config::{FfnKind, NormKind, PositionKind, Shape};
use attend::tasks::Batch;
use attend::train::fused::{Fused, Workspace};
use attend::train::{batch_loss_sum, TrainConfig, Trainer};
use candle_core::{DType, Device, Tensor};
use common::*;
use rand::Rng;

/// A language-model batch of b sequences of t tokens; `sparse` scores only
/// every third position (as MQAR scores only its queries).
fn lm_batch(seed: u64, b: usize, t: usize, vocab: usize, sparse: bool) -> Batch {
    let mut r = rng(seed);
    let input = random_ids(&mut r, b, t, vocab);
    let target = random_ids(&mut r, b, t, vocab);
    let w: Vec<f32> = (0..b * t)
        .map(|i| {
            if !sparse || i % 3 == 1 {
                r.random_range(0.5f32..1.5)
            } else {
                0.0
            }
        })
        .collect();
    Batch::Lm {
        input,
        target,
        weight: Tensor::from_vec(w, (b, t), &Device::Cpu).unwrap(),
    }
}

fn vecs(batch: &Batch) -> (Vec<u32>, Vec<u32>, Vec<f32>, (usize, usize)) {
    let Batch::Lm {
        input,
        target,
        weight,
    } = batch
    else {
        unreachable!()
    };
    (
        input.flatten_all().unwrap().to_vec1().unwrap(),
        target.flatten_all().unwrap().to_vec1().unwrap(),
        weight.flatten_all().unwrap().to_vec1().unwrap(),
        input.dims2().unwrap(),
    )
}

/// Loss and gradients of `cfg` on one batch, fused against autograd.
fn check(cfg: &attend::ModelConfig, smoothing: f64, sparse: bool) {
    let (model, store) = build(cfg, 7, DType::F32);
    let plan = Fused::new(&model, &store).unwrap_or_else(|e| panic!("{cfg:?}: refused: {e}"));
    let batch = lm_batch(3, 3, 12, cfg.vocab_size, sparse);
    let total = batch.n_target_tokens().unwrap() as f64;
    // autograd (with a mixture's weighted aux and z losses)
    let autograd_loss = |batch: &Batch, total: f64| {
        let (l, stats) = attend::ffn::moe::collect(|| batch_loss_sum(&model, batch, smoothing));
        let mut loss = (l.unwrap() / total).unwrap();
        for s in stats {
            loss = (loss + (s.aux_loss * s.aux_weight).unwrap()).unwrap();
            loss = (loss + (s.z_loss * s.z_weight).unwrap()).unwrap();
        }
        loss
    };
    let loss = autograd_loss(&batch, total);
    let grads = loss.backward().unwrap();
    let want_loss = loss.to_scalar::<f32>().unwrap() as f64;
    // fused
    let params = plan.params(&store).unwrap();
    let mut got = plan.zero_grads();
    let mut ws = Workspace::default();
    let mut fused = |batch: &Batch, total: f64, grads: &mut attend::train::fused::Params| {
        let (ids, tgt, w, bt) = vecs(batch);
        plan.loss_and_grads(
            &params,
            &mut ws,
            bt,
            &ids,
            &tgt,
            &w,
            smoothing as f32,
            total as f32,
            grads,
        )
        .unwrap()
    };
    let got_loss = fused(&batch, total, &mut got);
    assert!(
        (got_loss - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0),
        "{cfg:?}: loss {got_loss} vs {want_loss}"
    );
    for (i, (name, var)) in store.vars().iter().enumerate() {
        let want: Vec<f32> = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
            None => vec![0.0; var.elem_count()],
        };
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        let err = got[i]
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 2e-4 * scale,
            "{:?} {:?}: gradient of `{name}` off by {err} (largest {scale})",
            cfg.ffn,
            cfg.position
        );
    }
    // the workspace is reused: a second call on another batch still agrees
    let batch2 = lm_batch(4, 3, 12, cfg.vocab_size, sparse);
    let total2 = batch2.n_target_tokens().unwrap() as f64;
    let want2 = autograd_loss(&batch2, total2).to_scalar::<f32>().unwrap() as f64;
    let got2 = fused(&batch2, total2, &mut plan.zero_grads());
    assert!((got2 - want2).abs() < 1e-5 * want2.abs().max(1.0));
}

#[test]
fn gradients_equal_autograd() {
    let base = attend::ModelConfig {
        n_heads: 2,
        ..tiny(Shape::Decoder)
    };
    let configs = [
        // nanoGPT's block: LayerNorm, GELU, learned positions, biases, tied
        attend::ModelConfig {
            position: PositionKind::Learned,
            ffn: FfnKind::Gelu,
            ..base.clone()
        },
        // no biases, untied, sinusoidal positions, ReLU
        attend::ModelConfig {
            bias: false,
            tie_embeddings: false,
            ..base.clone()
        },
        // Llama-like: RMSNorm, SwiGLU, grouped-query, no positions
        attend::ModelConfig {
            position: PositionKind::None,
            norm: NormKind::Rmsnorm,
            ffn: FfnKind::Swiglu,
            n_heads: 4,
            n_kv_heads: Some(2),
            bias: false,
            scale_embeddings: false,
            ..base.clone()
        },
        // GeGLU, a head width that is not d_model / heads, three layers
        attend::ModelConfig {
            position: PositionKind::Learned,
            ffn: FfnKind::Geglu,
            head_dim: Some(6),
            n_decoder_layers: 3,
            ..base.clone()
        },
        // RoPE (both layouts), sliding-window layers between full ones
        attend::ModelConfig {
            position: PositionKind::Rope,
            layer_mechanisms: vec!["window:w=5".parse().unwrap(), Default::default()],
            ..base.clone()
        },
        attend::ModelConfig {
            position: PositionKind::Rope,
            rope_interleaved: true,
            norm: NormKind::Rmsnorm,
            mechanism: "window:w=3".parse().unwrap(),
            ..base.clone()
        },
        // mixtures of experts: SwiGLU experts top-2 with biases, GELU
        // experts top-1 without; heavy aux and z weights so that their
        // gradients count
        attend::ModelConfig {
            position: PositionKind::Learned,
            ffn: FfnKind::Swiglu,
            moe: Some("experts=4,k=2,aux=0.5,z=0.1".parse().unwrap()),
            ..base.clone()
        },
        attend::ModelConfig {
            ffn: FfnKind::Gelu,
            bias: false,
            moe: Some("experts=3,k=1,aux=0.3,z=0.05".parse().unwrap()),
            ..base.clone()
        },
        // the recurrent mixers (`train::fused::mix`): RetNet's decay, GLA
        // with RoPE, DeltaNet grouped-query with RMSNorm, Gated DeltaNet
        // between softmax layers, Mamba2 with and without RoPE
        attend::ModelConfig {
            position: PositionKind::Learned,
            mechanism: "decay".parse().unwrap(),
            ..base.clone()
        },
        // Taylor linear attention (q, k narrower than the heads), grouped
        // query; the BASED stack (conv + Taylor layers between windows)
        attend::ModelConfig {
            position: PositionKind::Learned,
            n_heads: 4,
            n_kv_heads: Some(2),
            mechanism: "linear:map=taylor,dim=3".parse().unwrap(),
            ..base.clone()
        },
        attend::ModelConfig {
            position: PositionKind::Learned,
            n_decoder_layers: 3,
            layer_mechanisms: attend::config::stack_preset("based-stack:dim=6,w=4,conv=3", 3)
                .unwrap()
                .unwrap(),
            ..base.clone()
        },
        attend::ModelConfig {
            position: PositionKind::Rope,
            ffn: FfnKind::Swiglu,
            mechanism: "gla".parse().unwrap(),
            ..base.clone()
        },
        attend::ModelConfig {
            norm: NormKind::Rmsnorm,
            n_heads: 4,
            n_kv_heads: Some(2),
            bias: false,
            mechanism: "deltanet".parse().unwrap(),
            ..base.clone()
        },
        attend::ModelConfig {
            position: PositionKind::Learned,
            n_decoder_layers: 3,
            layer_mechanisms: vec![
                Default::default(),
                "gated-deltanet".parse().unwrap(),
                "window:w=4".parse().unwrap(),
            ],
            ..base.clone()
        },
        attend::ModelConfig {
            position: PositionKind::Learned,
            mechanism: "mamba2".parse().unwrap(),
            ..base.clone()
        },
        attend::ModelConfig {
            position: PositionKind::Rope,
            n_heads: 4,
            n_kv_heads: Some(2),
            tie_embeddings: false,
            mechanism: "mamba2".parse().unwrap(),
            ..base.clone()
        },
    ];
    for cfg in &configs {
        check(cfg, 0.0, false);
        check(cfg, 0.1, true);
    }
}

#[test]
fn refuses_what_it_does_not_compute() {
    let base = tiny(Shape::Decoder);
    for (cfg, why) in [
        (tiny(Shape::EncoderDecoder), "decoder-only"),
        (
            attend::ModelConfig {
                position: PositionKind::Alibi,
                ..base.clone()
            },
            "ALiBi",
        ),
        (
            attend::ModelConfig {
                dropout: 0.1,
                ..base.clone()
            },
            "dropout",
        ),
        (
            attend::ModelConfig {
                mechanism: "linear".parse().unwrap(),
                ..base.clone()
            },
            "mechanism `linear` is not one it computes",
        ),
        (
            attend::ModelConfig {
                mechanism: "based:dim=4,w=4".parse().unwrap(),
                ..base.clone()
            },
            "mechanism `based` is not one it computes",
        ),
        (
            attend::ModelConfig {
                position: PositionKind::Rope,
                mechanism: "linear:map=taylor".parse().unwrap(),
                ..base.clone()
            },
            "RoPE on Taylor",
        ),
        (
            attend::ModelConfig {
                norm_position: attend::config::NormPosition::Post,
                ..base.clone()
            },
            "pre-norm",
        ),
        (
            attend::ModelConfig {
                moe: Some("experts=4,k=2,capacity=1.0".parse().unwrap()),
                ..base.clone()
            },
            "capacity",
        ),
    ] {
        let (model, store) = build(&cfg, 1, DType::F32);
        let e = Fused::new(&model, &store).unwrap_err();
        assert!(e.contains(why), "{e}");
    }
}

/// Ten AdamW steps on the MQAR task through each trainer: the same losses
/// and weights (up to float summation order), with softmax attention and
/// with a recurrent mixer.
#[test]
fn training_steps_match_autograd() {
    for mechanism in ["softmax", "gated-deltanet"] {
        let (m, t, tr) = attend::train::presets::preset("mqar").unwrap();
        let model = attend::ModelConfig {
            d_model: 32,
            d_ff: 64,
            ffn: FfnKind::Gelu,
            mechanism: mechanism.parse().unwrap(),
            ..m
        };
        let train = TrainConfig {
            batch_size: 8,
            steps: 10,
            label_smoothing: 0.1,
            ..tr
        };
        let mut a = Trainer::new(model.clone(), t.clone(), train.clone()).unwrap();
        let mut b = Trainer::new(model, t, train).unwrap().with_fused(false);
        assert_eq!((a.executor(), b.executor()), ("fused", "autograd"));
        a.shards = 2;
        for _ in 0..10 {
            let (sa, sb) = (a.train_step().unwrap(), b.train_step().unwrap());
            assert!(
                (sa.loss - sb.loss).abs() < 1e-4 * sb.loss,
                "{mechanism}: {} vs {}",
                sa.loss,
                sb.loss
            );
            assert!((sa.grad_norm - sb.grad_norm).abs() < 1e-3 * sb.grad_norm);
        }
        for ((name, va), (_, vb)) in a.store.vars().iter().zip(b.store.vars()) {
            let d = max_abs_diff(va.as_tensor(), vb.as_tensor());
            assert!(d < 1e-3, "{mechanism}: `{name}` differs by {d}");
        }
    }
}
