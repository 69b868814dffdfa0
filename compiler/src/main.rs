//! The `cnnc` command line: `compile` and `run`. Exit codes: 0 success, 1 bad model, weights or input,
//! 2 usage. Every output file is written to a temporary file beside it and renamed into place, so a failed
//! run never leaves a partial file.

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use cnnc::backend::{self, Runner, TierChoice};
use cnnc::diag::{Failed, Source};
use cnnc::input::{self, Preprocess};
use cnnc::ir::{self, Graph};
use cnnc::weights;
use cnnc::{LoadError, Loaded, ModelSource};
use cnnc_runtime::Tensor;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod bench;

#[derive(Parser)]
#[command(name = "cnnc", version, about = "A compiler for CNNs written like Chainer models", propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check a model, infer its shapes, and print its layer table (or its IR).
    Compile(CompileArgs),
    /// Run a model on images or .npy tensors and print the top classes.
    Run(RunArgs),
    /// Time a model: compile time, weight loading, latency (median and min), GFLOP/s, per-kernel times.
    Bench(BenchArgs),
    /// Write an ONNX model as a model file (and its weights under Chainer-style keys).
    Import(ImportArgs),
}

#[derive(clap::Args)]
struct ImportArgs {
    /// The ONNX file.
    model: PathBuf,
    /// Write the model text to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Write the weights to FILE: `.npz` (Chainer's `save_npz` layout) or `.safetensors`.
    #[arg(long, value_name = "FILE")]
    weights_out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct CompileArgs {
    /// The model file (`.model`, or `.onnx`).
    model: PathBuf,
    /// What to print.
    #[arg(long, value_enum, default_value_t = Emit::Table)]
    emit: Emit,
    /// Write to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Optimization level: 0 disables rewriting, 1 runs every rule.
    #[arg(short = 'O', default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    opt: u8,
    /// Print the rules the optimizer fired and the estimated cost change (to standard error).
    #[arg(long)]
    explain: bool,
    /// The backend whose cost model guides the optimizer.
    #[arg(long, value_enum, default_value_t = Target::Cpu)]
    target: Target,
    /// Batch size the kernels and the memory plan are made for (`--emit kernels|clif`, the table's peak).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    batch: u32,
    /// GEMM microkernel the kernels are lowered for (`--emit kernels|clif|asm`).
    #[arg(long, value_enum, default_value_t = TierChoice::Auto)]
    tier: TierChoice,
    /// CUDA compute capability the PTX targets (`--target cuda --emit ptx`): 80 (sm_80) … 90.
    #[arg(long, default_value_t = cnnc::ptx::DEFAULT_SM,
              value_parser = clap::builder::TypedValueParser::map(clap::builder::PossibleValuesParser::new(["80", "86", "87", "89", "90"]), |s: String| s.parse::<u32>().expect("listed")))]
    sm: u32,
    /// With `--emit kernels`: the program as it stands after this pass of program building (default:
    /// finished, after `slots`).
    #[arg(long, value_enum, value_name = "PASS")]
    after: Option<cnnc::kernel::Pass>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The model file; defaults to the bundled AlexBN.
    model: Option<PathBuf>,
    /// Input files: images (.png, .jpg) or .npy tensors (N,C,H,W) or (C,H,W). Several form one batch.
    #[arg(long, short, required = true, num_args = 1.., value_name = "FILE")]
    input: Vec<PathBuf>,
    /// Chainer `save_npz` file or safetensors file with the model's parameters.
    #[arg(long, short, value_name = "FILE")]
    weights: Option<PathBuf>,
    /// Write the raw outputs (logits, shape (N, classes)) to this .npy file.
    #[arg(long, short, value_name = "FILE.npy")]
    output: Option<PathBuf>,
    /// How many classes to print per input.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
    top: u16,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Image preprocessing: shorter side after resizing, before the center crop [default: 256, and an
    /// image of exactly the model's input size is not resized].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=16384))]
    resize: Option<u32>,
    /// Image preprocessing: per-channel mean subtracted, as R,G,B on the 0..255 scale.
    #[arg(long, value_parser = parse_mean, value_name = "R,G,B")]
    mean: Option<[f32; 3]>,
    /// Image preprocessing: factor applied after the mean is subtracted.
    #[arg(long, value_parser = parse_finite)]
    scale: Option<f32>,
    /// Optimization level: 0 disables rewriting, 1 runs every rule.
    #[arg(short = 'O', default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    opt: u8,
    #[command(flatten)]
    exec: backend::Options,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The model file; defaults to the bundled AlexBN.
    model: Option<PathBuf>,
    /// Chainer `save_npz` file or safetensors file (default: Chainer's initializers, fixed seed).
    #[arg(long, short, value_name = "FILE")]
    weights: Option<PathBuf>,
    /// Samples per inference (inputs are deterministic pseudo-random tensors).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    batch: u32,
    /// Timed inferences (after 3 warm-up runs).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100000))]
    runs: u32,
    /// Also print the time of every kernel (median over the runs).
    #[arg(long)]
    profile: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Optimization level: 0 disables rewriting, 1 runs every rule.
    #[arg(short = 'O', default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    opt: u8,
    #[command(flatten)]
    exec: backend::Options,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    /// CPU (the runtime's kernels).
    Cpu,
    /// NVIDIA GPU (PTX).
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum Emit {
    /// The per-layer table with parameters and MACs.
    Table,
    /// The layer-graph IR, one node per line.
    Ir,
    /// The IR after optimization, with the rules that produced each rewritten node.
    IrOpt,
    /// The kernel IR (loop nests) of every launch, with the memory plan.
    Kernels,
    /// The Cranelift IR of every kernel.
    Clif,
    /// The machine code Cranelift generates for this CPU, per kernel.
    Asm,
    /// PTX for NVIDIA GPUs, one `.entry` per kernel (needs `--target cuda`).
    Ptx,
    /// Graphviz text of the graph (optimized at -O1: fused layers are one node listing what they fused).
    Dot,
}

fn parse_finite(s: &str) -> Result<f32, String> {
    s.trim().parse::<f32>().ok().filter(|v| v.is_finite()).ok_or_else(|| format!("`{s}` is not a finite number"))
}

fn parse_mean(s: &str) -> Result<[f32; 3], String> {
    let v: Vec<f32> = s.split(',').map(parse_finite).collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| format!("`{s}` is not three comma-separated numbers R,G,B"))
}

