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

// ------------------------------------------------------ mixture of experts

mod moe {
    use attend::config::{FfnKind, ModelConfig, MoeConfig};
    use attend::exec::graph::Graph;
    use attend::ffn::moe::{assign, collect, MoeStats, Routing};
    use attend::ffn::Ffn;
    use attend::nn::ParamStore;
    use candle_core::{DType, Device, Tensor, Var};

    fn model(ffn: FfnKind, r: Routing) -> ModelConfig {
        ModelConfig {
            d_model: 8,
            d_ff: 12,
            ffn,
            bias: true,
            moe: Some(MoeConfig {
                experts: r.experts,
                top_k: r.top_k,
                capacity_factor: r.capacity_factor,
                ..MoeConfig::default()
            }),
            ..ModelConfig::default()
        }
    }

    fn input(n: usize, d: usize, seed: u64) -> Tensor {
        let mut r = super::rng(seed);
        let v: Vec<f64> = (0..n * d)
            .map(|_| rand::Rng::random_range(&mut r, -1.0..1.0))
            .collect();
        Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
    }

    fn layer(ffn: FfnKind, routing: Routing, seed: u64) -> (ParamStore, Ffn) {
        let store = ParamStore::new(seed, DType::F64, Device::Cpu);
        let f = Ffn::new(&store.builder().pp("ffn"), &model(ffn, routing)).unwrap();
        (store, f)
    }

    /// The layer's output and its one MoE layer's stats.
    fn run(f: &Ffn, x: &Tensor) -> (Tensor, MoeStats) {
        let moe = f.moe.as_ref().unwrap();
        let (y, mut stats) = collect(|| moe.forward(f, x, None).unwrap());
        assert_eq!(stats.len(), 1);
        (y, stats.pop().unwrap())
    }

    fn rows(t: &Tensor) -> Vec<Vec<f64>> {
        t.to_vec2().unwrap()
    }

    fn diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// One expert and k = 1: the gate is 1 and the layer is that FFN.
    #[test]
    fn one_expert_top_1_is_the_dense_ffn() {
        for ffn in [FfnKind::Relu, FfnKind::Swiglu] {
            let r = Routing {
                experts: 1,
                top_k: 1,
                capacity_factor: None,
            };
            let (_s, f) = layer(ffn, r, 1);
            let x = input(10, 8, 2);
            let (y, stats) = run(&f, &x);
            let dense = f.moe.as_ref().unwrap().expert(&f, 0).unwrap();
            assert!(dense.moe.is_none());
            assert!(
                diff(&y, &dense.dense(&Graph, &x).unwrap()) < 1e-12,
                "{ffn:?}"
            );
            // one expert takes everything: f = P = 1, L_aux = 1
            let aux = stats.aux_loss.to_scalar::<f64>().unwrap();
            assert!((aux - 1.0).abs() < 1e-12, "{aux}");
        }
    }

