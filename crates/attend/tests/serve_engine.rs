//! The serving engine (`attend::serve`) on the tiny Llama 3 (q8_0 GGUF) and
//! Gemma 3 (sliding-window layers) models: many sequences at once, chunked
//! prefill, a pool small enough to force preemption, prefix caching and
//! disconnects all give each request exactly the tokens it gets alone
//! (`decode::generate`), and the pool's blocks all come back.

use attend::decode::{generate, Sampler, SamplingParams};
use attend::formats::{gguf, hf_decoder};
use attend::kernels::kv::KvDType;
use attend::serve::{Engine, EngineConfig, Event, FinishReason, Request, Sink};
use attend::Transformer;
use candle_core::Device;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-decoders")
}

fn llama() -> Arc<Transformer> {
    llama_kv(KvDType::F32)
}

/// The tiny Llama with its KV caches in `kv`.
fn llama_kv(kv: KvDType) -> Arc<Transformer> {
    let g = gguf::load(&data().join("llama3-q8_0.gguf"), false, &Device::Cpu).unwrap();
    let mut m = g.build().unwrap();
    m.kv_dtype = kv;
    Arc::new(m)
}

/// Sends events down a channel; "disconnects" after `limit` tokens.
struct Chan {
    tx: mpsc::Sender<Event>,
    tokens: usize,
    limit: usize,
}

impl Sink for Chan {
    fn send(&mut self, e: Event) -> bool {
        if matches!(e, Event::Token { .. }) {
            self.tokens += 1;
        }
        self.tx.send(e).is_ok() && self.tokens < self.limit
    }
    fn closed(&self) -> bool {
        self.tokens >= self.limit
    }
}

/// Prompts of varied lengths from a seed (ids below the tiny vocabulary).
fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((i * 131 + j * 17 + j * j) % 300 + 3) as u32)
        .collect()
}

fn alone(m: &Transformer, p: &[u32], n: usize) -> Vec<u32> {
    let mut s = Sampler::new(SamplingParams::default()).unwrap();
    generate(m, p, None, n, &mut s, None, |_| Ok(())).unwrap()
}

/// Submit every prompt at once; -> per request (tokens, finish, cached).
fn serve(
    e: &Engine,
    prompts: &[Vec<u32>],
    n: usize,
    limit: usize,
) -> Vec<(Vec<u32>, Option<FinishReason>, usize)> {
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (tx, rx) = mpsc::channel();
            e.submit(Request {
                prompt: p.clone(),
                max_tokens: n,
                sampling: SamplingParams::default(),
                stop_ids: vec![],
                logprobs: None,
                sink: Box::new(Chan {
                    tx,
                    tokens: 0,
                    limit,
                }),
            })
            .unwrap();
            rx
        })
        .collect();
    rxs.into_iter()
        .map(|rx| {
            let (mut ids, mut fin, mut cached) = (vec![], None, 0);
            for ev in rx.iter() {
                match ev {
                    Event::Token { id, .. } => ids.push(id),
                    Event::Done {
                        finish,
                        cached_tokens,
                        ..
                    } => {
                        fin = Some(finish);
                        cached = cached_tokens;
                        break;
                    }
                    Event::Error(m) => panic!("engine error: {m}"),
                }
                if ids.len() >= limit {
                    break;
                }
            }
            (ids, fin, cached)
        })
        .collect()
}

