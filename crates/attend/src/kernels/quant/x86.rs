//! The x86 kernels: AVX-512 (F/BW/VNNI) and AVX2, over the tiles of
//! `formats`. One function per (format, ISA, tokens a pass), monomorphized
//! from the format's constant layout, so the unpacking of each format is
//! straight-line code.
//!
//! Per tile and token: unpack 16 rows × 32 columns into 8 registers of u8
//! (once per tile, shared by the pass's tokens), then 8 `vpdpbusd` against
//! the token's 8-bit activations broadcast 4 bytes at a time give Σ u p per
//! row (per 16-column half for 16-wide sub-blocks), and two FMAs add
//! d·dx·Σup + m·dx·Σp to the row's f32 accumulator. Symmetric formats
//! (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K: u − off) start the integer sum at
//! −off·Σp instead, one FMA a token and tile fewer. AVX2 does the same on
//! 8 rows a register with `vpmaddubsw` + `vpmaddwd` (8-bit values split into
//! nibbles so that the 16-bit pair sums cannot saturate).

use super::formats::{Planes, Scales};
use super::{Activations, Format, GroupFn, Isa, Out, QMatrix, GROUP, TILE_K};
use std::arch::x86_64::*;

/// A format's layout as constants.
trait Fmt {
    const P: Planes;
    const F: Format;
}

macro_rules! fmts {
    ($($name:ident => $f:expr),*) => {
        $(
            struct $name;
            impl Fmt for $name {
                const P: Planes = $f.planes();
                const F: Format = $f;
            }
        )*
    };
}

fmts!(
    F32 => Format::F32, F16 => Format::F16, Bf16 => Format::BF16,
    Q40 => Format::Q4_0, Q41 => Format::Q4_1, Q50 => Format::Q5_0, Q51 => Format::Q5_1,
    Q80 => Format::Q8_0, Q2k => Format::Q2K, Q3k => Format::Q3K, Q4k => Format::Q4K,
    Q5k => Format::Q5K, Q6k => Format::Q6K
);

pub(super) fn group_fn(isa: Isa, fmt: Format) -> GroupFn {
    macro_rules! pick {
        ($t:ty) => {
            match isa {
                Isa::Avx512 => run512::<$t> as GroupFn,
                _ => run256::<$t> as GroupFn,
            }
        };
    }
    match fmt {
        Format::F32 => pick!(F32),
        Format::F16 => pick!(F16),
        Format::BF16 => pick!(Bf16),
        Format::Q4_0 => pick!(Q40),
        Format::Q4_1 => pick!(Q41),
        Format::Q5_0 => pick!(Q50),
        Format::Q5_1 => pick!(Q51),
        Format::Q8_0 => pick!(Q80),
        Format::Q2K => pick!(Q2k),
        Format::Q3K => pick!(Q3k),
        Format::Q4K => pick!(Q4k),
        Format::Q5K => pick!(Q5k),
        Format::Q6K => pick!(Q6k),
    }
}

/// Tokens t0..t0 + nt in passes of 8, then 4, 2, 1: `pass(t, width)`.
#[inline(always)]
fn passes(t0: usize, nt: usize, mut pass: impl FnMut(usize, usize)) {
    let (mut t, end) = (t0, t0 + nt);
    while end - t >= 8 {
        pass(t, 8);
        t += 8;
    }
    for w in [4, 2, 1] {
        if end - t >= w {
            pass(t, w);
            t += w;
        }
    }
}

