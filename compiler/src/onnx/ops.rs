//! The op table: each ONNX node written as model-language lines with ONNX's exact semantics, or folded
//! when its inputs are constants (weights, and the shape arithmetic exporters emit).
//! Invariant left: every tensor value's `shape` is its ONNX shape with the batch (axis 0) taken as 1, and
//! the text computes it for any batch; parameters go to `weights` under `link/W`-style keys.

use super::Const;
use crate::weights::Array;
use cnnc_onnx_proto as pb;
use cnnc_runtime::reference::transposed;
use pb::attribute_proto::AttributeType as AttrType;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

/// The ONNX operators cnnc imports (domain `ai.onnx`).
const SUPPORTED: &[&str] = &[
    "Conv",
    "BatchNormalization",
    "Relu",
    "Sigmoid",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "LRN",
    "Gemm",
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Sum",
    "Flatten",
    "Reshape",
    "Concat",
    "Softmax",
    "Dropout",
    "Identity",
    "Constant",
    "ConstantOfShape",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Cast",
    "ReduceMean",
    "Clip",
    "Div",
    "Transpose",
    "Split",
    "Slice",
    "HardSigmoid",
    "HardSwish",
    "Pad",
];

pub(super) fn supported(op: &str) -> bool {
    SUPPORTED.contains(&op)
}

pub(super) enum Value {
    Const(Const),
    Tensor(Tensor),
}

#[derive(Clone)]
pub(super) struct Tensor {
    var: String,
    shape: Vec<usize>,
    /// The convolution or linear link whose output this is, directly (a constant added to it can go
    /// into its bias).
    link: Option<usize>,
    /// Zeros a `Pad` node put around it (begin H, begin W, end H, end W), not written yet: only a
    /// convolution or an average counting its padding can take them, as its own pads.
    pad: [usize; 4],
}

struct Link {
    name: String,
    /// The constructor call without its closing parenthesis.
    ctor: String,
    /// `Some(has_bias)` for layers with an optional bias.
    bias: Option<bool>,
}

pub(super) struct Writer {
    opset: i64,
    values: HashMap<String, Value>,
    /// How many nodes read each value (and 1 for the graph output).
    uses: HashMap<String, usize>,
    links: Vec<Link>,
    lines: Vec<String>,
    weights: HashMap<String, Array>,
    names: HashSet<String>,
    vars: usize,
}

type R<T> = Result<T, String>;

/// The type of each attribute cnnc reads (the same for every op that has it): one of another type would
/// read as its default (a FLOAT `transA` as no transpose) and the model would run, wrongly.
const ATTRIBUTE_TYPES: [(&str, AttrType); 27] = {
    use AttrType::{Float as F, Int as I, Ints as Is, String as S};
    [
        ("transA", I),
        ("transB", I),
        ("ceil_mode", I),
        ("count_include_pad", I),
        ("group", I),
        ("axis", I),
        ("keepdims", I),
        ("size", I),
        ("storage_order", I),
        ("to", I),
        ("pads", Is),
        ("kernel_shape", Is),
        ("strides", Is),
        ("dilations", Is),
        ("axes", Is),
        ("perm", Is),
        ("split", Is),
        ("alpha", F),
        ("beta", F),
        ("epsilon", F),
        ("bias", F),
        ("gamma", F),
        ("min", F),
        ("max", F),
        ("ratio", F),
        ("auto_pad", S),
        ("mode", S),
    ]
};

/// Attributes that became inputs at an opset (op, attribute, opset): past it the attribute is not part
/// of the op, and reading it anyway (or ignoring it) would run another model than ONNX Runtime does.
const MOVED_TO_INPUTS: [(&str, &str, i64); 10] = [
    ("Clip", "min", 11),
    ("Clip", "max", 11),
    ("Pad", "pads", 11),
    ("Pad", "value", 11),
    ("Dropout", "ratio", 12),
    ("Split", "split", 13),
    ("Squeeze", "axes", 13),
    ("Unsqueeze", "axes", 13),
    ("ReduceSum", "axes", 13),
    ("ReduceMean", "axes", 18),
];

/// A node's attributes, checked before any is read: each of the type ONNX defines, none that its opset
/// moved to the inputs, every float finite (a NaN `alpha` has no meaning in the model language).
fn check_attributes(n: &pb::NodeProto, opset: i64) -> R<()> {
    for a in &n.attribute {
        let want = ATTRIBUTE_TYPES.iter().find(|(name, _)| *name == a.name()).map(|(_, t)| *t);
        if let Some(want) = want.filter(|&t| a.r#type() != AttrType::Undefined && a.r#type() != t) {
            return Err(format!("attribute `{}` is {}, where ONNX defines {}", a.name(), a.r#type().as_str_name(), want.as_str_name()));
        }
        if let Some((_, _, from)) = MOVED_TO_INPUTS.iter().find(|(op, name, from)| *op == n.op_type() && *name == a.name() && opset >= *from) {
            return Err(format!("`{}` is an input of {} from opset {from} on, not an attribute (this model is opset {opset})", a.name(), n.op_type()));
        }
        if !a.f().is_finite() || a.floats.iter().any(|f| !f.is_finite()) {
            return Err(format!("attribute `{}` is not finite ({:?})", a.name(), if a.floats.is_empty() { vec![a.f()] } else { a.floats.clone() }));
        }
    }
    Ok(())
}

fn attr<'a>(n: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    n.attribute.iter().find(|a| a.name() == name)
}
fn int(n: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).map_or(default, |a| a.i())
}
fn ints(n: &pb::NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}
fn float(n: &pb::NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).map_or(default, |a| a.f())
}
fn string(n: &pb::NodeProto, name: &str) -> String {
    attr(n, name).map(|a| String::from_utf8_lossy(a.s()).into_owned()).unwrap_or_default()
}

/// A pair as the model language writes it: `3` for `(3, 3)`.
fn pair(v: [usize; 2]) -> String {
    if v[0] == v[1] {
        v[0].to_string()
    } else {
        format!("({}, {})", v[0], v[1])
    }
}

/// A tuple as the model language writes it: `(3,)`, `(2, 5)`.
fn tuple(items: &[usize]) -> String {
    let items: Vec<String> = items.iter().map(usize::to_string).collect();
    format!("({}{})", items.join(", "), if items.len() == 1 { "," } else { "" })
}

/// `, name=value` unless the value is the default.
fn keyword(name: &str, v: [usize; 2], default: [usize; 2]) -> String {
    if v == default {
        String::new()
    } else {
        format!(", {name}={}", pair(v))
    }
}

fn usizes(v: &[i64], what: &str) -> R<Vec<usize>> {
    v.iter().map(|&x| usize::try_from(x).map_err(|_| format!("{what} {v:?} has a negative entry"))).collect()
}

/// A name for the links a node makes: its own, or its op's.
fn base_name(n: &pb::NodeProto) -> String {
    if n.name().is_empty() {
        n.op_type().to_lowercase()
    } else {
        n.name().to_string()
    }
}

/// Transpose's `perm` (by default the axes reversed), checked to be a permutation of `rank` axes.
fn perm(n: &pb::NodeProto, rank: usize) -> R<Vec<usize>> {
    let perm = ints(n, "perm").map_or_else(|| Ok((0..rank).rev().collect()), |p| usizes(&p, "perm"))?;
    let mut sorted = perm.clone();
    sorted.sort_unstable();
    if sorted != (0..rank).collect::<Vec<_>>() {
        return Err(format!("perm {perm:?} is not a permutation of {rank} axes"));
    }
    Ok(perm)
}

