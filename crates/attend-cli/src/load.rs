//! Loading a decoder for the run commands (generate, chat, perplexity,
//! bench, kv-sweep, inspect): a GGUF file, or a Hugging Face folder
//! (`config.json` + safetensors), optionally quantized at load.

use anyhow::{bail, Context, Result};
use attend::formats::{gguf, hf_decoder};
use attend::Transformer;
use candle_core::Device;
use clap::Args;
use std::path::Path;

/// A model's weights as the run commands hold them.
#[derive(Args, Clone, Debug, Default)]
pub struct WeightArgs {
    /// Load every weight as f32 instead of keeping quantized matrices
    /// (exact reference numerics; GGUF files).
    #[arg(long, conflicts_with = "quantize")]
    pub dequantize: bool,
    /// Hugging Face folders: hold the weight matrices in this GGUF type,
    /// quantized at load onto the same kernels as a GGUF file's (q4_0,
    /// q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k). Default: f32.
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,
}

/// A decoder and what came with it (tokenizer, chat template).
pub struct Loaded {
    pub model: Transformer,
    pub gguf: gguf::GgufModel,
}

/// A GGUF file or a Hugging Face decoder folder, as `w` says.
pub fn load_model(path: &Path, w: &WeightArgs) -> Result<Loaded> {
    let quant = match w.quantize.as_deref() {
        None => None,
        Some(q) => Some(hf_decoder::quant_type(q).with_context(|| {
            format!(
                "--quantize: unknown type `{q}` (one of {})",
                hf_decoder::QUANT_TYPES
            )
        })?),
    };
    if !path.exists() {
        bail!(
            "{}: model file not found (run scripts/fetch-models?)",
            path.display()
        );
    }
    let g = if path.is_dir() {
        hf_decoder::load(path, quant, &Device::Cpu)?
    } else {
        if quant.is_some() {
            bail!(
                "--quantize: {} is a GGUF file, which keeps its own types (--quantize quantizes a Hugging Face folder at load)",
                path.display()
            );
        }
        gguf::load(path, w.dequantize, &Device::Cpu)?
    };
    let model: Transformer = g.build()?;
    g.store.release_quantized();
    Ok(Loaded { model, gguf: g })
}

/// Whether `dir` is a Hugging Face encoder (BERT) folder rather than a
/// decoder's.
pub fn is_encoder_dir(dir: &Path) -> bool {
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap_or_default();
    v["model_type"].as_str().is_none_or(|t| t == "bert")
}
