//! Recursive-descent parser: tokens → [`File`]. Resynchronises at the next line after an error.

use super::*;
use crate::diag::Span;

pub fn parse(src: &str) -> Result<File, Vec<SyntaxError>> {
    let (toks, mut errs) = lex(src);
    let mut p = Parser { toks, pos: 0, errs: Vec::new(), depth: 0 };
    let file = p.file();
    // A line the lexer already rejected would only add follow-on parse errors.
    let line_of = |at: usize| src[..at.min(src.len())].matches('\n').count();
    let bad_lines: Vec<usize> = errs.iter().map(|e| line_of(e.diagnostic().primary_start())).collect();
    errs.extend(p.errs.into_iter().filter(|e| !bad_lines.contains(&line_of(e.diagnostic().primary_start()))));
    if errs.is_empty() {
        Ok(file)
    } else {
        errs.sort_by_key(|e| e.diagnostic().primary_start());
        Err(errs)
    }
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
    errs: Vec<SyntaxError>,
    depth: usize,
}

type PResult<T> = Result<T, SyntaxError>;

impl Parser {
    fn peek(&self) -> &Token {
        &self.toks[self.pos]
    }
    fn peek_at(&self, n: usize) -> &Tok {
        &self.toks[(self.pos + n).min(self.toks.len() - 1)].tok
    }
    fn bump(&mut self) -> Token {
        let t = self.toks[self.pos].clone();
        if t.tok != Tok::Eof {
            self.pos += 1;
        }
        t
    }
    fn at(&self, p: &str) -> bool {
        self.peek().tok == Tok::Punct(match_punct(p))
    }
    fn at_word(&self, w: &str) -> bool {
        matches!(&self.peek().tok, Tok::Ident(s) if s == w)
    }
    fn eat(&mut self, p: &str) -> bool {
        let hit = self.at(p);
        if hit {
            self.bump();
        }
        hit
    }
    fn expected<T>(&self, what: &str) -> PResult<T> {
        let t = self.peek();
        Err(SyntaxError::Expected { expected: what.into(), found: t.tok.describe(), span: t.span })
    }
    fn expect(&mut self, p: &str) -> PResult<Span> {
        if self.at(p) {
            Ok(self.bump().span)
        } else {
            self.expected(&format!("`{p}`"))
        }
    }
    fn ident(&mut self, what: &str) -> PResult<Ident> {
        match self.peek().tok.clone() {
            Tok::Ident(name) => Ok(Ident { name, span: self.bump().span }),
            _ => self.expected(what),
        }
    }
    fn newlines(&mut self) {
        while self.peek().tok == Tok::Newline {
            self.bump();
        }
    }
    /// Ends a statement: a newline, or a closing `}` that the caller consumes.
    fn end_of_line(&mut self) -> PResult<()> {
        match self.peek().tok {
            Tok::Newline => {
                self.newlines();
                Ok(())
            }
            Tok::Punct("}") | Tok::Eof => Ok(()),
            _ => self.expected("end of line"),
        }
    }
    /// Error recovery: skips to the start of the next line, stopping before a `}`.
    fn recover(&mut self, e: SyntaxError) {
        self.errs.push(e);
        while !matches!(self.peek().tok, Tok::Newline | Tok::Eof | Tok::Punct("}")) {
            self.bump();
        }
        self.newlines();
    }

    fn file(&mut self) -> File {
        let mut models = Vec::new();
        self.newlines();
        while self.peek().tok != Tok::Eof {
            match self.model() {
                Ok(m) => models.push(m),
                Err(e) => {
                    self.errs.push(e);
                    // Skip to the next `model` keyword at the start of a line.
                    while self.peek().tok != Tok::Eof && !(self.at_word("model") && self.toks[self.pos - 1].tok == Tok::Newline) {
                        self.bump();
                    }
                }
            }
            self.newlines();
        }
        if models.is_empty() && self.errs.is_empty() {
            self.errs.push(SyntaxError::Expected { expected: "`model Name { ... }`".into(), found: "end of file".into(), span: self.peek().span });
        }
        File { models }
    }

