"""CuPy's forward/backward pairs: the "cupy" backend's overrides of ``conv2d``, ``batchnorm``
and ``maxpool`` (backends/overrides.py, "Named forward/backward pairs").

On a GPU the standard passes cost host time, not GPU time: each is one or more kernel
launches at ~10-25 µs of Python and CuPy overhead, and a convolution's im2col is k·k sliced
copies plus a padded buffer. Here each pass is one kernel:

- ``conv2d``: im2col (one kernel writing the (C·k·k, N·Ho·Wo) column matrix), one cuBLAS
  product, and col2im (one kernel; each input element sums the column entries that read it,
  so no atomics and the same result on every run);
- ``maxpool``: one kernel for the maxima and the position of each window's first maximum,
  one for the gradient (each input element sums the outputs that chose it: deterministic,
  overlapping windows included);
- ``batchnorm``: reduction kernels for Σx, Σ(x − μ)², Σg and Σg·(x − μ), and one
  element-wise kernel each for y and dx.

Layouts: a map whose (N, C) planes are laid out channel-major (what a convolution returns)
is read as (C, N, H, W) in place, a row-major one as (N, C, H, W); outputs keep the
input's layout, as the standard path's do. Every pair is checked against the standard pair
on first use (overrides.CheckedPair) and in tests/test_gpu.py. This module imports without
CuPy; nothing is compiled until a kernel first runs.
"""
from __future__ import annotations

import functools

from .overrides import register

_OPTIONS = ("--fmad=false",)  # a·b + c as two roundings, as the standard path computes it


def _planes(x):
    """(array, channel_major): ``x`` (N, C, H, W) as a C-contiguous array whose two leading
    axes are the planes: (C, N, H, W) for a channel-major map (a view), else (N, C, H, W)
    (a view when row-major, a copy otherwise)."""
    import cupy

    t = x.transpose(1, 0, 2, 3)
    if t.flags.c_contiguous and not x.flags.c_contiguous:
        return t, True
    return (x if x.flags.c_contiguous else cupy.ascontiguousarray(x)), False


def _unplanes(a, channel_major):
    """Undo ``_planes`` for a result laid out like its input."""
    return a.transpose(1, 0, 2, 3) if channel_major else a


#: the kernels that index their inputs themselves (``raw``), as (inputs, outputs, body) of
#: ``cupy.ElementwiseKernel``: ``i`` is the output element. tests/test_cupy_pairs.py also
#: compiles these bodies as C++ and runs the pairs on the CPU against the standard pairs
#: (the batch-norm kernels below are plain arithmetic: there NumPy stands in for them).
RAW_KERNELS = {
    # cols[(c·k + a)·k + b, (n·Ho + oh)·Wo + ow] = x[n, c, oh·s − p + a, ow·s − p + b], 0 outside
    "im2col": (
        "raw T x, int64 n, int64 c, int64 h, int64 w, int64 ho, int64 wo, int64 k, int64 s, "
        "int64 p, bool cm",
        "T col",
        """
        const long long L = ho * wo, NL = n * L;
        const long long row = i / NL, q = i % NL;
        const long long b = row % k, a = (row / k) % k, ci = row / (k * k);
        const long long ni = q / L, r = q % L, oh = r / wo, ow = r % wo;
        const long long ih = oh * s - p + a, iw = ow * s - p + b;
        if (ih < 0 || ih >= h || iw < 0 || iw >= w) {
            col = (T)0;
        } else {
            const long long plane = cm ? ci * n + ni : ni * c + ci;
            col = x[(plane * h + ih) * w + iw];
        }
        """),
    # dx[plane, ih, iw] = Σ over the (a, b) that read it of dcols[(c·k + a)·k + b, (n, oh, ow)]
    "col2im": (
        "raw T dcols, int64 n, int64 c, int64 h, int64 w, int64 ho, int64 wo, int64 k, "
        "int64 s, int64 p, bool cm",
        "T dx",
        """
        const long long hw = h * w, plane = i / hw, r = i % hw, ih = r / w, iw = r % w;
        const long long ci = cm ? plane / n : plane % c, ni = cm ? plane % n : plane / c;
        const long long L = ho * wo, NL = n * L;
        T acc = (T)0;
        for (long long a = 0; a < k; ++a) {
            const long long th = ih + p - a;
            if (th < 0 || th % s != 0 || th / s >= ho) continue;
            for (long long b = 0; b < k; ++b) {
                const long long tw = iw + p - b;
                if (tw < 0 || tw % s != 0 || tw / s >= wo) continue;
                acc += dcols[((ci * k + a) * k + b) * NL + ni * L + (th / s) * wo + tw / s];
            }
        }
        dx = acc;
        """),
    # y and the in-plane index of each window's first maximum (a NaN wins, the first one)
    "maxpool": (
        "raw T x, int64 h, int64 w, int64 ho, int64 wo, int64 k, int64 s, int64 p",
        "T y, int32 arg",
        """
        const long long L = ho * wo, plane = i / L, r = i % L, oh = r / wo, ow = r % wo;
        const long long base = plane * h * w;
        T best = (T)0;
        int at = -1;
        for (long long a = 0; a < k; ++a) {
            const long long ih = oh * s - p + a;
            if (ih < 0 || ih >= h) continue;
            for (long long b = 0; b < k; ++b) {
                const long long iw = ow * s - p + b;
                if (iw < 0 || iw >= w) continue;
                const T v = x[base + ih * w + iw];
                if (at < 0 || v > best || (v != v && best == best)) {
                    best = v;
                    at = (int)(ih * w + iw);
                }
            }
        }
        y = best;
        arg = at;
        """),
    # dx[plane, ih, iw] = Σ of g over the windows containing it whose first maximum it is
    "maxpool_backward": (
        "raw T g, raw int32 arg, int64 h, int64 w, int64 ho, int64 wo, int64 k, int64 s, "
        "int64 p",
        "T dx",
        """
        const long long hw = h * w, plane = i / hw, r = i % hw, ih = r / w, iw = r % w;
        const long long L = ho * wo;
        const long long lo_h = ih + p - k + 1, lo_w = iw + p - k + 1;
        const long long oh0 = lo_h <= 0 ? 0 : (lo_h + s - 1) / s;
        const long long ow0 = lo_w <= 0 ? 0 : (lo_w + s - 1) / s;
        const long long oh1 = min(ho - 1, (ih + p) / s), ow1 = min(wo - 1, (iw + p) / s);
        T acc = (T)0;
        for (long long oh = oh0; oh <= oh1; ++oh) {
            for (long long ow = ow0; ow <= ow1; ++ow) {
                const long long o = plane * L + oh * wo + ow;
                if (arg[o] == (int)r) acc += g[o];
            }
        }
        dx = acc;
        """),
}


