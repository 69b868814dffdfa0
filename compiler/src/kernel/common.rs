//! What every lowering strategy shares: the tables lowering fills ([`Tables`]: stores, packed
//! parameters, launches), the node being lowered ([`Node`]), and the loops and copies kernels are built
//! from (vector loops, copies, fills, the stride-phase split of convolution inputs).
//! Invariant left: a helper writes only the elements it is given, and [`Tables`] numbers stores,
//! parameters and launches in the order they are asked for (the memory plan and listings rely on it).

use super::{e, transpose, Access, Buf, Expr, Kb, Kernel, Tier, WeightsDtype, Winograd, LANES};
use cnnc_runtime::exec::Buffer;
use cnnc_runtime::op::Pool2d;
use cnnc_runtime::{Op, Tensor};
use std::sync::Arc;

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
    /// GPU-shaped kernels where there are some ([`super::gpu`]): the cuda backend's lowering.
    pub gpu: bool,
    /// The whole batch, which methods are chosen for (a node's `batch` is one replica's share).
    pub batch: usize,
    pub stores: Vec<usize>,
    pub params: Vec<Arc<Buffer>>,
    pub launches: Vec<(Kernel, Vec<Ref>, u64)>,
    /// Copies of tensors made for convolutions, by input and kind, with the launch count then: ResNet's
    /// strided 1×1 convolution and its projection shortcut read the same [`subsample`], GoogLeNet's 1×1
    /// convolutions of one input on 7 × 7 maps the same turned-around `pack_x`.
    pub copies: Vec<((Ref, Copied), Ref, usize)>,
}

/// What a copy in [`Tables::copies`] holds.
#[derive(Clone, Copy, PartialEq)]
pub enum Copied {
    /// Every stride-th pixel: [`subsample`].
    Subsample([usize; 2]),
    /// The input as a turned-around 1×1 convolution's A (`gemm::turned_conv`).
    TurnedColumns,
}

impl Tables {
    pub fn store(&mut self, len: usize) -> Ref {
        self.stores.push(len);
        Ref::Store(self.stores.len() - 1)
    }
    /// A packed parameter, copied into its aligned buffer now so that the packing's vector is freed
    /// at once (large ones are packed in place: [`Tables::packed`]).
    pub fn param(&mut self, data: Vec<f32>) -> Ref {
        self.packed(buffer(data.len(), |b| b.copy_from_slice(&data)))
    }
    pub fn packed(&mut self, b: Buffer) -> Ref {
        self.params.push(Arc::new(b));
        Ref::Param(self.params.len() - 1)
    }
    pub fn launch(&mut self, k: Kernel, refs: Vec<Ref>, flops: u64) {
        self.launches.push((k, refs, flops));
    }
    /// Whether a launch from number `since` on writes `r` (an in-place op gives its output its input's
    /// store).
    fn written(&self, r: Ref, since: usize) -> bool {
        self.launches[since..].iter().any(|(k, refs, _)| k.args().zip(refs).any(|(b, &x)| x == r && b.access != Access::Read))
    }
    /// The copy `key` made earlier, if nothing has written its input since.
    pub fn copy_of(&self, key: (Ref, Copied)) -> Option<Ref> {
        self.copies.iter().find(|(k, ..)| *k == key).filter(|&&(_, _, at)| !self.written(key.0, at)).map(|&(_, made, _)| made)
    }
    /// Records `made`, launched just now, as the copy `key`.
    pub fn copied(&mut self, key: (Ref, Copied), made: Ref) {
        self.copies.retain(|(k, ..)| *k != key);
        self.copies.push((key, made, self.launches.len()));
    }
}

/// A parameter buffer of `len` floats, filled by `fill`. Parameter sizes were checked against memory
/// before lowering (twice the bound parameters, see `cnnc::load`), so a refusal here is as unexpected
/// as a `Vec`'s and aborts like one.
pub fn buffer(len: usize, fill: impl FnOnce(&mut [f32])) -> Buffer {
    use std::alloc::{handle_alloc_error, Layout};
    let mut b = Buffer::zeroed(len).unwrap_or_else(|e| handle_alloc_error(Layout::from_size_align(e.bytes, 64).unwrap_or(Layout::new::<f32>())));
    fill(&mut b);
    b
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
    pub fn in_len(&self, i: usize) -> usize {
        self.batch * self.ins[i].1.iter().product::<usize>()
    }
    pub fn out_len(&self) -> usize {
        self.batch * self.out.1.iter().product::<usize>()
    }
}