unsafe fn run512<F: Fmt>(
    w: &QMatrix,
    g: usize,
    x: &Activations,
    t0: usize,
    nt: usize,
    out: Out,
    ldo: usize,
) {
    passes(t0, nt, |t, width| match (F::F.is_float(), width) {
        (true, 8) => float512::<F, 8>(w, g, x, t, out, ldo),
        (true, 4) => float512::<F, 4>(w, g, x, t, out, ldo),
        (true, 2) => float512::<F, 2>(w, g, x, t, out, ldo),
        (true, _) => float512::<F, 1>(w, g, x, t, out, ldo),
        (false, 8) => quant512_8::<F>(w, g, x, t, out, ldo),
        (false, 4) => quant512_4::<F>(w, g, x, t, out, ldo),
        (false, 2) => quant512_2::<F>(w, g, x, t, out, ldo),
        (false, _) => quant512_1::<F>(w, g, x, t, out, ldo),
    })
}

unsafe fn run256<F: Fmt>(
    w: &QMatrix,
    g: usize,
    x: &Activations,
    t0: usize,
    nt: usize,
    out: Out,
    ldo: usize,
) {
    for h in 0..2 {
        if g * GROUP + 8 * h >= w.rows {
            break;
        }
        let (mut t, end) = (t0, t0 + nt);
        if F::F.is_float() {
            while end - t >= 4 {
                float256::<F, 4>(w, g, h, x, t, out, ldo);
                t += 4;
            }
            while t < end {
                float256::<F, 1>(w, g, h, x, t, out, ldo);
                t += 1;
            }
        } else {
            while end - t >= 4 {
                quant256::<F, 4>(w, g, h, x, t, out, ldo);
                t += 4;
            }
            while t < end {
                quant256::<F, 1>(w, g, h, x, t, out, ldo);
                t += 1;
            }
        }
    }
}

/// Rows of group g that exist (the last group may be short).
fn rows_in(w: &QMatrix, g: usize) -> usize {
    (w.rows - g * GROUP).min(GROUP)
}

// ---------------------------------------------------------------- AVX-512

/// `quantize_block` over consecutive blocks of 32: the same arithmetic
/// (d = amax / 127, p = round-to-even(x / d)), 16 lanes at a time.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_blocks(
    xs: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [[f32; 2]],
    sum: &mut [[i32; 2]],
) {
    let abs = _mm512_set1_epi32(0x7FFF_FFFF);
    for (b, ((db, sb), pb)) in d
        .iter_mut()
        .zip(s.iter_mut())
        .zip(sum.iter_mut())
        .enumerate()
    {
        let x0 = _mm512_loadu_ps(xs.as_ptr().add(32 * b));
        let x1 = _mm512_loadu_ps(xs.as_ptr().add(32 * b + 16));
        let a = _mm512_max_ps(
            _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x0), abs)),
            _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x1), abs)),
        );
        let dd = _mm512_reduce_max_ps(a) / 127.0;
        let inv = _mm512_set1_ps(if dd > 0.0 { 1.0 / dd } else { 0.0 });
        let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv));
        let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
        _mm_storeu_si128(
            qs.as_mut_ptr().add(32 * b) as *mut _,
            _mm512_cvtsepi32_epi8(q0),
        );
        _mm_storeu_si128(
            qs.as_mut_ptr().add(32 * b + 16) as *mut _,
            _mm512_cvtsepi32_epi8(q1),
        );
        let (p0, p1) = (_mm512_reduce_add_epi32(q0), _mm512_reduce_add_epi32(q1));
        *db = dd;
        *sb = [dd * p0 as f32, dd * p1 as f32];
        *pb = [p0, p1];
    }
}

#[inline(always)]
unsafe fn srl16(z: __m512i, n: u32) -> __m512i {
    _mm512_srl_epi16(z, _mm_cvtsi32_si128(n as i32))
}

#[inline(always)]
unsafe fn sll16(z: __m512i, n: u32) -> __m512i {
    _mm512_sll_epi16(z, _mm_cvtsi32_si128(n as i32))
}

