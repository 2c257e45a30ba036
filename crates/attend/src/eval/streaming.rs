//! Streaming perplexity (the StreamingLLM protocol): feed a text one token at
//! a time through a decode state whose KV cache a policy caps, and score
//! every next token. Also the retrieval-head probe RazorAttention needs.

use crate::cache::policy::KvPolicy;
use crate::error::{Error, Result};
use crate::model::Transformer;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct StreamingResult {
    pub policy: String,
    pub perplexity: f64,
    pub mean_nll: f64,
    /// Tokens fed (predictions = n_tokens − 1).
    pub n_tokens: usize,
    /// Largest size of the cache's buffers over the run, in bytes.
    pub cache_bytes_max: usize,
    /// Most tokens any head held at the end.
    pub cache_tokens: usize,
}

/// −log softmax(logits)[target], in f64.
fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    z.ln() + max - logits[target as usize] as f64
}

/// Score `ids` token by token under `policy`. `on_token(i)` is called after
/// each token (progress bars).
pub fn streaming_perplexity(
    model: &Transformer,
    ids: &[u32],
    policy: &KvPolicy,
    retrieval: Option<&[Vec<bool>]>,
    mut on_token: impl FnMut(usize),
) -> Result<StreamingResult> {
    if ids.len() < 2 {
        return Err(Error::msg("streaming perplexity needs at least 2 tokens"));
    }
    let mut state = model.new_state_with_policy(policy, retrieval)?;
    let (mut total, mut bytes_max) = (0f64, 0usize);
    for (i, w) in ids.windows(2).enumerate() {
        let logits = model.step_last(&Tensor::new(&[[w[0]]], &Device::Cpu)?, &mut state)?;
        let row: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        total += nll(&row, w[1]);
        bytes_max = bytes_max.max(state.state_bytes());
        on_token(i + 1);
    }
    let cache_tokens = state
        .policy_caches()
        .iter()
        .map(|c| c.len())
        .max()
        .unwrap_or(0);
    let mean_nll = total / (ids.len() - 1) as f64;
    Ok(StreamingResult {
        policy: policy.to_string(),
        perplexity: mean_nll.exp(),
        mean_nll,
        n_tokens: ids.len(),
        cache_bytes_max: bytes_max,
        cache_tokens,
    })
}

/// Echo + induction score of every (layer, KV head), RazorAttention's test
/// for retrieval heads: feed `len` random tokens twice; at each position i of
/// the repeat, a query head's attention to i − len (the same token earlier:
/// echo) and to i − len + 1 (the token that followed it: induction), averaged
/// over the repeat and maximised over the query heads that share the KV head.
/// Returns scores[softmax layer][kv_head].
pub fn retrieval_scores(model: &Transformer, len: usize, seed: u64) -> Result<Vec<Vec<f32>>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // skip the lowest ids (special tokens, usually)
    let v = model.cfg.vocab_size as u32;
    let half: Vec<u32> = (0..len).map(|_| rng.random_range(v / 10..v)).collect();
    let seq: Vec<u32> = half.iter().chain(&half).cloned().collect();
    let mut state = model.new_state_with_policy(&KvPolicy::Full, None)?;
    for c in state.policy_caches_mut() {
        c.record = true;
    }
    let (h, h_kv) = (model.cfg.n_heads, model.cfg.kv_heads());
    let group = h / h_kv;
    let layers = model.cfg.n_decoder_layers;
    let mut per_head = vec![vec![0f32; h]; layers];
    for (i, &tok) in seq.iter().enumerate() {
        model.step_last(&Tensor::new(&[[tok]], &Device::Cpu)?, &mut state)?;
        if i < len {
            continue;
        }
        for (l, c) in state.policy_caches().into_iter().enumerate() {
            for (qh, p) in c.last_probs.iter().enumerate() {
                per_head[l][qh] += p[i - len] + p[i - len + 1];
            }
        }
    }
    Ok(per_head
        .iter()
        .map(|hs| {
            (0..h_kv)
                .map(|g| {
                    (0..group)
                        .map(|j| hs[g * group + j] / len as f32)
                        .fold(0f32, f32::max)
                })
                .collect()
        })
        .collect())
}

/// The top `fraction` of (layer, KV head) pairs by `retrieval_scores`
/// (at least one): retrieval[layer][kv_head].
pub fn retrieval_heads(model: &Transformer, fraction: f32) -> Result<Vec<Vec<bool>>> {
    let len = 64.min(model.cfg.max_len / 2 - 1).max(1);
    let scores = retrieval_scores(model, len, 0)?;
    let mut all: Vec<(f32, usize, usize)> = scores
        .iter()
        .enumerate()
        .flat_map(|(l, hs)| hs.iter().enumerate().map(move |(g, &s)| (s, l, g)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let keep = ((all.len() as f32 * fraction).round() as usize).max(1);
    let mut out: Vec<Vec<bool>> = scores.iter().map(|hs| vec![false; hs.len()]).collect();
    for &(_, l, g) in &all[..keep.min(all.len())] {
        out[l][g] = true;
    }
    Ok(out)
}
