//! The optimizer: what it makes of AlexBN, and every rule checked on the reference runtime. Each rule's
//! left side is instantiated as a small model with property-generated shapes and attributes; the
//! optimized model must fire the rule (where its condition holds) and compute the same outputs as the
//! unoptimized one (≤ 1e-5 relative).

use cnnc::diag::Source;
use cnnc::ir::Kind;
use cnnc::opt::{optimize, Options};
use cnnc_tests::*;
use proptest::prelude::*;

fn compile(text: &str) -> (Source, cnnc::ir::Graph) {
    let src = Source::new("case.model", text);
    let (g, _) = cnnc::compile(&src).unwrap_or_else(|f| panic!("{}\n{text}", src.render_plain(&f.0)));
    (src, g)
}

/// Optimizes a one-off model; checks which rules fired and that the outputs did not change.
fn check(text: &str, input: &[usize], rule: &str, should_fire: bool) {
    let (src, g) = compile(text);
    let (opt, report) = optimize(&g, &Options::default());
    let fired = report.rules.iter().any(|(r, n, _, _)| *r == rule && *n > 0);
    assert_eq!(fired, should_fire, "{rule} fired: {fired}\n{text}\n{}", cnnc::ir::dump(&opt, &src));
    assert_eq!(report.stop_reason, "saturated");
    let x = prng_param("input", &[&[2][..], input].concat());
    let want = run_graph(&src, &g, Params::Generated(prng_param), x.clone());
    let got = run_graph(&src, &opt, Params::Generated(prng_param), x);
    assert_eq!(got.shape(), want.shape());
    let tol = 1e-5 * want.max_abs().max(1e-3);
    assert!(got.max_abs_diff(&want) <= tol, "{rule}: diff {} > {tol}\n{text}", got.max_abs_diff(&want));
}

fn model(links: &str, body: &str, input: &[usize]) -> String {
    let dims: Vec<String> = input.iter().map(ToString::to_string).collect();
    format!("model Case {{\n{links}\n    forward(x: [{}]) {{\n        return {body}\n    }}\n}}\n", dims.join(", "))
}

/// A convolution declaration and an input it fits: (declaration, input dims, output channels).
fn conv() -> impl Strategy<Value = (String, Vec<usize>, usize)> {
    (1usize..4, 1usize..5, 1usize..4, 1usize..3, 0usize..2, 3usize..8, any::<bool>()).prop_map(|(c, o, k, s, p, hw, nobias)| {
        let nobias = if nobias { ", nobias=True" } else { "" };
        (format!("    c = L.Convolution2D({c}, {o}, {k}, stride={s}, pad={p}{nobias})"), vec![c, hw.max(k), hw.max(k) + 1], o)
    })
}

