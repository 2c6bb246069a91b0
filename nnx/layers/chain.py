"""Chain: layers run forward in order and backward in reverse — the one composition
mechanism. ``Sequential`` (a model) and ``Residual`` (y = x + f(x)) are chains (Thinc builds
``chain`` and ``residual`` from one idea the same way)."""
from __future__ import annotations

from .base import Layer


class Chain(Layer):
    """``Chain(layers)``: y = fₙ(…f₂(f₁(x))).

    Children's parameters and buffers are named ``f"{prefix}{i}.{name}"`` (``prefix`` is ""
    for a model, "fn." in a residual block), as ``torch.nn.Sequential`` names them. The
    chain hands the model's device random stream (``rng``) to children that declare one.
    """

    prefix = ""
    rng = None  # the model's device random stream, passed on to children at build

    def __init__(self, layers):
        super().__init__()
        self.layers = list(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {i} is a {type(layer).__name__}, not an nnx Layer")

    # --- life cycle ---------------------------------------------------------------------
    def build(self, backend, dtype, rng, input_shape):
        """Build every child in turn; ``self.shapes`` holds the output shape after each."""
        super().build(backend, dtype, rng, input_shape)
        self.in_shape = shape = tuple(input_shape)
        here = f"{self.name}.{self.prefix}" if self.name else ""
        self.shapes = []
        for i, layer in enumerate(self.layers):
            if layer.backend is not None:
                raise ValueError(f"layer {here}{i} ({layer.describe()}) already belongs to a "
                                 "model; create a fresh layer for each model")
            layer.name = f"{here}{i}:{type(layer).__name__}"
            if hasattr(layer, "rng"):
                layer.rng = self.rng
            shape = tuple(layer.build(backend, dtype, rng, shape))
            self.shapes.append(shape)
        #: backward with input_grad=False stops here: nothing below has parameters
        self.first_trainable = next((i for i, layer in enumerate(self.layers)
                                     if layer.named_parameters()), len(self.layers))
        return shape

    # --- the two passes -----------------------------------------------------------------
    def forward(self, x, train=False):
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, grad, input_grad=True):
        """Through every child in reverse. With ``input_grad`` False the walk stops at the
        first child with parameters, which is told to skip its own input gradient."""
        stop = 0 if input_grad else self.first_trainable
        for i in range(len(self.layers) - 1, stop - 1, -1):
            grad = self.layers[i].backward(grad, input_grad or i > stop)
        return grad if input_grad else None

    def skip_random(self, batch):
        for layer in self.layers:
            layer.skip_random(batch)

    def walk(self):
        yield self
        for layer in self.layers:
            yield from layer.walk()

    # --- parameters and buffers ---------------------------------------------------------
    def named_parameters(self) -> dict:
        return {f"{self.prefix}{i}.{name}": p for i, layer in enumerate(self.layers)
                for name, p in layer.named_parameters().items()}

    def named_buffers(self) -> dict:
        return {f"{self.prefix}{i}.{name}": b for i, layer in enumerate(self.layers)
                for name, b in layer.named_buffers().items()}

    def load_buffer(self, name: str, value) -> None:
        rest = name[len(self.prefix):] if name.startswith(self.prefix) else None
        index, _, inner = (rest or "").partition(".")
        if not index.isdigit() or int(index) >= len(self.layers) or not inner:
            raise KeyError(f"layer {self.name or type(self).__name__}: no buffer named {name!r}")
        self.layers[int(index)].load_buffer(inner, value)

    def describe(self):
        return f"{type(self).__name__}({', '.join(layer.describe() for layer in self.layers)})"
