"""The measurements: training step and inference per batch size, full epochs, time to
accuracy, and (for the CNN) single layers. Each returns a list of JSON-able result rows."""
from __future__ import annotations

import collections
import gc
import time

from . import impls
from .machine import load_snapshot, peak_key
from .timing import MemoryProbe, measure_interleaved, summarize


#: one implementation to run: ``kind`` is "nnx", "torch-ref" or "plain-numpy"
Spec = collections.namedtuple("Spec", "kind backend device")


def _nnx_backend(spec):
    from nnx.backends import get_backend

    return get_backend(spec.backend, spec.device)


def make_runner(spec, model, state, dtype, input_grad=False):
    """``input_grad`` (``--with-input-grad``) applies to nnx's step cases only: the peers and
    the Trainer's epochs never compute the first layer's input gradient."""
    if spec.kind == "nnx":
        return impls.NnxRunner(_nnx_backend(spec), model, state, dtype, input_grad)
    if spec.kind == "torch-ref":
        return impls.TorchRefRunner(spec.device, model, state, dtype)
    return impls.PlainNumpyRunner(model, state, dtype)


def _key(r) -> str:
    return f"{r.impl}@{r.device}"


def _flop_fields(flops, seconds):
    """FLOPs and FLOP/s (None when nothing is counted: element-wise layers). The fraction of
    the peak is filled in by ``apply_peaks`` once every row exists."""
    return {"flops": flops, "flop_per_s": flops / seconds if flops and seconds else None}


def apply_peaks(rows, peaks, log=print) -> None:
    """Give each row with a FLOP rate its ``measured_peak_flop_per_s`` and
    ``frac_measured_peak``, against ``peaks["best"]`` for its device and dtype.

    A row faster than every matmul measured shows that the peak was measured too low (load
    during the matmuls, a faster kernel elsewhere): the peak is raised to that row's rate,
    and the raise recorded in its ``source``, so that no fraction exceeds 1."""
    from .report import row_name

    keyed = [(r, peak_key(peaks, r["device"], r.get("dtype"))) for r in rows if r.get("flop_per_s")]
    for r, key in keyed:
        p = peaks["best"].get(key)
        if p and r["flop_per_s"] > p["flop_per_s"]:
            log(f"note: {row_name(r)} ran at {r['flop_per_s'] / 1e9:.1f} GFLOP/s, above the "
                f"measured {key} peak {p['flop_per_s'] / 1e9:.1f} ({p['source']}): peak raised to it")
            p.update(flop_per_s=r["flop_per_s"], source=f"raised to the rate of {row_name(r)} "
                     f"(the matmuls reached {p['flop_per_s'] / 1e9:.1f} GFLOP/s: {p['source']})")
    for r, key in keyed:
        peak = peaks["best"][key]["flop_per_s"] if key else None
        r["measured_peak_flop_per_s"] = peak
        r["frac_measured_peak"] = r["flop_per_s"] / peak if peak else None


def _base_row(kind, model, runner, dtype, batch):
    return {"kind": kind, "model": model, "impl": runner.impl, "backend": runner.backend_name,
            "device": runner.device, "dtype": dtype, "batch_size": batch}


