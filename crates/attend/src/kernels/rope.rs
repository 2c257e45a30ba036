//! Rotary position embedding on plain buffers: the cos/sin tables and the
//! rotation of one head vector (both layouts: adjacent pairs as GGUF stores
//! them, or (x_i, x_{i+d/2}) as Hugging Face does).

/// cos and sin of pos · theta^(-2i/d) / factor_i for pos < max_len,
/// i < d/2 (`factors`: RoPE scaling, else 1): two (max_len, d/2) row-major
/// tables.
pub fn rope_tables(
    head_dim: usize,
    max_len: usize,
    theta: f64,
    factors: Option<&[f64]>,
) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let half = head_dim / 2;
    let freq: Vec<f64> = (0..half)
        .map(|i| {
            let f = factors.map_or(1.0, |f| f[i]);
            theta.powf(-2.0 * i as f64 / head_dim as f64) / f
        })
        .collect();
    let mut cos = vec![0f32; max_len * half];
    let mut sin = vec![0f32; max_len * half];
    // (a 32k-position table for Gemma 3's 256-wide heads is 4M angles:
    // rows in parallel)
    cos.par_chunks_mut(half.max(1))
        .zip(sin.par_chunks_mut(half.max(1)))
        .enumerate()
        .for_each(|(pos, (c, s))| {
            for ((c, s), f) in c.iter_mut().zip(s).zip(&freq) {
                let (sn, cs) = (pos as f64 * f).sin_cos();
                (*c, *s) = (cs as f32, sn as f32);
            }
        });
    (cos, sin)
}

/// cos/sin tables of RoPE, (max_len, head_dim/2) each.
#[derive(Debug)]
pub struct RopeTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub interleaved: bool,
    pub max_len: usize,
}

impl RopeTables {
    pub fn new(
        head_dim: usize,
        max_len: usize,
        theta: f64,
        factors: Option<&[f64]>,
        interleaved: bool,
    ) -> Self {
        let (cos, sin) = rope_tables(head_dim, max_len, theta, factors);
        Self {
            cos,
            sin,
            interleaved,
            max_len,
        }
    }

    /// Rotate x (head_dim) in place to position `pos`.
    pub fn rotate(&self, x: &mut [f32], pos: usize) {
        self.rotate_signed(x, pos, 1.0)
    }

    /// The transpose of `rotate` (rotation by the negative angle): the
    /// backward of `rotate`, or undoing it.
    pub fn rotate_back(&self, x: &mut [f32], pos: usize) {
        self.rotate_signed(x, pos, -1.0)
    }

    fn rotate_signed(&self, x: &mut [f32], pos: usize, sign: f32) {
        let half = x.len() / 2;
        let (cos, sin) = (
            &self.cos[pos * half..][..half],
            &self.sin[pos * half..][..half],
        );
        for p in 0..half {
            let (a, b) = if self.interleaved {
                (2 * p, 2 * p + 1)
            } else {
                (p, p + half)
            };
            let (x1, x2, sn) = (x[a], x[b], sign * sin[p]);
            x[a] = x1 * cos[p] - x2 * sn;
            x[b] = x2 * cos[p] + x1 * sn;
        }
    }
}
