//! Hydra draft heads (`decode::heads`): the one definition gives the same
//! logits on both executors; a saved set loads back to the same logits
//! (and close to them in q8_0); the self-distillation data is the model's
//! own greedy text; and training learns what is learnable — a
//! continuation that the next token determines — to near-full acceptance
//! on held-out positions, from near none.

use attend::decode::heads::{self, DistillSeq, Heads, HeadsConfig};
use attend::decode::{generate, Sampler, SamplingParams};
use attend::exec::cpu::{Cpu, Rows};
use attend::exec::graph::Graph;
use attend::formats::gguf;
use attend::nn::ParamStore;
use attend::train::optim::AdamW;
use attend::Transformer;
use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-decoders")
}

fn model(file: &str) -> Transformer {
    gguf::load(&data().join(file), false, &Device::Cpu)
        .unwrap()
        .build()
        .unwrap()
}

fn config(m: &Transformer, heads: usize, vocab: Vec<u32>) -> HeadsConfig {
    HeadsConfig::for_model(m, heads, 1, vocab, "tiny")
}

/// Seeded values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_add(99);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn heads_give_the_same_logits_on_both_executors() {
    let m = model("llama3.gguf");
    let d = m.cfg.d_model;
    let store = ParamStore::new(3, DType::F32, Device::Cpu);
    let h = Heads::new(config(&m, 3, (0..200).collect()), &store, &m).unwrap();
    let n = 5;
    let hid = noise(n * d, 1);
    let embs: Vec<Vec<f32>> = (0..3).map(|i| noise(n * d, 10 + i)).collect();
    for i in 0..3 {
        let g_embs: Vec<Tensor> = embs[..=i]
            .iter()
            .map(|e| {
                h.embed(&Graph, Tensor::from_slice(e, (n, d), &Device::Cpu).unwrap())
                    .unwrap()
            })
            .collect();
        let g = h
            .head(
                &Graph,
                i,
                &Tensor::from_slice(&hid, (n, d), &Device::Cpu).unwrap(),
                &g_embs,
            )
            .unwrap();
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let rows = |v: &[f32]| Rows {
            data: v.to_vec(),
            width: d,
        };
        let c_embs: Vec<Rows> = embs[..=i]
            .iter()
            .map(|e| h.embed(&Cpu, rows(e)).unwrap())
            .collect();
        let c = h.head(&Cpu, i, &rows(&hid), &c_embs).unwrap().data.clone();
        assert_eq!(g.len(), n * 200);
        assert_eq!(c.len(), g.len());
        for (a, b) in g.iter().zip(&c) {
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + a.abs()),
                "head {i}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn saved_heads_load_back() {
    let m = model("llama3.gguf");
    let d = m.cfg.d_model;
    let store = ParamStore::new(4, DType::F32, Device::Cpu);
    let mut cfg = config(&m, 2, (5..120).rev().collect());
    cfg.base_fingerprint = heads::fingerprint(&m, &cfg.vocab).unwrap();
    let h = Heads::new(cfg, &store, &m).unwrap();
    let dir = std::env::temp_dir().join(format!("attend-heads-{}", std::process::id()));
    h.save(&store, &dir).unwrap();
    let logits = |h: &Heads| -> Vec<f32> {
        let hid = Rows {
            data: noise(d, 7),
            width: d,
        };
        let e: Vec<Rows> = (0..2)
            .map(|i| {
                h.embed(
                    &Cpu,
                    Rows {
                        data: noise(d, 20 + i),
                        width: d,
                    },
                )
                .unwrap()
            })
            .collect();
        h.head(&Cpu, 1, &hid, &e).unwrap().data.clone()
    };
    let want = logits(&h);
    let same = Heads::load(&dir, &m, false).unwrap();
    assert_eq!(same.cfg, h.cfg);
    assert_eq!(logits(&same), want);
    // q8_0 for drafting: close, and the same choice
    let q = logits(&Heads::load(&dir, &m, true).unwrap());
    let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
    for (a, b) in q.iter().zip(&want) {
        assert!((a - b).abs() < 0.05 * scale, "{a} vs {b}");
    }
    // the same model quantized is the same model; another of the same
    // shape (the tiny Qwen 3) is refused, as is one of another width
    let q8 = model("llama3-q8_0.gguf");
    Heads::load(&dir, &q8, true).unwrap();
    let other = model("qwen3.gguf");
    assert_eq!(
        (other.cfg.vocab_size, other.cfg.d_model),
        (m.cfg.vocab_size, d)
    );
    let e = Heads::load(&dir, &other, true).err().unwrap().to_string();
    assert!(e.contains("trained for tiny, not this model"), "{e}");
    let gemma = attend::formats::hf_decoder::load(&data().join("gemma3"), None, &Device::Cpu)
        .unwrap()
        .build()
        .unwrap();
    if gemma.cfg.d_model != d || gemma.cfg.vocab_size != m.cfg.vocab_size {
        let e = Heads::load(&dir, &gemma, true).err().unwrap().to_string();
        assert!(e.contains("draft heads are for a model"), "{e}");
    }
    std::fs::remove_file(dir.join("heads.json")).unwrap();
    let e = Heads::load(&dir, &m, true).err().unwrap().to_string();
    assert!(e.contains("heads.json"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn self_distillation_is_the_models_own_greedy_text() {
    let m = gguf::load(&data().join("llama3-q8_0.gguf"), false, &Device::Cpu)
        .unwrap()
        .build()
        .unwrap();
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| {
            (0..4 + 3 * i)
                .map(|j| ((i * 31 + j * 7) % 250 + 3) as u32)
                .collect()
        })
        .collect();
    // batches of 2: sequences of different lengths decode side by side
    let mut seqs = heads::self_distill(&m, &prompts, 12, Some(2), 2, |_| {}).unwrap();
    for (p, s) in prompts.iter().zip(&seqs) {
        let mut greedy = Sampler::new(SamplingParams::default()).unwrap();
        let want = generate(&m, p, None, 12, &mut greedy, Some(2), |_| Ok(())).unwrap();
        assert_eq!(&s.tokens[..p.len()], &p[..]);
        assert_eq!(s.tokens[p.len()..], want[..], "prompt {p:?}");
        assert_eq!(s.start, p.len() - 1);
    }
    // the hidden states: one row a position from `start`, and the rows'
    // logits choose the next token
    heads::fill_hidden(&m, &mut seqs).unwrap();
    let d = m.cfg.d_model;
    for s in &seqs {
        assert_eq!(s.hidden.len(), (s.tokens.len() - s.start) * d);
        let r = s.tokens.len() - s.start - 2;
        let h = Tensor::from_slice(&s.hidden[r * d..(r + 1) * d], (1, d), &Device::Cpu).unwrap();
        let l: Vec<f32> = m
            .logits(&h)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(attend::decode::argmax(&l), s.tokens[s.start + r + 1]);
    }
}

#[test]
fn training_learns_a_continuation_the_next_token_determines() {
    // text that cycles through 13 tokens: the token after next is a
    // function of the next one, so heads can learn it exactly; held out:
    // the same cycle from other starting points and lengths
    let m = model("llama3.gguf");
    let cycle: Vec<u32> = (0..13).map(|j| ((j * 37) % 240 + 10) as u32).collect();
    let text = |start: usize, len: usize| -> Vec<u32> {
        (0..len).map(|j| cycle[(start + j) % 13]).collect()
    };
    let mut train: Vec<DistillSeq> = (0..6)
        .map(|i| DistillSeq {
            tokens: text(i * 2, 40),
            start: 3,
            hidden: vec![],
        })
        .collect();
    let mut test = vec![DistillSeq {
        tokens: text(5, 50),
        start: 7,
        hidden: vec![],
    }];
    heads::fill_hidden(&m, &mut train).unwrap();
    heads::fill_hidden(&m, &mut test).unwrap();
    let vocab = heads::draft_vocab(&train, m.cfg.vocab_size, 64);
    // every cycle token, most frequent first
    assert_eq!(vocab.len(), 13);
    let store = ParamStore::new(1, DType::F32, Device::Cpu);
    let h = Heads::new(config(&m, 3, vocab), &store, &m).unwrap();
    let train_pos = heads::positions(&train, 3);
    let test_pos = heads::positions(&test, 3);
    assert_eq!(test_pos.len(), 50 - 7 - 4);
    let before = heads::evaluate(&h, &m, &test, &test_pos).unwrap();
    let mut opt = AdamW::new(store.vars(), 0.9, 0.95, 1e-8, 0.0).unwrap();
    let mut first = None;
    let mut last = 0.0;
    for step in 0..150 {
        let batch: Vec<(u32, u32)> = (0..48)
            .map(|j| train_pos[(step * 48 + j * 7) % train_pos.len()])
            .collect();
        let (loss, _) = heads::batch_loss(&h, &m, &train, &batch, false).unwrap();
        let g = loss.backward().unwrap();
        opt.step(&g, 3e-3, 1.0).unwrap();
        last = loss.to_scalar::<f32>().unwrap();
        first.get_or_insert(last);
    }
    let after = heads::evaluate(&h, &m, &test, &test_pos).unwrap();
    assert!(last < 0.1 * first.unwrap(), "loss {first:?} -> {last}");
    assert!(before.mean_accepted < 1.0, "{before:?}");
    assert!(after.mean_accepted > 2.9, "{after:?}");
    // the chain: accepted at i never exceeds accepted at i - 1
    for w in after.accepted_at.windows(2) {
        assert!(w[1] <= w[0]);
    }
}

#[test]
fn calibration_stops_drafting_where_the_heads_are_unsure() {
    // heads sure and right on half the positions, unsure and wrong on the
    // rest: drafting should stop at the first unsure head (0.25 is the
    // lowest threshold that drops the 0.2s and keeps the 0.8s)
    let sure = vec![(0.9, true), (0.8, true), (0.1, false)];
    let unsure = vec![(0.2, false), (0.15, false), (0.1, false)];
    let chains = vec![sure, unsure];
    let cost = [1.0, 1.2, 1.4, 1.6];
    let (best, all) = heads::calibrate(&chains, &cost, 0.0);
    assert_eq!(best.min_confidence, 0.25);
    // (1 + 2 tokens) + (1 + 0) over cost 1.4 + 1.0
    assert!((best.speedup - 4.0 / 2.4).abs() < 1e-9, "{best:?}");
    assert_eq!((best.drafted, best.accepted), (1.0, 1.0));
    // no threshold: every head drafts, (3 + 1) tokens over 1.6 + 1.6
    assert!((all[0].speedup - 4.0 / 3.2).abs() < 1e-9, "{:?}", all[0]);
    // with each head costing 0.1 step: (3 + 1) over (1.4 + 0.3) + (1.0 + 0.1)
    let (best, _) = heads::calibrate(&chains, &cost, 0.1);
    assert_eq!(best.min_confidence, 0.25);
    assert!((best.speedup - 4.0 / 2.8).abs() < 1e-9, "{best:?}");
    // the figures of the held-out evaluation from the same chains
    let ev = heads::evaluate_chains(&chains);
    assert_eq!(ev.accepted_at, vec![0.5, 0.5, 0.0]);
    assert_eq!(ev.head_accuracy, vec![0.5, 0.5, 0.0]);
    assert_eq!(ev.mean_accepted, 1.0);
}

#[test]
fn distillation_learns_the_models_own_text() {
    // self-distillation: the tiny model's own greedy answers, the heads
    // trained on its distribution at each position; held out: other
    // prompts' answers
    let m = model("llama3.gguf");
    let prompts: Vec<Vec<u32>> = (0..14)
        .map(|i| {
            (0..6)
                .map(|j| ((i * 53 + j * 11) % 280 + 4) as u32)
                .collect()
        })
        .collect();
    let mut seqs = heads::self_distill(&m, &prompts, 40, None, 7, |_| {}).unwrap();
    heads::fill_hidden(&m, &mut seqs).unwrap();
    let test = seqs.split_off(11);
    let vocab = heads::draft_vocab(&seqs, m.cfg.vocab_size, 300);
    let store = ParamStore::new(5, DType::F32, Device::Cpu);
    let h = Heads::new(config(&m, 2, vocab), &store, &m).unwrap();
    let (train_pos, test_pos) = (heads::positions(&seqs, 2), heads::positions(&test, 2));
    let before = heads::evaluate(&h, &m, &test, &test_pos).unwrap();
    let mut opt = AdamW::new(store.vars(), 0.9, 0.95, 1e-8, 0.0).unwrap();
    let (mut first, mut last) = (None, 0.0);
    for step in 0..200 {
        let batch: Vec<(u32, u32)> = (0..64)
            .map(|j| train_pos[(step * 64 + j * 5) % train_pos.len()])
            .collect();
        let (loss, _) = heads::batch_loss(&h, &m, &seqs, &batch, true).unwrap();
        opt.step(&loss.backward().unwrap(), 3e-3, 1.0).unwrap();
        last = loss.to_scalar::<f32>().unwrap();
        first.get_or_insert(last);
    }
    let after = heads::evaluate(&h, &m, &test, &test_pos).unwrap();
    eprintln!("{before:?} -> {after:?}; loss {first:?} -> {last}");
    assert!(last < first.unwrap(), "loss {first:?} -> {last}");
    assert!(
        after.mean_accepted > before.mean_accepted + 0.15,
        "{before:?} -> {after:?}"
    );
    // the distillation loss of one head at one position, by hand: the
    // base's softmax over the draft vocabulary (its full logits, those
    // rows) against the head's log-softmax
    let one = Heads::new(config(&m, 1, h.cfg.vocab.clone()), &store, &m).unwrap();
    let (si, p) = train_pos[17];
    let (got, _) = heads::batch_loss(&one, &m, &seqs, &[(si, p)], true).unwrap();
    let s = &seqs[si as usize];
    let d = m.cfg.d_model;
    let row = |q: usize| {
        let r = q - s.start;
        Tensor::from_slice(&s.hidden[r * d..(r + 1) * d], (1, d), &Device::Cpu).unwrap()
    };
    let full: Vec<f32> = m
        .logits(&row(p as usize + 1))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = one
        .cfg
        .vocab
        .iter()
        .map(|&t| full[t as usize] as f64)
        .collect();
    let mut raw = vec![0f32; d];
    m.embed
        .rows_into(&[s.tokens[p as usize + 1]], &mut raw)
        .unwrap();
    let e = one
        .embed(&Graph, Tensor::from_vec(raw, (1, d), &Device::Cpu).unwrap())
        .unwrap();
    let z: Vec<f64> = one
        .head(&Graph, 0, &row(p as usize), &[e])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let lse = |v: &[f64]| {
        let mx = v.iter().cloned().fold(f64::MIN, f64::max);
        mx + v.iter().map(|x| (x - mx).exp()).sum::<f64>().ln()
    };
    let (lb, lz) = (lse(&base), lse(&z));
    let want: f64 = base
        .iter()
        .zip(&z)
        .map(|(b, z)| -(b - lb).exp() * (z - lz))
        .sum();
    let got = got.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (got - want).abs() < 1e-4 * want.abs().max(1.0),
        "{got} vs {want}"
    );
}
