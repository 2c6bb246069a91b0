"""Layers as JSON-able specs ({"type": "Dense", "in_features": 784, ...}), so checkpoints can
rebuild a model on any backend without pickling code. Every ``Layer`` subclass is known by
its class name (``nnx.layers.base.LAYER_TYPES``); ``config()`` gives its arguments, and a
composite layer's ``layers`` argument holds its children's specs."""
from __future__ import annotations

from .layers.base import LAYER_TYPES


def layer_to_spec(layer) -> dict:
    return {"type": type(layer).__name__, **layer.config()}


def layer_from_spec(spec: dict):
    """The layer a spec describes; a spec that is not a dict, names an unknown type or
    passes arguments the layer does not take is a ValueError saying so."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"a layer spec must be a dict with a 'type', got {spec!r}")
    spec = dict(spec)
    kind = spec.pop("type")
    try:
        if not isinstance(kind, str) or kind.startswith("_") or kind == "Sequential":
            raise KeyError(kind)  # internal base classes and whole models are not layers here
        cls = LAYER_TYPES[kind]
    except (KeyError, TypeError):
        known = sorted(k for k in LAYER_TYPES if not k.startswith("_") and k != "Sequential")
        raise ValueError(f"unknown layer type {kind!r} in architecture; known: {known}") from None
    if isinstance(spec.get("layers"), list):  # composite (Residual): children first
        spec["layers"] = [layer_from_spec(s) if isinstance(s, dict) else s for s in spec["layers"]]
    import inspect

    try:
        inspect.signature(cls).bind(**spec)
    except TypeError as e:
        accepted = list(inspect.signature(cls).parameters)
        raise ValueError(f"{kind} does not take the arguments {sorted(spec)} ({e}); it takes "
                         f"{accepted or 'no arguments'}") from None
    return cls(**spec)
