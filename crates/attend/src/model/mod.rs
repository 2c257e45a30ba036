//! The Transformer: one definition for encoder-only, decoder-only and
//! encoder–decoder models. A block is token mixing (self-attention, plus
//! cross-attention in an encoder–decoder's decoder) and a channel mixer (FFN),
//! each wrapped in a residual and a norm placed before (`pre`) or after
//! (`post`, as in the paper) the sublayer.
//!
//! The forward pass is written once (`Transformer::run`, `Block::forward`),
//! against the ops of an executor (`exec`): the graph executor runs it on
//! candle tensors (training, scoring, any dtype or device), the CPU
//! executor on buffers with quantized kernels and the KV cache in place
//! (decoding, packed encoder batches). A new norm, FFN or per-layer option
//! is written here once and reaches both.

pub mod prune;
pub mod state;

pub use prune::{FfnSkip, Probe, Prune};
pub use state::{DecodeState, LayerState};

use crate::attention::{one, Attention, MixerState};
use crate::cache::kv::KvCache;
use crate::cache::paged::{BlockPool, KvBlock};
use crate::cache::policy::KvPolicy;
use crate::config::{MechanismConfig, ModelConfig, NormPosition, PositionKind};
use crate::error::{Error, Result};
use crate::exec::cpu::{Cpu, Packed};
use crate::exec::graph::{Graph, GraphBatch};
use crate::exec::Exec;
use crate::ffn::Ffn;
use crate::nn::{Builder, Dropout, Embedding, Linear, ParamStore};
use crate::norm::Norm;
use crate::position::{Additive, Rope};
use candle_core::{DType, Tensor};
use std::sync::Arc;

/// Which executor runs a decode step or a packed encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Executor {
    /// candle tensors (`exec::graph`)
    Graph,
    /// plain buffers and attend's kernels (`exec::cpu`)
    Cpu,
}

/// Encoder output as the decoder sees it.
#[derive(Clone, Debug)]
pub struct Memory {
    /// (b, s, d)
    pub hidden: Tensor,
    /// (b, s), 1 = token, 0 = padding
    pub padding: Option<Tensor>,
}

/// Sublayers a pass leaves out: layer i's self-attention when `attn[i]`,
/// its FFN when `ffn[i]` (self-speculative drafts, issue 14). A skipped
/// sublayer is not computed and a skipped attention's cache does not see
/// the tokens; a shorter list skips nothing past its end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Skip {
    pub attn: Vec<bool>,
    pub ffn: Vec<bool>,
}

impl Skip {
    /// Whether layer i's attention is skipped.
    pub fn attn(&self, i: usize) -> bool {
        self.attn.get(i).copied().unwrap_or(false)
    }

    /// Whether layer i's FFN is skipped.
    pub fn ffn(&self, i: usize) -> bool {
        self.ffn.get(i).copied().unwrap_or(false)
    }

    /// Sublayers skipped.
    pub fn count(&self) -> usize {
        self.attn.iter().chain(&self.ffn).filter(|&&s| s).count()
    }
}

/// What `Transformer::step_many_with` returns: rows of the logits
/// (vocab wide) and, when asked for, the final hidden states (d wide).
#[derive(Debug, Default)]
pub struct ManyOut {
    pub logits: Vec<f32>,
    pub hidden: Vec<f32>,
}

/// How `Transformer::step_with` runs a step.
#[derive(Clone, Debug, Default)]
pub struct StepOpts {
    /// Only each sequence's last position.
    pub last_only: bool,
    /// Sublayers to leave out.
    pub skip: Option<Skip>,
    /// Return the final hidden states too.
    pub hidden: bool,
}

/// What `Transformer::step_with` returns.
#[derive(Debug)]
pub struct StepOut {
    /// (b, t, vocab), or (b, 1, vocab) for `last_only`.
    pub logits: Tensor,
    /// The final hidden states (after the final norm), shaped as the
    /// logits with d in place of vocab, when asked for.
    pub hidden: Option<Tensor>,
}

