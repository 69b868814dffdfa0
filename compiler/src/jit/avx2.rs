//! The AVX2 microkernel tier: the strided GEMM tile of [`super::avx512`] for CPUs with AVX2 and FMA
//! but not AVX-512 (Zen 1–3, Haswell to Alder Lake), assembled with `iced-x86` because Cranelift's
//! x64 backend lowers vectors of at most 128 bits (half of what these CPUs' FMA units take).
//!
//! The tile computes, for r < rows and j < cols (rows ≤ 6, cols ≤ 16):
//!   C[r·ldc + j] = act(init[r][j] + Σ_{k < depth} A[k·6 + r] · B[k·ldb + j])
//! where init is the bias (`accumulate` off) or C itself (on), with one `vfmadd231ps` per k in order:
//! the roundings of every other tier, so all tiers give the same bytes. 12 ymm accumulators (6 rows ×
//! 2 vectors of 8 columns), 2 B vectors, 1 broadcast and 1 lane mask fill the 16 ymm registers.
//!
//! AVX2 has no opmask registers: the columns of the last vector past `cols` are masked with
//! `vmaskmovps` (masked-off lanes never fault), whose mask comes from a table in the code. A call
//! with every column present (`cols` = 16, or 8 for the narrow variant) takes a copy of the code with
//! plain loads and stores instead, so full tiles never pay for masking.
//!
//! ABI (System V), as the AVX-512 strided tile: `extern "C" fn(a, b, c, depth, ldb, bias, rows, cols,
//! ldc, add)`; the last four arrive on the stack, and a non-null `add` is a residual laid out as C,
//! added before ReLU. Only caller-saved registers are used, and `vzeroupper`
//! precedes `ret`. The `narrow` variant (6 × 8, 6 accumulators) is for calls of at most 8 columns, and
//! [`column_tile`] for a GEMM's last 1–4 columns over several row blocks at once.

use crate::target::Tier;
use iced_x86::code_asm::*;

const MR: usize = Tier::Avx2.mr();
const _: () = assert!(Tier::Avx2.nr() == 16);
/// How many k steps ahead the tile prefetches B and A (as the AVX-512 tile; see there).
const PREFETCH: usize = 32;
const ACC: [AsmRegisterYmm; 12] = [ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11];
const BS: [AsmRegisterYmm; 2] = [ymm12, ymm13];
const BCAST: AsmRegisterYmm = ymm14;
/// Lanes of the last vector that are columns of the call (all ones for a full tile).
const MASK: AsmRegisterYmm = ymm15;

/// Machine code of the tile: accumulating onto C or starting from the bias, with ReLU applied before
/// the store or not, over two vectors of columns or (`narrow`) only the first. Position independent.
pub fn tile(accumulate: bool, relu: bool, narrow: bool) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let vectors = if narrow { 1 } else { 2 };
    let mut table = a.create_label();
    // The mask of the last vector: 8 lanes from `table` + 4·(8·vectors − cols) bytes.
    a.mov(rax, qword_ptr(rsp + 16))?;
    a.mov(r10d, (8 * vectors) as i32)?;
    a.sub(r10, rax)?;
    a.lea(rax, ptr(table))?;
    a.vmovups(MASK, ymmword_ptr(rax + r10 * 4))?;
    a.mov(r11, qword_ptr(rsp + 24))?;
    a.shl(r11, 2)?; // ldc in bytes
    a.shl(r8, 2)?; // ldb in bytes
    let mut masked = a.create_label();
    a.test(r10, r10)?;
    a.jnz(masked)?;
    body(&mut a, accumulate, relu, vectors, false)?;
    a.set_label(&mut masked)?;
    body(&mut a, accumulate, relu, vectors, true)?;
    a.set_label(&mut table)?;
    a.dd(&[u32::MAX; 8])?;
    a.dd(&[0; 8])?;
    a.assemble(0)
}

