//! Built-in tasks, generated in-process from a seed: sequence transduction
//! (`copy`, `reverse`) for encoder–decoders, multi-query associative recall
//! (`mqar`, Arora et al. 2023 "Zoology") and byte-level language modelling
//! (`text`) for decoders.
//!
//! Training batch `i` is drawn from its own seed (derived from the run's seed
//! and `i`), so a resumed run sees exactly the batches the uninterrupted run
//! would have. The held-out set comes from a separate seed stream and, for
//! transduction, is excluded from training.

use crate::error::{Error, Result};
use crate::util::derive_seed;
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::PathBuf;

pub const PAD: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
/// First token id that carries content in the transduction tasks.
pub const FIRST_CONTENT: u32 = 3;

const STREAM_TRAIN: u64 = 1;
const STREAM_EVAL: u64 = 2;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransductionConfig {
    /// Vocabulary size including PAD, BOS and EOS.
    pub vocab: usize,
    pub min_len: usize,
    pub max_len: usize,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqarConfig {
    /// Keys come from [1, vocab/2), values from [vocab/2, vocab).
    pub vocab: usize,
    pub seq_len: usize,
    pub n_pairs: usize,
    /// Exponent of the power law that places queries (Zoology uses 0.01).
    pub power_a: f64,
    /// Training mixture, as Zoology trains: each training sequence is drawn
    /// from one of these (seq_len, n_pairs) settings at random (shorter
    /// ones right-padded, unscored) instead of only from (seq_len,
    /// n_pairs); the held-out set is always (seq_len, n_pairs). Empty: no
    /// mixture.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub train_mix: Vec<(usize, usize)>,
    /// A curriculum `(steps, n_pairs)`: the first `steps` training steps
    /// draw only (seq_len, n_pairs) sequences, the later ones the training
    /// distribution above. Softmax attention's induction circuit forms on
    /// few pairs and then extends to many in a few hundred steps, where
    /// trained on many pairs from the start it does not form in thousands
    /// (BENCHMARKS.md). None: no curriculum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curriculum: Option<(u64, usize)>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    pub path: PathBuf,
    pub seq_len: usize,
    /// The last fraction of the file is held out.
    pub val_fraction: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum TaskConfig {
    Copy(TransductionConfig),
    Reverse(TransductionConfig),
    Mqar(MqarConfig),
    Text(TextConfig),
}

impl TaskConfig {
    pub fn name(&self) -> &'static str {
        match self {
            TaskConfig::Copy(_) => "copy",
            TaskConfig::Reverse(_) => "reverse",
            TaskConfig::Mqar(_) => "mqar",
            TaskConfig::Text(_) => "text",
        }
    }

    pub fn validate(&self) -> Result<()> {
        // no model holds more positions than attend supports
        let most = crate::config::MAX_POSITIONS;
        let (field, len) = match self {
            TaskConfig::Copy(c) | TaskConfig::Reverse(c) => ("task.max_len", c.max_len),
            TaskConfig::Mqar(MqarConfig { seq_len, .. })
            | TaskConfig::Text(TextConfig { seq_len, .. }) => ("seq_len", *seq_len),
        };
        if len >= most {
            return Err(Error::config(
                field,
                format!("({len}) exceeds the {most} positions attend supports"),
            ));
        }
        match self {
            TaskConfig::Copy(c) | TaskConfig::Reverse(c) => {
                if c.vocab <= FIRST_CONTENT as usize + 1 {
                    return Err(Error::config(
                        "vocab",
                        format!(
                            "must exceed {} (PAD, BOS, EOS and content)",
                            FIRST_CONTENT + 1
                        ),
                    ));
                }
                if c.min_len == 0 || c.min_len > c.max_len {
                    return Err(Error::config(
                        "min_len",
                        format!("must be in 1..=max_len ({})", c.max_len),
                    ));
                }
            }
            TaskConfig::Mqar(c) => {
                if c.n_pairs == 0 {
                    return Err(Error::config("n_pairs", "must be at least 1"));
                }
                if c.vocab / 2 <= c.n_pairs {
                    return Err(Error::config(
                        "vocab",
                        format!(
                            "({}) must exceed 2 × n_pairs + 2 so keys and values are distinct",
                            c.vocab
                        ),
                    ));
                }
                let space = c.seq_len.saturating_sub(2 * c.n_pairs) / 2;
                if space < c.n_pairs {
                    return Err(Error::config(
                        "seq_len",
                        format!(
                            "({}) too short for {} pairs and their queries (need at least {})",
                            c.seq_len,
                            c.n_pairs,
                            4 * c.n_pairs
                        ),
                    ));
                }
                if !crate::config::is_positive(c.power_a) {
                    return Err(Error::config("power_a", "must be positive"));
                }
                for &(seq_len, n_pairs) in &c.train_mix {
                    let part = MqarConfig {
                        seq_len,
                        n_pairs,
                        train_mix: vec![],
                        curriculum: None,
                        ..c.clone()
                    };
                    if seq_len > c.seq_len {
                        return Err(Error::config(
                            "train_mix",
                            format!(
                                "({seq_len}, {n_pairs}) is longer than seq_len ({})",
                                c.seq_len
                            ),
                        ));
                    }
                    TaskConfig::Mqar(part).validate().map_err(|e| {
                        Error::config("train_mix", format!("({seq_len}, {n_pairs}): {e}"))
                    })?;
                }
                if let Some((_, n_pairs)) = c.curriculum {
                    let part = MqarConfig {
                        n_pairs,
                        train_mix: vec![],
                        curriculum: None,
                        ..c.clone()
                    };
                    TaskConfig::Mqar(part).validate().map_err(|e| {
                        Error::config("curriculum", format!("{n_pairs} pairs: {e}"))
                    })?;
                }
            }
            TaskConfig::Text(c) => {
                if c.seq_len < 2 {
                    return Err(Error::config("seq_len", "must be at least 2"));
                }
                if !(c.val_fraction > 0.0 && c.val_fraction < 1.0) {
                    return Err(Error::config("val_fraction", "must be in (0, 1)"));
                }
            }
        }
        Ok(())
    }
}

/// One held-out or training example.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    /// Transduction: source tokens and target tokens (no BOS/EOS).
    Pair { src: Vec<u32>, tgt: Vec<u32> },
    /// Language modelling: next-token targets with per-position weights
    /// (MQAR counts only the queried values).
    Lm {
        input: Vec<u32>,
        target: Vec<u32>,
        weight: Vec<f32>,
    },
}

