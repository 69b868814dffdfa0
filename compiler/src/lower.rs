//! Lowering: a graph with bound parameters → the runtime's execution [`Plan`].
//!
//! Parameter terms left by the optimizer (BatchNormalization folded into weights, concatenated weights of
//! merged layers) are evaluated here, once, in f64 and rounded to f32 at the end; each distinct term is
//! computed once and shared. Each node becomes one step.
//! Invariant left: the plan's value shapes equal the graph's, so a plan never fails a shape check at run time.

use crate::ir::{Graph, Kind, Param};
use crate::weights::Bound;
use cnnc_runtime::plan::{ParamId, PlanBuilder, PlanError, ValueId};
use cnnc_runtime::{Plan, Tensor};
use std::collections::HashMap;

pub fn lower(graph: &Graph, bound: Bound) -> Result<Plan, PlanError> {
    let tensors: HashMap<String, Tensor> = bound.params.into_iter().map(|(s, t)| (s.key, t)).collect();
    let mut b = PlanBuilder::default();
    let mut params: HashMap<&Param, ParamId> = HashMap::new();
    let mut values: HashMap<crate::ir::NodeId, ValueId> = HashMap::new();
    for (id, n) in graph.nodes() {
        let v = match &n.kind {
            Kind::Input(_) => b.input(n.shape.clone()),
            Kind::Op(op) => {
                let ins = graph.args(id).iter().map(|a| values[a]).collect();
                let ps = n.params.iter().map(|p| *params.entry(p).or_insert_with(|| b.param(eval(p, &tensors)))).collect();
                b.step(op.clone(), ins, ps)?
            }
        };
        values.insert(id, v);
    }
    Ok(b.finish(values[&graph.output]))
}

/// Evaluates a parameter term over the bound tensors (every key was checked when binding).
pub fn eval(p: &Param, tensors: &HashMap<String, Tensor>) -> Tensor {
    let key = |k: String| tensors.get(&k).unwrap_or_else(|| panic!("`{k}` was bound")).data().to_vec();
    // BatchNormalization's per-channel scale γ/√(var + eps) and its statistics, in f64.
    let bn = |bn: &str, eps_bits: u64| {
        let (gamma, var) = (key(format!("{bn}/gamma")), key(format!("{bn}/avg_var")));
        let scale: Vec<f64> = gamma.iter().zip(&var).map(|(&g, &v)| g as f64 / (v as f64 + f64::from_bits(eps_bits)).sqrt()).collect();
        (scale, key(format!("{bn}/beta")), key(format!("{bn}/avg_mean")))
    };
    match p {
        Param::Key(k) => tensors[k].clone(),
        Param::FoldW { w, bn: name, eps_bits } => {
            let w = eval(w, tensors);
            let (scale, _, _) = bn(name, *eps_bits);
            let per_channel = w.data().len() / scale.len();
            let data = w.data().iter().enumerate().map(|(i, &v)| (v as f64 * scale[i / per_channel]) as f32).collect();
            Tensor::new(w.shape().to_vec(), data).expect("same shape")
        }
        Param::FoldB { b, bn: name, eps_bits } => {
            let (scale, beta, mean) = bn(name, *eps_bits);
            let b = b.as_ref().map(|b| eval(b, tensors).into_data()).unwrap_or_else(|| vec![0.0; scale.len()]);
            let data = (0..scale.len()).map(|c| ((b[c] as f64 - mean[c] as f64) * scale[c] + beta[c] as f64) as f32).collect();
            Tensor::new(vec![scale.len()], data).expect("one value per channel")
        }
        Param::Cat(parts) => {
            let parts: Vec<Tensor> = parts.iter().map(|q| eval(q, tensors)).collect();
            let mut shape = parts[0].shape().to_vec();
            shape[0] = parts.iter().map(|t| t.shape()[0]).sum();
            Tensor::new(shape, parts.into_iter().flat_map(Tensor::into_data).collect()).expect("same trailing dims")
        }
    }
}
