"""Conv2D, pooling, BatchNorm and Residual: gradient checks on every backend, agreement with
``torch.nn.functional``, shape errors, dtypes, a tiny CNN that overfits, torch-style names.

Sizes are tiny on purpose: gradcheck perturbs every element and array-api-strict is slow.
"""
from __future__ import annotations

import math
import numpy as np
import pytest

import nnx
from nnx.errors import ShapeError
from nnx.layers.batchnorm import BatchNorm
from nnx.layers.conv import Conv2D
from nnx.layers.pool import AvgPool2D, GlobalAvgPool, MaxPool2D
from nnx.layers.residual import Residual
from nnx.spec import layer_from_spec, layer_to_spec

TOL = 1e-6


def model_of(backend, layers, input_shape, dtype="float64", seed=0):
    """A model whose layers retain their caches after inference forwards too (the tests
    back-propagate through eval-mode passes)."""
    m = nnx.Sequential(layers, input_shape=input_shape, backend=backend, dtype=dtype, seed=seed)
    for layer in m.walk():
        layer.retain = True
    return m


def host(shape, seed=0, integers=None):
    g = np.random.default_rng(seed)
    if integers is not None:
        return g.integers(0, integers, size=shape).astype(np.float64)
    return g.standard_normal(shape)


def assert_gradcheck(model, x, **kw):
    errors = nnx.gradcheck(model, x, **kw)
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"gradcheck errors above {TOL}: {errors}"


def assert_close(a, b, tol=1e-10):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# --- gradient checks (float64, every backend) ----------------------------------------------
CONV_CASES = [  # (C, O, k, s, p, H, W)
    (2, 3, 3, 1, 1, 5, 5),
    (2, 2, 3, 2, 0, 7, 6),
    (1, 2, 2, 3, 1, 6, 5),
    (2, 2, 1, 1, 0, 3, 4),
    (1, 2, 5, 2, 2, 5, 7),
    (2, 2, 5, 1, 2, 6, 7),  # "same" 5x5: im2col on flattened rows, two wrapped columns
    (1, 4, 3, 1, 1, 5, 6),  # "same" with k·C < O: "fast" picks "gather", not "rows"
]
#: stride-1 "same" cases: where "gather" and "rows" differ from the other paths
SAME_CASES = [cs for cs in CONV_CASES if cs[3] == 1 and 2 * cs[4] == cs[2] - 1 and cs[2] > 1]
#: 3x3 stride-1 cases for Winograd: even and odd output sizes, padding 0, 1 and 2
WINO_CASES = [(2, 3, 3, 1, 1, 5, 5), (2, 2, 3, 1, 0, 7, 6), (1, 2, 3, 1, 2, 4, 5),
              (3, 2, 3, 1, 1, 6, 7)]
#: (method, case): every path on every case it implements (Winograd falls back to "gather",
#: "rows" to "gather" off the stride-1 "same" cases; "fast" is one of the two)
CONV_METHOD_CASES = ([(m, c) for m in ("im2col", "fast") for c in CONV_CASES]
                     + [(m, c) for m in ("gather", "rows") for c in SAME_CASES]
                     + [("winograd", c) for c in WINO_CASES])
conv_id = lambda mc: "{}-C{}O{}k{}s{}p{}_{}x{}".format(mc[0], *mc[1])


@pytest.mark.parametrize("mc", CONV_METHOD_CASES, ids=conv_id)
def test_conv_gradcheck(backend, mc):
    method, (c, o, k, s, p, h, w) = mc
    m = model_of(backend, [Conv2D(c, o, k, stride=s, padding=p, method=method)], (c, h, w))
    m.layers[0].bias.value = backend.from_numpy(host((o,), 7), dtype=m.dtype)  # non-zero bias
    assert_gradcheck(m, backend.from_numpy(host((2, c, h, w))))


