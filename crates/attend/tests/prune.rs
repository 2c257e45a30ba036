//! Cheaper models without retraining (`model::prune`, issue 15): dropping
//! sublayers, FFN-SkipLLM's per-token skipping, and the similarity ranking,
//! each checked against an independent form — a model whose dropped
//! sublayer's output projection is zero, a static drop the rule must
//! reduce to, a model whose redundant sublayers are known.

mod common;

use attend::config::*;
use attend::model::prune::{self, FfnSkip, Probe, Sublayer};
use attend::model::{Executor, Prune, Skip};
use attend::nn::Weight;
use attend::Transformer;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

const LAYERS: usize = 6;

fn cfg() -> ModelConfig {
    ModelConfig {
        shape: Shape::Decoder,
        d_model: 32,
        n_decoder_layers: LAYERS,
        n_heads: 4,
        n_kv_heads: Some(2),
        d_ff: 64,
        vocab_size: 40,
        max_len: 64,
        position: PositionKind::Rope,
        ffn: FfnKind::Swiglu,
        norm: NormKind::Rmsnorm,
        norm_position: NormPosition::Pre,
        bias: false,
        tie_embeddings: true,
        ..ModelConfig::default()
    }
}

fn model(seed: u64) -> Transformer {
    common::build(&cfg(), seed, DType::F32).0
}

fn ids(t: usize, seed: u64) -> Tensor {
    common::random_ids(&mut common::rng(seed), 1, t, 40)
}

/// Logits (1, t, vocab) of a prefill into a fresh state on `exec`.
fn prefill(m: &Transformer, exec: Executor, x: &Tensor) -> Tensor {
    m.step_on(exec, x, &mut m.new_state(None).unwrap(), false)
        .unwrap()
}

fn zero(w: &mut Weight) {
    let Weight::Dense(t) = w else {
        panic!("dense weights")
    };
    *w = Weight::Dense(t.zeros_like().unwrap());
}

fn nan(w: &mut Weight) {
    let Weight::Dense(t) = w else {
        panic!("dense weights")
    };
    *w = Weight::Dense((t.ones_like().unwrap() * f64::NAN).unwrap());
}

/// `m` skipping FFNs by `spec`, counting into fresh stats (clones of a
/// model share them).
fn skipper(m: &Transformer, spec: &str) -> Transformer {
    let mut s = m.clone();
    s.prune.ffn_skip = Some(FfnSkip::parse(spec, LAYERS).unwrap());
    s.prune.stats = Arc::default();
    s
}

fn drop(attn: &[usize], ffn: &[usize]) -> Skip {
    let mut s = Skip {
        attn: vec![false; LAYERS],
        ffn: vec![false; LAYERS],
    };
    attn.iter().for_each(|&l| s.attn[l] = true);
    ffn.iter().for_each(|&l| s.ffn[l] = true);
    s
}

#[test]
fn skipping_nothing_equals_the_plain_model_exactly() {
    let plain = model(1);
    let x = ids(20, 2);
    for exec in [Executor::Cpu, Executor::Graph] {
        let want = prefill(&plain, exec, &x);
        // the instrumented path: probe on, a rule that skips nothing
        let mut m = plain.clone();
        m.prune = Prune {
            ffn_skip: Some(FfnSkip::parse("ratio=0,warmup=0", LAYERS).unwrap()),
            probe: Some(Arc::new(Probe::new())),
            ..Prune::default()
        };
        let got = prefill(&m, exec, &x);
        assert_eq!(common::max_abs_diff(&got, &want), 0.0, "{exec:?}");
        let c = m.prune.stats.snapshot();
        assert_eq!(c.share(), 0.0);
        assert_eq!(c.computed, vec![20; LAYERS]);
    }
}

