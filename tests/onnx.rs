//! ONNX import against the ONNX project's own test data, as the `onnx` Python wheel ships it
//! (`onnx/backend/test/data/`): the Model Zoo architectures of `light/` (constant weights, stored
//! outputs; their input is `arange(n)/n`, as onnx's runner makes it) and the node tests of
//! `pytorch-converted/` and `pytorch-operator/` (inputs and outputs as `.pb`). One test per model.
//!
//! Each model is imported, compiled, and run on the reference interpreter unoptimized and on the JIT
//! optimized; both must match the stored output. A model cnnc cannot import is skipped only if it is
//! listed in `tests/onnx-skips.txt` with its reason (so an import that breaks fails here, and one that
//! starts working must be taken off the list).
//!
//! Beside them, torchvision's classic CNNs as torch's two exporters write them
//! (`tests/fixtures/torchvision/`, graphs only): `weights.py` regenerates their weights deterministically
//! under `target/torchvision/` and computes ONNX Runtime's output on them; each must match within 1e-4 on
//! the reference interpreter (-O0) and the JIT (-O1), and its PTX must assemble with `ptxas` when one is
//! found.
//!
//! The wheel is found through `CNNC_PYTHON` (`.ci/run` sets it to its venv's interpreter) or a venv under
//! `target/`; without one the tests fail under CI and are ignored elsewhere.

use cnnc::diag::Source;
use cnnc_runtime::Tensor;
use cnnc_tests::{optimized, root};
use libtest_mimic::{Arguments, Failed, Trial};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn python() -> Option<PathBuf> {
    let venvs = ["target/ci-venv/bin/python3", "target/bench-venv/bin/python3"].map(|v| root().join(v));
    std::env::var_os("CNNC_PYTHON").map(PathBuf::from).into_iter().chain(venvs).find(|p| p.exists())
}

