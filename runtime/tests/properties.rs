//! Property tests of the reference kernels against independent formulations, on generated shapes.
//!
//! `ConvProblem::definition` computes each output element straight from the convolution formula (the
//! reference kernel instead accumulates shifted planes over precomputed valid ranges); `PoolProblem::definition`
//! pads the input the way Chainer's im2col does (−inf or 0, plus `s − 1` extra rows/cols for cover_all) and
//! reduces full windows (the reference kernel clips windows instead). Shrunk failures are pinned as named
//! tests at the bottom.

use cnnc_runtime::op::{Conv2d, Op, Pool2d};
use cnnc_runtime::{reference, Tensor};
use proptest::prelude::*;

fn data(n: usize, seed: u64) -> Vec<f32> {
    cnnc_runtime::rng::normal(&format!("prop{seed}"), n).map(|v| v as f32).collect()
}

#[derive(Debug, Clone)]
struct ConvProblem {
    n: usize,
    h: usize,
    w: usize,
    conv: Conv2d,
    seed: u64,
}

impl ConvProblem {
    fn tensors(&self) -> (Tensor, Tensor, Option<Tensor>) {
        let c = &self.conv;
        let xs = vec![self.n, c.in_channels, self.h, self.w];
        let ws = vec![c.out_channels, c.in_channels / c.groups, c.kernel[0], c.kernel[1]];
        let x = Tensor::new(xs.clone(), data(xs.iter().product(), self.seed)).unwrap();
        let w = Tensor::new(ws.clone(), data(ws.iter().product(), self.seed + 1)).unwrap();
        let b = c.bias.then(|| Tensor::new(vec![c.out_channels], data(c.out_channels, self.seed + 2)).unwrap());
        (x, w, b)
    }

