//! Cranelift JIT backend: kernel IR → native code for this CPU, wrapped in a runtime [`Executable`].
//!
//! Each [`Kernel`] becomes one function `fn(bufs, task, ntasks)`. Kernel variables become Cranelift
//! variables (SSA is built by `cranelift-frontend`), loops become header/body/exit blocks, f32x4
//! values map to 128-bit vectors (the widest the x64 backend lowers) and `fma` to one `vfmadd` (the ISA
//! comes from `cranelift_native`, which enables FMA where the CPU has it). `exp` and `ln` call Rust, as
//! do the assembled tiers' native calls ([`native`]), each geometry a data object of the module.
//!
//! Checked mode ([`Options::checked`]) guards every load and store: an index outside its buffer is
//! recorded (kernel, buffer, index) and replaced by 0, so a bad kernel is reported instead of reading
//! or corrupting memory. Tests run every model in checked mode.

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod native;

use crate::kernel::{Access, BRows, BinOp, Call, Expr, Gemm, Kernel, Program, Routine, Stmt, Taps, Ty, UnOp};
use crate::target::Tier;
use cnnc_runtime::exec::{Arena, Executable, Step};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    types, AbiParam, ConstantData, Endianness, FuncRef, GlobalValue, InstBuilder, MemFlagsData, Signature, StackSlotData, StackSlotKind, Type, Value,
};
use cranelift_codegen::{settings::Configurable, Context};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, DataDescription, FuncId, Linkage, Module, ModuleReloc};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum JitError {
    #[error("cranelift could not target this machine: {0}")]
    Target(String),
    #[error("cranelift failed on kernel `{kernel}`: {message}")]
    Codegen { kernel: String, message: String },
    #[error("this program was lowered for the {0:?} tier, which this CPU does not have")]
    Unsupported(Tier),
    #[error("batch {batch} needs {need:.1} GiB (activations and parameters), more than this machine's {have:.1} GiB of memory; use a smaller batch")]
    TooLarge { batch: usize, need: f64, have: f64 },
    #[error("the system refused {:.1} GiB of memory for the model's activations or parameters; use a smaller batch", crate::weights::gib(*.0 as u64))]
    OutOfMemory(usize),
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Bounds-check every load and store (slower; for tests and debugging).
    pub checked: bool,
}

/// An out-of-bounds access caught in checked mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kernel: String,
    pub buffer: String,
    pub index: i64,
    pub len: usize,
}

#[derive(Default)]
struct Log(Mutex<Vec<(u64, u64, i64)>>);

extern "C" fn cnnc_oob(log: *const Log, kernel: u64, buf: u64, idx: i64) {
    // SAFETY: the address was baked into the code from an `Arc<Log>` that `Jitted` keeps alive.
    let log = unsafe { &*log };
    let mut v = log.0.lock().unwrap_or_else(|e| e.into_inner());
    if v.len() < 100 {
        v.push((kernel, buf, idx));
    }
}
extern "C" fn cnnc_expf(x: f32) -> f32 {
    x.exp()
}
extern "C" fn cnnc_logf(x: f32) -> f32 {
    x.ln()
}

/// The bytes of a `#[repr(C)]` geometry of plain integers (a native routine's, baked into the code).
fn repr_bytes<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: `T` is one of the kernel IR's `repr(C)` geometries of `i64`s: no padding, every byte
    // initialized.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
}

/// Whether `e` is a float constant, or a splat of one.
fn constant(e: &Expr) -> bool {
    match e {
        Expr::F32(_) => true,
        Expr::Un(UnOp::Splat, s) => matches!(**s, Expr::F32(_)),
        _ => false,
    }
}

/// The JIT module, kept alive while its code may run, freed after.
struct Code(Option<JITModule>);
// SAFETY: after `finalize_definitions` the module is never used again except to free it on drop; the
// executable only calls the finalized code, which is immutable.
unsafe impl Send for Code {}
unsafe impl Sync for Code {}
impl Drop for Code {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            // SAFETY: the executable owning this `Code` is being dropped, so no kernel can run anymore.
            unsafe { m.free_memory() };
        }
    }
}

/// A compiled program: the executable plus, in checked mode, its violation log.
pub struct Jitted {
    pub exe: Executable,
    log: Arc<Log>,
    names: Vec<(String, Vec<(String, usize)>)>,
}

impl Jitted {
    /// Out-of-bounds accesses recorded so far (checked mode only; at most 100).
    pub fn violations(&self) -> Vec<Violation> {
        let v = self.log.0.lock().unwrap_or_else(|e| e.into_inner());
        v.iter()
            .map(|&(k, b, index)| {
                let (kernel, bufs) = &self.names[k as usize];
                Violation { kernel: kernel.clone(), buffer: bufs[b as usize].0.clone(), index, len: bufs[b as usize].1 }
            })
            .collect()
    }
}

/// A [`BRows::Taps`] call's operands, evaluated.
#[derive(Clone, Copy)]
struct TapArgs {
    taps: Taps,
    k0: Value,
    col: Value,
    offsets: u16,
    masks: u16,
    masks0: Value,
}

/// Tile variants: 8·short + 4·narrow + 2·accumulate + relu, where `short` (0–2) selects a tile of
/// MR, or of [`Tier::short_rows`]`[short − 1]` rows (AVX-512 only).
const VARIANTS: usize = 24;

/// The assembled tiles defined in a module, by variant: the strided one, and (AVX-512) one per
/// implicit-convolution geometry, defined when a kernel first calls it.
struct Tiles {
    tier: Tier,
    strided: [FuncId; VARIANTS],
    taps: HashMap<Taps, [FuncId; VARIANTS]>,
    /// AVX2's column tiles (see [`avx2::column_tile`]), at [`column_variant`].
    columns: Vec<FuncId>,
}

/// The column tile for `cols` columns, accumulating or not, with ReLU or not.
fn column_variant(cols: usize, accumulate: bool, relu: bool) -> usize {
    4 * (cols - 1) + 2 * usize::from(accumulate) + usize::from(relu)
}

impl Tiles {
    /// The variants of the tile for `taps` (or the strided one), defined in `m` if new.
    fn get(&mut self, m: &mut JITModule, taps: Option<&Taps>) -> Result<[FuncId; VARIANTS], JitError> {
        let Some(t) = taps else { return Ok(self.strided) };
        if let Some(ids) = self.taps.get(t) {
            return Ok(*ids);
        }
        let ids = define_tiles(m, self.tier, Some(t))?;
        self.taps.insert(*t, ids);
        Ok(ids)
    }
}

#[cfg(target_arch = "x86_64")]
fn define_tiles(m: &mut JITModule, tier: Tier, taps: Option<&Taps>) -> Result<[FuncId; VARIANTS], JitError> {
    let mut ids = [FuncId::from_u32(0); VARIANTS];
    for variant in 0..VARIANTS {
        let (accumulate, relu, narrow, short) = (variant & 2 != 0, variant & 1 != 0, variant & 4 != 0, variant / 8);
        let code = match (tier, short) {
            (Tier::Avx2, 0) => avx2::tile(accumulate, relu, narrow),
            (Tier::Avx2, _) => {
                ids[variant] = ids[variant % 8];
                continue;
            }
            (_, 0) => avx512::tile(accumulate, relu, taps, narrow, tier.mr()),
            _ => avx512::tile(accumulate, relu, taps, narrow, tier.short_rows()[short - 1]),
        };
        ids[variant] = define_code(m, if taps.is_some() { 11 } else { 10 }, &format!("{tier:?} tile"), code)?;
    }
    Ok(ids)
}

