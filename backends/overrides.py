"""Backend overrides of named hot operations (Thinc's ``CupyOps`` pattern).

Layers, losses and optimizers keep their Array-API code as the *reference* implementation
and call it through ``backend.op(name, reference)``. A backend may register a faster
implementation of a named operation here (CuPy's fused kernels, ``backends/cupy_kernels.py``;
PyTorch's fused calls, ``backends/torch_ops.py``; NumPy's direct calls, ``backends/numpy_ops.py``);
every other backend gets the reference back unchanged, so nothing branches on the library.

An override takes the same arguments as the reference it replaces and returns the same
results (in-place updates included). The first time it runs for a (backend, device, op,
dtype) it is checked against the reference on small random inputs; a mismatch beyond the
tolerance (or an exception, e.g. a kernel that does not compile) gives ONE warning naming
the op, and the reference is used for the rest of the run. ``set_enabled(False)`` (the CLI's
``--no-fused``) turns every override off.

Named operations (arguments as the call sites pass them):

- ``relu_forward(x) -> y``                     ReLU in training: max(0, x)
- ``relu_backward(grad, y) -> grad·[y > 0]``   ReLU's backward from its output y
- ``softmax_xent(loss, logits, target) -> (Σ log p(target), correct, dlogits)``
  softmax-cross-entropy forward, running loss/accuracy terms and backward in one pass
- ``nesterov_update(opt, p, g, slots, hyper)``  one Nesterov step over flat buffers (in place)
- ``adam_update(opt, p, g, slots, hyper)``      one Adam / AdamW step (L2 or decoupled decay)

Named forward/backward pairs (``CheckedPair``; each side's ``saved`` is its own):

- ``conv2d``: ``forward(x, w, b, stride, padding) -> (y, saved)``,
  ``backward(saved, grad, input_grad) -> (dx or None, dw, db or None)``
- ``batchnorm`` (training, batch statistics): ``forward(x, γ, β, eps) -> ((y, mean,
  biased var), saved)``, ``backward(saved, grad, input_grad) -> (dx or None, dγ, dβ)``
- ``maxpool``: ``forward(x, k, s, p, keep) -> (out, saved)``, ``backward(saved, grad,
  input_grad) -> dx``

Named pairs spanning two or three layers (``BLOCK_PAIRS``; a chain runs them,
``nnx.layers.chain``):

- ``batchnorm_maxpool``: a training BatchNorm and the MaxPool2D after it,
  ``forward(x, γ, β, eps, k, s, p) -> ((pooled y, mean, biased var), saved)``,
  ``backward(saved, pooled grad, input_grad) -> (dx or None, dγ, dβ)``
- ``conv_batchnorm_maxpool`` (three layers): a training Conv2D (im2col), the BatchNorm and
  the MaxPool2D after it, ``forward(x, w, b, stride, padding, γ, β, eps, k, s, p) ->
  ((pooled y, mean, biased var), saved)``, ``backward(saved, pooled grad, input_grad) ->
  (dx or None, dw, db or None, dγ, dβ)``
"""
from __future__ import annotations

import warnings

import numpy as np

OPS = ("relu_forward", "relu_backward", "softmax_xent", "nesterov_update", "adam_update")
#: named forward/backward PAIRS (see ``CheckedPair``): a layer whose backend offers one
#: (``offers``) runs the pair instead of its own passes
PAIRS = ("conv2d", "batchnorm", "maxpool")
#: named pairs that stand for two or three layers run as one step (a chain asks for them)
BLOCK_PAIRS = ("batchnorm_maxpool", "conv_batchnorm_maxpool")

#: {backend name: {op name: implementation}}
REGISTRY: dict[str, dict] = {}
_STATE = {"enabled": True}
#: (backend name, device label, op, dtype, configuration) -> True (checked, used) /
#: False (failed: the reference)
_CHECKED: dict = {}
#: relative/absolute tolerances of the self-check per dtype
TOLERANCE = {"float32": (2e-4, 2e-5), "float64": (1e-10, 1e-12)}


def register(backend_name: str, op_name: str, impl=None):
    """Register ``impl`` as ``backend_name``'s version of ``op_name`` (usable as a decorator)."""
    if op_name not in OPS + PAIRS + BLOCK_PAIRS:
        raise ValueError(f"unknown op {op_name!r}; named ops are "
                         f"{', '.join(OPS + PAIRS + BLOCK_PAIRS)}")

    def add(f):
        REGISTRY.setdefault(backend_name, {})[op_name] = f
        return f

    return add(impl) if impl is not None else add


