//! The closed set of tensor operations cnnc knows.
//!
//! Every op is one variant of [`Op`] with a typed attribute struct. This module owns, for each op:
//! its output shape ([`Op::output_shape`]), the Chainer names and shapes of its parameters
//! ([`Op::params`]), and its multiply-accumulate count ([`Op::macs`]). The reference semantics live in
//! [`crate::reference`]. Shapes here are *per sample*: the batch axis is implicit and symbolic.

use std::fmt;

/// A per-sample shape (the batch axis is omitted).
pub type Dims = Vec<usize>;

/// A real-valued attribute (eps, LRN's k/α/β, a dropout ratio), equal, ordered and hashed by its bits:
/// ops are data — the e-graph and every table key them — so `0.0` and `-0.0` are two attributes, and NaN
/// is equal to itself.
#[derive(Clone, Copy, Debug)]
pub struct F64(pub f64);

impl PartialEq for F64 {
    fn eq(&self, o: &Self) -> bool {
        self.0.to_bits() == o.0.to_bits()
    }
}
impl Eq for F64 {}
impl std::hash::Hash for F64 {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.to_bits().hash(h)
    }
}
impl PartialOrd for F64 {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for F64 {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// `L.Convolution2D`: weights `W` (out, in/groups, kh, kw), optional bias `b` (out).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Conv2d {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    /// Chainer's `dilate`: tap (ky, kx) reads input pixel (oy·s + ky·d − p, …); 1 is a plain convolution.
    pub dilation: [usize; 2],
    pub groups: usize,
    pub bias: bool,
}

impl Conv2d {
    /// The extent of the kernel's taps on the input, (k − 1)·d + 1 per axis.
    pub fn span(&self) -> [usize; 2] {
        [0, 1].map(|a| (self.kernel[a] - 1) * self.dilation[a] + 1)
    }
}

/// `L.BatchNormalization` at inference: y = γ (x − avg_mean) / √(avg_var + eps) + β, per channel.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchNorm {
    pub channels: usize,
    pub eps: F64,
}

/// `L.Linear`: the input is flattened per sample in NCHW order; y = x·Wᵀ + b with W (out, in).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Linear {
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
}

/// `F.max_pooling_2d` / `F.average_pooling_2d`.
///
/// `cover_all` (max pooling only) uses Chainer's ceil-mode size `(H + 2p − k + s − 1) / s + 1`.
/// Average pooling divides by `kh·kw`, padded zeros included (Chainer's semantics), or with
/// `exclude_pad` by the number of input elements in the window (Chainer's `pad_value=None`, ONNX's
/// `count_include_pad=0`). Max pooling ignores padding either way and keeps `exclude_pad` false.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pool2d {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    pub cover_all: bool,
    pub exclude_pad: bool,
}

/// `F.local_response_normalization`: y = x · (k + α Σ x²)^(−β), the sum over the `n / 2` channels on each
/// side, clipped at the edges. Chainer multiplies α by the plain sum (ONNX and PyTorch use α/n).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lrn {
    pub n: usize,
    pub k: F64,
    pub alpha: F64,
    pub beta: F64,
}

/// A convolution or linear layer with its epilogue fused: bias, then a residual add, then ReLU, then
/// max pooling, applied before the store. Its meaning is exactly that composition (see
/// `reference::eval`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fused {
    pub base: FusedBase,
    /// A second input of the output's shape added before the activation (a ResNet shortcut;
    /// convolutions without pooling only).
    pub add: bool,
    pub relu: bool,
    /// Max pooling after the activation (convolutions only).
    pub pool: Option<Pool2d>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FusedBase {
    Conv(Conv2d),
    Linear(Linear),
}

impl Fused {
    pub fn base_op(&self) -> Op {
        match &self.base {
            FusedBase::Conv(c) => Op::Conv2d(c.clone()),
            FusedBase::Linear(l) => Op::Linear(l.clone()),
        }
    }
}

impl FusedBase {
    /// The layer an op is, if it is a convolution or a linear layer.
    pub fn of(op: Op) -> Option<FusedBase> {
        if let Op::Linear(l) = op {
            return Some(FusedBase::Linear(l));
        }
        if let Op::Conv2d(c) = op {
            Some(FusedBase::Conv(c))
        } else {
            None
        }
    }
}

/// An axis of the full (batched) tensor, as Chainer numbers them: axis 0 is the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Axis(pub usize);

