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
NUMPY_PAIRS = ["batchnorm", "maxpool"]
NUMPY_BLOCK_PAIRS = ["batchnorm_maxpool",  # (tests/test_batchnorm_maxpool.py)
                     "conv_batchnorm_maxpool"]  # (tests/test_conv_batchnorm_maxpool.py)


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
    assert NumpyBackend().overrides() == NUMPY_OPS + NUMPY_PAIRS + NUMPY_BLOCK_PAIRS
    assert all(NumpyBackend().offers(name) for name in NUMPY_PAIRS + NUMPY_BLOCK_PAIRS)
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
    from nnx.backends import numpy_ops

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
    # no rows (a data-parallel process's empty share of a last batch): zero sums and an
    # empty gradient on both paths
    z = np.zeros((0, 10))
    for picked, correct, grad in (SoftmaxCrossEntropy._softmax_xent(SoftmaxCrossEntropy(), z, z),
                                  _impl("softmax_xent")(SoftmaxCrossEntropy(), z, z)):
        assert float(picked) == 0.0 and float(correct) == 0.0 and grad.shape == (0, 10)
    z = np.zeros((3, 0))  # no classes: an error on both
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


# --- pairs: max pooling ------------------------------------------------------------------
# The NumPy pair claims the standard pair's outputs and gradients exactly (NaN included): the
# comparisons are ``_same``. Its own code runs for 2×2 windows at stride 2 without padding
# (odd sizes drop the last row/column, as the standard path does); other cases run the
# standard pair's code, and are compared here too.
POOL_CASES = [(2, 2, 0, (8, 6)), (2, 2, 0, (7, 5)), (2, 2, 0, (2, 2)), (2, 2, 0, (3, 9)),
              (2, 2, 0, (28, 28)), (3, 2, 1, (7, 8)), (3, 1, 1, (5, 5)), (2, 1, 0, (4, 6)),
              (2, 2, 1, (6, 6)), (3, 3, 0, (7, 6))]


def _pool_input(dtype, hw, layout, rng):
    """(3, 4, H, W) values with many ties: rounded normals, a map of one value, windows whose
    maximum is repeated at (0, 1) and (1, 0) only (row-major and column-major order disagree
    there), at (0, 0) and (1, 1), and ±0 ties; in C order, channel-major (a Conv2D's output)
    or a strided slice of a larger array."""
    x = np.round(rng.standard_normal((3, 4, *hw)), 1)
    x[0, 0] = 1.0
    h, w = hw
    if h >= 2 and w >= 2:
        x[1, 1, :2, :2] = [[0.5, 3.0], [3.0, 1.0]]
        x[1, 2, :2, :2] = [[3.0, 1.0], [0.5, 3.0]]
        x[2, 3, :2, :2] = [[-0.0, 0.0], [-1.0, -0.0]]
        x[2, 3, -2:, -2:] = [[-np.inf, -np.inf], [-np.inf, -np.inf]]
    x = x.astype(dtype)
    if layout == "channel-major":
        return np.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    if layout == "strided":
        big = np.zeros((3, 8, h + 1, 2 * w), dtype)
        big[:, ::2, 1:, ::2] = x
        return big[:, ::2, 1:, ::2]
    return x


