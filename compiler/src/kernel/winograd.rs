//! Winograd's minimal filtering F(m×m, r×r) for stride-1, ungrouped r×r convolutions (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): each m×m output tile costs α² = (m+r−1)²
//! multiplies per (input, output) channel pair instead of m²r² ([`ALGORITHMS`]): F(2×2, 3×3) 16 for 36,
//! F(3×3, 3×3) 25 for 81, F(4×4, 3×3) 36 for 144, F(2×2, 5×5) 36 for 100, F(3×3, 5×5) 49 for 225.
//!
//! For tile t of image i, with d the α×α input patch at (m·ty − pad, m·tx − pad) and g an r×r filter:
//!   y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A + bias
//! and the ⊙ summed over input channels is, for each of the α² positions ξ, a GEMM
//!   M[ξ][o][t] = Σ_c U[ξ][o][c] · V[ξ][c][t],   U = G g Gᵀ (weights, transformed at compile time in f64),
//! which is exactly an α²-group 1×1 convolution over V — so it runs on the same GEMM tiles, in either
//! tier, with the same per-element order of roundings in both. Four launches: pad the input
//! ([`phase_split`]), transform the input tiles (`winograd_in`), the GEMMs, transform back with bias
//! and ReLU (`winograd_out`); a fused max pool is taken on the tiles there when its windows tile them,
//! and is a fifth launch otherwise.
//!
//! The matrices come from Toom–Cook interpolation at the points 0, ±1, ±2, ½ (as many as α needs) and ∞
//! ([`Fmr::matrices`]); algorithms with the same α share their Bᵀ.
//!
//! Accuracy: the transforms add roundings, more as α grows (entries up to 8 in Aᵀ and 5 in Bᵀ for
//! α = 6; 1 for α = 4). `tests/jit.rs` holds Winograd lowerings within 5e-5 of the reference
//! interpreter, relative to the output's largest magnitude (the rest within 1e-5), and `tests/chainer.rs`
//! all six models within 1e-4 of Chainer with each tile size forced (measured errors: docs/benchmarks.md).

use super::common::{add_tail, guarded, overlapping_vector_loop, phase_split, Epilogue, Node, Ref, Tables};
use super::gemm::{packed_planes, plane_products};
use super::pool::pool_launch;
use super::{e, transpose, Access, Expr, Kb, Tier, LANES};
use cnnc_runtime::op::Conv2d;

/// One minimal filtering algorithm: m×m output tiles of an r×r filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fmr {
    pub m: usize,
    pub r: usize,
}

/// The algorithms the lowering knows, by filter size and then output tile.
pub const ALGORITHMS: [Fmr; 5] = [Fmr { m: 2, r: 3 }, Fmr { m: 3, r: 3 }, Fmr { m: 4, r: 3 }, Fmr { m: 2, r: 5 }, Fmr { m: 3, r: 5 }];

/// Interpolation points, the first α − 1 of them taken (with ∞): small magnitudes keep the transforms'
/// entries, and so their roundings, small; ½ before ±3 for α = 7.
const POINTS: [f64; 6] = [0.0, 1.0, -1.0, 2.0, -2.0, 0.5];

/// Bᵀ (α×α), G (α×r) and Aᵀ (m×α), row-major rows.
struct Matrices {
    bt: Vec<Vec<f64>>,
    g: Vec<Vec<f64>>,
    at: Vec<Vec<f64>>,
}

impl Fmr {
    /// Input tile edge α = m + r − 1.
    pub fn alpha(self) -> usize {
        self.m + self.r - 1
    }

    /// Toom–Cook at the α − 1 finite points 0, 1, −1, 2, −2, ½ (the first α − 1) and ∞. Correlation is the transpose of
    /// the linear convolution c = V⁻¹[(E_m a) ⊙ (E_r g)] (E evaluates a polynomial at the points, V is
    /// the α×α evaluation matrix): y = E_mᵀ diag(E_r g) V⁻ᵀ d. Row j of V⁻ᵀ is the Lagrange polynomial
    /// ∏_{l≠j}(x − p_l) / f_j, f_j = ∏_{l≠j}(p_j − p_l), so Bᵀ takes the integer products and G the
    /// 1/f_j (for ∞: ∏_l (x − p_l), and the filter's last tap).
    fn matrices(self) -> Matrices {
        let a = self.alpha();
        let p = &POINTS[..a - 1];
        // Coefficients (constant first) of ∏ (x − p_l) over l ≠ skip, padded to α.
        let product = |skip: Option<usize>| {
            let mut c = vec![0.0; a];
            c[0] = 1.0;
            for (_, pl) in p.iter().enumerate().filter(|&(l, _)| Some(l) != skip) {
                for k in (0..a).rev() {
                    c[k] = if k > 0 { c[k - 1] } else { 0.0 } - pl * c[k];
                }
            }
            c
        };
        let f = |j: usize| p.iter().enumerate().filter(|&(l, _)| l != j).map(|(_, pl)| p[j] - pl).product::<f64>();
        let mut bt: Vec<Vec<f64>> = (0..a - 1).map(|j| product(Some(j))).collect();
        bt.push(product(None));
        // The point ∞ evaluates a polynomial of n coefficients to its leading one: 1 at power n − 1.
        let infinity = |n: usize, power: usize| if power + 1 == n { 1.0 } else { 0.0 };
        let mut g: Vec<Vec<f64>> = (0..a - 1).map(|j| (0..self.r).map(|k| p[j].powi(k as i32) / f(j)).collect()).collect();
        g.push((0..self.r).map(|k| infinity(self.r, k)).collect());
        let at = (0..self.m).map(|i| p.iter().map(|pj| pj.powi(i as i32)).chain([infinity(self.m, i)]).collect()).collect();
        Matrices { bt, g, at }
    }
}

