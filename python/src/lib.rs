//! `cnnc._cnnc`, the Python package's native module: [`compile`] a model once, run it on numpy arrays
//! from any Python thread with the GIL released, load images with the CLI's preprocessing, and pickle a
//! compiled model as the recipe to compile it again (how Ray and Spark ship it to their workers).
//!
//! Everything goes through the library the CLI uses (`cnnc::load`, `Loaded::bind`, `backend::Runner`,
//! `input::load`, `top::top`), so the messages and the numbers are the CLI's. Invariants: no thread is
//! started before a model's first run (the runtime's pool starts there), so a process may fork after
//! `compile`; every failure is a `cnnc.Error` (or a `TypeError`/`ValueError` for arguments of the wrong
//! kind), never a crash.

use cnnc::backend::{Backend, BackendError, Options, Runner, TierChoice};
use cnnc::input::{InputError as LoadInputError, Preprocess};
use cnnc::kernel::{WeightsDtype, Winograd};
use cnnc::{LoadError, ModelSource};
use cnnc_runtime::Tensor;
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pyo3::create_exception!(cnnc, Error, PyException, "Base class of every error cnnc reports; the message is the CLI's.");
pyo3::create_exception!(cnnc, ModelError, Error, "The model cannot be read or does not compile (the message carries the diagnostics).");
pyo3::create_exception!(cnnc, WeightsError, Error, "The weights file cannot be read or does not fit the model.");
pyo3::create_exception!(cnnc, InputError, Error, "An input array or image is unusable for this model.");
pyo3::create_exception!(cnnc, RunError, Error, "The backend could not compile or run the model.");

fn load_error(e: LoadError) -> PyErr {
    let msg = e.render_plain();
    match e {
        LoadError::Weights(_) | LoadError::Bind { .. } => WeightsError::new_err(msg),
        LoadError::Io { .. } | LoadError::Onnx(_) | LoadError::Compile { .. } => ModelError::new_err(msg),
    }
}

fn run_error(e: BackendError) -> PyErr {
    RunError::new_err(e.to_string())
}

fn input_error(e: LoadInputError) -> PyErr {
    // The message's cause (an I/O error) is part of what the user needs to read.
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        msg += &format!(": {c}");
        cause = c.source();
    }
    InputError::new_err(msg)
}

/// A path from a `str` or an `os.PathLike`.
fn path_of(obj: &Bound<'_, PyAny>) -> PyResult<PathBuf> {
    let os = obj.py().import("os")?;
    os.call_method1("fspath", (obj,))?.extract::<PathBuf>().map_err(|_| PyTypeError::new_err("expected a path (str or os.PathLike)"))
}

fn choice<T: clap::ValueEnum>(what: &str, value: &str) -> PyResult<T> {
    T::from_str(value, true).map_err(|_| {
        let names: Vec<String> = T::value_variants().iter().filter_map(|v| v.to_possible_value()).map(|p| format!("'{}'", p.get_name())).collect();
        PyValueError::new_err(format!("{what}={value:?} is not one of {}", names.join(", ")))
    })
}

/// How the model was given, kept to compile it again after unpickling.
#[derive(Clone)]
enum ModelSpec {
    Bundled,
    /// An ONNX file (large, and it carries its weights: its path travels, not its bytes).
    Onnx(PathBuf),
    /// Model text (a `.model` file's, read at compile time) and the name its diagnostics use.
    Text {
        name: String,
        text: String,
    },
}

/// Everything `compile` was given, in the form that compiles the same model again.
#[derive(Clone)]
struct Spec {
    model: ModelSpec,
    weights: Option<PathBuf>,
    batch: Option<usize>,
    threads: Option<u32>,
    backend: String,
    opt: u8,
    tier: String,
    winograd: String,
    weights_dtype: String,
}

/// The runner, built for the first batch size when none was given.
enum State {
    /// Not compiled yet: the bound parameters wait for the first run.
    Pending(Option<cnnc::weights::Bound>),
    Ready(Arc<Runner>, usize),
}

/// Largest batch compiled when `batch=None` (the arena grows with it; larger calls run in chunks).
const AUTO_BATCH_MAX: usize = 32;

