//! The AVX-512 microkernel tier: a GEMM tile assembled with `iced-x86`, for the one place Cranelift
//! cannot go (its x64 backend lowers vectors of at most 128 bits, and ties every FMA's destination to a
//! multiplicand, which costs a register copy per FMA).
//!
//! The tile computes, for r < rows and j < cols (rows ≤ 12, cols ≤ 32):
//!   C[r·ldc + j] = act(init[r][j] + Σ_{k < depth} A[k·12 + r] · B[k·ldb + j])
//! where init is the bias (`accumulate` off) or C itself (on: a later slice of k, see the lowering),
//! with one `vfmadd231ps` per k in order — the same roundings as the portable tier, so every tier gives
//! the same bytes. 24 zmm accumulators (12 rows × 2 vectors of 16 columns) stay in registers. Columns past `cols` are masked with k1/k2 on
//! every load and store (masked-off lanes never fault), so the tile never touches memory outside the
//! rows and columns it owns.
//!
//! The epilogue adds a residual first when `add` is not null: `act(… + R[r·ldc + j])`, R laid out as C
//! (a residual add fused into the convolution that produces its other operand).
//!
//! ABI (System V): `extern "C" fn(a, b, c, depth, ldb, bias, rows, cols, ldc, add)`; the last four
//! arrive on the stack. Only caller-saved registers are used, and `vzeroupper` precedes `ret`.
//!
//! Each comes in a one-vector variant too (`narrow`: 12 × 16, 12 accumulators), which the JIT calls for
//! at most 16 columns (linear layers at batch ≤ 16 as GEMMs, a plane's last column tile): the same
//! sums, half the FMAs.
//!
//! The implicit-convolution variant ([`Taps`], one per geometry, whose tap columns it takes as
//! immediates) reads B in place from the convolution's input instead:
//! `fn(a, b, c, taps, offsets, bias, rows, cols, ldc, masks, add)`, where `b` points at output pixel `col`'s
//! element of its group's input (less the padding), `taps` = depth / kw tap rows, `offsets` at the
//! slice's first tap-row offset (i32) and `masks` at the kw u32 lane masks of this column tile: each
//! tap is one pair of zero-masked loads at its row's offset plus its column's immediate. Tap columns
//! that read no padding take the call's column masks; the others' masks depend only on the column's
//! shift, and are loaded into k3–k6 once per call (see [`tap_masks`]).

use crate::kernel::Taps;
use crate::target::Tier;
use iced_x86::code_asm::*;

/// Tile rows: 12 rows × 2 vectors = 24 accumulators + 2 column vectors + 4 broadcasts = 30 of the 32 zmm.
const MR: usize = Tier::Avx512.mr();
/// How many k steps ahead the strided tile prefetches B: about 32 × 12 cycles of FMAs, a memory
/// latency and more.
const PREFETCH: usize = 32;
/// How many k steps ahead the strided tile prefetches A (48 bytes a step): Winograd's GEMMs at batch 1
/// stream A (the transformed weights, megabytes a layer) once, for at most 32 columns, and gain; 16, 32
/// and 64 steps do alike. It costs a little where A is in L2 already (measured: docs/benchmarks.md).
const PREFETCH_A: usize = 32;
/// Tile columns: two zmm vectors of 16 floats.
const _: () = assert!(Tier::Avx512.nr() == 32);

const BCAST: [AsmRegisterZmm; 4] = [zmm26, zmm27, zmm28, zmm29];
const ACC: [AsmRegisterZmm; 24] = [
    zmm0, zmm1, zmm2, zmm3, zmm4, zmm5, zmm6, zmm7, zmm8, zmm9, zmm10, zmm11, zmm12, zmm13, zmm14, zmm15, zmm16, zmm17, zmm18, zmm19, zmm20, zmm21, zmm22,
    zmm23,
];

/// Opmask registers k1–k7 (k0 cannot mask).
const K: [AsmRegisterK; 8] = [k0, k1, k2, k3, k4, k5, k6, k7];

/// `reg` under opmask register k`k` (1–7).
fn masked(reg: AsmRegisterZmm, k: usize) -> AsmRegisterZmm {
    [reg.k1(), reg.k2(), reg.k3(), reg.k4(), reg.k5(), reg.k6(), reg.k7()][k - 1]
}

/// Which opmask a tap column's loads take, vector v using register `k + v`.
#[derive(Clone, Copy)]
enum TapMask {
    /// The call's column masks k1, k2: the tap column reads no padding ([`Taps::unmasked`]).
    Columns,
    /// Masks loaded once per call from the tap column `kx`'s table entry (the first of its shift).
    Held { k: usize, kx: usize },
    /// Loaded into k7 before each use: more shifts than registers (5×5 kernels in the wide tile).
    Reloaded,
}

