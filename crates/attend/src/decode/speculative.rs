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
//! greedily; `SkipDraft`: the model itself with sublayers skipped
//! (self-speculation, after FFN-SkipLLM and LayerSkip), on the target's
//! own weights and cache; `heads::HeadsDraft`: Hydra draft heads on the
//! target's final hidden state.

use super::Sampler;
use crate::error::{Error, Result};
use crate::model::{DecodeState, Skip, StepOpts, Transformer};
use candle_core::{DType, Tensor};

/// What a draft sees when it proposes.
pub struct Context<'a> {
    /// Prompt and output so far; the last token is the target's next
    /// token, which the state has not yet seen.
    pub seq: &'a [u32],
    /// The target's final hidden state (after the final norm, d) at the
    /// position whose logits chose the last token of `seq`, for drafts
    /// that ask for it (`wants_hidden`).
    pub hidden: Option<&'a [f32]>,
    pub model: &'a Transformer,
    /// The target's state, holding all of `seq` but its last token. A
    /// draft may run steps on it if it leaves it as it found it.
    pub state: &'a mut DecodeState,
}

/// Proposes tokens that may follow a sequence.
pub trait Draft {
    /// Up to k tokens that may follow `seq` (prompt and output so far).
    fn propose(&mut self, _seq: &[u32], _k: usize) -> Vec<u32> {
        vec![]
    }

    /// As `propose`, for drafts that need the target's state or hidden
    /// states.
    fn propose_in(&mut self, cx: Context, k: usize) -> Vec<u32> {
        self.propose(cx.seq, k)
    }

    /// Whether `Context::hidden` is needed.
    fn wants_hidden(&self) -> bool {
        false
    }
}

/// Self-speculation: the target model with sublayers skipped drafts
/// greedily on the target's own weights and KV cache, then rolls the
/// cache back (a state that cannot roll back is copied for the draft).
/// Skipping nothing drafts exactly the target's own tokens.
#[derive(Clone, Debug)]
pub struct SkipDraft {
    pub skip: Skip,
}

impl SkipDraft {
    fn try_propose(&self, cx: Context, k: usize) -> Result<Vec<u32>> {
        let (m, seq) = (cx.model, cx.seq);
        let Some(&last) = seq.last() else {
            return Ok(vec![]);
        };
        if cx.state.pos + k > m.cfg.max_len {
            return Ok(vec![]);
        }
        let mut copy;
        let rollback = cx.state.can_truncate();
        let st = if rollback {
            &mut *cx.state
        } else {
            copy = cx.state.clone();
            &mut copy
        };
        let pos0 = st.pos;
        let dev = m.embed.device();
        let opts = StepOpts {
            last_only: true,
            skip: Some(self.skip.clone()),
            hidden: false,
        };
        let mut out = Vec::with_capacity(k);
        let mut t = last;
        let mut run = || -> Result<()> {
            for _ in 0..k {
                let ids = Tensor::new(&[[t]], &dev)?;
                let l = m.step_with(m.executor(), &ids, st, &opts)?.logits;
                t = super::argmax(&l.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?);
                out.push(t);
            }
            Ok(())
        };
        let r = run();
        if rollback {
            st.truncate(pos0)?;
        }
        r.map(|_| out)
    }
}

