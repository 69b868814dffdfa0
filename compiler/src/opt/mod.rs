//! The optimizer: equality saturation over the layer graph with egg, then cost-based extraction.
//!
//! Owns the rewrite rules ([`RULES`], one line each), the cost model per backend ([`lang::CostModel`]),
//! and the provenance of every rewritten node. The graph goes into an e-graph (sharing kept), the rules
//! run under fixed limits, the cheapest equivalent graph comes back out, and each node records the rules
//! that produced it and its cost before and after. Weight transforms (BatchNormalization folded into a
//! convolution) stay symbolic terms until `lower` evaluates them once.
//! Invariant left: the optimized graph computes the same function as its input (each rule is checked on
//! the reference runtime) and keeps the input's parameter specs, so weights bind the same way.

pub mod lang;

use crate::ir::{Graph, Kind, Node, NodeId, Param, Provenance};
use cnnc_runtime::op::{Axis, BatchNorm, Conv2d, Dims, F64};
use cnnc_runtime::Op;
use egg::{EGraph, Id, Language, Pattern, PatternAst, Rewrite, Runner, Subst, Symbol, Var};
use lang::{attr, is_nobias, op_of, Attr, Cnn, Cost, CostModel, Shapes};
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// A rewrite: its name, left side, right side, and the condition under which it is sound, side by side.
/// `docs/rewrites.md` justifies each one.
pub struct Rule {
    pub name: &'static str,
    /// A pattern, or a multi-pattern (`?a = ..., ?b = ...`) that matches several e-classes at once.
    pub lhs: &'static str,
    pub rhs: Rhs,
    pub guard: Guard,
}

