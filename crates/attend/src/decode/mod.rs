//! Decoding: greedy, temperature / top-k / top-p sampling, and beam search
//! with the GNMT length penalty (Wu et al. 2016), all over the incremental
//! `Transformer::step` with a KV cache.

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
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
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
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
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
        let z: f64 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f64>() * z;
        for &(id, p) in &probs {
            if r < p {
                return id;
            }
            r -= p;
        }
        probs.last().map_or(0, |p| p.0)
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
        let next = sampler.sample(&row);
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
        })
        .unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(s.sample(&logits));
        }
        assert_eq!(seen, [1u32, 3].into_iter().collect());
    }

    #[test]
    fn length_penalty_matches_gnmt() {
        assert!((length_penalty(1, 0.6) - 1.0).abs() < 1e-12);
        assert!((length_penalty(7, 0.6) - 2f64.powf(0.6)).abs() < 1e-12);
    }
}
