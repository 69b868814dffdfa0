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
use cnnc_runtime::op::{Dims, Pool2d};
use cnnc_runtime::Op;
use egg::{EGraph, Id, Language, Pattern, PatternAst, Rewrite, Runner, Subst, Symbol, Var};
use lang::{op_of, Attr, Cnn, Cost, CostModel, Shapes};
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// The rewrite rules: (name, left side, right side). `docs/rewrites.md` justifies each one.
pub const RULES: &[(&str, &str, &str)] = &[
    ("drop-dropout", "(dropout ?r ?x)", "?x"),
    ("fold-bn-into-conv", "(bn ?n (conv ?a ?x ?w ?b) ?g ?be ?m ?v)", "(conv ?a ?x (fold-w ?n ?w ?g ?v) (fold-b ?n ?b ?g ?be ?m ?v))"),
    ("fold-bn-into-linear", "(bn ?n (linear ?a ?x ?w ?b) ?g ?be ?m ?v)", "(linear ?a ?x (fold-w ?n ?w ?g ?v) (fold-b ?n ?b ?g ?be ?m ?v))"),
    ("fuse-conv-relu", "(relu (conv ?a ?x ?w ?b))", "(conv-relu ?a ?x ?w ?b)"),
    ("fuse-conv-relu-maxpool", "(maxpool ?p (conv-relu ?a ?x ?w ?b))", "(conv-relu-maxpool ?a ?p ?x ?w ?b)"),
    ("fuse-linear-relu", "(relu (linear ?a ?x ?w ?b))", "(linear-relu ?a ?x ?w ?b)"),
    ("relu-before-maxpool", "(relu (maxpool ?p ?x))", "(maxpool ?p (relu ?x))"),
    ("relu-idempotent", "(relu (relu ?x))", "(relu ?x)"),
    ("drop-identity-reshape", "(reshape ?r ?x)", "?x"),
];

/// Rules whose right side is computed (derived attributes, any number of inputs): (name, left side,
/// builder). A multi-pattern (`?a = ..., ?b = ...`) matches several e-classes at once.
pub const BUILT_RULES: &[(&str, &str, Builder)] = &[
    ("relu-into-concat", "(relu ?c)", relu_into_concat),
    ("merge-parallel-convs", "?c1 = (conv ?a1 ?x ?w1 ?b1), ?c2 = (conv ?a2 ?x ?w2 ?b2)", merge_parallel_convs),
];

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
    fn var(s: &Subst, v: &str) -> Id {
        s[v.parse::<Var>().expect("a pattern variable")]
    }
}

/// relu(concat(x₁, …, xₙ)) → concat(relu(x₁), …, relu(xₙ)): lets each branch fuse its ReLU.
fn relu_into_concat(b: &mut Build, eclass: Id, s: &Subst) -> Vec<(Id, Id)> {
    let c = Build::var(s, "?c");
    let Some(Cnn::Concat(ids)) = b.eg[c].nodes.iter().find(|n| matches!(n, Cnn::Concat(_))).cloned() else { return vec![] };
    b.absorbed.push(Cnn::Concat(ids.clone()));
    let relus: Vec<Id> = ids[1..].iter().map(|&x| b.add(Cnn::Relu(x))).collect();
    let root = b.add(Cnn::Concat([&ids[..1], &relus[..]].concat().into()));
    vec![(eclass, root)]
}

