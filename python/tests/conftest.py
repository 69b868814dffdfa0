"""Shared fixtures: the repository's paths, the CLI binary, and held-out digits written as PNG files."""
import json
import os
import struct
import subprocess
import zlib

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "tests", "fixtures", "digits")
MODEL = os.path.join(ROOT, "models", "digits.model")
WEIGHTS = os.path.join(ROOT, "models", "digits.npz")
MEAN = (123.68 + 116.78 + 103.94) / 3  # cnnc's default mean for a one-channel model


def write_png(path, pixels):
    """An 8-bit greyscale PNG (no Pillow needed)."""
    h, w = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def cli():
    """The `cnnc` binary built by `cargo test --release` (CNNC_BIN overrides)."""
    path = os.environ.get("CNNC_BIN", os.path.join(ROOT, "target", "release", "cnnc"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"no cnnc binary at {path}: build it with `cargo build --release` or set CNNC_BIN")
    return path


@pytest.fixture(scope="session")
def held_out():
    """The held-out split (inputs as cnnc preprocesses them, labels) and the accuracy training reported."""
    with open(os.path.join(DIGITS, "accuracy.json")) as f:
        reported = json.load(f)
    return np.load(os.path.join(DIGITS, "x_test.npy")), np.load(os.path.join(DIGITS, "y_test.npy")), reported


@pytest.fixture(scope="session")
def digit_pngs(tmp_path_factory, held_out):
    """The first 32 held-out digits as PNG files, and their labels."""
    x, y, _ = held_out
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for i in range(32):
        pixels = np.round(x[i, 0] * 255.0 + MEAN)
        path = str(folder / f"digit-{i:02}.png")
        write_png(path, pixels)
        paths.append(path)
    return str(folder), paths, y[:32]


def cli_top(cli, paths, k=5):
    """`cnnc run --json` on the digits model: {path: [(class, probability)]}."""
    out = subprocess.run([cli, "run", MODEL, "--weights", WEIGHTS, "--top", str(k), "--json", "--input", *paths], capture_output=True, text=True, check=True)
    return {r["input"]: [(t["class"], t["probability"]) for t in r["top"]] for r in json.loads(out.stdout)["results"]}


def assert_same_top(got, want):
    """Rows of (path, classes, probabilities) agree with the CLI's: same classes, probabilities within 1e-5."""
    assert sorted(p for p, _, _ in got) == sorted(want), "the pipeline did not return every path exactly once"
    for path, classes, probs in got:
        assert list(classes) == [c for c, _ in want[path]], path
        np.testing.assert_allclose(probs, [p for _, p in want[path]], rtol=0, atol=1e-5, err_msg=path)
