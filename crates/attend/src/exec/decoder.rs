//! The fused forward pass of a Llama-shaped decoder with quantized weights
//! (pre-norm RMSNorm, RoPE, grouped-query softmax attention, SwiGLU; the
//! GGUF models `attend generate` runs), for prefill and decode.
//!
//! It computes exactly what `Transformer::step` computes, from the same
//! weights (shared `Arc<QMatrix>`es, no copies), but on plain f32 buffers:
//! a decode step of SmolLM2 is ~700 candle ops, each allocating a tensor and
//! some crossing a thread barrier, and that overhead cost more than the
//! matrix products. Here a layer is five parallel regions (q/k/v, attention,
//! o, gate/up, down) over buffers allocated once per call, and the KV cache
//! grows in place instead of being re-concatenated every token.
//!
//! `Transformer::new` builds one when the model qualifies (`from_model`);
//! `Transformer::step` uses it for batch-1 states. Tests compare it with the
//! composed path (`tests/fused.rs`).

use crate::cache::policy::{KvPolicy, PolicyCache, RopeTables};
use crate::config::{FfnKind, MechanismConfig, NormKind, NormPosition, PositionKind, Shape};
use crate::error::{Error, Result};
use crate::kernels::kv::{KvDType, KvRows};
use crate::kernels::quant::{matmul_many, Activations, QMatrix};
use crate::model::Transformer;
use crate::nn::Weight;
use crate::norm::Norm;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

struct Layer {
    ln_1: Vec<f32>,
    wq: Arc<QMatrix>,
    wk: Arc<QMatrix>,
    wv: Arc<QMatrix>,
    wo: Arc<QMatrix>,
    ln_2: Vec<f32>,
    /// gate (silu), up, down
    w1: Arc<QMatrix>,
    w3: Arc<QMatrix>,
    w2: Arc<QMatrix>,
}

/// The weights of a qualifying model, borrowed into fused form.
pub struct FusedDecoder {
    d: usize,
    h: usize,
    h_kv: usize,
    hd: usize,
    d_ff: usize,
    eps: f32,
    max_len: usize,
    /// cos/sin tables, shared with policy-capped caches
    rope: Arc<RopeTables>,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    /// (vocab, d)
    embed: Tensor,
}

impl std::fmt::Debug for FusedDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FusedDecoder({} layers)", self.layers.len())
    }
}

/// The KV cache of the fused path: per layer, keys and values token-major,
/// (t, h_kv, head_dim) rows in `dtype` (`kernels::kv`), grown in place.
#[derive(Clone, Debug, Default)]
pub struct FusedKv {
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
    len: usize,
    pub dtype: KvDType,
    /// Per layer, when an eviction policy caps the cache (`cache::policy`);
    /// then `k`/`v` stay empty.
    pub policy: Option<Vec<PolicyCache>>,
}

impl FusedKv {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated by the cache's buffers.
    pub fn state_bytes(&self) -> usize {
        self.policy
            .iter()
            .flatten()
            .map(|p| p.state_bytes())
            .sum::<usize>()
            + self
                .k
                .iter()
                .chain(&self.v)
                .map(|b| b.capacity())
                .sum::<usize>()
    }
}

fn q_weight(w: &Weight) -> Option<Arc<QMatrix>> {
    match w {
        Weight::Q(m) => Some(m.clone()),
        _ => None,
    }
}

fn gain(n: &Norm) -> Option<Vec<f32>> {
    if n.kind() != NormKind::Rmsnorm {
        return None;
    }
    n.weight().to_dtype(DType::F32).ok()?.to_vec1().ok()
}

