//! The PTX backend without a GPU: every kernel of every model in `models/` assembled by NVIDIA's ptxas
//! for sm_80 and sm_90 (the GPU lowering and the portable tier's), the GPU kernels' resources (no
//! spills; docs/ptx-resources.md), the emitted PTX run by an interpreter against the JIT and the
//! reference, and snapshots of the PTX of a few small kernels.
//!
//! ptxas comes from `$CNNC_PTXAS` (`.ci/run` installs the `nvidia-cuda-nvcc-cu12` wheel and sets it),
//! `ptxas` on the PATH, or python3's site-packages; failing those, the test installs the wheel into
//! `target/ci-venv` itself (as `.ci/run` does), so plain `cargo test` runs it too. If that is impossible
//! (no python3 or no network) the assembler test is skipped with a note, except in CI (`CI` set), where it
//! fails.

use cnnc::kernel::{Lowering, Program, Tier, WeightsDtype, Winograd};
use cnnc::ptx;
use cnnc_runtime::Tensor;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("compiler/ is inside the repository").to_path_buf()
}

/// Compiles model text as `cnnc compile --target cuda` does (the CUDA cost model, zero parameters).
fn program(name: &str, text: &str, batch: usize, tier: Tier) -> Program {
    program_as(name, text, batch, tier, WeightsDtype::F32)
}

fn program_as(name: &str, text: &str, batch: usize, tier: Tier, dtype: WeightsDtype) -> Program {
    lowered(name, text, batch, Lowering { fc_weights: dtype, ..Lowering::new(tier) })
}

fn lowered(name: &str, text: &str, batch: usize, lowering: Lowering) -> Program {
    let src = cnnc::diag::Source::new(name, text);
    let (g, _) = cnnc::compile(&src).unwrap_or_else(|f| panic!("{}", src.render_plain(&f.0)));
    let (g, _) = cnnc::opt::optimize(&g, &cnnc::opt::Options { level: 1, model: cnnc::opt::lang::CUDA });
    cnnc::kernel::program_with(&g, cnnc::weights::Bound::zeros(&g), batch, lowering)
}

fn models() -> Vec<(String, String)> {
    let mut models: Vec<PathBuf> = std::fs::read_dir(root().join("models"))
        .expect("models/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "model"))
        .collect();
    models.sort();
    assert!(models.len() >= 6, "{models:?}");
    models.iter().map(|p| (p.file_name().expect("file").to_string_lossy().into_owned(), std::fs::read_to_string(p).expect("readable model"))).collect()
}

/// Runs `job` on every item, two at a time (ptxas is single-threaded), in order.
fn two_at_a_time<T: Sync, R: Send>(items: &[T], job: impl Fn(&T) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let halves: Vec<_> = items.chunks(items.len().div_ceil(2).max(1)).map(|c| s.spawn(|| c.iter().map(&job).collect::<Vec<_>>())).collect();
        halves.into_iter().flat_map(|h| h.join().expect("ptxas thread")).collect()
    })
}

/// The ptxas of the `nvidia-cuda-nvcc-cu12` wheel in `target/ci-venv`, installed on first use.
fn provisioned() -> Option<PathBuf> {
    static ONCE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let venv = root().join("target/ci-venv");
        let python = venv.join("bin/python3");
        let locate = || {
            let out = std::process::Command::new(&python).args(["-c", "import nvidia.cuda_nvcc as m; print(list(m.__path__)[0])"]).output().ok()?;
            let p = Path::new(String::from_utf8(out.stdout).ok()?.trim()).join("bin/ptxas");
            (out.status.success() && p.is_file()).then_some(p)
        };
        if let Some(p) = locate() {
            return Some(p);
        }
        eprintln!("installing ptxas (nvidia-cuda-nvcc-cu12==12.9.86) into {}", venv.display());
        let ok = |c: &mut std::process::Command| c.status().is_ok_and(|s| s.success());
        let made = ok(std::process::Command::new("python3").arg("-m").arg("venv").arg(&venv));
        let installed = made
            && ok(std::process::Command::new(&python).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "nvidia-cuda-nvcc-cu12==12.9.86",
            ]));
        installed.then(locate).flatten()
    })
    .clone()
}

fn ptxas() -> Option<PathBuf> {
    let found = ptx::ptxas::find().or_else(provisioned);
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI must provision ptxas: see .ci/run (it installs nvidia-cuda-nvcc-cu12 and sets CNNC_PTXAS)");
        eprintln!("skipped: no ptxas (set CNNC_PTXAS, or pip install nvidia-cuda-nvcc-cu12==12.9.86)");
    }
    found
}

#[test]
fn ptxas_assembles_every_kernel_of_every_model_for_sm_80_and_sm_90() {
    let Some(ptxas) = ptxas() else { return };
    let mut jobs = vec![];
    for (name, text) in models() {
        // AlexBN at batch 8 takes Winograd for conv3–5 on the CPU.
        let batches: &[usize] = if name == "alexbn.model" { &[1, 2, 8] } else { &[1] };
        let mut variants: Vec<(usize, WeightsDtype)> = batches.iter().map(|&b| (b, WeightsDtype::F32)).collect();
        if name == "alexbn.model" {
            // And its linear layers as bfloat16 (`--weights-dtype bf16`) at batch 1, where the GEMV reads them.
            variants.push((1, WeightsDtype::Bf16));
        }
        for (batch, dtype) in variants {
            // The cuda backend's lowering, and the CPU's portable tier (the printer prints any program).
            for (what, lowering) in [("gpu", Lowering::gpu()), ("portable", Lowering::new(Tier::Portable))] {
                let p = lowered(&name, &text, batch, Lowering { fc_weights: dtype, ..lowering });
                for sm in [80, 90] {
                    let ptx = ptx::emit(&p, sm).unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert_eq!(ptx.matches(".visible .entry ").count(), p.launches.len());
                    jobs.push((format!("{name} batch {batch} {what} {dtype:?} sm_{sm}"), ptx, sm));
                }
            }
        }
    }
    let failures: Vec<String> =
        two_at_a_time(&jobs, |(what, ptx, sm)| ptx::ptxas::assemble(&ptxas, ptx, *sm).err().map(|e| format!("{what}: {e}"))).into_iter().flatten().collect();
    assert!(failures.is_empty(), "{} of {} modules rejected:\n{}", failures.len(), jobs.len(), failures.join("\n\n"));
    eprintln!("ptxas ({}) accepted {} modules", ptxas.display(), jobs.len());
}

