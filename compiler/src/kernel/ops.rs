//! Op → kernels. Each op becomes one or a few launches over arena tensors and packed parameters.
//!
//! Convolution is a GEMM over the column matrix (the input itself for 1×1 stride-1 unpadded
//! convolutions), packed from a padded, stride-phase-split copy of the input ([`Phased`]) into panels
//! of the tile's width, as the tile reads them, or read in place by the AVX-512 tile for stride-1
//! convolutions ([`Columns`]). The register-blocked microkernel ([`micro`], or the AVX-512 tile)
//! keeps an MR×NR tile of the output in registers; bias, ReLU and max pooling are applied by the same
//! launch before anything leaves the task. Per output element the arithmetic is fixed — bias, then one
//! FMA per k in (channel, ky, kx) order — whatever the tile, tier or thread count, so results are
//! bitwise identical across them. Stride-1 3×3 convolutions may instead take Winograd F(4×4, 3×3)
//! (`winograd.rs`, chosen alike for both tiers, so the same holds). (Linear layers change method above
//! batch 1 — GEMV to GEMM — and Winograd is chosen per batch size, so batch sizes on either side of
//! those may differ in the last bits; within a batch, no sample depends on its place.)

use super::{bf16_bits, e, Access, BRows, Buf, Expr, Gemm, Kb, Kernel, Taps, Tier, WeightsDtype, Winograd, LANES};
use cnnc_runtime::op::{Conv2d, FusedBase, Linear, Pool2d};
use cnnc_runtime::{Op, Tensor};

/// Output-channel blocks one task runs against the same column tile before moving on (its chunk).
/// Portable tier: the tile's panel (K × 12 floats) is read from L1/L2 eight times per trip from
/// memory, and 8 blocks of packed weights (8 × K × 16 B, 150 KB at K = 2400) stay in the 2 MB L2.
/// AVX-512 tier: each KC-deep slice of the column panels (375 KB for AlexNet's conv2) is streamed once
/// per chunk, so a chunk should hold a task's whole share of blocks; 32 blocks' slices of A
/// (32 × 12 × 128 × 4 B = 192 KB) stay in L2 beside it. (At 8, conv2 read its 7 MB column matrix
/// twice per task.)
fn chunk_blocks(tier: Tier) -> usize {
    match tier {
        Tier::Portable => 8,
        Tier::Avx512 => 32,
    }
}
/// Target depth of one AVX-512 tile call (rounded down to whole rows of kw taps, see [`pack`]): its B
/// panel, KC × 32 floats = 16 KB, and the A slices streaming past it (12 × KC floats = 6 KB each)
/// then fit the 48 KB L1d together. (At 256 the 32 KB panel was evicted by the A stream, LRU-style;
/// 128 was 6–15% faster on AlexNet's conv2–5 with packed panels, measured.)
const KC: usize = 128;
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
    pub winograd: Winograd,
    pub fc_weights: WeightsDtype,
    pub stores: Vec<usize>,
    pub params: Vec<Vec<f32>>,
    pub launches: Vec<(Kernel, Vec<Ref>, u64)>,
}

impl Tables {
    pub fn store(&mut self, len: usize) -> Ref {
        self.stores.push(len);
        Ref::Store(self.stores.len() - 1)
    }
    pub(super) fn param(&mut self, data: Vec<f32>) -> Ref {
        self.params.push(data);
        Ref::Param(self.params.len() - 1)
    }
    pub(super) fn launch(&mut self, k: Kernel, refs: Vec<Ref>, flops: u64) {
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
    /// Winograd's GEMMs only (1×1 convolutions at batch 1, see `winograd.rs`).
    pub planes: Option<Planes>,
}

/// How Winograd's α² GEMMs, an α²-group 1×1 convolution, lay out and share their operands.
pub struct Planes {
    /// Elements between consecutive groups' first input and output rows (planes a multiple of 4 KiB
    /// apart would share one L1 set).
    pub pitch: [usize; 2],
    /// The packed weights and bias, when an earlier chunk of the batch packed them.
    pub packed: Option<(Ref, Ref)>,
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
            let s: Vec<f64> = (0..bn.channels).map(|c| p[0][c] as f64 / (p[3][c] as f64 + bn.eps.0).sqrt()).collect();
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
            pool(&mut kb, p, avg, xb, yb, lo, hi, [h, w, w], [n.out.1[1], n.out.1[2]]);
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
                    let denom = (e(sum).fma(l.alpha.0 as f32, l.k.0 as f32)).ln() * (-l.beta.0 as f32);
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
        Op::Conv2d(c) => {
            conv(t, n, c, false, None);
        }
        Op::Fused(f) => match &f.base {
            FusedBase::Conv(c) => {
                conv(t, n, c, f.relu, f.pool.as_ref());
            }
            FusedBase::Linear(l) => linear(t, n, l, f.relu),
        },
    }
}

/// `for i in lo..hi`, four elements at a time while at least four remain, then one at a time; `body`
/// is told which (`true`: a vector of four at `i`).
pub(super) fn vector_loop(kb: &mut Kb, lo: Expr, hi: Expr, body: impl Fn(&mut Kb, Expr, bool)) {
    let lo = kb.let_(lo);
    let vend = kb.let_(lo.clone() + (hi.clone() - lo.clone()) / LANES * LANES);
    kb.for_step(lo, vend.clone(), LANES as i64, |kb, i| body(kb, i, true));
    kb.for_(vend, hi, |kb, i| body(kb, i, false));
}

/// `for i in lo..hi` four at a time, where writing an element twice is harmless (copies and fills):
/// ranges of four or more end with one vector that overlaps the previous one instead of a scalar tail
/// (im2col copies rows of 13–55 floats, so the tail was a large share of the work).
fn overlapping_vector_loop(kb: &mut Kb, lo: Expr, hi: Expr, body: impl Fn(&mut Kb, Expr, bool)) {
    let (lo, hi) = (kb.let_(lo), kb.let_(hi));
    let vend = kb.let_(lo.clone() + (hi.clone() - lo.clone()) / LANES * LANES);
    kb.if_else(
        e(LANES).le(hi.clone() - lo.clone()),
        |kb| {
            kb.for_step(lo.clone(), vend.clone(), LANES as i64, |kb, i| body(kb, i, true));
            kb.if_(vend.clone().lt(hi.clone()), |kb| body(kb, hi.clone() - LANES, true));
        },
        |kb| kb.for_(lo.clone(), hi.clone(), |kb, i| body(kb, i, false)),
    );
}

