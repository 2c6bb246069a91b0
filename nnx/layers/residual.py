"""Residual block: y = x + f(x), with f a chain of layers (a skip connection).

Backward: dL/dx = g + f'(x)ᵀ g — the upstream gradient flows through the identity path
unchanged and through f, and the two are added (docs/cnn.md).
"""
from __future__ import annotations

from ..errors import ShapeError
from .chain import Chain


class Residual(Chain):
    """``Residual(layers)``: runs ``layers`` in order as f and returns x + f(x).

    f must give back its input shape (checked at build: ShapeError otherwise). Inner
    parameters and buffers are named ``fn.{j}.{name}`` (a model's state_dict has e.g.
    ``"2.fn.0.weight"``); ``config()`` stores the inner layers as specs (``nnx.spec``
    rebuilds them), so checkpoints rebuild the block.
    """

    prefix = "fn."

    def __init__(self, layers):
        super().__init__(layers)
        if not self.layers:
            raise ValueError("Residual needs at least one layer")

    def build(self, backend, dtype, rng, input_shape):
        shape = super().build(backend, dtype, rng, input_shape)
        if shape != self.in_shape:
            raise ShapeError(f"layer {self.name or 'Residual'}: the residual branch maps shape "
                             f"{self.in_shape} to {shape}; it must keep the input shape so "
                             "x + f(x) is defined")
        return shape

    def forward(self, x, train=False):
        if tuple(x.shape[1:]) != self.in_shape:
            self.check_features(x, self.in_shape)
        return x + super().forward(x, train)

    def backward(self, grad, input_grad=True):
        g = super().backward(grad, input_grad)
        return grad + g if input_grad else None

    def config(self):
        return {"layers": [{"type": type(layer).__name__, **layer.config()}
                           for layer in self.layers]}
