//! The fused trainer: the loss and every gradient of a standard pre-norm
//! decoder, written by hand on plain f32 buffers (the approach of
//! Karpathy's llm.c), with candle's autograd left out of the step.
//!
//! At the sizes attend trains (d_model 64–256, a few hundred tokens a
//! shard) a step through the graph executor is dominated by per-op cost:
//! a fresh tensor per op, its zeroing and page faults, gradient sums
//! allocated in the backward, GELU through libm's scalar `erf`. Here one
//! workspace per shard is allocated once and reused every step; the
//! matrix products go straight to gemm's AVX-512 kernels reading weights
//! and activations in place through strides; norms, softmax, GELU and the
//! loss are one vectorisable pass each, forward and backward.
//!
//! What qualifies (`Fused::new` says why not otherwise, and the trainer
//! falls back to autograd): a decoder-only model, softmax attention
//! (multi-head or grouped-query, full or in a sliding window) or one of the
//! recurrent mixers of `mix` (decay, GLA, DeltaNet, Gated DeltaNet, Mamba2)
//! in every layer, pre-norm LayerNorm or
//! RMSNorm, a ReLU, GELU, SwiGLU or GeGLU FFN, learned, sinusoidal or no
//! additive positions, biases or not, tied or untied output, no dropout.
//! The gradients equal autograd's (tests/fused.rs).
//!
//! Layout: a shard of b sequences of t tokens is n = b·t rows; every
//! activation is row-major (n, width); heads are column blocks of q, k, v.

use crate::config::{
    FfnKind, MechanismConfig, ModelConfig, NormKind, NormPosition, PositionKind, Shape,
};
use crate::error::{Error, Result};
use crate::kernels::dense::{erfc_pos, exp, exp_shifted, softmax_row};
use crate::kernels::rope::RopeTables;
use crate::model::Transformer;
use crate::nn::{with_f32, ParamStore};

mod mix;

/// y (m, n) = α·y + a (m, k) · b (k, n), each operand given by its pointer
/// and (row stride, column stride); `acc` false ignores y's contents.
#[allow(clippy::too_many_arguments)]
#[inline]
fn mm(
    (m, n, k): (usize, usize, usize),
    y: &mut [f32],
    (y_rs, y_cs): (usize, usize),
    acc: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    // bounds: the last element each operand reaches
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, y_rs, y_cs) < y.len());
    if k > 0 {
        assert!(last(m, k, a_rs, a_cs) < a.len() && last(k, n, b_rs, b_cs) < b.len());
    }
    // Safety: every element read or written is inside its slice (asserted).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            y_cs as isize,
            y_rs as isize,
            acc,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// x (n, i) · wᵀ -> y (n, o), w (o, i) row-major as linear weights are
/// stored; `b` adds a bias row.
fn linear(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (n, i, o): (usize, usize, usize),
    y: &mut [f32],
) {
    let y = &mut y[..n * o];
    let acc = match b {
        Some(b) => {
            y.chunks_exact_mut(o).for_each(|r| r.copy_from_slice(b));
            true
        }
        None => false,
    };
    mm((n, o, i), y, (o, 1), acc, x, (i, 1), w, (1, i), 1.0);
}

/// The backward of `linear`: dw (o, i) += dyᵀ x, db += Σ rows of dy, and
/// dx (n, i) = dy w (added to dx when `acc`).
#[allow(clippy::too_many_arguments)]
fn linear_bwd(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    (n, i, o): (usize, usize, usize),
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dx: Option<&mut [f32]>,
    acc: bool,
) {
    mm((o, i, n), dw, (i, 1), true, dy, (1, o), x, (i, 1), 1.0);
    if let Some(db) = db {
        for r in dy[..n * o].chunks_exact(o) {
            db.iter_mut().zip(r).for_each(|(d, v)| *d += v);
        }
    }
    if let Some(dx) = dx {
        mm(
            (n, i, o),
            &mut dx[..n * i],
            (i, 1),
            acc,
            dy,
            (o, 1),
            w,
            (i, 1),
            1.0,
        );
    }
}

/// Σ f over a row in 16 lanes (vectorises).
#[inline(always)]
fn lanes(x: &[f32], f: impl Fn(usize, f32) -> f32) -> f32 {
    let mut l = [0f32; 16];
    let full = x.len() / 16 * 16;
    for c in (0..full).step_by(16) {
        for j in 0..16 {
            l[j] += f(c + j, x[c + j]);
        }
    }
    let mut s: f32 = (full..x.len()).map(|j| f(j, x[j])).sum();
    s += l.iter().sum::<f32>();
    s
}

/// The norm of the model's blocks.
#[derive(Clone, Copy, Debug)]
struct NormSpec {
    center: bool,
    eps: f32,
}

impl NormSpec {
    /// y = γ x̂ + β per row of x (n, d), x̂ = (x − μ) r (μ = 0 for RMSNorm);
    /// keeps μ and r per row for the backward.
    fn fwd(
        &self,
        x: &[f32],
        g: &[f32],
        b: Option<&[f32]>,
        y: &mut [f32],
        mu: &mut [f32],
        r: &mut [f32],
    ) {
        let d = g.len();
        for (((xr, yr), m), rs) in x
            .chunks_exact(d)
            .zip(y.chunks_exact_mut(d))
            .zip(mu.iter_mut())
            .zip(r.iter_mut())
        {
            let mean = if self.center {
                lanes(xr, |_, v| v) / d as f32
            } else {
                0.0
            };
            let var = lanes(xr, |_, v| (v - mean) * (v - mean)) / d as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            (*m, *rs) = (mean, inv);
            match b {
                Some(b) => {
                    for j in 0..d {
                        yr[j] = (xr[j] - mean) * inv * g[j] + b[j];
                    }
                }
                None => {
                    for j in 0..d {
                        yr[j] = (xr[j] - mean) * inv * g[j];
                    }
                }
            }
        }
    }

    /// dx += r (γ dy − mean(γ dy) − x̂ mean(γ dy ⊙ x̂)) (no mean term for
    /// RMSNorm); dγ += Σ dy ⊙ x̂, dβ += Σ dy.
    #[allow(clippy::too_many_arguments)]
    fn bwd(
        &self,
        x: &[f32],
        g: &[f32],
        mu: &[f32],
        r: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dg: &mut [f32],
        mut db: Option<&mut [f32]>,
    ) {
        let d = g.len();
        for ((((xr, dyr), dxr), &m), &inv) in x
            .chunks_exact(d)
            .zip(dy.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
            .zip(mu)
            .zip(r)
        {
            let xh = |j: usize| (xr[j] - m) * inv;
            let m1 = if self.center {
                lanes(dyr, |j, v| v * g[j]) / d as f32
            } else {
                0.0
            };
            let m2 = lanes(dyr, |j, v| v * g[j] * xh(j)) / d as f32;
            for j in 0..d {
                let h = xh(j);
                dg[j] += dyr[j] * h;
                dxr[j] += inv * (dyr[j] * g[j] - m1 - h * m2);
            }
            if let Some(db) = db.as_deref_mut() {
                db.iter_mut().zip(dyr).for_each(|(a, v)| *a += v);
            }
        }
    }
}

/// The FFN's activation.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Act {
    Relu,
    /// x Φ(x), exact (erf)
    Gelu,
    /// GELU's tanh approximation (GeGLU)
    GeluTanh,
    Silu,
}

/// (f(u), f'(u)) of each activation, as free functions so that the loops
/// below are monomorphic and vectorise (a `match` per element keeps them
/// scalar; the derivative is dead code where only f is used).
#[inline(always)]
fn relu(u: f32) -> (f32, f32) {
    if u > 0.0 {
        (u, 1.0)
    } else {
        (0.0, 0.0)
    }
}

