//! The attention zoo against its references (the mechanism pattern): for
//! every mechanism, the chunked / blocked `forward` equals the quadratic
//! `naive` formula, a prefill followed by `step`s equals one `forward`, the
//! past ignores the future, padded keys contribute nothing, and the decode
//! state has its closed-form size whatever the length.

mod common;

use attend::attention::decay::{retnet_gammas, DecayAttention};
use attend::attention::delta::{self, DeltaRule};
use attend::attention::gla::{self, Gla};
use attend::attention::linear::{self, LinearAttention};
use attend::attention::mamba2::{self, Mamba2};
use attend::attention::window::{self, WindowAttention};
use attend::attention::{decay, Heads, MixerState};
use attend::config::*;
use attend::nn::ParamStore;
use candle_core::{DType, Device, Tensor};
use common::*;
use rand::{Rng, SeedableRng};

const LENGTHS: [usize; 4] = [1, 7, 13, 30];
const CHUNK: usize = 8;

/// Inputs of one check as tensors: q (b, h, t, d_qk), k (b, h_kv, t, d_qk),
/// v (b, h_kv, t, d_v), log α (b, h_kv, t, d_qk).
#[derive(Clone)]
struct Tensors {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    la: Tensor,
}

impl Tensors {
    fn narrow(&self, start: usize, len: usize) -> Tensors {
        let n = |x: &Tensor| x.narrow(2, start, len).unwrap().contiguous().unwrap();
        Tensors {
            q: n(&self.q),
            k: n(&self.k),
            v: n(&self.v),
            la: n(&self.la),
        }
    }
}

/// The same inputs as nested vectors, for the naive forms.
struct Nested {
    q: Heads,
    k: Heads,
    v: Heads,
    la: Heads,
}

