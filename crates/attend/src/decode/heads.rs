//! Hydra draft heads (Ankner et al. 2024, "Hydra: Sequentially-Dependent
//! Draft Heads for Medusa Decoding"; Medusa, Cai et al. 2024): small MLPs
//! on the base model's final hidden state that draft the tokens after the
//! one the base model has just chosen, each head also seeing the tokens
//! drafted before it.
//!
//! Head i (0-based) drafts the token i + 1 places after the base model's
//! next token x₁, from the base's final hidden state h (the one whose
//! logits chose x₁) and the embeddings of x₁ … x_{i+1}:
//!
//! ```text
//! z = W₀ h + Σ_{m=1..i+1} W_m norm(e(x_m))      (Hydra's input: h and the
//!                                                prefix, each its own map)
//! z = z + SiLU(R z)            (× layers)       (Medusa's residual blocks)
//! logits = LM_V (norm_i(z))                     (the base's output rows)
//! ```
//!
//! `LM_V` is the base model's own output projection restricted to a draft
//! vocabulary V (the tokens most frequent in the base model's own text,
//! as in FR-Spec, Zhao et al. 2025): drafting from 8,192 rows instead of
//! SmolLM2's 49,152 costs a sixth, and the tokens left out are rare in
//! what the model writes. The base model stays frozen; the heads learn
//! from text it generates itself (self-distillation, greedy, so the
//! targets are its own argmax tokens).
//!
//! The heads are written once against the executor's ops (`exec::Exec`):
//! trained on the graph executor (candle autograd), drafting on the CPU
//! executor with their matrices quantized to q8_0.

use super::speculative::{Context, Draft};
use crate::attention::one;
use crate::config::NormKind;
use crate::error::{Error, Result};
use crate::exec::cpu::{Cpu, Rows};
use crate::exec::graph::Graph;
use crate::exec::{Act, Exec};
use crate::model::{DecodeState, StepOpts, Transformer};
use crate::nn::{Linear, ParamStore, Weight};
use crate::norm::Norm;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `format` of a heads file's config.
pub const FORMAT: &str = "attend-draft-heads-1";

/// A set of draft heads, as saved beside their weights (`heads.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HeadsConfig {
    pub format: String,
    /// The base model's width.
    pub d_model: usize,
    /// Heads: tokens drafted a pass at most.
    pub heads: usize,
    /// Residual blocks per head.
    pub layers: usize,
    /// The draft vocabulary: base token ids, most frequent first.
    pub vocab: Vec<u32>,
    /// The base model's vocabulary size (checked at load).
    pub base_vocab: usize,
    /// What the heads were trained for (the base model's file name).
    pub base: String,
    /// The base model's output rows of the first draft tokens projected
    /// on a fixed random direction (`fingerprint`): heads refuse a model
    /// whose rows point elsewhere (another model of the same shape).
    /// Empty: not checked.
    #[serde(default)]
    pub base_fingerprint: Vec<f32>,
    /// Drafting stops at the first head whose token's probability is
    /// below this (`calibrate` picks it on validation text; 0: every head
    /// drafts).
    #[serde(default)]
    pub min_confidence: f32,
}

