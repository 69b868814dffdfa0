//! Differential: a random small model that is valid by construction (convolutions with groups, strides,
//! pads and dilations, BN, ReLU, pooling with cover_all, LRN, residual adds, a Linear head), run on the
//! reference interpreter unoptimized and on the JIT optimized and not, on every tier this CPU has, with
//! 1 and 2 threads: every JIT result within 1e-4 of the reference (relative to its largest value, or
//! absolute below 1), and
//! the same bytes for any thread count.
#![no_main]
use arbitrary::Arbitrary;
use cnnc::backend::{Backend, Options, Runner, TierChoice};
use cnnc::diag::Source;
use cnnc::kernel::{WeightsDtype, Winograd};
use cnnc_runtime::Tensor;

#[derive(Arbitrary, Debug)]
struct Net {
    channels: u8,
    size: u8,
    batch: u8,
    layers: Vec<Layer>,
    head: Option<u8>,
    seed: u32,
}

#[derive(Arbitrary, Debug)]
enum Layer {
    Conv { out: u8, k: u8, stride: u8, pad: u8, dilate: u8, groups: u8, bias: bool, bn: bool },
    Relu,
    MaxPool { k: u8, stride: u8, pad: u8 },
    AvgPool { k: u8, stride: u8, pad: u8 },
    Lrn,
    Residual { k: u8, relu: bool },
}

/// The model text and the input shape. A layer that would leave nothing is skipped: the model is always valid.
fn text(net: &Net) -> (String, [usize; 4]) {
    let (mut c, mut h, mut w) = (net.channels as usize % 6 + 1, net.size as usize % 11 + 2, net.size as usize / 16 % 11 + 2);
    let input = [net.batch as usize % 3 + 1, c, h, w];
    let (mut links, mut body) = (String::new(), String::new());
    for (i, l) in net.layers.iter().take(8).enumerate() {
        match *l {
            Layer::Conv { out, k, stride, pad, dilate, groups, bias, bn } => {
                let g = [1, 2, 3, 4].into_iter().filter(|g| c % g == 0).nth(groups as usize % 4).unwrap_or(1);
                let out = (out as usize % 8 + 1) * g;
                let (k, s, p, d) = (k as usize % 5 + 1, stride as usize % 3 + 1, pad as usize % 3, dilate as usize % 2 + 1);
                let span = d * (k - 1) + 1;
                if h + 2 * p < span || w + 2 * p < span {
                    continue;
                }
                let nobias = if bias { "" } else { ", nobias=True" };
                links += &format!("    c{i} = L.Convolution2D({c}, {out}, {k}, stride={s}, pad={p}, dilate={d}, groups={g}{nobias})\n");
                body += &format!("        h = self.c{i}(h)\n");
                if bn {
                    links += &format!("    b{i} = L.BatchNormalization({out})\n");
                    body += &format!("        h = self.b{i}(h)\n");
                }
                (c, h, w) = (out, (h + 2 * p - span) / s + 1, (w + 2 * p - span) / s + 1);
            }
            Layer::Relu => body += "        h = F.relu(h)\n",
            Layer::MaxPool { k, stride, pad } => {
                let (k, s) = (k as usize % 3 + 1, stride as usize % 3 + 1);
                let p = pad as usize % k.div_ceil(2).max(1);
                // Chainer's cover_all: the last window may hang over the edge.
                let (nh, nw) = ((h + 2 * p - k + s - 1) / s + 1, (w + 2 * p - k + s - 1) / s + 1);
                if h + 2 * p < k || w + 2 * p < k {
                    continue;
                }
                body += &format!("        h = F.max_pooling_2d(h, {k}, stride={s}, pad={p})\n");
                (h, w) = (nh, nw);
            }
            Layer::AvgPool { k, stride, pad } => {
                let (k, s) = (k as usize % 3 + 1, stride as usize % 3 + 1);
                let p = pad as usize % k.div_ceil(2).max(1);
                if h + 2 * p < k || w + 2 * p < k {
                    continue;
                }
                body += &format!("        h = F.average_pooling_2d(h, {k}, stride={s}, pad={p})\n");
                (h, w) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            }
            Layer::Lrn => body += "        h = F.local_response_normalization(h)\n",
            Layer::Residual { k, relu } => {
                let k = [1, 3][k as usize % 2];
                links += &format!("    r{i} = L.Convolution2D({c}, {c}, {k}, pad={})\n", k / 2);
                body += &format!("        h = {}self.r{i}(h) + h{}\n", if relu { "F.relu(" } else { "" }, if relu { ")" } else { "" });
            }
        }
    }
    let ret = match net.head {
        Some(n) => {
            links += &format!("    fc = L.Linear({}, {})\n", c * h * w, n as usize % 10 + 1);
            "self.fc(h)"
        }
        None => "h",
    };
    (format!("model Fuzz {{\n{links}    forward(x: [{}, {}, {}]) {{\n        h = x\n{body}        return {ret}\n    }}\n}}\n", input[1], input[2], input[3]), input)
}

