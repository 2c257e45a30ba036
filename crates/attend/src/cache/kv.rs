//! The KV cache: what a softmax attention layer keeps of one sequence's past
//! keys and values. There is one cache type; every executor reads and writes
//! it, and the eviction policies (`policy`) are bookkeeping over it.
//!
//! Storage is head-major: per KV head, rows of head_dim numbers in the
//! cache's type (`--kv-dtype`: f32, f16, bf16, q8_0; `kernels::kv`), grown
//! in place. Two ways to fill it:
//!
//! * **plain** (`policy: None`): every token is kept; keys are stored after
//!   RoPE at their position, and attention reads the rows in place
//!   (`kernels::attention`: GEMMs for a prefill, split-KV for decoding);
//! * **under a policy**: each KV head keeps what the policy allows and
//!   evicts independently (H2O and RazorAttention need that); keys are
//!   stored before RoPE and rotated by their rank among the kept tokens
//!   ("positions from the slot", as StreamingLLM does), so `full` equals the
//!   plain cache. Slots freed by an eviction are reused;
//! * **a sliding window** (`window: Some(w)`, the `window` mechanism's
//!   layers, e.g. Gemma 3's local layers): a ring of w slots, position p in
//!   slot p mod w, keys rotated at their position as in a plain cache. A
//!   decode step overwrites the oldest slot and reads all w (softmax does
//!   not care about their order); a longer step lays the last w − 1 held
//!   tokens and the new ones out in order and runs the banded prefill. The
//!   cache never holds more than w tokens, at any context.

use super::paged::{BlockPool, KvBlock, Pages};
use super::policy::KvPolicy;
use crate::error::{Error, Result};
use crate::kernels::kv::{KvDType, KvRows};
use crate::kernels::rope::RopeTables;
use crate::kernels::{attention, axpy, dot};
use rayon::prelude::*;
use std::sync::Arc;

/// One KV head's rows and, under a policy, which slots hold which tokens.
#[derive(Clone, Debug, Default)]
pub struct HeadCache {
    /// Keys and values: (slots, head_dim) in the cache's type.
    k: Vec<u8>,
    v: Vec<u8>,
    /// Slots written (= tokens held by a plain cache).
    slots: usize,
    /// Accumulated attention per slot (H2O, A2SF).
    score: Vec<f32>,
    /// Absolute position per slot.
    pos: Vec<u32>,
    /// Occupied slots, oldest first (policy caches).
    order: Vec<u32>,
    free: Vec<u32>,
    /// RazorAttention's compensation token: sums of dropped keys/values.
    comp: Option<(Vec<f32>, Vec<f32>, usize)>,
    /// A retrieval head (RazorAttention): never evicts.
    pub retrieval: bool,
}

impl HeadCache {
    /// Slots in use under a policy (the compensation token counts as one).
    fn kept(&self) -> usize {
        self.order.len() + usize::from(self.comp.as_ref().is_some_and(|c| c.2 > 0))
    }

    /// Bytes held: the rows written and the policy's bookkeeping.
    fn state_bytes(&self) -> usize {
        self.k.len()
            + self.v.len()
            + 4 * (self.score.len() + self.pos.len() + self.order.len() + self.free.len())
            + self
                .comp
                .as_ref()
                .map_or(0, |c| 4 * (c.0.len() + c.1.len()))
    }

    /// Bytes allocated (the rows' buffers grow geometrically).
    fn allocated_bytes(&self) -> usize {
        self.k.capacity()
            + self.v.capacity()
            + 4 * (self.score.capacity()
                + self.pos.capacity()
                + self.order.capacity()
                + self.free.capacity())
            + self
                .comp
                .as_ref()
                .map_or(0, |c| 4 * (c.0.capacity() + c.1.capacity()))
    }

    /// Room for `slots` rows of `rb` bytes, growing geometrically (a prompt
    /// and a stretch of decoding at once).
    fn grow(&mut self, slots: usize, rb: usize) {
        let need = slots * rb;
        if self.k.capacity() < need {
            let want = need.max(2 * self.k.capacity());
            self.k.reserve_exact(want - self.k.len());
            self.v.reserve_exact(want - self.v.len());
        }
        self.k.resize(need, 0);
        self.v.resize(need, 0);
    }

    /// Policy caches: store a token (key before RoPE) in a free slot.
    fn insert(&mut self, dt: KvDType, k: &[f32], v: &[f32], pos: usize) {
        let rb = dt.bytes(k.len());
        let slot = match self.free.pop() {
            Some(s) => {
                let s = s as usize;
                self.score[s] = 0.0;
                self.pos[s] = pos as u32;
                s
            }
            None => {
                self.grow(self.slots + 1, rb);
                self.slots += 1;
                self.score.push(0.0);
                self.pos.push(pos as u32);
                self.slots - 1
            }
        };
        dt.encode(k, &mut self.k[slot * rb..][..rb]);
        dt.encode(v, &mut self.v[slot * rb..][..rb]);
        self.order.push(slot as u32);
    }

