//! Softmax attention over plain f32 buffers: whole sequences (prefill,
//! packed encoder batches) as GEMMs, and decoding split along the keys
//! (split-KV).
//!
//! Queries are token-major, as the projections write them: q (t, h, hd).
//! A KV cache is head-major, one `KvRows` of (n, hd) rows per kv head in
//! the cache's type; query head `head` reads kv head `head / (h / h_kv)`
//! (grouped-query attention).

use super::kv::KvRows;
use rayon::prelude::*;

/// Queries per block of the GEMM form.
const QB: usize = 64;

/// f32 keys or values addressed by strides: element c of row j of kv head
/// g is `data[g · head + j · row + c]`. Token-major projections are
/// (head = hd, row = h_kv · hd); a decoded cache (head = n · hd, row = hd).
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub head: usize,
    pub row: usize,
}

/// One sequence of a packed batch: its queries are rows q0..q0 + t of q and
/// out; its keys are rows k0..k0 + pos0 + t, the last t of them the
/// queries' own positions (pos0 keys come before the first query).
#[derive(Clone, Copy, Debug)]
pub struct Seq {
    pub q0: usize,
    pub t: usize,
    pub k0: usize,
    pub pos0: usize,
}

/// Which keys a query sees: causal (up to its own position) or all of its
/// sequence, and optionally only those within a sliding window of w
/// positions (i − w < j ≤ i causal, |i − j| < w bidirectional).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mask {
    pub causal: bool,
    pub window: Option<usize>,
}

impl Mask {
    pub const CAUSAL: Mask = Mask {
        causal: true,
        window: None,
    };
    pub const FULL: Mask = Mask {
        causal: false,
        window: None,
    };

    /// The keys query position i of a sequence of n keys sees: lo..hi.
    fn keys(&self, i: usize, n: usize) -> (usize, usize) {
        let w = self.window.unwrap_or(usize::MAX);
        let lo = (i + 1).saturating_sub(w);
        let hi = if self.causal {
            i + 1
        } else {
            i.saturating_add(w).min(n)
        };
        (lo, hi)
    }
}

/// Causal grouped-query softmax attention of t queries at positions
/// pos0..pos0+t over a cache holding positions 0..pos0+t:
/// q (t, h, hd), k[g], v[g] (≥ pos0 + t, hd) -> out (t, h, hd).
///
/// The GEMM form, in blocks of 64 query positions aligned to the start of
/// the sequence (not of this call), each over the keys 0..the block's end
/// (the cache decoded to f32 once, zero rows past its end): so a query's
/// numbers depend on its position and the keys before it, not on how the
/// prompt was cut into chunks (a server's chunked prefill and prefix
/// cache give the tokens a whole prefill gives).
pub fn causal_prefill(
    q: &[f32],
    k: &[KvRows],
    v: &[KvRows],
    dims: (usize, usize, usize),
    pos0: usize,
    out: &mut [f32],
) {
    causal_prefill_window(q, k, v, dims, pos0, None, out)
}

/// `causal_prefill` where each query sees only the last w positions (i − w
/// < j ≤ i; a sliding-window layer whose cache keeps every token, as a
/// server's paged one does). The block of 64 positions aligned at 64b reads
/// keys max(0, 64b − w + 1)..64b + 64: a fixed shape per block again.
pub fn causal_prefill_window(
    q: &[f32],
    k: &[KvRows],
    v: &[KvRows],
    (h, h_kv, hd): (usize, usize, usize),
    pos0: usize,
    window: Option<usize>,
    out: &mut [f32],
) {
    let t = queries(q, k, v, (h, h_kv, hd), pos0, out);
    let w = window.unwrap_or(usize::MAX);
    let n = pos0 + t;
    let np = n.next_multiple_of(QB);
    let decode = |rows: &[KvRows]| {
        let mut f = super::scratch::take(h_kv * np * hd);
        for (g, r) in rows.iter().enumerate() {
            r.decode_rows(0, 0, hd, &mut f[g * np * hd..][..n * hd]);
        }
        f
    };
    let (kf, vf) = (decode(k), decode(v));
    let group = h / h_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let ld = h * hd;
    // (head, first query of the block, queries in it)
    let mut tasks = vec![];
    for head in 0..h {
        let mut p = pos0;
        while p < n {
            let end = ((p / QB + 1) * QB).min(n);
            tasks.push((head, p - pos0, end - p));
            p = end;
        }
    }
    let dst = SharedPtr(out.as_mut_ptr());
    let work = |&(head, i0, m): &(usize, usize, usize)| {
        let kv = head / group;
        let first = pos0 + i0;
        // the whole aligned block, whatever part of it this call holds:
        // its queries at rows first % 64.., zero rows around them (gemm's
        // kernels differ with the shape, so the shape never changes)
        let r0 = first % QB;
        // keys lo..hi: from what the block's first position sees to its end
        let lo = (first - r0 + 1).saturating_sub(w);
        let nk = first - r0 + QB - lo;
        let mut qb = super::scratch::take(QB * hd);
        for r in 0..m {
            qb[(r0 + r) * hd..][..hd].copy_from_slice(&q[(i0 + r) * ld + head * hd..][..hd]);
        }
        let mut p = super::scratch::take(QB * nk);
        let mut o = super::scratch::take_dirty(QB * hd);
        // Safety: qb (64, hd), kf/vf rows 0..nk ≤ np of this kv head, p
        // (64, nk) and o (64, hd) lie inside their buffers.
        unsafe {
            gemm_strided(
                (QB, nk, hd),
                (p.as_mut_ptr(), nk as isize),
                (qb.as_ptr(), hd as isize, 1),
                (kf.as_ptr().add((kv * np + lo) * hd), 1, hd as isize),
                scale,
            );
        }
        for (r, row) in p.chunks_exact_mut(nk).enumerate() {
            if r < r0 || r >= r0 + m {
                row.fill(0.0);
                continue;
            }
            // position first − r0 + r sees keys a..b
            let at = first - r0 + r;
            softmax_band(row, (at + 1).saturating_sub(w).max(lo) - lo, at + 1 - lo);
        }
        unsafe {
            gemm_strided(
                (QB, hd, nk),
                (o.as_mut_ptr(), hd as isize),
                (p.as_ptr(), nk as isize, 1),
                (vf.as_ptr().add((kv * np + lo) * hd), hd as isize, 1),
                1.0,
            );
        }
        // Safety: tasks write disjoint (rows, head) blocks of out.
        for r in 0..m {
            unsafe {
                std::ptr::copy_nonoverlapping(
                    o.as_ptr().add((r0 + r) * hd),
                    dst.get().add((i0 + r) * ld + head * hd),
                    hd,
                );
            }
        }
        super::scratch::give(qb);
        super::scratch::give(p);
        super::scratch::give(o);
    };
    if tasks.len() == 1 {
        tasks.iter().for_each(work);
    } else {
        tasks.par_iter().for_each(work);
    }
    super::scratch::give(kf);
    super::scratch::give(vf);
}

