//! AST → [`Graph`]: evaluates a model's link declarations and its `forward` body, inferring every shape.
//!
//! Links and functions are bound by Chainer's signatures and defaults (see the tables `LINKS` and
//! `FUNCTIONS`). Evaluation never stops at the first error: a failed expression becomes `Value::Poison`,
//! which later uses accept silently, so each mistake is reported once.

use super::{Graph, Kind, Node, NodeId};
use crate::diag::{Diagnostic, Span};
use crate::syntax::{Arg, BinOp, Expr, ExprKind, File, Ident, Model, Stmt};
use cnnc_runtime::op::{Axis, BatchNorm, Conv2d, Dims, Linear, Lrn, Pool2d};
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
                let d = d.label(*span, format!("not a known {what}"));
                let d = match suggestion {
                    Some(s) => d.note(format!("did you mean `{s}`?")),
                    None => d,
                };
                if known.is_empty() {
                    d
                } else {
                    d.note(format!("known: {}", known.join(", ")))
                }
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
            Value::Poison => "an erroneous value",
        }
    }
}

/// A declared link, with its input size once known (`None` in Chainer means "infer on first call").
#[derive(Clone, Debug)]
enum LinkKind {
    Conv { conv: Conv2d, infer_in: bool },
    BatchNorm { bn: BatchNorm, infer: bool },
    Linear { linear: Linear, infer_in: bool },
}

struct LinkState {
    name: Ident,
    decl: Span,
    kind: Option<LinkKind>,
    used: bool,
}

/// A function or link signature: (parameter, default). `REQUIRED` marks parameters without a default.
type Signature = &'static [(&'static str, DefaultValue)];

#[derive(Clone, Copy)]
enum DefaultValue {
    Required,
    Int(i64),
    Float(f64),
    Bool(bool),
    None,
}
use DefaultValue::Required as REQUIRED;

const LINKS: &[(&str, Signature)] = &[
    (
        "Convolution2D",
        &[
            ("in_channels", REQUIRED),
            ("out_channels", REQUIRED),
            ("ksize", DefaultValue::None),
            ("stride", DefaultValue::Int(1)),
            ("pad", DefaultValue::Int(0)),
            ("nobias", DefaultValue::Bool(false)),
            ("dilate", DefaultValue::Int(1)),
            ("groups", DefaultValue::Int(1)),
        ],
    ),
    // `decay` only matters for training; accepted so that Chainer code pastes unchanged.
    ("BatchNormalization", &[("size", DefaultValue::None), ("decay", DefaultValue::Float(0.9)), ("eps", DefaultValue::Float(2e-5))]),
    ("Linear", &[("in_size", REQUIRED), ("out_size", DefaultValue::None), ("nobias", DefaultValue::Bool(false))]),
];

const FUNCTIONS: &[(&str, Signature)] = &[
    ("relu", &[("x", REQUIRED)]),
    ("max_pooling_2d", &[("x", REQUIRED), ("ksize", REQUIRED), ("stride", DefaultValue::None), ("pad", DefaultValue::Int(0)), ("cover_all", DefaultValue::Bool(true))]),
    ("average_pooling_2d", &[("x", REQUIRED), ("ksize", REQUIRED), ("stride", DefaultValue::None), ("pad", DefaultValue::Int(0))]),
    (
        "local_response_normalization",
        &[("x", REQUIRED), ("n", DefaultValue::Int(5)), ("k", DefaultValue::Float(2.0)), ("alpha", DefaultValue::Float(1e-4)), ("beta", DefaultValue::Float(0.75))],
    ),
    ("dropout", &[("x", REQUIRED), ("ratio", DefaultValue::Float(0.5))]),
    ("softmax", &[("x", REQUIRED), ("axis", DefaultValue::Int(1))]),
    ("reshape", &[("x", REQUIRED), ("shape", REQUIRED)]),
    ("flatten", &[("x", REQUIRED)]),
    ("concat", &[("xs", REQUIRED), ("axis", DefaultValue::Int(1))]),
];

