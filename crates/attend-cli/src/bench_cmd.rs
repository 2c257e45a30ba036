//! `attend bench`: prefill and decode speed of a GGUF decoder, or
//! sentences/s of an encoder, with peak memory.

use crate::load::{load_model, WeightArgs};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// A GGUF file or Hugging Face decoder folder (llama, qwen2, qwen3,
    /// phi3, gemma3), or a Hugging Face encoder (BERT) folder.
    #[arg(long, required_unless_present = "mechanisms")]
    model: Option<PathBuf>,
    /// Instead of a model file: time one decode step of a 2-layer,
    /// d_model 256 decoder for each of these mechanisms (`;`-separated
    /// specs, as `attend train --mechanism`) at growing contexts.
    #[arg(long, value_delimiter = ';')]
    mechanisms: Vec<String>,
    /// Contexts for --mechanisms.
    #[arg(long, value_delimiter = ',', default_values_t = [512usize, 1024, 2048, 4096, 8192, 16384])]
    contexts: Vec<usize>,
    /// Where --mechanisms writes results.json, table.md and plot.svg.
    #[arg(long, default_value = "bench-mechanisms")]
    out: PathBuf,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens generated one at a time (llama-bench's tg128).
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Context already in the cache when decoding starts (llama-bench's
    /// `-d`); 0 decodes from an empty cache, as llama-bench's tg does.
    #[arg(long, default_value_t = 0)]
    depth: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Decoders: N sequences at once, as `attend serve` runs them (paged
    /// KV caches, one batched step for all): N prompts of --prompt-tokens
    /// prefilled together, then --decode-tokens steps that each decode one
    /// token of every sequence; reports aggregate tokens/s and ms per step.
    /// Isolates the engine's batched work from HTTP and a load generator.
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    /// Speculative decoding: generate greedily (up to --decode-tokens) for
    /// each prompt of --workload, plainly and with this draft
    /// (`lookup[:n=3,k=8]`, `model:PATH[,k=4]`), check that both give the
    /// same tokens, and
    /// report tokens/s, the speed-up and tokens per model pass.
    #[arg(long, value_name = "SPEC", requires = "workload")]
    draft: Option<crate::run_cmd::DraftSpec>,
    /// Prompts for --draft: JSON lines, each {"prompt": "..."} (raw text)
    /// or {"chat": "..."} (a user message under the model's chat
    /// template). `data/speculative/` has a copying and an open workload.
    #[arg(long, value_name = "FILE", requires = "draft")]
    workload: Option<PathBuf>,
    #[command(flatten)]
    weights: WeightArgs,
    #[command(flatten)]
    prune: crate::load::PruneArgs,
    /// Encoders: one sentence per line (default: 1,000 built-in sentences of mixed length).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Encoders: sentences per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    kv: crate::kv_cmd::KvArgs,
    /// With --kv-policy: stream random tokens one at a time and measure
    /// decode speed at these depths into the stream.
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 4096, 8000])]
    at: Vec<usize>,
    #[arg(long)]
    json: bool,
}

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn bench_cmd(a: BenchArgs) -> Result<()> {
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let report = match &a.model {
        _ if !a.mechanisms.is_empty() => bench_mechanisms(&a)?,
        Some(m) if m.is_dir() && crate::load::is_encoder_dir(m) => bench_encoder(&a, m)?,
        Some(m) => bench_decoder(&a, m)?,
        None => bail!("--model or --mechanisms is required"),
    };
    if a.json {
        outln!("{report}");
    } else {
        for (k, v) in report.as_object().unwrap() {
            outln!("{k}: {v}");
        }
    }
    Ok(())
}

