//! Golden filetests: each `filetests/NAME.model` starts with a directive line saying what to print, and its
//! expected output sits beside it in `NAME.expected`. One test per file, so one failure hides no other.
//!
//! Directive: `# test: WHAT [batch=N] [sm=SM] [after=PASS]`, WHAT one of `diagnostics` (the rendered
//! errors and warnings), `table`, `ir`, `ir-opt`, `kernels` (the portable tier's kernel IR,
//! host-independent; with `after`, as it stands after that pass of program building) or `ptx` (what
//! `cnnc compile --target cuda --emit ptx` prints).
//! Re-bless after an intended change with `CNNC_BLESS=1 cargo test --release -p cnnc-tests --test filetests`
//! and read the diff; under CI (`CI` set) blessing is refused, so a changed output fails the build.

use cnnc::diag::Source;
use cnnc::kernel::{program, Lowering, Pass, Tier};
use cnnc::weights::Bound;
use libtest_mimic::{Arguments, Failed, Trial};
use std::path::{Path, PathBuf};

fn main() {
    let dir = cnnc_tests::root().join("tests/filetests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).expect("tests/filetests exists").map(|e| e.expect("entry").path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "model"));
    files.sort();
    let trials = files.into_iter().map(|p| Trial::test(p.file_stem().expect("a name").to_string_lossy().into_owned(), move || check(&p))).collect();
    libtest_mimic::run(&Arguments::from_args(), trials).exit();
}

/// What a directive asks for, printed.
fn output(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let directive = text.lines().next().and_then(|l| l.strip_prefix("# test: ")).ok_or("the first line must be `# test: WHAT [key=value ...]`")?;
    let mut words = directive.split_whitespace();
    let what = words.next().ok_or("the directive names nothing to print")?;
    let (mut batch, mut sm, mut after) = (1usize, cnnc::ptx::DEFAULT_SM, None);
    for w in words {
        match w.split_once('=') {
            Some(("batch", v)) => batch = v.parse().map_err(|_| format!("bad batch `{v}`"))?,
            Some(("sm", v)) => sm = v.parse().map_err(|_| format!("bad sm `{v}`"))?,
            Some(("after", v)) => after = Some(Pass::ALL.into_iter().find(|p| p.name() == v).ok_or(format!("no pass `{v}`"))?),
            _ => return Err(format!("unknown directive option `{w}`")),
        }
    }
    let src = Source::new(path.file_name().expect("a file").to_string_lossy(), text.clone());
    let (g, diags) = match cnnc::compile(&src) {
        Ok((g, warnings)) => (Some(g), warnings),
        Err(cnnc::diag::Failed(errors)) => (None, errors),
    };
    if what == "diagnostics" {
        return Ok(src.render_plain(&diags));
    }
    let g = match (g, diags.is_empty()) {
        (Some(g), true) => g,
        _ => return Err(format!("expected a model that compiles without warnings:\n{}", src.render_plain(&diags))),
    };
    let opt = || cnnc::opt::optimize(&g, &Default::default()).0;
    // Kernels depend on shapes, not values: lower with zero parameters, for the host-independent tier.
    let program = |g: &cnnc::ir::Graph| program(g, Bound::zeros(g), batch, Tier::Portable);
    Ok(match what {
        "table" => cnnc::ir::table(&g),
        "ir" => cnnc::ir::dump(&g, &src),
        "ir-opt" => cnnc::ir::dump(&opt(), &src),
        "kernels" => match after {
            Some(pass) => cnnc::kernel::listing_after(&opt(), Bound::zeros(&opt()), batch, Lowering::new(Tier::Portable), pass),
            None => cnnc::kernel::listing(&program(&opt())),
        },
        "ptx" => {
            let g = cnnc::opt::optimize(&g, &cnnc::opt::Options { level: 1, model: cnnc::opt::lang::CUDA }).0;
            // What `cnnc compile --target cuda --emit ptx` prints: the cuda backend's lowering.
            let p = cnnc::kernel::program_with(&g, Bound::zeros(&g), batch, Lowering::gpu());
            cnnc::ptx::emit(&p, sm).map_err(|e| e.to_string())?
        }
        other => return Err(format!("unknown test kind `{other}`")),
    })
}

fn check(path: &Path) -> Result<(), Failed> {
    let got = output(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let expected = path.with_extension("expected");
    if std::env::var_os("CNNC_BLESS").is_some() {
        if std::env::var_os("CI").is_some() {
            return Err("CNNC_BLESS is refused under CI: bless on a development machine and commit the .expected file".into());
        }
        return std::fs::write(&expected, &got).map_err(|e| format!("{}: {e}", expected.display()).into());
    }
    let want = std::fs::read_to_string(&expected).map_err(|e| format!("{}: {e} (create it with CNNC_BLESS=1)", expected.display()))?;
    if got == want {
        return Ok(());
    }
    let diff = similar::TextDiff::from_lines(&want, &got);
    Err(format!("{} differs from its output (- expected, + got; re-bless with CNNC_BLESS=1):\n{}", expected.display(), diff.unified_diff().context_radius(3))
        .into())
}
