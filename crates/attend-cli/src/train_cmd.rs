//! `train`, `eval`, `sample` and `demo`.

use anyhow::{bail, Context, Result};
use attend::config::{MechanismConfig, ModelConfig};
use attend::decode::speculative::{generate_speculative, ModelDraft};
use attend::decode::{beam_search, generate, Sampler, SamplingParams};
use attend::eval::{evaluate, EvalOptions, Metrics};
use attend::tasks::{Example, Task, TaskConfig, BOS, EOS};
use attend::train::presets::preset;
use attend::train::{load_model, Schedule, StepInfo, TrainConfig, Trainer};
use attend::Transformer;
use candle_core::{Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `--threads`, set once by `main`.
pub static THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

pub fn threads() -> usize {
    THREADS.load(std::sync::atomic::Ordering::Relaxed)
}

/// `--mechanism`: one mechanism for every layer, or a stack preset.
#[derive(Clone, Debug)]
enum MechanismArg {
    One(MechanismConfig),
    /// `based-stack[:…]`, expanded once the number of layers is known.
    Stack(String),
}

fn parse_mechanism(s: &str) -> std::result::Result<MechanismArg, String> {
    match attend::config::stack_preset(s, 1).map_err(|e| e.to_string())? {
        Some(_) => Ok(MechanismArg::Stack(s.to_string())),
        None => s
            .parse()
            .map(MechanismArg::One)
            .map_err(|e: attend::Error| e.to_string()),
    }
}

/// Parse a flag value with the same names the JSON config uses.
fn parse_enum<T: DeserializeOwned>(s: &str) -> std::result::Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|e| e.to_string())
}

#[derive(Args, Clone)]
pub struct TrainArgs {
    /// Task: copy | reverse (encoder–decoder), mqar | text (decoder).
    #[arg(long, required_unless_present = "resume")]
    task: Option<String>,
    /// Where checkpoints go.
    #[arg(long)]
    out: PathBuf,
    /// Continue from the checkpoint in --out (same data, same optimizer state).
    /// The configuration comes from the checkpoint; only --steps may change it.
    #[arg(long)]
    resume: bool,
    /// Replace the checkpoint already in --out (without it, an existing
    /// checkpoint is refused before any work starts).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Model configuration JSON (fields as in `ModelConfig`); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Text file for `--task text`.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Print the final metrics as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Skip the held-out evaluation at the end.
    #[arg(long)]
    no_eval: bool,
    /// Step through candle's autograd even where the fused trainer applies.
    /// The fused trainer (hand-written forward and backward on reused
    /// buffers, gradients equal to autograd's) runs decoder-only models with
    /// softmax or sliding-window attention or the recurrent mixers (decay,
    /// GLA, DeltaNet, Gated DeltaNet, Mamba2), pre-norm, no dropout and
    /// learned, sinusoidal, RoPE or no positions; everything else (linear
    /// and BASED layers, encoders, ALiBi, …) always steps through autograd.
    #[arg(long)]
    autograd: bool,

