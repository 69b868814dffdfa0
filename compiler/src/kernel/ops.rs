//! Op → kernels. Each op becomes one or two launches over arena tensors and packed parameters.
//!
//! Convolution is im2col (skipped for 1×1 stride-1 unpadded convolutions, whose input already is the
//! column matrix) followed by a GEMM whose register-blocked microkernel ([`micro`]) keeps an MR×NR tile
//! of the output in 12 vector registers; bias, ReLU and max pooling are applied by the same launch
//! before anything leaves the task. Per output element the arithmetic is fixed — bias, then one FMA
//! per k in (channel, ky, kx) order — whatever the tile, thread count or batch, so results are bitwise
//! identical across them.

use super::{e, Access, Buf, Expr, Gemm, Kb, Kernel, Tier, LANES};
use cnnc_runtime::op::{Conv2d, FusedBase, Linear, Pool2d};
use cnnc_runtime::{Op, Tensor};

/// Output-channel blocks one task runs against the same column tile before moving on, so the tile
/// (K × 12 floats, strided) is read from L1/L2 eight times per trip from memory; 8 blocks of packed
/// weights (8 × K × 16 B, 150 KB at K = 2400) stay in the 2 MB L2.
const MCB: usize = 8;
/// Elements per parallel iteration of element-wise kernels: large enough to amortize the loop, small
/// enough that two tasks get equal shares of a 55×55 feature map.
const CHUNK: usize = 4096;

/// A tensor a launch reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ref {
    /// An arena tensor (activation or scratch), by store number.
    Store(usize),
    /// A packed parameter, by number.
    Param(usize),
}

/// What lowering collects: stores (lengths), parameters (packed data), launches.
pub struct Tables {
    pub tier: Tier,
    pub stores: Vec<usize>,
    pub params: Vec<Vec<f32>>,
    pub launches: Vec<(Kernel, Vec<Ref>, u64)>,
}

impl Tables {
    pub fn store(&mut self, len: usize) -> Ref {
        self.stores.push(len);
        Ref::Store(self.stores.len() - 1)
    }
    fn param(&mut self, data: Vec<f32>) -> Ref {
        self.params.push(data);
        Ref::Param(self.params.len() - 1)
    }
    fn launch(&mut self, k: Kernel, refs: Vec<Ref>, flops: u64) {
        self.launches.push((k, refs, flops));
    }
}

/// One node to lower: its op, activations (with per-sample shapes), output, bound parameters.
pub struct Node<'a> {
    pub name: &'a str,
    pub op: &'a Op,
    pub batch: usize,
    pub ins: Vec<(Ref, &'a [usize])>,
    pub out: (Ref, &'a [usize]),
    pub params: Vec<Tensor>,
}

impl Node<'_> {
    fn in_len(&self, i: usize) -> usize {
        self.batch * self.ins[i].1.iter().product::<usize>()
    }
    fn out_len(&self) -> usize {
        self.batch * self.out.1.iter().product::<usize>()
    }
}

