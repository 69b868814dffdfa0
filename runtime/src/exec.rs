//! Compiled executables: a list of native kernel launches over one activation arena, run on threads.
//!
//! The compiler hands over function pointers (it owns code generation and keeps the code alive in
//! `code`), where each launch's buffers live ([`Slot`]), and the packed parameters. Running copies the
//! inputs into the arena, then runs the launches in order: each launch's work is cut into a fixed
//! number of tasks ([`TASKS_PER_THREAD`] per thread), which the threads claim one at a time (each its
//! own block of them first, then what the others left), and all threads meet at a barrier between
//! launches. A program compiled as replicas ([`Arena::replicas`]) has one arena per share of the batch
//! instead, and each thread runs whole replicas alone: no barrier, and no activation moves between
//! cores. The threads past the caller's are kept between runs
//! ([`Pool`]). Which elements a task computes is the kernel's business:
//! kernels partition their work statically and never let the partition change the arithmetic, so any
//! thread count, and any assignment of tasks to threads, gives the same bytes.

use crate::op::Dims;
use crate::plan::RunError;
use crate::Tensor;
use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A compiled kernel: `bufs` points at its buffers (in the kernel's order); the task computes its
/// share `task` of `ntasks`.
pub type KernelFn = unsafe extern "C" fn(bufs: *const *mut f32, task: usize, ntasks: usize);

/// Where a launch's buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// `len` elements at `offset` in the arena.
    Arena { offset: usize, len: usize },
    /// A packed parameter, by number.
    Param(usize),
}

pub struct Step {
    pub name: String,
    pub f: KernelFn,
    pub slots: Vec<Slot>,
    pub flops: u64,
}

/// An `f32` buffer, 64-byte aligned (cache lines, vectors): the arena, and each packed parameter, made
/// once when the model is lowered and shared by the executables built from it. Buffers of 2 MiB or more
/// are 2 MiB aligned and, on Linux, asked to be backed by huge pages, so that streaming 150 MB of FC
/// weights takes no TLB miss per 4 KiB. Allocation is fallible, unlike `Vec`'s: a refused allocation
/// is an error for the user, not an abort.
pub struct Buffer {
    ptr: *mut f32,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: `Buffer` owns its allocation like a `Vec<f32>`.
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

const HUGE: usize = 2 << 20;

/// The system refused an allocation of `bytes`.
#[derive(Debug)]
pub struct OutOfMemory {
    pub bytes: usize,
}

impl Buffer {
    /// `len` zeros. A large buffer is zeroed on every core: its first touch, when the system finds and
    /// clears its pages, costs more than the writing.
    pub fn zeroed(len: usize) -> Result<Buffer, OutOfMemory> {
        let a = Buffer::uninit(len)?;
        // SAFETY: `ptr` is valid for `layout.size()` bytes, which `a` owns; nothing reads them yet.
        let all = unsafe { std::slice::from_raw_parts_mut(a.ptr.cast::<std::mem::MaybeUninit<u8>>(), a.layout.size()) };
        crate::par::chunks_mut(all, HUGE, |_, c| c.fill(std::mem::MaybeUninit::new(0)));
        Ok(a)
    }

    /// A copy of `v`.
    pub fn from_slice(v: &[f32]) -> Result<Buffer, OutOfMemory> {
        let a = Buffer::uninit(v.len())?;
        // SAFETY: `ptr` is valid for `len` floats and does not overlap `v`; the padding past `len` is
        // never read (kernels index inside their buffers).
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), a.ptr, v.len()) };
        Ok(a)
    }

    /// An allocation whose first `len` floats the caller writes before anything reads them.
    fn uninit(len: usize) -> Result<Buffer, OutOfMemory> {
        let bytes = len.checked_mul(4).ok_or(OutOfMemory { bytes: usize::MAX })?.max(64);
        let align = if bytes >= HUGE { HUGE } else { 64 };
        let layout = std::alloc::Layout::from_size_align(bytes.next_multiple_of(align), align).map_err(|_| OutOfMemory { bytes })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) } as *mut f32;
        if ptr.is_null() {
            return Err(OutOfMemory { bytes });
        }
        // Advise before the first touch, which is when pages are chosen.
        #[cfg(target_os = "linux")]
        if align == HUGE {
            // SAFETY: advice on memory we own; failure only means small pages.
            unsafe { libc::madvise(ptr.cast(), layout.size(), libc::MADV_HUGEPAGE) };
        }
        Ok(Buffer { ptr, len, layout })
    }
}

