"""The torch backend's overrides (backends/torch_ops.py) against the standard Array-API path
they replace, called directly on edge inputs, and the backend's ``affine``/``matmul``/``sum``
(with ``out=``, as layers write gradients into flat storage) against plain ``xp`` code on
every backend. A wrong override would only warn at run time and fall back: here it fails."""
from __future__ import annotations

import numpy as np
import pytest

from nnx.backends import overrides
from nnx.layers.activations import ReLU
from nnx.losses import SoftmaxCrossEntropy
from nnx.optim import make_optimizer

from conftest import CONV_PAIR_CASES, make_backend

TOL = {"float32": dict(rtol=2e-6, atol=1e-6), "float64": dict(rtol=1e-13, atol=1e-14)}


@pytest.fixture
def torch_backend():
    pytest.importorskip("torch")
    return make_backend("torch", "cpu")


def _impl(name):
    return overrides._load("torch")[name]


def _np(t):
    return t.detach().cpu().numpy()


def test_torch_registers_every_named_operation(torch_backend):
    assert torch_backend.overrides() == list(overrides.OPS) + ["conv2d", "batchnorm", "maxpool"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relu_override_matches_the_standard_path(torch_backend, dtype):
    b = torch_backend
    layer = ReLU()
    layer.build(b, b.dtype(dtype), None, (6,))
    x = np.array([[-np.inf, -1.0, 0.0, 1e-30, 2.0, np.inf], [np.nan, -0.0, 3.0, -2.0, 0.5, -5.0]])
    xt = b.from_numpy(x, dtype=b.dtype(dtype))
    y_ref, y_new = layer._train_forward(xt), _impl("relu_forward")(xt)
    np.testing.assert_array_equal(_np(y_new), _np(y_ref))  # NaN passes, −inf → 0
    g = b.from_numpy(np.random.default_rng(0).standard_normal((2, 6)), dtype=b.dtype(dtype))
    np.testing.assert_array_equal(_np(_impl("relu_backward")(g, y_ref)), _np(layer._backward(g, y_ref)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("soft", [False, True])
def test_softmax_xent_override_matches_the_standard_path(torch_backend, dtype, soft):
    b = torch_backend
    rng = np.random.default_rng(3)
    n, c = 33, 10
    z = rng.standard_normal((n, c)) * 5
    z[0, 3] = z[0].max() + 1.0
    z[0, 7] = z[0, 3]  # a tie at the maximum: both targets count as correct
    z[1] = 0.0  # all tied
    t = rng.dirichlet(np.ones(c), n) if soft else np.eye(c)[rng.integers(0, c, n)]
    if not soft:
        t[0], t[1] = np.eye(c)[7], np.eye(c)[4]
    zt, tt = b.from_numpy(z, dtype=b.dtype(dtype)), b.from_numpy(t, dtype=b.dtype(dtype))
    ref_loss, new_loss = SoftmaxCrossEntropy(), SoftmaxCrossEntropy()
    want = SoftmaxCrossEntropy._softmax_xent(ref_loss, zt, tt)
    got = _impl("softmax_xent")(new_loss, zt, tt)
    for g, w in zip(got, want):
        np.testing.assert_allclose(_np(g), _np(w), **TOL[dtype])
    np.testing.assert_allclose(_np(new_loss.probs), _np(ref_loss.probs), **TOL[dtype])
    if not soft:  # the exact count, ties included
        assert float(got[1]) == float(want[1])


def test_softmax_xent_override_takes_a_batch_without_rows(torch_backend):
    """A data-parallel process's empty share of a last batch: zero sums, an empty gradient."""
    z = torch_backend.from_numpy(np.zeros((0, 10)), dtype=torch_backend.float32)
    for picked, correct, grad in (SoftmaxCrossEntropy._softmax_xent(SoftmaxCrossEntropy(), z, z),
                                  _impl("softmax_xent")(SoftmaxCrossEntropy(), z, z)):
        assert float(picked) == 0.0 and float(correct) == 0.0 and tuple(grad.shape) == (0, 10)


def _update_case(b, name, dtype, wd, clip=None):
    """(optimizer, p, g, slots, hyper) for one update of a 1-D flat buffer."""
    rng = np.random.default_rng(5)
    arr = lambda a: b.from_numpy(a, dtype=b.dtype(dtype))
    p = arr(rng.standard_normal(257))
    from nnx.layers.base import Parameter

    opt = make_optimizer(name, {"w": Parameter("w", p)}, 0.03, weight_decay=wd, xp=b.xp)
    slots = [arr(np.abs(rng.standard_normal(257)) if s == "v" else rng.standard_normal(257))
             for s in opt.slot_names]
    return opt, p, arr(rng.standard_normal(257)), slots


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,op", [("nesterov", "nesterov_update"), ("adam", "adam_update"),
                                     ("adamw", "adam_update")])
@pytest.mark.parametrize("wd", [0.0, 5e-4])
@pytest.mark.parametrize("table", [False, True])
def test_update_overrides_match_the_standard_path(torch_backend, dtype, name, op, wd, table):
    """Several steps with the per-step values as Python floats (``Optimizer.step``) or as
    0-D tensors (the hyper table ``TrainStep`` reads)."""
    b = torch_backend
    ref = _update_case(b, name, dtype, wd)
    new = _update_case(b, name, dtype, wd)
    for t in range(1, 6):
        lr = 0.03 / t
        hyper = ref[0].hyper(t, lr)
        if table:
            hyper = tuple(b.xp.asarray(h, dtype=b.dtype(dtype)) for h in hyper)
        type(ref[0]).update(ref[0], ref[1], ref[2], ref[3], hyper)
        _impl(op)(new[0], new[1], new[2], new[3], hyper)
    for got, want in zip([new[1], *new[3]], [ref[1], *ref[3]]):
        np.testing.assert_allclose(_np(got), _np(want), **TOL[dtype])
    np.testing.assert_array_equal(_np(new[2]), _np(ref[2]))  # the gradient is never modified


def test_backend_primitives_match_xp_and_write_into_out(backend):
    """affine = x @ wᵀ + b; matmul and sum with ``out`` a view of a larger flat array (as
    ``Parameter.grad_out`` is) write there and return it; without ``out`` a new array."""
    xp = backend.xp
    rng = np.random.default_rng(7)
    arr = lambda a: backend.from_numpy(a, dtype=backend.float64)
    x, w, bias, g = (arr(rng.standard_normal(s)) for s in ((5, 4), (3, 4), (3,), (5, 3)))
    want = backend.to_numpy(x) @ backend.to_numpy(w).T + backend.to_numpy(bias)
    np.testing.assert_allclose(backend.to_numpy(backend.affine(x, w, bias)), want, rtol=1e-14)
    np.testing.assert_allclose(backend.to_numpy(backend.affine(x, w)), want - backend.to_numpy(bias),
                               rtol=1e-13, atol=1e-14)
    flat = xp.zeros((20,), dtype=backend.float64, device=backend.device)
    dw_view, db_view = xp.reshape(flat[2:14], (3, 4)), flat[14:17]
    from nnx.flat import supports_views

    dw = backend.matmul(g.T, x, out=dw_view if supports_views(xp, backend.device) else None)
    db = backend.sum(g, axis=0, out=db_view if supports_views(xp, backend.device) else None)
    np.testing.assert_allclose(backend.to_numpy(dw), backend.to_numpy(g).T @ backend.to_numpy(x),
                               rtol=1e-14)
    np.testing.assert_allclose(backend.to_numpy(db), backend.to_numpy(g).sum(0), rtol=1e-14)
    if supports_views(xp, backend.device):
        host = backend.to_numpy(flat)
        np.testing.assert_array_equal(host[2:14].reshape(3, 4), backend.to_numpy(dw))
        np.testing.assert_array_equal(host[14:17], backend.to_numpy(db))
        assert not host[:2].any() and not host[17:].any()  # nothing written outside the views


# --- the pairs: forward, then backward, against the standard path's pair -----------------
def _pair_results(pair, fwd, grad, input_grad=True):
    out, saved = pair.forward(*fwd)
    return out, pair.backward(saved, grad, input_grad)


def _close(got, want, dtype):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(g, (tuple, list)):
            _close(g, w, dtype)
        elif w is None:
            assert g is None
        else:
            assert tuple(g.shape) == tuple(w.shape)
            w = _np(w)
            # float32 sums of many products: absolute error grows with the magnitudes
            scale = max(1.0, float(np.abs(w).max(initial=0.0)))
            tol = TOL[dtype] if dtype == "float64" else dict(rtol=1e-5, atol=1e-5 * scale)
            np.testing.assert_allclose(_np(g), w, **tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("c,o,k,s,p,hw", CONV_PAIR_CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_conv2d_pair_matches_im2col(torch_backend, dtype, c, o, k, s, p, hw, bias, input_grad):
    from nnx.layers.conv import Im2colPair, out_size

    b, rng = torch_backend, np.random.default_rng(11)
    arr = lambda *shape: b.from_numpy(rng.standard_normal(shape), dtype=b.dtype(dtype))
    x, w = arr(3, c, *hw), arr(o, c, k, k)
    bb = arr(o) if bias else None
    grad = arr(3, o, out_size(hw[0], k, s, p), out_size(hw[1], k, s, p))
    want = _pair_results(Im2colPair, (x, w, bb, s, p), grad, input_grad)
    got = _pair_results(_impl("conv2d"), (x, w, bb, s, p), grad, input_grad)
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 4, 7)])
@pytest.mark.parametrize("input_grad", [True, False])
def test_batchnorm_pair_matches_the_standard_path(torch_backend, dtype, shape, input_grad):
    from nnx.layers.batchnorm import BatchNormPair

    b, rng = torch_backend, np.random.default_rng(12)
    arr = lambda a: b.from_numpy(a, dtype=b.dtype(dtype))
    x = arr(rng.standard_normal(shape) * 3 + 1)
    weight, bias = arr(rng.standard_normal(shape[1])), arr(rng.standard_normal(shape[1]))
    grad = arr(rng.standard_normal(shape))
    want = _pair_results(BatchNormPair, (x, weight, bias, 1e-5), grad, input_grad)
    got = _pair_results(_impl("batchnorm"), (x, weight, bias, 1e-5), grad, input_grad)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == "float32" else TOL[dtype]
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        if w is None:
            assert g is None
        else:
            np.testing.assert_allclose(_np(g), _np(w), **tol)