/// Softmax attention of every sequence of a packed batch over its own keys,
/// as `mask` allows (causal or bidirectional, a sliding window or not):
/// q (Σ t, h, hd), k, v as `Strided` -> out (Σ t, h, hd).
///
/// Per (sequence, head, block of 64 queries): S = Q_h K_hᵀ / √hd over the
/// keys the block may see (a band of about 64 + w keys under a window),
/// the mask and softmax row by row, then
/// O_h = P V_h; both products on gemm's kernels, reading q, k, v and writing
/// out in place through strides.
pub fn attend_f32(
    q: &[f32],
    k: Strided,
    v: Strided,
    (h, h_kv, hd): (usize, usize, usize),
    seqs: &[Seq],
    mask: Mask,
    out: &mut [f32],
) {
    assert!(h_kv > 0 && h.is_multiple_of(h_kv), "attention: heads");
    assert!(q.len() == out.len(), "attention: q/out sizes");
    let group = h / h_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let ld = h * hd;
    for s in seqs {
        let n = s.pos0 + s.t;
        assert!((s.q0 + s.t) * ld <= q.len(), "attention: queries");
        for kv in [&k, &v] {
            if n > 0 {
                let last = (h_kv - 1) * kv.head + (s.k0 + n - 1) * kv.row + hd;
                assert!(last <= kv.data.len(), "attention: keys/values");
            }
        }
    }
    // (sequence, head, first query of the block)
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            (0..h).flat_map(move |head| (0..s.t).step_by(QB).map(move |i0| (si, head, i0)))
        })
        .collect();
    let dst = SharedPtr(out.as_mut_ptr());
    let work = |&(si, head, i0): &(usize, usize, usize)| {
        let s = seqs[si];
        let (m, kv) = ((s.t - i0).min(QB), head / group);
        // keys the block may see: lo..hi, the union of its queries' ranges
        let all = s.pos0 + s.t;
        let lo = mask.keys(s.pos0 + i0, all).0;
        let hi = mask.keys(s.pos0 + i0 + m - 1, all).1;
        let n = hi - lo;
        let mut p = super::scratch::take(m * n);
        let qrow = (s.q0 + i0) * ld + head * hd;
        // Safety: q rows q0+i0..q0+i0+m of this head, k/v rows k0..k0+n of
        // this kv head and out's rows of this head lie inside their buffers
        // (asserted above); tasks write disjoint (rows, head) blocks of out.
        unsafe {
            gemm_strided(
                (m, n, hd),
                (p.as_mut_ptr(), n as isize),
                (q.as_ptr().add(qrow), ld as isize, 1),
                (
                    k.data.as_ptr().add(kv * k.head + (s.k0 + lo) * k.row),
                    1,
                    k.row as isize,
                ),
                scale,
            );
        }
        for (r, row) in p.chunks_exact_mut(n).enumerate() {
            let (a, b) = mask.keys(s.pos0 + i0 + r, all);
            softmax_band(row, a - lo, b - lo);
        }
        unsafe {
            gemm_strided(
                (m, hd, n),
                (dst.get().add(qrow), ld as isize),
                (p.as_ptr(), n as isize, 1),
                (
                    v.data.as_ptr().add(kv * v.head + (s.k0 + lo) * v.row),
                    v.row as isize,
                    1,
                ),
                1.0,
            );
        }
        super::scratch::give(p);
    };
    if tasks.len() == 1 {
        tasks.iter().for_each(work);
    } else {
        tasks.par_iter().for_each(work);
    }
}

/// Keys per task of the split-KV form.
const KV_CHUNK: usize = 256;

/// Causal attention of a few queries (decoding), split along the keys as in
/// flash-decoding / Lean Attention: q (t, h, hd) at positions pos0.. over
/// k, v (pos0 + t, h_kv, hd) -> out (t, h, hd).
///
/// Each task takes one (query, kv head, slice of ≤ 256 keys) and computes,
/// for the query heads of the group, the slice's partial softmax statistics:
/// its max m, Σ e^(s − m) and Σ e^(s − m) v. The slices are merged exactly:
/// with M = max m_c, o = Σ_c e^(m_c − M) acc_c / Σ_c e^(m_c − M) l_c. So a
/// long context's keys are shared by every core, and each key and value
/// is read once per group, not once per query head.
pub fn split_kv(
    q: &[f32],
    k: &[KvRows],
    v: &[KvRows],
    (h, h_kv, hd): (usize, usize, usize),
    pos0: usize,
    out: &mut [f32],
) {
    split_kv_chunked(q, k, v, (h, h_kv, hd), pos0, out, KV_CHUNK)
}

/// `split_kv` where each query sees only the last w positions (a
/// sliding-window layer whose cache keeps every token).
pub fn split_kv_window(
    q: &[f32],
    k: &[KvRows],
    v: &[KvRows],
    dims: (usize, usize, usize),
    pos0: usize,
    w: usize,
    out: &mut [f32],
) {
    split_kv_inner(q, k, v, dims, pos0, Some(w), out, KV_CHUNK)
}

/// `split_kv` with slices of `chunk` keys (tests use small ones).
pub fn split_kv_chunked(
    q: &[f32],
    k: &[KvRows],
    v: &[KvRows],
    dims: (usize, usize, usize),
    pos0: usize,
    out: &mut [f32],
    chunk: usize,
) {
    split_kv_inner(q, k, v, dims, pos0, None, out, chunk)
}

