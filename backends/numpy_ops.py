"""NumPy's overrides of named operations (backends/overrides.py).

The standard path reaches NumPy through array-api-compat's wrappers, one call per primitive
the standard has. These call NumPy directly and use what it offers beyond the standard; they
do the same element-wise arithmetic in the same order, so they give the standard path's
values (training ends with the same weights bit for bit; ``tests/test_numpy_ops.py``):

- ``relu_forward``: ``maximum`` against a cached zeros array of the input's shape and
  layout for small inputs (NumPy broadcasts a scalar 0 through a slower loop: 3.7 against
  2.5 µs at 128×128), against the scalar for large ones (a second 12.8 MB operand costs
  more than the broadcast: 0.97 against 1.41 ms for a conv output of 128×32×28×28).
- ``relu_backward``: grad·[y > 0] with the mask made in the gradient's dtype and the
  product taken in place in it (one array allocated; no bool-to-float cast inside the
  multiply's loop): 4.8 against 7.2 µs at 128×128.
- ``softmax_xent``: the row maximum from a transposed copy of the logits reduced over its
  first axis (NumPy's reduction along a short contiguous row, 10 classes, is a scalar loop
  per row: 1.9 against 9 µs at 128×10); the rest the standard path's operations: 16 against
  30 µs per call.

They are written with as little Python as possible (operators, positional arguments, no
helper calls): in a training step they run right after large matmuls and gathers, which
leave the interpreter's data out of cache, and there a dictionary key of three attributes
alone costs ~2.5 µs (``python -m benchmarks.mlp_step_parts`` times each part in place).

Not replaced: ``nesterov_update`` and ``adam_update``. Their chains (8 and 13–15 passes) are
already the fewest exact NumPy passes, and running them block by block over the flat
buffers with reused scratch (so that each block's passes stay in L2) measured no faster in
a training step (docs/benchmarks.md, "The NumPy MLP epoch").

Times: one thread, ``timeit`` on the 2-core Xeon (AVX-512) of that section.

Forward/backward pairs (layers run them instead of the standard pairs, checked on first
use; docs/cnn.md, "Where the time goes", measures them in whole training steps). The
one-layer pairs give the standard path's values bit for bit too; the two-layer
``batchnorm_maxpool`` pair gives its forward values bit for bit and its gradients to
rounding (its sums run in another order), the three-layer one all its results to rounding,
so a model with a batch norm before a max pool ends training with weights equal to the
standard path's to rounding, not bit for bit:

- ``maxpool``: 2×2 windows at stride 2 in two stages (``NumpyMaxPool``), the same values
  bit for bit.
- ``batchnorm``: the standard pair's operations, its backward block by block of feature
  rows (``NumpyBatchNorm``), the same values bit for bit.
- ``batchnorm_maxpool`` (two layers): pools first and normalises the pooled quarter
  (``NumpyBatchNormMaxPool``), the same forward values bit for bit, gradients to rounding.
- ``conv_batchnorm_maxpool`` (three layers): an im2col convolution whose column matrix is
  ordered window by window, so that the batch norm and the pool after it run on contiguous
  blocks (``NumpyConvBatchNormMaxPool``); every result to rounding.

Not replaced: ``conv2d``. Conv2D's own ``"rows"`` method run over chunks of images (the
row-partial outputs summed while in cache) was 3.5-5% faster per cnn training step with
PyTorch in the same process and 1-2% slower without it: the result depends on how glibc's
allocator returns and re-faults memory (docs/cnn.md, "Where the time goes").
"""
from __future__ import annotations

import numpy as np

from .overrides import register

#: inputs up to this many bytes are compared with a cached zeros array (larger: scalar 0)
ZEROS_MAX_BYTES = 256 * 1024
_ZEROS: dict = {}  # shape -> read-only zeros of that shape (and the layout last seen)


