"""CuPy's pairs (backends/cupy_pairs.py) on the CPU: their kernels' bodies compiled as C++
(the same source strings CuPy compiles for the GPU) and the pairs' Python run on NumPy
arrays, against the standard pairs. This checks the index arithmetic of im2col, col2im and
max pooling, the layouts and the first-maximum rule where no GPU is; tests/test_gpu.py runs
the real kernels. Skipped without a C++ compiler."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import CONV_PAIR_CASES
from nnx.backends import cupy_pairs
from nnx.layers.batchnorm import BatchNormPair
from nnx.layers.conv import Im2colPair, out_size
from nnx.layers.pool import MaxPoolPair

CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler (g++)")
C_TYPES = {"int64": ("long long", ctypes.c_longlong), "int32": ("int", ctypes.c_int),
           "bool": ("bool", ctypes.c_bool)}


def _params(spec):
    """'raw T x, int64 n' -> [(raw, type, name), ...]"""
    out = []
    for part in spec.split(","):
        words = part.split()
        raw = words[0] == "raw"
        out.append((raw, *words[raw:]))
    return out


def _cxx_type(t):
    return "T" if t == "T" else C_TYPES[t][0]


def _source():
    lines = ["#include <algorithm>", "using std::min;"]
    for name, (ins, outs, body) in cupy_pairs.RAW_KERNELS.items():
        args = ["long long size"]
        for raw, t, n in _params(ins):
            args.append(f"const {_cxx_type(t)}* {n}" if raw else f"{_cxx_type(t)} {n}")
        binds = []
        for _, t, n in _params(outs):
            args.append(f"{_cxx_type(t)}* out_{n}")
            binds.append(f"{_cxx_type(t)}& {n} = out_{n}[i];")
        lines.append(f"template <typename T> void {name}({', '.join(args)}) {{\n"
                     f"  for (long long i = 0; i < size; ++i) {{ {' '.join(binds)}\n{body}\n  }}\n}}")
        names = [a.split()[-1] for a in args]
        for ctype in ("float", "double"):
            sig = ", ".join(a.replace("T", ctype) if a.startswith(("const T", "T")) else a
                            for a in args)
            lines.append(f'extern "C" void {name}_{ctype}({sig}) {{ {name}<{ctype}>({", ".join(names)}); }}')
    return "\n".join(lines)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """The raw kernels as C++ functions called like CuPy kernels (inputs, then outputs)."""
    folder = tmp_path_factory.mktemp("cupy_pairs_cxx")
    src, lib = folder / "kernels.cpp", folder / "kernels.so"
    src.write_text(_source())
    subprocess.run([CXX, "-O1", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True,
                   capture_output=True)
    so = ctypes.CDLL(str(lib))

    def make(name):
        ins, outs, _ = cupy_pairs.RAW_KERNELS[name]
        kinds = _params(ins) + _params(outs)

        def call(*args):
            assert len(args) == len(kinds), name
            first_out = args[len(_params(ins))]
            ctype = "float" if first_out.dtype == np.float32 else "double"
            c_args = [ctypes.c_longlong(first_out.size)]
            for (raw, t, n), a in zip(kinds, args):
                if isinstance(a, np.ndarray):
                    assert a.flags.c_contiguous, (name, n)  # the kernels index flat memory
                    c_args.append(ctypes.c_void_p(a.ctypes.data))
                else:
                    c_args.append(C_TYPES[t][1](a))
            getattr(so, f"{name}_{ctype}")(*c_args)

        return call

    k = {name: make(name) for name in cupy_pairs.RAW_KERNELS}
    k.update({"sum": lambda x, axis: np.add.reduce(x, axis=axis),
              "dot": lambda x, z, axis: np.add.reduce(x * z, axis=axis),
              "center": lambda x, mean: x - mean,
              "affine": lambda xc, scale, shift: xc * scale + shift,
              "bn_dx": lambda xc, g, k1, k2, neg_a: ((xc * k1 - g) + k2) * neg_a})
    return k


@pytest.fixture
def on_cpu(monkeypatch, kernels):
    """The pairs' ``import cupy`` gets NumPy's functions; their kernels the C++ ones."""
    fake = types.ModuleType("cupy")
    fake.empty, fake.ascontiguousarray, fake.int32 = np.empty, np.ascontiguousarray, np.int32
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cupy_pairs, "_kernels", lambda: kernels)


def _layout(a, channel_major):
    """``a`` (N, C, H, W) with its planes channel-major in memory, as a convolution gives."""
    return np.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3) if channel_major else a


def _close(got, want, dtype):
    """Sums of many products in another order: the absolute error grows with the magnitudes."""
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g.shape == w.shape
        scale = max(1.0, float(np.abs(w[np.isfinite(w)]).max(initial=0.0)))
        rtol = 1e-5 if dtype == "float32" else 1e-12
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("c,o,k,s,p,hw", CONV_PAIR_CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channel_major", [False, True])
def test_conv2d_pair_matches_im2col(on_cpu, dtype, c, o, k, s, p, hw, bias, channel_major):
    rng = np.random.default_rng(11)
    x = _layout(rng.standard_normal((3, c, *hw)).astype(dtype), channel_major)
    w = rng.standard_normal((o, c, k, k)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if bias else None
    grad = rng.standard_normal((3, o, out_size(hw[0], k, s, p), out_size(hw[1], k, s, p))).astype(dtype)
    for input_grad in (True, False):
        want_y, want_saved = Im2colPair.forward(x, w, b, s, p)
        got_y, got_saved = cupy_pairs.CupyConv2D.forward(x, w, b, s, p)
        _close([got_y], [want_y], dtype)
        _close(cupy_pairs.CupyConv2D.backward(got_saved, grad, input_grad),
               Im2colPair.backward(want_saved, grad, input_grad), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k,s,p,hw", [(2, 2, 0, (8, 6)), (2, 2, 0, (7, 5)), (3, 2, 1, (7, 8)),
                                      (3, 1, 1, (5, 5)), (2, 1, 0, (4, 6))])
@pytest.mark.parametrize("channel_major", [False, True])
def test_maxpool_pair_matches_the_standard_path(on_cpu, dtype, k, s, p, hw, channel_major):
    """Overlapping and disjoint windows, odd sizes, padding, and ties: the first maximum of
    a window takes its gradient on both paths."""
    rng = np.random.default_rng(14)
    x = np.round(rng.standard_normal((2, 3, *hw)), 1).astype(dtype)  # many ties
    x[0, 0] = 1.0  # a whole map of ties
    x = _layout(x, channel_major)
    want_out, want_saved = MaxPoolPair.forward(x, k, s, p, True)
    got_out, got_saved = cupy_pairs.CupyMaxPool.forward(x, k, s, p, True)
    np.testing.assert_array_equal(got_out, want_out)
    assert (got_out.transpose(1, 0, 2, 3) if channel_major else got_out).flags.c_contiguous
    inference, nothing = cupy_pairs.CupyMaxPool.forward(x, k, s, p, False)
    np.testing.assert_array_equal(inference, want_out)
    assert nothing is None
    grad = rng.standard_normal(want_out.shape).astype(dtype)
    _close([cupy_pairs.CupyMaxPool.backward(got_saved, grad, True)],
           [MaxPoolPair.backward(want_saved, grad, True)], dtype)


def test_maxpool_pair_sends_a_nan_windows_gradient_to_its_first_nan(on_cpu):
    x = np.zeros((1, 1, 2, 4))
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = np.nan
    x[0, 0, 1, 3] = np.inf
    out, saved = cupy_pairs.CupyMaxPool.forward(x, 2, 2, 0, True)
    assert np.isnan(out[0, 0, 0, 0]) and out[0, 0, 0, 1] == np.inf
    dx = cupy_pairs.CupyMaxPool.backward(saved, np.array([[[[2.0, 3.0]]]]), True)
    np.testing.assert_array_equal(dx[0, 0], [[0, 2, 0, 0], [0, 0, 0, 3]])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 4, 7)])
@pytest.mark.parametrize("channel_major", [False, True])
def test_batchnorm_pair_matches_the_standard_path(on_cpu, dtype, shape, channel_major):
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    if len(shape) == 4:
        x = _layout(x, channel_major)
    weight, bias = rng.standard_normal(shape[1]).astype(dtype), rng.standard_normal(shape[1]).astype(dtype)
    grad = rng.standard_normal(shape).astype(dtype)
    for input_grad in (True, False):
        (want, want_saved), (got, got_saved) = (pair.forward(x, weight, bias, 1e-5)
                                                for pair in (BatchNormPair, cupy_pairs.CupyBatchNorm))
        _close(got, want, dtype)
        _close(cupy_pairs.CupyBatchNorm.backward(got_saved, grad, input_grad),
               BatchNormPair.backward(want_saved, grad, input_grad), dtype)


def test_every_cupy_pair_is_registered():
    from nnx.backends import overrides

    reg = overrides._load("cupy")
    assert (reg["conv2d"], reg["maxpool"], reg["batchnorm"]) == (
        cupy_pairs.CupyConv2D, cupy_pairs.CupyMaxPool, cupy_pairs.CupyBatchNorm)
