"""Interleaved A/B of Conv2D's methods (and of BatchNorm / MaxPool2D against torch) on the
CNN preset's layer shapes, one thread, NumPy, float32:

    python tools/ab_conv.py [--repeats 20] [--batch 128]

Each repeat times every method once, in a shuffled order, on the same input (channel-major,
as the layer before hands it on) and the same upstream gradient; prints medians in ms and
each method's ratio to the im2col reference from the same run. ``fwd`` is a training
forward, ``bwd`` the backward (the first layer skips its input gradient, as in training),
``inf`` an inference forward.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [  # (C, O, H) of the cnn preset's two convolutions
    (1, 32, 28),
    (32, 64, 14),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--methods", default="im2col,gather,rows,fast,winograd")
    args = ap.parse_args(argv)
    import numpy as np

    from nnx.threads import set_threads

    set_threads(1)
    from nnx import Sequential
    from nnx.backends import get_backend
    from nnx.layers.conv import Conv2D

    methods = args.methods.split(",")
    rng = np.random.default_rng(0)
    for first, (c, o, h) in zip((True, False), SHAPES):
        n = args.batch
        x = np.ascontiguousarray(rng.standard_normal((c, n, h, h), dtype=np.float32))
        x = x.transpose(1, 0, 2, 3)
        g = np.ascontiguousarray(rng.standard_normal((o, n, h, h), dtype=np.float32))
        g = g.transpose(1, 0, 2, 3)
        layers = {}
        for meth in methods:
            m = Sequential([Conv2D(c, o, 3, padding=1, bias=False, method=meth)], (c, h, h),
                           backend=get_backend("numpy"), seed=0)
            layers[meth] = m.layers[0]
        times = {(meth, k): [] for meth in methods for k in ("fwd", "bwd", "inf")}
        for r in range(args.repeats + 2):
            order = random.Random(r).sample(methods, len(methods))  # no fixed predecessor
            for meth in order:
                layer = layers[meth]
                for k, fn in (("fwd", lambda: layer.forward(x, train=True)),
                              ("bwd", lambda: layer.backward(g, not first)),
                              ("inf", lambda: layer.forward(x))):
                    t0 = time.perf_counter()
                    fn()
                    times[meth, k].append((time.perf_counter() - t0) * 1e3)
        med = {key: statistics.median(v[2:]) for key, v in times.items()}
        ref = med["im2col", "fwd"] + med["im2col", "bwd"] if "im2col" in methods else None
        print(f"Conv2D({c}→{o}, k3, p1) on {n}x{c}x{h}x{h}, median of {args.repeats}, ms")
        print("| method | fwd | bwd | fwd+bwd | vs im2col | inf |")
        print("|---|---:|---:|---:|---:|---:|")
        for meth in methods:
            f, b, i = med[meth, "fwd"], med[meth, "bwd"], med[meth, "inf"]
            ratio = f"{(f + b) / ref:.2f}" if ref else "-"
            print(f"| {meth} | {f:.2f} | {b:.2f} | {f + b:.2f} | {ratio} | {i:.2f} |")
        print()


if __name__ == "__main__":
    main()
