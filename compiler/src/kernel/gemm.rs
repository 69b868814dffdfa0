//! Convolution and linear layers as GEMMs on the tier's tile, and the GEMM Winograd's products use.
//!
//! A direct convolution is a GEMM over its column matrix (the input itself, or for a stride its
//! subsample, for 1×1 unpadded convolutions), packed from a padded, stride-phase-split copy of the input (`Phased`) into panels
//! of the tile's width, as the tile reads them, or read in place by the AVX-512 tile ([`Columns`]). The
//! register-blocked microkernel ([`micro`], or an assembled AVX2/AVX-512 tile) keeps an MR×NR tile of the output in
//! registers; bias, ReLU and max pooling are applied by the same launch before anything leaves the task.
//! On AVX-512, convolutions over planes that would leave the tile's lanes idle are turned around
//! ([`turned_conv`]: pixels as the tile's rows), as linear layers above batch 1 are.
//! Invariant left: per output element the arithmetic is fixed — bias, then one FMA per k in (channel,
//! ky, kx) order — whatever the tile, tier or thread count, so results are bitwise identical across them.

use super::common::{buffer, copy, copy_short, guarded, phase_split, subsample, Copied, Epilogue, Node, Phased, Ref, Tables};
use super::pool::{pool, pool_launch};
use super::{e, Access, BRows, Buf, Call, Expr, Gemm, Kb, Routine, Taps, Tier, TransposeGeo, LANES};
use cnnc_runtime::exec::Buffer;
use cnnc_runtime::op::{Conv2d, Linear};
use cnnc_runtime::Op;

/// Output-channel blocks one task runs against the same column tile before moving on (its chunk).
/// Portable tier: the tile's panel (K × 12 floats) is read from L1/L2 eight times per trip from
/// memory, and 8 blocks of packed weights (8 × K × 16 B, 150 KB at K = 2400) stay in a 2 MB L2.
/// Assembled tiles: each KC-deep slice of the column panels is streamed once per chunk, so a chunk should
/// hold a task's whole share of blocks; 32 blocks' slices of A (32 × MR × KC × 4 B: 192 KB) stay in L2.
fn chunk_blocks(tier: Tier) -> usize {
    match tier {
        Tier::Portable => 8,
        Tier::Avx2 | Tier::Avx512 => 32,
    }
}
/// Target depth of one assembled tile call (rounded down to whole rows of kw taps, see [`pack`]): its B
/// panel (KC × NR floats, 16 KB) and the A slices streaming past it (MR × KC floats) then fit L1d
/// together; for AVX-512, a 32 KB panel is evicted by the A stream (measured: docs/benchmarks.md). The
/// portable tier takes k whole (None).
fn kc(tier: Tier) -> Option<usize> {
    match tier {
        Tier::Portable => None,
        Tier::Avx2 => Some(256),
        Tier::Avx512 => Some(128),
    }
}

/// Linear above batch 1, as GEMM tiles with the roles turned around ([`turned`]): the tile's rows are
/// samples (A = X packed per k in blocks of MR samples, by a `pack_x` launch), its columns output
/// features, and C is Y itself. (A 1×1 convolution over Xᵀ, one weight load per FMA, and the GEMV, one
/// weight stream per sample, are slower: docs/benchmarks.md.)
pub fn linear(t: &mut Tables, n: &Node, l: &Linear, relu: bool) {
    let (k, o, b) = (l.in_features, l.out_features, n.batch);
    let mr = t.tier.mr();
    let blocks = b.div_ceil(mr);
    let xp = t.store(blocks * k * mr);
    // xp[block][kk][r] = x[block·MR + r][kk], zero past the batch.
    let mut kb = Kb::new(format!("{}.pack_x", n.name), blocks * k);
    let (xb, pb) = (kb.buf("x", b * k, Access::Read), kb.buf("xp", blocks * k * mr, Access::Write));
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, it| {
        let (blk, kk) = (kb.let_(it.clone() / k), kb.let_(it.clone() % k));
        let rows = kb.let_((e(b) - blk.clone() * mr).min(mr));
        kb.for_(0usize, rows.clone(), |kb, r| kb.store(pb, it.clone() * mr + r.clone(), xb.at((blk.clone() * mr + r) * k + kk.clone())));
        kb.for_(rows, mr, |kb, r| kb.store(pb, it.clone() * mr + r, e(0.0f32)));
    });
    t.launch(kb.finish(), vec![n.ins[0].0, xp], 0);
    let dtype = t.fc_weights;
    let weights = (n.params[0].data(), n.params.get(1).map(|b| b.data()));
    turned(t, n.name, [b, k, o], xp, weights, |v| dtype.round(v), relu, n.out.0);
}