/// The tile's values as 8 registers of u8 (register j: byte 4r + b = u[r][4j + b]).
#[inline(always)]
unsafe fn unpack512<F: Fmt>(t: *const u8) -> [__m512i; 8] {
    let p = F::P;
    let mut w = [_mm512_setzero_si512(); 8];
    if let Some(o) = p.bytes {
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = _mm512_loadu_si512(t.add(o + 64 * j) as *const _);
        }
    }
    if let Some(o) = p.nibbles {
        let lo = _mm512_set1_epi8(0x0F);
        for i in 0..4 {
            let z = _mm512_loadu_si512(t.add(o + 64 * i) as *const _);
            w[i] = _mm512_and_si512(z, lo);
            w[i + 4] = _mm512_and_si512(srl16(z, 4), lo);
        }
    }
    if let Some((o, shift)) = p.crumbs {
        let three = _mm512_set1_epi8(3);
        for c in 0..2 {
            let z = _mm512_loadu_si512(t.add(o + 64 * c) as *const _);
            for s in 0..4 {
                let v = _mm512_and_si512(srl16(z, 2 * s as u32), three);
                let j = 4 * c + s;
                w[j] = if shift == 0 {
                    v
                } else {
                    _mm512_or_si512(w[j], sll16(v, shift))
                };
            }
        }
    }
    if let Some((o, bit)) = p.mask {
        let add = _mm512_set1_epi8(1 << bit);
        for (j, wj) in w.iter_mut().enumerate() {
            let k: __mmask64 = std::ptr::read_unaligned(t.add(o + 8 * j) as *const u64);
            *wj = _mm512_mask_add_epi8(*wj, k, *wj, add);
        }
    }
    w
}

/// d and m of each sub-block, one lane per row.
#[inline(always)]
unsafe fn scales512<F: Fmt>(
    t: *const u8,
    dsup: __m512,
    dmin: __m512,
) -> ([__m512; 2], [__m512; 2]) {
    let p = F::P;
    let s = t.add(p.scale_at);
    let mut d = [_mm512_setzero_ps(); 2];
    let mut m = [_mm512_setzero_ps(); 2];
    match p.scales {
        Scales::None => {}
        Scales::Sym(off) => {
            d[0] = _mm512_cvtph_ps(_mm256_loadu_si256(s as *const _));
            m[0] = _mm512_mul_ps(d[0], _mm512_set1_ps(-(off as f32)));
        }
        Scales::Affine => {
            d[0] = _mm512_cvtph_ps(_mm256_loadu_si256(s as *const _));
            m[0] = _mm512_cvtph_ps(_mm256_loadu_si256(s.add(32) as *const _));
        }
        Scales::KAffine => {
            for sub in 0..p.nsub {
                let sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(s.add(GROUP * sub) as *const _));
                let mn = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                    s.add(GROUP * (p.nsub + sub)) as *const _
                ));
                d[sub] = _mm512_mul_ps(dsup, _mm512_cvtepi32_ps(sc));
                m[sub] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(mn));
            }
        }
        Scales::KSym(off) => {
            for sub in 0..p.nsub {
                let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(s.add(GROUP * sub) as *const _));
                d[sub] = _mm512_mul_ps(dsup, _mm512_cvtepi32_ps(sc));
                m[sub] = _mm512_mul_ps(d[sub], _mm512_set1_ps(-(off as f32)));
            }
        }
    }
    (d, m)
}

