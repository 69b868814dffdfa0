//! NVIDIA's PTX assembler, to validate emitted PTX offline: no GPU or driver is needed, only the
//! `ptxas` binary (the PyPI wheel `nvidia-cuda-nvcc-cu12` ships one; `.ci/run` installs it).
//!
//! [`find`] looks for it; [`assemble`] assembles a module for one `sm_XX` and, when ptxas rejects it,
//! reports each of its messages with the kernel (the `.entry`) its line number falls in.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum PtxasError {
    #[error("cannot run ptxas `{}`: {source}", path.display())]
    Run { path: PathBuf, source: std::io::Error },
    #[error("ptxas -arch=sm_{sm} rejected the PTX:\n{report}")]
    Rejected { sm: u32, report: String },
}

/// The ptxas to use: `$CNNC_PTXAS` if set, else `ptxas` on the `PATH`, else the one in the
/// `nvidia-cuda-nvcc-cu12` wheel of `python3`'s site-packages.
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CNNC_PTXAS").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("PATH").and_then(|path| std::env::split_paths(&path).map(|d| d.join("ptxas")).find(|p| p.is_file())) {
        return Some(p);
    }
    let out = Command::new("python3").args(["-c", "import nvidia.cuda_nvcc as m; print(list(m.__path__)[0])"]).output().ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let p = Path::new(dir.trim()).join("bin").join("ptxas");
    (out.status.success() && p.is_file()).then_some(p)
}

/// Assembles `ptx` for `sm_{sm}` (output discarded). On rejection, every message ptxas printed is
/// returned, those that name a line prefixed with the kernel it belongs to.
pub fn assemble(ptxas: &Path, ptx: &str, sm: u32) -> Result<(), PtxasError> {
    run(ptxas, ptx, sm, &[]).map(drop)
}

/// Runs ptxas on `ptx` for `sm_{sm}` with `extra` arguments; returns what it printed, or on rejection
/// its messages, each that names a line prefixed with the kernel it belongs to.
fn run(ptxas: &Path, ptx: &str, sm: u32, extra: &[&str]) -> Result<String, PtxasError> {
    let run = |source| PtxasError::Run { path: ptxas.to_path_buf(), source };
    let dir = tempfile::tempdir().map_err(run)?;
    let (src, obj) = (dir.path().join("module.ptx"), dir.path().join("module.cubin"));
    std::fs::write(&src, ptx).map_err(run)?;
    let out = Command::new(ptxas).arg(format!("-arch=sm_{sm}")).args(extra).arg("-o").arg(&obj).arg(&src).output().map_err(run)?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        return Ok(text);
    }
    let report = text
        .lines()
        .map(|l| {
            // `ptxas FILE, line N; error   : ...`
            let line = l.split(", line ").nth(1).and_then(|r| r.split(';').next()).and_then(|n| n.trim().parse().ok());
            match line.and_then(|n| super::entry_at_line(ptx, n)) {
                Some(kernel) => format!("[{kernel}] {l}"),
                None => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    Err(PtxasError::Rejected { sm, report })
}

/// What `ptxas -v` reports for one entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub entry: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, in bytes.
    pub shared: u32,
    /// Bytes of stack frame, spill stores and spill loads per thread.
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Assembles `ptx` for `sm_{sm}` with `-v` and returns every entry's resources, in the order ptxas
/// reports them.
pub fn resources(ptxas: &Path, ptx: &str, sm: u32) -> Result<Vec<Resources>, PtxasError> {
    let text = run(ptxas, ptx, sm, &["-v"])?;
    // The number before `unit` in a comma-separated line: `Used 80 registers, … 8192 bytes smem`.
    let number = |line: &str, unit: &str| {
        line.split(',').find_map(|part| part.trim().strip_suffix(unit).and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())).unwrap_or(0)
    };
    let mut all: Vec<Resources> = vec![];
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            all.push(Resources { entry: rest.split('\'').next().unwrap_or_default().to_string(), ..Resources::default() });
        } else if let Some(r) = all.last_mut() {
            if line.contains("bytes stack frame") {
                (r.stack, r.spill_stores, r.spill_loads) =
                    (number(line, "bytes stack frame"), number(line, "bytes spill stores"), number(line, "bytes spill loads"));
            } else if line.contains("Used ") {
                (r.registers, r.shared) = (number(line, "registers"), number(line, "bytes smem"));
            }
        }
    }
    Ok(all)
}
