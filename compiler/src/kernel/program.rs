//! Graph → [`Program`]: kernels over one planned arena, for one batch size, built by the [`Pass`]es in
//! order: `alias` (reshape and dropout alias their input; ReLU, batch normalization and add write over
//! their first input when nothing reads it afterwards), `lower` (op → launches), `lifetimes` (a tensor
//! lives from the first launch that touches it to the last), `arena` (tensors whose lives do not overlap
//! share memory: greedy first fit, largest first, in a single `f32` arena), `slots`.
//! Invariant left: launches run in order; within a launch, buffers that share arena memory are never
//! both accessed (an in-place launch reads and writes each element by the same task).

use super::common::{Node, Ref, Tables};
use super::ops;
use super::{Kernel, Tier, WeightsDtype, Winograd};
use crate::ir::{Graph, Kind, NodeId};
use crate::lower::{eval, Tensors};
use crate::weights::Bound;
use cnnc_runtime::exec::Buffer;
pub use cnnc_runtime::exec::Slot;
use cnnc_runtime::Op;
use std::collections::HashMap;
use std::sync::Arc;

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
    /// The whole batch, which `replicas` copies of the launches run in equal shares, each over its own
    /// arena of `arena_len` elements (launches, stores and arena are those of one share).
    pub batch: usize,
    pub replicas: usize,
    pub tier: Tier,
    pub launches: Vec<Launch>,
    /// Packed parameters, in the layouts the kernels read.
    pub params: Vec<Arc<Buffer>>,
    /// Peak activation memory, in elements.
    pub arena_len: usize,
    /// Arena offsets and full (whole-batch) shapes of the inputs and the output.
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
/// compare both forms), how linear layers keep their weights, and how many replicas share the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lowering {
    pub tier: Tier,
    pub winograd: Winograd,
    pub fc_weights: WeightsDtype,
    /// The batch runs as this many replicas of the program, each over its own arena and its share of
    /// the samples (batch / replicas, which must divide it), on one thread each. Methods are chosen for
    /// the whole batch, so the bytes do not depend on the split.
    pub replicas: usize,
    /// GPU-shaped convolutions, linear layers and pooling ([`super::gpu`]) for the cuda backend.
    pub gpu: bool,
}

impl Lowering {
    /// The defaults for `tier`: Winograd where the cost model takes it, f32 weights, one replica.
    pub fn new(tier: Tier) -> Lowering {
        Lowering { tier, winograd: Winograd::Auto, fc_weights: WeightsDtype::F32, replicas: 1, gpu: false }
    }

    /// The cuda backend's: GPU-shaped kernels where there are some, the portable tier's elsewhere (code
    /// that does not depend on the host CPU), no Winograd.
    pub fn gpu() -> Lowering {
        Lowering { winograd: Winograd::Never, gpu: true, ..Lowering::new(Tier::Portable) }
    }
}

/// The passes that build a [`Program`], in the order they run; [`listing_after`] shows the program
/// as any of them leaves it (`cnnc compile --emit kernels --after PASS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Pass {
    /// Where each node's value lives: its own store, or its input's (`alias`).
    Alias,
    /// Op → launches over numbered stores and packed parameters (`lower`).
    Lower,
    /// Each store's first and last launch (`lifetimes`).
    Lifetimes,
    /// Arena offsets (`arena`).
    Arena,
    /// Stores resolved to arena slots: the finished [`Program`] (`slots`).
    Slots,
}

impl Pass {
    pub const ALL: [Pass; 5] = [Pass::Alias, Pass::Lower, Pass::Lifetimes, Pass::Arena, Pass::Slots];

    pub fn name(self) -> &'static str {
        ["alias", "lower", "lifetimes", "arena", "slots"][self as usize]
    }
}

/// [`program`] with every lowering choice made by the caller.
pub fn program_with(graph: &Graph, bound: Bound, batch: usize, lowering: Lowering) -> Program {
    program_each(graph, bound, batch, lowering, &mut |_| {})
}

/// [`program_with`], handing `each` every launch's kernel in launch order as lowering makes it (a
/// JIT compiles them meanwhile: kernels do not change after lowering).
pub fn program_each(graph: &Graph, bound: Bound, batch: usize, lowering: Lowering, each: &mut dyn FnMut(&Kernel)) -> Program {
    run(graph, bound, batch, lowering, Pass::Slots, each).program.expect("the last pass builds it")
}

/// The program as text after `pass` (after [`Pass::Slots`], [`super::listing`] of the finished program).
pub fn listing_after(graph: &Graph, bound: Bound, batch: usize, lowering: Lowering, pass: Pass) -> String {
    run(graph, bound, batch, lowering, pass, &mut |_| {}).dump(graph)
}