/// Pads (begin H, begin W, end H, end W) as cnnc's symmetric pad per axis and the number of leading
/// output windows to skip: a larger end pad becomes the begin pad plus whole strides, so that windows
/// `skip..` lie exactly where ONNX's do (the caller crops to ONNX's count); a larger begin pad is kept.
fn symmetric(p: [usize; 4], stride: [usize; 2]) -> ([usize; 2], [usize; 2]) {
    let skip = [0, 1].map(|a| p[a + 2].saturating_sub(p[a]).div_ceil(stride[a]));
    ([0, 1].map(|a| p[a] + skip[a] * stride[a]), skip)
}

/// `axis` (negative counts from the end) as an index below `rank`.
fn axis(a: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    if (-r..r).contains(&a) {
        Ok(a.rem_euclid(r) as usize)
    } else {
        Err(format!("axis {a} is out of range for rank {rank}"))
    }
}

/// NumPy broadcasting of two constants with `f`.
fn broadcast<T: Copy>(a: (&[usize], &[T]), b: (&[usize], &[T]), f: impl Fn(T, T) -> T) -> R<(Vec<usize>, Vec<T>)> {
    let rank = a.0.len().max(b.0.len());
    let pad = |d: &[usize]| [vec![1; rank - d.len()], d.to_vec()].concat();
    let (da, db) = (pad(a.0), pad(b.0));
    let dims: Vec<usize> = da
        .iter()
        .zip(&db)
        .map(|(&x, &y)| {
            if x == y || y == 1 {
                Ok(x)
            } else if x == 1 {
                Ok(y)
            } else {
                Err(format!("shapes {:?} and {:?} do not broadcast", a.0, b.0))
            }
        })
        .collect::<R<_>>()?;
    let n: usize = dims.iter().product();
    let index = |d: &[usize], mut i: usize| {
        let (mut at, mut stride) = (0, 1);
        for k in (0..rank).rev() {
            let c = i % dims[k];
            i /= dims[k];
            if d[k] != 1 {
                at += c * stride;
            }
            stride *= d[k];
        }
        at
    };
    Ok((dims.clone(), (0..n).map(|i| f(a.1[index(&da, i)], b.1[index(&db, i)])).collect()))
}

impl Writer {
    pub(super) fn new(opset: i64, values: HashMap<String, Value>, uses: HashMap<String, usize>) -> Writer {
        Writer { opset, values, uses, links: vec![], lines: vec![], weights: HashMap::new(), names: HashSet::new(), vars: 0 }
    }

    /// A fresh identifier from `base` (letters, digits and `_`, not a keyword, unique).
    fn fresh(&mut self, base: &str) -> String {
        let clean: String = base.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
        // Short enough for the language's name limit (ASCII by now, so any cut is a char boundary).
        let clean = clean[..clean.len().min(64)].trim_matches('_').to_string();
        let clean = if clean.starts_with(|c: char| c.is_ascii_alphabetic()) { clean } else { format!("l_{clean}") };
        let reserved = ["model", "chain", "chainlist", "forward", "return", "if", "else", "for", "in", "assert", "and", "or", "not", "self", "F", "L"];
        let mut name = clean.clone();
        let mut k = 2;
        while self.names.contains(&name) || reserved.contains(&name.as_str()) {
            name = format!("{clean}_{k}");
            k += 1;
        }
        self.names.insert(name.clone());
        name
    }

    pub(super) fn input(&mut self, _: usize, name: &str, dims: &[usize]) {
        let var = self.fresh(name);
        self.values.insert(name.into(), Value::Tensor(Tensor { var, shape: [&[1], dims].concat(), link: None, pad: [0; 4] }));
    }

    fn get(&self, n: &pb::NodeProto, i: usize) -> Option<&Value> {
        n.input.get(i).filter(|s| !s.is_empty()).and_then(|s| self.values.get(s))
    }
    fn tensor_named(&self, name: &str) -> R<Tensor> {
        match self.values.get(name) {
            Some(Value::Tensor(t)) => Ok(t.clone()),
            _ => Err(format!("`{name}` is not a computed tensor")),
        }
    }
    fn tensor(&self, n: &pb::NodeProto, i: usize) -> R<Tensor> {
        self.padded(n, i).map(|(t, _)| t)
    }
    /// A tensor input with the zeros a `Pad` put around it (see [`Tensor::pad`]).
    fn padded(&self, n: &pb::NodeProto, i: usize) -> R<(Tensor, [usize; 4])> {
        match self.get(n, i) {
            Some(Value::Tensor(t)) => Ok((Tensor { pad: [0; 4], ..t.clone() }, t.pad)),
            Some(Value::Const(_)) => Err(format!("input {i} is a constant where cnnc needs a computed tensor")),
            None => Err(format!("input {i} is missing")),
        }
    }
    fn constant(&self, n: &pb::NodeProto, i: usize) -> R<Const> {
        match self.get(n, i) {
            Some(Value::Const(c)) => Ok(c.clone()),
            Some(Value::Tensor(_)) => Err(format!("input {i} must be a constant (an initializer), not a computed tensor")),
            None => Err(format!("input {i} is missing")),
        }
    }
    fn opt_constant(&self, n: &pb::NodeProto, i: usize) -> R<Option<Const>> {
        self.get(n, i).map(|_| self.constant(n, i)).transpose()
    }
    fn all_const(&self, n: &pb::NodeProto) -> bool {
        (0..n.input.len()).all(|i| !matches!(self.get(n, i), Some(Value::Tensor(_))))
    }

    fn set(&mut self, n: &pb::NodeProto, v: Value) {
        self.values.insert(n.output[0].clone(), v);
    }

    /// Emits `var = expr` for the node's first output.
    fn emit(&mut self, n: &pb::NodeProto, expr: String, shape: Vec<usize>, link: Option<usize>) {
        let t = self.line(expr, shape, link);
        self.set(n, Value::Tensor(t));
    }

    /// Writes `var = expr` with a fresh variable; returns it.
    fn line(&mut self, expr: String, shape: Vec<usize>, link: Option<usize>) -> Tensor {
        self.vars += 1;
        let var = self.fresh(&format!("h{}", self.vars));
        self.lines.push(format!("{var} = {expr}"));
        Tensor { var, shape, link, pad: [0; 4] }
    }

    /// `x·γ + β` per channel, as a batch normalization whose statistics are the identity:
    /// x·γ/√(1 + 0) + β, exact (so the optimizer folds it like any other).
    fn affine(&mut self, base: &str, x: &Tensor, gamma: Vec<f32>, beta: Vec<f32>) -> Tensor {
        let ch = gamma.len();
        let stats = [("avg_mean", vec![0.0; ch]), ("avg_var", vec![1.0; ch])];
        let params = [("gamma", gamma), ("beta", beta)].into_iter().chain(stats).map(|(k, v)| (k, (vec![ch], v))).collect();
        let l = self.link(base, format!("L.BatchNormalization({ch}, eps=0.0"), None, params);
        self.line(format!("self.{}({})", self.links[l].name, x.var), x.shape.clone(), None)
    }

