"""Pictures of a run: learning curves, first-layer weights, confusion matrix, confident
mistakes and a confidence histogram.

Each plotting function (``loss_curves``, ``first_layer_weights``, ``plot_confusion``,
``confident_mistakes``, ``confidence_histogram``) returns a ``matplotlib.figure.Figure``
(a notebook displays it; ``save(fig, path)`` writes a PNG atomically). Figures are built
with the object API on the Agg canvas and never touch pyplot's global state, so this works
without a display.
``plot_run(run_dir)`` draws them all into a run folder; ``python -m nnx.train`` calls it at
the end of training and ``python -m nnx.evaluate`` when evaluating a checkpoint. Reading run
folders (metrics, settings, the test images) is ``nnx.runs``'s job.

The model is only ever run through ``predict_proba`` and read back with ``backend.to_numpy``;
everything drawn is NumPy on the host.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import runs

#: file names plot_run writes, in order
FILES = {"loss_curves": "loss_curves.png", "first_layer_weights": "first_layer_weights.png",
         "confusion_matrix": "confusion_matrix.png", "confident_mistakes": "confident_mistakes.png",
         "confidence_histogram": "confidence_histogram.png"}
DPI = 100
TRAIN_COLOR, VAL_COLOR, TEST_COLOR = "#1f77b4", "#ff7f0e", "#d62728"
RIGHT_COLOR, WRONG_COLOR = "#2ca02c", "#d62728"
#: class names drawn for a data set whose classes are not simply its label numbers
CLASS_NAMES = {"fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")}


def class_names(dataset: str | None) -> list[str] | None:
    """The names to draw for ``dataset``'s classes; None (label numbers) for MNIST's digits."""
    names = CLASS_NAMES.get(str(dataset or "").lower().replace("_", "-"))
    return list(names) if names else None


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path, dpi: int | None = None) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=dpi or fig.dpi)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --- running the model ---------------------------------------------------------------------
from .predict import predict_proba  # noqa: E402  (batched, host NumPy out; re-exported here)


def _images_of(x, backend=None) -> np.ndarray:
    """Host (N, 28, 28)-style images from (N, 784), (N, 1, H, W) or (N, H, W) data."""
    a = x if isinstance(x, np.ndarray) else backend.to_numpy(x)
    a = np.asarray(a)
    if a.ndim == 2:
        side = math.isqrt(a.shape[1])
        if side * side != a.shape[1]:
            raise ValueError(f"cannot show {a.shape[1]} features as square images")
        return a.reshape(-1, side, side)
    if a.ndim == 4:
        return a[:, 0]
    return a


class _DeviceImages:
    """Images left on the device; ``image(i)`` copies one of them to the host when drawn."""

    def __init__(self, x, backend):
        self.x, self.backend = x, backend

    def image(self, i: int) -> np.ndarray:
        return _images_of(self.backend.to_numpy(self.x[int(i):int(i) + 1, ...]))[0]


# --- learning curves -----------------------------------------------------------------------
def loss_curves(metrics: list[dict], test: dict | None = None) -> Figure:
    """Loss (log scale) and accuracy per epoch for training and validation; the test result,
    when given (``{"test_loss", "test_acc"}``), as a marker after the last epoch."""
    fig = _figure(10, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [m["epoch"] for m in metrics]

    def series(key):
        pts = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None]
        return ([e for e, _ in pts], [v for _, v in pts]) if pts else None

    for ax, key, label, scale in ((ax_loss, "loss", "cross-entropy loss", 1),
                                  (ax_acc, "acc", "accuracy (%)", 100)):
        for split, color, style in (("train", TRAIN_COLOR, "-"), ("val", VAL_COLOR, "-")):
            s = series(f"{split}_{key}")
            if s:
                name = {"train": "train", "val": "validation"}[split]
                ax.plot(s[0], [v * scale for v in s[1]], style, marker="o", ms=3.5, color=color,
                        label=name)
        t = (test or {}).get(f"test_{key}")
        if t is not None:
            x = (max(epochs) if epochs else 0) + 0.35
            text = f"test {t:.4f}" if key == "loss" else f"test {100 * t:.2f}%"
            ax.plot([x], [t * scale], marker="*", ms=13, ls="none", color=TEST_COLOR, label=text,
                    zorder=5)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if epochs:
            span = max(epochs) - min(epochs)
            step = max(1, math.ceil((span + 1) / 12))
            ax.set_xticks(range(min(epochs), max(epochs) + 1, step))
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.8)
        if ax.lines:
            ax.legend(loc="best", fontsize=9)
    if ax_loss.lines and all(v > 0 for line in ax_loss.lines for v in line.get_ydata()):
        ax_loss.set_yscale("log")
    ax_loss.set_title("loss (log scale)")
    ax_acc.set_title("accuracy")
    if not metrics:
        ax_loss.text(0.5, 0.5, "no epochs recorded", ha="center", va="center",
                     transform=ax_loss.transAxes)
    last = metrics[-1] if metrics else {}
    bits = [f"{len(metrics)} epochs"]
    if last.get("val_acc") is not None:
        bits.append(f"final validation {100 * last['val_acc']:.2f}%")
    if (test or {}).get("test_acc") is not None:
        bits.append(f"test {100 * test['test_acc']:.2f}%")
    fig.suptitle("Learning curves: " + ", ".join(bits))
    return fig


# --- first-layer weights -------------------------------------------------------------------
def _first_weight_layer(model):
    from .layers import Conv2D, Dense

    for i, layer in enumerate(model.layers):
        if isinstance(layer, (Dense, Conv2D)):
            return i, layer
    raise ValueError(f"{model!r} has no Dense or Conv2D layer to show")


def first_layer_weights(model, scale: str = "tile", max_tiles: int = 128) -> Figure:
    """The first Dense layer's weight rows as 28x28 tiles (one per hidden unit), or the first
    Conv2D's k x k filters. Diverging colours centred on zero: red = positive weight (ink
    there excites the unit), blue = negative. ``scale="tile"`` gives each tile its own
    symmetric colour range (shows every unit's pattern); ``"shared"`` one range for all
    (compares magnitudes)."""
    from .layers import Conv2D

    if scale not in ("tile", "shared"):
        raise ValueError(f"scale must be 'tile' or 'shared', got {scale!r}")
    index, layer = _first_weight_layer(model)
    w = np.asarray(model.backend.to_numpy(layer.weight.value), dtype=np.float64)
    if isinstance(layer, Conv2D):  # (out, in, k, k): one tile per (filter, input channel)
        out_c, in_c, k, _ = w.shape
        tiles = w.reshape(out_c * in_c, k, k)
        what = (f"layer {index} Conv2D: {out_c} filters of {k}x{k}"
                + (f" x {in_c} input channels" if in_c > 1 else ""))
    else:  # Dense (out, in): each row is an image-shaped template when the input is an image
        out_f, in_f = w.shape
        shape = tuple(model.input_shape) if index == 0 or math.prod(model.input_shape) == in_f else ()
        shape = tuple(d for d in shape if d != 1) if shape else shape
        if len(shape) != 2:
            side = math.isqrt(in_f)
            if side * side != in_f:
                raise ValueError(f"layer {index} Dense has {in_f} inputs, not a square image")
            shape = (side, side)
        tiles = w.reshape(out_f, *shape)
        what = f"layer {index} Dense({in_f}, {out_f}): one {shape[0]}x{shape[1]} tile per unit"
    shown = min(len(tiles), max_tiles)
    tiles = tiles[:shown]
    if shown < len(w) * (w.shape[1] if w.ndim == 4 else 1):
        what += f" (first {shown})"
    # one mosaic image (fast, small files): tiles separated by a 1-px NaN gap drawn white
    th, tw = tiles.shape[1:]
    cols = min(16, max(1, math.ceil(math.sqrt(shown * 2))))
    rows = math.ceil(shown / cols)
    gap = 1 if max(th, tw) <= 8 else 2
    mosaic = np.full((rows * (th + gap) - gap, cols * (tw + gap) - gap), np.nan)
    vmax_all = float(np.abs(tiles).max()) or 1.0
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        if scale == "tile":
            tile = tile / (float(np.abs(tile).max()) or 1.0)
        mosaic[r * (th + gap):r * (th + gap) + th, c * (tw + gap):c * (tw + gap) + tw] = tile
    vmax = 1.0 if scale == "tile" else vmax_all
    per_px = max(0.018, min(0.12, 9.0 / mosaic.shape[1]))
    fig = _figure(max(6.5, mosaic.shape[1] * per_px + 1.3), mosaic.shape[0] * per_px + 0.95)
    ax = fig.subplots()
    from matplotlib import colormaps

    cmap = colormaps["RdBu_r"].with_extremes(bad="white")
    im = ax.imshow(mosaic, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if scale == "tile":
        how = "colour scale per tile (each tile / its own max |w|), centred on 0"
        cb_label = "relative weight"
    else:
        how = f"one shared colour scale for all tiles, ±{vmax_all:.3g}"
        cb_label = "weight"
    fig.colorbar(im, ax=ax, shrink=0.7, pad=0.02, label=cb_label)
    ax.set_title(f"First-layer weights: {what}\n{how}\nred = positive, blue = negative, "
                 f"tiles in unit order row by row", fontsize=9.5)
    return fig


# --- confusion matrix ----------------------------------------------------------------------
def confusion_matrix(y_true, y_pred, num_classes: int = 10) -> np.ndarray:
    """``counts[t, p]`` = how many samples of true class t were predicted as p (int64)."""
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} has labels outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def plot_confusion(counts, class_names=None) -> Figure:
    """Counts written in every non-empty cell; colour = share of the true class (row) on a
    log scale, so rare mistakes stay visible beside the ~99 % diagonal."""
    from matplotlib.colors import LogNorm

    counts = np.asarray(counts)
    k = counts.shape[0]
    names = [str(c) for c in (class_names or range(k))]
    rows = counts.sum(axis=1, keepdims=True)
    frac = counts / np.maximum(rows, 1)
    total, correct = int(counts.sum()), int(np.trace(counts))
    size = max(5.5, 0.62 * k + 1.6)
    fig = _figure(size + 1.2, size)
    ax = fig.subplots()
    shown = np.ma.masked_where(counts == 0, frac)
    floor = max(1e-4, 0.5 / max(int(rows.max()), 1))
    im = ax.imshow(shown, cmap="Blues", norm=LogNorm(vmin=floor, vmax=1.0),
                   interpolation="nearest")
    ax.set_facecolor("white")
    big = k <= 20
    for t in range(k):
        for p in range(k):
            c = int(counts[t, p])
            if c and big:
                dark = frac[t, p] > 0.2
                ax.text(p, t, f"{c}", ha="center", va="center",
                        fontsize=9 if c < 1000 else 8,
                        color="white" if dark else ("#8b0000" if t != p else "black"),
                        fontweight="bold" if t == p else "normal")
    long_names = max(map(len, names)) > 3
    ax.set_xticks(range(k), names, rotation=40 if long_names else 0,
                  ha="right" if long_names else "center",
                  rotation_mode="anchor" if long_names else "default")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_xticks(np.arange(-0.5, k, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, k, 1), minor=True)
    ax.grid(which="minor", color="#dddddd", lw=0.6)
    ax.tick_params(which="minor", length=0)
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label("share of the true class (row), log scale")
    acc = correct / total if total else float("nan")
    ax.set_title(f"Confusion matrix: {total:,} test images, accuracy {100 * acc:.2f}%\n"
                 f"numbers are counts; off-diagonal = mistakes (red)", fontsize=10)
    return fig


# --- mistakes and confidence ---------------------------------------------------------------
def confident_mistakes(images, y_true, probs, k: int = 16, class_names=None) -> Figure:
    """The ``k`` wrongly classified images the model was most sure about, each titled with the
    true label, the prediction, its probability and the true class's probability."""
    if isinstance(images, np.ndarray) or not hasattr(images, "image"):
        images = _images_of(np.asarray(images))
    y = np.asarray(y_true).astype(np.int64).ravel()
    probs = np.asarray(probs)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    wrong = np.flatnonzero(pred != y)
    order = wrong[np.argsort(-conf[wrong], kind="stable")][:k]
    names = [str(c) for c in (class_names or range(probs.shape[1]))]
    long_names = max(map(len, names)) > 3
    n = len(order)
    cols = min(8, max(n, 4))
    rows = max(1, math.ceil(n / cols))
    fig = _figure(cols * 1.45, rows * (1.95 if long_names else 1.75) + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, order):
        img = images.image(i) if hasattr(images, "image") else images[i]
        ax.imshow(img, cmap="gray_r", vmin=0, vmax=max(1.0, float(img.max())),
                  interpolation="nearest")
        if long_names:  # e.g. "T-shirt/top → Pullover" would overlap its neighbours
            title = (f"{names[y[i]]}\n→ {names[pred[i]]} {100 * conf[i]:.1f}%\n"
                     f"(true {100 * probs[i, y[i]]:.1f}%)")
        else:
            title = (f"true {names[y[i]]} → {names[pred[i]]}\n"
                     f"{100 * conf[i]:.1f}% (true {100 * probs[i, y[i]]:.1f}%)")
        ax.set_title(title, fontsize=8)
    if n == 0:
        axes[0].text(0.5, 0.5, "no mistakes", ha="center", va="center",
                     transform=axes[0].transAxes)
    fig.suptitle(f"Most confident mistakes: {n} of {len(wrong):,} wrong out of {len(y):,} "
                 f"(title: true → predicted, its probability)", fontsize=10)
    return fig


def confidence_histogram(probs, y_true, bins: int = 40) -> Figure:
    """Histogram of the predicted class's probability, correct and wrong predictions apart
    (log-scale counts). A calibrated model puts its wrong answers at low confidence."""
    probs = np.asarray(probs)
    y = np.asarray(y_true).astype(np.int64).ravel()
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    right = pred == y
    lo = 1.0 / probs.shape[1]
    edges = np.linspace(lo, 1.0, bins + 1)
    fig = _figure(8, 4.2)
    ax = fig.subplots()
    ax.hist(conf[right], bins=edges, color=RIGHT_COLOR, alpha=0.6,
            label=f"correct ({right.sum():,}), median {100 * np.median(conf[right]) if right.any() else 0:.2f}%")
    ax.hist(conf[~right], bins=edges, color=WRONG_COLOR, histtype="step", lw=2,
            label=f"wrong ({(~right).sum():,}), median {100 * np.median(conf[~right]) if (~right).any() else 0:.1f}%")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_xlabel("confidence = probability of the predicted class")
    ax.set_ylabel("images (log scale)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    sure = conf >= 0.99
    text = (f"confidence ≥ 99%: {sure.sum():,} images, "
            f"{100 * right[sure].mean() if sure.any() else float('nan'):.2f}% correct\n"
            f"confidence < 90%: {(conf < 0.9).sum():,} images, "
            f"{100 * right[conf < 0.9].mean() if (conf < 0.9).any() else float('nan'):.1f}% correct")
    ax.text(0.02, 0.72, text, transform=ax.transAxes, fontsize=8.5, va="top",
            bbox=dict(boxstyle="round", fc="white", ec="#cccccc"))
    ax.set_title(f"Confidence of {len(y):,} predictions: correct vs wrong")
    return fig


# --- a whole run ---------------------------------------------------------------------------
def _as_model_input(model, images: np.ndarray) -> np.ndarray:
    shape = tuple(model.input_shape)
    if math.prod(shape) != math.prod(images.shape[1:]):
        raise ValueError(f"the model expects inputs of shape {shape}, the images are "
                         f"{images.shape[1:]}")
    return images.reshape(images.shape[0], *shape)


def write_plots(out_dir, model, images, labels, probs=None, metrics=None, test_result=None,
                class_names=None, log=None) -> list[Path]:
    """Draw every plot into ``out_dir``; a plot that cannot be drawn for this model (e.g. no
    Dense/Conv2D layer) is skipped with a note to ``log``. Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if probs is None:
        probs = predict_proba(model, _as_model_input(model, images))
    written = []

    def emit(name, make):
        try:
            fig = make()
        except ValueError as e:
            if log:
                log(f"skipped {FILES[name]}: {e}")
            return
        written.append(save(fig, out_dir / FILES[name]))

    if metrics:
        emit("loss_curves", lambda: loss_curves(metrics, test_result))
    if model is not None:
        emit("first_layer_weights", lambda: first_layer_weights(model))
    counts = confusion_matrix(labels, probs.argmax(axis=1), probs.shape[1])
    emit("confusion_matrix", lambda: plot_confusion(counts, class_names))
    emit("confident_mistakes", lambda: confident_mistakes(images, labels, probs, 16, class_names))
    emit("confidence_histogram", lambda: confidence_histogram(probs, labels))
    return written


def plot_run(run_dir, model=None, test=None, out_dir=None) -> list[Path]:
    """Draw all plots of a run into its folder (or ``out_dir``); returns the PNG paths.

    ``model`` defaults to ``nnx.load(run_dir)``. ``test`` is a ``nnx.data.Split`` (device
    arrays) or a host pair ``(images, labels)``; by default the run's test split is loaded
    with ``nnx.datasets`` from config.json's dataset and data_dir.
    """
    run_dir = Path(run_dir)
    settings = runs.run_settings(run_dir)
    if model is None:
        from .checkpoint import load

        model = load(run_dir)
    if test is None:
        images, labels = runs.load_test_images(settings.get("dataset", "mnist"),
                                               runs.settings_data_dir(settings, run_dir),
                                               download=bool(settings.get("download", True)),
                                               limit=settings.get("limit"))
        probs = None
    elif isinstance(test, tuple):
        images, labels = np.asarray(test[0]), np.asarray(test[1]).astype(np.int64)
        if images.dtype == np.uint8:
            from .data import pixels_to_float32

            images = pixels_to_float32(images)
        probs = None
    else:  # a device-resident Split: run the model there, copy back only what is drawn
        probs = predict_proba(model, test.x)
        labels = np.asarray(model.backend.to_numpy(test.y)).astype(np.int64)
        images = _DeviceImages(test.x, model.backend)
    return write_plots(out_dir or run_dir, model, images, labels, probs,
                       metrics=runs.read_metrics(run_dir),
                       test_result=runs.read_json(run_dir / "results.json"),
                       class_names=class_names(settings.get("dataset")))
