//! AST → [`Graph`]: instantiates the model's links (and the chains inside them), then evaluates `forward`,
//! inferring every shape.
//!
//! Everything but tensors is known at compile time: chain parameters, `if`, `for` and arithmetic are
//! evaluated here, so the graph is straight-line. Links are instances in an arena, each with its Chainer
//! path (`res2/0/conv1`), which names its parameters (`res2/0/conv1/W`). Primitive links and functions are
//! bound by Chainer's signatures and defaults (`LINKS`, `FUNCTIONS`). Evaluation never stops at the first
//! error: a failed expression becomes `Value::Poison`, which later uses accept silently, so each mistake is
//! reported once.

use super::{param_specs, Graph, Kind, Node, NodeId, Param};
use crate::diag::{Diagnostic, Span};
use crate::syntax::{Arg, BinOp, Decl, Expr, ExprKind, File, Ident, Item, ItemKind, Stmt};
use cnnc_runtime::op::{Axis, BatchNorm, Batched, Conv2d, Dims, Linear, Lrn, Pool2d, F64};
use cnnc_runtime::Op;
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::HashMap;

#[derive(Clone, Debug, thiserror::Error)]
pub enum BuildError {
    #[error("unknown {what} `{name}`")]
    Unknown { what: &'static str, name: String, span: Span, suggestion: Option<String>, known: Vec<String> },
    #[error("{message}")]
    Argument { message: String, span: Span, label: String },
    #[error("`{layer}` {message}")]
    Shape { layer: String, message: String, span: Span, decl: Option<Span> },
    #[error("{message}")]
    Structure { message: String, span: Span, label: String, note: Option<String> },
}

impl BuildError {
    pub fn diagnostic(&self) -> Diagnostic {
        let d = Diagnostic::error(self.to_string());
        match self {
            BuildError::Unknown { span, suggestion, known, what, .. } => {
                let mut d = d.label(*span, format!("not a known {what}"));
                if let Some(s) = suggestion {
                    d = d.note(format!("did you mean `{s}`?"));
                }
                if !known.is_empty() {
                    d = d.note(format!("known: {}", known.join(", ")));
                }
                d
            }
            BuildError::Argument { span, label, .. } => d.label(*span, label),
            BuildError::Shape { span, decl, .. } => {
                let d = d.label(*span, "in this call");
                match decl {
                    Some(s) => d.label(*s, "link declared here"),
                    None => d,
                }
            }
            BuildError::Structure { span, label, note, .. } => {
                let d = d.label(*span, label);
                match note {
                    Some(n) => d.note(n),
                    None => d,
                }
            }
        }
    }
}

/// A value during evaluation.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    None,
    Str(String),
    Tuple(Vec<Value>),
    Tensor(NodeIndex),
    Link(LinkId),
    /// The result of an expression that already reported an error.
    Poison,
}

impl Value {
    fn describe(&self) -> &'static str {
        match self {
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::None => "None",
            Value::Str(_) => "a string",
            Value::Tuple(_) => "a tuple",
            Value::Tensor(_) => "a tensor",
            Value::Link(_) => "a link",
            Value::Poison => "an erroneous value",
        }
    }
}

type LinkId = usize;

/// A primitive link, with its input size once known (`None` in Chainer means "infer on first call").
#[derive(Clone, Debug)]
enum Prim {
    Conv { conv: Conv2d, infer_in: bool },
    BatchNorm { bn: BatchNorm, infer: bool },
    Linear { linear: Linear, infer_in: bool },
}

enum Body<'a> {
    /// `None` when its declaration failed (already reported).
    Prim(Option<Prim>),
    Chain {
        item: &'a Item,
        consts: HashMap<String, Value>,
        children: Vec<(String, LinkId)>,
    },
}

/// A link instance: a primitive link or a chain, named by its Chainer path.
struct Link<'a> {
    path: String,
    decl: Span,
    body: Body<'a>,
    used: bool,
}

/// A primitive link or function signature: (parameter, default); `None` marks a required one.
type Signature = &'static [(&'static str, Option<Value>)];
const REQUIRED: Option<Value> = None;
const NONE: Option<Value> = Some(Value::None);
const fn int(i: i64) -> Option<Value> {
    Some(Value::Int(i))
}
const fn float(f: f64) -> Option<Value> {
    Some(Value::Float(f))
}
const fn bool(b: bool) -> Option<Value> {
    Some(Value::Bool(b))
}

const LINKS: &[(&str, Signature)] = &[
    (
        "Convolution2D",
        &[
            ("in_channels", REQUIRED),
            ("out_channels", REQUIRED),
            ("ksize", NONE),
            ("stride", int(1)),
            ("pad", int(0)),
            ("nobias", bool(false)),
            ("initialW", NONE),
            ("initial_bias", NONE),
            ("dilate", int(1)),
            ("groups", int(1)),
        ],
    ),
    // `decay` only matters for training; accepted so that Chainer code pastes unchanged.
    ("BatchNormalization", &[("size", NONE), ("decay", float(0.9)), ("eps", float(2e-5))]),
    ("Linear", &[("in_size", REQUIRED), ("out_size", NONE), ("nobias", bool(false)), ("initialW", NONE), ("initial_bias", NONE)]),
];

const FUNCTIONS: &[(&str, Signature)] = &[
    ("relu", &[("x", REQUIRED)]),
    ("sigmoid", &[("x", REQUIRED)]),
    ("clip", &[("x", REQUIRED), ("x_min", REQUIRED), ("x_max", REQUIRED)]),
    ("max_pooling_2d", &[("x", REQUIRED), ("ksize", REQUIRED), ("stride", NONE), ("pad", int(0)), ("cover_all", bool(true))]),
    // `pad_value` as in Chainer's `average_pooling_nd`: 0 averages padded zeros in, None leaves them out.
    ("average_pooling_2d", &[("x", REQUIRED), ("ksize", REQUIRED), ("stride", NONE), ("pad", int(0)), ("pad_value", int(0))]),
    ("local_response_normalization", &[("x", REQUIRED), ("n", int(5)), ("k", float(2.0)), ("alpha", float(1e-4)), ("beta", float(0.75))]),
    ("dropout", &[("x", REQUIRED), ("ratio", float(0.5))]),
    ("softmax", &[("x", REQUIRED), ("axis", int(1))]),
    ("reshape", &[("x", REQUIRED), ("shape", REQUIRED)]),
    ("flatten", &[("x", REQUIRED)]),
    ("concat", &[("xs", REQUIRED), ("axis", int(1))]),
    ("transpose", &[("x", REQUIRED), ("axes", NONE)]),
    // Always a tuple here: `force_tuple` is accepted so that Chainer code pastes unchanged.
    ("split_axis", &[("x", REQUIRED), ("indices_or_sections", REQUIRED), ("axis", REQUIRED), ("force_tuple", bool(true))]),
    // Compile-time helpers.
    ("len", &[("x", REQUIRED)]),
    ("range", &[("start", REQUIRED), ("stop", NONE), ("step", int(1))]),
];

/// Largest integer argument (sizes, strides, ...): keeps every shape computation far from overflow.
const MAX_DIM: i64 = 1 << 31;
/// Largest tensor or parameter, in elements per sample (16 GiB of f32).
const MAX_ELEMENTS: usize = 1 << 32;
/// Deepest nesting of chain instantiations and calls (a chain that contains itself hits this).
const MAX_NESTING: usize = 64;
/// Most iterations of one `for` loop, and most nodes in a graph.
const MAX_ITERATIONS: usize = 100_000;
const MAX_NODES: usize = 1_000_000;
/// Evaluation steps (loop iterations, chain instantiations and calls) for a whole model: bounds compile
/// time however loops nest and chains multiply. The largest model here (ResNet50) takes about 300.
const FUEL: usize = 2_000_000;
/// Longest tuple a model may build.
const MAX_TUPLE: usize = 100_000;

