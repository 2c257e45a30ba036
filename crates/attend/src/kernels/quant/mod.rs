//! Weight matrices in any GGUF type × activations, on attend's own kernels:
//! F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K and
//! Q6_K, one matrix–matrix product for every shape (a decode step is the
//! product with one row; a prefill with hundreds; several sequences decoding
//! at once with a few).
//!
//! A matrix is repacked once at load (`QMatrix::from_ggml`) into tiles of
//! 16 rows × 32 columns (`formats`): integer formats become unsigned values
//! u with a scale and a minimum per sub-block (w = d·u + m), in bit planes
//! that unpack into the operand layout of `vpdpbusd`. Activation rows are
//! quantized once per product to 8 bits per block of 32 (x ≈ dx·p) and
//! shared by every matrix that reads them (q, k and v read one input); then
//!   Σ w x ≈ dx·(d·Σ u p + m·Σ p)
//! with Σ u p in integers. Float formats multiply f32 activations directly.
//!
//! The kernel is chosen at run time from the CPU (`Isa`): AVX-512
//! (F/BW/VNNI: `vpdpbusd`, 16 rows × 4 columns an instruction), AVX2 (the
//! same tiles, 8 rows a register, `vpmaddubsw`), or portable Rust. All three
//! read the same repacked tiles, so a test can run one matrix on each.
//! `ATTEND_ISA=portable|avx2|avx512` caps the choice (benchmarks, tests).

pub mod formats;
pub mod int8;
#[cfg(target_arch = "x86_64")]
mod x86;

use formats::Planes;
pub use formats::{Format, GROUP, TILE_K};
use rayon::prelude::*;
use std::sync::OnceLock;

/// The instruction sets the kernels are written for, slowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
}

impl Isa {
    /// What this CPU runs, capped by `ATTEND_ISA` if set.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = match std::env::var("ATTEND_ISA").ok().as_deref() {
                Some("portable") => Isa::Portable,
                Some("avx2") => Isa::Avx2,
                _ => Isa::Avx512,
            };
            Isa::available()
                .into_iter()
                .filter(|&i| i <= cap)
                .max()
                .unwrap_or(Isa::Portable)
        })
    }

    /// Every ISA this CPU can run (for tests that try each).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                v.push(Isa::Avx512);
            }
        }
        v
    }
}

/// Bytes aligned to 64 (one cache line, one AVX-512 register).
struct Aligned {
    buf: Vec<u8>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Self {
        let buf = vec![0u8; len + 64];
        let at = buf.as_ptr().align_offset(64);
        Self { buf, at, len }
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..self.at + self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.at..self.at + self.len]
    }
}

/// A (rows, cols) weight matrix, repacked into tiles for the kernels.
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub fmt: Format,
    /// Row groups (rows / 16, rounded up) and column tiles (cols / 32).
    groups: usize,
    ktiles: usize,
    tiles: Aligned,
    /// K-quants: per (row group, 256-column super-block): d[16], dmin[16].
    sup: Vec<f32>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix({}, {}×{})",
            self.fmt.name(),
            self.rows,
            self.cols
        )
    }
}

