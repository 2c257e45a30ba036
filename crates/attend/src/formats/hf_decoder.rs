//! Hugging Face decoders: a folder of `config.json` (its `model_type` picks
//! the architecture file, `arch::*`), one or more memory-mapped
//! `*.safetensors` (f32, f16 or bf16), `tokenizer.json`, and the chat
//! template (`chat_template.jinja` or `tokenizer_config.json`). Weights are
//! held as f32, or quantized at load onto the same kernels as a GGUF file's
//! (`--quantize q8_0|q4_k|…`, as llama.cpp's converter or mistral.rs's
//! in-situ quantization would). The result is the same `GgufModel` a GGUF
//! file gives, so every command that runs one runs these.

use super::arch::ARCHS;
use super::gguf::GgufModel;
use super::hf::read_json;
use super::tokenizer::Tokenizer;
use crate::config::{ModelConfig, NormKind, NormPosition, PositionKind, RopeScaling, Shape};
use crate::error::{Error, Result};
use crate::kernels::quant::QMatrix;
use crate::nn::ParamStore;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The `config.json` fields the Llama-like families share (others ignored).
#[derive(Deserialize, Debug)]
pub struct HfConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    /// transformers < 5: the scaling; ≥ 5: `rope_parameters` (with the base)
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub sliding_window: Option<usize>,
    pub partial_rotary_factor: Option<f64>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    /// Everything else, for the fields one family reads.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// Quantization at load: what `--quantize` names.
pub fn quant_type(name: &str) -> Option<GgmlDType> {
    Some(match name {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q2_k" => GgmlDType::Q2K,
        "q3_k" => GgmlDType::Q3K,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        _ => return None,
    })
}

/// The names `--quantize` takes.
pub const QUANT_TYPES: &str = "q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k";

/// The Llama shape from `config.json`: pre-RMSNorm, SwiGLU, RoPE on halves
/// (Hugging Face's layout), biases as `attention_bias` says, the RoPE base
/// and Llama 3 scaling from `rope_parameters` or `rope_theta` /
/// `rope_scaling`. Architectures adjust what differs.
pub fn base(c: &HfConfig, path: &Path) -> Result<ModelConfig> {
    let bad = |m: String| Error::file(path, m);
    if let Some(act) = c.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(bad(format!(
            "`hidden_act` `{act}` is not supported here (silu)"
        )));
    }
    if c.mlp_bias == Some(true) {
        return Err(bad("`mlp_bias` true is not supported".into()));
    }
    if c.partial_rotary_factor.is_some_and(|f| f != 1.0) {
        return Err(bad(
            "partial RoPE (`partial_rotary_factor` < 1) is not supported".into(),
        ));
    }
    // transformers 5 keeps base and scaling in `rope_parameters`
    let rope = c.rope_parameters.as_ref().or(c.rope_scaling.as_ref());
    let theta = rope
        .and_then(|r| r.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(c.rope_theta)
        .unwrap_or(10_000.0);
    let kind = rope
        .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        rope.and_then(|r| r.get(k))
            .and_then(Value::as_f64)
            .ok_or_else(|| bad(format!("rope scaling `llama3` needs a number `{k}`")))
    };
    let rope_scaling = match kind {
        "default" => None,
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_len: num("original_max_position_embeddings")? as usize,
        }),
        other => {
            return Err(bad(format!(
                "rope scaling `{other}` is not supported (llama3 is)"
            )))
        }
    };
    Ok(ModelConfig {
        shape: Shape::Decoder,
        d_model: c.hidden_size,
        n_encoder_layers: 0,
        n_decoder_layers: c.num_hidden_layers,
        n_heads: c.num_attention_heads,
        n_kv_heads: Some(c.num_key_value_heads.unwrap_or(c.num_attention_heads)),
        head_dim: c.head_dim,
        d_ff: c.intermediate_size,
        vocab_size: c.vocab_size,
        max_len: c.max_position_embeddings,
        position: PositionKind::Rope,
        rope_theta: theta,
        rope_scaling,
        ffn: crate::config::FfnKind::Swiglu,
        norm: NormKind::Rmsnorm,
        norm_position: NormPosition::Pre,
        norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
        bias: false,
        qkv_bias: c.attention_bias.unwrap_or(false),
        dropout: 0.0,
        scale_embeddings: false,
        rope_interleaved: false,
        ..ModelConfig::default()
    })
}

/// The safetensors files of a folder: `model.safetensors`, or the shards
/// `model-0000N-of-0000M.safetensors`, in name order.
fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::file(dir, format!("cannot read the folder ({e})")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::file(dir, "holds no *.safetensors weights"));
    }
    Ok(files)
}