@pytest.mark.parametrize("method", ["im2col", "fast", "gather", "rows", "winograd"])
def test_conv_without_bias(backend, method):
    m = model_of(backend, [Conv2D(2, 2, 3, padding=1, bias=False, method=method)], (2, 4, 5))
    assert list(m.named_parameters()) == ["0.weight"]
    assert_gradcheck(m, backend.from_numpy(host((2, 2, 4, 5))))


@pytest.mark.parametrize("method", ["fast", "gather", "rows", "winograd"])
@pytest.mark.parametrize("case", CONV_CASES + WINO_CASES[1:] + [(3, 4, 3, 1, 1, 8, 8)],
                         ids=lambda c: "C{}O{}k{}s{}p{}_{}x{}".format(*c))
def test_conv_methods_match_the_reference(backend, method, case):
    """Each fast path gives the im2col reference's output and gradients (input, weight,
    bias) on the same weights, also for a channel-major input (what a conv before it
    hands on) and for a first layer that skips its input gradient."""
    c, o, k, s, p, h, w = case
    x = host((3, c, h, w), 11)
    xcm = np.ascontiguousarray(np.transpose(x, (1, 0, 2, 3)))  # channel-major memory
    results = []
    for meth in ("im2col", method):
        conv = Conv2D(c, o, k, stride=s, padding=p, method=meth)
        m = model_of(backend, [conv], (c, h, w), seed=3)
        conv.bias.value = backend.from_numpy(host((o,), 12), dtype=m.dtype)
        xb = backend.xp.permute_dims(backend.from_numpy(xcm), (1, 0, 2, 3))
        y = m.forward(xb, train=True)
        g = backend.from_numpy(host(tuple(y.shape), 13))
        dx = m.backward(g)
        dw, db = conv.weight.grad, conv.bias.grad
        m.forward(xb, train=True)
        assert m.backward(g, input_grad=False) is None
        assert_close(backend.to_numpy(conv.weight.grad), backend.to_numpy(dw))
        results.append([backend.to_numpy(a) for a in (y, dx, dw, db)])
    for ref, got in zip(*results):
        assert_close(got, ref)


def test_fast_picks_rows_for_wide_same_convolutions(backend):
    """``"fast"`` runs the row-split path where its k·C-row column matrix is smaller than
    the k·O row-partial outputs it makes (the preset's second convolution), else "gather"."""
    picks = {}
    for c, o, k, s, p in [(32, 64, 3, 1, 1), (1, 32, 3, 1, 1), (32, 64, 3, 2, 1), (32, 64, 3, 1, 0),
                          (8, 8, 1, 1, 0), (8, 16, 5, 1, 2)]:
        conv = Conv2D(c, o, k, stride=s, padding=p)
        nnx.Sequential([conv], (c, 9, 9), backend=backend, dtype="float32")
        picks[c, o, k, s, p] = conv._rows()
    assert picks == {(32, 64, 3, 1, 1): True, (1, 32, 3, 1, 1): False, (32, 64, 3, 2, 1): False,
                     (32, 64, 3, 1, 0): False, (8, 8, 1, 1, 0): False, (8, 16, 5, 1, 2): True}


POOL_CASES = [  # (k, stride, padding, H, W)
    (2, None, 0, 6, 4),   # tiles: reshape fast path
    (2, 2, 0, 7, 5),      # k == stride, odd sizes: general path drops the last row/column
    (3, 2, 1, 7, 6),      # overlapping, padded
    (3, 1, 0, 5, 5),      # heavily overlapping
    (2, 3, 0, 8, 7),      # stride > kernel: gaps
]


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "k{}s{}p{}_{}x{}".format(*c))
def test_pool_gradcheck(backend, cls, case):
    k, s, p, h, w = case
    m = model_of(backend, [cls(k, s, p)], (2, h, w))
    assert_gradcheck(m, backend.from_numpy(host((2, 2, h, w))))  # no ties: max is differentiable


