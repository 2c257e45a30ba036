//! Cheaper models without retraining (issue 15): sublayers dropped for
//! good (LLM-Drop, FinerCut), FFNs skipped per token (FFN-SkipLLM), and the
//! similarity probe that ranks sublayers by how little they change the
//! residual stream.
//!
//! All three act inside `Transformer::run`, so every path — prefill,
//! decode steps, batched serving steps, perplexity — sees the same model:
//!
//! * `Prune::drop` (a [`Skip`]) leaves sublayers out of every pass; a
//!   dropped attention sublayer's KV cache never sees a token.
//! * `Prune::ffn_skip` ([`FfnSkip`]): per token, walking up the layers, the
//!   cosine similarity of the residual stream before and after each FFN is
//!   measured; once it reaches the threshold the token's FFNs are
//!   "saturated" and the next ones are skipped (FFN-SkipLLM's greedy
//!   rule). Never the first or last layers, never a token of the warm-up
//!   (the first positions of a sequence, which the attention sink leans
//!   on). `ratio=r` fixes the count: each token skips r·L FFNs, starting
//!   where it saturates, or as late as still fits if it never does.
//! * `Prune::probe` ([`Probe`]) records the mean cos(input, output) of
//!   every sublayer on calibration text; [`Probe::rank`] orders them most
//!   redundant first (the ranking `--drop-auto` drops from).

use super::Skip;
use crate::error::{Error, Result};
use std::sync::{Arc, Mutex};

/// What a model leaves out (see the module doc). The default is nothing.
#[derive(Clone, Debug, Default)]
pub struct Prune {
    /// Sublayers never computed.
    pub drop: Skip,
    /// Per-token FFN skipping.
    pub ffn_skip: Option<FfnSkip>,
    /// Counts of FFNs computed and skipped under `ffn_skip` (shared by
    /// clones of the model).
    pub stats: Arc<SkipStats>,
    /// When set, every pass records its sublayers' similarities here.
    pub probe: Option<Arc<Probe>>,
}

impl Prune {
    /// Whether anything is left out or measured.
    pub fn active(&self) -> bool {
        self.drop.count() > 0 || self.ffn_skip.is_some() || self.probe.is_some()
    }
}

/// FFN-SkipLLM's rule: `--ffn-skip threshold=T[,warmup=W]` or
/// `--ffn-skip ratio=R[,threshold=T][,warmup=W]`.
#[derive(Clone, Debug, PartialEq)]
pub struct FfnSkip {
    /// A token's FFNs are saturated once cos(in, out) of one reaches this.
    pub threshold: f32,
    /// FFNs each token skips (`ratio` × layers); `None`: every FFN after
    /// saturation up to the last layer.
    pub per_token: Option<usize>,
    /// The ratio asked for, as given.
    pub ratio: Option<f32>,
    /// Positions 0..warmup are never skipped.
    pub warmup: usize,
}

impl FfnSkip {
    /// The default threshold of `ratio=` and of a bare `threshold`.
    pub const THRESHOLD: f32 = 0.95;
    /// The default warm-up.
    pub const WARMUP: usize = 8;

    /// Parse a spec for a model of `layers` layers.
    pub fn parse(spec: &str, layers: usize) -> Result<Self> {
        let bad = |m: String| Error::msg(format!("--ffn-skip: {m}"));
        let (mut threshold, mut ratio, mut warmup) = (None, None, Self::WARMUP);
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                bad(format!(
                    "`{part}`: expected key=value (threshold=, ratio=, warmup=)"
                ))
            })?;
            let num = |what: &str| -> Result<f64> {
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| bad(format!("{what}: `{v}` is not a number")))
            };
            match k.trim() {
                "threshold" => {
                    let t = num("threshold")?;
                    if !(-1.0..=1.0).contains(&t) {
                        return Err(bad(format!(
                            "threshold {t} is outside [-1, 1] (a cosine similarity)"
                        )));
                    }
                    threshold = Some(t as f32);
                }
                "ratio" => {
                    let r = num("ratio")?;
                    if !(0.0..=1.0).contains(&r) {
                        return Err(bad(format!("ratio {r} is outside [0, 1]")));
                    }
                    ratio = Some(r as f32);
                }
                "warmup" => {
                    warmup = v
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("warmup: `{v}` is not a count of tokens")))?
                }
                other => {
                    return Err(bad(format!(
                        "unknown key `{other}` (threshold=, ratio=, warmup=)"
                    )))
                }
            }
        }
        if threshold.is_none() && ratio.is_none() {
            return Err(bad("give threshold=T or ratio=R".into()));
        }
        let hot = layers.saturating_sub(2);
        let per_token = ratio.map(|r| ((r as f64 * layers as f64).round() as usize).min(hot));
        Ok(Self {
            threshold: threshold.unwrap_or(Self::THRESHOLD),
            per_token,
            ratio,
            warmup,
        })
    }
}