/// A failure whose message has already been printed.
#[derive(Debug, thiserror::Error)]
#[error("reported")]
struct Reported;

fn main() -> ExitCode {
    // A reader that goes away (`cnnc compile … | head`) ends cnnc as it ends any Unix filter. Rust
    // ignores SIGPIPE, so every `print!` after that would panic instead.
    // SAFETY: restoring a signal's default disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Compile(a) => {
            use clap::CommandFactory;
            if matches!(a.emit, Emit::Ptx) && a.target != Target::Cuda {
                Cli::command().error(clap::error::ErrorKind::ArgumentConflict, "--emit ptx needs --target cuda").exit();
            }
            if matches!(a.emit, Emit::Clif | Emit::Asm) && a.target == Target::Cuda {
                Cli::command().error(clap::error::ErrorKind::ArgumentConflict, "--emit clif and --emit asm show the CPU's code: they need --target cpu").exit();
            }
            if a.after.is_some() && !matches!(a.emit, Emit::Kernels) {
                Cli::command().error(clap::error::ErrorKind::ArgumentConflict, "--after shows a pass of program building: it needs --emit kernels").exit();
            }
            compile(&a)
        }
        Cmd::Run(a) => {
            // `--input` takes every file after it: a model written there lands among the inputs.
            if let Some(m) = a.input.iter().find(|p| a.model.is_none() && p.extension().is_some_and(|e| e == "model" || e == "onnx")) {
                use clap::CommandFactory;
                let msg = format!("`{}` looks like a model, but `--input` took it as an input (it takes every file after it): write the model first, `cnnc run MODEL --input FILE...`", m.display());
                Cli::command().error(clap::error::ErrorKind::ArgumentConflict, msg).exit();
            }
            run(&a)
        }
        Cmd::Bench(a) => bench::bench(&a),
        Cmd::Import(a) => import(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.is::<Reported>() {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(1)
        }
    }
}