/// Why a matrix cannot be repacked.
#[derive(Debug)]
pub struct ShapeError(pub String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl QMatrix {
    /// Repack `bytes`, `rows` rows of GGUF blocks of `fmt` (`cols` weights
    /// each), into tiles.
    pub fn from_ggml(
        fmt: Format,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self, ShapeError> {
        let be = fmt.block_elems();
        if cols == 0 || !cols.is_multiple_of(TILE_K.max(be)) {
            return Err(ShapeError(format!(
                "{} rows of {cols} weights cannot be tiled (the columns must be a multiple of {})",
                fmt.name(),
                TILE_K.max(be)
            )));
        }
        let row_bytes = cols / be * fmt.block_bytes();
        let want = rows
            .checked_mul(row_bytes)
            .ok_or_else(|| ShapeError(format!("{rows}×{cols} overflows")))?;
        if bytes.len() != want {
            return Err(ShapeError(format!(
                "a {} matrix of {rows}×{cols} holds {want} bytes, got {}",
                fmt.name(),
                bytes.len()
            )));
        }
        let (groups, ktiles) = (rows.div_ceil(GROUP), cols / TILE_K);
        let p = fmt.planes();
        let mut tiles = Aligned::zeroed(groups * ktiles * p.tile_bytes);
        let nsup = if fmt.is_k() { cols / 256 } else { 0 };
        // (one unused slot per group for the other formats, so that the
        // zip below pairs every group with its slice)
        let per_group = (nsup * 2 * GROUP).max(1);
        let mut sup = vec![0f32; groups * per_group];
        let out = tiles.bytes_mut();
        // one row group at a time: decode its rows, then pack its tiles
        out.par_chunks_mut(ktiles * p.tile_bytes)
            .zip(sup.par_chunks_mut(per_group))
            .enumerate()
            .for_each(|(g, (out, sup))| {
                let r1 = (g * GROUP + GROUP).min(rows);
                let row = |r: usize| &bytes[r * row_bytes..(r + 1) * row_bytes];
                if fmt.is_float() {
                    let rs: Vec<&[u8]> = (g * GROUP..r1).map(row).collect();
                    for (kt, t) in out.chunks_exact_mut(p.tile_bytes).enumerate() {
                        formats::pack_float_tile(fmt, &rs, kt, t);
                    }
                    return;
                }
                let rs: Vec<formats::RowValues> = (g * GROUP..r1)
                    .map(|r| formats::decode_row(fmt, row(r), cols))
                    .collect();
                for (kt, t) in out.chunks_exact_mut(p.tile_bytes).enumerate() {
                    formats::pack_tile(fmt, &rs, kt, t);
                }
                for sb in 0..nsup {
                    for (r, rv) in rs.iter().enumerate() {
                        sup[sb * 2 * GROUP + r] = rv.dsup[sb];
                        sup[sb * 2 * GROUP + GROUP + r] = rv.dmin[sb];
                    }
                }
            });
        Ok(Self {
            rows,
            cols,
            fmt,
            groups,
            ktiles,
            tiles,
            sup,
        })
    }

    /// Repack a 2-D candle `QTensor` (any GGUF type attend runs).
    pub fn from_qtensor(q: &candle_core::quantized::QTensor) -> candle_core::Result<Self> {
        let fmt = Format::of_ggml(q.dtype()).ok_or_else(|| {
            candle_core::Error::Msg(format!("tensor type {:?} is not supported", q.dtype()))
        })?;
        let dims = q.shape().dims();
        if dims.len() != 2 {
            candle_core::bail!("a weight matrix needs 2 dimensions, got {dims:?}");
        }
        let bytes = q.data()?;
        Self::from_ggml(fmt, dims[0], dims[1], &bytes).map_err(|e| candle_core::Error::Msg(e.0))
    }

    /// Bytes held by the repacked weights.
    pub fn bytes(&self) -> usize {
        self.tiles.len + self.sup.len() * 4
    }

    fn tile(&self, g: usize, kt: usize) -> &[u8] {
        let tb = self.fmt.planes().tile_bytes;
        &self.tiles.bytes()[(g * self.ktiles + kt) * tb..][..tb]
    }

    /// (dsup[16], dmin[16]) of K-quant super-block `sb` of row group g.
    fn sup(&self, g: usize, sb: usize) -> (&[f32], &[f32]) {
        if !self.fmt.is_k() {
            return (&[], &[]);
        }
        let at = g * (self.cols / 256) * 2 * GROUP + sb * 2 * GROUP;
        (
            &self.sup[at..at + GROUP],
            &self.sup[at + GROUP..at + 2 * GROUP],
        )
    }

    /// Row r as f32 (embedding lookups of a quantized table).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols);
        let (g, rr) = (r / GROUP, r % GROUP);
        for kt in 0..self.ktiles {
            let tile = self.tile(g, kt);
            let o = &mut out[kt * TILE_K..][..TILE_K];
            if self.fmt.is_float() {
                for (c, v) in o.iter_mut().enumerate() {
                    *v = formats::float_at(self.fmt, tile, c, rr);
                }
                continue;
            }
            let (ds, dm) = self.sup(g, kt / 8);
            let un = formats::unpack_tile(self.fmt, tile, ds, dm);
            let sub = TILE_K / self.fmt.planes().nsub;
            for (c, v) in o.iter_mut().enumerate() {
                *v = un.d[c / sub][rr] * un.u[rr][c] as f32 + un.m[c / sub][rr];
            }
        }
    }

    /// The whole matrix as f32 (rows, cols).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }

    /// x (n, cols) → x Wᵀ (n, rows), as candle tensors (the graph path).
    pub fn matmul(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        tensor_product(x, self.rows, self.cols, |xs, n, out| {
            matmul_many(&Activations::new(xs, n, self.cols), &mut [(self, out)])
        })
    }
}

/// x (n, cols) → (n, rows) through `f(x rows, n, out)`, as candle tensors:
/// the graph executor's path to a buffer kernel.
pub(crate) fn tensor_product(
    x: &candle_core::Tensor,
    rows: usize,
    cols: usize,
    f: impl FnOnce(&[f32], usize, &mut [f32]),
) -> candle_core::Result<candle_core::Tensor> {
    let (n, k) = x.dims2()?;
    if k != cols {
        candle_core::bail!("matmul: input has {k} columns, the weight {cols}");
    }
    let xs: Vec<f32> = x
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let mut out = vec![0f32; n * rows];
    f(&xs, n, &mut out);
    candle_core::Tensor::from_vec(out, (n, rows), x.device())
}

/// Activation rows, quantized to 8 bits per block of 32 for the integer
/// formats: x ≈ d·p, with the sums d·Σp of each 16-half (for the minimums)
/// and as integers (for symmetric formats' offsets).
pub struct Q8Rows {
    pub n: usize,
    pub k: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<[f32; 2]>,
    pub sum: Vec<[i32; 2]>,
}

impl Q8Rows {
    /// Zeroed rows for (n, k), in the buffers of an earlier product on this
    /// thread when there is one (fresh ones cost page faults on every
    /// product of a prefill).
    pub(crate) fn zeroed(n: usize, k: usize) -> Self {
        let nb = n * k / 32;
        let mut q = SPARE_Q8.with(|c| c.borrow_mut().take()).unwrap_or(Self {
            n: 0,
            k: 0,
            qs: vec![],
            d: vec![],
            s: vec![],
            sum: vec![],
        });
        (q.n, q.k) = (n, k);
        q.qs.clear();
        q.qs.resize(n * k, 0);
        q.d.clear();
        q.d.resize(nb, 0.0);
        q.s.clear();
        q.s.resize(nb, [0.0; 2]);
        q.sum.clear();
        q.sum.resize(nb, [0; 2]);
        q
    }

    /// xs (n, k) row-major, k a multiple of 32.
    pub fn quantize(xs: &[f32], n: usize, k: usize) -> Self {
        assert!(
            xs.len() == n * k && k.is_multiple_of(32),
            "Q8Rows: {} != {n}·{k}",
            xs.len()
        );
        let mut q = Self::zeroed(n, k);
        let chunk = 256; // blocks per parallel task
        q.qs.par_chunks_mut(32 * chunk)
            .zip(q.d.par_chunks_mut(chunk))
            .zip(q.s.par_chunks_mut(chunk))
            .zip(q.sum.par_chunks_mut(chunk))
            .zip(xs.par_chunks(32 * chunk))
            .for_each(|((((qs, d), s), sum), xs)| {
                #[cfg(target_arch = "x86_64")]
                if Isa::best() == Isa::Avx512 {
                    // Safety: the CPU has AVX-512 F/BW (Isa::best checked)
                    return unsafe { x86::quantize_blocks(xs, qs, d, s, sum) };
                }
                for ((((qb, db), sb), pb), xb) in qs
                    .chunks_exact_mut(32)
                    .zip(d.iter_mut())
                    .zip(s.iter_mut())
                    .zip(sum.iter_mut())
                    .zip(xs.chunks_exact(32))
                {
                    quantize_block(xb, qb, db, sb, pb);
                }
            });
        q
    }
}

#[inline(always)]
fn quantize_block(x: &[f32], q: &mut [i8], d: &mut f32, s: &mut [f32; 2], sum: &mut [i32; 2]) {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let dd = amax / 127.0;
    let inv = if dd > 0.0 { 1.0 / dd } else { 0.0 };
    let mut sums = [0i32; 2];
    for (h, (qh, xh)) in q.chunks_exact_mut(16).zip(x.chunks_exact(16)).enumerate() {
        let mut acc = 0i32;
        for (o, &v) in qh.iter_mut().zip(xh) {
            let r = (v * inv).round_ties_even() as i32;
            *o = r as i8;
            acc += r;
        }
        sums[h] = acc;
    }
    *d = dd;
    *s = [dd * sums[0] as f32, dd * sums[1] as f32];
    *sum = sums;
}

/// The input of a product: f32 rows, and their 8-bit form made on first use.
pub struct Activations<'a> {
    pub x: &'a [f32],
    pub n: usize,
    pub k: usize,
    q8: OnceLock<Q8Rows>,
}