impl std::fmt::Display for FfnSkip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(r) = self.ratio {
            write!(f, "ratio={r},")?;
        }
        write!(f, "threshold={},warmup={}", self.threshold, self.warmup)
    }
}

/// FFN evaluations of every pass since the last `take`, per layer.
#[derive(Debug, Default)]
pub struct SkipStats {
    computed: Mutex<Vec<u64>>,
    skipped: Mutex<Vec<u64>>,
}

/// A snapshot of `SkipStats`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SkipCounts {
    /// Per layer: token rows whose FFN ran, and whose FFN was skipped.
    pub computed: Vec<u64>,
    pub skipped: Vec<u64>,
}

impl SkipCounts {
    /// Skipped FFNs over all FFN evaluations (0 when none).
    pub fn share(&self) -> f64 {
        let s: u64 = self.skipped.iter().sum();
        let c: u64 = self.computed.iter().sum();
        if s + c == 0 {
            0.0
        } else {
            s as f64 / (s + c) as f64
        }
    }
}

impl SkipStats {
    pub(crate) fn add(&self, layer: usize, computed: u64, skipped: u64) {
        let bump = |v: &Mutex<Vec<u64>>, n: u64| {
            let mut v = v.lock().unwrap_or_else(|e| e.into_inner());
            if v.len() <= layer {
                v.resize(layer + 1, 0);
            }
            v[layer] += n;
        };
        bump(&self.computed, computed);
        bump(&self.skipped, skipped);
    }

    /// The counts so far, and start again from zero.
    pub fn take(&self) -> SkipCounts {
        self.counts(std::mem::take)
    }

    /// The counts so far.
    pub fn snapshot(&self) -> SkipCounts {
        self.counts(|v| v.clone())
    }

    fn counts(&self, get: impl Fn(&mut Vec<u64>) -> Vec<u64>) -> SkipCounts {
        let read = |v: &Mutex<Vec<u64>>| get(&mut v.lock().unwrap_or_else(|e| e.into_inner()));
        let (mut computed, mut skipped) = (read(&self.computed), read(&self.skipped));
        let n = computed.len().max(skipped.len());
        computed.resize(n, 0);
        skipped.resize(n, 0);
        SkipCounts { computed, skipped }
    }
}

/// One pass's per-token skipping state: for each token row, whether its
/// FFNs have saturated and how many it may still skip.
pub(crate) struct RowSkip<'a> {
    cfg: &'a FfnSkip,
    layers: usize,
    /// Rows past the warm-up.
    eligible: Vec<bool>,
    saturated: Vec<bool>,
    /// Skips left (ratio mode).
    left: Vec<usize>,
}

impl<'a> RowSkip<'a> {
    pub(crate) fn new(cfg: &'a FfnSkip, layers: usize, positions: &[usize]) -> Self {
        let n = positions.len();
        Self {
            cfg,
            layers,
            eligible: positions.iter().map(|&p| p >= cfg.warmup).collect(),
            saturated: vec![false; n],
            left: vec![cfg.per_token.unwrap_or(usize::MAX); n],
        }
    }

