//! PTX backend: kernel IR → PTX text for NVIDIA GPUs (`cnnc compile --target cuda --emit ptx`), and the
//! CUDA runtime that loads and runs it ([`cuda`]).
//!
//! Every launch of a [`Program`] becomes one `.visible .entry` (PTX ISA 7.8, `.target sm_80` by default,
//! 64-bit addresses) with one `.param .u64` device pointer per buffer the runtime passes in
//! ([`Kernel::args`]). The IR's parallel loop maps to the grid: each thread is one task, `task =
//! ctaid.x·ntid.x + tid.x` of `ntasks = nctaid.x·ntid.x`, and runs `lo..hi = extent·task/ntasks ..
//! extent·(task+1)/ntasks` exactly as the JIT's tasks do; [`launch_config`] launches at least `extent`
//! threads, so every parallel iteration is its own thread. A GPU-shaped kernel (`Kernel::block`, from
//! the cuda backend's lowering, `kernel/gpu.rs`) maps directly instead: block `ctaid.x` is `lo`, the
//! thread's number `tid.x`, `Access::Shared` buffers are `.shared` arrays and `Stmt::Barrier` is
//! `bar.sync 0`. Kernel variables become PTX registers (PTX
//! registers are mutable, so `Set` is a `mov` and no SSA is built), expressions become fresh temporaries,
//! loops and conditionals become labels and predicated branches, and each IR operation is printed from a
//! table of instruction templates ([`INT_OPS`], [`FLOAT_OPS`]). `Stmt::Gemm` (the assembled tiers' tiles) is
//! expanded into scalar IR loops with the tile's documented semantics before printing ([`expand_gemm`]),
//! and `Stmt::Call` (their native routines) into the portable tier's loops (`kernel::expand_calls`).
//!
//! Arithmetic is the JIT's: `add/sub/mul/div.rn.f32` (the `.rn` forbids ptxas from contracting a
//! multiply and an add into an FMA), `fma.rn.f32` for `fma`, and `min/max.NaN.f32`, which propagate NaN
//! like Cranelift's `fmin/fmax`. So everything but `exp` and `ln` rounds exactly as on the CPU. Those two
//! use the GPU's special function unit: `exp(x) = ex2.approx(x·log2 e)` (relative error about 2⁻²² +
//! |x|·2⁻²⁴) and `ln(x) = lg2.approx(x)·ln 2` (absolute error about 2⁻²²); they occur in LRN and softmax.
//!
//! Memory: loads of buffers that no store of the launch can reach (parameters, inputs of out-of-place
//! kernels) use `ld.global.nc` (the read-only cache); 4-lane loads and stores use `ld/st.v4.f32` where a
//! congruence analysis ([`Multiples`]) proves the element index a multiple of 4 and the buffer 16-byte
//! aligned (arena tensors are 64-byte aligned, device allocations 256-byte), and four scalar accesses
//! elsewhere. `Access::Local` buffers are per-thread `.local` arrays, `Access::Shared` ones `.shared`.
//!
//! This stage owns: the IR → PTX mapping, the launch geometry, and (in [`ptxas`]) finding and running
//! NVIDIA's assembler to validate the text offline. Invariant left: the text is one self-contained PTX
//! module whose `k{i}_…` entry is launch `i` of the program, takes exactly that launch's slots as
//! pointers in order, and computes what the kernel IR says (for CPU-shaped kernels the JIT's result,
//! bitwise except for `exp`/`ln`), when launched with [`launch_config`]'s geometry (its block size
//! declared as `.maxntid`; any grid for CPU-shaped kernels). [`roofline`] estimates what a launch
//! could reach on a GPU, beside ptxas's resources.

pub mod cuda;
pub mod ptxas;
pub mod roofline;

use crate::kernel::{Access, BRows, BinOp, Buf, Expr, Gemm, Kernel, Program, Slot, Stmt, Ty, UnOp, Var};
use std::fmt::Write as _;

/// The PTX ISA version every module declares.
pub const PTX_VERSION: &str = "7.8";
/// The default `.target` (Ampere; the code also loads on every later GPU through the driver's JIT).
pub const DEFAULT_SM: u32 = 80;
/// Targets PTX ISA 7.8 can name and the code supports (`min/max.NaN` needs sm_80).
pub const SUPPORTED_SM: [u32; 5] = [80, 86, 87, 89, 90];
/// Threads per block of every launch (declared as `.maxntid`).
pub const BLOCK: u32 = 128;

#[derive(Debug, thiserror::Error)]
pub enum PtxError {
    #[error("sm_{0} is not a supported CUDA target (PTX ISA 7.8 and the code need one of sm_80, sm_86, sm_87, sm_89, sm_90)")]
    Sm(u32),
    #[error("kernel `{kernel}` cannot be printed as PTX: {message}")]
    Kernel { kernel: String, message: String },
}

/// The launch geometry of a kernel: (blocks, threads per block), at least one thread per parallel
/// iteration (capped at 2³¹ − 1 blocks; the kernel then gives threads several iterations); a
/// GPU-shaped kernel's own grid and block.
pub fn launch_config(kernel: &Kernel) -> (u32, u32) {
    if let Some(threads) = kernel.block {
        return (kernel.extent as u32, threads);
    }
    let grid = kernel.extent.div_ceil(BLOCK as usize).clamp(1, i32::MAX as usize) as u32;
    (grid, BLOCK)
}

