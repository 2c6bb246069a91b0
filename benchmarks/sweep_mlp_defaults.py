"""The small sweep that chose ``python -m nnx.train``'s MLP defaults (docs/training.md).

    python -m benchmarks.sweep_mlp_defaults [--data-dir DIR]

Trains 784-128-64-10 for 10 epochs with a cosine schedule for each (optimizer, lr, dropout,
weight decay, batch size) below and two seeds, printing validation and test accuracy.
About 15 s per run on 2 CPU cores.
"""
import argparse
import math

import nnx
from nnx import datasets
from nnx.data import make_splits
from nnx.optim import make_optimizer
from nnx.schedules import make_schedule
from nnx.trainer import Trainer

CONFIGS = [  # optimizer, lr, dropout, weight decay, batch size
    ("adam", 1e-3, 0.0, 0.0, 128), ("momentum", 0.05, 0.0, 0.0, 128),
    ("momentum", 0.1, 0.1, 0.0, 128), ("momentum", 0.05, 0.2, 0.0, 128),
    ("adam", 2e-3, 0.2, 0.0, 128), ("nesterov", 0.1, 0.0, 5e-4, 128),
    ("nesterov", 0.05, 0.1, 5e-4, 64), ("adamw", 1e-3, 0.1, 0.05, 64), ("adam", 1e-3, 0.2, 0.0, 64),
]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep_mlp_defaults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir")
    p.add_argument("--seeds", default="0,1")
    args = p.parse_args(argv)
    data = datasets.load("mnist", data_dir=args.data_dir)
    b = nnx.get_backend("numpy")
    splits = make_splits(data, b, b.float32, 5000, 0)
    print("optimizer      lr  dropout  wd      batch  seed  val_acc  test_acc")
    for opt_name, lr, dropout, wd, bs in CONFIGS:
        for seed in (int(s) for s in args.seeds.split(",")):
            model = nnx.mlp([784, 128, 64, 10], dropout=dropout, backend=b, seed=seed)
            opt = make_optimizer(opt_name, model.named_parameters(), lr, weight_decay=wd)
            sched = make_schedule("cosine", lr, 10, math.ceil(len(splits["train"]) / bs))
            t = Trainer(model, opt, sched, bs, 10, seed, progress=False, log=lambda *a: None)
            t.fit(splits["train"], splits["val"], splits["test"])
            print(f"{opt_name:9s} {lr:7g}  {dropout:5.1f}  {wd:7g}  {bs:5d}  {seed:4d}  "
                  f"{100 * t.history[-1]['val_acc']:6.2f}%  {100 * t.result['test_acc']:6.2f}%", flush=True)


if __name__ == "__main__":
    main()
