"""Layers that only change shape: Flatten (N, ...) → (N, prod) and Reshape."""
from __future__ import annotations

import math

from ..errors import ShapeError
from .base import Layer


class Reshape(Layer):
    """Reshape the features of each sample to ``shape`` (the batch axis is kept)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(int(d) for d in shape)

    def output_shape(self, input_shape):
        if math.prod(input_shape) != math.prod(self.shape):
            raise ShapeError(f"layer {self.name or type(self).__name__}: cannot reshape "
                             f"{tuple(input_shape)} to {self.shape}")
        return self.shape

    def build(self, backend, dtype, rng, input_shape):
        self.in_shape = tuple(input_shape)
        return super().build(backend, dtype, rng, input_shape)

    def forward(self, x, train=False):
        if tuple(x.shape[1:]) != self.in_shape:
            self.check_features(x, self.in_shape)
        return self.xp.reshape(x, (x.shape[0], *self.shape))

    def backward(self, grad, input_grad=True):
        return self.xp.reshape(grad, (grad.shape[0], *self.in_shape))

    def config(self):
        return {"shape": list(self.shape)}

    def describe(self):
        return f"Reshape({self.shape})"


class Flatten(Reshape):
    """(N, d1, d2, ...) → (N, d1·d2·...), e.g. 28x28 images to 784 features."""

    def __init__(self):
        super().__init__(())

    def output_shape(self, input_shape):
        self.shape = (math.prod(input_shape),)
        return self.shape

    def config(self):
        return {}

    def describe(self):
        return "Flatten()"
