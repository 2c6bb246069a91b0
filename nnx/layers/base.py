"""Layer and Parameter: the contract every layer follows.

A layer is built once on a backend (``build``), then ``forward(x, train)`` computes the
output and caches what ``backward(grad)`` needs; ``backward`` fills each parameter's
``grad`` and returns the gradient with respect to the input. All math uses ``self.xp``,
the backend's Array API namespace, never a concrete library.
"""
from __future__ import annotations

from ..errors import ShapeError


class Parameter:
    """A trainable array and its gradient, side by side (the optimizer updates ``value`` in place)."""

    __slots__ = ("name", "value", "grad")

    def __init__(self, name: str, value):
        self.name = name
        self.value = value
        self.grad = None

    @property
    def shape(self):
        return tuple(self.value.shape)

    def __repr__(self):
        return f"Parameter({self.name}, shape={self.shape})"


#: every Layer subclass by class name, so checkpoints can rebuild layers from JSON specs
LAYER_TYPES: dict[str, type] = {}


def build_stack(layers, backend, dtype, init_rng, device_rng, input_shape, prefix=""):
    """Build ``layers`` in sequence (Sequential and composite layers share this).

    Names each layer ``f"{prefix}{i}:{Type}"`` for error messages, hands the device random
    stream to layers that declare ``rng``, and returns the output shape after each layer.
    """
    shape, shapes = tuple(input_shape), []
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"layer {prefix}{i} is a {type(layer).__name__}, not an nnx Layer")
        if layer.backend is not None:
            raise ValueError(f"layer {prefix}{i} ({layer.describe()}) already belongs to a model; "
                             "create a fresh layer for each model")
        layer.name = f"{prefix}{i}:{type(layer).__name__}"
        if hasattr(layer, "rng"):
            layer.rng = device_rng
        shape = tuple(layer.build(backend, dtype, init_rng, shape))
        shapes.append(shape)
    return shapes


class Layer:
    """Base class. Subclasses override ``build`` (if they own parameters), ``forward``,
    ``backward`` and ``output_shape``; they register themselves in ``LAYER_TYPES``.

    Layers that need random numbers at run time (dropout) declare ``rng = None``; the model
    sets it to its device random stream before ``build``.
    """

    #: set by the owning model: "3:Dense" — used in error messages
    name: str = ""
    #: False lets ``backward`` skip d loss / d input and return None (the model sets it on
    #: its first parameterised layer when training: nobody needs the gradient of the data)
    input_grad: bool = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        LAYER_TYPES[cls.__name__] = cls

    def __init__(self):
        self.params: list[Parameter] = []
        self.buffers: dict = {}  # non-trainable state saved in checkpoints (BatchNorm's running stats)
        self.backend = None
        self.xp = None

    # --- life cycle ---------------------------------------------------------------------
    def build(self, backend, dtype, rng, input_shape) -> tuple:
        """Bind to ``backend`` (create parameters with ``rng``); return the output shape.

        ``input_shape`` excludes the batch axis. The default suits parameter-free layers.
        """
        self.backend, self.xp, self.dtype = backend, backend.xp, dtype
        return self.output_shape(input_shape)

    def output_shape(self, input_shape) -> tuple:
        return tuple(input_shape)

    def forward(self, x, train: bool = False):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    def skip_random(self, batch: int) -> None:
        """Draw, and throw away, what one training forward pass of ``batch`` rows draws from
        the model's random stream. Resuming mid-epoch replays the steps already done this
        way, so the remaining steps see the masks an uninterrupted run would. Layers without
        randomness draw nothing; a layer that declares ``rng`` must override this."""
        if getattr(self, "rng", None) is not None:
            import warnings

            warnings.warn(f"{type(self).__name__} uses the model's random stream but does not "
                          "implement skip_random(batch): a run resumed mid-epoch will draw "
                          "different random numbers from here on than one that never stopped",
                          RuntimeWarning, stacklevel=2)

    def named_parameters(self) -> dict:
        """{name: Parameter}; composite layers prefix their children's names (``fn.0.weight``)."""
        return {p.name: p for p in self.params}

    def named_buffers(self) -> dict:
        """{name: array} of non-trainable state; composite layers prefix like parameters."""
        return dict(self.buffers)

    def load_buffer(self, name: str, value) -> None:
        """Replace one buffer (checkpoint loading); composite layers route by prefix."""
        self.buffers[name] = value

    # --- helpers ------------------------------------------------------------------------
    def add_param(self, name: str, value) -> Parameter:
        p = Parameter(name, value)
        self.params.append(p)
        return p

    def check_features(self, x, expected: tuple) -> None:
        """Raise ShapeError unless ``x.shape[1:] == expected`` (the batch axis is free)."""
        actual = tuple(x.shape)
        if actual[1:] != tuple(expected):
            want = "(batch, " + ", ".join(str(d) for d in expected) + ")"
            raise ShapeError(f"layer {self.name or type(self).__name__}: expected input of shape "
                             f"{want}, got {actual}")

    def config(self) -> dict:
        """Constructor arguments, JSON-able (checkpoints rebuild the layer from them)."""
        return {}

    def describe(self) -> str:
        """Short constructor-like description for summaries."""
        return f"{type(self).__name__}()"

    def __repr__(self):
        return self.describe()
