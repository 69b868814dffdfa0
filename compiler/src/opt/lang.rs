//! The e-graph language of layer graphs, its shape analysis and the per-backend cost model.

use cnnc_runtime::op::{Axis, BatchNorm, Conv2d, Dims, Fused, FusedBase, Linear, Lrn, Pool2d};
use cnnc_runtime::Op;
use egg::{define_language, Analysis, DidMerge, EGraph, Id, Language, Symbol};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

define_language! {
    /// Tensor ops take their attributes as the first child (an [`Attr`] leaf), then tensor inputs, then
    /// parameters; parameters are terms (`param`, `fold-w`, `fold-b`, `cat`) evaluated at compile time.
    pub enum Cnn {
        "input" = Input(Id),
        "conv" = Conv([Id; 4]),
        "linear" = Linear([Id; 4]),
        "bn" = Bn([Id; 6]),
        "relu" = Relu(Id),
        "maxpool" = MaxPool([Id; 2]),
        "avgpool" = AvgPool([Id; 2]),
        "lrn" = Lrn([Id; 2]),
        "dropout" = Dropout([Id; 2]),
        "softmax" = Softmax([Id; 2]),
        "reshape" = Reshape([Id; 2]),
        "slice" = Slice([Id; 2]),
        "concat" = Concat(Box<[Id]>),
        "add" = Add([Id; 2]),
        "conv-relu" = ConvRelu([Id; 4]),
        "conv-relu-maxpool" = ConvReluMaxPool([Id; 5]),
        "linear-relu" = LinearRelu([Id; 4]),
        "param" = Param(Id),
        "nobias" = NoBias,
        "fold-w" = FoldW([Id; 4]),
        "fold-b" = FoldB([Id; 6]),
        "cat" = Cat([Id; 2]),
        Attr(Attr),
        Key(Symbol),
    }
}

/// An op's attributes as a typed leaf: printed and parsed in the IR dump's syntax
/// (`conv2d[96 <- 3, k=11x11, s=4x4, p=0x0]`); equal, ordered and hashed by that text.
#[derive(Clone, Debug)]
pub struct Attr {
    pub op: Op,
    text: String,
}

impl Attr {
    pub fn new(op: Op) -> Self {
        Attr { text: op.to_string(), op }
    }
}

