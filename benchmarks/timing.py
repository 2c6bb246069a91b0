"""Timers, robust statistics and memory probes.

Every timed region is bracketed by ``sync()`` (``backend.synchronize()``: a no-op on CPU
libraries, a device-wide wait on CUDA), so queued GPU work is never missed or leaked into
the next sample. Short operations are repeated ``inner`` times inside one timed region and
reported per call; ``inner`` is calibrated after warm-up so that one sample lasts at least
``min_time`` seconds. Each sample records wall-clock time (the result) and this process's
CPU time (a cross-check that is less sensitive to other jobs on a shared machine).
"""
from __future__ import annotations

import math
import os
import resource
import statistics
import time

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def summarize(samples) -> dict:
    """Median, quartiles (IQR), min, max, mean and count of a list of per-call seconds."""
    xs = sorted(float(s) for s in samples)
    if not xs:
        return {"n": 0}
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
    return {"n": len(xs), "median_s": statistics.median(xs), "q1_s": q1, "q3_s": q3,
            "iqr_s": q3 - q1, "min_s": xs[0], "max_s": xs[-1], "mean_s": statistics.fmean(xs)}


def _noop():  # the sync of a CPU library
    pass


def time_block(fn, sync=_noop, inner: int = 1) -> tuple[float, float]:
    """(wall, process CPU) seconds per call of ``fn`` over ``inner`` back-to-back calls,
    synchronised at both ends. On a shared machine CPU time is the steadier of the two: time
    spent waiting for a core that another job holds is not counted (with several threads it
    adds up every thread's time, spinning included)."""
    sync()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    t1, c1 = time.perf_counter(), time.process_time()
    return (t1 - t0) / inner, (c1 - c0) / inner


def calibrate(fn, sync=_noop, min_time: float = 0.05, max_inner: int = 10_000) -> int:
    """How many back-to-back calls make one sample last about ``min_time`` seconds."""
    t = time_block(fn, sync, 1)[0]
    if t >= min_time:
        return 1
    # a second estimate over several calls: the first single call is noisy
    t = time_block(fn, sync, min(8, math.ceil(min_time / max(t, 1e-7))))[0]
    return int(min(max_inner, max(1, math.ceil(min_time / max(t, 1e-7)))))


def measure_interleaved(cases: dict, warmup: int = 3, repeats: int = 7, min_time: float = 0.05,
                        on_warm=None) -> dict:
    """Time several cases fairly on a shared machine.

    ``cases`` maps a key to ``(fn, sync)``. Each case is warmed up (``warmup`` calls, then
    calibrated), then the repeats go round-robin over the cases — case A sample 1, case B
    sample 1, ..., case A sample 2, ... — so a burst of load from other processes hits every
    case alike instead of one. ``on_warm(key)`` is called right after a case's warm-up
    (memory probes). Returns ``{key: {"samples": [...], "inner": k, **summarize}}``.
    """
    inner = {}
    for key, (fn, sync) in cases.items():
        for _ in range(max(0, warmup)):
            fn()
        sync()
        if on_warm is not None:
            on_warm(key)
        inner[key] = calibrate(fn, sync, min_time)
    wall, cpu = {key: [] for key in cases}, {key: [] for key in cases}
    for _ in range(max(1, repeats)):
        for key, (fn, sync) in cases.items():
            w, c = time_block(fn, sync, inner[key])
            wall[key].append(w)
            cpu[key].append(c)
    return {key: {"samples": wall[key], "inner": inner[key], **summarize(wall[key]),
                  "cpu_samples": cpu[key], "cpu_median_s": statistics.median(cpu[key])}
            for key in cases}


# --- memory -------------------------------------------------------------------------------
def rss_bytes() -> int | None:
    """Current resident set size of this process (/proc/self/statm), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak RSS since the last ``reset_peak_rss`` (VmHWM from /proc/self/status), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class MemoryProbe:
    """Host RSS (and GPU pool bytes, via ``gpu_bytes``) around one case.

    ``start()`` records the current RSS and resets the peak counter; ``stop()`` returns
    ``rss_before``, ``rss_after``, ``rss_peak`` (peak during the case, where the kernel
    supports resetting it), ``rss_peak_extra`` (peak − before: the case's working memory)
    and ``ru_maxrss`` (process-lifetime peak, getrusage).
    """

    def __init__(self, gpu_bytes=None):
        self.gpu_bytes, self.before, self.resettable = gpu_bytes, None, False

    def start(self):
        self.before = rss_bytes()
        self.resettable = reset_peak_rss()
        return self

    def stop(self) -> dict:
        after, peak = rss_bytes(), peak_rss_bytes() if self.resettable else None
        out = {"rss_before_bytes": self.before, "rss_after_bytes": after, "rss_peak_bytes": peak,
               "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if peak is not None and self.before is not None:
            out["rss_peak_extra_bytes"] = max(0, peak - self.before)
        if self.gpu_bytes is not None:
            try:
                out.update(self.gpu_bytes())
            except Exception as e:  # a GPU probe must never lose a result
                out["gpu_memory_error"] = str(e)
        return out
