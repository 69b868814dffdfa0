//! Kernel IR: the loop nests every backend generates code from.
//!
//! A [`Kernel`] is a function over numbered flat `f32` buffers: one parallel loop `0..extent` that the
//! runtime splits into contiguous ranges (one per task), and inside it ordinary statements — counted
//! loops, conditionals, scalar and 4-lane vector loads, stores, FMAs, min/max, lane shuffles and a few
//! math calls.
//! Integers are `i64`, indices count elements (not bytes). Kernels are built with [`Kb`], whose
//! closures keep the nesting of the source equal to the nesting of the loops.
//!
//! This stage owns: the IR, its type rules ([`Kernel::ty`]), its printer, and the lowering of layer
//! graphs to [`Program`]s: `program.rs` runs the passes (lowering, aliasing, lifetimes, the memory
//! plan); `ops.rs` chooses a strategy per op, each in its own file — `elementwise.rs`, `pool.rs`,
//! `gemv.rs`, `gemm.rs` (direct convolution, linear layers above batch 1, Winograd's products),
//! `winograd.rs` (five F(m×m, r×r) algorithms) — over the helpers of `common.rs`.
//! Invariant left: every load and store of a kernel indexes inside its buffer's declared length for the
//! shapes it was built for (the JIT's checked mode verifies this at run time), and parallel tasks write
//! disjoint elements, so results do not depend on how many tasks run.

mod common;
mod elementwise;
mod gemm;
mod gemv;
pub mod gpu;
mod ops;
mod pool;
mod program;
mod winograd;

pub use crate::target::Tier;
pub use ops::expand_calls;
pub use pool::row_cells;
pub use program::{listing_after, program, program_each, program_with, Launch, Lowering, Pass, Program, Slot, ALIGN};
pub use winograd::Winograd;

/// How linear layers keep their weights (`--weights-dtype`). Opt-in only: f32 is the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightsDtype {
    #[default]
    F32,
    /// Rounded to bfloat16 (to nearest, ties to even) at compile time and computed in f32: the batch-1
    /// GEMV streams half the bytes; the GEMM tiles of larger batches read the rounded values as f32.
    Bf16,
}

impl WeightsDtype {
    /// `v` as this dtype stores it, back in f32.
    pub fn round(self, v: f32) -> f32 {
        match self {
            WeightsDtype::F32 => v,
            WeightsDtype::Bf16 => f32::from_bits((bf16_bits(v) as u32) << 16),
        }
    }
}

/// `v` rounded to bfloat16 (to nearest, ties to even; NaN stays NaN), as its 16 bits.
pub fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

use std::fmt;
use std::ops::{Add, Div, Mul, Rem, Sub};

/// A mutable kernel variable (`%v3`), typed once by its declaration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub u32);

/// A kernel buffer, by position in [`Kernel::bufs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Buf(pub u16);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    I64,
    F32,
    /// Four `f32` lanes (the widest vector Cranelift's x64 backend lowers).
    F32x4,
}

pub const LANES: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    /// Integer division of non-negative operands, or float division.
    Div,
    Rem,
    Min,
    Max,
    /// Integer comparisons and conjunction give 0 or 1.
    Lt,
    Le,
    Eq,
    And,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    /// f32 → f32x4 with the value in every lane.
    Splat,
    /// f32x4 → f32: `(l0 + l1) + (l2 + l3)`.
    HSum,
    /// f32x4 → f32: lane `i` (0–3).
    Lane(u8),
    Exp,
    Ln,
    /// Correctly rounded, as IEEE 754 requires.
    Sqrt,
    /// Per lane, the f32 whose top 16 bits are the lane's low 16 bits (a bfloat16 stored there),
    /// zeros below.
    Bf16Lo,
    /// Per lane, the lane's top 16 bits (a bfloat16 stored there) with zeros below.
    Bf16Hi,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Int(i64),
    F32(f32),
    Var(Var),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    Un(UnOp, Box<Expr>),
    /// `a · b + c`, rounded once.
    Fma(Box<[Expr; 3]>),
    Load {
        buf: Buf,
        idx: Box<Expr>,
        lanes: u8,
    },
    /// `cond != 0 ? a : b` (both sides are evaluated).
    Select(Box<[Expr; 3]>),
    /// Lanes of two vectors: lane i is lane `lanes[i]` of a ++ b (0–3 from a, 4–7 from b). The
    /// transposes that stride phases and tile outputs need, one or two instructions each on x64.
    Shuffle(Box<[Expr; 2]>, [u8; 4]),
    /// The running thread's number in its block, `0..block` (GPU-shaped kernels only: [`Kernel::block`]).
    Thread,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Set(Var, Expr),
    /// Stores a scalar or a vector (its lanes go to `idx..idx + 4`).
    Store {
        buf: Buf,
        idx: Expr,
        value: Expr,
    },
    /// `for var in lo..hi (step)`: `hi` is evaluated once, before the first iteration.
    For {
        var: Var,
        lo: Expr,
        hi: Expr,
        step: i64,
        body: Vec<Stmt>,
    },
    If {
        cond: Expr,
        then: Vec<Stmt>,
        els: Vec<Stmt>,
    },
    /// One GEMM tile, for backends with their own microkernel (see [`Gemm`]).
    Gemm(Box<Gemm>),
    /// A native routine of the assembled tiers over items `lo..hi` (see [`Call`]).
    Call(Box<Call>),
    /// Every thread of the block waits here until all have arrived; their [`Access::Shared`] stores
    /// before it are visible to all after it. Every thread of a block must reach the same barriers
    /// (GPU-shaped kernels only).
    Barrier,
}

