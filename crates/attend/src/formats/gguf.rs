//! GGUF (llama.cpp's format): metadata → `ModelConfig`, tensors → the
//! `ParamStore` under attend's names, tokenizer and chat template from the
//! metadata. The file's own metadata is the source of truth; anything attend
//! cannot run is refused here with the reason.

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::kernels::quant::{Format, QMatrix};
use crate::nn::ParamStore;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use std::path::Path;

/// Llama 3's RoPE frequency divisors.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// A GGUF model: configuration, weights, and what the metadata says about text.
pub struct GgufModel {
    pub config: ModelConfig,
    pub store: ParamStore,
    pub tokenizer: super::tokenizer::Tokenizer,
    pub chat_template: Option<String>,
    /// Every metadata key with a short rendering of its value (for `inspect`).
    pub metadata: Vec<(String, String)>,
    /// Tensor types held, e.g. {"q4_1": 210, "f32": 61}.
    pub tensor_types: std::collections::BTreeMap<String, usize>,
    /// The file read.
    pub path: std::path::PathBuf,
    /// Its architecture (`general.architecture`).
    pub arch: &'static super::arch::Arch,
    /// Read from a Hugging Face folder (`hf_decoder`), not a GGUF file.
    pub hf: bool,
    /// The sampling the model's makers recommend, if the file says
    /// (`general.sampling.*`; generation_config.json): llama.cpp's defaults
    /// with what the file sets over them.
    pub sampling: Option<crate::decode::SamplingParams>,
}

impl GgufModel {
    /// The model this file describes. Strict: every tensor the model needs
    /// must be in the file (none is initialised at random) and every tensor
    /// in the file must be used; either failure names the file's tensor.
    pub fn build(&self) -> Result<crate::model::Transformer> {
        let path = &self.path;
        let layers = self.config.n_decoder_layers;
        // messages in the file's own names and keys
        let names = match (self.hf, self.arch.hf_names()) {
            (true, Some(n)) => n,
            _ => self.arch.gguf_names(),
        };
        let (count, whole) = if self.hf {
            (
                "config.json `num_hidden_layers`".to_string(),
                "config.json".to_string(),
            )
        } else {
            (
                format!("`{}.block_count`", self.arch.name),
                format!("`{}.*`", self.arch.name),
            )
        };
        let m = crate::model::Transformer::new(&self.config, &self.store).map_err(|e| match e {
            Error::MissingTensor { name, shape } => Error::file(
                path,
                format!(
                    "tensor `{}` is missing (a {layers}-layer model, {count}, needs it with shape {shape:?})",
                    names.theirs(&name),
                ),
            ),
            Error::ShapeMismatch { name, found, want } => Error::file(
                path,
                format!(
                    "tensor `{}` has shape {found:?}; the model the metadata describes ({whole}) needs {want:?}",
                    names.theirs(&name),
                ),
            ),
            e => e,
        })?;
        let unused = self.store.unused();
        if let Some(first) = unused.first() {
            let more = match unused.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            };
            return Err(Error::file(
                path,
                format!(
                    "tensor `{}`{more} is not used by a {layers}-layer model ({count})",
                    names.theirs(first),
                ),
            ));
        }
        Ok(m)
    }
}

fn render(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("[{} items]", a.len()),
        Value::String(s) if s.len() > 60 => {
            format!("{:?}…", &s.chars().take(60).collect::<String>())
        }
        other => format!("{other:?}"),
    }
}

