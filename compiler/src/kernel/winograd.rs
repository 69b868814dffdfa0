//! Winograd F(4×4, 3×3) for stride-1, ungrouped 3×3 convolutions (Lavin & Gray, "Fast Algorithms for
//! Convolutional Neural Networks", 2016): each 4×4 output tile costs 36 multiplies per (input, output)
//! channel pair instead of 144.
//!
//! For tile t of image i, with d the 6×6 input patch at (4·ty − pad, 4·tx − pad) and g a 3×3 filter:
//!   y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A + bias
//! and the ⊙ summed over input channels is, for each of the 36 positions ξ, a GEMM
//!   M[ξ][o][t] = Σ_c U[ξ][o][c] · V[ξ][c][t],   U = G g Gᵀ (weights, transformed at compile time in f64),
//! which is exactly a 36-group 1×1 convolution over V — so it runs on the same GEMM tiles, in either
//! tier, with the same per-element order of roundings in both. Four launches: pad the input
//! ([`ops::phase_split`]), transform the input tiles (`winograd_in`), the GEMMs, transform back with bias
//! and ReLU (`winograd_out`); max pooling, when fused, is a fifth.
//!
//! Accuracy: the transforms add roundings (entries up to 8 in Aᵀ, 5 in Bᵀ). Against the reference
//! interpreter, relative to the output's largest magnitude: up to 1.2e-5 on 384-channel layers with
//! random weights, ~4e-7 on small ones (`tests/jit.rs` holds Winograd lowerings to 5e-5, the rest to
//! 1e-5); AlexBN's logits at batch 8 stay 3.7e-6 from ONNX Runtime, inside the 1e-4 held against Chainer.

use super::ops::{self, Node, Tables};
use super::{e, Access, Expr, Kb};
use cnnc_runtime::op::{Conv2d, Pool2d};
use cnnc_runtime::{Op, Tensor};

/// Output tile edge (m) and input tile edge (α = m + r − 1).
const M: usize = 4;
const A: usize = 6;

/// Bᵀ: input transform.
const BT: [[f64; A]; A] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];
/// G: filter transform.
const G: [[f64; 3]; A] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];
/// Aᵀ: output transform.
const AT: [[f64; A]; M] = [[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 2.0, -2.0, 0.0], [0.0, 1.0, 1.0, 4.0, 4.0, 0.0], [0.0, 1.0, -1.0, 8.0, -8.0, 1.0]];

/// The price the cost model puts on transforming one input tile (with its share of the padding copy)
/// and one output tile, in units of one 16-lane FMA instruction of the GEMM tiles. Measured on
/// AlexNet's conv4 at batch 8, 2 threads: 49 K tiles each way took 3.3 ms in and 1.5 ms out, where one
/// tile instruction took 0.17 ms per million.
const IN_COST: f64 = 350.0;
const OUT_COST: f64 = 225.0;

/// When convolutions take F(4×4, 3×3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Winograd {
    /// Where the cost model ([`worthwhile`]) expects fewer instructions.
    #[default]
    Auto,
    /// Every stride-1, ungrouped 3×3 convolution.
    Always,
    /// None.
    Never,
}

/// Whether convolution `c` (at `batch`, output [oh, ow]) is lowered as F(4×4, 3×3).
pub fn chosen(w: Winograd, c: &Conv2d, batch: usize, out: [usize; 2]) -> bool {
    let applicable = c.kernel == [3, 3] && c.stride == [1, 1] && c.groups == 1;
    match w {
        Winograd::Auto => applicable && worthwhile(c, batch, out),
        Winograd::Always => applicable,
        Winograd::Never => false,
    }
}