/// Split-KV over keys max(0, i + 1 − w)..i + 1 for the query at position i
/// (all of 0..i + 1 without a window), in slices of `chunk` aligned to the
/// start of the sequence.
#[allow(clippy::too_many_arguments)]
fn split_kv_inner(
    q: &[f32],
    k: &[KvRows],
    v: &[KvRows],
    (h, h_kv, hd): (usize, usize, usize),
    pos0: usize,
    window: Option<usize>,
    out: &mut [f32],
    chunk: usize,
) {
    let t = queries(q, k, v, (h, h_kv, hd), pos0, out);
    assert!(
        h_kv > 0 && h.is_multiple_of(h_kv) && chunk > 0,
        "attention: heads"
    );
    let g = h / h_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    // (query, kv head, first key, end)
    let mut tasks = vec![];
    for i in 0..t {
        let n = pos0 + i + 1;
        let lo = window.map_or(0, |w| n.saturating_sub(w));
        for kv in 0..h_kv {
            let mut j0 = lo;
            while j0 < n {
                let j1 = ((j0 / chunk + 1) * chunk).min(n);
                tasks.push((i, kv, j0, j1));
                j0 = j1;
            }
        }
    }
    // keys j0..j0 + len (over one page or several) for query i and kv
    // head kv: per query head of the group, (m, l, acc (hd))
    let run = |i: usize, kv: usize, (kr, vr): (&KvRows, &KvRows), j0: usize, len: usize| {
        // the run's keys and values of this kv head as f32: in place when
        // the cache holds f32, else decoded once for the group
        let width = len * hd;
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        let in_place = (kr.run_f32(j0), vr.run_f32(j0));
        // decoded slices go through the register form (measured faster for
        // them); an f32 cache is read in place by the GEMMs (faster there)
        #[cfg(target_arch = "x86_64")]
        let small = in_place.0.is_none()
            && hd.is_multiple_of(16)
            && g <= 16
            && std::is_x86_feature_detected!("avx512f");
        // the group's query vectors fit in registers (g · hd / 16 ≤ 16), or
        // are read from L1 for each key (wide heads: Gemma 3's 4 × 256)
        #[cfg(target_arch = "x86_64")]
        let resident = g * hd / 16 <= 16;
        #[cfg(not(target_arch = "x86_64"))]
        let small = false;
        // an f16 cache is read by the register form straight from its bytes
        // (the conversion inside the loop: no decoded copy to write and
        // read back)
        let f16 = small && kr.dtype == super::kv::KvDType::F16;
        let (kf, vf) = match in_place {
            (Some(kf), Some(vf)) => (kf, vf),
            _ if f16 => (&[][..], &[][..]),
            _ => {
                (ks, vs) = (
                    super::scratch::take_dirty(width),
                    super::scratch::take_dirty(width),
                );
                kr.decode_rows(j0, 0, hd, &mut ks);
                vr.decode_rows(j0, 0, hd, &mut vs);
                (&ks[..], &vs[..])
            }
        };
        // an f16 run over several pages is read through a table of its row
        // addresses: the same rows in the same order, so the same numbers
        // as a contiguous cache, without copying them together
        let (ktab, vtab) = if f16 {
            (row_table(kr, j0, len), row_table(vr, j0, len))
        } else {
            assert!(kf.len() >= width && vf.len() >= width);
            (None, None)
        };
        // S (g, len) = scale · Q_g K_runᵀ (the group's query heads are
        // consecutive rows of q), its rows' softmax statistics, then
        // acc (g, hd) = P V_run
        let mut s = super::scratch::take_dirty(g * len);
        let mut acc = vec![0f32; g * hd];
        let qg = &q[(i * h + kv * g) * hd..][..g * hd];
        // Safety: q's g rows from (i, kv·g), the run's len keys and values
        // (row_table and the assert above check them) and s, acc lie inside
        // their buffers; `small` checked the CPU and the register budget of
        // the AVX-512 form.
        let stats = if small {
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let pass = (resident, qg, len, hd, scale, &mut s[..], &mut acc[..]);
                match (&ktab, &vtab, f16) {
                    (Some(t), Some(u), _) => small_run::<true, _>(Table(t), Table(u), pass),
                    (_, _, true) => {
                        let r = Spaced(kr.run(j0).0.as_ptr(), 2 * hd);
                        let w = Spaced(vr.run(j0).0.as_ptr(), 2 * hd);
                        small_run::<true, _>(r, w, pass)
                    }
                    (_, _, false) => {
                        let r = Spaced(kf.as_ptr() as *const u8, 4 * hd);
                        let w = Spaced(vf.as_ptr() as *const u8, 4 * hd);
                        small_run::<false, _>(r, w, pass)
                    }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("the register forms are x86-64 only")
        } else {
            unsafe {
                gemm_strided(
                    (g, len, hd),
                    (s.as_mut_ptr(), len as isize),
                    (qg.as_ptr(), hd as isize, 1),
                    (kf.as_ptr(), 1, hd as isize),
                    scale,
                );
            }
            let stats: Vec<(f32, f32)> = s
                .chunks_exact_mut(len)
                .map(super::dense::exp_shifted)
                .collect();
            unsafe {
                gemm_strided(
                    (g, hd, len),
                    (acc.as_mut_ptr(), hd as isize),
                    (s.as_ptr(), len as isize, 1),
                    (vf.as_ptr(), hd as isize, 1),
                    1.0,
                );
            }
            stats
        };
        super::scratch::give(s);
        if ks.capacity() > 0 {
            super::scratch::give(ks);
            super::scratch::give(vs);
        }
        stats
            .into_iter()
            .zip(acc.chunks_exact(hd))
            .map(|((m, l), a)| (m, l, a.to_vec()))
            .collect::<Vec<_>>()
    };
    // per task: its keys, which may span pages (a paged cache). Each task
    // computes exactly what it would over a contiguous cache — a
    // sequence's numbers do not depend on how its cache is stored (batch
    // invariance: a server's answers do not depend on its load): f16 rows
    // are read through a table of their addresses, other types decoded
    // into one buffer, and an f32 cache's rows (read in place by the
    // GEMMs) copied together first
    let work = |&(i, kv, j0, j1): &(usize, usize, usize, usize)| {
        let len = j1 - j0;
        if k[kv].run(j0).1 >= len || k[kv].dtype != super::kv::KvDType::F32 {
            return run(i, kv, (&k[kv], &v[kv]), j0, len);
        }
        let rb = k[kv].dtype.bytes(hd);
        // into pooled f32 buffers (no allocation, no fresh pages), seen as
        // bytes: 4-aligned, as an f32 cache's rows must be
        let gather = |r: &KvRows| {
            let mut buf = super::scratch::take_dirty((len * rb).div_ceil(4));
            // Safety: any bytes are valid f32 bits and vice versa; the view
            // covers the buffer's own len · 4 bytes.
            let b = unsafe {
                std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, buf.len() * 4)
            };
            let mut at = 0;
            let mut j = j0;
            while j < j1 {
                let (bytes, n) = r.run(j);
                let n = n.min(j1 - j);
                b[at..at + n * rb].copy_from_slice(&bytes[..n * rb]);
                at += n * rb;
                j += n;
            }
            buf
        };
        let (kb, vb) = (gather(&k[kv]), gather(&v[kv]));
        let bytes = |b: &[f32]| unsafe {
            // Safety: as above; only the len · rb bytes written are read.
            std::slice::from_raw_parts(b.as_ptr() as *const u8, len * rb)
        };
        let part = {
            let (kr, vr) = (
                KvRows::contiguous(k[kv].dtype, bytes(&kb), hd),
                KvRows::contiguous(v[kv].dtype, bytes(&vb), hd),
            );
            run(i, kv, (&kr, &vr), 0, len)
        };
        super::scratch::give(kb);
        super::scratch::give(vb);
        part
    };
    // a step near the start of the context is too little work to share out
    let parts: Vec<Vec<(f32, f32, Vec<f32>)>> = if t * (pos0 + t) * h * hd * 2 < 1 << 16 {
        tasks.iter().map(work).collect()
    } else {
        tasks.par_iter().map(work).collect()
    };
    // merge the slices of each (query, head)
    out.fill(0.0);
    let mut stats = vec![(f32::NEG_INFINITY, 0f32); t * h];
    for (&(i, kv, _, _), p) in tasks.iter().zip(&parts) {
        for (a, (m, _, _)) in p.iter().enumerate() {
            let st = &mut stats[i * h + kv * g + a];
            st.0 = st.0.max(*m);
        }
    }
    for (&(i, kv, _, _), p) in tasks.iter().zip(&parts) {
        for (a, (m, l, acc)) in p.iter().enumerate() {
            let at = i * h + kv * g + a;
            let w = (m - stats[at].0).exp();
            stats[at].1 += w * l;
            super::axpy(&mut out[at * hd..][..hd], w, acc);
        }
    }
    for (o, st) in out.chunks_exact_mut(hd).zip(&stats) {
        let inv = 1.0 / st.1;
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

/// Where row j of a run of keys or values starts.
trait Rows: Copy {
    /// Safety: j < the run's length.
    unsafe fn at(self, j: usize) -> *const u8;
}

/// Rows `.1` bytes apart from `.0` (a run inside one page, or a buffer).
#[derive(Clone, Copy)]
struct Spaced(*const u8, usize);

impl Rows for Spaced {
    #[inline(always)]
    unsafe fn at(self, j: usize) -> *const u8 {
        self.0.add(j * self.1)
    }
}

/// Each row's address (a run across the pages of a paged cache).
#[derive(Clone, Copy)]
struct Table<'a>(&'a [*const u8]);

impl Rows for Table<'_> {
    #[inline(always)]
    unsafe fn at(self, j: usize) -> *const u8 {
        *self.0.get_unchecked(j)
    }
}

