//! Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"):
//! the softmax weight exp(q·k/√d) is replaced by a kernel φ(q)·φ(k), so
//!
//!   y_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + ε),  S_i = Σ_{j≤i} φ(k_j) v_jᵀ,
//!   z_i = Σ_{j≤i} φ(k_j)
//!
//! (the normalised form). q and k are projected to a feature dimension d'
//! per head before φ; `FeatureMap` lists the maps (elu+1, relu, BASED's
//! Taylor expansion, FAVOR+ random features).
//!
//! * `naive`   — the quadratic formula, one weight φ(q_i)·φ(k_j) at a time;
//! * `forward` — the chunked form of Lightning Attention-2 / fla's chunk
//!   kernels: inside a chunk of C tokens exact (masked) attention, between
//!   chunks the state S carried forward, so the cost is O(t·C·F + t·F·d):
//!   linear in length. z rides along as an extra column of ones in v, so
//!   S and z are one (F, d+1) matrix per kv head. For the Taylor map the
//!   in-chunk weights come from the kernel, 1 + s + s²/2 (s = q·k/√d'),
//!   not from the F = 1 + d' + d'² features;
//! * `step`    — S += φ(k)[v, 1]ᵀ, y = φ(q)ᵀS, normalised;
//! * `RecurrentState` — the decode state (shared with `decay` and `gla`):
//!   b·h_kv·F·(d+1) numbers, whatever the length.

use super::Heads;
use crate::config::{FeatureMap, LinearConfig};
use crate::error::{Error, Result};
use crate::nn::Builder;
use candle_core::{DType, Device, Tensor, D};
use rand::SeedableRng;

/// ε of the normaliser.
pub const EPS: f64 = 1e-6;

/// The decode state of the linear family: one matrix per sequence and kv
/// head, of a size fixed by the model (never by the length).
#[derive(Clone, Debug, Default)]
pub struct RecurrentState {
    /// linear: (b, h_kv, F, d_v + 1), S with z as its last column;
    /// decay and GLA: (b, h_kv, d_k, d_v).
    pub s: Option<Tensor>,
}

impl RecurrentState {
    /// Bytes held in the state's buffer.
    pub fn state_bytes(&self) -> usize {
        self.s
            .as_ref()
            .map_or(0, |s| s.elem_count() * s.dtype().size_in_bytes())
    }

    /// Keep the sequences at `idx` (beam search reordering).
    pub fn select(&mut self, idx: &Tensor) -> Result<()> {
        if let Some(s) = &self.s {
            self.s = Some(s.index_select(idx, 0)?);
        }
        Ok(())
    }
}

/// (b, h, t, d) -> (b, h_kv, g·t, d): the g query heads of each kv group
/// stacked as rows, so a kv head's keys, values or state are read by all of
/// its query heads in one matmul (never copied per query head).
pub(crate) fn fold_heads(x: &Tensor, h_kv: usize) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    Ok(x.reshape((b, h_kv, (h / h_kv) * t, d))?)
}

/// (b, h_kv, g·t, d) -> (b, h, t, d), the inverse of `fold_heads`.
pub(crate) fn unfold_heads(y: &Tensor, h: usize) -> Result<Tensor> {
    let (b, h_kv, gt, d) = y.dims4()?;
    Ok(y.reshape((b, h, gt / (h / h_kv), d))?)
}

/// Key padding (b, t), 1 = token, as a multiplier (b, 1, t, 1).
pub(crate) fn key_mask(key_padding: Option<&Tensor>, dtype: DType) -> Result<Option<Tensor>> {
    key_padding
        .map(|p| {
            let (b, t) = p.dims2()?;
            Ok(p.to_dtype(dtype)?.reshape((b, 1, t, 1))?)
        })
        .transpose()
}

/// The causal mask of a chunk of l tokens, j ≤ i, repeated for g query
/// heads stacked as rows: (g·l, l) of 0/1.
pub(crate) fn causal_rows(g: usize, l: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..g * l)
        .flat_map(|r| (0..l).map(move |j| if j <= r % l { 1.0 } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (g * l, l), dev)?.to_dtype(dtype)?)
}

/// How a chunked whole-sequence form cuts t tokens into n chunks of l
/// (the last one zero-padded: a zero key adds nothing, a zero log-decay
/// keeps the state).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunks {
    pub b: usize,
    pub n: usize,
    pub l: usize,
    pad: usize,
}

impl Chunks {
    /// b sequences of t tokens in chunks of at most `chunk`.
    pub(crate) fn new(b: usize, t: usize, chunk: usize) -> Self {
        let l = chunk.min(t).max(1);
        let n = t.div_ceil(l);
        Self {
            b,
            n,
            l,
            pad: n * l - t,
        }
    }

