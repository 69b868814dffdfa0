//! The CPU the kernels are built for: which GEMM microkernel ([`Tier`]) runs them, its tile shape,
//! and whether this machine can run it. The kernel IR and the JIT both ask here, not each other.
//! Invariant left: a [`Tier`]'s tile shape is the one its microkernel computes (the IR's portable tile
//! and the JIT's AVX-512 tile read MR and NR from [`Tier::mr`] and [`Tier::nr`], nowhere else).

/// The GEMM microkernel a program is lowered for; it fixes the tile shape and the weight packing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Cranelift f32x4 code, expanded in the kernel IR: 4 × 12 tiles (3 vectors of 4 lanes per row, 12
    /// xmm accumulators).
    Portable,
    /// `Stmt::Gemm` calls to a JIT-assembled AVX-512 tile: 12 × 32 (2 zmm vectors per row, 24 zmm
    /// accumulators).
    Avx512,
}

impl Tier {
    /// Tile rows (MR): output channels, or samples for linear layers at batch > 1.
    pub const fn mr(self) -> usize {
        match self {
            Tier::Portable => 4,
            Tier::Avx512 => 12,
        }
    }
    /// Tile columns (NR): output pixels, or output features for linear layers at batch > 1.
    pub const fn nr(self) -> usize {
        match self {
            Tier::Portable => 12,
            Tier::Avx512 => 32,
        }
    }
    /// The fastest tier this machine runs.
    pub fn best() -> Tier {
        if avx512_available() {
            Tier::Avx512
        } else {
            Tier::Portable
        }
    }
}

/// Whether this CPU (and OS) can run the AVX-512 tier: AVX-512F, plus BMI2 for the column mask.
pub fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("bmi2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}
