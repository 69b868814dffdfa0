//! An ONNX file → model text that compiles (anything the importer accepts must compile: otherwise it is
//! an importer bug), or an error naming the file.
#![no_main]
use cnnc::diag::Source;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(imported) = cnnc::onnx::import_bytes(std::path::Path::new("/nonexistent/fuzz.onnx"), data) else { return };
    let src = Source::new("fuzz.onnx (imported)", imported.text.clone());
    if let Err(cnnc::diag::Failed(diags)) = cnnc::compile(&src) {
        // A model too large for this machine is refused by the front end, not an importer bug.
        let refused = diags.iter().any(|d| d.message.contains("cnnc's limit") || d.message.contains("more than"));
        assert!(refused, "imported text does not compile:\n{}\n{}", imported.text, src.render_plain(&diags));
    }
});
