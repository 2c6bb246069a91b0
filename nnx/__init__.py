"""nnx: neural networks written by hand against the Python Array API.

The same forward and backward passes run on NumPy, CuPy, PyTorch and array-api-strict;
``nnx.backends.get_backend`` picks the library and device.
"""
__version__ = "0.1.0"

from . import init, layers
from .backends import Backend, BackendError, BackendMismatchError, get_backend
from .errors import ShapeError
from .gradcheck import gradcheck
from .layers import (AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool,
                     LeakyReLU, MaxPool2D, ReLU, Reshape, Residual, Sigmoid, Softmax, Tanh)
from .checkpoint import load, save
from .losses import MSE, SoftmaxCrossEntropy
from .model import Sequential, mlp

_LAZY = ("plots", "evaluate", "predict", "imageprep")  # matplotlib/Pillow load only when used


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'nnx' has no attribute {name!r}")


__all__ = [*_LAZY, "__version__", "get_backend", "Backend", "BackendError", "BackendMismatchError",
           "ShapeError", "gradcheck", "Sequential", "mlp", "Dense", "ReLU", "LeakyReLU", "Sigmoid",
           "Tanh", "Dropout", "Flatten", "Reshape", "Softmax", "SoftmaxCrossEntropy", "MSE",
           "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool", "BatchNorm", "Residual", "load", "save",
           "init", "layers"]