/// Read a GGUF file. `dequantize`: hold every weight as f32 (exact reference
/// numerics) instead of keeping quantized matrices for quantized matmul.
pub fn load(path: &Path, dequantize: bool, device: &Device) -> Result<GgufModel> {
    // the header walked strictly first: candle's reader trusts it
    super::gguf_check::check(path)?;
    let mut file =
        std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    let ct = Content::read(&mut file)
        .map_err(|e| Error::file(path, format!("not a valid GGUF file ({})", first_line(&e))))?;
    let arch_name = match ct.metadata.get("general.architecture") {
        Some(Value::String(a)) => a.clone(),
        Some(other) => {
            return Err(Error::file(
                path,
                format!("GGUF metadata `general.architecture` is not a string: {other:?}"),
            ))
        }
        None => {
            return Err(Error::file(
                path,
                "missing GGUF metadata `general.architecture`",
            ))
        }
    };
    let Some(arch) = super::arch::find(&arch_name) else {
        let known: Vec<&str> = super::arch::ARCHS.iter().map(|a| a.name).collect();
        return Err(Error::file(
            path,
            format!(
                "unsupported architecture `{arch_name}` (attend runs {})",
                known.join(", ")
            ),
        ));
    };
    let meta = super::arch::Meta {
        ct: &ct,
        path,
        arch: arch.name,
    };
    let context = meta.usize("context_length")?;
    if context > crate::config::MAX_POSITIONS {
        return Err(Error::file(
            path,
            format!(
                "`{}` is {context}, more than the {} positions attend supports",
                meta.key("context_length"),
                crate::config::MAX_POSITIONS
            ),
        ));
    }
    let tokenizer = super::tokenizer::Tokenizer::from_gguf(&ct, path)?;
    let mut config = ModelConfig {
        vocab_size: tokenizer.vocab_size(),
        max_len: context,
        tie_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        ..(arch.config)(&meta)?
    };
    if ct.tensor_infos.contains_key(ROPE_FREQS) {
        // Llama 3's RoPE scaling: a divisor per frequency
        let f: Vec<f32> = ct
            .tensor(&mut file, ROPE_FREQS, device)
            .and_then(|q| q.dequantize(device)?.flatten_all()?.to_vec1())
            .map_err(|e| Error::file(path, format!("tensor `{ROPE_FREQS}`: {}", first_line(&e))))?;
        let half = config
            .head_dim
            .unwrap_or(config.d_model / config.n_heads.max(1))
            / 2;
        if f.len() != half || !f.iter().all(|&x| x > 0.0) {
            return Err(Error::file(
                path,
                format!(
                    "tensor `{ROPE_FREQS}` holds {} numbers; heads of {} need {half} positive ones",
                    f.len(),
                    2 * half
                ),
            ));
        }
        config.rope_scaling = Some(RopeScaling::Factors(f.iter().map(|&x| x as f64).collect()));
    }
    config.validate().map_err(|e| Error::file(path, e))?;

    // the weights as they will be held: quantized matrices as stored (the
    // embedding too: rows are dequantized as they are looked up), the rest
    // (and everything under --dequantize) as f32
    let need = ct.tensor_infos.iter().try_fold(0usize, |acc, (_, info)| {
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))?;
        let stored =
            (elems / info.ggml_dtype.block_size()).checked_mul(info.ggml_dtype.type_size())?;
        let dense = elems.checked_mul(4)?;
        let float = matches!(
            info.ggml_dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
        let quantized = !float && !dequantize;
        let b = if quantized && info.shape.dims().len() == 2 {
            stored
        } else {
            dense
        };
        acc.checked_add(b)
    });
    let what = if dequantize {
        "its weights dequantized to f32 (--dequantize)"
    } else {
        "its weights"
    };
    if let Some(msg) = crate::util::over_limit(what, need) {
        return Err(Error::file(path, msg));
    }
    let store = ParamStore::strict(DType::F32, device.clone());
    // Safety: the mapping is read while the file is open; a file changed
    // underneath a running model gives wrong weights, not unsafety in
    // attend's code (which only reads the bytes), as for candle's mapped
    // safetensors
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| Error::file(path, format!("cannot map: {e}")))?;
    let mut tensor_types = std::collections::BTreeMap::new();
    let names = arch.gguf_names();
    let mut tensors: Vec<&String> = ct.tensor_infos.keys().collect();
    tensors.sort();
    for name in tensors {
        // attend's parameters in this tensor: one, or the row blocks of a
        // fused one (None: the whole tensor)
        let parts: Vec<(String, Option<usize>)> =
            match (names.split(name, &config), names.ours(name)) {
                (Some(p), _) => p.into_iter().map(|(o, r)| (o, Some(r))).collect(),
                (None, Some(o)) => vec![(o, None)],
                // precomputed RoPE tables (attend computes its own) and the
                // scaling read above
                (None, None) if name.starts_with("rope_") => continue,
                (None, None) => {
                    return Err(Error::file(
                        path,
                        format!(
                            "unexpected tensor `{name}` for architecture `{}`",
                            arch.name
                        ),
                    ))
                }
            };
        let info = &ct.tensor_infos[name];
        *tensor_types
            .entry(format!("{:?}", info.ggml_dtype).to_lowercase())
            .or_insert(0) += 1;
        let float = matches!(
            info.ggml_dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
        let dims = info.shape.dims();
        let bad = |e: String| Error::file(path, format!("tensor `{name}`: {e}"));
        // a fused tensor's rows must be its parts'
        let rows = dims.first().copied().unwrap_or(0);
        let want: usize = parts.iter().map(|(_, r)| r.unwrap_or(rows)).sum();
        if parts.len() > 1 && (dims.len() != 2 || want != rows) {
            return Err(bad(format!(
                "has shape {dims:?}; the metadata's heads and FFN need {want} rows ({})",
                parts
                    .iter()
                    .map(|(o, r)| format!(
                        "{} {}",
                        r.unwrap_or(0),
                        o.rsplit('.').nth(1).unwrap_or(o)
                    ))
                    .collect::<Vec<_>>()
                    .join(" + ")
            )));
        }
        if let ([rows, cols], false, false) = (dims, float, dequantize) {
            // a quantized matrix: repacked for the kernels from the mapping
            let fmt = Format::of_ggml(info.ggml_dtype)
                .ok_or_else(|| bad(format!("type {:?} is not supported", info.ggml_dtype)))?;
            let (bs, ts) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
            let row_bytes = cols / bs * ts;
            let at = (ct.tensor_data_offset as usize).checked_add(info.offset as usize);
            let end = rows
                .checked_mul(row_bytes)
                .zip(at)
                .and_then(|(size, at)| Some(at..at.checked_add(size)?));
            let bytes = end
                .and_then(|r| map.get(r))
                .ok_or_else(|| bad("its data lies past the end of the file".into()))?;
            let mut r0 = 0;
            for (ours, n) in parts {
                let n = n.unwrap_or(*rows);
                let part = &bytes[r0 * row_bytes..(r0 + n) * row_bytes];
                let m = QMatrix::from_ggml(fmt, n, *cols, part).map_err(|e| bad(e.0))?;
                store.insert_quantized(&ours, m);
                r0 += n;
            }
        } else {
            let t = ct
                .tensor(&mut file, name, device)
                .and_then(|q| q.dequantize(device))
                .map_err(|e| bad(first_line(&e)))?;
            let mut r0 = 0;
            for (ours, n) in parts {
                let part = match n {
                    Some(n) => t.narrow(0, r0, n)?.contiguous()?,
                    None => t.clone(),
                };
                r0 += n.unwrap_or(0);
                store.insert([(ours, part)].into())?;
            }
        }
    }
    let chat_template = ct
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let mut metadata: Vec<(String, String)> = ct
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), render(v)))
        .collect();
    metadata.sort();
    Ok(GgufModel {
        config,
        store,
        tokenizer,
        chat_template,
        metadata,
        tensor_types,
        path: path.to_path_buf(),
        arch,
        hf: false,
        sampling: recommended_sampling(&ct),
    })
}