/// The `onnx/backend/test/data` folder of the installed wheel.
fn data_dir() -> Result<PathBuf, String> {
    let py = python().ok_or("no Python with the `onnx` package: set CNNC_PYTHON or run .ci/run once")?;
    let out = std::process::Command::new(&py)
        .args(["-c", "import onnx, os; print(os.path.join(os.path.dirname(onnx.__file__), 'backend', 'test', 'data'))"])
        .output()
        .map_err(|e| format!("{}: {e}", py.display()))?;
    if !out.status.success() {
        return Err(format!("{} cannot import onnx: {}", py.display(), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// `name reason…` per line; `#` starts a comment.
fn skips() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(root().join("tests/onnx-skips.txt")).expect("tests/onnx-skips.txt");
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.split_once(' ').map_or((l.to_string(), String::new()), |(n, r)| (n.to_string(), r.trim().to_string())))
        .collect()
}

fn main() {
    let args = Arguments::from_args();
    let dir = match data_dir() {
        Ok(d) => d,
        Err(e) => {
            let ci = std::env::var_os("CI").is_some();
            let t = Trial::test("onnx_test_data", move || Err(Failed::from(e.clone()))).with_ignored_flag(!ci);
            libtest_mimic::run(&args, vec![t]).exit();
        }
    };
    let skips = skips();
    let mut cases: Vec<(String, PathBuf, Vec<PathBuf>, PathBuf)> = vec![];
    let mut light: Vec<PathBuf> = std::fs::read_dir(dir.join("light")).map(|d| d.map(|e| e.expect("entry").path()).collect()).unwrap_or_default();
    light.retain(|p| p.extension().is_some_and(|e| e == "onnx"));
    for m in light {
        let name = m.file_stem().expect("a name").to_string_lossy().into_owned();
        let out = m.with_file_name(format!("{name}_output_0.pb"));
        cases.push((name, m, vec![], out));
    }
    for sub in ["pytorch-converted", "pytorch-operator"] {
        for d in std::fs::read_dir(dir.join(sub)).map(|d| d.map(|e| e.expect("entry").path()).collect::<Vec<_>>()).unwrap_or_default() {
            let set = d.join("test_data_set_0");
            let mut inputs: Vec<PathBuf> = (0..).map(|i| set.join(format!("input_{i}.pb"))).take_while(|p| p.exists()).collect();
            inputs.sort();
            cases.push((d.file_name().expect("a name").to_string_lossy().into_owned(), d.join("model.onnx"), inputs, set.join("output_0.pb")));
        }
    }
    cases.sort();
    match torchvision(&dir) {
        Ok(graphs) => {
            cases.extend(graphs.into_iter().map(|(name, model, x, want)| (name, model, vec![x], want)));
        }
        Err(e) => cases.push(("torchvision_setup".into(), PathBuf::from(e), vec![], PathBuf::new())),
    }
    let listed: Vec<String> = skips.keys().filter(|k| !cases.iter().any(|c| &c.0 == *k)).cloned().collect();
    let mut trials: Vec<Trial> = cases
        .into_iter()
        .map(|(name, model, inputs, output)| {
            let skip = skips.get(&name).cloned();
            // PTX for the torchvision set (the others are small variations of the same kernels).
            let ptx = name.starts_with("torchvision_");
            Trial::test(name, move || check(&model, &inputs, &output, skip.as_deref(), ptx))
        })
        .collect();
    trials.push(Trial::test("skip_list_names_existing_tests", move || {
        if listed.is_empty() {
            Ok(())
        } else {
            Err(format!("tests/onnx-skips.txt lists unknown tests: {listed:?}").into())
        }
    }));
    libtest_mimic::run(&args, trials).exit();
}

/// The torchvision graphs with their regenerated weights: (name, model, input, ORT's output). Runs
/// `weights.py` (seconds) unless every output is newer than its graph.
fn torchvision(_: &Path) -> Result<Vec<(String, PathBuf, PathBuf, PathBuf)>, String> {
    let src = root().join("tests/fixtures/torchvision");
    let out = root().join("target/torchvision");
    let mut graphs: Vec<PathBuf> = std::fs::read_dir(&src).map_err(|e| e.to_string())?.map(|e| e.expect("entry").path()).collect();
    graphs.retain(|p| p.extension().is_some_and(|e| e == "onnx"));
    graphs.sort();
    let stem = |g: &Path| g.file_stem().expect("a name").to_string_lossy().into_owned();
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = graphs.iter().all(|g| modified(&out.join(format!("{}.ort.npy", stem(g)))) > modified(g));
    if !fresh {
        let py = python().ok_or("no Python with onnxruntime")?;
        let status = std::process::Command::new(py).arg(src.join("weights.py")).arg(&out).status().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("tests/fixtures/torchvision/weights.py failed ({status})"));
        }
    }
    Ok(graphs
        .iter()
        .map(|g| (format!("torchvision_{}", stem(g)), out.join(g.file_name().expect("a name")), out.join("x.npy"), out.join(format!("{}.ort.npy", stem(g)))))
        .collect())
}

fn tensor(path: &Path) -> Result<Tensor, Failed> {
    if path.extension().is_some_and(|e| e == "npy") {
        return Ok(cnnc_tests::load_npy(path));
    }
    let (d, v) = cnnc::onnx::read_tensor(path).map_err(|e| e.to_string())?;
    Tensor::new(d, v).map_err(|e| Failed::from(format!("{}: {e:?}", path.display())))
}

