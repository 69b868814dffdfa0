//! The table-driven bad-input suite: every `[[case]]` in `tests/bad-input/*.toml` is one test (so one
//! failure hides no other) that writes the case's files into a fresh folder, runs `cnnc` there and checks
//! the exit code, the words the message must contain, that nothing panicked, and — for a failed run —
//! that no file was left behind (no half-written output). The format is described in
//! `tests/bad-input/README.md`; `cargo test --release -p cnnc --test bad_input -- NAME` runs one case.

use cnnc_onnx_proto as pb;
use libtest_mimic::{Arguments, Failed, Trial};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Suite {
    case: Vec<Case>,
}

/// One case: the files it writes (by kind, keyed by file name), the command line and what must come of it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    text: BTreeMap<String, String>,
    #[serde(default)]
    bytes: BTreeMap<String, String>,
    #[serde(default)]
    copy: BTreeMap<String, Copy>,
    #[serde(default)]
    npy: BTreeMap<String, Npy>,
    #[serde(default)]
    npz: BTreeMap<String, BTreeMap<String, Npy>>,
    #[serde(default)]
    safetensors: BTreeMap<String, Safetensors>,
    #[serde(default)]
    image: BTreeMap<String, Image>,
    #[serde(default)]
    onnx: BTreeMap<String, Onnx>,
    /// Arguments split at spaces; `@path` is a path in the repository, anything else is relative to the
    /// case's folder.
    run: String,
    exit: i32,
    /// Words stderr must contain.
    #[serde(default)]
    says: Vec<String>,
    /// Words stdout must contain.
    #[serde(default)]
    prints: Vec<String>,
    /// Files a successful run must have written.
    #[serde(default)]
    creates: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Copy {
    from: String,
    /// Keep only the first `cut` bytes.
    cut: Option<usize>,
    /// Replace the first occurrence of a byte string (escapes as in `bytes`) by another.
    replace: Option<[String; 2]>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Npy {
    #[serde(default = "f4")]
    descr: String,
    #[serde(default)]
    shape: Vec<u64>,
    #[serde(default)]
    fortran: bool,
    /// The values in file order; otherwise `fill` repeated (default 0.5).
    values: Option<Vec<f64>>,
    fill: Option<f64>,
    /// A header dictionary written verbatim instead of the one built from descr, order and shape.
    header: Option<String>,
    /// Drop this many bytes from the end of the data.
    #[serde(default)]
    cut: usize,
}

fn f4() -> String {
    "<f4".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Safetensors {
    /// The JSON header, verbatim.
    header: String,
    /// Bytes of data after it (f32 1.0 repeated, then zeros for a remainder).
    #[serde(default)]
    data: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Image {
    w: u32,
    h: u32,
    #[serde(default = "rgb8")]
    color: String,
    #[serde(default = "png")]
    format: String,
    cut: Option<usize>,
}

fn rgb8() -> String {
    "rgb8".into()
}
fn png() -> String {
    "png".into()
}

/// A small ONNX graph: values as `name:d1,d2,…` (a dimension that is not a number is symbolic, an
/// optional `:T` suffix is the element type number, default 1 = float); nodes as
/// `Op in1,in2 -> out1 attr=value …` (value `[1,2]` a list of ints or floats, `1` an int, `0.5` a float,
/// anything else a string); initializers `name:dims` filled with small values, or `name:dims=v`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Onnx {
    #[serde(default = "opset")]
    opset: i64,
    inputs: Vec<String>,
    outputs: Vec<String>,
    #[serde(default)]
    init: Vec<String>,
    nodes: Vec<String>,
}

fn opset() -> i64 {
    13
}

fn main() {
    let dir = root().join("tests/bad-input");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).expect("tests/bad-input exists").map(|e| e.expect("entry").path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    files.sort();
    let mut trials = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable");
        let suite: Suite = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let group = file.file_stem().expect("a name").to_string_lossy().into_owned();
        for case in suite.case {
            trials.push(Trial::test(format!("{group}::{}", case.name), move || check(&case)));
        }
    }
    let mut names: Vec<&str> = trials.iter().map(|t| t.name()).collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        panic!("two cases are named {}", w[0]);
    }
    libtest_mimic::run(&Arguments::from_args(), trials).exit();
}

