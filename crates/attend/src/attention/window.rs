//! Sliding-window softmax attention (local attention as in Longformer,
//! Beltagy et al. 2020, and Mistral 7B): exact softmax attention where query
//! i sees only keys j with i - w < j ≤ i (causal) or |i - j| < w
//! (bidirectional).
//!
//! * `naive`   — softmax's textbook loop with the band as its mask;
//! * `forward` — blocked: queries in blocks of w tokens, each block reading
//!   the keys of its own block and the one before (and after, when
//!   bidirectional): O(t·w·d), linear in length;
//! * `step`    — the new key/value overwrites the oldest slot of a ring
//!   buffer of w slots, and the query reads the ring;
//! * `WindowCache` — the ring: 2·b·h_kv·w·d numbers, allocated once at the
//!   first token and never grown.
//!
//! In a model, a `window` layer is the executors' softmax attention with
//! the band (`AttnOp::window`): `exec::graph::banded` on the graph executor, the banded
//! kernel on the CPU one, and its decode state a ring-buffer `KvCache`
//! (`cache::kv`) in the run's KV type. The tensor forms here are BASED's
//! window branch and the references the mechanism tests check.

use super::{softmax, Heads};
use crate::config::WindowConfig;
use crate::error::{Error, Result};
use crate::exec::graph::banded;
use candle_core::Tensor;

const NEG: f32 = -1e9;

#[derive(Clone, Debug)]
pub struct WindowAttention {
    pub window: usize,
}

/// The decode state: the keys and values of the last w positions in a ring
/// buffer; position p lives in slot p mod w.
#[derive(Debug, Default)]
pub struct WindowCache {
    pub k: Option<Tensor>, // (b, h_kv, w, d)
    pub v: Option<Tensor>, // (b, h_kv, w, d)
    /// Tokens seen so far.
    pub len: usize,
}

/// `step` writes into the ring in place, so a clone must own its buffers.
impl Clone for WindowCache {
    fn clone(&self) -> Self {
        let copy =
            |t: &Option<Tensor>| t.as_ref().map(|t| t.copy().expect("copy of a ring buffer"));
        Self {
            k: copy(&self.k),
            v: copy(&self.v),
            len: self.len,
        }
    }
}

impl WindowCache {
    /// Bytes held in the ring's buffers.
    pub fn state_bytes(&self) -> usize {
        [&self.k, &self.v]
            .iter()
            .filter_map(|t| t.as_ref())
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Keep the sequences at `idx` (beam search reordering).
    pub fn select(&mut self, idx: &Tensor) -> Result<()> {
        if let Some(k) = &self.k {
            self.k = Some(k.index_select(idx, 0)?);
        }
        if let Some(v) = &self.v {
            self.v = Some(v.index_select(idx, 0)?);
        }
        Ok(())
    }

    /// The cached positions len - n .. len (n = min(len, w)) in order:
    /// 2 × (b, h_kv, n, d), or None while empty.
    fn chronological(&self, w: usize) -> Result<Option<(Tensor, Tensor)>> {
        let n = self.len.min(w);
        match (&self.k, &self.v) {
            (Some(k), Some(v)) if n > 0 => {
                let slots: Vec<u32> = (self.len - n..self.len).map(|p| (p % w) as u32).collect();
                let idx = Tensor::new(slots.as_slice(), k.device())?;
                Ok(Some((k.index_select(&idx, 2)?, v.index_select(&idx, 2)?)))
            }
            _ => Ok(None),
        }
    }

    /// Rebuild the ring from k, v (b, h_kv, n, d) holding positions
    /// first..first + n, the last of which is the newest token.
    fn store(&mut self, k: &Tensor, v: &Tensor, first: usize, w: usize) -> Result<()> {
        let (b, h_kv, n, _) = k.dims4()?;
        let total = first + n;
        // slot s holds the newest position p < total with p ≡ s (mod w);
        // index n is a zero row for slots no token has reached yet
        let idx: Vec<u32> = (0..w)
            .map(|s| {
                if s >= total {
                    n as u32
                } else {
                    let p = total - 1 - (total - 1 - s) % w;
                    (p - first) as u32
                }
            })
            .collect();
        let idx = Tensor::new(idx.as_slice(), k.device())?;
        let ring = |x: &Tensor| -> Result<Tensor> {
            let zero = Tensor::zeros((b, h_kv, 1, x.dim(3)?), x.dtype(), x.device())?;
            // detached: a decode state keeps no autograd graph
            Ok(Tensor::cat(&[x, &zero], 2)?
                .index_select(&idx, 2)?
                .contiguous()?
                .detach())
        };
        self.k = Some(ring(k)?);
        self.v = Some(ring(v)?);
        self.len = total;
        Ok(())
    }
}

impl WindowAttention {
    pub fn new(cfg: &WindowConfig) -> Result<Self> {
        if cfg.window == 0 {
            return Err(Error::config("window", "must be at least 1"));
        }
        Ok(Self { window: cfg.window })
    }