/// Two convolutions of one input with the same window, stride, padding and bias-ness become one
/// convolution with concatenated weights, whose channel slices replace them (the TASO/TENSAT rule).
fn merge_parallel_convs(b: &mut Build, _: Id, s: &Subst) -> Vec<(Id, Id)> {
    let v = |n: &str| Build::var(s, n);
    let (c1, c2) = (b.eg.find(v("?c1")), b.eg.find(v("?c2")));
    let (Op::Conv2d(a1), Op::Conv2d(a2)) = (attr(b.eg, v("?a1")), attr(b.eg, v("?a2"))) else { return vec![] };
    let nobias = |eg: &EGraph<Cnn, Shapes>, id: Id| eg[id].nodes.iter().any(|n| matches!(n, Cnn::NoBias));
    let same = a1.kernel == a2.kernel && a1.stride == a2.stride && a1.pad == a2.pad && a1.groups == 1 && a2.groups == 1 && a1.bias == a2.bias;
    // Each unordered pair of original convolutions once: merging merges again would grow the e-graph by
    // every order of every subset (GoogLeNetBN's inception modules took 0.5 s that way).
    let (w1, w2) = (v("?w1"), v("?w2"));
    let merged_before = |id: Id| b.eg[id].nodes.iter().any(|n| matches!(n, Cnn::Cat(_)));
    if c1 >= c2
        || !same
        || nobias(b.eg, v("?b1")) != nobias(b.eg, v("?b2"))
        || merged_before(w1)
        || merged_before(w2)
        || !keys(b.eg, w1).is_disjoint(&keys(b.eg, w2))
    {
        return vec![];
    }
    let (x, b1, b2) = (v("?x"), v("?b1"), v("?b2"));
    b.absorbed.extend([Cnn::Conv([v("?a1"), x, w1, b1]), Cnn::Conv([v("?a2"), x, w2, b2])]);
    let merged = cnnc_runtime::op::Conv2d { out_channels: a1.out_channels + a2.out_channels, ..a1.clone() };
    let a = b.add(Cnn::Attr(Attr::new(Op::Conv2d(merged))));
    let w = b.add(Cnn::Cat([w1, w2]));
    let bias = if nobias(b.eg, b1) { b1 } else { b.add(Cnn::Cat([b1, b2])) };
    let m = b.add(Cnn::Conv([a, x, w, bias]));
    let axis = cnnc_runtime::op::Axis(1);
    let s1 = b.add(Cnn::Attr(Attr::new(Op::Slice { axis, start: 0, len: a1.out_channels })));
    let s2 = b.add(Cnn::Attr(Attr::new(Op::Slice { axis, start: a1.out_channels, len: a2.out_channels })));
    let (n1, n2) = (b.add(Cnn::Slice([s1, m])), b.add(Cnn::Slice([s2, m])));
    vec![(c1, n1), (c2, n2)]
}

/// The Chainer keys a parameter term reads.
fn keys(eg: &EGraph<Cnn, Shapes>, id: Id) -> BTreeSet<Symbol> {
    let mut out = BTreeSet::new();
    let mut todo = vec![id];
    while let Some(id) = todo.pop() {
        for n in &eg[id].nodes {
            match n {
                Cnn::Key(k) => {
                    out.insert(*k);
                }
                Cnn::FoldW([_, w, ..]) => todo.push(*w),
                Cnn::FoldB([_, b, g, ..]) => todo.extend([*b, *g]),
                Cnn::Param(k) => todo.push(*k),
                Cnn::Cat([a, b]) => todo.extend([*a, *b]),
                _ => {}
            }
        }
    }
    out
}

/// Extra conditions, by rule name: a rule fires only where its condition holds.
fn condition(rule: &str, eg: &EGraph<Cnn, Shapes>, s: &Subst) -> bool {
    let var = |v: &str| s[v.parse::<Var>().expect("a pattern variable")];
    match rule {
        // relu(max(window)) = max(relu(window)) when every window holds at least one input element, else
        // it is −∞ (all padding) on one side and 0 on the other. The first window needs pad < kernel; the
        // last, under cover_all, needs pad + stride <= kernel (its start is at most H + pad − kernel + stride − 1).
        "relu-before-maxpool" => match attr(eg, var("?p")) {
            Op::MaxPool2d(p) => (0..2).all(|i| p.pad[i] < p.kernel[i] && (!p.cover_all || p.pad[i] + p.stride[i] <= p.kernel[i])),
            _ => false,
        },
        // Only a reshape to the shape it already has is an identity.
        "drop-identity-reshape" => match attr(eg, var("?r")) {
            Op::Reshape { dims } => eg[var("?x")].data.as_ref() == Some(&dims),
            _ => false,
        },
        _ => true,
    }
}

fn attr(eg: &EGraph<Cnn, Shapes>, id: Id) -> Op {
    eg[id].nodes.iter().find_map(|n| if let Cnn::Attr(a) = n { Some(a.op.clone()) } else { None }).expect("attribute leaf")
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
    /// The left side again (egg hands appliers the searcher's pattern only when explanations are on);
    /// `None` for a multi-pattern, whose builder reports what it consumed.
    lhs: Option<Pattern<Cnn>>,
    rhs: Rhs,
    origins: std::sync::Arc<std::sync::Mutex<Origins>>,
}