/// `dst[d..d + n] = src[s..s + n]` (the ranges do not overlap).
fn copy(kb: &mut Kb, dst: Buf, d: Expr, src: Buf, s: Expr, n: impl Into<Expr>) {
    let delta = kb.let_(s - d.clone());
    let end = d.clone() + n;
    overlapping_vector_loop(kb, d, end, |kb, i, vec| {
        let v = src.load(i.clone() + delta.clone(), vec);
        kb.store(dst, i, v)
    });
}

/// `dst[d..d + n] = 0`.
fn zero(kb: &mut Kb, dst: Buf, d: Expr, n: Expr) {
    overlapping_vector_loop(kb, d.clone(), d + n, |kb, i, vec| kb.store(dst, i, e(0.0f32).lanes(vec)));
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
            let args = bufs.map(|b| b.load(i.clone(), vec));
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
/// still divides by the full window, and sums in the reference's (ky, kx) order).
///
/// Max pooling is separable: each output row first takes the maximum of its window's input rows into
/// a local buffer, then the maximum of each window of kw columns there at every start position (both
/// four columns at a time), of which the output takes every stride-th; windows clipped by the edges are
/// scalar. Max is exact, so this is the same result. Scalar maxima are what this avoids (Cranelift's
/// IEEE `fmax` is a several-instruction sequence on x64): AlexNet's conv1 pool (3×3, stride 2, 55 → 27)
/// took 0.6 ms of its launch's 2.1 ms at 1 thread with one scalar maximum per window column.
#[allow(clippy::too_many_arguments)]
fn pool(kb: &mut Kb, p: &Pool2d, avg: bool, x: Buf, y: Buf, lo: Expr, hi: Expr, [h, w, pitch]: [usize; 3], [oh, ow]: [usize; 2]) {
    let [kh, kw] = p.kernel;
    // The window of output o along an axis, clipped to 0..size.
    let window = |kb: &mut Kb, o: Expr, k: usize, s: usize, pad: usize, size: usize| {
        let start = kb.let_(o * s - pad);
        (kb.let_(start.clone().max(0i64)), kb.let_((start + k).min(size)))
    };
    let neg_inf = || e(f32::NEG_INFINITY);
    // The separable form keeps one plane's row maxima on the task's stack; planes too large for that
    // (over 64 KiB of them: worker threads have 2 MiB stacks) take the direct form.
    if avg || oh * w * 4 > 64 << 10 {
        return kb.for_(lo, hi, |kb, plane| {
            let (src, dst) = (kb.let_(plane.clone() * (h * pitch)), kb.let_(plane * (oh * ow)));
            kb.for_(0usize, oh, |kb, oy| {
                let (ylo, yhi) = window(kb, oy.clone(), kh, p.stride[0], p.pad[0], h);
                kb.for_(0usize, ow, |kb, ox| {
                    let (xlo, xhi) = window(kb, ox.clone(), kw, p.stride[1], p.pad[1], w);
                    let acc = kb.var(if avg { e(0.0f32) } else { neg_inf() });
                    kb.for_(ylo.clone(), yhi.clone(), |kb, iy| {
                        kb.for_(xlo, xhi, |kb, ix| {
                            let v = x.at(src.clone() + iy * pitch + ix);
                            kb.set(acc, if avg { e(acc) + v } else { e(acc).max(v) })
                        })
                    });
                    let v = if avg { e(acc) / ((kh * kw) as f32) } else { e(acc) };
                    kb.store(y, dst.clone() + oy.clone() * ow + ox, v);
                });
            });
        });
    }
    // Output columns whose window lies inside the row: ox·s − pad ≥ 0 and ox·s − pad + kw ≤ w.
    let first = p.pad[1].div_ceil(p.stride[1]).min(ow);
    let last = if w + p.pad[1] >= kw { ((w + p.pad[1] - kw) / p.stride[1] + 1).min(ow).max(first) } else { first };
    let rows = kb.buf("rows", oh * w, Access::Local);
    // Window maxima at every start position of a row (`slide[i]` = max of its kw columns from i), of
    // which the output takes every stride-th.
    let slide = kb.buf("slide", w, Access::Local);
    kb.for_(lo, hi, |kb, plane| {
        let (src, dst) = (kb.let_(plane.clone() * (h * pitch)), kb.let_(plane * (oh * ow)));
        kb.for_(0usize, oh, |kb, oy| {
            let (ylo, yhi) = window(kb, oy.clone(), kh, p.stride[0], p.pad[0], h);
            let to = kb.let_(oy * w);
            overlapping_vector_loop(kb, e(0i64), e(w), |kb, ix, vec| {
                let acc = kb.var(neg_inf().lanes(vec));
                kb.for_(ylo.clone(), yhi.clone(), |kb, iy| kb.set(acc, e(acc).max(x.load(src.clone() + iy * pitch + ix.clone(), vec))));
                kb.store(rows, to.clone() + ix, acc);
            });
        });
        kb.for_(0usize, oh, |kb, oy| {
            let (from, to) = (kb.let_(oy.clone() * w), kb.let_(dst.clone() + oy * ow));
            let clipped = |kb: &mut Kb, ox: Expr| {
                let (xlo, xhi) = window(kb, ox.clone(), kw, p.stride[1], p.pad[1], w);
                let acc = kb.var(neg_inf());
                kb.for_(xlo, xhi, |kb, ix| kb.set(acc, e(acc).max(rows.at(from.clone() + ix))));
                kb.store(y, to.clone() + ox, acc);
            };
            kb.for_(0usize, first, |kb, ox| clipped(kb, ox));
            if last > first {
                let start = |ox: usize| (ox * p.stride[1] - p.pad[1]) as i64;
                overlapping_vector_loop(kb, e(start(first)), e(start(last - 1) + 1), |kb, i, vec| {
                    let v = (1..kw).fold(rows.load(from.clone() + i.clone(), vec), |m, kx| m.max(rows.load(from.clone() + i.clone() + kx, vec)));
                    kb.store(slide, i, v);
                });
                kb.for_(first, last, |kb, ox| kb.store(y, to.clone() + ox.clone(), slide.at(ox * p.stride[1] - p.pad[1])));
            }
            kb.for_(last, ow, |kb, ox| clipped(kb, ox));
        });
    });
}

/// Linear (+ReLU) at batch 1, as a bandwidth-bound GEMV: each task owns a range of output features
/// and streams their weight rows. Per row: two f32x4 partial sums over k in steps of 8 (with the
/// block's other rows, eight independent FMA chains hide the FMA latency), a scalar tail, then the
/// horizontal sum and the bias — the same arithmetic however rows are grouped. A block covers four rows
/// (one if the features are not a multiple of 4): eight independent FMA chains, and 8 accumulators + 2
/// shared vectors fit the 16 xmm registers. The weights are packed at compile time so that a block is
/// one sequential run — per step of 8, each row's 8 in turn, then the rows' tails — and a task reads one
/// stream. (Rows in place, four streams 36 KB apart, took AlexBN's fc6–8 12.3 ms at 1 thread against
/// 10.0 packed, 7.7 against 7.1 at 2 threads on AMD Zen 4, measured side by side; one row per block,
/// two chains, had been slower still.)
///
/// With bfloat16 weights ([`WeightsDtype::Bf16`]) the slots are f32 slots holding two of them: per 8
/// weights of a row, slot j has w[j] in its low half and w[4 + j] in its high half, so one 4-slot load
/// widens into the two vectors of weights the two partial sums take; the scalar tail has one per slot.
/// The arithmetic is the f32 GEMV's over the rounded weights, bit for bit.
fn linear(t: &mut Tables, n: &Node, l: &Linear, relu: bool) {
    if n.batch > 1 {
        return linear_as_gemm(t, n, l, relu);
    }
    const U: usize = 2;
    let (k, o) = (l.in_features, l.out_features);
    let rb = if o % 4 == 0 { 4 } else { 1 };
    let bias = n.params.get(1).map_or(vec![0.0; o], |b| b.data().to_vec());
    let step = U * LANES;
    let kv = k / step * step;
    let bf16 = t.fc_weights == WeightsDtype::Bf16;
    // Slots per row, and the slot of weight i (i < kv a multiple of 8, or a tail weight).
    let per = if bf16 { 2 } else { 1 };
    let (row, slot) = (kv / per + (k - kv), |i: Expr| if bf16 { i / 2i64 } else { i });
    // Each block of rb rows is one sequential run: per step of 8 weights, the rows' slots in turn, then
    // the rows' tails. bf16 slots hold a step as 4 pairs, and a tail weight each.
    let pair = |lo: f32, hi: f32| f32::from_bits((bf16_bits(hi) as u32) << 16 | bf16_bits(lo) as u32);
    let step_slots = |c: &[f32]| -> Vec<f32> {
        if bf16 {
            (0..LANES).map(|j| pair(c[j], c[LANES + j])).collect()
        } else {
            c.to_vec()
        }
    };
    let tail_slots = |c: &[f32]| -> Vec<f32> {
        if bf16 {
            c.iter().map(|&v| pair(v, 0.0)).collect()
        } else {
            c.to_vec()
        }
    };
    let rows: Vec<&[f32]> = n.params[0].data().chunks(k).collect();
    let w: Vec<f32> = rows
        .chunks(rb)
        .flat_map(|blk| {
            let body = (0..kv / step).flat_map(move |s| blk.iter().flat_map(move |r| step_slots(&r[s * step..][..step])));
            body.chain(blk.iter().flat_map(|r| tail_slots(&r[kv..])))
        })
        .collect();
    let (w, b) = (t.param(w), t.param(bias));
    let mut kb = Kb::new(format!("{}.{}", n.name, n.op.name()), o / rb);
    let [xb, wb, bb, yb] =
        [("x", k, Access::Read), ("W", o * row, Access::Read), ("b", o, Access::Read), ("y", o, Access::Write)].map(|(nm, len, a)| kb.buf(nm, len, a));
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, rp| {
        // Rows r0..r0 + rb.
        let r0 = kb.let_(rp * rb);
        let acc: Vec<Vec<_>> = (0..rb).map(|_| (0..U).map(|_| kb.var(e(0.0f32).splat())).collect()).collect();
        let tail: Vec<_> = (0..rb).map(|_| kb.var(0.0f32)).collect();
        let w0 = kb.let_(r0.clone() * row);
        kb.for_step(0usize, kv, step as i64, |kb, i| {
            // The input is loaded once for the block's rows.
            let x: Vec<Expr> = (0..U).map(|u| kb.let_(xb.at4(i.clone() + u * LANES))).collect();
            let at = kb.let_(w0.clone() + slot(i.clone()) * rb as i64);
            for (r, a) in acc.iter().enumerate() {
                let pairs = bf16.then(|| kb.let_(wb.at4(at.clone() + r * step / per)));
                for u in 0..U {
                    let w = match &pairs {
                        Some(p) => p.clone().bf16(u == 1),
                        None => wb.at4(at.clone() + (r * step + u * LANES)),
                    };
                    kb.set(a[u], w.fma(x[u].clone(), a[u]));
                }
            }
        });
        kb.for_(kv, k, |kb, i| {
            for (r, &a) in tail.iter().enumerate() {
                let w = wb.at(w0.clone() + (i.clone() - kv as i64) + (rb * kv / per + r * (k - kv)) as i64);
                kb.set(a, xb.at(i.clone()).fma(if bf16 { w.bf16(false) } else { w }, a));
            }
        });
        for (r, a) in acc.iter().enumerate() {
            let mut v = (e(a[0]) + a[1]).hsum() + tail[r] + bb.at(r0.clone() + r);
            if relu {
                v = v.max(0.0f32);
            }
            kb.store(yb, r0.clone() + r, v);
        }
    });
    t.launch(kb.finish(), vec![n.ins[0].0, w, b, n.out.0], 2 * (k * o) as u64);
}

