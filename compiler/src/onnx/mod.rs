//! ONNX models → a model file in cnnc's language, with the weights under Chainer-style keys.
//!
//! Importing writes text, not a graph: `cnnc compile model.onnx` compiles exactly the text that
//! `cnnc import model.onnx` prints, so the two can never disagree, and every check and diagnostic of the
//! front end applies to imported models too. This module owns reading the protobuf (initializers,
//! external data confined to the model's folder, constants folded), ordering the nodes, and the op table
//! ([`ops`]) that writes each ONNX node as layers and functions with ONNX's exact semantics.
//! Invariant left: the text compiles to a graph that computes what the ONNX graph computes for any batch
//! size (axis 0 of every input is the batch), and every parameter it names is in the weights.

mod ops;

use crate::weights::{Array, Float};
use cnnc_onnx_proto as pb;
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("cannot read `{path}`")]
    Io { path: String, source: std::io::Error },
    #[error("`{path}` is not an ONNX model: {reason}")]
    NotOnnx { path: String, reason: String },
    #[error("`{path}`: {message}")]
    Invalid { path: String, message: String },
    #[error("`{path}` uses {} operator{} cnnc does not support:\n{}", .nodes.len(), if .nodes.len() == 1 { "" } else { "s" }, .nodes.join("\n"))]
    Unsupported { path: String, nodes: Vec<String> },
}

/// An imported model: its text, its weights by key, and notes for the user (declared output shapes
/// that disagree with the inferred ones, ...).
pub struct Imported {
    pub text: String,
    pub weights: HashMap<String, Array>,
    pub notes: Vec<String>,
}

/// A constant: a shape and its values, as floats (FLOAT, DOUBLE, FLOAT16) or integers (INT*, UINT8, BOOL).
#[derive(Clone, Debug, PartialEq)]
enum Const {
    F(Vec<usize>, Vec<f32>),
    I(Vec<usize>, Vec<i64>),
}