@functools.cache
def _kernels():
    import cupy

    k = {name: cupy.ElementwiseKernel(ins, outs, body, f"nnx_{name}", options=_OPTIONS)
         for name, (ins, outs, body) in RAW_KERNELS.items()}
    # --- batch norm over (F, m) rows ------------------------------------------------------
    k["sum"] = cupy.ReductionKernel("T x", "T y", "x", "a + b", "y = a", "0", "nnx_rowsum")
    k["dot"] = cupy.ReductionKernel("T x, T z", "T y", "x * z", "a + b", "y = a", "0",
                                    "nnx_rowdot")
    k["center"] = cupy.ElementwiseKernel("T x, T mean", "T xc", "xc = x - mean", "nnx_center",
                                         options=_OPTIONS)
    k["affine"] = cupy.ElementwiseKernel("T xc, T scale, T shift", "T y",
                                         "y = xc * scale; y = y + shift;", "nnx_bn_apply",
                                         options=_OPTIONS)
    # the standard path's t = xc·k₁ − g + k₂; t *= −γ/σ, the same roundings in the same order
    k["bn_dx"] = cupy.ElementwiseKernel(
        "T xc, T g, T k1, T k2, T neg_a", "T dx",
        "T t = xc * k1; t = t - g; t = t + k2; dx = t * neg_a;", "nnx_bn_dx", options=_OPTIONS)
    return k


def _int(*values):
    import numpy as np

    return tuple(np.int64(v) for v in values)


def _bool(flag):
    import numpy as np

    return np.bool_(flag)


