//! Syntax: model text → AST.
//!
//! Owns the lexer ([`lex`]), the recursive-descent parser ([`parse`]) and the AST. It accepts the DSL
//! described in `docs/dsl.md`: Python-like, newlines end statements except inside brackets, `#` comments,
//! tabs and CRLF. Invariant left: every AST node carries the span (file and bytes) it came from; a file
//! that parses has no expression or block nesting deeper than [`MAX_DEPTH`], so later recursive passes
//! cannot overflow the stack. Errors never stop at the first: the parser resynchronises at
//! the next statement and reports all of them.

mod ast;
mod lexer;
mod parser;

pub use ast::*;
pub use lexer::{lex, Tok, Token};
pub use parser::parse;

use crate::diag::{Diagnostic, Span};

/// Deepest expression and block nesting the parser accepts (the parser recurses once per level).
pub const MAX_DEPTH: usize = 64;
/// Deepest expression tree (operators, calls, indexing and brackets together) that the parser builds:
/// the recursive passes after parsing, and `Drop`, go at most this deep.
pub const MAX_TREE: usize = 512;
/// The longest name, in characters: longer ones are not written by people, and every message that
/// quotes a name stays readable.
pub const MAX_NAME: usize = 256;

#[derive(Clone, Debug, thiserror::Error)]
pub enum SyntaxError {
    /// A run of `count` characters the language has no use for, starting with `ch` (a file of NUL
    /// bytes is one error, not a million).
    #[error("unexpected character{} `{}`{}", if *.count > 1 { "s" } else { "" }, .ch.escape_debug(), if *.count > 1 { format!(" and {} more", .count - 1) } else { String::new() })]
    UnexpectedChar { ch: char, count: usize, span: Span },
    #[error("unterminated string literal")]
    UnterminatedString { span: Span },
    #[error("invalid number `{text}`: {reason}")]
    BadNumber { text: String, reason: String, span: Span },
    #[error("expected {expected}, found {found}")]
    Expected { expected: String, found: String, span: Span },
    #[error("unmatched `{close}`")]
    Unmatched { close: char, span: Span },
    /// Python that Chainer users paste (`class M(chainer.Chain):`, `def forward(self, x):`, …).
    #[error("{what} is Python, not the model language")]
    Python { what: &'static str, hint: &'static str, span: Span },
    #[error("expression nested more than {MAX_DEPTH} levels deep")]
    TooDeep { span: Span },
    #[error("expression more than {MAX_TREE} operations deep")]
    TooLong { span: Span },
    #[error("a name of {chars} characters; names are at most {MAX_NAME}")]
    LongName { chars: usize, span: Span },
    /// The parser stopped after this many errors (a note, not an error).
    #[error("cnnc stops reading a file after {} syntax errors", parser::MAX_ERRORS)]
    GaveUp { span: Span },
}

impl SyntaxError {
    pub fn span(&self) -> Span {
        match self {
            SyntaxError::UnexpectedChar { span, .. }
            | SyntaxError::UnterminatedString { span }
            | SyntaxError::BadNumber { span, .. }
            | SyntaxError::Expected { span, .. }
            | SyntaxError::Unmatched { span, .. }
            | SyntaxError::Python { span, .. }
            | SyntaxError::TooDeep { span }
            | SyntaxError::TooLong { span }
            | SyntaxError::LongName { span, .. }
            | SyntaxError::GaveUp { span } => *span,
        }
    }

    pub fn diagnostic(&self) -> Diagnostic {
        if let SyntaxError::GaveUp { .. } = self {
            return Diagnostic::note_level(self.to_string());
        }
        let d = Diagnostic::error(self.to_string());
        match self {
            SyntaxError::UnexpectedChar { span, .. } => d.label(*span, "not part of the model language"),
            SyntaxError::UnterminatedString { span } => d.label(*span, "string starts here").note("strings end with the same quote on the same line"),
            SyntaxError::BadNumber { span, .. } => d.label(*span, "here"),
            SyntaxError::Expected { span, expected, found } => {
                let d = d.label(*span, format!("expected {expected}"));
                // An argument or element where a closing bracket was expected: two of them side by side.
                let operand =
                    found.starts_with("string ") || found.strip_prefix('`').and_then(|f| f.chars().next()).is_some_and(|c| c.is_alphanumeric() || c == '_');
                if operand && (expected.contains("`)`") || expected.contains("`]`")) {
                    d.note("missing comma?")
                } else {
                    d
                }
            }
            SyntaxError::Python { span, hint, .. } => d.label(*span, "written as in Chainer's Python").note(*hint).note("the model language: docs/dsl.md"),
            SyntaxError::Unmatched { span, .. } => d.label(*span, "no matching opening bracket"),
            SyntaxError::TooDeep { span } | SyntaxError::TooLong { span } => d.label(*span, "this expression").note("split it into several statements"),
            SyntaxError::LongName { span, .. } => d.label(*span, "this name"),
            SyntaxError::GaveUp { .. } => d,
        }
    }
}