impl Const {
    fn dims(&self) -> &[usize] {
        match self {
            Const::F(d, _) | Const::I(d, _) => d,
        }
    }
    fn ints(&self) -> Vec<i64> {
        match self {
            Const::I(_, v) => v.clone(),
            Const::F(_, v) => v.iter().map(|&x| x as i64).collect(),
        }
    }
    fn floats(&self) -> Vec<f32> {
        match self {
            Const::F(_, v) => v.clone(),
            Const::I(_, v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
    fn with_dims(self, d: Vec<usize>) -> Const {
        match self {
            Const::F(_, v) => Const::F(d, v),
            Const::I(_, v) => Const::I(d, v),
        }
    }
}

/// Reads `path` and writes it as a model file (see the module doc).
pub fn import(path: &Path) -> Result<Imported, OnnxError> {
    let limit = "protobuf's limit of 2 GiB for an ONNX file (a larger model keeps its weights in external data)";
    let bytes = crate::weights::read_file(path, 2 << 30, limit).map_err(|source| OnnxError::Io { path: path.display().to_string(), source })?;
    import_bytes(path, &bytes)
}

/// Imports the ONNX model in `bytes`; `path` names it in messages and locates its external data.
pub fn import_bytes(path: &Path, bytes: &[u8]) -> Result<Imported, OnnxError> {
    let p = path.display().to_string();
    let model = pb::ModelProto::decode(bytes).map_err(|e| OnnxError::NotOnnx { path: p.clone(), reason: e.to_string() })?;
    let invalid = |message: String| OnnxError::Invalid { path: p.clone(), message };
    let graph = model.graph.as_ref().filter(|g| !g.node.is_empty()).ok_or_else(|| OnnxError::NotOnnx { path: p.clone(), reason: "it has no graph".into() })?;
    let opset = model.opset_import.iter().find(|o| matches!(o.domain(), "" | "ai.onnx")).map_or(1, |o| o.version());
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut values: HashMap<String, ops::Value> = HashMap::new();
    for t in &graph.initializer {
        values.insert(t.name().to_string(), ops::Value::Const(tensor(t, dir).map_err(|m| invalid(format!("initializer `{}`: {m}", t.name())))?));
    }
    let mut inputs = vec![];
    for i in graph.input.iter().filter(|i| !values.contains_key(i.name())) {
        let elem = match i.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(pb::type_proto::Value::TensorType(t)) => t.elem_type(),
            _ => 0,
        };
        // A float input of another width runs in float32, as cnnc computes; integers are not images.
        use pb::tensor_proto::DataType as T;
        if !matches!(T::try_from(elem), Ok(T::Float | T::Double | T::Float16 | T::Bfloat16 | T::Undefined)) {
            let ty = T::try_from(elem).map_or_else(|_| format!("type {elem}"), |t| t.as_str_name().to_string());
            return Err(invalid(format!("input `{}` is {ty}; cnnc's inputs are floating-point tensors (computed in float32)", i.name())));
        }
        let shape = value_shape(i).ok_or_else(|| invalid(format!("input `{}` is not a float tensor of known rank", i.name())))?;
        let dims: Option<Vec<usize>> = shape.iter().skip(1).map(|d| d.filter(|&d| d > 0).map(|d| d as usize)).collect();
        let dims =
            dims.filter(|d| !d.is_empty()).ok_or_else(|| invalid(format!("input `{}` needs fixed sizes after the batch axis, has {shape:?}", i.name())))?;
        inputs.push((i.name().to_string(), dims));
    }
    let batches: std::collections::BTreeSet<i64> =
        graph.input.iter().filter(|i| !values.contains_key(i.name())).filter_map(|i| value_shape(i)?.first().copied()?).collect();
    if batches.len() > 1 {
        return Err(invalid(format!("the inputs declare different batch sizes {batches:?}; cnnc's inputs share axis 0, the batch")));
    }
    let order = topological(graph).map_err(invalid)?;
    let unsupported: Vec<String> = order
        .iter()
        .map(|&n| &graph.node[n])
        .filter(|n| !matches!(n.domain(), "" | "ai.onnx") || !ops::supported(n.op_type()))
        .map(|n| format!("  node `{}`: {} (domain `{}`, opset {opset})", n.name(), n.op_type(), if n.domain().is_empty() { "ai.onnx" } else { n.domain() }))
        .collect();
    if !unsupported.is_empty() {
        return Err(OnnxError::Unsupported { path: p, nodes: unsupported });
    }
    let name = model_name(graph.name(), path);
    let mut uses: HashMap<String, usize> = HashMap::new();
    for i in graph.node.iter().flat_map(|n| &n.input).chain(graph.output.iter().flat_map(|o| &o.name)) {
        *uses.entry(i.clone()).or_default() += 1;
    }
    let mut w = ops::Writer::new(opset, values, uses);
    for (i, (input, dims)) in inputs.iter().enumerate() {
        w.input(i, input, dims);
    }
    for &n in &order {
        let node = &graph.node[n];
        w.node(node).map_err(|m| invalid(format!("node `{}` ({}): {m}", node.name(), node.op_type())))?;
    }
    let [out] = graph.output.as_slice() else { return Err(invalid(format!("the graph has {} outputs; cnnc models have one", graph.output.len()))) };
    let notes = w.check_output(out.name(), value_shape(out)).map_err(invalid)?;
    // A comment line: the file's own strings may hold line breaks (found by fuzzing), which would end it.
    let one_line = |s: String| s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>();
    let producer = one_line(format!("{} {}", model.producer_name(), model.producer_version())).trim().to_string();
    let header = format!(
        "# Imported by cnnc from `{}` (ONNX opset {opset}{}).\n",
        one_line(file_name(path)),
        if producer.is_empty() { String::new() } else { format!(", made by {producer}") }
    );
    let (text, weights) = w.finish(&header, &name, &inputs, out.name()).map_err(invalid)?;
    Ok(Imported { text, weights, notes })
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned())
}

/// A model name from the graph's name or the file's: letters, digits and `_`, starting with a capital.
fn model_name(graph: &str, path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let base = if graph.chars().any(|c| c.is_ascii_alphabetic()) && graph.len() < 40 { graph.to_string() } else { stem };
    let clean: String = base.split(|c: char| !c.is_ascii_alphanumeric()).filter(|s| !s.is_empty()).map(capitalize).collect();
    if clean.starts_with(|c: char| c.is_ascii_alphabetic()) {
        clean
    } else {
        format!("Model{clean}")
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
}

/// The shape of a graph input or output (None: not a tensor); `None` entries are symbolic dims.
fn value_shape(v: &pb::ValueInfoProto) -> Option<Vec<Option<i64>>> {
    use pb::tensor_shape_proto::dimension::Value as D;
    let Some(pb::type_proto::Value::TensorType(t)) = v.r#type.as_ref()?.value.as_ref() else { return None };
    let dims = &t.shape.as_ref()?.dim;
    Some(dims.iter().map(|d| if let Some(D::DimValue(v)) = d.value { Some(v) } else { None }).collect())
}

/// Node indices in an order where every input is produced before use (ONNX requires it; not every
/// exporter obeys). A name produced nowhere, or a cycle, is an error naming the node.
fn topological(graph: &pb::GraphProto) -> Result<Vec<usize>, String> {
    let mut known: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name()).chain(graph.input.iter().map(|i| i.name())).collect();
    known.insert("");
    let mut producer: HashMap<&str, &pb::NodeProto> = HashMap::new();
    for n in &graph.node {
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            if let Some(first) = producer.insert(o, n) {
                return Err(format!("`{o}` is written by two nodes, `{}` ({}) and `{}` ({})", first.name(), first.op_type(), n.name(), n.op_type()));
            }
            if known.contains(o.as_str()) {
                return Err(format!("node `{}` ({}) writes `{o}`, which is already a graph input or initializer", n.name(), n.op_type()));
            }
        }
    }
    let produced: std::collections::HashSet<&str> = producer.keys().copied().collect();
    for n in &graph.node {
        if let Some(i) = n.input.iter().find(|i| !known.contains(i.as_str()) && !produced.contains(i.as_str())) {
            return Err(format!("node `{}` ({}) reads `{i}`, which no node, input or initializer provides", n.name(), n.op_type()));
        }
    }
    let (mut order, mut left): (Vec<usize>, Vec<usize>) = (vec![], (0..graph.node.len()).collect());
    while !left.is_empty() {
        let (ready, rest): (Vec<usize>, Vec<usize>) = left.into_iter().partition(|&n| graph.node[n].input.iter().all(|i| known.contains(i.as_str())));
        if ready.is_empty() {
            let n = &graph.node[rest[0]];
            return Err(format!("the graph has a cycle through node `{}` ({})", n.name(), n.op_type()));
        }
        for &n in &ready {
            known.extend(graph.node[n].output.iter().map(String::as_str));
        }
        order.extend(ready);
        left = rest;
    }
    if let Some(o) = graph.output.iter().find(|o| !known.contains(o.name())) {
        return Err(format!("output `{}` is produced by no node", o.name()));
    }
    Ok(order)
}