    /// Declares a link named after `base` and stores its parameters under `name/key`.
    fn link(&mut self, base: &str, ctor: String, bias: Option<bool>, params: Vec<(&str, Array)>) -> usize {
        let base = base.trim_end_matches(".weight").trim_end_matches("_W").trim_end_matches("_w").trim_end_matches("/W");
        let name = self.fresh(if base.is_empty() { "layer" } else { base });
        for (k, a) in params {
            self.weights.insert(format!("{name}/{k}"), a);
        }
        self.links.push(Link { name, ctor, bias });
        self.links.len() - 1
    }

    pub(super) fn node(&mut self, n: &pb::NodeProto) -> R<()> {
        if n.output.is_empty() || n.output[0].is_empty() {
            return Err("it has no output".into());
        }
        check_attributes(n, self.opset)?;
        let op = n.op_type();
        if op != "Split" && n.output.iter().skip(1).any(|o| !o.is_empty() && self.uses.get(o).copied().unwrap_or(0) > 0) {
            return Err("its second output is used; cnnc computes only the first (inference)".into());
        }
        if matches!(op, "Identity" | "Dropout") {
            let v = match self.get(n, 0).ok_or("input 0 is missing")? {
                Value::Const(c) => Value::Const(c.clone()),
                Value::Tensor(t) => Value::Tensor(Tensor { link: None, ..t.clone() }),
            };
            self.set(n, v);
            return Ok(());
        }
        // Only these see a `Pad`'s zeros (see [`Tensor::pad`]); every other op refuses them here.
        let pending = n.input.iter().any(|i| matches!(self.values.get(i), Some(Value::Tensor(t)) if t.pad != [0; 4]));
        if pending && !matches!(op, "Conv" | "AveragePool") {
            return Err("an input comes from a `Pad`, which cnnc folds only into a following Conv, or AveragePool counting its padding".into());
        }
        let on_tensor = matches!(self.get(n, 0), Some(Value::Tensor(_)));
        if matches!(op, "Constant" | "ConstantOfShape" | "Shape" | "Gather" | "Cast")
            || (matches!(op, "Unsqueeze" | "Squeeze") && !on_tensor)
            || (self.all_const(n) && op != "Sum")
        {
            let c = self.fold(n)?;
            self.set(n, Value::Const(c));
            return Ok(());
        }
        match op {
            "Conv" => self.conv(n),
            "BatchNormalization" => {
                let x = self.tensor(n, 0)?;
                let [g, b, m, v] = [1, 2, 3, 4].map(|i| self.constant(n, i));
                let c = *x.shape.get(1).ok_or("the input has no channel axis")?;
                let arr = |k: R<Const>| -> R<Array> {
                    let k = k?;
                    if k.dims().iter().product::<usize>() != c {
                        return Err(format!("a parameter of shape {:?} for {c} channels", k.dims()));
                    }
                    Ok((vec![c], k.floats()))
                };
                let params = vec![("gamma", arr(g)?), ("beta", arr(b)?), ("avg_mean", arr(m)?), ("avg_var", arr(v)?)];
                let eps = float(n, "epsilon", 1e-5) as f64;
                let l = self.link(&n.input[1], format!("L.BatchNormalization({c}, eps={eps:?}"), None, params);
                self.call(n, l, &x, x.shape.clone());
                Ok(())
            }
            // max(0, min(1, αx + β)); HardSwish is x times it with α = 1/6, β = 1/2.
            "HardSigmoid" | "HardSwish" => {
                let x = self.tensor(n, 0)?;
                let ch = *x.shape.get(1).ok_or("the input has no channel axis")?;
                let (alpha, beta) = if op == "HardSwish" { (1.0 / 6.0, 0.5) } else { (float(n, "alpha", 0.2), float(n, "beta", 0.5)) };
                let y = self.affine(&base_name(n), &x, vec![alpha; ch], vec![beta; ch]);
                let clipped = format!("F.clip({}, 0.0, 1.0)", y.var);
                match op {
                    "HardSwish" => {
                        let h = self.line(clipped, x.shape.clone(), None);
                        self.emit(n, format!("{} * {}", x.var, h.var), x.shape, None);
                    }
                    _ => self.emit(n, clipped, x.shape, None),
                }
                Ok(())
            }
            "Relu" | "Sigmoid" => {
                let x = self.tensor(n, 0)?;
                self.emit(n, format!("F.{}({})", op.to_lowercase(), x.var), x.shape, None);
                Ok(())
            }
            "Clip" => {
                let x = self.tensor(n, 0)?;
                // Bounds are attributes before opset 11, optional constant inputs from 11.
                let bound = |i: usize, name: &str, default: f32| -> R<f32> {
                    if self.opset < 11 {
                        return Ok(float(n, name, default));
                    }
                    self.opt_constant(n, i)?.map_or(Ok(default), |c| c.floats().first().copied().ok_or(format!("an empty {name}")))
                };
                let (lo, hi) = (bound(1, "min", f32::NEG_INFINITY)?, bound(2, "max", f32::INFINITY)?);
                let expr = match (lo, hi) {
                    (0.0, f32::INFINITY) => format!("F.relu({})", x.var),
                    _ if lo.is_finite() && hi.is_finite() && lo <= hi => format!("F.clip({}, {:?}, {:?})", x.var, lo as f64, hi as f64),
                    _ => return Err(format!("clipping to [{lo}, {hi}] is not supported (finite bounds, or ReLU's [0, inf))")),
                };
                self.emit(n, expr, x.shape, None);
                Ok(())
            }
            "MaxPool" | "AveragePool" => self.pool(n),
            "GlobalAveragePool" => {
                let x = self.tensor(n, 0)?;
                let [c, h, w] = x.shape[1..] else { return Err(format!("input shape {:?} is not (N, C, H, W)", x.shape)) };
                self.emit(n, format!("F.average_pooling_2d({}, {})", x.var, pair([h, w])), vec![1, c, 1, 1], None);
                Ok(())
            }
            "LRN" => {
                let x = self.tensor(n, 0)?;
                let size = int(n, "size", 0);
                if size < 1 || size % 2 == 0 {
                    return Err(format!("size {size}: cnnc's window is centred, so the size must be odd"));
                }
                let (alpha, beta, bias) = (float(n, "alpha", 1e-4) as f64, float(n, "beta", 0.75) as f64, float(n, "bias", 1.0) as f64);
                // ONNX scales the sum by alpha/size; the model language (Chainer) by alpha.
                let expr = format!("F.local_response_normalization({}, n={size}, k={bias:?}, alpha={:?}, beta={beta:?})", x.var, alpha / size as f64);
                self.emit(n, expr, x.shape, None);
                Ok(())
            }
            "Gemm" | "MatMul" => self.linear(n),
            "Add" | "Sub" | "Mul" | "Sum" => self.arith(n),
            // x / c is not x · (1/c) in floating point, and no layer here divides.
            "Div" => Err("division of a computed tensor is not supported (only of constants)".into()),
            "Transpose" => {
                let x = self.tensor(n, 0)?;
                let perm = perm(n, x.shape.len())?;
                if perm[0] != 0 {
                    return Err(format!("perm {perm:?} moves the batch off axis 0"));
                }
                let axes: Vec<String> = perm.iter().map(usize::to_string).collect();
                self.emit(n, format!("F.transpose({}, ({}))", x.var, axes.join(", ")), perm.iter().map(|&a| x.shape[a]).collect(), None);
                Ok(())
            }
            "Split" => self.split(n),
            "Pad" => self.pad(n),
            "Slice" => self.slice(n),
            "Unsqueeze" | "Squeeze" => {
                let x = self.tensor(n, 0)?;
                let folded = self.fold_shape(n, &x.shape)?;
                // The batch is 1 in `shape`, so a new or removed axis 0 would look like the batch.
                let listed = if self.opset >= 13 && n.input.len() > 1 { self.constant(n, 1)?.ints() } else { ints(n, "axes").unwrap_or_default() };
                let rank = if op == "Unsqueeze" { folded.len() } else { x.shape.len() };
                if listed.iter().any(|&a| axis(a, rank) == Ok(0)) || (op == "Squeeze" && listed.is_empty()) {
                    return Err("it moves the batch off axis 0".into());
                }
                self.reshape(n, &x, folded)
            }
            "ReduceMean" => {
                let x = self.tensor(n, 0)?;
                let listed = if self.opset >= 18 { self.opt_constant(n, 1)?.map(|c| c.ints()) } else { ints(n, "axes") };
                let mut axes: Vec<usize> = listed.unwrap_or_default().iter().map(|&a| axis(a, x.shape.len())).collect::<R<_>>()?;
                axes.sort();
                let [_, c, h, w] = x.shape[..] else { return Err(format!("input shape {:?} is not (N, C, H, W)", x.shape)) };
                if axes != [2, 3] {
                    return Err(format!("a mean over axes {axes:?} (cnnc averages over H and W only)"));
                }
                let pooled = format!("F.average_pooling_2d({}, {})", x.var, pair([h, w]));
                let keep = int(n, "keepdims", 1) != 0;
                let (expr, shape) = if keep { (pooled, vec![1, c, 1, 1]) } else { (format!("F.reshape({pooled}, (-1, {c}))"), vec![1, c]) };
                self.emit(n, expr, shape, None);
                Ok(())
            }
            "Flatten" => {
                let x = self.tensor(n, 0)?;
                if axis(int(n, "axis", 1), x.shape.len() + 1)? != 1 {
                    return Err("only axis 1 keeps the batch axis".into());
                }
                let size: usize = x.shape[1..].iter().product();
                self.emit(n, format!("F.reshape({}, (-1, {size}))", x.var), vec![1, size], None);
                Ok(())
            }
            "Reshape" => {
                let x = self.tensor(n, 0)?;
                let shape = self.reshaped(&x.shape, &self.constant(n, 1)?.ints(), int(n, "allowzero", 0) != 0)?;
                self.reshape(n, &x, shape)
            }
            "Concat" => {
                let xs: Vec<Tensor> = (0..n.input.len()).map(|i| self.tensor(n, i)).collect::<R<_>>()?;
                let rank = xs[0].shape.len();
                let a = axis(int(n, "axis", 1), rank)?;
                if a == 0 {
                    return Err("concatenation along the batch axis".into());
                }
                let mut shape = xs[0].shape.clone();
                for x in &xs[1..] {
                    if x.shape.len() != rank || (0..rank).any(|k| k != a && x.shape[k] != shape[k]) {
                        return Err(format!("shapes {:?} and {:?} do not concatenate on axis {a}", shape, x.shape));
                    }
                    shape[a] += x.shape[a];
                }
                let vars: Vec<&str> = xs.iter().map(|x| x.var.as_str()).collect();
                self.emit(n, format!("F.concat(({},), axis={a})", vars.join(", ")), shape, None);
                Ok(())
            }
            "Softmax" => {
                let x = self.tensor(n, 0)?;
                let rank = x.shape.len();
                let a = axis(int(n, "axis", if self.opset < 13 { 1 } else { -1 }), rank)?;
                // Before opset 13 the input is coerced to 2-D at `axis`: one softmax over all later axes.
                let flat = self.opset < 13 && x.shape[a + 1..].iter().any(|&d| d != 1);
                if a == 0 || flat {
                    return Err(format!("softmax over axis {a} of shape {:?} (opset {}) is not supported", x.shape, self.opset));
                }
                self.emit(n, format!("F.softmax({}, axis={a})", x.var), x.shape, None);
                Ok(())
            }
            _ => Err("no conversion (it should have been refused earlier)".into()),
        }
    }