/// Builds the graph of the model in `files[0]`, with the chains of every file in scope. On success
/// returns warnings alongside.
pub fn build(files: &[&File]) -> Result<(Graph, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut b = Builder::default();
    let mut model: Option<&Item> = None;
    for (fi, file) in files.iter().enumerate() {
        for item in &file.items {
            if item.kind == ItemKind::Model {
                match (fi, model) {
                    (0, None) => model = Some(item),
                    (0, Some(first)) => b.push(
                        Diagnostic::error("a model file holds one model").label(item.name.span, "second model here").label(first.name.span, "first model here"),
                    ),
                    _ => {}
                }
            } else if fi > 0 && b.items.contains_key(item.name.name.as_str()) {
                // A model's own chain shadows the prelude's of the same name.
            } else if let Some(prev) = b.items.insert(&item.name.name, item) {
                b.push(
                    Diagnostic::error(format!("`{}` is defined twice", item.name.name))
                        .label(item.name.span, "defined again here")
                        .label(prev.name.span, "first defined here"),
                );
            }
        }
    }
    let Some(model) = model else {
        let span = files[0].items.first().map_or(Span::default(), |i| i.name.span);
        b.push(
            Diagnostic::error("the file defines no `model`")
                .label(span, "expected `model Name { ... }`")
                .note("chains are used by a model; add `model Name { ... forward(x: [C, H, W]) { ... } }`"),
        );
        return Err(b.diags);
    };
    let graph = b.model(model);
    b.unused_links(0);
    b.diags.sort_by_key(|d| (d.primary_start(), d.is_error()));
    match graph {
        Some(g) if !b.diags.iter().any(Diagnostic::is_error) => Ok((g, b.diags)),
        _ => Err(b.diags),
    }
}

/// Names visible to an expression: local variables (with a read flag) and the instance `self` refers to.
struct Scope {
    vars: HashMap<String, (Value, Span, bool)>,
    this: LinkId,
    /// In link declarations (instantiation) rather than in `forward`.
    declaring: bool,
}

#[derive(Default)]
struct Builder<'a> {
    items: HashMap<&'a str, &'a Item>,
    g: DiGraph<Node, u32>,
    diags: Vec<Diagnostic>,
    links: Vec<Link<'a>>,
    /// Chain instantiations and calls in progress: (call span, path), outermost first.
    stack: Vec<(Span, String)>,
    /// Forward calls in progress, the model's own included (it has no entry in `stack`).
    depth: usize,
    /// Evaluation steps used so far (see [`FUEL`]).
    steps: usize,
}

impl<'a> Builder<'a> {
    /// Adds a diagnostic once (a chain called twice reports the same mistake once), with the call that led
    /// into a chain as context.
    fn push(&mut self, mut d: Diagnostic) {
        if let (Some((outer, top)), Some((_, inner))) = (self.stack.first(), self.stack.last()) {
            if d.is_error() && !d.labels.iter().any(|(s, _)| s == outer) {
                d = d.label(*outer, format!("in `{top}`"));
                if inner != top {
                    // Paths nest (`res2/0/conv1`), so the innermost names the whole chain of calls.
                    // By characters: names may be non-ASCII, and a byte cut could split one.
                    let n = inner.chars().count();
                    let short = if n > 80 {
                        format!("{}…{}", inner.chars().take(40).collect::<String>(), inner.chars().skip(n - 39).collect::<String>())
                    } else {
                        inner.clone()
                    };
                    d = d.note(format!("inside `{short}`"));
                }
            }
        }
        if !self.diags.contains(&d) {
            self.diags.push(d);
        }
    }

    fn error(&mut self, e: BuildError) -> Value {
        self.push(e.diagnostic());
        Value::Poison
    }

    fn arg_error(&mut self, span: Span, message: impl Into<String>, label: impl Into<String>) -> Value {
        self.error(BuildError::Argument { message: message.into(), span, label: label.into() })
    }

    /// Spends one evaluation step; false (with one error) once the model's budget is spent.
    fn fuel(&mut self, span: Span) -> bool {
        self.steps += 1;
        if self.steps == FUEL {
            self.structure(
                span,
                format!("evaluating the model takes more than {FUEL} steps"),
                "while evaluating this",
                Some("loops nest too deeply or chains multiply too fast".into()),
            );
        }
        self.steps < FUEL
    }

    fn structure(&mut self, span: Span, message: impl Into<String>, label: impl Into<String>, note: Option<String>) -> Value {
        self.error(BuildError::Structure { message: message.into(), span, label: label.into(), note })
    }

    fn model(&mut self, m: &'a Item) -> Option<Graph> {
        self.links.push(Link { path: String::new(), decl: m.name.span, body: Body::Chain { item: m, consts: HashMap::new(), children: vec![] }, used: true });
        let mut scope = Scope { vars: HashMap::new(), this: 0, declaring: true };
        self.decls(&m.body, &mut scope);
        if let Body::Chain { consts, .. } = &mut self.links[0].body {
            *consts = scope.vars.into_iter().map(|(k, (v, _, _))| (k, v)).collect();
        }
        let Some(fwd) = &m.forward else {
            self.structure(
                m.name.span,
                format!("model `{}` has no `forward`", m.name.name),
                "declared here",
                Some("add `forward(x: [C, H, W]) { ... return h }`".into()),
            );
            return None;
        };
        if fwd.params.is_empty() {
            self.structure(fwd.span, "`forward` takes no input", "here", None);
        }
        let mut inputs = Vec::new();
        let mut args = Vec::new();
        for (i, p) in fwd.params.iter().enumerate() {
            let dims = match &p.shape {
                Some(e) => self.input_shape(e),
                None => {
                    self.structure(
                        p.name.span,
                        format!("input `{}` has no shape", p.name.name),
                        "needs a per-sample shape",
                        Some(format!("write e.g. `{}: [3, 227, 227]` (the batch axis is implicit)", p.name.name)),
                    );
                    None
                }
            };
            args.push(match dims {
                Some(shape) => {
                    let id = self.g.add_node(Node {
                        kind: Kind::Input(i),
                        shape,
                        span: p.name.span,
                        layer: p.name.name.clone(),
                        params: vec![],
                        decl: None,
                        provenance: None,
                    });
                    inputs.push(NodeId(id));
                    Value::Tensor(id)
                }
                None => Value::Poison,
            });
        }
        let out = self.run_forward(0, args, m.span)?;
        match out {
            Value::Tensor(id) => Some(finish(&self.g, m.name.name.clone(), inputs, id)),
            Value::Poison => None,
            v => {
                self.structure(fwd.span, format!("`forward` must return a tensor, not {}", v.describe()), "this forward", None);
                None
            }
        }
    }

    fn input_shape(&mut self, e: &'a Expr) -> Option<Dims> {
        let mut scope = Scope { vars: HashMap::new(), this: 0, declaring: true };
        let v = self.expr(e, &mut scope);
        let dims: Option<Dims> = match &v {
            Value::Tuple(items) if !items.is_empty() => {
                items.iter().map(|d| if let Value::Int(i @ 1..=MAX_DIM) = d { Some(*i as usize) } else { None }).collect()
            }
            _ => None,
        };
        match &dims {
            Some(d) if elements(d).is_none() => {
                self.arg_error(e.span, format!("input shape has more than {MAX_ELEMENTS} elements per sample"), "too large");
                None
            }
            None if v != Value::Poison => {
                self.arg_error(e.span, "an input shape is a list of positive integers", "like `[3, 227, 227]`");
                None
            }
            _ => dims,
        }
    }

    // ---- declarations (instantiation) ----