/// A training batch as tensors.
pub enum Batch {
    Seq2Seq {
        src: Tensor,     // (b, s) u32
        src_pad: Tensor, // (b, s) f32, 1 = token
        tgt_in: Tensor,  // (b, t) u32: BOS y1 .. yn PAD..
        tgt_out: Tensor, // (b, t) u32: y1 .. yn EOS PAD..
        weight: Tensor,  // (b, t) f32: 1 where tgt_out is not PAD
    },
    Lm {
        input: Tensor,  // (b, t) u32
        target: Tensor, // (b, t) u32
        weight: Tensor, // (b, t) f32
    },
}

impl Batch {
    pub fn n_target_tokens(&self) -> Result<f32> {
        let w = match self {
            Batch::Seq2Seq { weight, .. } | Batch::Lm { weight, .. } => weight,
        };
        Ok(w.sum_all()?.to_scalar::<f32>()?)
    }
    pub fn n_tokens(&self) -> usize {
        match self {
            Batch::Seq2Seq { src, tgt_in, .. } => src.elem_count() + tgt_in.elem_count(),
            Batch::Lm { input, .. } => input.elem_count(),
        }
    }
}

pub struct Task {
    pub cfg: TaskConfig,
    text: Vec<u8>,
    held_out: HashSet<Vec<u32>>,
    pub n_eval: usize,
    seed: u64,
}

impl Task {
    /// Bytes one generated example takes at most (its token, target and
    /// weight vectors).
    pub fn example_bytes(cfg: &TaskConfig) -> usize {
        Self::example_tokens(cfg)
            .saturating_mul(3 * 4)
            .saturating_add(128)
    }

    /// Tokens of one example at most (source or target, whichever is longer).
    pub fn example_tokens(cfg: &TaskConfig) -> usize {
        match cfg {
            TaskConfig::Copy(c) | TaskConfig::Reverse(c) => c.max_len.saturating_add(1),
            TaskConfig::Mqar(c) => c.seq_len,
            TaskConfig::Text(c) => c.seq_len,
        }
    }

