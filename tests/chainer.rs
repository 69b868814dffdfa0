//! Numbers against Chainer 7.8.1: per-op fixtures, a reduced-width AlexBN with a genuine `save_npz` file,
//! and the full-size AlexBN with PRNG weights that both sides generate. Fixtures come from
//! `tests/fixtures/gen_fixtures.py`.

use cnnc_tests::*;

#[test]
fn every_op_fixture_matches_chainer() {
    let dir = fixtures().join("ops");
    let cases = std::fs::read_to_string(dir.join("cases.txt")).expect("cases.txt");
    let mut n = 0;
    for case in cases.lines().filter(|l| !l.trim().is_empty()) {
        let x = load_npy(&dir.join(format!("{case}.in.npy")));
        let want = load_npy(&dir.join(format!("{case}.out.npy")));
        let npz = dir.join(format!("{case}.npz"));
        let params = if npz.exists() { Params::File(&npz) } else { Params::Init };
        let got = run_model(&dir.join(format!("{case}.model")), params, x);
        assert_close(&got, &want, 1e-5, case);
        n += 1;
    }
    assert!(n >= 26, "only {n} op cases ran");
}

#[test]
fn dropout_is_identity_at_inference() {
    let dir = fixtures().join("ops");
    let x = load_npy(&dir.join("dropout.in.npy"));
    assert_eq!(run_model(&dir.join("dropout.model"), Params::Init, x.clone()), x);
}

#[test]
fn reduced_alexbn_matches_chainer() {
    let dir = fixtures().join("alexbn_small");
    let got = run_model(&dir.join("model.model"), Params::File(&dir.join("weights.npz")), load_npy(&dir.join("in.npy")));
    assert_close(&got, &load_npy(&dir.join("out.npy")), 1e-5, "alexbn_small");
}

/// The two fixture scripts (`gen_fixtures.py` and `gen_models.py`) drew the same AlexBN weights and got
/// the same Chainer logits: their PRNG and parameter assignment agree.
#[test]
fn fixture_generators_agree() {
    assert_eq!(load_npy(&fixtures().join("alexbn_full/logits.npy")), load_npy(&fixtures().join("models/alexbn/logits.npy")));
}

#[test]
fn prng_matches_numpy_bit_for_bit() {
    let probe: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("alexbn_full/prng_probe.json")).unwrap()).unwrap();
    let shapes = [("conv1/W", vec![96, 3, 11, 11]), ("fc8/b", vec![1000]), ("bn1/avg_var", vec![96]), ("input", vec![2, 3, 227, 227])];
    for (key, shape) in shapes {
        let want: Vec<f32> = probe[key].as_array().unwrap_or_else(|| panic!("probe has {key}")).iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let got = prng_param(key, &shape);
        assert_eq!(&got.data()[..want.len()], &want[..], "{key}");
    }
}

