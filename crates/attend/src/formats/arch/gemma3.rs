//! `gemma3` (Gemma 3 text models): sandwich RMSNorms (llama.cpp's converter
//! stores Gemma's 1 + w), RMSNorm on each query and key head, GeGLU with
//! tanh GELU, embeddings scaled by √d_model, heads of their own width
//! (`attention.key_length`), and five sliding-window layers (window
//! `attention.sliding_window`, RoPE base 10,000) for every global layer
//! (RoPE base `rope.freq_base`), as llama.cpp and transformers run it.
//! RoPE rotates halves (no q/k permutation for Gemma).

use super::{Arch, Meta};
use crate::config::{
    FfnKind, MechanismConfig, ModelConfig, NormKind, NormPosition, PositionKind, Shape,
    WindowConfig,
};
use crate::error::{Error, Result};

pub static ARCH: Arch = Arch {
    name: "gemma3",
    config,
    fixed: &[
        ("token_embd.weight", "embed.weight"),
        ("output_norm.weight", "dec_norm.weight"),
    ],
    block: &[
        ("attn_norm.weight", "ln_1.weight"),
        ("attn_q.weight", "self_attn.q_proj.weight"),
        ("attn_k.weight", "self_attn.k_proj.weight"),
        ("attn_v.weight", "self_attn.v_proj.weight"),
        ("attn_q_norm.weight", "self_attn.q_norm.weight"),
        ("attn_k_norm.weight", "self_attn.k_norm.weight"),
        ("attn_output.weight", "self_attn.o_proj.weight"),
        ("post_attention_norm.weight", "ln_1_post.weight"),
        ("ffn_norm.weight", "ln_2.weight"),
        ("ffn_gate.weight", "ffn.w1.weight"),
        ("ffn_up.weight", "ffn.w3.weight"),
        ("ffn_down.weight", "ffn.w2.weight"),
        ("post_ffw_norm.weight", "ln_2_post.weight"),
    ],
    fused: &[],
    hf: None,
};

/// Every sixth layer is global (layers 5, 11, 17, …); the others slide.
const PATTERN: usize = 6;
/// The local layers' RoPE base (not in the file; transformers'
/// `rope_local_base_freq` and llama.cpp's default for gemma3).
const LOCAL_ROPE_BASE: f64 = 10_000.0;

fn config(m: &Meta) -> Result<ModelConfig> {
    let n_heads = m.usize("attention.head_count")?;
    let d_model = m.usize("embedding_length")?;
    let layers = m.layers()?;
    let head_dim = m.usize("attention.key_length")?;
    if m.opt_usize("attention.value_length")?
        .is_some_and(|v| v != head_dim)
    {
        return Err(Error::file(
            m.path,
            format!(
                "`{}` differs from `{}`: heads with values of another width are not supported",
                m.key("attention.value_length"),
                m.key("attention.key_length")
            ),
        ));
    }
    let window = m.usize("attention.sliding_window")?;
    let layer_mechanisms = (0..layers)
        .map(|i| {
            if (i + 1) % PATTERN == 0 {
                MechanismConfig::Softmax
            } else {
                MechanismConfig::Window(WindowConfig { window })
            }
        })
        .collect();
    Ok(ModelConfig {
        shape: Shape::Decoder,
        d_model,
        n_encoder_layers: 0,
        n_decoder_layers: layers,
        n_heads,
        n_kv_heads: Some(m.opt_usize("attention.head_count_kv")?.unwrap_or(n_heads)),
        head_dim: Some(head_dim),
        qk_norm: true,
        d_ff: m.usize("feed_forward_length")?,
        position: PositionKind::Rope,
        rope_theta: m.opt_f64("rope.freq_base")?.unwrap_or(1_000_000.0),
        rope_theta_window: Some(LOCAL_ROPE_BASE),
        ffn: FfnKind::Geglu,
        norm: NormKind::Rmsnorm,
        norm_position: NormPosition::Sandwich,
        norm_eps: m
            .opt_f64("attention.layer_norm_rms_epsilon")?
            .unwrap_or(1e-6),
        bias: false,
        dropout: 0.0,
        scale_embeddings: true,
        rope_interleaved: false,
        layer_mechanisms,
        ..ModelConfig::default()
    })
}
