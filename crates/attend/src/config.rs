//! The model configuration: one struct that describes every model shape attend
//! builds, loaded from JSON and validated before any tensor is made.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which stacks the model has.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// Bidirectional encoder only (BERT).
    Encoder,
    /// Causal decoder only (GPT, Llama).
    Decoder,
    /// The original Transformer: encoder + decoder with cross-attention.
    EncoderDecoder,
}

/// How positions enter the model.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PositionKind {
    /// Fixed sin/cos table added to the embeddings (Vaswani et al. 2017).
    Sinusoidal,
    /// A learned table added to the embeddings (GPT-2, BERT).
    Learned,
    /// Rotary embeddings applied to queries and keys (Su et al. 2021).
    Rope,
    /// Linear distance biases on the attention scores (Press et al. 2022).
    Alibi,
    /// No positional information (causal masks still leak order).
    None,
}

/// The position-wise feed-forward network.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FfnKind {
    Relu,
    Gelu,
    Swiglu,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    Layernorm,
    Rmsnorm,
}

/// Where the norm sits relative to the residual: `post` as in the paper
/// (x = norm(x + f(x))), `pre` as in GPT-2 and Llama (x = x + f(norm(x))).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NormPosition {
    Pre,
    Post,
}

/// The token-mixing mechanism of the attention layers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MechanismKind {
    /// Exact softmax attention with a KV cache.
    Softmax,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub shape: Shape,
    pub d_model: usize,
    pub n_encoder_layers: usize,
    pub n_decoder_layers: usize,
    pub n_heads: usize,
    /// Key/value heads: `n_heads` for multi-head, 1 for multi-query, anything
    /// dividing `n_heads` for grouped-query attention. Defaults to `n_heads`.
    pub n_kv_heads: Option<usize>,
    pub d_ff: usize,
    pub vocab_size: usize,
    /// Longest sequence the position scheme must cover.
    pub max_len: usize,
    pub position: PositionKind,
    pub rope_theta: f64,
    pub ffn: FfnKind,
    pub norm: NormKind,
    pub norm_position: NormPosition,
    pub norm_eps: f64,
    /// Share the token embedding with the output projection.
    pub tie_embeddings: bool,
    /// Biases on the linear projections.
    pub bias: bool,
    pub dropout: f64,
    pub mechanism: MechanismKind,
    /// Multiply token embeddings by √d_model (the paper; not GPT/Llama/BERT).
    pub scale_embeddings: bool,
    /// LayerNorm the embedding sum before the first block (BERT).
    pub embed_norm: bool,
    /// RoPE rotates adjacent pairs (x0,x1),(x2,x3).. (GGUF/llama.cpp layout)
    /// instead of (x_i, x_{i+d/2}) (GPT-NeoX / HF layout).
    pub rope_interleaved: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            shape: Shape::Decoder,
            d_model: 128,
            n_encoder_layers: 0,
            n_decoder_layers: 2,
            n_heads: 4,
            n_kv_heads: None,
            d_ff: 512,
            vocab_size: 256,
            max_len: 256,
            position: PositionKind::Sinusoidal,
            rope_theta: 10_000.0,
            ffn: FfnKind::Relu,
            norm: NormKind::Layernorm,
            norm_position: NormPosition::Pre,
            norm_eps: 1e-5,
            tie_embeddings: true,
            bias: true,
            dropout: 0.0,
            mechanism: MechanismKind::Softmax,
            scale_embeddings: true,
            embed_norm: false,
            rope_interleaved: false,
        }
    }
}

/// `x > 0`, false for NaN: the check every positive float setting needs.
pub fn is_positive(x: f64) -> bool {
    x > 0.0
}

impl ModelConfig {
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    pub fn has_encoder(&self) -> bool {
        matches!(self.shape, Shape::Encoder | Shape::EncoderDecoder)
    }

    pub fn has_decoder(&self) -> bool {
        matches!(self.shape, Shape::Decoder | Shape::EncoderDecoder)
    }

    /// Parse JSON text; errors name the offending field (`ffn: unknown variant ...`).
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: ModelConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            Error::file(origin, format!("field `{path}`: {}", e.inner()))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Check every constraint the model code relies on.
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &str, v: usize| {
            if v == 0 {
                Err(Error::config(field, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive("d_model", self.d_model)?;
        positive("n_heads", self.n_heads)?;
        positive("d_ff", self.d_ff)?;
        positive("vocab_size", self.vocab_size)?;
        positive("max_len", self.max_len)?;
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                "d_model",
                format!(
                    "({}) must be divisible by n_heads ({})",
                    self.d_model, self.n_heads
                ),
            ));
        }
        let kv = self.kv_heads();
        positive("n_kv_heads", kv)?;
        if !self.n_heads.is_multiple_of(kv) {
            return Err(Error::config(
                "n_heads",
                format!("({}) must be divisible by n_kv_heads ({kv})", self.n_heads),
            ));
        }
        match self.shape {
            Shape::Encoder => {
                positive("n_encoder_layers", self.n_encoder_layers)?;
                if self.n_decoder_layers != 0 {
                    return Err(Error::config(
                        "n_decoder_layers",
                        "must be 0 for shape `encoder`",
                    ));
                }
            }
            Shape::Decoder => {
                positive("n_decoder_layers", self.n_decoder_layers)?;
                if self.n_encoder_layers != 0 {
                    return Err(Error::config(
                        "n_encoder_layers",
                        "must be 0 for shape `decoder`",
                    ));
                }
            }
            Shape::EncoderDecoder => {
                positive("n_encoder_layers", self.n_encoder_layers)?;
                positive("n_decoder_layers", self.n_decoder_layers)?;
            }
        }
        if self.position == PositionKind::Rope {
            if !self.head_dim().is_multiple_of(2) {
                return Err(Error::config(
                    "position",
                    format!("rope needs an even head dimension, got {}", self.head_dim()),
                ));
            }
            if !is_positive(self.rope_theta) {
                return Err(Error::config("rope_theta", "must be positive"));
            }
        }
        if self.position == PositionKind::Sinusoidal && !self.d_model.is_multiple_of(2) {
            return Err(Error::config(
                "d_model",
                "sinusoidal positions need an even d_model",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config("dropout", "must be in [0, 1)"));
        }
        if !is_positive(self.norm_eps) {
            return Err(Error::config("norm_eps", "must be positive"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(s, Path::new("cfg.json"))
    }

    #[test]
    fn defaults_are_valid() {
        ModelConfig::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(r#"{"d_model": 100, "n_heads": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`d_model`") && e.contains("n_heads"), "{e}");
        let e = parse(r#"{"n_heads": 4, "n_kv_heads": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`n_heads`") && e.contains("n_kv_heads"), "{e}");
        let e = parse(r#"{"ffn": "gelu2"}"#).unwrap_err().to_string();
        assert!(e.contains("`ffn`") && e.contains("gelu2"), "{e}");
        let e = parse(r#"{"d_modle": 4}"#).unwrap_err().to_string();
        assert!(e.contains("d_modle"), "{e}");
        let e = parse(r#"{"shape": "encoder", "n_encoder_layers": 0, "n_decoder_layers": 0}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n_encoder_layers"), "{e}");
    }
}
