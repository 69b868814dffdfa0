//! Lowering: a graph with bound parameters → the runtime's execution [`Plan`].
//!
//! Each parameter is bound once (links called twice share it); each node becomes one step.
//! Invariant left: the plan's value shapes equal the graph's, so a plan never fails a shape check at run time.

use crate::ir::{Graph, Kind};
use crate::weights::Bound;
use cnnc_runtime::plan::{ParamId, PlanBuilder, PlanError, ValueId};
use cnnc_runtime::Plan;
use std::collections::HashMap;

pub fn lower(graph: &Graph, bound: Bound) -> Result<Plan, PlanError> {
    let mut b = PlanBuilder::default();
    let mut params: HashMap<String, ParamId> = HashMap::new();
    for (spec, t) in bound.params {
        params.insert(spec.key, b.param(t));
    }
    let mut values: HashMap<crate::ir::NodeId, ValueId> = HashMap::new();
    for (id, n) in graph.nodes() {
        let v = match &n.kind {
            Kind::Input(_) => b.input(n.shape.clone()),
            Kind::Op(op) => {
                let ins = graph.args(id).iter().map(|a| values[a]).collect();
                let ps = n.params.iter().map(|k| params[k]).collect();
                b.step(op.clone(), ins, ps)?
            }
        };
        values.insert(id, v);
    }
    Ok(b.finish(values[&graph.output]))
}