pub enum Rhs {
    Pattern(&'static str),
    /// A right side that computes attributes or takes any number of inputs.
    Build(Builder),
}

/// Where a rule's left side matched, whether rewriting there is sound.
pub type Guard = fn(&EGraph<Cnn, Shapes>, &Subst) -> bool;

const fn rw(name: &'static str, lhs: &'static str, rhs: &'static str, guard: Guard) -> Rule {
    Rule { name, lhs, rhs: Rhs::Pattern(rhs), guard }
}
const fn built(name: &'static str, lhs: &'static str, rhs: Builder, guard: Guard) -> Rule {
    Rule { name, lhs, rhs: Rhs::Build(rhs), guard }
}

#[rustfmt::skip]
pub const RULES: &[Rule] = &[
    rw("drop-dropout", "(dropout ?d ?x)", "?x", always),
    rw("fold-bn-into-conv", "(batch_norm ?n (conv2d ?a ?x ?w ?b) ?g ?be ?m ?v)", "(conv2d ?a ?x (fold-w ?n ?w ?g ?v) (fold-b ?n ?b ?g ?be ?m ?v))", always),
    rw("fold-bn-into-linear", "(batch_norm ?n (linear ?a ?x ?w ?b) ?g ?be ?m ?v)", "(linear ?a ?x (fold-w ?n ?w ?g ?v) (fold-b ?n ?b ?g ?be ?m ?v))", always),
    rw("fuse-conv-relu", "(relu ?r (conv2d ?a ?x ?w ?b))", "(conv2d+relu ?a ?x ?w ?b)", always),
    rw("fuse-conv-relu-maxpool", "(max_pool2d ?p (conv2d+relu ?a ?x ?w ?b))", "(conv2d+relu+max_pool2d ?a ?p ?x ?w ?b)", always),
    rw("fuse-conv-add", "(add ?n (conv2d ?a ?x ?w ?b) ?r)", "(conv2d+add ?a ?x ?r ?w ?b)", always),
    rw("add-commutes", "(add ?n ?p ?q)", "(add ?n ?q ?p)", always),
    rw("fuse-conv-add-relu", "(relu ?q (conv2d+add ?a ?x ?r ?w ?b))", "(conv2d+add+relu ?a ?x ?r ?w ?b)", always),
    rw("fuse-linear-relu", "(relu ?r (linear ?a ?x ?w ?b))", "(linear+relu ?a ?x ?w ?b)", always),
    rw("relu-before-maxpool", "(relu ?r (max_pool2d ?p ?x))", "(max_pool2d ?p (relu ?r ?x))", every_window_holds_an_input),
    rw("relu-idempotent", "(relu ?r (relu ?r ?x))", "(relu ?r ?x)", always),
    rw("drop-identity-reshape", "(reshape ?s ?x)", "?x", reshape_keeps_the_shape),
    built("relu-into-concat", "(relu ?r ?c)", relu_into_concat, is_concat),
    built("merge-parallel-convs", "?c1 = (conv2d ?a1 ?x ?w1 ?b1), ?c2 = (conv2d ?a2 ?x ?w2 ?b2)", merge_parallel_convs, convs_merge),
];

fn always(_: &EGraph<Cnn, Shapes>, _: &Subst) -> bool {
    true
}

fn var(s: &Subst, v: &str) -> Id {
    s[v.parse::<Var>().expect("a pattern variable")]
}

/// relu(max(window)) = max(relu(window)) when every window holds at least one input element, else it is
/// −∞ (all padding) on one side and 0 on the other. The first window needs pad < kernel; the last, under
/// cover_all, needs pad + stride <= kernel (its start is at most H + pad − kernel + stride − 1).
fn every_window_holds_an_input(eg: &EGraph<Cnn, Shapes>, s: &Subst) -> bool {
    let Some(Op::MaxPool2d(p)) = attr(eg, var(s, "?p")) else { return false };
    (0..2).all(|i| p.pad[i] < p.kernel[i] && (!p.cover_all || p.pad[i] + p.stride[i] <= p.kernel[i]))
}

/// Only a reshape to the shape it already has is an identity.
fn reshape_keeps_the_shape(eg: &EGraph<Cnn, Shapes>, s: &Subst) -> bool {
    matches!(attr(eg, var(s, "?s")), Some(Op::Reshape { dims }) if eg[var(s, "?x")].data.as_ref() == Some(&dims))
}

fn is_concat(eg: &EGraph<Cnn, Shapes>, s: &Subst) -> bool {
    eg[var(s, "?c")].nodes.iter().any(|n| n.name() == Some("concat"))
}

/// Two convolutions of one input with the same window, stride, padding, groups = 1 and bias-ness, each
/// unordered pair of original convolutions once: merging merges again would grow the e-graph by every
/// order of every subset (GoogLeNetBN's inception modules blew up that way), and over disjoint weights.
fn convs_merge(eg: &EGraph<Cnn, Shapes>, s: &Subst) -> bool {
    let v = |n: &str| var(s, n);
    let (Some(Op::Conv2d(a1)), Some(Op::Conv2d(a2))) = (attr(eg, v("?a1")), attr(eg, v("?a2"))) else { return false };
    let same = Conv2d { out_channels: a2.out_channels, ..a1.clone() } == a2 && a1.groups == 1;
    let merged_before = |id: Id| eg[id].nodes.iter().any(|n| n.name() == Some("cat"));
    let (w1, w2) = (v("?w1"), v("?w2"));
    eg.find(v("?c1")) < eg.find(v("?c2"))
        && same
        && is_nobias(eg, v("?b1")) == is_nobias(eg, v("?b2"))
        && !merged_before(w1)
        && !merged_before(w2)
        && keys(eg, w1).is_disjoint(&keys(eg, w2))
}

/// Builds a rule's right side: adds e-nodes through `add` (which records them), lists the e-nodes the rule
/// consumed beyond its pattern in `absorbed`, and returns the (matched class, new class) pairs to union.
pub type Builder = fn(&mut Build, Id, &Subst) -> Vec<(Id, Id)>;

pub struct Build<'a> {
    pub eg: &'a mut EGraph<Cnn, Shapes>,
    added: Vec<Cnn>,
    absorbed: Vec<Cnn>,
}

impl Build<'_> {
    fn add(&mut self, n: Cnn) -> Id {
        self.added.push(n.clone());
        self.eg.add(n)
    }
    fn attr(&mut self, op: Op) -> Id {
        self.add(Cnn::Attr(Attr(op)))
    }
}

