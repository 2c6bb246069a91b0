"""Backend fixtures: every test that takes ``backend`` runs on each CPU backend present
(NumPy, array-api-strict on its default device and on ``device1``, PyTorch CPU) and, marked
``gpu``, on CuPy and torch-CUDA when a GPU is there."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from nnx.backends import BackendError, get_backend

CPU_BACKENDS = [("numpy", "cpu"), ("strict", "CPU_DEVICE"), ("strict", "device1"), ("torch", "cpu")]
GPU_BACKENDS = [("cupy", "cuda"), ("torch", "cuda")]


def _param(name, device, gpu=False):
    marks = [pytest.mark.gpu] if gpu else []
    return pytest.param((name, device), id=f"{name}-{device}", marks=marks)


ALL_BACKENDS = [_param(n, d) for n, d in CPU_BACKENDS] + [_param(n, d, True) for n, d in GPU_BACKENDS]


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
    """Every backend present; float64 capable."""
    return make_backend(*request.param)


@pytest.fixture
def float32_only_backend():
    """array-api-strict's ``no_float64`` device: like Apple MPS, float32 only."""
    return make_backend("strict", "no_float64")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def shared_mnist_dir() -> Path | None:
    """The MNIST files from NNX_DATA_DIR or ../shared/data/mnist beside the repo, if present."""
    env = os.environ.get("NNX_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist")
    for c in candidates:
        if (c / "train-images-idx3-ubyte.gz").exists() or (c / "train-images-idx3-ubyte").exists():
            return c
    return None