impl PartialEq for Attr {
    fn eq(&self, o: &Self) -> bool {
        self.text == o.text
    }
}
impl Eq for Attr {}
impl PartialOrd for Attr {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Attr {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.text.cmp(&o.text)
    }
}
impl std::hash::Hash for Attr {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.text.hash(h)
    }
}
impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Attr {
    type Err = String;

    /// Parses what [`Op`]'s `Display` prints.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, body) = match s.find('[') {
            Some(i) if s.ends_with(']') => (&s[..i], &s[i + 1..s.len() - 1]),
            _ => (s, ""),
        };
        let (main, pool) = body.split_once("; ").unwrap_or((body, ""));
        let fields = |t: &str| -> HashMap<String, String> {
            t.split(", ")
                .filter(|f| !f.is_empty())
                .map(|f| f.split_once('=').map_or((f.to_string(), String::new()), |(k, v)| (k.to_string(), v.to_string())))
                .collect()
        };
        let f = fields(main);
        let bad = || format!("not an op attribute: `{s}`");
        let num = |k: &str| -> Result<f64, String> { f.get(k).and_then(|v| v.parse().ok()).ok_or_else(bad) };
        let int = |k: &str| -> Result<usize, String> { f.get(k).and_then(|v| v.parse().ok()).ok_or_else(bad) };
        let pair = |m: &HashMap<String, String>, k: &str| -> Result<[usize; 2], String> {
            let (a, b) = m.get(k).and_then(|v| v.split_once('x')).ok_or_else(bad)?;
            Ok([a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?])
        };
        let out_in = || -> Result<(usize, usize), String> {
            let arrow = f.keys().find(|k| k.contains(" <- ")).ok_or_else(bad)?;
            let (o, i) = arrow.split_once(" <- ").ok_or_else(bad)?;
            Ok((o.parse().map_err(|_| bad())?, i.parse().map_err(|_| bad())?))
        };
        let conv = || -> Result<Conv2d, String> {
            let (out_channels, in_channels) = out_in()?;
            let groups = if f.contains_key("groups") { int("groups")? } else { 1 };
            Ok(Conv2d {
                in_channels,
                out_channels,
                kernel: pair(&f, "k")?,
                stride: pair(&f, "s")?,
                pad: pair(&f, "p")?,
                groups,
                bias: !f.contains_key("nobias"),
            })
        };
        let linear = || -> Result<Linear, String> {
            let (out_features, in_features) = out_in()?;
            Ok(Linear { in_features, out_features, bias: !f.contains_key("nobias") })
        };
        let pool_of = |t: &str| -> Result<Pool2d, String> {
            let m = fields(t);
            Ok(Pool2d { kernel: pair(&m, "k")?, stride: pair(&m, "s")?, pad: pair(&m, "p")?, cover_all: m.contains_key("cover_all") })
        };
        let op = match name {
            "conv2d" => Op::Conv2d(conv()?),
            "linear" => Op::Linear(linear()?),
            "batch_norm" => Op::BatchNorm(BatchNorm { channels: main.split(", ").next().and_then(|c| c.parse().ok()).ok_or_else(bad)?, eps: num("eps")? }),
            "relu" => Op::Relu,
            "add" => Op::Add,
            "max_pool2d" => Op::MaxPool2d(pool_of(main)?),
            "avg_pool2d" => Op::AvgPool2d(pool_of(main)?),
            "lrn" => Op::Lrn(Lrn { n: int("n")?, k: num("k")?, alpha: num("alpha")?, beta: num("beta")? }),
            "dropout" => Op::Dropout { ratio: num("ratio")? },
            "softmax" => Op::Softmax { axis: Axis(int("axis")?) },
            "concat" => Op::Concat { axis: Axis(int("axis")?) },
            "reshape" => Op::Reshape { dims: main.split(", ").skip(1).map(|d| d.parse().map_err(|_| bad())).collect::<Result<_, _>>()? },
            "slice" => {
                let range = main.split(", ").nth(1).and_then(|r| r.split_once("..")).ok_or_else(bad)?;
                let (a, b): (usize, usize) = (range.0.parse().map_err(|_| bad())?, range.1.parse().map_err(|_| bad())?);
                Op::Slice { axis: Axis(int("axis")?), start: a, len: b.checked_sub(a).ok_or_else(bad)? }
            }
            "conv2d+relu" => Op::Fused(Fused { base: FusedBase::Conv(conv()?), relu: true, pool: None }),
            "conv2d+relu+max_pool2d" => Op::Fused(Fused { base: FusedBase::Conv(conv()?), relu: true, pool: Some(pool_of(pool)?) }),
            "linear+relu" => Op::Fused(Fused { base: FusedBase::Linear(linear()?), relu: true, pool: None }),
            _ => return Err(bad()),
        };
        let attr = Attr::new(op);
        if attr.text != s {
            return Err(format!("`{s}` does not print back as itself (`{}`)", attr.text));
        }
        Ok(attr)
    }
}