enum Rhs {
    Pattern(Pattern<Cnn>),
    Build(Builder),
}

impl egg::Applier<Cnn, Shapes> for Tracked {
    fn apply_one(&self, eg: &mut EGraph<Cnn, Shapes>, eclass: Id, subst: &Subst, _: Option<&PatternAst<Cnn>>, _: Symbol) -> Vec<Id> {
        if !condition(self.name, eg, subst) {
            return vec![];
        }
        let mut origin = Origin::default();
        if let Some(lhs) = &self.lhs {
            let mut ids: Vec<Id> = Vec::new();
            for n in lhs.ast.as_ref() {
                let id = match n {
                    egg::ENodeOrVar::Var(v) => subst[*v],
                    egg::ENodeOrVar::ENode(e) => {
                        let e = e.clone().map_children(|i| ids[usize::from(i)]);
                        origin.absorb(&self.origins.lock().expect("not poisoned").of(eg, &e));
                        eg.lookup(e).unwrap_or(eclass)
                    }
                };
                ids.push(id);
            }
        }
        let mut build = Build { eg, added: vec![], absorbed: vec![] };
        let unions = match &self.rhs {
            Rhs::Pattern(rhs) => {
                let mut ids: Vec<Id> = Vec::new();
                for n in rhs.ast.as_ref() {
                    ids.push(match n {
                        egg::ENodeOrVar::Var(v) => subst[*v],
                        egg::ENodeOrVar::ENode(e) => build.add(e.clone().map_children(|i| ids[usize::from(i)])),
                    });
                }
                vec![(eclass, *ids.last().expect("a right side has a root"))]
            }
            Rhs::Build(f) => f(&mut build, eclass, subst),
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
            Rhs::Pattern(p) => p.vars(),
            Rhs::Build(_) => vec![],
        }
    }
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
    let mut rules: Vec<Rewrite<Cnn, Shapes>> = RULES
        .iter()
        .map(|(name, lhs, rhs)| {
            let lhs: Pattern<Cnn> = lhs.parse().expect("rule left sides parse");
            let applier = Tracked { name, lhs: Some(lhs.clone()), rhs: Rhs::Pattern(rhs.parse().expect("rule right sides parse")), origins: origins.clone() };
            Rewrite::new(*name, lhs, applier).expect("rules are well-formed")
        })
        .collect();
    for (name, lhs, build) in BUILT_RULES {
        let applier = |lhs| Tracked { name, lhs, rhs: Rhs::Build(*build), origins: origins.clone() };
        rules.push(if lhs.contains(" = ") {
            let multi: egg::MultiPattern<Cnn> = lhs.parse().expect("rule left sides parse");
            Rewrite::new(*name, multi, applier(None)).expect("rules are well-formed")
        } else {
            let lhs: Pattern<Cnn> = lhs.parse().expect("rule left sides parse");
            Rewrite::new(*name, lhs.clone(), applier(Some(lhs))).expect("rules are well-formed")
        });
    }
    let runner = Runner::default().with_egraph(eg).with_iter_limit(ITER_LIMIT).with_node_limit(NODE_LIMIT).with_time_limit(TIME_LIMIT).run(&rules);
    let mut fired: HashMap<&str, usize> = HashMap::new();
    for it in &runner.iterations {
        for (rule, n) in &it.applied {
            *fired.entry(rule_names().find(|r| *r == rule.as_str()).unwrap_or("?")).or_default() += n;
        }
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

/// Every rule's name, pattern rules first.
pub fn rule_names() -> impl Iterator<Item = &'static str> {
    RULES.iter().map(|r| r.0).chain(BUILT_RULES.iter().map(|r| r.0))
}

fn node_cost(g: &Graph, id: NodeId, model: &CostModel) -> f64 {
    match &g.node(id).kind {
        Kind::Op(op) => model.kernel(op, &g.arg_shapes(id)),
        Kind::Input(_) => 0.0,
    }
}

/// Adds every node of the graph to a fresh e-graph; returns it, the output's e-class and each node's class.
fn to_egraph(g: &Graph, origins: &mut Origins) -> (EGraph<Cnn, Shapes>, Id, Vec<Id>) {
    let mut shapes = Shapes::default();
    for (_, n) in g.nodes() {
        if let Kind::Input(_) = n.kind {
            shapes.inputs.insert(Symbol::from(&n.layer), n.shape.clone());
        }
    }
    for p in g.params() {
        shapes.params.insert(Symbol::from(&p.key), p.shape.clone());
    }
    let mut eg = EGraph::new(shapes);
    let mut classes: Vec<Id> = Vec::new();
    for (id, n) in g.nodes() {
        let node = match &n.kind {
            Kind::Input(_) => Cnn::Input(eg.add(Cnn::Key(Symbol::from(&n.layer)))),
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
        eg.add(Cnn::Param(k))
    };
    // The folded BatchNormalization's attributes: its channels are its γ's length.
    let bn = |eg: &mut EGraph<Cnn, Shapes>, bn: &str, eps_bits: u64| {
        let channels = eg.analysis.params.get(&Symbol::from(format!("{bn}/gamma"))).map_or(0, |d| d[0]);
        eg.add(Cnn::Attr(Attr::new(Op::BatchNorm(cnnc_runtime::op::BatchNorm { channels, eps: f64::from_bits(eps_bits) }))))
    };
    match p {
        Param::Key(k) => key(eg, k),
        Param::FoldW { w, bn: name, eps_bits } => {
            let (a, w) = (bn(eg, name, *eps_bits), param_term(eg, w));
            let (g, v) = (key(eg, &format!("{name}/gamma")), key(eg, &format!("{name}/avg_var")));
            eg.add(Cnn::FoldW([a, w, g, v]))
        }
        Param::FoldB { b, bn: name, eps_bits } => {
            let a = bn(eg, name, *eps_bits);
            let b = match b {
                Some(b) => param_term(eg, b),
                None => eg.add(Cnn::NoBias),
            };
            let [g, be, m, v] = ["gamma", "beta", "avg_mean", "avg_var"].map(|s| key(eg, &format!("{name}/{s}")));
            eg.add(Cnn::FoldB([a, b, g, be, m, v]))
        }
        Param::Cat(parts) => {
            let ids: Vec<Id> = parts.iter().map(|q| param_term(eg, q)).collect();
            ids.into_iter().reduce(|a, b| eg.add(Cnn::Cat([a, b]))).expect("a concatenation has parts")
        }
    }
}

fn op_node(eg: &mut EGraph<Cnn, Shapes>, op: &Op, args: &[Id], params: &[Id]) -> Cnn {
    let a = eg.add(Cnn::Attr(Attr::new(op.clone())));
    let bias = |eg: &mut EGraph<Cnn, Shapes>| params.get(1).copied().unwrap_or_else(|| eg.add(Cnn::NoBias));
    let x = args.first().copied().unwrap_or(a);
    match op {
        Op::Conv2d(_) => Cnn::Conv([a, x, params[0], bias(eg)]),
        Op::Linear(_) => Cnn::Linear([a, x, params[0], bias(eg)]),
        Op::BatchNorm(_) => Cnn::Bn([a, x, params[0], params[1], params[2], params[3]]),
        Op::Relu => Cnn::Relu(x),
        Op::Add => Cnn::Add([args[0], args[1]]),
        Op::MaxPool2d(_) => Cnn::MaxPool([a, x]),
        Op::AvgPool2d(_) => Cnn::AvgPool([a, x]),
        Op::Lrn(_) => Cnn::Lrn([a, x]),
        Op::Dropout { .. } => Cnn::Dropout([a, x]),
        Op::Softmax { .. } => Cnn::Softmax([a, x]),
        Op::Reshape { .. } => Cnn::Reshape([a, x]),
        Op::Slice { .. } => Cnn::Slice([a, x]),
        Op::Concat { .. } => Cnn::Concat([&[a][..], args].concat().into()),
        Op::Fused(f) => {
            let base = eg.add(Cnn::Attr(Attr::new(f.base_op())));
            match &f.pool {
                Some(p) => {
                    let p = eg.add(Cnn::Attr(Attr::new(Op::MaxPool2d(Pool2d::clone(p)))));
                    Cnn::ConvReluMaxPool([base, p, x, params[0], bias(eg)])
                }
                None if matches!(f.base, cnnc_runtime::op::FusedBase::Conv(_)) => Cnn::ConvRelu([base, x, params[0], bias(eg)]),
                None => Cnn::LinearRelu([base, x, params[0], bias(eg)]),
            }
        }
    }
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
        let eps = match attr(eg, a) {
            Op::BatchNorm(b) => b.eps,
            other => unreachable!("fold over {other}"),
        };
        let gamma = param_of(eg, ex, gamma).to_string();
        (gamma.strip_suffix("/gamma").unwrap_or(&gamma).to_string(), eps.to_bits())
    };
    match ex.find_best_node(class) {
        Cnn::Param(k) => Param::Key(key(*k)),
        Cnn::FoldW([a, w, g, _]) => {
            let (bn, eps_bits) = bn(*a, *g);
            Param::FoldW { w: Box::new(param_of(eg, ex, *w)), bn, eps_bits }
        }
        Cnn::FoldB([a, b, g, ..]) => {
            let (bn, eps_bits) = bn(*a, *g);
            let b = (!eg[*b].nodes.iter().any(|n| matches!(n, Cnn::NoBias))).then(|| Box::new(param_of(eg, ex, *b)));
            Param::FoldB { b, bn, eps_bits }
        }
        Cnn::Cat([a, b]) => Param::Cat(vec![param_of(eg, ex, *a), param_of(eg, ex, *b)]),
        other => unreachable!("not a parameter term: {other:?}"),
    }
}

/// `cnnc compile --explain`: the rules fired and what they changed.
pub fn explain(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = format!("{:<24} {:>7} {:>10} {:>14}\n", "rule", "fired", "in result", "cost change");
    for (rule, fired, used, change) in &r.rules {
        writeln!(s, "{rule:<24} {fired:>7} {used:>10} {:>14}", if *used == 0 { "-".into() } else { format!("{change:+.0}") }).expect("write to String");
    }
    let pct = if r.cost_before > 0.0 { 100.0 * (r.cost_after - r.cost_before) / r.cost_before } else { 0.0 };
    writeln!(s, "estimated cost ({} model, ns per sample): {:.0} -> {:.0} ({pct:+.1}%)", r.model.name, r.cost_before, r.cost_after).expect("write to String");
    writeln!(
        s,
        "e-graph: {} iterations, {} e-nodes, stopped: {}; optimizer time {:.1} ms",
        r.iterations,
        r.egraph_nodes,
        r.stop_reason,
        r.time.as_secs_f64() * 1e3
    )
    .expect("write to String");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_print_and_parse_back() {
        for text in [
            "conv2d[96 <- 3, k=11x11, s=4x4, p=0x0]",
            "conv2d[6 <- 4, k=3x3, s=1x1, p=1x1, groups=2, nobias]",
            "linear[1000 <- 4096]",
            "batch_norm[96, eps=2e-5]",
            "max_pool2d[k=3x3, s=2x2, p=0x0, cover_all]",
            "avg_pool2d[k=7x7, s=1x1, p=0x0]",
            "lrn[n=5, k=2, alpha=1e-4, beta=0.75]",
            "dropout[ratio=0.5]",
            "softmax[axis=1]",
            "reshape[N, 256, 6, 6]",
            "concat[axis=1]",
            "slice[axis=1, 64..160]",
            "relu",
            "add",
            "conv2d+relu[96 <- 3, k=11x11, s=4x4, p=0x0]",
            "conv2d+relu+max_pool2d[96 <- 3, k=11x11, s=4x4, p=0x0; k=3x3, s=2x2, p=0x0, cover_all]",
            "linear+relu[4096 <- 9216]",
        ] {
            let a: Attr = text.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(a.to_string(), text);
        }
        assert!("conv2d[96 <- 3]".parse::<Attr>().is_err());
    }

    #[test]
    fn every_rule_parses() {
        for (name, lhs, rhs) in RULES {
            lhs.parse::<Pattern<Cnn>>().unwrap_or_else(|e| panic!("{name}: {e}"));
            rhs.parse::<Pattern<Cnn>>().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert_eq!(rule_names().count(), RULES.len() + BUILT_RULES.len());
    }
}