/// A pooling call's arguments: (kernel, stride, pad, cover_all), with pad < kernel as Chainer requires.
fn pool() -> impl Strategy<Value = (usize, usize, usize, bool)> {
    (1usize..4, 1usize..4, 0usize..2, any::<bool>()).prop_map(|(k, s, p, c)| (k, s, p.min(k - 1), c))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn fold_bn_into_conv((c, input, o) in conv(), eps in prop::sample::select(vec!["2e-5", "1e-3"])) {
        let links = format!("{c}\n    b = L.BatchNormalization({o}, eps={eps})");
        check(&model(&links, "self.b(self.c(x))", &input), &input, "fold-bn-into-conv", true);
    }

    #[test]
    fn fold_bn_into_linear(n in 1usize..20, o in 1usize..9, nobias in any::<bool>()) {
        let links = format!("    l = L.Linear({n}, {o}, nobias={})\n    b = L.BatchNormalization({o})", if nobias { "True" } else { "False" });
        check(&model(&links, "self.b(self.l(x))", &[n]), &[n], "fold-bn-into-linear", true);
    }

    #[test]
    fn fuse_conv_relu((c, input, _) in conv()) {
        check(&model(&c, "F.relu(self.c(x))", &input), &input, "fuse-conv-relu", true);
    }

    #[test]
    fn fuse_conv_relu_maxpool((c, input, _) in conv(), (k, s, p, ca) in pool()) {
        let body = format!("F.max_pooling_2d(F.relu(self.c(x)), {k}, stride={s}, pad={p}, cover_all={})", if ca { "True" } else { "False" });
        let (_, g) = compile(&model(&c, "self.c(x)", &input));
        // Only where the window fits the convolution's output.
        let out = &g.node(g.output).shape;
        prop_assume!(out[1] + 2 * p >= k && out[2] + 2 * p >= k);
        check(&model(&c, &body, &input), &input, "fuse-conv-relu-maxpool", true);
    }

    /// A residual block in miniature: `c` keeps the shape (odd kernel, half padding, stride 1), so
    /// `self.c(x) + x` is a shortcut add, written either way round, with or without the ReLU after it.
    #[test]
    fn fuse_conv_add(ch in 1usize..5, k in prop::sample::select(vec![1usize, 3]), hw in 1usize..7, relu in any::<bool>(), swapped in any::<bool>()) {
        let links = format!("    c = L.Convolution2D({ch}, {ch}, {k}, pad={})", k / 2);
        let sum = if swapped { "x + self.c(x)" } else { "self.c(x) + x" };
        let body = if relu { format!("F.relu({sum})") } else { sum.to_string() };
        let input = [ch, hw.max(k), hw.max(k) + 1];
        check(&model(&links, &body, &input), &input, "fuse-conv-add", true);
        if relu {
            check(&model(&links, &body, &input), &input, "fuse-conv-add-relu", true);
        }
    }

    #[test]
    fn fuse_linear_relu(n in 1usize..20, o in 1usize..9) {
        check(&model(&format!("    l = L.Linear({n}, {o})"), "F.relu(self.l(x))", &[n]), &[n], "fuse-linear-relu", true);
    }

    #[test]
    fn relu_before_maxpool(ch in 1usize..3, hw in 3usize..9, (k, s, _, ca) in pool(), p in 0usize..4) {
        let body = format!("F.relu(F.max_pooling_2d(x, {k}, stride={s}, pad={p}, cover_all={}))", if ca { "True" } else { "False" });
        // Every window must overlap the input: pad < kernel, and with cover_all pad + stride <= kernel.
        let holds = p < k && (!ca || p + s <= k);
        check(&model("", &body, &[ch, hw, hw]), &[ch, hw, hw], "relu-before-maxpool", holds);
    }

    #[test]
    fn drop_dropout(ch in 1usize..4, hw in 1usize..6, ratio in 0.0f64..0.9) {
        check(&model("", &format!("F.dropout(F.relu(x), ratio={ratio:.3})"), &[ch, hw, hw]), &[ch, hw, hw], "drop-dropout", true);
    }

    #[test]
    fn relu_idempotent(n in 1usize..30) {
        check(&model("", "F.relu(F.relu(x))", &[n]), &[n], "relu-idempotent", true);
    }

    #[test]
    fn drop_identity_reshape(c in 1usize..4, h in 1usize..5, w in 1usize..5) {
        let same = format!("F.relu(F.reshape(x, (-1, {c}, {h}, {w})))");
        check(&model("", &same, &[c, h, w]), &[c, h, w], "drop-identity-reshape", true);
        // A real reshape stays.
        let flat = format!("F.relu(F.reshape(x, (-1, {})))", c * h * w);
        check(&model("", &flat, &[c, h, w]), &[c, h, w], "drop-identity-reshape", false);
    }
}

/// The bar: no BatchNormalization, Dropout, standalone ReLU or MaxPool; five fused convolution
/// kernels (conv1 and conv2 with BN folded and ReLU and pooling fused; conv5 with ReLU and pooling) and
/// three linear layers (fc6, fc7 with ReLU).
#[test]
fn alexbn_becomes_eight_kernels() {
    let src = source(&root().join("models/alexbn.model"));
    let (g, _) = cnnc::compile(&src).unwrap();
    let (opt, report) = optimize(&g, &Options::default());
    let ops: Vec<(String, &str)> = opt
        .nodes()
        .filter_map(|(_, n)| match &n.kind {
            Kind::Op(op) => Some((n.layer.clone(), op.name())),
            Kind::Input(_) => None,
        })
        .collect();
    let want = [
        ("conv1+bn1+F.relu+F.max_pooling_2d", "conv2d+relu+max_pool2d"),
        ("conv2+bn2+F.relu+F.max_pooling_2d", "conv2d+relu+max_pool2d"),
        ("conv3+F.relu", "conv2d+relu"),
        ("conv4+F.relu", "conv2d+relu"),
        ("conv5+F.relu+F.max_pooling_2d", "conv2d+relu+max_pool2d"),
        ("fc6+F.relu", "linear+relu"),
        ("fc7+F.relu", "linear+relu"),
        ("fc8", "linear"),
    ];
    assert_eq!(ops, want.map(|(l, o)| (l.to_string(), o)));
    let conv1 = opt.nodes().nth(1).unwrap().1;
    let p = conv1.provenance.as_ref().expect("provenance");
    assert_eq!(p.rules, ["fold-bn-into-conv", "fuse-conv-relu", "fuse-conv-relu-maxpool"]);
    assert!(p.cost_after < p.cost_before);
    assert_eq!(conv1.params.iter().map(ToString::to_string).collect::<Vec<_>>(), ["fold_w(conv1/W, bn1)", "fold_b(conv1/b, bn1)"]);
    assert!(report.cost_after < report.cost_before);
    assert_eq!(opt.macs(), g.macs());
}

