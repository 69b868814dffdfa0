//! The abstract syntax tree. Every node keeps its source [`Span`].

use crate::diag::Span;

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A source file: `model`, `chain` and `chainlist` items.
#[derive(Clone, Debug, PartialEq)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemKind {
    /// The network: `model Name { ... }`; its forward inputs declare shapes.
    Model,
    /// A `chainer.Chain`: named child links and a forward.
    Chain,
    /// A `chainer.ChainList`: children numbered 0, 1, ...; without a forward, calls them in sequence.
    ChainList,
}

/// `chain Name(param, kw=default) { declarations... forward(...) { ... } }`
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub kind: ItemKind,
    pub name: Ident,
    pub params: Vec<ParamDecl>,
    pub body: Vec<Decl>,
    pub forward: Option<Forward>,
    pub span: Span,
}

/// A chain parameter with its optional default.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamDecl {
    pub name: Ident,
    pub default: Option<Expr>,
}

/// What an item body holds, evaluated once per instance (at compile time).
#[derive(Clone, Debug, PartialEq)]
pub enum Decl {
    /// `conv1 = L.Convolution2D(...)` (a child link) or `mid = ch * 2` (a constant).
    Assign {
        name: Ident,
        value: Expr,
    },
    /// A bare link expression in a `chainlist`: the next numbered child.
    Child(Expr),
    If {
        cond: Expr,
        then: Vec<Decl>,
        otherwise: Vec<Decl>,
    },
    For {
        var: Ident,
        iter: Expr,
        body: Vec<Decl>,
    },
    Assert {
        cond: Expr,
        message: Option<Expr>,
        span: Span,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Forward {
    pub params: Vec<Param>,
    pub body: Vec<Stmt>,
    pub span: Span,
}

/// A forward input: `x: [3, 227, 227]` (per-sample shape; required on a model, absent on chains).
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: Ident,
    pub shape: Option<Expr>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Assign { target: Ident, value: Expr },
    Return { value: Expr, span: Span },
    If { cond: Expr, then: Vec<Stmt>, otherwise: Vec<Stmt> },
    For { var: Ident, iter: Expr, body: Vec<Stmt> },
    Assert { cond: Expr, message: Option<Expr>, span: Span },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
    /// Height of the expression tree (a leaf is 1); the parser bounds it, so passes may recurse.
    pub depth: usize,
}

impl Expr {
    pub fn new(kind: ExprKind, span: Span) -> Expr {
        let below = match &kind {
            ExprKind::Tuple(items) => items.iter().map(|e| e.depth).max().unwrap_or(0),
            ExprKind::Call { callee, args } => args.iter().map(|a| a.value.depth).chain([callee.depth]).max().unwrap_or(0),
            ExprKind::Index { base, index } => base.depth.max(index.depth),
            ExprKind::Binary { lhs, rhs, .. } => lhs.depth.max(rhs.depth),
            ExprKind::Neg(x) | ExprKind::Not(x) => x.depth,
            _ => 0,
        };
        Expr { kind, span, depth: below + 1 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    None,
    /// A dotted name: `h`, `self.conv1`, `F.relu`.
    Path(Vec<Ident>),
    /// `(a, b)` or `[a, b]`; a parenthesised single expression without a comma is not a tuple.
    Tuple(Vec<Expr>),
    Call {
        callee: Box<Expr>,
        args: Vec<Arg>,
    },
    Index {
        base: Box<Expr>,
        index: Box<Expr>,
    },
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    Neg(Box<Expr>),
    Not(Box<Expr>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    pub keyword: Option<Ident>,
    pub value: Expr,
}

impl ExprKind {
    /// What the expression is, for messages ("an integer", "a call").
    pub fn describe(&self) -> &'static str {
        match self {
            ExprKind::Int(_) => "an integer",
            ExprKind::Float(_) => "a float",
            ExprKind::Str(_) => "a string",
            ExprKind::Bool(_) => "a boolean",
            ExprKind::None => "None",
            ExprKind::Path(_) => "a name",
            ExprKind::Tuple(_) => "a tuple",
            ExprKind::Call { .. } => "a call",
            ExprKind::Index { .. } => "an index expression",
            ExprKind::Binary { .. } | ExprKind::Neg(_) | ExprKind::Not(_) => "an operator expression",
        }
    }
}
