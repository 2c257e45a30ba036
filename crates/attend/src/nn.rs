//! Parameters and the small layers everything else is built from.
//!
//! `ParamStore` owns every trainable tensor by name (the names are the
//! checkpoint's names). A model is built through a `Builder`, which returns a
//! stored tensor when one of that name exists (a loaded checkpoint) and
//! otherwise initialises a fresh one from the store's seeded RNG, so the same
//! seed always builds the same model.

use crate::error::{Error, Result};
use crate::kernels::quant::QMatrix;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// How a fresh parameter is initialised.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Zeros,
    Ones,
    Normal(f64),
    /// U(-b, b) with b = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010).
    XavierUniform,
}

pub struct ParamStore {
    vars: Mutex<BTreeMap<String, Var>>,
    /// Quantized weights (GGUF), used as-is by `Builder::linear`.
    quantized: Mutex<BTreeMap<String, Arc<QMatrix>>>,
    rng: Mutex<ChaCha8Rng>,
    pub dtype: DType,
    pub device: Device,
    /// Loading a file: a parameter the model asks for and the store lacks
    /// is an error (`Error::MissingTensor`), never random.
    strict: bool,
    /// Names the model asked for (to find what a file holds but nothing uses).
    used: Mutex<std::collections::BTreeSet<String>>,
}

impl ParamStore {
    /// A store for training: parameters the model asks for and the store
    /// lacks are initialised from the seeded RNG.
    pub fn new(seed: u64, dtype: DType, device: Device) -> Self {
        Self {
            vars: Mutex::new(BTreeMap::new()),
            quantized: Mutex::new(BTreeMap::new()),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            dtype,
            device,
            strict: false,
            used: Mutex::new(Default::default()),
        }
    }

    /// A store for loading a file: every parameter must come from it.
    pub fn strict(dtype: DType, device: Device) -> Self {
        Self {
            strict: true,
            ..Self::new(0, dtype, device)
        }
    }

    /// Names held (dense or quantized) that no model construction asked
    /// for, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap();
        let mut out: Vec<String> = self
            .names()
            .into_iter()
            .filter(|n| !used.contains(n))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    pub fn builder(&self) -> Builder<'_> {
        Builder {
            store: self,
            prefix: String::new(),
        }
    }

    /// All parameters, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let vars = self.vars.lock().unwrap();
        vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn num_params(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Insert quantized weights (GGUF, repacked for `kernels::quant`)
    /// before building the model.
    pub fn insert_quantized(&self, name: &str, t: QMatrix) {
        self.quantized
            .lock()
            .unwrap()
            .insert(name.to_string(), Arc::new(t));
    }

    /// Let go of the quantized weights once the model is built (its layers
    /// share them), so that dropping the model frees them.
    pub fn release_quantized(&self) {
        self.quantized.lock().unwrap().clear();
    }

    fn get_quantized(&self, name: &str) -> Option<Arc<QMatrix>> {
        let q = self.quantized.lock().unwrap().get(name).cloned();
        if q.is_some() {
            self.used.lock().unwrap().insert(name.to_string());
        }
        q
    }

    /// Names of every weight held, dense or quantized.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.vars.lock().unwrap().keys().cloned().collect();
        n.extend(self.quantized.lock().unwrap().keys().cloned());
        n
    }

    /// Insert tensors (e.g. from a checkpoint) before building the model.
    pub fn insert(&self, tensors: BTreeMap<String, Tensor>) -> Result<()> {
        let mut vars = self.vars.lock().unwrap();
        for (name, t) in tensors {
            let t = t.to_dtype(self.dtype)?.to_device(&self.device)?;
            vars.insert(name, Var::from_tensor(&t)?);
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = self
            .vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        crate::util::write_atomic_with(path, |tmp| {
            candle_core::safetensors::save(&map, tmp).map_err(|e| Error::file(tmp, e))
        })
    }

    /// Load a safetensors file into the store; every tensor must be used by the
    /// model that is built afterwards (checked by `check_all_used`).
    pub fn load(&self, path: &Path) -> Result<()> {
        let tensors = load_safetensors(path, &self.device)?;
        self.insert(tensors.into_iter().collect())
    }

    fn get_or_init(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let mut vars = self.vars.lock().unwrap();
        if let Some(v) = vars.get(name) {
            self.used.lock().unwrap().insert(name.to_string());
            if v.dims() != shape {
                return Err(Error::ShapeMismatch {
                    name: name.to_string(),
                    found: v.dims().to_vec(),
                    want: shape.to_vec(),
                });
            }
            return Ok(v.as_tensor().clone());
        }
        if self.strict {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                shape: shape.to_vec(),
            });
        }
        let n: usize = shape.iter().product();
        let mut rng = self.rng.lock().unwrap();
        let data: Vec<f64> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal(std) => (0..n).map(|_| std * normal(&mut *rng)).collect(),
            Init::XavierUniform => {
                let (fan_out, fan_in) = match shape {
                    [o, i] | [_, o, i] => (*o, *i),
                    _ => (n, n),
                };
                let b = (6.0 / (fan_in + fan_out) as f64).sqrt();
                (0..n).map(|_| rng.random_range(-b..b)).collect()
            }
        };
        let t = Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(out)
    }
}

