//! The recall–memory frontier (Zoology; BASED, Arora et al. 2024): train
//! MQAR models over mechanisms × sizes × numbers of key–value pairs and
//! report each one's accuracy against the bytes its decode state holds after
//! the sequence — measured from the state's own buffers, not a formula.

use crate::config::{MechanismConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::eval::{evaluate, EvalOptions};
use crate::tasks::{Example, MqarConfig, TaskConfig};
use crate::train::{presets::preset, TrainConfig, Trainer};
use candle_core::Tensor;
use serde::Serialize;

/// One model of the sweep.
#[derive(Clone, Debug)]
pub struct FrontierPoint {
    /// A mechanism spec (`attend train --mechanism`).
    pub mechanism: String,
    pub d_model: usize,
    pub n_pairs: usize,
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
    pub n_pairs: usize,
    pub steps: u64,
    /// The peak learning rate it trained with.
    pub lr: f64,
    pub accuracy: f64,
    pub n_eval: usize,
    /// Decode-state bytes after one sequence of `seq_len` tokens (batch 1).
    pub state_bytes: usize,
    pub params: usize,
    pub seconds: f64,
}

/// The settings shared by every run of a sweep.
#[derive(Clone, Debug)]
pub struct FrontierSetup {
    pub seq_len: usize,
    pub vocab: usize,
    pub steps: u64,
    pub n_eval: usize,
    pub seed: u64,
    pub shards: usize,
    /// Sequences per optimisation step (None: the MQAR preset's, 64).
    pub batch_size: Option<usize>,
}

/// A mechanism spec's family: the name before its settings
/// (`window:w=16` -> `window`, `based-stack:dim=8` -> `based-stack`).
pub fn family(mechanism: &str) -> &str {
    mechanism.split([':', ',']).next().unwrap_or_default()
}

/// Train and evaluate one point; `on_step` after every optimisation step.
pub fn run_point(
    p: &FrontierPoint,
    s: &FrontierSetup,
    mut on_step: impl FnMut(u64),
) -> Result<FrontierResult> {
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
        d_ff: 4 * p.d_model,
        vocab_size: s.vocab,
        max_len: s.seq_len,
        mechanism,
        layer_mechanisms,
        ..base_model
    };
    let task_cfg = TaskConfig::Mqar(MqarConfig {
        vocab: s.vocab,
        seq_len: s.seq_len,
        n_pairs: p.n_pairs,
        power_a: 0.01,
        train_mix: vec![],
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
    let m = evaluate(&tr.model, &tr.task, &EvalOptions::default())?;
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
    Ok(FrontierResult {
        mechanism: p.mechanism.clone(),
        family: family(&p.mechanism).to_string(),
        d_model: p.d_model,
        n_layers: model_cfg.n_decoder_layers,
        seq_len: s.seq_len,
        n_pairs: p.n_pairs,
        steps: s.steps,
        lr,
        accuracy: m.accuracy.unwrap_or(0.0),
        n_eval: m.n_examples,
        state_bytes: state.state_bytes(),
        params: tr.store.num_params(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}
