//! `phi3` (Phi-3, Phi-3.5 mini): the Llama shape with the query, key and
//! value maps fused into one tensor (`attn_qkv`) and the FFN's gate and up
//! maps into another (`ffn_up`, gate first), split by rows at load; RoPE on
//! halves (NeoX layout); every layer a sliding window when the file names
//! one (`attention.sliding_window`), as transformers runs Phi-3. LongRoPE
//! (the 128k models' `rope_factors_long/short`) is refused.

use super::{llama, Arch, Hf, Meta, HF_FIXED};
use crate::config::{MechanismConfig, ModelConfig, WindowConfig};
use crate::error::{Error, Result};
use crate::formats::hf_decoder::{self, HfConfig};
use std::path::Path;

pub static ARCH: Arch = Arch {
    name: "phi3",
    config,
    fixed: llama::ARCH.fixed,
    block: &[
        ("attn_norm.weight", "ln_1.weight"),
        ("attn_output.weight", "self_attn.o_proj.weight"),
        ("ffn_norm.weight", "ln_2.weight"),
        ("ffn_down.weight", "ffn.w2.weight"),
    ],
    fused: &[
        (
            "attn_qkv.weight",
            &[
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
            ],
        ),
        ("ffn_up.weight", &["ffn.w1.weight", "ffn.w3.weight"]),
    ],
    hf: Some(Hf {
        model_types: &["phi3"],
        config: hf_config,
        fixed: HF_FIXED,
        block: &[
            ("input_layernorm.weight", "ln_1.weight"),
            ("self_attn.o_proj.weight", "self_attn.o_proj.weight"),
            ("post_attention_layernorm.weight", "ln_2.weight"),
            ("mlp.down_proj.weight", "ffn.w2.weight"),
        ],
        fused: &[
            (
                "self_attn.qkv_proj.weight",
                &[
                    "self_attn.q_proj.weight",
                    "self_attn.k_proj.weight",
                    "self_attn.v_proj.weight",
                ],
            ),
            (
                "mlp.gate_up_proj.weight",
                &["ffn.w1.weight", "ffn.w3.weight"],
            ),
        ],
        norm_plus_one: false,
    }),
};

fn hf_config(c: &HfConfig, path: &Path) -> Result<ModelConfig> {
    let base = hf_decoder::base(c, path)?;
    if c.rope_scaling
        .as_ref()
        .or(c.rope_parameters.as_ref())
        .is_some_and(|r| {
            r.get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(|t| t.as_str())
                == Some("longrope")
        })
    {
        return Err(Error::file(
            path,
            "rope scaling `longrope` (Phi-3 128k) is not supported",
        ));
    }
    Ok(ModelConfig {
        layer_mechanisms: windows(c.sliding_window, base.n_decoder_layers),
        ..base
    })
}

/// Every layer a window of w tokens, when the model has one.
fn windows(w: Option<usize>, layers: usize) -> Vec<MechanismConfig> {
    match w {
        Some(w) if w > 0 => (0..layers)
            .map(|_| MechanismConfig::Window(WindowConfig { window: w }))
            .collect(),
        _ => vec![],
    }
}

fn config(m: &Meta) -> Result<ModelConfig> {
    if m.ct.tensor_infos.contains_key("rope_factors_long.weight") {
        return Err(Error::file(
            m.path,
            "tensor `rope_factors_long.weight`: LongRoPE (Phi-3 128k) is not supported",
        ));
    }
    let base = llama::base(m)?;
    let layer_mechanisms = windows(
        m.opt_usize("attention.sliding_window")?,
        base.n_decoder_layers,
    );
    let cfg = ModelConfig {
        rope_interleaved: false,
        layer_mechanisms,
        ..base
    };
    llama::full_rope(m, &cfg)?;
    Ok(cfg)
}
