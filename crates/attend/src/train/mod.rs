//! Training from scratch: the loss, the `Trainer` loop and checkpoints.
//!
//! A checkpoint is a directory holding `checkpoint.json` (configs, step,
//! metrics, and the names of the two tensor files), `model-STEP.safetensors`
//! and `optim-STEP.safetensors`. Every file is written atomically and
//! `checkpoint.json` last, so the directory always describes one complete,
//! consistent checkpoint even if the process dies mid-write.

pub mod fused;
pub mod optim;
pub mod presets;

use crate::config::{ModelConfig, Shape};
use crate::error::{Error, Result};
use crate::model::Transformer;
use crate::nn::{load_safetensors, log_softmax_last, ParamStore};
use crate::tasks::{collate, Batch, Task, TaskConfig};
use crate::util::{derive_seed, write_atomic};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, D};
pub use optim::{learning_rate, AdamW, Schedule};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const STREAM_INIT: u64 = 10;
const STREAM_DROPOUT: u64 = 11;
/// MatFormer: which nested width each step trains.
const STREAM_MATFORMER: u64 = 12;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: u64,
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup: u64,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub clip: f64,
    pub label_smoothing: f64,
    pub seed: u64,
    /// Write a checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: u64,
    /// Held-out examples for evaluation.
    pub n_eval: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 64,
            lr: 1e-3,
            schedule: Schedule::Cosine,
            warmup: 100,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-9,
            clip: 1.0,
            label_smoothing: 0.0,
            seed: 0,
            checkpoint_every: 0,
            n_eval: 1000,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        // every number finite (a NaN or infinite setting would train into
        // NaN weights and a checkpoint that cannot be read back), then in range
        for (field, v) in [
            ("lr", self.lr),
            ("min_lr_ratio", self.min_lr_ratio),
            ("weight_decay", self.weight_decay),
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("eps", self.eps),
            ("clip", self.clip),
            ("label_smoothing", self.label_smoothing),
        ] {
            if !v.is_finite() {
                return Err(Error::config(
                    field,
                    format!("must be a finite number, got {v}"),
                ));
            }
        }
        if !crate::config::is_positive(self.lr) {
            return Err(Error::config(
                "lr",
                format!("must be positive, got {}", self.lr),
            ));
        }
        if !crate::config::is_positive(self.eps) {
            return Err(Error::config(
                "eps",
                format!("must be positive, got {}", self.eps),
            ));
        }
        if self.weight_decay < 0.0 {
            return Err(Error::config(
                "weight_decay",
                format!("must be ≥ 0, got {}", self.weight_decay),
            ));
        }
        for (field, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(field, format!("must be in [0, 1), got {v}")));
            }
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(Error::config(
                "min_lr_ratio",
                format!("must be in [0, 1], got {}", self.min_lr_ratio),
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(Error::config("label_smoothing", "must be in [0, 1)"));
        }
        if self.clip < 0.0 {
            return Err(Error::config("clip", "must be 0 (off) or positive"));
        }
        Ok(())
    }
}

/// Mean cross-entropy over weighted positions, with label smoothing ε:
/// (1-ε)·(-log p_target) + ε·mean_v(-log p_v) (Szegedy et al. 2016).
/// logits (b, t, V), target (b, t) u32, weight (b, t) f32 -> scalar
pub fn cross_entropy(
    logits: &Tensor,
    target: &Tensor,
    weight: &Tensor,
    smoothing: f64,
) -> Result<Tensor> {
    let total = weight.to_dtype(logits.dtype())?.sum_all()?;
    Ok(cross_entropy_sum(logits, target, weight, smoothing)?.broadcast_div(&total)?)
}

