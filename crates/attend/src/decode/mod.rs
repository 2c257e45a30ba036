//! Decoding: greedy, temperature / top-k / top-p / min-p sampling with
//! repetition, presence and frequency penalties (as llama.cpp and the
//! OpenAI API define them), and beam search with the GNMT length penalty
//! (Wu et al. 2016), all over the incremental `Transformer::step` with a KV
//! cache.

pub mod heads;
pub mod speculative;

use crate::error::{Error, Result};
use crate::model::{Memory, Transformer};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = all).
    pub top_p: f64,
    /// Keep the tokens at least min_p times as likely as the likeliest (0 = all).
    pub min_p: f64,
    /// CTRL's repetition penalty on the last `penalty_last_n` tokens: a
    /// positive logit divided by it, a negative one multiplied (1 = off).
    pub repeat_penalty: f64,
    /// OpenAI's: subtracted from the logit of every token among the last
    /// `penalty_last_n` (0 = off)…
    pub presence_penalty: f64,
    /// …and this times its count there (0 = off).
    pub frequency_penalty: f64,
    /// How many recent tokens (prompt included) the penalties look at.
    pub penalty_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy, no penalties.
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// llama.cpp's defaults: temperature 0.8, top-k 40, top-p 0.95, min-p
    /// 0.05 (what chat uses when the model file recommends nothing).
    pub fn llama_cpp() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            ..Self::default()
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::config(
                "temperature",
                format!(
                    "must be 0 (greedy) or a positive finite number, got {}",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::config("top_p", "must be in (0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::config("min_p", "must be in [0, 1]"));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(Error::config(
                "repeat_penalty",
                "must be a positive finite number (1 = off)",
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::config(
                    name,
                    "must be in [-2, 2] (0 = off), as in the OpenAI API",
                ));
            }
        }
        Ok(())
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    /// Pick the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_after(logits, &[])
    }

    /// Pick the next token after `history` (the sequence so far, prompt
    /// included): the penalties on its last `penalty_last_n` tokens, then
    /// greedy, or temperature, top-k, top-p and min-p sampling.
    pub fn sample_after(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(&self.penalised(logits, history));
        }
        let probs = self.distribution_after(logits, history);
        self.draw(&probs)
    }

    /// The logits after the penalties on `history`'s last tokens.
    fn penalised<'a>(&self, logits: &'a [f32], history: &[u32]) -> std::borrow::Cow<'a, [f32]> {
        let p = &self.params;
        if p.repeat_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0 {
            return std::borrow::Cow::Borrowed(logits);
        }
        let recent = &history[history.len().saturating_sub(p.penalty_last_n)..];
        let mut counts = std::collections::HashMap::new();
        for &t in recent {
            *counts.entry(t).or_insert(0usize) += 1;
        }
        let mut l = logits.to_vec();
        for (&t, &n) in &counts {
            let Some(x) = l.get_mut(t as usize) else {
                continue;
            };
            let rp = p.repeat_penalty as f32;
            *x = if *x > 0.0 { *x / rp } else { *x * rp };
            *x -= p.presence_penalty as f32 + n as f32 * p.frequency_penalty as f32;
        }
        std::borrow::Cow::Owned(l)
    }

    /// What sampling (temperature > 0) draws from after `history`: the
    /// tokens kept by top-k, min-p and top-p, likeliest first, with
    /// unnormalised weights.
    pub fn distribution_after(&self, logits: &[f32], history: &[u32]) -> Vec<(u32, f64)> {
        let logits = self.penalised(logits, history);
        let t = self.params.temperature;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 {
            probs.truncate(self.params.top_k);
        }
        if self.params.min_p > 0.0 {
            // (sorted: the first is the likeliest, e^0 = 1)
            let floor = self.params.min_p * probs[0].1;
            let keep = probs.iter().take_while(|p| p.1 >= floor).count().max(1);
            probs.truncate(keep);
        }
        let z: f64 = probs.iter().map(|p| p.1).sum();
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = 0;
            for p in &probs {
                cum += p.1 / z;
                keep += 1;
                if cum >= self.params.top_p {
                    break;
                }
            }
            probs.truncate(keep);
        }
        probs
    }

    /// One token from unnormalised weights.
    pub fn draw(&mut self, probs: &[(u32, f64)]) -> u32 {
        let z: f64 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f64>() * z;
        for &(id, p) in probs {
            if r < p {
                return id;
            }
            r -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }

    /// A uniform number in [0, 1) from the sampler's generator.
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Continue `prompt` (one sequence) by up to `max_new` tokens, stopping after
/// `stop`; `on_token` sees each token as it is produced (for streaming).
/// When the sequence fills the model's context (`max_len`), the state is
/// rebuilt from the most recent half of the context and generation goes on.
pub fn generate(
    model: &Transformer,
    prompt: &[u32],
    memory: Option<&Memory>,
    max_new: usize,
    sampler: &mut Sampler,
    stop: Option<u32>,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let max_len = model.cfg.max_len;
    if prompt.is_empty() {
        return Err(Error::msg("the prompt is empty"));
    }
    if prompt.len() > max_len {
        return Err(Error::msg(format!(
            "the prompt has {} tokens, more than the model's context of {max_len}",
            prompt.len()
        )));
    }
    let state = model.new_state(memory)?;
    generate_in(
        model, state, prompt, memory, max_new, sampler, stop, on_token,
    )
}

/// As `generate`, with the KV cache capped by an eviction `policy`
/// (`cache::policy`); the context then never fills up.
#[allow(clippy::too_many_arguments)]
pub fn generate_with_policy(
    model: &Transformer,
    policy: &crate::cache::policy::KvPolicy,
    retrieval: Option<&[Vec<bool>]>,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    stop: Option<u32>,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::msg("the prompt is empty"));
    }
    let state = model.new_state_with_policy(policy, retrieval)?;
    generate_in(model, state, prompt, None, max_new, sampler, stop, on_token)
}

