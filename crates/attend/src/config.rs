//! The model configuration: one struct that describes every model shape attend
//! builds, loaded from JSON and validated before any tensor is made.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// Which stacks the model has.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// Bidirectional encoder only (BERT).
    Encoder,
    /// Causal decoder only (GPT, Llama).
    Decoder,
    /// The original Transformer: encoder + decoder with cross-attention.
    EncoderDecoder,
}

/// How positions enter the model.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PositionKind {
    /// Fixed sin/cos table added to the embeddings (Vaswani et al. 2017).
    Sinusoidal,
    /// A learned table added to the embeddings (GPT-2, BERT).
    Learned,
    /// Rotary embeddings applied to queries and keys (Su et al. 2021).
    Rope,
    /// Linear distance biases on the attention scores (Press et al. 2022).
    Alibi,
    /// No positional information (causal masks still leak order).
    None,
}

/// The position-wise feed-forward network.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FfnKind {
    Relu,
    Gelu,
    Swiglu,
    /// GeGLU with the tanh approximation of GELU (Gemma):
    /// W2 (gelu_tanh(W1 x) ⊙ W3 x).
    Geglu,
}

/// How the FFN's weight matrices are parameterised ("Building on Efficient
/// Foundations"): dense, low-rank W = U V (U: out × r, V: r × in), or
/// block-diagonal with b blocks (input and output split into b groups, each
/// mapped by its own (out/b) × (in/b) matrix).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum FfnWeights {
    #[default]
    Dense,
    Lowrank {
        rank: usize,
    },
    Blockdiag {
        blocks: usize,
    },
}

impl std::str::FromStr for FfnWeights {
    type Err = String;
    /// `dense`, `lowrank:R` (or `lowrank:r=R`), `blockdiag:B` (or `blockdiag:b=B`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        let num = |key: &str| -> std::result::Result<usize, String> {
            let v = arg.strip_prefix(&format!("{key}=")).unwrap_or(arg);
            v.parse::<usize>().ok().filter(|&n| n > 0).ok_or(format!(
                "`{s}`: `{name}` takes a positive {key}, e.g. `{name}:{key}=4`"
            ))
        };
        match name {
            "dense" if arg.is_empty() => Ok(Self::Dense),
            "lowrank" => Ok(Self::Lowrank { rank: num("r")? }),
            "blockdiag" => Ok(Self::Blockdiag { blocks: num("b")? }),
            _ => Err(format!(
                "unknown FFN weights `{s}` (expected dense, lowrank:r=R or blockdiag:b=B)"
            )),
        }
    }
}

/// A sparse mixture of experts in place of every block's FFN (`ffn::moe`):
/// `experts` FFNs of the model's kind and d_ff, `top_k` of them per token.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct MoeConfig {
    pub experts: usize,
    pub top_k: usize,
    /// Tokens an expert takes, as a multiple of its fair share k·n/E; the
    /// rest are dropped (None: dropless).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_factor: Option<f64>,
    /// Weight of Switch's load-balancing loss in the training loss.
    pub aux_weight: f64,
    /// Weight of ST-MoE's router z-loss.
    pub z_weight: f64,
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            experts: 8,
            top_k: 2,
            capacity_factor: None,
            aux_weight: 0.01,
            z_weight: 0.001,
        }
    }
}

impl MoeConfig {
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
        for (name, w) in [("aux weight", self.aux_weight), ("z weight", self.z_weight)] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(Error::config(
                    "moe",
                    format!("{name} must be non-negative, got {w}"),
                ));
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for MoeConfig {
    type Err = String;
    /// `experts=E,k=K[,capacity=C][,aux=A][,z=Z]`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut c = Self::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or(format!(
                "`{part}`: expected key=value (experts, k, capacity, aux, z)"
            ))?;
            let int = || {
                v.parse::<usize>()
                    .map_err(|_| format!("`{part}`: `{k}` takes a whole number"))
            };
            let num = || {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or(format!("`{part}`: `{k}` takes a non-negative number"))
            };
            match k {
                "experts" | "e" => c.experts = int()?,
                "k" | "top_k" => c.top_k = int()?,
                "capacity" => c.capacity_factor = Some(num()?),
                "aux" => c.aux_weight = num()?,
                "z" => c.z_weight = num()?,
                _ => {
                    return Err(format!(
                        "unknown setting `{k}` (experts, k, capacity, aux, z)"
                    ))
                }
            }
        }
        Ok(c)
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    Layernorm,
    Rmsnorm,
}

/// Where the norm sits relative to the residual: `post` as in the paper
/// (x = norm(x + f(x))), `pre` as in GPT-2 and Llama (x = x + f(norm(x))),
/// `sandwich` both around the sublayer (Gemma 2/3: x = x + norm'(f(norm(x)))).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NormPosition {
    Pre,
    Post,
    Sandwich,
}

/// The feature map φ of linear attention: attention weights are
/// φ(q)·φ(k) instead of exp(q·k/√d).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FeatureMap {
    /// elu(x) + 1 (Katharopoulos et al. 2020).
    Elu,
    /// max(x, 0).
    Relu,
    /// The 2nd-order Taylor expansion of exp used by BASED (Arora et al.
    /// 2024): [1, x / d'^¼, (x ⊗ x) / (√2 · √d')], so φ(q)·φ(k) =
    /// 1 + q·k/√d' + (q·k)²/(2d').
    Taylor,
    /// FAVOR+ positive random features (Choromanski et al. 2021):
    /// exp(w_i·x' - |x'|²/2) / √m with x' = x / d'^¼ and m fixed, seeded,
    /// orthogonal Gaussian rows w_i, so E[φ(q)·φ(k)] = exp(q·k/√d').
    Performer,
}

impl FeatureMap {
    pub const NAMES: [&'static str; 4] = ["elu", "relu", "taylor", "performer"];
}

/// Sliding-window softmax attention: query i sees keys j with
/// i - w < j ≤ i (causal) or |i - j| < w (bidirectional).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WindowConfig {
    pub window: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self { window: 64 }
    }
}

/// Linear attention with a feature map over q, k projected to
/// `feature_dim` per head.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LinearConfig {
    pub feature_map: FeatureMap,
    /// d': the width of q and k per head (the input of φ).
    pub feature_dim: usize,
    /// m: random features of the `performer` map.
    pub n_features: usize,
    /// Tokens per chunk of the chunked whole-sequence form.
    pub chunk: usize,
}

impl Default for LinearConfig {
    fn default() -> Self {
        Self {
            feature_map: FeatureMap::Elu,
            feature_dim: 16,
            n_features: 64,
            chunk: 64,
        }
    }
}

/// BASED (Arora et al. 2024) in one layer: a short causal depthwise
/// convolution over the layer input, then Taylor linear attention and
/// sliding-window softmax attention whose outputs are summed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BasedConfig {
    /// d' of the Taylor linear attention.
    pub feature_dim: usize,
    /// Window of the sliding-window softmax branch.
    pub window: usize,
    /// Kernel size of the short convolution.
    pub conv: usize,
    pub chunk: usize,
}

impl Default for BasedConfig {
    fn default() -> Self {
        Self {
            feature_dim: 16,
            window: 64,
            conv: 3,
            chunk: 64,
        }
    }
}

