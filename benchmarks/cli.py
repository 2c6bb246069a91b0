"""Command line of the benchmark suite: ``python -m benchmarks [options]``."""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path


RESULTS_DIR = Path("runs") / "bench"  # under the current folder; runs/ is git-ignored
DEFAULT_BATCHES = (32, 128, 512, 2048, 8192)
QUICK_BATCHES = (8, 64)


def _csv(s):
    """Comma-separated items, each once, in the order given."""
    return list(dict.fromkeys(p.strip() for p in str(s).split(",") if p.strip()))


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark nnx (per backend and device) against a PyTorch eager reference "
                    "and a plain NumPy loop: training step and inference per batch size, a full "
                    "MNIST epoch, time to 97%/98% test accuracy (99% for the cnn-fast preset), "
                    "memory. Writes results.json, results.md and PNG charts.",
        epilog="examples:\n"
               "  python -m benchmarks                         # everything present here\n"
               "  python -m benchmarks --threads 1             # one BLAS/torch thread (shared machines)\n"
               "  python -m benchmarks --models mlp,cnn --skip-accuracy\n"
               "  python -m benchmarks --threads 1 --models cnn-fast --skip-steps --refs torch   # time to 99%\n"
               "  python -m benchmarks --quick --backends numpy,strict --skip-accuracy   # CI smoke run\n"
               "  python -m benchmarks --with-input-grad --skip-epoch --skip-accuracy   # nnx steps as before input_grad=False\n"
               "  python -m benchmarks --devices cuda --backends cupy,torch",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", help="nnx backends: numpy,torch,strict,cupy (default: every one "
                                      "present; strict runs the step cases and one epoch only)")
    p.add_argument("--devices", help="cpu,cuda,cuda:N (default: cpu, plus cuda when a GPU backend works)")
    p.add_argument("--refs", default="torch,numpy",
                   help="peers: torch (PyTorch eager reference), numpy (plain NumPy loop), none "
                        "(default: torch,numpy)")
    p.add_argument("--models", default="mlp",
                   help="mlp, cnn and/or cnn-fast (the --model cnn-fast preset: step cases at its "
                        "batch 64 and time to 99%% test accuracy with its CLI defaults) (default: mlp)")
    p.add_argument("--batch-sizes", help=f"MLP step batch sizes (default: "
                                         f"{','.join(map(str, DEFAULT_BATCHES))}; quick: "
                                         f"{','.join(map(str, QUICK_BATCHES))})")
    p.add_argument("--cnn-batch-sizes", help="CNN step batch sizes (default: 128, cnn-fast 64; "
                                             "quick: 8)")
    p.add_argument("--dtypes", default="float32", help="float32 and/or float64 (default: float32)")
    p.add_argument("--repeats", type=int, help="timed samples per case (default 7; quick 3)")
    p.add_argument("--warmup", type=int, help="untimed calls before each case (default 5; quick 1)")
    p.add_argument("--min-time", type=float,
                   help="seconds one timed sample lasts at least; short calls are repeated "
                        "inside it (default 0.05; quick 0.002)")
    p.add_argument("--epoch-repeats", type=int, help="timed epochs per implementation after one "
                                                     "warm-up epoch (default 3; quick 1)")
    p.add_argument("--threads", type=int,
                   help="limit BLAS/OpenMP (threadpoolctl) and torch intra-op threads to N "
                        "(default: leave the libraries' defaults)")
    p.add_argument("--with-input-grad", action="store_true",
                   help="nnx's step cases also compute the first layer's input gradient "
                        "(model.backward(..., input_grad=True); impl nnx-<backend>+dx0), as nnx "
                        "training did before; default: input_grad=False, as the Trainer does. "
                        "Epoch and accuracy rows always run the Trainer, which skips it")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (CI smoke run)")
    p.add_argument("--skip-steps", action="store_true", help="skip the per-batch-size step cases")
    p.add_argument("--skip-epoch", action="store_true", help="skip the full-epoch case")
    p.add_argument("--skip-accuracy", action="store_true", help="skip time-to-accuracy")
    p.add_argument("--skip-layers", action="store_true", help="skip the CNN single-layer cases")
    p.add_argument("--data-dir", help="MNIST folder (default: NNX_DATA_DIR, ~/.cache/nnx/mnist, "
                                      "../shared/data/mnist); never downloads")
    p.add_argument("--out", help="results folder (default: runs/bench/<timestamp>/ under the "
                                 "current folder)")
    p.add_argument("--no-charts", action="store_true", help="write no PNG charts")
    return p


