//! The layer-graph IR: a petgraph DAG of [`Node`]s, each one closed [`Op`] from the runtime's op set.
//!
//! Owns: graph construction from the AST with shape inference and diagnostics ([`build`]), and the
//! stable text forms ([`dump`]). Invariant left: every node's per-sample `shape` is inferred and valid for
//! its op; node indices are in topological (program) order; parameters are named by their Chainer key
//! (`conv1/W`, `bn1/avg_mean`); every node is live (reaches the output).

mod build;
mod dump;

pub use build::{build, BuildError};
pub use dump::{dot, dump, table};

use crate::diag::Span;
use cnnc_runtime::op::Dims;
use cnnc_runtime::Op;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use std::fmt;

/// A node of the graph, printed `%7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub NodeIndex<u32>);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0.index())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// The i-th argument of `forward`.
    Input(usize),
    Op(Op),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: Kind,
    /// Per-sample output shape (the batch axis is implicit).
    pub shape: Dims,
    /// The source expression that produced the node.
    pub span: Span,
    /// The link (`conv1`), function (`F.relu`) or input (`x`) the node came from.
    pub layer: String,
    /// The parameters, in [`Op::params`] order: Chainer keys, or (after optimization) terms over them.
    pub params: Vec<Param>,
    /// Where the link that owns `params` was declared.
    pub decl: Option<Span>,
    /// For a node the optimizer rewrote: the rules that produced it and its estimated cost change.
    pub provenance: Option<Provenance>,
}

/// A node parameter: a Chainer key, or a transform of others that the compiler evaluates once, when it
/// binds the weights (never per inference).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Param {
    Key(String),
    /// W·γ/√(var + eps), per output channel: BatchNormalization `bn` folded into the layer's weights.
    FoldW {
        w: Box<Param>,
        bn: String,
        eps_bits: u64,
    },
    /// (b − avg_mean)·γ/√(avg_var + eps) + β, with b = 0 for a layer without bias.
    FoldB {
        b: Option<Box<Param>>,
        bn: String,
        eps_bits: u64,
    },
    /// Concatenation along the first (output) axis: merged parallel layers.
    Cat(Vec<Param>),
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Param::Key(k) => write!(f, "{k}"),
            Param::FoldW { w, bn, .. } => write!(f, "fold_w({w}, {bn})"),
            Param::FoldB { b: Some(b), bn, .. } => write!(f, "fold_b({b}, {bn})"),
            Param::FoldB { b: None, bn, .. } => write!(f, "fold_b(0, {bn})"),
            Param::Cat(ps) => write!(f, "cat({})", ps.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")),
        }
    }
}

/// Why the optimizer produced a node.
#[derive(Clone, Debug, PartialEq)]
pub struct Provenance {
    /// Rule names, in the order they fired on the way to this node.
    pub rules: Vec<String>,
    /// Estimated cost of the original nodes it replaces, and of itself (cost-model units: ns per sample).
    pub cost_before: f64,
    pub cost_after: f64,
}

/// A parameter the graph needs: Chainer key, shape, and the declaration of its link.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub key: String,
    pub shape: Dims,
    pub decl: Option<Span>,
}

#[derive(Clone, Debug)]
pub struct Graph {
    pub name: String,
    /// Edge weight: the input slot of the consumer.
    pub g: DiGraph<Node, u32>,
    pub inputs: Vec<NodeId>,
    pub output: NodeId,
    /// The Chainer parameters the model reads (kept through optimization: weights bind against these).
    pub param_specs: Vec<ParamSpec>,
}

impl Graph {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.0]
    }

    /// All nodes in topological order.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.g.node_indices().map(|i| (NodeId(i), &self.g[i]))
    }

    /// The inputs of a node, in slot order.
    pub fn args(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<_> = self.g.edges_directed(id.0, petgraph::Incoming).map(|e| (*e.weight(), NodeId(e.source()))).collect();
        e.sort();
        e.into_iter().map(|(_, n)| n).collect()
    }

    /// The per-sample shapes of a node's inputs.
    pub fn arg_shapes(&self, id: NodeId) -> Vec<&[usize]> {
        self.args(id).into_iter().map(|a| self.node(a).shape.as_slice()).collect()
    }

    /// Multiply-accumulates per sample of one node.
    pub fn node_macs(&self, id: NodeId) -> u64 {
        match &self.node(id).kind {
            Kind::Op(op) => op.macs(&self.arg_shapes(id)),
            Kind::Input(_) => 0,
        }
    }

    /// Multiply-accumulates per sample.
    pub fn macs(&self) -> u64 {
        self.nodes().map(|(id, _)| self.node_macs(id)).sum()
    }

    /// Every Chainer parameter the model reads, once each, in first-use order.
    pub fn params(&self) -> Vec<ParamSpec> {
        self.param_specs.clone()
    }
}

/// The parameter specs of a freshly built graph, whose node parameters are all plain keys.
pub(crate) fn param_specs(g: &DiGraph<Node, u32>) -> Vec<ParamSpec> {
    let mut out: Vec<ParamSpec> = Vec::new();
    for n in g.node_weights() {
        if let Kind::Op(op) = &n.kind {
            for (param, (_, shape)) in n.params.iter().zip(op.params()) {
                if let Param::Key(key) = param {
                    if !out.iter().any(|p| &p.key == key) {
                        out.push(ParamSpec { key: key.clone(), shape, decl: n.decl });
                    }
                }
            }
        }
    }
    out
}