/// The addresses of rows j0..j0 + len of `r` when they span pages; None
/// when they lie in one run. Panics if `r` holds fewer rows.
fn row_table(r: &KvRows, j0: usize, len: usize) -> Option<Vec<*const u8>> {
    if r.run(j0).1 >= len {
        return None;
    }
    let rb = r.dtype.bytes(r.width);
    let mut t = Vec::with_capacity(len);
    let mut j = j0;
    while j < j0 + len {
        let (bytes, n) = r.run(j);
        let n = n.min(j0 + len - j);
        assert!(
            n > 0 && bytes.len() >= n * rb,
            "attention: rows past the cache"
        );
        t.extend((0..n).map(|x| bytes[x * rb..].as_ptr()));
        j += n;
    }
    Some(t)
}

/// Rows ahead that the register forms prefetch: a batched decode step's
/// keys and values (every sequence's cache) come from memory, not cache,
/// and the hardware prefetchers lose the trail at every page of a paged
/// cache. 32 measured best of 0/12/16/24/32/48 (one step's attention over
/// 16 SmolLM2 sequences' caches on one core: 35 ms without, 21 at 32).
const PREFETCH: usize = 32;

/// Prefetch row j of `r` (hd numbers, f16 or f32) into L1, if j < len.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_row<const F16: bool, R: Rows>(r: R, j: usize, len: usize, hd: usize) {
    use std::arch::x86_64::*;
    if j < len {
        let p = r.at(j);
        let bytes = if F16 { 2 * hd } else { 4 * hd };
        for l in (0..bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.add(l) as *const i8);
        }
    }
}

/// One run through the register kernels: s (g, len) = scale · q kᵀ, each
/// row turned into e^(s − m) with its statistics (m, Σ), then acc (g, hd)
/// = P v. -> the statistics per query head.
///
/// Safety: as `scores_small` and `values_small`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::type_complexity)]
unsafe fn small_run<const F16: bool, R: Rows>(
    k: R,
    v: R,
    (resident, q, len, hd, scale, s, acc): (
        bool,
        &[f32],
        usize,
        usize,
        f32,
        &mut [f32],
        &mut [f32],
    ),
) -> Vec<(f32, f32)> {
    scores_small::<F16, R>(resident, q, (k, v), len, hd, scale, s);
    let stats = s
        .chunks_exact_mut(len)
        .map(super::dense::exp_shifted)
        .collect();
    values_small::<F16, R>(resident, s, v, len, hd, acc);
    stats
}

