//! `cnnc bench`: how long a model takes to compile, to load, and to run.
//!
//! Latency is the wall time of `Executable::run` (inputs copied in, every launch, output copied out) on
//! deterministic pseudo-random inputs, after warm-up runs; the median is the headline and the minimum
//! is printed beside it because shared machines add noise only upwards. GFLOP/s counts 2 × the model's
//! multiply-accumulates (the convention ONNX Runtime and papers use), not the kernels' extra work.
//! The profile's GB/s is the launch's packed parameters (weights) over its time: for a linear layer at
//! batch 1, which reads each weight once, the bandwidth it streams at.

use super::{front_end, load_weights, Backend, ExecArgs};
use anyhow::Result;
use cnnc_runtime::{rng, Tensor};
use std::path::Path;
use std::time::{Duration, Instant};

/// Warm-up runs before timing: page-faults the arena in and warms caches and branch predictors.
const WARMUP: usize = 3;

#[allow(clippy::too_many_arguments)]
pub fn bench(
    model: Option<&Path>,
    weights: Option<&Path>,
    batch: usize,
    runs: usize,
    profile: bool,
    json: bool,
    opts: &cnnc::opt::Options,
    exec: ExecArgs,
) -> Result<()> {
    exec.check()?;
    if exec.backend == Backend::Cuda {
        cnnc::ptx::cuda::available()?;
    }
    let t0 = Instant::now();
    let (src, g) = front_end(model)?;
    let (g, _) = cnnc::opt::optimize(&g, opts);
    let front = t0.elapsed();
    let [input] = g.inputs[..] else { anyhow::bail!("`cnnc bench` times models with exactly one input; `{}` has {}", src.name, g.inputs.len()) };
    let t1 = Instant::now();
    let bound = load_weights(&src, &g, weights, false)?;
    let shape = [vec![batch], g.node(input).shape.clone()].concat();
    let x = Tensor::new(shape.clone(), rng::normal("input", shape.iter().product()).map(|v| v as f32).collect()).expect("sized");
    let threads = exec.threads();
    // One timed inference (the argument: whether to profile per kernel); per-kernel times, if any.
    type Run = Box<dyn Fn(bool) -> Result<Vec<Duration>>>;
    let (run, codegen, load): (Run, Duration, Duration);
    // Per launch: name, flops, parameter bytes.
    let mut names: Vec<(String, u64, u64)> = vec![];
    // With reduced-precision weights: the output's change against f32 weights, relative to max |y|.
    let mut accuracy = None;
    match exec.backend {
        Backend::Jit => {
            let f32_weights = ExecArgs { weights_dtype: cnnc::kernel::WeightsDtype::F32, ..exec };
            let reference = (exec.weights_dtype != f32_weights.weights_dtype).then(|| bound.clone());
            let program = exec.program(&g, bound, batch)?;
            load = t1.elapsed();
            let t2 = Instant::now();
            let jit = cnnc::jit::compile(&program, cnnc::jit::Options::default())?;
            codegen = t2.elapsed();
            if let Some(bound) = reference {
                let want = cnnc::jit::compile(&f32_weights.program(&g, bound, batch)?, cnnc::jit::Options::default())?.exe.run(&[&x], threads)?;
                let got = jit.exe.run(&[&x], threads)?;
                accuracy = Some(got.max_abs_diff(&want) / want.max_abs().max(f32::MIN_POSITIVE));
            }
            names = jit.exe.steps().iter().zip(program.param_bytes()).map(|(s, b)| (s.name.clone(), s.flops, b)).collect();
            run = Box::new(move |_| Ok(jit.exe.run_timed(&[&x], threads)?.1));
        }
        Backend::Cuda => {
            let program = exec.program(&g, bound, batch)?;
            load = t1.elapsed();
            let t2 = Instant::now();
            let exe = cnnc::ptx::cuda::CudaExecutable::new(&program, cnnc::ptx::DEFAULT_SM)?;
            codegen = t2.elapsed();
            names = exe.kernels().zip(program.param_bytes()).map(|((n, f), b)| (n.to_string(), f, b)).collect();
            run = Box::new(move |profile| Ok(exe.run_timed(&[&x], profile)?.1));
        }
        Backend::Reference => {
            let plan = cnnc::lower::lower(&g, bound)?;
            load = t1.elapsed();
            codegen = Duration::ZERO;
            run = Box::new(move |_| {
                plan.run(vec![x.clone()])?;
                Ok(vec![])
            });
        }
    }
    let bar = indicatif::ProgressBar::new((WARMUP + runs) as u64).with_message("running");
    bar.set_style(indicatif::ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len} ({elapsed})").expect("valid template"));
    let mut total = vec![];
    let mut per_kernel: Vec<Vec<Duration>> = vec![vec![]; names.len()];
    for i in 0..WARMUP + runs {
        let t = Instant::now();
        let steps = run(profile)?;
        let dt = t.elapsed();
        if i >= WARMUP {
            total.push(dt);
            for (k, d) in steps.into_iter().enumerate() {
                per_kernel[k].push(d);
            }
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
    let backend = match exec.backend {
        Backend::Jit => "jit",
        Backend::Reference => "reference",
        Backend::Cuda => "cuda",
    };
    if json {
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
            "median_ms": ms(med), "min_ms": ms(min), "gflops": gflop / med.as_secs_f64(), "kernels": kernels,
            "weights_dtype": format!("{:?}", exec.weights_dtype).to_lowercase(), "relative_change_vs_f32": accuracy,
        });
        println!("{doc}");
        return Ok(());
    }
    println!("{} ({backend}, batch {batch}, {threads} thread{})", g.name, if threads == 1 { "" } else { "s" });
    println!("  compile   {:>9.2} ms  (front end + optimizer {:.2} ms, code generation {:.2} ms)", ms(front + codegen), ms(front), ms(codegen));
    println!("  weights   {:>9.2} ms  (read, bind, fold, pack)", ms(load));
    println!("  latency   {:>9.2} ms median, {:.2} ms min over {runs} runs", ms(med), ms(min));
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
