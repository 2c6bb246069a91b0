"""Where a CNN step's time goes on any backend and device (a GPU above all): each layer's
training forward, backward and inference forward, nnx against the same layer in PyTorch
eager on the same device, then a cProfile of whole nnx training steps (on a GPU a step
whose CPU time equals its wall time is bound by Python and kernel launches, not the GPU).

    python tools/profile_device.py --backend cupy --device cuda
    python tools/profile_device.py --backend torch --device cuda --arch cnn-fast
    python tools/profile_device.py --backend numpy            # works anywhere (slowly)

Each timed call is bracketed by the backend's ``synchronize`` (and torch's), so a row is
the layer's whole cost, launches and GPU work; the "cpu" columns are this process's CPU
time over the same calls. Medians over ``--repeats``, nnx and torch interleaved.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cupy")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="cnn", help="a preset name or a layer spec (default: cnn)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30, help="whole steps under cProfile")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from nnx import Sequential
    from nnx.architectures import PRESETS, build_layers
    from nnx.backends import get_backend
    from nnx.losses import SoftmaxCrossEntropy
    from nnx.optim import make_optimizer
    from profile_cnn import layer_traffic, torch_module

    b = get_backend(args.backend, args.device)
    tdev = torch.device("cuda" if str(b.device).startswith("cuda") else "cpu")
    print(f"# {b.describe()}; {args.arch}, batch {args.batch}, float32, overrides {b.overrides()}")

    def sync():
        b.synchronize()
        if tdev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3, out

    spec = PRESETS.get(args.arch, args.arch)
    model = Sequential(build_layers(spec, (1, 28, 28)), (1, 28, 28), backend=b, dtype="float32",
                       seed=0)
    tmods = [torch_module(layer, torch.nn).to(tdev).train() for layer in model.layers]
    rng = np.random.default_rng(0)
    xh = rng.random((args.batch, 1, 28, 28), dtype=np.float32)
    ins, tins, grads = layer_traffic(
        model, tmods, b.from_numpy(xh), torch.from_numpy(xh).to(tdev),
        lambda shape: b.from_numpy(rng.standard_normal(shape, dtype=np.float32)))
    tgrads = [torch.from_numpy(np.ascontiguousarray(b.to_numpy(g))).to(tdev) for g in grads]
    res = {}

    def add(key, t):
        res.setdefault(key, []).append(t[:2])

    def run_nnx(i):
        layer = model.layers[i]
        add((i, "nnx", "fwd"), timed(lambda: layer.forward(ins[i], train=True)))
        add((i, "nnx", "bwd"), timed(lambda: layer.backward(grads[i], i > 0)))
        add((i, "nnx", "inf"), timed(lambda: layer.forward(ins[i], train=False)))

    def run_torch(i):
        m, xin = tmods[i], tins[i].detach().requires_grad_(i > 0)
        t = timed(lambda: m(xin))
        add((i, "torch", "fwd"), t)
        add((i, "torch", "bwd"), timed(lambda: torch.autograd.backward(t[2], tgrads[i])))
        m.eval()
        with torch.inference_mode():
            add((i, "torch", "inf"), timed(lambda: m(tins[i])))
        m.train()

    for r in range(args.repeats + 2):
        for i in range(len(model.layers)):
            (run_nnx if r % 2 == 0 else run_torch)(i)
            (run_torch if r % 2 == 0 else run_nnx)(i)
    med = {k: (statistics.median(w for w, _ in v[2:]), statistics.median(c for _, c in v[2:]))
           for k, v in res.items()}
    print("| layer | nnx fwd | torch fwd | nnx bwd | torch bwd | nnx infer | torch infer "
          "| nnx cpu fwd+bwd |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    tot = [0.0] * 7
    for i, layer in enumerate(model.layers):
        row = [med[i, s, c][0] for c in ("fwd", "bwd", "inf") for s in ("nnx", "torch")]
        row = [row[0], row[1], row[2], row[3], row[4], row[5],
               med[i, "nnx", "fwd"][1] + med[i, "nnx", "bwd"][1]]
        tot = [a + v for a, v in zip(tot, row)]
        print(f"| {i} {layer.describe()} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    print("| **sum** | " + " | ".join(f"{v:.2f}" for v in tot) + " |")

    # whole training steps (the benchmark suite's: forward, loss, backward, Nesterov)
    loss = SoftmaxCrossEntropy()
    opt = make_optimizer("nesterov", model.named_parameters(), 0.05, momentum=0.9)
    x = b.from_numpy(xh)
    y = b.from_numpy(rng.integers(0, 10, args.batch).astype(np.int64))

    def step():
        logits = model.forward(x, train=True)
        loss.forward(logits, y)
        model.backward(loss.backward(), input_grad=False)
        opt.step(0.05)

    for _ in range(5):
        step()
    times = [timed(step)[:2] for _ in range(args.repeats)]
    print(f"\nwhole step: {statistics.median(t for t, _ in times):.3f} ms wall, "
          f"{statistics.median(c for _, c in times):.3f} ms CPU (medians of {args.repeats})")
    prof = cProfile.Profile()
    sync()
    prof.enable()
    for _ in range(args.steps):
        step()
    sync()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    print(f"\ncProfile of {args.steps} steps, by own time:\n" + out.getvalue())


if __name__ == "__main__":
    main()