/// Read a safetensors file with a clear error for missing or corrupt files.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::file(path, "file not found"));
    }
    let map = candle_core::safetensors::load(path, device)
        .map_err(|e| Error::file(path, format!("not a valid safetensors file ({e})")))?;
    Ok(map.into_iter().collect())
}

/// A standard normal sample (Box–Muller), from any RNG.
pub fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A view into the store under a name prefix (`decoder.layers.0.attn.`).
#[derive(Clone)]
pub struct Builder<'a> {
    store: &'a ParamStore,
    prefix: String,
}

impl<'a> Builder<'a> {
    pub fn pp(&self, name: impl std::fmt::Display) -> Builder<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Builder {
            store: self.store,
            prefix,
        }
    }

    /// The full name `name` gets under this builder's prefix.
    pub fn path(&self, name: &str) -> String {
        self.full(name)
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn get(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.store.get_or_init(&self.full(name), shape, init)
    }

    /// The quantized weight `name` (shape (out, in)) if the store holds one.
    pub fn quantized(&self, name: &str, shape: &[usize]) -> Result<Option<Weight>> {
        let full = self.full(name);
        match self.store.get_quantized(&full) {
            None => Ok(None),
            Some(q) => {
                if [q.rows, q.cols] != shape {
                    return Err(Error::ShapeMismatch {
                        name: full,
                        found: vec![q.rows, q.cols],
                        want: shape.to_vec(),
                    });
                }
                Ok(Some(Weight::Q(q)))
            }
        }
    }

    pub fn device(&self) -> &Device {
        &self.store.device
    }

    pub fn dtype(&self) -> DType {
        self.store.dtype
    }
}

/// A linear layer's weight: dense (trainable) or quantized (GGUF, inference).
#[derive(Clone, Debug)]
pub enum Weight {
    /// (out, in), as in PyTorch.
    Dense(Tensor),
    /// A GGUF weight (any quantized or float type), repacked for
    /// `kernels::quant` (inference only).
    Q(Arc<crate::kernels::quant::QMatrix>),
    /// Vector-wise int8, with LLM.int8's outlier columns when it has a
    /// threshold (`kernels::quant::int8`; inference only).
    Int8(Arc<crate::kernels::quant::int8::Int8Matrix>),
    /// Low-rank W = up · down: down (r, in), up (out, r) (trainable).
    LowRank { down: Tensor, up: Tensor },
    /// Block-diagonal W: (b, out/b, in/b), block j mapping input columns
    /// j·in/b.. to output columns j·out/b.. (trainable).
    BlockDiag(Tensor),
}

