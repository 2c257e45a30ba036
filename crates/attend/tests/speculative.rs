//! Speculative decoding (`decode::speculative`) gives exactly the tokens of
//! plain greedy decoding, whatever the draft proposes — prompt lookup, an
//! oracle that is always right, garbage — on the tiny Llama 3 (q8_0),
//! with a plain, a paged and a policy-capped cache, on the tiny Gemma 3
//! (sliding-window rings: rolled back by restoring a copy), and when the
//! context fills up; and with sampling, the tokens that come out are
//! distributed as the target's (chi-square tests, fixed seeds).

use attend::decode::speculative::{generate_speculative, Draft, Lookup};
use attend::decode::{generate, generate_with_policy, Sampler, SamplingParams};
use attend::formats::{gguf, hf_decoder};
use attend::Transformer;
use candle_core::Device;
use std::path::PathBuf;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-decoders")
}

fn llama() -> Transformer {
    gguf::load(&data().join("llama3-q8_0.gguf"), false, &Device::Cpu)
        .unwrap()
        .build()
        .unwrap()
}

fn greedy() -> Sampler {
    Sampler::new(SamplingParams::default()).unwrap()
}

/// A prompt that repeats itself (something for lookup to copy).
fn prompt(i: usize, len: usize) -> Vec<u32> {
    let unit: Vec<u32> = (0..7 + i)
        .map(|j| ((i * 41 + j * 13) % 280 + 5) as u32)
        .collect();
    unit.iter().copied().cycle().take(len).collect()
}

/// Proposes what it is given, then garbage.
struct Fixed(Vec<u32>);
impl Draft for Fixed {
    fn propose(&mut self, seq: &[u32], k: usize) -> Vec<u32> {
        // the known continuation from here, if seq is a prefix of it
        let n = seq.len();
        if n <= self.0.len() && self.0[..n] == *seq {
            return self.0[n..].iter().copied().take(k).collect();
        }
        vec![1; k]
    }
}

/// `generate_speculative` without streaming.
#[allow(clippy::too_many_arguments)]
fn quiet(
    m: &Transformer,
    st: attend::model::DecodeState,
    p: &[u32],
    n: usize,
    s: &mut Sampler,
    stop: Option<u32>,
    d: &mut dyn Draft,
    k: usize,
) -> (Vec<u32>, attend::decode::speculative::SpecStats) {
    generate_speculative(m, st, p, n, s, stop, d, k, |_| Ok(())).unwrap()
}

/// The same token, always.
struct Always(u32);
impl Draft for Always {
    fn propose(&mut self, _: &[u32], k: usize) -> Vec<u32> {
        vec![self.0; k]
    }
}

/// Random tokens.
struct Garbage(u64);
impl Draft for Garbage {
    fn propose(&mut self, _: &[u32], k: usize) -> Vec<u32> {
        (0..k)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 33) % 300) as u32
            })
            .collect()
    }
}

#[test]
fn every_draft_gives_the_tokens_of_plain_greedy_decoding() {
    let m = llama();
    let pool = m.kv_pool(8, 2000).unwrap();
    for (i, len) in [(0, 30), (1, 64), (2, 9), (3, 120)] {
        let p = prompt(i, len);
        let want = generate(&m, &p, None, 40, &mut greedy(), None, |_| Ok(())).unwrap();
        let mut full = p.clone();
        full.extend_from_slice(&want);
        let drafts: Vec<(&str, Box<dyn Draft>)> = vec![
            ("lookup", Box::new(Lookup { max_ngram: 3 })),
            ("oracle", Box::new(Fixed(full.clone()))),
            ("garbage", Box::new(Garbage(i as u64))),
        ];
        for (name, mut d) in drafts {
            for (k, paged) in [(4, false), (8, true), (1, false)] {
                let st = if paged {
                    m.new_state_paged(&pool, None).unwrap()
                } else {
                    m.new_state(None).unwrap()
                };
                let mut streamed = vec![];
                let (got, stats) =
                    generate_speculative(&m, st, &p, 40, &mut greedy(), None, d.as_mut(), k, |t| {
                        streamed.push(t);
                        Ok(())
                    })
                    .unwrap();
                assert_eq!(got, want, "{name} k {k} paged {paged} prompt {i}");
                assert_eq!(streamed, want);
                if name == "oracle" {
                    // always right: every drafted token is kept
                    assert_eq!(stats.accepted, stats.drafted, "{stats:?}");
                    assert!(stats.tokens_per_pass() > 1.0 + 0.5 * k as f64, "{stats:?}");
                }
                if name == "lookup" && len > 9 {
                    assert!(stats.passes > 0, "lookup never drafted: {stats:?}");
                }
            }
        }
    }
    assert_eq!(pool.used(), 0);
}