/// The scores kernel for the group's shape: `scores_gc` for the common
/// ones, else `scores_avx512` or `scores_wide` as the queries fit
/// registers. `k` is read; `v` (the same keys' values) only prefetched.
///
/// Safety: as theirs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_small<const F16: bool, R: Rows>(
    resident: bool,
    q: &[f32],
    (k, v): (R, R),
    len: usize,
    hd: usize,
    scale: f32,
    s: &mut [f32],
) {
    macro_rules! shapes {
        ($(($g:literal, $c:literal)),*) => {
            match (q.len() / hd, hd / 16) {
                $(($g, $c) => scores_gc::<F16, R, $g, $c>(q, (k, v), len, scale, s),)*
                _ if resident => scores_avx512::<F16, R>(q, k, len, hd, scale, s),
                _ => scores_wide::<F16, R>(q, k, len, hd, scale, s),
            }
        };
    }
    shapes!((1, 4), (2, 4), (3, 4), (4, 4), (1, 8), (2, 8))
}

/// The values kernel for the group's shape: `values_gc` for the common
/// ones, else `values_avx512` or `values_wide` as the queries fit
/// registers.
///
/// Safety: as theirs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn values_small<const F16: bool, R: Rows>(
    resident: bool,
    p: &[f32],
    v: R,
    len: usize,
    hd: usize,
    acc: &mut [f32],
) {
    macro_rules! shapes {
        ($(($g:literal, $c:literal)),*) => {
            match (acc.len() / hd, hd / 16) {
                $(($g, $c) => values_gc::<F16, R, $g, $c>(p, v, len, acc),)*
                _ if resident => values_avx512::<F16, R>(p, v, len, hd, acc),
                _ => values_wide::<F16, R>(p, v, len, hd, acc),
            }
        };
    }
    shapes!((1, 4), (2, 4), (3, 4), (4, 4), (1, 8), (2, 8))
}

/// `scores_avx512` for G query heads of C·16 numbers, both known to the
/// compiler (the queries and accumulators in registers): four keys at a
/// time, their 4·G dot products reduced together by one shuffle tree
/// instead of one horizontal sum each. A last group of fewer than four
/// keys repeats the last key (computed, not stored), so every key's score
/// takes the same sums in the same order wherever it falls. The values `v`
/// of the same keys are prefetched too, so that the values pass finds them
/// in cache (16 SmolLM2 sequences' attention: −8% time).
///
/// Safety: as `scores_avx512`, with q holding G·C·16 numbers and v as
/// many rows as k.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_gc<const F16: bool, R: Rows, const G: usize, const C: usize>(
    q: &[f32],
    (k, v): (R, R),
    len: usize,
    scale: f32,
    s: &mut [f32],
) {
    use std::arch::x86_64::*;
    debug_assert!(q.len() == G * C * 16 && s.len() >= G * len);
    let mut qv = [[_mm512_setzero_ps(); C]; G];
    for (a, qa) in qv.iter_mut().enumerate() {
        for (x, r) in qa.iter_mut().enumerate() {
            *r = _mm512_loadu_ps(q.as_ptr().add(16 * (a * C + x)));
        }
    }
    let sc = _mm_set1_ps(scale);
    let mut j = 0;
    while j < len {
        let rows: [*const u8; 4] = std::array::from_fn(|r| k.at((j + r).min(len - 1)));
        for r in 0..4 {
            prefetch_row::<F16, R>(k, j + r + PREFETCH, len, 16 * C);
            prefetch_row::<F16, R>(v, j + r + PREFETCH, len, 16 * C);
        }
        let mut acc = [[_mm512_setzero_ps(); 4]; G];
        for x in 0..C {
            let kv: [__m512; 4] = std::array::from_fn(|r| load16::<F16>(rows[r], x));
            for (qa, aa) in qv.iter().zip(acc.iter_mut()) {
                for (ar, kr) in aa.iter_mut().zip(&kv) {
                    *ar = _mm512_fmadd_ps(qa[x], *kr, *ar);
                }
            }
        }
        let n = (len - j).min(4);
        for (a, aa) in acc.iter().enumerate() {
            let v = _mm_mul_ps(sum4(aa), sc);
            let mut o = [0f32; 4];
            _mm_storeu_ps(o.as_mut_ptr(), v);
            s.get_unchecked_mut(a * len + j..a * len + j + n)
                .copy_from_slice(&o[..n]);
        }
        j += 4;
    }
}

/// The sums of four vectors' 16 numbers: [Σ v0, Σ v1, Σ v2, Σ v3].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sum4(v: &[std::arch::x86_64::__m512; 4]) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    // 128-bit lanes: halves of v0 and v1 side by side, then added
    let s01 = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b01_00_01_00>(v[0], v[1]),
        _mm512_shuffle_f32x4::<0b11_10_11_10>(v[0], v[1]),
    );
    let s23 = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b01_00_01_00>(v[2], v[3]),
        _mm512_shuffle_f32x4::<0b11_10_11_10>(v[2], v[3]),
    );
    // lane i: four partial sums of v_i
    let w = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(s01, s23),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(s01, s23),
    );
    let w = _mm512_add_ps(w, _mm512_permute_ps::<0b01_00_11_10>(w));
    let w = _mm512_add_ps(w, _mm512_permute_ps::<0b10_11_00_01>(w));
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_castps512_ps128(_mm512_permutexvar_ps(idx, w))
}

/// `values_avx512` for G query heads of C·16 numbers known to the compiler
/// (the accumulators in registers); the same sums in the same order.
///
/// Safety: as `values_avx512`, with acc holding G·C·16 numbers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn values_gc<const F16: bool, R: Rows, const G: usize, const C: usize>(
    p: &[f32],
    v: R,
    len: usize,
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    debug_assert!(acc.len() == G * C * 16 && p.len() >= G * len);
    let mut av = [[_mm512_setzero_ps(); C]; G];
    for j in 0..len {
        prefetch_row::<F16, R>(v, j + PREFETCH, len, 16 * C);
        let vp = v.at(j);
        let vv: [__m512; C] = std::array::from_fn(|x| load16::<F16>(vp, x));
        for (a, aa) in av.iter_mut().enumerate() {
            let pa = _mm512_set1_ps(*p.get_unchecked(a * len + j));
            for (r, x) in aa.iter_mut().zip(&vv) {
                *r = _mm512_fmadd_ps(pa, *x, *r);
            }
        }
    }
    for (a, aa) in av.iter().enumerate() {
        for (x, r) in aa.iter().enumerate() {
            _mm512_storeu_ps(acc.as_mut_ptr().add(16 * (a * C + x)), *r);
        }
    }
}