/// The weighted sum (not mean) of the per-position losses of `cross_entropy`.
pub fn cross_entropy_sum(
    logits: &Tensor,
    target: &Tensor,
    weight: &Tensor,
    smoothing: f64,
) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let logp = log_softmax_last(&logits.reshape((b * t, v))?)?;
    let nll = logp
        .gather(&target.reshape((b * t, 1))?, 1)?
        .squeeze(1)?
        .neg()?;
    let per_pos = if smoothing > 0.0 {
        let uniform = logp.mean(D::Minus1)?.neg()?;
        ((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?
    } else {
        nll
    };
    let w = weight.reshape(b * t)?.to_dtype(logits.dtype())?;
    Ok((per_pos * &w)?.sum_all()?)
}

/// The model's mean loss on a batch (teacher forcing).
pub fn batch_loss(model: &Transformer, batch: &Batch, smoothing: f64) -> Result<Tensor> {
    let w = batch.n_target_tokens()? as f64;
    Ok((batch_loss_sum(model, batch, smoothing)? / w)?)
}

/// The weighted sum of per-position losses on a batch. Only the positions
/// with non-zero weight are projected to the vocabulary (MQAR scores 8 of 64).
pub fn batch_loss_sum(model: &Transformer, batch: &Batch, smoothing: f64) -> Result<Tensor> {
    let (hidden, target, weight) = match batch {
        Batch::Seq2Seq {
            src,
            src_pad,
            tgt_in,
            tgt_out,
            weight,
        } => {
            let memory = model.encode(src, Some(src_pad))?;
            (model.decode_hidden(tgt_in, Some(&memory))?, tgt_out, weight)
        }
        Batch::Lm {
            input,
            target,
            weight,
        } => (model.decode_hidden(input, None)?, target, weight),
    };
    let (b, t, d) = hidden.dims3()?;
    let w: Vec<f32> = weight.flatten_all()?.to_vec1()?;
    let keep: Vec<u32> = (0..w.len() as u32)
        .filter(|&i| w[i as usize] != 0.0)
        .collect();
    if keep.is_empty() {
        return Err(Error::msg("batch has no scored positions"));
    }
    let idx = Tensor::new(keep.as_slice(), hidden.device())?;
    let n = keep.len();
    let h = hidden
        .reshape((b * t, d))?
        .index_select(&idx, 0)?
        .reshape((1, n, d))?;
    let target = target
        .flatten_all()?
        .index_select(&idx, 0)?
        .reshape((1, n))?;
    let weight = weight
        .flatten_all()?
        .index_select(&idx, 0)?
        .reshape((1, n))?;
    cross_entropy_sum(&model.logits(&h)?, &target, &weight, smoothing)
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct CheckpointMeta {
    pub format: String,
    pub step: u64,
    pub model: ModelConfig,
    pub task: TaskConfig,
    pub train: TrainConfig,
    pub weights: String,
    pub optimizer: String,
    /// Last training loss, and anything else worth keeping.
    pub metrics: serde_json::Value,
}

const FORMAT: &str = "attend-checkpoint-v1";

impl CheckpointMeta {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("checkpoint.json");
        if !dir.is_dir() {
            return Err(Error::file(dir, "checkpoint directory not found"));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::file(
                &path,
                format!("cannot read ({e}); is this an attend checkpoint directory?"),
            )
        })?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        let meta: CheckpointMeta = serde_path_to_error::deserialize(de)
            .map_err(|e| Error::file(&path, format!("field `{}`: {}", e.path(), e.inner())))?;
        if meta.format != FORMAT {
            return Err(Error::file(
                &path,
                format!(
                    "unknown checkpoint format `{}` (expected `{FORMAT}`)",
                    meta.format
                ),
            ));
        }
        meta.model.validate().map_err(|e| Error::file(&path, e))?;
        Ok(meta)
    }
}

