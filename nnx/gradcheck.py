"""Gradient check: compare hand-written backward passes with central differences.

For a scalar function L(θ), (L(θ + ε) − L(θ − ε)) / 2ε approximates ∂L/∂θ with error O(ε²).
Run in float64: in float32 the rounding error of L swamps the difference quotient.
A relative error below ~1e-6 means the backward pass is right; above ~1e-3 it is wrong.
"""
from __future__ import annotations

import itertools
import math

from .losses import SoftmaxCrossEntropy


def _rel_error(a, b, xp, floor: float = 1e-12) -> float:
    """max |a − b| over the larger of max |a|, max |b| and ``floor``: a tensor whose
    gradient is (nearly) zero is measured against the check's gradient scale (``floor``),
    not against its own rounding noise."""
    num = float(xp.max(xp.abs(a - b)))
    den = max(float(xp.max(xp.abs(a))), float(xp.max(xp.abs(b))), floor)
    return num / den


def _largest(a, xp) -> float:
    return float(xp.max(xp.abs(a))) if math.prod(a.shape) else 0.0


def _numeric_grad(f, arr, eps):
    """Central differences of scalar f() w.r.t. every element of ``arr`` (perturbed in place)."""
    import array_api_compat

    xp = array_api_compat.array_namespace(arr)
    out = [0.0] * math.prod(arr.shape)
    for k, idx in enumerate(itertools.product(*(range(d) for d in arr.shape))):
        old = float(arr[idx])
        arr[idx] = old + eps
        up = f()
        arr[idx] = old - eps
        down = f()
        arr[idx] = old
        out[k] = (up - down) / (2 * eps)
    return xp.reshape(xp.asarray(out, dtype=arr.dtype, device=arr.device), arr.shape)


def gradcheck(target, x, y=None, loss=None, eps: float = 1e-6, train: bool = False,
              seed: int = 0) -> dict:
    """Max relative error between analytic and numeric gradients, per parameter and input.

    ``target`` is a built ``Sequential`` or a built layer. With ``y`` the scalar is
    ``loss(target(x), y)`` (softmax cross-entropy by default); without it, a fixed random
    projection Σ out ⊙ R, whose gradient w.r.t. out is exactly R. With ``train=True`` the
    model's random stream is re-seeded before every forward pass, so dropout masks repeat
    (it stays re-seeded afterwards); BatchNorm's running statistics, which the training
    forwards move, are put back as they were.

    Returns ``{"input": err, "0.weight": err, ...}``; all should be < 1e-6 in float64. Each
    error is relative to the larger of that tensor's own largest gradient and 1% of the
    largest gradient in the whole check, so a tensor whose true gradient is zero (a bias
    before batch norm) is not flagged for the rounding noise of its difference quotients.
    """
    xp = getattr(target, "xp", None)
    if xp is None:
        raise TypeError("gradcheck needs a built model or layer (a Sequential, or a layer "
                        "after build(...))")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"gradcheck: eps must be a small positive number, got {eps!r}")
    if math.prod(x.shape) == 0:
        raise ValueError(f"gradcheck needs a batch with at least one value, got shape {tuple(x.shape)}")
    named = target.named_parameters()
    if x.dtype != xp.float64 or any(p.value.dtype != xp.float64 for p in named.values()):
        raise TypeError("gradcheck needs float64 inputs and parameters (float32 is too coarse)")
    x = xp.asarray(x, copy=True)
    layers = list(target.walk())
    before = [layer.retain for layer in layers]
    for layer in layers:  # inference forwards keep their caches only when asked
        layer.retain = True
    buffers = {name: xp.asarray(b, copy=True) for name, b in target.named_buffers().items()}
    try:
        return _check(target, x, y, loss, eps, train, seed, named, xp)
    finally:
        for layer, keep in zip(layers, before):
            layer.retain = keep
        for name, b in buffers.items():
            target.load_buffer(name, b)


def _check(target, x, y, loss, eps, train, seed, named, xp):
    """gradcheck's comparison, with every layer retaining its caches."""
    rng = getattr(target, "rng", None)

    def run_forward():
        if train and rng is not None:
            rng.reseed(seed)
        return target.forward(x, train)

    out = run_forward()
    if y is not None:
        loss = loss or SoftmaxCrossEntropy()
        scalar = lambda o: loss.forward(o, y)
        upstream = lambda o: (loss.forward(o, y), loss.backward())[1]
    else:
        proj = target.backend.host_rng(seed + 12345).normal(tuple(out.shape), dtype=out.dtype)
        scalar = lambda o: xp.sum(o * proj)
        upstream = lambda o: proj
    grad_in = target.backward(upstream(out))
    analytic = {name: p.grad for name, p in named.items()}

    f = lambda: float(scalar(run_forward()))
    numeric = {"input": _numeric_grad(f, x, eps)}
    for name, p in named.items():
        numeric[name] = _numeric_grad(f, p.value, eps)
    analytic["input"] = grad_in
    floor = max([1e-12] + [0.01 * _largest(a, xp) for a in analytic.values()])
    return {name: _rel_error(analytic[name], numeric[name], xp, floor)
            for name in ["input", *named]}