impl Weight {
    /// (out, in)
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Weight::Dense(t) => t.dims2()?,
            Weight::Q(m) => (m.rows, m.cols),
            Weight::Int8(m) => (m.rows, m.cols),
            Weight::LowRank { down, up } => (up.dim(0)?, down.dim(1)?),
            Weight::BlockDiag(t) => {
                let (b, o, i) = t.dims3()?;
                (b * o, b * i)
            }
        })
    }

    /// The dense (out, in) matrix this weight stands for, when it is a
    /// float one (dense, low-rank or block-diagonal).
    pub fn to_dense(&self) -> Result<Option<Tensor>> {
        Ok(match self {
            Weight::Dense(t) => Some(t.clone()),
            Weight::LowRank { down, up } => Some(up.matmul(down)?),
            Weight::BlockDiag(t) => {
                let (b, o, i) = t.dims3()?;
                let mut rows = vec![];
                for j in 0..b {
                    let blk = t.get(j)?;
                    let mut parts = vec![];
                    if j > 0 {
                        parts.push(Tensor::zeros((o, j * i), t.dtype(), t.device())?);
                    }
                    parts.push(blk);
                    if j + 1 < b {
                        parts.push(Tensor::zeros((o, (b - j - 1) * i), t.dtype(), t.device())?);
                    }
                    rows.push(Tensor::cat(&parts, 1)?);
                }
                Some(Tensor::cat(&rows, 0)?)
            }
            Weight::Q(_) | Weight::Int8(_) => None,
        })
    }

    /// Bytes the weight holds.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(t) | Weight::BlockDiag(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::LowRank { down, up } => {
                (down.elem_count() + up.elem_count()) * down.dtype().size_in_bytes()
            }
            Weight::Q(m) => m.bytes(),
            Weight::Int8(m) => m.bytes(),
        }
    }
}

/// y = x Wᵀ + b, with W of shape (out, in) as in PyTorch.
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: Weight,
    pub b: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: &Builder, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let w = match vb.quantized("weight", &[d_out, d_in])? {
            Some(q) => q,
            None => Weight::Dense(vb.get("weight", &[d_out, d_in], Init::XavierUniform)?),
        };
        let b = if bias {
            Some(vb.get("bias", &[d_out], Init::Zeros)?)
        } else {
            None
        };
        Ok(Self { w, b })
    }

    /// A layer whose weight is parameterised as `kind` says: dense, low-rank
    /// (`down` (r, in) and `up` (out, r)) or block-diagonal (`blocks` (b,
    /// out/b, in/b)).
    pub fn structured(
        vb: &Builder,
        d_in: usize,
        d_out: usize,
        bias: bool,
        kind: crate::config::FfnWeights,
    ) -> Result<Self> {
        use crate::config::FfnWeights;
        let w = match kind {
            FfnWeights::Dense => return Self::new(vb, d_in, d_out, bias),
            FfnWeights::Lowrank { rank } => Weight::LowRank {
                down: vb.get("down", &[rank, d_in], Init::XavierUniform)?,
                up: vb.get("up", &[d_out, rank], Init::XavierUniform)?,
            },
            FfnWeights::Blockdiag { blocks } => Weight::BlockDiag(vb.get(
                "blocks",
                &[blocks, d_out / blocks, d_in / blocks],
                Init::XavierUniform,
            )?),
        };
        let b = if bias {
            Some(vb.get("bias", &[d_out], Init::Zeros)?)
        } else {
            None
        };
        Ok(Self { w, b })
    }

    /// x: (..., in) -> (..., out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = *dims.last().unwrap();
        let rows = x.elem_count() / d_in;
        let x2 = x.reshape((rows, d_in))?;
        let y = match &self.w {
            Weight::Dense(w) => x2.matmul(&w.t()?)?,
            Weight::Q(m) => m.matmul(&x2)?,
            Weight::Int8(m) => m.matmul(&x2)?,
            Weight::LowRank { down, up } => x2.matmul(&down.t()?)?.matmul(&up.t()?)?,
            Weight::BlockDiag(w) => {
                // (rows, b, in/b) -> (b, rows, in/b) · (b, in/b, out/b) -> (rows, b·out/b)
                let (b, o, i) = w.dims3()?;
                x2.reshape((rows, b, i))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .matmul(&w.transpose(1, 2)?)?
                    .transpose(0, 1)?
                    .reshape((rows, b * o))?
            }
        };
        let y = match &self.b {
            Some(b) => crate::kernels::add_rows(&y, b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(1)?;
        Ok(y.reshape(out)?)
    }
}