@register("numpy", "relu_forward")
def relu_forward(x):
    # (as little Python as possible: it runs right after a large matmul, when every
    # attribute look-up is a cache miss)
    zeros = _ZEROS.get(x.shape)
    if zeros is None or zeros.strides != x.strides or zeros.dtype != x.dtype:
        if x.nbytes > ZEROS_MAX_BYTES:
            return np.maximum(x, 0.0)  # NaN passes, −inf → 0, as the standard path's max
        if len(_ZEROS) >= 64:  # many shapes seen (at most 16 MiB kept): start over
            _ZEROS.clear()
        zeros = _ZEROS[x.shape] = np.zeros_like(x)  # same layout as x: a contiguous loop
        zeros.flags.writeable = False  # shared by every caller
    return np.maximum(x, zeros)


@register("numpy", "relu_backward")
def relu_backward(grad, y):
    # the standard path's grad * astype(y > 0, grad.dtype): the same products (NaN·0 = NaN)
    mask = (y > 0).astype(grad.dtype)
    mask *= grad
    return mask


_max, _sum, _exp, _log, _contiguous = (np.maximum.reduce, np.add.reduce, np.exp, np.log,
                                       np.ascontiguousarray)


@register("numpy", "softmax_xent")
def softmax_xent(loss, logits, target):
    # SoftmaxCrossEntropy._softmax_xent (and backward) operation for operation; the row
    # maximum (the same values in any order) reduced over the first axis of a transposed
    # copy when rows are short
    shape = logits.shape
    if len(shape) != 2 or 0 in shape:
        return type(loss)._softmax_xent(loss, logits, target)
    n, c = shape
    if c <= 64:
        top = _max(_contiguous(logits.T), 0).reshape(n, 1)
    else:
        top = _max(logits, 1, None, None, True)
    # (operators where NumPy has them: fewer look-ups than np.subtract & co.)
    shifted = logits - top
    s = _sum(_exp(shifted), 1, None, None, True)
    _log(s, s)
    logp = shifted - s
    probs = _exp(logp)
    loss.probs, loss.target, loss.n, loss._grad = probs, target, n, None
    correct = _sum((shifted == 0.0).astype(logits.dtype) * target, None)  # = xp.sum(...)
    picked = _sum(logp * target, None)
    grad = probs - target
    grad *= 1.0 / n  # (n > 0 here: empty batches take the standard path)
    return picked, correct, grad


# --- forward/backward pairs (overrides.CheckedPair) --------------------------------------
_as_strided = np.lib.stride_tricks.as_strided


def _pairs(a, ho, wo):
    """The top-left (2·ho, 2·wo) part of ``a`` (N, C, H, W) as its 2×2 windows, a VIEW
    (N, C, ho, 2, wo, 2): [n, c, i, r, j, q] = a[n, c, 2i + r, 2j + q]. (as_strided, not
    reshape: writes through it must reach ``a``, whatever its layout.)"""
    sn, sc, sh, sw = a.strides
    return _as_strided(a, (a.shape[0], a.shape[1], ho, 2, wo, 2),
                       (sn, sc, 2 * sh, sh, 2 * sw, sw))


def _to_rows(grad, top, left):
    """The max pool's backward, stage 1: each output gradient (N, C, Ho, Wo) sent to the row
    of its window holding the first maximum, (N, C, Ho, 2, Wo) in ``left``'s layout: g·[top]
    to the top row, g − g·[top] (exactly 0 or g) to the bottom one."""
    rows = np.empty_like(left, dtype=grad.dtype)
    upper = rows[:, :, :, 0]
    np.multiply(grad, top, out=upper)
    np.subtract(grad, upper, out=rows[:, :, :, 1])
    return rows


