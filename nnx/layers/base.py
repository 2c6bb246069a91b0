"""Layer and Parameter: the contract every layer follows.

A layer is built once on a backend (``build``), then ``forward(x, train)`` computes the
output and caches what ``backward(grad)`` needs; ``backward`` fills each parameter's
``grad`` and returns the gradient with respect to the input. All math uses ``self.xp``,
the backend's Array API namespace, never a concrete library.
"""
from __future__ import annotations

from ..errors import ShapeError


class Parameter:
    """A trainable array and its gradient, side by side (the optimizer updates ``value`` in place).

    When the model keeps its parameters in flat storage (``nnx.flat``), ``value`` and ``grad``
    are views of this parameter's slices of one value array and one gradient array, and
    assigning either copies into the view: layers write ``p.grad = ...`` and
    ``p.value = ...`` the same way whichever storage is in use.
    """

    __slots__ = ("name", "_value", "_grad", "_flat")

    def __init__(self, name: str, value):
        self.name = name
        self._value = value
        self._grad = None
        self._flat = None  # (value view, gradient view, FlatStore) once in flat storage

    def attach(self, value_view, grad_view, store) -> None:
        """Move into flat storage: from now on value and gradient live in these views."""
        self._value, self._flat = value_view, (value_view, grad_view, store)

    @property
    def store(self):
        """The ``nnx.flat.FlatStore`` holding this parameter, or None."""
        return None if self._flat is None else self._flat[2]

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        if self._flat is None:
            self._value = v
        else:
            if tuple(v.shape) != self.shape:
                raise ValueError(f"parameter {self.name}: shape {tuple(v.shape)} != {self.shape}")
            self._value[...] = v

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, g):
        if self._flat is None or g is None:
            self._grad = g
        else:
            view = self._flat[1]
            if g is not view:  # already written there through ``grad_out``: nothing to copy
                view[...] = g
            self._grad = view

    @property
    def grad_out(self):
        """Where a layer may write this parameter's gradient directly (``out=`` of the
        backend's ``matmul``/``sum``): its view of the flat gradient array, or None (one
        array per parameter: the layer's result is kept as it is, nothing to copy)."""
        return None if self._flat is None else self._flat[1]

    @property
    def shape(self):
        return tuple(self._value.shape)

    def __repr__(self):
        return f"Parameter({self.name}, shape={self.shape})"


#: every Layer subclass by class name, so checkpoints can rebuild layers from JSON specs
LAYER_TYPES: dict[str, type] = {}


class Layer:
    """Base class. Subclasses override ``build`` (if they own parameters), ``forward``,
    ``backward`` and ``output_shape``; they register themselves in ``LAYER_TYPES``.

    Layers that need random numbers at run time (dropout) declare ``rng = None``; the chain
    that owns them sets it to the model's device random stream before ``build``.

    Outputs may be arrays that ``backward`` reuses (Sigmoid's, Tanh's, Softmax's y, MaxPool's
    maxima): modify an output in place only after backward has run, or copy it first.
    """

    #: set by the owning model: "3:Dense" — used in error messages
    name: str = ""
    #: keep what backward needs after an inference forward too (gradcheck sets it); training
    #: forwards always keep it, inference forwards otherwise keep nothing
    retain: bool = False

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
        """Output for ``x``; caches what ``backward`` needs when ``train or self.retain``."""
        raise NotImplementedError

    def backward(self, grad, input_grad: bool = True):
        """Fill each parameter's ``grad`` from d loss / d output ``grad`` and return
        d loss / d input — or None when ``input_grad`` is False (the caller does not want it,
        e.g. the first layer of a model in training), which lets a layer skip that work."""
        raise NotImplementedError

    def keeps(self, train: bool) -> bool:
        """Whether this forward must cache for backward."""
        return train or self.retain

    def pair(self, name: str, standard):
        """``standard`` (this layer's own forward/backward pair), or the backend's checked
        version of the pair ``name`` where it offers one (backends/overrides.py), bound once."""
        if self.backend is None or not self.backend.offers(name):
            return standard
        bound = self.__dict__.setdefault("_bound_pairs", {})
        pair = bound.get(name)
        if pair is None or pair.backend is not self.backend:
            pair = bound[name] = self.backend.pair(name, standard)
        return pair

    def take_saved(self):
        """``self.saved`` (what the last forward kept for backward), or ``no_forward()``."""
        saved = getattr(self, "saved", None)
        if saved is None:
            raise self.no_forward()
        return saved

    def no_forward(self) -> RuntimeError:
        """The error for a backward with nothing kept to run on."""
        return RuntimeError(f"layer {self.name or type(self).__name__}: backward needs a "
                            "training forward first (or retain=True), and runs once per forward")

    def walk(self):
        """This layer and every layer inside it (composite layers override)."""
        yield self

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