    /// `y = self.link(x)`.
    fn call(&mut self, n: &pb::NodeProto, l: usize, x: &Tensor, shape: Vec<usize>) {
        let expr = format!("self.{}({})", self.links[l].name, x.var);
        let link = self.links[l].bias.map(|_| l);
        self.emit(n, expr, shape, link);
    }

    /// Explicit pads (begin H, begin W, end H, end W) from `pads` or `auto_pad`.
    fn pads(n: &pb::NodeProto, input: [usize; 2], kernel: [usize; 2], stride: [usize; 2]) -> R<[usize; 4]> {
        match string(n, "auto_pad").as_str() {
            "" | "NOTSET" => {
                let p = usizes(&ints(n, "pads").unwrap_or(vec![0; 4]), "pads")?;
                p.try_into().map_err(|p: Vec<usize>| format!("{} pads for 2 spatial axes", p.len()))
            }
            "VALID" => Ok([0; 4]),
            mode @ ("SAME_UPPER" | "SAME_LOWER") => {
                let total = |a: usize| ((input[a].div_ceil(stride[a]) - 1) * stride[a] + kernel[a]).saturating_sub(input[a]);
                let (th, tw) = (total(0), total(1));
                let small = |t: usize| if mode == "SAME_UPPER" { t / 2 } else { t - t / 2 };
                Ok([small(th), small(tw), th - small(th), tw - small(tw)])
            }
            other => Err(format!("auto_pad `{other}` is not an ONNX mode")),
        }
    }

    /// Stride, pads (with `extra`, zeros a `Pad` put around the input) and input size of a window op
    /// whose taps span `kernel` (a dilated kernel's extent); dilations are the caller's to read.
    fn geometry(n: &pb::NodeProto, x: &Tensor, kernel: [usize; 2], extra: [usize; 4]) -> R<([usize; 2], [usize; 4], [usize; 2])> {
        let [_, _, h, w] = x.shape[..] else { return Err(format!("input shape {:?} is not (N, C, H, W)", x.shape)) };
        let stride: [usize; 2] = usizes(&ints(n, "strides").unwrap_or(vec![1, 1]), "strides")?.try_into().map_err(|_| "strides for 2 axes expected")?;
        if stride.contains(&0) || kernel.contains(&0) {
            return Err("zero stride or kernel size".into());
        }
        if extra != [0; 4] && !matches!(string(n, "auto_pad").as_str(), "" | "NOTSET") {
            return Err("a `Pad` before a layer with `auto_pad`".into());
        }
        let own = Self::pads(n, [h, w], kernel, stride)?;
        Ok((stride, std::array::from_fn(|i| own[i] + extra[i]), [h, w]))
    }