#[inline(always)]
fn gelu(u: f32) -> (f32, f32) {
    // Φ(u) = ½(1 + erf(u/√2)), φ(u) = e^{−u²/2}/√(2π)
    let z = u.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let (q, e) = erfc_pos(z);
    let cdf = if u >= 0.0 { 1.0 - 0.5 * q } else { 0.5 * q };
    (u * cdf, cdf + u * e * 0.398_942_3)
}

#[inline(always)]
fn gelu_tanh(u: f32) -> (f32, f32) {
    const C: f32 = 0.797_884_6;
    let w = C * (u + 0.044_715 * u * u * u);
    let th = 1.0 - 2.0 / (exp(2.0 * w) + 1.0);
    let dw = C * (1.0 + 3.0 * 0.044_715 * u * u);
    (
        0.5 * u * (1.0 + th),
        0.5 * (1.0 + th) + 0.5 * u * (1.0 - th * th) * dw,
    )
}

#[inline(always)]
fn silu(u: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + exp(-u));
    (u * s, s * (1.0 + u * (1.0 - s)))
}

/// `$body` with `$f` bound to the activation function of `$act`.
macro_rules! per_act {
    ($act:expr, $f:ident => $body:expr) => {
        match $act {
            Act::Relu => {
                let $f = relu;
                $body
            }
            Act::Gelu => {
                let $f = gelu;
                $body
            }
            Act::GeluTanh => {
                let $f = gelu_tanh;
                $body
            }
            Act::Silu => {
                let $f = silu;
                $body
            }
        }
    };
}

/// Where each parameter's numbers live: its index in the store's
/// parameter list (`ParamStore::vars` order, the optimizer's).
#[derive(Clone, Debug)]
struct Layer {
    ln1: (usize, Option<usize>),
    q: (usize, Option<usize>),
    k: (usize, Option<usize>),
    v: (usize, Option<usize>),
    o: (usize, Option<usize>),
    ln2: (usize, Option<usize>),
    w1: (usize, Option<usize>),
    w3: Option<(usize, Option<usize>)>,
    w2: (usize, Option<usize>),
    /// A mixture of experts' router (E, d); w1, w3 and w2 then hold every
    /// expert's matrix stacked: (E, f, d), (E, f, d), (E, d, f).
    router: Option<usize>,
}

/// A layer's token mixer: softmax attention (in a sliding window or not)
/// or one of the recurrent mixers (`mix`).
#[derive(Clone, Debug)]
enum Mixer {
    Attention(Option<usize>),
    /// BASED's Taylor linear attention (`attention::linear`, feature map
    /// `taylor`) with q and k of width `dq` per head, after a short
    /// convolution (the conv's weight, bias and kernel) in a BASED layer:
    /// causal attention whose weights are f(s) = 1 + s + s²/2 (s = q·k/√dq)
    /// normalised by Σ f + ε — the quadratic form of the linear recurrence,
    /// exact at any length.
    Taylor {
        dq: usize,
        conv: Option<((usize, usize), usize)>,
    },
    Recurrent(Box<mix::Rec>),
}

impl Mixer {
    /// Width of q and k per head.
    fn qk_dim(&self, hd: usize) -> usize {
        match self {
            Mixer::Taylor { dq, .. } => *dq,
            _ => hd,
        }
    }
}

/// A dropless mixture of experts in every block (`ffn::moe`).
#[derive(Clone, Copy, Debug)]
struct MoeSpec {
    experts: usize,
    top_k: usize,
    aux_weight: f32,
    z_weight: f32,
}

/// A model the fused trainer can run: its dimensions and where its
/// parameters are.
#[derive(Clone, Debug)]
pub struct Fused {
    d: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    d_ff: usize,
    vocab: usize,
    max_len: usize,
    norm: NormSpec,
    act: Act,
    gated: bool,
    embed_scale: f32,
    embed: usize,
    /// learned positions (a parameter)
    pos: Option<usize>,
    /// fixed positions (sinusoidal), (max_len, d)
    pos_fixed: Option<Vec<f32>>,
    /// RoPE on queries and keys
    rope: Option<std::sync::Arc<RopeTables>>,
    /// each layer's mixer
    mixers: Vec<Mixer>,
    layers: Vec<Layer>,
    ln_f: (usize, Option<usize>),
    /// untied output projection
    lm_head: Option<usize>,
    /// elements of each parameter, in store order
    sizes: Vec<usize>,
    moe: Option<MoeSpec>,
}

/// Finds a parameter by name and shape: its index in the store's list.
type Find<'a> = dyn FnMut(String, &[usize]) -> std::result::Result<usize, String> + 'a;

/// The numbers of every parameter (store order), copied once a step.
pub type Params = Vec<Vec<f32>>;

