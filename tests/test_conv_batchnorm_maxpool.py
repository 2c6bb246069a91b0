"""A training Conv2D (im2col), the BatchNorm and the MaxPool2D after it, run by a chain as one
"conv_batchnorm_maxpool" pair: ``ConvBatchNormMaxPoolPair`` (nnx/layers/conv.py) composes
im2col and the "batchnorm_maxpool" pair; NumPy's (backends/numpy_ops.py) orders the column
matrix window by window, so that the pool reads four contiguous blocks.

Its sums run in another order, so every result agrees with the composition to rounding —
checked against the composition, torch's autograd and finite differences. Where it cannot
use that layout (odd output, other strides or pools, γ = 0, NaN) it runs the composition of
NumPy's pairs, which gives the standard path's forward exactly."""
from __future__ import annotations

import numpy as np
import pytest

import nnx
from nnx import layers as L
from nnx.architectures import PRESETS, build_layers
from nnx.backends import overrides
from nnx.backends.numpy_backend import NumpyBackend
from nnx.gradcheck import gradcheck
from nnx.layers.chain import conv_blocks, run_order
from nnx.layers.conv import ConvBatchNormMaxPoolPair
from tests_helpers_pairs import in_layout, small_cnn, step_results

NUMPY = overrides._load("numpy")["conv_batchnorm_maxpool"]
EPS = 1e-5


def _case(dtype, n, c, o, h, w, k, bias=False, gammas="mixed", layout="nchw", seed=0):
    rng = np.random.default_rng(seed)
    x = in_layout(rng.standard_normal((n, c, h, w)), layout).astype(dtype)
    wt = (rng.standard_normal((o, c, k, k)) / np.sqrt(c * k * k)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if bias else None
    gamma = rng.random(o) + 0.2
    if gammas == "negative":
        gamma = -gamma
    elif gammas == "mixed":
        gamma[::2] *= -1
    return x, wt, b, gamma.astype(dtype), rng.standard_normal(o).astype(dtype)


def _run(pair, x, w, b, padding, gamma, beta, k=2, s=2, p=0, stride=1, input_grad=True,
         grad_layout="channel-major"):
    (out, mean, var), saved = pair.forward(x.copy(order="K"), w, b, stride, padding, gamma,
                                           beta, EPS, k, s, p)
    g = np.random.default_rng(7).standard_normal(out.shape).astype(out.dtype)
    dx, dw, db, dgamma, dbeta = pair.backward(saved, in_layout(g, grad_layout), input_grad)
    return {"out": out, "mean": mean, "var": var, "dx": dx, "dw": dw, "db": db,
            "dgamma": dgamma, "dbeta": dbeta}, saved


def _close(got, want, dtype):
    rtol = 1e-11 if dtype == "float64" else 3e-5
    for key in want:
        if want[key] is None:
            assert got[key] is None, key
            continue
        assert got[key].shape == want[key].shape and got[key].dtype == want[key].dtype, key
        scale = max(1.0, float(np.max(np.abs(want[key]))))
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=rtol * scale, err_msg=key)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(3, 1, 4, 6, 8, 3, 1), (2, 3, 5, 8, 6, 3, 1),
                                   (2, 2, 3, 6, 6, 1, 0), (2, 3, 4, 8, 6, 5, 2),
                                   (2, 3, 4, 9, 7, 4, 1), (2, 2, 3, 6, 8, 3, 0),
                                   (4, 1, 32, 12, 10, 3, 1)])  # (n, c, o, h, w, k, padding)
@pytest.mark.parametrize("layout", ["nchw", "channel-major", "channels-last"])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("gammas", ["positive", "negative", "mixed"])
@pytest.mark.parametrize("bias", [False, True])
def test_numpy_pair_matches_the_composition(dtype, shape, layout, input_grad, gammas, bias):
    n, c, o, h, w, k, padding = shape
    x, wt, b, gamma, beta = _case(dtype, n, c, o, h, w, k, bias, gammas, layout)
    got, saved = _run(NUMPY, x, wt, b, padding, gamma, beta, input_grad=input_grad)
    want, _ = _run(ConvBatchNormMaxPoolPair, x, wt, b, padding, gamma, beta,
                   input_grad=input_grad)
    assert saved[0] is not None  # the window-by-window layout, not the fallback
    _close(got, want, dtype)
    if input_grad:
        assert got["dx"].shape == x.shape