    fn decls(&mut self, decls: &'a [Decl], scope: &mut Scope) {
        for d in decls {
            match d {
                Decl::Assign { name, value } => {
                    let in_list = matches!(&self.links[scope.this].body, Body::Chain { item, .. } if item.kind == ItemKind::ChainList);
                    if in_list && self.constructor(value, scope).is_some() {
                        self.structure(
                            name.span,
                            "a chainlist's links are numbered, not named",
                            "remove `name =`",
                            Some("as in Chainer's ChainList, children are 0, 1, 2, ...".into()),
                        );
                        continue;
                    }
                    if let Some(ctor) = self.constructor(value, scope) {
                        let (path, decl) = (self.child_path(scope.this, &name.name), name.span.to(value.span));
                        let id = self.construct(ctor, value, path.clone(), decl, scope).unwrap_or_else(|| self.poisoned(path, decl));
                        self.add_child(scope.this, name, id);
                    } else {
                        let v = self.expr(value, scope);
                        if matches!(v, Value::Tensor(_) | Value::Link(_)) {
                            self.arg_error(value.span, format!("a declaration cannot hold {}", v.describe()), "declare links with a constructor call");
                        }
                        scope.vars.insert(name.name.clone(), (v, name.span, true));
                    }
                }
                Decl::Child(e) => {
                    let is_list = matches!(&self.links[scope.this].body, Body::Chain { item, .. } if item.kind == ItemKind::ChainList);
                    match self.constructor(e, scope) {
                        Some(ctor) if is_list => {
                            let index = self.children(scope.this).len().to_string();
                            let path = self.child_path(scope.this, &index);
                            let id = self.construct(ctor, e, path.clone(), e.span, scope).unwrap_or_else(|| self.poisoned(path, e.span));
                            self.add_child(scope.this, &Ident { name: index, span: e.span }, id);
                        }
                        Some(_) => {
                            self.structure(e.span, "a link without a name", "only a `chainlist` numbers its children", Some("write `name = ...`".into()));
                        }
                        None => {
                            self.expr(e, scope);
                            self.structure(e.span, "expected a declaration", "not `name = ...` or a link", None);
                        }
                    }
                }
                Decl::If { cond, then, otherwise } => match self.truth(cond, scope) {
                    Some(true) => self.decls(then, scope),
                    Some(false) => self.decls(otherwise, scope),
                    None => {}
                },
                Decl::For { var, iter, body } => {
                    for v in self.iteration(iter, scope) {
                        if !self.fuel(iter.span) {
                            break;
                        }
                        scope.vars.insert(var.name.clone(), (v, var.span, true));
                        self.decls(body, scope);
                    }
                }
                Decl::Assert { cond, message, span } => self.assert(cond, message.as_ref(), *span, scope),
            }
        }
    }

    /// A link whose declaration failed (already reported): calls of it are silent `Poison`.
    fn poisoned(&mut self, path: String, decl: Span) -> LinkId {
        self.links.push(Link { path, decl, body: Body::Prim(None), used: true });
        self.links.len() - 1
    }

    /// `res2/0/` for nodes made inside the link at `res2/0`; empty at the model's top level.
    fn layer_prefix(&self, id: LinkId) -> String {
        match self.links[id].path.as_str() {
            "" => String::new(),
            p => format!("{p}/"),
        }
    }

    fn child_path(&self, parent: LinkId, name: &str) -> String {
        match self.links[parent].path.as_str() {
            "" => name.to_string(),
            p => format!("{p}/{name}"),
        }
    }

    fn children(&self, id: LinkId) -> &[(String, LinkId)] {
        match &self.links[id].body {
            Body::Chain { children, .. } => children,
            Body::Prim(_) => &[],
        }
    }

    fn add_child(&mut self, parent: LinkId, name: &Ident, id: LinkId) {
        if let Some(&(_, prev)) = self.children(parent).iter().find(|(n, _)| *n == name.name) {
            let prev = self.links[prev].decl;
            self.push(
                Diagnostic::error(format!("link `{}` is declared twice", name.name)).label(name.span, "declared again here").label(prev, "first declared here"),
            );
            return;
        }
        if let Body::Chain { children, .. } = &mut self.links[parent].body {
            children.push((name.name.clone(), id));
        }
    }

