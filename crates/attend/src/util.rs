//! Small helpers: atomic file writes, seed derivation, the memory limit.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Write a file atomically: `write` fills a temporary file beside `path`,
/// which is then renamed over it, so a crash never leaves a half-written file.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = tmp_path(path);
    write(&tmp)?;
    let f = std::fs::File::open(&tmp).map_err(|e| Error::file(&tmp, e))?;
    f.sync_all().map_err(|e| Error::file(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e))?;
    Ok(())
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::file(tmp, e))
    })
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Derive an independent seed for stream `stream` at `index` (SplitMix64).
pub fn derive_seed(seed: u64, stream: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(index.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The machine's physical memory in bytes (`MemTotal` of /proc/meminfo;
/// 16 GiB where that cannot be read).
pub fn physical_memory() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            kb.checked_mul(1024)
        })
        .unwrap_or(16 << 30)
}

/// The memory limit set by `set_memory_limit` (0: none set).
static MEMORY_LIMIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Limit what the size checks allow (the CLI's `--max-memory`); the
/// default is the machine's physical memory.
pub fn set_memory_limit(bytes: usize) {
    MEMORY_LIMIT.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// The bytes a model, cache, batch or beam may take before it is refused:
/// `set_memory_limit`'s, else the machine's physical memory.
pub fn memory_limit() -> usize {
    match MEMORY_LIMIT.load(std::sync::atomic::Ordering::Relaxed) {
        0 => physical_memory(),
        b => b,
    }
}

/// Bytes for people: "1.5 GiB", "12.0 MiB", "300 bytes".
pub fn human_bytes(b: usize) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} bytes"),
    }
}

/// Refuse `what` (naming `field`: a config field or flag) when it needs
/// more than the memory limit; `need` is None when the size itself
/// overflowed. The message gives both figures and how to change the limit.
pub fn check_fits(field: &str, what: &str, need: Option<usize>) -> Result<()> {
    match over_limit(what, need) {
        None => Ok(()),
        Some(msg) => Err(Error::config(field, msg)),
    }
}

/// `check_fits`'s message, when `need` is over the limit.
pub fn over_limit(what: &str, need: Option<usize>) -> Option<String> {
    let limit = memory_limit();
    if need.is_some_and(|b| b <= limit) {
        return None;
    }
    let set = MEMORY_LIMIT.load(std::sync::atomic::Ordering::Relaxed) != 0;
    Some(format!(
        "{what} would take {}, more than the memory limit of {} ({})",
        need.map_or("more than 2^64 bytes".into(), human_bytes),
        human_bytes(limit),
        if set {
            "--max-memory"
        } else {
            "this machine's memory; --max-memory sets another"
        }
    ))
}

/// Parse a byte size: a number with an optional unit, binary multiples
/// (`512M`, `1.5GiB`, `8G`, `4096`, `2T`): the CLI's `--max-memory`.
pub fn parse_bytes(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("unknown unit `{u}` in `{s}` (use K, M, G or T)")),
    };
    let x: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 512M, 8G)"))?;
    let b = x * mult as f64;
    if !b.is_finite() || b < 1.0 || b > usize::MAX as f64 {
        return Err(format!("`{s}` is not a usable size (from 1 byte to 2^64)"));
    }
    Ok(b as usize)
}
