//! The layer-graph IR: a petgraph DAG of [`Node`]s, each one closed [`Op`] from the runtime's op set.
//!
//! Owns: graph construction from the AST with shape inference and diagnostics ([`build`]), and the
//! stable text forms ([`dump`]). Invariant left: every node's per-sample `shape` is inferred and valid for
//! its op; node indices are in topological (program) order; parameters are named by their Chainer key
//! (`conv1/W`, `bn1/avg_mean`); every node is live (reaches the output).

mod build;
mod dump;

pub use build::{build, BuildError};
pub use dump::{dump, table};

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
    /// Chainer keys of the parameters, in [`Op::params`] order.
    pub params: Vec<String>,
    /// Where the link that owns `params` was declared.
    pub decl: Option<Span>,
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

    /// Multiply-accumulates per sample.
    pub fn macs(&self) -> u64 {
        self.nodes().map(|(_, n)| if let Kind::Op(op) = &n.kind { op.macs(&n.shape) } else { 0 }).sum()
    }

    /// Every parameter the graph reads, once each, in first-use order.
    pub fn params(&self) -> Vec<ParamSpec> {
        let mut out: Vec<ParamSpec> = Vec::new();
        for (_, n) in self.nodes() {
            if let Kind::Op(op) = &n.kind {
                for (key, (_, shape)) in n.params.iter().zip(op.params()) {
                    if !out.iter().any(|p| &p.key == key) {
                        out.push(ParamSpec { key: key.clone(), shape, decl: n.decl });
                    }
                }
            }
        }
        out
    }
}
