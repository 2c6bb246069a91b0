"""results.json → results.md (tables with ratios against the PyTorch reference) and PNG charts."""
from __future__ import annotations

import json
import os
from pathlib import Path

from nnx.checkpoint import atomic_write_bytes

MIB = 2.0 ** 20


def _fmt(v, spec=".3f", none="–"):
    return none if v is None else format(v, spec)


def _key(r):
    return (r["impl"], r["device"])


def _label(impl, device):
    return f"{impl} ({device})"


def _rows(results, kind, **match):
    return [r for r in results["cases"] if r.get("kind") == kind
            and all(r.get(k) == v for k, v in match.items())]


def _ref(rows, row):
    """The torch-ref row for the same case on the same device (or None)."""
    for r in rows:
        if (r["impl"] == "torch-ref" and r["device"] == row["device"]
                and r.get("batch_size") == row.get("batch_size") and r.get("model") == row.get("model")):
            return r["median_s"]
    return None


def _model_desc(model):
    return {"mlp": "MLP 784-128-64-10 ReLU",
            "cnn": "CNN conv(1→32)-BN-ReLU-pool-conv(32→64)-BN-ReLU-pool-Dense(3136→128)-ReLU-Dense(128→10)",
            "cnn-fast": "cnn-fast preset conv(1→16)-pool-BN-ReLU-conv(16→32)-pool-BN-ReLU-"
                        "Dense(1568→128)-ReLU-Dense(128→10)"}[model]


def _settings_desc(s) -> str:
    """'Nesterov lr 0.1, momentum 0.9, wd 5e-4, cosine over 10 epochs, batch 128, seed 0'."""
    opt = s["optimizer"].capitalize() + f" lr {s['lr']:g}"
    if s["optimizer"] in ("momentum", "nesterov"):
        opt += f", momentum {s['momentum']:g}"
    return (f"{opt}, wd {s['weight_decay']:g}, {s['schedule']} over {s['epochs']} epochs, "
            f"batch {s['batch_size']}, seed 0")


def _rate_cells(r) -> str:
    """GFLOP/s and % of the measured peak, as two table cells."""
    rate, frac = r.get("flop_per_s"), r.get("frac_measured_peak")
    return f"{_fmt(rate / 1e9 if rate else None, '.2f')} | {_fmt(100 * frac if frac else None, '.1f')}"


def _mem_cell(r) -> str:
    mem = r.get("memory", {}).get("rss_peak_extra_bytes")
    return _fmt(mem / MIB if mem is not None else None, ".1f")


def machine_lines(results) -> list[str]:
    m = results["machine"]
    cpu = m["cpu"]
    th = m["threads"]
    pools = th.get("threadpools")
    blas = ", ".join(f"{p.get('internal_api')} {p.get('version') or ''} "
                     f"{p.get('architecture') or ''} ({p.get('num_threads')} threads)".replace("  ", " ")
                     for p in pools) if isinstance(pools, list) else str(pools)
    env = ", ".join(f"{k}={v}" for k, v in m["env"].items() if v is not None) or "none set"
    lines = [
        f"- **Command**: `{results['command']}`",
        f"- **When**: {results['created']}; quick mode: {results['config']['quick']}; "
        f"data: {results['data']}",
        f"- **CPU**: {cpu['model']} (family {cpu.get('family')}, model {cpu.get('model_id')}), "
        f"{cpu['usable_cores']} cores usable, {cpu.get('mhz')} MHz, SIMD {', '.join(cpu['simd_flags'])}; "
        f"memory {(m['memory_bytes'] or 0) / 2**30:.1f} GiB; {m['os']}",
        f"- **GPUs**: {', '.join(g['name'] for g in m['gpus']) or 'none'}",
        f"- **Load** (1/5/15-min load average; CPU pressure): start {results['load_start']['loadavg_1_5_15']} "
        f"({results['load_start']['cpu_pressure']}); end {results['load_end']['loadavg_1_5_15']} "
        f"({results['load_end']['cpu_pressure']})",
        f"- **Threads**: {blas}; torch intra-op threads {th.get('torch_num_threads', '–')}; "
        f"--threads {results['config'].get('threads') or 'library defaults'}",
        f"- **Environment**: {env}",
        "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
    ]
    threads = results["config"].get("threads")
    theory = cpu["theoretical_peak_fp32_flops"]
    lines.append(f"- **Theoretical fp32 peak**: {_fmt((theory or 0) / 1e9, '.1f')} GFLOP/s = "
                 f"{cpu['theoretical_peak_assumption']}"
                 + (f"; {theory * min(threads, cpu['usable_cores']) / cpu['usable_cores'] / 1e9:.1f}"
                    f" for --threads {threads}" if threads and theory else ""))
    for key, p in results["peaks"]["best"].items():
        lines.append(f"- **Measured peak {key}** (the '% peak' columns): "
                     f"{p['flop_per_s'] / 1e9:.1f} GFLOP/s, {p['source']}")
    return lines