/// Builds the graph of the (single) model in `file`. On success returns warnings alongside.
pub fn build(file: &File) -> Result<(Graph, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut b = Builder::default();
    for extra in file.models.iter().skip(1) {
        b.error(BuildError::Structure {
            message: "a model file holds one model".into(),
            span: extra.name.span,
            label: "second model here".into(),
            note: Some(format!("the first is `{}`", file.models[0].name.name)),
        });
    }
    let graph = b.model(&file.models[0]);
    match graph {
        Some(g) if !b.diags.iter().any(Diagnostic::is_error) => Ok((g, b.diags)),
        _ => Err(b.diags),
    }
}

#[derive(Default)]
struct Builder {
    g: DiGraph<Node, u32>,
    diags: Vec<Diagnostic>,
    links: Vec<LinkState>,
    /// name → (value, span of the assignment, read since?)
    vars: HashMap<String, (Value, Span, bool)>,
}

impl Builder {
    fn error(&mut self, e: BuildError) {
        self.diags.push(e.diagnostic());
    }

    fn arg_error(&mut self, span: Span, message: impl Into<String>, label: impl Into<String>) -> Value {
        self.error(BuildError::Argument { message: message.into(), span, label: label.into() });
        Value::Poison
    }

    fn model(&mut self, m: &Model) -> Option<Graph> {
        for decl in &m.links {
            if let Some(prev) = self.links.iter().find(|l| l.name.name == decl.name.name) {
                let prev = prev.name.span;
                self.diags.push(
                    Diagnostic::error(format!("link `{}` is declared twice", decl.name.name))
                        .label(decl.name.span, "declared again here")
                        .label(prev, "first declared here"),
                );
                continue;
            }
            let kind = self.link_decl(&decl.value);
            self.links.push(LinkState { name: decl.name.clone(), decl: decl.name.span.to(decl.value.span), kind, used: false });
        }
        let Some(fwd) = &m.forward else {
            self.error(BuildError::Structure {
                message: format!("model `{}` has no `forward`", m.name.name),
                span: m.name.span,
                label: "declared here".into(),
                note: Some("add `forward(x: [C, H, W]) { ... return h }`".into()),
            });
            return None;
        };
        let mut inputs = Vec::new();
        for (i, p) in fwd.params.iter().enumerate() {
            let dims = match &p.shape {
                Some(e) => self.input_shape(e),
                None => {
                    self.error(BuildError::Structure {
                        message: format!("input `{}` has no shape", p.name.name),
                        span: p.name.span,
                        label: "needs a per-sample shape".into(),
                        note: Some(format!("write e.g. `{}: [3, 227, 227]` (the batch axis is implicit)", p.name.name)),
                    });
                    None
                }
            };
            let v = match dims {
                Some(shape) => {
                    let node = Node { kind: Kind::Input(i), shape, span: p.name.span, layer: p.name.name.clone(), params: vec![], decl: None };
                    let id = self.g.add_node(node);
                    inputs.push(NodeId(id));
                    Value::Tensor(id)
                }
                None => Value::Poison,
            };
            self.vars.insert(p.name.name.clone(), (v, p.name.span, false));
        }
        if fwd.params.is_empty() {
            self.error(BuildError::Structure { message: "`forward` takes no input".into(), span: fwd.span, label: "here".into(), note: None });
        }
        let mut output = None;
        for stmt in &fwd.body {
            match stmt {
                Stmt::Assign { target, value } => {
                    let v = self.expr(value);
                    if let Some((_, span, false)) = self.vars.get(&target.name) {
                        self.diags.push(Diagnostic::warning(format!("value assigned to `{}` is never used", target.name)).label(*span, "assigned here"));
                    }
                    self.vars.insert(target.name.clone(), (v, target.span, false));
                }
                Stmt::Return { value, span } => {
                    if output.is_some() {
                        self.error(BuildError::Structure { message: "a second `return`".into(), span: *span, label: "unreachable".into(), note: None });
                        continue;
                    }
                    output = Some((self.expr(value), value.span));
                }
            }
        }
        for (name, (_, span, used)) in &self.vars {
            if !used && !name.starts_with('_') {
                let input = fwd.params.iter().any(|p| &p.name.name == name);
                let (what, label) = if input { ("input", "declared here") } else { ("value assigned to", "assigned here") };
                self.diags.push(Diagnostic::warning(format!("{what} `{name}` is never used")).label(*span, label));
            }
        }
        for l in &self.links {
            if !l.used {
                self.diags.push(
                    Diagnostic::warning(format!("link `{}` is never called", l.name.name))
                        .label(l.name.span, "declared here")
                        .note("its parameters are not part of the model"),
                );
            }
        }
        self.diags.sort_by_key(|d| (d.primary_start(), d.is_error()));
        let out = match output {
            Some((Value::Tensor(id), _)) => id,
            Some((Value::Poison, _)) => return None,
            Some((v, span)) => {
                self.arg_error(span, format!("`forward` must return a tensor, not {}", v.describe()), "returned here");
                return None;
            }
            None => {
                self.error(BuildError::Structure {
                    message: "`forward` has no `return`".into(),
                    span: fwd.span,
                    label: "this forward".into(),
                    note: Some("end it with `return h`".into()),
                });
                return None;
            }
        };
        Some(finish(&self.g, m.name.name.clone(), inputs, out))
    }