def test_global_avg_pool_gradcheck(backend):
    m = model_of(backend, [GlobalAvgPool()], (3, 3, 5))
    assert m.output_shape == (3,)
    assert_gradcheck(m, backend.from_numpy(host((2, 3, 3, 5))))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(3,), (2, 3, 4)], ids=["NF", "NCHW"])
def test_batchnorm_gradcheck(backend, shape, train):
    m = model_of(backend, [BatchNorm(shape[0])], shape)
    bn = m.layers[0]
    bn.weight.value = backend.from_numpy(host((shape[0],), 3) + 1.5, dtype=m.dtype)
    bn.bias.value = backend.from_numpy(host((shape[0],), 4), dtype=m.dtype)
    x = backend.from_numpy(host((4, *shape)) * 2.0 + 0.5)
    m.forward(x, train=True)  # non-trivial running statistics for the eval case
    assert_gradcheck(m, x, train=train)


@pytest.mark.parametrize("shape", [(3,), (3, 4, 4)], ids=["NF", "NCHW"])
def test_batchnorm_trains_on_an_empty_batch_without_learning(backend, shape):
    """A data-parallel process's empty share of a last batch: an empty output, zero γ/β
    gradients, running statistics untouched (max-pool and global pooling take it too); the
    next batch trains as usual."""
    m = model_of(backend, [nnx.Flatten(), nnx.Dense(math.prod(shape), 3), BatchNorm(3)]
                 if len(shape) == 1 else [Conv2D(shape[0], 3, 3, padding=1), MaxPool2D(2, 2),
                                          BatchNorm(3), GlobalAvgPool()], shape)
    bn = next(layer for layer in m.layers if isinstance(layer, BatchNorm))
    before = {k: backend.to_numpy(v) for k, v in bn.buffers.items()}
    y = m.forward(backend.from_numpy(np.zeros((0, *shape)), dtype=m.dtype), train=True)
    assert tuple(y.shape)[0] == 0
    m.backward(y * 0.0, input_grad=False)
    for p in m.parameters():
        assert float(backend.xp.sum(backend.xp.abs(p.grad))) == 0.0
    for k, v in bn.buffers.items():
        np.testing.assert_array_equal(backend.to_numpy(v), before[k], err_msg=k)
    x = backend.from_numpy(host((4, *shape)))
    m.backward(m.forward(x, train=True), input_grad=False)
    assert float(backend.xp.sum(backend.xp.abs(bn.weight.grad))) > 0.0


def test_residual_gradcheck(backend):
    block = Residual([Conv2D(2, 2, 3, padding=1, bias=False), BatchNorm(2), nnx.ReLU(),
                      Conv2D(2, 2, 3, padding=1)])
    m = model_of(backend, [block], (2, 4, 4))
    assert set(m.named_parameters()) == {"0.fn.0.weight", "0.fn.1.weight",
                                         "0.fn.1.bias", "0.fn.3.weight", "0.fn.3.bias"}
    assert_gradcheck(m, backend.from_numpy(host((2, 2, 4, 4))), train=True)


def test_residual_shares_the_model_rng(backend):
    """Dropout inside a Residual gets the model's stream, so gradcheck(train=True) repeats masks."""
    block = Residual([Conv2D(2, 2, 3, padding=1), nnx.Dropout(0.4)])
    m = model_of(backend, [block], (2, 3, 3))
    assert block.layers[1].rng is m.rng
    assert_gradcheck(m, backend.from_numpy(host((2, 2, 3, 3))), train=True)


def test_small_cnn_gradcheck(backend):
    layers = [Conv2D(1, 2, 3, padding=1, bias=False), BatchNorm(2), nnx.ReLU(), MaxPool2D(2),
              Residual([Conv2D(2, 2, 3, padding=1), nnx.Tanh()]), AvgPool2D(2, 1),
              nnx.Flatten(), nnx.Dense(8, 3)]
    m = model_of(backend, layers, (1, 6, 6))
    assert m.output_shape == (3,)
    x = backend.from_numpy(host((2, 1, 6, 6)))
    y = backend.from_numpy(np.array([0, 2]))
    assert_gradcheck(m, x, y=y, train=True)


