"""Data-parallel throughput: samples/s for K = 1, 2, ... processes, the time each step
spends in the gradient allreduce, and the scaling efficiency.

    python tools/bench_distributed.py                 # K = 1 and 2, the default MLP
    python tools/bench_distributed.py --k 1 2 4 --layers 784,512,512,10 --batch-size 256

Each K runs ``mpirun -n K --oversubscribe python tools/bench_distributed.py --worker``:
the default MLP trained by ``Trainer(comm=...)`` on seeded synthetic MNIST-shaped data
(the arithmetic per sample is MNIST's), one thread per process (``--threads``). The first
epoch is a warm-up; the rest are timed. "allreduce ms/step" is the wall time inside
``allreduce_sum_`` on rank 0, waiting for the slower rank included.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import numpy as np

    from nnx.backends import get_backend
    from nnx.data import Split
    from nnx.distributed import create_communicator, detect
    from nnx.model import mlp
    from nnx.optim import make_optimizer
    from nnx.schedules import make_schedule
    from nnx.threads import set_threads
    from nnx.trainer import Trainer

    set_threads(args.threads)
    backend = get_backend(args.backend)
    comm = create_communicator(backend) if detect() else None
    spent = [0.0, 0]
    if comm is not None:
        reduce = comm.allreduce_sum_

        def timed(x):
            t = time.perf_counter()
            reduce(x)
            spent[0] += time.perf_counter() - t
            spent[1] += 1
            return x
        comm.allreduce_sum_ = timed
    rng = np.random.default_rng(0)
    x = rng.random((args.rows, 784), dtype=np.float32)
    y = rng.integers(0, 10, args.rows)
    split = Split(backend.from_numpy(x, dtype=backend.dtype(args.dtype)), backend.from_numpy(y))
    sizes = [int(s) for s in args.layers.split(",")]
    model = mlp(sizes, backend=backend, dtype=args.dtype)
    opt = make_optimizer("nesterov", model.named_parameters(), 0.05, momentum=0.9)
    steps = -(-args.rows // args.batch_size)
    trainer = Trainer(model, opt, make_schedule("constant", 0.05, args.epochs + 1, steps),
                      batch_size=args.batch_size, epochs=args.epochs + 1, progress=False,
                      log=lambda *a: None, comm=comm)
    trainer.fit(split)  # row 0 is the warm-up epoch
    timed_rows = trainer.history[1:]
    seconds = sum(r["epoch_time_s"] for r in timed_rows)
    rank = comm.rank if comm else 0
    if rank == 0:
        total_steps = steps * (args.epochs + 1)
        print(json.dumps({"k": comm.size if comm else 1,
                          "samples_per_s": args.rows * len(timed_rows) / seconds,
                          "allreduce_ms_per_step": 1e3 * spent[0] / max(spent[1], 1),
                          "allreduce_share": spent[0] / max(sum(r["epoch_time_s"] for r in trainer.history), 1e-9),
                          "gradient_values": model.num_parameters(), "steps": total_steps}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layers", default="784,128,64,10")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rows", type=int, default=30_000)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", default="numpy")
    p.add_argument("--threads", type=int, default=1, help="per process")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    mpirun = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    passed = _without_k(sys.argv[1:])
    results = []
    for k in args.k:
        cmd = [mpirun, "-n", str(k), "--oversubscribe", sys.executable, __file__, "--worker", *passed]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            sys.exit(f"K={k} failed:\n{r.stderr[-2000:]}")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = results[0]["samples_per_s"] / results[0]["k"]
    print(f"MLP {args.layers}, batch {args.batch_size} (global), {args.dtype}, {args.backend}, "
          f"{args.threads} thread(s)/process, {os.cpu_count()} CPUs")
    print(f"{'K':>3} {'samples/s':>11} {'allreduce ms/step':>18} {'share of time':>14} {'efficiency':>11}")
    for r in results:
        eff = r["samples_per_s"] / (r["k"] * base)
        print(f"{r['k']:>3} {r['samples_per_s']:>11,.0f} {r['allreduce_ms_per_step']:>18.3f} "
              f"{100 * r['allreduce_share']:>13.1f}% {100 * eff:>10.0f}%")


def _without_k(argv):
    out, skip = [], False
    for a in argv:
        if a == "--k":
            skip = True
            continue
        if skip and a.lstrip("-").isdigit():
            continue
        skip = False
        out.append(a)
    return out


if __name__ == "__main__":
    main()
