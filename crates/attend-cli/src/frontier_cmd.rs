//! `attend frontier`: the recall–memory frontier of the attention zoo on
//! MQAR, as results.json, table.md and one plot per number of pairs.

use crate::train_cmd::{log_line, print_report};
use anyhow::{bail, Context, Result};
use attend::eval::frontier::{run_point, FrontierPoint, FrontierResult, FrontierSetup};
use attend::eval::report::{markdown_table, plot_svg, Axes, Series};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Args)]
pub struct FrontierArgs {
    /// Mechanism specs to sweep (as `attend train --mechanism`), separated
    /// by `;` (default: softmax, windows, Taylor linear attention, BASED,
    /// RetNet decay and GLA at two sizes each where they have a size knob).
    #[arg(long, value_delimiter = ';')]
    mechanisms: Vec<String>,
    /// Key–value pairs per sequence (default 4 and 16; 4 with --quick).
    #[arg(long, value_delimiter = ',')]
    pairs: Vec<usize>,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    /// Sequence length (default 64; 32 with --quick).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Vocabulary: keys and values (default 64; 32 with --quick).
    #[arg(long)]
    vocab: Option<usize>,
    /// Training steps per model (default 1500; 400 with --quick).
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long, default_value_t = 500)]
    n_eval: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Peak learning rates to sweep for every (mechanism, pairs): each is
    /// trained at each, the table lists every run and the plots the best
    /// (default: the MQAR preset's, 1e-3).
    #[arg(long, value_delimiter = ',')]
    lrs: Vec<f64>,
    /// Four small models at 4 pairs: about 2 minutes.
    #[arg(long)]
    quick: bool,
    /// Where results.json, table.md and the plots go.
    #[arg(long, default_value = "frontier")]
    out: PathBuf,
    /// Print results.json to stdout.
    #[arg(long)]
    json: bool,
}

const DEFAULT: [&str; 9] = [
    "softmax",
    "window:w=8",
    "window:w=32",
    "linear:map=taylor,dim=8",
    "linear:map=taylor,dim=16",
    "based:dim=8,w=8",
    "based:dim=16,w=16",
    "decay",
    "gla",
];
const QUICK: [&str; 4] = [
    "softmax",
    "window:w=4",
    "linear:map=taylor,dim=8",
    "based:dim=8,w=4",
];

