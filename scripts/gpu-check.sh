#!/usr/bin/env bash
# GPU check of the cuda backend, for a machine with an NVIDIA GPU, its driver, and python3 with PyTorch
# (CUDA build) and numpy, but no Rust: copy a release `cnnc` binary built elsewhere next to a checkout.
#
#   scripts/gpu-check.sh [path/to/cnnc]        (default: ./gpu-bin/cnnc)
#
# 1. Every models/*.model (and AlexBN at batch 2, which takes Winograd) on the GPU (`cnnc run --backend cuda`) against the CPU reference interpreter
#    (`--backend reference`) on the same deterministic input and Chainer-initialised weights:
#    max |cuda − reference| / max |reference| must be ≤ 1e-4.
# 2. `compute-sanitizer --tool memcheck` on AlexBN at batch 1 (where the tool is installed).
# 3. AlexBN and ResNet-50 latency at batch 1 and 64: `cnnc bench --backend cuda` (input upload, the
#    replayed CUDA graph and output download) against the same network in PyTorch + cuDNN on the same
#    GPU (random weights, eval mode, cudnn.benchmark, TF32 off so both are fp32; torchvision's
#    resnet50, whose stride sits on the 3×3 convolution instead of the first 1×1: the same FLOPs within
#    1 %), timed with CUDA events on a resident input; prints the ratio.
# 4. `cnnc bench --profile` (each kernel's GPU time) for AlexBN at batch 1 and 64 and ResNet-50 at 1.
# Exit status: 0 when every model matches, 1 otherwise. Each command has a time limit, so the whole
# check stays within about 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
CNNC="$(realpath "${1:-gpu-bin/cnnc}")"
[ -x "$CNNC" ] || { echo "error: no cnnc binary at $CNNC (pass its path as the first argument)" >&2; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec python3 - "$CNNC" <<'PY'
import glob, json, os, re, statistics, subprocess, sys, tempfile, time
import numpy as np

cnnc = sys.argv[1]
start = time.time()
tmp = tempfile.mkdtemp(prefix="cnnc-gpu-check-")

def run(args, limit):
    """Runs cnnc; returns (ok, stdout, stderr tail)."""
    try:
        p = subprocess.run([cnnc] + args, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return False, "", f"timed out after {limit} s"
    return p.returncode == 0, p.stdout, "\n".join(p.stderr.strip().splitlines()[-3:])

# ---- 1. every model: cuda against the reference interpreter ----
print(f"\n{'model':<18} {'input':<16} {'max|ref|':>10} {'max|diff|':>10} {'rel':>9}  {'cuda s':>7} {'ref s':>7}  result")
failed = 0
# AlexBN also at batch 2, where conv3–5 take Winograd F(4×4, 3×3).
jobs = [(m, 1) for m in sorted(glob.glob("models/*.model"))] + [("models/alexbn.model", 2)]
for model, batch in jobs:
    name = os.path.basename(model)[:-6] + ("" if batch == 1 else f"-b{batch}")
    dims = re.search(r"forward\(\s*\w+\s*:\s*\[([\d,\s]+)\]", open(model).read())
    shape = (batch,) + tuple(int(d) for d in dims.group(1).split(","))
    x = os.path.join(tmp, f"{name}.x.npy")
    np.save(x, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    outs, secs, errors = {}, {}, []
    for backend in ["cuda", "reference"]:
        out = os.path.join(tmp, f"{name}.{backend}.npy")
        t = time.time()
        ok, _, err = run(["run", model, "--input", x, "--output", out, "--backend", backend], 120)
        secs[backend] = time.time() - t
        if ok:
            outs[backend] = np.load(out)
        else:
            errors.append(f"{backend}: {err}")
    if errors:
        failed += 1
        print(f"{name:<18} {str(shape):<16} {'':>10} {'':>10} {'':>9}  {secs['cuda']:>7.1f} {secs['reference']:>7.1f}  FAIL")
        for e in errors:
            print("    " + e.replace("\n", "\n    "))
        continue
    ref, got = outs["reference"].astype(np.float64), outs["cuda"].astype(np.float64)
    scale, diff = float(np.abs(ref).max()), float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
    rel = diff / max(scale, 1e-30)
    ok = rel <= 1e-4
    failed += not ok
    print(f"{name:<18} {str(shape):<16} {scale:>10.4g} {diff:>10.3g} {rel:>9.2e}  {secs['cuda']:>7.1f} {secs['reference']:>7.1f}  {'ok' if ok else 'FAIL'}")

# ---- 2. memcheck ----
import shutil
sanitizer = shutil.which("compute-sanitizer") or next(iter(glob.glob("/usr/local/cuda*/bin/compute-sanitizer")), None)
if sanitizer:
    x = os.path.join(tmp, "alexbn.x.npy")
    try:
        p = subprocess.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "3", cnnc, "run", "models/alexbn.model", "--input", x,
                            "--output", os.path.join(tmp, "memcheck.npy"), "--backend", "cuda"], capture_output=True, text=True, timeout=150)
        clean = p.returncode == 0
        print(f"\nmemcheck (AlexBN, batch 1): {'clean' if clean else 'ERRORS'}")
        if not clean:
            failed += 1
            print("\n".join((p.stdout + p.stderr).strip().splitlines()[-15:]))
    except subprocess.TimeoutExpired:
        print("\nmemcheck (AlexBN, batch 1): timed out after 150 s")
else:
    print("\nmemcheck: compute-sanitizer not found, skipped")

# ---- 3. latency: cnnc cuda against PyTorch + cuDNN ----
def cnnc_ms(model, batch, runs):
    ok, out, err = run(["bench", model, "--backend", "cuda", "--batch", str(batch), "--runs", str(runs), "--json"], 100)
    if not ok:
        print(f"cnnc bench --batch {batch} failed: {err}")
        return None
    return json.loads(out.strip().splitlines()[-1])["median_ms"]

def torch_ms(model, batch, runs):
    import torch
    from torch import nn
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if "resnet50" in model:
        import torchvision
        net, size = torchvision.models.resnet50().cuda().eval(), 224
    else:
        net, size = alexbn(nn), 227
    x = torch.randn(batch, 3, size, size, device="cuda")
    times = []
    with torch.inference_mode():
        for i in range(5 + runs):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            net(x)
            b.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(a.elapsed_time(b))
    return statistics.median(times)

def alexbn(nn):
    pool = lambda: nn.MaxPool2d(3, stride=2, ceil_mode=True)  # Chainer's cover_all
    return nn.Sequential(
        nn.Conv2d(3, 96, 11, stride=4), nn.BatchNorm2d(96), nn.ReLU(), pool(),
        nn.Conv2d(96, 256, 5, padding=2), nn.BatchNorm2d(256), nn.ReLU(), pool(),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), pool(),
        nn.Flatten(), nn.Linear(9216, 4096), nn.ReLU(), nn.Dropout(),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, 1000),
    ).cuda().eval()

