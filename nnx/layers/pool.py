"""Pooling over the spatial axes of NCHW batches: MaxPool2D, AvgPool2D, GlobalAvgPool.

Windows are the k·k strided slices of the (padded) input, exactly as in Conv2D's im2col
(``nnx.layers.conv``), combined element-wise (``maximum`` or ``+``) — no stacked copy and
no reduction over a tiny axis. Backward puts each window's gradient back into its strided
slice of a zero buffer (col2im with ``+=``, no scatter; plain assignment when the windows
do not overlap).

For non-overlapping windows the element-wise slices also beat the "reshape to
(N, C, H/k, k, W/k, k) and reduce" trick on NumPy, which reduces a length-2 axis slowly, so
there is no separate reshape path (measurements and the command: docs/cnn.md).

Max-pool ties: the gradient goes to the FIRST maximum of each window in row-major order
(kernel row, then column), as PyTorch does. docs/cnn.md has the derivations.
"""
from __future__ import annotations

from ..errors import ShapeError
from .base import Layer
from .conv import _as_int, add_window, crop2d, out_size, pad2d, set_window, swept_shape, window


class _Pool2D(Layer):
    """Shared shape logic of MaxPool2D and AvgPool2D."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        kind = type(self).__name__
        self.kernel_size = _as_int(kernel_size, f"{kind} kernel_size", 1)
        self.stride = self.kernel_size if stride is None else _as_int(stride, f"{kind} stride", 1)
        self.padding = _as_int(padding, f"{kind} padding", 0)
        if self.padding > self.kernel_size // 2:
            raise ValueError(f"{kind}: padding ({self.padding}) must be at most half the kernel "
                             f"size ({self.kernel_size}), as in PyTorch")

    def build(self, backend, dtype, rng, input_shape):
        out = super().build(backend, dtype, rng, input_shape)
        self.in_shape = tuple(input_shape)
        return out

    def output_shape(self, input_shape):
        ho, wo = swept_shape(self.name or type(self).__name__, input_shape, self.kernel_size,
                             self.stride, self.padding, what="window")
        return (tuple(input_shape)[0], ho, wo)

    def _check(self, x):
        if tuple(x.shape[1:]) != self.in_shape:
            self.check_features(x, self.in_shape)

    def config(self):
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding}

    def describe(self):
        pad = f", p={self.padding}" if self.padding else ""
        return f"{type(self).__name__}(k={self.kernel_size}, s={self.stride}{pad})"


class MaxPool2D(_Pool2D):
    """``MaxPool2D(kernel_size, stride=None, padding=0)``: max over each k×k window
    (stride defaults to the kernel size; padding counts as −∞, like ``F.max_pool2d``).

    (N, C, H, W) → (N, C, Ho, Wo), Ho = ⌊(H + 2p − k)/s⌋ + 1. Backward routes each output
    gradient to the FIRST maximum of its window (row-major order), as PyTorch does;
    overlapping windows (s < k) accumulate.

    Forward is k·k − 1 element-wise ``maximum`` calls over the strided window slices.
    Backward walks the offsets in row-major order carrying the not-yet-routed gradient
    ``rest``: the first offset that equals the window's max takes all of it (later ties then
    see zero), and the last offset takes whatever is left (so a window whose max is NaN
    routes its gradient to its last element, where torch picks the NaN's position); each
    offset's share is added into its strided slice of a zero buffer (col2im). When the
    windows do not overlap (s ≥ k) each slice is simply assigned, and when they tile the
    input exactly the buffer needs no zero fill.
    """

    def forward(self, x, train=False):
        self._check(x)
        pair, keep = self.pair("maxpool", MaxPoolPair), self.keeps(train)
        out, saved = pair.forward(x, self.kernel_size, self.stride, self.padding, keep)
        # (the standard pair keeps the output itself: see Layer on reusing outputs)
        self.saved = (pair, saved) if keep else None
        return out

    def backward(self, grad, input_grad=True):
        (pair, saved), self.saved = self.take_saved(), None
        return pair.backward(saved, grad, input_grad)


class MaxPoolPair:
    """The standard path of the "maxpool" pair (backends/overrides.py):
    ``forward(x, k, s, p, keep) -> (out, saved)`` (``keep``: backward will follow) and
    ``backward(saved, grad, input_grad) -> dx``, as described on MaxPool2D."""

    @staticmethod
    def forward(x, k, s, p, keep=True):
        from array_api_compat import array_namespace

        xp = array_namespace(x)
        n, c, h, w = x.shape
        ho, wo = out_size(h, k, s, p), out_size(w, k, s, p)
        xpad = pad2d(xp, x, p, value=-float("inf"))
        out = window(xpad, 0, 0, s, ho, wo)
        for i in range(k):
            for j in range(k):
                if i or j:
                    out = xp.maximum(out, window(xpad, i, j, s, ho, wo))
        return out, (xp, xpad, out, (n, c, h, w), k, s, p)

    @staticmethod
    def backward(saved, grad, input_grad=True):
        xp, xpad, out, (n, c, h, w), k, s, p = saved
        ho, wo = grad.shape[2], grad.shape[3]
        hp, wp = h + 2 * p, w + 2 * p
        # windows that tile the (padded) input exactly write every element once: no zero fill
        tiled = s == k and hp == s * ho and wp == s * wo
        # *_like: dx gets the input's memory layout (NumPy, torch and CuPy keep it), so the
        # element-wise backward of the layers below mixes no layouts (a conv's output is
        # channel-major); with padding, xpad is a fresh C-ordered array anyway
        dx = (xp.empty_like if tiled else xp.zeros_like)(xpad)
        rest = grad  # gradient of the windows whose first maximum is not found yet
        last = k * k - 1
        for i in range(k):
            for j in range(k):
                if i * k + j < last:
                    # the 0/1 hit mask becomes the share in place: a multiply, faster than
                    # where() on NumPy (docs/cnn.md)
                    share = xp.astype(window(xpad, i, j, s, ho, wo) == out, grad.dtype)
                    share *= rest
                    if rest is grad:  # the caller's array: never written to
                        rest = grad - share
                    else:
                        rest -= share  # exact: share is either rest or 0
                else:  # no earlier offset held the max, so the last one does: it takes the rest
                    share = rest
                if s >= k:  # disjoint windows: every element belongs to one window at most
                    set_window(dx, i, j, s, ho, wo, share)
                else:
                    add_window(dx, i, j, s, ho, wo, share)
        return crop2d(dx, p)


class AvgPool2D(_Pool2D):
    """``AvgPool2D(kernel_size, stride=None, padding=0)``: mean over each k×k window.

    Padding contributes zeros and the divisor is always k·k (PyTorch's default
    ``count_include_pad=True``). Backward spreads grad / k² evenly over each window.
    """

    def forward(self, x, train=False):
        xp = self.xp
        self._check(x)
        n, c, h, w = x.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        self.xshape = (n, c, h, w)
        ho, wo = out_size(h, k, s, p), out_size(w, k, s, p)
        xpad = pad2d(xp, x, p)
        total = window(xpad, 0, 0, s, ho, wo)
        for i in range(k):
            for j in range(k):
                if i or j:
                    total = total + window(xpad, i, j, s, ho, wo)
        return total * (1.0 / (k * k))

    def backward(self, grad, input_grad=True):
        xp = self.xp
        n, c, h, w = self.xshape
        k, s, p = self.kernel_size, self.stride, self.padding
        g = grad * (1.0 / (k * k))
        ho, wo = grad.shape[2], grad.shape[3]
        dx = xp.zeros((n, c, h + 2 * p, w + 2 * p), dtype=grad.dtype, device=grad.device)
        for i in range(k):
            for j in range(k):
                if s >= k:  # disjoint windows: assign instead of accumulate
                    set_window(dx, i, j, s, ho, wo, g)
                else:
                    add_window(dx, i, j, s, ho, wo, g)
        return crop2d(dx, p)


class GlobalAvgPool(Layer):
    """``GlobalAvgPool()``: (N, C, H, W) → (N, C), the mean over each feature map.

    Backward: every pixel of map c receives grad[n, c] / (H·W).
    """

    def build(self, backend, dtype, rng, input_shape):
        out = super().build(backend, dtype, rng, input_shape)
        self.in_shape = tuple(input_shape)
        return out

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 3:
            raise ShapeError(f"layer {self.name or 'GlobalAvgPool'}: expects input of shape "
                             f"(C, H, W), but the previous layer gives shape {input_shape}")
        return (input_shape[0],)

    def forward(self, x, train=False):
        if tuple(x.shape[1:]) != self.in_shape:
            self.check_features(x, self.in_shape)
        self.xshape = tuple(x.shape)
        return self.xp.mean(x, axis=(2, 3))

    def backward(self, grad, input_grad=True):
        xp = self.xp
        n, c, h, w = self.xshape
        g = xp.reshape(grad * (1.0 / (h * w)), (n, c, 1, 1))
        # a real array, not a read-only broadcast view (a caller may update it in place)
        return xp.zeros((n, c, h, w), dtype=grad.dtype, device=grad.device) + g

    def describe(self):
        return "GlobalAvgPool()"