/// The name of launch `index`'s entry: `k{index}_` and the kernel name with every character PTX does
/// not allow in identifiers replaced by `_`.
pub fn entry_name(index: usize, kernel: &Kernel) -> String {
    let clean: String = kernel.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '$' { c } else { '_' }).collect();
    format!("k{index}_{clean}")
}

/// The entry a line of emitted PTX (1-based, as ptxas reports it) belongs to.
pub fn entry_at_line(ptx: &str, line: usize) -> Option<&str> {
    ptx.lines().take(line).filter_map(|l| l.strip_prefix(".visible .entry ")).last().map(|l| l.trim_end_matches('('))
}

/// Prints every launch of `program` as one PTX module for `.target sm_{sm}`.
pub fn emit(program: &Program, sm: u32) -> Result<String, PtxError> {
    if !SUPPORTED_SM.contains(&sm) {
        return Err(PtxError::Sm(sm));
    }
    let mut out = format!(
        "//\n// Generated by cnnc {} from the kernel IR: batch {}, {} launches, arena {} floats.\n//\n\n.version {PTX_VERSION}\n.target sm_{sm}\n.address_size 64\n",
        env!("CARGO_PKG_VERSION"),
        program.batch,
        program.launches.len(),
        program.arena_len
    );
    let mr = program.tier.mr();
    for (i, l) in program.launches.iter().enumerate() {
        let err = |message: String| PtxError::Kernel { kernel: l.kernel.name.clone(), message };
        let args = l.kernel.args().count();
        if args != l.slots.len() {
            return Err(err(format!("{} slots for {args} argument buffers", l.slots.len())));
        }
        out += &entry(i, &l.kernel, &l.slots, mr).map_err(err)?;
    }
    Ok(out)
}

/// Integer operations: (IR op, instruction). Comparisons are `setp` + `selp` (0 or 1).
pub const INT_OPS: [(BinOp, &str); 11] = [
    (BinOp::Add, "add.s64"),
    (BinOp::Sub, "sub.s64"),
    (BinOp::Mul, "mul.lo.s64"),
    (BinOp::Div, "div.s64"),
    (BinOp::Rem, "rem.s64"),
    (BinOp::Min, "min.s64"),
    (BinOp::Max, "max.s64"),
    (BinOp::And, "and.b64"),
    (BinOp::Lt, "setp.lt.s64"),
    (BinOp::Le, "setp.le.s64"),
    (BinOp::Eq, "setp.eq.s64"),
];

/// Float operations, per lane for f32x4: (IR op, instruction). No float remainder or comparison exists.
pub const FLOAT_OPS: [(BinOp, &str); 6] = [
    (BinOp::Add, "add.rn.f32"),
    (BinOp::Sub, "sub.rn.f32"),
    (BinOp::Mul, "mul.rn.f32"),
    (BinOp::Div, "div.rn.f32"),
    (BinOp::Min, "min.NaN.f32"),
    (BinOp::Max, "max.NaN.f32"),
];

/// log2(e) and ln(2), for `exp` and `ln` on the special function unit.
const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN_2: f32 = std::f32::consts::LN_2;

/// A value: an operand (register or immediate) per lane.
#[derive(Clone, Debug, PartialEq)]
enum Val {
    I(String),
    F(String),
    V([String; 4]),
}

fn imm_f32(v: f32) -> String {
    format!("0f{:08X}", v.to_bits())
}

fn is_reg(op: &str) -> bool {
    op.starts_with('%')
}

/// Where one buffer lives: its base register, its state space and load flavour, its alignment.
struct Base {
    reg: String,
    space: &'static str,
    /// Loads may use the non-coherent read-only cache (`ld.global.nc`).
    nc: bool,
    /// The base address is 16-byte aligned.
    aligned: bool,
}