#[derive(Clone, Debug)]
pub struct Block {
    pub ln_1: Norm,
    pub self_attn: Attention,
    pub ln_cross: Option<Norm>,
    pub cross_attn: Option<Attention>,
    pub ln_2: Norm,
    pub ffn: Ffn,
    /// Sandwich norms: on each sublayer's output, before the residual.
    pub ln_1_post: Option<Norm>,
    pub ln_2_post: Option<Norm>,
    norm_position: NormPosition,
    dropout: Dropout,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: &Builder,
        cfg: &ModelConfig,
        index: usize,
        mechanism: &MechanismConfig,
        causal: bool,
        cross: bool,
        rope: Option<Arc<Rope>>,
        dropout: Dropout,
    ) -> Result<Self> {
        let norm = |name: &str| Norm::new(&vb.pp(name), cfg.norm, cfg.d_model, cfg.norm_eps);
        let sandwich = cfg.norm_position == NormPosition::Sandwich;
        Ok(Self {
            ln_1: norm("ln_1")?,
            self_attn: Attention::new(&vb.pp("self_attn"), cfg, mechanism, causal, true, rope)?,
            ln_cross: if cross { Some(norm("ln_cross")?) } else { None },
            cross_attn: if cross {
                Some(Attention::new(
                    &vb.pp("cross_attn"),
                    cfg,
                    &MechanismConfig::Softmax,
                    false,
                    false,
                    None,
                )?)
            } else {
                None
            },
            ln_2: norm("ln_2")?,
            ffn: Ffn::for_block(&vb.pp("ffn"), cfg, index)?,
            ln_1_post: sandwich.then(|| norm("ln_1_post")).transpose()?,
            ln_2_post: sandwich.then(|| norm("ln_2_post")).transpose()?,
            norm_position: cfg.norm_position,
            dropout,
        })
    }

    /// x + f(norm(x)) for pre-norm, norm(x + f(x)) for post-norm,
    /// x + post(f(norm(x))) for sandwich norms.
    fn sublayer<E: Exec>(
        &self,
        e: &E,
        x: E::X,
        norm: &Norm,
        post: Option<&Norm>,
        f: impl FnOnce(&E::X) -> Result<E::X>,
    ) -> Result<E::X> {
        match self.norm_position {
            NormPosition::Pre | NormPosition::Sandwich => {
                let mut y = f(&e.norm(norm, x.clone())?)?;
                if let Some(p) = post {
                    y = e.norm(p, y)?;
                }
                let y = e.dropout(&self.dropout, y)?;
                e.add(x, &y)
            }
            NormPosition::Post => {
                let y = e.dropout(&self.dropout, f(&x)?)?;
                e.norm(norm, e.add(x, &y)?)
            }
        }
    }

    /// Token mixing: x (tokens, d) -> (tokens, d), self-attention (and
    /// cross-attention in an encoder–decoder's decoder) with their
    /// residuals. `state`: this layer's decode state; `cross`: the encoder
    /// memory's keys/values for this layer and its padding mask.
    fn mix_tokens<E: Exec>(
        &self,
        e: &E,
        x: E::X,
        b: &E::Batch,
        state: Option<&mut MixerState>,
        cross: Option<(&(Tensor, Tensor), Option<&Tensor>)>,
        skip_attn: bool,
    ) -> Result<E::X> {
        let x = if skip_attn {
            x
        } else {
            self.sublayer(e, x, &self.ln_1, self.ln_1_post.as_ref(), |h| {
                self.self_attn.forward(e, h, b, state)
            })?
        };
        match (&self.cross_attn, &self.ln_cross, cross) {
            (Some(attn), Some(ln), Some((kv, pad))) => self.sublayer(e, x, ln, None, |h| {
                e.graph(h, b, &mut |h, _| attn.cross(h, kv, pad))
            }),
            (Some(_), _, _) => Err(Error::msg(
                "encoder–decoder model called without encoder memory",
            )),
            _ => Ok(x),
        }
    }

    /// Channel mixing: x (tokens, d) -> (tokens, d), the FFN with its
    /// residual.
    fn mix_channels<E: Exec>(&self, e: &E, x: E::X, b: &E::Batch) -> Result<E::X> {
        self.sublayer(e, x, &self.ln_2, self.ln_2_post.as_ref(), |h| {
            self.ffn.forward(e, h, b)
        })
    }
}

#[derive(Clone, Debug)]
pub struct Transformer {
    pub cfg: ModelConfig,
    /// Token embedding, shared by encoder, decoder (and output when tied).
    pub embed: Embedding,
    pos_enc: Additive,
    pos_dec: Additive,
    pub encoder: Vec<Block>,
    pub decoder: Vec<Block>,
    /// Final norms (pre-norm models only; post-norm blocks end normalised).
    enc_norm: Option<Norm>,
    pub(crate) dec_norm: Option<Norm>,
    /// Output projection; shares the embedding's storage when tied.
    lm_head: Linear,
    /// LayerNorm of the embedding sum (BERT).
    embed_norm: Option<Norm>,
    dropout: Dropout,
    /// What KV caches store keys and values in: f32 from `new`; the CLI's
    /// run commands set `--kv-dtype` (default f16).
    pub kv_dtype: crate::kernels::kv::KvDType,
    /// Sublayers dropped or skipped per token, and the similarity probe
    /// (`prune`); nothing by default. Applies to the decoder.
    pub prune: Prune,
}

