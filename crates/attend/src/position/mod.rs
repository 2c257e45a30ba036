//! Positional schemes. Additive ones (sinusoidal, learned) act on the
//! embeddings; RoPE rotates queries and keys inside attention; ALiBi adds a
//! distance bias to the attention scores.

use crate::config::PositionKind;
use crate::error::Result;
use crate::nn::{Builder, Init};
use candle_core::{DType, Device, Tensor};

/// PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).
/// Returns (max_len, d).
pub fn sinusoidal_table(max_len: usize, d: usize, device: &Device) -> Result<Tensor> {
    let mut data = vec![0f32; max_len * d];
    for pos in 0..max_len {
        for i in 0..d / 2 {
            let angle = pos as f64 / 10_000f64.powf(2.0 * i as f64 / d as f64);
            data[pos * d + 2 * i] = angle.sin() as f32;
            data[pos * d + 2 * i + 1] = angle.cos() as f32;
        }
    }
    Ok(Tensor::from_vec(data, (max_len, d), device)?)
}

/// Positions added to the token embeddings.
#[derive(Clone, Debug)]
pub enum Additive {
    None,
    /// (max_len, d) table, fixed or learned.
    Table(Tensor),
}

impl Additive {
    pub fn new(vb: &Builder, kind: PositionKind, max_len: usize, d: usize) -> Result<Self> {
        Ok(match kind {
            PositionKind::Sinusoidal => {
                Additive::Table(sinusoidal_table(max_len, d, vb.device())?.to_dtype(vb.dtype())?)
            }
            PositionKind::Learned => {
                Additive::Table(vb.get("weight", &[max_len, d], Init::Normal(1.0))?)
            }
            _ => Additive::None,
        })
    }

    /// x: (b, t, d) embeddings of positions offset..offset+t.
    pub fn forward(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        match self {
            Additive::None => Ok(x.clone()),
            Additive::Table(table) => {
                let t = x.dim(1)?;
                let max_len = table.dim(0)?;
                if offset + t > max_len {
                    return Err(crate::error::Error::msg(format!(
                        "sequence of {} positions exceeds the model's max_len {max_len}",
                        offset + t
                    )));
                }
                Ok(crate::kernels::add_rows(x, &table.narrow(0, offset, t)?)?)
            }
        }
    }
}

/// Rotary position embedding, "rotate half" layout (GPT-NeoX, HF Llama):
/// the pair (x_i, x_{i+d/2}) is rotated by angle pos * theta^(-2i/d).
/// The same rotation is kept twice: as tensors for the graph executor and
/// as f32 tables (`kernels::rope`) for the buffers of the CPU executor.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor, // (max_len, d/2)
    sin: Tensor, // (max_len, d/2)
    /// Rotate adjacent pairs (2i, 2i+1) instead of (i, i+d/2).
    pub interleaved: bool,
    pub tables: std::sync::Arc<RopeTables>,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        max_len: usize,
        theta: f64,
        interleaved: bool,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        Self::scaled(head_dim, max_len, theta, None, interleaved, dtype, dev)
    }

    /// As `new`, each frequency divided by its factor (RoPE scaling).
    pub fn scaled(
        head_dim: usize,
        max_len: usize,
        theta: f64,
        factors: Option<&[f64]>,
        interleaved: bool,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let tables = RopeTables::new(head_dim, max_len, theta, factors, interleaved);
        Ok(Self {
            cos: Tensor::from_slice(&tables.cos, (max_len, half), dev)?.to_dtype(dtype)?,
            sin: Tensor::from_slice(&tables.sin, (max_len, half), dev)?.to_dtype(dtype)?,
            interleaved,
            tables: std::sync::Arc::new(tables),
        })
    }

    pub fn max_len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// x: (b, h, t, d) at positions offset..offset+t -> (b, h, t, d)
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        if offset + t > self.max_len() {
            return Err(crate::error::Error::msg(format!(
                "sequence of {} positions exceeds the model's max_len {}",
                offset + t,
                self.max_len()
            )));
        }
        let half = d / 2;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        if self.interleaved {
            // (b, h, t, d/2, 2): pair i is (x_2i, x_2i+1)
            let (b, h) = (x.dim(0)?, x.dim(1)?);
            let xp = x.reshape((b, h, t, half, 2))?;
            let x1 = xp.narrow(4, 0, 1)?.squeeze(4)?;
            let x2 = xp.narrow(4, 1, 1)?.squeeze(4)?;
            let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            return Ok(Tensor::stack(&[r1, r2], 4)?.reshape((b, h, t, d))?);
        }
        let x1 = x.narrow(3, 0, half)?;
        let x2 = x.narrow(3, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[r1, r2], 3)?)
    }
}

