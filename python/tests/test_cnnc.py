"""The Python package: the trained digits model on every backend, agreement with the CLI, pickling,
threads, fork safety, and every kind of bad argument as a Python exception."""
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

import cnnc
from conftest import MEAN, MODEL, ROOT, WEIGHTS, cli_top, write_png

# Every backend and tier, skipped where this machine lacks it (no AVX2 or AVX-512, no CUDA driver).
BACKENDS = [("jit", "portable"), ("jit", "avx2"), ("jit", "avx512"), ("reference", "auto"), ("cuda", "auto")]


def compiled_or_skip(backend, tier, **kw):
    try:
        return cnnc.compile(MODEL, WEIGHTS, backend=backend, tier=tier, batch=kw.pop("batch", 64), **kw)
    except cnnc.RunError as e:
        if "does not have" in str(e) or "CUDA" in str(e):
            pytest.skip(f"{backend}/{tier} is not available here: {e}")
        raise


@pytest.mark.parametrize("backend,tier", BACKENDS)
def test_held_out_accuracy_through_python_and_the_cli(backend, tier, held_out, cli, tmp_path):
    x, y, reported = held_out
    model = compiled_or_skip(backend, tier)
    logits = model(x)
    assert logits.shape == (len(x), 10) and logits.dtype == np.float32
    # Predictions may differ from training's only where two classes tie within rounding.
    floor = (reported["correct"] - 1) / reported["n"]
    assert (logits.argmax(1) == y).mean() >= floor
    chainer = np.load(os.path.join(ROOT, "tests", "fixtures", "digits", "logits_chainer.npy"))
    np.testing.assert_allclose(logits, chainer, rtol=0, atol=1e-4)

    out = tmp_path / "logits.npy"
    subprocess.run([cli, "run", MODEL, "--weights", WEIGHTS, "--backend", backend, "--tier", tier, "--input", os.path.join(ROOT, "tests", "fixtures", "digits", "x_test.npy"), "--output", str(out)], check=True, capture_output=True)
    cli_logits = np.load(out)
    assert (cli_logits.argmax(1) == y).mean() >= floor
    np.testing.assert_allclose(logits, cli_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("digit", range(10))
def test_example_images_are_recognised(digit):
    model = cnnc.compile(MODEL, WEIGHTS)
    x = cnnc.load_images([os.path.join(ROOT, "models", "examples", f"digit-{digit}.png")], model)
    [[(cls, name, prob), *_]] = model.top(x, 3)
    assert (cls, name) == (digit, None) and prob > 0.9


def test_load_images_applies_the_documented_preprocessing(digit_pngs, held_out):
    _, paths, _ = digit_pngs
    x = cnnc.load_images(paths[:5], (1, 8, 8))
    assert x.shape == (5, 1, 8, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(x, held_out[0][:5])
    # One path alone, an os.PathLike, and the model as the shape.
    import pathlib

    one = cnnc.load_images(pathlib.Path(paths[0]), cnnc.compile(MODEL, WEIGHTS))
    np.testing.assert_array_equal(one, held_out[0][:1])
    # Explicit preprocessing: resize 16 then the center crop, mean 0, scale 1.
    big = cnnc.load_images(paths[:1], (1, 8, 8), resize=16, mean=(0, 0, 0), scale=1.0)
    assert big.min() >= 0 and big.max() <= 255


def test_top_agrees_with_the_cli(digit_pngs, cli):
    _, paths, labels = digit_pngs
    model = cnnc.compile(MODEL, WEIGHTS)
    got = [(p, [c for c, _, _ in t], [pr for _, _, pr in t]) for p, t in zip(paths, model.top(cnnc.load_images(paths, model), 5))]
    from conftest import assert_same_top

    assert_same_top(got, cli_top(cli, paths))
    assert np.mean([g[1][0] == l for g, l in zip(got, labels)]) >= 0.95


def test_a_model_pickles_as_its_recipe(held_out, tmp_path):
    x = held_out[0][:50]
    for model in [cnnc.compile(MODEL, WEIGHTS, batch=8, threads=1), cnnc.compile(open(MODEL, "rb").read(), WEIGHTS, name="digits.model")]:
        again = pickle.loads(pickle.dumps(model))
        assert (again.name, again.input_shape, again.output_shape, again.threads) == (model.name, model.input_shape, model.output_shape, model.threads)
        np.testing.assert_array_equal(again(x), model(x))
    # The model text travels with the pickle: the file is not needed where it is unpickled.
    copy = tmp_path / "copy.model"
    copy.write_bytes(open(MODEL, "rb").read())
    blob = pickle.dumps(cnnc.compile(str(copy), WEIGHTS))
    copy.unlink()
    np.testing.assert_array_equal(pickle.loads(blob)(x), cnnc.compile(MODEL, WEIGHTS)(x))


def test_any_batch_size_runs_in_chunks_of_the_compiled_one(held_out):
    x = held_out[0][:10]
    # One algorithm for both batch sizes (Winograd's cost model may choose differently for 10 and 4, which
    # agree only to rounding): chunks of the compiled batch then give the whole batch's bytes.
    want = cnnc.compile(MODEL, WEIGHTS, batch=10, winograd="never")(x)
    small = cnnc.compile(MODEL, WEIGHTS, batch=4, winograd="never")
    assert small.batch == 4
    np.testing.assert_array_equal(small(x), want)
    np.testing.assert_array_equal(small(x[3]), want[3:4])  # one sample without the batch axis
    lazy = cnnc.compile(MODEL, WEIGHTS)
    assert lazy.batch is None
    lazy(x[:3])
    assert lazy.batch == 3


def test_read_only_and_strided_arrays_are_accepted(held_out):
    x = held_out[0][:8]
    model = cnnc.compile(MODEL, WEIGHTS, batch=8)
    want = model(x)
    ro = x.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(model(ro), want)
    strided = np.ascontiguousarray(x[:, :, ::-1, :])[:, :, ::-1, :]  # a negative-stride view of x
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(model(strided), want)


def test_one_model_serves_several_python_threads(held_out):
    x = held_out[0][:64]
    model = cnnc.compile(MODEL, WEIGHTS, batch=16, threads=2)
    want = model(x)
    results, errors = [None] * 6, []

    def work(i):
        try:
            results[i] = model(x[i:] if i % 2 else x)
        except Exception as e:  # reported below; a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r, want[i:] if i % 2 else want)


def test_the_gil_is_released_while_a_model_runs(held_out):
    x = np.repeat(held_out[0], 20, axis=0)  # 9,000 samples: long enough to be seen
    model = cnnc.compile(MODEL, WEIGHTS, batch=256)
    model(x[:1])
    count, stop = [0], threading.Event()

    def counter():
        while not stop.is_set():
            count[0] += 1
            if count[0] % 1000 == 0:
                import time

                time.sleep(0)

    old = sys.getswitchinterval()
    sys.setswitchinterval(30)  # the counter runs only when the main thread gives the GIL up itself
    try:
        t = threading.Thread(target=counter)
        t.start()
        before = count[0]
        model(x)
        during = count[0] - before
        stop.set()
        t.join()
    finally:
        sys.setswitchinterval(old)
    assert during > 0, "another Python thread made no progress while the model ran: the GIL was held"


def run_python(code):
    # numpy's OpenBLAS keeps a thread pool of its own (stopped at fork): without it, every thread counted is cnnc's.
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_no_thread_starts_before_the_first_run_and_fork_is_safe_before_and_after_it():
    code = f"""
import os, numpy as np
def threads(): return int([l for l in open('/proc/self/status') if l.startswith('Threads:')][0].split()[1])
import cnnc
t0 = threads()
m = cnnc.compile({MODEL!r}, {WEIGHTS!r}, batch=4, threads=2)
assert threads() == t0, ('compile started threads', t0, threads())
x = np.load({os.path.join(ROOT, 'tests', 'fixtures', 'digits', 'x_test.npy')!r})[:4]
def child_runs():
    pid = os.fork()
    if pid == 0:
        os._exit(0 if m(x).shape == (4, 10) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
child_runs()
m(x)
print('threads after the first run:', threads() - t0)
# A child of a process that has run the model runs it too (its own workers; the parent's stay put).
child_runs()
m(x)
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "threads after the first run: 1" in r.stdout, r.stdout  # the one worker beside the caller


def test_random_weights_warn(held_out):
    text = b"model Tiny { c = L.Convolution2D(1, 2, 3)\n forward(x: [1, 8, 8]) { return self.c(x) } }"
    with pytest.warns(UserWarning, match="meaningless"):
        m = cnnc.compile(text)
    assert m(held_out[0][:2]).shape == (2, 2, 6, 6)


def test_properties_and_repr():
    m = cnnc.compile(MODEL, WEIGHTS, batch=2, threads=1)
    assert (m.name, m.input_shape, m.output_shape, m.batch, m.threads, m.backend) == ("Digits", (1, 8, 8), (10,), 2, 1, "jit")
    assert repr(m) == '<cnnc.Model Digits input (1, 8, 8) output (10,) backend="jit" batch=2 threads=1>'
    assert "Compiles a model" in cnnc.compile.__doc__ and "preprocessed" in cnnc.load_images.__doc__


def test_errors_are_exceptions_with_the_clis_messages(tmp_path):
    bad_text = b"model M {\n  forward(x: [1, 8, 8]) { return F.relu(y) }\n}\n"
    wrong_weights = b"model M {\n  conv1 = L.Convolution2D(1, 7, 3)\n  forward(x: [1, 8, 8]) { return self.conv1(x) }\n}\n"
    cases = [
        (lambda: cnnc.compile("/nonexistent/m.model"), cnnc.ModelError, "cannot read model `/nonexistent/m.model`"),
        (lambda: cnnc.compile(bad_text, name="bad.model"), cnnc.ModelError, "unknown name `y`"),
        (lambda: cnnc.compile(b"\xff\xfe"), cnnc.ModelError, "not UTF-8"),
        (lambda: cnnc.compile(MODEL, "/nonexistent/w.npz"), cnnc.WeightsError, "cannot read weights file"),
        (lambda: cnnc.compile(MODEL, MODEL), cnnc.WeightsError, "neither a Chainer .npz"),
        (lambda: cnnc.compile(wrong_weights, WEIGHTS), cnnc.WeightsError, "conv1/W"),
        (lambda: cnnc.compile(MODEL, WEIGHTS, backend="gpu"), ValueError, "'jit', 'reference', 'cuda'"),
        (lambda: cnnc.compile(MODEL, WEIGHTS, tier="sse"), ValueError, "tier="),
        (lambda: cnnc.compile(MODEL, WEIGHTS, batch=0), ValueError, "batch=0"),
        (lambda: cnnc.compile(MODEL, WEIGHTS, threads=0), ValueError, "threads=0"),
        (lambda: cnnc.compile(MODEL, WEIGHTS, opt=2), ValueError, "opt=2"),
        (lambda: cnnc.compile(MODEL, WEIGHTS, backend="reference", weights_dtype="bf16"), cnnc.RunError, "needs a compiled backend"),
        (lambda: cnnc.compile(123), TypeError, "os.PathLike"),
        (lambda: cnnc.load_images(["/nonexistent.png"], (1, 8, 8)), cnnc.InputError, "cannot read input `/nonexistent.png`"),
        (lambda: cnnc.load_images([MODEL], (1, 8, 8)), cnnc.InputError, "not a readable image"),
        (lambda: cnnc.load_images([os.path.join(ROOT, "models", "examples", "digit-1.png")], (2, 8, 8)), cnnc.InputError, "[3, H, W] or [1, H, W]"),
        (lambda: cnnc.load_images([], (1, 8, 8)), ValueError, "no paths"),
        (lambda: cnnc.load_images(["a.png"], "square"), TypeError, "(C, H, W)"),
        (lambda: cnnc.load_images(["a.png"], (1, 8, 8), mean=(float("nan"), 0, 0)), ValueError, "finite"),
        (lambda: cnnc.load_images(["a.png"], (1, 8, 8), resize=0), ValueError, "resize=0"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind) as e:
            call()
        assert words in str(e.value), (words, str(e.value))
    assert issubclass(cnnc.ModelError, cnnc.Error) and issubclass(cnnc.Error, Exception)


def test_bad_arrays_are_exceptions(held_out):
    m = cnnc.compile(MODEL, WEIGHTS, batch=2)
    x = held_out[0][:2]
    nan = x.copy()
    nan[1, 0, 3, 3] = np.nan
    cases = [
        (x.astype(np.float64), TypeError, "dtype float64"),
        (x.tolist(), TypeError, "a list"),
        (x[:, :, :4], cnnc.InputError, "has shape [2, 1, 4, 8]"),
        (x[:0], cnnc.InputError, "has shape [0, 1, 8, 8]"),
        (x[0, 0], cnnc.InputError, "takes (N, 1, 8, 8)"),
        (nan, cnnc.InputError, "non-finite"),
    ]
    for arr, kind, words in cases:
        with pytest.raises(kind) as e:
            m(arr)
        assert words in str(e.value), (words, str(e.value))
    with pytest.raises(ValueError, match="k=0"):
        m.top(x, 0)