    // --- training ---
    /// Total optimisation steps.
    #[arg(long, help_heading = "Training")]
    steps: Option<u64>,
    #[arg(long, help_heading = "Training")]
    batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long, help_heading = "Training")]
    lr: Option<f64>,
    /// constant | inverse_sqrt (the paper's) | cosine
    #[arg(long, value_parser = parse_enum::<Schedule>, help_heading = "Training")]
    schedule: Option<Schedule>,
    /// Linear warmup steps.
    #[arg(long, help_heading = "Training")]
    warmup: Option<u64>,
    #[arg(long, help_heading = "Training")]
    weight_decay: Option<f64>,
    /// AdamW's β₁ (default 0.9).
    #[arg(long, help_heading = "Training")]
    beta1: Option<f64>,
    /// AdamW's β₂ (default 0.98; nanoGPT's recipe uses 0.99).
    #[arg(long, help_heading = "Training")]
    beta2: Option<f64>,
    /// Clip the global gradient norm (0 = off).
    #[arg(long, help_heading = "Training")]
    clip: Option<f64>,
    /// Label smoothing ε (the paper used 0.1).
    #[arg(long, help_heading = "Training")]
    label_smoothing: Option<f64>,
    /// Seed for initialisation, data and dropout: same seed, same run.
    #[arg(long, help_heading = "Training")]
    seed: Option<u64>,
    /// Checkpoint every N steps (0 = only at the end).
    #[arg(long, help_heading = "Training")]
    checkpoint_every: Option<u64>,
    /// Held-out examples to evaluate on.
    #[arg(long, help_heading = "Training")]
    n_eval: Option<usize>,
    /// Also evaluate on the held-out set every N steps (and before the first);
    /// the figures go into the progress output and `--json`'s "history".
    #[arg(long, default_value_t = 0, help_heading = "Training")]
    eval_every: u64,
    /// Stop after this step, as if interrupted (the schedule still spans --steps).
    #[arg(long, hide = true)]
    stop_after: Option<u64>,

    // --- model ---
    #[arg(long, help_heading = "Model")]
    d_model: Option<usize>,
    /// Layers in each stack (encoder and decoder).
    #[arg(long, help_heading = "Model")]
    layers: Option<usize>,
    #[arg(long, help_heading = "Model")]
    encoder_layers: Option<usize>,
    #[arg(long, help_heading = "Model")]
    decoder_layers: Option<usize>,
    #[arg(long, help_heading = "Model")]
    n_heads: Option<usize>,
    /// Key/value heads (n_heads: multi-head, 1: multi-query, between: grouped-query).
    #[arg(long, help_heading = "Model")]
    n_kv_heads: Option<usize>,
    /// Width of each attention head (default d_model / n_heads; set, the
    /// heads need not add up to d_model, as in Gemma 3).
    #[arg(long, help_heading = "Model")]
    head_dim: Option<usize>,
    /// RMSNorm (or LayerNorm, with --norm) on each query and key head before
    /// RoPE (Gemma 3, Qwen3).
    #[arg(long, help_heading = "Model")]
    qk_norm: bool,
    #[arg(long, help_heading = "Model")]
    d_ff: Option<usize>,
    /// sinusoidal | learned | rope | alibi | none
    #[arg(long, value_parser = parse_enum::<attend::config::PositionKind>, help_heading = "Model")]
    position: Option<attend::config::PositionKind>,
    #[arg(long, help_heading = "Model")]
    rope_theta: Option<f64>,
    /// relu | gelu | swiglu | geglu (GELU-tanh gate, Gemma)
    #[arg(long, value_parser = parse_enum::<attend::config::FfnKind>, help_heading = "Model")]
    ffn: Option<attend::config::FfnKind>,
    /// The FFN's weight matrices: dense | lowrank:r=R (W = U V, rank R) |
    /// blockdiag:b=B (B blocks; B divides d_model and d_ff).
    #[arg(long, value_parser = |s: &str| s.parse::<attend::config::FfnWeights>(), help_heading = "Model")]
    ffn_weights: Option<attend::config::FfnWeights>,
    /// A mixture of experts in place of every FFN:
    /// experts=E,k=K[,capacity=C][,aux=A][,z=Z] — E FFNs of --ffn's kind and
    /// --d-ff, the top K per token (softmax over their router logits), each
    /// taking at most C times its fair share of tokens (default: dropless);
    /// Switch's load-balancing loss weighted A (0.01) and the router z-loss
    /// Z (0.001). Each step's per-expert load shows in the progress line.
    #[arg(long, value_parser = |s: &str| s.parse::<attend::config::MoeConfig>(), help_heading = "Model")]
    moe: Option<attend::config::MoeConfig>,
    /// MatFormer: nested FFN widths trained jointly, largest first and the
    /// first equal to --d-ff, e.g. 512,256,128,64; each step trains one of
    /// them (drawn from the seed) in every layer. `attend extract` then
    /// writes a submodel at a width per layer (Mix'n'Match).
    #[arg(long, value_delimiter = ',', help_heading = "Model")]
    matformer: Vec<usize>,
    /// layernorm | rmsnorm
    #[arg(long, value_parser = parse_enum::<attend::config::NormKind>, help_heading = "Model")]
    norm: Option<attend::config::NormKind>,
    /// pre | post (the paper's) | sandwich (pre and post norms, Gemma 2/3)
    #[arg(long, value_parser = parse_enum::<attend::config::NormPosition>, help_heading = "Model")]
    norm_position: Option<attend::config::NormPosition>,
    #[arg(long, help_heading = "Model")]
    dropout: Option<f64>,
    /// Untie the output projection from the token embedding.
    #[arg(long, help_heading = "Model")]
    untie: bool,
    /// Longest sequence the model handles (position tables).
    #[arg(long, help_heading = "Model")]
    context: Option<usize>,
    /// Token mixer of every self-attention layer: softmax | window:w=64 |
    /// linear:map=elu|relu|taylor|performer,dim=16[,m=64] | based:dim=16,w=64,conv=3 |
    /// decay[:gamma=0.9] | gla[:rank=16,tau=16] | deltanet |
    /// gated-deltanet[:tau=16] (each takes chunk=N too); or the stack
    /// preset based-stack[:dim=16,w=64,conv=3,every=2]: BASED as the paper
    /// builds it, short-conv + Taylor linear-attention layers with a
    /// sliding-window layer every `every`-th.
    #[arg(long, value_name = "SPEC", value_parser = parse_mechanism, help_heading = "Model")]
    mechanism: Option<MechanismArg>,
    /// One mechanism per self-attention layer, encoder layers first:
    /// e.g. "softmax,based:dim=16,w=16,based" (settings after a comma belong to
    /// the mechanism before them; `;` also separates layers).
    #[arg(long, value_name = "SPECS", help_heading = "Model")]
    layer_mechanisms: Option<String>,

    // --- task ---
    /// Vocabulary size (transduction: including PAD/BOS/EOS; mqar: keys + values).
    #[arg(long, help_heading = "Task")]
    vocab: Option<usize>,
    /// Shortest source sequence (copy, reverse).
    #[arg(long, help_heading = "Task")]
    min_len: Option<usize>,
    /// Longest source sequence (copy, reverse).
    #[arg(long, help_heading = "Task")]
    max_len: Option<usize>,
    /// Sequence length (mqar, text).
    #[arg(long, help_heading = "Task")]
    seq_len: Option<usize>,
    /// Key–value pairs per sequence (mqar).
    #[arg(long, help_heading = "Task")]
    n_pairs: Option<usize>,
    /// Train MQAR on a mixture of (sequence length:pairs) settings, as
    /// Zoology does, e.g. 64:4,128:8,256:16 (shorter sequences right-padded);
    /// the held-out set stays --seq-len/--n-pairs.
    #[arg(long, help_heading = "Task", value_parser = parse_mix)]
    train_mix: Option<Mix>,
    /// MQAR curriculum STEPS:PAIRS: the first STEPS training steps use only
    /// sequences of PAIRS pairs, the rest --n-pairs (or --train-mix).
    /// Softmax attention at sequence 256 learns 64 pairs after 3000:16 in a
    /// few hundred steps, and not in thousands without it (BENCHMARKS.md).
    #[arg(long, help_heading = "Task", value_parser = parse_curriculum)]
    curriculum: Option<(u64, usize)>,
    /// Held-out fraction of the text file (text).
    #[arg(long, help_heading = "Task")]
    val_fraction: Option<f64>,
}