impl Stmt {
    /// Calls `f` on every statement of `body`, depth first.
    pub fn visit(body: &[Stmt], f: &mut impl FnMut(&Stmt)) {
        for s in body {
            f(s);
            match s {
                Stmt::For { body, .. } => Stmt::visit(body, f),
                Stmt::If { then, els, .. } => {
                    Stmt::visit(then, f);
                    Stmt::visit(els, f);
                }
                _ => {}
            }
        }
    }
}

/// A GEMM tile with its epilogue, as one statement:
/// `C[c0 + r·ldc + j] = act(init + Σ_{k < depth} A[a0 + k·MR + r] · B(k, j) [+ R[c0 + r·ldc + j]])`
/// for `r < rows`, `j < cols`, one FMA per k in order, where init is `bias[bias0 + r]`, or with
/// `accumulate` the value already in C (so a long sum can be split into slices of k without changing a
/// single rounding), and R the residual buffer `add` (laid out as C), added after the sum as an
/// unfused add would.
/// MR and NR are the [`Tier`]'s tile shape, `rows ≤ MR`, `cols ≤ NR`, and `A` holds MR rows per k
/// (zero rows pad the last block). `B(k, j)` is read as [`BRows`] says. With `blocks` > 1 (AVX2's column
/// tile, [`crate::jit::avx2::column_tile`]) the call covers `rows` = blocks·MR rows of a constant 1–4
/// `cols`, and row r's weights are A's block r / MR, `a_pitch` elements after the previous one:
/// `A[a0 + (r / MR)·a_pitch + k·MR + r % MR]` (C's rows and the bias run on across blocks as they are).
#[derive(Clone, Debug, PartialEq)]
pub struct Gemm {
    pub a: Buf,
    pub a0: Expr,
    pub bias: Buf,
    pub bias0: Expr,
    pub b: Buf,
    pub b0: Expr,
    pub c: Buf,
    pub c0: Expr,
    pub rows_b: BRows,
    pub ldc: usize,
    pub depth: Expr,
    pub rows: Expr,
    pub cols: Expr,
    pub blocks: usize,
    pub a_pitch: usize,
    pub accumulate: bool,
    pub relu: bool,
    pub add: Option<Buf>,
}

/// A routine the assembled tiers run natively (Rust compiled for their vectors, [`crate::jit::native`])
/// over items `lo..hi` of the launch, from `x` into `y`, with `extra` where the routine reads one (a
/// pooling's divisors with `exclude_pad`, a transpose's residual). Other backends run the loops the
/// portable tier builds instead ([`expand_calls`]): the same values, rounding for rounding.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub routine: Routine,
    pub x: Buf,
    pub y: Buf,
    pub extra: Option<Buf>,
    pub lo: Expr,
    pub hi: Expr,
}

