"""Chain: layers run forward in order and backward in reverse — the one composition
mechanism. ``Sequential`` (a model) and ``Residual`` (y = x + f(x)) are chains (Thinc builds
``chain`` and ``residual`` from one idea the same way)."""
from __future__ import annotations

from .base import Layer


def run_order(layers) -> list[int]:
    """The order a chain runs its layers in: theirs, except that a ReLU directly followed
    by a MaxPool2D whose windows do not overlap (stride ≥ kernel) runs after it. max over a
    window of max(0, ·) = max(0, max over the window), so on finite inputs the output is the
    same number for number, and so is every gradient: where the window's maximum is > 0,
    both orders route the gradient to its first maximum; where it is ≤ 0, ReLU's derivative
    0 stops it in both. The ReLU then works on the pooled map, about k² times smaller
    (docs/cnn.md, "ReLU after max pool", also says what differs for NaN). Nothing else is
    reordered."""
    from .activations import ReLU
    from .pool import MaxPool2D

    order, i = [], 0
    while i < len(layers):
        if (i + 1 < len(layers) and type(layers[i]) is ReLU
                and type(layers[i + 1]) is MaxPool2D
                and layers[i + 1].stride >= layers[i + 1].kernel_size):
            order += [i + 1, i]
            i += 2
        else:
            order.append(i)
            i += 1
    return order


def pooled_pairs(layers, order) -> dict:
    """{i: j} for each BatchNorm i directly followed, in ``order``, by a MaxPool2D j: in
    training the two may run as one "batchnorm_maxpool" pair, which a backend can compute by
    pooling first (docs/cnn.md, "Batch norm after max pool")."""
    from .batchnorm import BatchNorm
    from .pool import MaxPool2D

    return {i: j for i, j in zip(order, list(order)[1:])
            if type(layers[i]) is BatchNorm and type(layers[j]) is MaxPool2D}


def conv_blocks(layers, order, pooled=None) -> dict:
    """{i: (j, l)} for each Conv2D i directly followed, in ``order``, by a BatchNorm j and a
    MaxPool2D l: in training the three may run as one "conv_batchnorm_maxpool" pair, which
    a backend can compute with the convolution's output laid out window by window
    (docs/cnn.md, "Convolution, batch norm and max pool"). ``pooled``: ``pooled_pairs``
    of the same layers and order, where the caller has it already."""
    from .conv import Conv2D

    pooled = pooled_pairs(layers, order) if pooled is None else pooled
    return {i: (j, pooled[j]) for i, j in zip(order, list(order)[1:])
            if type(layers[i]) is Conv2D and j in pooled}


class Chain(Layer):
    """``Chain(layers)``: y = fₙ(…f₂(f₁(x))).

    Children's parameters and buffers are named ``f"{prefix}{i}.{name}"`` (``prefix`` is ""
    for a model, "fn." in a residual block), as ``torch.nn.Sequential`` names them. The
    chain hands the model's device random stream (``rng``) to children that declare one.
    """

    prefix = ""
    rng = None  # the model's device random stream, passed on to children at build
    #: run a ReLU after the max pool that follows it (``run_order``); off: the layers'
    #: own order (``--no-fused``, which turns overrides off, gives that order too)
    reorder = True

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
        self.order = run_order(self.layers)  # swaps only parameter-free neighbours
        #: {i: j}: BatchNorm i runs with the max pool j that follows it in ``order`` as one
        #: step in training where the backend offers that pair (``BatchNorm.fuses_with``)
        self._pooled = pooled_pairs(self.layers, self.order)
        #: {i: (j, l)}: Conv2D i runs with that pair as one step where the backend offers
        #: it (``Conv2D.fuses_with``)
        self._blocks = conv_blocks(self.layers, self.order, self._pooled)
        self._ran = None
        return shape

    # --- the two passes -----------------------------------------------------------------
    def forward(self, x, train=False):
        order, self._ran = self._order(), None
        # (in training, in the run order: a BatchNorm and the MaxPool2D after it may be one
        # step, and a Conv2D before them with them; --no-fused gives the layers' own order
        # and passes)
        fuse = train and order is getattr(self, "order", None)
        layers, pooled = self.layers, self._pooled if fuse else {}
        blocks = self._blocks if fuse else {}
        ran, pos = [], 0
        while pos < len(order):
            i = order[pos]
            j = pooled.get(i)  # (then j is order[pos + 1])
            block = blocks.get(i)  # (then they are order[pos + 1] and order[pos + 2])
            if block is not None and layers[i].fuses_with(*(layers[b] for b in block), x):
                # a Conv2D, its BatchNorm and max pool as one pair (Conv2D.forward_block);
                # its backward is the Conv2D's, from the pooled gradient
                x = layers[i].forward_block(x, *(layers[b] for b in block))
                pos += 3
            elif j is not None and layers[i].fuses_with(layers[j], x):
                # a BatchNorm and the max pool after it, as one pair (BatchNorm.forward_pooled);
                # its backward is the BatchNorm's, from the pooled gradient
                x = layers[i].forward_pooled(x, layers[j])
                pos += 2
            else:
                x = layers[i].forward(x, train)
                pos += 1
            ran.append(i)
        # the layers a backward must walk, in reverse: only after a complete forward that
        # backward may follow (training, or an inference forward whose caches are kept:
        # gradcheck)
        self._ran = ran if train or self.retain else None
        return x

    def _order(self):
        from ..backends.overrides import enabled

        own = getattr(self, "order", None)
        return own if own is not None and self.reorder and enabled() else range(len(self.layers))

    def backward(self, grad, input_grad=True):
        """Through every child in reverse (of the order the forward ran). With
        ``input_grad`` False the walk stops at the first child with parameters, which is
        told to skip its own input gradient."""
        # the order this chain's last forward ran; the layers' own when they were run one by
        # one instead (then no forward of the chain preceded this backward)
        order, self._ran = (self._ran if self._ran is not None else range(len(self.layers))), None
        stop = 0 if input_grad else self.first_trainable
        # (a layer moved is parameter-free, and a pair's first layer is the one in ``ran``,
        # so the layers before first_trainable come first in any order)
        for i in reversed(order):
            if i < stop:
                break
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