def step_cases(model, batch_sizes, specs, data, cfg, log=print) -> list[dict]:
    """Training step and inference for every spec at every batch size (interleaved repeats)."""
    rows = []
    state = impls.reference_state(model, cfg.dtype)
    counted = impls.flops_model(model)
    for bs in batch_sizes:
        count = max(1, min(4, (len(data["train"][1]) // bs) or 1))
        batches = impls.step_batches(data, model, bs, count, cfg.dtype)
        runners = []
        for spec in specs:
            try:
                r = make_runner(spec, model, state, cfg.dtype, cfg.input_grad)
                r.load_batches(batches)
                runners.append(r)
            except Exception as e:
                log(f"  skip {spec} at batch {bs}: {e}")
                rows.append({"kind": "skipped", "model": model, "spec": repr(spec),
                             "batch_size": bs, "reason": str(e)})
        for mode in ("train_step", "inference"):
            mems, cases = {}, {}
            for r in runners:
                fn = r.train_step if mode == "train_step" else r.infer
                probe = MemoryProbe(r.gpu_bytes).start()
                r.gpu_reset()
                for _ in range(cfg.warmup):
                    fn()
                r.sync()
                mems[_key(r)] = probe.stop()
                cases[_key(r)] = (fn, r.sync)
            load0 = load_snapshot()
            res = measure_interleaved(cases, warmup=0, repeats=cfg.repeats, min_time=cfg.min_time)
            load1 = load_snapshot()
            for r in runners:
                s = res[_key(r)]
                row = _base_row(mode, model, r, cfg.dtype, bs)
                if mode == "inference":  # no backward: --with-input-grad changes nothing here
                    row["impl"] = r.impl.split("+")[0]
                # the work this implementation does: +dx0 rows add the first layer's dx
                flops = (impls.train_step_flops(counted, bs, getattr(r, "input_grad", False))
                         if mode == "train_step" else impls.forward_flops(counted, bs))
                row.update(s, samples_per_s=bs / s["median_s"], **_flop_fields(flops, s["median_s"]),
                           memory=mems[_key(r)], load=[load0, load1])
                rows.append(row)
                log(f"  {model} {mode:<10} bs {bs:>5} {row['impl']:<18} {1e3 * s['median_s']:9.3f} ms "
                    f"(IQR {1e3 * s['iqr_s']:.3f}, CPU {1e3 * s['cpu_median_s']:.3f}, x{s['inner']}) "
                    f"{row['flop_per_s'] / 1e9:7.2f} GFLOP/s")
        del runners, batches
        gc.collect()
    return rows


def _timed_epoch(r, epoch) -> tuple[float, float]:
    """(wall, process CPU) seconds of one training epoch, synchronised at both ends."""
    r.sync()
    c0, t0 = time.process_time(), time.perf_counter()
    r.train_epoch(epoch)
    r.sync()
    return time.perf_counter() - t0, time.process_time() - c0


def epoch_cases(model, specs, data, cfg, log=print) -> list[dict]:
    """Full training epochs (the model's settings: batch 128 for the MLP): 1 warm-up epoch, then ``epoch_repeats``
    epochs per implementation, round-robin."""
    state = impls.reference_state(model, cfg.dtype)
    runners, mems, rows = [], {}, []
    for spec in specs:
        try:
            probe = MemoryProbe().start()
            r = make_runner(spec, model, state, cfg.dtype).load_data(data, 1 + cfg.epoch_repeats)
            log(f"  {model} epoch warm-up {r.impl:<18} {_timed_epoch(r, 0)[0]:8.3f} s")
            mems[_key(r)] = probe.stop()
            runners.append(r)
        except Exception as e:
            log(f"  skip epoch for {spec}: {e}")
            rows.append({"kind": "skipped", "model": model, "spec": repr(spec), "case": "epoch",
                         "reason": str(e)})
    times = {_key(r): [] for r in runners}
    load0 = load_snapshot()
    for rep in range(cfg.epoch_repeats):
        for r in runners:
            times[_key(r)].append(_timed_epoch(r, 1 + rep))
    load1 = load_snapshot()
    for r in runners:
        wall, cpu = (list(t) for t in zip(*times[_key(r)]))
        s, n, bs = summarize(wall), r.n_train, r.settings["batch_size"]
        row = {**_base_row("epoch", model, r, cfg.dtype, bs), "train_samples": n,
               "steps": -(-n // bs), "samples": wall, **s, "cpu_samples": cpu,
               "cpu_median_s": summarize(cpu)["median_s"], "samples_per_s": n / s["median_s"],
               "memory": mems[_key(r)], "load": [load0, load1],
               **_flop_fields(impls.epoch_flops(impls.flops_model(model), n, bs), s["median_s"])}
        rows.append(row)
        log(f"  {model} epoch {r.impl:<18} {s['median_s']:8.3f} s median of {s['n']} "
            f"(min {s['min_s']:.3f}, max {s['max_s']:.3f}; CPU {row['cpu_median_s']:.3f} s)")
    return rows


#: test accuracies timed per model; the MLP stops once it has both, cnn-fast runs its whole
#: schedule (issue 16's target is default training: >= 99.0% within 60 s of summed epoch time)
THRESHOLDS = {"mlp": (0.97, 0.98), "cnn-fast": (0.99,)}


def accuracy_cases(model, specs, data, cfg, log=print) -> list[dict]:
    """Train with the model's CLI defaults (``impls.settings``), evaluate test accuracy after
    each epoch (evaluation time excluded from the training clock); the MLP stops once every
    threshold is reached, cnn-fast runs all its epochs. Samples/s, FLOP/s and % of peak are
    over the whole training clock."""
    state = impls.reference_state(model, cfg.dtype)
    thresholds, st, rows = THRESHOLDS[model], impls.settings(model), []
    for spec in specs:
        if spec.kind == "nnx" and spec.backend == "strict":
            continue  # correctness-only backend: minutes per epoch
        try:
            r = make_runner(spec, model, state, cfg.dtype).load_data(data)
        except Exception as e:
            rows.append({"kind": "skipped", "model": model, "spec": repr(spec), "case": "accuracy",
                         "reason": str(e)})
            continue
        load0 = load_snapshot()
        train_clock, history, reached = 0.0, [], {}
        for epoch in range(st["epochs"]):
            dt, cpu_dt = _timed_epoch(r, epoch)
            train_clock += dt
            t1 = time.perf_counter()
            acc = r.test_accuracy()
            history.append({"epoch": epoch + 1, "epoch_s": dt, "epoch_cpu_s": cpu_dt,
                            "train_clock_s": train_clock,
                            "eval_s": time.perf_counter() - t1, "test_acc": acc})
            for th in thresholds:
                if acc >= th and th not in reached:
                    reached[th] = {"epochs": epoch + 1, "train_s": train_clock,
                                   "wall_s_with_eval": train_clock + sum(h["eval_s"] for h in history)}
            log(f"  {model} accuracy {r.impl:<18} epoch {epoch + 1:>2} {dt:7.2f} s "
                f"test acc {100 * acc:.2f}%")
            if len(reached) == len(thresholds) and model == "mlp":
                break
        log(f"  {model} accuracy {r.impl:<18} {len(history)} epochs {train_clock:.2f} s, final "
            f"{100 * acc:.2f}%; " + ", ".join(f"{th:.1%} " + (f"in {v['train_s']:.2f} s" if v else
                                              "not reached") for th, v in
                                              ((th, reached.get(th)) for th in thresholds)))
        flops = len(history) * impls.epoch_flops(impls.flops_model(model), r.n_train,
                                                 st["batch_size"])
        rows.append({"kind": "time_to_accuracy", "model": model, "impl": r.impl,
                     "device": r.device, "dtype": cfg.dtype, "batch_size": st["batch_size"],
                     "settings": st,
                     "history": history, "final_test_acc": history[-1]["test_acc"],
                     "thresholds": {f"{th:.2f}": reached.get(th) for th in thresholds},
                     "epochs_run": len(history), "train_samples": r.n_train,
                     "train_clock_s": train_clock,
                     "samples_per_s": len(history) * r.n_train / train_clock,
                     "load": [load0, load_snapshot()], **_flop_fields(flops, train_clock)})
    return rows


# --- CNN layers ----------------------------------------------------------------------------
def _cnn_layer_table():
    from nnx.layers import BatchNorm, Conv2D, Dense, MaxPool2D, ReLU

    import torch.nn as nn

    return [
        ("conv 1→32 k3 p1", (1, 28, 28), lambda: Conv2D(1, 32, 3, padding=1), lambda: nn.Conv2d(1, 32, 3, padding=1)),
        ("batchnorm 32", (32, 28, 28), lambda: BatchNorm(32), lambda: nn.BatchNorm2d(32)),
        ("relu 32x28x28", (32, 28, 28), lambda: ReLU(), lambda: nn.ReLU()),
        ("maxpool 2 (32x28x28)", (32, 28, 28), lambda: MaxPool2D(2), lambda: nn.MaxPool2d(2)),
        ("conv 32→64 k3 p1", (32, 14, 14), lambda: Conv2D(32, 64, 3, padding=1), lambda: nn.Conv2d(32, 64, 3, padding=1)),
        ("batchnorm 64", (64, 14, 14), lambda: BatchNorm(64), lambda: nn.BatchNorm2d(64)),
        ("maxpool 2 (64x14x14)", (64, 14, 14), lambda: MaxPool2D(2), lambda: nn.MaxPool2d(2)),
        ("dense 3136→128", (3136,), lambda: Dense(3136, 128), lambda: nn.Linear(3136, 128)),
    ]


def layer_cases(specs, cfg, batch=128, log=print) -> list[dict]:
    """Single CNN layers at MNIST shapes: forward+backward (training mode) and forward
    (inference), nnx on each CPU/GPU backend vs the torch layer with autograd."""
    import numpy as np

    try:
        import torch
    except ImportError:
        return [{"kind": "skipped", "case": "cnn layers", "reason": "torch not installed"}]
    from nnx.backends import get_backend

    rows, rng, host = [], np.random.default_rng(0), get_backend("numpy", "cpu")
    for name, shape, make_nnx, make_torch in _cnn_layer_table():
        x_np = rng.standard_normal((batch, *shape)).astype(cfg.dtype)
        cases = {}
        layer = make_nnx()  # built on NumPy to learn its output shape
        flops_fwd = impls.layer_flops(layer, layer.build(host, host.float32, host.host_rng(0), shape), batch)
        for spec in specs:
            if spec.kind == "plain-numpy":
                continue
            try:
                if spec.kind == "nnx":
                    b = _nnx_backend(spec)
                    layer = make_nnx()
                    out_shape = layer.build(b, b.dtype(cfg.dtype), b.host_rng(0), shape)
                    x = b.from_numpy(x_np)
                    g = b.from_numpy(rng.standard_normal((batch, *out_shape)).astype(cfg.dtype))

                    def fb(layer=layer, x=x, g=g):
                        layer.forward(x, train=True)
                        layer.backward(g)

                    def fwd(layer=layer, x=x):
                        layer.forward(x, train=False)

                    key, sync = f"nnx-{b.name}", b.synchronize
                    dev = impls.device_label(b)
                else:
                    d = torch.device(spec.device)
                    mod = make_torch().to(d, getattr(torch, cfg.dtype))
                    x = torch.from_numpy(x_np).to(d).requires_grad_(True)
                    with torch.no_grad():
                        y0 = mod(x)
                    g = torch.from_numpy(rng.standard_normal(tuple(y0.shape)).astype(cfg.dtype)).to(d)

                    def fb(mod=mod, x=x, g=g):
                        mod.train()
                        mod(x).backward(g)

                    def fwd(mod=mod, x=x):
                        mod.eval()
                        with torch.inference_mode():
                            mod(x)

                    key = "torch-ref"
                    sync = (lambda d=d: torch.cuda.synchronize(d)) if d.type == "cuda" else (lambda: None)
                    dev = str(d)
                key = f"{key}@{dev}"
                cases[("fwd+bwd", key)] = (fb, sync)
                cases[("fwd", key)] = (fwd, sync)
            except Exception as e:
                rows.append({"kind": "skipped", "case": f"layer {name}", "spec": repr(spec),
                             "reason": str(e)})
        res = measure_interleaved(cases, warmup=cfg.warmup, repeats=cfg.repeats, min_time=cfg.min_time)
        for (mode, key), s in res.items():
            impl, dev = key.split("@")
            row = {"kind": "layer", "model": "cnn", "layer": name, "mode": mode, "impl": impl,
                   "device": dev, "dtype": cfg.dtype, "batch_size": batch,
                   "input_shape": [batch, *shape], **s, "samples_per_s": batch / s["median_s"]}
            # forward + backward with the input gradient: 3 × the forward (0 for element-wise layers)
            flops = flops_fwd * (3 if mode == "fwd+bwd" else 1)
            row.update(_flop_fields(flops, s["median_s"]))
            rows.append(row)
            log(f"  layer {name:<22} {mode:<8} {impl:<12} {dev:<6} {1e3 * s['median_s']:9.3f} ms")
    return rows