/// Decayed linear attention (RetNet, Sun et al. 2023; TransNormer /
/// Lightning Attention): S_i = γ S_{i-1} + k_i v_iᵀ, y_i = q_iᵀ S_i.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DecayConfig {
    /// One γ for every head, in (0, 1); `None`: RetNet's per-head
    /// γ_h = 1 - 2^(-5-h).
    pub decay: Option<f64>,
    pub chunk: usize,
}

impl Default for DecayConfig {
    fn default() -> Self {
        Self {
            decay: None,
            chunk: 64,
        }
    }
}

/// Gated linear attention (GLA, Yang et al. 2024): a data-dependent
/// per-channel decay α_t = sigmoid(W_α x_t)^(1/τ), W_α of low rank.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GlaConfig {
    /// Rank of W_α = W_up W_down.
    pub gate_rank: usize,
    /// τ: the temperature of the gate (16 in the paper).
    pub tau: f64,
    pub chunk: usize,
}

impl Default for GlaConfig {
    fn default() -> Self {
        Self {
            gate_rank: 16,
            tau: 16.0,
            chunk: 8,
        }
    }
}

/// The delta rule (DeltaNet), optionally with Gated DeltaNet's
/// data-dependent decay α_t = sigmoid(w_α·x_t + b_α)^(1/τ) per kv head.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeltaConfig {
    /// Gated DeltaNet (a decay per token and kv head) instead of DeltaNet.
    pub gated: bool,
    /// τ of the gate.
    pub tau: f64,
    pub chunk: usize,
}

impl Default for DeltaConfig {
    fn default() -> Self {
        Self {
            gated: false,
            tau: 16.0,
            chunk: 16,
        }
    }
}

/// Mamba2's selective state space in its SSD form (`attention/mamba2.rs`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Mamba2Config {
    /// Kernel of the short causal convolution.
    pub conv: usize,
    pub chunk: usize,
}

impl Default for Mamba2Config {
    fn default() -> Self {
        Self { conv: 4, chunk: 16 }
    }
}

/// The token-mixing mechanism of a self-attention layer, with its settings.
///
/// In JSON: `"softmax"`, a spec string as on the command line
/// (`"linear:map=taylor,dim=16"`), or the tagged form
/// (`{"linear": {"feature_map": "taylor", "feature_dim": 16}}`).
#[derive(Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "snake_case")]
pub enum MechanismConfig {
    /// Exact softmax attention with a KV cache.
    #[default]
    Softmax,
    Window(WindowConfig),
    Linear(LinearConfig),
    Based(BasedConfig),
    Decay(DecayConfig),
    Gla(GlaConfig),
    Delta(DeltaConfig),
    Mamba2(Mamba2Config),
}

/// The name the first releases used; kept so older code still compiles.
pub type MechanismKind = MechanismConfig;

/// The tagged JSON form, deserialized by serde's derive.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum TaggedMechanism {
    Softmax,
    Window(WindowConfig),
    Linear(LinearConfig),
    Based(BasedConfig),
    Decay(DecayConfig),
    Gla(GlaConfig),
    Delta(DeltaConfig),
    Mamba2(Mamba2Config),
}

impl From<TaggedMechanism> for MechanismConfig {
    fn from(t: TaggedMechanism) -> Self {
        match t {
            TaggedMechanism::Softmax => Self::Softmax,
            TaggedMechanism::Window(c) => Self::Window(c),
            TaggedMechanism::Linear(c) => Self::Linear(c),
            TaggedMechanism::Based(c) => Self::Based(c),
            TaggedMechanism::Decay(c) => Self::Decay(c),
            TaggedMechanism::Gla(c) => Self::Gla(c),
            TaggedMechanism::Delta(c) => Self::Delta(c),
            TaggedMechanism::Mamba2(c) => Self::Mamba2(c),
        }
    }
}