fn bench_decoder(a: &BenchArgs, model: &Path) -> Result<serde_json::Value> {
    let mut l = load_model(model, &a.weights)?;
    let dropped = a.prune.apply(&mut l)?;
    if l.model.prune.active() && a.batch.is_some() {
        bail!("--batch runs the server's paged caches, which do not take --drop or --ffn-skip");
    }
    a.kv.set_dtype(&mut l);
    if let Some(c) = a.kv.resolve(&l)? {
        return bench_capped(a, &l, &c);
    }
    if let Some(n) = a.batch {
        return bench_batched(a, &l, model, n);
    }
    if let (Some(d), Some(w)) = (&a.draft, &a.workload) {
        return bench_draft(a, &l, model, d, w);
    }
    let m = &l.model;
    if a.prompt_tokens.max(a.depth + 1) + a.decode_tokens > m.cfg.max_len {
        bail!(
            "--prompt-tokens / --depth + --decode-tokens exceed the model's context ({})",
            m.cfg.max_len
        );
    }
    if a.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    // fixed pseudo-random tokens, as llama-bench uses
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut random = |n: usize| -> Result<Tensor> {
        let ids: Vec<u32> = (0..n)
            .map(|_| rng.random_range(0..m.cfg.vocab_size as u32))
            .collect();
        Ok(Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)
    };
    let (prompt, context) = (random(a.prompt_tokens)?, random(a.depth + 1)?);
    let argmax = |logits: Tensor| -> Result<u32> {
        Ok(logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?)
    };
    let (mut prefill, mut decode) = (vec![], vec![]);
    // one state, emptied before each repetition with its buffers kept, as
    // llama-bench clears one context's KV cache between repetitions
    let mut state = m.new_state(None)?;
    for _ in 0..a.reps {
        // prefill: the whole prompt into an empty cache (pp512)
        m.reset_state(&mut state)?;
        let t0 = Instant::now();
        argmax(m.step_last(&prompt, &mut state)?)?;
        prefill.push(a.prompt_tokens as f64 / t0.elapsed().as_secs_f64());
        // decode: one token at a time after `depth` tokens of context (tg128)
        m.reset_state(&mut state)?;
        let mut next = argmax(m.step_last(&context, &mut state)?)?;
        let t1 = Instant::now();
        for _ in 0..a.decode_tokens {
            next = argmax(m.step_last(&Tensor::new(&[[next]], &Device::Cpu)?, &mut state)?)?;
        }
        decode.push(a.decode_tokens as f64 / t1.elapsed().as_secs_f64());
    }
    // what the cache holds after the last decode: tokens per layer (a
    // sliding window's ring holds at most its window) and bytes
    let held: Vec<usize> = state
        .layers
        .iter()
        .map(|l| match &l.mixer {
            attend::attention::MixerState::Kv(c) => c.iter().map(|c| c.len()).sum(),
            _ => 0,
        })
        .collect();
    Ok(serde_json::json!({
        "model": model,
        "weights": if a.weights.dequantize { "f32".to_string() } else { format!("{:?}", l.gguf.tensor_types) },
        "prefill_tokens": a.prompt_tokens,
        "prefill_tokens_per_sec": median(prefill),
        "decode_tokens": a.decode_tokens,
        "decode_depth": a.depth,
        "decode_tokens_per_sec": median(decode),
        "executor": format!("{:?}", m.executor()).to_lowercase(),
        "kv_dtype": m.kv_dtype.to_string(),
        "kv_tokens_per_layer": held,
        "kv_cache_bytes": state.state_bytes(),
        "threads": crate::train_cmd::threads(),
        "peak_rss_mib": peak_rss_mib(),
        "dropped": dropped,
        "ffn_skip": m.prune.ffn_skip.as_ref().map(|f| serde_json::json!({
            "spec": f.to_string(),
            "share_skipped": m.prune.stats.snapshot().share(),
        })),
    }))
}