    /// `seed` fixes both the training stream and the held-out set.
    pub fn new(cfg: TaskConfig, seed: u64, n_eval: usize) -> Result<Self> {
        cfg.validate()?;
        // a generated held-out set is held whole (a text task's is bounded
        // by its file)
        if !matches!(cfg, TaskConfig::Text(_)) {
            crate::util::check_fits(
                "n_eval",
                &format!("({n_eval}): the held-out set"),
                n_eval.checked_mul(Self::example_bytes(&cfg)),
            )?;
        }
        let text = match &cfg {
            TaskConfig::Text(c) => {
                let bytes = std::fs::read(&c.path)
                    .map_err(|e| Error::file(&c.path, format!("cannot read data file: {e}")))?;
                let val = (bytes.len() as f64 * c.val_fraction) as usize;
                if bytes.len() - val < c.seq_len + 1 || val < c.seq_len + 1 {
                    return Err(Error::file(
                        &c.path,
                        format!(
                            "too short ({} bytes) for seq_len {} with a held-out split",
                            bytes.len(),
                            c.seq_len
                        ),
                    ));
                }
                bytes
            }
            _ => vec![],
        };
        let mut task = Task {
            cfg,
            text,
            held_out: HashSet::new(),
            n_eval,
            seed,
        };
        if matches!(task.cfg, TaskConfig::Copy(_) | TaskConfig::Reverse(_)) {
            task.held_out = task
                .eval_set()
                .into_iter()
                .filter_map(|e| match e {
                    Example::Pair { src, .. } => Some(src),
                    _ => None,
                })
                .collect();
        }
        Ok(task)
    }

    pub fn vocab_size(&self) -> usize {
        match &self.cfg {
            TaskConfig::Copy(c) | TaskConfig::Reverse(c) => c.vocab,
            TaskConfig::Mqar(c) => c.vocab,
            TaskConfig::Text(_) => 256,
        }
    }

    /// Longest sequence a model must handle for this task.
    pub fn max_positions(&self) -> usize {
        match &self.cfg {
            TaskConfig::Copy(c) | TaskConfig::Reverse(c) => c.max_len + 1,
            TaskConfig::Mqar(c) => c.seq_len,
            TaskConfig::Text(c) => c.seq_len,
        }
    }

    pub fn is_seq2seq(&self) -> bool {
        matches!(self.cfg, TaskConfig::Copy(_) | TaskConfig::Reverse(_))
    }

    /// The held-out set (same for every run with this seed).
    pub fn eval_set(&self) -> Vec<Example> {
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(self.seed, STREAM_EVAL, 0));
        match &self.cfg {
            TaskConfig::Text(c) => {
                let val = &self.text
                    [self.text.len() - (self.text.len() as f64 * c.val_fraction) as usize..];
                val.chunks_exact(c.seq_len + 1)
                    .take(self.n_eval)
                    .map(lm_window)
                    .collect()
            }
            TaskConfig::Mqar(c) => (0..self.n_eval)
                .map(|_| mqar_example(c, &mut rng))
                .collect(),
            _ => (0..self.n_eval).map(|_| self.sample(0, &mut rng)).collect(),
        }
    }

    /// One random example from the task's training distribution at
    /// training step `step`.
    fn sample(&self, step: u64, rng: &mut ChaCha8Rng) -> Example {
        match &self.cfg {
            TaskConfig::Copy(c) | TaskConfig::Reverse(c) => {
                let len = rng.random_range(c.min_len..=c.max_len);
                let src: Vec<u32> = (0..len)
                    .map(|_| rng.random_range(FIRST_CONTENT..c.vocab as u32))
                    .collect();
                let mut tgt = src.clone();
                if matches!(self.cfg, TaskConfig::Reverse(_)) {
                    tgt.reverse();
                }
                Example::Pair { src, tgt }
            }
            TaskConfig::Mqar(
                c @ MqarConfig {
                    curriculum: Some((until, n_pairs)),
                    ..
                },
            ) if step < *until => mqar_example(
                &MqarConfig {
                    n_pairs: *n_pairs,
                    ..c.clone()
                },
                rng,
            ),
            TaskConfig::Mqar(c) if c.train_mix.is_empty() => mqar_example(c, rng),
            TaskConfig::Mqar(c) => {
                let (seq_len, n_pairs) = c.train_mix[rng.random_range(0..c.train_mix.len())];
                let part = MqarConfig {
                    seq_len,
                    n_pairs,
                    train_mix: vec![],
                    curriculum: None,
                    ..c.clone()
                };
                let Example::Lm {
                    mut input,
                    mut target,
                    mut weight,
                } = mqar_example(&part, rng)
                else {
                    unreachable!("MQAR examples are language-model examples")
                };
                // right padding: a causal model's earlier positions never see it
                input.resize(c.seq_len, 0);
                target.resize(c.seq_len, 0);
                weight.resize(c.seq_len, 0.0);
                Example::Lm {
                    input,
                    target,
                    weight,
                }
            }
            TaskConfig::Text(c) => {
                let train_len =
                    self.text.len() - (self.text.len() as f64 * c.val_fraction) as usize;
                let start = rng.random_range(0..train_len - c.seq_len);
                lm_window(&self.text[start..start + c.seq_len + 1])
            }
        }
    }

    /// Training examples for step `step`.
    pub fn train_examples(&self, step: u64, batch_size: usize) -> Vec<Example> {
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(self.seed, STREAM_TRAIN, step));
        let mut out = Vec::with_capacity(batch_size);
        while out.len() < batch_size {
            let e = self.sample(step, &mut rng);
            if let Example::Pair { src, .. } = &e {
                if self.held_out.contains(src) {
                    continue;
                }
            }
            out.push(e);
        }
        out
    }

    pub fn train_batch(&self, step: u64, batch_size: usize, dev: &Device) -> Result<Batch> {
        collate(&self.train_examples(step, batch_size), dev)
    }
}