/// AVX2's column tiles, in [`column_variant`] order (none for other tiers).
#[cfg(target_arch = "x86_64")]
fn define_columns(m: &mut JITModule, tier: Tier) -> Result<Vec<FuncId>, JitError> {
    if tier != Tier::Avx2 {
        return Ok(vec![]);
    }
    let variants = (1..=4).flat_map(|cols| [(false, false), (false, true), (true, false), (true, true)].map(|(acc, relu)| (cols, acc, relu)));
    variants.map(|(cols, acc, relu)| define_code(m, 11, "AVX2 column tile", avx2::column_tile(acc, relu, cols))).collect()
}

/// Defines assembled `code`, a function of `params` i64 arguments, in `m` (`what` names it in errors).
#[cfg(target_arch = "x86_64")]
fn define_code(m: &mut JITModule, params: usize, what: &str, code: Result<Vec<u8>, iced_x86::IcedError>) -> Result<FuncId, JitError> {
    let err = |message: String| JitError::Codegen { kernel: what.into(), message };
    let mut s = Signature::new(m.isa().default_call_conv());
    s.params.extend(vec![AbiParam::new(types::I64); params]);
    let code = code.map_err(|e| err(e.to_string()))?;
    let id = m.declare_anonymous_function(&s).map_err(|e| err(e.to_string()))?;
    m.define_function_bytes(id, 64, &code, &[]).map_err(|e| err(e.to_string()))?;
    Ok(id)
}

#[cfg(not(target_arch = "x86_64"))]
fn define_columns(_: &mut JITModule, tier: Tier) -> Result<Vec<FuncId>, JitError> {
    Err(JitError::Unsupported(tier))
}

#[cfg(not(target_arch = "x86_64"))]
fn define_tiles(_: &mut JITModule, tier: Tier, _: Option<&Taps>) -> Result<[FuncId; VARIANTS], JitError> {
    Err(JitError::Unsupported(tier))
}

/// A JIT module for this CPU, with the tier's strided microkernels defined in it. Cranelift's IR
/// verifier runs in checked mode (every test) and debug builds: in release builds it took a tenth of
/// code generation to re-check what the tests check.
fn module(tier: Tier, verify: bool) -> Result<(JITModule, Option<Tiles>), JitError> {
    let mut flags = cranelift_codegen::settings::builder();
    let set = |f: &mut cranelift_codegen::settings::Builder, k: &str, v: &str| f.set(k, v).map_err(|e| JitError::Target(e.to_string()));
    set(&mut flags, "opt_level", "speed")?;
    set(&mut flags, "is_pic", "false")?;
    set(&mut flags, "use_colocated_libcalls", "false")?;
    set(&mut flags, "enable_verifier", if verify || cfg!(debug_assertions) { "true" } else { "false" })?;
    let isa = cranelift_native::builder().map_err(|e| JitError::Target(e.to_string()))?;
    let isa = isa.finish(cranelift_codegen::settings::Flags::new(flags)).map_err(|e| JitError::Target(e.to_string()))?;
    let mut b = JITBuilder::with_isa(isa, default_libcall_names());
    b.symbol("cnnc_oob", cnnc_oob as *const u8);
    b.symbol("cnnc_expf", cnnc_expf as *const u8);
    b.symbol("cnnc_logf", cnnc_logf as *const u8);
    b.symbol("cnnc_pool_avx512", native::cnnc_pool_avx512 as *const u8);
    b.symbol("cnnc_pool_avx2", native::cnnc_pool_avx2 as *const u8);
    b.symbol("cnnc_transpose_avx512", native::cnnc_transpose_avx512 as *const u8);
    let mut m = JITModule::new(b);
    if !tier.available() {
        return Err(JitError::Unsupported(tier));
    }
    let tiles = match tier.assembled() {
        false => None,
        true => Some(Tiles { tier, strided: define_tiles(&mut m, tier, None)?, taps: HashMap::new(), columns: define_columns(&mut m, tier)? }),
    };
    Ok((m, tiles))
}

/// Compiles every launch of `program` to native code.
pub fn compile(program: &Program, opts: Options) -> Result<Jitted, JitError> {
    let mut c = Codegen::new(program.tier, opts)?;
    program.launches.iter().try_for_each(|l| c.add(&l.kernel))?;
    c.finish(program)
}

/// Lowers a program with `lower` while another thread turns each kernel into native code as `lower`
/// hands it over: code generation takes the cores that packing weights leaves idle. Returns the
/// program and its code, to be finished ([`Codegen::finish`]) once the program is checked.
pub fn compile_while(tier: Tier, opts: Options, lower: impl FnOnce(&mut dyn FnMut(&Kernel)) -> Program) -> Result<(Program, Codegen), JitError> {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<Kernel>();
        let worker = s.spawn(move || {
            let mut c = Codegen::new(tier, opts)?;
            loop {
                // Every kernel waiting is built (cheap); then one function is compiled. What is still
                // to compile when lowering ends is compiled on every core by `finish`.
                loop {
                    match rx.try_recv() {
                        Ok(k) => c.add(&k)?,
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => return Ok(c),
                    }
                }
                if !c.compile_one()? {
                    match rx.recv() {
                        Ok(k) => c.add(&k)?,
                        Err(_) => return Ok(c),
                    }
                }
            }
        });
        // A failed worker drops its receiver: the kernels sent after are dropped, its error returned.
        let program = lower(&mut |k| drop(tx.send(k.clone())));
        drop(tx);
        let c = worker.join().unwrap_or_else(|e| std::panic::resume_unwind(e))?;
        Ok((program, c))
    })
}

/// A function's machine code: its alignment, bytes and relocations.
type Compiled = (u64, Vec<u8>, Vec<ModuleReloc>);

/// Native code in the making: kernels added in launch order, each distinct one built as Cranelift IR
/// and compiled, then defined in one module. Launches whose kernels differ only in name (ResNet's
/// repeated blocks) share one function, except in checked mode, whose code names its launch.
pub struct Codegen {
    m: JITModule,
    tiles: Option<Tiles>,
    opts: Options,
    log: Arc<Log>,
    ctx: Context,
    fctx: FunctionBuilderContext,
    /// The distinct kernels: each one's Cranelift IR, id and code (once compiled).
    distinct: Vec<(Kernel, cranelift_codegen::ir::Function, FuncId, Option<Compiled>)>,
    /// Per launch, its function among the distinct ones.
    of_launch: Vec<usize>,
}

impl Codegen {
    fn new(tier: Tier, opts: Options) -> Result<Codegen, JitError> {
        let (m, tiles) = module(tier, opts.checked)?;
        let (ctx, fctx, log) = (m.make_context(), FunctionBuilderContext::new(), Arc::new(Log::default()));
        Ok(Codegen { m, tiles, opts, log, ctx, fctx, distinct: vec![], of_launch: vec![] })
    }

