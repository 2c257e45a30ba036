//! `attend ffn-sweep`: channel mixers trained from scratch under one token
//! budget and compared (issue 17) — held-out loss against training FLOPs,
//! wall time and active parameters per token, as results.json, table.md
//! and three plots.

use crate::kv_cmd::command_line;
use crate::train_cmd::{log_line, print_report};
use anyhow::{bail, Context, Result};
use attend::config::FfnKind;
use attend::eval::ffn_sweep::{run_spec, FfnResult, FfnSetup, FfnSpec};
use attend::eval::report::{markdown_table, plot_svg, Axes, Series};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Args)]
pub struct FfnSweepArgs {
    /// Channel mixers, separated by `;`: dense:F | moe:F,e=E,k=K (E experts
    /// of width F, top K) | matformer:F[,n=N] (N nested widths F, F/2, …,
    /// all scored from one run) | lowrank:F,r=R | blockdiag:F,b=B.
    /// Default: dense 128-1024, two MoEs with dense:512's active FFN
    /// (4 experts top-1 of 512, 8 top-2 of 256), a MatFormer of 1024, and
    /// low-rank and block-diagonal FFNs of 512 and 1024.
    #[arg(long, value_delimiter = ';')]
    kinds: Vec<String>,
    /// Byte-level training text; its last tenth is held out (default:
    /// ../shared/data/tinyshakespeare.txt).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Steps per model (default 1500; 1000 with --quick).
    #[arg(long)]
    steps: Option<u64>,
    /// Sequences per step (default 32; 16 with --quick).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per sequence (default 64, nanoGPT's block; 32 with --quick).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Model width (default 128; 64 with --quick).
    #[arg(long)]
    d_model: Option<usize>,
    /// Decoder blocks (default 4; 2 with --quick).
    #[arg(long)]
    n_layers: Option<usize>,
    #[arg(long, default_value_t = 4)]
    n_heads: usize,
    /// Peak learning rate (cosine schedule after warmup).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// The FFN activation of every kind: relu | gelu | swiglu | geglu.
    #[arg(long, default_value = "gelu", value_parser = |s: &str| serde_json::from_value::<FfnKind>(serde_json::Value::String(s.into())).map_err(|e| e.to_string()))]
    ffn: FfnKind,
    /// Held-out windows each model is scored on.
    #[arg(long, default_value_t = 200)]
    n_eval: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Six small models (d_model 64, 2 layers): about a minute and a half.
    #[arg(long)]
    quick: bool,
    /// Where results.json, table.md and the plots go.
    #[arg(long, default_value = "ffn-sweep")]
    out: PathBuf,
    /// Print results.json to stdout.
    #[arg(long)]
    json: bool,
}

const DEFAULT: [&str; 11] = [
    "dense:128",
    "dense:256",
    "dense:512",
    "dense:1024",
    "moe:512,e=4,k=1",
    "moe:256,e=8,k=2",
    "matformer:1024",
    "lowrank:512,r=32",
    "lowrank:1024,r=64",
    "blockdiag:512,b=4",
    "blockdiag:1024,b=4",
];
const QUICK: [&str; 6] = [
    "dense:64",
    "dense:256",
    "moe:64,e=4,k=1",
    "matformer:256,n=3",
    "lowrank:256,r=16",
    "blockdiag:256,b=4",
];

