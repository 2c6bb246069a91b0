"""The Backend object: the one place that knows which array library and device are in use.

Layers, losses and optimizers only ever see ``backend.xp`` (an Array API namespace) and
``backend.device``; everything library-specific (random numbers, copies to NumPy, device
synchronisation, descriptions) lives here, Thinc-``Ops`` style.
"""
from __future__ import annotations

import numpy as np


class BackendError(RuntimeError):
    """A backend cannot be used here (library or device missing), with what to install."""


class CompileError(RuntimeError):
    """A training step cannot be compiled here (wrong backend, no C++ compiler), with what
    to do."""


class BackendMismatchError(ValueError):
    """Arrays from two backends or devices were mixed in one model."""


class HostRNG:
    """Seeded random numbers drawn on the host with NumPy, then moved to the device.

    Used for parameter initialisation everywhere (the same seed gives the same weights on
    every backend) and as the per-step stream of the CPU backends.
    """

    def __init__(self, backend: "Backend", seed: int):
        self.backend = backend
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        self._gen = np.random.default_rng(self.seed)

    def _move(self, a, dtype):
        return self.backend.from_numpy(a, dtype=dtype)

    def normal(self, shape, std=1.0, dtype=None):
        a = self._gen.standard_normal(shape) * std
        return self._move(a, dtype or self.backend.float32)

    def uniform(self, shape, low=0.0, high=1.0, dtype=None):
        a = self._gen.uniform(low, high, size=shape)
        return self._move(a, dtype or self.backend.float32)

    def bernoulli(self, shape, p_one, dtype=None):
        """1.0 with probability ``p_one``, else 0.0 (dropout keep-masks)."""
        a = self._gen.random(shape) < p_one
        return self._move(a, dtype or self.backend.float32)

    def permutation(self, n: int):
        return self.backend.from_numpy(self._gen.permutation(n).astype(np.int64))


