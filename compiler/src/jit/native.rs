//! The native routines the JIT calls for a [`Stmt::Call`](crate::kernel::Stmt::Call) on the assembled
//! tiers: Cranelift's vectors are four lanes wide; these are Rust compiled for AVX-512 and for AVX2.
//! Pooling: plain code whose fixed-width chunks LLVM turns into 16- or 8-lane vectors. Transposes:
//! 16 × 16 blocks of AVX-512 intrinsics.
//! Invariant left: the values of the loops the portable tier builds for the same call, rounding for
//! rounding. Pooling keeps `kernel::pool::pool`'s separable order (a row reduction over ky from the
//! identity, then a window of kw cells in kx order, then the divisor) and the JIT's max (the later
//! operand between equal values, so between zeros of both signs; a NaN operand gives a NaN); the
//! transpose adds the residual, then applies the JIT's ReLU (`a < 0 ? 0 : a`).

use crate::kernel::{row_cells, PoolGeo, TransposeGeo};

/// The reduction of a pooling: its identity (what padding reads) and its operation.
trait Reduce {
    const INIT: f32;
    fn red(a: f32, b: f32) -> f32;
}

struct Max;
struct Sum;

impl Reduce for Max {
    const INIT: f32 = f32::NEG_INFINITY;
    #[inline(always)]
    fn red(a: f32, b: f32) -> f32 {
        // The JIT's `max` (`Gen::max`): b unless b < a (so b between equal zeros), a where a is NaN.
        let m = if b < a { a } else { b };
        if a.is_nan() {
            a
        } else {
            m
        }
    }
}

impl Reduce for Sum {
    const INIT: f32 = 0.0;
    #[inline(always)]
    fn red(a: f32, b: f32) -> f32 {
        a + b
    }
}

/// What a window's reduction becomes: itself (max), divided by the window's size or by its cell
/// count from the `counts` table.
#[derive(Clone, Copy)]
enum Finish {
    Keep,
    Div(f32),
    Counts(*const f32),
}

/// N lanes from `p` (by value: arrays passed and returned whole stay in vector registers, where a
/// closure's borrow of one kept it on the stack, lane by lane).
#[inline(always)]
unsafe fn load<const N: usize>(p: *const f32) -> [f32; N] {
    std::array::from_fn(|l| *p.add(l))
}

#[inline(always)]
unsafe fn store<const N: usize>(p: *mut f32, v: [f32; N]) {
    (0..N).for_each(|l| *p.add(l) = v[l]);
}

#[inline(always)]
fn reduce<R: Reduce, const N: usize>(a: [f32; N], b: [f32; N]) -> [f32; N] {
    std::array::from_fn(|l| R::red(a[l], b[l]))
}

/// A [`PoolGeo`] in `usize`s, with the width of a row of reductions: `pw` identity cells, the row, and
/// as many more as the last window needs.
struct Geo {
    kernel: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 2],
    h: usize,
    w: usize,
    pitch: usize,
    oh: usize,
    ow: usize,
    width: usize,
}

/// The chunk width for `n` elements: the widest of 16, 8, 4 and 1 lanes that fits.
fn lanes(n: usize) -> usize {
    [16, 8, 4].into_iter().find(|&l| l <= n).unwrap_or(1)
}

/// The starts of chunks of N covering `0..n` (N ≤ n), the last one ending at n (overlapping the one
/// before, which computes some elements twice, identically). Loops over them, not closures: a closure
/// is code of its own, without the target features of the function it is written in.
#[inline(always)]
fn chunk_starts<const N: usize>(n: usize) -> impl Iterator<Item = usize> {
    let full = n / N * N;
    (0..full).step_by(N).chain((full < n).then(|| n - N))
}