impl Fused {
    /// The plan for `model` (its parameters in `store`), or why the fused
    /// trainer cannot run it.
    pub fn new(model: &Transformer, store: &ParamStore) -> std::result::Result<Self, String> {
        let c: &ModelConfig = &model.cfg;
        if c.shape != Shape::Decoder {
            return Err("not a decoder-only model".into());
        }
        let n = c.n_decoder_layers;
        if c.norm_position != NormPosition::Pre {
            return Err("not a pre-norm model".into());
        }
        if c.dropout > 0.0 {
            return Err("dropout".into());
        }
        let moe = match &c.moe {
            None => None,
            Some(m) if m.capacity_factor.is_some() => {
                return Err("a mixture of experts with a capacity (token dropping)".into())
            }
            Some(m) => Some(MoeSpec {
                experts: m.experts,
                top_k: m.top_k,
                aux_weight: m.aux_weight as f32,
                z_weight: m.z_weight as f32,
            }),
        };
        if !c.matformer.is_empty() || !c.layer_d_ff.is_empty() {
            return Err("nested or per-layer FFN widths".into());
        }
        if c.ffn_weights != crate::config::FfnWeights::Dense {
            return Err("low-rank or block-diagonal FFN weights".into());
        }
        if c.qk_norm || c.embed_norm {
            return Err("query/key or embedding norms".into());
        }
        if c.position == PositionKind::Alibi {
            return Err("ALiBi positions".into());
        }
        if c.position == PositionKind::Rope && c.rope_theta_window.is_some() {
            return Err("RoPE of another base in window layers".into());
        }
        if c.head_dim() % 2 == 1 && c.position == PositionKind::Rope {
            return Err("RoPE on odd head widths".into());
        }
        if model.prune.active() {
            return Err("pruned sublayers".into());
        }
        let vars = store.vars();
        let sizes = vars.iter().map(|(_, v)| v.elem_count()).collect();
        let mut used = vec![false; vars.len()];
        let mut find = |name: String, shape: &[usize]| -> std::result::Result<usize, String> {
            let i = vars
                .iter()
                .position(|(n, _)| *n == name)
                .ok_or(format!("no parameter `{name}`"))?;
            if vars[i].1.dims() != shape {
                return Err(format!("`{name}` has shape {:?}", vars[i].1.dims()));
            }
            used[i] = true;
            Ok(i)
        };
        let has = |name: &str| vars.iter().any(|(n, _)| n == name);
        let (d, h, hk, hd, f) = (c.d_model, c.n_heads, c.kv_heads(), c.head_dim(), c.d_ff);
        let norm =
            |find: &mut Find, p: &str| -> std::result::Result<(usize, Option<usize>), String> {
                let w = find(format!("{p}.weight"), &[d])?;
                let b = match c.norm {
                    NormKind::Layernorm => Some(find(format!("{p}.bias"), &[d])?),
                    NormKind::Rmsnorm => None,
                };
                Ok((w, b))
            };
        let lin = |find: &mut Find,
                   p: &str,
                   o: usize,
                   i: usize|
         -> std::result::Result<(usize, Option<usize>), String> {
            let w = find(format!("{p}.weight"), &[o, i])?;
            let b = if has(&format!("{p}.bias")) {
                Some(find(format!("{p}.bias"), &[o])?)
            } else {
                None
            };
            Ok((w, b))
        };
        let gated = matches!(c.ffn, FfnKind::Swiglu | FfnKind::Geglu);
        // the FFN's matrices, stacked over experts in a mixture
        let ffn = |find: &mut Find,
                   p: &str,
                   o: usize,
                   i: usize|
         -> std::result::Result<(usize, Option<usize>), String> {
            match moe {
                None => lin(find, p, o, i),
                Some(m) => {
                    let e = m.experts;
                    let w = find(format!("{p}.weight"), &[e, o, i])?;
                    let b = if has(&format!("{p}.bias")) {
                        Some(find(format!("{p}.bias"), &[e * o])?)
                    } else {
                        None
                    };
                    Ok((w, b))
                }
            }
        };
        let mut layers = vec![];
        let mut mixers = vec![];
        for i in 0..n {
            let p = format!("decoder.{i}");
            let mech = c.layer_mechanism(false, i);
            let taylor = |dq: usize| {
                if c.position == PositionKind::Rope {
                    return Err(format!("layer {i}: RoPE on Taylor linear attention"));
                }
                Ok(dq)
            };
            mixers.push(match mech {
                MechanismConfig::Softmax => Mixer::Attention(None),
                MechanismConfig::Window(w) => Mixer::Attention(Some(w.window)),
                MechanismConfig::Linear(l)
                    if l.feature_map == crate::config::FeatureMap::Taylor =>
                {
                    Mixer::Taylor {
                        dq: taylor(l.feature_dim)?,
                        conv: None,
                    }
                }
                MechanismConfig::Based(bc) if bc.window == 0 => Mixer::Taylor {
                    dq: taylor(bc.feature_dim)?,
                    conv: Some((
                        (
                            find(format!("{p}.self_attn.conv.weight"), &[d, bc.conv])?,
                            find(format!("{p}.self_attn.conv.bias"), &[d])?,
                        ),
                        bc.conv,
                    )),
                },
                m => match mix::Rec::plan(
                    m,
                    &format!("{p}.self_attn"),
                    &mut find,
                    &has,
                    (d, h, hk, hd),
                )? {
                    Some(r) => Mixer::Recurrent(Box::new(r)),
                    None => {
                        return Err(format!(
                            "layer {i}'s mechanism `{}` is not one it computes (softmax, \
                             window, Taylor linear attention, BASED without a window \
                             branch, decay, GLA, DeltaNet, Gated DeltaNet, Mamba2)",
                            m.name()
                        ))
                    }
                },
            });
            let qk = mixers[i].qk_dim(hd);
            layers.push(Layer {
                ln1: norm(&mut find, &format!("{p}.ln_1"))?,
                q: lin(&mut find, &format!("{p}.self_attn.q_proj"), h * qk, d)?,
                k: lin(&mut find, &format!("{p}.self_attn.k_proj"), hk * qk, d)?,
                v: lin(&mut find, &format!("{p}.self_attn.v_proj"), hk * hd, d)?,
                o: lin(&mut find, &format!("{p}.self_attn.o_proj"), d, h * hd)?,
                ln2: norm(&mut find, &format!("{p}.ln_2"))?,
                w1: ffn(&mut find, &format!("{p}.ffn.w1"), f, d)?,
                w3: if gated {
                    Some(ffn(&mut find, &format!("{p}.ffn.w3"), f, d)?)
                } else {
                    None
                },
                w2: ffn(&mut find, &format!("{p}.ffn.w2"), d, f)?,
                router: match moe {
                    Some(m) => Some(find(format!("{p}.ffn.router.weight"), &[m.experts, d])?),
                    None => None,
                },
            });
        }
        let embed = find("embed.weight".into(), &[c.vocab_size, d])?;
        let pos = match c.position {
            PositionKind::Learned => Some(find("pos_dec.weight".into(), &[c.max_len, d])?),
            _ => None,
        };
        let pos_fixed = match (c.position, model.pos_dec()) {
            (PositionKind::Sinusoidal, crate::position::Additive::Table(t)) => Some(
                t.to_dtype(candle_core::DType::F32)
                    .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                    .map_err(|e| e.to_string())?,
            ),
            _ => None,
        };
        let rope = (c.position == PositionKind::Rope).then(|| {
            let factors = c.rope_scaling.as_ref().map(|r| r.factors(hd, c.rope_theta));
            RopeTables::new(
                hd,
                c.max_len,
                c.rope_theta,
                factors.as_deref(),
                c.rope_interleaved,
            )
        });
        let ln_f = norm(&mut find, "dec_norm")?;
        let lm_head = if c.tie_embeddings {
            None
        } else {
            Some(find("lm_head.weight".into(), &[c.vocab_size, d])?)
        };
        if let Some(i) = used.iter().position(|u| !u) {
            return Err(format!("parameter `{}` is not one it computes", vars[i].0));
        }
        Ok(Self {
            d,
            heads: h,
            kv_heads: hk,
            hd,
            d_ff: f,
            vocab: c.vocab_size,
            max_len: c.max_len,
            norm: NormSpec {
                center: c.norm == NormKind::Layernorm,
                eps: c.norm_eps as f32,
            },
            act: match c.ffn {
                FfnKind::Relu => Act::Relu,
                FfnKind::Gelu => Act::Gelu,
                FfnKind::Geglu => Act::GeluTanh,
                FfnKind::Swiglu => Act::Silu,
            },
            gated,
            embed_scale: if c.scale_embeddings {
                (d as f32).sqrt()
            } else {
                1.0
            },
            embed,
            pos,
            pos_fixed,
            rope: rope.map(std::sync::Arc::new),
            mixers,
            layers,
            ln_f,
            lm_head,
            sizes,
            moe,
        })
    }

    /// Every parameter's numbers now (store order).
    pub fn params(&self, store: &ParamStore) -> Result<Params> {
        store
            .vars()
            .iter()
            .map(|(_, v)| with_f32(v.as_tensor(), |s| s.to_vec()))
            .collect()
    }

    /// Zeroed gradients, one per parameter (store order).
    pub fn zero_grads(&self) -> Params {
        self.sizes.iter().map(|&n| vec![0f32; n]).collect()
    }

