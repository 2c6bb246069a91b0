#!/usr/bin/env bash
# The GPU check: one command for a bare CUDA machine with no network (docs/benchmarks.md,
# "GPU check"). Needs CuPy, PyTorch, NumPy, pytest, matplotlib, safetensors, tqdm, Pillow,
# MNIST (NNX_DATA_DIR or --data-dir's usual places), and the wheels of array-api-compat and
# array-api-strict in a folder, made on any machine with network by
#     pip download array-api-compat array-api-strict -d wheels/
#
#     bash benchmarks/gpu_check.sh [WHEELS_DIR (default wheels)] [OUT_DIR]
#
# First it checks that CuPy or PyTorch can reach a CUDA device; if neither can, it says so in
# one line and exits 2 without writing anything. Otherwise it takes at most ~7.5 minutes (the
# parts' time limits add up to 455 s) and writes at most 8 files into OUT_DIR (default
# runs/gpu-check-<date>, git-ignored; copy it to benchmarks/results/ to commit it):
# environment.txt, pytest-gpu.txt, parity.txt, train.txt, bench.txt, bench-results.json,
# bench-results.md, summary.txt. Each part has its own time limit; one that fails or runs out
# of time is marked in summary.txt (ok, SKIPPED when all its tests/rows were skipped, FAILED,
# TIMED OUT) and the rest still run.
set -u
cd "$(dirname "$0")/.."
WHEELS=${1:-wheels}
OUT=${2:-runs/gpu-check-$(date +%Y-%m-%d-%H%M)}

# --- a usable CUDA backend, before anything else ------------------------------------------
# nnx's own check (nnx.backends, or the checkout's backends/ when nnx is not installed); before
# array-api-compat is installed from the wheels, CuPy and PyTorch are asked directly
if ! PYTHONDONTWRITEBYTECODE=1 python - <<'EOF'
import sys
why = {}
try:
    import array_api_compat  # noqa: F401  (the backends need it)
except ImportError:
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            why["cupy"] = "no CUDA device"
    except Exception as e:
        why["cupy"] = f"{type(e).__name__}: {e}"
    try:
        import torch
        if not torch.cuda.is_available():
            why["torch"] = "torch.cuda.is_available() is False"
    except Exception as e:
        why["torch"] = f"{type(e).__name__}: {e}"
else:
    try:
        from nnx.backends import BackendError, get_backend
    except ImportError:
        from backends import BackendError, get_backend
    for name in ("cupy", "torch"):
        try:
            get_backend(name, "cuda")
        except BackendError as e:
            why[name] = str(e.__cause__ or e)
        except Exception as e:
            why[name] = f"{type(e).__name__}: {e}"
if len(why) == 2:
    print(f"no usable GPU: cupy@cuda: {why['cupy']}; torch@cuda: {why['torch']}. "
          "Install CuPy for the machine's CUDA (pip install cupy-cuda12x or cupy-cuda13x) "
          "and/or a CUDA build of PyTorch, and check that nvidia-smi sees a GPU", file=sys.stderr)
    sys.exit(2)
EOF
then
    exit 2
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)            # run folders and the full benchmark output stay out of OUT
trap 'rm -rf "$WORK"' EXIT
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
all_skipped() {  # all_skipped PART_LOG [RESULTS_JSON]: the step ran, but only skips
    if [ -n "${2:-}" ]; then  # a benchmark: every row of results.json is a skipped one
        [ -f "$2" ] && python - "$2" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1])).get("cases", [])
sys.exit(0 if all(r.get("kind") == "skipped" for r in rows) else 1)
EOF
        return
    fi
    # pytest -q's last line, e.g. "12 skipped, 300 deselected in 2.1s": skips, nothing passed
    local last; last=$(tail -n 1 "$1")
    [[ $last == *" skipped"* && $last != *passed* && $last != *failed* && $last != *error* ]]
}
step() {  # [STEP_RESULTS=results.json] step NAME SECONDS LOGFILE command...: run with a time
          # limit, note the outcome (ok, SKIPPED, FAILED, TIMED OUT)
    local name=$1 limit=$2 log=$3; shift 3
    local t0=$SECONDS rc part="$WORK/part.log"
    echo "== $name (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" > "$part" 2>&1; rc=$?
    cat "$part" >> "$log"
    local what=ok
    if [ $rc -eq 124 ]; then what="TIMED OUT"
    elif [ $rc -ne 0 ]; then what="FAILED (rc $rc)"
    elif all_skipped "$part" "${STEP_RESULTS:-}"; then what=SKIPPED
    fi
    printf '%-34s %-14s %4ss  (%s)\n' "$name" "$what" "$((SECONDS - t0))" "$(basename "$log")" | tee -a "$SUMMARY"
}

# --- 0. the two pure-Python dependencies, from the wheels brought along; nnx itself --------
if ! python -c "import array_api_compat, array_api_strict" 2>/dev/null; then
    python -m pip install -q --no-deps --no-index --find-links "$WHEELS" array-api-compat array-api-strict \
        || { echo "array-api-compat/array-api-strict missing and not in $WHEELS/ (see the top of this script)" | tee -a "$SUMMARY"; exit 1; }
fi
if ! python -c "import nnx.backends" 2>/dev/null; then
    python -m pip install --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || true
