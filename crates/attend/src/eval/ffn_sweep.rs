//! Channel mixers compared at equal training tokens (issue 17): dense
//! FFNs of several widths, mixtures of experts, a MatFormer (every nested
//! width scored from one training run), low-rank and block-diagonal FFNs,
//! each trained byte-level on a text file and scored on its held-out part,
//! with what it cost: training FLOPs, wall time, active and total
//! parameters, and eval throughput.
//!
//! FLOPs follow Kaplan et al. (2020): per training token 6·N_active (the
//! non-embedding parameters a token passes through, plus the output
//! projection) + 6·L·t·d for attention's scores and values.

use crate::config::{FfnKind, FfnWeights, ModelConfig, MoeConfig};
use crate::error::{Error, Result};
use crate::eval::{evaluate, EvalOptions};
use crate::tasks::{collate, Batch, TaskConfig, TextConfig};
use crate::train::{presets::preset, TrainConfig, Trainer};
use candle_core::{DType, D};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One channel mixer of the sweep: `dense:F`, `moe:F,e=E,k=K`,
/// `matformer:F[,n=N]` (N nested widths F, F/2, …; default 4),
/// `lowrank:F,r=R`, `blockdiag:F,b=B` (F: d_ff, of each expert for moe).
#[derive(Clone, Debug, PartialEq)]
pub struct FfnSpec {
    pub spec: String,
    pub d_ff: usize,
    pub weights: FfnWeights,
    pub moe: Option<MoeConfig>,
    pub matformer: Vec<usize>,
}

impl FfnSpec {
    pub fn kind(&self) -> &str {
        self.spec.split(':').next().unwrap_or_default()
    }
}

impl std::str::FromStr for FfnSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (kind, rest) = s.split_once(':').ok_or(format!(
            "`{s}`: expected KIND:D_FF[,key=value] (e.g. dense:512, moe:256,e=8,k=2)"
        ))?;
        let mut parts = rest.split(',');
        let d_ff: usize = parts
            .next()
            .and_then(|f| f.parse().ok())
            .filter(|&f| f > 0)
            .ok_or(format!(
                "`{s}`: the FFN width after `{kind}:` must be a positive number"
            ))?;
        let mut kv = std::collections::BTreeMap::new();
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or(format!("`{s}`: `{p}` is not key=value"))?;
            let v: usize = v
                .parse()
                .ok()
                .filter(|&v| v > 0)
                .ok_or(format!("`{s}`: `{k}` takes a positive number"))?;
            kv.insert(k.to_string(), v);
        }
        let allow = |keys: &[&str]| -> std::result::Result<(), String> {
            match kv.keys().find(|k| !keys.contains(&k.as_str())) {
                Some(k) => Err(format!(
                    "`{s}`: unknown setting `{k}` for {kind} ({})",
                    keys.join(", ")
                )),
                None => Ok(()),
            }
        };
        let need = |k: &str| {
            kv.get(k)
                .copied()
                .ok_or(format!("`{s}`: {kind} needs {k}="))
        };
        let mut spec = FfnSpec {
            spec: s.to_string(),
            d_ff,
            weights: FfnWeights::Dense,
            moe: None,
            matformer: vec![],
        };
        match kind {
            "dense" => allow(&[])?,
            "moe" => {
                allow(&["e", "k"])?;
                spec.moe = Some(MoeConfig {
                    experts: need("e")?,
                    top_k: need("k")?,
                    ..MoeConfig::default()
                });
            }
            "matformer" => {
                allow(&["n"])?;
                let n = kv.get("n").copied().unwrap_or(4);
                spec.matformer = (0..n).map(|i| d_ff >> i).take_while(|&w| w > 0).collect();
            }
            "lowrank" => {
                allow(&["r"])?;
                spec.weights = FfnWeights::Lowrank { rank: need("r")? };
            }
            "blockdiag" => {
                allow(&["b"])?;
                spec.weights = FfnWeights::Blockdiag { blocks: need("b")? };
            }
            _ => {
                return Err(format!(
                    "`{s}`: unknown FFN kind `{kind}` (dense, moe, matformer, lowrank, blockdiag)"
                ))
            }
        }
        Ok(spec)
    }
}

