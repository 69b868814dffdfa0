//! GPU-shaped kernels, the cuda backend's lowering ([`super::Lowering::gpu`]): convolutions, and linear
//! layers above batch 1, as one implicit GEMM kernel; linear layers at batch 1 as a GEMV over all
//! streaming multiprocessors; pooling one output per thread. Other ops keep the CPU lowering.
//!
//! Implicit GEMM ([`gemm`]): per group, C (M output channels × N pixels of the whole batch) = A (M × K
//! weights) · B (K × N column matrix, never stored: each element is read from the input where its tap
//! falls, zero on padding). One thread block per BM × BN output tile (and per range of k with split-K);
//! each of its [`THREADS`] threads keeps a TM × TN micro-tile in registers. Per [`BK`]-deep slice of k,
//! the block stages A's and B's slices in shared memory, double-buffered: slice s + 1 is loaded into
//! registers before slice s is multiplied, and stored to the other buffer after, so one barrier per
//! slice separates the writes of one buffer from the reads of the other. Bias (batch norm folded in),
//! residual add and ReLU are applied at the store; with split-K a second launch sums the partial tiles
//! in order and applies them. A fused max pooling runs as the next launch, one output per thread.
//! Invariant left: without split-K each output is its bias, then one FMA per k in order, as on the CPU;
//! a thread's rows and columns come in runs of four (one 16-byte shared load each per step of k), the
//! runs of neighbouring threads adjacent, so a warp's shared loads are broadcasts or consecutive and its
//! global stores consecutive.

use super::common::{buffer, Epilogue, Node, Ref, Tables};
use super::pool::{counts, window};
use super::{e, Access, Expr, Kb, Var, WeightsDtype};
use cnnc_runtime::op::{window_out, Conv2d, Linear, Pool2d};
use cnnc_runtime::Op;

/// Threads per block of the GEMM and GEMV kernels.
pub const THREADS: usize = 256;
/// Depth of one slice of k staged in shared memory.
pub const BK: usize = 8;
/// Streaming multiprocessors the grids are sized for (H100 and H200 SXM have 132).
pub const SMS: usize = 132;
/// A split of k (split-K) covers at least this many slices, so its partial tile is worth writing.
const MIN_SLICES_PER_SPLIT: usize = 16;
/// Output rows per block of the batch-1 GEMV: 4096 rows make 1024 blocks, eight per multiprocessor.
const GEMV_ROWS: usize = 4;

/// Outputs per block (BM × BN) and per thread (TM × TN); (BM / TM) · (BN / TN) = [`THREADS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub bm: usize,
    pub bn: usize,
    pub tm: usize,
    pub tn: usize,
}

/// The tiles, largest first: the largest that still gives every multiprocessor a block is taken.
pub const TILES: [Tile; 2] = [Tile { bm: 128, bn: 128, tm: 8, tn: 8 }, Tile { bm: 64, bn: 64, tm: 4, tn: 4 }];

/// The tile and the number of k splits for `groups` GEMMs of M × N × K: the largest tile that makes at
/// least [`SMS`] blocks, else the smallest, with k split until there are that many blocks (each split
/// keeping [`MIN_SLICES_PER_SPLIT`] slices).
pub fn plan(groups: usize, [m, n, k]: [usize; 3]) -> (Tile, usize) {
    let blocks = |t: &Tile| groups * m.div_ceil(t.bm) * n.div_ceil(t.bn);
    let tile = TILES.into_iter().find(|t| blocks(t) >= SMS).unwrap_or(TILES[TILES.len() - 1]);
    let splits = SMS.div_ceil(blocks(&tile)).min(k.div_ceil(BK) / MIN_SLICES_PER_SPLIT).max(1);
    (tile, splits)
}

/// A convolution as the GEMM reads it: the layer, its input's h × w, its output's oh × ow. A linear
/// layer is a 1×1 one over 1 × 1 images.
struct Geo<'a> {
    c: &'a Conv2d,
    hw: [usize; 2],
    out: [usize; 2],
}

