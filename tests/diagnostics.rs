//! Bad model text: every case must fail (never panic) with the expected number of errors, a message naming
//! the culprit, and a caret at the right place. The rendered text is snapshot-tested.

use cnnc::diag::Source;

/// (name, model text, error count, substrings the rendered output must contain).
const CASES: &[(&str, &str, usize, &[&str])] = &[
    ("missing_comma", "model M {\n    fc = L.Linear(3 4)\n    forward(x: [3]) {\n        return self.fc(x)\n    }\n}\n", 1, &["expected", "`4`", "m.model:2:21"]),
    ("unknown_link", "model M {\n    c = L.Convolution2d(3, 8, 3)\n    forward(x: [3, 8, 8]) {\n        return self.c(x)\n    }\n}\n", 1, &["unknown link `Convolution2d`", "did you mean `Convolution2D`?", "2:11"]),
    ("unknown_function", "model M {\n    forward(x: [3, 8, 8]) {\n        return F.rellu(x)\n    }\n}\n", 1, &["unknown function or link `rellu`", "did you mean `relu`?"]),
    (
        "channel_mismatch",
        "model M {\n    conv1 = L.Convolution2D(3, 96, 11, stride=4)\n    conv2 = L.Convolution2D(64, 256, 5, pad=2)\n    forward(x: [3, 227, 227]) {\n        h = F.relu(self.conv1(x))\n        return self.conv2(h)\n    }\n}\n",
        1,
        &["`conv2` expects 64 input channels, but its input [N, 96, 55, 55] has 96", "6:16", "link declared here"],
    ),
    (
        "linear_mismatch",
        "model M {\n    fc6 = L.Linear(9000, 10)\n    forward(x: [256, 6, 6]) {\n        return self.fc6(x)\n    }\n}\n",
        1,
        &["`fc6` expects 9000 input features, but its input [N, 256, 6, 6] flattens to 9216"],
    ),
    ("window_too_big", "model M {\n    forward(x: [3, 2, 2]) {\n        return F.max_pooling_2d(x, 3, cover_all=False)\n    }\n}\n", 1, &["window 3x3 does not fit input [N, 3, 2, 2]"]),
    ("unknown_name", "model M {\n    forward(x: [3]) {\n        h = F.relu(x)\n        return F.relu(hh)\n    }\n}\n", 1, &["unknown name `hh`", "did you mean `h`?"]),
    ("missing_input_shape", "model M {\n    forward(x) {\n        return F.relu(x)\n    }\n}\n", 1, &["input `x` has no shape", "x: [3, 227, 227]"]),
    ("missing_return", "model M {\n    forward(x: [3]) {\n        h = F.relu(x)\n    }\n}\n", 1, &["`forward` ends without `return`"]),
    ("reshape_batch", "model M {\n    forward(x: [3, 4, 4]) {\n        return F.reshape(x, (2, 48))\n    }\n}\n", 1, &["`reshape` needs a shape `(-1, d1, d2, ...)`", "first entry must be -1"]),
    ("bad_keyword", "model M {\n    c = L.Convolution2D(3, 8, 3, strid=2)\n    forward(x: [3, 8, 8]) {\n        return self.c(x)\n    }\n}\n", 1, &["unknown keyword `strid`", "did you mean `stride`?"]),
    ("bad_type", "model M {\n    forward(x: [3, 8, 8]) {\n        return F.max_pooling_2d(x, 3, stride=1.5)\n    }\n}\n", 1, &["`stride` must be an integer or a pair of integers, found a float"]),
    (
        "collects_all_errors",
        "model M {\n    a = L.Linear(4, 2)\n    b = L.Linear(5, 2)\n    forward(x: [3]) {\n        h = self.a(x)\n        g = F.nope(h)\n        return self.b(x)\n    }\n}\n",
        3,
        &["`a` expects 4 input features", "unknown function or link `nope`", "`b` expects 5 input features"],
    ),
    ("add_mismatch", "model M {\n    forward(x: [3, 4, 4]) {\n        return x + F.max_pooling_2d(x, 2)\n    }\n}\n", 1, &["operands have different shapes [N, 3, 4, 4] and [N, 3, 2, 2]"]),
    ("concat_mismatch", "model M {\n    forward(x: [3, 4, 4]) {\n        return F.concat((x, F.max_pooling_2d(x, 2)), axis=1)\n    }\n}\n", 1, &["does not match [N, 3, 4, 4] except along axis 1"]),
    ("bad_characters", "model M {\n    forward(x: [3]) {\n        return $x + 'oops\n    }\n}\n", 2, &["unexpected character `$`", "unterminated string literal"]),
    ("int_overflow", "model M {\n    fc = L.Linear(99999999999999999999, 2)\n    forward(x: [3]) {\n        return self.fc(x)\n    }\n}\n", 1, &["does not fit in a 64-bit integer"]),
    ("duplicate_link", "model M {\n    a = L.Linear(3, 2)\n    a = L.Linear(3, 2)\n    forward(x: [3]) {\n        return self.a(x)\n    }\n}\n", 1, &["link `a` is declared twice", "first declared here"]),
    ("empty_file", "# nothing here\n", 1, &["the file defines no `model`"]),
    ("missing_argument", "model M {\n    forward(x: [3, 4, 4]) {\n        return F.max_pooling_2d(x)\n    }\n}\n", 1, &["`max_pooling_2d` is missing its argument `ksize`"]),
    ("groups_mismatch", "model M {\n    c = L.Convolution2D(None, 6, 3, groups=4)\n    forward(x: [4, 5, 5]) {\n        return self.c(x)\n    }\n}\n", 1, &["groups=4 must divide both channel counts"]),
    ("bad_link_path", "model M {\n    b = L.B.atchNormalization(3)\n    forward(x: [3, 2, 2]) {\n        return self.b(x)\n    }\n}\n", 1, &["unknown link constructor `L.B.atchNormalization`"]),
    ("huge_linear", "model M {\n    fc = L.Linear(None, 2147483648)\n    forward(x: [1024, 1024]) {\n        return self.fc(x)\n    }\n}\n", 1, &["parameter `W` of shape [2147483648, 1048576] has more than 4294967296 elements"]),
    ("huge_argument", "model M {\n    fc = L.Linear(3, 9999999999999)\n    forward(x: [3]) {\n        return self.fc(x)\n    }\n}\n", 1, &["`out_size` = 9999999999999 exceeds cnnc's limit"]),
    ("huge_input", "model M {\n    forward(x: [65536, 65536, 65536]) {\n        return F.relu(x)\n    }\n}\n", 1, &["more than 4294967296 elements per sample"]),
    (
        "error_inside_a_chain",
        "chain C(k) {\n    l = L.Linear(k, 2)\n    forward(x) {\n        return self.l(x)\n    }\n}\nmodel M {\n    c = C(5)\n    forward(x: [3]) {\n        return self.c(x)\n    }\n}\n",
        1,
        &["`c/l` expects 5 input features, but its input [N, 3] flattens to 3", "m.model:4:16", "in `c`"],
    ),
    ("chain_missing_argument", "chain C(k) {\n    l = L.Linear(k, 2)\n    forward(x) {\n        return self.l(x)\n    }\n}\nmodel M {\n    c = C()\n    forward(x: [3]) {\n        return self.c(x)\n    }\n}\n", 1, &["`C` is missing its argument `k`"]),
    (
        "recursive_chain",
        "chain A(n) {\n    a = A(n)\n    forward(x) {\n        return x\n    }\n}\nmodel M {\n    a = A(1)\n    forward(x: [3]) {\n        return self.a(x)\n    }\n}\n",
        1,
        &["chains nest more than 64 deep", "does `A` contain itself?"],
    ),
    (
        "builtin_link_assertion",
        "model M {\n    inc = L.InceptionBN(None, 0, 4, 4, 4, 4, 'min', stride=2)\n    forward(x: [3, 8, 8]) {\n        return self.inc(x)\n    }\n}\n",
        1,
        &["pooltype must be 'max' or 'avg'", "<prelude>:", "in `inc`"],
    ),
    (
        "chainlist_index_out_of_range",
        "chainlist S() {\n    L.Linear(3, 3)\n    forward(x) {\n        return self[1](x)\n    }\n}\nmodel M {\n    s = S()\n    forward(x: [3]) {\n        return self.s(x)\n    }\n}\n",
        1,
        &["index 1 is out of range for length 1"],
    ),
    ("unnamed_link_in_chain", "chain C(k) {\n    L.Linear(k, 2)\n    forward(x) {\n        return self.l(x)\n    }\n}\nmodel M {\n    c = C(5)\n    forward(x: [5]) {\n        return self.c(x)\n    }\n}\n", 2, &["a link without a name", "only a `chainlist` numbers its children"]),
    ("loop_over_a_number", "model M {\n    for i in 3 {\n        c = i\n    }\n    forward(x: [3]) {\n        return x\n    }\n}\n", 1, &["cannot loop over an integer"]),
    (
        "forward_calls_itself",
        "model M {\n    forward(x: [3]) {\n        s = self\n        return s(x)\n    }\n}\n",
        1,
        &["calls nest more than 64 deep", "does a forward call itself?"],
    ),
    (
        "nested_loops_run_out_of_fuel",
        "model M {\n    for i in range(100000) {\n        for j in range(100000) {\n            k = i + j\n        }\n    }\n    forward(x: [3]) {\n        return x\n    }\n}\n",
        1,
        &["evaluating the model takes more than 2000000 steps"],
    ),
    (
        "exponential_chains_run_out_of_fuel",
        "chain T(n) {\n    if n > 0 {\n        a = T(n - 1)\n        b = T(n - 1)\n    }\n    forward(x) {\n        return x\n    }\n}\nmodel M {\n    t = T(40)\n    forward(x: [3]) {\n        return self.t(x)\n    }\n}\n",
        1,
        &["evaluating the model takes more than 2000000 steps"],
    ),
    (
        "tuple_doubling",
        "model M {\n    t = (1, 2)\n    for i in range(64) {\n        t = t + t\n    }\n    forward(x: [3]) {\n        return x\n    }\n}\n",
        1,
        &["a tuple holds at most 100000 values"],
    ),
    ("empty_input_shape", "model M {\n    forward(x: []) {\n        return x\n    }\n}\n", 1, &["an input shape is a list of positive integers"]),
    (
        "named_child_in_chainlist",
        "chainlist S() {\n    a = L.Linear(3, 3)\n}\nmodel M {\n    s = S()\n    forward(x: [3]) {\n        return self.s(x)\n    }\n}\n",
        1,
        &["a chainlist's links are numbered, not named"],
    ),
    ("unclosed_model", "model M {\n    forward(x: [3]) {\n        return F.relu(x)\n    }\n", 1, &["expected `}`, found end of file"]),
];