/// The price the cost model puts on transforming one input tile (with its share of the padding copy)
/// and one output tile, per element of the α×α tile, in units of one 16-lane FMA instruction of the GEMM
/// tiles, when the transforms run on four tiles per vector (a batch of four or more tiles). AVX-512: the
/// middle of the ranges measured on AlexNet at batch 1 and 8 (more at batch 8, where V and M no longer
/// fit in L2). AVX2 and portable (one price, so that both tiers of a machine choose alike): fitted to
/// fifteen 3×3 and 5×5 layers of every model at batch 1 and 8 with each algorithm forced; a 16-lane
/// unit is two FMAs there, so the transforms weigh less (docs/benchmarks.md).
fn transform_costs(tier: Tier) -> [f64; 2] {
    match tier {
        Tier::Avx512 => [3.5, 2.2],
        Tier::Portable | Tier::Avx2 => [0.5, 0.5],
    }
}

/// How much more a transform costs when the batch has fewer than four tiles, which it takes one at a
/// time (`overlapping_vector_loop`'s scalar form): F(4×4, 3×3) on a 4 × 4 map at batch 1.
const SCALAR_TRANSFORMS: f64 = 4.0;

/// When convolutions take Winograd's algorithms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Winograd {
    /// Where the cost model ([`choose`]) expects fewer instructions, with the algorithm it prices lowest.
    #[default]
    Auto,
    /// Every stride-1, ungrouped 3×3 or 5×5 convolution, with 2×2 output tiles.
    M2,
    /// The same with 3×3 output tiles.
    M3,
    /// The same with the largest tiles up to 4×4: F(4×4, 3×3), F(3×3, 5×5).
    M4,
    /// None.
    Never,
}

/// The algorithm convolution `c` (at `batch`, output [oh, ow]) is lowered with for `tier`, if any.
pub fn chosen(w: Winograd, tier: Tier, c: &Conv2d, batch: usize, out: [usize; 2]) -> Option<Fmr> {
    let fit = ALGORITHMS.into_iter().filter(|f| c.kernel == [f.r, f.r] && c.stride == [1, 1] && c.dilation == [1, 1] && c.groups == 1);
    let largest = |m: usize| fit.clone().rfind(|f| f.m <= m);
    match w {
        Winograd::Auto => choose(fit, tier.cost_columns(), transform_costs(tier), c, batch, out),
        Winograd::M2 => largest(2),
        Winograd::M3 => largest(3),
        Winograd::M4 => largest(4),
        Winograd::Never => None,
    }
}

/// The algorithm among `fit` with the fewest tile instructions, transforms included, if under 0.8× the
/// direct convolution's. Columns are counted in `unit`s ([`Tier::cost_columns`]): the GEMM columns
/// are the batch's tiles, so a small feature map at batch 1 gains less than a batch of 8 (AlexNet's
/// 13×13: 16 tiles of 4×4 or 25 of 3×3, one unit or two on AVX2; ResNet's and GoogLeNet's 7×7: 16
/// tiles of 2×2 against 49 pixels). Tiers with the same unit and `[in, out]` transform costs choose
/// alike and give the same bytes.
fn choose(fit: impl Iterator<Item = Fmr>, unit: usize, [in_cost, out_cost]: [f64; 2], c: &Conv2d, batch: usize, [oh, ow]: [usize; 2]) -> Option<Fmr> {
    let cols = |n: usize| n.next_multiple_of(unit) as f64;
    let (ci, co, k) = (c.in_channels as f64, c.out_channels as f64, (c.kernel[0] * c.kernel[1]) as f64);
    let direct = batch as f64 * cols(oh * ow) * k * ci * co / 16.0;
    let cost = |f: Fmr| {
        let a2 = (f.alpha() * f.alpha()) as f64;
        let tiles = batch * oh.div_ceil(f.m) * ow.div_ceil(f.m);
        let scalar = if tiles < LANES { SCALAR_TRANSFORMS } else { 1.0 };
        a2 * cols(tiles) * ci * co / 16.0 + tiles as f64 * a2 * (ci * in_cost + co * out_cost) * scalar
    };
    // The margin covers what the count leaves out: three more launches and the M round trip.
    fit.map(|f| (cost(f), f)).filter(|&(w, _)| w < 0.8 * direct).min_by(|x, y| x.0.total_cmp(&y.0)).map(|(_, f)| f)
}