/// A compiled model. Call it (or `run`) on a float32 NCHW array to get its outputs; `top` ranks classes.
/// Thread-safe: runs from several Python threads share the compiled code (one at a time on its threads).
#[pyclass(module = "cnnc", frozen)]
struct Model {
    spec: Spec,
    graph: cnnc::ir::Graph,
    input: Vec<usize>,
    output: Vec<usize>,
    options: Options,
    state: Mutex<State>,
}

impl Model {
    /// The runner and its batch size, compiling it on first use for `n` samples (when no batch was given).
    fn runner(&self, n: usize) -> PyResult<(Arc<Runner>, usize)> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let State::Pending(bound) = &mut *state {
            let batch = self.spec.batch.unwrap_or(n.clamp(1, AUTO_BATCH_MAX));
            let bound = bound.take().ok_or_else(|| RunError::new_err("an earlier compilation of this model failed"))?;
            *state = State::Ready(Arc::new(Runner::new(&self.graph, bound, batch, &self.options).map_err(run_error)?), batch);
        }
        match &*state {
            State::Ready(r, batch) => Ok((r.clone(), *batch)),
            State::Pending(_) => unreachable!("compiled above"),
        }
    }

    /// Runs `data` (n samples of the input shape) in chunks of the compiled batch, the last one padded.
    fn forward(&self, py: Python<'_>, n: usize, data: &[f32]) -> PyResult<Tensor> {
        let (runner, batch) = self.runner(n)?;
        let per_in: usize = self.input.iter().product();
        let per_out: usize = self.output.iter().product();
        let shape = |n: usize, dims: &[usize]| [&[n][..], dims].concat();
        let mut out = Vec::with_capacity(n * per_out);
        py.detach(|| {
            for chunk in data.chunks(batch * per_in) {
                let mut x = chunk.to_vec();
                x.resize(batch * per_in, 0.0);
                let y = runner.run(&Tensor::new(shape(batch, &self.input), x).expect("sized")).map_err(run_error)?;
                out.extend_from_slice(&y.data()[..chunk.len() / per_in * per_out]);
            }
            Ok::<_, PyErr>(())
        })?;
        Ok(Tensor::new(shape(n, &self.output), out).expect("sized"))
    }

    /// The samples of `x`: a float32 array of shape (N, *input) or (*input); read in place when contiguous.
    fn samples(&self, x: &Bound<'_, PyAny>) -> PyResult<Tensor> {
        let arr = x.cast::<PyArrayDyn<f32>>().map_err(|_| {
            let got = x.getattr("dtype").map_or_else(|_| format!("a {}", x.get_type().name().map_or("?".into(), |n| n.to_string())), |d| format!("dtype {d}"));
            PyTypeError::new_err(format!("x must be a numpy array of dtype float32, got {got} (convert it with x.astype(numpy.float32))"))
        })?;
        let ro = arr.try_readonly().map_err(|e| PyValueError::new_err(e.to_string()))?;
        let dims = ro.shape().to_vec();
        let n = match dims.len().checked_sub(self.input.len()) {
            Some(0) if dims == self.input => 1,
            Some(1) if dims[1..] == self.input[..] && dims[0] > 0 => dims[0],
            _ => {
                return Err(InputError::new_err(format!(
                    "x has shape {dims:?}, but `{}` takes (N, {}) or one sample {:?}",
                    self.graph.name,
                    join(&self.input),
                    self.input
                )))
            }
        };
        let data = match ro.as_slice() {
            Ok(s) => s.to_vec(),
            Err(_) => ro.as_array().iter().copied().collect(),
        };
        if data.iter().any(|v| !v.is_finite()) {
            return Err(InputError::new_err("x holds non-finite values (NaN or infinity)"));
        }
        Ok(Tensor::new(vec![n].into_iter().chain(self.input.iter().copied()).collect(), data).expect("sized"))
    }
}

/// One class of `Model.top`: index, ImageNet name (1000-class models), probability.
type Ranked = (usize, Option<&'static str>, f64);

fn join(dims: &[usize]) -> String {
    dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}

fn to_numpy<'py>(py: Python<'py>, t: Tensor) -> Bound<'py, PyArrayDyn<f32>> {
    let shape = t.shape().to_vec();
    ArrayD::from_shape_vec(IxDyn(&shape), t.into_data()).expect("sized").into_pyarray(py)
}

