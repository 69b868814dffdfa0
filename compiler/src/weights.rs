//! Weights: Chainer `save_npz` files and safetensors files → parameters bound to a graph.
//!
//! Keys are Chainer's (`conv1/W`, `bn1/avg_mean`, `res2/0/conv1/W`). Binding checks every key and shape the
//! graph needs and reports all problems at once, pointing at the link declarations; keys the model does not
//! use (`bn1/N`, auxiliary heads) are listed in a note. Without a file, [`init`] initialises like Chainer
//! (LeCunNormal W, zero biases, BN γ=1 β=0 mean 0 var 1) from a fixed seed.

use crate::diag::Diagnostic;
use crate::ir::{Graph, ParamSpec};
use cnnc_runtime::{rng, Tensor};
use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("cannot read weights file `{path}`")]
    Io { path: String, source: std::io::Error },
    #[error("`{path}` is not a valid {format} file: {reason}")]
    Corrupt { path: String, format: &'static str, reason: String },
    #[error("`{path}` is neither a Chainer .npz (zip) nor a safetensors file")]
    UnknownFormat { path: String },
    #[error("`{key}` in `{path}` has dtype {dtype}; cnnc reads float32, float64, float16 and (safetensors) bfloat16")]
    Dtype { path: String, key: String, dtype: String },
}

impl WeightError {
    pub fn diagnostic(&self) -> Diagnostic {
        Diagnostic::error(self.to_string())
    }
}

/// Arrays read from a weights file, by key. Loaded lazily: only keys the model uses are decoded.
pub struct Weights {
    path: String,
    store: Store,
}

enum Store {
    /// A zip of `.npy` members (its central directory read once), whose members are inflated in place
    /// from the file, each reader with its own cursor: threads decode members side by side.
    Npz(zip::ZipArchive<At>),
    Safetensors(Vec<u8>),
    /// Deterministic initialisation (no file).
    Init,
    /// Arrays already in memory (an imported ONNX model's), each handed over when read.
    Memory(std::sync::Mutex<HashMap<String, Array>>),
}

/// A cursor over a weights file's bytes. A file is read with positional reads, so that clones share
/// one handle and the file is never held whole in memory beside the arrays decoded from it.
#[derive(Clone)]
struct At {
    bytes: Arc<Bytes>,
    pos: u64,
}

enum Bytes {
    File(std::fs::File, u64),
    Memory(Vec<u8>),
}

impl Bytes {
    fn len(&self) -> u64 {
        match self {
            Bytes::File(_, len) => *len,
            Bytes::Memory(b) => b.len() as u64,
        }
    }
}

