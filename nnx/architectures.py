"""Networks from a short text spec, for the CLI's --arch and the --model presets.

A spec is a comma-separated list of layers; sizes that follow from the previous layer
(input features, channels) are inferred::

    conv:32,bn,relu,maxpool:2,conv:64,bn,relu,maxpool:2,flatten,dense:128,relu,dropout:0.3,dense:10

Tokens: ``dense:OUT``, ``conv:OUT[:K[:STRIDE[:PAD]]]`` (K=3, stride 1, "same" padding K//2
by default; built without a bias when batch norm follows it, directly or after pooling,
since the normalisation removes any per-channel constant and the bias's gradient is
exactly zero), ``maxpool:K[:STRIDE]``, ``avgpool:K[:STRIDE]``, ``gap`` (global average pool),
``bn`` (batch norm), ``relu``, ``leaky_relu[:SLOPE]``, ``tanh``, ``sigmoid``,
``dropout:P``, ``flatten``, and ``res[...]`` (a residual block y = x + f(x) around the
layers inside the brackets). A spec that starts with ``dense`` sees images as 784 features;
anything else sees them as (1, 28, 28).
"""
from __future__ import annotations

from . import layers as L

#: the layer specs of ``--model`` (the MLP, ``--model mlp``, is built from ``--layers``)
PRESETS = {
    # 2 conv blocks with batch norm, then a dense head with dropout: >= 99.2% on MNIST
    "cnn": "conv:32,bn,relu,maxpool:2,conv:64,bn,relu,maxpool:2,flatten,dense:128,relu,dropout:0.3,dense:10",
    # >= 99.0% in under a minute of training on a 2-core CPU (docs/cnn.md; with the CLI's
    # cnn-fast defaults: Adam 3e-3, batch 64, 3 epochs): narrower, and each block pools before
    # batch norm and ReLU, so they run on a quarter of the values
    "cnn-fast": "conv:16,maxpool:2,bn,relu,conv:32,maxpool:2,bn,relu,flatten,dense:128,relu,dense:10",
}


class ArchitectureError(ValueError):
    """A spec token that cannot be parsed or does not fit the shape reaching it."""


def split_top_level(spec: str, keep_empty: bool = False) -> list[str]:
    """Split on commas that are not inside ``res[...]`` brackets (``keep_empty``: keep
    empty items, so a checker can report them)."""
    parts, depth, current = [], 0, ""
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ArchitectureError(f"unbalanced ']' in {spec!r}")
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if depth:
        raise ArchitectureError(f"unbalanced '[' in {spec!r}")
    parts.append(current.strip())
    return parts if keep_empty else [p for p in parts if p]


def spec_input_shape(spec: str) -> tuple:
    first = split_top_level(spec)[0].split(":")[0].lower()
    return (784,) if first == "dense" else (1, 28, 28)


def _ints(args, token, n_min, n_max):
    if not n_min <= len(args) <= n_max:
        raise ArchitectureError(f"{token!r}: expected {n_min}-{n_max} numbers after the name")
    try:
        return [int(a) for a in args]
    except ValueError:
        raise ArchitectureError(f"{token!r}: sizes must be integers") from None


def build_layers(spec: str, input_shape) -> list:
    """Layer objects for ``spec``, with sizes inferred from ``input_shape`` (no batch axis)."""
    shape, out = tuple(input_shape), []
    tokens = split_top_level(spec)
    for t, token in enumerate(tokens):
        layer = _make(token, shape, normalised=_normalised_next(tokens[t + 1:]))
        shape = layer.output_shape(shape)
        out.append(layer)
    return out


def _normalised_next(rest: list) -> bool:
    """Whether batch norm comes next, directly or after pooling (which commutes with adding a
    per-channel constant): then a convolution's bias cannot change the output."""
    for token in rest:
        name = token.split(":")[0].lower()
        if name == "bn":
            return True
        if name not in ("maxpool", "avgpool"):
            return False
    return False


def _make(token: str, shape: tuple, normalised: bool = False):
    if token.lower().startswith("res[") and token.endswith("]"):
        return L.Residual(build_layers(token[4:-1], shape))
    name, *args = token.split(":")
    name = name.lower()
    if name == "dense":
        (n_out,) = _ints(args, token, 1, 1)
        if len(shape) != 1:
            raise ArchitectureError(f"{token!r} needs flat features but gets shape {shape}; add 'flatten' first")
        return L.Dense(shape[0], n_out)
    if name == "conv":
        nums = _ints(args, token, 1, 4)
        out_ch, k = nums[0], nums[1] if len(nums) > 1 else 3
        stride = nums[2] if len(nums) > 2 else 1
        pad = nums[3] if len(nums) > 3 else k // 2
        if len(shape) != 3:
            raise ArchitectureError(f"{token!r} needs (channels, height, width) but gets shape {shape}")
        return L.Conv2D(shape[0], out_ch, k, stride=stride, padding=pad, bias=not normalised)
    if name in ("maxpool", "avgpool"):
        nums = _ints(args, token, 1, 2)
        cls = L.MaxPool2D if name == "maxpool" else L.AvgPool2D
        return cls(nums[0], stride=nums[1] if len(nums) > 1 else None)
    if name == "gap":
        return L.GlobalAvgPool()
    if name == "bn":
        return L.BatchNorm(shape[0])
    if name == "flatten":
        return L.Flatten()
    if name == "dropout":
        try:
            return L.Dropout(float(args[0]) if args else 0.5)
        except ValueError:
            raise ArchitectureError(f"{token!r}: dropout takes a probability like dropout:0.3") from None
    if name == "leaky_relu":
        return L.LeakyReLU(float(args[0]) if args else 0.01)
    if name in L.ACTIVATIONS and not args:
        return L.ACTIVATIONS[name]()
    raise ArchitectureError(f"unknown layer token {token!r}; see `python -m nnx.train --help`")
