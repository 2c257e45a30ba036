//! Channel mixers other than the dense FFN (issue 17): low-rank and
//! block-diagonal weights against the dense matrices they stand for, as
//! layers and as whole models. (Both executors and the decode path run them
//! through `common::variants`; their gradients are checked by finite
//! differences in gradcheck.rs.)

mod common;

use attend::config::{FfnKind, FfnWeights, Shape};
use attend::nn::{Linear, ParamStore};
use candle_core::{DType, Device, Tensor};
use common::*;
use std::collections::BTreeMap;

fn random(shape: (usize, usize), seed: u64) -> Tensor {
    let mut r = rng(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rand::Rng::random_range(&mut r, -1.0f32..1.0))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// y = x Wᵀ + b with W the weight's dense matrix, for both structures; and
/// the parameters each holds.
#[test]
fn structured_linears_equal_their_dense_matrices() {
    let (d_in, d_out) = (16, 24);
    for (kind, params) in [
        (FfnWeights::Lowrank { rank: 3 }, 3 * (16 + 24)),
        (FfnWeights::Blockdiag { blocks: 4 }, 16 * 24 / 4),
    ] {
        let store = ParamStore::new(5, DType::F32, Device::Cpu);
        let lin = Linear::structured(&store.builder().pp("l"), d_in, d_out, true, kind).unwrap();
        // a non-zero bias, so that it is checked too
        let b = random((1, d_out), 9).squeeze(0).unwrap();
        let lin = Linear {
            b: Some(b.clone()),
            ..lin
        };
        assert_eq!(lin.w.dims().unwrap(), (d_out, d_in));
        assert_eq!(lin.w.bytes(), params * 4, "{kind:?}");
        let x = random((7, d_in), 1);
        let dense = lin.w.to_dense().unwrap().unwrap();
        assert_eq!(dense.dims(), [d_out, d_in]);
        let want = x
            .matmul(&dense.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let got = lin.forward(&x).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5, "{kind:?}");
        if let FfnWeights::Blockdiag { blocks } = kind {
            // off the diagonal blocks the dense matrix is zero
            let m = dense.to_vec2::<f32>().unwrap();
            let (bo, bi) = (d_out / blocks, d_in / blocks);
            for (r, row) in m.iter().enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    if r / bo != c / bi {
                        assert_eq!(v, 0.0, "({r}, {c})");
                    }
                }
            }
        }
    }
}

/// A model with structured FFN weights gives the logits of the dense model
/// whose FFN matrices are their products (the same store otherwise), on the
/// graph executor and decoding step by step on the CPU executor.
#[test]
fn structured_models_equal_dense_models_with_the_same_matrices() {
    for (ffn, kind) in [
        (FfnKind::Swiglu, FfnWeights::Lowrank { rank: 3 }),
        (FfnKind::Gelu, FfnWeights::Blockdiag { blocks: 4 }),
    ] {
        let cfg = attend::ModelConfig {
            ffn,
            ffn_weights: kind,
            ..tiny(Shape::Decoder)
        };
        let (model, store) = build(&cfg, 3, DType::F32);
        // the dense model's tensors: the same, FFN matrices multiplied out
        let mut tensors: BTreeMap<String, Tensor> = store
            .vars()
            .into_iter()
            .filter(|(n, _)| !n.contains(".ffn.w"))
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        for (i, block) in model.decoder.iter().enumerate() {
            let f = &block.ffn;
            for (name, l) in [
                ("w1", Some(&f.w1)),
                ("w2", Some(&f.w2)),
                ("w3", f.w3.as_ref()),
            ] {
                let Some(l) = l else { continue };
                let p = format!("decoder.{i}.ffn.{name}");
                tensors.insert(format!("{p}.weight"), l.w.to_dense().unwrap().unwrap());
                if let Some(b) = &l.b {
                    tensors.insert(format!("{p}.bias"), b.clone());
                }
            }
        }
        let dense_store = ParamStore::strict(DType::F32, Device::Cpu);
        dense_store.insert(tensors).unwrap();
        let dense_cfg = attend::ModelConfig {
            ffn_weights: FfnWeights::Dense,
            ..cfg.clone()
        };
        let dense = attend::Transformer::new(&dense_cfg, &dense_store).unwrap();
        let ids = random_ids(&mut rng(4), 2, 9, cfg.vocab_size);
        let (a, b) = (
            model.decode(&ids, None).unwrap(),
            dense.decode(&ids, None).unwrap(),
        );
        assert!(
            max_abs_diff(&a, &b) < 1e-4,
            "{kind:?}: {}",
            max_abs_diff(&a, &b)
        );
        // decoding step by step (the CPU executor) against the dense model's full pass
        let mut state = model.new_state(None).unwrap();
        for t in 0..9 {
            let id = ids.narrow(0, 0, 1).unwrap().narrow(1, t, 1).unwrap();
            let step = model.step(&id, &mut state).unwrap();
            let want = b.narrow(0, 0, 1).unwrap().narrow(1, t, 1).unwrap();
            let got = step.reshape(want.dims()).unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-4, "{kind:?} step {t}");
        }
    }
}