    fn model(&mut self) -> PResult<Model> {
        let start = self.peek().span;
        if !self.at_word("model") {
            return self.expected("`model`");
        }
        self.bump();
        let name = self.ident("a model name")?;
        self.newlines();
        self.expect("{")?;
        self.newlines();
        let (mut links, mut forward) = (Vec::new(), None);
        while !self.at("}") {
            if self.peek().tok == Tok::Eof {
                return self.expected("`}` closing the model");
            }
            let item = if self.at_word("forward") && self.peek_at(1) == &Tok::Punct("(") {
                self.forward().map(|f| forward = Some(f))
            } else {
                self.link().map(|l| links.push(l))
            };
            if let Err(e) = item.and_then(|_| self.end_of_line()) {
                self.recover(e);
            }
        }
        let end = self.bump().span;
        Ok(Model { name, links, forward, span: start.to(end) })
    }

    fn link(&mut self) -> PResult<LinkDecl> {
        let name = self.ident("a link declaration (`name = L.Link(...)`) or `forward(...)`")?;
        self.expect("=")?;
        Ok(LinkDecl { name, value: self.expr()? })
    }

    fn forward(&mut self) -> PResult<Forward> {
        let start = self.bump().span;
        self.expect("(")?;
        let mut params = Vec::new();
        while !self.at(")") {
            let name = self.ident("an input name")?;
            let shape = if self.eat(":") { Some(self.expr()?) } else { None };
            params.push(Param { name, shape });
            if !self.eat(",") {
                break;
            }
        }
        self.expect(")")?;
        self.newlines();
        self.expect("{")?;
        self.newlines();
        let mut body = Vec::new();
        while !self.at("}") {
            if self.peek().tok == Tok::Eof {
                return self.expected("`}` closing `forward`");
            }
            match self.stmt().and_then(|s| self.end_of_line().map(|_| s)) {
                Ok(s) => body.push(s),
                Err(e) => self.recover(e),
            }
        }
        let end = self.bump().span;
        Ok(Forward { params, body, span: start.to(end) })
    }

    fn stmt(&mut self) -> PResult<Stmt> {
        if self.at_word("return") {
            let span = self.bump().span;
            let value = self.expr()?;
            return Ok(Stmt::Return { span: span.to(value.span), value });
        }
        let target = self.ident("a statement (`name = expression` or `return expression`)")?;
        self.expect("=")?;
        Ok(Stmt::Assign { target, value: self.expr()? })
    }

    fn expr(&mut self) -> PResult<Expr> {
        self.depth += 1;
        let r = if self.depth > MAX_DEPTH { Err(SyntaxError::TooDeep { span: self.peek().span }) } else { self.binary(0) };
        self.depth -= 1;
        r
    }

    /// Precedence climbing over `+ -` (level 0) and `* / // %` (level 1).
    fn binary(&mut self, level: usize) -> PResult<Expr> {
        const LEVELS: [&[(&str, BinOp)]; 2] = [
            &[("+", BinOp::Add), ("-", BinOp::Sub)],
            &[("*", BinOp::Mul), ("//", BinOp::FloorDiv), ("/", BinOp::Div), ("%", BinOp::Rem)],
        ];
        if level == LEVELS.len() {
            return self.unary();
        }
        let mut lhs = self.binary(level + 1)?;
        while let Some(&(_, op)) = LEVELS[level].iter().find(|(p, _)| self.at(p)) {
            self.bump();
            let rhs = self.binary(level + 1)?;
            lhs = Expr { span: lhs.span.to(rhs.span), kind: ExprKind::Binary { op, lhs: Box::new(lhs), rhs: Box::new(rhs) } };
        }
        Ok(lhs)
    }

    fn unary(&mut self) -> PResult<Expr> {
        if self.at("-") {
            let start = self.bump().span;
            self.depth += 1;
            let r = if self.depth > MAX_DEPTH { Err(SyntaxError::TooDeep { span: start }) } else { self.unary() };
            self.depth -= 1;
            let inner = r?;
            return Ok(Expr { span: start.to(inner.span), kind: ExprKind::Neg(Box::new(inner)) });
        }
        self.primary()
    }

