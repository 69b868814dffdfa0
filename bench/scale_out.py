"""Images per second of the Ray Data recipe (examples/ray_classify.py) with 1 and 2 workers, against a
plain Python loop over one compiled model, on the digits model and on AlexBN (random weights).

    target/ci-venv/bin/python bench/scale_out.py [--rounds 3] [--digits 4500] [--alexbn 96]

Needs the cnnc wheel and Ray installed in that Python (scripts/test installs both). Each round runs every
configuration once, in alternating order; the table gives the median images/s (pipeline start to last
result, including image decoding, preprocessing and each process's or actor's compile; `ray.init`
excluded), and once more for the plain loop without its compile, to show the fixed costs.
"""
import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "python", "tests"))

import cnnc  # noqa: E402
import ray_classify  # noqa: E402
from conftest import MEAN, write_png  # noqa: E402


def digit_images(folder, n):
    x = np.load(os.path.join(ROOT, "tests", "fixtures", "digits", "x_test.npy"))
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"d{i:05}.png")
        write_png(path, np.round(x[i % len(x), 0] * 255.0 + MEAN))
        paths.append(path)
    return paths


def photos(folder, n):
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"p{i:04}.jpg")
        shutil.copy(os.path.join(ROOT, "models", "examples", "cat.jpg"), path)
        paths.append(path)
    return paths


def plain_loop(paths, model, weights, batch_size, threads, m=None):
    """One process, one compiled model (compiled here unless given), batches of paths → load_images → top."""
    m = m or cnnc.compile(model, weights, batch=batch_size, threads=threads)
    for i in range(0, len(paths), batch_size):
        chunk = paths[i:i + batch_size]
        m.top(cnnc.load_images(chunk, m), 5)


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--digits", type=int, default=4500, help="digit images")
    ap.add_argument("--alexbn", type=int, default=96, help="photos for AlexBN")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    import ray

    warnings.simplefilter("ignore")  # AlexBN's random weights warn once per compile
    cores = os.cpu_count()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    tmp = tempfile.mkdtemp()
    models = {
        "digits": (os.path.join(ROOT, "models", "digits.model"), os.path.join(ROOT, "models", "digits.npz"), digit_images(tmp, args.digits)),
        "AlexBN (random weights)": (None, None, photos(tmp, args.alexbn)),
    }
    compiled = {m: cnnc.compile(m, w, batch=args.batch_size, threads=cores) for m, w, _ in models.values()}
    configs = {
        f"plain Python loop, 1 process, {cores} threads": lambda p, m, w: plain_loop(p, m, w, args.batch_size, cores),
        "the same loop, model compiled beforehand": lambda p, m, w: plain_loop(p, m, w, args.batch_size, cores, compiled[m]),
        f"Ray Data, 1 worker × {cores} threads": lambda p, m, w: ray_classify.classify(p, m, w, workers=1, threads=cores, batch_size=args.batch_size),
        f"Ray Data, {cores} workers × 1 thread": lambda p, m, w: ray_classify.classify(p, m, w, workers=cores, threads=1, batch_size=args.batch_size),
    }
    rates = {(name, c): [] for name in models for c in configs}
    for r in range(args.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name, (model, weights, paths) in models.items():
            for c in order:
                t = time.perf_counter()
                configs[c](paths, model, weights)
                rates[(name, c)].append(len(paths) / (time.perf_counter() - t))
    ray.shutdown()
    shutil.rmtree(tmp)
    print(f"`{' '.join(sys.argv)}` — {cpu_name()}, {cores} cores, cnnc {cnnc.__version__}, Ray {ray.__version__}, "
          f"batch size {args.batch_size}, median of {args.rounds} alternating rounds\n")
    print("| model | images | " + " | ".join(configs) + " |")
    print("|---|---:|" + "---:|" * len(configs))
    for name, (_, _, paths) in models.items():
        print(f"| {name} | {len(paths)} | " + " | ".join(f"{statistics.median(rates[(name, c)]):.0f} img/s" for c in configs) + " |")


if __name__ == "__main__":
    main()
