//! Pooling: max and average pooling as their own launches, and the max pooling a convolution fuses
//! (into its GEMM launch, or as a launch right after it).
//! Invariant left: windows are clipped to the input (Chainer's semantics) and reduced separably, rows
//! (ky) first, then columns (kx), or window by window in (ky, kx) order for planes too large for the
//! stack; the order depends only on the shape, never on the tier or the thread count.

use super::common::{overlapping_vector_loop, Node, Ref, Tables};
use super::{e, Access, Buf, Call, Expr, Kb, PoolGeo, Routine, LANES};
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
        args.push(t.param(counts(p, [h, w], [oh, ow])));
        kb.buf("counts", oh * ow, Access::Read)
    });
    let (lo, hi) = kb.range();
    pool(&mut kb, p, avg.then_some(counts), t.tier.assembled(), xb, yb, lo, hi, [h, w, w], [oh, ow]);
    t.launch(kb.finish(), args, n.out_len() as u64 * (p.kernel[0] * p.kernel[1]) as u64);
}

/// The window of output `o` along an axis (k taps, stride s, padding pad), clipped to `0..size`:
/// its first and one-past-last input position.
pub fn window(kb: &mut Kb, o: Expr, k: usize, s: usize, pad: usize, size: usize) -> (Expr, Expr) {
    let start = kb.let_(o * s - pad);
    (kb.let_(start.clone().max(0i64)), kb.let_((start + k).min(size)))
}

/// Per output of an [oh, ow] pooling of [h, w] planes, the input cells its window holds (the
/// divisors of average pooling with `exclude_pad`).
pub fn counts(p: &Pool2d, [h, w]: [usize; 2], [oh, ow]: [usize; 2]) -> Vec<f32> {
    let cells = |o: usize, a: usize, size: usize| (o * p.stride[a] + p.kernel[a]).min(size + p.pad[a]).saturating_sub((o * p.stride[a]).max(p.pad[a])) as f32;
    (0..oh * ow).map(|i| cells(i / ow, 0, h) * cells(i % ow, 1, w)).collect()
}

/// Max or average pooling of planes `lo..hi` of `x` into `y` (plane-major NCHW, same plane numbering).
/// Windows are clipped to the input, so padding never contributes (Chainer's semantics; average pooling
/// divides by the full window, or with `exclude_pad` by the cells inside). `avg` is `Some` for average
/// pooling, holding the divisor table of `exclude_pad`.
///
/// Both are separable (planes whose row reductions would not fit the stack go window by window, in
/// (ky, kx) order): each output row first reduces its window's input rows, column by column, into a
/// local row (in ky order; rows whose window lies inside the plane with their taps unrolled), padded
/// with the reduction's identity (−∞ or 0) where windows reach past the row; then each output's window
/// of kw cells there (in kx order), four outputs at a time for strides 1 and 2 (stride 2: each pair of
/// taps from the even and odd lanes of two vectors). For max this is the same result; a sum is
/// reassociated (columns first), within an ulp or so of the reference's (ky, kx) order, and an
/// identity cell adds nothing (x + 0 = x but for −0, whose sign a sum from 0 loses anyway). Per 3×3
/// window that is 4 adds instead of 8, each chain two deep instead of eight, and no scalar windows at
/// the edges (a scalar costs what a vector of four does; measured: docs/benchmarks.md).
///
/// With `native` (the assembled tiers), the separable form of rows of 8 outputs or more is one [`Call`]
/// of [`Routine::Pool`] instead: the JIT's routine reduces in the same order, on the CPU's widest vectors.
#[allow(clippy::too_many_arguments)]
pub fn pool(
    kb: &mut Kb,
    p: &Pool2d,
    avg: Option<Option<Buf>>,
    native: bool,
    x: Buf,
    y: Buf,
    lo: Expr,
    hi: Expr,
    [h, w, pitch]: [usize; 3],
    [oh, ow]: [usize; 2],
) {
    // The separable form keeps one plane's row reductions on the task's stack; planes too large for
    // that (over 64 KiB of them: worker threads have 2 MiB stacks) take the direct form, window by window.
    let separable = oh * row_cells([p.pad[1], p.stride[1], p.kernel[1]], w, ow) * 4 <= 64 << 10;
    // Rows of 8 outputs or more: narrower ones (the digits model's 4 and 2, a global average's 1) pay
    // more for the call and its setup than the loops, whose constants the JIT builds in.
    if native && separable && ow >= 8 {
        let kind = match avg {
            None => PoolGeo::MAX,
            Some(None) => PoolGeo::AVG,
            Some(Some(_)) => PoolGeo::AVG_COUNTS,
        };
        let [kernel, stride, pad] = [p.kernel, p.stride, p.pad].map(|v| v.map(|v| v as i64));
        let [h, w, pitch, oh, ow] = [h, w, pitch, oh, ow].map(|v| v as i64);
        let geo = PoolGeo { kind, kernel, stride, pad, h, w, pitch, oh, ow };
        return kb.call(Call { routine: Routine::Pool(geo), x, y, extra: avg.flatten(), lo, hi });
    }
    loops(kb, p, avg, x, y, lo, hi, [h, w, pitch], [oh, ow])
}

