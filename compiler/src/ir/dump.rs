//! Stable text forms of a graph: the IR dump (`--emit ir`), the per-layer table (`cnnc compile`) and
//! Graphviz text (`--emit dot`).
//!
//! Both are snapshot-tested for every model in `models/`; change them only on purpose.

use super::{Graph, Kind};
use crate::diag::{FileId, Source};
use cnnc_runtime::op::Batched;
use std::fmt::Write;

/// One line per node: `%id = op[attrs](args) {params} : shape  # layer @ line:col`.
pub fn dump(g: &Graph, src: &Source) -> String {
    let mut out = format!("graph {} {{\n", g.name);
    for (id, n) in g.nodes() {
        let head = match &n.kind {
            Kind::Input(_) => format!("{id} = input {}", n.layer),
            Kind::Op(op) => {
                let args: Vec<String> = g.args(id).iter().map(ToString::to_string).collect();
                let params: Vec<String> = n.params.iter().map(ToString::to_string).collect();
                let params = if params.is_empty() { String::new() } else { format!(" {{{}}}", params.join(", ")) };
                format!("{id} = {op}({}){params}", args.join(", "))
            }
        };
        let at = if n.span.file == FileId::MODEL {
            let (line, col) = src.line_col(n.span);
            format!("{line}:{col}")
        } else {
            src.location(n.span)
        };
        let why = match &n.provenance {
            Some(p) => format!(" [{}; cost {:.0} -> {:.0}]", p.rules.join(", "), p.cost_before, p.cost_after),
            None => String::new(),
        };
        writeln!(out, "  {head} : {}  # {} @ {at}{why}", Batched(&n.shape), n.layer).expect("write to String");
    }
    writeln!(out, "  return {}\n}}", g.output).expect("write to String");
    out
}

/// The per-layer table: layer, op, output shape, parameters, MACs per image, and exact totals.
pub fn table(g: &Graph) -> String {
    let mut rows = vec![["layer".to_string(), "op".into(), "output".into(), "params".into(), "MACs".into()]];
    let mut seen = std::collections::HashSet::new();
    let (mut total_params, mut total_macs) = (0u64, 0u64);
    for (id, n) in g.nodes() {
        let (name, params, macs) = match &n.kind {
            Kind::Input(_) => ("input", 0, 0),
            Kind::Op(op) => {
                let params: u64 =
                    n.params.iter().zip(op.params()).filter(|(k, _)| seen.insert((*k).clone())).map(|(_, (_, s))| s.iter().product::<usize>() as u64).sum();
                (op.name(), params, g.node_macs(id))
            }
        };
        total_params += params;
        total_macs += macs;
        let dash = |v: u64| if v == 0 { "-".to_string() } else { thousands(v) };
        rows.push([n.layer.clone(), name.into(), Batched(&n.shape).to_string(), dash(params), dash(macs)]);
    }
    rows.push(["total".into(), String::new(), String::new(), thousands(total_params), thousands(total_macs)]);
    let widths: Vec<usize> = (0..5).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = format!("model {}: {} layers\n", g.name, g.g.node_count() - g.inputs.len());
    for (i, r) in rows.iter().enumerate() {
        if i + 1 == rows.len() {
            writeln!(out, "{}", "-".repeat(widths.iter().sum::<usize>() + 8)).expect("write to String");
        }
        let line = format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {:>w4$}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4]
        );
        writeln!(out, "{}", line.trim_end()).expect("write to String");
    }
    writeln!(out, "{} MACs per image ({:.4} GFLOP), {} parameters", total_macs, 2.0 * total_macs as f64 / 1e9, total_params).expect("write to String");
    out
}

/// `1135256096` → `1,135,256,096`.
pub fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Graphviz text: one box per node (layer, op with its attributes, output shape); a node the optimizer
/// produced is filled and lists the rules that made it and the parameters it folded in.
pub fn dot(g: &Graph) -> String {
    let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = format!("digraph \"{}\" {{\n  node [shape=box, fontname=\"Helvetica\", fontsize=10];\n", quote(&g.name));
    for (id, n) in g.nodes() {
        let (what, style) = match (&n.kind, &n.provenance) {
            (Kind::Input(_), _) => (vec!["input".to_string()], ", shape=ellipse"),
            (Kind::Op(op), None) => (vec![op.to_string()], ""),
            (Kind::Op(op), Some(p)) => {
                let params: Vec<String> = n.params.iter().map(ToString::to_string).collect();
                (
                    vec![op.to_string(), format!("rules: {}", p.rules.join(", ")), format!("params: {}", params.join(", "))],
                    ", style=filled, fillcolor=\"#dde8f8\"",
                )
            }
        };
        let lines: Vec<String> = [n.layer.clone()].into_iter().chain(what).chain([Batched(&n.shape).to_string()]).map(|l| quote(&l)).collect();
        writeln!(out, "  n{} [label=\"{}\"{style}];", id.0.index(), lines.join("\\n")).expect("write to String");
    }
    for (id, _) in g.nodes() {
        for a in g.args(id) {
            writeln!(out, "  n{} -> n{};", a.0.index(), id.0.index()).expect("write to String");
        }
    }
    out + "}\n"
}