/// Linear above batch 1, as GEMM tiles with the roles turned around, so that each weight is loaded as
/// part of a vector and used by up to MR samples: the tile's rows are samples (A = X packed per k in
/// blocks of MR samples, by a `pack_x` launch), its columns output features (B = Wᵀ, packed at compile
/// time in [feature tile][k][NR] panels and streamed once per MR samples), and C is Y itself. The
/// tile's bias is per row, so each task first fills its block of Y with the bias and the tile
/// accumulates onto it: bias, then one FMA per k in order, as everywhere. (As a 1×1 convolution over
/// Xᵀ, the weights were the broadcast operand, one load per FMA: AlexBN's fc6–8 at batch 8 took 22.4
/// ms against 12.1 this way with the tile's B prefetch, measured; at batch 2 the GEMV, one weight stream
/// per task per pass, took 20.9 ms, these tiles 11.3.)
fn linear_as_gemm(t: &mut Tables, n: &Node, l: &Linear, relu: bool) {
    let (k, o, b) = (l.in_features, l.out_features, n.batch);
    let (mr, nr) = (t.tier.mr(), t.tier.nr());
    let (blocks, tiles) = (b.div_ceil(mr), o.div_ceil(nr));
    // The bias is padded to whole tiles: at least MR long, as the tile's (unused) bias operand must be.
    let (mut panels, bias) = pack_blocks(n.params[0].data(), n.params.get(1).map(|b| b.data()), k, nr);
    panels.iter_mut().for_each(|v| *v = t.fc_weights.round(*v));
    let (wp, bp, xp) = (t.param(panels), t.param(bias), t.store(blocks * k * mr));
    let name = |s: &str| format!("{}.{s}", n.name);
    // xp[block][kk][r] = x[block·MR + r][kk], zero past the batch.
    let mut kb = Kb::new(name("pack_x"), blocks * k);
    let (xb, pb) = (kb.buf("x", b * k, Access::Read), kb.buf("xp", blocks * k * mr, Access::Write));
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, it| {
        let (blk, kk) = (kb.let_(it.clone() / k), kb.let_(it.clone() % k));
        let rows = kb.let_((e(b) - blk.clone() * mr).min(mr));
        kb.for_(0usize, rows.clone(), |kb, r| kb.store(pb, it.clone() * mr + r.clone(), xb.at((blk.clone() * mr + r) * k + kk.clone())));
        kb.for_(rows, mr, |kb, r| kb.store(pb, it.clone() * mr + r, e(0.0f32)));
    });
    t.launch(kb.finish(), vec![n.ins[0].0, xp], 0);
    // Tasks own feature tiles; each streams its panels once per block of samples.
    let mut kb = Kb::new(name("gemm"), tiles);
    let [ab, wb, bb, yb] =
        [("xp", blocks * k * mr, Access::Read), ("Wt", tiles * k * nr, Access::Read), ("b", tiles * nr, Access::Read), ("y", b * o, Access::Write)]
            .map(|(nm, len, a)| kb.buf(nm, len, a));
    let (lo, hi) = kb.range();
    let tier = t.tier;
    // Features f0..f0 + cols (`width`: how the portable tile covers them) of every sample block.
    let tile = |kb: &mut Kb, f0: Expr, cols: Expr, width: Option<Width>| {
        kb.for_(0usize, blocks, |kb, blk| {
            let rows = kb.let_((e(b) - blk.clone() * mr).min(mr));
            let c0 = kb.let_(blk.clone() * (mr * o) + f0.clone());
            kb.for_(0usize, rows.clone(), |kb, r| copy(kb, yb, c0.clone() + r * o, bb, f0.clone(), cols.clone()));
            let g = Gemm {
                a: ab,
                a0: blk * (k * mr),
                bias: bb,
                bias0: e(0i64),
                b: wb,
                b0: f0.clone() / nr * (k * nr) + f0.clone() % nr,
                c: yb,
                c0,
                rows_b: BRows::Strided(nr),
                ldc: o,
                depth: e(k),
                rows,
                cols: cols.clone(),
                accumulate: true,
                relu,
            };
            match width {
                Some(w) => micro(kb, &g, w, true),
                None => kb.gemm(g),
            }
        });
    };
    kb.for_(lo, hi, |kb, ft| {
        let f0 = kb.let_(ft.clone() * nr);
        match tier {
            Tier::Avx512 => tile(kb, f0.clone(), (e(o) - f0).min(nr), None),
            // The portable tile's widths are static: the last tile may be narrower.
            Tier::Portable => {
                let each = |kb: &mut Kb, cols: usize| {
                    for (at, n, w) in pieces(cols) {
                        tile(kb, f0.clone() + at, e(n), Some(w));
                    }
                };
                match o % nr {
                    0 => each(kb, nr),
                    last => kb.if_else(ft.lt(tiles - 1), |kb| each(kb, nr), |kb| each(kb, last)),
                }
            }
        }
    });
    t.launch(kb.finish(), vec![xp, wp, bp, n.out.0], 2 * (b * k * o) as u64);
}