/// The native routines, each with its geometry as the routine reads it (`#[repr(C)]` integers, baked
/// into the code as data).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Routine {
    /// Max or average pooling of planes (planes `h·pitch` and `oh·ow` elements apart), separably:
    /// `pool::pool`'s order (rows, then columns).
    Pool(PoolGeo),
    /// A turned convolution's output: per item (image, 16 channels), `y[img][f][pix] = yt[img·p +
    /// pix][f]`, plus the residual, then ReLU (`gemm::turned_conv`'s `transpose`).
    Transpose(TransposeGeo),
}

/// A [`Routine::Transpose`]'s geometry: `p` pixels and `co` channels (a multiple of 16) per image,
/// `relu` 1 to apply it after the residual.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TransposeGeo {
    pub p: i64,
    pub co: i64,
    pub relu: i64,
}

/// A [`Routine::Pool`]'s geometry: `kind` is [`PoolGeo::MAX`], [`PoolGeo::AVG`] (divided by the
/// window's size) or [`PoolGeo::AVG_COUNTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolGeo {
    pub kind: i64,
    pub kernel: [i64; 2],
    pub stride: [i64; 2],
    pub pad: [i64; 2],
    /// Input rows and columns, and the input's row pitch.
    pub h: i64,
    pub w: i64,
    pub pitch: i64,
    pub oh: i64,
    pub ow: i64,
}

impl PoolGeo {
    pub const MAX: i64 = 0;
    pub const AVG: i64 = 1;
    pub const AVG_COUNTS: i64 = 2;
}

/// How a [`Gemm`] finds B(k, j).
#[derive(Clone, Debug, PartialEq)]
pub enum BRows {
    /// `B[b0 + k·ldb + j]`: a matrix with rows `ldb` apart.
    Strided(usize),
    /// The column matrix of a convolution, read in place (implicit im2col) from its stride-phase-split
    /// input (see [`Taps`]); `k0` is the first k of the call (a multiple of kw), `col` the first output
    /// pixel. Lanes that fall on horizontal padding the input does not hold read zero, so the values
    /// are those of the packed column matrix, bit for bit. `offsets[k0 / kw + i]` holds tap row i's
    /// [`Taps::offset`] and `masks[masks0 + kx]` which of the NR lanes read memory at tap column kx, as
    /// i32/u32 bits (the JIT's tile loads them; the other backends evaluate the formulas).
    Taps { taps: Taps, k0: Expr, col: Expr, offsets: Buf, masks: Buf, masks0: Expr },
}

/// The geometry of an implicit column matrix over an input split into s0 × s1 stride phases per
/// channel (`phase` elements each, rows `pitch` apart: `x[c][ry][rx][iq][jq]`) whose output pixels are
/// numbered `p = oy·pitch + ox` (columns ox ≥ ow, if the pitch is wider, are computed and ignored).
/// For `kk = k0 + k`: tap row `r = kk / kw` (channel `r / kh`, kernel row `ky = r % kh`), tap column
/// `kx = kk % kw`, pixel `p = col + j`:
/// `B(k, j) = B[b0 + p + offset(r) + column(kx) − pad]` if `0 ≤ source(p % pitch, kx) < w`, else 0.
/// The formulas are generic, so that the JIT's tables (i64) and the other backends' expressions
/// ([`Expr`]) are the same code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Taps {
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    /// Row pitch of the input phases and of the output.
    pub pitch: usize,
    /// Elements per stride phase of a channel.
    pub phase: usize,
    /// Left padding the input does not hold (read as zero).
    pub pad: usize,
    /// Columns the input holds (at least the pitch when all padding is stored).
    pub w: usize,
}

/// Integer arithmetic the [`Taps`] formulas need: `i64` (evaluated) and [`Expr`] (in kernels).
pub trait TapInt: Clone + Add<Output = Self> + Sub<i64, Output = Self> + Mul<i64, Output = Self> + Div<i64, Output = Self> + Rem<i64, Output = Self> {}
impl<T: Clone + Add<Output = T> + Sub<i64, Output = T> + Mul<i64, Output = T> + Div<i64, Output = T> + Rem<i64, Output = T>> TapInt for T {}

impl Taps {
    /// Where tap row `r` (channel r / kh, kernel row r % kh) starts, relative to its group's input.
    pub fn offset<T: TapInt>(&self, r: T) -> T {
        let [s0, s1] = self.stride.map(|s| s as i64);
        let (c, ky) = (r.clone() / self.kh as i64, r % self.kh as i64);
        (c * s0 + ky.clone() % s0) * (s1 * self.phase as i64) + ky / s0 * self.pitch as i64
    }