/// `general.sampling.*` (llama.cpp's keys) over llama.cpp's defaults, if
/// the file sets any.
fn recommended_sampling(ct: &Content) -> Option<crate::decode::SamplingParams> {
    let num = |k: &str| -> Option<f64> {
        match ct.metadata.get(&format!("general.sampling.{k}"))? {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            v => v
                .to_u64()
                .ok()
                .map(|x| x as f64)
                .or(v.to_i64().ok().map(|x| x as f64)),
        }
    };
    let keys = [
        "temp",
        "top_k",
        "top_p",
        "min_p",
        "penalty_repeat",
        "penalty_last_n",
    ];
    if keys.iter().all(|k| num(k).is_none()) {
        return None;
    }
    let d = crate::decode::SamplingParams::llama_cpp();
    let p = crate::decode::SamplingParams {
        temperature: num("temp").unwrap_or(d.temperature),
        top_k: num("top_k").map_or(d.top_k, |x| x as usize),
        top_p: num("top_p").unwrap_or(d.top_p),
        min_p: num("min_p").unwrap_or(d.min_p),
        repeat_penalty: num("penalty_repeat").unwrap_or(d.repeat_penalty),
        penalty_last_n: num("penalty_last_n").map_or(d.penalty_last_n, |x| x as usize),
        ..d
    };
    // a recommendation attend cannot use is ignored, not an error
    p.validate().is_ok().then_some(p)
}

/// The message of a candle error without the backtrace candle appends when
/// RUST_BACKTRACE is set.
fn first_line(e: &candle_core::Error) -> String {
    e.to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}
