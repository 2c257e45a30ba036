//! Qwen2, Qwen3, Phi-3 and Llama 3, each a tiny random model built with
//! transformers (`scripts/make-tiny-decoders.py`, committed under
//! `tests/data/tiny-decoders`) and converted to GGUF with llama.cpp's
//! converter: attend's token ids, logits at every position of a prompt
//! (both executors) and greedy continuation against PyTorch's.

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
