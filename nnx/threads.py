"""How many CPU threads the array libraries may use: ``--threads N`` for every CLI.

One setting covers the BLAS/OpenMP pools of NumPy (and of any other library already loaded,
through threadpoolctl) and PyTorch's intra-op pool. Libraries loaded afterwards take it from
``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/``MKL_NUM_THREADS``, which are set as well.

The default is one thread: measured in docs/training.md ("Threads"), one thread trains the
default MLP as fast as two on an idle 2-core machine and keeps it from collapsing next to
other busy processes, where two threads spin-wait for each other (7x slower per epoch).
``--threads 0`` leaves every library at its own default (one thread per core).
"""
from __future__ import annotations

import os
import sys

#: threads per library when --threads is not given (measured, see the module docstring)
DEFAULT_THREADS = 1
#: the most --threads takes: beyond any machine's cores, and within what every library's
#: setter accepts (larger counts overflow or wrap around in their C integers)
MAX_THREADS = 4096
_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def set_threads(n: int | None = None) -> int | None:
    """Limit the array libraries to ``n`` threads each (None: DEFAULT_THREADS; 0: leave the
    libraries' own defaults). Returns the limit applied, or None for 0. The limit stays in
    force for the rest of the process."""
    n = DEFAULT_THREADS if n is None else int(n)
    if not 0 <= n <= MAX_THREADS:
        raise ValueError(f"thread count must be in [0, {MAX_THREADS}], got {n}")
    if n == 0:
        return None
    cores = os.cpu_count() or 1
    if n > cores:  # allowed (a measurement may want it), but rarely what a user meant
        print(f"note: {n} threads per array library on {cores} CPU core"
              f"{'s' if cores != 1 else ''}: threads beyond the cores wait for each other, and a "
              "BLAS may cap the count (OpenBLAS at its build's maximum)", file=sys.stderr)
    for var in _ENV_VARS:  # for libraries loaded later (torch reads these when it starts)
        os.environ[var] = str(n)
    import numpy  # noqa: F401  (loads NumPy's BLAS, so that the limit below reaches it)

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dependency of nnx; tolerate its absence: env vars still apply
        pass
    else:
        threadpool_limits(limits=n)  # not as a context manager: stays in force
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n


def add_threads_option(parser) -> None:
    """Add ``--threads N`` to an argparse parser or argument group (default None: the
    measured DEFAULT_THREADS, applied by :func:`set_threads`)."""
    parser.add_argument(
        "--threads", type=_count, metavar="N", default=None,
        help=f"CPU threads per array library (BLAS/OpenMP, torch); 0 = one per core "
             f"(default: {DEFAULT_THREADS}, fastest when other programs share the CPU; "
             f"see docs/training.md)")


def _count(text: str) -> int:
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {n}")
    if n > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS}, got {n}")
    return n