/// One plane's row reductions into `cells`: row oy's cell pw + ix reduces column ix of the input rows
/// its windows span, from the identity in ky order, N columns at a time. `K`, where not 0, is the
/// window's height: full windows take the unrolled loop.
#[inline(always)]
unsafe fn plane_rows<R: Reduce, const N: usize, const K: usize>(g: &Geo, x: *const f32, cells: *mut f32) {
    let ([kh, _], [sh, _], [ph, pw]) = (g.kernel, g.stride, g.pad);
    for oy in 0..g.oh {
        let start = (oy * sh) as i64 - ph as i64;
        let [ylo, yhi] = [start.max(0) as usize, (start + kh as i64).clamp(0, g.h as i64) as usize];
        let row = cells.add(oy * g.width + pw);
        for ix in chunk_starts::<N>(g.w) {
            let (x, mut acc) = (x.add(ix), [R::INIT; N]);
            if K != 0 && yhi == ylo + K {
                for t in 0..K {
                    acc = reduce::<R, N>(acc, load(x.add((ylo + t) * g.pitch)));
                }
            } else {
                for iy in ylo..yhi {
                    acc = reduce::<R, N>(acc, load(x.add(iy * g.pitch)));
                }
            }
            store(row.add(ix), acc)
        }
    }
}

/// Cells kx of the windows of outputs ox..ox + N in `row` (see [`plane_windows`]).
#[inline(always)]
unsafe fn tap<const N: usize, const S: usize>(row: *const f32, ox: usize, kx: usize, stride: usize) -> [f32; N] {
    match S {
        1 => load(row.add(ox + kx)),
        2 => {
            let (a, b): ([f32; N], [f32; N]) = (load(row.add(2 * ox + kx)), load(row.add(2 * ox + kx + N)));
            std::array::from_fn(|l| if 2 * l < N { a[2 * l] } else { b[2 * l - N] })
        }
        _ => std::array::from_fn(|l| *row.add((ox + l) * stride + kx)),
    }
}

/// One plane's outputs from its row reductions `cells`: output (oy, ox) reduces the kw cells from
/// ox·stride of row oy in kx order, finished (divided for an average) and stored, N outputs at a time.
/// `S` is the stride where it is 1 or 2 (contiguous loads, or the even lanes of two), else 0 (then
/// N = 1); `K`, where not 0, is kw.
#[inline(always)]
unsafe fn plane_windows<R: Reduce, const N: usize, const S: usize, const K: usize>(g: &Geo, cells: *const f32, finish: Finish, y: *mut f32) {
    let ([_, kw], [_, stride]) = (g.kernel, g.stride);
    let kw = if K != 0 { K } else { kw };
    for oy in 0..g.oh {
        let (row, at) = (cells.add(oy * g.width), oy * g.ow);
        for ox in chunk_starts::<N>(g.ow) {
            let mut v = tap::<N, S>(row, ox, 0, stride);
            for kx in 1..kw {
                v = reduce::<R, N>(v, tap::<N, S>(row, ox, kx, stride));
            }
            let v = match finish {
                Finish::Keep => v,
                Finish::Div(d) => v.map(|v| v / d),
                Finish::Counts(c) => {
                    let c: [f32; N] = load(c.add(at + ox));
                    std::array::from_fn(|l| v[l] / c[l])
                }
            };
            store(y.add(at + ox), v)
        }
    }
}