/// Every model saturates under the runner's limits, and -O0 leaves the graph alone.
#[test]
fn every_model_saturates_and_o0_is_identity() {
    for path in model_files() {
        let src = source(&path);
        let (g, _) = cnnc::compile(&src).unwrap();
        let (_, report) = optimize(&g, &Options::default());
        assert_eq!(report.stop_reason, "saturated", "{}", path.display());
        assert!(report.cost_after <= report.cost_before, "{}", path.display());
        let (same, r0) = optimize(&g, &Options { level: 0, ..Default::default() });
        assert_eq!(cnnc::ir::dump(&same, &src), cnnc::ir::dump(&g, &src));
        assert_eq!(r0.cost_after, r0.cost_before);
    }
}

/// Found in review: without cover_all, pad >= kernel makes the first window all padding.
#[test]
fn relu_before_maxpool_not_when_pad_reaches_the_kernel() {
    let text = model("", "F.relu(F.max_pooling_2d(x, 1, stride=1, pad=1, cover_all=False))", &[1, 2, 2]);
    check(&text, &[1, 2, 2], "relu-before-maxpool", false);
}

/// Shrunk from `relu_before_maxpool`: kernel 1, stride 2, cover_all on 3 pixels makes a last window that
/// lies wholly in the −∞ padding, where relu(max) = 0 but max(relu) = −∞. The rule must not fire.
#[test]
fn relu_before_maxpool_not_over_empty_windows() {
    let text = model("", "F.relu(F.max_pooling_2d(x, 1, stride=2, pad=0, cover_all=True))", &[1, 3, 3]);
    check(&text, &[1, 3, 3], "relu-before-maxpool", false);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// relu(concat(...)) → concat(relu(...), ...), after which each branch's ReLU fuses into its conv.
    #[test]
    fn relu_into_concat(ch in 1usize..4, hw in 2usize..6, o1 in 1usize..4, o2 in 1usize..4) {
        let links = format!("    a = L.Convolution2D({ch}, {o1}, 1)\n    b = L.Convolution2D({ch}, {o2}, 3, pad=1)");
        check(&model(&links, "F.relu(F.concat((self.a(x), self.b(x), x), axis=1))", &[ch, hw, hw]), &[ch, hw, hw], "relu-into-concat", true);
    }

    /// The right side of merge-parallel-convs, as the optimizer builds it: one convolution over the
    /// concatenated weights (`cat`), then a channel slice per original convolution. (Extraction charges a
    /// shared node once per consumer, so it never picks the merged form yet; its meaning is checked here.)
    #[test]
    fn merged_convolution_slices_equal_the_originals(ch in 1usize..4, hw in 1usize..6, o1 in 1usize..5, o2 in 1usize..5, k in 1usize..3, nobias in any::<bool>()) {
        use cnnc_runtime::op::{Axis, Conv2d};
        use cnnc_runtime::{plan::PlanBuilder, Op};
        let conv = |o| Conv2d { in_channels: ch, out_channels: o, kernel: [k, k], stride: [1, 1], pad: [k / 2, k / 2], dilation: [1, 1], groups: 1, bias: !nobias };
        let tensors: std::collections::HashMap<String, cnnc_runtime::Tensor> = [("a/W", vec![o1, ch, k, k]), ("a/b", vec![o1]), ("b/W", vec![o2, ch, k, k]), ("b/b", vec![o2])]
            .into_iter()
            .map(|(key, shape)| (key.to_string(), prng_param(key, &shape)))
            .collect();
        let key = |k: &str| cnnc::ir::Param::Key(k.into());
        let x = prng_param("input", &[2, ch, hw, hw]);
        let run = |steps: &dyn Fn(&mut PlanBuilder, cnnc_runtime::plan::ValueId) -> cnnc_runtime::plan::ValueId| {
            let mut b = PlanBuilder::default();
            let input = b.input(vec![ch, hw, hw]);
            let out = steps(&mut b, input);
            b.finish(out).run(vec![x.clone()]).unwrap()
        };
        let bias_of = |names: &[&str]| if nobias { vec![] } else { vec![cnnc::ir::Param::Cat(names.iter().map(|n| key(n)).collect())] };
        let merged = run(&|b, input| {
            let mut t = cnnc::lower::Tensors::from(tensors.clone());
            let w = b.param(cnnc::lower::eval(&cnnc::ir::Param::Cat(vec![key("a/W"), key("b/W")]), &mut t));
            let mut ps = vec![w];
            ps.extend(bias_of(&["a/b", "b/b"]).iter().map(|p| b.param(cnnc::lower::eval(p, &mut t))));
            let m = b.step(Op::Conv2d(conv(o1 + o2)), vec![input], ps).unwrap();
            let s1 = b.step(Op::Slice { axis: Axis(1), start: 0, len: o1 }, vec![m], vec![]).unwrap();
            let s2 = b.step(Op::Slice { axis: Axis(1), start: o1, len: o2 }, vec![m], vec![]).unwrap();
            b.step(Op::Concat { axis: Axis(1) }, vec![s1, s2], vec![]).unwrap()
        });
        let separate = run(&|b, input| {
            let mut outs = vec![];
            for (name, o) in [("a", o1), ("b", o2)] {
                let mut ps = vec![b.param(tensors[&format!("{name}/W")].clone())];
                if !nobias {
                    ps.push(b.param(tensors[&format!("{name}/b")].clone()));
                }
                outs.push(b.step(Op::Conv2d(conv(o)), vec![input], ps).unwrap());
            }
            b.step(Op::Concat { axis: Axis(1) }, outs, vec![]).unwrap()
        });
        prop_assert_eq!(merged, separate);
    }
}

