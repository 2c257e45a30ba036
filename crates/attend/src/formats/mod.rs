//! Checkpoint formats: GGUF, Hugging Face `config.json` + safetensors,
//! tokenizers and chat templates. The mapping from each format's names to
//! attend's lives here, not in the model.

pub mod arch;
pub mod chat;
pub mod gguf;
pub mod gguf_check;
pub mod hf;
pub mod hf_decoder;
pub mod tokenizer;
