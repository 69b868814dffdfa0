#!/usr/bin/env python3
"""Latency of cnnc against ONNX Runtime on Chainer's AlexBN, or on any ONNX files: same model, same weights, one run.

    python3 bench/compare_ort.py [--cnnc PATH] [--batch 1 8] [--threads 1 2] [--runs 30] [--rounds 5]
                                 [--work DIR] [--layers] [--onnx FILE.onnx ...]

With --onnx, both sides read the same files (cnnc imports each on the fly): per file and batch a gate
(cnnc run against ORT on one seeded input, limit 1e-4 relative), then the alternating rounds of step 3
below, one table row per (file, batch, threads). Otherwise, on AlexBN:

1. Writes deterministic weights (numpy default_rng(0)) as a Chainer-style npz with the keys cnnc
   reads (conv1/W, conv1/b, bn1/gamma, bn1/beta, bn1/avg_mean, bn1/avg_var, ..., fc8/b) and the
   equivalent ONNX graph built with onnx.helper, both cached in --work (about 250 MB each).
2. Correctness gate, per batch size: `cnnc run models/alexbn.model --weights W --input x.npy
   --output y.npy` against ORT on the same seeded N(0,1) input; exits 1 if max|diff| / max|ORT| > 1e-4.
3. For each (batch, threads), --rounds times: `cnnc bench ... --json` (cnnc times itself), then ORT
   in-process (intra_op_num_threads=T, inter_op 1, sequential, all graph optimizations; 5 warm-up
   runs), --runs runs each. Prints a markdown table with the median over rounds of each side's median
   latency, the min latencies, and the ratio cnnc/ORT as the median over rounds of the round's ratio:
   on a shared machine, whose speed drifts over seconds, each round's two measurements see about the
   same neighbours, so the paired ratio is steadier than one long block per side.
4. With --layers, per (batch, threads) also a per-layer table: `cnnc bench --profile --json` (its
   kernels grouped by layer) beside ORT's own profiler (SessionOptions.enable_profiling, its node
   events per run assigned to layers in order), as ms, GFLOP/s (GB/s of weights for the linear
   layers) and % of the FMA peak.

The ONNX graph follows Chainer's semantics: BatchNormalization eps 2e-5, max pooling with
cover_all=True (ceil_mode=1; the same sizes as floor mode at 227x227), flatten in NCHW order,
Linear as Gemm(transB=1) with W stored (out, in), dropout as identity.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "alexbn.model")
BN_EPS = 2e-5  # chainer.links.BatchNormalization's default
TOLERANCE = 1e-4
CONVS = [("conv1", 3, 96, 11, 4, 0), ("conv2", 96, 256, 5, 1, 2), ("conv3", 256, 384, 3, 1, 1),
         ("conv4", 384, 384, 3, 1, 1), ("conv5", 384, 256, 3, 1, 1)]  # name, in, out, k, stride, pad
BNS = [("bn1", 96), ("bn2", 256)]
FCS = [("fc6", 9216, 4096), ("fc7", 4096, 4096), ("fc8", 4096, 1000)]
CONV_OUT = {"conv1": 55, "conv2": 27, "conv3": 13, "conv4": 13, "conv5": 13}  # output width at 227x227
# Default zmm FMA peak per core (`--peak`): the 2-core Sapphire Rapids development machine's (16 lanes x
# 2 FMA units x 2 flops x ~3.5 GHz). An AMD Zen 4 machine of the same kind measured 116 (one 512-bit FMA
# per cycle). The "% of peak" columns divide by it times the thread count. A pure FMA loop measures less
# on busy days (the neighbours share the physical cores), so read % of peak as a lower bound and
# compare cnnc with ORT in the same run.
PEAK_GFLOPS_PER_CORE = 224.0


def make_weights(seed=0):
    """W: N(0, 2/fan_in) (LeCunNormal with ReLU gain, so activations keep their scale), b: N(0, 0.01^2)."""
    rng = np.random.default_rng(seed)
    w = {}
    for name, cin, cout, k, _, _ in CONVS:
        w[f"{name}/W"] = rng.normal(0, np.sqrt(2 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32)
        w[f"{name}/b"] = rng.normal(0, 0.01, cout).astype(np.float32)
    for name, c in BNS:
        w[f"{name}/gamma"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        w[f"{name}/beta"] = rng.normal(0, 0.1, c).astype(np.float32)
        w[f"{name}/avg_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        w[f"{name}/avg_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)  # > 0
    for name, fin, fout in FCS:
        w[f"{name}/W"] = rng.normal(0, np.sqrt(2 / fin), (fout, fin)).astype(np.float32)
        w[f"{name}/b"] = rng.normal(0, 0.01, fout).astype(np.float32)
    return w


def build_onnx(w):
    from onnx import TensorProto, checker, helper, numpy_helper
    nodes, inits = [], [numpy_helper.from_array(v, name=k) for k, v in w.items()]

    def node(op, ins, **attrs):
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def conv(h, name, relu=True):
        _, _, _, k, s, p = next(c for c in CONVS if c[0] == name)
        h = node("Conv", [h, f"{name}/W", f"{name}/b"], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
        return node("Relu", [h]) if relu else h

    def bn_relu(h, name):
        keys = [f"{name}/{k}" for k in ("gamma", "beta", "avg_mean", "avg_var")]
        return node("Relu", [node("BatchNormalization", [h] + keys, epsilon=BN_EPS)])

    def pool(h):
        return node("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)

    def fc(h, name):
        return node("Gemm", [h, f"{name}/W", f"{name}/b"], transB=1)

    h = pool(bn_relu(conv("input", "conv1", relu=False), "bn1"))
    h = pool(bn_relu(conv(h, "conv2", relu=False), "bn2"))
    h = pool(conv(conv(conv(h, "conv3"), "conv4"), "conv5"))
    h = node("Flatten", [h], axis=1)
    h = node("Relu", [fc(node("Relu", [fc(h, "fc6")]), "fc7")])
    nodes.append(helper.make_node("Gemm", [h, "fc8/W", "fc8/b"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes, "AlexBN", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 227, 227])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    checker.check_model(model)
    return model


def prepare(work):
    """The cached npz and ONNX paths, writing them (atomically) if absent."""
    os.makedirs(work, exist_ok=True)
    npz, onnx_path = os.path.join(work, "alexbn-seed0.npz"), os.path.join(work, "alexbn-seed0.onnx")
    if not (os.path.exists(npz) and os.path.exists(onnx_path)):
        import onnx
        print(f"writing {npz} and {onnx_path} ...", file=sys.stderr)
        w = make_weights()
        with open(npz + ".tmp", "wb") as f:
            np.savez(f, **w)
        onnx.save(build_onnx(w), onnx_path + ".tmp")
        os.replace(npz + ".tmp", npz)
        os.replace(onnx_path + ".tmp", onnx_path)
    return npz, onnx_path


def ort_session(onnx_path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])


def make_input(batch):
    return np.random.default_rng(1).standard_normal((batch, 3, 227, 227), dtype=np.float32)


def time_ort(sess, batch, runs, warmup=5):
    return time_onnx(sess, "input", make_input(batch), runs, warmup)


def check(cnnc, npz, onnx_path, batch, work):
    """Correctness gate: cnnc's logits against ORT's on one seeded input; returns the relative error."""
    x = make_input(batch)
    xf, yf = os.path.join(work, f"x_b{batch}.npy"), os.path.join(work, f"y_b{batch}.npy")
    np.save(xf, x)
    if os.path.exists(yf):
        os.remove(yf)  # cnnc never overwrites an existing output
    cmd = [cnnc, "run", MODEL, "--weights", npz, "--input", xf, "--output", yf]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"`{shlex.join(cmd)}` failed (exit {p.returncode}):\n{p.stderr}")
    ours, ref = np.load(yf), ort_session(onnx_path, 2).run(["logits"], {"input": x})[0]
    if ours.shape != ref.shape:
        sys.exit(f"cnnc output shape {ours.shape} != ORT's {ref.shape}")
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def cnnc_bench(cnnc, npz, batch, threads, runs, tier="auto", model=MODEL):
    weights = ["--weights", npz] if npz else []
    cmd = [cnnc, "bench", model, *weights, "--batch", str(batch), "--threads", str(threads),
           "--runs", str(runs), "--tier", tier, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"`{shlex.join(cmd)}` failed (exit {p.returncode}):\n{p.stderr}")
    r = json.loads(p.stdout)
    if (r.get("batch"), r.get("threads")) != (batch, threads):
        sys.exit(f"cnnc bench reported batch {r.get('batch')}, threads {r.get('threads')}; asked {batch}, {threads}")
    return r


def layer_work(batch):
    """Per layer: (GFLOP, weight bytes) at this batch."""
    work = {n: (2 * o * i * k * k * CONV_OUT[n] ** 2 * batch / 1e9, 4 * o * i * k * k) for n, i, o, k, _, _ in CONVS}
    work.update({n: (2 * i * o * batch / 1e9, 4 * i * o) for n, i, o in FCS})
    return work


def cnnc_layers(cnnc, npz, batch, threads, runs):
    """Median ms per layer from `cnnc bench --profile`: kernels `nK.<layer>+...` summed by layer."""
    cmd = [cnnc, "bench", MODEL, "--weights", npz, "--batch", str(batch), "--threads", str(threads),
           "--runs", str(runs), "--profile", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"`{shlex.join(cmd)}` failed (exit {p.returncode}):\n{p.stderr}")
    layers = {}
    for k in json.loads(p.stdout)["kernels"]:
        name = k["kernel"].split(".", 1)[1].split("+")[0].split(".")[0]
        layers[name] = layers.get(name, 0.0) + k["median_ms"]
    return layers


def ort_layers(onnx_path, batch, threads, runs, work):
    """Median ms per layer from ORT's profiler: each run's node events in order, a Conv or Gemm
    starting a layer and every other node (pools, reorders, flatten) joining the one before."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling, so.profile_file_prefix = True, os.path.join(work, "ort-profile")
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    x = make_input(batch)
    for _ in range(5 + runs):
        sess.run(["logits"], {"input": x})
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    model_runs = [e for e in events if e.get("name") == "model_run"][5:]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = []
    for r in model_runs:
        convs, fcs, layer, ms = iter(n for n, *_ in CONVS), iter(n for n, *_ in FCS), "conv1", {}
        for e in (e for e in nodes if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]):
            op = e["args"].get("op_name", "")
            if op.endswith("Conv"):
                layer = next(convs)
            elif op.endswith("Gemm") or op == "MatMul":
                layer = next(fcs)
            ms[layer] = ms.get(layer, 0.0) + e["dur"] / 1e3
        per_run.append(ms)
    return {n: statistics.median(m.get(n, 0.0) for m in per_run) for n in per_run[0]}


