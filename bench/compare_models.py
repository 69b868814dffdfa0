#!/usr/bin/env python3
"""Every model in models/ against ONNX Runtime, for one or two cnnc builds, alternating in one run.

    python3 bench/compare_models.py --weights DIR [--cnnc PATH ...] [--batch 1] [--threads 2]
                                    [--runs 10] [--min-seconds 0.3] [--rounds 3] [--models alex nin]

DIR holds NAME.npz (and NAME_in.npy) as `tests/fixtures/gen_models.py --write-weights DIR` writes
them: Chainer's own save_npz files. For each model:
1. The ONNX graph is built from cnnc's unoptimized IR (`cnnc compile --emit ir -O0`) and the same npz,
   op by op with Chainer's semantics spelled out in ONNX: BN eps as in the IR, max pooling with
   cover_all as ceil_mode=1, average pooling counting padding, LRN's alpha times n (ONNX divides it
   by n), Linear as Flatten + Gemm(transB=1), dropout as identity.
2. Gate: `cnnc run` (the first build) on NAME_in.npy against ORT on the same input, max|diff|/max|ORT|.
3. --rounds times: each cnnc build's `bench --json` (cnnc times itself, same weights), then ORT
   in-process (intra_op_num_threads=T, sequential, all graph optimizations, 3 warm-up runs); each
   side times the same number of runs, at least --runs and enough for --min-seconds.
   Prints per model each side's median latency over rounds and, per build, cnnc/ORT as the median
   of the rounds' paired ratios (both sides of a round see the same neighbours on a shared machine).
4. With --startup, a second table from the same rounds: time to first answer and peak RSS. cnnc: the
   whole `cnnc run NAME.model --weights W --input NAME_in.npy` process, start to exit, once with
   Chainer's npz (deflate-compressed, as save_npz writes by default) and once with the same arrays
   stored uncompressed as safetensors (the bytes as ORT's ONNX file holds them; `cnnc import
   --weights-out` writes this format). ORT: a Python process that creates the session from the ONNX
   file and runs once; its time is session creation plus first run (imports excluded), its RSS the
   whole process's, Python included.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compare_ort import ort_session, time_onnx  # the same ORT settings and timing as the AlexBN comparison

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"%(\d+) = ([a-z_0-9]+)(?: [A-Za-z_0-9]+)?(\[[^\]]*\])?(?:\(([^)]*)\))?(?: \{([^}]*)\})? : \[N((?:, \d+)*)\]")


def attrs(text):
    """`[96 <- 3, k=11x11, s=4x4, p=0x0, groups=2, nobias]` -> dict (pairs as lists)."""
    out = {}
    for part in (text or "[]")[1:-1].split(", "):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = [int(x) for x in v.split("x")] if re.fullmatch(r"\d+x\d+", v) else v
        elif part:
            out[part] = True
    return out


def onnx_model(ir, npz):
    nodes, inits, shape_of, name_of = [], [], {}, {}
    graph_in = None

    def init(key, arr):
        if key not in name_of:
            inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), key))
            name_of[key] = key
        return key

    for line in ir.splitlines():
        m = LINE.search(line)
        if not m:
            continue
        idx, op, at, args, params, dims = m.groups()
        out, a = f"v{idx}", attrs(at)
        ins = [f"v{x.strip()[1:]}" for x in (args or "").split(",") if x.strip()]
        keys = [k.strip() for k in (params or "").split(",") if k.strip()]
        shape_of[out] = [int(d) for d in dims.split(", ")[1:]] if dims else []
        if op == "input":
            graph_in = helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N"] + shape_of[out])
            continue
        if op == "conv2d":
            p = a["p"]
            kw = dict(kernel_shape=a["k"], strides=a["s"], pads=[p[0], p[1], p[0], p[1]], group=int(a.get("groups", 1)))
            nodes.append(helper.make_node("Conv", ins + [init(k, npz[k]) for k in keys], [out], **kw))
        elif op == "batch_norm":
            nodes.append(helper.make_node("BatchNormalization", ins + [init(k, npz[k]) for k in keys], [out], epsilon=float(a["eps"]) if "eps" in a else 2e-5))
        elif op == "linear":
            flat = out + "_flat"
            nodes.append(helper.make_node("Flatten", ins, [flat], axis=1))
            nodes.append(helper.make_node("Gemm", [flat] + [init(k, npz[k]) for k in keys], [out], transB=1))
        elif op in ("max_pool2d", "avg_pool2d"):
            p = a["p"]
            kw = dict(kernel_shape=a["k"], strides=a["s"], pads=[p[0], p[1], p[0], p[1]])
            if op == "max_pool2d":
                nodes.append(helper.make_node("MaxPool", ins, [out], ceil_mode=int(bool(a.get("cover_all"))), **kw))
            else:
                nodes.append(helper.make_node("AveragePool", ins, [out], count_include_pad=1, **kw))
        elif op == "relu":
            nodes.append(helper.make_node("Relu", ins, [out]))
        elif op == "lrn":
            n = int(a["n"])
            nodes.append(helper.make_node("LRN", ins, [out], size=n, alpha=float(a["alpha"]) * n, beta=float(a["beta"]), bias=float(a["k"])))
        elif op == "dropout":
            nodes.append(helper.make_node("Identity", ins, [out]))
        elif op == "softmax":
            nodes.append(helper.make_node("Softmax", ins, [out], axis=int(a["axis"])))
        elif op == "reshape":
            shape = out + "_shape"  # 0 keeps the batch
            inits.append(numpy_helper.from_array(np.array([0] + shape_of[out], np.int64), shape))
            nodes.append(helper.make_node("Reshape", ins + [shape], [out]))
        elif op == "concat":
            nodes.append(helper.make_node("Concat", ins, [out], axis=int(a["axis"])))
        elif op == "add":
            nodes.append(helper.make_node("Add", ins, [out]))
        else:
            raise SystemExit(f"no ONNX translation for `{op}`: {line.strip()}")
    last = "v" + re.search(r"^\s*return %(\d+)", ir, re.M).group(1)
    g = helper.make_graph(nodes, "m", [graph_in], [helper.make_tensor_value_info(last, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


ORT_FIRST = """
import sys, time
import numpy as np, onnxruntime as ort
x = np.load(sys.argv[2]).astype(np.float32)
t = time.perf_counter()
so = ort.SessionOptions()
so.intra_op_num_threads, so.inter_op_num_threads = int(sys.argv[3]), 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
s.run(None, {s.get_inputs()[0].name: x})
print(time.perf_counter() - t)
"""


def process(cmd):
    """Runs `cmd`; returns (wall seconds, peak RSS in MB, standard output). The RSS comes from GNU time:
    a child forked from this (large) Python process inherits its high-water mark through exec."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    return wall, int(p.stderr.strip().splitlines()[-1]) / 1024, p.stdout


