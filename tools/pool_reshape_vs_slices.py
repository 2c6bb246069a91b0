"""Max/avg pooling 2x2 on a (128, 32, 28, 28) float32 batch, NumPy, one thread: the k·k
strided slices nnx uses against "reshape to (N, C, H/2, 2, W/2, 2) and reduce", and the
backward's mask as a multiply against where(). Median ms of 15 interleaved repeats:

    python tools/pool_reshape_vs_slices.py
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nnx.threads import set_threads  # noqa: E402

set_threads(1)
import numpy as np  # noqa: E402

x = np.random.default_rng(0).standard_normal((128, 32, 28, 28), dtype=np.float32)
g = np.random.default_rng(1).standard_normal((128, 32, 14, 14), dtype=np.float32)
hit = x[..., ::2, ::2] > 0
cases = {
    "max, slices": lambda: np.maximum(np.maximum(x[..., ::2, ::2], x[..., ::2, 1::2]),
                                      np.maximum(x[..., 1::2, ::2], x[..., 1::2, 1::2])),
    "max, reshape + reduce": lambda: x.reshape(128, 32, 14, 2, 14, 2).max(axis=(3, 5)),
    "avg, slices": lambda: (x[..., ::2, ::2] + x[..., ::2, 1::2] + x[..., 1::2, ::2]
                            + x[..., 1::2, 1::2]) * 0.25,
    "avg, reshape + reduce": lambda: x.reshape(128, 32, 14, 2, 14, 2).mean(axis=(3, 5)),
    "mask, g * astype(hit)": lambda: g * hit.astype(np.float32),
    "mask, where(hit, g, 0)": lambda: np.where(hit, g, np.float32(0)),
}
times = {k: [] for k in cases}
for r in range(17):
    for k, fn in cases.items():
        t0 = time.perf_counter()
        fn()
        times[k].append((time.perf_counter() - t0) * 1e3)
for k, v in times.items():
    print(f"| {k} | {statistics.median(v[2:]):.2f} |")