#[test]
fn a_stop_token_and_max_tokens_end_it_where_plain_decoding_ends() {
    let m = llama();
    let p = prompt(4, 40);
    let want = generate(&m, &p, None, 30, &mut greedy(), None, |_| Ok(())).unwrap();
    let mut full = p.clone();
    full.extend_from_slice(&want);
    // stop at the 12th token: the oracle has drafted past it
    let stop = want[11];
    let cut = generate(&m, &p, None, 30, &mut greedy(), Some(stop), |_| Ok(())).unwrap();
    for max_new in [1, 2, 7, 30] {
        let (got, _) = quiet(
            &m,
            m.new_state(None).unwrap(),
            &p,
            max_new,
            &mut greedy(),
            Some(stop),
            &mut Fixed(full.clone()),
            6,
        );
        assert_eq!(got, cut[..cut.len().min(max_new)], "max_new {max_new}");
    }
}

#[test]
fn caches_that_cannot_roll_back_restore_a_copy() {
    // a cache policy (evicts), and Gemma 3's sliding-window rings
    let m = llama();
    let policy: attend::cache::policy::KvPolicy = "sinks=2,window=16".parse().unwrap();
    let p = prompt(5, 50);
    let want =
        generate_with_policy(&m, &policy, None, &p, 30, &mut greedy(), None, |_| Ok(())).unwrap();
    let (got, stats) = quiet(
        &m,
        m.new_state_with_policy(&policy, None).unwrap(),
        &p,
        30,
        &mut greedy(),
        None,
        &mut Garbage(7),
        4,
    );
    assert_eq!(got, want);
    assert!(stats.passes > 0);
    let q8 = hf_decoder::quant_type("q8_0").unwrap();
    let g = hf_decoder::load(&data().join("gemma3"), Some(q8), &Device::Cpu)
        .unwrap()
        .build()
        .unwrap();
    for i in 0..3 {
        let p = prompt(i, 20 + 9 * i);
        let want = generate(&g, &p, None, 30, &mut greedy(), None, |_| Ok(())).unwrap();
        let mut full = p.clone();
        full.extend_from_slice(&want);
        for mut d in [
            Box::new(Lookup { max_ngram: 2 }) as Box<dyn Draft>,
            Box::new(Garbage(3)),
            Box::new(Fixed(full)),
        ] {
            let (got, _) = quiet(
                &g,
                g.new_state(None).unwrap(),
                &p,
                30,
                &mut greedy(),
                None,
                d.as_mut(),
                5,
            );
            assert_eq!(got, want, "gemma prompt {i}");
        }
    }
}

#[test]
fn a_full_context_is_rebuilt_as_plain_decoding_rebuilds_it() {
    let m = llama();
    let max_len = m.cfg.max_len;
    let p = prompt(6, max_len - 10);
    let want = generate(&m, &p, None, 30, &mut greedy(), None, |_| Ok(())).unwrap();
    let mut full = p.clone();
    full.extend_from_slice(&want);
    for mut d in [
        Box::new(Fixed(full)) as Box<dyn Draft>,
        Box::new(Lookup { max_ngram: 3 }),
    ] {
        let (got, _) = quiet(
            &m,
            m.new_state(None).unwrap(),
            &p,
            30,
            &mut greedy(),
            None,
            d.as_mut(),
            8,
        );
        assert_eq!(got, want);
    }
}

/// Wilson–Hilferty: the chi-square quantile of `df` degrees of freedom at
/// the normal quantile z (3.09: α = 0.001).
fn chi2_crit(df: usize, z: f64) -> f64 {
    let d = df as f64;
    d * (1.0 - 2.0 / (9.0 * d) + z * (2.0 / (9.0 * d)).sqrt()).powi(3)
}