/// Prints launch `index`.
fn entry(index: usize, k: &Kernel, slots: &[Slot], mr: usize) -> Result<String, String> {
    let k = crate::kernel::expand_calls(&expand_gemm(k, mr));
    let mut written = vec![false; k.bufs.len()];
    Stmt::visit(&k.body, &mut |s| {
        if let Stmt::Store { buf, .. } = s {
            if let Some(w) = written.get_mut(buf.0 as usize) {
                *w = true;
            }
        }
    });
    let name = entry_name(index, &k);
    let mut g = Gen {
        code: String::new(),
        counts: [0; 3],
        label: 0,
        prefix: format!("$L_{index}_"),
        vars: vec![],
        var_regs: [0; 3],
        bases: vec![],
        mult: Multiples::of(&k),
        thread: String::new(),
    };
    g.vars = k.vars.iter().map(|&t| g.fresh_var(t)).collect();
    g.var_regs = g.counts;
    // Each argument buffer's slot (None: a local array). Parameters are separate allocations: one
    // overlaps only itself.
    let mut params = vec![];
    let mut locals = vec![];
    let mut arg_slots = slots.iter();
    let ranges: Vec<Option<Slot>> = k.bufs.iter().map(|b| if b.passed() { arg_slots.next().copied() } else { None }).collect();
    let overlaps = |a: Slot, b: Slot| match (a, b) {
        (Slot::Arena { offset: o1, len: l1 }, Slot::Arena { offset: o2, len: l2 }) => o1 < o2 + l2 && o2 < o1 + l1,
        (Slot::Param(p), Slot::Param(q)) => p == q,
        _ => false,
    };
    for (i, b) in k.bufs.iter().enumerate() {
        let reg = g.tmp(Kind::Rd);
        let base = match ranges[i] {
            None if b.access == Access::Shared => {
                locals.push(format!("\t.shared .align 16 .b8 shared_{i}[{}];\n", 4 * b.len.max(1)));
                g.ins(format!("mov.u64 {reg}, shared_{i}"));
                Base { reg, space: "shared", nc: false, aligned: true }
            }
            None => {
                locals.push(format!("\t.local .align 16 .b8 local_{i}[{}];\n", 4 * b.len.max(1)));
                g.ins(format!("mov.u64 {reg}, local_{i}"));
                Base { reg, space: "local", nc: false, aligned: true }
            }
            Some(slot) => {
                params.push((format!(".param .u64 param_{}", params.len()), format!("b{i}: {}[{}] {:?}", b.name, b.len, b.access)));
                g.ins(format!("ld.param.u64 {reg}, [param_{}]", params.len() - 1));
                g.ins(format!("cvta.to.global.u64 {reg}, {reg}"));
                let alone = (0..k.bufs.len()).all(|j| !written[j] || ranges[j].is_none_or(|s| !overlaps(slot, s)));
                let aligned = match slot {
                    Slot::Arena { offset, .. } => offset.is_multiple_of(4),
                    Slot::Param(_) => true,
                };
                Base { reg, space: "global", nc: !written[i] && alone, aligned }
            }
        };
        g.bases.push(base);
    }
    g.prologue(k.extent, k.block.is_some());
    let done = g.new_label();
    let (lo, hi) = (g.var(Kernel::LO)?, g.var(Kernel::HI)?);
    let p = g.tmp(Kind::P);
    g.ins(format!("setp.ge.s64 {p}, {lo}, {hi}"));
    g.ins(format!("@{p} bra {done}"));
    g.block(&k.body)?;
    g.code += &format!("{done}:\n\tret;\n");

    let [np, nrd, nf] = g.counts;
    let n = params.len();
    let params: String = params.iter().enumerate().map(|(j, (decl, note))| format!("\t{decl}{} // {note}\n", if j + 1 < n { "," } else { "" })).collect();
    let shape = match k.block {
        None => format!("parallel lo..hi in 0..{}", k.extent),
        Some(t) => format!("blocks lo in 0..{} of {t} threads", k.extent),
    };
    // GPU-shaped kernels keep a tile of accumulators in registers. ptxas's default held some GEMMs to
    // 64 registers and spilled; one resident block per multiprocessor gave the 128 × 128 tile 130, so
    // that a block's wait at a barrier left the multiprocessor idle. Two blocks: at most 128 each.
    let min_blocks = if k.block.is_some() { ".minnctapersm 2\n" } else { "" };
    let mut out = format!("\n// {}: {shape}\n.visible .entry {name}(\n{params})\n.maxntid {}, 1, 1\n{min_blocks}{{\n", k.name, launch_config(&k).1);
    out += &locals.concat();
    let _ = writeln!(out, "\t.reg .pred %p<{}>;\n\t.reg .b32 %r<5>;\n\t.reg .b64 %rd<{}>;\n\t.reg .f32 %f<{}>;\n", np.max(1), nrd.max(1), nf.max(1));
    out += &g.code;
    out += "}\n";
    Ok(out)
}

#[derive(Clone, Copy)]
enum Kind {
    P = 0,
    Rd = 1,
    F = 2,
}

struct Gen {
    code: String,
    /// Registers used so far: %p, %rd, %f.
    counts: [u32; 3],
    label: u32,
    prefix: String,
    vars: Vec<Val>,
    /// Registers below these numbers (%p, %rd, %f) belong to variables.
    var_regs: [u32; 3],
    bases: Vec<Base>,
    mult: Multiples,
    /// The register holding the thread's number in its block.
    thread: String,
}

impl Gen {
    fn ins(&mut self, s: impl AsRef<str>) {
        self.code += "\t";
        self.code += s.as_ref();
        self.code += ";\n";
    }

    fn tmp(&mut self, kind: Kind) -> String {
        let n = &mut self.counts[kind as usize];
        *n += 1;
        format!("{}{}", ["%p", "%rd", "%f"][kind as usize], *n - 1)
    }

    fn fresh_var(&mut self, t: Ty) -> Val {
        match t {
            Ty::I64 => Val::I(self.tmp(Kind::Rd)),
            Ty::F32 => Val::F(self.tmp(Kind::F)),
            Ty::F32x4 => Val::V(std::array::from_fn(|_| self.tmp(Kind::F))),
        }
    }

    fn new_label(&mut self) -> String {
        self.label += 1;
        format!("{}{}", self.prefix, self.label)
    }

    fn var(&self, v: Var) -> Result<String, String> {
        match self.vars.get(v.0 as usize) {
            Some(Val::I(r)) => Ok(r.clone()),
            _ => Err(format!("variable %v{} is not an i64 variable", v.0)),
        }
    }

