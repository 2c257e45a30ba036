//! GGUF (llama.cpp's format): metadata → `ModelConfig`, tensors → the
//! `ParamStore` under attend's names, tokenizer and chat template from the
//! metadata. The file's own metadata is the source of truth; anything attend
//! cannot run is refused here with the reason.

use crate::config::{FfnKind, ModelConfig, NormKind, NormPosition, PositionKind, Shape};
use crate::error::{Error, Result};
use crate::nn::ParamStore;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use std::path::Path;

/// A GGUF model: configuration, weights, and what the metadata says about text.
pub struct GgufModel {
    pub config: ModelConfig,
    pub store: ParamStore,
    pub tokenizer: super::tokenizer::Tokenizer,
    pub chat_template: Option<String>,
    /// Every metadata key with a short rendering of its value (for `inspect`).
    pub metadata: Vec<(String, String)>,
    /// Tensor types held, e.g. {"q4_1": 210, "f32": 61}.
    pub tensor_types: std::collections::BTreeMap<String, usize>,
    /// The file read.
    pub path: std::path::PathBuf,
}

impl GgufModel {
    /// The model this file describes. Strict: every tensor the model needs
    /// must be in the file (none is initialised at random) and every tensor
    /// in the file must be used; either failure names the file's tensor.
    pub fn build(&self) -> Result<crate::model::Transformer> {
        let path = &self.path;
        let layers = self.config.n_decoder_layers;
        let m = crate::model::Transformer::new(&self.config, &self.store).map_err(|e| match e {
            Error::MissingTensor { name, shape } => Error::file(
                path,
                format!(
                    "tensor `{}` is missing (a {layers}-layer model, `llama.block_count`, needs it with shape {shape:?})",
                    gguf_name(&name)
                ),
            ),
            e => e,
        })?;
        let unused = self.store.unused();
        if let Some(first) = unused.first() {
            let more = match unused.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            };
            return Err(Error::file(
                path,
                format!(
                    "tensor `{}`{more} is not used by a {layers}-layer model (`llama.block_count`)",
                    gguf_name(first)
                ),
            ));
        }
        Ok(m)
    }
}

/// attend parameter name → GGUF tensor name (the inverse of `map_name`).
fn gguf_name(ours: &str) -> String {
    let fixed = match ours {
        "embed.weight" => Some("token_embd.weight"),
        "dec_norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return f.to_string();
    }
    let Some((layer, part)) = ours
        .strip_prefix("decoder.")
        .and_then(|r| r.split_once('.'))
    else {
        return ours.to_string();
    };
    let theirs = match part {
        "ln_1.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "ln_2.weight" => "ffn_norm.weight",
        "ffn.w1.weight" => "ffn_gate.weight",
        "ffn.w3.weight" => "ffn_up.weight",
        "ffn.w2.weight" => "ffn_down.weight",
        _ => return ours.to_string(),
    };
    format!("blk.{layer}.{theirs}")
}

fn get<'a>(ct: &'a Content, path: &Path, key: &str) -> Result<&'a Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| Error::file(path, format!("missing GGUF metadata `{key}`")))
}

fn get_usize(ct: &Content, path: &Path, key: &str) -> Result<usize> {
    let v = get(ct, path, key)?;
    let n = match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        other => {
            return Err(Error::file(
                path,
                format!("GGUF metadata `{key}` is not a count: {other:?}"),
            ))
        }
    };
    Ok(n as usize)
}

fn get_f64(ct: &Content, key: &str) -> Option<f64> {
    match ct.metadata.get(key)? {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        _ => None,
    }
}

fn render(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("[{} items]", a.len()),
        Value::String(s) if s.len() > 60 => {
            format!("{:?}…", &s.chars().take(60).collect::<String>())
        }
        other => format!("{other:?}"),
    }
}

/// GGUF tensor name → attend parameter name.
fn map_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("embed.weight"),
        "output_norm.weight" => Some("dec_norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let ours = match part {
        "attn_norm.weight" => "ln_1.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "ln_2.weight",
        "ffn_gate.weight" => "ffn.w1.weight",
        "ffn_up.weight" => "ffn.w3.weight",
        "ffn_down.weight" => "ffn.w2.weight",
        _ => return None,
    };
    Some(format!("decoder.{layer}.{ours}"))
}

