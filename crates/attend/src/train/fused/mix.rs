//! The recurrent mixers in the fused trainer — RetNet's decay, GLA,
//! DeltaNet, Gated DeltaNet and Mamba2 — forward and backward by hand
//! around `kernels::recurrence` (the kernel autograd calls too), so that a
//! recurrent model's step costs what a softmax one's does instead of going
//! through candle's graph (issue 16: these mixers took ~2× softmax's step
//! there, most of it elementwise ops and allocation).
//!
//! Each is, per layer, on a (the normed input; n = b·t rows, heads as
//! column blocks as everywhere in the fused trainer):
//!
//!   Mamba2: u = SiLU(conv(a)), and the projections read u instead of a
//!   q, k, v = W_q a, W_k a, W_v a                 (RoPE if the model has it)
//!   DeltaNet: q, k ← L2(SiLU(q)), L2(SiLU(k))     per head
//!   λ (log-decay) and β from the gates:
//!     decay          λ = ln γ_h, fixed
//!     GLA            λ = log σ(W_up W_down a + b) / τ   per key channel
//!     (Gated) Delta  β = σ(w_β·a + b_β); λ = log σ(w_α·a + b_α) / τ (or 0)
//!     Mamba2         Δ = softplus(w_Δ·u + b_Δ − 4), λ = −Δ e^(A_log), k ← Δ k
//!   o = recurrence(q/√d_k, k, v, λ, β)            (Mamba2: q unscaled)
//!   ŷ = y / rms(y) per head, y = o                (Mamba2: (o + D v) ⊙ SiLU(W_z a))
//!
//! The recurrence reads head-major buffers — q (b, h, t, d_k), k (b, h_kv,
//! t, d_k) and the packed [v | λ | β] (b, h_kv, t, W) — so they are
//! gathered into them and o scattered back; the backward mirrors it. The
//! gradients equal autograd's (tests/fused.rs).

use super::{
    lanes, linear, linear_bwd, qkv_bwd, rotate_rows, silu, two, Find, Fused, Layer, Params,
};
use crate::attention::{decay, delta, mamba2};
use crate::config::MechanismConfig;
use crate::kernels::dense::exp;
use crate::kernels::recurrence::Recurrence;

/// Where a recurrent mixer's own parameters are, and its gates' settings.
#[derive(Clone, Debug)]
pub(super) enum Gates {
    /// RetNet: λ = ln γ of each kv head.
    Decay { la: Vec<f32> },
    Gla {
        down: usize,
        up: (usize, Option<usize>),
        rank: usize,
        inv_tau: f32,
    },
    Delta {
        beta: (usize, Option<usize>),
        /// Gated DeltaNet's decay gate and its 1/τ.
        gate: Option<((usize, Option<usize>), f32)>,
    },
    Mamba2 {
        /// The short convolution's weight (d, K) and bias (d).
        conv: (usize, usize),
        kernel: usize,
        dt: (usize, Option<usize>),
        a_log: usize,
        d_skip: usize,
        z: usize,
    },
}

/// A recurrent layer: its gates and the recurrence's shapes.
#[derive(Clone, Debug)]
pub(super) struct Rec {
    gates: Gates,
    op: Recurrence,
}

