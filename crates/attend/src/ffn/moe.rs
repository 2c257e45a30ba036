//! A sparse mixture of experts as a block's channel mixer (Shazeer et al.
//! 2017; Switch Transformer, Fedus et al. 2021; ST-MoE, Zoph et al. 2022;
//! Mixtral's top-k gating). E experts, each an FFN of the model's kind; a
//! router picks k of them per token:
//!
//!   l = W_r x  (E logits),  T = the k largest l_e,
//!   g_e = softmax_{e ∈ T}(l_e)          (the top-k renormalised; k = 1: g = 1)
//!   y = Σ_{e ∈ T} g_e FFN_e(x)
//!
//! Training adds Switch's load-balancing loss and ST-MoE's router z-loss,
//!
//!   L_aux = E · Σ_e f_e P_e,   f_e = (tokens sent to e) / (k·n),
//!                              P_e = mean over tokens of softmax(l)_e,
//!   L_z   = mean over tokens of (log Σ_e e^(l_e))²,
//!
//! (f is a count, so the gradient flows through P). With a capacity factor
//! c each expert takes at most ⌈c·k·n / E⌉ tokens, in token order, and the
//! rest of its tokens are dropped (their slot adds nothing: the residual
//! carries them); without one routing is dropless.
//!
//! Experts run as grouped products: the tokens routed to an expert are
//! gathered into one matrix, the expert's FFN runs on it, and its gated
//! outputs are added back at their rows (`index_select` / `index_add`,
//! both differentiable). The experts' matrices are stacked by rows in the
//! owning `Ffn` (w1, w3: (E·d_ff, d); w2: (E·d, d_ff); expert e's are row
//! blocks), so an upcycled dense FFN is its matrices repeated E times.

use crate::config::MoeConfig;
use crate::error::{Error, Result};
use crate::exec::graph::Graph;
use crate::ffn::Ffn;
use crate::nn::{Builder, Init, Linear, Weight};
use candle_core::{DType, Tensor, D};
use std::cell::RefCell;

/// How the experts are routed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Routing {
    pub experts: usize,
    pub top_k: usize,
    /// Tokens an expert takes, as a multiple of its fair share k·n/E
    /// (None: dropless).
    pub capacity_factor: Option<f64>,
}

impl From<&MoeConfig> for Routing {
    fn from(m: &MoeConfig) -> Self {
        Self {
            experts: m.experts,
            top_k: m.top_k,
            capacity_factor: m.capacity_factor,
        }
    }
}

impl Routing {
    pub fn validate(&self) -> Result<()> {
        MoeConfig {
            experts: self.experts,
            top_k: self.top_k,
            capacity_factor: self.capacity_factor,
            ..MoeConfig::default()
        }
        .validate()
    }

    /// The most tokens an expert takes from n (None: no limit).
    pub fn capacity(&self, n: usize) -> Option<usize> {
        self.capacity_factor
            .map(|c| (c * (self.top_k * n) as f64 / self.experts as f64).ceil() as usize)
    }
}

/// E matrices (o, i) stacked by rows as one (E·o, i) linear map, each
/// initialised as its own (o, i) matrix (Xavier on o and i); biases (E·o).
pub fn stacked(vb: &Builder, e: usize, o: usize, i: usize, bias: bool) -> Result<Linear> {
    let w = vb.get("weight", &[e, o, i], Init::XavierUniform)?;
    Ok(Linear {
        w: Weight::Dense(w.reshape((e * o, i))?),
        b: bias
            .then(|| vb.get("bias", &[e * o], Init::Zeros))
            .transpose()?,
    })
}

/// Rows [e·n, (e+1)·n) of a stacked linear map.
fn expert_rows(l: &Linear, e: usize, n: usize) -> Result<Linear> {
    let Weight::Dense(w) = &l.w else {
        return Err(Error::msg(
            "a mixture of experts needs float expert weights (not quantized ones)",
        ));
    };
    Ok(Linear {
        w: Weight::Dense(w.narrow(0, e * n, n)?),
        b: l.b.as_ref().map(|b| b.narrow(0, e * n, n)).transpose()?,
    })
}

