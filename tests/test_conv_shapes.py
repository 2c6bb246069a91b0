"""Every Conv2D method against the im2col reference and torch.nn.functional.conv2d over a
sweep of kernel sizes, strides, paddings and small feature maps — including maps smaller
than the kernel's reach, where whole window offsets read only padding."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import nnx
from nnx.layers.conv import METHODS, Conv2D

CASES = [(k, s, p, h, w) for k, s, p in itertools.product((1, 2, 3, 5), (1, 2, 3), (0, 1, 2))
         for h, w in ((1, 4), (2, 2), (3, 5), (6, 4)) if p <= k // 2 + 1
         and (h + 2 * p - k) // s + 1 >= 1 and (w + 2 * p - k) // s + 1 >= 1]


def _run(method, x, g, weight, k, s, p):
    b = nnx.get_backend("numpy")
    conv = Conv2D(2, 3, k, stride=s, padding=p, bias=False, method=method)
    m = nnx.Sequential([conv], input_shape=x.shape[1:], backend=b, dtype="float64")
    conv.weight.value = weight
    y = m.forward(x, train=True)
    dx = m.backward(g[..., :y.shape[2], :y.shape[3]].copy())
    return np.asarray(y), np.asarray(dx), np.asarray(conv.weight.grad)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "k{}s{}p{}_{}x{}".format(*c))
def test_every_method_matches_the_reference_and_torch(case):
    torch = pytest.importorskip("torch")
    k, s, p, h, w = case
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((2, 2, h, w))
    weight = rng.standard_normal((3, 2, k, k))
    g = rng.standard_normal((2, 3, h + 2 * p, w + 2 * p))
    ref = _run("im2col", x, g, weight, k, s, p)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(weight, requires_grad=True)
    yt = torch.nn.functional.conv2d(xt, wt, stride=s, padding=p)
    yt.backward(torch.tensor(g[..., :yt.shape[2], :yt.shape[3]].copy()))
    torch_out = (yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy())
    for method in METHODS:
        out = _run(method, x, g, weight, k, s, p)
        for name, a, r, t in zip(("y", "dx", "dW"), out, ref, torch_out):
            np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-10, err_msg=f"{method} {name}")
            np.testing.assert_allclose(a, t, rtol=1e-10, atol=1e-10, err_msg=f"{method} {name}")