/// The closed op set. Inputs are activations; parameters are listed by [`Op::params`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Conv2d(Conv2d),
    BatchNorm(BatchNorm),
    Linear(Linear),
    Relu,
    /// `F.sigmoid`: 1 / (1 + e^(−x)).
    Sigmoid,
    /// `F.clip(x, x_min, x_max)`: min(max(x, x_min), x_max) (ReLU6 is `clip(x, 0, 6)`).
    Clip {
        min: F64,
        max: F64,
    },
    MaxPool2d(Pool2d),
    AvgPool2d(Pool2d),
    Lrn(Lrn),
    /// Identity at inference; the ratio is kept for the dump.
    Dropout {
        ratio: F64,
    },
    Softmax {
        axis: Axis,
    },
    /// Reshape to the given per-sample dims (already resolved: no −1).
    Reshape {
        dims: Dims,
    },
    Concat {
        axis: Axis,
    },
    /// `F.transpose(x, axes)`: output axis i is input axis `axes[i]`, over the full tensor's axes (the
    /// batch, axis 0, stays first).
    Transpose {
        axes: Dims,
    },
    Add,
    /// `a * b`: element-wise product; `b` may hold one value per channel (N, C, 1, 1) and is broadcast.
    Mul,
    Fused(Fused),
    /// `len` entries from `start` along `axis` (the outputs of merged parallel convolutions).
    Slice {
        axis: Axis,
        start: usize,
        len: usize,
    },
}

/// Why an op cannot be applied to inputs of the given shapes. The message is complete on its own;
/// the compiler adds the source location.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShapeError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ShapeError> {
    Err(ShapeError(msg.into()))
}

/// Formats a per-sample shape with the symbolic batch axis in front: `[N, 96, 55, 55]`.
pub struct Batched<'a>(pub &'a [usize]);

impl fmt::Display for Batched<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[N")?;
        for d in self.0 {
            write!(f, ", {d}")?;
        }
        write!(f, "]")
    }
}

/// Output extent of a sliding window, or `None` when the window does not fit.
pub fn window_out(size: usize, k: usize, s: usize, p: usize, cover_all: bool) -> Option<usize> {
    let span = (size + 2 * p).checked_sub(k)?;
    Some(if cover_all { span.div_ceil(s) + 1 } else { span / s + 1 })
}

impl Op {
    /// Number of activation inputs the op takes (`None`: any number ≥ 1).
    pub fn arity(&self) -> Option<usize> {
        match self {
            Op::Concat { .. } => None,
            Op::Add | Op::Mul => Some(2),
            Op::Conv2d(_) | Op::BatchNorm(_) | Op::Linear(_) | Op::Relu | Op::Sigmoid | Op::Clip { .. } | Op::MaxPool2d(_) | Op::AvgPool2d(_) => Some(1),
            Op::Lrn(_) | Op::Dropout { .. } | Op::Softmax { .. } | Op::Reshape { .. } | Op::Slice { .. } | Op::Transpose { .. } => Some(1),
            Op::Fused(f) => Some(1 + usize::from(f.add)),
        }
    }

    /// The bias flag of a convolution or linear layer, fused or not (`None`: the op has no optional bias).
    pub fn bias_mut(&mut self) -> Option<&mut bool> {
        match self {
            Op::Conv2d(Conv2d { bias, .. }) | Op::Linear(Linear { bias, .. }) => Some(bias),
            Op::Fused(Fused { base: FusedBase::Conv(Conv2d { bias, .. }) | FusedBase::Linear(Linear { bias, .. }), .. }) => Some(bias),
            Op::BatchNorm(_) | Op::Relu | Op::Sigmoid | Op::Clip { .. } | Op::MaxPool2d(_) | Op::AvgPool2d(_) | Op::Lrn(_) | Op::Dropout { .. } => None,
            Op::Softmax { .. } | Op::Reshape { .. } | Op::Concat { .. } | Op::Transpose { .. } | Op::Add | Op::Mul | Op::Slice { .. } => None,
        }
    }