/// Appends the launches that compute `n` (aliasing ops — reshape, dropout — have none).
pub fn lower(t: &mut Tables, n: &Node) {
    let name = |suffix: &str| format!("{}.{suffix}", n.name);
    let (x, y) = (n.ins[0].0, n.out.0);
    match n.op {
        Op::Reshape { .. } | Op::Dropout { .. } => {}
        Op::Relu => map(t, &name("relu"), n.out_len(), &[x], y, |[v]| v.max(e(0.0f32).splat())),
        Op::Add => map(t, &name("add"), n.out_len(), &[x, n.ins[1].0], y, |[a, b]| a + b),
        Op::BatchNorm(bn) => {
            // y = x·s + (β − mean·s), s = γ/√(var + eps), computed once in f64.
            let p: Vec<&[f32]> = n.params.iter().map(|p| p.data()).collect();
            let s: Vec<f64> = (0..bn.channels).map(|c| p[0][c] as f64 / (p[3][c] as f64 + bn.eps).sqrt()).collect();
            let shift = (0..bn.channels).map(|c| (p[1][c] as f64 - p[2][c] as f64 * s[c]) as f32).collect();
            let (s, shift) = (t.param(s.iter().map(|&v| v as f32).collect()), t.param(shift));
            let (c, hw) = (n.ins[0].1[0], n.ins[0].1[1..].iter().product::<usize>());
            let mut kb = Kb::new(name("batch_norm"), n.batch * c);
            let [xb, sb, bb, yb] =
                [("x", n.out_len(), Access::Read), ("scale", c, Access::Read), ("shift", c, Access::Read), ("y", n.out_len(), Access::Write)]
                    .map(|(nm, len, a)| kb.buf(nm, len, a));
            let (lo, hi) = kb.range();
            kb.for_(lo, hi, |kb, plane| {
                let ch = kb.let_(plane.clone() % c);
                let (sv, bv) = (kb.let_(sb.at(ch.clone()).splat()), kb.let_(bb.at(ch.clone())));
                let bv4 = kb.let_(bv.clone().splat());
                let base = kb.let_(plane * hw);
                vector_loop(kb, base.clone(), base + hw, |kb, i, vec| match vec {
                    true => kb.store(yb, i.clone(), xb.at4(i).fma(sv.clone(), bv4.clone())),
                    false => kb.store(yb, i.clone(), xb.at(i).fma(sb.at(ch.clone()), bv.clone())),
                });
            });
            t.launch(kb.finish(), vec![x, s, shift, y], 2 * n.out_len() as u64);
        }
        Op::MaxPool2d(p) | Op::AvgPool2d(p) => {
            let avg = matches!(n.op, Op::AvgPool2d(_));
            let [c, h, w] = [n.ins[0].1[0], n.ins[0].1[1], n.ins[0].1[2]];
            let mut kb = Kb::new(name(n.op.name()), n.batch * c);
            let (xb, yb) = (kb.buf("x", n.in_len(0), Access::Read), kb.buf("y", n.out_len(), Access::Write));
            let (lo, hi) = kb.range();
            pool(&mut kb, p, avg, xb, yb, lo, hi, [h, w], [n.out.1[1], n.out.1[2]]);
            t.launch(kb.finish(), vec![x, y], n.out_len() as u64 * (p.kernel[0] * p.kernel[1]) as u64);
        }
        Op::Lrn(l) => {
            let [c, hw] = [n.ins[0].1[0], n.ins[0].1[1..].iter().product()];
            let mut kb = Kb::new(name("lrn"), n.batch * c);
            let (xb, yb) = (kb.buf("x", n.in_len(0), Access::Read), kb.buf("y", n.out_len(), Access::Write));
            let (lo, hi) = kb.range();
            let half = (l.n / 2) as i64;
            kb.for_(lo, hi, |kb, plane| {
                let (img, ch) = (kb.let_(plane.clone() / c), kb.let_(plane.clone() % c));
                let (j0, j1) = (kb.let_((ch.clone() - half).max(0i64)), kb.let_((ch + half + 1i64).min(c)));
                kb.for_(0usize, hw, |kb, p| {
                    let sum = kb.var(0.0f32);
                    kb.for_(j0, j1, |kb, j| {
                        let v = kb.let_(xb.at((img.clone() * c + j) * hw + p.clone()));
                        kb.set(sum, v.clone().fma(v, sum));
                    });
                    // x · (k + α Σ)^(−β), as exp(−β · ln(k + α Σ)).
                    let i = plane.clone() * hw + p;
                    let denom = (e(sum).fma(l.alpha as f32, l.k as f32)).ln() * (-l.beta as f32);
                    kb.store(yb, i.clone(), xb.at(i) * denom.exp());
                });
            });
            t.launch(kb.finish(), vec![x, y], n.out_len() as u64 * (2 * l.n as u64 + 4));
        }
        Op::Softmax { axis } => {
            let s = n.ins[0].1;
            let ax = axis.0 - 1;
            let (outer, len, inner) = (n.batch * s[..ax].iter().product::<usize>(), s[ax], s[ax + 1..].iter().product::<usize>());
            let mut kb = Kb::new(name("softmax"), outer * inner);
            let (xb, yb) = (kb.buf("x", n.in_len(0), Access::Read), kb.buf("y", n.out_len(), Access::Write));
            let (lo, hi) = kb.range();
            kb.for_(lo, hi, |kb, r| {
                let base = kb.let_(r.clone() / inner * (len * inner) + r % inner);
                let at = |k: Expr| base.clone() + k * inner;
                let (m, total) = (kb.var(f32::NEG_INFINITY), kb.var(0.0f32));
                kb.for_(0usize, len, |kb, k| kb.set(m, e(m).max(xb.at(at(k)))));
                kb.for_(0usize, len, |kb, k| kb.set(total, e(total) + (xb.at(at(k)) - m).exp()));
                kb.for_(0usize, len, |kb, k| kb.store(yb, at(k.clone()), (xb.at(at(k)) - m).exp() / total));
            });
            t.launch(kb.finish(), vec![x, y], 4 * n.out_len() as u64);
        }
        Op::Concat { axis } | Op::Slice { axis, .. } => {
            // Both are block copies: `outer` rows, each a run of `block` elements per input.
            let ax = axis.0 - 1;
            let out = n.out.1;
            let (outer, per_out) = (n.batch * out[..ax].iter().product::<usize>(), out[ax..].iter().product::<usize>());
            let mut kb = Kb::new(name(n.op.name()), outer);
            let ins: Vec<Buf> = (0..n.ins.len()).map(|i| kb.buf(format!("x{i}"), n.in_len(i), Access::Read)).collect();
            let yb = kb.buf("y", n.out_len(), Access::Write);
            let (lo, hi) = kb.range();
            kb.for_(lo, hi, |kb, o| {
                let mut dst = 0;
                for (i, &xb) in ins.iter().enumerate() {
                    let per_in: usize = n.ins[i].1[ax..].iter().product();
                    let (src, len) = match n.op {
                        Op::Slice { start, len, .. } => (o.clone() * per_in + start * per_out / len, per_out),
                        _ => (o.clone() * per_in, per_in),
                    };
                    copy(kb, yb, o.clone() * per_out + dst, xb, src, len);
                    dst += len;
                }
            });
            t.launch(kb.finish(), n.ins.iter().map(|i| i.0).chain([y]).collect(), 0);
        }
        Op::Linear(l) => linear(t, n, l, false),
        Op::Conv2d(c) => conv(t, n, c, false, None),
        Op::Fused(f) => match &f.base {
            FusedBase::Conv(c) => conv(t, n, c, f.relu, f.pool.as_ref()),
            FusedBase::Linear(l) => linear(t, n, l, f.relu),
        },
    }
}

