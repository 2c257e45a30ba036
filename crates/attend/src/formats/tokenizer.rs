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
        let kind = ct
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let mut inner = match kind.as_str() {
            "llama" => sentencepiece_bpe(ct, path)?,
            _ => {
                check_merges(ct, path)?;
                // (a backstop: the tokenizers crate panics on some inputs)
                quietly(|| tokenizers::Tokenizer::from_gguf(ct))
                    .ok_or_else(|| {
                        Error::file(path, "tokenizer: the tokenizers crate failed on it")
                    })?
                    .map_err(|e| Error::file(path, format!("tokenizer: {e}")))?
            }
        };
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        // the pre-tokenizers of the families' tokenizer.json files
        let split = |pattern: &str| -> Result<Sequence> {
            use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
            let re = Split::new(
                SplitPattern::Regex(pattern.into()),
                tokenizers::SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::file(path, format!("tokenizer: {e}")))?;
            Ok(Sequence::new(vec![
                re.into(),
                ByteLevel::new(false, true, false).into(),
            ]))
        };
        match pre.as_str() {
            // SmolLM's: digits split one by one, then GPT-2 byte-level
            // without a prefix space
            "smollm" => {
                let seq = Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ]);
                inner.with_pre_tokenizer(Some(seq));
            }
            "qwen2" => {
                inner.with_pre_tokenizer(Some(split(QWEN2_SPLIT)?));
            }
            "llama-bpe" => {
                inner.with_pre_tokenizer(Some(split(LLAMA3_SPLIT)?));
            }
            _ => {}
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

/// Qwen2/Qwen2.5/Qwen3's split before byte-level BPE (digits one by one).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's (and Phi-4's, `llama-bpe`): digits in runs of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Every BPE merge `a b` must join two tokens into a third: the tokenizers
/// crate indexes past a buffer (a panic) when `ab` is longer than every
/// token, so a merge outside the vocabulary is refused here, by index.
fn check_merges(ct: &Content, path: &Path) -> Result<()> {
    use candle_core::quantized::gguf_file::Value;
    let strings = |k: &str| -> Vec<&str> {
        match ct.metadata.get(k) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
            _ => vec![],
        }
    };
    let vocab: std::collections::HashSet<&str> =
        strings("tokenizer.ggml.tokens").into_iter().collect();
    for (i, m) in strings("tokenizer.ggml.merges").into_iter().enumerate() {
        let ok = m.split_once(' ').is_some_and(|(a, b)| {
            vocab.contains(a) && vocab.contains(b) && vocab.contains(format!("{a}{b}").as_str())
        });
        if !ok {
            return Err(Error::file(
                path,
                format!(
                    "`tokenizer.ggml.merges`[{i}] = {m:?} does not join two tokens into a third"
                ),
            ));
        }
    }
    Ok(())
}