impl Transformer {
    /// Build the model, taking tensors already in `store` (a checkpoint) and
    /// initialising the rest from the store's seeded RNG.
    pub fn new(cfg: &ModelConfig, store: &ParamStore) -> Result<Self> {
        cfg.validate()?;
        let vb = store.builder();
        let dropout = Dropout::new(cfg.dropout);
        // (RoPE scaling, Llama 3's, applies to the global layers' base)
        let factors = cfg
            .rope_scaling
            .as_ref()
            .map(|s| s.factors(cfg.head_dim(), cfg.rope_theta));
        let rope = (cfg.position == PositionKind::Rope)
            .then(|| {
                Rope::scaled(
                    cfg.head_dim(),
                    cfg.max_len,
                    cfg.rope_theta,
                    factors.as_deref(),
                    cfg.rope_interleaved,
                    store.dtype,
                    &store.device,
                )
            })
            .transpose()?
            .map(Arc::new);
        // sliding-window layers may take RoPE of another base (Gemma 3)
        let rope_window = match (&rope, cfg.rope_theta_window) {
            (Some(_), Some(theta)) => Some(Arc::new(Rope::new(
                cfg.head_dim(),
                cfg.max_len,
                theta,
                cfg.rope_interleaved,
                store.dtype,
                &store.device,
            )?)),
            _ => rope.clone(),
        };
        // pre-norm stacks (sandwich included) end with a final norm
        let pre = matches!(
            cfg.norm_position,
            NormPosition::Pre | NormPosition::Sandwich
        );
        let final_norm = |name: &str| -> Result<Option<Norm>> {
            if pre {
                Ok(Some(Norm::new(
                    &vb.pp(name),
                    cfg.norm,
                    cfg.d_model,
                    cfg.norm_eps,
                )?))
            } else {
                Ok(None)
            }
        };
        let enc_blocks = if cfg.has_encoder() {
            cfg.n_encoder_layers
        } else {
            0
        };
        let stack = |name: &str, n: usize, causal: bool, cross: bool| -> Result<Vec<Block>> {
            (0..n)
                .map(|i| {
                    let mechanism = cfg.layer_mechanism(name == "encoder", i);
                    let rope = match mechanism {
                        MechanismConfig::Window(_) => rope_window.clone(),
                        _ => rope.clone(),
                    };
                    // block index over the whole model, encoder first
                    let index = if name == "encoder" { i } else { enc_blocks + i };
                    Block::new(
                        &vb.pp(name).pp(i),
                        cfg,
                        index,
                        mechanism,
                        causal,
                        cross,
                        rope,
                        dropout,
                    )
                })
                .collect()
        };
        let cross = cfg.has_encoder() && cfg.has_decoder();
        let enc_layers = if cfg.has_encoder() {
            cfg.n_encoder_layers
        } else {
            0
        };
        let dec_layers = if cfg.has_decoder() {
            cfg.n_decoder_layers
        } else {
            0
        };
        let embed = Embedding::new(&vb.pp("embed"), cfg.vocab_size, cfg.d_model)?;
        Ok(Self {
            embed: embed.clone(),
            pos_enc: Additive::new(
                &vb.pp("pos_enc"),
                if cfg.has_encoder() {
                    cfg.position
                } else {
                    PositionKind::None
                },
                cfg.max_len,
                cfg.d_model,
            )?,
            pos_dec: Additive::new(
                &vb.pp("pos_dec"),
                if cfg.has_decoder() {
                    cfg.position
                } else {
                    PositionKind::None
                },
                cfg.max_len,
                cfg.d_model,
            )?,
            encoder: stack("encoder", enc_layers, false, false)?,
            decoder: stack("decoder", dec_layers, true, cross)?,
            enc_norm: if cfg.has_encoder() {
                final_norm("enc_norm")?
            } else {
                None
            },
            dec_norm: if cfg.has_decoder() {
                final_norm("dec_norm")?
            } else {
                None
            },
            lm_head: if cfg.tie_embeddings {
                // the embedding's own storage, dense or quantized (GGUF)
                Linear {
                    w: embed.w.clone(),
                    b: None,
                }
            } else {
                Linear::new(&vb.pp("lm_head"), cfg.d_model, cfg.vocab_size, false)?
            },
            embed_norm: if cfg.embed_norm {
                Some(Norm::new(
                    &vb.pp("embed_norm"),
                    cfg.norm,
                    cfg.d_model,
                    cfg.norm_eps,
                )?)
            } else {
                None
            },
            dropout,
            cfg: cfg.clone(),
            // exact keys and values for models built from a config (training,
            // research: the same precision as the recurrent states they are
            // compared with); the run commands pick `--kv-dtype` (f16)
            kv_dtype: crate::kernels::kv::KvDType::F32,
            prune: Prune::default(),
        })
    }

    /// The encoder's additive positions (table or none).
    pub fn pos_enc(&self) -> &Additive {
        &self.pos_enc
    }

    /// The decoder's additive positions (table or none).
    pub fn pos_dec(&self) -> &Additive {
        &self.pos_dec
    }

    /// The LayerNorm of the embedding sum (BERT), if any.
    pub fn embed_norm(&self) -> Option<&Norm> {
        self.embed_norm.as_ref()
    }

    /// `Some(seed)` turns dropout on (for the calling thread) with masks
    /// from that seed; `None` is evaluation mode.
    pub fn set_train_seed(&self, seed: Option<u64>) {
        crate::nn::set_dropout_seed(seed);
    }

