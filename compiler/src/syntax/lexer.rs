//! The lexer: text → tokens. Newlines are tokens, except inside `()` and `[]` (as in Python).

use super::{SyntaxError, MAX_NAME};
use crate::diag::{FileId, Span};

#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    Ident(String),
    Int(i64),
    Float(f64),
    Str(String),
    /// One of [`PUNCTS`].
    Punct(&'static str),
    Newline,
    Eof,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub tok: Tok,
    pub span: Span,
}

impl Tok {
    pub fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Int(i) => format!("`{i}`"),
            Tok::Float(f) => format!("`{f}`"),
            Tok::Str(s) => format!("string {s:?}"),
            Tok::Punct(p) => format!("`{p}`"),
            Tok::Newline => "end of line".into(),
            Tok::Eof => "end of file".into(),
        }
    }
}

/// Longest first, so that `//` wins over `/` and `==` over `=`.
pub(super) const PUNCTS: [&str; 22] = ["//", "==", "!=", "<=", ">=", "(", ")", "[", "]", "{", "}", ",", "=", ":", ".", "+", "-", "*", "/", "%", "<", ">"];

/// Splits `src` into tokens, collecting every lexical error.
pub fn lex(src: &str, file: FileId) -> (Vec<Token>, Vec<SyntaxError>) {
    let (mut toks, mut errs, mut depth) = (Vec::new(), Vec::new(), 0usize);
    let bytes = src.as_bytes();
    let mut i = 0;
    while i < src.len() {
        let c = src[i..].chars().next().expect("in bounds");
        let start = i;
        let span = |end: usize| Span::new(file, start, end);
        match c {
            '\n' => {
                i += 1;
                if depth == 0 && !matches!(toks.last(), Some(Token { tok: Tok::Newline, .. }) | None) {
                    toks.push(Token { tok: Tok::Newline, span: Span::new(file, start, start) });
                }
                continue;
            }
            c if c.is_whitespace() => i += c.len_utf8(),
            '#' => i += src[i..].find('\n').unwrap_or(src.len() - i),
            '"' | '\'' => {
                let end = src[i + 1..].find([c, '\n']).map(|e| i + 1 + e);
                match end {
                    Some(e) if bytes[e] as char == c => {
                        toks.push(Token { tok: Tok::Str(src[i + 1..e].to_string()), span: span(e + 1) });
                        i = e + 1;
                    }
                    _ => {
                        errs.push(SyntaxError::UnterminatedString { span: span(i + 1) });
                        i = end.unwrap_or(src.len());
                    }
                }
            }
            c if c.is_ascii_digit() || (c == '.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)) => {
                let mut j = i;
                let mut float = false;
                while j < src.len() {
                    let b = bytes[j];
                    if b.is_ascii_digit() || b == b'_' {
                        j += 1;
                    } else if b == b'.' && !float {
                        float = true;
                        j += 1;
                    } else if (b == b'e' || b == b'E') && j > i {
                        float = true;
                        j += 1;
                        if matches!(bytes.get(j), Some(b'+' | b'-')) {
                            j += 1;
                        }
                    } else {
                        break;
                    }
                }
                let text = src[i..j].replace('_', "");
                let tok = if float {
                    text.parse::<f64>().map(Tok::Float).map_err(|e| e.to_string())
                } else {
                    text.parse::<i64>().map(Tok::Int).map_err(|_| "does not fit in a 64-bit integer".to_string())
                };
                match tok {
                    Ok(t) => toks.push(Token { tok: t, span: span(j) }),
                    Err(reason) => errs.push(SyntaxError::BadNumber { text: src[i..j].into(), reason, span: span(j) }),
                }
                i = j;
            }
            c if c.is_alphabetic() || c == '_' => {
                let len = src[i..].find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(src.len() - i);
                let chars = src[i..i + len].chars().count();
                if chars > MAX_NAME {
                    // The span covers the allowed part: the message need not underline 100,000 characters.
                    let allowed = src[i..].char_indices().nth(MAX_NAME).map_or(len, |(b, _)| b);
                    errs.push(SyntaxError::LongName { chars, span: span(i + allowed) });
                }
                toks.push(Token { tok: Tok::Ident(src[i..i + len].to_string()), span: span(i + len) });
                i += len;
            }
            _ => match PUNCTS.iter().find(|p| src[i..].starts_with(**p)) {
                Some(p) => {
                    match *p {
                        "(" | "[" => depth += 1,
                        ")" | "]" => depth = depth.saturating_sub(1),
                        _ => {}
                    }
                    i += p.len();
                    toks.push(Token { tok: Tok::Punct(p), span: span(i) });
                }
                None => {
                    i += c.len_utf8();
                    match errs.last_mut() {
                        Some(SyntaxError::UnexpectedChar { count, span: s, .. }) if s.end == start => {
                            *count += 1;
                            s.end = i;
                        }
                        _ => errs.push(SyntaxError::UnexpectedChar { ch: c, count: 1, span: span(i) }),
                    }
                }
            },
        }
    }
    toks.push(Token { tok: Tok::Eof, span: Span::new(file, src.len(), src.len()) });
    (toks, errs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(src: &str) -> Vec<Tok> {
        let (t, e) = lex(src, FileId::MODEL);
        assert!(e.is_empty(), "{e:?}");
        t.into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn numbers_and_newlines() {
        use Tok::*;
        assert_eq!(
            toks("a = f(1,\r\n\t2e-5, .5) # c\n\nb // 2\n"),
            vec![
                Ident("a".into()),
                Punct("="),
                Ident("f".into()),
                Punct("("),
                Int(1),
                Punct(","),
                Float(2e-5),
                Punct(","),
                Float(0.5),
                Punct(")"),
                Newline,
                Ident("b".into()),
                Punct("//"),
                Int(2),
                Newline,
                Eof
            ]
        );
    }

    #[test]
    fn errors_are_collected() {
        let (_, e) = lex("a = $ + 99999999999999999999 + 'x\n", FileId::MODEL);
        assert_eq!(e.len(), 3, "{e:?}");
    }
}