/// A SentencePiece BPE vocabulary from GGUF metadata (`tokenizer.ggml.model
/// = "llama"`: tokens, their types, no merges), rebuilt as transformers
/// rebuilds it for Gemma: tokens made only of spaces respelled with `▁`;
/// merges recovered from the vocabulary, every split of a token into two
/// tokens, best first — in the order the tokens appear in the file, which is
/// Gemma's merge order (its scores are not); spaces become `▁` before BPE
/// with byte fallback; control tokens special, user-defined ones whole.
fn sentencepiece_bpe(ct: &Content, path: &Path) -> Result<tokenizers::Tokenizer> {
    use candle_core::quantized::gguf_file::Value;
    use tokenizers::decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as Dec,
    };
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, SplitDelimiterBehavior};
    let key = |k: &str| ct.metadata.get(k);
    let array = |k: &str| -> Result<&Vec<Value>> {
        match key(k) {
            Some(Value::Array(a)) => Ok(a),
            Some(_) => Err(Error::file(path, format!("`{k}` is not an array"))),
            None => Err(Error::file(path, format!("has no `{k}`"))),
        }
    };
    let bad =
        |k: &str, i: usize, what: &str| Error::file(path, format!("`{k}`[{i}] is not {what}"));
    let tokens: Vec<String> = (array("tokenizer.ggml.tokens")?.iter().enumerate())
        .map(|(i, v)| match v {
            Value::String(t) => Ok(
                if !t.is_empty() && t.chars().all(|c| c == ' ') && t.len() > 1 {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.clone()
                },
            ),
            _ => Err(bad("tokenizer.ggml.tokens", i, "a string")),
        })
        .collect::<Result<_>>()?;
    let types: Vec<i64> = match key("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(_) => (array("tokenizer.ggml.token_type")?.iter().enumerate())
            .map(|(i, v)| match v {
                Value::I32(x) => Ok(*x as i64),
                Value::U32(x) => Ok(*x as i64),
                _ => Err(bad("tokenizer.ggml.token_type", i, "an integer")),
            })
            .collect::<Result<_>>()?,
    };
    if types.len() != tokens.len() {
        return Err(Error::file(
            path,
            format!(
                "`tokenizer.ggml.token_type` has {} entries for {} tokens",
                types.len(),
                tokens.len()
            ),
        ));
    }
    // token -> id (a repeated token keeps its last id, as a dict would)
    let vocab: std::collections::HashMap<String, u32> = (tokens.iter().enumerate())
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    // every split of a token into two tokens; best first = earliest token,
    // then the longer left piece (transformers' generate_merges)
    let mut merges: Vec<(u32, usize, &str, &str)> = vec![];
    for t in vocab.keys() {
        let id = vocab[t];
        for (at, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(at);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merges.push((id, l.chars().count(), l, r));
            }
        }
    }
    merges.sort_by(|a, b| (a.0.cmp(&b.0)).then(b.1.cmp(&a.1)));
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|(_, _, l, r)| (l.to_string(), r.to_string()))
        .collect();
    let unk = match key("tokenizer.ggml.unknown_token_id").and_then(|v| v.to_u32().ok()) {
        Some(i) => tokens.get(i as usize).cloned(),
        None => vocab.contains_key("<unk>").then(|| "<unk>".to_string()),
    };
    let mut b = BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk {
        b = b.unk_token(u);
    }
    let bpe = b
        .build()
        .map_err(|e| Error::file(path, format!("tokenizer: {e}")))?;
    let mut tk = tokenizers::Tokenizer::new(bpe);
    let rep = |a: &str, b: &str| Replace::new(a, b).map_err(|e| Error::msg(e.to_string()));
    let tk_err = |e: tokenizers::Error| Error::file(path, format!("tokenizer: {e}"));
    tk.with_normalizer(Some(rep(" ", "\u{2581}")?))
        .map_err(tk_err)?;
    tk.with_pre_tokenizer(Some(
        Split::new(
            SplitPattern::String(" ".into()),
            SplitDelimiterBehavior::MergedWithPrevious,
            false,
        )
        .map_err(|e| Error::msg(e.to_string()))?,
    ));
    tk.with_decoder(Some(Dec::new(vec![
        rep("\u{2581}", " ")?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ])));
    let specials: Vec<AddedToken> = (tokens.iter().zip(&types))
        .filter(|(_, &t)| t == 3)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    tk.add_special_tokens(specials).map_err(tk_err)?;
    let user: Vec<AddedToken> = (tokens.iter().zip(&types))
        .filter(|(_, &t)| t == 4)
        .map(|(s, _)| AddedToken::from(s.clone(), false).normalized(false))
        .collect();
    tk.add_tokens(user).map_err(tk_err)?;
    let flag = |k: &str| key(k).and_then(|v| v.to_bool().ok()).unwrap_or(false);
    let id = |k: &str| key(k).and_then(|v| v.to_u32().ok());
    let name = |i: u32| tokens.get(i as usize).cloned();
    let bos = id("tokenizer.ggml.bos_token_id").and_then(|i| Some((name(i)?, i)));
    let eos = id("tokenizer.ggml.eos_token_id").and_then(|i| Some((name(i)?, i)));
    let (add_bos, add_eos) = (
        flag("tokenizer.ggml.add_bos_token"),
        flag("tokenizer.ggml.add_eos_token"),
    );
    let mut single = vec![];
    let mut specials = vec![];
    if let (true, Some((b, i))) = (add_bos, &bos) {
        single.push(format!("{b}:0"));
        specials.push((b.clone(), *i));
    }
    single.push("$A:0".into());
    if let (true, Some((e, i))) = (add_eos, &eos) {
        single.push(format!("{e}:0"));
        specials.push((e.clone(), *i));
    }
    let pair: Vec<String> = single
        .iter()
        .cloned()
        .chain(
            single
                .iter()
                .map(|p| p.replace(":0", ":1").replace("$A", "$B")),
        )
        .collect();
    let post = TemplateProcessing::builder()
        .try_single(single.join(" "))
        .and_then(|b| b.try_pair(pair.join(" ")))
        .map_err(|e| Error::file(path, format!("tokenizer template: {e}")))?
        .special_tokens(specials)
        .build()
        .map_err(|e| Error::file(path, format!("tokenizer template: {e}")))?;
    tk.with_post_processor(Some(post));
    Ok(tk)
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
