"""``python -m benchmarks.ab_epoch --old DIR``: MNIST MLP epochs of two checkouts, interleaved.

Answers "is this tree's NumPy epoch faster than commit X's?" in one run: two worker
processes, one per checkout (``git worktree add /tmp/nnx-old <commit>`` for the other
side), each importing nnx from its own folder and holding the default MLP of
``python -m nnx.train`` (784-128-64-10 ReLU, batch 128, Nesterov lr 0.1 momentum 0.9
weight decay 5e-4, cosine schedule, MNIST with 5,000 validation images held out, float32,
seed 0) — the same initial weights and the same batches on both sides. After one untimed
epoch each, the workers take turns, one epoch at a time (A B, then B A, ...), so a burst
of load from other jobs hits both alike. Each worker times ``Trainer._train_epoch`` on its
own (shuffle, gathers, steps, running sums; no evaluation). Reported: the median epoch of
each side, the ratio of the medians and the median of the per-round ratios (new / old),
and whether the two sides hold the same weights, bit for bit, after every epoch (a SHA-1
of the parameters, taken outside the timed region; they do when the NumPy arithmetic of a
step is unchanged).

One BLAS thread by default (``--threads``), through threadpoolctl in each worker.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import hashlib, importlib.util, json, os, sys, time
import numpy  # loads OpenBLAS first, so that threadpoolctl finds it
from threadpoolctl import threadpool_limits
threadpool_limits(int(sys.argv[2]))


class Checkout:
    # nnx and nnx.backends (the folder backends/) from this checkout: an editable install
    # maps nnx.backends to ITS folder, whatever sys.path says
    @staticmethod
    def find_spec(name, path=None, target=None):
        folder = {"nnx": "nnx", "nnx.backends": "backends"}.get(name)
        if folder is None:
            return None
        folder = os.path.join(sys.argv[1], folder)
        return importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


sys.meta_path.insert(0, Checkout)
import nnx
import nnx.backends
from nnx import datasets
from nnx.data import make_splits
from nnx.model import mlp
from nnx.optim import make_optimizer
from nnx.schedules import make_schedule
from nnx.trainer import Trainer
from nnx.backends import get_backend

epochs = int(sys.argv[3])
backend = get_backend("numpy", "cpu")
data = datasets.load("mnist", data_dir=sys.argv[4] or None, download=False, progress=False)
splits = make_splits(data, backend, backend.dtype("float32"), val_size=5000, seed=0, flatten=True)
train = splits["train"]
model = mlp(backend=backend, dtype="float32", seed=0)
opt = make_optimizer("nesterov", model.named_parameters(), 0.1, momentum=0.9, weight_decay=5e-4)
steps = -(-len(train) // 128)
trainer = Trainer(model, opt, make_schedule("cosine", 0.1, epochs, steps), batch_size=128,
                  epochs=epochs, seed=0, progress=False, log=lambda *a, **k: None)
for part in (opt, trainer.loss):  # as Trainer.fit does, where the version has it
    if getattr(part, "backend", False) is None:
        part.backend = backend
print(json.dumps({"nnx": [nnx.__file__, nnx.backends.__file__]}), flush=True)
for line in sys.stdin:
    epoch = int(line)
    t = time.perf_counter()
    loss, acc = trainer._train_epoch(train, epoch)
    backend.synchronize()
    s = time.perf_counter() - t
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(backend.to_numpy(p.value).tobytes())
    print(json.dumps({"s": s, "loss": float(loss), "acc": float(acc), "weights": h.hexdigest()}),
          flush=True)
"""


class Worker:
    def __init__(self, checkout, threads, epochs, data_dir):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads), PYTHONPATH=str(checkout))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(checkout), str(threads), str(epochs), data_dir or ""],
            cwd=checkout, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.nnx = json.loads(self.proc.stdout.readline())["nnx"]

    def epoch(self, k):
        self.proc.stdin.write(f"{k}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("worker exited")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="checkout of the baseline (a git worktree)")
    ap.add_argument("--new", default=".", help="checkout measured against it (default: here)")
    ap.add_argument("--rounds", type=int, default=15, help="timed epochs per side (default 15)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=os.environ.get("NNX_DATA_DIR", ""))
    ap.add_argument("--json", help="write every sample here")
    a = ap.parse_args(argv)
    epochs = a.rounds + 1
    sides = {"old": Worker(Path(a.old).resolve(), a.threads, epochs, a.data_dir),
             "new": Worker(Path(a.new).resolve(), a.threads, epochs, a.data_dir)}
    for name, w in sides.items():
        print(f"{name}: {w.nnx}")
    samples = {"old": [], "new": []}
    try:
        for name in ("old", "new"):  # warm-up: first-use checks, caches, allocator
            samples[name].append(sides[name].epoch(0))
        for r in range(1, epochs):
            order = ("old", "new") if r % 2 else ("new", "old")
            for name in order:
                samples[name].append(sides[name].epoch(r))
            o, n = samples["old"][-1], samples["new"][-1]
            print(f"round {r:2d}: old {o['s']:.4f} s  new {n['s']:.4f} s  new/old "
                  f"{n['s'] / o['s']:.3f}  loss old {o['loss']:.6f} new {n['loss']:.6f}",
                  flush=True)
    finally:
        for w in sides.values():
            w.close()
    old = [s["s"] for s in samples["old"][1:]]
    new = [s["s"] for s in samples["new"][1:]]
    same = all(o["weights"] == n["weights"] for o, n in zip(samples["old"], samples["new"]))
    mo, mn = statistics.median(old), statistics.median(new)
    ratio = statistics.median(n / o for n, o in zip(new, old))
    print(f"median epoch: old {mo:.4f} s, new {mn:.4f} s; new/old {mn / mo:.3f} (median of "
          f"per-round ratios {ratio:.3f}); {a.rounds} rounds, {a.threads} thread(s); "
          f"same weights (bit for bit) after every epoch: {same}")
    if a.json:
        Path(a.json).write_text(json.dumps({"command": " ".join(sys.argv), "samples": samples,
                                            "median_old": mo, "median_new": mn,
                                            "ratio_of_medians": mn / mo,
                                            "median_ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