    /// The one forward pass: ids of a batch -> the final hidden states
    /// (tokens, d), after the final norm, on executor `e`. `encoder` picks
    /// the stack; `state` is the decoder's decode state (appended to);
    /// `memory` the encoder output cross-attention reads when the state
    /// does not hold its keys/values; `last_only` keeps only each
    /// sequence's last token after the blocks; `skip` leaves sublayers out.
    #[allow(clippy::too_many_arguments)]
    pub fn run<E: Exec>(
        &self,
        e: &E,
        encoder: bool,
        b: &E::Batch,
        mut state: Option<&mut DecodeState>,
        memory: Option<&Memory>,
        last_only: bool,
        skip: Option<&Skip>,
    ) -> Result<E::X> {
        let (blocks, pos, final_norm, name) = if encoder {
            (&self.encoder, &self.pos_enc, &self.enc_norm, "encoder")
        } else {
            (&self.decoder, &self.pos_dec, &self.dec_norm, "decoder")
        };
        if blocks.is_empty() {
            return Err(Error::msg(format!("this model has no {name}")));
        }
        // a policy-capped cache takes positions from its slots, so only
        // additive positions bound its length
        let capped = state
            .as_ref()
            .is_some_and(|s| !s.policy_caches().is_empty())
            && matches!(pos, Additive::None);
        let end = e.end(b);
        if end > self.cfg.max_len && !capped {
            return Err(Error::msg(format!(
                "sequence of {end} tokens exceeds the model's max_len {}",
                self.cfg.max_len
            )));
        }
        // x = dropout(norm(√d · embed(ids) + positions))
        let mut x = e.embed(&self.embed, b)?;
        if self.cfg.scale_embeddings {
            x = e.scale(x, (self.cfg.d_model as f64).sqrt())?;
        }
        x = e.add_positions(pos, x, b)?;
        if let Some(n) = &self.embed_norm {
            x = e.norm(n, x)?;
        }
        x = e.dropout(&self.dropout, x)?;
        let mem_pad = match (&state, memory) {
            (Some(s), _) => s.memory_padding.clone(),
            (None, Some(m)) => m.padding.clone(),
            _ => None,
        };
        // what the decoder leaves out or measures (`prune`)
        let prune = (!encoder && self.prune.active()).then_some(&self.prune);
        let probe = prune.and_then(|p| p.probe.as_deref());
        let mut rows = prune
            .and_then(|p| p.ffn_skip.as_ref())
            .map(|f| prune::RowSkip::new(f, blocks.len(), &e.positions(b)));
        let stats = &self.prune.stats;
        for (i, block) in blocks.iter().enumerate() {
            let (mixer, held) = match state.as_deref_mut() {
                Some(s) => {
                    let l = &mut s.layers[i];
                    (Some(&mut l.mixer), l.cross_kv.as_ref())
                }
                None => (None, None),
            };
            let fresh = match (held, &block.cross_attn, memory) {
                (None, Some(attn), Some(m)) => Some(attn.memory_kv(&m.hidden)?),
                _ => None,
            };
            let kv = held.or(fresh.as_ref());
            let cross = kv.map(|kv| (kv, mem_pad.as_ref()));
            let dropped = |s: Option<&Skip>, attn: bool| {
                s.is_some_and(|s| if attn { s.attn(i) } else { s.ffn(i) })
            };
            let skip_attn = dropped(skip, true) || dropped(prune.map(|p| &p.drop), true);
            let skip_ffn = dropped(skip, false) || dropped(prune.map(|p| &p.drop), false);
            if rows.is_none() && probe.is_none() {
                // nothing measured per token: drops alone need no copies
                x = block.mix_tokens(e, x, b, mixer, cross, skip_attn)?;
                if !skip_ffn {
                    x = block.mix_channels(e, x, b)?;
                }
                continue;
            }
            // token mixing, its similarity recorded when probed
            let before = (probe.is_some() && !skip_attn).then(|| x.clone());
            x = block.mix_tokens(e, x, b, mixer, cross, skip_attn)?;
            if let (Some(p), Some(before)) = (probe, &before) {
                p.record(prune::Sublayer::Attn, i, &e.cos_rows(before, &x)?);
            }
            if skip_ffn {
                continue;
            }
            // channel mixing, skipped per token where its FFNs saturated
            let plan = rows.as_mut().and_then(|r| r.plan(i));
            let n = plan.as_ref().map_or(0, |p| p.len());
            let skipped = plan
                .as_ref()
                .map_or(0, |p| p.iter().filter(|&&s| s).count());
            if plan.is_some() && skipped == n {
                stats.add(i, 0, n as u64);
                continue;
            }
            let before = x.clone();
            let mut y = block.mix_channels(e, x, b)?;
            if let Some(p) = &plan {
                y = e.keep_rows(y, &before, p)?;
            }
            let cos = e.cos_rows(&before, &y)?;
            if rows.is_some() {
                stats.add(i, (cos.len() - skipped) as u64, skipped as u64);
            }
            if let Some(r) = rows.as_mut() {
                r.observe(i, &cos, plan.as_deref());
            }
            if let Some(p) = probe {
                let ran: Vec<f32> = match &plan {
                    Some(pl) => cos
                        .iter()
                        .zip(pl)
                        .filter(|(_, &s)| !s)
                        .map(|(&c, _)| c)
                        .collect(),
                    None => cos.clone(),
                };
                p.record(prune::Sublayer::Ffn, i, &ran);
            }
            x = y;
        }
        if last_only {
            x = e.last(x, b)?;
        }
        if let Some(n) = final_norm {
            x = e.norm(n, x)?;
        }
        Ok(x)
    }