    /// Drop the token at rank `r` (index into `order`); RazorAttention adds
    /// it to the compensation token.
    fn evict(&mut self, dt: KvDType, r: usize, hd: usize) {
        let s = self.order.remove(r) as usize;
        if let Some((ks, vs, n)) = &mut self.comp {
            let rb = dt.bytes(hd);
            let mut row = vec![0f32; hd];
            dt.decode(&self.k[s * rb..][..rb], &mut row);
            axpy(ks, 1.0, &row);
            dt.decode(&self.v[s * rb..][..rb], &mut row);
            axpy(vs, 1.0, &row);
            *n += 1;
        }
        self.free.push(s as u32);
    }

    /// Evict down to the policy's budget; the newest token always stays.
    fn enforce(&mut self, dt: KvDType, policy: &KvPolicy, hd: usize) {
        if self.retrieval {
            return;
        }
        let Some(budget) = policy.budget() else {
            return;
        };
        while self.kept() > budget {
            let r = match *policy {
                KvPolicy::Full => unreachable!("full has no budget"),
                KvPolicy::Window { .. } => 0,
                KvPolicy::Sinks { sinks, .. } | KvPolicy::Razor { sinks, .. } => sinks,
                KvPolicy::H2o { window, .. } | KvPolicy::A2sf { window, .. } => {
                    // the lowest accumulated score outside the recent window
                    let old = self.order.len() - window;
                    (0..old)
                        .min_by(|&a, &b| {
                            let (sa, sb) = (
                                self.score[self.order[a] as usize],
                                self.score[self.order[b] as usize],
                            );
                            sa.total_cmp(&sb).then(a.cmp(&b))
                        })
                        .expect("a full cache has tokens outside the window")
                }
            };
            self.evict(dt, r, hd);
        }
    }
}

/// The keys and values one KV head attends over at a policy step, as f32:
/// (n, hd) each, keys rotated to their rank; the compensation token last.
struct Kept {
    k: Vec<f32>,
    v: Vec<f32>,
    /// slots, in the order of the rows (without the compensation token)
    slots: Vec<u32>,
}

/// One sequence's keys and values for one attention layer.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub dtype: KvDType,
    hd: usize,
    heads: Vec<HeadCache>,
    /// None: keep everything (plain); else the eviction policy.
    pub policy: Option<KvPolicy>,
    /// Sliding-window layers: keep the last w tokens in a ring.
    pub window: Option<usize>,
    /// Tokens seen (the position of the next one).
    pub seen: usize,
    /// Keep each query head's attention over the cache at the last step
    /// (policy caches; the retrieval-head probe reads `last_probs`).
    pub record: bool,
    pub last_probs: Vec<Vec<f32>>,
    /// A plain cache whose rows live in blocks of a pool (`paged`).
    pages: Option<Pages>,
    /// Attend a step of several tokens as that many one-token steps would
    /// (split-KV for every query instead of the prefill GEMM; a ring takes
    /// the tokens one at a time), so each position's numbers equal plain
    /// decoding's, bit for bit: the verification pass of speculative
    /// decoding.
    pub one_by_one: bool,
}

impl KvCache {
    /// An empty plain cache for `h_kv` heads of `hd` numbers in `dtype`.
    pub fn new(dtype: KvDType, h_kv: usize, hd: usize) -> Result<Self> {
        if !hd.is_multiple_of(dtype.block()) {
            return Err(Error::msg(format!(
                "a {dtype} KV cache stores blocks of {} numbers per head; this model's heads have {hd}",
                dtype.block()
            )));
        }
        Ok(Self {
            dtype,
            hd,
            heads: vec![HeadCache::default(); h_kv],
            policy: None,
            window: None,
            seen: 0,
            record: false,
            last_probs: vec![],
            pages: None,
            one_by_one: false,
        })
    }

    /// An empty plain cache whose rows live in blocks from `pool` (a
    /// server's sequences: memory bounded by the pool, blocks shared).
    pub fn paged(pool: &BlockPool) -> Result<Self> {
        Self::with_blocks(pool, vec![])
    }

    /// A paged cache that starts with `blocks` (full, shared with whoever
    /// else holds them: a cached prefix): blocks.len() · block_tokens
    /// tokens.
    pub fn with_blocks(pool: &BlockPool, blocks: Vec<Arc<KvBlock>>) -> Result<Self> {
        let mut c = Self::new(pool.dtype(), pool.kv_heads(), pool.head_dim())?;
        let n = blocks.len() * pool.block_tokens();
        for h in &mut c.heads {
            h.slots = n;
        }
        c.seen = n;
        c.pages = Some(Pages {
            pool: pool.clone(),
            blocks,
        });
        Ok(c)
    }

