//! Criterion benchmarks of single JIT-compiled layers, shaped like AlexBN's, for each GEMM tier:
//! `cargo bench -p cnnc --bench kernels`. Whole-model latency against ONNX Runtime is `cnnc bench`
//! and `bench/compare_ort.py` (see docs/benchmarks.md).

use cnnc::diag::Source;
use cnnc::kernel::Tier;
use cnnc_runtime::{rng, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// One layer as a model: (name, links, body, input shape).
const LAYERS: [(&str, &str, &str, [usize; 3]); 3] = [
    ("conv2+relu+pool", "    l = L.Convolution2D(96, 256, 5, pad=2)", "F.max_pooling_2d(F.relu(self.l(x)), 3, stride=2)", [96, 27, 27]),
    ("conv4+relu", "    l = L.Convolution2D(384, 384, 3, pad=1)", "F.relu(self.l(x))", [384, 13, 13]),
    ("fc7+relu", "    l = L.Linear(4096, 4096)", "F.relu(self.l(x))", [4096, 1, 1]),
];

fn layers(c: &mut Criterion) {
    let mut group = c.benchmark_group("alexbn-layers");
    group.sample_size(20);
    for (name, link, body, [ch, h, w]) in LAYERS {
        let text = format!("model Layer {{\n{link}\n    forward(x: [{ch}, {h}, {w}]) {{\n        return {body}\n    }}\n}}\n");
        let src = Source::new(name, text);
        let (g, _) = cnnc::compile(&src).expect("valid layer");
        let (g, _) = cnnc::opt::optimize(&g, &Default::default());
        group.throughput(Throughput::Elements(2 * g.macs()));
        let x = Tensor::new(vec![1, ch, h, w], rng::normal("x", ch * h * w).map(|v| v as f32).collect()).expect("sized");
        let mut tiers = vec![Tier::Portable];
        if Tier::best() != Tier::Portable {
            tiers.push(Tier::best());
        }
        for tier in tiers {
            let bound =
                cnnc::weights::Bound { params: g.params().into_iter().map(|s| (s.clone(), Tensor::full(s.shape.clone(), 0.01))).collect(), notes: vec![] };
            let jit = cnnc::jit::compile(&cnnc::kernel::program(&g, bound, 1, tier), Default::default()).expect("compiles");
            for threads in [1, 2] {
                group.bench_function(format!("{name}/{tier:?}/{threads}t"), |b| b.iter(|| jit.exe.run(&[&x], threads).expect("runs")));
            }
        }
    }
    group.finish();
}

criterion_group!(benches, layers);
criterion_main!(benches);