/// relu(concat(x₁, …, xₙ)) → concat(relu(x₁), …, relu(xₙ)): lets each branch fuse its ReLU.
fn relu_into_concat(b: &mut Build, eclass: Id, s: &Subst) -> Vec<(Id, Id)> {
    let (r, c) = (var(s, "?r"), var(s, "?c"));
    let cat = b.eg[c].nodes.iter().find(|n| n.name() == Some("concat")).cloned().expect("the guard saw a concat");
    b.absorbed.push(cat.clone());
    let ids = cat.children();
    let relus: Vec<Id> = ids[1..].iter().map(|&x| b.add(Cnn::node("relu", &[r, x]))).collect();
    let root = b.add(Cnn::node("concat", &[&ids[..1], &relus[..]].concat()));
    vec![(eclass, root)]
}

/// Two convolutions of one input become one convolution with concatenated weights, whose channel slices
/// replace them (the TASO/TENSAT rule).
fn merge_parallel_convs(b: &mut Build, _: Id, s: &Subst) -> Vec<(Id, Id)> {
    let v = |n: &str| var(s, n);
    let (Some(Op::Conv2d(a1)), Some(Op::Conv2d(a2))) = (attr(b.eg, v("?a1")), attr(b.eg, v("?a2"))) else { unreachable!("the guard saw two convs") };
    let (x, w1, w2, b1, b2) = (v("?x"), v("?w1"), v("?w2"), v("?b1"), v("?b2"));
    b.absorbed.extend([Cnn::node("conv2d", &[v("?a1"), x, w1, b1]), Cnn::node("conv2d", &[v("?a2"), x, w2, b2])]);
    let a = b.attr(Op::Conv2d(Conv2d { out_channels: a1.out_channels + a2.out_channels, ..a1.clone() }));
    let w = b.add(Cnn::node("cat", &[w1, w2]));
    let bias = if is_nobias(b.eg, b1) { b1 } else { b.add(Cnn::node("cat", &[b1, b2])) };
    let m = b.add(Cnn::node("conv2d", &[a, x, w, bias]));
    let s1 = b.attr(Op::Slice { axis: Axis(1), start: 0, len: a1.out_channels });
    let s2 = b.attr(Op::Slice { axis: Axis(1), start: a1.out_channels, len: a2.out_channels });
    let (n1, n2) = (b.add(Cnn::node("slice", &[s1, m])), b.add(Cnn::node("slice", &[s2, m])));
    vec![(b.eg.find(v("?c1")), n1), (b.eg.find(v("?c2")), n2)]
}

/// The Chainer keys a parameter term reads.
fn keys(eg: &EGraph<Cnn, Shapes>, id: Id) -> BTreeSet<Symbol> {
    let mut out = BTreeSet::new();
    let mut todo = vec![id];
    while let Some(id) = todo.pop() {
        for n in &eg[id].nodes {
            match (n, n.name()) {
                (Cnn::Key(k), _) => {
                    out.insert(*k);
                }
                (_, Some("param" | "cat")) => todo.extend(n.children()),
                (_, Some("fold-w")) => todo.push(n.children()[1]),
                (_, Some("fold-b")) => todo.extend(&n.children()[1..3]),
                _ => {}
            }
        }
    }
    out
}

/// Which rules and original nodes an e-node stands for.
#[derive(Clone, Debug, Default)]
struct Origin {
    rules: Vec<&'static str>,
    nodes: BTreeSet<usize>,
}

/// Origins of e-nodes, keyed by canonical e-node. Unions make keys stale; a miss re-keys the map, at most
/// once per e-graph version, so lookups stay O(1) amortized.
#[derive(Default)]
struct Origins {
    map: HashMap<Cnn, Origin>,
    version: (usize, usize),
}

impl Origin {
    fn absorb(&mut self, o: &Origin) {
        for r in &o.rules {
            if !self.rules.contains(r) {
                self.rules.push(r);
            }
        }
        self.nodes.extend(&o.nodes);
    }
}

impl Origins {
    fn canon(eg: &EGraph<Cnn, Shapes>, n: &Cnn) -> Cnn {
        n.clone().map_children(|c| eg.find(c))
    }

    fn insert(&mut self, eg: &EGraph<Cnn, Shapes>, node: &Cnn, origin: &Origin) {
        self.map.entry(Self::canon(eg, node)).or_default().absorb(origin);
    }

    fn of(&mut self, eg: &EGraph<Cnn, Shapes>, node: &Cnn) -> Origin {
        let key = Self::canon(eg, node);
        if !self.map.contains_key(&key) {
            let version = (eg.total_number_of_nodes(), eg.number_of_classes());
            if version != self.version {
                self.version = version;
                for (k, o) in std::mem::take(&mut self.map) {
                    self.insert(eg, &k, &o);
                }
            }
        }
        self.map.get(&key).cloned().unwrap_or_default()
    }
}