#[test]
fn the_verification_rule_keeps_the_target_distribution() {
    use attend::decode::speculative::verify;
    // six tokens; top-p 0.95 drops the tail, so p is the sampler's own
    // truncated distribution; drafts: the likeliest, a middling one, one
    // outside the kept set
    let logits = [2.0f32, 1.5, 0.3, -0.5, 0.9, -3.0];
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: 11,
        ..Default::default()
    };
    let mut s = Sampler::new(params).unwrap();
    let dist = s.distribution_after(&logits, &[]);
    let z: f64 = dist.iter().map(|d| d.1).sum();
    let n = 200_000;
    for x in [0u32, 2, 5] {
        let mut counts = [0usize; 6];
        let mut kept = 0;
        for _ in 0..n {
            let t = match verify(&mut s, &logits, &[], x) {
                None => {
                    kept += 1;
                    x
                }
                Some(y) => {
                    assert_ne!(y, x);
                    y
                }
            };
            counts[t as usize] += 1;
        }
        let mut chi2 = 0.0;
        for &(t, w) in &dist {
            let e = n as f64 * w / z;
            chi2 += (counts[t as usize] as f64 - e).powi(2) / e;
        }
        // nothing outside the kept set
        let outside: usize = (0..6u32)
            .filter(|t| !dist.iter().any(|d| d.0 == *t))
            .map(|t| counts[t as usize])
            .sum();
        assert_eq!(outside, 0, "draft {x}");
        assert!(
            chi2 < chi2_crit(dist.len() - 1, 3.09),
            "draft {x}: chi2 {chi2}"
        );
        // the draft was kept as often as p says
        let px = dist.iter().find(|d| d.0 == x).map_or(0.0, |d| d.1 / z);
        let sd = (n as f64 * px * (1.0 - px)).sqrt().max(1.0);
        assert!(
            (kept as f64 - n as f64 * px).abs() < 5.0 * sd,
            "draft {x}: kept {kept}"
        );
    }
}

#[test]
fn sampled_speculative_tokens_are_distributed_as_plain_sampling() {
    // the tiny Llama, temperature 1 over its 4 likeliest tokens: the
    // first two generated tokens (the second one goes through the
    // verifier) from 3,000 seeds with and without a draft
    let m = llama();
    let p = prompt(2, 24);
    let params = |seed| SamplingParams {
        temperature: 1.0,
        top_k: 4,
        seed,
        ..Default::default()
    };
    let runs = 3000u64;
    let mut plain = std::collections::HashMap::new();
    let mut spec = std::collections::HashMap::new();
    let greedy2 = generate(&m, &p, None, 2, &mut greedy(), None, |_| Ok(())).unwrap();
    let mut kept = 0;
    for seed in 0..runs {
        let mut s = Sampler::new(params(seed)).unwrap();
        let a = generate(&m, &p, None, 2, &mut s, None, |_| Ok(())).unwrap();
        *plain.entry(a).or_insert(0usize) += 1;
        // a draft that always proposes greedy's second token
        let mut s = Sampler::new(params(1_000_000 + seed)).unwrap();
        let (b, st) = quiet(
            &m,
            m.new_state(None).unwrap(),
            &p,
            2,
            &mut s,
            None,
            &mut Always(greedy2[1]),
            1,
        );
        kept += st.accepted;
        *spec.entry(b).or_insert(0usize) += 1;
    }
    assert!(kept > 100, "the draft was hardly ever kept ({kept})");
    // two-sample chi-square over the pairs, rare ones pooled
    let mut keys: Vec<_> = plain.keys().chain(spec.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    let (mut chi2, mut df, mut pool) = (0.0, 0usize, (0usize, 0usize));
    for k in keys {
        let (a, b) = (*plain.get(&k).unwrap_or(&0), *spec.get(&k).unwrap_or(&0));
        if a + b < 20 {
            pool = (pool.0 + a, pool.1 + b);
            continue;
        }
        chi2 += (a as f64 - b as f64).powi(2) / (a + b) as f64;
        df += 1;
    }
    if pool.0 + pool.1 > 0 {
        chi2 += (pool.0 as f64 - pool.1 as f64).powi(2) / (pool.0 + pool.1) as f64;
        df += 1;
    }
    assert!(df >= 4, "too few outcomes ({df})");
    assert!(
        chi2 < chi2_crit(df - 1, 3.09),
        "chi2 {chi2} over {df} cells"
    );
}

#[test]
fn a_draft_model_with_the_same_tokenizer_gives_the_plain_tokens() {
    use attend::decode::speculative::ModelDraft;
    let m = llama();
    // the same weights unquantized (a different model, the same tokenizer),
    // and the model itself (always right)
    let f32_model = gguf::load(&data().join("llama3.gguf"), false, &Device::Cpu)
        .unwrap()
        .build()
        .unwrap();
    for (i, len) in [(0, 30), (3, 70)] {
        let p = prompt(i, len);
        let want = generate(&m, &p, None, 40, &mut greedy(), None, |_| Ok(())).unwrap();
        for (name, dm) in [("f32", &f32_model), ("itself", &m)] {
            let mut d = ModelDraft::new(std::sync::Arc::new(dm.clone()), m.cfg.vocab_size).unwrap();
            let (got, st) = quiet(
                &m,
                m.new_state(None).unwrap(),
                &p,
                40,
                &mut greedy(),
                None,
                &mut d,
                4,
            );
            assert_eq!(got, want, "{name} prompt {i}");
            assert!(st.passes > 0);
            if name == "itself" {
                assert_eq!(st.accepted, st.drafted, "{st:?}");
            }
        }
    }
    // a draft with another vocabulary is refused
    let e = ModelDraft::new(std::sync::Arc::new(m.clone()), m.cfg.vocab_size + 1)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("vocabulary"), "{e}");
}