impl Geo<'_> {
    /// Input channels per group, the GEMM's depth and rows per group, and its columns per image.
    fn cig(&self) -> usize {
        self.c.in_channels / self.c.groups
    }
    fn k(&self) -> usize {
        self.cig() * self.c.kernel[0] * self.c.kernel[1]
    }
    fn m(&self) -> usize {
        self.c.out_channels / self.c.groups
    }
    fn pixels(&self) -> usize {
        self.out[0] * self.out[1]
    }
    /// Every tap reads the pixel under its output (1×1, stride 1, no padding).
    fn pointwise(&self) -> bool {
        self.c.kernel == [1, 1] && self.c.stride == [1, 1] && self.c.pad == [0, 0]
    }
}

/// A convolution with its epilogue; a fused max pooling runs as a second launch over its output.
pub fn conv(t: &mut Tables, n: &Node, c: &Conv2d, ep: Epilogue) {
    let [h, w] = [n.ins[0].1[1], n.ins[0].1[2]];
    let out = match ep.pool {
        Some(_) => [0, 1].map(|i| window_out([h, w][i], c.span()[i], c.stride[i], c.pad[i], false).expect("validated")),
        None => [n.out.1[1], n.out.1[2]],
    };
    let geo = Geo { c, hw: [h, w], out };
    let y = match ep.pool {
        Some(_) => t.store(n.batch * c.out_channels * geo.pixels()),
        None => n.out.0,
    };
    let bias = n.params.get(1).map(|b| b.data());
    gemm(t, n.name, n.batch, &geo, (n.ins[0].0, n.params[0].data(), bias, WeightsDtype::F32), y, ep.add, ep.relu);
    if let Some(p) = ep.pool {
        let planes = n.batch * c.out_channels;
        pool_launch(t, format!("{}.max_pool2d", n.name), p, false, planes, [y, n.out.0], [out, [n.out.1[1], n.out.1[2]]]);
    }
}

/// A linear layer: a GEMV at batch 1, else the GEMM of a 1×1 convolution over 1 × 1 images.
/// With `--weights-dtype bf16` the weights are rounded to bfloat16 and kept as f32.
pub fn linear(t: &mut Tables, n: &Node, l: &Linear, relu: bool) {
    let (wts, bias) = (n.params[0].data(), n.params.get(1).map(|b| b.data()));
    if n.batch == 1 {
        return gemv(t, n, l, wts, bias, relu);
    }
    let c = Conv2d {
        in_channels: l.in_features,
        out_channels: l.out_features,
        kernel: [1, 1],
        stride: [1, 1],
        pad: [0, 0],
        dilation: [1, 1],
        groups: 1,
        bias: l.bias,
    };
    let geo = Geo { c: &c, hw: [1, 1], out: [1, 1] };
    gemm(t, n.name, n.batch, &geo, (n.ins[0].0, wts, bias, t.fc_weights), n.out.0, None, relu);
}

/// Max or average pooling op `n`, one output per thread.
pub fn pool(t: &mut Tables, n: &Node, p: &Pool2d) {
    let avg = matches!(n.op, Op::AvgPool2d(_));
    let ([c, h, w], [oh, ow]) = ([n.ins[0].1[0], n.ins[0].1[1], n.ins[0].1[2]], [n.out.1[1], n.out.1[2]]);
    pool_launch(t, format!("{}.{}", n.name, n.op.name()), p, avg, n.batch * c, [n.ins[0].0, n.out.0], [[h, w], [oh, ow]]);
}

/// Pools `planes` planes of `x` (h × w) into `y` (oh × ow), one output per parallel iteration, each
/// window clipped to the input and reduced in (ky, kx) order; average pooling divides as the op says.
fn pool_launch(t: &mut Tables, name: String, p: &Pool2d, avg: bool, planes: usize, [x, y]: [Ref; 2], [[h, w], [oh, ow]]: [[usize; 2]; 2]) {
    let mut kb = Kb::new(name, planes * oh * ow);
    let (xb, yb) = (kb.buf("x", planes * h * w, Access::Read), kb.buf("y", planes * oh * ow, Access::Write));
    let mut args = vec![x, y];
    let divisors = (avg && p.exclude_pad).then(|| {
        args.push(t.param(counts(p, [h, w], [oh, ow])));
        kb.buf("counts", oh * ow, Access::Read)
    });
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, o| {
        let (plane, q) = (kb.let_(o.clone() / (oh * ow)), kb.let_(o.clone() % (oh * ow)));
        let (ylo, yhi) = window(kb, q.clone() / ow, p.kernel[0], p.stride[0], p.pad[0], h);
        let (xlo, xhi) = window(kb, q.clone() % ow, p.kernel[1], p.stride[1], p.pad[1], w);
        let acc = kb.var(if avg { 0.0 } else { f32::NEG_INFINITY });
        let base = kb.let_(plane * (h * w));
        kb.for_(ylo, yhi, |kb, iy| {
            let row = kb.let_(base.clone() + iy * w);
            kb.for_(xlo, xhi, |kb, ix| {
                let v = xb.at(row.clone() + ix);
                kb.set(acc, if avg { e(acc) + v } else { e(acc).max(v) })
            })
        });
        let value = match (avg, divisors) {
            (true, Some(d)) => e(acc) / d.at(q),
            (true, None) => e(acc) / e((p.kernel[0] * p.kernel[1]) as f32),
            _ => e(acc),
        };
        kb.store(yb, o, value);
    });
    t.launch(kb.finish(), args, (planes * oh * ow * p.kernel[0] * p.kernel[1]) as u64);
}