impl HeadsConfig {
    /// Heads for `base` drafting among `vocab` (unchecked against it: no
    /// fingerprint; every head drafts).
    pub fn for_model(
        base: &Transformer,
        heads: usize,
        layers: usize,
        vocab: Vec<u32>,
        name: &str,
    ) -> Self {
        Self {
            format: FORMAT.into(),
            d_model: base.cfg.d_model,
            heads,
            layers,
            vocab,
            base_vocab: base.cfg.vocab_size,
            base: name.into(),
            base_fingerprint: vec![],
            min_confidence: 0.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.format != FORMAT {
            return Err(Error::config(
                "format",
                format!("expected {FORMAT}, found {}", self.format),
            ));
        }
        if self.heads == 0 || self.d_model == 0 || self.vocab.is_empty() {
            return Err(Error::config(
                "heads",
                "heads, d_model and vocab must be non-empty",
            ));
        }
        if let Some(t) = self.vocab.iter().find(|&&t| t as usize >= self.base_vocab) {
            return Err(Error::config(
                "vocab",
                format!(
                    "token {t} is outside the base vocabulary of {}",
                    self.base_vocab
                ),
            ));
        }
        Ok(())
    }
}

/// The heads' parameters.
#[derive(Clone, Debug)]
pub struct Heads {
    pub cfg: HeadsConfig,
    /// inp[i][0] maps h, inp[i][m] the m-th token's embedding (d → d).
    inp: Vec<Vec<Linear>>,
    /// res[i][l]: head i's residual blocks (d → d).
    res: Vec<Vec<Linear>>,
    /// Per head, before the output rows.
    norm: Vec<Norm>,
    /// On every token embedding the heads read.
    embed_norm: Norm,
    /// The base model's output rows for the draft vocabulary (V, d),
    /// frozen.
    lm: Linear,
    /// base id -> draft vocabulary index (u32::MAX: not in it).
    index: std::sync::Arc<Vec<u32>>,
}

impl Heads {
    /// Heads on `store` (initialised there when it lacks them) for `base`.
    pub fn new(cfg: HeadsConfig, store: &ParamStore, base: &Transformer) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.d_model;
        if base.cfg.d_model != d || base.cfg.vocab_size != cfg.base_vocab {
            return Err(Error::msg(format!(
                "the draft heads are for a model of width {d} and {} tokens (trained on {}), this model has {} and {}",
                cfg.base_vocab, cfg.base, base.cfg.d_model, base.cfg.vocab_size
            )));
        }
        if !cfg.base_fingerprint.is_empty() {
            let f = fingerprint(base, &cfg.vocab)?;
            let dot: f32 = f
                .iter()
                .zip(&cfg.base_fingerprint)
                .map(|(a, b)| a * b)
                .sum();
            let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            let cos = dot / (norm(&f) * norm(&cfg.base_fingerprint)).max(1e-30);
            if f.len() != cfg.base_fingerprint.len() || cos < 0.9 {
                return Err(Error::msg(format!(
                    "the draft heads were trained for {}, not this model (its output weights differ)",
                    cfg.base
                )));
            }
        }
        let vb = store.builder().pp("heads");
        let norm = |vb: &crate::nn::Builder| Norm::new(vb, NormKind::Rmsnorm, d, 1e-6);
        let (mut inp, mut res, mut norms) = (vec![], vec![], vec![]);
        for i in 0..cfg.heads {
            let h = vb.pp(i);
            inp.push(
                (0..i + 2)
                    .map(|m| Linear::new(&h.pp("in").pp(m), d, d, false))
                    .collect::<Result<Vec<_>>>()?,
            );
            res.push(
                (0..cfg.layers)
                    .map(|l| Linear::new(&h.pp("res").pp(l), d, d, false))
                    .collect::<Result<Vec<_>>>()?,
            );
            norms.push(norm(&h.pp("norm"))?);
        }
        let embed_norm = norm(&vb.pp("embed_norm"))?;
        // the base's output rows of the draft vocabulary, as f32
        let mut rows = vec![0f32; cfg.vocab.len() * d];
        output_rows(base, &cfg.vocab, &mut rows)?;
        let lm = Linear {
            w: Weight::Dense(Tensor::from_vec(rows, (cfg.vocab.len(), d), &store.device)?),
            b: None,
        };
        let mut index = vec![u32::MAX; cfg.base_vocab];
        for (j, &t) in cfg.vocab.iter().enumerate() {
            index[t as usize] = j as u32;
        }
        Ok(Self {
            cfg,
            inp,
            res,
            norm: norms,
            embed_norm,
            lm,
            index: std::sync::Arc::new(index),
        })
    }