    /// A paged sliding-window cache: as `with_blocks`, each query reading
    /// only the last `w` positions (every token is kept, so the blocks of a
    /// prefix can be shared like a full layer's).
    pub fn paged_window(pool: &BlockPool, blocks: Vec<Arc<KvBlock>>, w: usize) -> Result<Self> {
        if w == 0 {
            return Err(Error::config("window", "must be at least 1"));
        }
        let mut c = Self::with_blocks(pool, blocks)?;
        c.window = Some(w);
        Ok(c)
    }

    /// Whether `truncate` can roll this cache back: a plain cache,
    /// contiguous or paged (a paged window keeps every token).
    pub fn can_truncate(&self) -> bool {
        self.policy.is_none() && (self.window.is_none() || self.pages.is_some())
    }

    /// Forget every token from position n on, so that the cache is what
    /// it was after its first n tokens (speculative decoding's rollback of
    /// rejected draft tokens). Plain caches, contiguous or paged (a paged
    /// window too: it keeps every token); a policy cache or a ring has
    /// evicted or overwritten rows for the tokens it saw, so it refuses
    /// (the caller restores a copy of its state instead).
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        if !self.can_truncate() {
            return Err(Error::msg(
                "a policy-capped or ring-window KV cache cannot be rolled back",
            ));
        }
        if n > self.seen {
            return Err(Error::msg(format!(
                "KV cache: cannot roll back to {n} tokens, it holds {}",
                self.seen
            )));
        }
        if let Some(p) = &mut self.pages {
            // rows past n in the last kept block are stale; the next append
            // writes over them (copying the block first if it is shared)
            p.blocks.truncate(n.div_ceil(p.pool.block_tokens()));
        } else {
            let rb = self.dtype.bytes(self.hd);
            for h in &mut self.heads {
                h.k.truncate(n * rb);
                h.v.truncate(n * rb);
            }
        }
        for h in &mut self.heads {
            h.slots = n;
        }
        self.seen = n;
        Ok(())
    }

    /// A paged cache's block table.
    pub fn blocks(&self) -> Option<&[Arc<KvBlock>]> {
        self.pages.as_ref().map(|p| &p.blocks[..])
    }

    /// An empty ring of the last `w` tokens (a sliding-window layer).
    pub fn windowed(dtype: KvDType, h_kv: usize, hd: usize, w: usize) -> Result<Self> {
        if w == 0 {
            return Err(Error::config("window", "must be at least 1"));
        }
        let mut c = Self::new(dtype, h_kv, hd)?;
        c.window = Some(w);
        Ok(c)
    }

    /// An empty cache under `policy`; `retrieval[g]`: KV head g keeps
    /// everything (RazorAttention's retrieval heads).
    pub fn with_policy(
        policy: &KvPolicy,
        dtype: KvDType,
        h_kv: usize,
        hd: usize,
        retrieval: &[bool],
    ) -> Result<Self> {
        let mut c = Self::new(dtype, h_kv, hd)?;
        let razor = matches!(policy, KvPolicy::Razor { .. });
        for (g, h) in c.heads.iter_mut().enumerate() {
            // only RazorAttention spares retrieval heads
            h.retrieval = razor && retrieval.get(g).copied().unwrap_or(false);
            h.comp = razor.then(|| (vec![0f32; hd], vec![0f32; hd], 0));
            // the rows grow as tokens arrive (geometrically, up to the
            // budget + 1 a capped head holds): nothing reserved up front
        }
        c.policy = Some(policy.clone());
        Ok(c)
    }

    /// Forget every token but keep the buffers: the same as a fresh cache
    /// with the same policy, without allocating and page-faulting the rows
    /// again (a benchmark's next repetition, a server's next request).
    pub fn clear(&mut self) {
        if let Some(p) = &mut self.pages {
            p.blocks.clear();
        }
        for h in &mut self.heads {
            h.k.clear();
            h.v.clear();
            h.slots = 0;
            h.score.clear();
            h.pos.clear();
            h.order.clear();
            h.free.clear();
            if let Some((k, v, n)) = &mut h.comp {
                k.fill(0.0);
                v.fill(0.0);
                *n = 0;
            }
        }
        self.seen = 0;
        self.last_probs.clear();
    }

    pub fn kv_heads(&self) -> usize {
        self.heads.len()
    }

    pub fn head_dim(&self) -> usize {
        self.hd
    }

    /// Tokens held by KV head g.
    pub fn head_len(&self, g: usize) -> usize {
        let h = &self.heads[g];
        match self.policy {
            None => h.slots,
            Some(_) => h.kept(),
        }
    }

    /// Most tokens any head holds.
    pub fn len(&self) -> usize {
        (0..self.heads.len())
            .map(|g| self.head_len(g))
            .max()
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether KV head g is a retrieval head (keeps everything).
    pub fn is_retrieval(&self, g: usize) -> bool {
        self.heads[g].retrieval
    }

    /// Absolute positions of the tokens KV head g holds, oldest first.
    pub fn positions(&self, g: usize) -> Vec<usize> {
        let h = &self.heads[g];
        if self.window.is_some() {
            return (self.seen - h.slots..self.seen).collect();
        }
        match self.policy {
            None => (0..h.slots).collect(),
            Some(_) => h
                .order
                .iter()
                .map(|&s| h.pos[s as usize] as usize)
                .collect(),
        }
    }

    /// RazorAttention's compensation token of head g: the mean dropped key
    /// (before RoPE) and value, and how many tokens it stands for.
    pub fn compensation(&self, g: usize) -> Option<(Vec<f32>, Vec<f32>, usize)> {
        let (ks, vs, n) = self.heads[g].comp.as_ref().filter(|c| c.2 > 0)?;
        let mean = |x: &[f32]| x.iter().map(|a| a / *n as f32).collect();
        Some((mean(ks), mean(vs), *n))
    }

    /// Bytes the cache holds: keys and values in its KV type (and a
    /// policy's bookkeeping) — the memory axis attend reports. Spare room
    /// in the growing buffers is not counted (`allocated_bytes`).
    pub fn state_bytes(&self) -> usize {
        self.heads.iter().map(|h| h.state_bytes()).sum::<usize>()
            + self.pages.as_ref().map_or(0, Pages::bytes)
    }

    /// Bytes allocated by the cache's buffers (at most about twice what
    /// they hold, plus a policy cache's reserve).
    pub fn allocated_bytes(&self) -> usize {
        self.heads
            .iter()
            .map(|h| h.allocated_bytes())
            .sum::<usize>()
            + self.pages.as_ref().map_or(0, Pages::bytes)
    }

    /// Plain caches: the rows of each KV head, keys then values (a
    /// window's ring in slot order: position p in slot p mod w).
    pub fn rows(&self) -> (Vec<KvRows<'_>>, Vec<KvRows<'_>>) {
        let (dtype, width) = (self.dtype, self.hd);
        if let Some(p) = &self.pages {
            let bt = p.pool.block_tokens();
            let head = |g: usize, key: bool| {
                let pages = p
                    .blocks
                    .iter()
                    .map(|b| if key { b.head(g).0 } else { b.head(g).1 })
                    .collect();
                KvRows::paged(dtype, pages, bt, width, self.seen)
            };
            return (
                (0..self.heads.len()).map(|g| head(g, true)).collect(),
                (0..self.heads.len()).map(|g| head(g, false)).collect(),
            );
        }
        (
            self.heads
                .iter()
                .map(|h| KvRows::contiguous(dtype, &h.k, width))
                .collect(),
            self.heads
                .iter()
                .map(|h| KvRows::contiguous(dtype, &h.v, width))
                .collect(),
        )
    }

    /// Plain caches: append t tokens, k and v (t, h_kv, hd) token-major,
    /// keys already rotated to their positions.
    pub fn append(&mut self, k: &[f32], v: &[f32]) -> Result<()> {
        if self.policy.is_some() || (self.window.is_some() && self.pages.is_none()) {
            return Err(Error::msg(
                "a policy-capped or sliding-window KV cache takes tokens through attend",
            ));
        }
        let (dt, hd, h_kv) = (self.dtype, self.hd, self.heads.len());
        let t = k.len() / (h_kv * hd);
        if k.len() != t * h_kv * hd || v.len() != k.len() {
            return Err(Error::msg(
                "KV cache: keys/values are not (t, h_kv, head_dim)",
            ));
        }
        if let Some(p) = &mut self.pages {
            p.append(self.seen, k, v)?;
            for h in &mut self.heads {
                h.slots += t;
            }
            self.seen += t;
            return Ok(());
        }
        let rb = dt.bytes(hd);
        for (g, h) in self.heads.iter_mut().enumerate() {
            let n0 = h.slots;
            h.grow(n0 + t, rb);
            for i in 0..t {
                let at = (i * h_kv + g) * hd;
                dt.encode(&k[at..][..hd], &mut h.k[(n0 + i) * rb..][..rb]);
                dt.encode(&v[at..][..hd], &mut h.v[(n0 + i) * rb..][..rb]);
            }
            h.slots += t;
        }
        self.seen += t;
        Ok(())
    }

    /// Plain caches: keys and values as f32, head-major (h_kv, n, hd).
    pub fn to_f32(&self) -> (Vec<f32>, Vec<f32>) {
        let (k, v) = self.rows();
        let n = self.len();
        let mut kf = vec![0f32; k.len() * n * self.hd];
        let mut vf = vec![0f32; kf.len()];
        for g in 0..k.len() {
            k[g].decode_rows(0, 0, self.hd, &mut kf[g * n * self.hd..][..n * self.hd]);
            v[g].decode_rows(0, 0, self.hd, &mut vf[g * n * self.hd..][..n * self.hd]);
        }
        (kf, vf)
    }

    /// Causal softmax attention of t new tokens through the cache:
    /// q (t, h, hd), k and v (t, h_kv, hd), all before RoPE -> out
    /// (t, h, hd). The tokens are stored; a plain cache rotates q and k to
    /// their positions (in place) and attends over everything, a policy
    /// cache takes them one at a time (insert, evict, attend by rank).
    pub fn attend(
        &mut self,
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        rope: Option<&RopeTables>,
        h: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let (hd, h_kv) = (self.hd, self.heads.len());
        let (qd, kvd) = (h * hd, h_kv * hd);
        let t = q.len() / qd;
        if self.policy.is_some() {
            for i in 0..t {
                self.step(
                    &q[i * qd..][..qd],
                    &k[i * kvd..][..kvd],
                    &v[i * kvd..][..kvd],
                    rope,
                    &mut out[i * qd..][..qd],
                )?;
            }
            return Ok(());
        }
        let pos0 = self.seen;
        if let Some(r) = rope {
            if pos0 + t > r.max_len {
                return Err(Error::msg(format!(
                    "sequence of {} tokens exceeds the model's max_len {}",
                    pos0 + t,
                    r.max_len
                )));
            }
            for (x, heads) in [(&mut *q, h), (&mut *k, h_kv)] {
                for (i, row) in x.chunks_exact_mut(heads * hd).enumerate() {
                    for head in row.chunks_exact_mut(hd) {
                        r.rotate(head, pos0 + i);
                    }
                }
            }
        }
        let dims = (h, h_kv, hd);
        if let (Some(w), None) = (self.window, &self.pages) {
            self.attend_window(q, k, v, dims, w, out);
            return Ok(());
        }
        self.append(k, v)?;
        let (kr, vr) = self.rows();
        // one token (decoding): split-KV; several (a prompt or a chunk of
        // one): the GEMM form, whose numbers for a position do not depend on
        // where the chunk starts (`causal_prefill`), so a prompt prefilled
        // in chunks of two or more tokens gets what a whole prefill gets. A
        // paged sliding-window layer keeps every token and reads the band,
        // in the same shapes
        match (t >= 2 && !self.one_by_one, self.window) {
            (true, w) => attention::causal_prefill_window(q, &kr, &vr, dims, pos0, w, out),
            (false, Some(w)) => attention::split_kv_window(q, &kr, &vr, dims, pos0, w, out),
            (false, None) => attention::split_kv(q, &kr, &vr, dims, pos0, out),
        }
        Ok(())
    }

    /// Sliding-window caches: q (t, h, hd), k and v (t, h_kv, hd), rotated
    /// to their positions -> out (t, h, hd); the ring keeps the last w.
    fn attend_window(
        &mut self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (h, h_kv, hd): (usize, usize, usize),
        w: usize,
        out: &mut [f32],
    ) {
        let (dt, pos0) = (self.dtype, self.seen);
        let rb = dt.bytes(hd);
        let t = k.len() / (h_kv * hd);
        if t >= 2 && self.one_by_one {
            // verification: each token exactly as a decode step takes it
            let (qd, kvd) = (h * hd, h_kv * hd);
            for i in 0..t {
                let (ki, vi) = (&k[i * kvd..][..kvd], &v[i * kvd..][..kvd]);
                let oi = &mut out[i * qd..][..qd];
                self.attend_window(&q[i * qd..][..qd], ki, vi, (h, h_kv, hd), w, oi);
            }
            return;
        }
        // the ring's occupied slots after this step: min(tokens, w)
        let slots = (pos0 + t).min(w);
        if t == 1 {
            // decoding: overwrite the oldest slot, read every slot
            let slot = pos0 % w;
            for (g, c) in self.heads.iter_mut().enumerate() {
                c.grow(slots, rb);
                c.slots = slots;
                dt.encode(&k[g * hd..][..hd], &mut c.k[slot * rb..][..rb]);
                dt.encode(&v[g * hd..][..hd], &mut c.v[slot * rb..][..rb]);
            }
            self.seen += 1;
            let (kr, vr) = self.rows();
            attention::split_kv(q, &kr, &vr, (h, h_kv, hd), slots - 1, out);
            return;
        }
        // several tokens: the w − 1 held positions the first query can
        // see, in order, then the new ones (rounded through the cache's
        // type, as a plain cache would hold them), head-major f32
        let prior = pos0.min(w - 1);
        let n = prior + t;
        let mut kf = crate::kernels::scratch::take(h_kv * n * hd);
        let mut vf = crate::kernels::scratch::take(h_kv * n * hd);
        let mut row = vec![0u8; rb];
        for (g, c) in self.heads.iter_mut().enumerate() {
            let base = g * n * hd;
            for (r, p) in (pos0 - prior..pos0).enumerate() {
                let at = (p % w) * rb;
                dt.decode(&c.k[at..][..rb], &mut kf[base + r * hd..][..hd]);
                dt.decode(&c.v[at..][..rb], &mut vf[base + r * hd..][..hd]);
            }
            c.grow(slots, rb);
            c.slots = slots;
            for i in 0..t {
                let (src, dst) = ((i * h_kv + g) * hd, base + (prior + i) * hd);
                // the last w tokens stay in the ring
                let keep = i + w >= t;
                let slot = (pos0 + i) % w * rb;
                for (x, buf, f) in [(k, &mut c.k, &mut kf), (v, &mut c.v, &mut vf)] {
                    dt.encode(&x[src..][..hd], &mut row);
                    dt.decode(&row, &mut f[dst..][..hd]);
                    if keep {
                        buf[slot..][..rb].copy_from_slice(&row);
                    }
                }
            }
        }
        let st = |data| attention::Strided {
            data,
            head: n * hd,
            row: hd,
        };
        let seq = attention::Seq {
            q0: 0,
            t,
            k0: 0,
            pos0: prior,
        };
        let mask = attention::Mask {
            causal: true,
            window: Some(w),
        };
        attention::attend_f32(q, st(&kf), st(&vf), (h, h_kv, hd), &[seq], mask, out);
        crate::kernels::scratch::give(kf);
        crate::kernels::scratch::give(vf);
        self.seen += t;
    }

    /// Policy caches, one token: q (h, hd), k and v (h_kv, hd), all before
    /// RoPE -> out (h, hd). Inserts the token, evicts to the budget, attends
    /// over what is kept, and accumulates the attention scores the policy
    /// uses.
    fn step(
        &mut self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        rope: Option<&RopeTables>,
        out: &mut [f32],
    ) -> Result<()> {
        let (hd, dt) = (self.hd, self.dtype);
        let h_kv = self.heads.len();
        let h = q.len() / hd;
        let group = h / h_kv;
        let pos = self.seen;
        let policy = self.policy.clone().expect("a policy cache");
        let sinks = match policy {
            KvPolicy::Sinks { sinks, .. } | KvPolicy::Razor { sinks, .. } => sinks,
            _ => 0,
        };
        // 1. per KV head: insert, evict, and decode what is kept, keys
        // rotated to their rank (sinks, [compensation], the rest)
        let kept: Vec<Kept> = self
            .heads
            .par_iter_mut()
            .enumerate()
            .map(|(g, c)| {
                c.insert(dt, &k[g * hd..][..hd], &v[g * hd..][..hd], pos);
                c.enforce(dt, &policy, hd);
                if let Some(r) = rope.filter(|r| c.kept() > r.max_len) {
                    return Err(Error::msg(format!(
                        "the KV cache holds {} tokens, more than the model's context of {} \
                         (cap it with a policy, e.g. sinks=4,window=1020)",
                        c.kept(),
                        r.max_len
                    )));
                }
                let comp = c.comp.as_ref().filter(|x| x.2 > 0);
                let n = c.kept();
                let rb = dt.bytes(hd);
                let (mut kf, mut vf) = (vec![0f32; n * hd], vec![0f32; n * hd]);
                let mut row = 0;
                for (i, &s) in c.order.iter().enumerate() {
                    let rank = if comp.is_some() && i >= sinks {
                        i + 1
                    } else {
                        i
                    };
                    let su = s as usize;
                    dt.decode(&c.k[su * rb..][..rb], &mut kf[row * hd..][..hd]);
                    dt.decode(&c.v[su * rb..][..rb], &mut vf[row * hd..][..hd]);
                    if let Some(r) = rope {
                        r.rotate(&mut kf[row * hd..][..hd], rank);
                    }
                    row += 1;
                }
                if let Some((ks, vs, cnt)) = comp {
                    // the mean dropped key (at its rank, after the sinks) and value
                    let kc = &mut kf[row * hd..][..hd];
                    for (a, &b) in kc.iter_mut().zip(ks) {
                        *a = b / *cnt as f32;
                    }
                    if let Some(r) = rope {
                        r.rotate(kc, sinks.min(c.order.len()));
                    }
                    for (a, &b) in vf[row * hd..][..hd].iter_mut().zip(vs) {
                        *a = b / *cnt as f32;
                    }
                }
                Ok(Kept {
                    k: kf,
                    v: vf,
                    slots: c.order.clone(),
                })
            })
            .collect::<Result<_>>()?;
        // 2. per query head: softmax attention over the kept tokens
        let scale = 1.0 / (hd as f32).sqrt();
        let probs: Vec<Vec<f32>> = out
            .par_chunks_mut(hd)
            .enumerate()
            .map(|(qh, o)| {
                let kp = &kept[qh / group];
                let n = kp.k.len() / hd;
                let mut qv = q[qh * hd..][..hd].to_vec();
                if let Some(r) = rope {
                    r.rotate(&mut qv, n - 1);
                }
                let mut s: Vec<f32> =
                    kp.k.chunks_exact(hd)
                        .map(|kj| dot(&qv, kj) * scale)
                        .collect();
                let max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut z = 0f32;
                for x in s.iter_mut() {
                    *x = (*x - max).exp();
                    z += *x;
                }
                o.fill(0.0);
                for (&p, vj) in s.iter().zip(kp.v.chunks_exact(hd)) {
                    axpy(o, p, vj);
                }
                for a in o.iter_mut() {
                    *a /= z;
                }
                for p in s.iter_mut() {
                    *p /= z;
                }
                s
            })
            .collect();
        // 3. accumulate attention (summed over the group's query heads)
        if policy.scores() {
            let forget = match policy {
                KvPolicy::A2sf { forget, .. } => forget,
                _ => 1.0,
            };
            for (g, c) in self.heads.iter_mut().enumerate() {
                for (i, &s) in kept[g].slots.iter().enumerate() {
                    let p: f32 = (0..group).map(|j| probs[g * group + j][i]).sum();
                    let sc = &mut c.score[s as usize];
                    *sc = forget * *sc + p;
                }
            }
        }
        if self.record {
            self.last_probs = probs;
        }
        self.seen += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-2.0f32..2.0)).collect()
    }

    /// Query p over the rounded keys of positions p − w + 1 ..= p, in f64
    /// (k, v token-major (n, h_kv, hd)).
    fn banded(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        p: usize,
        w: usize,
        dims: (usize, usize, usize),
    ) -> Vec<f32> {
        let (h, h_kv, hd) = dims;
        let mut out = vec![0f32; h * hd];
        for head in 0..h {
            let g = head / (h / h_kv);
            let js: Vec<usize> = (0..=p).filter(|j| p - j < w).collect();
            let s: Vec<f64> = js
                .iter()
                .map(|&j| {
                    (0..hd)
                        .map(|c| q[head * hd + c] as f64 * k[(j * h_kv + g) * hd + c] as f64)
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for c in 0..hd {
                out[head * hd + c] = js
                    .iter()
                    .zip(&s)
                    .map(|(&j, x)| (x - m).exp() / z * v[(j * h_kv + g) * hd + c] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn a_window_ring_attends_like_the_band_and_holds_w_tokens() {
        // steps of 1 and longer chunks, shorter and longer than the window,
        // in every KV type; against the textbook band over the numbers the
        // cache's type keeps
        let dims @ (h, h_kv, hd) = (4, 2, 32);
        let chunks = [3, 1, 1, 9, 1, 20, 1, 1, 40, 2, 1];
        let n: usize = chunks.iter().sum();
        for dt in [KvDType::F32, KvDType::F16, KvDType::Q8_0] {
            for w in [1, 5, 8, 16, 200] {
                let q = random(n * h * hd, 1);
                let (k, v) = (random(n * h_kv * hd, 2), random(n * h_kv * hd, 3));
                let round = |x: &[f32]| {
                    let mut b = vec![0u8; dt.bytes(hd)];
                    let mut y = x.to_vec();
                    for (r, o) in x.chunks(hd).zip(y.chunks_mut(hd)) {
                        dt.encode(r, &mut b);
                        dt.decode(&b, o);
                    }
                    y
                };
                let (kr, vr) = (round(&k), round(&v));
                let mut c = KvCache::windowed(dt, h_kv, hd, w).unwrap();
                let mut at = 0;
                for &t in &chunks {
                    let mut qs = q[at * h * hd..][..t * h * hd].to_vec();
                    let mut ks = k[at * h_kv * hd..][..t * h_kv * hd].to_vec();
                    let vs = &v[at * h_kv * hd..][..t * h_kv * hd];
                    let mut out = vec![f32::NAN; qs.len()];
                    c.attend(&mut qs, &mut ks, vs, None, h, &mut out).unwrap();
                    for i in 0..t {
                        let p = at + i;
                        let want = banded(&q[p * h * hd..][..h * hd], &kr, &vr, p, w, dims);
                        let got = &out[i * h * hd..][..h * hd];
                        let d = got
                            .iter()
                            .zip(&want)
                            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                        assert!(d < 1e-4, "{dt} w {w} position {p}: {d}");
                    }
                    at += t;
                    let held = at.min(w);
                    assert_eq!(c.len(), held);
                    assert_eq!(c.positions(0), (at - held..at).collect::<Vec<_>>());
                    assert_eq!(c.state_bytes(), 2 * h_kv * held * dt.bytes(hd));
                }
            }
        }
    }

    #[test]
    fn a_paged_cache_attends_as_a_contiguous_one_and_shares_a_prefix() {
        // prefill (the GEMM form), then decode steps (split-KV) across page
        // boundaries, in every KV type, with pages that do and do not
        // divide the split-KV slices; then a second sequence that starts
        // from the first one's full blocks and goes its own way
        for (h, h_kv, hd) in [(6, 2, 32), (9, 3, 64)] {
            let rope = crate::kernels::rope::RopeTables::new(hd, 512, 10_000.0, None, false);
            for dtype in [KvDType::F32, KvDType::F16, KvDType::Q8_0] {
                for bt in [1, 7, 32, 64, 256] {
                    let pool = BlockPool::new(dtype, h_kv, hd, bt, 10_000).unwrap();
                    let mut plain = KvCache::new(dtype, h_kv, hd).unwrap();
                    let mut paged = KvCache::paged(&pool).unwrap();
                    let mut outs = (vec![], vec![]);
                    for (i, t) in [40usize, 1, 1, 300, 1, 1].into_iter().enumerate() {
                        let q = random(t * h * hd, 10 + i as u64);
                        let k = random(t * h_kv * hd, 20 + i as u64);
                        let v = random(t * h_kv * hd, 30 + i as u64);
                        for (c, o) in [(&mut plain, &mut outs.0), (&mut paged, &mut outs.1)] {
                            let (mut q, mut k) = (q.clone(), k.clone());
                            let mut out = vec![0f32; q.len()];
                            c.attend(&mut q, &mut k, &v, Some(&rope), h, &mut out)
                                .unwrap();
                            o.push(out);
                        }
                    }
                    // bit for bit: how a cache is stored does not change
                    // its numbers (batch invariance)
                    for (a, b) in outs.0.iter().zip(&outs.1) {
                        assert!(a == b, "{dtype} bt {bt}: paged differs");
                    }
                    assert_eq!((paged.len(), paged.seen), (344, 344));
                    assert_eq!(paged.to_f32(), plain.to_f32());
                    assert_eq!(pool.used(), 344usize.div_ceil(bt));
                    // a second sequence from the first one's full blocks
                    let full = 344 / bt;
                    let shared = paged.blocks().unwrap()[..full].to_vec();
                    let mut fork = KvCache::with_blocks(&pool, shared).unwrap();
                    let mut twin = KvCache::new(dtype, h_kv, hd).unwrap();
                    let (kf, vf) = plain.to_f32();
                    // the plain twin holds the same first full·bt tokens
                    let n0 = full * bt;
                    let tok = |x: &[f32], j: usize| -> Vec<f32> {
                        (0..h_kv)
                            .flat_map(|g| x[(g * 344 + j) * hd..][..hd].to_vec())
                            .collect()
                    };
                    let (k0, v0): (Vec<f32>, Vec<f32>) = (
                        (0..n0).flat_map(|j| tok(&kf, j)).collect(),
                        (0..n0).flat_map(|j| tok(&vf, j)).collect(),
                    );
                    twin.append(&k0, &v0).unwrap();
                    let used = pool.used();
                    let q = random(3 * h * hd, 99);
                    let k = random(3 * h_kv * hd, 98);
                    let v = random(3 * h_kv * hd, 97);
                    let mut res = vec![];
                    for c in [&mut twin, &mut fork] {
                        let (mut q, mut k) = (q.clone(), k.clone());
                        let mut out = vec![0f32; q.len()];
                        c.attend(&mut q, &mut k, &v, None, h, &mut out).unwrap();
                        res.push(out);
                    }
                    assert!(res[0] == res[1], "{dtype} bt {bt}: fork differs");
                    // the fork took new blocks for its own tokens only; the
                    // first sequence's are untouched
                    assert_eq!(pool.used(), used + (n0 + 3).div_ceil(bt) - full);
                    assert_eq!(paged.to_f32(), plain.to_f32());
                }
            }
        }
    }

    #[test]
    fn a_paged_window_attends_as_the_ring() {
        // the same band two ways: a ring of w slots, and paged blocks that
        // keep every token and read the last w; prefill chunks (the GEMM
        // form) and decode steps (split-KV) across the window's edge
        let (h, h_kv, hd) = (4, 1, 32);
        let rope = crate::kernels::rope::RopeTables::new(hd, 512, 10_000.0, None, false);
        for w in [8, 37] {
            for dtype in [KvDType::F32, KvDType::F16] {
                let pool = BlockPool::new(dtype, h_kv, hd, 16, 1000).unwrap();
                let mut ring = KvCache::windowed(dtype, h_kv, hd, w).unwrap();
                let mut paged = KvCache::paged_window(&pool, vec![], w).unwrap();
                for (i, t) in [20usize, 1, 1, 50, 1, 3, 1].into_iter().enumerate() {
                    let q = random(t * h * hd, 40 + i as u64);
                    let k = random(t * h_kv * hd, 50 + i as u64);
                    let v = random(t * h_kv * hd, 60 + i as u64);
                    let mut outs = vec![];
                    for c in [&mut ring, &mut paged] {
                        let (mut q, mut k) = (q.clone(), k.clone());
                        let mut out = vec![0f32; q.len()];
                        c.attend(&mut q, &mut k, &v, Some(&rope), h, &mut out)
                            .unwrap();
                        outs.push(out);
                    }
                    for (x, y) in outs[0].iter().zip(&outs[1]) {
                        assert!(
                            (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                            "w {w} {dtype} step {i}: {x} vs {y}"
                        );
                    }
                }
                assert_eq!(paged.seen, 77);
                assert_eq!(ring.len(), w);
            }
        }
    }
}
