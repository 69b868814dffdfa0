#!/usr/bin/env python3
"""Times single 3×3 and 5×5 layers of every model with each Winograd algorithm forced, and `auto`.

The data behind the Winograd cost model's transform prices (`kernel/winograd.rs`, `transform_costs`):
each layer (stride 1, ReLU, no pool) is written as a one-layer model, then `cnnc bench --winograd
never|m2|m3|m4|auto --json` runs it at batch 1 and 8 on one thread, the modes alternating within each
round; the table gives each mode's best time over the rounds in µs (the fastest in bold), so that a row
shows both what pays on this CPU and whether `auto` took it. For 5×5 layers m3 and m4 are the same
algorithm, F(3×3, 5×5).

    python3 bench/winograd_layers.py [--cnnc target/release/cnnc] [--rounds 3]
"""
import argparse
import json
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name, input channels, output channels, kernel, map size (the layers' own, from models/*.model)
LAYERS = [
    ("ResNet res2 3×3", 64, 64, 3, 56),
    ("ResNet res3 3×3", 128, 128, 3, 28),
    ("ResNet res4 3×3", 256, 256, 3, 14),
    ("ResNet res5 3×3", 512, 512, 3, 7),
    ("GoogLeNet inc3 3×3", 96, 128, 3, 28),
    ("GoogLeNet inc4 3×3", 96, 208, 3, 14),
    ("GoogLeNet inc5 3×3", 160, 320, 3, 7),
    ("GoogLeNet inc3 5×5", 16, 32, 5, 28),
    ("GoogLeNet inc4 5×5", 16, 48, 5, 14),
    ("GoogLeNet inc5 5×5", 32, 128, 5, 7),
    ("AlexNet conv3 3×3", 256, 384, 3, 13),
    ("AlexNet conv2 5×5", 96, 256, 5, 27),
    ("GoogLeNetBN inc3 3×3", 64, 96, 3, 28),
    ("digits conv2 3×3", 32, 64, 3, 8),
    ("digits conv3 3×3", 64, 64, 3, 4),
]
MODES = ["never", "m2", "m3", "m4", "auto"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cnnc", default=os.path.join(ROOT, "target", "release", "cnnc"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print("| layer | batch | " + " | ".join(MODES) + " |")
    print("|---|---:|" + "---:|" * len(MODES))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, ci, co, k, hw) in enumerate(LAYERS):
            path = os.path.join(tmp, f"l{i}.model")
            with open(path, "w") as f:
                f.write(f"model L{i} {{\n    c = L.Convolution2D({ci}, {co}, {k}, pad={k // 2})\n"
                        f"    forward(x: [{ci}, {hw}, {hw}]) {{\n        return F.relu(self.c(x))\n    }}\n}}\n")
            for batch in (1, 8):
                # About 0.2 s per measurement: the smallest layers take tens of µs.
                runs = max(20, min(5000, int(0.2e6 / (batch * ci * co * k * k * hw * hw / 2e4))))
                best = {m: float("inf") for m in MODES}
                for _ in range(args.rounds):
                    for m in MODES:
                        out = subprocess.run([args.cnnc, "bench", path, "--runs", str(runs), "--threads", "1", "--batch", str(batch),
                                              "--winograd", m, "--json"], capture_output=True, text=True, check=True).stdout
                        best[m] = min(best[m], json.loads(out)["min_ms"] * 1000)
                fastest = min(best[m] for m in MODES if m != "auto")
                cells = [f"**{best[m]:.0f}**" if best[m] == fastest else f"{best[m]:.0f}" for m in MODES]
                print(f"| {name}, {ci}→{co}, {hw}² | {batch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