    fn conv(&mut self, n: &pb::NodeProto) -> R<()> {
        let (x, extra) = self.padded(n, 0)?;
        let Const::F(wd, wv) = self.constant(n, 1)? else { return Err("integer weights".into()) };
        let [m, cg, kh, kw] = wd[..] else { return Err(format!("weights of shape {wd:?} are not (M, C/group, kH, kW)")) };
        if let Some(k) = ints(n, "kernel_shape").filter(|k| k[..] != [kh as i64, kw as i64]) {
            return Err(format!("kernel_shape {k:?} contradicts weights of shape {wd:?}"));
        }
        let d: [usize; 2] = usizes(&ints(n, "dilations").unwrap_or(vec![1, 1]), "dilations")?.try_into().map_err(|_| "dilations for 2 axes expected")?;
        if d.contains(&0) || kh == 0 || kw == 0 {
            return Err("a zero dilation or kernel size".into());
        }
        let (sh, sw) = ((kh - 1) * d[0] + 1, (kw - 1) * d[1] + 1);
        let (stride, p, [h, w]) = Self::geometry(n, &x, [sh, sw], extra)?;
        let g = usize::try_from(int(n, "group", 1)).ok().filter(|&g| g >= 1 && m % g == 0).ok_or("a group count that does not divide the outputs")?;
        if x.shape[1] != cg * g {
            return Err(format!("{} input channels for weights {wd:?} in {g} groups", x.shape[1]));
        }
        let (pad, skip) = symmetric(p, stride);
        let out = |i: usize, k: usize, a: usize, total: usize| {
            (i + total).checked_sub(k).map(|d| d / stride[a] + 1).ok_or("the kernel is larger than the padded input")
        };
        let onnx = [out(h, sh, 0, p[0] + p[2])?, out(w, sw, 1, p[1] + p[3])?];
        let shape = vec![1, m, out(h, sh, 0, 2 * pad[0])?, out(w, sw, 1, 2 * pad[1])?];
        let mut params = vec![("W", (wd.clone(), wv))];
        let b = self.opt_constant(n, 2)?;
        if let Some(b) = &b {
            if b.dims().iter().product::<usize>() != m {
                return Err(format!("a bias of shape {:?} for {m} outputs", b.dims()));
            }
            params.push(("b", (vec![m], b.floats())));
        }
        let groups = if g > 1 { format!(", groups={g}") } else { String::new() };
        let geo = format!("{}{}{}", keyword("stride", stride, [1, 1]), keyword("pad", pad, [0, 0]), keyword("dilate", d, [1, 1]));
        let ctor = format!("L.Convolution2D({}, {m}, {}{geo}{groups}", cg * g, pair([kh, kw]));
        let l = self.link(&n.input[1], ctor, Some(b.is_some()), params);
        self.call(n, l, &x, shape);
        self.crop_output(n, skip, onnx)
    }

    /// Crops the node's (N, C, H, W) output to `len` rows and columns from `start` (see [`symmetric`]).
    fn crop_output(&mut self, n: &pb::NodeProto, start: [usize; 2], len: [usize; 2]) -> R<()> {
        let mut y = self.tensor_named(&n.output[0])?;
        for a in 0..2 {
            y = self.crop(y, 2 + a, start[a], len[a]);
        }
        self.set(n, Value::Tensor(y));
        Ok(())
    }

    /// `len` entries from `start` along `axis` of `x`, as an element of an `F.split_axis` (the model's
    /// unused parts are pruned when it is built); `x` itself when that is all of it.
    fn crop(&mut self, x: Tensor, axis: usize, start: usize, len: usize) -> Tensor {
        let dim = x.shape[axis];
        if (start, len) == (0, dim) {
            return x;
        }
        let cuts: Vec<usize> = [start, start + len].into_iter().filter(|&c| c > 0 && c < dim).collect();
        let parts = self.line(format!("F.split_axis({}, {}, axis={axis})", x.var, tuple(&cuts)), x.shape.clone(), None);
        let mut shape = x.shape;
        shape[axis] = len;
        Tensor { var: format!("{}[{}]", parts.var, usize::from(start > 0)), shape, ..parts }
    }

    fn pool(&mut self, n: &pb::NodeProto) -> R<()> {
        let (x, extra) = self.padded(n, 0)?;
        let k: [usize; 2] = usizes(&ints(n, "kernel_shape").unwrap_or_default(), "kernel_shape")?.try_into().map_err(|_| "kernel_shape for 2 axes expected")?;
        let ceil = int(n, "ceil_mode", 0) != 0;
        // Padded zeros are cells of the input: only an average that counts its padding (over windows
        // that stay inside it: floor mode) divides the same with them as pads.
        if extra != [0; 4] && (n.op_type() != "AveragePool" || int(n, "count_include_pad", 0) == 0 || ceil) {
            return Err("input 0 comes from a `Pad`, which only an AveragePool with count_include_pad and floor mode takes as its pads".into());
        }
        if ints(n, "dilations").is_some_and(|d| d.iter().any(|&d| d != 1)) {
            return Err("dilated pooling is not supported".into());
        }
        let (s, p, input) = Self::geometry(n, &x, k, extra)?;
        // ONNX's size; in ceil mode a last window that would start in the right padding is dropped.
        let onnx = |a: usize| -> R<usize> {
            let span = (input[a] + p[a] + p[a + 2]).checked_sub(k[a]).ok_or("the window is larger than the padded input")?;
            let o = if ceil { span.div_ceil(s[a]) + 1 } else { span / s[a] + 1 };
            Ok(if ceil && (o - 1) * s[a] >= input[a] + p[a] { o - 1 } else { o })
        };
        let out = [onnx(0)?, onnx(1)?];
        // cnnc pads both sides alike, with windows at the same places (see [`symmetric`]): floor or
        // cover-all size, then the output cropped to ONNX's windows where it has more.
        let (pad, skip) = symmetric(p, s);
        let floor = |a: usize| (input[a] + 2 * pad[a]).checked_sub(k[a]).map(|d| d / s[a] + 1).unwrap_or(0);
        let cover = |a: usize| (input[a] + 2 * pad[a]).checked_sub(k[a]).map(|d| d.div_ceil(s[a]) + 1).unwrap_or(0);
        let is_floor = (0..2).all(|a| floor(a) >= skip[a] + out[a]);
        let is_cover = (0..2).all(|a| cover(a) >= skip[a] + out[a]);
        let ours = |size: &dyn Fn(usize) -> usize| vec![1, x.shape[1], size(0), size(1)];
        let shape = if is_floor { ours(&floor) } else { ours(&cover) };
        let geo = format!("{}, {}{}{}", x.var, pair(k), keyword("stride", s, k), keyword("pad", pad, [0, 0]));
        if n.op_type() == "MaxPool" {
            if int(n, "storage_order", 0) != 0 && n.output.len() > 1 {
                return Err("column-major indices".into());
            }
            if !is_floor && !is_cover {
                return Err(format!("pads {p:?} with ceil_mode {ceil} give an output size cnnc's pooling cannot produce"));
            }
            self.emit(n, format!("F.max_pooling_2d({geo}{})", if is_floor { ", cover_all=False" } else { "" }), shape, None);
            return self.crop_output(n, skip, out);
        }
        // The divisor is kh·kw (Chainer's) where every window lies inside the input or, with
        // count_include_pad, inside ONNX's padding (a floor-mode window always does); else the cells inside.
        let inside = (0..2).all(|a| p[a] == 0 && (out[a] - 1) * s[a] + k[a] <= input[a]);
        let include = int(n, "count_include_pad", 0) != 0;
        if !is_floor || (include && ceil && !inside) {
            return Err(format!("an average over pads {p:?} with ceil_mode {ceil} is not supported yet"));
        }
        let exclude = if include || inside { "" } else { ", pad_value=None" };
        self.emit(n, format!("F.average_pooling_2d({geo}{exclude})"), shape, None);
        self.crop_output(n, skip, out)
    }

