//! Recursive-descent parser: tokens → [`File`]. Resynchronises at the next line after an error.

use super::*;
use crate::diag::{FileId, Span};

/// Parses one source file. Spans are tagged with `file`.
pub fn parse(src: &str, file: FileId) -> Result<File, Vec<SyntaxError>> {
    let (toks, mut errs) = lex(src, file);
    errs.extend(python_habits(&toks));
    let mut p = Parser { toks, pos: 0, errs: Vec::new(), depth: 0, gave_up: false };
    let parsed = p.file();
    if p.gave_up {
        errs.push(SyntaxError::GaveUp { span: p.peek().span });
    }
    // A line the lexer already rejected would only add follow-on parse errors; so would the indented
    // block under a line of Python (a `def`'s body).
    let line_starts: Vec<usize> = src.match_indices('\n').map(|(i, _)| i).collect();
    let line_of = |e: &SyntaxError| line_starts.partition_point(|&nl| nl < e.span().start);
    let mut bad_lines: std::collections::HashSet<usize> = errs.iter().map(line_of).collect();
    let lines: Vec<&str> = src.split('\n').collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    for e in errs.iter().filter(|e| matches!(e, SyntaxError::Python { .. })) {
        let first = line_of(e);
        let base = lines.get(first).map_or(0, |l| indent(l));
        bad_lines.extend((first + 1..lines.len()).take_while(|&k| lines[k].trim().is_empty() || indent(lines[k]) > base));
    }
    errs.extend(p.errs.into_iter().filter(|e| !bad_lines.contains(&line_of(e))));
    if errs.is_empty() {
        Ok(parsed)
    } else {
        errs.sort_by_key(|e| e.span().start);
        Err(errs)
    }
}

/// Lines written as Chainer's Python rather than the model language, one error each with how the model
/// language says it. The parser's own errors on those lines are dropped (see [`parse`]).
fn python_habits(toks: &[Token]) -> Vec<SyntaxError> {
    const HABITS: [(&[&str], &str, &str); 9] = [
        (
            &["class", "*"],
            "a class",
            "a model is written `model Name { … }`: its links first (`conv1 = L.Convolution2D(3, 96, 11, stride=4)`), then `forward(x: [3, 227, 227]) { … }`",
        ),
        (&["def", "*"], "`def`", "write `forward(x: [C, H, W]) { … }`: braces instead of a colon and indentation, no `self`, and the input's shape declared"),
        (&["import"], "an import", "models need no imports: the `L.` links and `F.` functions are built in"),
        (&["from"], "an import", "models need no imports: the `L.` links and `F.` functions are built in"),
        (
            &["self", ".", "*", "="],
            "`self.NAME = …`",
            "declare links at the top of the model without `self.`: `conv1 = L.Convolution2D(…)`; `forward` uses them as `self.conv1(x)`",
        ),
        (&["with", "self"], "`with self.init_scope():`", "not needed: the links declared at the top of a model are its parameters"),
        (&["with", "*"], "a `with` block", "not needed: cnnc always runs in inference mode (`chainer.using_config('train', False)`)"),
        (&["super", "("], "`super().__init__()`", "not needed: a model declares its links at its top"),
        (
            &["forward", "(", "self"],
            "`self` among `forward`'s inputs",
            "`forward` takes only the model's inputs, with their shapes: `forward(x: [3, 227, 227])`",
        ),
    ];
    fn text(t: &Token) -> Option<&str> {
        match &t.tok {
            Tok::Ident(s) => Some(s.as_str()),
            Tok::Punct(p) => Some(*p),
            _ => None,
        }
    }
    let mut found = vec![];
    for (i, t) in toks.iter().enumerate() {
        let line_start = i == 0 || matches!(toks[i - 1].tok, Tok::Newline | Tok::Punct("{"));
        if !line_start {
            continue;
        }
        let matches = |pattern: &[&str]| {
            pattern
                .iter()
                .enumerate()
                .all(|(k, want)| toks.get(i + k).and_then(text).is_some_and(|got| *want == "*" && matches!(toks[i + k].tok, Tok::Ident(_)) || got == *want))
        };
        if let Some((_, what, hint)) = HABITS.iter().find(|(pattern, ..)| matches(pattern)) {
            found.push(SyntaxError::Python { what, hint, span: t.span });
        }
    }
    found
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
    errs: Vec<SyntaxError>,
    depth: usize,
    /// Set after [`MAX_ERRORS`] errors, when the parser jumps to the end of the file: what it would
    /// report from there on are follow-on errors of the jump.
    gave_up: bool,
}

