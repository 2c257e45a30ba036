//! `llama` (Llama 2 and 3, SmolLM, TinyLlama, …): pre-RMSNorm, SwiGLU, RoPE
//! on adjacent pairs (llama.cpp's converter permutes q/k), grouped-query
//! heads; Llama 3's RoPE scaling is the file's `rope_freqs.weight` (read by
//! the loader for any architecture). `base` is the shape the other
//! Llama-like architectures start from.

use super::{Arch, Hf, Meta, HF_BLOCK, HF_FIXED};
use crate::config::{FfnKind, ModelConfig, NormKind, NormPosition, PositionKind, Shape};
use crate::error::{Error, Result};

pub static ARCH: Arch = Arch {
    name: "llama",
    config,
    fixed: &[
        ("token_embd.weight", "embed.weight"),
        ("output_norm.weight", "dec_norm.weight"),
        ("output.weight", "lm_head.weight"),
    ],
    block: &[
        ("attn_norm.weight", "ln_1.weight"),
        ("attn_q.weight", "self_attn.q_proj.weight"),
        ("attn_k.weight", "self_attn.k_proj.weight"),
        ("attn_v.weight", "self_attn.v_proj.weight"),
        ("attn_output.weight", "self_attn.o_proj.weight"),
        ("ffn_norm.weight", "ln_2.weight"),
        ("ffn_gate.weight", "ffn.w1.weight"),
        ("ffn_up.weight", "ffn.w3.weight"),
        ("ffn_down.weight", "ffn.w2.weight"),
    ],
    fused: &[],
    hf: Some(Hf {
        model_types: &["llama"],
        config: crate::formats::hf_decoder::base,
        fixed: HF_FIXED,
        block: HF_BLOCK,
        fused: &[],
        norm_plus_one: false,
    }),
};

fn config(m: &Meta) -> Result<ModelConfig> {
    let cfg = base(m)?;
    full_rope(m, &cfg)?;
    Ok(cfg)
}

/// The Llama shape from `<arch>.*` metadata: pre-RMSNorm, SwiGLU, RoPE
/// (adjacent pairs), no biases, `attention.key_length` heads if given.
pub(super) fn base(m: &Meta) -> Result<ModelConfig> {
    let n_heads = m.usize("attention.head_count")?;
    let d_model = m.usize("embedding_length")?;
    let cfg = ModelConfig {
        shape: Shape::Decoder,
        d_model,
        n_encoder_layers: 0,
        n_decoder_layers: m.layers()?,
        n_heads,
        n_kv_heads: Some(m.opt_usize("attention.head_count_kv")?.unwrap_or(n_heads)),
        d_ff: m.usize("feed_forward_length")?,
        position: PositionKind::Rope,
        rope_theta: m.opt_f64("rope.freq_base")?.unwrap_or(10_000.0),
        ffn: FfnKind::Swiglu,
        norm: NormKind::Rmsnorm,
        norm_position: NormPosition::Pre,
        norm_eps: m
            .opt_f64("attention.layer_norm_rms_epsilon")?
            .unwrap_or(1e-5),
        bias: false,
        dropout: 0.0,
        scale_embeddings: false,
        rope_interleaved: true,
        head_dim: m.opt_usize("attention.key_length")?,
        ..ModelConfig::default()
    };
    // (zero heads are the validation's to report)
    m.same_value_width(cfg.head_dim.or((n_heads > 0).then(|| d_model / n_heads)))?;
    Ok(cfg)
}

/// `base` with RoPE on halves (NeoX layout: llama.cpp's converter permutes
/// only Llama's q/k) and Qwen's defaults (base 1,000,000, ε 1e-6), the
/// whole head rotated: Qwen2 and Qwen3 start here.
pub(super) fn neox(m: &Meta) -> Result<ModelConfig> {
    let cfg = ModelConfig {
        rope_interleaved: false,
        rope_theta: m.opt_f64("rope.freq_base")?.unwrap_or(1_000_000.0),
        norm_eps: m
            .opt_f64("attention.layer_norm_rms_epsilon")?
            .unwrap_or(1e-6),
        ..base(m)?
    };
    full_rope(m, &cfg)?;
    Ok(cfg)
}

/// RoPE must turn the whole head (`rope.dimension_count`, if given).
pub(super) fn full_rope(m: &Meta, cfg: &ModelConfig) -> Result<()> {
    let (n_heads, d_model) = (cfg.n_heads, cfg.d_model);
    if let Some(rd) = m.opt_usize("rope.dimension_count")? {
        // (heads that do not divide the width are the validation's to report)
        let sane = cfg.head_dim.is_some() || (n_heads > 0 && d_model.is_multiple_of(n_heads));
        if sane && rd != cfg.head_dim() {
            return Err(Error::file(
                m.path,
                format!(
                    "partial RoPE ({rd} of {} dims) is not supported",
                    cfg.head_dim()
                ),
            ));
        }
    }
    Ok(())
}