/// Logits of the last prompt token and of one decode step after it.
fn logits_alone(m: &Transformer, p: &[u32]) -> (Vec<f32>, Vec<f32>) {
    use candle_core::Tensor;
    let mut st = m.new_state(None).unwrap();
    let mut step = |ids: &[u32]| -> Vec<f32> {
        let x = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        m.step_last(&x, &mut st)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    (step(p), step(&[7]))
}

#[test]
fn a_sequences_numbers_do_not_depend_on_batch_chunks_or_pages() {
    // bit for bit: the q8_0 model quantizes its activations, so a
    // summation-order difference anywhere can flip a rounding and, through
    // the layers, a token (batch invariance); each KV type has its own read
    // path across pages (f32 gathered, f16 through row addresses, bf16
    // decoded; q8_0 needs heads of 32, and this model's have 16)
    for kv in [KvDType::F32, KvDType::F16, KvDType::Bf16] {
        invariant_on(kv);
    }
}

fn invariant_on(kv: KvDType) {
    let m = llama_kv(kv);
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(i, 20 + 23 * i)).collect();
    let want: Vec<_> = prompts.iter().map(|p| logits_alone(&m, p)).collect();
    for (bt, cut) in [(4, 0), (8, 16), (7, 33), (64, 2)] {
        let pool = m.kv_pool(bt, 100_000).unwrap();
        let mut states: Vec<_> = prompts
            .iter()
            .map(|_| m.new_state_paged(&pool, None).unwrap())
            .collect();
        let mut refs: Vec<&mut _> = states.iter_mut().collect();
        // the prompts whole, or cut in two chunks, all sequences in one step
        let mut last = vec![];
        let at = |p: &[u32]| if cut == 0 { 0 } else { cut.min(p.len() - 2) };
        if cut > 0 {
            let heads: Vec<&[u32]> = prompts.iter().map(|p| &p[..at(p)]).collect();
            m.step_many(&mut refs, &heads).unwrap();
        }
        let tails: Vec<&[u32]> = prompts.iter().map(|p| &p[at(p)..]).collect();
        last.push(m.step_many(&mut refs, &tails).unwrap());
        let seven = [7u32];
        let ones: Vec<&[u32]> = prompts.iter().map(|_| &seven[..]).collect();
        last.push(m.step_many(&mut refs, &ones).unwrap());
        let v = last[0].len() / prompts.len();
        for (i, w) in want.iter().enumerate() {
            assert!(
                last[0][i * v..][..v] == w.0[..],
                "{kv}: block {bt}, cut {cut}: prefill of {i}"
            );
            assert!(
                last[1][i * v..][..v] == w.1[..],
                "{kv}: block {bt}, cut {cut}: decode of {i}"
            );
        }
    }
}

#[test]
fn batched_chunked_and_preempted_sequences_get_the_tokens_they_get_alone() {
    let m = llama();
    let prompts: Vec<Vec<u32>> = (0..12).map(|i| prompt(i, 5 + i * 9)).collect();
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| alone(&m, p, 24)).collect();
    // (parallel, step tokens, KV memory): plenty; chunks of 16 tokens; a
    // pool of barely one context, so sequences wait and are preempted
    // k and v, 2 kv heads, f32 rows of 16, 2 layers: bytes per token
    let row = 2 * 2 * 16 * 4 * 2;
    for (parallel, step, mem) in [
        (16, 512, 64 << 20),
        (4, 16, 64 << 20),
        (12, 64, 2 * 160 * row),
    ] {
        let cfg = EngineConfig {
            parallel,
            step_tokens: step,
            kv_memory: mem,
            block_tokens: 8,
            ctx: 160,
            prefix_caching: false,
            ..Default::default()
        };
        let e = Engine::start(m.clone(), cfg).unwrap();
        let got = serve(&e, &prompts, 24, usize::MAX);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(&g.0, w, "parallel {parallel}, step {step}: request {i}");
            assert_eq!(g.1, Some(FinishReason::Length));
        }
        let st = &e.stats;
        assert_eq!(st.finished.load(Ordering::Relaxed), 12);
        if mem < 1 << 20 {
            assert!(
                st.preemptions.load(Ordering::Relaxed) > 0,
                "the small pool preempts"
            );
        }
        if step == 16 {
            // a 104-token prompt in chunks of at most 16
            assert!(st.steps.load(Ordering::Relaxed) >= 104 / 16);
        }
        e.shutdown(Duration::from_secs(5));
        assert_eq!(st.kv_blocks_used.load(Ordering::Relaxed), 0);
    }
}

