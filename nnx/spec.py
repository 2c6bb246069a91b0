"""Layers as JSON-able specs ({"type": "Dense", "in_features": 784, ...}), so checkpoints can
rebuild a model on any backend without pickling code. Every ``Layer`` subclass is known by
its class name (``nnx.layers.base.LAYER_TYPES``); ``config()`` gives its arguments, and a
composite layer's ``layers`` argument holds its children's specs."""
from __future__ import annotations

from .layers.base import LAYER_TYPES


def layer_to_spec(layer) -> dict:
    return {"type": type(layer).__name__, **layer.config()}


def layer_from_spec(spec: dict):
    spec = dict(spec)
    kind = spec.pop("type")
    try:
        cls = LAYER_TYPES[kind]
    except KeyError:
        raise ValueError(f"unknown layer type {kind!r} in architecture; known: {sorted(LAYER_TYPES)}") from None
    if isinstance(spec.get("layers"), list):  # composite (Residual): children first
        spec["layers"] = [layer_from_spec(s) if isinstance(s, dict) else s for s in spec["layers"]]
    return cls(**spec)