/// One token's contribution from one tile: acc += d·dx·Σup + m·dx·Σp
/// (per 16-column half for 16-wide sub-blocks); `b` the token's block.
#[inline(always)]
unsafe fn tok512<F: Fmt>(
    acc: &mut __m512,
    wv: &[__m512i; 8],
    dv: &[__m512; 2],
    mv: &[__m512; 2],
    q: &super::Q8Rows,
    b: usize,
) {
    let xq = q.qs.as_ptr().add(b * TILE_K) as *const i32;
    let xd = _mm512_set1_ps(*q.d.get_unchecked(b));
    let xs = *q.s.get_unchecked(b);
    if let Scales::Sym(off) = F::P.scales {
        // Σ (u − off)·p = Σ u·p − off·Σp: the offset's term starts the
        // integer sum (one broadcast load) instead of a float FMA per token
        let p = q.sum.get_unchecked(b);
        let mut i = _mm512_set1_epi32(-(off as i32) * (p[0] + p[1]));
        for (j, wj) in wv.iter().enumerate() {
            i = _mm512_dpbusd_epi32(i, *wj, _mm512_set1_epi32(*xq.add(j)));
        }
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(dv[0], xd), *acc);
    } else if F::P.nsub == 1 {
        let mut i = _mm512_setzero_si512();
        for (j, wj) in wv.iter().enumerate() {
            i = _mm512_dpbusd_epi32(i, *wj, _mm512_set1_epi32(*xq.add(j)));
        }
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(dv[0], xd), *acc);
        *acc = _mm512_fmadd_ps(mv[0], _mm512_set1_ps(xs[0] + xs[1]), *acc);
    } else {
        // 16-wide sub-blocks; a symmetric offset again starts each half's sum
        let (mut i0, mut i1) = match F::P.scales {
            Scales::KSym(off) => {
                let p = q.sum.get_unchecked(b);
                (
                    _mm512_set1_epi32(-(off as i32) * p[0]),
                    _mm512_set1_epi32(-(off as i32) * p[1]),
                )
            }
            _ => (_mm512_setzero_si512(), _mm512_setzero_si512()),
        };
        for j in 0..4 {
            i0 = _mm512_dpbusd_epi32(i0, wv[j], _mm512_set1_epi32(*xq.add(j)));
            i1 = _mm512_dpbusd_epi32(i1, wv[j + 4], _mm512_set1_epi32(*xq.add(j + 4)));
        }
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(dv[0], xd), *acc);
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(dv[1], xd), *acc);
        if !matches!(F::P.scales, Scales::KSym(_)) {
            *acc = _mm512_fmadd_ps(mv[0], _mm512_set1_ps(xs[0]), *acc);
            *acc = _mm512_fmadd_ps(mv[1], _mm512_set1_ps(xs[1]), *acc);
        }
    }
}

/// How far ahead of the tile being read the AVX-512 kernels prefetch the
/// weights (a task's tiles lie end to end). The hardware prefetchers alone
/// left the kernel waiting on its tile loads about half the time in a
/// 16-sequence decode step; measured against 0, 1,024 and 2,048 bytes,
/// 4,096 gave SmolLM2 Q4_1 +25–40% and Gemma 3 Q4_K_M +25–35% there
/// (BENCHMARKS.md), and one sequence no loss. A prefetch past the end of
/// the matrix is harmless (prefetches do not fault).
const PREFETCH_BYTES: usize = 4096;

/// The AVX-512 kernel for TT tokens a pass, one function per TT with the
/// token loop written out (literal indices keep the accumulators in
/// registers; a loop over them left them on the stack).
macro_rules! quant512_pass {
    ($name:ident, $tt:literal, [$($i:literal),*]) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,f16c,fma")]
        unsafe fn $name<F: Fmt>(
            w: &QMatrix,
            g: usize,
            x: &Activations,
            t0: usize,
            out: Out,
            ldo: usize,
        ) {
            let p = F::P;
            let q = x.q8();
            let nkt = w.ktiles;
            let tb = p.tile_bytes;
            let base = w.tiles.bytes().as_ptr().add(g * nkt * tb);
            let mut acc = [_mm512_setzero_ps(); $tt];
            let (mut dsup, mut dmin) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for kt in 0..nkt {
                if F::F.is_k() && kt % 8 == 0 {
                    let (ds, dm) = w.sup(g, kt / 8);
                    dsup = _mm512_loadu_ps(ds.as_ptr());
                    dmin = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(dm.as_ptr()));
                }
                let t = base.add(kt * tb);
                for l in (0..tb).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(t.add(PREFETCH_BYTES + l) as *const i8);
                }
                let wv = unpack512::<F>(t);
                let (dv, mv) = scales512::<F>(t, dsup, dmin);
                $( tok512::<F>(&mut acc[$i], &wv, &dv, &mv, q, (t0 + $i) * nkt + kt); )*
            }
            store512(w, g, &acc, t0, out, ldo);
        }
    };
}

