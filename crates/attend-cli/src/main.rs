//! `attend`: the command line. Each subcommand parses flags, calls the
//! library and prints; no model logic lives here.

/// `println!` for command output: a closed pipe ends the program quietly
/// (exit 0), any other write error (a full disk) is returned with `?` and
/// reported in one line — never the panic `println!` gives.
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))?
    };
    ($($t:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($t)*)))?
    };
}

/// `print!` for command output, as `outln!`.
macro_rules! out {
    ($($t:tt)*) => {
        $crate::out::write(format_args!($($t)*))?
    };
}

mod out {
    use std::io::Write;

    /// Write to stdout (flushed, so streamed text appears as it comes).
    pub fn write(args: std::fmt::Arguments) -> std::io::Result<()> {
        let mut o = std::io::stdout().lock();
        match o.write_fmt(args).and_then(|_| o.flush()) {
            Ok(()) => Ok(()),
            // the reader has gone (`| head`): nothing left to say
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
            Err(e) => Err(std::io::Error::new(
                e.kind(),
                format!("writing to stdout: {e}"),
            )),
        }
    }
}

mod bench_cmd;
mod draft_cmd;
mod ffn_sweep_cmd;
mod frontier_cmd;
mod kv_cmd;
mod load;
mod prune_cmd;
mod run_cmd;
mod serve_cmd;
mod train_cmd;