class Backend:
    """One array library on one device.

    Subclasses set ``name``, ``xp`` (Array API namespace), ``device`` and implement the
    library-specific hooks: ``from_numpy``, ``to_numpy``, ``synchronize``, ``describe``.
    """

    name = "base"
    xp = None
    device = None
    array_type: type = object
    #: keep a training split's images as uint8 pixels and convert each gathered batch
    #: (nnx.data.Split): a quarter of the bytes per gather, two more operations per step.
    #: Worth it where gathers are memory-bound (the CPU); not on a GPU, where each
    #: operation is a kernel launch
    compact_images = False
    #: flat storage lays 2-D parameters (Dense's (out, in) weights) out column-major, each
    #: the transposed view of an (in, out) slice: the same shapes and values, a BLAS-friendlier
    #: layout where the library's matmul cares (nnx.flat)
    column_major_matrices = False

    # --- dtypes -------------------------------------------------------------------------
    @property
    def float32(self):
        return self.xp.float32

    @property
    def float64(self):
        return self.xp.float64

    @property
    def int64(self):
        return self.xp.int64

    def supports_float64(self) -> bool:
        info = self.xp.__array_namespace_info__()
        return "float64" in info.dtypes(device=self.device, kind="real floating")

    @staticmethod
    def dtype_name(dtype) -> str:
        """'float32' for any library's float32 dtype object (for messages and configs)."""
        return str(dtype).replace("'>", "").rsplit(".", 1)[-1]

    def dtype(self, name):
        """``"float32"``/``"float64"`` (or a dtype object) → this namespace's dtype."""
        if not isinstance(name, str):
            return name
        if name not in ("float32", "float64"):
            raise ValueError(f"unsupported dtype {name!r}: use 'float32' or 'float64'")
        if name == "float64" and not self.supports_float64():
            raise BackendError(f"{self} has no float64 support; use --dtype float32")
        return getattr(self.xp, name)

    # --- arrays -------------------------------------------------------------------------
    def from_numpy(self, a, dtype=None):
        """Copy a host NumPy array onto this backend's device (I/O and initialisation only)."""
        raise NotImplementedError

    def to_numpy(self, x) -> np.ndarray:
        """Copy an array of this backend to a host NumPy array, row-major whatever the
        array's own layout (I/O, plots, checkpoints)."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued device work (timing); a no-op on synchronous CPU libraries."""

    def compile(self, fn, mode=None, compiler="inductor"):
        """``fn`` compiled by the library (``nnx.step.compile_step`` uses it); only the torch
        backend compiles (CuPy's counterpart is its fused kernels, ``backends/overrides.py``)."""
        self.check_compile(compiler)
        return fn

    def check_compile(self, compiler="inductor") -> None:
        """Raise CompileError, saying what to do, unless ``compile`` can work here."""
        raise CompileError(f"--compile needs the torch backend (this run uses {self.name}); "
                           "add --backend torch")

    def host_view(self, x):
        """A NumPy array sharing ``x``'s memory (writes reach ``x``), or None when the library
        cannot give one (a GPU array): MPI then sums ``x`` in place (nnx.distributed)."""
        return None

    def take_rows(self, x, index):
        """``x[index]`` along the first axis for a 1-D array of non-negative indices (the
        trainer's batch gather): ``xp.take``, unless the library has a cheaper call."""
        return self.xp.take(x, index, axis=0)

    def affine(self, x, w, b=None):
        """``x @ wᵀ + b`` (Dense's forward; ``b`` may be None): libraries with a fused
        multiply-add (torch's ``addmm``) do it in one call."""
        y = x @ w.T
        if b is not None:
            y += b  # in place: y is the matmul's fresh output (saves a copy)
        return y

    def matmul(self, a, b, out=None):
        """``a @ b``, written into ``out`` when one is given (a parameter's gradient view in
        flat storage, ``Parameter.grad_out``): libraries with ``out=`` write it there
        directly; the standard path copies the product in."""
        y = a @ b
        if out is None:
            return y
        out[...] = y
        return out

    def sum(self, x, axis, out=None):
        """``xp.sum(x, axis=axis)``, written into ``out`` when one is given (see ``matmul``)."""
        y = self.xp.sum(x, axis=axis)
        if out is None:
            return y
        out[...] = y
        return out

    def describe(self) -> str:
        """One line: library, version, device (and memory where known)."""
        raise NotImplementedError

    def versions(self) -> dict:
        """Library versions, for run configs and benchmark reports."""
        import array_api_compat

        return {"numpy": np.__version__, "array_api_compat": array_api_compat.__version__}

    # --- overrides of hot operations (backends/overrides.py) ----------------------------
    def op(self, name: str, reference):
        """``reference`` (the standard Array-API code), or this backend's faster version of
        the named operation, checked against ``reference`` the first time it runs."""
        from .overrides import bind

        return bind(self, name, reference)

    def offers(self, name: str) -> bool:
        """Whether this backend replaces the forward/backward pair ``name`` (and overrides
        are on): the layer then runs ``pair(name, reference)`` instead of its own passes."""
        from .overrides import offers

        return offers(self, name)

    def pair(self, name: str, reference):
        """This backend's forward/backward pair ``name``, checked against ``reference`` (an
        object with the same ``forward``/``backward``) the first time it runs."""
        from .overrides import bind_pair

        return bind_pair(self, name, reference)

    def overrides(self) -> list[str]:
        """Names of the operations this backend replaces (empty: the standard path only)."""
        from .overrides import listed

        return listed(self.name)

    def activate(self):
        """A context manager making this backend's device current while work is done
        (CuPy allocates and launches on the current device); a no-op elsewhere."""
        import contextlib

        return contextlib.nullcontext()

    # --- random numbers -----------------------------------------------------------------
    def host_rng(self, seed: int) -> HostRNG:
        """Portable stream: identical numbers on every backend (initialisation)."""
        return HostRNG(self, seed)

    def device_rng(self, seed: int):
        """Fast stream made on the device (dropout masks, shuffling)."""
        return HostRNG(self, seed)

    # --- checks -------------------------------------------------------------------------
    def check_array(self, x, where: str = "input") -> None:
        """Raise a clear error when ``x`` belongs to another library or device."""
        if not isinstance(x, self.array_type):
            raise BackendMismatchError(
                f"{where}: got a {type(x).__module__}.{type(x).__name__}, but this model lives "
                f"on the {self.name} backend ({self.device}); move the data with "
                f"backend.from_numpy(...) or build the model on the matching backend"
            )
        dev = self.device_of(x)
        if dev != self.device:
            raise BackendMismatchError(
                f"{where}: array is on device {dev}, but this model lives on {self.device} "
                f"({self.name} backend); move one of them so both share a device"
            )

    def device_of(self, x):
        import array_api_compat

        return array_api_compat.device(x)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.device}>"

    def __str__(self) -> str:
        return f"{self.name} backend on {self.device}"