# --- the pairs ------------------------------------------------------------------------------
@register("cupy", "conv2d")
class CupyConv2D:
    """im2col in one kernel, one cuBLAS product, col2im in one kernel (module docstring)."""

    @staticmethod
    def forward(x, w, b, stride, padding):
        import cupy

        n, c, h, wd = (int(d) for d in x.shape)
        o, k = int(w.shape[0]), int(w.shape[2])
        ho, wo = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
        xs, cm = _planes(x)
        cols = cupy.empty((c * k * k, n * ho * wo), dtype=x.dtype)
        if cols.size:
            _kernels()["im2col"](xs, *_int(n, c, h, wd, ho, wo, k, stride, padding), _bool(cm), cols)
        else:
            cols[...] = 0
        w2 = w.reshape(o, c * k * k)
        y2 = w2 @ cols                                                   # (O, N·Ho·Wo)
        if b is not None:
            y2 += b[:, None]
        y = y2.reshape(o, n, ho, wo).transpose(1, 0, 2, 3)               # channel-major
        return y, (cols, w, b is not None, (n, c, h, wd), stride, padding, cm)

    @staticmethod
    def backward(saved, grad, input_grad):
        import cupy

        cols, w, has_bias, (n, c, h, wd), s, p, cm = saved
        o, k = int(w.shape[0]), int(w.shape[2])
        ho, wo = int(grad.shape[2]), int(grad.shape[3])
        g2 = cupy.ascontiguousarray(grad.transpose(1, 0, 2, 3)).reshape(o, n * ho * wo)
        dw = (g2 @ cols.T).reshape(w.shape)
        db = g2.sum(axis=1) if has_bias else None
        if not input_grad:
            return None, dw, db
        dcols = w.reshape(o, c * k * k).T @ g2                           # (C·k·k, N·Ho·Wo)
        dxs = cupy.empty((c, n, h, wd) if cm else (n, c, h, wd), dtype=grad.dtype)
        if dxs.size:
            _kernels()["col2im"](dcols, *_int(n, c, h, wd, ho, wo, k, s, p), _bool(cm), dxs)
        return _unplanes(dxs, cm), dw, db


@register("cupy", "maxpool")
class CupyMaxPool:
    """One kernel each way (module docstring). Ties go to the first maximum in row-major
    order, as on the standard path; a window holding NaN routes its gradient to its first
    NaN, as torch does (the standard path: to the window's last element)."""

    @staticmethod
    def forward(x, k, s, p, keep=True):
        import cupy

        n, c, h, w = (int(d) for d in x.shape)
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        xs, cm = _planes(x)
        lead = tuple(xs.shape[:2])
        y = cupy.empty((*lead, ho, wo), dtype=x.dtype)
        arg = cupy.empty((*lead, ho, wo), dtype=cupy.int32)
        if y.size:
            _kernels()["maxpool"](xs, *_int(h, w, ho, wo, k, s, p), y, arg)
        return _unplanes(y, cm), ((arg, (h, w), k, s, p, cm) if keep else None)

    @staticmethod
    def backward(saved, grad, input_grad=True):
        import cupy

        arg, (h, w), k, s, p, cm = saved
        gs = grad.transpose(1, 0, 2, 3) if cm else grad
        gs = cupy.ascontiguousarray(gs)
        dxs = cupy.empty((*arg.shape[:2], h, w), dtype=grad.dtype)
        if dxs.size:
            _kernels()["maxpool_backward"](gs, arg, *_int(h, w, arg.shape[2], arg.shape[3],
                                                          k, s, p), dxs)
        return _unplanes(dxs, cm)


@register("cupy", "batchnorm")
class CupyBatchNorm:
    """The standard pair's arithmetic, each pass one kernel (module docstring)."""

    @staticmethod
    def forward(x, weight, bias, eps):
        from array_api_compat import array_namespace

        from nnx.layers.batchnorm import rows, unrows

        kern, xp = _kernels(), array_namespace(x)
        x2 = rows(xp, x)                                                 # (F, m)
        m = x2.shape[1]
        mean = kern["sum"](x2, axis=1) / m
        xc = kern["center"](x2, mean[:, None])
        var = kern["dot"](xc, xc, axis=1) / m                            # biased: / m
        inv_std = 1.0 / xp.sqrt(var + eps)
        y = kern["affine"](xc, (weight * inv_std)[:, None], bias[:, None])
        return (unrows(xp, y, x.shape), mean, var), (xc, inv_std, weight, tuple(x.shape))

    @staticmethod
    def backward(saved, grad, input_grad):
        from array_api_compat import array_namespace

        from nnx.layers.batchnorm import rows, unrows

        kern, xp = _kernels(), array_namespace(grad)
        xc, inv_std, weight, shape = saved
        g = rows(xp, grad)                                               # (F, m)
        m = xc.shape[1]
        dbeta = kern["sum"](g, axis=1)
        dgamma = kern["dot"](g, xc, axis=1) * inv_std                    # Σ g·x̂
        if not input_grad:
            return None, dgamma, dbeta
        dx = kern["bn_dx"](xc, g, (dgamma * inv_std / m)[:, None], (dbeta / m)[:, None],
                           (-(weight * inv_std))[:, None])
        return unrows(xp, dx, shape), dgamma, dbeta