/// `ptxas -v` for sm_90 on the GPU lowering of every model at batch 1, and of AlexBN and ResNet-50 at
/// batch 64: no kernel may spill, and docs/ptx-resources.md must be the table [`ptx::roofline::table`]
/// makes of them (resources, occupancy, FLOPs, bytes, H200 roofline per launch). Rewrite it with
/// `CNNC_BLESS=1`; it is compared only under the ptxas that made it (12.9.86), whose register counts it holds.
#[test]
fn gpu_kernels_do_not_spill_and_their_resources_are_documented() {
    let Some(ptxas) = ptxas() else { return };
    const PINNED: &str = "V12.9.86";
    let version = std::process::Command::new(&ptxas).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let mut jobs = vec![];
    for (name, text) in models() {
        let batches: &[usize] = if name == "alexbn.model" || name == "resnet50.model" { &[1, 64] } else { &[1] };
        for &batch in batches {
            let p = lowered(&name, &text, batch, Lowering::gpu());
            let ptx = ptx::emit(&p, 90).expect("emits");
            jobs.push((name.trim_end_matches(".model").to_string(), batch, p, ptx));
        }
    }
    let resources =
        two_at_a_time(&jobs, |(name, batch, _, ptx)| ptx::ptxas::resources(&ptxas, ptx, 90).unwrap_or_else(|e| panic!("{name} batch {batch}: {e}")));
    let mut doc = format!(
        "# GPU kernels: resources and roofline\n\n\
         Generated by `CNNC_BLESS=1 cargo test --release -p cnnc --test ptx gpu_kernels_do_not_spill` (ptxas {PINNED}, \
         `-arch=sm_90 -v`) from the cuda backend's lowering (`Lowering::gpu`, docs/ptx.md); the test fails when this file is stale. \
         Per launch: grid × block; registers per thread, static shared memory per block and spill bytes (all 0) from ptxas; \
         resident blocks per multiprocessor on sm_90 and the occupancy in warps that follows (`ptx::roofline::blocks_per_sm`: \
         32 blocks, 2048 threads, 65,536 registers allocated per warp in units of 256, 228 KiB of shared memory with 1 KiB \
         reserved per block); FLOPs (2 per multiply-add); MB every buffer passed to it (each read or written once: a lower \
         bound on traffic); and the roofline time on an {} (67 TFLOP/s FP32 without tensor cores, 4.8 TB/s), the larger of \
         FLOPs / peak and bytes / bandwidth, with what bounds it. No GPU measured these: they are what the kernels could reach.\n",
        ptx::roofline::H200.name
    );
    let mut spills = vec![];
    for ((name, batch, p, _), res) in jobs.iter().zip(&resources) {
        assert_eq!(res.len(), p.launches.len(), "{name}: one report per entry");
        spills.extend(res.iter().filter(|r| r.spill_stores + r.spill_loads + r.stack > 0).map(|r| format!("{name} batch {batch}: {r:?}")));
        doc += &format!("\n## {name}, batch {batch}\n\n{}", ptx::roofline::table(p, res, ptx::roofline::H200));
    }
    assert!(spills.is_empty(), "kernels that spill or use a stack:\n{}", spills.join("\n"));
    let path = root().join("docs/ptx-resources.md");
    if std::env::var_os("CNNC_BLESS").is_some() {
        std::fs::write(&path, &doc).expect("writes docs/ptx-resources.md");
    } else if version.contains(PINNED) {
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(old == doc, "docs/ptx-resources.md is stale: rerun with CNNC_BLESS=1 and review the diff");
    } else {
        eprintln!("docs/ptx-resources.md not compared: ptxas is not {PINNED}");
    }
}

#[test]
fn ptxas_errors_name_the_kernel() {
    let Some(ptxas) = ptxas() else { return };
    let p = program("t.model", RELU, 1, Tier::Portable);
    let good = ptx::emit(&p, 80).expect("emits");
    let bad = good.replacen("ret;", "bogus.instruction %rd0;\n\tret;", 1);
    let err = ptx::ptxas::assemble(&ptxas, &bad, 80).expect_err("ptxas rejects it").to_string();
    assert!(err.contains("[k0_n1_relu_relu]") && err.contains("line "), "{err}");
}

const RELU: &str = "model T {\n    forward(x: [2, 3, 3]) {\n        return F.relu(x)\n    }\n}\n";
const POOL: &str = "model T {\n    forward(x: [1, 4, 4]) {\n        return F.max_pooling_2d(x, 3, stride=2, pad=1)\n    }\n}\n";
const CONV: &str = "model T {\n    c = L.Convolution2D(2, 3, 3, pad=1)\n    forward(x: [2, 5, 5]) {\n        return F.relu(self.c(x))\n    }\n}\n";

#[test]
fn snapshot_relu() {
    insta::assert_snapshot!(ptx::emit(&program("t.model", RELU, 1, Tier::Portable), 80).expect("emits"));
}

#[test]
fn snapshot_max_pool() {
    insta::assert_snapshot!(ptx::emit(&program("t.model", POOL, 1, Tier::Portable), 80).expect("emits"));
}

#[test]
fn snapshot_conv_relu_portable() {
    insta::assert_snapshot!(ptx::emit(&program("t.model", CONV, 1, Tier::Portable), 80).expect("emits"));
}

#[test]
fn unsupported_targets_are_errors() {
    let p = program("t.model", RELU, 1, Tier::Portable);
    assert!(matches!(ptx::emit(&p, 75), Err(ptx::PtxError::Sm(75))));
    assert!(ptx::emit(&p, 90).expect("sm_90").contains(".target sm_90"));
}

#[test]
fn launches_cover_every_parallel_iteration_with_its_own_thread() {
    let p = program("t.model", CONV, 3, Tier::Portable);
    for l in &p.launches {
        let (grid, block) = ptx::launch_config(&l.kernel);
        assert!(grid as usize * block as usize >= l.kernel.extent && block == ptx::BLOCK, "{}", l.kernel.name);
    }
}

#[test]
fn without_a_gpu_the_cuda_runtime_is_an_error_not_a_panic() {
    match ptx::cuda::available() {
        Ok(()) => eprintln!("a CUDA device is present: nothing to check here"),
        Err(e) => {
            let p = program("t.model", RELU, 1, Tier::Portable);
            let err = ptx::cuda::CudaExecutable::new(&p, 80).err().expect("no device, no executable");
            assert_eq!(err.to_string(), e.to_string());
            eprintln!("as expected: {e}");
        }
    }
}