    /// The next launch's kernel: built as Cranelift IR unless an identical one was.
    fn add(&mut self, k: &Kernel) -> Result<(), JitError> {
        let same = |d: &Kernel| d.bufs == k.bufs && d.vars == k.vars && d.extent == k.extent && d.body == k.body;
        if let Some(at) = self.distinct.iter().position(|(d, ..)| !self.opts.checked && same(d)) {
            self.of_launch.push(at);
            return Ok(());
        }
        let check = self.opts.checked.then_some((Arc::as_ptr(&self.log) as i64, self.of_launch.len() as i64));
        build(&mut self.m, &mut self.ctx, &mut self.fctx, k, check, self.tiles.as_mut())?;
        let err = |e| JitError::Codegen { kernel: k.name.clone(), message: format!("{e:?}") };
        let id = self.m.declare_anonymous_function(&self.ctx.func.signature).map_err(err)?;
        self.of_launch.push(self.distinct.len());
        self.distinct.push((k.clone(), std::mem::replace(&mut self.ctx.func, cranelift_codegen::ir::Function::new()), id, None));
        Ok(())
    }

    /// Compiles the oldest function not compiled yet; false if there is none.
    fn compile_one(&mut self) -> Result<bool, JitError> {
        let isa = self.m.isa();
        let Some((k, func, id, code)) = self.distinct.iter_mut().find(|d| d.3.is_none()) else { return Ok(false) };
        *code = Some(compile_function(isa, k, func, *id)?);
        Ok(true)
    }

    /// The executable running `program`, whose launches' kernels were added in order: what is not
    /// compiled yet is compiled on every core, largest first (a Winograd transform is thousands of
    /// instructions, and one claimed last would leave the other cores idle behind it).
    pub fn finish(mut self, program: &Program) -> Result<Jitted, JitError> {
        assert_eq!(self.of_launch.len(), program.launches.len(), "one kernel added per launch");
        // Refuse what cannot fit, instead of being killed while the arena is zeroed.
        let bytes = 4 * (program.replicas * program.arena_len + program.params.iter().map(|p| p.len()).sum::<usize>()) as u64;
        if let Some(have) = cnnc_runtime::exec::physical_memory().filter(|&have| bytes > have) {
            use crate::weights::gib;
            return Err(JitError::TooLarge { batch: program.batch, need: gib(bytes), have: gib(have) });
        }
        let mut order: Vec<usize> = (0..self.distinct.len()).filter(|&i| self.distinct[i].3.is_none()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.distinct[i].1.dfg.num_insts()));
        let isa = self.m.isa();
        let compiled = cnnc_runtime::par::map(&order, |&i| compile_function(isa, &self.distinct[i].0, &self.distinct[i].1, self.distinct[i].2));
        for (i, c) in order.into_iter().zip(compiled) {
            self.distinct[i].3 = Some(c?);
        }
        for (k, _, id, code) in &self.distinct {
            let (align, bytes, relocs) = code.as_ref().expect("every function compiled");
            self.m.define_function_bytes(*id, *align, bytes, relocs).map_err(|e| JitError::Codegen { kernel: k.name.clone(), message: format!("{e:?}") })?;
        }
        let ids: Vec<FuncId> = self.of_launch.iter().map(|&d| self.distinct[d].2).collect();
        let mut m = self.m;
        m.finalize_definitions().map_err(|e| JitError::Codegen { kernel: "(module)".into(), message: format!("{e:?}") })?;
        let steps = program
            .launches
            .iter()
            .zip(&ids)
            .map(|(l, &id)| {
                // SAFETY: the function was built from a kernel with `l.kernel`'s code and the `KernelFn` signature.
                let f = unsafe { std::mem::transmute::<*const u8, cnnc_runtime::exec::KernelFn>(m.get_finalized_function(id)) };
                Step { name: l.kernel.name.clone(), f, slots: l.slots.clone(), flops: l.flops }
            })
            .collect();
        let names = program.launches.iter().map(|l| (l.kernel.name.clone(), l.kernel.bufs.iter().map(|b| (b.name.clone(), b.len)).collect())).collect();
        // SAFETY: kernels index inside their declared buffer lengths (the lowering's invariant, verified by
        // the checked-mode tests), the program's slots are at least that long, and tasks write disjoint
        // elements; `Code` keeps the module alive as long as the executable.
        let exe = unsafe {
            let arena = Arena { len: program.arena_len, replicas: program.replicas };
            Executable::new(steps, program.params.clone(), arena, program.inputs.clone(), program.output.clone(), Box::new(Code(Some(m))))
        }
        .map_err(|e| JitError::OutOfMemory(e.bytes))?;
        Ok(Jitted { exe, log: self.log, names })
    }
}

/// Cranelift's machine code for `func`, kernel `k`'s function `id`.
fn compile_function(isa: &dyn cranelift_codegen::isa::TargetIsa, k: &Kernel, func: &cranelift_codegen::ir::Function, id: FuncId) -> Result<Compiled, JitError> {
    let align_min = (isa.function_alignment().minimum as u64).max(isa.symbol_alignment());
    let mut ctx = Context::for_function(func.clone());
    let code = ctx.compile(isa, &mut Default::default()).map_err(|e| JitError::Codegen { kernel: k.name.clone(), message: format!("{:?}", e.inner) })?;
    let relocs: Vec<ModuleReloc> = code.buffer.relocs().iter().map(|r| ModuleReloc::from_mach_reloc(r, func, id)).collect();
    Ok(((code.buffer.alignment as u64).max(align_min), code.code_buffer().to_vec(), relocs))
}

/// The Cranelift IR of every kernel as built, before Cranelift optimizes it (`cnnc compile --emit
/// clif`), or (`asm`) the machine code Cranelift generated for this CPU (`--emit asm`).
pub fn clif(program: &Program, asm: bool) -> Result<String, JitError> {
    let (mut m, mut tiles) = module(program.tier, true)?;
    let (mut ctx, mut fctx) = (m.make_context(), FunctionBuilderContext::new());
    let mut out = String::new();
    for l in &program.launches {
        build(&mut m, &mut ctx, &mut fctx, &l.kernel, None, tiles.as_mut())?;
        let text = if asm {
            ctx.set_disasm(true);
            let err = |message: String| JitError::Codegen { kernel: l.kernel.name.clone(), message };
            let code = ctx.compile(m.isa(), &mut Default::default()).map_err(|e| err(format!("{:?}", e.inner)))?;
            code.vcode.clone().unwrap_or_default()
        } else {
            ctx.func.display().to_string()
        };
        out += &format!("; kernel {}\n{text}\n", l.kernel.name);
        m.clear_context(&mut ctx);
    }
    Ok(out)
}

fn ty(t: Ty) -> Type {
    match t {
        Ty::I64 => types::I64,
        Ty::F32 => types::F32,
        Ty::F32x4 => types::F32X4,
    }
}