fn check(case: &Case) -> Result<(), Failed> {
    let dir = tempfile::tempdir()?;
    write_files(case, dir.path())?;
    let before = listing(dir.path());
    let args: Vec<String> = case.run.split_whitespace().map(|a| a.strip_prefix('@').map_or(a.to_string(), |p| root().join(p).display().to_string())).collect();
    let (code, stdout, stderr) = run(&args, dir.path())?;
    let context = format!("cnnc {}\n--- stdout\n{stdout}--- stderr\n{stderr}", case.run);
    if stderr.contains("panicked") {
        return Err(format!("a panic\n{context}").into());
    }
    if code != case.exit {
        return Err(format!("exit code {code}, expected {}\n{context}", case.exit).into());
    }
    for (stream, text, words) in [("stderr", &stderr, &case.says), ("stdout", &stdout, &case.prints)] {
        if let Some(w) = words.iter().find(|w| !text.contains(w.as_str())) {
            return Err(format!("{stream} lacks {w:?}\n{context}").into());
        }
    }
    let after = listing(dir.path());
    if code != 0 && after != before {
        return Err(format!("a failed run left files behind: {:?}\n{context}", after.difference(&before).collect::<Vec<_>>()).into());
    }
    if let Some(f) = case.creates.iter().find(|f| !dir.path().join(f).exists()) {
        return Err(format!("{f} was not written\n{context}").into());
    }
    Ok(())
}

fn listing(dir: &Path) -> std::collections::BTreeSet<String> {
    walk(dir).into_iter().map(|p| p.strip_prefix(dir).expect("inside").display().to_string()).collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir).map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_else(|_| Vec::new());
    entries.into_iter().flat_map(|p: PathBuf| if p.is_dir() { [vec![p.clone()], walk(&p)].concat() } else { vec![p] }).collect()
}

/// Runs cnnc in `dir`; a run past two minutes is a hang, killed and reported.
fn run(args: &[String], dir: &Path) -> Result<(i32, String, String), Failed> {
    let out = dir.join(".stdout");
    let err = dir.join(".stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cnnc"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?)
        .spawn()?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            child.kill()?;
            return Err("still running after 120 s (a hang)".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned());
    let (stdout, stderr) = (read(&out)?, read(&err)?);
    std::fs::remove_file(out)?;
    std::fs::remove_file(err)?;
    let code = status.code().ok_or_else(|| format!("killed by a signal ({status})\n--- stderr\n{stderr}"))?;
    Ok((code, stdout, stderr))
}

fn write_files(case: &Case, dir: &Path) -> Result<(), Failed> {
    let mut files: Vec<(&String, Vec<u8>)> = Vec::new();
    files.extend(case.text.iter().map(|(n, t)| (n, t.as_bytes().to_vec())));
    for (n, b) in &case.bytes {
        files.push((n, unescape(b)?));
    }
    for (n, c) in &case.copy {
        let mut b = std::fs::read(root().join(&c.from)).map_err(|e| format!("{}: {e}", c.from))?;
        if let Some([from, to]) = &c.replace {
            let (from, to) = (unescape(from)?, unescape(to)?);
            let at = b.windows(from.len()).position(|w| w == from).ok_or_else(|| format!("{}: {from:?} not found", c.from))?;
            b.splice(at..at + from.len(), to);
        }
        b.truncate(c.cut.unwrap_or(b.len()));
        files.push((n, b));
    }
    for (n, a) in &case.npy {
        files.push((n, npy(a)?));
    }
    for (n, members) in &case.npz {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (key, a) in members {
            zip.start_file(format!("{key}.npy"), zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored))?;
            std::io::Write::write_all(&mut zip, &npy(a)?)?;
        }
        files.push((n, zip.finish()?.into_inner()));
    }
    for (n, s) in &case.safetensors {
        let ones = 1f32.to_le_bytes().into_iter().cycle().take(s.data / 4 * 4).chain(std::iter::repeat_n(0, s.data % 4));
        files.push((n, [&(s.header.len() as u64).to_le_bytes()[..], s.header.as_bytes()].concat().into_iter().chain(ones).collect()));
    }
    for (n, i) in &case.image {
        files.push((n, image(i)?));
    }
    for (n, o) in &case.onnx {
        files.push((n, prost::Message::encode_to_vec(&onnx(o)?)));
    }
    for (name, bytes) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, bytes)?;
    }
    Ok(())
}

