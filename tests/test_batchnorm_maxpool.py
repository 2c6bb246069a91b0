"""A training BatchNorm and the MaxPool2D right after it, run by a chain as one
"batchnorm_maxpool" pair: ``BatchNormMaxPoolPair`` (nnx/layers/batchnorm.py) composes the two
layers' pairs; NumPy's (backends/numpy_ops.py) pools first and normalises the pooled quarter.

Its forward gives the composition's values bit for bit (a max commutes with an increasing
map, and each rounding of the map is monotone); its backward sums in another order, so dx, dγ
and dβ agree to rounding — checked against the composition, against torch's autograd, and
against finite differences. Where it cannot pool first (γ = 0, NaN or ±inf, other pools) it
runs the composition of NumPy's own pairs, which give the standard path's values exactly."""
from __future__ import annotations

import numpy as np
import pytest

import nnx
from nnx import layers as L
from nnx.backends import overrides
from nnx.backends.numpy_backend import NumpyBackend
from nnx.gradcheck import gradcheck
from nnx.layers.batchnorm import BatchNormMaxPoolPair
from nnx.architectures import PRESETS, build_layers
from nnx.layers.chain import pooled_pairs, run_order
from tests_helpers_pairs import in_layout, small_cnn, step_results

NUMPY = overrides._load("numpy")["batchnorm_maxpool"]


@pytest.fixture(autouse=True)
def _without_the_conv_block(monkeypatch):
    """The models here start with a few-channel convolution, which NumPy would run with its
    batch norm and max pool as the three-layer pair: take that pair out, so that these
    tests see the two-layer one (tests/test_conv_batchnorm_maxpool.py tests the other)."""
    monkeypatch.delitem(overrides._load("numpy"), "conv_batchnorm_maxpool", raising=False)


EPS = 1e-5


def _case(dtype, shape, layout, seed=0, ties=False, gammas="mixed"):
    """Maps, γ and β; ``gammas``: "positive", "negative" or "mixed" (channel 0 negative): where
    γ < 0 the normalisation decreases, and the pool picks the minimum of x."""
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    x = rng.standard_normal(shape) * 2 + 0.5
    if ties:  # a few levels: windows with equal values
        x = np.round(x)
    weight = rng.random(c) + 0.2
    if gammas == "negative":
        weight = -weight
    elif gammas == "mixed":
        weight[0] = -weight[0]
    bias = rng.standard_normal(c)
    return in_layout(x, layout).astype(dtype), weight.astype(dtype), bias.astype(dtype)


def _grad(out, layout, seed=1):
    g = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
    return in_layout(g, layout)


def _run(pair, x, weight, bias, k, s, p, grad_layout="channel-major", input_grad=True):
    (out, mean, var), saved = pair.forward(x.copy(order="K"), weight, bias, EPS, k, s, p)
    dx, dgamma, dbeta = pair.backward(saved, _grad(out, grad_layout), input_grad)
    return {"out": out, "mean": mean, "var": var, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}, saved


def _close(got, want, dtype):
    rtol = 1e-12 if dtype == "float64" else 2e-5
    for k in want:
        if want[k] is None:
            assert got[k] is None, k
            continue
        scale = max(1.0, float(np.max(np.abs(want[k]))))
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=rtol * scale, err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(4, 3, 8, 6), (3, 2, 7, 5), (2, 3, 2, 2), (5, 1, 4, 9),
                                   (3, 4, 6, 6), (2, 8, 4, 5)])  # (4 and 8 channels: rows