/// Applies a rule's right side and records, for each e-node it adds, the rule and what the left side
/// absorbed (the e-nodes it matched, found again through the searcher's pattern).
struct Tracked {
    name: &'static str,
    guard: Guard,
    /// The left side again (egg hands appliers the searcher's pattern only when explanations are on);
    /// `None` for a multi-pattern, whose builder reports what it consumed.
    lhs: Option<Pattern<Cnn>>,
    rhs: Applied,
    origins: std::sync::Arc<std::sync::Mutex<Origins>>,
}

enum Applied {
    Pattern(Pattern<Cnn>),
    Build(Builder),
}

impl egg::Applier<Cnn, Shapes> for Tracked {
    fn apply_one(&self, eg: &mut EGraph<Cnn, Shapes>, eclass: Id, subst: &Subst, _: Option<&PatternAst<Cnn>>, _: Symbol) -> Vec<Id> {
        // egg checks its limits between iterations only, and one iteration of a multi-pattern over many
        // siblings (1,400 parallel convolutions: a million pairs) would grow the e-graph by gigabytes.
        if eg.total_size() >= NODE_LIMIT || !(self.guard)(eg, subst) {
            return vec![];
        }
        let mut origin = Origin::default();
        if let Some(lhs) = &self.lhs {
            walk(lhs, subst, |e| {
                origin.absorb(&self.origins.lock().expect("not poisoned").of(eg, &e));
                eg.lookup(e).unwrap_or(eclass)
            });
        }
        let mut build = Build { eg, added: vec![], absorbed: vec![] };
        let unions = match &self.rhs {
            Applied::Pattern(rhs) => vec![(eclass, walk(rhs, subst, |e| build.add(e)))],
            Applied::Build(f) => f(&mut build, eclass, subst),
        };
        let Build { eg, added, absorbed } = build;
        let mut origins = self.origins.lock().expect("not poisoned");
        for n in &absorbed {
            let o = origins.of(eg, n);
            origin.absorb(&o);
        }
        origin.rules.push(self.name);
        for n in &added {
            origins.insert(eg, n, &origin);
        }
        unions.into_iter().filter_map(|(a, b)| eg.union(a, b).then_some(a)).collect()
    }

    fn vars(&self) -> Vec<Var> {
        match &self.rhs {
            Applied::Pattern(p) => p.vars(),
            Applied::Build(_) => vec![],
        }
    }
}

/// Visits a pattern's e-nodes children first, each with its children's classes (`subst`'s for variables,
/// `f`'s for e-nodes); returns the root's.
fn walk(p: &Pattern<Cnn>, subst: &Subst, mut f: impl FnMut(Cnn) -> Id) -> Id {
    let mut ids: Vec<Id> = Vec::new();
    for n in p.ast.as_ref() {
        ids.push(match n {
            egg::ENodeOrVar::Var(v) => subst[*v],
            egg::ENodeOrVar::ENode(e) => f(e.clone().map_children(|i| ids[usize::from(i)])),
        });
    }
    *ids.last().expect("a pattern has a root")
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    /// 0: no rewriting; 1: every rule.
    pub level: u8,
    pub model: CostModel,
}

impl Default for Options {
    fn default() -> Self {
        Options { level: 1, model: lang::CPU }
    }
}