#[pymethods]
impl Model {
    /// Runs the model on `x`, a float32 array of shape (N, C, H, W) (or one sample (C, H, W)), and returns
    /// its outputs (N, ...) as a new array. The GIL is released while it runs.
    fn run<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let x = self.samples(x)?;
        let y = self.forward(py, x.batch(), x.data())?;
        Ok(to_numpy(py, y))
    }

    /// Same as `run(x)`.
    fn __call__<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        self.run(py, x)
    }

    /// The `k` best classes of every sample of `x`: one list per sample of (class index, name or None,
    /// probability) tuples, best first. Probabilities are the softmax of the outputs (or the outputs, if
    /// the model ends in softmax); names are ImageNet's for 1000-class models.
    #[pyo3(signature = (x, k = 5))]
    fn top(&self, py: Python<'_>, x: &Bound<'_, PyAny>, k: i64) -> PyResult<Vec<Vec<Ranked>>> {
        let k = usize::try_from(k).ok().filter(|&k| k > 0).ok_or_else(|| PyValueError::new_err(format!("k={k}: ask for at least one class")))?;
        let x = self.samples(x)?;
        let y = self.forward(py, x.batch(), x.data())?;
        let ranked =
            cnnc::top::top(&self.graph, &y, k).ok_or_else(|| PyValueError::new_err(format!("the outputs have shape {:?}, not (N, classes)", y.shape())))?;
        Ok(ranked.into_iter().map(|r| r.into_iter().map(|c| (c.index, c.name, c.probability)).collect()).collect())
    }

    /// The model's name (from its file).
    #[getter]
    fn name(&self) -> &str {
        &self.graph.name
    }

    /// The shape of one input sample, e.g. (3, 227, 227).
    #[getter]
    fn input_shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.input)
    }

    /// The shape of one output sample, e.g. (1000,).
    #[getter]
    fn output_shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.output)
    }

    /// The batch size the kernels are compiled for (None until the first run when `batch=None` was given).
    #[getter]
    fn batch(&self) -> Option<usize> {
        match &*self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Ready(_, b) => Some(*b),
            State::Pending(_) => self.spec.batch,
        }
    }

    /// Worker threads per run.
    #[getter]
    fn threads(&self) -> usize {
        self.options.threads()
    }

    #[getter]
    fn backend(&self) -> String {
        self.spec.backend.clone()
    }

    fn __repr__(&self) -> String {
        let batch = self.batch().map_or("None".into(), |b| b.to_string());
        let tuple = |d: &[usize]| if d.len() == 1 { format!("({},)", d[0]) } else { format!("({})", join(d)) };
        format!(
            "<cnnc.Model {} input {} output {} backend={:?} batch={batch} threads={}>",
            self.graph.name,
            tuple(&self.input),
            tuple(&self.output),
            self.spec.backend,
            self.threads()
        )
    }

    /// Pickles as the recipe: `cnnc.compile` called again with the same model text (or ONNX path),
    /// weights path and options. The weights file must exist at that path where it is unpickled.
    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let s = &self.spec;
        let kwargs = PyDict::new(py);
        let model: Bound<'py, PyAny> = match &s.model {
            ModelSpec::Bundled => py.None().into_bound(py),
            ModelSpec::Onnx(p) => p.clone().into_pyobject(py)?.into_any(),
            ModelSpec::Text { name, text } => {
                kwargs.set_item("name", name)?;
                PyBytes::new(py, text.as_bytes()).into_any()
            }
        };
        kwargs.set_item("batch", s.batch)?;
        kwargs.set_item("threads", s.threads)?;
        kwargs.set_item("backend", &s.backend)?;
        kwargs.set_item("opt", s.opt)?;
        kwargs.set_item("tier", &s.tier)?;
        kwargs.set_item("winograd", &s.winograd)?;
        kwargs.set_item("weights_dtype", &s.weights_dtype)?;
        let rebuild = py.import("cnnc")?.getattr("_rebuild")?;
        Ok((rebuild, (model, s.weights.clone(), kwargs).into_pyobject(py)?))
    }
}