/// A byte string with `\xNN`, `\n`, `\t`, `\0` and `\\` escapes.
fn unescape(s: &str) -> Result<Vec<u8>, Failed> {
    let mut out = Vec::new();
    let mut rest = s.as_bytes();
    while let Some((&c, tail)) = rest.split_first() {
        rest = tail;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let (&e, tail) = rest.split_first().ok_or("a lone \\ at the end")?;
        rest = tail;
        out.push(match e {
            b'n' => b'\n',
            b't' => b'\t',
            b'0' => 0,
            b'\\' => b'\\',
            b'x' if rest.len() >= 2 => {
                let v = u8::from_str_radix(std::str::from_utf8(&rest[..2])?, 16)?;
                rest = &rest[2..];
                v
            }
            _ => return Err(format!("unknown escape \\{}", e as char).into()),
        });
    }
    Ok(out)
}

fn npy(a: &Npy) -> Result<Vec<u8>, Failed> {
    let shape = a.shape.iter().map(|d| format!("{d}, ")).collect::<String>();
    let shape = if a.shape.len() == 1 { shape.trim_end().to_string() } else { shape.trim_end_matches(", ").to_string() };
    let order = if a.fortran { "True" } else { "False" };
    let dict = a.header.clone().unwrap_or_else(|| format!("{{'descr': '{}', 'fortran_order': {order}, 'shape': ({shape}), }}", a.descr));
    let mut header = dict.into_bytes();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(b' ');
    }
    header.push(b'\n');
    let mut out = [b"\x93NUMPY\x01\x00".as_slice(), &(header.len() as u16).to_le_bytes(), &header].concat();
    let n: u64 = a.shape.iter().product();
    let values = a.values.clone().unwrap_or_else(|| vec![a.fill.unwrap_or(0.5); n as usize]);
    let little = !a.descr.starts_with('>');
    let mut data = Vec::new();
    for v in values {
        let le: Vec<u8> = match &a.descr[1..] {
            "f4" => (v as f32).to_le_bytes().to_vec(),
            "f8" => v.to_le_bytes().to_vec(),
            "f2" => half::f16::from_f64(v).to_le_bytes().to_vec(),
            "i4" => (v as i32).to_le_bytes().to_vec(),
            "i8" => (v as i64).to_le_bytes().to_vec(),
            "u1" | "b1" => vec![v as u8],
            other => return Err(format!("no writer for dtype {other}").into()),
        };
        data.extend(if little { le } else { le.into_iter().rev().collect() });
    }
    data.truncate(data.len().saturating_sub(a.cut));
    out.extend(data);
    Ok(out)
}

fn image(i: &Image) -> Result<Vec<u8>, Failed> {
    use image::{DynamicImage, ImageFormat, RgbImage};
    let rgb = RgbImage::from_fn(i.w, i.h, |x, y| image::Rgb([(x * 7 % 256) as u8, (y * 13 % 256) as u8, ((x + y) * 5 % 256) as u8]));
    let img = DynamicImage::ImageRgb8(rgb);
    let img = match &i.color[..] {
        "rgb8" => img,
        "l8" => DynamicImage::ImageLuma8(img.to_luma8()),
        "la8" => DynamicImage::ImageLumaA8(img.to_luma_alpha8()),
        "rgba8" => DynamicImage::ImageRgba8(img.to_rgba8()),
        "l16" => DynamicImage::ImageLuma16(img.to_luma16()),
        "rgb16" => DynamicImage::ImageRgb16(img.to_rgb16()),
        other => return Err(format!("unknown color {other}").into()),
    };
    let format = ImageFormat::from_extension(&i.format).ok_or_else(|| format!("unknown format {}", i.format))?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format)?;
    let mut out = out.into_inner();
    out.truncate(i.cut.unwrap_or(out.len()));
    Ok(out)
}