/// `for i in lo..hi`, four elements at a time while at least four remain, then one at a time; `body`
/// is told which (`true`: a vector of four at `i`).
fn vector_loop(kb: &mut Kb, lo: Expr, hi: Expr, body: impl Fn(&mut Kb, Expr, bool)) {
    let lo = kb.let_(lo);
    let vend = kb.let_(lo.clone() + (hi.clone() - lo.clone()) / LANES * LANES);
    kb.for_step(lo, vend.clone(), LANES as i64, |kb, i| body(kb, i, true));
    kb.for_(vend, hi, |kb, i| body(kb, i, false));
}

/// `dst[d..d + n] = src[s..s + n]`.
fn copy(kb: &mut Kb, dst: Buf, d: Expr, src: Buf, s: Expr, n: impl Into<Expr>) {
    let delta = kb.let_(s - d.clone());
    let end = d.clone() + n;
    vector_loop(kb, d, end, |kb, i, vec| {
        let v = if vec { src.at4(i.clone() + delta.clone()) } else { src.at(i.clone() + delta.clone()) };
        kb.store(dst, i, v)
    });
}

/// `dst[d..d + n] = 0`.
fn zero(kb: &mut Kb, dst: Buf, d: Expr, n: Expr) {
    vector_loop(kb, d.clone(), d + n, |kb, i, vec| kb.store(dst, i, if vec { e(0.0f32).splat() } else { e(0.0f32) }));
}