# --- agreement with torch.nn.functional ---------------------------------------------------
def torch_t(a, grad=False):
    torch = pytest.importorskip("torch")
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def run_layer(backend, layer, x, g, train=False):
    """Forward ``x`` and backward ``g`` through a one-layer model; host results."""
    m = model_of(backend, [layer], x.shape[1:])
    y = m.forward(backend.from_numpy(x), train=train)
    dx = m.backward(backend.from_numpy(g)) if g is not None else None
    return m, backend.to_numpy(y), (None if dx is None else backend.to_numpy(dx))


@pytest.mark.parametrize("mc", CONV_METHOD_CASES, ids=conv_id)
def test_conv_matches_torch(backend, mc):
    torch = pytest.importorskip("torch")
    method, (c, o, k, s, p, h, w) = mc
    x = host((3, c, h, w), 1)
    conv = Conv2D(c, o, k, stride=s, padding=p, method=method)
    m = model_of(backend, [conv], (c, h, w))
    conv.bias.value = backend.from_numpy(host((o,), 2), dtype=m.dtype)
    y = backend.to_numpy(m.forward(backend.from_numpy(x)))
    g = host(y.shape, 3)
    dx = backend.to_numpy(m.backward(backend.from_numpy(g)))

    xt = torch_t(x, True)
    wt = torch_t(backend.to_numpy(conv.weight.value), True)
    bt = torch_t(backend.to_numpy(conv.bias.value), True)
    yt = torch.nn.functional.conv2d(xt, wt, bt, stride=s, padding=p)
    yt.backward(torch_t(g))
    assert_close(y, yt.detach().numpy())
    assert_close(dx, xt.grad.numpy())
    assert_close(backend.to_numpy(conv.weight.grad), wt.grad.numpy())
    assert_close(backend.to_numpy(conv.bias.grad), bt.grad.numpy())


POOL_TORCH_CASES = POOL_CASES + [(2, 1, 1, 5, 6), (3, 3, 1, 7, 7), (2, 2, 1, 5, 5)]


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", POOL_TORCH_CASES, ids=lambda c: "k{}s{}p{}_{}x{}".format(*c))
def test_pool_matches_torch_with_ties(backend, kind, case):
    """Small integer inputs: most windows hold several equal maxima (the tie rule matters)."""
    torch = pytest.importorskip("torch")
    k, s, p, h, w = case
    x = host((2, 3, h, w), 5, integers=3)
    cls, fn = (MaxPool2D, torch.nn.functional.max_pool2d) if kind == "max" else \
              (AvgPool2D, torch.nn.functional.avg_pool2d)
    _, y, _ = run_layer(backend, cls(k, s, p), x, None)
    g = host(y.shape, 6)
    _, y, dx = run_layer(backend, cls(k, s, p), x, g)
    xt = torch_t(x, True)
    yt = fn(xt, k, s, p)
    yt.backward(torch_t(g))
    assert_close(y, yt.detach().numpy())
    assert_close(dx, xt.grad.numpy())


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 3, 0), (2, 1, 0), (2, 2, 1)])
def test_maxpool_channel_major_input(backend, k, s, p):
    """A Conv2D output is a (C, N, H, W) array seen as (N, C, H, W): max-pool must give
    torch's values and gradients on such a view, and (without padding, on NumPy) hand back a
    gradient in the same memory layout, so the layers below never mix layouts."""
    torch = pytest.importorskip("torch")
    a = host((3, 2, 6, 8), 7, integers=3)                      # (C, N, H, W), many ties
    m = model_of(backend, [MaxPool2D(k, s, p)], (3, 6, 8))
    x = backend.xp.permute_dims(backend.from_numpy(a), (1, 0, 2, 3))
    y = m.forward(x, train=True)
    g = host(tuple(y.shape), 8)
    dx = m.backward(backend.from_numpy(g))
    xt = torch_t(a.transpose(1, 0, 2, 3), True)
    yt = torch.nn.functional.max_pool2d(xt, k, s, p)
    yt.backward(torch_t(g))
    assert_close(backend.to_numpy(y), yt.detach().numpy())
    assert_close(backend.to_numpy(dx), xt.grad.numpy())
    if backend.name == "numpy" and p == 0:
        assert dx.strides == x.strides


