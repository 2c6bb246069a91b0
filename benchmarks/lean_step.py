"""``python -m benchmarks.lean_step``: what the lean training step (nnx.step) buys.

1. Array operations per training step, counted on the torch backend with a dispatch counter
   (every ATen call; "kernels" leaves out the view-only calls — permute, view, slice,
   select — that launch nothing on a GPU): the lean step (flat storage, TrainStep, one-hot
   targets made once) against the per-layer path (one array per parameter; forward, loss,
   backward and step called one by one, a gather per batch), both with the torch backend's
   overrides (backends/torch_ops.py), and the lean step without them (``--no-fused``).
2. Step times, interleaved in one process, one thread, medians: nnx eager and compiled on
   the torch backend, nnx on NumPy, and PyTorch's own autograd + torch.optim step.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import numpy as np

VIEW_OPS = {"aten.permute.default", "aten.view.default", "aten.slice.Tensor", "aten.select.int",
            "aten.t.default", "aten.expand.default", "aten._unsafe_view.default",
            "aten.as_strided.default", "aten.alias.default", "aten.unsqueeze.default",
            "aten.squeeze.dim", "aten.transpose.int", "aten._reshape_alias.default"}


def _counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    return Count()


def _model(kind, backend, flat, dtype="float32"):
    import nnx
    from nnx.architectures import PRESETS, build_layers

    if kind == "mlp":
        return nnx.mlp(backend=backend, flat=flat, dtype=dtype)
    return nnx.Sequential(build_layers(PRESETS[kind], (1, 28, 28)), input_shape=(1, 28, 28),
                          backend=backend, flat=flat, dtype=dtype)


def _setup(kind, opt_name, backend, lean, batch=128, n=1024, for_compile=False):
    """A zero-argument function doing one training step the lean or the reference way
    (``for_compile``: one array per parameter, as ``compile_step`` needs)."""
    from nnx.losses import SoftmaxCrossEntropy
    from nnx.optim import make_optimizer
    from nnx.step import TrainStep

    xp = backend.xp
    model = _model(kind, backend, flat=lean and not for_compile)
    opt = make_optimizer(opt_name, model.named_parameters(), 0.01, weight_decay=5e-4, xp=model.xp)
    g = np.random.default_rng(0)
    shape = (n, 784) if kind == "mlp" else (n, 1, 28, 28)
    x = backend.from_numpy(g.random(shape).astype(np.float32))
    labels = g.integers(0, 10, n)
    y = backend.from_numpy(labels)
    onehot = backend.from_numpy(np.eye(10, dtype=np.float32)[labels])
    perm = backend.from_numpy(g.permutation(n))
    loss = SoftmaxCrossEntropy()
    k = [0]
    if lean:
        step = TrainStep(model, loss, opt)
        hyper = opt.hyper_table(0, [0.01] * (n // batch), backend, model.dtype)
        acc = [0.0, 0.0]

        def batch_of(i):  # as the Trainer gathers it
            idx = perm[i * batch:(i + 1) * batch]
            return backend.take_rows(x, idx), backend.take_rows(onehot, idx)

        def run():
            i = k[0] % (n // batch)
            p, c = step(*batch_of(i), tuple(col[i] for col in hyper))
            acc[0], acc[1] = acc[0] + p, acc[1] + c
            k[0] += 1
        return run, step, (batch_of, hyper)

    acc = [0.0, 0.0]

    def run():  # the per-layer path, as the Trainer ran it before the lean step
        i = k[0] % (n // batch)
        idx = perm[i * batch:(i + 1) * batch]
        xb, yb = xp.take(x, idx, axis=0), xp.take(y, idx, axis=0)
        logits = model.forward(xb, train=True)
        value = loss.forward(logits, yb)
        model.backward(loss.backward(), input_grad=False)
        opt.step(0.01)
        acc[0] = acc[0] + value * batch
        acc[1] = acc[1] + xp.sum(xp.astype(xp.argmax(logits, axis=1) == yb, logits.dtype))
        k[0] += 1
    return run, None, None


def count_ops(kind, opt_name, lean, fused=True) -> tuple[int, int]:
    """(all dispatched ATen calls, those that are not views) for one steady-state step;
    ``fused=False``: the torch backend's overrides off (``--no-fused``), the standard
    Array-API code alone."""
    from nnx.backends import get_backend, overrides

    was = overrides.enabled()
    overrides.set_enabled(fused)
    try:
        run, _, _ = _setup(kind, opt_name, get_backend("torch", "cpu"), lean)
        run(), run()  # caches made, steady state
        counter = _counter()
        with counter:
            run()
    finally:
        overrides.set_enabled(was)
    total = sum(counter.ops.values())
    return total, total - sum(v for op, v in counter.ops.items() if op in VIEW_OPS)


def time_steps(kind, rounds, batch=128):
    """Median ms per step of each implementation, interleaved round-robin."""
    import torch

    from nnx.backends import get_backend
    from nnx.step import compile_step

    tb, nb = get_backend("torch", "cpu"), get_backend("numpy")
    impls = {}
    run, _, _ = _setup(kind, "nesterov", nb, lean=True, batch=batch)
    impls["nnx-numpy"] = run
    run, step, args = _setup(kind, "nesterov", tb, lean=True, batch=batch)
    impls["nnx-torch eager"] = run
    run_c, step_c, (batch_of, hyper) = _setup(kind, "nesterov", tb, lean=True, batch=batch,
                                              for_compile=True)
    compiled = compile_step(step_c, tb)
    count = [0]

    def run_compiled():
        i = count[0] % hyper[0].shape[0]
        compiled(*batch_of(i), tuple(col[i] for col in hyper))
        count[0] += 1
    impls["nnx-torch compiled"] = run_compiled
    impls["torch autograd"] = _torch_autograd_step(kind, batch)
    for f in impls.values():  # warm-up (and compilation)
        for _ in range(3):
            f()
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, f in impls.items():
            t = time.perf_counter()
            for _ in range(5):
                f()
            times[name].append((time.perf_counter() - t) / 5 * 1e3)
    torch._dynamo.reset()
    return {name: statistics.median(v) for name, v in times.items()}


def _torch_autograd_step(kind, batch):
    import torch
    import torch.nn as tnn

    if kind == "mlp":
        net = tnn.Sequential(tnn.Linear(784, 128), tnn.ReLU(), tnn.Linear(128, 64), tnn.ReLU(),
                             tnn.Linear(64, 10))
        shape = (batch, 784)
    else:
        net = tnn.Sequential(tnn.Conv2d(1, 32, 3, padding=1, bias=False), tnn.BatchNorm2d(32),
                             tnn.ReLU(), tnn.MaxPool2d(2),
                             tnn.Conv2d(32, 64, 3, padding=1, bias=False), tnn.BatchNorm2d(64),
                             tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
                             tnn.Linear(3136, 128), tnn.ReLU(), tnn.Dropout(0.3),
                             tnn.Linear(128, 10))
        shape = (batch, 1, 28, 28)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    x, y = torch.rand(shape), torch.randint(0, 10, (batch,))
    lossf = tnn.CrossEntropyLoss()

    def run():
        opt.zero_grad(set_to_none=True)
        loss = lossf(net(x), y)
        loss.backward()
        opt.step()
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lean_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default 15)")
    p.add_argument("--models", default="mlp,cnn", help="mlp, cnn or both (default)")
    p.add_argument("--skip-timing", action="store_true", help="only count operations")
    args = p.parse_args(argv)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    models = args.models.split(",")
    print("array operations per training step (torch backend, ATen dispatch counter; "
          "kernels = without view-only calls)")
    print(f"{'model':5} {'optimizer':9} {'per-layer path':>20} {'lean step':>18} "
          f"{'lean, --no-fused':>20}")
    for kind in models:
        for opt_name in (("nesterov", "adam") if kind == "mlp" else ("adam",)):
            ref, lean = count_ops(kind, opt_name, False), count_ops(kind, opt_name, True)
            plain = count_ops(kind, opt_name, True, fused=False)
            print(f"{kind:5} {opt_name:9} " + "  ".join(
                f"{a:>6} ({b:>3} kernels)" for a, b in (ref, lean, plain)))
    if args.skip_timing:
        return 0
    with threadpool_limits(1):
        for kind in models:
            times = time_steps(kind, args.rounds)
            base = times["torch autograd"]
            print(f"\n{kind} training step, batch 128, one thread, median of {args.rounds} "
                  "interleaved rounds (Nesterov + weight decay)")
            for name, ms in times.items():
                print(f"  {name:20} {ms:8.3f} ms   {ms / base:5.2f}x torch autograd")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
