//! The element types a KV cache stores keys and values in: rows of f32
//! encoded to f32, f16, bf16 or q8_0 (blocks of 32: an f16 scale and 32
//! signed bytes, as GGUF's Q8_0) and decoded back for attention.

use half::{bf16, f16};

/// How a KV cache stores its numbers.
///
/// The default is f16 (as llama.cpp's): on SmolLM2 it costs +0.23%
/// perplexity against f32 (bf16 +0.29%, q8_0 +0.43%), halves the cache, and
/// decodes at 4,096 tokens of context at least as fast as f32 (each slice
/// of 256 keys is decoded once and attended with the query heads' vectors
/// in registers; an f32 cache is read in place by small GEMMs): f16 72.1 /
/// 58.4, f32 53.3 / 58.2, q8_0 74.9 / 62.4 tokens/s in two rounds of one
/// sitting (BENCHMARKS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvDType {
    F32,
    /// Half the bytes of f32 at a relative error ≤ 2⁻¹¹ (llama.cpp's default).
    #[default]
    F16,
    Bf16,
    /// 34 bytes per 32 numbers; error ≤ max|block| / 254.
    Q8_0,
}

impl std::str::FromStr for KvDType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvDType::F32),
            "f16" => Ok(KvDType::F16),
            "bf16" => Ok(KvDType::Bf16),
            "q8_0" | "q8" => Ok(KvDType::Q8_0),
            _ => Err(format!(
                "unknown KV-cache type `{s}` (expected f32, f16, bf16 or q8_0)"
            )),
        }
    }
}

impl std::fmt::Display for KvDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDType::F32 => "f32",
            KvDType::F16 => "f16",
            KvDType::Bf16 => "bf16",
            KvDType::Q8_0 => "q8_0",
        })
    }
}

impl KvDType {
    /// Numbers per block (a row part must start at a block boundary).
    pub fn block(self) -> usize {
        match self {
            KvDType::Q8_0 => 32,
            _ => 1,
        }
    }

    /// Bytes holding n numbers (n a multiple of `block`).
    pub fn bytes(self, n: usize) -> usize {
        match self {
            KvDType::F32 => 4 * n,
            KvDType::F16 | KvDType::Bf16 => 2 * n,
            KvDType::Q8_0 => n / 32 * 34,
        }
    }

    /// src (n, a multiple of `block`) -> dst (`bytes(n)`).
    pub fn encode(self, src: &[f32], dst: &mut [u8]) {
        assert!(
            src.len().is_multiple_of(self.block()) && dst.len() == self.bytes(src.len()),
            "KvDType::encode: {} numbers into {} bytes of {self}",
            src.len(),
            dst.len()
        );
        match self {
            KvDType::F32 => {
                for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                    d.copy_from_slice(&s.to_le_bytes());
                }
            }
            KvDType::F16 => {
                for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&f16::from_f32(*s).to_bits().to_le_bytes());
                }
            }
            KvDType::Bf16 => {
                for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&bf16::from_f32(*s).to_bits().to_le_bytes());
                }
            }
            KvDType::Q8_0 => {
                for (d, s) in dst.chunks_exact_mut(34).zip(src.chunks_exact(32)) {
                    let amax = s.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let scale = f16::from_f32(amax / 127.0);
                    let inv = if scale.to_f32() > 0.0 {
                        1.0 / scale.to_f32()
                    } else {
                        0.0
                    };
                    d[..2].copy_from_slice(&scale.to_bits().to_le_bytes());
                    for (q, v) in d[2..].iter_mut().zip(s) {
                        *q = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
                    }
                }
            }
        }
    }

    /// src (`bytes(n)`) -> dst (n).
    pub fn decode(self, src: &[u8], dst: &mut [f32]) {
        debug_assert_eq!(src.len(), self.bytes(dst.len()));
        match self {
            KvDType::F32 => {
                // Safety: src holds dst.len() little-endian f32s (asserted
                // in debug builds; x86 is little-endian), and the two do
                // not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        dst.as_mut_ptr() as *mut u8,
                        4 * dst.len(),
                    )
                }
            }
            KvDType::F16 => {
                #[cfg(target_arch = "x86_64")]
                if std::is_x86_feature_detected!("avx512f") {
                    // Safety: the CPU has AVX-512 F (checked just above)
                    return unsafe { f16_to_f32_avx512(src, dst) };
                }
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
                }
            }
            KvDType::Bf16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
                }
            }
            KvDType::Q8_0 => {
                for (d, s) in dst.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                    let scale = f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
                    for (o, &q) in d.iter_mut().zip(&s[2..]) {
                        *o = scale * (q as i8) as f32;
                    }
                }
            }
        }
    }
}

/// f16 (little-endian bytes) -> f32, 16 at a time with `vcvtph2ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn f16_to_f32_avx512(src: &[u8], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = dst.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        let h = _mm256_loadu_si256(src.as_ptr().add(2 * i) as *const _);
        _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
    }
    for i in n..dst.len() {
        dst[i] = f16::from_bits(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])).to_f32();
    }
}

/// Rows of f16 `stride` bytes apart, n numbers from byte `at` of each ->
/// dst (rows, n).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f16_rows_avx512(src: &[u8], stride: usize, at: usize, n: usize, dst: &mut [f32]) {
    for (r, d) in dst.chunks_exact_mut(n).enumerate() {
        f16_to_f32_avx512(&src[r * stride + at..][..2 * n], d);
    }
}