    /// Heads from a file written by `save` (`heads.json` +
    /// `heads.safetensors` in `dir`) for `base`; `quantize`: their matrices
    /// in q8_0 for drafting (the output rows too).
    pub fn load(dir: &Path, base: &Transformer, quantize: bool) -> Result<Self> {
        let cfg_path = dir.join("heads.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::file(&cfg_path, e))?;
        let cfg: HeadsConfig =
            serde_json::from_str(&text).map_err(|e| Error::file(&cfg_path, e))?;
        cfg.validate()
            .map_err(|e| Error::file(&cfg_path, e.to_string()))?;
        let store = ParamStore::strict(DType::F32, Device::Cpu);
        let tensors = crate::nn::load_safetensors(&dir.join("heads.safetensors"), &Device::Cpu)?;
        let mut dense = std::collections::BTreeMap::new();
        for (name, t) in tensors {
            match quantize.then(|| q8(&t)).flatten() {
                Some(q) => store.insert_quantized(&name, q?),
                None => {
                    dense.insert(name, t);
                }
            }
        }
        store.insert(dense)?;
        let mut heads = Self::new(cfg, &store, base)?;
        if let Some(unused) = store.unused().first() {
            return Err(Error::file(
                dir.join("heads.safetensors"),
                format!("holds `{unused}`, which these heads do not use"),
            ));
        }
        if quantize {
            if let Weight::Dense(w) = &heads.lm.w {
                if let Some(q) = q8(w) {
                    heads.lm.w = Weight::Q(std::sync::Arc::new(q?));
                }
            }
        }
        Ok(heads)
    }

    /// Write `heads.json` and `heads.safetensors` (atomically) into `dir`.
    pub fn save(&self, store: &ParamStore, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        store.save(&dir.join("heads.safetensors"))?;
        let json =
            serde_json::to_string_pretty(&self.cfg).map_err(|e| Error::msg(e.to_string()))?;
        crate::util::write_atomic(&dir.join("heads.json"), json.as_bytes())
    }

    /// The draft vocabulary index of base token t, if it has one.
    pub fn index_of(&self, t: u32) -> Option<usize> {
        self.index
            .get(t as usize)
            .filter(|&&j| j != u32::MAX)
            .map(|&j| j as usize)
    }

    /// Token embeddings as the heads read them: raw (n, d) -> norm (n, d).
    pub fn embed<E: Exec>(&self, e: &E, raw: E::X) -> Result<E::X> {
        e.norm(&self.embed_norm, raw)
    }

    /// Head i's logits over the draft vocabulary: h (n, d) the base's
    /// final hidden states, embs[m] (n, d) the normed embeddings of the
    /// m+1-th token after h's position, m = 0..=i -> (n, V).
    pub fn head<E: Exec>(&self, e: &E, i: usize, h: &E::X, embs: &[E::X]) -> Result<E::X> {
        if embs.len() <= i {
            return Err(Error::msg(format!(
                "head {i} needs {} token embeddings",
                i + 1
            )));
        }
        let mut z = one(e.linear(h, &[&self.inp[i][0]])?);
        for (m, x) in embs[..=i].iter().enumerate() {
            let y = one(e.linear(x, &[&self.inp[i][m + 1]])?);
            z = e.add(z, &y)?;
        }
        for r in &self.res[i] {
            let y = e.act(Act::Silu, one(e.linear(&z, &[r])?), None)?;
            z = e.add(z, &y)?;
        }
        let z = e.norm(&self.norm[i], z)?;
        Ok(one(e.linear(&z, &[&self.lm])?))
    }
}

/// A 2-d f32 tensor whose rows divide into q8_0 blocks, as a QMatrix.
fn q8(t: &Tensor) -> Option<Result<crate::kernels::quant::QMatrix>> {
    let (_, cols) = t.dims2().ok()?;
    if cols % 32 != 0 {
        return None;
    }
    let q = || -> Result<_> {
        let qt = candle_core::quantized::QTensor::quantize(
            &t.to_dtype(DType::F32)?,
            candle_core::quantized::GgmlDType::Q8_0,
        )?;
        crate::kernels::quant::QMatrix::from_qtensor(&qt).map_err(|e| Error::msg(e.to_string()))
    };
    Some(q())
}

/// The base model's output rows of the first 16 draft tokens, each
/// projected on a fixed pseudo-random direction: what identifies the base
/// model (a quantized copy of it gives nearly the same numbers).
pub fn fingerprint(base: &Transformer, vocab: &[u32]) -> Result<Vec<f32>> {
    let d = base.cfg.d_model;
    let ids = &vocab[..vocab.len().min(16)];
    let mut rows = vec![0f32; ids.len() * d];
    output_rows(base, ids, &mut rows)?;
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let dir: Vec<f32> = (0..d)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Ok(rows
        .chunks_exact(d)
        .map(|r| r.iter().zip(&dir).map(|(a, b)| a * b).sum())
        .collect())
}

/// The base model's output-projection rows `ids` as f32, (ids, d).
fn output_rows(base: &Transformer, ids: &[u32], out: &mut [f32]) -> Result<()> {
    let d = base.cfg.d_model;
    match &base.lm_head().w {
        Weight::Q(m) => {
            for (row, &t) in out.chunks_exact_mut(d).zip(ids) {
                m.dequantize_row(t as usize, row);
            }
        }
        Weight::Int8(m) => {
            for (row, &t) in out.chunks_exact_mut(d).zip(ids) {
                m.dequantize_row(t as usize, row);
            }
        }
        Weight::Dense(w) => crate::nn::with_f32(w, |w| {
            for (row, &t) in out.chunks_exact_mut(d).zip(ids) {
                row.copy_from_slice(&w[t as usize * d..][..d]);
            }
        })?,
        Weight::LowRank { .. } | Weight::BlockDiag(_) => {
            return Err(crate::error::Error::msg(
                "draft heads need a dense or quantized output projection",
            ))
        }
    }
    Ok(())
}

/// Drafting with heads: `heads:PATH`. Needs the target's hidden state.
pub struct HeadsDraft {
    pub heads: Heads,
}

impl HeadsDraft {
    fn try_propose(&self, cx: &Context, k: usize) -> Result<Vec<u32>> {
        let (Some(h), Some(&last)) = (cx.hidden, cx.seq.last()) else {
            return Ok(vec![]);
        };
        let d = self.heads.cfg.d_model;
        if h.len() != d {
            return Ok(vec![]);
        }
        let row = |data: Vec<f32>| Rows { data, width: d };
        let h = row(h.to_vec());
        let mut embs = vec![];
        let mut out = vec![];
        let mut t = last;
        for i in 0..k.min(self.heads.cfg.heads) {
            let mut raw = vec![0f32; d];
            cx.model.embed.rows_into(&[t], &mut raw)?;
            embs.push(self.heads.embed(&Cpu, row(raw))?);
            let logits = self.heads.head(&Cpu, i, &h, &embs)?;
            let best = super::argmax(&logits.data) as usize;
            // the head's probability of its token: stop when unsure
            let top = logits.data[best];
            let z: f32 = logits.data.iter().map(|&l| (l - top).exp()).sum();
            if 1.0 / z < self.heads.cfg.min_confidence {
                break;
            }
            t = self.heads.cfg.vocab[best];
            out.push(t);
        }
        Ok(out)
    }
}

impl Draft for HeadsDraft {
    /// A head's error costs speed, never output: no draft.
    fn propose_in(&mut self, cx: Context, k: usize) -> Vec<u32> {
        // inside the pool, as the model's steps run
        let mut r = None;
        rayon::scope(|_| r = Some(self.try_propose(&cx, k)));
        r.expect("scope ran").unwrap_or_default()
    }