/// Element-wise kernel over `len` elements: `y = f(inputs)`, vectorized.
fn map<const K: usize>(t: &mut Tables, name: &str, len: usize, ins: &[Ref; K], y: Ref, f: impl Fn([Expr; K]) -> Expr) {
    let mut kb = Kb::new(name, len.div_ceil(CHUNK));
    let bufs: [Buf; K] = std::array::from_fn(|i| kb.buf(format!("x{i}"), len, Access::Read));
    let yb = kb.buf("y", len, Access::Write);
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, c| {
        let start = kb.let_(c * CHUNK);
        let end = start.clone() + CHUNK;
        vector_loop(kb, start, end.min(len), |kb, i, vec| {
            let args = bufs.map(|b| if vec { b.at4(i.clone()) } else { b.at(i.clone()) });
            let mut v = f(args);
            if !vec {
                // `f` is written for vectors; its splatted constants become scalars here.
                v = devectorize(v);
            }
            kb.store(yb, i, v)
        });
    });
    t.launch(kb.finish(), ins.iter().copied().chain([y]).collect(), len as u64);
}

/// Rewrites splats of constants back to scalars (for the scalar tail of [`map`]).
fn devectorize(e: Expr) -> Expr {
    match e {
        Expr::Un(super::UnOp::Splat, a) => *a,
        Expr::Bin(op, a, b) => Expr::Bin(op, Box::new(devectorize(*a)), Box::new(devectorize(*b))),
        other => other,
    }
}

/// Max or average pooling of planes `lo..hi` of `x` into `y` (plane-major NCHW, same plane numbering).
/// Windows are clipped to the input, so padding never contributes (Chainer's semantics; average pooling
/// still divides by the full window).
#[allow(clippy::too_many_arguments)]
fn pool(kb: &mut Kb, p: &Pool2d, avg: bool, x: Buf, y: Buf, lo: Expr, hi: Expr, [h, w]: [usize; 2], [oh, ow]: [usize; 2]) {
    let [kh, kw] = p.kernel.map(|k| k as i64);
    kb.for_(lo, hi, |kb, plane| {
        let (src, dst) = (kb.let_(plane.clone() * (h * w)), kb.let_(plane * (oh * ow)));
        kb.for_(0usize, oh, |kb, oy| {
            let y0 = kb.let_(oy.clone() * p.stride[0] - p.pad[0]);
            let (ylo, yhi) = (kb.let_(y0.clone().max(0i64)), kb.let_((y0 + kh).min(h)));
            kb.for_(0usize, ow, |kb, ox| {
                let x0 = kb.let_(ox.clone() * p.stride[1] - p.pad[1]);
                let (xlo, xhi) = (kb.let_(x0.clone().max(0i64)), kb.let_((x0 + kw).min(w)));
                let acc = kb.var(if avg { 0.0 } else { f32::NEG_INFINITY });
                kb.for_(ylo, yhi, |kb, iy| {
                    kb.for_(xlo, xhi, |kb, ix| {
                        let v = x.at(src.clone() + iy * w + ix);
                        kb.set(acc, if avg { e(acc) + v } else { e(acc).max(v) });
                    })
                });
                let v = if avg { e(acc) / ((kh * kw) as f32) } else { e(acc) };
                kb.store(y, dst.clone() + oy * ow + ox, v);
            });
        });
    });
}

