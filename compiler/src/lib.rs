//! cnnc: a compiler for CNNs written the way Chainer users write them.
//!
//! Stages, one module each: [`syntax`] (text → AST), [`ir`] (AST → layer graph with shapes),
//! [`weights`] (Chainer `.npz` / safetensors → parameters bound to the graph), [`lower`] (graph → the
//! runtime's execution plan), [`input`] (images and `.npy` → input tensors), [`ptx`] (kernel IR → PTX for
//! NVIDIA GPUs, and the CUDA runtime that runs it). [`backend`] runs a graph with bound weights on any of
//! them. [`diag`] renders what any stage reports. [`compile`] runs the front end in one call; [`load`] reads
//! a model from wherever it is and [`Loaded::bind`] its weights, the steps the CLI and the Python package
//! share; [`top`] turns a classifier's outputs into ranked classes.

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
pub mod top;
pub mod weights;

use diag::{Diagnostic, Failed, FileId, Source};
use std::path::Path;
use weights::Weights;

/// The bundled default model (Chainer's AlexBN).
pub const ALEXBN: &str = include_str!("../../models/alexbn.model");

/// Chainer's built-in composite links (`L.Inception`, `L.InceptionBN`, `L.MLPConvolution2D`), written in
/// the model language and in scope in every model.
pub const PRELUDE: &str = include_str!("prelude.model");

/// Most diagnostics one compilation reports. A file of garbage would otherwise report (and render) one
/// per token; the rest are counted in a last note.
pub const MAX_DIAGNOSTICS: usize = 100;

/// The largest model file read: the biggest real model text (an imported ResNet-50) is under 100 KB, so
/// anything this size is not a model, and reading it whole would only postpone the error.
pub const MAX_MODEL_TEXT: u64 = 16 << 20;

fn capped(diags: Vec<Diagnostic>) -> Vec<Diagnostic> {
    // Notes about the whole file (the parser stopped) are kept, after the rest.
    let (notes, mut diags): (Vec<_>, Vec<_>) = diags.into_iter().partition(|d| d.level == diag::Level::Note);
    if diags.len() > MAX_DIAGNOSTICS {
        // Errors first (stable: each kind keeps its order), so the summary's count is never zero.
        diags.sort_by_key(|d| !d.is_error());
        let rest = diags.len() - MAX_DIAGNOSTICS;
        diags.truncate(MAX_DIAGNOSTICS);
        diags.push(Diagnostic::note_level(format!(
            "{rest} more diagnostic{} not shown: cnnc reports the first {MAX_DIAGNOSTICS}",
            if rest == 1 { "" } else { "s" }
        )));
    }
    diags.extend(notes);
    diags
}

/// Parses and builds a model. On success, returns the graph and any warnings.
pub fn compile(src: &Source) -> Result<(ir::Graph, Vec<Diagnostic>), Failed> {
    let to_diags = |errs: Vec<syntax::SyntaxError>| Failed(capped(errs.iter().map(|e| e.diagnostic()).collect()));
    let file = syntax::parse(&src.text, FileId::MODEL).map_err(to_diags)?;
    let prelude = syntax::parse(PRELUDE, FileId::PRELUDE).map_err(to_diags)?;
    let (g, warnings) = ir::build(&[&file, &prelude]).map_err(|d| Failed(capped(d)))?;
    match too_many_parameters(&g) {
        Some(d) => Err(Failed(vec![d])),
        None => Ok((g, capped(warnings))),
    }
}

/// A model whose parameters would not fit in memory twice (a `Linear` of 2^40 weights): refused here,
/// before any stage allocates them.
fn too_many_parameters(g: &ir::Graph) -> Option<Diagnostic> {
    let limit = weights::memory_limit()?;
    let params = g.params();
    let bytes = |p: &ir::ParamSpec| p.shape.iter().try_fold(4u64, |a, &d| a.checked_mul(d as u64)).unwrap_or(u64::MAX);
    let total = params.iter().fold(0u64, |a, p| a.saturating_add(bytes(p)));
    // Twice: the weights as read and their packed copy live together while a model is bound.
    if total.saturating_mul(2) <= limit {
        return None;
    }
    let largest = params.iter().max_by_key(|p| bytes(p))?;
    let d = Diagnostic::error(format!(
        "the model's parameters need {:.1} GiB, held twice while they are read and packed: more than cnnc's limit of {:.1} GiB (80 % of this machine's memory)",
        weights::gib(total),
        weights::gib(limit)
    ));
    let note = format!("the largest is `{}`, of shape {:?}", largest.key, largest.shape);
    Some(match largest.decl {
        Some(decl) => d.label(decl, "the largest parameter").note(note),
        None => d.note(note),
    })
}

