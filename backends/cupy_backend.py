"""CuPy on an NVIDIA GPU through array-api-compat."""
import functools

from .base import Backend, BackendError

INSTALL_HINT = (
    "install CuPy for your CUDA version: pip install 'nnx[cuda12]' (cupy-cuda12x) or "
    "pip install 'nnx[cuda13]' (cupy-cuda13x); or run on the CPU with --device cpu"
)


class CupyRNG:
    """Dropout masks and shuffles drawn on the GPU (no host copies) by one counter-based
    generator (Philox4x32-10, cuRAND's device API through ``cupy.random.Generator``; no
    host-side cuRAND generator is created). ``reseed`` restarts it from a seed: a fresh
    ``Philox4x3210`` of ``STATES`` states (16 MiB, one initialisation kernel).

    CuPy's generator kernels give element i the (i // size)-th draw of state i % size, and
    ``size`` defaults to 2048 x the GPU's SM count, so the numbers for a seed would differ
    between GPU models; a fixed ``size`` makes them depend on the seed alone.
    ``Generator`` has no ``permutation`` (cupy/cupy#4557): orders are argsorted uniforms."""

    #: cuRAND states per generator (Philox4x3210's ``size``): fixed, see above
    STATES = 1 << 18  # about what CuPy picks on a 128-SM GPU

    def __init__(self, backend, seed):
        import cupy

        self.backend = backend
        self._cupy = cupy
        self.reseed(seed)

    def reseed(self, seed):
        self.seed = int(seed)
        with self.backend.device:
            self._gen = self._cupy.random.Generator(
                self._cupy.random.Philox4x3210(self.seed, size=self.STATES))

    def normal(self, shape, std=1.0, dtype=None):
        with self.backend.device:
            return self._gen.standard_normal(shape, dtype=dtype or self._cupy.float32) * std

    def uniform(self, shape, low=0.0, high=1.0, dtype=None):
        with self.backend.device:
            u = self._gen.random(shape, dtype=dtype or self._cupy.float32)
            return u * (high - low) + low

    def bernoulli(self, shape, p_one, dtype=None):
        with self.backend.device:
            u = self._gen.random(shape, dtype=self._cupy.float32)
            return (u < p_one).astype(dtype or self._cupy.float32)

    def permutation(self, n):
        with self.backend.device:
            # argsort of float64 uniforms: a uniform permutation (ties have probability ~n²/2⁵³)
            return self._cupy.argsort(self._gen.random(n, dtype=self._cupy.float64)).astype(
                self._cupy.int64)


@functools.cache
def _labelled_device_class():
    """``cupy.cuda.Device`` whose str() is ``cuda:N`` (the label the CLI, configs and the
    benchmark tables use for every GPU library); plain Device if it cannot be subclassed."""
    import cupy

    try:
        class CudaDevice(cupy.cuda.Device):
            def __str__(self):
                return f"cuda:{self.id}"

            __repr__ = __str__

            def __hash__(self):
                return hash(("cuda", self.id))

        return CudaDevice
    except TypeError:
        return cupy.cuda.Device


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self, device: str = "cuda"):
        try:
            import cupy
            import array_api_compat.cupy as xp_cupy
        except Exception as e:  # ImportError, or a CUDA library that fails to load
            raise BackendError(f"--device {device} needs CuPy, which is not importable ({e}); "
                               + INSTALL_HINT) from e
        index = None  # plain "cuda": the current device, as torch.device("cuda") means
        if ":" in str(device):
            try:
                index = int(str(device).split(":", 1)[1])
            except ValueError:
                raise BackendError(f"bad CUDA device {device!r}: use cuda or cuda:N") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
            if index is None:
                index = cupy.cuda.runtime.getDevice()
        except Exception as e:
            raise BackendError(f"CuPy is installed but no CUDA GPU is usable ({e}); "
                               "check the NVIDIA driver, or use --device cpu") from e
        if not 0 <= index < count:
            raise BackendError(f"{device}: only {count} CUDA device(s) visible "
                               f"(cuda:0 to cuda:{count - 1})")
        self._cupy = cupy
        self.xp = xp_cupy
        self.device = _labelled_device_class()(index)  # str(): "cuda:N"
        # CuPy (and array-api-compat's cupy namespace, which ignores device=) allocate and
        # launch on the *current* device. Making ours current here serves scripts that build
        # a model right after get_backend; work that must stay on this GPU whatever else
        # happened since (another backend built, another thread) runs inside activate(),
        # as the Trainer's epochs and evaluation do, and every method here enters it too.
        self.device.use()
        self.array_type = cupy.ndarray

    def activate(self):
        """``with backend.activate():`` makes this GPU current, and restores the previous."""
        return self.device  # cupy.cuda.Device is itself that context manager

    def from_numpy(self, a, dtype=None):
        with self.device:
            return self._cupy.asarray(a, dtype=dtype)

    def to_numpy(self, x):
        return x.get()

    def device_of(self, x):
        # the same label as self.device ("cuda:N", not "<CUDA Device N>"); compares equal
        # to any cupy.cuda.Device of that id
        return _labelled_device_class()(x.device.id)

    def synchronize(self):
        self.device.synchronize()

    def device_rng(self, seed):
        return CupyRNG(self, seed)

    def versions(self):
        return {**super().versions(), "cupy": self._cupy.__version__,
                "cuda_runtime": self._cupy.cuda.runtime.runtimeGetVersion()}

    def memory_pool_bytes(self) -> int:
        with self.device:  # the default pool reports the current device's usage
            return self._cupy.get_default_memory_pool().used_bytes()

    def describe(self):
        props = self._cupy.cuda.runtime.getDeviceProperties(self.device.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        with self.device:  # memGetInfo reads the current device
            free, total = self._cupy.cuda.runtime.memGetInfo()
        from .overrides import enabled

        fused = (", fused: " + ", ".join(self.overrides()) if enabled()
                 else ", fused kernels off")
        return (f"cupy {self._cupy.__version__} on cuda:{self.device.id} ({name}, "
                f"{total / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free{fused})")
