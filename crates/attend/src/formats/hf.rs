//! Hugging Face encoders: `config.json` + memory-mapped `model.safetensors`
//! (BERT) mapped onto attend's encoder, `tokenizer.json`, and the
//! sentence-transformers pooling config (mean over tokens, L2 normalise).

use super::tokenizer::Tokenizer;
use crate::config::{FfnKind, ModelConfig, NormKind, NormPosition, PositionKind, Shape};
use crate::error::{Error, Result};
use crate::nn::ParamStore;
use crate::Transformer;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Deserialize)]
struct BertConfig {
    model_type: Option<String>,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    hidden_act: String,
    max_position_embeddings: usize,
    vocab_size: usize,
    layer_norm_eps: f64,
    #[serde(default)]
    position_embedding_type: Option<String>,
}

/// A JSON file as `T`; errors name the file and the field.
pub(super) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::file(path, format!("cannot read ({e})")))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de)
        .map_err(|e| Error::file(path, format!("field `{}`: {}", e.path(), e.inner())))
}

/// BERT `config.json` → ModelConfig.
fn bert_config(path: &Path) -> Result<ModelConfig> {
    let c: BertConfig = read_json(path)?;
    if let Some(t) = &c.model_type {
        if t != "bert" {
            return Err(Error::file(
                path,
                format!("unsupported model_type `{t}` (attend runs `bert` encoders)"),
            ));
        }
    }
    if c.position_embedding_type
        .as_deref()
        .is_some_and(|p| p != "absolute")
    {
        return Err(Error::file(
            path,
            "only absolute position embeddings are supported",
        ));
    }
    let ffn = match c.hidden_act.as_str() {
        "gelu" => FfnKind::Gelu,
        "relu" => FfnKind::Relu,
        other => {
            return Err(Error::file(
                path,
                format!("unsupported hidden_act `{other}`"),
            ))
        }
    };
    let cfg = ModelConfig {
        shape: Shape::Encoder,
        d_model: c.hidden_size,
        n_encoder_layers: c.num_hidden_layers,
        n_decoder_layers: 0,
        n_heads: c.num_attention_heads,
        n_kv_heads: None,
        d_ff: c.intermediate_size,
        vocab_size: c.vocab_size,
        max_len: c.max_position_embeddings,
        position: PositionKind::Learned,
        ffn,
        norm: NormKind::Layernorm,
        norm_position: NormPosition::Post,
        norm_eps: c.layer_norm_eps,
        tie_embeddings: true,
        bias: true,
        scale_embeddings: false,
        embed_norm: true,
        ..ModelConfig::default()
    };
    cfg.validate().map_err(|e| Error::file(path, e))?;
    Ok(cfg)
}

