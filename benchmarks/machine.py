"""What machine a result came from: CPU, memory, OS, load, environment, libraries, threads,
GPUs, and the peak FLOP/s a result's "fraction of peak" is measured against.

CPU peak, two ways (both recorded):

* **theoretical**: cores × clock × fp32 FLOP per cycle per core, the last from the
  /proc/cpuinfo flags. Assumption: two SIMD FMA pipes per core, each doing a fused
  multiply-add (2 FLOP) on every lane — AVX-512: 2 × 16 lanes × 2 = 64; AVX2 + FMA:
  2 × 8 × 2 = 32 (Haswell and later, AMD Zen 2 and later); AVX without FMA: 16; else 8.
  Zen 1 and some Atom-class cores have one pipe (half that). The clock is /proc/cpuinfo's
  "cpu MHz" (the current, not the boost, clock).
* **measured** (the one fractions of peak use): a 2048 × 2048 float32 matmul in NumPy with
  the run's thread settings; on CUDA, the same with CuPy and torch. That is the throughput a
  BLAS actually reaches here, which a small training step can only approach.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time

from .timing import summarize

ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
            "MKL_NUM_THREADS", "MKL_DEBUG_CPU_TYPE", "CUPY_TF32", "CUDA_VISIBLE_DEVICES",
            "NNX_DATA_DIR")


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" not in line:
                    if info:
                        break  # the first processor block is enough
                    continue
                k, v = (s.strip() for s in line.split(":", 1))
                info.setdefault(k, v)
    except OSError:
        pass
    return info


def _meminfo_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def cpu_pressure() -> str | None:
    """/proc/pressure/cpu's "some" line: % of time runnable tasks waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().strip()
    except OSError:
        return None


def load_snapshot() -> dict:
    """Load average and CPU pressure right now (the machine is shared: record both)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"time": _dt.datetime.now().isoformat(timespec="seconds"), "loadavg_1_5_15": load,
            "cpu_pressure": cpu_pressure()}


def fp32_flops_per_cycle(flags: set) -> tuple[int, str]:
    if "avx512f" in flags:
        return 64, "AVX-512: 2 FMA pipes x 16 fp32 lanes x 2 FLOP"
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2+FMA: 2 FMA pipes x 8 fp32 lanes x 2 FLOP"
    if "avx" in flags:
        return 16, "AVX, no FMA: 1 add + 1 mul pipe x 8 fp32 lanes"
    return 8, "SSE: 1 add + 1 mul pipe x 4 fp32 lanes"


def cpu_info() -> dict:
    ci = _cpuinfo()
    flags = set(ci.get("flags", "").split())
    cores = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = cores
    mhz = float(ci["cpu MHz"]) if "cpu MHz" in ci else None
    per_cycle, why = fp32_flops_per_cycle(flags)
    peak = usable * mhz * 1e6 * per_cycle if mhz else None
    return {"model": ci.get("model name", platform.processor() or "unknown"),
            "vendor": ci.get("vendor_id"), "family": ci.get("cpu family"), "model_id": ci.get("model"),
            "logical_cores": cores, "usable_cores": usable, "mhz": mhz,
            "simd_flags": sorted(flags & {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16",
                                          "amx_tile", "neon", "asimd"}),
            "theoretical_peak_fp32_flops": peak,
            "theoretical_peak_assumption": f"{usable} cores x {mhz} MHz x {per_cycle} FLOP/cycle ({why})"}


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("numpy", "array_api_compat", "array_api_strict", "torch", "cupy", "threadpoolctl",
                "matplotlib"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception:
            continue
    from nnx import __version__

    out["nnx"] = __version__
    commit = nnx_commit()
    if commit:
        out["nnx_commit"] = commit
    return out


def nnx_commit() -> str | None:
    """The git commit nnx runs from ("<sha>", "+dirty" when tracked files outside
    benchmarks/results differ), or None outside a git checkout: results then name the exact
    code they measured."""
    import subprocess
    from pathlib import Path

    import nnx

    repo = Path(nnx.__file__).resolve().parents[1]
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "nnx/__init__.py"], cwd=repo,
                                 capture_output=True, text=True, timeout=10)
        if tracked.returncode != 0:  # not a checkout of nnx (an installed copy, say)
            return None
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return None
        # results folders are rewritten by the runs themselves: they do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def thread_info() -> dict:
    """BLAS/OpenMP thread pools (threadpoolctl, when installed) and torch's thread counts."""
    out = {}
    try:
        from threadpoolctl import threadpool_info

        out["threadpools"] = [{k: v for k, v in i.items() if k in (
            "internal_api", "user_api", "num_threads", "version", "architecture", "threading_layer",
            "prefix")} for i in threadpool_info()]
    except ImportError:
        out["threadpools"] = "threadpoolctl not installed (pip install threadpoolctl)"
    if "torch" in sys.modules or _importable("torch"):
        import torch

        out["torch_num_threads"] = torch.get_num_threads()
        out["torch_num_interop_threads"] = torch.get_num_interop_threads()
    return out