/// Whether F(4×4, 3×3) should replace the direct convolution: stride 1, 3×3, ungrouped, and fewer
/// tile instructions including the transforms. Columns are counted in the AVX-512 tile's width (32)
/// whatever the tier, so both tiers choose alike and stay bitwise equal. The GEMM columns are the
/// batch's tiles, so a small feature map at batch 1 (AlexNet's 13×13: 16 tiles, half a tile of
/// columns) gains less than a batch of 8. (Counting the 16 columns as the one-vector tile's 16 would
/// take Winograd at batch 1, but there the GEMM streams weights 4× larger than the direct ones for
/// only 16 columns: AlexNet's conv4 took 2.7 ms against 2.8 direct, measured; the count stays 32.)
fn worthwhile(c: &Conv2d, batch: usize, [oh, ow]: [usize; 2]) -> bool {
    let cols = |n: usize| n.next_multiple_of(32) as f64;
    let (ci, co) = (c.in_channels as f64, c.out_channels as f64);
    let tiles = batch * oh.div_ceil(M) * ow.div_ceil(M);
    let direct = batch as f64 * cols(oh * ow) * 9.0 * ci * co / 16.0;
    let winograd = 36.0 * cols(tiles) * ci * co / 16.0 + tiles as f64 * (ci * IN_COST + co * OUT_COST);
    // The margin covers what the count leaves out: three more launches and the M round trip.
    winograd < 0.8 * direct
}

/// Elements from one of the 36 planes of V or M to the next: at least `len`, and 64 bytes past a
/// multiple of 4 KiB. A transform touches one line of each of the 36 planes at a time; planes a multiple
/// of 4 KiB apart (AlexNet's: 384 channels × 16 or 128 columns) all fall in one set of the L1 cache,
/// whose 8–12 ways then miss on every access: conv4's input transform at batch 8 took 3.7 ms with
/// them, 1.9 ms with this pitch, measured.
fn plane_pitch(len: usize) -> usize {
    let p = (len + 1024 - 16).next_multiple_of(1024) + 16;
    p - if p - len >= 1024 { 1024 } else { 0 }
}

/// `Σ coef[i] · v[i]` over the nonzero coefficients, left to right, with ±1 as plain adds; on 4-lane
/// vectors when `vec`.
fn lin(coef: &[f64], v: &[Expr], vec: bool) -> Expr {
    let mut acc: Option<Expr> = None;
    for (&c, x) in coef.iter().zip(v) {
        if c == 0.0 {
            continue;
        }
        acc = Some(match (acc.take(), c) {
            (None, 1.0) => x.clone(),
            (None, c) => x.clone() * e(c as f32).lanes(vec),
            (Some(a), 1.0) => a + x.clone(),
            (Some(a), -1.0) => a - x.clone(),
            (Some(a), c) => x.clone().fma(e(c as f32).lanes(vec), a),
        });
    }
    acc.expect("a transform row has a nonzero coefficient")
}

/// `X ↦ L X Lᵀ` for an R × 6 matrix L and a 6 × 6 X (row-major values), each entry bound once.
fn sandwich<const R: usize>(kb: &mut Kb, l: &[[f64; A]; R], x: &[Expr], vec: bool) -> Vec<Expr> {
    let mut lx = Vec::with_capacity(R * A);
    for row in l {
        for j in 0..A {
            let col: Vec<Expr> = (0..A).map(|k| x[k * A + j].clone()).collect();
            lx.push(kb.let_(lin(row, &col, vec)));
        }
    }
    let mut out = Vec::with_capacity(R * R);
    for i in 0..R {
        for row in l {
            out.push(kb.let_(lin(row, &lx[i * A..(i + 1) * A], vec)));
        }
    }
    out
}