/// Linear (+ReLU) as a bandwidth-bound GEMV: each task owns a range of output features and streams
/// their weight rows. Per (row, sample): two f32x4 partial sums over k in steps of 8 (with the block's
/// other chains, eight independent FMA chains hide the FMA latency), a scalar tail, then the horizontal sum and the bias —
/// the same arithmetic however rows and samples are grouped, so results do not depend on the batch.
/// A block covers `rb` rows × `nb` samples: at batch 1, four rows, so that four weight streams are in
/// flight (one sequential stream per core left half the memory bandwidth unused: 7 GB/s per core with
/// one row, 10 with two, 12 with four, measured on fc6); otherwise four samples per pass over the
/// weights. Either way 8 accumulators + 2 shared vectors fit the 16 xmm registers.
fn linear(t: &mut Tables, n: &Node, l: &Linear, relu: bool) {
    const U: usize = 2;
    let (k, o) = (l.in_features, l.out_features);
    let (rb, nb) = if n.batch == 1 && o % 4 == 0 { (4, 1) } else { (1, 4) };
    let bias = n.params.get(1).map_or(vec![0.0; o], |b| b.data().to_vec());
    let (w, b) = (t.param(n.params[0].data().to_vec()), t.param(bias));
    let mut kb = Kb::new(format!("{}.{}", n.name, n.op.name()), o / rb);
    let [xb, wb, bb, yb] = [("x", n.batch * k, Access::Read), ("W", o * k, Access::Read), ("b", o, Access::Read), ("y", n.batch * o, Access::Write)]
        .map(|(nm, len, a)| kb.buf(nm, len, a));
    let (lo, hi) = kb.range();
    let step = U * LANES;
    let kv = k / step * step;
    // Rows `r0..r0 + rb` × samples `n0..n0 + ns`.
    let block = |kb: &mut Kb, r0: Expr, n0: Expr, ns: usize| {
        let pairs: Vec<(usize, usize)> = (0..rb).flat_map(|r| (0..ns).map(move |s| (r, s))).collect();
        let acc: Vec<Vec<_>> = pairs.iter().map(|_| (0..U).map(|_| kb.var(e(0.0f32).splat())).collect()).collect();
        let tail: Vec<_> = pairs.iter().map(|_| kb.var(0.0f32)).collect();
        let (w0, x0) = (kb.let_(r0.clone() * k), kb.let_(n0.clone() * k));
        kb.for_step(0usize, kv, step as i64, |kb, i| {
            // The operand shared across the block is loaded once; the other one is used once.
            let shared: Vec<Expr> = (0..U)
                .map(|u| if rb == 1 { kb.let_(wb.at4(w0.clone() + i.clone() + u * LANES)) } else { kb.let_(xb.at4(x0.clone() + i.clone() + u * LANES)) })
                .collect();
            for (&(r, s), a) in pairs.iter().zip(&acc) {
                for u in 0..U {
                    let other =
                        if rb == 1 { xb.at4(x0.clone() + i.clone() + (s * k + u * LANES)) } else { wb.at4(w0.clone() + i.clone() + (r * k + u * LANES)) };
                    kb.set(a[u], other.fma(shared[u].clone(), a[u]));
                }
            }
        });
        kb.for_(kv, k, |kb, i| {
            for (&(r, s), &a) in pairs.iter().zip(&tail) {
                kb.set(a, xb.at(x0.clone() + i.clone() + s * k).fma(wb.at(w0.clone() + i.clone() + r * k), a));
            }
        });
        for (p, &(r, s)) in pairs.iter().enumerate() {
            let a = &acc[p];
            let sum = e(a[0]) + a[1];
            let mut v = sum.hsum() + tail[p] + bb.at(r0.clone() + r);
            if relu {
                v = v.max(0.0f32);
            }
            kb.store(yb, (n0.clone() + s) * o + r0.clone() + r, v);
        }
    };
    kb.for_(lo, hi, |kb, rp| {
        let r0 = kb.let_(rp * rb);
        let full = n.batch / nb * nb;
        kb.for_step(0usize, full, nb as i64, |kb, n0| block(kb, r0.clone(), n0, nb));
        if full < n.batch {
            block(kb, r0, e(full), n.batch - full);
        }
    });
    t.launch(kb.finish(), vec![n.ins[0].0, w, b, n.out.0], 2 * (n.batch * k * o) as u64);
}

/// Convolution geometry, per group.
struct Geo {
    cig: usize,
    cog: usize,
    /// GEMM depth: input channels × kh × kw.
    k: usize,
    /// Output pixels per channel.
    p: usize,
    /// Output-channel blocks of MR.
    ncb: usize,
}

/// Packs `W` (out, in/groups, kh, kw) as [group][block][k][MR], zero rows past the group's channels,
/// and the bias as [group][block·MR + r].
fn pack_conv(c: &Conv2d, g: &Geo, mr: usize, w: &[f32], b: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
    let mut a = vec![0.0; c.groups * g.ncb * g.k * mr];
    let mut bias = vec![0.0; c.groups * g.ncb * mr];
    for grp in 0..c.groups {
        for co in 0..g.cog {
            let (blk, r, oc) = (grp * g.ncb + co / mr, co % mr, grp * g.cog + co);
            for k in 0..g.k {
                a[(blk * g.k + k) * mr + r] = w[oc * g.k + k];
            }
            bias[blk * mr + r] = b.map_or(0.0, |b| b[oc]);
        }
    }
    (a, bias)
}