def set_enabled(flag: bool) -> None:
    """Turn every override on or off (``--no-fused``); off means the reference everywhere."""
    _STATE["enabled"] = bool(flag)


def enabled() -> bool:
    return _STATE["enabled"]


#: the module registering each backend's overrides, imported on first use (needs no GPU)
PROVIDERS = {"cupy": "cupy_kernels", "torch": "torch_ops", "numpy": "numpy_ops"}


_LOADED: set = set()


def _load(backend_name: str) -> dict:
    if backend_name not in _LOADED:
        module = PROVIDERS.get(backend_name)
        if module is not None:
            import importlib

            importlib.import_module(f"{__package__}.{module}")  # registers on import
        _LOADED.add(backend_name)
    return REGISTRY.get(backend_name, {})


def listed(backend_name: str) -> list[str]:
    """The ops ``backend_name`` replaces (after loading its kernels), in ``OPS`` order."""
    ops = _load(backend_name)
    return [name for name in OPS + PAIRS + BLOCK_PAIRS if name in ops]


def offers(backend, name: str) -> bool:
    """Whether ``backend`` replaces the pair ``name`` and overrides are on: a layer then
    runs ``bind_pair``'s passes (which fall back to the pair's reference if the override
    fails its check) instead of its own."""
    return _STATE["enabled"] and name in _load(backend.name)


def bind_pair(backend, name: str, reference):
    """``backend``'s override of the pair ``name`` wrapped in its self-check (CheckedPair)."""
    return CheckedPair(backend, name, _load(backend.name).get(name), reference)


def bind(backend, name: str, reference):
    """``reference`` itself, or ``backend``'s override of ``name`` wrapped in its self-check."""
    impl = _load(backend.name).get(name)
    if impl is None:
        return reference
    return Checked(backend, name, impl, reference)


class Checked:
    """An override that checks itself against the reference on first use (see module doc)."""

    __slots__ = ("backend", "name", "impl", "reference", "ok")

    def __init__(self, backend, name, impl, reference):
        self.backend, self.name, self.impl, self.reference = backend, name, impl, reference
        self.ok = None  # None: not checked yet in this binding

    def __call__(self, *args):
        if not _STATE["enabled"]:
            return self.reference(*args)
        ok = self.ok
        if ok is None:
            ok = self.ok = self._check(args)
        return self.impl(*args) if ok else self.reference(*args)

    def _check(self, args) -> bool:
        backend = self.backend
        dtype = next((a.dtype for a in _arrays(args)), None)
        key = (backend.name, str(backend.device), self.name, backend.dtype_name(dtype),
               self._signature(args))
        if key not in _CHECKED:
            _CHECKED[key] = self._compare(args, key[3])
        return _CHECKED[key]

    @staticmethod
    def _signature(args):
        """What else, beyond the dtype, makes a different case to check: nothing for
        element-wise operations."""
        return ()

    def _compare_outputs(self, args):
        """(override's, reference's) arrays: results, then the inputs (in-place updates)."""
        backend = self.backend
        sample = SAMPLES[self.name](backend, args, np.random.default_rng(12))
        ref_in, new_in = _copy(backend, sample), _copy(backend, sample)
        ref_out = self.reference(*ref_in)
        new_out = self.impl(*new_in)
        return (new_out, new_in), (ref_out, ref_in)

    def _compare(self, args, dtype_name) -> bool:
        backend = self.backend
        try:
            new, ref = self._compare_outputs(args)
            backend.synchronize()
            got = [backend.to_numpy(a) for a in _arrays(new)]
            want = [backend.to_numpy(a) for a in _arrays(ref)]
            if len(got) != len(want):
                raise ValueError(f"returned {len(got)} arrays, the standard path {len(want)}")
            rtol, atol = TOLERANCE.get(dtype_name, TOLERANCE["float32"])
            worst = 0.0
            for g, w in zip(got, want):
                if g.shape != w.shape:
                    raise ValueError(f"shape {g.shape} where the standard path gives {w.shape}")
                # rounding errors of sums grow with the values summed: atol is relative to
                # the largest finite value (at least 1)
                finite = np.abs(w[np.isfinite(w)]) if w.dtype.kind == "f" else np.abs(w)
                scale = max(1.0, float(finite.max(initial=0.0)))
                if not np.allclose(g, w, rtol=rtol, atol=atol * scale, equal_nan=True):
                    worst = max(worst, float(np.nanmax(np.abs(g.astype(np.float64) - w)) / scale))
            if worst:
                raise ValueError(f"max |difference| {worst:.3g} of the largest value "
                                 f"(rtol {rtol:g}, atol {atol:g})")
        except Exception as e:  # a wrong result, or a kernel that fails to compile or run
            warnings.warn(f"nnx: the {backend.name} override of {self.name!r} on "
                          f"{backend.device} ({dtype_name}) disagrees with the standard path: "
                          f"{e}; using the standard path for the rest of this run",
                          RuntimeWarning, stacklevel=4)
            return False
        return True