@pytest.mark.parametrize("k,s", [(2, 2), (3, 3), (2, 1), (3, 2)])
def test_maxpool_ties_go_to_first_max(backend, k, s):
    """All-equal input: each window sends its whole gradient to its top-left element."""
    n, c, h, w = 1, 2, 6, 6
    x = np.ones((n, c, h, w))
    m, y, _ = run_layer(backend, MaxPool2D(k, s), x, None)
    g = host(y.shape, 1)
    dx = backend.to_numpy(m.backward(backend.from_numpy(g)))
    want = np.zeros_like(x)
    for a in range(y.shape[2]):
        for b in range(y.shape[3]):
            want[:, :, a * s, b * s] += g[:, :, a, b]
    assert_close(dx, want)


def test_global_avg_pool_matches_torch(backend):
    torch = pytest.importorskip("torch")
    x = host((2, 3, 4, 5))
    g = host((2, 3), 1)
    _, y, dx = run_layer(backend, GlobalAvgPool(), x, g)
    xt = torch_t(x, True)
    yt = torch.nn.functional.adaptive_avg_pool2d(xt, 1).flatten(1)
    yt.backward(torch_t(g))
    assert_close(y, yt.detach().numpy())
    assert_close(dx, xt.grad.numpy())


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4)], ids=["NF", "NCHW"])
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_batchnorm_matches_torch(backend, shape, momentum):
    """Three training steps then one eval step; outputs, gradients and running statistics."""
    torch = pytest.importorskip("torch")
    f = shape[0]
    bn = BatchNorm(f, eps=1e-3, momentum=momentum)
    m = model_of(backend, [bn], shape)
    gamma, beta = host((f,), 10) + 1.0, host((f,), 11)
    bn.weight.value = backend.from_numpy(gamma, dtype=m.dtype)
    bn.bias.value = backend.from_numpy(beta, dtype=m.dtype)

    rm, rv = torch.zeros(f, dtype=torch.float64), torch.ones(f, dtype=torch.float64)
    for step, train in enumerate([True, True, True, False]):
        x = host((5, *shape), 20 + step) * (step + 1) + step
        g = host((5, *shape), 30 + step)
        y = backend.to_numpy(m.forward(backend.from_numpy(x), train=train))
        dx = backend.to_numpy(m.backward(backend.from_numpy(g)))
        xt, wt, bt = torch_t(x, True), torch_t(gamma, True), torch_t(beta, True)
        # momentum=None is torch's cumulative average: factor 1/num_batches_tracked
        factor = momentum if momentum is not None else 1.0 / (step + 1)
        yt = torch.nn.functional.batch_norm(xt, rm, rv, wt, bt, training=train,
                                            momentum=factor, eps=1e-3)
        yt.backward(torch_t(g))
        assert_close(y, yt.detach().numpy(), 1e-9)
        assert_close(dx, xt.grad.numpy(), 1e-9)
        assert_close(backend.to_numpy(bn.weight.grad), wt.grad.numpy(), 1e-9)
        assert_close(backend.to_numpy(bn.bias.grad), bt.grad.numpy(), 1e-9)
        assert_close(backend.to_numpy(bn.buffers["running_mean"]), rm.numpy())
        assert_close(backend.to_numpy(bn.buffers["running_var"]), rv.numpy())
    assert int(backend.to_numpy(bn.buffers["num_batches_tracked"])) == 3


