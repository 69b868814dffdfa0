//! The reference interpreter: naive, obviously correct f32 NCHW loops for every [`Op`], at any batch size.
//!
//! This is the oracle that every optimized path is checked against, so clarity beats speed here. Each kernel
//! reads whole input tensors and returns a fresh output; shapes were validated when the plan was built
//! ([`Op::output_shape`]), so kernels index without re-checking.

use crate::op::{per_sample_axis, Conv2d, Lrn, Op, Pool2d};
use crate::Tensor;

/// For each element of `dims` transposed by `axes` (a permutation), in order, the index of the element
/// it is: output (o₀, …, oᵣ₋₁) is input i with i[axes[k]] = oₖ.
pub fn transposed(dims: &[usize], axes: &[usize]) -> impl Iterator<Item = usize> {
    let rank = dims.len();
    let mut strides = vec![1; rank];
    for k in (0..rank.saturating_sub(1)).rev() {
        strides[k] = strides[k + 1] * dims[k + 1];
    }
    let out: Vec<usize> = axes.iter().map(|&a| dims[a]).collect();
    let axes = axes.to_vec();
    (0..dims.iter().product()).map(move |mut i| {
        let mut at = 0;
        for k in (0..rank).rev() {
            at += i % out[k] * strides[axes[k]];
            i /= out[k];
        }
        at
    })
}

/// Evaluates `op` on its activation inputs and parameters (in [`Op::params`] order).
pub fn eval(op: &Op, inputs: &[&Tensor], params: &[&Tensor]) -> Tensor {
    let x = inputs[0];
    let out_shape = |per_sample: Vec<usize>| [vec![x.batch()], per_sample].concat();
    let per_sample: Vec<&[usize]> = inputs.iter().map(|t| &t.shape()[1..]).collect();
    let shape = out_shape(op.output_shape(&per_sample).expect("plan validated shapes"));
    match op {
        Op::Conv2d(c) => conv2d(c, x, params[0], params.get(1).copied(), shape),
        Op::BatchNorm(b) => {
            let [gamma, beta, mean, var] = [0, 1, 2, 3].map(|i| params[i].data());
            per_channel(x, |c, v| {
                let y = gamma[c] as f64 * (v as f64 - mean[c] as f64) / (var[c] as f64 + b.eps.0).sqrt() + beta[c] as f64;
                y as f32
            })
        }
        Op::Linear(l) => {
            let (w, mut y) = (params[0].data(), Tensor::zeros(shape));
            for (xn, yn) in x.data().chunks(l.in_features).zip(y.data_mut().chunks_mut(l.out_features)) {
                for (o, yo) in yn.iter_mut().enumerate() {
                    let row = &w[o * l.in_features..(o + 1) * l.in_features];
                    let bias = params.get(1).map_or(0.0, |b| b.data()[o]);
                    *yo = row.iter().zip(xn).fold(bias, |acc, (w, x)| acc + w * x);
                }
            }
            y
        }
        Op::Relu => map(x, |v| max(v, 0.0)),
        Op::Sigmoid => map(x, |v| (1.0 / (1.0 + (-v as f64).exp())) as f32),
        Op::Clip { min, max } => map(x, |v| v.max(min.0 as f32).min(max.0 as f32)),
        Op::Dropout { .. } => x.clone(),
        Op::MaxPool2d(p) => pool(p, x, shape, f32::NEG_INFINITY, max, |m, _| m),
        Op::AvgPool2d(p) => {
            let window = (p.kernel[0] * p.kernel[1]) as f32;
            pool(p, x, shape, 0.0, |a, v| a + v, |s, inside| s / if p.exclude_pad { inside as f32 } else { window })
        }
        Op::Lrn(l) => lrn(l, x),
        Op::Softmax { axis } => {
            let ax = per_sample_axis(*axis, &x.shape()[1..]).expect("validated") + 1;
            softmax(x, ax)
        }
        Op::Reshape { .. } => x.clone().reshaped(shape).expect("validated"),
        Op::Concat { axis } => {
            let ax = axis.0;
            let outer: usize = x.shape()[..ax].iter().product();
            let mut data = Vec::with_capacity(shape.iter().product());
            for o in 0..outer {
                for t in inputs {
                    let block: usize = t.shape()[ax..].iter().product();
                    data.extend_from_slice(&t.data()[o * block..(o + 1) * block]);
                }
            }
            Tensor::new(shape, data).expect("validated")
        }
        Op::Transpose { axes } => Tensor::new(shape, transposed(x.shape(), axes).map(|i| x.data()[i]).collect()).expect("validated"),
        Op::Add => {
            let data = x.data().iter().zip(inputs[1].data()).map(|(a, b)| a + b).collect();
            Tensor::new(shape, data).expect("validated")
        }
        Op::Mul => {
            // Element i of the right operand, or of its channel when it holds one value per channel.
            let (s, per) = (inputs[1].data(), x.data().len() / inputs[1].data().len());
            let data = x.data().iter().enumerate().map(|(i, a)| a * s[i / per]).collect();
            Tensor::new(shape, data).expect("validated")
        }
        // Defined by composition: the layer, then the add, then ReLU, then max pooling.
        Op::Fused(f) => {
            let mut y = eval(&f.base_op(), &inputs[..1], params);
            if f.add {
                y = eval(&Op::Add, &[&y, inputs[1]], &[]);
            }
            if f.relu {
                y = eval(&Op::Relu, &[&y], &[]);
            }
            match &f.pool {
                Some(p) => eval(&Op::MaxPool2d(p.clone()), &[&y], &[]),
                None => y,
            }
        }
        Op::Slice { axis, start, len } => {
            let ax = axis.0;
            let outer: usize = x.shape()[..ax].iter().product();
            let (full, inner) = (x.shape()[ax], x.shape()[ax + 1..].iter().product::<usize>());
            let mut data = Vec::with_capacity(shape.iter().product());
            for o in 0..outer {
                data.extend_from_slice(&x.data()[(o * full + start) * inner..(o * full + start + len) * inner]);
            }
            Tensor::new(shape, data).expect("validated")
        }
    }
}

