//! Element-wise and data-movement ops: ReLU, add, multiply (also by a per-channel scale), batch normalization, LRN, softmax, and the block
//! copies of concat, slice and transpose. One launch each, parallel over chunks, planes or rows.
//! Invariant left: each output element is computed from its inputs alone, in a fixed order, so results
//! do not depend on how the parallel loop is split.

use super::common::{copy, overlapping_vector_loop, vector_loop, Node, Ref, Tables};
use super::{e, Access, Buf, Expr, Kb, LANES};
use cnnc_runtime::op::{Axis, BatchNorm, Lrn};

/// Elements per parallel iteration of element-wise kernels: large enough to amortize the loop, small
/// enough that two tasks get equal shares of a 55×55 feature map. On a GPU a parallel iteration is a
/// thread, and a thread a vector ([`chunk`]).
const CHUNK: usize = 4096;

/// Elements per parallel iteration of [`map`] for the lowering `t` is doing.
fn chunk(t: &Tables) -> usize {
    if t.gpu {
        LANES
    } else {
        CHUNK
    }
}

/// The launch's name: the node's, then the op's.
fn name(n: &Node) -> String {
    format!("{}.{}", n.name, n.op.name())
}

/// A point-wise op over the node's `K` inputs: `f` builds an output element from theirs (written for
/// vectors of four; the scalar tail gets its constants devectorized).
pub fn pointwise<const K: usize>(t: &mut Tables, n: &Node, f: impl Fn([Expr; K]) -> Expr) {
    map(t, &name(n), n.out_len(), &std::array::from_fn(|i| n.ins[i].0), n.out.0, f)
}

/// `x · s` with one `s` per (sample, channel), `s` being (N, C, 1, 1): one plane per parallel iteration.
pub fn scale(t: &mut Tables, n: &Node) {
    let (c, hw) = (n.ins[0].1[0], n.ins[0].1[1..].iter().product::<usize>());
    let mut kb = Kb::new(name(n), n.batch * c);
    let [xb, sb, yb] =
        [("x", n.out_len(), Access::Read), ("s", n.batch * c, Access::Read), ("y", n.out_len(), Access::Write)].map(|(nm, len, a)| kb.buf(nm, len, a));
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, plane| {
        let s = kb.let_(sb.at(plane.clone()));
        let s4 = kb.let_(s.clone().splat());
        let base = kb.let_(plane * hw);
        vector_loop(kb, base.clone(), base + hw, |kb, i, vec| kb.store(yb, i.clone(), xb.load(i, vec) * if vec { s4.clone() } else { s.clone() }));
    });
    t.launch(kb.finish(), vec![n.ins[0].0, n.ins[1].0, n.out.0], n.out_len() as u64);
}

