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
    let mut tensors = Tensors::new(graph, bound);
    let mut b = PlanBuilder::default();
    let mut params: HashMap<&Param, ParamId> = HashMap::new();
    let mut values: HashMap<crate::ir::NodeId, ValueId> = HashMap::new();
    for (id, n) in graph.nodes() {
        let v = match &n.kind {
            Kind::Input(_) => b.input(n.shape.clone()),
            Kind::Op(op) => {
                let ins = graph.args(id).iter().map(|a| values[a]).collect();
                let ps = n.params.iter().map(|p| *params.entry(p).or_insert_with(|| b.param(eval(p, &mut tensors)))).collect();
                b.step(op.clone(), ins, ps)?
            }
        };
        values.insert(id, v);
    }
    Ok(b.finish(values[&graph.output]))
}

/// The bound tensors, each handed over by its last reader: a key no later term reads is moved, not
/// copied, so lowering holds each weight once (AlexBN's fc6 is 151 MB) and frees it once packed.
pub struct Tensors {
    map: HashMap<String, Tensor>,
    /// Reads left per key: an upper bound (the reference lowering evaluates a shared term once). A key
    /// without a count is copied at every read.
    left: HashMap<String, usize>,
    /// The largest buffer handed back ([`Tensors::recycle`]), for the next folded weights: memory
    /// the process has touched costs far less to fill than fresh pages, which the kernel clears first.
    spare: Vec<f32>,
    /// The most values any folded weights hold: a larger buffer is freed, not kept as the spare.
    largest_fold: usize,
}

impl Tensors {
    pub fn new(graph: &Graph, bound: Bound) -> Tensors {
        let mut left = HashMap::new();
        for (_, n) in graph.nodes() {
            n.params.iter().for_each(|p| reads(p, &mut |k| *left.entry(k).or_insert(0) += 1));
        }
        let map: HashMap<String, Tensor> = bound.params.into_iter().map(|(s, t)| (s.key, t)).collect();
        let mut largest_fold = 0;
        for p in graph.nodes().flat_map(|(_, n)| &n.params) {
            if let Param::FoldW { w, .. } = p {
                let mut n = 0;
                reads(w, &mut |k| n += map.get(&k).map_or(0, |t| t.data().len()));
                largest_fold = largest_fold.max(n);
            }
        }
        Tensors { map, left, spare: vec![], largest_fold }
    }

    /// Takes back a tensor whose values were used up (packed), keeping its buffer if it is the largest
    /// that folded weights can use.
    pub fn recycle(&mut self, t: Tensor) {
        match t.into_owned() {
            Some(v) if v.capacity() > self.spare.capacity() && v.capacity() <= self.largest_fold => self.spare = v,
            _ => {}
        }
    }

    /// `n` zeros in the spare buffer, or in a new one.
    fn spare(&mut self, n: usize) -> Vec<f32> {
        let mut v = std::mem::take(&mut self.spare);
        v.clear();
        v.resize(n, 0.0);
        v
    }

    fn take(&mut self, k: String) -> Tensor {
        let last = self.left.get_mut(&k).is_some_and(|left| {
            *left -= 1;
            *left == 0
        });
        let t = if last { self.map.remove(&k) } else { self.map.get(&k).cloned() };
        t.unwrap_or_else(|| panic!("`{k}` was bound"))
    }
}

/// Tensors by key, each copied at every read.
impl From<HashMap<String, Tensor>> for Tensors {
    fn from(map: HashMap<String, Tensor>) -> Tensors {
        Tensors { map, left: HashMap::new(), spare: vec![], largest_fold: 0 }
    }
}

/// The four statistics of BatchNormalization `bn`; FoldW reads the first two, FoldB all four.
fn bn_keys(bn: &str) -> [String; 4] {
    ["gamma", "avg_var", "beta", "avg_mean"].map(|s| format!("{bn}/{s}"))
}

/// Every key [`eval`] reads for `p`, once per read.
fn reads(p: &Param, f: &mut impl FnMut(String)) {
    match p {
        Param::Key(k) => f(k.clone()),
        Param::FoldW { w, bn, .. } => {
            reads(w, f);
            bn_keys(bn).into_iter().take(2).for_each(f);
        }
        Param::FoldB { b, bn, .. } => {
            b.iter().for_each(|b| reads(b, f));
            bn_keys(bn).into_iter().for_each(f);
        }
        Param::Cat(parts) => parts.iter().for_each(|q| reads(q, f)),
    }
}

/// Evaluates a parameter term over the bound tensors (every key was checked when binding).
pub fn eval(p: &Param, t: &mut Tensors) -> Tensor {
    // BatchNormalization's per-channel scale γ/√(var + eps) and, for FoldB, β and the mean, in f64.
    let mut bn = |bn: &str, eps_bits: u64, all: bool| {
        let [gamma, var, beta, mean] = bn_keys(bn);
        let (gamma, var) = (t.take(gamma), t.take(var));
        let scale: Vec<f64> = gamma.data().iter().zip(var.data()).map(|(&g, &v)| g as f64 / (v as f64 + f64::from_bits(eps_bits)).sqrt()).collect();
        let rest = all.then(|| (t.take(beta).into_data(), t.take(mean).into_data()));
        (scale, rest)
    };
    match p {
        Param::Key(k) => t.take(k.clone()),
        Param::FoldW { w, bn: name, eps_bits } => {
            let (scale, _) = bn(name, *eps_bits, false);
            // Into the spare buffer: the weights may be the file's own pages (memory-mapped).
            let w = eval(w, t);
            let mut folded = t.spare(w.data().len());
            let per_channel = w.data().len() / scale.len();
            let ws = w.data();
            cnnc_runtime::par::chunks_mut(&mut folded, per_channel, |c, f| {
                f.iter_mut().zip(&ws[c * per_channel..]).for_each(|(f, &v)| *f = (v as f64 * scale[c]) as f32)
            });
            let shape = w.shape().to_vec();
            t.recycle(w);
            Tensor::new(shape, folded).expect("the shape of the weights")
        }
        Param::FoldB { b, bn: name, eps_bits } => {
            let (scale, rest) = bn(name, *eps_bits, true);
            let (beta, mean) = rest.expect("asked for all four");
            let b = b.as_ref().map(|b| eval(b, t).into_data()).unwrap_or_else(|| vec![0.0; scale.len()]);
            let data = (0..scale.len()).map(|c| ((b[c] as f64 - mean[c] as f64) * scale[c] + beta[c] as f64) as f32).collect();
            Tensor::new(vec![scale.len()], data).expect("one value per channel")
        }
        Param::Cat(parts) => {
            let parts: Vec<Tensor> = parts.iter().map(|q| eval(q, t)).collect();
            let mut shape = parts[0].shape().to_vec();
            shape[0] = parts.iter().map(|t| t.shape()[0]).sum();
            Tensor::new(shape, parts.into_iter().flat_map(Tensor::into_data).collect()).expect("same trailing dims")
        }
    }
}