fn lm_window(w: &[u8]) -> Example {
    let n = w.len() - 1;
    Example::Lm {
        input: w[..n].iter().map(|&b| b as u32).collect(),
        target: w[1..].iter().map(|&b| b as u32).collect(),
        weight: vec![1.0; n],
    }
}

/// MQAR as in Zoology's `multiquery_ar`: `n_pairs` key–value pairs, then
/// every key queried once at a gap drawn from p(g) ∝ g^(a-1); the target after
/// a query key is its value; other positions hold random tokens and are not
/// scored.
pub fn mqar_example(c: &MqarConfig, rng: &mut impl Rng) -> Example {
    let half = (c.vocab / 2) as u32;
    let mut keys: Vec<u32> = (1..half).collect();
    keys.shuffle(rng);
    keys.truncate(c.n_pairs);
    let mut values: Vec<u32> = (half..c.vocab as u32).collect();
    values.shuffle(rng);
    values.truncate(c.n_pairs);
    let context = 2 * c.n_pairs;
    let space = (c.seq_len - context) / 2;
    // gaps: n_pairs distinct draws from 0..space without replacement, p ∝ (g+1)^(a-1)
    let mut weights: Vec<f64> = (1..=space)
        .map(|x| c.power_a * (x as f64).powf(c.power_a - 1.0))
        .collect();
    let mut gaps = Vec::with_capacity(c.n_pairs);
    for _ in 0..c.n_pairs {
        let total: f64 = weights.iter().sum();
        let mut r = rng.random::<f64>() * total;
        let mut g = 0;
        while g + 1 < space && (weights[g] == 0.0 || r >= weights[g]) {
            r -= weights[g];
            g += 1;
        }
        while weights[g] == 0.0 {
            g -= 1; // rounding at the tail: fall back to the last free gap
        }
        weights[g] = 0.0;
        gaps.push(g);
    }
    // full sequence has seq_len + 1 tokens; input = seq[..-1], target = seq[1..]
    let mut seq = vec![0u32; c.seq_len + 1];
    let mut is_query_value = vec![false; c.seq_len + 1];
    for i in 0..c.n_pairs {
        seq[2 * i] = keys[i];
        seq[2 * i + 1] = values[i];
    }
    let mut filled = vec![false; c.seq_len + 1];
    filled[..context].iter_mut().for_each(|f| *f = true);
    for (i, &g) in gaps.iter().enumerate() {
        let q = context + 2 * g;
        seq[q] = keys[i];
        seq[q + 1] = values[i];
        filled[q] = true;
        filled[q + 1] = true;
        is_query_value[q + 1] = true;
    }
    for (s, f) in seq.iter_mut().zip(&filled) {
        if !f {
            *s = rng.random_range(0..c.vocab as u32);
        }
    }
    Example::Lm {
        input: seq[..c.seq_len].to_vec(),
        target: seq[1..].to_vec(),
        weight: is_query_value[1..]
            .iter()
            .map(|&q| if q { 1.0 } else { 0.0 })
            .collect(),
    }
}