/// Bytes one training step holds at most, checked (None: overflow): the
/// batch's examples, and per token of each example what the graph keeps for
/// the backward pass in every layer (norms, q/k/v, outputs and the residual
/// ~10·d, the FFN's hidden 2·d_ff, scores and probabilities 2·heads·tokens)
/// and the logits, twice (their gradients), in f32.
fn step_bytes(m: &ModelConfig, t: &TaskConfig, batch: usize) -> Option<usize> {
    let tokens = Task::example_tokens(t);
    let layer = m
        .d_model
        .checked_mul(10)?
        .checked_add(m.d_ff.checked_mul(2)?)?
        .checked_add(m.n_heads.checked_mul(tokens)?.checked_mul(2)?)?;
    let layers = m.n_encoder_layers.checked_add(m.n_decoder_layers)?;
    let per_token = layer
        .checked_mul(layers)?
        .checked_add(m.vocab_size)?
        .checked_mul(4 * 2)?;
    per_token
        .checked_mul(tokens)?
        .checked_add(Task::example_bytes(t))?
        .checked_mul(batch)
}

/// A checkpoint missing a parameter its config needs, as a file error.
fn strict_error(weights: &Path, e: Error) -> Error {
    match e {
        Error::MissingTensor { name, shape } => Error::file(
            weights,
            format!("is missing parameter `{name}` (shape {shape:?}) that the checkpoint's model config needs"),
        ),
        Error::ShapeMismatch { name, found, want } => Error::file(
            weights,
            format!("parameter `{name}` has shape {found:?}; the checkpoint's model config needs {want:?}"),
        ),
        e => e,
    }
}

/// A checkpoint holding parameters its config does not use.
fn unused_error(weights: &Path, store: &ParamStore) -> Result<()> {
    match store.unused().first() {
        None => Ok(()),
        Some(first) => Err(Error::file(
            weights,
            format!("holds parameter `{first}`, which the checkpoint's model config does not use"),
        )),
    }
}

/// Load a trained model for evaluation or sampling.
pub fn load_model(dir: &Path, device: &Device) -> Result<(Transformer, CheckpointMeta)> {
    let meta = CheckpointMeta::read(dir)?;
    let need = meta.model.param_count().and_then(|n| n.checked_mul(4));
    if let Some(msg) = crate::util::over_limit("the model's weights", need) {
        return Err(Error::file(dir.join("checkpoint.json"), msg));
    }
    let store = ParamStore::strict(DType::F32, device.clone());
    let weights = dir.join(&meta.weights);
    store.insert(load_safetensors(&weights, device)?)?;
    let model = Transformer::new(&meta.model, &store).map_err(|e| strict_error(&weights, e))?;
    unused_error(&weights, &store)?;
    model.set_train_seed(None);
    Ok((model, meta))
}

/// The factor that clips gradients of global norm `norm` to `clip` (0: off).
fn clip_scale(clip: f64, norm: f64) -> f64 {
    if clip > 0.0 && norm > clip {
        clip / (norm + 1e-6)
    } else {
        1.0
    }
}

/// What one training step reports.
#[derive(Clone, Debug, Serialize)]
pub struct StepInfo {
    pub step: u64,
    /// The training loss, with a mixture of experts' weighted auxiliary
    /// losses.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    /// Tokens each expert took this step, per MoE layer in model order
    /// (empty without experts).
    pub expert_load: Vec<Vec<usize>>,
}

pub struct Trainer {
    pub model: Transformer,
    pub store: ParamStore,
    pub opt: AdamW,
    pub task: Task,
    pub model_cfg: ModelConfig,
    pub train_cfg: TrainConfig,
    /// Steps completed.
    pub step: u64,
    pub device: Device,
    /// Data-parallel shards per batch, each on its own thread (1 = none).
    /// Not part of the run's identity: changing it changes only the order of
    /// floating-point sums.
    pub shards: usize,
    /// The fused trainer, when the model qualifies (`fused`), with one
    /// workspace and gradient set per shard; `None` steps through autograd.
    fused: Option<FusedRun>,
    /// Why the fused trainer does not run this model (or was turned off).
    pub autograd_reason: Option<String>,
}

struct FusedRun {
    plan: fused::Fused,
    shards: Vec<(fused::Workspace, fused::Params)>,
}

impl Trainer {
    pub fn new(
        model_cfg: ModelConfig,
        task_cfg: TaskConfig,
        train_cfg: TrainConfig,
    ) -> Result<Self> {
        Self::build(model_cfg, task_cfg, train_cfg, None)
    }