    /// The loss of one shard — Σ over positions of weight · (per-position
    /// cross-entropy with label smoothing `eps`) / `total_w` — and its
    /// gradients added into `grads`. ids, target, weight: (b, t) row-major.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads(
        &self,
        p: &Params,
        ws: &mut Workspace,
        (b, t): (usize, usize),
        ids: &[u32],
        target: &[u32],
        weight: &[f32],
        smoothing: f32,
        total_w: f32,
        grads: &mut Params,
    ) -> Result<f64> {
        let n = b * t;
        if t > self.max_len {
            return Err(Error::msg(format!(
                "sequence of {t} tokens exceeds the model's max_len {}",
                self.max_len
            )));
        }
        if let Some(&bad) = ids
            .iter()
            .chain(target)
            .find(|&&i| i as usize >= self.vocab)
        {
            return Err(Error::msg(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.vocab
            )));
        }
        ws.fit(self, b, t);
        let (d, f, v) = (self.d, self.d_ff, self.vocab);
        // a mixture's auxiliary losses, weighted by this shard's share
        let share = weight.iter().map(|&x| x as f64).sum::<f64>() / total_w as f64;
        let mut aux = 0f64;
        let (qw, kw) = (self.heads * self.hd, self.kv_heads * self.hd);
        let nl = self.layers.len();
        let w = |s: usize| p[s].as_slice();
        let wo = |s: Option<usize>| s.map(|s| p[s].as_slice());

        // ---- forward ----
        // x = s · E[ids] + P[pos]
        {
            let x = &mut ws.x[0][..n * d];
            let e = w(self.embed);
            let table = self.pos.map(&w).or(self.pos_fixed.as_deref());
            for (r, (xr, &id)) in x.chunks_exact_mut(d).zip(ids).enumerate() {
                let er = &e[id as usize * d..][..d];
                match table {
                    Some(pt) => {
                        let pr = &pt[(r % t) * d..][..d];
                        for j in 0..d {
                            xr[j] = er[j] * self.embed_scale + pr[j];
                        }
                    }
                    None => xr
                        .iter_mut()
                        .zip(er)
                        .for_each(|(a, &b)| *a = b * self.embed_scale),
                }
            }
        }
        for (l, ly) in self.layers.iter().enumerate() {
            let a = &mut ws.layer[l];
            // attention sublayer
            let (x_in, x_rest) = ws.x.split_at_mut(l + 1);
            let x_in = &x_in[l][..n * d];
            self.norm.fwd(
                x_in,
                w(ly.ln1.0),
                wo(ly.ln1.1),
                &mut a.a,
                &mut a.mu1,
                &mut a.r1,
            );
            match &self.mixers[l] {
                Mixer::Attention(window) => {
                    linear(&a.a, w(ly.q.0), wo(ly.q.1), (n, d, qw), &mut a.q);
                    linear(&a.a, w(ly.k.0), wo(ly.k.1), (n, d, kw), &mut a.k);
                    linear(&a.a, w(ly.v.0), wo(ly.v.1), (n, d, kw), &mut a.v);
                    if let Some(rope) = &self.rope {
                        rotate_rows(rope, &mut a.q[..n * qw], qw, self.hd, t, false);
                        rotate_rows(rope, &mut a.k[..n * kw], kw, self.hd, t, false);
                    }
                    self.attention_fwd(a, b, t, *window);
                }
                Mixer::Taylor { dq, conv } => {
                    let inp: &[f32] = match conv {
                        Some((cw, kernel)) => {
                            mix::conv_fwd(&a.a, w(cw.0), w(cw.1), *kernel, (b, t, d), &mut a.uc);
                            &a.uc
                        }
                        None => &a.a,
                    };
                    let (tq, tk) = (self.heads * dq, self.kv_heads * dq);
                    linear(inp, w(ly.q.0), wo(ly.q.1), (n, d, tq), &mut a.q);
                    linear(inp, w(ly.k.0), wo(ly.k.1), (n, d, tk), &mut a.k);
                    linear(inp, w(ly.v.0), wo(ly.v.1), (n, d, kw), &mut a.v);
                    self.taylor_fwd(a, b, t, *dq);
                }
                Mixer::Recurrent(rec) => rec.fwd(
                    self,
                    ly,
                    p,
                    &a.a,
                    (&mut a.q, &mut a.k, &mut a.v),
                    &mut a.o,
                    &mut a.rec,
                    (b, t),
                ),
            }
            let x_mid = &mut a.x_mid;
            linear(&a.o, w(ly.o.0), wo(ly.o.1), (n, qw, d), x_mid);
            x_mid.iter_mut().zip(x_in).for_each(|(y, x)| *y += x);
            // FFN sublayer
            self.norm.fwd(
                x_mid,
                w(ly.ln2.0),
                wo(ly.ln2.1),
                &mut a.c,
                &mut a.mu2,
                &mut a.r2,
            );
            let x_out = &mut x_rest[0][..n * d];
            if let (Some(m), Some(router)) = (self.moe, ly.router) {
                let (l_aux, l_z) = self.moe_fwd(m, ly, router, p, a, n, x_out);
                aux += (m.aux_weight as f64 * l_aux + m.z_weight as f64 * l_z) * share;
                continue;
            }
            linear(&a.c, w(ly.w1.0), wo(ly.w1.1), (n, d, f), &mut a.u);
            if let Some(w3) = ly.w3 {
                linear(&a.c, w(w3.0), wo(w3.1), (n, d, f), &mut a.u3);
            }
            self.activate(a);
            linear(&a.g, w(ly.w2.0), wo(ly.w2.1), (n, f, d), x_out);
            x_out.iter_mut().zip(&a.x_mid).for_each(|(y, x)| *y += x);
        }
        self.norm.fwd(
            &ws.x[nl][..n * d],
            w(self.ln_f.0),
            wo(self.ln_f.1),
            &mut ws.xf,
            &mut ws.muf,
            &mut ws.rf,
        );
        // the scored rows only (MQAR scores a few positions a sequence)
        ws.rows.clear();
        ws.rows.extend((0..n).filter(|&r| weight[r] != 0.0));
        let ns = ws.rows.len();
        if ns == 0 {
            return Err(Error::msg("batch has no scored positions"));
        }
        for (i, &r) in ws.rows.iter().enumerate() {
            ws.hs[i * d..(i + 1) * d].copy_from_slice(&ws.xf[r * d..(r + 1) * d]);
        }
        let head = w(self.lm_head.unwrap_or(self.embed));
        linear(&ws.hs[..ns * d], head, None, (ns, d, v), &mut ws.logits);
        // loss, and dlogits = w/W · (softmax − (1−ε) onehot − ε/V) in place
        let mut loss = 0f64;
        for (i, &r) in ws.rows.iter().enumerate() {
            let row = &mut ws.logits[i * v..(i + 1) * v];
            let mean_logit = lanes(row, |_, x| x) / v as f32;
            let tgt = target[r] as usize;
            let z_tgt = row[tgt];
            // row <- e^{x − max}, then the probabilities
            let (max, sum) = exp_shifted(row);
            let lse = max + sum.ln();
            let nll = lse - z_tgt;
            let uniform = lse - mean_logit; // −mean(log p)
            let wr = weight[r];
            loss += (wr * ((1.0 - smoothing) * nll + smoothing * uniform)) as f64;
            let (k, inv, off) = (wr / total_w, 1.0 / sum, smoothing / v as f32);
            row.iter_mut().for_each(|x| *x = (*x * inv - off) * k);
            row[tgt] -= (1.0 - smoothing) * k;
        }
        loss /= total_w as f64;

        // ---- backward ----
        let dl = &ws.logits[..ns * v];
        // d head += dlᵀ hs; d hs = dl head
        linear_bwd(
            &ws.hs[..ns * d],
            head,
            dl,
            (ns, d, v),
            &mut grads[self.lm_head.unwrap_or(self.embed)],
            None,
            Some(&mut ws.dhs),
            false,
        );
        ws.dxf[..n * d].fill(0.0);
        for (i, &r) in ws.rows.iter().enumerate() {
            ws.dxf[r * d..(r + 1) * d].copy_from_slice(&ws.dhs[i * d..(i + 1) * d]);
        }
        ws.dx[..n * d].fill(0.0);
        {
            let (gw, gb) = two(grads, self.ln_f.0, self.ln_f.1);
            self.norm.bwd(
                &ws.x[nl][..n * d],
                w(self.ln_f.0),
                &ws.muf,
                &ws.rf,
                &ws.dxf[..n * d],
                &mut ws.dx[..n * d],
                gw,
                gb,
            );
        }
        for (l, ly) in self.layers.iter().enumerate().rev() {
            let a = &mut ws.layer[l];
            let s = &mut ws.scratch;
            // FFN: dz = dx (the residual's gradient)
            if let (Some(m), Some(router)) = (self.moe, ly.router) {
                self.moe_bwd(m, ly, router, p, a, s, n, &ws.dx, grads, share);
            } else {
                let (gw, gb) = two(grads, ly.w2.0, ly.w2.1);
                linear_bwd(
                    &a.g,
                    w(ly.w2.0),
                    &ws.dx,
                    (n, f, d),
                    gw,
                    gb,
                    Some(&mut s.dg),
                    false,
                );
                self.activate_bwd(a, s);
                let (gw, gb) = two(grads, ly.w1.0, ly.w1.1);
                linear_bwd(
                    &a.c,
                    w(ly.w1.0),
                    &s.dg,
                    (n, d, f),
                    gw,
                    gb,
                    Some(&mut s.dc),
                    false,
                );
                if let Some(w3) = ly.w3 {
                    let (gw, gb) = two(grads, w3.0, w3.1);
                    linear_bwd(
                        &a.c,
                        w(w3.0),
                        &s.du3,
                        (n, d, f),
                        gw,
                        gb,
                        Some(&mut s.dc),
                        true,
                    );
                }
            }
            {
                let (gw, gb) = two(grads, ly.ln2.0, ly.ln2.1);
                self.norm.bwd(
                    &a.x_mid,
                    w(ly.ln2.0),
                    &a.mu2,
                    &a.r2,
                    &s.dc,
                    &mut ws.dx,
                    gw,
                    gb,
                );
            }
            // attention: dy = dx
            {
                let (gw, gb) = two(grads, ly.o.0, ly.o.1);
                linear_bwd(
                    &a.o,
                    w(ly.o.0),
                    &ws.dx,
                    (n, qw, d),
                    gw,
                    gb,
                    Some(&mut s.d_o),
                    false,
                );
            }
            match &self.mixers[l] {
                Mixer::Attention(window) => {
                    self.attention_bwd(a, s, b, t, *window);
                    if let Some(rope) = &self.rope {
                        rotate_rows(rope, &mut s.dq[..n * qw], qw, self.hd, t, true);
                        rotate_rows(rope, &mut s.dk[..n * kw], kw, self.hd, t, true);
                    }
                    let dys = [(&s.dq[..], qw), (&s.dk[..], kw), (&s.dv[..], kw)];
                    qkv_bwd(ly, p, &a.a, dys, (n, d), &mut s.da, false, grads);
                }
                Mixer::Taylor { dq, conv } => {
                    self.taylor_bwd(a, s, b, t, *dq);
                    let (tq, tk) = (self.heads * dq, self.kv_heads * dq);
                    let inp: &[f32] = if conv.is_some() { &a.uc } else { &a.a };
                    let din: &mut [f32] = if conv.is_some() {
                        &mut s.duc
                    } else {
                        &mut s.da
                    };
                    let dys = [(&s.dq[..], tq), (&s.dk[..], tk), (&s.dv[..], kw)];
                    qkv_bwd(ly, p, inp, dys, (n, d), din, false, grads);
                    if let Some((cw, kernel)) = conv {
                        s.da[..n * d].fill(0.0);
                        let (gw, gb) = two(grads, cw.0, Some(cw.1));
                        mix::conv_bwd(
                            &a.a,
                            w(cw.0),
                            &s.duc[..n * d],
                            *kernel,
                            (b, t, d),
                            gw,
                            gb.expect("conv bias"),
                            &mut s.da,
                        );
                    }
                }
                Mixer::Recurrent(rec) => rec.bwd(
                    self,
                    ly,
                    p,
                    &a.a,
                    (&a.q, &a.k, &a.v),
                    &a.o,
                    &a.rec,
                    &mut s.rec,
                    &s.d_o,
                    (&mut s.dq, &mut s.dk, &mut s.dv),
                    &mut s.da,
                    grads,
                    (b, t),
                ),
            }
            let x_in = &ws.x[l][..n * d];
            let (gw, gb) = two(grads, ly.ln1.0, ly.ln1.1);
            self.norm
                .bwd(x_in, w(ly.ln1.0), &a.mu1, &a.r1, &s.da, &mut ws.dx, gw, gb);
        }
        // embeddings: dE[id] += s · dx, dP[pos] += dx
        let dx = &ws.dx[..n * d];
        for (r, (dr, &id)) in dx.chunks_exact(d).zip(ids).enumerate() {
            let ge = &mut grads[self.embed][id as usize * d..][..d];
            ge.iter_mut()
                .zip(dr)
                .for_each(|(g, v)| *g += v * self.embed_scale);
            if let Some(pi) = self.pos {
                let gp = &mut grads[pi][(r % t) * d..][..d];
                gp.iter_mut().zip(dr).for_each(|(g, v)| *g += v);
            }
        }
        Ok(loss + aux)
    }

    /// g = act(u) (⊙ u3 when gated), over every row the buffers hold.
    fn activate(&self, a: &mut LayerActs) {
        if self.gated {
            per_act!(self.act, f => {
                for ((g, &u), &up) in a.g.iter_mut().zip(&a.u).zip(&a.u3) {
                    *g = f(u).0 * up;
                }
            })
        } else {
            per_act!(self.act, f => {
                for (g, &u) in a.g.iter_mut().zip(&a.u) {
                    *g = f(u).0;
                }
            })
        }
    }

    /// The backward of `activate`: dg (holding dL/dg) becomes dL/du, and
    /// du3 = dg ⊙ act(u) when gated.
    fn activate_bwd(&self, a: &LayerActs, s: &mut Scratch) {
        if self.gated {
            per_act!(self.act, f => {
                for (((dg, du3), &u), &up) in
                    s.dg.iter_mut().zip(s.du3.iter_mut()).zip(&a.u).zip(&a.u3)
                {
                    let (fu, dfu) = f(u);
                    *du3 = *dg * fu;
                    *dg *= up * dfu;
                }
            })
        } else {
            per_act!(self.act, f => {
                for (dg, &u) in s.dg.iter_mut().zip(&a.u) {
                    *dg *= f(u).1;
                }
            })
        }
    }

    /// A mixture of experts' forward (`ffn::moe`, dropless): router logits
    /// l = c W_rᵀ, each row's top k with the softmax of their logits as
    /// gates, the rows sorted by expert (a counting sort) and gathered, each
    /// expert's FFN as grouped GEMMs on its stacked matrices, and
    /// x_out = x_mid + Σ gate · y. -> (L_aux, L_z) unweighted.
    #[allow(clippy::too_many_arguments)]
    fn moe_fwd(
        &self,
        m: MoeSpec,
        ly: &Layer,
        router: usize,
        p: &Params,
        a: &mut LayerActs,
        n: usize,
        x_out: &mut [f32],
    ) -> (f64, f64) {
        let (d, f, e_n, k) = (self.d, self.d_ff, m.experts, m.top_k);
        let w = |s: usize| p[s].as_slice();
        linear(&a.c, w(router), None, (n, d, e_n), &mut a.probs);
        a.load.iter_mut().for_each(|x| *x = 0);
        let mut z = 0f64;
        let mut idx: Vec<usize> = Vec::with_capacity(e_n);
        for r in 0..n {
            let row = &mut a.probs[r * e_n..(r + 1) * e_n];
            idx.clear();
            idx.extend(0..e_n);
            // descending logit, ties to the lower index (a stable sort)
            idx.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
            let mx = row[idx[0]];
            let mut sum = 0f32;
            for j in 0..k {
                let g = (row[idx[j]] - mx).exp();
                a.gate[r * k + j] = g;
                a.top[r * k + j] = idx[j];
                a.load[idx[j]] += 1;
                sum += g;
            }
            a.gate[r * k..(r + 1) * k]
                .iter_mut()
                .for_each(|g| *g /= sum);
            // softmax over all experts, and log Σ e^l
            let all: f32 = row.iter().map(|&x| (x - mx).exp()).sum();
            a.lse[r] = mx + all.ln();
            row.iter_mut().for_each(|x| *x = (*x - mx).exp() / all);
            z += (a.lse[r] as f64).powi(2);
        }
        // rows sorted by expert: order[pos] = slot (row·k + j)
        a.offs[0] = 0;
        for e in 0..e_n {
            a.offs[e + 1] = a.offs[e] + a.load[e];
        }
        let mut next = a.offs[..e_n].to_vec();
        for slot in 0..n * k {
            let e = a.top[slot];
            a.order[next[e]] = slot;
            next[e] += 1;
        }
        for (pos, &slot) in a.order[..n * k].iter().enumerate() {
            let r = slot / k;
            a.cs[pos * d..(pos + 1) * d].copy_from_slice(&a.c[r * d..(r + 1) * d]);
        }
        let expert = |(wi, bi): (usize, Option<usize>), e: usize, o: usize, i: usize| {
            (
                &w(wi)[e * o * i..(e + 1) * o * i],
                bi.map(|b| &w(b)[e * o..(e + 1) * o]),
            )
        };
        for e in 0..e_n {
            let (o, me) = (a.offs[e], a.load[e]);
            if me == 0 {
                continue;
            }
            let (w1, b1) = expert(ly.w1, e, f, d);
            linear(
                &a.cs[o * d..(o + me) * d],
                w1,
                b1,
                (me, d, f),
                &mut a.u[o * f..],
            );
            if let Some(w3) = ly.w3 {
                let (w3, b3) = expert(w3, e, f, d);
                linear(
                    &a.cs[o * d..(o + me) * d],
                    w3,
                    b3,
                    (me, d, f),
                    &mut a.u3[o * f..],
                );
            }
        }
        self.activate(a);
        for e in 0..e_n {
            let (o, me) = (a.offs[e], a.load[e]);
            if me == 0 {
                continue;
            }
            let (w2, b2) = expert(ly.w2, e, d, f);
            linear(
                &a.g[o * f..(o + me) * f],
                w2,
                b2,
                (me, f, d),
                &mut a.y[o * d..],
            );
        }
        x_out.copy_from_slice(&a.x_mid[..n * d]);
        for (pos, &slot) in a.order[..n * k].iter().enumerate() {
            let (r, g) = (slot / k, a.gate[slot]);
            let (xr, yr) = (&mut x_out[r * d..(r + 1) * d], &a.y[pos * d..(pos + 1) * d]);
            xr.iter_mut().zip(yr).for_each(|(x, y)| *x += g * y);
        }
        // L_aux = E Σ f_e P_e, f_e = load / (n k), P_e = mean softmax
        let mut l_aux = 0f64;
        for e in 0..e_n {
            let pe: f64 = (0..n).map(|r| a.probs[r * e_n + e] as f64).sum::<f64>() / n as f64;
            l_aux += a.load[e] as f64 / (n * k) as f64 * pe;
        }
        (e_n as f64 * l_aux, z / n as f64)
    }

    /// The backward of `moe_fwd`: from dx (the gradient of x_out), every
    /// expert's and the router's gradients, and dc (set) for the norm.
    /// `share`: this shard's weight in the loss (the aux losses' scale).
    #[allow(clippy::too_many_arguments)]
    fn moe_bwd(
        &self,
        m: MoeSpec,
        ly: &Layer,
        router: usize,
        p: &Params,
        a: &LayerActs,
        s: &mut Scratch,
        n: usize,
        dx: &[f32],
        grads: &mut Params,
        share: f64,
    ) {
        let (d, f, e_n, k) = (self.d, self.d_ff, m.experts, m.top_k);
        let w = |s: usize| p[s].as_slice();
        // y's gradient (gate · dx) and each gate's (dx · y)
        for (pos, &slot) in a.order[..n * k].iter().enumerate() {
            let r = slot / k;
            let (dxr, yr) = (&dx[r * d..(r + 1) * d], &a.y[pos * d..(pos + 1) * d]);
            s.dgate[slot] = lanes(dxr, |j, v| v * yr[j]);
            let g = a.gate[slot];
            s.dy[pos * d..(pos + 1) * d]
                .iter_mut()
                .zip(dxr)
                .for_each(|(o, v)| *o = g * v);
        }
        for e in 0..e_n {
            let (o, me) = (a.offs[e], a.load[e]);
            if me == 0 {
                continue;
            }
            let (gw, gb) = two(grads, ly.w2.0, ly.w2.1);
            linear_bwd(
                &a.g[o * f..(o + me) * f],
                &w(ly.w2.0)[e * d * f..(e + 1) * d * f],
                &s.dy[o * d..(o + me) * d],
                (me, f, d),
                &mut gw[e * d * f..(e + 1) * d * f],
                gb.map(|b| &mut b[e * d..(e + 1) * d]),
                Some(&mut s.dg[o * f..]),
                false,
            );
        }
        self.activate_bwd(a, s);
        for e in 0..e_n {
            let (o, me) = (a.offs[e], a.load[e]);
            if me == 0 {
                continue;
            }
            for (ix, (slot, dsrc)) in [(Some(ly.w1), &s.dg), (ly.w3, &s.du3)]
                .into_iter()
                .enumerate()
            {
                let Some((wi, bi)) = slot else { continue };
                let (gw, gb) = two(grads, wi, bi);
                linear_bwd(
                    &a.cs[o * d..(o + me) * d],
                    &w(wi)[e * f * d..(e + 1) * f * d],
                    &dsrc[o * f..(o + me) * f],
                    (me, d, f),
                    &mut gw[e * f * d..(e + 1) * f * d],
                    gb.map(|b| &mut b[e * f..(e + 1) * f]),
                    Some(&mut s.dcs[o * d..]),
                    ix > 0,
                );
            }
        }
        s.dc[..n * d].fill(0.0);
        for (pos, &slot) in a.order[..n * k].iter().enumerate() {
            let r = slot / k;
            let (dcr, src) = (
                &mut s.dc[r * d..(r + 1) * d],
                &s.dcs[pos * d..(pos + 1) * d],
            );
            dcr.iter_mut().zip(src).for_each(|(x, y)| *x += y);
        }
        // the router: through the gates (softmax over the chosen logits),
        // L_aux (through P) and L_z
        let f_e: Vec<f32> = a.load.iter().map(|&c| c as f32 / (n * k) as f32).collect();
        let c_aux = (share * m.aux_weight as f64 * e_n as f64 / n as f64) as f32;
        let c_z = (share * m.z_weight as f64 * 2.0 / n as f64) as f32;
        for r in 0..n {
            let (gs, dgs) = (&a.gate[r * k..(r + 1) * k], &s.dgate[r * k..(r + 1) * k]);
            let dot: f32 = gs.iter().zip(dgs).map(|(g, dg)| g * dg).sum();
            let pr = &a.probs[r * e_n..(r + 1) * e_n];
            let pf: f32 = pr.iter().zip(&f_e).map(|(p, f)| p * f).sum();
            let dl = &mut s.dlog[r * e_n..(r + 1) * e_n];
            for e in 0..e_n {
                dl[e] = c_aux * pr[e] * (f_e[e] - pf) + c_z * a.lse[r] * pr[e];
            }
            for j in 0..k {
                dl[a.top[r * k + j]] += gs[j] * (dgs[j] - dot);
            }
        }
        linear_bwd(
            &a.c,
            w(router),
            &s.dlog,
            (n, d, e_n),
            &mut grads[router],
            None,
            Some(&mut s.dc),
            true,
        );
    }

    /// Causal softmax attention of every (sequence, head): P = softmax(q kᵀ
    /// / √hd) with future keys masked, kept for the backward; o = P v.
    fn attention_fwd(&self, a: &mut LayerActs, b: usize, t: usize, window: Option<usize>) {
        let (hd, h, g) = (self.hd, self.heads, self.heads / self.kv_heads);
        let (qw, kw) = (h * hd, self.kv_heads * hd);
        let scale = 1.0 / (hd as f32).sqrt();
        for s in 0..b {
            for head in 0..h {
                let kh = head / g;
                let p = &mut a.p[(s * h + head) * t * t..][..t * t];
                let q = &a.q[s * t * qw + head * hd..];
                let k = &a.k[s * t * kw + kh * hd..];
                let v = &a.v[s * t * kw + kh * hd..];
                mm((t, t, hd), p, (t, 1), false, q, (qw, 1), k, (1, kw), scale);
                for (i, row) in p.chunks_exact_mut(t).enumerate() {
                    let lo = first_key(i, window);
                    row[..lo].fill(0.0);
                    softmax_row(&mut row[lo..=i]);
                    row[i + 1..].fill(0.0);
                }
                let o = &mut a.o[s * t * qw + head * hd..];
                mm((t, hd, t), o, (qw, 1), false, p, (t, 1), v, (kw, 1), 1.0);
            }
        }
    }

    /// The backward of `attention_fwd`: from d_o, dq (set), dk and dv
    /// (summed over the query heads sharing them).
    fn attention_bwd(
        &self,
        a: &LayerActs,
        s: &mut Scratch,
        b: usize,
        t: usize,
        window: Option<usize>,
    ) {
        let scale = 1.0 / (self.hd as f32).sqrt();
        // dS = P ⊙ (dP − Σ_j dP P) · scale (zero where masked: P = 0)
        self.scores_bwd(a, s, b, t, self.hd, |_, i, dr, pr| {
            let (lo, n) = (first_key(i, window), i + 1);
            let dot = lanes(&pr[lo..n], |j, pv| pv * dr[lo + j]);
            for j in lo..n {
                dr[j] = pr[j] * (dr[j] - dot) * scale;
            }
            dr[..lo].fill(0.0);
            dr[n..].fill(0.0);
        });
    }

    /// What the backward of every attention-shaped mixer (softmax, window,
    /// Taylor) shares, per (sequence, head) with q and k dq wide per head
    /// and P (kept in a.p) the weights o = P v: dP = dO vᵀ, dv += Pᵀ dO,
    /// then `row(at, i, dP_i, P_i)` turns row i of dP into the scores'
    /// gradient dS_i in place (at: the (sequence, head)'s first row), and
    /// dq = dS k (set), dk += dSᵀ q.
    fn scores_bwd(
        &self,
        a: &LayerActs,
        s: &mut Scratch,
        b: usize,
        t: usize,
        dq: usize,
        row: impl Fn(usize, usize, &mut [f32], &[f32]),
    ) {
        let (hd, h, g) = (self.hd, self.heads, self.heads / self.kv_heads);
        let (tq, tk, vw, ow) = (h * dq, self.kv_heads * dq, self.kv_heads * hd, h * hd);
        s.dk[..b * t * tk].fill(0.0);
        s.dv[..b * t * vw].fill(0.0);
        for sq in 0..b {
            for head in 0..h {
                let (kh, at) = (head / g, (sq * h + head) * t);
                let p = &a.p[at * t..][..t * t];
                let (qo, ko, vo, oo) = (
                    sq * t * tq + head * dq,
                    sq * t * tk + kh * dq,
                    sq * t * vw + kh * hd,
                    sq * t * ow + head * hd,
                );
                let d_o = &s.d_o[oo..];
                let dp = &mut s.dp[..t * t];
                // dP = dO vᵀ; dv += Pᵀ dO
                mm(
                    (t, t, hd),
                    dp,
                    (t, 1),
                    false,
                    d_o,
                    (ow, 1),
                    &a.v[vo..],
                    (1, vw),
                    1.0,
                );
                mm(
                    (t, hd, t),
                    &mut s.dv[vo..],
                    (vw, 1),
                    true,
                    p,
                    (1, t),
                    d_o,
                    (ow, 1),
                    1.0,
                );
                for (i, (dr, pr)) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
                    row(at, i, dr, pr);
                }
                // dq = dS k; dk += dSᵀ q
                mm(
                    (t, dq, t),
                    &mut s.dq[qo..],
                    (tq, 1),
                    false,
                    dp,
                    (t, 1),
                    &a.k[ko..],
                    (tk, 1),
                    1.0,
                );
                mm(
                    (t, dq, t),
                    &mut s.dk[ko..],
                    (tk, 1),
                    true,
                    dp,
                    (1, t),
                    &a.q[qo..],
                    (tq, 1),
                    1.0,
                );
            }
        }
    }
}

