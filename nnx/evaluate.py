"""``python -m nnx.evaluate RUN_OR_CHECKPOINT``: how good is a trained model, and where does
it go wrong?

Runs the model over the whole test set (2,048 images at a time) and reports accuracy,
per-class precision / recall / F1, the most-confused class pairs and the confusion matrix;
draws the plots of ``nnx.plots`` and writes ``report.md`` (embedding them) and
``evaluation.json`` into the run folder, or ``--out DIR``. ``--json`` prints the numbers
only, as JSON on stdout. See docs/evaluate.md.

Library use::

    from nnx.evaluate import evaluate
    result = evaluate("runs/20260101-120000")          # dict, see ``evaluate``
    result["accuracy"], result["most_confused"][:3]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from . import plots as _plots
from .errors import cli_main as _cli_main
from .errors import check_out_dir as _check_out_dir
from .errors import debug_requested as _debug_requested
from . import runs as _runs


class EvaluateError(ValueError):
    """The model cannot be evaluated on this data (wrong input size, class count...)."""


def _one_line(msg) -> str:
    """Collapse a (possibly multi-line) error message into one line."""
    parts = [p.strip() for p in str(msg).splitlines() if p.strip()]
    out = ""
    for part in parts:
        out += ("" if not out else " " if out.endswith((":", ".")) else "; ") + part
    return out or "unknown error"


def _run_root(path: Path) -> Path | None:
    """The run folder a path belongs to (the nearest folder, up to two levels up, with
    config.json), if any."""
    folder = path if path.is_dir() else path.parent
    for candidate in (folder, *list(folder.parents)[:2]):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _describe(model) -> str:
    dense = [l for l in model.layers if type(l).__name__ == "Dense"]
    if dense and len(dense) == sum(1 for l in model.layers if l.named_parameters()):
        sizes = [dense[0].in_features] + [d.out_features for d in dense]
        return " → ".join(map(str, sizes)) + " MLP"
    return repr(model)


def class_report(counts) -> tuple[list[dict], dict]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows = truth);
    plus their unweighted (macro) averages. A class never predicted has precision 0."""
    counts = np.asarray(counts, dtype=np.int64)
    tp = np.diag(counts).astype(np.float64)
    support = counts.sum(axis=1)
    predicted = counts.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    rows = [{"class": c, "precision": float(precision[c]), "recall": float(recall[c]),
             "f1": float(f1[c]), "support": int(support[c])} for c in range(len(tp))]
    macro = {"precision": float(precision.mean()), "recall": float(recall.mean()),
             "f1": float(f1.mean()), "support": int(support.sum())}
    return rows, macro


def most_confused(counts, top: int = 10) -> list[dict]:
    """The ``top`` largest off-diagonal cells: [{"true", "pred", "count"}], largest first."""
    counts = np.asarray(counts)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:top]
    out = []
    for i in flat:
        t, p = divmod(int(i), counts.shape[1])
        if off[t, p] > 0:
            out.append({"true": t, "pred": p, "count": int(off[t, p])})
    return out


def _place(backend) -> tuple[str, str]:
    """(library, device label) of a built backend: 'cpu', 'cuda:0', or array-api-strict's own
    device name."""
    dev = backend.device
    return backend.name, str(getattr(dev, "_device", dev))


def _check_own_backend(model, backend, device) -> None:
    """An in-memory model runs where it was built: ``backend``/``device`` (which choose where a
    loaded path runs) may only name that place."""
    own = getattr(model, "backend", None)
    if own is None or (backend is None and device is None):
        return
    name, label = _place(own)
    if hasattr(backend, "name") and hasattr(backend, "device"):  # a built backend
        asked_name, asked_device = _place(backend)
    else:
        asked_device = label if device is None else str(device)
        asked_name = name if backend is None else str(backend).lower()
        if asked_name == "auto":  # the selector's rule (nnx.backends.get_backend)
            from .backends.selector import _is_cuda

            asked_name = "cupy" if _is_cuda(asked_device.lower()) else "numpy"
    if name != "strict":
        asked_device = asked_device.lower()
    same_device = asked_device == label or (asked_device == "cuda" and label.startswith("cuda"))
    if asked_name != name or not same_device:
        raise EvaluateError(f"this model was built on {name} ({label}); backend and device "
                            f"choose where a model loaded from a path runs, so give evaluate "
                            f"the run folder or .safetensors file to evaluate on {asked_name} "
                            f"({asked_device})")