    fn input_shape(&mut self, e: &Expr) -> Option<Dims> {
        let v = self.expr(e);
        let dims: Option<Dims> = match &v {
            Value::Tuple(items) => items.iter().map(|d| if let Value::Int(i @ 1..=MAX_DIM) = d { Some(*i as usize) } else { None }).collect(),
            _ => None,
        };
        if let Some(d) = &dims {
            if elements(d).is_none() {
                self.arg_error(e.span, format!("input shape has more than {MAX_ELEMENTS} elements per sample"), "too large");
                return None;
            }
        }
        if dims.is_none() && v != Value::Poison {
            self.arg_error(e.span, "an input shape is a list of positive integers", "like `[3, 227, 227]`");
        }
        dims
    }

    /// Evaluates a link declaration such as `L.Convolution2D(3, 96, 11, stride=4)`.
    fn link_decl(&mut self, e: &Expr) -> Option<LinkKind> {
        let ExprKind::Call { callee, args } = &e.kind else {
            self.arg_error(e.span, format!("a link declaration needs a link constructor, found {}", e.kind.describe()), "e.g. `L.Linear(4096, 1000)`");
            return None;
        };
        let Some(name) = strip_prefix(callee, "L") else {
            let path: Vec<&str> = callee.iter().map(|i| i.name.as_str()).collect();
            self.arg_error(e.span, format!("unknown link constructor `{}`", path.join(".")), "expected `L.Link(...)` or `Link(...)`");
            return None;
        };
        let Some((_, sig)) = LINKS.iter().find(|(n, _)| *n == name.name) else {
            self.unknown("link", name, LINKS.iter().map(|l| l.0));
            return None;
        };
        let v = self.bind(&name.name, sig, args, e.span)?;
        let span_of = |i: usize| arg_span(args, sig, i, e.span);
        match name.name.as_str() {
            "Convolution2D" => {
                // Chainer's two-argument form `Convolution2D(out, ksize)` infers the input channels.
                let (inp, out, k, ks) = match &v[2] {
                    Value::None => (Value::None, v[0].clone(), v[1].clone(), span_of(1)),
                    _ => (v[0].clone(), v[1].clone(), v[2].clone(), span_of(2)),
                };
                if !matches!(v[6], Value::Int(1)) {
                    self.arg_error(span_of(6), "dilated convolutions are not supported", "dilate must be 1");
                }
                let conv = Conv2d {
                    in_channels: if inp == Value::None { 0 } else { self.usize(&inp, span_of(0), "in_channels", 1)? },
                    out_channels: self.usize(&out, span_of(1), "out_channels", 1)?,
                    kernel: self.pair(&k, ks, "ksize", 1)?,
                    stride: self.pair(&v[3], span_of(3), "stride", 1)?,
                    pad: self.pair(&v[4], span_of(4), "pad", 0)?,
                    groups: self.usize(&v[7], span_of(7), "groups", 1)?,
                    bias: !self.bool(&v[5], span_of(5), "nobias")?,
                };
                if conv.out_channels % conv.groups != 0 || (inp != Value::None && conv.in_channels % conv.groups != 0) {
                    self.arg_error(span_of(7), format!("groups={} must divide both channel counts", conv.groups), "here");
                    return None;
                }
                Some(LinkKind::Conv { infer_in: inp == Value::None, conv })
            }
            "BatchNormalization" => {
                let eps = self.float(&v[2], span_of(2), "eps")?;
                if eps <= 0.0 {
                    self.arg_error(span_of(2), "eps must be positive", "here");
                    return None;
                }
                self.float(&v[1], span_of(1), "decay")?;
                let infer = v[0] == Value::None;
                let channels = if infer { 0 } else { self.usize(&v[0], span_of(0), "size", 1)? };
                Some(LinkKind::BatchNorm { bn: BatchNorm { channels, eps }, infer })
            }
            "Linear" => {
                // `Linear(out)` infers the input size, as in Chainer.
                let (inp, out) = if v[1] == Value::None { (Value::None, v[0].clone()) } else { (v[0].clone(), v[1].clone()) };
                let linear = Linear {
                    in_features: if inp == Value::None { 0 } else { self.usize(&inp, span_of(0), "in_size", 1)? },
                    out_features: self.usize(&out, span_of(1), "out_size", 1)?,
                    bias: !self.bool(&v[2], span_of(2), "nobias")?,
                };
                Some(LinkKind::Linear { infer_in: inp == Value::None, linear })
            }
            _ => unreachable!("LINKS and this match list the same names"),
        }
    }