/// How the portable tile covers `cols` ≤ NR columns: (first column, columns, width) — the whole vectors
/// in one call, then single columns.
fn pieces(cols: usize) -> Vec<(usize, usize, Width)> {
    let v = cols / LANES;
    let whole = (v > 0).then_some((0, v * LANES, Width::Vectors(v)));
    whole.into_iter().chain((v * LANES..cols).map(|c| (c, 1, Width::Scalar))).collect()
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
    let (mut a, mut bias) = (vec![], vec![]);
    for grp in 0..c.groups {
        let rows = grp * g.cog..(grp + 1) * g.cog;
        let (ga, gb) = pack_blocks(&w[rows.start * g.k..rows.end * g.k], b.map(|b| &b[rows]), g.k, mr);
        a.extend(ga);
        bias.extend(gb);
    }
    (a, bias)
}

/// Packs rows of `k` weights (row-major `w`) as [block][k][mr], zero rows past the last, and their
/// bias (zeros without one) as [block·mr + r]: the tile's A, or (turned around) a linear layer's B.
fn pack_blocks(w: &[f32], b: Option<&[f32]>, k: usize, mr: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = w.len() / k;
    let mut a = vec![0.0; rows.div_ceil(mr) * k * mr];
    for (row, ws) in w.chunks(k).enumerate() {
        for (kk, &v) in ws.iter().enumerate() {
            a[(row / mr * k + kk) * mr + row % mr] = v;
        }
    }
    let mut bias = b.map_or(vec![0.0; rows], <[f32]>::to_vec);
    bias.resize(rows.div_ceil(mr) * mr, 0.0);
    (a, bias)
}