@pytest.mark.parametrize("layout", ["channel-major", "nchw", "channels-last"])  # strided by 4, 8)
@pytest.mark.parametrize("grad_layout", ["channel-major", "nchw"])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("gammas", ["positive", "negative", "mixed"])
def test_numpy_pair_pools_first_and_matches_the_composition(dtype, shape, layout, grad_layout,
                                                            input_grad, gammas):
    x, weight, bias = _case(dtype, shape, layout, gammas=gammas)
    got, saved = _run(NUMPY, x, weight, bias, 2, 2, 0, grad_layout, input_grad)
    want, _ = _run(BatchNormMaxPoolPair, x, weight, bias, 2, 2, 0, grad_layout, input_grad)
    assert saved[0] is not None  # pooled first, not the fallback
    for k in ("out", "mean", "var"):  # the forward: bit for bit
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert got[k].dtype == want[k].dtype
    _close(got, want, dtype)
    if input_grad:
        assert got["dx"].shape == x.shape and got["dx"].dtype == x.dtype
        # odd sizes: the rows and columns no window covers get the statistics' share only
        assert np.all(got["dx"] != 0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("gammas", ["positive", "mixed"])
def test_ties_in_x_route_to_the_same_first_maximum(dtype, gammas):
    """Equal values in a window are equal after the normalisation too, and both paths send
    the gradient to the first of them in row-major order (of the maxima of x where γ > 0,
    of the minima where γ < 0)."""
    x, weight, bias = _case(dtype, (4, 3, 6, 8), "channel-major", ties=True, gammas=gammas)
    got, saved = _run(NUMPY, x, weight, bias, 2, 2, 0)
    want, _ = _run(BatchNormMaxPoolPair, x, weight, bias, 2, 2, 0)
    assert saved[0] is not None
    np.testing.assert_array_equal(got["out"], want["out"])
    _close(got, want, dtype)
    # where the composition's gradient is 0, so is the pair's (no element picked twice)
    shares = want["dx"] - got["dx"]
    assert np.max(np.abs(shares)) < 1e-4


@pytest.mark.parametrize("case", ["zero gamma", "nan", "inf", "k3 s3", "k2 s1", "padding",
                                  "k3 s2 p1"])
def test_where_it_cannot_pool_first_it_runs_the_composition_exactly(case):
    x, weight, bias = _case("float64", (3, 2, 7, 6), "channel-major")
    k, s, p = 2, 2, 0
    if case == "zero gamma":
        weight[0] = 0.0
    elif case == "nan":
        x[1, 0, 3, 2] = np.nan
    elif case == "inf":
        x[0, 1, 0, 0] = np.inf
    else:
        k, s, p = {"k3 s3": (3, 3, 0), "k2 s1": (2, 1, 0), "padding": (2, 2, 1),
                   "k3 s2 p1": (3, 2, 1)}[case]
    with np.errstate(invalid="ignore"):  # (inf − inf in the statistics, on both paths)
        _same_as_the_composition(x, weight, bias, k, s, p)


def _same_as_the_composition(x, weight, bias, k, s, p):
    (out, mean, var), saved = NUMPY.forward(x.copy(order="K"), weight, bias, EPS, k, s, p)
    assert saved[0] is None  # the composition of NumPy's pairs
    (w_out, w_mean, w_var), w_saved = BatchNormMaxPoolPair.forward(x.copy(order="K"), weight,
                                                                   bias, EPS, k, s, p)
    for got, want in ((out, w_out), (mean, w_mean), (var, w_var)):
        np.testing.assert_array_equal(got, want)
    grad = _grad(out, "channel-major")
    for got, want in zip(NUMPY.backward(saved, grad, True),
                         BatchNormMaxPoolPair.backward(w_saved, grad, True)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", ["channel-major", "nchw"])
@pytest.mark.parametrize("gammas", ["positive", "mixed"])
def test_numpy_pair_against_torch_autograd(layout, gammas):
    torch = pytest.importorskip("torch")
    x, weight, bias = _case("float64", (4, 3, 9, 8), layout, seed=5, gammas=gammas)
    got, saved = _run(NUMPY, x, weight, bias, 2, 2, 0)
    assert saved[0] is not None
    xt = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
    wt = torch.tensor(weight, requires_grad=True)
    bt = torch.tensor(bias, requires_grad=True)
    y = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=EPS)
    out = torch.nn.functional.max_pool2d(y, 2)
    out.backward(torch.tensor(np.ascontiguousarray(_grad(got["out"], "channel-major"))))
    np.testing.assert_allclose(got["out"], out.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["dx"], xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["dgamma"], wt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["dbeta"], bt.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_pooled_pairs_finds_a_batchnorm_directly_before_a_maxpool_in_the_run_order():
    layers = [L.Conv2D(1, 4, 3, padding=1), L.BatchNorm(4), L.ReLU(), L.MaxPool2D(2),   # 1 → 3
              L.Conv2D(4, 4, 3, padding=1), L.BatchNorm(4), L.MaxPool2D(2),             # 5 → 6
              L.BatchNorm(4), L.AvgPool2D(2), L.BatchNorm(4), L.LeakyReLU(), L.MaxPool2D(2),
              L.MaxPool2D(1), L.BatchNorm(4), L.Flatten()]
    assert pooled_pairs(layers, run_order(layers)) == {1: 3, 5: 6}
    cnn = build_layers(PRESETS["cnn"], (1, 28, 28))
    assert pooled_pairs(cnn, run_order(cnn)) == {1: 3, 5: 7}
    # cnn-fast pools before its batch norms: nothing to fuse
    fast = build_layers(PRESETS["cnn-fast"], (1, 28, 28))
    assert pooled_pairs(fast, run_order(fast)) == {}


def _cnn(backend, dtype, seed=3, negative=()):
    """A small CNN (4 and 6 channels, 14×13 inputs); ``negative``: channels of the first
    batch norm given γ = −0.7."""
    return small_cnn(backend, dtype, (4, 6), (1, 14, 13), seed, negative)


@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("negative", [(), (0, 2)])
def test_a_model_runs_the_pair_where_its_backend_offers_it(backend, dtype, input_grad, negative,
                                                           monkeypatch):
    rng = np.random.default_rng(2)
    xh, gh = rng.standard_normal((6, 1, 14, 13)), rng.standard_normal((6, 10))
    fused = _cnn(backend, dtype, negative=negative)
    x, g = backend.from_numpy(xh, dtype=fused.dtype), backend.from_numpy(gh, dtype=fused.dtype)
    got, ran = step_results(fused, x, g, input_grad)
    offered = backend.offers("batchnorm_maxpool")
    assert offered == (backend.name == "numpy")
    assert ran == ([0, 1, 2, 4, 5, 6, 8, 9] if offered else [0, 1, 3, 2, 4, 5, 7, 6, 8, 9])
    # the same model without the pair: its two layers' own pairs
    monkeypatch.delitem(overrides._load(backend.name), "batchnorm_maxpool", raising=False)
    want, ran = step_results(_cnn(backend, dtype, negative=negative), x, g, input_grad)
    assert ran == [0, 1, 3, 2, 4, 5, 7, 6, 8, 9]
    assert got.keys() == want.keys()
    for k in ("out",) + tuple(k for k in want if k.startswith("buffer")):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # the forward: bit for bit
    _close({k: v for k, v in got.items() if not k.startswith("buffer")},
           {k: v for k, v in want.items() if not k.startswith("buffer")}, dtype)
    if backend.name == "numpy":
        assert type(fused.layers[3]).__name__ == "MaxPool2D"
        assert fused.layers[3].saved[0].__name__ == "_RanInPair"  # its backward was the pair's


def test_gamma_turning_negative_in_training_keeps_the_pair():
    """γ < 0 in some channels (seen in fast training) pools the minimum there: the pair
    still pools first rather than falling back to the composition."""
    model = _cnn(NumpyBackend(), "float64", negative=(1, 3))
    model.forward(np.random.default_rng(0).standard_normal((4, 1, 14, 13)), train=True)
    pair, saved = model.layers[1].saved
    assert pair.impl is NUMPY and saved[1][0] is not None


def test_gradcheck_through_the_pair_in_training():
    model = _cnn(NumpyBackend(), "float64", negative=(2,))
    x = np.random.default_rng(4).standard_normal((3, 1, 14, 13))
    y = np.array([1, 7, 3])
    model.forward(x, train=True)
    assert model._ran == [0, 1, 2, 4, 5, 6, 8, 9]  # the pair runs in these forwards
    errors = gradcheck(model, x, y, train=True)
    assert max(errors.values()) < 1e-6, errors


def test_layers_driven_one_by_one_still_run_their_own_passes():
    model = _cnn(NumpyBackend(), "float64")
    bn, relu, pool = model.layers[1:4]
    x = np.random.default_rng(5).standard_normal((2, 4, 14, 13))
    y = pool.forward(relu.forward(bn.forward(x, True), True), True)
    g = np.ones_like(y)
    dx = bn.backward(relu.backward(pool.backward(g)))
    assert dx.shape == x.shape
    # after the chain fused them, the pool kept nothing: a backward of it alone says why
    model.forward(np.zeros((2, 1, 14, 13)) + np.arange(13), train=True)
    with pytest.raises(RuntimeError, match="inside one pair with .*BatchNorm before it"):
        pool.backward(np.ones((2, 4, 7, 6)))
    # and the ReLU the chain ran after the pool refuses a gradient of the pool's input shape
    with pytest.raises(RuntimeError, match=r"shape \(2, 4, 7, 6\); got shape \(2, 4, 14, 13\)"):
        relu.backward(np.ones((2, 4, 14, 13)))
    model.backward(np.ones((2, 10)))  # the chain's own backward still works