#[test]
fn a_cached_prefix_is_reused_and_gives_the_same_tokens() {
    let m = llama();
    let system = prompt(99, 70);
    let mk = |i: usize| [system.clone(), prompt(i, 6)].concat();
    let cfg = EngineConfig {
        block_tokens: 16,
        ctx: 200,
        ..Default::default()
    };
    let e = Engine::start(m.clone(), cfg).unwrap();
    let first = serve(&e, &[mk(1)], 10, usize::MAX);
    assert_eq!(first[0].2, 0, "nothing cached yet");
    assert_eq!(first[0].0, alone(&m, &mk(1), 10));
    // the same system prompt: its 4 full blocks of 16 come from the cache
    let second = serve(&e, &[mk(2), mk(3)], 10, usize::MAX);
    for (i, r) in second.iter().enumerate() {
        assert_eq!(r.2, 64, "request {i}: cached tokens");
        assert_eq!(r.0, alone(&m, &mk(2 + i), 10), "request {i}");
    }
    // the first request's prompt and reply as a new prompt (a
    // conversation's next turn): the prompt's blocks come from the cache,
    // the reply is prefilled afresh (its cached decode-step numbers would
    // differ from a prefill's), so the tokens are what a fresh run gets
    let turn = [mk(1), first[0].0.clone()].concat();
    let again = serve(&e, std::slice::from_ref(&turn), 5, usize::MAX);
    assert_eq!(again[0].2, 64);
    assert_eq!(again[0].0, alone(&m, &turn, 5));
    assert_eq!(e.stats.prefix_hit_tokens.load(Ordering::Relaxed), 64 * 3);
    // the cache keeps its blocks; nothing else does
    e.shutdown(Duration::from_secs(5));
    let blocks = e.stats.kv_blocks_used.load(Ordering::Relaxed);
    assert_eq!(blocks, e.stats.prefix_cache_blocks.load(Ordering::Relaxed));
}

#[test]
fn a_disconnected_client_frees_its_blocks() {
    let m = llama();
    let cfg = EngineConfig {
        block_tokens: 8,
        ctx: 200,
        prefix_caching: false,
        ..Default::default()
    };
    let e = Engine::start(m, cfg).unwrap();
    let got = serve(&e, &[prompt(1, 40), prompt(2, 50)], 100, 3);
    assert!(got.iter().all(|g| g.0.len() == 3 && g.1.is_none()));
    // the engine notices at its next step
    for _ in 0..100 {
        if e.stats.running.load(Ordering::Relaxed) == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(e.stats.running.load(Ordering::Relaxed), 0);
    assert_eq!(e.stats.kv_blocks_used.load(Ordering::Relaxed), 0);
    assert_eq!(e.stats.cancelled.load(Ordering::Relaxed), 2);
}

#[test]
fn sliding_window_layers_are_paged_invariant_and_share_prefixes() {
    // the tiny Gemma 3: windows of 8 on 5 of 6 layers, one global layer;
    // served, its window layers are paged (every token kept, the band
    // read). Quantized at load (q8_0): the quantized kernels compute each
    // row alone; dense f32 weights go through gemm, whose last bits depend
    // on the number of rows, so only quantized models are batch-invariant
    let q8 = hf_decoder::quant_type("q8_0").unwrap();
    let g = hf_decoder::load(&data().join("gemma3"), Some(q8), &Device::Cpu).unwrap();
    let mut m = g.build().unwrap();
    // bit for bit: whole, or in two chunks, in blocks of 8 or 5, with f32
    // and f16 caches (their reads across pages differ)
    let p = prompt(7, 45);
    for kv in [KvDType::F32, KvDType::F16] {
        m.kv_dtype = kv;
        let logits = |bt: usize, cut: usize| {
            let pool = m.kv_pool(bt, 10_000).unwrap();
            let mut st = m.new_state_paged(&pool, None).unwrap();
            if cut > 0 {
                m.step_many(&mut [&mut st], &[&p[..cut]]).unwrap();
            }
            let a = m.step_many(&mut [&mut st], &[&p[cut..]]).unwrap();
            let b = m.step_many(&mut [&mut st], &[&[7u32][..]]).unwrap();
            (a, b)
        };
        let whole = logits(8, 0);
        for (bt, cut) in [(8, 13), (5, 30), (8, 2)] {
            assert!(logits(bt, cut) == whole, "{kv}: block {bt}, cut {cut}");
        }
    }
    m.kv_dtype = KvDType::F32;
    let m = Arc::new(m);
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(i, 4 + 7 * i)).collect();
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| alone(&m, p, 20)).collect();
    let cfg = EngineConfig {
        block_tokens: 8,
        step_tokens: 16,
        ctx: 128,
        ..Default::default()
    };
    let e = Engine::start(m.clone(), cfg).unwrap();
    let got = serve(&e, &prompts, 20, usize::MAX);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(&g.0, w, "request {i}");
    }
    // the same prompt again: its blocks, every layer's, from the cache
    let again = serve(&e, &prompts[5..], 20, usize::MAX);
    assert_eq!(again[0].2, 32, "cached tokens");
    assert_eq!(again[0].0, got[5].0);
}

