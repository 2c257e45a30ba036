//! The recall–memory frontier (Zoology; BASED, Arora et al. 2024): train
//! MQAR models over mechanisms × sizes, evaluate each at several numbers of
//! key–value pairs, and report its accuracy against the bytes its decode
//! state holds after the sequence — measured from the state's own buffers,
//! not a formula.
//!
//! As in Zoology, one model is trained per (mechanism, size) on a mixture of
//! the pair counts it is tested on; a curriculum (the first steps on the
//! fewest pairs only) lets softmax attention's induction circuit form
//! before the harder sequences arrive.

use crate::config::{MechanismConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::eval::{evaluate, EvalOptions};
use crate::tasks::{Example, MqarConfig, Task, TaskConfig};
use crate::train::{presets::preset, TrainConfig, Trainer};
use candle_core::Tensor;
use serde::Serialize;

/// One model of the sweep.
#[derive(Clone, Debug)]
pub struct FrontierPoint {
    /// A mechanism spec (`attend train --mechanism`).
    pub mechanism: String,
    pub d_model: usize,
    /// The peak learning rate (None: the MQAR preset's).
    pub lr: Option<f64>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct FrontierResult {
    pub mechanism: String,
    /// The mechanism's family (softmax, window, linear, based, decay, gla).
    pub family: String,
    pub d_model: usize,
    pub n_layers: usize,
    pub seq_len: usize,
    /// The pairs of the held-out sequences this row is scored on.
    pub n_pairs: usize,
    pub steps: u64,
    /// The peak learning rate it trained with.
    pub lr: f64,
    pub accuracy: f64,
    pub n_eval: usize,
    /// Decode-state bytes after one sequence of `seq_len` tokens (batch 1).
    pub state_bytes: usize,
    pub params: usize,
    /// Training time of the model (shared by its rows).
    pub seconds: f64,
}

/// The settings shared by every run of a sweep.
#[derive(Clone, Debug)]
pub struct FrontierSetup {
    pub seq_len: usize,
    /// Every model is scored at each of these pair counts and trained on
    /// them: one alone, or several as a uniform mixture (Zoology's).
    pub pairs: Vec<usize>,
    /// `(steps, pairs)`: the first `steps` training steps use only
    /// sequences of `pairs` pairs (None: no curriculum).
    pub curriculum: Option<(u64, usize)>,
    pub vocab: usize,
    pub steps: u64,
    pub n_eval: usize,
    pub seed: u64,
    pub shards: usize,
    /// Sequences per optimisation step (None: the MQAR preset's, 64).
    pub batch_size: Option<usize>,
    /// The FFN's width as a multiple of d_model.
    pub d_ff_mult: usize,
}

/// A mechanism spec's family: the name before its settings
/// (`window:w=16` -> `window`, `based-stack:dim=8` -> `based-stack`).
pub fn family(mechanism: &str) -> &str {
    mechanism.split([':', ',']).next().unwrap_or_default()
}

/// Train one point and score it at each of the setup's pair counts (one
/// result a count, in their order); `on_step` after every optimisation step.
pub fn run_point(
    p: &FrontierPoint,
    s: &FrontierSetup,
    mut on_step: impl FnMut(u64),
) -> Result<Vec<FrontierResult>> {
    let (base_model, _, base_train) = preset("mqar")?;
    // one mechanism for every layer, or a stack preset (`based-stack`)
    let layers = base_model.n_decoder_layers;
    let (mechanism, layer_mechanisms) = match crate::config::stack_preset(&p.mechanism, layers)? {
        Some(list) => (MechanismConfig::default(), list),
        None => (
            p.mechanism
                .parse()
                .map_err(|e| Error::msg(format!("mechanism `{}`: {e}", p.mechanism)))?,
            vec![],
        ),
    };
    let model_cfg = ModelConfig {
        d_model: p.d_model,
        d_ff: s.d_ff_mult * p.d_model,
        vocab_size: s.vocab,
        max_len: s.seq_len,
        mechanism,
        layer_mechanisms,
        ..base_model
    };
    let Some(&most) = s.pairs.iter().max() else {
        return Err(Error::msg(
            "the frontier needs at least one number of pairs",
        ));
    };
    let held_out = |n_pairs| MqarConfig {
        vocab: s.vocab,
        seq_len: s.seq_len,
        n_pairs,
        power_a: 0.01,
        train_mix: vec![],
        curriculum: None,
    };
    let task_cfg = TaskConfig::Mqar(MqarConfig {
        train_mix: if s.pairs.len() > 1 {
            s.pairs.iter().map(|&n| (s.seq_len, n)).collect()
        } else {
            vec![]
        },
        curriculum: s.curriculum,
        ..held_out(most)
    });
    let train_cfg = TrainConfig {
        steps: s.steps,
        seed: s.seed,
        n_eval: s.n_eval,
        lr: p.lr.unwrap_or(base_train.lr),
        batch_size: s.batch_size.unwrap_or(base_train.batch_size),
        ..base_train
    };
    let lr = train_cfg.lr;
    let t0 = std::time::Instant::now();
    let mut tr = Trainer::new(model_cfg.clone(), task_cfg, train_cfg)?;
    tr.shards = s.shards;
    while tr.step < s.steps {
        tr.train_step()?;
        on_step(tr.step);
    }
    let seconds = t0.elapsed().as_secs_f64();
    // the decode state after one held-out sequence, token by token
    let eval = tr.task.eval_set();
    let Some(Example::Lm { input, .. }) = eval.first() else {
        return Err(Error::msg("the MQAR held-out set is empty"));
    };
    let mut state = tr.model.new_state(None)?;
    for &id in input {
        tr.model
            .step(&Tensor::new(&[[id]], &tr.device)?, &mut state)?;
    }
    let state_bytes = state.state_bytes();
    let mut out = Vec::with_capacity(s.pairs.len());
    for &n_pairs in &s.pairs {
        let task = Task::new(TaskConfig::Mqar(held_out(n_pairs)), s.seed, s.n_eval)?;
        let m = evaluate(&tr.model, &task, &EvalOptions::default())?;
        out.push(FrontierResult {
            mechanism: p.mechanism.clone(),
            family: family(&p.mechanism).to_string(),
            d_model: p.d_model,
            n_layers: model_cfg.n_decoder_layers,
            seq_len: s.seq_len,
            n_pairs,
            steps: s.steps,
            lr,
            accuracy: m.accuracy.unwrap_or(0.0),
            n_eval: m.n_examples,
            state_bytes,
            params: tr.store.num_params(),
            seconds,
        });
    }
    Ok(out)
}
