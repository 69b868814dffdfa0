"""The scale-out recipes run for real: Ray Data with a local cluster and Spark with local[2], on 32
held-out digits, each giving the CLI's top-5 for every image."""
import os
import sys

import pytest

from conftest import MODEL, ROOT, WEIGHTS, assert_same_top, cli_top

sys.path.insert(0, os.path.join(ROOT, "examples"))


def test_ray_data_matches_the_cli(digit_pngs, cli):
    ray = pytest.importorskip("ray")
    import ray_classify

    folder, paths, _ = digit_pngs
    assert ray_classify.image_paths(folder) == sorted(paths)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        got = ray_classify.classify(paths, MODEL, WEIGHTS, workers=2, threads=1, batch_size=8)
    finally:
        ray.shutdown()
    assert_same_top(got, cli_top(cli, paths))


def test_spark_matches_the_cli(digit_pngs, cli):
    pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession

    import spark_classify

    _, paths, _ = digit_pngs
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = SparkSession.builder.master("local[2]").appName("cnnc-test").config("spark.ui.enabled", "false").getOrCreate()
    try:
        got = spark_classify.classify(spark, paths, MODEL, WEIGHTS, threads=1, batch_size=8, partitions=2)
    finally:
        spark.stop()
    assert_same_top(got, cli_top(cli, paths))