    /// task, ntasks → lo, hi (variables 0 and 1), as the JIT computes them (unsigned division); for a
    /// GPU-shaped kernel (`blocks`), lo = the block's number, hi = lo + 1, and the thread's number.
    fn prologue(&mut self, extent: usize, blocks: bool) {
        let (lo, hi) = (self.var(Kernel::LO).unwrap_or_default(), self.var(Kernel::HI).unwrap_or_default());
        let (task, ntasks, t) = (self.tmp(Kind::Rd), self.tmp(Kind::Rd), self.tmp(Kind::Rd));
        for (i, sreg) in ["%ctaid.x", "%ntid.x", "%tid.x", "%nctaid.x"].iter().enumerate() {
            self.ins(format!("mov.u32 %r{i}, {sreg}"));
        }
        if blocks {
            self.thread = self.tmp(Kind::Rd);
            self.ins(format!("cvt.u64.u32 {}, %r2", self.thread));
            self.ins(format!("cvt.u64.u32 {lo}, %r0"));
            return self.ins(format!("add.s64 {hi}, {lo}, 1"));
        }
        let code = format!(
            "mul.wide.u32 {task}, %r0, %r1; cvt.u64.u32 {t}, %r2; add.s64 {task}, {task}, {t}; mul.wide.u32 {ntasks}, %r3, %r1; \
             mul.lo.s64 {lo}, {task}, {extent}; div.u64 {lo}, {lo}, {ntasks}; add.s64 {t}, {task}, 1; mul.lo.s64 {hi}, {t}, {extent}; div.u64 {hi}, {hi}, {ntasks}"
        );
        code.split("; ").for_each(|i| self.ins(i));
    }

    fn block(&mut self, body: &[Stmt]) -> Result<(), String> {
        body.iter().try_for_each(|s| self.stmt(s))
    }

    fn int(&mut self, e: &Expr) -> Result<String, String> {
        match self.expr(e)? {
            Val::I(x) => Ok(x),
            _ => Err(format!("`{e}` is not an integer")),
        }
    }

    /// A register holding `op` (immediates are moved into one).
    fn reg(&mut self, op: String, kind: Kind) -> String {
        if is_reg(&op) {
            return op;
        }
        let r = self.tmp(kind);
        self.ins(format!("mov.{} {r}, {op}", if matches!(kind, Kind::F) { "f32" } else { "b64" }));
        r
    }

    fn stmt(&mut self, s: &Stmt) -> Result<(), String> {
        match s {
            Stmt::Set(v, e) => {
                let (dst, x) = (self.vars.get(v.0 as usize).cloned().ok_or_else(|| format!("unknown variable %v{}", v.0))?, self.expr(e)?);
                match (dst, x) {
                    (Val::I(d), Val::I(x)) => self.assign("b64", &d, &x),
                    (Val::F(d), Val::F(x)) => self.assign("f32", &d, &x),
                    (Val::V(d), Val::V(x)) => (0..4).for_each(|l| self.mov("f32", &d[l], &x[l])),
                    _ => return Err(format!("`%v{} = {e}` assigns a value of another type", v.0)),
                }
            }
            Stmt::Store { buf, idx, value } => {
                let x = self.expr(value)?;
                let (base, off) = self.addr(*buf, idx)?;
                let b = &self.bases[buf.0 as usize];
                let (space, aligned) = (b.space, b.aligned && self.mult.of_expr(idx).is_multiple_of(4));
                match x {
                    Val::F(x) => {
                        let x = self.reg(x, Kind::F);
                        self.ins(format!("st.{space}.f32 [{base}{}], {x}", disp(off)));
                    }
                    Val::V(x) => {
                        // One register per distinct immediate (a splat of a constant needs one).
                        let mut regs: Vec<(String, String)> = vec![];
                        let x = x.map(|l| match regs.iter().find(|(op, _)| *op == l) {
                            Some((_, r)) => r.clone(),
                            None => {
                                let r = self.reg(l.clone(), Kind::F);
                                regs.push((l, r.clone()));
                                r
                            }
                        });
                        if aligned {
                            self.ins(format!("st.{space}.v4.f32 [{base}{}], {{{}}}", disp(off), x.join(", ")));
                        } else {
                            for (l, x) in x.iter().enumerate() {
                                self.ins(format!("st.{space}.f32 [{base}{}], {x}", disp(off + 4 * l as i64)));
                            }
                        }
                    }
                    Val::I(_) => return Err(format!("store of the integer `{value}`")),
                }
            }
            Stmt::For { var, lo, hi, step, body } => {
                let v = self.var(*var)?;
                let lo = self.int(lo)?;
                // `hi` is evaluated once: a variable's register could change in the body.
                let hi = self.int(hi)?;
                let hi = if is_reg(&hi) && !self.is_temp(&hi) {
                    let t = self.tmp(Kind::Rd);
                    self.mov("b64", &t, &hi);
                    t
                } else {
                    hi
                };
                self.assign("b64", &v, &lo);
                let (head, exit) = (self.new_label(), self.new_label());
                let p = self.tmp(Kind::P);
                self.code += &format!("{head}:\n");
                self.ins(format!("setp.lt.s64 {p}, {v}, {hi}"));
                self.ins(format!("@!{p} bra {exit}"));
                self.block(body)?;
                self.ins(format!("add.s64 {v}, {v}, {step}"));
                self.ins(format!("bra {head}"));
                self.code += &format!("{exit}:\n");
            }
            Stmt::If { cond, then, els } => {
                let c = self.int(cond)?;
                if !is_reg(&c) {
                    return self.block(if c != "0" { then } else { els });
                }
                let p = self.tmp(Kind::P);
                let (other, end) = (self.new_label(), self.new_label());
                self.ins(format!("setp.eq.s64 {p}, {c}, 0"));
                self.ins(format!("@{p} bra {}", if els.is_empty() { &end } else { &other }));
                self.block(then)?;
                if !els.is_empty() {
                    self.ins(format!("bra {end}"));
                    self.code += &format!("{other}:\n");
                    self.block(els)?;
                }
                self.code += &format!("{end}:\n");
            }
            Stmt::Gemm(_) => return Err("a gemm statement survived expansion".into()),
            Stmt::Call(_) => return Err("a native call survived expansion".into()),
            Stmt::Barrier => self.ins("bar.sync 0"),
        }
        Ok(())
    }

