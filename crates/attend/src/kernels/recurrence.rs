//! The fused recurrent form of the linear-attention family (as fla's
//! `fused_recurrent` kernels): one pass over the tokens per sequence and kv
//! head, the state S (d_k × d_v) in registers' reach, forward and backward
//! written by hand. It covers every mixer whose state update is
//!
//!   S̃_t = diag(e^(λ_t)) S_{t−1}                       λ_t: (d_k) or one scalar
//!   u_t = β_t (v_t − S̃_tᵀ k_t)   (delta rule)   or   u_t = v_t
//!   S_t = S̃_t + k_t u_tᵀ,        o_{t,j} = S_tᵀ q_{t,j}   for the g query heads j
//!
//! — RetNet's decay (λ a constant), GLA (λ per key channel), Mamba2's SSD
//! (λ one scalar per token), DeltaNet (λ = 0, delta) and Gated DeltaNet.
//! On a CPU at the widths MQAR sweeps use (d_k, d_v ≤ 64) this costs
//! O(t·d_k·d_v) with no intermediate tensors, where the chunked forms'
//! autograd graphs build and keep O(t·C·d_k) ones; the chunked forms remain
//! for decoding's prefill (which must leave the state behind).
//!
//! The op reads q (b, h, t, d_k) and k (b, h_kv, t, d_k) where they lie and
//! v, λ and β packed side by side as one (b, h_kv, t, d_v + d_λ + δ) tensor
//! (candle's custom ops take at most three inputs), and writes o
//! (b, h, t, d_v); its backward writes dq, dk and the packed d[v | λ | β].
//!
//! The backward pass recomputes the forward and keeps S̃_t for every t
//! (t·d_k·d_v numbers per sequence and head), then runs the recurrence
//! backwards with dS:
//!
//!   dS += Σ_j q_j do_jᵀ,  dq_j = S_t do_j,  dk = dS u,  du = dSᵀ k,
//!   delta: dβ = du·(v − r), dv = β du, dr = −β du, dS += k drᵀ, dk += S̃ dr
//!   (r = S̃ᵀk), else dv = du;  dλ_i = Σ_c dS_ic S̃_ic (summed for a scalar λ);
//!   dS ← diag(e^λ) dS.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

/// The shapes of one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recurrence {
    /// Query heads per kv head.
    pub g: usize,
    pub d_k: usize,
    pub d_v: usize,
    /// λ per key channel (d_k) or one scalar per token (1).
    pub d_lambda: usize,
    /// The delta rule's correction (a β column after λ).
    pub delta: bool,
}

/// One token of one sequence and kv head: the g query heads' q, k and the
/// packed [v | λ | β?].
struct Token<'a, T> {
    q: [&'a [T]; MAX_G],
    k: &'a [T],
    side: &'a [T],
}

/// Tokens per block of the backward's recomputation.
const BLOCK: usize = 16;

/// The most query heads per kv head the kernel takes.
pub const MAX_G: usize = 16;

impl Recurrence {
    /// d_v + d_λ + δ: numbers per token in the packed [v | λ | β?].
    pub fn side_width(&self) -> usize {
        self.d_v + self.d_lambda + usize::from(self.delta)
    }

    fn check(&self, lq: &Layout, lk: &Layout, ls: &Layout) -> Result<(usize, usize)> {
        let (b, h, t, dk) = lq.shape().dims4()?;
        let (b2, h_kv, t2, dk2) = lk.shape().dims4()?;
        let (b3, h3, t3, ws) = ls.shape().dims4()?;
        if self.g == 0
            || self.g > MAX_G
            || h != h_kv * self.g
            || (b2, t2, dk2, b3, h3, t3) != (b, t, dk, b, h_kv, t)
            || dk != self.d_k
            || ws != self.side_width()
        {
            candle_core::bail!(
                "recurrence: shapes q {:?}, k {:?}, [v|λ|β] {:?} do not fit {self:?}",
                lq.shape(),
                lk.shape(),
                ls.shape()
            )
        }
        Ok((b * h_kv, t))
    }

    /// S̃ = diag(e^λ) S in place.
    fn decay<T: Float>(&self, s: &mut [T], la: &[T]) {
        let dv = self.d_v;
        if self.d_lambda == 1 {
            if la[0] != T::zero() {
                let e = la[0].exp();
                s.iter_mut().for_each(|x| *x = *x * e);
            }
        } else {
            for (row, &l) in s.chunks_exact_mut(dv).zip(la) {
                if l != T::zero() {
                    let e = l.exp();
                    row.iter_mut().for_each(|x| *x = *x * e);
                }
            }
        }
    }

