//! Graph → [`Program`]: kernels over one planned arena, for one batch size.
//!
//! Every activation and scratch tensor gets an offset in a single `f32` arena. A tensor lives from the
//! first launch that touches it to the last; tensors whose lives do not overlap share memory (greedy
//! first fit, largest first). Reshape and dropout alias their input; ReLU, batch normalization and add
//! write over their (first) input when nothing reads it afterwards.
//! Invariant left: launches run in order; within a launch, buffers that share arena memory are never
//! both accessed (an in-place launch reads and writes each element by the same task).

use super::common::{Node, Ref, Tables};
use super::ops;
use super::{Kernel, Tier, WeightsDtype, Winograd};
use crate::ir::{Graph, Kind, NodeId};
use crate::lower::eval;
use crate::weights::Bound;
pub use cnnc_runtime::exec::Slot;
use cnnc_runtime::{Op, Tensor};
use std::collections::HashMap;

/// Alignment of every arena tensor, in elements: 64 bytes, one cache line, so no two tasks writing
/// different tensors share a line and every tensor starts vector-aligned.
pub const ALIGN: usize = 16;

#[derive(Clone, Debug)]
pub struct Launch {
    pub kernel: Kernel,
    /// One per kernel buffer, in the kernel's order.
    pub slots: Vec<Slot>,
    /// Floating-point operations (2 per multiply-accumulate), for GFLOP/s reports.
    pub flops: u64,
}

pub struct Program {
    pub batch: usize,
    pub tier: Tier,
    pub launches: Vec<Launch>,
    /// Packed parameters, in the layouts the kernels read.
    pub params: Vec<Vec<f32>>,
    /// Peak activation memory, in elements.
    pub arena_len: usize,
    /// Arena offsets and full (batched) shapes of the inputs and the output.
    pub inputs: Vec<(usize, Vec<usize>)>,
    pub output: (usize, Vec<usize>),
}

impl Program {
    /// Bytes of packed parameters each launch reads (weights, biases, tables), in launch order: what a
    /// weight-streaming kernel (a linear layer at batch 1) must move per inference.
    pub fn param_bytes(&self) -> Vec<u64> {
        let bytes = |s: &Slot| match *s {
            Slot::Param(p) => 4 * self.params[p].len() as u64,
            Slot::Arena { .. } => 0,
        };
        self.launches.iter().map(|l| l.slots.iter().map(bytes).sum()).collect()
    }
}

/// Lowers a graph with bound parameters for `batch` samples.
pub fn program(graph: &Graph, bound: Bound, batch: usize, tier: Tier) -> Program {
    program_with(graph, bound, batch, Lowering::new(tier))
}

/// The choices a lowering makes beyond the graph: the GEMM tier, Winograd (tests and benchmarks
/// compare both forms), and how linear layers keep their weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lowering {
    pub tier: Tier,
    pub winograd: Winograd,
    pub fc_weights: WeightsDtype,
}

impl Lowering {
    /// The defaults for `tier`: Winograd where the cost model takes it, f32 weights.
    pub fn new(tier: Tier) -> Lowering {
        Lowering { tier, winograd: Winograd::Auto, fc_weights: WeightsDtype::F32 }
    }
}

