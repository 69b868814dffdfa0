"""cnnc: a compiler for CNNs written the way Chainer users write them, run from Python.

    import cnnc
    model = cnnc.compile("models/digits.model", "models/digits.npz")
    x = cnnc.load_images(["models/examples/digit-7.png"], model)
    print(model.top(x, 3))          # [[(7, None, 0.999...), ...]]
    logits = model(x)               # numpy array (1, 10)

`compile` reads, optimizes and compiles a model once; the compiled `Model` runs float32 NCHW numpy arrays
with the GIL released, from any number of Python threads, and pickles as the recipe to compile it again
(so Ray and Spark can ship it to their workers: see docs/scale-out.md). Errors are `cnnc.Error`s carrying
the messages the `cnnc` command line prints.
"""
from ._cnnc import (
    Error,
    InputError,
    Model,
    ModelError,
    RunError,
    WeightsError,
    __version__,
    compile,
    load_images,
)

__all__ = ["compile", "load_images", "Model", "Error", "ModelError", "WeightsError", "InputError", "RunError", "__version__"]


def _rebuild(model, weights, kwargs):
    """Unpickles a Model: compiles it again from the model text (or ONNX path), weights path and options."""
    return compile(model, weights, **kwargs)