/// 16 numbers of a key or value row at `p` as f32: f16 (`F16`) or f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load16<const F16: bool>(p: *const u8, i: usize) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    if F16 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32 * i) as *const __m256i))
    } else {
        _mm512_loadu_ps((p as *const f32).add(16 * i))
    }
}

/// s (g, len) = scale · q_g (g, hd) · kᵀ for the len keys at `k`, stored as f16 (`F16`) or f32: each key is loaded (and
/// converted) once for the g query heads, whose vectors stay in registers
/// (g · hd / 16 ≤ 16 of them). A GEMM call here spent most of its time
/// repacking the keys for a 3-row product.
///
/// Safety: the CPU has AVX-512 F; hd is a multiple of 16; k has len rows;
/// s holds g·len numbers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512<const F16: bool, R: Rows>(
    q: &[f32],
    k: R,
    len: usize,
    hd: usize,
    scale: f32,
    s: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (g, c) = (q.len() / hd, hd / 16);
    let mut qv = [_mm512_setzero_ps(); 16];
    for (i, v) in qv.iter_mut().enumerate().take(g * c) {
        *v = _mm512_loadu_ps(q.as_ptr().add(16 * i));
    }
    let mut kv = [_mm512_setzero_ps(); 16];
    for j in 0..len {
        prefetch_row::<F16, R>(k, j + PREFETCH, len, hd);
        let kp = k.at(j);
        for (x, v) in kv.iter_mut().enumerate().take(c) {
            *v = load16::<F16>(kp, x);
        }
        for a in 0..g {
            let mut acc = _mm512_setzero_ps();
            for x in 0..c {
                acc = _mm512_fmadd_ps(qv[a * c + x], kv[x], acc);
            }
            *s.get_unchecked_mut(a * len + j) = _mm512_reduce_add_ps(acc) * scale;
        }
    }
}

/// acc (g, hd) = p (g, len) · v for the len value rows at `v` (f16 or
/// f32): each row is loaded once for the g heads, the
/// accumulators in registers.
///
/// Safety: as `scores_avx512`, with v for k and acc holding g·hd numbers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn values_avx512<const F16: bool, R: Rows>(
    p: &[f32],
    v: R,
    len: usize,
    hd: usize,
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (g, c) = (acc.len() / hd, hd / 16);
    let mut av = [_mm512_setzero_ps(); 16];
    let mut vv = [_mm512_setzero_ps(); 16];
    for j in 0..len {
        prefetch_row::<F16, R>(v, j + PREFETCH, len, hd);
        let vp = v.at(j);
        for (x, r) in vv.iter_mut().enumerate().take(c) {
            *r = load16::<F16>(vp, x);
        }
        for a in 0..g {
            let pa = _mm512_set1_ps(*p.get_unchecked(a * len + j));
            for x in 0..c {
                let r = &mut av[a * c + x];
                *r = _mm512_fmadd_ps(pa, vv[x], *r);
            }
        }
    }
    for (i, r) in av.iter().enumerate().take(g * c) {
        _mm512_storeu_ps(acc.as_mut_ptr().add(16 * i), *r);
    }
}

/// `scores_avx512` for groups whose query vectors do not fit in registers
/// (g · hd / 16 > 16, g ≤ 16): keys two at a time (when g ≤ 8), each loaded
/// (and converted) once, 16 numbers at a time, into 2·g independent
/// accumulators, the queries read from L1.
///
/// Safety: as `scores_avx512`, with g ≤ 16 instead of the register budget.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_wide<const F16: bool, R: Rows>(
    q: &[f32],
    k: R,
    len: usize,
    hd: usize,
    scale: f32,
    s: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (g, c) = (q.len() / hd, hd / 16);
    let pairs = if g <= 8 { len / 2 } else { 0 };
    for jp in 0..pairs {
        prefetch_row::<F16, R>(k, 2 * jp + PREFETCH, len, hd);
        prefetch_row::<F16, R>(k, 2 * jp + 1 + PREFETCH, len, hd);
        let (k0, k1) = (k.at(2 * jp), k.at(2 * jp + 1));
        let mut acc = [_mm512_setzero_ps(); 16];
        for x in 0..c {
            let (v0, v1) = (load16::<F16>(k0, x), load16::<F16>(k1, x));
            for a in 0..g {
                let qa = _mm512_loadu_ps(q.as_ptr().add(a * hd + 16 * x));
                acc[a] = _mm512_fmadd_ps(qa, v0, acc[a]);
                acc[8 + a] = _mm512_fmadd_ps(qa, v1, acc[8 + a]);
            }
        }
        for a in 0..g {
            *s.get_unchecked_mut(a * len + 2 * jp) = _mm512_reduce_add_ps(acc[a]) * scale;
            *s.get_unchecked_mut(a * len + 2 * jp + 1) = _mm512_reduce_add_ps(acc[8 + a]) * scale;
        }
    }
    for j in 2 * pairs..len {
        prefetch_row::<F16, R>(k, j + PREFETCH, len, hd);
        let kp = k.at(j);
        let mut acc = [_mm512_setzero_ps(); 16];
        for x in 0..c {
            let kv = load16::<F16>(kp, x);
            for (a, r) in acc.iter_mut().enumerate().take(g) {
                let qa = _mm512_loadu_ps(q.as_ptr().add(a * hd + 16 * x));
                *r = _mm512_fmadd_ps(qa, kv, *r);
            }
        }
        for (a, r) in acc.iter().enumerate().take(g) {
            *s.get_unchecked_mut(a * len + j) = _mm512_reduce_add_ps(*r) * scale;
        }
    }
}

