//! Speculative decoding (issue 14): a draft proposes up to k tokens, the
//! target model verifies them all in one pass, and the output keeps the
//! longest prefix that plain decoding would have produced plus the
//! target's own next token; the state forgets the rest.
//!
//! Lossless by construction, bit for bit: the verification pass computes
//! every position as a one-token decode step would
//! (`DecodeState::set_one_by_one`: split-KV per query, and the quantized
//! kernels compute each row alone), and the rollback leaves the state
//! equal to one that never saw the rejected tokens
//! (`DecodeState::truncate`; caches that cannot roll back — rings, cache
//! policies, recurrent states — restore a copy taken before the pass and
//! take the accepted tokens one at a time). Greedy decoding keeps
//! exactly plain decoding's tokens; sampling (temperature > 0) keeps the
//! target's distribution by the speculative-sampling rule (Leviathan et
//! al., Chen et al.), for drafts that propose one token a position.
//!
//! Drafts: `Lookup` (prompt lookup, after "Lossless Acceleration for
//! Seq2seq Generation with Aggressive Decoding"): find the last n tokens
//! earlier in the prompt and output, and propose what followed them;
//! `ModelDraft`: a smaller model with the same tokenizer, decoding
//! greedily.

use super::Sampler;
use crate::error::{Error, Result};
use crate::model::{DecodeState, Transformer};
use candle_core::{DType, Tensor};

/// Proposes tokens that may follow a sequence.
pub trait Draft {
    /// Up to k tokens that may follow `seq` (prompt and output so far).
    fn propose(&mut self, seq: &[u32], k: usize) -> Vec<u32>;
}

/// Prompt lookup: the most recent earlier occurrence of the sequence's
/// last n tokens (n from `max_ngram` down to 2), and the tokens that
/// followed it.
#[derive(Clone, Debug)]
pub struct Lookup {
    pub max_ngram: usize,
}

impl Draft for Lookup {
    fn propose(&mut self, seq: &[u32], k: usize) -> Vec<u32> {
        let len = seq.len();
        // at least 2 tokens matched (unless max_ngram is 1): a single
        // common token proposes junk on open text (SmolLM2's open workload:
        // 0.96x with 1-grams, 1.04-1.07x without; copying 2.3x either way)
        let least = self.max_ngram.min(2);
        for n in (least..=self.max_ngram.min(len.saturating_sub(1))).rev() {
            let tail = &seq[len - n..];
            // the latest start before the tail itself
            if let Some(s) = (0..len - n).rev().find(|&s| &seq[s..s + n] == tail) {
                let from = s + n;
                return seq[from..(from + k).min(len)].to_vec();
            }
        }
        vec![]
    }
}

/// A separate, smaller model with the same tokenizer drafts greedily
/// (`model:PATH`). Its own state follows the sequence: rolled back to
/// what the two share (or rebuilt, for states that cannot roll back), then
/// fed the rest.
pub struct ModelDraft<'a> {
    pub model: &'a Transformer,
    state: Option<DecodeState>,
    /// The tokens the draft's state holds.
    fed: Vec<u32>,
}

impl<'a> ModelDraft<'a> {
    /// A draft model for a target with `vocab` tokens: the same
    /// vocabulary size is required (the same tokenizer is the caller's to
    /// check: `attend` compares the two on a probe text).
    pub fn new(model: &'a Transformer, vocab: usize) -> Result<Self> {
        if model.cfg.vocab_size != vocab {
            return Err(Error::msg(format!(
                "the draft model has {} tokens in its vocabulary, the model {vocab}",
                model.cfg.vocab_size
            )));
        }
        Ok(Self {
            model,
            state: None,
            fed: vec![],
        })
    }

    fn try_propose(&mut self, seq: &[u32], k: usize) -> Result<Vec<u32>> {
        let m = self.model;
        let dev = m.embed.device().clone();
        let max_len = m.cfg.max_len;
        if seq.len() + k > max_len {
            return Ok(vec![]);
        }
        // what the draft's state and the sequence share (less the last
        // token, whose logits are needed)
        let common = self.fed.iter().zip(seq).take_while(|(a, b)| a == b).count();
        let common = common.min(seq.len().saturating_sub(1));
        let kept = match self.state.take() {
            Some(mut st) if common > 0 => st.truncate(common)?.then_some(st),
            _ => None,
        };
        let mut state = match kept {
            Some(st) => {
                self.fed.truncate(common);
                st
            }
            None => {
                self.fed.clear();
                m.new_state(None)?
            }
        };
        let row = |t: Tensor| -> Result<Vec<f32>> {
            Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
        };
        let rest = &seq[self.fed.len()..];
        let mut logits = row(m.step_last(&Tensor::new(rest, &dev)?.unsqueeze(0)?, &mut state)?)?;
        self.fed.extend_from_slice(rest);
        let mut out = vec![];
        while out.len() < k {
            let t = super::argmax(&logits);
            out.push(t);
            if out.len() == k {
                break;
            }
            logits = row(m.step_last(&Tensor::new(&[[t]], &dev)?, &mut state)?)?;
            self.fed.push(t);
        }
        self.state = Some(state);
        Ok(out)
    }
}