/// Lowers convolution `n`; returns its packed weights and bias (none when it took Winograd, whose own
/// GEMMs pack theirs).
pub(super) fn conv(t: &mut Tables, n: &Node, c: &Conv2d, relu: bool, pool_after: Option<&Pool2d>) -> Option<(Ref, Ref)> {
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
    if let Some(f) = super::winograd::chosen(t.winograd, c, n.batch, [oh, ow]) {
        super::winograd::lower(t, n, c, f, relu, pool_after, [oh, ow]);
        return None;
    }
    let co = c.out_channels;
    let (mr, nr) = (t.tier.mr(), t.tier.nr());
    let (cig, k, ncb) = (ci / c.groups, ci / c.groups * kh * kw, (co / c.groups).div_ceil(mr));
    let avx = t.tier == Tier::Avx512;
    // Implicit columns (see [`Columns::Taps`]) mask the horizontal padding of stride-1 convolutions at
    // least as wide as their input; others read the whole phased input, whose row pitch the output then
    // has too (its extra columns are computed and skipped by the fused pool, the only reader).
    let masked = c.stride == [1, 1] && w <= ow;
    let [s0, s1] = c.stride;
    // The tile addresses a group's input with 32-bit offsets and displacements: bytes of the phased
    // input (padding, stride phases and the extra rows included) must stay below 2³¹.
    let group_bytes = 4 * cig * (h + 2 * c.pad[0] + s0 * (kh + 1)) * (w + 2 * c.pad[1] + s1);
    let columns = if kh == 1 && kw == 1 && c.stride == [1, 1] && c.pad == [0, 0] {
        Columns::Input
    } else if avx && (masked || pool_after.is_some()) && group_bytes < i32::MAX as usize {
        Columns::Taps
    } else if avx && c.groups * ncb * k * mr * 4 <= 1 << 20 {
        Columns::OnTheFly
    } else {
        Columns::Panels
    };
    let pitch = if columns == Columns::Taps && !masked { (w + 2 * c.pad[1]).div_ceil(s1) } else { ow };
    let g = Geo { cig, cog: co / c.groups, k, p: oh * pitch, ncb };
    // Elements from one (image, group)'s first input row (of unpacked columns) and output row to the next.
    let [gp_in, gp_out] = n.planes.as_ref().map_or([g.cig * g.p, g.cog * g.p], |p| p.pitch);
    debug_assert!(n.planes.is_none() || (n.batch == 1 && columns == Columns::Input));
    let (a, bias) = match n.planes.as_ref().and_then(|p| p.packed) {
        Some(packed) => packed,
        None => {
            let (a, bias) = pack_conv(c, &g, mr, n.params[0].data(), n.params.get(1).map(|b| b.data()));
            (t.param(a), t.param(bias))
        }
    };
    let name = |s: &str| format!("{}.{s}", n.name);
    let x = n.ins[0].0;
    // Slices of k per tile call (see [`KC`]); the portable tier takes k whole.
    let kc = match t.tier {
        Tier::Portable => g.k,
        Tier::Avx512 => (KC / kw).max(1) * kw,
    };
    let slices = g.k.div_ceil(kc);
    let ntiles = g.p.div_ceil(nr);
    // Packing reads the input through a zero-padded, stride-phase-split copy (see [`Phased`]), so that
    // each panel row is contiguous copies without bounds checks.
    let ph = match columns {
        Columns::Input => None,
        // Rows ow wide, padded only vertically.
        Columns::Taps if masked => Some(phase_split(t, n, &Conv2d { pad: [c.pad[0], 0], ..c.clone() }, [0, ow])),
        // A row past the last window's: the last output row's extra columns read up to (kw − 1) / s1
        // elements beyond it.
        Columns::Taps => Some(phase_split(t, n, c, [oh + (kh - 1) / s0 + 1, 0])),
        Columns::OnTheFly | Columns::Panels => Some(phase_split(t, n, c, [0, 0])),
    };
    let geo = |x: Buf, panel: Buf| Pack { c, g: &g, ci, ow, ph: ph.expect("phased input").1, x, panel, nr };
    let taps = ph.filter(|_| columns == Columns::Taps).map(|(_, ph)| {
        let (pad, w) = if masked { (c.pad[1], w) } else { (0, pitch) };
        Taps { kh, kw, stride: c.stride, pitch, phase: ph.hq * pitch, pad, w }
    });
    let (cols, col_len) = match (columns, ph) {
        (Columns::Input, _) => (x, gp_in * c.groups * n.batch),
        (Columns::OnTheFly | Columns::Taps, Some((xq, ph))) => (xq, ph.len(n.batch, ci)),
        (Columns::Panels, Some((xq, ph))) => {
            let len = n.batch * c.groups * ntiles * g.k * nr;
            let cols = t.store(len);
            let mut kb = Kb::new(name("im2col"), n.batch * c.groups * ntiles * slices);
            let (xb, cb) = (kb.buf("x", ph.len(n.batch, ci), Access::Read), kb.buf("cols", len, Access::Write));
            let (lo, hi) = kb.range();
            kb.for_(lo, hi, |kb, it| {
                let (tile, s) = (kb.let_(it.clone() / slices), kb.let_(it % slices));
                let (ig, col, k0) = (kb.let_(tile.clone() / ntiles), kb.let_(tile.clone() % ntiles * nr), kb.let_(s * kc));
                let cols = (e(g.p) - col.clone()).min(nr);
                let depth = (e(g.k) - k0.clone()).min(kc);
                pack(kb, &geo(xb, cb), ig.clone() / c.groups, ig % c.groups, k0.clone(), depth, col, cols, (tile * g.k + k0) * nr);
            });
            t.launch(kb.finish(), vec![xq, cols], 0);
            (cols, len)
        }
        _ => unreachable!("packed columns have a phased input"),
    };
    let conv_len = n.batch * c.groups * gp_out;
    let pre_pool = if pool_after.is_some() { t.store(conv_len) } else { n.out.0 };
    // Packed layers are split by column tiles; the others by channel blocks, so each task streams only
    // its share of A and pools its own channels in the same launch.
    let packed = columns == Columns::OnTheFly;
    let extent = n.batch * c.groups * if packed { ntiles } else { g.ncb };
    let mut kb = Kb::new(name("gemm"), extent);
    let ab = kb.buf("A", c.groups * g.ncb * g.k * mr, Access::Read);
    let bb = kb.buf("bias", c.groups * g.ncb * mr, Access::Read);
    let colb = kb.buf("cols", col_len, Access::Read);
    let yb = kb.buf("y", conv_len, Access::ReadWrite);
    let panel = packed.then(|| kb.buf("panel", kc * nr, Access::Local));
    let pooled = pool_after.filter(|_| !packed).map(|_| kb.buf("pooled", n.out_len(), Access::Write));
    // The tile's tables: lane masks per column tile, offsets per tap row (see [`BRows::Taps`]).
    let tables = taps.map(|tp| {
        let (masks, offsets) = tap_tables(&tp, g.p, nr, cig);
        (kb.buf("masks", masks.len(), Access::Read), t.param(masks), kb.buf("offsets", offsets.len(), Access::Read), t.param(offsets))
    });
    let (lo, hi) = kb.range();
    // Runs `f(k0, depth, accumulate, relu)` for every slice of k: the first starts from the bias, the
    // last applies the epilogue.
    let each_slice = |kb: &mut Kb, f: &dyn Fn(&mut Kb, Expr, Expr, bool, bool)| {
        if slices == 1 {
            return f(kb, e(0i64), e(g.k), false, relu);
        }
        f(kb, e(0i64), e(kc), false, false);
        kb.for_(1usize, slices - 1, |kb, s| f(kb, s * kc, e(kc), true, false));
        f(kb, e((slices - 1) * kc), e(g.k - (slices - 1) * kc), true, relu);
    };
    // Per (image, group) `ig`: the first column-matrix element and the first output element.
    let bbase = |ig: &Expr| {
        let plane = |plane: usize| ig.clone() / c.groups * (ci * plane) + ig.clone() % c.groups * (g.cig * plane);
        match (columns, taps) {
            (Columns::Input, _) => ig.clone() * gp_in,
            (Columns::Taps, Some(tp)) => plane(s0 * s1 * tp.phase),
            _ => ig.clone() * (ntiles * g.k * nr),
        }
    };
    let cbase = |ig: &Expr| ig.clone() * gp_out;
    // The tile of channel block `blk` × columns col..col + cols, for k in k0..k0 + depth.
    let gemm = |ig: &Expr, blk: Expr, k0: &Expr, depth: &Expr, col: &Expr, cols: Expr, accumulate: bool, relu: bool| {
        let blocks = ig.clone() % c.groups * g.ncb + blk.clone();
        Gemm {
            a: ab,
            a0: blocks.clone() * (g.k * mr) + k0.clone() * mr,
            bias: bb,
            bias0: blocks * mr,
            b: panel.unwrap_or(colb),
            b0: match columns {
                Columns::Input => bbase(ig) + k0.clone() * g.p + col.clone(),
                // Column col lies in panel col / NR, at col % NR of each of its rows.
                Columns::Panels => bbase(ig) + col.clone() / nr * (g.k * nr) + k0.clone() * nr + col.clone() % nr,
                Columns::Taps => bbase(ig),
                Columns::OnTheFly => e(0i64),
            },
            c: yb,
            c0: cbase(ig) + blk.clone() * (mr * g.p) + col.clone(),
            rows_b: match (taps, tables) {
                (Some(taps), Some((masks, _, offsets, _))) => {
                    BRows::Taps { taps, k0: k0.clone(), col: col.clone(), offsets, masks, masks0: col.clone() / nr * kw }
                }
                _ => BRows::Strided(if columns == Columns::Input { g.p } else { nr }),
            },
            ldc: g.p,
            depth: depth.clone(),
            rows: (e(g.cog) - blk * mr).min(mr),
            cols,
            accumulate,
            relu,
        }
    };
    let pack_panel = |kb: &mut Kb, ig: &Expr, k0: &Expr, depth: &Expr, col: &Expr, cols: &Expr| {
        if let Some(panel) = panel {
            pack(kb, &geo(colb, panel), ig.clone() / c.groups, ig.clone() % c.groups, k0.clone(), depth.clone(), col.clone(), cols.clone(), e(0i64));
        }
    };
    if packed {
        kb.for_(lo, hi, |kb, it| {
            let ig = kb.let_(it.clone() / ntiles);
            let col = kb.let_(it % ntiles * nr);
            let cols = kb.let_((e(g.p) - col.clone()).min(nr));
            each_slice(kb, &|kb, k0, depth, accumulate, relu| {
                pack_panel(kb, &ig, &k0, &depth, &col, &cols);
                kb.for_(0usize, g.ncb, |kb, blk| kb.gemm(gemm(&ig, blk, &k0, &depth, &col, cols.clone(), accumulate, relu)));
            });
        });
    } else {
        // Tasks own ranges of (image, group, channel block); each range is walked in chunks of blocks
        // (`chunk_blocks`) that never cross an (image, group) boundary.
        kb.for_(lo.clone() / g.ncb, (hi.clone() - 1i64) / g.ncb + 1i64, |kb, ig| {
            let b0 = kb.let_((lo.clone() - ig.clone() * g.ncb).max(0i64));
            let b1 = kb.let_((hi.clone() - ig.clone() * g.ncb).min(g.ncb));
            let mcb = chunk_blocks(t.tier);
            kb.for_step(b0, b1.clone(), mcb as i64, |kb, c0| {
                let c1 = kb.let_((c0.clone() + mcb).min(b1.clone()));
                each_slice(kb, &|kb, k0, depth, accumulate, relu| {
                    let blocks = |kb: &mut Kb, col: Expr, cols: Expr, width: Option<Width>| {
                        kb.for_(c0.clone(), c1.clone(), |kb, blk| {
                            let tile = gemm(&ig, blk, &k0, &depth, &col, cols.clone(), accumulate, relu);
                            match width {
                                Some(w) => micro(kb, &tile, w, !g.cog.is_multiple_of(mr)),
                                None => kb.gemm(tile),
                            }
                        });
                    };
                    match t.tier {
                        // Full tiles, then one tile of 1–2 vectors, then single columns.
                        Tier::Portable => {
                            let full = g.p / nr * nr;
                            kb.for_step(0usize, full, nr as i64, |kb, col| blocks(kb, col, e(nr), Some(Width::Vectors(nr / LANES))));
                            for (at, n, w) in pieces(g.p - full) {
                                blocks(kb, e(full + at), e(n), Some(w));
                            }
                        }
                        // The tile masks its own edge columns.
                        Tier::Avx512 => kb.for_step(0usize, g.p, nr as i64, |kb, col| {
                            let cols = (e(g.p) - col.clone()).min(nr);
                            blocks(kb, col, cols, None)
                        }),
                    }
                });
                if let (Some(p), Some(pb)) = (pool_after, pooled) {
                    let first = ig.clone() * g.cog + c0.clone() * mr;
                    let last = (ig.clone() * g.cog + c1.clone() * mr).min(ig.clone() * g.cog + g.cog);
                    pool(kb, p, false, yb, pb, first, last, [oh, ow, pitch], [n.out.1[1], n.out.1[2]]);
                }
            });
        });
    }
    let mut refs = vec![a, bias, cols, pre_pool];
    refs.extend(pooled.map(|_| n.out.0));
    refs.extend(tables.into_iter().flat_map(|(_, masks, _, offsets)| [masks, offsets]));
    t.launch(kb.finish(), refs, 2 * (n.batch * co * oh * ow * g.k) as u64);
    if let (Some(p), true) = (pool_after, packed) {
        pool_launch(t, n, p, pre_pool, [oh, ow]);
    }
    Some((a, bias))
}