/// Planes `lo..hi` of `x` pooled into `y` (see [`PoolGeo`]); `K`, where not 0, is the (square) window's side.
#[inline(always)]
unsafe fn planes<R: Reduce, const K: usize>(g: &PoolGeo, x: *const f32, y: *mut f32, finish: Finish, [lo, hi]: [usize; 2]) {
    let u = |v: i64| v as usize;
    let [h, w, pitch, oh, ow] = [g.h, g.w, g.pitch, g.oh, g.ow].map(u);
    let ([kh, kw], [sh, sw], [ph, pw]) = (g.kernel.map(u), g.stride.map(u), g.pad.map(u));
    let width = row_cells([pw, sw, kw], w, ow);
    let g = Geo { kernel: [kh, kw], stride: [sh, sw], pad: [ph, pw], h, w, pitch, oh, ow, width };
    // Row reductions for two planes (and 32 cells that only lanes a stride-2 window skips read): a
    // plane's windows are taken after the next plane's rows, when their stores have left the store
    // buffer (a load that spans two stores still there waits for both, which cost more than pooling).
    // On the stack where they fit: no allocation per call for the usual planes.
    let size = oh * width + 32;
    let mut stack = [std::mem::MaybeUninit::<f32>::uninit(); 4096];
    let mut heap = vec![];
    let base = match 2 * size <= stack.len() {
        true => {
            stack[..2 * size].iter_mut().for_each(|c| _ = c.write(R::INIT));
            stack.as_mut_ptr().cast::<f32>()
        }
        false => {
            heap = vec![R::INIT; 2 * size];
            heap.as_mut_ptr()
        }
    };
    let cells = |plane: usize| base.add(plane % 2 * size);
    let (row_lanes, window_lanes) = (lanes(w), if sw <= 2 { lanes(ow) } else { 1 });
    for plane in lo..hi + 1 {
        if plane < hi {
            let (x, c) = (x.add(plane * h * pitch), cells(plane));
            match row_lanes {
                16 => plane_rows::<R, 16, K>(&g, x, c),
                8 => plane_rows::<R, 8, K>(&g, x, c),
                4 => plane_rows::<R, 4, K>(&g, x, c),
                _ => plane_rows::<R, 1, K>(&g, x, c),
            }
        }
        if plane > lo {
            let (c, y) = (cells(plane - 1), y.add((plane - 1) * oh * ow));
            match (window_lanes, sw) {
                (16, 1) => plane_windows::<R, 16, 1, K>(&g, c, finish, y),
                (16, _) => plane_windows::<R, 16, 2, K>(&g, c, finish, y),
                (8, 1) => plane_windows::<R, 8, 1, K>(&g, c, finish, y),
                (8, _) => plane_windows::<R, 8, 2, K>(&g, c, finish, y),
                (4, 1) => plane_windows::<R, 4, 1, K>(&g, c, finish, y),
                (4, _) => plane_windows::<R, 4, 2, K>(&g, c, finish, y),
                _ => plane_windows::<R, 1, 0, K>(&g, c, finish, y),
            }
        }
    }
}

