"""``python -m benchmarks.ab_layers --rev REV``: a layer as it was at git revision REV
against the layer as it is now, A/B in ONE process, interleaved sample by sample.

The old class is read with ``git show REV:nnx/layers/<file>.py`` and loaded as a module
beside the current one, so any past version can be measured against today's on the same
machine at the same moment (two separate runs on a shared machine can differ by more than
the change). Cases (``--cases``, default all):

* ``relu``      ReLU training forward, (128, 128) float32, on every CPU backend present;
* ``batchnorm`` BatchNorm training forward+backward and evaluation forward, (128, 32, 28, 28)
  and (128, 64, 14, 14) float32, NumPy;
* ``maxpool``   MaxPool2D(2) forward+backward on ReLU'd channel-major input (as a Conv2D
  output is laid out), same two shapes, NumPy;
* ``cnn-step``  the benchmark CNN's training step with BatchNorm and MaxPool2D as at REV
  (the other layers as today), with today's, and PyTorch eager (``--data-dir`` MNIST
  batches, or random ones).

Both sides get the same inputs; the tool checks that they compute the same values (to
float32 rounding) before timing them.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

from . import impls

REPO = Path(__file__).resolve().parents[1]


def old_module(rev: str, name: str):
    """``nnx/layers/<name>.py`` at ``rev`` as a fresh module (its own classes, today's helpers)."""
    src = subprocess.run(["git", "show", f"{rev}:nnx/layers/{name}.py"], cwd=REPO,
                         capture_output=True, text=True)
    if src.returncode != 0:
        raise SystemExit(f"git show {rev}:nnx/layers/{name}.py failed: {src.stderr.strip()}")
    mod = types.ModuleType(f"old_{name}_{rev}")
    mod.__package__ = "nnx.layers"  # its relative imports resolve against today's package
    from nnx.layers.base import LAYER_TYPES

    registry = dict(LAYER_TYPES)  # old Layer subclasses register themselves by class name:
    try:                          # keep today's classes the ones checkpoints are rebuilt from
        exec(compile(src.stdout, f"{rev}:nnx/layers/{name}.py", "exec"), mod.__dict__)
    finally:
        LAYER_TYPES.clear()
        LAYER_TYPES.update(registry)
    return mod


def interleaved(cases: dict, repeats: int, inner: int) -> dict:
    """{key: median ms per call} over ``repeats`` round-robin samples of ``inner`` calls."""
    for fn in cases.values():
        fn()
    samples = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[k].append((time.perf_counter() - t0) / inner * 1e3)
    return {k: {"median_ms": float(np.median(v)), "samples_ms": v} for k, v in samples.items()}


def _built(cls, backend, shape, *args):
    layer = cls(*args)
    layer.build(backend, backend.float32, backend.host_rng(0), shape)
    return layer


def _close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    if not np.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
        raise SystemExit(f"{what}: old and new disagree (max |diff| {np.nanmax(np.abs(a - b)):.3g})")


def case_relu(rev, repeats):
    from nnx.backends import available_backends, get_backend
    from nnx.layers import ReLU

    old = old_module(rev, "activations").ReLU
    out = {}
    present = {name for name, _ in available_backends()}
    for name in [b for b in ("numpy", "torch", "strict") if b in present]:
        be = get_backend(name)
        x = be.from_numpy(np.random.default_rng(0).standard_normal((128, 128)), dtype=be.float32)
        a, b = _built(old, be, (128,)), _built(ReLU, be, (128,))
        _close(be.to_numpy(a.forward(x, True)), be.to_numpy(b.forward(x, True)), f"relu {name}")
        res = interleaved({"old": lambda: a.forward(x, True), "new": lambda: b.forward(x, True)},
                          repeats, 300)
        out[f"relu fwd (128,128) {name}"] = res
    return out


def _maps(shape, channel_major=False, relu=False, seed=0):
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    a = rng.standard_normal((c, n, h, w) if channel_major else shape).astype(np.float32)
    if relu:
        a = np.maximum(a, 0)
    return a.transpose(1, 0, 2, 3) if channel_major else a


def case_batchnorm(rev, repeats):
    from nnx.backends import get_backend
    from nnx.layers import BatchNorm

    old = old_module(rev, "batchnorm").BatchNorm
    be, out = get_backend("numpy"), {}
    for shape in [(128, 32, 28, 28), (128, 64, 14, 14)]:
        x, g = _maps(shape), _maps(shape, seed=1)
        a, b = _built(old, be, shape[1:], shape[1]), _built(BatchNorm, be, shape[1:], shape[1])
        _close(a.forward(x, True), b.forward(x, True), "batchnorm forward")
        _close(a.backward(g), b.backward(g), "batchnorm backward")
        out[f"batchnorm train fwd+bwd {shape}"] = interleaved(
            {"old": lambda: (a.forward(x, True), a.backward(g)),
             "new": lambda: (b.forward(x, True), b.backward(g))}, repeats, 2)
        out[f"batchnorm eval fwd {shape}"] = interleaved(
            {"old": lambda: a.forward(x, False), "new": lambda: b.forward(x, False)}, repeats, 2)
    return out


def case_maxpool(rev, repeats):
    from nnx.backends import get_backend
    from nnx.layers import MaxPool2D

    old = old_module(rev, "pool").MaxPool2D
    be, out = get_backend("numpy"), {}
    for shape in [(128, 32, 28, 28), (128, 64, 14, 14)]:
        x = _maps(shape, channel_major=True, relu=True)
        n, c, h, w = shape
        g = _maps((n, c, h // 2, w // 2), channel_major=True, seed=1)
        a, b = _built(old, be, shape[1:], 2), _built(MaxPool2D, be, shape[1:], 2)
        _close(a.forward(x, True), b.forward(x, True), "maxpool forward")
        _close(a.backward(g), b.backward(g), "maxpool backward")
        out[f"maxpool fwd+bwd {shape} channel-major"] = interleaved(
            {"old": lambda: (a.forward(x, True), a.backward(g)),
             "new": lambda: (b.forward(x, True), b.backward(g))}, repeats, 2)
    return out


def case_cnn_step(rev, repeats, data_dir=None):
    from nnx.backends import get_backend
    from nnx.layers import BatchNorm, MaxPool2D

    old_bn, old_pool = old_module(rev, "batchnorm").BatchNorm, old_module(rev, "pool").MaxPool2D
    be = get_backend("numpy")
    state = impls.reference_state("cnn")
    data = impls.load_mnist(data_dir) or impls.synthetic_mnist(512, 64)
    batches = impls.step_batches(data, "cnn", 128, 4)
    current = impls.cnn_layers

    def with_old_classes():
        swap = {BatchNorm: lambda l: old_bn(l.num_features), MaxPool2D: lambda l: old_pool(l.kernel_size)}
        return [swap[type(l)](l) if type(l) in swap else l for l in current()]

    runners = {}
    try:
        impls.cnn_layers = with_old_classes
        runners["old"] = impls.NnxRunner(be, "cnn", state)
    finally:
        impls.cnn_layers = current
    runners["new"] = impls.NnxRunner(be, "cnn", state)
    try:
        runners["torch-ref"] = impls.TorchRefRunner("cpu", "cnn", state)
    except ImportError:
        pass
    for r in runners.values():
        r.load_batches(batches)
    # one training step each on the same batch: the same loss, and the same weights after it
    losses = [float(runners[k].train_step()) for k in ("old", "new")]
    _close(losses[0], losses[1], "cnn training step loss")
    old_w, new_w = runners["old"].model.state_dict(), runners["new"].model.state_dict()
    for k in new_w:
        _close(old_w[k], new_w[k], f"cnn weights after a step: {k}")
    res = interleaved({k: r.train_step for k, r in runners.items()}, repeats, 3)
    return {"cnn training step, batch 128": res}


def _time(ms: float) -> str:
    return f"{1e3 * ms:.1f} us" if ms < 1 else f"{ms:.2f} ms"


CASES = {"relu": case_relu, "batchnorm": case_batchnorm, "maxpool": case_maxpool,
         "cnn-step": case_cnn_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab_layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="git revision of the old layers, e.g. a3b93b4")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    p.add_argument("--repeats", type=int, default=9, help="interleaved samples per side (default 9)")
    p.add_argument("--threads", type=int, help="limit BLAS/OpenMP/torch threads (threadpoolctl)")
    p.add_argument("--data-dir", help="MNIST folder for cnn-step (default: the usual places; "
                   "random batches when none is found)")
    p.add_argument("--json", help="also write the results (every sample) here")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    from .cli import _limit_threads
    from .machine import library_versions, load_snapshot

    keep = _limit_threads(args.threads, print) if args.threads else None  # noqa: F841
    out = {"command": " ".join(["python -m benchmarks.ab_layers", *(argv if argv is not None else sys.argv[1:])]),
           "rev": args.rev, "versions": library_versions(), "load_start": load_snapshot(),
           "results": {}}
    for c in cases:
        res = CASES[c](args.rev, args.repeats, args.data_dir) if c == "cnn-step" else CASES[c](args.rev, args.repeats)
        for label, sides in res.items():
            out["results"][label] = sides
            base = sides["old"]["median_ms"]
            cells = "  ".join(f"{k} {_time(v['median_ms'])} ({v['median_ms'] / base:.2f}x old)"
                              for k, v in sides.items())
            print(f"{label:<42} {cells}")
    out["load_end"] = load_snapshot()
    if args.json:
        from .report import write_json

        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
