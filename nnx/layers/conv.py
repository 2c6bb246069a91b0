"""2-D convolution (NCHW) by im2col + one matmul; backward by col2im without scatter.

Written against the Array API standard only (no pad, conv, einsum, as_strided or scatter):

* im2col copies the k·k strided window slices of the input into one column matrix (the
  reference method pads with concatenated zero blocks first; ``"gather"`` assigns each
  slice's in-image part straight from the unpadded input);
* ``method="rows"`` (what the default ``"fast"`` picks for wide stride-1 "same" layers)
  builds the column matrix over the kernel's columns only and applies the kernel's rows as
  whole-row shifts of the matmul's output;
* col2im adds each of the k·k window gradients into its strided slice of the input gradient
  with ``+=`` — one strided slice never names an element twice, so no scatter-add is needed;
* ``method="winograd"`` computes 3×3 stride-1 convolutions as Winograd F(2×2, 3×3), its
  transforms written as small matrix products over all tiles at once.

In training, a chain may run a Conv2D with the BatchNorm and MaxPool2D after it as one
"conv_batchnorm_maxpool" pair (``forward_block``; the standard pair is
``ConvBatchNormMaxPoolPair``, NumPy's orders the column matrix window by window).

docs/cnn.md derives the shapes and gradients, and measures the methods against each other.
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


def valid(i: int, s: int, p: int, size: int, count: int):
    """For kernel offset ``i``: the outputs a in [a0, a1) whose input row a·s + i − p lies
    inside 0 … size−1 (the others read padding), and the first such input row."""
    a0 = -((i - p) // s) if i < p else 0  # ceil((p − i) / s)
    a1 = max(a0, min(count, (size - 1 + p - i) // s + 1))
    return a0, a1, a0 * s + i - p


def gather(xp, x, k: int, s: int, p: int, ho: int, wo: int):
    """im2col straight from the unpadded ``x`` (..., H, W): (k·k, ..., ho, wo) with
    out[i·k + j][..., a, b] = x[..., a·s + i − p, b·s + j − p], 0 where that is padding.

    Same values as stacking the windows of ``pad2d(x, p)``, without building the padded
    copy: each offset's block is one strided assignment, plus zeros on its border strips.
    ``ho``/``wo`` may exceed the swept size (Winograd's tiles read past the last row)."""
    *lead, h, w = x.shape
    if s == 1 and 2 * p == k - 1 and (ho, wo) == (h, w):
        return _gather_same(xp, x, k, p)
    out = xp.empty((k * k, *lead, ho, wo), dtype=x.dtype, device=x.device)
    for i in range(k):
        a0, a1, r0 = valid(i, s, p, h, ho)
        for j in range(k):
            b0, b1, c0 = valid(j, s, p, w, wo)
            q = i * k + j  # writes index ``out`` itself (the standard leaves writes through views open)
            if a1 <= a0 or b1 <= b0:  # this offset reads only padding
                out[q, ...] = 0
                continue
            out[q, ..., a0:a1, b0:b1] = x[..., r0:r0 + s * (a1 - a0 - 1) + 1:s,
                                          c0:c0 + s * (b1 - b0 - 1) + 1:s]
            if a0 > 0:
                out[q, ..., :a0, :] = 0
            if a1 < ho:
                out[q, ..., a1:, :] = 0
            if b0 > 0:
                out[q, ..., a0:a1, :b0] = 0
            if b1 < wo:
                out[q, ..., a0:a1, b1:] = 0
    return out


def scatter(xp, cols, k: int, s: int, p: int, h: int, w: int):
    """col2im into the unpadded input: the transpose of ``gather``. ``cols`` (k·k, ..., ho, wo)
    → (..., h, w), each element the sum of the entries of ``cols`` that ``gather`` copied it
    to (gradients that fell on padding are dropped, never stored).

    When one offset covers the whole input (stride 1, "same" padding: the centre offset),
    its block IS the start of the sum: the others are added into it in place (``cols`` is
    the caller's scratch), so the result needs no zero fill and no extra pass."""
    ho, wo = cols.shape[-2], cols.shape[-1]
    if s == 1 and 2 * p == k - 1 and (ho, wo) == (h, w):
        return _scatter_same(xp, cols, k, p)
    spans = [(valid(i, s, p, h, ho), valid(j, s, p, w, wo)) for i in range(k) for j in range(k)]
    full = next((q for q, ((a0, a1, r0), (b0, b1, c0)) in enumerate(spans)
                 if s == 1 and r0 == 0 and c0 == 0 and a1 - a0 == h and b1 - b0 == w), None)
    if full is None:
        dx = xp.zeros((*cols.shape[1:-2], h, w), dtype=cols.dtype, device=cols.device)
    else:
        a0, b0 = spans[full][0][0], spans[full][1][0]
        dx = cols[full, ..., a0:a0 + h, b0:b0 + w]
    for q, ((a0, a1, r0), (b0, b1, c0)) in enumerate(spans):
        if q == full or a1 <= a0 or b1 <= b0:
            continue
        dx[..., r0:r0 + s * (a1 - a0 - 1) + 1:s, c0:c0 + s * (b1 - b0 - 1) + 1:s] += \
            cols[q, ..., a0:a1, b0:b1]
    return dx


def _wrapped(dj: int, w: int):
    """Columns b of a row whose neighbour b + dj falls off the image (0 <= b + dj < w fails)."""
    return range(w - dj, w) if dj > 0 else range(0, -dj)


def _gather_same(xp, x, k: int, p: int):
    """``gather`` for stride 1 and "same" padding (2p = k − 1): the k·k shifted copies
    ``shifted`` makes of the flattened images, offset (i, j) shifted by (i − p, j − p)."""
    *lead, h, w = x.shape
    xf = xp.reshape(x, (*lead, h * w))
    out = shifted(xp, xf, w, [(i - p, j - p) for i in range(k) for j in range(k)])
    return xp.reshape(out, (k * k, *lead, h, w))


def _scatter_same(xp, cols, k: int, p: int):
    """``scatter`` for stride 1 and "same" padding, the transpose of ``_gather_same``
    (``unshifted_sum`` into the centre block). ``cols`` is the caller's scratch."""
    *lead, h, w = cols.shape[1:]
    cf = xp.reshape(cols, (k * k, *lead, h * w))
    dx = unshifted_sum(xp, cf, w, [(i - p, j - p) for i in range(k) for j in range(k)])
    return xp.reshape(dx, (*lead, h, w))


def shifted(xp, xf, w: int, shifts):
    """Copies of the images ``xf`` (..., L), flattened from (..., H, W) with L = H·W, each
    shifted by one (di, dj) of ``shifts``: out[q][..., a·W + b] = x[..., a + di, b + dj], and
    0 where that falls outside the image. Shape (len(shifts), ..., L).

    In flat positions f = a·W + b the shift is by δ = di·W + dj, so each block is ONE copy of
    a contiguous run of L − |δ| values per image, plus zeros where the shift reads above or
    below the image (the first or last |δ| positions) or wraps around a row end (the columns
    ``_wrapped`` names, a strided slice each)."""
    *lead, n = xf.shape
    out = xp.empty((len(shifts), *lead, n), dtype=xf.dtype, device=xf.device)
    for q, (di, dj) in enumerate(shifts):
        d = di * w + dj
        lo = min(n, max(0, -d))                          # out[f] = x[f + d] for lo <= f < hi
        hi = max(lo, min(n, n - d))                      # (none when |δ| >= L)
        if hi > lo:  # writes index ``out`` itself (the standard leaves writes through views open)
            out[q, ..., lo:hi] = xf[..., lo + d:hi + d]
        if lo > 0:
            out[q, ..., :lo] = 0
        if hi < n:
            out[q, ..., hi:] = 0
        for b in _wrapped(dj, w):
            out[q, ..., b::w] = 0
    return out


def unshifted_sum(xp, cf, w: int, shifts):
    """The transpose of ``shifted``: Σ_q of block q of ``cf`` (len(shifts), ..., L) moved
    back by its shift, as (..., L). The block whose shift is (0, 0) is the start of the sum
    and the others are added into it in place, one contiguous-run ``+=`` each, after zeroing
    the entries that wrapped around a row end (they belong to padding); so ``cf`` is the
    caller's scratch, and the result is a view of it."""
    centre = shifts.index((0, 0))
    n = cf.shape[-1]
    for q, (di, dj) in enumerate(shifts):
        if q != centre:
            for b in _wrapped(dj, w):
                cf[q, ..., b::w] = 0
    for q, (di, dj) in enumerate(shifts):
        d = di * w + dj
        lo, hi = max(0, -d), min(n, n - d)
        if q != centre and hi > lo:
            cf[centre, ..., lo + d:hi + d] += cf[q, ..., lo:hi]
    return cf[centre, ...]


def crop2d(x, p: int):
    """Undo ``pad2d``: drop ``p`` rows/columns from each side of the last two axes."""
    if p == 0:
        return x
    return x[..., p:x.shape[-2] - p, p:x.shape[-1] - p]


#: Winograd F(2×2, 3×3) transforms (Lavin & Gray 2016): input Bᵀ, filter G, output Aᵀ.
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _kron(P, Q):
    """P ⊗ Q as nested tuples: row (r, s), column (i, j) holds P[r][i]·Q[s][j]."""
    return [[P[r][i] * Q[t][j] for i in range(len(P[0])) for j in range(len(Q[0]))]
            for r in range(len(P)) for t in range(len(Q))]


#: Conv2D's ways to compute the same convolution (docs/cnn.md, "Where the time goes")
METHODS = ("fast", "im2col", "gather", "rows", "winograd")


def im2col_forward(xp, x, w, b, s: int, p: int, padded: bool = False):
    """Convolution by im2col and one matmul: ``(y, saved)`` for ``im2col_backward``.

    x (N, C, H, W), w (O, C, k, k), b (O,) or None. The input is taken channel-major,
    (C, N, H, W), so the k·k stacked window slices form cols (k·k·C, N·Ho·Wo) directly and
    y₂ = W₂ @ cols with W₂ (O, k·k·C) the weight reordered; y is y₂ seen as NCHW (a
    channel-major array, which the layers after it keep). ``padded``: the reference
    im2col (pad with concatenations, stack the slices) instead of ``gather``."""
    n, c, h, wd = x.shape
    o, k = w.shape[0], w.shape[2]
    ho, wo = out_size(h, k, s, p), out_size(wd, k, s, p)
    xc = xp.permute_dims(x, (1, 0, 2, 3))
    if padded:
        xc = pad2d(xp, xc, p)                                              # (C, N, Hp, Wp)
        cols = xp.stack([window(xc, i, j, s, ho, wo) for i in range(k) for j in range(k)], axis=0)
    else:
        cols = gather(xp, xc, k, s, p, ho, wo)
    cols = xp.reshape(cols, (k * k * c, n * ho * wo))                      # (kkC, N·L)
    w2 = xp.reshape(xp.permute_dims(w, (0, 2, 3, 1)), (o, k * k * c))
    y = w2 @ cols                                                          # (O, N·L)
    if b is not None:
        y += xp.reshape(b, (o, 1))  # in place: y is the matmul's fresh output
    y = xp.permute_dims(xp.reshape(y, (o, n, ho, wo)), (1, 0, 2, 3))
    return y, (xp, cols, w2, (n, c, h, wd), k, s, p, b is not None, padded)


def im2col_backward(saved, grad, input_grad=True):
    """(dx or None, dw, db or None) of ``im2col_forward``: dW₂ = g₂ @ colsᵀ, db = Σ g,
    dcols = W₂ᵀ @ g₂, then col2im (``scatter``, or window ``+=`` into a zero-filled padded
    buffer for the reference)."""
    xp, cols, w2, (n, c, h, w), k, s, p, has_bias, padded = saved
    o = w2.shape[0]
    ho, wo = grad.shape[2], grad.shape[3]
    g2 = xp.reshape(xp.permute_dims(grad, (1, 0, 2, 3)), (o, n * ho * wo))
    db = xp.sum(g2, axis=1) if has_bias else None
    dw = xp.permute_dims(xp.reshape(g2 @ cols.T, (o, k, k, c)), (0, 3, 1, 2))
    if not input_grad:  # first layer of a model: skip the matmul and col2im
        return None, dw, db
    dcols = xp.reshape(w2.T @ g2, (k * k, c, n, ho, wo))
    if not padded:
        return xp.permute_dims(scatter(xp, dcols, k, s, p, h, w), (1, 0, 2, 3)), dw, db
    dxc = xp.zeros((c, n, h + 2 * p, w + 2 * p), dtype=grad.dtype, device=grad.device)
    put = set_window if s >= k else add_window  # disjoint windows need no accumulation
    for i in range(k):
        for j in range(k):
            put(dxc, i, j, s, ho, wo, dcols[i * k + j, ...])
    return xp.permute_dims(crop2d(dxc, p), (1, 0, 2, 3)), dw, db


class Im2colPair:
    """The standard path of the "conv2d" pair (backends/overrides.py): ``im2col_forward``
    and ``im2col_backward`` as ``forward(x, w, b, stride, padding) -> (y, saved)`` and
    ``backward(saved, grad, input_grad) -> (dx, dw, db)``."""

    @staticmethod
    def forward(x, w, b, s, p):
        from array_api_compat import array_namespace

        return im2col_forward(array_namespace(x), x, w, b, s, p)

    backward = staticmethod(im2col_backward)


class ConvBatchNormMaxPoolPair:
    """The standard path of the "conv_batchnorm_maxpool" pair (backends/overrides.py): a
    Conv2D (im2col, its ``"gather"`` method), the training BatchNorm after it and the
    MaxPool2D after that, composed — ``im2col_forward``, then ``BatchNormMaxPoolPair``.
    ``forward(x, w, b, stride, padding, γ, β, eps, k, s, p) -> ((pooled y, μ, biased var),
    saved)``; ``backward(saved, pooled grad, input_grad) -> (dx or None, dw, db or None, dγ,
    dβ)``. A backend's version may lay the convolution's output out window by window, so
    that the pool reads each window's values from four contiguous blocks (docs/cnn.md,
    "Convolution, batch norm and max pool (NumPy: one pair for three layers)")."""

    @staticmethod
    def forward(x, w, b, stride, padding, weight, bias, eps, k, s, p):
        from array_api_compat import array_namespace

        from .batchnorm import BatchNormMaxPoolPair

        y, conv = im2col_forward(array_namespace(x), x, w, b, stride, padding)
        out, bn = BatchNormMaxPoolPair.forward(y, weight, bias, eps, k, s, p)
        return out, (conv, bn)

    @staticmethod
    def backward(saved, grad, input_grad):
        from .batchnorm import BatchNormMaxPoolPair

        conv, bn = saved
        dy, dgamma, dbeta = BatchNormMaxPoolPair.backward(bn, grad, True)
        dx, dw, db = im2col_backward(conv, dy, input_grad)
        return dx, dw, db, dgamma, dbeta


class Conv2D(Layer):
    """``Conv2D(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
    init="he_normal", method="fast")`` — cross-correlation like ``torch.nn.Conv2d`` (square
    kernels).

    Shapes: x (N, C, H, W), weight (O, C, k, k), bias (O,), y (N, O, Ho, Wo) with
    Ho = ⌊(H + 2p − k)/s⌋ + 1 (and likewise Wo).

    Internally the input is taken channel-major, x → (C, N, H, W), so the k·k stacked
    slices form cols (k·k·C, N·Ho·Wo) directly and the whole layer is ONE 2-D matmul with
    the weight reordered to (O, k·k·C): y = W₂ @ cols. Backward:
    dW₂ = g₂ @ colsᵀ, db = Σ g, dcols = W₂ᵀ @ g₂, then col2im. The output is a
    channel-major (O, N, Ho, Wo) array seen as NCHW, which the layers after it keep.

    ``method`` picks how (all give the same result up to float rounding):

    * ``"im2col"`` — the reference: pad with concatenations, stack the k·k window slices,
      col2im into a zero-filled padded buffer;
    * ``"gather"`` — the same matmuls, with im2col written straight from the unpadded input
      (no padded copy) and col2im accumulating into the centre offset's block of dcols (no
      zero fill, no crop);
    * ``"rows"`` — for stride-1 "same" convolutions (others fall back to ``"gather"``):
      im2col over the kernel's columns only, k·C rows instead of k·k·C, and one matmul giving
      k row-partial outputs that are summed shifted by whole rows (a col2im that never wraps);
    * ``"fast"`` (default, fastest measured on NumPy) — ``"rows"`` where it moves fewer
      values than ``"gather"`` (k·C ≥ O), else ``"gather"``;
    * ``"winograd"`` — F(2×2, 3×3) for 3×3 stride-1 kernels: 16 products of (O×C)·(C×tiles)
      instead of one of (O×9C)·(9C×N·L), 2.25× fewer multiplies, with the transforms as
      small matrix products. Other kernels fall back to ``"gather"``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, init: str = "he_normal",
                 method: str = "fast"):
        super().__init__()
        self.in_channels = _as_int(in_channels, "Conv2D in_channels", 1)
        self.out_channels = _as_int(out_channels, "Conv2D out_channels", 1)
        self.kernel_size = _as_int(kernel_size, "Conv2D kernel_size", 1)
        self.stride = _as_int(stride, "Conv2D stride", 1)
        self.padding = _as_int(padding, "Conv2D padding", 0)
        if method not in METHODS:
            raise ValueError(f"Conv2D method must be one of {', '.join(METHODS)}, got {method!r}")
        self.use_bias, self.init, self.method = bool(bias), init, method

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
        const = lambda m: self.xp.asarray(m, dtype=dtype, device=backend.device)
        self._BB, self._GG, self._AA = (const(_kron(_BT, _BT)), const(_kron(_G, _G)),
                                        const(_kron(_AT, _AT)))
        return self.output_shape(input_shape)

    def output_shape(self, input_shape):
        ho, wo = swept_shape(self.name or "Conv2D", input_shape, self.kernel_size, self.stride,
                             self.padding, channels=self.in_channels)
        return (self.out_channels, ho, wo)

    def _winograd(self):
        return self.method == "winograd" and self.kernel_size == 3 and self.stride == 1

    def _rows(self):
        """Whether this layer runs the row-split im2col: on stride-1 "same" convolutions,
        for ``"rows"``, and for ``"fast"`` when k·C ≥ O: there its column matrix (k·C rows)
        and row-partial outputs (k·O rows) stream about as much as the full column matrix
        (k²·C rows) or less, in fewer passes and with faster matmul shapes; with few input
        channels (a first layer) the k·O rows of partial outputs dwarf it (docs/cnn.md
        measures both sides)."""
        k, c, o = self.kernel_size, self.in_channels, self.out_channels
        if self.stride != 1 or 2 * self.padding != k - 1 or k == 1:
            return False
        return self.method == "rows" or (self.method == "fast" and k * c >= o)

    # --- passes -------------------------------------------------------------------------
    def forward(self, x, train=False):
        xp = self.xp
        if tuple(x.shape[1:]) != self.in_shape:
            self.check_features(x, self.in_shape)
        s, p = self.stride, self.padding
        self.xshape = tuple(x.shape)
        self.saved = self.fused_bn = None  # (pair, what its backward needs) on pair paths
        if self._library():  # the backend's own convolution (a checked override pair)
            pair = self.pair("conv2d", Im2colPair)
            y, saved = pair.forward(x, self.weight.value, self._bias(), s, p)
        elif not (self._winograd() or self._rows()):
            pair = Im2colPair
            y, saved = im2col_forward(xp, x, self.weight.value, self._bias(), s, p,
                                      padded=self.method == "im2col")
        elif self._winograd():
            return xp.permute_dims(self._winograd_forward(x, train), (1, 0, 2, 3))
        else:
            return xp.permute_dims(self._rows_forward(x, train), (1, 0, 2, 3))
        if self.keeps(train):
            self.saved = (pair, saved)
        return y

    def _bias(self):
        return self.bias.value if self.use_bias else None

    def _library(self):
        """Whether this layer runs the backend's convolution (backends/overrides.py's
        "conv2d" pair, e.g. torch's): for the default method, where the backend offers one."""
        return self.method == "fast" and self.backend is not None and self.backend.offers("conv2d")

    def fuses_with(self, bn, pool, x) -> bool:
        """Whether a training forward of this layer on ``x``, the BatchNorm ``bn`` and the
        MaxPool2D ``pool`` after it may run as one step, ``forward_block``: the backend
        offers the "conv_batchnorm_maxpool" pair; this layer runs its default method at
        stride 1 with few input channels, k·C < O (where it picks im2col, ``"gather"``:
        the case measured faster fused; not a library's convolution); and ``bn`` uses its
        own batch's statistics over more than one value per channel. (docs/cnn.md,
        "Convolution, batch norm and max pool", measured row-split layers fused: slower.)
        ``pool`` may be any max pool: NumPy's pair runs the composition for others."""
        k, c, o = self.kernel_size, self.in_channels, self.out_channels
        _, ho, wo = self.output_shape(self.in_shape)
        return (self.method == "fast" and self.stride == 1 and k * c < o
                and not self._library() and bn.sync is None and x.ndim == 4
                and x.shape[0] * ho * wo > 1 and self.backend.offers("conv_batchnorm_maxpool"))

    def forward_block(self, x, bn, pool):
        """A training forward of this layer, ``bn`` and ``pool`` as one
        "conv_batchnorm_maxpool" pair (the chain calls it where ``fuses_with``): the pooled
        output, ``bn``'s running statistics updated; this layer's ``backward`` then takes
        the POOLED map's gradient, sets ``bn``'s parameter gradients too, and returns the
        gradient of this layer's input (``bn`` and ``pool`` keep nothing)."""
        from .batchnorm import _RanInPair

        if tuple(x.shape[1:]) != self.in_shape:
            self.check_features(x, self.in_shape)
        n = x.shape[0]
        ho, wo = self.output_shape(self.in_shape)[1:]  # (bn's and pool's inputs, as built)
        self.xshape, self.fused_bn = tuple(x.shape), bn
        _, po, qo = pool.output_shape((self.out_channels, ho, wo))
        self.pooled_shape = (n, self.out_channels, po, qo)  # what backward then takes
        bn.xc = None
        bn.saved = pool.saved = (_RanInPair, self.name or "Conv2D")  # their backward: ours
        pair = self.pair("conv_batchnorm_maxpool", ConvBatchNormMaxPoolPair)
        (y, mean, var), saved = pair.forward(
            x, self.weight.value, self._bias(), self.stride, self.padding, bn.weight.value,
            bn.bias.value, bn.eps, pool.kernel_size, pool.stride, pool.padding)
        bn._update_running(mean, var, n * ho * wo)
        self.saved = (pair, saved)
        return y

    def _set_grads(self, dw, db):
        self.weight.grad = dw
        if self.use_bias:
            self.bias.grad = db

    def backward(self, grad, input_grad=True):
        if getattr(self, "saved", None) is None:  # the layer's own methods, or no forward
            if self._winograd():
                return self._winograd_backward(grad, input_grad)
            if self._rows():
                return self._rows_backward(grad, input_grad)
        bn = getattr(self, "fused_bn", None)
        if bn is not None and tuple(grad.shape) != self.pooled_shape:
            raise RuntimeError(
                f"layer {self.name or 'Conv2D'} ran with its batch norm and max pool as one "
                "pair in a training forward of their chain: its backward takes the max pool's "
                f"output gradient, shape {self.pooled_shape}; got shape {tuple(grad.shape)} "
                "(go back through the chain with model.backward, or run the layers one by one)")
        (pair, saved), self.saved = self.take_saved(), None  # frees the column matrix
        self.fused_bn = None
        if bn is not None:  # forward_block ran: the pooled map's gradient, for three layers
            dx, dw, db, bn.weight.grad, bn.bias.grad = pair.backward(saved, grad, input_grad)
            bn.saved = None
        else:
            dx, dw, db = pair.backward(saved, grad, input_grad)
        self._set_grads(dw, db)
        return dx

    # --- row-split im2col (docs/cnn.md derives it) ---------------------------------------
    def _rows_forward(self, x, train):
        """Stride 1, "same" padding, on images flattened to L = H·W. im2col over the kernel's
        columns only: cols_j (k·C, N·L) holds the k copies of x shifted by (0, j − p). One
        matmul with the weight laid out as W_r (k·O, k·C), row i·O + o, column j·C + c holding
        W[o, c, i, j], gives the k row-partial outputs Z_i (O, N·L) (kernel row i only, not yet
        shifted); y[a, b] = Σ_i Z_i[a + i − p, b], the sum of the Z_i shifted by whole rows
        (``unshifted_sum``: a col2im that never wraps). The output is the centre block of Z,
        channel-major."""
        xp = self.xp
        n, c, h, w = x.shape
        k, p, o = self.kernel_size, self.padding, self.out_channels
        xf = xp.reshape(xp.permute_dims(x, (1, 0, 2, 3)), (c, n, h * w))
        cols = xp.reshape(shifted(xp, xf, w, [(0, j - p) for j in range(k)]), (k * c, n * h * w))
        wr = xp.reshape(xp.permute_dims(self.weight.value, (2, 0, 3, 1)), (k * o, k * c))
        z = xp.reshape(wr @ cols, (k, o, n, h * w))
        if self.use_bias:  # into the centre row's block: it is the start of the sum
            z[p, ...] += xp.reshape(self.bias.value, (o, 1, 1))
        y = unshifted_sum(xp, z, w, [(p - i, 0) for i in range(k)])      # (O, N, L)
        if self.keeps(train):
            self.cols, self.w2 = cols, wr
        return xp.reshape(y, (o, n, h, w))

    def _rows_backward(self, grad, input_grad):
        """The transpose of each step: the row-partial gradients dZ_i are g shifted by the row
        shifts (``shifted``, (k·O, N·L)); ∂W_r = dZ @ colsᵀ, dcols = W_rᵀ @ dZ, and col2im over
        the k column shifts (``unshifted_sum``)."""
        xp = self.xp
        if getattr(self, "cols", None) is None:
            raise self.no_forward()
        n, c, h, w = self.xshape
        k, p, o = self.kernel_size, self.padding, self.out_channels
        gf = xp.reshape(xp.permute_dims(grad, (1, 0, 2, 3)), (o, n, h * w))
        if self.use_bias:
            self.bias.grad = xp.sum(xp.reshape(gf, (o, n * h * w)), axis=1)
        dz = xp.reshape(shifted(xp, gf, w, [(p - i, 0) for i in range(k)]), (k * o, n * h * w))
        dwr = dz @ self.cols.T                                            # (k·O, k·C)
        self.weight.grad = xp.permute_dims(xp.reshape(dwr, (k, o, k, c)), (1, 3, 0, 2))
        self.cols = None
        if not input_grad:
            return None
        dcols = xp.reshape(self.w2.T @ dz, (k, c, n, h * w))
        dx = unshifted_sum(xp, dcols, w, [(0, j - p) for j in range(k)])  # (C, N, L)
        return xp.permute_dims(xp.reshape(dx, (c, n, h, w)), (1, 0, 2, 3))

    # --- Winograd F(2×2, 3×3) (docs/cnn.md derives it) ------------------------------------
    def _winograd_forward(self, x, train):
        """Output tiles of 2×2 from input tiles of 4×4 at stride 2: with d a tile, g a
        filter, Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A. Flattening the 4×4 (resp. 2×2, 3×3) tiles,
        Bᵀ·B, G·Gᵀ and Aᵀ·A become the Kronecker products BB (16×16), GG (16×9),
        AA (4×16), so every transform is one small matmul over all tiles at once."""
        xp = self.xp
        n, c, h, w = x.shape
        o, p = self.out_channels, self.padding
        ho, wo = h + 2 * p - 2, w + 2 * p - 2
        th, tw = (ho + 1) // 2, (wo + 1) // 2                 # tiles per column / row
        t = n * th * tw
        d = gather(xp, xp.permute_dims(x, (1, 0, 2, 3)), 4, 2, p, th, tw)  # (16, C, N, th, tw)
        v = xp.reshape(self._BB @ xp.reshape(d, (16, c * t)), (16, c, t))    # Bᵀ d B
        wk = xp.reshape(xp.permute_dims(self.weight.value, (2, 3, 0, 1)), (9, o * c))
        u = xp.reshape(self._GG @ wk, (16, o, c))                            # G g Gᵀ
        m = u @ v                                                            # (16, O, T)
        if self.use_bias:  # AA's column (1, 1) is all ones: a bias there reaches every output
            m[5, ...] += xp.reshape(self.bias.value, (o, 1))
        y = xp.reshape(self._AA @ xp.reshape(m, (16, o * t)), (2, 2, o, n, th, tw))
        y = xp.reshape(xp.permute_dims(y, (2, 3, 4, 0, 5, 1)), (o, n, 2 * th, 2 * tw))
        if self.keeps(train):
            self.v, self.u = v, u
        return y[..., :ho, :wo]

    def _winograd_backward(self, grad, input_grad):
        xp = self.xp
        if getattr(self, "v", None) is None:
            raise self.no_forward()
        n, c, h, w = self.xshape
        o, p = self.out_channels, self.padding
        ho, wo = grad.shape[2], grad.shape[3]
        th, tw = (ho + 1) // 2, (wo + 1) // 2
        t = n * th * tw
        gc = xp.permute_dims(grad, (1, 0, 2, 3))                             # (O, N, Ho, Wo)
        if ho != 2 * th or wo != 2 * tw:  # odd output: the last tile row/column half used
            gz = xp.zeros((o, n, 2 * th, 2 * tw), dtype=grad.dtype, device=grad.device)
            gz[..., :ho, :wo] = gc
            gc = gz
        if self.use_bias:
            self.bias.grad = xp.sum(xp.reshape(gc, (o, n * 4 * th * tw)), axis=1)
        gy = xp.permute_dims(xp.reshape(gc, (o, n, th, 2, tw, 2)), (3, 5, 0, 1, 2, 4))
        dm = xp.reshape(self._AA.T @ xp.reshape(gy, (4, o * t)), (16, o, t))  # (AA)ᵀ g
        du = dm @ xp.permute_dims(self.v, (0, 2, 1))                         # (16, O, C)
        dwk = self._GG.T @ xp.reshape(du, (16, o * c))                       # (9, O·C)
        self.weight.grad = xp.permute_dims(xp.reshape(dwk, (3, 3, o, c)), (2, 3, 0, 1))
        self.v = None
        if not input_grad:
            return None
        dv = xp.permute_dims(self.u, (0, 2, 1)) @ dm                         # (16, C, T)
        dd = xp.reshape(self._BB.T @ xp.reshape(dv, (16, c * t)), (16, c, n, th, tw))
        return xp.permute_dims(scatter(xp, dd, 4, 2, p, h, w), (1, 0, 2, 3))

    # --- description --------------------------------------------------------------------
    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "bias": self.use_bias, "init": self.init, "method": self.method}

    def describe(self):
        return (f"Conv2D({self.in_channels}→{self.out_channels}, k={self.kernel_size}, "
                f"s={self.stride}, p={self.padding})")
