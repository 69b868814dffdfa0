//! Weights: Chainer `save_npz` files and safetensors files → parameters bound to a graph.
//!
//! Keys are Chainer's (`conv1/W`, `bn1/avg_mean`, `res2/0/conv1/W`). Binding checks every key and shape the
//! graph needs and reports all problems at once, pointing at the link declarations; keys the model does not
//! use (`bn1/N`, auxiliary heads) are listed in a note. Without a file, [`init`] initialises like Chainer
//! (LeCunNormal W, zero biases, BN γ=1 β=0 mean 0 var 1) from a fixed seed.

use crate::diag::Diagnostic;
use crate::ir::{Graph, ParamSpec};
use cnnc_runtime::{rng, Backing, Shared, Tensor};
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
    /// A zip of `.npy` members (its central directory read once), whose members are read in place from
    /// the file's bytes, each reader with its own cursor: threads decode members side by side.
    Npz(zip::ZipArchive<At>, Arc<Bytes>),
    /// A safetensors file's bytes, its header parsed once and the length of that header.
    Safetensors(Arc<Bytes>, safetensors::tensor::Metadata, usize),
    /// Deterministic initialisation (no file).
    Init,
    /// Arrays already in memory (an imported ONNX model's), each handed over when read.
    Memory(std::sync::Mutex<HashMap<String, Array>>),
}

/// A weights file's bytes: memory-mapped where the file can be, so that arrays stored as they are
/// used (float32, little-endian, C order, aligned: safetensors, and stored npz members that happen
/// to be aligned) become tensors over the file's own pages, neither copied nor given fresh memory,
/// which costs more than the copy itself on start-up (the pages are the page cache's). Mapping has
/// one hazard: a file truncated by another process while cnnc reads it ends the process (SIGBUS).
enum Bytes {
    Mapped(memmap2::Mmap),
    Memory(Vec<u8>),
}

impl Backing for Bytes {
    fn bytes(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Memory(b) => b,
        }
    }

    fn release(&self, range: std::ops::Range<usize>) {
        if let Bytes::Mapped(m) = self {
            // SAFETY: the map is read-only, so its dropped pages come back from the file unchanged
            // when touched. Failing only leaves them resident.
            let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len()) };
        }
    }
}

/// A cursor over a weights file's bytes; clones share them.
#[derive(Clone)]
struct At {
    bytes: Arc<Bytes>,
    pos: u64,
}

