"""nnx benchmark suite (issue #5): ``python -m benchmarks --help``.

Measures, per implementation, device and batch size, after warm-up and with
``backend.synchronize()`` at both ends of every timed region:

* one training step (forward, loss, backward, Nesterov update) and forward-only inference;
* a full MNIST training epoch (55,000 samples, batch 128, the CLI's default network);
* the time to reach 97% and 98% test accuracy with the CLI's default settings;
* host RSS and GPU memory-pool bytes around each case.

Implementations ("impls") compared in one run:

* ``nnx-<backend>``: nnx's hand-written layers on each Array API backend
  (numpy, torch, strict on the CPU; cupy and torch on CUDA);
* ``torch-ref``: the same network as ``torch.nn.Sequential`` with autograd and
  ``torch.optim.SGD(nesterov=True)``, the same initial weights and the same batches;
* ``plain-numpy``: a hand-written NumPy loop with no Array API layer (MLP only), to show
  what the abstraction costs.

Results go to ``benchmarks/results/<timestamp>/`` (results.json, results.md, PNG charts);
docs/benchmarks.md explains the method and shows measured numbers.
"""

__all__ = ["main"]


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
