"""Backends: one module per array library, and the selector ``get_backend``.

Importable as ``nnx.backends``. A backend owns the Array API namespace, the device, random
numbers made there, copies to NumPy, ``synchronize()`` and a one-line description.
"""
from .base import Backend, BackendError, BackendMismatchError, HostRNG
from .selector import BACKENDS, available_backends, get_backend, backend_of

__all__ = ["Backend", "BackendError", "BackendMismatchError", "HostRNG", "BACKENDS",
           "available_backends", "get_backend", "backend_of"]