/// A tensor's values, from its fields, its raw bytes, or an external file beside the model.
fn tensor(t: &pb::TensorProto, dir: &Path) -> Result<Const, String> {
    use pb::tensor_proto::DataType as T;
    let dims: Vec<usize> = t.dims.iter().map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d}"))).collect::<Result<_, _>>()?;
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n <= 1 << 32).ok_or("too many elements")?;
    let external;
    let raw: Option<&[u8]> = if t.data_location() == pb::tensor_proto::DataLocation::External {
        external = external_data(t, dir)?;
        Some(&external)
    } else {
        t.raw_data.as_deref()
    };
    let ty = T::try_from(t.data_type()).map_err(|_| format!("unknown data type {}", t.data_type()))?;
    let width = match ty {
        T::Float | T::Int32 | T::Uint32 => 4,
        T::Double | T::Int64 | T::Uint64 => 8,
        T::Float16 | T::Int16 | T::Uint16 | T::Bfloat16 => 2,
        T::Int8 | T::Uint8 | T::Bool => 1,
        _ => return Err(format!("data type {} is not supported", ty.as_str_name())),
    };
    let c = match raw {
        Some(raw) => {
            if raw.len() != n * width {
                return Err(format!("{} bytes of data for {n} elements of {}", raw.len(), ty.as_str_name()));
            }
            let chunks = raw.chunks_exact(width);
            let word = |c: &[u8]| c.iter().rev().fold(0u64, |a, &b| (a << 8) | b as u64);
            match ty {
                T::Float => Const::F(dims, Float::F32.decode(raw, true)),
                T::Double => Const::F(dims, Float::F64.decode(raw, true)),
                T::Float16 => Const::F(dims, Float::F16.decode(raw, true)),
                T::Bfloat16 => Const::F(dims, Float::Bf16.decode(raw, true)),
                T::Int8 => Const::I(dims, chunks.map(|c| c[0] as i8 as i64).collect()),
                T::Int16 => Const::I(dims, chunks.map(|c| word(c) as u16 as i16 as i64).collect()),
                T::Int32 => Const::I(dims, chunks.map(|c| word(c) as u32 as i32 as i64).collect()),
                _ => Const::I(dims, chunks.map(|c| word(c) as i64).collect()),
            }
        }
        None => {
            let c = match ty {
                T::Float => Const::F(dims, t.float_data.clone()),
                T::Double => Const::F(dims, t.double_data.iter().map(|&v| v as f32).collect()),
                T::Float16 => Const::F(dims, t.int32_data.iter().map(|&v| half::f16::from_bits(v as u16).to_f32()).collect()),
                T::Bfloat16 => Const::F(dims, t.int32_data.iter().map(|&v| half::bf16::from_bits(v as u16).to_f32()).collect()),
                T::Int64 => Const::I(dims, t.int64_data.clone()),
                T::Uint64 => Const::I(dims, t.uint64_data.iter().map(|&v| v as i64).collect()),
                _ => Const::I(dims, t.int32_data.iter().map(|&v| v as i64).collect()),
            };
            let len = match &c {
                Const::F(_, v) => v.len(),
                Const::I(_, v) => v.len(),
            };
            if len != n {
                return Err(format!("{len} values for {n} elements"));
            }
            c
        }
    };
    Ok(c)
}