/// What a recurrent layer keeps from its forward (sized by `fit`).
#[derive(Default)]
pub(super) struct RecActs {
    /// Mamba2: the convolution's output and u = SiLU of it, (n, d).
    xc: Vec<f32>,
    u: Vec<f32>,
    /// DeltaNet: the featured q (n, h·d_k) and k (n, h_kv·d_k) and each
    /// head's 1/‖SiLU(·)‖; Mamba2: kf = Δ k.
    qf: Vec<f32>,
    kf: Vec<f32>,
    rq: Vec<f32>,
    rk: Vec<f32>,
    /// The recurrence's inputs and output, head-major.
    qp: Vec<f32>,
    kp: Vec<f32>,
    side: Vec<f32>,
    op: Vec<f32>,
    /// The recurrence's state at each block start, for its backward.
    starts: Vec<f32>,
    /// GLA: W_down a (n, rank).
    z1: Vec<f32>,
    /// The gate's pre-activation: GLA (n, h_kv·d_k), Gated DeltaNet's α
    /// and Mamba2's Δ (n, h_kv).
    z: Vec<f32>,
    /// DeltaNet's β or Mamba2's Δ, (n, h_kv).
    beta: Vec<f32>,
    /// λ, (n, h_kv·d_λ).
    la: Vec<f32>,
    /// Mamba2: W_z a and o + D v, (n, h·d_v).
    zp: Vec<f32>,
    ys: Vec<f32>,
    /// y before the per-head norm (n, h·d_v), and 1/rms per row and head.
    y: Vec<f32>,
    rr: Vec<f32>,
}

/// A recurrent layer's gradient buffers, shared by the layers.
#[derive(Default)]
pub(super) struct RecScratch {
    dy: Vec<f32>,
    dop: Vec<f32>,
    dqp: Vec<f32>,
    dkp: Vec<f32>,
    dside: Vec<f32>,
    dla: Vec<f32>,
    dbeta: Vec<f32>,
    dz1: Vec<f32>,
    dz: Vec<f32>,
    du: Vec<f32>,
    dzp: Vec<f32>,
}