/// The most bytes of M one pass of the transforms and GEMMs takes: larger batches run in chunks of
/// images, unless U is over twice as large (each chunk streams it again). An M past the L3 cache makes
/// the transforms as slow as the GEMMs; a large U streamed per chunk costs more than it saves
/// (measured on AlexNet's conv2–5 at batch 8: docs/benchmarks.md).
const CHUNK_BYTES: usize = 4 << 20;

/// Elements from one of the α² planes of V or M to the next: at least `len`, and 64 bytes past a
/// multiple of 4 KiB. A transform touches one line of each of the α² planes at a time; planes a multiple
/// of 4 KiB apart (AlexNet's: 384 channels × 16 or 128 columns) all fall in one set of the L1 cache,
/// whose 8–12 ways then miss on every access (measured: docs/benchmarks.md).
fn plane_pitch(len: usize) -> usize {
    let p = (len + 1024 - 16).next_multiple_of(1024) + 16;
    p - if p - len >= 1024 { 1024 } else { 0 }
}

/// Row `xi` of U = G g Gᵀ for every r × r filter of `w`, in f64 rounded once: U[xi][yi] of filter f at
/// `planes[yi · pitch + at(f)]`. Eight filters go side by side, as independent lanes that vectorize (with AVX where the CPU
/// has it), each sum taken term by term from its first term as a scalar `sum` takes it: the same bytes.
fn filter_rows(w: &[f32], r: usize, g: &[Vec<f64>], xi: usize, planes: (&mut [f32], usize), at: impl Fn(usize) -> usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX.
        return unsafe { filter_rows_avx(w, r, g, xi, planes, at) };
    }
    filter_rows_lanes(w, r, g, xi, planes, at)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn filter_rows_avx(w: &[f32], r: usize, g: &[Vec<f64>], xi: usize, planes: (&mut [f32], usize), at: impl Fn(usize) -> usize) {
    filter_rows_lanes(w, r, g, xi, planes, at)
}

#[inline(always)]
fn filter_rows_lanes(w: &[f32], r: usize, g: &[Vec<f64>], xi: usize, (planes, pitch): (&mut [f32], usize), at: impl Fn(usize) -> usize) {
    const L: usize = 8;
    let filters = w.len() / (r * r);
    #[inline(always)]
    fn dot(coef: &[f64], term: impl Fn(usize) -> [f64; L]) -> [f64; L] {
        let mut s = [0.0f64; L];
        for (i, &c) in coef.iter().enumerate() {
            let t = term(i);
            for l in 0..L {
                s[l] = if i == 0 { c * t[l] } else { s[l] + c * t[l] };
            }
        }
        s
    }
    let (mut x, mut row) = (vec![[0.0f64; L]; r * r], vec![[0.0f64; L]; r]);
    for base in (0..filters).step_by(L) {
        let n = L.min(filters - base);
        for l in 0..n {
            w[(base + l) * r * r..][..r * r].iter().zip(&mut x).for_each(|(&v, x)| x[l] = v as f64);
        }
        for q in 0..r {
            row[q] = dot(&g[xi], |p| x[p * r + q]);
        }
        let mut to = [0; L];
        (0..n).for_each(|l| to[l] = at(base + l));
        for (yi, gy) in g.iter().enumerate() {
            let (u, plane) = (dot(gy, |q| row[q]), &mut planes[yi * pitch..]);
            (0..n).for_each(|l| plane[to[l]] = u[l] as f32);
        }
    }
}

/// `Σ coef[i] · v[i]` over the nonzero coefficients, left to right, with ±1 as plain adds; on 4-lane
/// vectors when `vec`.
fn lin<'a>(coef: &[f64], v: impl IntoIterator<Item = &'a Expr>, vec: bool) -> Expr {
    let mut acc: Option<Expr> = None;
    for (&c, x) in coef.iter().zip(v) {
        if c == 0.0 {
            continue;
        }
        acc = Some(match (acc.take(), c) {
            (None, 1.0) => x.clone(),
            (None, c) => x.clone() * e(c as f32).lanes(vec),
            (Some(a), 1.0) => a + x.clone(),
            (Some(a), -1.0) => a - x.clone(),
            (Some(a), c) => x.clone().fma(e(c as f32).lanes(vec), a),
        });
    }
    acc.expect("a transform row has a nonzero coefficient")
}

/// `X ↦ L X Lᵀ` for an R × α matrix L and an α × α X (row-major values), each entry bound once.
fn sandwich(kb: &mut Kb, l: &[Vec<f64>], x: &[Expr], vec: bool) -> Vec<Expr> {
    let a = l[0].len();
    let lx: Vec<Expr> = l.iter().flat_map(|row| (0..a).map(move |j| (row, j))).map(|(row, j)| kb.let_(lin(row, x[j..].iter().step_by(a), vec))).collect();
    lx.chunks(a).flat_map(|lx_i| l.iter().map(move |row| (row, lx_i))).map(|(row, lx_i)| kb.let_(lin(row, lx_i, vec))).collect()
}

