//! Model text → diagnostics, or an IR that dumps, tabulates, optimizes and (when small) lowers to
//! kernels. Any panic, abort or timeout is a bug: every input must end in diagnostics or a program.
#![no_main]
use cnnc::diag::Source;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let src = Source::new("fuzz.model", text);
    match cnnc::compile(&src) {
        Err(cnnc::diag::Failed(diags)) => {
            assert!(diags.iter().any(|d| d.is_error()), "a failed compile reports an error");
            let _ = src.render_plain(&diags);
        }
        Ok((g, warnings)) => {
            let _ = src.render_plain(&warnings);
            let _ = cnnc::ir::dump(&g, &src);
            let _ = cnnc::ir::table(&g);
            let (opt, _) = cnnc::opt::optimize(&g, &cnnc::opt::Options::default());
            // Lowering allocates the parameters: only for models of fuzzing size.
            let params: usize = g.params().iter().map(|p| p.shape.iter().product::<usize>()).sum();
            let activations: usize = g.nodes().map(|(_, n)| n.shape.iter().product::<usize>()).sum();
            if params < 1 << 20 && activations < 1 << 20 {
                let p = cnnc::kernel::program(&opt, cnnc::weights::Bound::zeros(&opt), 1, cnnc::target::Tier::Portable);
                let _ = cnnc::kernel::listing(&p);
            }
        }
    }
});