impl FusedDecoder {
    /// The fused form of `m`, if it is a pre-norm RMSNorm/RoPE/SwiGLU softmax
    /// decoder without biases whose linear weights are all on attend's
    /// quantized kernel (Q4_1/Q8_0), on the CPU in f32. None otherwise.
    pub fn from_model(m: &Transformer) -> Option<Self> {
        let c = &m.cfg;
        let qualifies = c.shape == Shape::Decoder
            && c.norm == NormKind::Rmsnorm
            && c.norm_position == NormPosition::Pre
            && c.ffn == FfnKind::Swiglu
            && c.position == PositionKind::Rope
            && (0..c.n_decoder_layers)
                .all(|i| *c.layer_mechanism(false, i) == MechanismConfig::Softmax)
            && !c.bias
            && !c.scale_embeddings
            && !c.embed_norm
            && c.head_dim().is_multiple_of(8)
            && c.dropout == 0.0
            && m.embed.table.dtype() == DType::F32
            && m.embed.table.device().is_cpu();
        if !qualifies {
            return None;
        }
        let layers = m
            .decoder
            .iter()
            .map(|b| {
                let a = &b.self_attn;
                Some(Layer {
                    ln_1: gain(&b.ln_1)?,
                    wq: q_weight(&a.q_proj.w)?,
                    wk: q_weight(&a.k_proj.w)?,
                    wv: q_weight(&a.v_proj.w)?,
                    wo: q_weight(&a.o_proj.w)?,
                    ln_2: gain(&b.ln_2)?,
                    w1: q_weight(&b.ffn.w1.w)?,
                    w3: q_weight(&b.ffn.w3.as_ref()?.w)?,
                    w2: q_weight(&b.ffn.w2.w)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            d: c.d_model,
            h: c.n_heads,
            h_kv: c.kv_heads(),
            hd: c.head_dim(),
            d_ff: c.d_ff,
            eps: c.norm_eps as f32,
            max_len: c.max_len,
            rope: Arc::new(RopeTables::new(
                c.head_dim(),
                c.max_len,
                c.rope_theta,
                c.rope_interleaved,
            )),
            layers,
            final_norm: gain(m.dec_norm.as_ref()?)?,
            embed: m.embed.table.clone(),
        })
    }

    /// An empty cache storing keys and values in `dtype`.
    pub fn new_state(&self, dtype: KvDType) -> FusedKv {
        FusedKv {
            k: vec![vec![]; self.layers.len()],
            v: vec![vec![]; self.layers.len()],
            len: 0,
            dtype,
            policy: None,
        }
    }

    /// A state whose caches follow `policy`; `retrieval[layer][kv_head]`
    /// marks RazorAttention's retrieval heads.
    pub fn new_policy_state(&self, policy: &KvPolicy, retrieval: Option<&[Vec<bool>]>) -> FusedKv {
        FusedKv {
            policy: Some(
                (0..self.layers.len())
                    .map(|l| {
                        let r = retrieval.and_then(|r| r.get(l)).map_or(&[][..], |r| r);
                        PolicyCache::new(policy, self.h_kv, self.hd, Some(self.rope.clone()), r)
                    })
                    .collect(),
            ),
            ..self.new_state(KvDType::F32)
        }
    }

    /// ids (t) fed after the state's tokens -> the final hidden states
    /// (1, t, d), after the final norm, or only the last one's (1, 1, d)
    /// when `last_only`; the state advances by t.
    pub fn forward(&self, ids: &[u32], st: &mut FusedKv, last_only: bool) -> Result<Tensor> {
        // Run on a pool thread, so that the ~150 parallel regions of a step
        // are forked from inside the pool instead of each one waking the
        // pool and putting the calling thread to sleep.
        let mut out = None;
        rayon::scope(|_| out = Some(self.forward_in_pool(ids, st, last_only)));
        out.expect("rayon::scope runs its closure")
    }

    fn forward_in_pool(&self, ids: &[u32], st: &mut FusedKv, last_only: bool) -> Result<Tensor> {
        let (t, d, hd) = (ids.len(), self.d, self.hd);
        let pos0 = st.len;
        if pos0 + t > self.max_len && st.policy.is_none() {
            return Err(Error::msg(format!(
                "sequence of {} tokens exceeds the model's max_len {}",
                pos0 + t,
                self.max_len
            )));
        }
        let (qd, kvd) = (self.h * hd, self.h_kv * hd);
        if !hd.is_multiple_of(st.dtype.block()) {
            return Err(Error::msg(format!(
                "a {} KV cache stores blocks of {} numbers per head; this model's heads have {hd}",
                st.dtype,
                st.dtype.block()
            )));
        }
        use crate::kernels::scratch::{give, take};
        // x (t, d): the embedding rows, copied from the table in place
        let mut x = take(t * d);
        {
            let (storage, layout) = self.embed.storage_and_layout();
            let table = match (&*storage, layout.contiguous_offsets()) {
                (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
                    &v[a..b]
                }
                _ => return Err(Error::msg("the fused path needs an f32 CPU embedding")),
            };
            let vocab = table.len() / d;
            for (row, &id) in x.chunks_exact_mut(d).zip(ids) {
                if id as usize >= vocab {
                    return Err(Error::msg(format!(
                        "token id {id} is outside the vocabulary of {vocab}"
                    )));
                }
                row.copy_from_slice(&table[id as usize * d..][..d]);
            }
        }
        let mut hbuf = take(t * d);
        let (mut q, mut k, mut v) = (take(t * qd), take(t * kvd), take(t * kvd));
        let mut att = take(t * qd);
        let mut o = take(t * d);
        let (mut g, mut u) = (take(t * self.d_ff), take(t * self.d_ff));
        for (l, w) in self.layers.iter().enumerate() {
            // x + W_o attention(RoPE(W_q h), RoPE(W_k h), W_v h), h = RMSNorm(x)
            rms_norm(&x, &w.ln_1, self.eps, d, &mut hbuf);
            matmul_many(
                &Activations::new(&hbuf, t, d),
                &mut [(&w.wq, &mut q), (&w.wk, &mut k), (&w.wv, &mut v)],
            );
            if let Some(caches) = &mut st.policy {
                // token by token: insert, evict, attend (RoPE by cache slot)
                let c = &mut caches[l];
                for i in 0..t {
                    c.step(
                        &q[i * qd..][..qd],
                        &k[i * kvd..][..kvd],
                        &v[i * kvd..][..kvd],
                        &mut att[i * qd..][..qd],
                    )?;
                }
            } else {
                self.rope(&mut q, self.h, pos0);
                self.rope(&mut k, self.h_kv, pos0);
                let (kc, vc) = (&mut st.k[l], &mut st.v[l]);
                let (dt, row) = (st.dtype, st.dtype.bytes(kvd));
                if kc.capacity() < (pos0 + t) * row {
                    // room for the prompt and a stretch of decoding at once
                    let want = ((pos0 + t) * row).max(2 * kc.capacity());
                    let have = kc.len();
                    kc.reserve_exact(want - have);
                    vc.reserve_exact(want - have);
                }
                kc.resize((pos0 + t) * row, 0);
                vc.resize((pos0 + t) * row, 0);
                for (i, (kr, vr)) in k.chunks_exact(kvd).zip(v.chunks_exact(kvd)).enumerate() {
                    dt.encode(kr, &mut kc[(pos0 + i) * row..][..row]);
                    dt.encode(vr, &mut vc[(pos0 + i) * row..][..row]);
                }
                let rows = |b| KvRows {
                    dtype: dt,
                    bytes: b,
                    width: kvd,
                };
                self.attention(&q, rows(kc), rows(vc), pos0, &mut att);
            }
            matmul_many(&Activations::new(&att, t, qd), &mut [(&w.wo, &mut o)]);
            add(&mut x, &o);
            // x + W_2 (silu(W_1 h) ⊙ W_3 h), h = RMSNorm(x)
            rms_norm(&x, &w.ln_2, self.eps, d, &mut hbuf);
            matmul_many(
                &Activations::new(&hbuf, t, d),
                &mut [(&w.w1, &mut g), (&w.w3, &mut u)],
            );
            for (a, &b) in g.iter_mut().zip(&u) {
                *a = *a / (1.0 + crate::kernels::dense::exp(-*a)) * b;
            }
            matmul_many(&Activations::new(&g, t, self.d_ff), &mut [(&w.w2, &mut o)]);
            add(&mut x, &o);
        }
        st.len += t;
        let keep = if last_only { 1 } else { t };
        let xl = &x[(t - keep) * d..];
        rms_norm(xl, &self.final_norm, self.eps, d, &mut hbuf[..keep * d]);
        let h = Tensor::new(&hbuf[..keep * d], &Device::Cpu)?.reshape((1, keep, d))?;
        for b in [x, hbuf, q, k, v, att, o, g, u] {
            give(b);
        }
        Ok(h)
    }

    /// Rotate every head of x (t, heads, hd) at positions pos0.. in place.
    fn rope(&self, x: &mut [f32], heads: usize, pos0: usize) {
        for (i, row) in x.chunks_mut(heads * self.hd).enumerate() {
            for head in row.chunks_mut(self.hd) {
                self.rope.rotate(head, pos0 + i);
            }
        }
    }

    /// Causal grouped-query softmax attention of the t new queries
    /// q (t, h, hd) at positions pos0.. over the cache k/v (pos0 + t, h_kv, hd)
    /// -> out (t, h, hd) (`kernels::attention`): a prefill as GEMMs per
    /// (head, block of queries), a few queries split along the keys.
    fn attention(&self, q: &[f32], k: KvRows, v: KvRows, pos0: usize, out: &mut [f32]) {
        let dims = (self.h, self.h_kv, self.hd);
        if q.len() >= 16 * self.h * self.hd {
            return crate::kernels::attention::causal_prefill(q, k, v, dims, pos0, out);
        }
        crate::kernels::attention::split_kv(q, k, v, dims, pos0, out)
    }
}

/// y = x / rms(x) · γ, row by row: x (t, d) -> y (t, d).
fn rms_norm(x: &[f32], gain: &[f32], eps: f32, d: usize, y: &mut [f32]) {
    for (xr, yr) in x.chunks(d).zip(y.chunks_mut(d)) {
        let ms = xr.iter().map(|a| a * a).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &a), &g) in yr.iter_mut().zip(xr).zip(gain) {
            *o = a * inv * g;
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