impl Fused {
    /// Causal Taylor attention of every (sequence, head), q and k dq wide
    /// per head: s = q kᵀ / √dq (kept), f = 1 + s + s²/2, Z_i = Σ_{j≤i} f_ij
    /// + ε (kept), P = f / Z (kept), o = P v.
    fn taylor_fwd(&self, a: &mut LayerActs, b: usize, t: usize, dq: usize) {
        let (hd, h, g) = (self.hd, self.heads, self.heads / self.kv_heads);
        let (tq, tk, vw, ow) = (h * dq, self.kv_heads * dq, self.kv_heads * hd, h * hd);
        let scale = 1.0 / (dq as f32).sqrt();
        let eps = crate::attention::linear::EPS as f32;
        for s in 0..b {
            for head in 0..h {
                let (kh, at) = (head / g, (s * h + head) * t);
                let sc = &mut a.sc[at * t..][..t * t];
                let q = &a.q[s * t * tq + head * dq..];
                let k = &a.k[s * t * tk + kh * dq..];
                mm((t, t, dq), sc, (t, 1), false, q, (tq, 1), k, (1, tk), scale);
                let p = &mut a.p[at * t..][..t * t];
                for (i, (pr, sr)) in p.chunks_exact_mut(t).zip(sc.chunks_exact(t)).enumerate() {
                    let mut z = eps;
                    for j in 0..=i {
                        let f = 1.0 + sr[j] + 0.5 * sr[j] * sr[j];
                        pr[j] = f;
                        z += f;
                    }
                    let inv = 1.0 / z;
                    pr[..=i].iter_mut().for_each(|x| *x *= inv);
                    pr[i + 1..].fill(0.0);
                    a.zr[at + i] = z;
                }
                let v = &a.v[s * t * vw + kh * hd..];
                let o = &mut a.o[s * t * ow + head * hd..];
                mm((t, hd, t), o, (ow, 1), false, p, (t, 1), v, (vw, 1), 1.0);
            }
        }
    }