    fn unknown<'a>(&mut self, what: &'static str, name: &Ident, known: impl Iterator<Item = &'a str> + Clone) {
        let suggestion = known.clone().filter(|k| edit_distance(k, &name.name) <= 2.max(name.name.len() / 3)).min_by_key(|k| edit_distance(k, &name.name));
        self.error(BuildError::Unknown {
            what,
            name: name.name.clone(),
            span: name.span,
            suggestion: suggestion.map(str::to_string),
            known: known.map(str::to_string).collect(),
        });
    }

    /// Binds call arguments to a signature: positional, then keyword, then defaults.
    fn bind(&mut self, callee: &str, sig: Signature, args: &[Arg], span: Span) -> Option<Vec<Value>> {
        let mut slots: Vec<Option<Value>> = vec![None; sig.len()];
        let mut ok = true;
        for (i, a) in args.iter().enumerate() {
            let v = self.expr(&a.value);
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
                        self.unknown("keyword", k, sig.iter().map(|(n, _)| *n));
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
                (None, DefaultValue::Required) => {
                    self.arg_error(span, format!("`{callee}` is missing its argument `{name}`"), "in this call");
                    ok = false;
                    Value::Poison
                }
                (None, DefaultValue::Int(i)) => Value::Int(*i),
                (None, DefaultValue::Float(f)) => Value::Float(*f),
                (None, DefaultValue::Bool(b)) => Value::Bool(*b),
                (None, DefaultValue::None) => Value::None,
            });
        }
        (ok && !out.contains(&Value::Poison)).then_some(out)
    }

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
                self.arg_error(span, format!("`{what}` must be {want}, found {}", describe(v)), "here");
                None
            }
        }
    }

    /// An integer or a pair `(h, w)` of integers, each ≥ `min`.
    fn pair(&mut self, v: &Value, span: Span, what: &str, min: i64) -> Option<[usize; 2]> {
        match v {
            Value::Tuple(t) if t.len() == 2 => Some([self.usize(&t[0], span, what, min)?, self.usize(&t[1], span, what, min)?]),
            Value::Int(_) | Value::Poison => self.usize(v, span, what, min).map(|x| [x, x]),
            _ => {
                self.arg_error(span, format!("`{what}` must be an integer or a pair of integers, found {}", v.describe()), "here");
                None
            }
        }
    }

    fn float(&mut self, v: &Value, span: Span, what: &str) -> Option<f64> {
        match v {
            Value::Float(f) if f.is_finite() => Some(*f),
            Value::Int(i) => Some(*i as f64),
            Value::Poison => None,
            _ => {
                self.arg_error(span, format!("`{what}` must be a finite number, found {}", v.describe()), "here");
                None
            }
        }
    }

    fn bool(&mut self, v: &Value, span: Span, what: &str) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            Value::Poison => None,
            _ => {
                self.arg_error(span, format!("`{what}` must be True or False, found {}", v.describe()), "here");
                None
            }
        }
    }

    fn tensor(&mut self, v: &Value, span: Span) -> Option<NodeIndex> {
        match v {
            Value::Tensor(t) => Some(*t),
            Value::Poison => None,
            _ => {
                self.arg_error(span, format!("expected a tensor, found {}", v.describe()), "here");
                None
            }
        }
    }

    fn expr(&mut self, e: &Expr) -> Value {
        match &e.kind {
            ExprKind::Int(i) => Value::Int(*i),
            ExprKind::Float(f) => Value::Float(*f),
            ExprKind::Bool(b) => Value::Bool(*b),
            ExprKind::None => Value::None,
            ExprKind::Str(s) => Value::Str(s.clone()),
            ExprKind::Tuple(items) => Value::Tuple(items.iter().map(|i| self.expr(i)).collect()),
            ExprKind::Path(path) => match path.as_slice() {
                [name] => match self.vars.get_mut(&name.name) {
                    Some((v, _, used)) => {
                        *used = true;
                        v.clone()
                    }
                    None => {
                        let mut known: Vec<String> = self.vars.keys().cloned().collect();
                        known.sort();
                        self.unknown("name", name, known.iter().map(String::as_str));
                        Value::Poison
                    }
                },
                _ => self.arg_error(e.span, "links and functions must be called", "add the arguments in parentheses"),
            },
            ExprKind::Neg(inner) => match self.expr(inner) {
                Value::Int(i) => Value::Int(-i),
                Value::Float(f) => Value::Float(-f),
                Value::Poison => Value::Poison,
                v => self.arg_error(e.span, format!("cannot negate {}", v.describe()), "here"),
            },
            ExprKind::Binary { op, lhs, rhs } => {
                let (a, b) = (self.expr(lhs), self.expr(rhs));
                self.binary(*op, a, b, e.span)
            }
            ExprKind::Call { callee, args } => self.call(callee, args, e.span),
        }
    }

    fn binary(&mut self, op: BinOp, a: Value, b: Value, span: Span) -> Value {
        use Value::*;
        match (op, &a, &b) {
            (_, Poison, _) | (_, _, Poison) => Poison,
            (BinOp::Add, Tensor(x), Tensor(y)) => self.node(Op::Add, vec![*x, *y], span, "+", Option::None, vec![]),
            (_, Int(x), Int(y)) => {
                let r = match op {
                    BinOp::Add => x.checked_add(*y),
                    BinOp::Sub => x.checked_sub(*y),
                    BinOp::Mul => x.checked_mul(*y),
                    BinOp::Div => return if *y == 0 { self.arg_error(span, "division by zero", "here") } else { Float(*x as f64 / *y as f64) },
                    BinOp::FloorDiv => (*y != 0).then(|| x.div_euclid(*y) - if y < &0 && x.rem_euclid(*y) != 0 { 1 } else { 0 }),
                    BinOp::Rem => (*y != 0).then(|| x - y * (x.div_euclid(*y) - if y < &0 && x.rem_euclid(*y) != 0 { 1 } else { 0 })),
                };
                r.map(Int).unwrap_or_else(|| self.arg_error(span, "integer overflow or division by zero", "here"))
            }
            (_, Int(_) | Float(_), Int(_) | Float(_)) => {
                let f = |v: &Value| if let Int(i) = v { *i as f64 } else if let Float(f) = v { *f } else { 0.0 };
                let (x, y) = (f(&a), f(&b));
                Float(match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    BinOp::Div => x / y,
                    BinOp::FloorDiv => (x / y).floor(),
                    BinOp::Rem => x - y * (x / y).floor(),
                })
            }
            _ => self.arg_error(span, format!("unsupported operands: {} and {}", a.describe(), b.describe()), "in this expression"),
        }
    }

    fn call(&mut self, callee: &[Ident], args: &[Arg], span: Span) -> Value {
        let segs: Vec<&str> = callee.iter().map(|i| i.name.as_str()).collect();
        // `self.link(x)` or `link(x)`
        let link_name = match segs.as_slice() {
            ["self", _] => Some(&callee[1]),
            [l] if self.links.iter().any(|s| s.name.name == *l) => Some(&callee[0]),
            _ => None,
        };
        if let Some(name) = link_name {
            return self.link_call(name, args, span);
        }
        let known_fn = strip_prefix(callee, "F").and_then(|n| FUNCTIONS.iter().find(|(f, _)| *f == n.name));
        if known_fn.is_none() {
            // Evaluate the arguments anyway: their errors and uses still count.
            for a in args {
                self.expr(&a.value);
            }
        }
        let Some(name) = strip_prefix(callee, "F") else {
            return self.arg_error(span, format!("unknown callee `{}`", segs.join(".")), "expected `F.function`, `self.link` or a plain name");
        };
        let Some((fname, sig)) = FUNCTIONS.iter().find(|(n, _)| *n == name.name) else {
            let links: Vec<String> = self.links.iter().map(|l| format!("self.{}", l.name.name)).collect();
            let known = FUNCTIONS.iter().map(|f| f.0).chain(links.iter().map(String::as_str)).collect::<Vec<_>>();
            self.unknown("function or link", name, known.into_iter());
            return Value::Poison;
        };
        let Some(v) = self.bind(fname, sig, args, span) else { return Value::Poison };
        let sp = |i: usize| arg_span(args, sig, i, span);
        let layer = format!("F.{fname}");
        let op = match *fname {
            "relu" => Some(Op::Relu),
            "max_pooling_2d" | "average_pooling_2d" => (|| {
                let kernel = self.pair(&v[1], sp(1), "ksize", 1)?;
                let stride = if v[2] == Value::None { kernel } else { self.pair(&v[2], sp(2), "stride", 1)? };
                let pad = self.pair(&v[3], sp(3), "pad", 0)?;
                if *fname == "max_pooling_2d" {
                    let cover_all = self.bool(&v[4], sp(4), "cover_all")?;
                    Some(Op::MaxPool2d(Pool2d { kernel, stride, pad, cover_all }))
                } else {
                    Some(Op::AvgPool2d(Pool2d { kernel, stride, pad, cover_all: false }))
                }
            })(),
            "local_response_normalization" => (|| {
                let n = self.usize(&v[1], sp(1), "n", 1)?;
                Some(Op::Lrn(Lrn { n, k: self.float(&v[2], sp(2), "k")?, alpha: self.float(&v[3], sp(3), "alpha")?, beta: self.float(&v[4], sp(4), "beta")? }))
            })(),
            "dropout" => match self.float(&v[1], sp(1), "ratio") {
                Some(r) if (0.0..1.0).contains(&r) => Some(Op::Dropout { ratio: r }),
                Some(_) => {
                    self.arg_error(sp(1), "dropout ratio must be in [0, 1)", "here");
                    None
                }
                None => None,
            },
            "softmax" => self.usize(&v[1], sp(1), "axis", 0).map(|a| Op::Softmax { axis: Axis(a) }),
            "flatten" => {
                let x = self.tensor(&v[0], sp(0));
                x.map(|x| Op::Reshape { dims: vec![self.g[x].shape.iter().product()] })
            }
            "reshape" => self.reshape_op(&v, sp(1)),
            "concat" => {
                let Value::Tuple(items) = &v[0] else {
                    return match v[0] {
                        Value::Poison => Value::Poison,
                        _ => self.arg_error(sp(0), "`concat` takes a tuple of tensors", "e.g. `(a, b)`"),
                    };
                };
                let ins: Option<Vec<NodeIndex>> = items.clone().iter().map(|t| self.tensor(t, sp(0))).collect();
                let (Some(ins), Some(axis)) = (ins, self.usize(&v[1], sp(1), "axis", 0)) else { return Value::Poison };
                if ins.is_empty() {
                    return self.arg_error(sp(0), "`concat` needs at least one tensor", "empty");
                }
                return self.node(Op::Concat { axis: Axis(axis) }, ins, span, &layer, None, vec![]);
            }
            _ => unreachable!("FUNCTIONS and this match list the same names"),
        };
        match (op, self.tensor(&v[0], sp(0))) {
            (Some(op), Some(x)) => self.node(op, vec![x], span, &layer, None, vec![]),
            _ => Value::Poison,
        }
    }

    /// `reshape(x, (-1, d1, d2, ...))`: Chainer's full shape; the batch entry must be −1 (it is symbolic).
    fn reshape_op(&mut self, v: &[Value], span: Span) -> Option<Op> {
        let dims = match &v[1] {
            Value::Tuple(t) if t.first() == Some(&Value::Int(-1)) && t.len() >= 2 => {
                t[1..].iter().map(|d| if let Value::Int(i @ 1..) = d { Some(*i as usize) } else { None }).collect::<Option<Dims>>()
            }
            Value::Poison => return None,
            _ => None,
        };
        match dims {
            Some(dims) => Some(Op::Reshape { dims }),
            None => {
                self.error(BuildError::Structure {
                    message: "`reshape` needs a shape `(-1, d1, d2, ...)` with positive d's".into(),
                    span,
                    label: "here".into(),
                    note: Some("the batch axis is symbolic, so the first entry must be -1".into()),
                });
                None
            }
        }
    }

    fn link_call(&mut self, name: &Ident, args: &[Arg], span: Span) -> Value {
        let Some(idx) = self.links.iter().position(|l| l.name.name == name.name) else {
            let known: Vec<String> = self.links.iter().map(|l| l.name.name.clone()).collect();
            self.unknown("link", name, known.iter().map(String::as_str));
            return Value::Poison;
        };
        self.links[idx].used = true;
        let (decl, lname) = (self.links[idx].decl, name.name.clone());
        if args.len() != 1 || args[0].keyword.is_some() {
            for a in args {
                self.expr(&a.value);
            }
            return self.arg_error(span, format!("link `{lname}` takes exactly one positional input"), "in this call");
        }
        let x = self.expr(&args[0].value);
        let Some(x) = self.tensor(&x, args[0].value.span) else { return Value::Poison };
        let Some(kind) = self.links[idx].kind.clone() else { return Value::Poison };
        let in_shape = self.g[x].shape.clone();
        // Chainer infers `None` sizes on the first call; later calls must agree.
        let (op, infer) = match kind {
            LinkKind::Conv { mut conv, infer_in } => {
                if infer_in {
                    conv.in_channels = in_shape.first().copied().unwrap_or(0);
                }
                if conv.in_channels % conv.groups != 0 {
                    return self.shape_error(&lname, format!("has groups={} which does not divide {} input channels", conv.groups, conv.in_channels), span, Some(decl));
                }
                (Op::Conv2d(conv.clone()), infer_in.then_some(LinkKind::Conv { conv, infer_in: false }))
            }
            LinkKind::BatchNorm { mut bn, infer } => {
                if infer {
                    bn.channels = in_shape.first().copied().unwrap_or(0);
                }
                (Op::BatchNorm(bn.clone()), infer.then_some(LinkKind::BatchNorm { bn, infer: false }))
            }
            LinkKind::Linear { mut linear, infer_in } => {
                if infer_in {
                    linear.in_features = in_shape.iter().product();
                }
                (Op::Linear(linear.clone()), infer_in.then_some(LinkKind::Linear { linear, infer_in: false }))
            }
        };
        if let Some(k) = infer {
            self.links[idx].kind = Some(k);
        }
        let params = op.params().iter().map(|(suffix, _)| format!("{lname}/{suffix}")).collect();
        self.node(op, vec![x], span, &lname, Some(decl), params)
    }

    fn shape_error(&mut self, layer: &str, message: String, span: Span, decl: Option<Span>) -> Value {
        self.error(BuildError::Shape { layer: layer.into(), message, span, decl });
        Value::Poison
    }

    /// Adds a node after inferring its shape; a shape error is reported against `span`.
    fn node(&mut self, op: Op, inputs: Vec<NodeIndex>, span: Span, layer: &str, decl: Option<Span>, params: Vec<String>) -> Value {
        let shapes: Vec<&[usize]> = inputs.iter().map(|i| self.g[*i].shape.as_slice()).collect();
        let too_big = op.params().into_iter().find(|(_, d)| elements(d).is_none());
        if let Some((name, d)) = too_big {
            return self.shape_error(layer, format!("parameter `{name}` of shape {d:?} has more than {MAX_ELEMENTS} elements"), span, decl);
        }
        match op.output_shape(&shapes) {
            Ok(shape) if elements(&shape).is_none() => {
                self.shape_error(layer, format!("output {} has more than {MAX_ELEMENTS} elements per sample", cnnc_runtime::op::Batched(&shape)), span, decl)
            }
            Ok(shape) => {
                let id = self.g.add_node(Node { kind: Kind::Op(op), shape, span, layer: layer.into(), params, decl });
                for (slot, i) in inputs.into_iter().enumerate() {
                    self.g.add_edge(i, id, slot as u32);
                }
                Value::Tensor(id)
            }
            Err(e) => self.shape_error(layer, e.0, span, decl),
        }
    }
}