/// Where each token goes: for token i, `experts[i]` are its top-k experts
/// (largest logit first, the lower index on a tie) and `kept[i][j]` whether
/// slot j fitted its expert's capacity.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub experts: Vec<Vec<usize>>,
    pub kept: Vec<Vec<bool>>,
    /// Tokens each expert took.
    pub load: Vec<usize>,
    /// Slots dropped for capacity.
    pub dropped: usize,
}

/// Top-k of each row of router logits (n rows of E), then capacity in
/// token order.
pub fn assign(logits: &[Vec<f32>], r: &Routing) -> Assignment {
    let n = logits.len();
    let cap = r.capacity(n);
    let mut load = vec![0usize; r.experts];
    let (mut experts, mut kept, mut dropped) = (vec![], vec![], 0);
    for l in logits {
        let mut order: Vec<usize> = (0..r.experts).collect();
        // descending logit, ties to the lower index (a stable sort)
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        order.truncate(r.top_k);
        let mut keep = vec![];
        for &e in &order {
            let ok = cap.is_none_or(|c| load[e] < c);
            if ok {
                load[e] += 1;
            } else {
                dropped += 1;
            }
            keep.push(ok);
        }
        experts.push(order);
        kept.push(keep);
    }
    Assignment {
        experts,
        kept,
        load,
        dropped,
    }
}

/// What one MoE forward pass reports besides its output.
#[derive(Clone, Debug)]
pub struct MoeStats {
    /// Switch's load-balancing loss E·Σ f_e P_e (a scalar, differentiable in P).
    pub aux_loss: Tensor,
    /// ST-MoE's router z-loss, mean (logsumexp l)².
    pub z_loss: Tensor,
    /// Their weights in the training loss.
    pub aux_weight: f64,
    pub z_weight: f64,
    pub assignment: Assignment,
}

thread_local! {
    /// The stats of every MoE layer run on this thread while collecting.
    static SINK: RefCell<Option<Vec<MoeStats>>> = const { RefCell::new(None) };
}

/// Run f, collecting the stats of every MoE layer it runs on this thread
/// (the trainer adds their losses; each training shard runs on its own
/// thread).
pub fn collect<R>(f: impl FnOnce() -> R) -> (R, Vec<MoeStats>) {
    let before = SINK.with(|s| s.borrow_mut().replace(vec![]));
    let r = f();
    let stats = SINK.with(|s| std::mem::replace(&mut *s.borrow_mut(), before));
    (r, stats.unwrap_or_default())
}

/// The router of a mixture of experts; the experts themselves are the
/// owning `Ffn`'s stacked matrices.
#[derive(Clone, Debug)]
pub struct Moe {
    /// W_r: d_model -> E, no bias.
    pub router: Linear,
    pub routing: Routing,
    pub aux_weight: f64,
    pub z_weight: f64,
}

impl Moe {
    pub fn new(vb: &Builder, d_model: usize, cfg: &MoeConfig) -> Result<Self> {
        let routing = Routing::from(cfg);
        routing.validate()?;
        Ok(Self {
            router: Linear::new(vb, d_model, routing.experts, false)?,
            routing,
            aux_weight: cfg.aux_weight,
            z_weight: cfg.z_weight,
        })
    }

    /// Expert e of `ffn` as a dense FFN of its own.
    pub fn expert(&self, ffn: &Ffn, e: usize) -> Result<Ffn> {
        let f = ffn.w1.w.dims()?.0 / self.routing.experts;
        let d = ffn.w2.w.dims()?.0 / self.routing.experts;
        Ok(Ffn {
            kind: ffn.kind,
            w1: expert_rows(&ffn.w1, e, f)?,
            w2: expert_rows(&ffn.w2, e, d)?,
            w3: ffn.w3.as_ref().map(|w| expert_rows(w, e, f)).transpose()?,
            moe: None,
            block: ffn.block,
        })
    }