/// Rows of `width` numbers in a KV type: one KV head's keys or values,
/// (tokens, head_dim), as the cache (`cache::kv`) holds them. The rows lie
/// in pages of `page` rows each — one page for a contiguous cache, blocks
/// of a paged one (`cache::paged`): row j is row j mod page of page
/// j / page. Only the first `n` rows count.
#[derive(Clone)]
pub struct KvRows<'a> {
    pub dtype: KvDType,
    pub width: usize,
    pub pages: Vec<&'a [u8]>,
    /// Rows per page (every page but the last holds exactly this many).
    pub page: usize,
    n: usize,
}

impl<'a> KvRows<'a> {
    /// All the rows of one buffer.
    pub fn contiguous(dtype: KvDType, bytes: &'a [u8], width: usize) -> Self {
        let n = bytes.len() / dtype.bytes(width).max(1);
        Self {
            dtype,
            width,
            pages: vec![bytes],
            page: n.max(1),
            n,
        }
    }

    /// The first n rows of pages of `page` rows each.
    pub fn paged(
        dtype: KvDType,
        pages: Vec<&'a [u8]>,
        page: usize,
        width: usize,
        n: usize,
    ) -> Self {
        let rb = dtype.bytes(width);
        assert!(
            page > 0 && n <= pages.len() * page && pages.iter().all(|p| p.len() >= page * rb),
            "KvRows: {n} rows do not fit {} pages of {page}",
            pages.len()
        );
        Self {
            dtype,
            width,
            pages,
            page,
            n,
        }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    /// The bytes from row j to the end of its page, and how many rows of
    /// them count (≥ 1 for j < n).
    pub fn run(&self, j: usize) -> (&'a [u8], usize) {
        let rb = self.dtype.bytes(self.width);
        let (p, r) = (j / self.page, j % self.page);
        let len = (self.page - r).min(self.n.saturating_sub(j));
        (&self.pages[p][r * rb..], len)
    }

    /// Numbers `at..at + dst.len()` of row j (at a block boundary).
    pub fn decode(&self, j: usize, at: usize, dst: &mut [f32]) {
        let t = self.dtype;
        let row = &self.run(j).0[..t.bytes(self.width)];
        t.decode(&row[t.bytes(at)..][..t.bytes(dst.len())], dst);
    }

    /// Numbers `at..at + n` of rows j0..j0 + dst.len() / n, one after
    /// another into dst ((rows, n)); one call per page's stretch of rows,
    /// so that the SIMD conversions are not entered once per short row.
    pub fn decode_rows(&self, j0: usize, at: usize, n: usize, dst: &mut [f32]) {
        let mut j = j0;
        let mut rest = dst;
        while !rest.is_empty() {
            let (bytes, len) = self.run(j);
            let len = len.min(rest.len() / n);
            assert!(len > 0, "KvRows: rows past the end");
            let (d, tail) = rest.split_at_mut(len * n);
            self.decode_run(bytes, at, n, d);
            rest = tail;
            j += len;
        }
    }

    /// decode_rows within one page: `src` starts at the first row.
    fn decode_run(&self, src: &[u8], at: usize, n: usize, dst: &mut [f32]) {
        let t = self.dtype;
        let rb = t.bytes(self.width);
        #[cfg(target_arch = "x86_64")]
        if t == KvDType::F16 && std::is_x86_feature_detected!("avx512f") {
            // Safety: the CPU has AVX-512 F (checked just above); the rows
            // lie inside `src` (asserted).
            assert!(src.len() >= (dst.len() / n - 1) * rb + 2 * (at + n));
            if at == 0 && n == self.width {
                // whole rows, back to back: one conversion
                return unsafe { f16_to_f32_avx512(&src[..2 * dst.len()], dst) };
            }
            return unsafe { f16_rows_avx512(src, rb, 2 * at, n, dst) };
        }
        for (r, d) in dst.chunks_exact_mut(n).enumerate() {
            let row = &src[r * rb..][..rb];
            t.decode(&row[t.bytes(at)..][..t.bytes(n)], d);
        }
    }

    /// The rows from j to the end of j's page as f32 numbers in place,
    /// when they are f32 (and aligned).
    pub fn run_f32(&self, j: usize) -> Option<&'a [f32]> {
        if self.dtype != KvDType::F32 {
            return None;
        }
        // Safety: any 4 aligned bytes are a valid f32.
        let (head, mid, tail) = unsafe { self.run(j).0.align_to::<f32>() };
        (head.is_empty() && tail.is_empty()).then_some(mid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_stay_within_each_types_bound() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37 + (i as f32 * 0.1).sin())
            .collect();
        for t in [KvDType::F32, KvDType::F16, KvDType::Bf16, KvDType::Q8_0] {
            let mut enc = vec![0u8; t.bytes(x.len())];
            t.encode(&x, &mut enc);
            let mut back = vec![0f32; x.len()];
            t.decode(&enc, &mut back);
            for (a, r) in x.chunks(32).zip(back.chunks(32)) {
                let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (v, w) in a.iter().zip(r) {
                    let bound = match t {
                        KvDType::F32 => 0.0,
                        KvDType::F16 => v.abs() * 2f32.powi(-11),
                        KvDType::Bf16 => v.abs() * 2f32.powi(-8),
                        // half a step of d = amax/127, d itself rounded to f16
                        KvDType::Q8_0 => {
                            amax / 254.0 * (1.0 + 2f32.powi(-10)) + amax * 2f32.powi(-11)
                        }
                    };
                    assert!((v - w).abs() <= bound, "{t}: {v} -> {w} (bound {bound})");
                }
            }
        }
        assert_eq!("Q8_0".parse::<KvDType>().unwrap(), KvDType::Q8_0);
        assert!("f8".parse::<KvDType>().is_err());
    }
}
