//! Regenerates `compiler/onnx-proto/src/onnx.rs` from `compiler/onnx-proto/onnx.proto` (the schema the
//! `onnx` Python wheel ships in its package folder). Run from anywhere:
//! `cargo run --manifest-path compiler/onnx-proto/gen/Cargo.toml`.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("no parent folder")?;
    let fds = protox::compile([root.join("onnx.proto")], [root])?;
    let out = tempfile_dir()?;
    prost_build::Config::new().out_dir(&out).compile_fds(fds)?;
    std::fs::copy(out.join("onnx.rs"), root.join("src/onnx.rs"))?;
    println!("wrote {}", root.join("src/onnx.rs").display());
    Ok(())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("cnnc-onnx-proto-gen-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