/// Builds `k` into `ctx.func`. `check`: (log address, kernel number) for checked mode.
fn build(
    m: &mut JITModule,
    ctx: &mut Context,
    fctx: &mut FunctionBuilderContext,
    k: &Kernel,
    check: Option<(i64, i64)>,
    tiles: Option<&mut Tiles>,
) -> Result<(), JitError> {
    let err = |e: cranelift_module::ModuleError| JitError::Codegen { kernel: k.name.clone(), message: e.to_string() };
    if k.block.is_some() {
        return Err(JitError::Codegen { kernel: k.name.clone(), message: "a GPU-shaped kernel (thread blocks) runs only on the cuda backend".into() });
    }
    let sig = |params: &[Type], ret: &[Type]| {
        let mut s = Signature::new(m.isa().default_call_conv());
        s.params.extend(params.iter().map(|&t| AbiParam::new(t)));
        s.returns.extend(ret.iter().map(|&t| AbiParam::new(t)));
        s
    };
    ctx.func.signature = sig(&[types::I64; 3], &[]);
    let unary = sig(&[types::F32], &[types::F32]);
    let oob_sig = sig(&[types::I64; 4], &[]);
    let call_sig = sig(&[types::I64; 6], &[]);
    let exp = m.declare_function("cnnc_expf", Linkage::Import, &unary).map_err(err)?;
    let ln = m.declare_function("cnnc_logf", Linkage::Import, &unary).map_err(err)?;
    let oob = m.declare_function("cnnc_oob", Linkage::Import, &oob_sig).map_err(err)?;
    let math = [m.declare_func_in_func(exp, &mut ctx.func), m.declare_func_in_func(ln, &mut ctx.func)];
    let oob = m.declare_func_in_func(oob, &mut ctx.func);
    // The native routines the kernel calls, and each geometry as read-only data beside the code.
    let mut routines = vec![];
    Stmt::visit(&k.body, &mut |s| {
        if let Stmt::Call(c) = s {
            routines.push(c.routine);
        }
    });
    let mut natives = (HashMap::new(), HashMap::new());
    for routine in routines {
        if natives.1.contains_key(&routine) {
            continue;
        }
        let tier = tiles.as_ref().map(|t| t.tier);
        let (name, bytes) = match (routine, tier) {
            (Routine::Pool(g), Some(Tier::Avx512)) => ("cnnc_pool_avx512", repr_bytes(&g)),
            (Routine::Pool(g), Some(Tier::Avx2)) => ("cnnc_pool_avx2", repr_bytes(&g)),
            (Routine::Transpose(g), Some(Tier::Avx512)) => ("cnnc_transpose_avx512", repr_bytes(&g)),
            _ => return Err(JitError::Codegen { kernel: k.name.clone(), message: format!("no native {routine:?} for the {tier:?} tier") }),
        };
        if !natives.0.contains_key(name) {
            let f = m.declare_function(name, Linkage::Import, &call_sig).map_err(err)?;
            natives.0.insert(name, m.declare_func_in_func(f, &mut ctx.func));
        }
        let id = m.declare_anonymous_data(false, false).map_err(err)?;
        let mut data = DataDescription::new();
        data.define(bytes.into());
        data.set_align(8);
        m.define_data(id, &data).map_err(err)?;
        natives.1.insert(routine, (natives.0[name], m.declare_data_in_func(id, &mut ctx.func)));
    }
    // Every tile variant the kernel calls, by geometry (None: strided).
    let (mut calls, mut columns, mut tier) = (HashMap::new(), vec![], Tier::Portable);
    if let Some(tiles) = tiles {
        tier = tiles.tier;
        let (mut geos, mut blocks) = (vec![None], false);
        Stmt::visit(&k.body, &mut |s| {
            if let Stmt::Gemm(g) = s {
                if let BRows::Taps { taps, .. } = &g.rows_b {
                    geos.push(Some(*taps));
                }
                blocks |= g.blocks > 1;
            }
        });
        for geo in geos {
            let ids = tiles.get(m, geo.as_ref())?;
            calls.insert(geo, ids.map(|id| m.declare_func_in_func(id, &mut ctx.func)));
        }
        if blocks {
            columns = tiles.columns.iter().map(|&id| m.declare_func_in_func(id, &mut ctx.func)).collect();
        }
    }
    let mut b = FunctionBuilder::new(&mut ctx.func, fctx);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let [table, task, ntasks] = [0, 1, 2].map(|i| b.block_params(entry)[i]);
    let vars: Vec<Variable> = k.vars.iter().map(|&t| b.declare_var(ty(t))).collect();
    // This task's share of the parallel loop: extent·task/ntasks .. extent·(task+1)/ntasks.
    let extent = b.ins().iconst(types::I64, k.extent as i64);
    let lo = b.ins().imul(extent, task);
    let lo = b.ins().udiv(lo, ntasks);
    let next = b.ins().iadd_imm_s(task, 1);
    let hi = b.ins().imul(extent, next);
    let hi = b.ins().udiv(hi, ntasks);
    b.def_var(vars[Kernel::LO.0 as usize], lo);
    b.def_var(vars[Kernel::HI.0 as usize], hi);
    let mut arg: i32 = 0;
    let mut bases = Vec::with_capacity(k.bufs.len());
    for buf in &k.bufs {
        bases.push(if buf.access == Access::Local {
            // 64-byte aligned, like arena tensors.
            let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (4 * buf.len) as u32, 6));
            b.ins().stack_addr(types::I64, slot, 0)
        } else {
            arg += 1;
            b.ins().load(types::I64, MemFlagsData::trusted().with_readonly(), table, 8 * (arg - 1))
        });
    }
    let frontend = m.isa().frontend_config();
    let mut g = Gen { b, k, vars, bases, math, tiles: calls, columns, tier, natives: natives.1, check: check.map(|(log, kernel)| (log, kernel, oob)) };
    g.block(&k.body);
    g.b.ins().return_(&[]);
    g.b.seal_all_blocks();
    g.b.finalize(frontend);
    Ok(())
}

struct Gen<'a, 'f> {
    b: FunctionBuilder<'f>,
    k: &'a Kernel,
    vars: Vec<Variable>,
    bases: Vec<Value>,
    math: [FuncRef; 2],
    tiles: HashMap<Option<Taps>, [FuncRef; VARIANTS]>,
    /// The column tiles, if the kernel calls one (see [`Tiles::columns`]).
    columns: Vec<FuncRef>,
    /// The tier whose tiles `tiles` are.
    tier: Tier,
    /// Per native routine the kernel calls: the function and its geometry's address.
    natives: HashMap<Routine, (FuncRef, GlobalValue)>,
    check: Option<(i64, i64, FuncRef)>,
}

impl Gen<'_, '_> {
    fn block(&mut self, body: &[Stmt]) {
        for s in body {
            self.stmt(s);
        }
    }