impl std::io::Read for At {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // A seek may have gone past the end (a zip's offsets are the file's word).
        let left = self.bytes.len().saturating_sub(self.pos);
        let n = left.min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let buf = &mut buf[..n];
        let n = match &*self.bytes {
            Bytes::File(f, _) => std::os::unix::fs::FileExt::read_at(f, buf, self.pos)?,
            Bytes::Memory(b) => {
                buf.copy_from_slice(&b[self.pos as usize..][..buf.len()]);
                buf.len()
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for At {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            std::io::SeekFrom::Start(p) => Some(p),
            std::io::SeekFrom::End(d) => self.bytes.len().checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start of the file"))?;
        Ok(self.pos)
    }
}

/// A raw array: shape and values converted to f32.
pub type Array = (Vec<usize>, Vec<f32>);

impl Weights {
    /// Opens a `.npz` (as written by `chainer.serializers.save_npz`, compressed or not) or a safetensors file,
    /// telling them apart by content. An npz file stays on disk and is read member by member.
    pub fn open(path: &Path) -> Result<Weights, WeightError> {
        let p = path.display().to_string();
        let io = |source| WeightError::Io { path: p.clone(), source };
        let mut magic = [0u8; 9];
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let got = std::os::unix::fs::FileExt::read_at(&file, &mut magic, 0).map_err(io)?;
        if is_zip(&magic[..got]) {
            return Weights::npz(p, Bytes::File(file, len));
        }
        let bytes = read_within_memory(path).map_err(io)?;
        Weights::from_bytes(p, bytes)
    }

    /// The weights file `bytes`, named `p` in messages.
    pub fn from_bytes(p: String, bytes: Vec<u8>) -> Result<Weights, WeightError> {
        if is_zip(&bytes) {
            return Weights::npz(p, Bytes::Memory(bytes));
        }
        let store = if bytes.len() >= 9 && bytes[8] == b'{' {
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| WeightError::Corrupt {
                path: p.clone(),
                format: "safetensors",
                reason: e.to_string(),
            })?;
            Store::Safetensors(bytes)
        } else {
            return Err(WeightError::UnknownFormat { path: p });
        };
        Ok(Weights { path: p, store })
    }

    fn npz(p: String, bytes: Bytes) -> Result<Weights, WeightError> {
        let zip = zip::ZipArchive::new(At { bytes: Arc::new(bytes), pos: 0 }).map_err(|e| WeightError::Corrupt {
            path: p.clone(),
            format: "npz",
            reason: e.to_string(),
        })?;
        Ok(Weights { path: p, store: Store::Npz(zip) })
    }

    /// No file: parameters are initialised deterministically (see [`init_param`]).
    pub fn init() -> Weights {
        Weights { path: "<initialised>".into(), store: Store::Init }
    }

    /// The arrays of a model imported from `path`.
    pub fn from_arrays(path: &Path, arrays: HashMap<String, Array>) -> Weights {
        Weights { path: path.display().to_string(), store: Store::Memory(arrays.into()) }
    }

    pub fn is_init(&self) -> bool {
        matches!(self.store, Store::Init)
    }

    pub fn keys(&self) -> Vec<String> {
        match &self.store {
            Store::Npz(z) => z.file_names().filter_map(|f| f.strip_suffix(".npy")).map(str::to_string).collect(),
            Store::Safetensors(b) => safetensors::SafeTensors::deserialize(b).map(|s| s.names().into_iter().map(str::to_string).collect()).unwrap_or_default(),
            Store::Init => vec![],
            Store::Memory(m) => m.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect(),
        }
    }

    /// The array under `key`, converted to f32. Several threads may read different keys at once; an
    /// array held in memory is moved out, so each key is read once. With `want`, an array of another
    /// shape comes back without its values, unread: a file cannot make cnnc hold more than the model
    /// needs (binding reads every member at once, on every core).
    pub fn read(&self, key: &str, want: Option<&[usize]>) -> Result<Array, WeightError> {
        let corrupt = |reason: String| WeightError::Corrupt { path: self.path.clone(), format: "npz", reason: format!("array `{key}`: {reason}") };
        match &self.store {
            Store::Npz(z) => {
                use std::io::Read;
                let mut z = z.clone();
                let mut head = Vec::new();
                z.by_name(&format!("{key}.npy"))
                    .map_err(|e| corrupt(e.to_string()))?
                    .take(HEADER_SCAN)
                    .read_to_end(&mut head)
                    .map_err(|e| corrupt(e.to_string()))?;
                check_npy_header(&head).map_err(corrupt)?;
                let member = z.by_name(&format!("{key}.npy")).map_err(|e| corrupt(e.to_string()))?;
                let npy = npyz::NpyFile::new(member).map_err(|e| corrupt(e.to_string()))?;
                read_npy(npy, want).map_err(|e| match e {
                    NpyError::Dtype(dtype) => WeightError::Dtype { path: self.path.clone(), key: key.into(), dtype },
                    NpyError::Bad(reason) => corrupt(reason),
                })
            }
            Store::Safetensors(bytes) => {
                let st = safetensors::SafeTensors::deserialize(bytes).expect("validated in open");
                let t = st.tensor(key).map_err(|e| WeightError::Corrupt { path: self.path.clone(), format: "safetensors", reason: e.to_string() })?;
                let ty = match t.dtype() {
                    safetensors::Dtype::F16 => Float::F16,
                    safetensors::Dtype::BF16 => Float::Bf16,
                    safetensors::Dtype::F32 => Float::F32,
                    safetensors::Dtype::F64 => Float::F64,
                    d => return Err(WeightError::Dtype { path: self.path.clone(), key: key.into(), dtype: format!("{d:?}") }),
                };
                if want.is_some_and(|w| w != t.shape()) {
                    return Ok((t.shape().to_vec(), vec![]));
                }
                Ok((t.shape().to_vec(), ty.decode(t.data(), true)))
            }
            Store::Memory(m) => m.lock().unwrap_or_else(|e| e.into_inner()).remove(key).ok_or_else(|| corrupt("missing".into())),
            Store::Init => unreachable!("initialised weights are not read"),
        }
    }
}

fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06")
}

