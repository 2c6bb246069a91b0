"""Sequential: a stack of layers run forward in order and backward in reverse."""
from __future__ import annotations

import math

from .errors import ShapeError
from .flat import FlatStore, supports_views
from .layers import ACTIVATIONS, Dense, Dropout
from .layers.chain import Chain
from .layers.softmax import softmax


class Sequential(Chain):
    """``Sequential(layers, input_shape, backend=..., dtype="float32", seed=0)``: a model.

    A chain of layers (``nnx.layers.chain``) built at once on ``backend`` from one seed (the
    same seed gives the same weights on every backend). ``named_parameters()`` names them
    ``"{index}.{name}"`` — the names a ``torch.nn.Sequential`` of the same layers uses.

    ``flat=True`` (default) keeps all parameters in one array and all gradients in another
    (``self.flat``, a ``nnx.flat.FlatStore``) where the library supports views; otherwise,
    or with ``flat=False``, each parameter is its own array (``self.flat`` is None).
    """

    def __init__(self, layers, input_shape, backend=None, dtype="float32", seed: int = 0,
                 flat: bool = True):
        from .backends import get_backend

        super().__init__(layers)
        backend = backend if backend is not None else get_backend()
        self.seed = int(seed)
        self.input_shape = tuple(int(d) for d in (input_shape if hasattr(input_shape, "__len__")
                                                  else (input_shape,)))
        self.rng = backend.device_rng(self.seed + 1)  # dropout masks
        self.build(backend, backend.dtype(dtype), backend.host_rng(self.seed), self.input_shape)
        self.output_shape = self.shapes[-1] if self.shapes else self.input_shape
        params = self.parameters()
        self.flat = (FlatStore(params, self.xp, backend.device, backend.column_major_matrices)
                     if flat and params and supports_views(self.xp, backend.device) else None)

    # --- the two passes -----------------------------------------------------------------
    def forward(self, x, train: bool = False):
        """Logits for a batch ``x`` of shape (batch, *input_shape)."""
        self.backend.check_array(x, "Sequential.forward")
        if tuple(x.shape[1:]) != self.input_shape:
            first = self.layers[0].name if self.layers else "model"
            raise ShapeError(f"layer {first} (model input): expected (batch, "
                             f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            x = self.xp.astype(x, self.dtype)
        return super().forward(x, train)

    __call__ = forward

    def backward(self, grad, input_grad: bool = True):
        """Back-propagate d loss / d output through every layer; fills each ``Parameter.grad``
        and returns d loss / d input.

        ``input_grad=False`` (what the trainer uses) stops at the first layer with parameters
        and lets it skip its input gradient, returning None: training never needs the
        gradient with respect to the data, and for MNIST's first Dense layer it is a third of
        that layer's backward work.
        """
        return super().backward(grad, input_grad)

    def skip_steps(self, steps: int, batch: int) -> None:
        """Advance the random stream past ``steps`` training steps of ``batch`` rows without
        computing them (``Layer.skip_random`` per step): how a run resumed mid-epoch gets the
        same dropout masks as one that never stopped."""
        for _ in range(int(steps)):
            self.skip_random(batch)

    # --- parameters ---------------------------------------------------------------------
    def parameters(self) -> list:
        return list(self.named_parameters().values())

    def num_parameters(self) -> int:
        return sum(math.prod(p.shape) for p in self.parameters())

    def state_dict(self) -> dict:
        """``{"0.weight": numpy array, ...}`` (parameters and buffers) copied to the host."""
        state = {k: self.backend.to_numpy(p.value) for k, p in self.named_parameters().items()}
        state.update({k: self.backend.to_numpy(b) for k, b in self.named_buffers().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Copy host arrays into parameters and buffers; names and shapes must match exactly."""
        params, buffers = self.named_parameters(), self.named_buffers()
        expected = set(params) | set(buffers)
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise ValueError(f"state does not match the model: missing {missing}, unexpected {extra}")
        state = dict(state)
        for k in sorted(expected):
            current = params[k].value if k in params else buffers[k]
            if tuple(state[k].shape) != tuple(current.shape):
                raise ValueError(f"{k}: checkpoint shape {tuple(state[k].shape)} != model shape "
                                 f"{tuple(current.shape)}")
        for k, p in params.items():
            p.value = self.backend.from_numpy(state[k], dtype=self.dtype)  # copies into flat storage
            p.grad = None
        for k, b in buffers.items():
            self.load_buffer(k, self.backend.from_numpy(state[k], dtype=b.dtype))

    # --- inference ----------------------------------------------------------------------
    def probabilities(self, x):
        """Softmax of the logits for a batch (inference mode)."""
        return softmax(self.xp, self.forward(x, train=False))

    def predict(self, x):
        """Predicted class per row (inference mode)."""
        return self.xp.argmax(self.forward(x, train=False), axis=1)

    # --- description --------------------------------------------------------------------
    def architecture(self) -> list:
        """JSON-able description of the layers (stored in checkpoints)."""
        from .spec import layer_to_spec

        return [layer_to_spec(layer) for layer in self.layers]

    def summary(self) -> str:
        rows = [("#", "layer", "output shape", "params")]
        for i, (layer, shape) in enumerate(zip(self.layers, self.shapes)):
            n = sum(math.prod(p.shape) for p in layer.named_parameters().values())
            rows.append((str(i), layer.describe(), str(("batch", *shape)).replace("'", ""), f"{n:,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        line = lambda r: "  ".join(v.ljust(w) if c < 3 else v.rjust(w)
                                   for c, (v, w) in enumerate(zip(r, widths)))
        out = [line(rows[0]), "-" * (sum(widths) + 6)] + [line(r) for r in rows[1:]]
        out.append(f"total parameters: {self.num_parameters():,}  ({self.backend}, {self.backend.dtype_name(self.dtype)})")
        return "\n".join(out)

    def __repr__(self):
        return f"Sequential({', '.join(l.describe() for l in self.layers)})"


def mlp(sizes=(784, 128, 64, 10), activation="relu", dropout=0.0, **kwargs) -> Sequential:
    """Multi-layer perceptron: Dense → activation (→ Dropout) for each hidden layer.

    ReLU-family nets get He initialisation, tanh/sigmoid nets Xavier.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2:
        raise ValueError("an MLP needs at least an input and an output size")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    init = "he_normal" if "relu" in activation else "xavier_normal"
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Dense(n_in, n_out, init=init))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
            if dropout:
                layers.append(Dropout(dropout))
    return Sequential(layers, input_shape=(sizes[0],), **kwargs)