    fn build(
        model_cfg: ModelConfig,
        task_cfg: TaskConfig,
        train_cfg: TrainConfig,
        resume: Option<(&Path, &CheckpointMeta)>,
    ) -> Result<Self> {
        model_cfg.validate()?;
        train_cfg.validate()?;
        // weights, gradients and AdamW's two moments, in f32: refuse before
        // allocating what cannot fit
        crate::util::check_fits(
            "d_model",
            &format!(
                "({}, with {} layers, d_ff {}, vocab {}): a model of {} parameters, with its gradients and AdamW state,",
                model_cfg.d_model,
                model_cfg.n_encoder_layers + model_cfg.n_decoder_layers,
                model_cfg.d_ff,
                model_cfg.vocab_size,
                model_cfg
                    .param_count()
                    .map_or("more than 2^64".into(), |n| n.to_string()),
            ),
            model_cfg.param_count().and_then(|n| n.checked_mul(16)),
        )?;
        crate::util::check_fits(
            "batch_size",
            &format!(
                "({}): one step's examples and activations",
                train_cfg.batch_size
            ),
            step_bytes(&model_cfg, &task_cfg, train_cfg.batch_size),
        )?;
        let task = Task::new(task_cfg, train_cfg.seed, train_cfg.n_eval)?;
        check_compatible(&model_cfg, &task)?;
        let device = Device::Cpu;
        let store = ParamStore::new(
            derive_seed(train_cfg.seed, STREAM_INIT, 0),
            DType::F32,
            device.clone(),
        );
        let loaded = match resume {
            Some((dir, meta)) => {
                let weights = dir.join(&meta.weights);
                let tensors = load_safetensors(&weights, &device)?;
                let names: Vec<String> = tensors.keys().cloned().collect();
                store.insert(tensors)?;
                Some((weights, names))
            }
            None => None,
        };
        let model = Transformer::new(&model_cfg, &store).map_err(|e| match &loaded {
            Some((weights, _)) => strict_error(weights, e),
            None => e,
        })?;
        if let Some((weights, names)) = loaded {
            // resuming: every parameter from the checkpoint, none fresh
            if let Some((fresh, v)) = store.vars().into_iter().find(|(n, _)| !names.contains(n)) {
                return Err(Error::file(
                    &weights,
                    format!(
                        "is missing parameter `{fresh}` (shape {:?}) that the checkpoint's model config needs",
                        v.dims()
                    ),
                ));
            }
            unused_error(&weights, &store)?;
        }
        let mut opt = AdamW::new(
            store.vars(),
            train_cfg.beta1,
            train_cfg.beta2,
            train_cfg.eps,
            train_cfg.weight_decay,
        )?;
        let mut step = 0;
        if let Some((dir, meta)) = resume {
            opt.load_state(
                &load_safetensors(&dir.join(&meta.optimizer), &device)?,
                meta.step,
            )?;
            step = meta.step;
        }
        Ok(Self {
            model,
            store,
            opt,
            task,
            model_cfg,
            train_cfg,
            step,
            device,
            shards: 1,
            fused: None,
            autograd_reason: None,
        }
        .with_fused(true))
    }

    /// Step through the fused trainer when `on` and the model qualifies,
    /// through candle's autograd otherwise (`autograd_reason` says why).
    pub fn with_fused(mut self, on: bool) -> Self {
        self.fused = None;
        self.autograd_reason = Some("turned off".into());
        if on {
            match fused::Fused::new(&self.model, &self.store) {
                Ok(plan) => {
                    self.fused = Some(FusedRun {
                        plan,
                        shards: vec![],
                    });
                    self.autograd_reason = None;
                }
                Err(why) => self.autograd_reason = Some(why),
            }
        }
        self
    }