def _importable(name) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def gpu_info() -> list[dict]:
    gpus = []
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append({"index": i, "name": p.name, "memory_bytes": p.total_memory,
                             "source": "torch", "capability": f"{p.major}.{p.minor}"})
    except Exception:
        pass
    if not gpus:
        try:
            import cupy

            for i in range(cupy.cuda.runtime.getDeviceCount()):
                p = cupy.cuda.runtime.getDeviceProperties(i)
                name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
                gpus.append({"index": i, "name": name, "memory_bytes": p["totalGlobalMem"],
                             "source": "cupy"})
        except Exception:
            pass
    return gpus


def machine_info() -> dict:
    return {"cpu": cpu_info(), "memory_bytes": _meminfo_bytes(), "os": platform.platform(),
            "machine": platform.machine(), "env": {k: os.environ.get(k) for k in ENV_VARS},
            "versions": library_versions(), "threads": thread_info(), "gpus": gpu_info()}


# --- measured peaks -----------------------------------------------------------------------
def _matmul_peak(make, mm, sync, n, repeats) -> dict:
    a, b = make(n)
    mm(a, b)
    sync()
    samples = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        mm(a, b)
        sync()
        samples.append(time.perf_counter() - t0)
    s = summarize(samples)
    flops = 2.0 * n ** 3
    return {**s, "size": n, "dtype": "float32", "flops": flops, "samples": samples,
            "median_flop_per_s": flops / s["median_s"], "best_flop_per_s": flops / s["min_s"]}


def measured_peaks(devices, n: int = 2048, repeats: int = 7) -> dict:
    """Achievable float32 matmul FLOP/s: NumPy on the CPU; CuPy and torch on each CUDA device."""
    import numpy as np

    out = {}
    rng = np.random.default_rng(0)
    out["cpu"] = _matmul_peak(lambda k: (rng.standard_normal((k, k), dtype=np.float32),
                                         rng.standard_normal((k, k), dtype=np.float32)),
                              lambda a, b: a @ b, lambda: None, n, repeats)
    out["cpu"]["library"] = "numpy"
    for dev in devices:
        if not str(dev).startswith("cuda"):
            continue
        try:
            import cupy

            with cupy.cuda.Device(int(dev.split(":")[1]) if ":" in dev else 0):
                r = _matmul_peak(lambda k: (cupy.random.standard_normal((k, k), dtype=cupy.float32),
                                            cupy.random.standard_normal((k, k), dtype=cupy.float32)),
                                 lambda a, b: a @ b, cupy.cuda.Device().synchronize, max(n, 4096),
                                 repeats)
            r["library"] = "cupy"
            out[f"{dev}/cupy"] = r
        except Exception:
            pass
        try:
            import torch

            if torch.cuda.is_available():
                d = torch.device(dev)
                r = _matmul_peak(lambda k: (torch.randn(k, k, device=d), torch.randn(k, k, device=d)),
                                 lambda a, b: a @ b, lambda: torch.cuda.synchronize(d), max(n, 4096),
                                 repeats)
                r["library"] = "torch"
                r["tf32_allowed"] = bool(torch.backends.cuda.matmul.allow_tf32)
                out[f"{dev}/torch"] = r
        except Exception:
            pass
    return out


def peak_for(peaks: dict, device: str) -> float | None:
    """The measured peak FLOP/s used for fractions on ``device`` (the best library there)."""
    if not str(device).startswith("cuda"):
        return peaks.get("cpu", {}).get("best_flop_per_s")
    vals = [v["best_flop_per_s"] for k, v in peaks.items() if k.startswith(f"{device}/")]
    if not vals and device == "cuda":
        vals = [v["best_flop_per_s"] for k, v in peaks.items() if k.startswith("cuda")]
    return max(vals) if vals else None