impl std::ops::Deref for Buffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `ptr` holds `len` initialized floats owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `&mut self` is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `uninit` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.cast(), self.layout) };
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "Buffer({} floats)", self.len)
    }
}

/// The activations' memory: `replicas` arenas of `len` elements, one after the other, each holding one
/// share of the batch (the launches address one arena; the samples of replica r are its r-th share).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arena {
    pub len: usize,
    pub replicas: usize,
}

pub struct Executable {
    steps: Vec<Step>,
    params: Vec<Arc<Buffer>>,
    shape: Arena,
    /// The arenas, and the worker threads of the last multi-threaded run (kept for the next).
    arena: Mutex<(Buffer, Option<Pool>)>,
    /// Arena offsets and full (whole-batch) shapes.
    inputs: Vec<(usize, Dims)>,
    output: (usize, Dims),
    /// Keeps the kernels' code mapped for as long as `steps` can be called.
    _code: Box<dyn Any + Send + Sync>,
}

/// Tasks per thread in each launch, claimed in turn: on a shared machine one core often runs slower
/// than the other for a while (its neighbours), and with one fixed task per thread the other then
/// waited at every barrier. AlexBN at batch 1, 2 threads, took as long as at 1 thread in such spells;
/// with four tasks per thread the faster core takes the slower one's share. (Kernels split their
/// extent into contiguous ranges, so a task is still long: a few channel blocks, rows or weight rows.)
pub const TASKS_PER_THREAD: usize = 4;

/// A sense-reversing spin barrier. Launches take 0.1–10 ms, so waking a sleeping thread through a
/// futex (tens of µs, more when the core dozed off) would be paid ~13 times per AlexBN inference; a
/// waiting thread spins, yielding now and then ([`relax`]), so oversubscribed cores still make progress.
struct SpinBarrier {
    n: usize,
    arrived: AtomicUsize,
    sense: AtomicBool,
}

impl SpinBarrier {
    fn new(n: usize) -> Self {
        SpinBarrier { n, arrived: AtomicUsize::new(0), sense: AtomicBool::new(false) }
    }