    /// (v, λ, β) of a token's packed side.
    fn split<'a, T: Float>(&self, side: &'a [T]) -> (&'a [T], &'a [T], T) {
        let (v, rest) = side.split_at(self.d_v);
        let (la, beta) = rest.split_at(self.d_lambda);
        (v, la, if self.delta { beta[0] } else { T::one() })
    }

    /// u from S̃ (and r = S̃ᵀk for the delta rule).
    fn values<T: Float>(&self, s: &[T], k: &[T], v: &[T], beta: T, r: &mut [T], u: &mut [T]) {
        if self.delta {
            r.iter_mut().for_each(|x| *x = T::zero());
            for (row, &ki) in s.chunks_exact(self.d_v).zip(k) {
                axpy(r, ki, row);
            }
            for ((uj, &vj), &rj) in u.iter_mut().zip(v).zip(r.iter()) {
                *uj = beta * (vj - rj);
            }
        } else {
            u.copy_from_slice(v);
        }
    }

    /// The token at τ of one row: q (g, t, d_k), k (t, d_k), side (t, W).
    fn token<'a, T>(&self, q: &'a [T], k: &'a [T], side: &'a [T], tau: usize) -> Token<'a, T> {
        let (dk, t) = (self.d_k, k.len() / self.d_k);
        let ws = self.side_width();
        let mut qs: [&[T]; MAX_G] = [&[]; MAX_G];
        for (j, qj) in qs.iter_mut().enumerate().take(self.g) {
            *qj = &q[(j * t + tau) * dk..(j * t + tau + 1) * dk];
        }
        Token {
            q: qs,
            k: &k[tau * dk..(tau + 1) * dk],
            side: &side[tau * ws..(tau + 1) * ws],
        }
    }

    /// One token of the forward recurrence: S ← S̃ + k uᵀ, leaving S̃ in
    /// `tilde` when given.
    fn step<T: Float>(
        &self,
        x: &Token<T>,
        s: &mut [T],
        tilde: Option<&mut [T]>,
        r: &mut [T],
        u: &mut [T],
    ) {
        let (v, la, beta) = self.split(x.side);
        self.decay(s, la);
        if let Some(tilde) = tilde {
            tilde.copy_from_slice(s);
        }
        self.values(s, x.k, v, beta, r, u);
        for (row, &ki) in s.chunks_exact_mut(self.d_v).zip(x.k) {
            if ki != T::zero() {
                axpy(row, ki, u);
            }
        }
    }

    /// One sequence and kv head: q (g, t, d_k), k (t, d_k), side (t, W)
    /// -> o (g, t, d_v).
    /// With `starts`, S where each block of `BLOCK` tokens starts is kept
    /// there (blocks · d_k · d_v) for the backward.
    fn forward_row<T: Float>(
        &self,
        q: &[T],
        k: &[T],
        side: &[T],
        o: &mut [T],
        mut starts: Option<&mut [T]>,
    ) {
        let (dk, dv) = (self.d_k, self.d_v);
        let (t, sz) = (k.len() / dk, dk * dv);
        let mut s = vec![T::zero(); sz];
        let (mut r, mut u) = (vec![T::zero(); dv], vec![T::zero(); dv]);
        for tau in 0..t {
            if let Some(st) = starts.as_deref_mut() {
                if tau % BLOCK == 0 {
                    st[tau / BLOCK * sz..(tau / BLOCK + 1) * sz].copy_from_slice(&s);
                }
            }
            let x = self.token(q, k, side, tau);
            self.step(&x, &mut s, None, &mut r, &mut u);
            for (j, qj) in x.q[..self.g].iter().enumerate() {
                let oj = &mut o[(j * t + tau) * dv..(j * t + tau + 1) * dv];
                oj.iter_mut().for_each(|x| *x = T::zero());
                for (row, &qi) in s.chunks_exact(dv).zip(qj.iter()) {
                    axpy(oj, qi, row);
                }
            }
        }
    }

    /// One sequence and kv head: q, k, side and do (g, t, d_v) -> dq
    /// (g, t, d_k), dk (t, d_k), dside (t, W).
    ///
    /// The forward pass keeps S only where each block of `BLOCK` tokens
    /// starts; the backward pass recomputes a block's S̃_t from there into
    /// a small buffer (it stays in cache) and runs the block backwards.
    /// `kept`: the block starts `forward_row` kept, if it did.
    #[allow(clippy::too_many_arguments)]
    fn backward_row<T: Float>(
        &self,
        q: &[T],
        k: &[T],
        side: &[T],
        dout: &[T],
        dq: &mut [T],
        dkk: &mut [T],
        dside: &mut [T],
        kept_starts: Option<&[T]>,
    ) {
        let (dk, dv, sz) = (self.d_k, self.d_v, self.d_k * self.d_v);
        let ws = self.side_width();
        let t = k.len() / dk;
        let blocks = t.div_ceil(BLOCK);
        let mut s = vec![T::zero(); sz];
        let (mut r, mut u) = (vec![T::zero(); dv], vec![T::zero(); dv]);
        let mut own = vec![];
        let starts: &[T] = match kept_starts {
            Some(st) => st,
            None => {
                own.resize(blocks * sz, T::zero());
                for tau in 0..t {
                    if tau % BLOCK == 0 {
                        own[tau / BLOCK * sz..(tau / BLOCK + 1) * sz].copy_from_slice(&s);
                    }
                    self.step(&self.token(q, k, side, tau), &mut s, None, &mut r, &mut u);
                }
                &own
            }
        };
        let mut kept = vec![T::zero(); BLOCK * sz];
        let mut ds = vec![T::zero(); sz];
        let mut du = vec![T::zero(); dv];
        for blk in (0..blocks).rev() {
            let (a, e) = (blk * BLOCK, (blk * BLOCK + BLOCK).min(t));
            s.copy_from_slice(&starts[blk * sz..(blk + 1) * sz]);
            for tau in a..e {
                let tilde = &mut kept[(tau - a) * sz..(tau - a + 1) * sz];
                self.step(
                    &self.token(q, k, side, tau),
                    &mut s,
                    Some(tilde),
                    &mut r,
                    &mut u,
                );
            }
            for tau in (a..e).rev() {
                let x = self.token(q, k, side, tau);
                let st = &kept[(tau - a) * sz..(tau - a + 1) * sz]; // S̃_t
                let (v, la, beta) = self.split(x.side);
                self.values(st, x.k, v, beta, &mut r, &mut u);
                // o_j = (S̃ + k uᵀ)ᵀ q_j: dq_j = S̃ do_j + k (u·do_j), dS += q_j do_jᵀ
                for (j, qj) in x.q[..self.g].iter().enumerate() {
                    let doj = &dout[(j * t + tau) * dv..(j * t + tau + 1) * dv];
                    let dqj = &mut dq[(j * t + tau) * dk..(j * t + tau + 1) * dk];
                    let u_do = dot(&u, doj);
                    for (((dqi, row), dsrow), (&qi, &ki)) in dqj
                        .iter_mut()
                        .zip(st.chunks_exact(dv))
                        .zip(ds.chunks_exact_mut(dv))
                        .zip(qj.iter().zip(x.k))
                    {
                        *dqi = dot(row, doj) + ki * u_do;
                        axpy(dsrow, qi, doj);
                    }
                }
                // S = S̃ + k uᵀ: dk = dS u, du = dSᵀ k
                let dkt = &mut dkk[tau * dk..(tau + 1) * dk];
                let (dvv, rest) = dside[tau * ws..(tau + 1) * ws].split_at_mut(dv);
                let (dla, dbeta) = rest.split_at_mut(self.d_lambda);
                du.iter_mut().for_each(|x| *x = T::zero());
                for ((dki, dsrow), &ki) in dkt.iter_mut().zip(ds.chunks_exact(dv)).zip(x.k) {
                    *dki = dot(dsrow, &u);
                    axpy(&mut du, ki, dsrow);
                }
                if self.delta {
                    // u = β (v − S̃ᵀk): dβ = du·(v − r), dv = β du, dr = −β du
                    dbeta[0] = dot(&du, v) - dot(&du, &r);
                    for (d, &g) in dvv.iter_mut().zip(&du) {
                        *d = beta * g;
                    }
                    du.iter_mut().for_each(|g| *g = -beta * *g); // now dr
                    for ((dsrow, row), (dki, &ki)) in ds
                        .chunks_exact_mut(dv)
                        .zip(st.chunks_exact(dv))
                        .zip(dkt.iter_mut().zip(x.k))
                    {
                        axpy(dsrow, ki, &du);
                        *dki = *dki + dot(row, &du);
                    }
                } else {
                    dvv.copy_from_slice(&du);
                }
                // S̃ = diag(e^λ) S_{t−1}
                if self.d_lambda == 1 {
                    dla[0] = dot(&ds, st);
                } else {
                    for ((d, dsrow), row) in dla
                        .iter_mut()
                        .zip(ds.chunks_exact(dv))
                        .zip(st.chunks_exact(dv))
                    {
                        *d = dot(dsrow, row);
                    }
                }
                self.decay(&mut ds, la);
            }
        }
    }

    fn run_forward<T: Float + Send + Sync>(
        &self,
        q: &[T],
        k: &[T],
        side: &[T],
        rows: usize,
        t: usize,
    ) -> Vec<T> {
        let mut o = vec![T::zero(); rows * self.g * t * self.d_v];
        self.forward_into(q, k, side, t, &mut o, None);
        o
    }

    /// Numbers of S kept per row (sequence and kv head) for the backward:
    /// one d_k × d_v state where each block of `BLOCK` tokens starts.
    pub fn starts_len(&self, t: usize) -> usize {
        t.div_ceil(BLOCK) * self.d_k * self.d_v
    }

    /// The forward on plain buffers (the fused trainer's entry): q (rows,
    /// g, t, d_k), k (rows, t, d_k), side (rows, t, W) -> o (rows, g, t,
    /// d_v), one rayon task per row (sequence and kv head). With `starts`
    /// (rows · `starts_len`) it keeps the block starts, so that
    /// `backward_into` need not run the forward again.
    pub fn forward_into<T: Float + Send + Sync>(
        &self,
        q: &[T],
        k: &[T],
        side: &[T],
        t: usize,
        o: &mut [T],
        starts: Option<&mut [T]>,
    ) {
        let (g, dk, dv, ws) = (self.g, self.d_k, self.d_v, self.side_width());
        let rows = q
            .par_chunks(g * t * dk)
            .zip(k.par_chunks(t * dk))
            .zip(side.par_chunks(t * ws))
            .zip(o.par_chunks_mut(g * t * dv));
        match starts {
            Some(st) => rows
                .zip(st.par_chunks_mut(self.starts_len(t)))
                .for_each(|((((q, k), side), o), st)| self.forward_row(q, k, side, o, Some(st))),
            None => rows.for_each(|(((q, k), side), o)| self.forward_row(q, k, side, o, None)),
        }
    }

    /// -> [dq | dk | dside] in one buffer.
    fn run_backward<T: Float + Send + Sync>(
        &self,
        q: &[T],
        kside: &[T],
        dout: &[T],
        rows: usize,
        t: usize,
    ) -> Vec<T> {
        let (k, side) = kside.split_at(rows * t * self.d_k);
        let mut grads = vec![T::zero(); q.len() + kside.len()];
        let (dq, rest) = grads.split_at_mut(q.len());
        let (dk_, dside) = rest.split_at_mut(k.len());
        self.backward_into(q, k, side, dout, t, dq, dk_, dside, None);
        grads
    }

    /// The backward on plain buffers: q, k, side as `forward_into`, dout
    /// (rows, g, t, d_v) -> dq, dk, dside (each overwritten); `starts`: what
    /// `forward_into` kept, if it was asked to.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into<T: Float + Send + Sync>(
        &self,
        q: &[T],
        k: &[T],
        side: &[T],
        dout: &[T],
        t: usize,
        dq: &mut [T],
        dk_: &mut [T],
        dside: &mut [T],
        starts: Option<&[T]>,
    ) {
        let (g, dk, dv, ws) = (self.g, self.d_k, self.d_v, self.side_width());
        let rows = q
            .par_chunks(g * t * dk)
            .zip(k.par_chunks(t * dk))
            .zip(side.par_chunks(t * ws))
            .zip(dout.par_chunks(g * t * dv))
            .zip(dq.par_chunks_mut(g * t * dk))
            .zip(dk_.par_chunks_mut(t * dk))
            .zip(dside.par_chunks_mut(t * ws));
        match starts {
            Some(st) => rows.zip(st.par_chunks(self.starts_len(t))).for_each(
                |(((((((q, k), side), d), dq), dk), ds), st)| {
                    self.backward_row(q, k, side, d, dq, dk, ds, Some(st))
                },
            ),
            None => rows.for_each(|((((((q, k), side), d), dq), dk), ds)| {
                self.backward_row(q, k, side, d, dq, dk, ds, None)
            }),
        }
    }
}