/// Compiles a model for running from Python.
///
/// model: a `.model` file or an `.onnx` file (str or os.PathLike), model text as bytes (UTF-8), or None
///     for the bundled AlexBN.
/// weights: a Chainer `save_npz` file or a safetensors file; None uses the ONNX file's own weights, or
///     Chainer's initializers from a fixed seed (with a warning: the outputs then mean nothing).
/// batch: the batch size the kernels are compiled for; calls with more samples run in chunks, fewer are
///     padded. None: the first call's number of samples, at most 32.
/// threads: worker threads per run (default: the available cores).
/// backend: "jit" (Cranelift kernels), "reference" (the naive interpreter) or "cuda".
/// opt: 0 disables the optimizer's rewrites. tier, winograd, weights_dtype: as the CLI's flags.
/// name: the name diagnostics give model text passed as bytes.
///
/// Raises cnnc.ModelError, cnnc.WeightsError or cnnc.RunError with the CLI's messages.
#[pyfunction]
#[pyo3(signature = (model = None, weights = None, *, batch = None, threads = None, backend = "jit", opt = 1, tier = "auto", winograd = "auto", weights_dtype = "f32", name = None))]
#[allow(clippy::too_many_arguments)]
fn compile(
    py: Python<'_>,
    model: Option<&Bound<'_, PyAny>>,
    weights: Option<&Bound<'_, PyAny>>,
    batch: Option<usize>,
    threads: Option<u32>,
    backend: &str,
    opt: u8,
    tier: &str,
    winograd: &str,
    weights_dtype: &str,
    name: Option<String>,
) -> PyResult<Model> {
    if batch == Some(0) || batch.is_some_and(|b| b > 4096) {
        return Err(PyValueError::new_err(format!("batch={} is outside 1..=4096", batch.unwrap_or(0))));
    }
    if threads.is_some_and(|t| !(1..=1024).contains(&t)) {
        return Err(PyValueError::new_err(format!("threads={} is outside 1..=1024", threads.unwrap_or(0))));
    }
    if opt > 1 {
        return Err(PyValueError::new_err(format!("opt={opt} is not 0 or 1")));
    }
    let options = Options {
        backend: choice::<Backend>("backend", backend)?,
        tier: choice::<TierChoice>("tier", tier)?,
        threads,
        weights_dtype: choice::<WeightsDtype>("weights_dtype", weights_dtype)?,
        winograd: choice::<Winograd>("winograd", winograd)?,
    };
    options.check().map_err(run_error)?;
    let model = match model {
        None => ModelSpec::Bundled,
        Some(m) if m.is_instance_of::<PyBytes>() => {
            let text = String::from_utf8(m.extract::<Vec<u8>>()?).map_err(|e| ModelError::new_err(format!("the model text is not UTF-8: {e}")))?;
            ModelSpec::Text { name: name.unwrap_or_else(|| "<bytes>".into()), text }
        }
        Some(m) => {
            let p = path_of(m)?;
            if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) {
                ModelSpec::Onnx(std::path::absolute(&p).unwrap_or(p))
            } else {
                let text = std::fs::read_to_string(&p).map_err(|e| load_error(LoadError::Io { path: p.display().to_string(), source: e }))?;
                ModelSpec::Text { name: p.display().to_string(), text }
            }
        }
    };
    let weights = weights.map(path_of).transpose()?.map(|p| std::path::absolute(&p).unwrap_or(p));
    let spec = Spec {
        model,
        weights,
        batch,
        threads,
        backend: backend.to_lowercase(),
        opt,
        tier: tier.to_lowercase(),
        winograd: winograd.to_lowercase(),
        weights_dtype: weights_dtype.to_lowercase(),
    };

    let source = match &spec.model {
        ModelSpec::Bundled => ModelSource::Bundled,
        ModelSpec::Onnx(p) => ModelSource::File(p),
        ModelSpec::Text { name, text } => ModelSource::Text { name: name.clone(), text: text.clone() },
    };
    let (mut loaded, random) = py
        .detach(|| {
            let loaded = cnnc::load(source)?;
            let random = loaded.random_weights(spec.weights.as_deref());
            Ok::<_, LoadError>((loaded, random))
        })
        .map_err(load_error)?;
    let warn = |msg: String| -> PyResult<()> {
        let warnings = py.import("warnings")?;
        warnings.call_method1("warn", (msg, py.get_type::<pyo3::exceptions::PyUserWarning>(), 2))?;
        Ok(())
    };
    let warnings: Vec<_> = loaded.warnings.iter().filter(|d| !d.is_error()).cloned().collect();
    if !warnings.is_empty() {
        warn(loaded.src.render_plain(&warnings))?;
    }
    if random {
        warn("no weights given: parameters are initialised randomly (Chainer's LeCunNormal, fixed seed); the outputs are meaningless".into())?;
    }
    let (graph, input, output, bound, report) = py.detach(|| {
        let bound = loaded.bind(spec.weights.as_deref()).map_err(load_error)?;
        let (graph, report) = cnnc::opt::optimize(&loaded.graph, &cnnc::opt::Options { level: opt, ..Default::default() });
        let &[input] = &graph.inputs[..] else {
            return Err(ModelError::new_err(format!(
                "`{}` takes {} inputs; cnnc's Python package runs models with exactly one",
                loaded.src.name,
                graph.inputs.len()
            )));
        };
        let (input, output) = (graph.node(input).shape.clone(), graph.node(graph.output).shape.clone());
        Ok((graph, input, output, bound, report))
    })?;
    if let Some(w) = report.warning() {
        warn(w)?;
    }
    let m = Model { spec, graph, input, output, options, state: Mutex::new(State::Pending(Some(bound))) };
    if let Some(b) = m.spec.batch {
        py.detach(|| m.runner(b).map(|_| ()))?;
    }
    Ok(m)
}