/// The runtime op an e-node computes, with the e-classes of its tensor inputs and of its parameters.
pub fn op_of(eg: &EGraph<Cnn, Shapes>, node: &Cnn) -> Option<(Op, Vec<Id>, Vec<Id>)> {
    let attr = |id: &Id| eg[*id].nodes.iter().find_map(|n| if let Cnn::Attr(a) = n { Some(a.op.clone()) } else { None }).expect("attribute leaf");
    let has_bias = |b: &Id| !eg[*b].nodes.iter().any(|n| matches!(n, Cnn::NoBias));
    let bias = |b: &Id| if has_bias(b) { vec![*b] } else { vec![] };
    // The bias-ness of a layer is its bias child's: folding BatchNormalization gives a nobias layer a bias.
    let layer = |a: &Id, b: &Id| match attr(a) {
        Op::Conv2d(c) => Op::Conv2d(Conv2d { bias: has_bias(b), ..c }),
        Op::Linear(l) => Op::Linear(Linear { bias: has_bias(b), ..l }),
        other => other,
    };
    let fused = |a: &Id, b: &Id, pool: Option<&Id>| {
        let base = match layer(a, b) {
            Op::Conv2d(c) => FusedBase::Conv(c),
            Op::Linear(l) => FusedBase::Linear(l),
            other => unreachable!("fused base is {other}"),
        };
        let pool = pool.map(|p| match attr(p) {
            Op::MaxPool2d(p) => p,
            other => unreachable!("fused pool is {other}"),
        });
        Op::Fused(Fused { base, relu: true, pool })
    };
    Some(match node {
        Cnn::Conv([a, x, w, b]) | Cnn::Linear([a, x, w, b]) => (layer(a, b), vec![*x], [vec![*w], bias(b)].concat()),
        Cnn::ConvRelu([a, x, w, b]) | Cnn::LinearRelu([a, x, w, b]) => (fused(a, b, None), vec![*x], [vec![*w], bias(b)].concat()),
        Cnn::ConvReluMaxPool([a, p, x, w, b]) => (fused(a, b, Some(p)), vec![*x], [vec![*w], bias(b)].concat()),
        Cnn::Bn([a, x, g, be, m, v]) => (attr(a), vec![*x], vec![*g, *be, *m, *v]),
        Cnn::Relu(x) => (Op::Relu, vec![*x], vec![]),
        Cnn::Add([x, y]) => (Op::Add, vec![*x, *y], vec![]),
        Cnn::MaxPool([a, x])
        | Cnn::AvgPool([a, x])
        | Cnn::Lrn([a, x])
        | Cnn::Dropout([a, x])
        | Cnn::Softmax([a, x])
        | Cnn::Reshape([a, x])
        | Cnn::Slice([a, x]) => (attr(a), vec![*x], vec![]),
        Cnn::Concat(ids) => (attr(&ids[0]), ids[1..].to_vec(), vec![]),
        _ => return None,
    })
}

/// Shapes of e-classes: per-sample dims of tensors, full dims of parameter terms, `None` for leaves.
#[derive(Default)]
pub struct Shapes {
    pub inputs: HashMap<Symbol, Dims>,
    pub params: HashMap<Symbol, Dims>,
}

impl Analysis<Cnn> for Shapes {
    type Data = Option<Dims>;

    fn make(eg: &mut EGraph<Cnn, Self>, node: &Cnn, _: Id) -> Self::Data {
        let dims = |id: &Id| eg[*id].data.clone();
        match node {
            Cnn::Input(k) | Cnn::Param(k) => {
                let key = eg[*k].nodes.iter().find_map(|n| if let Cnn::Key(s) = n { Some(*s) } else { None })?;
                let table = if matches!(node, Cnn::Input(_)) { &eg.analysis.inputs } else { &eg.analysis.params };
                table.get(&key).cloned()
            }
            Cnn::FoldW([_, w, _, _]) => dims(w),
            Cnn::FoldB([_, _, g, ..]) => dims(g),
            Cnn::Cat([a, b]) => {
                let (mut a, b) = (dims(a)?, dims(b)?);
                a[0] += b[0];
                Some(a)
            }
            Cnn::Attr(_) | Cnn::Key(_) | Cnn::NoBias => None,
            _ => {
                let (op, ins, _) = op_of(eg, node)?;
                let shapes: Option<Vec<Dims>> = ins.iter().map(dims).collect();
                let shapes = shapes?;
                op.output_shape(&shapes.iter().map(Vec::as_slice).collect::<Vec<_>>()).ok()
            }
        }
    }