def test_layers_run_the_library_pairs_on_torch_and_match_im2col(torch_backend):
    """A conv + batch-norm net on torch: the default Conv2D and training BatchNorm run
    torch's pairs, and a model built with overrides off (the standard path throughout)
    reaches the same weights after a few steps."""
    import nnx
    from nnx.architectures import build_layers

    def train(enabled):
        overrides.set_enabled(enabled)
        try:
            model = nnx.Sequential(build_layers("conv:4,bn,relu,maxpool:2,flatten,dense:10", (1, 8, 8)),
                                   input_shape=(1, 8, 8), backend=torch_backend, dtype="float64", seed=3)
            conv = model.layers[0]
            assert conv._library() == enabled
            opt = make_optimizer("adam", model.named_parameters(), 1e-2, xp=model.xp)
            rng = np.random.default_rng(0)
            x = torch_backend.from_numpy(rng.standard_normal((16, 1, 8, 8)))
            y = torch_backend.from_numpy(rng.integers(0, 10, 16))
            loss = SoftmaxCrossEntropy()
            for _ in range(4):
                loss.forward(model.forward(x, train=True), y)
                model.backward(loss.backward())
                opt.step()
            return [_np(p.value) for p in model.parameters()], model
        finally:
            overrides.set_enabled(True)

    got, model = train(True)
    assert isinstance(model.layers[0].saved, type(None))  # freed by backward
    want, _ = train(False)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k,s,p,hw", [(2, 2, 0, (8, 6)), (2, 2, 0, (7, 5)), (3, 2, 1, (7, 8)),
                                      (3, 1, 1, (5, 5)), (2, 1, 0, (4, 6))])
