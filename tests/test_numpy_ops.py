"""NumPy's overrides (backends/numpy_ops.py) and its direct backend methods
(backends/numpy_backend.py) against the standard Array-API path they replace, called
directly on edge inputs (NaN, ±inf, ±0, ties, soft targets, float32 and float64, odd layouts).

They claim the standard path's values exactly, not within a tolerance: comparisons are
``assert_array_equal`` (NaN where NaN, dtype and shape included). A wrong override would only
warn at run time and fall back to the standard path (backends/overrides.py); here it fails —
``test_the_edge_inputs_catch_plausible_mistakes`` shows that the inputs tell a few wrong
versions apart from right ones."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from nnx.backends import overrides
from nnx.backends.base import Backend
from nnx.backends.numpy_backend import NumpyBackend
from nnx.layers.activations import ReLU
from nnx.losses import SoftmaxCrossEntropy

DTYPES = ["float32", "float64"]
NUMPY_OPS = ["relu_forward", "relu_backward", "softmax_xent"]


def _impl(name):
    return overrides._load("numpy")[name]


_SOFTMAX_XENT = _impl("softmax_xent")  # (the tests below swap wrong versions in)


def _same(got, want):
    """Equal values (NaN where NaN), same dtype and shape."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape,
                                                                 want.dtype, want.shape)
    np.testing.assert_array_equal(got, want)


def _relu(dtype):
    layer = ReLU()
    layer.build(NumpyBackend(), np.dtype(dtype), None, (6,))
    return layer


def _edge_x(dtype):
    x = np.array([[-np.inf, -1.0, 0.0, 1e-30, 2.0, np.inf],
                  [np.nan, -0.0, 3.0, -2.0, 0.5, -5.0],
                  [5e-324 if dtype == "float64" else 1e-45, -1e-45, 7.0, np.nan, -np.inf, 0.0]])
    return x.astype(dtype)


def test_numpy_registers_the_ops_it_replaces():
    assert NumpyBackend().overrides() == NUMPY_OPS
    # the optimizers run their standard chains on NumPy (the reference itself, no wrapper)
    ref = object()
    assert NumpyBackend().op("nesterov_update", ref) is ref
    assert NumpyBackend().op("adam_update", ref) is ref