/// Launches the max pooling fused after convolution `n`, from its [oh, ow] output in `x`.
pub(super) fn pool_launch(t: &mut Tables, n: &Node, p: &Pool2d, x: Ref, [oh, ow]: [usize; 2]) {
    let co = n.out.1[0];
    let mut kb = Kb::new(format!("{}.max_pool2d", n.name), n.batch * co);
    let (xb, pb) = (kb.buf("x", n.batch * co * oh * ow, Access::Read), kb.buf("y", n.out_len(), Access::Write));
    let (lo, hi) = kb.range();
    pool(&mut kb, p, false, xb, pb, lo, hi, [oh, ow, ow], [n.out.1[1], n.out.1[2]]);
    t.launch(kb.finish(), vec![x, n.out.0], 0);
}

/// Where a convolution's GEMM reads its column matrix (B).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Columns {
    /// 1×1 stride-1 unpadded convolutions: the input itself, [image][channel][pixel].
    Input,
    /// Written by an `im2col` launch as the tile reads it, [image][group][column tile][k][NR]: each k
    /// step of a tile is one contiguous run of NR floats and a panel one contiguous KC × NR block. (As a
    /// [k][pixel] matrix, rows sat 3 KB apart; with KC = 256, AlexNet conv2's AVX-512 tiles took 5.0–5.8
    /// ms against 4.3–4.75 ms with panels, measured side by side.)
    Panels,
    /// AVX-512 tier, when the columns cannot be read in place (strided convolutions without a pool)
    /// and the packed weights fit comfortably in L2 (under 1 MiB; AlexNet's conv1 has 139 KB): each task
    /// packs KC × NR panels into a stack buffer right before the tiles that read them (L1-hot, no
    /// round trip to memory). Tasks split the column tiles and each read all of A, so each panel is
    /// packed once; pooling needs whole planes and becomes a second launch. (Split by channel blocks,
    /// as the larger layers are, every task would pack every panel: 1–3 ms more per AlexNet layer.)
    OnTheFly,
    /// AVX-512 tier: no column matrix at all; the tile reads each tap in place, as pixel p's element
    /// plus a constant ([`BRows::Taps`]). Stride-1 convolutions whose output is at least as wide as
    /// their input read it padded with rows only, ow wide, and mask the lanes that fall on horizontal
    /// padding; others that are followed by a pool (AlexNet's stride-4 conv1) read the phased input,
    /// whose row pitch wq ≥ ow the output takes too (conv1: 57 for 55 columns, 3.6% extra work).
    /// Packing cost AlexNet's conv2–5 3.9 ms per inference; conv1 went from 2.6 ms + 0.5 ms of
    /// separate pooling to 1.55 ms with its pool fused (batch 1, 2 threads).
    Taps,
}

