//! GGUF architectures: each is one small file mapping its metadata onto a
//! `ModelConfig` and naming its tensors. Everything else (the forward pass,
//! the kernels, the caches) is shared: an architecture only chooses model
//! features.
//!
//! To add one: a file with a `config` function and a tensor table, and a
//! line in `ARCHS`.

use super::hf_decoder::HfConfig;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::path::Path;

mod gemma3;
mod llama;
mod phi3;
mod qwen2;
mod qwen3;

/// One architecture: `general.architecture`'s value, the configuration its
/// metadata describes, and its tensor names.
pub struct Arch {
    pub name: &'static str,
    /// The model configuration from the metadata (the shared fields — vocab,
    /// context, tied embeddings — are filled in by the loader).
    pub config: fn(&Meta) -> Result<ModelConfig>,
    /// Names outside the blocks: (file's, attend's).
    pub fixed: &'static [(&'static str, &'static str)],
    /// Names inside block N (`blk.N.` in the file, `decoder.N.` in attend).
    pub block: &'static [(&'static str, &'static str)],
    /// Fused block tensors, split by rows into attend's (Phi-3's qkv and
    /// gate/up): the file's name and attend's parts, in order.
    pub fused: &'static [(&'static str, &'static [&'static str])],
    /// The same family as a Hugging Face folder, if attend reads one.
    pub hf: Option<Hf>,
}

/// An architecture's Hugging Face form: `config.json` and tensor names.
pub struct Hf {
    /// `config.json` `model_type` values.
    pub model_types: &'static [&'static str],
    pub config: fn(&HfConfig, &Path) -> Result<ModelConfig>,
    /// Names outside the blocks, and inside block N (`model.layers.N.`).
    pub fixed: &'static [(&'static str, &'static str)],
    pub block: &'static [(&'static str, &'static str)],
    pub fused: &'static [(&'static str, &'static [&'static str])],
    /// RMSNorm weights stored as w for a scale of 1 + w (Gemma): attend
    /// adds the 1 at load, as llama.cpp's converter does.
    pub norm_plus_one: bool,
}

/// Hugging Face names of the Llama-like families.
pub const HF_FIXED: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "dec_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
];
pub const HF_BLOCK: &[(&str, &str)] = &[
    ("input_layernorm.weight", "ln_1.weight"),
    ("self_attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("self_attn.q_proj.bias", "self_attn.q_proj.bias"),
    ("self_attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("self_attn.k_proj.bias", "self_attn.k_proj.bias"),
    ("self_attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("self_attn.v_proj.bias", "self_attn.v_proj.bias"),
    ("self_attn.q_norm.weight", "self_attn.q_norm.weight"),
    ("self_attn.k_norm.weight", "self_attn.k_norm.weight"),
    ("self_attn.o_proj.weight", "self_attn.o_proj.weight"),
    ("post_attention_layernorm.weight", "ln_2.weight"),
    ("mlp.gate_proj.weight", "ffn.w1.weight"),
    ("mlp.up_proj.weight", "ffn.w3.weight"),
    ("mlp.down_proj.weight", "ffn.w2.weight"),
];

/// The name maps of one format of an architecture: a GGUF file's
/// (`blk.N.`) or a Hugging Face folder's (`model.layers.N.`).
pub struct Names {
    pub prefix: &'static str,
    pub fixed: &'static [(&'static str, &'static str)],
    pub block: &'static [(&'static str, &'static str)],
    pub fused: &'static [(&'static str, &'static [&'static str])],
}

pub static ARCHS: &[&Arch] = &[
    &llama::ARCH,
    &gemma3::ARCH,
    &qwen2::ARCH,
    &qwen3::ARCH,
    &phi3::ARCH,
];

/// The architecture called `name`.
pub fn find(name: &str) -> Option<&'static Arch> {
    ARCHS.iter().copied().find(|a| a.name == name)
}

impl Arch {
    /// The GGUF file's names.
    pub fn gguf_names(&self) -> Names {
        Names {
            prefix: "blk.",
            fixed: self.fixed,
            block: self.block,
            fused: self.fused,
        }
    }