/// Batch normalization at inference as one FMA per element, per-channel constants folded in f64.
pub fn batch_norm(t: &mut Tables, n: &Node, bn: &BatchNorm) {
    let (x, y) = (n.ins[0].0, n.out.0);
    // y = x·s + (β − mean·s), s = γ/√(var + eps), computed once in f64.
    let p: Vec<&[f32]> = n.params.iter().map(|p| p.data()).collect();
    let s: Vec<f64> = (0..bn.channels).map(|c| p[0][c] as f64 / (p[3][c] as f64 + bn.eps.0).sqrt()).collect();
    let shift = (0..bn.channels).map(|c| (p[1][c] as f64 - p[2][c] as f64 * s[c]) as f32).collect();
    let (s, shift) = (t.param(s.iter().map(|&v| v as f32).collect()), t.param(shift));
    let (c, hw) = (n.ins[0].1[0], n.ins[0].1[1..].iter().product::<usize>());
    let mut kb = Kb::new(name(n), n.batch * c);
    let [xb, sb, bb, yb] = [("x", n.out_len(), Access::Read), ("scale", c, Access::Read), ("shift", c, Access::Read), ("y", n.out_len(), Access::Write)]
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

/// Chainer's LRN, one plane per parallel iteration, four pixels at a time (on a GPU, one element).
/// The window's squares are summed in channel order with FMAs; (k + αΣ)^(−β) is exp(−β·ln(k + αΣ)),
/// or for the usual β = 3/4, 1 / (√d · √√d): three correctly rounded operations (within a few ulps of
/// the reference's f64 power) instead of two libm calls per lane, which took a third of GoogLeNet's
/// time (measured: docs/benchmarks.md).
pub fn lrn(t: &mut Tables, n: &Node, l: &Lrn) {
    let (x, y) = (n.ins[0].0, n.out.0);
    let [c, hw] = [n.ins[0].1[0], n.ins[0].1[1..].iter().product()];
    let mut kb = Kb::new(name(n), n.batch * c * if t.gpu { hw } else { 1 });
    let (xb, yb) = (kb.buf("x", n.in_len(0), Access::Read), kb.buf("y", n.out_len(), Access::Write));
    let (lo, hi) = kb.range();
    let half = (l.n / 2) as i64;
    // A plane's image and window of channels (once per plane on the CPU), then one element of it.
    let window = |kb: &mut Kb, plane: &Expr| {
        let (img, ch) = (kb.let_(plane.clone() / c), kb.let_(plane.clone() % c));
        [img, kb.let_((ch.clone() - half).max(0i64)), kb.let_((ch + half + 1i64).min(c))]
    };
    let element = |kb: &mut Kb, [img, j0, j1]: &[Expr; 3], plane: &Expr, p: Expr, vec: bool| {
        let sum = kb.var(e(0.0f32).lanes(vec));
        kb.for_(j0.clone(), j1.clone(), |kb, j| {
            let v = kb.let_(xb.load((img.clone() * c + j) * hw + p.clone(), vec));
            kb.set(sum, v.clone().fma(v, sum));
        });
        let i = plane.clone() * hw + p;
        let d = kb.let_(e(sum).fma(e(l.alpha.0 as f32).lanes(vec), e(l.k.0 as f32).lanes(vec)));
        let y = match l.beta.0 == 0.75 {
            true => {
                let r = kb.let_(d.sqrt());
                xb.load(i.clone(), vec) / (r.clone() * r.sqrt())
            }
            false => xb.load(i.clone(), vec) * (d.ln() * e(-l.beta.0 as f32).lanes(vec)).exp(),
        };
        kb.store(yb, i, y);
    };
    match t.gpu {
        true => kb.for_(lo, hi, |kb, it| {
            let plane = kb.let_(it.clone() / hw);
            let w = window(kb, &plane);
            element(kb, &w, &plane, it % hw, false)
        }),
        false => kb.for_(lo, hi, |kb, plane| {
            let w = window(kb, &plane);
            overlapping_vector_loop(kb, e(0i64), e(hw), |kb, p, vec| element(kb, &w, &plane, p, vec))
        }),
    }
    t.launch(kb.finish(), vec![x, y], n.out_len() as u64 * (2 * l.n as u64 + 4));
}

/// Softmax along `axis`, max-subtracted, one row per parallel iteration.
pub fn softmax(t: &mut Tables, n: &Node, axis: Axis) {
    let (x, y) = (n.ins[0].0, n.out.0);
    let s = n.ins[0].1;
    let ax = axis.0 - 1;
    let (outer, len, inner) = (n.batch * s[..ax].iter().product::<usize>(), s[ax], s[ax + 1..].iter().product::<usize>());
    let mut kb = Kb::new(name(n), outer * inner);
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

/// Concat along `axis`, or (with `slice`, its start and length) a slice of one input: block copies,
/// `outer` rows each a run of elements per input. Each row is copied in pieces of at least 16 KiB, in
/// parallel: a channel concat at batch 1 is one row (GoogLeNet's were one task each). On a GPU a piece
/// is a vector, each a thread's.
pub fn copies(t: &mut Tables, n: &Node, axis: Axis, slice: Option<(usize, usize)>) {
    let y = n.out.0;
    let ax = axis.0 - 1;
    let out = n.out.1;
    let (outer, per_out) = (n.batch * out[..ax].iter().product::<usize>(), out[ax..].iter().product::<usize>());
    let pieces = if t.gpu { (per_out / LANES).max(1) } else { (per_out / 4096).clamp(1, 16) };
    let mut kb = Kb::new(name(n), outer * pieces);
    let ins: Vec<Buf> = (0..n.ins.len()).map(|i| kb.buf(format!("x{i}"), n.in_len(i), Access::Read)).collect();
    let yb = kb.buf("y", n.out_len(), Access::Write);
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, it| {
        let o = kb.let_(it.clone() / pieces);
        // This piece's elements a..b of the output row, and of each input's run the part inside them.
        let (a, b) = (kb.let_(it.clone() % pieces * per_out / pieces), kb.let_((it % pieces + 1i64) * per_out / pieces));
        let mut dst = 0;
        for (i, &xb) in ins.iter().enumerate() {
            let per_in: usize = n.ins[i].1[ax..].iter().product();
            let (src, len) = match slice {
                Some((start, len)) => (o.clone() * per_in + start * per_out / len, per_out),
                None => (o.clone() * per_in, per_in),
            };
            let (from, to) = (kb.let_(a.clone().max(dst as i64)), kb.let_(b.clone().min((dst + len) as i64)));
            kb.if_(from.clone().lt(to.clone()), |kb| {
                copy(kb, yb, o.clone() * per_out + from.clone(), xb, src + from.clone() - dst as i64, to - from);
            });
            dst += len;
        }
    });
    t.launch(kb.finish(), n.ins.iter().map(|i| i.0).chain([y]).collect(), 0);
}

/// A transpose: one output row (its last axis) per parallel iteration, read from the input with that
/// axis's stride (a block copy where the last axis stays last, as in a channel shuffle).
pub fn transpose(t: &mut Tables, n: &Node, axes: &[usize]) {
    let dims = [&[n.batch][..], n.ins[0].1].concat();
    let out = [&[n.batch][..], n.out.1].concat();
    let rank = dims.len();
    let stride = |a: usize| dims[a + 1..].iter().product::<usize>();
    let len = out[rank - 1];
    let mut kb = Kb::new(name(n), out[..rank - 1].iter().product());
    let (xb, yb) = (kb.buf("x", n.in_len(0), Access::Read), kb.buf("y", n.out_len(), Access::Write));
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, row| {
        // The row's first input element: each outer output coordinate times its input axis's stride.
        let (mut src, mut inner) = (e(0i64), 1);
        for k in (0..rank - 1).rev() {
            src = src + row.clone() / inner % out[k] * stride(axes[k]);
            inner *= out[k];
        }
        let src = kb.let_(src);
        match stride(axes[rank - 1]) {
            1 => copy(kb, yb, row * len, xb, src, len),
            s => kb.for_(0usize, len, |kb, i| kb.store(yb, row.clone() * len + i.clone(), xb.at(src.clone() + i * s))),
        }
    });
    t.launch(kb.finish(), vec![n.ins[0].0, n.out.0], 0);
}

/// Element-wise kernel over `len` elements: `y = f(inputs)`, vectorized.
fn map<const K: usize>(t: &mut Tables, name: &str, len: usize, ins: &[Ref; K], y: Ref, f: impl Fn([Expr; K]) -> Expr) {
    let chunk = chunk(t);
    let mut kb = Kb::new(name, len.div_ceil(chunk));
    let bufs: [Buf; K] = std::array::from_fn(|i| kb.buf(format!("x{i}"), len, Access::Read));
    let yb = kb.buf("y", len, Access::Write);
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, c| {
        let start = kb.let_(c * chunk);
        let end = start.clone() + chunk;
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
        Expr::Un(op, a) => Expr::Un(op, Box::new(devectorize(*a))),
        other => other,
    }
}
