//! Weight formats: GGUF's block layouts decoded to one canonical form, and
//! the tile layout the kernels read.
//!
//! Every integer format stores, per sub-block of 32 (or 16) weights,
//! unsigned values u and a scale and a minimum such that w = d·u + m:
//!
//! | format | bits of u | sub-block | d, m |
//! | --- | --- | --- | --- |
//! | Q4_0, Q5_0, Q8_0 | 4, 5, 8 | 32 | d (f16); m = −8d, −16d, −128d (u = q + 128 for Q8_0) |
//! | Q4_1, Q5_1 | 4, 5 | 32 | d, m (f16) |
//! | Q4_K, Q5_K | 4, 5 | 32 | d·sc, −dmin·mn (6-bit sc, mn per sub-block; f16 d, dmin per 256) |
//! | Q2_K | 2 | 16 | d·sc, −dmin·mn (4-bit sc, mn) |
//! | Q3_K | 3 | 16 | d·sc, −4·d·sc (6-bit signed sc) |
//! | Q6_K | 6 | 16 | d·sc, −32·d·sc (8-bit signed sc) |
//!
//! The kernels read a matrix as tiles of 16 rows × 32 columns (a row group
//! times one block of columns), stored one after another, row group by row
//! group. Inside a tile the values are interleaved so that one 64-byte
//! register holds, for each of the 16 rows, 4 consecutive columns — the
//! operand layout of `vpdpbusd` (16 rows × 4 products per instruction):
//! "unpacked register" j (0..8) holds byte 4r + b = u[r][4j + b].
//! The values are stored in bit planes that expand to those registers:
//!
//! * bytes (8 bits): register j is bytes 64j..64j+64;
//! * nibbles (4 bits): 4 registers, low nibbles = unpacked j, high = j + 4;
//! * crumbs (2 bits): 2 registers, bits 2s..2s+2 of register c = unpacked 4c + s;
//! * a mask (1 bit): 8 × 64 bits, bit 4r + b of word j = that bit of u[r][4j + b].
//!
//! 5-bit values are nibbles + a mask (bit 4), 6-bit nibbles + crumbs
//! (bits 4–5), 3-bit crumbs + a mask (bit 2). The scale section follows
//! the values; K-quant super-block factors (d, dmin per 256 columns and
//! row) live in a separate array. Float formats (F32, F16, BF16) store a
//! tile column-major: 32 columns × 16 rows of the element type.

// Indices in these loops mirror the bit layouts they pack and unpack.
#![allow(clippy::needless_range_loop)]

use half::{bf16, f16};

/// Rows in a row group, columns in a tile.
pub const GROUP: usize = 16;
pub const TILE_K: usize = 32;

/// A weight format: GGUF's quantized block types and the float types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl Format {
    /// The format of a GGUF tensor type, if attend's kernels run it.
    pub fn of_ggml(t: candle_core::quantized::GgmlDType) -> Option<Format> {
        use candle_core::quantized::GgmlDType as G;
        Some(match t {
            G::F32 => Format::F32,
            G::F16 => Format::F16,
            G::BF16 => Format::BF16,
            G::Q4_0 => Format::Q4_0,
            G::Q4_1 => Format::Q4_1,
            G::Q5_0 => Format::Q5_0,
            G::Q5_1 => Format::Q5_1,
            G::Q8_0 => Format::Q8_0,
            G::Q2K => Format::Q2K,
            G::Q3K => Format::Q3K,
            G::Q4K => Format::Q4K,
            G::Q5K => Format::Q5K,
            G::Q6K => Format::Q6K,
            _ => return None,
        })
    }
}

/// How a sub-block's d and m are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scales {
    /// Float weights: no scales.
    None,
    /// d (f16) per row; m = −offset·d.
    Sym(u32),
    /// d, m (f16) per row.
    Affine,
    /// sc, mn (u8) per sub-block and row; d = dsup·sc, m = −dmin·mn.
    KAffine,
    /// sc (i8) per sub-block and row; d = dsup·sc, m = −offset·d.
    KSym(u32),
}

/// Where a format's values live in a tile (offsets in bytes).
#[derive(Clone, Copy, Debug)]
pub struct Planes {
    pub bits: u32,
    pub bytes: Option<usize>,
    pub nibbles: Option<usize>,
    /// Offset and the bit position the crumbs land on (0 or 4).
    pub crumbs: Option<(usize, u32)>,
    /// Offset and the bit the mask sets.
    pub mask: Option<(usize, u32)>,
    /// Sub-blocks per tile: 1 (32 columns) or 2 (16).
    pub nsub: usize,
    pub scales: Scales,
    /// Where the scale section starts.
    pub scale_at: usize,
    pub tile_bytes: usize,
}