    /// Layers 1..L-1: the ones that may be skipped.
    fn hot(&self, l: usize) -> bool {
        l >= 1 && l + 1 < self.layers
    }

    /// Which rows skip layer l's FFN (and count the skips against their
    /// budgets). `None`: no row does.
    pub(crate) fn plan(&mut self, l: usize) -> Option<Vec<bool>> {
        if !self.hot(l) {
            return None;
        }
        // hot layers from l to the last one, l included
        let remaining = self.layers - 1 - l;
        let mut any = false;
        let plan: Vec<bool> = (0..self.eligible.len())
            .map(|r| {
                let s = self.eligible[r]
                    && self.left[r] > 0
                    && (self.saturated[r]
                        // ratio mode: as late as the budget still fits
                        || (self.cfg.per_token.is_some() && self.left[r] >= remaining));
                if s {
                    self.left[r] -= 1;
                    any = true;
                }
                s
            })
            .collect();
        any.then_some(plan)
    }

    /// The rows whose layer-l FFN ran saw cos(in, out) = `cos`.
    pub(crate) fn observe(&mut self, l: usize, cos: &[f32], ran: Option<&[bool]>) {
        if !self.hot(l) {
            return;
        }
        for (r, &c) in cos.iter().enumerate() {
            if ran.is_none_or(|skipped| !skipped[r]) && c >= self.cfg.threshold {
                self.saturated[r] = true;
            }
        }
    }
}

/// Which sublayer a similarity belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Sublayer {
    Attn,
    Ffn,
}

/// Mean cos(input, output) of each sublayer over the token rows of the
/// passes it watched (a sublayer's output is the residual stream after it).
#[derive(Debug, Default)]
pub struct Probe {
    sums: Mutex<[Vec<(f64, u64)>; 2]>,
}

/// A sublayer and its mean similarity.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Ranked {
    pub layer: usize,
    pub kind: Sublayer,
    pub cos: f64,
}

impl Probe {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn record(&self, kind: Sublayer, layer: usize, cos: &[f32]) {
        let mut s = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        let v = &mut s[kind as usize];
        if v.len() <= layer {
            v.resize(layer + 1, (0.0, 0));
        }
        v[layer].0 += cos.iter().map(|&c| c as f64).sum::<f64>();
        v[layer].1 += cos.len() as u64;
    }

    /// Mean similarity of each layer's sublayer of `kind` (NaN where none
    /// was seen).
    pub fn means(&self, kind: Sublayer) -> Vec<f64> {
        let s = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        s[kind as usize]
            .iter()
            .map(|&(sum, n)| if n == 0 { f64::NAN } else { sum / n as f64 })
            .collect()
    }

    /// The sublayers of `kind` (whole layers for both kinds at once:
    /// ranked by the lower of their two similarities), most similar —
    /// most redundant — first.
    pub fn rank(&self, kinds: &[Sublayer]) -> Vec<Ranked> {
        let mut out: Vec<Ranked> = match kinds {
            [k] => self
                .means(*k)
                .into_iter()
                .enumerate()
                .filter(|(_, c)| c.is_finite())
                .map(|(layer, cos)| Ranked {
                    layer,
                    kind: *k,
                    cos,
                })
                .collect(),
            _ => {
                let (a, f) = (self.means(Sublayer::Attn), self.means(Sublayer::Ffn));
                a.iter()
                    .zip(&f)
                    .enumerate()
                    .filter(|(_, (a, f))| a.is_finite() && f.is_finite())
                    .map(|(layer, (a, f))| Ranked {
                        layer,
                        kind: Sublayer::Attn,
                        cos: a.min(*f),
                    })
                    .collect()
            }
        };
        out.sort_by(|x, y| y.cos.total_cmp(&x.cos).then(x.layer.cmp(&y.layer)));
        out
    }
}

