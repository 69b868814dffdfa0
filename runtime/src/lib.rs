//! cnnc's minimal runtime.
//!
//! It owns the closed op set ([`op::Op`]: attributes, shape rules, parameter layouts, MAC counts), the
//! reference interpreter that defines every op's meaning ([`reference`]), and execution plans
//! ([`plan::Plan`]) that the compiler lowers a model to. It knows nothing of model files or weights files.

pub mod exec;
pub mod op;
pub mod par;
pub mod plan;
pub mod reference;
pub mod rng;
mod tensor;

pub use op::Op;
pub use plan::{Plan, PlanBuilder};
pub use tensor::{Backing, ShapeMismatch, Shared, Tensor};