def test_batchnorm_module_state_matches_torch():
    """Running stats of torch.nn.BatchNorm2d (the module) after a few steps, and its eval output."""
    torch = pytest.importorskip("torch")
    backend = nnx.get_backend("numpy")
    m = model_of(backend, [BatchNorm(3)], (3, 4, 4))
    tm = torch.nn.BatchNorm2d(3).double()
    for step in range(4):
        x = host((6, 3, 4, 4), step) * 3.0 - 1.0
        m.forward(backend.from_numpy(x), train=True)
        tm.train()(torch_t(x))
    for name, value in tm.state_dict().items():
        assert_close(m.state_dict()["0." + name], value.numpy())
    x = host((2, 3, 4, 4), 99)
    assert_close(backend.to_numpy(m.forward(backend.from_numpy(x))),
                 tm.eval()(torch_t(x)).detach().numpy())


# --- errors, dtypes, names ----------------------------------------------------------------
def test_shape_errors_name_the_layer(backend):
    m = model_of(backend, [nnx.ReLU(), Conv2D(2, 3, 3), MaxPool2D(2), BatchNorm(3)], (2, 6, 6))
    conv, pool, bn = m.layers[1], m.layers[2], m.layers[3]
    wrong = backend.from_numpy(host((2, 3, 6, 6)), dtype=m.dtype)
    for layer in (conv, pool, bn):
        with pytest.raises(ShapeError, match=layer.name) as info:
            layer.forward(wrong)
        assert "(2, 3, 6, 6)" in str(info.value)

    with pytest.raises(ShapeError, match=r"1:Conv2D.*\(3, H, W\).*\(2, 6, 6\)"):
        model_of(backend, [nnx.ReLU(), Conv2D(3, 4, 3)], (2, 6, 6))
    with pytest.raises(ShapeError, match="0:Conv2D"):
        model_of(backend, [Conv2D(2, 4, 7)], (2, 6, 6))  # kernel larger than the image
    with pytest.raises(ShapeError, match="0:MaxPool2D"):
        model_of(backend, [MaxPool2D(2)], (12,))
    with pytest.raises(ShapeError, match=r"1:BatchNorm.*\(4,\)"):
        model_of(backend, [nnx.ReLU(), BatchNorm(4)], (3, 5, 5))
    with pytest.raises(ShapeError, match="0:GlobalAvgPool"):
        model_of(backend, [GlobalAvgPool()], (3, 5))
    with pytest.raises(ShapeError, match=r"0:Residual.*\(2, 4, 4\).*\(3, 4, 4\)"):
        model_of(backend, [Residual([Conv2D(2, 3, 3, padding=1)])], (2, 4, 4))
    with pytest.raises(ShapeError, match=r"0:Residual\.fn\.1:Conv2D"):
        model_of(backend, [Residual([Conv2D(2, 3, 3, padding=1), Conv2D(2, 2, 1)])], (2, 4, 4))


def test_bad_arguments():
    with pytest.raises(ValueError):
        Conv2D(1, 2, 0)
    with pytest.raises(ValueError):
        Conv2D(1, 2, 3, stride=0)
    with pytest.raises(ValueError, match="method"):
        Conv2D(1, 2, 3, method="fft")
    with pytest.raises(ValueError):
        MaxPool2D(2, padding=2)  # more than half the kernel, as torch refuses
    with pytest.raises(ValueError):
        BatchNorm(0)
    with pytest.raises(ValueError):
        Residual([])


def test_float32_stays_float32(backend):
    check_float32(backend)


def test_float32_only_device(float32_only_backend):
    """array-api-strict's no_float64 device rejects any float64 array a layer might create."""
    check_float32(float32_only_backend)


