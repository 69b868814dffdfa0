//! The e-graph language of layer graphs, its shape analysis and the per-backend cost model.

use cnnc_runtime::op::{Dims, Fused, FusedBase};
use cnnc_runtime::Op;
use egg::{Analysis, DidMerge, EGraph, Id, Language, Symbol};
use std::collections::HashMap;
use std::fmt;

/// An e-node. A tensor op is `(name attr inputs… params…)`: its IR name ([`Op::name`], so rules read like
/// the IR dump), its attributes as a leaf, its activations, then its parameter terms; a convolution or
/// linear layer always has a bias child, `nobias` when it has none. A fused layer is named by its
/// composition (`conv2d+relu+max_pool2d`) and keeps its parts' attributes as leaves, so a rule's right
/// side builds it from what it matched. Parameter terms (`param`, `fold-w`, `fold-b`, `cat`) are
/// evaluated at compile time; `input` and `param` hold a [`Cnn::Key`].
/// Invariant: the language knows no op by name — a new [`Op`] needs no change here.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cnn {
    Node(Symbol, Box<[Id]>),
    Attr(Attr),
    Key(Symbol),
}

/// An op's attributes as an e-graph leaf. Rules bind attributes to variables and never spell them, so
/// nothing parses an attribute back from text.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attr(pub Op);

impl Cnn {
    pub fn node(name: &str, children: &[Id]) -> Cnn {
        Cnn::Node(Symbol::from(name), children.into())
    }
    /// The node's name, if it is one (`conv2d`, `fold-w`, ...).
    pub fn name(&self) -> Option<&str> {
        let Cnn::Node(s, _) = self else { return None };
        Some(s.as_str())
    }
}

impl Language for Cnn {
    type Discriminant = (u8, Option<Symbol>);

    fn discriminant(&self) -> Self::Discriminant {
        match self {
            Cnn::Node(s, _) => (0, Some(*s)),
            Cnn::Attr(_) => (1, None),
            Cnn::Key(_) => (2, None),
        }
    }
    fn matches(&self, other: &Self) -> bool {
        match (self, other) {
            (Cnn::Node(a, x), Cnn::Node(b, y)) => a == b && x.len() == y.len(),
            _ => self == other,
        }
    }
    fn children(&self) -> &[Id] {
        let Cnn::Node(_, c) = self else { return &[] };
        c
    }
    fn children_mut(&mut self) -> &mut [Id] {
        let Cnn::Node(_, c) = self else { return &mut [] };
        c
    }
}

impl fmt::Display for Cnn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cnn::Node(s, _) | Cnn::Key(s) => write!(f, "{s}"),
            Cnn::Attr(a) => write!(f, "{}", a.0),
        }
    }
}

/// Rule text names nodes only: every operator in a pattern is a [`Cnn::Node`].
impl egg::FromOp for Cnn {
    type Error = std::convert::Infallible;
    fn from_op(op: &str, children: Vec<Id>) -> Result<Self, Self::Error> {
        Ok(Cnn::Node(Symbol::from(op), children.into()))
    }
}

/// The op of an e-class's attribute leaf.
pub fn attr(eg: &EGraph<Cnn, Shapes>, id: Id) -> Option<Op> {
    eg[id].nodes.iter().find_map(|n| if let Cnn::Attr(a) = n { Some(a.0.clone()) } else { None })
}

/// Whether an e-class is the `nobias` leaf.
pub fn is_nobias(eg: &EGraph<Cnn, Shapes>, id: Id) -> bool {
    eg[id].nodes.iter().any(|n| n.name() == Some("nobias"))
}

/// The runtime op an e-node computes, with the e-classes of its tensor inputs and of its parameters;
/// `None` for leaves and parameter terms.
pub fn op_of(eg: &EGraph<Cnn, Shapes>, node: &Cnn) -> Option<(Op, Vec<Id>, Vec<Id>)> {
    let Cnn::Node(name, children) = node else { return None };
    let (mut op, mut rest) = (attr(eg, *children.first()?)?, &children[1..]);
    // `conv2d+relu+max_pool2d`: the base layer's attributes, then the pool's.
    if let Some(parts) = name.as_str().strip_prefix(op.name()).filter(|p| !p.is_empty()) {
        let (add, relu, pool) = match parts {
            "+relu" => (false, true, None),
            "+add" => (true, false, None),
            "+add+relu" => (true, true, None),
            "+relu+max_pool2d" => {
                let Some(Op::MaxPool2d(p)) = attr(eg, *rest.first()?) else { return None };
                rest = &rest[1..];
                (false, true, Some(p))
            }
            _ => return None,
        };
        op = Op::Fused(Fused { base: FusedBase::of(op)?, add, relu, pool });
    }
    // A parameter term over an attribute (`fold-w` reads a BatchNormalization's) is not that op.
    if op.name() != name.as_str() {
        return None;
    }
    let (ins, params) = rest.split_at(op.arity().unwrap_or(rest.len()).min(rest.len()));
    // The bias-ness of a layer is its bias child's: folding BatchNormalization gives a nobias layer a bias.
    let params: Vec<Id> = params.iter().copied().filter(|&p| !is_nobias(eg, p)).collect();
    if let Some(bias) = op.bias_mut() {
        *bias = params.len() == 2;
    }
    Some((op, ins.to_vec(), params))
}

