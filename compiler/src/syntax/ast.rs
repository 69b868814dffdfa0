//! The abstract syntax tree. Every node keeps its source [`Span`].

use crate::diag::Span;

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A source file: one or more `model` blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct File {
    pub models: Vec<Model>,
}

/// `model Name { links... forward(...) { ... } }`
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub name: Ident,
    pub links: Vec<LinkDecl>,
    pub forward: Option<Forward>,
    pub span: Span,
}

/// `conv1 = L.Convolution2D(3, 96, 11, stride=4)`
#[derive(Clone, Debug, PartialEq)]
pub struct LinkDecl {
    pub name: Ident,
    pub value: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Forward {
    pub params: Vec<Param>,
    pub body: Vec<Stmt>,
    pub span: Span,
}

/// A forward input: `x: [3, 227, 227]` (the per-sample shape; the batch axis is implicit).
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: Ident,
    pub shape: Option<Expr>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Assign { target: Ident, value: Expr },
    Return { value: Expr, span: Span },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Rem,
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
    Call { callee: Vec<Ident>, args: Vec<Arg> },
    Binary { op: BinOp, lhs: Box<Expr>, rhs: Box<Expr> },
    Neg(Box<Expr>),
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
            ExprKind::Binary { .. } | ExprKind::Neg(_) => "an arithmetic expression",
        }
    }
}