/// Embedding tables are dense or quantized, never factorised.
fn structured_table() -> Error {
    Error::msg("an embedding table cannot be low-rank or block-diagonal")
}

/// Token embedding table (vocab, d).
#[derive(Clone, Debug)]
pub struct Embedding {
    /// The (vocab, d) table: dense (trainable), or a GGUF table kept in its
    /// quantized type, rows dequantized as they are looked up (Gemma 3's
    /// 262,144 × 640 table is 671 MB as f32, 178 MB as stored).
    pub w: Weight,
}

impl Embedding {
    pub fn new(vb: &Builder, vocab: usize, d: usize) -> Result<Self> {
        if let Some(w) = vb.quantized("weight", &[vocab, d])? {
            return Ok(Self { w });
        }
        let table = vb.get("weight", &[vocab, d], Init::Normal((d as f64).powf(-0.5)))?;
        Ok(Self {
            w: Weight::Dense(table),
        })
    }

    /// (vocab, d)
    pub fn dims(&self) -> Result<(usize, usize)> {
        self.w.dims()
    }

    /// Where the table lives (a quantized one on the CPU).
    pub fn device(&self) -> Device {
        match &self.w {
            Weight::Dense(t) | Weight::BlockDiag(t) | Weight::LowRank { up: t, .. } => {
                t.device().clone()
            }
            Weight::Q(_) | Weight::Int8(_) => Device::Cpu,
        }
    }

    /// The table's numbers are f32 on the CPU (or quantized there): what
    /// the CPU executor reads.
    pub fn on_cpu_f32(&self) -> bool {
        match &self.w {
            Weight::Dense(t) => t.device().is_cpu() && t.dtype() == DType::F32,
            Weight::Q(_) | Weight::Int8(_) => true,
            Weight::LowRank { .. } | Weight::BlockDiag(_) => false,
        }
    }

    /// Rows `ids` of the table into `out` (ids.len() × d), f32; an id
    /// outside the vocabulary is an error.
    pub fn rows_into(&self, ids: &[u32], out: &mut [f32]) -> Result<()> {
        let (vocab, d) = self.dims()?;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::msg(format!(
                "token id {id} is outside the vocabulary of {vocab}"
            )));
        }
        match &self.w {
            Weight::Q(m) => {
                for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
                    m.dequantize_row(id as usize, row);
                }
            }
            Weight::Int8(m) => {
                for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
                    m.dequantize_row(id as usize, row);
                }
            }
            Weight::Dense(t) => with_f32(t, |table| {
                for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
                    row.copy_from_slice(&table[id as usize * d..][..d]);
                }
            })?,
            Weight::LowRank { .. } | Weight::BlockDiag(_) => return Err(structured_table()),
        }
        Ok(())
    }

    /// ids: (b, t) u32 -> (b, t, d)
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        match &self.w {
            Weight::Dense(table) => {
                let d = table.dim(1)?;
                let flat = ids.flatten_all()?;
                Ok(table.index_select(&flat, 0)?.reshape((b, t, d))?)
            }
            Weight::LowRank { .. } | Weight::BlockDiag(_) => Err(structured_table()),
            Weight::Q(_) | Weight::Int8(_) => {
                let d = self.w.dims()?.1;
                let ids = ids.flatten_all()?.to_vec1::<u32>()?;
                let mut x = vec![0f32; ids.len() * d];
                self.rows_into(&ids, &mut x)?;
                Ok(Tensor::from_vec(x, (b, t, d), &Device::Cpu)?)
            }
        }
    }
}

