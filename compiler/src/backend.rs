//! One interface to the three ways a model runs: the JIT (Cranelift kernels on CPU threads), the reference
//! interpreter (the oracle) and CUDA (the PTX on an NVIDIA GPU). The CLI's `run` and `bench` build a
//! [`Runner`] from a graph with bound weights and call it; nothing else dispatches on the backend.
//! Invariant left: a [`Runner`] was built only from [`Options`] that go together ([`Options::check`]), and
//! computes the graph's function whatever its backend, tier or thread count.

use crate::ir::Graph;
use crate::kernel::{Lowering, WeightsDtype, Winograd};
use crate::ptx::cuda::{CudaError, CudaExecutable};
use crate::target::Tier;
use crate::weights::Bound;
use cnnc_runtime::{Plan, Tensor};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Cranelift-compiled vector kernels over a planned arena.
    Jit,
    /// The reference interpreter: naive loops, single-threaded.
    Reference,
    /// The PTX backend on an NVIDIA GPU (device 0) through the CUDA driver.
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TierChoice {
    Auto,
    /// Cranelift f32x4 code (every CPU Cranelift targets).
    Portable,
    /// A JIT-assembled AVX2 + FMA tile (x86-64 with AVX2 and FMA).
    Avx2,
    /// A JIT-assembled AVX-512 tile (x86-64 with AVX-512F).
    Avx512,
}

impl TierChoice {
    pub fn get(self) -> Tier {
        match self {
            TierChoice::Auto => Tier::best(),
            TierChoice::Portable => Tier::Portable,
            TierChoice::Avx2 => Tier::Avx2,
            TierChoice::Avx512 => Tier::Avx512,
        }
    }
}