    fn primary(&mut self) -> PResult<Expr> {
        let t = self.peek().clone();
        let simple = |kind| Ok(Expr { kind, span: t.span });
        match &t.tok {
            Tok::Int(i) => {
                self.bump();
                simple(ExprKind::Int(*i))
            }
            Tok::Float(f) => {
                self.bump();
                simple(ExprKind::Float(*f))
            }
            Tok::Str(s) => {
                self.bump();
                simple(ExprKind::Str(s.clone()))
            }
            Tok::Ident(w) if matches!(w.as_str(), "True" | "False" | "None") => {
                self.bump();
                simple(match w.as_str() {
                    "True" => ExprKind::Bool(true),
                    "False" => ExprKind::Bool(false),
                    _ => ExprKind::None,
                })
            }
            Tok::Ident(_) => {
                let mut path = vec![self.ident("a name")?];
                while self.eat(".") {
                    path.push(self.ident("a name after `.`")?);
                }
                let start = path[0].span;
                if self.at("(") {
                    self.bump();
                    let mut args = Vec::new();
                    while !self.at(")") {
                        let keyword = match (self.peek().tok.clone(), self.peek_at(1)) {
                            (Tok::Ident(_), Tok::Punct("=")) => {
                                let k = self.ident("a keyword")?;
                                self.bump();
                                Some(k)
                            }
                            _ => None,
                        };
                        args.push(Arg { keyword, value: self.expr()? });
                        if !self.eat(",") {
                            break;
                        }
                    }
                    let end = self.expect(")")?;
                    return Ok(Expr { span: start.to(end), kind: ExprKind::Call { callee: path, args } });
                }
                let end = path.last().expect("non-empty").span;
                Ok(Expr { span: start.to(end), kind: ExprKind::Path(path) })
            }
            Tok::Punct(open @ ("(" | "[")) => {
                let close = if *open == "(" { ")" } else { "]" };
                self.bump();
                let (mut items, mut comma) = (Vec::new(), false);
                while !self.at(close) {
                    items.push(self.expr()?);
                    if !self.eat(",") {
                        break;
                    }
                    comma = true;
                }
                let end = self.expect(close)?;
                let span = t.span.to(end);
                if *open == "(" && items.len() == 1 && !comma {
                    let mut e = items.pop().expect("one item");
                    e.span = span;
                    return Ok(e);
                }
                Ok(Expr { kind: ExprKind::Tuple(items), span })
            }
            Tok::Punct(close @ (")" | "]")) => {
                self.bump();
                Err(SyntaxError::Unmatched { close: close.chars().next().expect("one char"), span: t.span })
            }
            _ => self.expected("an expression"),
        }
    }
}

fn match_punct(p: &str) -> &'static str {
    super::lexer::PUNCTS.iter().find(|q| **q == p).copied().unwrap_or("\0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_alexbn() {
        let f = parse(include_str!("../../../models/alexbn.model")).unwrap();
        assert_eq!(f.models[0].links.len(), 10);
        assert_eq!(f.models[0].forward.as_ref().unwrap().body.len(), 8);
    }

    #[test]
    fn reports_every_bad_line() {
        let src = "model M {\n  a = L.Linear(3 4)\n  b = \n  forward(x: [3]) {\n    h = F.relu(x))\n    return h\n  }\n}\n";
        let errs = parse(src).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:#?}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let src = format!("model M {{\n forward(x: [1]) {{\n return {}x{}\n }}\n}}\n", "(".repeat(100_000), ")".repeat(100_000));
        let errs = parse(&src).unwrap_err();
        assert!(errs.iter().any(|e| matches!(e, SyntaxError::TooDeep { .. })));
        let src = format!("model M {{\n forward(x: [1]) {{\n return {}x\n }}\n}}\n", "-".repeat(100_000));
        assert!(parse(&src).is_err());
    }

    #[test]
    fn precedence() {
        let f = parse("model M {\n a = f(1 + 2 * 3 - -4 // 2)\n}\n").unwrap();
        let ExprKind::Call { args, .. } = &f.models[0].links[0].value.kind else { panic!() };
        let ExprKind::Binary { op: BinOp::Sub, lhs, .. } = &args[0].value.kind else { panic!("{:?}", args[0]) };
        assert!(matches!(lhs.kind, ExprKind::Binary { op: BinOp::Add, .. }));
    }
}