/// The loops [`pool`] builds without `native` for the call `c` of [`Routine::Pool`] `g`.
pub fn call_loops(kb: &mut Kb, g: &PoolGeo, c: &Call) {
    let [kernel, stride, pad] = [g.kernel, g.stride, g.pad].map(|v| v.map(|v| v as usize));
    let p = Pool2d { kernel, stride, pad, cover_all: false, exclude_pad: g.kind == PoolGeo::AVG_COUNTS };
    let avg = (g.kind != PoolGeo::MAX).then_some(c.extra);
    let [h, w, pitch, oh, ow] = [g.h, g.w, g.pitch, g.oh, g.ow].map(|v| v as usize);
    loops(kb, &p, avg, c.x, c.y, c.lo.clone(), c.hi.clone(), [h, w, pitch], [oh, ow])
}

/// [`pool`]'s loops.
#[allow(clippy::too_many_arguments)]
fn loops(kb: &mut Kb, p: &Pool2d, avg: Option<Option<Buf>>, x: Buf, y: Buf, lo: Expr, hi: Expr, [h, w, pitch]: [usize; 3], [oh, ow]: [usize; 2]) {
    let [kh, kw] = p.kernel;
    let (init, reduce): (f32, fn(Expr, Expr) -> Expr) = match avg {
        Some(_) => (0.0, |a, b| a + b),
        None => (f32::NEG_INFINITY, |a, b| a.max(b)),
    };
    // A window's reduction, divided for an average (by its cells with `exclude_pad`).
    let finish = |acc: Expr, at: Expr, vec: bool| match avg {
        Some(Some(counts)) => acc / counts.load(at, vec),
        Some(None) => acc / e((kh * kw) as f32).lanes(vec),
        None => acc,
    };
    // Each row's reductions sit between `left` cells of the reduction's identity (−∞ or 0) and more on
    // the right (a ceil-mode window may end past the right padding), `stride` apart: every window then
    // reduces kw cells, as a clipped one would its cells inside (max(−∞, a) = a, 0 + a = a, in the same
    // order), and all outputs go four at a time.
    let (left, stride) = (p.pad[1], row_cells([p.pad[1], p.stride[1], p.kernel[1]], w, ow));
    if oh * stride * 4 > 64 << 10 {
        // Window by window in (ky, kx) order; with stride 1 the windows inside the row (ox − pad ≥ 0 and
        // ox − pad + kw ≤ w) four at a time.
        let (first, last) = if p.stride[1] == 1 { inside(p, 1, w, ow) } else { (ow, ow) };
        return kb.for_(lo, hi, |kb, plane| {
            let (src, dst) = (kb.let_(plane.clone() * (h * pitch)), kb.let_(plane * (oh * ow)));
            kb.for_(0usize, oh, |kb, oy| {
                let (ylo, yhi) = window(kb, oy.clone(), kh, p.stride[0], p.pad[0], h);
                let out = |kb: &mut Kb, ox: Expr, vec: bool| {
                    let acc = kb.var(e(init).lanes(vec));
                    let add = |kb: &mut Kb, at: Expr| kb.set(acc, reduce(e(acc), x.load(src.clone() + at, vec)));
                    if vec {
                        let x0 = kb.let_(ox.clone() - p.pad[1]);
                        kb.for_(ylo.clone(), yhi.clone(), |kb, iy| (0..kw).for_each(|kx| add(kb, iy.clone() * pitch + x0.clone() + kx)));
                    } else {
                        let (xlo, xhi) = window(kb, ox.clone(), kw, p.stride[1], p.pad[1], w);
                        kb.for_(ylo.clone(), yhi.clone(), |kb, iy| kb.for_(xlo, xhi, |kb, ix| add(kb, iy * pitch + ix)));
                    }
                    let at = kb.let_(oy.clone() * ow + ox);
                    kb.store(y, dst.clone() + at.clone(), finish(e(acc), at, vec));
                };
                kb.for_(0usize, first, |kb, ox| out(kb, ox, false));
                if last > first {
                    overlapping_vector_loop(kb, e(first), e(last), out);
                }
                kb.for_(last, ow, |kb, ox| out(kb, ox, false));
            });
        });
    }
    // (2·LANES more: stride 2 reads a few cells past the last row, into lanes it does not use.)
    let rows = kb.buf("rows", oh * stride + 2 * LANES, Access::Local);
    kb.for_(lo, hi, |kb, plane| {
        let (src, dst) = (kb.let_(plane.clone() * (h * pitch)), kb.let_(plane * (oh * ow)));
        // Rows whose window lies inside the plane take their kh taps unrolled (a loop per vector of
        // four cost more than its three loads); the clipped ones loop over their window.
        let row = |kb: &mut Kb, oy: Expr, clipped: bool| {
            let to = kb.let_(oy.clone() * stride);
            (0..left).chain(left + w..stride).for_each(|i| kb.store(rows, to.clone() + i, e(init)));
            let to = kb.let_(to + left);
            let (ylo, yhi) = window(kb, oy, kh, p.stride[0], p.pad[0], h);
            overlapping_vector_loop(kb, e(0i64), e(w), |kb, ix, vec| {
                let tap = |iy: Expr| x.load(src.clone() + iy * pitch + ix.clone(), vec);
                let acc = match clipped {
                    true => {
                        let acc = kb.var(e(init).lanes(vec));
                        kb.for_(ylo.clone(), yhi.clone(), |kb, iy| kb.set(acc, reduce(e(acc), tap(iy))));
                        e(acc)
                    }
                    // The same chain as the loop's: max(−∞, a) is a, but 0 + (−0) is +0.
                    false => (1..kh)
                        .fold(if avg.is_some() { e(0.0f32).lanes(vec) + tap(ylo.clone()) } else { tap(ylo.clone()) }, |m, ky| reduce(m, tap(ylo.clone() + ky))),
                };
                kb.store(rows, to.clone() + ix, acc);
            });
        };
        let (top, bottom) = inside(p, 0, h, oh);
        kb.for_(0usize, top, |kb, oy| row(kb, oy, true));
        kb.for_(top, bottom, |kb, oy| row(kb, oy, false));
        kb.for_(bottom, oh, |kb, oy| row(kb, oy, true));
        kb.for_(0usize, oh, |kb, oy| {
            let (from, to) = (kb.let_(oy.clone() * stride), kb.let_(oy.clone() * ow));
            // The window from cell i of the row, in kx order.
            let window_at =
                |i: Expr, vec: bool| (1..kw).fold(rows.load(from.clone() + i.clone(), vec), |m, kx| reduce(m, rows.load(from.clone() + i.clone() + kx, vec)));
            // Output ox (four from ox when `vec`) is the reduction `v`.
            let put = |kb: &mut Kb, ox: Expr, v: Expr, vec: bool| {
                let at = kb.let_(to.clone() + ox);
                kb.store(y, dst.clone() + at.clone(), finish(v, at, vec));
            };
            match p.stride[1] {
                // Output column ox's window starts at cell ox.
                1 => overlapping_vector_loop(kb, e(0i64), e(ow), |kb, ox, vec| put(kb, ox.clone(), window_at(ox, vec), vec)),
                // Four outputs from cells 2·ox + 2t + kx (t < 4): tap kx = 2j (+1) is the even (odd)
                // lanes of the two vectors from cell 2·ox + 2j, which both taps of a pair share.
                2 => overlapping_vector_loop(kb, e(0i64), e(ow), |kb, ox, vec| {
                    let c = kb.let_(ox.clone() * 2i64);
                    let v = match vec {
                        false => window_at(c, false),
                        true => {
                            let pairs: Vec<[Expr; 2]> =
                                (0..kw.div_ceil(2)).map(|j| [0, LANES].map(|d| kb.let_(rows.load(from.clone() + c.clone() + (2 * j + d), true)))).collect();
                            let tap = |kx: usize| {
                                let [a, b] = pairs[kx / 2].clone();
                                a.shuffle(b, if kx.is_multiple_of(2) { [0, 2, 4, 6] } else { [1, 3, 5, 7] })
                            };
                            (1..kw).fold(tap(0), |m, kx| reduce(m, tap(kx)))
                        }
                    };
                    put(kb, ox, v, vec)
                }),
                // Wider strides: every stride-th window, one at a time.
                s => kb.for_(0usize, ow, |kb, ox| put(kb, ox.clone(), window_at(ox * s, false), false)),
            }
        });
    });
}

