//! `attend bench`: prefill and decode speed of a GGUF decoder, or
//! sentences/s of an encoder, with peak memory.

use crate::run_cmd::load_gguf;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// A GGUF file (decoder) or a Hugging Face encoder directory.
    #[arg(long)]
    model: PathBuf,
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
    #[arg(long)]
    dequantize: bool,
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
    let report = if a.model.is_dir() {
        bench_encoder(&a)?
    } else {
        bench_decoder(&a)?
    };
    if a.json {
        println!("{report}");
    } else {
        for (k, v) in report.as_object().unwrap() {
            println!("{k}: {v}");
        }
    }
    Ok(())
}

fn bench_decoder(a: &BenchArgs) -> Result<serde_json::Value> {
    let l = load_gguf(&a.model, a.dequantize)?;
    if let Some(c) = a.kv.resolve(&l)? {
        return bench_capped(a, &l, &c);
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
    for _ in 0..a.reps {
        // prefill: the whole prompt into an empty cache (pp512)
        let mut state = m.new_state(None)?;
        let t0 = Instant::now();
        argmax(m.step_last(&prompt, &mut state)?)?;
        prefill.push(a.prompt_tokens as f64 / t0.elapsed().as_secs_f64());
        // decode: one token at a time after `depth` tokens of context (tg128)
        let mut state = m.new_state(None)?;
        let mut next = argmax(m.step_last(&context, &mut state)?)?;
        let t1 = Instant::now();
        for _ in 0..a.decode_tokens {
            next = argmax(m.step_last(&Tensor::new(&[[next]], &Device::Cpu)?, &mut state)?)?;
        }
        decode.push(a.decode_tokens as f64 / t1.elapsed().as_secs_f64());
    }
    Ok(serde_json::json!({
        "model": a.model,
        "weights": if a.dequantize { "f32".to_string() } else { format!("{:?}", l.gguf.tensor_types) },
        "prefill_tokens": a.prompt_tokens,
        "prefill_tokens_per_sec": median(prefill),
        "decode_tokens": a.decode_tokens,
        "decode_depth": a.depth,
        "decode_tokens_per_sec": median(decode),
        "fused": m.fused.is_some(),
        "threads": crate::train_cmd::threads(),
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// 1,000 sentences of mixed length (3–60 words) from a fixed vocabulary.
/// Decode speed with a capped KV cache at several depths into one stream.
fn bench_capped(
    a: &BenchArgs,
    l: &crate::run_cmd::Loaded,
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

fn bench_encoder(a: &BenchArgs) -> Result<serde_json::Value> {
    let e = attend::formats::hf::Embedder::load(&a.model, &Device::Cpu)?;
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
        "model": a.model,
        "sentences": sentences.len(),
        "batch_size": a.batch_size,
        "sentences_per_sec": median(rates),
        "threads": crate::train_cmd::threads(),
        "peak_rss_mib": peak_rss_mib(),
    }))
}