    fn wants_hidden(&self) -> bool {
        true
    }
}

/// One sequence of self-distillation data: the prompt and the base
/// model's own continuation, with its final hidden states from `start`
/// (the prompt's last token) on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DistillSeq {
    pub tokens: Vec<u32>,
    pub start: usize,
    #[serde(skip)]
    pub hidden: Vec<f32>,
}

/// Greedy continuations of `prompts` by `model`, `batch` sequences at a
/// time through the batched step (each stops at `eos` or after `max_new`
/// tokens); `progress` is told each token generated.
pub fn self_distill(
    model: &Transformer,
    prompts: &[Vec<u32>],
    max_new: usize,
    eos: Option<u32>,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<DistillSeq>> {
    let mut out = Vec::with_capacity(prompts.len());
    for group in prompts.chunks(batch.max(1)) {
        let mut states: Vec<DecodeState> = group
            .iter()
            .map(|_| model.new_state(None))
            .collect::<Result<_>>()?;
        let mut seqs: Vec<Vec<u32>> = group.to_vec();
        let mut feed: Vec<Vec<u32>> = group.to_vec();
        let mut live: Vec<bool> = vec![true; group.len()];
        for _ in 0..max_new {
            let idx: Vec<usize> = (0..group.len()).filter(|&i| live[i]).collect();
            if idx.is_empty() {
                break;
            }
            let mut refs: Vec<&mut DecodeState> = states
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| live[*i])
                .map(|(_, s)| s)
                .collect();
            let ids: Vec<&[u32]> = idx.iter().map(|&i| &feed[i][..]).collect();
            let logits = model.step_many(&mut refs, &ids)?;
            let v = model.cfg.vocab_size;
            for (j, &i) in idx.iter().enumerate() {
                let t = super::argmax(&logits[j * v..(j + 1) * v]);
                seqs[i].push(t);
                feed[i] = vec![t];
                progress(1);
                let new = seqs[i].len() - group[i].len();
                if Some(t) == eos || new >= max_new || states[i].pos + 1 >= model.cfg.max_len {
                    live[i] = false;
                }
            }
        }
        for (p, s) in group.iter().zip(seqs) {
            out.push(DistillSeq {
                start: p.len() - 1,
                tokens: s,
                hidden: vec![],
            });
        }
    }
    Ok(out)
}