/// candle allocates a fresh buffer for every op; glibc's malloc returns large
/// ones to the kernel each time (mmap/munmap and page faults), mimalloc keeps
/// and reuses them: +15-25% training throughput here (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tell the allocator never to purge freed memory back to the kernel.
/// Training frees and reallocates the same large tensors every step; purged
/// pages come back as page faults whose zeroing took 18% of a DeltaNet step
/// (`perf`, sequence 256). The numbers are mimalloc v3's option indices
/// (`mi_option_purge_delay`, and `mi_option_os_tag` to check the layout by
/// its default, 100), which its -sys crate does not name.
fn keep_freed_memory() {
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    const OS_TAG: libmimalloc_sys::mi_option_t = 18;
    // Safety: plain option calls, before any thread of ours starts.
    unsafe {
        if libmimalloc_sys::mi_option_get(OS_TAG) == 100 {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        }
    }
}

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "attend",
    version,
    allow_negative_numbers = true,
    about = "A Rust engine for the Transformer and its efficient descendants",
    long_about = "attend trains Transformers of many shapes from scratch on built-in tasks, \
decodes them greedily, by sampling or by beam search, and measures them.\n\n\
Start with `attend demo`, then `attend train --task reverse --out runs/rev` and \
`attend eval --checkpoint runs/rev`."
)]
struct Cli {
    /// Threads. Training splits each batch into this many shards, one per
    /// thread (data parallel); each shard's tensor ops run single-threaded,
    /// since at these model sizes candle's per-op thread barrier costs more
    /// than a second core saves (BENCHMARKS.md). Default: all cores.
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// The most memory a model, KV cache, batch or beam may take: larger
    /// ones are refused before anything is allocated, naming the setting
    /// that asked for it. Sizes like 512M, 8G, 1.5GiB. Default: this
    /// machine's physical memory.
    #[arg(long, global = true, value_name = "SIZE", value_parser = attend::util::parse_bytes)]
    max_memory: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model from scratch on a built-in task (copy, reverse, mqar, text).
    #[command(allow_negative_numbers = true)]
    Train(Box<train_cmd::TrainArgs>),
    /// Evaluate a checkpoint on its task's held-out set.
    #[command(allow_negative_numbers = true)]
    Eval(train_cmd::EvalArgs),
    /// Decode from a checkpoint: greedy, sampling or beam search.
    #[command(allow_negative_numbers = true)]
    Sample(train_cmd::SampleArgs),
    /// The main job on built-in defaults: train a small encoder–decoder on
    /// `reverse` and a small decoder on `mqar`, then print held-out scores
    /// and decoded examples (about 3 minutes on 2 cores).
    #[command(allow_negative_numbers = true)]
    Demo(train_cmd::DemoArgs),
    /// Continue a prompt with a GGUF model, streaming the text.
    #[command(allow_negative_numbers = true)]
    Generate(run_cmd::GenerateArgs),
    /// Multi-turn chat with a GGUF model's chat template (Ctrl-D ends it).
    #[command(allow_negative_numbers = true)]
    Chat(run_cmd::ChatArgs),
    /// Perplexity of a GGUF model on a text file.
    #[command(allow_negative_numbers = true)]
    Perplexity(run_cmd::PerplexityArgs),
    /// Sentence embeddings with a Hugging Face BERT encoder (one text per stdin line).
    #[command(allow_negative_numbers = true)]
    Embed(run_cmd::EmbedArgs),
    /// Token ids of a text.
    #[command(allow_negative_numbers = true)]
    Tokenize(run_cmd::TokenizeArgs),
    /// Speed and memory: prefill and decode tokens/s of a GGUF decoder, or
    /// sentences/s of an encoder directory.
    #[command(allow_negative_numbers = true)]
    Bench(bench_cmd::BenchArgs),
    /// Show a GGUF file's configuration as attend reads it, and its metadata.
    #[command(allow_negative_numbers = true)]
    Inspect(run_cmd::InspectArgs),
    /// KV-cache policies × budgets on a GGUF model: streaming perplexity
    /// against cache memory, as results.json, table.md and plot.svg.
    #[command(allow_negative_numbers = true)]
    KvSweep(kv_cmd::KvSweepArgs),
    /// Cheaper models without retraining: FFN skipping, attention / FFN /
    /// layer dropping by similarity, int8 and LLM.int8 — held-out
    /// perplexity against decode speed, KV and weight bytes, as
    /// results.json, table.md and plot.svg (`--quick`: about a minute).
    #[command(allow_negative_numbers = true)]
    PruneSweep(prune_cmd::PruneSweepArgs),
    /// An OpenAI-compatible HTTP server: chat, completions and embeddings
    /// for several users at once (continuous batching, a paged KV cache,
    /// prefix caching), a chat page at /, Prometheus metrics.
    #[command(allow_negative_numbers = true)]
    Serve(Box<serve_cmd::ServeArgs>),
    /// Turn a trained dense checkpoint into a mixture of experts whose
    /// experts start as copies of each FFN (sparse upcycling), and train on.
    Upcycle(train_cmd::UpcycleArgs),
    /// Train channel mixers (dense, MoE, MatFormer, low-rank,
    /// block-diagonal FFNs) on one token budget and compare held-out loss
    /// against FLOPs, time and active parameters (`--quick`: ~1.5 minutes).
    #[command(allow_negative_numbers = true)]
    FfnSweep(ffn_sweep_cmd::FfnSweepArgs),
    /// Write a MatFormer model's submodel (a FFN width per block,
    /// Mix'n'Match) as a standalone checkpoint.
    Extract(train_cmd::ExtractArgs),
    /// Train MQAR models over attention mechanisms × sizes × key–value
    /// pairs: recall against decode-state bytes, as results.json, table.md
    /// and plots (the default sweep: 27 models, about 3 hours on 2 cores;
    /// `--resume` continues a stopped one; `--quick`: about 30 seconds).
    #[command(allow_negative_numbers = true)]
    Frontier(frontier_cmd::FrontierArgs),
    /// Train Hydra draft heads for a model on text it writes itself, for
    /// `--draft heads:PATH` (speculative decoding).
    #[command(allow_negative_numbers = true)]
    TrainDraftHeads(draft_cmd::TrainHeadsArgs),
    /// Find which sublayers a `--draft skip:` draft should leave out:
    /// a greedy search on calibration text, the best sets timed for real.
    #[command(allow_negative_numbers = true)]
    DraftSearch(draft_cmd::DraftSearchArgs),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line: clap's first line names the flag and the bad value;
            // for missing arguments the names are on the lines after it
            let text = e.render().to_string();
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
                .collect();
            let first = match e.kind() {
                clap::error::ErrorKind::MissingRequiredArgument => lines.join(" "),
                clap::error::ErrorKind::UnknownArgument if hyphen_value(&e).is_some() => {
                    hyphen_value(&e).unwrap_or_default()
                }
                _ => negative_count(&e).unwrap_or_else(|| {
                    lines.first().unwrap_or(&"error: bad arguments").to_string()
                }),
            };
            eprintln!("{first} (see --help)");
            std::process::exit(2);
        }
    };
    if let Some(b) = cli.max_memory {
        attend::util::set_memory_limit(b);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cli.threads.unwrap_or(cores);
    // each thread is an OS thread with its own stack (rayon's pool, the
    // training shards): far more than the cores only costs memory
    let most = 8 * cores;
    if threads == 0 || threads > most {
        eprintln!(
            "error: --threads must be between 1 and {most} (8 × the {cores} cores here), got {threads}"
        );
        std::process::exit(2);
    }
    // candle reads this once, at its first tensor op. Training runs candle
    // on one thread per data-parallel shard; inference gives it every thread.
    let training = matches!(
        cli.cmd,
        Cmd::Train(_)
            | Cmd::Upcycle(_)
            | Cmd::FfnSweep(_)
            | Cmd::Extract(_)
            | Cmd::Demo(_)
            | Cmd::Eval(_)
            | Cmd::Sample(_)
            | Cmd::Frontier(_)
    );
    std::env::set_var(
        "CANDLE_NUM_THREADS",
        if training {
            "1".to_string()
        } else {
            threads.to_string()
        },
    );
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    if training {
        keep_freed_memory();
    }
    train_cmd::THREADS.store(threads, std::sync::atomic::Ordering::Relaxed);
    let result: Result<()> = match cli.cmd {
        Cmd::Train(a) => train_cmd::train(*a).context("train failed"),
        Cmd::Eval(a) => train_cmd::eval(a).context("eval failed"),
        Cmd::Sample(a) => train_cmd::sample(a).context("sample failed"),
        Cmd::Demo(a) => train_cmd::demo(a).context("demo failed"),
        Cmd::Generate(a) => run_cmd::generate_cmd(a).context("generate failed"),
        Cmd::Chat(a) => run_cmd::chat_cmd(a).context("chat failed"),
        Cmd::Perplexity(a) => run_cmd::perplexity_cmd(a).context("perplexity failed"),
        Cmd::Embed(a) => run_cmd::embed_cmd(a).context("embed failed"),
        Cmd::Tokenize(a) => run_cmd::tokenize_cmd(a).context("tokenize failed"),
        Cmd::Bench(a) => bench_cmd::bench_cmd(a).context("bench failed"),
        Cmd::Inspect(a) => run_cmd::inspect_cmd(a).context("inspect failed"),
        Cmd::KvSweep(a) => kv_cmd::kv_sweep_cmd(a).context("kv-sweep failed"),
        Cmd::PruneSweep(a) => prune_cmd::prune_sweep_cmd(a).context("prune-sweep failed"),
        Cmd::Frontier(a) => frontier_cmd::frontier_cmd(a).context("frontier failed"),
        Cmd::Upcycle(a) => train_cmd::upcycle(a).context("upcycle failed"),
        Cmd::FfnSweep(a) => ffn_sweep_cmd::ffn_sweep_cmd(a).context("ffn-sweep failed"),
        Cmd::Extract(a) => train_cmd::extract(a).context("extract failed"),
        Cmd::Serve(a) => serve_cmd::serve_cmd(*a).context("serve failed"),
        Cmd::TrainDraftHeads(a) => {
            draft_cmd::train_heads_cmd(a).context("train-draft-heads failed")
        }
        Cmd::DraftSearch(a) => draft_cmd::draft_search_cmd(a).context("draft-search failed"),
    };
    if let Err(e) = result {
        // One line: the context chain, outermost first; a config field that
        // a flag sets is shown with the flag; a message of several lines
        // (a dependency's) is joined into the one
        let msg: Vec<String> = e
            .chain()
            .map(|c| match c.downcast_ref::<attend::Error>() {
                Some(attend::Error::Config { field, msg }) => match flag_for(field) {
                    Some(flag) => format!("invalid config: `{field}` ({flag}) {msg}"),
                    None => c.to_string(),
                },
                _ => c.to_string(),
            })
            .map(|m| {
                m.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .collect();
        eprintln!("error: {}", msg.join(": "));
        std::process::exit(1);
    }
}

/// The flag that sets a config field, where one does (train, demo, eval,
/// sample, frontier): errors from the library name the field.
fn flag_for(field: &str) -> Option<&'static str> {
    Some(match field {
        "d_model" => "--d-model",
        "max_len" => "--context",
        "n_heads" => "--n-heads",
        "n_kv_heads" => "--n-kv-heads",
        "head_dim" => "--head-dim",
        "d_ff" => "--d-ff",
        "n_encoder_layers" => "--encoder-layers / --layers",
        "n_decoder_layers" => "--decoder-layers / --layers",
        "vocab_size" | "vocab" => "--vocab",
        "min_len" => "--min-len",
        "n_pairs" => "--n-pairs",
        "seq_len" => "--seq-len",
        "val_fraction" => "--val-fraction",
        "lr" => "--lr",
        "weight_decay" => "--weight-decay",
        "clip" => "--clip",
        "label_smoothing" => "--label-smoothing",
        "dropout" => "--dropout",
        "rope_theta" => "--rope-theta",
        "batch_size" => "--batch-size",
        "steps" => "--steps",
        "warmup" => "--warmup",
        "beam" => "--beam",
        "alpha" => "--alpha",
        "temperature" => "--temperature",
        "top_k" => "--top-k",
        "top_p" => "--top-p",
        "n_eval" => "--n-eval",
        "mechanism" => "--mechanism",
        "layer_mechanisms" => "--layer-mechanisms",
        "kv-memory" => "--kv-memory",
        "kv-block" => "--kv-block",
        "parallel" => "--parallel",
        "step-tokens" => "--step-tokens",
        _ => return None,
    })
}

/// A negative number given to a count flag: "--max-tokens must be ≥ 0,
/// got -1" instead of clap's "invalid digit found in string".
fn negative_count(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    if e.kind() != clap::error::ErrorKind::ValueValidation {
        return None;
    }
    let value = match e.get(ContextKind::InvalidValue)? {
        ContextValue::String(v) => v.clone(),
        _ => return None,
    };
    let arg = match e.get(ContextKind::InvalidArg)? {
        ContextValue::String(a) => a.split_whitespace().next()?.to_string(),
        _ => return None,
    };
    (value.starts_with('-') && value[1..].parse::<f64>().is_ok())
        .then(|| format!("error: {arg} must be ≥ 0, got {value}"))
}

/// A flag's value that starts with `-` but is not a plain negative number
/// (`--lr -inf`, `--max-memory -5G`): clap takes it for a flag of its own
/// and says only "unexpected argument '-i'". Name the flag and the value
/// instead.
fn hyphen_value(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    let arg = match e.get(ContextKind::InvalidArg)? {
        ContextValue::String(a) => a.clone(),
        _ => return None,
    };
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a.starts_with(&arg))?;
    let (flag, value) = (args.get(i.checked_sub(1)?)?, &args[i]);
    // a value: a number or a size, signed (`-inf`, `-1e3`, `-5G`)
    let numeric = value[1..].starts_with(|c: char| c.is_ascii_digit() || c == '.')
        || value[1..].parse::<f64>().is_ok();
    (flag.starts_with("--") && !flag.contains('=') && numeric).then(|| {
        format!("error: invalid value '{value}' for '{flag}': write {flag}={value} to pass a value that starts with '-'")
    })
}