quant512_pass!(quant512_1, 1, [0]);
quant512_pass!(quant512_2, 2, [0, 1]);
quant512_pass!(quant512_4, 4, [0, 1, 2, 3]);
quant512_pass!(quant512_8, 8, [0, 1, 2, 3, 4, 5, 6, 7]);

#[inline(always)]
unsafe fn store512<const TT: usize>(
    w: &QMatrix,
    g: usize,
    acc: &[__m512; TT],
    t0: usize,
    out: Out,
    ldo: usize,
) {
    let rows = rows_in(w, g);
    let k: __mmask16 = if rows == GROUP {
        0xFFFF
    } else {
        (1u16 << rows) - 1
    };
    for (tt, a) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.0.add((t0 + tt) * ldo + g * GROUP), k, *a);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn float512<F: Fmt, const TT: usize>(
    w: &QMatrix,
    g: usize,
    x: &Activations,
    t0: usize,
    out: Out,
    ldo: usize,
) {
    let nkt = w.ktiles;
    let tb = F::P.tile_bytes;
    let base = w.tiles.bytes().as_ptr().add(g * nkt * tb);
    let mut acc = [_mm512_setzero_ps(); TT];
    for kt in 0..nkt {
        let t = base.add(kt * tb);
        for c in 0..TILE_K {
            let wc = match F::F {
                Format::F32 => _mm512_loadu_ps(t.add(c * GROUP * 4) as *const f32),
                Format::F16 => {
                    _mm512_cvtph_ps(_mm256_loadu_si256(t.add(c * GROUP * 2) as *const _))
                }
                _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256(t.add(c * GROUP * 2) as *const _),
                ))),
            };
            for (tt, a) in acc.iter_mut().enumerate() {
                let xv = *x.x.get_unchecked((t0 + tt) * w.cols + kt * TILE_K + c);
                *a = _mm512_fmadd_ps(wc, _mm512_set1_ps(xv), *a);
            }
        }
    }
    store512(w, g, &acc, t0, out, ldo);
}

// ------------------------------------------------------------------ AVX2

#[inline(always)]
unsafe fn srl16y(z: __m256i, n: u32) -> __m256i {
    _mm256_srl_epi16(z, _mm_cvtsi32_si128(n as i32))
}

#[inline(always)]
unsafe fn sll16y(z: __m256i, n: u32) -> __m256i {
    _mm256_sll_epi16(z, _mm_cvtsi32_si128(n as i32))
}

/// Half h (rows 8h..8h+8) of the tile's values: 8 registers of u8.
#[inline(always)]
unsafe fn unpack256<F: Fmt>(t: *const u8, h: usize) -> [__m256i; 8] {
    let p = F::P;
    let mut w = [_mm256_setzero_si256(); 8];
    let ld = |o: usize| _mm256_loadu_si256(t.add(o + 32 * h) as *const _);
    if let Some(o) = p.bytes {
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = ld(o + 64 * j);
        }
    }
    if let Some(o) = p.nibbles {
        let lo = _mm256_set1_epi8(0x0F);
        for i in 0..4 {
            let z = ld(o + 64 * i);
            w[i] = _mm256_and_si256(z, lo);
            w[i + 4] = _mm256_and_si256(srl16y(z, 4), lo);
        }
    }
    if let Some((o, shift)) = p.crumbs {
        let three = _mm256_set1_epi8(3);
        for c in 0..2 {
            let z = ld(o + 64 * c);
            for s in 0..4 {
                let v = _mm256_and_si256(srl16y(z, 2 * s as u32), three);
                let j = 4 * c + s;
                w[j] = if shift == 0 {
                    v
                } else {
                    _mm256_or_si256(w[j], sll16y(v, shift))
                };
            }
        }
    }
    if let Some((o, bit)) = p.mask {
        // bit i of the 32-bit word -> byte i: 0 or 1 << bit
        let spread = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let add = _mm256_set1_epi8(1 << bit);
        for (j, wj) in w.iter_mut().enumerate() {
            let m = std::ptr::read_unaligned(t.add(o + 8 * j) as *const u64);
            let word = (m >> (32 * h)) as u32;
            let v = _mm256_shuffle_epi8(_mm256_set1_epi32(word as i32), spread);
            let on = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
            *wj = _mm256_or_si256(*wj, _mm256_and_si256(on, add));
        }
    }
    w
}