/// What the optimizer did.
#[derive(Clone, Debug)]
pub struct Report {
    /// (rule, times applied, nodes of the result it contributed to, their total cost change).
    pub rules: Vec<(&'static str, usize, usize, f64)>,
    pub cost_before: f64,
    pub cost_after: f64,
    pub iterations: usize,
    pub egraph_nodes: usize,
    pub stop_reason: String,
    pub time: Duration,
    pub model: CostModel,
}

/// Runner limits: generous for these graphs (AlexBN saturates in a few iterations and a few hundred
/// e-nodes), tight enough that a pathological model cannot stall the compiler.
const ITER_LIMIT: usize = 30;
const NODE_LIMIT: usize = 200_000;
const TIME_LIMIT: Duration = Duration::from_secs(2);

/// Optimizes a graph; returns the graph (unchanged at level 0) and a report.
pub fn optimize(g: &Graph, opts: &Options) -> (Graph, Report) {
    // egg times itself with quanta, whose first clock read calibrates the TSC against the OS clock for
    // up to 200 ms, and all 200 where the calibration does not settle (on a shared VM every compile
    // paid them). egg reads a mock clock instead, which a ticker keeps at std's elapsed time, so that
    // TIME_LIMIT still holds inside an iteration.
    let (clock, mock) = quanta::Clock::mock();
    let (stop, ticks) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || {
            let start = Instant::now();
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = ticks.recv_timeout(Duration::from_millis(10)) {
                mock.increment(start.elapsed().saturating_sub(Duration::from_nanos(mock.value())));
            }
        });
        let out = quanta::with_clock(&clock, || optimize_with(g, opts));
        drop(stop);
        out
    })
}

fn optimize_with(g: &Graph, opts: &Options) -> (Graph, Report) {
    let start = Instant::now();
    let cost_before: f64 = g.nodes().map(|(id, _)| node_cost(g, id, &opts.model)).sum();
    let mut report = Report {
        rules: vec![],
        cost_before,
        cost_after: cost_before,
        iterations: 0,
        egraph_nodes: 0,
        stop_reason: "not run (-O0)".into(),
        time: Duration::ZERO,
        model: opts.model,
    };
    if opts.level == 0 {
        return (g.clone(), report);
    }
    let origins = std::sync::Arc::new(std::sync::Mutex::new(Origins::default()));
    let (eg, root, classes) = to_egraph(g, &mut origins.lock().expect("not poisoned"));
    let rules: Vec<Rewrite<Cnn, Shapes>> = RULES
        .iter()
        .map(|&Rule { name, lhs, ref rhs, guard }| {
            let rhs = match rhs {
                Rhs::Pattern(p) => Applied::Pattern(p.parse().expect("rule right sides parse")),
                Rhs::Build(b) => Applied::Build(*b),
            };
            let applier = |lhs| Tracked { name, guard, lhs, rhs, origins: origins.clone() };
            if lhs.contains(" = ") {
                let multi: egg::MultiPattern<Cnn> = lhs.parse().expect("rule left sides parse");
                Rewrite::new(name, multi, applier(None)).expect("rules are well-formed")
            } else {
                let lhs: Pattern<Cnn> = lhs.parse().expect("rule left sides parse");
                Rewrite::new(name, lhs.clone(), applier(Some(lhs))).expect("rules are well-formed")
            }
        })
        .collect();
    let runner = Runner::default().with_egraph(eg).with_iter_limit(ITER_LIMIT).with_node_limit(NODE_LIMIT).with_time_limit(TIME_LIMIT).run(&rules);
    let mut fired: HashMap<&str, usize> = HashMap::new();
    for (rule, n) in runner.iterations.iter().flat_map(|it| &it.applied) {
        *fired.entry(rule_names().find(|r| *r == rule.as_str()).unwrap_or("?")).or_default() += n;
    }
    let eg = &runner.egraph;
    let extractor = egg::Extractor::new(eg, Cost { egraph: eg, model: opts.model });
    let out = from_egraph(g, eg, &extractor, eg.find(root), &classes, &mut origins.lock().expect("not poisoned"), &opts.model);
    report.cost_after = out.nodes().map(|(id, _)| node_cost(&out, id, &opts.model)).sum();
    report.rules = rule_names()
        .map(|name| {
            let used: Vec<&Provenance> = out.nodes().filter_map(|(_, n)| n.provenance.as_ref()).filter(|p| p.rules.iter().any(|r| r == name)).collect();
            (name, fired.get(name).copied().unwrap_or(0), used.len(), used.iter().map(|p| p.cost_after - p.cost_before).sum())
        })
        .collect();
    report.iterations = runner.iterations.len();
    report.egraph_nodes = eg.total_number_of_nodes();
    report.stop_reason = format!("{:?}", runner.stop_reason.as_ref().expect("the runner stopped")).to_lowercase();
    report.time = start.elapsed();
    (out, report)
}