/// The larger of two values, NaN if either is: numpy's `maximum`, which Chainer's ReLU and max pooling
/// use (`f32::max` would turn a NaN into the other value and hide an overflow upstream).
fn max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

fn map(x: &Tensor, f: impl Fn(f32) -> f32) -> Tensor {
    Tensor::new(x.shape().to_vec(), x.data().iter().map(|&v| f(v)).collect()).expect("same shape")
}

/// Applies `f(channel, value)` to a tensor whose axis 1 is the channel axis.
fn per_channel(x: &Tensor, f: impl Fn(usize, f32) -> f32) -> Tensor {
    let (c, inner) = (x.shape()[1], x.shape()[2..].iter().product::<usize>());
    let data = x.data().iter().enumerate().map(|(i, &v)| f(i / inner % c, v)).collect();
    Tensor::new(x.shape().to_vec(), data).expect("same shape")
}

/// Output positions `o` whose input coordinate `o·stride + k − pad` lies in `0..size`, as a range.
fn valid(out: usize, size: usize, k: usize, stride: usize, pad: usize) -> std::ops::Range<usize> {
    let lo = if k >= pad { 0 } else { (pad - k).div_ceil(stride) };
    let hi = if size + pad > k { ((size + pad - k - 1) / stride + 1).min(out) } else { 0 };
    lo..hi.max(lo)
}

/// Direct convolution: each output plane starts at the bias and accumulates one weight × one shifted
/// input plane at a time, in (input channel, kh, kw) order.
fn conv2d(c: &Conv2d, x: &Tensor, w: &Tensor, b: Option<&Tensor>, shape: Vec<usize>) -> Tensor {
    let [n, ci, h, wi] = dims4(x);
    let [_, co, oh, ow] = [shape[0], shape[1], shape[2], shape[3]];
    let (cig, cog) = (ci / c.groups, co / c.groups);
    let ([kh, kw], [dh, dw]) = (c.kernel, c.dilation);
    let mut y = Tensor::zeros(shape);
    let (xd, wd, yd) = (x.data(), w.data(), y.data_mut());
    for img in 0..n {
        for oc in 0..co {
            let plane = &mut yd[(img * co + oc) * oh * ow..][..oh * ow];
            plane.fill(b.map_or(0.0, |b| b.data()[oc]));
            let g = oc / cog;
            for icg in 0..cig {
                let xin = &xd[(img * ci + g * cig + icg) * h * wi..][..h * wi];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let wv = wd[((oc * cig + icg) * kh + ky) * kw + kx];
                        for oy in valid(oh, h, ky * dh, c.stride[0], c.pad[0]) {
                            let iy = oy * c.stride[0] + ky * dh - c.pad[0];
                            for ox in valid(ow, wi, kx * dw, c.stride[1], c.pad[1]) {
                                let ix = ox * c.stride[1] + kx * dw - c.pad[1];
                                plane[oy * ow + ox] += wv * xin[iy * wi + ix];
                            }
                        }
                    }
                }
            }
        }
    }
    y
}

/// Sliding-window reduction over the in-bounds part of each window (padding never contributes);
/// `finish` gets the reduction and the number of elements it took.
fn pool(p: &Pool2d, x: &Tensor, shape: Vec<usize>, init: f32, fold: impl Fn(f32, f32) -> f32, finish: impl Fn(f32, usize) -> f32) -> Tensor {
    let [n, c, h, w] = dims4(x);
    let [oh, ow] = [shape[2], shape[3]];
    let mut y = Tensor::zeros(shape);
    for (plane, out) in x.data().chunks(h * w).zip(y.data_mut().chunks_mut(oh * ow)).take(n * c) {
        for oy in 0..oh {
            for ox in 0..ow {
                let (mut acc, mut inside) = (init, 0);
                for ky in 0..p.kernel[0] {
                    for kx in 0..p.kernel[1] {
                        let (iy, ix) = ((oy * p.stride[0] + ky) as isize - p.pad[0] as isize, (ox * p.stride[1] + kx) as isize - p.pad[1] as isize);
                        if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                            acc = fold(acc, plane[iy as usize * w + ix as usize]);
                            inside += 1;
                        }
                    }
                }
                out[oy * ow + ox] = finish(acc, inside);
            }
        }
    }
    y
}