/// log σ(x), stable for any x: −(relu(−x) + log(1 + e^(−|x|))).
fn log_sigmoid(x: f32) -> f32 {
    -((-x).max(0.0) + (1.0 + exp(-x.abs())).ln())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// The backward of λ = log σ(z) / τ: dz = dλ σ(−z) / τ (over z's length).
fn log_sigmoid_bwd(dz: &mut [f32], dla: &[f32], z: &[f32], inv_tau: f32) {
    for ((dz, &dla), &z) in dz.iter_mut().zip(dla).zip(z) {
        *dz = dla * inv_tau * sigmoid(-z);
    }
}

/// log(1 + e^x), stable for any x.
fn softplus(x: f32) -> f32 {
    x.max(0.0) + (1.0 + exp(-x.abs())).ln()
}

/// Row layout (b·t, heads·w) -> head-major (b, heads, t, stride) at column
/// `off`, times `scale`.
fn pack(
    src: &[f32],
    (b, t, heads, w): (usize, usize, usize, usize),
    dst: &mut [f32],
    (stride, off): (usize, usize),
    scale: f32,
) {
    for s in 0..b {
        for tau in 0..t {
            let row = &src[(s * t + tau) * heads * w..][..heads * w];
            for (hh, src) in row.chunks_exact(w).enumerate() {
                let d = &mut dst[((s * heads + hh) * t + tau) * stride + off..][..w];
                d.iter_mut().zip(src).for_each(|(d, &x)| *d = x * scale);
            }
        }
    }
}

/// The inverse of `pack`: head-major (b, heads, t, stride) at column `off`
/// -> row layout (b·t, heads·w), times `scale`, added to dst when `acc`.
fn unpack(
    src: &[f32],
    (stride, off): (usize, usize),
    (b, t, heads, w): (usize, usize, usize, usize),
    dst: &mut [f32],
    scale: f32,
    acc: bool,
) {
    for s in 0..b {
        for tau in 0..t {
            let row = &mut dst[(s * t + tau) * heads * w..][..heads * w];
            for (hh, d) in row.chunks_exact_mut(w).enumerate() {
                let src = &src[((s * heads + hh) * t + tau) * stride + off..][..w];
                if acc {
                    d.iter_mut().zip(src).for_each(|(d, &x)| *d += x * scale);
                } else {
                    d.iter_mut().zip(src).for_each(|(d, &x)| *d = x * scale);
                }
            }
        }
    }
}

/// DeltaNet's feature map per head of hd: f = SiLU(x), y = f / ‖f‖ with
/// ‖f‖ = √(Σf² + ε); r = 1/‖f‖ kept for the backward.
fn l2_silu(x: &[f32], hd: usize, y: &mut [f32], r: &mut [f32]) {
    for ((xh, yh), rh) in x.chunks_exact(hd).zip(y.chunks_exact_mut(hd)).zip(r) {
        for (o, &v) in yh.iter_mut().zip(xh) {
            *o = silu(v).0;
        }
        let inv = 1.0 / (lanes(yh, |_, v| v * v) + delta::L2_EPS as f32).sqrt();
        *rh = inv;
        yh.iter_mut().for_each(|v| *v *= inv);
    }
}

/// The backward of `l2_silu`: dx (holding dL/dy) becomes dL/dx,
/// df = r (dy − y (y·dy)), dx = df · SiLU'(x).
fn l2_silu_bwd(x: &[f32], y: &[f32], r: &[f32], hd: usize, dx: &mut [f32]) {
    for (((xh, yh), &rh), dh) in x
        .chunks_exact(hd)
        .zip(y.chunks_exact(hd))
        .zip(r)
        .zip(dx.chunks_exact_mut(hd))
    {
        let dot = lanes(dh, |i, v| v * yh[i]);
        for i in 0..hd {
            dh[i] = rh * (dh[i] - yh[i] * dot) * silu(xh[i]).1;
        }
    }
}

/// The short causal depthwise convolution of each sequence: y (b·t, d) =
/// bias + Σ_j w[c, j] x[τ − K + 1 + j, c], zeros before the start.
pub(super) fn conv_fwd(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    k: usize,
    (b, t, d): (usize, usize, usize),
    y: &mut [f32],
) {
    for s in 0..b {
        for tau in 0..t {
            let yr = &mut y[(s * t + tau) * d..][..d];
            yr.copy_from_slice(bias);
            for j in 0..k {
                let Some(src) = (tau + j + 1).checked_sub(k) else {
                    continue;
                };
                let xr = &x[(s * t + src) * d..][..d];
                for c in 0..d {
                    yr[c] += w[c * k + j] * xr[c];
                }
            }
        }
    }
}

/// The backward of `conv_fwd`: dw, db added; dx += the input's gradient.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv_bwd(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    k: usize,
    (b, t, d): (usize, usize, usize),
    dw: &mut [f32],
    db: &mut [f32],
    dx: &mut [f32],
) {
    for s in 0..b {
        for tau in 0..t {
            let dyr = &dy[(s * t + tau) * d..][..d];
            db.iter_mut().zip(dyr).for_each(|(g, v)| *g += v);
            for j in 0..k {
                let Some(src) = (tau + j + 1).checked_sub(k) else {
                    continue;
                };
                let xr = &x[(s * t + src) * d..][..d];
                let dxr = &mut dx[(s * t + src) * d..][..d];
                for c in 0..d {
                    dw[c * k + j] += dyr[c] * xr[c];
                    dxr[c] += dyr[c] * w[c * k + j];
                }
            }
        }
    }
}