pub fn ffn_sweep_cmd(a: FfnSweepArgs) -> Result<()> {
    let kinds: Vec<String> = if !a.kinds.is_empty() {
        a.kinds.clone()
    } else if a.quick {
        QUICK.iter().map(|s| s.to_string()).collect()
    } else {
        DEFAULT.iter().map(|s| s.to_string()).collect()
    };
    let specs: Vec<FfnSpec> = kinds
        .iter()
        .map(|k| {
            k.parse()
                .map_err(|e: String| anyhow::anyhow!("--kinds: {e}"))
        })
        .collect::<Result<_>>()?;
    let q = a.quick;
    let setup = FfnSetup {
        data: a
            .data
            .clone()
            .unwrap_or_else(|| PathBuf::from("../shared/data/tinyshakespeare.txt")),
        d_model: a.d_model.unwrap_or(if q { 64 } else { 128 }),
        n_layers: a.n_layers.unwrap_or(if q { 2 } else { 4 }),
        n_heads: a.n_heads,
        seq_len: a.seq_len.unwrap_or(if q { 32 } else { 64 }),
        batch_size: a.batch_size.unwrap_or(if q { 16 } else { 32 }),
        steps: a.steps.unwrap_or(if q { 1000 } else { 1500 }),
        lr: a.lr,
        n_eval: a.n_eval,
        seed: a.seed,
        ffn: a.ffn,
        shards: crate::train_cmd::threads(),
    };
    if setup.steps == 0 || setup.batch_size == 0 || setup.seq_len == 0 || setup.n_eval == 0 {
        bail!("--steps, --batch-size, --seq-len and --n-eval must each be at least 1");
    }
    if !(setup.lr.is_finite() && setup.lr > 0.0) {
        bail!("--lr {} is not a positive learning rate", setup.lr);
    }
    // every model is checked before the first one trains
    for s in &specs {
        attend::eval::ffn_sweep::model_config(s, &setup)
            .map_err(|e| anyhow::anyhow!("--kinds `{}`: {e}", s.spec))?;
    }
    if !setup.data.is_file() {
        bail!("--data {}: no such file", setup.data.display());
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    let pb = ProgressBar::new(specs.len() as u64 * setup.steps);
    pb.set_style(
        ProgressStyle::with_template(
            "ffn-sweep [{elapsed_precise}] {wide_bar} {pos}/{len} steps {msg} (ETA {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let mut results: Vec<FfnResult> = vec![];
    for (i, s) in specs.iter().enumerate() {
        pb.set_message(s.spec.clone());
        let base = i as u64 * setup.steps;
        let rs = run_spec(s, &setup, |k| pb.set_position(base + k))
            .with_context(|| format!("training `{}`", s.spec))?;
        for r in &rs {
            log_line(
                &pb,
                format!(
                    "{:<22} d_ff {:>5}: held-out loss {:.4}  {:>9} active params  {:.2e} FLOPs  {:.0} s",
                    r.spec, r.d_ff, r.loss, r.active_params, r.train_flops, r.train_seconds
                ),
            );
        }
        results.extend(rs);
        write_reports(&a, &setup, &results)?;
    }
    pb.finish_and_clear();
    print_report(&a.out, a.json, "results.json,table.md,plot-*.svg")
}

fn write_reports(a: &FfnSweepArgs, s: &FfnSetup, results: &[FfnResult]) -> Result<()> {
    let json = serde_json::json!({
        "setup": s,
        "command": command_line(),
        "runs": results,
    });
    attend::util::write_atomic(
        &a.out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                format!("`{}`", r.spec),
                r.d_ff.to_string(),
                format!("{:.4}", r.loss),
                r.active_params.to_string(),
                r.total_params.to_string(),
                format!("{:.2e}", r.train_flops),
                format!("{:.0} ({})", r.train_seconds, r.trainer),
                format!("{:.0}", r.eval_tokens_per_s),
                r.agreement
                    .map_or("".into(), |x| format!("{:.1}%", 100.0 * x)),
                r.max_load.map_or("".into(), |x| format!("{x:.2}")),
            ]
        })
        .collect();
    let table = format!(
        "Byte-level {}, {} steps of {} sequences of {} ({} tokens), d_model {}, {} layers, {} FFNs, \
         lr {:.0e}; held-out loss in nats per byte on {} windows; FLOPs 6·N_active + 6·L·t·d per training token.\n\n{}",
        s.data.display(),
        s.steps,
        s.batch_size,
        s.seq_len,
        s.steps * (s.batch_size * s.seq_len) as u64,
        s.d_model,
        s.n_layers,
        serde_json::to_value(s.ffn)?.as_str().unwrap_or("?"),
        s.lr,
        s.n_eval,
        markdown_table(
            &[
                "kind",
                "d_ff",
                "held-out loss",
                "active params",
                "total params",
                "train FLOPs",
                "train s (trainer)",
                "eval tok/s",
                "top-1 = full",
                "busiest expert"
            ],
            &rows
        )
    );
    attend::util::write_atomic(&a.out.join("table.md"), table.as_bytes())?;
    let series = |x: &dyn Fn(&FfnResult) -> f64| {
        Series::group(results.iter().map(|r| (r.kind.clone(), (x(r), r.loss))))
    };
    for (file, title, xlabel, x, log_x) in [
        (
            "plot-flops.svg",
            "held-out loss vs training FLOPs",
            "training FLOPs (log)",
            &(|r: &FfnResult| r.train_flops) as &dyn Fn(&FfnResult) -> f64,
            true,
        ),
        (
            "plot-time.svg",
            "held-out loss vs training time",
            "training seconds (log)",
            &|r: &FfnResult| r.train_seconds,
            true,
        ),
        (
            "plot-params.svg",
            "held-out loss vs active parameters per token",
            "active parameters per token (log)",
            &|r: &FfnResult| r.active_params as f64,
            true,
        ),
    ] {
        let axes = Axes {
            title,
            x: xlabel,
            y: "held-out loss (nats/byte)",
            log_x,
            log_y: false,
        };
        plot_svg(&a.out.join(file), &axes, &series(x))?;
    }
    Ok(())
}
