"""PyTorch tensors (CPU or CUDA) through array-api-compat; autograd is never used."""
import numpy as np

from .base import Backend, BackendError, CompileError


class TorchRNG:
    """Dropout masks and shuffles drawn by a ``torch.Generator`` on the tensor's device."""

    def __init__(self, backend, seed):
        import torch

        self.backend = backend
        self._torch = torch
        self._gen = torch.Generator(device=backend.device)
        self.reseed(seed)

    def reseed(self, seed):
        self.seed = int(seed)
        self._gen.manual_seed(self.seed)

    def normal(self, shape, std=1.0, dtype=None):
        t = self._torch.randn(shape, generator=self._gen, device=self.backend.device,
                              dtype=dtype or self._torch.float32)
        return t * std

    def uniform(self, shape, low=0.0, high=1.0, dtype=None):
        t = self._torch.rand(shape, generator=self._gen, device=self.backend.device,
                             dtype=dtype or self._torch.float32)
        return t * (high - low) + low

    def bernoulli(self, shape, p_one, dtype=None):
        t = self._torch.rand(shape, generator=self._gen, device=self.backend.device)
        return (t < p_one).to(dtype or self._torch.float32)

    def permutation(self, n):
        return self._torch.randperm(n, generator=self._gen, device=self.backend.device)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "cpu"):
        try:
            import torch
            import array_api_compat.torch as xp_torch
        except ImportError as e:
            raise BackendError(
                "the 'torch' backend needs PyTorch: pip install 'nnx[torch]' "
                "(or pip install torch)"
            ) from e
        self._torch = torch
        if str(device).startswith("cuda"):
            if not torch.cuda.is_available():
                raise BackendError(
                    f"--device {device} with the torch backend needs a CUDA build of PyTorch "
                    "and a visible NVIDIA GPU; torch.cuda.is_available() is False here"
                )
            dev = torch.device(device)
            if dev.index is None:  # tensors report "cuda:0", and torch.device("cuda") != that
                dev = torch.device("cuda", torch.cuda.current_device())
            if dev.index >= torch.cuda.device_count():
                raise BackendError(f"{device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        elif device == "cpu":
            dev = torch.device("cpu")
        else:
            raise BackendError(f"unknown torch device {device!r}: use cpu, cuda or cuda:N")
        self.xp = xp_torch
        self.device = dev
        self.array_type = torch.Tensor

    def from_numpy(self, a, dtype=None):
        t = self._torch.from_numpy(np.require(np.asarray(a), requirements="C"))  # keeps 0-D shape
        return t.to(device=self.device, dtype=dtype, copy=True)  # never shares memory with `a`

    def to_numpy(self, x):
        a = x.detach().cpu().numpy()
        # CPU tensors would share memory; np.require keeps a 0-D shape (ascontiguousarray
        # would make it 1-D)
        return a.copy() if x.device.type == "cpu" else np.require(a, requirements="C")

    def device_of(self, x):
        return x.device

    def check_compile(self, compiler="inductor"):
        if compiler == "inductor" and self.device.type != "cuda" and cxx_compiler() is None:
            raise CompileError("--compile on the CPU needs a C++ compiler for torch.compile's "
                               "generated code: install g++ (e.g. apt install g++, or conda "
                               "install gxx) or set CXX, or train without --compile")

    def compile(self, fn, mode=None, compiler="inductor"):
        """``torch.compile``: C++/OpenMP kernels on the CPU; Triton kernels and CUDA graphs
        (``mode="reduce-overhead"``) on CUDA. ``compiler`` is torch.compile's backend
        ("eager" traces without generating code: tests use it)."""
        self.check_compile(compiler)
        torch = self._torch
        if compiler != "inductor":
            return torch.compile(fn, backend=compiler, dynamic=False)
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        return torch.compile(fn, mode=mode, dynamic=False)

    def host_view(self, x):
        return x.detach().numpy() if x.device.type == "cpu" else None

    def take_rows(self, x, index):
        # array-api-compat's take wraps negative indices first (three more kernels per call);
        # the trainer's indices never are
        return self._torch.index_select(x, 0, index)

    def affine(self, x, w, b=None):
        return x @ w.T if b is None else self._torch.addmm(b, x, w.T)

    def matmul(self, a, b, out=None):
        return a @ b if out is None else self._torch.matmul(a, b, out=out)

    def sum(self, x, axis, out=None):
        t = self._torch
        return t.sum(x, dim=axis) if out is None else t.sum(x, dim=axis, out=out)

    def synchronize(self):
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

    def device_rng(self, seed):
        return TorchRNG(self, seed)

    def versions(self):
        return {**super().versions(), "torch": self._torch.__version__}

    def describe(self):
        t = self._torch
        if self.device.type == "cuda":
            p = t.cuda.get_device_properties(self.device)
            return (f"torch {t.__version__} on {self.device} ({p.name}, "
                    f"{p.total_memory / 2**30:.0f} GiB{self._fused()})")
        n = t.get_num_threads()
        return f"torch {t.__version__} on CPU ({n} thread{'s' * (n != 1)}{self._fused()})"

    def _fused(self):
        from .overrides import enabled

        n = len(self.overrides())
        return f", {n} fused operations" if enabled() else ", fused operations off"


def cxx_compiler():
    """The C++ compiler torch.compile's CPU code generation would use, if any."""
    import os
    import shutil

    if os.environ.get("CXX"):  # torch.compile uses $CXX when it is set, and only it
        return shutil.which(os.environ["CXX"])
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return shutil.which(name)
    return None