impl<'de> Deserialize<'de> for MechanismConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = MechanismConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mechanism spec string (e.g. \"softmax\", \"window:w=64\") or an object such as {\"window\": {\"window\": 64}}")
            }
            fn visit_str<E: serde::de::Error>(
                self,
                s: &str,
            ) -> std::result::Result<Self::Value, E> {
                s.parse().map_err(|e: Error| E::custom(e))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let t = TaggedMechanism::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(t.into())
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl MechanismConfig {
    pub const NAMES: [&'static str; 9] = [
        "softmax",
        "window",
        "linear",
        "based",
        "decay",
        "gla",
        "deltanet",
        "gated-deltanet",
        "mamba2",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Self::Softmax => "softmax",
            Self::Window(_) => "window",
            Self::Linear(_) => "linear",
            Self::Based(_) => "based",
            Self::Decay(_) => "decay",
            Self::Gla(_) => "gla",
            Self::Delta(c) if c.gated => "gated-deltanet",
            Self::Delta(_) => "deltanet",
            Self::Mamba2(_) => "mamba2",
        }
    }

    /// Decay, GLA and the delta rule are defined causally only (decoder
    /// layers).
    pub fn supports_bidirectional(&self) -> bool {
        !matches!(
            self,
            Self::Decay(_) | Self::Gla(_) | Self::Delta(_) | Self::Mamba2(_)
        )
    }

    /// The width of q and k per head when it differs from the head dimension.
    pub fn qk_dim(&self) -> Option<usize> {
        match self {
            Self::Linear(c) => Some(c.feature_dim),
            Self::Based(c) => Some(c.feature_dim),
            _ => None,
        }
    }

    /// Check every setting; errors name it.
    pub fn validate(&self) -> Result<()> {
        let at_least_1 = |field: &str, v: usize| {
            if v == 0 {
                Err(Error::config(field, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        match self {
            Self::Softmax => {}
            Self::Window(c) => at_least_1("window", c.window)?,
            Self::Linear(c) => {
                at_least_1("feature_dim", c.feature_dim)?;
                at_least_1("n_features", c.n_features)?;
                at_least_1("chunk", c.chunk)?;
            }
            Self::Based(c) => {
                // window 0: no window branch (the BASED stack's linear layers)
                at_least_1("feature_dim", c.feature_dim)?;
                at_least_1("conv", c.conv)?;
                at_least_1("chunk", c.chunk)?;
            }
            Self::Decay(c) => {
                if let Some(g) = c.decay {
                    if !(g > 0.0 && g < 1.0) {
                        return Err(Error::config(
                            "decay",
                            format!("must be in (0, 1), got {g}"),
                        ));
                    }
                }
                at_least_1("chunk", c.chunk)?;
            }
            Self::Mamba2(c) => {
                at_least_1("conv", c.conv)?;
                at_least_1("chunk", c.chunk)?;
            }
            Self::Delta(c) => {
                if !is_positive(c.tau) || !c.tau.is_finite() {
                    return Err(Error::config(
                        "tau",
                        format!("must be positive, got {}", c.tau),
                    ));
                }
                at_least_1("chunk", c.chunk)?;
            }
            Self::Gla(c) => {
                at_least_1("gate_rank", c.gate_rank)?;
                if !is_positive(c.tau) || !c.tau.is_finite() {
                    return Err(Error::config(
                        "tau",
                        format!("must be positive, got {}", c.tau),
                    ));
                }
                at_least_1("chunk", c.chunk)?;
            }
        }
        Ok(())
    }

    /// Parse a comma-separated list of specs, one per layer:
    /// `softmax,based:dim=16,w=16,based`. A piece with `=` but no `:`
    /// continues the settings of the mechanism before it; `;` also separates.
    pub fn parse_list(s: &str) -> Result<Vec<MechanismConfig>> {
        let mut specs: Vec<String> = vec![];
        for piece in s.split([',', ';']).map(str::trim) {
            if piece.is_empty() {
                continue;
            }
            match specs.last_mut() {
                Some(last) if piece.contains('=') && !piece.contains(':') => {
                    last.push(if last.contains(':') { ',' } else { ':' });
                    last.push_str(piece);
                }
                _ => specs.push(piece.to_string()),
            }
        }
        if specs.is_empty() {
            return Err(Error::config("layer_mechanisms", "is empty"));
        }
        specs.iter().map(|s| s.parse()).collect()
    }
}

/// BASED as the paper builds it (Arora et al. 2024): linear-attention
/// layers — a short causal convolution, then Taylor linear attention of
/// feature dimension `dim` — and sliding-window softmax layers of `w`
/// tokens, interleaved in one stack: every `every`-th layer a window.
/// `based-stack[:dim=16,w=64,conv=3,every=2,chunk=64]` -> one mechanism per
/// layer of a stack of `layers`; `None` for any other spec.
pub fn stack_preset(spec: &str, layers: usize) -> Result<Option<Vec<MechanismConfig>>> {
    let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
    if name.trim() != "based-stack" {
        return Ok(None);
    }
    let bad = |m: String| Error::config("mechanism", format!("`{spec}`: {m}"));
    let (mut dim, mut w, mut conv, mut every, mut chunk) = (16usize, 64usize, 3usize, 2usize, None);
    for kv in rest.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(format!("`{kv}`: expected key=value")))?;
        let n: usize = v
            .trim()
            .parse()
            .map_err(|_| bad(format!("{k}: `{v}` is not a whole number")))?;
        match k.trim() {
            "dim" => dim = n,
            "w" | "window" => w = n,
            "conv" => conv = n,
            "every" => every = n,
            "chunk" => chunk = Some(n),
            other => {
                return Err(bad(format!(
                    "unknown setting `{other}` (dim, w, conv, every, chunk)"
                )))
            }
        }
    }
    if w == 0 || every == 0 {
        return Err(bad("w and every must be at least 1".into()));
    }
    let chunk = chunk.map_or(String::new(), |c| format!(",chunk={c}"));
    let linear: MechanismConfig = format!("based:dim={dim},w=0,conv={conv}{chunk}").parse()?;
    let window: MechanismConfig = format!("window:w={w}").parse()?;
    Ok(Some(
        (0..layers)
            .map(|i| {
                if (i + 1) % every == 0 {
                    window.clone()
                } else {
                    linear.clone()
                }
            })
            .collect(),
    ))
}

/// `name[:key=value,...]`, the command-line spec of a mechanism:
/// `softmax`, `window:w=64`, `linear:map=taylor,dim=16,chunk=32`,
/// `based:dim=16,w=64,conv=3`, `decay:gamma=0.9` (default: RetNet's
/// per-head decays), `gla:rank=16,tau=16`.
impl std::str::FromStr for MechanismConfig {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let (name, rest) = s.split_once(':').unwrap_or((s, ""));
        let name = name.trim().to_ascii_lowercase();
        let mut settings: Vec<(String, String)> = vec![];
        for kv in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                Error::config("mechanism", format!("`{kv}` in `{s}` is not key=value"))
            })?;
            settings.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T> {
            v.parse()
                .map_err(|_| Error::config(key, format!("`{v}` is not a valid number")))
        }
        let unknown = |key: &str, allowed: &[&str]| {
            Error::config(
                key,
                format!(
                    "is not a setting of `{name}` (expected one of: {})",
                    allowed.join(", ")
                ),
            )
        };
        let cfg = match name.as_str() {
            "softmax" => {
                if let Some((k, _)) = settings.first() {
                    return Err(unknown(k, &[]));
                }
                Self::Softmax
            }
            "window" | "sliding_window" | "swa" => {
                let mut c = WindowConfig::default();
                for (k, v) in &settings {
                    match k.as_str() {
                        "w" | "window" => c.window = num("window", v)?,
                        _ => return Err(unknown(k, &["w", "window"])),
                    }
                }
                Self::Window(c)
            }
            "linear" => {
                let mut c = LinearConfig::default();
                for (k, v) in &settings {
                    match k.as_str() {
                        "map" | "feature_map" => {
                            c.feature_map = match v.to_ascii_lowercase().as_str() {
                                "elu" => FeatureMap::Elu,
                                "relu" => FeatureMap::Relu,
                                "taylor" => FeatureMap::Taylor,
                                "performer" | "favor" => FeatureMap::Performer,
                                _ => {
                                    return Err(Error::config(
                                        "feature_map",
                                        format!(
                                            "unknown feature map `{v}` (expected one of: {})",
                                            FeatureMap::NAMES.join(", ")
                                        ),
                                    ))
                                }
                            }
                        }
                        "dim" | "feature_dim" => c.feature_dim = num("feature_dim", v)?,
                        "m" | "n_features" => c.n_features = num("n_features", v)?,
                        "chunk" => c.chunk = num("chunk", v)?,
                        _ => return Err(unknown(k, &["map", "dim", "m", "chunk"])),
                    }
                }
                Self::Linear(c)
            }
            "based" => {
                let mut c = BasedConfig::default();
                for (k, v) in &settings {
                    match k.as_str() {
                        "dim" | "feature_dim" => c.feature_dim = num("feature_dim", v)?,
                        "w" | "window" => c.window = num("window", v)?,
                        "conv" | "kernel" => c.conv = num("conv", v)?,
                        "chunk" => c.chunk = num("chunk", v)?,
                        _ => return Err(unknown(k, &["dim", "w", "conv", "chunk"])),
                    }
                }
                Self::Based(c)
            }
            "decay" | "retnet" => {
                let mut c = DecayConfig::default();
                for (k, v) in &settings {
                    match k.as_str() {
                        "gamma" | "decay" => {
                            c.decay = if v == "retnet" || v == "default" {
                                None
                            } else {
                                Some(num("decay", v)?)
                            }
                        }
                        "chunk" => c.chunk = num("chunk", v)?,
                        _ => return Err(unknown(k, &["gamma", "chunk"])),
                    }
                }
                Self::Decay(c)
            }
            "gla" => {
                let mut c = GlaConfig::default();
                for (k, v) in &settings {
                    match k.as_str() {
                        "rank" | "gate_rank" => c.gate_rank = num("gate_rank", v)?,
                        "tau" => c.tau = num("tau", v)?,
                        "chunk" => c.chunk = num("chunk", v)?,
                        _ => return Err(unknown(k, &["rank", "tau", "chunk"])),
                    }
                }
                Self::Gla(c)
            }
            "deltanet" | "gated-deltanet" => {
                let mut c = DeltaConfig {
                    gated: name == "gated-deltanet",
                    ..DeltaConfig::default()
                };
                for (k, v) in &settings {
                    match k.as_str() {
                        "tau" if c.gated => c.tau = num("tau", v)?,
                        "chunk" => c.chunk = num("chunk", v)?,
                        _ if c.gated => return Err(unknown(k, &["tau", "chunk"])),
                        _ => return Err(unknown(k, &["chunk"])),
                    }
                }
                Self::Delta(c)
            }
            "mamba2" => {
                let mut c = Mamba2Config::default();
                for (k, v) in &settings {
                    match k.as_str() {
                        "conv" => c.conv = num("conv", v)?,
                        "chunk" => c.chunk = num("chunk", v)?,
                        _ => return Err(unknown(k, &["conv", "chunk"])),
                    }
                }
                Self::Mamba2(c)
            }
            _ => {
                return Err(Error::config(
                    "mechanism",
                    format!(
                        "unknown mechanism `{name}` (expected one of: {})",
                        Self::NAMES.join(", ")
                    ),
                ))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The canonical spec, parseable by `FromStr`.
impl fmt::Display for MechanismConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Softmax => write!(f, "softmax"),
            Self::Window(c) => write!(f, "window:w={}", c.window),
            Self::Linear(c) => {
                let map = FeatureMap::NAMES[c.feature_map as usize];
                write!(f, "linear:map={map},dim={}", c.feature_dim)?;
                if c.feature_map == FeatureMap::Performer {
                    write!(f, ",m={}", c.n_features)?;
                }
                write!(f, ",chunk={}", c.chunk)
            }
            Self::Based(c) => write!(
                f,
                "based:dim={},w={},conv={},chunk={}",
                c.feature_dim, c.window, c.conv, c.chunk
            ),
            Self::Decay(c) => match c.decay {
                Some(g) => write!(f, "decay:gamma={g},chunk={}", c.chunk),
                None => write!(f, "decay:gamma=retnet,chunk={}", c.chunk),
            },
            Self::Gla(c) => write!(
                f,
                "gla:rank={},tau={},chunk={}",
                c.gate_rank, c.tau, c.chunk
            ),
            Self::Delta(c) if c.gated => {
                write!(f, "gated-deltanet:tau={},chunk={}", c.tau, c.chunk)
            }
            Self::Delta(c) => write!(f, "deltanet:chunk={}", c.chunk),
            Self::Mamba2(c) => write!(f, "mamba2:conv={},chunk={}", c.conv, c.chunk),
        }
    }
}