def _listed(parser, option, value, allowed):
    items = _csv(value)
    if not items:
        parser.error(f"{option} is empty (use {', '.join(allowed)})")
    for v in items:
        if v not in allowed:
            parser.error(f"{option}: unknown {v!r} (use {', '.join(allowed)})")
    return items


def _resolve(args, parser):
    """The parsed options, checked, with the defaults that depend on ``--quick`` filled in."""
    cfg, q = args, args.quick
    cfg.models = _listed(parser, "--models", args.models, ("mlp", "cnn", "cnn-fast"))
    cfg.dtypes = _listed(parser, "--dtypes", args.dtypes, ("float32", "float64"))
    cfg.refs = ([] if args.refs.strip().lower() == "none"
                else _listed(parser, "--refs", args.refs, ("torch", "numpy", "none")))
    try:
        cfg.batch_sizes = [int(b) for b in _csv(args.batch_sizes or ",".join(
            map(str, QUICK_BATCHES if q else DEFAULT_BATCHES)))]
        asked = args.cnn_batch_sizes  # (cfg is args: read before it is replaced)
        cfg.cnn_batch_sizes = [int(b) for b in _csv(asked or ("8" if q else "128"))]
        # cnn-fast's steps at its training batch unless batch sizes are asked for
        from .impls import settings

        cfg.cnn_fast_batch_sizes = (cfg.cnn_batch_sizes if asked or q
                                    else [settings("cnn-fast")["batch_size"]])
    except ValueError:
        parser.error("batch sizes must be comma-separated integers")
    if not cfg.batch_sizes or not cfg.cnn_batch_sizes:
        parser.error("--batch-sizes/--cnn-batch-sizes are empty: name at least one size")
    if min(cfg.batch_sizes + cfg.cnn_batch_sizes) <= 0:
        parser.error("batch sizes must be positive")
    cfg.repeats = (3 if q else 7) if args.repeats is None else args.repeats
    cfg.warmup = (1 if q else 5) if args.warmup is None else args.warmup
    cfg.min_time = (0.002 if q else 0.05) if args.min_time is None else args.min_time
    cfg.epoch_repeats = (1 if q else 3) if args.epoch_repeats is None else args.epoch_repeats
    if (cfg.repeats <= 0 or cfg.epoch_repeats <= 0 or cfg.warmup < 0
            or not 0 <= cfg.min_time < float("inf")):  # (nan fails the comparison too)
        parser.error("--repeats/--epoch-repeats must be positive, --warmup >= 0, --min-time a "
                     "finite number >= 0")
    if args.out is not None:  # before any work: not a file, not inside one, writable
        from nnx.errors import check_out_dir

        if not args.out.strip():
            parser.error("--out is empty; give a folder (it is created if needed)")
        cfg.out = str(Path(args.out).expanduser())  # checked where it is written
        check_out_dir(Path(cfg.out), parser)
    if cfg.threads is not None and cfg.threads <= 0:
        parser.error("--threads must be positive")
    cfg.input_grad = args.with_input_grad
    cfg.backends = _csv(args.backends) if args.backends is not None else None
    cfg.devices = _csv(args.devices) if args.devices is not None else None
    for option, given in (("--backends", cfg.backends), ("--devices", cfg.devices)):
        if given == []:
            parser.error(f"{option} is empty: name at least one, or leave it out for all")
    return cfg