    fn merge(&mut self, a: &mut Self::Data, b: Self::Data) -> DidMerge {
        debug_assert!(a.is_none() || b.is_none() || *a == b, "equal e-classes have equal shapes: {a:?} vs {b:?}");
        if a.is_none() && b.is_some() {
            *a = b;
            return DidMerge(true, false);
        }
        DidMerge(false, a.is_some() && b.is_none())
    }
}

/// What a backend charges for one kernel, in ns per sample. The constants are round numbers for the
/// machines cnnc targets; only their ratios matter to extraction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostModel {
    pub name: &'static str,
    /// Fixed cost of a kernel: a thread-pool fork/join on CPU (≈ 2 µs), a launch on a GPU (≈ 5 µs).
    pub launch: f64,
    /// Memory traffic: ≈ 20 GB/s per socket on the 2-core CPU, ≈ 3 TB/s of HBM on an H100.
    pub per_byte: f64,
    /// Arithmetic: ≈ 100 GMAC/s on 2 AVX-512 cores, ≈ 25 TMAC/s of fp32 FMA on an H100.
    pub per_mac: f64,
    /// Whether the backend executes fused conv/linear epilogues (a fusion it cannot run costs infinity).
    pub fuses: bool,
}

pub const CPU: CostModel = CostModel { name: "cpu", launch: 2_000.0, per_byte: 0.05, per_mac: 0.01, fuses: true };
pub const CUDA: CostModel = CostModel { name: "cuda", launch: 5_000.0, per_byte: 0.000_33, per_mac: 0.000_04, fuses: true };

impl CostModel {
    /// The cost of one kernel computing `op` on inputs of these per-sample shapes.
    pub fn kernel(&self, op: &Op, inputs: &[&[usize]]) -> f64 {
        if matches!(op, Op::Fused(_)) && !self.fuses {
            return f64::INFINITY;
        }
        // Views cost nothing: a reshape keeps the data, a channel slice is an offset (batch 1) or a stride.
        if matches!(op, Op::Reshape { .. } | Op::Slice { .. }) {
            return 0.0;
        }
        let numel = |d: &[usize]| d.iter().product::<usize>() as f64;
        let out = op.output_shape(inputs).map_or(0.0, |o| numel(&o));
        let weights: f64 = op.params().iter().map(|(_, d)| numel(d)).sum();
        let bytes = 4.0 * (inputs.iter().map(|d| numel(d)).sum::<f64>() + out + weights);
        self.launch + bytes * self.per_byte + op.macs(inputs) as f64 * self.per_mac
    }
}

/// Extraction cost: kernels by the cost model; parameter terms are evaluated once at compile time, so
/// they cost almost nothing (a little, so that no transform is chosen without a reason).
pub struct Cost<'a> {
    pub egraph: &'a EGraph<Cnn, Shapes>,
    pub model: CostModel,
}

impl egg::CostFunction<Cnn> for Cost<'_> {
    type Cost = f64;

    fn cost<C: FnMut(Id) -> f64>(&mut self, node: &Cnn, mut costs: C) -> f64 {
        let own = match op_of(self.egraph, node) {
            Some((op, ins, _)) => {
                let shapes: Option<Vec<Dims>> = ins.iter().map(|i| self.egraph[*i].data.clone()).collect();
                match shapes {
                    Some(s) => self.model.kernel(&op, &s.iter().map(Vec::as_slice).collect::<Vec<_>>()),
                    None => f64::INFINITY,
                }
            }
            None if matches!(node, Cnn::FoldW(_) | Cnn::FoldB(_) | Cnn::Cat(_)) => 1e-3,
            None => 0.0,
        };
        node.fold(own, |sum, id| sum + costs(id))
    }
}
