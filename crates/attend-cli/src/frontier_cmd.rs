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
    /// by `;`; `SPEC@D` trains that one at width D only (instead of every
    /// --d-model). Default: softmax, a window of 64, Taylor linear attention
    /// (feature dimension 16), the BASED stack, RetNet decay, GLA, DeltaNet,
    /// Gated DeltaNet and Mamba2 at width 64, the last five again at
    /// width 96 (2.25x their state: 36 KB, the small BASED stack's), and
    /// windows of 16 and 128, the Taylor map of 8 dimensions and a smaller
    /// BASED stack (dim 8, window 32), so that every family spans a range
    /// of state sizes.
    #[arg(long, value_delimiter = ';')]
    mechanisms: Vec<String>,
    /// Key–value pairs per sequence: every model is scored on held-out
    /// sequences of each count, and trained on them (several: a uniform
    /// mixture, as Zoology trains). Default 16,32,64; 4 with --quick.
    #[arg(long, value_delimiter = ',')]
    pairs: Vec<usize>,
    /// Curriculum STEPS:PAIRS: the first STEPS training steps use only
    /// sequences of PAIRS pairs; `none` for none. Default with several
    /// --pairs: 60% of --steps on the fewest, 3000:16 by default (at
    /// sequence 256 softmax attention's induction circuit forms on 16 pairs
    /// by ~3,000 steps and then extends to 64 in a few hundred, where
    /// trained on 32 or 64 from the start it does not form in 4,000 steps,
    /// BENCHMARKS.md); none with one.
    #[arg(long)]
    curriculum: Option<String>,
    /// Model widths to sweep, e.g. 64,128 (each mechanism without an `@D`
    /// at each; the state of linear and recurrent mixers grows with the
    /// width).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    d_model: Vec<usize>,
    /// Sequence length (default 256; 32 with --quick).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Vocabulary: keys and values (default 256: 127 keys, twice the most
    /// pairs a sequence holds; 32 with --quick).
    #[arg(long)]
    vocab: Option<usize>,
    /// Training steps per model (default 5000: the 3,000 of the curriculum
    /// and 2,000 on the mixture; 400 with --quick).
    #[arg(long)]
    steps: Option<u64>,
    /// Sequences per step (default 32; the MQAR preset's 64 with --quick).
    #[arg(long)]
    batch_size: Option<usize>,
    /// The FFN's width as a multiple of the model's (the MQAR preset's 4;
    /// Zoology's MQAR models have none, but here softmax attention's
    /// induction circuit did not form in 5,000 steps with a FFN of 1x,
    /// BENCHMARKS.md).
    #[arg(long, default_value_t = 4)]
    d_ff_mult: usize,
    #[arg(long, default_value_t = 500)]
    n_eval: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Peak learning rates to sweep for every (mechanism, pairs, width):
    /// each is trained at each, the table lists every run and the plots the
    /// best.
    #[arg(long, value_delimiter = ',', conflicts_with = "tune_lrs")]
    lrs: Vec<f64>,
    /// Peak learning rates to tune each family with: the family's first
    /// spec that runs at the first --d-model (its tuner) is trained at
    /// each, and every other point of the family (its other widths and
    /// settings, `window:w=16` after `window:w=64`) trains at the tuner's
    /// best of them — the highest mean accuracy over --pairs (ties: the
    /// first).
    /// Default without --lrs: 3e-3,1e-3 (the MQAR preset's and a third of
    /// it); with --quick: the preset's alone.
    #[arg(long, value_delimiter = ',')]
    tune_lrs: Vec<f64>,
    /// Four small models at 4 pairs: about 30 seconds.
    #[arg(long)]
    quick: bool,
    /// Where results.json, table.md and the plots go.
    #[arg(long, default_value = "frontier")]
    out: PathBuf,
    /// Print results.json to stdout.
    #[arg(long)]
    json: bool,
    /// Keep the runs already in --out's results.json (same sequence length,
    /// vocabulary, pairs, curriculum, steps, seed and evaluation size) and
    /// train only the rest:
    /// a long sweep continues where it stopped. The reports are rewritten
    /// after every run either way.
    #[arg(long)]
    resume: bool,
}