/// The bytes of an externally stored tensor: `location` relative to the model's folder (and inside it),
/// `offset` and `length` checked against the file before anything is read.
fn external_data(t: &pb::TensorProto, dir: &Path) -> Result<Vec<u8>, String> {
    let entries: BTreeMap<&str, &str> = t.external_data.iter().map(|e| (e.key(), e.value())).collect();
    let location = entries.get("location").ok_or("external data without a `location`")?;
    let rel = Path::new(location);
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir)) {
        return Err(format!("external data location `{location}` leaves the model's folder"));
    }
    let file = dir.join(rel);
    let num = |k: &str| entries.get(k).map(|v| v.parse::<u64>().map_err(|_| format!("external data {k} `{v}` is not a number"))).transpose();
    let (offset, length) = (num("offset")?.unwrap_or(0), num("length")?);
    let size = std::fs::metadata(&file).map_err(|e| format!("external data `{}`: {e}", file.display()))?.len();
    let length = length.unwrap_or(size.saturating_sub(offset));
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(format!("external data `{}` has {size} bytes; offset {offset} + length {length} runs past its end", file.display()));
    }
    if let Some(limit) = crate::weights::memory_limit().filter(|&m| length > m) {
        return Err(format!("external data `{}`: {length} bytes are more than cnnc's limit of {limit} (80 % of this machine's memory)", file.display()));
    }
    use std::io::{Read, Seek};
    let mut f = std::fs::File::open(&file).map_err(|e| format!("external data `{}`: {e}", file.display()))?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(length as usize).map_err(|_| format!("external data `{}`: the system refused {length} bytes of memory", file.display()))?;
    buf.resize(length as usize, 0);
    f.seek(std::io::SeekFrom::Start(offset)).and_then(|_| f.read_exact(&mut buf)).map_err(|e| format!("external data `{}`: {e}", file.display()))?;
    Ok(buf)
}

/// A serialized `TensorProto` file (the ONNX test data's `input_0.pb`, `output_0.pb`) as a float array.
pub fn read_tensor(path: &Path) -> Result<Array, OnnxError> {
    let p = path.display().to_string();
    let bytes = crate::weights::read_within_memory(path).map_err(|source| OnnxError::Io { path: p.clone(), source })?;
    let t = pb::TensorProto::decode(bytes.as_slice()).map_err(|e| OnnxError::NotOnnx { path: p.clone(), reason: e.to_string() })?;
    match tensor(&t, path.parent().unwrap_or(Path::new("."))).map_err(|message| OnnxError::Invalid { path: p, message })? {
        Const::F(d, v) => Ok((d, v)),
        Const::I(d, v) => Ok((d, v.into_iter().map(|x| x as f32).collect())),
    }
}