/// How much of an `.npy` [`check_npy_header`] reads: the magic, the length and the longest header.
const HEADER_SCAN: u64 = 12 + 65_536;

/// npyz's header parser takes time exponential in bracket nesting (found by fuzzing: 19 nested `{` ran
/// for minutes). A real header nests two deep (a dict holding the shape tuple), so one nesting deeper
/// than 4 is refused before npyz reads it.
pub fn check_npy_header(bytes: &[u8]) -> Result<(), String> {
    let mut depth = 0i64;
    // The header text follows the magic, the version and its length (2 bytes in version 1, 4 after),
    // whose bytes may well be a `\n` (a length of 2,614 is 0x0a36).
    let start = if bytes.get(6).is_some_and(|&major| major >= 2) { 12 } else { 10 };
    for &b in bytes.iter().take(HEADER_SCAN as usize).skip(start).take_while(|&&b| b != b'\n') {
        depth += match b {
            b'{' | b'(' | b'[' => 1,
            b'}' | b')' | b']' => -1,
            _ => 0,
        };
        if depth > 4 {
            return Err("its header nests brackets more than 4 deep (an .npy header is a flat dict)".into());
        }
    }
    Ok(())
}

/// Why an `.npy` array could not be read as f32.
pub enum NpyError {
    Dtype(String),
    Bad(String),
}

/// Reads a float16, float32 or float64 `.npy` array as f32 in C order (the one npy reader for weights and
/// inputs); a Fortran-order one, as `np.save` writes a transposed array, is reordered.
/// With `want`, an array of another shape comes back without its values, unread.
pub fn read_npy<R: std::io::Read>(npy: npyz::NpyFile<R>, want: Option<&[usize]>) -> Result<Array, NpyError> {
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    // The header's shape is untrusted: its element count must not overflow (npyz would read 0 values).
    if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > 1 << 34) {
        return Err(NpyError::Bad(format!("shape {shape:?} is too large")));
    }
    let fortran = npy.order() == npyz::Order::Fortran;
    let descr = npy.dtype().descr().trim_matches('\'').to_string();
    let ty = match descr.get(1..) {
        Some("f2") => Float::F16,
        Some("f4") => Float::F32,
        Some("f8") => Float::F64,
        _ => return Err(NpyError::Dtype(descr)),
    };
    let width = ty.width();
    if want.is_some_and(|w| w != shape) {
        return Ok((shape, vec![]));
    }
    // Decoded in bulk: element-by-element reads through a zip entry spent seconds on 60 M parameters.
    let n: usize = shape.iter().product();
    if let Some(limit) = memory_limit().filter(|&m| n.saturating_mul(4) as u64 > m) {
        return Err(NpyError::Bad(format!(
            "shape {shape:?} needs {:.1} GiB as float32, more than cnnc's limit of {:.1} GiB (80 % of this machine's memory)",
            gib(n as u64 * 4),
            gib(limit)
        )));
    }
    let mut r = npy.into_inner();
    let little = !descr.starts_with('>');
    let truncated = |got: usize| NpyError::Bad(format!("truncated: {n} values need {} bytes of data, found {got}", n * width));
    let data = if matches!(ty, Float::F32) && little {
        // The common case lands in its final buffer: no byte copy beside it.
        let mut v: Vec<f32> = grown(n, |v: &mut [f32]| fill(&mut r, bytemuck::cast_slice_mut(v))).map_err(|(e, got)| e.unwrap_or_else(|| truncated(got)))?;
        v.shrink_to_fit();
        v
    } else {
        let raw: Vec<u8> = grown(n * width, |v: &mut [u8]| fill(&mut r, v)).map_err(|(e, got)| e.unwrap_or_else(|| truncated(got)))?;
        ty.decode(&raw, little)
    };
    // Read to the end: a zip member's checksum is checked there, and a damaged one must not pass as weights.
    std::io::copy(&mut r, &mut std::io::sink()).map_err(|e| NpyError::Bad(e.to_string()))?;
    if !fortran {
        return Ok((shape, data));
    }
    // Fortran order is the C order of the reversed shape: transpose it back.
    let stored: Vec<usize> = shape.iter().rev().copied().collect();
    let axes: Vec<usize> = (0..shape.len()).rev().collect();
    Ok((shape, cnnc_runtime::reference::transposed(&stored, &axes).map(|i| data[i]).collect()))
}

