"""A ReLU directly before a MaxPool2D runs after it (nnx.layers.chain.run_order): the same
outputs and gradients, bit for bit, as the layers' own order, on every backend."""
from __future__ import annotations

import numpy as np
import pytest

import nnx
from nnx import layers as L
from nnx.backends import overrides
from nnx.layers.chain import run_order


def test_run_order_swaps_only_relu_then_a_non_overlapping_maxpool():
    layers = [L.Conv2D(1, 4, 3, padding=1), L.ReLU(), L.MaxPool2D(2), L.ReLU(), L.MaxPool2D(2),
              L.LeakyReLU(), L.MaxPool2D(2), L.ReLU(), L.AvgPool2D(2), L.MaxPool2D(2), L.ReLU(),
              L.Flatten(), L.ReLU(), L.MaxPool2D(3, stride=1, padding=1), L.ReLU(),
              L.MaxPool2D(3, stride=3, padding=1)]
    assert run_order(layers) == [0, 2, 1, 4, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 14]
    assert run_order([]) == [] and run_order([L.ReLU()]) == [0]


def _layers(kind):
    if kind == "cnn":
        return [L.Conv2D(1, 4, 3, padding=1), L.BatchNorm(4), L.ReLU(), L.MaxPool2D(2),
                L.Conv2D(4, 6, 3, padding=1), L.ReLU(), L.MaxPool2D(2), L.Flatten(),
                L.Dense(6 * 7 * 7, 10)]
    # padded windows (moved), overlapping ones (kept in place), inside a residual block too
    return [L.Conv2D(1, 4, 3, padding=1), L.ReLU(), L.MaxPool2D(3, stride=1, padding=1),
            L.Residual([L.Conv2D(4, 4, 3, padding=1), L.ReLU(), L.MaxPool2D(3, stride=1, padding=1)]),
            L.ReLU(), L.MaxPool2D(3, stride=3, padding=1), L.Flatten(), L.Dense(4 * 10 * 10, 10)]


def _run(backend, kind, reorder, x, g, dtype):
    model = nnx.Sequential(_layers(kind), (1, 28, 28), backend=backend, dtype=dtype, seed=3)
    for chain in model.walk():
        if isinstance(chain, L.Chain):
            chain.reorder = reorder
    xd = backend.from_numpy(x, dtype=model.dtype)
    out = model.forward(xd, train=True)
    dx = model.backward(backend.from_numpy(g, dtype=model.dtype), input_grad=True)
    res = {"out": out, "dx": dx, "infer": model.forward(xd, train=False)}
    res.update({f"grad {k}": p.grad for k, p in model.named_parameters().items()})
    return {k: backend.to_numpy(v) for k, v in res.items()}


@pytest.mark.parametrize("kind", ["cnn", "padded"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relu_after_maxpool_gives_the_same_numbers(backend, kind, dtype, monkeypatch):
    """Inputs rounded to a few levels, half of them negative: windows with ties, windows
    all ≤ 0 (where ReLU makes the ties), and exact zeros. (Without the "batchnorm_maxpool"
    and "conv_batchnorm_maxpool" pairs, which the new order lets NumPy run and which round
    differently: tests/test_batchnorm_maxpool.py, tests/test_conv_batchnorm_maxpool.py.)"""
    for name in ("batchnorm_maxpool", "conv_batchnorm_maxpool"):
        monkeypatch.delitem(overrides._load(backend.name), name, raising=False)
    rng = np.random.default_rng(7)
    x = np.round(rng.standard_normal((5, 1, 28, 28)) * 2) / 2
    g = rng.standard_normal((5, 10))
    ref = _run(backend, kind, False, x, g, dtype)
    new = _run(backend, kind, True, x, g, dtype)
    assert ref.keys() == new.keys()
    # torch on CUDA: cuDNN's convolution backward need not give the same bits twice (seen on
    # an H200: 1e-16 apart in float64 with both orders), so there the two agree to rounding
    exact = not (backend.name == "torch" and str(backend.device).startswith("cuda"))
    for k in ref:
        if exact:
            np.testing.assert_array_equal(new[k], ref[k], err_msg=k)
        else:
            np.testing.assert_allclose(new[k], ref[k], err_msg=k,
                                       rtol=1e-12 if dtype == "float64" else 1e-5, atol=1e-12)
    assert np.any(ref["dx"] != 0)


def test_no_fused_runs_the_layers_own_order():
    model = nnx.Sequential(_layers("cnn"), (1, 28, 28), seed=0)
    assert list(model._order()) == [0, 1, 3, 2, 4, 6, 5, 7, 8]
    overrides.set_enabled(False)
    try:
        assert list(model._order()) == list(range(9))
    finally:
        overrides.set_enabled(True)


def test_layers_run_one_by_one_then_the_models_backward():
    """Driving the layers by hand (a profiler, a student) and then calling the model's
    backward: the layers' own order, since no forward of the model set another."""
    model = nnx.Sequential(_layers("cnn"), (1, 28, 28), seed=0)
    h = x = np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32)
    for layer in model.layers:
        h = layer.forward(h, train=True)
    dx = model.backward(np.ones((2, 10), np.float32))
    assert dx.shape == x.shape


@pytest.mark.parametrize("before", ["inference", "failed forward"])
def test_layers_run_by_hand_after_another_forward(before):
    """An inference forward (predict) or a forward that raised part-way leaves no order for
    a later backward: layers driven by hand then get the layers' own order."""
    model = nnx.Sequential(_layers("cnn"), (1, 28, 28), seed=0)
    x = np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32)
    if before == "inference":
        model.predict(x)
    else:
        dense = model.layers[-1]
        dense.forward = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError):
            model.forward(x, train=True)
        del dense.forward
    h = x
    for layer in model.layers:
        h = layer.forward(h, train=True)
    assert model.backward(np.ones((2, 10), np.float32)).shape == x.shape


def test_backward_follows_the_order_its_forward_ran():
    """Overrides switched off between forward and backward: backward still walks the
    forward's order (it would hand a ReLU a gradient of the wrong shape otherwise)."""
    model = nnx.Sequential(_layers("cnn"), (1, 28, 28), seed=0)
    x = np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32)
    model.forward(x, train=True)
    overrides.set_enabled(False)
    try:
        dx = model.backward(np.ones((2, 10), np.float32))
    finally:
        overrides.set_enabled(True)
    assert dx.shape == x.shape
