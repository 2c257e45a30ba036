//! Decode memory: the KV cache softmax attention keeps (`kv`, one type for
//! every executor and KV dtype) and the eviction policies that cap it
//! (`policy`). The per-sequence `DecodeState` that holds one cache or
//! recurrent state per layer is `model::DecodeState`.

pub mod kv;
pub mod policy;

pub use kv::KvCache;