    /// `dst = src` for a variable's register `dst`. When `src` is the temporary the last instruction
    /// computed (temporaries are used once), that instruction writes `dst` instead.
    fn assign(&mut self, ty: &str, dst: &str, src: &str) {
        if self.is_temp(src) {
            // The last line is `\t{op} {src}, …;\n`: the destination comes first.
            let start = self.code.trim_end_matches('\n').rfind('\n').map_or(0, |i| i + 1);
            let operand = self.code[start..].find(' ').map(|sp| start + sp + 1);
            if let Some(at) = operand.filter(|&at| self.code[at..].starts_with(&format!("{src},"))) {
                self.code.replace_range(at..at + src.len(), dst);
                return;
            }
        }
        self.mov(ty, dst, src)
    }

    /// Whether `op` is an expression temporary (not a variable's register, not an immediate).
    fn is_temp(&self, op: &str) -> bool {
        let reg = op.strip_prefix("%rd").map(|n| (Kind::Rd, n)).or_else(|| op.strip_prefix("%f").map(|n| (Kind::F, n)));
        reg.is_some_and(|(kind, n)| n.parse::<u32>().is_ok_and(|n| n >= self.var_regs[kind as usize]))
    }

    fn mov(&mut self, ty: &str, dst: &str, src: &str) {
        if dst != src {
            self.ins(format!("mov.{ty} {dst}, {src}"));
        }
    }

    /// The address of element `idx` of `buf`: a base register and a byte displacement (a constant
    /// term of the index is folded into the displacement).
    fn addr(&mut self, buf: Buf, idx: &Expr) -> Result<(String, i64), String> {
        let base = self.bases.get(buf.0 as usize).map(|b| b.reg.clone()).ok_or_else(|| format!("unknown buffer b{}", buf.0))?;
        let (var_part, c) = match idx {
            Expr::Bin(BinOp::Add, a, b) if matches!(**b, Expr::Int(_)) => (Some(&**a), if let Expr::Int(c) = **b { c } else { 0 }),
            Expr::Int(c) => (None, *c),
            _ => (Some(idx), 0),
        };
        let (var_part, disp) = c.checked_mul(4).filter(|d| i32::try_from(*d).is_ok()).map_or((Some(idx), 0), |d| (var_part, d));
        let Some(e) = var_part else { return Ok((base, disp)) };
        let i = self.int(e)?;
        let a = self.tmp(Kind::Rd);
        self.ins(format!("mad.lo.s64 {a}, {i}, 4, {base}"));
        Ok((a, disp))
    }