    /// x (..., d) -> (..., d) through `ffn`'s experts; `padding` (b, t), 1 =
    /// token, when x is (b, t, d): padded rows are neither routed nor
    /// counted, and come out zero. Pushes its stats to `collect`'s sink.
    pub fn forward(&self, ffn: &Ffn, x: &Tensor, padding: Option<&Tensor>) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d;
        let flat = x.reshape((rows, d))?;
        let keep: Option<Vec<u32>> = match padding {
            Some(p) => {
                let p: Vec<f32> = p.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                (p.len() == rows && p.contains(&0.0))
                    .then(|| (0..rows as u32).filter(|&i| p[i as usize] != 0.0).collect())
            }
            None => None,
        };
        let y = match keep {
            None => self.tokens(ffn, &flat)?,
            Some(keep) => {
                let idx = Tensor::new(keep.as_slice(), x.device())?;
                let y = self.tokens(ffn, &flat.index_select(&idx, 0)?)?;
                flat.zeros_like()?.index_add(&idx, &y, 0)?
            }
        };
        Ok(y.reshape(x.shape())?)
    }

    /// x (n, d) -> y (n, d), every row a token.
    pub fn tokens(&self, ffn: &Ffn, x: &Tensor) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        let (e_n, k) = (self.routing.experts, self.routing.top_k);
        let logits = self.router.forward(x)?; // (n, E)
        let host: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        let a = assign(&host, &self.routing);
        // gates: softmax over each token's k chosen logits, (n·k)
        let idx: Vec<u32> = a.experts.iter().flatten().map(|&e| e as u32).collect();
        let idx = Tensor::from_vec(idx, (n, k), x.device())?;
        let gates = crate::nn::softmax_last(&logits.gather(&idx, 1)?)?.flatten_all()?;
        let mut y = x.zeros_like()?;
        for e in 0..e_n {
            let (mut rows, mut slots) = (vec![], vec![]);
            for (i, (ex, kp)) in a.experts.iter().zip(&a.kept).enumerate() {
                for (j, (&ej, &ok)) in ex.iter().zip(kp).enumerate() {
                    if ej == e && ok {
                        rows.push(i as u32);
                        slots.push((i * k + j) as u32);
                    }
                }
            }
            if rows.is_empty() {
                continue;
            }
            let m = rows.len();
            let rows = Tensor::from_vec(rows, m, x.device())?;
            let slots = Tensor::from_vec(slots, m, x.device())?;
            // the expert's tokens as one matrix: a grouped product
            let h = self
                .expert(ffn, e)?
                .dense(&Graph, &x.index_select(&rows, 0)?)?; // (m, d)
            let g = gates.index_select(&slots, 0)?.unsqueeze(1)?; // (m, 1)
            y = y.index_add(&rows, &h.broadcast_mul(&g)?, 0)?;
        }
        // L_aux = E Σ f_e P_e, f from the counts before capacity
        let mut counts = vec![0f64; e_n];
        a.experts.iter().flatten().for_each(|&e| counts[e] += 1.0);
        let f: Vec<f64> = counts.iter().map(|c| c / (k * n) as f64).collect();
        let f = Tensor::from_vec(f, e_n, x.device())?.to_dtype(logits.dtype())?;
        let p = crate::nn::softmax_last(&logits)?.mean(0)?; // (E)
        let aux_loss = ((p * f)?.sum_all()? * e_n as f64)?;
        let m = logits.max_keepdim(D::Minus1)?.detach();
        let lse = (logits
            .broadcast_sub(&m)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + m)?; // (n, 1)
        let z_loss = lse.sqr()?.mean_all()?;
        SINK.with(|s| {
            if let Some(v) = s.borrow_mut().as_mut() {
                v.push(MoeStats {
                    aux_loss,
                    z_loss,
                    aux_weight: self.aux_weight,
                    z_weight: self.z_weight,
                    assignment: a,
                });
            }
        });
        Ok(y)
    }
}
