"""Shared by the block-pair test files (tests/test_batchnorm_maxpool.py,
tests/test_conv_batchnorm_maxpool.py): a small CNN with a chosen first batch norm, and one
training step's results on the host."""
from __future__ import annotations

import numpy as np

import nnx
from nnx import layers as L


def small_cnn(backend, dtype, channels, input_shape, seed=3, negative=()):
    """conv(1→c₁), bn, relu, maxpool, conv(c₁→c₂), bn, relu, maxpool, flatten, dense(10),
    with ``channels`` = (c₁, c₂); ``negative``: channels of the first batch norm given
    γ = −0.7."""
    c1, c2 = channels
    h, w = input_shape[1] // 4, input_shape[2] // 4
    model = nnx.Sequential([L.Conv2D(1, c1, 3, padding=1), L.BatchNorm(c1), L.ReLU(),
                            L.MaxPool2D(2), L.Conv2D(c1, c2, 3, padding=1), L.BatchNorm(c2),
                            L.ReLU(), L.MaxPool2D(2), L.Flatten(), L.Dense(c2 * h * w, 10)],
                           input_shape, backend=backend, dtype=dtype, seed=seed)
    gamma = np.ones(c1)
    gamma[list(negative)] = -0.7
    model.layers[1].weight.value = backend.from_numpy(gamma, dtype=model.dtype)
    return model


def step_results(model, x, g, input_grad):
    """One training forward and backward: ({output, input gradient, parameter gradients,
    buffers} as NumPy arrays, the order the chain ran its layers in)."""
    out = model.forward(x, train=True)
    ran = list(model._ran)
    dx = model.backward(g, input_grad=input_grad)
    res = {"out": out, "dx": dx}
    res.update({f"grad {k}": p.grad for k, p in model.named_parameters().items()})
    res.update({f"buffer {k}": b for k, b in model.named_buffers().items()})
    return {k: None if v is None else model.backend.to_numpy(v) for k, v in res.items()}, ran


def in_layout(a, layout):
    """``a`` (N, C, H, W) in one of the memory layouts a layer may be handed:
    "channel-major" (a Conv2D's or a pool's output), "channels-last" ((N, H, W, C) images
    handed over as NCHW) or "nchw"."""
    if layout == "channel-major":
        return np.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    if layout == "channels-last":
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(a)
