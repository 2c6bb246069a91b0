"""nnx benchmark suite: ``python -m benchmarks --help``; docs/benchmarks.md explains it.

nnx on each Array API backend (``nnx-<backend>``) against PyTorch eager (``torch-ref``: the
same network, weights and batches with autograd and ``torch.optim``) and a hand-written
NumPy loop (``plain-numpy``), in one process: training step and inference per batch size, a
full MNIST epoch, time to 97%/98% test accuracy, CNN layers, memory, FLOP/s against peaks
measured in the same run. Results (results.json, results.md, PNG charts) go to
``runs/bench/<timestamp>/`` under the current folder, or ``--out``.
"""

__all__ = ["main"]


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
