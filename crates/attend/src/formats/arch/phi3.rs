//! `phi3` (Phi-3, Phi-3.5 mini): the Llama shape with the query, key and
//! value maps fused into one tensor (`attn_qkv`) and the FFN's gate and up
//! maps into another (`ffn_up`, gate first), split by rows at load; RoPE on
//! halves (NeoX layout); every layer a sliding window when the file names
//! one (`attention.sliding_window`), as transformers runs Phi-3. LongRoPE
//! (the 128k models' `rope_factors_long/short`) is refused.

use super::{llama, Arch, Meta};
use crate::config::{MechanismConfig, ModelConfig, WindowConfig};
use crate::error::{Error, Result};

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
};

fn config(m: &Meta) -> Result<ModelConfig> {
    if m.ct.tensor_infos.contains_key("rope_factors_long.weight") {
        return Err(Error::file(
            m.path,
            "tensor `rope_factors_long.weight`: LongRoPE (Phi-3 128k) is not supported",
        ));
    }
    let base = llama::base(m)?;
    let layer_mechanisms = match m.opt_usize("attention.sliding_window")? {
        Some(w) if w > 0 => (0..base.n_decoder_layers)
            .map(|_| MechanismConfig::Window(WindowConfig { window: w }))
            .collect(),
        _ => vec![],
    };
    let cfg = ModelConfig {
        rope_interleaved: false,
        layer_mechanisms,
        ..base
    };
    llama::full_rope(m, &cfg)?;
    Ok(cfg)
}