fn lrn(l: &Lrn, x: &Tensor) -> Tensor {
    let [n, c, h, w] = dims4(x);
    let hw = h * w;
    let half = l.n / 2;
    let mut y = Tensor::zeros(x.shape().to_vec());
    for img in 0..n {
        let xi = &x.data()[img * c * hw..][..c * hw];
        let yi = &mut y.data_mut()[img * c * hw..][..c * hw];
        for ch in 0..c {
            for p in 0..hw {
                let neighbours = ch.saturating_sub(half)..(ch + half + 1).min(c);
                let sum: f64 = neighbours.map(|j| (xi[j * hw + p] as f64).powi(2)).sum();
                yi[ch * hw + p] = (xi[ch * hw + p] as f64 * (l.k.0 + l.alpha.0 * sum).powf(-l.beta.0)) as f32;
            }
        }
    }
    y
}

/// Numerically stable softmax along full-tensor axis `ax`.
fn softmax(x: &Tensor, ax: usize) -> Tensor {
    let s = x.shape();
    let (len, inner) = (s[ax], s[ax + 1..].iter().product::<usize>());
    let mut y = x.clone();
    for block in y.data_mut().chunks_mut(len * inner) {
        for i in 0..inner {
            let idx = |k: usize| k * inner + i;
            let m = (0..len).map(|k| block[idx(k)]).fold(f32::NEG_INFINITY, f32::max);
            let total: f64 = (0..len).map(|k| ((block[idx(k)] - m) as f64).exp()).sum();
            for k in 0..len {
                block[idx(k)] = (((block[idx(k)] - m) as f64).exp() / total) as f32;
            }
        }
    }
    y
}

fn dims4(x: &Tensor) -> [usize; 4] {
    let s = x.shape();
    [s[0], s[1], s[2], s[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Axis, F64};

    fn t(shape: &[usize], data: &[f32]) -> Tensor {
        Tensor::new(shape.to_vec(), data.to_vec()).unwrap()
    }

    #[test]
    fn valid_range_matches_bounds_check() {
        for size in 1..8 {
            for k in 0..4 {
                for stride in 1..4 {
                    for pad in 0..3 {
                        let out = 10;
                        let expect: Vec<usize> = (0..out)
                            .filter(|o| {
                                let i = (o * stride + k) as isize - pad as isize;
                                (0..size as isize).contains(&i)
                            })
                            .collect();
                        assert_eq!(valid(out, size, k, stride, pad).collect::<Vec<_>>(), expect, "{size} {k} {stride} {pad}");
                    }
                }
            }
        }
    }

    #[test]
    fn cover_all_window_sees_the_last_row() {
        // 1x1x4x4 ramp, k2 s3 cover_all: out 2x2; the second window holds only row/col 3.
        let x = t(&[1, 1, 4, 4], &(0..16).map(|v| v as f32).collect::<Vec<_>>());
        let p = Pool2d { kernel: [2, 2], stride: [3, 3], pad: [0, 0], cover_all: true, exclude_pad: false };
        let y = eval(&Op::MaxPool2d(p), &[&x], &[]);
        assert_eq!(y.shape(), &[1, 1, 2, 2]);
        assert_eq!(y.data(), &[5.0, 7.0, 13.0, 15.0]);
    }

    #[test]
    fn average_pool_counts_padding() {
        let x = t(&[1, 1, 2, 2], &[4.0, 4.0, 4.0, 4.0]);
        let p = Pool2d { kernel: [2, 2], stride: [2, 2], pad: [1, 1], cover_all: false, exclude_pad: false };
        let y = eval(&Op::AvgPool2d(p), &[&x], &[]);
        assert_eq!(y.data(), &[1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn lrn_uses_plain_sum() {
        // Single channel: y = x (k + α x²)^(−β).
        let x = t(&[1, 1, 1, 1], &[2.0]);
        let y = eval(&Op::Lrn(Lrn { n: 5, k: F64(2.0), alpha: F64(0.5), beta: F64(1.0) }), &[&x], &[]);
        assert_eq!(y.data(), &[2.0 / (2.0 + 0.5 * 4.0)]);
    }

    #[test]
    fn softmax_rows_sum_to_one() {
        let x = t(&[2, 3], &[1.0, 2.0, 3.0, -1.0, 0.0, 1000.0]);
        let y = eval(&Op::Softmax { axis: Axis(1) }, &[&x], &[]);
        for row in y.data().chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        assert_eq!(y.data()[5], 1.0);
    }
}