pub use crate::kernels::rope::{rope_tables, RopeTables};

/// ALiBi head slopes (Press et al. 2022): a geometric sequence starting at
/// 2^(-8/n); for n not a power of two, the extra heads take every other slope
/// of the next power of two.
pub fn alibi_slopes(n_heads: usize) -> Vec<f64> {
    fn pow2(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start * start.powi(i as i32)).collect()
    }
    if n_heads.is_power_of_two() {
        pow2(n_heads)
    } else {
        let closest = 1usize << (usize::BITS - 1 - n_heads.leading_zeros());
        let mut s = pow2(closest);
        s.extend(
            alibi_slopes(2 * closest)
                .into_iter()
                .step_by(2)
                .take(n_heads - closest),
        );
        s
    }
}

/// ALiBi bias: -slope_h * |i - j| for query position i (offset + row) and
/// key position j. Returns (1, h, tq, tk).
pub fn alibi_bias(
    slopes: &[f64],
    tq: usize,
    tk: usize,
    q_offset: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let h = slopes.len();
    let mut data = vec![0f32; h * tq * tk];
    for (hi, s) in slopes.iter().enumerate() {
        for i in 0..tq {
            for j in 0..tk {
                let dist = (i + q_offset) as f64 - j as f64;
                data[(hi * tq + i) * tk + j] = (-s * dist.abs()) as f32;
            }
        }
    }
    Ok(Tensor::from_vec(data, (1, h, tq, tk), dev)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn sinusoidal_matches_closed_form() {
        let (n, d) = (50, 16);
        let t = sinusoidal_table(n, d, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for pos in [0usize, 1, 7, 49] {
            for k in 0..d {
                let i = (k / 2) as f64;
                let w = 1.0 / 10_000f64.powf(2.0 * i / d as f64);
                let want = if k % 2 == 0 {
                    (pos as f64 * w).sin()
                } else {
                    (pos as f64 * w).cos()
                };
                assert!((t[pos][k] as f64 - want).abs() < 1e-6, "pos {pos} dim {k}");
            }
        }
    }

    #[test]
    fn rope_matches_rotation_and_preserves_relative_dot() {
        let d = 8;
        let rope = Rope::new(d, 64, 10_000.0, false, DType::F32, &Device::Cpu).unwrap();
        let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..d).map(|i| (i as f32 * 0.91).cos()).collect();
        let rot = |v: &[f32], pos: usize| -> Vec<f32> {
            let x = Tensor::from_vec(v.to_vec(), (1, 1, 1, d), &Device::Cpu).unwrap();
            rope.apply(&x, pos)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // closed form: 2-D rotation of (x_i, x_{i+d/2}) by pos * theta^(-2i/d)
        let pos = 5;
        let r = rot(&q, pos);
        for i in 0..d / 2 {
            let a = pos as f64 * 10_000f64.powf(-2.0 * i as f64 / d as f64);
            let (c, s) = (a.cos(), a.sin());
            let want0 = q[i] as f64 * c - q[i + d / 2] as f64 * s;
            let want1 = q[i + d / 2] as f64 * c + q[i] as f64 * s;
            assert!((r[i] as f64 - want0).abs() < 1e-5);
            assert!((r[i + d / 2] as f64 - want1).abs() < 1e-5);
        }
        // <R_m q, R_n k> depends only on m - n
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let d1 = dot(&rot(&q, 10), &rot(&k, 7));
        let d2 = dot(&rot(&q, 33), &rot(&k, 30));
        assert!((d1 - d2).abs() < 1e-4, "{d1} vs {d2}");
    }

    #[test]
    fn alibi_slopes_match_paper() {
        // Press et al.: 8 heads -> 1/2, 1/4, ..., 1/256
        let s = alibi_slopes(8);
        for (i, v) in s.iter().enumerate() {
            assert!((v - 0.5f64.powi(i as i32 + 1)).abs() < 1e-12);
        }
        // 6 heads: the 4-head slopes (2^-2, 2^-4, 2^-6, 2^-8) then 2^-1, 2^-3
        let s = alibi_slopes(6);
        let want = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125];
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{s:?}");
        }
        let b = alibi_bias(&alibi_slopes(2), 3, 3, 0, DType::F32, &Device::Cpu).unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // head 0 slope 2^-4 (n=2: start = 2^-(2^-(1-3)) = 2^-4)
        assert!((b[3] - (-0.0625)).abs() < 1e-7); // i=1, j=0
        assert!((b[2 * 3] - (-0.125)).abs() < 1e-7); // i=2, j=0
        assert_eq!(b[0], 0.0);
    }
}
