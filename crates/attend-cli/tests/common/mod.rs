//! What the server tests share: the repository root, the scripts they run
//! (fetch-models, client-venv, install-chromium), and a running `attend
//! serve` on a free port.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn script(name: &str) -> String {
    let out = Command::new(root().join("scripts").join(name))
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{name}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A running server and its address; killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_attend"))
            .args(["--threads", "2", "serve", "--port", "0"])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start attend serve");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let base = loop {
            let mut line = String::new();
            if err.read_line(&mut line).unwrap() == 0 {
                panic!("attend serve exited: {seen}");
            }
            seen.push_str(&line);
            if let Some(at) = line.find("http://") {
                let addr = line[at..].split_whitespace().next().unwrap();
                break addr.to_string();
            }
        };
        // keep draining its log (and show it with the test's output)
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                eprintln!("[serve] {l}");
            }
        });
        Server { child, base }
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}
