//! A strict walk over a GGUF file's header before candle's reader sees it:
//! every count, length and size bounded by the file, the alignment a power
//! of two, tensor names unique, each tensor's bytes (checked arithmetic)
//! aligned and inside the data section, no two tensors overlapping. A file
//! that fails is refused with its path and what is wrong — candle's reader
//! divides by the alignment and trusts sizes, so a hostile header could
//! panic or allocate without bound there.
//!
//! Layout (GGUF v2/v3): magic, version u32, tensor count u64, metadata
//! count u64, the metadata (key string, type u32, value), the tensor infos
//! (name, n_dims u32, dims u64 × n_dims, type u32, offset u64), then the
//! data section at the next multiple of `general.alignment` (default 32).

use crate::error::{Error, Result};
use std::collections::HashSet;
use std::io::{BufReader, Read};
use std::path::Path;

/// (elements per block, bytes per block) of a ggml tensor type id.
fn block(ty: u32) -> Option<(u64, u64)> {
    Some(match ty {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        30 => (1, 2),     // BF16
        _ => return None,
    })
}

struct Reader<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Reader<R> {
    fn bytes(&mut self, n: u64, what: &str) -> std::result::Result<Vec<u8>, String> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(format!(
                "{what} of {n} bytes at byte {} runs past the end of the file ({} bytes)",
                self.pos, self.len
            ));
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|e| format!("{what}: {e}"))?;
        self.pos += n;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        let b = self.bytes(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|_| format!("{what} is not UTF-8"))
    }

    /// Skip a metadata value of type `ty`; returns it as a u64 when it is
    /// an unsigned scalar (for `general.alignment`).
    fn value(
        &mut self,
        ty: u32,
        key: &str,
        depth: u32,
    ) -> std::result::Result<Option<u64>, String> {
        let scalar = |ty| match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        if let Some(n) = scalar(ty) {
            let b = self.bytes(n, key)?;
            let mut v = [0u8; 8];
            v[..n as usize].copy_from_slice(&b);
            return Ok(matches!(ty, 0 | 2 | 4 | 10).then(|| u64::from_le_bytes(v)));
        }
        match ty {
            8 => {
                self.string(key)?;
                Ok(None)
            }
            9 if depth == 0 => {
                let item = self.u32(key)?;
                let n = self.u64(key)?;
                // every item takes at least one byte of the file
                if n > self.len.saturating_sub(self.pos) {
                    return Err(format!(
                        "metadata `{key}` claims {n} items, more than the file holds"
                    ));
                }
                match scalar(item) {
                    Some(w) => {
                        let total = n
                            .checked_mul(w)
                            .ok_or(format!("metadata `{key}` is too large"))?;
                        self.bytes(total, key)?;
                    }
                    None => {
                        for _ in 0..n {
                            self.value(item, key, depth + 1)?;
                        }
                    }
                }
                Ok(None)
            }
            _ => Err(format!(
                "metadata `{key}` has value type {ty}, which GGUF does not define"
            )),
        }
    }
}

/// Walk the header of the GGUF file at `path`; Ok if candle may read it.
pub fn check(path: &Path) -> Result<()> {
    let file =
        std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    let len = file
        .metadata()
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?
        .len();
    let mut r = Reader {
        r: BufReader::new(file),
        pos: 0,
        len,
    };
    walk(&mut r).map_err(|msg| Error::file(path, msg))
}

/// `check` on a file's bytes in memory (the fuzzing entry point): Err with
/// what is wrong.
pub fn check_bytes(bytes: &[u8]) -> std::result::Result<(), String> {
    let mut r = Reader {
        r: bytes,
        pos: 0,
        len: bytes.len() as u64,
    };
    walk(&mut r)
}

