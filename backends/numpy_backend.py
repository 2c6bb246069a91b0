"""NumPy on the CPU: the default backend."""
import numpy as np
import array_api_compat.numpy as xp_numpy

from .base import Backend

_add_reduce = np.add.reduce


class NumpyBackend(Backend):
    name = "numpy"
    xp = xp_numpy
    device = "cpu"
    array_type = np.ndarray
    compact_images = True
    column_major_matrices = True  # OpenBLAS: x·Wᵀ with Wᵀ row-major is the faster sgemm

    def from_numpy(self, a, dtype=None):
        return np.array(a, dtype=dtype, copy=True)  # a copy: in-place updates must not reach `a`

    def to_numpy(self, x):
        # a row-major copy: a saved state_dict must not follow training, and writers that
        # ignore strides (safetensors' numpy save) see the values (flat storage keeps Dense
        # weights column-major: Backend.column_major_matrices)
        return np.array(x, copy=True, order="C")

    def device_of(self, x):
        return "cpu"

    def host_view(self, x):
        return x

    # The hot calls of a training step go straight to NumPy (no wrapper layers, positional
    # arguments: they run right after large matmuls and gathers, when every look-up misses
    # the cache): the standard path's operations, so the same results bit for bit.
    def take_rows(self, x, index):
        return x.take(index, 0)

    def matmul(self, a, b, out=None):
        return np.matmul(a, b, out=out)

    def sum(self, x, axis, out=None):
        return _add_reduce(x, axis, None, out)  # what np.sum calls

    def describe(self):
        try:
            from threadpoolctl import threadpool_info

            info = threadpool_info()
            blas = ", ".join(sorted({i.get("internal_api", "?") for i in info}))
            n = max((i.get("num_threads", 0) for i in info), default=0)  # set by --threads
            blas += f", {n} thread{'s' * (n != 1)}" if n else ""
        except Exception:  # threadpoolctl is optional
            blas = "BLAS"
        import os

        try:
            ram = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
        except (ValueError, OSError, AttributeError):  # not available on every OS
            ram = ""
        return f"numpy {np.__version__} on CPU ({os.cpu_count()} cores{ram}, {blas})"