    /// Where tap column `kx` lies from its row's start (phase, then shift), in elements.
    pub fn column<T: TapInt>(&self, kx: T) -> T {
        let s1 = self.stride[1] as i64;
        kx.clone() % s1 * self.phase as i64 + kx / s1
    }

    /// The input column output column `ox` reads at tap column `kx`: padding unless in `0..w`.
    pub fn source<T: TapInt>(&self, ox: T, kx: T) -> T {
        ox + kx / self.stride[1] as i64 - self.pad as i64
    }

    /// Tap column `kx`'s shift from the output column ([`Taps::source`] − ox): tap columns with the same
    /// shift read (and mask) the same lanes.
    pub fn shift(&self, kx: usize) -> i64 {
        self.source(0, kx as i64)
    }

    /// Whether every output column `0..pitch` reads memory at tap column `kx` (no lane falls on
    /// padding, so only the call's own columns mask its loads).
    pub fn unmasked(&self, kx: usize) -> bool {
        let d = self.shift(kx);
        d >= 0 && self.pitch as i64 - 1 + d < self.w as i64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
    /// Scratch private to one invocation: not passed in, contents undefined at entry (the JIT puts it
    /// on the stack).
    Local,
    /// Scratch shared by the threads of one block (GPU-shaped kernels only): not passed in, contents
    /// undefined at entry; a thread may read what another stored only across a [`Stmt::Barrier`].
    Shared,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BufDecl {
    pub name: String,
    /// Length in elements: every access stays below it.
    pub len: usize,
    pub access: Access,
}

impl BufDecl {
    /// Whether the runtime passes the buffer in (scratch is the kernel's own).
    pub fn passed(&self) -> bool {
        !matches!(self.access, Access::Local | Access::Shared)
    }
}

/// One kernel: `for i in 0..extent` split across tasks, each task running `body` with
/// [`Kernel::LO`]..[`Kernel::HI`] bound to its contiguous share of the iterations.
///
/// A GPU-shaped kernel (`block: Some(threads)`, lowered only for the cuda backend) is instead a grid
/// of `extent` thread blocks: every thread of block `i` runs `body` with `lo = i`, `hi = i + 1` and its
/// own [`Expr::Thread`], sharing the block's [`Access::Shared`] buffers and meeting at
/// [`Stmt::Barrier`]s. Tasks are then blocks: what "tasks write disjoint elements" asks of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub bufs: Vec<BufDecl>,
    pub vars: Vec<Ty>,
    pub extent: usize,
    pub body: Vec<Stmt>,
    /// Threads per block of a GPU-shaped kernel; `None` for the CPU's task-shaped ones.
    pub block: Option<u32>,
}

impl Kernel {
    /// The buffers the runtime passes in (all but [`Access::Local`] and [`Access::Shared`] ones), in order.
    pub fn args(&self) -> impl Iterator<Item = &BufDecl> {
        self.bufs.iter().filter(|b| b.passed())
    }

    /// The first and one-past-last parallel iteration of the running task (variables 0 and 1).
    pub const LO: Var = Var(0);
    pub const HI: Var = Var(1);