impl Report {
    /// What to tell the user when the optimizer stopped at one of its limits before trying every rewrite
    /// (no model in `models/` comes near them). The graph it returns is still correct, only perhaps less
    /// fused, so this is a warning, not an error.
    pub fn warning(&self) -> Option<String> {
        let limit = match &self.stop_reason[..] {
            "saturated" | "not run (-O0)" => return None,
            r if r.starts_with("iteration") => format!("{ITER_LIMIT} iterations"),
            r if r.starts_with("node") => format!("{NODE_LIMIT} e-nodes"),
            r if r.starts_with("time") => format!("{} s", TIME_LIMIT.as_secs_f64()),
            r => r.to_string(),
        };
        Some(format!("the optimizer stopped at its limit of {limit} before trying every rewrite; the model runs correctly but may be less fused (-O0 skips the optimizer)"))
    }
}

/// Every rule's name, in table order.
pub fn rule_names() -> impl Iterator<Item = &'static str> {
    RULES.iter().map(|r| r.name)
}

fn node_cost(g: &Graph, id: NodeId, model: &CostModel) -> f64 {
    match &g.node(id).kind {
        Kind::Op(op) => model.kernel(op, &g.arg_shapes(id)),
        Kind::Input(_) => 0.0,
    }
}

/// Adds every node of the graph to a fresh e-graph; returns it, the output's e-class and each node's class.
fn to_egraph(g: &Graph, origins: &mut Origins) -> (EGraph<Cnn, Shapes>, Id, Vec<Id>) {
    let inputs = g.nodes().filter(|(_, n)| matches!(n.kind, Kind::Input(_))).map(|(_, n)| (Symbol::from(&n.layer), n.shape.clone())).collect();
    let params = g.params().iter().map(|p| (Symbol::from(&p.key), p.shape.clone())).collect();
    let mut eg = EGraph::new(Shapes { inputs, params });
    let mut classes: Vec<Id> = Vec::new();
    for (id, n) in g.nodes() {
        let node = match &n.kind {
            Kind::Input(_) => Cnn::node("input", &[eg.add(Cnn::Key(Symbol::from(&n.layer)))]),
            Kind::Op(op) => {
                let args: Vec<Id> = g.args(id).iter().map(|a| classes[a.0.index()]).collect();
                let params: Vec<Id> = n.params.iter().map(|p| param_term(&mut eg, p)).collect();
                op_node(&mut eg, op, &args, &params)
            }
        };
        let class = eg.add(node.clone());
        origins.insert(&eg, &node, &Origin { rules: vec![], nodes: [id.0.index()].into() });
        classes.push(class);
    }
    eg.rebuild();
    let root = classes[g.output.0.index()];
    (eg, root, classes)
}

/// A parameter as an e-graph term; the inverse of [`param_of`], so an optimized graph optimizes again.
fn param_term(eg: &mut EGraph<Cnn, Shapes>, p: &Param) -> Id {
    let key = |eg: &mut EGraph<Cnn, Shapes>, k: &str| {
        let k = eg.add(Cnn::Key(Symbol::from(k)));
        eg.add(Cnn::node("param", &[k]))
    };
    // The folded BatchNormalization's attributes: its channels are its γ's length.
    let bn = |eg: &mut EGraph<Cnn, Shapes>, bn: &str, eps_bits: u64| {
        let channels = eg.analysis.params.get(&Symbol::from(format!("{bn}/gamma"))).map_or(0, |d| d[0]);
        eg.add(Cnn::Attr(Attr(Op::BatchNorm(BatchNorm { channels, eps: F64(f64::from_bits(eps_bits)) }))))
    };
    match p {
        Param::Key(k) => key(eg, k),
        Param::FoldW { w, bn: name, eps_bits } => {
            let (a, w) = (bn(eg, name, *eps_bits), param_term(eg, w));
            let (g, v) = (key(eg, &format!("{name}/gamma")), key(eg, &format!("{name}/avg_var")));
            eg.add(Cnn::node("fold-w", &[a, w, g, v]))
        }
        Param::FoldB { b, bn: name, eps_bits } => {
            let a = bn(eg, name, *eps_bits);
            let b = match b {
                Some(b) => param_term(eg, b),
                None => eg.add(Cnn::node("nobias", &[])),
            };
            let [g, be, m, v] = ["gamma", "beta", "avg_mean", "avg_var"].map(|s| key(eg, &format!("{name}/{s}")));
            eg.add(Cnn::node("fold-b", &[a, b, g, be, m, v]))
        }
        Param::Cat(parts) => {
            let ids: Vec<Id> = parts.iter().map(|q| param_term(eg, q)).collect();
            ids.into_iter().reduce(|a, b| eg.add(Cnn::node("cat", &[a, b]))).expect("a concatenation has parts")
        }
    }
}