    /// (b, heads, t, d) -> (b·heads, n, l, d)
    pub(crate) fn view(&self, x: &Tensor) -> Result<Tensor> {
        let (_, heads, _, d) = x.dims4()?;
        Ok(x.pad_with_zeros(2, 0, self.pad)?
            .reshape((self.b * heads, self.n, self.l, d))?)
    }

    /// Queries (b, h, t, d) -> (b·h_kv, n, g·l, d): the g query heads of a
    /// kv head stacked as rows of each chunk.
    pub(crate) fn queries(&self, q: &Tensor, h_kv: usize) -> Result<Tensor> {
        let (_, h, _, d) = q.dims4()?;
        let g = h / h_kv;
        Ok(self
            .view(q)?
            .reshape((self.b * h_kv, g, self.n, self.l, d))?
            .transpose(1, 2)?
            .reshape((self.b * h_kv, self.n, g * self.l, d))?)
    }

    /// The inverse of `queries` for outputs: (b·h_kv, n, g·l, d) -> (b, h, t, d).
    pub(crate) fn outputs(&self, y: &Tensor, h: usize, t: usize) -> Result<Tensor> {
        let (bk, _, gl, d) = y.dims4()?;
        let g = gl / self.l;
        Ok(y.reshape((bk, self.n, g, self.l, d))?
            .transpose(1, 2)?
            .reshape((self.b, h, self.n * self.l, d))?
            .narrow(2, 0, t)?)
    }

    /// From the cumulative log-decays γ (bk, n, l, 1) of a scalar decay:
    /// D_ij = e^(γ_i − γ_j) for j ≤ i, else 0 (the exponent masked before
    /// exp, so never positive), repeated for g query heads as rows
    /// (bk, n, g·l, l); and e^γ for those rows (bk, n, g·l, 1).
    pub(crate) fn decay_rows(&self, gamma: &Tensor, g: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (bk, n, l) = (gamma.dim(0)?, self.n, self.l);
        let mask = causal_rows(1, l, gamma.dtype(), gamma.device())?.reshape((1, 1, l, l))?;
        let diff = gamma.broadcast_sub(&gamma.transpose(2, 3)?)?; // (bk, n, i, j)
        let dmat = diff.broadcast_mul(&mask)?.exp()?.broadcast_mul(&mask)?;
        let rows = dmat
            .unsqueeze(2)?
            .broadcast_as((bk, n, g, l, l))?
            .reshape((bk, n, g * l, l))?;
        let eg = gamma
            .unsqueeze(2)?
            .broadcast_as((bk, n, g, l, 1))?
            .reshape((bk, n, g * l, 1))?
            .exp()?;
        Ok((dmat, rows, eg))
    }
}

/// Linear attention with a feature map.
#[derive(Clone, Debug)]
pub struct LinearAttention {
    pub feature_map: FeatureMap,
    /// C: tokens per chunk of `forward`.
    pub chunk: usize,
    /// FAVOR+ projection W (m, d') of the `performer` map: fixed random
    /// features (a buffer, not trained), seeded from the layer's name.
    pub projection: Option<Tensor>,
}

impl LinearAttention {
    pub fn new(vb: &Builder, cfg: &LinearConfig) -> Result<Self> {
        let projection = match cfg.feature_map {
            FeatureMap::Performer => {
                let w = performer_projection(
                    cfg.n_features,
                    cfg.feature_dim,
                    seed_of(&vb.path("performer")),
                );
                let flat: Vec<f64> = w.into_iter().flatten().collect();
                Some(
                    Tensor::from_vec(flat, (cfg.n_features, cfg.feature_dim), vb.device())?
                        .to_dtype(vb.dtype())?,
                )
            }
            _ => None,
        };
        Ok(Self {
            feature_map: cfg.feature_map,
            chunk: cfg.chunk,
            projection,
        })
    }

    /// F: the width of φ(x) for x of width d.
    pub fn feature_size(&self, d: usize) -> usize {
        match self.feature_map {
            FeatureMap::Elu | FeatureMap::Relu => d,
            FeatureMap::Taylor => 1 + d + d * d,
            FeatureMap::Performer => self.projection.as_ref().map_or(0, |w| w.dims()[0]),
        }
    }

