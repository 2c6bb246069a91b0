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

from conftest import make_backend

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
    assert torch_backend.overrides() == list(overrides.OPS)


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