/// (sequence length, pairs) settings of an MQAR training mixture.
#[derive(Clone, Debug)]
pub struct Mix(pub Vec<(usize, usize)>);

/// `64:4,128:8`: an MQAR mixture.
pub fn parse_mix(s: &str) -> std::result::Result<Mix, String> {
    s.split(',')
        .map(|part| {
            let (l, p) = part
                .split_once(':')
                .ok_or(format!("`{part}`: expected SEQ_LEN:PAIRS, e.g. 64:4"))?;
            let num = |x: &str| {
                x.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("`{part}`: `{x}` is not a count"))
            };
            Ok((num(l)?, num(p)?))
        })
        .collect::<std::result::Result<Vec<_>, String>>()
        .map(Mix)
}

/// `3000:16`: an MQAR curriculum (steps, pairs).
pub fn parse_curriculum(s: &str) -> std::result::Result<(u64, usize), String> {
    let (steps, pairs) = s
        .split_once(':')
        .ok_or(format!("`{s}`: expected STEPS:PAIRS, e.g. 3000:16"))?;
    let steps = steps
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("`{steps}` is not a number of steps"))?;
    let pairs = pairs
        .trim()
        .parse::<usize>()
        .map_err(|_| format!("`{pairs}` is not a count of pairs"))?;
    Ok((steps, pairs))
}