/// Σ a_i b_i with 16 independent sums (so the compiler vectorises it).
#[inline(always)]
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 16];
    let n = a.len() / 16 * 16;
    for (x, y) in a[..n].chunks_exact(16).zip(b[..n].chunks_exact(16)) {
        for i in 0..16 {
            acc[i] = acc[i] + x[i] * y[i];
        }
    }
    let tail = a[n..]
        .iter()
        .zip(&b[n..])
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    acc.iter().fold(tail, |s, &x| s + x)
}

/// y += a x
#[inline(always)]
fn axpy<T: Float>(y: &mut [T], a: T, x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = *y + a * x;
    }
}

fn slice<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("recurrence: input must be contiguous"),
    }
}

impl CustomOp3 for Recurrence {
    fn name(&self) -> &'static str {
        "attend-recurrence"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, t) = self.check(l1, l2, l3)?;
        let (b, h, _, _) = l1.shape().dims4()?;
        let shape = Shape::from((b, h, t, self.d_v));
        match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(s)) => Ok((
                CpuStorage::F32(self.run_forward(
                    slice(q, l1)?,
                    slice(k, l2)?,
                    slice(s, l3)?,
                    rows,
                    t,
                )),
                shape,
            )),
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(s)) => Ok((
                CpuStorage::F64(self.run_forward(
                    slice(q, l1)?,
                    slice(k, l2)?,
                    slice(s, l3)?,
                    rows,
                    t,
                )),
                shape,
            )),
            _ => candle_core::bail!("recurrence: q, k and [v|λ|β] must be all f32 or all f64"),
        }
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        side: &Tensor,
        _o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // k and the side travel as one flat buffer (three inputs at most)
        let kside = Tensor::cat(&[k.flatten_all()?, side.flatten_all()?], 0)?;
        let grads = q.apply_op3_no_bwd(&kside, &grad.contiguous()?, &RecurrenceBwd(*self))?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let part = |start: usize, like: &Tensor| {
            grads
                .narrow(0, start, like.elem_count())?
                .reshape(like.shape())
        };
        Ok((
            Some(part(0, q)?),
            Some(part(nq, k)?),
            Some(part(nq + nk, side)?),
        ))
    }
}