/// `n` elements filled by `read`, the buffer grown as they arrive rather than sized from a header that
/// may declare far more than its file holds. `read` fills a slice and returns the bytes it read.
/// Err: the reader's error, or none and how many bytes arrived in all.
fn grown<T: Copy + Default>(n: usize, mut read: impl FnMut(&mut [T]) -> std::io::Result<usize>) -> Result<Vec<T>, (Option<NpyError>, usize)> {
    let size = std::mem::size_of::<T>();
    let mut v = Vec::new();
    while v.len() < n {
        let start = v.len();
        v.resize(start + (n - start).min(start.max(1 << 16)), T::default());
        let got = read(&mut v[start..]).map_err(|e| (Some(NpyError::Bad(e.to_string())), start * size))?;
        if got < (v.len() - start) * size {
            return Err((None, start * size + got));
        }
    }
    Ok(v)
}

/// Reads until `buf` is full or the reader ends; returns how many bytes it read.
fn fill(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(k) => done += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A floating-point element type read as f32: what numpy, safetensors and ONNX write for weights and
/// inputs. float16 and bfloat16 widen exactly; float64 rounds to nearest (out-of-range values become
/// infinite, which the non-finite checks then name).
#[derive(Clone, Copy)]
pub enum Float {
    F16,
    Bf16,
    F32,
    F64,
}

impl Float {
    pub fn width(self) -> usize {
        match self {
            Float::F16 | Float::Bf16 => 2,
            Float::F32 => 4,
            Float::F64 => 8,
        }
    }

    /// The f32 values of `raw`'s whole elements, stored little- or big-endian.
    pub fn decode(self, raw: &[u8], little: bool) -> Vec<f32> {
        let decode = |c: &[u8]| {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            if !little {
                b[..c.len()].reverse();
            }
            match self {
                Float::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                Float::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                Float::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                Float::F64 => f64::from_le_bytes(b) as f32,
            }
        };
        raw.chunks_exact(self.width()).map(decode).collect()
    }
}

/// The most any one array, or a compiled model's arena and parameters together, may take: 80 % of
/// physical memory, leaving the rest to the system (`None` where it cannot be read). Past it, a
/// model would swap for minutes or be killed instead of failing with a message.
pub fn memory_limit() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages > 0 && size > 0).then(|| pages as u64 * size as u64 / 5 * 4)
}

/// Reads a whole file of at most `limit` bytes (`what` names the limit in the error), into a buffer
/// reserved fallibly: a larger file, or a device that never ends (`/dev/zero`), is an error before
/// memory runs out, never an abort.
pub fn read_file(path: &Path, limit: u64, what: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let too_large = || std::io::Error::other(format!("it is larger than {what}"));
    let f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    if size > limit {
        return Err(too_large());
    }
    let mut buf = Vec::new();
    buf.try_reserve_exact(size as usize).map_err(|_| std::io::Error::other(format!("the system refused {:.1} GiB of memory for it", gib(size))))?;
    f.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(buf)
}