// ---- running the emitted PTX without a GPU ----

/// An interpreter for exactly the PTX subset the printer emits, so the tests can check the emitted code
/// computes what the JIT computes (ptxas only checks that it assembles). Blocks run one after another,
/// and within a block every thread runs to its next `bar.sync` before any goes on (all must stop at
/// the same barrier, or all return), which is sound because blocks write disjoint global elements and
/// threads exchange data only through shared memory across barriers: a read or write of a shared word
/// another thread wrote, or a write of one another thread read, since the last barrier is an error (a
/// race). Every access is checked (bounds, 4-byte alignment, 16 bytes for `.v4`, the right state
/// space), and a launch fails if it reads through `ld.global.nc` an address the same launch writes.
mod emu {
    use cnnc::kernel::{Program, Slot};
    use cnnc_runtime::Tensor;
    use std::collections::{HashMap, HashSet};

    #[derive(Clone, Debug)]
    enum Opd {
        P(usize),
        R(usize),
        Rd(usize),
        F(usize),
        Imm(i64),
        FImm(f32),
        Special(String),
        Sym(String),
        Mem(Box<Opd>, i64),
        Vec(Vec<Opd>),
    }

    struct Ins {
        guard: Option<(bool, usize)>,
        op: String,
        args: Vec<Opd>,
    }

    pub struct Entry {
        pub name: String,
        /// (buffer number, floats) of each `.local` array.
        locals: Vec<(usize, usize)>,
        /// (buffer number, floats) of each `.shared` array.
        shared: Vec<(usize, usize)>,
        code: Vec<Ins>,
        labels: HashMap<String, usize>,
        regs: [usize; 4],
    }

    /// Addresses: region << 40 | byte offset. Region 1 is the arena, 2.. the parameters, LOCAL.. the
    /// running thread's `.local` arrays, SHARED.. its block's `.shared` arrays.
    const SHIFT: u32 = 40;
    const LOCAL: u64 = 1 << 20;
    const SHARED: u64 = 1 << 21;

