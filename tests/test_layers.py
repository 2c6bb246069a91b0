"""Layers one at a time: gradient checks on every backend, closed forms against NumPy,
dropout statistics, initialisers, and shape errors that name the layer."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

import nnx
from nnx import init as initializers
from nnx.layers import (Dense, Dropout, Flatten, LeakyReLU, ReLU, Reshape, Sigmoid, Softmax,
                        Tanh)

TOL = 1e-6  # gradcheck relative error bound in float64
HAS_TORCH = importlib.util.find_spec("torch") is not None


def build(layer, backend, input_shape, dtype="float64", seed=0, index=0):
    """Build ``layer`` alone the way Sequential does (name, random streams, parameters).
    The tests back-propagate after inference forwards too, so the layer retains its caches."""
    layer.name = f"{index}:{type(layer).__name__}"
    layer.retain = True
    if hasattr(layer, "rng"):
        layer.rng = backend.device_rng(seed + 1)
    out = layer.build(backend, backend.dtype(dtype), backend.host_rng(seed), tuple(input_shape))
    return layer, out


def arr(backend, a, dtype=None):
    return backend.from_numpy(np.asarray(a), dtype=dtype)


def host(backend, x):
    return backend.to_numpy(x)


# --- gradient checks ------------------------------------------------------------------------
LAYER_CASES = {
    "dense": (lambda: Dense(5, 3), (4, 5)),
    "dense_no_bias": (lambda: Dense(5, 3, bias=False), (4, 5)),
    "dense_xavier_uniform": (lambda: Dense(3, 6, init="xavier_uniform"), (2, 3)),
    "relu": (ReLU, (4, 5)),
    "leaky_relu": (lambda: LeakyReLU(0.1), (4, 5)),
    "sigmoid": (Sigmoid, (4, 5)),
    "tanh": (Tanh, (4, 5)),
    "softmax": (Softmax, (4, 5)),
    "flatten": (Flatten, (3, 2, 3, 2)),
    "reshape": (lambda: Reshape((3, 4)), (2, 12)),
    "reshape_3d_to_2d": (lambda: Reshape((2, 6)), (2, 3, 4)),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_gradcheck(backend, case, rng):
    make, x_shape = LAYER_CASES[case]
    layer, _ = build(make(), backend, x_shape[1:])
    x = arr(backend, rng.standard_normal(x_shape) * 1.5, backend.float64)
    errors = nnx.gradcheck(layer, x)
    assert set(errors) == {"input"} | {p.name for p in layer.params}
    for name, err in errors.items():
        assert err < TOL, f"{case} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_dropout_gradcheck_in_train_mode(backend, p, rng):
    layer, _ = build(Dropout(p), backend, (6,))
    x = arr(backend, rng.standard_normal((5, 6)), backend.float64)
    # the re-seeded mask really drops something, otherwise the check would be trivial
    layer.rng.reseed(0)
    y = host(backend, layer.forward(x, train=True))
    assert 0 < (y == 0).sum() < y.size
    errors = nnx.gradcheck(layer, x, train=True, seed=0)
    assert errors["input"] < TOL


# --- closed forms ---------------------------------------------------------------------------
def test_dense_forward_and_backward_match_numpy(backend, rng):
    layer, out = build(Dense(5, 3), backend, (5,))
    assert out == (3,)
    w_np = rng.standard_normal((3, 5))
    b_np = rng.standard_normal(3)
    layer.weight.value = arr(backend, w_np, backend.float64)
    layer.bias.value = arr(backend, b_np, backend.float64)
    x_np = rng.standard_normal((4, 5))
    y = layer.forward(arr(backend, x_np, backend.float64))
    np.testing.assert_allclose(host(backend, y), x_np @ w_np.T + b_np, rtol=1e-12, atol=1e-12)
    g_np = rng.standard_normal((4, 3))
    dx = layer.backward(arr(backend, g_np, backend.float64))
    np.testing.assert_allclose(host(backend, dx), g_np @ w_np, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(backend, layer.weight.grad), g_np.T @ x_np, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(backend, layer.bias.grad), g_np.sum(axis=0), rtol=1e-12, atol=1e-12)
    assert tuple(layer.weight.grad.shape) == (3, 5) and tuple(layer.bias.grad.shape) == (3,)


def test_dense_float32_stays_float32(backend, rng):
    layer, _ = build(Dense(4, 2), backend, (4,), dtype="float32")
    assert layer.weight.value.dtype == backend.float32
    assert layer.bias.value.dtype == backend.float32
    y = layer.forward(arr(backend, rng.standard_normal((3, 4)), backend.float32))
    assert y.dtype == backend.float32
    dx = layer.backward(arr(backend, np.ones((3, 2)), backend.float32))
    assert dx.dtype == backend.float32 and layer.weight.grad.dtype == backend.float32


def test_dense_bias_starts_at_zero_and_config(backend):
    layer, _ = build(Dense(4, 2, init="he_uniform"), backend, (4,))
    np.testing.assert_array_equal(host(backend, layer.bias.value), np.zeros(2))
    assert layer.config() == {"in_features": 4, "out_features": 2, "init": "he_uniform", "bias": True}
    assert layer.describe() == "Dense(4, 2)"
    assert [p.name for p in layer.params] == ["weight", "bias"]


def test_elementwise_activations_match_numpy(backend, rng):
    x_np = rng.standard_normal((6, 7)) * 3
    x = arr(backend, x_np, backend.float64)
    g_np = rng.standard_normal((6, 7))
    g = arr(backend, g_np, backend.float64)
    sig = 1.0 / (1.0 + np.exp(-x_np))
    cases = [
        (ReLU(), np.maximum(x_np, 0.0), g_np * (x_np > 0)),
        (LeakyReLU(0.2), np.where(x_np > 0, x_np, 0.2 * x_np), g_np * np.where(x_np > 0, 1.0, 0.2)),
        (Sigmoid(), sig, g_np * sig * (1 - sig)),
        (Tanh(), np.tanh(x_np), g_np * (1 - np.tanh(x_np) ** 2)),
    ]
    for layer, y_ref, dx_ref in cases:
        build(layer, backend, (7,))
        np.testing.assert_allclose(host(backend, layer.forward(x)), y_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(host(backend, layer.backward(g)), dx_ref, rtol=1e-12, atol=1e-14)


def test_sigmoid_is_stable_for_huge_inputs(backend):
    layer, _ = build(Sigmoid(), backend, (5,))
    for dt in ("float32", "float64"):
        layer.dtype = backend.dtype(dt)
        x = arr(backend, np.array([[-1000.0, -50.0, 0.0, 50.0, 1000.0]]), backend.dtype(dt))
        with np.errstate(over="raise", divide="raise", invalid="raise"):  # NumPy and strict raise on overflow
            y = host(backend, layer.forward(x))
            g = host(backend, layer.backward(arr(backend, np.ones((1, 5)), backend.dtype(dt))))
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(g))
        np.testing.assert_allclose(y, [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-7)
        assert 0.0 <= y.min() and y.max() <= 1.0
        np.testing.assert_allclose(g, [[0.0, 0.0, 0.25, 0.0, 0.0]], atol=1e-7)


def test_relu_gradient_is_zero_at_zero(backend):
    layer, _ = build(ReLU(), backend, (3,))
    layer.forward(arr(backend, np.array([[-1.0, 0.0, 2.0]]), backend.float64))
    dx = layer.backward(arr(backend, np.ones((1, 3)), backend.float64))
    np.testing.assert_array_equal(host(backend, dx), [[0.0, 0.0, 1.0]])


def test_relu_reused_zeros_follow_shape_and_dtype(backend, monkeypatch):
    """Training ReLU keeps a zeros array between steps (on the standard path: overrides
    off); a new batch size or dtype must not reuse it, the output must never alias it
    (−inf → 0 and NaN → NaN as in torch), and inference keeps none."""
    from nnx.backends import overrides

    monkeypatch.setitem(overrides._STATE, "enabled", False)
    layer, _ = build(ReLU(), backend, (3,))
    rows = [[-np.inf, np.nan, 2.0], [-1.0, 0.0, np.inf]]
    for n, dt in ((2, "float64"), (1, "float64"), (2, "float32"), (2, "float64")):
        x = arr(backend, np.array(rows[:n]), backend.dtype(dt))
        for train in (True, False):
            y = layer.forward(x, train)
            assert y.dtype == backend.dtype(dt) and tuple(y.shape) == (n, 3)
            np.testing.assert_array_equal(host(backend, y), np.maximum(np.array(rows[:n]), 0.0))
            y += 1.0  # callers may change the output in place: the kept zeros must not follow
    np.testing.assert_array_equal(host(backend, layer._zeros), np.zeros((2, 3)))
    layer._zeros = None
    layer.forward(arr(backend, np.ones((4, 3)), backend.float64), train=False)
    assert layer._zeros is None


def test_relu_kept_zeros_follow_the_device():
    """The same ReLU fed arrays from two array-api-strict devices (mixing devices raises
    there): the kept zeros must move with the input."""
    strict = pytest.importorskip("array_api_strict")
    layer = ReLU()
    layer.xp = strict
    other = strict.Device("device1")
    for device in (strict.Device("CPU_DEVICE"), other, other):
        x = strict.asarray([[-1.0, 2.0]], device=device)
        y = layer.forward(x, train=True)
        assert y.device == device and layer._zeros.device == device
        np.testing.assert_array_equal(np.asarray(y.to_device(strict.Device("CPU_DEVICE"))), [[0.0, 2.0]])


def test_softmax_layer_rows_sum_to_one_and_stable(backend, rng):
    layer, _ = build(Softmax(), backend, (4,))
    z_np = np.vstack([rng.standard_normal((3, 4)), [[1e4, -1e4, 0.0, 1e4]]])
    s = host(backend, layer.forward(arr(backend, z_np, backend.float64)))
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s.sum(axis=1), 1.0, rtol=1e-12)
    e = np.exp(z_np[:3] - z_np[:3].max(axis=1, keepdims=True))
    np.testing.assert_allclose(s[:3], e / e.sum(axis=1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(s[3], [0.5, 0.0, 0.0, 0.5], atol=1e-12)
    # backward = Jacobian (diag(s) - s sᵀ) times g, row by row
    g_np = rng.standard_normal((4, 4))
    dx = host(backend, layer.backward(arr(backend, g_np, backend.float64)))
    ref = np.stack([(np.diag(si) - np.outer(si, si)) @ gi for si, gi in zip(s, g_np)])
    np.testing.assert_allclose(dx, ref, rtol=1e-10, atol=1e-14)


def test_flatten_and_reshape_shapes(backend, rng):
    flat, out = build(Flatten(), backend, (2, 3, 4))
    assert out == (24,)
    x_np = rng.standard_normal((5, 2, 3, 4))
    y = flat.forward(arr(backend, x_np, backend.float64))
    np.testing.assert_array_equal(host(backend, y), x_np.reshape(5, 24))
    back = flat.backward(y)
    np.testing.assert_array_equal(host(backend, back), x_np)
    resh, out = build(Reshape((4, 6)), backend, (24,))
    assert out == (4, 6)
    z = resh.forward(y)
    assert tuple(z.shape) == (5, 4, 6)
    np.testing.assert_array_equal(host(backend, z), x_np.reshape(5, 4, 6))


# --- dropout --------------------------------------------------------------------------------
def test_dropout_eval_is_identity(backend, rng):
    layer, _ = build(Dropout(0.5), backend, (8,))
    x_np = rng.standard_normal((4, 8))
    x = arr(backend, x_np, backend.float64)
    np.testing.assert_array_equal(host(backend, layer.forward(x, train=False)), x_np)
    g = arr(backend, np.ones((4, 8)), backend.float64)
    np.testing.assert_array_equal(host(backend, layer.backward(g)), np.ones((4, 8)))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_train_statistics(backend, p):
    layer, _ = build(Dropout(p), backend, (500,), dtype="float32")
    n = 200 * 500
    x_np = np.full((200, 500), 2.0, dtype=np.float32)
    y = host(backend, layer.forward(arr(backend, x_np), train=True))
    dropped = (y == 0).mean()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)  # five standard errors
    np.testing.assert_allclose(y[y != 0], 2.0 / (1 - p), rtol=1e-6)  # kept ones scaled by 1/(1-p)
    assert abs(y.mean() - 2.0) < 0.05  # mean preserved
    # backward applies the very same mask and scale
    g = host(backend, layer.backward(arr(backend, np.ones((200, 500), dtype=np.float32))))
    np.testing.assert_allclose(g, y / 2.0, rtol=1e-6)
    # a new forward draws a new mask
    y2 = host(backend, layer.forward(arr(backend, x_np), train=True))
    assert not np.array_equal(y == 0, y2 == 0)


def test_dropout_zero_p_is_identity_in_training(backend, rng):
    layer, _ = build(Dropout(0.0), backend, (3,))
    x_np = rng.standard_normal((2, 3))
    np.testing.assert_array_equal(host(backend, layer.forward(arr(backend, x_np), train=True)), x_np)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_rejects_bad_p(p):
    with pytest.raises(ValueError, match="Dropout probability"):
        Dropout(p)


# --- initialisers ---------------------------------------------------------------------------
FAN_IN, FAN_OUT = 400, 600


@pytest.mark.parametrize("name,std", [
    ("he_normal", math.sqrt(2.0 / FAN_IN)),
    ("he_uniform", math.sqrt(2.0 / FAN_IN)),
    ("xavier_normal", math.sqrt(2.0 / (FAN_IN + FAN_OUT))),
    ("xavier_uniform", math.sqrt(2.0 / (FAN_IN + FAN_OUT))),
    ("glorot_normal", math.sqrt(2.0 / (FAN_IN + FAN_OUT))),
    ("glorot_uniform", math.sqrt(2.0 / (FAN_IN + FAN_OUT))),
])
def test_initialiser_std(name, std):
    b = nnx.get_backend("numpy")
    w = initializers.get(name)(b.host_rng(0), (FAN_OUT, FAN_IN), FAN_IN, FAN_OUT, np.float64)
    assert w.shape == (FAN_OUT, FAN_IN) and w.dtype == np.float64
    assert abs(w.std() - std) < 0.01 * std  # 240k samples: sampling error ~0.15%
    assert abs(w.mean()) < 0.01 * std
    if name.endswith("uniform"):
        limit = std * math.sqrt(3.0)
        assert w.max() <= limit and w.min() >= -limit
        assert w.max() > 0.99 * limit and w.min() < -0.99 * limit


def test_zeros_init_and_dtype_on_every_backend(backend):
    r = backend.host_rng(0)
    z = initializers.zeros(r, (3, 4), 4, 3, backend.float32)
    assert z.dtype == backend.float32 and backend.device_of(z) == backend.device
    np.testing.assert_array_equal(host(backend, z), np.zeros((3, 4)))
    w = initializers.he_normal(r, (3, 4), 4, 3, backend.float64)
    assert w.dtype == backend.float64 and backend.device_of(w) == backend.device


def test_dense_with_zero_init(backend):
    layer, _ = build(Dense(3, 2, init="zeros"), backend, (3,))
    np.testing.assert_array_equal(host(backend, layer.weight.value), np.zeros((2, 3)))


def test_initialiser_lookup():
    assert initializers.get("he_normal") is initializers.he_normal
    custom = lambda rng, shape, fi, fo, dt: None  # noqa: E731
    assert initializers.get(custom) is custom
    with pytest.raises(ValueError, match="unknown initialiser 'bogus'"):
        initializers.get("bogus")


# --- shape errors ---------------------------------------------------------------------------
def test_dense_wrong_input_names_layer_and_shapes(backend):
    layer, _ = build(Dense(5, 3), backend, (5,), index=0)
    with pytest.raises(nnx.ShapeError) as info:
        layer.forward(arr(backend, np.ones((3, 4)), backend.float64))
    msg = str(info.value)
    assert "0:Dense" in msg and "(batch, 5)" in msg and "(3, 4)" in msg
    with pytest.raises(nnx.ShapeError, match=r"\(5,\)"):
        layer.forward(arr(backend, np.ones(5), backend.float64))


def test_dense_build_with_wrong_feature_count():
    b = nnx.get_backend("numpy")
    with pytest.raises(nnx.ShapeError) as info:
        build(Dense(5, 3), b, (4,), index=2)
    msg = str(info.value)
    assert "2:Dense" in msg and "5 input" in msg and "(4,)" in msg


def test_reshape_errors_name_the_layer():
    b = nnx.get_backend("numpy")
    with pytest.raises(nnx.ShapeError, match=r"1:Reshape.*\(12,\).*\(5, 2\)"):
        build(Reshape((5, 2)), b, (12,), index=1)
    layer, _ = build(Reshape((3, 4)), b, (12,), index=3)
    with pytest.raises(nnx.ShapeError) as info:
        layer.forward(np.ones((2, 10)))
    msg = str(info.value)
    assert "3:Reshape" in msg and "(batch, 12)" in msg and "(2, 10)" in msg


def test_dense_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="positive"):
        Dense(0, 3)
    with pytest.raises(ValueError, match="positive"):
        Dense(3, -1)


def test_layer_registry_knows_every_layer():
    from nnx.layers.base import LAYER_TYPES

    for cls in (Dense, ReLU, LeakyReLU, Sigmoid, Tanh, Dropout, Flatten, Reshape, Softmax):
        assert LAYER_TYPES[cls.__name__] is cls


# --- losses ---------------------------------------------------------------------------------
def _log_softmax_ref(z):
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def test_cross_entropy_matches_logsumexp_reference(backend, rng):
    z_np = rng.standard_normal((6, 4)) * 3
    y_np = rng.integers(0, 4, size=6)
    loss = nnx.SoftmaxCrossEntropy()
    value = loss.forward(arr(backend, z_np, backend.float64), arr(backend, y_np))
    assert tuple(value.shape) == () and value.dtype == backend.float64
    lse = np.log(np.exp(z_np).sum(axis=1))  # plain formula is exact enough for small logits
    ref = np.mean(lse - z_np[np.arange(6), y_np])
    assert float(value) == pytest.approx(ref, rel=1e-12)
    # gradient: (softmax - onehot) / N
    s = np.exp(z_np - lse[:, None])
    onehot = np.eye(4)[y_np]
    np.testing.assert_allclose(host(backend, loss.backward()), (s - onehot) / 6, rtol=1e-12, atol=1e-15)


def test_cross_entropy_with_probability_targets(backend, rng):
    z_np = rng.standard_normal((5, 3))
    t_np = rng.random((5, 3))
    t_np /= t_np.sum(axis=1, keepdims=True)
    loss = nnx.SoftmaxCrossEntropy()
    value = loss.forward(arr(backend, z_np, backend.float64), arr(backend, t_np, backend.float64))
    logp = _log_softmax_ref(z_np)
    assert float(value) == pytest.approx(-(t_np * logp).sum() / 5, rel=1e-12)
    np.testing.assert_allclose(host(backend, loss.backward()), (np.exp(logp) - t_np) / 5,
                               rtol=1e-12, atol=1e-15)
    # one-hot probability targets give the same loss as the labels
    y_np = np.array([0, 2, 1, 1, 0])
    a = float(nnx.SoftmaxCrossEntropy().forward(arr(backend, z_np, backend.float64), arr(backend, y_np)))
    b = float(nnx.SoftmaxCrossEntropy().forward(arr(backend, z_np, backend.float64),
                                                arr(backend, np.eye(3)[y_np], backend.float64)))
    assert a == pytest.approx(b, rel=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_is_stable_for_huge_logits(backend, dtype):
    dt = backend.dtype(dtype)
    z_np = np.array([[1e4, 0.0, -1e4], [1e4, 0.0, -1e4], [-1e4, -1e4, 1e4], [1e4, 1e4, 0.0]])
    y_np = np.array([0, 1, 2, 0])
    loss = nnx.SoftmaxCrossEntropy()
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # NumPy and strict raise on overflow
        value = float(loss.forward(arr(backend, z_np, dt), arr(backend, y_np)))
        grad = host(backend, loss.backward())
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # per-row losses: 0, 1e4, 0, log 2
    assert value == pytest.approx((0.0 + 1e4 + 0.0 + math.log(2.0)) / 4, rel=1e-6)
    probs = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0.5, 0.5, 0]])
    np.testing.assert_allclose(grad, (probs - np.eye(3)[y_np]) / 4, atol=1e-7)
    assert grad.dtype == np.dtype(dtype)


def test_cross_entropy_float32_stays_float32(backend, rng):
    loss = nnx.SoftmaxCrossEntropy()
    v = loss.forward(arr(backend, rng.standard_normal((3, 4)), backend.float32),
                     arr(backend, np.array([1, 0, 3])))
    assert v.dtype == backend.float32 and loss.backward().dtype == backend.float32


def test_mse_matches_numpy(backend, rng):
    o_np, t_np = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    loss = nnx.MSE()
    value = loss.forward(arr(backend, o_np, backend.float64), arr(backend, t_np, backend.float64))
    assert float(value) == pytest.approx(np.mean((o_np - t_np) ** 2), rel=1e-12)
    np.testing.assert_allclose(host(backend, loss.backward()), 2 * (o_np - t_np) / 12, rtol=1e-12)


def test_cross_entropy_checks_labels_on_request(backend):
    """By default an out-of-range label matches no class (no per-step host read); with
    check_labels=True it is refused, as torch refuses it."""
    torch = pytest.importorskip("torch")
    z_np = np.random.default_rng(0).standard_normal((3, 4))
    z = arr(backend, z_np, backend.float64)
    bad = arr(backend, np.array([0, 4, 1]))
    assert np.isfinite(float(nnx.SoftmaxCrossEntropy().forward(z, bad)))
    with pytest.raises(ValueError, match="0..3"):
        nnx.SoftmaxCrossEntropy(check_labels=True).forward(z, bad)
    with pytest.raises((IndexError, RuntimeError)):
        torch.nn.functional.cross_entropy(torch.tensor(z_np), torch.tensor([0, 4, 1]))
    good = arr(backend, np.array([0, 3, 1]))
    expected = float(torch.nn.functional.cross_entropy(torch.tensor(z_np), torch.tensor([0, 3, 1])))
    assert float(nnx.SoftmaxCrossEntropy(check_labels=True).forward(z, good)) == pytest.approx(
        expected, rel=1e-12)