#[inline(always)]
unsafe fn scales256<F: Fmt>(
    t: *const u8,
    h: usize,
    dsup: __m256,
    dmin: __m256,
) -> ([__m256; 2], [__m256; 2]) {
    let p = F::P;
    let s = t.add(p.scale_at);
    let mut d = [_mm256_setzero_ps(); 2];
    let mut m = [_mm256_setzero_ps(); 2];
    match p.scales {
        Scales::None => {}
        Scales::Sym(off) => {
            d[0] = _mm256_cvtph_ps(_mm_loadu_si128(s.add(16 * h) as *const _));
            m[0] = _mm256_mul_ps(d[0], _mm256_set1_ps(-(off as f32)));
        }
        Scales::Affine => {
            d[0] = _mm256_cvtph_ps(_mm_loadu_si128(s.add(16 * h) as *const _));
            m[0] = _mm256_cvtph_ps(_mm_loadu_si128(s.add(32 + 16 * h) as *const _));
        }
        Scales::KAffine => {
            for sub in 0..p.nsub {
                let sc =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(s.add(GROUP * sub + 8 * h) as *const _));
                let mn = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    s.add(GROUP * (p.nsub + sub) + 8 * h) as *const _,
                ));
                d[sub] = _mm256_mul_ps(dsup, _mm256_cvtepi32_ps(sc));
                m[sub] = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(mn));
            }
        }
        Scales::KSym(off) => {
            for sub in 0..p.nsub {
                let sc =
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(s.add(GROUP * sub + 8 * h) as *const _));
                d[sub] = _mm256_mul_ps(dsup, _mm256_cvtepi32_ps(sc));
                m[sub] = _mm256_mul_ps(d[sub], _mm256_set1_ps(-(off as f32)));
            }
        }
    }
    (d, m)
}

