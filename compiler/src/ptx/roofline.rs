//! What a launch can at best do on a GPU: the resident blocks its registers and shared memory allow
//! ([`blocks_per_sm`]), and its roofline time on an H200 ([`Roofline`]). [`table`] puts both beside
//! `ptxas -v`'s resources for every launch of a program (docs/ptx-resources.md is made with it).
//! Invariant left: estimates are lower bounds from counts, not measurements.

use super::ptxas::Resources;
use super::{entry_name, launch_config};
use crate::kernel::{Program, Slot};
use std::fmt::Write as _;

/// An H200 SXM: 132 multiprocessors, 67 TFLOP/s of FP32 FMA (no tensor cores), 4.8 TB/s of HBM3e.
pub const H200: Roofline = Roofline { name: "H200", flops: 67e12, bytes: 4.8e12 };

/// A GPU's peak FP32 rate and memory bandwidth.
#[derive(Clone, Copy, Debug)]
pub struct Roofline {
    pub name: &'static str,
    /// FLOP/s.
    pub flops: f64,
    /// Bytes/s.
    pub bytes: f64,
}

impl Roofline {
    /// The time a launch of `flops` moving `bytes` needs at best, and whether memory bounds it.
    pub fn time(&self, flops: u64, bytes: u64) -> (f64, bool) {
        let (c, m) = (flops as f64 / self.flops, bytes as f64 / self.bytes);
        (c.max(m), m >= c)
    }
}

/// Blocks of `threads` threads using `registers` per thread and `shared` bytes per block that one sm_90
/// multiprocessor holds at once: at most 32 blocks and 2048 threads; 65,536 registers, allocated per
/// warp in units of 256; 228 KiB of shared memory, of which each block also reserves 1 KiB.
pub fn blocks_per_sm(threads: u32, registers: u32, shared: u32) -> u32 {
    let warps = threads.div_ceil(32);
    let per_warp = (registers.max(1) * 32).div_ceil(256) * 256;
    let by_regs = 65_536 / (per_warp * warps);
    let by_shared = if shared == 0 { u32::MAX } else { (228 << 10) / (shared + 1024) };
    [32, 2048 / threads.max(1), by_regs, by_shared].into_iter().min().unwrap_or(0)
}

/// Bytes a launch must move at least: every buffer it is passed, once.
pub fn bytes(program: &Program, launch: usize) -> u64 {
    let len = |s: &Slot| match *s {
        Slot::Arena { len, .. } => len,
        Slot::Param(p) => program.params[p].len(),
    };
    program.launches[launch].slots.iter().map(|s| 4 * len(s) as u64).sum()
}

/// A markdown table of every launch: grid, `ptxas -v` resources (`res`, by entry name), occupancy
/// on sm_90, FLOPs, bytes and `gpu`'s roofline time; then the sum of those times.
pub fn table(program: &Program, res: &[Resources], gpu: Roofline) -> String {
    let mut out = format!(
        "| launch | grid × block | regs | smem B | spill B | blocks/SM | occupancy | MFLOP | MB | {} µs | bound |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        gpu.name
    );
    let mut total = 0.0;
    for (i, l) in program.launches.iter().enumerate() {
        let name = entry_name(i, &l.kernel);
        let r = res.iter().find(|r| r.entry == name).cloned().unwrap_or_default();
        let (grid, block) = launch_config(&l.kernel);
        let resident = blocks_per_sm(block, r.registers, r.shared);
        let occupancy = 100 * resident * block.div_ceil(32) / 64;
        let b = bytes(program, i);
        let (t, memory) = gpu.time(l.flops, b);
        total += t;
        let _ = writeln!(
            out,
            "| `{}` | {grid} × {block} | {} | {} | {} | {resident} | {occupancy} % | {:.1} | {:.2} | {:.1} | {} |",
            l.kernel.name,
            r.registers,
            r.shared,
            r.spill_stores + r.spill_loads,
            l.flops as f64 / 1e6,
            b as f64 / 1e6,
            t * 1e6,
            if memory { "memory" } else { "compute" }
        );
    }
    let flops: u64 = program.launches.iter().map(|l| l.flops).sum();
    let _ =
        writeln!(out, "\n{} launches, {:.2} GFLOP; roofline sum on the {}: **{:.1} µs**.", program.launches.len(), flops as f64 / 1e9, gpu.name, total * 1e6);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupancy_follows_the_sm_90_limits() {
        // 256 threads at 80 registers: 20,480 registers a block, three blocks (61,440 of 65,536).
        assert_eq!(blocks_per_sm(256, 80, 8192), 3);
        // 128 threads, few registers, no shared memory: 2048 threads' worth.
        assert_eq!(blocks_per_sm(128, 32, 0), 16);
        // Shared memory bounds: 100 KiB blocks, two fit in 228 KiB.
        assert_eq!(blocks_per_sm(64, 16, 100 << 10), 2);
        // 255 registers round up to 8192 a warp: a 256-thread block needs all 65,536.
        assert_eq!(blocks_per_sm(256, 255, 0), 1);
        assert_eq!(H200.time(67_000_000, 0), (1e-6, false));
    }
}