    fn split_top(s: &str) -> Vec<String> {
        let (mut out, mut cur, mut depth) = (vec![], String::new(), 0);
        for c in s.chars() {
            match c {
                '{' | '[' => depth += 1,
                '}' | ']' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(cur.trim().to_string());
                    cur.clear();
                    continue;
                }
                _ => {}
            }
            cur.push(c);
        }
        if !cur.trim().is_empty() {
            out.push(cur.trim().to_string());
        }
        out
    }

    fn opd(s: &str) -> Opd {
        if let Some(inner) = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            return Opd::Vec(split_top(inner).iter().map(|s| opd(s)).collect());
        }
        if let Some(inner) = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            let (base, off) = match inner.split_once('+') {
                Some((b, o)) => (b, o.parse().expect("displacement")),
                None => (inner, 0),
            };
            return Opd::Mem(Box::new(opd(base)), off);
        }
        if s.starts_with('%') && s.contains('.') {
            return Opd::Special(s.to_string());
        }
        for (prefix, f) in [("%rd", Opd::Rd as fn(usize) -> Opd), ("%r", Opd::R), ("%p", Opd::P), ("%f", Opd::F)] {
            if let Some(n) = s.strip_prefix(prefix).and_then(|n| n.parse().ok()) {
                return f(n);
            }
        }
        if let Some(hex) = s.strip_prefix("0f") {
            return Opd::FImm(f32::from_bits(u32::from_str_radix(hex, 16).expect("hex float")));
        }
        if let Some(hex) = s.strip_prefix("0x") {
            return Opd::Imm(i64::from_str_radix(hex, 16).expect("hex integer"));
        }
        s.parse().map(Opd::Imm).unwrap_or_else(|_| Opd::Sym(s.to_string()))
    }

    pub fn parse(ptx: &str) -> Vec<Entry> {
        let mut entries: Vec<Entry> = vec![];
        for line in ptx.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix(".visible .entry ") {
                entries.push(Entry {
                    name: name.trim_end_matches('(').into(),
                    locals: vec![],
                    shared: vec![],
                    code: vec![],
                    labels: HashMap::new(),
                    regs: [0; 4],
                });
                continue;
            }
            let Some(e) = entries.last_mut() else { continue };
            if let Some(decl) = line.strip_prefix(".local .align 16 .b8 ") {
                let (name, size) = decl.trim_end_matches("];").split_once('[').expect("local array");
                e.locals.push((name.trim_start_matches("local_").parse().expect("local name"), size.parse::<usize>().expect("local size") / 4));
            } else if let Some(decl) = line.strip_prefix(".shared .align 16 .b8 ") {
                let (name, size) = decl.trim_end_matches("];").split_once('[').expect("shared array");
                e.shared.push((name.trim_start_matches("shared_").parse().expect("shared name"), size.parse::<usize>().expect("shared size") / 4));
            } else if let Some(label) = line.strip_suffix(':') {
                e.labels.insert(label.to_string(), e.code.len());
            } else if let Some(ins) = line.strip_suffix(';').filter(|l| !l.starts_with('.') && !l.starts_with("//")) {
                let (guard, ins) = match ins.strip_prefix('@') {
                    Some(g) => {
                        let (p, rest) = g.split_once(' ').expect("guarded instruction");
                        let (neg, p) = p.strip_prefix('!').map_or((false, p), |p| (true, p));
                        (Some((neg, p.trim_start_matches("%p").parse().expect("predicate"))), rest)
                    }
                    None => (None, ins),
                };
                let (op, rest) = ins.split_once(' ').unwrap_or((ins, ""));
                let args: Vec<Opd> = split_top(rest).iter().map(|s| opd(s)).collect();
                fn regs(o: &Opd, n: &mut [usize; 4]) {
                    match o {
                        Opd::P(i) => n[0] = n[0].max(i + 1),
                        Opd::R(i) => n[1] = n[1].max(i + 1),
                        Opd::Rd(i) => n[2] = n[2].max(i + 1),
                        Opd::F(i) => n[3] = n[3].max(i + 1),
                        Opd::Mem(b, _) => regs(b, n),
                        Opd::Vec(v) => v.iter().for_each(|o| regs(o, n)),
                        _ => {}
                    }
                }
                args.iter().for_each(|a| regs(a, &mut e.regs));
                if let Some((_, p)) = guard {
                    e.regs[0] = e.regs[0].max(p + 1);
                }
                e.code.push(Ins { guard, op: op.to_string(), args });
            }
        }
        entries
    }

    struct Thread<'a> {
        p: Vec<bool>,
        r: Vec<u32>,
        rd: Vec<u64>,
        f: Vec<f32>,
        special: [u32; 4],
        params: &'a [u64],
        local_ids: &'a [usize],
        shared_ids: &'a [usize],
        locals: Vec<Vec<f32>>,
        /// Where the thread stopped (at a barrier), `None` once it has returned.
        pc: Option<usize>,
    }

    /// Shared memory of the running block and who touched it since the last barrier: a thread may not
    /// read or write a word another thread wrote, nor write one another thread read (a race on a GPU).
    struct Block {
        shared: Vec<Vec<f32>>,
        written: HashMap<u64, u32>,
        read: HashMap<u64, u32>,
    }

    impl Block {
        fn access(&mut self, addr: u64, tid: u32, write: bool) -> Result<(), String> {
            let other = |m: &HashMap<u64, u32>| m.get(&addr).is_some_and(|&t| t != tid);
            if other(&self.written) || (write && other(&self.read)) {
                return Err(format!("race on shared address {addr:#x} between barriers"));
            }
            if write {
                self.written.insert(addr, tid);
            } else if self.read.insert(addr, tid).is_some_and(|t| t != tid) {
                // Read by several threads: a write by any of them races too, so no thread owns it.
                self.read.insert(addr, u32::MAX);
            }
            Ok(())
        }
    }

    impl Thread<'_> {
        fn i(&self, o: &Opd) -> u64 {
            match o {
                Opd::Rd(n) => self.rd[*n],
                Opd::R(n) => self.r[*n] as u64,
                Opd::Imm(v) => *v as u64,
                Opd::Special(s) => self.special[["%ctaid.x", "%ntid.x", "%tid.x", "%nctaid.x"].iter().position(|x| x == s).expect("special register")] as u64,
                Opd::Sym(s) => {
                    let (region, ids, n) = match s.strip_prefix("shared_") {
                        Some(n) => (SHARED, self.shared_ids, n),
                        None => (LOCAL, self.local_ids, s.strip_prefix("local_").expect("a local or shared array")),
                    };
                    let buf: usize = n.parse().expect("array number");
                    (region + ids.iter().position(|&b| b == buf).expect("declared") as u64) << SHIFT
                }
                o => panic!("not an integer operand: {o:?}"),
            }
        }
        fn f(&self, o: &Opd) -> f32 {
            match o {
                Opd::F(n) => self.f[*n],
                Opd::FImm(v) => *v,
                o => panic!("not a float operand: {o:?}"),
            }
        }
        fn set_i(&mut self, o: &Opd, v: u64) {
            match o {
                Opd::Rd(n) => self.rd[*n] = v,
                Opd::R(n) => self.r[*n] = v as u32,
                o => panic!("not an integer register: {o:?}"),
            }
        }
        fn set_f(&mut self, o: &Opd, v: f32) {
            let Opd::F(n) = o else { panic!("not a float register: {o:?}") };
            self.f[*n] = v;
        }
        fn addr(&self, o: &Opd) -> u64 {
            let Opd::Mem(b, off) = o else { panic!("not an address: {o:?}") };
            self.i(b).wrapping_add(*off as u64)
        }
    }

    /// Runs `program` from its PTX on `inputs`, as `CudaExecutable::run` would on a GPU.
    pub fn run(ptx: &str, program: &Program, inputs: &[&Tensor]) -> Result<Tensor, String> {
        let entries = parse(ptx);
        let mut mem: Vec<Vec<f32>> = vec![vec![], vec![0.0; program.arena_len]];
        mem.extend(program.params.iter().map(|p| p.to_vec()));
        for (x, (offset, _)) in inputs.iter().zip(&program.inputs) {
            mem[1][*offset..*offset + x.data().len()].copy_from_slice(x.data());
        }
        for (li, l) in program.launches.iter().enumerate() {
            let e = &entries[li];
            assert_eq!(e.name, cnnc::ptx::entry_name(li, &l.kernel));
            let params: Vec<u64> = l
                .slots
                .iter()
                .map(|s| match *s {
                    Slot::Arena { offset, .. } => (1 << SHIFT) + 4 * offset as u64,
                    Slot::Param(p) => (2 + p as u64) << SHIFT,
                })
                .collect();
            let (grid, block) = cnnc::ptx::launch_config(&l.kernel);
            let (mut written, mut nc_read) = (HashSet::new(), HashSet::new());
            let (local_ids, shared_ids): (Vec<usize>, Vec<usize>) = (e.locals.iter().map(|l| l.0).collect(), e.shared.iter().map(|l| l.0).collect());
            for b in 0..grid {
                // Registers, local and shared memory start as garbage.
                let mut threads: Vec<Thread> = (0..block)
                    .map(|tid| Thread {
                        p: vec![false; e.regs[0]],
                        r: vec![0; e.regs[1]],
                        rd: vec![0xdead_beef_dead_beef; e.regs[2]],
                        f: vec![f32::NAN; e.regs[3]],
                        special: [b, block, tid, grid],
                        params: &params,
                        local_ids: &local_ids,
                        shared_ids: &shared_ids,
                        locals: e.locals.iter().map(|&(_, n)| vec![f32::NAN; n]).collect(),
                        pc: Some(0),
                    })
                    .collect();
                let mut blk = Block { shared: e.shared.iter().map(|&(_, n)| vec![f32::NAN; n]).collect(), written: HashMap::new(), read: HashMap::new() };
                // Every thread runs to the next barrier (or its end); all must stop at the same one.
                while threads.iter().any(|t| t.pc.is_some()) {
                    for t in threads.iter_mut() {
                        exec(e, t, &mut mem, &mut blk, &mut written, &mut nc_read)
                            .map_err(|m| format!("{} (block {b}, thread {}): {m}", e.name, t.special[2]))?;
                    }
                    let stops: HashSet<Option<usize>> = threads.iter().map(|t| t.pc).collect();
                    if stops.len() > 1 {
                        return Err(format!("{} (block {b}): threads stopped at different barriers or returned: {stops:?}", e.name));
                    }
                    blk.written.clear();
                    blk.read.clear();
                }
            }
            if let Some(a) = nc_read.intersection(&written).next() {
                return Err(format!("{}: ld.global.nc of address {a:#x}, which the launch writes", e.name));
            }
        }
        let (offset, shape) = &program.output;
        Ok(Tensor::new(shape.clone(), mem[1][*offset..*offset + shape.iter().product::<usize>()].to_vec()).expect("sized"))
    }

    /// Runs `t` from where it stopped to its next barrier (left at the instruction after it) or its end.
    fn exec(e: &Entry, t: &mut Thread, mem: &mut [Vec<f32>], blk: &mut Block, written: &mut HashSet<u64>, nc_read: &mut HashSet<u64>) -> Result<(), String> {
        let Some(mut pc) = t.pc else { return Ok(()) };
        let mut steps = 0u64;
        while pc < e.code.len() {
            steps += 1;
            if steps > 50_000_000 {
                return Err("runs away".into());
            }
            let ins = &e.code[pc];
            pc += 1;
            if let Some((neg, p)) = ins.guard {
                if t.p[p] == neg {
                    continue;
                }
            }
            let a = &ins.args;
            let op = ins.op.as_str();
            let si = |x: u64| x as i64;
            match op {
                "ret" => {
                    t.pc = None;
                    return Ok(());
                }
                "bar.sync" => {
                    t.pc = Some(pc);
                    return Ok(());
                }
                "bra" => {
                    let Opd::Sym(l) = &a[0] else { return Err("branch target".into()) };
                    pc = *e.labels.get(l).ok_or(format!("no label {l}"))?;
                }
                "mov.u32" | "mov.u64" | "mov.b64" | "cvta.to.global.u64" | "cvt.u64.u32" => {
                    let v = t.i(&a[1]);
                    t.set_i(&a[0], v)
                }
                "mov.f32" => {
                    let v = t.f(&a[1]);
                    t.set_f(&a[0], v)
                }
                // Bits between a float and a 32-bit register (bfloat16 weights).
                "mov.b32" => match (&a[0], &a[1]) {
                    (Opd::R(_), Opd::F(_)) => {
                        let v = t.f(&a[1]).to_bits();
                        t.set_i(&a[0], v as u64)
                    }
                    (Opd::F(_), Opd::R(_)) => {
                        let v = f32::from_bits(t.i(&a[1]) as u32);
                        t.set_f(&a[0], v)
                    }
                    _ => return Err(format!("mov.b32 {a:?}")),
                },
                "shl.b32" | "and.b32" => {
                    let (x, y) = (t.i(&a[1]) as u32, t.i(&a[2]) as u32);
                    t.set_i(&a[0], if op == "shl.b32" { x << y } else { x & y } as u64)
                }
                "ld.param.u64" => {
                    let Opd::Mem(b, 0) = &a[1] else { return Err("param address".into()) };
                    let Opd::Sym(s) = &**b else { return Err("param name".into()) };
                    let n: usize = s.strip_prefix("param_").and_then(|n| n.parse().ok()).ok_or("param name")?;
                    let v = *t.params.get(n).ok_or("no such param")?;
                    t.set_i(&a[0], v)
                }
                "setp.lt.s64" | "setp.le.s64" | "setp.eq.s64" | "setp.ne.s64" | "setp.ge.s64" => {
                    let (x, y) = (si(t.i(&a[1])), si(t.i(&a[2])));
                    let v = match &op[5..7] {
                        "lt" => x < y,
                        "le" => x <= y,
                        "eq" => x == y,
                        "ne" => x != y,
                        _ => x >= y,
                    };
                    let Opd::P(p) = a[0] else { return Err("setp target".into()) };
                    t.p[p] = v;
                }
                "selp.b64" | "selp.f32" => {
                    let Opd::P(p) = a[3] else { return Err("selp predicate".into()) };
                    let src = if t.p[p] { &a[1] } else { &a[2] };
                    if op == "selp.b64" {
                        let v = t.i(src);
                        t.set_i(&a[0], v)
                    } else {
                        let v = t.f(src);
                        t.set_f(&a[0], v)
                    }
                }
                "mad.lo.s64" => {
                    let v = t.i(&a[1]).wrapping_mul(t.i(&a[2])).wrapping_add(t.i(&a[3]));
                    t.set_i(&a[0], v)
                }
                "fma.rn.f32" => {
                    let v = t.f(&a[1]).mul_add(t.f(&a[2]), t.f(&a[3]));
                    t.set_f(&a[0], v)
                }
                "sqrt.rn.f32" => {
                    let v = t.f(&a[1]).sqrt();
                    t.set_f(&a[0], v)
                }
                "ex2.approx.f32" | "lg2.approx.f32" => {
                    let x = t.f(&a[1]);
                    t.set_f(&a[0], if op.starts_with("ex2") { x.exp2() } else { x.log2() })
                }
                _ if op.starts_with("ld.") || op.starts_with("st.") => {
                    let (local, shared) = (op.contains(".local"), op.contains(".shared"));
                    let (mem_arg, regs) = if op.starts_with("ld.") { (&a[1], &a[0]) } else { (&a[0], &a[1]) };
                    let addr = t.addr(mem_arg);
                    let lanes: Vec<&Opd> = match regs {
                        Opd::Vec(v) => v.iter().collect(),
                        r => vec![r],
                    };
                    if !addr.is_multiple_of(4) || (lanes.len() == 4 && !addr.is_multiple_of(16)) {
                        return Err(format!("{op}: misaligned address {addr:#x}"));
                    }
                    let (region, byte) = (addr >> SHIFT, (addr & ((1 << SHIFT) - 1)) as usize);
                    if local != (LOCAL..SHARED).contains(&region) || shared != (region >= SHARED) {
                        return Err(format!("{op} of address {addr:#x} in another state space"));
                    }
                    for (l, r) in lanes.into_iter().enumerate() {
                        let idx = byte / 4 + l;
                        let value = if op.starts_with("st.") { t.f(r) } else { 0.0 };
                        let a = addr + 4 * l as u64;
                        if shared {
                            blk.access(a, t.special[2], op.starts_with("st."))?;
                        }
                        let space = match (local, shared) {
                            (true, _) => t.locals.get_mut((region - LOCAL) as usize),
                            (_, true) => blk.shared.get_mut((region - SHARED) as usize),
                            _ => mem.get_mut(region as usize),
                        };
                        let cell = space.and_then(|m| m.get_mut(idx)).ok_or(format!("{op}: address {addr:#x} (+{l}) is outside its buffer"))?;
                        if op.starts_with("ld.") {
                            let v = *cell;
                            if op.contains(".nc") {
                                nc_read.insert(a);
                            }
                            t.set_f(r, v);
                        } else {
                            *cell = value;
                            if !local && !shared {
                                written.insert(a);
                            }
                        }
                    }
                }
                _ if op.ends_with(".s64") || op.ends_with(".b64") || op.ends_with(".u64") || op.ends_with(".u32") => {
                    let (x, y) = (t.i(&a[1]), t.i(&a[2]));
                    let v = match op {
                        "add.s64" => x.wrapping_add(y),
                        "sub.s64" => x.wrapping_sub(y),
                        "mul.lo.s64" => x.wrapping_mul(y),
                        "div.s64" => si(x).checked_div(si(y)).ok_or("division by zero")? as u64,
                        "rem.s64" => si(x).checked_rem(si(y)).ok_or("division by zero")? as u64,
                        "div.u64" => x.checked_div(y).ok_or("division by zero")?,
                        "min.s64" => si(x).min(si(y)) as u64,
                        "max.s64" => si(x).max(si(y)) as u64,
                        "and.b64" => x & y,
                        "mul.wide.u32" => (x as u32 as u64) * (y as u32 as u64),
                        _ => return Err(format!("unknown instruction {op}")),
                    };
                    t.set_i(&a[0], v)
                }
                _ => {
                    let (x, y) = (t.f(&a[1]), t.f(&a[2]));
                    let nan_or = |v: f32| if x.is_nan() || y.is_nan() { f32::NAN } else { v };
                    let v = match op {
                        "add.rn.f32" => x + y,
                        "sub.rn.f32" => x - y,
                        "mul.rn.f32" => x * y,
                        "div.rn.f32" => x / y,
                        // −0 < +0, NaN in → NaN out (Cranelift's fmin/fmax, PTX's .NaN).
                        "min.NaN.f32" => nan_or(if x < y || (x == y && x.is_sign_negative()) { x } else { y }),
                        "max.NaN.f32" => nan_or(if x > y || (x == y && x.is_sign_positive()) { x } else { y }),
                        _ => return Err(format!("unknown instruction {op}")),
                    };
                    t.set_f(&a[0], v)
                }
            }
        }
        Err("fell off the end".into())
    }
}