    /// φ: (..., d') -> (..., F)
    pub fn phi(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)? as f64;
        Ok(match self.feature_map {
            FeatureMap::Elu => (x.elu(1.0)? + 1.0)?,
            FeatureMap::Relu => x.relu()?,
            FeatureMap::Taylor => {
                // [1, x / d^¼, (x ⊗ x) / (√2 √d)]
                let dims = x.dims().to_vec();
                let r = dims.len();
                let outer = x.unsqueeze(r)?.broadcast_mul(&x.unsqueeze(r - 1)?)?;
                let mut flat = dims.clone();
                flat[r - 1] = dims[r - 1] * dims[r - 1];
                let x2 = (outer.reshape(flat)? / (2f64.sqrt() * d.sqrt()))?;
                let mut one = dims;
                one[r - 1] = 1;
                let ones = Tensor::ones(one, x.dtype(), x.device())?;
                Tensor::cat(&[ones, (x / d.powf(0.25))?, x2], r - 1)?
            }
            FeatureMap::Performer => {
                // exp(W x' - |x'|²/2) / √m, x' = x / d^¼
                let w = self
                    .projection
                    .as_ref()
                    .ok_or_else(|| Error::msg("performer feature map without its projection"))?;
                let m = w.dims()[0] as f64;
                let xs = (x / d.powf(0.25))?;
                let half_norm = (xs.sqr()?.sum_keepdim(D::Minus1)? * 0.5)?;
                let proj = xs.broadcast_matmul(&w.t()?)?;
                (proj.broadcast_sub(&half_norm)?.exp()? / m.sqrt())?
            }
        })
    }

    /// The causal attention weights φ(q_i)·φ(k_j), j ≤ i, of a chunk of l
    /// tokens: q (b, h, l, d'), k (b, h_kv, l, d') -> (b, h_kv, g·l, l).
    /// For the Taylor map they come from the kernel itself, 1 + s + s²/2
    /// with s = q·k/√d', a d'-wide matmul instead of an F = 1 + d' + d'²-wide
    /// one (the same numbers), and on a CPU one fused pass for the rest.
    fn causal_weights(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let h_kv = k.dim(1)?;
        let (_, h, l, _) = q.dims4()?;
        let mask = || causal_rows(h / h_kv, l, q.dtype(), q.device());
        match self.feature_map {
            FeatureMap::Taylor => {
                let d = q.dim(D::Minus1)? as f64;
                let s = (fold_heads(q, h_kv)? / d.sqrt())?.matmul(&k.t()?)?;
                if crate::kernels::usable_cpu(&s) {
                    return Ok(crate::kernels::taylor_causal(&s)?);
                }
                Ok(((&s + 1.0)? + (s.sqr()? * 0.5)?)?.broadcast_mul(&mask()?)?)
            }
            _ => Ok(fold_heads(&self.phi(q)?, h_kv)?
                .matmul(&self.phi(k)?.t()?)?
                .broadcast_mul(&mask()?)?),
        }
    }

    /// The chunk length `forward` uses on t tokens with q, k of width d' and
    /// v of width d_v. Carrying a state costs O(F·(d_v + 1)) a token (φ(q)S
    /// and φ(k)ᵀ[V, 1]) against O(l·(d' + d_v + 1)) for the chunk's own
    /// weights, so with F large (the Taylor map's 1 + d' + d'²) a
    /// sequence no longer than 2F(d_v + 1)/(d' + d_v + 1) tokens is cheapest
    /// as one chunk: the quadratic form, no φ at all. A sequence that must
    /// leave its state behind (prefill) keeps the configured chunk.
    pub fn chunk_len(&self, t: usize, d_k: usize, d_v: usize, keep_state: bool) -> usize {
        let chunk = self.chunk.max(1);
        let f = self.feature_size(d_k);
        let break_even = 2 * f * (d_v + 1) / (d_k + d_v + 1);
        if !keep_state && t <= break_even {
            t.max(1)
        } else {
            chunk
        }
    }

    /// Whole sequence (training, prefill). q: (b, h, t, d'), k: (b, h_kv, t,
    /// d'), v: (b, h_kv, t, d_v); key_padding: (b, t), 1 = token. With
    /// `state` (causal only), the sequence continues it and leaves it
    /// updated. -> (b, h, t, d_v)
    ///
    /// Chunked: per chunk of l tokens, with S the state before it,
    ///   o = (W ⊙ M) [V, 1] + φ(Q) S,   S ← S + φ(K)ᵀ [V, 1]
    /// where W = φ(Q)φ(K)ᵀ (see `weights`) and M the causal mask inside the
    /// chunk; then y = o[..d] / (o[d] + ε). Bidirectional: one global S.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
        key_padding: Option<&Tensor>,
        state: Option<&mut RecurrentState>,
    ) -> Result<Tensor> {
        let (_, h, t, _) = q.dims4()?;
        let h_kv = k.dim(1)?;
        // [V, 1] with padded rows zeroed (mask (b, 1, t, 1)): padded keys
        // add nothing to S or z
        let mask = key_mask(key_padding, q.dtype())?;
        let v1 = match &mask {
            Some(m) => with_ones(v)?.broadcast_mul(m)?,
            None => with_ones(v)?,
        };
        if !causal {
            if state.is_some() {
                return Err(Error::msg(
                    "bidirectional linear attention has no decode state",
                ));
            }
            let s = self.phi(k)?.t()?.matmul(&v1)?; // (b, h_kv, F, d + 1)
            let o = unfold_heads(&fold_heads(&self.phi(q)?, h_kv)?.matmul(&s)?, h)?;
            return normalize(&o);
        }
        let keep_state = state.is_some();
        let mut s = state.as_ref().and_then(|st| st.s.clone());
        let chunk = self.chunk_len(t, q.dim(3)?, v.dim(3)?, keep_state);
        let mut outs = Vec::with_capacity(t.div_ceil(chunk));
        for start in (0..t).step_by(chunk) {
            let l = chunk.min(t - start);
            let qc = q.narrow(2, start, l)?; // (b, h, l, d')
            let kc = k.narrow(2, start, l)?; // (b, h_kv, l, d')
            let vc = v1.narrow(2, start, l)?; // (b, h_kv, l, d + 1)
            let w = self.causal_weights(&qc, &kc)?;
            let mut o = w.matmul(&vc)?; // (b, h_kv, g·l, d + 1)
            if let Some(s) = &s {
                o = (o + fold_heads(&self.phi(&qc)?, h_kv)?.matmul(s)?)?;
            }
            // the state after the last chunk is needed only to keep it
            if start + l < t || keep_state {
                let ds = self.phi(&kc)?.t()?.matmul(&vc)?; // (b, h_kv, F, d + 1)
                s = Some(match s {
                    Some(s) => (s + ds)?,
                    None => ds,
                });
            }
            outs.push(unfold_heads(&o, h)?);
        }
        if let Some(st) = state {
            st.s = s.map(|s| s.detach()); // a decode state keeps no autograd graph
        }
        normalize(&Tensor::cat(&outs, 2)?)
    }

    /// One token: q (b, h, 1, d'), k (b, h_kv, 1, d'), v (b, h_kv, 1, d_v)
    /// -> (b, h, 1, d_v); S += φ(k)[v, 1]ᵀ, then y = φ(q)ᵀS normalised.
    pub fn step(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        state: &mut RecurrentState,
    ) -> Result<Tensor> {
        normalized_step(&self.phi(q)?, &self.phi(k)?, v, state)
    }
}

