//! Execution plans: a straight-line list of kernel steps over numbered values.
//!
//! A [`Plan`] is what the compiler hands the runtime. It owns the parameters (bound once, at build time),
//! knows every value's per-sample shape, and frees each intermediate after its last use. Steps run the
//! reference kernels today; faster kernels slot in per step without changing the plan's shape.
//! Invariant left by [`PlanBuilder`]: every step's input and parameter shapes were checked against its op.

use crate::op::{Batched, Dims, Op, ShapeError};
use crate::{reference, Tensor};

/// Index of a value (an activation tensor) in a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

/// Index of a bound parameter tensor in a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub u32);

#[derive(Clone, Debug)]
pub struct Step {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub params: Vec<ParamId>,
    pub output: ValueId,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("step {step} ({op}): {source}")]
    Shape { step: usize, op: String, source: ShapeError },
    #[error("step {step} ({op}): parameter `{name}` should be {expected:?}, got {got:?}")]
    Param { step: usize, op: String, name: &'static str, expected: Dims, got: Vec<usize> },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RunError {
    #[error("the model takes {expected} input(s), got {got}")]
    InputCount { expected: usize, got: usize },
    #[error("input {index} has shape {got:?}, but the model expects {}", Batched(expected))]
    InputShape { index: usize, expected: Dims, got: Vec<usize> },
    #[error("inputs have different batch sizes ({0} and {1})")]
    MixedBatch(usize, usize),
}

#[derive(Default)]
pub struct PlanBuilder {
    values: Vec<Dims>,
    params: Vec<Tensor>,
    steps: Vec<Step>,
    inputs: Vec<ValueId>,
}

impl PlanBuilder {
    pub fn input(&mut self, dims: Dims) -> ValueId {
        let id = self.value(dims);
        self.inputs.push(id);
        id
    }

    pub fn param(&mut self, t: Tensor) -> ParamId {
        self.params.push(t);
        ParamId(self.params.len() as u32 - 1)
    }

    /// Appends a step, checking its input and parameter shapes.
    pub fn step(&mut self, op: Op, inputs: Vec<ValueId>, params: Vec<ParamId>) -> Result<ValueId, PlanError> {
        let step = self.steps.len();
        let shapes: Vec<&[usize]> = inputs.iter().map(|v| self.values[v.0 as usize].as_slice()).collect();
        let out = op.output_shape(&shapes).map_err(|source| PlanError::Shape { step, op: op.to_string(), source })?;
        for ((name, expected), p) in op.params().into_iter().zip(&params) {
            let got = self.params[p.0 as usize].shape();
            if got != expected.as_slice() {
                return Err(PlanError::Param { step, op: op.to_string(), name, expected, got: got.to_vec() });
            }
        }
        let output = self.value(out);
        self.steps.push(Step { op, inputs, params, output });
        Ok(output)
    }

    pub fn finish(self, output: ValueId) -> Plan {
        let mut last_use = vec![usize::MAX; self.values.len()];
        for (i, v) in self.steps.iter().enumerate().flat_map(|(i, s)| s.inputs.iter().map(move |v| (i, v))) {
            last_use[v.0 as usize] = i;
        }
        last_use[output.0 as usize] = usize::MAX;
        Plan { values: self.values, params: self.params, steps: self.steps, inputs: self.inputs, output, last_use }
    }

    fn value(&mut self, dims: Dims) -> ValueId {
        self.values.push(dims);
        ValueId(self.values.len() as u32 - 1)
    }
}

pub struct Plan {
    values: Vec<Dims>,
    params: Vec<Tensor>,
    steps: Vec<Step>,
    inputs: Vec<ValueId>,
    output: ValueId,
    /// Index of the last step reading each value (`usize::MAX`: kept to the end).
    last_use: Vec<usize>,
}

impl Plan {
    /// Runs the plan on batched inputs with the reference kernels.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Tensor, RunError> {
        if inputs.len() != self.inputs.len() {
            return Err(RunError::InputCount { expected: self.inputs.len(), got: inputs.len() });
        }
        let mut slots: Vec<Option<Tensor>> = vec![None; self.values.len()];
        for (index, (id, t)) in self.inputs.iter().zip(inputs).enumerate() {
            let expected = &self.values[id.0 as usize];
            if t.shape().len() != expected.len() + 1 || &t.shape()[1..] != expected.as_slice() || t.batch() == 0 {
                return Err(RunError::InputShape { index, expected: expected.clone(), got: t.shape().to_vec() });
            }
            if let Some(first) = slots.iter().flatten().next().filter(|first| first.batch() != t.batch()) {
                return Err(RunError::MixedBatch(first.batch(), t.batch()));
            }
            slots[id.0 as usize] = Some(t);
        }
        for (i, step) in self.steps.iter().enumerate() {
            let ins: Vec<&Tensor> = step.inputs.iter().map(|v| slots[v.0 as usize].as_ref().expect("defined before use")).collect();
            let ps: Vec<&Tensor> = step.params.iter().map(|p| &self.params[p.0 as usize]).collect();
            let y = reference::eval(&step.op, &ins, &ps);
            for v in step.inputs.iter().filter(|v| self.last_use[v.0 as usize] == i) {
                slots[v.0 as usize] = None;
            }
            slots[step.output.0 as usize] = Some(y);
        }
        Ok(slots[self.output.0 as usize].take().expect("output computed"))
    }
}