/// [`read_file`] within [`memory_limit`]: weights, inputs, external data.
pub fn read_within_memory(path: &Path) -> std::io::Result<Vec<u8>> {
    match memory_limit() {
        Some(limit) => read_file(path, limit, &format!("cnnc's limit of {:.1} GiB (80 % of this machine's memory)", gib(limit))),
        None => read_file(path, u64::MAX, "the address space"),
    }
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Chainer's default initialisation of one parameter, deterministic per key: W ~ LeCunNormal
/// (N(0, 1/fan_in)), biases and β and avg_mean 0, γ and avg_var 1.
pub fn init_param(spec: &ParamSpec) -> Tensor {
    let n: usize = spec.shape.iter().product();
    let data: Vec<f32> = match spec.key.rsplit('/').next() {
        Some("W") => {
            let std = (1.0 / spec.shape[1..].iter().product::<usize>() as f64).sqrt();
            let mut w = vec![0.0; n];
            rng::normal_into(&spec.key, std, &mut w);
            w
        }
        Some("gamma" | "avg_var") => vec![1.0; n],
        _ => vec![0.0; n],
    };
    Tensor::new(spec.shape.clone(), data).expect("n matches shape")
}

/// The parameters of a graph, in [`Graph::params`] order, with notes about the file.
#[derive(Clone)]
pub struct Bound {
    pub params: Vec<(ParamSpec, Tensor)>,
    pub notes: Vec<Diagnostic>,
}

impl Bound {
    /// Zero parameters for every key the graph needs: kernels depend on shapes, not values, so listings
    /// and programs made only to be looked at bind these.
    pub fn zeros(graph: &Graph) -> Bound {
        Bound { params: graph.params().into_iter().map(|s| (s.clone(), Tensor::zeros(s.shape.clone()))).collect(), notes: vec![] }
    }
}

/// Reads every parameter the graph needs, checking keys and shapes; reports all problems at once.
pub fn bind(graph: &Graph, w: &Weights) -> Result<Bound, Vec<Diagnostic>> {
    let specs = graph.params();
    if w.is_init() {
        let params = specs.into_iter().map(|s| (init_param(&s), s)).map(|(t, s)| (s, t)).collect();
        return Ok(Bound { params, notes: vec![] });
    }
    let keys = w.keys();
    let prefix = common_prefix(&specs, &keys);
    let (mut params, mut errors, mut notes) = (Vec::new(), Vec::new(), Vec::new());
    if !prefix.is_empty() {
        notes.push(Diagnostic::note_level(format!("`{}` stores the model's parameters under `{prefix}`; using them", w.path)));
    }
    // Read and checked on every core, in the order of the specs.
    let known: std::collections::HashSet<&String> = keys.iter().collect();
    let read = cnnc_runtime::par::map(&specs, |spec| {
        let key = format!("{prefix}{}", spec.key);
        if !known.contains(&key) {
            return Err(missing(&w.path, spec, &keys));
        }
        match w.read(&key, Some(&spec.shape)) {
            Ok((shape, data)) if shape == spec.shape => match impossible(&key, &data) {
                Some(why) => {
                    let d = Diagnostic::error(format!("parameter `{key}` in `{}` {why}", w.path));
                    Err(match spec.decl {
                        Some(decl) => d.label(decl, "the link that reads it").note("the file is damaged, or the training that wrote it diverged"),
                        None => d.note("the file is damaged, or the training that wrote it diverged"),
                    })
                }
                None => Ok(Tensor::new(shape, data).expect("npy shape matches data")),
            },
            Ok((shape, _)) => {
                let mut d = Diagnostic::error(format!("parameter `{key}` has shape {shape:?} in `{}`, but the model needs {:?}", w.path, spec.shape));
                if let Some(decl) = spec.decl {
                    d = d.label(decl, format!("this link needs {key} of shape {:?}", spec.shape));
                }
                Err(d)
            }
            Err(e) => Err(e.diagnostic()),
        }
    });
    for (spec, r) in specs.into_iter().zip(read) {
        match r {
            Ok(t) => params.push((spec, t)),
            Err(d) => errors.push(d),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let used: std::collections::HashSet<String> = params.iter().map(|(s, _)| format!("{prefix}{}", s.key)).collect();
    let (counters, mut unused): (Vec<&String>, Vec<&String>) = keys.iter().filter(|k| !used.contains(*k)).partition(|k| k.ends_with("/N"));
    unused.sort();
    if !unused.is_empty() {
        let shown: Vec<&str> = unused.iter().take(8).map(|s| s.as_str()).collect();
        let more = if unused.len() > shown.len() { format!(" and {} more", unused.len() - shown.len()) } else { String::new() };
        notes.push(Diagnostic::note_level(format!(
            "{} key(s) in `{}` are not used by the model and are ignored: {}{more}",
            unused.len(),
            w.path,
            shown.join(", ")
        )));
    }
    if !counters.is_empty() {
        notes.push(Diagnostic::note_level(format!(
            "{} BatchNormalization sample counter(s) (`.../N`) in `{}` are ignored: inference uses avg_mean and avg_var",
            counters.len(),
            w.path
        )));
    }
    Ok(Bound { params, notes })
}

/// Why the values of parameter `key` cannot be right, if they cannot: NaN or infinite values (every
/// output they reach would be NaN), or a BatchNormalization variance below zero (its square root is NaN).
fn impossible(key: &str, data: &[f32]) -> Option<String> {
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        let n = data.iter().filter(|v| !v.is_finite()).count();
        return Some(format!("holds {n} non-finite value{} ({} at index {i})", if n == 1 { "" } else { "s" }, data[i]));
    }
    let i = data.iter().position(|&v| v < 0.0).filter(|_| key.ends_with("/avg_var"))?;
    Some(format!("is a variance but holds a negative value ({} at index {i})", data[i]))
}

/// A prefix such as `predictor/` (a Chainer `Classifier`) under which the file stores every key, if the
/// keys are not found as they are.
fn common_prefix(specs: &[ParamSpec], keys: &[String]) -> String {
    let Some(first) = specs.first() else { return String::new() };
    if keys.contains(&first.key) {
        return String::new();
    }
    let candidates: Vec<&str> = keys.iter().filter_map(|k| k.strip_suffix(&first.key)).filter(|p| p.ends_with('/')).collect();
    match candidates.as_slice() {
        [p] if specs.iter().all(|s| keys.contains(&format!("{p}{}", s.key))) => p.to_string(),
        _ => String::new(),
    }
}

fn missing(path: &str, spec: &ParamSpec, keys: &[String]) -> Diagnostic {
    let mut d = Diagnostic::error(format!("`{path}` has no parameter `{}` (shape {:?})", spec.key, spec.shape));
    if let Some(decl) = spec.decl {
        d = d.label(decl, format!("this link needs `{}`", spec.key));
    }
    let link = spec.key.rsplit_once('/').map_or("", |(l, _)| l);
    let siblings: Vec<&str> = keys.iter().filter(|k| k.rsplit_once('/').is_some_and(|(l, _)| l == link)).map(String::as_str).collect();
    if !siblings.is_empty() {
        d.note(format!("the file has under `{link}/`: {}", siblings.join(", ")))
    } else if keys.is_empty() {
        d.note("the file holds no arrays")
    } else {
        let mut sample: Vec<&str> = keys.iter().take(6).map(String::as_str).collect();
        sample.sort();
        d.note(format!("the file has {} keys, e.g. {}", keys.len(), sample.join(", ")))
    }
}

/// Writes `arrays` as a Chainer `save_npz` file (one float32 `.npy` per key, stored uncompressed as
/// `save_npz` does by default) or, with
/// `safetensors`, as a safetensors file; keys in sorted order, so the bytes are reproducible.
pub fn write(w: &mut dyn std::io::Write, arrays: &HashMap<String, Array>, safetensors: bool) -> std::io::Result<()> {
    use npyz::WriterBuilder;
    let mut keys: Vec<&String> = arrays.keys().collect();
    keys.sort();
    if safetensors {
        let bytes: Vec<Vec<u8>> = keys.iter().map(|k| arrays[*k].1.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let views = keys.iter().zip(&bytes).map(|(k, b)| Ok((*k, safetensors::tensor::TensorView::new(safetensors::Dtype::F32, arrays[*k].0.clone(), b)?)));
        let views: Vec<_> = views.collect::<Result<_, safetensors::SafeTensorError>>().map_err(std::io::Error::other)?;
        return w.write_all(&safetensors::serialize(views, None).map_err(std::io::Error::other)?);
    }
    let mut zip = npyz::npz::NpzWriter::new(Cursor::new(Vec::new()));
    for k in keys {
        let (shape, data) = &arrays[k];
        let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let stored = npyz::zip::write::FileOptions::default().compression_method(npyz::zip::CompressionMethod::Stored);
        let mut npy = zip.array::<f32>(k, stored)?.default_dtype().shape(&shape).begin_nd()?;
        npy.extend(data.iter().copied())?;
        npy.finish()?;
    }
    w.write_all(&zip.zip_writer().finish().map_err(std::io::Error::other)?.into_inner())
}

#[cfg(test)]
mod tests {
    /// Found by the `weights` fuzz target: a member whose local header lies past the end of the bytes
    /// sent the in-memory reader's cursor beyond them (a slice panic). Both readers must answer with errors.
    #[test]
    fn a_member_past_the_end_is_an_error() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fuzz/weights-member-past-end.npz");
        let bytes = std::fs::read(&path).expect("fixture");
        for w in [super::Weights::from_bytes("m.npz".into(), bytes).expect("a zip"), super::Weights::open(&path).expect("a zip")] {
            let keys = w.keys();
            assert!(!keys.is_empty());
            for key in keys {
                assert!(w.read(&key, None).is_err(), "{key}");
            }
        }
    }
}