def check_float32(backend):
    layers = [Conv2D(1, 3, 3, padding=1), BatchNorm(3), nnx.ReLU(), MaxPool2D(2, 1),
              Residual([Conv2D(3, 3, 3, padding=1), BatchNorm(3)]), AvgPool2D(2),
              GlobalAvgPool(), BatchNorm(3), nnx.Dense(3, 2)]
    m = model_of(backend, layers, (1, 5, 5), dtype="float32")
    x = backend.from_numpy(host((4, 1, 5, 5)), dtype=backend.float32)
    for train in (True, False):
        out = m.forward(x, train=train)
        assert out.dtype == backend.float32
        dx = m.backward(backend.xp.ones_like(out))
        assert dx.dtype == backend.float32 and tuple(dx.shape) == (4, 1, 5, 5)
        for name, p in m.named_parameters().items():
            assert p.value.dtype == backend.float32, name
            assert p.grad.dtype == backend.float32 and p.grad.shape == p.value.shape, name
    for name, b in m.named_buffers().items():
        want = backend.int64 if name.endswith("num_batches_tracked") else backend.float32
        assert b.dtype == want, name


def test_state_dict_names_match_torch_sequential():
    torch = pytest.importorskip("torch")
    backend = nnx.get_backend("numpy")
    m = model_of(backend, [Conv2D(1, 4, 3, padding=1), BatchNorm(4), nnx.ReLU(), MaxPool2D(2),
                           nnx.Flatten(), nnx.Dense(4 * 3 * 3, 5), BatchNorm(5)], (1, 6, 6))
    tm = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                             torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                             torch.nn.Linear(4 * 3 * 3, 5), torch.nn.BatchNorm1d(5)).double()
    ours, theirs = m.state_dict(), tm.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert {"1.weight", "1.bias", "1.running_mean", "1.running_var",
            "1.num_batches_tracked"} <= set(ours)
    for k, v in theirs.items():
        assert ours[k].shape == tuple(v.shape), k
        assert str(ours[k].dtype) == str(v.numpy().dtype), k

    # load torch's (trained-looking) state and agree with it in eval mode
    with torch.no_grad():
        for module in (tm[1], tm[6]):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.uniform_(0.5, 2)
            module.bias.uniform_(-1, 1)
    m.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
    x = host((3, 1, 6, 6))
    assert_close(m.forward(backend.from_numpy(x)), tm.eval()(torch_t(x)).detach().numpy(), 1e-9)


def test_residual_buffers_and_spec_round_trip(backend):
    block = Residual([Conv2D(2, 2, 3, padding=1), BatchNorm(2), nnx.ReLU()])
    m = model_of(backend, [nnx.ReLU(), block], (2, 4, 4))
    assert set(m.named_buffers()) == {"1.fn.1.running_mean", "1.fn.1.running_var",
                                      "1.fn.1.num_batches_tracked"}
    assert block.layers[1].name == "1:Residual.fn.1:BatchNorm"
    m.forward(backend.from_numpy(host((3, 2, 4, 4))), train=True)

    # the spec rebuilds the block; the state loads through Residual.load_buffer
    spec = layer_to_spec(block)
    assert spec["type"] == "Residual" and spec["layers"][0]["type"] == "Conv2D"
    m2 = model_of(backend, [nnx.ReLU(), layer_from_spec(spec)], (2, 4, 4), seed=5)
    m2.load_state_dict(m.state_dict())
    x = backend.from_numpy(host((2, 2, 4, 4), 1))
    assert_close(backend.to_numpy(m2.forward(x)), backend.to_numpy(m.forward(x)))
    assert int(backend.to_numpy(m2.named_buffers()["1.fn.1.num_batches_tracked"])) == 1


def test_describe_and_config_round_trip():
    layers = [Conv2D(1, 32, 3, padding=1, method="winograd"), MaxPool2D(3, 2, 1), AvgPool2D(2), GlobalAvgPool(),
              BatchNorm(8, eps=1e-3, momentum=None), Residual([Conv2D(4, 4, 1), nnx.ReLU()])]
    assert layers[0].describe() == "Conv2D(1→32, k=3, s=1, p=1)"
    assert layers[1].describe() == "MaxPool2D(k=3, s=2, p=1)"
    assert layers[2].describe() == "AvgPool2D(k=2, s=2)"
    import json

    for layer in layers:
        spec = json.loads(json.dumps(layer_to_spec(layer)))
        assert layer_to_spec(layer_from_spec(spec)) == spec
    assert layer_from_spec(layer_to_spec(layers[0])).method == "winograd"