/// 1,000 sentences of mixed length (3–60 words) from a fixed vocabulary.
/// `--batch N`: N sequences prefilled together, then decoding together in
/// one batched step each (the server's engine without its scheduler).
fn bench_batched(
    a: &BenchArgs,
    l: &crate::load::Loaded,
    model: &Path,
    n: usize,
) -> Result<serde_json::Value> {
    let m = &l.model;
    if n == 0 {
        bail!("--batch must be at least 1");
    }
    if a.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    if a.prompt_tokens + a.decode_tokens > m.cfg.max_len {
        bail!(
            "--prompt-tokens + --decode-tokens exceed the model's context ({})",
            m.cfg.max_len
        );
    }
    // the server's block size; room for every sequence's whole context
    let bt = 32;
    let blocks = n * (a.prompt_tokens + a.decode_tokens).div_ceil(bt) * m.paged_layers()?;
    let pool = m
        .kv_pool(bt, blocks)
        .context("--batch needs a model with softmax attention layers")?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            (0..a.prompt_tokens)
                .map(|_| rng.random_range(0..m.cfg.vocab_size as u32))
                .collect()
        })
        .collect();
    let vocab = m.cfg.vocab_size;
    let argmax = |logits: &[f32]| -> Vec<u32> {
        logits
            .chunks_exact(vocab)
            .map(|r| {
                r.iter()
                    .enumerate()
                    .max_by(|x, y| x.1.total_cmp(y.1))
                    .map_or(0, |(i, _)| i as u32)
            })
            .collect()
    };
    let (mut prefill, mut decode) = (vec![], vec![]);
    for _ in 0..a.reps {
        let mut states = (0..n)
            .map(|_| m.new_state_paged(&pool, None))
            .collect::<attend::Result<Vec<_>>>()?;
        let mut refs: Vec<&mut _> = states.iter_mut().collect();
        let t0 = Instant::now();
        let ids: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
        let mut next = argmax(&m.step_many(&mut refs, &ids)?);
        prefill.push((n * a.prompt_tokens) as f64 / t0.elapsed().as_secs_f64());
        let t1 = Instant::now();
        for _ in 0..a.decode_tokens {
            let ids: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let ids: Vec<&[u32]> = ids.iter().map(|t| &t[..]).collect();
            next = argmax(&m.step_many(&mut refs, &ids)?);
        }
        decode.push((n * a.decode_tokens) as f64 / t1.elapsed().as_secs_f64());
    }
    let decode_tps = median(decode);
    Ok(serde_json::json!({
        "model": model,
        "weights": if a.weights.dequantize { "f32".to_string() } else { format!("{:?}", l.gguf.tensor_types) },
        "batch": n,
        "prefill_tokens": a.prompt_tokens,
        "prefill_tokens_per_sec": median(prefill),
        "decode_tokens": a.decode_tokens,
        "decode_tokens_per_sec": decode_tps,
        "decode_step_ms": 1e3 * n as f64 / decode_tps,
        "kv_dtype": m.kv_dtype.to_string(),
        "kv_block_tokens": bt,
        "threads": crate::train_cmd::threads(),
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// `--draft SPEC --workload FILE`: plain greedy generation against
/// speculative decoding with the draft, prompt by prompt, same tokens
/// required.
fn bench_draft(
    a: &BenchArgs,
    l: &crate::load::Loaded,
    model: &Path,
    d: &crate::run_cmd::DraftSpec,
    workload: &Path,
) -> Result<serde_json::Value> {
    use attend::decode::speculative::generate_speculative;
    use attend::decode::{generate, Sampler, SamplingParams};
    let m = &l.model;
    let tok = &l.gguf.tokenizer;
    let prompts = crate::run_cmd::read_prompts(
        l,
        model,
        workload,
        "--workload",
        ("--decode-tokens", a.decode_tokens),
    )?;
    let drafter = d.prepare(l)?;
    let greedy = || Sampler::new(SamplingParams::default());
    let (mut plain_s, mut spec_s, mut tokens) = (0f64, 0f64, 0usize);
    let (mut passes, mut accepted, mut drafted) = (0usize, 0usize, 0usize);
    let (mut drafted_at, mut accepted_at) = (vec![0usize; 0], vec![0usize; 0]);
    let bar = indicatif::ProgressBar::new(prompts.len() as u64);
    for p in &prompts {
        // the better of --reps runs of each, alternating
        let (mut best_plain, mut best_spec) = (f64::MAX, f64::MAX);
        let mut outs = (vec![], vec![]);
        for _ in 0..a.reps {
            let t0 = Instant::now();
            outs.0 = generate(m, p, None, a.decode_tokens, &mut greedy()?, tok.eos, |_| {
                Ok(())
            })?;
            best_plain = best_plain.min(t0.elapsed().as_secs_f64());
            let mut draft = d.draft(&drafter)?;
            let t1 = Instant::now();
            let (ids, st) = generate_speculative(
                m,
                m.new_state(None)?,
                p,
                a.decode_tokens,
                &mut greedy()?,
                tok.eos,
                draft.as_mut(),
                d.k,
                |_| Ok(()),
            )?;
            best_spec = best_spec.min(t1.elapsed().as_secs_f64());
            outs.1 = ids;
            (passes, accepted, drafted) = (
                passes + st.passes + st.plain_steps,
                accepted + st.accepted,
                drafted + st.drafted,
            );
            for (i, (&d, &k)) in st.drafted_at.iter().zip(&st.accepted_at).enumerate() {
                if drafted_at.len() <= i {
                    drafted_at.push(0);
                    accepted_at.push(0);
                }
                drafted_at[i] += d;
                accepted_at[i] += k;
            }
        }
        if outs.0 != outs.1 {
            bail!("speculative decoding changed the tokens of a prompt: a bug, please report it");
        }
        tokens += outs.0.len();
        plain_s += best_plain;
        spec_s += best_spec;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let reps = a.reps;
    Ok(serde_json::json!({
        "model": model,
        "workload": workload,
        "prompts": prompts.len(),
        "draft": d.describe(),
        "generated_tokens": tokens,
        "plain_tokens_per_sec": tokens as f64 / plain_s,
        "draft_tokens_per_sec": tokens as f64 / spec_s,
        "speedup": plain_s / spec_s,
        "tokens_per_pass": (tokens * reps) as f64 / passes.max(1) as f64,
        "acceptance_rate": accepted as f64 / drafted.max(1) as f64,
        // per draft position: of the passes that drafted a token there,
        // the share whose token there was kept
        "acceptance_by_position": drafted_at
            .iter()
            .zip(&accepted_at)
            .map(|(&d, &k)| k as f64 / d.max(1) as f64)
            .collect::<Vec<_>>(),
        "mean_accepted_per_verification": accepted as f64 / drafted_at.first().copied().unwrap_or(0).max(1) as f64,
        "same_tokens": true,
        "threads": crate::train_cmd::threads(),
    }))
}

/// Decode speed with a capped KV cache at several depths into one stream.
fn bench_capped(
    a: &BenchArgs,
    l: &crate::load::Loaded,
    c: &crate::kv_cmd::Capped,
) -> Result<serde_json::Value> {
    let m = &l.model;
    let mut at = a.at.clone();
    at.sort();
    let end = at.last().copied().unwrap_or(0) + a.decode_tokens;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut state = m.new_state_with_policy(&c.policy, c.retrieval.as_deref())?;
    let mut next = 0u32;
    let (mut fed, mut rows) = (0usize, vec![]);
    let pb = indicatif::ProgressBar::new(end as u64);
    for &depth in &at {
        // random context up to the depth, then timed greedy decoding
        while fed < depth {
            let id = rng.random_range(0..m.cfg.vocab_size as u32);
            m.step_last(&Tensor::new(&[[id]], &Device::Cpu)?, &mut state)?;
            fed += 1;
            pb.inc(1);
        }
        let t0 = Instant::now();
        for _ in 0..a.decode_tokens {
            let logits = m.step_last(&Tensor::new(&[[next]], &Device::Cpu)?, &mut state)?;
            next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        }
        let rate = a.decode_tokens as f64 / t0.elapsed().as_secs_f64();
        fed += a.decode_tokens;
        pb.inc(a.decode_tokens as u64);
        rows.push(serde_json::json!({
            "depth": depth,
            "decode_tokens_per_sec": rate,
            "cache_bytes": state.state_bytes(),
        }));
    }
    pb.finish_and_clear();
    Ok(serde_json::json!({
        "model": a.model,
        "kv_policy": c.policy.to_string(),
        "decode_tokens": a.decode_tokens,
        "at": rows,
        "threads": crate::train_cmd::threads(),
        "peak_rss_mib": peak_rss_mib(),
    }))
}

fn builtin_sentences() -> Vec<String> {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "attends",
        "to",
        "every",
        "token",
        "in",
        "a",
        "sequence",
        "and",
        "learns",
        "which",
        "ones",
        "matter",
        "for",
        "prediction",
        "while",
        "memory",
        "grows",
        "with",
        "context",
        "length",
        "so",
        "engineers",
        "measure",
        "speed",
        "recall",
        "quality",
        "of",
        "each",
        "mechanism",
        "on",
        "real",
        "text",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    (0..1000)
        .map(|_| {
            let n = rng.random_range(3..=60);
            (0..n)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect::<Vec<_>>()
                .join(" ")
                + "."
        })
        .collect()
}

fn bench_encoder(a: &BenchArgs, model: &Path) -> Result<serde_json::Value> {
    let e = attend::formats::hf::Embedder::load(model, &Device::Cpu)?;
    let sentences = match &a.file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("{}: cannot read", f.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect(),
        None => builtin_sentences(),
    };
    if sentences.is_empty() {
        bail!("no sentences to embed");
    }
    let mut rates = vec![];
    for _ in 0..a.reps {
        let t0 = Instant::now();
        let v = e.embed(&sentences, a.batch_size)?;
        std::hint::black_box(v);
        rates.push(sentences.len() as f64 / t0.elapsed().as_secs_f64());
    }
    Ok(serde_json::json!({
        "model": model,
        "sentences": sentences.len(),
        "batch_size": a.batch_size,
        "sentences_per_sec": median(rates),
        "threads": crate::train_cmd::threads(),
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// Median milliseconds of one decode step, at each context, for a 2-layer
/// d_model 256 decoder (random weights) per mechanism; the state's bytes.
fn bench_mechanisms(a: &BenchArgs) -> Result<serde_json::Value> {
    use attend::config::{MechanismConfig, ModelConfig, PositionKind, Shape};
    use attend::eval::report::{markdown_table, plot_svg, Axes, Series};
    let mut contexts = a.contexts.clone();
    contexts.sort();
    let max_ctx = *contexts.last().context("--contexts is empty")?;
    // a context of 0 has no place on the plot's log axis; past 2^20 tokens
    // the prefill alone takes hours on this model
    const MOST: usize = 1 << 20;
    if let Some(&c) = contexts.iter().find(|&&c| c == 0 || c > MOST) {
        bail!("--contexts: each context must be between 1 and {MOST} tokens, got {c}");
    }
    let steps = a.decode_tokens.clamp(1, 32);
    let mut runs = vec![];
    for spec in &a.mechanisms {
        let mechanism: MechanismConfig = spec
            .parse()
            .map_err(|e| anyhow::anyhow!("--mechanisms: `{spec}`: {e}"))?;
        let cfg = ModelConfig {
            shape: Shape::Decoder,
            d_model: 256,
            n_decoder_layers: 2,
            n_heads: 4,
            d_ff: 1024,
            vocab_size: 256,
            max_len: max_ctx + steps + 1,
            position: PositionKind::None,
            mechanism,
            ..ModelConfig::default()
        };
        let store = attend::nn::ParamStore::new(0, candle_core::DType::F32, Device::Cpu);
        let m = attend::Transformer::new(&cfg, &store)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut state = m.new_state(None)?;
        let pb = indicatif::ProgressBar::new(max_ctx as u64);
        pb.set_message(spec.clone());
        let mut rows = vec![];
        for &ctx in &contexts {
            // prefill to the context in chunks of 512, then time single steps
            while state.pos < ctx {
                let n = (ctx - state.pos).min(512);
                let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..256u32)).collect();
                m.step_last(
                    &Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
                    &mut state,
                )?;
                pb.set_position(state.pos as u64);
            }
            let bytes = state.state_bytes();
            let mut ms = vec![];
            for _ in 0..steps {
                let t0 = Instant::now();
                m.step_last(&Tensor::new(&[[7u32]], &Device::Cpu)?, &mut state)?;
                ms.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            // (the timed steps add `steps` tokens; the next prefill goes on from there)
            rows.push(serde_json::json!({"context": ctx, "ms_per_step": median(ms), "state_bytes": bytes}));
        }
        pb.finish_and_clear();
        runs.push(serde_json::json!({"mechanism": spec, "rows": rows}));
    }
    let report = serde_json::json!({
        "model": "decoder, 2 layers, d_model 256, 4 heads, random weights",
        "threads": crate::train_cmd::threads(),
        "steps_timed": steps,
        "command": crate::kv_cmd::command_line(),
        "runs": runs,
    });
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    attend::util::write_atomic(
        &a.out.join("results.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let mut header = vec!["mechanism".to_string()];
    header.extend(contexts.iter().map(|c| format!("{c}")));
    header.push("state bytes at the last context".into());
    let mut table_rows = vec![];
    let mut series = vec![];
    for r in report["runs"].as_array().unwrap() {
        let rows = r["rows"].as_array().unwrap();
        let mut cells = vec![format!("`{}`", r["mechanism"].as_str().unwrap())];
        cells.extend(
            rows.iter()
                .map(|x| format!("{:.3}", x["ms_per_step"].as_f64().unwrap())),
        );
        cells.push(
            rows.last()
                .map_or(String::new(), |x| x["state_bytes"].to_string()),
        );
        table_rows.push(cells);
        series.push(Series {
            name: r["mechanism"].as_str().unwrap().to_string(),
            points: rows
                .iter()
                .map(|x| {
                    (
                        x["context"].as_f64().unwrap(),
                        x["ms_per_step"].as_f64().unwrap(),
                    )
                })
                .collect(),
        });
    }
    let header: Vec<&str> = header.iter().map(|s| s.as_str()).collect();
    let table = format!(
        "Milliseconds per decode step (median of {steps}) at each context, 2-layer d_model 256 decoder, {} threads.\n\n{}",
        crate::train_cmd::threads(),
        markdown_table(&header, &table_rows)
    );
    attend::util::write_atomic(&a.out.join("table.md"), table.as_bytes())?;
    plot_svg(
        &a.out.join("plot.svg"),
        &Axes {
            title: "Decode step time vs context (2 layers, d_model 256)",
            x: "context, tokens (log)",
            y: "ms per decode step (log)",
            log_x: true,
            log_y: true,
        },
        &series,
    )?;
    if !a.json {
        out!("{table}");
    }
    Ok(report)
}