@pytest.mark.parametrize("grad_layout", ["nchw", "channels-last"])
def test_a_gradient_in_another_layout_gives_the_same_results(grad_layout):
    x, wt, b, gamma, beta = _case("float64", 3, 2, 4, 6, 8, 3, True)
    got, _ = _run(NUMPY, x, wt, b, 1, gamma, beta, grad_layout=grad_layout)
    want, _ = _run(NUMPY, x, wt, b, 1, gamma, beta)
    _close(got, want, "float64")


@pytest.mark.parametrize("gammas", ["positive", "mixed"])
def test_ties_go_to_the_first_maximum_like_the_composition(gammas):
    """A 1×1 convolution with weight 1 passes integer-valued maps through unchanged: windows
    with equal values, whose gradient goes to the first of them in row-major order (of the
    maxima where γ > 0, of the minima where γ < 0) on both paths."""
    rng = np.random.default_rng(3)
    x = np.round(rng.standard_normal((4, 3, 6, 8)))
    wt = np.eye(3).reshape(3, 3, 1, 1)
    _, _, _, gamma, beta = _case("float64", 4, 3, 3, 6, 8, 1, gammas=gammas)
    got, saved = _run(NUMPY, x, wt, None, 0, gamma, beta)
    want, _ = _run(ConvBatchNormMaxPoolPair, x, wt, None, 0, gamma, beta)
    assert saved[0] is not None
    _close(got, want, "float64")


@pytest.mark.parametrize("case", ["odd output", "conv stride 2", "pool k3 s3", "pool k2 s1",
                                  "pool padding", "zero gamma", "nan"])
def test_where_it_cannot_use_the_window_layout_it_runs_the_composition(case):
    x, wt, b, gamma, beta = _case("float64", 3, 2, 4, 8, 6, 3, True)
    kwargs = {}
    if case == "odd output":
        x = x[:, :, :7]
    elif case == "conv stride 2":
        kwargs["stride"] = 2
    elif case == "zero gamma":
        gamma[1] = 0.0
    elif case == "nan":
        x[1, 0, 3, 2] = np.nan
    else:
        kwargs.update(zip("ksp", {"pool k3 s3": (3, 3, 0), "pool k2 s1": (2, 1, 0),
                                  "pool padding": (2, 2, 1)}[case]))
    with np.errstate(invalid="ignore"):  # (NaN in the statistics, on both paths)
        got, saved = _run(NUMPY, x, wt, b, 1, gamma, beta, **kwargs)
        want, _ = _run(ConvBatchNormMaxPoolPair, x, wt, b, 1, gamma, beta, **kwargs)
    assert saved[0] is None  # the composition of NumPy's pairs
    for key in ("out", "mean", "var"):  # its forward: the standard path's values exactly
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    if case != "nan":
        _close(got, want, "float64")


@pytest.mark.parametrize("gammas", ["positive", "mixed"])
@pytest.mark.parametrize("bias", [False, True])
def test_numpy_pair_against_torch_autograd(gammas, bias):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, wt, b, gamma, beta = _case("float64", 4, 3, 5, 10, 8, 3, bias, gammas, seed=5)
    got, _ = _run(NUMPY, x, wt, b, 1, gamma, beta)
    t = {name: torch.tensor(a, requires_grad=True) for name, a in
         (("x", x), ("w", wt), ("gamma", gamma), ("beta", beta)) + ((("b", b),) if bias else ())}
    y = F.conv2d(t["x"], t["w"], t.get("b"), padding=1)
    y = F.batch_norm(y, None, None, t["gamma"], t["beta"], training=True, eps=EPS)
    out = F.max_pool2d(y, 2)
    g = np.random.default_rng(7).standard_normal(tuple(out.shape))
    out.backward(torch.tensor(g))
    np.testing.assert_allclose(got["out"], out.detach().numpy(), rtol=1e-10, atol=1e-12)
    for mine, theirs in (("dx", "x"), ("dw", "w"), ("dgamma", "gamma"), ("dbeta", "beta"),
                         ("db", "b")):
        if theirs in t:
            np.testing.assert_allclose(got[mine], t[theirs].grad.numpy(), rtol=1e-9,
                                       atol=1e-10, err_msg=mine)
    # (the conv bias only moves the batch mean: its true gradient is 0, here rounding)
    if bias:
        assert np.max(np.abs(got["db"])) < 1e-10