/// v (b, h_kv, t, d) -> [v, 1] (b, h_kv, t, d + 1)
fn with_ones(v: &Tensor) -> Result<Tensor> {
    let (b, h_kv, t, _) = v.dims4()?;
    let ones = Tensor::ones((b, h_kv, t, 1), v.dtype(), v.device())?;
    Ok(Tensor::cat(&[v, &ones], 3)?)
}

/// o = [φ(q)ᵀS, φ(q)ᵀz] (…, d + 1) -> φ(q)ᵀS / (φ(q)ᵀz + ε) (…, d)
fn normalize(o: &Tensor) -> Result<Tensor> {
    let d = o.dim(D::Minus1)? - 1;
    let num = o.narrow(D::Minus1, 0, d)?;
    let den = (o.narrow(D::Minus1, d, 1)? + EPS)?;
    Ok(num.broadcast_div(&den)?)
}

/// One token of normalised linear attention over mapped features:
/// fq (b, h, 1, F), fk (b, h_kv, 1, F), v (b, h_kv, 1, d) -> (b, h, 1, d).
pub(crate) fn normalized_step(
    fq: &Tensor,
    fk: &Tensor,
    v: &Tensor,
    state: &mut RecurrentState,
) -> Result<Tensor> {
    let (_, h, _, _) = fq.dims4()?;
    let h_kv = fk.dim(1)?;
    let ds = fk.t()?.matmul(&with_ones(v)?)?; // (b, h_kv, F, d + 1)
    let s = match state.s.take() {
        Some(s) => (s + ds)?,
        None => ds,
    };
    let o = unfold_heads(&fold_heads(fq, h_kv)?.matmul(&s)?, h)?;
    state.s = Some(s.detach()); // else each step's S would keep all earlier ones alive
    normalize(&o)
}