def evaluate(model_or_path, dataset: str | None = None, data_dir=None, backend=None,
             device: str | None = None, out_dir=None, plots: bool = True,
             download: bool = True, batch_size: int = 2048, log=None,
             full_test: bool = False) -> dict:
    """Evaluate a model (a ``Sequential``, or a run folder / checkpoint folder / .safetensors
    file loaded with ``nnx.load``) on a test set.

    ``dataset`` defaults to the run's (config.json), else ``"mnist"``; ``data_dir`` to the
    run's data folder when it still exists, else the usual search ($NNX_DATA_DIR, cache...).
    Files (the PNGs of ``nnx.plots`` unless ``plots=False``, ``report.md``,
    ``evaluation.json``) go to ``out_dir``; by default to the folder given (or the folder of
    the .safetensors file); nothing is written for an in-memory model without ``out_dir``.
    A run trained with ``--limit N`` is scored on the test images its training scored (the
    first N // 6, as ``nnx.data.make_splits`` takes them), so results.json, the run's plots
    and this agree; ``full_test=True`` scores the whole test set.

    Returns a JSON-able dict: ``accuracy``, ``loss``, ``samples``, ``errors``, ``per_class``
    (class, precision, recall, f1, support), ``macro_avg``, ``most_confused`` (top 10
    {true, pred, count}), ``confusion_matrix`` (nested lists, rows = true class) and
    ``files`` (written paths).

    Raises ``nnx.checkpoint.CheckpointError`` (missing or non-nnx file),
    ``nnx.datasets.DatasetError`` (data not found) or ``EvaluateError`` (model does not fit).
    """
    from .checkpoint import load, resolve_weights

    source = weights = None
    settings, root = {}, None
    if isinstance(model_or_path, (str, os.PathLike)):
        source = Path(model_or_path)
        weights = resolve_weights(source)
        model = load(source, backend=backend, device=device)
        root = _run_root(source)
        settings = _runs.run_settings(root) if root else {}
        if out_dir is None:
            out_dir = source if source.is_dir() else source.parent
    else:
        model = model_or_path
        if not hasattr(model, "probabilities") or not hasattr(model, "input_shape"):
            raise EvaluateError(f"expected an nnx Sequential or a path, got {type(model).__name__}")
        _check_own_backend(model, backend, device)

    dataset = dataset or settings.get("dataset") or "mnist"
    if data_dir is None and settings.get("dataset", dataset) == dataset:
        data_dir = _runs.settings_data_dir(settings, root)
    in_shape = tuple(model.input_shape)
    if math.prod(in_shape) != 28 * 28:
        raise EvaluateError(f"the model takes inputs of shape {in_shape}; {dataset} images are "
                            "28x28 (784 values)")
    limit = settings.get("limit") if settings.get("dataset", dataset) == dataset else None
    limit = None if full_test else limit
    images, labels = _runs.load_test_images(dataset, data_dir, download=download, limit=limit)
    subset = (f"the first {len(labels):,} test images, the ones the run's --limit "
              f"{int(limit):,} scored" if limit else None)
    probs = _plots.predict_proba(model, images.reshape(len(images), *in_shape), batch_size)
    classes = probs.shape[1]
    if classes < int(labels.max()) + 1:
        raise EvaluateError(f"the model has {classes} outputs but {dataset} has "
                            f"{int(labels.max()) + 1} classes")
    pred = probs.argmax(axis=1)
    counts = _plots.confusion_matrix(labels, pred, classes)
    per_class, macro = class_report(counts)
    p_true = probs[np.arange(len(labels)), labels]
    loss = float(-np.mean(np.log(np.clip(p_true, 1e-12, 1.0))))
    accuracy = float(np.trace(counts) / counts.sum())
    result = {
        "model": str(source) if source else repr(model),
        "weights": str(weights) if weights else None,
        "architecture": _describe(model),
        "backend": str(model.backend),
        "dataset": dataset,
        "split": "test",
        "samples": int(len(labels)),
        "subset": subset,
        "accuracy": accuracy,
        "loss": loss,
        "errors": int(counts.sum() - np.trace(counts)),
        "per_class": per_class,
        "macro_avg": macro,
        "most_confused": most_confused(counts, 10),
        "confusion_matrix": counts.tolist(),
        "files": [],
    }

    if out_dir is not None:
        out_dir = Path(out_dir).expanduser()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EvaluateError(f"cannot create the output folder {out_dir} "
                                f"({e.strerror or e}); choose another --out") from e
        written = []
        if plots:
            final = root is not None and weights is not None and \
                Path(weights).resolve() == (root / "model.safetensors").resolve()
            metrics = _runs.read_metrics(root) if final else None
            written = _plots.write_plots(out_dir, model, images, labels, probs, metrics=metrics,
                                         test_result={"test_loss": loss, "test_acc": accuracy},
                                         class_names=_plots.class_names(dataset), log=log)
        result["files"] = [str(p) for p in written]
        from .checkpoint import atomic_write_bytes, atomic_write_json

        report = out_dir / "report.md"
        atomic_write_bytes(report, render_report(result, [Path(p).name for p in written]).encode())
        evaluation = out_dir / "evaluation.json"
        result["files"] += [str(report), str(evaluation)]
        atomic_write_json(evaluation, result)
    return result