def print_layers(batch, threads, ours, theirs, peak_per_core):
    work, peak = layer_work(batch), peak_per_core * threads
    print(f"\nbatch {batch}, {threads} thread{'s' if threads > 1 else ''} (ms; GFLOP/s, or GB/s of weights for "
          f"linear layers at batch 1; % of the {peak:.0f} GFLOP/s FMA peak):\n")
    print("| layer | cnnc ms | cnnc rate | % peak | ORT ms | ORT rate | % peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (gflop, wbytes) in work.items():
        cells = []
        for ms in (ours.get(name), theirs.get(name)):
            if not ms:
                cells += ["-"] * 3
                continue
            rate = f"{wbytes / ms / 1e6:.1f} GB/s" if name.startswith("fc") and batch == 1 else f"{gflop / ms * 1e3:.0f}"
            cells += [f"{ms:.2f}", rate, f"{100 * gflop / ms * 1e3 / peak:.0f}%"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    total = [sum(d.values()) for d in (ours, theirs)]
    print(f"| total (sum) | {total[0]:.2f} | | | {total[1]:.2f} | | |", flush=True)


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def onnx_input(sess, batch):
    """A seeded N(0,1) input for the session's first input, with `batch` on its symbolic axis 0."""
    i = sess.get_inputs()[0]
    shape = [batch] + [d for d in i.shape[1:]]
    if not all(isinstance(d, int) for d in shape):
        sys.exit(f"input `{i.name}` has symbolic dimensions {i.shape} beyond the batch")
    return i.name, np.random.default_rng(1).standard_normal(shape, dtype=np.float32)


def compare_onnx(a):
    """The --onnx mode: gate and time each file on both sides."""
    med = statistics.median
    os.makedirs(a.work, exist_ok=True)
    print("| model | batch | threads | cnnc median ms | ORT median ms | ratio cnnc/ORT | round ratios | max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for path in a.onnx:
        name = os.path.basename(path)[: -len(".onnx")] if path.endswith(".onnx") else os.path.basename(path)
        for b in a.batch:
            sess2 = ort_session(path, 2)
            in_name, x = onnx_input(sess2, b)
            xf, yf = os.path.join(a.work, f"{name}_x{b}.npy"), os.path.join(a.work, f"{name}_y{b}.npy")
            np.save(xf, x)
            if os.path.exists(yf):
                os.remove(yf)
            cmd = [a.cnnc, "run", path, "--input", xf, "--output", yf]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"| {name} | {b} | - | cnnc failed: {p.stderr.strip().splitlines()[0] if p.stderr.strip() else p.returncode} | | | | |", flush=True)
                break
            ref = sess2.run(None, {in_name: x})[0]
            err = float(np.abs(np.load(yf).reshape(ref.shape) - ref).max() / np.abs(ref).max())
            if not err <= TOLERANCE:
                sys.exit(f"{path}: cnnc and ONNX Runtime disagree at batch {b} ({err:.2e}); not timing")
            for t in a.threads:
                sess = ort_session(path, t)
                ours, theirs = [], []
                for _ in range(a.rounds):
                    ours.append(cnnc_bench(a.cnnc, None, b, t, a.runs, model=path))
                    theirs.append(time_onnx(sess, in_name, x, a.runs)[0])
                ratios = [c["median_ms"] / o for c, o in zip(ours, theirs)]
                print(f"| {name} | {b} | {t} | {med(c['median_ms'] for c in ours):.2f} | {med(theirs):.2f} | {med(ratios):.2f} | "
                      f"{' '.join(f'{r:.2f}' for r in ratios)} | {err:.1e} |", flush=True)


def time_onnx(sess, in_name, x, runs, warmup=5):
    """ORT's median and minimum latency in ms over `runs` runs on `x`, after `warmup` runs."""
    for _ in range(warmup):
        sess.run(None, {in_name: x})
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {in_name: x})
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), min(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cnnc", default=os.path.join(ROOT, "target", "release", "cnnc"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=30, help="timed runs per side per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternations of cnnc and ORT per configuration")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/cnnc-bench"))
    ap.add_argument("--ort-only", action="store_true", help="time ONNX Runtime alone (no gate, no cnnc)")
    ap.add_argument("--layers", action="store_true", help="also per-layer tables (cnnc --profile, ORT's profiler)")
    ap.add_argument("--portable", action="store_true",
                    help="also time cnnc with the assembled (AVX2 or AVX-512) tier disabled (--tier portable) in the same rounds")
    ap.add_argument("--peak", type=float, default=PEAK_GFLOPS_PER_CORE,
                    help="FMA peak GFLOP/s per core for the %% of peak columns (default: %(default)s)")
    ap.add_argument("--onnx", nargs="+", metavar="FILE", help="compare on these ONNX files instead of AlexBN")
    a = ap.parse_args()
    import onnxruntime

    if not a.ort_only:
        if not os.access(a.cnnc, os.X_OK):
            sys.exit(f"no cnnc binary at {a.cnnc}: build it with `cargo build --release` or pass --cnnc PATH")
        if subprocess.run([a.cnnc, "bench", "--help"], capture_output=True).returncode != 0:
            sys.exit(f"{a.cnnc} has no `bench` subcommand (`cnnc bench MODEL --weights W --batch B --threads T "
                     "--runs R --json`); build a cnnc that has one, or pass --ort-only")
    if a.onnx:
        tree = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
        print(f"command: `{shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}`  ")
        print(f"cnnc tree {tree.stdout.strip() or '?'}; onnxruntime {onnxruntime.__version__}; CPU: {cpu_model()} "
              f"({os.cpu_count()} logical CPUs); {a.rounds} rounds of {a.runs} timed runs each\n")
        compare_onnx(a)
        return 0
    npz, onnx_path = prepare(a.work)

    tree = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
    cnnc = "not run" if a.ort_only else subprocess.run([a.cnnc, "--version"], capture_output=True, text=True).stdout
    print(f"command: `{shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}`  ")
    print(f"cnnc: {cnnc.strip()} (tree {tree.stdout.strip() or '?'}); onnxruntime {onnxruntime.__version__}  ")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)  ")
    print(f"model: {os.path.relpath(MODEL, ROOT)}, weights {npz}, {a.rounds} rounds of {a.runs} timed runs each\n")

    if not a.ort_only:
        for b in a.batch:
            err = check(a.cnnc, npz, onnx_path, b, a.work)
            print(f"correctness, batch {b}: max|cnnc - ORT| / max|ORT| = {err:.2e} (limit {TOLERANCE:.0e})  ")
            if not err <= TOLERANCE:
                sys.exit(f"cnnc and ONNX Runtime disagree at batch {b}; not timing")
        print()

    portable = a.portable and not a.ort_only
    extra = (" portable median ms | portable/ORT |", "---:|---:|") if portable else ("", "")
    print(f"| batch | threads | cnnc median ms | ORT median ms | ratio cnnc/ORT | round ratios | cnnc min | ORT min |{extra[0]}")
    print(f"|---:|---:|---:|---:|---:|---|---:|---:|{extra[1]}")
    med = statistics.median
    for b in a.batch:
        for t in a.threads:
            sess = ort_session(onnx_path, t)
            ours, slow, theirs = [], [], []
            for _ in range(a.rounds):
                if not a.ort_only:
                    ours.append(cnnc_bench(a.cnnc, npz, b, t, a.runs))
                if portable:
                    slow.append(cnnc_bench(a.cnnc, npz, b, t, a.runs, "portable"))
                theirs.append(time_ort(sess, b, a.runs))
            o_med, o_min = med(o for o, _ in theirs), min(m for _, m in theirs)
            if ours:
                ratios = [c["median_ms"] / o for c, (o, _) in zip(ours, theirs)]
                c_med, c_min = f"{med(c['median_ms'] for c in ours):.2f}", f"{min(c['min_ms'] for c in ours):.2f}"
                ratio, spread = f"{med(ratios):.2f}", " ".join(f"{r:.2f}" for r in ratios)
            else:
                c_med = c_min = ratio = spread = "-"
            row = f"| {b} | {t} | {c_med} | {o_med:.2f} | {ratio} | {spread} | {c_min} | {o_min:.2f} |"
            if portable:
                p_ratio = med(c["median_ms"] / o for c, (o, _) in zip(slow, theirs))
                row += f" {med(c['median_ms'] for c in slow):.2f} | {p_ratio:.2f} |"
            print(row, flush=True)
    if a.layers:
        for b in a.batch:
            for t in a.threads:
                ours = {} if a.ort_only else cnnc_layers(a.cnnc, npz, b, t, a.runs)
                print_layers(b, t, ours, ort_layers(onnx_path, b, t, a.runs, a.work), a.peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
