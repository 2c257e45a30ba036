//! Serving many sequences on one model: the engine behind `attend serve`
//! (the HTTP layer lives in the CLI crate, so that the library needs no
//! async runtime).
//!
//! * [`engine`]: a scheduler thread that admits sequences between steps
//!   (continuous, iteration-level batching, as Orca and vLLM do), packs
//!   every running sequence's next tokens into one step on the CPU
//!   executor (`Transformer::step_many`), prefills long prompts in chunks
//!   interleaved with the decode steps (chunked prefill), keeps KV caches
//!   in blocks of a bounded pool (`cache::paged`) and preempts — never runs
//!   out of memory — when the pool is short;
//! * [`prefix`]: automatic prefix caching over the pool's blocks.

pub mod engine;
pub mod prefix;

pub use engine::{
    Engine, EngineConfig, Event, FinishReason, Request, Sink, Stats, SubmitError, TokenLogprob,
};
