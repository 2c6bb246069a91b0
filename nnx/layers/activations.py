"""Element-wise activations. Backward multiplies the incoming gradient by f'(x)."""
from __future__ import annotations

from .base import Layer


class ReLU(Layer):
    """max(0, x); f' is 1 where x > 0, else 0 (0 at exactly 0, like PyTorch).

    Training keeps f' as a 0/1 array of x's dtype, so backward is one multiply (cheaper than
    ``where`` with a zeros array on NumPy; docs/architecture.md lists such speed habits).
    ``maximum`` (not x·mask) keeps relu(−inf) = 0 and lets NaN through, as torch does. Its
    second operand is a zeros array of x's shape: NumPy, torch and array-api-strict take a
    slow broadcasting path for ``maximum(x, 0.0)``. Training keeps that
    array between steps (one batch shape); inference makes a temporary one and keeps
    nothing, so evaluating big batches leaves no memory behind.
    """

    _zeros = None

    def forward(self, x, train=False):
        xp = self.xp
        if train:
            self.mask, self.x = xp.astype(x > 0, x.dtype), None
            zeros = self._zeros
            if (zeros is None or zeros.shape != x.shape or zeros.dtype != x.dtype
                    or zeros.device != x.device):
                zeros = self._zeros = xp.zeros_like(x)  # never written to: safe to reuse
        else:  # inference: no mask; x only when asked to retain (gradcheck)
            self.mask, self.x = None, (x if self.retain else None)
            zeros = xp.zeros_like(x)
        return xp.maximum(x, zeros)

    def backward(self, grad, input_grad=True):
        mask = self.mask
        if mask is None:
            mask = self.xp.astype(self.x > 0, grad.dtype)
        return grad * mask


class LeakyReLU(Layer):
    """x for x > 0, else slope·x."""

    def __init__(self, slope: float = 0.01):
        super().__init__()
        self.slope = float(slope)

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