    /// The Hugging Face folder's names, if attend reads one.
    pub fn hf_names(&self) -> Option<Names> {
        self.hf.as_ref().map(|h| Names {
            prefix: "model.layers.",
            fixed: h.fixed,
            block: h.block,
            fused: h.fused,
        })
    }
}

impl Names {
    /// File tensor name → attend parameter name.
    pub fn ours(&self, name: &str) -> Option<String> {
        if let Some((_, o)) = self.fixed.iter().find(|(f, _)| *f == name) {
            return Some(o.to_string());
        }
        let (layer, part) = name.strip_prefix(self.prefix)?.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (_, o) = self.block.iter().find(|(f, _)| *f == part)?;
        Some(format!("decoder.{layer}.{o}"))
    }

    /// A fused file tensor → attend's parameter names and their rows under
    /// `cfg`, in the order the file stacks them.
    pub fn split(&self, name: &str, cfg: &ModelConfig) -> Option<Vec<(String, usize)>> {
        let (layer, part) = name.strip_prefix(self.prefix)?.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (_, parts) = self.fused.iter().find(|(f, _)| *f == part)?;
        let rows = |p: &str| match p {
            "self_attn.q_proj.weight" => cfg.n_heads * cfg.head_dim(),
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => {
                cfg.kv_heads() * cfg.head_dim()
            }
            _ => cfg.d_ff, // the FFN's gate and up maps
        };
        Some(
            parts
                .iter()
                .map(|p| (format!("decoder.{layer}.{p}"), rows(p)))
                .collect(),
        )
    }

    /// attend parameter name → file tensor name (for messages).
    pub fn theirs(&self, ours: &str) -> String {
        if let Some((f, _)) = self.fixed.iter().find(|(_, o)| *o == ours) {
            return f.to_string();
        }
        let found = ours
            .strip_prefix("decoder.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(layer, part)| {
                let f = match self.block.iter().find(|(_, o)| *o == part) {
                    Some((f, _)) => *f,
                    None => self.fused.iter().find(|(_, ps)| ps.contains(&part))?.0,
                };
                Some(format!("{}{layer}.{f}", self.prefix))
            });
        found.unwrap_or_else(|| ours.to_string())
    }
}

/// Typed reads of `<arch>.<key>` metadata; errors name the file and key.
pub struct Meta<'a> {
    pub ct: &'a Content,
    pub path: &'a Path,
    pub arch: &'a str,
}

impl Meta<'_> {
    /// The full key: `<arch>.<key>`.
    pub fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }

    fn value(&self, key: &str) -> Option<&Value> {
        self.ct.metadata.get(&self.key(key))
    }

    /// A count (any unsigned or non-negative integer type).
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| {
            Error::file(
                self.path,
                format!("missing GGUF metadata `{}`", self.key(key)),
            )
        })
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            other => {
                return Err(Error::file(
                    self.path,
                    format!(
                        "GGUF metadata `{}` is not a count: {other:?}",
                        self.key(key)
                    ),
                ))
            }
        };
        Ok(Some(n as usize))
    }

    /// `<arch>.block_count`, bounded by the file: every layer has tensors
    /// of its own, so a count above the file's tensors is refused before
    /// anything per layer is built.
    pub fn layers(&self) -> Result<usize> {
        let n = self.usize("block_count")?;
        let tensors = self.ct.tensor_infos.len();
        if n > tensors {
            return Err(Error::file(
                self.path,
                format!(
                    "`{}` is {n}, but the file holds {tensors} tensors (each layer has its own)",
                    self.key("block_count")
                ),
            ));
        }
        Ok(n)
    }

    /// `attention.value_length`, if given, must be `key` (the heads' width):
    /// values of another width are not supported.
    pub fn same_value_width(&self, key: Option<usize>) -> Result<()> {
        if self
            .opt_usize("attention.value_length")?
            .is_some_and(|v| Some(v) != key)
        {
            return Err(Error::file(
                self.path,
                format!(
                    "`{}` differs from `{}`: heads with values of another width are not supported",
                    self.key("attention.value_length"),
                    self.key("attention.key_length")
                ),
            ));
        }
        Ok(())
    }

    /// A float (f32 or f64), if present.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(other) => Err(Error::file(
                self.path,
                format!(
                    "GGUF metadata `{}` is not a number: {other:?}",
                    self.key(key)
                ),
            )),
        }
    }
}