fn conv(t: &mut Tables, n: &Node, c: &Conv2d, relu: bool, pool_after: Option<&Pool2d>) {
    let [ci, h, w] = [n.ins[0].1[0], n.ins[0].1[1], n.ins[0].1[2]];
    let [kh, kw] = c.kernel;
    let (oh, ow) = match pool_after {
        // The convolution's own output size (before pooling).
        Some(_) => (
            cnnc_runtime::op::window_out(h, kh, c.stride[0], c.pad[0], false).expect("validated"),
            cnnc_runtime::op::window_out(w, kw, c.stride[1], c.pad[1], false).expect("validated"),
        ),
        None => (n.out.1[1], n.out.1[2]),
    };
    let co = c.out_channels;
    let (mr, nr) = (t.tier.mr(), t.tier.nr());
    let g = Geo { cig: ci / c.groups, cog: co / c.groups, k: ci / c.groups * kh * kw, p: oh * ow, ncb: (co / c.groups).div_ceil(mr) };
    let (a, bias) = pack_conv(c, &g, mr, n.params[0].data(), n.params.get(1).map(|b| b.data()));
    let (a, bias) = (t.param(a), t.param(bias));
    let name = |s: &str| format!("{}.{s}", n.name);
    let x = n.ins[0].0;
    let direct = kh == 1 && kw == 1 && c.stride == [1, 1] && c.pad == [0, 0];
    // The column matrix: [image][group][k][p] with rows padded to whole cache lines, so that the tile's
    // vector loads are aligned; or the input itself for direct 1×1 convolutions.
    let ldb = if direct { g.p } else { g.p.next_multiple_of(super::ALIGN) };
    let cols = if direct {
        x
    } else {
        let rows = n.batch * c.groups * g.k;
        let cols = t.store(rows * ldb);
        let mut kb = Kb::new(name("im2col"), rows);
        let (xb, cb) = (kb.buf("x", n.in_len(0), Access::Read), kb.buf("cols", rows * ldb, Access::Write));
        let (lo, hi) = kb.range();
        kb.for_(lo, hi, |kb, row| {
            let (img_grp, k) = (kb.let_(row.clone() / g.k), kb.let_(row.clone() % g.k));
            let (ch, ky, kx) = (kb.let_(k.clone() / (kh * kw)), kb.let_(k.clone() / kw % kh), kb.let_(k % kw));
            // (image, group) → first input channel of the group.
            let plane = kb.let_((img_grp.clone() / c.groups * ci + img_grp % c.groups * g.cig + ch) * (h * w));
            // Output columns whose input column is inside the image: ox·s + kx − pad ∈ 0..w.
            let (s, pad) = (c.stride[1] as i64, c.pad[1] as i64);
            let xlo = kb.let_(((e(pad) - kx.clone() + (s - 1)).max(0i64) / s).min(ow));
            let xhi = kb.let_(((e(w as i64 - 1 + pad) - kx.clone() + s).max(0i64) / s).min(ow).max(xlo.clone()));
            kb.for_(0usize, oh, |kb, oy| {
                let dst = kb.let_(row.clone() * ldb + oy.clone() * ow);
                let iy = kb.let_(oy * c.stride[0] + ky.clone() - c.pad[0]);
                kb.if_else(
                    e(0i64).le(iy.clone()).and(iy.clone().lt(h)),
                    |kb| {
                        zero(kb, cb, dst.clone(), xlo.clone());
                        let src = kb.let_(plane.clone() + iy.clone() * w - pad + kx.clone());
                        if s == 1 {
                            copy(kb, cb, dst.clone() + xlo.clone(), xb, src + xlo.clone(), xhi.clone() - xlo.clone());
                        } else {
                            kb.for_(xlo.clone(), xhi.clone(), |kb, ox| kb.store(cb, dst.clone() + ox.clone(), xb.at(src.clone() + ox * s)));
                        }
                        zero(kb, cb, dst.clone() + xhi.clone(), e(ow) - xhi.clone());
                    },
                    |kb| zero(kb, cb, dst.clone(), e(ow)),
                );
            });
        });
        t.launch(kb.finish(), vec![x, cols], 0);
        cols
    };
    let conv_len = n.batch * co * g.p;
    let pre_pool = if pool_after.is_some() { t.store(conv_len) } else { n.out.0 };
    let mut kb = Kb::new(name("gemm"), n.batch * c.groups * g.ncb);
    let ab = kb.buf("A", c.groups * g.ncb * g.k * mr, Access::Read);
    let bb = kb.buf("bias", c.groups * g.ncb * mr, Access::Read);
    let col_len = if direct { n.in_len(0) } else { n.batch * c.groups * g.k * ldb };
    let colb = kb.buf("cols", col_len, Access::Read);
    let yb = kb.buf("y", conv_len, Access::ReadWrite);
    let pooled = pool_after.map(|_| kb.buf("pooled", n.out_len(), Access::Write));
    let (lo, hi) = kb.range();
    // Slices of k per tile call: the AVX-512 tile's B slice (KC × 32 floats = 32 KB at KC = 256) then
    // stays in the 48 KB L1d while MCB blocks of A stream past it. The portable tier takes k whole.
    let kc = match t.tier {
        Tier::Portable => g.k,
        Tier::Avx512 => 256,
    };
    let slices = g.k.div_ceil(kc);
    // Tasks own ranges of (image, group, channel block); each range is walked in chunks of MCB blocks
    // that never cross an (image, group) boundary.
    kb.for_(lo.clone() / g.ncb, (hi.clone() - 1i64) / g.ncb + 1i64, |kb, ig| {
        let b0 = kb.let_((lo.clone() - ig.clone() * g.ncb).max(0i64));
        let b1 = kb.let_((hi.clone() - ig.clone() * g.ncb).min(g.ncb));
        let (img, grp) = (kb.let_(ig.clone() / c.groups), kb.let_(ig.clone() % c.groups));
        let bbase = kb.let_(if direct { img.clone() * (ci * g.p) + grp.clone() * (g.cig * g.p) } else { ig.clone() * (g.k * ldb) });
        let cbase = kb.let_((img.clone() * co + grp.clone() * g.cog) * g.p);
        kb.for_step(b0, b1.clone(), MCB as i64, |kb, c0| {
            let c1 = kb.let_((c0.clone() + MCB).min(b1.clone()));
            // Every tile of the chunk for k in k0..k0 + depth; `accumulate` adds onto C.
            let tiles = |kb: &mut Kb, k0: Expr, depth: Expr, accumulate: bool, relu: bool| {
                let tile = |kb: &mut Kb, col: Expr, cols: Expr, width: Option<Width>| {
                    kb.for_(c0.clone(), c1.clone(), |kb, blk| {
                        let gemm = Gemm {
                            a: ab,
                            a0: (grp.clone() * g.ncb + blk.clone()) * (g.k * mr) + k0.clone() * mr,
                            bias: bb,
                            bias0: (grp.clone() * g.ncb + blk.clone()) * mr,
                            b: colb,
                            b0: bbase.clone() + k0.clone() * ldb + col.clone(),
                            c: yb,
                            c0: cbase.clone() + blk.clone() * (mr * g.p) + col.clone(),
                            ldb,
                            ldc: g.p,
                            depth: depth.clone(),
                            rows: (e(g.cog) - blk * mr).min(mr),
                            cols: cols.clone(),
                            accumulate,
                            relu,
                        };
                        match width {
                            Some(w) => micro(kb, &gemm, w, g.cog % mr != 0),
                            None => kb.gemm(gemm),
                        }
                    });
                };
                match t.tier {
                    // Full tiles, then one tile of 1–2 vectors, then single columns.
                    Tier::Portable => {
                        let full = g.p / nr * nr;
                        kb.for_step(0usize, full, nr as i64, |kb, col| tile(kb, col, e(nr), Some(Width::Vectors(nr / LANES))));
                        if (g.p - full) / LANES > 0 {
                            tile(kb, e(full), e(0i64), Some(Width::Vectors((g.p - full) / LANES)));
                        }
                        for col in full + (g.p - full) / LANES * LANES..g.p {
                            tile(kb, e(col), e(1i64), Some(Width::Scalar));
                        }
                    }
                    // The tile masks its own edge columns.
                    Tier::Avx512 => kb.for_step(0usize, g.p, nr as i64, |kb, col| tile(kb, col.clone(), (e(g.p) - col).min(nr), None)),
                }
            };
            if slices == 1 {
                tiles(kb, e(0i64), e(g.k), false, relu);
            } else {
                // The first slice starts from the bias, the last applies the epilogue.
                tiles(kb, e(0i64), e(kc), false, false);
                kb.for_(1usize, slices - 1, |kb, s| tiles(kb, s * kc, e(kc), true, false));
                tiles(kb, e((slices - 1) * kc), e(g.k - (slices - 1) * kc), true, relu);
            }
            if let (Some(p), Some(pb)) = (pool_after, pooled) {
                let first = ig.clone() * g.cog + c0.clone() * mr;
                let last = (ig.clone() * g.cog + c1.clone() * mr).min(ig.clone() * g.cog + g.cog);
                pool(kb, p, false, yb, pb, first, last, [oh, ow], [n.out.1[1], n.out.1[2]]);
            }
        });
    });
    let mut refs = vec![a, bias, cols, pre_pool];
    refs.extend(pooled.map(|_| n.out.0));
    t.launch(kb.finish(), refs, 2 * (n.batch * co * g.p * g.k) as u64);
}