    /// The layer against a per-token loop: each token's logits by hand, its
    /// top k, the softmax of those k, and each chosen expert on that token
    /// alone; with a capacity, slots beyond an expert's first ⌈c·k·n/E⌉
    /// tokens (in token order) add nothing.
    #[test]
    fn top_k_routing_equals_a_per_token_loop() {
        let (n, d) = (23, 8);
        for (experts, top_k, capacity_factor) in [
            (4, 1, None),
            (4, 2, None),
            (5, 3, None),
            (4, 2, Some(0.6)),
            (3, 1, Some(1.0)),
        ] {
            let r = Routing {
                experts,
                top_k,
                capacity_factor,
            };
            let (_s, f) = layer(FfnKind::Swiglu, r, 3);
            let moe = f.moe.as_ref().unwrap();
            let x = input(n, d, 4);
            let (y, stats) = run(&f, &x);
            let w = rows(&moe.router.w.to_dense().unwrap().unwrap()); // (E, d)
            let cap =
                capacity_factor.map(|c| (c * (top_k * n) as f64 / experts as f64).ceil() as usize);
            let mut load = vec![0usize; experts];
            let mut want = vec![];
            for (i, xi) in rows(&x).iter().enumerate() {
                let l: Vec<f64> = w
                    .iter()
                    .map(|we| we.iter().zip(xi).map(|(a, b)| a * b).sum())
                    .collect();
                let mut order: Vec<usize> = (0..experts).collect();
                order.sort_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap());
                let top = &order[..top_k];
                let mx = top.iter().map(|&e| l[e]).fold(f64::MIN, f64::max);
                let z: f64 = top.iter().map(|&e| (l[e] - mx).exp()).sum();
                let mut yi = vec![0.0; d];
                for &e in top {
                    if cap.is_some_and(|c| load[e] >= c) {
                        continue;
                    }
                    load[e] += 1;
                    let g = (l[e] - mx).exp() / z;
                    let expert = moe.expert(&f, e).unwrap();
                    let h = expert.dense(&Graph, &x.narrow(0, i, 1).unwrap()).unwrap();
                    for (a, b) in yi.iter_mut().zip(&rows(&h)[0]) {
                        *a += g * b;
                    }
                }
                want.push(yi);
            }
            let want = Tensor::new(want, &Device::Cpu).unwrap();
            let case = format!("E {experts}, k {top_k}, capacity {capacity_factor:?}");
            assert!(diff(&y, &want) < 1e-12, "{case}");
            assert_eq!(stats.assignment.load, load, "{case}");
            if capacity_factor == Some(0.6) {
                assert!(
                    stats.assignment.dropped > 0,
                    "{case}: the capacity should bind"
                );
            }
        }
    }

    /// Padded rows of a (b, t, d) input are neither routed nor counted and
    /// come out zero; the others as without padding.
    #[test]
    fn padded_rows_are_not_routed() {
        let r = Routing {
            experts: 3,
            top_k: 2,
            capacity_factor: None,
        };
        let (_s, f) = layer(FfnKind::Gelu, r, 11);
        let moe = f.moe.as_ref().unwrap();
        let x = input(10, 8, 12).reshape((2, 5, 8)).unwrap();
        let pad = Tensor::new(
            &[[1f32, 1., 1., 0., 0.], [1., 1., 1., 1., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        let (y, stats) = collect(|| moe.forward(&f, &x, Some(&pad)).unwrap());
        let (full, _) = collect(|| moe.forward(&f, &x, None).unwrap());
        let total: usize = stats[0].assignment.load.iter().sum();
        assert_eq!(total, 7 * 2);
        for (bi, ti, padded) in [(0, 0, false), (0, 3, true), (1, 3, false), (1, 4, true)] {
            let row = |t: &Tensor| t.get(bi).unwrap().get(ti).unwrap();
            let got = row(&y);
            let want = if padded {
                got.zeros_like().unwrap()
            } else {
                row(&full)
            };
            let d = diff(&got, &want);
            assert!(d < 1e-12, "({bi}, {ti}): {d}");
        }
    }

    /// L_aux = E Σ f_e P_e and L_z = mean (log Σ e^l)², from the logits by hand.
    #[test]
    fn auxiliary_losses_follow_their_formulas() {
        let (n, experts, top_k) = (17, 4, 2);
        let r = Routing {
            experts,
            top_k,
            capacity_factor: None,
        };
        let (_s, f) = layer(FfnKind::Gelu, r, 5);
        let x = input(n, 8, 6);
        let (_, stats) = run(&f, &x);
        let logits = rows(&f.moe.as_ref().unwrap().router.forward(&x).unwrap());
        let (mut fr, mut p, mut z) = (vec![0.0; experts], vec![0.0; experts], 0.0);
        for l in &logits {
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap());
            for &e in &order[..top_k] {
                fr[e] += 1.0 / (top_k * n) as f64;
            }
            let s: f64 = l.iter().map(|v| v.exp()).sum();
            for (pe, v) in p.iter_mut().zip(l) {
                *pe += v.exp() / s / n as f64;
            }
            z += s.ln().powi(2) / n as f64;
        }
        let aux: f64 = experts as f64 * fr.iter().zip(&p).map(|(a, b)| a * b).sum::<f64>();
        let got = stats.aux_loss.to_scalar::<f64>().unwrap();
        assert!((got - aux).abs() < 1e-12, "{got} vs {aux}");
        let got = stats.z_loss.to_scalar::<f64>().unwrap();
        assert!((got - z).abs() < 1e-12, "{got} vs {z}");
        // the assignment helper agrees with the sort above on the loads
        let host: Vec<Vec<f32>> = logits
            .iter()
            .map(|l| l.iter().map(|&v| v as f32).collect())
            .collect();
        let a = assign(&host, &r);
        let want: Vec<usize> = fr
            .iter()
            .map(|v| (v * (top_k * n) as f64).round() as usize)
            .collect();
        assert_eq!(a.load, want);
    }

    /// Gradients of y·w + L_aux + L_z with respect to the input, the router
    /// and every expert weight, against central differences (the routing
    /// does not change under steps this small).
    #[test]
    fn grouped_expert_gradients_match_finite_differences() {
        let r = Routing {
            experts: 3,
            top_k: 2,
            capacity_factor: None,
        };
        let (store, f) = layer(FfnKind::Swiglu, r, 7);
        let x = Var::from_tensor(&input(9, 8, 8)).unwrap();
        let w = input(9, 8, 9);
        let loss = |x: &Tensor| -> Tensor {
            let (y, s) = run(&f, x);
            ((y * &w).unwrap().sum_all().unwrap() + s.aux_loss + s.z_loss).unwrap()
        };
        let grads = loss(x.as_tensor()).backward().unwrap();
        let eps = 1e-6;
        let mut checked = 0;
        for (name, var) in store.vars() {
            let g = grads
                .get(var.as_tensor())
                .expect(&name)
                .flatten_all()
                .unwrap();
            let g: Vec<f64> = g.to_vec1().unwrap();
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for i in (0..base.len()).step_by(5) {
                let at = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    let l = loss(x.as_tensor()).to_scalar::<f64>().unwrap();
                    var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    l
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                assert!(
                    (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "{name}[{i}]: {} vs {fd}",
                    g[i]
                );
                checked += 1;
            }
        }
        assert!(checked > 50, "{checked}");
        let gx: Vec<f64> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in (0..base.len()).step_by(7) {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                loss(&Tensor::from_vec(v, (9, 8), &Device::Cpu).unwrap())
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (fd - gx[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "x[{i}]: {} vs {fd}",
                gx[i]
            );
        }
    }

    #[test]
    fn bad_routing_is_refused_naming_the_field() {
        for (experts, top_k, c) in [(0, 1, None), (4, 0, None), (2, 3, None), (4, 2, Some(0.0))] {
            let r = Routing {
                experts,
                top_k,
                capacity_factor: c,
            };
            let e = model(FfnKind::Relu, r).validate().unwrap_err();
            assert!(e.to_string().contains("moe"), "{e}");
        }
        let mut bad = model(
            FfnKind::Relu,
            Routing {
                experts: 2,
                top_k: 1,
                capacity_factor: None,
            },
        );
        bad.ffn_weights = attend::config::FfnWeights::Lowrank { rank: 2 };
        assert!(bad.validate().unwrap_err().to_string().contains("moe"));
        for (spec, field) in [
            ("experts=4,k=x", "`k`"),
            ("experts=4,foo=1", "`foo`"),
            ("4", "key=value"),
        ] {
            let e = spec.parse::<MoeConfig>().unwrap_err();
            assert!(e.contains(field), "{spec}: {e}");
        }
    }
}

/// Sparse upcycling: every expert a copy of its block's FFN, so before any
/// further training the mixture computes the dense model's logits (the
/// gates of a token sum to 1 over identical experts); a second upcycle of
/// an MoE checkpoint is refused.
#[test]
fn upcycled_moe_equals_the_dense_model_before_training() {
    use attend::config::{FfnKind, ModelConfig, MoeConfig, PositionKind};
    use attend::tasks::{MqarConfig, TaskConfig};
    use attend::train::{upcycle, TrainConfig, Trainer};
    let dir = std::env::temp_dir().join(format!("attend-test-upcycle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for ffn in [FfnKind::Swiglu, FfnKind::Gelu] {
        let m = ModelConfig {
            d_model: 16,
            n_heads: 2,
            d_ff: 24,
            vocab_size: 16,
            max_len: 16,
            ffn,
            position: PositionKind::Learned,
            ..ModelConfig::default()
        };
        let t = TaskConfig::Mqar(MqarConfig {
            vocab: 16,
            seq_len: 16,
            n_pairs: 2,
            power_a: 0.01,
            train_mix: vec![],
            curriculum: None,
        });
        let c = TrainConfig {
            steps: 5,
            batch_size: 4,
            n_eval: 8,
            ..TrainConfig::default()
        };
        let mut dense = Trainer::new(m, t, c).unwrap();
        for _ in 0..5 {
            dense.train_step().unwrap();
        }
        dense.save(&dir, serde_json::json!({})).unwrap();
        let moe = MoeConfig {
            experts: 3,
            top_k: 2,
            ..MoeConfig::default()
        };
        let up = upcycle(&dir, moe, Some(7)).unwrap();
        assert_eq!(up.step, 0);
        assert_eq!(up.train_cfg.steps, 7);
        assert_eq!(up.model_cfg.moe, Some(moe));
        let ids = Tensor::new(
            &[[1u32, 5, 2, 7, 3, 9, 1, 4], [2, 2, 8, 1, 6, 3, 5, 0]],
            &Device::Cpu,
        )
        .unwrap();
        let logits = |tr: &Trainer| {
            let h = tr.model.decode_hidden(&ids, None).unwrap();
            tr.model.logits(&h).unwrap()
        };
        let (a, b) = (logits(&dense), logits(&up));
        let d = max_abs_diff(&a, &b);
        assert!(d < 1e-5, "{ffn:?}: upcycled logits differ by {d}");
        // and the mixture has E times the FFN parameters plus a router
        let ffn_params = |tr: &Trainer| -> usize {
            tr.store
                .vars()
                .iter()
                .filter(|(n, _)| n.contains(".ffn."))
                .map(|(_, v)| v.elem_count())
                .sum()
        };
        let routers = 2 * 16 * 3;
        assert_eq!(ffn_params(&up), 3 * ffn_params(&dense) + routers);
        // an MoE checkpoint is not upcycled again
        up.save(&dir, serde_json::json!({})).unwrap();
        let e = upcycle(&dir, moe, None).err().expect("refused");
        assert!(
            e.to_string().contains("already a mixture of experts"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// MatFormer: the nested FFN of width m equals a dense FFN built from the
/// first m hidden units (w1's and w3's first m rows, w2's first m columns),
/// for gated and plain FFNs with biases.
#[test]
fn nested_widths_equal_dense_ffns_of_their_first_units() {
    use attend::config::{FfnKind, ModelConfig};
    use attend::exec::graph::Graph;
    use attend::ffn::Ffn;
    let dev = Device::Cpu;
    for kind in [FfnKind::Swiglu, FfnKind::Gelu] {
        let cfg = |f: usize| ModelConfig {
            d_model: 8,
            d_ff: f,
            ffn: kind,
            bias: true,
            ..ModelConfig::default()
        };
        let big_store = ParamStore::new(3, DType::F32, dev.clone());
        let big = Ffn::new(&big_store.builder().pp("ffn"), &cfg(16)).unwrap();
        // non-zero biases, so that their slices are checked too
        for (name, var) in big_store.vars() {
            if name.ends_with("bias") {
                let n = var.elem_count();
                var.set(&random((1, n), 7).squeeze(0).unwrap()).unwrap();
            }
        }
        let params: BTreeMap<String, Tensor> = big_store
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        let x = random((5, 8), 11);
        for m in [16, 8, 4, 1] {
            let small_store = ParamStore::new(0, DType::F32, dev.clone());
            let small = Ffn::new(&small_store.builder().pp("ffn"), &cfg(m)).unwrap();
            for (name, var) in small_store.vars() {
                let t = &params[&name];
                let t = if name == "ffn.w2.weight" {
                    t.narrow(1, 0, m).unwrap()
                } else if name == "ffn.w2.bias" {
                    t.clone()
                } else {
                    t.narrow(0, 0, m).unwrap()
                };
                var.set(&t.contiguous().unwrap()).unwrap();
            }
            let want = small.dense(&Graph, &x).unwrap();
            let got = big.nested(m).unwrap().dense(&Graph, &x).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-6, "{kind:?} m={m}: {d}");
        }
    }
}

/// `extract` round-trips: a trained MatFormer model's submodel, one width
/// for every block or one per block (Mix'n'Match), as a standalone model
/// gives the logits the nested model gives at those widths — and fewer
/// parameters; widths that do not fit are refused naming the field.
#[test]
fn extracted_submodels_equal_the_nested_model_at_their_widths() {
    use attend::config::{FfnKind, ModelConfig, PositionKind};
    use attend::ffn::with_widths;
    use attend::tasks::{MqarConfig, TaskConfig};
    use attend::train::{extract, TrainConfig, Trainer};
    let dir = std::env::temp_dir().join(format!("attend-test-extract-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let m = ModelConfig {
        d_model: 16,
        n_heads: 2,
        n_decoder_layers: 3,
        d_ff: 32,
        matformer: vec![32, 16, 8],
        vocab_size: 16,
        max_len: 16,
        ffn: FfnKind::Swiglu,
        position: PositionKind::Learned,
        ..ModelConfig::default()
    };
    let t = TaskConfig::Mqar(MqarConfig {
        vocab: 16,
        seq_len: 16,
        n_pairs: 2,
        power_a: 0.01,
        train_mix: vec![],
        curriculum: None,
    });
    let c = TrainConfig {
        steps: 6,
        batch_size: 4,
        n_eval: 8,
        ..TrainConfig::default()
    };
    let mut full = Trainer::new(m, t, c).unwrap();
    for _ in 0..6 {
        full.train_step().unwrap();
    }
    full.save(&dir, serde_json::json!({})).unwrap();
    let ids = Tensor::new(
        &[[1u32, 5, 2, 7, 3, 9, 1, 4], [2, 2, 8, 1, 6, 3, 5, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let logits = |tr: &Trainer| {
        let h = tr.model.decode_hidden(&ids, None).unwrap();
        tr.model.logits(&h).unwrap()
    };
    for widths in [vec![16], vec![8], vec![8, 32, 16]] {
        let sub = extract(&dir, &widths).unwrap();
        let want = with_widths(&widths, || logits(&full));
        let d = max_abs_diff(&logits(&sub), &want);
        assert!(d < 1e-5, "{widths:?}: {d}");
        assert!(sub.model_cfg.matformer.is_empty());
        if widths.len() == 1 {
            assert_eq!(sub.model_cfg.d_ff, widths[0]);
        } else {
            assert_eq!(sub.model_cfg.layer_d_ff, widths);
        }
        assert!(sub.store.num_params() < full.store.num_params());
        // and the nested model at a narrower width is a different function
        let wider = with_widths(&[32], || logits(&full));
        assert!(max_abs_diff(&wider, &want) > 1e-4, "{widths:?}");
    }
    for (widths, field) in [
        (vec![64], "widths"),
        (vec![8, 8], "widths"),
        (vec![0], "widths"),
    ] {
        let e = extract(&dir, &widths).err().expect("refused");
        assert!(e.to_string().contains(field), "{widths:?}: {e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