    /// `local` is the caller's own sense flag, false initially.
    fn wait(&self, local: &mut bool) {
        *local = !*local;
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.arrived.store(0, Ordering::Relaxed);
            self.sense.store(*local, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.sense.load(Ordering::Acquire) != *local {
            relax(&mut spins);
        }
    }
}

/// One step of a spin wait: a `pause`, and every 256th a `sched_yield`. Alone on its core the yield
/// returns at once; but the scheduler sometimes wakes a worker onto the core of the thread that woke
/// it (the other virtual CPU halted), and there the two spinning threads took turns by time slice:
/// 2.3 ms per inference of the digits model at 2 threads, every other run of ten.
fn relax(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if spins.is_multiple_of(256) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// Worker threads that outlive a run: spawning them per run cost ~150 µs before the second thread ran
/// its first task (a halted virtual CPU to wake), 1% of AlexBN at batch 1 on 2 threads. Between runs
/// they spin for a while (back-to-back inferences find them awake), then sleep on a condition variable.
struct Pool {
    shared: std::sync::Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// The process that started the workers: after a `fork`, they exist only in the parent.
    pid: u32,
}

/// A job: called once per worker with its thread number (1..threads).
type Job<'a> = dyn Fn(usize) + Sync + 'a;

/// The current job, its lifetime erased: valid from when `generation` moves until `done` reaches the
/// worker count, which `Pool::run` waits for.
struct JobPtr(*const Job<'static>);
// SAFETY: the job is `Sync`, and only called while `Pool::run` keeps it alive.
unsafe impl Send for JobPtr {}

#[derive(Default)]
struct Shared {
    job: Mutex<Option<JobPtr>>,
    /// Bumped once per job (and once to stop).
    generation: AtomicUsize,
    done: AtomicUsize,
    stop: AtomicBool,
    sleep: Mutex<()>,
    wake: std::sync::Condvar,
}

/// How long an idle worker spins for the next job before it sleeps: 64 K `pause`s, 1–3 ms (a pause is
/// 60–140 cycles, by CPU).
const IDLE_SPINS: u32 = 1 << 16;

impl Pool {
    fn new(threads: usize) -> Pool {
        let shared = std::sync::Arc::new(Shared::default());
        let workers = (1..threads)
            .map(|thread| {
                let shared = shared.clone();
                std::thread::spawn(move || shared.work(thread))
            })
            .collect();
        Pool { shared, workers, pid: std::process::id() }
    }

    fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `job(0)` here and `job(t)` on worker t, and returns when all have returned.
    fn run(&self, job: &Job<'_>) {
        let sh = &*self.shared;
        // SAFETY: only the lifetime changes; the workers call it before `done` reaches their count, and
        // this function waits for that below.
        let ptr = unsafe { std::mem::transmute::<*const Job<'_>, *const Job<'static>>(job) };
        *sh.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(JobPtr(ptr));
        sh.done.store(0, Ordering::Relaxed);
        sh.bump();
        job(0);
        let mut spins = 0u32;
        while sh.done.load(Ordering::Acquire) < self.workers.len() {
            relax(&mut spins);
        }
    }
}

impl Shared {
    /// Moves `generation` on and wakes the sleeping workers.
    fn bump(&self) {
        let _g = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::Release);
        self.wake.notify_all();
    }

    fn work(&self, thread: usize) {
        let mut seen = 0;
        loop {
            let mut spins = 0;
            while self.generation.load(Ordering::Acquire) == seen {
                if spins < IDLE_SPINS {
                    relax(&mut spins);
                } else {
                    let g = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
                    if self.generation.load(Ordering::Acquire) == seen {
                        drop(self.wake.wait(g).unwrap_or_else(|e| e.into_inner()));
                    }
                }
            }
            seen = self.generation.load(Ordering::Acquire);
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let ptr = self.job.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|j| j.0).expect("a job with the generation");
            // SAFETY: see `JobPtr`: `Pool::run` set it before moving `generation` and waits for `done`.
            let job = unsafe { &*ptr };
            job(thread);
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.bump();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A buffer table shared by the threads of one run.
struct Tables(Vec<Vec<*mut f32>>);
// SAFETY: the pointers address the arena and parameters, which outlive the run (the arena's lock is
// held throughout); kernels write disjoint elements per task and launches are separated by barriers.
unsafe impl Sync for Tables {}

impl Tables {
    fn rows(&self) -> &[Vec<*mut f32>] {
        &self.0
    }
}

/// The machine's physical memory in bytes, where the OS tells.
pub fn physical_memory() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf only reads system configuration.
        let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        if pages > 0 && size > 0 {
            return Some(pages as u64 * size as u64);
        }
    }
    None
}

impl Executable {
    /// # Safety
    /// Each `f` must be a kernel that, called with pointers to buffers of the slots' lengths, reads and
    /// writes only inside them, writes disjoint elements for distinct tasks, and stays valid while `code`
    /// lives.
    pub unsafe fn new(
        steps: Vec<Step>,
        params: Vec<Arc<Buffer>>,
        shape: Arena,
        inputs: Vec<(usize, Dims)>,
        output: (usize, Dims),
        code: Box<dyn Any + Send + Sync>,
    ) -> Result<Self, OutOfMemory> {
        assert!(shape.replicas >= 1 && inputs.iter().chain([&output]).all(|(_, d)| d[0].is_multiple_of(shape.replicas)), "replicas share the batch");
        let len = shape.len.checked_mul(shape.replicas).ok_or(OutOfMemory { bytes: usize::MAX })?;
        Ok(Executable { steps, params, shape, arena: Mutex::new((Buffer::zeroed(len)?, None)), inputs, output, _code: code })
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Runs on `threads` threads (≥ 1).
    pub fn run(&self, inputs: &[&Tensor], threads: usize) -> Result<Tensor, RunError> {
        self.run_timed(inputs, threads).map(|(t, _)| t)
    }

    /// Runs and also returns each launch's wall time (measured by the first thread, barrier to barrier).
    pub fn run_timed(&self, inputs: &[&Tensor], threads: usize) -> Result<(Tensor, Vec<Duration>), RunError> {
        if inputs.len() != self.inputs.len() {
            return Err(RunError::InputCount { expected: self.inputs.len(), got: inputs.len() });
        }
        for (index, (t, (_, shape))) in inputs.iter().zip(&self.inputs).enumerate() {
            if t.shape() != shape.as_slice() {
                return Err(RunError::InputShape { index, expected: shape[1..].to_vec(), got: t.shape().to_vec() });
            }
        }
        let mut guard = self.arena.lock().unwrap_or_else(|e| e.into_inner());
        let (arena, pool) = &mut *guard;
        let Arena { len, replicas } = self.shape;
        // Replica r's share of each input: the r-th of `replicas` equal parts, at the input's offset in
        // arena r.
        for (t, (offset, _)) in inputs.iter().zip(&self.inputs) {
            for (r, share) in t.data().chunks(t.data().len() / replicas).enumerate() {
                arena[r * len + offset..][..share.len()].copy_from_slice(share);
            }
        }
        let table = |r: usize| -> Vec<Vec<*mut f32>> {
            let ptr = |slot: &Slot| match *slot {
                // SAFETY: offsets were planned inside one arena, and there are `replicas` of them.
                Slot::Arena { offset, .. } => unsafe { arena.ptr.add(r * len + offset) },
                // Kernels only read parameters; the table type is shared with the arena's.
                Slot::Param(p) => self.params[p].ptr,
            };
            self.steps.iter().map(|s| s.slots.iter().map(ptr).collect()).collect()
        };
        let tables: Vec<Tables> = (0..replicas).map(|r| Tables(table(r))).collect();
        // With replicas, each thread runs whole replicas alone, in turn (threads past the replica count
        // would have nothing to do); else all threads run every launch together, tasks claimed.
        let (threads, gang) = match replicas {
            1 => (threads.max(1), threads.max(1)),
            _ => (threads.clamp(1, replicas), 1),
        };
        let barrier = SpinBarrier::new(gang);
        // Per launch and thread, the next unclaimed task of the thread's own block (TASKS_PER_THREAD
        // tasks from thread · TASKS_PER_THREAD on).
        let next: Vec<Vec<AtomicUsize>> = self.steps.iter().map(|_| (0..gang).map(|_| AtomicUsize::new(0)).collect()).collect();
        let ntasks = if gang == 1 { 1 } else { gang * TASKS_PER_THREAD };
        let per = ntasks / gang;
        let work = |thread: usize, times: &mut Vec<Duration>| {
            let mut sense = false;
            // The gang's one replica, or this thread's replicas: thread, thread + threads, ...
            let (first, stride) = if gang > 1 { (0, 1) } else { (thread, threads) };
            for (r, tables) in tables.iter().enumerate().skip(first).step_by(stride) {
                for ((step, table), next) in self.steps.iter().zip(tables.rows()).zip(&next) {
                    let t0 = Instant::now();
                    if gang == 1 {
                        // SAFETY: see `new`; the table points at live buffers of the planned lengths.
                        unsafe { (step.f)(table.as_ptr(), 0, 1) };
                    } else {
                        // A thread takes its own block first, then what is left of the others': kernels
                        // partition their work alike from launch to launch (by image, by channel), so
                        // each thread then mostly reads what it wrote, from its own caches — on a VM
                        // whose two cores sit on different dies a line written by the other costs a
                        // ~230 ns transfer (docs/benchmarks.md) — and a slower core's tasks still go to
                        // a faster one.
                        for owner in (0..gang).map(|k| (thread + k) % gang) {
                            loop {
                                let i = next[owner].fetch_add(1, Ordering::Relaxed);
                                if i >= per {
                                    break;
                                }
                                // SAFETY: see `new`; the table points at live buffers of the planned
                                // lengths, and each task is run once.
                                unsafe { (step.f)(table.as_ptr(), owner * per + i, ntasks) };
                            }
                        }
                        barrier.wait(&mut sense);
                    }
                    if r == 0 {
                        times.push(t0.elapsed());
                    }
                }
            }
        };
        let times = Mutex::new(Vec::with_capacity(self.steps.len()));
        if threads == 1 {
            work(0, &mut times.lock().unwrap_or_else(|e| e.into_inner()));
        } else {
            // A forked child inherits the pool but not its threads: joining them would hang, so it is
            // forgotten (its memory is the parent's copy) and the child starts its own.
            if let Some(stale) = pool.take_if(|p| p.pid != std::process::id()) {
                std::mem::forget(stale);
            }
            if pool.as_ref().is_none_or(|p| p.threads() != threads) {
                *pool = None;
                *pool = Some(Pool::new(threads));
            }
            let pool = pool.as_ref().expect("just made");
            // The caller (thread 0) times the launches (of replica 0).
            pool.run(&|thread| match thread {
                0 => work(0, &mut times.lock().unwrap_or_else(|e| e.into_inner())),
                _ => work(thread, &mut Vec::new()),
            });
        }
        let times = times.into_inner().unwrap_or_else(|e| e.into_inner());
        let (offset, shape) = &self.output;
        let share = shape.iter().product::<usize>() / replicas;
        let out = (0..replicas).flat_map(|r| &arena[r * len + offset..][..share]).copied().collect();
        Ok((Tensor::new(shape.clone(), out).expect("planned size"), times))
    }
}