@register("numpy", "maxpool")
class NumpyMaxPool:
    """The "maxpool" pair for 2×2 windows at stride 2 without padding (the CNN presets'
    pool); other kernels, strides and paddings run the standard pair (``MaxPoolPair``).

    Forward in two stages instead of three ``maximum`` calls over four strided window
    slices: ``cols``, the max of each input row's column pair (N, C, Ho, 2, Wo: one call
    whose strided operands NumPy runs as one long loop), then the max of each pair of those
    rows. In training it also takes the two comparisons its backward routes by, while the
    data they read is still in the cache: ``top`` (per output: the top row's max ≥ the
    bottom row's) and ``left`` (per input row: its left element ≥ its right one), bools, so
    ``cols`` itself is not kept. Backward routes each output gradient back through the
    stages, one 0/1 mask multiply and one subtraction each: to the top row unless the
    bottom row's max is larger (the other row gets g − g·[top]: exactly 0 or g), then within
    that row to the left column unless the right one is larger. The first row holding the
    window's max, then the first column of that row holding it: the window's FIRST maximum
    in row-major order, as on the standard path (and the same products, so the same values
    bit for bit, ±inf and NaN gradients included). A window holding NaN has a NaN max; the
    standard path sends its gradient to the window's last element (torch: to the NaN),
    which the comparisons would not, so when the output holds a NaN the standard pair's code
    runs that step's backward. Odd sizes drop the last row or column, as the standard path
    does (there dx is zeroed). ``dx`` and the output keep the input's memory layout (a
    Conv2D's channel-major maps).
    """

    @staticmethod
    def forward(x, k, s, p, keep=True):
        from nnx.layers.pool import MaxPoolPair

        n, c, h, w = x.shape
        if k != 2 or s != 2 or p != 0 or h < 2 or w < 2 or n * c == 0:  # (n = 0: a process's
            out, saved = MaxPoolPair.forward(x, k, s, p, keep)         # empty share of a batch)
            return out, (None, saved)
        if not keep:  # inference: no backward follows
            x6 = _pairs(x, h // 2, w // 2)
            cols = np.maximum(x6[..., 0], x6[..., 1])         # (N, C, Ho, 2, Wo), x's layout
            return np.maximum(cols[:, :, :, 0], cols[:, :, :, 1]), None
        out, top, left = NumpyMaxPool.stages(x)
        peak = _max(out.ravel("K"))  # (a view: out is a fresh dense array)
        if peak != peak:  # a NaN window: the standard pair's backward for this step
            return out, (None, MaxPoolPair.forward(x, k, s, p, True)[1])
        return out, (x, out, top, left)

    @staticmethod
    def stages(x):
        """The training forward's two stages on (N, C, H, W) ``x`` (H, W ≥ 2): the pooled
        map (N, C, Ho, Wo) and the two comparisons its backward routes by, ``top`` (N, C,
        Ho, Wo) and ``left`` (N, C, Ho, 2, Wo), all in x's layout."""
        x6 = _pairs(x, x.shape[2] // 2, x.shape[3] // 2)
        xl, xr = x6[..., 0], x6[..., 1]
        cols = np.maximum(xl, xr)                             # (N, C, Ho, 2, Wo), x's layout
        top, bottom = cols[:, :, :, 0], cols[:, :, :, 1]
        return np.maximum(top, bottom), top >= bottom, xl >= xr

    @staticmethod
    def backward(saved, grad, input_grad=True):
        x, out, *flags = saved
        if x is None:  # a case the standard pair ran
            from nnx.layers.pool import MaxPoolPair

            return MaxPoolPair.backward(out, grad, input_grad)
        top, left = flags
        h, w, ho, wo = x.shape[2], x.shape[3], out.shape[2], out.shape[3]
        if grad.strides != out.strides:  # (a Flatten's NCHW gradient): out's layout first, so
            g = np.empty_like(out)       # that the passes below do not mix layouts
            g[...] = grad
            grad = g
        rows = _to_rows(grad, top, left)                      # stage 1
        # stage 2: each row's share to its column holding the row's first maximum
        dx = (np.empty_like if 2 * ho == h and 2 * wo == w else np.zeros_like)(x)
        d6 = _pairs(dx, ho, wo)
        np.multiply(rows, left, out=d6[..., 0])
        np.subtract(rows, d6[..., 0], out=d6[..., 1])
        return dx


#: the batch-norm pair's backward works through the (F, m) rows in blocks of about this many
#: bytes per array, so that each block's passes after the first read run from the L2 cache
BN_BLOCK_BYTES = 512 * 1024


@register("numpy", "batchnorm")
class NumpyBatchNorm:
    """The "batchnorm" pair (training with the batch's statistics): the standard pair's
    operations (``BatchNormPair``), with its backward run feature block by feature block.

    Backward reads g and x − μ once from memory per block of rows of the (F, m) view (about
    ``BN_BLOCK_BYTES`` each), and runs that block's Σg, Σg·(x − μ) and the four passes of dx
    (x − μ scaled, − g, + a constant, scaled) while it sits in the L2 cache, instead of each
    pass streaming the whole array. Each row's sums are the same calls on the same row, and
    every element gets the same operations, so the results are the standard pair's bit for
    bit. (The forward blocked the same way measured no faster in whole training steps, so it
    is the standard pair's code.)"""

    @staticmethod
    def forward(x, weight, bias, eps):
        from nnx.layers.batchnorm import rows, unrows

        x2 = rows(np, x)                                       # (F, m)
        m = x2.shape[1]
        mean = _sum(x2, 1) / m
        xc = x2 - mean[:, None]
        var = np.vecdot(xc, xc) / m                            # biased: / m
        inv_std = 1.0 / np.sqrt(var + eps)                     # (F,)
        y = xc * (weight * inv_std)[:, None]
        y += bias[:, None]
        return (unrows(np, y, x.shape), mean, var), (xc, inv_std, weight, tuple(x.shape))

    @staticmethod
    def backward(saved, grad, input_grad=True):
        from nnx.layers.batchnorm import rows, unrows

        xc, inv_std, weight, shape = saved
        g = rows(np, grad)                                     # (F, m)
        f, m = xc.shape
        dbeta, dgamma = np.empty_like(inv_std), np.empty_like(inv_std)
        dx = np.empty_like(xc) if input_grad else None
        step = _rows_per_block(m, xc.itemsize)
        for a in range(0, f, step):
            b = min(f, a + step)
            gb, c, inv = g[a:b], xc[a:b], inv_std[a:b]
            db, dg = dbeta[a:b], dgamma[a:b]
            db[...] = _sum(gb, 1)
            dg[...] = np.vecdot(gb, c)
            dg *= inv                                          # Σ g·x̂
            if input_grad:  # batchnorm._dx: t = xc·k₁ − g + k₂; t *= −γ/σ
                t = dx[a:b]
                np.multiply(c, (dg * inv / m)[:, None], out=t)
                t -= gb
                t += (db / m)[:, None]
                t *= -(weight[a:b] * inv)[:, None]
        return (None if dx is None else unrows(np, dx, shape)), dgamma, dbeta



@register("numpy", "batchnorm_maxpool")
class NumpyBatchNormMaxPool:
    """The "batchnorm_maxpool" pair: a training BatchNorm and the 2×2, stride-2 max pool
    after it (``BatchNormMaxPoolPair`` composes the two), computed by POOLING FIRST.

    Per channel the normalisation is y = (x − μ)·s + β with s = γ/σ. Write it as
    y = c·|s| + β with c = sign(s)·(x − μ): an increasing map of c, and each of its roundings
    is monotone (and fl((x − μ)·s) = fl(c·|s|) exactly, negation being exact), so the max
    over a window of y is the map of the window's max of c, bit for bit. The statistics take
    their passes over x, c is x − μ with the rows of channels whose γ < 0 negated, the pool
    runs on c, and the map on the pooled quarter only. Backward: with g the pooled map's
    gradient, Σg and Σg·x̂ (dβ, dγ) are the same sums over the pooled positions (every other
    position's gradient is 0), and

        dx = unpool(g·s) − s·((x − μ)·dγ/(m·σ) + dβ/m)

    — a per-channel affine map of c everywhere, plus each window's gradient added at the
    window's first maximum of c (``NumpyMaxPool``'s two stages, with ``+=``). So the
    full-size passes are the statistics (Σx, x − μ, Σ(x − μ)²), the pool, and dx, instead of
    the composition's normalisation, pool, pool backward and four-pass normalisation backward.

    What differs from the composition: rounding in dx, dγ and dβ (sums in another order);
    and where two values of one window differ in c but round to the same y, the gradient
    goes to the first maximum of c instead of the first of y (either is a gradient of max).
    Where some s is 0 or not finite (γ = 0, a NaN or ±inf in x), and for a pool other than
    2×2/stride 2/no padding, the step runs the composition of NumPy's two pairs (the same
    values as the standard path). (A chain never hands it an empty map or one with a single
    value per channel: ``BatchNorm.fuses_with``.)"""

    @staticmethod
    def forward(x, weight, bias, eps, k, s, p):
        from nnx.layers.batchnorm import rows, unrows

        n, c, h, w = x.shape
        if k != 2 or s != 2 or p != 0 or h < 2 or w < 2 or n * c == 0:
            return NumpyBatchNormMaxPool._composed(x, weight, bias, eps, k, s, p)
        x2 = rows(np, x)                                       # (C, m), a view if channel-major
        m = x2.shape[1]
        mean = _sum(x2, 1) / m
        xc = x2 - mean[:, None]
        var = np.vecdot(xc, xc) / m                            # biased: / m
        inv_std = 1.0 / np.sqrt(var + eps)
        scale = weight * inv_std                               # s = γ/σ
        if not np.all(np.isfinite(scale) & (scale != 0)):
            return NumpyBatchNormMaxPool._composed(x, weight, bias, eps, k, s, p)
        # (var above from xc in x's layout, as the standard pair sums it; then contiguous
        # rows, a copy only for an input that was not channel-major: the in-place passes
        # below and in backward run on them. Not np.negative(out=): NumPy 2.4.6 writes
        # wrong elements when its input and output are views strided by 4 float32 values.)
        xc = np.ascontiguousarray(xc)
        for i in np.flatnonzero(scale < 0):  # c = sign(s)·(x − μ): a decreasing map's max
            xc[i] *= -1                      # is at the minimum of x − μ (exact)
        c4 = xc.reshape(c, n, h, w).transpose(1, 0, 2, 3)      # (N, C, H, W), channel-major
        pooled, top, left = NumpyMaxPool.stages(c4)  # (c is finite: s is)
        pc = rows(np, pooled)                                  # pooled c: (C, m/4), a view
        y = pc * np.abs(scale)[:, None]                        # = the standard pair's xc·s
        y += bias[:, None]
        return ((unrows(np, y, pooled.shape), mean, var),
                (xc, pc, inv_std, scale, top, left, tuple(x.shape)))

    @staticmethod
    def _composed(x, weight, bias, eps, k, s, p):
        (y, mean, var), bn = NumpyBatchNorm.forward(x, weight, bias, eps)
        out, pool = NumpyMaxPool.forward(y, k, s, p, True)
        return (out, mean, var), (None, bn, pool)

    @staticmethod
    def backward(saved, grad, input_grad=True):
        from nnx.layers.batchnorm import rows

        if saved[0] is None:  # the composition ran
            _, bn, pool = saved
            return NumpyBatchNorm.backward(bn, NumpyMaxPool.backward(pool, grad), input_grad)
        xc, pc, inv_std, scale, top, left, shape = saved
        g = rows(np, grad)                                     # (C, m/4)
        dbeta = _sum(g, 1)
        # Σ g·x̂, x̂ = sign(s)·pc/σ at each window's maximum (±: negation is exact)
        dgamma = np.vecdot(g, pc) * np.copysign(inv_std, scale)
        if not input_grad:
            return None, dgamma, dbeta
        n, c, h, w = shape
        m = xc.shape[1]
        # dx = s·unpool(g) + c·a + b, written channel-major (the layout of a conv's output)
        dx_rows = np.empty_like(xc)                            # (C, m)
        np.multiply(xc, (-np.abs(scale) * dgamma * inv_std / m)[:, None], out=dx_rows)
        dx_rows += (-scale * dbeta / m)[:, None]
        dx = dx_rows.reshape(c, n, h, w).transpose(1, 0, 2, 3)
        gs = (g * scale[:, None]).reshape(c, n, h // 2, w // 2).transpose(1, 0, 2, 3)
        # NumpyMaxPool's backward, adding: the window's row holding its first maximum, ...
        rows2 = _to_rows(gs, top, left)
        # ... then that row's column holding it
        d6 = _pairs(dx, h // 2, w // 2)
        share = rows2 * left
        d6[..., 0] += share
        rows2 -= share
        d6[..., 1] += rows2
        return dx, dgamma, dbeta


def _rows_per_block(m, itemsize):
    """Feature rows of m values per block of about ``BN_BLOCK_BYTES`` (at least one)."""
    return max(1, BN_BLOCK_BYTES // max(1, m * itemsize))


def _blocks(f, m, itemsize):
    """(first, end) row of each block of the (f, m) rows, ``_rows_per_block`` rows each."""
    step = _rows_per_block(m, itemsize)
    return [(a, min(f, a + step)) for a in range(0, f, step)]


def _phase_images(xc, p):
    """The zero-padded channel-major input (C, N, H + 2p, W + 2p) split into its four
    phases: ``[a][b]`` holds the padded rows ≡ a and columns ≡ b (mod 2), contiguous."""
    c, n, h, w = xc.shape
    xpad = np.zeros((c, n, h + 2 * p, w + 2 * p), dtype=xc.dtype)
    xpad[:, :, p:p + h, p:p + w] = xc
    return [[np.ascontiguousarray(xpad[:, :, a::2, b::2]) for b in (0, 1)] for a in (0, 1)]


def _window_offsets(k):
    """(i, j, q, padded row offset, padded column offset) of every column-matrix block:
    kernel offset (i, j) at window position q = 2·r + c (window row r, column c) reads the
    padded input at (2t + r + i, 2u + c + j) for output window (t, u)."""
    return [(i, j, 2 * r + c, r + i, c + j) for i in range(k) for j in range(k)
            for r in (0, 1) for c in (0, 1)]


@register("numpy", "conv_batchnorm_maxpool")
class NumpyConvBatchNormMaxPool:
    """The "conv_batchnorm_maxpool" pair: a stride-1 im2col Conv2D, the training BatchNorm
    after it and a 2×2, stride-2 max pool, with the convolution's output laid out WINDOW BY
    WINDOW: its columns ordered (position in the window, image, window row, window column)
    instead of (image, row, column). A column order is free to choose — the matmul W₂·cols
    gives each column's output wherever that column sits — so the column matrix is built in
    this order (one strided copy per kernel offset and window position, from the padded
    input's four phases), and then each window's four values lie in four contiguous blocks
    per channel. The batch-norm statistics are sums (any order), and the pool and its
    routing in backward become a few contiguous passes, where on the image layout
    (``NumpyBatchNormMaxPool``) they read every other element. The pooled map comes out in
    the image layout, channel-major.

    Otherwise ``NumpyBatchNormMaxPool``'s method: pool c = sign(s)·(x − μ) first, normalise
    the pooled quarter; the first maximum of each window in row-major order takes its
    gradient (top row unless the bottom row's max is larger, then left unless right is
    larger). What differs from the composition: rounding (the sums run in another order),
    and near-ties as in that pair. Other shapes (an odd-sized convolution output, a pool
    other than 2×2/stride 2/no padding, a convolution stride other than 1) and a scale
    s = γ/σ that is 0 or not finite run the composition of NumPy's pairs."""

    @staticmethod
    def forward(x, w, b, stride, padding, weight, bias, eps, k, s, p):
        n, c, h, wd = x.shape
        o, kc = w.shape[0], w.shape[2]
        ho, wo = h + 2 * padding - kc + 1, wd + 2 * padding - kc + 1
        if (stride != 1 or k != 2 or s != 2 or p != 0 or ho < 2 or wo < 2 or ho % 2
                or wo % 2 or n * c == 0 or not np.all(np.isfinite(weight) & (weight != 0))):
            return NumpyConvBatchNormMaxPool._composed(x, w, b, stride, padding, weight,
                                                       bias, eps, k, s, p)
        t, u = ho // 2, wo // 2
        phases = _phase_images(np.permute_dims(x, (1, 0, 2, 3)), padding)
        cols = np.empty((kc, kc, c, 4, n, t, u), dtype=x.dtype)
        for i, j, q, dr, dc in _window_offsets(kc):
            phase = phases[dr % 2][dc % 2]
            cols[i, j, :, q] = phase[:, :, dr // 2:dr // 2 + t, dc // 2:dc // 2 + u]
        cols = cols.reshape(kc * kc * c, 4 * n * t * u)
        w2 = np.permute_dims(w, (0, 2, 3, 1)).reshape(o, kc * kc * c)
        y = w2 @ cols                                          # (O, 4·M), window by window
        if b is not None:
            y += b[:, None]
        m = y.shape[1]
        mean, var = np.empty(o, dtype=y.dtype), np.empty(o, dtype=y.dtype)
        pooled, top = np.empty((o, m // 4), dtype=y.dtype), np.empty((o, m // 4), dtype=bool)
        left = np.empty((2, o, m // 4), dtype=bool)  # [row]: that row's left element holds it
        lower = np.empty((_rows_per_block(m, y.itemsize), m // 4), dtype=y.dtype)
        for a, z in _blocks(o, m, y.itemsize):  # each block's passes run from the L2 cache
            block = y[a:z]
            mu = _sum(block, 1) / m
            block -= mu[:, None]                               # x − μ, in place
            mean[a:z], var[a:z] = mu, np.vecdot(block, block) / m   # biased: / m
            for i in np.flatnonzero(weight[a:z] < 0):  # c = sign(s)·(x − μ): σ > 0, so
                block[i] *= -1                         # sign(s) = sign(γ)
            c4 = block.reshape(z - a, 4, m // 4)               # [:, q]: window position q
            upper, low = pooled[a:z], lower[:z - a]
            np.maximum(c4[:, 0], c4[:, 1], out=upper)
            np.maximum(c4[:, 2], c4[:, 3], out=low)
            np.greater_equal(upper, low, out=top[a:z])         # the top row holds the max
            np.greater_equal(c4[:, 0], c4[:, 1], out=left[0, a:z])
            np.greater_equal(c4[:, 2], c4[:, 3], out=left[1, a:z])
            np.maximum(upper, low, out=upper)
        inv_std = 1.0 / np.sqrt(var + eps)
        scale = weight * inv_std                               # s = γ/σ
        if not np.all(np.isfinite(scale) & (scale != 0)):  # (x held a NaN or ±inf)
            return NumpyConvBatchNormMaxPool._composed(x, w, b, stride, padding, weight,
                                                       bias, eps, k, s, p)
        out = pooled * np.abs(scale)[:, None]                  # (O, N·T·U): channel-major
        out += bias[:, None]
        out = np.permute_dims(out.reshape(o, n, t, u), (1, 0, 2, 3))
        return (out, mean, var), (cols, w2, y, pooled, inv_std, scale, top, left,
                                  tuple(x.shape), kc, padding, b is not None)

    @staticmethod
    def _composed(x, w, b, stride, padding, weight, bias, eps, k, s, p):
        from nnx.layers.conv import im2col_forward

        y, conv = im2col_forward(np, x, w, b, stride, padding)
        out, bn = NumpyBatchNormMaxPool.forward(y, weight, bias, eps, k, s, p)
        return out, (None, conv, bn)

    @staticmethod
    def backward(saved, grad, input_grad=True):
        from nnx.layers.batchnorm import rows

        if saved[0] is None:  # the composition ran
            from nnx.layers.conv import im2col_backward

            _, conv, bn = saved
            dy, dgamma, dbeta = NumpyBatchNormMaxPool.backward(bn, grad, True)
            return (*im2col_backward(conv, dy, input_grad), dgamma, dbeta)
        cols, w2, c, pooled, inv_std, scale, top, left, shape, kc, padding, has_bias = saved
        g = rows(np, grad)                                     # (O, M), M = N·T·U
        dbeta = _sum(g, 1)
        dgamma = np.vecdot(g, pooled) * np.copysign(inv_std, scale)   # Σ g·x̂ (as above)
        o, m = c.shape
        # dy = c·a + b + s·unpool(g): the affine part, then each window's gradient added
        # at its first maximum, block by block of channels
        times_c, plus = -np.abs(scale) * dgamma * inv_std / m, -scale * dbeta / m
        dy = np.empty_like(c)
        per_block = _rows_per_block(m, c.itemsize)
        gs, share, first = (np.empty((per_block, m // 4), dtype=c.dtype) for _ in range(3))
        for a, z in _blocks(o, m, c.itemsize):
            d = dy[a:z]
            np.multiply(c[a:z], times_c[a:z, None], out=d)
            d += plus[a:z, None]
            d4 = d.reshape(z - a, 4, m // 4)
            gz, upper = gs[:z - a], share[:z - a]
            np.multiply(g[a:z], scale[a:z, None], out=gz)
            np.multiply(gz, top[a:z], out=upper)               # to the top row ...
            gz -= upper                                        # ... or the bottom one
            for row, part in enumerate((upper, gz)):
                to_left = np.multiply(part, left[row, a:z], out=first[:z - a])
                d4[:, 2 * row] += to_left                      # that row's left element
                part -= to_left                                # ... or its right one
                d4[:, 2 * row + 1] += part
        n, ch, h, wd = shape
        db = _sum(dy, 1) if has_bias else None
        dw = np.permute_dims((dy @ cols.T).reshape(o, kc, kc, ch), (0, 3, 1, 2))
        if not input_grad:
            return None, dw, db, dgamma, dbeta
        # col2im: the transpose of the forward's copies, into the padded input's phases
        t, u = (h + 2 * padding - kc + 1) // 2, (wd + 2 * padding - kc + 1) // 2
        dcols = (w2.T @ dy).reshape(kc, kc, ch, 4, n, t, u)
        dpad = np.empty((ch, n, h + 2 * padding, wd + 2 * padding), dtype=dy.dtype)
        dphase = [[np.zeros_like(dpad[:, :, a::2, b::2]) for b in (0, 1)] for a in (0, 1)]
        for i, j, q, dr, dc in _window_offsets(kc):
            phase = dphase[dr % 2][dc % 2]
            phase[:, :, dr // 2:dr // 2 + t, dc // 2:dc // 2 + u] += dcols[i, j, :, q]
        for a in (0, 1):
            for b in (0, 1):
                dpad[:, :, a::2, b::2] = dphase[a][b]
        dx = dpad[:, :, padding:padding + h, padding:padding + wd]
        return np.permute_dims(dx, (1, 0, 2, 3)), dw, db, dgamma, dbeta