#[test]
fn requests_that_cannot_run_are_refused_at_once() {
    let m = llama();
    let cfg = EngineConfig {
        ctx: 100,
        max_queue: 0,
        ..Default::default()
    };
    let e = Engine::start(m.clone(), cfg).unwrap();
    let (tx, _rx) = mpsc::channel();
    let req = |p: Vec<u32>| Request {
        prompt: p,
        max_tokens: 4,
        sampling: SamplingParams::default(),
        stop_ids: vec![],
        logprobs: None,
        sink: Box::new(Chan {
            tx: tx.clone(),
            tokens: 0,
            limit: 9,
        }),
    };
    let err = e.submit(req(prompt(0, 100))).unwrap_err().to_string();
    assert!(err.contains("--ctx"), "{err}");
    assert!(e.submit(req(vec![])).is_err());
    assert_eq!(
        e.submit(req(prompt(0, 10))).unwrap_err(),
        attend::serve::SubmitError::QueueFull
    );
    // a pool that cannot hold one context is refused when starting
    let small = EngineConfig {
        ctx: 100,
        kv_memory: 1000,
        ..Default::default()
    };
    let err = Engine::start(m, small).err().unwrap().to_string();
    assert!(err.contains("kv-memory"), "{err}");
}

/// A draft maker for the engine.
fn maker(
    f: impl Fn() -> Box<dyn attend::decode::speculative::Draft + Send> + Send + Sync + 'static,
) -> Option<attend::serve::engine::DraftMaker> {
    Some(attend::serve::engine::DraftMaker(Arc::new(f)))
}

