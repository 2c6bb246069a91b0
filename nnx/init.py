"""Weight initialisers. Each draws from the model's portable random stream (``rng``), so
the same seed gives the same initial weights on every backend.

He (Kaiming) keeps the variance of ReLU activations constant through depth: Var = 2/fan_in.
Xavier/Glorot balances forward and backward signal for tanh/sigmoid: Var = 2/(fan_in+fan_out).
"""
from __future__ import annotations

import math


def he_normal(rng, shape, fan_in, fan_out, dtype):
    return rng.normal(shape, std=math.sqrt(2.0 / fan_in), dtype=dtype)


def he_uniform(rng, shape, fan_in, fan_out, dtype):
    limit = math.sqrt(6.0 / fan_in)
    return rng.uniform(shape, -limit, limit, dtype=dtype)


def xavier_normal(rng, shape, fan_in, fan_out, dtype):
    return rng.normal(shape, std=math.sqrt(2.0 / (fan_in + fan_out)), dtype=dtype)


def xavier_uniform(rng, shape, fan_in, fan_out, dtype):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(shape, -limit, limit, dtype=dtype)


def zeros(rng, shape, fan_in, fan_out, dtype):
    backend = rng.backend
    return backend.xp.zeros(shape, dtype=dtype, device=backend.device)


INITIALIZERS = {
    "he_normal": he_normal, "he_uniform": he_uniform,
    "xavier_normal": xavier_normal, "xavier_uniform": xavier_uniform,
    "glorot_normal": xavier_normal, "glorot_uniform": xavier_uniform,
    "zeros": zeros,
}


def get(name):
    """An initialiser by name (or a callable with the same signature, returned as is)."""
    if callable(name):
        return name
    try:
        return INITIALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown initialiser {name!r}; choose from {sorted(INITIALIZERS)}") from None