/// The tables of [`BRows::Taps`] for one (image, group), as u32/i32 bits in f32s: the lane masks of
/// every column tile ([tile][kx]: bit j set if output pixel `tile·nr + j` exists and reads memory at tap
/// column kx, [`Taps::source`] in `0..w`) and every tap row's [`Taps::offset`].
fn tap_tables(tp: &Taps, p: usize, nr: usize, cig: usize) -> (Vec<f32>, Vec<f32>) {
    let reads = |ox: usize, kx: usize| (0..tp.w as i64).contains(&tp.source(ox as i64, kx as i64));
    let mask = |col: usize, kx: usize| (0..nr.min(p - col)).filter(|j| reads((col + j) % tp.pitch, kx)).fold(0u32, |m, j| m | 1 << j);
    let masks = (0..p.div_ceil(nr)).flat_map(|t| (0..tp.kw).map(move |kx| f32::from_bits(mask(t * nr, kx)))).collect();
    let offset = |r: usize| i32::try_from(tp.offset(r as i64)).expect("under 2³¹: the lowering checks `group_bytes`") as u32;
    (masks, (0..cig * tp.kh).map(|r| f32::from_bits(offset(r))).collect())
}

/// How many output columns a microkernel call covers.
#[derive(Clone, Copy)]
enum Width {
    /// 1..=3 f32x4 vectors.
    Vectors(usize),
    /// One column, scalar (the last 1–3 columns of a row).
    Scalar,
}

/// A convolution input, zero-padded and split into stride phases, so that every row of the column
/// matrix is a contiguous run of it: `xq[img][c][ry][rx][iq][jq] = x[img][c][iq·s0 + ry − p0][jq·s1 + rx − p1]`
/// (zero outside the image) for phases ry < s0, rx < s1. Tap (ky, kx) of output pixel (oy, ox) is then
/// `xq[..][ky % s0][kx % s1][oy + ky / s0][ox + kx / s1]`. For stride 1 it is just the padded input;
/// for AlexNet's stride-4 conv1 it replaces a strided gather per panel element by vector copies.
#[derive(Clone, Copy)]
pub(super) struct Phased {
    pub s: [usize; 2],
    pub hq: usize,
    pub wq: usize,
}

impl Phased {
    pub fn len(&self, batch: usize, ci: usize) -> usize {
        batch * ci * self.s[0] * self.s[1] * self.hq * self.wq
    }
}