/// The tile after its prologue (r8 = ldb and r11 = ldc in bytes, MASK loaded), ending in `ret`: the
/// last vector's B loads and C accesses go through MASK when `masked`.
fn body(a: &mut CodeAssembler, accumulate: bool, relu: bool, vectors: usize, masked: bool) -> Result<(), IcedError> {
    let acc = |r: usize, v: usize| ACC[2 * r + v];
    let last = vectors - 1;
    let load = |a: &mut CodeAssembler, dst: AsmRegisterYmm, at: AsmMemoryOperand, v: usize| -> Result<(), IcedError> {
        if masked && v == last {
            a.vmaskmovps(dst, MASK, at)
        } else {
            a.vmovups(dst, at)
        }
    };
    if accumulate {
        // Rows past `rows` start (and stay) at zero and are never stored.
        let mut loaded = a.create_label();
        a.mov(r10, qword_ptr(rsp + 8))?;
        a.mov(rax, rdx)?;
        for r in 0..MR {
            for v in 0..vectors {
                a.vxorps(acc(r, v), acc(r, v), acc(r, v))?;
            }
        }
        for r in 0..MR {
            a.cmp(r10, r as i32)?;
            a.jbe(loaded)?;
            for v in 0..vectors {
                load(a, acc(r, v), ymmword_ptr(rax + 32 * v as i32), v)?;
            }
            a.add(rax, r11)?;
        }
        a.set_label(&mut loaded)?;
    } else {
        for r in 0..MR {
            a.vbroadcastss(acc(r, 0), dword_ptr(r9 + 4 * r as i32))?;
            if vectors == 2 {
                a.vmovaps(acc(r, 1), acc(r, 0))?;
            }
        }
    }
    // The residual's lines are asked for now, to arrive during the k loop (as the AVX-512 tile does).
    let mut fetched = a.create_label();
    a.mov(r10, qword_ptr(rsp + 32))?;
    a.test(r10, r10)?;
    a.jz(fetched)?;
    for _ in 0..MR {
        a.prefetcht0(byte_ptr(r10))?;
        a.prefetcht0(byte_ptr(r10 + 32 * vectors as i32 - 4))?;
        a.add(r10, r11)?;
    }
    a.set_label(&mut fetched)?;
    let (mut step, mut store) = (a.create_label(), a.create_label());
    // B rows PREFETCH k steps ahead are asked for while this one is used (a streamed B: a linear
    // layer's weight panels, read once).
    a.imul_3(rax, r8, PREFETCH as i32)?;
    a.test(rcx, rcx)?;
    a.jz(store)?;
    a.set_label(&mut step)?;
    for (v, &b) in BS.iter().enumerate().take(vectors) {
        load(a, b, ymmword_ptr(rsi + 32 * v as i32), v)?;
    }
    a.prefetcht0(byte_ptr(rsi + rax))?;
    a.prefetcht0(byte_ptr(rdi + (4 * MR * PREFETCH) as i32))?;
    for r in 0..MR {
        a.vbroadcastss(BCAST, dword_ptr(rdi + 4 * r as i32))?;
        for (v, &b) in BS.iter().enumerate().take(vectors) {
            a.vfmadd231ps(acc(r, v), b, BCAST)?;
        }
    }
    a.add(rdi, (4 * MR) as i32)?;
    a.add(rsi, r8)?;
    a.dec(rcx)?;
    a.jnz(step)?;
    a.set_label(&mut store)?;
    if relu {
        a.vxorps(BS[0], BS[0], BS[0])?;
    }
    let mut done = a.create_label();
    a.mov(rax, qword_ptr(rsp + 8))?;
    a.mov(r10, qword_ptr(rsp + 32))?;
    for r in 0..MR {
        a.cmp(rax, r as i32)?;
        a.jbe(done)?;
        // The residual (when `add` ≠ 0) before ReLU, as the unfused add would: the same roundings.
        let mut added = a.create_label();
        a.test(r10, r10)?;
        a.jz(added)?;
        for v in 0..vectors {
            load(a, BS[1], ymmword_ptr(r10 + 32 * v as i32), v)?;
            a.vaddps(acc(r, v), acc(r, v), BS[1])?;
        }
        a.add(r10, r11)?;
        a.set_label(&mut added)?;
        for v in 0..vectors {
            if relu {
                // max(0, x) returns its second operand when either is NaN: NaN stays NaN, as in the
                // portable tier.
                a.vmaxps(acc(r, v), BS[0], acc(r, v))?;
            }
            let at = ymmword_ptr(rdx + 32 * v as i32);
            if masked && v == last {
                a.vmaskmovps(at, MASK, acc(r, v))?;
            } else {
                a.vmovups(at, acc(r, v))?;
            }
        }
        a.add(rdx, r11)?;
    }
    a.set_label(&mut done)?;
    a.vzeroupper()?;
    a.ret()
}

