//! Held-out evaluation of trained checkpoints.

pub mod ffn_sweep;
pub mod frontier;
pub mod report;
pub mod streaming;

use crate::decode::{beam_search, greedy_batch};
use crate::error::Result;
use crate::model::{Memory, Transformer};
use crate::tasks::{collate, Batch, Example, Task, TaskConfig, BOS, EOS};
use candle_core::{DType, Tensor};
use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Metrics {
    /// Transduction: whole output equals the target (greedy decoding).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    /// Transduction: fraction of target tokens (and the EOS) produced at the right position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_accuracy: Option<f64>,
    /// Transduction with beam search.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beam_exact_match: Option<f64>,
    /// MQAR: fraction of queried values predicted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Text: mean next-byte cross-entropy (nats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    pub n_examples: usize,
}

pub struct EvalOptions {
    pub batch_size: usize,
    /// Also evaluate beam search with (beam, alpha).
    pub beam: Option<(usize, f64)>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch_size: 250,
            beam: None,
        }
    }
}

/// Tokens per forward pass when scoring a language-model task.
const EVAL_TOKENS: usize = 4096;

pub fn evaluate(model: &Transformer, task: &Task, opts: &EvalOptions) -> Result<Metrics> {
    model.set_train_seed(None);
    let examples = task.eval_set();
    let dev = model.embed.device();
    let mut m = Metrics {
        n_examples: examples.len(),
        ..Default::default()
    };
    match &task.cfg {
        TaskConfig::Copy(c) | TaskConfig::Reverse(c) => {
            let (mut exact, mut tok_ok, mut tok_n) = (0usize, 0usize, 0usize);
            for chunk in examples.chunks(opts.batch_size.max(1)) {
                let Batch::Seq2Seq { src, src_pad, .. } = collate(chunk, &dev)? else {
                    unreachable!()
                };
                let memory = model.encode(&src, Some(&src_pad))?;
                let outs = greedy_batch(model, &memory, BOS, EOS, c.max_len + 1)?;
                for (e, out) in chunk.iter().zip(outs) {
                    let Example::Pair { tgt, .. } = e else {
                        unreachable!()
                    };
                    exact += (&out == tgt) as usize;
                    // target + EOS against output + EOS, position by position
                    let want: Vec<u32> = tgt.iter().cloned().chain([EOS]).collect();
                    let got: Vec<u32> = out.iter().cloned().chain([EOS]).collect();
                    tok_ok += want.iter().zip(&got).filter(|(a, b)| a == b).count();
                    tok_n += want.len();
                }
            }
            m.exact_match = Some(exact as f64 / examples.len() as f64);
            m.token_accuracy = Some(tok_ok as f64 / tok_n as f64);
            if let Some((beam, alpha)) = opts.beam {
                let mut ok = 0;
                for e in &examples {
                    let Example::Pair { src, tgt } = e else {
                        unreachable!()
                    };
                    let ids = Tensor::new(src.as_slice(), &dev)?.unsqueeze(0)?;
                    let memory: Memory = model.encode(&ids, None)?;
                    let out = beam_search(model, &memory, BOS, EOS, beam, alpha, c.max_len + 1)?;
                    ok += (&out == tgt) as usize;
                }
                m.beam_exact_match = Some(ok as f64 / examples.len() as f64);
            }
        }
        TaskConfig::Mqar(_) | TaskConfig::Text(_) => {
            let (mut correct, mut counted, mut nll) = (0f64, 0f64, 0f64);
            // The parameters are Vars, so a forward pass keeps every
            // activation alive (autograd) until its logits are dropped: cap a
            // chunk at EVAL_TOKENS tokens (200 text windows at once peaked
            // at 3.6 GB).
            let len = match examples.first() {
                Some(Example::Lm { input, .. }) => input.len().max(1),
                _ => 1,
            };
            let rows = (EVAL_TOKENS / len).clamp(1, opts.batch_size.max(1));
            for chunk in examples.chunks(rows) {
                let Batch::Lm {
                    input,
                    target,
                    weight,
                } = collate(chunk, &dev)?
                else {
                    unreachable!()
                };
                let logits = model.decode(&input, None)?;
                let pred = logits.argmax(candle_core::D::Minus1)?;
                let hit = pred.eq(&target)?.to_dtype(DType::F32)?;
                correct += (hit * &weight)?.sum_all()?.to_scalar::<f32>()? as f64;
                let n = weight.sum_all()?.to_scalar::<f32>()? as f64;
                let loss = crate::train::cross_entropy(&logits, &target, &weight, 0.0)?
                    .to_scalar::<f32>()? as f64;
                nll += loss * n;
                counted += n;
            }
            if matches!(task.cfg, TaskConfig::Mqar(_)) {
                m.accuracy = Some(correct / counted);
            } else {
                m.loss = Some(nll / counted);
                m.perplexity = Some((nll / counted).exp());
            }
        }
    }
    Ok(m)
}
