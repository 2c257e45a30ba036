//! The Transformer: one definition for encoder-only, decoder-only and
//! encoder–decoder models. A block is token mixing (self-attention, plus
//! cross-attention in an encoder–decoder's decoder) and a channel mixer (FFN),
//! each wrapped in a residual and a norm placed before (`pre`) or after
//! (`post`, as in the paper) the sublayer.

use crate::attention::Attention;
use crate::cache::{DecodeState, LayerState};
use crate::config::{MechanismConfig, ModelConfig, NormPosition, PositionKind};
use crate::error::{Error, Result};
use crate::ffn::Ffn;
use crate::nn::{Builder, Dropout, Embedding, Linear, ParamStore, Weight};
use crate::norm::Norm;
use crate::position::{Additive, Rope};
use candle_core::Tensor;
use std::sync::Arc;

/// Encoder output as the decoder sees it.
#[derive(Clone, Debug)]
pub struct Memory {
    /// (b, s, d)
    pub hidden: Tensor,
    /// (b, s), 1 = token, 0 = padding
    pub padding: Option<Tensor>,
}

#[derive(Clone, Debug)]
pub struct Block {
    pub ln_1: Norm,
    pub self_attn: Attention,
    pub ln_cross: Option<Norm>,
    pub cross_attn: Option<Attention>,
    pub ln_2: Norm,
    pub ffn: Ffn,
    norm_position: NormPosition,
    dropout: Dropout,
}

impl Block {
    fn new(
        vb: &Builder,
        cfg: &ModelConfig,
        mechanism: &MechanismConfig,
        causal: bool,
        cross: bool,
        rope: Option<Arc<Rope>>,
        dropout: Dropout,
    ) -> Result<Self> {
        let norm = |name: &str| Norm::new(&vb.pp(name), cfg.norm, cfg.d_model, cfg.norm_eps);
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
            ffn: Ffn::new(&vb.pp("ffn"), cfg)?,
            norm_position: cfg.norm_position,
            dropout,
        })
    }

    /// x + f(norm(x)) for pre-norm, norm(x + f(x)) for post-norm.
    fn sublayer(
        &self,
        x: &Tensor,
        norm: &Norm,
        f: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match self.norm_position {
            NormPosition::Pre => Ok((x + self.dropout.forward(&f(&norm.forward(x)?)?)?)?),
            NormPosition::Post => norm.forward(&(x + self.dropout.forward(&f(x)?)?)?),
        }
    }

    /// x: (b, t, d) at positions offset..offset+t -> (b, t, d).
    /// `cross_kv`: the encoder memory's keys/values for this layer.
    fn forward(
        &self,
        x: &Tensor,
        offset: usize,
        key_padding: Option<&Tensor>,
        state: Option<&mut crate::attention::MixerState>,
        cross_kv: Option<&(Tensor, Tensor)>,
        memory_padding: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = self.sublayer(x, &self.ln_1, |h| {
            self.self_attn.forward(h, offset, key_padding, state)
        })?;
        let x = match (&self.cross_attn, &self.ln_cross, cross_kv) {
            (Some(attn), Some(ln), Some(kv)) => {
                self.sublayer(&x, ln, |h| attn.cross(h, kv, memory_padding))?
            }
            (Some(_), _, _) => {
                return Err(Error::msg(
                    "encoder–decoder model called without encoder memory",
                ))
            }
            _ => x,
        };
        self.sublayer(&x, &self.ln_2, |h| self.ffn.forward(h))
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
    /// The fused CPU form of this model's decoder, when it qualifies
    /// (`exec::decoder`); batch-1 decode states use it. `None` forces the
    /// composed path.
    pub fused: Option<Arc<crate::exec::decoder::FusedDecoder>>,
    /// What the fused path's KV cache stores keys and values in (`--kv-dtype`).
    pub kv_dtype: crate::kernels::kv::KvDType,
}

