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
    #[arg(long)]
    pub dequantize: bool,
    /// Hold the weight matrices in another type. Hugging Face folders:
    /// a GGUF type, quantized at load onto the same kernels as a GGUF
    /// file's (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k).
    /// Float weights (a Hugging Face folder, or a GGUF file with
    /// --dequantize): `int8`, vector-wise int8 (a scale per activation row
    /// and per output), or `llm-int8[:threshold=6]`, LLM.int8() — the
    /// activation columns with |x| > threshold kept out of int8, in f32
    /// against a 16-bit copy of the weights. The embedding and output
    /// projection keep their type. Default: f32.
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,
}

/// `--quantize int8` or `llm-int8[:threshold=T]` -> the int8 mode.
fn int8_mode(q: &str) -> Result<Option<attend::nn::Int8Mode>> {
    use attend::nn::Int8Mode;
    if q == "int8" {
        return Ok(Some(Int8Mode::Plain));
    }
    let Some(rest) = q.strip_prefix("llm-int8") else {
        return Ok(None);
    };
    let threshold = match rest.strip_prefix(':') {
        None if rest.is_empty() => 6.0,
        Some(kv) => {
            let v = kv
                .strip_prefix("threshold=")
                .with_context(|| format!("--quantize {q}: expected llm-int8:threshold=T"))?;
            let t: f32 = v
                .parse()
                .ok()
                .filter(|t: &f32| t.is_finite() && *t >= 0.0)
                .with_context(|| format!("--quantize {q}: the threshold must be a number ≥ 0"))?;
            t
        }
        None => bail!("--quantize {q}: unknown type (int8, llm-int8[:threshold=T] or a GGUF type)"),
    };
    Ok(Some(Int8Mode::LlmInt8 { threshold }))
}

/// A decoder and what came with it (tokenizer, chat template).
pub struct Loaded {
    pub model: Transformer,
    pub gguf: gguf::GgufModel,
}

/// A GGUF file or a Hugging Face decoder folder, as `w` says.
pub fn load_model(path: &Path, w: &WeightArgs) -> Result<Loaded> {
    let int8 = match w.quantize.as_deref() {
        Some(q) => int8_mode(q)?,
        None => None,
    };
    let quant = match w.quantize.as_deref() {
        None => None,
        Some(_) if int8.is_some() => None,
        Some(q) => Some(hf_decoder::quant_type(q).with_context(|| {
            format!(
                "--quantize: unknown type `{q}` (int8, llm-int8[:threshold=T], or one of {})",
                hf_decoder::QUANT_TYPES
            )
        })?),
    };
    if w.dequantize && quant.is_some() {
        bail!("--dequantize loads f32 weights; --quantize {} would quantize them again (int8 and llm-int8 start from --dequantize's f32)", w.quantize.as_deref().unwrap_or_default());
    }
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
    let mut model: Transformer = g.build()?;
    g.store.release_quantized();
    if let Some(mode) = int8 {
        let q = w.quantize.as_deref().unwrap_or_default();
        model.quantize_int8(mode).map_err(|e| {
            let hint = if path.is_dir() {
                ""
            } else {
                " (add --dequantize to start from f32)"
            };
            anyhow::anyhow!("--quantize {q}: {}: {e}{hint}", path.display())
        })?;
    }
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