# --- text output ---------------------------------------------------------------------------
CAPTIONS = {
    "loss_curves.png": ("Learning curves",
                        "Training vs validation loss and accuracy per epoch; the star is this "
                        "test result. A validation curve that turns up while training keeps "
                        "falling means overfitting."),
    "first_layer_weights.png": ("First-layer weights",
                                "What each first-layer unit responds to: red pixels excite it, "
                                "blue ones inhibit it. Noise-like tiles are units with tiny "
                                "weights (barely used)."),
    "confusion_matrix.png": ("Confusion matrix",
                             "Rows are the true digit, columns the prediction; off-diagonal "
                             "numbers are mistakes. Colour is the share of the row, log scale."),
    "confident_mistakes.png": ("Most confident mistakes",
                               "Wrong answers the model was surest about: often ambiguous "
                               "or mislabelled digits."),
    "confidence_histogram.png": ("Confidence histogram",
                                 "Probability of the predicted class, correct (green) vs wrong "
                                 "(red), log-scale counts. Wrong answers should sit at low "
                                 "confidence."),
}


def class_table(result) -> str:
    lines = ["class  precision  recall      F1  support"]
    for r in result["per_class"]:
        lines.append(f"{r['class']:>5}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  "
                     f"{r['f1']:>6.4f}  {r['support']:>7,}")
    m = result["macro_avg"]
    lines.append(f"{'macro':>5}  {m['precision']:>9.4f}  {m['recall']:>6.4f}  {m['f1']:>6.4f}  "
                 f"{m['support']:>7,}")
    return "\n".join(lines)


def summary_text(result) -> str:
    acc = result["accuracy"]
    lines = [f"model: {result['model']}  ({result['architecture']}, {result['backend']})",
             f"test accuracy {100 * acc:.2f}%  ({result['samples'] - result['errors']:,} of "
             f"{result['samples']:,} {result['dataset']} test images), loss "
             f"{result['loss']:.4f}, {result['errors']:,} mistakes"]
    if result.get("subset"):
        lines.append(f"({result['subset']}; --full-test scores all of them)")
    lines += ["", class_table(result), "", "most confused (true → predicted: count):"]
    pairs = result["most_confused"]
    lines.append("  " + ",  ".join(f"{p['true']} → {p['pred']}: {p['count']}" for p in pairs)
                 if pairs else "  none")
    return "\n".join(lines)