impl Rec {
    /// The plan of a recurrent layer with mechanism `m` whose attention
    /// parameters are under `p` (`decoder.i.self_attn`), or None when `m`
    /// is not one of these mixers. Shapes: d_model d, h query and h_kv kv
    /// heads of hd.
    pub(super) fn plan(
        m: &MechanismConfig,
        p: &str,
        find: &mut Find,
        has: &dyn Fn(&str) -> bool,
        (d, h, hk, hd): (usize, usize, usize, usize),
    ) -> std::result::Result<Option<Self>, String> {
        // a linear layer's weight (o, i) and its bias if it has one
        let lin = |find: &mut Find, name: &str, o: usize, i: usize| {
            let w = find(format!("{p}.{name}.weight"), &[o, i])?;
            let b = if has(&format!("{p}.{name}.bias")) {
                Some(find(format!("{p}.{name}.bias"), &[o])?)
            } else {
                None
            };
            Ok::<_, String>((w, b))
        };
        let (gates, d_lambda, is_delta) = match m {
            MechanismConfig::Decay(c) => {
                let gammas = decay::DecayAttention::new(c, hk)
                    .map_err(|e| e.to_string())?
                    .gammas;
                let la = gammas.iter().map(|g| g.ln() as f32).collect();
                (Gates::Decay { la }, 1, false)
            }
            MechanismConfig::Gla(c) => {
                let (down, _) = lin(find, "gate_down", c.gate_rank, d)?;
                let up = lin(find, "gate_up", hk * hd, c.gate_rank)?;
                let inv_tau = (1.0 / c.tau) as f32;
                let rank = c.gate_rank;
                (
                    Gates::Gla {
                        down,
                        up,
                        rank,
                        inv_tau,
                    },
                    hd,
                    false,
                )
            }
            MechanismConfig::Delta(c) => {
                let beta = lin(find, "beta", hk, d)?;
                let gate = if c.gated {
                    Some((lin(find, "gate", hk, d)?, (1.0 / c.tau) as f32))
                } else {
                    None
                };
                (Gates::Delta { beta, gate }, 1, true)
            }
            MechanismConfig::Mamba2(c) => {
                let conv = (
                    find(format!("{p}.conv.weight"), &[d, c.conv])?,
                    find(format!("{p}.conv.bias"), &[d])?,
                );
                let dt = lin(find, "dt", hk, d)?;
                let (z, zb) = lin(find, "z_proj", h * hd, d)?;
                if zb.is_some() {
                    return Err("Mamba2's gate with a bias".into());
                }
                let gates = Gates::Mamba2 {
                    conv,
                    kernel: c.conv,
                    dt,
                    a_log: find(format!("{p}.a_log"), &[hk])?,
                    d_skip: find(format!("{p}.d_skip"), &[h])?,
                    z,
                };
                (gates, 1, false)
            }
            _ => return Ok(None),
        };
        if h / hk > crate::kernels::recurrence::MAX_G {
            return Err("more query heads per kv head than the recurrence takes".into());
        }
        Ok(Some(Self {
            gates,
            op: Recurrence {
                g: h / hk,
                d_k: hd,
                d_v: hd,
                d_lambda,
                delta: is_delta,
            },
        }))
    }

    fn mamba(&self) -> bool {
        matches!(self.gates, Gates::Mamba2 { .. })
    }

    /// Size the layer's buffers for n = b·t rows.
    pub(super) fn fit(&self, m: &Fused, b: usize, t: usize, a: &mut RecActs, s: &mut RecScratch) {
        let n = b * t;
        let (d, h, hk, hd) = (m.d, m.heads, m.kv_heads, m.hd);
        let (qw, kw, ws, dl) = (h * hd, hk * hd, self.op.side_width(), self.op.d_lambda);
        let z = |k: usize| vec![0f32; k];
        let (mamba, delta) = (self.mamba(), matches!(self.gates, Gates::Delta { .. }));
        let rank = match self.gates {
            Gates::Gla { rank, .. } => rank,
            _ => 0,
        };
        let zw = match self.gates {
            Gates::Gla { .. } => kw,
            Gates::Decay { .. } => 0,
            _ => hk,
        };
        *a = RecActs {
            xc: z(if mamba { n * d } else { 0 }),
            u: z(if mamba { n * d } else { 0 }),
            qf: z(if delta { n * qw } else { 0 }),
            kf: z(if delta || mamba { n * kw } else { 0 }),
            rq: z(if delta { n * h } else { 0 }),
            rk: z(if delta { n * hk } else { 0 }),
            qp: z(n * qw),
            kp: z(n * kw),
            side: z(n * hk * ws),
            op: z(n * qw),
            starts: z(b * hk * self.op.starts_len(t)),
            z1: z(n * rank),
            z: z(n * zw),
            beta: z(n * hk),
            la: z(n * hk * dl),
            zp: z(if mamba { n * qw } else { 0 }),
            ys: z(if mamba { n * qw } else { 0 }),
            y: z(n * qw),
            rr: z(n * h),
        };
        // the scratch is shared: big enough for every recurrent layer
        let grow = |v: &mut Vec<f32>, k: usize| {
            if v.len() < k {
                v.resize(k, 0.0)
            }
        };
        grow(&mut s.dy, n * qw);
        grow(&mut s.dop, n * qw);
        grow(&mut s.dqp, n * qw);
        grow(&mut s.dkp, n * kw);
        grow(&mut s.dside, n * hk * ws);
        grow(&mut s.dla, n * hk * dl);
        grow(&mut s.dbeta, n * hk);
        grow(&mut s.dz1, n * rank);
        grow(&mut s.dz, n * zw);
        grow(&mut s.du, if mamba { n * d } else { 0 });
        grow(&mut s.dzp, if mamba { n * qw } else { 0 });
    }