const DEFAULT: [&str; 18] = [
    "softmax",
    "window:w=64",
    "linear:map=taylor,dim=16",
    "based-stack",
    "decay",
    "gla",
    "deltanet",
    "gated-deltanet",
    "mamba2",
    // the fixed-state families again at 2.25x the state (36 KB, the
    // small BASED stack's; width 128's 4x took 2.5x the time of width 64)
    "decay@96",
    "gla@96",
    "deltanet@96",
    "gated-deltanet@96",
    "mamba2@96",
    // the others at other sizes: a window of 16 (the fixed states' 16 KB)
    // and 128, the Taylor map of 8 dimensions, a smaller BASED stack
    "window:w=16",
    "window:w=128",
    "linear:map=taylor,dim=8",
    "based-stack:dim=8,w=32",
];
const DEFAULT_TUNE_LRS: [f64; 2] = [3e-3, 1e-3];
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
        vec![16, 32, 64]
    };
    let steps = a.steps.unwrap_or(if a.quick { 400 } else { 5000 });
    let curriculum = match a.curriculum.as_deref() {
        Some("none") => None,
        Some(c) => Some(
            crate::train_cmd::parse_curriculum(c)
                .map_err(|e| anyhow::anyhow!("--curriculum: {e}"))?,
        ),
        // the default: 60% of the steps on the fewest pairs, when there
        // are several (3000:16 by default)
        None if pairs.len() > 1 => pairs.iter().min().map(|&fewest| (steps * 3 / 5, fewest)),
        None => None,
    };
    let setup = FrontierSetup {
        seq_len: a.seq_len.unwrap_or(if a.quick { 32 } else { 256 }),
        pairs: pairs.clone(),
        curriculum,
        vocab: a.vocab.unwrap_or(if a.quick { 32 } else { 256 }),
        steps,
        d_ff_mult: a.d_ff_mult,
        n_eval: a.n_eval,
        seed: a.seed,
        shards: crate::train_cmd::threads(),
        // (the MQAR preset's batch with --quick)
        batch_size: Some(match (a.batch_size, a.quick) {
            (Some(b), _) => b,
            (None, true) => attend::train::presets::preset("mqar")?.2.batch_size,
            (None, false) => 32,
        }),
    };
    if setup.batch_size == Some(0) {
        bail!("--batch-size must be at least 1");
    }
    if setup.d_ff_mult == 0 {
        bail!("--d-ff-mult must be at least 1");
    }
    // `SPEC@D`: that mechanism at width D only
    let mut specs: Vec<(String, Option<usize>)> = vec![];
    for m in &mechanisms {
        specs.push(match m.rsplit_once('@') {
            Some((spec, d)) => match d.parse::<usize>() {
                Ok(d) if d > 0 => (spec.to_string(), Some(d)),
                _ => bail!("--mechanisms: `{m}`: the width after `@` must be a positive number"),
            },
            None => (m.clone(), None),
        });
    }
    for (m, _) in &specs {
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
    if let Some((_, p)) = curriculum.filter(|&(_, p)| 2 * p + 2 > setup.seq_len || p == 0) {
        bail!(
            "--curriculum: {p} pairs do not fit a sequence of {} tokens",
            setup.seq_len
        );
    }
    for (flag, lrs) in [("--lrs", &a.lrs), ("--tune-lrs", &a.tune_lrs)] {
        if let Some(lr) = lrs.iter().find(|l| !(l.is_finite() && **l > 0.0)) {
            bail!("{flag}: {lr} is not a positive learning rate");
        }
    }
    let tune_lrs: Vec<f64> = match (a.tune_lrs.is_empty(), a.lrs.is_empty(), a.quick) {
        (false, _, _) => a.tune_lrs.clone(),
        (true, true, false) => DEFAULT_TUNE_LRS.to_vec(),
        _ => vec![],
    };
    let lrs: Vec<Lr> = if !tune_lrs.is_empty() {
        vec![Lr::Tuned]
    } else if a.lrs.is_empty() {
        vec![Lr::Fixed(None)]
    } else {
        a.lrs.iter().map(|&l| Lr::Fixed(Some(l))).collect()
    };
    if let Some(&d) = a.d_model.iter().find(|&&d| d == 0) {
        bail!("--d-model: {d} is not a width");
    }
    let first_width = a.d_model[0];
    // tuning is per family: the first spec of each family that runs at the
    // first width is its family's tuner; the family's other specs (other
    // settings, other widths) train at the tuner's best rate
    let tuner: Vec<Option<String>> = specs
        .iter()
        .map(|(m, _)| {
            let f = attend::eval::frontier::family(m);
            specs
                .iter()
                .find(|(t, w)| {
                    attend::eval::frontier::family(t) == f && w.is_none_or(|d| d == first_width)
                })
                .map(|(t, _)| t.clone())
        })
        .collect();
    let mut points: Vec<(FrontierPoint, Lr, Option<String>)> = vec![];
    // tuning first: every family's tuner at each --tune-lrs and the first width
    for ((m, _), t) in specs.iter().zip(&tuner) {
        if t.as_deref() == Some(m.as_str()) {
            for &lr in &tune_lrs {
                points.push((point(m, first_width, Some(lr)), Lr::Fixed(Some(lr)), None));
            }
        }
    }
    for ((m, width), t) in specs.iter().zip(&tuner) {
        let is_tuner = t.as_deref() == Some(m.as_str());
        let widths = match width {
            Some(d) => std::slice::from_ref(d),
            None => &a.d_model[..],
        };
        for &d_model in widths {
            if !tune_lrs.is_empty() && is_tuner && d_model == first_width {
                continue; // a tuning point
            }
            for &lr in &lrs {
                points.push((point(m, d_model, None), lr, t.clone()));
            }
        }
    }
    let mut results: Vec<FrontierResult> = if a.resume {
        previous_runs(&a.out, &setup)?
    } else {
        vec![]
    };
    // keep earlier runs of this sweep's points only (a tuned point: at one
    // of the tuning rates), in the sweep's order
    let candidates = |lr: Lr| -> Vec<Option<f64>> {
        match lr {
            Lr::Fixed(l) => vec![l],
            Lr::Tuned => tune_lrs.iter().map(|&l| Some(l)).collect(),
        }
    };
    results.retain(|r| {
        pairs.contains(&r.n_pairs)
            && points
                .iter()
                .any(|(p, lr, _)| candidates(*lr).into_iter().any(|l| done(p, l, r)))
    });
    let already = results.len();
    if a.resume && already > 0 {
        eprintln!(
            "resuming: {already} runs already in {}",
            a.out.join("results.json").display(),
        );
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
    for (i, (p, lr, t)) in points.iter().enumerate() {
        let base = i as u64 * setup.steps;
        // a tuned point takes its family tuner's best rate, known by now
        let p = match lr {
            Lr::Fixed(lr) => FrontierPoint {
                lr: *lr,
                ..p.clone()
            },
            Lr::Tuned => FrontierPoint {
                lr: Some(best_tuning_lr(
                    &results,
                    t.as_deref().unwrap_or(&p.mechanism),
                    first_width,
                    &tune_lrs,
                )),
                ..p.clone()
            },
        };
        // done when a run of this point is there at every --pairs
        if pairs
            .iter()
            .all(|&n| results.iter().any(|r| r.n_pairs == n && done(&p, p.lr, r)))
        {
            pb.set_position(base + setup.steps);
            continue;
        }
        results.retain(|r| !done(&p, p.lr, r)); // a partial run is redone
        pb.set_message(format!("{} d={} lr={:?}", p.mechanism, p.d_model, p.lr));
        let rows = run_point(&p, &setup, |s| pb.set_position(base + s))?;
        let r = &rows[0];
        let accuracies: Vec<String> = rows
            .iter()
            .map(|r| format!("{}: {:.2}%", r.n_pairs, r.accuracy * 100.0))
            .collect();
        let line = format!(
            "{:<28} d {:>3} lr {:.0e}: accuracy at pairs {}  state {:>9} bytes  ({:.0} s)",
            r.mechanism,
            r.d_model,
            r.lr,
            accuracies.join(", "),
            r.state_bytes,
            r.seconds
        );
        log_line(&pb, line);
        results.extend(rows);
        // every finished run is on disk before the next starts
        write_reports(&a, &setup, &pairs, &results)?;
    }
    pb.finish_and_clear();
    write_reports(&a, &setup, &pairs, &results)?;
    print_report(&a.out, a.json, "results.json,table.md,plot*.svg")
}

/// How a point's learning rate is chosen.
#[derive(Clone, Copy, Debug)]
enum Lr {
    /// This one (None: the MQAR preset's).
    Fixed(Option<f64>),
    /// Its family tuner's best tuning rate.
    Tuned,
}

fn point(m: &str, d_model: usize, lr: Option<f64>) -> FrontierPoint {
    FrontierPoint {
        mechanism: m.to_string(),
        d_model,
        lr,
    }
}

/// Whether row r is of point p at learning rate lr (None: any).
fn done(p: &FrontierPoint, lr: Option<f64>, r: &FrontierResult) -> bool {
    r.mechanism == p.mechanism
        && r.d_model == p.d_model
        && lr.is_none_or(|lr| (lr - r.lr).abs() <= 1e-12 * lr)
}

/// The tuning rate at which `mechanism` at `d_model` scored the highest
/// mean accuracy over its pair counts (the first on a tie, so the order of
/// --tune-lrs breaks ties; a spec tuned only at another width takes the
/// first rate).
fn best_tuning_lr(
    results: &[FrontierResult],
    mechanism: &str,
    d_model: usize,
    tune_lrs: &[f64],
) -> f64 {
    let mut best: Option<(f64, f64)> = None; // (mean accuracy, lr)
    for &lr in tune_lrs {
        let p = point(mechanism, d_model, Some(lr));
        let acc: Vec<f64> = results
            .iter()
            .filter(|r| done(&p, Some(lr), r))
            .map(|r| r.accuracy)
            .collect();
        if acc.is_empty() {
            continue;
        }
        let mean = acc.iter().sum::<f64>() / acc.len() as f64;
        if best.is_none_or(|(b, _)| mean > b) {
            best = Some((mean, lr));
        }
    }
    best.map_or(tune_lrs[0], |(_, lr)| lr)
}

/// The runs in `out`/results.json, if it holds a sweep of the same setup
/// (an absent file is an empty sweep; another setup is an error naming the
/// field).
fn previous_runs(out: &std::path::Path, s: &FrontierSetup) -> Result<Vec<FrontierResult>> {
    let path = out.join("results.json");
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    for (field, want) in [
        ("seq_len", s.seq_len as u64),
        ("vocab", s.vocab as u64),
        ("steps", s.steps),
        ("seed", s.seed),
        ("n_eval", s.n_eval as u64),
        ("batch_size", s.batch_size.unwrap_or_default() as u64),
        ("d_ff_mult", s.d_ff_mult as u64),
    ] {
        let got = v.get(field).and_then(|x| x.as_u64());
        if got != Some(want) {
            bail!(
                "{}: field `{field}` is {} but this sweep's is {want}; --resume continues the same sweep (or pick another --out)",
                path.display(),
                got.map_or("missing".into(), |g| g.to_string())
            );
        }
    }
    let want = serde_json::json!({ "pairs": s.pairs, "curriculum": s.curriculum });
    for field in ["pairs", "curriculum"] {
        let got = v.get(field).cloned().unwrap_or(serde_json::Value::Null);
        if got != want[field] {
            bail!(
                "{}: field `{field}` is {got} but this sweep's is {}; --resume continues the same sweep (or pick another --out)",
                path.display(),
                want[field]
            );
        }
    }
    let runs = v
        .get("runs")
        .cloned()
        .with_context(|| format!("{}: no `runs`", path.display()))?;
    serde_json::from_value(runs).with_context(|| format!("{}: field `runs`", path.display()))
}

/// Each (mechanism, pairs) at the learning rate that scored best (the
/// first such run on a tie), in the order they first appear.
fn best_runs(results: &[FrontierResult]) -> Vec<&FrontierResult> {
    let mut best: Vec<&FrontierResult> = vec![];
    for r in results {
        match best.iter_mut().find(|b| {
            b.mechanism == r.mechanism && b.n_pairs == r.n_pairs && b.d_model == r.d_model
        }) {
            Some(b) if r.accuracy > b.accuracy => *b = r,
            Some(_) => {}
            None => best.push(r),
        }
    }
    best
}

/// How every model of the sweep was trained, in words.
fn training(s: &FrontierSetup) -> String {
    let pairs: Vec<String> = s.pairs.iter().map(|p| p.to_string()).collect();
    let data = if s.pairs.len() > 1 {
        format!("a uniform mixture of {} pairs", pairs.join(", "))
    } else {
        format!("{} pairs", pairs[0])
    };
    let batch = s.batch_size.unwrap_or_default();
    match s.curriculum {
        Some((steps, p)) if steps > 0 => format!(
            "{} steps of {batch} sequences: {} on {p} pairs (curriculum), then {data}",
            s.steps,
            steps.min(s.steps)
        ),
        _ => format!("{} steps of {batch} sequences of {data}", s.steps),
    }
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
        "n_eval": s.n_eval,
        "batch_size": s.batch_size.unwrap_or_default(),
        "d_ff_mult": s.d_ff_mult,
        "pairs": s.pairs,
        "curriculum": s.curriculum,
        "training": training(s),
        "command": crate::kv_cmd::command_line(),
        "runs": results,
    });
    attend::util::write_atomic(
        &a.out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    // mechanism, d_model, pairs, lr, state bytes, accuracy
    let cells = |r: &FrontierResult| {
        vec![
            format!("`{}`", r.mechanism),
            r.d_model.to_string(),
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
        "MQAR, sequence length {}, vocabulary {}, 2 layers, FFN width {}× d_model; {}; accuracy on {} held-out sequences at each number of pairs; \
         state bytes after one sequence (batch 1), from the decode state's buffers; \
         train s: the model's training time (one model per mechanism, width and rate, scored at every number of pairs).\n\n{}",
        s.seq_len,
        s.vocab,
        s.d_ff_mult,
        training(s),
        s.n_eval,
        markdown_table(
            &["mechanism", "d_model", "pairs", "lr", "state bytes", "accuracy %", "params", "train s"],
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
                &[
                    "mechanism",
                    "d_model",
                    "pairs",
                    "best lr",
                    "state bytes",
                    "accuracy %"
                ],
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