/// Small models covering every op the lowering has (and the conv paths: im2col, direct 1×1, Winograd).
const CASES: [(&str, &str); 14] = [
    (
        "conv_bn_relu_maxpool_grouped",
        "model T {\n    c = L.Convolution2D(4, 6, 3, pad=1, groups=2)\n    bn = L.BatchNormalization(6)\n    forward(x: [4, 9, 9]) {\n        return F.max_pooling_2d(F.relu(self.bn(self.c(x))), 3, stride=2)\n    }\n}\n",
    ),
    (
        "conv_strided_nobias_then_direct_1x1",
        "model T {\n    a = L.Convolution2D(3, 13, 5, stride=2, pad=2, nobias=True)\n    b = L.Convolution2D(13, 5, 1)\n    forward(x: [3, 11, 10]) {\n        return self.b(F.relu(self.a(x)))\n    }\n}\n",
    ),
    ("inception_concat", "model T {\n    i = L.Inception(5, 3, 2, 4, 2, 3, 2)\n    forward(x: [5, 6, 6]) {\n        return self.i(x)\n    }\n}\n"),
    (
        "lrn_avgpool_softmax",
        "model T {\n    forward(x: [7, 6, 6]) {\n        return F.softmax(F.average_pooling_2d(F.local_response_normalization(x), 3, stride=2, pad=1))\n    }\n}\n",
    ),
    (
        "linear_relu_linear",
        "model T {\n    a = L.Linear(75, 12)\n    b = L.Linear(12, 7)\n    forward(x: [3, 5, 5]) {\n        return self.b(F.relu(self.a(x)))\n    }\n}\n",
    ),
    (
        "residual_add_and_batch_norm",
        "model T {\n    bn = L.BatchNormalization(4)\n    c = L.Convolution2D(4, 4, 3, pad=1, nobias=True)\n    forward(x: [4, 5, 5]) {\n        h = self.bn(x)\n        return F.relu(self.c(h) + x)\n    }\n}\n",
    ),
    // A stride-2 block with a projection shortcut: the add fused into one convolution (the AVX-512 tier
    // packs this one's columns on the fly).
    (
        "residual_strided_projection",
        "model T {\n    c = L.Convolution2D(6, 8, 3, stride=2, pad=1)\n    d = L.Convolution2D(6, 8, 1, stride=2, nobias=True)\n    forward(x: [6, 9, 9]) {\n        return F.relu(self.c(x) + self.d(x))\n    }\n}\n",
    ),
    ("winograd_residual", "model T {\n    c = L.Convolution2D(5, 5, 3, pad=1)\n    forward(x: [5, 11, 11]) {\n        return F.relu(self.c(x) + x)\n    }\n}\n"),
    // Dilated taps read through packed panels (on the fly in the AVX-512 tier: a strided conv).
    (
        "conv_dilated_strided",
        "model T {\n    c = L.Convolution2D(3, 5, 3, stride=2, pad=2, dilate=2)\n    forward(x: [3, 11, 10]) {\n        return F.relu(self.c(x))\n    }\n}\n",
    ),
    ("deep_k_slices", "model T {\n    c = L.Convolution2D(40, 8, 3, pad=1)\n    forward(x: [40, 4, 4]) {\n        return F.relu(self.c(x))\n    }\n}\n"),
    // Lowered with Winograd F(4×4, 3×3) forced on (see the test); 11 × 11 leaves partial tiles.
    ("winograd_conv_relu_pool", "model T {\n    c = L.Convolution2D(5, 6, 3, pad=1)\n    forward(x: [5, 11, 11]) {\n        return F.max_pooling_2d(F.relu(self.c(x)), 3, stride=2)\n    }\n}\n"),
    // F(2×2, 3×3), and F(3×3, 5×5) with its ½ interpolation point: partial tiles again.
    ("winograd_m2_conv", "model T {\n    c = L.Convolution2D(4, 5, 3, pad=1)\n    forward(x: [4, 7, 7]) {\n        return F.relu(self.c(x))\n    }\n}\n"),
    ("winograd_m3_conv5", "model T {\n    c = L.Convolution2D(3, 5, 5, pad=2)\n    forward(x: [3, 8, 8]) {\n        return self.c(x)\n    }\n}\n"),
    // Lowered with bfloat16 linear weights (see the test): pairs in f32 slots, scalar tails (k = 75, 12).
    (
        "bf16_linear_relu_linear",
        "model T {\n    a = L.Linear(75, 12)\n    b = L.Linear(12, 7)\n    forward(x: [3, 5, 5]) {\n        return self.b(F.relu(self.a(x)))\n    }\n}\n",
    ),
];