/// φ of one vector, in f64 loops (the reference for tests). `projection`:
/// the performer's W as rows.
pub fn phi_naive(map: FeatureMap, x: &[f64], projection: Option<&[Vec<f64>]>) -> Vec<f64> {
    let d = x.len() as f64;
    match map {
        FeatureMap::Elu => x
            .iter()
            .map(|&a| if a > 0.0 { a + 1.0 } else { a.exp() })
            .collect(),
        FeatureMap::Relu => x.iter().map(|&a| a.max(0.0)).collect(),
        FeatureMap::Taylor => {
            let mut f = vec![1.0];
            f.extend(x.iter().map(|a| a / d.powf(0.25)));
            for a in x {
                for b in x {
                    f.push(a * b / (2f64.sqrt() * d.sqrt()));
                }
            }
            f
        }
        FeatureMap::Performer => {
            let w = projection.expect("performer needs its projection");
            let xs: Vec<f64> = x.iter().map(|a| a / d.powf(0.25)).collect();
            let half_norm = xs.iter().map(|a| a * a).sum::<f64>() / 2.0;
            let m = w.len() as f64;
            w.iter()
                .map(|row| {
                    let dot: f64 = row.iter().zip(&xs).map(|(a, b)| a * b).sum();
                    (dot - half_norm).exp() / m.sqrt()
                })
                .collect()
        }
    }
}

/// The quadratic textbook form: y_i = Σ_j w_ij v_j / (Σ_j w_ij + ε) with
/// w_ij = φ(q_i)·φ(k_j) over keys j ≤ i (causal) or all j, where
/// `key_ok(b, j)`. q: [b][h][t][d'], k: [b][h_kv][t][d'], v: [b][h_kv][t][d].
#[allow(clippy::needless_range_loop)] // indices mirror the formula
pub fn naive(
    q: &Heads,
    k: &Heads,
    v: &Heads,
    phi: &dyn Fn(&[f64]) -> Vec<f64>,
    causal: bool,
    key_ok: &dyn Fn(usize, usize) -> bool,
) -> Heads {
    let (h, h_kv) = (q[0].len(), k[0].len());
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut out = vec![];
    for bi in 0..q.len() {
        let mut heads = vec![];
        for hi in 0..h {
            let kv = hi / (h / h_kv);
            let fk: Vec<Vec<f64>> = k[bi][kv].iter().map(|x| phi(x)).collect();
            let mut rows = vec![];
            for (i, qi) in q[bi][hi].iter().enumerate() {
                let fq = phi(qi);
                let d = v[bi][kv][0].len();
                let (mut num, mut den) = (vec![0.0; d], 0.0);
                for (j, fkj) in fk.iter().enumerate() {
                    if (causal && j > i) || !key_ok(bi, j) {
                        continue;
                    }
                    let w = dot(&fq, fkj);
                    den += w;
                    for (n, x) in num.iter_mut().zip(&v[bi][kv][j]) {
                        *n += w * x;
                    }
                }
                rows.push(num.iter().map(|n| n / (den + EPS)).collect());
            }
            heads.push(rows);
        }
        out.push(heads);
    }
    out
}

/// A seed from a name (FNV-1a), so a layer's fixed random features are the
/// same every time the model is built.
pub fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// FAVOR+ orthogonal random features: m rows of width d, drawn in blocks of
/// d mutually orthogonal directions (Gram–Schmidt on Gaussian vectors), each
/// row scaled to the norm of an independent Gaussian vector so that every
/// row is marginally N(0, I_d).
pub fn performer_projection(m: usize, d: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut rows: Vec<Vec<f64>> = vec![];
    while rows.len() < m {
        let mut block: Vec<Vec<f64>> = vec![];
        while block.len() < d {
            let mut u: Vec<f64> = (0..d).map(|_| crate::nn::normal(&mut rng)).collect();
            for b in &block {
                let p: f64 = u.iter().zip(b).map(|(x, y)| x * y).sum();
                for (x, y) in u.iter_mut().zip(b) {
                    *x -= p * y;
                }
            }
            let n = u.iter().map(|x| x * x).sum::<f64>().sqrt();
            if n > 1e-8 {
                block.push(u.into_iter().map(|x| x / n).collect());
            }
        }
        for b in block.into_iter().take(m - rows.len()) {
            let chi = (0..d)
                .map(|_| crate::nn::normal(&mut rng).powi(2))
                .sum::<f64>()
                .sqrt();
            rows.push(b.into_iter().map(|x| x * chi).collect());
        }
    }
    rows
}