fn onnx(o: &Onnx) -> Result<pb::ModelProto, Failed> {
    use pb::tensor_shape_proto::{dimension::Value as Dim, Dimension};
    let value = |spec: &String| -> Result<pb::ValueInfoProto, Failed> {
        let mut parts = spec.split(':');
        let name = parts.next().unwrap_or_default();
        let dims = parts.next().unwrap_or_default();
        let elem = parts.next().map_or(Ok(1), str::parse)?;
        let dim = dims
            .split(',')
            .filter(|d| !d.is_empty())
            .map(|d| Dimension { value: Some(d.parse().map_or_else(|_| Dim::DimParam(d.into()), Dim::DimValue)), ..Default::default() })
            .collect();
        Ok(pb::ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor { elem_type: Some(elem), shape: Some(pb::TensorShapeProto { dim }) })),
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    let init = |spec: &String| -> Result<pb::TensorProto, Failed> {
        let (spec, fill) = spec.split_once('=').map_or((&spec[..], None), |(s, v)| (s, Some(v)));
        let (name, dims) = spec.split_once(':').ok_or_else(|| format!("initializer {spec}: name:dims"))?;
        let dims: Vec<i64> = dims.split(',').filter(|d| !d.is_empty()).map(str::parse).collect::<Result<_, _>>()?;
        let n = dims.iter().product::<i64>().max(0) as usize;
        let data = match fill {
            Some(v) => vec![v.parse::<f32>()?; n],
            None => (0..n).map(|i| 0.1 * ((i % 7) as f32 - 3.0)).collect(),
        };
        Ok(pb::TensorProto { name: Some(name.into()), dims, data_type: Some(1), float_data: data, ..Default::default() })
    };
    let node = |spec: &String| -> Result<pb::NodeProto, Failed> {
        let mut words = spec.split_whitespace();
        let op = words.next().ok_or("an empty node")?;
        let list = |s: &str| s.split(',').filter(|v| !v.is_empty()).map(String::from).collect::<Vec<_>>();
        let (mut input, mut output, mut attribute) = (Vec::new(), Vec::new(), Vec::new());
        let mut seen_arrow = false;
        for w in words {
            if w == "->" {
                seen_arrow = true;
            } else if let Some((k, v)) = w.split_once('=') {
                attribute.push(attr(k, v));
            } else if seen_arrow {
                output = list(w);
            } else {
                input = list(w);
            }
        }
        Ok(pb::NodeProto { op_type: Some(op.into()), name: Some(format!("{op}_{}", output.join("_"))), input, output, attribute, ..Default::default() })
    };
    let graph = pb::GraphProto {
        name: Some("g".into()),
        node: o.nodes.iter().map(node).collect::<Result<_, _>>()?,
        input: o.inputs.iter().map(value).collect::<Result<_, _>>()?,
        output: o.outputs.iter().map(value).collect::<Result<_, _>>()?,
        initializer: o.init.iter().map(init).collect::<Result<_, _>>()?,
        ..Default::default()
    };
    Ok(pb::ModelProto {
        ir_version: Some(8),
        opset_import: vec![pb::OperatorSetIdProto { domain: Some(String::new()), version: Some(o.opset) }],
        graph: Some(graph),
        ..Default::default()
    })
}

fn attr(name: &str, v: &str) -> pb::AttributeProto {
    use pb::attribute_proto::AttributeType as T;
    let mut a = pb::AttributeProto { name: Some(name.into()), ..Default::default() };
    if let Some(items) = v.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
        let items: Vec<&str> = items.split(',').filter(|s| !s.is_empty()).collect();
        if let Ok(ints) = items.iter().map(|s| s.parse::<i64>()).collect::<Result<Vec<_>, _>>() {
            (a.ints, a.r#type) = (ints, Some(T::Ints as i32));
        } else {
            (a.floats, a.r#type) = (items.iter().map(|s| s.parse().unwrap_or(f32::NAN)).collect(), Some(T::Floats as i32));
        }
    } else if let Ok(i) = v.parse::<i64>() {
        (a.i, a.r#type) = (Some(i), Some(T::Int as i32));
    } else if let Ok(f) = v.parse::<f32>() {
        (a.f, a.r#type) = (Some(f), Some(T::Float as i32));
    } else {
        (a.s, a.r#type) = (Some(v.as_bytes().to_vec()), Some(T::String as i32));
    }
    a
}