@pytest.mark.parametrize("k, padding", [(3, 1), (1, 0), (1, 2), (1, 3), (3, 3), (5, 4),
                                        (4, 1), (3, 0)])
def test_the_self_check_sample_takes_the_windowin_layout(k, padding):
    """The first use of the pair compares it with the standard path on a small sample: that
    sample must exercise the window layout (not the fallback), γ of both signs included,
    whatever the kernel and padding (an odd output would only check the fallback)."""
    x, wt, b, gamma, beta = _case("float32", 128, 1, 32, 28, 28, k)
    sample = overrides.PAIR_SAMPLES["conv_batchnorm_maxpool"](
        NumpyBackend(), (x, wt, None, 1, padding, gamma, beta, EPS, 2, 2, 0),
        np.random.default_rng(0))
    (_, _, _), saved = NUMPY.forward(*sample)
    assert saved[0] is not None
    assert np.any(np.asarray(sample[5]) < 0) and np.any(np.asarray(sample[5]) > 0)


def test_a_wrong_override_is_caught_by_the_self_check(monkeypatch):
    """A planted bug in NumPy's pair (the routing sends every gradient to the window's first
    element) fails the first-use comparison: one warning, then the standard path."""
    class Wrong(type(NUMPY)):
        @staticmethod
        def backward(saved, grad, input_grad=True):
            saved = list(saved)
            if saved[0] is not None:
                saved[6] = np.ones_like(saved[6])      # top: always the top row
                saved[7] = np.ones_like(saved[7])      # left: always the left column
            return type(NUMPY).backward(tuple(saved), grad, input_grad)

    monkeypatch.setitem(overrides._load("numpy"), "conv_batchnorm_maxpool", Wrong)
    monkeypatch.setattr(overrides, "_CHECKED", {})
    model = _cnn(NumpyBackend(), "float64")
    with pytest.warns(RuntimeWarning, match="conv_batchnorm_maxpool"):
        model.forward(np.random.default_rng(0).standard_normal((2, 1, 12, 10)), train=True)
    assert model.layers[0].saved[1][0] is ConvBatchNormMaxPoolPair


def test_conv_blocks_finds_a_conv_batchnorm_and_maxpool_in_the_run_order():
    layers = [L.Conv2D(1, 4, 3, padding=1), L.BatchNorm(4), L.ReLU(), L.MaxPool2D(2),  # 0
              L.Conv2D(4, 4, 3, padding=1), L.BatchNorm(4), L.MaxPool2D(2),            # 4
              L.Conv2D(4, 4, 1), L.ReLU(), L.BatchNorm(4), L.MaxPool2D(2),             # no
              L.Conv2D(4, 4, 1), L.BatchNorm(4), L.AvgPool2D(2), L.Flatten()]          # no
    assert conv_blocks(layers, run_order(layers)) == {0: (1, 3), 4: (5, 6)}
    cnn = build_layers(PRESETS["cnn"], (1, 28, 28))
    assert conv_blocks(cnn, run_order(cnn)) == {0: (1, 3), 4: (5, 7)}
    fast = build_layers(PRESETS["cnn-fast"], (1, 28, 28))  # it pools before its batch norms
    assert conv_blocks(fast, run_order(fast)) == {}