fn check(model: &Path, inputs: &[PathBuf], output: &Path, skip: Option<&str>, ptx: bool) -> Result<(), Failed> {
    if output.as_os_str().is_empty() {
        return Err(model.display().to_string().into());
    }
    let imported = match (cnnc::onnx::import(model), skip) {
        (Ok(_), Some(reason)) => return Err(format!("imports now, but tests/onnx-skips.txt skips it ({reason}): take it off the list").into()),
        (Err(_), Some(_)) => return Ok(()),
        (Err(e), None) => return Err(format!("{e}").into()),
        (Ok(i), None) => i,
    };
    let src = Source::new(model.display().to_string(), imported.text.clone());
    let (g, _) = cnnc::compile(&src).map_err(|f| format!("the imported text does not compile:\n{}\n{}", src.render_plain(&f.0), imported.text))?;
    let xs: Vec<Tensor> = if inputs.is_empty() {
        // onnx's runner for the light models: arange(n) / n in the input's shape.
        let shape = [vec![1], g.node(g.inputs[0]).shape.clone()].concat();
        let n: usize = shape.iter().product();
        vec![Tensor::new(shape, (0..n).map(|i| i as f32 / n as f32).collect()).expect("a shape")]
    } else {
        inputs.iter().map(|p| tensor(p)).collect::<Result<_, _>>()?
    };
    let want = tensor(output)?;
    let weights = imported.weights;
    if ptx {
        round_trip(&weights, model)?;
    }
    let params = |key: &str, shape: &[usize]| -> Tensor {
        let (d, v) = weights.get(key).unwrap_or_else(|| panic!("no weight `{key}`")).clone();
        assert_eq!(d.iter().product::<usize>(), shape.iter().product::<usize>(), "{key}");
        Tensor::new(shape.to_vec(), v).expect("a shape")
    };
    let bound =
        |g: &cnnc::ir::Graph| cnnc::weights::Bound { params: g.params().into_iter().map(|s| (s.clone(), params(&s.key, &s.shape))).collect(), notes: vec![] };
    let reference = cnnc::lower::lower(&g, bound(&g)).map_err(|e| format!("{e}"))?.run(xs.clone()).map_err(|e| format!("{e}"))?;
    let reshaped = |t: Tensor| Tensor::new(want.shape().to_vec(), t.data().to_vec()).expect("same size");
    check_close(&reshaped(reference), &want, "reference -O0")?;
    if xs.len() == 1 {
        let fast = optimized(&g, 1);
        let jit = cnnc::kernel::program(&fast, bound(&fast), xs[0].batch(), cnnc::kernel::Tier::best());
        let y =
            cnnc::jit::compile(&jit, cnnc::jit::Options { checked: true }).map_err(|e| format!("{e}"))?.exe.run(&[&xs[0]], 2).map_err(|e| format!("{e}"))?;
        check_close(&reshaped(y), &want, "JIT -O1")?;
        if let Some(ptxas) = cnnc::ptx::ptxas::find().filter(|_| ptx) {
            let portable = cnnc::kernel::program(&fast, bound(&fast), 1, cnnc::kernel::Tier::Portable);
            let ptx = cnnc::ptx::emit(&portable, cnnc::ptx::DEFAULT_SM).map_err(|e| e.to_string())?;
            cnnc::ptx::ptxas::assemble(&ptxas, &ptx, cnnc::ptx::DEFAULT_SM).map_err(|e| format!("ptxas: {e}"))?;
        }
    }
    Ok(())
}

/// `cnnc import --weights-out`'s npz read back: every array bit for bit (so `cnnc run MODEL --weights` on
/// the imported text computes what the ONNX file does; the text itself is the one compiled here).
fn round_trip(weights: &std::collections::HashMap<String, cnnc::weights::Array>, model: &Path) -> Result<(), Failed> {
    let path = model.with_extension("roundtrip.npz");
    let mut bytes = vec![];
    cnnc::weights::write(&mut bytes, weights, false).map_err(|e| e.to_string())?;
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    let back = cnnc::weights::Weights::open(&path).map_err(|e| e.to_string())?;
    for (key, (shape, data)) in weights {
        let (s, d) = back.read(key, None).map_err(|e| e.to_string())?;
        let d = d.ok_or("no shape was asked for")?;
        if &s != shape || !d.data().iter().map(|v| v.to_bits()).eq(data.iter().map(|v| v.to_bits())) {
            return Err(format!("`{key}` changed through the npz").into());
        }
    }
    std::fs::remove_file(&path).map_err(|e| e.to_string())?;
    Ok(())
}

/// max |got − want| ≤ 1e-4 · max |want| (the stored outputs are ORT's or PyTorch's, in f32).
fn check_close(got: &Tensor, want: &Tensor, what: &str) -> Result<(), Failed> {
    if got.shape() != want.shape() {
        return Err(format!("{what}: shape {:?}, expected {:?}", got.shape(), want.shape()).into());
    }
    let (diff, scale) = (got.max_abs_diff(want), want.max_abs());
    if diff.is_nan() || diff > 1e-4 * scale {
        return Err(format!("{what}: max |diff| {diff:e} > 1e-4 × max |want| {scale:e}").into());
    }
    Ok(())
}
