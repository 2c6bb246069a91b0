"""2-D convolution (NCHW) by im2col + one matmul; backward by col2im without scatter.

Written against the Array API standard only (no pad, conv, einsum, as_strided or scatter):

* padding concatenates zero blocks onto the two spatial axes;
* im2col stacks the k·k strided slices of the padded input (one slice per kernel offset);
* col2im adds each of the k·k window gradients into its strided slice of a zero buffer
  with ``+=`` — one strided slice never names an element twice, so no scatter-add is
  needed — and crops the padding off.

docs/cnn.md derives the shapes and gradients.
"""
from __future__ import annotations

from .. import init as initializers
from ..errors import ShapeError
from .base import Layer


# --- helpers shared with pool.py ---------------------------------------------------------
def _as_int(value, what: str, minimum: int) -> int:
    """A positive (or non-negative) int; square kernels, strides and paddings only."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or int(value[0]) != int(value[1]):
            raise ValueError(f"{what} must be a single int (square), got {value!r}")
        value = value[0]
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def out_size(size: int, k: int, s: int, p: int) -> int:
    """Output length of a window sweep: floor((size + 2p − k) / s) + 1."""
    return (size + 2 * p - k) // s + 1


def swept_shape(name: str, input_shape, k: int, s: int, p: int, channels=None, what="kernel"):
    """(C, Ho, Wo) → validated (Ho, Wo) of a k x k window sweep; ShapeError names the layer."""
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or (channels is not None and input_shape[0] != channels):
        want = f"({channels if channels is not None else 'C'}, H, W)"
        raise ShapeError(f"layer {name}: expects input of shape {want}, but the previous layer "
                         f"gives shape {input_shape}")
    ho, wo = out_size(input_shape[1], k, s, p), out_size(input_shape[2], k, s, p)
    if ho < 1 or wo < 1:
        raise ShapeError(f"layer {name}: a {k}x{k} {what} with padding {p} does not fit an "
                         f"input of shape {input_shape}")
    return ho, wo


def pad2d(xp, x, p: int, value: float = 0.0):
    """Pad the last two axes of ``x`` by ``p`` on each side with ``value`` (concat, no pad())."""
    if p == 0:
        return x
    *lead, h, w = x.shape
    full = lambda shape: xp.full(tuple(shape), value, dtype=x.dtype, device=x.device)
    rows = full((*lead, p, w))
    x = xp.concat([rows, x, rows], axis=-2)
    cols = full((*lead, h + 2 * p, p))
    return xp.concat([cols, x, cols], axis=-1)


def window(x, i: int, j: int, s: int, ho: int, wo: int):
    """The strided slice of ``x`` (last two axes) seen by kernel offset (i, j): shape (..., ho, wo)."""
    return x[..., i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s]


def add_window(buf, i: int, j: int, s: int, ho: int, wo: int, value) -> None:
    """``buf[window (i, j)] += value`` — the col2im step; a strided slice has no repeats."""
    buf[..., i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s] += value


def set_window(buf, i: int, j: int, s: int, ho: int, wo: int, value) -> None:
    """``buf[window (i, j)] = value`` — col2im when windows do not overlap (stride ≥ k)."""
    buf[..., i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s] = value


def crop2d(x, p: int):
    """Undo ``pad2d``: drop ``p`` rows/columns from each side of the last two axes."""
    if p == 0:
        return x
    return x[..., p:x.shape[-2] - p, p:x.shape[-1] - p]


class Conv2D(Layer):
    """``Conv2D(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
    init="he_normal")`` — cross-correlation like ``torch.nn.Conv2d`` (square kernels).

    Shapes: x (N, C, H, W), weight (O, C, k, k), bias (O,), y (N, O, Ho, Wo) with
    Ho = ⌊(H + 2p − k)/s⌋ + 1 (and likewise Wo).

    Internally the input is taken channel-major, x → (C, N, Hp, Wp), so the k·k stacked
    slices form cols (k·k·C, N·Ho·Wo) directly and the whole layer is ONE 2-D matmul with
    the weight reordered to (O, k·k·C): y = W₂ @ cols. Backward:
    dW₂ = g₂ @ colsᵀ, db = Σ g, dcols = W₂ᵀ @ g₂, then col2im.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, init: str = "he_normal"):
        super().__init__()
        self.in_channels = _as_int(in_channels, "Conv2D in_channels", 1)
        self.out_channels = _as_int(out_channels, "Conv2D out_channels", 1)
        self.kernel_size = _as_int(kernel_size, "Conv2D kernel_size", 1)
        self.stride = _as_int(stride, "Conv2D stride", 1)
        self.padding = _as_int(padding, "Conv2D padding", 0)
        self.use_bias, self.init = bool(bias), init

    # --- life cycle ---------------------------------------------------------------------
    def build(self, backend, dtype, rng, input_shape):
        super().build(backend, dtype, rng, input_shape)
        c, o, k = self.in_channels, self.out_channels, self.kernel_size
        shape = (o, c, k, k)
        w = initializers.get(self.init)(rng, shape, c * k * k, o * k * k, dtype)
        self.weight = self.add_param("weight", w)
        if self.use_bias:
            b = self.xp.zeros((o,), dtype=dtype, device=backend.device)
            self.bias = self.add_param("bias", b)
        self.in_shape = tuple(input_shape)
        return self.output_shape(input_shape)

    def output_shape(self, input_shape):
        ho, wo = swept_shape(self.name or "Conv2D", input_shape, self.kernel_size, self.stride,
                             self.padding, channels=self.in_channels)
        return (self.out_channels, ho, wo)

    # --- passes -------------------------------------------------------------------------
    def forward(self, x, train=False):
        xp = self.xp
        if tuple(x.shape[1:]) != self.in_shape:
            self.check_features(x, self.in_shape)
        n, c, h, w = x.shape
        k, s, p, o = self.kernel_size, self.stride, self.padding, self.out_channels
        ho, wo = out_size(h, k, s, p), out_size(w, k, s, p)
        xc = pad2d(xp, xp.permute_dims(x, (1, 0, 2, 3)), p)          # (C, N, Hp, Wp)
        slices = [window(xc, i, j, s, ho, wo) for i in range(k) for j in range(k)]
        cols = xp.reshape(xp.stack(slices, axis=0), (k * k * c, n * ho * wo))  # (kkC, N·L)
        w2 = xp.reshape(xp.permute_dims(self.weight.value, (0, 2, 3, 1)), (o, k * k * c))
        y = w2 @ cols                                                  # (O, N·L)
        if self.use_bias:
            y += xp.reshape(self.bias.value, (o, 1))  # in place: y is the matmul's fresh output
        if self.keeps(train):
            self.cols, self.w2, self.xshape = cols, w2, (n, c, h, w)
        return xp.permute_dims(xp.reshape(y, (o, n, ho, wo)), (1, 0, 2, 3))

    def backward(self, grad, input_grad=True):
        xp = self.xp
        n, c, h, w = self.xshape
        k, s, p, o = self.kernel_size, self.stride, self.padding, self.out_channels
        ho, wo = grad.shape[2], grad.shape[3]
        g2 = xp.reshape(xp.permute_dims(grad, (1, 0, 2, 3)), (o, n * ho * wo))
        dw2 = g2 @ self.cols.T                                         # (O, kkC)
        self.weight.grad = xp.permute_dims(xp.reshape(dw2, (o, k, k, c)), (0, 3, 1, 2))
        if self.use_bias:
            self.bias.grad = xp.sum(g2, axis=1)
        if not input_grad:  # first layer of a model: skip the matmul and col2im
            self.cols = None
            return None
        dcols = xp.reshape(self.w2.T @ g2, (k * k, c, n, ho, wo))
        dxc = xp.zeros((c, n, h + 2 * p, w + 2 * p), dtype=grad.dtype, device=grad.device)
        put = set_window if s >= k else add_window  # disjoint windows need no accumulation
        for i in range(k):
            for j in range(k):
                put(dxc, i, j, s, ho, wo, dcols[i * k + j, ...])
        self.cols = None  # free the im2col buffer (the largest array of the layer)
        return xp.permute_dims(crop2d(dxc, p), (1, 0, 2, 3))

    # --- description --------------------------------------------------------------------
    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "bias": self.use_bias, "init": self.init}

    def describe(self):
        return (f"Conv2D({self.in_channels}→{self.out_channels}, k={self.kernel_size}, "
                f"s={self.stride}, p={self.padding})")