impl<'a> Activations<'a> {
    /// x (n, k) row-major.
    pub fn new(x: &'a [f32], n: usize, k: usize) -> Self {
        assert_eq!(x.len(), n * k, "Activations: {} != {n}·{k}", x.len());
        Self {
            x,
            n,
            k,
            q8: OnceLock::new(),
        }
    }

    /// x (n, k) with its 8-bit form made already (int8's row-wise
    /// quantization).
    pub fn with_q8(x: &'a [f32], n: usize, k: usize, q8: Q8Rows) -> Self {
        assert_eq!(x.len(), n * k, "Activations: {} != {n}·{k}", x.len());
        Self {
            x,
            n,
            k,
            q8: OnceLock::from(q8),
        }
    }

    pub fn q8(&self) -> &Q8Rows {
        self.q8
            .get_or_init(|| Q8Rows::quantize(self.x, self.n, self.k))
    }
}

thread_local! {
    /// One set of 8-bit activation buffers per thread, kept between products.
    static SPARE_Q8: std::cell::RefCell<Option<Q8Rows>> = const { std::cell::RefCell::new(None) };
}

impl Drop for Activations<'_> {
    fn drop(&mut self) {
        if let Some(q) = self.q8.take() {
            SPARE_Q8.with(|c| *c.borrow_mut() = Some(q));
        }
    }
}