/// Prompt tokens per step when a cache policy bounds the state.
const PREFILL_CHUNK: usize = 512;

#[allow(clippy::too_many_arguments)]
fn generate_in(
    model: &Transformer,
    mut state: crate::model::DecodeState,
    prompt: &[u32],
    memory: Option<&Memory>,
    max_new: usize,
    sampler: &mut Sampler,
    stop: Option<u32>,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let max_len = model.cfg.max_len;
    let capped = !state.policy_caches().is_empty();
    let dev = &model.embed.device();
    // under a cache policy the prompt goes in chunks, so that memory stays
    // bounded by the policy and a chunk's activations, whatever its length
    let chunk = if capped {
        PREFILL_CHUNK
    } else {
        prompt.len().max(1)
    };
    let mut logits = None;
    for part in prompt.chunks(chunk) {
        logits = Some(model.step_last(&Tensor::new(part, dev)?.unsqueeze(0)?, &mut state)?);
    }
    let mut logits = logits.ok_or_else(|| {
        crate::error::Error::msg("generation needs a prompt of at least one token")
    })?;
    let mut seq = prompt.to_vec();
    for _ in 0..max_new {
        // logits: (1, vocab) for the last position
        let row: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let next = sampler.sample_after(&row, &seq);
        seq.push(next);
        on_token(next)?;
        if Some(next) == stop {
            break;
        }
        logits = if capped || state.pos < max_len {
            model.step_last(&Tensor::new(&[[next]], dev)?, &mut state)?
        } else {
            let keep = &seq[seq.len() - (max_len / 2).max(1)..];
            state = model.new_state(memory)?;
            model.step_last(&Tensor::new(keep, dev)?.unsqueeze(0)?, &mut state)?
        };
    }
    Ok(seq.split_off(prompt.len()))
}

