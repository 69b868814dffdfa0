"""Classify a folder of images with Spark: `mapInPandas`, the model compiled once per task.

    python examples/spark_classify.py DIR [--model M --weights W --master local[2] --threads 1]

The compiled model is pickled into the task's closure; a `cnnc.Model` pickles as the recipe to compile it
again (model text, weights path, options), so each task compiles it once when Spark unpickles the closure,
and the weights file must exist at the same path on every executor (docs/scale-out.md).
"""
import argparse
import os
import sys

import cnnc

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SCHEMA = "path string, classes array<int>, probabilities array<double>"


def image_paths(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def classifier(model, k):
    """The function mapInPandas runs on each partition: pandas frames of paths in, frames of results out."""

    def classify_partition(frames):
        import pandas as pd

        for frame in frames:
            paths = [str(p) for p in frame["path"]]
            top = model.top(cnnc.load_images(paths, model), k) if paths else []
            yield pd.DataFrame({
                "path": paths,
                "classes": [[c for c, _, _ in t] for t in top],
                "probabilities": [[p for _, _, p in t] for t in top],
            })

    return classify_partition


def classify(spark, paths, model, weights=None, *, threads=1, batch_size=16, partitions=2, k=5):
    """Rows of (path, classes, probabilities) for `paths`, computed in `partitions` Spark tasks."""
    compiled = cnnc.compile(model, weights, batch=batch_size, threads=threads)
    df = spark.createDataFrame([(p,) for p in paths], "path string").repartition(partitions)
    rows = df.mapInPandas(classifier(compiled, k), SCHEMA).collect()
    return sorted(((r["path"], list(r["classes"]), list(r["probabilities"])) for r in rows), key=lambda r: r[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--model", default=None, help="model file (default: the bundled AlexBN)")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--threads", type=int, default=1, help="cnnc threads per task")
    ap.add_argument("--partitions", type=int, default=2)
    args = ap.parse_args(argv)
    from pyspark.sql import SparkSession

    paths = image_paths(args.folder)
    if not paths:
        sys.exit(f"error: no .png or .jpg images in {args.folder}")
    spark = SparkSession.builder.master(args.master).appName("cnnc-classify").getOrCreate()
    try:
        for path, classes, probs in classify(spark, paths, args.model, args.weights, threads=args.threads, partitions=args.partitions):
            print(path, " ".join(f"{c}:{p:.4f}" for c, p in zip(classes, probs)))
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