/// Where text stops being UTF-8, as the user's editor counts it (line, column in characters).
fn not_utf8(bytes: &[u8], e: std::str::Utf8Error) -> String {
    let valid = std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default();
    let line = valid.rsplit('\n').next().unwrap_or_default();
    let byte = bytes.get(e.valid_up_to()).copied().unwrap_or_default();
    format!("it is not UTF-8 text: byte {byte:#04x} at line {}, column {}", valid.matches('\n').count() + 1, line.chars().count() + 1)
}

/// Where a model comes from.
pub enum ModelSource<'a> {
    /// The bundled AlexBN.
    Bundled,
    /// A `.model` file, or an `.onnx` file (imported first).
    File(&'a Path),
    /// Model text, with the name diagnostics give it.
    Text { name: String, text: String },
}

/// A model read and compiled: its source (diagnostics point into it), its graph, its warnings, and for an
/// ONNX file the weights it carries and the importer's notes.
pub struct Loaded {
    pub src: Source,
    pub graph: ir::Graph,
    pub warnings: Vec<Diagnostic>,
    pub imported: Option<Weights>,
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read model `{path}`")]
    Io { path: String, source: std::io::Error },
    #[error(transparent)]
    Onnx(#[from] onnx::OnnxError),
    #[error("could not compile `{}` ({n} error{})", .src.name, if *.n == 1 { "" } else { "s" })]
    Compile { src: Box<Source>, diags: Vec<Diagnostic>, n: usize },
    #[error(transparent)]
    Weights(#[from] weights::WeightError),
    #[error("the weights do not fit `{}` ({n} error{})", .src.name, if *.n == 1 { "" } else { "s" })]
    Bind { src: Box<Source>, diags: Vec<Diagnostic>, n: usize },
}

impl LoadError {
    /// The diagnostics behind a compile or binding failure, with the source they point into.
    pub fn diagnostics(&self) -> Option<(&Source, &[Diagnostic])> {
        match self {
            LoadError::Compile { src, diags, .. } | LoadError::Bind { src, diags, .. } => Some((src, diags)),
            _ => None,
        }
    }

    /// The whole message as plain text: the rendered diagnostics (if any), then the summary.
    pub fn render_plain(&self) -> String {
        let diags = self.diagnostics().map(|(src, d)| src.render_plain(d)).unwrap_or_default();
        format!("{diags}{self}")
    }
}

fn failed(src: &Source, diags: Vec<Diagnostic>, bind: bool) -> LoadError {
    let (src, n) = (Box::new(src.clone()), diags.iter().filter(|d| d.is_error()).count());
    if bind {
        LoadError::Bind { src, diags, n }
    } else {
        LoadError::Compile { src, diags, n }
    }
}

/// Reads a model (importing an ONNX file, told apart by its extension) and compiles it.
pub fn load(from: ModelSource) -> Result<Loaded, LoadError> {
    let (src, imported, notes) = match from {
        ModelSource::Bundled => (Source::new("alexbn.model (bundled)", ALEXBN), None, vec![]),
        ModelSource::File(p) if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) => {
            let i = onnx::import(p)?;
            (Source::new(format!("{} (imported)", p.display()), i.text), Some(Weights::from_arrays(p, i.weights)), i.notes)
        }
        ModelSource::File(p) => {
            let io = |source| LoadError::Io { path: p.display().to_string(), source };
            let bytes = weights::read_file(p, MAX_MODEL_TEXT, "cnnc's limit of 16 MiB for model text").map_err(io)?;
            let text =
                String::from_utf8(bytes).map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, not_utf8(e.as_bytes(), e.utf8_error()))))?;
            (Source::new(p.display().to_string(), text), None, vec![])
        }
        ModelSource::Text { name, text } => (Source::new(name, text), None, vec![]),
    };
    match compile(&src) {
        Ok((graph, warnings)) => Ok(Loaded { src, graph, warnings, imported, notes }),
        Err(Failed(diags)) => Err(failed(&src, diags, false)),
    }
}

impl Loaded {
    /// Whether binding without a weights file draws the parameters at random (no file, nothing imported,
    /// and the model has parameters): callers warn that the outputs mean nothing.
    pub fn random_weights(&self, path: Option<&Path>) -> bool {
        path.is_none() && self.imported.is_none() && !self.graph.params().is_empty()
    }

    /// Binds the weights in `path` (or the imported ones, or Chainer's initializers) to the graph; the
    /// bound parameters' notes (unused keys) are for the caller to show.
    pub fn bind(&mut self, path: Option<&Path>) -> Result<weights::Bound, LoadError> {
        let w = match (path, self.imported.take()) {
            (Some(p), _) => Weights::open(p)?,
            (None, Some(w)) => w,
            (None, None) => Weights::init(),
        };
        weights::bind(&self.graph, &w).map_err(|diags| failed(&self.src, diags, true))
    }
}
