//! Linear layers at batch 1: a bandwidth-bound GEMV over weights packed at compile time.
//! Invariant left: each output feature is bias + the sum of its products in one fixed order (two
//! 4-lane partial sums over steps of 8, a scalar tail, the horizontal sum), however tasks split the rows.

use super::common::{buffer, Node, Tables};
use super::{bf16_bits, e, Access, Expr, Kb, WeightsDtype, LANES};
use cnnc_runtime::op::Linear;

/// Linear (+ReLU) at batch 1, as a bandwidth-bound GEMV: each task owns output features and streams
/// their weight rows. Per row: two f32x4 partial sums over k in steps of 8, a scalar tail, then the
/// horizontal sum and the bias — the same arithmetic however rows are grouped. A block covers two rows
/// (one if the features are odd), packed at compile time as one sequential run — per step of 8, each
/// row's 8 in turn, then the rows' tails — and an iteration runs two blocks half the rows apart: two
/// streams (one stream per core left a Zen 5's memory parallelism idle), eight independent FMA chains
/// that hide the FMA latency, and 8 accumulators + 2 shared vectors in the 16 xmm registers. (Rows in
/// place, four streams, were slower on Sapphire Rapids; both measured: docs/benchmarks.md.)
///
/// With bfloat16 weights ([`WeightsDtype::Bf16`]) the slots are f32 slots holding two of them: per 8
/// weights of a row, slot j has w[j] in its low half and w[4 + j] in its high half, so one 4-slot load
/// widens into the two vectors of weights the two partial sums take; the scalar tail has one per slot.
/// The arithmetic is the f32 GEMV's over the rounded weights, bit for bit.
pub fn linear(t: &mut Tables, n: &Node, l: &Linear, relu: bool) {
    const U: usize = 2;
    const STREAMS: usize = 2;
    let (k, o) = (l.in_features, l.out_features);
    let rb = if o % 2 == 0 { 2 } else { 1 };
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
    // Written in place into the final buffer: AlexBN's 58 M FC weights are packed at every start.
    let rows: Vec<&[f32]> = n.params[0].data().chunks(k).collect();
    let w = buffer(o * row, |out| {
        cnnc_runtime::par::chunks_mut(out, rb * row, |b, out| {
            let blk = &rows[b * rb..][..rb];
            let (steps, tails) = out.split_at_mut(rb * kv / per);
            for (s, out) in steps.chunks_mut(rb * step / per).enumerate() {
                for (c, out) in blk.iter().map(|r| &r[s * step..][..step]).zip(out.chunks_mut(step / per)) {
                    match bf16 {
                        true => out.iter_mut().enumerate().for_each(|(j, o)| *o = pair(c[j], c[LANES + j])),
                        false => out.copy_from_slice(c),
                    }
                }
            }
            for (c, out) in blk.iter().map(|r| &r[kv..]).zip(tails.chunks_mut((k - kv).max(1))) {
                out.iter_mut().zip(c).for_each(|(o, &v)| *o = if bf16 { pair(v, 0.0) } else { v });
            }
        })
    });
    let (w, b) = (t.packed(w), t.param(bias));
    // Iteration `it` runs block it and block it + half: two sequential streams.
    let blocks = o / rb;
    let half = blocks.div_ceil(STREAMS);
    let mut kb = Kb::new(format!("{}.{}", n.name, n.op.name()), half);
    let [xb, wb, bb, yb] =
        [("x", k, Access::Read), ("W", o * row, Access::Read), ("b", o, Access::Read), ("y", o, Access::Write)].map(|(nm, len, a)| kb.buf(nm, len, a));
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, it| {
        // The blocks of this iteration: the first, and the second unless past the last.
        let second = (it.clone() + half).lt(blocks);
        let row_blocks = |kb: &mut Kb, n: usize| {
            // Rows r0..r0 + rb of block `it + s·half`, for s < n.
            let r0: Vec<Expr> = (0..n).map(|s| kb.let_((it.clone() + s * half) * rb)).collect();
            let acc: Vec<Vec<_>> = (0..n * rb).map(|_| (0..U).map(|_| kb.var(e(0.0f32).splat())).collect()).collect();
            let tail: Vec<_> = (0..n * rb).map(|_| kb.var(0.0f32)).collect();
            let w0: Vec<Expr> = r0.iter().map(|r0| kb.let_(r0.clone() * row)).collect();
            kb.for_step(0usize, kv, step as i64, |kb, i| {
                // The input is loaded once for the blocks' rows.
                let x: Vec<Expr> = (0..U).map(|u| kb.let_(xb.at4(i.clone() + u * LANES))).collect();
                let at: Vec<Expr> = w0.iter().map(|w0| kb.let_(w0.clone() + slot(i.clone()) * rb as i64)).collect();
                for (j, a) in acc.iter().enumerate() {
                    let (at, r) = (&at[j / rb], j % rb);
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
                for (j, &a) in tail.iter().enumerate() {
                    let (w0, r) = (&w0[j / rb], j % rb);
                    let w = wb.at(w0.clone() + (i.clone() - kv as i64) + (rb * kv / per + r * (k - kv)) as i64);
                    kb.set(a, xb.at(i.clone()).fma(if bf16 { w.bf16(false) } else { w }, a));
                }
            });
            for (j, a) in acc.iter().enumerate() {
                let at = r0[j / rb].clone() + j % rb;
                let mut v = (e(a[0]) + a[1]).hsum() + tail[j] + bb.at(at.clone());
                if relu {
                    v = v.max(0.0f32);
                }
                kb.store(yb, at, v);
            }
        };
        kb.if_else(second, |kb| row_blocks(kb, STREAMS), |kb| row_blocks(kb, 1));
    });
    t.launch(kb.finish(), vec![n.ins[0].0, w, b, n.out.0], 2 * (k * o) as u64);
}
