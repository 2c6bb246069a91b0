"""Flat storage: all of a model's parameters in one contiguous array, gradients in another.

Each ``Parameter.value`` becomes a view of its slice of ``FlatStore.value`` and each gradient
a view of its slice of ``FlatStore.grad``, so an optimizer updates every parameter with one
short chain of operations over two arrays (torch's ``foreach``/fused optimizers and apex's
multi-tensor apply do the same), and data-parallel training averages one gradient array.

The Array API standard leaves views to the library, so ``supports_views`` probes the
namespace once; where writes through a reshaped slice do not reach the base array, models
keep one array per parameter and the optimizers loop over them — same arithmetic, same
results.

A backend may ask for 2-D parameters (Dense's (out, in) weights) to be laid out column-major
inside the flat arrays (``Backend.column_major_matrices``): each is then the transposed view
of an (in, out) row-major slice, the same shape and values. NumPy does, because OpenBLAS
multiplies x·Wᵀ faster when Wᵀ is row-major (docs/benchmarks.md, "The NumPy MLP epoch").
"""
from __future__ import annotations

import math

_VIEWS: dict = {}  # (namespace, device) -> bool


def supports_views(xp, device) -> bool:
    """Whether a reshaped slice of an array writes through to it, in place and by ``[...] =``
    (probed once per namespace and device with a 4-element array; one host read)."""
    key = (xp.__name__ if hasattr(xp, "__name__") else id(xp), str(device))
    if key not in _VIEWS:
        try:
            base = xp.zeros((4,), dtype=xp.float32, device=device)
            view = xp.reshape(base[1:3], (2, 1))
            view[...] = xp.ones((2, 1), dtype=xp.float32, device=device)
            view += 1.0
            _VIEWS[key] = [float(v) for v in (base[0], base[1], base[2], base[3])] == [0, 2, 2, 0]
        except Exception:  # a library without in-place operations (e.g. JAX)
            _VIEWS[key] = False
    return _VIEWS[key]


class FlatStore:
    """One value array and one gradient array for ``params`` (all of one dtype), and the
    offsets of each parameter inside them. Creating it moves the parameters in."""

    def __init__(self, params, xp, device, column_major_matrices: bool = False):
        params = list(params)
        dtypes = {p.value.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"flat storage needs one dtype, got {sorted(map(str, dtypes))}")
        self.params, self.xp = params, xp
        self.column_major = bool(column_major_matrices)
        self.sizes = [math.prod(p.shape) for p in params]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(params))]
        self.size = sum(self.sizes)
        dtype = params[0].value.dtype
        self.value = xp.zeros((self.size,), dtype=dtype, device=device)
        self.grad = xp.zeros((self.size,), dtype=dtype, device=device)
        for p, view, gview in zip(params, self.views(self.value), self.views(self.grad)):
            view[...] = p.value
            p.attach(view, gview, self)

    def views(self, flat) -> list:
        """Per-parameter views (shaped like the parameters) of a flat array of this layout
        (the value, the gradient, or an optimizer slot)."""
        xp = self.xp
        return [xp.permute_dims(xp.reshape(flat[o:o + n], p.shape[::-1]), (1, 0))
                if self.column_major and len(p.shape) == 2 else xp.reshape(flat[o:o + n], p.shape)
                for p, o, n in zip(self.params, self.offsets, self.sizes)]

    def __repr__(self):
        layout = ", matrices column-major" if self.column_major else ""
        return f"FlatStore({len(self.params)} parameters, {self.size:,} values{layout})"