/// The opmask of each tap column of `t`, for a tile of `vectors` column vectors. k3–k6 hold masks for
/// the whole call; k7 is left for reloads, which are slower than held masks (two `kmovw` loads per 24
/// FMAs; measured: docs/benchmarks.md).
fn tap_masks(t: &Taps, vectors: usize) -> Vec<TapMask> {
    let mut held: Vec<(i64, TapMask)> = vec![];
    let mut next = 3;
    (0..t.kw)
        .map(|kx| {
            if t.unmasked(kx) {
                return TapMask::Columns;
            }
            let d = t.shift(kx);
            if let Some(&(_, m)) = held.iter().find(|h| h.0 == d) {
                return m;
            }
            if next + vectors > 7 {
                return TapMask::Reloaded;
            }
            let m = TapMask::Held { k: next, kx };
            next += vectors;
            held.push((d, m));
            m
        })
        .collect()
}

/// Machine code of the tile: accumulating onto C or starting from the bias, with ReLU applied before
/// the store or not, B strided or (`taps`) read in place, over two vectors of columns or (`narrow`)
/// only the first, for calls with at most 16 columns, over the first `height` of A's MR rows (calls of
/// at most `height` rows: the rows past it would be FMAs whose sums are never stored). Position
/// independent.
pub fn tile(accumulate: bool, relu: bool, taps: Option<&Taps>, narrow: bool, height: usize) -> Result<Vec<u8>, IcedError> {
    assert!(height <= MR);
    let mut a = CodeAssembler::new(64)?;
    let acc = |r: usize, v: usize| ACC[2 * r + v];
    // The column vectors this variant computes, and their accumulators.
    let vectors = if narrow { 1 } else { 2 };
    let accs: Vec<_> = (0..height).flat_map(|r| (0..vectors).map(move |v| acc(r, v))).collect();
    // B vectors; vector v is masked by k(1 + v) for the columns, by k(3 + v) for taps.
    let bs = [zmm24, zmm25];
    // Column masks: the low `cols` bits of 32, split into one 16-lane mask per vector.
    a.mov(rax, qword_ptr(rsp + 16))?;
    a.mov(r10d, -1i32)?;
    a.bzhi(r10d, r10d, eax)?;
    a.kmovw(k1, r10d)?;
    a.shr(r10d, 16)?;
    a.kmovw(k2, r10d)?;
    a.mov(r11, qword_ptr(rsp + 24))?;
    a.shl(r11, 2)?; // ldc in bytes
    if taps.is_none() {
        a.shl(r8, 2)?; // ldb in bytes
    }
    if accumulate {
        // Rows past `rows` start (and stay) at zero and are never stored.
        let mut loaded = a.create_label();
        a.mov(r10, qword_ptr(rsp + 8))?;
        a.mov(rax, rdx)?;
        for &reg in &accs {
            a.vpxord(reg, reg, reg)?;
        }
        for r in 0..height {
            a.cmp(r10, r as i32)?;
            a.jbe(loaded)?;
            for v in 0..vectors {
                a.vmovups(masked(acc(r, v), 1 + v).z(), zmmword_ptr(rax + 64 * v as i32))?;
            }
            a.add(rax, r11)?;
        }
        a.set_label(&mut loaded)?;
    } else {
        for r in 0..height {
            a.vbroadcastss(acc(r, 0), dword_ptr(r9 + 4 * r as i32))?;
            if !narrow {
                a.vmovaps(acc(r, 1), acc(r, 0))?;
            }
        }
    }
    // The residual's lines are asked for now, to arrive during the k loop: the epilogue's loads of 12
    // rows ldc apart are a pattern no hardware prefetcher follows (at batch 8, ResNet-50's residual
    // layers spent more waiting for them than the add used to take as a pass of its own).
    let add = rsp + if taps.is_some() { 40 } else { 32 };
    let mut fetched = a.create_label();
    a.mov(r10, qword_ptr(add))?;
    a.test(r10, r10)?;
    a.jz(fetched)?;
    let lines: &[i32] = if narrow { &[0, 60] } else { &[0, 64, 124] };
    for _ in 0..height {
        for &at in lines {
            a.prefetcht0(byte_ptr(r10 + at))?;
        }
        a.add(r10, r11)?;
    }
    a.set_label(&mut fetched)?;
    let mut body = a.create_label();
    let mut store = a.create_label();
    let masks = taps.map(|t| tap_masks(t, vectors)).unwrap_or_default();
    match taps {
        Some(_) => {
            a.mov(r10, qword_ptr(rsp + 32))?;
            for m in &masks {
                if let TapMask::Held { k, kx } = *m {
                    for v in 0..vectors {
                        a.kmovw(K[k + v], word_ptr(r10 + 4 * kx as i32 + 2 * v as i32))?;
                    }
                }
            }
        }
        // B rows PREFETCH k steps ahead are asked for while this one is used: a streamed B (a linear
        // layer's weight panels, read once) is latency-bound without (measured: docs/benchmarks.md).
        None => a.imul_3(rax, r8, PREFETCH as i32)?,
    }
    a.test(rcx, rcx)?;
    a.jz(store)?;
    a.set_label(&mut body)?;
    // Each A element is broadcast once into one of four rotating registers and feeds both vectors:
    // 14 loads per 24 FMAs. (An embedded-broadcast operand per FMA needs 26 loads per 24 FMAs and is
    // load-port bound: docs/benchmarks.md.)
    let fmas = |a: &mut CodeAssembler, k: usize| -> Result<(), IcedError> {
        for r in 0..height {
            let bc = BCAST[r % BCAST.len()];
            a.vbroadcastss(bc, dword_ptr(rdi + 4 * (r + MR * k) as i32))?;
            for (v, &b) in bs.iter().enumerate().take(vectors) {
                a.vfmadd231ps(acc(r, v), b, bc)?;
            }
        }
        Ok(())
    };
    match taps {
        None => {
            for (v, &b) in bs.iter().enumerate().take(vectors) {
                a.vmovups(masked(b, 1 + v).z(), zmmword_ptr(rsi + 64 * v as i32))?;
                a.prefetcht0(byte_ptr(rsi + rax + 64 * v as i32))?;
            }
            a.prefetcht0(byte_ptr(rdi + (4 * MR * PREFETCH_A) as i32))?;
            fmas(&mut a, 0)?;
            a.add(rdi, (4 * MR) as i32)?;
            a.add(rsi, r8)?;
        }
        Some(t) => {
            // This tap row's start: b + offsets[row].
            a.movsxd(rax, dword_ptr(r8))?;
            a.lea(rax, qword_ptr(rsi + rax * 4))?;
            for (kx, &m) in masks.iter().enumerate() {
                let at = 4 * t.column(kx as i64) as i32;
                for (v, &b) in bs.iter().enumerate().take(vectors) {
                    let k = match m {
                        TapMask::Columns => 1 + v,
                        TapMask::Held { k, .. } => k + v,
                        TapMask::Reloaded => {
                            a.kmovw(k7, word_ptr(r10 + 4 * kx as i32 + 2 * v as i32))?;
                            7
                        }
                    };
                    a.vmovups(masked(b, k).z(), zmmword_ptr(rax + at + 64 * v as i32))?;
                }
                fmas(&mut a, kx)?;
            }
            a.add(rdi, (4 * MR * t.kw) as i32)?;
            a.add(r8, 4)?;
        }
    }
    a.dec(rcx)?;
    a.jnz(body)?;
    a.set_label(&mut store)?;
    if relu {
        a.vpxord(zmm31, zmm31, zmm31)?;
    }
    let mut done = a.create_label();
    a.mov(rax, qword_ptr(rsp + 8))?;
    a.mov(r10, qword_ptr(add))?;
    for r in 0..height {
        a.cmp(rax, r as i32)?;
        a.jbe(done)?;
        // The residual (when `add` ≠ 0) before ReLU, as the unfused add would: the same roundings.
        let mut added = a.create_label();
        a.test(r10, r10)?;
        a.jz(added)?;
        for v in 0..vectors {
            a.vaddps(masked(acc(r, v), 1 + v), acc(r, v), zmmword_ptr(r10 + 64 * v as i32))?;
        }
        a.add(r10, r11)?;
        a.set_label(&mut added)?;
        for v in 0..vectors {
            if relu {
                // max(0, x): NaN stays NaN, as in the portable tier.
                a.vmaxps(acc(r, v), zmm31, acc(r, v))?;
            }
            let at = zmmword_ptr(rdx + 64 * v as i32);
            a.vmovups(if v == 0 { at.k1() } else { at.k2() }, acc(r, v))?;
        }
        a.add(rdx, r11)?;
    }
    a.set_label(&mut done)?;
    a.vzeroupper()?;
    a.ret()?;
    a.assemble(0)
}