/// Largest integer argument (sizes, strides, ...): keeps every shape computation far from overflow.
const MAX_DIM: i64 = 1 << 31;
/// Largest tensor or parameter, in elements per sample (16 GiB of f32).
const MAX_ELEMENTS: usize = 1 << 32;

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
    let pruned = g.filter_map(
        |i, n| live[i.index()].then(|| n.clone()),
        |_, e| Some(*e),
    );
    let mut next = 0;
    for (i, l) in live.iter().enumerate() {
        if *l {
            remap[i] = NodeIndex::new(next);
            next += 1;
        }
    }
    Graph { name, g: pruned, inputs: inputs.iter().map(|i| NodeId(remap[i.0.index()])).collect(), output: NodeId(remap[output.index()]) }
}

/// `L.Linear` → `Linear`, `Linear` → `Linear`; any other prefix is not a name of this namespace.
fn strip_prefix<'a>(path: &'a [Ident], ns: &str) -> Option<&'a Ident> {
    match path {
        [n] => Some(n),
        [p, n] if p.name == ns => Some(n),
        _ => None,
    }
}

/// The span of the argument bound to signature slot `i`, or the call's span when it was defaulted.
fn arg_span(args: &[Arg], sig: Signature, i: usize, call: Span) -> Span {
    args.iter()
        .enumerate()
        .find(|(pos, a)| match &a.keyword {
            Some(k) => k.name == sig[i].0,
            None => *pos == i,
        })
        .map_or(call, |(_, a)| a.keyword.as_ref().map_or(a.value.span, |k| k.span.to(a.value.span)))
}

fn describe(v: &Value) -> String {
    match v {
        Value::Int(i) => format!("{i}"),
        other => other.describe().into(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != b[j])).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