thread_local! {
    /// The dropout RNG of this thread: `Some` while training. Thread-local so
    /// that data-parallel shards draw independent, reproducible masks.
    static DROPOUT_RNG: std::cell::RefCell<Option<ChaCha8Rng>> = const { std::cell::RefCell::new(None) };
}

/// Turn dropout on for the current thread with masks drawn from `seed`
/// (training), or off with `None` (evaluation).
pub fn set_dropout_seed(seed: Option<u64>) {
    DROPOUT_RNG.with(|r| *r.borrow_mut() = seed.map(ChaCha8Rng::seed_from_u64));
}

/// Inverted dropout: identity unless this thread is training
/// (`set_dropout_seed(Some(..))`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Dropout {
    pub p: f64,
}

impl Dropout {
    pub fn new(p: f64) -> Self {
        Self { p }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let mask: Option<Vec<f32>> = DROPOUT_RNG.with(|r| {
            r.borrow_mut().as_mut().map(|rng| {
                (0..x.elem_count())
                    .map(|_| {
                        if rng.random::<f64>() < keep {
                            (1.0 / keep) as f32
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
        });
        match mask {
            None => Ok(x.clone()),
            Some(mask) => {
                let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
                Ok((x * mask)?)
            }
        }
    }
}

/// Softmax over the last dimension (fused kernel, differentiable).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::softmax_last(x)?)
}

/// log-softmax over the last dimension (fused kernel, differentiable).
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::log_softmax_last(x)?)
}

/// Batched matmul over any number of leading dimensions (candle's CPU
/// matmul takes at most two): a (…, m, k) @ b (…, k, n) -> (…, m, n).
pub fn matmul_nd(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ad, bd) = (a.dims(), b.dims());
    let r = ad.len();
    if r <= 4 {
        return Ok(a.matmul(b)?);
    }
    let batch: usize = ad[..r - 2].iter().product();
    let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
    let y = a
        .reshape((batch, m, k))?
        .matmul(&b.reshape((batch, k, n))?)?;
    let mut out = ad[..r - 2].to_vec();
    out.extend([m, n]);
    Ok(y.reshape(out)?)
}

/// `f` on the numbers of an f32 tensor on the CPU, read in place.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
            Ok(f(&v[a..b]))
        }
        _ => Err(Error::msg(format!(
            "the CPU executor needs contiguous f32 CPU tensors, got {:?} on {:?}",
            t.dtype(),
            t.device().location()
        ))),
    }
}

/// How `Linear::to_int8` holds a weight: plain vector-wise int8, or
/// LLM.int8 with its outlier threshold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Int8Mode {
    /// Every activation column in int8.
    Plain,
    /// Activation columns whose |x| exceeds the threshold stay in f32
    /// (against a 16-bit copy of the weights).
    LlmInt8 { threshold: f32 },
}

impl Linear {
    /// Hold the weight in vector-wise int8 (`kernels::quant::int8`). The
    /// weight must be a float tensor: quantized weights are refused.
    pub fn to_int8(&mut self, mode: Int8Mode) -> Result<()> {
        let Weight::Dense(w) = &self.w else {
            let fmt = match &self.w {
                Weight::Q(m) => m.fmt.name(),
                Weight::LowRank { .. } | Weight::BlockDiag(_) => {
                    return Err(Error::msg(
                        "int8 takes dense weights; this model's FFN weights are low-rank or block-diagonal",
                    ))
                }
                _ => "int8",
            };
            return Err(Error::msg(format!(
                "the weights are already quantized ({fmt}); int8 starts from float weights"
            )));
        };
        let (rows, cols) = w.dims2()?;
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let threshold = match mode {
            Int8Mode::Plain => None,
            Int8Mode::LlmInt8 { threshold } => Some(threshold),
        };
        let m = crate::kernels::quant::int8::Int8Matrix::quantize(&data, rows, cols, threshold)
            .map_err(|e| Error::msg(e.0))?;
        self.w = Weight::Int8(Arc::new(m));
        Ok(())
    }
}