def render_report(result, pictures) -> str:
    """report.md: the numbers as Markdown tables, then each picture (relative links)."""
    acc = result["accuracy"]
    out = [f"# Evaluation: `{result['model']}`", "",
           f"- model: {result['architecture']} ({result['backend']})",
           f"- weights: `{result['weights']}`" if result.get("weights") else "- weights: in memory",
           f"- data: {result['dataset']} {result['split']} set, {result['samples']:,} images"
           + (f" ({result['subset']})" if result.get("subset") else ""),
           f"- **accuracy {100 * acc:.2f}%** ({result['errors']:,} mistakes), "
           f"cross-entropy loss {result['loss']:.4f}", "",
           "## Per class", "",
           "| class | precision | recall | F1 | support |", "|---:|---:|---:|---:|---:|"]
    for r in result["per_class"]:
        out.append(f"| {r['class']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} "
                   f"| {r['support']:,} |")
    m = result["macro_avg"]
    out += [f"| macro avg | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} "
            f"| {m['support']:,} |", "",
            "Precision: of the images predicted as this class, the share that were right. "
            "Recall: of the images of this class, the share found. F1: their harmonic mean.", "",
            "## Most confused pairs", "", "| true | predicted | count |", "|---:|---:|---:|"]
    out += [f"| {p['true']} | {p['pred']} | {p['count']} |" for p in result["most_confused"]]
    if pictures:
        out += ["", "## Plots"]
        for name in pictures:
            title, caption = CAPTIONS.get(name, (name, ""))
            out += ["", f"### {title}", "", caption, "", f"![{title}]({name})"]
    return "\n".join(out) + "\n"


# --- command line --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .backends import BACKENDS
    from .threads import add_threads_option

    p = argparse.ArgumentParser(
        prog="python -m nnx.evaluate",
        description="Evaluate a trained nnx model on the test set: accuracy, per-class\n"
                    "precision/recall/F1, most-confused pairs, plots and report.md\n"
                    "(docs/evaluate.md explains how to read them).",
        epilog="examples:\n"
               "  python -m nnx.evaluate runs/20260101-120000\n"
               "  python -m nnx.evaluate runs/20260101-120000/checkpoints/epoch-0005 --out eval5\n"
               "  python -m nnx.evaluate model.safetensors --json --no-plots > result.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT",
                   help="run folder, checkpoint folder or nnx .safetensors file")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: auto")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    add_threads_option(p)
    p.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default=None,
                   help="default: the run's dataset, else mnist")
    p.add_argument("--data-dir", default=None, help="folder with the IDX files")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="never download; fail if the data is not found")
    p.add_argument("--out", default=None,
                   help="folder for the plots and report.md (default: the run/checkpoint folder)")
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    p.add_argument("--no-plots", dest="plots", action="store_false",
                   help="no PNGs (report.md and evaluation.json are still written)")
    p.add_argument("--full-test", action="store_true",
                   help="score the whole test set (a run trained with --limit N is otherwise "
                        "scored on the test images its training scored, the first N // 6)")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error (also: NNX_DEBUG=1)")
    return p


@_cli_main
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is not None:  # before any work: a file, a folder inside a file, nowhere to write
        if not args.out.strip():
            parser.error("--out is empty; give a folder (it is created if needed)")
        _check_out_dir(Path(args.out), parser)
    from .threads import set_threads

    set_threads(args.threads)
    from .backends import BackendError
    from .checkpoint import CheckpointError
    from .datasets import DatasetError
    from .errors import ShapeError

    notes = lambda msg: print(f"note: {msg}", file=sys.stderr)
    try:
        result = evaluate(args.model, dataset=args.dataset, data_dir=args.data_dir,
                          backend=args.backend, device=args.device, out_dir=args.out,
                          plots=args.plots, download=args.download, log=notes,
                          full_test=args.full_test)
    except (CheckpointError, DatasetError, EvaluateError, BackendError, ShapeError, OSError,
            ValueError) as e:
        if _debug_requested(argv):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(summary_text(result))
    pngs = [Path(f) for f in result["files"] if f.endswith(".png")]
    if pngs:
        print(f"plots: {', '.join(p.name for p in pngs)}")
    reports = [f for f in result["files"] if f.endswith("report.md")]
    if reports:
        print(f"report: {reports[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