/// Reads and compiles a model (an ONNX file is imported first), printing its warnings and notes.
fn front_end(model: Option<&Path>) -> Result<Loaded> {
    let loaded = cnnc::load(model.map_or(ModelSource::Bundled, ModelSource::File)).map_err(reported)?;
    for note in &loaded.notes {
        eprintln!("note: {note}");
    }
    loaded.src.emit(&loaded.warnings);
    Ok(loaded)
}

/// A library error as the CLI reports it: diagnostics rendered to standard error, then the summary.
fn reported(e: LoadError) -> anyhow::Error {
    match e.diagnostics() {
        Some((src, diags)) => {
            src.emit(diags);
            eprintln!("error: {e}");
            Reported.into()
        }
        None => e.into(),
    }
}

/// `cnnc import`: the model text (and, with `--weights-out`, the weights) of an ONNX file.
fn import(a: &ImportArgs) -> Result<()> {
    if let Some(path) = &a.weights_out {
        if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npz") || e.eq_ignore_ascii_case("safetensors")) {
            return Err(anyhow!("--weights-out `{}`: the file name must end in .npz or .safetensors (the format it is written in)", path.display()));
        }
    }
    a.weights_out.iter().chain(&a.output).try_for_each(|p| check_output(p))?;
    let imported = cnnc::onnx::import(&a.model)?;
    // Compiled before anything is written: an import that cnnc cannot compile writes nothing.
    let src = Source::new(format!("{} (imported)", a.model.display()), imported.text.clone());
    if let Err(Failed(diags)) = cnnc::compile(&src) {
        src.emit(&diags);
        return Err(anyhow!("the model imported from `{}` does not compile (a cnnc bug: please report it)", a.model.display()));
    }
    for note in &imported.notes {
        eprintln!("note: {note}");
    }
    if let Some(path) = &a.weights_out {
        let safetensors = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        write_atomic(path, |w| Ok(weights::write(w, &imported.weights, safetensors)?))?;
    }
    match &a.output {
        Some(path) => write_atomic(path, |w| Ok(w.write_all(imported.text.as_bytes())?)),
        None => {
            print!("{}", imported.text);
            Ok(())
        }
    }
}

