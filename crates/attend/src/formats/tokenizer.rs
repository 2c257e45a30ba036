//! Tokenizers: Hugging Face `tokenizer.json` files and the byte-level BPE
//! described by GGUF metadata, both through the `tokenizers` crate.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use std::path::Path;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

impl Tokenizer {
    /// A `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::file(path, "tokenizer file not found"));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::file(path, format!("cannot read ({e})")))?;
        // The JSON itself first: the tokenizers crate panics on some
        // malformed strings (a control character inside one) instead of
        // returning its error.
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| Error::file(path, format!("not valid JSON ({e})")))?;
        // and a backstop for any other input it panics on
        let failed = || {
            Error::file(
                path,
                "not a valid tokenizer.json (the tokenizers crate failed on it)",
            )
        };
        let inner = quietly(|| text.parse::<tokenizers::Tokenizer>())
            .ok_or_else(failed)?
            .map_err(|e| Error::file(path, format!("not a valid tokenizer.json ({e})")))?;
        // A post-processor template naming a special token the file does
        // not define panics on every encode: try one now.
        quietly(|| inner.encode("a", true))
            .ok_or_else(|| {
                Error::file(
                    path,
                    "its post_processor cannot encode (a template names a special token it does not define?)",
                )
            })?
            .map_err(|e| Error::file(path, format!("cannot encode with it ({e})")))?;
        Ok(Self {
            inner,
            bos: None,
            eos: None,
        })
    }

    /// The tokenizer GGUF metadata describes.
    pub fn from_gguf(ct: &Content, path: &Path) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_gguf(ct)
            .map_err(|e| Error::file(path, format!("tokenizer: {e}")))?;
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if pre == "smollm" {
            // SmolLM's tokenizer.json: digits split one by one, then GPT-2
            // byte-level without a prefix space.
            let seq = Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ]);
            inner.with_pre_tokenizer(Some(seq));
        }
        let id = |k: &str| match ct.metadata.get(k) {
            Some(v) => v.to_u32().ok(),
            None => None,
        };
        Ok(Self {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Text → ids; `special`: add the tokenizer's special tokens ([CLS]/[SEP] for BERT).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| Error::msg(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::msg(format!("tokenizer: {e}")))
    }
}

/// Decodes ids one at a time into text pieces that never split a character.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        Self {
            tok,
            ids: vec![],
            emitted: 0,
        }
    }

    /// The new text that `id` completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new()); // an incomplete UTF-8 sequence: wait
        }
        let new = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(new)
    }
}

/// Run `f`, turning a panic into None without printing it: the tokenizers
/// crate panics on some malformed files instead of returning an error.
/// (The panic hook is process-wide; this runs only while loading.)
fn quietly<T>(f: impl FnOnce() -> T) -> Option<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok();
    std::panic::set_hook(hook);
    r
}
