//! `qwen2` (Qwen2, Qwen2.5): the Llama shape with biases on the query, key
//! and value projections, and RoPE on halves (NeoX layout: llama.cpp's
//! converter does not permute Qwen's q/k).

use super::{llama, Arch, Hf, Meta, HF_BLOCK, HF_FIXED};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::formats::hf_decoder::{self, HfConfig};
use std::path::Path;

pub static ARCH: Arch = Arch {
    name: "qwen2",
    config,
    fixed: llama::ARCH.fixed,
    block: &[
        ("attn_norm.weight", "ln_1.weight"),
        ("attn_q.weight", "self_attn.q_proj.weight"),
        ("attn_q.bias", "self_attn.q_proj.bias"),
        ("attn_k.weight", "self_attn.k_proj.weight"),
        ("attn_k.bias", "self_attn.k_proj.bias"),
        ("attn_v.weight", "self_attn.v_proj.weight"),
        ("attn_v.bias", "self_attn.v_proj.bias"),
        ("attn_output.weight", "self_attn.o_proj.weight"),
        ("ffn_norm.weight", "ln_2.weight"),
        ("ffn_gate.weight", "ffn.w1.weight"),
        ("ffn_up.weight", "ffn.w3.weight"),
        ("ffn_down.weight", "ffn.w2.weight"),
    ],
    fused: &[],
    hf: Some(Hf {
        model_types: &["qwen2"],
        config: hf_config,
        fixed: HF_FIXED,
        block: HF_BLOCK,
        fused: &[],
        norm_plus_one: false,
    }),
};

/// Qwen2's biases on q/k/v are implied by the family, not in config.json.
fn hf_config(c: &HfConfig, path: &Path) -> Result<ModelConfig> {
    Ok(ModelConfig {
        qkv_bias: true,
        ..hf_decoder::base(c, path)?
    })
}

fn config(m: &Meta) -> Result<ModelConfig> {
    Ok(ModelConfig {
        qkv_bias: true,
        ..llama::neox(m)?
    })
}