/// (q, [k | side] flattened, do) -> [dq | dk | dside] flattened.
struct RecurrenceBwd(Recurrence);

impl CustomOp3 for RecurrenceBwd {
    fn name(&self) -> &'static str {
        "attend-recurrence-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, t, dk) = l1.shape().dims4()?;
        let rows = b * h / self.0.g;
        let n = l1.shape().elem_count() + l2.shape().elem_count();
        if l2.shape().elem_count() != rows * t * (dk + self.0.side_width()) {
            candle_core::bail!("recurrence backward: [k | side] of {:?}", l2.shape())
        }
        match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(ks), CpuStorage::F32(d)) => Ok((
                CpuStorage::F32(self.0.run_backward(
                    slice(q, l1)?,
                    slice(ks, l2)?,
                    slice(d, l3)?,
                    rows,
                    t,
                )),
                Shape::from(n),
            )),
            (CpuStorage::F64(q), CpuStorage::F64(ks), CpuStorage::F64(d)) => Ok((
                CpuStorage::F64(self.0.run_backward(
                    slice(q, l1)?,
                    slice(ks, l2)?,
                    slice(d, l3)?,
                    rows,
                    t,
                )),
                Shape::from(n),
            )),
            _ => candle_core::bail!("recurrence backward: unsupported dtypes"),
        }
    }
}

/// Whether the fused form runs on this tensor's device and dtype.
pub fn usable(x: &Tensor) -> bool {
    super::usable_cpu(x)
}

/// The whole sequence from a zero state. q: (b, h, t, d_k) (already
/// scaled), k: (b, h_kv, t, d_k), v: (b, h_kv, t, d_v), log_decay λ:
/// (b, h_kv, t, d_k) or (b, h_kv, t, 1), beta: (b, h_kv, t, 1) for the delta
/// rule. -> o (b, h, t, d_v), differentiable in every input.
pub fn fused_recurrence(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_decay: &Tensor,
    beta: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, h, _, d_k) = q.dims4()?;
    let (_, h_kv, _, d_v) = v.dims4()?;
    let op = Recurrence {
        g: h / h_kv,
        d_k,
        d_v,
        d_lambda: log_decay.dim(3)?,
        delta: beta.is_some(),
    };
    let mut side = vec![v.clone(), log_decay.clone()];
    if let Some(beta) = beta {
        side.push(beta.clone());
    }
    let side = Tensor::cat(&side, 3)?;
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &side.contiguous()?, op)
}