    /// The short name used in dumps, tables, the e-graph's patterns and the docs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv2d(_) => "conv2d",
            Op::BatchNorm(_) => "batch_norm",
            Op::Linear(_) => "linear",
            Op::Relu => "relu",
            Op::Sigmoid => "sigmoid",
            Op::Clip { .. } => "clip",
            Op::MaxPool2d(_) => "max_pool2d",
            Op::AvgPool2d(_) => "avg_pool2d",
            Op::Lrn(_) => "lrn",
            Op::Dropout { .. } => "dropout",
            Op::Softmax { .. } => "softmax",
            Op::Reshape { .. } => "reshape",
            Op::Concat { .. } => "concat",
            Op::Transpose { .. } => "transpose",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Fused(f) => match (&f.base, f.add, f.relu, f.pool.is_some()) {
                (FusedBase::Conv(_), false, _, false) => "conv2d+relu",
                (FusedBase::Conv(_), false, _, true) => "conv2d+relu+max_pool2d",
                (FusedBase::Conv(_), true, false, _) => "conv2d+add",
                (FusedBase::Conv(_), true, true, _) => "conv2d+add+relu",
                (FusedBase::Linear(_), ..) => "linear+relu",
            },
            Op::Slice { .. } => "slice",
        }
    }

    /// The parameters the op reads, as (Chainer suffix, shape), in the order kernels receive them.
    pub fn params(&self) -> Vec<(&'static str, Dims)> {
        match self {
            Op::Conv2d(c) => {
                let w = vec![c.out_channels, c.in_channels / c.groups, c.kernel[0], c.kernel[1]];
                let mut p = vec![("W", w)];
                if c.bias {
                    p.push(("b", vec![c.out_channels]));
                }
                p
            }
            Op::Linear(l) => {
                let mut p = vec![("W", vec![l.out_features, l.in_features])];
                if l.bias {
                    p.push(("b", vec![l.out_features]));
                }
                p
            }
            Op::Fused(f) => f.base_op().params(),
            Op::BatchNorm(b) => ["gamma", "beta", "avg_mean", "avg_var"].into_iter().map(|n| (n, vec![b.channels])).collect(),
            Op::Relu | Op::Sigmoid | Op::Clip { .. } | Op::MaxPool2d(_) | Op::AvgPool2d(_) | Op::Lrn(_) | Op::Dropout { .. } => vec![],
            Op::Softmax { .. } | Op::Reshape { .. } | Op::Concat { .. } | Op::Transpose { .. } | Op::Add | Op::Mul | Op::Slice { .. } => vec![],
        }
    }

    /// Infers the per-sample output shape from the per-sample input shapes.
    pub fn output_shape(&self, inputs: &[&[usize]]) -> Result<Dims, ShapeError> {
        match self.arity() {
            Some(n) if inputs.len() != n => return err(format!("expects {n} input(s), got {}", inputs.len())),
            None if inputs.is_empty() => return err("expects at least one input"),
            _ => {}
        }
        let x = inputs[0];
        match self {
            Op::Conv2d(c) => {
                let [ch, h, w] = chw(x, "convolution")?;
                if ch != c.in_channels {
                    return err(format!("expects {} input channels, but its input {} has {ch}", c.in_channels, Batched(x)));
                }
                let [sh, sw] = c.span();
                match (window_out(h, sh, c.stride[0], c.pad[0], false), window_out(w, sw, c.stride[1], c.pad[1], false)) {
                    (Some(oh), Some(ow)) => Ok(vec![c.out_channels, oh, ow]),
                    _ => {
                        let dilated = if c.dilation == [1, 1] { String::new() } else { format!(" (dilated: spanning {sh}x{sw})") };
                        err(format!("kernel {}x{}{dilated} does not fit input {} with pad {}x{}", c.kernel[0], c.kernel[1], Batched(x), c.pad[0], c.pad[1]))
                    }
                }
            }
            Op::BatchNorm(b) => {
                if x.first() != Some(&b.channels) {
                    return err(format!(
                        "normalizes {} channels, but its input {} has {}",
                        b.channels,
                        Batched(x),
                        x.first().map_or("none".into(), |c| c.to_string())
                    ));
                }
                Ok(x.to_vec())
            }
            Op::Linear(l) => {
                let n: usize = x.iter().product();
                if n != l.in_features {
                    return err(format!("expects {} input features, but its input {} flattens to {n}", l.in_features, Batched(x)));
                }
                Ok(vec![l.out_features])
            }
            Op::MaxPool2d(p) | Op::AvgPool2d(p) => {
                let [ch, h, w] = chw(x, "pooling")?;
                let oh = window_out(h, p.kernel[0], p.stride[0], p.pad[0], p.cover_all);
                let ow = window_out(w, p.kernel[1], p.stride[1], p.pad[1], p.cover_all);
                match (oh, ow) {
                    (Some(oh), Some(ow)) => Ok(vec![ch, oh, ow]),
                    _ => err(format!("window {}x{} does not fit input {}", p.kernel[0], p.kernel[1], Batched(x))),
                }
            }
            Op::Lrn(_) => {
                chw(x, "local response normalization")?;
                Ok(x.to_vec())
            }
            Op::Relu | Op::Sigmoid | Op::Clip { .. } | Op::Dropout { .. } => Ok(x.to_vec()),
            Op::Softmax { axis } => {
                per_sample_axis(*axis, x)?;
                Ok(x.to_vec())
            }
            Op::Reshape { dims } => {
                let (a, b): (usize, usize) = (x.iter().product(), dims.iter().product());
                if a != b {
                    return err(format!("cannot reshape {} ({a} values) to {}", Batched(x), Batched(dims)));
                }
                Ok(dims.clone())
            }
            Op::Concat { axis } => {
                let ax = per_sample_axis(*axis, x)?;
                let mut out = x.to_vec();
                for (i, y) in inputs.iter().enumerate().skip(1) {
                    let same_rest = y.len() == x.len() && (0..x.len()).all(|d| d == ax || x[d] == y[d]);
                    if !same_rest {
                        return err(format!("input {} has shape {}, which does not match {} except along axis {}", i + 1, Batched(y), Batched(x), axis.0));
                    }
                    out[ax] += y[ax];
                }
                Ok(out)
            }
            Op::Fused(f) => {
                let y = f.base_op().output_shape(&inputs[..1])?;
                match (&f.pool, f.add, &f.base) {
                    (None, false, _) => Ok(y),
                    (Some(p), false, FusedBase::Conv(_)) => Op::MaxPool2d(p.clone()).output_shape(&[&y]),
                    (None, true, FusedBase::Conv(_)) => Op::Add.output_shape(&[&y, inputs[1]]),
                    _ => err("only a convolution fuses max pooling or an add, not both"),
                }
            }
            Op::Transpose { axes } => {
                let mut sorted = axes.clone();
                sorted.sort_unstable();
                if sorted != (0..=x.len()).collect::<Vec<_>>() || axes[0] != 0 {
                    return err(format!("axes {axes:?} are not a permutation of 0..{} that keeps the batch (axis 0) first", x.len() + 1));
                }
                Ok(axes[1..].iter().map(|&a| x[a - 1]).collect())
            }
            Op::Slice { axis, start, len } => {
                let ax = per_sample_axis(*axis, x)?;
                if start + len > x[ax] || *len == 0 {
                    return err(format!("slice {start}..{} is out of range for axis {} of {}", start + len, axis.0, Batched(x)));
                }
                let mut out = x.to_vec();
                out[ax] = *len;
                Ok(out)
            }
            Op::Add => {
                if inputs[0] != inputs[1] {
                    return err(format!("operands have different shapes {} and {} (no broadcasting, as in Chainer)", Batched(inputs[0]), Batched(inputs[1])));
                }
                Ok(x.to_vec())
            }
            Op::Mul => {
                // The right operand may be one value per channel, (C, 1, 1): a squeeze-and-excitation scale.
                let per_channel = inputs[1].first() == x.first() && inputs[1].len() == x.len() && inputs[1][1..].iter().all(|&d| d == 1);
                if inputs[0] != inputs[1] && !per_channel {
                    return err(format!(
                        "operands have shapes {} and {} (the right one must be the same or one value per channel)",
                        Batched(inputs[0]),
                        Batched(inputs[1])
                    ));
                }
                Ok(x.to_vec())
            }
        }
    }

    /// Multiply-accumulates per sample for these input shapes (convolutions and linear layers, fused or
    /// not; other ops count zero). Inputs must be valid for the op.
    pub fn macs(&self, inputs: &[&[usize]]) -> u64 {
        let out = || -> u64 { self.output_shape(inputs).map_or(0, |o| o.iter().map(|&d| d as u64).product()) };
        match self {
            Op::Conv2d(c) => out() * (c.in_channels / c.groups * c.kernel[0] * c.kernel[1]) as u64,
            Op::Linear(l) => out() * l.in_features as u64,
            Op::Fused(f) => f.base_op().macs(&inputs[..1]),
            Op::BatchNorm(_) | Op::Relu | Op::Sigmoid | Op::Clip { .. } | Op::MaxPool2d(_) | Op::AvgPool2d(_) | Op::Lrn(_) | Op::Dropout { .. } => 0,
            Op::Softmax { .. } | Op::Reshape { .. } | Op::Concat { .. } | Op::Transpose { .. } | Op::Add | Op::Mul | Op::Slice { .. } => 0,
        }
    }
}