    fn definition(&self) -> Tensor {
        let (x, w, b) = self.tensors();
        let c = &self.conv;
        let out = Op::Conv2d(c.clone()).output_shape(&[&x.shape()[1..]]).unwrap();
        let (oh, ow) = (out[1], out[2]);
        let (cig, cog) = (c.in_channels / c.groups, c.out_channels / c.groups);
        let mut y = Vec::new();
        for n in 0..self.n {
            for oc in 0..c.out_channels {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = b.as_ref().map_or(0.0, |b| b.data()[oc]) as f64;
                        for i in 0..cig {
                            let ic = oc / cog * cig + i;
                            for ky in 0..c.kernel[0] {
                                for kx in 0..c.kernel[1] {
                                    let iy = (oy * c.stride[0] + ky * c.dilation[0]) as isize - c.pad[0] as isize;
                                    let ix = (ox * c.stride[1] + kx * c.dilation[1]) as isize - c.pad[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= self.h as isize || ix >= self.w as isize {
                                        continue;
                                    }
                                    let xv = x.data()[((n * c.in_channels + ic) * self.h + iy as usize) * self.w + ix as usize];
                                    let wv = w.data()[((oc * cig + i) * c.kernel[0] + ky) * c.kernel[1] + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        y.push(acc as f32);
                    }
                }
            }
        }
        Tensor::new(vec![self.n, c.out_channels, oh, ow], y).unwrap()
    }

    fn check(&self) {
        let (x, w, b) = self.tensors();
        let mut params = vec![&w];
        params.extend(b.as_ref());
        let got = reference::eval(&Op::Conv2d(self.conv.clone()), &[&x], &params);
        let want = self.definition();
        assert_eq!(got.shape(), want.shape());
        let tol = 1e-5 * (want.max_abs() + 1.0);
        assert!(got.max_abs_diff(&want) <= tol, "{self:?}: diff {}", got.max_abs_diff(&want));
    }
}

fn conv_problem() -> impl Strategy<Value = ConvProblem> {
    (
        (1usize..3, 1usize..4, 1usize..4, 1usize..4),
        (1usize..6, 1usize..6, 1usize..4, 1usize..4),
        (0usize..3, 0usize..3, 1usize..9, 1usize..9),
        (any::<bool>(), 0u64..1000, 1usize..4, 1usize..4),
    )
        .prop_filter_map("kernel must fit", |((n, g, cig, cog), (kh, kw, sh, sw), (ph, pw, h, w), (bias, seed, dh, dw))| {
            let conv =
                Conv2d { in_channels: g * cig, out_channels: g * cog, kernel: [kh, kw], stride: [sh, sw], pad: [ph, pw], dilation: [dh, dw], groups: g, bias };
            let [sph, spw] = conv.span();
            if h + 2 * ph < sph || w + 2 * pw < spw {
                return None;
            }
            Some(ConvProblem { n, h, w, conv, seed })
        })
}

#[derive(Debug, Clone)]
struct PoolProblem {
    c: usize,
    h: usize,
    w: usize,
    pool: Pool2d,
    max: bool,
    seed: u64,
}

impl PoolProblem {
    fn op(&self) -> Op {
        if self.max {
            Op::MaxPool2d(self.pool.clone())
        } else {
            Op::AvgPool2d(self.pool.clone())
        }
    }

    /// Chainer's im2col view: pad with −inf (max) or 0 (average), plus `s − 1` more at the end for cover_all.
    fn definition(&self, x: &Tensor) -> Tensor {
        let p = &self.pool;
        let out = self.op().output_shape(&[&x.shape()[1..]]).unwrap();
        let fill = if self.max { f32::NEG_INFINITY } else { 0.0 };
        let extra = |i: usize| if p.cover_all { p.stride[i] - 1 } else { 0 };
        let (ph, pw) = (self.h + 2 * p.pad[0] + extra(0), self.w + 2 * p.pad[1] + extra(1));
        let mut y = Vec::new();
        for c in 0..self.c {
            let at = |yy: usize, xx: usize| {
                let (iy, ix) = (yy as isize - p.pad[0] as isize, xx as isize - p.pad[1] as isize);
                if iy < 0 || ix < 0 || iy >= self.h as isize || ix >= self.w as isize {
                    fill
                } else {
                    x.data()[(c * self.h + iy as usize) * self.w + ix as usize]
                }
            };
            for oy in 0..out[1] {
                for ox in 0..out[2] {
                    let cells: Vec<f32> = (0..p.kernel[0])
                        .flat_map(|ky| (0..p.kernel[1]).map(move |kx| (oy * p.stride[0] + ky, ox * p.stride[1] + kx)))
                        .filter(|&(yy, xx)| yy < ph && xx < pw)
                        .map(|(yy, xx)| at(yy, xx))
                        .collect();
                    y.push(if self.max {
                        cells.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                    } else {
                        // Chainer's pad_value=None (ONNX count_include_pad=0): the mean of the cells in the input.
                        let inside = (0..p.kernel[0])
                            .flat_map(|ky| (0..p.kernel[1]).map(move |kx| (oy * p.stride[0] + ky, ox * p.stride[1] + kx)))
                            .filter(|&(yy, xx)| (p.pad[0]..p.pad[0] + self.h).contains(&yy) && (p.pad[1]..p.pad[1] + self.w).contains(&xx))
                            .count();
                        cells.iter().sum::<f32>() / if p.exclude_pad { inside as f32 } else { (p.kernel[0] * p.kernel[1]) as f32 }
                    });
                }
            }
        }
        Tensor::new([vec![1], out].concat(), y).unwrap()
    }

    fn check(&self) {
        let x = Tensor::new(vec![1, self.c, self.h, self.w], data(self.c * self.h * self.w, self.seed)).unwrap();
        let got = reference::eval(&self.op(), &[&x], &[]);
        let want = self.definition(&x);
        assert_eq!(got.shape(), want.shape(), "{self:?}");
        assert!(got.max_abs_diff(&want) <= 1e-6, "{self:?}");
    }
}

fn pool_problem() -> impl Strategy<Value = PoolProblem> {
    (
        (1usize..3, 1usize..9, 1usize..9),
        (1usize..4, 1usize..4, 1usize..4, 1usize..4),
        (0usize..2, 0usize..2),
        (any::<bool>(), any::<bool>(), any::<bool>(), 0u64..1000),
    )
        .prop_filter_map("window must fit", |((c, h, w), (kh, kw, sh, sw), (ph, pw), (cover_all, max, exclude, seed))| {
            // Chainer requires pad < ksize; padding wider than the window makes windows of pure padding.
            if h + 2 * ph < kh || w + 2 * pw < kw || ph >= kh || pw >= kw {
                return None;
            }
            let pool = Pool2d { kernel: [kh, kw], stride: [sh, sw], pad: [ph, pw], cover_all: cover_all && max, exclude_pad: exclude && !max };
            Some(PoolProblem { c, h, w, pool, max, seed })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn conv_matches_its_definition(p in conv_problem()) {
        p.check();
    }

    #[test]
    fn pooling_matches_chainers_padded_windows(p in pool_problem()) {
        p.check();
    }
}

/// Stride larger than the kernel with padding: some kernel taps never land in bounds.
#[test]
fn conv_stride_beyond_kernel_with_pad() {
    let conv = Conv2d { in_channels: 2, out_channels: 3, kernel: [1, 2], stride: [3, 3], pad: [2, 1], dilation: [1, 1], groups: 1, bias: true };
    ConvProblem { n: 1, h: 4, w: 5, conv, seed: 7 }.check();
}

/// cover_all's last window hangs over the edge by stride − 1.
#[test]
fn max_pool_cover_all_overhang() {
    let pool = Pool2d { kernel: [2, 3], stride: [3, 2], pad: [1, 0], cover_all: true, exclude_pad: false };
    PoolProblem { c: 1, h: 7, w: 4, pool, max: true, seed: 3 }.check();
}