/// What every run of a sweep shares.
#[derive(Clone, Debug, Serialize)]
pub struct FfnSetup {
    pub data: PathBuf,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub seq_len: usize,
    pub batch_size: usize,
    pub steps: u64,
    pub lr: f64,
    pub n_eval: usize,
    pub seed: u64,
    pub ffn: FfnKind,
    #[serde(skip)]
    pub shards: usize,
}

/// One scored model (a MatFormer run gives one per nested width).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FfnResult {
    pub spec: String,
    pub kind: String,
    /// d_ff (of each expert for moe; the nested width for matformer).
    pub d_ff: usize,
    /// Held-out next-byte loss (nats).
    pub loss: f64,
    /// Parameters a token passes through (blocks and output projection).
    pub active_params: usize,
    /// Every parameter, embeddings included.
    pub total_params: usize,
    pub train_flops: f64,
    pub train_seconds: f64,
    pub train_tokens: u64,
    /// `fused` or `autograd` (wall times compare fairly within one).
    pub trainer: String,
    /// Held-out tokens scored per second (a batched forward pass).
    pub eval_tokens_per_s: f64,
    /// MatFormer: the fraction of held-out positions where this width's
    /// top-1 prediction equals the full width's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    /// MoE: the share of tokens the busiest expert took over the last 100
    /// steps, as a multiple of a fair share (1 = balanced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_load: Option<f64>,
}

/// Non-embedding parameters one token passes through in a block's FFN at
/// width f: 2 or 3 matrices (gated), as the weights are parameterised.
fn ffn_active(spec: &FfnSpec, d: usize, f: usize, gated: bool) -> usize {
    let mats = if gated { 3 } else { 2 };
    let one = match spec.weights {
        FfnWeights::Dense => d * f,
        FfnWeights::Lowrank { rank } => rank * (d + f),
        FfnWeights::Blockdiag { blocks } => d * f / blocks,
    };
    match &spec.moe {
        Some(m) => m.top_k * mats * one + d * m.experts,
        None => mats * one,
    }
}

/// The model of a spec under the setup.
pub fn model_config(spec: &FfnSpec, s: &FfnSetup) -> Result<ModelConfig> {
    let (base, _, _) = preset("text")?;
    let m = ModelConfig {
        d_model: s.d_model,
        n_decoder_layers: s.n_layers,
        n_heads: s.n_heads,
        d_ff: spec.d_ff,
        max_len: s.seq_len,
        ffn: s.ffn,
        ffn_weights: spec.weights,
        moe: spec.moe,
        matformer: spec.matformer.clone(),
        ..base
    };
    m.validate()?;
    Ok(m)
}

