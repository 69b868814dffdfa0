//! Running a [`Program`] on an NVIDIA GPU: its PTX ([`super::emit`]) loaded through the CUDA driver
//! API (cudarc, with `libcuda` opened at run time, so cnnc builds and runs where no CUDA is installed).
//!
//! [`CudaExecutable::new`] checks that a driver and a device exist ([`available`]: cudarc would panic
//! otherwise), loads the module, uploads the packed parameters once, allocates one device arena of
//! `program.arena_len` floats with the program's memory plan and page-locked host buffers for the
//! inputs and the output, and records every launch once, with its grid ([`launch_config`]) and
//! arguments, as a CUDA graph. [`CudaExecutable::run`] copies the inputs through the pinned buffers to
//! their arena offsets, replays the graph (no host work or synchronisation between layers) and copies
//! the output back, all on one stream, then waits once. Invariant left: each launch gets exactly its
//! slots' device addresses, which the kernels index inside (the kernel IR's invariant), and runs of one
//! executable are serialized (they share the arena and the pinned buffers).

use super::{emit, entry_name, launch_config, PtxError};
use crate::kernel::{Program, Slot};
use cnnc_runtime::Tensor;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver on this machine: libcuda could not be loaded (the cuda backend needs an NVIDIA GPU and its driver)")]
    NoDriver,
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error("the GPU is sm_{device}, older than the PTX target sm_{target}")]
    TooOld { device: u32, target: u32 },
    #[error(transparent)]
    Ptx(#[from] PtxError),
    #[error("CUDA {what} failed: {source}")]
    Driver { what: String, source: DriverError },
    #[error("CUDA graph capture recorded no graph")]
    NoGraph,
    #[error("the program takes {want} inputs, {got} given")]
    InputCount { want: usize, got: usize },
    #[error("input {index} has shape {got:?}; the program was built for {want:?}")]
    InputShape { index: usize, want: Vec<usize>, got: Vec<usize> },
}

fn driver(what: impl Into<String>) -> impl FnOnce(DriverError) -> CudaError {
    let what = what.into();
    move |source| CudaError::Driver { what, source }
}

/// Whether this machine can run the cuda backend: `Err` says why not (no driver library, no device).
pub fn available() -> Result<(), CudaError> {
    // SAFETY: only tries to open the driver's shared library (dlopen), which has no preconditions.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err(CudaError::NoDevice("the driver reports no device".into())),
        Err(e) => Err(CudaError::NoDevice(e.to_string())),
    }
}

struct Launch {
    name: String,
    flops: u64,
    f: CudaFunction,
    grid: (u32, u32),
    /// Device addresses of the kernel's buffers, in parameter order.
    ptrs: Vec<u64>,
}

