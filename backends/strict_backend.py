"""array-api-strict: the reference namespace, for tests only (10-100x slower than NumPy).

It rejects everything outside the standard, and its extra devices (``device1``,
``no_float64``, ...) catch arrays that were silently created on the default device.
"""
import numpy as np

from .base import Backend, BackendError


class StrictBackend(Backend):
    name = "strict"

    def __init__(self, device: str = "CPU_DEVICE"):
        try:
            import array_api_strict
        except ImportError as e:
            raise BackendError(
                "the 'strict' backend needs array-api-strict: pip install array-api-strict"
            ) from e
        self.xp = array_api_strict
        names = [d._device for d in array_api_strict.__array_namespace_info__().devices()]
        if device in ("cpu", None):
            device = "CPU_DEVICE"
        if device not in names:
            raise BackendError(f"array-api-strict has no device {device!r}; choose from {names}")
        self.device = array_api_strict.Device(device)
        self.array_type = type(array_api_strict.asarray(0.0))
        self._host = array_api_strict.Device("CPU_DEVICE")

    def from_numpy(self, a, dtype=None):
        a = np.asarray(a)
        if dtype is None and a.dtype == np.float64 and not self.supports_float64():
            dtype = self.xp.float32
        return self.xp.asarray(a, dtype=dtype, device=self.device, copy=True)

    def to_numpy(self, x):
        return np.array(np.from_dlpack(x.to_device(self._host)), copy=True, order="C")  # no shared memory

    def device_of(self, x):
        return x.device

    def host_view(self, x):
        inner = getattr(x, "_array", None)  # the NumPy array an array_api_strict.Array wraps
        return inner if isinstance(inner, np.ndarray) else None

    def versions(self):
        import array_api_strict

        return {**super().versions(), "array_api_strict": array_api_strict.__version__}

    def describe(self):
        import array_api_strict

        return f"array-api-strict {array_api_strict.__version__} on {self.device._device}"
