"""Where the tests find real MNIST: where the CLI does (``nnx.datasets.find_data_dir``:
$NNX_DATA_DIR/mnist, $NNX_DATA_DIR, the cache, the system folder), then the shared folder
beside the repository. Never downloads."""
from __future__ import annotations

import functools
import os
from pathlib import Path

SKIP_REASON = ("MNIST not found where `python -m nnx.train` looks ($NNX_DATA_DIR, "
               "~/.cache/nnx/mnist, /usr/share/datasets/mnist) nor in ../shared/data/mnist")


def mnist_dir() -> Path | None:
    """The folder, or None; cached per environment (a test may patch NNX_DATA_DIR)."""
    return _mnist_dir(os.environ.get("NNX_DATA_DIR"), os.environ.get("XDG_CACHE_HOME"),
                      os.environ.get("HOME"))


@functools.lru_cache(maxsize=None)
def _mnist_dir(*environment) -> Path | None:
    from nnx import datasets

    try:
        found = datasets.find_data_dir("mnist")
    except datasets.DatasetError:  # a damaged copy: the CLI would stop there too
        return None
    if found is not None:
        return Path(found)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    if shared.is_dir() and any(shared.glob("train-images-idx3-ubyte*")):
        return shared
    return None