    fn stmt(&mut self, s: &Stmt) {
        match s {
            Stmt::Set(v, e) => {
                let x = self.expr(e);
                self.b.def_var(self.vars[v.0 as usize], x);
            }
            Stmt::Store { buf, idx, value } => {
                let x = self.expr(value);
                let lanes = if self.k.ty(value) == Ty::F32x4 { 4 } else { 1 };
                let a = self.addr(buf.0, idx, lanes);
                self.b.ins().store(MemFlagsData::new().with_notrap(), x, a, 0);
            }
            Stmt::For { var, lo, hi, step, body } => {
                let v = self.vars[var.0 as usize];
                let (lo, hi) = (self.expr(lo), self.expr(hi));
                self.b.def_var(v, lo);
                let [header, body_b, exit] = [(); 3].map(|_| self.b.create_block());
                self.b.ins().jump(header, &[]);
                self.b.switch_to_block(header);
                let i = self.b.use_var(v);
                let c = self.b.ins().icmp(IntCC::SignedLessThan, i, hi);
                self.b.ins().brif(c, body_b, &[], exit, &[]);
                self.b.switch_to_block(body_b);
                self.block(body);
                let i = self.b.use_var(v);
                let i = self.b.ins().iadd_imm_s(i, *step);
                self.b.def_var(v, i);
                self.b.ins().jump(header, &[]);
                self.b.switch_to_block(exit);
            }
            Stmt::Gemm(g) => self.gemm(g),
            Stmt::Call(c) => self.call(c),
            Stmt::Barrier => unreachable!("`build` refuses GPU-shaped kernels"),
            Stmt::If { cond, then, els } => {
                let c = self.expr(cond);
                let [t, f, join] = [(); 3].map(|_| self.b.create_block());
                self.b.ins().brif(c, t, &[], f, &[]);
                for (blk, body) in [(t, then), (f, els)] {
                    self.b.switch_to_block(blk);
                    self.block(body);
                    self.b.ins().jump(join, &[]);
                }
                self.b.switch_to_block(join);
            }
        }
    }

    /// Calls the tier's tile. In checked mode the first and last element the tile may touch in each
    /// buffer are checked first, and the call is skipped (after logging) if any is outside.
    fn gemm(&mut self, g: &Gemm) {
        let (rows, cols, depth) = (self.expr(&g.rows), self.expr(&g.cols), self.expr(&g.depth));
        let [a0, bias0, b0, c0] = [&g.a0, &g.bias0, &g.b0, &g.c0].map(|e| self.expr(e));
        let taps = match &g.rows_b {
            BRows::Strided(_) => None,
            BRows::Taps { taps, k0, col, offsets, masks, masks0 } => {
                Some(TapArgs { taps: *taps, k0: self.expr(k0), col: self.expr(col), offsets: offsets.0, masks: masks.0, masks0: self.expr(masks0) })
            }
        };
        let args = [a0, bias0, b0, c0, rows, cols, depth];
        if self.check.is_none() {
            return self.call_tile(g, args, taps);
        }
        // The last element the tile may touch in each buffer: start + (n − 1)·stride + width − 1 for
        // n rows (k steps for A and B, output rows for C) of `width` elements.
        let mr = self.b.ins().iconst(types::I64, self.tier.mr() as i64);
        // A column tile's blocks lie a_pitch apart in A; its bias is one run of rows.
        let a_first_of_last = self.b.ins().iadd_imm_s(a0, ((g.blocks - 1) * g.a_pitch) as i64);
        let mut last = |start: Value, n: Value, stride: i64, width: Value| {
            let n = self.b.ins().iadd_imm_s(n, -1);
            let rows = self.b.ins().imul_imm_s(n, stride);
            let end = self.b.ins().iadd(start, rows);
            let end = self.b.ins().iadd(end, width);
            self.b.ins().iadd_imm_s(end, -1)
        };
        let a_last = last(a_first_of_last, depth, self.tier.mr() as i64, mr);
        let c_last = last(c0, rows, g.ldc as i64, cols);
        let b_last = match g.rows_b {
            BRows::Strided(ldb) => Some(last(b0, depth, ldb as i64, cols)),
            BRows::Taps { .. } => None,
        };
        let mut checks = vec![(g.a.0, a0), (g.a.0, a_last), (g.bias.0, bias0), (g.c.0, c0), (g.c.0, c_last)];
        checks.extend(g.add.into_iter().flat_map(|r| [(r.0, c0), (r.0, c_last)]));
        let bias_last = self.b.ins().iadd_imm_s(bias0, (g.blocks * self.tier.mr()) as i64 - 1);
        checks.push((g.bias.0, bias_last));
        match (b_last, taps) {
            (Some(b_last), _) => checks.extend([(g.b.0, b0), (g.b.0, b_last)]),
            (None, Some(TapArgs { taps: t, k0, offsets, masks, masks0, .. })) => {
                // Unmasked lanes read within the phases of the channels the slice spans.
                let planes = (t.stride[0] * t.stride[1] * t.phase) as i64;
                let channel = |b: &mut FunctionBuilder, k: Value| b.ins().udiv_imm_u(k, (t.kw * t.kh) as i64);
                let first = channel(&mut self.b, k0);
                let end = self.b.ins().iadd(k0, depth);
                let end = self.b.ins().iadd_imm_s(end, -1);
                let end = channel(&mut self.b, end);
                let first = self.b.ins().imul_imm_s(first, planes);
                let first = self.b.ins().iadd(b0, first);
                let end = self.b.ins().iadd_imm_s(end, 1);
                let end = self.b.ins().imul_imm_s(end, planes);
                let end = self.b.ins().iadd(b0, end);
                let b_last = self.b.ins().iadd_imm_s(end, -1);
                let masks_last = self.b.ins().iadd_imm_s(masks0, t.kw as i64 - 1);
                let row0 = self.b.ins().udiv_imm_u(k0, t.kw as i64);
                let rows_end = self.b.ins().iadd(k0, depth);
                let rows_end = self.b.ins().udiv_imm_u(rows_end, t.kw as i64);
                let row_last = self.b.ins().iadd_imm_s(rows_end, -1);
                checks.extend([(g.b.0, first), (g.b.0, b_last), (masks, masks0), (masks, masks_last), (offsets, row0), (offsets, row_last)]);
            }
            _ => unreachable!("taps evaluated above"),
        }
        let mut all = self.b.ins().iconst(types::I8, 1);
        for (buf, idx) in checks {
            let ok = self.checked_index(buf, idx, 1).1;
            all = self.b.ins().band(all, ok);
        }
        let (call, cont) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(all, call, &[], cont, &[]);
        self.b.switch_to_block(call);
        self.call_tile(g, args, taps);
        self.b.ins().jump(cont, &[]);
        self.b.switch_to_block(cont);
    }