/// `for i in lo..hi`, four elements at a time while at least four remain, then one at a time; `body`
/// is told which (`true`: a vector of four at `i`).
pub fn vector_loop(kb: &mut Kb, lo: Expr, hi: Expr, body: impl Fn(&mut Kb, Expr, bool)) {
    let lo = kb.let_(lo);
    let vend = kb.let_(lo.clone() + (hi.clone() - lo.clone()) / LANES * LANES);
    kb.for_step(lo, vend.clone(), LANES as i64, |kb, i| body(kb, i, true));
    kb.for_(vend, hi, |kb, i| body(kb, i, false));
}

/// `for i in lo..hi` four at a time, where writing an element twice is harmless (copies and fills):
/// ranges of four or more end with one vector that overlaps the previous one instead of a scalar tail
/// (im2col copies rows of 13–55 floats, so the tail was a large share of the work). A constant range
/// emits the body once: vectors at lo, lo + 4, …, each start clamped to hi − 4, or scalars where it is
/// shorter than four. The Winograd transforms' bodies are thousands of instructions, and three copies
/// of them (vector loop, tail, scalar loop) were two thirds of ResNet-50's code generation.
pub fn overlapping_vector_loop(kb: &mut Kb, lo: Expr, hi: Expr, body: impl Fn(&mut Kb, Expr, bool)) {
    if let (&Expr::Int(l), &Expr::Int(h)) = (&lo, &hi) {
        let n = (h - l).max(0) as usize;
        if n < LANES {
            return kb.for_(lo, hi, |kb, i| body(kb, i, false));
        }
        return kb.for_(0usize, n.div_ceil(LANES), |kb, j| {
            let i = j * LANES + l;
            let i = if n.is_multiple_of(LANES) { i } else { kb.let_(i.min(h - LANES as i64)) };
            body(kb, i, true)
        });
    }
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

/// `body`, under `if cond` where there is a condition.
pub fn guarded(kb: &mut Kb, cond: Option<Expr>, body: impl FnOnce(&mut Kb)) {
    match cond {
        Some(c) => kb.if_(c, body),
        None => body(kb),
    }
}

/// What a convolution applies between its sum (with bias) and the store, in this order: a residual
/// add of `add` (the fused node's second input, the output's shape), ReLU, max pooling (never with an add).
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub add: Option<Ref>,
    pub relu: bool,
    pub pool: Option<&'a Pool2d>,
}

impl Epilogue<'_> {
    /// Whether ReLU goes on the sum itself; after an add, whatever adds applies it (the tile's epilogue,
    /// [`add_tail`], a turned convolution's transpose).
    pub fn relu_on_sum(&self) -> bool {
        self.relu && self.add.is_none()
    }
}

/// `y[i] = y[i] + r[i]`, then ReLU if `relu`, for `i` in `lo..hi`: a fused residual add over outputs the
/// task has just stored (still in cache), rounded exactly as a separate add and ReLU would be.
pub fn add_tail(kb: &mut Kb, [y, r]: [Buf; 2], lo: Expr, hi: Expr, relu: bool) {
    vector_loop(kb, lo, hi, |kb, i, vec| {
        let v = y.load(i.clone(), vec) + r.load(i.clone(), vec);
        kb.store(y, i, if relu { v.max(e(0.0f32).lanes(vec)) } else { v })
    });
}

/// `dst[d..d + n] = src[s..s + n]` (the ranges do not overlap).
pub fn copy(kb: &mut Kb, dst: Buf, d: Expr, src: Buf, s: Expr, n: impl Into<Expr>) {
    let delta = kb.let_(s - d.clone());
    let end = d.clone() + n;
    overlapping_vector_loop(kb, d, end, |kb, i, vec| {
        let v = src.load(i.clone() + delta.clone(), vec);
        kb.store(dst, i, v)
    });
}