    fn expr(&mut self, e: &Expr) -> Result<Val, String> {
        Ok(match e {
            Expr::Int(v) => Val::I(v.to_string()),
            Expr::F32(v) => Val::F(imm_f32(*v)),
            Expr::Thread if self.thread.is_empty() => return Err("the thread's number, outside a GPU-shaped kernel".into()),
            Expr::Thread => Val::I(self.thread.clone()),
            Expr::Var(v) => self.vars.get(v.0 as usize).cloned().ok_or_else(|| format!("unknown variable %v{}", v.0))?,
            Expr::Bin(op, a, b) => {
                let (x, y) = (self.expr(a)?, self.expr(b)?);
                match (x, y) {
                    (Val::I(x), Val::I(y)) => Val::I(self.int_op(*op, &x, &y)?),
                    (Val::F(x), Val::F(y)) => Val::F(self.float_op(*op, &x, &y)?),
                    (Val::V(x), Val::V(y)) => Val::V(lanes(|l| self.float_op(*op, &x[l], &y[l]))?),
                    _ => return Err(format!("`{e}` mixes operand types")),
                }
            }
            Expr::Un(op, a) => match (op, self.expr(a)?) {
                (UnOp::Splat, Val::F(x)) => Val::V([x.clone(), x.clone(), x.clone(), x]),
                (UnOp::Lane(i), Val::V(x)) if (*i as usize) < 4 => Val::F(x[*i as usize].clone()),
                (UnOp::HSum, Val::V(x)) => {
                    let (p, q) = (self.float_op(BinOp::Add, &x[0], &x[1])?, self.float_op(BinOp::Add, &x[2], &x[3])?);
                    Val::F(self.float_op(BinOp::Add, &p, &q)?)
                }
                (UnOp::Exp | UnOp::Ln | UnOp::Sqrt, Val::F(x)) => Val::F(self.math(*op, &x)),
                (UnOp::Exp | UnOp::Ln | UnOp::Sqrt, Val::V(x)) => Val::V(lanes(|l| Ok(self.math(*op, &x[l])))?),
                (UnOp::Bf16Lo | UnOp::Bf16Hi, Val::F(x)) => Val::F(self.bf16(*op, &x)),
                (UnOp::Bf16Lo | UnOp::Bf16Hi, Val::V(x)) => Val::V(lanes(|l| Ok(self.bf16(*op, &x[l])))?),
                _ => return Err(format!("`{e}` applies {op:?} to an operand of the wrong type")),
            },
            Expr::Fma(abc) => match [0, 1, 2].map(|i| self.expr(&abc[i])) {
                [Ok(Val::F(a)), Ok(Val::F(b)), Ok(Val::F(c))] => Val::F(self.fma(&a, &b, &c)),
                [Ok(Val::V(a)), Ok(Val::V(b)), Ok(Val::V(c))] => Val::V(lanes(|l| Ok(self.fma(&a[l], &b[l], &c[l])))?),
                _ => return Err(format!("`{e}` is not an fma of three floats or three vectors")),
            },
            Expr::Load { buf, idx, lanes: n } => {
                let (base, off) = self.addr(*buf, idx)?;
                let b = &self.bases[buf.0 as usize];
                let op = format!("ld.{}{}", b.space, if b.nc { ".nc" } else { "" });
                let aligned = b.aligned && self.mult.of_expr(idx).is_multiple_of(4);
                match n {
                    1 => {
                        let d = self.tmp(Kind::F);
                        self.ins(format!("{op}.f32 {d}, [{base}{}]", disp(off)));
                        Val::F(d)
                    }
                    4 => {
                        let d: [String; 4] = std::array::from_fn(|_| self.tmp(Kind::F));
                        if aligned {
                            self.ins(format!("{op}.v4.f32 {{{}}}, [{base}{}]", d.join(", "), disp(off)));
                        } else {
                            for (l, d) in d.iter().enumerate() {
                                self.ins(format!("{op}.f32 {d}, [{base}{}]", disp(off + 4 * l as i64)));
                            }
                        }
                        Val::V(d)
                    }
                    _ => return Err(format!("`{e}` loads {n} lanes")),
                }
            }
            Expr::Shuffle(ab, lanes) => match (self.expr(&ab[0])?, self.expr(&ab[1])?) {
                // Registers renamed, no instruction.
                (Val::V(x), Val::V(y)) => Val::V(lanes.map(|l| if l < 4 { x[l as usize].clone() } else { y[l as usize - 4].clone() })),
                _ => return Err(format!("`{e}` shuffles operands that are not vectors")),
            },
            Expr::Select(abc) => {
                let c = self.int(&abc[0])?;
                let p = self.tmp(Kind::P);
                self.ins(format!("setp.ne.s64 {p}, {c}, 0"));
                match (self.expr(&abc[1])?, self.expr(&abc[2])?) {
                    (Val::I(x), Val::I(y)) => Val::I(self.selp("b64", Kind::Rd, &x, &y, &p)),
                    (Val::F(x), Val::F(y)) => Val::F(self.selp("f32", Kind::F, &x, &y, &p)),
                    (Val::V(x), Val::V(y)) => Val::V(lanes(|l| Ok(self.selp("f32", Kind::F, &x[l], &y[l], &p)))?),
                    _ => return Err(format!("`{e}` selects between values of different types")),
                }
            }
        })
    }

    fn selp(&mut self, ty: &str, kind: Kind, x: &str, y: &str, p: &str) -> String {
        let d = self.tmp(kind);
        self.ins(format!("selp.{ty} {d}, {x}, {y}, {p}"));
        d
    }

    fn fma(&mut self, a: &str, b: &str, c: &str) -> String {
        let d = self.tmp(Kind::F);
        self.ins(format!("fma.rn.f32 {d}, {a}, {b}, {c}"));
        d
    }

    /// A bfloat16 half of `x`'s bits, widened ([`UnOp::Bf16Lo`]), through the scratch register %r4.
    fn bf16(&mut self, op: UnOp, x: &str) -> String {
        let d = self.tmp(Kind::F);
        self.ins(format!("mov.b32 %r4, {x}"));
        self.ins(if op == UnOp::Bf16Lo { "shl.b32 %r4, %r4, 16" } else { "and.b32 %r4, %r4, 0xFFFF0000" });
        self.ins(format!("mov.b32 {d}, %r4"));
        d
    }