/// [`program`] with every lowering choice made by the caller.
pub fn program_with(graph: &Graph, bound: Bound, batch: usize, Lowering { tier, winograd, fc_weights }: Lowering) -> Program {
    let tensors: HashMap<String, Tensor> = bound.params.into_iter().map(|(s, t)| (s.key, t)).collect();
    let order: Vec<NodeId> = graph.nodes().map(|(id, _)| id).collect();
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    // The last node reading each node's value (the output is read after the end).
    let mut last_read = vec![0usize; order.len()];
    for (i, &id) in order.iter().enumerate() {
        for a in graph.args(id) {
            last_read[pos[&a]] = last_read[pos[&a]].max(i);
        }
    }
    last_read[pos[&graph.output]] = usize::MAX;

    let mut t = Tables { tier, winograd, fc_weights, stores: vec![], params: vec![], launches: vec![] };
    let mut store_of: Vec<Ref> = Vec::with_capacity(order.len());
    let mut holders: HashMap<Ref, Vec<usize>> = HashMap::new();
    let mut inputs = vec![];
    for (i, &id) in order.iter().enumerate() {
        let node = graph.node(id);
        let len = batch * node.shape.iter().product::<usize>();
        let args: Vec<usize> = graph.args(id).iter().map(|a| pos[a]).collect();
        let out = match &node.kind {
            Kind::Input(_) => {
                let r = t.store(len);
                inputs.push((r, [vec![batch], node.shape.clone()].concat()));
                r
            }
            Kind::Op(Op::Reshape { .. } | Op::Dropout { .. }) => store_of[args[0]],
            Kind::Op(Op::Relu | Op::BatchNorm(_) | Op::Add) => {
                let first = store_of[args[0]];
                let free = !inputs.iter().any(|(r, _)| *r == first) && holders[&first].iter().all(|&v| last_read[v] <= i);
                if free {
                    first
                } else {
                    t.store(len)
                }
            }
            Kind::Op(_) => t.store(len),
        };
        store_of.push(out);
        holders.entry(out).or_default().push(i);
        if let Kind::Op(op) = &node.kind {
            let params = node.params.iter().map(|p| eval(p, &tensors)).collect();
            let shapes: Vec<&[usize]> = args.iter().map(|&a| graph.node(order[a]).shape.as_slice()).collect();
            let name = format!("n{}.{}", id.0.index(), node.layer.trim_start_matches("F.").trim_start_matches("L."));
            let ins = args.iter().zip(shapes).map(|(&a, s)| (store_of[a], s)).collect();
            ops::lower(&mut t, &Node { name: &name, op, batch, ins, out: (out, &node.shape), params });
        }
    }

    // Lifetimes in launch indices; inputs are live from the start, the output to the end.
    let n = t.launches.len();
    let mut life: Vec<(usize, usize)> = vec![(usize::MAX, 0); t.stores.len()];
    for (li, (_, refs, _)) in t.launches.iter().enumerate() {
        for r in refs {
            if let Ref::Store(s) = *r {
                life[s] = (life[s].0.min(li), life[s].1.max(li));
            }
        }
    }
    for (r, _) in &inputs {
        if let Ref::Store(s) = *r {
            life[s].0 = 0;
        }
    }
    let out_ref = store_of[pos[&graph.output]];
    if let Ref::Store(s) = out_ref {
        life[s] = (life[s].0.min(n), n);
    }
    let (offsets, arena_len) = plan(&t.stores, &life);
    let slot = |r: Ref| match r {
        Ref::Store(s) => Slot::Arena { offset: offsets[s], len: t.stores[s] },
        Ref::Param(p) => Slot::Param(p),
    };
    let offset = |r: Ref| match slot(r) {
        Slot::Arena { offset, .. } => offset,
        Slot::Param(_) => unreachable!("activations live in the arena"),
    };
    let launches = t
        .launches
        .iter()
        .map(|(k, refs, flops)| {
            let slots: Vec<Slot> = refs.iter().map(|&r| slot(r)).collect();
            assert_eq!(k.args().count(), slots.len(), "{}: one slot per argument buffer", k.name);
            for (b, s) in k.args().zip(&slots) {
                if let Slot::Arena { len, .. } = s {
                    assert!(b.len <= *len, "{}: buffer {} declares {} elements, its tensor has {len}", k.name, b.name, b.len);
                }
            }
            Launch { kernel: k.clone(), slots, flops: *flops }
        })
        .collect();
    let out_node = graph.node(graph.output);
    Program {
        batch,
        tier,
        launches,
        arena_len,
        inputs: inputs.iter().map(|(r, s)| (offset(*r), s.clone())).collect(),
        output: (offset(out_ref), [vec![batch], out_node.shape.clone()].concat()),
        params: t.params,
    }
}

/// Assigns arena offsets: largest tensors first, each at the lowest aligned offset that does not
/// overlap a placed tensor alive at the same time. Returns the offsets and the arena length.
fn plan(lens: &[usize], life: &[(usize, usize)]) -> (Vec<usize>, usize) {
    let mut order: Vec<usize> = (0..lens.len()).filter(|&s| life[s].0 <= life[s].1).collect();
    order.sort_by_key(|&s| (std::cmp::Reverse(lens[s]), s));
    let mut offsets = vec![0; lens.len()];
    let mut placed: Vec<usize> = vec![];
    let mut end = 0;
    for s in order {
        let mut busy: Vec<(usize, usize)> =
            placed.iter().filter(|&&q| life[q].0 <= life[s].1 && life[s].0 <= life[q].1).map(|&q| (offsets[q], offsets[q] + lens[q])).collect();
        busy.sort();
        let mut at = 0;
        for (a, b) in busy {
            if at + lens[s] <= a {
                break;
            }
            at = at.max(b.next_multiple_of(ALIGN));
        }
        offsets[s] = at;
        end = end.max(at + lens[s]);
        placed.push(s);
    }
    (offsets, end.next_multiple_of(ALIGN))
}

#[cfg(test)]
mod tests {
    use super::plan;

    #[test]
    fn disjoint_lifetimes_share_memory_and_overlapping_ones_do_not() {
        // a: launches 0-1, b: 1-2, c: 2-3. a and c can share; b overlaps both.
        let (off, len) = plan(&[100, 50, 100], &[(0, 1), (1, 2), (2, 3)]);
        assert_eq!(off[0], off[2]);
        assert!(off[1] >= 112 || off[1] + 50 <= off[0]);
        assert_eq!(len, 112 + 64);
        assert!(off.iter().all(|o| o % super::ALIGN == 0));
    }
}
