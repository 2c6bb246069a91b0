"""CuPy's fused kernels: the "cupy" backend's overrides of named operations.

Each replaces a chain of eager CuPy calls (~10-25 µs of host time each) by one kernel and
returns what the standard Array-API path returns (backends/overrides.py checks that the
first time each runs on a device, and tests/test_gpu.py in float32 and float64). Kernels are
built on first use and cached (CuPy also caches the compiled binaries per device and dtype,
and on disk under ~/.cupy/kernel_cache). ``--fmad=false`` keeps a·b + c as two roundings,
as the standard path computes it, so results agree to the last bit except in exp/log/sqrt.

This module imports without CuPy: registering needs no GPU, and nothing is compiled until
a kernel first runs.
"""
from __future__ import annotations

import functools

from .overrides import register

_OPTIONS = ("--fmad=false",)


@functools.cache
def _kernels():
    import cupy

    k = {}
    k["relu_forward"] = cupy.ElementwiseKernel(
        "T x", "T y",
        # max(0, x) with NaN passed through, as xp.maximum does
        "y = (x > (T)0 || x != x) ? x : (T)0;",
        "nnx_relu_forward", options=_OPTIONS)
    k["relu_backward"] = cupy.ElementwiseKernel(  # grad · [y > 0], y the forward's output
        "T g, T y", "T dx", "dx = g * (y > (T)0 ? (T)1 : (T)0);", "nnx_relu_backward",
        options=_OPTIONS)
    # Nesterov (torch's convention): d = g + λp; v ← μv + d; p ← p − lr·(d + μv)
    k["nesterov"] = cupy.ElementwiseKernel(
        "T g, T lr, T mu, T wd", "T p, T v",
        """T d = wd != (T)0 ? p * wd + g : g;
           v = v * mu + d;
           p = p - (v * mu + d) * lr;""",
        "nnx_nesterov_update", options=_OPTIONS)
    # Adam / AdamW: mode 0 no decay, 1 L2 (g + λp), 2 decoupled (p·(1 − lr·λ) first)
    k["adam"] = cupy.ElementwiseKernel(
        "T g, T step_size, T inv_sqrt_c2, T decay, T b1, T omb1, T b2, T omb2, T eps, T wd, "
        "int32 mode",
        "T p, T m, T v",
        """T gg = g;
           if (mode == 1) { gg = p * wd + g; }
           else if (mode == 2) { p = p * decay; }
           m = m * b1 + gg * omb1;
           v = v * b2 + (gg * gg) * omb2;
           T denom = sqrt(v) * inv_sqrt_c2 + eps;
           p = p - (m / denom) * step_size;""",
        "nnx_adam_update", options=_OPTIONS)
    return k


_XENT_SOURCE = r"""
// One block for the whole batch: each thread takes rows i = tid, tid + blockDim.x, ...
// (a row is a handful of classes), writes that row's gradient (softmax − target)/n, and
// adds its Σ log p(target) and correct count; a shared-memory tree sums the threads in a
// fixed order (deterministic, no atomics). out[0] = Σ log p·t, out[1] = correct.
extern "C" __global__ void nnx_softmax_xent(const T* z, const T* t, T* grad, T* out,
                                            const int n, const int c, const T inv_n) {
    __shared__ T s_picked[256];
    __shared__ T s_correct[256];
    T picked = 0, correct = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const T* zr = z + (long long)i * c;
        const T* tr = t + (long long)i * c;
        T* gr = grad + (long long)i * c;
        T mx = zr[0];
        for (int j = 1; j < c; ++j) {
            T v = zr[j];
            if (mx == mx && (v > mx || v != v)) mx = v;   // max, NaN propagating
        }
        T s = 0;
        for (int j = 0; j < c; ++j) s += exp(zr[j] - mx);
        const T lse = log(s);
        for (int j = 0; j < c; ++j) {
            const T sh = zr[j] - mx;
            const T lp = sh - lse;
            picked += lp * tr[j];
            if (sh == (T)0) correct += tr[j];
            gr[j] = (exp(lp) - tr[j]) * inv_n;
        }
    }
    s_picked[threadIdx.x] = picked;
    s_correct[threadIdx.x] = correct;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            s_picked[threadIdx.x] += s_picked[threadIdx.x + half];
            s_correct[threadIdx.x] += s_correct[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) { out[0] = s_picked[0]; out[1] = s_correct[0]; }
}
"""
_XENT_THREADS = 256  # a power of two, the size of the shared arrays above


@functools.cache
def _xent_kernel(ctype: str):
    import cupy

    return cupy.RawKernel(f"typedef {ctype} T;\n" + _XENT_SOURCE, "nnx_softmax_xent",
                          options=_OPTIONS)


def _ctype(dtype) -> str:
    import numpy as np

    if dtype == np.float32:
        return "float"
    if dtype == np.float64:
        return "double"
    raise TypeError(f"fused kernels take float32 or float64, not {dtype}")


# --- the overrides (same arguments and results as the references they replace) ----------
@register("cupy", "relu_forward")
def relu_forward(x):
    return _kernels()["relu_forward"](x)


@register("cupy", "relu_backward")
def relu_backward(grad, y):
    return _kernels()["relu_backward"](grad, y)


@register("cupy", "softmax_xent")
def softmax_xent(loss, logits, target):
    import cupy
    import numpy as np

    n, c = logits.shape
    _ctype(logits.dtype)
    if c == 0:  # the kernel reads each row's first logit; the standard path raises too
        raise ValueError("softmax_xent: logits have no classes")
    z = cupy.ascontiguousarray(logits)
    t = cupy.ascontiguousarray(target, dtype=logits.dtype)
    grad = cupy.empty_like(z)
    out = cupy.empty((2,), dtype=z.dtype)
    _xent_kernel(_ctype(z.dtype))((1,), (_XENT_THREADS,),
                                  (z, t, grad, out, np.int32(n), np.int32(c),
                                   z.dtype.type(1.0 / max(n, 1))))
    return out[0], out[1], grad


@register("cupy", "nesterov_update")
def nesterov_update(opt, p, g, slots, hyper):
    (v,) = slots
    _kernels()["nesterov"](g, hyper[0], opt.momentum, opt.weight_decay, p, v)


@register("cupy", "adam_update")
def adam_update(opt, p, g, slots, hyper):
    import numpy as np

    m, v = slots
    mode = 0 if not opt.weight_decay else (2 if opt.decoupled else 1)
    decay = hyper[3] if mode == 2 else 1.0
    _kernels()["adam"](g, hyper[1], hyper[2], decay, opt.beta1, 1.0 - opt.beta1,
                       opt.beta2, 1.0 - opt.beta2, opt.eps, opt.weight_decay,
                       np.int32(mode), p, m, v)


from . import cupy_pairs  # noqa: E402,F401  (registers the "conv2d", "batchnorm", "maxpool" pairs)