/// Σ over 4 columns of u·p per row lane: u8 values × i8 activations.
#[inline(always)]
unsafe fn dot4<F: Fmt>(w: __m256i, x: __m256i) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    if F::P.bits == 8 {
        // u up to 255: 2·255·127 overflows vpmaddubsw's i16; split nibbles
        let lo = _mm256_set1_epi8(0x0F);
        let wl = _mm256_and_si256(w, lo);
        let wh = _mm256_and_si256(srl16y(w, 4), lo);
        let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(wl, x), ones);
        let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(wh, x), ones);
        _mm256_add_epi32(pl, _mm256_slli_epi32::<4>(ph))
    } else {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quant256<F: Fmt, const TT: usize>(
    w: &QMatrix,
    g: usize,
    h: usize,
    x: &Activations,
    t0: usize,
    out: Out,
    ldo: usize,
) {
    let p = F::P;
    let q = x.q8();
    let nkt = w.ktiles;
    let tb = p.tile_bytes;
    let base = w.tiles.bytes().as_ptr().add(g * nkt * tb);
    let mut acc = [_mm256_setzero_ps(); TT];
    let (mut dsup, mut dmin) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for kt in 0..nkt {
        if F::F.is_k() && kt % 8 == 0 {
            let (ds, dm) = w.sup(g, kt / 8);
            dsup = _mm256_loadu_ps(ds.as_ptr().add(8 * h));
            dmin = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_loadu_ps(dm.as_ptr().add(8 * h)));
        }
        let t = base.add(kt * tb);
        let wv = unpack256::<F>(t, h);
        let (dv, mv) = scales256::<F>(t, h, dsup, dmin);
        for (tt, a) in acc.iter_mut().enumerate() {
            let b = (t0 + tt) * nkt + kt;
            let xq = q.qs.as_ptr().add(b * TILE_K) as *const i32;
            let xd = _mm256_set1_ps(*q.d.get_unchecked(b));
            let xs = *q.s.get_unchecked(b);
            let bx = |j: usize| _mm256_set1_epi32(*xq.add(j));
            if p.nsub == 1 {
                let mut i = _mm256_setzero_si256();
                for (j, wj) in wv.iter().enumerate() {
                    i = _mm256_add_epi32(i, dot4::<F>(*wj, bx(j)));
                }
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(dv[0], xd), *a);
                *a = _mm256_fmadd_ps(mv[0], _mm256_set1_ps(xs[0] + xs[1]), *a);
            } else {
                let (mut i0, mut i1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for j in 0..4 {
                    i0 = _mm256_add_epi32(i0, dot4::<F>(wv[j], bx(j)));
                    i1 = _mm256_add_epi32(i1, dot4::<F>(wv[j + 4], bx(j + 4)));
                }
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(dv[0], xd), *a);
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_mul_ps(dv[1], xd), *a);
                *a = _mm256_fmadd_ps(mv[0], _mm256_set1_ps(xs[0]), *a);
                *a = _mm256_fmadd_ps(mv[1], _mm256_set1_ps(xs[1]), *a);
            }
        }
    }
    store256(w, g, h, &acc, t0, out, ldo);
}

#[inline(always)]
unsafe fn store256<const TT: usize>(
    w: &QMatrix,
    g: usize,
    h: usize,
    acc: &[__m256; TT],
    t0: usize,
    out: Out,
    ldo: usize,
) {
    let rows = rows_in(w, g).saturating_sub(8 * h).min(8);
    for (tt, a) in acc.iter().enumerate() {
        let dst = out.0.add((t0 + tt) * ldo + g * GROUP + 8 * h);
        if rows == 8 {
            _mm256_storeu_ps(dst, *a);
        } else {
            let mut tmp = [0f32; 8];
            _mm256_storeu_ps(tmp.as_mut_ptr(), *a);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, rows);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float256<F: Fmt, const TT: usize>(
    w: &QMatrix,
    g: usize,
    h: usize,
    x: &Activations,
    t0: usize,
    out: Out,
    ldo: usize,
) {
    let nkt = w.ktiles;
    let tb = F::P.tile_bytes;
    let base = w.tiles.bytes().as_ptr().add(g * nkt * tb);
    let mut acc = [_mm256_setzero_ps(); TT];
    for kt in 0..nkt {
        let t = base.add(kt * tb);
        for c in 0..TILE_K {
            let e = c * GROUP + 8 * h;
            let wc = match F::F {
                Format::F32 => _mm256_loadu_ps(t.add(4 * e) as *const f32),
                Format::F16 => _mm256_cvtph_ps(_mm_loadu_si128(t.add(2 * e) as *const _)),
                _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128(t.add(2 * e) as *const _),
                ))),
            };
            for (tt, a) in acc.iter_mut().enumerate() {
                let xv = *x.x.get_unchecked((t0 + tt) * w.cols + kt * TILE_K + c);
                *a = _mm256_fmadd_ps(wc, _mm256_set1_ps(xv), *a);
            }
        }
    }
    store256(w, g, h, &acc, t0, out, ldo);
}