def test_maxpool_pair_matches_the_standard_path(torch_backend, dtype, k, s, p, hw):
    """Overlapping and disjoint windows, odd sizes, padding, and ties (the first maximum
    of a window takes its gradient on both paths)."""
    from nnx.layers.pool import MaxPoolPair

    b, rng = torch_backend, np.random.default_rng(14)
    x = np.round(rng.standard_normal((2, 3, *hw)), 1)  # rounded: many ties
    x[0, 0] = 1.0  # a whole map of ties
    xt = b.from_numpy(x, dtype=b.dtype(dtype))
    want_out, want_saved = MaxPoolPair.forward(xt, k, s, p, True)
    got_out, got_saved = _impl("maxpool").forward(xt, k, s, p, True)
    np.testing.assert_array_equal(_np(_impl("maxpool").forward(xt, k, s, p, False)[0]),
                                  _np(want_out))  # inference: no indices, the same maxima
    np.testing.assert_array_equal(_np(got_out), _np(want_out))
    grad = b.from_numpy(rng.standard_normal(tuple(want_out.shape)), dtype=b.dtype(dtype))
    _close(_impl("maxpool").backward(got_saved, grad, True),
           MaxPoolPair.backward(want_saved, grad, True), dtype)


@pytest.mark.parametrize("make", [
    lambda nnx: nnx.Conv2D(2, 3, 3, padding=1), lambda nnx: nnx.Conv2D(2, 3, 3, method="rows", padding=1),
    lambda nnx: nnx.Conv2D(2, 3, 3, method="winograd"), lambda nnx: nnx.Conv2D(2, 3, 3, method="im2col"),
    lambda nnx: nnx.BatchNorm(2), lambda nnx: nnx.MaxPool2D(2)])
@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_backward_without_a_training_forward_is_a_clear_error(make, name):
    """A second backward, or one after an inference forward, names the layer and says what
    is missing, on the pair paths and on the layers' own."""
    import nnx

    if name == "torch":
        pytest.importorskip("torch")
    b = make_backend(name, "cpu")
    model = nnx.Sequential([make(nnx)], input_shape=(2, 6, 6), backend=b, dtype="float64", seed=0)
    layer = model.layers[0]
    x = b.from_numpy(np.random.default_rng(0).standard_normal((4, 2, 6, 6)))
    y = layer.forward(x, train=True)
    layer.backward(y)  # the one backward this forward allows
    with pytest.raises(RuntimeError, match="backward needs a training forward"):
        layer.backward(y)
    layer.forward(x, train=False)
    with pytest.raises(RuntimeError, match="backward needs a training forward"):
        layer.backward(y)