    /// The mixer's forward from a (the normed input, (n, d)) to ô, the
    /// input of W_o (n, h·d_v); q, k, v (after RoPE) kept in `q`, `k`, `v`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fwd(
        &self,
        m: &Fused,
        ly: &Layer,
        p: &Params,
        x_norm: &[f32],
        (q, k, v): (&mut [f32], &mut [f32], &mut [f32]),
        o: &mut [f32],
        r: &mut RecActs,
        (b, t): (usize, usize),
    ) {
        let w = |s: usize| p[s].as_slice();
        let wo = |s: Option<usize>| s.map(|s| p[s].as_slice());
        let (n, d, h, hk, hd) = (b * t, m.d, m.heads, m.kv_heads, m.hd);
        let (qw, kw, g) = (h * hd, hk * hd, h / hk);
        if let Gates::Mamba2 { conv, kernel, .. } = self.gates {
            conv_fwd(x_norm, w(conv.0), w(conv.1), kernel, (b, t, d), &mut r.xc);
            r.u.iter_mut().zip(&r.xc).for_each(|(u, &x)| *u = silu(x).0);
        }
        let inp: &[f32] = if self.mamba() { &r.u } else { x_norm };
        linear(inp, w(ly.q.0), wo(ly.q.1), (n, d, qw), q);
        linear(inp, w(ly.k.0), wo(ly.k.1), (n, d, kw), k);
        linear(inp, w(ly.v.0), wo(ly.v.1), (n, d, kw), v);
        if let Some(rope) = &m.rope {
            rotate_rows(rope, &mut q[..n * qw], qw, hd, t, false);
            rotate_rows(rope, &mut k[..n * kw], kw, hd, t, false);
        }
        let mut scale = 1.0 / (hd as f32).sqrt();
        let (mut qsrc, mut ksrc): (&[f32], &[f32]) = (q, k);
        match &self.gates {
            Gates::Decay { la } => {
                for row in r.la.chunks_exact_mut(hk) {
                    row.copy_from_slice(la);
                }
            }
            Gates::Gla {
                down,
                up,
                rank,
                inv_tau,
            } => {
                linear(inp, w(*down), None, (n, d, *rank), &mut r.z1);
                linear(&r.z1, w(up.0), wo(up.1), (n, *rank, kw), &mut r.z);
                for (l, &z) in r.la.iter_mut().zip(&r.z) {
                    *l = log_sigmoid(z) * inv_tau;
                }
            }
            Gates::Delta { beta, gate } => {
                l2_silu(q, hd, &mut r.qf, &mut r.rq);
                l2_silu(k, hd, &mut r.kf, &mut r.rk);
                (qsrc, ksrc) = (&r.qf, &r.kf);
                linear(inp, w(beta.0), wo(beta.1), (n, d, hk), &mut r.beta);
                r.beta.iter_mut().for_each(|x| *x = sigmoid(*x));
                match gate {
                    Some((gw, inv_tau)) => {
                        linear(inp, w(gw.0), wo(gw.1), (n, d, hk), &mut r.z);
                        for (l, &z) in r.la.iter_mut().zip(&r.z) {
                            *l = log_sigmoid(z) * inv_tau;
                        }
                    }
                    None => r.la.fill(0.0),
                }
            }
            Gates::Mamba2 { dt, a_log, .. } => {
                linear(inp, w(dt.0), wo(dt.1), (n, d, hk), &mut r.z);
                let al = w(*a_log);
                for ((dtr, lar), zr) in r
                    .beta
                    .chunks_exact_mut(hk)
                    .zip(r.la.chunks_exact_mut(hk))
                    .zip(r.z.chunks_exact(hk))
                {
                    for j in 0..hk {
                        let delta = softplus(zr[j] + mamba2::DT_SHIFT as f32);
                        dtr[j] = delta;
                        lar[j] = -delta * al[j].exp();
                    }
                }
                // the key is Δ B
                for ((kf, kr), dtr) in
                    r.kf.chunks_exact_mut(kw)
                        .zip(k.chunks_exact(kw))
                        .zip(r.beta.chunks_exact(hk))
                {
                    for (j, &dj) in dtr.iter().enumerate() {
                        for i in j * hd..(j + 1) * hd {
                            kf[i] = kr[i] * dj;
                        }
                    }
                }
                ksrc = &r.kf;
                scale = 1.0;
            }
        }
        let (ws, dl) = (self.op.side_width(), self.op.d_lambda);
        pack(qsrc, (b, t, h, hd), &mut r.qp, (hd, 0), scale);
        pack(ksrc, (b, t, hk, hd), &mut r.kp, (hd, 0), 1.0);
        pack(v, (b, t, hk, hd), &mut r.side, (ws, 0), 1.0);
        pack(&r.la, (b, t, hk, dl), &mut r.side, (ws, hd), 1.0);
        if self.op.delta {
            pack(&r.beta, (b, t, hk, 1), &mut r.side, (ws, hd + dl), 1.0);
        }
        self.op
            .forward_into(&r.qp, &r.kp, &r.side, t, &mut r.op, Some(&mut r.starts));
        unpack(&r.op, (hd, 0), (b, t, h, hd), &mut r.y, 1.0, false);
        if let Gates::Mamba2 { d_skip, z, .. } = self.gates {
            // y = (o + D v) ⊙ SiLU(W_z a)
            linear(x_norm, w(z), None, (n, d, qw), &mut r.zp);
            let ds = w(d_skip);
            for row in 0..n {
                for (hh, &dh) in ds.iter().enumerate().take(h) {
                    let (at, vt) = (row * qw + hh * hd, row * kw + hh / g * hd);
                    for i in 0..hd {
                        let ys = r.y[at + i] + dh * v[vt + i];
                        r.ys[at + i] = ys;
                        r.y[at + i] = ys * silu(r.zp[at + i]).0;
                    }
                }
            }
        }
        // ŷ = y / rms(y) per head
        for ((yh, oh), rr) in
            r.y.chunks_exact(hd)
                .zip(o[..n * qw].chunks_exact_mut(hd))
                .zip(r.rr.iter_mut())
        {
            let ms = lanes(yh, |_, x| x * x) / hd as f32;
            *rr = 1.0 / (ms + decay::NORM_EPS as f32).sqrt();
            oh.iter_mut().zip(yh).for_each(|(o, &y)| *o = y * *rr);
        }
    }

    /// The backward of `fwd`: from d_o (the gradient of ô) every parameter's
    /// gradient (added to `grads`) and da (set), the gradient of the normed
    /// input. dq, dk, dv: scratch of the q, k, v widths.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bwd(
        &self,
        m: &Fused,
        ly: &Layer,
        p: &Params,
        x_norm: &[f32],
        (q, k, v): (&[f32], &[f32], &[f32]),
        o: &[f32],
        r: &RecActs,
        x: &mut RecScratch,
        d_o: &[f32],
        (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
        da: &mut [f32],
        grads: &mut Params,
        (b, t): (usize, usize),
    ) {
        let w = |s: usize| p[s].as_slice();
        let (n, d, h, hk, hd) = (b * t, m.d, m.heads, m.kv_heads, m.hd);
        let (qw, kw, g) = (h * hd, hk * hd, h / hk);
        let (ws, dl) = (self.op.side_width(), self.op.d_lambda);
        // the norm: dy = r (dŷ − ŷ mean(dŷ ŷ))
        for (((dy, dyh), yh), &rr) in x.dy[..n * qw]
            .chunks_exact_mut(hd)
            .zip(d_o[..n * qw].chunks_exact(hd))
            .zip(o[..n * qw].chunks_exact(hd))
            .zip(&r.rr)
        {
            let mean = lanes(dyh, |i, v| v * yh[i]) / hd as f32;
            for i in 0..hd {
                dy[i] = rr * (dyh[i] - yh[i] * mean);
            }
        }
        // da is set by the first product that writes it
        let mut da_set = false;
        if let Gates::Mamba2 { d_skip, z, .. } = self.gates {
            // y = ys ⊙ SiLU(zp): dys = dy SiLU(zp), dzp = dy ys SiLU'(zp)
            for i in 0..n * qw {
                let (sz, dsz) = silu(r.zp[i]);
                x.dzp[i] = x.dy[i] * r.ys[i] * dsz;
                x.dy[i] *= sz;
            }
            linear_bwd(
                x_norm,
                w(z),
                &x.dzp[..n * qw],
                (n, d, qw),
                &mut grads[z],
                None,
                Some(&mut *da),
                false,
            );
            da_set = true;
            // ys = o + D v: dD += Σ dys v, dv = Σ_heads D dys (then + the
            // recurrence's)
            let ds = w(d_skip);
            let gd = &mut grads[d_skip];
            dv[..n * kw].fill(0.0);
            for row in 0..n {
                for hh in 0..h {
                    let (at, vt) = (row * qw + hh * hd, row * kw + hh / g * hd);
                    let dys = &x.dy[at..at + hd];
                    gd[hh] += lanes(dys, |i, e| e * v[vt + i]);
                    for i in 0..hd {
                        dv[vt + i] += ds[hh] * dys[i];
                    }
                }
            }
        }
        pack(&x.dy, (b, t, h, hd), &mut x.dop, (hd, 0), 1.0);
        self.op.backward_into(
            &r.qp,
            &r.kp,
            &r.side,
            &x.dop[..n * qw],
            t,
            &mut x.dqp[..n * qw],
            &mut x.dkp[..n * kw],
            &mut x.dside[..n * hk * ws],
            Some(&r.starts),
        );
        let scale = if self.mamba() {
            1.0
        } else {
            1.0 / (hd as f32).sqrt()
        };
        unpack(&x.dqp, (hd, 0), (b, t, h, hd), dq, scale, false);
        unpack(&x.dkp, (hd, 0), (b, t, hk, hd), dk, 1.0, false);
        unpack(&x.dside, (ws, 0), (b, t, hk, hd), dv, 1.0, self.mamba());
        unpack(&x.dside, (ws, hd), (b, t, hk, dl), &mut x.dla, 1.0, false);
        if self.op.delta {
            unpack(
                &x.dside,
                (ws, hd + dl),
                (b, t, hk, 1),
                &mut x.dbeta,
                1.0,
                false,
            );
        }
        // features (DeltaNet) and Δ (Mamba2), before RoPE's backward
        match &self.gates {
            Gates::Delta { .. } => {
                l2_silu_bwd(q, &r.qf, &r.rq, hd, &mut dq[..n * qw]);
                l2_silu_bwd(k, &r.kf, &r.rk, hd, &mut dk[..n * kw]);
            }
            Gates::Mamba2 { a_log, .. } => {
                // k' = Δ k, λ = −Δ e^A: dΔ = Σ dk'·k − dλ e^A, dA += dλ λ,
                // dk = Δ dk'; Δ = softplus(z − 4): dz = dΔ σ(z − 4)
                let al = w(*a_log);
                let ga = &mut grads[*a_log];
                for row in 0..n {
                    for j in 0..hk {
                        let (at, ix) = (row * kw + j * hd, row * hk + j);
                        let dkr = &mut dk[at..at + hd];
                        let mut dd = lanes(dkr, |i, e| e * k[at + i]);
                        dd -= x.dla[ix] * al[j].exp();
                        ga[j] += x.dla[ix] * r.la[ix];
                        let delta = r.beta[ix];
                        dkr.iter_mut().for_each(|e| *e *= delta);
                        x.dz[ix] = dd * sigmoid(r.z[ix] + mamba2::DT_SHIFT as f32);
                    }
                }
            }
            _ => {}
        }
        if let Some(rope) = &m.rope {
            rotate_rows(rope, &mut dq[..n * qw], qw, hd, t, true);
            rotate_rows(rope, &mut dk[..n * kw], kw, hd, t, true);
        }
        // the projections, into du (Mamba2) or da
        let inp: &[f32] = if self.mamba() { &r.u } else { x_norm };
        let din: &mut [f32] = if self.mamba() { &mut x.du } else { &mut *da };
        let dys = [(&dq[..], qw), (&dk[..], kw), (&dv[..], kw)];
        qkv_bwd(ly, p, inp, dys, (n, d), din, !self.mamba() && da_set, grads);
        if !self.mamba() {
            da_set = true;
        }
        // the gates
        match &self.gates {
            Gates::Decay { .. } => {}
            Gates::Gla {
                down,
                up,
                rank,
                inv_tau,
            } => {
                log_sigmoid_bwd(&mut x.dz, &x.dla, &r.z, *inv_tau);
                let (gw, gb) = two(grads, up.0, up.1);
                linear_bwd(
                    &r.z1,
                    w(up.0),
                    &x.dz[..n * kw],
                    (n, *rank, kw),
                    gw,
                    gb,
                    Some(&mut x.dz1),
                    false,
                );
                linear_bwd(
                    x_norm,
                    w(*down),
                    &x.dz1[..n * rank],
                    (n, d, *rank),
                    &mut grads[*down],
                    None,
                    Some(&mut *da),
                    da_set,
                );
            }
            Gates::Delta { beta, gate } => {
                // β = σ(·): dβ' = dβ β (1 − β)
                for (db, &bt) in x.dbeta.iter_mut().zip(&r.beta) {
                    *db *= bt * (1.0 - bt);
                }
                let (gw, gb) = two(grads, beta.0, beta.1);
                linear_bwd(
                    x_norm,
                    w(beta.0),
                    &x.dbeta[..n * hk],
                    (n, d, hk),
                    gw,
                    gb,
                    Some(&mut *da),
                    da_set,
                );
                if let Some((gt, inv_tau)) = gate {
                    log_sigmoid_bwd(&mut x.dz, &x.dla, &r.z, *inv_tau);
                    let (gw, gb) = two(grads, gt.0, gt.1);
                    linear_bwd(
                        x_norm,
                        w(gt.0),
                        &x.dz[..n * hk],
                        (n, d, hk),
                        gw,
                        gb,
                        Some(&mut *da),
                        true,
                    );
                }
            }
            Gates::Mamba2 {
                conv, kernel, dt, ..
            } => {
                let (gw, gb) = two(grads, dt.0, dt.1);
                linear_bwd(
                    &r.u,
                    w(dt.0),
                    &x.dz[..n * hk],
                    (n, d, hk),
                    gw,
                    gb,
                    Some(&mut x.du),
                    true,
                );
                // u = SiLU(xc), xc = conv(a)
                for (du, &xc) in x.du[..n * d].iter_mut().zip(&r.xc) {
                    *du *= silu(xc).1;
                }
                let (gw, gb) = two(grads, conv.0, Some(conv.1));
                conv_bwd(
                    x_norm,
                    w(conv.0),
                    &x.du[..n * d],
                    *kernel,
                    (b, t, d),
                    gw,
                    gb.expect("conv bias"),
                    da,
                );
            }
        }
    }
}
