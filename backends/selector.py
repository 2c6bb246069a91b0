"""Pick a backend from a (name, device) pair, the way the CLI's --backend/--device do."""
from __future__ import annotations

from .base import Backend, BackendError

BACKENDS = ("auto", "numpy", "cupy", "torch", "strict")


def _is_cuda(device: str) -> bool:
    return device == "cuda" or device.startswith("cuda:")


def get_backend(name: str = "auto", device: str = "cpu") -> Backend:
    """Return the backend for ``name`` on ``device``.

    ``auto`` picks NumPy for ``cpu`` and CuPy for ``cuda``/``cuda:N``. ``torch`` runs on
    ``cpu`` or ``cuda[:N]``; ``strict`` (array-api-strict, tests only) takes its own
    device names (``CPU_DEVICE``, ``device1``, ``no_float64``, ...).
    """
    name = (name or "auto").lower()
    device = str(device or "cpu").lower() if name != "strict" else str(device or "cpu")
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    index = device[5:]
    if name != "strict" and device.startswith("cuda:") and not (index.isascii() and index.isdigit()):
        raise BackendError(f"device {device!r}: a CUDA device is cuda or cuda:N, N a GPU index "
                           "(0, 1, ...)")
    if name == "auto":
        name = "cupy" if _is_cuda(device) else "numpy"
    if name == "numpy":
        if device != "cpu":
            raise BackendError(f"the numpy backend runs on the CPU only (got --device {device}); "
                               + ("use --backend cupy (or auto) for CUDA" if _is_cuda(device)
                                  else "use --device cpu, or cuda / cuda:N with --backend cupy"))
        from .numpy_backend import NumpyBackend

        return NumpyBackend()
    if name == "cupy":
        if not _is_cuda(device):
            raise BackendError(f"the cupy backend needs --device cuda or cuda:N (got {device})")
        from .cupy_backend import CupyBackend

        return CupyBackend(device)
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(device)
    from .strict_backend import StrictBackend

    return StrictBackend(device)


def available_backends() -> list[tuple[str, str]]:
    """(name, device) pairs that can be built on this machine, for tests and benchmarks."""
    found = [("numpy", "cpu")]
    for name, device in (("strict", "CPU_DEVICE"), ("torch", "cpu"), ("cupy", "cuda"),
                         ("torch", "cuda")):
        try:
            get_backend(name, device)
        except BackendError:
            continue
        found.append((name, device))
    return found


def backend_of(x) -> Backend:
    """The backend an existing array belongs to (library and device taken from the array)."""
    import array_api_compat

    if array_api_compat.is_numpy_array(x):
        return get_backend("numpy", "cpu")
    if array_api_compat.is_torch_array(x):
        return get_backend("torch", str(x.device))
    if array_api_compat.is_cupy_array(x):
        return get_backend("cupy", f"cuda:{x.device.id}")
    if array_api_compat.is_array_api_strict_namespace(array_api_compat.array_namespace(x)):
        return get_backend("strict", x.device._device)
    raise BackendError(f"no nnx backend for arrays of type {type(x).__name__}")