#[test]
fn a_dropped_sublayer_equals_a_zero_output_projection_and_keeps_no_cache() {
    let base = model(3);
    let x = ids(17, 4);
    // independent form: the sublayer's output projection is zero, so it
    // adds nothing to the residual stream (pre-norm)
    let mut zeroed = base.clone();
    zero(&mut zeroed.decoder[2].self_attn.o_proj.w);
    zero(&mut zeroed.decoder[4].self_attn.o_proj.w);
    zero(&mut zeroed.decoder[3].ffn.w2.w);
    // never computed: its weights are NaN, and nothing NaN comes out
    let mut dropped = base.clone();
    nan(&mut dropped.decoder[2].self_attn.q_proj.w);
    nan(&mut dropped.decoder[4].self_attn.v_proj.w);
    nan(&mut dropped.decoder[3].ffn.w1.w);
    dropped.prune.drop = drop(&[2, 4], &[3]);
    for exec in [Executor::Cpu, Executor::Graph] {
        let want = prefill(&zeroed, exec, &x);
        let mut st = dropped.new_state(None).unwrap();
        let got = dropped.step_on(exec, &x, &mut st, false).unwrap();
        assert!(common::max_abs_diff(&got, &want) < 1e-5, "{exec:?}");
        for (l, layer) in st.layers.iter().enumerate() {
            let bytes = layer.mixer.state_bytes();
            if l == 2 || l == 4 {
                assert_eq!(bytes, 0, "layer {l}'s cache holds nothing");
            } else {
                assert!(bytes > 0, "layer {l} keeps its cache");
            }
        }
        // decoding on: steps equal the prefill's rows
        let mut st = dropped.new_state(None).unwrap();
        let head = dropped
            .step_on(exec, &x.narrow(1, 0, 10).unwrap(), &mut st, false)
            .unwrap();
        let mut rows = vec![head];
        for t in 10..17 {
            rows.push(
                dropped
                    .step_on(exec, &x.narrow(1, t, 1).unwrap(), &mut st, false)
                    .unwrap(),
            );
        }
        let stepped = Tensor::cat(&rows, 1).unwrap();
        assert!(common::max_abs_diff(&stepped, &want) < 1e-4, "{exec:?}");
        assert_eq!(st.layers[2].mixer.state_bytes(), 0);
    }
}

