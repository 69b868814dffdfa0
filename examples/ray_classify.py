"""Classify a folder of images with Ray Data: each actor compiles the model once and classifies batches.

    python examples/ray_classify.py DIR [--model M --weights W --workers 2 --threads 1 --batch-size 16]

Prints one line per image: its path and its top-5 (class, probability). On a cluster, run it where
`ray.init()` reaches the cluster (RAY_ADDRESS); every worker needs the `cnnc` wheel and the model and
weights files at the same paths (docs/scale-out.md).
"""
import argparse
import os
import sys

import numpy as np

import cnnc

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def image_paths(folder):
    """The images in `folder` (not recursive), sorted by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


class Classify:
    """Ray Data's class-based UDF: the model is compiled once per actor, in its constructor."""

    def __init__(self, model, weights, threads, batch_size, k):
        self.model = cnnc.compile(model, weights, batch=batch_size, threads=threads)
        self.k = k

    def __call__(self, batch):
        paths = [str(p) for p in batch["path"]]
        top = self.model.top(cnnc.load_images(paths, self.model), self.k)
        return {
            "path": np.array(paths, dtype=object),
            "classes": np.array([[c for c, _, _ in t] for t in top], dtype=np.int64),
            "probabilities": np.array([[p for _, _, p in t] for t in top], dtype=np.float64),
        }


def classify(paths, model, weights=None, *, workers=2, threads=1, batch_size=16, k=5):
    """Rows of (path, classes, probabilities) for `paths`, computed by `workers` Ray actors with `threads`
    cnnc threads each. Ray must be initialised (`ray.init`) by the caller."""
    import ray.cloudpickle
    import ray.data

    # Workers cannot import this file: the UDF travels by value, as it does when the file runs as a script.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ds = ray.data.from_items([{"path": p} for p in paths])
    out = ds.map_batches(
        Classify,
        fn_constructor_args=(model, weights, threads, batch_size, k),
        concurrency=workers,
        num_cpus=threads,
        batch_size=batch_size,
    )
    rows = out.take_all()
    return sorted(((r["path"], list(r["classes"]), list(r["probabilities"])) for r in rows), key=lambda r: r[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--model", default=None, help="model file (default: the bundled AlexBN)")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--workers", type=int, default=2, help="Ray actors")
    ap.add_argument("--threads", type=int, default=1, help="cnnc threads per actor (its num_cpus)")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    import ray

    paths = image_paths(args.folder)
    if not paths:
        sys.exit(f"error: no .png or .jpg images in {args.folder}")
    ray.init()
    for path, classes, probs in classify(paths, args.model, args.weights, workers=args.workers, threads=args.threads, batch_size=args.batch_size):
        print(path, " ".join(f"{c}:{p:.4f}" for c, p in zip(classes, probs)))


if __name__ == "__main__":
    main()