    /// The type of an expression (the builder only forms well-typed ones).
    pub fn ty(&self, e: &Expr) -> Ty {
        match e {
            Expr::Int(_) => Ty::I64,
            Expr::F32(_) => Ty::F32,
            Expr::Var(v) => self.vars[v.0 as usize],
            Expr::Bin(op, a, _) => match op {
                BinOp::Lt | BinOp::Le | BinOp::Eq | BinOp::And => Ty::I64,
                _ => self.ty(a),
            },
            Expr::Un(UnOp::Splat, _) => Ty::F32x4,
            Expr::Un(UnOp::HSum | UnOp::Lane(_), _) => Ty::F32,
            Expr::Un(_, a) => self.ty(a),
            Expr::Fma(abc) => self.ty(&abc[0]),
            Expr::Load { lanes, .. } => lane_ty(*lanes),
            Expr::Select(abc) => self.ty(&abc[1]),
            Expr::Shuffle(..) => Ty::F32x4,
            Expr::Thread => Ty::I64,
        }
    }
}

fn lane_ty(lanes: u8) -> Ty {
    if lanes == 1 {
        Ty::F32
    } else {
        Ty::F32x4
    }
}

macro_rules! from {
    ($($t:ty => |$v:ident| $e:expr),*) => {$( impl From<$t> for Expr { fn from($v: $t) -> Self { $e } } )*};
}
from!(i64 => |v| Expr::Int(v), usize => |v| Expr::Int(v as i64), f32 => |v| Expr::F32(v), Var => |v| Expr::Var(v), &Expr => |v| v.clone());

macro_rules! arith {
    ($($trait:ident $method:ident $op:ident),*) => {$(
        impl<T: Into<Expr>> std::ops::$trait<T> for Expr {
            type Output = Expr;
            fn $method(self, rhs: T) -> Expr { Expr::Bin(BinOp::$op, Box::new(self), Box::new(rhs.into())) }
        }
        impl<T: Into<Expr>> std::ops::$trait<T> for Var {
            type Output = Expr;
            fn $method(self, rhs: T) -> Expr { Expr::Bin(BinOp::$op, Box::new(self.into()), Box::new(rhs.into())) }
        }
    )*};
}
arith!(Add add Add, Sub sub Sub, Mul mul Mul, Div div Div, Rem rem Rem);

/// `x.min(y)` … for binary operators ([`BinOp`]), `x.splat()` … for unary ones ([`UnOp`]).
macro_rules! methods {
    (bin: $($name:ident $op:ident),*) => {$( pub fn $name(self, rhs: impl Into<Expr>) -> Expr { self.bin(BinOp::$op, rhs) } )*};
    (un: $($name:ident $op:ident),*) => {$( pub fn $name(self) -> Expr { self.un(UnOp::$op) } )*};
}

impl Expr {
    fn bin(self, op: BinOp, rhs: impl Into<Expr>) -> Expr {
        Expr::Bin(op, Box::new(self), Box::new(rhs.into()))
    }
    fn un(self, op: UnOp) -> Expr {
        Expr::Un(op, Box::new(self))
    }
    methods!(bin: min Min, max Max, lt Lt, le Le, eq Eq, and And);
    methods!(un: splat Splat, hsum HSum, exp Exp, ln Ln, sqrt Sqrt);
    /// Lane `i` of a vector ([`UnOp::Lane`]).
    pub fn lane(self, i: usize) -> Expr {
        assert!(i < LANES, "lane {i} of a {LANES}-lane vector");
        self.un(UnOp::Lane(i as u8))
    }
    /// [`Expr::splat`] when `vec`, else itself: scalars for loop bodies written once for both widths.
    pub fn lanes(self, vec: bool) -> Expr {
        if vec {
            self.splat()
        } else {
            self
        }
    }
    /// The bfloat16 in the low (`high` false) or high half of each lane, widened ([`UnOp::Bf16Lo`]).
    pub fn bf16(self, high: bool) -> Expr {
        self.un(if high { UnOp::Bf16Hi } else { UnOp::Bf16Lo })
    }
    /// `self · b + c`.
    pub fn fma(self, b: impl Into<Expr>, c: impl Into<Expr>) -> Expr {
        Expr::Fma(Box::new([self, b.into(), c.into()]))
    }
    pub fn select(self, a: impl Into<Expr>, b: impl Into<Expr>) -> Expr {
        Expr::Select(Box::new([self, a.into(), b.into()]))
    }
    /// [`Expr::Shuffle`] of `self` and `b`.
    pub fn shuffle(self, b: impl Into<Expr>, lanes: [u8; 4]) -> Expr {
        assert!(lanes.iter().all(|&l| l < 8), "lanes {lanes:?} of two 4-lane vectors");
        Expr::Shuffle(Box::new([self, b.into()]), lanes)
    }
}

/// The 4 × 4 transpose of four vectors (row r's lane c becomes row c's lane r): lanes of rows 0 and 1,
/// then of 2 and 3, interleaved, then their halves joined (x64: eight `unpck` instructions).
pub fn transpose(rows: [Expr; 4]) -> [Expr; 4] {
    let [a, b, c, d] = rows;
    let (ab_lo, ab_hi) = (a.clone().shuffle(b.clone(), [0, 4, 1, 5]), a.shuffle(b, [2, 6, 3, 7]));
    let (cd_lo, cd_hi) = (c.clone().shuffle(d.clone(), [0, 4, 1, 5]), c.shuffle(d, [2, 6, 3, 7]));
    [
        ab_lo.clone().shuffle(cd_lo.clone(), [0, 1, 4, 5]),
        ab_lo.shuffle(cd_lo, [2, 3, 6, 7]),
        ab_hi.clone().shuffle(cd_hi.clone(), [0, 1, 4, 5]),
        ab_hi.shuffle(cd_hi, [2, 3, 6, 7]),
    ]
}

/// Converts to an [`Expr`] (`e(v)` reads better than `Expr::from(v)` in kernel builders).
pub fn e(v: impl Into<Expr>) -> Expr {
    v.into()
}

impl Buf {
    /// A scalar load of element `idx`.
    pub fn at(self, idx: impl Into<Expr>) -> Expr {
        Expr::Load { buf: self, idx: Box::new(idx.into()), lanes: 1 }
    }
    /// A vector load of elements `idx..idx + 4`.
    pub fn at4(self, idx: impl Into<Expr>) -> Expr {
        Expr::Load { buf: self, idx: Box::new(idx.into()), lanes: LANES as u8 }
    }
    /// [`Buf::at4`] when `vec`, else [`Buf::at`]: for loop bodies written once for both widths.
    pub fn load(self, idx: impl Into<Expr>, vec: bool) -> Expr {
        if vec {
            self.at4(idx)
        } else {
            self.at(idx)
        }
    }
}

/// Kernel builder: statements go to the innermost open block.
pub struct Kb {
    k: Kernel,
    blocks: Vec<Vec<Stmt>>,
}

impl Kb {
    pub fn new(name: impl Into<String>, extent: usize) -> Kb {
        Kb { k: Kernel { name: name.into(), bufs: vec![], vars: vec![Ty::I64, Ty::I64], extent, body: vec![], block: None }, blocks: vec![vec![]] }
    }