class CheckedPair:
    """A forward/backward pair (``forward(*args) -> (out, saved)``, ``backward(saved, grad,
    *extra) -> results``) whose override is checked against the reference pair the first
    time its forward runs for a (backend, device, pair, dtype): both run forward and then
    backward on small random inputs shaped like the real call, and their ``out`` and
    backward results must agree (what each keeps in ``saved`` is its own business, so it
    is not compared). ``saved`` remembers which of the two made it, so backward always
    matches its forward. A mismatch gives one warning and the reference for the rest of
    the run, as for single operations."""

    __slots__ = ("backend", "name", "impl", "reference", "ok")

    def __init__(self, backend, name, impl, reference):
        self.backend, self.name, self.impl, self.reference = backend, name, impl, reference
        self.ok = None

    def forward(self, *args):
        use = self.reference
        if self.impl is not None and _STATE["enabled"]:
            if self.ok is None:
                self.ok = Checked._check(self, args)
            use = self.impl if self.ok else self.reference
        out, saved = use.forward(*args)
        return out, (use, saved)

    def backward(self, saved, grad, *extra):
        use, saved = saved
        return use.backward(saved, grad, *extra)

    def _compare_outputs(self, args):
        """(override's, reference's) arrays: forward outputs, then backward results, with
        and without the input gradient."""
        fwd = PAIR_SAMPLES[self.name](self.backend, args, np.random.default_rng(12))
        results = []
        for pair in (self.impl, self.reference):
            for input_grad in (True, False):
                out, saved = pair.forward(*_copy(self.backend, fwd))
                first = out[0] if isinstance(out, tuple) else out
                grad = _like(self.backend, np.random.default_rng(13), first, tuple(first.shape))
                results.append((out, pair.backward(saved, grad, input_grad)))
        return results[:2], results[2:]

    @staticmethod
    def _signature(args):
        """Each configuration of a pair is its own case: the non-array arguments (stride,
        padding, ...), whether an optional array is given, and the shapes of the arrays
        after the first (the weights: kernel size, channels)."""
        sig = []
        for i, a in enumerate(args):
            if hasattr(a, "shape") and hasattr(a, "dtype"):
                sig.append(("array", a.ndim) if i == 0 else tuple(int(d) for d in a.shape))
            else:
                sig.append(a if a is None or isinstance(a, (bool, int, float, str)) else type(a))
        return tuple(sig)

    _compare = Checked._compare


def _arrays(obj):
    """The arrays inside nested tuples/lists (in order), skipping scalars and objects."""
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _arrays(o)
    elif hasattr(obj, "shape") and hasattr(obj, "dtype"):
        yield obj


def _copy(backend, obj):
    if isinstance(obj, (tuple, list)):
        return type(obj)(_copy(backend, o) for o in obj)
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return backend.xp.asarray(obj, copy=True)
    return obj


# --- small random inputs for the self-check, shaped like the real call ------------------
def _like(backend, rng, a, shape, positive=False):
    x = rng.standard_normal(shape)
    return backend.from_numpy(np.abs(x) + 0.01 if positive else x, dtype=a.dtype)


def _sample_relu_forward(backend, args, rng):
    (x,) = args
    a = rng.standard_normal((7, 5))
    a[0, :2] = 0.0
    return (backend.from_numpy(a, dtype=x.dtype),)


def _sample_relu_backward(backend, args, rng):
    grad, y = args
    a = np.maximum(rng.standard_normal((7, 5)), 0.0)  # an output of ReLU: zeros included
    return _like(backend, rng, grad, (7, 5)), backend.from_numpy(a, dtype=y.dtype)


def _sample_softmax_xent(backend, args, rng):
    loss, logits, target = args
    n, c = 9, int(logits.shape[1])
    z = rng.standard_normal((n, c)) * 3
    z[0, 1 % c] = z[0, 0]  # a tie
    t = np.eye(c)[rng.integers(0, c, n)]
    return (loss, backend.from_numpy(z, dtype=logits.dtype),
            backend.from_numpy(t, dtype=target.dtype))