/// A pointer that parallel tasks write through at disjoint indices.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub *mut f32);
// Safety: every task writes a disjoint set of output rows (its row groups).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// One row group × `nt` tokens from `t0`: out[t][16g + r] for the group's
/// rows, rows of `out` `ldo` apart.
pub(crate) type GroupFn = unsafe fn(&QMatrix, usize, &Activations, usize, usize, Out, usize);

/// Several products over the same activations in one parallel region:
/// for each job (W, out), out (n, W.rows) = x Wᵀ with x (n, W.cols).
/// One region instead of one per matrix: a decode step makes ~150 of these.
pub fn matmul_many(x: &Activations, jobs: &mut [(&QMatrix, &mut [f32])]) {
    matmul_many_isa(Isa::best(), x, jobs)
}

/// `matmul_many` on a given instruction set (which the CPU must have).
pub fn matmul_many_isa(isa: Isa, x: &Activations, jobs: &mut [(&QMatrix, &mut [f32])]) {
    let n = x.n;
    for (w, out) in jobs.iter() {
        assert_eq!(w.cols, x.k, "matmul: input width");
        assert_eq!(out.len(), n * w.rows, "matmul: output size");
    }
    if n == 0 {
        return;
    }
    if jobs.iter().any(|(w, _)| !w.fmt.is_float()) {
        x.q8();
    }
    // Tasks of whole row groups. Few, large tasks: rayon's per-task cost
    // shows at a few rows a task.
    let total: usize = jobs.iter().map(|(w, _)| w.groups).sum();
    let per_task = total.div_ceil(2 * rayon::current_num_threads()).max(1);
    let mut tasks = vec![];
    for (i, (w, _)) in jobs.iter().enumerate() {
        let mut g = 0;
        while g < w.groups {
            tasks.push((i, g, (g + per_task).min(w.groups)));
            g += per_task;
        }
    }
    let outs: Vec<Out> = jobs.iter_mut().map(|(_, o)| Out(o.as_mut_ptr())).collect();
    let mats: Vec<&QMatrix> = jobs.iter().map(|(w, _)| *w).collect();
    let fns: Vec<GroupFn> = mats.iter().map(|w| group_fn(isa, w.fmt)).collect();
    let run = |&(i, g0, g1): &(usize, usize, usize)| {
        let (w, f) = (mats[i], fns[i]);
        for g in g0..g1 {
            // Safety: `f` suits the CPU (group_fn checks the ISA), and the
            // group's rows of `out` are this task's alone.
            unsafe { f(w, g, x, 0, n, outs[i], w.rows) };
        }
    };
    if tasks.len() > 1 {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

fn group_fn(isa: Isa, fmt: Format) -> GroupFn {
    assert!(
        Isa::available().contains(&isa),
        "this CPU cannot run the {isa:?} kernels"
    );
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        return x86::group_fn(isa, fmt);
    }
    let _ = fmt;
    portable_group
}

/// The portable kernel (and the reference for the SIMD ones).
unsafe fn portable_group(
    w: &QMatrix,
    g: usize,
    x: &Activations,
    t0: usize,
    nt: usize,
    out: Out,
    ldo: usize,
) {
    let rows = (w.rows - g * GROUP).min(GROUP);
    let p: Planes = w.fmt.planes();
    let mut acc = vec![[0f32; GROUP]; nt];
    for kt in 0..w.ktiles {
        let tile = w.tile(g, kt);
        if w.fmt.is_float() {
            for (tt, a) in acc.iter_mut().enumerate() {
                let xr = &x.x[(t0 + tt) * w.cols + kt * TILE_K..][..TILE_K];
                for (c, &xv) in xr.iter().enumerate() {
                    for (r, ar) in a.iter_mut().enumerate() {
                        *ar += formats::float_at(w.fmt, tile, c, r) * xv;
                    }
                }
            }
            continue;
        }
        let (ds, dm) = w.sup(g, kt / 8);
        let un = formats::unpack_tile(w.fmt, tile, ds, dm);
        let q = x.q8();
        let sub = TILE_K / p.nsub;
        for (tt, a) in acc.iter_mut().enumerate() {
            let t = t0 + tt;
            let b = t * w.ktiles + kt;
            let xq = &q.qs[b * TILE_K..][..TILE_K];
            let (xd, xs) = (q.d[b], q.s[b]);
            for (r, ar) in a.iter_mut().enumerate() {
                for s in 0..p.nsub {
                    let isum: i32 = (s * sub..(s + 1) * sub)
                        .map(|c| un.u[r][c] as i32 * xq[c] as i32)
                        .sum();
                    let sums = if p.nsub == 1 { xs[0] + xs[1] } else { xs[s] };
                    *ar += un.d[s][r] * xd * isum as f32 + un.m[s][r] * sums;
                }
            }
        }
    }
    for (tt, a) in acc.iter().enumerate() {
        for (r, &v) in a.iter().enumerate().take(rows) {
            *out.0.add((t0 + tt) * ldo + g * GROUP + r) = v;
        }
    }
}

#[cfg(test)]
mod tests;