/// Loads images (PNG, JPEG) or `.npy` files as one float32 batch of shape (N, *shape), preprocessed as
/// `cnnc run` does: shorter side resized to `resize` (default 256; an image already of the input size is
/// not resized), center crop, RGB (or luma for one channel), minus `mean` (R, G, B on the 0..255 scale),
/// times `scale`.
///
/// shape: a compiled Model (its input shape) or a (C, H, W) tuple with C = 3 or 1.
#[pyfunction]
#[pyo3(signature = (paths, shape, *, resize = None, mean = None, scale = None))]
fn load_images<'py>(
    py: Python<'py>,
    paths: &Bound<'py, PyAny>,
    shape: &Bound<'py, PyAny>,
    resize: Option<u32>,
    mean: Option<[f32; 3]>,
    scale: Option<f32>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let dims: Vec<usize> = match shape.cast::<Model>() {
        Ok(m) => m.get().input.clone(),
        Err(_) => shape.extract().map_err(|_| PyTypeError::new_err("shape must be a cnnc.Model or a (C, H, W) tuple"))?,
    };
    let paths: Vec<PathBuf> = if paths.is_instance_of::<pyo3::types::PyString>() || paths.hasattr("__fspath__")? {
        vec![path_of(paths)?]
    } else {
        paths.try_iter()?.map(|p| path_of(&p?)).collect::<PyResult<_>>()?
    };
    if paths.is_empty() {
        return Err(PyValueError::new_err("no paths given"));
    }
    if resize.is_some_and(|r| !(1..=16384).contains(&r)) {
        return Err(PyValueError::new_err(format!("resize={} is outside 1..=16384", resize.unwrap_or(0))));
    }
    if mean.is_some_and(|m| m.iter().any(|v| !v.is_finite())) || scale.is_some_and(|s| !s.is_finite()) {
        return Err(PyValueError::new_err("mean and scale must be finite numbers"));
    }
    let d = Preprocess::default();
    let pre = Preprocess { resize, mean: mean.unwrap_or(d.mean), scale: scale.unwrap_or(d.scale) };
    let parts = py.detach(|| paths.iter().map(|p| cnnc::input::load(p, &dims, &pre)).collect::<Result<Vec<_>, _>>()).map_err(input_error)?;
    Ok(to_numpy(py, cnnc::input::concat_batches(parts)))
}

#[pymodule]
fn _cnnc(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add_function(wrap_pyfunction!(load_images, m)?)?;
    m.add_class::<Model>()?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add("WeightsError", py.get_type::<WeightsError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("RunError", py.get_type::<RunError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
