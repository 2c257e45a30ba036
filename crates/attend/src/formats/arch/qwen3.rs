//! `qwen3` (Qwen3 dense): the Llama shape with RMSNorm on each query and key
//! head before RoPE, heads of their own width (`attention.key_length`, not
//! d_model / heads), no biases, RoPE on halves (NeoX layout).

use super::{llama, Arch, Hf, Meta, HF_BLOCK, HF_FIXED};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::formats::hf_decoder::{self, HfConfig};
use std::path::Path;

pub static ARCH: Arch = Arch {
    name: "qwen3",
    config,
    fixed: llama::ARCH.fixed,
    block: &[
        ("attn_norm.weight", "ln_1.weight"),
        ("attn_q.weight", "self_attn.q_proj.weight"),
        ("attn_k.weight", "self_attn.k_proj.weight"),
        ("attn_v.weight", "self_attn.v_proj.weight"),
        ("attn_q_norm.weight", "self_attn.q_norm.weight"),
        ("attn_k_norm.weight", "self_attn.k_norm.weight"),
        ("attn_output.weight", "self_attn.o_proj.weight"),
        ("ffn_norm.weight", "ln_2.weight"),
        ("ffn_gate.weight", "ffn.w1.weight"),
        ("ffn_up.weight", "ffn.w3.weight"),
        ("ffn_down.weight", "ffn.w2.weight"),
    ],
    fused: &[],
    hf: Some(Hf {
        model_types: &["qwen3"],
        config: hf_config,
        fixed: HF_FIXED,
        block: HF_BLOCK,
        fused: &[],
        norm_plus_one: false,
    }),
};

fn hf_config(c: &HfConfig, path: &Path) -> Result<ModelConfig> {
    Ok(ModelConfig {
        qk_norm: true,
        ..hf_decoder::base(c, path)?
    })
}

fn config(m: &Meta) -> Result<ModelConfig> {
    Ok(ModelConfig {
        qk_norm: true,
        ..llama::neox(m)?
    })
}