def _sample_update(backend, args, rng):
    opt, p, g, slots, hyper = args
    positive = {"v"}  # Adam's second moment is never negative
    names = getattr(opt, "slot_names", ())
    new_slots = [_like(backend, rng, s, (37,), positive=n in positive)
                 for s, n in zip(slots, names)]
    return opt, _like(backend, rng, p, (37,)), _like(backend, rng, g, (37,)), new_slots, hyper


SAMPLES = {"relu_forward": _sample_relu_forward, "relu_backward": _sample_relu_backward,
           "softmax_xent": _sample_softmax_xent, "nesterov_update": _sample_update,
           "adam_update": _sample_update}


# --- small random inputs for the pairs' self-check: forward arguments like the real ones --
def _sample_conv2d(backend, args, rng):
    x, w, b, stride, padding = args
    o, c, k = (int(d) for d in w.shape[:3])
    size = max(k + 2, 2 * k - 2 * padding)
    xs = _like(backend, rng, x, (2, c, size + 1, size))
    ws = _like(backend, rng, w, (o, c, k, k)) * (1.0 / (c * k * k) ** 0.5)  # outputs of size ~1
    bs = None if b is None else _like(backend, rng, b, (o,))
    return xs, ws, bs, stride, padding


def _sample_batchnorm(backend, args, rng):
    x, weight, bias, eps = args
    shape = (5, *(int(d) for d in x.shape[1:2]), *((3, 4) if x.ndim == 4 else ()))
    return (_like(backend, rng, x, shape), _like(backend, rng, weight, tuple(weight.shape)),
            _like(backend, rng, bias, tuple(bias.shape)), eps)


def _sample_maxpool(backend, args, rng):
    x, k, s, p, *rest = args
    c = int(x.shape[1])
    a = rng.standard_normal((2, c, 2 * k + 3, 2 * k + 2))
    a[0, 0, :2, :2] = 1.0  # a tie inside a window: the first maximum takes the gradient
    return backend.from_numpy(a, dtype=x.dtype), k, s, p, True  # keep: backward follows


def _sample_batchnorm_maxpool(backend, args, rng):
    x, weight, bias, eps, k, s, p = args
    c = int(x.shape[1])
    a = rng.standard_normal((2, c, 2 * k + 3, 2 * k + 2))
    a[0, 0, :2, :2] = 1.0  # a tie inside a window: the first maximum takes the gradient
    # γ ≠ 0, of both signs (the first channel's negative): a backend that pools first
    # takes its pooling path, not a fallback, for increasing and decreasing maps
    gamma = np.abs(rng.standard_normal(c)) + 0.1
    gamma[0] = -gamma[0]
    return (backend.from_numpy(a, dtype=x.dtype), backend.from_numpy(gamma, dtype=weight.dtype),
            _like(backend, rng, bias, (c,)), eps, k, s, p)


def _sample_conv_batchnorm_maxpool(backend, args, rng):
    x, w, b, stride, padding, weight, bias, eps, k, s, p = args
    o, c, kc = (int(d) for d in w.shape[:3])
    # an even-sized convolution output (whole windows, so a backend's window-by-window
    # path runs), about 2·k + 2 by 2·k, and larger where the padding asks for more
    sizes = []
    for out in (2 * k + 2, 2 * k):
        while out + kc - 1 - 2 * padding < 1:
            out += 2
        sizes.append(out + kc - 1 - 2 * padding)
    xs = _like(backend, rng, x, (2, c, *sizes))
    ws = _like(backend, rng, w, (o, c, kc, kc)) * (1.0 / (c * kc * kc) ** 0.5)
    bs = None if b is None else _like(backend, rng, b, (o,))
    gamma = np.abs(rng.standard_normal(o)) + 0.1  # γ of both signs, as for the pair above
    gamma[0] = -gamma[0]
    return (xs, ws, bs, stride, padding, backend.from_numpy(gamma, dtype=weight.dtype),
            _like(backend, rng, bias, (o,)), eps, k, s, p)


PAIR_SAMPLES = {"conv2d": _sample_conv2d, "batchnorm": _sample_batchnorm,
                "maxpool": _sample_maxpool, "batchnorm_maxpool": _sample_batchnorm_maxpool,
                "conv_batchnorm_maxpool": _sample_conv_batchnorm_maxpool}