/// Pad and stack examples into tensors.
pub fn collate(examples: &[Example], dev: &Device) -> Result<Batch> {
    let b = examples.len();
    match &examples[0] {
        Example::Pair { .. } => {
            let (mut s_len, mut t_len) = (0, 0);
            for e in examples {
                if let Example::Pair { src, tgt } = e {
                    s_len = s_len.max(src.len());
                    t_len = t_len.max(tgt.len() + 1);
                }
            }
            let mut src_v = vec![PAD; b * s_len];
            let mut pad_v = vec![0f32; b * s_len];
            let mut tin = vec![PAD; b * t_len];
            let mut tout = vec![PAD; b * t_len];
            let mut w = vec![0f32; b * t_len];
            for (i, e) in examples.iter().enumerate() {
                let Example::Pair { src, tgt } = e else {
                    return Err(Error::msg("mixed example kinds in one batch"));
                };
                for (j, &s) in src.iter().enumerate() {
                    src_v[i * s_len + j] = s;
                    pad_v[i * s_len + j] = 1.0;
                }
                tin[i * t_len] = BOS;
                for (j, &y) in tgt.iter().enumerate() {
                    tin[i * t_len + j + 1] = y;
                    tout[i * t_len + j] = y;
                }
                tout[i * t_len + tgt.len()] = EOS;
                w[i * t_len..i * t_len + tgt.len() + 1]
                    .iter_mut()
                    .for_each(|x| *x = 1.0);
            }
            Ok(Batch::Seq2Seq {
                src: Tensor::from_vec(src_v, (b, s_len), dev)?,
                src_pad: Tensor::from_vec(pad_v, (b, s_len), dev)?,
                tgt_in: Tensor::from_vec(tin, (b, t_len), dev)?,
                tgt_out: Tensor::from_vec(tout, (b, t_len), dev)?,
                weight: Tensor::from_vec(w, (b, t_len), dev)?,
            })
        }
        Example::Lm { input, .. } => {
            let t = input.len();
            let (mut iv, mut tv, mut wv) = (vec![], vec![], vec![]);
            for e in examples {
                let Example::Lm {
                    input,
                    target,
                    weight,
                } = e
                else {
                    return Err(Error::msg("mixed example kinds in one batch"));
                };
                if input.len() != t {
                    return Err(Error::msg("language-model examples must share one length"));
                }
                iv.extend_from_slice(input);
                tv.extend_from_slice(target);
                wv.extend_from_slice(weight);
            }
            Ok(Batch::Lm {
                input: Tensor::from_vec(iv, (b, t), dev)?,
                target: Tensor::from_vec(tv, (b, t), dev)?,
                weight: Tensor::from_vec(wv, (b, t), dev)?,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqar_matches_zoology_layout() {
        let c = MqarConfig {
            vocab: 64,
            seq_len: 64,
            n_pairs: 8,
            power_a: 0.01,
            train_mix: vec![],
            curriculum: None,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..200 {
            let Example::Lm {
                input,
                target,
                weight,
            } = mqar_example(&c, &mut rng)
            else {
                panic!()
            };
            assert_eq!(input.len(), 64);
            assert_eq!(weight.iter().filter(|&&w| w > 0.0).count(), 8);
            // the kv context: keys in [1, 32), values in [32, 64), keys distinct
            let keys: HashSet<u32> = (0..8).map(|i| input[2 * i]).collect();
            assert_eq!(keys.len(), 8);
            for i in 0..8 {
                assert!((1..32).contains(&input[2 * i]) && (32..64).contains(&input[2 * i + 1]));
            }
            // every scored target is the value paired with the key just read
            for (p, &w) in weight.iter().enumerate() {
                if w > 0.0 {
                    let key = input[p];
                    let i = (0..8)
                        .find(|&i| input[2 * i] == key)
                        .expect("query is a key");
                    assert_eq!(target[p], input[2 * i + 1]);
                    assert!(p >= 16 && (p - 16) % 2 == 0);
                }
            }
        }
    }

    /// A training mixture: every example is one of the mixture's settings
    /// (its pairs scored, padded past its own length, unscored), both
    /// settings occur, and the held-out set is the main setting's.
    #[test]
    fn mqar_mixture_draws_each_setting_padded() {
        let c = MqarConfig {
            vocab: 64,
            seq_len: 64,
            n_pairs: 8,
            power_a: 0.01,
            train_mix: vec![(32, 2), (64, 4)],
            curriculum: None,
        };
        let task = Task::new(TaskConfig::Mqar(c.clone()), 3, 20).unwrap();
        let mut seen = HashSet::new();
        for e in task.train_examples(0, 64) {
            let Example::Lm { input, weight, .. } = e else {
                panic!()
            };
            assert_eq!((input.len(), weight.len()), (64, 64));
            let scored = weight.iter().filter(|&&w| w > 0.0).count();
            let last = weight.iter().rposition(|&w| w > 0.0).unwrap();
            match scored {
                2 => assert!(last < 32 && input[32..].iter().all(|&t| t == 0)),
                4 => {}
                n => panic!("{n} scored positions"),
            }
            seen.insert(scored);
        }
        assert_eq!(seen.len(), 2);
        for e in task.eval_set() {
            let Example::Lm { weight, .. } = e else {
                panic!()
            };
            assert_eq!(weight.iter().filter(|&&w| w > 0.0).count(), 8);
        }
        let bad = MqarConfig {
            train_mix: vec![(128, 2)],
            ..c.clone()
        };
        let e = TaskConfig::Mqar(bad).validate().unwrap_err().to_string();
        assert!(e.contains("train_mix") && e.contains("longer"), "{e}");
        let bad = MqarConfig {
            train_mix: vec![(16, 8)],
            ..c
        };
        let e = TaskConfig::Mqar(bad).validate().unwrap_err().to_string();
        assert!(e.contains("train_mix") && e.contains("(16, 8)"), "{e}");
    }

    /// A curriculum: before its last step every training example has the
    /// curriculum's pairs, from then on the mixture's; the held-out set is
    /// the main setting's throughout.
    #[test]
    fn mqar_curriculum_trains_on_few_pairs_first() {
        let c = MqarConfig {
            vocab: 64,
            seq_len: 64,
            n_pairs: 8,
            power_a: 0.01,
            train_mix: vec![(64, 4), (64, 8)],
            curriculum: Some((10, 2)),
        };
        let task = Task::new(TaskConfig::Mqar(c.clone()), 3, 20).unwrap();
        // the scored positions of an example: its number of pairs
        let n = |e: &Example| match e {
            Example::Lm { weight, .. } => weight.iter().filter(|&&w| w > 0.0).count(),
            _ => panic!(),
        };
        let scored =
            |step: u64| -> HashSet<usize> { task.train_examples(step, 32).iter().map(n).collect() };
        for step in [0, 5, 9] {
            assert_eq!(scored(step), HashSet::from([2]), "step {step}");
        }
        for step in [10, 11, 500] {
            assert_eq!(scored(step), HashSet::from([4, 8]), "step {step}");
        }
        for e in task.eval_set() {
            let Example::Lm { weight, .. } = e else {
                panic!()
            };
            assert_eq!(weight.iter().filter(|&&w| w > 0.0).count(), 8);
        }
        // without a mixture the curriculum hands over to n_pairs
        let plain = Task::new(
            TaskConfig::Mqar(MqarConfig {
                train_mix: vec![],
                ..c.clone()
            }),
            3,
            20,
        )
        .unwrap();
        assert!(plain.train_examples(9, 8).iter().all(|e| n(e) == 2));
        assert!(plain.train_examples(10, 8).iter().all(|e| n(e) == 8));
        // curriculum pairs that do not fit are refused, naming the field
        let bad = MqarConfig {
            curriculum: Some((10, 40)),
            ..c
        };
        let e = TaskConfig::Mqar(bad).validate().unwrap_err().to_string();
        assert!(e.contains("curriculum") && e.contains("40 pairs"), "{e}");
    }

    #[test]
    fn held_out_never_in_training() {
        let cfg = TaskConfig::Reverse(TransductionConfig {
            vocab: 5,
            min_len: 1,
            max_len: 3,
        });
        let task = Task::new(cfg, 7, 10).unwrap();
        let held: Vec<_> = task.eval_set();
        for step in 0..50 {
            for e in task.train_examples(step, 16) {
                assert!(!held.contains(&e), "{e:?}");
            }
        }
    }

    #[test]
    fn unreadable_text_file_names_the_file() {
        let cfg = TaskConfig::Text(TextConfig {
            path: "/nonexistent/x.txt".into(),
            seq_len: 8,
            val_fraction: 0.1,
        });
        let e = Task::new(cfg, 0, 10).err().unwrap().to_string();
        assert!(e.contains("/nonexistent/x.txt"), "{e}");
    }
}