/// The e-node of an op (the inverse of [`op_of`]): attributes, activations, parameters, and a `nobias`
/// leaf for a layer without bias.
fn op_node(eg: &mut EGraph<Cnn, Shapes>, op: &Op, args: &[Id], params: &[Id]) -> Cnn {
    let attrs = if let Op::Fused(f) = op { [Some(f.base_op()), f.pool.clone().map(Op::MaxPool2d)] } else { [Some(op.clone()), None] };
    let mut children: Vec<Id> = attrs.into_iter().flatten().map(|a| eg.add(Cnn::Attr(Attr(a)))).collect();
    children.extend(args.iter().chain(params));
    if op.clone().bias_mut().is_some_and(|b| !*b) {
        children.push(eg.add(Cnn::node("nobias", &[])));
    }
    Cnn::node(op.name(), &children)
}

/// Builds the extracted graph: each chosen e-node once (sharing kept), children first.
fn from_egraph(
    g: &Graph,
    eg: &EGraph<Cnn, Shapes>,
    ex: &egg::Extractor<Cost, Cnn, Shapes>,
    root: Id,
    classes: &[Id],
    origins: &mut Origins,
    model: &CostModel,
) -> Graph {
    let mut out = Out { g: DiGraph::new(), done: HashMap::new(), classes };
    // Inputs first, in their original order, even if unused.
    let mut inputs = Vec::new();
    for &i in &g.inputs {
        let idx = out.g.add_node(g.node(i).clone());
        out.done.insert(eg.find(classes[i.0.index()]), idx);
        inputs.push(NodeId(idx));
    }
    // Post-order over the chosen e-nodes without recursion (a model may be thousands of layers deep).
    let mut order = Vec::new();
    let mut stack = vec![(eg.find(root), false)];
    let mut seen: std::collections::HashSet<Id> = out.done.keys().copied().collect();
    while let Some((class, expanded)) = stack.pop() {
        if expanded {
            order.push(class);
            continue;
        }
        if !seen.insert(class) {
            continue;
        }
        stack.push((class, true));
        let (_, ins, _) = op_of(eg, ex.find_best_node(class)).expect("a tensor e-class extracts to a tensor op");
        stack.extend(ins.iter().rev().map(|&i| (eg.find(i), false)));
    }
    for class in order {
        emit(g, eg, ex, class, origins, model, &mut out);
    }
    let output = out.done[&eg.find(root)];
    Graph { name: g.name.clone(), g: out.g, inputs, output: NodeId(output), param_specs: g.param_specs.clone() }
}

struct Out<'a> {
    g: DiGraph<Node, u32>,
    done: HashMap<Id, NodeIndex>,
    /// The e-class of each original node.
    classes: &'a [Id],
}

/// Emits the chosen e-node of `class`; its inputs were emitted before it.
fn emit(
    g: &Graph,
    eg: &EGraph<Cnn, Shapes>,
    ex: &egg::Extractor<Cost, Cnn, Shapes>,
    class: Id,
    origins: &mut Origins,
    model: &CostModel,
    out: &mut Out,
) -> NodeIndex {
    let class = eg.find(class);
    if let Some(&n) = out.done.get(&class) {
        return n;
    }
    let node = ex.find_best_node(class).clone().map_children(|c| eg.find(c));
    let (op, ins, params) = op_of(eg, &node).expect("a tensor e-class extracts to a tensor op");
    let args: Vec<NodeIndex> = ins.iter().map(|&i| out.done[&eg.find(i)]).collect();
    let mut origin = origins.of(eg, &node);
    if origin.nodes.is_empty() {
        // Every e-node is recorded when added; should one not be, name it after an original node of its class.
        origin.nodes.extend(out.classes.iter().position(|&c| eg.find(c) == class));
    }
    let first = origin.nodes.iter().next().map_or(g.node(g.output), |&i| g.node(NodeId(NodeIndex::new(i))));
    let mut layers: Vec<&str> = Vec::new();
    for &i in &origin.nodes {
        let l = g.node(NodeId(NodeIndex::new(i))).layer.as_str();
        if !layers.contains(&l) {
            layers.push(l);
        }
    }
    let shapes: Vec<&[usize]> = args.iter().map(|a| out.g[*a].shape.as_slice()).collect();
    let shape: Dims = op.output_shape(&shapes).expect("extracted graphs are well-shaped");
    let provenance = (!origin.rules.is_empty()).then(|| Provenance {
        rules: origin.rules.iter().map(|r| r.to_string()).collect(),
        cost_before: origin.nodes.iter().map(|&i| node_cost(g, NodeId(NodeIndex::new(i)), model)).sum(),
        cost_after: model.kernel(&op, &shapes),
    });
    let decl = origin.nodes.iter().find_map(|&i| g.node(NodeId(NodeIndex::new(i))).decl);
    let params = params.iter().map(|&p| param_of(eg, ex, p)).collect();
    let n = out.g.add_node(Node { kind: Kind::Op(op), shape, span: first.span, layer: layers.join("+"), params, decl, provenance });
    for (slot, a) in args.into_iter().enumerate() {
        out.g.add_edge(a, n, slot as u32);
    }
    out.done.insert(class, n);
    n
}

