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
//! both differentiable).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::exec::graph::Graph;
use crate::ffn::Ffn;
use crate::nn::{Builder, Linear};
use candle_core::{DType, Tensor, D};

/// How the experts are routed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Routing {
    pub experts: usize,
    pub top_k: usize,
    /// Tokens an expert takes, as a multiple of its fair share k·n/E
    /// (None: dropless).
    pub capacity_factor: Option<f64>,
}

impl Routing {
    pub fn validate(&self) -> Result<()> {
        if self.experts == 0 {
            return Err(Error::config("moe", "experts must be at least 1"));
        }
        if self.top_k == 0 || self.top_k > self.experts {
            return Err(Error::config(
                "moe",
                format!(
                    "k must be in 1..={} (the experts), got {}",
                    self.experts, self.top_k
                ),
            ));
        }
        if let Some(c) = self.capacity_factor {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::config(
                    "moe",
                    format!("capacity factor must be positive, got {c}"),
                ));
            }
        }
        Ok(())
    }

    /// The most tokens an expert takes from n (None: no limit).
    pub fn capacity(&self, n: usize) -> Option<usize> {
        self.capacity_factor
            .map(|c| (c * (self.top_k * n) as f64 / self.experts as f64).ceil() as usize)
    }
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
    pub assignment: Assignment,
}

#[derive(Clone, Debug)]
pub struct Moe {
    /// W_r: d_model -> E, no bias.
    pub router: Linear,
    pub experts: Vec<Ffn>,
    pub routing: Routing,
}

impl Moe {
    /// Experts `experts.{e}.{w1,w2,w3}` of the model's FFN kind and d_ff,
    /// the router `router`.
    pub fn new(vb: &Builder, cfg: &ModelConfig, routing: Routing) -> Result<Self> {
        routing.validate()?;
        Ok(Self {
            router: Linear::new(&vb.pp("router"), cfg.d_model, routing.experts, false)?,
            experts: (0..routing.experts)
                .map(|e| Ffn::new(&vb.pp(format!("experts.{e}")), cfg))
                .collect::<Result<_>>()?,
            routing,
        })
    }

    /// x (n, d) -> y (n, d) and the losses and load.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, MoeStats)> {
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
        for (e, expert) in self.experts.iter().enumerate() {
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
            let h = expert.forward(&Graph, &x.index_select(&rows, 0)?)?; // (m, d)
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
        Ok((
            y,
            MoeStats {
                aux_loss,
                z_loss,
                assignment: a,
            },
        ))
    }
}
