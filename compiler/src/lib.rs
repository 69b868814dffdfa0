//! cnnc: a compiler for CNNs written the way Chainer users write them.
//!
//! Stages, one module each: [`syntax`] (text → AST), [`ir`] (AST → layer graph with shapes),
//! [`weights`] (Chainer `.npz` / safetensors → parameters bound to the graph), [`lower`] (graph → the
//! runtime's execution plan), [`input`] (images and `.npy` → input tensors), [`ptx`] (kernel IR → PTX for
//! NVIDIA GPUs, and the CUDA runtime that runs it). [`backend`] runs a graph with bound weights on any of
//! them. [`diag`] renders what any stage reports. [`compile`] runs the front end in one call.

pub mod backend;
pub mod diag;
pub mod input;
pub mod ir;
pub mod jit;
pub mod kernel;
pub mod lower;
pub mod onnx;
pub mod opt;
pub mod ptx;
pub mod syntax;
pub mod target;
pub mod weights;

use diag::{Diagnostic, Failed, FileId, Source};

/// The bundled default model (Chainer's AlexBN).
pub const ALEXBN: &str = include_str!("../../models/alexbn.model");

/// Chainer's built-in composite links (`L.Inception`, `L.InceptionBN`, `L.MLPConvolution2D`), written in
/// the model language and in scope in every model.
pub const PRELUDE: &str = include_str!("prelude.model");

/// Parses and builds a model. On success, returns the graph and any warnings.
pub fn compile(src: &Source) -> Result<(ir::Graph, Vec<Diagnostic>), Failed> {
    let to_diags = |errs: Vec<syntax::SyntaxError>| Failed(errs.iter().map(|e| e.diagnostic()).collect());
    let file = syntax::parse(&src.text, FileId::MODEL).map_err(to_diags)?;
    let prelude = syntax::parse(PRELUDE, FileId::PRELUDE).map_err(to_diags)?;
    ir::build(&[&file, &prelude]).map_err(Failed)
}
