//! Decode memory: the KV cache softmax attention keeps (`kv`, one type for
//! every executor and KV dtype) and the eviction policies that cap it
//! (`policy`); a plain cache's rows may live in blocks of a bounded pool
//! (`paged`), as a server's do. The per-sequence `DecodeState` that holds one cache or
//! recurrent state per layer is `model::DecodeState`.

pub mod kv;
pub mod paged;
pub mod policy;

pub use kv::KvCache;