def _pool_grad(out, layout, rng):
    g = rng.standard_normal(out.shape).astype(out.dtype)
    if layout == "channel-major":
        return np.ascontiguousarray(g.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    return g


def _compare_pools(x, k, s, p, grad_layout="C", grad=None):
    from nnx.layers.pool import MaxPoolPair

    before = x.copy()
    want_out, want_saved = MaxPoolPair.forward(x, k, s, p)
    got_out, got_saved = _impl("maxpool").forward(x, k, s, p, True)
    _same(got_out, want_out)
    _same(_impl("maxpool").forward(x, k, s, p, False)[0], want_out)  # inference
    if grad is None:
        grad = _pool_grad(np.asarray(want_out), grad_layout, np.random.default_rng(5))
    g_before = grad.copy()
    with np.errstate(invalid="ignore"):
        want = MaxPoolPair.backward(want_saved, grad, True)
        got = _impl("maxpool").backward(got_saved, grad, True)
    _same(got, want)
    _same(x, before)  # neither input is written to
    _same(grad, g_before)
    assert got_out.strides == want_out.strides  # the standard path's memory layouts
    if (k, s, p) == (2, 2, 0):
        assert got.strides == want.strides
    return got_out, got_saved, got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,s,p,hw", POOL_CASES)
@pytest.mark.parametrize("layout", ["C", "channel-major", "strided"])
def test_maxpool_pair_matches_the_standard_path(dtype, k, s, p, hw, layout):
    rng = np.random.default_rng(hw[0] * 31 + hw[1])
    x = _pool_input(dtype, hw, layout, rng)
    for grad_layout in ("C", "channel-major"):
        out, saved, dx = _compare_pools(x, k, s, p, grad_layout)
    fast = (k, s, p) == (2, 2, 0)
    assert (saved[0] is not None) == fast  # NumPy's own code ran, not the standard pair's
    if fast and layout != "strided":
        assert dx.strides == x.strides


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_maxpool_pair_nan_windows_route_as_the_standard_path(dtype, where):
    """A window holding NaN has a NaN maximum and sends its gradient to its LAST element on
    both paths (torch picks the NaN's position); the other windows are unaffected."""
    rng = np.random.default_rng(6)
    for layout in ("C", "channel-major"):
        x = _pool_input(dtype, (6, 8), layout, rng)
        x[0, 1, where[0], where[1]] = np.nan             # one NaN in one window
        x[2, 0, 2:4, 2:4] = np.nan                       # a window of NaN
        x[1, 3, 4 + where[0], 6 + where[1]] = np.nan     # the bottom-right window
        out, _, dx = _compare_pools(x, 2, 2, 0)
        assert np.isnan(out[0, 1, 0, 0]) and dx[0, 1, 1, 1] != 0 or where == (1, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool_pair_passes_non_finite_gradients_as_the_standard_path(dtype):
    """±inf and NaN in the output gradient: the standard path's 0·inf = NaN products and
    g − g differences, reproduced (the NumPy pair subtracts the routed share too)."""
    rng = np.random.default_rng(7)
    x = _pool_input(dtype, (6, 8), "channel-major", rng)
    grad = rng.standard_normal((3, 4, 3, 4)).astype(dtype)
    grad[0, 0, 0, :] = [np.inf, -np.inf, np.nan, 0.0]
    grad[1, 1, 0, 0] = np.inf  # the window whose maximum is at (0, 1) and (1, 0)
    grad[1, 2, 0, 0] = -np.inf
    _compare_pools(x, 2, 2, 0, grad=grad)


def test_maxpool_pair_keeps_a_conv_outputs_layout_in_a_model():
    """In a conv net the pair gets channel-major maps and hands back a gradient in the same
    layout (the standard path's contract), and the layer really runs it."""
    import nnx

    m = nnx.Sequential([nnx.Conv2D(1, 3, 3, padding=1, bias=False), nnx.MaxPool2D(2)],
                       input_shape=(1, 6, 8), backend=NumpyBackend(), dtype="float32", seed=0)
    x = np.random.default_rng(8).standard_normal((5, 1, 6, 8)).astype("float32")
    h = m.layers[0].forward(x)
    y = m.forward(x, train=True)
    pair, (used, saved) = m.layers[1].saved  # CheckedPair's: (the pair that ran, its saved)
    assert pair.ok and used is _impl("maxpool") and saved[0] is not None
    dx = m.layers[1].backward(np.ones_like(y))
    assert dx.strides == h.strides and h.strides != np.empty(h.shape, h.dtype).strides


# --- pairs: batch norm ---------------------------------------------------------------------
# The NumPy pair runs the standard pair's operations (its backward block by block of feature
# rows), so it claims the standard pair's values exactly, NaN and infinities included.
def _bn_case(dtype, shape, layout, rng):
    x = rng.standard_normal(shape) * 3 + 1
    f = shape[1]
    x[:, 0] = 2.5                      # a constant feature: variance 0
    if f > 2:
        x[:, 2] = x[:, 2] * 1e-3 + 1e4  # large mean, small spread (cancellation)
    weight, bias = rng.standard_normal(f), rng.standard_normal(f)
    if f > 1:
        weight[1] = 0.0                # γ = 0
    grad = rng.standard_normal(shape)
    x, grad = x.astype(dtype), grad.astype(dtype)
    if layout == "channel-major" and len(shape) == 4:
        x = np.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
        grad = np.ascontiguousarray(grad.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    return x, weight.astype(dtype), bias.astype(dtype), grad


def _compare_batchnorms(x, weight, bias, grad, input_grad):
    from nnx.layers.batchnorm import BatchNormPair

    before = [a.copy() for a in (x, weight, bias, grad)]
    with np.errstate(all="ignore"):
        want_out, want_saved = BatchNormPair.forward(x, weight, bias, 1e-5)
        got_out, got_saved = _impl("batchnorm").forward(x, weight, bias, 1e-5)
        want = BatchNormPair.backward(want_saved, grad, input_grad)
        got = _impl("batchnorm").backward(got_saved, grad, input_grad)
    for g, w in zip(got_out + got, want_out + want):
        if w is None:
            assert g is None
        else:
            _same(g, w)
            assert g.strides == w.strides  # the standard path's layouts
    for a, b in zip((x, weight, bias, grad), before):
        _same(a, b)  # nothing written to


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 4), (1, 3), (5, 3, 4, 7), (2, 7, 5, 3), (128, 6, 14, 14)])
@pytest.mark.parametrize("layout", ["C", "channel-major"])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("rows_per_block", [None, 1, 3])
def test_batchnorm_pair_matches_the_standard_path(monkeypatch, dtype, shape, layout, input_grad,
                                                  rows_per_block):
    """Blocks of all rows (the default size here), of one row, and of three rows with a
    shorter last block."""
    from nnx.backends import numpy_ops

    if rows_per_block:
        m = int(np.prod(shape)) // shape[1]
        monkeypatch.setattr(numpy_ops, "BN_BLOCK_BYTES", rows_per_block * m * np.dtype(dtype).itemsize)
    rng = np.random.default_rng(sum(shape))
    _compare_batchnorms(*_bn_case(dtype, shape, layout, rng), input_grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_pair_propagates_nan_and_inf_as_the_standard_path(monkeypatch, dtype):
    from nnx.backends import numpy_ops

    monkeypatch.setattr(numpy_ops, "BN_BLOCK_BYTES", 1)  # one row per block
    rng = np.random.default_rng(9)
    x, weight, bias, grad = _bn_case(dtype, (4, 5, 3, 3), "channel-major", rng)
    x[1, 1, 0, 0] = np.nan
    x[2, 3, 1, 1] = np.inf
    grad[0, 4, 2, 2] = np.nan
    grad[3, 2, 0, 1] = -np.inf
    _compare_batchnorms(x, weight, bias, grad, True)


# --- the pair checks can fail --------------------------------------------------------------
class _ColumnFirstPool:
    """Wrong: ties broken in column-major order (the two stages taken the other way round),
    by pooling the transposed maps."""

    @staticmethod
    def forward(x, k, s, p, keep=True):
        out, saved = _POOL.forward(x.transpose(0, 1, 3, 2), k, s, p, keep)
        return out.transpose(0, 1, 3, 2), saved

    @staticmethod
    def backward(saved, grad, input_grad=True):
        return _POOL.backward(saved, grad.transpose(0, 1, 3, 2), input_grad).transpose(0, 1, 3, 2)


class _NoNanCheckPool:
    """Wrong: the two stages route NaN windows too (by the comparisons' answers for NaN,
    not to the window's last element)."""

    @staticmethod
    def forward(x, k, s, p, keep=True):
        from nnx.backends.numpy_ops import _pairs

        x6 = _pairs(x, x.shape[2] // 2, x.shape[3] // 2)
        cols = np.maximum(x6[..., 0], x6[..., 1])
        top, bottom = cols[:, :, :, 0], cols[:, :, :, 1]
        out = np.maximum(top, bottom)
        return out, (x, out, top >= bottom, x6[..., 0] >= x6[..., 1])

    backward = None


_POOL = _impl("maxpool")
_NoNanCheckPool.backward = staticmethod(_POOL.backward)


class _LastBlockSkippedBatchNorm:
    """Wrong: the backward loop stops before a shorter last block of rows."""

    forward = None

    @staticmethod
    def backward(saved, grad, input_grad=True):
        xc, inv_std, weight, shape = saved
        dx, dgamma, dbeta = _BN.backward(saved, grad, input_grad)
        from nnx.backends import numpy_ops

        step = max(1, numpy_ops.BN_BLOCK_BYTES // (xc.shape[1] * xc.itemsize))
        last = (xc.shape[0] // step) * step
        if last < xc.shape[0]:  # what a loop over full blocks only would leave unset
            dgamma[last:] = 0.0
            dbeta[last:] = 0.0
        return dx, dgamma, dbeta


_BN = _impl("batchnorm")
_LastBlockSkippedBatchNorm.forward = staticmethod(_BN.forward)


@pytest.mark.parametrize("wrong, test, args", [
    (_LastBlockSkippedBatchNorm, test_batchnorm_pair_matches_the_standard_path,
     (None, "float32", (2, 7, 5, 3), "C", True, 3)),
    (_ColumnFirstPool, test_maxpool_pair_matches_the_standard_path,
     ("float32", 2, 2, 0, (8, 6), "C")),
    (_NoNanCheckPool, test_maxpool_pair_nan_windows_route_as_the_standard_path,
     ("float64", (0, 0))),
])
def test_the_pair_edge_inputs_catch_plausible_mistakes(monkeypatch, wrong, test, args):
    name = "batchnorm" if wrong is _LastBlockSkippedBatchNorm else "maxpool"
    monkeypatch.setitem(overrides.REGISTRY["numpy"], name, wrong)
    with pytest.raises(AssertionError):
        test(monkeypatch, *args[1:]) if args[0] is None else test(*args)


def test_the_pairs_self_check_accepts_them_on_the_shapes_of_a_model():
    """Each NumPy pair passes its first-use check (no warning) in a small conv net, and a
    few training steps give the standard path's weights."""
    import nnx
    from nnx.architectures import build_layers
    from nnx.optim import make_optimizer

    def train(enabled):
        overrides.set_enabled(enabled)
        try:
            # (the first convolution, its batch norm and max pool run as the
            # "conv_batchnorm_maxpool" pair; the second batch norm and max pool as
            # "batchnorm_maxpool", the row-split convolution before them being no im2col;
            # the third pool alone as "maxpool", the batch norm after it as "batchnorm")
            model = nnx.Sequential(build_layers("conv:4,bn,relu,maxpool:2,conv:6,bn,maxpool:2,"
                                                "conv:6,maxpool:2,bn,flatten,dense:10",
                                                (1, 12, 10)),
                                   input_shape=(1, 12, 10), backend=NumpyBackend(),
                                   dtype="float64", seed=3)
            opt = make_optimizer("adam", model.named_parameters(), 1e-2)
            rng = np.random.default_rng(0)
            x = rng.standard_normal((16, 1, 12, 10))
            y = rng.integers(0, 10, 16)
            loss = SoftmaxCrossEntropy()
            for _ in range(4):
                loss.forward(model.forward(x, train=True), y)
                model.backward(loss.backward(), input_grad=False)
                opt.step(1e-2)
            return np.concatenate([p.value.ravel() for p in model.parameters()])
        finally:
            overrides.set_enabled(True)

    saved = dict(overrides._CHECKED)
    overrides._CHECKED.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            on = train(True)
        checked = {k[2] for k, v in overrides._CHECKED.items() if k[0] == "numpy" and v}
        assert set(NUMPY_PAIRS + NUMPY_BLOCK_PAIRS) <= checked
    finally:
        overrides._CHECKED.clear()
        overrides._CHECKED.update(saved)
    off = train(False)
    np.testing.assert_allclose(on, off, rtol=1e-12, atol=1e-13)