#[allow(clippy::too_many_arguments)]
fn inputs(
    seed: u64,
    b: usize,
    h: usize,
    h_kv: usize,
    t: usize,
    dqk: usize,
    dv: usize,
    la_range: (f64, f64),
    dtype: DType,
) -> (Nested, Tensors) {
    let mut r = rng(seed);
    let (q, tq) = rand4_scaled(&mut r, (b, h, t, dqk), 1.5, dtype);
    let (k, tk) = rand4_scaled(&mut r, (b, h_kv, t, dqk), 1.5, dtype);
    let (v, tv) = rand4_scaled(&mut r, (b, h_kv, t, dv), 2.0, dtype);
    // log decays in la_range (negative)
    let (u, _) = rand4_scaled(&mut r, (b, h_kv, t, dqk), 1.0, DType::F64);
    let la: Heads = u
        .iter()
        .map(|x| {
            x.iter()
                .map(|x| {
                    x.iter()
                        .map(|x| {
                            x.iter()
                                .map(|u| la_range.0 + (u + 1.0) / 2.0 * (la_range.1 - la_range.0))
                                .collect()
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let flat: Vec<f64> = la.iter().flatten().flatten().flatten().cloned().collect();
    let tla = Tensor::from_vec(flat, (b, h_kv, t, dqk), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    (
        Nested { q, k, v, la },
        Tensors {
            q: tq,
            k: tk,
            v: tv,
            la: tla,
        },
    )
}

/// Sequence 1 of a batch has padding at position 2 and at its last two
/// positions (when it is long enough); sequence 0 has none.
fn padded(bi: usize, j: usize, t: usize) -> bool {
    bi == 1 && t > 4 && (j == 2 || j + 2 >= t)
}

fn padding(b: usize, t: usize) -> Tensor {
    let m: Vec<f32> = (0..b)
        .flat_map(|bi| (0..t).map(move |j| if padded(bi, j, t) { 0.0 } else { 1.0 }))
        .collect();
    Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap()
}

/// A mechanism as the tests drive it.
trait Mixer {
    fn name(&self) -> String;
    fn bidirectional(&self) -> bool;
    /// d of q and k (the feature dimension for linear attention)
    fn qk_dim(&self) -> usize {
        8
    }
    fn forward(
        &self,
        x: &Tensors,
        causal: bool,
        pad: Option<&Tensor>,
        st: Option<&mut MixerState>,
    ) -> Tensor;
    fn step(&self, x: &Tensors, st: &mut MixerState) -> Tensor;
    fn naive(&self, x: &Nested, causal: bool, key_ok: &dyn Fn(usize, usize) -> bool) -> Heads;
    fn state(&self) -> MixerState;
    /// The closed form of the state's bytes for b sequences.
    fn bytes(&self, b: usize, h_kv: usize, dqk: usize, dv: usize, elem: usize) -> usize;
    fn la_range(&self) -> (f64, f64) {
        (-1.0, 0.0)
    }
}

fn recurrent(st: Option<&mut MixerState>) -> Option<&mut linear::RecurrentState> {
    st.map(|s| match s {
        MixerState::Recurrent(r) => r,
        _ => panic!("wrong state"),
    })
}

struct WindowM(WindowAttention);

impl Mixer for WindowM {
    fn name(&self) -> String {
        format!("window w={}", self.0.window)
    }
    fn bidirectional(&self) -> bool {
        true
    }
    fn forward(
        &self,
        x: &Tensors,
        causal: bool,
        pad: Option<&Tensor>,
        st: Option<&mut MixerState>,
    ) -> Tensor {
        let st = st.map(|s| match s {
            MixerState::Window(c) => c,
            _ => panic!("wrong state"),
        });
        self.0.forward(&x.q, &x.k, &x.v, causal, pad, st).unwrap()
    }
    fn step(&self, x: &Tensors, st: &mut MixerState) -> Tensor {
        let MixerState::Window(c) = st else { panic!() };
        self.0.step(&x.q, &x.k, &x.v, c).unwrap()
    }
    fn naive(&self, x: &Nested, causal: bool, key_ok: &dyn Fn(usize, usize) -> bool) -> Heads {
        window::naive(&x.q, &x.k, &x.v, self.0.window, causal, key_ok)
    }
    fn state(&self) -> MixerState {
        MixerState::Window(Default::default())
    }
    fn bytes(&self, b: usize, h_kv: usize, dqk: usize, dv: usize, elem: usize) -> usize {
        // keys and values: 2·b·h_kv·w·d when d_qk = d_v = d
        b * h_kv * self.0.window * (dqk + dv) * elem
    }
}

struct LinearM {
    m: LinearAttention,
    dim: usize,
    projection: Option<Vec<Vec<f64>>>,
}

impl LinearM {
    fn new(map: FeatureMap, dim: usize, dtype: DType) -> Self {
        let store = ParamStore::new(0, dtype, Device::Cpu);
        let cfg = LinearConfig {
            feature_map: map,
            feature_dim: dim,
            n_features: 12,
            chunk: CHUNK,
        };
        let m = LinearAttention::new(&store.builder().pp("layer"), &cfg).unwrap();
        let projection = m
            .projection
            .as_ref()
            .map(|w| w.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap());
        Self { m, dim, projection }
    }
}

impl Mixer for LinearM {
    fn name(&self) -> String {
        format!("linear {:?} d'={}", self.m.feature_map, self.dim)
    }
    fn bidirectional(&self) -> bool {
        true
    }
    fn qk_dim(&self) -> usize {
        self.dim
    }
    fn forward(
        &self,
        x: &Tensors,
        causal: bool,
        pad: Option<&Tensor>,
        st: Option<&mut MixerState>,
    ) -> Tensor {
        self.m
            .forward(&x.q, &x.k, &x.v, causal, pad, recurrent(st))
            .unwrap()
    }
    fn step(&self, x: &Tensors, st: &mut MixerState) -> Tensor {
        self.m
            .step(&x.q, &x.k, &x.v, recurrent(Some(st)).unwrap())
            .unwrap()
    }
    fn naive(&self, x: &Nested, causal: bool, key_ok: &dyn Fn(usize, usize) -> bool) -> Heads {
        let phi = |v: &[f64]| linear::phi_naive(self.m.feature_map, v, self.projection.as_deref());
        linear::naive(&x.q, &x.k, &x.v, &phi, causal, key_ok)
    }
    fn state(&self) -> MixerState {
        MixerState::Recurrent(Default::default())
    }
    fn bytes(&self, b: usize, h_kv: usize, dqk: usize, dv: usize, elem: usize) -> usize {
        b * h_kv * self.m.feature_size(dqk) * (dv + 1) * elem
    }
}

struct DecayM(DecayAttention);

impl Mixer for DecayM {
    fn name(&self) -> String {
        format!("decay {:?}", self.0.gammas)
    }
    fn bidirectional(&self) -> bool {
        false
    }
    fn forward(
        &self,
        x: &Tensors,
        causal: bool,
        pad: Option<&Tensor>,
        st: Option<&mut MixerState>,
    ) -> Tensor {
        assert!(causal);
        self.0
            .forward(&x.q, &x.k, &x.v, pad, recurrent(st))
            .unwrap()
    }
    fn step(&self, x: &Tensors, st: &mut MixerState) -> Tensor {
        self.0
            .step(&x.q, &x.k, &x.v, recurrent(Some(st)).unwrap())
            .unwrap()
    }
    fn naive(&self, x: &Nested, _causal: bool, key_ok: &dyn Fn(usize, usize) -> bool) -> Heads {
        decay::naive(&x.q, &x.k, &x.v, &self.0.gammas, key_ok)
    }
    fn state(&self) -> MixerState {
        MixerState::Recurrent(Default::default())
    }
    fn bytes(&self, b: usize, h_kv: usize, dqk: usize, dv: usize, elem: usize) -> usize {
        b * h_kv * dqk * dv * elem
    }
}

struct GlaM {
    m: Gla,
    la_range: (f64, f64),
}

impl GlaM {
    fn new(h: usize, h_kv: usize, la_range: (f64, f64), dtype: DType) -> Self {
        let store = ParamStore::new(0, dtype, Device::Cpu);
        let model = ModelConfig {
            d_model: 8 * h,
            n_heads: h,
            n_kv_heads: Some(h_kv),
            ..ModelConfig::default()
        };
        let cfg = GlaConfig {
            chunk: CHUNK,
            ..GlaConfig::default()
        };
        Self {
            m: Gla::new(&store.builder(), &cfg, &model).unwrap(),
            la_range,
        }
    }
}

impl Mixer for GlaM {
    fn name(&self) -> String {
        format!("gla log α in {:?}", self.la_range)
    }
    fn bidirectional(&self) -> bool {
        false
    }
    fn forward(
        &self,
        x: &Tensors,
        causal: bool,
        pad: Option<&Tensor>,
        st: Option<&mut MixerState>,
    ) -> Tensor {
        assert!(causal);
        self.m
            .forward(&x.q, &x.k, &x.v, &x.la, pad, recurrent(st))
            .unwrap()
    }
    fn step(&self, x: &Tensors, st: &mut MixerState) -> Tensor {
        self.m
            .step(&x.q, &x.k, &x.v, &x.la, recurrent(Some(st)).unwrap())
            .unwrap()
    }
    fn naive(&self, x: &Nested, _causal: bool, key_ok: &dyn Fn(usize, usize) -> bool) -> Heads {
        gla::naive(&x.q, &x.k, &x.v, &x.la, key_ok)
    }
    fn state(&self) -> MixerState {
        MixerState::Recurrent(Default::default())
    }
    fn bytes(&self, b: usize, h_kv: usize, dqk: usize, dv: usize, elem: usize) -> usize {
        b * h_kv * dqk * dv * elem
    }
    fn la_range(&self) -> (f64, f64) {
        self.la_range
    }
}

/// The delta rule, its β and log α drawn from the test's log-decay
/// tensor (channels 1 and 0), q and k through its feature map.
struct DeltaM {
    m: DeltaRule,
    la_range: (f64, f64),
}

impl DeltaM {
    fn new(h: usize, h_kv: usize, gated: bool, la_range: (f64, f64), dtype: DType) -> Self {
        let store = ParamStore::new(0, dtype, Device::Cpu);
        let model = ModelConfig {
            d_model: 8 * h,
            n_heads: h,
            n_kv_heads: Some(h_kv),
            ..ModelConfig::default()
        };
        let cfg = DeltaConfig {
            gated,
            chunk: CHUNK,
            ..DeltaConfig::default()
        };
        Self {
            m: DeltaRule::new(&store.builder(), &cfg, &model).unwrap(),
            la_range,
        }
    }

    /// (q, k, β, log α) as the mechanism takes them.
    fn prep(&self, x: &Tensors) -> (Tensor, Tensor, Tensor, Tensor) {
        let c1 = x.la.narrow(3, 1, 1).unwrap();
        let beta = candle_nn::ops::sigmoid(&((c1 * 4.0).unwrap() + 2.0).unwrap()).unwrap();
        let la = if self.m.gate.is_some() {
            x.la.narrow(3, 0, 1).unwrap()
        } else {
            beta.zeros_like().unwrap()
        };
        (
            DeltaRule::features(&x.q).unwrap(),
            DeltaRule::features(&x.k).unwrap(),
            beta,
            la,
        )
    }

    /// The same in f64: [b][h_kv][t] for β and log α.
    #[allow(clippy::type_complexity)]
    fn prep_naive(&self, x: &Nested) -> (Heads, Heads, Vec<Vec<Vec<f64>>>, Vec<Vec<Vec<f64>>>) {
        let feat = |v: &Vec<f64>| -> Vec<f64> {
            let s: Vec<f64> = v.iter().map(|&a| a / (1.0 + (-a).exp())).collect();
            let n = (s.iter().map(|a| a * a).sum::<f64>() + delta::L2_EPS).sqrt();
            s.iter().map(|a| a / n).collect()
        };
        let map = |h: &Heads| -> Heads {
            h.iter()
                .map(|b| b.iter().map(|hh| hh.iter().map(feat).collect()).collect())
                .collect()
        };
        let per = |f: &dyn Fn(&Vec<f64>) -> f64| -> Vec<Vec<Vec<f64>>> {
            x.la.iter()
                .map(|b| b.iter().map(|hh| hh.iter().map(f).collect()).collect())
                .collect()
        };
        let gated = self.m.gate.is_some();
        (
            map(&x.q),
            map(&x.k),
            per(&|c| 1.0 / (1.0 + (-(4.0 * c[1] + 2.0)).exp())),
            per(&|c| if gated { c[0] } else { 0.0 }),
        )
    }
}

impl Mixer for DeltaM {
    fn name(&self) -> String {
        format!("{} log α in {:?}", self.m_name(), self.la_range)
    }
    fn bidirectional(&self) -> bool {
        false
    }
    fn forward(
        &self,
        x: &Tensors,
        causal: bool,
        pad: Option<&Tensor>,
        st: Option<&mut MixerState>,
    ) -> Tensor {
        assert!(causal);
        let (q, k, b, la) = self.prep(x);
        self.m
            .forward(&q, &k, &x.v, &b, &la, pad, recurrent(st))
            .unwrap()
    }
    fn step(&self, x: &Tensors, st: &mut MixerState) -> Tensor {
        let (q, k, b, la) = self.prep(x);
        self.m
            .step(&q, &k, &x.v, &b, &la, recurrent(Some(st)).unwrap())
            .unwrap()
    }
    fn naive(&self, x: &Nested, _causal: bool, key_ok: &dyn Fn(usize, usize) -> bool) -> Heads {
        let (q, k, b, la) = self.prep_naive(x);
        delta::naive(&q, &k, &x.v, &b, &la, key_ok, None).0
    }
    fn state(&self) -> MixerState {
        MixerState::Recurrent(Default::default())
    }
    fn bytes(&self, b: usize, h_kv: usize, dqk: usize, dv: usize, elem: usize) -> usize {
        b * h_kv * dqk * dv * elem
    }
    fn la_range(&self) -> (f64, f64) {
        self.la_range
    }
}

impl DeltaM {
    fn m_name(&self) -> &'static str {
        if self.m.gate.is_some() {
            "gated-deltanet"
        } else {
            "deltanet"
        }
    }
}

/// Mamba2's SSD, Δ = e^(channel 1 of the log-decay tensor) and log a its
/// channel 0 (the skip, gate and norm are the layer's: tested there).
struct MambaM(Mamba2);

impl MambaM {
    fn new(h: usize, h_kv: usize, dtype: DType) -> Self {
        let store = ParamStore::new(0, dtype, Device::Cpu);
        let model = ModelConfig {
            d_model: 8 * h,
            n_heads: h,
            n_kv_heads: Some(h_kv),
            ..ModelConfig::default()
        };
        let cfg = Mamba2Config {
            chunk: CHUNK,
            ..Mamba2Config::default()
        };
        Self(Mamba2::new(&store.builder(), &cfg, &model).unwrap())
    }

    fn prep(x: &Tensors) -> (Tensor, Tensor) {
        (
            x.la.narrow(3, 1, 1).unwrap().exp().unwrap(),
            x.la.narrow(3, 0, 1).unwrap(),
        )
    }
}

impl Mixer for MambaM {
    fn name(&self) -> String {
        "mamba2".into()
    }
    fn bidirectional(&self) -> bool {
        false
    }
    fn forward(
        &self,
        x: &Tensors,
        causal: bool,
        pad: Option<&Tensor>,
        st: Option<&mut MixerState>,
    ) -> Tensor {
        assert!(causal);
        let (dt, la) = Self::prep(x);
        self.0
            .forward(&x.q, &x.k, &x.v, &dt, &la, pad, recurrent(st))
            .unwrap()
    }
    fn step(&self, x: &Tensors, st: &mut MixerState) -> Tensor {
        let (dt, la) = Self::prep(x);
        self.0
            .step(&x.q, &x.k, &x.v, &dt, &la, recurrent(Some(st)).unwrap())
            .unwrap()
    }
    fn naive(&self, x: &Nested, _causal: bool, key_ok: &dyn Fn(usize, usize) -> bool) -> Heads {
        let per = |f: &dyn Fn(&Vec<f64>) -> f64| -> Vec<Vec<Vec<f64>>> {
            x.la.iter()
                .map(|b| b.iter().map(|hh| hh.iter().map(f).collect()).collect())
                .collect()
        };
        mamba2::naive(
            &x.q,
            &x.k,
            &x.v,
            &per(&|c| c[1].exp()),
            &per(&|c| c[0]),
            key_ok,
        )
    }
    fn state(&self) -> MixerState {
        MixerState::Recurrent(Default::default())
    }
    fn bytes(&self, b: usize, h_kv: usize, dqk: usize, dv: usize, elem: usize) -> usize {
        b * h_kv * dqk * dv * elem
    }
}

/// Every mechanism, with the head layout (h, h_kv) it is tested in.
fn zoo(h: usize, h_kv: usize, dtype: DType) -> Vec<Box<dyn Mixer>> {
    let mut z: Vec<Box<dyn Mixer>> = vec![];
    for w in [3, 8, 20] {
        z.push(Box::new(WindowM(
            WindowAttention::new(&WindowConfig { window: w }).unwrap(),
        )));
    }
    for map in [
        FeatureMap::Elu,
        FeatureMap::Relu,
        FeatureMap::Taylor,
        FeatureMap::Performer,
    ] {
        z.push(Box::new(LinearM::new(map, 6, dtype)));
    }
    z.push(Box::new(DecayM(
        DecayAttention::new(
            &DecayConfig {
                decay: None,
                chunk: CHUNK,
            },
            h_kv,
        )
        .unwrap(),
    )));
    z.push(Box::new(DecayM(
        DecayAttention::new(
            &DecayConfig {
                decay: Some(0.7),
                chunk: CHUNK,
            },
            h_kv,
        )
        .unwrap(),
    )));
    z.push(Box::new(GlaM::new(h, h_kv, (-1.0, 0.0), dtype)));
    // strong decays: e^(Σ log α) spans ~1e-70 within a chunk; the chunked
    // form must neither overflow nor lose the recent terms
    z.push(Box::new(GlaM::new(h, h_kv, (-20.0, -0.5), dtype)));
    z.push(Box::new(DeltaM::new(h, h_kv, false, (-1.0, 0.0), dtype)));
    z.push(Box::new(DeltaM::new(h, h_kv, true, (-1.0, 0.0), dtype)));
    // strong decays, as for GLA
    z.push(Box::new(DeltaM::new(h, h_kv, true, (-20.0, -0.5), dtype)));
    z.push(Box::new(MambaM::new(h, h_kv, dtype)));
    z
}

const LAYOUTS: [(usize, usize); 3] = [(2, 2), (4, 2), (4, 1)];

#[test]
fn forward_equals_naive_for_every_mechanism() {
    let b = 2;
    for (h, h_kv) in LAYOUTS {
        for m in zoo(h, h_kv, DType::F64) {
            for t in LENGTHS {
                for causal in [true, false] {
                    if !causal && !m.bidirectional() {
                        continue;
                    }
                    for pad in [false, true] {
                        let (x, xt) = inputs(
                            (t * 10 + h * 3 + h_kv) as u64,
                            b,
                            h,
                            h_kv,
                            t,
                            m.qk_dim(),
                            5,
                            m.la_range(),
                            DType::F64,
                        );
                        let p = padding(b, t);
                        let got = to4(&m.forward(&xt, causal, pad.then_some(&p), None));
                        let key_ok = |bi: usize, j: usize| !pad || !padded(bi, j, t);
                        let want = m.naive(&x, causal, &key_ok);
                        let err = rel_err(&got, &want);
                        assert!(
                            err < 1e-9,
                            "{} h {h} h_kv {h_kv} t {t} causal {causal} pad {pad}: relative error {err}",
                            m.name()
                        );
                    }
                }
            }
        }
    }
}

/// The Taylor map's F = 1 + d' + d'² makes a short sequence cheapest as one
/// chunk (the quadratic form) when no state is kept, so the lengths above
/// all run that way; a sequence past the break-even must run chunked, and
/// equal the naive form too (padded, across chunk edges, GQA), in f64 and
/// through the fused kernel in f32.
#[test]
fn taylor_long_sequences_run_chunked_and_equal_naive() {
    let (b, h, h_kv, t) = (2, 4, 2, 61);
    for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 1e-4)] {
        let m = LinearM::new(FeatureMap::Taylor, 6, dtype);
        // F = 43, d_v = 5: break-even 2·43·6 / 12 = 43 tokens
        assert_eq!(m.m.chunk_len(40, 6, 5, false), 40);
        assert_eq!(m.m.chunk_len(t, 6, 5, false), CHUNK);
        assert_eq!(m.m.chunk_len(40, 6, 5, true), CHUNK);
        let (x, xt) = inputs(11, b, h, h_kv, t, 6, 5, m.la_range(), dtype);
        let p = padding(b, t);
        let got = to4(&m.forward(&xt, true, Some(&p), None));
        let want = m.naive(&x, true, &|bi, j| !padded(bi, j, t));
        let err = rel_err(&got, &want);
        assert!(err < tol, "Taylor {dtype:?} t {t}: relative error {err}");
    }
}

#[test]
fn forward_equals_naive_in_f32() {
    let (b, h, h_kv, t) = (2, 4, 2, 30);
    for m in zoo(h, h_kv, DType::F32) {
        let (x, xt) = inputs(5, b, h, h_kv, t, m.qk_dim(), 5, m.la_range(), DType::F32);
        let p = padding(b, t);
        let got = m.forward(&xt, true, Some(&p), None);
        assert_eq!(got.dtype(), DType::F32);
        let want = m.naive(&x, true, &|bi, j| !padded(bi, j, t));
        let err = rel_err(&to4(&got), &want);
        assert!(err < 1e-4, "{}: relative error {err}", m.name());
    }
}

#[test]
fn prefill_then_steps_equals_forward() {
    let (b, t) = (2, 30);
    for (h, h_kv) in LAYOUTS {
        for m in zoo(h, h_kv, DType::F64) {
            let (_, xt) = inputs(7, b, h, h_kv, t, m.qk_dim(), 5, m.la_range(), DType::F64);
            let full = m.forward(&xt, true, None, None);
            // prefills of 5 then 4 tokens (the second continues the state),
            // then one token at a time
            let mut st = m.state();
            let mut parts = vec![
                m.forward(&xt.narrow(0, 5), true, None, Some(&mut st)),
                m.forward(&xt.narrow(5, 4), true, None, Some(&mut st)),
            ];
            let mut bytes = vec![];
            for i in 9..t {
                parts.push(m.step(&xt.narrow(i, 1), &mut st));
                bytes.push(st.state_bytes());
            }
            let inc = Tensor::cat(&parts, 2).unwrap();
            let err = rel_err(&to4(&inc), &to4(&full));
            assert!(
                err < 1e-9,
                "{} h {h} h_kv {h_kv}: relative error {err}",
                m.name()
            );
            // a fixed-size state, of the closed-form size, after any number of tokens
            let want = m.bytes(b, h_kv, m.qk_dim(), 5, 8);
            assert!(
                bytes.iter().all(|&x| x == want),
                "{}: {bytes:?} vs {want}",
                m.name()
            );
            // steps from an empty state equal the forward too
            let mut st = m.state();
            let steps: Vec<Tensor> = (0..t).map(|i| m.step(&xt.narrow(i, 1), &mut st)).collect();
            let err = rel_err(&to4(&Tensor::cat(&steps, 2).unwrap()), &to4(&full));
            assert!(err < 1e-9, "{} steps only: relative error {err}", m.name());
            assert_eq!(st.state_bytes(), want, "{}", m.name());
        }
    }
}

#[test]
fn beam_select_reorders_every_state() {
    let (b, h, h_kv, t) = (2, 4, 2, 11);
    for m in zoo(h, h_kv, DType::F64) {
        let (_, xt) = inputs(8, b, h, h_kv, t, m.qk_dim(), 5, m.la_range(), DType::F64);
        let mut st = m.state();
        m.forward(&xt.narrow(0, 10), true, None, Some(&mut st));
        // swap the two sequences in the state and in the next input
        st.select(&Tensor::new(&[1u32, 0], &Device::Cpu).unwrap())
            .unwrap();
        let swap = |x: &Tensor| {
            x.index_select(&Tensor::new(&[1u32, 0], &Device::Cpu).unwrap(), 0)
                .unwrap()
        };
        let last = xt.narrow(10, 1);
        let swapped = Tensors {
            q: swap(&last.q),
            k: swap(&last.k),
            v: swap(&last.v),
            la: swap(&last.la),
        };
        let y = swap(&m.step(&swapped, &mut st));
        let full = m.forward(&xt, true, None, None).narrow(2, 10, 1).unwrap();
        let err = rel_err(&to4(&y), &to4(&full));
        assert!(err < 1e-9, "{}: {err}", m.name());
    }
}

#[test]
fn the_past_ignores_the_future() {
    let (b, h, h_kv, t) = (2, 4, 2, 30);
    for m in zoo(h, h_kv, DType::F64) {
        let (_, a) = inputs(9, b, h, h_kv, t, m.qk_dim(), 5, m.la_range(), DType::F64);
        let (_, other) = inputs(10, b, h, h_kv, t, m.qk_dim(), 5, m.la_range(), DType::F64);
        // positions 17.. replaced
        let mix = |x: &Tensor, y: &Tensor| {
            Tensor::cat(
                &[
                    x.narrow(2, 0, 17).unwrap(),
                    y.narrow(2, 17, t - 17).unwrap(),
                ],
                2,
            )
            .unwrap()
        };
        let c = Tensors {
            q: mix(&a.q, &other.q),
            k: mix(&a.k, &other.k),
            v: mix(&a.v, &other.v),
            la: mix(&a.la, &other.la),
        };
        let (ya, yc) = (
            m.forward(&a, true, None, None),
            m.forward(&c, true, None, None),
        );
        let early = max_abs_diff(&ya.narrow(2, 0, 17).unwrap(), &yc.narrow(2, 0, 17).unwrap());
        let late = max_abs_diff(
            &ya.narrow(2, 17, 13).unwrap(),
            &yc.narrow(2, 17, 13).unwrap(),
        );
        assert!(
            early == 0.0,
            "{}: the future changed the past by {early}",
            m.name()
        );
        assert!(late > 1e-6, "{}: the future changed nothing", m.name());
    }
}

#[test]
fn padded_keys_contribute_nothing() {
    // huge values at padded positions: any leak would show
    let (b, h, h_kv, t) = (2, 4, 2, 13);
    for m in zoo(h, h_kv, DType::F64) {
        let (_, x) = inputs(11, b, h, h_kv, t, m.qk_dim(), 5, m.la_range(), DType::F64);
        let pad = padding(b, t);
        let blow = |x: &Tensor| {
            let m = pad
                .to_dtype(DType::F64)
                .unwrap()
                .reshape((b, 1, t, 1))
                .unwrap();
            // x where padded is 0 -> x; where padded -> x * 1e3 + 7
            let scale = ((1.0 - &m).unwrap() * 999.0).unwrap() + 1.0;
            let shift = ((1.0 - &m).unwrap() * 7.0).unwrap();
            x.broadcast_mul(&scale.unwrap())
                .unwrap()
                .broadcast_add(&shift)
                .unwrap()
        };
        let y = Tensors {
            q: x.q.clone(),
            k: blow(&x.k),
            v: blow(&x.v),
            la: x.la.clone(),
        };
        for causal in [true, false] {
            if !causal && !m.bidirectional() {
                continue;
            }
            let (ya, yb) = (
                m.forward(&x, causal, Some(&pad), None),
                m.forward(&y, causal, Some(&pad), None),
            );
            let d = max_abs_diff(&ya, &yb);
            assert!(
                d < 1e-9,
                "{} causal {causal}: padded keys leaked {d}",
                m.name()
            );
        }
    }
}

#[test]
fn performer_features_approximate_softmax_weights() {
    // E[φ(q)·φ(k)] = exp(q·k/√d'): with many features the estimate is close
    let d = 4;
    let w = linear::performer_projection(4096, d, 3);
    let mut r = rng(4);
    for _ in 0..5 {
        let q: Vec<f64> = (0..d).map(|_| r.random_range(-0.7..0.7)).collect();
        let k: Vec<f64> = (0..d).map(|_| r.random_range(-0.7..0.7)).collect();
        let fq = linear::phi_naive(FeatureMap::Performer, &q, Some(&w));
        let fk = linear::phi_naive(FeatureMap::Performer, &k, Some(&w));
        let est: f64 = fq.iter().zip(&fk).map(|(a, b)| a * b).sum();
        let exact = (q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()).exp();
        assert!((est / exact - 1.0).abs() < 0.05, "{est} vs {exact}");
    }
    // the Taylor map is exactly 1 + x + x²/2 of x = q·k/√d'
    let q = [0.3, -0.2, 0.5, 0.1];
    let k = [-0.4, 0.6, 0.2, 0.3];
    let f = |x: &[f64]| linear::phi_naive(FeatureMap::Taylor, x, None);
    let dot: f64 = f(&q).iter().zip(f(&k)).map(|(a, b)| a * b).sum();
    let x = q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>() / 2.0;
    assert!((dot - (1.0 + x + x * x / 2.0)).abs() < 1e-12);
}

#[test]
fn retnet_default_decays() {
    let g = retnet_gammas(4);
    let want = [
        1.0 - 1.0 / 32.0,
        1.0 - 1.0 / 64.0,
        1.0 - 1.0 / 128.0,
        1.0 - 1.0 / 256.0,
    ];
    for (a, b) in g.iter().zip(want) {
        assert!((a - b).abs() < 1e-15, "{g:?}");
    }
}

// ---------------------------------------------------------------------------
// The whole layer: projections, BASED's convolution and window projections,
// GLA's gates and W_o, against the same computed in f64 loops.

use attend::attention::{based, softmax, Attention, Mechanism};
use attend::nn::{Linear, Weight};

/// (W (out, in), b) of a dense linear layer.
fn weights(l: &Linear) -> (Vec<Vec<f64>>, Option<Vec<f64>>) {
    let Weight::Dense(w) = &l.w else {
        panic!("dense weights expected")
    };
    let w = w.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let b =
        l.b.as_ref()
            .map(|b| b.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap());
    (w, b)
}

/// x [b][t][in] -> [b][t][out]
fn project(l: &Linear, x: &[Vec<Vec<f64>>]) -> Vec<Vec<Vec<f64>>> {
    let (w, b) = weights(l);
    x.iter()
        .map(|seq| {
            seq.iter()
                .map(|xt| {
                    w.iter()
                        .enumerate()
                        .map(|(o, row)| {
                            row.iter().zip(xt).map(|(a, b)| a * b).sum::<f64>()
                                + b.as_ref().map_or(0.0, |b| b[o])
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// [b][t][heads·d] -> [b][heads][t][d]
fn heads(x: &[Vec<Vec<f64>>], n: usize) -> Heads {
    x.iter()
        .map(|seq| {
            let d = seq[0].len() / n;
            (0..n)
                .map(|h| {
                    seq.iter()
                        .map(|xt| xt[h * d..(h + 1) * d].to_vec())
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// [b][heads][t][d] -> [b][t][heads·d]
fn merge(y: &Heads) -> Vec<Vec<Vec<f64>>> {
    y.iter()
        .map(|hs| {
            (0..hs[0].len())
                .map(|t| hs.iter().flat_map(|h| h[t].clone()).collect())
                .collect()
        })
        .collect()
}

/// The layer in f64 loops (no positions: RoPE is checked by the decoding
/// tests and `position`'s own).
fn naive_layer(
    a: &Attention,
    x: &[Vec<Vec<f64>>],
    key_ok: &dyn Fn(usize, usize) -> bool,
) -> Vec<Vec<Vec<f64>>> {
    let (h, h_kv) = (a.n_heads, a.n_kv_heads);
    let causal = a.causal;
    let u = match &a.mechanism {
        Mechanism::Based(m) => {
            let w = m
                .conv
                .weight
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap();
            let bias = m
                .conv
                .bias
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            based::naive_conv(x, &w, &bias, key_ok)
        }
        _ => x.to_vec(),
    };
    let q = heads(&project(&a.q_proj, &u), h);
    let k = heads(&project(&a.k_proj, &u), h_kv);
    let v = heads(&project(&a.v_proj, &u), h_kv);
    let y = match &a.mechanism {
        Mechanism::Softmax => softmax::naive(
            &q,
            &k,
            &v,
            &|bi, i, j| (!causal || j <= i) && key_ok(bi, j),
            &|_, _, _| 0.0,
        ),
        Mechanism::Window(m) => window::naive(&q, &k, &v, m.window, causal, key_ok),
        Mechanism::Linear(m) => {
            let p = m
                .projection
                .as_ref()
                .map(|w| w.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap());
            let phi = |x: &[f64]| linear::phi_naive(m.feature_map, x, p.as_deref());
            linear::naive(&q, &k, &v, &phi, causal, key_ok)
        }
        Mechanism::Decay(m) => decay::naive(&q, &k, &v, &m.gammas, key_ok),
        Mechanism::Gla(m) => {
            let z = project(&m.gate_up, &project(&m.gate_down, x));
            let log_sigmoid = |z: f64| -(1.0 + (-z).exp()).ln();
            let la: Vec<Vec<Vec<f64>>> = z
                .iter()
                .map(|s| {
                    s.iter()
                        .map(|zt| zt.iter().map(|&z| log_sigmoid(z) / m.tau).collect())
                        .collect()
                })
                .collect();
            gla::naive(&q, &k, &v, &heads(&la, h_kv), key_ok)
        }
        Mechanism::Mamba2(m) => {
            let w = m
                .conv
                .weight
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap();
            let bias = m
                .conv
                .bias
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let silu = |a: f64| a / (1.0 + (-a).exp());
            let u: Vec<Vec<Vec<f64>>> = based::naive_conv(x, &w, &bias, key_ok)
                .into_iter()
                .map(|s| {
                    s.into_iter()
                        .map(|r| r.into_iter().map(silu).collect())
                        .collect()
                })
                .collect();
            let (c, bm, xs) = (
                heads(&project(&a.q_proj, &u), h),
                heads(&project(&a.k_proj, &u), h_kv),
                heads(&project(&a.v_proj, &u), h_kv),
            );
            let a_log = m
                .a_log
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let d_skip = m
                .d_skip
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let softplus = |z: f64| (1.0 + z.exp()).ln();
            let dtz = project(&m.dt, &u);
            let dt: Vec<Vec<Vec<f64>>> = dtz
                .iter()
                .map(|s| {
                    (0..h_kv)
                        .map(|kv| {
                            s.iter()
                                .map(|r| softplus(r[kv] + mamba2::DT_SHIFT))
                                .collect()
                        })
                        .collect()
                })
                .collect();
            let la: Vec<Vec<Vec<f64>>> = dt
                .iter()
                .map(|b| {
                    b.iter()
                        .enumerate()
                        .map(|(kv, r)| r.iter().map(|d| -d * a_log[kv].exp()).collect())
                        .collect()
                })
                .collect();
            let y = mamba2::naive(&c, &bm, &xs, &dt, &la, key_ok);
            let z = heads(&project(&m.z_proj, x), h);
            let out: Heads = y
                .iter()
                .enumerate()
                .map(|(bi, hs)| {
                    hs.iter()
                        .enumerate()
                        .map(|(hi, rows)| {
                            let kv = hi / (h / h_kv);
                            rows.iter()
                                .enumerate()
                                .map(|(t, yr)| {
                                    mamba2::naive_output(
                                        yr,
                                        &xs[bi][kv][t],
                                        d_skip[hi],
                                        &z[bi][hi][t],
                                    )
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect();
            return project(&a.o_proj, &merge(&out));
        }
        Mechanism::Delta(m) => {
            let feat = |v: &Vec<f64>| -> Vec<f64> {
                let s: Vec<f64> = v.iter().map(|&a| a / (1.0 + (-a).exp())).collect();
                let n = (s.iter().map(|a| a * a).sum::<f64>() + delta::L2_EPS).sqrt();
                s.iter().map(|a| a / n).collect()
            };
            let map = |h: &Heads| -> Heads {
                h.iter()
                    .map(|b| b.iter().map(|hh| hh.iter().map(feat).collect()).collect())
                    .collect()
            };
            // per kv head and position: [b][h_kv][t]
            let per_head = |z: Vec<Vec<Vec<f64>>>, f: &dyn Fn(f64) -> f64| -> Vec<Vec<Vec<f64>>> {
                z.iter()
                    .map(|s| {
                        (0..h_kv)
                            .map(|kv| s.iter().map(|zt| f(zt[kv])).collect())
                            .collect()
                    })
                    .collect()
            };
            let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
            let beta = per_head(project(&m.beta, x), &sigmoid);
            let la = match &m.gate {
                Some((g, tau)) => per_head(project(g, x), &|z| sigmoid(z).ln() / tau),
                None => per_head(project(&m.beta, x), &|_| 0.0),
            };
            delta::naive(&map(&q), &map(&k), &v, &beta, &la, key_ok, None).0
        }
        Mechanism::Based(m) => match &m.window {
            Some(w) => {
                let qw = heads(&project(&w.q_win, &u), h);
                let kw = heads(&project(&w.k_win, &u), h_kv);
                based::naive(&q, &k, &qw, &kw, &v, w.attn.window, causal, key_ok)
            }
            None => based::naive(&q, &k, &q, &k, &v, 0, causal, key_ok),
        },
    };
    project(&a.o_proj, &merge(&y))
}

#[test]
fn layer_forward_equals_naive_for_every_mechanism() {
    let specs = [
        "softmax",
        "window:w=3",
        "linear:map=elu,dim=6,chunk=4",
        "linear:map=relu,dim=4,chunk=5",
        "linear:map=taylor,dim=3,chunk=4",
        "linear:map=performer,dim=4,m=10,chunk=4",
        "based:dim=3,w=3,conv=3,chunk=4",
        "based:dim=2,w=5,conv=1,chunk=4",
        "based:dim=3,w=0,conv=3,chunk=4",
        "decay:chunk=4",
        "decay:gamma=0.6,chunk=5",
        "gla:rank=3,chunk=4",
        "gla:rank=2,tau=3,chunk=3",
        "deltanet:chunk=4",
        "gated-deltanet:tau=3,chunk=5",
        "mamba2:conv=3,chunk=4",
        "mamba2:conv=1,chunk=5",
    ];
    let (b, t) = (2, 13);
    // built past the config's validation, a causal-only mechanism refuses
    // to run bidirectionally
    for spec in ["decay", "gla", "deltanet", "gated-deltanet", "mamba2"] {
        let mech: MechanismConfig = spec.parse().unwrap();
        let cfg = tiny(Shape::Decoder);
        let store = ParamStore::new(1, DType::F32, Device::Cpu);
        let attn = Attention::new(&store.builder(), &cfg, &mech, false, true, None).unwrap();
        let x = Tensor::zeros((1, 3, cfg.d_model), DType::F32, &Device::Cpu).unwrap();
        let e = attn
            .forward_graph(&x, 0, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(spec) && e.contains("causal only"), "{e}");
    }
    for spec in specs {
        let mech: MechanismConfig = spec.parse().unwrap();
        for kv in [4, 2] {
            for causal in [true, false] {
                if !causal && !mech.supports_bidirectional() {
                    continue;
                }
                let cfg = ModelConfig {
                    mechanism: mech.clone(),
                    n_kv_heads: Some(kv),
                    position: PositionKind::None,
                    ..tiny(Shape::Decoder)
                };
                let store = ParamStore::new(21, DType::F64, Device::Cpu);
                let attn =
                    Attention::new(&store.builder().pp("attn"), &cfg, &mech, causal, true, None)
                        .unwrap();
                let (xv, xt) = rand4_scaled(&mut rng(22), (1, b, t, cfg.d_model), 1.0, DType::F64);
                let x = xt.squeeze(0).unwrap();
                let pad = padding(b, t);
                let got = attn.forward_graph(&x, 0, Some(&pad), None).unwrap();
                let want = naive_layer(&attn, &xv[0], &|bi, j| !padded(bi, j, t));
                let want_t = Tensor::new(want, &Device::Cpu).unwrap();
                let err = max_abs_diff(&got, &want_t)
                    / want_t
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                assert!(
                    err < 1e-9,
                    "{spec} kv {kv} causal {causal}: relative error {err}"
                );
            }
        }
    }
}

/// As fla checks its delta-rule kernels: the final state of the chunked
/// form against the recurrence's, from zero and continuing from a state,
/// and a state that keeps an association: written once at key k, read
/// back at k (the delta rule's fast-weight memory).
#[test]
fn delta_rule_final_states_match_the_recurrence() {
    let (b, h, h_kv, t, d) = (2, 4, 2, 21, 8);
    for gated in [false, true] {
        let m = DeltaM::new(h, h_kv, gated, (-0.5, 0.0), DType::F64);
        let (nested, tensors) = inputs(31, b, h, h_kv, t, d, d, (-0.5, 0.0), DType::F64);
        let (q, k, beta, la) = m.prep_naive(&nested);
        let (_, want) = delta::naive(&q, &k, &nested.v, &beta, &la, &|_, _| true, None);
        // the first 9 tokens, then the other 12 from the state they left
        let mut st = MixerState::Recurrent(Default::default());
        m.forward(&tensors.narrow(0, 9), true, None, Some(&mut st));
        let y2 = m.forward(&tensors.narrow(9, t - 9), true, None, Some(&mut st));
        let MixerState::Recurrent(r) = &st else {
            unreachable!()
        };
        let got = to4(&r.s.clone().unwrap());
        for (bi, heads) in want.iter().enumerate() {
            for (kv, s) in heads.iter().enumerate() {
                for (row, w) in s.iter().enumerate() {
                    for (c, w) in w.iter().enumerate() {
                        let g = got[bi][kv][row][c];
                        assert!(
                            (g - w).abs() < 1e-10,
                            "gated {gated}: S[{bi}][{kv}][{row}][{c}] {g} vs {w}"
                        );
                    }
                }
            }
        }
        let whole = delta::naive(&q, &k, &nested.v, &beta, &la, &|_, _| true, None).0;
        let y2 = to4(&y2);
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..t - 9 {
                    for c in 0..d {
                        assert!((y2[bi][hi][i][c] - whole[bi][hi][i + 9][c]).abs() < 1e-9);
                    }
                }
            }
        }
    }
    // one association, β = 1: S = k vᵀ, read at k gives v (‖k‖ = 1)
    let k = vec![vec![vec![vec![0.6, 0.8]]]];
    let v = vec![vec![vec![vec![3.0, -1.0, 2.0]]]];
    let (_, s) = delta::naive(
        &k,
        &k,
        &v,
        &[vec![vec![1.0]]],
        &[vec![vec![0.0]]],
        &|_, _| true,
        None,
    );
    let read: Vec<f64> = (0..3)
        .map(|c| 0.6 * s[0][0][0][c] + 0.8 * s[0][0][1][c])
        .collect();
    assert!(
        read.iter()
            .zip(&v[0][0][0])
            .all(|(a, b)| (a - b).abs() < 1e-12),
        "{read:?}"
    );
    // writing a new value at the same key replaces the old one
    let k2 = vec![vec![vec![vec![0.6, 0.8], vec![0.6, 0.8]]]];
    let v2 = vec![vec![vec![vec![3.0, -1.0, 2.0], vec![5.0, 0.0, 1.0]]]];
    let (_, s) = delta::naive(
        &k2,
        &k2,
        &v2,
        &[vec![vec![1.0, 1.0]]],
        &[vec![vec![0.0, 0.0]]],
        &|_, _| true,
        None,
    );
    let read: Vec<f64> = (0..3)
        .map(|c| 0.6 * s[0][0][0][c] + 0.8 * s[0][0][1][c])
        .collect();
    assert!(
        read.iter()
            .zip(&[5.0, 0.0, 1.0])
            .all(|(a, b)| (a - b).abs() < 1e-12),
        "{read:?}"
    );
}

/// The fused recurrence (`kernels::recurrence`, forward and backward by
/// hand) against the same recurrence written token by token in candle ops,
/// differentiated by autograd: outputs and the gradients of every input,
/// for a decay per key channel or one scalar, with and without the delta
/// rule, two query heads per kv head.
#[test]
fn fused_recurrence_gradients_equal_autograd_of_the_recurrence() {
    use attend::kernels::recurrence::fused_recurrence;
    use candle_core::Var;
    let dev = Device::Cpu;
    let (b, h, h_kv, t, dk, dv) = (2, 4, 2, 37, 3, 5); // t: blocks of 16 and a partial one
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut rand = |shape: &[usize], lo: f64, hi: f64| {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
    };
    for (d_lambda, delta) in [(dk, false), (1, false), (1, true), (dk, true)] {
        let q = rand(&[b, h, t, dk], -1.0, 1.0);
        let k = rand(&[b, h_kv, t, dk], -0.7, 0.7);
        let v = rand(&[b, h_kv, t, dv], -1.0, 1.0);
        let la = rand(&[b, h_kv, t, d_lambda], -0.8, 0.0);
        let beta = rand(&[b, h_kv, t, 1], 0.1, 0.9);
        let w = rand(&[b, h, t, dv], -1.0, 1.0);
        let fused = fused_recurrence(&q, &k, &v, &la, delta.then_some(beta.as_tensor())).unwrap();
        // the reference: S (b, h_kv, d_k, d_v), q's g heads read the state of their kv head
        let g = h / h_kv;
        let mut s = Tensor::zeros((b, h_kv, dk, dv), DType::F64, &dev).unwrap();
        let mut outs = vec![];
        for i in 0..t {
            let at = |x: &Tensor| x.narrow(2, i, 1).unwrap(); // (b, ·, 1, d)
            let (ki, vi) = (at(&k), at(&v));
            let decay = at(&la).exp().unwrap().transpose(2, 3).unwrap(); // (b, h_kv, d_λ, 1)
            s = s.broadcast_mul(&decay).unwrap();
            let u = if delta {
                let r = ki.matmul(&s).unwrap(); // (b, h_kv, 1, d_v)
                (vi - r).unwrap().broadcast_mul(&at(&beta)).unwrap()
            } else {
                vi
            };
            s = (s + ki.transpose(2, 3).unwrap().matmul(&u).unwrap()).unwrap();
            let qi = at(&q).reshape((b, h_kv, g, dk)).unwrap();
            outs.push(qi.matmul(&s).unwrap().reshape((b, h, 1, dv)).unwrap());
        }
        let want = Tensor::cat(&outs, 2).unwrap();
        let case = format!("d_λ {d_lambda}, delta {delta}");
        assert!(
            max_abs_diff(&fused, &want) < 1e-12,
            "{case}: outputs differ"
        );
        let loss = |o: &Tensor| (o * w.as_tensor()).unwrap().sum_all().unwrap();
        let (gf, gw) = (
            loss(&fused).backward().unwrap(),
            loss(&want).backward().unwrap(),
        );
        let mut inputs = vec![("q", &q), ("k", &k), ("v", &v), ("log decay", &la)];
        if delta {
            inputs.push(("beta", &beta));
        }
        for (name, x) in inputs {
            let (a, e) = (gf.get(x).unwrap(), gw.get(x).unwrap());
            let scale = e.abs().unwrap().max_keepdim(3).unwrap().max_all().unwrap();
            let scale = scale.to_scalar::<f64>().unwrap().max(1e-3);
            let d = max_abs_diff(a, e);
            assert!(d < 1e-10 * scale.max(1.0), "{case}: d{name} differs by {d}");
        }
    }
}
