//! `gemma3` (Gemma 3 text models): sandwich RMSNorms (llama.cpp's converter
//! stores Gemma's 1 + w), RMSNorm on each query and key head, GeGLU with
//! tanh GELU, embeddings scaled by √d_model, heads of their own width
//! (`attention.key_length`), and five sliding-window layers (window
//! `attention.sliding_window`, RoPE base 10,000) for every global layer
//! (RoPE base `rope.freq_base`), as llama.cpp and transformers run it.
//! RoPE rotates halves (no q/k permutation for Gemma). As a Hugging Face
//! folder (`gemma3_text`), the norms' weights are stored as w for 1 + w.

use super::{Arch, Hf, Meta};
use crate::config::{
    FfnKind, MechanismConfig, ModelConfig, NormKind, NormPosition, PositionKind, Shape,
    WindowConfig,
};
use crate::error::{Error, Result};
use crate::formats::hf_decoder::HfConfig;
use std::path::Path;

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
    hf: Some(Hf {
        model_types: &["gemma3_text"],
        config: hf_config,
        fixed: &[
            ("model.embed_tokens.weight", "embed.weight"),
            ("model.norm.weight", "dec_norm.weight"),
        ],
        block: &[
            ("input_layernorm.weight", "ln_1.weight"),
            ("self_attn.q_proj.weight", "self_attn.q_proj.weight"),
            ("self_attn.k_proj.weight", "self_attn.k_proj.weight"),
            ("self_attn.v_proj.weight", "self_attn.v_proj.weight"),
            ("self_attn.q_norm.weight", "self_attn.q_norm.weight"),
            ("self_attn.k_norm.weight", "self_attn.k_norm.weight"),
            ("self_attn.o_proj.weight", "self_attn.o_proj.weight"),
            ("post_attention_layernorm.weight", "ln_1_post.weight"),
            ("pre_feedforward_layernorm.weight", "ln_2.weight"),
            ("mlp.gate_proj.weight", "ffn.w1.weight"),
            ("mlp.up_proj.weight", "ffn.w3.weight"),
            ("mlp.down_proj.weight", "ffn.w2.weight"),
            ("post_feedforward_layernorm.weight", "ln_2_post.weight"),
        ],
        fused: &[],
        norm_plus_one: true,
    }),
};

/// `gemma3_text` config.json: `layer_types` (or every sixth layer global),
/// the two RoPE bases (`rope_parameters` per layer type in transformers 5,
/// `rope_theta` / `rope_local_base_freq` before), GeGLU with the tanh GELU.
fn hf_config(c: &HfConfig, path: &Path) -> Result<ModelConfig> {
    let bad = |m: String| Err(Error::file(path, m));
    let x = serde_json::Value::Object(c.extra.clone());
    if x["hidden_activation"]
        .as_str()
        .is_some_and(|a| a != "gelu_pytorch_tanh")
    {
        return bad(format!(
            "`hidden_activation` {} is not supported (gelu_pytorch_tanh)",
            x["hidden_activation"]
        ));
    }
    for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
        if !x[k].is_null() {
            return bad(format!("`{k}` is not supported"));
        }
    }
    let head_dim = c.head_dim.unwrap_or(256);
    if x["query_pre_attn_scalar"]
        .as_f64()
        .is_some_and(|s| s != head_dim as f64)
    {
        return bad(format!(
            "`query_pre_attn_scalar` {} differs from `head_dim` {head_dim}: attend scales scores by 1/√head_dim",
            x["query_pre_attn_scalar"]
        ));
    }
    let rp = c.rope_parameters.as_ref();
    let theta = |kind: &str, old: Option<f64>, default: f64| -> Result<f64> {
        if let Some(t) = rp
            .and_then(|r| r[kind]["rope_type"].as_str())
            .filter(|t| *t != "default")
        {
            return Err(Error::file(
                path,
                format!("rope scaling `{t}` ({kind}) is not supported"),
            ));
        }
        Ok(rp
            .and_then(|r| r[kind]["rope_theta"].as_f64())
            .or(old)
            .unwrap_or(default))
    };
    let global = theta("full_attention", c.rope_theta, 1_000_000.0)?;
    let local = theta(
        "sliding_attention",
        x["rope_local_base_freq"].as_f64(),
        LOCAL_ROPE_BASE,
    )?;
    let window = c.sliding_window.unwrap_or(512);
    let layers = c.num_hidden_layers;
    let kinds: Vec<bool> = match x["layer_types"].as_array() {
        Some(t) if t.len() == layers => t
            .iter()
            .map(|k| k.as_str() == Some("sliding_attention"))
            .collect(),
        Some(t) => {
            return bad(format!(
                "`layer_types` has {} entries for {layers} layers",
                t.len()
            ))
        }
        None => (0..layers).map(|i| (i + 1) % PATTERN != 0).collect(),
    };
    let layer_mechanisms = kinds
        .iter()
        .map(|&local| match local {
            true => MechanismConfig::Window(WindowConfig { window }),
            false => MechanismConfig::Softmax,
        })
        .collect();
    Ok(ModelConfig {
        d_model: c.hidden_size,
        n_decoder_layers: layers,
        n_heads: c.num_attention_heads,
        n_kv_heads: Some(c.num_key_value_heads.unwrap_or(c.num_attention_heads)),
        head_dim: Some(head_dim),
        d_ff: c.intermediate_size,
        vocab_size: c.vocab_size,
        max_len: c.max_position_embeddings,
        rope_theta: global,
        rope_theta_window: Some(local),
        norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
        layer_mechanisms,
        ..gemma()
    })
}

/// What every Gemma 3 is, whatever its size: q/k norms, RoPE on halves,
/// GeGLU (tanh), sandwich RMSNorms, no biases, embeddings scaled by √d.
fn gemma() -> ModelConfig {
    ModelConfig {
        shape: Shape::Decoder,
        n_encoder_layers: 0,
        qk_norm: true,
        position: PositionKind::Rope,
        ffn: FfnKind::Geglu,
        norm: NormKind::Rmsnorm,
        norm_position: NormPosition::Sandwich,
        bias: false,
        dropout: 0.0,
        scale_embeddings: true,
        rope_interleaved: false,
        ..ModelConfig::default()
    }
}

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
    m.same_value_width(Some(head_dim))?;
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
        norm_eps: m
            .opt_f64("attention.layer_norm_rms_epsilon")?
            .unwrap_or(1e-6),
        layer_mechanisms,
        ..gemma()
    })
}
