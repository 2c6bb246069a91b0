"""Element-wise activations. Backward multiplies the incoming gradient by f'(x)."""
from __future__ import annotations

import math

from .base import Layer


class ReLU(Layer):
    """max(0, x); f' is 1 where x > 0, else 0 (0 at exactly 0, like PyTorch).

    Training keeps the output y (the next layer's input, so no extra memory): y > 0 exactly
    where x > 0 (NaN included), and backward is grad·[y > 0], as torch's ReLU backward reads
    its output. ``maximum`` (not x·mask) keeps relu(−inf) = 0 and lets NaN through, as torch
    does. Its second operand is a zeros array of x's shape: NumPy, torch and array-api-strict
    take a slow broadcasting path for ``maximum(x, 0.0)``. Training keeps that array between
    steps (a smaller last batch uses a slice of it, so the cache never changes shape);
    inference makes a temporary one and keeps nothing, so big evaluation batches leave no
    memory. Both passes are named operations a backend may replace ("relu_forward",
    "relu_backward": backends/overrides.py).
    """

    _zeros = _ops = None

    def forward(self, x, train=False):
        if not train:
            y = self._forward(x, False)
            self.y = y if self.retain else None
            return y
        self.y = self._op("relu_forward", self._train_forward)(x)
        return self.y

    def _train_forward(self, x):
        """max(0, x): the standard path of the "relu_forward" operation."""
        return self._forward(x, True)

    def _forward(self, x, train):
        xp = self.xp
        if train:
            zeros = self._zeros
            if (zeros is None or zeros.shape[1:] != x.shape[1:] or zeros.shape[0] < x.shape[0]
                    or zeros.dtype != x.dtype or zeros.device != x.device):
                zeros = self._zeros = xp.zeros_like(x)  # never written to: safe to reuse
            elif zeros.shape[0] > x.shape[0]:  # an epoch's smaller last batch: a view, and
                zeros = zeros[:x.shape[0], ...]  # the cache stays as the full batches need it
        else:
            zeros = xp.zeros_like(x)
        return xp.maximum(x, zeros)

    def backward(self, grad, input_grad=True):
        y = getattr(self, "y", None)
        if y is None or y.shape != grad.shape:  # (a chain may have run it after its max pool)
            raise RuntimeError(f"layer {self.name or 'ReLU'}: backward needs the gradient of "
                               "the output of this layer's last training forward (or "
                               f"retain=True){'' if y is None else f', shape {tuple(y.shape)}'}; "
                               f"got shape {tuple(grad.shape)}")
        return self._op("relu_backward", self._backward)(grad, y)

    def _backward(self, grad, y):
        """grad · [y > 0]: the standard path of the "relu_backward" operation."""
        return grad * self.xp.astype(y > 0, grad.dtype)

    def _op(self, name, reference):
        """The backend's version of a named operation (backends/overrides.py), bound once."""
        if self.backend is None:  # used without build (tests): the standard path
            return reference
        ops = self._ops
        if ops is None or ops[0] is not self.backend:
            ops = self._ops = (self.backend, {})
        fn = ops[1].get(name)
        if fn is None:
            fn = ops[1][name] = self.backend.op(name, reference)
        return fn


class LeakyReLU(Layer):
    """x for x > 0, else slope·x."""

    def __init__(self, slope: float = 0.01):
        super().__init__()
        self.slope = float(slope)
        if not math.isfinite(self.slope):
            raise ValueError(f"LeakyReLU slope must be a finite number, got {slope!r}")

    def forward(self, x, train=False):
        mask = x > 0
        self.mask = mask if self.keeps(train) else None
        return self.xp.where(mask, x, x * self.slope)

    def backward(self, grad, input_grad=True):
        return self.xp.where(self.mask, grad, grad * self.slope)

    def config(self):
        return {"slope": self.slope}

    def describe(self):
        return f"LeakyReLU({self.slope})"


class Sigmoid(Layer):
    """1 / (1 + e^-x); f' = y(1 - y).

    Written with e = exp(−|x|) ≤ 1 as 1/(1 + e) for x ≥ 0 and e/(1 + e) for x < 0: never
    overflows, and keeps full relative accuracy in both tails (σ(−40) ≈ 4.2e-18, not 0).
    The output is what backward reuses: modify it in place only after backward.
    """

    def forward(self, x, train=False):
        xp = self.xp
        e = xp.exp(-xp.abs(x))
        r = 1.0 / (1.0 + e)
        y = xp.where(x >= 0, r, e * r)
        self.y = y if self.keeps(train) else None
        return y

    def backward(self, grad, input_grad=True):
        return grad * self.y * (1.0 - self.y)


class Tanh(Layer):
    """tanh(x); f' = 1 - y². The output is what backward reuses (see Sigmoid)."""

    def forward(self, x, train=False):
        y = self.xp.tanh(x)
        self.y = y if self.keeps(train) else None
        return y

    def backward(self, grad, input_grad=True):
        return grad * (1.0 - self.y * self.y)


ACTIVATIONS = {"relu": ReLU, "leaky_relu": LeakyReLU, "sigmoid": Sigmoid, "tanh": Tanh}