    /// A GPU-shaped kernel: `blocks` thread blocks of `threads` threads (see [`Kernel::block`]).
    pub fn blocks(name: impl Into<String>, blocks: usize, threads: u32) -> Kb {
        // A grid's x dimension holds 2³¹ − 1 blocks; memory runs out long before (each block of a
        // GEMM owns 4096+ outputs).
        assert!(blocks <= i32::MAX as usize, "a grid of {blocks} blocks");
        let mut kb = Kb::new(name, blocks);
        kb.k.block = Some(threads);
        kb
    }

    /// All threads of the block meet here ([`Stmt::Barrier`]).
    pub fn barrier(&mut self) {
        self.push(Stmt::Barrier);
    }

    /// This task's share of the parallel loop, `lo..hi`.
    pub fn range(&self) -> (Expr, Expr) {
        (Kernel::LO.into(), Kernel::HI.into())
    }

    pub fn buf(&mut self, name: impl Into<String>, len: usize, access: Access) -> Buf {
        self.k.bufs.push(BufDecl { name: name.into(), len, access });
        Buf(self.k.bufs.len() as u16 - 1)
    }

    /// Declares a variable holding `init`.
    pub fn var(&mut self, init: impl Into<Expr>) -> Var {
        let init = init.into();
        let v = Var(self.k.vars.len() as u32);
        self.k.vars.push(self.k.ty(&init));
        self.set(v, init);
        v
    }

    /// Declares a variable evaluated once and reused (the builder's `let`).
    pub fn let_(&mut self, init: impl Into<Expr>) -> Expr {
        self.var(init).into()
    }

    fn push(&mut self, s: Stmt) {
        self.blocks.last_mut().expect("a block is open").push(s);
    }

    pub fn set(&mut self, v: Var, value: impl Into<Expr>) {
        self.push(Stmt::Set(v, value.into()));
    }

    pub fn store(&mut self, buf: Buf, idx: impl Into<Expr>, value: impl Into<Expr>) {
        self.push(Stmt::Store { buf, idx: idx.into(), value: value.into() });
    }

    fn block(&mut self, f: impl FnOnce(&mut Kb)) -> Vec<Stmt> {
        self.blocks.push(vec![]);
        f(self);
        self.blocks.pop().expect("opened above")
    }

    /// `for i in lo..hi step`; the closure receives `i`. Nothing where the range is constant and empty.
    pub fn for_step(&mut self, lo: impl Into<Expr>, hi: impl Into<Expr>, step: i64, f: impl FnOnce(&mut Kb, Expr)) {
        let (lo, hi) = (lo.into(), hi.into());
        if let (Expr::Int(l), Expr::Int(h)) = (&lo, &hi) {
            if l >= h {
                return;
            }
        }
        let var = Var(self.k.vars.len() as u32);
        self.k.vars.push(Ty::I64);
        let body = self.block(|kb| f(kb, var.into()));
        self.push(Stmt::For { var, lo, hi, step, body });
    }

