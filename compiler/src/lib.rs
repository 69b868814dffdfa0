//! cnnc: a compiler for CNNs written the way Chainer users write them.
//!
//! Stages, one module each: [`syntax`] (text → AST), [`ir`] (AST → layer graph with shapes),
//! [`weights`] (Chainer `.npz` / safetensors → parameters bound to the graph), [`lower`] (graph → the
//! runtime's execution plan), [`input`] (images and `.npy` → input tensors). [`diag`] renders what any
//! stage reports. [`compile`] runs the front end in one call.

pub mod diag;
pub mod input;
pub mod ir;
pub mod lower;
pub mod syntax;
pub mod weights;

use diag::{Diagnostic, Failed, Source};

/// The bundled default model (Chainer's AlexBN).
pub const ALEXBN: &str = include_str!("../../models/alexbn.model");

/// Parses and builds a model. On success, returns the graph and any warnings.
pub fn compile(src: &Source) -> Result<(ir::Graph, Vec<Diagnostic>), Failed> {
    let file = syntax::parse(&src.text).map_err(|errs| Failed(errs.iter().map(|e| e.diagnostic()).collect()))?;
    ir::build(&file).map_err(Failed)
}