/// What the passes have built so far: each fills its fields.
struct Build {
    last: Pass,
    /// [`alias`]: per node in graph order, the node whose store holds its value.
    home: Vec<usize>,
    /// [`lower`]: stores, parameters and launches; the inputs' stores and full shapes; the output's store.
    t: Tables,
    inputs: Vec<(Ref, Vec<usize>)>,
    out: Ref,
    /// [`lifetimes`]: per store, its first and last launch (first > last: never touched).
    life: Vec<(usize, usize)>,
    /// [`arena`]: per store, its offset; the arena's length.
    offsets: Vec<usize>,
    arena_len: usize,
    program: Option<Program>,
}

/// Runs the passes up to `last`, in order.
fn run(graph: &Graph, bound: Bound, batch: usize, lowering: Lowering, last: Pass, each: &mut dyn FnMut(&Kernel)) -> Build {
    let Lowering { tier, winograd, fc_weights, replicas, gpu } = lowering;
    assert!(!gpu || replicas == 1, "a GPU runs the whole batch in one program");
    assert!(replicas >= 1 && batch.is_multiple_of(replicas), "{replicas} replicas do not share a batch of {batch}");
    let t = Tables { tier, winograd, fc_weights, gpu, batch, stores: vec![], params: vec![], launches: vec![], copies: vec![] };
    let mut b = Build { last, home: vec![], t, inputs: vec![], out: Ref::Store(0), life: vec![], offsets: vec![], arena_len: 0, program: None };
    let mut bound = Some(bound);
    for pass in Pass::ALL.into_iter().filter(|&p| p <= last) {
        match pass {
            Pass::Alias => b.home = alias(graph),
            Pass::Lower => lower(&mut b, graph, bound.take().expect("lowered once"), batch / replicas, each),
            Pass::Lifetimes => b.life = lifetimes(&b),
            Pass::Arena => (b.offsets, b.arena_len) = arena(&b.t.stores, &b.life),
            Pass::Slots => b.program = Some(slots(&mut b, graph, batch, replicas)),
        }
    }
    b
}

/// A node's kernels' name prefix: `n12.conv2`.
fn node_name(graph: &Graph, id: NodeId) -> String {
    format!("n{}.{}", id.0.index(), graph.node(id).layer.trim_start_matches("F.").trim_start_matches("L."))
}

/// Reshape and dropout alias their input; ReLU, batch normalization and add write over their (first)
/// input when no input, and no later node, reads what is stored there.
/// Invariant left: a node that shares a store with an earlier node is the last reader of every value
/// held there before it, so overwriting it loses nothing.
fn alias(graph: &Graph) -> Vec<usize> {
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
    // Per store (by home node), the last read of any value it has held.
    let (mut home, mut busy) = (Vec::with_capacity(order.len()), vec![0usize; order.len()]);
    for (i, &id) in order.iter().enumerate() {
        let first = graph.args(id).first().map(|a| home[pos[a]]);
        let h = match (&graph.node(id).kind, first) {
            (Kind::Op(Op::Reshape { .. } | Op::Dropout { .. }), Some(f)) => f,
            (Kind::Op(Op::Relu | Op::Clip { .. } | Op::BatchNorm(_) | Op::Add), Some(f))
                if busy[f] <= i && !matches!(graph.node(order[f]).kind, Kind::Input(_)) =>
            {
                f
            }
            _ => i,
        };
        busy[h] = busy[h].max(last_read[i]);
        home.push(h);
    }
    home
}

/// Lowers every op node in graph order ([`super::ops::lower`]), each writing its home's store, for
/// `batch` samples (one replica's share).
/// Invariant left: launches are in graph order; stores, parameters and launches are numbered in the
/// order lowering asked for them; every launch names one store or parameter per argument buffer.
fn lower(b: &mut Build, graph: &Graph, bound: Bound, batch: usize, each: &mut dyn FnMut(&Kernel)) {
    let mut tensors = Tensors::new(graph, bound);
    let order: Vec<NodeId> = graph.nodes().map(|(id, _)| id).collect();
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut store_of: Vec<Ref> = Vec::with_capacity(order.len());
    for (i, &id) in order.iter().enumerate() {
        let node = graph.node(id);
        let out = if b.home[i] == i { b.t.store(batch * node.shape.iter().product::<usize>()) } else { store_of[b.home[i]] };
        store_of.push(out);
        match &node.kind {
            Kind::Input(_) => b.inputs.push((out, [vec![batch], node.shape.clone()].concat())),
            Kind::Op(op) => {
                let params = node.params.iter().map(|p| eval(p, &mut tensors)).collect();
                let ins = graph.args(id).iter().map(|a| (store_of[pos[a]], graph.node(*a).shape.as_slice())).collect();
                let n = Node { name: &node_name(graph, id), op, batch, ins, out: (out, &node.shape), params };
                let before = b.t.launches.len();
                ops::lower(&mut b.t, &n);
                b.t.launches[before..].iter().for_each(|(k, ..)| each(k));
                // Packed now: their buffers serve the next folded weights.
                n.params.into_iter().for_each(|p| tensors.recycle(p));
            }
        }
    }
    b.out = store_of[pos[&graph.output]];
}

