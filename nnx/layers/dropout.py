"""Inverted dropout: zero a fraction ``p`` of activations in training and scale the rest by
1/(1-p), so evaluation is the identity and needs no rescaling."""
from __future__ import annotations

from .base import Layer


class Dropout(Layer):
    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = None  # the model's device random stream, set by Sequential

    def build(self, backend, dtype, rng, input_shape):
        self.in_shape = tuple(input_shape)
        return super().build(backend, dtype, rng, input_shape)

    def forward(self, x, train=False):
        if not train or self.p == 0.0:
            self.scale_mask = None
            return x
        keep = 1.0 - self.p
        self.scale_mask = self.rng.bernoulli(tuple(x.shape), keep, dtype=x.dtype) * (1.0 / keep)
        return x * self.scale_mask

    def skip_random(self, batch):
        if self.p:  # the very draw forward makes (same shape, probability and dtype)
            self.rng.bernoulli((int(batch), *self.in_shape), 1.0 - self.p, dtype=self.dtype)

    def backward(self, grad, input_grad=True):
        return grad if self.scale_mask is None else grad * self.scale_mask

    def config(self):
        return {"p": self.p}

    def describe(self):
        return f"Dropout({self.p})"