#[test]
fn speculative_serving_gives_the_tokens_of_plain_serving() {
    use attend::decode::heads::{Heads, HeadsConfig, HeadsDraft};
    use attend::decode::speculative::{Lookup, SkipDraft};
    // a repeating prompt or two (lookup copies), varied ones; several
    // sequences at once, more than draft_max_batch at first (no drafts),
    // then fewer as they finish (drafts), a small pool (preemption), and
    // f16 caches read across pages
    let m = llama_kv(KvDType::F16);
    let rep: Vec<u32> = (0..9).map(|j| (j * 29 % 250 + 5) as u32).collect();
    let mut prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(i, 5 + i * 13)).collect();
    prompts.push(rep.iter().copied().cycle().take(40).collect());
    prompts.push(rep.iter().copied().cycle().take(23).collect());
    let n: Vec<usize> = (0..prompts.len()).map(|i| 10 + 6 * i).collect();
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&n)
        .map(|(p, &k)| alone(&m, p, k))
        .collect();
    let cfg = HeadsConfig::for_model(&m, 3, 1, (0..m.cfg.vocab_size as u32).collect(), "test");
    let store = attend::nn::ParamStore::new(2, candle_core::DType::F32, Device::Cpu);
    let heads = Heads::new(cfg, &store, &m).unwrap();
    let skip = attend::model::Skip {
        ffn: vec![false, true],
        ..Default::default()
    };
    let none = attend::model::Skip::default();
    let makers = [
        ("lookup", maker(|| Box::new(Lookup { max_ngram: 3 }))),
        (
            "heads",
            maker(move || {
                Box::new(HeadsDraft {
                    heads: heads.clone(),
                })
            }),
        ),
        (
            "skip",
            maker(move || Box::new(SkipDraft { skip: skip.clone() })),
        ),
        (
            "skip nothing",
            maker(move || Box::new(SkipDraft { skip: none.clone() })),
        ),
    ];
    let row = 2 * 2 * 16 * 2 * 2;
    for (name, draft) in makers {
        for (parallel, mem) in [(8, 64 << 20), (8, 2 * 200 * row)] {
            let cfg = EngineConfig {
                parallel,
                kv_memory: mem,
                block_tokens: 8,
                ctx: 200,
                step_tokens: 64,
                draft: draft.clone(),
                draft_k: 4,
                draft_max_batch: 3,
                ..Default::default()
            };
            let e = Engine::start(m.clone(), cfg).unwrap();
            // each request its own max_tokens
            let rxs: Vec<_> = prompts
                .iter()
                .zip(&n)
                .map(|(p, &k)| {
                    let (tx, rx) = mpsc::channel();
                    e.submit(Request {
                        prompt: p.clone(),
                        max_tokens: k,
                        sampling: SamplingParams::default(),
                        stop_ids: vec![],
                        logprobs: Some(2),
                        sink: Box::new(Chan {
                            tx,
                            tokens: 0,
                            limit: usize::MAX,
                        }),
                    })
                    .unwrap();
                    rx
                })
                .collect();
            for (i, rx) in rxs.into_iter().enumerate() {
                let mut ids = vec![];
                for ev in rx.iter() {
                    match ev {
                        Event::Token { id, logprob } => {
                            let lp = logprob.expect("asked for");
                            // the token's logprob, from its own row
                            assert!(lp.logprob <= 0.0 && lp.top.len() == 2);
                            assert!(lp.top[0].1 >= lp.logprob - 1e-4, "greedy: the top token");
                            ids.push(id)
                        }
                        Event::Done { finish, .. } => {
                            assert_eq!(finish, FinishReason::Length);
                            break;
                        }
                        Event::Error(m) => panic!("engine error: {m}"),
                    }
                }
                assert_eq!(ids, want[i], "{name}, pool {mem}: request {i}");
            }
            let st = &e.stats;
            let (passes, drafted, accepted) = (
                st.spec_passes.load(Ordering::Relaxed),
                st.spec_drafted.load(Ordering::Relaxed),
                st.spec_accepted.load(Ordering::Relaxed),
            );
            assert!(
                passes > 0 && accepted <= drafted,
                "{name}: {passes} {drafted} {accepted}"
            );
            if name == "skip nothing" {
                assert_eq!(accepted, drafted, "the model's own tokens");
            }
            let at: u64 = st
                .spec_accepted_at
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .sum();
            assert_eq!(at, accepted);
            e.shutdown(Duration::from_secs(5));
            // what is left is the prefix cache's
            assert_eq!(
                st.kv_blocks_used.load(Ordering::Relaxed),
                st.prefix_cache_blocks.load(Ordering::Relaxed),
                "{name}"
            );
        }
    }
}