print("\nLatency (median; fp32 on both sides)")
print(f"{'model':<10} {'batch':>5} {'cnnc cuda ms':>13} {'torch+cuDNN ms':>15} {'cnnc/torch':>11}")
for model in ["models/alexbn.model", "models/resnet50.model"]:
    for batch, runs in [(1, 20), (64, 5)]:
        c = cnnc_ms(model, batch, runs)
        try:
            t = torch_ms(model, batch, 20)
        except Exception as e:  # no torch, no CUDA build of it, no torchvision
            print(f"PyTorch failed: {e}")
            t = None
        ratio = f"{c / t:.2f}" if c and t else "-"
        fmt = lambda v: f"{v:.3f}" if v else "-"
        print(f"{os.path.basename(model)[:-6]:<10} {batch:>5} {fmt(c):>13} {fmt(t):>15} {ratio:>11}")

# ---- 4. where the time goes: per-kernel GPU times (CUDA events), for the next round of tuning ----
for model, batch in [("models/alexbn.model", 1), ("models/alexbn.model", 64), ("models/resnet50.model", 1)]:
    ok, out, err = run(["bench", model, "--backend", "cuda", "--batch", str(batch), "--runs", "5", "--profile"], 100)
    print(f"\n{os.path.basename(model)} batch {batch}, --profile:")
    print(out.rstrip() if ok else f"failed: {err}")

print(f"\n{failed} model(s) failed; total {time.time() - start:.0f} s")
sys.exit(1 if failed else 0)
PY