    /// Whole sequence (training, prefill). q: (b, h, t, d), k/v: (b, h_kv,
    /// t, d); key_padding: (b, t), 1 = token. With `state` (causal only), the
    /// queries also read the cached positions and the ring is updated.
    /// -> (b, h, t, d)
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
        key_padding: Option<&Tensor>,
        state: Option<&mut WindowCache>,
    ) -> Result<Tensor> {
        let w = self.window;
        let Some(cache) = state else {
            return banded(q, k, v, 0, w, causal, key_padding);
        };
        if !causal {
            return Err(Error::msg(
                "bidirectional window attention has no decode state",
            ));
        }
        let (b, _, t, _) = k.dims4()?;
        let (ka, va, n_prior) = match cache.chronological(w)? {
            Some((pk, pv)) => {
                let n = pk.dim(2)?;
                (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?, n)
            }
            None => (k.clone(), v.clone(), 0),
        };
        let pad = key_padding
            .map(|p| -> Result<Tensor> {
                let ones = Tensor::ones((b, n_prior), p.dtype(), p.device())?;
                Ok(Tensor::cat(&[&ones, p], 1)?)
            })
            .transpose()?;
        let y = banded(q, &ka, &va, n_prior, w, true, pad.as_ref())?;
        let first = cache.len - n_prior;
        cache.store(&ka, &va, first, w)?;
        debug_assert_eq!(cache.len, first + n_prior + t);
        Ok(y)
    }

    /// One token: q (b, h, 1, d), k/v (b, h_kv, 1, d) -> (b, h, 1, d). The
    /// new key and value overwrite ring slot (len mod w) in place.
    pub fn step(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut WindowCache,
    ) -> Result<Tensor> {
        let w = self.window;
        let (b, h_kv, _, d) = k.dims4()?;
        if cache.k.is_none() {
            cache.k = Some(Tensor::zeros((b, h_kv, w, d), k.dtype(), k.device())?);
            cache.v = Some(Tensor::zeros(
                (b, h_kv, w, v.dim(3)?),
                v.dtype(),
                v.device(),
            )?);
        }
        let (ck, cv) = (cache.k.as_ref().unwrap(), cache.v.as_ref().unwrap());
        let slot = cache.len % w;
        ck.slice_set(&k.contiguous()?, 2, slot)?;
        cv.slice_set(&v.contiguous()?, 2, slot)?;
        cache.len += 1;
        // before the ring is full, slots len.. are empty
        let bias = if cache.len < w {
            let m: Vec<f32> = (0..w)
                .map(|s| if s < cache.len { 0.0 } else { NEG })
                .collect();
            Some(Tensor::from_vec(m, (1, 1, 1, w), q.device())?.to_dtype(q.dtype())?)
        } else {
            None
        };
        softmax::forward(q, ck, cv, bias.as_ref())
    }
}

/// The textbook form: softmax attention whose mask is the band (and
/// `key_ok(b, j)`). q: [b][h][t][d], k/v: [b][h_kv][t][d].
pub fn naive(
    q: &Heads,
    k: &Heads,
    v: &Heads,
    w: usize,
    causal: bool,
    key_ok: &dyn Fn(usize, usize) -> bool,
) -> Heads {
    // the band written from the definition (not `in_window`, which
    // `forward` uses)
    let band = |i: usize, j: usize| {
        let (i, j, w) = (i as i64, j as i64, w as i64);
        if causal {
            i - w < j && j <= i
        } else {
            (i - j).abs() < w
        }
    };
    softmax::naive(
        q,
        k,
        v,
        &|bi, i, j| band(i, j) && key_ok(bi, j),
        &|_, _, _| 0.0,
    )
}