fn options(backend: Backend, tier: TierChoice, threads: u32) -> Options {
    Options { backend, tier, threads: Some(threads), weights_dtype: WeightsDtype::F32, winograd: Winograd::Auto }
}

libfuzzer_sys::fuzz_target!(|net: Net| {
    let (model, shape) = text(&net);
    let src = Source::new("fuzz.model", model.clone());
    let (g, _) = cnnc::compile(&src).unwrap_or_else(|cnnc::diag::Failed(d)| panic!("a generated model does not compile:\n{model}\n{}", src.render_plain(&d)));
    let bound = cnnc::weights::bind(&g, &cnnc::weights::Weights::init()).expect("initialised weights bind");
    let n: usize = shape.iter().product();
    let mut state = net.seed as u64 | 1;
    let x: Vec<f32> = (0..n).map(|_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 2001) as f32 / 1000.0 - 1.0
    }).collect();
    let x = Tensor::new(shape.to_vec(), x).expect("sized");
    let batch = shape[0];
    let want = Runner::new(&g, bound.clone(), batch, &options(Backend::Reference, TierChoice::Portable, 1)).unwrap().run(&x).unwrap();
    // Relative to the largest finite output, but at least 1: inputs lie in [-1, 1] and weights are
    // LeCun's, so outputs are O(1), and one that cancels to near 0 (a Linear to a single class) would
    // otherwise turn rounding noise of 1e-7 into a large relative error (found by this target: 4.6e-4
    // at |y| ≈ 1e-3). Non-finite outputs are legitimate (a cover_all window wholly in the padding is
    // -inf in Chainer, and a convolution of -inf is NaN) and must match exactly.
    let scale = want.data().iter().filter(|v| v.is_finite()).fold(1f32, |m, v| m.max(v.abs()));
    let distance = |got: &Tensor| {
        got.data().iter().zip(want.data()).fold(0f32, |m, (&a, &b)| {
            let d = if a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()) { 0.0 } else if a.is_finite() && b.is_finite() { (a - b).abs() / scale } else { f32::INFINITY };
            m.max(d)
        })
    };
    let tiers: Vec<TierChoice> = [TierChoice::Portable, TierChoice::Avx2, TierChoice::Avx512].into_iter().filter(|t| t.get().available()).collect();
    for level in [0, 1] {
        let (opt, _) = cnnc::opt::optimize(&g, &cnnc::opt::Options { level, ..Default::default() });
        for &tier in &tiers {
            let one = Runner::new(&opt, bound.clone(), batch, &options(Backend::Jit, tier, 1)).unwrap().run(&x).unwrap();
            let two = Runner::new(&opt, bound.clone(), batch, &options(Backend::Jit, tier, 2)).unwrap().run(&x).unwrap();
            let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert!(bits(&one) == bits(&two), "1 and 2 threads differ (-O{level}, {tier:?}):\n{model}");
            let diff = distance(&one);
            assert!(diff <= 1e-4, "JIT -O{level} {tier:?} is {diff:e} from the reference (max |y| {}):\n{model}", want.max_abs());
        }
    }
});