/// How a model runs (the CLI's execution flags).
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct Options {
    /// Which kernels run the model: the JIT-compiled ones, or the reference interpreter (slow, the oracle).
    #[arg(long, value_enum, default_value_t = Backend::Jit)]
    pub backend: Backend,
    /// GEMM microkernel: `auto` picks the fastest this CPU runs. Results are identical for every tier
    /// (`avx512` may take other Winograd algorithms than the others with `--winograd auto`: last bits).
    #[arg(long, value_enum, default_value_t = TierChoice::Auto)]
    pub tier: TierChoice,
    /// Worker threads (default: the available cores). Results are identical for any count.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// How linear layers keep their weights. `bf16` rounds them to bfloat16 at compile time and computes
    /// in f32: at batch 1 the weights stream in half the bytes, at a small cost in accuracy
    /// (`cnnc bench` reports it). Compiled backends only.
    #[arg(long, value_enum, default_value_t = WeightsDtype::F32)]
    pub weights_dtype: WeightsDtype,
    /// When stride-1 3×3 and 5×5 convolutions take Winograd's minimal filtering: `auto` where the
    /// cost model expects it to be faster (results then depend on the batch size, within 1e-4).
    #[arg(long, value_enum, default_value_t = Winograd::Auto)]
    pub winograd: Winograd,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("`--{flag} {value}` needs a compiled backend (jit or cuda): the reference interpreter {why}")]
    NeedsCompiled { flag: &'static str, value: String, why: &'static str },
    #[error("`--winograd {0}` needs the jit backend: the cuda backend computes every convolution as an implicit GEMM")]
    WinogradOnCuda(String),
    #[error("at batch {batch} the model needs {:.1} GiB ({:.1} GiB of activations, {:.1} GiB of parameters), more than cnnc's limit of {:.1} GiB (80 % of this machine's memory): lower the batch size", crate::weights::gib(.arena + .params), crate::weights::gib(*.arena), crate::weights::gib(*.params), crate::weights::gib(*.limit))]
    TooLarge { batch: usize, arena: u64, params: u64, limit: u64 },
    #[error(transparent)]
    Jit(#[from] crate::jit::JitError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error(transparent)]
    Plan(#[from] cnnc_runtime::plan::PlanError),
    #[error(transparent)]
    Run(#[from] cnnc_runtime::plan::RunError),
}

impl Options {
    /// Flags that do not go together, and a CUDA backend without a GPU: errors before any work is done.
    pub fn check(&self) -> Result<(), BackendError> {
        let value = |v: &dyn std::fmt::Debug| format!("{v:?}").to_lowercase();
        if self.backend == Backend::Reference && self.weights_dtype != WeightsDtype::F32 {
            return Err(BackendError::NeedsCompiled { flag: "weights-dtype", value: value(&self.weights_dtype), why: "computes with the f32 weights" });
        }
        if self.backend == Backend::Reference && self.winograd != Winograd::Auto {
            return Err(BackendError::NeedsCompiled { flag: "winograd", value: value(&self.winograd), why: "convolves directly" });
        }
        if self.backend == Backend::Cuda && self.winograd != Winograd::Auto {
            return Err(BackendError::WinogradOnCuda(value(&self.winograd)));
        }
        if self.backend == Backend::Cuda {
            crate::ptx::cuda::available()?;
        }
        Ok(())
    }

    pub fn threads(&self) -> usize {
        self.threads.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |t| t as usize)
    }

    /// The lowering of a compiled backend (CUDA's: GPU-shaped kernels, see [`Lowering::gpu`]).
    fn lowering(&self) -> Lowering {
        match self.backend {
            Backend::Cuda => Lowering { fc_weights: self.weights_dtype, ..Lowering::gpu() },
            _ => Lowering { fc_weights: self.weights_dtype, winograd: self.winograd, ..Lowering::new(self.tier.get()) },
        }
    }
}

/// Floating-point operations a replica must do per byte of weights it streams ([`replicas`]).
const REPLICA_FLOPS_PER_BYTE: u64 = 32;

/// Weights that stay in a core's L2 cache, which replicas re-read at no cost.
const CACHED_WEIGHTS: u64 = 1 << 20;

/// How many replicas of the program run a JIT batch of `g`: one per thread, each on its own share of
/// the samples, where the threads divide the batch and each share does enough work per byte of the
/// weights it reads (every replica streams all of them); else one, run by all threads together. A
/// replica never waits for another and keeps its activations in its own core's caches, where threads
/// sharing every launch meet at a barrier after each and read what the other wrote. The threshold sits
/// between AlexNet's shares of two samples (slower as replicas) and of four (faster); ResNet-50,
/// GoogLeNet and NIN pass it with one sample (docs/benchmarks.md).
fn replicas(g: &Graph, batch: usize, threads: usize) -> usize {
    let bytes: u64 = g.params().iter().map(|p| 4 * p.shape.iter().product::<usize>() as u64).sum();
    let share_flops = 2 * g.macs() * (batch / threads.max(1)) as u64;
    let pays = bytes <= CACHED_WEIGHTS || share_flops >= REPLICA_FLOPS_PER_BYTE * bytes;
    if threads > 1 && batch.is_multiple_of(threads) && batch >= threads && pays {
        threads
    } else {
        1
    }
}

enum Exe {
    Jit(crate::jit::Jitted),
    Reference(Plan),
    Cuda(CudaExecutable),
}

/// A model made runnable by one backend, for one batch size.
pub struct Runner {
    exe: Exe,
    threads: usize,
    /// Per launch: kernel name, floating-point operations, bytes of packed parameters it reads (empty for
    /// the reference interpreter, which has no kernels).
    pub kernels: Vec<(String, u64, u64)>,
    /// Lowering (parameter terms evaluated, weights packed, and for the JIT most code generation
    /// beside it), and what code generation took after lowering.
    pub lower_time: Duration,
    pub codegen_time: Duration,
}

impl Runner {
    pub fn new(g: &Graph, bound: Bound, batch: usize, o: &Options) -> Result<Runner, BackendError> {
        let t = Instant::now();
        if o.backend == Backend::Reference {
            let exe = Exe::Reference(crate::lower::lower(g, bound)?);
            return Ok(Runner { exe, threads: o.threads(), kernels: vec![], lower_time: t.elapsed(), codegen_time: Duration::ZERO });
        }
        let lowering = Lowering { replicas: if o.backend == Backend::Jit { replicas(g, batch, o.threads()) } else { 1 }, ..o.lowering() };
        // The JIT compiles kernels while lowering packs weights; CUDA loads the finished module.
        let (p, code) = match o.backend {
            Backend::Cuda => (crate::kernel::program_with(g, bound, batch, lowering), None),
            _ => {
                let (p, code) = crate::jit::compile_while(lowering.tier, crate::jit::Options::default(), |each| {
                    crate::kernel::program_each(g, bound, batch, lowering, each)
                })?;
                (p, Some(code))
            }
        };
        let (arena, params) = ((p.replicas * p.arena_len) as u64 * 4, p.params.iter().map(|v| v.len() as u64 * 4).sum());
        if let Some(limit) = crate::weights::memory_limit().filter(|&l| arena + params > l) {
            return Err(BackendError::TooLarge { batch, arena, params, limit });
        }
        let (lower_time, t, bytes) = (t.elapsed(), Instant::now(), p.param_bytes());
        let (exe, kernels) = match code {
            None => {
                let exe = CudaExecutable::new(&p, crate::ptx::DEFAULT_SM)?;
                let kernels = exe.kernels().zip(bytes).map(|((n, f), b)| (n.to_string(), f, b)).collect();
                (Exe::Cuda(exe), kernels)
            }
            Some(code) => {
                let jit = code.finish(&p)?;
                // A launch runs once per replica, on its share of the batch.
                let kernels = jit.exe.steps().iter().zip(bytes).map(|(s, b)| (s.name.clone(), s.flops * p.replicas as u64, b)).collect();
                (Exe::Jit(jit), kernels)
            }
        };
        Ok(Runner { exe, threads: o.threads(), kernels, lower_time, codegen_time: t.elapsed() })
    }

    pub fn run(&self, x: &Tensor) -> Result<Tensor, BackendError> {
        Ok(match &self.exe {
            Exe::Jit(j) => j.exe.run(&[x], self.threads)?,
            Exe::Reference(p) => p.run(vec![x.clone()])?,
            Exe::Cuda(c) => c.run(&[x])?,
        })
    }

    /// One inference; with `profile`, the time of each kernel where the backend measures them (the JIT
    /// always does, at no cost; CUDA only when asked, as it synchronizes after every launch).
    pub fn run_timed(&self, x: &Tensor, profile: bool) -> Result<Vec<Duration>, BackendError> {
        Ok(match &self.exe {
            Exe::Jit(j) => j.exe.run_timed(&[x], self.threads)?.1,
            Exe::Reference(p) => p.run(vec![x.clone()]).map(|_| vec![])?,
            Exe::Cuda(c) => c.run_timed(&[x], profile)?.1,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

#[cfg(test)]
mod tests {
    use crate::ir::Graph;

    fn graph(model: &str) -> Graph {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models").join(format!("{model}.model"));
        let src = crate::diag::Source::new(model, std::fs::read_to_string(path).expect("the model file"));
        crate::compile(&src).expect("compiles").0
    }

    #[test]
    fn replicas_where_a_share_works_enough_per_byte_of_weights() {
        let r = super::replicas;
        let (resnet, alex, digits) = (graph("resnet50"), graph("alexbn"), graph("digits"));
        // ResNet-50: 75 FLOP per byte of weights per sample; AlexNet 9 (a share of four passes 32).
        assert_eq!([r(&resnet, 2, 2), r(&resnet, 8, 4), r(&alex, 8, 2), r(&alex, 16, 4)], [2, 4, 2, 4]);
        assert_eq!([r(&alex, 2, 2), r(&alex, 4, 2)], [1, 1]);
        // Weights that stay in L2: any share.
        assert_eq!([r(&digits, 2, 2), r(&digits, 3, 3)], [2, 3]);
        // One thread, a batch the threads do not divide, or smaller than the thread count.
        assert_eq!([r(&resnet, 8, 1), r(&resnet, 3, 2), r(&digits, 1, 2), r(&digits, 2, 4)], [1; 4]);
    }
}