    fn call_tile(&mut self, g: &Gemm, [a0, bias0, b0, c0, rows, cols, depth]: [Value; 7], taps: Option<TapArgs>) {
        let (a, bias, c) = (self.ptr(g.a.0, a0), self.ptr(g.bias.0, bias0), self.ptr(g.c.0, c0));
        let ldc = self.b.ins().iconst(types::I64, g.ldc as i64);
        let variant = 2 * usize::from(g.accumulate) + usize::from(g.relu);
        let tiles = self.tiles[&taps.as_ref().map(|t| t.taps)];
        // The residual at C's position, or null: the tiles' last argument.
        let add = match g.add {
            Some(r) => self.ptr(r.0, c0),
            None => self.b.ins().iconst(types::I64, 0),
        };
        let args = match (&g.rows_b, taps) {
            (BRows::Strided(ldb), _) => {
                let b = self.ptr(g.b.0, b0);
                let ldb = self.b.ins().iconst(types::I64, *ldb as i64);
                vec![a, b, c, depth, ldb, bias, rows, cols, ldc]
            }
            (BRows::Taps { .. }, Some(TapArgs { taps: t, k0, col, offsets, masks, masks0 })) => {
                let at = self.b.ins().iadd(b0, col);
                let at = self.b.ins().iadd_imm_s(at, -(t.pad as i64));
                let b = self.ptr(g.b.0, at);
                let row0 = self.b.ins().udiv_imm_u(k0, t.kw as i64);
                let offsets = self.ptr(offsets, row0);
                let taps = self.b.ins().udiv_imm_u(depth, t.kw as i64);
                let masks = self.ptr(masks, masks0);
                vec![a, b, c, taps, offsets, bias, rows, cols, ldc, masks]
            }
            _ => unreachable!("taps evaluated by the caller"),
        };
        if g.blocks > 1 {
            let Expr::Int(cols) = g.cols else { unreachable!("a column tile's columns are a constant") };
            let pitch = self.b.ins().iconst(types::I64, g.a_pitch as i64);
            let tile = self.columns[column_variant(cols as usize, g.accumulate, g.relu)];
            self.b.ins().call(tile, &[args, vec![pitch, add]].concat());
            return;
        }
        let args = [args, vec![add]].concat();
        // Calls of at most half a tile's columns take the one-vector variant: half the FMAs, the same
        // sums; on AVX-512, calls of at most 8 or 4 rows a shorter one likewise.
        let cont = self.b.create_block();
        let calls = |g: &mut Self, short: usize| {
            let (narrow, wide) = (g.b.create_block(), g.b.create_block());
            let fits = g.b.ins().icmp_imm_u(IntCC::UnsignedLessThanOrEqual, cols, g.tier.nr() as i64 / 2);
            g.b.ins().brif(fits, narrow, &[], wide, &[]);
            for (block, tile) in [(narrow, tiles[8 * short + 4 + variant]), (wide, tiles[8 * short + variant])] {
                g.b.switch_to_block(block);
                g.b.ins().call(tile, &args);
                g.b.ins().jump(cont, &[]);
            }
        };
        let shorts = self.tier.short_rows();
        for short in (1..=shorts.len()).rev() {
            let (this, next) = (self.b.create_block(), self.b.create_block());
            let fits = self.b.ins().icmp_imm_u(IntCC::UnsignedLessThanOrEqual, rows, shorts[short - 1] as i64);
            self.b.ins().brif(fits, this, &[], next, &[]);
            self.b.switch_to_block(this);
            calls(self, short);
            self.b.switch_to_block(next);
        }
        calls(self, 0);
        self.b.switch_to_block(cont);
    }

    /// Calls a native routine on items lo..hi; in checked mode only if the first and last element of
    /// each buffer it touches are inside (an empty range touches none).
    fn call(&mut self, c: &Call) {
        let (lo, hi) = (self.expr(&c.lo), self.expr(&c.hi));
        let zero = self.b.ins().iconst(types::I64, 0);
        let (x, y) = (self.ptr(c.x.0, zero), self.ptr(c.y.0, zero));
        let extra = match c.extra {
            Some(b) => self.ptr(b.0, zero),
            None => zero,
        };
        let (f, gv) = self.natives[&c.routine];
        let geo = self.b.ins().symbol_value(types::I64, gv);
        let args = [geo, x, y, extra, lo, hi];
        if self.check.is_none() {
            self.b.ins().call(f, &args);
            return;
        }
        let [some, call, cont] = [(); 3].map(|_| self.b.create_block());
        let any = self.b.ins().icmp(IntCC::SignedLessThan, lo, hi);
        self.b.ins().brif(any, some, &[], cont, &[]);
        self.b.switch_to_block(some);
        // Per buffer, elements per item and per group of items: a pooling's planes; a transpose's
        // images (of co / 16 items each), whose whole extent is checked.
        let (per_x, per_y, group) = match c.routine {
            Routine::Pool(g) => (g.h * g.pitch, g.oh * g.ow, 1),
            Routine::Transpose(g) => (g.p * g.co, g.p * g.co, g.co / 16),
        };
        let mut ok = self.b.ins().iconst(types::I8, 1);
        let mut buffers = vec![(c.x.0, per_x), (c.y.0, per_y)];
        match (c.routine, c.extra) {
            (Routine::Transpose(_), Some(r)) => buffers.push((r.0, per_y)),
            (Routine::Pool(g), Some(counts)) => {
                let last = self.b.ins().iconst(types::I64, g.oh * g.ow - 1);
                let inside = self.checked_index(counts.0, last, 1).1;
                ok = self.b.ins().band(ok, inside);
            }
            (_, None) => {}
        }
        for (buf, per) in buffers {
            let first = self.b.ins().udiv_imm_u(lo, group);
            let first = self.b.ins().imul_imm_s(first, per);
            let end = self.b.ins().iadd_imm_s(hi, group - 1);
            let end = self.b.ins().udiv_imm_u(end, group);
            let end = self.b.ins().imul_imm_s(end, per);
            let last = self.b.ins().iadd_imm_s(end, -1);
            for idx in [first, last] {
                let inside = self.checked_index(buf, idx, 1).1;
                ok = self.b.ins().band(ok, inside);
            }
        }
        self.b.ins().brif(ok, call, &[], cont, &[]);
        self.b.switch_to_block(call);
        self.b.ins().call(f, &args);
        self.b.ins().jump(cont, &[]);
        self.b.switch_to_block(cont);
    }

    /// The address of element `idx` of buffer `buf`.
    fn ptr(&mut self, buf: u16, idx: Value) -> Value {
        let off = self.b.ins().ishl_imm_u(idx, 2);
        self.b.ins().iadd(self.bases[buf as usize], off)
    }

