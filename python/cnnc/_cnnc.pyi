import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

PathLike = Union[str, "os.PathLike[str]"]

class Error(Exception):
    """Base class of every error cnnc reports; the message is the CLI's."""

class ModelError(Error):
    """The model cannot be read or does not compile (the message carries the diagnostics)."""

class WeightsError(Error):
    """The weights file cannot be read or does not fit the model."""

class InputError(Error):
    """An input array or image is unusable for this model."""

class RunError(Error):
    """The backend could not compile or run the model."""

class Model:
    """A compiled model: call it (or `run`) on a float32 NCHW array; `top` ranks classes."""

    @property
    def name(self) -> str: ...
    @property
    def input_shape(self) -> Tuple[int, ...]: ...
    @property
    def output_shape(self) -> Tuple[int, ...]: ...
    @property
    def batch(self) -> Optional[int]: ...
    @property
    def threads(self) -> int: ...
    @property
    def backend(self) -> str: ...
    def run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Outputs (N, ...) for x of shape (N, C, H, W) or (C, H, W); the GIL is released while it runs."""
    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...
    def top(self, x: npt.NDArray[np.float32], k: int = 5) -> List[List[Tuple[int, Optional[str], float]]]:
        """Per sample, the k best (class index, name or None, probability), best first."""

def compile(
    model: Union[PathLike, bytes, None] = None,
    weights: Optional[PathLike] = None,
    *,
    batch: Optional[int] = None,
    threads: Optional[int] = None,
    backend: str = "jit",
    opt: int = 1,
    tier: str = "auto",
    winograd: str = "auto",
    weights_dtype: str = "f32",
    name: Optional[str] = None,
) -> Model:
    """Compiles a model (.model or .onnx path, model text as bytes, or None for the bundled AlexBN)."""

def load_images(
    paths: Union[PathLike, Sequence[PathLike]],
    shape: Union[Model, Tuple[int, int, int]],
    *,
    resize: Optional[int] = None,
    mean: Optional[Tuple[float, float, float]] = None,
    scale: Optional[float] = None,
) -> npt.NDArray[np.float32]:
    """Images or .npy files as one float32 batch (N, C, H, W), preprocessed as `cnnc run` does."""