def test_only_few_input_channels_fuse():
    """The pair is measured faster where the convolution has few input channels, k·C < O
    (im2col); a convolution with more (any padding, 1×1 too) runs its own passes."""
    def ran(conv, shape):
        model = nnx.Sequential([conv, L.BatchNorm(conv.out_channels), L.MaxPool2D(2)], shape,
                               backend=NumpyBackend(), seed=0)
        model.forward(np.random.default_rng(0).standard_normal((2, *shape)), train=True)
        return model._ran
    assert ran(L.Conv2D(1, 4, 3, padding=1), (1, 6, 4)) == [0]      # 3·1 < 4
    assert ran(L.Conv2D(2, 8, 1), (2, 6, 4)) == [0]                 # 1·2 < 8
    assert ran(L.Conv2D(8, 4, 3), (8, 8, 6)) == [0, 1]              # no "same" padding
    assert ran(L.Conv2D(8, 8, 1), (8, 6, 4)) == [0, 1]              # 1·8 = 8
    assert ran(L.Conv2D(2, 6, 3, padding=1), (2, 6, 4)) == [0, 1]   # 3·2 = 6: row-split
    assert ran(L.Conv2D(1, 4, 3, stride=2, padding=1), (1, 8, 8)) == [0, 1]


def _cnn(backend, dtype, seed=3, negative=()):
    """A small CNN whose first block (1 → 8 channels: k·C < O, im2col) NumPy runs as the
    three-layer pair and whose second (8 → 8: the row-split method) as the two-layer one;
    the input 12×10 keeps both outputs even. ``negative``: channels given γ = −0.7."""
    return small_cnn(backend, dtype, (8, 8), (1, 12, 10), seed, negative)


@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("negative", [(), (0, 3, 5)])
def test_a_model_runs_the_pair_where_its_backend_offers_it(backend, dtype, input_grad, negative,
                                                           monkeypatch):
    rng = np.random.default_rng(2)
    xh, gh = rng.standard_normal((6, 1, 12, 10)), rng.standard_normal((6, 10))
    fused = _cnn(backend, dtype, negative=negative)
    x, g = backend.from_numpy(xh, dtype=fused.dtype), backend.from_numpy(gh, dtype=fused.dtype)
    got, ran = step_results(fused, x, g, input_grad)
    offered = backend.offers("conv_batchnorm_maxpool")
    assert offered == (backend.name == "numpy")
    assert ran == ([0, 2, 4, 5, 6, 8, 9] if offered else [0, 1, 3, 2, 4, 5, 7, 6, 8, 9])
    # the same model with every layer on its own: the standard path
    monkeypatch.setattr(overrides, "_STATE", {"enabled": False})
    want, ran = step_results(_cnn(backend, dtype, negative=negative), x, g, input_grad)
    assert ran == list(range(10))
    assert got.keys() == want.keys()
    _close({k: v for k, v in got.items() if not k.startswith("buffer ") or "num_" not in k},
           {k: v for k, v in want.items() if not k.startswith("buffer ") or "num_" not in k},
           dtype)
    np.testing.assert_array_equal(got["buffer 1.num_batches_tracked"], 1)
    if backend.name == "numpy":
        conv, bn, pool = fused.layers[0], fused.layers[1], fused.layers[3]
        assert conv.saved is None and bn.saved is None  # its backward cleared them
        assert pool.saved[0].__name__ == "_RanInPair"


def test_a_block_after_other_layers_passes_its_input_gradient_on():
    """A three-layer block that is not the model's first: its col2im (the window layout's
    transpose) reaches the layers below, checked against the standard path."""
    def build():
        return nnx.Sequential([L.Conv2D(2, 2, 1), L.ReLU(), L.Conv2D(2, 7, 3, padding=1),
                               L.BatchNorm(7), L.ReLU(), L.MaxPool2D(2), L.Flatten(),
                               L.Dense(7 * 4 * 3, 3)], (2, 8, 6), backend=NumpyBackend(),
                              dtype="float64", seed=1)
    rng = np.random.default_rng(4)
    x, g = rng.standard_normal((5, 2, 8, 6)), rng.standard_normal((5, 3))
    got, ran = step_results(build(), x, g, True)
    assert ran == [0, 1, 2, 4, 6, 7]  # (the ReLU runs after the pool)
    overrides.set_enabled(False)
    try:
        want, _ = step_results(build(), x, g, True)
    finally:
        overrides.set_enabled(True)
    _close(got, want, "float64")


