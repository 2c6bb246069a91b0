"""``python -m benchmarks.numpy_floor``: how fast can ANY NumPy implementation run an MNIST
epoch here, next to PyTorch eager? The evidence behind the "0.5x PyTorch" target (issue #5).

Five implementations, one epoch each in turn (round-robin, so load from other jobs hits all
of them alike), all over the same batches from the same initial weights:

* ``torch-ref``   PyTorch eager (torch.nn + autograd + torch.optim), as in the main suite;
* ``nnx-numpy``   ``nnx.trainer.Trainer`` on the NumPy backend;
* ``plain-numpy`` the main suite's hand-written loop (same structure as nnx, no layers);
* ``floor-numpy`` ``impls.FloorNumpyMLP``: the fastest loop we could write — ``out=``
  buffers for everything, one flat array for all parameters, gradients and velocities;
* ``gather+matmuls`` only the batch gather and the step's matmuls (``FloorNumpyMLP.
  matmuls_only``), no element-wise work and no update: the work no implementation can skip
  with this BLAS. Its time over torch-ref's bounds every NumPy implementation's ratio.

The same five also run single training steps at batch 128 (no gather; 4 MNIST batches in
turn; ``--step-repeats`` interleaved samples of >= 50 ms each): many short samples, so the
medians are steadier than a handful of epochs on a shared machine.

Prints two tables (median, spread, × torch-ref) and, with ``--json``, writes every sample.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from . import impls
from .timing import summarize


class FloorEpochRunner(impls.EpochRunner):
    """``FloorNumpyMLP`` (or just its matmuls) over the Trainer's batches for each epoch."""

    def __init__(self, data, state, matmuls_only=False, epochs=impls.EPOCHS):
        from nnx.schedules import make_schedule

        sp = impls._host_splits(data, "mlp", "float32")
        self.x, self.y = sp["train"].x, sp["train"].y
        self.n_train = len(self.y)
        self.net = impls.FloorNumpyMLP(state)
        self.matmuls_only = matmuls_only
        self.impl = "gather+matmuls" if matmuls_only else "floor-numpy"
        self.schedule = make_schedule("cosine", impls.LR, epochs, -(-self.n_train // impls.BATCH))
        self.global_step = 0

    def train_epoch(self, epoch):
        n, bs, net = self.n_train, impls.BATCH, self.net
        perm = impls._derived_perm(impls.SEED, epoch, n)
        loss_sum, correct = 0.0, 0
        for k in range(math.ceil(n / bs)):
            idx = perm[k * bs:(k + 1) * bs]
            m = len(idx)
            xb = np.take(self.x, idx, axis=0, out=net.buffers(m)["x"])
            yb = np.take(self.y, idx, axis=0)
            if self.matmuls_only:
                net.matmuls_only(xb)
                continue
            loss, right = net.step(xb, yb, lr=self.schedule(self.global_step))
            self.global_step += 1
            loss_sum += loss * m
            correct += right
        return loss_sum / n, correct / n


def step_cases(data, state, batch: int = impls.BATCH) -> dict:
    """``{impl: (step_fn, sync)}`` for ``timing.measure_interleaved``, over 4 MNIST batches."""
    from nnx.backends import get_backend

    batches = impls.step_batches(data, "mlp", batch, 4)
    runners = [impls.NnxRunner(get_backend("numpy", "cpu"), "mlp", state),
               impls.PlainNumpyRunner("mlp", state)]
    try:
        runners.insert(0, impls.TorchRefRunner("cpu", "mlp", state))
    except ImportError:
        pass
    cases = {}
    for r in runners:
        r.load_batches(batches)
        cases[r.impl] = (r.train_step, r.sync)
    for matmuls_only in (False, True):
        net, it = impls.FloorNumpyMLP(state), {"k": 0}

        def step(net=net, it=it, matmuls_only=matmuls_only):
            x, y = batches[it["k"] % len(batches)]
            it["k"] += 1
            return net.matmuls_only(x) if matmuls_only else net.step(x, y)

        cases["matmuls" if matmuls_only else "floor-numpy"] = (step, lambda: None)
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.numpy_floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per implementation, "
                   "after one untimed warm-up epoch (default 5)")
    p.add_argument("--step-repeats", type=int, default=15,
                   help="interleaved step samples per implementation (0: no step table; default 15)")
    p.add_argument("--threads", type=int, help="limit BLAS/OpenMP/torch threads (threadpoolctl)")
    p.add_argument("--data-dir", help="MNIST folder (default: NNX_DATA_DIR, then the usual places)")
    p.add_argument("--json", help="also write the results (every sample) here")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    from .cli import _limit_threads
    from .machine import library_versions, load_snapshot, thread_info
    from nnx.backends import get_backend

    keep = _limit_threads(args.threads, print) if args.threads else None  # noqa: F841
    data = impls.load_mnist(args.data_dir)
    if data is None:
        p.error("MNIST not found: pass --data-dir or set NNX_DATA_DIR")
    state = impls.reference_state("mlp")
    runners = [impls.NnxEpochRunner(get_backend("numpy", "cpu"), "mlp", data),
               impls.PlainNumpyEpochRunner("mlp", data, state),
               FloorEpochRunner(data, state),
               FloorEpochRunner(data, state, matmuls_only=True)]
    try:
        runners.insert(0, impls.TorchRefEpochRunner("cpu", "mlp", data, state))
    except ImportError:
        print("torch is not installed: no torch-ref row (pip install torch)")
    out = {"command": " ".join(["python -m benchmarks.numpy_floor", *(argv if argv is not None else sys.argv[1:])]),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": library_versions(),
           "threads": thread_info(), "load_start": load_snapshot(), "epochs": {}}
    wall = {r.impl: [] for r in runners}
    final = {}
    for e in range(1 + args.epochs):
        for r in runners:
            t0 = time.perf_counter()
            final[r.impl] = r.train_epoch(e)
            r.sync()
            if e:  # epoch 0 is the warm-up
                wall[r.impl].append(time.perf_counter() - t0)
    if args.step_repeats > 0:
        from .timing import measure_interleaved

        res = measure_interleaved(step_cases(data, state), warmup=5, repeats=args.step_repeats)
        ref_step = res["torch-ref"]["median_s"] if "torch-ref" in res else None
        out["steps"] = {"batch_size": impls.BATCH}
        print(f"training step, batch {impls.BATCH}:")
        print(f"{'impl':<15} {'median ms':>10} {'IQR ms':>8} {'min ms':>8} {'x torch-ref':>12}")
        for k, v in res.items():
            ratio = v["median_s"] / ref_step if ref_step else None
            out["steps"][k] = {"median_s": v["median_s"], "iqr_s": v["iqr_s"], "min_s": v["min_s"],
                               "x_torch_ref": ratio, "inner": v["inner"], "samples": v["samples"]}
            print(f"{k:<15} {1e3 * v['median_s']:10.3f} {1e3 * v['iqr_s']:8.3f} {1e3 * v['min_s']:8.3f} "
                  f"{'' if ratio is None else f'{ratio:12.2f}'}")
        print()
    out["load_end"] = load_snapshot()
    print(f"full epoch ({impls.BATCH}-image batches, 55,000 images):")
    ref = summarize(wall["torch-ref"])["median_s"] if "torch-ref" in wall else None
    print(f"{'impl':<15} {'median s':>9} {'min-max s':>13} {'x torch-ref':>12}  train loss, acc (last epoch)")
    for r in runners:
        s = summarize(wall[r.impl])
        ratio = s["median_s"] / ref if ref else None
        loss, acc = final[r.impl]
        out["epochs"][r.impl] = {"median_s": s["median_s"], "min_s": s["min_s"], "max_s": s["max_s"],
                                 "x_torch_ref": ratio, "samples": wall[r.impl],
                                 "last_train_loss": None if r.impl == "gather+matmuls" else float(loss),
                                 "last_train_acc": None if r.impl == "gather+matmuls" else float(acc)}
        note = "" if r.impl == "gather+matmuls" else f"  {float(loss):.4f}, {float(acc):.4f}"
        print(f"{r.impl:<15} {s['median_s']:9.3f} {s['min_s']:6.3f}-{s['max_s']:.3f} "
              f"{'' if ratio is None else f'{ratio:12.2f}'}{note}")
    if args.json:
        from .report import write_json

        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
