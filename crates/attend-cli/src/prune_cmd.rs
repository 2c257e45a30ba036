//! `attend prune-sweep`: cheaper models without retraining, measured on one
//! model side by side (issue 15). Each method at several strengths —
//! FFN-SkipLLM's per-token FFN skipping, the FFNs, attention sublayers
//! and whole layers that LLM-Drop's similarity ranking drops, vector-wise
//! int8 with and without LLM.int8's outliers — scored on held-out text
//! (perplexity), timed decoding, and sized (KV-cache and weight bytes).
//! Writes results.json, table.md and plot.svg.

use crate::kv_cmd::command_line;
use crate::load::{describe_drop, load_model, Loaded, WeightArgs};
use crate::train_cmd::{log_line, print_report, progress};
use anyhow::{bail, Context, Result};
use attend::eval::report::{markdown_table, plot_svg, Axes, Series};
use attend::model::prune::{auto_drop, FfnSkip, Probe};
use attend::model::Skip;
use attend::nn::Int8Mode;
use attend::Transformer;
use candle_core::{Device, Tensor};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct PruneSweepArgs {
    /// A GGUF file or Hugging Face decoder folder (default: SmolLM2 from
    /// scripts/fetch-models).
    #[arg(long)]
    model: Option<PathBuf>,
    /// UTF-8 text: its first --calibration-tokens rank the sublayers, the
    /// next --eval-tokens are held out for perplexity (default:
    /// ../shared/data/tinyshakespeare.txt).
    #[arg(long)]
    file: Option<PathBuf>,
    #[arg(long, default_value_t = 4096)]
    calibration_tokens: usize,
    #[arg(long, default_value_t = 8192)]
    eval_tokens: usize,
    /// Perplexity windows (scored on their own, as `attend perplexity`).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Decode speed: greedy tokens after a 128-token held-out prompt, one
    /// sequence, as `generate` decodes; each variant timed in --rounds
    /// rounds alternating with the model it is compared with (medians).
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// --ffn-skip ratios, and as many FFNs (ratio × layers) dropped by
    /// similarity for comparison.
    #[arg(long, value_delimiter = ',', default_values_t = [0.1f64, 0.25, 0.35])]
    ffn_ratios: Vec<f64>,
    /// Attention sublayers dropped by similarity.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 3, 4, 6, 8, 12])]
    attn_drops: Vec<usize>,
    /// Whole layers dropped by similarity.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4])]
    layer_drops: Vec<usize>,
    /// LLM.int8's outlier threshold (|x| above it stays in f32).
    #[arg(long, default_value_t = 6.0)]
    int8_threshold: f32,
    /// Leave out the int8 runs (they load an f32 copy of the model).
    #[arg(long)]
    no_int8: bool,
    /// 1,024 calibration and 1,024 held-out tokens, windows of 256, 16
    /// decode tokens, one strength of each: about a minute.
    #[arg(long)]
    quick: bool,
    /// Where results.json, table.md and plot.svg go.
    #[arg(long, default_value = "prune-sweep")]
    out: PathBuf,
    /// Print results.json to stdout.
    #[arg(long)]
    json: bool,
}

/// One model variant and what it measured.
#[derive(serde::Serialize)]
struct Run {
    method: String,
    spec: String,
    /// What was dropped, as layer lists.
    dropped: Option<String>,
    perplexity: f64,
    mean_nll: f64,
    /// Change against the run it is compared with (the model as loaded,
    /// or its f32 copy for the int8 runs).
    vs: String,
    delta_pct: f64,
    decode_tokens_per_sec: f64,
    speedup: f64,
    /// KV cache after a --ctx-token prefill.
    kv_bytes: usize,
    /// Weights held (dropped sublayers' left out).
    weight_bytes: usize,
    /// FFN evaluations skipped in the held-out scoring (--ffn-skip).
    ffn_skipped: Option<f64>,
    /// int8 runs: products with an outlier column, and outlier columns per
    /// product, in the held-out scoring.
    outlier_products: Option<f64>,
    outlier_cols_per_product: Option<f64>,
    /// The same by the input a matrix reads.
    outliers_by_input: Option<Vec<OutliersAt>>,
}

/// LLM.int8 outliers in the products that read one kind of input.
#[derive(serde::Serialize)]
struct OutliersAt {
    input: &'static str,
    products_with_outliers: f64,
    cols_per_product: f64,
}

