//! The `cnnc` binary as a user meets it: exit codes (0 ok, 1 bad model/weights/input, 2 usage), messages
//! that name the culprit, and no output file left behind by a failed run.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn fixture(p: &str) -> String {
    root().join("tests/fixtures").join(p).display().to_string()
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cnnc(args: &[&str]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_cnnc")).args(args).current_dir(root()).output().expect("cnnc runs");
    Out {
        code: o.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    }
}

/// Asserts a failure with `code` whose stderr names every `culprit`, and that it did not panic.
fn fails(args: &[&str], code: i32, culprits: &[&str]) -> Out {
    let o = cnnc(args);
    assert_eq!(o.code, code, "cnnc {args:?}\nstderr:\n{}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "panic: {}", o.stderr);
    for c in culprits {
        assert!(o.stderr.contains(c), "stderr of cnnc {args:?} does not name {c:?}:\n{}", o.stderr);
    }
    o
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

fn npy(dir: &Path, name: &str, shape: &[u64], data: &[f32]) -> String {
    use npyz::WriterBuilder;
    let p = dir.join(name);
    let mut w = npyz::WriteOptions::new().default_dtype().shape(shape).writer(std::fs::File::create(&p).unwrap()).begin_nd().unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
    p.display().to_string()
}

/// Writes an npz of float32 arrays: (key, shape, values in the given order).
fn npz(path: &Path, arrays: &[(&str, &[u64], &[f32], npyz::Order)]) -> String {
    use npyz::WriterBuilder;
    let mut npz = npyz::npz::NpzWriter::create(path).unwrap();
    for &(key, shape, values, order) in arrays {
        let mut w = npz.array::<f32>(key, Default::default()).unwrap().default_dtype().shape(shape).order(order).begin_nd().unwrap();
        w.extend(values.iter().copied()).unwrap();
        w.finish().unwrap();
    }
    path.display().to_string()
}

fn read_npy(p: &str) -> (Vec<u64>, Vec<f32>) {
    let f = npyz::NpyFile::new(std::fs::File::open(p).unwrap()).unwrap();
    (f.shape().to_vec(), f.into_vec::<f32>().unwrap())
}

const SMALL: &str = "alexbn_small/model.model";

/// Runs the reduced-width AlexBN fixture on its input with its Chainer weights (or `weights`), writing `out`.
fn run_small(weights: &str, out: &Path, extra: &[&str]) -> Out {
    let (model, input) = (fixture(SMALL), fixture("alexbn_small/in.npy"));
    let mut args = vec!["run", &model, "--weights", weights, "--input", &input, "--output", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    cnnc(&args)
}

/// max |a − b| / max |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

// ---- compile ----

#[test]
fn compile_prints_the_table_with_exact_macs() {
    let o = cnnc(&["compile", "models/alexbn.model"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("1,135,256,096") && o.stdout.contains("1135256096 MACs per image"), "{}", o.stdout);
    assert!(o.stdout.contains("conv1             conv2d      [N, 96, 55, 55]"), "{}", o.stdout);
}

#[test]
fn compile_emits_ir_to_a_file() {
    let d = tmp();
    let out = d.path().join("alexbn.ir");
    let o = cnnc(&["compile", "models/alexbn.model", "--emit", "ir", "-o", out.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.is_empty());
    assert!(std::fs::read_to_string(out).unwrap().starts_with("graph AlexBN {\n  %0 = input x : [N, 3, 227, 227]"));
}

#[test]
fn compile_missing_model_file() {
    fails(&["compile", "models/nope.model"], 1, &["cannot read model `models/nope.model`"]);
}

#[test]
fn compile_bad_model_points_at_the_line() {
    let d = tmp();
    let m = write(d.path(), "bad.model", b"model M {\n    c = L.Convolution2D(3, 8, 3)\n    forward(x: [4, 8, 8]) {\n        return self.c(x)\n    }\n}\n");
    let out = d.path().join("bad.ir");
    fails(&["compile", &m, "--emit", "ir", "-o", out.to_str().unwrap()], 1, &["bad.model:4:16", "`c` expects 3 input channels", "could not compile"]);
    assert!(!out.exists(), "a failed compile left an output file");
}

#[test]
fn compile_non_utf8_model() {
    let d = tmp();
    let m = write(d.path(), "bin.model", &[0xff, 0xfe, 0x00, 0x41]);
    fails(&["compile", &m], 1, &["bin.model"]);
}

// ---- usage errors (exit 2) ----

#[test]
fn unknown_flag_is_a_usage_error() {
    fails(&["compile", "models/alexbn.model", "--frobnicate"], 2, &["--frobnicate"]);
}

#[test]
fn run_requires_an_input() {
    fails(&["run"], 2, &["--input"]);
}

#[test]
fn run_rejects_top_zero() {
    fails(&["run", "--input", "x.npy", "--top", "0"], 2, &["--top"]);
}

#[test]
fn run_rejects_a_malformed_mean() {
    fails(&["run", "--input", "x.npy", "--mean", "1,2"], 2, &["--mean", "three comma-separated numbers"]);
}

#[test]
fn unknown_emit_kind_is_a_usage_error() {
    fails(&["compile", "models/alexbn.model", "--emit", "llvm"], 2, &["--emit", "llvm"]);
}

/// `--emit kernels --after PASS` shows the program after one pass of program building; the last pass's
/// view is the finished listing. `--after` without `--emit kernels`, or an unknown pass, is a usage error.
#[test]
fn kernels_after_each_pass() {
    let finished = cnnc(&["compile", "models/alexbn.model", "--emit", "kernels"]);
    assert_eq!(finished.code, 0, "{}", finished.stderr);
    for pass in ["alias", "lower", "lifetimes", "arena", "slots"] {
        let o = cnnc(&["compile", "models/alexbn.model", "--emit", "kernels", "--after", pass]);
        assert_eq!(o.code, 0, "--after {pass}: {}", o.stderr);
        assert_eq!(pass == "slots", o.stdout == finished.stdout, "--after {pass}");
    }
    fails(&["compile", "models/alexbn.model", "--after", "arena"], 2, &["--after", "--emit kernels"]);
    fails(&["compile", "models/alexbn.model", "--emit", "kernels", "--after", "regalloc"], 2, &["--after", "regalloc"]);
}

// ---- bad inputs (exit 1, no output file) ----

fn run_fails_without_output(extra: &[&str], culprits: &[&str]) {
    let d = tmp();
    let out = d.path().join("y.npy");
    let mut args = vec!["run"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--output", out.to_str().unwrap()]);
    fails(&args, 1, culprits);
    assert!(!out.exists(), "a failed run left {}", out.display());
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "temporary files left behind");
}

#[test]
fn run_missing_input_file() {
    run_fails_without_output(&["--input", "no/such.png"], &["cannot read input `no/such.png`"]);
}

#[test]
fn run_corrupt_image() {
    let d = tmp();
    let img = write(d.path(), "broken.png", b"\x89PNG\r\n\x1a\nthis is not really a png");
    run_fails_without_output(&["--input", &img], &["broken.png", "not a readable image"]);
}

#[test]
fn run_npy_with_the_wrong_shape() {
    let d = tmp();
    let x = npy(d.path(), "x.npy", &[2, 3, 8, 8], &vec![0.0; 2 * 3 * 64]);
    run_fails_without_output(&["--input", &x], &["x.npy", "[2, 3, 8, 8]", "[N, 3, 227, 227]"]);
}

#[test]
fn run_npy_with_an_integer_dtype() {
    let d = tmp();
    let p = d.path().join("ints.npy");
    npyz::to_file_1d(&p, vec![1i32, 2, 3]).unwrap();
    run_fails_without_output(&["--input", p.to_str().unwrap()], &["ints.npy", "dtype <i4"]);
}

#[test]
fn run_npy_with_nan() {
    let d = tmp();
    let mut data = vec![0.0f32; 3 * 227 * 227];
    data[7] = f32::NAN;
    let x = npy(d.path(), "nan.npy", &[3, 227, 227], &data);
    run_fails_without_output(&["--input", &x], &["nan.npy", "non-finite"]);
}

#[test]
fn run_corrupt_weights_file() {
    let d = tmp();
    let w = write(d.path(), "w.npz", b"definitely not weights");
    run_fails_without_output(&[&fixture(SMALL), "--input", &fixture("alexbn_small/in.npy"), "--weights", &w], &["w.npz", "neither a Chainer .npz"]);
}

#[test]
fn run_truncated_npz() {
    let d = tmp();
    let bytes = std::fs::read(fixture("alexbn_small/weights.npz")).unwrap();
    let w = write(d.path(), "cut.npz", &bytes[..bytes.len() / 2]);
    run_fails_without_output(&[&fixture(SMALL), "--input", &fixture("alexbn_small/in.npy"), "--weights", &w], &["cut.npz", "not a valid npz"]);
}

#[test]
fn run_missing_weights_file() {
    run_fails_without_output(
        &[&fixture(SMALL), "--input", &fixture("alexbn_small/in.npy"), "--weights", "no/such.npz"],
        &["cannot read weights file `no/such.npz`"],
    );
}

#[test]
fn run_input_that_is_neither_image_nor_npy() {
    run_fails_without_output(&["--input", &fixture("alexbn_full/prng_probe.json")], &["prng_probe.json", "not a readable image or .npy"]);
}

#[test]
fn run_weights_with_wrong_shapes_names_key_and_shapes() {
    let d = tmp();
    let x = npy(d.path(), "x.npy", &[3, 227, 227], &vec![0.5; 3 * 227 * 227]);
    run_fails_without_output(
        &["--input", &x, "--weights", &fixture("alexbn_small/weights.npz")],
        &["`conv1/W`", "[16, 3, 11, 11]", "[96, 3, 11, 11]", "alexbn.model (bundled):3:5"],
    );
}

#[test]
fn run_weights_missing_a_key_names_it() {
    run_fails_without_output(
        &[&fixture(SMALL), "--input", &fixture("alexbn_small/in.npy"), "--weights", &fixture("ops/conv_basic.npz")],
        &["has no parameter `conv1/W`", "has no parameter `fc8/b`"],
    );
}

#[test]
fn run_output_into_a_missing_directory() {
    fails(
        &[
            "run",
            &fixture(SMALL),
            "--input",
            &fixture("alexbn_small/in.npy"),
            "--weights",
            &fixture("alexbn_small/weights.npz"),
            "--output",
            "no/such/dir/y.npy",
        ],
        1,
        &["cannot write `no/such/dir/y.npy`"],
    );
}

#[test]
fn failed_run_keeps_an_existing_output_file() {
    let d = tmp();
    let out = write(d.path(), "y.npy", b"keep me");
    fails(&["run", "--input", "no/such.png", "--output", &out], 1, &["no/such.png"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
}

#[test]
fn image_smaller_than_the_crop() {
    run_fails_without_output(&["--input", "models/examples/cat.jpg", "--resize", "100"], &["cat.jpg", "raise --resize"]);
}

#[test]
fn run_needs_a_single_input_model() {
    let d = tmp();
    let m = write(d.path(), "two.model", b"model Two {\n    forward(a: [3], b: [3]) {\n        return a + b\n    }\n}\n");
    fails(&["run", &m, "--input", "x.npy"], 1, &["takes 2 inputs"]);
}

// ---- successful runs ----

#[test]
fn run_matches_chainer_and_writes_logits() {
    let d = tmp();
    let out = d.path().join("y.npy");
    let o = run_small(&fixture("alexbn_small/weights.npz"), &out, &["--json", "--top", "3"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("2 BatchNormalization sample counter(s) (`.../N`)"), "{}", o.stderr);
    let (shape, got) = read_npy(out.to_str().unwrap());
    let (_, want) = read_npy(&fixture("alexbn_small/out.npy"));
    assert_eq!(shape, [2, 100]);
    assert!(rel_diff(&got, &want) <= 1e-5, "{}", rel_diff(&got, &want));
    let doc: serde_json::Value = serde_json::from_str(&o.stdout).expect("valid JSON");
    assert_eq!(doc["results"].as_array().unwrap().len(), 2);
    let top = doc["results"][0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    let best = (0..100).max_by(|&a, &b| got[a].total_cmp(&got[b])).unwrap();
    assert_eq!(top[0]["class"], best);
}

#[test]
fn run_default_model_on_an_image_warns_loudly() {
    let o = cnnc(&["run", "--input", "models/examples/cat.jpg"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("MEANINGLESS"), "{}", o.stderr);
    assert!(o.stdout.starts_with("models/examples/cat.jpg\n"), "{}", o.stdout);
    assert_eq!(o.stdout.lines().filter(|l| l.contains('%')).count(), 5, "{}", o.stdout);
}

#[test]
fn grayscale_and_alpha_images_form_one_batch() {
    let d = tmp();
    let gray = d.path().join("gray.png");
    image::GrayImage::from_fn(300, 260, |x, y| image::Luma([((x + y) % 256) as u8])).save(&gray).unwrap();
    let rgba = d.path().join("rgba.png");
    image::RgbaImage::from_fn(260, 300, |x, y| image::Rgba([x as u8, y as u8, 7, 128])).save(&rgba).unwrap();
    let out = d.path().join("y.npy");
    let o = cnnc(&["run", "--input", gray.to_str().unwrap(), rgba.to_str().unwrap(), "--output", out.to_str().unwrap(), "--top", "1"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(read_npy(out.to_str().unwrap()).0, [2, 1000]);
    assert!(o.stdout.contains("gray.png\n") && o.stdout.contains("rgba.png\n"), "{}", o.stdout);
}

/// Re-encodes the reduced AlexBN's npz as safetensors and as a Classifier-style npz (`predictor/` keys).
#[test]
fn safetensors_and_prefixed_npz_give_the_same_logits() {
    let d = tmp();
    let mut arch = npyz::npz::NpzArchive::open(fixture("alexbn_small/weights.npz")).unwrap();
    let names: Vec<String> = arch.array_names().map(str::to_string).collect();
    let mut arrays = Vec::new();
    for n in names.iter().filter(|n| !n.ends_with("/N")) {
        let f = arch.by_name(n).unwrap().unwrap();
        let shape: Vec<usize> = f.shape().iter().map(|&s| s as usize).collect();
        arrays.push((n.clone(), shape, f.into_vec::<f32>().unwrap()));
    }
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> =
        arrays.iter().map(|(n, s, v)| (n.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect(), s.clone())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        bytes.iter().map(|(n, b, s)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())).collect();
    let st = d.path().join("w.safetensors");
    std::fs::write(&st, safetensors::serialize(views, None).unwrap()).unwrap();

    let prefixed: Vec<(String, Vec<u64>)> = arrays.iter().map(|(n, s, _)| (format!("predictor/{n}"), s.iter().map(|&x| x as u64).collect())).collect();
    let entries: Vec<_> = prefixed.iter().zip(&arrays).map(|((k, s), (_, _, v))| (k.as_str(), &s[..], &v[..], npyz::Order::C)).collect();
    let pre = d.path().join("classifier.npz");
    npz(&pre, &entries);

    let mut outputs = Vec::new();
    for (i, w) in [fixture("alexbn_small/weights.npz"), st.display().to_string(), pre.display().to_string()].iter().enumerate() {
        let out = d.path().join(format!("y{i}.npy"));
        let o = run_small(w, &out, &[]);
        assert_eq!(o.code, 0, "{w}: {}", o.stderr);
        if i == 2 {
            assert!(o.stderr.contains("under `predictor/`"), "{}", o.stderr);
        }
        outputs.push(read_npy(out.to_str().unwrap()).1);
    }
    assert_eq!(outputs[0], outputs[1]);
    assert_eq!(outputs[0], outputs[2]);
}

/// Keys nest as Chainer names them; a wrong or missing one deep inside a chainlist is named in full.
#[test]
fn nested_chain_keys_are_named_in_full() {
    let d = tmp();
    let m = write(
        d.path(),
        "tiny.model",
        b"chain Unit(c) {\n    conv = L.Convolution2D(c, c, 3, pad=1)\n    forward(x) {\n        return F.relu(self.conv(x))\n    }\n}\n\nchainlist Stage(n, c) {\n    for i in range(n) {\n        Unit(c)\n    }\n}\n\nmodel Tiny {\n    res = Stage(2, 4)\n    forward(x: [4, 5, 5]) {\n        return self.res(x)\n    }\n}\n",
    );
    let npz_path = d.path().join("w.npz");
    let c = npyz::Order::C;
    npz(&npz_path, &[("res/0/conv/W", &[4, 4, 3, 3], &[0.5; 144], c), ("res/1/conv/W", &[4, 4, 1, 1], &[0.5; 16], c), ("res/1/conv/b", &[4], &[0.5; 4], c)]);
    let x = npy(d.path(), "x.npy", &[4, 5, 5], &[1.0; 100]);
    let o = fails(
        &["run", &m, "--weights", npz_path.to_str().unwrap(), "--input", &x],
        1,
        &["has no parameter `res/0/conv/b`", "`res/1/conv/W` has shape [4, 4, 1, 1]", "[4, 4, 3, 3]"],
    );
    assert!(o.stderr.contains("tiny.model:2:5"), "points at the link's declaration:\n{}", o.stderr);
}

#[test]
fn emit_ir_opt_and_explain_show_provenance() {
    let o = cnnc(&["compile", "models/alexbn.model", "--emit", "ir-opt", "--explain"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("conv2d+relu+max_pool2d[96 <- 3"), "{}", o.stdout);
    assert!(o.stdout.contains("[fold-bn-into-conv, fuse-conv-relu, fuse-conv-relu-maxpool; cost "), "{}", o.stdout);
    assert!(o.stderr.contains("fold-bn-into-conv") && o.stderr.contains("stopped: saturated") && o.stderr.contains("optimizer time"), "{}", o.stderr);
    let o0 = cnnc(&["compile", "models/alexbn.model", "--emit", "ir-opt", "-O0"]);
    assert_eq!(o0.stdout, cnnc(&["compile", "models/alexbn.model", "--emit", "ir"]).stdout);
}

#[test]
fn unknown_optimization_level_is_a_usage_error() {
    fails(&["compile", "models/alexbn.model", "-O3"], 2, &["-O"]);
}

#[test]
fn run_at_o0_and_o1_agree() {
    let d = tmp();
    let mut outs = Vec::new();
    for level in ["-O0", "-O1"] {
        let out = d.path().join(format!("y{level}.npy"));
        let o = run_small(&fixture("alexbn_small/weights.npz"), &out, &[level]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        outs.push(read_npy(out.to_str().unwrap()).1);
    }
    assert!(rel_diff(&outs[1], &outs[0]) <= 1e-5, "{}", rel_diff(&outs[1], &outs[0]));
}

#[test]
fn a_model_without_parameters_runs_without_the_random_weights_warning() {
    let d = tmp();
    let m = write(d.path(), "soft.model", b"model Soft {\n    forward(x: [3]) {\n        return F.softmax(x)\n    }\n}\n");
    let x = npy(d.path(), "x.npy", &[1, 3], &[1.0, 2.0, 3.0]);
    let o = cnnc(&["run", &m, "--input", &x, "--json", "--top", "1"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(!o.stderr.contains("MEANINGLESS"), "{}", o.stderr);
    let doc: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    // The model ends in softmax, so its outputs are the probabilities.
    let p = doc["results"][0]["top"][0]["probability"].as_f64().unwrap();
    assert!((p - 0.665241).abs() < 1e-5, "{p}");
}

/// Found in review: a `.npy` header whose shape overflows when multiplied out.
#[test]
fn npy_with_an_overflowing_shape() {
    let d = tmp();
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }";
    let pad = 64 - (10 + header.len() + 1) % 64;
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend(((header.len() + pad + 1) as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(std::iter::repeat_n(b' ', pad));
    bytes.push(b'\n');
    bytes.extend([0u8; 16]);
    let x = write(d.path(), "huge.npy", &bytes);
    run_fails_without_output(&["--input", &x], &["huge.npy", "too large"]);
}

/// Found in review: a tiny but extremely elongated image would be resized to gigabytes before the crop.
#[test]
fn extremely_elongated_image() {
    let d = tmp();
    let p = d.path().join("strip.png");
    image::GrayImage::from_pixel(1, 60_000, image::Luma([128])).save(&p).unwrap();
    run_fails_without_output(&["--input", p.to_str().unwrap()], &["strip.png", "crop it closer"]);
}

/// Found in review: a model ending in dropout(softmax(...)) already outputs probabilities, at -O0 as at -O1.
#[test]
fn softmax_behind_dropout_is_not_applied_twice() {
    let d = tmp();
    let m = write(d.path(), "p.model", b"model P {\n    forward(x: [3]) {\n        return F.dropout(F.softmax(x))\n    }\n}\n");
    let x = npy(d.path(), "x.npy", &[1, 3], &[1.0, 2.0, 3.0]);
    for level in ["-O0", "-O1"] {
        let o = cnnc(&["run", &m, "--input", &x, "--json", "--top", "1", level]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        let doc: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        let p = doc["results"][0]["top"][0]["probability"].as_f64().unwrap();
        assert!((p - 0.665241).abs() < 1e-5, "{level}: {p}");
    }
}

/// An unreadable file's message names it once, with the operating system's reason once.
#[test]
fn read_errors_say_it_once() {
    let o = fails(&["run", "--input", "models", "--weights", "models"], 1, &["cannot read input `models`"]);
    assert_eq!(o.stderr.matches("Is a directory").count(), 1, "{}", o.stderr);
}

/// The JIT is the default backend: it agrees with the reference interpreter and with Chainer, and gives
/// the same bytes for 1 and 2 threads and for every GEMM tier (with one Winograd algorithm: `auto`
/// may price them differently per tier).
#[test]
fn jit_backend_threads_and_tiers_agree() {
    let dir = tmp();
    let w = fixture("alexbn_small/weights.npz");
    let out = |name: &str, extra: &[&str]| {
        let p = dir.path().join(name);
        let o = run_small(&w, &p, extra);
        assert_eq!(o.code, 0, "{extra:?}: {}", o.stderr);
        read_npy(p.to_str().unwrap()).1
    };
    let one = out("one.npy", &["--threads", "1"]);
    let two = out("two.npy", &["--threads", "2"]);
    let fixed = out("fixed.npy", &["--winograd", "m2"]);
    let portable = out("portable.npy", &["--tier", "portable", "--threads", "3", "--winograd", "m2"]);
    let reference = out("ref.npy", &["--backend", "reference"]);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&one), bits(&two));
    assert_eq!(bits(&fixed), bits(&portable));
    assert!(rel_diff(&one, &reference) <= 1e-5, "JIT vs reference: {}", rel_diff(&one, &reference));
    let chainer = read_npy(&fixture("alexbn_small/out.npy")).1;
    assert!(rel_diff(&one, &chainer) <= 1e-4, "JIT vs Chainer: {}", rel_diff(&one, &chainer));
}

#[test]
fn bench_prints_one_json_object() {
    let model = fixture(SMALL);
    let o = cnnc(&["bench", &model, "--weights", &fixture("alexbn_small/weights.npz"), "--batch", "2", "--runs", "2", "--threads", "2", "--profile", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).expect("one JSON object on stdout");
    assert_eq!((v["batch"].as_u64(), v["threads"].as_u64(), v["runs"].as_u64()), (Some(2), Some(2), Some(2)));
    for key in ["compile_ms", "load_ms", "median_ms", "min_ms", "gflops"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {}", v[key]);
    }
    assert!(v["kernels"].as_array().is_some_and(|k| k.len() >= 8), "per-kernel times: {}", v["kernels"]);
    // Linear layers read their weights: a positive parameter rate; copies read none.
    let rates = |name: &str| -> Vec<f64> {
        let kernels = v["kernels"].as_array().expect("kernels");
        kernels.iter().filter(|k| k["kernel"].as_str().is_some_and(|n| n.contains(name))).filter_map(|k| k["param_gbs"].as_f64()).collect()
    };
    assert!(rates("fc6").iter().any(|&x| x > 0.0), "{}", v["kernels"]);
    assert!(rates("phase_split").iter().all(|&x| x == 0.0) && !rates("phase_split").is_empty(), "{}", v["kernels"]);
    let text = cnnc(&["bench", &model, "--runs", "1", "--backend", "reference"]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(text.stdout.contains("latency"), "{}", text.stdout);
}

#[test]
fn compile_emits_kernels_clif_asm_and_the_memory_plan() {
    let model = root().join("models/alexbn.model").display().to_string();
    let table = cnnc(&["compile", &model]);
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(table.stdout.contains("activation arena (batch 1, planned)"), "{}", table.stdout);
    let kernels = cnnc(&["compile", &model, "--emit", "kernels", "--batch", "2"]);
    assert_eq!(kernels.code, 0, "{}", kernels.stderr);
    assert!(
        kernels.stdout.contains("; batch 2, arena") && kernels.stdout.contains("kernel n1.conv1+bn1+F.relu+F.max_pooling_2d.gemm"),
        "{}",
        &kernels.stdout[..2000]
    );
    let clif = cnnc(&["compile", &model, "--emit", "clif", "--tier", "portable"]);
    assert_eq!(clif.code, 0, "{}", clif.stderr);
    assert!(clif.stdout.contains("fma.f32x4") || clif.stdout.contains("= fma "), "no FMA in the CLIF");
    let asm = cnnc(&["compile", &model, "--emit", "asm", "--tier", "portable"]);
    assert_eq!(asm.code, 0, "{}", asm.stderr);
    assert!(asm.stdout.contains("vfmadd"), "no vfmadd in the machine code");
}

/// `--weights-dtype bf16`: `cnnc bench` reports the output's change against f32 weights; the reference
/// interpreter refuses it rather than silently computing in f32.
#[test]
fn bf16_weights_report_their_accuracy_and_need_a_compiled_backend() {
    let model = fixture(SMALL);
    let weights = fixture("alexbn_small/weights.npz");
    for batch in ["1", "2"] {
        let o = cnnc(&["bench", &model, "--weights", &weights, "--batch", batch, "--runs", "1", "--weights-dtype", "bf16", "--json"]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).expect("one JSON object on stdout");
        assert_eq!(v["weights_dtype"], "bf16");
        let change = v["relative_change_vs_f32"].as_f64().expect("reported");
        assert!(change > 0.0 && change < 2e-2, "batch {batch}: {change}");
    }
    let f32_run = cnnc(&["bench", &model, "--runs", "1", "--json"]);
    assert!(f32_run.stdout.contains("\"relative_change_vs_f32\":null"), "{}", f32_run.stdout);
    fails(&["run", &model, "--input", "x.npy", "--backend", "reference", "--weights-dtype", "bf16"], 1, &["--weights-dtype", "reference"]);
    fails(&["bench", &model, "--backend", "reference", "--weights-dtype", "bf16"], 1, &["--weights-dtype"]);
    fails(&["run", "--input", "x.npy", "--weights-dtype", "f8"], 2, &["--weights-dtype"]);
}

/// `--winograd`: every choice stays within 1e-4 of Chainer's logits on the reduced AlexBN (its conv2 is
/// 5×5, conv3–5 3×3); forcing it needs a compiled backend; a bad value is a usage error.
#[test]
fn winograd_choices_agree_with_chainer() {
    let (d, weights) = (tmp(), fixture("alexbn_small/weights.npz"));
    let (_, want) = read_npy(&fixture("alexbn_small/out.npy"));
    for w in ["auto", "m2", "m3", "m4", "never"] {
        let out = d.path().join(format!("{w}.npy"));
        let o = run_small(&weights, &out, &["--winograd", w]);
        assert_eq!(o.code, 0, "{w}: {}", o.stderr);
        let (_, got) = read_npy(out.to_str().unwrap());
        assert!(rel_diff(&got, &want) < 1e-4, "--winograd {w}: {}", rel_diff(&got, &want));
    }
    fails(&["run", &fixture(SMALL), "--input", "x.npy", "--backend", "reference", "--winograd", "m3"], 1, &["--winograd m3", "reference"]);
    fails(&["run", "--input", "x.npy", "--winograd", "f63"], 2, &["--winograd"]);
}

#[test]
fn bad_thread_counts_are_usage_errors() {
    fails(&["run", "--input", "x.npy", "--threads", "0"], 2, &["--threads"]);
    fails(&["bench", "--threads", "many"], 2, &["--threads"]);
}

/// `--target cuda --emit ptx` writes one `.entry` per kernel; the CUDA backend without a GPU is a clear
/// error, not a panic (on a machine with one, it runs).
#[test]
fn ptx_emission_and_the_cuda_backend_without_a_gpu() {
    let dir = tmp();
    let out = dir.path().join("alexbn.ptx");
    let model = root().join("models/alexbn.model").display().to_string();
    let o = cnnc(&["compile", &model, "--target", "cuda", "--emit", "ptx", "--sm", "90", "-o", out.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let ptx = std::fs::read_to_string(&out).unwrap();
    assert!(ptx.contains(".target sm_90") && ptx.matches(".entry").count() >= 8, "{}", &ptx[..400.min(ptx.len())]);
    fails(&["compile", &model, "--emit", "ptx"], 2, &["--target cuda"]);
    fails(&["compile", &model, "--target", "cuda", "--emit", "ptx", "--sm", "75"], 2, &["--sm"]);
    let input = fixture("alexbn_small/in.npy");
    let run = cnnc(&["run", &fixture(SMALL), "--weights", &fixture("alexbn_small/weights.npz"), "--input", &input, "--backend", "cuda"]);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    if cnnc::ptx::cuda::available().is_err() {
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(run.stderr.contains("CUDA"), "{}", run.stderr);
        fails(&["bench", "--backend", "cuda"], 1, &["CUDA"]);
    } else {
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
}

// ---- ONNX ----

/// `cnnc run` on an ONNX file (inline and external weights) against ONNX Runtime's output
/// (tests/fixtures/onnx/gen_onnx.py), and `cnnc import` → `cnnc run MODEL --weights` giving the same bytes.
#[test]
fn onnx_runs_like_onnxruntime_and_imports_to_the_same_numbers() {
    let d = tmp();
    let x = fixture("onnx/x.npy");
    let (_, want) = read_npy(&fixture("onnx/tiny_cnn.ort.npy"));
    let run = |model: &str, extra: &[&str], out: &str| {
        let o = cnnc(&[&["run", model, "--input", &x, "--output", out], extra].concat());
        assert_eq!(o.code, 0, "{}", o.stderr);
        read_npy(out).1
    };
    let out = |n: &str| d.path().join(n).display().to_string();
    let direct = run(&fixture("onnx/tiny_cnn.onnx"), &[], &out("a.npy"));
    assert!(rel_diff(&direct, &want) <= 1e-5, "{}", rel_diff(&direct, &want));
    let reference = run(&fixture("onnx/tiny_cnn.onnx"), &["--backend", "reference", "-O", "0"], &out("r.npy"));
    assert!(rel_diff(&reference, &want) <= 1e-5, "{}", rel_diff(&reference, &want));
    assert_eq!(run(&fixture("onnx/tiny_cnn_external.onnx"), &[], &out("b.npy")), direct, "external data");
    for weights in ["w.npz", "w.safetensors"] {
        let o = cnnc(&["import", &fixture("onnx/tiny_cnn.onnx"), "-o", &out("m.model"), "--weights-out", &out(weights)]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert_eq!(run(&out("m.model"), &["--weights", &out(weights)], &out("c.npy")), direct, "{weights}");
    }
    let text = std::fs::read_to_string(out("m.model")).unwrap();
    assert!(text.contains("F.max_pooling_2d(h3, 3, stride=2)") && text.contains("pad_value=None"), "{text}");
}

/// Small graphs of tests/fixtures/onnx/gen_onnx.py against ONNX Runtime on the JIT and the reference:
/// asymmetric pads (conv, max pool and both kinds of average), written as a symmetric pad and a crop;
/// HardSigmoid and HardSwish, written as an affine batch normalization, a clip and a product; `Pad`
/// nodes folded into a conv and an average.
#[test]
fn onnx_small_graphs_match_onnxruntime() {
    let d = tmp();
    for name in ["asym_pads", "hard_acts", "pad_fold"] {
        let (_, want) = read_npy(&fixture(&format!("onnx/{name}.ort.npy")));
        for extra in [&[][..], &["--backend", "reference", "-O", "0"]] {
            let out = d.path().join("y.npy").display().to_string();
            let o = cnnc(&[&["run", &fixture(&format!("onnx/{name}.onnx")), "--input", &fixture("onnx/x.npy"), "--output", &out], extra].concat());
            assert_eq!(o.code, 0, "{name}: {}", o.stderr);
            let got = read_npy(&out).1;
            assert!(rel_diff(&got, &want) <= 1e-5, "{name} {extra:?}: {}", rel_diff(&got, &want));
        }
    }
}

#[test]
fn bad_onnx_files_are_named_errors() {
    let d = tmp();
    let garbage = write(d.path(), "garbage.onnx", b"\x08\x07this is not protobuf\xff\xff");
    fails(&["compile", &garbage], 1, &["garbage.onnx", "is not an ONNX model"]);
    let bytes = std::fs::read(fixture("onnx/tiny_cnn.onnx")).unwrap();
    let cut = write(d.path(), "cut.onnx", &bytes[..bytes.len() / 2]);
    fails(&["compile", &cut], 1, &["cut.onnx"]);
    // External data that leaves the model's folder, or is shorter than declared.
    let ext = std::fs::read(fixture("onnx/tiny_cnn_external.onnx")).unwrap();
    let escaped = write(d.path(), "escape.onnx", &replace(&ext, b"tiny_cnn_external.data", b"../../etc/passwd.data0"));
    fails(&["compile", &escaped], 1, &["escape.onnx", "leaves the model's folder"]);
    let moved = write(d.path(), "moved.onnx", &ext);
    fails(&["compile", &moved], 1, &["moved.onnx", "tiny_cnn_external.data"]);
    write(d.path(), "tiny_cnn_external.data", &[0u8; 16]);
    fails(&["compile", &moved], 1, &["moved.onnx", "runs past its end"]);
    let none = d.path().join("none.onnx").display().to_string();
    fails(&["import", &none], 1, &["none.onnx"]);
    assert!(!d.path().join("m.model").exists());
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len(), "same length keeps the protobuf valid");
    let at = hay.windows(from.len()).position(|w| w == from).expect("present");
    [&hay[..at], to, &hay[at + from.len()..]].concat()
}

/// `--emit dot` is Graphviz text that `dot` (Debian's graphviz) renders; at -O1 AlexBN's fused layers are
/// single nodes that list the rules and parameters they folded in. Under CI a missing `dot` fails.
#[test]
fn emit_dot_renders_with_graphviz() {
    let d = tmp();
    for (level, fused) in [("0", false), ("1", true)] {
        let path = d.path().join(format!("g{level}.dot")).display().to_string();
        let o = cnnc(&["compile", "models/alexbn.model", "--emit", "dot", "-O", level, "-o", &path]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("digraph \"AlexBN\" {") && text.contains(" -> "), "{text}");
        assert_eq!(text.contains("conv2d+relu+max_pool2d") && text.contains("fold_w(conv1/W, bn1)"), fused, "{text}");
        match Command::new("dot").arg("-Tsvg").arg(&path).output() {
            Ok(svg) => assert!(svg.status.success() && String::from_utf8_lossy(&svg.stdout).contains("<svg"), "{}", String::from_utf8_lossy(&svg.stderr)),
            Err(e) => assert!(std::env::var_os("CI").is_none(), "graphviz's `dot` is needed under CI: {e}"),
        }
    }
}

/// Inconsistent or hostile ONNX graphs (built here with the prost types): each a clear error, exit 1.
#[test]
fn inconsistent_onnx_graphs_are_errors_not_panics() {
    use cnnc_onnx_proto as pb;
    use prost::Message;
    let d = tmp();
    let value = |name: &str, dims: &[i64]| pb::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&v| pb::tensor_shape_proto::Dimension {
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let node = |op: &str, name: &str, ins: &[&str], outs: &[&str]| pb::NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: outs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let int_attr = |name: &str, ints: Vec<i64>| pb::AttributeProto { name: Some(name.into()), ints, r#type: Some(7), ..Default::default() };
    let shape_const = |name: &str, dims: Vec<i64>| pb::TensorProto {
        name: Some(name.into()),
        dims: vec![dims.len() as i64],
        data_type: Some(7),
        int64_data: dims,
        ..Default::default()
    };
    let model = |nodes: Vec<pb::NodeProto>, inits: Vec<pb::TensorProto>, out: &str| {
        let graph =
            pb::GraphProto { node: nodes, initializer: inits, input: vec![value("x", &[1, 3, 4, 4])], output: vec![value(out, &[])], ..Default::default() };
        pb::ModelProto { graph: Some(graph), opset_import: vec![pb::OperatorSetIdProto { version: Some(13), ..Default::default() }], ..Default::default() }
            .encode_to_vec()
    };
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("dangling", model(vec![node("Relu", "r", &["nothing"], &["y"])], vec![], "y"), vec!["reads `nothing`"]),
        ("cycle", model(vec![node("Relu", "a", &["b_out"], &["a_out"]), node("Relu", "b", &["a_out"], &["b_out"])], vec![], "b_out"), vec!["cycle"]),
        (
            "unsupported",
            model(vec![node("Tanh", "t", &["x"], &["t_out"]), node("Elu", "e", &["t_out"], &["y"])], vec![], "y"),
            vec!["2 operators", "node `t`: Tanh", "node `e`: Elu", "opset 13"],
        ),
        ("sum_of_constants", model(vec![node("Sum", "s", &["c"], &["y"])], vec![shape_const("c", vec![2, 2])], "y"), vec!["node `s` (Sum)"]),
        (
            "huge_constant",
            model(vec![node("ConstantOfShape", "big", &["c"], &["y"])], vec![shape_const("c", vec![1 << 20, 1 << 20])], "y"),
            vec!["too many elements"],
        ),
        ("output_is_a_constant", model(vec![node("Shape", "sh", &["x"], &["y"])], vec![], "y"), vec!["constant, not computed"]),
        ("overwritten_input", model(vec![node("Relu", "r", &["x"], &["x"]), node("Unsqueeze", "u", &["x"], &["y"])], vec![], "y"), vec!["`x`"]),
        (
            "unsqueeze_on_batch",
            model(
                vec![{
                    let mut n = node("Unsqueeze", "u", &["x", "axes"], &["y"]);
                    n.attribute.push(int_attr("unused", vec![]));
                    n
                }],
                vec![shape_const("axes", vec![0])],
                "y",
            ),
            vec!["moves the batch off axis 0"],
        ),
        // Zeros before a ReLU, a max pool or at the output are data, not a layer's pads.
        (
            "pad_before_relu",
            model(
                vec![node("Pad", "p", &["x", "pads"], &["xp"]), node("Relu", "r", &["xp"], &["y"])],
                vec![shape_const("pads", vec![0, 0, 1, 1, 0, 0, 1, 1])],
                "y",
            ),
            vec!["node `r` (Relu)", "comes from a `Pad`"],
        ),
        ("pad_as_output", model(vec![node("Pad", "p", &["x", "pads"], &["y"])], vec![shape_const("pads", vec![0, 0, 1, 1, 0, 0, 1, 1])], "y"), vec!["`Pad`"]),
        (
            "pad_of_channels",
            model(vec![node("Pad", "p", &["x", "pads"], &["y"])], vec![shape_const("pads", vec![0, 1, 0, 0, 0, 0, 0, 0])], "y"),
            vec!["node `p` (Pad)", "channel axis"],
        ),
    ];
    for (name, bytes, culprits) in cases {
        let path = write(d.path(), &format!("{name}.onnx"), &bytes);
        fails(&["compile", &path], 1, &[&[format!("{name}.onnx").as_str()][..], &culprits[..]].concat());
    }
}

/// A reader that closes the pipe early (`cnnc compile ... | head`) ends cnnc quietly: by SIGPIPE, as
/// any Unix filter, never a panic.
#[test]
fn a_closed_pipe_is_not_a_panic() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cnnc"))
        .args(["compile", "models/resnet50.model", "--emit", "kernels"])
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cnnc runs");
    let mut first = [0u8; 64];
    child.stdout.take().expect("piped").read_exact(&mut first).expect("some output");
    let out = child.wait_with_output().expect("cnnc ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{stderr}");
}

/// Valid files others write: a model saved with a UTF-8 byte-order mark, and Fortran-order arrays (what
/// `np.save` writes for a transposed array) as input and as weights, which give the C-order numbers.
#[test]
fn byte_order_marks_and_fortran_order_arrays_are_read() {
    use npyz::WriterBuilder;
    let d = tmp();
    let model = write(
        d.path(),
        "bom.model",
        "\u{feff}model T {\n    c = L.Convolution2D(2, 3, (1, 2))\n    forward(x: [2, 3, 4]) {\n        return self.c(x)\n    }\n}\n".as_bytes(),
    );
    let (xs, ws) = ([1u64, 2, 3, 4], [3u64, 2, 1, 2]);
    let x: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 2.0).collect();
    let w: Vec<f32> = (0..12).map(|i| (i as f32 * 0.7).sin()).collect();
    // The same arrays in Fortran order: element (i, j, k, l) at i + I·(j + J·(k + K·l)).
    let fortran = |shape: &[u64], c: &[f32]| -> Vec<f32> {
        let s: Vec<usize> = shape.iter().map(|&v| v as usize).collect();
        let mut f = vec![0.0; c.len()];
        for (at, v) in c.iter().enumerate() {
            let (mut rest, mut idx) = (at, [0usize; 4]);
            for k in (0..4).rev() {
                idx[k] = rest % s[k];
                rest /= s[k];
            }
            f[idx[0] + s[0] * (idx[1] + s[1] * (idx[2] + s[2] * idx[3]))] = *v;
        }
        f
    };
    let weights =
        |name: &str, order: npyz::Order, data: Vec<f32>| npz(&d.path().join(name), &[("c/W", &ws, &data, order), ("c/b", &[3], &[0.5, -1.0, 2.0], order)]);
    let input = |name: &str, order: npyz::Order, data: Vec<f32>| {
        let p = d.path().join(name);
        let mut a = npyz::WriteOptions::new().default_dtype().shape(&xs).order(order).writer(std::fs::File::create(&p).unwrap()).begin_nd().unwrap();
        a.extend(data).unwrap();
        a.finish().unwrap();
        p.display().to_string()
    };
    let run = |w: &str, x: &str, out: &str| {
        let out = d.path().join(out).display().to_string();
        let o = cnnc(&["run", &model, "--weights", w, "--input", x, "--output", &out]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        read_npy(&out).1
    };
    let c_order = run(&weights("c.npz", npyz::Order::C, w.clone()), &input("c.npy", npyz::Order::C, x.clone()), "c_out.npy");
    let f_order = run(&weights("f.npz", npyz::Order::Fortran, fortran(&ws, &w)), &input("f.npy", npyz::Order::Fortran, fortran(&xs, &x)), "f_out.npy");
    assert_eq!(c_order, f_order);
}

/// A model written after `--input` (which takes every file after it) is named as misplaced, not as an
/// unreadable image.
#[test]
fn a_model_after_input_is_a_usage_error() {
    fails(
        &["run", "--input", "models/examples/cat.jpg", "models/resnet50.model"],
        2,
        &["`models/resnet50.model` looks like a model", "cnnc run MODEL --input"],
    );
}

/// Output files: a device is written, not replaced (`--output /dev/null`); a symlink stays a link to the
/// new file; a read-only file is refused and kept; a new file has the umask's permissions.
#[test]
fn outputs_respect_devices_links_read_only_files_and_the_umask() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let d = tmp();
    let x = fixture("alexbn_small/in.npy");
    let model = fixture(SMALL);
    let run = |out: &str| cnnc(&["run", &model, "--input", &x, "--output", out]);
    assert_eq!(run("/dev/null").code, 0);
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    let real = d.path().join("real.npy");
    std::fs::write(&real, b"old").unwrap();
    let link = d.path().join("link.npy");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    assert_eq!(run(link.to_str().unwrap()).code, 0);
    assert!(link.is_symlink(), "the link is kept");
    assert_eq!(read_npy(real.to_str().unwrap()).0[0], 2, "its target holds the output");
    let ro = d.path().join("ro.npy");
    std::fs::write(&ro, b"keep").unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    fails(&["run", &model, "--input", &x, "--output", ro.to_str().unwrap()], 1, &["is read-only"]);
    assert_eq!(std::fs::read(&ro).unwrap(), b"keep");
    let new = d.path().join("new.npy");
    let o = Command::new("sh")
        .args(["-c", &format!("umask 027 && exec \"$0\" run {model} --input {x} --output {}", new.display()), env!("CARGO_BIN_EXE_cnnc")])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::metadata(&new).unwrap().permissions().mode() & 0o777, 0o640);
}

/// Preprocessing that overflows the float range is blamed on the flags, not on the image.
#[test]
fn an_overflowing_scale_is_named() {
    fails(&["run", "--input", "models/examples/cat.jpg", "--scale", "1e38"], 1, &["cat.jpg", "--scale 1e38", "past the float range"]);
}

/// A JPEG cut short is an error, not an image whose missing rows are grey.
#[test]
fn a_truncated_jpeg_is_an_error() {
    let d = tmp();
    let whole = std::fs::read(root().join("models/examples/cat.jpg")).unwrap();
    let half = write(d.path(), "half.jpg", &whole[..whole.len() / 2]);
    fails(&["run", "--input", &half], 1, &["half.jpg", "truncated JPEG"]);
    let short = write(d.path(), "short.jpg", &whole[..whole.len() - 2]);
    fails(&["run", "--input", &short], 1, &["short.jpg", "truncated JPEG"]);
}

/// The README's main command: the trained digits model reads the example 7 as a 7, confidently.
#[test]
fn the_readme_main_command_reads_a_seven() {
    let o = cnnc(&["run", "models/digits.model", "--weights", "models/digits.npz", "--input", "models/examples/digit-7.png"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let first = o.stdout.lines().nth(1).expect("a ranked line");
    assert!(first.trim_start().starts_with("1.    7  -"), "{}", o.stdout);
    let percent: f64 = first.split_whitespace().find(|w| w.ends_with('%')).unwrap().trim_end_matches('%').parse().unwrap();
    assert!(percent > 99.0, "{}", o.stdout);
}

/// Every example digit, in one batch of ten greyscale PNGs through a one-channel model.
#[test]
fn every_example_digit_is_read() {
    let inputs: Vec<String> = (0..10).map(|d| format!("models/examples/digit-{d}.png")).collect();
    let mut args = vec!["run", "models/digits.model", "--weights", "models/digits.npz", "--top", "1", "--input"];
    args.extend(inputs.iter().map(String::as_str));
    let o = cnnc(&args);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    for (d, pair) in lines.chunks(2).enumerate() {
        assert_eq!(pair[0], inputs[d]);
        assert!(pair[1].trim_start().starts_with(&format!("1.    {d}  -")), "{}", o.stdout);
    }
}

/// An image of exactly the model's input size is used as it is, unless `--resize` asks otherwise.
#[test]
fn an_image_of_the_input_size_is_not_resized_unless_asked() {
    let dir = tmp();
    let logits = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name).display().to_string();
        let mut args = vec!["run", "models/digits.model", "--weights", "models/digits.npz", "--input", "models/examples/digit-3.png", "-o", &out];
        args.extend(extra);
        assert_eq!(cnnc(&args).code, 0);
        read_npy(&out).1
    };
    let plain = logits("plain.npy", &[]);
    assert_eq!(plain, logits("same.npy", &["--resize", "8"]));
    assert_ne!(plain, logits("zoomed.npy", &["--resize", "12"]));
}

// ---- hostile input (issue 20): each failure found by trying, pinned ----

/// A megabyte of NUL bytes is one error, not a million (which took over a minute to report).
#[test]
fn a_file_of_nul_bytes_is_one_error() {
    let d = tmp();
    let model = write(d.path(), "nul.model", &vec![0u8; 1 << 20]);
    let o = fails(&["compile", &model], 1, &["unexpected characters `\\0` and 1048575 more", "(1 error)"]);
    assert_eq!(o.stderr.matches("error:").count(), 2, "{}", o.stderr);
}

/// A model with thousands of errors reports the first hundred and counts the rest.
#[test]
fn thousands_of_errors_are_capped() {
    let d = tmp();
    let body: String = (0..5000).map(|i| format!("    h{i} = F.relu(missing{i})\n")).collect();
    let model = write(d.path(), "many.model", format!("model M {{\n  forward(x: [3, 8, 8]) {{\n{body}    return x\n  }}\n}}\n").as_bytes());
    let o = fails(&["compile", &model], 1, &["more diagnostics not shown: cnnc reports the first 100"]);
    assert!(o.stderr.matches("error: unknown name").count() <= 100, "{}", o.stderr);
}

/// Python pasted from a Chainer model gets how the model language writes it.
#[test]
fn chainer_habits_are_answered_in_the_model_language() {
    let d = tmp();
    let class = write(d.path(), "class.model", b"import chainer\nclass M(chainer.Chain):\n    def forward(self, x):\n        return x\n");
    fails(&["compile", &class], 1, &["an import is Python", "a class is Python", "`model Name { ", "docs/dsl.md"]);
    let def = write(d.path(), "def.model", b"model M {\n  self.conv1 = L.Convolution2D(3, 8, 3)\n  def forward(self, x):\n    return x\n}\n");
    fails(&["compile", &def], 1, &["`self.NAME = …` is Python", "without `self.`", "`def` is Python", "forward(x: [C, H, W])"]);
    let comma = write(d.path(), "comma.model", b"model M {\n  conv1 = L.Convolution2D(3, 8 3)\n  forward(x: [3, 8, 8]) { return self.conv1(x) }\n}\n");
    fails(&["compile", &comma], 1, &["expected `)`, found `3`", "missing comma?"]);
}

/// An input `.npy` whose header declares a huge shape fails on the bytes present, before allocating.
#[test]
fn a_huge_declared_shape_is_refused_before_allocating() {
    let d = tmp();
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (17179869183,), }";
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    let padded = format!("{header:<118}\n");
    bytes.extend((padded.len() as u16).to_le_bytes());
    bytes.extend(padded.as_bytes());
    bytes.extend([0u8; 64]);
    let input = write(d.path(), "huge.npy", &bytes);
    let o = fails(&["run", &fixture(SMALL), "--input", &input], 1, &["huge.npy"]);
    assert!(o.stderr.contains("limit") || o.stderr.contains("truncated"), "{}", o.stderr);
}

/// An image far too large to decode is named with its size, not "Memory limit exceeded".
#[test]
fn a_gigapixel_image_is_refused_by_its_header() {
    let d = tmp();
    // A PNG for 40000 × 40000 greyscale whose pixel data is a few bytes of an empty zlib stream.
    let chunk = |kind: &[u8], data: &[u8]| -> Vec<u8> {
        let body = [kind, data].concat();
        [&(data.len() as u32).to_be_bytes()[..], &body, &crc32(&body).to_be_bytes()].concat()
    };
    let ihdr = [&40000u32.to_be_bytes()[..], &40000u32.to_be_bytes(), &[8, 0, 0, 0, 0]].concat();
    let png =
        [&b"\x89PNG\r\n\x1a\n"[..], &chunk(b"IHDR", &ihdr), &chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]), &chunk(b"IEND", &[])].concat();
    let input = write(d.path(), "giant.png", &png);
    fails(&["run", "--input", &input], 1, &["giant.png", "40000x40000", "at most 64 Mpixel"]);
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// NaN, infinite and impossible (negative variance) parameters are errors naming the key.
#[test]
fn impossible_weights_are_named() {
    let d = tmp();
    let model = write(d.path(), "m.model", b"model M {\n  conv1 = L.Convolution2D(1, 2, 1, nobias=True)\n  bn1 = L.BatchNormalization(2)\n  forward(x: [1, 2, 2]) { return self.bn1(self.conv1(x)) }\n}\n");
    let input = npy(d.path(), "x.npy", &[1, 1, 2, 2], &[1.0; 4]);
    let weights = |name: &str, w: [f32; 2], var: [f32; 2]| {
        let ones = [1.0f32; 2];
        let zeros = [0.0f32; 2];
        let arrays: [(&str, &[u64], &[f32], npyz::Order); 5] = [
            ("conv1/W", &[2, 1, 1, 1], &w, npyz::Order::C),
            ("bn1/gamma", &[2], &ones, npyz::Order::C),
            ("bn1/beta", &[2], &zeros, npyz::Order::C),
            ("bn1/avg_mean", &[2], &zeros, npyz::Order::C),
            ("bn1/avg_var", &[2], &var, npyz::Order::C),
        ];
        npz(&d.path().join(name), &arrays)
    };
    let ok = weights("ok.npz", [1.0, 2.0], [1.0, 1.0]);
    assert_eq!(cnnc(&["run", &model, "--weights", &ok, "--input", &input]).code, 0);
    let nan = weights("nan.npz", [f32::NAN, 2.0], [1.0, 1.0]);
    fails(&["run", &model, "--weights", &nan, "--input", &input], 1, &["parameter `conv1/W`", "1 non-finite value (NaN at index 0)"]);
    let inf = weights("inf.npz", [1.0, f32::INFINITY], [1.0, 1.0]);
    fails(&["run", &model, "--weights", &inf, "--input", &input], 1, &["parameter `conv1/W`", "(inf at index 1)"]);
    let var = weights("var.npz", [1.0, 2.0], [1.0, -0.5]);
    fails(&["run", &model, "--weights", &var, "--input", &input], 1, &["parameter `bn1/avg_var`", "negative value (-0.5 at index 1)"]);
}

/// A batch whose arena cannot fit in memory is refused before anything is allocated.
#[test]
fn a_batch_too_large_for_memory_is_refused() {
    let d = tmp();
    let model = write(
        d.path(),
        "wide.model",
        b"model W {\n  conv = L.Convolution2D(3, 512, 3, pad=1)\n  forward(x: [3, 512, 512]) { return F.relu(self.conv(x)) }\n}\n",
    );
    fails(&["bench", &model, "--batch", "4096", "--runs", "1"], 1, &["at batch 4096 the model needs", "GiB", "lower the batch size"]);
}

/// 1,400 parallel convolutions into one concat: the optimizer stops at its e-graph limit inside an
/// iteration too (it grew to 7.6 GB over 70 s), and the model compiles, with a warning that it stopped.
#[test]
fn a_very_wide_model_compiles_within_the_optimizers_limits() {
    let d = tmp();
    let links: String = (0..1400).map(|i| format!("  c{i} = L.Convolution2D(8, 8, 1)\n")).collect();
    let args: Vec<String> = (0..1400).map(|i| format!("self.c{i}(x)")).collect();
    let model = write(
        d.path(),
        "wide.model",
        format!("model P {{\n{links}  forward(x: [8, 4, 4]) {{ return F.concat(({}), axis=1) }}\n}}\n", args.join(", ")).as_bytes(),
    );
    let o = cnnc(&["compile", &model, "--explain", "-o", d.path().join("table.txt").to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("e-graph:"), "{}", o.stderr);
    // Its node limit, or its 2 s on a loaded machine.
    assert!(o.stderr.contains("warning: the optimizer stopped at its limit of "), "{}", o.stderr);
}