/// Lowers the convolution `n` (which [`worthwhile`] accepted) as F(4×4, 3×3).
pub fn lower(t: &mut Tables, n: &Node, c: &Conv2d, relu: bool, pool_after: Option<&Pool2d>, [oh, ow]: [usize; 2]) {
    let (ci, co, batch) = (c.in_channels, c.out_channels, n.batch);
    let (th, tw) = (oh.div_ceil(M), ow.div_ceil(M));
    let per_image = th * tw;
    let cols = batch * per_image;
    let name = |s: &str| format!("{}.{s}", n.name);
    // U[ξ][o][c] as the weights of a 36-group 1×1 convolution, (36·co, ci, 1, 1).
    let w = n.params[0].data();
    let mut u = vec![0.0f32; A * A * co * ci];
    for o in 0..co {
        for ch in 0..ci {
            let g = &w[(o * ci + ch) * 9..][..9];
            for (xi, yi) in (0..A).flat_map(|xi| (0..A).map(move |yi| (xi, yi))) {
                let mut s = 0.0f64;
                for (a, b) in (0..3).flat_map(|a| (0..3).map(move |b| (a, b))) {
                    s += G[xi][a] * g[a * 3 + b] as f64 * G[yi][b];
                }
                u[((xi * A + yi) * co + o) * ci + ch] = s as f32;
            }
        }
    }
    // The input, zero-padded to whole tiles (rows and columns up to 4·tiles + 2) and split into four
    // column phases, xq[..][x % 4][y][x / 4]: element (i, j) of tiles tx..tx + 3 is then one 4-lane
    // vector, and the transforms run on four horizontally adjacent tiles at once.
    let split = Conv2d { stride: [1, M], ..c.clone() };
    let (xq, ph) = ops::phase_split(t, n, &split, [th * M + 2, tw + 1]);
    let (hq, wq) = (ph.hq, ph.wq);
    // V[ξ][c][image·tiles + t], plane ξ at ξ·pv.
    let (pv, pm) = (plane_pitch(ci * cols), plane_pitch(co * cols));
    let v = t.store(A * A * pv);
    let mut kb = Kb::new(name("winograd_in"), batch * ci);
    let (xb, vb) = (kb.buf("x", ph.len(batch, ci), Access::Read), kb.buf("V", A * A * pv, Access::Write));
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, plane| {
        let (img, ch) = (kb.let_(plane.clone() / ci), kb.let_(plane.clone() % ci));
        kb.for_(0usize, th, |kb, ty| {
            let row = kb.let_(plane.clone() * (M * hq * wq) + ty.clone() * (M * wq));
            let col0 = kb.let_(img.clone() * per_image + ty * tw);
            ops::vector_loop(kb, e(0i64), e(tw), |kb, tx, vec| {
                let d: Vec<Expr> = (0..A * A)
                    .map(|i| {
                        let at = row.clone() + ((i % A % M) * hq * wq + i / A * wq + i % A / M) + tx.clone();
                        kb.let_(xb.load(at, vec))
                    })
                    .collect();
                for (xi, val) in sandwich(kb, &BT, &d, vec).into_iter().enumerate() {
                    kb.store(vb, e(xi * pv) + ch.clone() * cols + col0.clone() + tx.clone(), val);
                }
            });
        });
    });
    t.launch(kb.finish(), vec![xq, v], 0);
    // M = the 36 GEMMs, as one image of 36 groups over a (36·ci) × cols × 1 map.
    let m = t.store(A * A * pm);
    let gemm = Conv2d { in_channels: A * A * ci, out_channels: A * A * co, kernel: [1, 1], stride: [1, 1], pad: [0, 0], groups: A * A, bias: false };
    let (in_shape, out_shape) = ([A * A * ci, cols, 1], [A * A * co, cols, 1]);
    let u = Tensor::new(vec![A * A * co, ci, 1, 1], u).expect("sized");
    let op = Op::Conv2d(gemm.clone());
    let node = Node { name: n.name, op: &op, batch: 1, ins: vec![(v, &in_shape)], out: (m, &out_shape), params: vec![u], group_pitch: Some([pv, pm]) };
    ops::conv(t, &node, &gemm, false, None);
    // y = Aᵀ M A + bias, then ReLU, stored where the tile lies inside the output.
    let conv_len = batch * co * oh * ow;
    let y = if pool_after.is_some() { t.store(conv_len) } else { n.out.0 };
    let bias = t.param(n.params.get(1).map_or(vec![0.0; co], |b| b.data().to_vec()));
    let mut kb = Kb::new(name("winograd_out"), batch * co);
    let (mb, bb, yb) = (kb.buf("M", A * A * pm, Access::Read), kb.buf("bias", co, Access::Read), kb.buf("y", conv_len, Access::Write));
    // Four tiles' outputs as 16 vectors, [r][s][tile], reread as scalars to store them in place.
    let tmp = kb.buf("tiles", M * M * super::LANES, Access::Local);
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, plane| {
        let (img, o) = (kb.let_(plane.clone() / co), kb.let_(plane.clone() % co));
        let b = kb.let_(bb.at(o.clone()));
        kb.for_(0usize, th, |kb, ty| {
            let rows = kb.let_((e(oh) - ty.clone() * M).min(M));
            let col0 = kb.let_(img.clone() * per_image + ty.clone() * tw);
            let at0 = kb.let_((plane.clone() * oh + ty * M) * ow);
            ops::vector_loop(kb, e(0i64), e(tw), |kb, tx, vec| {
                let mv: Vec<Expr> = (0..A * A)
                    .map(|xi| {
                        let at = e(xi * pm) + o.clone() * cols + col0.clone() + tx.clone();
                        kb.let_(mb.load(at, vec))
                    })
                    .collect();
                let out = sandwich(kb, &AT, &mv, vec);
                // Output columns of these tiles still inside the row (more than 4·4 when not the last).
                let width = kb.let_(e(ow) - tx.clone() * M);
                let at = kb.let_(at0.clone() + tx.clone() * M);
                let tiles = if vec { super::LANES } else { 1 };
                for (i, val) in out.into_iter().enumerate() {
                    let val = val + b.clone().lanes(vec);
                    let val = if relu { val.max(e(0.0f32).lanes(vec)) } else { val };
                    kb.store(tmp, e(i * tiles), val);
                }
                // y[at + r·ow + 4u + s] = tile u's (r, s), where inside the output.
                let scatter = |kb: &mut Kb, checked: bool| {
                    for r in 0..M {
                        let row = |kb: &mut Kb| {
                            for (u, s) in (0..tiles).flat_map(|u| (0..M).map(move |s| (u, s))) {
                                let v = tmp.at(e((r * M + s) * tiles + u));
                                let q = u * M + s;
                                let st = |kb: &mut Kb| kb.store(yb, at.clone() + (r * ow + q), v.clone());
                                if checked && q > 0 {
                                    kb.if_(e(q).lt(width.clone()), st)
                                } else {
                                    st(kb)
                                }
                            }
                        };
                        if checked && r > 0 {
                            kb.if_(e(r).lt(rows.clone()), row)
                        } else {
                            row(kb)
                        }
                    }
                };
                kb.if_else(rows.clone().eq(M).and(e(tiles * M).le(width.clone())), |kb| scatter(kb, false), |kb| scatter(kb, true));
            });
        });
    });
    t.launch(kb.finish(), vec![m, bias, y], 0);
    if let Some(p) = pool_after {
        ops::pool_launch(t, n, p, y, [oh, ow]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(ci: usize, co: usize, k: usize, stride: usize, groups: usize) -> Conv2d {
        Conv2d { in_channels: ci, out_channels: co, kernel: [k, k], stride: [stride, stride], pad: [1, 1], groups, bias: true }
    }

    #[test]
    fn the_cost_model_takes_winograd_where_the_tiles_fill() {
        let conv4 = conv(384, 384, 3, 1, 1);
        // AlexNet's 13 × 13 conv4: 16 tiles fill half a 32-column tile at batch 1, four at batch 8.
        assert!(!chosen(Winograd::Auto, &conv4, 1, [13, 13]));
        assert!(chosen(Winograd::Auto, &conv4, 8, [13, 13]));
        // Few channels: the transforms cost more than the multiplies saved.
        assert!(!chosen(Winograd::Auto, &conv(8, 8, 3, 1, 1), 8, [56, 56]));
        // Not applicable, whatever is asked.
        for c in [conv(384, 384, 5, 1, 1), conv(384, 384, 3, 2, 1), conv(384, 384, 3, 1, 2)] {
            assert!(!chosen(Winograd::Always, &c, 8, [13, 13]));
        }
        assert!(chosen(Winograd::Always, &conv(8, 8, 3, 1, 1), 1, [5, 5]));
        assert!(!chosen(Winograd::Never, &conv4, 8, [13, 13]));
    }

    #[test]
    fn the_transform_matrices_compute_a_correlation() {
        // For a 1-D signal d (6) and filter g (3): Aᵀ [(G g) ⊙ (Bᵀ d)] = the 4 outputs of g sliding on d.
        let (d, g) = ([0.3, -1.2, 2.5, 0.7, -0.4, 1.9], [0.5, -0.25, 2.0]);
        let gg: Vec<f64> = G.iter().map(|r| r.iter().zip(&g).map(|(a, b)| a * b).sum()).collect();
        let bd: Vec<f64> = BT.iter().map(|r| r.iter().zip(&d).map(|(a, b)| a * b).sum()).collect();
        for (i, row) in AT.iter().enumerate() {
            let y: f64 = row.iter().zip(gg.iter().zip(&bd)).map(|(a, (u, v))| a * u * v).sum();
            let want: f64 = (0..3).map(|k| g[k] * d[i + k]).sum();
            assert!((y - want).abs() < 1e-12, "output {i}: {y} vs {want}");
        }
    }
}