/// Fill each sequence's final hidden states from `start` on, as a
/// prefill pass of the sequence computes them (the sequences packed into
/// one batched pass on the CPU executor, one at a time on the graph one).
pub fn fill_hidden(model: &Transformer, seqs: &mut [DistillSeq]) -> Result<()> {
    let d = model.cfg.d_model;
    if model.executor() == crate::model::Executor::Cpu {
        let mut states: Vec<DecodeState> = seqs
            .iter()
            .map(|_| model.new_state(None))
            .collect::<Result<_>>()?;
        let mut refs: Vec<&mut DecodeState> = states.iter_mut().collect();
        let ids: Vec<&[u32]> = seqs.iter().map(|s| &s.tokens[..]).collect();
        let all = vec![true; seqs.len()];
        let out = model.step_many_with(&mut refs, &ids, &all, true, false)?;
        let mut row = 0;
        for s in seqs.iter_mut() {
            let n = s.tokens.len();
            s.hidden = out.hidden[(row + s.start) * d..(row + n) * d].to_vec();
            row += n;
        }
        return Ok(());
    }
    let opts = StepOpts {
        hidden: true,
        ..StepOpts::default()
    };
    let dev = model.embed.device();
    for s in seqs {
        let mut st = model.new_state(None)?;
        let ids = Tensor::new(&s.tokens[..], &dev)?.unsqueeze(0)?;
        let o = model.step_with(model.executor(), &ids, &mut st, &opts)?;
        let h = o.hidden.expect("asked for").squeeze(0)?;
        let n = s.tokens.len();
        s.hidden = h
            .narrow(0, s.start, n - s.start)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
    }
    Ok(())
}

/// The `n` tokens most frequent in the continuations (after `start`),
/// most frequent first (ties by id).
pub fn draft_vocab(seqs: &[DistillSeq], base_vocab: usize, n: usize) -> Vec<u32> {
    let mut count = vec![0usize; base_vocab];
    for s in seqs {
        for &t in &s.tokens[s.start + 1..] {
            count[t as usize] += 1;
        }
    }
    let mut ids: Vec<u32> = (0..base_vocab as u32)
        .filter(|&t| count[t as usize] > 0)
        .collect();
    ids.sort_by_key(|&t| (std::cmp::Reverse(count[t as usize]), t));
    ids.truncate(n);
    ids
}

/// Training positions: (sequence, position) pairs whose hidden state and
/// all `heads` + 1 following tokens exist.
pub fn positions(seqs: &[DistillSeq], heads: usize) -> Vec<(u32, u32)> {
    let mut out = vec![];
    for (i, s) in seqs.iter().enumerate() {
        for p in s.start..s.tokens.len().saturating_sub(heads + 1) {
            out.push((i as u32, p as u32));
        }
    }
    out
}

/// What the heads read at positions `pos`: the base's hidden states
/// (n, d), the k + 1 tokens after each position (n × (k+1)), and their raw
/// embeddings (n, k + 1, d).
fn inputs(
    heads: &Heads,
    base: &Transformer,
    seqs: &[DistillSeq],
    pos: &[(u32, u32)],
) -> Result<(Tensor, Vec<u32>, Tensor)> {
    let (d, k, n) = (heads.cfg.d_model, heads.cfg.heads, pos.len());
    let mut h = Vec::with_capacity(n * d);
    let mut toks = Vec::with_capacity(n * (k + 1));
    for &(i, p) in pos {
        let s = &seqs[i as usize];
        let r = p as usize - s.start;
        h.extend_from_slice(&s.hidden[r * d..(r + 1) * d]);
        toks.extend_from_slice(&s.tokens[p as usize + 1..p as usize + k + 2]);
    }
    let mut raw = vec![0f32; toks.len() * d];
    base.embed.rows_into(&toks, &mut raw)?;
    Ok((
        Tensor::from_vec(h, (n, d), &Device::Cpu)?,
        toks,
        Tensor::from_vec(raw, (n, k + 1, d), &Device::Cpu)?,
    ))
}