/// Read a GGUF file. `dequantize`: hold every weight as f32 (exact reference
/// numerics) instead of keeping quantized matrices for quantized matmul.
pub fn load(path: &Path, dequantize: bool, device: &Device) -> Result<GgufModel> {
    // the header walked strictly first: candle's reader trusts it
    super::gguf_check::check(path)?;
    let mut file =
        std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    let ct = Content::read(&mut file)
        .map_err(|e| Error::file(path, format!("not a valid GGUF file ({})", first_line(&e))))?;
    let arch = get(&ct, path, "general.architecture")?
        .to_string()
        .map_err(|e| Error::file(path, e))?
        .clone();
    if arch != "llama" {
        return Err(Error::file(
            path,
            format!("unsupported architecture `{arch}` (attend runs `llama`)"),
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let n_heads = get_usize(&ct, path, &key("attention.head_count"))?;
    let d_model = get_usize(&ct, path, &key("embedding_length"))?;
    let context = get_usize(&ct, path, &key("context_length"))?;
    if context > crate::config::MAX_POSITIONS {
        return Err(Error::file(
            path,
            format!(
                "`{}` is {context}, more than the {} positions attend supports",
                key("context_length"),
                crate::config::MAX_POSITIONS
            ),
        ));
    }
    let tokenizer = super::tokenizer::Tokenizer::from_gguf(&ct, path)?;
    let config = ModelConfig {
        shape: Shape::Decoder,
        d_model,
        n_encoder_layers: 0,
        n_decoder_layers: get_usize(&ct, path, &key("block_count"))?,
        n_heads,
        n_kv_heads: Some(get_usize(&ct, path, &key("attention.head_count_kv")).unwrap_or(n_heads)),
        d_ff: get_usize(&ct, path, &key("feed_forward_length"))?,
        vocab_size: tokenizer.vocab_size(),
        max_len: context,
        position: PositionKind::Rope,
        rope_theta: get_f64(&ct, &key("rope.freq_base")).unwrap_or(10_000.0),
        ffn: FfnKind::Swiglu,
        norm: NormKind::Rmsnorm,
        norm_position: NormPosition::Pre,
        norm_eps: get_f64(&ct, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        tie_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        bias: false,
        dropout: 0.0,
        scale_embeddings: false,
        rope_interleaved: true,
        ..ModelConfig::default()
    };
    config.validate().map_err(|e| Error::file(path, e))?;
    if let Ok(rd) = get_usize(&ct, path, &key("rope.dimension_count")) {
        if rd != config.head_dim() {
            return Err(Error::file(
                path,
                format!(
                    "partial RoPE ({rd} of {} dims) is not supported",
                    config.head_dim()
                ),
            ));
        }
    }

    // the weights as they will be held: quantized matrices as stored, the
    // rest (and everything under --dequantize) as f32, the embedding both
    let need = ct
        .tensor_infos
        .iter()
        .try_fold(0usize, |acc, (name, info)| {
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))?;
            let stored =
                (elems / info.ggml_dtype.block_size()).checked_mul(info.ggml_dtype.type_size())?;
            let dense = elems.checked_mul(4)?;
            let float = matches!(
                info.ggml_dtype,
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
            );
            let quantized = !float && !dequantize;
            let b = match map_name(name).as_deref() {
                Some("embed.weight") if quantized => dense.checked_add(stored)?,
                _ if quantized && info.shape.dims().len() == 2 => stored,
                _ => dense,
            };
            acc.checked_add(b)
        });
    let what = if dequantize {
        "its weights dequantized to f32 (--dequantize)"
    } else {
        "its weights"
    };
    if let Some(msg) = crate::util::over_limit(what, need) {
        return Err(Error::file(path, msg));
    }
    let store = ParamStore::strict(DType::F32, device.clone());
    let mut tensor_types = std::collections::BTreeMap::new();
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(ours) = map_name(name) else {
            if name.starts_with("rope_") {
                continue; // precomputed RoPE tables; attend computes its own
            }
            return Err(Error::file(
                path,
                format!("unexpected tensor `{name}` for architecture `{arch}`"),
            ));
        };
        let q = ct
            .tensor(&mut file, name, device)
            .map_err(|e| Error::file(path, format!("tensor `{name}`: {}", first_line(&e))))?;
        *tensor_types
            .entry(format!("{:?}", q.dtype()).to_lowercase())
            .or_insert(0) += 1;
        let float = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        let matrix = q.shape().dims().len() == 2;
        if ours == "embed.weight" {
            // the lookup table is dense; a quantized copy serves the tied output
            store.insert([(ours.clone(), q.dequantize(device)?)].into())?;
            if !dequantize && !float {
                store.insert_quantized(&ours, q);
            }
        } else if matrix && !float && !dequantize {
            store.insert_quantized(&ours, q);
        } else {
            store.insert([(ours, q.dequantize(device)?)].into())?;
        }
    }
    let chat_template = ct
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let mut metadata: Vec<(String, String)> = ct
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), render(v)))
        .collect();
    metadata.sort();
    Ok(GgufModel {
        config,
        store,
        tokenizer,
        chat_template,
        metadata,
        tensor_types,
        path: path.to_path_buf(),
    })
}

/// The message of a candle error without the backtrace candle appends when
/// RUST_BACKTRACE is set.
fn first_line(e: &candle_core::Error) -> String {
    e.to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}
