//! Running a [`Program`] on an NVIDIA GPU: its PTX ([`super::emit`]) loaded through the CUDA driver
//! API (cudarc, with `libcuda` opened at run time, so cnnc builds and runs where no CUDA is installed).
//!
//! [`CudaExecutable::new`] checks that a driver and a device exist ([`available`]: cudarc would panic
//! otherwise), loads the module, uploads the packed parameters once and allocates one device arena of
//! `program.arena_len` floats with the program's memory plan. [`CudaExecutable::run`] copies the inputs
//! to their arena offsets, launches every kernel in order on one stream with [`launch_config`], and
//! copies the output back. Invariant left: each launch gets exactly its slots' device addresses, which
//! the kernels index inside (the kernel IR's invariant), and runs of one executable are serialized (they
//! share the arena).

use super::{emit, entry_name, launch_config, PtxError};
use crate::kernel::{Program, Slot};
use cnnc_runtime::Tensor;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig, PushKernelArg};
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

/// A program loaded on the GPU: its module, parameters and arena.
pub struct CudaExecutable {
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    launches: Vec<Launch>,
    _params: Vec<CudaSlice<f32>>,
    /// The activation arena; the lock serializes runs, which share it.
    arena: Mutex<CudaSlice<f32>>,
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
        let stream = ctx.default_stream();
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
        Ok(CudaExecutable {
            stream,
            _module: module,
            launches,
            _params: params,
            arena: Mutex::new(arena),
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
        let mut arena = self.arena.lock().unwrap_or_else(|e| e.into_inner());
        for (x, (offset, _)) in inputs.iter().zip(&self.inputs) {
            let mut dst = arena.slice_mut(*offset..*offset + x.data().len());
            self.stream.memcpy_htod(x.data(), &mut dst).map_err(driver("input upload"))?;
        }
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut events = vec![];
        if profile {
            events.push(self.stream.record_event(timing).map_err(driver("event"))?);
        }
        for l in &self.launches {
            let mut b = self.stream.launch_builder(&l.f);
            for p in &l.ptrs {
                b.arg(p);
            }
            let cfg = LaunchConfig { grid_dim: (l.grid.0, 1, 1), block_dim: (l.grid.1, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the entry was emitted from this launch's kernel and takes one u64 device address per
            // slot, in this order; the addresses point into the arena and parameter allocations, which
            // `self` owns and which hold at least as many elements as the kernel indexes (the kernel
            // IR's invariant, checked when the program was built); runs are serialized by the lock.
            unsafe { b.launch(cfg) }.map_err(driver(format!("launch of {}", l.name)))?;
            if profile {
                events.push(self.stream.record_event(timing).map_err(driver("event"))?);
            }
        }
        let (offset, shape) = &self.output;
        let len = shape.iter().product::<usize>();
        let data = self.stream.clone_dtoh(&arena.slice(*offset..*offset + len)).map_err(driver("running the kernels or the output download"))?;
        // The copy to pageable memory returns when done; synchronize anyway so that a failed kernel is
        // reported here and the events are complete.
        self.stream.synchronize().map_err(driver("running the kernels"))?;
        let times = events.windows(2).map(|w| w[0].elapsed_ms(&w[1]).map(|ms| Duration::from_secs_f64(ms as f64 / 1e3)));
        let times = times.collect::<Result<_, _>>().map_err(driver("event timing"))?;
        Ok((Tensor::new(shape.clone(), data).expect("the output slot holds the output shape"), times))
    }
}