/// The longest context attend accepts (2²⁴ positions).
pub const MAX_POSITIONS: usize = 1 << 24;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub shape: Shape,
    pub d_model: usize,
    pub n_encoder_layers: usize,
    pub n_decoder_layers: usize,
    pub n_heads: usize,
    /// Key/value heads: `n_heads` for multi-head, 1 for multi-query, anything
    /// dividing `n_heads` for grouped-query attention. Defaults to `n_heads`.
    pub n_kv_heads: Option<usize>,
    /// Width of each attention head; None: d_model / n_heads. Set, the heads
    /// need not add up to d_model (Gemma 3 270m: 4 × 256 over 640).
    pub head_dim: Option<usize>,
    /// RMSNorm each query and key head before RoPE (Gemma 3, Qwen3).
    pub qk_norm: bool,
    pub d_ff: usize,
    pub vocab_size: usize,
    /// Longest sequence the position scheme must cover.
    pub max_len: usize,
    pub position: PositionKind,
    pub rope_theta: f64,
    /// RoPE base of the sliding-window (`window`) layers, when it differs
    /// from `rope_theta` (Gemma 3: 10,000 local, 1,000,000 global).
    pub rope_theta_window: Option<f64>,
    pub ffn: FfnKind,
    /// The FFN's weight matrices: dense, low-rank or block-diagonal.
    pub ffn_weights: FfnWeights,
    /// A mixture of experts in place of each block's FFN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
    /// MatFormer: nested FFN widths trained jointly (each step samples one
    /// for every layer), largest first, the first d_ff; each width m uses
    /// the first m hidden units. Empty: an ordinary FFN.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matformer: Vec<usize>,
    /// The FFN width of each block, encoder blocks first (Mix'n'Match
    /// submodels extracted from a MatFormer); empty: d_ff everywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_d_ff: Vec<usize>,
    pub norm: NormKind,
    pub norm_position: NormPosition,
    pub norm_eps: f64,
    /// Share the token embedding with the output projection.
    pub tie_embeddings: bool,
    /// Biases on the linear projections.
    pub bias: bool,
    /// Biases on the query, key and value projections only (Qwen2), when
    /// `bias` is off.
    pub qkv_bias: bool,
    /// RoPE frequency scaling (Llama 3): each frequency divided by a factor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    pub dropout: f64,
    /// The token mixer of every self-attention layer (cross-attention is
    /// always softmax): `"softmax"`, a spec string (`"based:dim=16,w=64"`) or
    /// the tagged form (`{"window": {"window": 64}}`).
    pub mechanism: MechanismConfig,
    /// One mechanism per self-attention layer, encoder layers first, then
    /// decoder layers (a mixed stack); empty = every layer uses `mechanism`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layer_mechanisms: Vec<MechanismConfig>,
    /// Multiply token embeddings by √d_model (the paper; not GPT/Llama/BERT).
    pub scale_embeddings: bool,
    /// LayerNorm the embedding sum before the first block (BERT).
    pub embed_norm: bool,
    /// RoPE rotates adjacent pairs (x0,x1),(x2,x3).. (GGUF/llama.cpp layout)
    /// instead of (x_i, x_{i+d/2}) (GPT-NeoX / HF layout).
    pub rope_interleaved: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            shape: Shape::Decoder,
            d_model: 128,
            n_encoder_layers: 0,
            n_decoder_layers: 2,
            n_heads: 4,
            n_kv_heads: None,
            head_dim: None,
            qk_norm: false,
            d_ff: 512,
            vocab_size: 256,
            max_len: 256,
            position: PositionKind::Sinusoidal,
            rope_theta: 10_000.0,
            rope_theta_window: None,
            ffn: FfnKind::Relu,
            ffn_weights: FfnWeights::Dense,
            moe: None,
            matformer: vec![],
            layer_d_ff: vec![],
            norm: NormKind::Layernorm,
            norm_position: NormPosition::Pre,
            norm_eps: 1e-5,
            tie_embeddings: true,
            bias: true,
            qkv_bias: false,
            rope_scaling: None,
            dropout: 0.0,
            mechanism: MechanismConfig::Softmax,
            layer_mechanisms: vec![],
            scale_embeddings: true,
            embed_norm: false,
            rope_interleaved: false,
        }
    }
}

/// How RoPE's frequencies are scaled for a longer context.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RopeScaling {
    /// Llama 3's: frequencies whose wavelength exceeds
    /// `original_max_len / low_freq_factor` are divided by `factor`, those
    /// shorter than `original_max_len / high_freq_factor` kept, and the
    /// ones between interpolated smoothly (transformers' `llama3` type).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_len: usize,
    },
    /// A divisor per frequency (head_dim / 2 of them), as GGUF files store
    /// them (`rope_freqs.weight`).
    Factors(Vec<f64>),
}

impl RopeScaling {
    /// The divisor of each of the `head_dim / 2` frequencies
    /// theta^(-2i/head_dim).
    pub fn factors(&self, head_dim: usize, theta: f64) -> Vec<f64> {
        match self {
            RopeScaling::Factors(f) => f.clone(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_len,
            } => {
                let old = *original_max_len as f64;
                (0..head_dim / 2)
                    .map(|i| {
                        let freq = theta.powf(-2.0 * i as f64 / head_dim as f64);
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < old / hi {
                            1.0
                        } else if wavelen > old / lo {
                            *factor
                        } else {
                            // freq' = (1 − s) freq / factor + s freq
                            let s = (old / wavelen - lo) / (hi - lo);
                            1.0 / ((1.0 - s) / factor + s)
                        }
                    })
                    .collect()
            }
        }
    }

