//! The JIT against the reference runtime on generated problems (tract's `ConvProblem` style): each
//! [`Problem`] is a one-layer model plus its input; `check` compiles it optimized (so convolutions carry
//! their fused bias, ReLU and pooling), runs the reference interpreter, and runs the JIT with every
//! GEMM tier this CPU has, in checked mode (every access bounds-checked), on 1 and 3 threads. The JIT
//! must agree with the reference within 1e-5 × max |reference| and give the same bytes for every thread
//! count and every tier whose Winograd choices are alike ([`Tier::cost_columns`]). Convolutions that can take Winograd (3×3 and 5×5, stride 1, ungrouped) are checked
//! as the cost model lowers them and with each of its algorithms forced on — F(2×2, 3×3), F(3×3, 3×3),
//! F(4×4, 3×3), or F(2×2, 5×5), F(3×3, 5×5); Winograd lowerings are held to 5e-5 (its transforms add roundings). Shrunk failures
//! are pinned below as named cases.

use cnnc::ir::Kind;
use cnnc::kernel::{BRows, Lowering, Program, Stmt, Tier, WeightsDtype, Winograd};
use cnnc_runtime::{rng, Op, Tensor};
use cnnc_tests::*;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Layer {
    Conv {
        out: usize,
        k: [usize; 2],
        stride: usize,
        pad: usize,
        groups: usize,
        bias: bool,
        relu: bool,
        pool: Option<Pool>,
        /// `self.l(x) + self.m(x)`, `m` a twin of `l` with the other bias-ness (so the two do not merge):
        /// the optimizer fuses the add into one of them (never with a pool).
        add: bool,
        /// Chainer's `dilate`.
        dilate: usize,
    },
    Linear {
        out: usize,
        relu: bool,
    },
    Pool(Pool),
    Lrn,
    Softmax,
    Sigmoid,
    Clip,
    /// `x * F.sigmoid(x)`: a product of equal shapes.
    Silu,
    /// `x` times its per-channel mean: a product by one value per channel.
    Scale,
    /// `F.transpose(x, (0, p₁, p₂, p₃))`.
    Transpose([usize; 3]),
    /// The channels rotated by `F.split_axis` at 1 and a concat: two slices.
    Split,
}

#[derive(Clone, Copy, Debug)]
struct Pool {
    max: bool,
    k: usize,
    stride: usize,
    pad: usize,
    cover_all: bool,
}

#[derive(Clone, Debug)]
struct Problem {
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
    layer: Layer,
}