    /// The backward of `taylor_fwd`: from d_o, dq (set), dk and dv (summed
    /// over the query heads sharing them). With P = f/Z:
    /// ∂L/∂f_ij = (dP_ij − Σ_l dP_il P_il) / Z_i, ds = ∂L/∂f · (1 + s) / √dq.
    fn taylor_bwd(&self, a: &LayerActs, s: &mut Scratch, b: usize, t: usize, dq: usize) {
        let scale = 1.0 / (dq as f32).sqrt();
        self.scores_bwd(a, s, b, t, dq, |at, i, dr, pr| {
            let (n, sr) = (i + 1, &a.sc[(at + i) * t..][..t]);
            let dot = lanes(&pr[..n], |j, pv| pv * dr[j]);
            let inv = scale / a.zr[at + i];
            for j in 0..n {
                dr[j] = (dr[j] - dot) * inv * (1.0 + sr[j]);
            }
            dr[n..].fill(0.0);
        });
    }
}

/// The first key query i sees: 0, or i − w + 1 in a window of w.
#[inline]
fn first_key(i: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (i + 1).saturating_sub(w))
}

/// Rotate every head (hd wide) of every row of x (rows of `width`) to its
/// position, row mod t; `back` applies the transpose (the backward).
fn rotate_rows(rope: &RopeTables, x: &mut [f32], width: usize, hd: usize, t: usize, back: bool) {
    for (r, row) in x.chunks_exact_mut(width).enumerate() {
        for head in row.chunks_exact_mut(hd) {
            if back {
                rope.rotate_back(head, r % t);
            } else {
                rope.rotate(head, r % t);
            }
        }
    }
}