    /// In checked mode: logs `idx` if `idx..idx + lanes` is outside buffer `buf`, and returns the index
    /// to use (0 when outside) and whether it was inside.
    fn checked_index(&mut self, buf: u16, i: Value, lanes: i64) -> (Value, Value) {
        let (log, kernel, oob) = self.check.expect("checked mode");
        let len = self.k.bufs[buf as usize].len as i64;
        let ok = self.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, i, len - lanes + 1);
        let (bad, cont) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(ok, cont, &[], bad, &[]);
        self.b.switch_to_block(bad);
        let args = [log, kernel, buf as i64].map(|v| self.b.ins().iconst(types::I64, v));
        self.b.ins().call(oob, &[args[0], args[1], args[2], i]);
        self.b.ins().jump(cont, &[]);
        self.b.switch_to_block(cont);
        let zero = self.b.ins().iconst(types::I64, 0);
        (self.b.ins().select(ok, i, zero), ok)
    }

    /// The address of element `idx` of buffer `buf`; in checked mode, an out-of-range index is logged
    /// and replaced by 0.
    fn addr(&mut self, buf: u16, idx: &Expr, lanes: i64) -> Value {
        let mut i = self.expr(idx);
        if self.check.is_some() {
            i = self.checked_index(buf, i, lanes).0;
        }
        self.ptr(buf, i)
    }

    /// The larger lanes of x and y, NaN where either is (as `fmax`), of +0 and −0 either one: one
    /// `maxps` and, unless an operand is a constant (`constant`: which are), a blend of x's NaNs.
    /// Cranelift's `fmax` also orders −0 below +0: seven instructions per vector, which were most of
    /// max pooling's and ReLU's work (measured: docs/benchmarks.md).
    fn max(&mut self, x: Value, y: Value, constant: [bool; 2]) -> Value {
        // `maxps x, y` is y unless y < x: y when either is NaN. With a constant (never NaN) operand
        // in x, that propagates every NaN.
        let (x, y) = if constant[1] { (y, x) } else { (x, y) };
        let lanes = MemFlagsData::new().with_endianness(Endianness::Little);
        let ins = self.b.ins();
        let lt = ins.fcmp(FloatCC::LessThan, y, x);
        let lt = self.b.ins().bitcast(types::F32X4, lanes, lt);
        let m = self.b.ins().bitselect(lt, x, y);
        if constant[0] || constant[1] {
            return m;
        }
        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
        let nan = self.b.ins().bitcast(types::F32X4, lanes, nan);
        self.b.ins().bitselect(nan, x, m)
    }

    fn expr(&mut self, e: &Expr) -> Value {
        match e {
            Expr::Int(v) => self.b.ins().iconst(types::I64, *v),
            Expr::F32(v) => self.b.ins().f32const(*v),
            Expr::Var(v) => self.b.use_var(self.vars[v.0 as usize]),
            Expr::Bin(op, a, c) => {
                let int = self.k.ty(a) == Ty::I64;
                let (x, y) = (self.expr(a), self.expr(c));
                let cc = match op {
                    BinOp::Lt => Some(IntCC::SignedLessThan),
                    BinOp::Le => Some(IntCC::SignedLessThanOrEqual),
                    BinOp::Eq => Some(IntCC::Equal),
                    _ => None,
                };
                if let Some(cc) = cc {
                    let c = self.b.ins().icmp(cc, x, y);
                    return self.b.ins().uextend(types::I64, c);
                }
                let ins = self.b.ins();
                match (op, int) {
                    (BinOp::Add, true) => ins.iadd(x, y),
                    (BinOp::Sub, true) => ins.isub(x, y),
                    (BinOp::Mul, true) => ins.imul(x, y),
                    (BinOp::Div, true) => ins.sdiv(x, y),
                    (BinOp::Rem, true) => ins.srem(x, y),
                    (BinOp::Min, true) => ins.smin(x, y),
                    (BinOp::Max, true) => ins.smax(x, y),
                    (BinOp::And, _) => ins.band(x, y),
                    (BinOp::Add, false) => ins.fadd(x, y),
                    (BinOp::Sub, false) => ins.fsub(x, y),
                    (BinOp::Mul, false) => ins.fmul(x, y),
                    (BinOp::Div, false) => ins.fdiv(x, y),
                    // Scalar fmin/fmax go through the 4-lane instruction: on x64 the scalar form is a
                    // branchy sequence (NaN and ±0 cases) that mispredicts on post-ReLU data full of
                    // equal zeros (measured: docs/benchmarks.md); the vector form is branch-free.
                    (BinOp::Min, false) if self.k.ty(a) == Ty::F32 => {
                        let (vx, vy) = (ins.splat(types::F32X4, x), self.b.ins().splat(types::F32X4, y));
                        let m = self.b.ins().fmin(vx, vy);
                        self.b.ins().extractlane(m, 0)
                    }
                    (BinOp::Max, false) => {
                        let scalar = self.k.ty(a) == Ty::F32;
                        let (vx, vy) = if scalar { (ins.splat(types::F32X4, x), self.b.ins().splat(types::F32X4, y)) } else { (x, y) };
                        let m = self.max(vx, vy, [a, c].map(|v| constant(v)));
                        if scalar {
                            self.b.ins().extractlane(m, 0)
                        } else {
                            m
                        }
                    }
                    (BinOp::Min, false) => ins.fmin(x, y),
                    (BinOp::Lt | BinOp::Le | BinOp::Eq, _) => unreachable!("handled above"),
                    (BinOp::Rem, false) => unreachable!("no float remainder in kernels"),
                }
            }
            Expr::Un(op, a) => {
                let x = self.expr(a);
                match op {
                    UnOp::Splat => self.b.ins().splat(types::F32X4, x),
                    UnOp::Lane(i) => self.b.ins().extractlane(x, *i),
                    UnOp::HSum => {
                        let l = [0u8, 1, 2, 3].map(|i| self.b.ins().extractlane(x, i));
                        let (p, q) = (self.b.ins().fadd(l[0], l[1]), self.b.ins().fadd(l[2], l[3]));
                        self.b.ins().fadd(p, q)
                    }
                    UnOp::Sqrt => self.b.ins().sqrt(x),
                    UnOp::Exp | UnOp::Ln => {
                        // libm's scalar function, lane by lane on a vector.
                        let f = self.math[usize::from(*op == UnOp::Ln)];
                        let call = |b: &mut FunctionBuilder, v| {
                            let call = b.ins().call(f, &[v]);
                            b.inst_results(call)[0]
                        };
                        if self.b.func.dfg.value_type(x).is_vector() {
                            (0u8..4).fold(x, |acc, i| {
                                let lane = self.b.ins().extractlane(x, i);
                                let y = call(&mut self.b, lane);
                                self.b.ins().insertlane(acc, y, i)
                            })
                        } else {
                            call(&mut self.b, x)
                        }
                    }
                    UnOp::Bf16Lo | UnOp::Bf16Hi => {
                        // On the lanes' bits: shift the low half up, or clear the low half.
                        let ty = self.b.func.dfg.value_type(x);
                        let int = if ty.is_vector() { types::I32X4 } else { types::I32 };
                        let lanes = MemFlagsData::new().with_endianness(Endianness::Little);
                        let bits = self.b.ins().bitcast(int, lanes, x);
                        let bits = if *op == UnOp::Bf16Lo {
                            self.b.ins().ishl_imm_u(bits, 16)
                        } else {
                            let high = self.b.ins().iconst(types::I32, 0xffff_0000u32 as i64);
                            let high = if ty.is_vector() { self.b.ins().splat(int, high) } else { high };
                            self.b.ins().band(bits, high)
                        };
                        self.b.ins().bitcast(ty, lanes, bits)
                    }
                }
            }
            Expr::Fma(abc) => {
                let [a, b, c] = [0, 1, 2].map(|i| self.expr(&abc[i]));
                self.b.ins().fma(a, b, c)
            }
            Expr::Load { buf, idx, lanes } => {
                let t = if *lanes == 1 { types::F32 } else { types::F32X4 };
                let a = self.addr(buf.0, idx, *lanes as i64);
                // Buffers the kernel only reads do not change while it runs (in-place kernels read each
                // element before writing it, through a buffer declared writable).
                let mut flags = MemFlagsData::new().with_notrap();
                if self.k.bufs[buf.0 as usize].access == Access::Read {
                    flags = flags.with_readonly();
                }
                self.b.ins().load(t, flags, a, 0)
            }
            Expr::Select(abc) => {
                let [c, x, y] = [0, 1, 2].map(|i| self.expr(&abc[i]));
                let c = self.b.ins().icmp_imm_s(IntCC::NotEqual, c, 0);
                self.b.ins().select(c, x, y)
            }
            Expr::Shuffle(ab, lanes) => {
                // Cranelift shuffles bytes; x64 lowers the lane patterns used here to `unpck*ps`/`shufps`.
                let bytes = MemFlagsData::new().with_endianness(Endianness::Little);
                let [a, b] = [0, 1].map(|i| {
                    let v = self.expr(&ab[i]);
                    self.b.ins().bitcast(types::I8X16, bytes, v)
                });
                let mask: Vec<u8> = lanes.iter().flat_map(|&l| (0..4).map(move |k| 4 * l + k)).collect();
                let mask = self.b.func.dfg.immediates.push(ConstantData::from(mask));
                let s = self.b.ins().shuffle(a, b, mask);
                self.b.ins().bitcast(types::F32X4, bytes, s)
            }
            Expr::Thread => unreachable!("`build` refuses GPU-shaped kernels"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{e, Access, Kb, Launch, Slot};

    /// A one-launch program over `param` (read) and a 24-float arena whose first 8 floats are the
    /// kernel's output buffer; the program's output is the whole arena, so stray writes show.
    fn run(k: Kernel, param: Vec<f32>, tier: Tier) -> (Vec<f32>, Vec<Violation>) {
        let slots = vec![Slot::Param(0), Slot::Arena { offset: 0, len: 8 }];
        let p = Program {
            batch: 1,
            replicas: 1,
            tier,
            launches: vec![Launch { kernel: k, slots, flops: 0 }],
            params: vec![Arc::new(cnnc_runtime::exec::Buffer::from_slice(&param).expect("small"))],
            arena_len: 24,
            inputs: vec![],
            output: (0, vec![1, 24]),
        };
        let jit = compile(&p, Options { checked: true }).expect("compiles");
        let y = jit.exe.run(&[], 1).expect("runs");
        (y.data().to_vec(), jit.violations())
    }

    #[test]
    fn checked_mode_reports_and_blocks_out_of_bounds_accesses() {
        let mut kb = Kb::new("off_by_one", 1);
        let (x, y) = (kb.buf("x", 8, Access::Read), kb.buf("y", 8, Access::Write));
        // Copies 9 elements of 8-element buffers: one load and one store past the end.
        kb.for_(0usize, 9usize, |kb, i| kb.store(y, i.clone(), x.at(i) + 1.0f32));
        let (out, v) = run(kb.finish(), (0..8).map(|i| i as f32).collect(), Tier::Portable);
        let v: Vec<(String, i64)> = v.into_iter().map(|v| (v.buffer, v.index)).collect();
        assert_eq!(v, [("x".to_string(), 8), ("y".to_string(), 8)]);
        // The blocked store went to element 0 instead; nothing past the buffer was written.
        assert_eq!(&out[1..8], &[2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        assert!(out[8..].iter().all(|&v| v == 0.0), "{out:?}");
    }

    #[test]
    fn lanes_of_a_vector() {
        let mut kb = Kb::new("lanes", 1);
        let (x, y) = (kb.buf("x", 8, Access::Read), kb.buf("y", 8, Access::Write));
        // y[i] = lane 3 − i of x[0..4], reversed.
        let v = kb.let_(x.at4(0usize));
        (0..4).for_each(|i| kb.store(y, i, v.clone().lane(3 - i)));
        let (out, v) = run(kb.finish(), (0..8).map(|i| i as f32).collect(), Tier::Portable);
        assert_eq!((&out[..4], v.len()), (&[3.0, 2.0, 1.0, 0.0][..], 0));
    }

    #[test]
    fn launches_that_differ_only_in_name_share_one_function() {
        let kernel = |name: &str| {
            let mut kb = Kb::new(name, 1);
            let (x, y) = (kb.buf("x", 8, Access::Read), kb.buf("y", 8, Access::Write));
            kb.for_(0usize, 8usize, |kb, i| kb.store(y, i.clone(), x.at(i) + 1.0f32));
            kb.finish()
        };
        let launch = |name, offset| Launch { kernel: kernel(name), slots: vec![Slot::Param(0), Slot::Arena { offset, len: 8 }], flops: 0 };
        let param = Arc::new(cnnc_runtime::exec::Buffer::from_slice(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]).expect("small"));
        let p = Program {
            batch: 1,
            replicas: 1,
            tier: Tier::Portable,
            launches: vec![launch("first", 0), launch("second", 8)],
            params: vec![param],
            arena_len: 16,
            inputs: vec![],
            output: (0, vec![1, 16]),
        };
        for checked in [false, true] {
            let jit = compile(&p, Options { checked }).expect("compiles");
            let [a, b] = [0, 1].map(|i| jit.exe.steps()[i].f as usize);
            assert_eq!(a == b, !checked, "checked mode names each launch in its code");
            let y = jit.exe.run(&[], 1).expect("runs");
            assert_eq!(y.data(), (0..16).map(|i| (i % 8 + 1) as f32).collect::<Vec<_>>());
            assert_eq!(jit.exe.steps()[1].name, "second");
        }
    }

    #[test]
    fn a_program_larger_than_memory_is_refused_before_allocating() {
        let Some(have) = cnnc_runtime::exec::physical_memory() else { return };
        let kb = Kb::new("nothing", 1);
        let p = Program {
            batch: 64,
            replicas: 1,
            tier: Tier::Portable,
            launches: vec![Launch { kernel: kb.finish(), slots: vec![], flops: 0 }],
            params: vec![],
            arena_len: (have / 4 + 1) as usize,
            inputs: vec![],
            output: (0, vec![1]),
        };
        assert!(matches!(compile(&p, Options::default()), Err(JitError::TooLarge { batch: 64, .. })));
    }

    #[test]
    fn checked_mode_checks_every_tile_call() {
        let tiers: Vec<Tier> = Tier::ALL.into_iter().filter(|t| t.assembled() && t.available()).collect();
        if tiers.is_empty() {
            eprintln!("skipped: this CPU has no assembled tier");
        }
        for tier in tiers {
            overrunning_tile_is_skipped(tier);
        }
    }

    fn overrunning_tile_is_skipped(tier: Tier) {
        // An MR-row tile whose C rows (stride 8) run far past the 8-element buffer.
        let mr = tier.mr();
        let mut kb = Kb::new("tile_overrun", 1);
        let (a, c) = (kb.buf("A", mr, Access::Read), kb.buf("C", 8, Access::Write));
        kb.gemm(crate::kernel::Gemm {
            a,
            a0: e(0i64),
            bias: a,
            bias0: e(0i64),
            b: a,
            b0: e(0i64),
            c,
            c0: e(0i64),
            rows_b: crate::kernel::BRows::Strided(1),
            ldc: 8,
            depth: e(1i64),
            rows: e(mr as i64),
            cols: e(1i64),
            blocks: 1,
            a_pitch: 0,
            accumulate: false,
            relu: false,
            add: None,
        });
        let (out, v) = run(kb.finish(), vec![1.0; mr], tier);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].buffer.as_str(), v[0].index, v[0].len), ("C", 8 * mr as i64 - 8, 8));
        assert!(out.iter().all(|&v| v == 0.0), "the call must be skipped: {out:?}");
    }
}