/// `y = act(x · Aᵀ + bias (+ add))` for `geo`'s convolution over `batch` images, as an implicit GEMM
/// (see the module doc). `a` holds (M·groups) rows of K weights, stored as `dtype` rounds them.
#[allow(clippy::too_many_arguments)]
fn gemm(
    t: &mut Tables,
    name: &str,
    batch: usize,
    geo: &Geo,
    (x, a, bias, dtype): (Ref, &[f32], Option<&[f32]>, WeightsDtype),
    y: Ref,
    add: Option<Ref>,
    relu: bool,
) {
    let (groups, m, k, pixels, cig) = (geo.c.groups, geo.m(), geo.k(), geo.pixels(), geo.cig());
    let (stride, pad, dilation) = (geo.c.stride, geo.c.pad, geo.c.dilation);
    let ncols = batch * pixels;
    let (tile, splits) = plan(groups, [m, ncols, k]);
    let Tile { bm, bn, tm, tn } = tile;
    let (mt, nt, slices) = (m.div_ceil(bm), ncols.div_ceil(bn), k.div_ceil(BK));
    let (mp, kp) = (mt * bm, slices * BK);
    // A, per group, k-major with zero rows and columns up to whole tiles: [g][kp][mp].
    let ap = t.packed(buffer(groups * kp * mp, |packed| {
        // Row g·m + gm of A is output channel gm of group g.
        for (row, weights) in a.chunks(k).enumerate() {
            let (g, gm) = (row / m, row % m);
            for (kk, &v) in weights.iter().enumerate() {
                packed[(g * kp + kk) * mp + gm] = dtype.round(v);
            }
        }
    }));
    let bp = t.packed(buffer(groups * mp, |bias_p| {
        if let Some(b) = bias {
            (0..groups).for_each(|g| bias_p[g * mp..g * mp + m].copy_from_slice(&b[g * m..(g + 1) * m]));
        }
    }));
    let [h, w] = geo.hw;
    let (x_len, out_len) = (batch * groups * cig * h * w, batch * groups * m * pixels);
    // With split-K the tiles go to a scratch store of every split's partial sums: [s][g][m][col].
    let partial = (splits > 1).then(|| t.store(splits * groups * m * ncols));
    let mut kb = Kb::blocks(format!("{name}.gemm"), groups * mt * nt * splits, THREADS as u32);
    let (xb, ab, biasb) = (kb.buf("x", x_len, Access::Read), kb.buf("a", groups * kp * mp, Access::Read), kb.buf("bias", groups * mp, Access::Read));
    let yb = match partial {
        Some(_) => kb.buf("partial", splits * groups * m * ncols, Access::Write),
        None => kb.buf("y", out_len, Access::Write),
    };
    let addb = add.filter(|_| partial.is_none()).map(|_| kb.buf("add", out_len, Access::Read));
    let (sa, sb) = (kb.buf("a_slices", 2 * BK * bm, Access::Shared), kb.buf("b_slices", 2 * BK * bn, Access::Shared));
    let (lo, _) = kb.range();
    let tid = kb.let_(Expr::Thread);
    // Block number = ((g·mt + mi)·nt + ni)·splits + s.
    let (s, tile_no) = (kb.let_(lo.clone() % splits), kb.let_(lo / splits));
    let (g, m0, c0) = (kb.let_(tile_no.clone() / (mt * nt)), kb.let_(tile_no.clone() / nt % mt * bm), kb.let_(tile_no % nt * bn));
    let (s_lo, s_hi) = (kb.let_(s.clone() * slices / splits), kb.let_((s.clone() + 1i64) * slices / splits));

    // B: this thread loads column tid % BN of every slice, rows tid / BN + i·(THREADS / BN).
    let col = kb.let_(c0.clone() + tid.clone() % bn);
    let valid = kb.let_(col.clone().lt(ncols));
    let (img, q) = (kb.let_(col.clone() / pixels), kb.let_(col.clone() % pixels));
    let (oy, ox) = (kb.let_(q.clone() / geo.out[1]), kb.let_(q.clone() % geo.out[1]));
    let iy0 = kb.let_(oy * stride[0] - pad[0]);
    let ix0 = kb.let_(ox * stride[1] - pad[1]);
    let xbase = kb.let_((img * groups + g.clone()) * (cig * h * w));
    let (la, lb) = (BK * bm / THREADS, BK * bn / THREADS);
    let ra: Vec<Var> = (0..la).map(|_| kb.var(0.0f32)).collect();
    let rb: Vec<Var> = (0..lb).map(|_| kb.var(0.0f32)).collect();
    let load_slice = |kb: &mut Kb, slice: Expr| {
        let k0 = kb.let_(slice * BK);
        let abase = kb.let_((g.clone() * kp + k0.clone()) * mp + m0.clone());
        for (i, &r) in ra.iter().enumerate() {
            let el = tid.clone() + (i * THREADS) as i64;
            kb.set(r, ab.at(abase.clone() + el.clone() / bm * mp + el % bm));
        }
        for (i, &r) in rb.iter().enumerate() {
            let kk = kb.let_(k0.clone() + tid.clone() / bn + (i * (THREADS / bn)) as i64);
            kb.set(r, 0.0f32);
            let inside = valid.clone().and(kk.clone().lt(k));
            if geo.pointwise() {
                kb.if_(inside, |kb| kb.set(r, xb.at(xbase.clone() + kk * (h * w) + q.clone())));
            } else {
                let [kh, kw] = geo.c.kernel;
                let (c, tap) = (kb.let_(kk.clone() / (kh * kw)), kb.let_(kk % (kh * kw)));
                let iy = kb.let_(iy0.clone() + tap.clone() / kw * dilation[0]);
                let ix = kb.let_(ix0.clone() + tap % kw * dilation[1]);
                let inside = inside.and(e(0i64).le(iy.clone())).and(iy.clone().lt(h)).and(e(0i64).le(ix.clone())).and(ix.clone().lt(w));
                kb.if_(inside, |kb| kb.set(r, xb.at(xbase.clone() + c * (h * w) + iy * w + ix)));
            }
        }
    };
    let store_slice = |kb: &mut Kb, buffer: Expr| {
        for (i, &r) in ra.iter().enumerate() {
            kb.store(sa, buffer.clone() * (BK * bm) + tid.clone() + (i * THREADS) as i64, r);
        }
        for (i, &r) in rb.iter().enumerate() {
            kb.store(sb, buffer.clone() * (BK * bn) + tid.clone() + (i * THREADS) as i64, r);
        }
    };

    // The micro-tile: rows and columns in runs of four (one vector load from shared memory each),
    // run r of rows at 4·ty + r·4·BM/TM, run r of columns at 4·tx + r·4·BN/TN of the block's tile.
    let (tx, ty) = (kb.let_(tid.clone() % (bn / tn)), kb.let_(tid.clone() / (bn / tn)));
    let row = |i: usize| ty.clone() * 4i64 + (i / 4 * 4 * bm / tm + i % 4) as i64;
    let col = |j: usize| tx.clone() * 4i64 + (j / 4 * 4 * bn / tn + j % 4) as i64;
    // acc[i][r]: row i, columns run r (four lanes).
    let acc: Vec<Vec<Var>> = (0..tm)
        .map(|i| {
            let init = match partial {
                Some(_) => e(0.0f32),
                None => biasb.at(g.clone() * mp + m0.clone() + row(i)),
            };
            let init = kb.let_(init.splat());
            (0..tn / 4).map(|_| kb.var(init.clone())).collect()
        })
        .collect();
    load_slice(&mut kb, s_lo.clone());
    store_slice(&mut kb, e(0i64));
    kb.barrier();
    kb.for_(s_lo.clone(), s_hi.clone(), |kb, slice| {
        let cur = kb.let_((slice.clone() - s_lo.clone()) % 2i64);
        let more = kb.let_((slice.clone() + 1i64).lt(s_hi.clone()));
        kb.if_(more.clone(), |kb| load_slice(kb, slice + 1i64));
        // A loop ptxas unrolls within the register budget (unrolled here, it hoisted the shared loads
        // of all eight steps and spilled at 128 registers).
        kb.for_(0usize, BK, |kb, kk| {
            let (arow, brow) = (kb.let_(cur.clone() * (BK * bm) + kk.clone() * bm + row(0)), kb.let_(cur.clone() * (BK * bn) + kk * bn + col(0)));
            let av: Vec<Expr> = (0..tm / 4).map(|r| kb.let_(sa.at4(arow.clone() + (r * 4 * bm / tm) as i64))).collect();
            let bv: Vec<Expr> = (0..tn / 4).map(|r| kb.let_(sb.at4(brow.clone() + (r * 4 * bn / tn) as i64))).collect();
            for (i, runs) in acc.iter().enumerate() {
                let a = av[i / 4].clone().lane(i % 4).splat();
                for (r, &c) in runs.iter().enumerate() {
                    kb.set(c, a.clone().fma(bv[r].clone(), c));
                }
            }
        });
        kb.if_(more, |kb| store_slice(kb, e(1i64) - cur.clone()));
        kb.barrier();
    });

    // The store, or the partial tile's.
    let at = |img: Expr, gm: Expr, q: Expr| img * (groups * m * pixels) + gm * pixels + q;
    for j in 0..tn {
        let colj = kb.let_(c0.clone() + col(j));
        let (imgj, qj) = (kb.let_(colj.clone() / pixels), kb.let_(colj.clone() % pixels));
        for (i, runs) in acc.iter().enumerate() {
            let v = e(runs[j / 4]).lane(j % 4);
            let mi = kb.let_(m0.clone() + row(i));
            let inside = mi.clone().lt(m).and(colj.clone().lt(ncols));
            kb.if_(inside, |kb| match partial {
                Some(_) => kb.store(yb, ((s.clone() * groups + g.clone()) * m + mi) * ncols + colj.clone(), v.clone()),
                None => {
                    let idx = kb.let_(at(imgj.clone(), g.clone() * m + mi, qj.clone()));
                    let v = addb.map_or(v.clone(), |r| v.clone() + r.at(idx.clone()));
                    kb.store(yb, idx, if relu { v.max(0.0f32) } else { v });
                }
            });
        }
    }
    let flops = 2 * (out_len * k) as u64;
    let refs = [vec![x, ap, bp, partial.unwrap_or(y)], add.filter(|_| partial.is_none()).into_iter().collect()].concat();
    t.launch(kb.finish(), refs, flops);

    // Split-K: bias, then the splits' partial sums in order, then the add and ReLU.
    let Some(partial) = partial else { return };
    let mut kb = Kb::new(format!("{name}.splitk_sum"), groups * m * ncols);
    let (pb, biasb, yb) =
        (kb.buf("partial", splits * groups * m * ncols, Access::Read), kb.buf("bias", groups * mp, Access::Read), kb.buf("y", out_len, Access::Write));
    let addb = add.map(|_| kb.buf("add", out_len, Access::Read));
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, it| {
        let (gm, colj) = (kb.let_(it.clone() / ncols), kb.let_(it.clone() % ncols));
        let v = kb.var(biasb.at(gm.clone() / m * mp + gm.clone() % m));
        (0..splits).for_each(|s| kb.set(v, e(v) + pb.at(it.clone() + (s * groups * m * ncols) as i64)));
        let idx = kb.let_(at(colj.clone() / pixels, gm, colj % pixels));
        let v = addb.map_or(e(v), |r| e(v) + r.at(idx.clone()));
        kb.store(yb, idx, if relu { v.max(0.0f32) } else { v });
    });
    t.launch(kb.finish(), [vec![partial, bp, y], add.into_iter().collect()].concat(), (splits * groups * m * ncols) as u64);
}

