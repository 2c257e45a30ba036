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

/// Cheaper models without retraining (issue 15): sublayers dropped,
/// FFNs skipped per token.
#[derive(Args, Clone, Debug, Default)]
pub struct PruneArgs {
    /// Drop sublayers for good: `attn:L,…`, `ffn:L,…`, `layer:L,…` (layers
    /// from 0, ranges A-B; several joined by `;`). A dropped attention
    /// sublayer keeps no KV cache (LLM-Drop, FinerCut).
    #[arg(long, value_name = "SPEC")]
    pub drop: Option<String>,
    /// Drop the K sublayers whose output is most similar to their input
    /// (cosine of the residual stream before and after) on --calibration
    /// text: `attn=K`, `ffn=K`, `layer=K`, comma-separated.
    #[arg(long, value_name = "SPEC", requires = "calibration")]
    pub drop_auto: Option<String>,
    /// UTF-8 text that --drop-auto ranks sublayers on.
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<std::path::PathBuf>,
    /// Tokens of --calibration to rank on (windows of 512).
    #[arg(long, default_value_t = 4096)]
    pub calibration_tokens: usize,
    /// Skip FFNs per token (FFN-SkipLLM): once the residual stream barely
    /// changes across a token's FFN (cosine ≥ threshold) its next FFNs are
    /// skipped; never in the first and last layers or the first `warmup`
    /// positions. `threshold=0.95[,warmup=8]`, or `ratio=0.25` to skip
    /// that share of each token's FFNs (from where it saturates, else as
    /// late as fits).
    #[arg(long, value_name = "SPEC")]
    pub ffn_skip: Option<String>,
}

impl PruneArgs {
    /// Put the drops and the skipping rule on `l`'s model; -> what was
    /// dropped, for the caller to report.
    pub fn apply(&self, l: &mut Loaded) -> Result<Option<String>> {
        use attend::model::prune;
        let layers = l.model.decoder.len();
        let mut drop = match &self.drop {
            Some(s) => prune::parse_drop(s, layers)?,
            None => attend::model::Skip {
                attn: vec![false; layers],
                ffn: vec![false; layers],
            },
        };
        if let Some(spec) = &self.drop_auto {
            let n = prune::parse_drop_auto(spec, layers)?;
            let file = self
                .calibration
                .as_ref()
                .context("--drop-auto needs --calibration FILE")?;
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("--calibration {}: cannot read", file.display()))?;
            let mut ids = l.model_tokens(&text)?;
            ids.truncate(self.calibration_tokens.max(2));
            if ids.len() < 2 {
                bail!("--calibration {}: no text to rank on", file.display());
            }
            let ctx = 512.min(l.model.cfg.max_len);
            let windows: Vec<&[u32]> = ids.chunks(ctx).collect();
            let probe = l.model.probe(&windows)?;
            let auto = prune::auto_drop(&probe, layers, n);
            for i in 0..layers {
                drop.attn[i] |= auto.attn[i];
                drop.ffn[i] |= auto.ffn[i];
            }
        }
        if let Some(s) = &self.ffn_skip {
            l.model.prune.ffn_skip = Some(prune::FfnSkip::parse(s, layers)?);
        }
        let said = describe_drop(&drop);
        l.model.prune.drop = drop;
        Ok(said)
    }
}

/// "attn 3,7; ffn 12" for a drop set, None when empty.
pub fn describe_drop(s: &attend::model::Skip) -> Option<String> {
    let list = |v: &[bool]| {
        v.iter()
            .enumerate()
            .filter(|(_, &d)| d)
            .map(|(i, _)| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let (a, f) = (list(&s.attn), list(&s.ffn));
    let mut parts = vec![];
    if !a.is_empty() {
        parts.push(format!("attn {a}"));
    }
    if !f.is_empty() {
        parts.push(format!("ffn {f}"));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

impl Loaded {
    /// Text -> ids with the special tokens the file asks for (BOS).
    pub fn model_tokens(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.gguf.tokenizer.encode(text, true)?)
    }
}
