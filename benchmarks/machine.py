"""What machine a result came from: CPU, memory, OS, load, environment, libraries, threads,
GPUs, and the peak FLOP/s a result's "% of peak" is measured against.

Peak, two ways (both recorded):

* **measured** (the one "% peak" uses): the fastest single n × n matmul of NumPy and torch,
  per dtype, at two sizes, with the run's thread setting and with one thread, in the same
  process just before the cases (``measured_peaks``); on CUDA, CuPy and torch. A row that
  runs faster than that (the matmuls ran during a burst of load, say) raises the peak to its
  own rate (``cases.apply_peaks``), so no row is ever above 100%.
* **theoretical**: cores × clock × fp32 FLOP per cycle per core, the last from the
  /proc/cpuinfo flags. Assumption: two SIMD FMA pipes per core, each doing a fused
  multiply-add (2 FLOP) on every lane — AVX-512: 2 × 16 lanes × 2 = 64; AVX2 + FMA:
  2 × 8 × 2 = 32; AVX without FMA: 16; else 8. Zen 1 and some Atom-class cores have one
  pipe (half that). The clock is /proc/cpuinfo's "cpu MHz" (current, not boost), so this can
  be below what a core really reaches.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import sys
import time

from .timing import summarize

ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
            "MKL_NUM_THREADS", "MKL_DEBUG_CPU_TYPE", "CUPY_TF32", "CUDA_VISIBLE_DEVICES",
            "NNX_DATA_DIR")


def _proc(path) -> str:
    """A /proc file's text, or "" where there is none (not Linux, no permission)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _cpuinfo() -> dict:
    """The first processor block of /proc/cpuinfo."""
    lines = _proc("/proc/cpuinfo").strip().split("\n\n")[0].splitlines()
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}


def _meminfo_bytes() -> int | None:
    total = [line.split()[1] for line in _proc("/proc/meminfo").splitlines() if line.startswith("MemTotal:")]
    return int(total[0]) * 1024 if total else None


def cpu_pressure() -> str | None:
    """/proc/pressure/cpu's "some" line: % of time runnable tasks waited for a CPU."""
    return _proc("/proc/pressure/cpu").split("\n")[0].strip() or None


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
    benchmarks/results differ), or None outside a git checkout of nnx: results then name the
    exact code they measured."""
    import subprocess
    from pathlib import Path

    import nnx

    repo = Path(nnx.__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, timeout=10)
    try:
        # results folders are rewritten by the runs themselves: they do not make the code dirty
        sha, dirty = git("rev-parse", "--short=12", "HEAD"), git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return None
    if not (repo / ".git").exists() or sha.returncode != 0:  # an installed copy, say
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def thread_info() -> dict:
    """BLAS/OpenMP thread pools (threadpoolctl, when installed) and torch's thread counts."""
    out = {}
    try:
        from threadpoolctl import threadpool_info

        pools = out["threadpools"] = [{k: v for k, v in i.items() if k in (
            "internal_api", "user_api", "num_threads", "version", "architecture", "threading_layer",
            "prefix")} for i in threadpool_info()]
        out["blas_threads"] = max((p["num_threads"] for p in pools if p["user_api"] == "blas"),
                                  default=None)
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
def _matmul_rates(make, mm, sync, sizes, repeats) -> list[dict]:
    """FLOP/s of ``repeats`` timed n × n matmuls at each size, after one untimed call."""
    out = []
    for n in sizes:
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
        s, flops = summarize(samples), 2.0 * n ** 3
        out.append({"size": n, "samples": samples, "best_flop_per_s": flops / s["min_s"],
                    "median_flop_per_s": flops / s["median_s"]})
    return out


@contextlib.contextmanager
def thread_limit(k):
    """At most ``k`` BLAS/OpenMP (threadpoolctl) and torch intra-op threads inside the block,
    restored after it; ``k`` None: as the process is set."""
    if not k:
        yield
        return
    torch = __import__("torch") if "torch" in sys.modules or _importable("torch") else None
    before = torch.get_num_threads() if torch else None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    limits = threadpool_limits(limits=k) if threadpool_limits else None
    if torch:
        torch.set_num_threads(k)
    try:
        yield
    finally:
        if limits:
            limits.restore_original_limits()
        if torch:
            torch.set_num_threads(before)