impl Format {
    pub const ALL: [Format; 13] = [
        Format::F32,
        Format::F16,
        Format::BF16,
        Format::Q4_0,
        Format::Q4_1,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q8_0,
        Format::Q2K,
        Format::Q3K,
        Format::Q4K,
        Format::Q5K,
        Format::Q6K,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::F16 => "f16",
            Format::BF16 => "bf16",
            Format::Q4_0 => "q4_0",
            Format::Q4_1 => "q4_1",
            Format::Q5_0 => "q5_0",
            Format::Q5_1 => "q5_1",
            Format::Q8_0 => "q8_0",
            Format::Q2K => "q2_k",
            Format::Q3K => "q3_k",
            Format::Q4K => "q4_k",
            Format::Q5K => "q5_k",
            Format::Q6K => "q6_k",
        }
    }

    /// Weights per native (GGUF) block.
    pub const fn block_elems(self) -> usize {
        match self {
            Format::F32 | Format::F16 | Format::BF16 => 1,
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => 32,
            _ => 256,
        }
    }

    /// Bytes per native block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::F16 | Format::BF16 => 2,
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q5_0 => 22,
            Format::Q5_1 => 24,
            Format::Q8_0 => 34,
            Format::Q2K => 84,
            Format::Q3K => 110,
            Format::Q4K => 144,
            Format::Q5K => 176,
            Format::Q6K => 210,
        }
    }

    pub const fn is_float(self) -> bool {
        matches!(self, Format::F32 | Format::F16 | Format::BF16)
    }

    /// K-quants: 256-column super-blocks with factors outside the tiles.
    pub const fn is_k(self) -> bool {
        matches!(
            self,
            Format::Q2K | Format::Q3K | Format::Q4K | Format::Q5K | Format::Q6K
        )
    }

    /// Bytes of one element of a float format.
    pub const fn float_bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            _ => 2,
        }
    }

    pub const fn planes(self) -> Planes {
        let (bits, nsub, scales) = match self {
            Format::F32 | Format::F16 | Format::BF16 => (32, 1, Scales::None),
            Format::Q4_0 => (4, 1, Scales::Sym(8)),
            Format::Q4_1 => (4, 1, Scales::Affine),
            Format::Q5_0 => (5, 1, Scales::Sym(16)),
            Format::Q5_1 => (5, 1, Scales::Affine),
            Format::Q8_0 => (8, 1, Scales::Sym(128)),
            Format::Q2K => (2, 2, Scales::KAffine),
            Format::Q3K => (3, 2, Scales::KSym(4)),
            Format::Q4K => (4, 1, Scales::KAffine),
            Format::Q5K => (5, 1, Scales::KAffine),
            Format::Q6K => (6, 2, Scales::KSym(32)),
        };
        // (bytes, nibbles, crumbs (offset, bit), mask (offset, bit), value bytes)
        let (bytes, nibbles, crumbs, mask, vals) = match bits {
            32 => (
                Some(0),
                None,
                None,
                None,
                GROUP * TILE_K * self.float_bytes(),
            ),
            8 => (Some(0), None, None, None, 512),
            6 => (None, Some(0), Some((256, 4)), None, 384),
            5 => (None, Some(0), None, Some((256, 4)), 320),
            4 => (None, Some(0), None, None, 256),
            3 => (None, None, Some((0, 0)), Some((128, 2)), 192),
            _ => (None, None, Some((0, 0)), None, 128),
        };
        let scale_bytes = match scales {
            Scales::None => 0,
            Scales::Sym(_) => 2 * GROUP,
            Scales::Affine => 4 * GROUP,
            Scales::KAffine => 2 * GROUP * nsub,
            Scales::KSym(_) => GROUP * nsub,
        };
        Planes {
            bits,
            bytes,
            nibbles,
            crumbs,
            mask,
            nsub,
            scales,
            scale_at: vals,
            tile_bytes: vals + scale_bytes,
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn f32_of(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// One row decoded to the canonical form.
#[derive(Default)]
pub struct RowValues {
    /// u per column.
    pub u: Vec<u8>,
    /// Per 32-column block (legacy formats): d and m as f16 bits.
    pub d16: Vec<u16>,
    pub m16: Vec<u16>,
    /// Per sub-block (K-quants): the integer scale and minimum.
    pub sc: Vec<i16>,
    pub mn: Vec<u8>,
    /// Per 256-column super-block (K-quants): d and dmin.
    pub dsup: Vec<f32>,
    pub dmin: Vec<f32>,
}

/// The 6-bit scale and minimum of sub-block j of a Q4_K/Q5_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The sixteen 6-bit scales of a Q3_K block (0..63; the scale is s − 32).
fn scales_q3k(s: &[u8]) -> [u8; 16] {
    const K1: u32 = 0x0303_0303;
    const K2: u32 = 0x0f0f_0f0f;
    let a = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (a0, a1, tmp) = (a(0), a(1), a(2));
    let w = [
        (a0 & K2) | ((tmp & K1) << 4),
        (a1 & K2) | (((tmp >> 2) & K1) << 4),
        ((a0 >> 4) & K2) | (((tmp >> 4) & K1) << 4),
        ((a1 >> 4) & K2) | (((tmp >> 6) & K1) << 4),
    ];
    let mut out = [0u8; 16];
    for (i, v) in w.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// Decode one row of native blocks (`bytes`, `cols` weights) of an integer
/// format into the canonical form.
pub fn decode_row(fmt: Format, bytes: &[u8], cols: usize) -> RowValues {
    let mut r = RowValues {
        u: vec![0; cols],
        ..Default::default()
    };
    let bb = fmt.block_bytes();
    for (bi, b) in bytes.chunks_exact(bb).enumerate() {
        match fmt {
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => {
                let u = &mut r.u[bi * 32..][..32];
                r.d16.push(f16_at(b, 0));
                let affine = matches!(fmt, Format::Q4_1 | Format::Q5_1);
                if affine {
                    r.m16.push(f16_at(b, 2));
                }
                let h = if affine { 4 } else { 2 };
                match fmt {
                    Format::Q8_0 => {
                        for (o, &q) in u.iter_mut().zip(&b[2..34]) {
                            *o = q ^ 0x80; // (q as i8) + 128
                        }
                    }
                    Format::Q4_0 | Format::Q4_1 => {
                        for j in 0..16 {
                            u[j] = b[h + j] & 0xF;
                            u[j + 16] = b[h + j] >> 4;
                        }
                    }
                    _ => {
                        let qh = u32::from_le_bytes([b[h], b[h + 1], b[h + 2], b[h + 3]]);
                        let qs = &b[h + 4..];
                        for j in 0..16 {
                            u[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) as u8) << 4);
                            u[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                        }
                    }
                }
            }
            Format::Q2K => {
                let (scales, qs) = (&b[0..16], &b[16..80]);
                r.dsup.push(f32_of(f16_at(b, 80)));
                r.dmin.push(f32_of(f16_at(b, 82)));
                for &s in scales {
                    r.sc.push((s & 0xF) as i16);
                    r.mn.push(s >> 4);
                }
                let u = &mut r.u[bi * 256..][..256];
                for (e, o) in u.iter_mut().enumerate() {
                    let (n, j, hl) = (e / 128, (e % 128) / 32, e % 32);
                    *o = (qs[32 * n + hl] >> (2 * j)) & 3;
                }
            }
            Format::Q3K => {
                let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
                r.dsup.push(f32_of(f16_at(b, 108)));
                r.dmin.push(0.0);
                for s in scales_q3k(scales) {
                    r.sc.push(s as i16 - 32);
                    r.mn.push(0);
                }
                let u = &mut r.u[bi * 256..][..256];
                for (e, o) in u.iter_mut().enumerate() {
                    let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                    let crumb = (qs[32 * n + l] >> (2 * j)) & 3;
                    let hbit = (hmask[l] >> (4 * n + j)) & 1;
                    *o = crumb | (hbit << 2);
                }
            }
            Format::Q4K | Format::Q5K => {
                r.dsup.push(f32_of(f16_at(b, 0)));
                r.dmin.push(f32_of(f16_at(b, 2)));
                let scales = &b[4..16];
                for j in 0..8 {
                    let (sc, mn) = scale_min_k4(j, scales);
                    r.sc.push(sc as i16);
                    r.mn.push(mn);
                }
                let (qh, qs) = if fmt == Format::Q5K {
                    (Some(&b[16..48]), &b[48..176])
                } else {
                    (None, &b[16..144])
                };
                let u = &mut r.u[bi * 256..][..256];
                for (e, o) in u.iter_mut().enumerate() {
                    let (c, rr) = (e / 64, e % 64);
                    let nib = if rr < 32 {
                        qs[32 * c + rr] & 0xF
                    } else {
                        qs[32 * c + rr - 32] >> 4
                    };
                    let hbit = qh.map_or(0, |qh| (qh[e % 32] >> (e / 32)) & 1);
                    *o = nib | (hbit << 4);
                }
            }
            Format::Q6K => {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                r.dsup.push(f32_of(f16_at(b, 208)));
                r.dmin.push(0.0);
                for &s in sc {
                    r.sc.push(s as i8 as i16);
                    r.mn.push(0);
                }
                let u = &mut r.u[bi * 256..][..256];
                for (e, o) in u.iter_mut().enumerate() {
                    let (idx, w) = (e / 128, e % 128);
                    let (quarter, l) = (w / 32, w % 32);
                    let (ql, qh) = (&ql[64 * idx..], &qh[32 * idx..]);
                    let low = match quarter {
                        0 => ql[l] & 0xF,
                        1 => ql[l + 32] & 0xF,
                        2 => ql[l] >> 4,
                        _ => ql[l + 32] >> 4,
                    };
                    let high = (qh[l] >> (2 * quarter)) & 3;
                    *o = low | (high << 4);
                }
            }
            _ => unreachable!("float formats are not decoded"),
        }
    }
    r
}

/// Pack the tile (row group, column block `kt`) of decoded rows (up to 16;
/// missing rows are zero weights) into `out` (`planes.tile_bytes`).
pub fn pack_tile(fmt: Format, rows: &[RowValues], kt: usize, out: &mut [u8]) {
    let p = fmt.planes();
    let u = |r: usize, c: usize| -> u8 { rows.get(r).map_or(0, |row| row.u[kt * 32 + c]) };
    if let Some(o) = p.bytes {
        for j in 0..8 {
            for r in 0..GROUP {
                for b in 0..4 {
                    out[o + 64 * j + 4 * r + b] = u(r, 4 * j + b);
                }
            }
        }
    }
    if let Some(o) = p.nibbles {
        for i in 0..4 {
            for r in 0..GROUP {
                for b in 0..4 {
                    out[o + 64 * i + 4 * r + b] =
                        (u(r, 4 * i + b) & 0xF) | ((u(r, 4 * (i + 4) + b) & 0xF) << 4);
                }
            }
        }
    }
    if let Some((o, shift)) = p.crumbs {
        for c in 0..2 {
            for r in 0..GROUP {
                for b in 0..4 {
                    let mut v = 0u8;
                    for s in 0..4 {
                        v |= ((u(r, 4 * (4 * c + s) + b) >> shift) & 3) << (2 * s);
                    }
                    out[o + 64 * c + 4 * r + b] = v;
                }
            }
        }
    }
    if let Some((o, bit)) = p.mask {
        for j in 0..8 {
            let mut m = 0u64;
            for r in 0..GROUP {
                for b in 0..4 {
                    m |= (((u(r, 4 * j + b) >> bit) & 1) as u64) << (4 * r + b);
                }
            }
            out[o + 8 * j..o + 8 * j + 8].copy_from_slice(&m.to_le_bytes());
        }
    }
    let s = &mut out[p.scale_at..p.tile_bytes];
    match p.scales {
        Scales::None => {}
        Scales::Sym(_) | Scales::Affine => {
            for r in 0..GROUP {
                let d = rows.get(r).map_or(0, |row| row.d16[kt]);
                s[2 * r..2 * r + 2].copy_from_slice(&d.to_le_bytes());
                if p.scales == Scales::Affine {
                    let m = rows.get(r).map_or(0, |row| row.m16[kt]);
                    s[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&m.to_le_bytes());
                }
            }
        }
        Scales::KAffine | Scales::KSym(_) => {
            for sub in 0..p.nsub {
                // sub-blocks of this tile within the row's sub-block list
                let si = kt * p.nsub + sub;
                for r in 0..GROUP {
                    let (sc, mn) = rows.get(r).map_or((0, 0), |row| (row.sc[si], row.mn[si]));
                    s[sub * GROUP + r] = sc as i8 as u8;
                    if p.scales == Scales::KAffine {
                        s[GROUP * p.nsub + sub * GROUP + r] = mn;
                    }
                }
            }
        }
    }
}

/// A tile decoded back (the portable path and the tests): u[r][c], and per
/// sub-block and row d and m (K-quants given their super-block factors).
pub struct Unpacked {
    pub u: [[u8; TILE_K]; GROUP],
    pub d: [[f32; GROUP]; 2],
    pub m: [[f32; GROUP]; 2],
}

pub fn unpack_tile(fmt: Format, tile: &[u8], dsup: &[f32], dmin: &[f32]) -> Unpacked {
    let p = fmt.planes();
    let mut u = [[0u8; TILE_K]; GROUP];
    if let Some(o) = p.bytes {
        for j in 0..8 {
            for r in 0..GROUP {
                for b in 0..4 {
                    u[r][4 * j + b] = tile[o + 64 * j + 4 * r + b];
                }
            }
        }
    }
    if let Some(o) = p.nibbles {
        for i in 0..4 {
            for r in 0..GROUP {
                for b in 0..4 {
                    let v = tile[o + 64 * i + 4 * r + b];
                    u[r][4 * i + b] = v & 0xF;
                    u[r][4 * (i + 4) + b] = v >> 4;
                }
            }
        }
    }
    if let Some((o, shift)) = p.crumbs {
        for c in 0..2 {
            for r in 0..GROUP {
                for b in 0..4 {
                    let v = tile[o + 64 * c + 4 * r + b];
                    for s in 0..4 {
                        u[r][4 * (4 * c + s) + b] |= ((v >> (2 * s)) & 3) << shift;
                    }
                }
            }
        }
    }
    if let Some((o, bit)) = p.mask {
        for j in 0..8 {
            let m = u64::from_le_bytes(tile[o + 8 * j..o + 8 * j + 8].try_into().unwrap());
            for r in 0..GROUP {
                for b in 0..4 {
                    u[r][4 * j + b] |= (((m >> (4 * r + b)) & 1) as u8) << bit;
                }
            }
        }
    }
    let s = &tile[p.scale_at..];
    let (mut d, mut m) = ([[0f32; GROUP]; 2], [[0f32; GROUP]; 2]);
    for r in 0..GROUP {
        match p.scales {
            Scales::None => {}
            Scales::Sym(off) => {
                d[0][r] = f32_of(f16_at(s, 2 * r));
                m[0][r] = -(off as f32) * d[0][r];
            }
            Scales::Affine => {
                d[0][r] = f32_of(f16_at(s, 2 * r));
                m[0][r] = f32_of(f16_at(s, 32 + 2 * r));
            }
            Scales::KAffine => {
                for sub in 0..p.nsub {
                    d[sub][r] = dsup[r] * s[sub * GROUP + r] as f32;
                    m[sub][r] = -dmin[r] * s[GROUP * p.nsub + sub * GROUP + r] as f32;
                }
            }
            Scales::KSym(off) => {
                for sub in 0..p.nsub {
                    d[sub][r] = dsup[r] * s[sub * GROUP + r] as i8 as f32;
                    m[sub][r] = -(off as f32) * d[sub][r];
                }
            }
        }
    }
    Unpacked { u, d, m }
}

/// Pack a tile of a float format: column-major, 32 columns × 16 rows of the
/// element type, from f32-convertible row slices.
pub fn pack_float_tile(fmt: Format, rows: &[&[u8]], kt: usize, out: &mut [u8]) {
    let eb = fmt.float_bytes();
    for c in 0..TILE_K {
        for r in 0..GROUP {
            let dst = &mut out[(c * GROUP + r) * eb..][..eb];
            match rows.get(r) {
                Some(row) => dst.copy_from_slice(&row[(kt * TILE_K + c) * eb..][..eb]),
                None => dst.fill(0),
            }
        }
    }
}

/// Element (c, r) of a float tile as f32.
pub fn float_at(fmt: Format, tile: &[u8], c: usize, r: usize) -> f32 {
    let i = c * GROUP + r;
    match fmt {
        Format::F32 => f32::from_le_bytes(tile[4 * i..4 * i + 4].try_into().unwrap()),
        Format::F16 => f16::from_bits(f16_at(tile, 2 * i)).to_f32(),
        _ => bf16::from_bits(f16_at(tile, 2 * i)).to_f32(),
    }
}