fn chw(x: &[usize], what: &str) -> Result<[usize; 3], ShapeError> {
    match *x {
        [c, h, w] => Ok([c, h, w]),
        _ => err(format!("{what} needs a 4-d input [N, C, H, W], got {}", Batched(x))),
    }
}

/// Maps a Chainer axis (0 = batch) to a per-sample axis.
pub fn per_sample_axis(axis: Axis, x: &[usize]) -> Result<usize, ShapeError> {
    match axis.0 {
        0 => err("axis 0 is the batch axis, which is symbolic; use axis ≥ 1"),
        a if a > x.len() => err(format!("axis {a} is out of range for {}", Batched(x))),
        a => Ok(a - 1),
    }
}

impl fmt::Display for Op {
    /// The op with its attributes, as in the IR dump: `conv2d[96 <- 3, k=11x11, s=4x4, p=0x0]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hw = |v: [usize; 2]| format!("{}x{}", v[0], v[1]);
        write!(f, "{}", self.name())?;
        match self {
            Op::Conv2d(c) => {
                write!(f, "[{} <- {}, k={}, s={}, p={}", c.out_channels, c.in_channels, hw(c.kernel), hw(c.stride), hw(c.pad))?;
                if c.dilation != [1, 1] {
                    write!(f, ", d={}", hw(c.dilation))?;
                }
                if c.groups != 1 {
                    write!(f, ", groups={}", c.groups)?;
                }
                write!(f, "{}]", if c.bias { "" } else { ", nobias" })
            }
            Op::BatchNorm(b) => write!(f, "[{}, eps={:e}]", b.channels, b.eps.0),
            Op::Linear(l) => write!(f, "[{} <- {}{}]", l.out_features, l.in_features, if l.bias { "" } else { ", nobias" }),
            Op::MaxPool2d(p) | Op::AvgPool2d(p) => {
                write!(f, "[k={}, s={}, p={}", hw(p.kernel), hw(p.stride), hw(p.pad))?;
                write!(f, "{}{}]", if p.cover_all { ", cover_all" } else { "" }, if p.exclude_pad { ", exclude_pad" } else { "" })
            }
            Op::Lrn(l) => write!(f, "[n={}, k={}, alpha={:e}, beta={}]", l.n, l.k.0, l.alpha.0, l.beta.0),
            Op::Dropout { ratio } => write!(f, "[ratio={}]", ratio.0),
            Op::Softmax { axis } | Op::Concat { axis } => write!(f, "[axis={}]", axis.0),
            Op::Reshape { dims } => write!(f, "{}", Batched(dims)),
            Op::Relu | Op::Sigmoid | Op::Add | Op::Mul => Ok(()),
            Op::Clip { min, max } => write!(f, "[{}, {}]", min.0, max.0),
            Op::Slice { axis, start, len } => write!(f, "[axis={}, {start}..{}]", axis.0, start + len),
            Op::Transpose { axes } => write!(f, "{axes:?}"),
            Op::Fused(fu) => {
                // `conv2d+relu+max_pool2d[96 <- 3, ...; k=3x3, ...]`: base attributes, then the pool's.
                let base = fu.base_op().to_string();
                let attrs = base.strip_prefix(fu.base_op().name()).unwrap_or("");
                write!(f, "{}", &attrs[..attrs.len().saturating_sub(1)])?;
                if let Some(p) = &fu.pool {
                    let pool = Op::MaxPool2d(p.clone()).to_string();
                    write!(f, "; {}", &pool["max_pool2d[".len()..pool.len() - 1])?;
                }
                write!(f, "]")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cover_all_is_ceil_mode() {
        // ResNet50's stem pool (k3 s2 p0) on 112: 56 with cover_all, 55 without;
        // GoogLeNetBN's (k3 s2 p1): 57.
        assert_eq!(window_out(112, 3, 2, 0, true), Some(56));
        assert_eq!(window_out(112, 3, 2, 0, false), Some(55));
        assert_eq!(window_out(112, 3, 2, 1, true), Some(57));
        assert_eq!(window_out(55, 3, 2, 0, true), Some(27));
        assert_eq!(window_out(2, 3, 1, 0, false), None);
    }

    #[test]
    fn concat_checks_other_axes() {
        let op = Op::Concat { axis: Axis(1) };
        assert_eq!(op.output_shape(&[&[2, 4, 4], &[3, 4, 4]]).unwrap(), vec![5, 4, 4]);
        assert!(op.output_shape(&[&[2, 4, 4], &[3, 4, 5]]).is_err());
        assert!(Op::Concat { axis: Axis(0) }.output_shape(&[&[2]]).is_err());
    }
}