/// Launches the copy of `n`'s input into its [`Phased`] form, in a new store, with at least `min`
/// rows and columns per phase (the rows and columns past the padded input are zeros too).
pub(super) fn phase_split(t: &mut Tables, n: &Node, c: &Conv2d, min: [usize; 2]) -> (Ref, Phased) {
    let [ci, h, w] = [n.ins[0].1[0], n.ins[0].1[1], n.ins[0].1[2]];
    let ([s0, s1], [p0, p1]) = (c.stride, c.pad);
    let ph = Phased { s: c.stride, hq: (h + 2 * p0).div_ceil(s0).max(min[0]), wq: (w + 2 * p1).div_ceil(s1).max(min[1]) };
    let len = ph.len(n.batch, ci);
    let out = t.store(len);
    // One iteration per input row position (image, channel, ry, iq), all s1 column phases inside.
    let mut kb = Kb::new(format!("{}.phase_split", n.name), len / (s1 * ph.wq));
    let (xb, qb) = (kb.buf("x", n.in_len(0), Access::Read), kb.buf("xq", len, Access::Write));
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, it| {
        // it = (plane·s0 + ry)·hq + iq
        let (plane, ry, iq) = (kb.let_(it.clone() / (s0 * ph.hq)), kb.let_(it.clone() / ph.hq % s0), kb.let_(it.clone() % ph.hq));
        let iy = kb.let_(iq.clone() * s0 + ry.clone() - p0);
        let inside = kb.let_(e(0i64).le(iy.clone()).and(iy.clone().lt(h)));
        let src0 = kb.let_(plane.clone() * (h * w) + iy * w - p1);
        // The column phases unrolled, so that each one's bounds are constants: rows are short (a
        // Winograd input's phases are 4–5 wide) and computing them per row cost more than the copy.
        for rx in 0..s1 {
            let dst = kb.let_((((plane.clone() * s0 + ry.clone()) * s1 + rx) * ph.hq + iq.clone()) * ph.wq);
            // Phase columns jq whose input column jq·s1 + rx − p1 is inside the image.
            let jlo = ((p1 + s1 - 1).saturating_sub(rx) / s1).min(ph.wq);
            let jhi = ((w + p1 + s1 - 1 - rx) / s1).min(ph.wq).max(jlo);
            kb.if_else(
                inside.clone(),
                |kb| {
                    if jlo > 0 {
                        zero(kb, qb, dst.clone(), e(jlo));
                    }
                    let src = kb.let_(src0.clone() + rx);
                    if s1 == 1 {
                        copy(kb, qb, dst.clone() + jlo, xb, src + jlo, jhi - jlo);
                    } else {
                        // Loop-carried addresses: Cranelift otherwise recomputed src and dst from their
                        // multiplications in every iteration (seen in --emit asm).
                        let (from, to) = (kb.var(src.clone() + jlo * s1), kb.var(dst.clone() + jlo));
                        kb.for_(jlo, jhi, |kb, _| {
                            kb.store(qb, to, xb.at(from));
                            kb.set(from, from + s1);
                            kb.set(to, to + 1i64);
                        });
                    }
                    if jhi < ph.wq {
                        zero(kb, qb, dst.clone() + jhi, e(ph.wq - jhi));
                    }
                },
                |kb| zero(kb, qb, dst.clone(), e(ph.wq)),
            );
        }
    });
    t.launch(kb.finish(), vec![n.ins[0].0, out], 0);
    (out, ph)
}

/// What [`pack`] needs of a convolution.
struct Pack<'a> {
    c: &'a Conv2d,
    g: &'a Geo,
    ci: usize,
    ow: usize,
    ph: Phased,
    /// The [`Phased`] input.
    x: Buf,
    panel: Buf,
    nr: usize,
}

/// Packs rows k0..k0 + depth, columns col..col + cols of image `img`, group `grp`'s column matrix into
/// `panel` from element `base` on (row stride NR; columns past `cols` are left as they are). k0 and
/// depth are whole rows of taps (multiples of kw), so that (channel, ky) is derived once per kw rows.
/// The columns are output pixels; they run along output rows, so each k row is copied as segments of
/// one output row each, every segment one contiguous run of the phased input.
#[allow(clippy::too_many_arguments)]
fn pack(kb: &mut Kb, p: &Pack, img: Expr, grp: Expr, k0: Expr, depth: Expr, col: Expr, cols: Expr, base: Expr) {
    let ([kh, kw], [s0, s1], Phased { hq, wq, .. }) = (p.c.kernel, p.c.stride, p.ph);
    let (oy0, ox0) = (kb.let_(col.clone() / p.ow), kb.let_(col % p.ow));
    let end = kb.let_(ox0.clone() + cols);
    let segments = kb.let_((end.clone() + (p.ow - 1)) / p.ow);
    let first_plane = kb.let_((img * p.ci + grp * p.g.cig) * (s0 * s1));
    let r0 = kb.let_(k0 / kw);
    // Segments outside, k inside: a segment's geometry is computed once per panel, not once per row.
    kb.for_(0usize, segments, |kb, seg| {
        // This segment covers ox in a..b of output row oy0 + seg; panel column = ox + (seg·ow − ox0).
        let a = kb.let_(seg.clone().eq(0i64).select(ox0.clone(), 0i64));
        let len = kb.let_((end.clone() - seg.clone() * p.ow).min(p.ow) - a.clone());
        let dst0 = kb.let_(base.clone() + seg.clone() * p.ow - ox0.clone() + a.clone());
        let row = kb.let_((oy0.clone() + seg) * wq + a);
        kb.for_(0usize, depth.clone() / kw, |kb, rr| {
            // Tap row r = (channel, ky) of this slice; its kw taps are the next kw panel rows.
            let r = kb.let_(r0.clone() + rr.clone());
            let (ch, ky) = (kb.let_(r.clone() / kh), kb.let_(r % kh));
            let plane = kb.let_(first_plane.clone() + ch * (s0 * s1) + ky.clone() % s0 * s1);
            let src = kb.let_(row.clone() + ky / s0 * wq);
            let dst = kb.let_(dst0.clone() + rr * (kw * p.nr));
            kb.for_(0usize, kw, |kb, kx| {
                let (phase, shift) = if s1 == 1 { (e(0i64), kx.clone()) } else { (kx.clone() % s1, kx.clone() / s1) };
                let from = (plane.clone() + phase) * (hq * wq) + src.clone() + shift;
                copy(kb, p.panel, dst.clone() + kx * p.nr, p.x, from, len.clone());
            });
        });
    });
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
    let BRows::Strided(ldb) = g.rows_b else { unreachable!("the portable tier packs its columns") };
    let (a0, b0) = (kb.var(g.a0.clone()), kb.var(g.b0.clone()));
    let acc: Vec<Vec<_>> = (0..mr)
        .map(|r| {
            (0..nv)
                .map(|v| {
                    if !g.accumulate {
                        let bias = g.bias.at(g.bias0.clone() + r);
                        return kb.var(bias.lanes(vec));
                    }
                    let at = g.c0.clone() + r * g.ldc + v * LANES;
                    let acc = kb.var(e(0.0f32).lanes(vec));
                    let load = |kb: &mut Kb| kb.set(acc, g.c.load(at, vec));
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
            let a = kb.let_(a.lanes(vec));
            for (v, &acc) in row.iter().enumerate() {
                kb.set(acc, a.clone().fma(bv[v].clone(), acc));
            }
        }
        kb.set(a0, e(a0) + mr);
        kb.set(b0, e(b0) + ldb);
    });
    for (r, row) in acc.iter().enumerate() {
        let store = |kb: &mut Kb| {
            for (v, &acc) in row.iter().enumerate() {
                let mut val = e(acc);
                if g.relu {
                    val = val.max(e(0.0f32).lanes(vec));
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