/// HF BERT tensor name → attend parameter name (None: not used).
fn map_name(name: &str) -> Option<String> {
    let name = name.strip_prefix("bert.").unwrap_or(name);
    let fixed = match name {
        "embeddings.word_embeddings.weight" => Some("embed.weight"),
        "embeddings.position_embeddings.weight" => Some("pos_enc.weight"),
        "embeddings.LayerNorm.weight" => Some("embed_norm.weight"),
        "embeddings.LayerNorm.bias" => Some("embed_norm.bias"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("encoder.layer.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = part.rsplit_once('.')?;
    let ours = match module {
        "attention.self.query" => "self_attn.q_proj",
        "attention.self.key" => "self_attn.k_proj",
        "attention.self.value" => "self_attn.v_proj",
        "attention.output.dense" => "self_attn.o_proj",
        "attention.output.LayerNorm" => "ln_1",
        "intermediate.dense" => "ffn.w1",
        "output.dense" => "ffn.w2",
        "output.LayerNorm" => "ln_2",
        _ => return None,
    };
    Some(format!("encoder.{layer}.{ours}.{param}"))
}

/// `dir/tokenizer.json`, truncating at the sentence-transformers
/// `max_seq_length` (else `max_len`) and without the file's fixed padding
/// (batches are padded to their longest input instead).
pub fn load_tokenizer(dir: &Path, max_len: usize) -> Result<(Tokenizer, usize)> {
    let max_seq_length =
        match read_json::<serde_json::Value>(&dir.join("sentence_bert_config.json")) {
            Ok(v) => v["max_seq_length"].as_u64().map_or(max_len, |m| m as usize),
            Err(_) => max_len,
        }
        .min(max_len);
    let mut tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    tokenizer.inner.with_padding(None);
    let trunc = tokenizers::TruncationParams {
        max_length: max_seq_length,
        ..Default::default()
    };
    tokenizer
        .inner
        .with_truncation(Some(trunc))
        .map_err(|e| Error::msg(format!("tokenizer: {e}")))?;
    Ok((tokenizer, max_seq_length))
}

/// A sentence-embedding model: BERT encoder, tokenizer, pooling.
pub struct Embedder {
    pub model: Transformer,
    pub tokenizer: Tokenizer,
    /// Longest input in tokens; longer inputs are truncated.
    pub max_seq_length: usize,
    pub normalize: bool,
}

impl Embedder {
    /// Load a directory holding config.json, model.safetensors, tokenizer.json
    /// and (optionally) the sentence-transformers configs.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "model directory not found"));
        }
        let cfg = bert_config(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(Error::file(&weights, "file not found"));
        }
        // Safety: the file is mapped read-only and not modified while mapped.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&weights) }
            .map_err(|e| Error::file(&weights, format!("not a valid safetensors file ({e})")))?;
        // every tensor is held as f32
        let need = st.tensors().iter().try_fold(0usize, |acc, (_, v)| {
            let n = v
                .shape()
                .iter()
                .try_fold(4usize, |n, &d| n.checked_mul(d))?;
            acc.checked_add(n)
        });
        if let Some(msg) = crate::util::over_limit("its weights in f32", need) {
            return Err(Error::file(&weights, msg));
        }
        let mut tensors = BTreeMap::new();
        let mut token_type: Option<Tensor> = None;
        for (name, _) in st.tensors() {
            let load = || {
                st.load(&name, device)
                    .map_err(|e| Error::file(&weights, format!("tensor `{name}`: {e}")))
            };
            if name.ends_with("embeddings.token_type_embeddings.weight") {
                token_type = Some(load()?);
            } else if let Some(ours) = map_name(&name) {
                tensors.insert(ours, load()?.to_dtype(DType::F32)?);
            }
        }
        // Every input is one segment (token type 0): fold its embedding into
        // the position table, which the model adds to every token anyway.
        if let (Some(tt), Some(pos)) = (token_type, tensors.get("pos_enc.weight")) {
            let folded = pos.broadcast_add(&tt.to_dtype(DType::F32)?.narrow(0, 0, 1)?)?;
            tensors.insert("pos_enc.weight".into(), folded);
        }
        let store = ParamStore::strict(DType::F32, device.clone());
        store.insert(tensors)?;
        let model = Transformer::new(&cfg, &store).map_err(|e| match e {
            Error::MissingTensor { name, shape } => Error::file(
                &weights,
                format!("is missing `{name}` (shape {shape:?}) that the config.json model needs"),
            ),
            Error::ShapeMismatch { name, found, want } => Error::file(
                &weights,
                format!(
                    "tensor for `{name}` has shape {found:?}; the config.json model needs {want:?}"
                ),
            ),
            e => e,
        })?;
        if let Some(first) = store.unused().first() {
            return Err(Error::file(
                &weights,
                format!(
                    "holds `{first}`, which a {}-layer model (config.json `num_hidden_layers`) does not use",
                    cfg.n_encoder_layers
                ),
            ));
        }
        let (tokenizer, max_seq_length) = load_tokenizer(dir, cfg.max_len)?;
        // sentence-transformers lists its pipeline in modules.json; without
        // one, normalise (what the all-* sentence models do)
        let normalize = match read_json::<serde_json::Value>(&dir.join("modules.json")) {
            Ok(v) => v.as_array().is_some_and(|m| {
                m.iter()
                    .any(|x| x["type"].as_str().is_some_and(|t| t.ends_with("Normalize")))
            }),
            Err(_) => true,
        };
        Ok(Self {
            model,
            tokenizer,
            max_seq_length,
            normalize,
        })
    }

    /// Token ids as the model sees them ([CLS] … [SEP], truncated).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, true)
    }

    /// Embed texts in batches of `batch_size` (sorted by length so that each
    /// batch pads little); returns one vector per text, in input order.
    pub fn embed(&self, texts: &[String], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        self.embed_on(self.model.executor(), texts, batch_size)
    }

    /// `embed` on the given executor.
    pub fn embed_on(
        &self,
        exec: crate::model::Executor,
        texts: &[String],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let encoded = texts
            .iter()
            .map(|t| self.token_ids(t))
            .collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].len()));
        let mut out = vec![vec![]; texts.len()];
        // packed on the CPU executor (no padding), so length order does not
        // matter for cost there; it keeps the graph executor's padding small
        let d = self.model.cfg.d_model;
        for chunk in order.chunks(batch_size.max(1)) {
            let seqs: Vec<&[u32]> = chunk.iter().map(|&i| &encoded[i][..]).collect();
            let hidden = self.model.encode_packed_on(exec, &seqs)?;
            let mut start = 0;
            for (&i, s) in chunk.iter().zip(&seqs) {
                out[i] = self.pool_rows(&hidden[start * d..(start + s.len()) * d], d);
                start += s.len();
            }
        }
        Ok(out)
    }

    /// sentence-transformers pooling of one sequence's rows: the mean over
    /// its tokens, then (if configured) L2 normalisation. rows (len, d) -> (d)
    fn pool_rows(&self, rows: &[f32], d: usize) -> Vec<f32> {
        let n = rows.len() / d;
        let mut mean = vec![0f32; d];
        for row in rows.chunks_exact(d) {
            mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
        }
        let count = (n as f32).max(1e-9);
        mean.iter_mut().for_each(|m| *m /= count);
        if self.normalize {
            let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            mean.iter_mut().for_each(|m| *m /= norm);
        }
        mean
    }
}
