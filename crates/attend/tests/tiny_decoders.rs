//! Qwen2, Qwen3, Phi-3 and Llama 3, each a tiny random model built with
//! transformers (`scripts/make-tiny-decoders.py`, committed under
//! `tests/data/tiny-decoders`) and converted to GGUF with llama.cpp's
//! converter (and a Gemma 3 folder): attend's token ids, logits at every
//! position of a prompt (both executors) and greedy continuation against
//! PyTorch's.

use attend::formats::gguf;
use attend::model::Executor;
use attend::Transformer;
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::PathBuf;

const FAMILIES: [&str; 4] = ["qwen2", "qwen3", "phi3", "llama3"];

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-decoders")
}

fn reference(family: &str) -> Value {
    let p = data().join(family).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Logits of every prompt position on `exec`: (t, vocab).
fn logits(m: &Transformer, prompt: &[u32], exec: Executor) -> Vec<Vec<f32>> {
    let mut st = m.new_state(None).unwrap();
    let x = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.step_on(exec, &x, &mut st, false)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// n greedy tokens after the prompt, one decode step each, on `exec`.
fn greedy(m: &Transformer, prompt: &[u32], n: usize, exec: Executor) -> Vec<u32> {
    let mut st = m.new_state(None).unwrap();
    let mut x = prompt.to_vec();
    let mut out = vec![];
    for _ in 0..n {
        let t = Tensor::new(&x[..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let l = m.step_on(exec, &t, &mut st, true).unwrap();
        let next = l
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        out.push(next);
        x = vec![next];
    }
    out
}

/// max |a − b| / max |b| over a row: the relative error of a logit vector.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn check(m: &Transformer, fx: &Value, what: &str) {
    let prompt = ids(&fx["prompt_ids"]);
    let want: Vec<Vec<f32>> = fx["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let greedy_want = ids(&fx["greedy"]);
    for exec in [Executor::Cpu, Executor::Graph] {
        let got = logits(m, &prompt, exec);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = rel(g, w);
            assert!(
                e <= 1e-4,
                "{what} on {exec:?}: position {i}, relative error {e:.2e}"
            );
        }
        let g = greedy(m, &prompt, greedy_want.len(), exec);
        assert_eq!(g, greedy_want, "{what} on {exec:?}: greedy continuation");
    }
}

#[test]
fn tiny_gguf_decoders_match_transformers() {
    for family in FAMILIES {
        let fx = reference(family);
        let path = data().join(format!("{family}.gguf"));
        let g = gguf::load(&path, false, &Device::Cpu).unwrap();
        assert_eq!(
            g.arch.name,
            if family == "llama3" { "llama" } else { family }
        );
        for t in fx["texts"].as_array().unwrap() {
            let text = t["text"].as_str().unwrap();
            assert_eq!(
                g.tokenizer.encode(text, true).unwrap(),
                ids(&t["ids"]),
                "{family}: token ids of {text:?}"
            );
        }
        assert_eq!(
            g.tokenizer
                .encode(fx["prompt"].as_str().unwrap(), true)
                .unwrap(),
            ids(&fx["prompt_ids"])
        );
        let m = g.build().unwrap();
        check(&m, &fx, &format!("{family}.gguf"));
    }
}

#[test]
fn tiny_hf_decoders_match_transformers() {
    // (Gemma 3 as a folder too: sandwich norms stored as w for 1 + w,
    // windows of 8 tokens, the sixth of seven layers global)
    use attend::formats::hf_decoder;
    for family in FAMILIES.iter().copied().chain(["gemma3"]) {
        let fx = reference(family);
        let g = hf_decoder::load(&data().join(family), None, &Device::Cpu).unwrap();
        for t in fx["texts"].as_array().unwrap() {
            let text = t["text"].as_str().unwrap();
            assert_eq!(
                g.tokenizer.encode(text, true).unwrap(),
                ids(&t["ids"]),
                "{family}: token ids of {text:?}"
            );
        }
        let m = g.build().unwrap();
        check(
            &m,
            &fx,
            &format!("{family} folder ({} weights)", fx["weights"]),
        );
    }
}

#[test]
fn quantized_at_load_equals_llama_cpp_quantization() {
    // --quantize q8_0 on the folder against llama.cpp's converter with
    // --outtype q8_0 on the same folder: the same blocks, so the same
    // logits; and q4_k falls back to q8_0 on rows of 64 and 128 (no whole
    // 256-wide super-block), as llama.cpp falls back
    use attend::formats::hf_decoder;
    for family in FAMILIES {
        let fx = reference(family);
        let prompt = ids(&fx["prompt_ids"]);
        let path = data().join(format!("{family}-q8_0.gguf"));
        let theirs = gguf::load(&path, false, &Device::Cpu).unwrap();
        let want = logits(&theirs.build().unwrap(), &prompt, Executor::Cpu);
        let f32_logits = logits(
            &hf_decoder::load(&data().join(family), None, &Device::Cpu)
                .unwrap()
                .build()
                .unwrap(),
            &prompt,
            Executor::Cpu,
        );
        for q in ["q8_0", "q4_k"] {
            let g = hf_decoder::load(
                &data().join(family),
                hf_decoder::quant_type(q),
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(
                g.tensor_types.get("q8_0"),
                theirs.tensor_types.get("q8_0"),
                "{family} {q}"
            );
            let got = logits(&g.build().unwrap(), &prompt, Executor::Cpu);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                let e = rel(a, b);
                assert!(
                    e <= 1e-5,
                    "{family} {q}: position {i}, relative error {e:.2e}"
                );
            }
            // and it did quantize
            let moved = got
                .iter()
                .zip(&f32_logits)
                .map(|(a, b)| rel(a, b))
                .fold(0f32, f32::max);
            assert!(
                moved > 1e-4,
                "{family} {q}: the logits equal f32's ({moved:.1e})"
            );
        }
    }
}

/// A copy of the qwen2 folder with `edit` applied to its files.
fn broken(name: &str, edit: impl FnOnce(&std::path::Path)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("attend-tiny-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(data().join("qwen2")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    edit(&dir);
    dir
}

fn edit_config(dir: &std::path::Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn bad_hf_folders_name_the_file_and_key() {
    use attend::formats::hf_decoder;
    let load = |dir: &std::path::Path| {
        hf_decoder::load(dir, None, &Device::Cpu)
            .and_then(|g| g.build())
            .err()
            .unwrap_or_else(|| panic!("{} loaded", dir.display()))
            .to_string()
    };
    let cases: Vec<(&str, PathBuf, Vec<&str>)> = vec![
        (
            "unknown model_type",
            broken("type", |d| {
                edit_config(d, |v| v["model_type"] = "mamba".into())
            }),
            vec!["config.json", "`model_type` `mamba`", "qwen2"],
        ),
        (
            "a field of the wrong type",
            broken("field", |d| {
                edit_config(d, |v| v["hidden_size"] = "64".into())
            }),
            vec!["config.json", "hidden_size"],
        ),
        (
            "a layer the weights lack",
            broken("layers", |d| {
                edit_config(d, |v| v["num_hidden_layers"] = 3.into())
            }),
            vec!["model.layers.2.", "is missing", "num_hidden_layers"],
        ),
        (
            "a layer the config lacks",
            broken("extra", |d| {
                edit_config(d, |v| v["num_hidden_layers"] = 1.into())
            }),
            vec!["model.layers.1.", "not used", "num_hidden_layers"],
        ),
        (
            "a context attend does not support",
            broken("context", |d| {
                edit_config(d, |v| {
                    v["max_position_embeddings"] = 1_000_000_000_000u64.into()
                })
            }),
            vec!["config.json", "`max_position_embeddings`"],
        ),
        (
            "heads that do not divide the width",
            broken("heads", |d| {
                edit_config(d, |v| v["num_attention_heads"] = 3.into())
            }),
            vec!["config.json", "`hidden_size`", "num_attention_heads (3)"],
        ),
        (
            "unsupported rope scaling",
            broken("rope", |d| {
                edit_config(d, |v| v["rope_parameters"]["rope_type"] = "yarn".into())
            }),
            vec!["config.json", "yarn"],
        ),
        (
            "no weights",
            broken("noweights", |d| {
                std::fs::remove_file(d.join("model.safetensors")).unwrap()
            }),
            vec!["safetensors"],
        ),
        (
            "no tokenizer",
            broken("notok", |d| {
                std::fs::remove_file(d.join("tokenizer.json")).unwrap()
            }),
            vec!["tokenizer.json"],
        ),
    ];
    for (what, dir, want) in cases {
        let e = load(&dir);
        assert!(!e.contains('\n'), "{what}: more than one line: {e}");
        for w in want {
            assert!(e.contains(w), "{what}: {e:?} does not name {w:?}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Bytes of the tiny qwen2 GGUF with the value of metadata `key` patched:
/// `f(bytes, at)` where `at` is the value's type tag (u32), after the key.
fn patched_gguf(name: &str, key: &str, f: impl FnOnce(&mut Vec<u8>, usize)) -> PathBuf {
    let mut b = std::fs::read(data().join("qwen2.gguf")).unwrap();
    let k = key.as_bytes();
    let at = b.windows(k.len()).position(|w| w == k).unwrap() + k.len();
    f(&mut b, at);
    let p = std::env::temp_dir().join(format!("attend-{name}-{}.gguf", std::process::id()));
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn bad_gguf_files_name_the_file_and_key() {
    const U32: u32 = 4;
    const F32: u32 = 6;
    const STRING: u32 = 8;
    let cases = [
        (
            patched_gguf("arch", "general.architecture", |b, at| {
                assert_eq!(b[at..at + 4], STRING.to_le_bytes());
                // (u64 length, then the string)
                b[at + 12..at + 17].copy_from_slice(b"qwenX");
            }),
            vec!["unsupported architecture `qwenX`", "qwen2, qwen3, phi3"],
        ),
        (
            patched_gguf("type", "qwen2.attention.head_count", |b, at| {
                assert_eq!(b[at..at + 4], U32.to_le_bytes());
                b[at..at + 4].copy_from_slice(&F32.to_le_bytes());
            }),
            vec!["`qwen2.attention.head_count` is not a count"],
        ),
        (
            patched_gguf("layers", "qwen2.block_count", |b, at| {
                assert_eq!(b[at..at + 4], U32.to_le_bytes());
                b[at + 4..at + 8].copy_from_slice(&3u32.to_le_bytes());
            }),
            vec!["tensor `blk.2.", "is missing", "`qwen2.block_count`"],
        ),
    ];
    for (path, want) in cases {
        let e = gguf::load(&path, false, &Device::Cpu)
            .and_then(|g| g.build())
            .err()
            .unwrap_or_else(|| panic!("{} loaded", path.display()))
            .to_string();
        let file = path.file_name().unwrap().to_str().unwrap();
        assert!(e.contains(file) && !e.contains('\n'), "{e}");
        for w in want {
            assert!(e.contains(w), "{e:?} does not name {w:?}");
        }
        std::fs::remove_file(path).unwrap();
    }
}
