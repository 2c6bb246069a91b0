"""``python -m benchmarks.mlp_step_parts``: where a NumPy MNIST MLP training step spends its time.

The default MLP of ``python -m nnx.train`` (784-128-64-10, batch 128, Nesterov + weight
decay, float32) trains on MNIST batches in the Trainer's order, one step at a time, with a
``perf_counter`` around each part as ``nnx.step.TrainStep`` calls it: the two batch gathers
(``Backend.take_rows``), each layer's forward, the loss (``train_forward``), each layer's
backward and the optimizer update. Two ways alternate in blocks of steps in one process:

- ``standard``: the Array-API reference path (``overrides.set_enabled(False)``, and
  ``take_rows``/``affine``/``sum`` as ``backends.base.Backend`` writes them);
- ``numpy``: NumPy's overrides (backends/numpy_ops.py) and ``NumpyBackend``'s own methods.

Both ways train the same model (NumPy's flat storage, Dense weights column-major); the
``standard`` way gathers float32 rows from a float copy of the split (made once, 172 MB),
the ``numpy`` way uint8 rows converted per batch, as the Trainer does (``Split.rows``).

Prints the median per part (µs) for each, after one untimed epoch. The parts are timed
inside whole steps, so they include what each step does to the caches of the next part
(the first call after a large matmul or gather runs slower than the same call alone).
One BLAS thread unless ``--threads`` says otherwise. Needs MNIST (``NNX_DATA_DIR``).
"""
from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=20, help="blocks of steps per way (default 20)")
    ap.add_argument("--steps", type=int, default=43, help="steps per block (default 43)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    a = ap.parse_args(argv)
    import numpy  # noqa: F401  (loads OpenBLAS, so that threadpoolctl finds it)
    from threadpoolctl import threadpool_limits

    threadpool_limits(a.threads)
    from nnx import datasets
    from nnx.backends import Backend, get_backend, overrides
    from nnx.data import make_splits
    from nnx.model import mlp
    from nnx.optim import make_optimizer
    from nnx.schedules import make_schedule
    from nnx.trainer import Trainer

    b = get_backend("numpy", "cpu")
    data = datasets.load("mnist", data_dir=a.data_dir, download=False, progress=False)
    train = make_splits(data, b, b.dtype("float32"), val_size=5000, seed=0)["train"]
    model = mlp(backend=b, dtype="float32", seed=0)
    opt = make_optimizer("nesterov", model.named_parameters(), 0.1, momentum=0.9,
                         weight_decay=5e-4)
    steps = -(-len(train) // 128)
    trainer = Trainer(model, opt, make_schedule("cosine", 0.1, 10, steps), batch_size=128,
                      epochs=10, seed=0, progress=False, log=lambda *x, **k: None)
    loss = trainer.loss
    opt.backend = loss.backend = b
    trainer._train_epoch(train, 0)  # warm-up: first-use checks, caches
    onehot = trainer.targets(train)
    perm = b.device_rng(1).permutation(len(train))
    hyper = opt.hyper_table(opt.steps, [trainer.schedule(0)] * steps, b, model.dtype)
    layers = model.layers
    names = (["take x", "take targets"]
             + [f"forward {i} {type(l).__name__}" for i, l in enumerate(layers)] + ["loss"]
             + [f"backward {i} {type(layers[i]).__name__}" for i in reversed(range(len(layers)))]
             + ["update", "step (sum)"])
    times = {way: {n: [] for n in names} for way in ("standard", "numpy")}
    standard = {m: getattr(Backend, m).__get__(b) for m in ("take_rows", "affine", "sum")}
    pc = time.perf_counter
    k = 0
    for block in range(2 * a.blocks):
        way = ("standard", "numpy")[block % 2]
        overrides.set_enabled(way == "numpy")
        for m, f in standard.items():  # instance attributes shadow NumpyBackend's methods
            if way == "standard":
                setattr(b, m, f)
            else:
                b.__dict__.pop(m, None)
        rec = times[way]
        for _ in range(a.steps):
            idx = perm[(k % steps) * 128:(k % steps + 1) * 128]
            t = [pc()]
            # "numpy": the trainer's gather (uint8 pixels, converted); "standard": float rows
            xb = train.rows(b, idx) if way == "numpy" else b.take_rows(train.x, idx)
            t.append(pc())
            yb = b.take_rows(onehot, idx)
            t.append(pc())
            h = xb
            for layer in layers:
                h = layer.forward(h, train=True)
                t.append(pc())
            loss.train_forward(h, yb)
            g = loss.backward()
            t.append(pc())
            for i in reversed(range(len(layers))):
                g = layers[i].backward(g, i != 0)
                t.append(pc())
            opt.apply(tuple(col[k % steps] for col in hyper))
            t.append(pc())
            for n, t0, t1 in zip(names, t, t[1:]):
                rec[n].append(t1 - t0)
            rec["step (sum)"].append(t[-1] - t[0])
            k += 1
    overrides.set_enabled(True)
    for m in standard:
        b.__dict__.pop(m, None)
    print(f"median µs per step part, {a.blocks} blocks of {a.steps} steps per way, "
          f"{a.threads} thread(s)")
    print(f"{'part':24s} {'standard':>9s} {'numpy':>9s} {'numpy/std':>9s}")
    for n in names:
        s, o = (statistics.median(times[w][n]) * 1e6 for w in ("standard", "numpy"))
        print(f"{n:24s} {s:9.1f} {o:9.1f} {o / s:9.2f}")


if __name__ == "__main__":
    main()