impl Draft for ModelDraft<'_> {
    /// Greedy tokens of the draft model; none if it fails (a draft's error
    /// costs speed, never output).
    fn propose(&mut self, seq: &[u32], k: usize) -> Vec<u32> {
        self.try_propose(seq, k).unwrap_or_else(|_| {
            self.state = None;
            self.fed.clear();
            vec![]
        })
    }
}

/// What a speculative run did: verification passes, tokens drafted and
/// accepted, and acceptances by draft position.
#[derive(Clone, Debug, Default)]
pub struct SpecStats {
    /// Target passes that verified a draft.
    pub passes: usize,
    /// Plain one-token steps (no draft proposed, or no room for one).
    pub plain_steps: usize,
    pub drafted: usize,
    pub accepted: usize,
    /// accepted_at[i]: passes whose draft token i was accepted.
    pub accepted_at: Vec<usize>,
    /// drafted_at[i]: passes that drafted a token i.
    pub drafted_at: Vec<usize>,
    /// Times drafting paused after repeated misses.
    pub backoffs: usize,
}

impl SpecStats {
    /// Tokens produced per target pass (accepted drafts plus the target's
    /// own token), over verification passes and plain steps alike.
    pub fn tokens_per_pass(&self) -> f64 {
        let passes = self.passes + self.plain_steps;
        if passes == 0 {
            return 0.0;
        }
        (self.accepted + passes) as f64 / passes as f64
    }
}

/// Generation as `decode::generate` — greedy: the same tokens, bit for bit
/// on quantized weights; sampling: the same distribution of tokens —
/// drafting up to `k` tokens a pass with `draft`
/// (fewer, or none for a while, when its drafts keep failing).
/// `state` is a fresh state for the model (plain, paged, or under a cache
/// policy). -> (the new tokens, statistics).
#[allow(clippy::too_many_arguments)]
pub fn generate_speculative(
    model: &Transformer,
    mut state: DecodeState,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    stop: Option<u32>,
    draft: &mut dyn Draft,
    k: usize,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, SpecStats)> {
    if prompt.is_empty() {
        return Err(Error::msg("the prompt is empty"));
    }
    let max_len = model.cfg.max_len;
    if prompt.len() > max_len {
        return Err(Error::msg(format!(
            "the prompt has {} tokens, more than the model's context of {max_len}",
            prompt.len()
        )));
    }
    let capped = !state.policy_caches().is_empty();
    let dev = model.embed.device().clone();
    let row =
        |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?) };
    // the prompt as `generate` feeds it (in chunks under a cache policy)
    let chunk = if capped {
        super::PREFILL_CHUNK
    } else {
        prompt.len()
    };
    let mut logits = vec![];
    for part in prompt.chunks(chunk) {
        logits = row(&model.step_last(&Tensor::new(part, &dev)?.unsqueeze(0)?, &mut state)?)?;
    }
    let mut stats = SpecStats::default();
    let mut seq = prompt.to_vec();
    let mut next = sampler.sample_after(&logits, &seq);
    // back-off: halve the draft length after the second pass in a row
    // that keeps nothing, double it after one that keeps everything; after
    // repeated misses at length 1, draft nothing for 4, 8, … 32 steps (a
    // pass that verifies a rejected draft costs more than a plain step)
    let (mut kk, mut misses, mut rest) = (k, 0u32, 0usize);
    let one = |state: &mut DecodeState, t: u32| -> Result<Vec<f32>> {
        row(&model.step_last(&Tensor::new(&[[t]], &dev)?, state)?)
    };
    'out: loop {
        // emit the target's token
        seq.push(next);
        on_token(next)?;
        if Some(next) == stop || seq.len() - prompt.len() >= max_new {
            break;
        }
        // a context that is full is rebuilt from its last half, as
        // `generate` does
        if !capped && state.pos >= max_len {
            let keep = &seq[seq.len() - (max_len / 2).max(1)..];
            state = model.new_state(None)?;
            let l = row(&model.step_last(&Tensor::new(keep, &dev)?.unsqueeze(0)?, &mut state)?)?;
            stats.plain_steps += 1;
            next = sampler.sample_after(&l, &seq);
            continue;
        }
        let room = if capped {
            k
        } else {
            k.min(max_len - state.pos - 1)
        };
        let want = room.min(kk).min(max_new - (seq.len() - prompt.len()));
        let mut d = if want > 0 && rest == 0 {
            draft.propose(&seq, want)
        } else {
            vec![]
        };
        d.truncate(want);
        rest = rest.saturating_sub(1);
        if d.is_empty() {
            let l = one(&mut state, next)?;
            stats.plain_steps += 1;
            next = sampler.sample_after(&l, &seq);
            continue;
        }
        // verify [next, d…] in one pass, each position as decoding would
        let pos0 = state.pos;
        let copy = (!state.can_truncate()).then(|| state.clone());
        let mut ids = vec![next];
        ids.extend_from_slice(&d);
        state.set_one_by_one(true);
        let out = model.step(
            &Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?,
            &mut state,
        );
        state.set_one_by_one(false);
        let out: Vec<Vec<f32>> = out?.squeeze(0)?.to_dtype(DType::F32)?.to_vec2()?;
        stats.passes += 1;
        stats.drafted += d.len();
        // greedy: the longest prefix plain decoding would have produced;
        // sampling: the speculative-sampling rule for a draft that proposes
        // one token (q = 1 on it): keep it with probability p(token), else
        // draw the target's token from p without it (renormalised) — so
        // every output token is distributed as the target's p
        let mut hist = seq.clone();
        let mut a = 0;
        let mut fix = None;
        while a < d.len() {
            if let Some(y) = verify(sampler, &out[a], &hist, d[a]) {
                fix = Some(y);
                break;
            }
            hist.push(d[a]);
            a += 1;
        }
        for i in 0..d.len() {
            if stats.drafted_at.len() <= i {
                stats.drafted_at.push(0);
                stats.accepted_at.push(0);
            }
            stats.drafted_at[i] += 1;
            stats.accepted_at[i] += usize::from(i < a);
        }
        stats.accepted += a;
        if a == 0 {
            misses += 1;
            if kk == 1 && misses >= 2 {
                rest = 1 << misses.min(5);
                stats.backoffs += 1;
            }
            if misses >= 2 {
                kk = (kk / 2).max(1);
            }
        } else {
            misses = 0;
            if a == d.len() {
                kk = (kk * 2).min(k);
            }
        }
        let bonus = match fix {
            Some(t) => t,
            None => sampler.sample_after(&out[a], &hist),
        };
        // forget the rejected tokens
        if a < d.len() {
            match copy {
                Some(c) => {
                    state = c;
                    one(&mut state, next)?;
                    for &t in &d[..a] {
                        one(&mut state, t)?;
                    }
                }
                None => {
                    state.truncate(pos0 + 1 + a)?;
                }
            }
        }
        for &t in &d[..a] {
            seq.push(t);
            on_token(t)?;
            if Some(t) == stop || seq.len() - prompt.len() >= max_new {
                break 'out;
            }
        }
        next = bonus;
    }
    Ok((seq.split_off(prompt.len()), stats))
}