/// Random parameters (the same generator as the JIT tests') and a random input.
fn bound(g: &cnnc::ir::Graph) -> cnnc::weights::Bound {
    let params = g
        .params()
        .into_iter()
        .map(|s| {
            let n = s.shape.iter().product();
            let mut v: Vec<f32> = cnnc_runtime::rng::normal(&s.key, n).map(|v| v as f32 * 0.5).collect();
            if s.key.ends_with("var") {
                v.iter_mut().for_each(|x| *x = x.abs() + 0.5);
            }
            (s.clone(), Tensor::new(s.shape.clone(), v).expect("sized"))
        })
        .collect();
    cnnc::weights::Bound { params, notes: vec![] }
}

#[test]
fn emitted_ptx_computes_what_the_jit_computes() {
    for (name, text) in CASES {
        let src = cnnc::diag::Source::new(name, text);
        let (g, _) = cnnc::compile(&src).unwrap_or_else(|f| panic!("{name}: {}", src.render_plain(&f.0)));
        let (g, _) = cnnc::opt::optimize(&g, &cnnc::opt::Options { level: 1, model: cnnc::opt::lang::CUDA });
        let uses_math = text.contains("softmax") || text.contains("local_response");
        for batch in [1, 3] {
            let shape = [vec![batch], g.node(g.inputs[0]).shape.clone()].concat();
            let x = Tensor::new(shape.clone(), cnnc_runtime::rng::normal("x", shape.iter().product()).map(|v| v as f32).collect()).expect("sized");
            let winograd = match name {
                n if n.starts_with("winograd_m2") => Winograd::M2,
                n if n.starts_with("winograd_m3") => Winograd::M3,
                n if n.starts_with("winograd") => Winograd::M4,
                _ => Winograd::Auto,
            };
            let dtype = if name.starts_with("bf16") { WeightsDtype::Bf16 } else { WeightsDtype::F32 };
            let lowering = |tier| Lowering { tier, winograd, fc_weights: dtype, ..Lowering::new(tier) };
            let cpu = cnnc::kernel::program_with(&g, bound(&g), batch, lowering(Tier::Portable));
            let want = cnnc::jit::compile(&cpu, cnnc::jit::Options { checked: true }).expect("jit").exe.run(&[&x], 1).expect("runs");
            for tier in Tier::ALL {
                let p = cnnc::kernel::program_with(&g, bound(&g), batch, lowering(tier));
                let what = format!("{name}, batch {batch}, {tier:?} tier");
                let got = emu::run(&ptx::emit(&p, 80).expect("emits"), &p, &[&x]).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(got.shape(), want.shape(), "{what}");
                if uses_math {
                    // exp and ln on the GPU are not the CPU's (see ptx/mod.rs); here exp2/log2 stand in.
                    let tol = 1e-5 * want.max_abs().max(1e-30);
                    assert!(got.max_abs_diff(&want) <= tol, "{what}: max diff {} > {tol}", got.max_abs_diff(&want));
                } else {
                    let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert!(bits(&got) == bits(&want), "{what}: not the JIT's bytes\n{:?}\n{:?}", got, want);
                }
            }
            // The GPU-shaped lowering sums in other orders (split-K, the GEMV's tree, pooling's windows).
            let p = cnnc::kernel::program_with(&g, bound(&g), batch, Lowering { fc_weights: dtype, ..Lowering::gpu() });
            let what = format!("{name}, batch {batch}, gpu lowering");
            let got = emu::run(&ptx::emit(&p, 80).expect("emits"), &p, &[&x]).unwrap_or_else(|e| panic!("{what}: {e}"));
            let tol = 1e-5 * want.max_abs().max(1e-30);
            assert!(got.shape() == want.shape() && got.max_abs_diff(&want) <= tol, "{what}: max diff {} > {tol}", got.max_abs_diff(&want));
        }
    }
}

