//! AdamW (Loshchilov & Hutter 2019) with its state exposed for checkpoints,
//! global-norm gradient clipping, and learning-rate schedules.

use crate::error::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warmup, then constant.
    Constant,
    /// The paper's schedule: linear warmup, then ∝ 1/√step.
    /// lr(s) = peak · min(s / warmup, √(warmup / s)); with
    /// peak = d_model^-0.5 · warmup^-0.5 it is exactly Vaswani et al.'s.
    InverseSqrt,
    /// Linear warmup, then cosine decay to `min_lr_ratio` · peak.
    Cosine,
}

/// Learning rate at 1-based `step`.
pub fn learning_rate(
    schedule: Schedule,
    peak: f64,
    step: u64,
    warmup: u64,
    total: u64,
    min_ratio: f64,
) -> f64 {
    let s = step.max(1) as f64;
    let w = warmup as f64;
    let warm = if warmup > 0 { (s / w).min(1.0) } else { 1.0 };
    match schedule {
        Schedule::Constant => peak * warm,
        Schedule::InverseSqrt => {
            if warmup == 0 {
                peak / s.sqrt()
            } else {
                peak * (s / w).min((w / s).sqrt())
            }
        }
        Schedule::Cosine => {
            if step <= warmup {
                return peak * warm;
            }
            let progress = ((s - w) / ((total as f64 - w).max(1.0))).min(1.0);
            let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
            peak * (min_ratio + (1.0 - min_ratio) * cos)
        }
    }
}

pub struct AdamW {
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates taken so far (for bias correction).
    pub t: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(
        params: Vec<(String, Var)>,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let m = params
            .iter()
            .map(|(_, p)| p.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = params
            .iter()
            .map(|(_, p)| p.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            params,
            m,
            v,
            t: 0,
            beta1,
            beta2,
            eps,
            weight_decay,
        })
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for (_, p) in &self.params {
            if let Some(g) = grads.get(p.as_tensor()) {
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sq.sqrt())
    }

    /// `grad_norm` of gradients given as buffers in parameter order.
    pub fn grad_norm_flat(&self, grads: &[Vec<f32>]) -> f64 {
        grads
            .iter()
            .map(|g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
            .sum::<f64>()
            .sqrt()
    }

    /// One update with learning rate `lr`, gradients scaled by `grad_scale`
    /// (for clipping). Weight decay applies to matrices only, not to norms
    /// and biases.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        let params: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, p)| p.as_tensor().clone())
            .collect();
        self.update(lr, grad_scale, |i| {
            grads
                .get(&params[i])
                .map(|g| -> Result<Vec<f32>> {
                    Ok(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
                })
                .transpose()
                .map(|g| g.map(std::borrow::Cow::Owned))
        })
    }

    /// `step` with gradients as buffers in parameter order (the fused
    /// trainer's).
    pub fn step_flat(&mut self, grads: &[Vec<f32>], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(crate::error::Error::msg(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        self.update(lr, grad_scale, |i| {
            Ok(Some(std::borrow::Cow::Borrowed(&grads[i])))
        })
    }

    fn update<'g>(
        &mut self,
        lr: f64,
        grad_scale: f64,
        grad: impl Fn(usize) -> Result<Option<std::borrow::Cow<'g, [f32]>>>,
    ) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        // One fused pass per parameter over (θ, g, m, v) in plain slices:
        // the composed form costs a dozen tensor ops (and allocations) each.
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(g) = grad(i)? else {
                continue;
            };
            let f32s = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            };
            let (mut theta, mut m, mut v) =
                (f32s(p.as_tensor())?, f32s(&self.m[i])?, f32s(&self.v[i])?);
            if g.len() != theta.len() {
                return Err(crate::error::Error::msg(format!(
                    "gradient of {} numbers for a parameter of {}",
                    g.len(),
                    theta.len()
                )));
            }
            let decay = if p.rank() >= 2 {
                self.weight_decay
            } else {
                0.0
            };
            let (b1, b2, eps) = (self.beta1 as f32, self.beta2 as f32, self.eps as f32);
            let (lr32, keep, gs) = (lr as f32, (1.0 - lr * decay) as f32, grad_scale as f32);
            let (bc1, bc2) = (bc1 as f32, bc2 as f32);
            for j in 0..theta.len() {
                let gj = g[j] * gs;
                m[j] = b1 * m[j] + (1.0 - b1) * gj;
                v[j] = b2 * v[j] + (1.0 - b2) * gj * gj;
                let update = (m[j] / bc1) / ((v[j] / bc2).sqrt() + eps);
                theta[j] = theta[j] * keep - lr32 * update;
            }
            let back = |x: Vec<f32>| -> Result<Tensor> {
                Ok(Tensor::from_vec(x, p.shape(), p.device())?.to_dtype(p.dtype())?)
            };
            p.set(&back(theta)?)?;
            self.m[i] = back(m)?;
            self.v[i] = back(v)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`m.<param>`, `v.<param>`) for a checkpoint.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, t: u64) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let x = tensors.get(&key).ok_or_else(|| {
                    crate::error::Error::msg(format!("optimizer state has no `{key}`"))
                })?;
                *slot = x.to_dtype(p.dtype())?.to_device(p.device())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_have_their_closed_forms() {
        // the paper: d^-0.5 min(s^-0.5, s w^-1.5)
        let (d, w) = (512f64, 4000u64);
        let peak = d.powf(-0.5) * (w as f64).powf(-0.5);
        for s in [1u64, 100, 3999, 4000, 4001, 20000] {
            let want = d.powf(-0.5) * (s as f64).powf(-0.5).min(s as f64 * (w as f64).powf(-1.5));
            let got = learning_rate(Schedule::InverseSqrt, peak, s, w, 0, 0.0);
            assert!(
                (got - want).abs() < 1e-12 * want.max(1e-9),
                "{s}: {got} vs {want}"
            );
        }
        assert!((learning_rate(Schedule::Cosine, 1.0, 10, 10, 110, 0.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(Schedule::Cosine, 1.0, 60, 10, 110, 0.0) - 0.5).abs() < 1e-12);
        assert!(learning_rate(Schedule::Cosine, 1.0, 110, 10, 110, 0.1) - 0.1 < 1e-12);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_in_sign_direction() {
        // with bias correction, step 1 moves each weight by lr·g/(|g|+eps) ≈ lr·sign(g)
        let p =
            Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &candle_core::Device::Cpu).unwrap())
                .unwrap();
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], 0.9, 0.999, 1e-8, 0.0).unwrap();
        let loss = (p.as_tensor()
            * Tensor::new(&[[3.0f32, -0.5]], &candle_core::Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
        let g = loss.backward().unwrap();
        opt.step(&g, 0.1, 1.0).unwrap();
        let v = p.as_tensor().to_vec2::<f32>().unwrap();
        assert!(
            (v[0][0] - 0.9).abs() < 1e-5 && (v[0][1] + 1.9).abs() < 1e-5,
            "{v:?}"
        );
    }
}