/// `dst[d..d + n] = src[s..s + n]` for a short run, n ≤ `max`, without a loop (a loop and its branches
/// cost more than copying rows of 4–16 floats): where n ≥ 4, ⌈max / 4⌉ vector copies at 0, 4, …, each
/// clamped to n − 4 (those past the end repeat the last); under four, scalars. A constant n takes
/// exactly ⌈n / 4⌉ copies at constant offsets and no branch.
pub fn copy_short(kb: &mut Kb, dst: Buf, d: Expr, src: Buf, s: Expr, n: Expr, max: usize) {
    let (d, s) = (kb.let_(d), kb.let_(s));
    let one = |kb: &mut Kb, at: Expr, vec: bool| kb.store(dst, d.clone() + at.clone(), src.load(s.clone() + at, vec));
    if let Expr::Int(n) = n {
        let n = n as usize;
        return match n < LANES {
            true => (0..n).for_each(|i| one(kb, e(i), false)),
            false => (0..n.div_ceil(LANES)).for_each(|v| one(kb, e((v * LANES).min(n - LANES)), true)),
        };
    }
    let n = kb.let_(n);
    kb.if_else(
        e(LANES).le(n.clone()),
        |kb| {
            let last = kb.let_(n.clone() - LANES);
            for v in 0..max.div_ceil(LANES) {
                let at = kb.let_(e(v * LANES).min(last.clone()));
                one(kb, at, true);
            }
        },
        |kb| kb.for_(0usize, n.clone(), |kb, i| one(kb, i, false)),
    );
}

/// `dst[d..d + n] = 0`.
pub fn zero(kb: &mut Kb, dst: Buf, d: Expr, n: Expr) {
    overlapping_vector_loop(kb, d.clone(), d + n, |kb, i, vec| kb.store(dst, i, e(0.0f32).lanes(vec)));
}

/// A convolution input, zero-padded and split into stride phases, so that every row of the column
/// matrix is a contiguous run of it: `xq[img][c][ry][rx][iq][jq] = x[img][c][iq·s0 + ry − p0][jq·s1 + rx − p1]`
/// (zero outside the image) for phases ry < s0, rx < s1. Tap (ky, kx) of output pixel (oy, ox) is then
/// `xq[..][ky % s0][kx % s1][oy + ky / s0][ox + kx / s1]`. For stride 1 it is just the padded input;
/// for AlexNet's stride-4 conv1 it replaces a strided gather per panel element by vector copies.
#[derive(Clone, Copy)]
pub struct Phased {
    pub s: [usize; 2],
    pub hq: usize,
    pub wq: usize,
}

impl Phased {
    pub fn len(&self, batch: usize, ci: usize) -> usize {
        batch * ci * self.s[0] * self.s[1] * self.hq * self.wq
    }
}

/// Every `stride`-th row and column of `n`'s input from (0, 0), `[oh, ow]` of them per plane, in a
/// store: the column matrix of a 1×1 unpadded convolution with that stride. Launches the copy unless an
/// earlier node made the same one of a store nothing has written since.
pub fn subsample(t: &mut Tables, n: &Node, [s0, s1]: [usize; 2], [oh, ow]: [usize; 2]) -> Ref {
    let key = (n.ins[0].0, Copied::Subsample([s0, s1]));
    if let Some(made) = t.copy_of(key) {
        return made;
    }
    let [ci, h, w] = [n.ins[0].1[0], n.ins[0].1[1], n.ins[0].1[2]];
    let len = n.batch * ci * oh * ow;
    let out = t.store(len);
    let mut kb = Kb::new(format!("{}.subsample", n.name), n.batch * ci * oh);
    let (xb, sb) = (kb.buf("x", n.in_len(0), Access::Read), kb.buf("xs", len, Access::Write));
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, row| {
        let from = kb.var(row.clone() / oh * (h * w) + row.clone() % oh * (s0 * w));
        let to = kb.var(row * ow);
        kb.for_(0usize, ow, |kb, _| {
            kb.store(sb, to, xb.at(from));
            kb.set(from, from + s1);
            kb.set(to, to + 1i64);
        });
    });
    t.launch(kb.finish(), vec![n.ins[0].0, out], 0);
    t.copied(key, out);
    out
}

