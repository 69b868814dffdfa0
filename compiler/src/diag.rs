//! Diagnostics: what every stage reports to the user, rendered rustc-style by `codespan-reporting`.
//!
//! Each stage has its own `thiserror` enum; each error converts to a [`Diagnostic`] carrying a message,
//! labelled spans (the first is primary: the caret) and notes. Errors without a source location
//! (a corrupt weights file, say) are diagnostics with no labels.

use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label, Severity};
use codespan_reporting::files::SimpleFiles;
use codespan_reporting::term::{self, termcolor};

/// Which source a span points into.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u8);

impl FileId {
    /// The user's model file.
    pub const MODEL: FileId = FileId(0);
    /// The bundled prelude (`L.Inception` and the other built-in composite links).
    pub const PRELUDE: FileId = FileId(1);
}

/// A byte range in one source file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: FileId,
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(file: FileId, start: usize, end: usize) -> Self {
        Span { file, start, end }
    }
    /// The span from the start of `self` to the end of `other` (same file).
    pub fn to(self, other: Span) -> Span {
        Span::new(self.file, self.start.min(other.start), self.end.max(other.end))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Error,
    Warning,
    Note,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub level: Level,
    pub message: String,
    /// (span, label); the first is the primary label.
    pub labels: Vec<(Span, String)>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Self {
        Diagnostic { level: Level::Error, message: message.into(), labels: vec![], notes: vec![] }
    }
    pub fn warning(message: impl Into<String>) -> Self {
        Diagnostic { level: Level::Warning, ..Self::error(message) }
    }
    pub fn note_level(message: impl Into<String>) -> Self {
        Diagnostic { level: Level::Note, ..Self::error(message) }
    }
    pub fn label(mut self, span: Span, text: impl Into<String>) -> Self {
        self.labels.push((span, text.into()));
        self
    }
    pub fn note(mut self, text: impl Into<String>) -> Self {
        self.notes.push(text.into());
        self
    }
    /// Sort key: the primary label's position (model file first), unlabelled last.
    pub fn primary_start(&self) -> usize {
        self.labels.first().map_or(usize::MAX, |(s, _)| ((s.file.0 as usize) << 48) + s.start)
    }
    pub fn is_error(&self) -> bool {
        self.level == Level::Error
    }
}

/// The sources diagnostics point into: the model file and the bundled prelude.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub text: String,
}

impl Source {
    /// A model text as editors save it: a UTF-8 byte-order mark (Windows editors) is dropped, and a lone
    /// `\r` (classic Mac line ends) becomes `\n`, so that lines and columns come out as the user sees them.
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        let text: String = text.into();
        let text = match text.strip_prefix('\u{feff}') {
            Some(rest) => rest.to_string(),
            None => text,
        };
        let mut chars = text.chars().peekable();
        let mut normal = String::with_capacity(text.len());
        while let Some(c) = chars.next() {
            normal.push(if c == '\r' && chars.peek() != Some(&'\n') { '\n' } else { c });
        }
        Source { name: name.into(), text: normal }
    }

    fn file(&self, id: FileId) -> (&str, &str) {
        if id == FileId::PRELUDE {
            ("<prelude>", crate::PRELUDE)
        } else {
            (&self.name, &self.text)
        }
    }

    /// 1-based `line:column` of a span's start.
    pub fn line_col(&self, span: Span) -> (usize, usize) {
        let text = self.file(span.file).1;
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map_or(before.chars().count(), |nl| before[nl + 1..].chars().count()) + 1;
        (line, col)
    }

    /// `name:line:column` of a span's start.
    pub fn location(&self, span: Span) -> String {
        let (line, col) = self.line_col(span);
        format!("{}:{line}:{col}", self.file(span.file).0)
    }

    fn files(&self) -> SimpleFiles<&str, &str> {
        let mut files = SimpleFiles::new();
        for id in [FileId::MODEL, FileId::PRELUDE] {
            let (name, text) = self.file(id);
            let got = files.add(name, text);
            debug_assert_eq!(got, id.0 as usize);
        }
        files
    }

    fn to_codespan(&self, d: &Diagnostic) -> CsDiagnostic<usize> {
        let severity = match d.level {
            Level::Error => Severity::Error,
            Level::Warning => Severity::Warning,
            Level::Note => Severity::Note,
        };
        let clamp = |s: Span| {
            let len = self.file(s.file).1.len();
            s.start.min(len)..s.end.min(len).max(s.start.min(len))
        };
        let labels = d
            .labels
            .iter()
            .enumerate()
            .map(|(i, (s, m))| {
                let id = s.file.0 as usize;
                if i == 0 { Label::primary(id, clamp(*s)) } else { Label::secondary(id, clamp(*s)) }.with_message(m)
            })
            .collect();
        CsDiagnostic::new(severity).with_message(&d.message).with_labels(labels).with_notes(d.notes.clone())
    }

    /// Renders diagnostics as plain text (for tests and files).
    pub fn render_plain(&self, diags: &[Diagnostic]) -> String {
        let files = self.files();
        let config = term::Config::default();
        diags.iter().map(|d| term::emit_into_string(&config, &files, &self.to_codespan(d)).unwrap_or_else(|_| d.message.clone())).collect()
    }

    /// Renders diagnostics to stderr, coloured when stderr is a terminal.
    pub fn emit(&self, diags: &[Diagnostic]) {
        use std::io::IsTerminal;
        let choice = if std::io::stderr().is_terminal() { termcolor::ColorChoice::Auto } else { termcolor::ColorChoice::Never };
        let mut out = termcolor::StandardStream::stderr(choice);
        let files = self.files();
        let config = term::Config::default();
        for d in diags {
            if term::emit_to_write_style(&mut out, &config, &files, &self.to_codespan(d)).is_err() {
                eprintln!("{:?}: {}", d.level, d.message);
            }
        }
    }
}

/// A stage failed; the diagnostics say why (warnings may be among them).
#[derive(Debug, thiserror::Error)]
#[error("{} error(s)", .0.iter().filter(|d| d.is_error()).count())]
pub struct Failed(pub Vec<Diagnostic>);