/// Shapes of e-classes: per-sample dims of tensors, full dims of parameter terms, `None` for leaves.
#[derive(Default)]
pub struct Shapes {
    pub inputs: HashMap<Symbol, Dims>,
    pub params: HashMap<Symbol, Dims>,
}

impl Analysis<Cnn> for Shapes {
    type Data = Option<Dims>;

    fn make(eg: &mut EGraph<Cnn, Self>, node: &Cnn, _: Id) -> Self::Data {
        let dims = |id: &Id| eg[*id].data.clone();
        match (node.name()?, node.children()) {
            (table @ ("input" | "param"), [k]) => {
                let key = eg[*k].nodes.iter().find_map(|n| if let Cnn::Key(s) = n { Some(*s) } else { None })?;
                if table == "input" { &eg.analysis.inputs } else { &eg.analysis.params }.get(&key).cloned()
            }
            ("fold-w", [_, w, ..]) => dims(w),
            ("fold-b", [_, _, g, ..]) => dims(g),
            ("cat", [a, b]) => {
                let (mut a, b) = (dims(a)?, dims(b)?);
                a[0] += b[0];
                Some(a)
            }
            _ => {
                let (op, ins, _) = op_of(eg, node)?;
                let shapes: Vec<Dims> = ins.iter().map(dims).collect::<Option<_>>()?;
                op.output_shape(&shapes.iter().map(Vec::as_slice).collect::<Vec<_>>()).ok()
            }
        }
    }

    fn merge(&mut self, a: &mut Self::Data, b: Self::Data) -> DidMerge {
        debug_assert!(a.is_none() || b.is_none() || *a == b, "equal e-classes have equal shapes: {a:?} vs {b:?}");
        if a.is_none() && b.is_some() {
            *a = b;
            return DidMerge(true, false);
        }
        DidMerge(false, a.is_some() && b.is_none())
    }
}

/// What a backend charges for one kernel, in ns per sample. The constants are round numbers for the
/// machines cnnc targets; only their ratios matter to extraction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostModel {
    pub name: &'static str,
    /// Fixed cost of a kernel: a thread-pool fork/join on CPU (≈ 2 µs), a launch on a GPU (≈ 5 µs).
    pub launch: f64,
    /// Memory traffic: ≈ 20 GB/s per socket on the 2-core CPU, ≈ 3 TB/s of HBM on an H100.
    pub per_byte: f64,
    /// Arithmetic: ≈ 100 GMAC/s on 2 AVX-512 cores, ≈ 25 TMAC/s of fp32 FMA on an H100.
    pub per_mac: f64,
}

pub const CPU: CostModel = CostModel { name: "cpu", launch: 2_000.0, per_byte: 0.05, per_mac: 0.01 };
pub const CUDA: CostModel = CostModel { name: "cuda", launch: 5_000.0, per_byte: 0.000_33, per_mac: 0.000_04 };

impl CostModel {
    /// The cost of one kernel computing `op` on inputs of these per-sample shapes.
    pub fn kernel(&self, op: &Op, inputs: &[&[usize]]) -> f64 {
        // Views cost nothing: a reshape keeps the data, a channel slice is an offset (batch 1) or a stride.
        if matches!(op, Op::Reshape { .. } | Op::Slice { .. }) {
            return 0.0;
        }
        let numel = |d: &[usize]| d.iter().product::<usize>() as f64;
        let out = op.output_shape(inputs).map_or(0.0, |o| numel(&o));
        let weights: f64 = op.params().iter().map(|(_, d)| numel(d)).sum();
        let bytes = 4.0 * (inputs.iter().map(|d| numel(d)).sum::<f64>() + out + weights);
        self.launch + bytes * self.per_byte + op.macs(inputs) as f64 * self.per_mac
    }
}

/// Extraction cost: kernels by the cost model; parameter terms are evaluated once at compile time, so
/// they cost almost nothing (a little, so that no transform is chosen without a reason).
pub struct Cost<'a> {
    pub egraph: &'a EGraph<Cnn, Shapes>,
    pub model: CostModel,
}

impl egg::CostFunction<Cnn> for Cost<'_> {
    type Cost = f64;

    fn cost<C: FnMut(Id) -> f64>(&mut self, node: &Cnn, mut costs: C) -> f64 {
        let own = match op_of(self.egraph, node) {
            Some((op, ins, _)) => {
                let shapes: Option<Vec<Dims>> = ins.iter().map(|i| self.egraph[*i].data.clone()).collect();
                shapes.map_or(f64::INFINITY, |s| self.model.kernel(&op, &s.iter().map(Vec::as_slice).collect::<Vec<_>>()))
            }
            None if matches!(node.name(), Some("fold-w" | "fold-b" | "cat")) => 1e-3,
            None => 0.0,
        };
        node.fold(own, |sum, id| sum + costs(id))
    }
}
