//! The front end never panics: random edits of a valid model (deletions, insertions of model-language
//! fragments and of multi-byte characters) must compile or fail with diagnostics that render, and a model
//! that compiles must also optimize (keeping its MACs).

use cnnc::diag::Source;
use proptest::prelude::*;

const FRAGMENTS: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    "=",
    ".",
    "+",
    "-",
    "//",
    "*",
    "\n",
    "\r\n",
    "\t",
    "#",
    "'",
    "None",
    "True",
    "-1",
    "0",
    "1e9",
    "99999999999999999999",
    "x",
    "h",
    "self.",
    "F.relu(",
    "L.Linear(",
    "return ",
    "forward(",
    "model ",
    "é",
    "→",
    "🦀",
];

fn check(text: &str) {
    let src = Source::new("fuzz.model", text);
    match cnnc::compile(&src) {
        Ok((g, warnings)) => {
            let _ = src.render_plain(&warnings);
            let _ = cnnc::ir::dump(&g, &src);
            let _ = cnnc::ir::table(&g);
            let (opt, report) = cnnc::opt::optimize(&g, &Default::default());
            let _ = cnnc::ir::dump(&opt, &src);
            let _ = cnnc::opt::explain(&report);
            assert_eq!(opt.macs(), g.macs());
        }
        Err(f) => {
            assert!(f.0.iter().any(|d| d.is_error()), "no error for:\n{text}");
            let _ = src.render_plain(&f.0);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn edited_models_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), 0usize..12, prop::sample::select(FRAGMENTS)), 1..6)) {
        let mut text = cnnc::ALEXBN.to_string();
        for (at, del, ins) in edits {
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            let mut j = (i + del).min(text.len());
            while !text.is_char_boundary(j) {
                j += 1;
            }
            text.replace_range(i..j, ins);
        }
        check(&text);
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        check(&text);
    }
}