/// Untrained heads for `m` (seeded), drafting from its whole vocabulary.
fn random_heads(m: &Transformer, seed: u64) -> attend::decode::heads::HeadsDraft {
    use attend::decode::heads::{Heads, HeadsConfig};
    let cfg = HeadsConfig::for_model(m, 3, 1, (0..m.cfg.vocab_size as u32).collect(), "test");
    let store = attend::nn::ParamStore::new(seed, candle_core::DType::F32, Device::Cpu);
    attend::decode::heads::HeadsDraft {
        heads: Heads::new(cfg, &store, m).unwrap(),
    }
}

fn skip(attn: &[usize], ffn: &[usize]) -> attend::model::Skip {
    let mut s = attend::model::Skip::default();
    for &i in attn {
        s.attn.resize(s.attn.len().max(i + 1), false);
        s.attn[i] = true;
    }
    for &i in ffn {
        s.ffn.resize(s.ffn.len().max(i + 1), false);
        s.ffn[i] = true;
    }
    s
}

#[test]
fn skip_and_heads_drafts_give_the_tokens_of_plain_greedy_decoding() {
    use attend::decode::speculative::SkipDraft;
    let m = llama();
    let pool = m.kv_pool(8, 2000).unwrap();
    let policy: attend::cache::policy::KvPolicy = "sinks=2,window=16".parse().unwrap();
    for (i, len) in [(0, 30), (2, 9), (3, 100)] {
        let p = prompt(i, len);
        let want = generate(&m, &p, None, 40, &mut greedy(), None, |_| Ok(())).unwrap();
        let capped =
            generate_with_policy(&m, &policy, None, &p, 40, &mut greedy(), None, |_| Ok(()))
                .unwrap();
        let drafts: Vec<(&str, Box<dyn Draft>)> = vec![
            // skipping nothing: the model drafts its own tokens
            (
                "skip nothing",
                Box::new(SkipDraft {
                    skip: skip(&[], &[]),
                }),
            ),
            (
                "skip attn 0",
                Box::new(SkipDraft {
                    skip: skip(&[0], &[]),
                }),
            ),
            (
                "skip layer 1",
                Box::new(SkipDraft {
                    skip: skip(&[1], &[1]),
                }),
            ),
            (
                "skip ffn 0",
                Box::new(SkipDraft {
                    skip: skip(&[], &[0]),
                }),
            ),
            ("heads", Box::new(random_heads(&m, i as u64))),
        ];
        for (name, mut d) in drafts {
            for (k, how) in [(4, "plain"), (3, "paged"), (5, "policy")] {
                let st = match how {
                    "plain" => m.new_state(None).unwrap(),
                    "paged" => m.new_state_paged(&pool, None).unwrap(),
                    _ => m.new_state_with_policy(&policy, None).unwrap(),
                };
                let (got, stats) = quiet(&m, st, &p, 40, &mut greedy(), None, d.as_mut(), k);
                let expect = if how == "policy" { &capped } else { &want };
                assert_eq!(&got, expect, "{name} {how} prompt {i}");
                assert!(stats.passes > 0, "{name} never drafted: {stats:?}");
                if name == "skip nothing" {
                    assert_eq!(stats.accepted, stats.drafted, "{name} {how}: {stats:?}");
                }
            }
        }
    }
    assert_eq!(pool.used(), 0);
    // Gemma 3's sliding-window rings (copied for the draft, not rolled back)
    let q8 = hf_decoder::quant_type("q8_0").unwrap();
    let g = hf_decoder::load(&data().join("gemma3"), Some(q8), &Device::Cpu)
        .unwrap()
        .build()
        .unwrap();
    let p = prompt(1, 40);
    let want = generate(&g, &p, None, 30, &mut greedy(), None, |_| Ok(())).unwrap();
    for mut d in [
        Box::new(SkipDraft {
            skip: skip(&[], &[]),
        }) as Box<dyn Draft>,
        Box::new(SkipDraft {
            skip: skip(&[0], &[1]),
        }),
        Box::new(random_heads(&g, 5)),
    ] {
        let (got, st) = quiet(
            &g,
            g.new_state(None).unwrap(),
            &p,
            30,
            &mut greedy(),
            None,
            d.as_mut(),
            4,
        );
        assert_eq!(got, want, "gemma");
        assert!(st.passes > 0);
    }
}