/// A `--drop` spec: `attn:1,2,…`, `ffn:…`, `layer:…`, several joined by
/// `;` -> the sublayers to drop in a model of `layers` layers.
pub fn parse_drop(spec: &str, layers: usize) -> Result<Skip> {
    let bad = |m: String| Error::msg(format!("--drop: {m}"));
    let mut skip = Skip {
        attn: vec![false; layers],
        ffn: vec![false; layers],
    };
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (kind, list) = part
            .split_once(':')
            .ok_or_else(|| bad(format!("`{part}`: expected attn:L,…, ffn:L,… or layer:L,…")))?;
        let (a, f) = match kind.trim() {
            "attn" => (true, false),
            "ffn" => (false, true),
            "layer" => (true, true),
            k => return Err(bad(format!("unknown sublayer `{k}` (attn, ffn or layer)"))),
        };
        for l in list.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (lo, hi) = match l.split_once('-') {
                Some((lo, hi)) => (lo.trim(), hi.trim()),
                None => (l, l),
            };
            let idx = |x: &str| -> Result<usize> {
                let i: usize = x
                    .parse()
                    .map_err(|_| bad(format!("`{x}` is not a layer index")))?;
                if i >= layers {
                    return Err(bad(format!(
                        "layer {i} does not exist (the model has layers 0..{})",
                        layers.saturating_sub(1)
                    )));
                }
                Ok(i)
            };
            let (lo, hi) = (idx(lo)?, idx(hi)?);
            if lo > hi {
                return Err(bad(format!("`{l}`: an empty range")));
            }
            for i in lo..=hi {
                skip.attn[i] |= a;
                skip.ffn[i] |= f;
            }
        }
    }
    Ok(skip)
}

/// A `--drop-auto` spec: `attn=K`, `ffn=K`, `layer=K` (comma-separated)
/// -> how many of each to drop.
pub fn parse_drop_auto(spec: &str, layers: usize) -> Result<[usize; 3]> {
    let bad = |m: String| Error::msg(format!("--drop-auto: {m}"));
    let mut n = [0usize; 3];
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("`{part}`: expected attn=K, ffn=K or layer=K")))?;
        let i = match k.trim() {
            "attn" => 0,
            "ffn" => 1,
            "layer" => 2,
            k => return Err(bad(format!("unknown key `{k}` (attn, ffn or layer)"))),
        };
        let c: usize = v
            .trim()
            .parse()
            .map_err(|_| bad(format!("{k}: `{v}` is not a count")))?;
        if c > layers {
            return Err(bad(format!("{k}={c}: the model has {layers} layers")));
        }
        n[i] = c;
    }
    Ok(n)
}

/// The sublayers to drop: the `n = [attn, ffn, layer]` most redundant by
/// the probe's ranking.
pub fn auto_drop(probe: &Probe, layers: usize, n: [usize; 3]) -> Skip {
    let mut skip = Skip {
        attn: vec![false; layers],
        ffn: vec![false; layers],
    };
    for r in probe.rank(&[Sublayer::Attn]).iter().take(n[0]) {
        skip.attn[r.layer] = true;
    }
    for r in probe.rank(&[Sublayer::Ffn]).iter().take(n[1]) {
        skip.ffn[r.layer] = true;
    }
    for r in probe
        .rank(&[Sublayer::Attn, Sublayer::Ffn])
        .iter()
        .take(n[2])
    {
        skip.attn[r.layer] = true;
        skip.ffn[r.layer] = true;
    }
    skip
}

impl super::Transformer {
    /// The similarity of every decoder sublayer on calibration windows
    /// (each prefilled into a fresh state, with this model's drops in
    /// place): the ranking `auto_drop` drops from.
    pub fn probe(&self, windows: &[&[u32]]) -> Result<Arc<Probe>> {
        let probe = Arc::new(Probe::new());
        let mut m = self.clone();
        m.prune.probe = Some(probe.clone());
        m.prune.stats = Arc::default();
        for w in windows.iter().filter(|w| !w.is_empty()) {
            let ids = candle_core::Tensor::new(*w, &candle_core::Device::Cpu)?.unsqueeze(0)?;
            m.step_last(&ids, &mut m.new_state(None)?)?;
        }
        Ok(probe)
    }
}