    pub fn for_(&mut self, lo: impl Into<Expr>, hi: impl Into<Expr>, f: impl FnOnce(&mut Kb, Expr)) {
        self.for_step(lo, hi, 1, f)
    }

    pub fn if_else(&mut self, cond: Expr, then: impl FnOnce(&mut Kb), els: impl FnOnce(&mut Kb)) {
        let (then, els) = (self.block(then), self.block(els));
        self.push(Stmt::If { cond, then, els });
    }

    pub fn gemm(&mut self, g: Gemm) {
        self.push(Stmt::Gemm(Box::new(g)));
    }

    pub fn call(&mut self, c: Call) {
        self.push(Stmt::Call(Box::new(c)));
    }

    pub fn if_(&mut self, cond: Expr, then: impl FnOnce(&mut Kb)) {
        self.if_else(cond, then, |_| {})
    }

    /// Continues building in `k`: its buffers and variables, an empty body.
    fn resume(k: &Kernel) -> Kb {
        Kb { k: Kernel { body: vec![], ..k.clone() }, blocks: vec![vec![]] }
    }

    pub fn finish(mut self) -> Kernel {
        self.k.body = self.blocks.pop().expect("the body block");
        self.k
    }
}

// ---- printing: `cnnc compile --emit kernels` ----

impl fmt::Display for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Kernel::LO => write!(f, "lo"),
            Kernel::HI => write!(f, "hi"),
            Var(v) => write!(f, "%v{v}"),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Int(v) => write!(f, "{v}"),
            Expr::F32(v) => write!(f, "{v:?}f"),
            Expr::Var(v) => write!(f, "{v}"),
            Expr::Bin(op, a, b) => {
                let sym = match op {
                    BinOp::Add => "+",
                    BinOp::Sub => "-",
                    BinOp::Mul => "*",
                    BinOp::Div => "/",
                    BinOp::Rem => "%",
                    BinOp::Lt => "<",
                    BinOp::Le => "<=",
                    BinOp::Eq => "==",
                    BinOp::And => "&&",
                    BinOp::Min => return write!(f, "min({a}, {b})"),
                    BinOp::Max => return write!(f, "max({a}, {b})"),
                };
                write!(f, "({a} {sym} {b})")
            }
            Expr::Un(op, a) => write!(f, "{}({a})", format!("{op:?}").to_lowercase()),
            Expr::Fma(abc) => write!(f, "fma({}, {}, {})", abc[0], abc[1], abc[2]),
            Expr::Load { buf, idx, lanes } => write!(f, "b{}[{idx}{}]", buf.0, if *lanes == 1 { "" } else { ";4" }),
            Expr::Select(abc) => write!(f, "({} ? {} : {})", abc[0], abc[1], abc[2]),
            Expr::Shuffle(ab, l) => write!(f, "shuffle({}, {}, {l:?})", ab[0], ab[1]),
            Expr::Thread => write!(f, "thread"),
        }
    }
}

