//! Running a model on plain buffers instead of candle tensors: today one
//! fused form per model family, built from a `Transformer`'s own weights and
//! tested against it (`tests/fused.rs`):
//!
//! * `decoder` — Llama-shaped decoders: prefill and decode with a KV cache
//!   in place, attention and the quantized products on `kernels`;
//! * `encoder` — post-LayerNorm BERT-style encoders: padding-free packed
//!   batches on gemm.
//!
//! These are still second implementations of the model's forward, chosen
//! by the shape of the config (issue 10 replaces them with one inference
//! executor that runs the model's single forward); `kernels` below them
//! knows buffers and shapes only.

pub mod decoder;
pub mod encoder;