def step_table(results, kind, model) -> list[str]:
    rows = _rows(results, kind, model=model)
    if not rows:
        return []
    rows.sort(key=lambda r: (r["device"], r["batch_size"], r["impl"]))
    title = "Training step" if kind == "train_step" else "Inference (forward only)"
    what = ("forward + loss + backward + optimizer update on one batch: Nesterov, Adam for "
            "cnn-fast" if kind == "train_step" else "forward pass in evaluation mode")
    out = [f"### {title}: {_model_desc(model)}, {rows[0]['dtype']}", "",
           f"Time per step ({what}); median of {rows[0]['n']} samples, each the mean of "
           "`inner` back-to-back calls; IQR = interquartile range; CPU = this process's CPU time "
           "per call (median). × torch-ref = time / PyTorch eager's time on the same device "
           "(< 1: faster than PyTorch)."
           + (" nnx's step is the Trainer's: `model.backward(grad, input_grad=False)` (no input "
              "gradient for the first layer, like autograd and the plain loop); `+dx0` rows "
              "(`--with-input-grad`) compute it too." if kind == "train_step" else ""), "",
           "| device | batch | impl | median ms | IQR ms | CPU ms | samples/s | GFLOP/s | % peak | × torch-ref | extra RSS MiB |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = _ref(rows, r)
        out.append(f"| {r['device']} | {r['batch_size']} | {r['impl']} | {1e3 * r['median_s']:.3f} | "
                   f"{1e3 * r['iqr_s']:.3f} | {_fmt(1e3 * r['cpu_median_s'] if r.get('cpu_median_s') else None)} | "
                   f"{r['samples_per_s']:,.0f} | {_rate_cells(r)} | "
                   f"{_fmt(r['median_s'] / ref if ref else None, '.2f')} | {_mem_cell(r)} |")
    gpu = [r for r in rows if r.get("memory", {}).get("gpu_pool_used_bytes") is not None
           or r.get("memory", {}).get("gpu_peak_allocated_bytes") is not None]
    if gpu:
        out += ["", "GPU memory after warm-up (CuPy pool used / torch peak allocated), MiB: " + ", ".join(
            f"{r['impl']} bs {r['batch_size']}: "
            f"{(r['memory'].get('gpu_pool_used_bytes') or r['memory'].get('gpu_peak_allocated_bytes') or 0) / MIB:.1f}"
            for r in gpu)]
    return out + [""]


def epoch_table(results, model) -> list[str]:
    rows = _rows(results, "epoch", model=model)
    if not rows:
        return []
    plain = {r["device"]: r["median_s"] for r in rows if r["impl"] == "plain-numpy"}
    out = [f"### Full training epoch: {_model_desc(model)}, batch {rows[0]['batch_size']}, "
           f"{rows[0]['train_samples']:,} samples", "",
           f"Median of {rows[0]['n']} epochs after one warm-up epoch (shuffle, gather, step, "
           "on-device running loss/accuracy; no evaluation). nnx runs through "
           "`nnx.trainer.Trainer`, which always skips the first layer's input gradient "
           "(`--with-input-grad` does not apply here).", "",
           "| device | impl | median s | min–max s | CPU s | samples/s | GFLOP/s | % peak | × torch-ref | × plain-numpy | extra RSS MiB |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["device"], r["median_s"])):
        ref, p = _ref(rows, r), plain.get(r["device"])
        out.append(f"| {r['device']} | {r['impl']} | {r['median_s']:.3f} | {r['min_s']:.3f}–{r['max_s']:.3f} | "
                   f"{_fmt(r.get('cpu_median_s'))} | {r['samples_per_s']:,.0f} | {_rate_cells(r)} | "
                   f"{_fmt(r['median_s'] / ref if ref else None, '.2f')} | "
                   f"{_fmt(r['median_s'] / p if p else None, '.2f')} | {_mem_cell(r)} |")
    return out + [""]


def accuracy_table(results, model) -> list[str]:
    rows = _rows(results, "time_to_accuracy", model=model)
    if not rows:
        return []
    ths = list(rows[0]["thresholds"])
    s = rows[0].get("settings") or {"optimizer": "nesterov", "lr": 0.1, "momentum": 0.9,
                                    "weight_decay": 5e-4, "schedule": "cosine", "epochs": 10,
                                    "batch_size": 128}
    head = "| device | impl | " + " | ".join(f"epochs to {float(t):.0%} | train s to {float(t):.0%}" for t in ths)
    out = [f"### Time to accuracy: {_model_desc(model)}, CLI defaults ({_settings_desc(s)})", "",
           "Test accuracy evaluated after every epoch; the clock counts training only "
           f"(evaluation excluded; train s = summed epoch time of the epochs run, "
           f"{'stopping once every threshold is reached' if model == 'mlp' else 'all of them'}); "
           f"'–' = not reached within {s['epochs']} epochs. Samples/s, GFLOP/s and "
           "% peak: over all epochs run, on the training clock.", "",
           head + " | final test acc | epochs run | train s | samples/s | GFLOP/s | % peak |",
           "|---|---|" + "---:|---:|" * len(ths) + "---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{v['epochs']} | {v['train_s']:.2f}" if v else "– | –"
                 for v in (r["thresholds"][t] for t in ths)]
        out.append(f"| {r['device']} | {r['impl']} | " + " | ".join(cells)
                   + f" | {100 * r['final_test_acc']:.2f}% | {len(r['history'])} | "
                   f"{_fmt(r.get('train_clock_s'), '.2f')} | "
                   f"{_fmt(r.get('samples_per_s'), ',.0f')} | {_rate_cells(r)} |")
    return out + [""]


def layer_table(results) -> list[str]:
    rows = _rows(results, "layer")
    if not rows:
        return []
    impls = sorted({(r["impl"], r["device"]) for r in rows})
    out = ["### CNN layers, batch 128, MNIST shapes", "",
           "Median ms per call. fwd+bwd = training-mode forward then backward with a given "
           "output gradient (torch: autograd, input requires grad); fwd = evaluation-mode forward. "
           "Each row's samples/s, FLOP/s and % of peak are in results.json (conv and Dense "
           "count 2 FLOP per multiply-add, fwd+bwd = 3 × fwd; the element-wise layers count 0).", "",
           "| layer | mode | " + " | ".join(_label(*k) for k in impls) + " | nnx-numpy / torch-ref |",
           "|---|---|" + "---:|" * len(impls) + "---:|"]
    for layer, mode in dict.fromkeys((r["layer"], r["mode"]) for r in rows):
        cell = {(r["impl"], r["device"]): r["median_s"] for r in rows
                if r["layer"] == layer and r["mode"] == mode}
        a, b = cell.get(("nnx-numpy", "cpu")), cell.get(("torch-ref", "cpu"))
        out.append(f"| {layer} | {mode} | " + " | ".join(_fmt(1e3 * cell[k] if k in cell else None)
                                                       for k in impls)
                   + f" | {_fmt(a / b if a and b else None, '.2f')} |")
    return out + [""]


def flop_lines(results) -> list[str]:
    out = ["### FLOP count", "",
           "Counted: matmuls and convolutions, 2 FLOP per multiply-add. Dense forward 2·N·in·out; "
           "backward 4·N·in·out (dW = gᵀx and dx = gW); Conv2D forward 2·N·O·Ho·Wo·C·k², "
           "backward twice that. A training step is 3 × the forward minus the first layer's "
           "input gradient (as large as that layer's forward), which nnx's Trainer, autograd "
           "and the plain loop all skip; `+dx0` rows (`--with-input-grad`) are counted with "
           "it. Element-wise work (bias, ReLU, softmax, batch norm, pooling, the optimizer) is "
           "not counted (~1% for the MLP)."]
    for model, f in results.get("flops_per_sample", {}).items():
        out.append(f"- {model}: forward {f['forward']:,} FLOP per sample, training step "
                   f"{f['train_step']:,} FLOP per sample"
                   + (f" ({f['train_step_with_input_grad']:,} with the first layer's input gradient)"
                      if f.get("train_step_with_input_grad") else ""))
    return out + [""]


#: a timed row whose interquartile range exceeds this fraction of its median is called noisy
NOISY_IQR = 0.10


def row_name(r) -> str:
    where = r.get("layer") and f"{r['layer']} {r['mode']}" or f"{r['kind']} batch {r.get('batch_size')}"
    return f"{r.get('model', '')} {where} {r['impl']}@{r['device']}".strip()


def noisy_rows(rows) -> list[dict]:
    """Timed rows (steps, inference, epochs, layers) whose IQR is above ``NOISY_IQR`` of the
    median: their ratios can move that much between runs on this machine."""
    return [{"row": row_name(r), "iqr_over_median": r["iqr_s"] / r["median_s"]} for r in rows
            if r.get("median_s") and r.get("iqr_s") is not None and r["iqr_s"] > NOISY_IQR * r["median_s"]]


def noise_lines(results) -> list[str]:
    timed = [r for r in results["cases"] if r.get("median_s") and r.get("iqr_s") is not None]
    noisy = noisy_rows(timed)
    if not noisy:
        return [f"**Noise**: every timed row's IQR is within {NOISY_IQR:.0%} of its median.", ""]
    worst = sorted(noisy, key=lambda n: -n["iqr_over_median"])[:6]
    return [f"**Noise**: {len(noisy)} of {len(timed)} timed rows have an IQR above "
            f"{NOISY_IQR:.0%} of their median (worst: "
            + "; ".join(f"{n['row']} {n['iqr_over_median']:.0%}" for n in worst)
            + "). Ratios involving them can move by that much between runs: rerun with more "
            "`--repeats`/`--epoch-repeats`, or on a quieter machine, before drawing conclusions.", ""]


def write_json(path, obj) -> None:
    """Results as indented JSON, written atomically (temp file, then rename)."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=str).encode())


def write_markdown(results, path) -> Path:
    lines = ["# nnx benchmark results", ""] + machine_lines(results) + [""]
    if results.get("warnings"):
        lines += ["**Warnings**: " + "; ".join(results["warnings"]), ""]
    lines += noise_lines(results)
    lines += flop_lines(results)
    for model in results["config"]["models"]:
        lines += step_table(results, "train_step", model)
        lines += step_table(results, "inference", model)
        lines += epoch_table(results, model)
        lines += accuracy_table(results, model)
    lines += layer_table(results)
    skipped = _rows(results, "skipped")
    if skipped:
        lines += ["### Skipped", ""] + [f"- {s.get('spec', '')} {s.get('case', '')} "
                                        f"{s.get('batch_size', '')}: {s['reason']}" for s in skipped] + [""]
    if results.get("charts"):
        lines += ["### Charts", ""] + [f"![{c}]({c})" for c in results["charts"]] + [""]
    path = Path(path)
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


# --- charts --------------------------------------------------------------------------------
_STYLE = {"nnx-numpy": ("tab:blue", "o"), "nnx-torch": ("tab:orange", "s"),
          "nnx-strict": ("tab:gray", "x"), "nnx-cupy": ("tab:green", "^"),
          "torch-ref": ("tab:red", "D"), "plain-numpy": ("tab:purple", "v")}


def _style(impl, device):
    base = impl.split("+")[0]  # "nnx-numpy+dx0" (--with-input-grad) keeps nnx-numpy's colour
    color, marker = _STYLE.get(base, ("black", "."))
    ls = "--" if str(device).startswith("cuda") else "-"
    return dict(color=color, marker=marker, linestyle=ls)


def _log_y(ax, fine=False):
    """A log y axis labelled with plain decimals (not 10^k); ``fine``: every 1..9 step."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    subs = tuple(float(k) for k in range(1, 10)) if fine else (1.0, 2.0, 5.0)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _batch_axes(ax, xs, ylabel, title):
    """Log-log axes over batch sizes, labelled with the batch sizes themselves."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    _log_y(ax, fine=not (lo > 0 and hi / lo >= 10))  # under a decade: label every 1..9 step
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def accuracy_ylim(rows) -> tuple[float, float]:
    """Test-accuracy axis (%) around the data, whatever range it covers (a quick run's 60-90%
    as well as a full run's 96-98.5%), with a margin, never above 100."""
    accs = [100 * h["test_acc"] for r in rows for h in r["history"]]
    lo, hi = min(accs), max(accs)
    pad = max(0.25, 0.08 * (hi - lo))
    return max(0.0, lo - pad), min(100.0, hi + pad)


def charts(results, out_dir) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir, written = Path(out_dir), []

    def save(fig, name):
        """Write the chart atomically (temp file, then rename) and close it."""
        tmp = out_dir / f".{name}.tmp-{os.getpid()}.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, out_dir / name)
        written.append(name)

    for model in results["config"]["models"]:
        panels = [(k, _rows(results, k, model=model)) for k in ("train_step", "inference")]
        if any(rows for _, rows in panels):
            fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
            for ax, (kind, rows) in zip(axes, panels):
                series = {}
                for r in rows:
                    series.setdefault(_key(r), []).append((r["batch_size"], r["median_s"], r["q1_s"], r["q3_s"]))
                for (impl, dev), pts in sorted(series.items()):
                    pts.sort()
                    ax.errorbar([p[0] for p in pts], [1e3 * p[1] for p in pts], capsize=3,
                                yerr=[[1e3 * (p[1] - p[2]) for p in pts], [1e3 * (p[3] - p[1]) for p in pts]],
                                label=_label(impl, dev), **_style(impl, dev))
                _batch_axes(ax, sorted({r["batch_size"] for r in rows}),
                            "time per call (ms, median; bars: IQR)",
                            ("training step" if kind == "train_step" else "inference (forward)")
                            + f" — {model}")
            fig.suptitle(f"{_model_desc(model)}, {results['config']['dtypes'][0]} — "
                         f"{results['machine']['cpu']['model']}", fontsize=10)
            save(fig, f"step_time_{model}.png")

        # GPU speed-up over the CPU (nnx-numpy on the CPU is the baseline)
        train = _rows(results, "train_step", model=model)
        base = {r["batch_size"]: r["median_s"] for r in train
                if r["impl"] == "nnx-numpy" and r["device"] == "cpu"}
        series = {}
        for r in train:
            if str(r["device"]).startswith("cuda") and r["batch_size"] in base:
                series.setdefault(_key(r), []).append((r["batch_size"], base[r["batch_size"]] / r["median_s"]))
        if series:
            fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
            for (impl, dev), pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=_label(impl, dev),
                        **_style(impl, dev))
            ax.axhline(1.0, color="black", linewidth=0.8)
            _batch_axes(ax, sorted(base), "speed-up over nnx-numpy on the CPU (training step)",
                        f"GPU speed-up — {model}")
            save(fig, f"gpu_speedup_{model}.png")

        ep = sorted(_rows(results, "epoch", model=model), key=lambda r: r["median_s"])
        if ep:
            fig, ax = plt.subplots(figsize=(7, 0.9 + 0.5 * len(ep)), constrained_layout=True)
            ax.barh([_label(r["impl"], r["device"]) for r in ep], [r["median_s"] for r in ep],
                    xerr=[[r["median_s"] - r["min_s"] for r in ep], [r["max_s"] - r["median_s"] for r in ep]],
                    capsize=4, color=[_style(r["impl"], r["device"])["color"] for r in ep])
            for i, r in enumerate(ep):
                ax.text(r["max_s"], i, f"  {r['median_s']:.2f} s", va="center", ha="left", fontsize=8)
            ax.set_xlim(0, max(r["max_s"] for r in ep) * 1.3)
            ax.invert_yaxis()
            ax.set_xlabel("seconds per epoch (median; bars: min–max)")
            ax.set_title(f"MNIST training epoch, batch 128 — {model}", fontsize=10)
            save(fig, f"epoch_time_{model}.png")

        acc = _rows(results, "time_to_accuracy", model=model)
        if acc:
            fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
            for r in acc:
                h = r["history"]
                ax.plot([p["train_clock_s"] for p in h], [100 * p["test_acc"] for p in h],
                        label=_label(r["impl"], r["device"]), **_style(r["impl"], r["device"]))
            lo, hi = accuracy_ylim(acc)
            for th in acc[0]["thresholds"]:
                if lo <= 100 * float(th) <= hi:
                    ax.axhline(100 * float(th), color="gray", linewidth=0.8, linestyle=":")
            ax.set_ylim(lo, hi)
            ax.set_xlabel("training time (s, evaluation excluded)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"Test accuracy vs training time — {model}, CLI defaults", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
            save(fig, f"accuracy_vs_time_{model}.png")

    fb = [r for r in _rows(results, "layer") if r["mode"] == "fwd+bwd"]
    if fb:
        names = list(dict.fromkeys(r["layer"] for r in fb))
        impls = sorted({_key(r) for r in fb})
        fig, ax = plt.subplots(figsize=(10, 5), constrained_layout=True)
        width = 0.8 / len(impls)
        for j, k in enumerate(impls):
            vals = {r["layer"]: r["median_s"] for r in fb if _key(r) == k}
            ax.bar([i + j * width for i in range(len(names))],
                   [1e3 * vals.get(n, float("nan")) for n in names], width, label=_label(*k),
                   color=_style(*k)["color"])
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        _log_y(ax)
        ax.set_ylabel("ms per forward+backward (median)")
        ax.set_title("CNN layers at batch 128, MNIST shapes")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "cnn_layers.png")
    return written