/// Launches the gather of `n`'s input into tiles, P[c][ξ][image·tiles + t] = the input at row
/// m·ty + ξ / α − pad and column m·tx + ξ % α − pad for tile t = (ty, tx) of a th × tw grid (zero outside
/// the image), in a new store: each tile's α² elements for transforms that take four tiles from
/// anywhere in the batch at once. Tasks own channels (as the input transform's do).
fn patches(t: &mut Tables, n: &Node, c: &Conv2d, f: Fmr, [th, tw]: [usize; 2]) -> Ref {
    let [ci, h, w] = [n.ins[0].1[0], n.ins[0].1[1], n.ins[0].1[2]];
    let (m, a, [p0, p1], all) = (f.m, f.alpha(), c.pad, n.batch * th * tw);
    let out = t.store(ci * a * a * all);
    let mut kb = Kb::new(format!("{}.winograd_patches", n.name), ci * n.batch);
    let (xb, pb) = (kb.buf("x", n.in_len(0), Access::Read), kb.buf("patches", ci * a * a * all, Access::Write));
    let (lo, hi) = kb.range();
    kb.for_(lo, hi, |kb, it| {
        let (ch, img) = (kb.let_(it.clone() / n.batch), kb.let_(it % n.batch));
        let src = kb.let_((img.clone() * ci + ch.clone()) * (h * w));
        let dst = kb.let_(ch * (a * a * all) + img * (th * tw));
        kb.for_(0usize, th, |kb, ty| {
            for i in 0..a {
                // Input row iy of the tiles' row i; columns (tx, j) known here.
                let iy = kb.let_(ty.clone() * m + (i as i64 - p0 as i64));
                let row = |kb: &mut Kb, inside: bool| {
                    for (tx, j) in (0..tw).flat_map(|tx| (0..a).map(move |j| (tx, j))) {
                        let ix = (tx * m + j) as i64 - p1 as i64;
                        let v = if inside && (0..w as i64).contains(&ix) { xb.at(src.clone() + iy.clone() * w + ix) } else { e(0.0f32) };
                        kb.store(pb, dst.clone() + ((i * a + j) * all + tx) + ty.clone() * tw, v);
                    }
                };
                kb.if_else(e(0i64).le(iy.clone()).and(iy.clone().lt(h)), |kb| row(kb, true), |kb| row(kb, false));
            }
        });
    });
    t.launch(kb.finish(), vec![n.ins[0].0, out], 0);
    out
}