    fn linear(&mut self, n: &pb::NodeProto) -> R<()> {
        let x = self.tensor(n, 0)?;
        let [_, k] = x.shape[..] else { return Err(format!("input shape {:?} is not (N, K)", x.shape)) };
        let gemm = n.op_type() == "Gemm";
        if gemm && int(n, "transA", 0) != 0 {
            return Err("transA = 1 transposes the batch".into());
        }
        let Const::F(bd, bv) = self.constant(n, 1)? else { return Err("integer weights".into()) };
        let [r, c] = bd[..] else { return Err(format!("weights of shape {bd:?} are not a matrix")) };
        let trans_b = gemm && int(n, "transB", 0) != 0;
        let (kk, m) = if trans_b { (c, r) } else { (r, c) };
        if kk != k {
            return Err(format!("input of shape {:?} against weights {bd:?}", x.shape));
        }
        let alpha = if gemm { float(n, "alpha", 1.0) } else { 1.0 };
        // W is (out, in), as Chainer's Linear keeps it.
        let w: Vec<f32> = (0..m * k).map(|i| if trans_b { bv[i] } else { bv[(i % k) * m + i / k] } * alpha).collect();
        let mut params = vec![("W", (vec![m, k], w))];
        let bias = if gemm { self.opt_constant(n, 2)? } else { None };
        if let Some(b) = &bias {
            let beta = float(n, "beta", 1.0);
            let (_, b) = broadcast((&[m], &vec![0.0; m]), (b.dims(), &b.floats()), |_, y| y * beta)?;
            if b.len() != m {
                return Err(format!("a bias of shape {:?} for {m} outputs", bias.as_ref().map(Const::dims)));
            }
            params.push(("b", (vec![m], b)));
        }
        let l = self.link(&n.input[1], format!("L.Linear({k}, {m}"), Some(bias.is_some()), params);
        self.call(n, l, &x, vec![1, m]);
        Ok(())
    }

    fn arith(&mut self, n: &pb::NodeProto) -> R<()> {
        let op = n.op_type();
        let vals: Vec<&Value> = (0..n.input.len()).map(|i| self.get(n, i).ok_or(format!("input {i} is missing"))).collect::<R<_>>()?;
        let (tensors, consts): (Vec<&Value>, Vec<&Value>) = vals.into_iter().partition(|v| matches!(v, Value::Tensor(_)));
        let ts: Vec<Tensor> = tensors.iter().filter_map(|v| if let Value::Tensor(t) = v { Some(t.clone()) } else { None }).collect();
        if ts.is_empty() {
            return Err(format!("{op} of constants only is not supported"));
        }
        if consts.is_empty() && matches!(op, "Add" | "Sum") {
            if ts.iter().any(|t| t.shape != ts[0].shape) {
                return Err("tensors of different shapes (broadcasting between computed tensors is not supported)".into());
            }
            let vars: Vec<&str> = ts.iter().map(|t| t.var.as_str()).collect();
            self.emit(n, vars.join(" + "), ts[0].shape.clone(), None);
            return Ok(());
        }
        if let ([a, b], true) = (&ts[..], consts.is_empty() && op == "Mul") {
            // `a * b` broadcasts a per-channel right operand (SiLU, squeeze-and-excitation); × commutes.
            let per_channel = |t: &Tensor| t.shape.len() == 4 && t.shape[2..] == [1, 1];
            let (a, b) = if a.shape != b.shape && per_channel(a) { (b, a) } else { (a, b) };
            if a.shape != b.shape && !(per_channel(b) && b.shape[..2] == a.shape[..2]) {
                return Err(format!("a product of shapes {:?} and {:?} (same shapes, or one value per channel)", a.shape, b.shape));
            }
            self.emit(n, format!("{} * {}", a.var, b.var), a.shape.clone(), None);
            return Ok(());
        }
        let [Value::Const(c)] = consts[..] else { return Err(format!("{op} of computed tensors is not supported")) };
        let (x, c) = (ts[0].clone(), c.clone());
        if op == "Sub" && !matches!(self.get(n, 0), Some(Value::Tensor(_))) {
            return Err("a constant minus a tensor is not supported".into());
        }
        // A constant per channel (axis 1), or one for all.
        let ch = x.shape.get(1).copied().unwrap_or(1);
        let rank = x.shape.len();
        let per_channel = c.dims().iter().product::<usize>() == 1
            || (c.dims().len() <= rank
                && c.dims().iter().rev().enumerate().all(|(i, &d)| d == 1 || (rank - 1 - i == 1 && d == ch))
                && (rank - c.dims().len()) <= 1);
        if !per_channel {
            return Err(format!("a constant of shape {:?} on a tensor of shape {:?} (only per-channel constants are supported)", c.dims(), x.shape));
        }
        let v = c.floats();
        let values: Vec<f32> = (0..ch).map(|i| if v.len() == 1 { v[0] } else { v[i] }).map(|y| if op == "Sub" { -y } else { y }).collect();
        // An addition straight after a layer with a bias goes into that bias.
        if op != "Mul" && self.uses.get(&n.input[0]).copied().unwrap_or(0) <= 1 {
            if let Some(l) = x.link.filter(|_| matches!(self.get(n, 0), Some(Value::Tensor(_)))) {
                let name = self.links[l].name.clone();
                let b = self.weights.entry(format!("{name}/b")).or_insert_with(|| (vec![ch], vec![0.0; ch]));
                b.1.iter_mut().zip(&values).for_each(|(b, y)| *b += y);
                self.links[l].bias = Some(true);
                self.set(n, Value::Tensor(x));
                return Ok(());
            }
        }
        let (gamma, beta) = if op == "Mul" { (values, vec![0.0; ch]) } else { (vec![1.0; ch], values) };
        let y = self.affine(&base_name(n), &x, gamma, beta);
        self.set(n, Value::Tensor(y));
        Ok(())
    }

    /// A constant `Pad` of zeros around H and W, kept with the tensor for the next layer to take (see
    /// [`Tensor::pad`]). Pads are an attribute before opset 11, inputs from 11 (with `axes` from 18).
    fn pad(&mut self, n: &pb::NodeProto) -> R<()> {
        let x = self.tensor(n, 0)?;
        let rank = x.shape.len();
        let mode = string(n, "mode");
        let (pads, value) = if self.opset < 11 {
            (ints(n, "pads").ok_or("no pads")?, float(n, "value", 0.0))
        } else {
            (self.constant(n, 1)?.ints(), self.opt_constant(n, 2)?.and_then(|c| c.floats().first().copied()).unwrap_or(0.0))
        };
        let axes: Vec<usize> = match self.opt_constant(n, 3)?.filter(|_| self.opset >= 18) {
            Some(a) => a.ints().iter().map(|&a| axis(a, rank)).collect::<R<_>>()?,
            None => (0..rank).collect(),
        };
        if !matches!(mode.as_str(), "" | "constant") || value != 0.0 || rank != 4 || pads.len() != 2 * axes.len() {
            return Err(format!("a `{mode}` pad of {value} by {pads:?} on {:?} (cnnc folds zeros around H and W)", x.shape));
        }
        let mut p = [0; 4];
        for (i, &a) in axes.iter().enumerate() {
            let (b, e) = (pads[i], pads[i + axes.len()]);
            if b < 0 || e < 0 || (a < 2 && (b, e) != (0, 0)) {
                return Err(format!("pads {pads:?} crop, or pad the batch or channel axis"));
            }
            if a >= 2 {
                (p[a - 2], p[a]) = (b as usize, e as usize);
            }
        }
        self.set(n, Value::Tensor(Tensor { pad: p, ..x }));
        Ok(())
    }