/// The backward of a layer's q, k and v projections of `inp` (n, d):
/// their gradients added, and d inp = Σ dy W set (added to when `acc`).
/// `dys`: each projection's output gradient and width.
#[allow(clippy::too_many_arguments)]
fn qkv_bwd(
    ly: &Layer,
    p: &Params,
    inp: &[f32],
    dys: [(&[f32], usize); 3],
    (n, d): (usize, usize),
    din: &mut [f32],
    acc: bool,
    grads: &mut Params,
) {
    for (ix, (slot, (dy, width))) in [ly.q, ly.k, ly.v].into_iter().zip(dys).enumerate() {
        let (gw, gb) = two(grads, slot.0, slot.1);
        linear_bwd(
            inp,
            &p[slot.0],
            &dy[..n * width],
            (n, d, width),
            gw,
            gb,
            Some(&mut *din),
            ix > 0 || acc,
        );
    }
}

/// A parameter's gradient and its bias's, borrowed together.
fn two(g: &mut Params, w: usize, b: Option<usize>) -> (&mut [f32], Option<&mut [f32]>) {
    match b {
        None => (&mut g[w], None),
        Some(b) if w < b => {
            let (lo, hi) = g.split_at_mut(b);
            (&mut lo[w], Some(&mut hi[0]))
        }
        Some(b) => {
            let (lo, hi) = g.split_at_mut(w);
            (&mut hi[0], Some(&mut lo[b]))
        }
    }
}

