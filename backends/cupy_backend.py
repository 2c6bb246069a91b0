"""CuPy on an NVIDIA GPU through array-api-compat."""
from .base import Backend, BackendError

INSTALL_HINT = (
    "install CuPy for your CUDA version: pip install 'nnx[cuda12]' (cupy-cuda12x) or "
    "pip install 'nnx[cuda13]' (cupy-cuda13x); or run on the CPU with --device cpu"
)


class CupyRNG:
    """Dropout masks and shuffles drawn by CuPy's generator on the GPU (no host copies)."""

    def __init__(self, backend, seed):
        import cupy

        self.backend = backend
        self._cupy = cupy
        self.reseed(seed)

    def reseed(self, seed):
        self.seed = int(seed)
        with self.backend.device:
            self._gen = self._cupy.random.RandomState(self.seed)

    def normal(self, shape, std=1.0, dtype=None):
        with self.backend.device:
            return self._gen.standard_normal(shape, dtype=dtype or self._cupy.float32) * std

    def uniform(self, shape, low=0.0, high=1.0, dtype=None):
        with self.backend.device:
            u = self._gen.random_sample(shape, dtype=dtype or self._cupy.float32)
            return u * (high - low) + low

    def bernoulli(self, shape, p_one, dtype=None):
        with self.backend.device:
            u = self._gen.random_sample(shape, dtype=self._cupy.float32)
            return (u < p_one).astype(dtype or self._cupy.float32)

    def permutation(self, n):
        with self.backend.device:
            return self._gen.permutation(n).astype(self._cupy.int64)


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self, device: str = "cuda"):
        try:
            import cupy
            import array_api_compat.cupy as xp_cupy
        except Exception as e:  # ImportError, or a CUDA library that fails to load
            raise BackendError(f"--device {device} needs CuPy, which is not importable ({e}); "
                               + INSTALL_HINT) from e
        index = 0
        if ":" in str(device):
            try:
                index = int(str(device).split(":", 1)[1])
            except ValueError:
                raise BackendError(f"bad CUDA device {device!r}: use cuda or cuda:N") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:
            raise BackendError(f"CuPy is installed but no CUDA GPU is usable ({e}); "
                               "check the NVIDIA driver, or use --device cpu") from e
        if index >= count:
            raise BackendError(f"{device}: only {count} CUDA device(s) visible")
        self._cupy = cupy
        self.xp = xp_cupy
        self.device = cupy.cuda.Device(index)
        # CuPy (and array-api-compat's cupy namespace) allocate on the *current* device, so
        # zeros(..., device=...) alone would land on GPU 0: make ours current.
        self.device.use()
        self.array_type = cupy.ndarray

    def from_numpy(self, a, dtype=None):
        with self.device:
            return self._cupy.asarray(a, dtype=dtype)

    def to_numpy(self, x):
        return x.get()

    def device_of(self, x):
        return x.device

    def synchronize(self):
        self.device.synchronize()

    def device_rng(self, seed):
        return CupyRNG(self, seed)

    def versions(self):
        return {**super().versions(), "cupy": self._cupy.__version__,
                "cuda_runtime": self._cupy.cuda.runtime.runtimeGetVersion()}

    def memory_pool_bytes(self) -> int:
        return self._cupy.get_default_memory_pool().used_bytes()

    def describe(self):
        props = self._cupy.cuda.runtime.getDeviceProperties(self.device.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        free, total = self._cupy.cuda.runtime.memGetInfo()
        return (f"cupy {self._cupy.__version__} on cuda:{self.device.id} ({name}, "
                f"{total / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free)")