def _specs(cfg, model, log):
    """Which implementations run: nnx on each (backend, device), then the peers per device."""
    from nnx.backends import BackendError, available_backends, get_backend

    from .cases import Spec

    present = available_backends()
    devices = cfg.devices or sorted({d if d != "CPU_DEVICE" else "cpu" for _, d in present},
                                    key=lambda d: (d != "cpu", d))
    wanted = cfg.backends or sorted({n for n, _ in present})
    specs, skipped = [], []
    for dev in devices:
        cuda = dev.startswith("cuda")
        for name in wanted:
            if name not in ("numpy", "torch", "strict", "cupy"):
                raise SystemExit(f"error: unknown backend {name!r} (numpy, torch, strict, cupy)")
            if cuda and name in ("numpy", "strict"):
                continue
            if not cuda and name == "cupy":
                continue
            bdev = "CPU_DEVICE" if name == "strict" else dev
            try:
                get_backend(name, bdev)
            except BackendError as e:
                skipped.append({"kind": "skipped", "model": model, "spec": f"nnx-{name} {dev}",
                                "reason": str(e)})
                log(f"skip nnx-{name} on {dev}: {e}")
                continue
            specs.append(Spec("nnx", name, bdev))
        if "torch" in cfg.refs:
            try:
                get_backend("torch", dev)
                specs.append(Spec("torch-ref", "torch", dev))
            except BackendError as e:
                skipped.append({"kind": "skipped", "model": model, "spec": f"torch-ref {dev}",
                                "reason": str(e)})
        if "numpy" in cfg.refs and not cuda and model == "mlp":
            specs.append(Spec("plain-numpy", "numpy", "cpu"))
    return specs, skipped


def _data(cfg, log):
    from . import impls

    data = impls.load_mnist(cfg.data_dir)
    name = "MNIST"
    if data is None:
        data = impls.synthetic_mnist(6024 if cfg.quick else 60000, 512 if cfg.quick else 10000)
        name = "synthetic (MNIST files not found)"
        log("MNIST not found (use --data-dir or NNX_DATA_DIR): synthetic data, accuracy skipped")
    elif cfg.quick:
        # 5000 validation images are held out like the CLI does, leaving 1024 to train on
        data = {k: tuple(a[:n] for a in data[k]) for k, n in (("train", 6024), ("test", 512))}
        name = "MNIST subset (quick: 1,024 train / 512 test)"
    return data, name