/// What one layer keeps from its forward for its backward.
#[derive(Default)]
struct LayerActs {
    a: Vec<f32>,
    mu1: Vec<f32>,
    r1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// (b, heads, t, t) attention probabilities
    p: Vec<f32>,
    o: Vec<f32>,
    x_mid: Vec<f32>,
    c: Vec<f32>,
    mu2: Vec<f32>,
    r2: Vec<f32>,
    u: Vec<f32>,
    u3: Vec<f32>,
    g: Vec<f32>,
    // a mixture of experts (empty otherwise): router softmax (n, E),
    // log Σ e^l (n), each row's experts and gates (n, k), the slots in
    // expert order (n·k), where each expert's rows start (E + 1), its
    // tokens per step (E), the gathered inputs and expert outputs (n·k, d)
    probs: Vec<f32>,
    lse: Vec<f32>,
    top: Vec<usize>,
    gate: Vec<f32>,
    order: Vec<usize>,
    offs: Vec<usize>,
    load: Vec<usize>,
    cs: Vec<f32>,
    y: Vec<f32>,
    /// Taylor attention: the scores s (b, heads, t, t), each row's
    /// normaliser Σ f + ε (b, heads, t) and a BASED layer's conv output
    /// (n, d); empty otherwise
    sc: Vec<f32>,
    zr: Vec<f32>,
    uc: Vec<f32>,
    /// a recurrent mixer's (empty for attention)
    rec: mix::RecActs,
}

/// Gradients of one layer's activations, reused layer after layer.
#[derive(Default)]
struct Scratch {
    dg: Vec<f32>,
    du3: Vec<f32>,
    dc: Vec<f32>,
    d_o: Vec<f32>,
    dp: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    da: Vec<f32>,
    // a mixture of experts: (n·k, d), (n·k, d), (n, E), (n, k)
    dcs: Vec<f32>,
    dy: Vec<f32>,
    dlog: Vec<f32>,
    dgate: Vec<f32>,
    /// a BASED layer's conv output's gradient (n, d)
    duc: Vec<f32>,
    rec: mix::RecScratch,
}

/// One shard's buffers, allocated at the first step and reused.
#[derive(Default)]
pub struct Workspace {
    shape: (usize, usize),
    /// the residual stream entering each layer, and leaving the last
    x: Vec<Vec<f32>>,
    layer: Vec<LayerActs>,
    xf: Vec<f32>,
    muf: Vec<f32>,
    rf: Vec<f32>,
    rows: Vec<usize>,
    hs: Vec<f32>,
    logits: Vec<f32>,
    dhs: Vec<f32>,
    dxf: Vec<f32>,
    dx: Vec<f32>,
    scratch: Scratch,
}

impl Workspace {
    /// Tokens each expert took in the last call, per MoE layer (empty
    /// without experts).
    pub fn expert_load(&self) -> Vec<Vec<usize>> {
        self.layer
            .iter()
            .filter(|l| !l.load.is_empty())
            .map(|l| l.load.clone())
            .collect()
    }

    /// Size every buffer for shards of b sequences of t tokens.
    fn fit(&mut self, m: &Fused, b: usize, t: usize) {
        if self.shape == (b, t) && self.layer.len() == m.layers.len() {
            return;
        }
        let n = b * t;
        let (d, f, v) = (m.d, m.d_ff, m.vocab);
        let (qw, kw) = (m.heads * m.hd, m.kv_heads * m.hd);
        let z = |k: usize| vec![0f32; k];
        // FFN rows: one per token, or per (token, chosen expert)
        let (e_n, k) = m.moe.map_or((0, 0), |m| (m.experts, m.top_k));
        let qk_max = m
            .mixers
            .iter()
            .map(|x| x.qk_dim(m.hd))
            .max()
            .unwrap_or(m.hd);
        let rows = if m.moe.is_some() { n * k } else { n };
        self.shape = (b, t);
        self.x = (0..=m.layers.len()).map(|_| z(n * d)).collect();
        self.layer = (0..m.layers.len())
            .map(|l| LayerActs {
                a: z(n * d),
                mu1: z(n),
                r1: z(n),
                q: z(n * m.heads * m.mixers[l].qk_dim(m.hd)),
                k: z(n * m.kv_heads * m.mixers[l].qk_dim(m.hd)),
                v: z(n * kw),
                p: match m.mixers[l] {
                    Mixer::Recurrent(_) => vec![],
                    _ => z(b * m.heads * t * t),
                },
                sc: match m.mixers[l] {
                    Mixer::Taylor { .. } => z(b * m.heads * t * t),
                    _ => vec![],
                },
                zr: match m.mixers[l] {
                    Mixer::Taylor { .. } => z(b * m.heads * t),
                    _ => vec![],
                },
                uc: match m.mixers[l] {
                    Mixer::Taylor { conv: Some(_), .. } => z(n * d),
                    _ => vec![],
                },
                o: z(n * qw),
                x_mid: z(n * d),
                c: z(n * d),
                mu2: z(n),
                r2: z(n),
                u: z(rows * f),
                u3: if m.gated { z(rows * f) } else { vec![] },
                g: z(rows * f),
                probs: z(n * e_n),
                lse: z(if e_n > 0 { n } else { 0 }),
                top: vec![0; n * k],
                gate: z(n * k),
                order: vec![0; n * k],
                offs: vec![0; e_n + 1],
                load: vec![0; e_n],
                cs: z(n * k * d),
                y: z(n * k * d),
                rec: Default::default(),
            })
            .collect();
        self.xf = z(n * d);
        self.muf = z(n);
        self.rf = z(n);
        self.hs = z(n * d);
        self.logits = z(n * v);
        self.dhs = z(n * d);
        self.dxf = z(n * d);
        self.dx = z(n * d);
        self.scratch = Scratch {
            dg: z(rows * f),
            du3: if m.gated { z(rows * f) } else { vec![] },
            dc: z(n * d),
            d_o: z(n * qw),
            dp: z(t * t),
            dq: z(n * m.heads * qk_max),
            dk: z(n * m.kv_heads * qk_max),
            dv: z(n * kw),
            da: z(n * d),
            dcs: z(n * k * d),
            dy: z(n * k * d),
            dlog: z(n * e_n),
            dgate: z(n * k),
            duc: z(n * d),
            rec: Default::default(),
        };
        for (mx, a) in m.mixers.iter().zip(self.layer.iter_mut()) {
            if let Mixer::Recurrent(rec) = mx {
                rec.fit(m, b, t, &mut a.rec, &mut self.scratch.rec);
            }
        }
    }
}
