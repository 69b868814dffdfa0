//! Op → kernels: the one place that chooses how each op is computed, from the strategies below it
//! (`elementwise.rs`, `pool.rs`, `gemv.rs`, `gemm.rs`, `winograd.rs`; none of them calls back here).
//! Convolutions take Winograd's minimal filtering — F(2×2, 3×3), F(3×3, 3×3), F(4×4, 3×3), F(2×2, 5×5)
//! or F(3×3, 5×5) — where [`winograd::chosen`] takes it, else a direct GEMM; linear layers a GEMV at
//! batch 1 and GEMM tiles above. The cuda backend's lowering (`Tables::gpu`) takes the GPU-shaped
//! kernels of `gpu.rs` for convolutions, linear layers and pooling instead.
//! Invariant left: every choice depends on the op, its shapes and the whole batch size ([`Tables::batch`]),
//! never on the tier, the thread count or the replicas sharing the batch, so results are bitwise
//! identical across those. (Linear layers change method above batch 1 and Winograd is chosen per batch
//! size, so batch sizes on either side of those may differ in the last bits; within a batch, no sample
//! depends on its place.)

use super::common::{Epilogue, Node, Tables};
use super::{e, elementwise, gemm, gemv, gpu, pool, winograd, Kb, Kernel, Routine, Stmt};
use cnnc_runtime::op::{window_out, Conv2d, FusedBase, Linear};
use cnnc_runtime::Op;

/// Appends the launches that compute `n` (aliasing ops — reshape, dropout — have none).
pub fn lower(t: &mut Tables, n: &Node) {
    match n.op {
        Op::Reshape { .. } | Op::Dropout { .. } => {}
        Op::Relu => elementwise::pointwise(t, n, |[v]| v.max(e(0.0f32).splat())),
        Op::Clip { min, max } => elementwise::pointwise(t, n, |[v]| v.max(e(min.0 as f32).splat()).min(e(max.0 as f32).splat())),
        Op::Sigmoid => elementwise::pointwise(t, n, |[v]| e(1.0f32).splat() / (e(1.0f32).splat() + (e(0.0f32).splat() - v).exp())),
        Op::Add => elementwise::pointwise(t, n, |[a, b]| a + b),
        Op::Mul if n.ins[0].1 == n.ins[1].1 => elementwise::pointwise(t, n, |[a, b]| a * b),
        Op::Mul => elementwise::scale(t, n),
        Op::BatchNorm(bn) => elementwise::batch_norm(t, n, bn),
        Op::Lrn(l) => elementwise::lrn(t, n, l),
        Op::Softmax { axis } => elementwise::softmax(t, n, *axis),
        Op::Concat { axis } => elementwise::copies(t, n, *axis, None),
        Op::Slice { axis, start, len } => elementwise::copies(t, n, *axis, Some((*start, *len))),
        Op::Transpose { axes } => elementwise::transpose(t, n, axes),
        Op::MaxPool2d(p) | Op::AvgPool2d(p) if t.gpu => gpu::pool(t, n, p),
        Op::MaxPool2d(p) | Op::AvgPool2d(p) => pool::lower(t, n, p),
        Op::Linear(l) => linear(t, n, l, false),
        Op::Conv2d(c) => conv(t, n, c, Epilogue::default()),
        Op::Fused(f) => match &f.base {
            FusedBase::Conv(c) => conv(t, n, c, Epilogue { add: f.add.then(|| n.ins[1].0), relu: f.relu, pool: f.pool.as_ref() }),
            FusedBase::Linear(l) => linear(t, n, l, f.relu),
        },
    }
}

/// A linear layer: at batch 1 a GEMV streams each weight once; above, GEMM tiles use each weight for up
/// to MR samples.
fn linear(t: &mut Tables, n: &Node, l: &Linear, relu: bool) {
    if t.gpu {
        return gpu::linear(t, n, l, relu);
    }
    match t.batch {
        1 => gemv::linear(t, n, l, relu),
        _ => gemm::linear(t, n, l, relu),
    }
}

/// A convolution (with its fused add, ReLU and max pooling): Winograd if the cost model (or the caller's
/// [`super::Winograd`] choice) takes it, else direct.
fn conv(t: &mut Tables, n: &Node, c: &Conv2d, ep: Epilogue) {
    if t.gpu {
        return gpu::conv(t, n, c, ep);
    }
    // The convolution's own output size (before pooling).
    let out = match ep.pool {
        Some(_) => [0, 1].map(|i| window_out(n.ins[0].1[1 + i], c.span()[i], c.stride[i], c.pad[i], false).expect("validated")),
        None => [n.out.1[1], n.out.1[2]],
    };
    match winograd::chosen(t.winograd, t.tier, c, t.batch, out) {
        Some(f) => winograd::lower(t, n, c, f, ep, out),
        None => gemm::conv(t, n, c, ep, out),
    }
}

/// `k` with every [`Stmt::Call`] replaced by the loops the portable tier builds for its routine: for a
/// backend without the native routines (the cuda backend printing an assembled tier's program).
pub fn expand_calls(k: &Kernel) -> Kernel {
    fn go(kb: &mut Kb, body: &[Stmt]) -> Vec<Stmt> {
        let mut out = vec![];
        for s in body {
            match s {
                Stmt::For { var, lo, hi, step, body } => out.push(Stmt::For { var: *var, lo: lo.clone(), hi: hi.clone(), step: *step, body: go(kb, body) }),
                Stmt::If { cond, then, els } => out.push(Stmt::If { cond: cond.clone(), then: go(kb, then), els: go(kb, els) }),
                Stmt::Call(c) => out.extend(kb.block(|kb| match &c.routine {
                    Routine::Pool(g) => pool::call_loops(kb, g, c),
                    Routine::Transpose(g) => gemm::transpose_loops(kb, g, c),
                })),
                s => out.push(s.clone()),
            }
        }
        out
    }
    let mut kb = Kb::resume(k);
    let body = go(&mut kb, &k.body);
    Kernel { body, ..kb.finish() }
}