/// Launches the copy of `n`'s input into its [`Phased`] form for `stride` and `pad`, in a new store,
/// with at least `min` rows and columns per phase (the rows and columns past the padded input are zeros
/// too).
pub fn phase_split(t: &mut Tables, n: &Node, stride: [usize; 2], [p0, p1]: [usize; 2], min: [usize; 2]) -> (Ref, Phased) {
    let [ci, h, w] = [n.ins[0].1[0], n.ins[0].1[1], n.ins[0].1[2]];
    let [s0, s1] = stride;
    let ph = Phased { s: stride, hq: (h + 2 * p0).div_ceil(s0).max(min[0]), wq: (w + 2 * p1).div_ceil(s1).max(min[1]) };
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
        let dst: Vec<Expr> = (0..s1).map(|rx| kb.let_((((plane.clone() * s0 + ry.clone()) * s1 + rx) * ph.hq + iq.clone()) * ph.wq)).collect();
        // Phase columns jq whose input column jq·s1 + rx − p1 is inside the image: jlo(rx)..jhi(rx).
        let jlo = |rx: usize| ((p1 + s1 - 1).saturating_sub(rx) / s1).min(ph.wq);
        let jhi = |rx: usize| ((w + p1 + s1 - 1 - rx) / s1).min(ph.wq).max(jlo(rx));
        // With 2 or 4 phases, the columns inside for every phase (j0..j1, four or more) are
        // deinterleaved four at a time: s1 vectors of 4·s1 consecutive input columns, transposed
        // (4 phases) or split into even and odd lanes (2), one vector store per phase.
        let (j0, j1) = ((0..s1).map(jlo).max().unwrap_or(0), (0..s1).map(jhi).min().unwrap_or(0));
        let (j0, j1) = if (s1 == 2 || s1 == 4) && j1 >= j0 + LANES { (j0, j1) } else { (0, 0) };
        kb.if_else(
            inside,
            |kb| {
                for (rx, dst) in dst.iter().enumerate() {
                    let (jlo, jhi) = (jlo(rx), jhi(rx));
                    if jlo > 0 {
                        zero(kb, qb, dst.clone(), e(jlo));
                    }
                    let src = kb.let_(src0.clone() + rx);
                    if s1 == 1 {
                        copy(kb, qb, dst.clone() + jlo, xb, src + jlo, jhi - jlo);
                    } else {
                        // Loop-carried addresses: Cranelift otherwise recomputed src and dst from their
                        // multiplications in every iteration (seen in --emit asm).
                        for (a, b) in [(jlo, j0.max(jlo)), (j1.max(jlo), jhi)] {
                            let (from, to) = (kb.var(src.clone() + a * s1), kb.var(dst.clone() + a));
                            kb.for_(a, b, |kb, _| {
                                kb.store(qb, to, xb.at(from));
                                kb.set(from, from + s1);
                                kb.set(to, to + 1i64);
                            });
                        }
                    }
                    if jhi < ph.wq {
                        zero(kb, qb, dst.clone() + jhi, e(ph.wq - jhi));
                    }
                }
                if j1 > j0 {
                    overlapping_vector_loop(kb, e(j0), e(j1), |kb, jq, _| {
                        let at = kb.let_(src0.clone() + jq.clone() * s1);
                        let l: Vec<Expr> = (0..s1).map(|k| kb.let_(xb.load(at.clone() + k * LANES, true))).collect();
                        let phases = match s1 {
                            4 => transpose([0, 1, 2, 3].map(|k| l[k].clone())).to_vec(),
                            _ => vec![l[0].clone().shuffle(l[1].clone(), [0, 2, 4, 6]), l[0].clone().shuffle(l[1].clone(), [1, 3, 5, 7])],
                        };
                        for (dst, v) in dst.iter().zip(phases) {
                            kb.store(qb, dst.clone() + jq.clone(), v);
                        }
                    });
                }
            },
            |kb| dst.iter().for_each(|dst| zero(kb, qb, dst.clone(), e(ph.wq))),
        );
    });
    t.launch(kb.finish(), vec![n.ins[0].0, out], 0);
    (out, ph)
}
