//! The CPU the kernels are built for: which GEMM microkernel ([`Tier`]) runs them, its tile shape,
//! and whether this machine can run it. The kernel IR and the JIT both ask here, not each other.
//! Invariant left: a [`Tier`]'s tile shape is the one its microkernel computes (the IR's portable tile
//! and the JIT's assembled tiles read MR and NR from [`Tier::mr`] and [`Tier::nr`], nowhere else).

/// The GEMM microkernel a program is lowered for; it fixes the tile shape and the weight packing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Cranelift f32x4 code, expanded in the kernel IR: 4 × 12 tiles (3 vectors of 4 lanes per row, 12
    /// xmm accumulators).
    Portable,
    /// `Stmt::Gemm` calls to a JIT-assembled AVX2 + FMA tile: 6 × 16 (2 ymm vectors per row, 12 ymm
    /// accumulators).
    Avx2,
    /// `Stmt::Gemm` calls to a JIT-assembled AVX-512 tile: 12 × 32 (2 zmm vectors per row, 24 zmm
    /// accumulators), which can also read a convolution's input in place (`BRows::Taps`).
    Avx512,
}

impl Tier {
    /// Every tier, slowest first.
    pub const ALL: [Tier; 3] = [Tier::Portable, Tier::Avx2, Tier::Avx512];
    /// Tile rows (MR): output channels, or samples for linear layers at batch > 1.
    pub const fn mr(self) -> usize {
        match self {
            Tier::Portable => 4,
            Tier::Avx2 => 6,
            Tier::Avx512 => 12,
        }
    }
    /// Shorter tiles than MR rows, tallest first, for a channel block's last rows (64 channels = 5·12 + 4
    /// would pay for 72): the AVX-512 tile's 8- and 4-row variants.
    pub const fn short_rows(self) -> &'static [usize] {
        match self {
            Tier::Avx512 => &[8, 4],
            Tier::Portable | Tier::Avx2 => &[],
        }
    }
    /// How many MR-row blocks AVX2's column tile covers for the last `cols` (1–4) columns of a GEMM
    /// (see `jit::avx2::column_tile`): 8 accumulators in all; `None` where it does not apply.
    pub fn column_blocks(self, cols: usize) -> Option<usize> {
        (self == Tier::Avx2 && (1..=4).contains(&cols)).then(|| [8, 4, 2, 2][cols - 1])
    }
    /// Tile columns (NR): output pixels, or output features for linear layers at batch > 1.
    pub const fn nr(self) -> usize {
        match self {
            Tier::Portable => 12,
            Tier::Avx2 => 16,
            Tier::Avx512 => 32,
        }
    }
    /// The column granularity of the tile's cost, as the Winograd cost model counts it: a GEMM of n
    /// columns costs ⌈n / unit⌉ units. The AVX2 tile's width, and the portable tier's too, so that both
    /// tiers of an AVX2 machine choose alike; for AVX-512 its full width (its one-vector variant did not
    /// make AlexNet's 16-column F(4×4, 3×3) GEMMs at batch 1 cheaper than 25-column F(3×3, 3×3) ones:
    /// docs/benchmarks.md).
    pub const fn cost_columns(self) -> usize {
        match self {
            Tier::Portable | Tier::Avx2 => 16,
            Tier::Avx512 => 32,
        }
    }
    /// Whether GEMMs are `Stmt::Gemm` calls to an assembled tile (else expanded in the IR).
    pub const fn assembled(self) -> bool {
        !matches!(self, Tier::Portable)
    }
    /// Whether this CPU (and OS) runs the tier.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        let has = |f: &[bool]| f.iter().all(|&x| x);
        #[cfg(target_arch = "x86_64")]
        return match self {
            Tier::Portable => true,
            Tier::Avx2 => has(&[std::is_x86_feature_detected!("avx2"), std::is_x86_feature_detected!("fma")]),
            // BMI2 for the column mask.
            Tier::Avx512 => has(&[std::is_x86_feature_detected!("avx512f"), std::is_x86_feature_detected!("bmi2")]),
        };
        #[cfg(not(target_arch = "x86_64"))]
        matches!(self, Tier::Portable)
    }
    /// The fastest tier this machine runs.
    pub fn best() -> Tier {
        Tier::ALL.into_iter().rfind(|t| t.available()).unwrap_or(Tier::Portable)
    }
}
