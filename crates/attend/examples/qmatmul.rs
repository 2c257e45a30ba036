//! Microbenchmark of the quantized matmul kernels: GMAC/s of one (rows ×
//! cols) weight matrix in a GGUF format times n activation rows, on every
//! instruction set this CPU has. For tuning `kernels::quant`; the figures
//! that matter are the model-level ones (`attend bench`, BENCHMARKS.md).
//!
//!   cargo run --release --example qmatmul -- [FORMAT] [ROWS] [COLS] [N,N,...]
//!   (defaults: q4_1 1536 576 1,4,16,64,256 — SmolLM2's FFN up projection)

use attend::kernels::quant::{matmul_many_isa, Activations, Isa, QMatrix};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fmt = args.first().map(String::as_str).unwrap_or("q4_1");
    let dtype = match fmt {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q8_0" => GgmlDType::Q8_0,
        "q4_k" => GgmlDType::Q4K,
        "q6_k" => GgmlDType::Q6K,
        other => anyhow::bail!("format {other}: one of q4_0, q4_1, q8_0, q4_k, q6_k"),
    };
    let rows: usize = args.get(1).map_or(Ok(1536), |s| s.parse())?;
    let cols: usize = args.get(2).map_or(Ok(576), |s| s.parse())?;
    let ns: Vec<usize> = match args.get(3) {
        Some(s) => s.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![1, 4, 16, 64, 256],
    };
    let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
    let q = QMatrix::from_qtensor(&QTensor::quantize(&w, dtype)?)?;
    println!(
        "{fmt} {rows}x{cols}, {} threads",
        rayon::current_num_threads()
    );
    for isa in Isa::available().into_iter().rev().take(2) {
        for &n in &ns {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let mut out = vec![0f32; n * rows];
            // about 0.3 s of work a measurement, the best of 5
            let macs = (n * rows * cols) as f64;
            let reps = ((3e10 / macs) as usize).clamp(3, 20_000);
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                let mut body = || {
                    for _ in 0..reps {
                        let a = Activations::new(&x, n, cols);
                        matmul_many_isa(isa, &a, &mut [(&q, &mut out[..])]);
                    }
                };
                // from a worker of rayon's pool: timed from outside it, each
                // product's region pays a futex sleep and wake (~15-25 us
                // here), which swamps small products; at the model level
                // (`attend bench`, whose regions follow each other while the
                // workers still spin) running inside the pool changed nothing
                rayon::scope(|_| body());
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            println!(
                "{isa:?} n {n:4}: {:7.1} GMAC/s ({:.1} us)",
                macs / best / 1e9,
                best * 1e6
            );
        }
    }
    Ok(())
}