fn walk<R: Read>(r: &mut Reader<R>) -> std::result::Result<(), String> {
    let magic = r.bytes(4, "the magic number")?;
    if magic != b"GGUF" {
        return Err("not a valid GGUF file (bad magic number)".into());
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2 or 3)"));
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the metadata count")?;
    // each entry takes more than 8 bytes of the file
    for (n, what) in [(n_tensors, "tensors"), (n_kv, "metadata entries")] {
        if n > r.len / 8 {
            return Err(format!(
                "the header claims {n} {what}, more than the file can hold"
            ));
        }
    }
    let mut alignment = 32u64;
    for _ in 0..n_kv {
        let key = r.string("a metadata key")?;
        let ty = r.u32(&key)?;
        let v = r.value(ty, &key, 0)?;
        if key == "general.alignment" {
            alignment = v.ok_or("metadata `general.alignment` is not an unsigned integer")?;
            if alignment == 0 || !alignment.is_power_of_two() {
                return Err(format!(
                    "metadata `general.alignment` is {alignment}; it must be a power of two"
                ));
            }
        }
    }
    let mut names = HashSet::new();
    let mut spans = Vec::with_capacity(n_tensors.min(1 << 20) as usize);
    for _ in 0..n_tensors {
        let name = r.string("a tensor name")?;
        if !names.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        let n_dims = r.u32(&name)?;
        if n_dims == 0 || n_dims > 4 {
            return Err(format!(
                "tensor `{name}` has {n_dims} dimensions (1 to 4 allowed)"
            ));
        }
        let mut elems = 1u64;
        let mut dims = vec![];
        for _ in 0..n_dims {
            let d = r.u64(&name)?;
            dims.push(d);
            elems = elems
                .checked_mul(d)
                .ok_or(format!("tensor `{name}`: dimensions {dims:?} overflow"))?;
        }
        let ty = r.u32(&name)?;
        let (be, bb) = block(ty).ok_or(format!(
            "tensor `{name}` has type id {ty}, which attend cannot read"
        ))?;
        if elems == 0 || !dims[0].is_multiple_of(be) {
            return Err(format!(
                "tensor `{name}`: dimensions {dims:?} are empty or rows are not whole blocks of {be}"
            ));
        }
        let bytes = (elems / be)
            .checked_mul(bb)
            .ok_or(format!("tensor `{name}`: byte size overflows"))?;
        let offset = r.u64(&name)?;
        if !offset.is_multiple_of(alignment) {
            return Err(format!(
                "tensor `{name}` starts at offset {offset}, not a multiple of the alignment {alignment}"
            ));
        }
        spans.push((offset, bytes, name));
    }
    let data = r.pos.div_ceil(alignment) * alignment;
    let room = r.len.saturating_sub(data);
    spans.sort();
    let mut end = 0u64;
    for (offset, bytes, name) in &spans {
        if *offset < end {
            return Err(format!("tensor `{name}` overlaps the tensor before it"));
        }
        end = offset
            .checked_add(*bytes)
            .filter(|&e| e <= room)
            .ok_or(format!(
                "tensor `{name}` ({bytes} bytes at offset {offset}) runs past the end of the file"
            ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file: metadata (key, type, value bytes), tensor infos
    /// (name, dims, type, offset), then `data` zero bytes after the
    /// header, aligned to 32.
    fn file(
        kvs: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, Vec<u64>, u32, u64)],
        data: usize,
    ) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        for (k, t, v) in kvs {
            s(&mut b, k);
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        for (n, dims, ty, off) in tensors {
            s(&mut b, n);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(off.to_le_bytes());
        }
        b.resize(b.len().div_ceil(32) * 32 + data, 0);
        b
    }

    fn run(name: &str, bytes: &[u8]) -> std::result::Result<(), String> {
        let p = std::env::temp_dir().join(format!("attend-ggufc-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        let r = check(&p).map_err(|e| e.to_string());
        std::fs::remove_file(&p).ok();
        r
    }

    #[test]
    fn hostile_headers_are_refused_by_name() {
        let align = |a: u32| ("general.alignment", 4u32, a.to_le_bytes().to_vec());
        let t = |n: &'static str, off| (n, vec![64u64, 2], 0u32, off); // 512 bytes of f32
                                                                       // a sound file passes
        assert_eq!(
            run("ok", &file(&[align(32)], &[t("a", 0), t("b", 512)], 1024)),
            Ok(())
        );
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "align0",
                file(&[align(0)], &[t("a", 0)], 512),
                "power of two",
            ),
            (
                "align7",
                file(&[align(7)], &[t("a", 0)], 512),
                "power of two",
            ),
            (
                "twice",
                file(&[], &[t("a", 0), t("a", 512)], 1024),
                "appears twice",
            ),
            (
                "overlap",
                file(&[], &[t("a", 0), t("b", 256)], 1024),
                "overlaps",
            ),
            ("unaligned", file(&[], &[t("a", 8)], 1024), "not a multiple"),
            (
                "past-end",
                file(&[], &[t("a", 0), t("b", 512)], 600),
                "past the end",
            ),
            (
                "wrap",
                file(&[], &[("a", vec![1 << 32, 1 << 32, 1 << 2], 0, 0)], 64),
                "overflow",
            ),
            (
                "type",
                file(&[], &[("a", vec![32], 99, 0)], 64),
                "type id 99",
            ),
            ("dims0", file(&[], &[("a", vec![0], 0, 0)], 64), "empty"),
            (
                "blocks",
                file(&[], &[("a", vec![33], 2, 0)], 64),
                "whole blocks of 32",
            ),
        ];
        for (name, bytes, want) in cases {
            let e = run(name, &bytes).unwrap_err();
            assert!(e.contains(want) && e.contains(name), "{name}: {e}");
        }
        // counts and lengths larger than the file
        let mut b = file(&[], &[t("a", 0)], 512);
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(run("count", &b).unwrap_err().contains("more than the file"));
        let mut b = file(&[("k", 8, vec![])], &[], 0);
        let at = 24 + 8 + 1 + 4; // key length, "k", type: the string's length
        b.truncate(at);
        b.extend(u64::MAX.to_le_bytes());
        assert!(run("strlen", &b).unwrap_err().contains("past the end"));
        assert!(run("magic", b"GGUX\x03\x00\x00\x00")
            .unwrap_err()
            .contains("magic"));
        assert!(run("empty", b"").unwrap_err().contains("past the end"));
    }
}
