//! attend: the Transformer and its efficient descendants, in one engine.
//!
//! Data flows one way: ids → [`model::Transformer`] (with a caller-owned
//! [`cache::DecodeState`] while decoding) → logits → [`decode`] → ids.
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
//! | decode memory | [`cache`] |
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
pub mod tasks;
pub mod train;
pub mod util;

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use model::Transformer;