/// One batch on the graph executor: the mean over heads of each head's
/// loss -> (loss, per head: (correct, counted)) for `pos`. The loss is the
/// cross-entropy against the base model's token (positions whose token is
/// in the draft vocabulary), or with `distill` against the base model's
/// whole distribution over the draft vocabulary at that position (its
/// final hidden state through the same output rows: Medusa-2's and
/// Hydra++'s self-distillation, more signal per position than its argmax).
pub fn batch_loss(
    heads: &Heads,
    base: &Transformer,
    seqs: &[DistillSeq],
    pos: &[(u32, u32)],
    distill: bool,
) -> Result<(Tensor, Vec<(usize, usize)>)> {
    let (d, k) = (heads.cfg.d_model, heads.cfg.heads);
    let n = pos.len();
    let dev = Device::Cpu;
    let (h, toks, emb) = inputs(heads, base, seqs, pos)?;
    let mut embs = vec![];
    let mut loss = None;
    let mut stats = vec![];
    for i in 0..k {
        embs.push(heads.embed(&Graph, emb.narrow(1, i, 1)?.squeeze(1)?)?);
        let logits = heads.head(&Graph, i, &h, &embs)?;
        let (tgt, w): (Vec<u32>, Vec<f32>) = (0..n)
            .map(|r| match heads.index_of(toks[r * (k + 1) + i + 1]) {
                Some(j) => (j as u32, 1.0),
                None => (0, 0.0),
            })
            .unzip();
        let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        let correct = (0..n).filter(|&r| w[r] > 0.0 && pred[r] == tgt[r]).count();
        stats.push((correct, n));
        let l = if distill {
            // the base's final hidden state where it chose the target
            let mut ht = Vec::with_capacity(n * d);
            for &(si, p) in pos {
                let s = &seqs[si as usize];
                let r = p as usize + 1 + i - s.start;
                ht.extend_from_slice(&s.hidden[r * d..(r + 1) * d]);
            }
            let ht = Tensor::from_vec(ht, (n, d), &dev)?;
            let q = crate::nn::softmax_last(&one(Graph.linear(&ht, &[&heads.lm])?))?;
            let logp = crate::nn::log_softmax_last(&logits)?;
            (logp * q)?.sum_all()?.neg()?.affine(1.0 / n as f64, 0.0)?
        } else {
            let counted: f32 = w.iter().sum();
            if counted == 0.0 {
                continue;
            }
            let tgt = Tensor::from_vec(tgt, (1, n), &dev)?;
            let w = Tensor::from_vec(w, (1, n), &dev)?;
            crate::train::cross_entropy(&logits.unsqueeze(0)?, &tgt, &w, 0.0)?
        };
        loss = Some(match loss {
            None => l,
            Some(a) => (a + l)?,
        });
    }
    let loss = match loss {
        Some(l) => (l / k as f64)?,
        None => Tensor::zeros((), DType::F32, &dev)?,
    };
    Ok((loss, stats))
}

/// Held-out acceptance of teacher-forced drafting: per head, the share of
/// positions where it and every head before it drafted the base model's
/// token (what a verification pass keeps), and the mean tokens accepted.
#[derive(Clone, Debug, Serialize)]
pub struct HeadsEval {
    pub positions: usize,
    /// accepted_at[i]: heads 0..=i all right.
    pub accepted_at: Vec<f64>,
    /// Each head alone right.
    pub head_accuracy: Vec<f64>,
    /// Mean accepted draft tokens a pass (Σ accepted_at).
    pub mean_accepted: f64,
}