fi
if ! python -c "import nnx.backends" 2>/dev/null; then
    # no setuptools to install with: the package as links (nnx/ plus backends/ as nnx.backends)
    mkdir -p "$WORK/pkg/nnx"
    for f in "$PWD"/nnx/*; do ln -s "$f" "$WORK/pkg/nnx/"; done
    ln -s "$PWD/backends" "$WORK/pkg/nnx/backends"
    export PYTHONPATH="$WORK/pkg:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

{ date; nvidia-smi 2>&1 | head -20
  python - <<'EOF'
import platform, nnx
from nnx.backends import get_backend, overrides
print("python", platform.python_version())
for name, dev in (("numpy", "cpu"), ("cupy", "cuda"), ("torch", "cuda")):
    try:
        b = get_backend(name, dev)
        print(f"{name}@{dev}: {b.describe()} | versions {b.versions()} | overrides {b.overrides()}")
    except Exception as e:
        print(f"{name}@{dev}: NOT USABLE: {e}")
EOF
} > "$OUT/environment.txt" 2>&1

# --- 1. the gpu-marked tests (every kernel vs the standard path, f32/f64; parity; resume;
#        cuda:1 where two GPUs exist) ------------------------------------------------------
step "pytest -m gpu" 130 "$OUT/pytest-gpu.txt" \
    python -m pytest -q -m gpu -p no:cacheprovider tests/ -rs

# --- 2. same seed, NumPy vs CuPy (fused and --no-fused), float64, 2 epochs --------------
PAR="--limit 10000 --val-size 1000 --epochs 2 --dtype float64 --seed 0 --quiet --no-plots"
step "parity numpy f64" 45 "$OUT/parity.txt" python -m nnx.train --device cpu $PAR --out "$WORK/p-np"
step "parity cupy fused f64" 30 "$OUT/parity.txt" python -m nnx.train --device cuda $PAR --out "$WORK/p-cu"
step "parity cupy unfused f64" 30 "$OUT/parity.txt" python -m nnx.train --device cuda --no-fused $PAR --out "$WORK/p-cu0"
python - "$WORK" >> "$OUT/parity.txt" 2>&1 <<'EOF'
import json, sys, pathlib
w = pathlib.Path(sys.argv[1])
res = {k: json.loads((w / k / "results.json").read_text()) for k in ("p-np", "p-cu", "p-cu0")
       if (w / k / "results.json").exists()}
for k, r in res.items():
    f = r["final"]
    print(f"{k:6s} train_loss {f['train_loss']:.12f} val_loss {f.get('val_loss', 0):.12f} "
          f"test_acc {r['test_acc']:.6f}")
if "p-np" in res:
    # CuPy draws its shuffles on the GPU (Philox), NumPy on the host: same seed, different
    # orders, so the runs agree in accuracy, not digit for digit (tests/test_gpu.py checks
    # digit-for-digit parity with one data order)
    if "p-cu" in res:
        d = abs(res["p-cu"]["test_acc"] - res["p-np"]["test_acc"])
        print(f"cupy vs numpy: |test_acc diff| {d:.4f} -> {'PARITY OK' if d < 0.01 else 'PARITY FAILED'} (< 0.01)")
if "p-cu" in res and "p-cu0" in res:  # same generator, same order: fused = unfused
    d = abs(res["p-cu"]["final"]["train_loss"] - res["p-cu0"]["final"]["train_loss"])
    print(f"cupy fused vs --no-fused: |train_loss diff| {d:.3g} -> {'PARITY OK' if d < 1e-9 else 'PARITY FAILED'} (< 1e-9)")
EOF
grep -h "PARITY" "$OUT/parity.txt" >> "$SUMMARY"

# --- 3. python -m nnx.train --device cuda: MLP at batch 128 and 1024, the CNN briefly -------
TR="--device cuda --no-plots --checkpoint-every 100"
step "train mlp cuda b128" 25 "$OUT/train.txt" python -m nnx.train $TR --batch-size 128 --out "$WORK/t128"
step "train mlp cuda b1024" 20 "$OUT/train.txt" python -m nnx.train $TR --batch-size 1024 --out "$WORK/t1024"
step "train mlp cuda b128 --no-fused" 30 "$OUT/train.txt" python -m nnx.train $TR --batch-size 128 --no-fused --out "$WORK/t128u"
step "train cnn-fast cuda" 45 "$OUT/train.txt" python -m nnx.train $TR --model cnn-fast --out "$WORK/tcnn"
grep -h "test accuracy\|^test:\|nnx:" "$OUT/train.txt" | sed 's/^/  /' >> "$SUMMARY"

# --- 4. the benchmark suite's CUDA rows (nnx cupy and torch-CUDA, PyTorch reference) -------
STEP_RESULTS="$WORK/bench/results.json" step "benchmarks cuda" 100 "$OUT/bench.txt" \
    python -m benchmarks --threads 1 --devices cuda --backends cupy,torch --refs torch --models mlp,cnn \
        --batch-sizes 128,1024 --cnn-batch-sizes 128 --repeats 3 --warmup 3 --min-time 0.02 \
        --epoch-repeats 1 --skip-accuracy --skip-layers --no-charts --out "$WORK/bench"
for f in results.json results.md; do
    [ -f "$WORK/bench/$f" ] && cp "$WORK/bench/$f" "$OUT/bench-$f"
done
echo "results in $OUT ($(ls "$OUT" | wc -l) files)" | tee -a "$SUMMARY"