/// A linear layer at batch 1: each block computes [`GEMV_ROWS`] outputs. Its threads stride through k
/// (four consecutive weights per load where rows allow), so every weight is read once, coalesced, and
/// the blocks of all multiprocessors stream the matrix together; each row's partial sums are then
/// reduced in shared memory, halving the active threads per step.
fn gemv(t: &mut Tables, n: &Node, l: &Linear, wts: &[f32], bias: Option<&[f32]>, relu: bool) {
    let (k, o) = (l.in_features, l.out_features);
    let blocks = o.div_ceil(GEMV_ROWS);
    let op = blocks * GEMV_ROWS;
    let dtype = t.fc_weights;
    // Zero rows up to whole blocks.
    let wp = t.packed(buffer(op * k, |w| w.iter_mut().zip(wts).for_each(|(d, &v)| *d = dtype.round(v))));
    let bp = t.packed(buffer(op, |b| bias.into_iter().for_each(|bias| b[..o].copy_from_slice(bias))));
    let mut kb = Kb::blocks(format!("{}.{}", n.name, n.op.name()), blocks, THREADS as u32);
    let (xb, wb, bb, yb) = (kb.buf("x", k, Access::Read), kb.buf("w", op * k, Access::Read), kb.buf("bias", op, Access::Read), kb.buf("y", o, Access::Write));
    let red = kb.buf("partial_sums", GEMV_ROWS * THREADS, Access::Shared);
    let (lo, _) = kb.range();
    let tid = kb.let_(Expr::Thread);
    let o0 = kb.let_(lo * GEMV_ROWS);
    let vec = k.is_multiple_of(4);
    let lanes = if vec { 4 } else { 1 };
    let acc: Vec<Var> = (0..GEMV_ROWS).map(|_| kb.var(e(0.0f32).lanes(vec))).collect();
    kb.for_step(tid.clone() * lanes, k, (THREADS * lanes) as i64, |kb, kk| {
        let xv = kb.let_(xb.load(kk.clone(), vec));
        for (r, &a) in acc.iter().enumerate() {
            kb.set(a, wb.load((o0.clone() + r) * k + kk.clone(), vec).fma(xv.clone(), a));
        }
    });
    for (r, &a) in acc.iter().enumerate() {
        kb.store(red, tid.clone() + (r * THREADS) as i64, if vec { e(a).hsum() } else { e(a) });
    }
    kb.barrier();
    let mut step = THREADS / 2;
    while step > 0 {
        kb.if_(tid.clone().lt(step), |kb| {
            for r in 0..GEMV_ROWS {
                let at = kb.let_(tid.clone() + (r * THREADS) as i64);
                kb.store(red, at.clone(), red.at(at.clone()) + red.at(at + step));
            }
        });
        kb.barrier();
        step /= 2;
    }
    kb.if_(tid.clone().lt(GEMV_ROWS), |kb| {
        let row = kb.let_(o0.clone() + tid.clone());
        kb.if_(row.clone().lt(o), |kb| {
            let v = red.at(tid.clone() * THREADS) + bb.at(row.clone());
            kb.store(yb, row, if relu { v.max(0.0f32) } else { v });
        });
    });
    t.launch(kb.finish(), vec![n.ins[0].0, wp, bp, n.out.0], 2 * (o * k) as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_fill_the_multiprocessors() {
        // AlexNet's conv1 at batch 1: 96 × 3025 outputs take 64 × 64 tiles (2 · 48 blocks) split in k.
        assert_eq!(plan(1, [96, 3025, 363]), (TILES[1], 2));
        // conv2 (two groups of 128 × 729) at batch 64: big tiles, no split.
        assert_eq!(plan(2, [128, 64 * 729, 1200]), (TILES[0], 1));
        // conv3 at batch 1: 384 × 169 is 18 small tiles; 8 splits of k = 2304 (288 slices).
        assert_eq!(plan(1, [384, 169, 2304]), (TILES[1], 8));
        // Shallow k never splits.
        assert_eq!(plan(1, [8, 8, 27]), (TILES[1], 1));
        for t in TILES {
            assert_eq!((t.bm / t.tm) * (t.bn / t.tn), THREADS);
            assert!(THREADS.is_multiple_of(t.bn) && (BK * t.bm).is_multiple_of(THREADS) && (BK * t.bn).is_multiple_of(THREADS));
        }
    }
}