def test_gradcheck_through_the_pair_in_training():
    model = _cnn(NumpyBackend(), "float64", negative=(2, 5))
    x = np.random.default_rng(4).standard_normal((3, 1, 12, 10))
    y = np.array([1, 7, 3])
    model.forward(x, train=True)
    assert model._ran == [0, 2, 4, 5, 6, 8, 9]  # the pair runs in these forwards
    errors = gradcheck(model, x, y, train=True)
    assert max(errors.values()) < 1e-6, errors


def test_layers_driven_one_by_one_after_the_chain_fused_them():
    model = _cnn(NumpyBackend(), "float64")
    conv, bn, relu, pool = model.layers[:4]
    x = np.random.default_rng(5).standard_normal((2, 1, 12, 10))
    model.forward(x, train=True)
    with pytest.raises(RuntimeError, match="inside one pair with .*Conv2D before it"):
        bn.backward(np.ones((2, 8, 12, 10)))
    with pytest.raises(RuntimeError, match="inside one pair with .*Conv2D before it"):
        pool.backward(np.ones((2, 8, 6, 5)))
    # the convolution's own backward takes the pooled gradient, and says so
    with pytest.raises(RuntimeError, match=r"max pool's output gradient, shape \(2, 8, 6, 5\); "
                                           r"got shape \(2, 8, 12, 10\)"):
        conv.backward(np.ones((2, 8, 12, 10)))
    model.forward(x, train=True)
    model.backward(np.ones((2, 10)))  # the chain's own backward still works
    # and one by one they run their own passes again
    y = pool.forward(relu.forward(bn.forward(conv.forward(x, True), True), True), True)
    dx = conv.backward(bn.backward(relu.backward(pool.backward(np.ones_like(y)))))
    assert dx.shape == x.shape and conv.weight.grad.shape == (8, 1, 3, 3)


def test_the_cnn_preset_runs_its_first_block_as_the_pair():
    model = nnx.Sequential(build_layers(PRESETS["cnn"], (1, 28, 28)), (1, 28, 28),
                           backend=NumpyBackend(), seed=0)
    model.forward(np.zeros((2, 1, 28, 28)) + np.arange(28) / 28, train=True)
    # block 1 (1 → 32) as the three-layer pair; block 2 (32 → 64, the row-split
    # convolution) with the two-layer pair after it
    assert model._ran[:5] == [0, 2, 4, 5, 6]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_standard_pair_on_every_backend_against_torch_autograd(backend, dtype):
    """``ConvBatchNormMaxPoolPair`` (the reference every backend falls back to) in the
    backend's own arrays, against torch's autograd in float64."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, wt, b, gamma, beta = _case("float64", 3, 2, 5, 8, 6, 3, True, "mixed", seed=9)
    g = np.random.default_rng(7).standard_normal((3, 5, 4, 3))
    dev = [backend.from_numpy(a, dtype=backend.dtype(dtype)) for a in (x, wt, b, gamma, beta, g)]
    (out, mean, var), saved = ConvBatchNormMaxPoolPair.forward(*dev[:3], 1, 1, *dev[3:5], EPS,
                                                               2, 2, 0)
    got = [out, mean, var, *ConvBatchNormMaxPoolPair.backward(saved, dev[5], True)]
    t = [torch.tensor(a, requires_grad=True) for a in (x, wt, b, gamma, beta)]
    y = F.conv2d(t[0], t[1], t[2], padding=1)
    want_mean, want_var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    pooled = F.max_pool2d(F.batch_norm(y, None, None, t[3], t[4], training=True, eps=EPS), 2)
    pooled.backward(torch.tensor(g))
    want = [pooled, want_mean, want_var] + [a.grad for a in t]
    tol = 1e-9 if dtype == "float64" else 2e-4
    for name, a, w in zip(("out", "mean", "var", "dx", "dw", "db", "dgamma", "dbeta"), got, want):
        w = w.detach().numpy()
        np.testing.assert_allclose(backend.to_numpy(a), w, rtol=tol,
                                   atol=tol * max(1.0, float(np.max(np.abs(w)))), err_msg=name)