impl std::io::Read for At {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // A seek may have gone past the end (a zip's offsets are the file's word).
        let rest = usize::try_from(self.pos).ok().and_then(|p| self.bytes.bytes().get(p..)).unwrap_or_default();
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        // Members are read front to back, into arrays of their own: the pages behind the cursor
        // leave the resident set by whole MiBs, so a large member is not held twice.
        const MIB: u64 = 1 << 20;
        let behind = self.pos / MIB * MIB..(self.pos + n as u64) / MIB * MIB;
        if !behind.is_empty() {
            self.bytes.release(behind.start as usize..behind.end as usize);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for At {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            std::io::SeekFrom::Start(p) => Some(p),
            std::io::SeekFrom::End(d) => (self.bytes.bytes().len() as u64).checked_add_signed(d),
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
    /// telling them apart by content. The file is mapped, not read: arrays are decoded when asked for.
    pub fn open(path: &Path) -> Result<Weights, WeightError> {
        let io = |source| WeightError::Io { path: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; see `Bytes` for a file truncated meanwhile.
        let bytes = match unsafe { memmap2::Mmap::map(&file) } {
            Ok(m) => Bytes::Mapped(m),
            // Not every file maps (an empty one, a pipe): those are read.
            Err(_) => Bytes::Memory(read_within_memory(path).map_err(io)?),
        };
        Weights::new(path.display().to_string(), bytes)
    }

    /// The weights file `bytes`, named `p` in messages.
    pub fn from_bytes(p: String, bytes: Vec<u8>) -> Result<Weights, WeightError> {
        Weights::new(p, Bytes::Memory(bytes))
    }

    fn new(p: String, bytes: Bytes) -> Result<Weights, WeightError> {
        let bytes = Arc::new(bytes);
        let all = bytes.bytes();
        let corrupt = |format, reason: String| WeightError::Corrupt { path: p.clone(), format, reason };
        let store = if is_zip(all) {
            let zip = zip::ZipArchive::new(At { bytes: bytes.clone(), pos: 0 }).map_err(|e| corrupt("npz", e.to_string()))?;
            Store::Npz(zip, bytes)
        } else if all.len() >= 9 && all[8] == b'{' {
            let (n, meta) = safetensors::SafeTensors::read_metadata(all).map_err(|e| corrupt("safetensors", e.to_string()))?;
            Store::Safetensors(bytes, meta, n)
        } else {
            return Err(WeightError::UnknownFormat { path: p });
        };
        Ok(Weights { path: p, store })
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
            Store::Npz(z, _) => z.file_names().filter_map(|f| f.strip_suffix(".npy")).map(str::to_string).collect(),
            Store::Safetensors(_, meta, _) => meta.offset_keys(),
            Store::Init => vec![],
            Store::Memory(m) => m.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect(),
        }
    }

    /// The array under `key`, converted to f32. Several threads may read different keys at once; an
    /// array held in memory is moved out, so each key is read once. With `want`, an array of another
    /// shape comes back as its shape alone (`None` for the values), unread: a file cannot make cnnc
    /// hold more than the model needs (binding reads every member at once, on every core).
    pub fn read(&self, key: &str, want: Option<&[usize]>) -> Result<(Vec<usize>, Option<Tensor>), WeightError> {
        let corrupt = |format, reason: String| WeightError::Corrupt { path: self.path.clone(), format, reason: format!("array `{key}`: {reason}") };
        let dtype = |dtype: String| WeightError::Dtype { path: self.path.clone(), key: key.into(), dtype };
        match &self.store {
            Store::Npz(z, bytes) => {
                use std::io::Read;
                let (mut z, name) = (z.clone(), format!("{key}.npy"));
                let corrupt = |reason: String| corrupt("npz", reason);
                let mut head = Vec::new();
                let member = z.by_name(&name).map_err(|e| corrupt(e.to_string()))?;
                // The member's bytes in the file, and its checksum if they are the data itself.
                let span = usize::try_from(member.data_start()).ok().zip(usize::try_from(member.compressed_size()).ok());
                let stored = (member.compression() == zip::CompressionMethod::Stored && member.size() == member.compressed_size()).then(|| member.crc32());
                member.take(HEADER_SCAN).read_to_end(&mut head).map_err(|e| corrupt(e.to_string()))?;
                check_npy_header(&head).map_err(corrupt)?;
                let npy = npyz::NpyFile::new(z.by_name(&name).map_err(|e| corrupt(e.to_string()))?).map_err(|e| corrupt(e.to_string()))?;
                let member = span.and_then(|(start, len)| Some((start, bytes.bytes().get(start..start.checked_add(len)?)?)));
                if let (Some(crc), Some(member)) = (stored, member) {
                    if let Some(t) = in_place(&npy, &head, bytes, member, crc, want).map_err(corrupt)? {
                        return Ok((t.shape().to_vec(), Some(t)));
                    }
                }
                let read = read_npy(npy, want);
                // Decoded or copied: the member's pages of the file are not needed again.
                if let Some((start, member)) = member {
                    bytes.release(start..start + member.len());
                }
                let (shape, data) = read.map_err(|e| match e {
                    NpyError::Dtype(d) => dtype(d),
                    NpyError::Bad(reason) => corrupt(reason),
                })?;
                Ok(values(shape, data, want))
            }
            Store::Safetensors(bytes, meta, n) => {
                let corrupt = |reason: String| corrupt("safetensors", reason);
                let info = meta.info(key).ok_or_else(|| corrupt("not in the file".into()))?;
                let ty = match info.dtype {
                    safetensors::Dtype::F16 => Float::F16,
                    safetensors::Dtype::BF16 => Float::Bf16,
                    safetensors::Dtype::F32 => Float::F32,
                    safetensors::Dtype::F64 => Float::F64,
                    d => return Err(dtype(format!("{d:?}"))),
                };
                if unwanted(want, &info.shape) {
                    return Ok((info.shape.clone(), None));
                }
                // Offsets and sizes were checked against the file when its header was read.
                let start = 8 + n + info.data_offsets.0;
                let raw = &bytes.bytes()[start..8 + n + info.data_offsets.1];
                let shared = matches!(ty, Float::F32).then(|| Shared::new(bytes.clone(), start, raw.len() / 4)).flatten();
                let t = match shared {
                    Some(s) => Tensor::shared(info.shape.clone(), s),
                    None => Tensor::new(info.shape.clone(), ty.decode(raw, true)),
                };
                Ok((info.shape.clone(), Some(t.map_err(|e| corrupt(e.to_string()))?)))
            }
            Store::Memory(m) => {
                let (shape, data) = m.lock().unwrap_or_else(|e| e.into_inner()).remove(key).ok_or_else(|| corrupt("arrays", "missing".into()))?;
                Ok(values(shape, data, want))
            }
            Store::Init => unreachable!("initialised weights are not read"),
        }
    }
}

/// Whether an array of `shape` is not the one wanted, and so is not read.
fn unwanted(want: Option<&[usize]>, shape: &[usize]) -> bool {
    want.is_some_and(|w| w != shape)
}

/// An array read whole, or its shape alone where it is not the one wanted.
fn values(shape: Vec<usize>, data: Vec<f32>, want: Option<&[usize]>) -> (Vec<usize>, Option<Tensor>) {
    if unwanted(want, &shape) {
        return (shape, None);
    }
    let t = Tensor::new(shape.clone(), data).expect("read_npy reads one value per element");
    (shape, Some(t))
}

/// The array of a stored (uncompressed) npy member, `member` at byte `start` of `bytes`, as a tensor
/// over the file's bytes, where it holds little-endian float32 in C order at an offset an f32 slice may
/// start at; `None` otherwise (it is then read and converted). The member's checksum `crc` is checked
/// here, as reading the member to its end would have.
fn in_place<R: std::io::Read>(
    npy: &npyz::NpyFile<R>,
    head: &[u8],
    bytes: &Arc<Bytes>,
    (start, member): (usize, &[u8]),
    crc: u32,
    want: Option<&[usize]>,
) -> Result<Option<Tensor>, String> {
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    // Another shape than wanted is read_npy's to report (an impossible one as too large).
    if unwanted(want, &shape) || npy.dtype().descr().trim_matches('\'') != "<f4" || npy.order() != npyz::Order::C {
        return Ok(None);
    }
    // The npy header's length follows its magic and version: 2 bytes in version 1, 4 after.
    let data = match head.get(6..12) {
        Some([1, _, a, b, ..]) => 10 + u16::from_le_bytes([*a, *b]) as usize,
        Some([_, _, a, b, c, d]) => 12 + u32::from_le_bytes([*a, *b, *c, *d]) as usize,
        _ => return Ok(None),
    };
    // The header's shape is untrusted: its byte count must not overflow, and must be what follows it.
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n.and_then(|n| n.checked_mul(4)?.checked_add(data)) != Some(member.len()) {
        return Ok(None);
    }
    let Some(shared) = Shared::new(bytes.clone(), start + data, (member.len() - data) / 4) else { return Ok(None) };
    if crc32fast::hash(member) != crc {
        return Err("its checksum does not match its bytes (the file is damaged)".into());
    }
    Tensor::shared(shape, shared).map(Some).map_err(|e| e.to_string())
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
    if unwanted(want, &shape) {
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
            Ok((_, Some(t))) => match impossible(&key, t.data()) {
                Some(why) => {
                    let d = Diagnostic::error(format!("parameter `{key}` in `{}` {why}", w.path));
                    Err(match spec.decl {
                        Some(decl) => d.label(decl, "the link that reads it").note("the file is damaged, or the training that wrote it diverged"),
                        None => d.note("the file is damaged, or the training that wrote it diverged"),
                    })
                }
                None => {
                    // Checked: a mapped array's pages go until packing reads them, so that the
                    // whole file is not resident beside the packed weights.
                    t.release();
                    Ok(t)
                }
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
    // Chunks folded without an early exit vectorize; only a bad file is searched element by element.
    let all = |ok: fn(f32) -> bool| data.chunks(4096).all(|c| c.iter().fold(true, |all, &v| all & ok(v)));
    if all(f32::is_finite) && (!key.ends_with("/avg_var") || all(|v| v >= 0.0)) {
        return None;
    }
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
/// `save_npz` does by default, each member's data 64-byte aligned in the file, so that cnnc reads it
/// in place) or, with `safetensors`, as a safetensors file; keys in sorted order, so the bytes are
/// reproducible.
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
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for k in keys {
        let (shape, data) = &arrays[k];
        let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        // An npy header pads the data to a multiple of 64 bytes from the member's start.
        let stored = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file_aligned(format!("{k}.npy"), stored, 64).map_err(std::io::Error::other)?;
        let mut npy = npyz::WriteOptions::new().default_dtype().shape(&shape).writer(&mut zip).begin_nd()?;
        npy.extend(data.iter().copied())?;
        npy.finish()?;
    }
    w.write_all(&zip.finish().map_err(std::io::Error::other)?.into_inner())
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

    /// A file written under a unique name in the temporary folder, removed when dropped.
    struct Temp(std::path::PathBuf);

    impl Temp {
        fn new(name: &str, bytes: &[u8]) -> Temp {
            let path = std::env::temp_dir().join(format!("cnnc-{}-{name}", std::process::id()));
            std::fs::write(&path, bytes).expect("temporary file");
            Temp(path)
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn arrays() -> std::collections::HashMap<String, super::Array> {
        let values = |n: usize, k: f32| (0..n).map(|i| i as f32 * k - 1.5).collect::<Vec<f32>>();
        [("conv/W".to_string(), (vec![3, 8192], values(3 * 8192, 0.25))), ("fc/b".to_string(), (vec![5], values(5, -3.0)))].into()
    }

    /// `(key, whether its values are the file's own pages)` for every array, checked against `arrays()`.
    fn read_all(w: &super::Weights) -> Vec<(String, bool)> {
        let mut keys = w.keys();
        keys.sort();
        let want = arrays();
        let read = |k: &String| w.read(k, None).map(|(shape, t)| (shape, t.expect("no shape asked for")));
        keys.iter()
            .map(|k| (k, read(k).expect("readable")))
            .inspect(|(k, (shape, t))| assert_eq!((shape, t.data()), (&want[*k].0, &want[*k].1[..]), "{k}"))
            .map(|(k, (_, t))| (k.clone(), t.into_owned().is_none()))
            .collect()
    }

    /// cnnc's own npz (members aligned) and safetensors files are read in place from the mapped file:
    /// the same values, no copy.
    #[test]
    fn aligned_float32_arrays_are_read_in_place() {
        for safetensors in [false, true] {
            let mut bytes = vec![];
            super::write(&mut bytes, &arrays(), safetensors).expect("written");
            let file = Temp::new(if safetensors { "w.safetensors" } else { "w.npz" }, &bytes);
            let all: Vec<(String, bool)> = read_all(&super::Weights::open(&file.0).expect("opens"));
            assert_eq!(all, [("conv/W".to_string(), true), ("fc/b".to_string(), true)], "safetensors: {safetensors}");
            // The same bytes in memory (the Python package's `bytes`) give the same values.
            read_all(&super::Weights::from_bytes("w".into(), bytes).expect("opens"));
        }
    }

    /// An npz whose stored member `key` starts its data `shift` bytes past a multiple of 4 (as
    /// `np.savez` may write it), with or without a damaged value.
    fn npz(key: &str, damaged: bool) -> Vec<u8> {
        use npyz::WriterBuilder;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let (shape, data) = &arrays()[key];
        zip.start_file(format!("{key}.npy"), zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored)).expect("member");
        let mut npy =
            npyz::WriteOptions::new().default_dtype().shape(&shape.iter().map(|&d| d as u64).collect::<Vec<_>>()).writer(&mut zip).begin_nd().expect("npy");
        npy.extend(data.iter().copied()).expect("values");
        npy.finish().expect("npy");
        let mut bytes = zip.finish().expect("zip").into_inner();
        if damaged {
            let at = bytes.windows(4).position(|w| w == data[1].to_le_bytes()).expect("the second value");
            bytes[at] ^= 1;
        }
        bytes
    }

    /// A stored member at an offset no f32 slice may start at is copied out, with the same values; a
    /// damaged member is an error naming its checksum, read in place or copied (conv/W is larger than
    /// the header scan, which reads a small member to its end and so checks it on the way).
    #[test]
    fn stored_members_anywhere_are_read_and_checked() {
        // "conv/W.npy" puts the data at 30 + 10 + 128 bytes (aligned), "fc/b.npy" at 30 + 8 + 128 (not).
        for (key, in_place) in [("conv/W", true), ("fc/b", false)] {
            let file = Temp::new("one.npz", &npz(key, false));
            let w = super::Weights::open(&file.0).expect("opens");
            assert_eq!(read_all(&w), [(key.to_string(), in_place)]);
            let file = Temp::new("damaged.npz", &npz(key, true));
            let err = super::Weights::open(&file.0).expect("opens").read(key, None).expect_err("a damaged member").to_string();
            assert!(err.to_lowercase().contains("checksum") && err.contains(key), "{key}: {err}");
        }
    }

    /// A stored member whose header declares 2^62 float32 values and holds none: its byte count
    /// overflows (in a build with overflow checks, as the fuzz targets', the in-place check panicked).
    #[test]
    fn a_stored_member_of_an_impossible_shape_is_too_large() {
        let text = "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }";
        let mut npy = b"\x93NUMPY\x01\x00".to_vec();
        let header = format!("{text:<117}\n");
        npy.extend((header.len() as u16).to_le_bytes());
        npy.extend(header.bytes());
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        zip.start_file("w.npy", zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored)).expect("member");
        std::io::Write::write_all(&mut zip, &npy).expect("written");
        let w = super::Weights::from_bytes("w.npz".into(), zip.finish().expect("zip").into_inner()).expect("a zip");
        let err = w.read("w", None).expect_err("no such array").to_string();
        assert!(err.contains("too large"), "{err}");
    }
}
