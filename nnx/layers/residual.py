"""Residual block: y = x + f(x), with f a short sequence of layers (a skip connection).

Backward: dL/dx = g + f'(x)ᵀ g — the upstream gradient flows through the identity path
unchanged and through f, and the two are added (docs/cnn.md).
"""
from __future__ import annotations

from ..errors import ShapeError
from .base import Layer, build_stack


class Residual(Layer):
    """``Residual(layers)``: runs ``layers`` in order as f and returns x + f(x).

    f must give back its input shape (checked at build: ShapeError otherwise). Parameters
    and buffers of the inner layers are named ``fn.{j}.{name}`` (so a model's state_dict has
    e.g. ``"2.fn.0.weight"``); ``config()`` stores the inner layers as specs, so checkpoints
    rebuild the block. ``layers`` may also be such specs (dicts).
    """

    rng = None  # the model's device random stream, set by Sequential and passed to children

    def __init__(self, layers):
        super().__init__()
        from ..spec import layer_from_spec

        layers = list(layers)
        if not layers:
            raise ValueError("Residual needs at least one layer")
        self.layers = [layer_from_spec(l) if isinstance(l, dict) else l for l in layers]
        for j, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Residual layer {j} is a {type(layer).__name__}, not an nnx Layer")

    # --- life cycle ---------------------------------------------------------------------
    def build(self, backend, dtype, rng, input_shape):
        super().build(backend, dtype, rng, input_shape)
        self.in_shape = tuple(input_shape)
        shapes = build_stack(self.layers, backend, dtype, rng, self.rng, self.in_shape,
                             prefix=f"{self.name}.fn.")
        shape = shapes[-1] if shapes else self.in_shape
        if shape != self.in_shape:
            raise ShapeError(f"layer {self.name or 'Residual'}: the residual branch maps shape "
                             f"{self.in_shape} to {shape}; it must keep the input shape so "
                             "x + f(x) is defined")
        return self.in_shape

    # --- passes -------------------------------------------------------------------------
    def forward(self, x, train=False):
        if tuple(x.shape[1:]) != self.in_shape:
            self.check_features(x, self.in_shape)
        y = x
        for layer in self.layers:
            y = layer.forward(y, train)
        return x + y

    def skip_random(self, batch):
        for layer in self.layers:
            layer.skip_random(batch)

    def backward(self, grad):
        g = grad
        for layer in reversed(self.layers):
            g = layer.backward(g)
        return grad + g

    # --- parameters and buffers ---------------------------------------------------------
    def named_parameters(self) -> dict:
        return {f"fn.{j}.{name}": p for j, layer in enumerate(self.layers)
                for name, p in layer.named_parameters().items()}

    def named_buffers(self) -> dict:
        return {f"fn.{j}.{name}": b for j, layer in enumerate(self.layers)
                for name, b in layer.named_buffers().items()}

    def load_buffer(self, name: str, value) -> None:
        head, j, rest = (name.split(".", 2) + ["", ""])[:3]
        if head != "fn" or not j.isdigit() or int(j) >= len(self.layers) or not rest:
            raise KeyError(f"layer {self.name or 'Residual'}: no buffer named {name!r}")
        self.layers[int(j)].load_buffer(rest, value)

    # --- description --------------------------------------------------------------------
    def config(self):
        from ..spec import layer_to_spec

        return {"layers": [layer_to_spec(layer) for layer in self.layers]}

    def describe(self):
        return f"Residual({', '.join(layer.describe() for layer in self.layers)})"