/// A full-size model of the Chainer imagenet family against Chainer 7.8.1 (fixtures from
/// `tests/fixtures/gen_models.py`): the same parameter keys and shapes as `save_npz` writes, the same MACs
/// per layer, and logits within 1e-4 × max |logit| for a batch of 2 with PRNG weights and input.
fn check_model(name: &str) {
    let dir = fixtures().join("models").join(name);
    let model = root().join("models").join(format!("{name}.model"));
    let src = source(&model);
    let (g, warnings) = cnnc::compile(&src).unwrap_or_else(|f| panic!("{}", src.render_plain(&f.0)));
    assert!(warnings.is_empty(), "{}", src.render_plain(&warnings));

    let mut ours: Vec<String> =
        g.params().iter().map(|p| format!("{} {}", p.key, p.shape.iter().map(ToString::to_string).collect::<Vec<_>>().join(","))).collect();
    ours.sort();
    let theirs: Vec<String> = std::fs::read_to_string(dir.join("params.txt")).unwrap().lines().map(str::to_string).collect();
    assert_eq!(ours, theirs, "{name}: parameter keys and shapes");

    let macs = std::fs::read_to_string(dir.join("macs.txt")).unwrap();
    let mut per_layer: Vec<(String, u64)> = macs.lines().map(|l| l.rsplit_once(' ').unwrap()).map(|(k, v)| (k.to_string(), v.parse().unwrap())).collect();
    let (_, total) = per_layer.pop().unwrap();
    assert_eq!(g.macs(), total, "{name}: MACs per image");
    let layers: Vec<(String, u64)> = g.nodes().map(|(id, n)| (n.layer.clone(), g.node_macs(id))).filter(|(_, m)| *m > 0).collect();
    assert_eq!(layers, per_layer, "{name}: MACs per layer, in execution order");

    let s = g.node(g.inputs[0]).shape.clone();
    let x = prng_param("input", &[2, s[0], s[1], s[2]]);
    let got = run_graph(&src, &g, Params::Generated(prng_param), x.clone());
    let want = load_npy(&dir.join("logits.npy"));
    assert_close(&got, &want, 1e-4, name);
    // The optimized model (BatchNormalization folded, epilogues fused) agrees with both.
    let fast = run_graph(&src, &optimized(&g, 1), Params::Generated(prng_param), x.clone());
    assert_close(&fast, &want, 1e-4, &format!("{name} -O1 vs Chainer"));
    assert_close(&fast, &got, 1e-5, &format!("{name} -O1 vs -O0"));
    // The JIT, optimized and not, against the reference runtime.
    let opt = optimized(&g, 1);
    let jit = jit_graph(&src, &opt, Params::Generated(prng_param), &x);
    assert_close(&jit, &fast, 1e-5, &format!("{name} JIT vs reference"));
    assert_close(&jit, &want, 1e-4, &format!("{name} JIT vs Chainer"));
    let jit0 = jit_graph(&src, &g, Params::Generated(prng_param), &x);
    assert_close(&jit0, &got, 1e-5, &format!("{name} JIT -O0 vs reference"));
    // Every stride-1 ungrouped 3×3 and 5×5 convolution as Winograd with 2×2, 3×3 and 4×4 output tiles
    // (the cost model takes one where it pays): still within 1e-4 of Chainer.
    use cnnc::kernel::Winograd;
    for w in [Winograd::M2, Winograd::M3, Winograd::M4] {
        let wino = jit_graph_with(&src, &opt, Params::Generated(prng_param), &x, w);
        assert_close(&wino, &want, 1e-4, &format!("{name} JIT with Winograd {w:?} vs Chainer"));
    }
}

#[test]
fn alex_matches_chainer() {
    check_model("alex");
}

#[test]
fn alexbn_matches_chainer() {
    check_model("alexbn");
}

#[test]
fn nin_matches_chainer() {
    check_model("nin");
}

#[test]
fn googlenet_matches_chainer() {
    check_model("googlenet");
}

#[test]
fn googlenetbn_matches_chainer() {
    check_model("googlenetbn");
}

#[test]
fn resnet50_matches_chainer() {
    check_model("resnet50");
}

/// Image preprocessing against an independent Pillow implementation of the documented steps
/// (`tests/fixtures/preprocess/gen_preprocess.py`). Pillow's bilinear and the `image` crate's triangle
/// filter resample slightly differently: most pixels agree to a few 0..255 levels.
#[test]
fn png_preprocessing_matches_pillow() {
    let got = cnnc::input::load(&root().join("models/examples/cat.png"), &[3, 227, 227], &Default::default()).unwrap();
    let want = load_npy(&fixtures().join("preprocess/cat_227.npy"));
    assert_eq!(got.shape(), [&[1][..], want.shape()].concat());
    let diffs: Vec<f32> = got.data().iter().zip(want.data()).map(|(a, b)| (a - b).abs() * 255.0).collect();
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    assert!(mean < 1.0, "mean |diff| {mean} levels");
    // A shifted crop or swapped channels would move the mean by tens of levels.
    let within = diffs.iter().filter(|&&d| d <= 8.0).count() as f32 / diffs.len() as f32;
    assert!(within > 0.97, "only {within} of pixels within 8 levels");
}