pub fn frontier_cmd(a: FrontierArgs) -> Result<()> {
    let mechanisms: Vec<String> = if !a.mechanisms.is_empty() {
        a.mechanisms.clone()
    } else if a.quick {
        QUICK.iter().map(|s| s.to_string()).collect()
    } else {
        DEFAULT.iter().map(|s| s.to_string()).collect()
    };
    let pairs = if !a.pairs.is_empty() {
        a.pairs.clone()
    } else if a.quick {
        vec![4]
    } else {
        vec![4, 16]
    };
    let setup = FrontierSetup {
        seq_len: a.seq_len.unwrap_or(if a.quick { 32 } else { 64 }),
        vocab: a.vocab.unwrap_or(if a.quick { 32 } else { 64 }),
        steps: a.steps.unwrap_or(if a.quick { 400 } else { 1500 }),
        n_eval: a.n_eval,
        seed: a.seed,
        shards: crate::train_cmd::threads(),
    };
    for m in &mechanisms {
        if attend::config::stack_preset(m, 1)
            .map_err(|e| anyhow::anyhow!("--mechanisms: {e}"))?
            .is_none()
        {
            m.parse::<attend::config::MechanismConfig>()
                .map_err(|e| anyhow::anyhow!("--mechanisms: `{m}`: {e}"))?;
        }
    }
    if setup.n_eval == 0 {
        bail!("--n-eval must be at least 1: each model is scored on held-out sequences");
    }
    if setup.seq_len > attend::config::MAX_POSITIONS {
        bail!(
            "--seq-len {} exceeds the {} positions attend supports",
            setup.seq_len,
            attend::config::MAX_POSITIONS
        );
    }
    if let Some(&p) = pairs.iter().find(|&&p| 2 * p + 2 > setup.seq_len || p == 0) {
        bail!(
            "--pairs: {p} pairs do not fit a sequence of {} tokens",
            setup.seq_len
        );
    }
    if let Some(lr) = a.lrs.iter().find(|l| !(l.is_finite() && **l > 0.0)) {
        bail!("--lrs: {lr} is not a positive learning rate");
    }
    let lrs: Vec<Option<f64>> = if a.lrs.is_empty() {
        vec![None]
    } else {
        a.lrs.iter().map(|&l| Some(l)).collect()
    };
    let mut points: Vec<FrontierPoint> = vec![];
    for &n_pairs in &pairs {
        for m in &mechanisms {
            for &lr in &lrs {
                points.push(FrontierPoint {
                    mechanism: m.clone(),
                    d_model: a.d_model,
                    n_pairs,
                    lr,
                });
            }
        }
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    let pb = ProgressBar::new(points.len() as u64 * setup.steps);
    pb.set_style(
        ProgressStyle::with_template(
            "frontier [{elapsed_precise}] {wide_bar} {pos}/{len} steps {msg} (ETA {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let mut results = vec![];
    for (i, p) in points.iter().enumerate() {
        pb.set_message(format!("{} pairs={} lr={:?}", p.mechanism, p.n_pairs, p.lr));
        let base = i as u64 * setup.steps;
        let r = run_point(p, &setup, |s| pb.set_position(base + s))?;
        let line = format!(
            "{:<28} pairs {:>2} lr {:.0e}: accuracy {:6.2}%  state {:>9} bytes  ({:.0} s)",
            r.mechanism,
            r.n_pairs,
            r.lr,
            r.accuracy * 100.0,
            r.state_bytes,
            r.seconds
        );
        log_line(&pb, line);
        results.push(r);
    }
    pb.finish_and_clear();
    write_reports(&a, &setup, &pairs, &results)?;
    print_report(&a.out, a.json, "results.json,table.md,plot*.svg")
}

/// Each (mechanism, pairs) at the learning rate that scored best (the
/// first such run on a tie), in the order they first appear.
fn best_runs(results: &[FrontierResult]) -> Vec<&FrontierResult> {
    let mut best: Vec<&FrontierResult> = vec![];
    for r in results {
        match best
            .iter_mut()
            .find(|b| b.mechanism == r.mechanism && b.n_pairs == r.n_pairs)
        {
            Some(b) if r.accuracy > b.accuracy => *b = r,
            Some(_) => {}
            None => best.push(r),
        }
    }
    best
}

fn write_reports(
    a: &FrontierArgs,
    s: &FrontierSetup,
    pairs: &[usize],
    results: &[FrontierResult],
) -> Result<()> {
    let json = serde_json::json!({
        "task": "mqar",
        "seq_len": s.seq_len,
        "vocab": s.vocab,
        "steps": s.steps,
        "seed": s.seed,
        "command": crate::kv_cmd::command_line(),
        "runs": results,
    });
    attend::util::write_atomic(
        &a.out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    // mechanism, pairs, lr, state bytes, accuracy
    let cells = |r: &FrontierResult| {
        vec![
            format!("`{}`", r.mechanism),
            r.n_pairs.to_string(),
            format!("{:.0e}", r.lr),
            r.state_bytes.to_string(),
            format!("{:.1}", r.accuracy * 100.0),
        ]
    };
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let mut c = cells(r);
            c.extend([r.params.to_string(), format!("{:.0}", r.seconds)]);
            c
        })
        .collect();
    let table = format!(
        "MQAR, sequence length {}, vocabulary {}, {} steps, d_model {}, 2 layers; accuracy on {} held-out sequences; \
         state bytes after one sequence (batch 1), from the decode state's buffers.\n\n{}",
        s.seq_len,
        s.vocab,
        s.steps,
        a.d_model,
        s.n_eval,
        markdown_table(
            &["mechanism", "pairs", "lr", "state bytes", "accuracy %", "params", "train s"],
            &rows
        )
    );
    // the plots take each (mechanism, pairs) at its best learning rate
    let best = best_runs(results);
    let table = if best.len() < results.len() {
        let rows: Vec<Vec<String>> = best.iter().map(|r| cells(r)).collect();
        format!(
            "{table}\nAt the best learning rate of each (what the plots show):\n\n{}",
            markdown_table(
                &["mechanism", "pairs", "best lr", "state bytes", "accuracy %"],
                &rows
            )
        )
    } else {
        table
    };
    attend::util::write_atomic(&a.out.join("table.md"), table.as_bytes())?;
    let max_pairs = pairs.iter().copied().max().unwrap_or(0);
    for &np in pairs {
        let series = Series::group(
            best.iter()
                .filter(|r| r.n_pairs == np)
                .map(|r| (r.family.clone(), (r.state_bytes as f64, r.accuracy * 100.0))),
        );
        let title = format!(
            "MQAR recall vs decode-state size ({np} key-value pairs, seq {})",
            s.seq_len
        );
        let axes = Axes {
            title: &title,
            x: "decode-state bytes after the sequence (log)",
            y: "accuracy %",
            log_x: true,
            log_y: false,
        };
        plot_svg(&a.out.join(format!("plot-pairs{np}.svg")), &axes, &series)?;
        if np == max_pairs {
            plot_svg(&a.out.join("plot.svg"), &axes, &series)?;
        }
    }
    Ok(())
}