#[test]
fn the_similarity_ranking_picks_the_known_redundant_sublayers() {
    let mut m = model(5);
    // attention of layers 1 and 4 and the FFN of layer 2 add nothing:
    // their input and output are the same vector (cos = 1)
    zero(&mut m.decoder[1].self_attn.o_proj.w);
    zero(&mut m.decoder[4].self_attn.o_proj.w);
    zero(&mut m.decoder[2].ffn.w2.w);
    let a: Vec<u32> = (0..30).map(|i| (i * 7 % 40) as u32).collect();
    let b: Vec<u32> = (0..25).map(|i| (i * 11 % 40) as u32).collect();
    let probe = m.probe(&[&a, &b]).unwrap();
    let attn = probe.rank(&[Sublayer::Attn]);
    let mut top: Vec<usize> = attn[..2].iter().map(|r| r.layer).collect();
    top.sort();
    assert_eq!(top, vec![1, 4], "{attn:?}");
    assert!((attn[0].cos - 1.0).abs() < 1e-6 && attn[2].cos < 0.999999);
    let ffn = probe.rank(&[Sublayer::Ffn]);
    assert_eq!(ffn[0].layer, 2, "{ffn:?}");
    // a mean for every layer
    assert_eq!(probe.means(Sublayer::Attn).len(), LAYERS);
    let auto = prune::auto_drop(&probe, LAYERS, [2, 1, 0]);
    assert_eq!(auto, drop(&[1, 4], &[2]));
    // and the model with them dropped gives the same logits (they added
    // nothing)
    let mut d = m.clone();
    d.prune.drop = auto;
    let x = Tensor::new(&a[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let diff = common::max_abs_diff(
        &prefill(&d, Executor::Cpu, &x),
        &prefill(&m, Executor::Cpu, &x),
    );
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn ffn_skipping_reduces_to_the_static_drops_its_rule_implies() {
    let m = model(7);
    let x = ids(24, 8);
    // ratio=0.34 of 6 layers: 2 FFNs a token, never layer 0 or 5
    let n = FfnSkip::parse("ratio=0.34", LAYERS).unwrap().per_token;
    assert_eq!(n, Some(2));
    for exec in [Executor::Cpu, Executor::Graph] {
        // threshold −1: every token saturates at layer 1, so layers 2 and
        // 3 are skipped
        let s = skipper(&m, "ratio=0.34,threshold=-1,warmup=0");
        let mut d = m.clone();
        d.prune.drop = drop(&[], &[2, 3]);
        let diff = common::max_abs_diff(&prefill(&s, exec, &x), &prefill(&d, exec, &x));
        assert!(diff < 1e-5, "{exec:?} {diff}");
        let c = s.prune.stats.take();
        assert_eq!(c.skipped, vec![0, 0, 24, 24, 0, 0]);
        assert!((c.share() - 2.0 / 6.0).abs() < 1e-12);
        // threshold 1: no token saturates, so the last two skippable
        // layers (3, 4) are skipped
        let s = skipper(&m, "ratio=0.34,threshold=1,warmup=0");
        let mut d = m.clone();
        d.prune.drop = drop(&[], &[3, 4]);
        let diff = common::max_abs_diff(&prefill(&s, exec, &x), &prefill(&d, exec, &x));
        assert!(diff < 1e-5, "{exec:?} {diff}");
        // threshold mode, −1: saturated at layer 1, every later skippable
        // FFN (2, 3, 4) skipped
        let s = skipper(&m, "threshold=-1,warmup=0");
        let mut d = m.clone();
        d.prune.drop = drop(&[], &[2, 3, 4]);
        let diff = common::max_abs_diff(&prefill(&s, exec, &x), &prefill(&d, exec, &x));
        assert!(diff < 1e-5, "{exec:?} {diff}");
    }
}

#[test]
fn ffn_skipping_spares_the_warm_up_and_decides_each_token_alone() {
    let m = model(9);
    let x = ids(30, 10);
    let s = skipper(&m, "threshold=0.5,warmup=6");
    let plain = prefill(&m, Executor::Cpu, &x);
    let skipped = prefill(&s, Executor::Cpu, &x);
    // the warm-up positions see only warm-up positions: exactly plain
    let warm = |t: &Tensor| t.narrow(1, 0, 6).unwrap();
    assert_eq!(common::max_abs_diff(&warm(&skipped), &warm(&plain)), 0.0);
    let c = s.prune.stats.take();
    assert!(c.share() > 0.0, "threshold 0.5 skips something: {c:?}");
    assert_eq!(
        c.skipped[0] + c.skipped[LAYERS - 1],
        0,
        "never the first or last"
    );
    // decided per token from its own rows: one token at a time gives the
    // prefill's logits
    let mut st = s.new_state(None).unwrap();
    let rows: Vec<Tensor> = (0..30)
        .map(|t| s.step(&x.narrow(1, t, 1).unwrap(), &mut st).unwrap())
        .collect();
    let stepped = Tensor::cat(&rows, 1).unwrap();
    assert!(common::max_abs_diff(&stepped, &skipped) < 1e-4);
    assert_eq!(s.prune.stats.take(), c, "the same skips");
}

#[test]
fn bad_specs_name_the_flag() {
    let e = |r: attend::error::Result<FfnSkip>| r.unwrap_err().to_string();
    assert!(
        e(FfnSkip::parse("ratio=1.5", 6)).starts_with("--ffn-skip: ratio 1.5 is outside [0, 1]")
    );
    assert!(e(FfnSkip::parse("ratio=-0.1", 6)).contains("outside [0, 1]"));
    assert!(e(FfnSkip::parse("threshold=2", 6)).contains("outside [-1, 1]"));
    assert!(e(FfnSkip::parse("warmup=3", 6)).contains("give threshold=T or ratio=R"));
    assert!(e(FfnSkip::parse("fast=1", 6)).contains("unknown key `fast`"));
    let d = |s: &str| prune::parse_drop(s, 6).unwrap_err().to_string();
    assert_eq!(
        d("attn:6"),
        "--drop: layer 6 does not exist (the model has layers 0..5)"
    );
    assert!(d("heads:1").contains("unknown sublayer `heads`"));
    assert!(d("attn:x").contains("`x` is not a layer index"));
    assert_eq!(
        prune::parse_drop("attn:1,3-4;ffn:0;layer:5", 6).unwrap(),
        Skip {
            attn: vec![false, true, false, true, true, true],
            ffn: vec![true, false, false, false, false, true],
        }
    );
    let a = |s: &str| prune::parse_drop_auto(s, 6).unwrap_err().to_string();
    assert!(a("attn=7").contains("the model has 6 layers"));
    assert!(a("heads=1").contains("unknown key `heads`"));
    assert_eq!(
        prune::parse_drop_auto("attn=2,layer=1", 6).unwrap(),
        [2, 0, 1]
    );
}