/// Per position, per head: (the head's probability of its token, whether
/// it is the base model's token), drafting as `HeadsDraft` does (argmax
/// over the draft vocabulary, teacher forced), on the graph executor.
pub fn chains(
    heads: &Heads,
    base: &Transformer,
    seqs: &[DistillSeq],
    pos: &[(u32, u32)],
) -> Result<Vec<Vec<(f32, bool)>>> {
    let k = heads.cfg.heads;
    let mut out = Vec::with_capacity(pos.len());
    for part in pos.chunks(512) {
        let n = part.len();
        let (h, toks, emb) = inputs(heads, base, seqs, part)?;
        let mut embs = vec![];
        let mut rows = vec![Vec::with_capacity(k); n];
        for i in 0..k {
            embs.push(heads.embed(&Graph, emb.narrow(1, i, 1)?.squeeze(1)?)?);
            let logits = heads.head(&Graph, i, &h, &embs)?;
            let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
            let top: Vec<f32> = crate::nn::softmax_last(&logits)?.max(1)?.to_vec1()?;
            for r in 0..n {
                let right = heads.cfg.vocab[pred[r] as usize] == toks[r * (k + 1) + i + 1];
                rows[r].push((top[r], right));
            }
        }
        out.extend(rows);
    }
    Ok(out)
}

/// `HeadsEval` of `chains`.
pub fn evaluate_chains(chains: &[Vec<(f32, bool)>]) -> HeadsEval {
    let k = chains.first().map_or(0, |c| c.len());
    let total = chains.len().max(1) as f64;
    let (mut chain, mut alone) = (vec![0usize; k], vec![0usize; k]);
    for c in chains {
        let mut ok = true;
        for (i, &(_, right)) in c.iter().enumerate() {
            alone[i] += usize::from(right);
            ok &= right;
            chain[i] += usize::from(ok);
        }
    }
    let accepted_at: Vec<f64> = chain.iter().map(|&c| c as f64 / total).collect();
    HeadsEval {
        positions: chains.len(),
        mean_accepted: accepted_at.iter().sum(),
        accepted_at,
        head_accuracy: alone.iter().map(|&c| c as f64 / total).collect(),
    }
}

/// Held-out acceptance (`HeadsEval`) over `pos`.
pub fn evaluate(
    heads: &Heads,
    base: &Transformer,
    seqs: &[DistillSeq],
    pos: &[(u32, u32)],
) -> Result<HeadsEval> {
    Ok(evaluate_chains(&chains(heads, base, seqs, pos)?))
}

/// Drafting that stops at the first head less sure than `min_confidence`:
/// its expected figures over `chains`.
#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    pub min_confidence: f32,
    /// Mean tokens drafted and accepted a pass.
    pub drafted: f64,
    pub accepted: f64,
    /// Predicted speed-up over plain decoding: tokens a pass over the
    /// pass's cost, `verify_cost[j]` the cost of verifying j drafted
    /// tokens in plain steps, plus the heads run.
    pub speedup: f64,
}

/// The confidence threshold (0, 0.05, … 0.95) with the best predicted
/// speed-up over `chains`, and each threshold's figures. `head_cost`: one
/// head's cost in plain steps (every head run is paid, the unsure one
/// that stops the draft too).
pub fn calibrate(
    chains: &[Vec<(f32, bool)>],
    verify_cost: &[f64],
    head_cost: f64,
) -> (Calibration, Vec<Calibration>) {
    let mut all = vec![];
    for step in 0..20 {
        let tau = step as f32 * 0.05;
        let (mut drafted, mut accepted, mut cost) = (0usize, 0usize, 0f64);
        for c in chains {
            let n = c.iter().take_while(|x| x.0 >= tau).count();
            let a = c[..n].iter().take_while(|x| x.1).count();
            drafted += n;
            accepted += a;
            let run = (n + 1).min(c.len());
            cost += verify_cost.get(n).copied().unwrap_or(1.0 + n as f64) + head_cost * run as f64;
        }
        let m = chains.len().max(1) as f64;
        all.push(Calibration {
            min_confidence: tau,
            drafted: drafted as f64 / m,
            accepted: accepted as f64 / m,
            speedup: (m + accepted as f64) / cost.max(1e-9),
        });
    }
    let best = all
        .iter()
        .cloned()
        .fold(None::<Calibration>, |b, c| match b {
            Some(b) if b.speedup >= c.speedup => Some(b),
            _ => Some(c),
        })
        .expect("twenty thresholds");
    (best, all)
}