/// merge-parallel-convs fires on every pair of same-window convolutions of one input, once per pair.
#[test]
fn merge_parallel_convs_fires_once_per_pair() {
    let links = "    a = L.Convolution2D(3, 4, 1)\n    b = L.Convolution2D(3, 5, 1)\n    c = L.Convolution2D(3, 6, 1)\n    d = L.Convolution2D(3, 2, 3, pad=1)";
    let text = model(links, "F.concat((self.a(x), self.b(x), self.c(x), self.d(x)), axis=1)", &[3, 5, 5]);
    let (_, g) = compile(&text);
    let (_, report) = optimize(&g, &Options::default());
    let fired = report.rules.iter().find(|r| r.0 == "merge-parallel-convs").unwrap().1;
    // egg counts the e-classes a rule rewrites: two per merge, for pairs (a,b), (a,c), (b,c); d has another window.
    assert_eq!(fired, 6);
    check(&text, &[3, 5, 5], "merge-parallel-convs", true);
}

/// Optimizing an optimized graph changes nothing: folded and fused nodes go back into the e-graph as
/// terms (not opaque names), so the second pass finds the same kernels over the same parameter terms.
#[test]
fn optimizing_twice_is_stable() {
    for name in ["alexbn", "googlenetbn"] {
        let src = source(&root().join(format!("models/{name}.model")));
        let (g, _) = cnnc::compile(&src).unwrap();
        let once = optimize(&g, &Options::default()).0;
        let twice = optimize(&once, &Options::default()).0;
        let summary = |g: &cnnc::ir::Graph| -> Vec<String> { g.nodes().map(|(_, n)| format!("{:?} {:?} {:?}", n.kind, n.params, n.shape)).collect() };
        // Equal ops, parameter terms and shapes make equal plans, so equal numbers.
        assert_eq!(summary(&twice), summary(&once), "{name}");
    }
}
