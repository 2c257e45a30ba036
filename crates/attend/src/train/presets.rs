//! Default configurations per task: what `attend train --task T` uses when the
//! user passes nothing else. Each is chosen to solve its task on a 2-core CPU
//! in minutes (see BENCHMARKS.md for the measured figures).

use super::{Schedule, TrainConfig};
use crate::config::{FfnKind, ModelConfig, NormKind, NormPosition, PositionKind, Shape};
use crate::error::{Error, Result};
use crate::tasks::{MqarConfig, TaskConfig, TextConfig, TransductionConfig};

pub const TASKS: [&str; 4] = ["copy", "reverse", "mqar", "text"];

/// Model, task and training defaults for a task name.
pub fn preset(task: &str) -> Result<(ModelConfig, TaskConfig, TrainConfig)> {
    let seq2seq_model = ModelConfig {
        shape: Shape::EncoderDecoder,
        d_model: 128,
        n_encoder_layers: 2,
        n_decoder_layers: 2,
        n_heads: 4,
        d_ff: 512,
        vocab_size: 32,
        max_len: 64,
        // Learned positions (initialised at the scale of the √d-scaled token
        // embeddings) reach 99% in ~1/2 the steps sinusoidal ones need here.
        position: PositionKind::Learned,
        ffn: FfnKind::Relu,
        norm: NormKind::Layernorm,
        norm_position: NormPosition::Pre,
        ..ModelConfig::default()
    };
    let seq2seq_task = TransductionConfig {
        vocab: 32,
        min_len: 8,
        max_len: 16,
    };
    let seq2seq_train = TrainConfig {
        steps: 1000,
        batch_size: 64,
        lr: 1e-3,
        schedule: Schedule::Cosine,
        warmup: 100,
        label_smoothing: 0.0,
        ..TrainConfig::default()
    };
    Ok(match task {
        "copy" => (seq2seq_model, TaskConfig::Copy(seq2seq_task), seq2seq_train),
        "reverse" => (
            seq2seq_model,
            TaskConfig::Reverse(seq2seq_task),
            seq2seq_train,
        ),
        "mqar" => (
            ModelConfig {
                shape: Shape::Decoder,
                d_model: 64,
                n_decoder_layers: 2,
                n_heads: 2,
                d_ff: 256,
                vocab_size: 64,
                max_len: 64,
                // The induction circuit MQAR needs forms after ~700 steps with
                // learned positions; with RoPE or sinusoidal ones it had not
                // formed after 1000 (BENCHMARKS.md).
                position: PositionKind::Learned,
                ..ModelConfig::default()
            },
            TaskConfig::Mqar(MqarConfig {
                vocab: 64,
                seq_len: 64,
                n_pairs: 8,
                power_a: 0.01,
                train_mix: vec![],
                curriculum: None,
            }),
            TrainConfig {
                steps: 1500,
                batch_size: 64,
                lr: 3e-3,
                warmup: 100,
                ..TrainConfig::default()
            },
        ),
        "text" => (
            ModelConfig {
                shape: Shape::Decoder,
                d_model: 128,
                n_decoder_layers: 4,
                n_heads: 4,
                d_ff: 512,
                vocab_size: 256,
                max_len: 128,
                position: PositionKind::Rope,
                ffn: FfnKind::Gelu,
                dropout: 0.0,
                ..ModelConfig::default()
            },
            TaskConfig::Text(TextConfig {
                path: "../shared/data/tinyshakespeare.txt".into(),
                seq_len: 128,
                val_fraction: 0.1,
            }),
            TrainConfig {
                steps: 1000,
                batch_size: 32,
                lr: 2e-3,
                warmup: 100,
                n_eval: 200,
                ..TrainConfig::default()
            },
        ),
        other => {
            return Err(Error::config(
                "task",
                format!(
                    "unknown task `{other}` (expected one of: {})",
                    TASKS.join(", ")
                ),
            ));
        }
    })
}