    /// `F.split_axis`: the sizes from the `split` input (opset 13) or attribute, else equal parts (the
    /// last one smaller, as opset 18's `num_outputs` has it); each output is an element of the tuple.
    fn split(&mut self, n: &pb::NodeProto) -> R<()> {
        let x = self.tensor(n, 0)?;
        let a = axis(int(n, "axis", 0), x.shape.len())?;
        let (size, parts) = (x.shape[a], n.output.len());
        let given = if self.opset >= 13 { self.opt_constant(n, 1)?.map(|c| c.ints()) } else { ints(n, "split") };
        let sizes = match given {
            Some(s) => usizes(&s, "split")?,
            None => (0..parts).map(|i| size.div_ceil(parts).min(size.saturating_sub(i * size.div_ceil(parts)))).collect(),
        };
        if a == 0 || sizes.len() != parts || sizes.iter().sum::<usize>() != size || sizes.contains(&0) {
            return Err(format!("sizes {sizes:?} do not split axis {a} of {:?} into {parts} parts", x.shape));
        }
        let sections = if sizes.iter().all(|&s| s == sizes[0]) {
            parts.to_string()
        } else {
            let ends: Vec<usize> = sizes[..parts - 1]
                .iter()
                .scan(0, |end, &s| {
                    *end += s;
                    Some(*end)
                })
                .collect();
            tuple(&ends)
        };
        let all = self.line(format!("F.split_axis({}, {sections}, axis={a})", x.var), x.shape.clone(), None);
        for (i, (out, &len)) in n.output.iter().zip(&sizes).enumerate().filter(|(_, (o, _))| !o.is_empty()) {
            let mut shape = x.shape.clone();
            shape[a] = len;
            self.values.insert(out.clone(), Value::Tensor(Tensor { var: format!("{}[{i}]", all.var), shape, ..all.clone() }));
        }
        Ok(())
    }

    /// A `Slice` with step 1 as one element of an `F.split_axis` per sliced axis (the model's unused
    /// parts are pruned when it is built). Starts, ends and axes are attributes before opset 10.
    fn slice(&mut self, n: &pb::NodeProto) -> R<()> {
        let mut x = self.tensor(n, 0)?;
        let list = |i: usize, name: &str| -> R<Option<Vec<i64>>> {
            if self.opset >= 10 {
                Ok(self.opt_constant(n, i)?.map(|c| c.ints()))
            } else {
                Ok(ints(n, name))
            }
        };
        let (starts, ends) = (list(1, "starts")?.ok_or("no starts")?, list(2, "ends")?.ok_or("no ends")?);
        let axes = list(3, "axes")?.unwrap_or_else(|| (0..starts.len() as i64).collect());
        let steps = list(4, "steps")?.filter(|_| self.opset >= 10).unwrap_or_else(|| vec![1; starts.len()]);
        if ends.len() != starts.len() || axes.len() != starts.len() || steps.iter().any(|&s| s != 1) || steps.len() != starts.len() {
            return Err(format!("starts {starts:?}, ends {ends:?}, axes {axes:?}, steps {steps:?} (only steps of 1)"));
        }
        for ((&s, &e), &a) in starts.iter().zip(&ends).zip(&axes) {
            let a = axis(a, x.shape.len())?;
            let dim = x.shape[a] as i64;
            let clamp = |v: i64| (if v < 0 { v.saturating_add(dim) } else { v }).clamp(0, dim) as usize;
            let (s, e) = (clamp(s), clamp(e));
            if (a == 0 && (s, e) != (0, dim as usize)) || s >= e {
                return Err(format!("slice {s}..{e} of axis {a} of {:?} (not the batch, not empty)", x.shape));
            }
            x = self.crop(x, a, s, e - s);
        }
        self.set(n, Value::Tensor(x));
        Ok(())
    }

    /// `F.reshape` to `shape`, whose axis 0 must stay the batch.
    fn reshape(&mut self, n: &pb::NodeProto, x: &Tensor, shape: Vec<usize>) -> R<()> {
        if shape.len() < 2 || shape[0] != 1 {
            return Err(format!("reshape {:?} → {shape:?} does not keep the batch on axis 0", x.shape));
        }
        let dims: Vec<String> = shape[1..].iter().map(usize::to_string).collect();
        self.emit(n, format!("F.reshape({}, (-1, {}))", x.var, dims.join(", ")), shape, None);
        Ok(())
    }

    /// The shape `Unsqueeze`/`Squeeze` make of `dims` (the node folded on a stand-in without values).
    fn fold_shape(&self, n: &pb::NodeProto, dims: &[usize]) -> R<Vec<usize>> {
        Ok(self.fold_with(n, Some(Const::F(dims.to_vec(), vec![])))?.dims().to_vec())
    }

    /// Reshape's target: 0 copies the input's size (unless `allowzero`), −1 takes what is left.
    fn reshaped(&self, input: &[usize], target: &[i64], allowzero: bool) -> R<Vec<usize>> {
        let total: usize = input.iter().product();
        let mut out: Vec<Option<usize>> = vec![];
        for (i, &t) in target.iter().enumerate() {
            out.push(match t {
                0 if !allowzero => Some(*input.get(i).ok_or("0 copies an axis the input does not have")?),
                -1 => None,
                t => Some(usize::try_from(t).map_err(|_| format!("size {t}"))?),
            });
        }
        let known: usize = out.iter().flatten().product();
        match out.iter().filter(|d| d.is_none()).count() {
            0 if known == total => Ok(out.into_iter().flatten().collect()),
            1 if known > 0 && total.is_multiple_of(known) => Ok(out.into_iter().map(|d| d.unwrap_or(total / known)).collect()),
            _ => Err(format!("shape {input:?} cannot be reshaped to {target:?}")),
        }
    }

    /// Evaluates a node whose inputs are all constants (or a `Shape` of a tensor).
    fn fold(&self, n: &pb::NodeProto) -> R<Const> {
        self.fold_with(n, None)
    }