/// The column tile: the last 1–4 columns of a GEMM whose column count is not a multiple of 16 (ResNet's
/// 7 × 7 maps: 49 = 3·16 + 1), for [`Tier::column_blocks`] full MR-row blocks at once, `a_pitch`
/// elements of A apart. The 6 × 16 tile would spend a whole call of 6 broadcasts per k on one column;
/// here a vector holds a block's 6 rows of one column (A's rows per k are contiguous), so one k step is
/// one broadcast of B per column and one FMA per block and column:
///   C[r·ldc + j] = act(init[r][j] + Σ_{k < depth} A[(r / 6)·a_pitch + k·6 + r % 6] · B[k·ldb + j])
/// with one `vfmadd231ps` per k in order, as every tier rounds. C's rows are ldc apart, so the
/// accumulators go through the red zone below rsp (a leaf function's 128 bytes): 4 slots of 8 lanes.
/// A vector load of a block's 6 rows reads 2 floats more (the next k's); the last k step loads with a
/// 6-lane mask, so the call never reads past the last block.
///
/// ABI: the strided tile's (`a, b, c, depth, ldb, bias, rows, cols, ldc`), then `a_pitch` and `add` on the stack;
/// `rows` (= blocks·6) and `cols` are the ones the code was assembled for.
pub fn column_tile(accumulate: bool, relu: bool, cols: usize) -> Result<Vec<u8>, IcedError> {
    let blocks = Tier::Avx2.column_blocks(cols).expect("1 to 4 columns");
    let mut a = CodeAssembler::new(64)?;
    let acc = |b: usize, j: usize| ACC[b * cols + j];
    // Column j's slot in the red zone, and its lane r.
    let slot = |j: usize, r: usize| dword_ptr(rsp - (32 * (j + 1) - 4 * r) as i32);
    let (bc, mask, t) = (ymm8, ymm9, ymm10);
    let at = |b: usize| -> AsmRegisterYmm { [ymm11, ymm12, ymm13, ymm14][b] };
    // Block b of A: rdi + b·pitch, with rax = rdi + 3·pitch and r11 = rdi + 6·pitch.
    let a_at = |b: usize| match b {
        0 => ymmword_ptr(rdi),
        1 => ymmword_ptr(rdi + r10),
        2 => ymmword_ptr(rdi + r10 * 2),
        3 => ymmword_ptr(rax),
        4 => ymmword_ptr(rax + r10),
        5 => ymmword_ptr(rax + r10 * 2),
        6 => ymmword_ptr(r11),
        _ => ymmword_ptr(r11 + r10),
    };
    let mut table = a.create_label();
    a.lea(r10, ptr(table))?;
    a.vmovups(mask, ymmword_ptr(r10))?;
    a.mov(r11, qword_ptr(rsp + 24))?;
    // ldc in bytes.
    a.shl(r11, 2)?;
    // Every block's rows of a C-shaped matrix at rax (rows r11 bytes apart) into the accumulators,
    // through the red zone: loaded, or (`add`) added.
    let gather = |a: &mut CodeAssembler, add: bool| -> Result<(), IcedError> {
        for b in 0..blocks {
            for r in 0..MR {
                for j in 0..cols {
                    a.mov(r10d, dword_ptr(rax + 4 * j as i32))?;
                    a.mov(slot(j, r), r10d)?;
                }
                a.add(rax, r11)?;
            }
            for j in 0..cols {
                let at = ymmword_ptr(rsp - 32 * (j + 1) as i32);
                match add {
                    true => a.vaddps(acc(b, j), acc(b, j), at)?,
                    false => a.vmovups(acc(b, j), at)?,
                }
            }
        }
        Ok(())
    };
    if accumulate {
        a.mov(rax, rdx)?;
        gather(&mut a, false)?;
    } else {
        for b in 0..blocks {
            a.vmaskmovps(acc(b, 0), mask, ymmword_ptr(r9 + 4 * (MR * b) as i32))?;
            for j in 1..cols {
                a.vmovaps(acc(b, j), acc(b, 0))?;
            }
        }
    }
    a.shl(r8, 2)?; // ldb in bytes
    a.mov(r10, qword_ptr(rsp + 32))?;
    a.shl(r10, 2)?; // a_pitch in bytes
    a.lea(rax, ptr(rdi + r10 * 2))?;
    a.add(rax, r10)?;
    a.lea(r11, ptr(rax + r10 * 2))?;
    a.add(r11, r10)?;
    // One k step; `masked`: the last, whose A loads take the 6-lane mask.
    let step = |a: &mut CodeAssembler, masked: bool| -> Result<(), IcedError> {
        if cols == 1 {
            a.vbroadcastss(bc, dword_ptr(rsi))?;
            for b in 0..blocks {
                if masked {
                    a.vmaskmovps(t, mask, a_at(b))?;
                    a.vfmadd231ps(acc(b, 0), bc, t)?;
                } else {
                    a.vfmadd231ps(acc(b, 0), bc, a_at(b))?;
                }
            }
            return Ok(());
        }
        for b in 0..blocks {
            match masked {
                true => a.vmaskmovps(at(b), mask, a_at(b))?,
                false => a.vmovups(at(b), a_at(b))?,
            }
        }
        for j in 0..cols {
            a.vbroadcastss(bc, dword_ptr(rsi + 4 * j as i32))?;
            for b in 0..blocks {
                a.vfmadd231ps(acc(b, j), bc, at(b))?;
            }
        }
        Ok(())
    };
    let (mut next, mut last, mut store) = (a.create_label(), a.create_label(), a.create_label());
    a.test(rcx, rcx)?;
    a.jz(store)?;
    a.dec(rcx)?;
    a.jz(last)?;
    a.set_label(&mut next)?;
    step(&mut a, false)?;
    for base in [rdi, rax, r11] {
        a.add(base, (4 * MR) as i32)?;
    }
    a.add(rsi, r8)?;
    a.dec(rcx)?;
    a.jnz(next)?;
    a.set_label(&mut last)?;
    step(&mut a, true)?;
    a.set_label(&mut store)?;
    // r11 held A's last blocks in the loop: ldc in bytes again, for the residual and the store.
    a.mov(r11, qword_ptr(rsp + 24))?;
    a.shl(r11, 2)?;
    // The residual (when `add` ≠ 0), gathered through the red zone as C is for `accumulate`.
    let mut added = a.create_label();
    a.mov(rax, qword_ptr(rsp + 40))?;
    a.test(rax, rax)?;
    a.jz(added)?;
    gather(&mut a, true)?;
    a.set_label(&mut added)?;
    if relu {
        // max(0, x) returns its second operand when either is NaN, as the strided tile.
        a.vxorps(bc, bc, bc)?;
        for &r in &ACC[..blocks * cols] {
            a.vmaxps(r, bc, r)?;
        }
    }
    a.mov(rax, rdx)?;
    for b in 0..blocks {
        for j in 0..cols {
            a.vmovups(ymmword_ptr(rsp - 32 * (j + 1) as i32), acc(b, j))?;
        }
        for r in 0..MR {
            for j in 0..cols {
                a.mov(r10d, slot(j, r))?;
                a.mov(dword_ptr(rax + 4 * j as i32), r10d)?;
            }
            a.add(rax, r11)?;
        }
    }
    a.vzeroupper()?;
    a.ret()?;
    a.set_label(&mut table)?;
    a.dd(&[u32::MAX; MR])?;
    a.dd(&[0; 8 - MR])?;
    a.assemble(0)
}
