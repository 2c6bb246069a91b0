"""PyTorch's fused calls: the "torch" backend's overrides of named operations.

The standard Array-API path spells each operation out in the primitives the standard has
(``maximum``, ``*``, ``+=``), one library call each; torch has single calls that do several
of those at once (``relu``, ``log_softmax``, ``add(alpha=)``,
``addcmul_``). Fewer calls is what matters on a GPU, where each is a kernel launch (and on
the CPU each costs a dispatch). The arithmetic is the same; torch may fuse a multiply-add
into one rounding, which the self-check's tolerance allows (backends/overrides.py checks
each the first time it runs, and tests/test_overrides.py against the standard path on
every dtype). Nothing here uses autograd.
"""
from __future__ import annotations

from .overrides import register


def _torch():
    import torch

    return torch


@register("torch", "relu_forward")
def relu_forward(x):
    return _torch().relu(x)


@register("torch", "relu_backward")
def relu_backward(grad, y):
    # grad·[y > 0] with the comparison's bool promoted inside the multiply (no cast pass).
    # torch's own threshold_backward would be one call, but passes the gradient where y is
    # NaN; this keeps the standard path's 0 there
    return _torch().mul(grad, y > 0)


@register("torch", "softmax_xent")
def softmax_xent(loss, logits, target):
    torch = _torch()
    n = logits.shape[0]
    logp = torch.log_softmax(logits, 1)
    probs = torch.exp(logp)
    loss.probs, loss.target, loss.n, loss._grad = probs, target, n, None
    picked = torch.sum(logp * target)
    # a row is correct when its target's logit is the row maximum: z − max z == 0, as on
    # the standard path (ties count; a +inf logit gives NaN there, and does not)
    correct = torch.sum(((logits - torch.amax(logits, 1, keepdim=True)) == 0) * target)
    grad = torch.sub(probs, target)
    grad *= 1.0 / max(n, 1)  # an empty batch (a process's empty share): an empty gradient
    return picked, correct, grad


@register("torch", "nesterov_update")
def nesterov_update(opt, p, g, slots, hyper):
    # d = g + λp; v ← μv + d; p ← p − lr·(d + μv)
    torch = _torch()
    (v,) = slots
    d = torch.add(g, p, alpha=opt.weight_decay) if opt.weight_decay else g
    v.mul_(opt.momentum).add_(d)
    _sub_scaled(p, torch.add(d, v, alpha=opt.momentum), hyper[0])


@register("torch", "adam_update")
def adam_update(opt, p, g, slots, hyper):
    # m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; p ← p − step·m / (√v / √(1−β₂ᵗ) + ε)
    torch = _torch()
    m, v = slots
    if opt.weight_decay:
        if opt.decoupled:
            p.mul_(hyper[3])
        else:
            g = torch.add(g, p, alpha=opt.weight_decay)
    m.mul_(opt.beta1).add_(g, alpha=1.0 - opt.beta1)
    v.mul_(opt.beta2).addcmul_(g, g, value=1.0 - opt.beta2)
    denom = torch.sqrt(v).mul_(hyper[2]).add_(opt.eps)
    _sub_scaled(p, torch.div(m, denom), hyper[1])


def _sub_scaled(p, t, scale):
    """p ← p − scale·t in one call; ``scale`` a 0-D tensor (the hyper table) or a float."""
    if not isinstance(scale, _torch().Tensor):
        p.add_(t, alpha=-scale)
    else:
        p.addcmul_(t, scale, value=-1)


# --- forward/backward pairs (overrides.CheckedPair): a layer whose backend offers one runs
# it instead of its own passes; each keeps in ``saved`` what its backward needs ------------
@register("torch", "conv2d")
class TorchConv2D:
    """torch's convolution (oneDNN on the CPU, cuDNN on CUDA) and its backward, one call
    each, instead of im2col's window copies and col2im's window sums (tens of calls)."""

    @staticmethod
    def forward(x, w, b, stride, padding):
        torch = _torch()
        y = torch.nn.functional.conv2d(x, w, b, stride, padding)
        return y, (x, w, b is not None, stride, padding)

    @staticmethod
    def backward(saved, grad, input_grad):
        x, w, has_bias, s, p = saved
        dx, dw, db = _torch().ops.aten.convolution_backward.default(
            grad, x, w, [w.shape[0]] if has_bias else None, [s, s], [p, p], [1, 1], False,
            [0, 0], 1, [bool(input_grad), True, has_bias])
        return dx, dw, db


@register("torch", "batchnorm")
class TorchBatchNorm:
    """torch's batch-norm kernels in training (batch statistics, no running statistics: the
    layer updates those), one call each way. The biased variance the layer needs for its
    running statistics comes back from torch's 1/σ: var = σ⁻² − eps."""

    @staticmethod
    def forward(x, weight, bias, eps):
        torch = _torch()
        y, mean, invstd = torch.ops.aten.native_batch_norm.default(
            x, weight, bias, None, None, True, 0.0, eps)
        var = torch.pow(invstd, -2)
        var -= eps
        var.clamp_min_(0.0)  # a constant channel: 0, never a rounding error below it
        return (y, mean, var), (x, weight, mean, invstd, eps)

    @staticmethod
    def backward(saved, grad, input_grad):
        x, weight, mean, invstd, eps = saved
        return _torch().ops.aten.native_batch_norm_backward.default(
            grad, x, weight, None, None, mean, invstd, True, eps, [bool(input_grad), True, True])


@register("torch", "maxpool")
class TorchMaxPool:
    """torch's max pooling with the argmax indices, and its backward: one call each. Ties
    go to the first maximum in row-major order, as on the standard path; a window holding
    NaN routes its gradient to the NaN (the standard path: to the window's last element)."""

    @staticmethod
    def forward(x, k, s, p, keep):
        torch = _torch()
        if not keep:  # inference: no argmax indices
            return torch.nn.functional.max_pool2d(x, k, s, p), None
        out, index = torch.ops.aten.max_pool2d_with_indices.default(x, [k, k], [s, s], [p, p])
        return out, (x, index, k, s, p)

    @staticmethod
    def backward(saved, grad, input_grad):
        x, index, k, s, p = saved
        return _torch().ops.aten.max_pool2d_with_indices_backward.default(
            grad, x, [k, k], [s, s], [p, p], [1, 1], False, index)