/// `values_avx512` for wide groups: blocks of 16 / g column chunks (16
/// numbers each) at a time, their g · 16/g accumulators in registers
/// (independent chains, so the FMA pipes stay busy) while the len value
/// rows stream by, each p broadcast once per block. The first block's pass
/// prefetches each whole row, so the later blocks read the slice from L2.
///
/// Safety: as `values_avx512`, with g ≤ 16 instead of the register budget.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn values_wide<const F16: bool, R: Rows>(
    p: &[f32],
    v: R,
    len: usize,
    hd: usize,
    acc: &mut [f32],
) {
    match acc.len() / hd {
        1 => values_block::<F16, R, 1, 16>(p, v, len, hd, acc),
        2 => values_block::<F16, R, 2, 8>(p, v, len, hd, acc),
        4 => values_block::<F16, R, 4, 4>(p, v, len, hd, acc),
        8 => values_block::<F16, R, 8, 2>(p, v, len, hd, acc),
        _ => values_block::<F16, R, 16, 1>(p, v, len, hd, acc),
    }
}

/// `values_wide` for G query heads (any g ≤ G: the rest of the registers
/// idle) and NX chunks per block, both known to the compiler so that the
/// accumulators live in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn values_block<const F16: bool, R: Rows, const G: usize, const NX: usize>(
    p: &[f32],
    v: R,
    len: usize,
    hd: usize,
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (g, c) = (acc.len() / hd, hd / 16);
    let mut x0 = 0;
    while x0 < c {
        let nx = NX.min(c - x0);
        let mut av = [[_mm512_setzero_ps(); NX]; G];
        for j in 0..len {
            let vp = v.at(j);
            if x0 == 0 {
                prefetch_row::<F16, R>(v, j + PREFETCH, len, hd);
            }
            let mut vv = [_mm512_setzero_ps(); NX];
            for (i, r) in vv.iter_mut().enumerate() {
                if i < nx {
                    *r = load16::<F16>(vp, x0 + i);
                }
            }
            for (a, ra) in av.iter_mut().enumerate() {
                if a < g {
                    let pa = _mm512_set1_ps(*p.get_unchecked(a * len + j));
                    for (r, x) in ra.iter_mut().zip(&vv) {
                        *r = _mm512_fmadd_ps(pa, *x, *r);
                    }
                }
            }
        }
        for (a, ra) in av.iter().enumerate().take(g) {
            for (i, r) in ra.iter().enumerate().take(nx) {
                _mm512_storeu_ps(acc.as_mut_ptr().add(a * hd + 16 * (x0 + i)), *r);
            }
        }
        x0 += nx;
    }
}

/// A row of scores -> probabilities: softmax over a..b, zero elsewhere
/// (the keys the query may not see).
fn softmax_band(row: &mut [f32], a: usize, b: usize) {
    let (before, rest) = row.split_at_mut(a);
    let (seen, after) = rest.split_at_mut(b - a);
    super::dense::softmax_row(seen);
    before.fill(0.0);
    after.fill(0.0);
}

/// The number of queries t, after checking that q and out are (t, h, hd)
/// and that the cache holds keys and values for positions 0..pos0 + t.
fn queries(
    q: &[f32],
    k: &[KvRows],
    v: &[KvRows],
    (h, h_kv, hd): (usize, usize, usize),
    pos0: usize,
    out: &[f32],
) -> usize {
    let t = q.len() / (h * hd);
    assert!(
        q.len() == t * h * hd && out.len() == q.len(),
        "attention: q/out sizes"
    );
    assert!(
        k.len() == h_kv
            && v.len() == h_kv
            && k.iter()
                .chain(v)
                .all(|r| r.width == hd && r.rows() >= pos0 + t),
        "attention: the cache holds fewer than pos0 + t keys"
    );
    t
}

/// A pointer that parallel tasks write through at disjoint places.
#[derive(Clone, Copy)]
struct SharedPtr(*mut f32);
// Safety: the tasks given one write disjoint elements.
unsafe impl Send for SharedPtr {}
unsafe impl Sync for SharedPtr {}