#[inline(always)]
unsafe fn pool(g: &PoolGeo, x: *const f32, y: *mut f32, counts: *const f32, lo: i64, hi: i64) {
    let range = [lo as usize, hi.max(lo) as usize];
    let finish = match g.kind {
        PoolGeo::MAX => Finish::Keep,
        PoolGeo::AVG => Finish::Div((g.kernel[0] * g.kernel[1]) as f32),
        _ => Finish::Counts(counts),
    };
    // 3×3 windows (nearly all of them) with their taps unrolled.
    match (g.kind == PoolGeo::MAX, g.kernel == [3, 3]) {
        (true, true) => planes::<Max, 3>(g, x, y, finish, range),
        (true, false) => planes::<Max, 0>(g, x, y, finish, range),
        (false, true) => planes::<Sum, 3>(g, x, y, finish, range),
        (false, false) => planes::<Sum, 0>(g, x, y, finish, range),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pool_avx512(g: &PoolGeo, x: *const f32, y: *mut f32, counts: *const f32, lo: i64, hi: i64) {
    pool(g, x, y, counts, lo, hi)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pool_avx2(g: &PoolGeo, x: *const f32, y: *mut f32, counts: *const f32, lo: i64, hi: i64) {
    pool(g, x, y, counts, lo, hi)
}

/// The AVX-512 tier's routine: planes `lo..hi` of `x` (element 0) into `y`; `counts` for
/// [`PoolGeo::AVG_COUNTS`], else unused.
///
/// # Safety
/// `geo` describes buffers `x`, `y` and `counts` hold for planes `lo..hi`, on a CPU with AVX-512
/// (F: the tier's check).
pub unsafe extern "C" fn cnnc_pool_avx512(geo: *const PoolGeo, x: *const f32, y: *mut f32, counts: *const f32, lo: i64, hi: i64) {
    #[cfg(target_arch = "x86_64")]
    pool_avx512(&*geo, x, y, counts, lo, hi)
}

/// The AVX2 tier's routine, as [`cnnc_pool_avx512`].
///
/// # Safety
/// As [`cnnc_pool_avx512`], on a CPU with AVX2 and FMA.
pub unsafe extern "C" fn cnnc_pool_avx2(geo: *const PoolGeo, x: *const f32, y: *mut f32, counts: *const f32, lo: i64, hi: i64) {
    #[cfg(target_arch = "x86_64")]
    pool_avx2(&*geo, x, y, counts, lo, hi)
}

/// Items `lo..hi` of a [`TransposeGeo`] (item: image, 16 channels) from `yt` into `y`, adding
/// `residual` (laid out as `y`; null: none) and then, with `relu`, ReLU: 16 pixels at a time, the last
/// block's missing pixels masked off.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_avx512(g: &TransposeGeo, yt: *const f32, y: *mut f32, residual: *const f32, lo: i64, hi: i64) {
    use std::arch::x86_64::*;
    let [p, co] = [g.p, g.co].map(|v| v as usize);
    let groups = co / 16;
    for item in lo as usize..hi.max(lo) as usize {
        let (img, f0) = (item / groups, item % groups * 16);
        let (from, to) = (yt.add(img * p * co + f0), img * co * p + f0 * p);
        for pix in (0..p).step_by(16) {
            let n = (p - pix).min(16);
            let mask: __mmask16 = ((1u32 << n) - 1) as u16;
            // Row i: pixel pix + i's 16 channels (zeros past the last pixel).
            let r: [__m512; 16] = std::array::from_fn(|i| if i < n { _mm512_loadu_ps(from.add((pix + i) * co)) } else { _mm512_setzero_ps() });
            for (j, mut v) in transpose16(r).into_iter().enumerate() {
                let at = to + j * p + pix;
                if !residual.is_null() {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, residual.add(at)));
                    if g.relu != 0 {
                        // maxps(0, v) is v unless 0 > v: the JIT's ReLU, −0 and NaN kept.
                        v = _mm512_max_ps(_mm512_setzero_ps(), v);
                    }
                }
                _mm512_mask_storeu_ps(y.add(at), mask, v);
            }
        }
    }
}

/// The transpose of 16 rows of 16 lanes: lane i of row j becomes lane j of row i.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // Pairs of rows interleaved (2 × 2 blocks), then pairs of pairs (4 × 4), then 128-bit lanes twice.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (t[i / 4 * 4 + i % 4 / 2], t[i / 4 * 4 + i % 4 / 2 + 2]);
        if i % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(a, b)
        } else {
            _mm512_shuffle_ps::<0xEE>(a, b)
        }
    });
    let v: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (u[i / 8 * 8 + i % 4], u[i / 8 * 8 + i % 4 + 4]);
        if i % 8 < 4 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xDD>(a, b)
        }
    });
    std::array::from_fn(|i| {
        let (a, b) = (v[i % 8], v[i % 8 + 8]);
        if i < 8 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xDD>(a, b)
        }
    })
}

/// The AVX-512 tier's transpose: items `lo..hi` of `geo` from `yt` into `y` (element 0 of each),
/// with `residual` or null.
///
/// # Safety
/// `geo` describes buffers `yt`, `y` and `residual` hold for items `lo..hi`, on a CPU with AVX-512F.
pub unsafe extern "C" fn cnnc_transpose_avx512(geo: *const TransposeGeo, yt: *const f32, y: *mut f32, residual: *const f32, lo: i64, hi: i64) {
    #[cfg(target_arch = "x86_64")]
    transpose_avx512(&*geo, yt, y, residual, lo, hi)
}