# --- training -----------------------------------------------------------------------------
def test_small_cnn_overfits_tiny_batch():
    backend = nnx.get_backend("numpy")
    layers = [Conv2D(1, 6, 3, padding=1), BatchNorm(6), nnx.ReLU(), MaxPool2D(2),
              Residual([Conv2D(6, 6, 3, padding=1), BatchNorm(6), nnx.ReLU()]),
              nnx.Flatten(), nnx.Dense(6 * 4 * 4, 4)]
    m = model_of(backend, layers, (1, 8, 8), dtype="float32", seed=3)
    rng = np.random.default_rng(0)
    x = backend.from_numpy(rng.standard_normal((16, 1, 8, 8)), dtype=m.dtype)
    y_host = np.arange(16) % 4
    y = backend.from_numpy(y_host)
    loss_fn, lr, losses = nnx.SoftmaxCrossEntropy(), 0.1, []
    for _ in range(60):
        losses.append(float(loss_fn.forward(m.forward(x, train=True), y)))
        m.backward(loss_fn.backward())
        for p in m.parameters():
            p.value -= lr * p.grad
    assert losses[-1] < 0.1 * losses[0], losses
    train_acc = np.mean(np.argmax(backend.to_numpy(m.forward(x, train=True)), axis=1) == y_host)
    eval_acc = np.mean(backend.to_numpy(m.predict(x)) == y_host)  # running statistics
    assert train_acc == 1.0 and eval_acc == 1.0, (train_acc, eval_acc, losses[-5:])


# --- presets ------------------------------------------------------------------------------
def test_presets_build_convolutions_before_batch_norm_without_bias():
    from nnx.architectures import PRESETS, build_layers

    assert set(PRESETS) == {"cnn", "cnn-fast"}  # the MLP is built from --layers, not a spec
    for spec in PRESETS.values():
        convs = [la for la in build_layers(spec, (1, 28, 28)) if isinstance(la, Conv2D)]
        assert len(convs) == 2 and not any(c.use_bias for c in convs)
    layers = build_layers("conv:4,relu,conv:4,maxpool:2,bn,conv:4,avgpool:2,flatten,dense:10",
                          (1, 8, 8))
    assert [la.use_bias for la in layers if isinstance(la, Conv2D)] == [True, False, True]


def test_conv_bias_before_pool_and_batch_norm_has_zero_gradient():
    """Why the spec builder drops it: batch norm (after pooling too) removes a per-channel
    constant, so the bias cannot change the loss."""
    from nnx.backends import get_backend

    m = model_of(get_backend("numpy"), [Conv2D(2, 3, 3, padding=1), MaxPool2D(2), BatchNorm(3),
                               nnx.Flatten(), nnx.Dense(12, 2)], (2, 4, 4))
    m.layers[0].bias.value = np.array([0.5, -1.0, 2.0])
    m.forward(np.asarray(host((4, 2, 4, 4), 21)), train=True)
    m.backward(np.asarray(host((4, 2), 22)))
    np.testing.assert_allclose(m.layers[0].bias.grad, 0.0, atol=1e-12)
    assert np.abs(m.layers[0].weight.grad).max() > 1e-3


def test_cli_model_choices_and_cnn_fast_defaults():
    from nnx.train import build_parser, resolve_config

    parser = build_parser()
    cfg = resolve_config(parser.parse_args(["--model", "cnn-fast"]), parser)
    assert ((cfg["optimizer"], cfg["lr"], cfg["epochs"], cfg["batch_size"], cfg["weight_decay"])
            == ("adam", 3e-3, 3, 64, 0.0))
    cfg = resolve_config(parser.parse_args(["--model", "cnn-fast", "--epochs", "2"]), parser)
    assert cfg["epochs"] == 2
    assert resolve_config(parser.parse_args(["--model", "mlp"]), parser)["model"] == "mlp"