impl SharedPtr {
    /// (A method, so that closures capture the wrapper, not the pointer.)
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// dst (m, n) = scale · lhs (m, k) · rhs (k, n) on this thread; each
/// operand a pointer with its (row, column) strides (dst's columns are
/// contiguous).
///
/// # Safety
///
/// Every element the sizes and strides address lies inside the buffer
/// behind its pointer, and dst does not overlap lhs or rhs.
pub unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, isize),
    (lhs, lhs_rs, lhs_cs): (*const f32, isize, isize),
    (rhs, rhs_rs, rhs_cs): (*const f32, isize, isize),
    scale: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        false,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        0.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::kv::KvDType;
    use rand::{Rng, SeedableRng};

    /// The textbook form in f64: every query against every key it may see.
    /// k, v token-major (n, h_kv, hd); `causal: false` lets every query see
    /// all n keys; `window` w keeps only keys within w positions.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (h, h_kv, hd): (usize, usize, usize),
        pos0: usize,
        causal: bool,
    ) -> Vec<f32> {
        naive_band(q, k, v, (h, h_kv, hd), pos0, causal, None)
    }

    fn naive_band(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (h, h_kv, hd): (usize, usize, usize),
        pos0: usize,
        causal: bool,
        window: Option<usize>,
    ) -> Vec<f32> {
        let t = q.len() / (h * hd);
        let n = k.len() / (h_kv * hd);
        let mut out = vec![0f32; q.len()];
        for i in 0..t {
            let p = (pos0 + i) as i64;
            let sees = |j: usize| {
                let j = j as i64;
                let near = window.is_none_or(|w| (p - j).abs() < w as i64);
                near && (!causal || j <= p)
            };
            for head in 0..h {
                let kv = head / (h / h_kv);
                let qi = &q[(i * h + head) * hd..][..hd];
                let keys: Vec<usize> = (0..n).filter(|&j| sees(j)).collect();
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let kj = &k[(j * h_kv + kv) * hd..][..hd];
                        qi.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for c in 0..hd {
                    out[(i * h + head) * hd + c] = s
                        .iter()
                        .zip(&keys)
                        .map(|(x, &j)| (x - m).exp() / z * v[(j * h_kv + kv) * hd + c] as f64)
                        .sum::<f64>() as f32;
                }
            }
        }
        out
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-2.0f32..2.0)).collect()
    }

    /// Token-major x (n, h_kv, hd) encoded as one cache buffer per kv head
    /// in `dtype`, and what they decode to, token-major (the numbers
    /// attention sees).
    fn rows(x: &[f32], h_kv: usize, hd: usize, dtype: KvDType) -> (Vec<Vec<u8>>, Vec<f32>) {
        let n = x.len() / (h_kv * hd);
        let mut heads = vec![vec![0u8; dtype.bytes(n * hd)]; h_kv];
        let mut back = vec![0f32; x.len()];
        for (g, b) in heads.iter_mut().enumerate() {
            for j in 0..n {
                let at = (j * h_kv + g) * hd;
                let row = &mut b[dtype.bytes(j * hd)..][..dtype.bytes(hd)];
                dtype.encode(&x[at..][..hd], row);
                dtype.decode(row, &mut back[at..][..hd]);
            }
        }
        (heads, back)
    }

    fn views(heads: &[Vec<u8>], dtype: KvDType, hd: usize) -> Vec<KvRows<'_>> {
        heads
            .iter()
            .map(|b| KvRows::contiguous(dtype, b, hd))
            .collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn split_kv_equals_unsplit_attention() {
        // 3 query heads per kv head, contexts that don't divide the slices;
        // every cache type (against the textbook form on the numbers the
        // cache holds); and wide heads (4 × 256 per kv head, Gemma 3's),
        // whose queries do not fit in registers, in groups of 4 and of 12;
        // and the group shapes with kernels of their own (SmolLM2's 3 × 64,
        // 4 × 64, 2 × 128, 1 × 64)
        let shapes = [
            (6, 2, 32),
            (8, 2, 256),
            (24, 2, 64),
            (9, 3, 64),
            (8, 2, 64),
            (4, 2, 128),
            (2, 2, 64),
        ];
        for dims @ (h, h_kv, hd) in shapes {
            for dtype in [KvDType::F32, KvDType::F16, KvDType::Bf16, KvDType::Q8_0] {
                for (pos0, t) in [(0, 1), (5, 1), (300, 1), (1000, 3), (77, 16)] {
                    let n = pos0 + t;
                    let q = random(t * h * hd, 1 + pos0 as u64);
                    let (kb, k) = rows(&random(n * h_kv * hd, 2), h_kv, hd, dtype);
                    let (vb, v) = rows(&random(n * h_kv * hd, 3), h_kv, hd, dtype);
                    let want = naive(&q, &k, &v, dims, pos0, true);
                    let (kr, vr) = (views(&kb, dtype, hd), views(&vb, dtype, hd));
                    for chunk in [1, 7, 64, 256, 100_000] {
                        let mut got = vec![f32::NAN; q.len()];
                        split_kv_chunked(&q, &kr, &vr, dims, pos0, &mut got, chunk);
                        let d = max_diff(&got, &want);
                        assert!(
                            d < 1e-5,
                            "{dims:?} {dtype} pos0 {pos0} t {t} chunk {chunk}: {d}"
                        );
                    }
                    let mut got = vec![f32::NAN; q.len()];
                    split_kv(&q, &kr, &vr, dims, pos0, &mut got);
                    assert!(max_diff(&got, &want) < 1e-5);
                }
            }
        }
    }

    #[test]
    fn blocked_prefill_equals_the_textbook_form() {
        let dims = (4, 1, 32);
        for dtype in [KvDType::F32, KvDType::F16, KvDType::Q8_0] {
            for (pos0, t) in [(0, 16), (0, 130), (40, 70)] {
                let n = pos0 + t;
                let q = random(t * 4 * 32, 4);
                let (kb, k) = rows(&random(n * 32, 5), 1, 32, dtype);
                let (vb, v) = rows(&random(n * 32, 6), 1, 32, dtype);
                let mut got = vec![f32::NAN; q.len()];
                let (kr, vr) = (views(&kb, dtype, 32), views(&vb, dtype, 32));
                causal_prefill(&q, &kr, &vr, dims, pos0, &mut got);
                let d = max_diff(&got, &naive(&q, &k, &v, dims, pos0, true));
                assert!(d < 1e-5, "{dtype} pos0 {pos0} t {t}: {d}");
            }
        }
    }

    #[test]
    fn packed_sequences_attend_only_to_their_own_keys() {
        // three sequences packed end to end, token-major k/v, both masks
        let (h, h_kv, hd) = (4, 2, 16);
        let lens = [5, 70, 1];
        let total: usize = lens.iter().sum();
        let q = random(total * h * hd, 7);
        let k = random(total * h_kv * hd, 8);
        let v = random(total * h_kv * hd, 9);
        let mut seqs = vec![];
        let mut at = 0;
        for &t in &lens {
            seqs.push(Seq {
                q0: at,
                t,
                k0: at,
                pos0: 0,
            });
            at += t;
        }
        // windows narrower than a block of queries, wider, and one key
        for window in [None, Some(1), Some(5), Some(64), Some(100)] {
            for causal in [true, false] {
                let mut got = vec![f32::NAN; q.len()];
                let s = |data| Strided {
                    data,
                    head: hd,
                    row: h_kv * hd,
                };
                let mask = Mask { causal, window };
                attend_f32(&q, s(&k), s(&v), (h, h_kv, hd), &seqs, mask, &mut got);
                for sq in &seqs {
                    let (qa, ka) = (sq.q0 * h * hd, sq.k0 * h_kv * hd);
                    let want = naive_band(
                        &q[qa..][..sq.t * h * hd],
                        &k[ka..][..sq.t * h_kv * hd],
                        &v[ka..][..sq.t * h_kv * hd],
                        (h, h_kv, hd),
                        0,
                        causal,
                        window,
                    );
                    let d = max_diff(&got[qa..][..sq.t * h * hd], &want);
                    assert!(d < 1e-5, "{mask:?}, len {}: {d}", sq.t);
                }
            }
        }
    }
}
