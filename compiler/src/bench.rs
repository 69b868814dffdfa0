//! `cnnc bench`: how long a model takes to compile, to load, and to run.
//!
//! Latency is the wall time of `Executable::run` (inputs copied in, every launch, output copied out) on
//! deterministic pseudo-random inputs, after warm-up runs; the median is the headline and the minimum
//! is printed beside it because shared machines add noise only upwards. GFLOP/s counts 2 × the model's
//! multiply-accumulates (the convention ONNX Runtime and papers use), not the kernels' extra work.
//! The profile's GB/s is the launch's packed parameters (weights) over its time: for a linear layer at
//! batch 1, which reads each weight once, the bandwidth it streams at.

use super::{front_end, load_weights, BenchArgs};
use anyhow::Result;
use cnnc::backend::Runner;
use cnnc::kernel::WeightsDtype;
use cnnc_runtime::{rng, Tensor};
use std::time::{Duration, Instant};

/// Warm-up runs before timing: page-faults the arena in and warms caches and branch predictors.
const WARMUP: usize = 3;

pub fn bench(a: &BenchArgs) -> Result<()> {
    let (exec, batch, runs, profile) = (&a.exec, a.batch as usize, a.runs as usize, a.profile);
    exec.check()?;
    let t0 = Instant::now();
    let mut m = front_end(a.model.as_deref())?;
    let (g, report) = cnnc::opt::optimize(&m.graph, &cnnc::opt::Options { level: a.opt, ..Default::default() });
    crate::warn_optimizer(&report);
    let front = t0.elapsed();
    let [input] = g.inputs[..] else { anyhow::bail!("`cnnc bench` times models with exactly one input; `{}` has {}", m.src.name, g.inputs.len()) };
    let t1 = Instant::now();
    let bound = load_weights(&mut m, a.weights.as_deref(), false)?;
    // With reduced-precision weights: the output's change against f32 weights, relative to max |y|.
    let f32_weights = cnnc::backend::Options { weights_dtype: WeightsDtype::F32, ..*exec };
    let reference = (exec.weights_dtype != WeightsDtype::F32).then(|| bound.clone());
    let bind = t1.elapsed();
    let runner = Runner::new(&g, bound, batch, exec)?;
    // Made after the runner, which refuses a batch too large for memory before anything that size exists.
    let shape = [vec![batch], g.node(input).shape.clone()].concat();
    let x = Tensor::new(shape.clone(), rng::normal("input", shape.iter().product()).map(|v| v as f32).collect()).expect("sized");
    let (load, codegen, threads) = (bind + runner.lower_time, runner.codegen_time, runner.threads());
    let accuracy = match reference {
        Some(bound) => {
            let want = Runner::new(&g, bound, batch, &f32_weights)?.run(&x)?;
            Some(runner.run(&x)?.max_abs_diff(&want) / want.max_abs().max(f32::MIN_POSITIVE))
        }
        None => None,
    };
    let names = &runner.kernels;
    let bar = indicatif::ProgressBar::new((WARMUP + runs) as u64).with_message("running");
    bar.set_style(indicatif::ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len} ({elapsed})").expect("valid template"));
    let (mut total, mut first) = (vec![], Duration::ZERO);
    let mut per_kernel: Vec<Vec<Duration>> = vec![vec![]; names.len()];
    for i in 0..WARMUP + runs {
        let t = Instant::now();
        let steps = runner.run_timed(&x, profile)?;
        let dt = t.elapsed();
        if i == 0 {
            first = dt;
        }
        if i >= WARMUP {
            total.push(dt);
            per_kernel.iter_mut().zip(steps).for_each(|(v, d)| v.push(d));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    // Units per nanosecond = giga-units per second.
    let per_ns = |n: u64, d: Duration| n as f64 / d.as_secs_f64().max(1e-12) / 1e9;
    let min = *total.iter().min().expect("runs ≥ 1");
    let med = median(&mut total);
    let gflop = 2.0 * g.macs() as f64 * batch as f64 / 1e9;
    let backend = format!("{:?}", exec.backend).to_lowercase();
    if a.json {
        let kernels: Vec<_> = names
            .iter()
            .zip(per_kernel.iter_mut())
            .filter(|_| profile)
            .map(|((n, f, b), v)| {
                let m = median(v);
                serde_json::json!({"kernel": n, "median_ms": ms(m), "gflops": per_ns(*f, m), "param_gbs": per_ns(*b, m)})
            })
            .collect();
        let doc = serde_json::json!({
            "model": g.name, "backend": backend, "batch": batch, "threads": threads, "runs": runs,
            "compile_ms": ms(front + codegen), "frontend_ms": ms(front), "codegen_ms": ms(codegen), "load_ms": ms(load),
            "median_ms": ms(med), "min_ms": ms(min), "first_ms": ms(first), "gflops": gflop / med.as_secs_f64(), "kernels": kernels,
            "weights_dtype": format!("{:?}", exec.weights_dtype).to_lowercase(), "relative_change_vs_f32": accuracy,
        });
        println!("{doc}");
        return Ok(());
    }
    println!("{} ({backend}, batch {batch}, {threads} thread{})", g.name, if threads == 1 { "" } else { "s" });
    println!("  compile   {:>9.2} ms  (front end + optimizer {:.2} ms, code generation after packing {:.2} ms)", ms(front + codegen), ms(front), ms(codegen));
    println!(
        "  weights   {:>9.2} ms  (read and checked {:.2} ms, folded and packed beside code generation {:.2} ms)",
        ms(load),
        ms(bind),
        ms(runner.lower_time)
    );
    println!("  latency   {:>9.2} ms median, {:.2} ms min over {runs} runs (the first, cold: {:.2} ms)", ms(med), ms(min), ms(first));
    println!("  speed     {:>9.1} GFLOP/s  ({gflop:.3} GFLOP per inference)", gflop / med.as_secs_f64());
    if let Some(a) = accuracy {
        println!("  accuracy  {a:>9.2e}  (max |y − y with f32 weights| / max |y|, {:?} linear weights)", exec.weights_dtype);
    }
    if profile && !names.is_empty() {
        println!("\n  {:<36} {:>9} {:>6} {:>9} {:>9}", "kernel", "ms", "%", "GFLOP/s", "GB/s");
        let meds: Vec<Duration> = per_kernel.iter_mut().map(median).collect();
        let sum: f64 = meds.iter().map(|&d| ms(d)).sum();
        let rate = |n: u64, d: Duration| if n > 0 { format!("{:.1}", per_ns(n, d)) } else { "-".into() };
        for ((n, f, b), d) in names.iter().zip(meds) {
            println!("  {n:<36} {:>9.3} {:>5.1}% {:>9} {:>9}", ms(d), 100.0 * ms(d) / sum, rate(*f, d), rate(*b, d));
        }
    }
    Ok(())
}