/// A layer the GPU lowering has its own kernels for (tract's problem style): a convolution with its
/// epilogue, a linear layer or a pooling, over a small batch. [`GpuProblem::reference`] is the reference
/// interpreter; the emitted PTX, run by [`emu`], must agree within 1e-5 × max |reference| (split-K, the
/// GEMV's tree and pooling's window order round differently from it).
#[derive(Clone, Debug)]
struct GpuProblem {
    batch: usize,
    c: usize,
    hw: [usize; 2],
    layer: GpuLayer,
}

#[derive(Clone, Debug)]
enum GpuLayer {
    /// `groups`, out channels, kernel, stride, pad, dilation, bias, ReLU, a residual add of a twin
    /// convolution, a max pool (k, stride) after it.
    Conv {
        groups: usize,
        out: usize,
        k: [usize; 2],
        stride: usize,
        pad: usize,
        dilate: usize,
        bias: bool,
        relu: bool,
        add: bool,
        pool: Option<[usize; 2]>,
    },
    Linear {
        out: usize,
        relu: bool,
    },
    Pool {
        max: bool,
        k: usize,
        stride: usize,
        pad: usize,
        flag: bool,
    },
}

impl GpuProblem {
    fn source(&self) -> String {
        let py = |b: bool| if b { "True" } else { "False" };
        let (links, body) = match &self.layer {
            GpuLayer::Conv { groups, out, k, stride, pad, dilate, bias, relu, add, pool } => {
                let conv = |name: &str, bias: bool| {
                    let [kh, kw] = k;
                    format!(
                        "    {name} = L.Convolution2D({}, {out}, ({kh}, {kw}), stride={stride}, pad={pad}, dilate={dilate}, groups={groups}, nobias={})\n",
                        self.c,
                        py(!bias)
                    )
                };
                let (mut links, mut body) = (conv("l", *bias), "self.l(x)".to_string());
                if *add {
                    links += &conv("m", !bias);
                    body += " + self.m(x)";
                }
                if *relu {
                    body = format!("F.relu({body})");
                }
                if let Some([k, s]) = pool {
                    body = format!("F.max_pooling_2d({body}, {k}, stride={s})");
                }
                (links, body)
            }
            GpuLayer::Linear { out, relu } => {
                let body = if *relu { "F.relu(self.l(x))" } else { "self.l(x)" };
                (format!("    l = L.Linear({}, {out})\n", self.c * self.hw[0] * self.hw[1]), body.to_string())
            }
            GpuLayer::Pool { max: true, k, stride, pad, flag } => {
                (String::new(), format!("F.max_pooling_2d(x, {k}, stride={stride}, pad={pad}, cover_all={})", py(*flag)))
            }
            GpuLayer::Pool { max: false, k, stride, pad, flag } => {
                (String::new(), format!("F.average_pooling_2d(x, {k}, stride={stride}, pad={pad}{})", if *flag { ", pad_value=None" } else { "" }))
            }
        };
        let [h, w] = self.hw;
        format!("model Case {{\n{links}    forward(x: [{}, {h}, {w}]) {{\n        return {body}\n    }}\n}}\n", self.c)
    }