    /// "fused" or "autograd".
    pub fn executor(&self) -> &'static str {
        if self.fused.is_some() {
            "fused"
        } else {
            "autograd"
        }
    }

    /// Continue from the checkpoint in `dir`; `steps` (if given) replaces the
    /// total number of steps to train for.
    pub fn resume(dir: &Path, steps: Option<u64>) -> Result<Self> {
        let meta = CheckpointMeta::read(dir)?;
        let mut train = meta.train.clone();
        if let Some(s) = steps {
            train.steps = s;
        }
        Self::build(
            meta.model.clone(),
            meta.task.clone(),
            train,
            Some((dir, &meta)),
        )
    }

    pub fn lr_at(&self, step: u64) -> f64 {
        let c = &self.train_cfg;
        learning_rate(c.schedule, c.lr, step, c.warmup, c.steps, c.min_lr_ratio)
    }

    /// One optimisation step on batch number `self.step`. With `shards` > 1
    /// the batch is split and each part's forward and backward run on its own
    /// thread; the gradients are summed in shard order (deterministic).
    pub fn train_step(&mut self) -> Result<StepInfo> {
        let c = &self.train_cfg;
        let examples = self.task.train_examples(self.step, c.batch_size);
        let per_shard = examples.len().div_ceil(self.shards.max(1));
        let batches = examples
            .chunks(per_shard)
            .map(|e| collate(e, &self.device))
            .collect::<Result<Vec<_>>>()?;
        let mut total_w = 0f64;
        for b in &batches {
            total_w += b.n_target_tokens()? as f64;
        }
        if self.fused.is_some() && batches.iter().all(|b| matches!(b, Batch::Lm { .. })) {
            return self.fused_step(&batches, total_w);
        }
        let (model, step, seed, smoothing) = (&self.model, self.step, c.seed, c.label_smoothing);
        // MatFormer: one nested width per step, every layer, every shard
        let widths = &self.model_cfg.matformer;
        let width = (!widths.is_empty()).then(|| {
            widths[(derive_seed(seed, STREAM_MATFORMER, step) % widths.len() as u64) as usize]
        });
        type Shard = (f64, GradStore, Vec<Vec<usize>>);
        let shard_step = |i: usize, batch: &Batch| -> Result<Shard> {
            model.set_train_seed(Some(derive_seed(
                seed,
                STREAM_DROPOUT,
                step * 1024 + i as u64,
            )));
            let (loss, moe) = crate::ffn::moe::collect(|| {
                crate::ffn::with_width(width, || batch_loss_sum(model, batch, smoothing))
            });
            let mut loss = (loss? / total_w)?;
            // a mixture of experts' losses, weighted by this shard's share
            let share = batch.n_target_tokens()? as f64 / total_w;
            for s in &moe {
                loss = (loss + (&s.aux_loss * (s.aux_weight * share))?)?;
                loss = (loss + (&s.z_loss * (s.z_weight * share))?)?;
            }
            let grads = loss.backward()?;
            model.set_train_seed(None);
            let load = moe.into_iter().map(|s| s.assignment.load).collect();
            Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, grads, load))
        };
        let results: Vec<Result<Shard>> = if batches.len() == 1 {
            vec![shard_step(0, &batches[0])]
        } else {
            // on the rayon pool's long-lived threads: a thread spawned per
            // step starts with an empty allocator heap, and its first
            // touches of fresh pages (kernel zeroing) cost more than the
            // step's arithmetic for the recurrent mixers
            use rayon::prelude::*;
            batches
                .par_iter()
                .enumerate()
                .map(|(i, b)| shard_step(i, b))
                .collect()
        };
        let mut loss = 0.0;
        let mut merged: Option<GradStore> = None;
        let mut expert_load: Vec<Vec<usize>> = vec![];
        for r in results {
            let (l, g, load) = r?;
            loss += l;
            if expert_load.is_empty() {
                expert_load = load;
            } else {
                for (a, b) in expert_load.iter_mut().zip(load) {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                }
            }
            merged = Some(match merged {
                None => g,
                Some(mut acc) => {
                    for (_, var) in self.store.vars() {
                        if let Some(extra) = g.get(var.as_tensor()) {
                            let sum = match acc.get(var.as_tensor()) {
                                Some(a) => (a + extra)?,
                                None => extra.clone(),
                            };
                            acc.insert(var.as_tensor(), sum);
                        }
                    }
                    acc
                }
            });
        }
        let grads = merged.ok_or_else(|| Error::msg("empty batch"))?;
        let norm = self.opt.grad_norm(&grads)?;
        let lr = self.lr_at(self.step + 1);
        self.opt.step(&grads, lr, clip_scale(c.clip, norm))?;
        let mut info = self.stepped(loss, lr, norm, &batches);
        info.expert_load = expert_load;
        Ok(info)
    }

    /// Count the step just taken and report it.
    fn stepped(&mut self, loss: f64, lr: f64, grad_norm: f64, batches: &[Batch]) -> StepInfo {
        self.step += 1;
        StepInfo {
            step: self.step,
            loss,
            lr,
            grad_norm,
            tokens: batches.iter().map(|b| b.n_tokens()).sum(),
            expert_load: vec![],
        }
    }

    /// `train_step` through the fused trainer: each shard's loss and
    /// gradients on its own thread into its own buffers, summed in shard
    /// order, then the same clipping and AdamW update.
    fn fused_step(&mut self, batches: &[Batch], total_w: f64) -> Result<StepInfo> {
        let lr = self.lr_at(self.step + 1);
        let c = &self.train_cfg;
        let run = self.fused.as_mut().expect("fused");
        let params = run.plan.params(&self.store)?;
        while run.shards.len() < batches.len() {
            run.shards
                .push((fused::Workspace::default(), run.plan.zero_grads()));
        }
        let (plan, smoothing) = (&run.plan, c.label_smoothing as f32);
        let shard = |b: &Batch, ws: &mut fused::Workspace, g: &mut fused::Params| -> Result<f64> {
            let Batch::Lm {
                input,
                target,
                weight,
            } = b
            else {
                unreachable!("fused steps take language-model batches")
            };
            let (nb, t) = input.dims2()?;
            let ids = input.flatten_all()?.to_vec1::<u32>()?;
            let tgt = target.flatten_all()?.to_vec1::<u32>()?;
            let w = weight
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            g.iter_mut().for_each(|g| g.fill(0.0));
            plan.loss_and_grads(
                &params,
                ws,
                (nb, t),
                &ids,
                &tgt,
                &w,
                smoothing,
                total_w as f32,
                g,
            )
        };
        let losses: Vec<Result<f64>> = if batches.len() == 1 {
            let (ws, g) = &mut run.shards[0];
            vec![shard(&batches[0], ws, g)]
        } else {
            use rayon::prelude::*;
            batches
                .par_iter()
                .zip(run.shards.par_iter_mut())
                .map(|(b, (ws, g))| shard(b, ws, g))
                .collect()
        };
        let mut loss = 0.0;
        for l in losses {
            loss += l?;
        }
        let mut expert_load: Vec<Vec<usize>> = vec![];
        for (ws, _) in run.shards.iter().take(batches.len()) {
            let load = ws.expert_load();
            if expert_load.is_empty() {
                expert_load = load;
            } else {
                for (a, b) in expert_load.iter_mut().zip(load) {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                }
            }
        }
        let (first, rest) = run.shards.split_at_mut(1);
        let grads = &mut first[0].1;
        for (_, g) in rest.iter().take(batches.len() - 1) {
            for (a, b) in grads.iter_mut().zip(g) {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            }
        }
        let norm = self.opt.grad_norm_flat(grads);
        self.opt.step_flat(grads, lr, clip_scale(c.clip, norm))?;
        let mut info = self.stepped(loss, lr, norm, batches);
        info.expert_load = expert_load;
        Ok(info)
    }

    /// Write a checkpoint to `dir` (created if needed).
    pub fn save(&self, dir: &Path, metrics: serde_json::Value) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let weights = format!("model-{:08}.safetensors", self.step);
        let optimizer = format!("optim-{:08}.safetensors", self.step);
        self.store.save(&dir.join(&weights))?;
        let opt_map: std::collections::HashMap<String, Tensor> =
            self.opt.state_tensors().into_iter().collect();
        let opt_path = dir.join(&optimizer);
        crate::util::write_atomic_with(&opt_path, |tmp| {
            candle_core::safetensors::save(&opt_map, tmp).map_err(|e| Error::file(tmp, e))
        })?;
        let meta = CheckpointMeta {
            format: FORMAT.into(),
            step: self.step,
            model: self.model_cfg.clone(),
            task: self.task.cfg.clone(),
            train: self.train_cfg.clone(),
            weights: weights.clone(),
            optimizer: optimizer.clone(),
            metrics,
        };
        let json = serde_json::to_string_pretty(&meta).map_err(|e| Error::msg(e.to_string()))?;
        let path = dir.join("checkpoint.json");
        write_atomic(&path, json.as_bytes())?;
        // Only now that checkpoint.json points at the new files, drop old ones.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let ours = name.starts_with("model-") || name.starts_with("optim-");
                if ours && name.ends_with(".safetensors") && name != weights && name != optimizer {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(path)
    }
}