def write_safetensors(npz, path):
    """The float arrays of `npz` as float32 in a safetensors file (8-byte header length, JSON, data)."""
    header, blobs, at = {}, [], 0
    for key in sorted(npz.files):
        a = np.ascontiguousarray(npz[key])
        if a.dtype.kind != "f":
            continue  # BatchNormalization's sample counter N
        b = a.astype("<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [at, at + len(b)]}
        blobs.append(b)
        at += len(b)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for b in blobs:
            f.write(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", required=True, help="folder of NAME.npz and NAME_in.npy (gen_models.py --write-weights)")
    ap.add_argument("--cnnc", nargs="+", default=[os.path.join(ROOT, "target", "release", "cnnc")])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10, help="timed runs per side per round (at least)")
    ap.add_argument("--min-seconds", type=float, default=0.3, help="each side runs at least this long per round (more runs for small models)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--startup", action="store_true", help="also time the first answer and peak RSS of each side's process")
    args = ap.parse_args()
    startup_rows = []
    names = args.models or sorted(f[:-6] for f in os.listdir(os.path.join(ROOT, "models")) if f.endswith(".model"))
    work = tempfile.mkdtemp(prefix="cnnc-models-")
    print(f"batch {args.batch}, {args.threads} threads, {args.rounds} rounds of at least {args.runs} runs and {args.min_seconds} s; builds: {' '.join(args.cnnc)}")
    head = " | ".join(f"build {i} ms | build {i}/ORT (rounds)" for i in range(len(args.cnnc)))
    print(f"| model | gate | ORT ms | {head} |")
    print("|---|---:|---:|" + "---:|---|" * len(args.cnnc))
    for name in names:
        model = os.path.join(ROOT, "models", name + ".model")
        npz_path = os.path.join(args.weights, name + ".npz")
        if not os.path.exists(npz_path) or not os.path.exists(os.path.join(args.weights, name + "_in.npy")):
            # models/digits.model ships its own weights (copy them and an input in to include it).
            print(f"| {name} | skipped: no {name}.npz and {name}_in.npy in {args.weights} |")
            continue
        ir = subprocess.run([args.cnnc[0], "compile", model, "--emit", "ir", "-O0"], capture_output=True, text=True, check=True).stdout
        onnx_path = os.path.join(work, name + ".onnx")
        onnx.save(onnx_model(ir, np.load(npz_path)), onnx_path)
        st_path = os.path.join(work, name + ".safetensors")
        write_safetensors(np.load(npz_path), st_path)
        sess = ort_session(onnx_path, args.threads)
        # Gate on Chainer's input for this model.
        x_in = np.load(os.path.join(args.weights, name + "_in.npy")).astype(np.float32)
        y_path = os.path.join(work, name + "_y.npy")
        subprocess.run([args.cnnc[0], "run", model, "--weights", npz_path, "--input", os.path.join(args.weights, name + "_in.npy"), "--output", y_path, "--json"],
                       capture_output=True, text=True, check=True)
        want = sess.run(None, {sess.get_inputs()[0].name: x_in})[0]
        gate = float(np.abs(np.load(y_path) - want).max() / np.abs(want).max())
        x = np.random.default_rng(0).standard_normal([args.batch] + list(x_in.shape[1:])).astype(np.float32)
        # Each side times at least --min-seconds per round: ten runs of a 60 µs model (digits) measure
        # its cold start, not its speed. Both sides time the same number of runs.
        once = time_onnx(sess, sess.get_inputs()[0].name, x, 5, warmup=3)[1] / 1e3
        runs = max(args.runs, int(args.min_seconds / max(once, 1e-6)) + 1)
        cnnc_ms = [[] for _ in args.cnnc]
        ort_ms = []
        first = [[] for _ in args.cnnc]  # (npz seconds, MB, safetensors seconds, MB) per round
        ort_first = []
        for _ in range(args.rounds):
            if args.startup:
                in_path = os.path.join(args.weights, name + "_in.npy")
                for i, c in enumerate(args.cnnc):
                    procs = [process([c, "run", model, "--weights", w, "--input", in_path, "--output", y_path, "--threads", str(args.threads)]) for w in (npz_path, st_path)]
                    first[i].append((*procs[0][:2], *procs[1][:2]))
                _, rss, out = process([sys.executable, "-c", ORT_FIRST, onnx_path, in_path, str(args.threads)])
                ort_first.append((float(out.strip()), rss))
            for i, c in enumerate(args.cnnc):
                out = subprocess.run([c, "bench", model, "--weights", npz_path, "--json", "--batch", str(args.batch), "--runs", str(runs),
                                      "--threads", str(args.threads)], capture_output=True, text=True, check=True).stdout
                cnnc_ms[i].append(json.loads(out.strip().splitlines()[-1])["median_ms"])
            ort_ms.append(time_onnx(sess, sess.get_inputs()[0].name, x, runs, warmup=3)[0])
        cells = []
        for ms in cnnc_ms:
            ratios = [a / b for a, b in zip(ms, ort_ms)]
            cells.append(f"{statistics.median(ms):.2f} | **{statistics.median(ratios):.2f}** ({' '.join(f'{r:.2f}' for r in ratios)})")
        print(f"| {name} | {gate:.1e} | {statistics.median(ort_ms):.2f} | {' | '.join(cells)} |", flush=True)
        if args.startup:
            cells = []
            for runs in first:
                for k in (0, 2):
                    ratios = [a[k] / b[0] for a, b in zip(runs, ort_first)]
                    cells.append(f"{statistics.median(r[k] for r in runs):.2f} | **{statistics.median(ratios):.2f}** | {max(r[k + 1] for r in runs):.0f}")
            startup_rows.append(f"| {name} | {statistics.median(r[0] for r in ort_first):.2f} | {max(r[1] for r in ort_first):.0f} | {' | '.join(cells)} |")
    if startup_rows:
        head = " | ".join(f"{i} {w} s | {i} {w}/ORT | {i} {w} MB" for i in range(len(args.cnnc)) for w in ("npz", "st"))
        print(f"\nTime to first answer (median of rounds) and peak RSS (max of rounds); build i reading Chainer's npz and safetensors (st)"
              f"\n\n| model | ORT s | ORT MB | {head} |")
        print("|---|---:|---:|" + "---:|---:|---:|" * 2 * len(args.cnnc))
        print("\n".join(startup_rows))


if __name__ == "__main__":
    main()