/// Greedy decoding of a batch of encoder–decoder sources: every sequence
/// starts from `bos`; each output stops at (and excludes) `eos`.
pub fn greedy_batch(
    model: &Transformer,
    memory: &Memory,
    bos: u32,
    eos: u32,
    max_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let b = memory.hidden.dim(0)?;
    let dev = memory.hidden.device();
    let mut state = model.new_state(Some(memory))?;
    let mut outs: Vec<Vec<u32>> = vec![vec![]; b];
    let mut done = vec![false; b];
    let mut cur = vec![bos; b];
    for _ in 0..max_len.min(model.cfg.max_len) {
        let logits = model.step(&Tensor::from_vec(cur.clone(), (b, 1), dev)?, &mut state)?;
        let next = logits.squeeze(1)?.argmax(1)?.to_vec1::<u32>()?;
        for i in 0..b {
            if !done[i] {
                if next[i] == eos {
                    done[i] = true;
                } else {
                    outs[i].push(next[i]);
                }
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        cur = next;
    }
    Ok(outs)
}

/// GNMT length penalty lp(Y) = ((5 + |Y|) / 6)^α.
pub fn length_penalty(len: usize, alpha: f64) -> f64 {
    ((5.0 + len as f64) / 6.0).powf(alpha)
}

/// Beam search for one source (memory batch of 1): hypotheses are ranked by
/// log P(Y) / lp(Y); returns the best, without BOS/EOS.
pub fn beam_search(
    model: &Transformer,
    memory: &Memory,
    bos: u32,
    eos: u32,
    beam: usize,
    alpha: f64,
    max_len: usize,
) -> Result<Vec<u32>> {
    if beam == 0 {
        return Err(Error::config("beam", "must be at least 1"));
    }
    if !alpha.is_finite() {
        return Err(Error::config(
            "alpha",
            format!("must be a finite number, got {alpha}"),
        ));
    }
    // each beam holds a decode state (keys and values of every decoder
    // layer up to max_len, f32) and scores a candidate per vocabulary entry
    // (24 bytes each): refuse what cannot fit before allocating it
    let c = &model.cfg;
    let per_beam = c
        .n_decoder_layers
        .checked_mul(2 * 4)
        .and_then(|x| x.checked_mul(c.max_len))
        .and_then(|x| x.checked_mul(c.kv_heads() * c.head_dim()))
        .and_then(|x| x.checked_add(c.vocab_size.checked_mul(24)?));
    crate::util::check_fits(
        "beam",
        &format!("({beam}): the beams' decode states and candidates"),
        per_beam.and_then(|b| b.checked_mul(beam)),
    )?;
    let dev = memory.hidden.device().clone();
    let mut state = model.new_state(Some(memory))?;
    state.select(&vec![0u32; beam])?;
    // alive: (tokens, log-prob); all beams start identical, so only beam 0
    // is live at the first step.
    let mut alive: Vec<(Vec<u32>, f64)> = (0..beam)
        .map(|i| (vec![], if i == 0 { 0.0 } else { f64::NEG_INFINITY }))
        .collect();
    let mut finished: Vec<(Vec<u32>, f64)> = vec![];
    let max_len = max_len.min(model.cfg.max_len);
    let mut cur = vec![bos; beam];
    for step in 0..max_len {
        let logits = model.step(&Tensor::from_vec(cur.clone(), (beam, 1), &dev)?, &mut state)?;
        let logp = crate::nn::log_softmax_last(&logits.squeeze(1)?.to_dtype(DType::F32)?)?
            .to_vec2::<f32>()?;
        let mut cands: Vec<(usize, u32, f64)> = vec![];
        for (i, (_, s)) in alive.iter().enumerate() {
            if s.is_finite() {
                for (tok, &lp) in logp[i].iter().enumerate() {
                    cands.push((i, tok as u32, s + lp as f64));
                }
            }
        }
        cands.sort_by(|a, b| b.2.total_cmp(&a.2));
        let mut next_alive = vec![];
        let mut parents = vec![];
        for (parent, tok, score) in cands {
            if tok == eos {
                if finished.len() < beam || next_alive.len() < beam {
                    let y = alive[parent].0.clone();
                    finished.push((y.clone(), score / length_penalty(y.len() + 1, alpha)));
                }
            } else if next_alive.len() < beam {
                let mut y = alive[parent].0.clone();
                y.push(tok);
                next_alive.push((y, score));
                parents.push(parent as u32);
            }
            if next_alive.len() >= beam && finished.len() >= beam {
                break;
            }
        }
        if next_alive.is_empty() {
            break;
        }
        while next_alive.len() < beam {
            next_alive.push((vec![], f64::NEG_INFINITY));
            parents.push(0);
        }
        state.select(&parents)?;
        cur = next_alive
            .iter()
            .map(|(y, _)| *y.last().unwrap_or(&bos))
            .collect();
        alive = next_alive;
        // Stop once no alive hypothesis can beat the best finished one: an
        // alive log-prob only falls, and its penalty is at most lp(max_len).
        let best_finished = finished
            .iter()
            .map(|f| f.1)
            .fold(f64::NEG_INFINITY, f64::max);
        let best_alive = alive.iter().map(|a| a.1).fold(f64::NEG_INFINITY, f64::max);
        if finished.len() >= beam
            && best_finished >= best_alive / length_penalty(max_len + 1, alpha)
        {
            break;
        }
        if step + 1 == max_len {
            for (y, s) in &alive {
                if s.is_finite() {
                    finished.push((y.clone(), s / length_penalty(y.len(), alpha)));
                }
            }
        }
    }
    Ok(finished
        .into_iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|f| f.0)
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_1_is_greedy_and_top_p_keeps_the_nucleus() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            seed: 3,
            ..SamplingParams::default()
        })
        .unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 1);
        }
        // p(1) ≈ 0.47, p(3) ≈ 0.43: top_p 0.8 keeps {1, 3} only
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.8,
            seed: 3,
            ..SamplingParams::default()
        })
        .unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(s.sample(&logits));
        }
        assert_eq!(seen, [1u32, 3].into_iter().collect());
    }

    /// The tokens a sampler draws from in many draws.
    fn support(p: SamplingParams, logits: &[f32], history: &[u32]) -> Vec<u32> {
        let mut s = Sampler::new(p).unwrap();
        let mut seen: Vec<u32> = (0..400).map(|_| s.sample_after(logits, history)).collect();
        seen.sort();
        seen.dedup();
        seen
    }

    #[test]
    fn min_p_keeps_the_tokens_near_the_likeliest() {
        // p ∝ e^l: relative to the likeliest (l = 2): 1, e^-0.1 = 0.905,
        // e^-1.9 = 0.150, e^-3 = 0.050 → min-p 0.1 keeps {1, 3, 0}, 0.2
        // keeps {1, 3}, 0.99 keeps {1}
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        for (min_p, want) in [(0.1, vec![0, 1, 3]), (0.2, vec![1, 3]), (0.99, vec![1])] {
            let p = SamplingParams {
                temperature: 1.0,
                min_p,
                seed: 5,
                ..SamplingParams::default()
            };
            assert_eq!(support(p, &logits, &[]), want, "min_p {min_p}");
        }
    }

    #[test]
    fn penalties_follow_their_definitions() {
        // logits 3, 2.9, -1, 0.5; history: token 0 twice, token 2 once
        let logits = [3.0f32, 2.9, -1.0, 0.5];
        let history = [0u32, 2, 0];
        let greedy = |p: SamplingParams| Sampler::new(p).unwrap().sample_after(&logits, &history);
        let none = SamplingParams::default();
        assert_eq!(greedy(none.clone()), 0, "no penalty: argmax");
        // repetition 1.1: token 0 → 3 / 1.1 = 2.73 < 2.9
        assert_eq!(
            greedy(SamplingParams {
                repeat_penalty: 1.1,
                ..none.clone()
            }),
            1
        );
        // 1.01: 2.97 > 2.9 still
        assert_eq!(
            greedy(SamplingParams {
                repeat_penalty: 1.01,
                ..none.clone()
            }),
            0
        );
        // presence 0.2: 2.8 < 2.9; frequency 0.04 × 2 = 0.08: 2.92 > 2.9,
        // 0.06 × 2 = 0.12: 2.88 < 2.9
        assert_eq!(
            greedy(SamplingParams {
                presence_penalty: 0.2,
                ..none.clone()
            }),
            1
        );
        assert_eq!(
            greedy(SamplingParams {
                frequency_penalty: 0.04,
                ..none.clone()
            }),
            0
        );
        assert_eq!(
            greedy(SamplingParams {
                frequency_penalty: 0.06,
                ..none.clone()
            }),
            1
        );
        // only the last penalty_last_n tokens count: the last one is token 0
        // once (0.06: 2.94 > 2.9)
        let last1 = SamplingParams {
            frequency_penalty: 0.06,
            penalty_last_n: 1,
            ..none.clone()
        };
        assert_eq!(greedy(last1), 0);
        // a negative logit is multiplied by the repetition penalty
        let l2 = [-1.0f32, -5.0];
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 1.5,
            ..none.clone()
        })
        .unwrap();
        // -1 → -1.5, still above -5
        assert_eq!(s.sample_after(&l2, &[0]), 0);
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 6.0,
            ..none
        })
        .unwrap();
        // -1 → -6 < -5
        assert_eq!(s.sample_after(&l2, &[0]), 1);
    }

    #[test]
    fn llama_cpp_defaults_and_bad_values() {
        let d = SamplingParams::llama_cpp();
        assert_eq!(
            (d.temperature, d.top_k, d.top_p, d.min_p),
            (0.8, 40, 0.95, 0.05)
        );
        for bad in [
            SamplingParams {
                min_p: 1.5,
                ..d.clone()
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..d.clone()
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..d.clone()
            },
            SamplingParams {
                frequency_penalty: f64::NAN,
                ..d.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn length_penalty_matches_gnmt() {
        assert!((length_penalty(1, 0.6) - 1.0).abs() < 1e-12);
        assert!((length_penalty(7, 0.6) - 2f64.powf(0.6)).abs() < 1e-12);
    }
}