/// The task decides the model shape it needs.
pub fn check_compatible(cfg: &ModelConfig, task: &Task) -> Result<()> {
    if task.is_seq2seq() && cfg.shape != Shape::EncoderDecoder {
        return Err(Error::config(
            "shape",
            format!(
                "task `{}` needs an `encoder_decoder` model",
                task.cfg.name()
            ),
        ));
    }
    if !task.is_seq2seq() && cfg.shape != Shape::Decoder {
        return Err(Error::config(
            "shape",
            format!("task `{}` needs a `decoder` model", task.cfg.name()),
        ));
    }
    if cfg.vocab_size < task.vocab_size() {
        return Err(Error::config(
            "vocab_size",
            format!(
                "({}) is smaller than the task's vocabulary ({})",
                cfg.vocab_size,
                task.vocab_size()
            ),
        ));
    }
    if cfg.max_len < task.max_positions() {
        return Err(Error::config(
            "max_len",
            format!(
                "({}) is shorter than the task's sequences ({})",
                cfg.max_len,
                task.max_positions()
            ),
        ));
    }
    Ok(())
}

/// Sparse upcycling (Komatsuzaki et al. 2023; BAM, Zhang et al. 2024):
/// the dense checkpoint in `from` as a mixture of experts whose every
/// expert starts as a copy of its block's FFN (weights and biases), the
/// router freshly initialised, everything else copied. Dropless, it
/// computes what the dense model computes: the gates of a token sum to 1
/// over identical experts. Training restarts at step 0 with fresh AdamW
/// moments, `steps` (default: the dense run's) on the same task. (BAM's
/// attention experts are not built.)
pub fn upcycle(from: &Path, moe: crate::config::MoeConfig, steps: Option<u64>) -> Result<Trainer> {
    let meta = CheckpointMeta::read(from)?;
    let cfg_path = from.join("checkpoint.json");
    if meta.model.moe.is_some() {
        return Err(Error::file(&cfg_path, "is already a mixture of experts"));
    }
    if meta.model.ffn_weights != crate::config::FfnWeights::Dense {
        return Err(Error::file(
            &cfg_path,
            "has low-rank or block-diagonal FFN weights; upcycling copies dense FFNs",
        ));
    }
    let model = ModelConfig {
        moe: Some(moe),
        ..meta.model.clone()
    };
    let mut train = meta.train.clone();
    if let Some(s) = steps {
        train.steps = s;
    }
    let tr = Trainer::new(model, meta.task.clone(), train)?;
    let weights = from.join(&meta.weights);
    let dense = load_safetensors(&weights, &Device::Cpu)?;
    let e = moe.experts;
    for (name, var) in tr.store.vars() {
        if name.contains(".ffn.router.") {
            continue; // fresh
        }
        let src = dense.get(&name).ok_or_else(|| {
            Error::file(&weights, format!("has no parameter `{name}` to upcycle"))
        })?;
        let stacked = [".ffn.w1.", ".ffn.w2.", ".ffn.w3."]
            .iter()
            .any(|p| name.contains(p));
        let t = if stacked {
            // (o, i) -> (E, o, i); a bias (o) -> (E·o)
            let mut shape = vec![e];
            shape.extend(src.dims());
            src.unsqueeze(0)?
                .broadcast_as(shape)?
                .contiguous()?
                .reshape(var.shape())?
        } else {
            src.clone()
        };
        if t.dims() != var.dims() {
            return Err(Error::file(
                &weights,
                format!(
                    "parameter `{name}` has shape {:?}, the MoE model needs {:?}",
                    src.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(tr)
}

/// MatFormer's Mix'n'Match: the submodel of the checkpoint in `from` whose
/// block i keeps the first `widths[i]` hidden units of its FFN (one width:
/// every block), as a standalone model of its own — nested widths cleared,
/// per-layer widths where they differ. It computes what the nested model
/// computes at those widths. The returned trainer is at step 0 with fresh
/// AdamW moments (for further training or saving).
pub fn extract(from: &Path, widths: &[usize]) -> Result<Trainer> {
    let meta = CheckpointMeta::read(from)?;
    let cfg_path = from.join("checkpoint.json");
    let m = &meta.model;
    if m.moe.is_some() || m.ffn_weights != crate::config::FfnWeights::Dense {
        return Err(Error::file(
            &cfg_path,
            "extraction slices dense FFNs; this model has experts or structured weights",
        ));
    }
    let enc = if m.has_encoder() {
        m.n_encoder_layers
    } else {
        0
    };
    let blocks = enc
        + if m.has_decoder() {
            m.n_decoder_layers
        } else {
            0
        };
    let widths: Vec<usize> = match widths.len() {
        1 => vec![widths[0]; blocks],
        n if n == blocks => widths.to_vec(),
        n => {
            return Err(Error::config(
                "widths",
                format!("give one width or one per block ({blocks}), got {n}"),
            ))
        }
    };
    for (i, &w) in widths.iter().enumerate() {
        if w == 0 || w > m.block_d_ff(i) {
            return Err(Error::config(
                "widths",
                format!("block {i}: width {w} is not in 1..={}", m.block_d_ff(i)),
            ));
        }
    }
    let uniform = widths.iter().all(|&w| w == widths[0]);
    let model = ModelConfig {
        matformer: vec![],
        d_ff: if uniform {
            widths[0]
        } else {
            *widths.iter().max().unwrap_or(&0)
        },
        layer_d_ff: if uniform { vec![] } else { widths.clone() },
        ..m.clone()
    };
    let tr = Trainer::new(model, meta.task.clone(), meta.train.clone())?;
    let weights = from.join(&meta.weights);
    let full = load_safetensors(&weights, &Device::Cpu)?;
    for (name, var) in tr.store.vars() {
        let src = full
            .get(&name)
            .ok_or_else(|| Error::file(&weights, format!("has no parameter `{name}`")))?;
        // "encoder.3.ffn.w1.weight": block 3 of the encoder
        let block = || -> Option<usize> {
            let mut parts = name.split('.');
            let stack = parts.next()?;
            let i: usize = parts.next()?.parse().ok()?;
            Some(if stack == "encoder" { i } else { enc + i })
        };
        let t = if name.contains(".ffn.w2.weight") {
            src.narrow(1, 0, widths[block().unwrap_or(0)])?
        } else if [".ffn.w1.", ".ffn.w3."].iter().any(|p| name.contains(p)) {
            src.narrow(0, 0, widths[block().unwrap_or(0)])?
        } else {
            src.clone()
        };
        if t.dims() != var.dims() {
            return Err(Error::file(
                &weights,
                format!(
                    "parameter `{name}`: {:?} does not fit {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&t.contiguous()?.to_dtype(var.dtype())?)?;
    }
    Ok(tr)
}
