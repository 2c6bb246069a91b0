"""Dense (fully connected) layer: y = x Wᵀ + b, weights stored (out, in) like torch.nn.Linear."""
from __future__ import annotations

from .. import init as initializers
from .base import Layer


class Dense(Layer):
    """``Dense(in_features, out_features)``; ``init`` names an initialiser in ``nnx.init``.

    Shapes (row-major batches): x (N, in), W (out, in), b (out,), y (N, out).
    Backward: dW = gᵀ x, db = Σ_rows g, dx = g W (docs/backprop.md derives them).

    ``backward(grad, input_grad=False)`` (a model's first layer in training) skips the dx
    matmul — a third of the layer's backward FLOPs — and returns None, as autograd does for
    inputs that do not require grad.
    """

    def __init__(self, in_features: int, out_features: int, init: str = "he_normal",
                 bias: bool = True):
        super().__init__()
        for v in (in_features, out_features):  # 4.5 must not quietly become 4
            if isinstance(v, bool) or int(v) != v or int(v) <= 0:
                raise ValueError(f"Dense sizes must be positive integers, got "
                                 f"({in_features!r}, {out_features!r})")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.init, self.use_bias = init, bias

    def build(self, backend, dtype, rng, input_shape):
        super().build(backend, dtype, rng, input_shape)
        shape = (self.out_features, self.in_features)
        w = initializers.get(self.init)(rng, shape, self.in_features, self.out_features, dtype)
        self.weight = self.add_param("weight", w)
        if self.use_bias:
            b = self.xp.zeros((self.out_features,), dtype=dtype, device=backend.device)
            self.bias = self.add_param("bias", b)
        return self.output_shape(input_shape)

    def output_shape(self, input_shape):
        if tuple(input_shape) != (self.in_features,):
            from ..errors import ShapeError

            raise ShapeError(f"layer {self.name or 'Dense'}: expects {self.in_features} input "
                             f"features, but the previous layer gives shape {tuple(input_shape)}")
        return (self.out_features,)

    def forward(self, x, train=False):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            self.check_features(x, (self.in_features,))
        self.x = x if self.keeps(train) else None
        return self.backend.affine(x, self.weight.value, self.bias.value if self.use_bias else None)

    def backward(self, grad, input_grad=True):
        x, self.x = getattr(self, "x", None), None  # one backward per forward, like the others
        if x is None:
            raise self.no_forward()
        # written straight into the flat gradient array where the model has one (grad_out)
        w, b = self.weight, self.bias if self.use_bias else None
        w.grad = self.backend.matmul(grad.T, x, out=w.grad_out)
        if b is not None:
            b.grad = self.backend.sum(grad, axis=0, out=b.grad_out)
        if not input_grad:
            return None
        return grad @ self.weight.value

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "init": self.init, "bias": self.use_bias}

    def describe(self):
        return f"Dense({self.in_features}, {self.out_features})"