def _oversubscription(info, cfg, log) -> list[str]:
    """Warn when BLAS and OpenMP pools together want more threads than there are cores: with
    NumPy and torch in one process their idle threads spin against each other."""
    pools, cores = info["threads"].get("threadpools"), info["cpu"]["usable_cores"]
    if cfg.threads or not isinstance(pools, list) or len(pools) < 2:
        return []
    total = sum(int(p.get("num_threads") or 0) for p in pools)
    if total <= cores:
        return []
    each = ", ".join(f"{p.get('internal_api')}:{p.get('num_threads')}" for p in pools)
    msg = (f"{total} BLAS/OpenMP threads ({each}) "
           f"on {cores} cores in one process: their spinning threads slow each other down "
           "(and any other job on the machine); consider --threads 1")
    log("warning: " + msg)
    return [msg]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = _resolve(args, parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    from .machine import _importable, thread_limit

    if cfg.threads and not _importable("threadpoolctl"):
        print("threadpoolctl is not installed: BLAS threads not limited (pip install threadpoolctl)")
    with thread_limit(cfg.threads):
        return _run(cfg, " ".join(["python -m benchmarks", *argv]), print)


def _run(cfg, command, log) -> int:
    from . import cases, impls, machine, report

    out = Path(cfg.out) if cfg.out else RESULTS_DIR / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    load_start = machine.load_snapshot()
    info = machine.machine_info()
    warnings = _oversubscription(info, cfg, log)
    data, data_name = _data(cfg, log)
    have_mnist = not data_name.startswith("synthetic")

    all_specs = {m: _specs(cfg, m, log) for m in cfg.models}
    devices = sorted({s.device if s.device != "CPU_DEVICE" else "cpu"
                      for specs, _ in all_specs.values() for s in specs})
    th = info["threads"]
    log(f"nnx benchmarks -> {out}")
    log(f"CPU: {info['cpu']['model']}, {info['cpu']['usable_cores']} cores; threads: "
        f"{cfg.threads or 'library defaults'} (BLAS {th.get('blas_threads', '?')}, torch "
        f"{th.get('torch_num_threads', '-')}); load {load_start['loadavg_1_5_15']}; "
        f"{load_start['cpu_pressure']}")
    log("measuring the matmul peaks ...")
    peaks = machine.measured_peaks(devices, cfg.dtypes, cfg.threads,
                                   sizes=(256, 512) if cfg.quick else (1024, 2048),
                                   repeats=3 if cfg.quick else 5)
    for key, p in peaks["best"].items():
        log(f"  {key}: {p['flop_per_s'] / 1e9:.1f} GFLOP/s ({p['source']})")

    rows = [row for _, skipped in all_specs.values() for row in skipped]
    flops_per_sample = {}
    t_start = time.perf_counter()
    for dtype in cfg.dtypes:
        cfg.dtype = dtype
        for model in cfg.models:
            specs = all_specs[model][0]
            m = impls.flops_model(model)
            flops_per_sample[model] = {"forward": impls.forward_flops(m, 1),
                                       "train_step": impls.train_step_flops(m, 1),
                                       "train_step_with_input_grad": impls.train_step_flops(m, 1, True)}
            log(f"[{model} {dtype}] implementations: {', '.join(f'{s.kind}:{s.backend}@{s.device}' for s in specs)}")
            if not cfg.skip_steps:
                bss = {"mlp": cfg.batch_sizes, "cnn": cfg.cnn_batch_sizes}.get(
                    model, cfg.cnn_fast_batch_sizes)
                rows += cases.step_cases(model, bss, specs, data, cfg, log)
            if model == "cnn" and not cfg.skip_layers:
                rows += cases.layer_cases(specs, cfg, batch=cfg.cnn_batch_sizes[0], log=log)
            if not cfg.skip_epoch:
                if model != "mlp" and not cfg.quick:
                    why = ("its time-to-accuracy case times its epochs" if model == "cnn-fast"
                           else "minutes per epoch on a CPU")
                    log(f"  {model} epoch skipped: {why} (use --quick to smoke-test it)")
                else:
                    rows += cases.epoch_cases(model, specs, data, cfg, log)
            if not cfg.skip_accuracy:
                why = ("MNIST not found" if not have_mnist else "time-to-accuracy is measured for "
                       "the MLP and cnn-fast" if model == "cnn" else None)
                rows += ([{"kind": "skipped", "model": model, "case": "accuracy", "reason": why}]
                         if why else cases.accuracy_cases(model, specs, data, cfg, log=log))

    cases.apply_peaks(rows, peaks, log)
    results = {
        "schema": 2,
        "command": command,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - t_start,
        "config": {"quick": cfg.quick, "models": cfg.models, "dtypes": cfg.dtypes,
                   "batch_sizes": cfg.batch_sizes, "cnn_batch_sizes": cfg.cnn_batch_sizes,
                   "repeats": cfg.repeats, "warmup": cfg.warmup, "min_time_s": cfg.min_time,
                   "epoch_repeats": cfg.epoch_repeats, "threads": cfg.threads,
                   "refs": cfg.refs, "nnx_step_first_layer_input_grad": cfg.input_grad,
                   "nnx_epoch_first_layer_input_grad": False,
                   "backends": cfg.backends, "devices": cfg.devices,
                   "settings": {m: {**impls.settings(m), "val_size": impls.VAL_SIZE,
                                    "seed": impls.SEED} for m in cfg.models}},
        "data": data_name,
        "machine": info,
        "threads_after": machine.thread_info(),
        "load_start": load_start,
        "load_end": machine.load_snapshot(),
        "peaks": peaks,
        "flops_per_sample": flops_per_sample,
        "cases": rows,
        "warnings": warnings,
    }
    results["charts"] = [] if cfg.no_charts else report.charts(results, out)
    report.write_json(out / "results.json", results)
    report.write_markdown(results, out / "results.md")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}"
        + (f" and {len(results['charts'])} charts" if results["charts"] else ""))
    noisy = report.noisy_rows(rows)
    if noisy:
        log(f"note: {len(noisy)} timed rows have an IQR above {report.NOISY_IQR:.0%} of their median "
            "(listed in results.md): more --repeats or a quieter machine would firm them up")
    return 0