impl Draft for SkipDraft {
    fn propose_in(&mut self, cx: Context, k: usize) -> Vec<u32> {
        self.try_propose(cx, k).unwrap_or_default()
    }
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
pub struct ModelDraft {
    pub model: std::sync::Arc<Transformer>,
    state: Option<DecodeState>,
    /// The tokens the draft's state holds.
    fed: Vec<u32>,
}

impl ModelDraft {
    /// A draft model for a target with `vocab` tokens: the same
    /// vocabulary size is required (the same tokenizer is the caller's to
    /// check: `attend` compares the two on a probe text).
    pub fn new(model: std::sync::Arc<Transformer>, vocab: usize) -> Result<Self> {
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
        let m = &*self.model;
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

impl Draft for ModelDraft {
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

/// How often the model with `skip` agrees with the full model's greedy
/// token, over positions `start..len-1` of each sequence (teacher forced:
/// one pass of the skipping model over the whole sequence, its skipped
/// attention layers seeing nothing): `attend draft-search`'s cheap
/// estimate of a `SkipDraft`'s acceptance. `full[i]`: the full model's
/// argmax tokens at those positions.
pub fn skip_agreement(
    model: &Transformer,
    seqs: &[(Vec<u32>, usize)],
    full: &[Vec<u32>],
    skip: &Skip,
) -> Result<f64> {
    let (mut same, mut all) = (0usize, 0usize);
    for ((s, start), want) in seqs.iter().zip(full) {
        let got = argmax_tokens(model, s, *start, Some(skip))?;
        same += got.iter().zip(want).filter(|(a, b)| a == b).count();
        all += want.len();
    }
    Ok(same as f64 / all.max(1) as f64)
}

/// The argmax token after each position `start..len-1` of `seq`, in one
/// pass of the model (with `skip`).
pub fn argmax_tokens(
    model: &Transformer,
    seq: &[u32],
    start: usize,
    skip: Option<&Skip>,
) -> Result<Vec<u32>> {
    let mut st = model.new_state(None)?;
    let opts = StepOpts {
        skip: skip.cloned(),
        ..StepOpts::default()
    };
    let dev = model.embed.device();
    let ids = Tensor::new(seq, &dev)?.unsqueeze(0)?;
    let l = model
        .step_with(model.executor(), &ids, &mut st, &opts)?
        .logits;
    let l: Vec<Vec<f32>> = l.squeeze(0)?.to_dtype(DType::F32)?.to_vec2()?;
    Ok(l[start..seq.len() - 1]
        .iter()
        .map(|r| super::argmax(r))
        .collect())
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
    /// A verification pass of draft `d` that kept `a` tokens.
    pub fn record(&mut self, d: &[u32], a: usize) {
        self.passes += 1;
        self.drafted += d.len();
        self.accepted += a;
        for i in 0..d.len() {
            if self.drafted_at.len() <= i {
                self.drafted_at.push(0);
                self.accepted_at.push(0);
            }
            self.drafted_at[i] += 1;
            self.accepted_at[i] += usize::from(i < a);
        }
    }

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
    // steps of the last position only -> (logits, the final hidden state
    // when the draft wants it)
    let want_hidden = draft.wants_hidden();
    let last = StepOpts {
        last_only: true,
        skip: None,
        hidden: want_hidden,
    };
    let exec = model.executor();
    let step_last = |state: &mut DecodeState, ids: &[u32]| -> Result<(Vec<f32>, Vec<f32>)> {
        let o = model.step_with(exec, &Tensor::new(ids, &dev)?.unsqueeze(0)?, state, &last)?;
        let h = match &o.hidden {
            Some(h) => row(h)?,
            None => vec![],
        };
        Ok((row(&o.logits)?, h))
    };
    // the prompt as `generate` feeds it (in chunks under a cache policy)
    let chunk = if capped {
        super::PREFILL_CHUNK
    } else {
        prompt.len()
    };
    let (mut logits, mut hidden) = (vec![], vec![]);
    for part in prompt.chunks(chunk) {
        (logits, hidden) = step_last(&mut state, part)?;
    }
    let mut stats = SpecStats::default();
    let mut seq = prompt.to_vec();
    let mut next = sampler.sample_after(&logits, &seq);
    let mut backoff = Backoff::new(k);
    let one = |state: &mut DecodeState, t: u32| step_last(state, &[t]);
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
            let l;
            (l, hidden) = step_last(&mut state, keep)?;
            stats.plain_steps += 1;
            next = sampler.sample_after(&l, &seq);
            continue;
        }
        let room = if capped {
            k
        } else {
            k.min(max_len - state.pos - 1)
        };
        let t0 = std::time::Instant::now();
        let want = backoff
            .want()
            .min(room)
            .min(max_new - (seq.len() - prompt.len()));
        let mut d = if want > 0 {
            let cx = Context {
                seq: &seq,
                hidden: want_hidden.then_some(&hidden[..]),
                model,
                state: &mut state,
            };
            draft.propose_in(cx, want)
        } else {
            vec![]
        };
        d.truncate(want);
        if d.is_empty() {
            let l;
            (l, hidden) = one(&mut state, next)?;
            stats.plain_steps += 1;
            next = sampler.sample_after(&l, &seq);
            backoff.timed(false, 1, t0.elapsed().as_secs_f64());
            continue;
        }
        // verify [next, d…] in one pass, each position as decoding would
        let pos0 = state.pos;
        let copy = (!state.can_truncate()).then(|| state.clone());
        let mut ids = vec![next];
        ids.extend_from_slice(&d);
        state.set_one_by_one(true);
        let all = StepOpts {
            hidden: want_hidden,
            ..StepOpts::default()
        };
        let out = model.step_with(
            exec,
            &Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?,
            &mut state,
            &all,
        );
        state.set_one_by_one(false);
        let out = out?;
        let hiddens: Vec<Vec<f32>> = match &out.hidden {
            Some(h) => h.squeeze(0)?.to_dtype(DType::F32)?.to_vec2()?,
            None => vec![],
        };
        let out: Vec<Vec<f32>> = out.logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec2()?;
        // greedy: the longest prefix plain decoding would have produced;
        // sampling: the speculative-sampling rule for a draft that proposes
        // one token (q = 1 on it): keep it with probability p(token), else
        // draw the target's token from p without it (renormalised) — so
        // every output token is distributed as the target's p
        let rows: Vec<&[f32]> = out.iter().map(|r| &r[..]).collect();
        let (a, fix, hist) = accept(sampler, &rows, &seq, &d);
        stats.record(&d, a);
        if backoff.record(d.len(), a) {
            stats.backoffs += 1;
        }
        let bonus = match fix {
            Some(t) => t,
            None => sampler.sample_after(&out[a], &hist),
        };
        if want_hidden {
            hidden = hiddens.into_iter().nth(a).unwrap_or_default();
        }
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
        if backoff.timed(true, 1 + a, t0.elapsed().as_secs_f64()) {
            stats.backoffs += 1;
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

/// The verification of draft `d` after `seq` against the target's
/// logits of the pass (`out[i]`: after seq and d[..i]) -> (tokens kept, the
/// target's token in place of the first rejected one if sampling chose it,
/// seq with the kept tokens). The next token is then `fix`, or the
/// target's token from `out[a]` after the returned history.
pub fn accept(
    sampler: &mut Sampler,
    out: &[&[f32]],
    seq: &[u32],
    d: &[u32],
) -> (usize, Option<u32>, Vec<u32>) {
    let mut hist = seq.to_vec();
    let mut a = 0;
    while a < d.len() {
        if let Some(y) = verify(sampler, out[a], &hist, d[a]) {
            return (a, Some(y), hist);
        }
        hist.push(d[a]);
        a += 1;
    }
    (a, None, hist)
}

/// How long drafts are: halve the length after the second pass in a row
/// that keeps nothing, double it after one that keeps everything; after
/// repeated misses at length 1, draft nothing for 4, 8, … 32 steps (a pass
/// that verifies a rejected draft costs more than a plain step). And, when
/// told the time each step took (`timed`), pause drafting while drafting
/// passes give fewer tokens a second than plain steps (a draft that is
/// often right but costs nearly a step itself), for 8, 16, … 256 steps,
/// then try again (judged after 16 drafting passes, not before).
#[derive(Clone, Debug)]
pub struct Backoff {
    k: usize,
    kk: usize,
    misses: u32,
    rest: usize,
    /// Decayed sums of (seconds, tokens): plain steps, drafting passes.
    time: [(f64, f64); 2],
    drafting_passes: usize,
    slow_pause: usize,
}

impl Backoff {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            kk: k,
            misses: 0,
            rest: 0,
            time: [(0.0, 0.0); 2],
            drafting_passes: 0,
            slow_pause: 8,
        }
    }

    /// Tokens to draft at this step (0: a plain step); counts the pause
    /// down.
    pub fn want(&mut self) -> usize {
        if self.rest > 0 {
            self.rest -= 1;
            return 0;
        }
        self.kk
    }

    /// A pass that drafted `drafted` tokens kept `accepted`; true when
    /// drafting pauses.
    pub fn record(&mut self, drafted: usize, accepted: usize) -> bool {
        let mut paused = false;
        if accepted == 0 {
            self.misses += 1;
            if self.kk == 1 && self.misses >= 2 {
                self.rest = 1 << self.misses.min(5);
                paused = true;
            }
            if self.misses >= 2 {
                self.kk = (self.kk / 2).max(1);
            }
        } else {
            self.misses = 0;
            if accepted == drafted {
                self.kk = (self.kk * 2).min(self.k);
            }
        }
        paused
    }

    /// A step took `secs` and gave `tokens`, drafting or not (its
    /// drafting included); true when drafting pauses for being slower.
    pub fn timed(&mut self, drafting: bool, tokens: usize, secs: f64) -> bool {
        let t = &mut self.time[usize::from(drafting)];
        *t = (0.9 * t.0 + secs, 0.9 * t.1 + tokens as f64);
        if !drafting {
            return false;
        }
        self.drafting_passes += 1;
        let [plain, draft] = self.time;
        if plain.1 == 0.0 {
            // no plain step seen yet: take a few to compare with
            if self.drafting_passes.is_multiple_of(8) {
                self.rest = self.rest.max(3);
            }
            return false;
        }
        // judge on 16 passes at least
        if self.drafting_passes < 16 {
            return false;
        }
        if draft.0 / draft.1 > plain.0 / plain.1 {
            self.rest = self.rest.max(self.slow_pause);
            self.slow_pause = (self.slow_pause * 2).min(256);
            // start the comparison afresh after the pause
            self.time[1] = (0.0, 0.0);
            return true;
        }
        self.slow_pause = 8;
        false
    }
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
    fn drafting_pauses_while_it_is_slower_than_plain_steps() {
        let paused = |b: &mut Backoff, n: usize| (0..n).all(|_| b.want() == 0) && b.want() == 4;
        let mut b = Backoff::new(4);
        // no plain step seen: after 8 drafting passes, 3 plain ones
        for _ in 0..7 {
            assert!(!b.timed(true, 2, 1.0));
        }
        assert_eq!(b.want(), 4);
        b.timed(true, 2, 1.0);
        assert!(paused(&mut b, 3));
        // plain: 1 token a second; drafting 2 tokens a second is faster;
        // a slow pass is not judged before the 16th drafting pass
        for _ in 0..3 {
            b.timed(false, 1, 1.0);
        }
        for _ in 0..6 {
            assert!(!b.timed(true, 2, 1.0));
        }
        assert!(!b.timed(true, 1, 30.0));
        assert_eq!(b.want(), 4);
        // the 16th: slower than plain overall, so drafting pauses 8 steps
        assert!(b.timed(true, 1, 30.0));
        assert!(paused(&mut b, 8));
        // after a pause the comparison starts afresh: one slow pass
        // pauses again, twice as long
        assert!(b.timed(true, 2, 3.0));
        assert!(paused(&mut b, 16));
        // fast again: no pause, and the next slow pause is 8 again
        assert!(!b.timed(true, 4, 1.0));
        assert!((0..10).any(|_| b.timed(true, 1, 9.0)));
        assert!(paused(&mut b, 8));
    }

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
