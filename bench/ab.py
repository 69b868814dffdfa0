#!/usr/bin/env python3
"""A/B latency of two cnnc builds on every model in models/, alternating in one run.

    python3 bench/ab.py BEFORE AFTER [--batch 1] [--threads 2] [--runs 10] [--rounds 3] [--models alexbn nin]

Each round runs `BEFORE bench MODEL --json` then `AFTER bench MODEL --json` (same flags, Chainer's
initializers as weights: only speed is compared), so both sides of a round see the same neighbours on
a shared machine. Prints per model the median over rounds of each side's median latency and the ratio
AFTER/BEFORE as the median of the rounds' paired ratios; exits 0 (it measures, it does not judge).
"""
import argparse
import json
import os
import statistics
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(cnnc, model, args):
    cmd = [cnnc, "bench", model, "--json", "--batch", str(args.batch), "--runs", str(args.runs), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median_ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="*", help="model names (default: every models/*.model)")
    args = ap.parse_args()
    names = args.models or sorted(f[:-6] for f in os.listdir(os.path.join(ROOT, "models")) if f.endswith(".model"))
    print(f"| model | before ms | after ms | after/before | round ratios |  (batch {args.batch}, {args.threads} threads)")
    print("|---|---:|---:|---:|---|")
    for name in names:
        model = os.path.join(ROOT, "models", name + ".model")
        before, after = [], []
        for _ in range(args.rounds):
            before.append(bench(args.before, model, args))
            after.append(bench(args.after, model, args))
        ratios = [a / b for a, b in zip(after, before)]
        print(f"| {name} | {statistics.median(before):.2f} | {statistics.median(after):.2f} | "
              f"**{statistics.median(ratios):.3f}** | {' '.join(f'{r:.2f}' for r in ratios)} |", flush=True)


if __name__ == "__main__":
    main()