fn compile(a: &CompileArgs) -> Result<()> {
    a.output.iter().try_for_each(|p| check_output(p))?;
    let Loaded { src, graph: g, .. } = front_end(Some(&a.model))?;
    let costs = match a.target {
        Target::Cpu => cnnc::opt::lang::CPU,
        Target::Cuda => cnnc::opt::lang::CUDA,
    };
    let (optimized, report) = cnnc::opt::optimize(&g, &cnnc::opt::Options { level: a.opt, model: costs });
    warn_optimizer(&report);
    let batch = a.batch as usize;
    if a.explain {
        eprint!("{}", cnnc::opt::explain(&report));
    }
    // Kernels depend on shapes, not on values: lower with zero parameters.
    let zeros = || weights::Bound::zeros(&optimized);
    let lowering = match a.target {
        Target::Cpu => cnnc::kernel::Lowering::new(a.tier.get()),
        Target::Cuda => cnnc::kernel::Lowering::gpu(),
    };
    let program = || cnnc::kernel::program_with(&optimized, zeros(), batch, lowering);
    let text = match a.emit {
        Emit::Table => {
            let p = program();
            let mib = |elems: usize| elems as f64 * 4.0 / (1 << 20) as f64;
            format!(
                "{}activation arena (batch {batch}, planned): {:.2} MiB; packed parameters: {:.2} MiB; {} kernel launches\n",
                ir::table(&g),
                mib(p.arena_len),
                mib(p.params.iter().map(|p| p.len()).sum()),
                p.launches.len()
            )
        }
        Emit::Ir => ir::dump(&g, &src),
        Emit::IrOpt => ir::dump(&optimized, &src),
        Emit::Dot => ir::dot(&optimized),
        Emit::Kernels => match a.after {
            Some(pass) => cnnc::kernel::listing_after(&optimized, zeros(), batch, lowering, pass),
            None => cnnc::kernel::listing(&program()),
        },
        Emit::Clif => cnnc::jit::clif(&program(), false)?,
        Emit::Asm => cnnc::jit::clif(&program(), true)?,
        Emit::Ptx => cnnc::ptx::emit(&program(), a.sm)?,
    };
    match &a.output {
        Some(path) => write_atomic(path, |w| Ok(w.write_all(text.as_bytes())?)),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn run(a: &RunArgs) -> Result<()> {
    a.exec.check()?;
    a.output.iter().try_for_each(|p| check_output(p))?;
    let mut m = front_end(a.model.as_deref())?;
    let g = &m.graph;
    let [input_node] = g.inputs[..] else {
        return Err(anyhow!("`{}` takes {} inputs; `cnnc run` feeds models with exactly one", m.src.name, g.inputs.len()));
    };
    let dims = g.node(input_node).shape.clone();
    let defaults = Preprocess::default();
    let pre = Preprocess { resize: a.resize, mean: a.mean.unwrap_or(defaults.mean), scale: a.scale.unwrap_or(defaults.scale) };
    let mut parts = Vec::new();
    let mut labels = Vec::new();
    for path in &a.input {
        let t = input::load(path, &dims, &pre)?;
        let name = path.display().to_string();
        labels.extend((0..t.batch()).map(|i| if t.batch() == 1 { name.clone() } else { format!("{name}[{i}]") }));
        parts.push(t);
    }
    let x = input::concat_batches(parts);

    // The optimizer (a graph's rewrites need no values) runs while the weights are read and checked.
    let graph = m.graph.clone();
    let (bound, (g, optimized)) = std::thread::scope(|s| {
        let opt = s.spawn(|| cnnc::opt::optimize(&graph, &cnnc::opt::Options { level: a.opt, ..Default::default() }));
        let bound = load_weights(&mut m, a.weights.as_deref(), true);
        (bound, opt.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    });
    let bound = bound?;
    warn_optimizer(&optimized);
    let y = Runner::new(&g, bound, x.batch(), &a.exec)?.run(&x)?;
    // Finite inputs and weights can still overflow float32 on the way: say so rather than rank NaNs.
    let bad = y.data().iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        let largest = x.data().iter().fold(0f32, |m, v| m.max(v.abs()));
        return Err(anyhow!(
            "the model's output holds {bad} non-finite value{} (NaN or infinity): its arithmetic overflowed float32 on {} (largest magnitude {largest:e})",
            if bad == 1 { "" } else { "s" },
            a.input.iter().map(|p| format!("`{}`", p.display())).collect::<Vec<_>>().join(", ")
        ));
    }
    if let Some(path) = &a.output {
        write_atomic(path, |w| write_npy(w, &y))?;
    }
    report(&g, &y, &labels, a.top as usize, a.json, a.weights.as_deref())
}

pub fn warn_optimizer(report: &cnnc::opt::Report) {
    if let Some(w) = report.warning() {
        eprintln!("warning: {w}");
    }
}

/// Binds the weights (or Chainer's initializers, with a loud warning), printing diagnostics.
fn load_weights(m: &mut Loaded, weights: Option<&Path>, warn: bool) -> Result<weights::Bound> {
    if warn && m.random_weights(weights) {
        eprintln!("warning: no --weights given: parameters are initialised randomly (Chainer's LeCunNormal, fixed seed)");
        eprintln!("warning: THE PREDICTIONS BELOW ARE MEANINGLESS; pass --weights FILE.npz for real ones");
    }
    let bound = m.bind(weights).map_err(reported)?;
    m.src.emit(&bound.notes);
    Ok(bound)
}

/// Prints the top classes per sample (softmax probabilities unless the model already ends in softmax).
fn report(g: &Graph, y: &Tensor, labels: &[String], top: usize, json: bool, weights: Option<&Path>) -> Result<()> {
    let Some(results) = cnnc::top::top(g, y, top) else {
        println!("output shape {:?} (not a vector of class scores; use --output to save it)", y.shape());
        return Ok(());
    };
    if json {
        let items: Vec<_> = labels
            .iter()
            .zip(&results)
            .map(|(label, top)| {
                let top: Vec<_> =
                    top.iter().map(|c| serde_json::json!({"class": c.index, "name": c.name, "probability": c.probability, "logit": c.logit})).collect();
                serde_json::json!({"input": label, "top": top})
            })
            .collect();
        let doc = serde_json::json!({"model": g.name, "weights": weights.map(|p| p.display().to_string()), "results": items});
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    for (label, top) in labels.iter().zip(results) {
        println!("{label}");
        for (rank, c) in top.iter().enumerate() {
            println!("  {:>2}. {:>4}  {:<28} {:>7.3}%  (logit {:.4})", rank + 1, c.index, c.name.unwrap_or("-"), c.probability * 100.0, c.logit);
        }
    }
    Ok(())
}

fn write_npy(w: &mut dyn Write, y: &Tensor) -> Result<()> {
    use npyz::WriterBuilder;
    let shape: Vec<u64> = y.shape().iter().map(|&d| d as u64).collect();
    let mut npy = npyz::WriteOptions::<f32>::new().default_dtype().shape(&shape).writer(w).begin_nd()?;
    npy.extend(y.data().iter().copied())?;
    npy.finish()?;
    Ok(())
}

/// Checks that `path` can be written, before any work is done (so that a long run does not end in
/// "cannot write", and a command with two outputs writes neither when one cannot be): not a directory,
/// not a read-only file, in a directory that exists.
fn check_output(path: &Path) -> Result<()> {
    let existing = std::fs::metadata(path).ok();
    match existing {
        Some(m) if m.is_dir() => Err(anyhow!("cannot write `{}`: it is a directory", path.display())),
        Some(m) if m.is_file() && m.permissions().readonly() => Err(anyhow!("cannot write `{}`: it is read-only", path.display())),
        Some(_) => Ok(()),
        None => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            match dir.is_dir() {
                true => Ok(()),
                false => Err(anyhow!("cannot write `{}`: the directory `{}` does not exist", path.display(), dir.display())),
            }
        }
    }
}

/// Writes `path` through a temporary file in the same directory, renamed into place only on success, so
/// a failure leaves no partial file. A symlink is kept (its target is replaced); a device or pipe
/// (`/dev/null`, `/dev/stdout`) is written directly; a read-only file is refused. A new file gets the
/// umask's permissions, a replaced one keeps its own.
fn write_atomic(path: &Path, body: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    check_output(path)?;
    let ctx = || format!("cannot write `{}`", path.display());
    let existing = std::fs::metadata(path).ok();
    let write = |w: &mut dyn Write| -> Result<()> {
        let mut buf = std::io::BufWriter::new(w);
        body(&mut buf)?;
        Ok(buf.flush()?)
    };
    if existing.as_ref().is_some_and(|m| !m.is_file()) {
        return write(&mut std::fs::OpenOptions::new().write(true).open(path).with_context(ctx)?).with_context(ctx);
    }
    let target = if path.is_symlink() { std::fs::canonicalize(path).with_context(ctx)? } else { path.to_path_buf() };
    let dir = target.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(ctx)?;
    write(tmp.as_file_mut()).with_context(ctx)?;
    let umask = || {
        // SAFETY: umask has no failure mode; the mask is put back at once (nothing else creates files now).
        let old = unsafe { libc::umask(0o022) };
        unsafe { libc::umask(old) };
        old as u32
    };
    let mode = existing.map_or_else(|| 0o666 & !umask(), |m| m.permissions().mode());
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode)).with_context(ctx)?;
    tmp.persist(&target).map_err(|e| e.error).with_context(ctx)?;
    Ok(())
}