    fn graph(&self) -> Option<cnnc::ir::Graph> {
        let src = cnnc::diag::Source::new("case.model", self.source());
        let (g, _) = cnnc::compile(&src).ok()?;
        Some(cnnc::opt::optimize(&g, &cnnc::opt::Options { level: 1, model: cnnc::opt::lang::CUDA }).0)
    }

    fn input(&self) -> Tensor {
        let shape = vec![self.batch, self.c, self.hw[0], self.hw[1]];
        Tensor::new(shape.clone(), cnnc_runtime::rng::normal("x", shape.iter().product()).map(|v| v as f32).collect()).expect("sized")
    }

    /// The reference interpreter's output.
    fn reference(&self, g: &cnnc::ir::Graph) -> Tensor {
        cnnc::lower::lower(g, bound(g)).expect("lowers").run(vec![self.input()]).expect("runs")
    }

    fn check(&self) {
        let g = self.graph().unwrap_or_else(|| panic!("does not compile:\n{}", self.source()));
        let want = self.reference(&g);
        let p = cnnc::kernel::program_with(&g, bound(&g), self.batch, Lowering::gpu());
        let got = emu::run(&ptx::emit(&p, 90).expect("emits"), &p, &[&self.input()]).unwrap_or_else(|e| panic!("{e}\n{}", self.source()));
        let tol = 1e-5 * want.max_abs().max(1e-30);
        assert!(got.shape() == want.shape() && got.max_abs_diff(&want) <= tol, "max diff {} > {tol}\n{}", got.max_abs_diff(&want), self.source());
    }
}

fn gpu_problem() -> impl proptest::strategy::Strategy<Value = GpuProblem> {
    use proptest::prelude::*;
    let conv = (1usize..3, 1usize..17, 1usize..40, (1usize..4, 1usize..4), 1usize..3, 0usize..2, 1usize..3, any::<[bool; 3]>(), any::<bool>()).prop_map(
        |(groups, cg, out_g, (kh, kw), stride, pad, dilate, [bias, relu, add], pool)| {
            let pool = (pool && !add).then_some([2, 2]);
            (groups * cg, GpuLayer::Conv { groups, out: out_g * groups, k: [kh, kw], stride, pad, dilate, bias, relu, add, pool })
        },
    );
    let linear = (1usize..6, 1usize..70, any::<bool>()).prop_map(|(c, out, relu)| (c, GpuLayer::Linear { out, relu }));
    let pool = (1usize..4, any::<bool>(), 1usize..4, 1usize..3, 0usize..2, any::<bool>())
        .prop_map(|(c, max, k, stride, pad, flag)| (c, GpuLayer::Pool { max, k, stride, pad: pad.min(k - 1), flag }));
    (prop_oneof![3 => conv, 1 => linear, 1 => pool], 1usize..3, 1usize..10, 1usize..10).prop_map(|((c, layer), batch, h, w)| GpuProblem {
        batch,
        c,
        hw: [h, w],
        layer,
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 128, ..Default::default() })]
    #[test]
    fn gpu_kernels_match_the_reference(p in gpu_problem()) {
        proptest::prop_assume!(p.graph().is_some());
        p.check();
    }
}

fn gpu_conv(batch: usize, c: usize, hw: usize, out: usize, k: usize, groups: usize) -> GpuProblem {
    let layer = GpuLayer::Conv { groups, out, k: [k, k], stride: 1, pad: k / 2, dilate: 1, bias: true, relu: true, add: false, pool: None };
    GpuProblem { batch, c, hw: [hw, hw], layer }
}

/// 65 output channels and 65 pixels: one row and one column past the 64 × 64 tile, both stored only
/// where they exist.
#[test]
fn gpu_tile_edges() {
    gpu_conv(1, 3, 13, 65, 1, 1).check();
    gpu_conv(1, 2, 5, 65, 3, 1).check();
}

/// k = 36·3·3 = 324 is 41 slices: split in two (a partial tile each), summed by the second launch,
/// with the residual add applied there.
#[test]
fn gpu_split_k_with_add() {
    let layer = GpuLayer::Conv { groups: 1, out: 6, k: [3, 3], stride: 1, pad: 1, dilate: 1, bias: true, relu: true, add: true, pool: None };
    let p = GpuProblem { batch: 1, c: 36, hw: [4, 4], layer };
    let g = p.graph().expect("compiles");
    let program = cnnc::kernel::program_with(&g, bound(&g), 1, Lowering::gpu());
    assert!(program.launches.iter().any(|l| l.kernel.name.ends_with(".splitk_sum")), "not split");
    p.check();
}

/// Linear layers at batch 1 (the GEMV: k a multiple of 4 takes vector loads, 75 does not; rows past the
/// last block of four are not stored) and at batch 2 (the GEMM).
#[test]
fn gpu_linear_layers() {
    for (batch, c, out) in [(1, 4, 10), (1, 3, 7), (2, 3, 66)] {
        GpuProblem { batch, c, hw: [5, 5], layer: GpuLayer::Linear { out, relu: true } }.check();
    }
}