/// One drafted token `x` against the target's logits after `hist`: None
/// when it is kept, else the target's token in its place. Greedy: kept
/// when it is the argmax. Sampling: kept with probability p(x), else the
/// replacement is drawn from p without x — so the token that comes out is
/// distributed as p, whatever x was.
pub fn verify(sampler: &mut Sampler, logits: &[f32], hist: &[u32], x: u32) -> Option<u32> {
    if sampler.params.temperature == 0.0 {
        let y = sampler.sample_after(logits, hist);
        return (y != x).then_some(y);
    }
    let p = sampler.distribution_after(logits, hist);
    let z: f64 = p.iter().map(|t| t.1).sum();
    let px = p.iter().find(|t| t.0 == x).map_or(0.0, |t| t.1 / z);
    if sampler.uniform() < px {
        return None;
    }
    let rest: Vec<(u32, f64)> = p.into_iter().filter(|t| t.0 != x).collect();
    Some(sampler.draw(&rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_proposes_what_followed_the_latest_match() {
        let mut l = Lookup { max_ngram: 3 };
        // "1 2 3 4 5 … 1 2 3" -> 4 5
        let s = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3];
        assert_eq!(l.propose(&s, 2), vec![4, 5]);
        assert_eq!(l.propose(&s, 10), vec![4, 5, 9, 9, 1, 2, 3]);
        // the latest occurrence wins; shorter n-grams when longer ones miss
        let s = [7, 1, 8, 7, 2, 8, 7, 2, 3, 5, 8, 7];
        assert_eq!(l.propose(&s, 1), vec![2]);
        // a single token is not enough, unless asked for
        let s = [7, 1, 8, 7, 2, 8, 5, 7];
        assert!(l.propose(&s, 1).is_empty());
        assert_eq!(Lookup { max_ngram: 1 }.propose(&s, 1), vec![2]);
        // nothing to copy
        assert!(l.propose(&[1, 2, 3], 4).is_empty());
        assert!(l.propose(&[5], 4).is_empty());
    }
}
