"""Backends: selection and its errors, copies to and from NumPy, random streams, device checks.

Every test taking ``backend`` runs on NumPy, array-api-strict (CPU_DEVICE and device1),
PyTorch CPU, and on CuPy / torch-CUDA when a GPU is present.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

import nnx
from nnx.backends import (Backend, BackendError, BackendMismatchError, available_backends,
                          backend_of, get_backend)

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_CUPY = importlib.util.find_spec("cupy") is not None


# --- selection ------------------------------------------------------------------------------
def test_default_backend_is_numpy_on_cpu():
    b = get_backend()
    assert b.name == "numpy" and b.device == "cpu"
    assert get_backend("auto", "cpu").name == "numpy"
    assert get_backend("NumPy", "CPU").name == "numpy"  # names and devices are case-insensitive


def test_unknown_backend_name_raises_backend_error():
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        get_backend("nope")


def test_numpy_on_cuda_raises_backend_error():
    with pytest.raises(BackendError, match="CPU only"):
        get_backend("numpy", "cuda")


def test_cupy_needs_a_cuda_device():
    with pytest.raises(BackendError, match="needs --device cuda"):
        get_backend("cupy", "cpu")


@pytest.mark.skipif(HAS_CUPY, reason="CuPy is installed here")
def test_auto_cuda_without_cupy_says_what_to_install():
    # a BackendError (a RuntimeError), never a bare ImportError traceback
    with pytest.raises(BackendError) as info:
        get_backend("auto", "cuda")
    assert not isinstance(info.value, ImportError)
    msg = str(info.value)
    assert "pip install 'nnx[cuda12]'" in msg
    assert "cupy-cuda12x" in msg and "--device cpu" in msg


@pytest.mark.parametrize("name", ["auto", "cupy", "torch"])
@pytest.mark.parametrize("device", ["cuda:-1", "cuda:x", "cuda:", "cuda:1.5", "cuda: 0", "cuda:+0",
                                    "cuda:\u0663"])
def test_a_cuda_device_index_must_be_a_number(name, device):
    # checked before any library is imported: the same message with or without a GPU
    with pytest.raises(BackendError, match="cuda:N, N a GPU index"):
        get_backend(name, device)


def test_bad_strict_device_lists_the_choices():
    with pytest.raises(BackendError, match="no device 'device9'") as info:
        get_backend("strict", "device9")
    assert "no_float64" in str(info.value)


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_bad_torch_device_raises_backend_error():
    with pytest.raises(BackendError, match="unknown torch device"):
        get_backend("torch", "tpu")


def test_available_backends_includes_numpy_and_builds():
    found = available_backends()
    assert found[0] == ("numpy", "cpu")
    for name, device in found:
        assert isinstance(get_backend(name, device), Backend)
    if importlib.util.find_spec("array_api_strict") is not None:
        assert ("strict", "CPU_DEVICE") in found
    if HAS_TORCH:
        assert ("torch", "cpu") in found


# --- description and synchronisation ------------------------------------------------------
def test_describe_is_a_nonempty_one_liner(backend):
    text = backend.describe()
    assert isinstance(text, str) and text.strip()
    assert "\n" not in text
    lib = {"numpy": "numpy", "strict": "array-api-strict", "torch": "torch", "cupy": "cupy"}
    assert text.startswith(lib[backend.name])


def test_synchronize_runs_and_versions_report_numpy(backend):
    assert backend.synchronize() is None
    v = backend.versions()
    assert v["numpy"] == np.__version__
    assert backend.name in repr(backend) and backend.name in str(backend)


# --- copies to and from NumPy -------------------------------------------------------------
@pytest.mark.parametrize("np_dtype", [np.float32, np.float64, np.int64])
def test_to_numpy_from_numpy_round_trip(backend, np_dtype, rng):
    a = (rng.standard_normal((3, 4)) * 10).astype(np_dtype)
    x = backend.from_numpy(a)
    assert isinstance(x, backend.array_type)
    assert backend.device_of(x) == backend.device
    back = backend.to_numpy(x)
    assert isinstance(back, np.ndarray)
    assert back.dtype == np_dtype and back.shape == (3, 4)
    np.testing.assert_array_equal(back, a)


@pytest.mark.parametrize("shape", [(), (1,), (2, 3)])
def test_to_numpy_keeps_the_shape(backend, shape):
    """0-D arrays stay 0-D (counters such as BatchNorm's num_batches_tracked go through
    to_numpy into checkpoints, and a (1,) there no longer matches the model)."""
    a = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    back = backend.to_numpy(backend.from_numpy(a))
    assert back.shape == shape and back.flags.c_contiguous
    np.testing.assert_array_equal(back, a)


def test_from_numpy_casts_to_the_requested_dtype(backend, rng):
    a = rng.standard_normal((5,))
    x = backend.from_numpy(a, dtype=backend.float32)
    assert x.dtype == backend.float32
    np.testing.assert_array_equal(backend.to_numpy(x), a.astype(np.float32))


def test_copies_do_not_alias(backend):
    """from_numpy/to_numpy copy: checkpoints must not change when training updates in place."""
    a = np.zeros(4)
    x = backend.from_numpy(a)
    x[0] = 5.0
    assert a[0] == 0.0, "from_numpy returned a view of the host array"
    host = backend.to_numpy(x)
    x[1] = 7.0
    assert host[1] == 0.0, "to_numpy returned a view of the device array"
    host[2] = 9.0
    assert float(x[2]) == 0.0


def test_non_contiguous_host_arrays_are_accepted(backend):
    a = np.arange(12.0).reshape(3, 4).T  # Fortran-ordered view
    np.testing.assert_array_equal(backend.to_numpy(backend.from_numpy(a)), a)


def test_backend_of_recognises_arrays(backend):
    x = backend.from_numpy(np.ones(2))
    b = backend_of(x)
    assert b.name == backend.name and b.device_of(x) == backend.device


def test_backend_of_rejects_python_lists():
    with pytest.raises(Exception):
        backend_of([1.0, 2.0])


# --- dtypes -------------------------------------------------------------------------------
def test_dtype_names(backend):
    assert backend.dtype("float32") == backend.float32
    assert backend.dtype("float64") == backend.float64
    assert backend.dtype(backend.float32) == backend.float32
    assert backend.dtype_name(backend.float32) == "float32"
    assert backend.dtype_name(backend.float64) == "float64"
    with pytest.raises(ValueError, match="unsupported dtype 'float16'"):
        backend.dtype("float16")


def test_float64_refused_on_no_float64_device(float32_only_backend):
    b = float32_only_backend
    assert not b.supports_float64()
    assert b.dtype("float32") == b.float32
    with pytest.raises(BackendError, match="no float64"):
        b.dtype("float64")
    # host float64 data lands as float32 instead of failing
    x = b.from_numpy(np.array([0.5, 1.5]))
    assert x.dtype == b.float32


def test_supports_float64_on_regular_devices(backend):
    assert backend.supports_float64()


# --- random streams -----------------------------------------------------------------------
def _streams(backend, seed):
    return {"host": backend.host_rng(seed), "device": backend.device_rng(seed)}


@pytest.mark.parametrize("stream", ["host", "device"])
def test_permutation_is_a_reproducible_permutation(backend, stream):
    n = 257
    p1 = backend.to_numpy(_streams(backend, 3)[stream].permutation(n))
    p2 = backend.to_numpy(_streams(backend, 3)[stream].permutation(n))
    p3 = backend.to_numpy(_streams(backend, 4)[stream].permutation(n))
    np.testing.assert_array_equal(np.sort(p1), np.arange(n))
    np.testing.assert_array_equal(p1, p2)
    assert not np.array_equal(p1, p3)
    assert not np.array_equal(p1, np.arange(n))
    assert np.issubdtype(p1.dtype, np.integer)


@pytest.mark.parametrize("stream", ["host", "device"])
def test_reseed_restarts_the_stream(backend, stream):
    r = _streams(backend, 11)[stream]
    a = backend.to_numpy(r.uniform((50,)))
    b = backend.to_numpy(r.uniform((50,)))
    assert not np.array_equal(a, b)
    r.reseed(11)
    np.testing.assert_array_equal(backend.to_numpy(r.uniform((50,))), a)


@pytest.mark.parametrize("stream", ["host", "device"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_bernoulli_mean_is_p(backend, stream, p):
    n = 40_000
    m = backend.to_numpy(_streams(backend, 5)[stream].bernoulli((200, 200), p))
    assert m.shape == (200, 200) and m.dtype == np.float32
    assert set(np.unique(m).tolist()) <= {0.0, 1.0}
    tol = 5 * math.sqrt(p * (1 - p) / n)  # five standard errors
    assert abs(m.mean() - p) < tol


@pytest.mark.parametrize("stream", ["host", "device"])
def test_normal_and_uniform_statistics(backend, stream):
    r = _streams(backend, 6)[stream]
    z = backend.to_numpy(r.normal((100, 100), std=3.0, dtype=backend.float64))
    assert z.dtype == np.float64
    assert abs(z.mean()) < 5 * 3.0 / 100
    assert abs(z.std() - 3.0) < 0.05 * 3.0
    u = backend.to_numpy(r.uniform((100, 100), low=-2.0, high=4.0))
    assert u.dtype == np.float32
    assert u.min() >= -2.0 and u.max() <= 4.0
    assert abs(u.mean() - 1.0) < 0.1
    assert abs(u.std() - 6.0 / math.sqrt(12.0)) < 0.05


def test_host_stream_is_identical_on_every_backend(backend):
    """Initialisation draws on the host: the same seed gives bit-identical numbers everywhere."""
    ref = get_backend("numpy").host_rng(42).normal((7, 5), dtype=np.float64)
    got = backend.to_numpy(backend.host_rng(42).normal((7, 5), dtype=backend.float64))
    np.testing.assert_array_equal(got, ref)


# --- device and library checks ------------------------------------------------------------
def test_check_array_accepts_own_arrays(backend):
    backend.check_array(backend.from_numpy(np.ones((2, 2))))


def test_numpy_array_into_strict_device1_model():
    b = get_backend("strict", "device1")
    model = nnx.mlp((3, 2), backend=b)
    with pytest.raises(BackendMismatchError) as info:
        model(np.ones((2, 3), dtype=np.float32))
    msg = str(info.value)
    assert "numpy.ndarray" in msg and "strict" in msg and "device1" in msg
    assert "from_numpy" in msg


def test_strict_default_device_array_into_device1_model():
    b1 = get_backend("strict", "device1")
    b0 = get_backend("strict", "CPU_DEVICE")
    model = nnx.mlp((3, 2), backend=b1)
    x = b0.from_numpy(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(BackendMismatchError) as info:
        model(x)
    msg = str(info.value)
    assert "CPU_DEVICE" in msg and "device1" in msg


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_tensor_into_numpy_model():
    import torch

    model = nnx.mlp((3, 2))
    with pytest.raises(BackendMismatchError) as info:
        model(torch.ones((2, 3)))
    msg = str(info.value)
    assert "torch" in msg and "numpy backend" in msg


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_numpy_array_into_torch_model():
    model = nnx.mlp((3, 2), backend=get_backend("torch", "cpu"))
    with pytest.raises(BackendMismatchError, match="numpy.ndarray"):
        model(np.ones((2, 3), dtype=np.float32))


def test_mismatch_error_is_a_value_error():
    # callers catching ValueError for bad inputs also catch device mix-ups
    assert issubclass(BackendMismatchError, ValueError)
    assert issubclass(BackendError, RuntimeError)


def test_host_view_shares_memory_on_cpu_backends(backend):
    """MPI sums gradients in place through host_view: a write to the view reaches the array."""
    x = backend.from_numpy(np.zeros(3), dtype=backend.float64)
    view = backend.host_view(x)
    if view is None:
        pytest.skip(f"{backend} gives no host view (arrays are staged through the host)")
    view[1] = 5.0
    np.testing.assert_array_equal(backend.to_numpy(x), [0.0, 5.0, 0.0])