/// Lowers the convolution `n` as `f` (which [`chosen`] returned for it).
pub fn lower(t: &mut Tables, n: &Node, c: &Conv2d, f: Fmr, ep: Epilogue, [oh, ow]: [usize; 2]) {
    let (ci, co, batch) = (c.in_channels, c.out_channels, n.batch);
    let (m, r, a) = (f.m, f.r, f.alpha());
    let Matrices { bt, g, at } = f.matrices();
    let (th, tw) = (oh.div_ceil(m), ow.div_ceil(m));
    let per_image = th * tw;
    let name = |s: &str| format!("{}.{s}", n.name);
    let w = n.params[0].data();
    // U[xi·α + yi] = (G g Gᵀ)[xi][yi] per filter (o, ch) as the weights of an α²-group 1×1 convolution
    // (α²·co, ci, 1, 1): row xi of G g, then its product with row yi of G, in f64. A task owns the α
    // planes of one xi, so each filter's row of G g is summed once for them (AlexBN transforms 0.4 M
    // filters, ResNet-50 1 M), and writes them straight into the GEMM's packed layout.
    let transform = |t: &mut Tables| {
        packed_planes(t, [a * a, co, ci], a, |xi, planes, layout| filter_rows(w, r, &g, xi, (planes, layout.at(1, 0, 0)), |f| layout.at(0, f / ci, f % ci)))
    };
    // The input, zero-padded to whole tiles (rows and columns up to m·tiles + r − 1) and split into m
    // column phases, xq[..][x % m][y][x / m]: element (i, j) of tiles tx..tx + 3 is then one 4-lane
    // vector, and the transforms run on four horizontally adjacent tiles at once (a row of four or more
    // tiles ends with four that overlap the previous ones: a tile transformed twice is stored twice alike).
    // Rows of fewer than four tiles (small maps) are taken four tiles at a time across rows and images
    // instead (`flat`): the input is gathered per tile, P[c][ξ][image·tiles + t] (zeros outside the
    // image), so that element ξ of four consecutive tiles is one vector, as it already is in M; each
    // tile's outputs then go to its own place (the digits model's 4 × 4 maps: one tile per image).
    let flat = tw < LANES;
    let all = batch * per_image;
    let (xq, x_len, ph) = if flat {
        (patches(t, n, c, f, [th, tw]), ci * a * a * all, None)
    } else {
        let (xq, ph) = phase_split(t, n, [1, m], c.pad, [th * m + r - 1, tw + (a - 1) / m]);
        (xq, ph.len(batch, ci), Some(ph))
    };
    // The batch in chunks of images whose M fits in CHUNK_BYTES, each chunk's transforms and GEMMs in
    // turn over one V and one M (U made for the first chunk's GEMMs). Each chunk streams U again, so a
    // large U takes the batch in one pass.
    let chunks = if 4 * a * a * co * ci > CHUNK_BYTES * 2 { 1 } else { batch.div_ceil((CHUNK_BYTES / (4 * a * a * co * per_image)).max(1)) };
    let per_chunk = batch.div_ceil(chunks);
    // V[ξ][c][image·tiles + t] (images of the chunk), plane ξ at ξ·pv; M alike.
    let (pv, pm) = (plane_pitch(ci * per_chunk * per_image), plane_pitch(co * per_chunk * per_image));
    let (v, mm) = (t.store(a * a * pv), t.store(a * a * pm));
    let conv_len = batch * co * oh * ow;
    // A max pool whose q×q windows (stride q) tile the output tiles, on maps a whole number of tiles, is
    // taken on each tile as it is transformed: (m/q)² values stored per tile, no pooling launch and no
    // pre-pool map (the digits model's 2×2 pools). Max commutes with the rounded bias add and ReLU
    // before it (both monotone), so the bytes are those of the separate pool (NaNs aside: which of
    // several a window keeps depends on the order of its comparisons).
    let tile_pool = ep.pool.filter(|p| {
        let q = p.kernel[0];
        p.kernel == [q, q] && p.stride == [q, q] && p.pad == [0, 0] && m % q == 0 && ep.add.is_none() && oh % m == 0 && ow % m == 0
    });
    // Stored: mo × mo values per tile, on a yh × yw map.
    let q = tile_pool.map_or(1, |p| p.kernel[0]);
    let (mo, yh, yw) = (m / q, oh / q, ow / q);
    debug_assert!(tile_pool.is_none() || n.out.1[1..] == [yh, yw]);
    let y = if ep.pool.is_some() && tile_pool.is_none() { t.store(conv_len) } else { n.out.0 };
    let y_len = batch * co * yh * yw;
    let bias = t.param(n.params.get(1).map_or(vec![0.0; co], |b| b.data().to_vec()));
    let mut packed = None;
    for chunk in 0..chunks {
        let (i0, images) = (chunk * per_chunk, per_chunk.min(batch - chunk * per_chunk));
        let cols = images * per_image;
        let name = |s: &str| if chunk == 0 { name(s) } else { name(&format!("{s}/{chunk}")) };
        // V = Bᵀ d B for the tiles whose element ξ `at(ξ)` loads (four tiles' when `vec`), at column `col`.
        let mut kb = Kb::new(name("winograd_in"), if flat { ci } else { images * ci });
        let (xb, vb) = (kb.buf("x", x_len, Access::Read), kb.buf("V", a * a * pv, Access::Write));
        let tiles_in = |kb: &mut Kb, at: &dyn Fn(usize) -> Expr, col: Expr, vec: bool| {
            let d: Vec<Expr> = (0..a * a).map(|i| kb.let_(xb.load(at(i), vec))).collect();
            for (xi, val) in sandwich(kb, &bt, &d, vec).into_iter().enumerate() {
                kb.store(vb, e(xi * pv) + col.clone(), val);
            }
        };
        let (lo, hi) = kb.range();
        match ph {
            // Tasks own channels, every tile of the chunk each.
            None => kb.for_(lo, hi, |kb, ch| {
                let (from, to) = (kb.let_(ch.clone() * (a * a * all) + i0 * per_image), kb.let_(ch * cols));
                overlapping_vector_loop(kb, e(0i64), e(cols), |kb, t, vec| tiles_in(kb, &|i| from.clone() + i * all + t.clone(), to.clone() + t.clone(), vec));
            }),
            // Tasks own channels, all images of each: V's columns are [image][tile], so neighbouring
            // tasks would otherwise write the same cache lines when an image has few tiles (two threads
            // were slower than one on 8×8 inputs: docs/benchmarks.md).
            Some(ph) => kb.for_(lo, hi, |kb, it| {
                let (ch, img) = (kb.let_(it.clone() / images), kb.let_(it % images));
                let (hq, wq) = (ph.hq, ph.wq);
                kb.for_(0usize, th, |kb, ty| {
                    let row = kb.let_(((img.clone() + i0) * ci + ch.clone()) * (m * hq * wq) + ty.clone() * (m * wq));
                    let col0 = kb.let_(ch.clone() * cols + img.clone() * per_image + ty * tw);
                    overlapping_vector_loop(kb, e(0i64), e(tw), |kb, tx, vec| {
                        let at = |i: usize| row.clone() + ((i % a % m) * hq * wq + i / a * wq + i % a / m) + tx.clone();
                        tiles_in(kb, &at, col0.clone() + tx.clone(), vec)
                    });
                });
            }),
        }
        t.launch(kb.finish(), vec![xq, v], 0);
        // M = the α² GEMMs.
        let u = *packed.get_or_insert_with(|| transform(t));
        plane_products(t, n.name, a * a, [ci, co, cols], [v, mm], [pv, pm], u);
        // y = Aᵀ M A + bias, then ReLU, stored where the tile lies inside the output.
        let mut kb = Kb::new(name("winograd_out"), if flat { co } else { images * co });
        let y_access = if ep.add.is_some() { Access::ReadWrite } else { Access::Write };
        let (mb, bb, yb) = (kb.buf("M", a * a * pm, Access::Read), kb.buf("bias", co, Access::Read), kb.buf("y", y_len, y_access));
        let residual = ep.add.map(|_| kb.buf("residual", conv_len, Access::Read));
        // Four tiles' outputs as m² vectors, [r][s][tile], reread as scalars to store them in place.
        let tmp = kb.buf("tiles", m * m * LANES, Access::Local);
        // The mo × mo stored values of the tiles at column `col` of M (four tiles' when `vec`) for
        // output channel `o` of bias `b`: with bias and ReLU, and the pool windows' maxima (the tile
        // itself when q = 1).
        let outputs = |kb: &mut Kb, o: &Expr, b: &Expr, col: Expr, vec: bool| -> Vec<Expr> {
            let mv: Vec<Expr> = (0..a * a).map(|xi| kb.let_(mb.load(e(xi * pm) + o.clone() * cols + col.clone(), vec))).collect();
            let out: Vec<Expr> = sandwich(kb, &at, &mv, vec)
                .into_iter()
                .map(|val| {
                    let val = val + b.clone().lanes(vec);
                    if ep.relu_on_sum() {
                        val.max(e(0.0f32).lanes(vec))
                    } else {
                        val
                    }
                })
                .collect();
            let window = |pi: usize, pj: usize| (0..q * q).map(move |w| (pi * q + w / q) * m + pj * q + w % q);
            (0..mo * mo).map(|v| window(v / mo, v % mo).map(|i| out[i].clone()).reduce(Expr::max).expect("q ≥ 1")).collect()
        };
        // Stores `out` (one tile's, or four's as vectors): tile u's (i, j) at y[at + i·yw + j] for
        // `places[u]` = [at, rows, columns] inside the output, checked unless `full` (a constant 1: always).
        // Four `adjacent` tiles (each mo columns right of the last) of 2×2 or 4×4 values make each of
        // their output rows 4·mo contiguous floats: where all are inside, the vectors are transposed
        // into those rows (8 or 4 shuffles, 4·mo/4 stores a row); otherwise each value goes through `tmp`.
        let scatter = |kb: &mut Kb, out: Vec<Expr>, places: Vec<[Expr; 3]>, full: Expr, adjacent: bool| {
            let tiles = places.len();
            let out: Vec<Expr> = out.into_iter().map(|v| kb.let_(v)).collect();
            let rows = |kb: &mut Kb| {
                for i in 0..mo {
                    let r = &out[i * mo..][..mo];
                    let line = match mo {
                        4 => transpose([0, 1, 2, 3].map(|j| r[j].clone())).to_vec(),
                        _ => vec![r[0].clone().shuffle(r[1].clone(), [0, 4, 1, 5]), r[0].clone().shuffle(r[1].clone(), [2, 6, 3, 7])],
                    };
                    for (k, v) in line.into_iter().enumerate() {
                        kb.store(yb, places[0][0].clone() + (i * yw + k * LANES), v);
                    }
                }
            };
            let stores = |kb: &mut Kb, checked: bool| {
                if !checked && adjacent && tiles == LANES && (mo == 2 || mo == 4) {
                    return rows(kb);
                }
                for (i, val) in out.iter().enumerate() {
                    kb.store(tmp, e(i * tiles), val.clone());
                }
                for i in 0..mo {
                    for (u, [at, rows, width]) in places.iter().enumerate() {
                        guarded(kb, (checked && i > 0).then(|| e(i).lt(rows.clone())), |kb| {
                            for j in 0..mo {
                                let v = tmp.at(e((i * mo + j) * tiles + u));
                                guarded(kb, (checked && j > 0).then(|| e(j).lt(width.clone())), |kb| kb.store(yb, at.clone() + (i * yw + j), v));
                            }
                        });
                    }
                }
            };
            match full {
                Expr::Int(f) => stores(kb, f == 0),
                full => kb.if_else(full, |kb| stores(kb, false), |kb| stores(kb, true)),
            }
        };
        let (lo, hi) = kb.range();
        match ph {
            // Tasks own output channels, every tile of the chunk each; each tile's place from its number.
            None => kb.for_(lo, hi, |kb, o| {
                let b = kb.let_(bb.at(o.clone()));
                overlapping_vector_loop(kb, e(0i64), e(cols), |kb, t, vec| {
                    let out = outputs(kb, &o, &b, t.clone(), vec);
                    let place = |kb: &mut Kb, u: usize| {
                        let (img, tile) = (kb.let_((t.clone() + u) / per_image), kb.let_((t.clone() + u) % per_image));
                        let (ty, tx) = (kb.let_(tile.clone() / tw), kb.let_(tile % tw));
                        let at = kb.let_((((img + i0) * co + o.clone()) * yh + ty.clone() * mo) * yw + tx.clone() * mo);
                        [at, e(yh) - ty * mo, e(yw) - tx * mo]
                    };
                    let places = (0..if vec { LANES } else { 1 }).map(|u| place(kb, u)).collect();
                    // Every tile lies inside the output when the map is a whole number of tiles.
                    scatter(kb, out, places, e(i64::from(yh % mo == 0 && yw % mo == 0)), false)
                });
                if let Some(rb) = residual {
                    kb.for_(0usize, images, |kb, img| {
                        let at = kb.let_(((img + i0) * co + o.clone()) * (oh * ow));
                        add_tail(kb, [yb, rb], at.clone(), at + oh * ow, ep.relu);
                    });
                }
            }),
            Some(_) => kb.for_(lo, hi, |kb, plane| {
                let (img, o) = (kb.let_(plane.clone() / co), kb.let_(plane.clone() % co));
                let b = kb.let_(bb.at(o.clone()));
                kb.for_(0usize, th, |kb, ty| {
                    let rows = kb.let_((e(yh) - ty.clone() * mo).min(mo));
                    let col0 = kb.let_(img.clone() * per_image + ty.clone() * tw);
                    let at0 = kb.let_(((plane.clone() + i0 * co) * yh + ty * mo) * yw);
                    overlapping_vector_loop(kb, e(0i64), e(tw), |kb, tx, vec| {
                        let out = outputs(kb, &o, &b, col0.clone() + tx.clone(), vec);
                        // Output columns of these tiles still inside the row (more than mo·4 when not the last).
                        let width = kb.let_(e(yw) - tx.clone() * mo);
                        let at = kb.let_(at0.clone() + tx * mo);
                        if mo == 1 {
                            // One value per tile: tiles tx.. are columns tx.. of row ty.
                            return kb.store(yb, at, out[0].clone());
                        }
                        let tiles = if vec { LANES } else { 1 };
                        let places = (0..tiles).map(|u| [at.clone() + u * mo, rows.clone(), width.clone() - u * mo]).collect();
                        scatter(kb, out, places, rows.clone().eq(mo).and(e(tiles * mo).le(width.clone())), true)
                    });
                });
                if let Some(rb) = residual {
                    let at = kb.let_((plane.clone() + i0 * co) * (oh * ow));
                    add_tail(kb, [yb, rb], at.clone(), at + oh * ow, ep.relu);
                }
            }),
        }
        t.launch(kb.finish(), [mm, bias, y].into_iter().chain(ep.add).collect(), 0);
    }
    if let Some(p) = ep.pool.filter(|_| tile_pool.is_none()) {
        pool_launch(t, n, p, y, [oh, ow]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(ci: usize, co: usize, k: usize, stride: usize, groups: usize) -> Conv2d {
        Conv2d { in_channels: ci, out_channels: co, kernel: [k, k], stride: [stride, stride], pad: [1, 1], dilation: [1, 1], groups, bias: true }
    }

    #[test]
    fn the_cost_model_takes_winograd_where_it_pays() {
        let [f23, f33, f43, f25, f35] = ALGORITHMS;
        let conv4 = conv(384, 384, 3, 1, 1);
        let auto = |tier, c: &Conv2d, batch, out| chosen(Winograd::Auto, tier, c, batch, out);
        // AlexNet's conv4 (13 × 13): 4×4 tiles at batch 8; at batch 1 their 16 columns half fill an
        // AVX-512 tile, and 3×3 tiles (25 columns) cost less there, while on AVX2 16 columns fill one
        // tile and 25 take two. Its conv2 (27 × 27, 5×5) as F(3×3, 5×5) at both, as measured
        // (docs/benchmarks.md).
        assert_eq!(auto(Tier::Avx512, &conv4, 8, [13, 13]), Some(f43));
        assert_eq!(auto(Tier::Avx512, &conv4, 1, [13, 13]), Some(f33));
        assert_eq!(auto(Tier::Avx2, &conv4, 1, [13, 13]), Some(f43));
        let conv2 = Conv2d { pad: [2, 2], ..conv(96, 256, 5, 1, 1) };
        for tier in Tier::ALL {
            assert_eq!(auto(tier, &conv2, 1, [27, 27]), Some(f35));
            assert_eq!(auto(tier, &conv2, 8, [27, 27]), Some(f35));
            // One input channel (the digits model's conv1): the transforms cost more than the
            // multiplies saved.
            assert_eq!(auto(tier, &conv(1, 32, 3, 1, 1), 8, [8, 8]), None);
        }
        // Few channels on AVX-512, whose 32-lane unit makes the multiplies cheaper to begin with.
        assert_eq!(auto(Tier::Avx512, &conv(8, 8, 3, 1, 1), 8, [56, 56]), None);
        // ResNet-50's res5 3×3 (7 × 7): 16 columns of 2×2 tiles against 49 pixels, on AVX2.
        let res5 = conv(512, 512, 3, 1, 1);
        assert_eq!([auto(Tier::Avx2, &res5, 1, [7, 7]), auto(Tier::Avx512, &res5, 1, [7, 7])], [Some(f23), None]);
        // As measured on AVX2 (docs/benchmarks.md): GoogLeNet's 5×5 layers on 7 × 7 maps as F(2×2, 5×5)
        // at batch 1 and F(3×3, 5×5) at 8 (alike there); the digits model's conv2 on 8 × 8 as F(2×2, 3×3)
        // at batch 1 and F(4×4, 3×3) at 8, its conv3 on 4 × 4 direct at batch 1 (one tile, transformed
        // alone) and F(2×2, 3×3) at 8 (32 tiles, four at a time).
        for tier in [Tier::Portable, Tier::Avx2] {
            let inc5 = Conv2d { pad: [2, 2], ..conv(32, 128, 5, 1, 1) };
            assert_eq!([auto(tier, &inc5, 1, [7, 7]), auto(tier, &inc5, 8, [7, 7])], [Some(f25), Some(f35)]);
            let conv2 = conv(32, 64, 3, 1, 1);
            assert_eq!([auto(tier, &conv2, 1, [8, 8]), auto(tier, &conv2, 8, [8, 8])], [Some(f23), Some(f43)]);
            let conv3 = conv(64, 64, 3, 1, 1);
            assert_eq!([auto(tier, &conv3, 1, [4, 4]), auto(tier, &conv3, 8, [4, 4])], [None, Some(f23)]);
        }
        // Not applicable, whatever is asked.
        for c in [conv(384, 384, 7, 1, 1), conv(384, 384, 3, 2, 1), conv(384, 384, 3, 1, 2)] {
            assert_eq!(chosen(Winograd::M4, Tier::Avx2, &c, 8, [13, 13]), None);
        }
        let forced = |w, k| chosen(w, Tier::Avx2, &conv(8, 8, k, 1, 1), 1, [5, 5]);
        assert_eq!([forced(Winograd::M2, 3), forced(Winograd::M3, 3), forced(Winograd::M4, 3)], [Some(f23), Some(f33), Some(f43)]);
        assert_eq!([forced(Winograd::M2, 5), forced(Winograd::M3, 5), forced(Winograd::M4, 5)], [Some(f25), Some(f35), Some(f35)]);
        assert_eq!(chosen(Winograd::Never, Tier::Avx2, &conv4, 8, [13, 13]), None);
    }

    #[test]
    fn the_transform_matrices_compute_a_correlation() {
        for f in ALGORITHMS {
            let (a, Matrices { bt, g, at }) = (f.alpha(), f.matrices());
            let d: Vec<f64> = (0..a).map(|i| [0.3, -1.2, 2.5, 0.7, -0.4, 1.9, -0.8][i]).collect();
            let w: Vec<f64> = (0..f.r).map(|k| [0.5, -0.25, 2.0, 1.5, -0.75][k]).collect();
            // For a 1-D signal d (α) and filter w (r): Aᵀ [(G w) ⊙ (Bᵀ d)] = the m outputs of w sliding on d.
            let gw: Vec<f64> = g.iter().map(|row| row.iter().zip(&w).map(|(x, y)| x * y).sum()).collect();
            let bd: Vec<f64> = bt.iter().map(|row| row.iter().zip(&d).map(|(x, y)| x * y).sum()).collect();
            for (i, row) in at.iter().enumerate() {
                let y: f64 = row.iter().zip(gw.iter().zip(&bd)).map(|(x, (u, v))| x * u * v).sum();
                let want: f64 = (0..f.r).map(|k| w[k] * d[i + k]).sum();
                assert!((y - want).abs() < 1e-12, "{f:?} output {i}: {y} vs {want}");
            }
        }
    }

    #[test]
    fn f4x4_3x3_has_lavin_and_grays_matrices() {
        let Matrices { bt, g, at } = Fmr { m: 4, r: 3 }.matrices();
        assert_eq!(bt[0], [4.0, 0.0, -5.0, 0.0, 1.0, 0.0]);
        assert_eq!(bt[3], [0.0, -2.0, -1.0, 2.0, 1.0, 0.0]);
        assert_eq!(bt[5], [0.0, 4.0, 0.0, -5.0, 0.0, 1.0]);
        assert_eq!(g[1], [-1.0 / 6.0; 3]);
        assert_eq!(g[3], [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0]);
        assert_eq!(at[3], [0.0, 1.0, -1.0, 8.0, -8.0, 1.0]);
    }
}