/// `Y[q][f] = act(bias[f] + Σ_kk X[q][kk] · W[f][kk])` for q < rows, f < o: GEMM tiles with the roles
/// turned around, so that each weight is loaded as part of a vector and used by up to MR rows of X. The
/// tile's rows are X's (A = `xp`, X packed as [block][k][MR], zero past the last row), its columns
/// output features (B = Wᵀ, packed at compile time in [feature tile][k][NR] panels, each weight through
/// `round`, streamed once per block of rows), and C is Y (rows × o). The tile's bias is per row, so each
/// task first fills its block of Y with the bias and the tile accumulates onto it: bias, then one FMA
/// per k in order, as everywhere.
#[allow(clippy::too_many_arguments)]
fn turned(
    t: &mut Tables,
    name: &str,
    [rows, k, o]: [usize; 3],
    xp: Ref,
    (w, bias): (&[f32], Option<&[f32]>),
    round: impl Fn(f32) -> f32 + Sync,
    relu: bool,
    y: Ref,
) {
    let (mr, nr) = (t.tier.mr(), t.tier.nr());
    let (blocks, tiles) = (rows.div_ceil(mr), o.div_ceil(nr));
    // The bias is padded to whole tiles: at least MR long, as the tile's (unused) bias operand must be.
    let (wp, bp) = (t.packed(pack_blocks(w, 1, k, nr, round)), t.param(pack_bias(bias, 1, o, nr)));
    // Tasks own feature tiles; each streams its panels once per block of rows.
    let mut kb = Kb::new(format!("{name}.gemm"), tiles);
    let [ab, wb, bb, yb] =
        [("xp", blocks * k * mr, Access::Read), ("Wt", tiles * k * nr, Access::Read), ("b", tiles * nr, Access::Read), ("y", rows * o, Access::Write)]
            .map(|(nm, len, a)| kb.buf(nm, len, a));
    let (lo, hi) = kb.range();
    let tier = t.tier;
    // Features f0..f0 + cols (`width`: how the portable tile covers them) of every block of rows.
    let tile = |kb: &mut Kb, f0: Expr, cols: Expr, width: Option<Width>| {
        kb.for_(0usize, blocks, |kb, blk| {
            let rows = kb.let_((e(rows) - blk.clone() * mr).min(mr));
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
                blocks: 1,
                a_pitch: 0,
                accumulate: true,
                relu,
                add: None,
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
            Tier::Avx2 | Tier::Avx512 => tile(kb, f0.clone(), (e(o) - f0).min(nr), None),
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
    t.launch(kb.finish(), vec![xp, wp, bp, y], 2 * (rows * k * o) as u64);
}

/// Tile calls' cost, in row × lane units, of an `m` × `n` GEMM on `tier`'s tile: rows come in MR blocks
/// (the last in the shortest tile that holds it, [`Tier::short_rows`]), columns in vectors.
fn tile_cost(tier: Tier, m: usize, n: usize) -> usize {
    let (mr, rem) = (tier.mr(), m % tier.mr());
    let last = tier.short_rows().iter().copied().filter(|&h| h >= rem).min().unwrap_or(mr);
    let rows = m - rem + if rem == 0 { 0 } else { last };
    let lanes = tier.nr() / 2;
    rows * n.div_ceil(lanes) * lanes
}

/// Whether convolution `c` (output [oh, ow] per plane) is cheaper as [`turned_conv`], on AVX-512: where
/// the lanes its planes leave idle (ResNet's 7×7 maps: 49 pixels on 64 lanes, 52 rows of 12-row blocks
/// turned around; NIN's 6×6: 36 on 48, 36) cost more than its copies. Per k step the tiles run about
/// 24 row × lane units a cycle; `pack_x` about 2 cycles per element (a 1×1 kernel's vector copies a
/// third of one) and `transpose` half a cycle per output (measured on Zen 5: docs/benchmarks.md).
fn turns(t: &Tables, n: &Node, c: &Conv2d, ep: &Epilogue, [oh, ow]: [usize; 2]) -> bool {
    let one = c.kernel == [1, 1] && c.pad == [0, 0];
    let plain = c.groups == 1 && c.dilation == [1, 1] && ep.pool.is_none() && (one || c.stride == [1, 1]);
    let (p, co, mr) = (oh * ow, c.out_channels, t.tier.mr());
    let (rows, k) = (n.batch * p, c.in_channels * c.kernel[0] * c.kernel[1]);
    let (direct, turned) = (n.batch * tile_cost(t.tier, co, p), tile_cost(t.tier, rows, co));
    let copies = rows.div_ceil(mr) * mr * k * if one { 1 } else { 6 } / 3 + rows * co / 2;
    plain && t.tier == Tier::Avx512 && turned < direct && (direct - turned) * k >= 24 * copies
}

/// A convolution as [`turned`] GEMM tiles: rows are output pixels (of every image), columns output
/// channels. A `pack_x` launch writes the column matrix transposed, X[q][kk] for pixel q and k = (channel,
/// ky, kx), from the input (or its subsample, for a strided 1×1 convolution, or its zero-padded copy);
/// the tiles write Yᵀ (bias, and ReLU unless an add comes first); a `transpose` launch writes Y, adding
/// the residual and then ReLU if there is one: the roundings of the direct GEMM, bit for bit.
fn turned_conv(t: &mut Tables, n: &Node, c: &Conv2d, ep: Epilogue, [oh, ow]: [usize; 2]) {
    let [ci, h, w] = [n.ins[0].1[0], n.ins[0].1[1], n.ins[0].1[2]];
    let ([kh, kw], co, mr) = (c.kernel, c.out_channels, t.tier.mr());
    let (p, k) = (oh * ow, ci * kh * kw);
    let (rows, blocks) = (n.batch * p, (n.batch * p).div_ceil(mr));
    let name = |s: &str| format!("{}.{s}", n.name);
    // Planes of hq × wq elements in which output pixel (oy, ox)'s tap (ky, kx) is (oy + ky, ox + kx).
    let (x, [hq, wq]) = match (c.kernel, c.pad, c.stride) {
        ([1, 1], [0, 0], [1, 1]) => (n.ins[0].0, [h, w]),
        ([1, 1], [0, 0], stride) => (subsample(t, n, stride, [oh, ow]), [oh, ow]),
        _ => {
            let (xq, ph) = phase_split(t, n, [1, 1], c.pad, [0, 0]);
            (xq, [ph.hq, ph.wq])
        }
    };
    // A 1×1 kernel's is the input's (or subsample's) alone: one copy for every such convolution of it.
    let key = (x, Copied::TurnedColumns);
    let one = [kh, kw, hq, wq] == [1, 1, oh, ow];
    let xp = match t.copy_of(key).filter(|_| one) {
        Some(xp) => xp,
        None => {
            let xp = t.store(blocks * k * mr);
            // xp[block][kk][r] = X[block·MR + r][kk], zero past the last pixel; one iteration per block and
            // CH channels, whose kh·kw·MR elements per channel are contiguous in xp.
            const CH: usize = 64;
            let chunks = ci.div_ceil(CH);
            let mut kb = Kb::new(name("pack_x"), blocks * chunks);
            let (xb, pb) = (kb.buf("x", n.batch * ci * hq * wq, Access::Read), kb.buf("xp", blocks * k * mr, Access::Write));
            let (lo, hi) = kb.range();
            kb.for_(lo, hi, |kb, it| {
                let (blk, ch0) = (kb.let_(it.clone() / chunks), kb.let_(it % chunks * CH));
                let q0 = kb.let_(blk.clone() * mr);
                let channels = |kb: &mut Kb, f: &dyn Fn(&mut Kb, Expr, Expr)| {
                    kb.for_(ch0.clone(), (ch0.clone() + CH).min(ci), |kb, ch| {
                        let (src, dst) = (kb.let_(ch.clone() * (hq * wq)), kb.let_((blk.clone() * ci + ch) * (kh * kw * mr)));
                        f(kb, src, dst)
                    })
                };
                // Pixel r's first tap in channel 0, and (with `check`, the last block) whether r is a pixel:
                // past the last, 0 is read and replaced by zero.
                let scalar = |kb: &mut Kb, check: bool| {
                    let taps: Vec<(Option<Expr>, Expr)> = (0..mr)
                        .map(|r| {
                            let q = kb.let_(q0.clone() + r);
                            let (img, pix) = (q.clone() / p, q.clone() % p);
                            let at = img * (ci * hq * wq) + pix.clone() / ow * wq + pix % ow;
                            match check {
                                true => {
                                    let valid = kb.let_(q.lt(rows));
                                    (Some(valid.clone()), kb.let_(valid.select(at, 0i64)))
                                }
                                false => (None, kb.let_(at)),
                            }
                        })
                        .collect();
                    channels(kb, &|kb, src, dst| {
                        for (ky, kx) in (0..kh).flat_map(|ky| (0..kw).map(move |kx| (ky, kx))) {
                            for (r, (valid, at)) in taps.iter().enumerate() {
                                let x = xb.at(src.clone() + at.clone() + ky * wq + kx);
                                let x = match valid {
                                    Some(v) => v.clone().select(x, e(0.0f32)),
                                    None => x,
                                };
                                kb.store(pb, dst.clone() + (ky * kw + kx) * mr + r, x);
                            }
                        }
                    });
                };
                let whole = (q0.clone() + mr).le(rows);
                if !one {
                    return kb.if_else(whole, |kb| scalar(kb, false), |kb| scalar(kb, true));
                }
                // 1×1 over the plane itself: a block of one image is MR consecutive elements of each channel.
                let one_image = whole.and((q0.clone() % p + mr).le(p));
                kb.if_else(
                    one_image,
                    |kb| {
                        let at = kb.let_(q0.clone() / p * (ci * p) + q0.clone() % p);
                        channels(kb, &|kb, src, dst| {
                            for r in (0..mr).step_by(LANES) {
                                kb.store(pb, dst.clone() + r, xb.at4(src.clone() + at.clone() + r));
                            }
                        })
                    },
                    |kb| scalar(kb, true),
                );
            });
            t.launch(kb.finish(), vec![x, xp], 0);
            if one {
                t.copied(key, xp);
            }
            xp
        }
    };
    let yt = t.store(rows * co);
    let weights = (n.params[0].data(), n.params.get(1).map(|b| b.data()));
    turned(t, n.name, [rows, k, co], xp, weights, |v| v, ep.relu_on_sum(), yt);
    // y[img][f][pix] = Yᵀ[img·p + pix][f] (+ residual, then ReLU): one item per image and 16 channels,
    // natively on AVX-512 where the channels come in 16s (one 16 × 16 transpose per 16 pixels).
    let mut kb = Kb::new(name("transpose"), n.batch * co.div_ceil(16));
    let (x, y) = (kb.buf("yt", rows * co, Access::Read), kb.buf("y", rows * co, Access::Write));
    let extra = ep.add.map(|_| kb.buf("residual", rows * co, Access::Read));
    let (lo, hi) = kb.range();
    let geo = TransposeGeo { p: p as i64, co: co as i64, relu: i64::from(ep.add.is_some() && ep.relu) };
    let call = Call { routine: Routine::Transpose(geo), x, y, extra, lo, hi };
    match t.tier == Tier::Avx512 && co.is_multiple_of(16) {
        true => kb.call(call),
        false => transpose_loops(&mut kb, &geo, &call),
    }
    t.launch(kb.finish(), [vec![yt, n.out.0], ep.add.into_iter().collect()].concat(), 0);
}

/// The loops of [`Routine::Transpose`] call `c` (its portable form, and the cuda backend's): per item
/// (image, 16 channels), 4 pixels × 4 channels at a time, 4 vectors of Yᵀ turned into 4 of Y, which
/// read a cache line of Yᵀ per pixel and write 16 rows of Y in step; the residual added, then ReLU.
pub fn transpose_loops(kb: &mut Kb, g: &TransposeGeo, c: &Call) {
    const F: usize = 16;
    let ([p, co], relu) = ([g.p, g.co].map(|v| v as usize), g.relu != 0);
    let (tb, yb, rb) = (c.x, c.y, c.extra);
    kb.for_(c.lo.clone(), c.hi.clone(), |kb, it| {
        let (img, f0) = (kb.let_(it.clone() / co.div_ceil(F)), kb.let_(it % co.div_ceil(F) * F));
        let f1 = kb.let_((f0.clone() + F).min(co));
        // Y at `at` from Yᵀ's `v` (vectors or not): the residual added, then ReLU.
        let put = |kb: &mut Kb, at: Expr, v: Expr, vec: bool| {
            let v = match rb {
                Some(rb) if relu => (v + rb.load(at.clone(), vec)).max(e(0.0f32).lanes(vec)),
                Some(rb) => v + rb.load(at.clone(), vec),
                None => v,
            };
            kb.store(yb, at, v)
        };
        let quads = if co.is_multiple_of(LANES) { p / LANES * LANES } else { 0 };
        kb.for_step(0usize, quads, LANES as i64, |kb, pix| {
            let from = kb.let_((img.clone() * p + pix.clone()) * co);
            let to = kb.let_(img.clone() * (co * p) + pix);
            kb.for_step(f0.clone(), f1.clone(), LANES as i64, |kb, f| {
                let rows = [0, 1, 2, 3].map(|i| tb.at4(from.clone() + i * co + f.clone()));
                for (j, v) in super::transpose(rows).into_iter().enumerate() {
                    let at = kb.let_(to.clone() + (f.clone() + j) * p);
                    put(kb, at, v, true);
                }
            });
        });
        kb.for_(quads, p, |kb, pix| {
            let from = kb.let_((img.clone() * p + pix.clone()) * co);
            let to = kb.let_(img.clone() * (co * p) + pix);
            kb.for_(f0.clone(), f1.clone(), |kb, f| {
                let at = kb.let_(to.clone() + f.clone() * p);
                put(kb, at, tb.at(from.clone() + f), false);
            });
        });
    });
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

/// Packs `groups` groups of rows of `k` weights (row-major `w`, a convolution's (out, in/groups, kh, kw))
/// as [group][block][k][mr], zero rows past each group's last, each weight through `round`: the tile's
/// A, or (turned around) a linear layer's B. Blocks are packed on every core, into the final buffer.
fn pack_blocks(w: &[f32], groups: usize, k: usize, mr: usize, round: impl Fn(f32) -> f32 + Sync) -> Buffer {
    let rows = w.len() / k / groups;
    let blocks = rows.div_ceil(mr);
    buffer(groups * blocks * k * mr, |a| {
        cnnc_runtime::par::chunks_mut(a, k * mr, |i, a| {
            let first = i / blocks * rows + i % blocks * mr;
            let n = mr.min(rows - i % blocks * mr);
            for (r, ws) in w[first * k..][..n * k].chunks(k).enumerate() {
                ws.iter().enumerate().for_each(|(kk, &v)| a[kk * mr + r] = round(v));
            }
        })
    })
}

/// The bias (zeros without one) of [`pack_blocks`]' rows, as [group][block·mr + r].
fn pack_bias(b: Option<&[f32]>, groups: usize, rows: usize, mr: usize) -> Vec<f32> {
    let per = rows.div_ceil(mr) * mr;
    (0..groups * per).map(|i| if i % per < rows { b.map_or(0.0, |b| b[i / per * rows + i % per]) } else { 0.0 }).collect()
}

/// Lowers convolution `n` (whose own output, before the epilogue's pool, is [oh, ow]) as a direct GEMM.
pub fn conv(t: &mut Tables, n: &Node, c: &Conv2d, ep: Epilogue, out: [usize; 2]) {
    if turns(t, n, c, &ep, out) {
        return turned_conv(t, n, c, ep, out);
    }
    let weights = Weights::Rows(n.params[0].data(), n.params.get(1).map(|b| b.data()));
    direct(t, n, c, ep, out, weights, None);
}

/// Where [`pack_blocks`] puts row `row`'s weight `kk` of group `group`: [group][block][k][mr].
#[derive(Clone, Copy)]
pub struct Blocks {
    mr: usize,
    blocks: usize,
    k: usize,
}

impl Blocks {
    pub fn at(self, group: usize, row: usize, kk: usize) -> usize {
        ((group * self.blocks + row / self.mr) * self.k + kk) * self.mr + row % self.mr
    }
}

/// Winograd's U for [`plane_products`] with its (zero) bias: `groups` groups of `rows` rows of `k`,
/// packed as [`pack_blocks`] packs them but written straight into the final buffer (no row-major copy
/// beside it) by `fill(i, part, layout)` on every core, where `part` holds groups i·per..(i + 1)·per and
/// `layout.at(j, row, kk)` is where the part's group j's weight (row, kk) goes. Rows past the last stay 0.
pub fn packed_planes(t: &mut Tables, [groups, rows, k]: [usize; 3], per: usize, fill: impl Fn(usize, &mut [f32], Blocks) + Sync) -> (Ref, Ref) {
    let mr = t.tier.mr();
    let layout = Blocks { mr, blocks: rows.div_ceil(mr), k };
    let a = buffer(groups * layout.blocks * k * mr, |a| cnnc_runtime::par::chunks_mut(a, per * layout.blocks * k * mr, |i, part| fill(i, part, layout)));
    (t.packed(a), t.param(pack_bias(None, groups, rows, mr)))
}

/// Winograd's `groups` (α²) products `M[ξ] = U[ξ] · V[ξ]`, each (co × k) · (k × cols), as the direct
/// GEMM of a `groups`-group 1×1 convolution over one image whose groups' first input and output rows lie
/// `pitch` elements apart (V's and M's plane pitch). U and its bias are `packed` by [`packed_planes`].
pub fn plane_products(t: &mut Tables, name: &str, groups: usize, [k, co, cols]: [usize; 3], [v, m]: [Ref; 2], pitch: [usize; 2], packed: (Ref, Ref)) {
    let c = Conv2d { in_channels: groups * k, out_channels: groups * co, kernel: [1, 1], stride: [1, 1], pad: [0, 0], dilation: [1, 1], groups, bias: false };
    let (op, in_shape, out_shape) = (Op::Conv2d(c.clone()), [groups * k, cols, 1], [groups * co, cols, 1]);
    let n = Node { name, op: &op, batch: 1, ins: vec![(v, &in_shape)], out: (m, &out_shape), params: vec![] };
    direct(t, &n, &c, Epilogue::default(), [cols, 1], Weights::Packed(packed.0, packed.1), Some(pitch));
}

/// Where a direct convolution's weights come from.
enum Weights<'a> {
    /// (co, ci/groups·kh·kw) rows and the bias, to be packed.
    Rows(&'a [f32], Option<&'a [f32]>),
    /// Packed weights and bias, as an earlier lowering of the same weights returned them.
    Packed(Ref, Ref),
}

/// Lowers convolution `n` as a direct GEMM with `weights`; `planes` overrides the elements from one
/// (image, group)'s first input and output row to the next (only for unpacked columns of one image).
/// Returns the packed weights and bias.
#[allow(clippy::too_many_arguments)]
fn direct(t: &mut Tables, n: &Node, c: &Conv2d, ep: Epilogue, [oh, ow]: [usize; 2], weights: Weights, planes: Option<[usize; 2]>) -> (Ref, Ref) {
    let [ci, h, w] = [n.ins[0].1[0], n.ins[0].1[1], n.ins[0].1[2]];
    let [kh, kw] = c.kernel;
    let co = c.out_channels;
    let (mr, nr) = (t.tier.mr(), t.tier.nr());
    let (cig, k, ncb) = (ci / c.groups, ci / c.groups * kh * kw, (co / c.groups).div_ceil(mr));
    let pool_after = ep.pool;
    // Implicit columns (see [`Columns::Taps`]) mask the horizontal padding of stride-1 convolutions at
    // least as wide as their input; others read the whole phased input, whose row pitch the output then
    // has too (its extra columns are computed and skipped by the fused pool, the only reader).
    let masked = c.stride == [1, 1] && w <= ow;
    let [s0, s1] = c.stride;
    // The tile addresses a group's input with 32-bit offsets and displacements: bytes of the phased
    // input (padding, stride phases and the extra rows included) must stay below 2³¹.
    let group_bytes = 4 * cig * (h + 2 * c.pad[0] + s0 * (kh + 1)) * (w + 2 * c.pad[1] + s1);
    let columns = if kh == 1 && kw == 1 && c.pad == [0, 0] {
        Columns::Input
    } else if t.tier == Tier::Avx512 && (masked || pool_after.is_some()) && group_bytes < i32::MAX as usize && c.dilation == [1, 1] {
        Columns::Taps
    } else if t.tier.assembled() && c.groups * ncb * k * mr * 4 <= 1 << 20 && n.batch * c.groups * (oh * ow).div_ceil(nr) > 1 {
        Columns::OnTheFly
    } else {
        Columns::Panels
    };
    let pitch = if columns == Columns::Taps && !masked { (w + 2 * c.pad[1]).div_ceil(s1) } else { ow };
    let g = Geo { cig, cog: co / c.groups, k, p: oh * pitch, ncb };
    // Elements from one (image, group)'s first input row (of unpacked columns) and output row to the next.
    let [gp_in, gp_out] = planes.unwrap_or([g.cig * g.p, g.cog * g.p]);
    debug_assert!(planes.is_none() || (n.batch == 1 && columns == Columns::Input));
    let (a, bias) = match weights {
        Weights::Packed(a, bias) => (a, bias),
        Weights::Rows(w, b) => (t.packed(pack_blocks(w, c.groups, g.k, mr, |v| v)), t.param(pack_bias(b, c.groups, g.cog, mr))),
    };
    let name = |s: &str| format!("{}.{s}", n.name);
    // A strided 1×1 convolution reads the pixels it uses, copied out (a quarter of ResNet's stride-2
    // inputs) instead of every stride phase of the input.
    let x = if c.stride == [1, 1] || columns != Columns::Input { n.ins[0].0 } else { subsample(t, n, c.stride, [oh, ow]) };
    // Slices of k per tile call, whole rows of kw taps. An AVX2 tile reading the input in place, whose
    // rows are not whole cache lines apart (7 × 7 and 14 × 14 maps), touches two lines per k for its
    // 16 columns: where k takes several slices anyway, half the depth keeps that panel in L1d. (Not
    // under one whole tile: NIN's 9-column Winograd products were slower.)
    let split = t.tier == Tier::Avx2 && columns == Columns::Input && g.p > nr && !g.p.is_multiple_of(nr) && kc(t.tier).is_some_and(|kc| g.k > kc);
    let kc = kc(t.tier).map_or(g.k, |kc| (kc / if split { 2 } else { 1 } / kw).max(1) * kw);
    let slices = g.k.div_ceil(kc);
    let ntiles = g.p.div_ceil(nr);
    // Packing reads the input through a zero-padded, stride-phase-split copy (see [`Phased`]), so that
    // each panel row is contiguous copies without bounds checks.
    let ph = match columns {
        Columns::Input => None,
        // Rows ow wide, padded only vertically.
        Columns::Taps if masked => Some(phase_split(t, n, c.stride, [c.pad[0], 0], [0, ow])),
        // A row past the last window's: the last output row's extra columns read up to (kw − 1) / s1
        // elements beyond it.
        Columns::Taps => Some(phase_split(t, n, c.stride, c.pad, [oh + (kh - 1) / s0 + 1, 0])),
        Columns::OnTheFly | Columns::Panels => Some(phase_split(t, n, c.stride, c.pad, [0, 0])),
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
    let parts = if matches!(columns, Columns::Input | Columns::Panels) && pool_after.is_none() { column_parts(&g, mr, nr) } else { 1 };
    let extent = n.batch * c.groups * if packed { ntiles } else { parts * g.ncb };
    let mut kb = Kb::new(name("gemm"), extent);
    let ab = kb.buf("A", c.groups * g.ncb * g.k * mr, Access::Read);
    let bb = kb.buf("bias", c.groups * g.ncb * mr, Access::Read);
    let colb = kb.buf("cols", col_len, Access::Read);
    let yb = kb.buf("y", conv_len, Access::ReadWrite);
    let panel = packed.then(|| kb.buf("panel", kc * nr, Access::Local));
    let pooled = pool_after.filter(|_| !packed).map(|_| kb.buf("pooled", n.out_len(), Access::Write));
    let residual = ep.add.map(|_| kb.buf("residual", conv_len, Access::Read));
    // The tile's tables: lane masks per column tile, offsets per tap row (see [`BRows::Taps`]).
    let tables = taps.map(|tp| {
        let (masks, offsets) = tap_tables(&tp, g.p, nr, cig);
        (kb.buf("masks", masks.len(), Access::Read), t.param(masks), kb.buf("offsets", offsets.len(), Access::Read), t.param(offsets))
    });
    let (lo, hi) = kb.range();
    // Runs `f(k0, depth, accumulate, last)` for every slice of k: the first starts from the bias, the
    // last applies the epilogue.
    let each_slice = |kb: &mut Kb, f: &dyn Fn(&mut Kb, Expr, Expr, bool, bool)| {
        if slices == 1 {
            return f(kb, e(0i64), e(g.k), false, true);
        }
        f(kb, e(0i64), e(kc), false, false);
        kb.for_(1usize, slices - 1, |kb, s| f(kb, s * kc, e(kc), true, false));
        f(kb, e((slices - 1) * kc), e(g.k - (slices - 1) * kc), true, true);
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
    // The tile of channel block `blk` × columns col..col + cols, for k in k0..k0 + depth; the last
    // slice's applies the epilogue (residual add, ReLU) before its store.
    let gemm = |ig: &Expr, blk: Expr, k0: &Expr, depth: &Expr, col: &Expr, cols: Expr, accumulate: bool, last: bool| {
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
            blocks: 1,
            a_pitch: 0,
            accumulate,
            relu: last && ep.relu,
            add: residual.filter(|_| last),
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
            each_slice(kb, &|kb, k0, depth, accumulate, last| {
                pack_panel(kb, &ig, &k0, &depth, &col, &cols);
                kb.for_(0usize, g.ncb, |kb, blk| kb.gemm(gemm(&ig, blk, &k0, &depth, &col, cols.clone(), accumulate, last)));
            });
        });
    } else {
        // Tasks own ranges of (image, group, channel block); each range is walked in chunks of blocks
        // (`chunk_blocks`) that never cross an (image, group) boundary.
        // With column parts, (image, group, part) in place of (image, group): part j owns the full
        // column tiles j·f/parts..(j + 1)·f/parts (f of them) and the last part the columns past them.
        let full_tiles = g.p / nr;
        kb.for_(lo.clone() / g.ncb, (hi.clone() - 1i64) / g.ncb + 1i64, |kb, igp| {
            let b0 = kb.let_((lo.clone() - igp.clone() * g.ncb).max(0i64));
            let b1 = kb.let_((hi.clone() - igp.clone() * g.ncb).min(g.ncb));
            let (ig, part) = if parts == 1 { (igp, None) } else { (kb.let_(igp.clone() / parts), Some(kb.let_(igp % parts))) };
            let [first_col, end_full] = [0usize, 1].map(|d| part.clone().map_or(e(d * full_tiles * nr), |j| (j + d) * full_tiles / parts * nr));
            let (first_col, end_full) = (kb.let_(first_col), kb.let_(end_full));
            let is_last = part.clone().map(|j| j.eq(parts - 1));
            // This task's columns in y: its part's, the tail included in the last part.
            let end_col = kb.let_(is_last.clone().map_or(e(g.p), |l| l.select(e(g.p), end_full.clone())));
            let mcb = chunk_blocks(t.tier);
            kb.for_step(b0, b1.clone(), mcb as i64, |kb, c0| {
                let c1 = kb.let_((c0.clone() + mcb).min(b1.clone()));
                each_slice(kb, &|kb, k0, depth, accumulate, last| {
                    let blocks = |kb: &mut Kb, col: Expr, cols: Expr, width: Option<Width>| {
                        kb.for_(c0.clone(), c1.clone(), |kb, blk| {
                            let tile = gemm(&ig, blk, &k0, &depth, &col, cols.clone(), accumulate, last);
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
                            kb.for_step(first_col.clone(), end_full.clone(), nr as i64, |kb, col| blocks(kb, col, e(nr), Some(Width::Vectors(nr / LANES))));
                            guarded(kb, is_last.clone(), |kb| {
                                for (at, n, w) in pieces(g.p - full) {
                                    blocks(kb, e(full + at), e(n), Some(w));
                                }
                            });
                        }
                        // The tile masks its own edge columns; AVX2 takes the last 1–4 in column tiles,
                        // over whole groups of full blocks.
                        Tier::Avx2 | Tier::Avx512 => {
                            let (full, tail) = (g.p / nr * nr, g.p % nr);
                            let Some(nb) = t.tier.column_blocks(tail) else {
                                return kb.for_step(first_col.clone(), end_col.clone(), nr as i64, |kb, col| {
                                    let cols = (e(g.p) - col.clone()).min(nr);
                                    blocks(kb, col, cols, None)
                                });
                            };
                            kb.for_step(first_col.clone(), end_full.clone(), nr as i64, |kb, col| blocks(kb, col, e(nr), None));
                            guarded(kb, is_last.clone(), |kb| {
                                let whole = kb.let_(c1.clone().min(g.cog / mr));
                                kb.for_step(c0.clone(), c1.clone(), nb as i64, |kb, blk| {
                                    let column = (blk.clone() + nb).le(whole.clone());
                                    let tile = Gemm {
                                        rows: e(nb * mr),
                                        blocks: nb,
                                        a_pitch: g.k * mr,
                                        ..gemm(&ig, blk.clone(), &k0, &depth, &e(full), e(tail), accumulate, last)
                                    };
                                    kb.if_else(
                                        column,
                                        |kb| kb.gemm(tile),
                                        |kb| {
                                            kb.for_(blk.clone(), (blk.clone() + nb).min(c1.clone()), |kb, b| {
                                                kb.gemm(gemm(&ig, b, &k0, &depth, &e(full), e(tail), accumulate, last))
                                            })
                                        },
                                    );
                                });
                            });
                        }
                    }
                });
                if let (Some(p), Some(pb)) = (pool_after, pooled) {
                    let first = ig.clone() * g.cog + c0.clone() * mr;
                    let last = (ig.clone() * g.cog + c1.clone() * mr).min(ig.clone() * g.cog + g.cog);
                    pool(kb, p, None, t.tier.assembled(), yb, pb, first, last, [oh, ow, pitch], [n.out.1[1], n.out.1[2]]);
                }
            });
        });
    }
    let mut refs = vec![a, bias, cols, pre_pool];
    refs.extend(pooled.map(|_| n.out.0));
    refs.extend(ep.add);
    refs.extend(tables.into_iter().flat_map(|(_, masks, _, offsets)| [masks, offsets]));
    t.launch(kb.finish(), refs, 2 * (n.batch * co * oh * ow * g.k) as u64);
    if let (Some(p), true) = (pool_after, packed) {
        pool_launch(t, n, p, pre_pool, [oh, ow]);
    }
    (a, bias)
}

/// How many parts a direct GEMM that is split by channel blocks splits its columns into, so that its
/// tasks own (part, channel blocks) and each reads only its part of B: with more than one thread, every
/// task of an image read all of B (ResNet's res2 1×1 layers: eight tasks each streaming 0.8–3.2 MB
/// from L3). Parts of about 128 KB of B; only where A stays in L2 across them (each part streams the
/// task's blocks of A again), and never with a fused pool (it needs whole planes).
fn column_parts(g: &Geo, mr: usize, nr: usize) -> usize {
    let (a_bytes, b_bytes) = (4 * g.ncb * mr * g.k, 4 * g.k * g.p);
    if a_bytes > 256 << 10 {
        return 1;
    }
    (b_bytes / (128 << 10)).clamp(1, (g.p / nr).max(1))
}

/// Where a convolution's GEMM reads its column matrix (B).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Columns {
    /// 1×1 unpadded convolutions: the input itself, [image][channel][pixel] (strided ones: its
    /// [`subsample`]).
    Input,
    /// Written by an `im2col` launch as the tile reads it, [image][group][column tile][k][NR]: each k
    /// step of a tile is one contiguous run of NR floats and a panel one contiguous KC × NR block (as a
    /// [k][pixel] matrix, rows kilobytes apart were slower: docs/benchmarks.md).
    Panels,
    /// Assembled tiers, when the columns cannot be read in place (AVX-512: strided convolutions without a pool)
    /// and the packed weights fit comfortably in L2 (under 1 MiB; AlexNet's conv1 has 139 KB): each task
    /// packs KC × NR panels into a stack buffer right before the tiles that read them (L1-hot, no
    /// round trip to memory). Tasks split the column tiles and each read all of A, so each panel is
    /// packed once; pooling needs whole planes and becomes a second launch. (Split by channel blocks,
    /// as the larger layers are, every task would pack every panel.) Not for a single column tile (the
    /// digits model's 4 × 4 conv3 at batch 1), which would be one task while the other threads wait:
    /// that takes `Panels`, whose GEMM splits by channel blocks and pools in the same launch.
    OnTheFly,
    /// AVX-512 tier: no column matrix at all; the tile reads each tap in place, as pixel p's element
    /// plus a constant ([`BRows::Taps`]). Stride-1 convolutions whose output is at least as wide as
    /// their input read it padded with rows only, ow wide, and mask the lanes that fall on horizontal
    /// padding; others that are followed by a pool (AlexNet's stride-4 conv1) read the phased input,
    /// whose row pitch wq ≥ ow the output takes too (conv1: 57 for 55 columns). No packing, and the
    /// pool fused (measured: docs/benchmarks.md).
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
    let ([kh, kw], [s0, s1], [d0, d1], Phased { hq, wq, .. }) = (p.c.kernel, p.c.stride, p.c.dilation, p.ph);
    // Whole panels over rows that tile them evenly (ow a multiple of NR, or NR of ow: ResNet's conv1,
    // 4 × 4 and 8 × 8 maps) copy segments of one length known here, without a loop or branch per tap.
    let exact = (p.g.p.is_multiple_of(p.nr) && (p.ow.is_multiple_of(p.nr) || p.nr.is_multiple_of(p.ow))).then(|| p.ow.min(p.nr));
    let (oy0, ox0) = (kb.let_(col.clone() / p.ow), kb.let_(col % p.ow));
    let end = kb.let_(ox0.clone() + cols);
    let segments = match exact {
        Some(len) => e(p.nr / len),
        None => kb.let_((end.clone() + (p.ow - 1)) / p.ow),
    };
    let first_plane = kb.let_((img * p.ci + grp * p.g.cig) * (s0 * s1));
    let r0 = kb.let_(k0 / kw);
    // Segments outside, k inside: a segment's geometry is computed once per panel, not once per row.
    kb.for_(0usize, segments, |kb, seg| {
        // This segment covers ox in a..b of output row oy0 + seg; panel column = ox + (seg·ow − ox0).
        let a = kb.let_(seg.clone().eq(0i64).select(ox0.clone(), 0i64));
        let len = match exact {
            Some(n) => e(n),
            None => kb.let_((end.clone() - seg.clone() * p.ow).min(p.ow) - a.clone()),
        };
        let dst0 = kb.let_(base.clone() + seg.clone() * p.ow - ox0.clone() + a.clone());
        let row = kb.let_((oy0.clone() + seg) * wq + a);
        kb.for_(0usize, depth.clone() / kw, |kb, rr| {
            // Tap row r = (channel, ky) of this slice; its kw taps are the next kw panel rows.
            let r = kb.let_(r0.clone() + rr.clone());
            let (ch, ky) = (kb.let_(r.clone() / kh), kb.let_(r % kh));
            // The tap's offset on the input: ky·d rows, kx·d columns (a dilated convolution).
            let ky = if d0 == 1 { ky } else { kb.let_(ky * d0) };
            let plane = kb.let_(first_plane.clone() + ch * (s0 * s1) + ky.clone() % s0 * s1);
            let src = kb.let_(row.clone() + ky / s0 * wq);
            let dst = kb.let_(dst0.clone() + rr * (kw * p.nr));
            // The kw taps unrolled: their offsets are constants from the row's (a loop here kept its
            // divisions inside, once per tap, in the code Cranelift generated).
            for kx in 0..kw {
                let from = (plane.clone() + kx * d1 % s1) * (hq * wq) + src.clone() + kx * d1 / s1;
                copy_short(kb, p.panel, dst.clone() + kx * p.nr, p.x, from, len.clone(), p.ow.min(p.nr));
            }
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
                    guarded(kb, ragged.then(|| e(r).lt(g.rows.clone())), |kb| kb.set(acc, g.c.load(at, vec)));
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
        guarded(kb, ragged.then(|| e(r).lt(g.rows.clone())), |kb| {
            for (v, &acc) in row.iter().enumerate() {
                let mut val = e(acc);
                if let Some(res) = g.add {
                    val = val + res.load(g.c0.clone() + r * g.ldc + v * LANES, vec);
                }
                if g.relu {
                    val = val.max(e(0.0f32).lanes(vec));
                }
                kb.store(g.c, g.c0.clone() + r * g.ldc + v * LANES, val);
            }
        });
    }
}