/// The cells of a row of row reductions (for the loops and the native routine alike): `pad` cells of
/// the identity, the `w` columns, and as many more as the last of `ow` windows (kw wide, `stride`
/// apart) needs.
pub fn row_cells([pad, stride, kw]: [usize; 3], w: usize, ow: usize) -> usize {
    pad + w + ((ow - 1) * stride + kw).saturating_sub(pad + w)
}

/// The outputs along `axis` whose window lies inside `0..size` (o·s − pad ≥ 0 and o·s − pad + k ≤
/// size), as a range `first..last` of the `out` outputs (empty where none does).
fn inside(p: &Pool2d, axis: usize, size: usize, out: usize) -> (usize, usize) {
    let (k, s, pad) = (p.kernel[axis], p.stride[axis], p.pad[axis]);
    let first = pad.div_ceil(s).min(out);
    (first, if size + pad >= k { ((size + pad - k) / s + 1).min(out).max(first) } else { first })
}

/// Launches the max pooling fused after convolution `n`, from its [oh, ow] output in `x`.
pub fn pool_launch(t: &mut Tables, n: &Node, p: &Pool2d, x: Ref, [oh, ow]: [usize; 2]) {
    let co = n.out.1[0];
    let mut kb = Kb::new(format!("{}.max_pool2d", n.name), n.batch * co);
    let (xb, pb) = (kb.buf("x", n.batch * co * oh * ow, Access::Read), kb.buf("y", n.out_len(), Access::Write));
    let (lo, hi) = kb.range();
    pool(&mut kb, p, None, t.tier.assembled(), xb, pb, lo, hi, [oh, ow, ow], [n.out.1[1], n.out.1[2]]);
    t.launch(kb.finish(), vec![x, n.out.0], 0);
}