/// The parameter term an e-class extracts to.
fn param_of(eg: &EGraph<Cnn, Shapes>, ex: &egg::Extractor<Cost, Cnn, Shapes>, class: Id) -> Param {
    let key = |id: Id| eg[id].nodes.iter().find_map(|n| if let Cnn::Key(s) = n { Some(s.to_string()) } else { None }).expect("key leaf");
    // `bn1/gamma` names BatchNormalization `bn1`; its eps comes from the attribute leaf.
    let bn = |a: Id, gamma: Id| {
        let Some(Op::BatchNorm(b)) = attr(eg, a) else { unreachable!("a fold reads a BatchNormalization") };
        let gamma = param_of(eg, ex, gamma).to_string();
        (gamma.strip_suffix("/gamma").unwrap_or(&gamma).to_string(), b.eps.0.to_bits())
    };
    let node = ex.find_best_node(class);
    match (node.name(), node.children()) {
        (Some("param"), [k]) => Param::Key(key(*k)),
        (Some("fold-w"), [a, w, g, _]) => {
            let (bn, eps_bits) = bn(*a, *g);
            Param::FoldW { w: Box::new(param_of(eg, ex, *w)), bn, eps_bits }
        }
        (Some("fold-b"), [a, b, g, ..]) => {
            let (bn, eps_bits) = bn(*a, *g);
            let b = (!is_nobias(eg, *b)).then(|| Box::new(param_of(eg, ex, *b)));
            Param::FoldB { b, bn, eps_bits }
        }
        (Some("cat"), [a, b]) => Param::Cat(vec![param_of(eg, ex, *a), param_of(eg, ex, *b)]),
        _ => unreachable!("not a parameter term: {node:?}"),
    }
}

/// `cnnc compile --explain`: the rules fired and what they changed.
pub fn explain(r: &Report) -> String {
    let mut s = format!("{:<24} {:>7} {:>10} {:>14}\n", "rule", "fired", "in result", "cost change");
    for (rule, fired, used, change) in &r.rules {
        s += &format!("{rule:<24} {fired:>7} {used:>10} {:>14}\n", if *used == 0 { "-".into() } else { format!("{change:+.0}") });
    }
    let pct = if r.cost_before > 0.0 { 100.0 * (r.cost_after - r.cost_before) / r.cost_before } else { 0.0 };
    s += &format!("estimated cost ({} model, ns per sample): {:.0} -> {:.0} ({pct:+.1}%)\n", r.model.name, r.cost_before, r.cost_after);
    let ms = r.time.as_secs_f64() * 1e3;
    s + &format!("e-graph: {} iterations, {} e-nodes, stopped: {}; optimizer time {ms:.1} ms\n", r.iterations, r.egraph_nodes, r.stop_reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_parses() {
        for Rule { name, lhs, rhs, .. } in RULES {
            if !lhs.contains(" = ") {
                lhs.parse::<Pattern<Cnn>>().unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            if let Rhs::Pattern(rhs) = rhs {
                rhs.parse::<Pattern<Cnn>>().unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }
}