def _cpu_libraries(dtype):
    """(name, make(n) -> (a, b), matmul) for NumPy and, when installed, torch."""
    import numpy as np

    rng = np.random.default_rng(0)
    libs = [("numpy", lambda n: tuple(rng.standard_normal((2, n, n)).astype(dtype)), np.matmul)]
    if "torch" in sys.modules or _importable("torch"):
        import torch

        libs.append(("torch", lambda n: tuple(torch.randn(2, n, n, dtype=getattr(torch, dtype))),
                     torch.matmul))
    return libs


def measured_peaks(devices, dtypes=("float32",), threads=None, sizes=(1024, 2048),
                   repeats: int = 5) -> dict:
    """The matmul FLOP/s each (device, dtype) reaches here, measured in this process.

    CPU: NumPy and (when installed) torch, each at every size in ``sizes``, with the run's
    thread setting and with one thread (a busy machine can make a multi-threaded BLAS
    collapse; one thread is always available to a run that has more). CUDA: CuPy and torch
    at ``max(sizes[-1], 4096)``. ``best[f"{device}/{dtype}"]`` is the fastest single matmul
    of all of them; ``measurements`` keeps every sample.
    """
    measurements = []
    for dtype in dtypes:
        for name, make, mm in _cpu_libraries(dtype):
            for k in [None] if threads == 1 else [None, 1]:  # None: as this run is set
                with thread_limit(k):
                    info = thread_info()
                    used = info.get("torch_num_threads" if name == "torch" else "blas_threads")
                    measurements += [{"device": "cpu", "dtype": dtype, "library": name,
                                      "threads": used, **m}
                                     for m in _matmul_rates(make, mm, lambda: None, sizes, repeats)]
        for dev in devices:
            if str(dev).startswith("cuda"):
                measurements += _cuda_rates(dev, dtype, max(sizes[-1], 4096), repeats)
    best = {}
    for m in measurements:
        key = f"{m['device']}/{m['dtype']}"
        if m["best_flop_per_s"] > best.get(key, {}).get("flop_per_s", 0):
            best[key] = {"flop_per_s": m["best_flop_per_s"],
                         "source": f"{m['library']} {m['size']}x{m['size']} matmul, "
                                   f"{m['threads'] or '?'} thread(s), best of {repeats}"}
    return {"best": best, "measurements": measurements}


def _cuda_rates(dev, dtype, n, repeats) -> list[dict]:
    out = []
    try:
        import cupy

        with cupy.cuda.Device(int(dev.split(":")[1]) if ":" in dev else 0):
            make = lambda k: (cupy.random.standard_normal((k, k), dtype=dtype),
                              cupy.random.standard_normal((k, k), dtype=dtype))
            out += [{"device": dev, "dtype": dtype, "library": "cupy", "threads": None, **m}
                    for m in _matmul_rates(make, cupy.matmul, cupy.cuda.Device().synchronize,
                                           (n,), repeats)]
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            d, tdt = torch.device(dev), getattr(torch, dtype)
            make = lambda k: (torch.randn(k, k, device=d, dtype=tdt), torch.randn(k, k, device=d, dtype=tdt))
            out += [{"device": dev, "dtype": dtype, "library": "torch", "threads": None,
                     "tf32_allowed": bool(torch.backends.cuda.matmul.allow_tf32), **m}
                    for m in _matmul_rates(make, torch.matmul, lambda: torch.cuda.synchronize(d),
                                           (n,), repeats)]
    except Exception:
        pass
    return out


def peak_key(peaks: dict, device: str, dtype: str) -> str | None:
    """The ``peaks["best"]`` entry for a row on ``device`` ("cuda" matches "cuda:0")."""
    key = f"{'cpu' if not str(device).startswith('cuda') else device}/{dtype}"
    if key in peaks["best"]:
        return key
    same = [k for k in peaks["best"] if k.startswith("cuda") and k.endswith(f"/{dtype}")
            and str(device).startswith("cuda")]
    return same[0] if same else None
