"""Runs ``nnx.train.main`` on synthetic digits (no MNIST needed) for the subprocess tests of
tests/test_hardening.py. With NNX_TEST_SLOW_WRITES=1 every atomic write first prints
``WRITE <path>`` and pauses, so the test can kill the process inside a given write."""
import os
import sys
import time
from pathlib import Path


import nnx.checkpoint as ck  # noqa: E402
import nnx.datasets as ds  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tests_helpers_train import synthetic_digits  # noqa: E402

_data = synthetic_digits(n_train=600, n_test=120)
ds.load = lambda *a, **k: _data

if os.environ.get("NNX_TEST_SLOW_WRITES"):
    _write = ck.atomic_write_bytes

    def slow_write(path, data):
        # half the bytes reach the temporary file, then a pause: a kill lands mid-write
        path = Path(path)
        path.with_name(f".{path.name}.tmp-{os.getpid()}").write_bytes(data[:len(data) // 2])
        print(f"WRITE {path}", flush=True)
        time.sleep(float(os.environ.get("NNX_TEST_WRITE_PAUSE", "0.15")))
        return _write(path, data)

    ck.atomic_write_bytes = slow_write

if __name__ == "__main__":
    from nnx.train import main

    sys.exit(main(sys.argv[1:]))
