//! Helpers for cnnc's cross-crate tests: repository paths, `.npy` files, and running a model file through
//! the library (front end → weights → plan → reference runtime), so that tests compare numbers, not text.

use cnnc::diag::Source;
use cnnc::weights::{self, Bound, Weights};
use cnnc_runtime::{rng, Tensor};
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the repository").to_path_buf()
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// Every `.model` file under `models/`, sorted.
pub fn model_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("models"))
        .expect("models/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "model"))
        .collect();
    v.sort();
    v
}

pub fn load_npy(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let f = npyz::NpyFile::new(&bytes[..]).expect("valid npy");
    let (shape, data) = weights::read_npy(f, None).unwrap_or_else(|_| panic!("{} is not f32/f64", path.display()));
    Tensor::new(shape, data).expect("consistent npy")
}

pub fn source(path: &Path) -> Source {
    Source::new(path.display().to_string(), std::fs::read_to_string(path).expect("readable model"))
}

/// Compiles `model` and runs it on `x` with parameters from `params` (a weights file, or a generator).
pub fn run_model(model: &Path, params: Params, x: Tensor) -> Tensor {
    run_source(&source(model), params, x, 0)
}

/// Compiles a model, optimizes it at `level` (0: not at all), and runs it on `x`.
pub fn run_source(src: &Source, params: Params, x: Tensor, level: u8) -> Tensor {
    let (g, _) = cnnc::compile(src).unwrap_or_else(|f| panic!("{}", src.render_plain(&f.0)));
    run_graph(src, &optimized(&g, level), params, x)
}

pub fn optimized(g: &cnnc::ir::Graph, level: u8) -> cnnc::ir::Graph {
    cnnc::opt::optimize(g, &cnnc::opt::Options { level, ..Default::default() }).0
}

/// Runs a compiled (possibly optimized) graph on `x` with the reference runtime.
pub fn run_graph(src: &Source, g: &cnnc::ir::Graph, params: Params, x: Tensor) -> Tensor {
    cnnc::lower::lower(g, bind(src, g, params)).expect("lowers").run(vec![x]).expect("runs")
}

/// Binds parameters from a weights file, Chainer's initializers, or a generator.
pub fn bind(src: &Source, g: &cnnc::ir::Graph, params: Params) -> Bound {
    match params {
        Params::File(p) => {
            let w = Weights::open(p).expect("weights open");
            weights::bind(g, &w).unwrap_or_else(|d| panic!("{}", src.render_plain(&d)))
        }
        Params::Init => weights::bind(g, &Weights::init()).expect("init binds"),
        Params::Generated(f) => Bound { params: g.params().into_iter().map(|s| (s.clone(), f(&s.key, &s.shape))).collect(), notes: vec![] },
    }
}

/// Compiles a graph with the JIT for `x`'s batch and runs it on 1 and 2 threads in checked mode (every
/// access bounds-checked; none may fail) and on 2 threads unchecked; an even batch also as two replicas
/// of half the batch, on 2 threads, checked. All must give the same bytes.
pub fn jit_graph(src: &Source, g: &cnnc::ir::Graph, params: Params, x: &Tensor) -> Tensor {
    jit_graph_with(src, g, params, x, cnnc::kernel::Winograd::Auto)
}

/// [`jit_graph`] with the Winograd choice made by the caller.
pub fn jit_graph_with(src: &Source, g: &cnnc::ir::Graph, params: Params, x: &Tensor, winograd: cnnc::kernel::Winograd) -> Tensor {
    let lowering = cnnc::kernel::Lowering { winograd, ..cnnc::kernel::Lowering::new(cnnc::kernel::Tier::best()) };
    let program = cnnc::kernel::program_with(g, bind(src, g, params), x.batch(), lowering);
    let checked = cnnc::jit::compile(&program, cnnc::jit::Options { checked: true }).expect("compiles");
    let one = checked.exe.run(&[x], 1).expect("runs");
    let two = checked.exe.run(&[x], 2).expect("runs");
    assert_eq!(checked.violations(), vec![], "out-of-bounds accesses");
    let fast = cnnc::jit::compile(&program, cnnc::jit::Options::default()).expect("compiles").exe.run(&[x], 2).expect("runs");
    let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert!(bits(&one) == bits(&two), "1 and 2 threads differ");
    assert!(bits(&one) == bits(&fast), "checked and unchecked differ");
    if x.batch().is_multiple_of(2) {
        let lowering = cnnc::kernel::Lowering { replicas: 2, ..lowering };
        let halves = cnnc::jit::compile(&cnnc::kernel::program_with(g, bind(src, g, params), x.batch(), lowering), cnnc::jit::Options { checked: true })
            .expect("compiles");
        assert!(bits(&halves.exe.run(&[x], 2).expect("runs")) == bits(&one), "two replicas differ from one");
        assert_eq!(halves.violations(), vec![], "out-of-bounds accesses");
    }
    one
}

#[derive(Clone, Copy)]
pub enum Params<'a> {
    File(&'a Path),
    Init,
    Generated(fn(&str, &[usize]) -> Tensor),
}

/// Asserts max |got − want| ≤ `rel` · max |want| (shapes equal).
pub fn assert_close(got: &Tensor, want: &Tensor, rel: f32, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (diff, scale) = (got.max_abs_diff(want), want.max_abs().max(1e-30));
    eprintln!("{what}: max |diff| / max |want| = {:.2e}", diff / scale);
    assert!(diff <= rel * scale, "{what}: max |diff| {diff:e} > {rel:e} × max |want| {scale:e}");
}

/// The test-weight scheme of `tests/fixtures/gen_fixtures.py` (see `tests/fixtures/alexbn_full/README.md`):
/// every tensor from the counter-based PRNG keyed by its Chainer key, computed in f64, cast once to f32.
pub fn prng_param(key: &str, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let u = || rng::uniform(key, n);
    let data: Vec<f64> = match key.rsplit('/').next().unwrap_or(key) {
        "W" => {
            let std = (1.0 / shape[1..].iter().product::<usize>() as f64).sqrt();
            rng::normal(key, n).map(|v| v * std).collect()
        }
        "b" => u().map(|v| v * 0.2 - 0.1).collect(),
        "gamma" | "avg_var" => u().map(|v| 0.5 + v).collect(),
        "beta" => u().map(|v| v - 0.5).collect(),
        "avg_mean" => u().map(|v| (v - 0.5) * 0.2).collect(),
        _ => rng::normal(key, n).collect(),
    };
    Tensor::new(shape.to_vec(), data.into_iter().map(|v| v as f32).collect()).expect("n matches shape")
}