    /// If `e` is a call of a link constructor (`L.Linear(...)`, `Block(...)`, anything under `L.`), its path.
    fn constructor(&self, e: &'a Expr, scope: &Scope) -> Option<&'a [Ident]> {
        let ExprKind::Call { callee, .. } = &e.kind else { return None };
        let ExprKind::Path(path) = &callee.kind else { return None };
        match path.as_slice() {
            [ns, ..] if ns.name == "L" && path.len() > 1 => Some(path),
            [n] if !scope.vars.contains_key(&n.name) && (LINKS.iter().any(|(l, _)| *l == n.name) || self.items.contains_key(n.name.as_str())) => Some(path),
            _ => None,
        }
    }

    /// Instantiates a primitive link or a chain at `path`.
    fn construct(&mut self, ctor: &'a [Ident], call: &'a Expr, path: String, decl: Span, scope: &mut Scope) -> Option<LinkId> {
        let ExprKind::Call { args, .. } = &call.kind else { unreachable!("constructor() checked for a call") };
        let ctor = match ctor {
            [_, n] | [n] => n,
            _ => {
                let joined: Vec<&str> = ctor.iter().map(|i| i.name.as_str()).collect();
                self.eval_args(args, scope);
                self.arg_error(
                    ctor[0].span.to(ctor[ctor.len() - 1].span),
                    format!("unknown link constructor `{}`", joined.join(".")),
                    "expected `L.Link(...)` or `Link(...)`",
                );
                return None;
            }
        };
        if let Some((_, sig)) = LINKS.iter().find(|(l, _)| *l == ctor.name) {
            let prim = self.prim_decl(&ctor.name, sig, args, call.span, scope);
            self.links.push(Link { path, decl, body: Body::Prim(prim), used: false });
            return Some(self.links.len() - 1);
        }
        let Some(&item) = self.items.get(ctor.name.as_str()) else {
            let mut known: Vec<&str> = LINKS.iter().map(|l| l.0).chain(self.items.keys().copied()).collect();
            known.sort();
            self.unknown("link", ctor, &known);
            return None;
        };
        if self.stack.len() >= MAX_NESTING {
            self.structure(decl, format!("chains nest more than {MAX_NESTING} deep"), "here", Some(format!("does `{}` contain itself?", item.name.name)));
            return None;
        }
        if !self.fuel(decl) {
            return None;
        }
        let sig: Vec<(&str, Option<Value>)> = item
            .params
            .iter()
            .map(|p| (p.name.name.as_str(), p.default.as_ref().map(|d| self.expr(d, &mut Scope { vars: HashMap::new(), this: 0, declaring: true }))))
            .collect();
        let values = self.bind(&item.name.name, &sig, args, call.span, scope)?;
        let consts: HashMap<String, (Value, Span, bool)> =
            sig.iter().zip(&item.params).zip(values).map(|(((n, _), p), v)| (n.to_string(), (v, p.name.span, true))).collect();
        self.links.push(Link { path: path.clone(), decl, body: Body::Chain { item, consts: HashMap::new(), children: vec![] }, used: false });
        let id = self.links.len() - 1;
        self.stack.push((call.span, path));
        let mut inner = Scope { vars: consts, this: id, declaring: true };
        self.decls(&item.body, &mut inner);
        self.stack.pop();
        if let Body::Chain { consts, .. } = &mut self.links[id].body {
            *consts = inner.vars.into_iter().map(|(k, (v, _, _))| (k, v)).collect();
        }
        Some(id)
    }

    /// Evaluates a primitive link declaration such as `L.Convolution2D(3, 96, 11, stride=4)`.
    fn prim_decl(&mut self, name: &str, sig: Signature, args: &'a [Arg], call: Span, scope: &mut Scope) -> Option<Prim> {
        let v = self.bind(name, sig, args, call, scope)?;
        let span_of = |i: usize| arg_span(args, sig, i, call);
        for (i, (p, _)) in sig.iter().enumerate() {
            if p.starts_with("initial") && v[i] != Value::None {
                self.arg_error(
                    span_of(i),
                    format!("`{p}` is not supported: cnnc loads parameters from a weights file or initialises them itself"),
                    "remove it",
                );
                return None;
            }
        }
        match name {
            "Convolution2D" => {
                // Chainer's two-argument form `Convolution2D(out, ksize)` infers the input channels.
                let (inp, out, k, ks) = match &v[2] {
                    Value::None => (Value::None, v[0].clone(), v[1].clone(), span_of(1)),
                    _ => (v[0].clone(), v[1].clone(), v[2].clone(), span_of(2)),
                };
                let conv = Conv2d {
                    in_channels: if inp == Value::None { 0 } else { self.usize(&inp, span_of(0), "in_channels", 1)? },
                    out_channels: self.usize(&out, span_of(1), "out_channels", 1)?,
                    kernel: self.pair(&k, ks, "ksize", 1)?,
                    stride: self.pair(&v[3], span_of(3), "stride", 1)?,
                    pad: self.pair(&v[4], span_of(4), "pad", 0)?,
                    dilation: self.pair(&v[8], span_of(8), "dilate", 1)?,
                    groups: self.usize(&v[9], span_of(9), "groups", 1)?,
                    bias: !self.bool(&v[5], span_of(5), "nobias")?,
                };
                if !conv.out_channels.is_multiple_of(conv.groups) || (inp != Value::None && !conv.in_channels.is_multiple_of(conv.groups)) {
                    self.arg_error(span_of(9), format!("groups={} must divide both channel counts", conv.groups), "here");
                    return None;
                }
                Some(Prim::Conv { infer_in: inp == Value::None, conv })
            }
            "BatchNormalization" => {
                let eps = self.float(&v[2], span_of(2), "eps")?;
                if eps.is_nan() || eps < 0.0 {
                    self.arg_error(span_of(2), "eps must not be negative", "here");
                    return None;
                }
                self.float(&v[1], span_of(1), "decay")?;
                let infer = v[0] == Value::None;
                let channels = if infer { 0 } else { self.usize(&v[0], span_of(0), "size", 1)? };
                Some(Prim::BatchNorm { bn: BatchNorm { channels, eps: F64(eps) }, infer })
            }
            "Linear" => {
                // `Linear(out)` infers the input size, as in Chainer.
                let (inp, out) = if v[1] == Value::None { (Value::None, v[0].clone()) } else { (v[0].clone(), v[1].clone()) };
                let linear = Linear {
                    in_features: if inp == Value::None { 0 } else { self.usize(&inp, span_of(0), "in_size", 1)? },
                    out_features: self.usize(&out, span_of(1), "out_size", 1)?,
                    bias: !self.bool(&v[2], span_of(2), "nobias")?,
                };
                Some(Prim::Linear { infer_in: inp == Value::None, linear })
            }
            _ => unreachable!("LINKS and this match list the same names"),
        }
    }

    fn unknown(&mut self, what: &'static str, name: &Ident, known: &[&str]) -> Value {
        let suggestion =
            known.iter().filter(|k| strsim::levenshtein(k, &name.name) <= 2.max(name.name.len() / 3)).min_by_key(|k| strsim::levenshtein(k, &name.name));
        self.error(BuildError::Unknown {
            what,
            name: name.name.clone(),
            span: name.span,
            suggestion: suggestion.map(|s| s.to_string()),
            known: known.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// Binds call arguments to a signature: positional, then keyword, then defaults (`None`: required).
    fn bind(&mut self, callee: &str, sig: &[(&str, Option<Value>)], args: &'a [Arg], span: Span, scope: &mut Scope) -> Option<Vec<Value>> {
        let mut slots: Vec<Option<Value>> = vec![None; sig.len()];
        let mut ok = true;
        for (i, a) in args.iter().enumerate() {
            let v = self.expr(&a.value, scope);
            let slot = match &a.keyword {
                None if args[..i].iter().any(|a| a.keyword.is_some()) => {
                    self.arg_error(a.value.span, "positional argument after a keyword argument", "move it before the keywords");
                    ok = false;
                    continue;
                }
                None if i >= sig.len() => {
                    self.arg_error(a.value.span, format!("`{callee}` takes at most {} arguments", sig.len()), "extra argument");
                    ok = false;
                    continue;
                }
                None => i,
                Some(k) => match sig.iter().position(|(n, _)| *n == k.name) {
                    Some(p) => p,
                    None => {
                        let known: Vec<&str> = sig.iter().map(|(n, _)| *n).collect();
                        self.unknown("keyword", k, &known);
                        ok = false;
                        continue;
                    }
                },
            };
            if slots[slot].is_some() {
                self.arg_error(a.value.span, format!("`{}` is given twice", sig[slot].0), "again here");
                ok = false;
            }
            slots[slot] = Some(v);
        }
        let mut out = Vec::new();
        for ((name, default), slot) in sig.iter().zip(slots) {
            out.push(match (slot, default) {
                (Some(v), _) => v,
                (None, Some(d)) => d.clone(),
                (None, None) => {
                    self.arg_error(span, format!("`{callee}` is missing its argument `{name}`"), "in this call");
                    ok = false;
                    Value::Poison
                }
            });
        }
        (ok && !out.contains(&Value::Poison)).then_some(out)
    }

    // ---- conversions ----

    fn usize(&mut self, v: &Value, span: Span, what: &str, min: i64) -> Option<usize> {
        match v {
            Value::Int(i) if *i > MAX_DIM => {
                self.arg_error(span, format!("`{what}` = {i} exceeds cnnc's limit of {MAX_DIM}"), "too large");
                None
            }
            Value::Int(i) if *i >= min => Some(*i as usize),
            Value::Poison => None,
            _ => {
                let want = if min > 0 { "a positive integer" } else { "a non-negative integer" };
                let found = if let Value::Int(i) = v { i.to_string() } else { v.describe().to_string() };
                self.arg_error(span, format!("`{what}` must be {want}, found {found}"), "here");
                None
            }
        }
    }

    /// An integer or a pair `(h, w)` of integers, each ≥ `min`.
    fn pair(&mut self, v: &Value, span: Span, what: &str, min: i64) -> Option<[usize; 2]> {
        match v {
            Value::Tuple(t) if t.len() == 2 => Some([self.usize(&t[0], span, what, min)?, self.usize(&t[1], span, what, min)?]),
            Value::Int(_) | Value::Poison => self.usize(v, span, what, min).map(|x| [x, x]),
            _ => self.want(v, span, None, || format!("`{what}` must be an integer or a pair of integers")),
        }
    }

    /// `got`, the converted value; where there is none, an error saying what was wanted and what was
    /// found (nothing more for a value already poisoned by an earlier error).
    fn want<T>(&mut self, v: &Value, span: Span, got: Option<T>, wanted: impl FnOnce() -> String) -> Option<T> {
        if got.is_none() && *v != Value::Poison {
            self.arg_error(span, format!("{}, found {}", wanted(), v.describe()), "here");
        }
        got
    }

    /// An axis of a tensor of `rank` dimensions (batch included); negative axes count from the end.
    fn axis(&mut self, v: &Value, span: Span, rank: usize) -> Option<usize> {
        let got = match v {
            Value::Int(i) if *i < 0 && i.unsigned_abs() as usize <= rank => Some(rank - i.unsigned_abs() as usize),
            Value::Int(i) if *i >= 0 => Some(*i as usize),
            _ => None,
        };
        self.want(v, span, got, || format!("`axis` must be an integer in -{rank}..{rank}"))
    }

    fn float(&mut self, v: &Value, span: Span, what: &str) -> Option<f64> {
        let got = match v {
            Value::Float(f) if f.is_finite() => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        };
        self.want(v, span, got, || format!("`{what}` must be a finite number"))
    }

    fn bool(&mut self, v: &Value, span: Span, what: &str) -> Option<bool> {
        let got = if let Value::Bool(b) = v { Some(*b) } else { None };
        self.want(v, span, got, || format!("`{what}` must be True or False"))
    }

    fn tensor(&mut self, v: &Value, span: Span) -> Option<NodeIndex> {
        let got = if let Value::Tensor(t) = v { Some(*t) } else { None };
        self.want(v, span, got, || "expected a tensor".into())
    }

    /// Python truthiness of a compile-time value (`None` on error).
    fn truth(&mut self, cond: &'a Expr, scope: &mut Scope) -> Option<bool> {
        match self.expr(cond, scope) {
            Value::Bool(b) => Some(b),
            Value::Int(i) => Some(i != 0),
            Value::Float(f) => Some(f != 0.0),
            Value::None => Some(false),
            Value::Str(s) => Some(!s.is_empty()),
            Value::Tuple(t) => Some(!t.is_empty()),
            Value::Poison => None,
            v => {
                self.arg_error(cond.span, format!("a condition must be known at compile time, not {}", v.describe()), "here");
                None
            }
        }
    }

    fn iteration(&mut self, iter: &'a Expr, scope: &mut Scope) -> Vec<Value> {
        match self.expr(iter, scope) {
            Value::Tuple(items) if items.len() <= MAX_ITERATIONS => items,
            Value::Tuple(_) => {
                self.arg_error(iter.span, format!("a loop runs at most {MAX_ITERATIONS} times"), "too many");
                vec![]
            }
            Value::Poison => vec![],
            v => {
                self.arg_error(iter.span, format!("cannot loop over {}", v.describe()), "use `range(...)` or a tuple");
                vec![]
            }
        }
    }

    fn assert(&mut self, cond: &'a Expr, message: Option<&'a Expr>, span: Span, scope: &mut Scope) {
        if self.truth(cond, scope) == Some(false) {
            let text = match message.map(|m| self.expr(m, scope)) {
                Some(Value::Str(s)) => s,
                _ => "assertion failed".into(),
            };
            self.structure(span, text, "this assertion failed", None);
        }
    }

    // ---- expressions ----

    fn expr(&mut self, e: &'a Expr, scope: &mut Scope) -> Value {
        match &e.kind {
            ExprKind::Int(i) => Value::Int(*i),
            ExprKind::Float(f) => Value::Float(*f),
            ExprKind::Bool(b) => Value::Bool(*b),
            ExprKind::None => Value::None,
            ExprKind::Str(s) => Value::Str(s.clone()),
            ExprKind::Tuple(items) => Value::Tuple(items.iter().map(|i| self.expr(i, scope)).collect()),
            ExprKind::Path(path) => self.path(path, e.span, scope),
            ExprKind::Neg(inner) => match self.expr(inner, scope) {
                Value::Int(i) => i.checked_neg().map(Value::Int).unwrap_or_else(|| self.arg_error(e.span, "integer overflow", "here")),
                Value::Float(f) => Value::Float(-f),
                Value::Poison => Value::Poison,
                v => self.arg_error(e.span, format!("cannot negate {}", v.describe()), "here"),
            },
            ExprKind::Not(inner) => self.truth(inner, scope).map_or(Value::Poison, |b| Value::Bool(!b)),
            ExprKind::Binary { op: op @ (BinOp::And | BinOp::Or), lhs, rhs } => match self.truth(lhs, scope) {
                // Short-circuit, as in Python (the result is a boolean here).
                Some(l) if l == (*op == BinOp::Or) => Value::Bool(l),
                Some(_) => self.truth(rhs, scope).map_or(Value::Poison, Value::Bool),
                None => Value::Poison,
            },
            ExprKind::Binary { op, lhs, rhs } => {
                let (a, b) = (self.expr(lhs, scope), self.expr(rhs, scope));
                let layer = format!("{}+", self.layer_prefix(scope.this));
                self.binary(*op, a, b, e.span, &layer)
            }
            ExprKind::Index { base, index } => {
                let (b, i) = (self.expr(base, scope), self.expr(index, scope));
                self.index(b, i, e.span)
            }
            ExprKind::Call { callee, args } => self.call(callee, args, e.span, scope),
        }
    }

    fn path(&mut self, path: &'a [Ident], span: Span, scope: &mut Scope) -> Value {
        match path {
            [name] if name.name == "self" => Value::Link(scope.this),
            [name] => {
                if let Some((v, _, used)) = scope.vars.get_mut(&name.name) {
                    *used = true;
                    return v.clone();
                }
                if let Some(&(_, id)) = self.children(scope.this).iter().find(|(n, _)| *n == name.name) {
                    return Value::Link(id);
                }
                let mut known: Vec<String> = scope.vars.keys().cloned().collect();
                known.sort();
                self.unknown("name", name, &known.iter().map(String::as_str).collect::<Vec<_>>())
            }
            // A declaration that failed left a poisoned constant: stay silent.
            [this, name] if this.name == "self" && matches!(scope.vars.get(&name.name), Some((Value::Poison, _, _))) => Value::Poison,
            [this, name] if this.name == "self" => self.child(scope.this, name),
            _ => {
                let joined: Vec<&str> = path.iter().map(|i| i.name.as_str()).collect();
                self.arg_error(span, format!("unknown name `{}`", joined.join(".")), "not a variable, `self.link` or `F.function`")
            }
        }
    }

    fn child(&mut self, of: LinkId, name: &Ident) -> Value {
        if let Some(&(_, id)) = self.children(of).iter().find(|(n, _)| *n == name.name) {
            return Value::Link(id);
        }
        let known: Vec<String> = self.children(of).iter().map(|(n, _)| n.clone()).collect();
        self.unknown("link", name, &known.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn index(&mut self, base: Value, index: Value, span: Span) -> Value {
        let len = match &base {
            Value::Tuple(t) => t.len(),
            Value::Link(id) => self.children(*id).len(),
            Value::Poison => return Value::Poison,
            v => return self.arg_error(span, format!("cannot index {}", v.describe()), "here"),
        };
        let i = match index {
            Value::Int(i) if i < 0 && i.unsigned_abs() as usize <= len => len - i.unsigned_abs() as usize,
            Value::Int(i) if i >= 0 && (i as usize) < len => i as usize,
            Value::Int(i) => return self.arg_error(span, format!("index {i} is out of range for length {len}"), "here"),
            Value::Poison => return Value::Poison,
            v => return self.arg_error(span, format!("an index must be an integer, not {}", v.describe()), "here"),
        };
        match base {
            Value::Tuple(mut t) => t.swap_remove(i),
            Value::Link(id) => Value::Link(self.children(id)[i].1),
            _ => unreachable!("matched above"),
        }
    }

    fn binary(&mut self, op: BinOp, a: Value, b: Value, span: Span, layer: &str) -> Value {
        use Value::*;
        let num = |v: &Value| match v {
            Int(i) => Some(*i as f64),
            Float(f) => Some(*f),
            _ => Option::None,
        };
        match (op, &a, &b) {
            (_, Poison, _) | (_, _, Poison) => Poison,
            (BinOp::Add, Tensor(x), Tensor(y)) => self.node(Op::Add, vec![*x, *y], span, layer, Option::None, vec![]),
            (BinOp::Mul, Tensor(x), Tensor(y)) => self.node(Op::Mul, vec![*x, *y], span, layer, Option::None, vec![]),
            (BinOp::Eq, _, _) => Bool(a == b || matches!((num(&a), num(&b)), (Some(x), Some(y)) if x == y)),
            (BinOp::Ne, _, _) => Bool(!(a == b || matches!((num(&a), num(&b)), (Some(x), Some(y)) if x == y))),
            (BinOp::Add, Tuple(x), Tuple(y)) if x.len() + y.len() <= MAX_TUPLE => Tuple([x.clone(), y.clone()].concat()),
            (BinOp::Add, Tuple(_), Tuple(_)) => self.arg_error(span, format!("a tuple holds at most {MAX_TUPLE} values"), "too long"),
            (_, Int(x), Int(y)) if !matches!(op, BinOp::Div | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge) => {
                // Python semantics (floor division, result sign of the divisor), computed without overflow.
                let (x, y) = (*x as i128, *y as i128);
                let r = match op {
                    BinOp::Add => Some(x + y),
                    BinOp::Sub => Some(x - y),
                    BinOp::Mul => Some(x * y),
                    BinOp::FloorDiv => (y != 0).then(|| x.div_euclid(y) - i128::from(y < 0 && x.rem_euclid(y) != 0)),
                    BinOp::Rem => (y != 0).then(|| x - y * (x.div_euclid(y) - i128::from(y < 0 && x.rem_euclid(y) != 0))),
                    _ => unreachable!("excluded by the guard"),
                };
                match r.map(i64::try_from) {
                    Some(Ok(v)) => Int(v),
                    Some(Err(_)) => self.arg_error(span, "integer overflow", "here"),
                    Option::None => self.arg_error(span, "division by zero", "here"),
                }
            }
            _ => match (num(&a), num(&b)) {
                (Some(x), Some(y)) => match op {
                    BinOp::Lt => Bool(x < y),
                    BinOp::Le => Bool(x <= y),
                    BinOp::Gt => Bool(x > y),
                    BinOp::Ge => Bool(x >= y),
                    BinOp::Div | BinOp::FloorDiv | BinOp::Rem if y == 0.0 => self.arg_error(span, "division by zero", "here"),
                    BinOp::Add => Float(x + y),
                    BinOp::Sub => Float(x - y),
                    BinOp::Mul => Float(x * y),
                    BinOp::Div => Float(x / y),
                    BinOp::FloorDiv => Float((x / y).floor()),
                    BinOp::Rem => Float(x - y * (x / y).floor()),
                    _ => unreachable!("handled above"),
                },
                _ => self.arg_error(span, format!("unsupported operands: {} and {}", a.describe(), b.describe()), "in this expression"),
            },
        }
    }

    fn call(&mut self, callee: &'a Expr, args: &'a [Arg], span: Span, scope: &mut Scope) -> Value {
        // Functions: `F.relu`, or a plain name that is not a variable or a child link.
        let function = match &callee.kind {
            ExprKind::Path(p) => match p.as_slice() {
                [ns, f] if ns.name == "F" => Some(f),
                [f] if !scope.vars.contains_key(&f.name) && !self.children(scope.this).iter().any(|(n, _)| *n == f.name) => Some(f),
                [ns, l] if ns.name == "L" => {
                    self.eval_args(args, scope);
                    return self.structure(
                        l.span,
                        format!("link `{}` constructed inside `forward`", l.name),
                        "here",
                        Some("declare links before `forward`: `name = L.Link(...)`, then call `self.name(x)`".into()),
                    );
                }
                _ => None,
            },
            _ => None,
        };
        if let Some(f) = function {
            return self.function(f, args, span, scope);
        }
        match self.expr(callee, scope) {
            Value::Link(id) => self.call_link(id, args, span, scope),
            Value::Poison => {
                self.eval_args(args, scope);
                Value::Poison
            }
            v => {
                self.eval_args(args, scope);
                self.arg_error(callee.span, format!("{} is not callable", v.describe()), "called here")
            }
        }
    }

    /// Evaluates arguments whose call failed, so that their own errors and uses still count.
    fn eval_args(&mut self, args: &'a [Arg], scope: &mut Scope) {
        for a in args {
            self.expr(&a.value, scope);
        }
    }

    fn function(&mut self, name: &'a Ident, args: &'a [Arg], span: Span, scope: &mut Scope) -> Value {
        let Some(&(fname, sig)) = FUNCTIONS.iter().find(|(n, _)| *n == name.name) else {
            self.eval_args(args, scope);
            let mut known: Vec<String> = FUNCTIONS.iter().map(|f| f.0.to_string()).collect();
            known.extend(self.children(scope.this).iter().map(|(n, _)| format!("self.{n}")));
            if scope.declaring && (LINKS.iter().any(|l| l.0 == name.name) || self.items.contains_key(name.name.as_str())) {
                return self.structure(span, "a link must be declared with a name", "`name = ...`", None);
            }
            return self.unknown("function or link", name, &known.iter().map(String::as_str).collect::<Vec<_>>());
        };
        let Some(v) = self.bind(fname, sig, args, span, scope) else { return Value::Poison };
        let sp = |i: usize| arg_span(args, sig, i, span);
        let layer = format!("{}F.{fname}", self.layer_prefix(scope.this));
        let op = match fname {
            "len" => {
                return match &v[0] {
                    Value::Tuple(t) => Value::Int(t.len() as i64),
                    Value::Link(id) => Value::Int(self.children(*id).len() as i64),
                    v => self.arg_error(sp(0), format!("`len` of {}", v.describe()), "has no length"),
                }
            }
            "range" => {
                let (start, stop) = if v[1] == Value::None { (Value::Int(0), v[0].clone()) } else { (v[0].clone(), v[1].clone()) };
                return match (start, stop, &v[2]) {
                    (Value::Int(a), Value::Int(b), Value::Int(s)) if *s != 0 => {
                        let (a, b, s) = (a as i128, b as i128, *s as i128);
                        let span_len = if s > 0 { (b - a).max(0) } else { (a - b).max(0) };
                        let n = (span_len + s.abs() - 1) / s.abs();
                        if n > MAX_ITERATIONS as i128 {
                            return self.arg_error(span, format!("a range holds at most {MAX_ITERATIONS} values"), "too long");
                        }
                        Value::Tuple((0..n).map(|i| Value::Int((a + i * s) as i64)).collect())
                    }
                    _ => self.arg_error(span, "`range` takes integers and a non-zero step", "here"),
                };
            }
            "relu" => Some(Op::Relu),
            "sigmoid" => Some(Op::Sigmoid),
            "clip" => (|| {
                let (min, max) = (self.float(&v[1], sp(1), "x_min")?, self.float(&v[2], sp(2), "x_max")?);
                if min.is_nan() || max.is_nan() || min > max {
                    self.arg_error(sp(2), format!("x_max {max} is below x_min {min}"), "here");
                    return None;
                }
                Some(Op::Clip { min: F64(min), max: F64(max) })
            })(),
            "max_pooling_2d" | "average_pooling_2d" => (|| {
                let kernel = self.pair(&v[1], sp(1), "ksize", 1)?;
                let stride = if v[2] == Value::None { kernel } else { self.pair(&v[2], sp(2), "stride", 1)? };
                let pad = self.pair(&v[3], sp(3), "pad", 0)?;
                if fname == "max_pooling_2d" {
                    let cover_all = self.bool(&v[4], sp(4), "cover_all")?;
                    Some(Op::MaxPool2d(Pool2d { kernel, stride, pad, cover_all, exclude_pad: false }))
                } else {
                    let exclude_pad = match v[4] {
                        Value::None => true,
                        Value::Int(0) => false,
                        Value::Float(0.0) => false,
                        _ => {
                            self.arg_error(sp(4), "`pad_value` must be 0 or None", "here");
                            return None;
                        }
                    };
                    Some(Op::AvgPool2d(Pool2d { kernel, stride, pad, cover_all: false, exclude_pad }))
                }
            })(),
            "local_response_normalization" => (|| {
                let n = self.usize(&v[1], sp(1), "n", 1)?;
                let [k, alpha, beta] = [(2, "k"), (3, "alpha"), (4, "beta")].map(|(i, name)| self.float(&v[i], sp(i), name).map(F64));
                Some(Op::Lrn(Lrn { n, k: k?, alpha: alpha?, beta: beta? }))
            })(),
            "dropout" => match self.float(&v[1], sp(1), "ratio") {
                Some(r) if (0.0..1.0).contains(&r) => Some(Op::Dropout { ratio: F64(r) }),
                Some(_) => {
                    self.arg_error(sp(1), "dropout ratio must be in [0, 1)", "here");
                    None
                }
                None => None,
            },
            "softmax" => {
                let x = self.tensor(&v[0], sp(0));
                x.and_then(|x| self.axis(&v[1], sp(1), self.g[x].shape.len() + 1)).map(|a| Op::Softmax { axis: Axis(a) })
            }
            "flatten" => {
                let x = self.tensor(&v[0], sp(0));
                x.map(|x| Op::Reshape { dims: vec![self.g[x].shape.iter().product()] })
            }
            "reshape" => self.reshape_op(&v, sp(1)),
            "transpose" => {
                let x = self.tensor(&v[0], sp(0));
                let axes = match (&v[1], x) {
                    (Value::Tuple(t), Some(_)) => t.iter().map(|a| if let Value::Int(i @ 0..=MAX_DIM) = a { Some(*i as usize) } else { None }).collect(),
                    _ => None,
                };
                if axes.is_none() && x.is_some() {
                    let note = "the batch axis must stay first: `(0, ...)`, e.g. `(0, 2, 1, 3, 4)`".to_string();
                    self.structure(sp(1), "`transpose` needs the permutation `axes` as a tuple of axes", "here", Some(note));
                }
                axes.map(|axes| Op::Transpose { axes })
            }
            "split_axis" => return self.split_axis(&v, sp(1), sp(2), span, &layer),
            "concat" => {
                let Value::Tuple(items) = &v[0] else {
                    return match v[0] {
                        Value::Poison => Value::Poison,
                        _ => self.arg_error(sp(0), "`concat` takes a tuple of tensors", "e.g. `(a, b)`"),
                    };
                };
                let ins: Option<Vec<NodeIndex>> = items.clone().iter().map(|t| self.tensor(t, sp(0))).collect();
                let Some(ins) = ins else { return Value::Poison };
                if ins.is_empty() {
                    return self.arg_error(sp(0), "`concat` needs at least one tensor", "empty");
                }
                let Some(axis) = self.axis(&v[1], sp(1), self.g[ins[0]].shape.len() + 1) else { return Value::Poison };
                return self.node(Op::Concat { axis: Axis(axis) }, ins, span, &layer, None, vec![]);
            }
            _ => unreachable!("FUNCTIONS and this match list the same names"),
        };
        match (op, self.tensor(&v[0], sp(0))) {
            (Some(op), Some(x)) => self.node(op, vec![x], span, &layer, None, vec![]),
            _ => Value::Poison,
        }
    }

    /// `split_axis(x, indices_or_sections, axis)`: a tuple of slices of `x` along `axis`, at the given
    /// indices or into that many equal sections (as Chainer).
    fn split_axis(&mut self, v: &[Value], at: Span, axis_span: Span, span: Span, layer: &str) -> Value {
        let Some(x) = self.tensor(&v[0], span) else { return Value::Poison };
        let rank = self.g[x].shape.len() + 1;
        let Some(axis) = self.axis(&v[2], axis_span, rank) else { return Value::Poison };
        let size = if axis == 0 { 0 } else { self.g[x].shape.get(axis - 1).copied().unwrap_or(0) };
        let bounds: Option<Vec<usize>> = match &v[1] {
            // `size > 0`: the batch axis, or one the input lacks, has size 0, which every count divides (even i64::MAX).
            Value::Int(n @ 1..) if size > 0 && size % *n as usize == 0 => Some((0..=*n as usize).map(|i| i * size / *n as usize).collect()),
            Value::Tuple(t) => {
                let inner: Option<Vec<usize>> = t.iter().map(|i| if let Value::Int(i @ 0..=MAX_DIM) = i { Some(*i as usize) } else { None }).collect();
                inner.map(|i| [vec![0], i, vec![size]].concat()).filter(|b| b.windows(2).all(|w| w[0] <= w[1]))
            }
            Value::Poison => return Value::Poison,
            _ => None,
        };
        let Some(bounds) = bounds.filter(|_| axis > 0) else {
            let note = format!("axis {axis} has {size} entries: a number of sections that divides it, or a tuple of increasing indices");
            return self.structure(at, "`split_axis` cannot split here", "these sections", Some(note));
        };
        let parts: Vec<Value> = bounds
            .windows(2)
            .map(|w| match w[1] - w[0] {
                // An empty part: Chainer returns a zero-size array, which no layer here can take.
                0 => self.structure(at, "`split_axis` would make an empty part", "these indices", None),
                len => self.node(Op::Slice { axis: Axis(axis), start: w[0], len }, vec![x], span, layer, None, vec![]),
            })
            .collect();
        Value::Tuple(parts)
    }

    /// `reshape(x, (-1, d1, d2, ...))`: Chainer's full shape; the batch entry must be −1 (it is symbolic).
    fn reshape_op(&mut self, v: &[Value], span: Span) -> Option<Op> {
        let dims = match &v[1] {
            Value::Tuple(t) if t.first() == Some(&Value::Int(-1)) && t.len() >= 2 => {
                t[1..].iter().map(|d| if let Value::Int(i @ 1..=MAX_DIM) = d { Some(*i as usize) } else { None }).collect::<Option<Dims>>()
            }
            Value::Poison => return None,
            _ => None,
        };
        if dims.is_none() {
            self.structure(
                span,
                "`reshape` needs a shape `(-1, d1, d2, ...)` with positive d's",
                "here",
                Some("the batch axis is symbolic, so the first entry must be -1".into()),
            );
        }
        dims.map(|dims| Op::Reshape { dims })
    }

    // ---- link calls ----

    fn call_link(&mut self, id: LinkId, args: &'a [Arg], span: Span, scope: &mut Scope) -> Value {
        if scope.declaring {
            self.eval_args(args, scope);
            return self.structure(span, "links are called inside `forward`", "not here", None);
        }
        let path = self.links[id].path.clone();
        if let Some(k) = args.iter().find_map(|a| a.keyword.as_ref()) {
            self.eval_args(args, scope);
            return self.arg_error(k.span, format!("`{path}` takes positional inputs only"), "keyword argument");
        }
        let values: Vec<Value> = args.iter().map(|a| self.expr(&a.value, scope)).collect();
        self.links[id].used = true;
        if matches!(self.links[id].body, Body::Prim(_)) {
            if values.len() != 1 {
                return self.arg_error(span, format!("link `{path}` takes exactly one input"), "in this call");
            }
            let Some(x) = self.tensor(&values[0], args[0].value.span) else { return Value::Poison };
            return self.prim_call(id, x, span);
        }
        if values.contains(&Value::Poison) {
            return Value::Poison;
        }
        self.run_forward(id, values, span).unwrap_or(Value::Poison)
    }

    /// Runs a chain's forward (or, for a `chainlist` without one, its children in sequence).
    fn run_forward(&mut self, id: LinkId, args: Vec<Value>, span: Span) -> Option<Value> {
        let Body::Chain { item, consts, .. } = &self.links[id].body else { unreachable!("only chains have a forward") };
        let (item, path) = (*item, self.links[id].path.clone());
        let mut vars: HashMap<String, (Value, Span, bool)> = consts.iter().map(|(k, v)| (k.clone(), (v.clone(), item.name.span, true))).collect();
        if self.depth >= MAX_NESTING {
            self.structure(span, format!("calls nest more than {MAX_NESTING} deep"), "here", Some("does a forward call itself?".into()));
            return None;
        }
        if !self.fuel(span) {
            return None;
        }
        let Some(fwd) = &item.forward else {
            if item.kind != ItemKind::ChainList {
                self.structure(span, format!("`{}` has no `forward`", item.name.name), "called here", None);
                return None;
            }
            let [mut x] = <[Value; 1]>::try_from(args).ok().or_else(|| {
                self.arg_error(span, format!("chainlist `{path}` without a forward takes one input"), "in this call");
                None
            })?;
            self.stack.push((span, path));
            self.depth += 1;
            for (_, child) in self.children(id).to_vec() {
                self.links[child].used = true;
                x = match &self.links[child].body {
                    Body::Prim(_) => match self.tensor(&x, span) {
                        Some(t) => self.prim_call(child, t, span),
                        None => Value::Poison,
                    },
                    Body::Chain { .. } => self.run_forward(child, vec![x], span).unwrap_or(Value::Poison),
                };
            }
            self.depth -= 1;
            self.stack.pop();
            return Some(x);
        };
        if args.len() != fwd.params.len() {
            self.arg_error(span, format!("`{}` takes {} input(s), got {}", item.name.name, fwd.params.len(), args.len()), "in this call");
            return None;
        }
        for (p, v) in fwd.params.iter().zip(args) {
            if item.kind != ItemKind::Model && p.shape.is_some() {
                self.structure(p.name.span, "a chain's inputs take their shapes from the caller", "remove the shape", None);
            }
            vars.insert(p.name.name.clone(), (v, p.name.span, false));
        }
        let is_model = item.kind == ItemKind::Model;
        if !is_model {
            self.stack.push((span, path));
        }
        self.depth += 1;
        let mut scope = Scope { vars, this: id, declaring: false };
        let out = self.stmts(&fwd.body, &mut scope);
        self.depth -= 1;
        let mut unused: Vec<(&String, &Span)> =
            scope.vars.iter().filter(|(n, (_, _, used))| !used && !n.starts_with('_')).map(|(n, (_, s, _))| (n, s)).collect();
        unused.sort_by_key(|(_, s)| s.start);
        for (name, span) in unused {
            let input = fwd.params.iter().any(|p| &p.name.name == name);
            let (what, label) = if input { ("input", "declared here") } else { ("value assigned to", "assigned here") };
            self.push(Diagnostic::warning(format!("{what} `{name}` is never used")).label(*span, label));
        }
        if !is_model {
            self.stack.pop();
        }
        if out.is_none() {
            self.structure(fwd.span, "`forward` ends without `return`", "this forward", Some("end it with `return h`".into()));
        }
        out
    }

    /// Executes statements; `Some(value)` once a `return` runs.
    fn stmts(&mut self, stmts: &'a [Stmt], scope: &mut Scope) -> Option<Value> {
        for s in stmts {
            match s {
                Stmt::Assign { target, value } => {
                    let v = self.expr(value, scope);
                    if let Some((_, span, false)) = scope.vars.get(&target.name) {
                        let span = *span;
                        self.push(Diagnostic::warning(format!("value assigned to `{}` is never used", target.name)).label(span, "assigned here"));
                    }
                    scope.vars.insert(target.name.clone(), (v, target.span, false));
                }
                Stmt::Return { value, .. } => return Some(self.expr(value, scope)),
                Stmt::If { cond, then, otherwise } => {
                    let r = match self.truth(cond, scope) {
                        Some(true) => self.stmts(then, scope),
                        Some(false) => self.stmts(otherwise, scope),
                        None => Some(Value::Poison),
                    };
                    if r.is_some() {
                        return r;
                    }
                }
                Stmt::For { var, iter, body } => {
                    for v in self.iteration(iter, scope) {
                        if !self.fuel(iter.span) {
                            break;
                        }
                        scope.vars.insert(var.name.clone(), (v, var.span, true));
                        if let Some(r) = self.stmts(body, scope) {
                            return Some(r);
                        }
                    }
                }
                Stmt::Assert { cond, message, span } => self.assert(cond, message.as_ref(), *span, scope),
            }
        }
        None
    }

    fn prim_call(&mut self, id: LinkId, x: NodeIndex, span: Span) -> Value {
        let (decl, path) = (self.links[id].decl, self.links[id].path.clone());
        let kind = match &self.links[id].body {
            Body::Prim(Some(k)) => k.clone(),
            _ => return Value::Poison,
        };
        let in_shape = self.g[x].shape.clone();
        // Chainer infers `None` sizes on the first call; later calls must agree.
        let (op, inferred) = match kind {
            Prim::Conv { mut conv, infer_in } => {
                if infer_in {
                    conv.in_channels = in_shape.first().copied().unwrap_or(0);
                }
                if conv.in_channels % conv.groups != 0 {
                    return self.error(BuildError::Shape {
                        layer: path,
                        message: format!("has groups={} which does not divide {} input channels", conv.groups, conv.in_channels),
                        span,
                        decl: Some(decl),
                    });
                }
                (Op::Conv2d(conv.clone()), infer_in.then_some(Prim::Conv { conv, infer_in: false }))
            }
            Prim::BatchNorm { mut bn, infer } => {
                if infer {
                    bn.channels = in_shape.first().copied().unwrap_or(0);
                }
                (Op::BatchNorm(bn.clone()), infer.then_some(Prim::BatchNorm { bn, infer: false }))
            }
            Prim::Linear { mut linear, infer_in } => {
                if infer_in {
                    linear.in_features = in_shape.iter().product();
                }
                (Op::Linear(linear.clone()), infer_in.then_some(Prim::Linear { linear, infer_in: false }))
            }
        };
        if let Some(k) = inferred {
            self.links[id].body = Body::Prim(Some(k));
        }
        let params = op.params().iter().map(|(suffix, _)| Param::Key(format!("{path}/{suffix}"))).collect();
        self.node(op, vec![x], span, &path, Some(decl), params)
    }

    /// Adds a node after inferring its shape; a shape error is reported against `span`.
    fn node(&mut self, op: Op, inputs: Vec<NodeIndex>, span: Span, layer: &str, decl: Option<Span>, params: Vec<Param>) -> Value {
        if self.g.node_count() >= MAX_NODES {
            return self.structure(span, format!("the model has more than {MAX_NODES} nodes"), "while adding this one", None);
        }
        let shape_error = |message: String| BuildError::Shape { layer: layer.into(), message, span, decl };
        if let Some((name, d)) = op.params().into_iter().find(|(_, d)| elements(d).is_none()) {
            return self.error(shape_error(format!("parameter `{name}` of shape {d:?} has more than {MAX_ELEMENTS} elements")));
        }
        let shapes: Vec<&[usize]> = inputs.iter().map(|i| self.g[*i].shape.as_slice()).collect();
        match op.output_shape(&shapes) {
            Ok(shape) if elements(&shape).is_none() => {
                self.error(shape_error(format!("output {} has more than {MAX_ELEMENTS} elements per sample", Batched(&shape))))
            }
            Ok(shape) => {
                let id = self.g.add_node(Node { kind: Kind::Op(op), shape, span, layer: layer.into(), params, decl, provenance: None });
                for (slot, i) in inputs.into_iter().enumerate() {
                    self.g.add_edge(i, id, slot as u32);
                }
                Value::Tensor(id)
            }
            Err(e) => self.error(shape_error(e.0)),
        }
    }

    /// Warns about links never called: the topmost unused link of each subtree, once per declaration.
    fn unused_links(&mut self, id: LinkId) {
        for (_, child) in self.children(id).to_vec() {
            if !self.links[child].used {
                let (path, decl) = (self.links[child].path.clone(), self.links[child].decl);
                self.push(
                    Diagnostic::warning(format!("link `{path}` is never called")).label(decl, "declared here").note("its parameters are not part of the model"),
                );
            } else {
                self.unused_links(child);
            }
        }
    }
}

/// Element count of a shape, if within [`MAX_ELEMENTS`].
fn elements(d: &[usize]) -> Option<usize> {
    d.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).filter(|&n| n <= MAX_ELEMENTS)
}

/// Keeps only the nodes that reach the output, preserving order (and so topological order).
fn finish(g: &DiGraph<Node, u32>, name: String, inputs: Vec<NodeId>, output: NodeIndex) -> Graph {
    let mut live = vec![false; g.node_count()];
    let mut dfs = petgraph::visit::Dfs::new(petgraph::visit::Reversed(g), output);
    while let Some(n) = dfs.next(petgraph::visit::Reversed(g)) {
        live[n.index()] = true;
    }
    for i in &inputs {
        live[i.0.index()] = true;
    }
    let mut remap = vec![NodeIndex::end(); g.node_count()];
    let pruned = g.filter_map(|i, n| live[i.index()].then(|| n.clone()), |_, e| Some(*e));
    let mut next = 0;
    for (i, l) in live.iter().enumerate() {
        if *l {
            remap[i] = NodeIndex::new(next);
            next += 1;
        }
    }
    let param_specs = param_specs(&pruned);
    Graph { name, g: pruned, inputs: inputs.iter().map(|i| NodeId(remap[i.0.index()])).collect(), output: NodeId(remap[output.index()]), param_specs }
}

/// The span of the argument bound to signature slot `i`, or the call's span when it was defaulted.
fn arg_span(args: &[Arg], sig: &[(&str, Option<Value>)], i: usize, call: Span) -> Span {
    args.iter()
        .enumerate()
        .find(|(pos, a)| match &a.keyword {
            Some(k) => k.name == sig[i].0,
            None => *pos == i,
        })
        .map_or(call, |(_, a)| a.keyword.as_ref().map_or(a.value.span, |k| k.span.to(a.value.span)))
}