/// Outliers met by the int8 matrices of `m`, by the input they read:
/// the normed residual stream before attention (q, k, v), the attention
/// output (o), the normed stream before the FFN (gate, up), the FFN's
/// hidden activation (down).
fn outliers_by_input(m: &Transformer) -> Vec<OutliersAt> {
    use attend::kernels::quant::int8::OutlierStats;
    use attend::nn::{Linear, Weight};
    let stats = |ls: Vec<&Linear>| {
        let mut s = OutlierStats::default();
        for l in ls {
            if let Weight::Int8(w) = &l.w {
                s.add(w.stats(false));
            }
        }
        s
    };
    let mut out = vec![];
    type Pick = fn(&attend::model::Block) -> &Linear;
    let kinds: [(&'static str, Pick); 4] = [
        ("attention input (q, k, v)", |b| &b.self_attn.q_proj),
        ("attention output (o)", |b| &b.self_attn.o_proj),
        ("FFN input (gate, up)", |b| &b.ffn.w1),
        ("FFN hidden (down)", |b| &b.ffn.w2),
    ];
    for (input, pick) in kinds {
        let s = stats(m.decoder.iter().map(pick).collect());
        out.push(OutliersAt {
            input,
            products_with_outliers: s.with_outliers as f64 / s.products.max(1) as f64,
            cols_per_product: s.outlier_cols as f64 / s.products.max(1) as f64,
        });
    }
    out
}

/// Greedy decode tokens/s of one run of `tokens` after `prompt` (the
/// prefill not timed).
fn decode_once(m: &Transformer, prompt: &[u32], tokens: usize) -> Result<f64> {
    let argmax = |t: Tensor| -> Result<u32> { Ok(t.flatten_all()?.argmax(0)?.to_scalar::<u32>()?) };
    let mut st = m.new_state(None)?;
    let p = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let mut next = argmax(m.step_last(&p, &mut st)?)?;
    let t0 = Instant::now();
    for _ in 0..tokens {
        next = argmax(m.step_last(&Tensor::new(&[[next]], &Device::Cpu)?, &mut st)?)?;
    }
    Ok(tokens as f64 / t0.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

/// Decode speed of `m` and its speed-up over `reference`, timed in
/// alternating rounds (reference, m, reference, m, …) so that a slow
/// moment of the machine falls on both: (median tokens/s, median ratio).
fn decode_speed(
    m: &Transformer,
    reference: &Transformer,
    prompt: &[u32],
    tokens: usize,
    rounds: usize,
) -> Result<(f64, f64)> {
    let (mut rates, mut ratios) = (vec![], vec![]);
    for i in 0..rounds {
        // each order half the time: a run right after another is a little
        // faster (warm buffers), and that must not favour either side
        let (r, v) = if i % 2 == 0 {
            let r = decode_once(reference, prompt, tokens)?;
            (r, decode_once(m, prompt, tokens)?)
        } else {
            let v = decode_once(m, prompt, tokens)?;
            (decode_once(reference, prompt, tokens)?, v)
        };
        rates.push(v);
        ratios.push(v / r);
    }
    Ok((median(rates), median(ratios)))
}

/// Bytes of the weights `m` holds, its dropped sublayers' left out.
fn weight_bytes(m: &Transformer) -> usize {
    let d = &m.prune.drop;
    let mut dropped = 0;
    for (i, b) in m.decoder.iter().enumerate() {
        if d.attn(i) {
            let a = &b.self_attn;
            dropped += [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]
                .iter()
                .map(|l| l.w.bytes())
                .sum::<usize>();
        }
        if d.ffn(i) {
            let f = &b.ffn;
            dropped += f.w1.w.bytes() + f.w2.w.bytes() + f.w3.as_ref().map_or(0, |l| l.w.bytes());
        }
    }
    m.weight_bytes() - dropped
}

/// A variant to run: its method, spec and model.
struct Variant {
    method: &'static str,
    spec: String,
    model: Transformer,
    /// Compared with the f32 copy (int8 runs) instead of the model as loaded.
    vs_f32: bool,
}

fn with_drop(base: &Transformer, drop: Skip) -> Transformer {
    let mut m = base.clone();
    m.prune.drop = drop;
    m
}

pub fn prune_sweep_cmd(mut a: PruneSweepArgs) -> Result<()> {
    if a.quick {
        a.calibration_tokens = 1024;
        a.eval_tokens = 1024;
        a.ctx = 256;
        a.decode_tokens = 16;
        a.rounds = 2;
        a.ffn_ratios = vec![0.25];
        a.attn_drops = vec![2, 4];
        a.layer_drops = vec![1];
    }
    if a.ctx < 2 {
        bail!("--ctx must be at least 2");
    }
    if a.eval_tokens < 2 || a.calibration_tokens < 2 {
        bail!("--eval-tokens and --calibration-tokens must be at least 2");
    }
    if a.decode_tokens == 0 || a.rounds == 0 {
        bail!("--decode-tokens and --rounds must be at least 1");
    }
    if let Some(r) = a.ffn_ratios.iter().find(|r| !(0.0..=1.0).contains(*r)) {
        bail!("--ffn-ratios: {r} is outside [0, 1]");
    }
    if !a.int8_threshold.is_finite() || a.int8_threshold < 0.0 {
        bail!("--int8-threshold must be a number ≥ 0");
    }
    let model_path = a.model.clone().unwrap_or_else(crate::kv_cmd::default_model);
    let (file, text) = crate::kv_cmd::read_corpus(a.file.as_ref())?;
    let l = load_model(&model_path, &WeightArgs::default())?;
    let layers = l.model.decoder.len();
    if a.ctx > l.model.cfg.max_len {
        bail!(
            "--ctx {} exceeds the model's context ({})",
            a.ctx,
            l.model.cfg.max_len
        );
    }
    for &k in a.attn_drops.iter().chain(&a.layer_drops) {
        if k > layers {
            bail!("--attn-drops / --layer-drops: {k} is more than the model's {layers} layers");
        }
    }
    let ids = l.gguf.tokenizer.encode(&text, true)?;
    let need = a.calibration_tokens + a.eval_tokens;
    if ids.len() < need {
        bail!(
            "{}: {} tokens, the sweep needs {need} (--calibration-tokens + --eval-tokens)",
            file.display(),
            ids.len()
        );
    }
    let (calib, held) = ids[..need].split_at(a.calibration_tokens);
    let prompt = &held[..128
        .min(held.len() - 1)
        .min(l.model.cfg.max_len - a.decode_tokens - 1)];
    if prompt.is_empty() {
        bail!(
            "--decode-tokens {} leaves no room for a prompt",
            a.decode_tokens
        );
    }
    // the sublayers' similarities on the calibration text, once
    let windows: Vec<&[u32]> = calib.chunks(a.ctx).collect();
    let probe: std::sync::Arc<Probe> = l.model.probe(&windows)?;

    let base = &l.model;
    let mut variants = vec![Variant {
        method: "baseline",
        spec: "as loaded".into(),
        model: base.clone(),
        vs_f32: false,
    }];
    for &r in &a.ffn_ratios {
        let mut m = base.clone();
        m.prune.ffn_skip = Some(FfnSkip::parse(&format!("ratio={r}"), layers)?);
        m.prune.stats = Default::default();
        variants.push(Variant {
            method: "ffn-skip",
            spec: format!("--ffn-skip ratio={r}"),
            model: m,
            vs_f32: false,
        });
    }
    for &r in &a.ffn_ratios {
        let k = (r * layers as f64).round() as usize;
        variants.push(Variant {
            method: "drop ffn",
            spec: format!("--drop-auto ffn={k}"),
            model: with_drop(base, auto_drop(&probe, layers, [0, k, 0])),
            vs_f32: false,
        });
    }
    for &k in &a.attn_drops {
        variants.push(Variant {
            method: "drop attn",
            spec: format!("--drop-auto attn={k}"),
            model: with_drop(base, auto_drop(&probe, layers, [k, 0, 0])),
            vs_f32: false,
        });
    }
    for &k in &a.layer_drops {
        variants.push(Variant {
            method: "drop layer",
            spec: format!("--drop-auto layer={k}"),
            model: with_drop(base, auto_drop(&probe, layers, [0, 0, k])),
            vs_f32: false,
        });
    }
    // int8 starts from float weights: an f32 copy (GGUF: dequantized)
    let f32l: Option<Loaded> = if a.no_int8 {
        None
    } else {
        let w = WeightArgs {
            dequantize: !model_path.is_dir(),
            quantize: None,
        };
        Some(load_model(&model_path, &w)?)
    };
    if let Some(f) = &f32l {
        let mut int8 = f.model.clone();
        int8.quantize_int8(Int8Mode::Plain)?;
        let mut llm = f.model.clone();
        llm.quantize_int8(Int8Mode::LlmInt8 {
            threshold: a.int8_threshold,
        })?;
        variants.push(Variant {
            method: "f32",
            spec: if model_path.is_dir() {
                "f32".into()
            } else {
                "--dequantize".into()
            },
            model: f.model.clone(),
            vs_f32: true,
        });
        variants.push(Variant {
            method: "int8",
            spec: "--quantize int8".into(),
            model: int8,
            vs_f32: true,
        });
        variants.push(Variant {
            method: "llm-int8",
            spec: format!("--quantize llm-int8:threshold={}", a.int8_threshold),
            model: llm,
            vs_f32: true,
        });
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;

    let pb = progress(variants.len() as u64, 0, "prune-sweep");
    let mut runs: Vec<Run> = vec![];
    let (mut base_ppl, mut f32_ppl): (Option<f64>, Option<f64>) = (None, None);
    for v in &variants {
        pb.set_message(v.spec.clone());
        let m = &v.model;
        m.outlier_stats(true);
        let (nll, _, kv_bytes) = crate::run_cmd::score_windows(m, held, a.ctx, None)?;
        let skipped = m
            .prune
            .ffn_skip
            .as_ref()
            .map(|_| m.prune.stats.take().share());
        let by_input = (v.method == "llm-int8").then(|| outliers_by_input(m));
        let outliers = m.outlier_stats(true);
        let ref_model = if v.vs_f32 {
            &variants
                .iter()
                .find(|v| v.method == "f32")
                .expect("f32 first")
                .model
        } else {
            base
        };
        let (tps, speedup) = decode_speed(m, ref_model, prompt, a.decode_tokens, a.rounds)?;
        let ppl = nll.exp();
        let reference = if v.vs_f32 {
            &mut f32_ppl
        } else {
            &mut base_ppl
        };
        let ref_ppl = *reference.get_or_insert(ppl);
        // outliers are counted where a threshold looks for them
        let is_int8 = v.method == "llm-int8";
        let run = Run {
            method: v.method.into(),
            spec: v.spec.clone(),
            dropped: describe_drop(&m.prune.drop),
            perplexity: ppl,
            mean_nll: nll,
            vs: if v.vs_f32 {
                "f32".into()
            } else {
                "baseline".into()
            },
            delta_pct: (ppl / ref_ppl - 1.0) * 100.0,
            decode_tokens_per_sec: tps,
            speedup,
            kv_bytes,
            weight_bytes: weight_bytes(m),
            ffn_skipped: skipped,
            outlier_products: is_int8
                .then(|| outliers.with_outliers as f64 / outliers.products.max(1) as f64),
            outlier_cols_per_product: is_int8
                .then(|| outliers.outlier_cols as f64 / outliers.products.max(1) as f64),
            outliers_by_input: by_input,
        };
        log_line(
            &pb,
            format!(
                "{:<40} perplexity {:9.3} ({:+6.1}%)  decode {:6.1} tok/s ({:.2}×)",
                run.spec, run.perplexity, run.delta_pct, run.decode_tokens_per_sec, run.speedup
            ),
        );
        runs.push(run);
        pb.inc(1);
    }
    pb.finish_and_clear();
    write_reports(&a, &model_path, &file, layers, &probe, &runs)?;
    print_report(&a.out, a.json, "results.json,table.md,plot.svg")
}

/// The most attention sublayers dropped with perplexity within +5%.
fn attn_within_5pct(runs: &[Run]) -> Option<&Run> {
    runs.iter()
        .filter(|r| r.method == "drop attn" && r.delta_pct <= 5.0)
        .max_by_key(|r| {
            r.spec
                .rsplit('=')
                .next()
                .and_then(|k| k.parse::<usize>().ok())
        })
}

fn write_reports(
    a: &PruneSweepArgs,
    model: &Path,
    file: &Path,
    layers: usize,
    probe: &Probe,
    runs: &[Run],
) -> Result<()> {
    use attend::model::prune::Sublayer;
    let sims = |k| -> Vec<Option<f64>> {
        probe
            .means(k)
            .into_iter()
            .map(|c| c.is_finite().then_some(c))
            .collect()
    };
    let json = serde_json::json!({
        "model": model,
        "file": file,
        "layers": layers,
        "calibration_tokens": a.calibration_tokens,
        "eval_tokens": a.eval_tokens,
        "ctx": a.ctx,
        "decode_tokens": a.decode_tokens,
        "rounds": a.rounds,
        "threads": crate::train_cmd::threads(),
        "command": command_line(),
        "similarity": { "attn": sims(Sublayer::Attn), "ffn": sims(Sublayer::Ffn) },
        "runs": runs,
    });
    attend::util::write_atomic(
        &a.out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    let mib = |b: usize| format!("{:.2}", b as f64 / (1 << 20) as f64);
    let pct = |x: Option<f64>| x.map_or(String::new(), |v| format!("{:.1}%", 100.0 * v));
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.method.clone(),
                format!("`{}`", r.spec),
                r.dropped.clone().unwrap_or_default(),
                format!("{:.3}", r.perplexity),
                format!("{:+.1}% vs {}", r.delta_pct, r.vs),
                format!("{:.1}", r.decode_tokens_per_sec),
                format!("{:.2}×", r.speedup),
                mib(r.kv_bytes),
                mib(r.weight_bytes),
                pct(r.ffn_skipped),
                match (r.outlier_products, r.outlier_cols_per_product) {
                    (Some(p), Some(c)) => format!("{:.1}% ({c:.2} cols)", 100.0 * p),
                    _ => String::new(),
                },
            ]
        })
        .collect();
    let mut table = format!(
        "Held-out perplexity on {} tokens of {} after {} calibration tokens (windows of {}), \
         greedy decode tokens/s ({} tokens after a 128-token prompt, median of {} rounds, \
         each alternating with the model compared with; {} threads), \
         {} ({} layers). KV bytes after a {}-token prefill.\n\n{}",
        a.eval_tokens,
        file.display(),
        a.calibration_tokens,
        a.ctx,
        a.decode_tokens,
        a.rounds,
        crate::train_cmd::threads(),
        model
            .file_name()
            .map_or("".into(), |n| n.to_string_lossy().to_string()),
        layers,
        a.ctx,
        markdown_table(
            &[
                "method",
                "spec",
                "dropped",
                "perplexity",
                "change",
                "decode tok/s",
                "speed",
                "KV MiB",
                "weights MiB",
                "FFNs skipped",
                "LLM.int8: products with outliers (columns each)",
            ],
            &rows,
        )
    );
    if let Some(r) = attn_within_5pct(runs) {
        let base = runs.iter().find(|r| r.method == "baseline");
        table += &format!(
            "\nMost attention sublayers dropped within +5% perplexity: {} ({}): {:+.1}%, KV cache {} → {} MiB, decode {:.2}×.\n",
            r.spec.rsplit('=').next().unwrap_or("?"),
            r.dropped.as_deref().unwrap_or(""),
            r.delta_pct,
            base.map_or("?".into(), |b| mib(b.kv_bytes)),
            mib(r.kv_bytes),
            r.speedup,
        );
    }
    for r in runs {
        if let Some(by) = &r.outliers_by_input {
            table += &format!(
                "\nLLM.int8 outliers (|x| > {}) in the held-out scoring, by the input a matrix reads:\n\n{}",
                a.int8_threshold,
                markdown_table(
                    &["input", "products with an outlier column", "outlier columns per product"],
                    &by.iter()
                        .map(|o| vec![
                            o.input.to_string(),
                            format!("{:.1}%", 100.0 * o.products_with_outliers),
                            format!("{:.2}", o.cols_per_product),
                        ])
                        .collect::<Vec<_>>(),
                )
            );
        }
    }
    attend::util::write_atomic(&a.out.join("table.md"), table.as_bytes())?;
    let series = Series::group(runs.iter().map(|r| {
        let name = match r.method.as_str() {
            "f32" | "int8" | "llm-int8" => "f32 / int8 / llm-int8".to_string(),
            m => m.to_string(),
        };
        (name, (r.decode_tokens_per_sec, r.perplexity))
    }));
    plot_svg(
        &a.out.join("plot.svg"),
        &Axes {
            title: &format!(
                "Perplexity vs decode speed: {}",
                model
                    .file_name()
                    .map_or("".into(), |n| n.to_string_lossy().to_string())
            ),
            x: "decode tokens/s (1 sequence)",
            y: "held-out perplexity (log)",
            log_x: false,
            log_y: true,
        },
        &series,
    )?;
    Ok(())
}