    fn validate(&self, head_dim: usize) -> Result<()> {
        let bad = |m: String| Err(Error::config("rope_scaling", m));
        match self {
            RopeScaling::Factors(f) if f.len() != head_dim / 2 => bad(format!(
                "has {} factors; heads of {head_dim} need {}",
                f.len(),
                head_dim / 2
            )),
            RopeScaling::Factors(f) if !f.iter().all(|&x| is_positive(x)) => {
                bad("every factor must be positive".into())
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_len,
            } if !(is_positive(*factor)
                && is_positive(*low_freq_factor)
                && high_freq_factor > low_freq_factor
                && *original_max_len > 0) =>
            {
                bad("needs factor > 0, 0 < low_freq_factor < high_freq_factor and original_max_len > 0".into())
            }
            _ => Ok(()),
        }
    }
}

/// `x > 0`, false for NaN: the check every positive float setting needs.
pub fn is_positive(x: f64) -> bool {
    x > 0.0
}

impl ModelConfig {
    /// The decoder's layers as runs of equal ones: mechanism (global
    /// softmax or a window) and RoPE base, e.g. Gemma 3's
    /// `0-4 window 512, RoPE 10000; 5 global, RoPE 1000000; …`.
    pub fn layer_pattern(&self) -> String {
        let rope = self.position == PositionKind::Rope;
        let desc = |i: usize| match self.layer_mechanism(false, i) {
            MechanismConfig::Softmax if rope => format!(
                "global, RoPE {}{}",
                self.rope_theta,
                match &self.rope_scaling {
                    Some(RopeScaling::Llama3 { factor, .. }) =>
                        format!(" (Llama 3 scaling ×{factor})"),
                    Some(RopeScaling::Factors(_)) => " (scaled per frequency)".to_string(),
                    None => String::new(),
                }
            ),
            MechanismConfig::Softmax => "global".to_string(),
            MechanismConfig::Window(w) if rope => format!(
                "window {}, RoPE {}",
                w.window,
                self.rope_theta_window.unwrap_or(self.rope_theta)
            ),
            m => m.to_string(),
        };
        let mut runs: Vec<(usize, usize, String)> = vec![];
        for i in 0..self.n_decoder_layers {
            let d = desc(i);
            match runs.last_mut() {
                Some((_, end, last)) if *last == d => *end = i,
                _ => runs.push((i, i, d)),
            }
        }
        runs.iter()
            .map(|(a, b, d)| match a == b {
                true => format!("{a} {d}"),
                false => format!("{a}-{b} {d}"),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_heads.max(1))
    }

    pub fn has_encoder(&self) -> bool {
        matches!(self.shape, Shape::Encoder | Shape::EncoderDecoder)
    }

    pub fn has_decoder(&self) -> bool {
        matches!(self.shape, Shape::Decoder | Shape::EncoderDecoder)
    }

    /// Self-attention layers in the encoder and in the decoder stacks.
    pub fn stack_layers(&self) -> (usize, usize) {
        (
            if self.has_encoder() {
                self.n_encoder_layers
            } else {
                0
            },
            if self.has_decoder() {
                self.n_decoder_layers
            } else {
                0
            },
        )
    }

    /// The mechanism of self-attention layer `i` of the encoder (`encoder`)
    /// or the decoder stack.
    pub fn layer_mechanism(&self, encoder: bool, i: usize) -> &MechanismConfig {
        if self.layer_mechanisms.is_empty() {
            return &self.mechanism;
        }
        let at = if encoder {
            i
        } else {
            self.stack_layers().0 + i
        };
        self.layer_mechanisms.get(at).unwrap_or(&self.mechanism)
    }

    /// Every self-attention layer's mechanism, in runs: (is encoder, index
    /// of the first layer, mechanism, layers). The layers without an entry
    /// of their own in `layer_mechanisms` (all of them when it is empty)
    /// are one run, however many they are.
    fn all_layer_mechanisms(&self) -> Vec<(bool, usize, &MechanismConfig, usize)> {
        let (enc, dec) = self.stack_layers();
        let listed = self.layer_mechanisms.len();
        let mut runs = vec![];
        for (encoder, n, before) in [(true, enc, 0), (false, dec, enc)] {
            let own = n.min(listed.saturating_sub(before));
            for i in 0..own {
                runs.push((encoder, i, self.layer_mechanism(encoder, i), 1));
            }
            if n > own {
                runs.push((encoder, own, self.layer_mechanism(encoder, own), n - own));
            }
        }
        runs
    }

    fn validate_mechanisms(&self) -> Result<()> {
        let (enc, dec) = self.stack_layers();
        let n = enc + dec;
        if !self.layer_mechanisms.is_empty() && self.layer_mechanisms.len() != n {
            return Err(Error::config(
                "layer_mechanisms",
                format!(
                    "has {} entries; the model has {n} self-attention layers ({enc} encoder + {dec} decoder), one entry each",
                    self.layer_mechanisms.len()
                ),
            ));
        }
        self.mechanism.validate()?;
        for (encoder, i, m, _) in self.all_layer_mechanisms() {
            let layer = format!("{} layer {i}", if encoder { "encoder" } else { "decoder" });
            let in_layer = |e: Error| match e {
                Error::Config { field, msg } => Error::Config {
                    field,
                    msg: format!("{msg} ({layer})"),
                },
                e => e,
            };
            m.validate().map_err(in_layer)?;
            if encoder && !m.supports_bidirectional() {
                return Err(Error::config(
                    "mechanism",
                    format!("`{}` attention is causal only and cannot be used in {layer} (bidirectional); use softmax, window, linear or based there", m.name()),
                ));
            }
            if self.position == PositionKind::Alibi && *m != MechanismConfig::Softmax {
                return Err(Error::config(
                    "position",
                    format!(
                        "alibi biases need softmax attention, but {layer} uses `{}`",
                        m.name()
                    ),
                ));
            }
            if let Some(d) = m.qk_dim() {
                if self.position == PositionKind::Rope && d % 2 != 0 {
                    return Err(Error::config(
                        "feature_dim",
                        format!("rope needs an even feature_dim, got {d} ({layer})"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Parse JSON text; errors name the offending field (`ffn: unknown variant ...`).
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: ModelConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            Error::file(origin, format!("field `{path}`: {}", e.inner()))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parameters of the model, counted with checked arithmetic (None: more
    /// than a usize holds): embeddings, blocks, final norms, output.
    pub fn param_count(&self) -> Option<usize> {
        let (d, f) = (self.d_model, self.d_ff);
        let kvd = self.kv_heads().checked_mul(self.head_dim())?;
        let qd = self.n_heads.checked_mul(self.head_dim())?;
        let attn = d
            .checked_mul(qd)?
            .checked_mul(2)?
            .checked_add(d.checked_mul(kvd)?.checked_mul(2)?)?;
        // (the widest block's FFN for every block; E experts and a router)
        let f = self.layer_d_ff.iter().copied().max().unwrap_or(f).max(f);
        let ffn = match &self.moe {
            Some(m) => d
                .checked_mul(f)?
                .checked_mul(3)?
                .checked_mul(m.experts)?
                .checked_add(d.checked_mul(m.experts)?)?,
            None => d.checked_mul(f)?.checked_mul(3)?,
        };
        // (an upper bound: every norm kind and position, biases, q/k norms)
        let block = attn
            .checked_add(ffn)?
            .checked_add(d.checked_mul(8)?)?
            .checked_add(qd.checked_add(self.head_dim())?.checked_mul(2)?)?;
        let cross = if self.has_encoder() && self.has_decoder() {
            attn.checked_mul(self.n_decoder_layers)?
        } else {
            0
        };
        let layers = self.n_encoder_layers.checked_add(self.n_decoder_layers)?;
        let table = self.vocab_size.checked_mul(d)?;
        let pos = self.max_len.checked_mul(d)?;
        block
            .checked_mul(layers)?
            .checked_add(cross)?
            .checked_add(table.checked_mul(2)?)?
            .checked_add(pos.checked_mul(2)?)?
            .checked_add(self.mechanism_params()?)
    }

    /// Parameters the self-attention layers' mechanisms add to softmax
    /// attention's, at most: q and k wider than a head (linear, BASED),
    /// BASED's convolution and window projections, GLA's gate, the
    /// performer's fixed projection. Checked (None: overflow).
    pub fn mechanism_params(&self) -> Option<usize> {
        let (d, kvh, hd) = (self.d_model, self.kv_heads(), self.head_dim());
        let heads = self.n_heads.checked_add(kvh)?;
        let qk = |width: usize| -> Option<usize> {
            d.checked_mul(heads)?.checked_mul(width.saturating_sub(hd))
        };
        let mut total = 0usize;
        for (_, _, m, layers) in self.all_layer_mechanisms() {
            let extra = match m {
                MechanismConfig::Softmax
                | MechanismConfig::Window(_)
                | MechanismConfig::Decay(_) => 0,
                MechanismConfig::Linear(c) => {
                    let projection = match c.feature_map {
                        FeatureMap::Performer => c.n_features.checked_mul(c.feature_dim)?,
                        _ => 0,
                    };
                    qk(c.feature_dim)?.checked_add(projection)?
                }
                MechanismConfig::Based(c) => {
                    let conv = d.checked_mul(c.conv.checked_add(1)?)?;
                    let window_qk = if c.window == 0 {
                        0
                    } else {
                        d.checked_mul(heads)?.checked_mul(hd.checked_add(1)?)?
                    };
                    qk(c.feature_dim)?
                        .checked_add(conv)?
                        .checked_add(window_qk)?
                }
                MechanismConfig::Mamba2(c) => {
                    // conv (K taps + bias), w_Δ + bias, A_log, D, W_z
                    let conv = d.checked_mul(c.conv.checked_add(1)?)?;
                    let dt = d.checked_add(2)?.checked_mul(kvh)?;
                    let z = d.checked_mul(self.n_heads)?.checked_mul(hd)?;
                    conv.checked_add(dt)?
                        .checked_add(self.n_heads)?
                        .checked_add(z)?
                }
                MechanismConfig::Delta(c) => {
                    // w_β (and w_α) with their biases
                    let one = d.checked_add(1)?.checked_mul(kvh)?;
                    if c.gated {
                        one.checked_mul(2)?
                    } else {
                        one
                    }
                }
                MechanismConfig::Gla(c) => {
                    let kvd = kvh.checked_mul(hd)?;
                    d.checked_mul(c.gate_rank)?
                        .checked_add(c.gate_rank.checked_mul(kvd)?)?
                        .checked_add(kvd)?
                }
            };
            total = total.checked_add(extra.checked_mul(layers)?)?;
        }
        Some(total)
    }

    /// Bytes of one sequence's decode state in the linear-attention layers
    /// (linear, BASED): F features × head_dim per key/value head, F = d'
    /// (elu, relu), m (performer) or 1 + d' + d'² (Taylor). Checked (None:
    /// overflow).
    pub fn feature_state_bytes(&self) -> Option<usize> {
        let per_feature = self
            .kv_heads()
            .checked_mul(self.head_dim().checked_add(1)?)?;
        let mut total = 0usize;
        for (_, _, m, layers) in self.all_layer_mechanisms() {
            let (map, dim, m_features) = match m {
                MechanismConfig::Linear(c) => (c.feature_map, c.feature_dim, c.n_features),
                MechanismConfig::Based(c) => (FeatureMap::Taylor, c.feature_dim, 0),
                _ => continue,
            };
            let features = match map {
                FeatureMap::Elu | FeatureMap::Relu => dim,
                FeatureMap::Performer => m_features,
                FeatureMap::Taylor => dim.checked_mul(dim)?.checked_add(dim)?.checked_add(1)?,
            };
            let bytes = features.checked_mul(per_feature)?.checked_mul(4)?;
            total = total.checked_add(bytes.checked_mul(layers)?)?;
        }
        Some(total)
    }

    /// Bytes the model computes from its settings whatever the weights
    /// (RoPE tables as tensors and as f32 tables, a sinusoidal table), with
    /// checked arithmetic (None: overflow).
    pub fn computed_bytes(&self) -> Option<usize> {
        let rope = match self.position {
            PositionKind::Rope => self
                .max_len
                .checked_mul(self.head_dim())?
                .checked_mul(2 * 4)?,
            _ => 0,
        };
        let sin = match self.position {
            PositionKind::Sinusoidal => self.max_len.checked_mul(self.d_model)?.checked_mul(4)?,
            _ => 0,
        };
        rope.checked_add(sin)
    }

    /// The FFN width of block `i` (encoder blocks first).
    pub fn block_d_ff(&self, i: usize) -> usize {
        self.layer_d_ff.get(i).copied().unwrap_or(self.d_ff)
    }

    /// Check every constraint the model code relies on.
    pub fn validate(&self) -> Result<()> {
        self.validate_shape()?;
        match self.ffn_weights {
            FfnWeights::Dense => {}
            FfnWeights::Lowrank { rank } => {
                if rank == 0 {
                    return Err(Error::config("ffn_weights", "rank must be at least 1"));
                }
            }
            FfnWeights::Blockdiag { blocks } => {
                if blocks == 0
                    || !self.d_model.is_multiple_of(blocks)
                    || !self.d_ff.is_multiple_of(blocks)
                {
                    return Err(Error::config(
                        "ffn_weights",
                        format!(
                            "{blocks} blocks must divide d_model ({}) and d_ff ({})",
                            self.d_model, self.d_ff
                        ),
                    ));
                }
            }
        }
        if !self.matformer.is_empty() {
            let w = &self.matformer;
            if w[0] != self.d_ff || w.windows(2).any(|p| p[1] >= p[0]) || w.contains(&0) {
                return Err(Error::config(
                    "matformer",
                    format!(
                        "nested widths must start at d_ff ({}) and strictly decrease, got {w:?}",
                        self.d_ff
                    ),
                ));
            }
            if self.moe.is_some() || self.ffn_weights != FfnWeights::Dense {
                return Err(Error::config(
                    "matformer",
                    "nested widths slice dense FFN weights: not with a mixture of experts or structured weights",
                ));
            }
        }
        if !self.layer_d_ff.is_empty() {
            let layers = if self.has_encoder() {
                self.n_encoder_layers
            } else {
                0
            } + if self.has_decoder() {
                self.n_decoder_layers
            } else {
                0
            };
            if self.layer_d_ff.len() != layers || self.layer_d_ff.contains(&0) {
                return Err(Error::config(
                    "layer_d_ff",
                    format!(
                        "needs one positive width per block ({layers}), got {:?}",
                        self.layer_d_ff
                    ),
                ));
            }
            if self.moe.is_some() || self.ffn_weights != FfnWeights::Dense {
                return Err(Error::config(
                    "layer_d_ff",
                    "per-layer widths are for dense FFNs only",
                ));
            }
        }
        if let Some(m) = &self.moe {
            m.validate()?;
            if self.ffn_weights != FfnWeights::Dense {
                return Err(Error::config(
                    "moe",
                    "experts are dense FFNs: low-rank or block-diagonal weights are not supported with them",
                ));
            }
        }
        // what the mechanisms' settings alone ask for must fit
        let specs = || {
            let mut v: Vec<String> = self
                .all_layer_mechanisms()
                .iter()
                .map(|(_, _, m, _)| m.to_string())
                .filter(|s| s != "softmax")
                .collect();
            v.dedup();
            v.join(", ")
        };
        if self.mechanism_params() != Some(0) {
            crate::util::check_fits(
                "mechanism",
                &format!("(`{}`): the mechanisms' own parameters", specs()),
                self.mechanism_params().and_then(|n| n.checked_mul(4)),
            )?;
        }
        if self.feature_state_bytes() != Some(0) {
            crate::util::check_fits(
                "mechanism",
                &format!("(`{}`): the feature-map state of one sequence", specs()),
                self.feature_state_bytes(),
            )?;
        }
        // what the settings alone make the model allocate must fit
        crate::util::check_fits(
            "max_len",
            &format!("({}): the position tables", self.max_len),
            self.computed_bytes(),
        )?;
        Ok(())
    }

    fn validate_shape(&self) -> Result<()> {
        let positive = |field: &str, v: usize| {
            if v == 0 {
                Err(Error::config(field, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive("d_model", self.d_model)?;
        positive("n_heads", self.n_heads)?;
        positive("d_ff", self.d_ff)?;
        positive("vocab_size", self.vocab_size)?;
        positive("max_len", self.max_len)?;
        if self.max_len > MAX_POSITIONS {
            return Err(Error::config(
                "max_len",
                format!(
                    "({}) exceeds the {MAX_POSITIONS} positions attend supports",
                    self.max_len
                ),
            ));
        }
        if let Some(hd) = self.head_dim {
            positive("head_dim", hd)?;
        } else if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                "d_model",
                format!(
                    "({}) must be divisible by n_heads ({})",
                    self.d_model, self.n_heads
                ),
            ));
        }
        let kv = self.kv_heads();
        positive("n_kv_heads", kv)?;
        if !self.n_heads.is_multiple_of(kv) {
            return Err(Error::config(
                "n_heads",
                format!("({}) must be divisible by n_kv_heads ({kv})", self.n_heads),
            ));
        }
        match self.shape {
            Shape::Encoder => {
                positive("n_encoder_layers", self.n_encoder_layers)?;
                if self.n_decoder_layers != 0 {
                    return Err(Error::config(
                        "n_decoder_layers",
                        "must be 0 for shape `encoder`",
                    ));
                }
            }
            Shape::Decoder => {
                positive("n_decoder_layers", self.n_decoder_layers)?;
                if self.n_encoder_layers != 0 {
                    return Err(Error::config(
                        "n_encoder_layers",
                        "must be 0 for shape `decoder`",
                    ));
                }
            }
            Shape::EncoderDecoder => {
                positive("n_encoder_layers", self.n_encoder_layers)?;
                positive("n_decoder_layers", self.n_decoder_layers)?;
            }
        }
        if self.position == PositionKind::Rope {
            if !self.head_dim().is_multiple_of(2) {
                return Err(Error::config(
                    "position",
                    format!("rope needs an even head dimension, got {}", self.head_dim()),
                ));
            }
            if !is_positive(self.rope_theta) {
                return Err(Error::config("rope_theta", "must be positive"));
            }
            if self.rope_theta_window.is_some_and(|t| !is_positive(t)) {
                return Err(Error::config("rope_theta_window", "must be positive"));
            }
            if let Some(s) = &self.rope_scaling {
                s.validate(self.head_dim())?;
            }
        }
        if self.position == PositionKind::Sinusoidal && !self.d_model.is_multiple_of(2) {
            return Err(Error::config(
                "d_model",
                "sinusoidal positions need an even d_model",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config("dropout", "must be in [0, 1)"));
        }
        if !is_positive(self.norm_eps) {
            return Err(Error::config("norm_eps", "must be positive"));
        }
        self.validate_mechanisms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(s, Path::new("cfg.json"))
    }

    #[test]
    fn defaults_are_valid() {
        ModelConfig::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(r#"{"d_model": 100, "n_heads": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`d_model`") && e.contains("n_heads"), "{e}");
        let e = parse(r#"{"n_heads": 4, "n_kv_heads": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`n_heads`") && e.contains("n_kv_heads"), "{e}");
        let e = parse(r#"{"ffn": "gelu2"}"#).unwrap_err().to_string();
        assert!(e.contains("`ffn`") && e.contains("gelu2"), "{e}");
        let e = parse(r#"{"d_modle": 4}"#).unwrap_err().to_string();
        assert!(e.contains("d_modle"), "{e}");
        let e = parse(r#"{"shape": "encoder", "n_encoder_layers": 0, "n_decoder_layers": 0}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n_encoder_layers"), "{e}");
    }

    #[test]
    fn mechanism_specs_parse_and_round_trip() {
        let m = |s: &str| s.parse::<MechanismConfig>().unwrap();
        assert_eq!(m("softmax"), MechanismConfig::Softmax);
        assert_eq!(
            m("window:w=64"),
            MechanismConfig::Window(WindowConfig { window: 64 })
        );
        assert_eq!(
            m("linear:map=taylor,dim=16"),
            MechanismConfig::Linear(LinearConfig {
                feature_map: FeatureMap::Taylor,
                feature_dim: 16,
                ..LinearConfig::default()
            })
        );
        assert_eq!(
            m("based:dim=8,w=32,conv=4,chunk=16"),
            MechanismConfig::Based(BasedConfig {
                feature_dim: 8,
                window: 32,
                conv: 4,
                chunk: 16
            })
        );
        assert_eq!(
            m("decay:gamma=0.9"),
            MechanismConfig::Decay(DecayConfig {
                decay: Some(0.9),
                ..DecayConfig::default()
            })
        );
        assert_eq!(m("decay"), MechanismConfig::Decay(DecayConfig::default()));
        assert_eq!(m("gla"), MechanismConfig::Gla(GlaConfig::default()));
        for spec in [
            "softmax",
            "window:w=3",
            "linear:map=performer,dim=4,m=32,chunk=8",
            "linear:map=relu,dim=5,chunk=64",
            "based:dim=16,w=64,conv=3,chunk=64",
            "decay:gamma=0.25,chunk=4",
            "decay:gamma=retnet,chunk=64",
            "gla:rank=4,tau=8,chunk=16",
        ] {
            let c = m(spec);
            assert_eq!(c.to_string(), spec);
            assert_eq!(m(&c.to_string()), c);
        }
        // one spec per layer; settings after a comma continue the mechanism
        let l = MechanismConfig::parse_list("softmax,based:dim=16,w=16,based").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[1], m("based:dim=16,w=16"));
        assert_eq!(l[2], m("based"));
        assert_eq!(
            MechanismConfig::parse_list("gla; window:w=4").unwrap(),
            vec![m("gla"), m("window:w=4")]
        );
    }

    #[test]
    fn bad_mechanism_settings_name_the_setting() {
        let err = |s: &str| s.parse::<MechanismConfig>().unwrap_err().to_string();
        let e = err("window:w=0");
        assert!(e.contains("`window`") && e.contains("at least 1"), "{e}");
        let e = err("linear:map=taylor,dim=0");
        assert!(
            e.contains("`feature_dim`") && e.contains("at least 1"),
            "{e}"
        );
        let e = err("based:dim=0");
        assert!(e.contains("`feature_dim`"), "{e}");
        let e = err("based:conv=0");
        assert!(e.contains("`conv`"), "{e}");
        // w=0 is BASED without its window branch (the stack's linear layers)
        assert!("based:w=0".parse::<MechanismConfig>().is_ok());
        for g in ["1.5", "1", "0", "-0.1", "nan"] {
            let e = err(&format!("decay:gamma={g}"));
            assert!(e.contains("`decay`") && e.contains("(0, 1)"), "{e}");
        }
        let e = err("foo");
        assert!(
            e.contains("unknown mechanism `foo`") && e.contains("softmax, window"),
            "{e}"
        );
        let e = err("window:width=3");
        assert!(e.contains("`width`") && e.contains("window"), "{e}");
        let e = err("linear:map=cosh");
        assert!(
            e.contains("`feature_map`") && e.contains("cosh") && e.contains("taylor"),
            "{e}"
        );
        let e = err("linear:dim=x");
        assert!(e.contains("`feature_dim`") && e.contains("`x`"), "{e}");
        let e = err("gla:tau=0");
        assert!(e.contains("`tau`"), "{e}");
        let e = err("gla:chunk=0");
        assert!(e.contains("`chunk`"), "{e}");
        let e = err("window:3");
        assert!(e.contains("key=value"), "{e}");
    }

    #[test]
    fn mechanism_json_forms() {
        // the old form, spec strings and the tagged form
        assert_eq!(
            parse(r#"{"mechanism": "softmax"}"#).unwrap().mechanism,
            MechanismConfig::Softmax
        );
        let c = parse(r#"{"mechanism": {"window": {"window": 8}}}"#).unwrap();
        assert_eq!(
            c.mechanism,
            MechanismConfig::Window(WindowConfig { window: 8 })
        );
        let c = parse(r#"{"mechanism": {"linear": {"feature_map": "taylor"}}}"#).unwrap();
        assert_eq!(c.mechanism, "linear:map=taylor".parse().unwrap());
        let c = parse(r#"{"mechanism": "based:dim=8,w=16"}"#).unwrap();
        assert_eq!(c.mechanism, "based:dim=8,w=16".parse().unwrap());
        // serialized and read back; a uniform model writes no layer list
        let cfg = ModelConfig {
            mechanism: "gla:rank=4".parse().unwrap(),
            ..ModelConfig::default()
        };
        let text = serde_json::to_string(&cfg).unwrap();
        assert!(!text.contains("layer_mechanisms"), "{text}");
        assert_eq!(parse(&text).unwrap(), cfg);
        let text = serde_json::to_string(&ModelConfig::default()).unwrap();
        assert!(text.contains(r#""mechanism":"softmax""#), "{text}");
        // errors name the field and the setting
        let e = parse(r#"{"mechanism": {"window": {"window": 0}}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("window") && e.contains("at least 1"), "{e}");
        let e = parse(r#"{"mechanism": {"windw": {}}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`mechanism.windw`") && e.contains("unknown variant"),
            "{e}"
        );
        let e = parse(r#"{"mechanism": {"linear": {"feature_dim": 0}}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("feature_dim"), "{e}");
        let e = parse(r#"{"mechanism": "decay:gamma=2"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`mechanism`") && e.contains("decay") && e.contains("(0, 1)"),
            "{e}"
        );
    }

    #[test]
    fn mixed_stacks_are_validated_per_layer() {
        let e = parse(r#"{"n_decoder_layers": 2, "layer_mechanisms": ["softmax"]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`layer_mechanisms`") && e.contains("2 self-attention layers"),
            "{e}"
        );
        let c = parse(
            r#"{"shape": "encoder_decoder", "n_encoder_layers": 1, "n_decoder_layers": 2,
                "layer_mechanisms": ["linear", "gla", "window:w=4"]}"#,
        )
        .unwrap();
        assert_eq!(c.layer_mechanism(true, 0).name(), "linear");
        assert_eq!(c.layer_mechanism(false, 0).name(), "gla");
        assert_eq!(c.layer_mechanism(false, 1).name(), "window");
        // decay and GLA are causal only
        let e = parse(
            r#"{"shape": "encoder_decoder", "n_encoder_layers": 1, "n_decoder_layers": 1,
                "layer_mechanisms": ["gla", "gla"]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`gla`") && e.contains("causal only") && e.contains("encoder layer 0"),
            "{e}"
        );
        let e = parse(r#"{"mechanism": "linear", "position": "alibi"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("alibi") && e.contains("`linear`"), "{e}");
        let e = parse(r#"{"mechanism": "linear:dim=5", "position": "rope"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`feature_dim`") && e.contains("even"), "{e}");
        let e = parse(r#"{"n_decoder_layers": 2, "layer_mechanisms": ["softmax", "window:w=0"]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`layer_mechanisms[1]`") && e.contains("`window` must be at least 1"),
            "{e}"
        );
        let e = parse(
            r#"{"n_decoder_layers": 2, "layer_mechanisms": ["softmax", {"window": {"window": 0}}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`window`") && e.contains("decoder layer 1"),
            "{e}"
        );
    }

    #[test]
    fn the_based_stack_interleaves_linear_and_window_layers() {
        let m = |s: &str| s.parse::<MechanismConfig>().unwrap();
        assert_eq!(stack_preset("gla", 4).unwrap(), None);
        let lin = m("based:dim=16,w=0,conv=3");
        assert_eq!(
            stack_preset("based-stack", 4).unwrap().unwrap(),
            vec![lin.clone(), m("window:w=64"), lin.clone(), m("window:w=64")]
        );
        let lin = m("based:dim=8,w=0,conv=2,chunk=16");
        assert_eq!(
            stack_preset("based-stack:dim=8,w=32,conv=2,every=3,chunk=16", 6)
                .unwrap()
                .unwrap(),
            vec![
                lin.clone(),
                lin.clone(),
                m("window:w=32"),
                lin.clone(),
                lin,
                m("window:w=32")
            ]
        );
        for (spec, want) in [
            ("based-stack:every=0", "at least 1"),
            ("based-stack:w=0", "at least 1"),
            ("based-stack:dim=x", "`x` is not a whole number"),
            ("based-stack:depth=2", "unknown setting `depth`"),
            ("based-stack:dim=0", "feature_dim"),
        ] {
            let e = stack_preset(spec, 4).unwrap_err().to_string();
            assert!(e.contains(want), "{spec}: {e}");
        }
        // a BASED layer without its window has no window parameters
        let cfg = ModelConfig {
            mechanism: m("based:dim=4,w=0"),
            ..ModelConfig::default()
        };
        let with = ModelConfig {
            mechanism: m("based:dim=4,w=8"),
            ..ModelConfig::default()
        };
        assert!(cfg.mechanism_params().unwrap() < with.mechanism_params().unwrap());
    }
}