/// A token's id from `tokenizer_config.json` (`"<|im_end|>"` or
/// `{"content": …}`), else `config.json`'s id.
fn special(tok: &Tokenizer, tc: &Value, key: &str, fallback: Option<&Value>) -> Option<u32> {
    let s = match &tc[key] {
        Value::String(s) => Some(s.as_str()),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    };
    s.and_then(|s| tok.token_to_id(s)).or_else(|| {
        let v = fallback?;
        v.as_u64()
            .or_else(|| v.as_array()?.first()?.as_u64())
            .map(|x| x as u32)
    })
}

/// A decoder folder's `tokenizer.json` (no truncation: a decoder scores
/// and continues text of any length its context allows), with BOS and EOS
/// from `tokenizer_config.json` or `config` (`config.json`).
pub fn load_tokenizer(dir: &Path, config: &Value) -> Result<Tokenizer> {
    let mut t = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let tc: Value = read_json(&dir.join("tokenizer_config.json")).unwrap_or(Value::Null);
    t.bos = special(&t, &tc, "bos_token", config.get("bos_token_id"));
    t.eos = special(&t, &tc, "eos_token", config.get("eos_token_id"));
    Ok(t)
}

/// Load the decoder in `dir`; `quantize`: hold its weight matrices in this
/// GGUF type (columns a K-quant cannot tile fall back to q8_0, then f32).
pub fn load(dir: &Path, quantize: Option<GgmlDType>, device: &Device) -> Result<GgufModel> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "model folder not found"));
    }
    let cfg_path = dir.join("config.json");
    let raw: Value = read_json(&cfg_path)?;
    let model_type = match raw.get("model_type") {
        Some(Value::String(t)) => t.clone(),
        Some(_) => return Err(Error::file(&cfg_path, "`model_type` is not a string")),
        None => return Err(Error::file(&cfg_path, "has no `model_type`")),
    };
    let found = ARCHS.iter().find_map(|a| {
        let h = a.hf.as_ref()?;
        h.model_types
            .contains(&model_type.as_str())
            .then_some((*a, h))
    });
    let Some((arch, hf)) = found else {
        let known: Vec<&str> = ARCHS
            .iter()
            .filter_map(|a| a.hf.as_ref())
            .flat_map(|h| h.model_types.iter().copied())
            .collect();
        return Err(Error::file(
            &cfg_path,
            format!(
                "unsupported `model_type` `{model_type}` (attend runs {} decoders, and `bert` encoders)",
                known.join(", ")
            ),
        ));
    };
    let c: HfConfig = read_json(&cfg_path)?;
    let files = weight_files(dir)?;
    // Safety: the files are mapped read-only and not modified while mapped.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| Error::file(dir, format!("not valid safetensors files ({e})")))?;
    let tensors = st.tensors();
    let mut config = ModelConfig {
        tie_embeddings: !tensors.iter().any(|(n, _)| n == "lm_head.weight"),
        ..(hf.config)(&c, &cfg_path)?
    };
    let tokenizer = load_tokenizer(dir, &raw)?;
    config.vocab_size = config.vocab_size.max(tokenizer.vocab_size());
    config.validate().map_err(|e| match e {
        // the check names attend's field; say config.json's
        Error::Config { field, msg } => Error::file(
            &cfg_path,
            format!("`{}` {}", hf_key(&field), hf_keys_in(&msg)),
        ),
        e => Error::file(&cfg_path, e),
    })?;

    // every weight as f32, or its matrices in the quantized type
    let need = tensors.iter().try_fold(0usize, |acc, (_, v)| {
        let n = v
            .shape()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))?;
        let b = match quantize {
            Some(q) if v.shape().len() == 2 => n / q.block_size() * q.type_size(),
            _ => n.checked_mul(4)?,
        };
        acc.checked_add(b)
    });
    if let Some(msg) = crate::util::over_limit("its weights", need) {
        return Err(Error::file(dir, msg));
    }
    let store = ParamStore::strict(DType::F32, device.clone());
    let mut tensor_types = BTreeMap::new();
    let names = arch.hf_names().expect("found by its Hugging Face form");
    for (name, _) in &tensors {
        let parts: Vec<(String, Option<usize>)> =
            match (names.split(name, &config), names.ours(name)) {
                (Some(p), _) => p.into_iter().map(|(o, r)| (o, Some(r))).collect(),
                (None, Some(o)) => vec![(o, None)],
                // RoPE's frequencies (attend computes its own)
                (None, None) if name.ends_with("rotary_emb.inv_freq") => continue,
                (None, None) => {
                    return Err(Error::file(
                        dir,
                        format!("unexpected tensor `{name}` for `model_type` `{model_type}`"),
                    ))
                }
            };
        let bad = |e: String| Error::file(dir, format!("tensor `{name}`: {e}"));
        let t = st.load(name, device).map_err(|e| bad(e.to_string()))?;
        if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(bad(format!(
                "type {:?} is not supported (f32, f16, bf16)",
                t.dtype()
            )));
        }
        let t = t.to_dtype(DType::F32)?;
        let dims = t.dims().to_vec();
        let rows = dims.first().copied().unwrap_or(0);
        let want: usize = parts.iter().map(|(_, r)| r.unwrap_or(rows)).sum();
        if parts.len() > 1 && (dims.len() != 2 || want != rows) {
            return Err(bad(format!(
                "has shape {dims:?}; config.json's heads and intermediate_size need {want} rows"
            )));
        }
        let mut r0 = 0;
        let mut held = "f32".to_string();
        for (ours, n) in parts {
            let part = match n {
                Some(n) => t.narrow(0, r0, n)?.contiguous()?,
                None => t.clone(),
            };
            r0 += n.unwrap_or(0);
            // Gemma's RMSNorm scales by 1 + w
            let is_norm = ours.ends_with("norm.weight") || ours.contains(".ln_");
            let part = if hf.norm_plus_one && is_norm {
                (part + 1.0)?
            } else {
                part
            };
            // norms and biases stay f32; matrices take the quantized type
            // (a K-quant needs columns in 256s: else q8_0, else f32)
            let q = quantize.filter(|_| part.dims().len() == 2).and_then(|q| {
                let cols = part.dims()[1];
                [q, GgmlDType::Q8_0]
                    .into_iter()
                    .find(|q| cols % q.block_size() == 0 && cols % 32 == 0)
            });
            match q {
                Some(q) => {
                    // (a fresh tensor: candle's quantize reads a narrowed
                    // tensor's storage from its start, not its offset)
                    let rows: Vec<f32> = part.flatten_all()?.to_vec1()?;
                    let part = candle_core::Tensor::from_vec(rows, part.dims(), device)?;
                    let qt = QTensor::quantize(&part, q).map_err(|e| bad(e.to_string()))?;
                    let m = QMatrix::from_qtensor(&qt).map_err(|e| bad(e.to_string()))?;
                    held = format!("{q:?}").to_lowercase();
                    store.insert_quantized(&ours, m);
                }
                None => store.insert([(ours, part)].into())?,
            }
        }
        // counted per file tensor, as for GGUF
        *tensor_types.entry(held).or_insert(0) += 1;
    }
    let chat_template = std::fs::read_to_string(dir.join("chat_template.jinja"))
        .ok()
        .or_else(|| {
            let tc: Value = read_json(&dir.join("tokenizer_config.json")).ok()?;
            tc["chat_template"].as_str().map(str::to_string)
        });
    let metadata = match &raw {
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| (format!("config.{k}"), v.to_string()))
            .collect(),
        _ => vec![],
    };
    Ok(GgufModel {
        config,
        store,
        tokenizer,
        chat_template,
        metadata,
        tensor_types,
        path: dir.to_path_buf(),
        arch,
        hf: true,
        sampling: recommended_sampling(dir),
    })
}

