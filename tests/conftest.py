"""Backend fixtures: every test that takes ``backend`` runs on each backend usable here —
NumPy, array-api-strict on its default device and on ``device1``, PyTorch CPU and, marked
``gpu``, CuPy and torch-CUDA. Backends are probed once at collection; those missing are named
in pytest's header (with what to install) instead of appearing as hundreds of skips, and
tests/test_gpu.py keeps one visible skip per missing GPU backend."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

from nnx.backends import BackendError, get_backend

CPU_BACKENDS = [("numpy", "cpu"), ("strict", "CPU_DEVICE"), ("strict", "device1"), ("torch", "cpu")]
GPU_BACKENDS = [("cupy", "cuda"), ("torch", "cuda")]
#: convolution configurations a library's conv2d pair is checked on against im2col
#: (in channels, out channels, kernel, stride, padding, input size): one input channel,
#: stride and no padding, wide padding, a 1x1 kernel, an even kernel with stride 3
CONV_PAIR_CASES = [(1, 4, 3, 1, 1, (7, 6)), (3, 5, 3, 2, 0, (9, 8)), (2, 3, 5, 1, 2, (6, 6)),
                   (4, 2, 1, 1, 0, (3, 5)), (2, 2, 4, 3, 1, (10, 7))]
#: what to install for each backend, for the header line
INSTALL_HINTS = {
    "strict": "pip install -e '.[test]'",
    "torch-cpu": "pip install -e '.[torch]'",
    "cupy-cuda": "an NVIDIA GPU and pip install -e '.[cuda12]' or '.[cuda13]'",
    "torch-cuda": "an NVIDIA GPU and a CUDA build of torch",
}


@functools.lru_cache(maxsize=None)
def backend_problem(name: str, device: str) -> str | None:
    """None when ``get_backend(name, device)`` works here, else why not (probed once)."""
    try:
        get_backend(name, device)
    except BackendError as e:
        return " ".join(str(e).split())
    return None


def _id(name, device):
    return f"{name}-{device}"


def _hint(name, device):
    return INSTALL_HINTS.get(_id(name, device)) or INSTALL_HINTS.get(name, "see README")


def _param(name, device, gpu=False):
    marks = [pytest.mark.gpu] if gpu else []
    return pytest.param((name, device), id=_id(name, device), marks=marks)


USABLE_BACKENDS = [(n, d) for n, d in CPU_BACKENDS + GPU_BACKENDS if backend_problem(n, d) is None]
MISSING_BACKENDS = [(n, d) for n, d in CPU_BACKENDS + GPU_BACKENDS if backend_problem(n, d) is not None]
#: the ``backend`` fixture's parameters: only backends usable here
ALL_BACKENDS = [_param(n, d, gpu=(n, d) in GPU_BACKENDS) for n, d in USABLE_BACKENDS]


def pytest_report_header(config):
    tested = ", ".join(_id(n, d) for n, d in USABLE_BACKENDS)
    missing = "; ".join(f"{_id(n, d)} ({_hint(n, d)})" for n, d in MISSING_BACKENDS)
    return f"nnx backends tested: {tested}" + (f" | not here: {missing}" if missing else "")


def make_backend(name, device):
    try:
        return get_backend(name, device)
    except BackendError as e:
        pytest.skip(f"{name} on {device} not available here: {e}")


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_library():
    """Small matmuls on torch's and OpenBLAS's thread pools spin for milliseconds on a busy
    2-core machine (30x slower); one thread keeps the tests fast. Restored afterwards."""
    import contextlib

    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(1))
        except ImportError:
            pass
        try:
            import torch
        except ImportError:
            torch = None
        before = torch.get_num_threads() if torch else None
        if torch:
            torch.set_num_threads(1)
        yield
        if torch:
            torch.set_num_threads(before)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Every backend usable here; float64 capable."""
    return make_backend(*request.param)


@pytest.fixture
def float32_only_backend():
    """array-api-strict's ``no_float64`` device: like Apple MPS, float32 only."""
    return make_backend("strict", "no_float64")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _has_mnist(folder: Path) -> bool:
    return (folder / "train-images-idx3-ubyte.gz").exists() or (folder / "train-images-idx3-ubyte").exists()


@functools.lru_cache(maxsize=None)
def shared_mnist_dir() -> Path | None:
    """The MNIST folder the CLI would use ($NNX_DATA_DIR, the download cache, system folders:
    ``nnx.datasets.find_data_dir``), else ../shared/data/mnist beside the repository; None
    when there is none (tests that need it skip)."""
    from nnx import datasets

    try:
        found = datasets.find_data_dir("mnist")
    except (datasets.DatasetError, OSError):  # damaged files: the CLI would refuse them too
        found = None
    if found is not None:
        return Path(found)
    env = os.environ.get("NNX_DATA_DIR")
    candidates = [Path(env).expanduser()] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist")
    return next((c for c in candidates if _has_mnist(c)), None)
