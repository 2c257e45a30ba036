//! Loading a GGUF model for the run commands (generate, chat, perplexity,
//! bench, kv-sweep).

use anyhow::{bail, Result};
use attend::formats::gguf;
use attend::Transformer;
use candle_core::Device;
use std::path::Path;

/// A GGUF file's model and what came with it (tokenizer, chat template).
pub struct Loaded {
    pub model: Transformer,
    pub gguf: gguf::GgufModel,
}

pub fn load_gguf(path: &Path, dequantize: bool) -> Result<Loaded> {
    if !path.exists() {
        bail!(
            "{}: model file not found (run scripts/fetch-models?)",
            path.display()
        );
    }
    let g = gguf::load(path, dequantize, &Device::Cpu)?;
    let model: Transformer = g.build()?;
    g.store.release_quantized();
    Ok(Loaded { model, gguf: g })
}