impl Transformer {
    /// Build the model, taking tensors already in `store` (a checkpoint) and
    /// initialising the rest from the store's seeded RNG.
    pub fn new(cfg: &ModelConfig, store: &ParamStore) -> Result<Self> {
        cfg.validate()?;
        let vb = store.builder();
        let dropout = Dropout::new(cfg.dropout);
        let rope = (cfg.position == PositionKind::Rope)
            .then(|| {
                Rope::new(
                    cfg.head_dim(),
                    cfg.max_len,
                    cfg.rope_theta,
                    store.dtype,
                    &store.device,
                )
            })
            .transpose()?
            .map(|mut r| {
                r.interleaved = cfg.rope_interleaved;
                Arc::new(r)
            });
        let pre = cfg.norm_position == NormPosition::Pre;
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
        let stack = |name: &str, n: usize, causal: bool, cross: bool| -> Result<Vec<Block>> {
            (0..n)
                .map(|i| {
                    Block::new(
                        &vb.pp(name).pp(i),
                        cfg,
                        cfg.layer_mechanism(name == "encoder", i),
                        causal,
                        cross,
                        rope.clone(),
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
        let mut model = Self {
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
                // a quantized copy of the embedding (GGUF) keeps the output
                // projection quantized; otherwise share the dense table
                let w = vb
                    .pp("embed")
                    .quantized("weight", &[cfg.vocab_size, cfg.d_model])?;
                Linear {
                    w: w.unwrap_or(Weight::Dense(embed.table.clone())),
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
            fused: None,
            kv_dtype: Default::default(),
        };
        model.fused = crate::exec::decoder::FusedDecoder::from_model(&model).map(Arc::new);
        Ok(model)
    }

    /// The encoder's additive positions (table or none).
    pub fn pos_enc(&self) -> &Additive {
        &self.pos_enc
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

    /// ids (b, t) at positions offset.. -> (b, t, d): √d_model-scaled token
    /// embeddings plus additive positions, with dropout.
    fn embed_tokens(&self, ids: &Tensor, offset: usize, pos: &Additive) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if offset + t > self.cfg.max_len {
            return Err(Error::msg(format!(
                "sequence of {} tokens exceeds the model's max_len {}",
                offset + t,
                self.cfg.max_len
            )));
        }
        let mut x = self.embed.forward(ids)?;
        if self.cfg.scale_embeddings {
            x = (x * (self.cfg.d_model as f64).sqrt())?;
        }
        let mut x = pos.forward(&x, offset)?;
        if let Some(n) = &self.embed_norm {
            x = n.forward(&x)?;
        }
        self.dropout.forward(&x)
    }

    /// src (b, s) u32, padding (b, s) 1 = token -> memory (b, s, d)
    pub fn encode(&self, src: &Tensor, padding: Option<&Tensor>) -> Result<Memory> {
        if self.encoder.is_empty() {
            return Err(Error::msg("this model has no encoder"));
        }
        let mut x = self.embed_tokens(src, 0, &self.pos_enc)?;
        for block in &self.encoder {
            x = block.forward(&x, 0, padding, None, None, None)?;
        }
        if let Some(n) = &self.enc_norm {
            x = n.forward(&x)?;
        }
        Ok(Memory {
            hidden: x,
            padding: padding.cloned(),
        })
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
        if self.decoder.is_empty() {
            return Err(Error::msg("this model has no decoder"));
        }
        let mut x = self.embed_tokens(tgt, 0, &self.pos_dec)?;
        for block in &self.decoder {
            let kv = match (&block.cross_attn, memory) {
                (Some(attn), Some(m)) => Some(attn.memory_kv(&m.hidden)?),
                _ => None,
            };
            x = block.forward(
                &x,
                0,
                None,
                None,
                kv.as_ref(),
                memory.and_then(|m| m.padding.as_ref()),
            )?;
        }
        if let Some(n) = &self.dec_norm {
            x = n.forward(&x)?;
        }
        Ok(x)
    }

    /// A fresh decode state for `batch` sequences (cross-attention keys and
    /// values of `memory` computed once here).
    pub fn new_state(&self, memory: Option<&Memory>) -> Result<DecodeState> {
        let layers = self
            .decoder
            .iter()
            .map(|b| {
                Ok(LayerState {
                    mixer: b.self_attn.new_state(),
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
            fused: self.fused.as_ref().map(|f| f.new_state(self.kv_dtype)),
        })
    }

    /// A batch-1 decode state whose KV caches follow an eviction `policy`
    /// (`cache::policy`); `retrieval[layer][kv_head]` marks the heads that
    /// keep everything under RazorAttention (`cache::policy::retrieval_heads`).
    pub fn new_state_with_policy(
        &self,
        policy: &crate::cache::policy::KvPolicy,
        retrieval: Option<&[Vec<bool>]>,
    ) -> Result<DecodeState> {
        use crate::cache::policy::{PolicyCache, RopeTables};
        if self.cfg.has_encoder() {
            return Err(Error::msg("KV-cache policies apply to decoder-only models"));
        }
        let mut st = self.new_state(None)?;
        if let Some(f) = &self.fused {
            st.fused = Some(f.new_policy_state(policy, retrieval));
            return Ok(st);
        }
        // the composed path: every softmax layer's cache follows the policy
        // (other mechanisms keep their own fixed-size state)
        let c = &self.cfg;
        let rope = (c.position == PositionKind::Rope).then(|| {
            Arc::new(RopeTables::new(
                c.head_dim(),
                c.max_len,
                c.rope_theta,
                c.rope_interleaved,
            ))
        });
        // retrieval[i] belongs to the i-th softmax layer
        let mut i = 0;
        for (l, ls) in st.layers.iter_mut().enumerate() {
            if *c.layer_mechanism(false, l) == MechanismConfig::Softmax {
                let r = retrieval.and_then(|r| r.get(i)).map_or(&[][..], |r| r);
                i += 1;
                ls.mixer = crate::attention::MixerState::Policy(PolicyCache::new(
                    policy,
                    c.kv_heads(),
                    c.head_dim(),
                    rope.clone(),
                    r,
                ));
            }
        }
        Ok(st)
    }

    /// Incremental decoding: feed ids (b, t) after the `state.pos` tokens
    /// already in the state -> logits (b, t, vocab); the state advances by t.
    pub fn step(&self, ids: &Tensor, state: &mut DecodeState) -> Result<Tensor> {
        self.logits(&self.step_hidden(ids, state, false)?)
    }

    /// As `step`, but only the last position's logits: (b, vocab). What
    /// generation needs; a 512-token prefill then projects one row, not 512.
    pub fn step_last(&self, ids: &Tensor, state: &mut DecodeState) -> Result<Tensor> {
        let h = self.step_hidden(ids, state, true)?;
        let t = h.dim(1)?;
        self.logits(&h.narrow(1, t - 1, 1)?)?
            .squeeze(1)
            .map_err(Into::into)
    }

    /// The decoder's final hidden states for ids (b, t) fed after the state
    /// (b, t, d); the fused path gives only the last position's when
    /// `last_only` is set, (1, 1, d).
    fn step_hidden(
        &self,
        ids: &Tensor,
        state: &mut DecodeState,
        last_only: bool,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if let (Some(f), Some(kv)) = (&self.fused, &mut state.fused) {
            if b == 1 {
                let h = f.forward(&ids.flatten_all()?.to_vec1()?, kv, last_only)?;
                state.pos += t;
                return Ok(h);
            }
            if state.pos > 0 {
                return Err(Error::msg(
                    "a batch-1 decode state cannot continue with a larger batch",
                ));
            }
            state.fused = None; // a batch: the composed path
        }
        let offset = state.pos;
        let mut x = self.embed_tokens(ids, offset, &self.pos_dec)?;
        let padding = state.memory_padding.clone();
        for (block, ls) in self.decoder.iter().zip(state.layers.iter_mut()) {
            x = block.forward(
                &x,
                offset,
                None,
                Some(&mut ls.mixer),
                ls.cross_kv.as_ref(),
                padding.as_ref(),
            )?;
        }
        if let Some(n) = &self.dec_norm {
            x = n.forward(&x)?;
        }
        state.pos += t;
        Ok(x)
    }

    /// Encoder-only models: per-token logits over the vocabulary,
    /// src (b, s) -> (b, s, vocab).
    pub fn encoder_logits(&self, src: &Tensor, padding: Option<&Tensor>) -> Result<Tensor> {
        let m = self.encode(src, padding)?;
        self.logits(&m.hidden)
    }
}