fn py(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

impl Pool {
    fn call(&self, x: &str) -> String {
        // For average pooling the flag chooses the divisor instead: the cells inside (`pad_value=None`).
        let (f, extra) = match (self.max, self.cover_all) {
            (true, c) => ("max_pooling_2d", format!(", cover_all={}", py(c))),
            (false, true) => ("average_pooling_2d", ", pad_value=None".into()),
            (false, false) => ("average_pooling_2d", String::new()),
        };
        format!("F.{f}({x}, {}, stride={}, pad={}{extra})", self.k, self.stride, self.pad)
    }
}

impl Problem {
    fn source(&self) -> String {
        let (link, body) = match &self.layer {
            Layer::Conv { out, k, stride, pad, groups, bias, relu, pool, add, dilate } => {
                let link = format!(
                    "    l = L.Convolution2D({}, {out}, ({}, {}), stride={stride}, pad={pad}, dilate={dilate}, groups={groups}, nobias={})",
                    self.c,
                    k[0],
                    k[1],
                    py(!bias)
                );
                let mut body = "self.l(x)".to_string();
                let mut link = link;
                if *add {
                    let twin = format!(
                        "\n    m = L.Convolution2D({}, {out}, ({}, {}), stride={stride}, pad={pad}, dilate={dilate}, groups={groups}, nobias={})",
                        self.c,
                        k[0],
                        k[1],
                        py(*bias)
                    );
                    link += &twin;
                    body += " + self.m(x)";
                }
                if *relu {
                    body = format!("F.relu({body})");
                }
                if let Some(p) = pool {
                    body = p.call(&body);
                }
                (link, body)
            }
            Layer::Linear { out, relu } => {
                let link = format!("    l = L.Linear({}, {out})", self.c * self.h * self.w);
                (link, if *relu { "F.relu(self.l(x))".into() } else { "self.l(x)".into() })
            }
            Layer::Pool(p) => (String::new(), p.call("x")),
            Layer::Lrn => (String::new(), "F.local_response_normalization(x)".into()),
            Layer::Softmax => (String::new(), "F.softmax(x)".into()),
            Layer::Sigmoid => (String::new(), "F.sigmoid(x)".into()),
            Layer::Clip => (String::new(), "F.clip(x, -0.25, 0.5)".into()),
            Layer::Silu => (String::new(), "x * F.sigmoid(x)".into()),
            Layer::Scale => (String::new(), format!("x * F.average_pooling_2d(x, ({}, {}))", self.h, self.w)),
            Layer::Transpose(p) => (String::new(), format!("F.transpose(x, (0, {}, {}, {}))", p[0], p[1], p[2])),
            Layer::Split => (String::new(), "F.concat((F.split_axis(x, (1,), axis=1)[1], F.split_axis(x, (1,), axis=1)[0]), axis=1)".into()),
        };
        format!("model Case {{\n{link}\n    forward(x: [{}, {}, {}]) {{\n        return {body}\n    }}\n}}\n", self.c, self.h, self.w)
    }

    /// Generated shapes can be invalid (a window larger than its padded input): those are not problems.
    fn compiles(&self) -> bool {
        cnnc::compile(&cnnc::diag::Source::new("case.model", self.source())).is_ok()
    }

    /// Whether the cost model (`Winograd::Auto`) lowers this problem with one of Winograd's algorithms.
    fn auto_takes_winograd(&self) -> bool {
        let src = cnnc::diag::Source::new("case.model", self.source());
        let g = optimized(&cnnc::compile(&src).expect("compiles").0, 1);
        let program = cnnc::kernel::program(&g, bind(&src, &g, Params::Generated(prng_param)), self.batch, Tier::Portable);
        program.launches.iter().any(|l| l.kernel.name.ends_with(".winograd_in"))
    }

    /// Whether the AVX-512 tier reads this convolution's columns in place ([`BRows::Taps`]).
    fn uses_implicit_columns(&self) -> bool {
        let src = cnnc::diag::Source::new("case.model", self.source());
        let g = optimized(&cnnc::compile(&src).expect("compiles").0, 1);
        let program = cnnc::kernel::program(&g, bind(&src, &g, Params::Generated(prng_param)), self.batch, Tier::Avx512);
        let mut taps = false;
        for l in &program.launches {
            Stmt::visit(&l.kernel.body, &mut |s| taps |= matches!(s, Stmt::Gemm(g) if matches!(g.rows_b, BRows::Taps { .. })));
        }
        taps
    }

    fn check(&self) {
        let src = cnnc::diag::Source::new("case.model", self.source());
        let (g, _) = cnnc::compile(&src).unwrap_or_else(|f| panic!("{}\n{}", self.source(), src.render_plain(&f.0)));
        let g = optimized(&g, 1);
        if let Layer::Conv { add: true, .. } = self.layer {
            let fused = g.nodes().any(|(_, n)| matches!(&n.kind, Kind::Op(Op::Fused(f)) if f.add));
            assert!(fused, "the add is not fused:\n{}", self.source());
        }
        let shape = [self.batch, self.c, self.h, self.w];
        let x = Tensor::new(shape.to_vec(), rng::normal("x", shape.iter().product()).map(|v| v as f32).collect()).unwrap();
        let want = run_graph(&src, &g, Params::Generated(prng_param), x.clone());
        // Stride-1 ungrouped 3×3 and 5×5 convolutions are also checked with each Winograd algorithm forced.
        let forced: &[Winograd] = match self.layer {
            Layer::Conv { k: [3, 3], stride: 1, groups: 1, .. } => &[Winograd::M2, Winograd::M3, Winograd::M4],
            Layer::Conv { k: [5, 5], stride: 1, groups: 1, .. } => &[Winograd::M2, Winograd::M3],
            _ => &[],
        };
        for &choice in [Winograd::Auto].iter().chain(forced) {
            // The first result of each Winograd cost unit: tiers that count columns alike choose the
            // same algorithms and must give the same bytes (forced choices: every tier).
            let mut first: Vec<(usize, Tensor)> = vec![];
            for tier in tiers() {
                let unit = if choice == Winograd::Auto { tier.cost_columns() } else { 0 };
                let program = cnnc::kernel::program_with(
                    &g,
                    bind(&src, &g, Params::Generated(prng_param)),
                    self.batch,
                    Lowering { winograd: choice, ..Lowering::new(tier) },
                );
                // The Winograd transforms add roundings: up to 1.2e-5 measured on 384-channel layers.
                let tol = if program.launches.iter().any(|l| l.kernel.name.ends_with(".winograd_in")) { 5e-5 } else { 1e-5 };
                let jit = cnnc::jit::compile(&program, cnnc::jit::Options { checked: true }).expect("compiles");
                for threads in [1, 3] {
                    let got = jit.exe.run(&[&x], threads).expect("runs");
                    let case = format!("{tier:?}, {threads} threads, winograd {choice:?}\n{}", self.source());
                    assert_eq!(jit.violations(), vec![], "out-of-bounds accesses: {case}");
                    assert_close(&got, &want, tol, &case);
                    match first.iter().find(|(u, _)| *u == unit) {
                        None => first.push((unit, got)),
                        Some((_, f)) => assert!(bits(f) == bits(&got), "not the same bytes: {case}"),
                    }
                }
            }
        }
    }
}

/// The tiers this CPU runs: always the portable one, and AVX2 and AVX-512 where available.
fn tiers() -> Vec<Tier> {
    Tier::ALL.into_iter().filter(|t| t.available()).collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.data().iter().map(|v| v.to_bits()).collect()
}

fn pool_strategy() -> impl Strategy<Value = Pool> {
    (any::<bool>(), 1usize..4, 1usize..4, 0usize..2, any::<bool>()).prop_map(|(max, k, stride, pad, cover_all)| Pool {
        max,
        k,
        stride,
        pad: pad.min(k - 1),
        cover_all,
    })
}

fn problem() -> impl Strategy<Value = Problem> {
    // Kernels up to 3×3, and 5×5 (Winograd's F(2×2, 5×5)) one time in five.
    let kernel = prop_oneof![4 => (1usize..4, 1usize..4), 1 => Just((5, 5))];
    let dilate = prop_oneof![3 => Just(1usize), 1 => 2usize..4];
    let conv = (1usize..3, 1usize..4, 1usize..30, kernel, 1usize..3, 0usize..3, any::<bool>(), any::<bool>(), proptest::option::of(pool_strategy()), dilate)
        .prop_map(|(groups, cg, out_g, (kh, kw), stride, pad, bias, relu, pool, dilate)| {
            // A max pool, or (where none) a residual add one time in two.
            let (pool, add) = match pool {
                Some(p) if p.max => (Some(p), false),
                p => (None, p.is_some()),
            };
            (groups * cg, Layer::Conv { out: out_g * groups, k: [kh, kw], stride, pad, groups, bias, relu, pool, add, dilate })
        });
    let other = prop_oneof![
        (1usize..5, 1usize..40, any::<bool>()).prop_map(|(c, out, relu)| (c, Layer::Linear { out, relu })),
        (1usize..5, pool_strategy()).prop_map(|(c, p)| (c, Layer::Pool(p))),
        (1usize..8).prop_map(|c| (c, Layer::Lrn)),
        (1usize..8).prop_map(|c| (c, Layer::Softmax)),
        (1usize..8).prop_map(|c| (c, Layer::Sigmoid)),
        (1usize..8).prop_map(|c| (c, Layer::Clip)),
        (1usize..8).prop_map(|c| (c, Layer::Silu)),
        (1usize..8).prop_map(|c| (c, Layer::Scale)),
        (1usize..8, Just([1usize, 2, 3]).prop_shuffle()).prop_map(|(c, p)| (c, Layer::Transpose([p[0], p[1], p[2]]))),
        (2usize..8).prop_map(|c| (c, Layer::Split)),
    ];
    (prop_oneof![3 => conv, 1 => other], 1usize..4, 3usize..12, 3usize..12).prop_map(|((c, layer), batch, h, w)| Problem { batch, c, h, w, layer })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn jit_matches_the_reference(p in problem()) {
        prop_assume!(p.compiles());
        p.check();
    }
}

#[allow(clippy::too_many_arguments)]
fn conv(c: usize, hw: usize, out: usize, k: usize, stride: usize, pad: usize, groups: usize, pool: Option<Pool>) -> Problem {
    Problem { batch: 2, c, h: hw, w: hw, layer: Layer::Conv { out, k: [k, k], stride, pad, groups, bias: true, relu: true, pool, add: false, dilate: 1 } }
}

/// A 1×1 stride-1 convolution reads its input as the column matrix (no im2col); strided ones read a
/// subsampled copy (stride 2 on an odd and an even plane, stride 3 with groups and a fused pool).
#[test]
fn direct_one_by_one_conv() {
    conv(5, 7, 9, 1, 1, 0, 1, None).check();
    conv(5, 7, 9, 1, 2, 0, 1, None).check();
    conv(6, 8, 13, 1, 2, 0, 1, None).check();
    conv(4, 11, 6, 1, 3, 0, 2, Some(Pool { max: true, k: 2, stride: 2, pad: 0, cover_all: true })).check();
}

/// Output channels not a multiple of any tile's rows (4, 6, 12): the last block's padding rows are
/// computed and must not be stored.
#[test]
fn ragged_channel_blocks() {
    conv(3, 9, 13, 3, 1, 1, 1, None).check();
}

/// k = 30·3·3 = 270 > KC (as whole rows of 3 taps: 126 for AVX-512, 255 for AVX2): the assembled tiers
/// split k into slices and accumulate onto C.
#[test]
fn depth_split_into_slices() {
    conv(30, 6, 12, 3, 1, 1, 1, None).check();
}

/// Columns that end 1–4 past a multiple of 16 (7 × 7 = 49, 3 × 6 = 18, 5 × 7 = 35, 6 × 6 = 36): AVX2
/// computes them in column tiles over groups of full channel blocks. 100 channels are 16 full blocks of
/// 6 and a ragged one (which the 6 × 16 tile takes), k = 300 and 2,700 run in slices (the accumulating
/// variants), with ReLU, a fused add and a 3×3 through packed panels: the same bytes as the portable tier.
#[test]
fn column_tiles_for_the_last_columns() {
    for (h, w, k, add) in [(7, 7, 1, true), (3, 6, 1, false), (5, 7, 3, false), (6, 6, 1, true)] {
        let layer = Layer::Conv { out: 100, k: [k, k], stride: 1, pad: k / 2, groups: 1, bias: true, relu: true, pool: None, add, dilate: 1 };
        let p = Problem { batch: 2, c: 300, h, w, layer };
        let src = cnnc::diag::Source::new("case.model", p.source());
        let g = optimized(&cnnc::compile(&src).expect("compiles").0, 1);
        // (The 3×3 without Winograd: check() runs it both ways.)
        let lowering = Lowering { winograd: Winograd::Never, ..Lowering::new(Tier::Avx2) };
        let program = cnnc::kernel::program_with(&g, bind(&src, &g, Params::Generated(prng_param)), p.batch, lowering);
        let mut columns = false;
        for l in &program.launches {
            Stmt::visit(&l.kernel.body, &mut |s| columns |= matches!(s, Stmt::Gemm(g) if g.blocks > 1));
        }
        assert!(columns, "no column tile:\n{}", p.source());
        p.check();
    }
}

/// Output rows that tile whole panels evenly, so that packing copies segments of one length known at
/// compile time: 4 × 4 and 8 × 8 maps (rows of 4 and 8 under AVX2's 16 columns), 6 × 6 (rows of 6 under
/// the portable tier's 12), a 7×7 stride-2 convolution with 32-wide rows (ResNet's conv1 in miniature),
/// and the 8 × 8 with a fused pool.
#[test]
fn panels_of_whole_rows() {
    conv(5, 4, 7, 3, 1, 1, 1, None).check();
    conv(3, 6, 5, 3, 1, 1, 1, None).check();
    conv(3, 64, 8, 7, 2, 3, 1, None).check();
    conv(4, 8, 9, 3, 1, 1, 1, Some(Pool { max: true, k: 2, stride: 2, pad: 0, cover_all: true })).check();
}

/// Winograd output tiles that hold whole max-pool windows are pooled as they are transformed, with no
/// pooling launch: 2×2/2 pools on 8 × 8 maps (one value per 2×2 tile, four per 4×4 tile), on 12 × 12
/// (rows of six tiles: a vector of four and an overlapping one), on 4 × 4 (one 4×4 tile per image: the tiles
/// gathered, four images per vector), and a 3×3/3 pool on 3×3 tiles of a 9 × 9 map.
#[test]
fn winograd_tiles_pooled_in_place() {
    let pool = |k| Some(Pool { max: true, k, stride: k, pad: 0, cover_all: true });
    for (hw, k, w) in [(8, 2, Winograd::M2), (8, 2, Winograd::M4), (12, 2, Winograd::M2), (4, 2, Winograd::M4), (9, 3, Winograd::M3)] {
        let p = conv(6, hw, 10, 3, 1, 1, 1, pool(k));
        let src = cnnc::diag::Source::new("case.model", p.source());
        let g = optimized(&cnnc::compile(&src).expect("compiles").0, 1);
        let lowering = Lowering { winograd: w, ..Lowering::new(Tier::Avx2) };
        let program = cnnc::kernel::program_with(&g, bind(&src, &g, Params::Generated(prng_param)), p.batch, lowering);
        let names: Vec<_> = program.launches.iter().map(|l| l.kernel.name.rsplit('.').next().unwrap_or_default()).collect();
        assert!(names.contains(&"winograd_out") && !names.contains(&"max_pool2d"), "{w:?} on {hw} × {hw}: {names:?}");
        // Rows of fewer than four tiles: the input gathered per tile, four tiles from anywhere in the batch at once.
        let m = [(Winograd::M2, 2), (Winograd::M3, 3), (Winograd::M4, 4)].into_iter().find(|c| c.0 == w).map_or(0, |c| c.1);
        assert_eq!(names.contains(&"winograd_patches"), hw.div_ceil(m) < 4, "{w:?} on {hw} × {hw}: {names:?}");
        p.check();
    }
}

/// Planes whose column matrix passes 256 KB, with weights that stay in L2: tasks own (column part,
/// channel blocks) and the last part takes the columns past the full tiles (1 past a multiple of 16 and
/// of 12, with a fused residual add; none, with ragged blocks; 9 past, a 3×3 through packed panels).
#[test]
fn columns_split_into_parts() {
    for (c, hw, out, k, add) in [(64, 47, 20, 1, true), (64, 48, 13, 1, false), (16, 45, 8, 3, false)] {
        let layer = Layer::Conv { out, k: [k, k], stride: 1, pad: k / 2, groups: 1, bias: true, relu: true, pool: None, add, dilate: 1 };
        let p = Problem { batch: 2, c, h: hw, w: hw, layer };
        let src = cnnc::diag::Source::new("case.model", p.source());
        let g = optimized(&cnnc::compile(&src).expect("compiles").0, 1);
        for tier in [Tier::Portable, Tier::Avx2] {
            let lowering = Lowering { winograd: Winograd::Never, ..Lowering::new(tier) };
            let program = cnnc::kernel::program_with(&g, bind(&src, &g, Params::Generated(prng_param)), p.batch, lowering);
            let gemm = program.launches.iter().find(|l| l.kernel.name.ends_with(".gemm")).expect("a GEMM launch");
            // Without parts the extent is one task per (image, channel block).
            assert!(gemm.kernel.extent > p.batch * out.div_ceil(tier.mr()), "{tier:?}: no column parts:\n{}", p.source());
        }
        p.check();
    }
}

/// Small planes whose pixels leave the AVX-512 tile's lanes idle are turned around (pixels as rows,
/// channels as columns: `pack_x`, the tiles on Yᵀ, `transpose`) where that pays for the copies: 1×1 on
/// 7 × 7 maps with a fused add, strided (13 × 13 to 7 × 7), a 3×3 (padded), and a 3×3 on 6 × 6 with an
/// add whose 250 channels are not whole vectors of the transpose; two images, whose pixels share
/// blocks. The same bytes as every tier; and the native transpose (whole items of 16 channels) the
/// bytes of its loops.
#[test]
fn turned_small_planes() {
    for (c, hw, out, k, stride, add) in [(256, 7, 64, 1, 1, true), (256, 13, 64, 1, 2, false), (64, 7, 256, 3, 1, false), (20, 6, 250, 3, 1, true)] {
        let layer = Layer::Conv { out, k: [k, k], stride, pad: k / 2, groups: 1, bias: true, relu: true, pool: None, add, dilate: 1 };
        let p = Problem { batch: 2, c, h: hw, w: hw, layer };
        let src = cnnc::diag::Source::new("case.model", p.source());
        let g = optimized(&cnnc::compile(&src).expect("compiles").0, 1);
        let lowering = Lowering { winograd: Winograd::Never, ..Lowering::new(Tier::Avx512) };
        let program = cnnc::kernel::program_with(&g, bind(&src, &g, Params::Generated(prng_param)), p.batch, lowering);
        let turned = program.launches.iter().any(|l| l.kernel.name.ends_with(".transpose"));
        assert!(turned, "not turned around:\n{}", p.source());
        p.check();
        // 16 channels per item: the native transpose (250 channels keep the loops).
        if Tier::Avx512.available() && out % 16 == 0 {
            let shape = [p.batch, c, hw, hw];
            let x = Tensor::new(shape.to_vec(), rng::normal("x", shape.iter().product()).map(|v| v as f32).collect()).unwrap();
            let program = || cnnc::kernel::program_with(&g, bind(&src, &g, Params::Generated(prng_param)), p.batch, lowering);
            native_calls_match_their_loops(program, &x, &p.source());
        }
    }
}

/// Runs `program()` as lowered (native calls) and with every call expanded into the portable loops
/// (`kernel::expand_calls`, as the cuda backend prints them), and requires the same bytes.
fn native_calls_match_their_loops(program: impl Fn() -> Program, x: &Tensor, what: &str) {
    let (native, mut expanded) = (program(), program());
    let mut calls = false;
    for l in &mut expanded.launches {
        Stmt::visit(&l.kernel.body, &mut |s| calls |= matches!(s, Stmt::Call(_)));
        l.kernel = cnnc::kernel::expand_calls(&l.kernel);
    }
    assert!(calls, "no native call:\n{what}");
    let [native, loops] = [native, expanded].map(|p| {
        let jit = cnnc::jit::compile(&p, cnnc::jit::Options { checked: true }).expect("compiles");
        let y = jit.exe.run(&[x], 3).expect("runs");
        assert_eq!(jit.violations(), vec![], "out-of-bounds accesses:\n{what}");
        y
    });
    assert!(bits(&native) == bits(&loops), "native calls are not their loops' bytes:\n{what}");
}

/// Grouped convolution with pooling fused into its kernel (AlexNet's conv2 in miniature).
#[test]
fn grouped_conv_with_fused_pool() {
    conv(4, 11, 6, 5, 1, 2, 2, Some(Pool { max: true, k: 3, stride: 2, pad: 0, cover_all: true })).check();
}

/// Stride larger than the kernel with padding (some im2col rows are all padding).
#[test]
fn stride_beyond_kernel_with_pad() {
    conv(2, 8, 5, 1, 3, 1, 1, None).check();
}

/// Enough columns for full 32-wide tiles plus a ragged edge, and batch 3 across (image, block) tasks.
#[test]
fn wide_plane_and_batch() {
    Problem {
        batch: 3,
        c: 3,
        h: 23,
        w: 23,
        layer: Layer::Conv { out: 16, k: [3, 3], stride: 1, pad: 1, groups: 1, bias: false, relu: false, pool: None, add: false, dilate: 1 },
    }
    .check();
}

/// A residual add (and ReLU) fused into each lowering of a convolution: direct over the input (1×1),
/// implicit or packed columns (3×3, stride 1 and 2, grouped), Winograd (3×3 stride 1, also forced), at
/// batch 1 and 3, with channel counts that leave ragged blocks.
#[test]
fn residual_add_in_every_lowering() {
    for (batch, c, hw, out, k, stride, pad, groups, relu) in [
        (1, 8, 9, 16, 1, 1, 0, 1, true),
        (3, 5, 11, 13, 3, 1, 1, 1, true),
        (2, 6, 12, 10, 3, 2, 1, 1, false),
        (1, 4, 10, 6, 3, 1, 1, 2, true),
        (3, 30, 6, 7, 3, 1, 1, 1, true),
    ] {
        let layer = Layer::Conv { out, k: [k, k], stride, pad, groups, bias: true, relu, pool: None, add: true, dilate: 1 };
        Problem { batch, c, h: hw, w: hw, layer }.check();
    }
}

/// Dilated convolutions (DeepLab's atrous 3×3, and one strided, grouped, rectangular) read their columns
/// through the packed panels in both tiers, with a fused pool and a fused add.
#[test]
fn dilated_convolutions() {
    let conv = |c, hw, out, k: [usize; 2], stride, pad, dilate, groups, pool, add| Problem {
        batch: 2,
        c,
        h: hw,
        w: hw + 1,
        layer: Layer::Conv { out, k, stride, pad, groups, bias: true, relu: true, pool, add, dilate },
    };
    conv(4, 12, 6, [3, 3], 1, 2, 2, 1, None, true).check();
    conv(4, 13, 6, [3, 2], 2, 1, 3, 2, Some(Pool { max: true, k: 2, stride: 2, pad: 0, cover_all: true }), false).check();
}

/// Linear layers: k not a multiple of 8 (scalar tail), odd output count, batch 3 (a block of two rows
/// and a remainder).
#[test]
fn linear_tails() {
    Problem { batch: 3, c: 3, h: 3, w: 3, layer: Layer::Linear { out: 7, relu: true } }.check();
    Problem { batch: 1, c: 4, h: 5, w: 5, layer: Layer::Linear { out: 12, relu: false } }.check();
}

/// Cover-all max pooling whose last window hangs over the edge, and average pooling with padding.
#[test]
fn pooling_edges() {
    Problem { batch: 1, c: 2, h: 6, w: 6, layer: Layer::Pool(Pool { max: true, k: 3, stride: 2, pad: 0, cover_all: true }) }.check();
    Problem { batch: 2, c: 3, h: 5, w: 7, layer: Layer::Pool(Pool { max: false, k: 3, stride: 2, pad: 1, cover_all: false }) }.check();
}

/// The assembled tiers pool rows of 8 outputs or more with a native routine (16- or 8-lane chunks, the
/// last overlapping; strides 1 and 2 in vectors, wider ones one output at a time), the portable tier
/// (and narrower rows) with the IR's loops: every tier gives the same bytes, zeros of both signs
/// included (which zero a max keeps depends on the order of its operands); a NaN stays a NaN.
#[test]
fn native_pooling_gives_the_loops_bytes() {
    for (c, h, w) in [(3, 20, 37), (2, 9, 16), (2, 5, 3)] {
        let shape = [2, c, h, w];
        let mut data: Vec<f32> = rng::normal("x", shape.iter().product()).map(|v| v as f32).collect();
        for (i, v) in data.iter_mut().enumerate() {
            match i % 11 {
                3 => *v = 0.0,
                7 => *v = -0.0,
                _ => {}
            }
        }
        data[5] = f32::NAN;
        let x = Tensor::new(shape.to_vec(), data).unwrap();
        let (mut checked, mut native) = (0, 0);
        for (max, k, stride, pad, cover_all) in pools_to_check() {
            let p = Pool { max, k, stride, pad, cover_all };
            let problem = Problem { batch: 2, c, h, w, layer: Layer::Pool(p) };
            let src = cnnc::diag::Source::new("case.model", problem.source());
            // A window larger than the padded plane (4×4 on 3 columns) is the compiler's error to report.
            let Ok((g, _)) = cnnc::compile(&src) else {
                assert!(k > w.min(h) + 2 * pad, "does not compile:\n{}", problem.source());
                continue;
            };
            checked += 1;
            let g = optimized(&g, 1);
            let runs: Vec<(Tier, Tensor)> = tiers()
                .into_iter()
                .map(|tier| {
                    let program = cnnc::kernel::program(&g, bind(&src, &g, Params::Generated(prng_param)), 2, tier);
                    let jit = cnnc::jit::compile(&program, cnnc::jit::Options { checked: true }).expect("compiles");
                    let got = jit.exe.run(&[&x], 3).expect("runs");
                    assert_eq!(jit.violations(), vec![], "out-of-bounds accesses: {tier:?}\n{}", problem.source());
                    for l in &program.launches {
                        Stmt::visit(&l.kernel.body, &mut |s| native += usize::from(matches!(s, Stmt::Call(_))));
                    }
                    (tier, got)
                })
                .collect();
            let (first, want) = &runs[0];
            for (tier, got) in &runs[1..] {
                for (i, (a, b)) in got.data().iter().zip(want.data()).enumerate() {
                    let same = if b.is_nan() { a.is_nan() } else { a.to_bits() == b.to_bits() };
                    assert!(same, "{tier:?} against {first:?}: element {i} is {a}, not {b}\n{}", problem.source());
                }
            }
        }
        assert!(checked >= pools_to_check().len() / 2, "{checked} pools compiled on {h} × {w}");
        // Planes with rows of 8 outputs or more take the native routine wherever an assembled tier runs.
        if w >= 16 && tiers().iter().any(|t| t.assembled()) {
            assert!(native > 0, "no native pooling call on {h} × {w}");
        }
    }
}

/// (max, kernel, stride, pad, cover_all) over the pools [`native_pooling_gives_the_loops_bytes`] checks.
fn pools_to_check() -> Vec<(bool, usize, usize, usize, bool)> {
    let mut all = vec![];
    for max in [true, false] {
        for (k, pad) in [(2, 0), (3, 0), (3, 1), (4, 1)] {
            for stride in 1..=3 {
                for cover_all in [false, true] {
                    all.push((max, k, stride, pad, cover_all));
                }
            }
        }
    }
    all
}

/// Linear layers above batch 1 run as GEMM tiles over packed samples and weight panels: ragged feature
/// tiles (14 and 3 features), sample blocks past MR (37 = 3 × 12 + 1 = 6 × 6 + 1), and batch 2.
#[test]
fn linear_as_gemm_at_larger_batches() {
    Problem { batch: 9, c: 5, h: 3, w: 3, layer: Layer::Linear { out: 14, relu: true } }.check();
    Problem { batch: 37, c: 2, h: 2, w: 3, layer: Layer::Linear { out: 3, relu: false } }.check();
    Problem { batch: 2, c: 3, h: 3, w: 3, layer: Layer::Linear { out: 33, relu: true } }.check();
}

/// `--weights-dtype bf16`: linear layers give the bytes of f32 weights rounded to bfloat16 beforehand,
/// in both tiers, at batch 1 (the GEMV widens stored pairs: k = 75 leaves a scalar tail, 12 features
/// take blocks of four, 7 of one) and above (the GEMM tiles read the rounded values).
#[test]
fn bf16_linear_weights_are_f32_weights_rounded() {
    let text =
        "model T {\n    a = L.Linear(75, 12)\n    b = L.Linear(12, 7)\n    forward(x: [3, 5, 5]) {\n        return self.b(F.relu(self.a(x)))\n    }\n}\n";
    let src = cnnc::diag::Source::new("t.model", text);
    let g = optimized(&cnnc::compile(&src).expect("compiles").0, 1);
    let rounded = || {
        let mut b = bind(&src, &g, Params::Generated(prng_param));
        for (spec, t) in b.params.iter_mut().filter(|(s, _)| s.key.ends_with("/W")) {
            *t = Tensor::new(spec.shape.clone(), t.data().iter().map(|&v| WeightsDtype::Bf16.round(v)).collect()).unwrap();
        }
        b
    };
    for batch in [1, 3] {
        let x = Tensor::new(vec![batch, 3, 5, 5], rng::normal("x", batch * 75).map(|v| v as f32).collect()).unwrap();
        for tier in tiers() {
            let run = |p: Program| cnnc::jit::compile(&p, cnnc::jit::Options { checked: true }).expect("compiles").exe.run(&[&x], 2).expect("runs");
            let bf16 = run(cnnc::kernel::program_with(
                &g,
                bind(&src, &g, Params::Generated(prng_param)),
                batch,
                Lowering { fc_weights: WeightsDtype::Bf16, ..Lowering::new(tier) },
            ));
            let want = run(cnnc::kernel::program(&g, rounded(), batch, tier));
            assert!(bits(&bf16) == bits(&want), "batch {batch}, {tier:?}: {bf16:?} vs {want:?}");
            let f32_out = run(cnnc::kernel::program(&g, bind(&src, &g, Params::Generated(prng_param)), batch, tier));
            assert!(bits(&bf16) != bits(&f32_out), "the weights were not rounded");
        }
    }
}

/// Packed weights over 1 MiB, stride 2 and no pool (so no implicit columns): the AVX-512 tier uses a
/// shared im2col and splits tasks by channel blocks instead of packing panels per column tile. (With
/// a pool the portable tier fuses it per block chunk in the same launch: `implicit_columns_with_a_pitch`.)
#[test]
fn large_weights_split_by_channel_blocks() {
    let p = conv(256, 17, 128, 3, 2, 1, 1, None);
    assert!(!p.uses_implicit_columns());
    p.check();
}

/// Implicit columns over the whole phased input, for convolutions followed by a pool that masked rows
/// cannot serve: the output takes the input's row pitch and the fused pool skips the extra columns.
/// AlexNet's conv1 in miniature (11×11, stride 4: pitch 8 for 6 columns), a stride-2 grouped
/// convolution with padding, and a stride-1 unpadded one (input wider than output).
#[test]
fn implicit_columns_with_a_pitch() {
    let pool = Some(Pool { max: true, k: 3, stride: 2, pad: 0, cover_all: true });
    check_in_place([
        Problem {
            batch: 2,
            c: 3,
            h: 31,
            w: 31,
            layer: Layer::Conv { out: 14, k: [11, 11], stride: 4, pad: 0, groups: 1, bias: true, relu: true, pool, add: false, dilate: 1 },
        },
        conv(256, 17, 128, 3, 2, 1, 2, pool),
        conv(5, 12, 7, 3, 1, 0, 1, pool),
    ]);
}

/// Implicit columns (AVX-512 tier, stride-1 convolutions): a 3×2 kernel with k = 30·6 = 180, so the
/// second slice of k starts mid-channel (tap row 64, kernel row 1), and 24 channels (with 13, its 7 × 10
/// maps would be turned around); padding wider than the kernel needs
/// (output wider than input) with a fused pool; a 1×1 kernel with padding; groups.
#[test]
fn implicit_columns() {
    check_in_place([
        Problem {
            batch: 2,
            c: 30,
            h: 7,
            w: 9,
            layer: Layer::Conv { out: 24, k: [3, 2], stride: 1, pad: 1, groups: 1, bias: true, relu: true, pool: None, add: false, dilate: 1 },
        },
        conv(3, 6, 5, 3, 1, 2, 1, Some(Pool { max: true, k: 3, stride: 2, pad: 0, cover_all: true })),
        Problem {
            batch: 1,
            c: 2,
            h: 5,
            w: 6,
            layer: Layer::Conv { out: 3, k: [1, 1], stride: 1, pad: 1, groups: 1, bias: false, relu: false, pool: None, add: false, dilate: 1 },
        },
        conv(4, 13, 26, 5, 1, 2, 2, None),
    ]);
}

/// Checks each problem (in the tiers this CPU runs) after asserting that the AVX-512 tier's lowering
/// reads its columns in place (lowering needs no AVX-512 CPU).
fn check_in_place(cases: impl IntoIterator<Item = Problem>) {
    for p in cases {
        assert!(p.uses_implicit_columns(), "{}", p.source());
        p.check();
    }
}

/// A max pool whose row maxima would not fit the separable form's stack buffer takes the direct form.
#[test]
fn max_pool_of_a_large_plane() {
    Problem { batch: 1, c: 1, h: 130, w: 260, layer: Layer::Pool(Pool { max: true, k: 3, stride: 1, pad: 1, cover_all: true }) }.check();
}

/// Winograd F(4×4, 3×3) with partial tiles at the bottom and right (11 × 11 outputs: tiles of 4, 4, 3),
/// tiles in vector groups of four plus a scalar remainder (three tiles per row), batch 3, bias, ReLU and
/// a fused max pool; and without padding (9 × 9 → 7 × 7).
#[test]
fn winograd_edge_tiles() {
    conv(6, 11, 13, 3, 1, 1, 1, Some(Pool { max: true, k: 3, stride: 2, pad: 0, cover_all: true })).check();
    Problem {
        batch: 3,
        c: 5,
        h: 9,
        w: 9,
        layer: Layer::Conv { out: 7, k: [3, 3], stride: 1, pad: 0, groups: 1, bias: false, relu: false, pool: None, add: false, dilate: 1 },
    }
    .check();
}

/// Winograd F(2×2, 5×5) and F(3×3, 5×5) (AlexNet's conv2 in miniature: pad 2, a fused 3×3/2 max pool; 13 × 13 outputs in
/// tiles of 2 or 3 with a partial last one), and without padding (9 × 9 → 5 × 5), at batch 3.
#[test]
fn winograd_five_by_five() {
    conv(5, 13, 9, 5, 1, 2, 1, Some(Pool { max: true, k: 3, stride: 2, pad: 0, cover_all: true })).check();
    Problem {
        batch: 3,
        c: 4,
        h: 9,
        w: 9,
        layer: Layer::Conv { out: 6, k: [5, 5], stride: 1, pad: 0, groups: 1, bias: true, relu: false, pool: None, add: false, dilate: 1 },
    }
    .check();
}

/// Winograd over a batch in chunks of images (M past 4 MiB): as F(2×2, 3×3) one image per chunk (three
/// chunks), as F(3×3, 3×3) two and then one, as F(4×4, 3×3) all three in one pass.
#[test]
fn winograd_in_chunks_of_images() {
    let p = Problem {
        batch: 3,
        c: 4,
        h: 46,
        w: 46,
        layer: Layer::Conv { out: 64, k: [3, 3], stride: 1, pad: 1, groups: 1, bias: true, relu: true, pool: None, add: false, dilate: 1 },
    };
    let src = cnnc::diag::Source::new("case.model", p.source());
    let g = optimized(&cnnc::compile(&src).expect("compiles").0, 1);
    let chunks = |w| {
        let lowering = Lowering { winograd: w, ..Lowering::new(Tier::Portable) };
        let program = cnnc::kernel::program_with(&g, bind(&src, &g, Params::Generated(prng_param)), p.batch, lowering);
        program.launches.iter().filter(|l| l.kernel.name.contains(".winograd_in")).count()
    };
    assert_eq!([chunks(Winograd::M2), chunks(Winograd::M3), chunks(Winograd::M4)], [3, 2, 1]);
    p.check();
}

/// Large enough that the cost model picks Winograd by itself (AlexNet's conv4 shape at batch 8): 384
/// products per output, where the transforms' roundings are largest (1.2e-5 measured).
#[test]
fn winograd_chosen_for_alexnet_conv4_at_batch_8() {
    let p = Problem {
        batch: 8,
        c: 384,
        h: 13,
        w: 13,
        layer: Layer::Conv { out: 384, k: [3, 3], stride: 1, pad: 1, groups: 1, bias: true, relu: true, pool: None, add: false, dilate: 1 },
    };
    assert!(p.auto_takes_winograd());
    p.check();
}

/// Two stride-2 1×1 convolutions of one tensor share its subsampled copy; after an in-place ReLU has
/// written over that tensor's store, the second convolution must take a copy of its own (unoptimized:
/// the optimizer would fuse the ReLU into a second copy of `c0` instead).
#[test]
fn strided_one_by_one_convolutions_share_a_subsample_only_while_it_is_current() {
    for (second, copies) in [("h", 1), ("F.relu(h)", 2)] {
        let text = format!(
            "model Shared {{\n    c0 = L.Convolution2D(4, 6, 3, pad=1)\n    c1 = L.Convolution2D(6, 5, 1, stride=2)\n    c2 = L.Convolution2D(6, 5, 1, stride=2)\n\n    forward(x: [4, 9, 9]) {{\n        h = self.c0(x)\n        return self.c1(h) + self.c2({second})\n    }}\n}}\n"
        );
        let src = cnnc::diag::Source::new("shared.model", text);
        let g = optimized(&cnnc::compile(&src).expect("compiles").0, 0);
        let x = Tensor::new(vec![2, 4, 9, 9], rng::normal("x", 2 * 4 * 81).map(|v| v as f32).collect()).unwrap();
        let want = run_graph(&src, &g, Params::Generated(prng_param), x.clone());
        for tier in tiers() {
            let program = cnnc::kernel::program(&g, bind(&src, &g, Params::Generated(prng_param)), 2, tier);
            assert_eq!(program.launches.iter().filter(|l| l.kernel.name.ends_with(".subsample")).count(), copies, "{second}");
            let got = cnnc::jit::compile(&program, cnnc::jit::Options { checked: true }).expect("compiles").exe.run(&[&x], 2).expect("runs");
            assert_close(&got, &want, 1e-5, &format!("{tier:?}, {second}"));
        }
    }
}

/// A NaN (an overflow upstream) survives max pooling and ReLU as numpy's `maximum` keeps it: wherever
/// the reference has a NaN the JIT has one, at the start, middle and end of windows and rows, in
/// clipped and interior windows, whichever operand of a comparison it is.
#[test]
fn nan_survives_max_pooling_and_relu() {
    let shape = [1usize, 2, 7, 9];
    let mut data: Vec<f32> = rng::normal("nan", shape.iter().product()).map(|v| v as f32).collect();
    for at in [0, 3 * 9 + 4, 2 * 9 + 8, 63 + 6 * 9 + 8, 63 + 2 * 9, 63 + 4 * 9 + 3] {
        data[at] = f32::NAN;
    }
    let x = Tensor::new(shape.to_vec(), data).unwrap();
    for body in ["F.max_pooling_2d(x, 3, stride=1, pad=1)", "F.max_pooling_2d(x, 3, stride=2)", "F.max_pooling_2d(x, 2, stride=1)", "F.relu(x)"] {
        let src = cnnc::diag::Source::new("case.model", format!("model Case {{\n    forward(x: [2, 7, 9]) {{\n        return {body}\n    }}\n}}\n"));
        let (g, _) = cnnc::compile(&src).unwrap_or_else(|f| panic!("{}", src.render_plain(&f.0)));
        let want = run_graph(&src, &g, Params::Generated(prng_param), x.clone());
        let got = jit_graph(&src, &g, Params::Generated(prng_param), &x);
        assert!(want.data().iter().any(|v| v.is_nan()), "{body}: no NaN to check");
        for (i, (a, b)) in got.data().iter().zip(want.data()).enumerate() {
            assert!(a.is_nan() == b.is_nan() && (a.is_nan() || a == b), "{body}: element {i} is {a}, the reference's {b}");
        }
    }
}

/// ResNet's conv1 in miniature: a 7×7 stride-2 convolution over a padded 30 × 30 input, whose two
/// column phases are split four columns at a time (deinterleaved vectors between scalar edges), then
/// the 3×3 stride-2 max pool that takes four outputs from two vectors' even lanes.
#[test]
fn stride_two_phases_and_pool_in_vectors() {
    for w in [30, 33] {
        Problem {
            batch: 2,
            c: 3,
            h: 30,
            w,
            layer: Layer::Conv {
                out: 8,
                k: [7, 7],
                stride: 2,
                pad: 3,
                groups: 1,
                bias: true,
                relu: true,
                pool: Some(Pool { max: true, k: 3, stride: 2, pad: 0, cover_all: true }),
                add: false,
                dilate: 1,
            },
        }
        .check();
    }
}
