//! attend: the Transformer and its efficient descendants, in one engine.
//!
//! Data flows one way: ids → [`model::Transformer`] (with a caller-owned
//! [`model::DecodeState`] while decoding) → logits → [`decode`] → ids.
//! The model's forward is written once and run by an executor ([`exec`]):
//! candle tensors for training, plain buffers and attend's kernels for
//! inference.
//! Each part of a block lives in one module, and every variant of that part
//! is one more case there:
//!
//! | part | module |
//! | --- | --- |
//! | model shape (encoder, decoder, encoder–decoder) | [`model`] |
//! | token mixing | [`attention`] |
//! | positions | [`position`] |
//! | channel mixing | [`ffn`] |
//! | norms | [`norm`] |
//! | decode memory (the KV cache, eviction policies) | [`cache`] |
//! | executors (graph, CPU) | [`exec`] |
//! | decoding | [`decode`] |
//! | learning | [`train`], [`tasks`] |
//! | evidence | [`eval`] |
//! | speed | [`kernels`] |

pub mod attention;
pub mod cache;
pub mod config;
pub mod decode;
pub mod error;
pub mod eval;
pub mod exec;
pub mod ffn;
pub mod formats;
pub mod kernels;
pub mod model;
pub mod nn;
pub mod norm;
pub mod position;
pub mod serve;
pub mod tasks;
pub mod train;
pub mod util;

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use model::Transformer;
