//! Pooling: max and average pooling as their own launches, and the max pooling a convolution fuses
//! (into its GEMM launch, or as a launch right after it).
//! Invariant left: windows are clipped to the input (Chainer's semantics) and reduced in (ky, kx) order.

use super::common::{overlapping_vector_loop, Node, Ref, Tables};
use super::{e, Access, Buf, Expr, Kb};
use cnnc_runtime::op::Pool2d;
use cnnc_runtime::Op;

/// Appends the launch of pooling op `n` with window `p` (max or average, as its op says).
pub fn lower(t: &mut Tables, n: &Node, p: &Pool2d) {
    let (x, y) = (n.ins[0].0, n.out.0);
    let avg = matches!(n.op, Op::AvgPool2d(_));
    let [c, h, w] = [n.ins[0].1[0], n.ins[0].1[1], n.ins[0].1[2]];
    let mut kb = Kb::new(format!("{}.{}", n.name, n.op.name()), n.batch * c);
    let (xb, yb) = (kb.buf("x", n.in_len(0), Access::Read), kb.buf("y", n.out_len(), Access::Write));
    let [oh, ow] = [n.out.1[1], n.out.1[2]];
    let mut args = vec![x, y];
    // With `exclude_pad`, each output's divisor (the input cells its window holds) is a compile-time table.
    let counts = (avg && p.exclude_pad).then(|| {
        let cells =
            |o: usize, a: usize, size: usize| (o * p.stride[a] + p.kernel[a]).min(size + p.pad[a]).saturating_sub((o * p.stride[a]).max(p.pad[a])) as f32;
        args.push(t.param((0..oh * ow).map(|i| cells(i / ow, 0, h) * cells(i % ow, 1, w)).collect()));
        kb.buf("counts", oh * ow, Access::Read)
    });
    let (lo, hi) = kb.range();
    pool(&mut kb, p, avg.then_some(counts), xb, yb, lo, hi, [h, w, w], [oh, ow]);
    t.launch(kb.finish(), args, n.out_len() as u64 * (p.kernel[0] * p.kernel[1]) as u64);
}

/// Max or average pooling of planes `lo..hi` of `x` into `y` (plane-major NCHW, same plane numbering).
/// Windows are clipped to the input, so padding never contributes (Chainer's semantics; average pooling
/// divides by the full window, or with `exclude_pad` by the cells inside, and sums in the reference's
/// (ky, kx) order). `avg` is `Some` for average pooling, holding the divisor table of `exclude_pad`.
///
/// Max pooling is separable: each output row first takes the maximum of its window's input rows into
/// a local buffer, then the maximum of each window of kw columns there at every start position (both
/// four columns at a time), of which the output takes every stride-th; windows clipped by the edges are
/// scalar. Max is exact, so this is the same result. Scalar maxima are what this avoids: Cranelift's
/// IEEE `fmax` is a several-instruction sequence on x64 (measured: docs/benchmarks.md).
#[allow(clippy::too_many_arguments)]
pub fn pool(kb: &mut Kb, p: &Pool2d, avg: Option<Option<Buf>>, x: Buf, y: Buf, lo: Expr, hi: Expr, [h, w, pitch]: [usize; 3], [oh, ow]: [usize; 2]) {
    let [kh, kw] = p.kernel;
    // The window of output o along an axis, clipped to 0..size.
    let window = |kb: &mut Kb, o: Expr, k: usize, s: usize, pad: usize, size: usize| {
        let start = kb.let_(o * s - pad);
        (kb.let_(start.clone().max(0i64)), kb.let_((start + k).min(size)))
    };
    let neg_inf = || e(f32::NEG_INFINITY);
    // Output columns whose window lies inside the row: ox·s − pad ≥ 0 and ox·s − pad + kw ≤ w.
    let first = p.pad[1].div_ceil(p.stride[1]).min(ow);
    let last = if w + p.pad[1] >= kw { ((w + p.pad[1] - kw) / p.stride[1] + 1).min(ow).max(first) } else { first };
    // The separable form keeps one plane's row maxima on the task's stack; planes too large for that
    // (over 64 KiB of them: worker threads have 2 MiB stacks) take the direct form.
    if avg.is_some() || oh * w * 4 > 64 << 10 {
        // Window by window; with stride 1 the windows inside the row four at a time, each lane its own
        // window reduced in the same (ky, kx) order (as scalar code, GoogLeNet's 3×3 average pools
        // weighed as much as several of its convolutions: docs/benchmarks.md).
        let (first, last) = if p.stride[1] == 1 { (first, last) } else { (ow, ow) };
        return kb.for_(lo, hi, |kb, plane| {
            let (src, dst) = (kb.let_(plane.clone() * (h * pitch)), kb.let_(plane * (oh * ow)));
            kb.for_(0usize, oh, |kb, oy| {
                let (ylo, yhi) = window(kb, oy.clone(), kh, p.stride[0], p.pad[0], h);
                let out = |kb: &mut Kb, ox: Expr, vec: bool| {
                    let acc = kb.var(if avg.is_some() { e(0.0f32) } else { neg_inf() }.lanes(vec));
                    let add = |kb: &mut Kb, at: Expr| {
                        let v = x.load(src.clone() + at, vec);
                        kb.set(acc, if avg.is_some() { e(acc) + v } else { e(acc).max(v) })
                    };
                    if vec {
                        let x0 = kb.let_(ox.clone() - p.pad[1]);
                        kb.for_(ylo.clone(), yhi.clone(), |kb, iy| (0..kw).for_each(|kx| add(kb, iy.clone() * pitch + x0.clone() + kx)));
                    } else {
                        let (xlo, xhi) = window(kb, ox.clone(), kw, p.stride[1], p.pad[1], w);
                        kb.for_(ylo.clone(), yhi.clone(), |kb, iy| kb.for_(xlo, xhi, |kb, ix| add(kb, iy * pitch + ix)));
                    }
                    let at = kb.let_(oy.clone() * ow + ox);
                    let v = match avg {
                        Some(Some(counts)) => e(acc) / counts.load(at.clone(), vec),
                        Some(None) => e(acc) / e((kh * kw) as f32).lanes(vec),
                        None => e(acc),
                    };
                    kb.store(y, dst.clone() + at, v);
                };
                kb.for_(0usize, first, |kb, ox| out(kb, ox, false));
                if last > first {
                    overlapping_vector_loop(kb, e(first), e(last), out);
                }
                kb.for_(last, ow, |kb, ox| out(kb, ox, false));
            });
        });
    }
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

/// Launches the max pooling fused after convolution `n`, from its [oh, ow] output in `x`.
pub fn pool_launch(t: &mut Tables, n: &Node, p: &Pool2d, x: Ref, [oh, ow]: [usize; 2]) {
    let co = n.out.1[0];
    let mut kb = Kb::new(format!("{}.max_pool2d", n.name), n.batch * co);
    let (xb, pb) = (kb.buf("x", n.batch * co * oh * ow, Access::Read), kb.buf("y", n.out_len(), Access::Write));
    let (lo, hi) = kb.range();
    pool(&mut kb, p, None, xb, pb, lo, hi, [oh, ow, ow], [n.out.1[1], n.out.1[2]]);
    t.launch(kb.finish(), vec![x, n.out.0], 0);
}