/// Resolve the preset for the task, then the config file, then flags.
fn resolve(a: &TrainArgs) -> Result<(ModelConfig, TaskConfig, TrainConfig)> {
    let task = a.task.as_deref().context("--task is required")?;
    let (mut m, mut t, mut tr) = preset(task)?;
    if !matches!(t, TaskConfig::Mqar(_)) {
        let mqar_only = [
            ("--n-pairs", a.n_pairs.is_some()),
            ("--train-mix", a.train_mix.is_some()),
            ("--curriculum", a.curriculum.is_some()),
        ];
        if let Some((flag, _)) = mqar_only.iter().find(|(_, given)| *given) {
            bail!("{flag} applies only to --task mqar, not `{task}`");
        }
    }
    if let Some(path) = &a.config {
        m = ModelConfig::from_file(path)?;
    }
    macro_rules! set {
        ($dst:expr, $src:expr) => {
            if let Some(v) = $src {
                $dst = v;
            }
        };
    }
    set!(tr.steps, a.steps);
    set!(tr.batch_size, a.batch_size);
    set!(tr.lr, a.lr);
    set!(tr.schedule, a.schedule);
    set!(tr.warmup, a.warmup);
    set!(tr.weight_decay, a.weight_decay);
    set!(tr.beta1, a.beta1);
    set!(tr.beta2, a.beta2);
    set!(tr.clip, a.clip);
    set!(tr.label_smoothing, a.label_smoothing);
    set!(tr.seed, a.seed);
    set!(tr.checkpoint_every, a.checkpoint_every);
    set!(tr.n_eval, a.n_eval);
    set!(m.d_model, a.d_model);
    if let Some(l) = a.layers {
        if m.has_encoder() {
            m.n_encoder_layers = l;
        }
        if m.has_decoder() {
            m.n_decoder_layers = l;
        }
    }
    set!(m.n_encoder_layers, a.encoder_layers);
    set!(m.n_decoder_layers, a.decoder_layers);
    set!(m.n_heads, a.n_heads);
    if a.n_kv_heads.is_some() {
        m.n_kv_heads = a.n_kv_heads;
    }
    set!(m.d_ff, a.d_ff);
    if a.head_dim.is_some() {
        m.head_dim = a.head_dim;
    }
    if a.qk_norm {
        m.qk_norm = true;
    }
    set!(m.position, a.position);
    set!(m.rope_theta, a.rope_theta);
    set!(m.ffn, a.ffn);
    set!(m.ffn_weights, a.ffn_weights);
    if a.moe.is_some() {
        m.moe = a.moe;
    }
    if !a.matformer.is_empty() {
        m.matformer = a.matformer.clone();
    }
    set!(m.norm, a.norm);
    set!(m.norm_position, a.norm_position);
    set!(m.dropout, a.dropout);
    set!(m.max_len, a.context);
    match &a.mechanism {
        Some(MechanismArg::One(c)) => m.mechanism = c.clone(),
        Some(MechanismArg::Stack(spec)) => {
            let layers = m.n_encoder_layers * usize::from(m.has_encoder())
                + m.n_decoder_layers * usize::from(m.has_decoder());
            m.layer_mechanisms = attend::config::stack_preset(spec, layers)
                .map_err(|e| anyhow::anyhow!("--mechanism: {e}"))?
                .unwrap_or_default();
        }
        None => {}
    }
    if let Some(specs) = &a.layer_mechanisms {
        m.layer_mechanisms = MechanismConfig::parse_list(specs)
            .map_err(|e| anyhow::anyhow!("--layer-mechanisms: {e}"))?;
    }
    if a.untie {
        m.tie_embeddings = false;
    }
    match &mut t {
        TaskConfig::Copy(c) | TaskConfig::Reverse(c) => {
            set!(c.vocab, a.vocab);
            set!(c.min_len, a.min_len);
            set!(c.max_len, a.max_len);
            if a.config.is_none() {
                m.vocab_size = c.vocab;
                m.max_len = m.max_len.max(c.max_len + 1);
            }
        }
        TaskConfig::Mqar(c) => {
            set!(c.vocab, a.vocab);
            set!(c.seq_len, a.seq_len);
            set!(c.n_pairs, a.n_pairs);
            set!(c.train_mix, a.train_mix.clone().map(|m| m.0));
            set!(c.curriculum, a.curriculum.map(Some));
            if a.config.is_none() {
                m.vocab_size = c.vocab;
                m.max_len = m.max_len.max(c.seq_len);
            }
        }
        TaskConfig::Text(c) => {
            set!(c.path, a.data.clone());
            set!(c.seq_len, a.seq_len);
            set!(c.val_fraction, a.val_fraction);
            if a.config.is_none() {
                m.max_len = m.max_len.max(c.seq_len);
            }
        }
    }
    if a.data.is_some() && !matches!(t, TaskConfig::Text(_)) {
        bail!("--data applies only to --task text");
    }
    Ok((m, t, tr))
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(total: u64, start: u64, label: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} (ETA {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb.set_position(start);
    pb
}

/// One line per finished item of a sweep: above the bar on a terminal, on
/// stderr otherwise (logs).
pub fn log_line(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

/// After a sweep: results.json to stdout with `json`, else the table, and
/// where the files went.
pub fn print_report(out: &std::path::Path, json: bool, files: &str) -> Result<()> {
    if json {
        outln!("{}", std::fs::read_to_string(out.join("results.json"))?);
    } else {
        out!("{}", std::fs::read_to_string(out.join("table.md"))?);
        eprintln!("wrote {}/{{{files}}}", out.display());
    }
    Ok(())
}

/// What a training run reports.
struct RunReport {
    last: Option<StepInfo>,
    tokens_per_sec: f64,
    seconds: f64,
    /// Held-out metrics every `eval_every` steps: {"step", "eval"}.
    history: Vec<serde_json::Value>,
    /// (step, training loss) of every step this run took.
    losses: Vec<(u64, f64)>,
}

/// Train to completion (or `stop_after`), checkpointing into `out`; with
/// `eval_every` > 0, evaluate on the held-out set along the way (not timed).
fn run_training(
    tr: &mut Trainer,
    out: &Path,
    stop_after: Option<u64>,
    eval_every: u64,
    label: &str,
) -> Result<RunReport> {
    let total = tr.train_cfg.steps;
    let until = stop_after.unwrap_or(total).min(total);
    let pb = progress(total, tr.step, label);
    let (mut tokens, mut last, mut ema) = (0usize, None, None::<f64>);
    let (mut history, mut losses) = (vec![], vec![]);
    let mut train_time = std::time::Duration::ZERO;
    let eval_point = |tr: &Trainer, history: &mut Vec<serde_json::Value>| -> Result<()> {
        let m = evaluate(&tr.model, &tr.task, &EvalOptions::default())?;
        let line = format!("step {}: held-out {}", tr.step, format_metrics(&m));
        if pb.is_hidden() {
            eprintln!("{line}");
        } else {
            pb.println(line);
        }
        history.push(serde_json::json!({ "step": tr.step, "eval": m }));
        Ok(())
    };
    if eval_every > 0 && tr.step == 0 {
        eval_point(tr, &mut history)?;
    }
    while tr.step < until {
        let start = Instant::now();
        let info = tr.train_step()?;
        train_time += start.elapsed();
        tokens += info.tokens;
        losses.push((info.step, info.loss));
        let e = ema.map_or(info.loss, |e| 0.9 * e + 0.1 * info.loss);
        ema = Some(e);
        let tps = tokens as f64 / train_time.as_secs_f64();
        pb.set_position(info.step);
        let load = expert_load_line(&info.expert_load);
        pb.set_message(format!("loss {e:.4} | {:.1}k tok/s{load}", tps / 1e3));
        let every = tr.train_cfg.checkpoint_every;
        if every > 0 && info.step.is_multiple_of(every) && info.step < until {
            tr.save(out, serde_json::json!({ "train_loss": info.loss }))?;
        }
        last = Some(info);
        if eval_every > 0 && tr.step.is_multiple_of(eval_every) && tr.step < total {
            eval_point(tr, &mut history)?;
        }
    }
    pb.finish_and_clear();
    let seconds = train_time.as_secs_f64();
    Ok(RunReport {
        last,
        tokens_per_sec: tokens as f64 / seconds.max(1e-9),
        seconds,
        history,
        losses,
    })
}

/// " | experts: 31 25 40 32" — the tokens each expert took this step,
/// summed over the MoE layers ("" without experts).
fn expert_load_line(load: &[Vec<usize>]) -> String {
    let Some(first) = load.first() else {
        return String::new();
    };
    let mut sum = vec![0usize; first.len()];
    for l in load {
        sum.iter_mut().zip(l).for_each(|(a, b)| *a += b);
    }
    let cells: Vec<String> = sum.iter().map(|c| c.to_string()).collect();
    format!(" | experts: {}", cells.join(" "))
}

/// Check `--out` before any work starts: a directory (or creatable as one)
/// that can be written, and not an existing checkpoint unless resuming it
/// or replacing it on purpose.
pub fn check_out(dir: &Path, resume: bool, overwrite: bool) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("--out {}: exists and is not a directory", dir.display());
    }
    let ckpt = dir.join("checkpoint.json");
    if !resume && !overwrite && ckpt.exists() {
        bail!(
            "--out {}: holds a checkpoint already; pass --resume to continue it or --overwrite to replace it",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--out {}: cannot create the directory", dir.display()))?;
    let probe = dir.join(format!(".attend-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("--out {}: cannot write there", dir.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

pub fn train(a: TrainArgs) -> Result<()> {
    if a.out.exists() && !a.out.is_dir() {
        bail!("--out {}: exists and is not a directory", a.out.display());
    }
    let mut tr = if a.resume {
        Trainer::resume(&a.out, a.steps)
            .with_context(|| format!("cannot resume from {}", a.out.display()))?
    } else {
        let (m, t, c) = resolve(&a)?;
        Trainer::new(m, t, c)?
    };
    // the settings are valid and the model fits: now --out, before step 1
    check_out(&a.out, a.resume, a.overwrite)?;
    tr.shards = threads();
    // (the trainer picked the fused path when it was built)
    let mut tr = if a.autograd { tr.with_fused(false) } else { tr };
    let run = Run {
        out: &a.out,
        json: a.json,
        no_eval: a.no_eval,
        stop_after: a.stop_after,
        eval_every: a.eval_every,
    };
    train_and_report(&mut tr, &run, serde_json::json!({}))
}

/// Where and how a run trains and reports.
struct Run<'a> {
    out: &'a Path,
    json: bool,
    no_eval: bool,
    stop_after: Option<u64>,
    eval_every: u64,
}

/// Train `tr` to the end, evaluate, checkpoint and report (`extra`'s
/// fields join the JSON summary).
fn train_and_report(tr: &mut Trainer, a: &Run, extra: serde_json::Value) -> Result<()> {
    if !a.json {
        eprintln!(
            "training {} on `{}`: {} parameters, {} steps of {} (from step {}), {}",
            shape_name(&tr.model_cfg),
            tr.task.cfg.name(),
            tr.store.num_params(),
            tr.train_cfg.steps,
            tr.train_cfg.batch_size,
            tr.step,
            match &tr.autograd_reason {
                None => "fused trainer".to_string(),
                Some(why) => format!("autograd ({why})"),
            }
        );
    }
    let RunReport {
        last,
        tokens_per_sec: tps,
        seconds: secs,
        history,
        losses,
    } = run_training(tr, a.out, a.stop_after, a.eval_every, "train")?;
    let metrics = if a.no_eval || tr.step < tr.train_cfg.steps {
        None
    } else {
        Some(evaluate(&tr.model, &tr.task, &EvalOptions::default())?)
    };
    let summary = serde_json::json!({
        "task": tr.task.cfg.name(),
        "step": tr.step,
        "params": tr.store.num_params(),
        "trainer": tr.executor(),
        "train_loss": last.as_ref().map(|l| l.loss),
        "tokens_per_sec": tps,
        "seconds": secs,
        "eval": metrics,
        "history": history,
        "checkpoint": a.out,
    });
    let mut summary = summary;
    if let (Some(s), Some(x)) = (summary.as_object_mut(), extra.as_object()) {
        s.extend(x.clone());
    }
    tr.save(a.out, summary.clone())?;
    if a.json {
        // every step's loss goes to stdout, not into the checkpoint
        let mut summary = summary;
        summary["losses"] = serde_json::json!(losses);
        outln!("{summary}");
    } else {
        if let Some(l) = &last {
            eprintln!(
                "step {}: train loss {:.4}, {:.0} tokens/s, {:.1} s",
                l.step, l.loss, tps, secs
            );
        }
        if let Some(m) = &metrics {
            outln!("held-out: {}", format_metrics(m));
        }
        outln!("checkpoint: {}", a.out.display());
    }
    Ok(())
}

#[derive(Args)]
pub struct UpcycleArgs {
    /// A trained dense checkpoint directory (`attend train --out`).
    #[arg(long)]
    from: PathBuf,
    /// Where the mixture-of-experts checkpoint goes.
    #[arg(long)]
    out: PathBuf,
    /// The mixture: experts=E,k=K[,capacity=C][,aux=A][,z=Z] (as `attend
    /// train --moe`); every expert starts as a copy of its block's FFN.
    #[arg(long, value_parser = |s: &str| s.parse::<attend::config::MoeConfig>())]
    moe: attend::config::MoeConfig,
    /// Steps to train the mixture for, from step 0 with fresh AdamW
    /// moments and the dense run's schedule (default: the dense run's
    /// steps; 0 writes the upcycled checkpoint untrained).
    #[arg(long)]
    steps: Option<u64>,
    /// Replace a checkpoint already in --out.
    #[arg(long)]
    overwrite: bool,
    /// Also evaluate every N steps.
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    /// Print the final metrics as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// `attend upcycle`: a dense checkpoint as a mixture of experts (sparse
/// upcycling), scored before training (dropless, it equals the dense
/// model) and trained on.
pub fn upcycle(a: UpcycleArgs) -> Result<()> {
    let mut tr = attend::train::upcycle(&a.from, a.moe, a.steps)
        .with_context(|| format!("cannot upcycle {}", a.from.display()))?;
    check_out(&a.out, false, a.overwrite)?;
    tr.shards = threads();
    let before = evaluate(&tr.model, &tr.task, &EvalOptions::default())?;
    if !a.json {
        eprintln!(
            "upcycled {}: {} experts, top {}; held-out before training: {}",
            a.from.display(),
            a.moe.experts,
            a.moe.top_k,
            format_metrics(&before)
        );
    }
    let run = Run {
        out: &a.out,
        json: a.json,
        no_eval: false,
        stop_after: None,
        eval_every: a.eval_every,
    };
    let extra = serde_json::json!({ "upcycled_from": a.from, "eval_before": before });
    train_and_report(&mut tr, &run, extra)
}

#[derive(Args)]
pub struct ExtractArgs {
    /// A checkpoint directory, typically a MatFormer model (`attend train
    /// --matformer`).
    #[arg(long)]
    from: PathBuf,
    /// FFN widths: one for every block, or one per block (encoder blocks
    /// first) — MatFormer's Mix'n'Match. Block i keeps its first widths[i]
    /// hidden units.
    #[arg(long, value_delimiter = ',', required = true)]
    widths: Vec<usize>,
    /// Where the standalone submodel's checkpoint goes.
    #[arg(long)]
    out: PathBuf,
    /// Replace a checkpoint already in --out.
    #[arg(long)]
    overwrite: bool,
    /// Also evaluate the submodel on the task's held-out set.
    #[arg(long)]
    eval: bool,
    /// Print what was written as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// `attend extract`: a MatFormer submodel as a checkpoint of its own.
pub fn extract(a: ExtractArgs) -> Result<()> {
    let tr = attend::train::extract(&a.from, &a.widths)
        .with_context(|| format!("cannot extract from {}", a.from.display()))?;
    check_out(&a.out, false, a.overwrite)?;
    let metrics = if a.eval {
        Some(evaluate(&tr.model, &tr.task, &EvalOptions::default())?)
    } else {
        None
    };
    let summary = serde_json::json!({
        "extracted_from": a.from,
        "widths": a.widths,
        "d_ff": tr.model_cfg.d_ff,
        "layer_d_ff": tr.model_cfg.layer_d_ff,
        "params": tr.store.num_params(),
        "eval": metrics,
        "checkpoint": a.out,
    });
    tr.save(&a.out, summary.clone())?;
    if a.json {
        outln!("{summary}");
    } else {
        if let Some(m) = &metrics {
            outln!("held-out: {}", format_metrics(m));
        }
        outln!(
            "checkpoint: {} ({} parameters, FFN widths {:?})",
            a.out.display(),
            tr.store.num_params(),
            a.widths
        );
    }
    Ok(())
}

fn shape_name(m: &ModelConfig) -> String {
    let mixers = if !m.layer_mechanisms.is_empty() {
        let specs: Vec<String> = m.layer_mechanisms.iter().map(|x| x.to_string()).collect();
        format!(", mechanisms {}", specs.join(" | "))
    } else if m.mechanism != MechanismConfig::Softmax {
        format!(", {}", m.mechanism)
    } else {
        String::new()
    };
    let shape = match m.shape {
        attend::config::Shape::Encoder => format!(
            "an encoder ({} layers, d_model {})",
            m.n_encoder_layers, m.d_model
        ),
        attend::config::Shape::Decoder => format!(
            "a decoder ({} layers, d_model {})",
            m.n_decoder_layers, m.d_model
        ),
        attend::config::Shape::EncoderDecoder => format!(
            "an encoder–decoder ({}+{} layers, d_model {})",
            m.n_encoder_layers, m.n_decoder_layers, m.d_model
        ),
    };
    match shape.strip_suffix(')') {
        Some(s) if !mixers.is_empty() => format!("{s}{mixers})"),
        _ => shape,
    }
}

fn format_metrics(m: &Metrics) -> String {
    let mut parts = vec![];
    let pct = |x: f64| format!("{:.2}%", 100.0 * x);
    if let Some(x) = m.exact_match {
        parts.push(format!("exact match {} (greedy)", pct(x)));
    }
    if let Some(x) = m.beam_exact_match {
        parts.push(format!("exact match {} (beam)", pct(x)));
    }
    if let Some(x) = m.token_accuracy {
        parts.push(format!("token accuracy {}", pct(x)));
    }
    if let Some(x) = m.accuracy {
        parts.push(format!("accuracy {}", pct(x)));
    }
    if let Some(x) = m.loss {
        parts.push(format!("loss {x:.4}"));
    }
    if let Some(x) = m.perplexity {
        parts.push(format!("perplexity {x:.3}"));
    }
    format!("{} on {} examples", parts.join(", "), m.n_examples)
}

#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoint directory written by `attend train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Also decode with beam search of this width (transduction tasks; the paper used 4).
    #[arg(long, default_value_t = 0)]
    beam: usize,
    /// Length penalty α for beam search (the paper used 0.6).
    #[arg(long, default_value_t = 0.6)]
    alpha: f64,
    /// Override the text file (text task).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Evaluate an MQAR checkpoint on this many key–value pairs a sequence
    /// instead of the number it trained on (same sequence length): does
    /// recall learned at 16 pairs hold at 64?
    #[arg(long)]
    n_pairs: Option<usize>,
    #[arg(long)]
    json: bool,
}

/// The task of the checkpoint in `dir` (`data`: another text file for a
/// text task), with `n_eval` held-out examples; settings it refuses are
/// reported as the checkpoint's.
fn load_task(
    dir: &Path,
    meta: &attend::train::CheckpointMeta,
    data: Option<&PathBuf>,
    n_pairs: Option<usize>,
    n_eval: usize,
) -> Result<Task> {
    let mut cfg = meta.task.clone();
    match (&mut cfg, data) {
        (TaskConfig::Text(c), Some(d)) => c.path = d.clone(),
        (_, Some(_)) => bail!(
            "--data applies only to text checkpoints; {} is a `{}` checkpoint",
            dir.display(),
            cfg.name()
        ),
        _ => {}
    }
    let overridden = n_pairs.is_some();
    match (&mut cfg, n_pairs) {
        (TaskConfig::Mqar(c), Some(n)) => c.n_pairs = n,
        (_, Some(_)) => bail!(
            "--n-pairs applies only to mqar checkpoints; {} is a `{}` checkpoint",
            dir.display(),
            cfg.name()
        ),
        _ => {}
    }
    Task::new(cfg, meta.train.seed, n_eval).map_err(|e| match e {
        attend::Error::Config { .. } if overridden => anyhow::Error::new(e).context(format!(
            "--n-pairs does not fit {}'s sequence length and vocabulary",
            dir.display()
        )),
        attend::Error::Config { .. } => anyhow::Error::new(e).context(format!(
            "{}: the task's settings",
            dir.join("checkpoint.json").display()
        )),
        e => e.into(),
    })
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let (model, meta) = load_model(&a.checkpoint, &Device::Cpu)?;
    let task = load_task(
        &a.checkpoint,
        &meta,
        a.data.as_ref(),
        a.n_pairs,
        meta.train.n_eval,
    )?;
    let opts = EvalOptions {
        beam: (a.beam > 0).then_some((a.beam, a.alpha)),
        ..Default::default()
    };
    let m = evaluate(&model, &task, &opts)?;
    if a.json {
        outln!("{}", serde_json::to_string(&m)?);
    } else {
        outln!(
            "{} (step {}): {}",
            task.cfg.name(),
            meta.step,
            format_metrics(&m)
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct SampleArgs {
    /// Checkpoint directory written by `attend train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text models: speculative decoding with a smaller checkpoint of the
    /// same vocabulary drafting --draft-k tokens a pass — e.g. a MatFormer
    /// submodel from `attend extract`. Greedy output is the same as
    /// without it; the acceptance goes to stderr (and --json).
    #[arg(long)]
    draft: Option<PathBuf>,
    /// Tokens the draft proposes a pass.
    #[arg(long, default_value_t = 4)]
    draft_k: usize,
    /// Text for `text` models; space-separated token ids for the other tasks.
    /// Without it: a few held-out examples.
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Beam width for encoder–decoder models (0 = use the sampler).
    #[arg(long, default_value_t = 0)]
    beam: usize,
    #[arg(long, default_value_t = 0.6)]
    alpha: f64,
    #[arg(long)]
    json: bool,
}

fn parse_ids(s: &str, vocab: usize) -> Result<Vec<u32>> {
    s.split_whitespace()
        .map(|w| {
            let id: u32 = w
                .parse()
                .with_context(|| format!("--prompt: `{w}` is not a token id"))?;
            if id as usize >= vocab {
                bail!("--prompt: token id {id} is outside the vocabulary (0..{vocab})");
            }
            Ok(id)
        })
        .collect()
}

/// Decode one transduction source: greedy/sampled or beam.
/// `beam` > 0 selects beam search with length penalty `alpha`.
fn transduce(
    model: &Transformer,
    src: &[u32],
    (beam, alpha): (usize, f64),
    sampler: &mut Sampler,
    max_len: usize,
) -> Result<Vec<u32>> {
    let ids = Tensor::new(src, &Device::Cpu)?.unsqueeze(0)?;
    let memory = model.encode(&ids, None)?;
    let mut out = if beam > 0 {
        beam_search(model, &memory, BOS, EOS, beam, alpha, max_len)?
    } else {
        generate(
            model,
            &[BOS],
            Some(&memory),
            max_len,
            sampler,
            Some(EOS),
            |_| Ok(()),
        )?
    };
    if out.last() == Some(&EOS) {
        out.pop();
    }
    Ok(out)
}

fn join(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn sample(a: SampleArgs) -> Result<()> {
    let (model, meta) = load_model(&a.checkpoint, &Device::Cpu)?;
    let drafter = match &a.draft {
        None => None,
        Some(d) => {
            if !matches!(meta.task, TaskConfig::Text(_)) {
                bail!("--draft: speculative sampling is for text checkpoints");
            }
            if a.draft_k == 0 {
                bail!("--draft-k must be at least 1");
            }
            let (dm, _) =
                load_model(d, &Device::Cpu).with_context(|| format!("--draft {}", d.display()))?;
            Some(std::sync::Arc::new(dm))
        }
    };
    let mut sampler = Sampler::new(SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        ..SamplingParams::default()
    })?;
    match &meta.task {
        TaskConfig::Copy(c) | TaskConfig::Reverse(c) => {
            let sources: Vec<Vec<u32>> = match &a.prompt {
                Some(p) => vec![parse_ids(p, model.cfg.vocab_size)?],
                None => load_task(&a.checkpoint, &meta, None, None, 5)?
                    .eval_set()
                    .into_iter()
                    .filter_map(|e| {
                        if let Example::Pair { src, .. } = e {
                            Some(src)
                        } else {
                            None
                        }
                    })
                    .collect(),
            };
            let mut rows = vec![];
            for src in sources {
                let out = transduce(&model, &src, (a.beam, a.alpha), &mut sampler, c.max_len + 1)?;
                if !a.json {
                    outln!("{}  ->  {}", join(&src), join(&out));
                }
                rows.push(serde_json::json!({ "prompt_ids": src, "ids": out }));
            }
            if a.json {
                outln!("{}", serde_json::Value::Array(rows));
            }
        }
        TaskConfig::Mqar(_) => {
            let prompt = match &a.prompt {
                Some(p) => parse_ids(p, model.cfg.vocab_size)?,
                None => bail!("--prompt is required for mqar checkpoints (try `attend eval`)"),
            };
            let out = generate(
                &model,
                &prompt,
                None,
                a.max_tokens,
                &mut sampler,
                None,
                |_| Ok(()),
            )?;
            if a.json {
                outln!(
                    "{}",
                    serde_json::json!({ "prompt_ids": prompt, "ids": out })
                );
            } else {
                outln!("{}", join(&out));
            }
        }
        TaskConfig::Text(_) => {
            let prompt_text = a.prompt.clone().unwrap_or_else(|| "\n".to_string());
            let prompt: Vec<u32> = prompt_text.bytes().map(|b| b as u32).collect();
            let mut stdout = std::io::stdout();
            if !a.json {
                out!("{prompt_text}");
            }
            let mut pending: Vec<u8> = vec![];
            let on_token = |id: u32| {
                if !a.json {
                    // bytes may split a UTF-8 character: print whole characters only
                    pending.push(id as u8);
                    if let Ok(s) = std::str::from_utf8(&pending) {
                        out!("{s}");
                        stdout.flush().ok();
                        pending.clear();
                    }
                }
                Ok(())
            };
            let (out, spec) = match &drafter {
                None => (
                    generate(
                        &model,
                        &prompt,
                        None,
                        a.max_tokens,
                        &mut sampler,
                        None,
                        on_token,
                    )?,
                    None,
                ),
                Some(dm) => {
                    let mut draft = ModelDraft::new(dm.clone(), model.cfg.vocab_size)
                        .with_context(|| {
                            format!(
                                "--draft {}",
                                a.draft
                                    .as_ref()
                                    .map_or(String::new(), |p| p.display().to_string())
                            )
                        })?;
                    let (ids, st) = generate_speculative(
                        &model,
                        model.new_state(None)?,
                        &prompt,
                        a.max_tokens,
                        &mut sampler,
                        None,
                        &mut draft,
                        a.draft_k,
                        on_token,
                    )?;
                    (ids, Some(st))
                }
            };
            let spec_json = spec.as_ref().map(|st| {
                serde_json::json!({
                    "passes": st.passes + st.plain_steps,
                    "drafted": st.drafted,
                    "accepted": st.accepted,
                    "tokens_per_pass": st.tokens_per_pass(),
                })
            });
            if let (Some(st), false) = (&spec, a.json) {
                eprintln!(
                    "\n[draft: {} of {} drafted tokens accepted, {:.2} tokens per pass]",
                    st.accepted,
                    st.drafted,
                    st.tokens_per_pass()
                );
            }
            let text = String::from_utf8_lossy(&out.iter().map(|&i| i as u8).collect::<Vec<_>>())
                .to_string();
            if a.json {
                outln!(
                    "{}",
                    serde_json::json!({ "prompt_ids": prompt, "ids": out, "text": text, "draft": spec_json })
                );
            } else {
                outln!();
            }
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct DemoArgs {
    /// Where the two demo checkpoints go.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn demo(a: DemoArgs) -> Result<()> {
    // both runs' directories checked before the first step (the demo
    // replaces its own earlier runs)
    check_out(&a.out, false, true)?;
    for task in ["reverse", "mqar"] {
        check_out(&a.out.join(task), false, true)?;
    }
    let mut report = serde_json::Map::new();
    for task in ["reverse", "mqar"] {
        let (m, t, c) = preset(task)?;
        let mut tr = Trainer::new(m, t, c)?;
        tr.shards = threads();
        if !a.json {
            outln!(
                "== {task}: {} ({} parameters), {} steps of {}",
                shape_name(&tr.model_cfg),
                tr.store.num_params(),
                tr.train_cfg.steps,
                tr.train_cfg.batch_size
            );
        }
        let out = a.out.join(task);
        let RunReport {
            last,
            tokens_per_sec: tps,
            seconds: secs,
            ..
        } = run_training(&mut tr, &out, None, 0, task)?;
        let opts = EvalOptions {
            beam: (task == "reverse").then_some((4, 0.6)),
            ..Default::default()
        };
        let metrics = evaluate(&tr.model, &tr.task, &opts)?;
        let summary = serde_json::json!({
            "train_loss": last.map(|l| l.loss), "tokens_per_sec": tps, "seconds": secs, "eval": metrics,
        });
        tr.save(&out, summary.clone())?;
        if !a.json {
            outln!(
                "trained in {secs:.0} s ({tps:.0} tokens/s); held-out: {}",
                format_metrics(&metrics)
            );
            demo_examples(&tr)?;
            outln!("checkpoint: {}\n", out.display());
        }
        report.insert(task.to_string(), summary);
    }
    if a.json {
        outln!("{}", serde_json::Value::Object(report));
    }
    Ok(())
}

/// Print a few decoded held-out examples.
fn demo_examples(tr: &Trainer) -> Result<()> {
    let held = tr.task.eval_set();
    match &tr.task.cfg {
        TaskConfig::Copy(c) | TaskConfig::Reverse(c) => {
            let mut sampler = Sampler::new(SamplingParams::default())?;
            for e in held.iter().take(3) {
                let Example::Pair { src, tgt } = e else {
                    continue;
                };
                let out = transduce(&tr.model, src, (4, 0.6), &mut sampler, c.max_len + 1)?;
                let mark = if &out == tgt { "ok" } else { "WRONG" };
                outln!("  {}  ->  {}  [{mark}]", join(src), join(&out));
            }
        }
        TaskConfig::Mqar(_) => {
            for e in held.iter().take(2) {
                let Example::Lm {
                    input,
                    target,
                    weight,
                } = e
                else {
                    continue;
                };
                let ids = Tensor::new(input.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                let pred = tr
                    .model
                    .decode(&ids, None)?
                    .argmax(candle_core::D::Minus1)?
                    .squeeze(0)?
                    .to_vec1::<u32>()?;
                let pairs: Vec<String> = (0..4)
                    .map(|i| format!("{}:{}", input[2 * i], input[2 * i + 1]))
                    .collect();
                let queries: Vec<String> = weight
                    .iter()
                    .enumerate()
                    .filter(|(_, &w)| w > 0.0)
                    .take(4)
                    .map(|(p, _)| format!("{}? -> {} (want {})", input[p], pred[p], target[p]))
                    .collect();
                outln!(
                    "  pairs {} …  queries {} …",
                    pairs.join(" "),
                    queries.join(", ")
                );
            }
        }
        TaskConfig::Text(_) => {}
    }
    Ok(())
}