/// Lifetimes in launch indices: from the first launch touching a store to the last; inputs are live
/// from the start, the output to the end (launch count).
/// Invariant left: a store's value is needed exactly while its lifetime lasts.
fn lifetimes(b: &Build) -> Vec<(usize, usize)> {
    let n = b.t.launches.len();
    let mut life: Vec<(usize, usize)> = vec![(usize::MAX, 0); b.t.stores.len()];
    for (li, (_, refs, _)) in b.t.launches.iter().enumerate() {
        for r in refs {
            if let Ref::Store(s) = *r {
                life[s] = (life[s].0.min(li), life[s].1.max(li));
            }
        }
    }
    for (r, _) in &b.inputs {
        if let Ref::Store(s) = *r {
            life[s].0 = 0;
        }
    }
    if let Ref::Store(s) = b.out {
        life[s] = (life[s].0.min(n), n);
    }
    life
}

/// Resolves every launch's stores to arena slots and checks each buffer fits its tensor.
/// Invariant left: launches run in order; within a launch, buffers that share arena memory are never
/// both accessed (an in-place launch reads and writes each element by the same task).
fn slots(b: &mut Build, graph: &Graph, batch: usize, replicas: usize) -> Program {
    let slot = |r: Ref| match r {
        Ref::Store(s) => Slot::Arena { offset: b.offsets[s], len: b.t.stores[s] },
        Ref::Param(p) => Slot::Param(p),
    };
    let offset = |r: Ref| match slot(r) {
        Slot::Arena { offset, .. } => offset,
        Slot::Param(_) => unreachable!("activations live in the arena"),
    };
    let launches =
        b.t.launches
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
    Program {
        batch,
        replicas,
        tier: b.t.tier,
        launches,
        arena_len: b.arena_len,
        inputs: b.inputs.iter().map(|(r, s)| (offset(*r), [&[batch], &s[1..]].concat())).collect(),
        output: (offset(b.out), [vec![batch], graph.node(graph.output).shape.clone()].concat()),
        params: std::mem::take(&mut b.t.params),
    }
}

impl Build {
    /// The program as far as it is built: after [`alias`] the node → store map, then the stores (with
    /// lifetimes and offsets once known) and every launch with its stores and parameters.
    fn dump(&self, graph: &Graph) -> String {
        if let Some(p) = &self.program {
            return super::listing(p);
        }
        let mut out = format!("; after {}\n", self.last.name());
        if self.last == Pass::Alias {
            for (i, (id, _)) in graph.nodes().enumerate() {
                let home = graph.nodes().nth(self.home[i]).expect("a node").0;
                out += &format!("; {} -> {}\n", node_name(graph, id), if home == id { "own store".into() } else { node_name(graph, home) });
            }
            return out;
        }
        for (s, len) in self.t.stores.iter().enumerate() {
            out += &format!("; {:?}: {len} floats", Ref::Store(s));
            if let Some(&(first, last)) = self.life.get(s) {
                out += &if first <= last { format!(", launches {first}..={last}") } else { ", unused".into() };
            }
            if let Some(o) = self.offsets.get(s) {
                out += &format!(", arena[{o}..{}]", o + len);
            }
            out += "\n";
        }
        for (k, refs, _) in &self.t.launches {
            let refs: Vec<String> = refs.iter().map(|r| format!("{r:?}")).collect();
            out += &format!("\n; {} <- {}\n{k}", k.name, refs.join(", "));
        }
        out
    }
}

/// Assigns arena offsets: largest tensors first, each at the lowest aligned offset that does not
/// overlap a placed tensor alive at the same time. Returns the offsets and the arena length.
/// Invariant left: stores whose lifetimes overlap do not overlap in the arena; each is ALIGN-aligned.
fn arena(lens: &[usize], life: &[(usize, usize)]) -> (Vec<usize>, usize) {
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
    use super::arena;

    #[test]
    fn disjoint_lifetimes_share_memory_and_overlapping_ones_do_not() {
        // a: launches 0-1, b: 1-2, c: 2-3. a and c can share; b overlaps both.
        let (off, len) = arena(&[100, 50, 100], &[(0, 1), (1, 2), (2, 3)]);
        assert_eq!(off[0], off[2]);
        assert!(off[1] >= 112 || off[1] + 50 <= off[0]);
        assert_eq!(len, 112 + 64);
        assert!(off.iter().all(|o| o % super::ALIGN == 0));
    }
}