/// generation_config.json's sampling over llama.cpp's defaults (greedy
/// when it says `do_sample: false`), if the folder has one.
fn recommended_sampling(dir: &Path) -> Option<crate::decode::SamplingParams> {
    let g: Value = read_json(&dir.join("generation_config.json")).ok()?;
    let d = crate::decode::SamplingParams::llama_cpp();
    let num = |k: &str| g.get(k).and_then(Value::as_f64);
    let p = crate::decode::SamplingParams {
        temperature: match g.get("do_sample").and_then(Value::as_bool) {
            Some(false) => 0.0,
            _ => num("temperature").unwrap_or(d.temperature),
        },
        top_k: num("top_k").map_or(d.top_k, |x| x as usize),
        top_p: num("top_p").unwrap_or(d.top_p),
        min_p: num("min_p").unwrap_or(d.min_p),
        repeat_penalty: num("repetition_penalty").unwrap_or(d.repeat_penalty),
        ..d
    };
    p.validate().is_ok().then_some(p)
}

/// config.json's name for a `ModelConfig` field (for messages).
fn hf_key(field: &str) -> &str {
    match field {
        "d_model" => "hidden_size",
        "n_decoder_layers" => "num_hidden_layers",
        "n_heads" => "num_attention_heads",
        "n_kv_heads" => "num_key_value_heads",
        "d_ff" => "intermediate_size",
        "max_len" => "max_position_embeddings",
        "norm_eps" => "rms_norm_eps",
        "rope_theta" => "rope_theta` / `rope_parameters",
        "rope_scaling" => "rope_parameters` / `rope_scaling",
        other => other,
    }
}

/// `msg` with every `ModelConfig` field name in it spelled as config.json's.
fn hf_keys_in(msg: &str) -> String {
    let mut out = String::new();
    let mut word = String::new();
    for c in msg.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            out.push_str(hf_key(&word));
            word.clear();
            out.push(c);
        }
    }
    out.pop();
    out
}