    /// `exp(x) = 2^(x·log2 e)`, `ln(x) = log2(x)·ln 2`; `sqrt` correctly rounded, as the CPU's.
    fn math(&mut self, op: UnOp, x: &str) -> String {
        if op == UnOp::Sqrt {
            let d = self.tmp(Kind::F);
            self.ins(format!("sqrt.rn.f32 {d}, {x}"));
            return d;
        }
        let (t, d) = (self.tmp(Kind::F), self.tmp(Kind::F));
        if op == UnOp::Exp {
            self.ins(format!("mul.rn.f32 {t}, {x}, {}", imm_f32(LOG2_E)));
            self.ins(format!("ex2.approx.f32 {d}, {t}"));
        } else {
            self.ins(format!("lg2.approx.f32 {t}, {x}"));
            self.ins(format!("mul.rn.f32 {d}, {t}, {}", imm_f32(LN_2)));
        }
        d
    }

    fn int_op(&mut self, op: BinOp, x: &str, y: &str) -> Result<String, String> {
        // Constant operands fold (wrapping, as the CPU computes; division by zero is left to run time).
        if let (Ok(a), Ok(b)) = (x.parse::<i64>(), y.parse::<i64>()) {
            let v = match op {
                BinOp::Add => Some(a.wrapping_add(b)),
                BinOp::Sub => Some(a.wrapping_sub(b)),
                BinOp::Mul => Some(a.wrapping_mul(b)),
                BinOp::Div => a.checked_div(b),
                BinOp::Rem => a.checked_rem(b),
                BinOp::Min => Some(a.min(b)),
                BinOp::Max => Some(a.max(b)),
                BinOp::Lt => Some((a < b) as i64),
                BinOp::Le => Some((a <= b) as i64),
                BinOp::Eq => Some((a == b) as i64),
                BinOp::And => Some(a & b),
            };
            if let Some(v) = v {
                return Ok(v.to_string());
            }
        }
        // Identities: x + 0, x − 0, x · 1, x / 1.
        match (op, y) {
            (BinOp::Add | BinOp::Sub, "0") | (BinOp::Mul | BinOp::Div, "1") => return Ok(x.to_string()),
            (BinOp::Rem, "1") => return Ok("0".into()),
            _ => {}
        }
        if (op, x) == (BinOp::Add, "0") || (op, x) == (BinOp::Mul, "1") {
            return Ok(y.to_string());
        }
        let ins = INT_OPS.iter().find(|(o, _)| *o == op).map(|(_, s)| *s).ok_or("no integer instruction")?;
        let d = self.tmp(Kind::Rd);
        if ins.starts_with("setp") {
            let p = self.tmp(Kind::P);
            self.ins(format!("{ins} {p}, {x}, {y}"));
            self.ins(format!("selp.b64 {d}, 1, 0, {p}"));
        } else {
            self.ins(format!("{ins} {d}, {x}, {y}"));
        }
        Ok(d)
    }

    fn float_op(&mut self, op: BinOp, x: &str, y: &str) -> Result<String, String> {
        let ins = FLOAT_OPS.iter().find(|(o, _)| *o == op).map(|(_, s)| *s).ok_or_else(|| format!("no float instruction for {op:?}"))?;
        let d = self.tmp(Kind::F);
        self.ins(format!("{ins} {d}, {x}, {y}"));
        Ok(d)
    }
}

fn lanes(mut f: impl FnMut(usize) -> Result<String, String>) -> Result<[String; 4], String> {
    Ok([f(0)?, f(1)?, f(2)?, f(3)?])
}

fn disp(off: i64) -> String {
    if off == 0 {
        String::new()
    } else {
        format!("+{off}")
    }
}

/// `k` with every [`Stmt::Gemm`] replaced by scalar loops with the tile's semantics (see [`Gemm`]):
/// its operands evaluated once, then for each row `r < rows` and column `j < cols` an accumulator that
/// starts at `bias[bias0 + r]` (or, with `accumulate`, at the value in C), takes one FMA per k in order
/// (`A[a0 + k·MR + r] · B(k, j)`, see [`BRows`]; a column tile's rows r ≥ MR in A's block r / MR, see
/// [`Gemm`]), then ReLU if asked, then the store. This is what the JIT's assembled tiles compute, rounding
/// for rounding.
pub fn expand_gemm(k: &Kernel, mr: usize) -> Kernel {
    fn go(body: &[Stmt], mr: usize, vars: &mut Vec<Ty>) -> Vec<Stmt> {
        body.iter()
            .flat_map(|s| match s {
                Stmt::For { var, lo, hi, step, body } => {
                    vec![Stmt::For { var: *var, lo: lo.clone(), hi: hi.clone(), step: *step, body: go(body, mr, vars) }]
                }
                Stmt::If { cond, then, els } => vec![Stmt::If { cond: cond.clone(), then: go(then, mr, vars), els: go(els, mr, vars) }],
                Stmt::Gemm(g) => gemm_loops(g, mr, vars),
                s => vec![s.clone()],
            })
            .collect()
    }
    let mut vars = k.vars.clone();
    let body = go(&k.body, mr, &mut vars);
    Kernel { vars, body, ..k.clone() }
}