    /// The executor for decode steps and packed encoding: the CPU executor
    /// for f32 weights on the CPU, else the graph executor.
    pub fn executor(&self) -> Executor {
        if self.embed.on_cpu_f32() {
            Executor::Cpu
        } else {
            Executor::Graph
        }
    }

    /// src (b, s) u32, padding (b, s) 1 = token -> memory (b, s, d)
    pub fn encode(&self, src: &Tensor, padding: Option<&Tensor>) -> Result<Memory> {
        let b = GraphBatch {
            ids: src.clone(),
            offset: 0,
            padding: padding.cloned(),
        };
        Ok(Memory {
            hidden: self.run(&Graph, true, &b, None, None, false, None)?,
            padding: padding.cloned(),
        })
    }

    /// Encode sequences of different lengths, packed end to end:
    /// seqs -> (Σ len, d) hidden states, sequence i's rows after those of
    /// sequence i-1. Runs on `executor()`.
    pub fn encode_packed(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        self.encode_packed_on(self.executor(), seqs)
    }

    /// `encode_packed` on the given executor (the graph executor pads the
    /// batch and masks the padding instead).
    pub fn encode_packed_on(&self, exec: Executor, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        // an empty sequence contributes no rows
        let seqs: Vec<&[u32]> = seqs.iter().copied().filter(|s| !s.is_empty()).collect();
        if seqs.is_empty() {
            return Ok(vec![]);
        }
        let seqs = &seqs[..];
        match exec {
            Executor::Cpu => {
                let b = Packed::new(seqs);
                let mut out = None;
                // on a pool thread, so that the parallel regions fork from
                // inside the pool
                rayon::scope(|_| out = Some(self.run(&Cpu, true, &b, None, None, false, None)));
                Ok(std::mem::take(&mut out.expect("scope ran")?.data))
            }
            Executor::Graph => {
                let dev = &self.embed.device();
                let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
                let (mut ids, mut mask) =
                    (vec![0u32; seqs.len() * len], vec![0f32; seqs.len() * len]);
                for (row, s) in seqs.iter().enumerate() {
                    ids[row * len..][..s.len()].copy_from_slice(s);
                    mask[row * len..][..s.len()].fill(1.0);
                }
                let ids = Tensor::from_vec(ids, (seqs.len(), len), dev)?;
                let mask = Tensor::from_vec(mask, (seqs.len(), len), dev)?;
                let h = self.encode(&ids, Some(&mask))?.hidden;
                let mut out = vec![];
                for (row, s) in seqs.iter().enumerate() {
                    let real = h.get(row)?.narrow(0, 0, s.len())?;
                    out.extend(real.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
                }
                Ok(out)
            }
        }
    }

    /// The linear maps of every block: attention's q, k, v, o (cross-
    /// attention's too) and the FFN's, encoder then decoder.
    pub fn block_linears(&self) -> Vec<&Linear> {
        let mut out = vec![];
        for b in self.encoder.iter().chain(&self.decoder) {
            for a in std::iter::once(&b.self_attn).chain(&b.cross_attn) {
                out.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]);
            }
            out.extend([&b.ffn.w1, &b.ffn.w2]);
            out.extend(&b.ffn.w3);
        }
        out
    }

    /// As `block_linears`, to change.
    pub fn block_linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = vec![];
        for b in self.encoder.iter_mut().chain(&mut self.decoder) {
            for a in std::iter::once(&mut b.self_attn).chain(&mut b.cross_attn) {
                out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            }
            out.extend([&mut b.ffn.w1, &mut b.ffn.w2]);
            out.extend(&mut b.ffn.w3);
        }
        out
    }

    /// Hold every block's linear maps in vector-wise int8 (LLM.int8 with a
    /// threshold); the embedding and output projection keep their type.
    /// Quantized (GGUF) weights are refused: start from float weights.
    pub fn quantize_int8(&mut self, mode: crate::nn::Int8Mode) -> Result<()> {
        for l in self.block_linears_mut() {
            l.to_int8(mode)?;
        }
        Ok(())
    }

    /// Outliers the int8 maps met (`kernels::quant::int8`), summed over
    /// the blocks; `reset` starts the counts again.
    pub fn outlier_stats(&self, reset: bool) -> crate::kernels::quant::int8::OutlierStats {
        let mut s = crate::kernels::quant::int8::OutlierStats::default();
        for l in self.block_linears() {
            if let crate::nn::Weight::Int8(m) = &l.w {
                s.add(m.stats(reset));
            }
        }
        s
    }

    /// Bytes of the weights: embedding, blocks' linear maps, and the
    /// output projection when it is not the embedding (norms and biases
    /// are left out: a few KiB).
    pub fn weight_bytes(&self) -> usize {
        let tied = self.cfg.tie_embeddings;
        self.embed.w.bytes()
            + self
                .block_linears()
                .iter()
                .map(|l| l.w.bytes())
                .sum::<usize>()
            + if tied { 0 } else { self.lm_head.w.bytes() }
    }

    /// The output projection (vocab, d).
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// Output projection: h (b, t, d) -> logits (b, t, vocab)
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(h)
    }

    /// Whole-sequence causal decoder pass (training, scoring):
    /// tgt (b, t) u32 -> logits (b, t, vocab).
    pub fn decode(&self, tgt: &Tensor, memory: Option<&Memory>) -> Result<Tensor> {
        self.logits(&self.decode_hidden(tgt, memory)?)
    }

    /// The decoder's final hidden states (after the final norm), before the
    /// output projection: tgt (b, t) -> (b, t, d). Lets a loss project only
    /// the positions it scores.
    pub fn decode_hidden(&self, tgt: &Tensor, memory: Option<&Memory>) -> Result<Tensor> {
        let b = GraphBatch {
            ids: tgt.clone(),
            offset: 0,
            padding: None,
        };
        self.run(&Graph, false, &b, None, memory, false, None)
    }

    /// A fresh decode state (cross-attention keys and values of `memory`
    /// computed once here); softmax layers get a KV cache in `kv_dtype`.
    pub fn new_state(&self, memory: Option<&Memory>) -> Result<DecodeState> {
        let layers = self
            .decoder
            .iter()
            .map(|b| {
                Ok(LayerState {
                    mixer: b.self_attn.new_state(self.kv_dtype)?,
                    cross_kv: match (&b.cross_attn, memory) {
                        // detached: the state keeps values, not the encoder's graph
                        (Some(attn), Some(m)) => {
                            let (k, v) = attn.memory_kv(&m.hidden)?;
                            Some((k.detach(), v.detach()))
                        }
                        (Some(_), None) => {
                            return Err(Error::msg(
                                "encoder–decoder decoding needs the encoder memory",
                            ))
                        }
                        _ => None,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DecodeState {
            layers,
            pos: 0,
            memory_padding: memory.and_then(|m| m.padding.clone()),
        })
    }

    /// Empty `state` for a new sequence over the same encoder memory: KV
    /// caches are cleared in place (their buffers kept, so a repeated
    /// request does not allocate and fault them in again), other mixers'
    /// states start afresh. Equivalent to `new_state` (or
    /// `new_state_with_policy` with the state's policy).
    pub fn reset_state(&self, state: &mut DecodeState) -> Result<()> {
        for (b, l) in self.decoder.iter().zip(&mut state.layers) {
            match &mut l.mixer {
                MixerState::Kv(caches) => {
                    // a fresh state holds one empty cache
                    caches.truncate(1);
                    caches.iter_mut().for_each(KvCache::clear);
                }
                other => *other = b.self_attn.new_state(self.kv_dtype)?,
            }
        }
        state.pos = 0;
        Ok(())
    }

    /// A batch-1 decode state whose KV caches follow an eviction `policy`
    /// (`cache::policy`); `retrieval[layer][kv_head]` marks the heads that
    /// keep everything under RazorAttention (`eval::streaming::retrieval_heads`),
    /// indexed by softmax layer.
    pub fn new_state_with_policy(
        &self,
        policy: &KvPolicy,
        retrieval: Option<&[Vec<bool>]>,
    ) -> Result<DecodeState> {
        if self.cfg.has_encoder() {
            return Err(Error::msg("KV-cache policies apply to decoder-only models"));
        }
        let c = &self.cfg;
        if let (Some(b), PositionKind::Rope) = (policy.budget(), c.position) {
            // kept tokens take RoPE positions from their rank: 0..budget
            if b > c.max_len {
                return Err(Error::config(
                    "kv-policy",
                    format!(
                        "`{policy}` keeps {b} tokens per head, more than the model's context of {}",
                        c.max_len
                    ),
                ));
            }
        }
        let mut st = self.new_state(None)?;
        // every softmax layer's cache follows the policy (other mechanisms
        // keep their own fixed-size state); retrieval[i] belongs to the
        // i-th softmax layer
        let mut i = 0;
        for (l, ls) in st.layers.iter_mut().enumerate() {
            if *c.layer_mechanism(false, l) == MechanismConfig::Softmax {
                let r = retrieval.and_then(|r| r.get(i)).map_or(&[][..], |r| r);
                i += 1;
                ls.mixer = MixerState::Kv(vec![KvCache::with_policy(
                    policy,
                    self.kv_dtype,
                    c.kv_heads(),
                    c.head_dim(),
                    r,
                )?]);
            }
        }
        Ok(st)
    }

    /// Incremental decoding: feed ids (b, t) after the `state.pos` tokens
    /// already in the state -> logits (b, t, vocab); the state advances by t.
    pub fn step(&self, ids: &Tensor, state: &mut DecodeState) -> Result<Tensor> {
        self.step_on(self.executor(), ids, state, false)
    }

    /// As `step`, but only the last position's logits: (b, vocab). What
    /// generation needs; a 512-token prefill then projects one row, not 512.
    pub fn step_last(&self, ids: &Tensor, state: &mut DecodeState) -> Result<Tensor> {
        Ok(self
            .step_on(self.executor(), ids, state, true)?
            .squeeze(1)?)
    }

    /// A decode step on the given executor: ids (b, t) -> logits
    /// (b, t, vocab), or (b, 1, vocab) with `last_only`.
    pub fn step_on(
        &self,
        exec: Executor,
        ids: &Tensor,
        state: &mut DecodeState,
        last_only: bool,
    ) -> Result<Tensor> {
        let o = StepOpts {
            last_only,
            ..StepOpts::default()
        };
        Ok(self.step_with(exec, ids, state, &o)?.logits)
    }

    /// A decode step as `opts` says (last position only, sublayers
    /// skipped, final hidden states returned): ids (b, t) -> `StepOut`.
    pub fn step_with(
        &self,
        exec: Executor,
        ids: &Tensor,
        state: &mut DecodeState,
        opts: &StepOpts,
    ) -> Result<StepOut> {
        let (bsz, t) = ids.dims2()?;
        if t == 0 {
            return Err(Error::msg("a decode step needs at least one token"));
        }
        let (last_only, skip) = (opts.last_only, opts.skip.as_ref());
        let out = match exec {
            Executor::Graph => {
                let b = GraphBatch {
                    ids: ids.clone(),
                    offset: state.pos,
                    padding: None,
                };
                let h = self.run(&Graph, false, &b, Some(state), None, last_only, skip)?;
                StepOut {
                    logits: self.logits(&h)?,
                    hidden: opts.hidden.then_some(h),
                }
            }
            Executor::Cpu => {
                let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let b = Packed::rect(ids, bsz, state.pos);
                let mut out = None;
                // on a pool thread, so that the ~150 parallel regions of a
                // step fork from inside the pool instead of each one waking
                // it and putting the calling thread to sleep
                rayon::scope(|_| {
                    out = Some((|| {
                        let h =
                            self.run(&Cpu, false, &b, Some(&mut *state), None, last_only, skip)?;
                        Ok::<_, Error>(StepOut {
                            logits: one(Cpu.linear(&h, &[&self.lm_head])?).to_tensor(bsz)?,
                            hidden: opts.hidden.then(|| h.to_tensor(bsz)).transpose()?,
                        })
                    })())
                });
                out.expect("scope ran")?
            }
        };
        state.pos += t;
        Ok(out)
    }

    /// A pool of at most `capacity` blocks of `block_tokens` tokens for
    /// this model's paged KV caches (`new_state_paged`), in `kv_dtype`.
    /// Errors for models without a plain softmax layer to page.
    pub fn kv_pool(&self, block_tokens: usize, capacity: usize) -> Result<BlockPool> {
        let st = self.new_state(None)?;
        let c = st
            .layers
            .iter()
            .find_map(|l| match &l.mixer {
                MixerState::Kv(c) => c.first(),
                _ => None,
            })
            .ok_or_else(|| Error::msg("a paged KV cache needs a softmax attention layer"))?;
        BlockPool::new(
            self.kv_dtype,
            c.kv_heads(),
            c.head_dim(),
            block_tokens,
            capacity,
        )
    }

    /// Paged KV caches' blocks per token position: one per softmax layer
    /// (sliding-window ones included: paged, they keep every token).
    pub fn paged_layers(&self) -> Result<usize> {
        Ok(self
            .new_state(None)?
            .layers
            .iter()
            .filter(|l| matches!(&l.mixer, MixerState::Kv(_)))
            .count())
    }

    /// A fresh decode state whose softmax layers keep their rows in blocks
    /// of `pool` — sliding-window layers too (every token kept, the band
    /// read), so that a prefix's blocks can be shared by every layer. With
    /// `prefix` (per softmax layer, in order, the blocks of a cached
    /// prefix), the state starts after those tokens.
    pub fn new_state_paged(
        &self,
        pool: &BlockPool,
        prefix: Option<&[Vec<Arc<KvBlock>>]>,
    ) -> Result<DecodeState> {
        if self.cfg.has_encoder() {
            return Err(Error::msg("a paged KV cache is for decoder-only models"));
        }
        let mut st = self.new_state(None)?;
        let mut i = 0;
        let mut pos = 0;
        for l in &mut st.layers {
            if let MixerState::Kv(c) = &mut l.mixer {
                let blocks = prefix.map(|p| p[i].clone()).unwrap_or_default();
                let cache = match c.first().and_then(|c| c.window) {
                    Some(w) => KvCache::paged_window(pool, blocks, w)?,
                    None => KvCache::with_blocks(pool, blocks)?,
                };
                pos = cache.seen;
                *c = vec![cache];
                i += 1;
            }
        }
        if prefix.is_some_and(|p| p.len() != i) {
            return Err(Error::msg(format!(
                "a cached prefix holds {} layers, the model pages {i}",
                prefix.map_or(0, |p| p.len())
            )));
        }
        if pos > 0 && i < st.layers.len() {
            return Err(Error::msg(
                "a cached prefix needs every layer paged (this model has recurrent layers)",
            ));
        }
        st.pos = pos;
        Ok(st)
    }

    /// One step of several independent sequences at once (continuous
    /// batching): sequence i feeds `ids[i]` (a decode token or a chunk of
    /// its prompt) after the `states[i].pos` tokens its state holds. The
    /// tokens are packed end to end on the CPU executor — every linear
    /// map runs once over all of them, attention per sequence over its own
    /// cache — and each state advances by its ids. -> the logits of each
    /// sequence's last token, (n, vocab) row-major.
    pub fn step_many(&self, states: &mut [&mut DecodeState], ids: &[&[u32]]) -> Result<Vec<f32>> {
        Ok(self.step_many_with(states, ids, &[], false, true)?.logits)
    }

    /// As `step_many`, with every position's logits for the sequences
    /// `all[i]` marks (speculative verification: `ids[i].len()` rows for
    /// those, one for the others, in sequence order), and the final hidden
    /// states of the same rows when `hidden`; no logits unless `logits`.
    pub fn step_many_with(
        &self,
        states: &mut [&mut DecodeState],
        ids: &[&[u32]],
        all: &[bool],
        hidden: bool,
        logits: bool,
    ) -> Result<ManyOut> {
        if states.len() != ids.len() {
            return Err(Error::msg("step_many: one id list per state"));
        }
        if ids.iter().any(|x| x.is_empty()) {
            return Err(Error::msg("a decode step needs at least one token"));
        }
        if states.is_empty() {
            return Ok(ManyOut::default());
        }
        let every = |i: usize| all.get(i).copied().unwrap_or(false);
        if self.executor() != Executor::Cpu {
            return Err(Error::msg(
                "batched steps of different sequences run on the CPU executor (f32 or quantized weights on the CPU)",
            ));
        }
        let layers = self.decoder.len();
        if states.iter().any(|s| {
            s.layers.len() != layers
                || s.layers.iter().any(|l| {
                    l.cross_kv.is_some() || !matches!(&l.mixer, MixerState::Kv(c) if c.len() == 1)
                })
        }) {
            return Err(Error::msg(
                "batched steps of different sequences need one KV cache per layer and sequence (softmax attention)",
            ));
        }
        // one state over the batch: layer l holds every sequence's cache,
        // moved in for the step and back out after it (even on an error)
        let mut batch = DecodeState {
            layers: (0..layers)
                .map(|l| LayerState {
                    mixer: MixerState::Kv(
                        states
                            .iter_mut()
                            .map(|s| match &mut s.layers[l].mixer {
                                MixerState::Kv(c) => c.pop().expect("checked: one cache"),
                                _ => unreachable!("checked: KV caches"),
                            })
                            .collect(),
                    ),
                    cross_kv: None,
                })
                .collect(),
            pos: 0,
            memory_padding: None,
        };
        let packed = Packed {
            ids: ids.concat(),
            seqs: states
                .iter()
                .zip(ids)
                .map(|(s, x)| crate::exec::cpu::Span {
                    pos0: s.pos,
                    len: x.len(),
                })
                .collect(),
        };
        let mut out: Option<Result<ManyOut>> = None;
        let last_only = !(0..ids.len()).any(every);
        // on a pool thread, as `step_on`
        rayon::scope(|_| {
            out = Some((|| {
                let mut h = self.run(
                    &Cpu,
                    false,
                    &packed,
                    Some(&mut batch),
                    None,
                    last_only,
                    None,
                )?;
                if !last_only {
                    // every row of the marked sequences, the last of others
                    let w = h.width;
                    let mut keep = vec![];
                    for (i, (r0, sp)) in packed.rows().enumerate() {
                        let from = if every(i) { r0 } else { r0 + sp.len - 1 };
                        keep.extend_from_slice(&h.data[from * w..(r0 + sp.len) * w]);
                    }
                    h = crate::exec::cpu::Rows {
                        data: keep,
                        width: w,
                    };
                }
                let logits = if logits {
                    let mut l = one(Cpu.linear(&h, &[&self.lm_head])?);
                    std::mem::take(&mut l.data)
                } else {
                    vec![]
                };
                Ok(ManyOut {
                    logits,
                    hidden: if hidden { h.data.clone() } else { vec![] },
                })
            })())
        });
        for (l, layer) in batch.layers.into_iter().enumerate() {
            let MixerState::Kv(caches) = layer.mixer else {
                unreachable!("built as KV caches")
            };
            for (s, c) in states.iter_mut().zip(caches) {
                if let MixerState::Kv(v) = &mut s.layers[l].mixer {
                    v.push(c);
                }
            }
        }
        let out = out.expect("scope ran")?;
        for (s, x) in states.iter_mut().zip(ids) {
            s.pos += x.len();
        }
        Ok(out)
    }

    /// Encoder-only models: per-token logits over the vocabulary,
    /// src (b, s) -> (b, s, vocab).
    pub fn encoder_logits(&self, src: &Tensor, padding: Option<&Tensor>) -> Result<Tensor> {
        let m = self.encode(src, padding)?;
        self.logits(&m.hidden)
    }
}
