//! Softmax attention over plain f32 buffers: the causal prefill as GEMMs.
//!
//! Layouts are token-major, as the projections write them: queries
//! q (t, h, hd), keys and values (n, h_kv, hd); query head `head` reads key
//! head `head / (h / h_kv)` (grouped-query attention).

use rayon::prelude::*;

/// Queries per block of the prefill form.
const QB: usize = 64;

/// Causal grouped-query softmax attention of t queries at positions
/// pos0..pos0+t over the keys/values of positions 0..pos0+t:
/// q (t, h, hd), k, v (pos0 + t, h_kv, hd) -> out (t, h, hd).
///
/// Per (head, block of 64 queries): S = Q_h K_hᵀ / √hd over the keys the
/// block's last query may see, the causal mask and softmax row by row, then
/// O_h = P V_h; both products on gemm's kernels, reading q, k, v and writing
/// out in place through strides.
pub fn causal_prefill(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (h, h_kv, hd): (usize, usize, usize),
    pos0: usize,
    out: &mut [f32],
) {
    let t = q.len() / (h * hd);
    assert!(
        q.len() == t * h * hd && out.len() == q.len(),
        "attention: q/out sizes"
    );
    assert!(
        k.len() >= (pos0 + t) * h_kv * hd && v.len() >= (pos0 + t) * h_kv * hd,
        "attention: the cache holds fewer than pos0 + t keys"
    );
    assert!(h_kv > 0 && h.is_multiple_of(h_kv), "attention: heads");
    let group = h / h_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..h)
        .flat_map(|head| (0..t).step_by(QB).map(move |i0| (head, i0)))
        .collect();
    let dst = SharedPtr(out.as_mut_ptr());
    tasks.par_iter().for_each(|&(head, i0)| {
        let (m, kv) = ((t - i0).min(QB), head / group);
        let n = pos0 + i0 + m; // keys the block's last query sees
        let mut s = vec![0f32; m * n];
        let (ld_q, ld_kv) = ((h * hd) as isize, (h_kv * hd) as isize);
        // Safety: q rows i0..i0+m of this head, k/v rows 0..n of this kv
        // head and out rows i0..i0+m of this head lie inside their buffers
        // (asserted above); tasks write disjoint (rows, head) blocks of out.
        unsafe {
            gemm_strided(
                (m, n, hd),
                (s.as_mut_ptr(), n as isize),
                (q.as_ptr().add((i0 * h + head) * hd), ld_q, 1),
                (k.as_ptr().add(kv * hd), 1, ld_kv),
                scale,
            );
        }
        for (r, row) in s.chunks_exact_mut(n).enumerate() {
            let valid = pos0 + i0 + r + 1;
            let (seen, future) = row.split_at_mut(valid);
            let max = seen.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            for x in seen.iter_mut() {
                *x = super::encoder::exp(*x - max);
            }
            let inv = 1.0 / sum(seen);
            seen.iter_mut().for_each(|x| *x *= inv);
            future.fill(0.0);
        }
        unsafe {
            gemm_strided(
                (m, hd, n),
                (dst.get().add((i0 * h + head) * hd), ld_q),
                (s.as_ptr(), n as isize, 1),
                (v.as_ptr().add(kv * hd), ld_kv, 1),
                1.0,
            );
        }
    });
}

/// Σ x with 16 independent accumulators (vectorises).
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
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
/// Safety: every element the sizes and strides address lies inside the
/// buffer behind its pointer.
unsafe fn gemm_strided(
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