fn gemm_loops(g: &Gemm, mr: usize, vars: &mut Vec<Ty>) -> Vec<Stmt> {
    let mut var = |t: Ty| {
        vars.push(t);
        Var(vars.len() as u32 - 1)
    };
    let ops = [&g.a0, &g.bias0, &g.b0, &g.c0, &g.depth, &g.rows, &g.cols];
    let [a0, bias0, b0, c0, depth, rows, cols] = ops.map(|_| var(Ty::I64));
    let (r, j, kk, acc) = (var(Ty::I64), var(Ty::I64), var(Ty::I64), var(Ty::F32));
    let at_c = Expr::from(c0) + Expr::from(r) * g.ldc + j;
    let init = if g.accumulate { g.c.at(at_c.clone()) } else { g.bias.at(Expr::from(bias0) + r) };
    let a = match g.blocks {
        1 => g.a.at(Expr::from(a0) + Expr::from(kk) * mr + r),
        _ => g.a.at(Expr::from(a0) + Expr::from(r) / mr * g.a_pitch + Expr::from(kk) * mr + Expr::from(r) % mr),
    };
    let step = match &g.rows_b {
        BRows::Strided(ldb) => vec![Stmt::Set(acc, a.fma(g.b.at(Expr::from(b0) + Expr::from(kk) * *ldb + j), acc))],
        BRows::Taps { taps: t, k0, col, .. } => {
            let p = col.clone() + j;
            let k = k0.clone() + kk;
            let (r, kx) = (k.clone() / t.kw, k % t.kw);
            let at = Expr::from(b0) + p.clone() + t.offset(r) + t.column(kx.clone()) - t.pad as i64;
            let sx = t.source(p % t.pitch as i64, kx);
            // Padding lanes take an FMA with zero too, as the packed column matrix's zeros would.
            let (read, pad) = (a.clone().fma(g.b.at(at), acc), a.fma(0.0f32, acc));
            let reads = Expr::from(0i64).le(sx.clone()).and(sx.lt(t.w));
            vec![Stmt::If { cond: reads, then: vec![Stmt::Set(acc, read)], els: vec![Stmt::Set(acc, pad)] }]
        }
    };
    let mut cell = vec![Stmt::Set(acc, init), Stmt::For { var: kk, lo: 0i64.into(), hi: depth.into(), step: 1, body: step }];
    if let Some(res) = g.add {
        cell.push(Stmt::Set(acc, Expr::from(acc) + res.at(at_c.clone())));
    }
    if g.relu {
        cell.push(Stmt::Set(acc, Expr::from(acc).max(0.0f32)));
    }
    cell.push(Stmt::Store { buf: g.c, idx: at_c, value: acc.into() });
    let mut out: Vec<Stmt> = [a0, bias0, b0, c0, depth, rows, cols].iter().zip(ops).map(|(&v, e)| Stmt::Set(v, e.clone())).collect();
    let columns = Stmt::For { var: j, lo: 0i64.into(), hi: cols.into(), step: 1, body: cell };
    out.push(Stmt::For { var: r, lo: 0i64.into(), hi: rows.into(), step: 1, body: vec![columns] });
    out
}

/// A congruence analysis of the integer variables: for each, a number every value it takes is a
/// multiple of (0: only ever 0, or not yet seen). Variables start at 0 and every assignment (and every
/// loop step) lowers them to the gcd with what it assigns, until nothing changes; `lo` and `hi` are
/// unknown (1). Used to prove 4-lane accesses 16-byte aligned.
pub struct Multiples(Vec<u64>);

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Multiples {
    pub fn of(k: &Kernel) -> Multiples {
        let mut m = Multiples(vec![0; k.vars.len()]);
        for v in [Kernel::LO, Kernel::HI] {
            if let Some(x) = m.0.get_mut(v.0 as usize) {
                *x = 1;
            }
        }
        loop {
            let before = m.0.clone();
            let mut updates = vec![];
            Stmt::visit(&k.body, &mut |s| match s {
                Stmt::Set(v, e) if k.vars.get(v.0 as usize) == Some(&Ty::I64) => updates.push((*v, m.of_expr(e))),
                Stmt::For { var, lo, step, .. } => updates.push((*var, gcd(m.of_expr(lo), step.unsigned_abs()))),
                _ => {}
            });
            for (v, x) in updates {
                if let Some(cur) = m.0.get_mut(v.0 as usize) {
                    *cur = gcd(*cur, x);
                }
            }
            if m.0 == before {
                return m;
            }
        }
    }

    /// A number the integer expression's value is always a multiple of (0: always 0).
    pub fn of_expr(&self, e: &Expr) -> u64 {
        match e {
            Expr::Int(v) => v.unsigned_abs(),
            Expr::Var(v) => self.0.get(v.0 as usize).copied().unwrap_or(1),
            Expr::Bin(op, a, b) => {
                let (x, y) = (self.of_expr(a), self.of_expr(b));
                match op {
                    BinOp::Add | BinOp::Sub | BinOp::Min | BinOp::Max => gcd(x, y),
                    // A multiple of both; if the product overflows, `x` still divides it.
                    BinOp::Mul => x.checked_mul(y).unwrap_or(x),
                    // a = x·t, b = c: a − c·⌊a/c⌋ is a multiple of gcd(x, c).
                    BinOp::Rem if matches!(**b, Expr::Int(_)) => gcd(x, y),
                    _ => 1,
                }
            }
            Expr::Select(abc) => gcd(self.of_expr(&abc[1]), self.of_expr(&abc[2])),
            _ => 1,
        }
    }
}