/// Checks that the hidden state a draft sees is the target's final hidden
/// state at the position that chose the sequence's last token: recomputed
/// from scratch, and its logits' argmax is that token.
struct Probe<'a> {
    m: &'a Transformer,
    checked: usize,
}
impl Draft for Probe<'_> {
    fn propose_in(&mut self, cx: attend::decode::speculative::Context, k: usize) -> Vec<u32> {
        let h = cx.hidden.expect("asked for the hidden state");
        let n = cx.seq.len();
        let mut st = self.m.new_state(None).unwrap();
        let ids = candle_core::Tensor::new(&cx.seq[..n - 1], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let opts = attend::model::StepOpts {
            last_only: true,
            hidden: true,
            ..Default::default()
        };
        let o = self
            .m
            .step_with(self.m.executor(), &ids, &mut st, &opts)
            .unwrap();
        let want: Vec<f32> = o.hidden.unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(h.len(), want.len());
        let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        for (a, b) in h.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-3 * scale, "hidden {a} vs {b}");
        }
        let hs = candle_core::Tensor::from_slice(h, (1, h.len()), &Device::Cpu).unwrap();
        let l: Vec<f32> = self
            .m
            .logits(&hs)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            attend::decode::argmax(&l),
            cx.seq[n - 1],
            "the hidden state's token"
        );
        self.checked += 1;
        // the right token, then garbage (verification keeps one), or
        // nothing: the hidden state comes from verification passes at
        // every length and from plain steps
        if self.checked.is_multiple_of(3) {
            return vec![];
        }
        let l = self
            .m
            .step_last(
                &candle_core::Tensor::new(&[[cx.seq[n - 1]]], &Device::Cpu).unwrap(),
                &mut st,
            )
            .unwrap();
        let right = attend::decode::argmax(&l.flatten_all().unwrap().to_vec1().unwrap());
        let mut d = vec![right];
        d.extend(std::iter::repeat_n((right + 7) % 300, k - 1));
        d
    }
    fn wants_hidden(&self) -> bool {
        true
    }
}

#[test]
fn the_hidden_state_a_draft_sees_chose_the_last_token() {
    // f32 weights: the hidden states match a fresh pass closely
    let m = gguf::load(&data().join("llama3.gguf"), false, &Device::Cpu)
        .unwrap()
        .build()
        .unwrap();
    let p = prompt(2, 33);
    let want = generate(&m, &p, None, 30, &mut greedy(), None, |_| Ok(())).unwrap();
    let mut d = Probe { m: &m, checked: 0 };
    let (got, _) = quiet(
        &m,
        m.new_state(None).unwrap(),
        &p,
        30,
        &mut greedy(),
        None,
        &mut d,
        3,
    );
    assert_eq!(got, want);
    assert!(d.checked >= 10, "{}", d.checked);
}

#[test]
fn heads_draft_only_while_sure_enough() {
    let m = llama();
    let p = prompt(1, 30);
    let want = generate(&m, &p, None, 20, &mut greedy(), None, |_| Ok(())).unwrap();
    // never sure enough: no pass verifies anything; always: they draft
    for (min, drafts) in [(1.01f32, false), (0.0, true)] {
        let mut d = random_heads(&m, 9);
        d.heads.cfg.min_confidence = min;
        let (got, st) = quiet(
            &m,
            m.new_state(None).unwrap(),
            &p,
            20,
            &mut greedy(),
            None,
            &mut d,
            3,
        );
        assert_eq!(got, want);
        assert_eq!(st.passes > 0, drafts, "{min}: {st:?}");
    }
}