# --- ReLU ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_forward_matches_the_standard_path(dtype):
    layer, x = _relu(dtype), _edge_x(dtype)
    before = x.copy()
    want = layer._train_forward(x)
    got = _impl("relu_forward")(x)
    _same(got, want)  # NaN passes, −inf → 0
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # relu(−0) is +0
    _same(x, before)  # the input is not touched
    _same(_impl("relu_forward")(x[:2]), layer._train_forward(x[:2]))  # a smaller batch next


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 6), (3, 200, 200)])  # below / above ZEROS_MAX_BYTES
def test_relu_forward_keeps_odd_layouts_and_its_zeros_read_only(dtype, shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(dtype)
    x.flat[::7] = np.nan
    x.flat[1::11] = -np.inf
    for view in (x, x.T, x[:, ::2]):  # C, transposed (channel-major-like), strided
        got = _impl("relu_forward")(view)
        _same(got, np.maximum(view, np.zeros_like(view)))
        got[...] = 5.0  # writing the result must not reach the cached zeros
        _same(_impl("relu_forward")(view), np.maximum(view, np.zeros_like(view)))
    from backends import numpy_ops

    assert all(not z.flags.writeable and not z.any() for z in numpy_ops._ZEROS.values())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
def test_relu_backward_matches_the_standard_path(dtype, grad_dtype):
    layer = _relu(dtype)
    y = _edge_x(dtype)  # y itself need not be a ReLU output: [y > 0] for any y
    rng = np.random.default_rng(2)
    g = rng.standard_normal(y.shape).astype(grad_dtype)
    g[0, 0] = np.nan   # where y = −inf: NaN·0 stays NaN, as in grad * mask
    g[1, 2] = np.inf   # where y > 0: passes
    g[1, 1] = -np.inf  # where y = −0: inf·0 = NaN
    g[2, 0] = np.nan   # where y is the smallest subnormal > 0: passes
    before_g, before_y = g.copy(), y.copy()
    with np.errstate(invalid="ignore"):
        _same(_impl("relu_backward")(g, y), layer._backward(g, y))
    _same(g, before_g)
    _same(y, before_y)


# --- softmax cross-entropy -------------------------------------------------------------
def _logits(n, c, rng):
    z = rng.standard_normal((n, c)) * 5
    if n >= 4 and c >= 4:
        z[0, 3] = z[0].max() + 1.0
        z[0, 2] = z[0, 3]      # a tie at the maximum: both count as correct
        z[1] = 0.0             # all tied (and +0/−0 mixed)
        z[1, ::2] = -0.0
        z[2, 1] = 1e4          # one dominant class: the others underflow in exp
        z[3, 0] = -1e30        # a class that can never win (−inf: the NaN/inf test below)
    return z


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target_kind", ["onehot", "soft", "soft64"])
@pytest.mark.parametrize("n,c", [(33, 10), (1, 10), (5, 1), (6, 2), (9, 100), (700, 10)])
def test_softmax_xent_matches_the_standard_path(dtype, target_kind, n, c):
    rng = np.random.default_rng(3)
    z = _logits(n, c, rng).astype(dtype)
    if target_kind == "onehot":
        t = np.eye(c)[rng.integers(0, c, n)]
        if n >= 4 and c >= 4:
            t[0], t[1] = np.eye(c)[2], np.eye(c)[c - 1]
    else:
        t = rng.dirichlet(np.ones(c), n)
    t = t.astype("float64" if target_kind == "soft64" else dtype)  # mixed dtypes too
    ref_loss, new_loss = SoftmaxCrossEntropy(), SoftmaxCrossEntropy()
    new_loss._grad = "stale"
    z_before, t_before = z.copy(), t.copy()
    want = SoftmaxCrossEntropy._softmax_xent(ref_loss, z, t)
    got = _impl("softmax_xent")(new_loss, z, t)
    assert len(got) == 3
    for g, w in zip(got, want):
        _same(g, w)
    _same(new_loss.probs, ref_loss.probs)
    assert new_loss.target is t and new_loss.n == ref_loss.n == n and new_loss._grad is None
    _same(z, z_before)
    _same(t, t_before)
    if target_kind == "onehot" and n >= 4 and c >= 4:
        assert float(got[1]) >= 2  # rows 0 and 1: ties at the maximum count


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_propagates_nan_and_inf_as_the_standard_path(dtype):
    z = np.array([[np.nan, 0.0, 1.0], [np.inf, 0.0, 1.0], [-np.inf, -np.inf, -np.inf],
                  [1e30, -1e30, 0.0]], dtype=dtype)
    t = np.eye(3, dtype=dtype)[[0, 0, 1, 0]]
    with np.errstate(all="ignore"):
        want = SoftmaxCrossEntropy._softmax_xent(SoftmaxCrossEntropy(), z, t)
        got = _impl("softmax_xent")(SoftmaxCrossEntropy(), z, t)
    for g, w in zip(got, want):
        _same(g, w)


def test_softmax_xent_without_rows_or_classes_behaves_as_the_standard_path():
    for shape in [(0, 10), (3, 0)]:
        z = np.zeros(shape)
        with pytest.raises(Exception) as want:
            SoftmaxCrossEntropy._softmax_xent(SoftmaxCrossEntropy(), z, z)
        with pytest.raises(type(want.value)):
            _impl("softmax_xent")(SoftmaxCrossEntropy(), z, z)


# --- the checks can fail ---------------------------------------------------------------
def _wrong_relu_forward(x):
    return np.fmax(x, 0.0)  # NaN → 0: not the standard path's max


def _wrong_relu_backward(grad, y):
    return np.where(y > 0, grad, 0.0).astype(grad.dtype)  # NaN·0 → 0, not NaN


def _wrong_softmax_xent(loss, logits, target):
    picked, _, grad = _SOFTMAX_XENT(loss, logits, target)
    first = np.eye(logits.shape[1], dtype=logits.dtype)[np.argmax(logits, axis=1)]
    return picked, np.sum(first * target), grad  # argmax: a tie counts for one class only


@pytest.mark.parametrize("test, wrong", [
    (test_relu_forward_matches_the_standard_path, ("relu_forward", _wrong_relu_forward)),
    (test_relu_backward_matches_the_standard_path, ("relu_backward", _wrong_relu_backward)),
])
def test_the_edge_inputs_catch_plausible_mistakes(monkeypatch, test, wrong):
    name, impl = wrong
    monkeypatch.setitem(overrides.REGISTRY["numpy"], name, impl)
    with pytest.raises(AssertionError):
        test("float32", "float32") if name == "relu_backward" else test("float32")


def test_the_tie_catches_an_argmax_count(monkeypatch):
    monkeypatch.setitem(overrides.REGISTRY["numpy"], "softmax_xent", _wrong_softmax_xent)
    with pytest.raises(AssertionError):
        test_softmax_xent_matches_the_standard_path("float64", "onehot", 33, 10)


# --- backend methods --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_methods_match_the_standard_ones(dtype):
    """take_rows, affine, matmul and sum (with out= into a view of a flat buffer, as Dense
    writes gradients) against Backend's standard versions on the same inputs."""
    b, std = NumpyBackend(), Backend()
    std.xp = b.xp
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 7)).astype(dtype)
    x[3, 2] = np.nan
    idx = np.array([4, 0, 49, 4, 17])
    _same(b.take_rows(x, idx), std.take_rows(x, idx))
    w, bias = rng.standard_normal((5, 7)).astype(dtype), rng.standard_normal(5).astype(dtype)
    _same(b.affine(x, w, bias), std.affine(x, w, bias))
    _same(b.affine(x, w), std.affine(x, w))
    g = rng.standard_normal((50, 5)).astype(dtype)
    for out in (False, True):
        flats = [np.full(3 + 5 * 7 + 5, 9.0, dtype=dtype) for _ in range(2)]
        views = [(f[3:38].reshape(5, 7), f[38:]) if out else (None, None) for f in flats]
        got = b.matmul(g.T, x, out=views[0][0]), b.sum(g, 0, out=views[0][1])
        want = std.matmul(g.T, x, out=views[1][0]), std.sum(g, 0, out=views[1][1])
        for a, c in zip(got, want):
            _same(a, c)
        if out:
            assert got[0] is views[0][0] and got[1] is views[0][1]
            _same(flats[0], flats[1])  # written in place, the rest untouched


# --- whole training steps ---------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["nesterov", "adamw"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_with_the_overrides_gives_the_same_weights(optimizer, dtype):
    """A few lean training steps with NumPy's overrides on and off: the same weights and
    running sums, bit for bit (and no override fell back: no warning)."""
    from tests_helpers_train import train_steps

    saved = dict(overrides._CHECKED)
    overrides._CHECKED.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            on = train_steps(NumpyBackend(), optimizer, steps=6, dtype=dtype)
        assert {k[2] for k in overrides._CHECKED if k[0] == "numpy"} == set(NUMPY_OPS)
        assert all(v for k, v in overrides._CHECKED.items() if k[0] == "numpy")
        overrides.set_enabled(False)
        off = train_steps(NumpyBackend(), optimizer, steps=6, dtype=dtype)
    finally:
        overrides.set_enabled(True)
        overrides._CHECKED.clear()
        overrides._CHECKED.update(saved)
    _same(on[0], off[0])
    assert on[1] == off[1]
