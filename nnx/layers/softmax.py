"""Softmax as a standalone layer (for models that output probabilities).

Training normally uses ``SoftmaxCrossEntropy`` on logits instead: fused, it is stabler and
its gradient is simply ŷ − y. This layer's backward is the full Jacobian-vector product
dx = s ⊙ (g − Σ_j g_j s_j), row by row.
"""
from __future__ import annotations

from .base import Layer


def softmax(xp, z):
    """Row-wise softmax; subtracting the row max keeps exp from overflowing."""
    e = xp.exp(z - xp.max(z, axis=1, keepdims=True))
    return e / xp.sum(e, axis=1, keepdims=True)


def log_softmax(xp, z):
    """Row-wise log-softmax: z − max − log Σ exp(z − max)."""
    shifted = z - xp.max(z, axis=1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))


class Softmax(Layer):
    def forward(self, x, train=False):
        s = softmax(self.xp, x)
        self.s = s if self.keeps(train) else None  # backward reuses the output itself
        return s

    def backward(self, grad, input_grad=True):
        s = self.s
        return s * (grad - self.xp.sum(grad * s, axis=1, keepdims=True))