/// Train one spec and score it (every nested width of a MatFormer).
pub fn run_spec(
    spec: &FfnSpec,
    s: &FfnSetup,
    mut on_step: impl FnMut(u64),
) -> Result<Vec<FfnResult>> {
    let model = model_config(spec, s)?;
    let task = TaskConfig::Text(TextConfig {
        path: s.data.clone(),
        seq_len: s.seq_len,
        val_fraction: 0.1,
    });
    let (_, _, base_train) = preset("text")?;
    let train = TrainConfig {
        steps: s.steps,
        batch_size: s.batch_size,
        lr: s.lr,
        warmup: (s.steps / 10).min(100),
        n_eval: s.n_eval,
        seed: s.seed,
        ..base_train
    };
    let mut tr = Trainer::new(model.clone(), task, train)?;
    tr.shards = s.shards;
    let (mut load, mut seen) = (vec![], 0usize);
    let t0 = std::time::Instant::now();
    while tr.step < s.steps {
        let info = tr.train_step()?;
        if tr.step + 100 > s.steps {
            for l in info.expert_load {
                seen += l.iter().sum::<usize>();
                if load.len() < l.len() {
                    load.resize(l.len(), 0);
                }
                load.iter_mut().zip(l).for_each(|(a, b)| *a += b);
            }
        }
        on_step(tr.step);
    }
    let train_seconds = t0.elapsed().as_secs_f64();
    let tokens = s.steps * (s.batch_size * s.seq_len) as u64;
    let (d, l, v) = (s.d_model, s.n_layers, model.vocab_size);
    let gated = matches!(s.ffn, FfnKind::Swiglu | FfnKind::Geglu);
    let mats = if gated { 3 } else { 2 };
    let attn = 4 * d * d;
    let active = |f: usize| l * (attn + ffn_active(spec, d, f, gated)) + d * v;
    let flops_per_token = |f: usize| 6.0 * active(f) as f64 + 6.0 * (l * s.seq_len * d) as f64;
    // a MatFormer trains each width on a uniform share of the steps
    let widths = if spec.matformer.is_empty() {
        vec![spec.d_ff]
    } else {
        spec.matformer.clone()
    };
    let mean_flops = widths.iter().map(|&f| flops_per_token(f)).sum::<f64>() / widths.len() as f64;
    let max_load = (!load.is_empty() && seen > 0).then(|| {
        let fair = seen as f64 / load.len() as f64;
        *load.iter().max().unwrap_or(&0) as f64 / fair
    });
    let mut out = vec![];
    for &w in &widths {
        let nested = (!spec.matformer.is_empty()).then_some(w);
        let score = || {
            crate::ffn::with_width(nested, || {
                evaluate(&tr.model, &tr.task, &EvalOptions::default())
            })
        };
        let m = score()?;
        // throughput from a second, warm pass over the same windows
        let t1 = std::time::Instant::now();
        score()?;
        let eval_s = t1.elapsed().as_secs_f64();
        let eval_tokens = (m.n_examples * s.seq_len) as f64;
        let agreement = match nested {
            Some(w) if w != spec.d_ff => Some(agreement(&tr, w)?),
            Some(_) => Some(1.0),
            None => None,
        };
        out.push(FfnResult {
            spec: spec.spec.clone(),
            kind: spec.kind().to_string(),
            d_ff: w,
            loss: m
                .loss
                .ok_or_else(|| Error::msg("text evaluation gave no loss"))?,
            active_params: active(w),
            // a nested width: the standalone submodel `attend extract` writes
            // (F − w fewer hidden units in every block: their rows of w1 and
            // w3, columns of w2, and biases)
            total_params: tr.store.num_params()
                - l * (spec.d_ff - w) * (mats * d + if model.bias { mats - 1 } else { 0 }),
            train_flops: mean_flops * tokens as f64,
            train_seconds,
            train_tokens: tokens,
            trainer: tr.executor().to_string(),
            eval_tokens_per_s: eval_tokens / eval_s.max(1e-9),
            agreement,
            max_load,
        });
    }
    Ok(out)
}

/// The fraction of held-out positions where the nested model of width w
/// predicts (top 1) what the full model predicts.
fn agreement(tr: &Trainer, w: usize) -> Result<f64> {
    let dev = tr.model.embed.device();
    let (mut same, mut n) = (0f64, 0f64);
    for chunk in tr.task.eval_set().chunks(16) {
        let Batch::Lm { input, .. } = collate(chunk, &dev)? else {
            return Err(Error::msg(
                "text held-out examples are language-model batches",
            ));
        };
        let full = tr.model.decode(&input, None)?.argmax(D::Minus1)?;
        let sub =
            crate::ffn::with_width(Some(w), || tr.model.decode(&input, None))?.argmax(D::Minus1)?;
        same += full
            .eq(&sub)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        n += full.elem_count() as f64;
    }
    Ok(same / n.max(1.0))
}