/// How many output columns a microkernel call covers.
#[derive(Clone, Copy)]
enum Width {
    /// 1..=3 f32x4 vectors.
    Vectors(usize),
    /// One column, scalar (the last 1–3 columns of a row).
    Scalar,
}

/// The portable GEMM microkernel, expanded in the IR: an MR × (4·vectors or 1) tile whose accumulators
/// start at the bias, take one FMA per k, then the epilogue, then the store (rows past `g.rows` are
/// padding and not stored when the block is `ragged`). 4 rows × 3 vectors = 12 accumulators + 3 loaded
/// vectors + 1 broadcast fill the 16 xmm registers Cranelift allocates; more accumulators spill.
fn micro(kb: &mut Kb, g: &Gemm, width: Width, ragged: bool) {
    let mr = Tier::Portable.mr();
    let (nv, vec) = match width {
        Width::Vectors(v) => (v, true),
        Width::Scalar => (1, false),
    };
    let (a0, b0) = (kb.var(g.a0.clone()), kb.var(g.b0.clone()));
    let acc: Vec<Vec<_>> = (0..mr)
        .map(|r| {
            (0..nv)
                .map(|v| {
                    if !g.accumulate {
                        let bias = g.bias.at(g.bias0.clone() + r);
                        return kb.var(if vec { bias.splat() } else { bias });
                    }
                    let at = g.c0.clone() + r * g.ldc + v * LANES;
                    let acc = kb.var(if vec { e(0.0f32).splat() } else { e(0.0f32) });
                    let load = |kb: &mut Kb| kb.set(acc, if vec { g.c.at4(at) } else { g.c.at(at) });
                    if ragged {
                        kb.if_(e(r).lt(g.rows.clone()), load);
                    } else {
                        load(kb);
                    }
                    acc
                })
                .collect()
        })
        .collect();
    kb.for_(0usize, g.depth.clone(), |kb, _| {
        let bv: Vec<Expr> = (0..nv).map(|v| kb.let_(if vec { g.b.at4(e(b0) + v * LANES) } else { g.b.at(b0) })).collect();
        for (r, row) in acc.iter().enumerate() {
            let a = g.a.at(e(a0) + r);
            let a = kb.let_(if vec { a.splat() } else { a });
            for (v, &acc) in row.iter().enumerate() {
                kb.set(acc, a.clone().fma(bv[v].clone(), acc));
            }
        }
        kb.set(a0, e(a0) + mr);
        kb.set(b0, e(b0) + g.ldb);
    });
    for (r, row) in acc.iter().enumerate() {
        let store = |kb: &mut Kb| {
            for (v, &acc) in row.iter().enumerate() {
                let mut val = e(acc);
                if g.relu {
                    val = val.max(if vec { e(0.0f32).splat() } else { e(0.0f32) });
                }
                kb.store(g.c, g.c0.clone() + r * g.ldc + v * LANES, val);
            }
        };
        if ragged {
            kb.if_(e(r).lt(g.rows.clone()), store);
        } else {
            store(kb);
        }
    }
}