type PResult<T> = Result<T, SyntaxError>;

/// Syntax errors reported before the parser gives up on the rest of the file.
pub(super) const MAX_ERRORS: usize = crate::MAX_DIAGNOSTICS;

const ITEM_WORDS: [(&str, ItemKind); 3] = [("model", ItemKind::Model), ("chain", ItemKind::Chain), ("chainlist", ItemKind::ChainList)];

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
        matches!(self.peek().tok, Tok::Punct(q) if q == p)
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
    fn eat_word(&mut self, w: &str) -> Option<Span> {
        self.at_word(w).then(|| self.bump().span)
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
    /// Ends a line: a newline, or a closing `}` that the caller consumes.
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
    /// Error recovery: skips to the start of the next line, stopping before a `}`. After
    /// [`MAX_ERRORS`] errors, skips to the end of the file.
    fn recover(&mut self, e: SyntaxError) {
        self.error(e);
        if self.errs.len() >= MAX_ERRORS {
            self.gave_up = true;
            self.pos = self.toks.len() - 1;
            return;
        }
        while !matches!(self.peek().tok, Tok::Newline | Tok::Eof | Tok::Punct("}")) {
            self.bump();
        }
        self.newlines();
    }

    fn error(&mut self, e: SyntaxError) {
        if !self.gave_up {
            self.errs.push(e);
        }
    }

    fn file(&mut self) -> File {
        let mut items = Vec::new();
        self.newlines();
        while self.peek().tok != Tok::Eof {
            match self.item() {
                Ok(m) => items.push(m),
                Err(e) => {
                    self.error(e);
                    // Skip to the next item keyword at the start of a line.
                    while self.peek().tok != Tok::Eof && !(ITEM_WORDS.iter().any(|(w, _)| self.at_word(w)) && self.toks[self.pos - 1].tok == Tok::Newline) {
                        self.bump();
                    }
                }
            }
            self.newlines();
        }
        File { items }
    }

    fn item(&mut self) -> PResult<Item> {
        let start = self.peek().span;
        let Some(&(_, kind)) = ITEM_WORDS.iter().find(|(w, _)| self.at_word(w)) else {
            return self.expected("`model`, `chain` or `chainlist`");
        };
        self.bump();
        let name = self.ident("a name")?;
        let param = |p: &mut Self| Ok(ParamDecl { name: p.ident("a parameter name")?, default: if p.eat("=") { Some(p.expr()?) } else { None } });
        let params = if kind == ItemKind::Model { vec![] } else { self.expect("(").and_then(|_| self.list(")", param))?.0 };
        self.newlines();
        let (body, forward, end) = self.block(|p| p.decl(), true)?;
        let forward = match forward.as_slice() {
            [] => None,
            [f, rest @ ..] => {
                if let Some(second) = rest.first() {
                    self.error(SyntaxError::Expected { expected: "one `forward`".into(), found: "a second `forward`".into(), span: second.span });
                }
                Some(f.clone())
            }
        };
        Ok(Item { kind, name, params, body, forward, span: start.to(end) })
    }

    /// `{ line* }`: lines parsed by `line`; with `forwards`, `forward(...) { ... }` lines are collected apart.
    fn block<T>(&mut self, line: impl FnMut(&mut Self) -> PResult<T>, forwards: bool) -> PResult<(Vec<T>, Vec<Forward>, Span)> {
        self.check_depth(1)?;
        self.depth += 1;
        let r = self.block_inner(line, forwards);
        self.depth -= 1;
        r
    }

    fn block_inner<T>(&mut self, mut line: impl FnMut(&mut Self) -> PResult<T>, forwards: bool) -> PResult<(Vec<T>, Vec<Forward>, Span)> {
        self.expect("{")?;
        self.newlines();
        let (mut lines, mut fwds) = (Vec::new(), Vec::new());
        while !self.at("}") {
            if self.peek().tok == Tok::Eof {
                return self.expected("`}`");
            }
            let r = if forwards && self.at_word("forward") && self.peek_at(1) == &Tok::Punct("(") {
                self.forward().map(|f| fwds.push(f))
            } else {
                line(self).map(|l| lines.push(l))
            };
            if let Err(e) = r.and_then(|_| self.end_of_line()) {
                self.recover(e);
            }
        }
        let end = self.bump().span;
        Ok((lines, fwds, end))
    }

    /// `if cond { ... } else { ... }` (also `else if`), sharing the shape between declarations and statements.
    fn if_else<T>(&mut self, line: fn(&mut Self) -> PResult<T>, wrap: fn(Expr, Vec<T>, Vec<T>) -> T) -> PResult<T> {
        self.bump();
        let cond = self.expr()?;
        let (then, _, _) = self.block(line, false)?;
        let save = self.pos;
        self.newlines();
        let otherwise = if self.eat_word("else").is_some() {
            if self.at_word("if") {
                vec![self.if_else(line, wrap)?]
            } else {
                self.block(line, false)?.0
            }
        } else {
            self.pos = save;
            vec![]
        };
        Ok(wrap(cond, then, otherwise))
    }

    fn for_loop<T>(&mut self, line: fn(&mut Self) -> PResult<T>) -> PResult<(Ident, Expr, Vec<T>)> {
        self.bump();
        let var = self.ident("a loop variable")?;
        if self.eat_word("in").is_none() {
            return self.expected("`in`");
        }
        let iter = self.expr()?;
        Ok((var, iter, self.block(line, false)?.0))
    }

    fn assert(&mut self) -> PResult<(Expr, Option<Expr>, Span)> {
        let start = self.bump().span;
        let cond = self.expr()?;
        let message = if self.eat(",") { Some(self.expr()?) } else { None };
        let end = message.as_ref().map_or(cond.span, |m| m.span);
        Ok((cond, message, start.to(end)))
    }

    fn decl(&mut self) -> PResult<Decl> {
        if self.at_word("if") {
            return self.if_else(Self::decl, |cond, then, otherwise| Decl::If { cond, then, otherwise });
        }
        if self.at_word("for") {
            let (var, iter, body) = self.for_loop(Self::decl)?;
            return Ok(Decl::For { var, iter, body });
        }
        if self.at_word("assert") {
            let (cond, message, span) = self.assert()?;
            return Ok(Decl::Assert { cond, message, span });
        }
        if matches!(self.peek().tok, Tok::Ident(_)) && self.peek_at(1) == &Tok::Punct("=") {
            let name = self.ident("a name")?;
            self.bump();
            return Ok(Decl::Assign { name, value: self.expr()? });
        }
        Ok(Decl::Child(self.expr()?))
    }

    fn forward(&mut self) -> PResult<Forward> {
        let start = self.bump().span;
        self.expect("(")?;
        let (params, _, _) = self.list(")", |p| Ok(Param { name: p.ident("an input name")?, shape: if p.eat(":") { Some(p.expr()?) } else { None } }))?;
        self.newlines();
        let (body, _, end) = self.block(Self::stmt, false)?;
        Ok(Forward { params, body, span: start.to(end) })
    }

    fn stmt(&mut self) -> PResult<Stmt> {
        if self.at_word("return") {
            let span = self.bump().span;
            let value = self.expr()?;
            return Ok(Stmt::Return { span: span.to(value.span), value });
        }
        if self.at_word("if") {
            return self.if_else(Self::stmt, |cond, then, otherwise| Stmt::If { cond, then, otherwise });
        }
        if self.at_word("for") {
            let (var, iter, body) = self.for_loop(Self::stmt)?;
            return Ok(Stmt::For { var, iter, body });
        }
        if self.at_word("assert") {
            let (cond, message, span) = self.assert()?;
            return Ok(Stmt::Assert { cond, message, span });
        }
        let target = self.ident("a statement (`name = expression`, `return`, `if`, `for` or `assert`)")?;
        self.expect("=")?;
        Ok(Stmt::Assign { target, value: self.expr()? })
    }

    fn expr(&mut self) -> PResult<Expr> {
        self.nested(|p| p.binary(0))
    }

    /// Runs `f` one nesting level deeper, failing past [`MAX_DEPTH`].
    fn nested(&mut self, f: impl FnOnce(&mut Self) -> PResult<Expr>) -> PResult<Expr> {
        self.depth += 1;
        let r = if self.depth > MAX_DEPTH { Err(SyntaxError::TooDeep { span: self.peek().span }) } else { f(self) };
        self.depth -= 1;
        r
    }

    /// Precedence climbing, loosest first: `or`, `and`, comparisons, `+ -`, `* / // %`.
    fn binary(&mut self, level: usize) -> PResult<Expr> {
        const LEVELS: [&[(&str, BinOp)]; 5] = [
            &[("or", BinOp::Or)],
            &[("and", BinOp::And)],
            &[("==", BinOp::Eq), ("!=", BinOp::Ne), ("<=", BinOp::Le), (">=", BinOp::Ge), ("<", BinOp::Lt), (">", BinOp::Gt)],
            &[("+", BinOp::Add), ("-", BinOp::Sub)],
            &[("*", BinOp::Mul), ("//", BinOp::FloorDiv), ("/", BinOp::Div), ("%", BinOp::Rem)],
        ];
        if level == LEVELS.len() {
            return self.unary();
        }
        let mut lhs = self.binary(level + 1)?;
        while let Some(&(_, op)) = LEVELS[level].iter().find(|(p, _)| self.at(p) || self.at_word(p)) {
            self.bump();
            let rhs = self.binary(level + 1)?;
            let span = lhs.span.to(rhs.span);
            lhs = self.tree(ExprKind::Binary { op, lhs: Box::new(lhs), rhs: Box::new(rhs) }, span)?;
        }
        Ok(lhs)
    }

    fn unary(&mut self) -> PResult<Expr> {
        let not = self.at_word("not");
        if self.at("-") || not {
            let start = self.bump().span;
            let inner = self.nested(|p| p.unary())?;
            let kind = if not { ExprKind::Not(Box::new(inner.clone())) } else { ExprKind::Neg(Box::new(inner.clone())) };
            return self.tree(kind, start.to(inner.span));
        }
        let mut e = self.primary()?;
        // Postfix: calls `f(...)` and indexing `a[i]`, left to right.
        loop {
            if self.eat("(") {
                let (args, _, end) = self.list(")", Self::arg)?;
                let span = e.span.to(end);
                e = self.tree(ExprKind::Call { callee: Box::new(e), args }, span)?;
            } else if self.eat("[") {
                let index = self.expr()?;
                let end = self.expect("]")?;
                let span = e.span.to(end);
                e = self.tree(ExprKind::Index { base: Box::new(e), index: Box::new(index) }, span)?;
            } else {
                return Ok(e);
            }
        }
    }

    /// Builds an expression node, refusing trees deeper than [`MAX_TREE`]: chains of operators and calls
    /// nest the tree without nesting the parser, and a deep tree would overflow the recursive passes
    /// (and `Drop`) after parsing. Checked at every node, so no deep tree is ever built.
    fn tree(&self, kind: ExprKind, span: Span) -> PResult<Expr> {
        let e = Expr::new(kind, span);
        if e.depth > MAX_TREE {
            return Err(SyntaxError::TooLong { span });
        }
        Ok(e)
    }

    fn check_depth(&self, extra: usize) -> PResult<()> {
        if self.depth + extra > MAX_DEPTH {
            return Err(SyntaxError::TooDeep { span: self.peek().span });
        }
        Ok(())
    }

    /// `item, item, ...` (a trailing comma allowed) up to and including `close`: the items, whether a
    /// comma was seen, and the closing span.
    fn list<T>(&mut self, close: &'static str, mut item: impl FnMut(&mut Self) -> PResult<T>) -> PResult<(Vec<T>, bool, Span)> {
        let (mut items, mut comma) = (Vec::new(), false);
        while !self.at(close) {
            items.push(item(self)?);
            if !self.eat(",") {
                break;
            }
            comma = true;
        }
        Ok((items, comma, self.expect(close)?))
    }

    fn arg(&mut self) -> PResult<Arg> {
        let keyword = match (self.peek().tok.clone(), self.peek_at(1)) {
            (Tok::Ident(_), Tok::Punct("=")) => {
                let k = self.ident("a keyword")?;
                self.bump();
                Some(k)
            }
            _ => None,
        };
        Ok(Arg { keyword, value: self.expr()? })
    }

    fn primary(&mut self) -> PResult<Expr> {
        let t = self.peek().clone();
        let literal = match &t.tok {
            Tok::Int(i) => Some(ExprKind::Int(*i)),
            Tok::Float(f) => Some(ExprKind::Float(*f)),
            Tok::Str(s) => Some(ExprKind::Str(s.clone())),
            Tok::Ident(w) => {
                [("True", ExprKind::Bool(true)), ("False", ExprKind::Bool(false)), ("None", ExprKind::None)].into_iter().find(|(n, _)| n == w).map(|(_, k)| k)
            }
            _ => None,
        };
        if let Some(kind) = literal {
            self.bump();
            return Ok(Expr::new(kind, t.span));
        }
        match &t.tok {
            Tok::Ident(_) => {
                let mut path = vec![self.ident("a name")?];
                while self.eat(".") {
                    path.push(self.ident("a name after `.`")?);
                }
                let span = path[0].span.to(path.last().expect("non-empty").span);
                Ok(Expr::new(ExprKind::Path(path), span))
            }
            Tok::Punct(open @ ("(" | "[")) => {
                let close = if *open == "(" { ")" } else { "]" };
                self.bump();
                let (mut items, comma, end) = self.list(close, Self::expr)?;
                let span = t.span.to(end);
                if *open == "(" && items.len() == 1 && !comma {
                    let mut e = items.pop().expect("one item");
                    e.span = span;
                    return Ok(e);
                }
                self.tree(ExprKind::Tuple(items), span)
            }
            Tok::Punct(close @ (")" | "]")) => {
                self.bump();
                Err(SyntaxError::Unmatched { close: close.chars().next().expect("one char"), span: t.span })
            }
            _ => self.expected("an expression"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(src: &str) -> File {
        parse(src, FileId::MODEL).unwrap_or_else(|e| panic!("{e:#?}"))
    }

    #[test]
    fn parses_alexbn() {
        let f = ok(include_str!("../../../models/alexbn.model"));
        assert_eq!(f.items[0].body.len(), 10);
        assert_eq!(f.items[0].forward.as_ref().unwrap().body.len(), 8);
    }

    #[test]
    fn parses_chains_with_control_flow() {
        let f = ok("chainlist B(n, k=2) {\n  L.Linear(3, 3)\n  for i in range(n - 1) {\n    Linear(3, 3)\n  }\n  if k > 1 and not n == 0 {\n    c = k * 2\n  } else if k == 1 {\n    c = 1\n  }\n  else {\n    assert False, 'no'\n  }\n  forward(x) {\n    for i in range(len(self)) {\n      x = self[i](x)\n    }\n    return x\n  }\n}\n");
        let item = &f.items[0];
        assert_eq!((item.kind, item.params.len(), item.body.len()), (ItemKind::ChainList, 2, 3));
        let Decl::If { otherwise, .. } = &item.body[2] else { panic!() };
        assert!(matches!(&otherwise[0], Decl::If { otherwise, .. } if otherwise.len() == 1));
    }

    #[test]
    fn reports_every_bad_line() {
        let src = "model M {\n  a = L.Linear(3 4)\n  b = \n  forward(x: [3]) {\n    h = F.relu(x))\n    return h\n  }\n}\n";
        let errs = parse(src, FileId::MODEL).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:#?}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let long = [
            format!("{}x{}", "(".repeat(100_000), ")".repeat(100_000)),
            format!("{}x", "-".repeat(100_000)),
            format!("{}x", "not ".repeat(100_000)),
            format!("x{}", " + x".repeat(100_000)),
            format!("f{}", "(x)".repeat(100_000)),
            format!("x{}", "[0]".repeat(100_000)),
        ];
        let ifs = format!("model M {{\n forward(x: [1]) {{\n {} return x {} }}\n}}\n", "if True {\n".repeat(50_000), "}\n".repeat(50_000));
        assert!(parse(&ifs, FileId::MODEL).is_err());
        // Chains inside brackets inside chains: every level within its own bound, the tree still too deep.
        let mut nested = "x".to_string();
        for _ in 0..60 {
            nested = format!("({nested}{})", " + x".repeat(200));
        }
        let src = format!("model M {{\n forward(x: [1]) {{\n return {nested}\n }}\n}}\n");
        assert!(matches!(parse(&src, FileId::MODEL).unwrap_err()[0], SyntaxError::TooLong { .. }));
        // A long flat sum is fine.
        assert!(parse(&format!("model M {{\n a = 1{}\n}}\n", " + 1".repeat(200)), FileId::MODEL).is_ok());
        for inner in long {
            let src = format!("model M {{\n forward(x: [1]) {{\n return {inner}\n }}\n}}\n");
            assert!(parse(&src, FileId::MODEL).is_err());
        }
    }

    #[test]
    fn precedence() {
        let f = ok("model M {\n a = f(1 + 2 * 3 - -4 // 2 == 3 or x)\n}\n");
        let Decl::Assign { value, .. } = &f.items[0].body[0] else { panic!() };
        let ExprKind::Call { args, .. } = &value.kind else { panic!() };
        let ExprKind::Binary { op: BinOp::Or, lhs, .. } = &args[0].value.kind else { panic!("{:?}", args[0]) };
        let ExprKind::Binary { op: BinOp::Eq, lhs, .. } = &lhs.kind else { panic!() };
        assert!(matches!(lhs.kind, ExprKind::Binary { op: BinOp::Sub, .. }));
    }
}