fn write_block(f: &mut fmt::Formatter<'_>, body: &[Stmt], depth: usize) -> fmt::Result {
    let pad = "  ".repeat(depth);
    for s in body {
        match s {
            Stmt::Set(v, e) => writeln!(f, "{pad}{v} = {e}")?,
            Stmt::Store { buf, idx, value } => writeln!(f, "{pad}b{}[{idx}] = {value}", buf.0)?,
            Stmt::For { var, lo, hi, step, body } => {
                let step = if *step == 1 { String::new() } else { format!(" step {step}") };
                writeln!(f, "{pad}for {var} in {lo}..{hi}{step} {{")?;
                write_block(f, body, depth + 1)?;
                writeln!(f, "{pad}}}")?;
            }
            Stmt::Gemm(g) => {
                let Gemm { a, a0, bias, bias0, b, b0, c, c0, ldc, depth, rows, cols, .. } = &**g;
                let rows_b = match &g.rows_b {
                    BRows::Strided(ldb) => format!("ldb {ldb}"),
                    BRows::Taps { taps, k0, col, offsets, masks, masks0 } => {
                        format!("{taps:?} from k {k0} column {col}, offsets b{}, masks b{}[{masks0}]", offsets.0, masks.0)
                    }
                };
                let mut flags = [(g.accumulate, ", accumulate"), (g.relu, ", relu")].map(|(on, s)| if on { s } else { "" }).concat();
                if let Some(r) = g.add {
                    flags = format!("{flags}, add b{}", r.0);
                }
                if g.blocks > 1 {
                    flags = format!(", {} blocks {} apart{flags}", g.blocks, g.a_pitch);
                }
                let (a, bias, b, c) = (a.0, bias.0, b.0, c.0);
                writeln!(
                    f,
                    "{pad}gemm(b{a}[{a0}], b{bias}[{bias0}], b{b}[{b0}] -> b{c}[{c0}]; {rows_b}, ldc {ldc}, depth {depth}, rows {rows}, cols {cols}{flags})"
                )?
            }
            Stmt::Call(c) => {
                let Call { routine, x, y, extra, lo, hi } = &**c;
                let extra = extra.map_or(String::new(), |b| format!(", b{}", b.0));
                let what = match routine {
                    Routine::Pool(g) => {
                        let kind = ["max", "avg", "avg counted"][g.kind as usize];
                        let ([kh, kw], [sh, sw], [ph, pw]) = (g.kernel, g.stride, g.pad);
                        format!("pool({kind} {kh}x{kw}/{sh}x{sw} pad {ph}x{pw}, {}x{} (pitch {}) -> {}x{}", g.h, g.w, g.pitch, g.oh, g.ow)
                    }
                    Routine::Transpose(g) => format!("transpose({} pixels x {} channels{}", g.p, g.co, if g.relu != 0 { ", relu" } else { "" }),
                };
                writeln!(f, "{pad}call {what}; b{}[{lo}..{hi}] -> b{}{extra})", x.0, y.0)?
            }
            Stmt::Barrier => writeln!(f, "{pad}barrier")?,
            Stmt::If { cond, then, els } => {
                writeln!(f, "{pad}if {cond} {{")?;
                write_block(f, then, depth + 1)?;
                if !els.is_empty() {
                    writeln!(f, "{pad}}} else {{")?;
                    write_block(f, els, depth + 1)?;
                }
                writeln!(f, "{pad}}}")?;
            }
        }
    }
    Ok(())
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.block {
            None => writeln!(f, "kernel {} parallel lo..hi in 0..{} {{", self.name, self.extent)?,
            Some(t) => writeln!(f, "kernel {} blocks lo in 0..{} of {t} threads {{", self.name, self.extent)?,
        }
        for (i, b) in self.bufs.iter().enumerate() {
            writeln!(f, "  b{i}: {}[{}] {:?}", b.name, b.len, b.access)?;
        }
        write_block(f, &self.body, 1)?;
        writeln!(f, "}}")
    }
}

/// A program as text: the memory plan, then every launch's kernel (`cnnc compile --emit kernels`).
pub fn listing(p: &Program) -> String {
    let mut out = format!("; batch {}, arena {} floats, {} packed parameters\n", p.batch, p.arena_len, p.params.len());
    for l in &p.launches {
        let slots: Vec<String> = l
            .slots
            .iter()
            .map(|s| match s {
                Slot::Arena { offset, len } => format!("arena[{offset}..{}]", offset + len),
                Slot::Param(i) => format!("param{i}"),
            })
            .collect();
        out += &format!("\n; {} <- {}\n{}", l.kernel.name, slots.join(", "), l.kernel);
    }
    out
}

#[cfg(test)]
mod dtype_tests {
    use super::{bf16_bits, WeightsDtype};

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2⁻⁸ is halfway between two bfloat16s: ties go to the even one (1.0); just above rounds up.
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3f81);
        // 1 + 3·2⁻⁸ is halfway too, and its even neighbour is above.
        assert_eq!(bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(bf16_bits(-2.5), 0xc020);
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(bf16_bits(f32::MAX), 0x7f80, "rounds up to infinity, as IEEE does");
        assert!(WeightsDtype::Bf16.round(f32::NAN).is_nan());
        assert_eq!(WeightsDtype::Bf16.round(0.1), f32::from_bits(0x3dcd_0000));
        assert_eq!(WeightsDtype::F32.round(0.1), 0.1);
    }
}
