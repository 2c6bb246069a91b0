"""Layers as JSON-able specs ({"type": "Dense", "in_features": 784, ...}), so checkpoints can
rebuild a model on any backend without pickling code."""
from __future__ import annotations

from . import layers as L

LAYER_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (L.Dense, L.ReLU, L.LeakyReLU, L.Sigmoid, L.Tanh, L.Dropout, L.Flatten,
                L.Reshape, L.Softmax)
}


def register(cls):
    """Make a layer class known to checkpoints (use as a decorator on new layers)."""
    LAYER_TYPES[cls.__name__] = cls
    return cls


def layer_to_spec(layer) -> dict:
    spec = {"type": type(layer).__name__, **layer.config()}
    if spec["type"] not in LAYER_TYPES:
        raise ValueError(f"layer type {spec['type']} is not registered with nnx.spec.register")
    return spec


def layer_from_spec(spec: dict):
    spec = dict(spec)
    kind = spec.pop("type")
    try:
        cls = LAYER_TYPES[kind]
    except KeyError:
        raise ValueError(f"unknown layer type {kind!r} in architecture; known: {sorted(LAYER_TYPES)}") from None
    return cls(**spec)