    /// [`Writer::fold`] with input 0 given (for shape-only folds, its values may be empty).
    fn fold_with(&self, n: &pb::NodeProto, first: Option<Const>) -> R<Const> {
        let c = |i: usize| match (i, &first) {
            (0, Some(f)) => Ok(f.clone()),
            _ => self.constant(n, i),
        };
        // Unsqueeze/Squeeze axes: an attribute before opset 13, an input from 13.
        let axes = |rank: Option<usize>| -> R<Vec<usize>> {
            let a = if self.opset >= 13 && n.input.len() > 1 { c(1)?.ints() } else { ints(n, "axes").unwrap_or_default() };
            let rank = rank.unwrap_or(c(0)?.dims().len() + a.len());
            a.iter().map(|&a| axis(a, rank)).collect()
        };
        Ok(match n.op_type() {
            "Constant" => {
                let a = n.attribute.first().ok_or("a constant without a value")?;
                match a.name() {
                    "value" => super::tensor(a.t.as_ref().ok_or("no tensor")?, std::path::Path::new("."))?,
                    "value_float" => Const::F(vec![], vec![a.f()]),
                    "value_floats" => Const::F(vec![a.floats.len()], a.floats.clone()),
                    "value_int" => Const::I(vec![], vec![a.i()]),
                    "value_ints" => Const::I(vec![a.ints.len()], a.ints.clone()),
                    other => return Err(format!("constant attribute `{other}` is not supported")),
                }
            }
            "ConstantOfShape" => {
                let dims = usizes(&c(0)?.ints(), "shape")?;
                // Its values are not in the file: bound what a few bytes can ask for (1 GiB of f32).
                let len = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&l| l <= 1 << 28).ok_or("too many elements")?;
                match attr(n, "value").and_then(|a| a.t.as_ref()).map(|t| super::tensor(t, std::path::Path::new("."))).transpose()? {
                    Some(Const::I(_, v)) => Const::I(dims, vec![*v.first().ok_or("an empty value")?; len]),
                    Some(Const::F(_, v)) => Const::F(dims, vec![*v.first().ok_or("an empty value")?; len]),
                    None => Const::F(dims, vec![0.0; len]),
                }
            }
            "Shape" => match self.get(n, 0) {
                Some(Value::Tensor(t)) => Const::I(vec![t.shape.len()], t.shape.iter().map(|&d| d as i64).collect()),
                Some(Value::Const(k)) => Const::I(vec![k.dims().len()], k.dims().iter().map(|&d| d as i64).collect()),
                None => return Err("input 0 is missing".into()),
            },
            "Cast" => {
                let x = c(0)?;
                let to = int(n, "to", 1);
                if matches!(to, 1 | 10 | 11 | 16) {
                    Const::F(x.dims().to_vec(), x.floats())
                } else {
                    Const::I(x.dims().to_vec(), x.ints())
                }
            }
            "Unsqueeze" => {
                let x = c(0)?;
                let mut a = axes(None)?;
                a.sort();
                let mut d = x.dims().to_vec();
                for &i in &a {
                    d.insert(i.min(d.len()), 1);
                }
                x.with_dims(d)
            }
            "Squeeze" => {
                let x = c(0)?;
                let a = axes(Some(x.dims().len()))?;
                let d: Vec<usize> = x.dims().iter().enumerate().filter(|&(i, &s)| !(s == 1 && (a.is_empty() || a.contains(&i)))).map(|(_, &s)| s).collect();
                x.with_dims(d)
            }
            "Reshape" => {
                let x = c(0)?;
                let d = self.reshaped(x.dims(), &c(1)?.ints(), int(n, "allowzero", 0) != 0)?;
                x.with_dims(d)
            }
            "Transpose" => {
                let x = c(0)?;
                let perm = perm(n, x.dims().len())?;
                let (dims, at): (Vec<usize>, Vec<usize>) = (perm.iter().map(|&a| x.dims()[a]).collect(), transposed(x.dims(), &perm).collect());
                match x {
                    Const::I(_, v) => Const::I(dims, at.iter().map(|&i| v[i]).collect()),
                    Const::F(_, v) => Const::F(dims, at.iter().map(|&i| v[i]).collect()),
                }
            }
            "Gather" => {
                let (x, idx) = (c(0)?, c(1)?);
                if x.dims().len() != 1 || axis(int(n, "axis", 0), 1)? != 0 {
                    return Err("gathering from constants other than vectors".into());
                }
                let len = x.dims()[0] as i64;
                let at: Vec<usize> = idx
                    .ints()
                    .iter()
                    .map(|&i| if (-len..len).contains(&i) { Ok(i.rem_euclid(len) as usize) } else { Err(format!("index {i} out of range")) })
                    .collect::<R<_>>()?;
                match x {
                    Const::I(_, v) => Const::I(idx.dims().to_vec(), at.iter().map(|&i| v[i]).collect()),
                    Const::F(_, v) => Const::F(idx.dims().to_vec(), at.iter().map(|&i| v[i]).collect()),
                }
            }
            "Concat" => {
                let xs: Vec<Const> = (0..n.input.len()).map(c).collect::<R<_>>()?;
                if xs.iter().any(|x| x.dims().len() != 1) {
                    return Err("concatenating constants other than vectors".into());
                }
                let len = xs.iter().map(|x| x.dims()[0]).sum();
                if xs.iter().all(|x| matches!(x, Const::I(..))) {
                    Const::I(vec![len], xs.iter().flat_map(Const::ints).collect())
                } else {
                    Const::F(vec![len], xs.iter().flat_map(Const::floats).collect())
                }
            }
            op @ ("Add" | "Sub" | "Mul" | "Div") => {
                let (a, b) = (c(0)?, c(1)?);
                if op == "Div" && matches!(b, Const::I(..)) && b.ints().contains(&0) {
                    return Err("an integer division by zero".into());
                }
                let f = |x: f32, y: f32| match op {
                    "Add" => x + y,
                    "Sub" => x - y,
                    "Div" => x / y,
                    _ => x * y,
                };
                match (&a, &b) {
                    (Const::I(..), Const::I(..)) => {
                        let g = |x: i64, y: i64| match op {
                            "Add" => x.wrapping_add(y),
                            "Sub" => x.wrapping_sub(y),
                            // ONNX's integer division truncates, as Rust's does.
                            "Div" => x.wrapping_div(y),
                            _ => x.wrapping_mul(y),
                        };
                        let (d, v) = broadcast((a.dims(), &a.ints()), (b.dims(), &b.ints()), g)?;
                        Const::I(d, v)
                    }
                    _ => {
                        let (d, v) = broadcast((a.dims(), &a.floats()), (b.dims(), &b.floats()), f)?;
                        Const::F(d, v)
                    }
                }
            }
            op => return Err(format!("{op} of constants is not supported")),
        })
    }

    /// Notes where the file's declared output shape disagrees with the inferred one (advisory: the
    /// batch axis is free).
    pub(super) fn check_output(&self, name: &str, declared: Option<Vec<Option<i64>>>) -> R<Vec<String>> {
        let Some(Value::Tensor(t)) = self.values.get(name) else { return Err(format!("output `{name}` is a constant, not computed from the input")) };
        let inferred: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        Ok(match declared {
            Some(d) if d.len() != inferred.len() || d.iter().zip(&inferred).skip(1).any(|(d, &i)| d.is_some_and(|d| d != i)) => {
                vec![format!("the file declares output `{name}` with shape {d:?}; cnnc infers {inferred:?} (the file's shape is advisory)")]
            }
            _ => vec![],
        })
    }

    /// The model text and the weights its links read.
    pub(super) fn finish(mut self, header: &str, model: &str, inputs: &[(String, Vec<usize>)], output: &str) -> R<(String, HashMap<String, Array>)> {
        let Some(Value::Tensor(out)) = self.values.get(output).filter(|v| !matches!(v, Value::Tensor(t) if t.pad != [0; 4])) else {
            return Err(format!("output `{output}` is not computed (a `Pad` output is folded into the next layer only)"));
        };
        let mut text = format!("{header}model {model} {{\n");
        for l in &self.links {
            let nobias = if l.bias == Some(false) { ", nobias=True" } else { "" };
            let _ = writeln!(text, "    {} = {}{nobias})", l.name, l.ctor);
        }
        let args: Vec<String> = inputs
            .iter()
            .map(|(name, dims)| match self.values.get(name) {
                Some(Value::Tensor(t)) if t.shape[1..] == dims[..] => {
                    Ok(format!("{}: [{}]", t.var, dims.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")))
                }
                _ => Err(format!("input `{name}` is also the output of a node")),
            })
            .collect::<R<_>>()?;
        let _ = writeln!(text, "\n    forward({}) {{", args.join(", "));
        for line in &self.lines {
            let _ = writeln!(text, "        {line}");
        }
        let _ = writeln!(text, "        return {}\n    }}\n}}", out.var);
        let weights = std::mem::take(&mut self.weights);
        Ok((text, weights))
    }
}