impl Launch {
    fn launch(&self, stream: &CudaStream) -> Result<(), CudaError> {
        let mut b = stream.launch_builder(&self.f);
        for p in &self.ptrs {
            b.arg(p);
        }
        let cfg = LaunchConfig { grid_dim: (self.grid.0, 1, 1), block_dim: (self.grid.1, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the entry was emitted from this launch's kernel and takes one u64 device address per
        // slot, in this order (shared arrays are static, declared in the PTX); the addresses point into
        // the arena and parameter allocations, which the executable owns and which hold at least as many
        // elements as the kernel indexes (the kernel IR's invariant, checked when the program was built);
        // runs are serialized by the executable's lock.
        unsafe { b.launch(cfg) }.map(drop).map_err(driver(format!("launch of {}", self.name)))
    }
}

/// The recorded launches. A graph is not internally synchronized (CUDA's docs), so cudarc marks it
/// neither `Send` nor `Sync`; it lives behind the executable's lock, which serializes every use.
struct Graph(CudaGraph);

// SAFETY: a CUDA graph may be used from any thread (cudarc binds the context before each call); what it
// must not be is used from two at once, which the `Mutex<Io>` holding it rules out.
unsafe impl Send for Graph {}

/// What one run uses, behind the executable's lock: the arena, the pinned staging buffers and the graph.
struct Io {
    /// Every launch, recorded once; replayed by [`CudaExecutable::run`].
    graph: Graph,
    arena: CudaSlice<f32>,
    inputs: Vec<PinnedHostSlice<f32>>,
    output: PinnedHostSlice<f32>,
}

/// A program loaded on the GPU: its module, parameters and arena.
pub struct CudaExecutable {
    /// The lock serializes runs, which share the arena and the staging buffers. First, so that it is
    /// dropped first: the graph goes before the module and the memory its launches name.
    io: Mutex<Io>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    launches: Vec<Launch>,
    _params: Vec<CudaSlice<f32>>,
    inputs: Vec<(usize, Vec<usize>)>,
    output: (usize, Vec<usize>),
}

impl CudaExecutable {
    /// Emits `program` for `sm_{sm}`, loads it on device 0 and uploads its parameters.
    pub fn new(program: &Program, sm: u32) -> Result<Self, CudaError> {
        assert_eq!(program.replicas, 1, "a GPU runs the whole batch in one program");
        let ptx = emit(program, sm)?;
        available()?;
        let ctx = CudaContext::new(0).map_err(driver("context creation"))?;
        let (major, minor) = ctx.compute_capability().map_err(driver("device query"))?;
        let device = (major * 10 + minor) as u32;
        if device < sm {
            return Err(CudaError::TooOld { device, target: sm });
        }
        // A stream of its own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(driver("stream creation"))?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(driver("loading the PTX module"))?;
        let upload = |data: &[f32]| -> Result<CudaSlice<f32>, CudaError> {
            // Zero-length allocations fail; every buffer gets at least one element.
            let mut d = stream.alloc_zeros::<f32>(data.len().max(1)).map_err(driver("allocation"))?;
            if !data.is_empty() {
                stream.memcpy_htod(data, &mut d).map_err(driver("parameter upload"))?;
            }
            Ok(d)
        };
        let params: Vec<CudaSlice<f32>> = program.params.iter().map(|p| upload(p)).collect::<Result<_, _>>()?;
        let arena = stream.alloc_zeros::<f32>(program.arena_len.max(1)).map_err(driver("arena allocation"))?;
        let base = |s: &CudaSlice<f32>| s.device_ptr(&stream).0;
        let arena_base = base(&arena);
        let addr = |s: &Slot| match *s {
            Slot::Arena { offset, .. } => arena_base + 4 * offset as u64,
            Slot::Param(p) => base(&params[p]),
        };
        let mut launches = vec![];
        for (i, l) in program.launches.iter().enumerate() {
            let name = entry_name(i, &l.kernel);
            let f = module.load_function(&name).map_err(driver(format!("finding kernel {name}")))?;
            let ptrs = l.slots.iter().map(addr).collect();
            launches.push(Launch { name: l.kernel.name.clone(), flops: l.flops, f, grid: launch_config(&l.kernel), ptrs });
        }
        stream.synchronize().map_err(driver("parameter upload"))?;
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(driver("graph capture"))?;
        // The capture must end whatever happened, or the stream stays unusable.
        let recorded = launches.iter().try_for_each(|l| l.launch(&stream));
        let graph = stream.end_capture(CUgraphInstantiate_flags(0)).map_err(driver("graph capture"));
        recorded?;
        let graph = Graph(graph?.ok_or(CudaError::NoGraph)?);
        let pinned = |len: usize| {
            // SAFETY: the contents are undefined until written; runs write every element they read
            // (each input whole before its upload, the output by its download before it is read).
            unsafe { ctx.alloc_pinned_with_flags::<f32>(len.max(1), 0) }.map_err(driver("pinned host allocation"))
        };
        let inputs = program.inputs.iter().map(|(_, shape)| pinned(shape.iter().product())).collect::<Result<_, _>>()?;
        let output = pinned(program.output.1.iter().product())?;
        Ok(CudaExecutable {
            io: Mutex::new(Io { graph, arena, inputs, output }),
            stream,
            _module: module,
            launches,
            _params: params,
            inputs: program.inputs.clone(),
            output: program.output.clone(),
        })
    }

    /// Kernel names and floating-point operations, in launch order.
    pub fn kernels(&self) -> impl Iterator<Item = (&str, u64)> {
        self.launches.iter().map(|l| (l.name.as_str(), l.flops))
    }

    /// Runs the program on one batch of inputs (shapes as the program was built for).
    pub fn run(&self, inputs: &[&Tensor]) -> Result<Tensor, CudaError> {
        Ok(self.run_timed(inputs, false)?.0)
    }

    /// [`run`](Self::run), and with `profile` the GPU time of every launch (CUDA events), in order.
    pub fn run_timed(&self, inputs: &[&Tensor], profile: bool) -> Result<(Tensor, Vec<Duration>), CudaError> {
        if inputs.len() != self.inputs.len() {
            return Err(CudaError::InputCount { want: self.inputs.len(), got: inputs.len() });
        }
        for (index, (x, (_, want))) in inputs.iter().zip(&self.inputs).enumerate() {
            if x.shape() != want.as_slice() {
                return Err(CudaError::InputShape { index, want: want.clone(), got: x.shape().to_vec() });
            }
        }
        let mut io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        let Io { graph, arena, inputs: staged, output } = &mut *io;
        for ((x, (offset, _)), pinned) in inputs.iter().zip(&self.inputs).zip(staged.iter_mut()) {
            pinned.as_mut_slice().map_err(driver("input staging"))?[..x.data().len()].copy_from_slice(x.data());
            let mut dst = arena.slice_mut(*offset..*offset + x.data().len());
            self.stream.memcpy_htod(&*pinned, &mut dst).map_err(driver("input upload"))?;
        }
        // Profiling launches one kernel at a time between events; a plain run replays the graph.
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut events = vec![];
        if profile {
            events.push(self.stream.record_event(timing).map_err(driver("event"))?);
            for l in &self.launches {
                l.launch(&self.stream)?;
                events.push(self.stream.record_event(timing).map_err(driver("event"))?);
            }
        } else {
            graph.0.launch().map_err(driver("graph launch"))?;
        }
        let (offset, shape) = &self.output;
        let len = shape.iter().product::<usize>();
        self.stream.memcpy_dtoh(&arena.slice(*offset..*offset + len), &mut *output).map_err(driver("running the kernels or the output download"))?;
        // Reported here if a kernel failed; the events are complete after it.
        self.stream.synchronize().map_err(driver("running the kernels"))?;
        let data = output.as_slice().map_err(driver("output download"))?[..len].to_vec();
        let times = events.windows(2).map(|w| w[0].elapsed_ms(&w[1]).map(|ms| Duration::from_secs_f64(ms as f64 / 1e3)));
        let times = times.collect::<Result<_, _>>().map_err(driver("event timing"))?;
        Ok((Tensor::new(shape.clone(), data).expect("the output slot holds the output shape"), times))
    }
}