#[test]
fn every_bad_model_is_reported() {
    for (name, text, count, needles) in CASES {
        let src = Source::new("m.model", *text);
        let failed = match cnnc::compile(&src) {
            Ok(_) => panic!("{name}: compiled, but should not"),
            Err(f) => f,
        };
        let rendered = src.render_plain(&failed.0);
        let errors = failed.0.iter().filter(|d| d.is_error()).count();
        assert_eq!(errors, *count, "{name}: error count\n{rendered}");
        for n in *needles {
            assert!(rendered.contains(n), "{name}: missing {n:?} in\n{rendered}");
        }
        insta::assert_snapshot!(format!("diag_{name}"), rendered);
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let text = format!("model M {{\n    forward(x: [3]) {{\n        return {}x{}\n    }}\n}}\n", "F.relu(".repeat(50_000), ")".repeat(50_000));
    let failed = cnnc::compile(&Source::new("deep.model", text)).expect_err("must fail");
    assert!(failed.0.iter().any(|d| d.message.contains("nested more than 64 levels")), "{:?}", failed.0);
}

/// A model may be thousands of layers deep (here 3,000 through a loop): building, optimizing and
/// extracting it must not recurse per layer.
#[test]
fn thousands_of_layers_compile_and_optimize() {
    let text = "model M {\n    forward(x: [3, 4, 4]) {\n        h = x\n        for i in range(3000) {\n            h = F.softmax(h)\n        }\n        return h\n    }\n}\n";
    let src = Source::new("deep.model", text);
    let (g, _) = cnnc::compile(&src).unwrap_or_else(|f| panic!("{}", src.render_plain(&f.0)));
    assert_eq!(g.g.node_count(), 3001);
    let (opt, _) = cnnc::opt::optimize(&g, &Default::default());
    assert_eq!(opt.g.node_count(), 3001);
}

/// Integer arithmetic follows Python, without overflow: floor division and modulo by negatives, and
/// ranges whose length does not fit in 64 bits are reported, not wrapped.
#[test]
fn constant_arithmetic_is_pythons() {
    let ok = |e: &str, out: usize| {
        let text = format!("model M {{\n    n = {e}\n    l = L.Linear(3, n)\n    forward(x: [3]) {{\n        return self.l(x)\n    }}\n}}\n");
        let (g, _) = cnnc::compile(&Source::new("a.model", text)).unwrap_or_else(|f| panic!("{e}: {:?}", f.0));
        assert_eq!(g.node(g.output).shape, vec![out], "{e}");
    };
    ok("7 // 2", 3);
    ok("-7 // -2", 3);
    ok("7 % -3 + 3", 1);
    ok("(-9223372036854775807 - 1) % -1 + 1", 1);
    ok("len(range(-9223372036854775807, 9223372036854775807, 4611686018427387904))", 4);
    let text = "model M {\n    n = len(range(-9223372036854775807, 9223372036854775807))\n    forward(x: [3]) {\n        return x\n    }\n}\n";
    let f = cnnc::compile(&Source::new("a.model", text)).expect_err("too long");
    assert!(f.0.iter().any(|d| d.message.contains("a range holds at most")), "{:?}", f.0);
}

/// Chainer accepts negative axes and `dilate=(1, 1)`; a model's own chain may shadow a built-in one.
#[test]
fn chainer_forms_negative_axes_and_shadowing() {
    let text = "chain Inception(n) {\n    l = L.Linear(None, n)\n    forward(x) {\n        return self.l(x)\n    }\n}\nmodel M {\n    c = L.Convolution2D(3, 4, 1, dilate=(1, 1))\n    i = Inception(5)\n    forward(x: [3, 2, 2]) {\n        h = F.softmax(self.c(x), axis=-1)\n        return self.i(F.concat((h, h), axis=-3))\n    }\n}\n";
    let src = Source::new("f.model", text);
    let (g, _) = cnnc::compile(&src).unwrap_or_else(|f| panic!("{}", src.render_plain(&f.0)));
    assert_eq!(g.node(g.output).shape, vec![5]);
    let dump = cnnc::ir::dump(&g, &src);
    assert!(dump.contains("softmax[axis=3]") && dump.contains("concat[axis=1]"), "{dump}");
}

#[test]
fn warnings_for_unused_links_and_values() {
    let text = "model M {\n    a = L.Linear(3, 2)\n    b = L.Linear(3, 2)\n    forward(x: [3]) {\n        t = F.relu(x)\n        return self.a(x)\n    }\n}\n";
    let src = Source::new("w.model", text);
    let (_, warnings) = cnnc::compile(&src).expect("compiles");
    let rendered = src.render_plain(&warnings);
    assert!(rendered.contains("link `b` is never called"), "{rendered}");
    assert!(rendered.contains("value assigned to `t` is never used"), "{rendered}");
}

#[test]
fn chainer_spellings_are_accepted() {
    // No prefixes, tabs, CRLF, tuples for ksize, two-argument Convolution2D and one-argument Linear.
    let text = "model M {\r\n\tc = Convolution2D(8, (3, 3))\r\n\tfc = L.Linear(10)\r\n\tforward(x: [3, 6, 6]) {\r\n\t\th = relu(c(x))\r\n\t\treturn self.fc(F.dropout(h, ratio=0.1))\r\n\t}\r\n}\r\n";
    let (g, _) = cnnc::compile(&Source::new("ok.model", text)).expect("compiles");
    assert_eq!(g.node(g.output).shape, vec![10]);
    assert_eq!(g.params().iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), ["c/W", "c/b", "fc/W", "fc/b"]);
}
