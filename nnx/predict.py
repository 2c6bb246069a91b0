"""``python -m nnx.predict CHECKPOINT FILE...``: classify your own digit pictures.

Each PNG/JPEG (any size, colour or grey, dark ink on light paper or the reverse) goes
through ``nnx.imageprep.preprocess`` — the MNIST recipe: grayscale, invert if needed, crop to
the ink, scale to 20 px, centre by centre of mass in 28x28 — and ``.npy`` files of 28x28 (or
784) values are taken as already MNIST-like. A file that cannot be read gives its own error
line and the others are still classified; the exit code is 1 if any file failed.

Library use::

    from nnx.predict import predict
    for r in predict("runs/20260101-120000", ["seven.jpg", "three.png"]):
        print(r["file"], r.get("top") or r["error"])
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from .errors import cli_main as _cli_main
from .errors import debug_requested as _debug_requested
from .imageprep import SIZE, ImageError, load_input, save_png



class PredictError(ValueError):
    """The model cannot classify 28x28 digit images (its input is another size)."""


def model_input_shape(model) -> tuple:
    """The model's per-sample input shape, checked to hold 28x28 = 784 values
    ((784,), (28, 28) or (1, 28, 28) for CNNs)."""
    shape = tuple(int(d) for d in model.input_shape)
    if math.prod(shape) != SIZE * SIZE:
        raise PredictError(f"the model takes inputs of shape {shape} ({math.prod(shape)} "
                           f"values); digit pictures become 28x28 = 784 values")
    return shape


def predict_proba(model, x, batch_size: int = 2048) -> np.ndarray:
    """Class probabilities (N, classes) as host NumPy for device or host inputs, run
    ``batch_size`` rows at a time (bounded memory on any split size)."""
    backend = model.backend
    on_host = isinstance(x, np.ndarray)
    n = int(x.shape[0])
    out = []
    with backend.activate():  # cuda:N: the work stays on GPU N
        for start in range(0, n, batch_size):
            xb = x[start:min(start + batch_size, n), ...]  # in-bounds stop (Array API)
            if on_host:
                xb = backend.from_numpy(np.ascontiguousarray(xb, dtype=np.float32),
                                        dtype=model.dtype)
            out.append(np.asarray(backend.to_numpy(model.probabilities(xb)), dtype=np.float64))
    if not out:
        return np.zeros((0, int(math.prod(model.output_shape))))
    return np.concatenate(out)


def _load_model(model_or_path, backend, device):
    if isinstance(model_or_path, (str, os.PathLike)):
        from .checkpoint import load

        return load(model_or_path, backend=backend, device=device)
    return model_or_path


#: how much ``--show``'s second picture enlarges the 28x28 input (280x280, sharp pixels)
PREVIEW_SCALE = 10


def preview_path(file, show_dir=None, large: bool = False) -> Path:
    """Where ``--show`` writes the preprocessed 28x28: ``<name>.nnx28.png`` beside the input
    (or in ``show_dir``); ``large``: the enlarged copy, ``<name>.nnx28-large.png``."""
    file = Path(file)
    suffix = ".nnx28-large.png" if large else ".nnx28.png"
    return Path(show_dir or file.parent) / f"{file.stem}{suffix}"


def predict(model_or_path, files, backend=None, device: str | None = None, top: int = 3,
            show: bool = False, show_dir=None, batch_size: int = 2048) -> list[dict]:
    """Classify each file. Returns one dict per file, in order:

    * ``{"file", "prediction", "probability", "top": [(digit, prob), ...]}`` (``top`` best
      classes, most likely first), plus ``"preview"`` (the 28x28 PNG) and
      ``"preview_large"`` (the same enlarged to 280x280, to look at) with ``show``;
    * ``{"file", "error"}`` when the file cannot be used (unreadable, no ink, wrong-size
      .npy) — the other files are still classified.

    ``model_or_path``: a ``Sequential`` or a run folder / checkpoint folder / .safetensors.
    Raises ``PredictError`` when the model does not take 28x28 inputs, and
    ``nnx.checkpoint.CheckpointError`` when the checkpoint cannot be loaded.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if int(top) < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    model = _load_model(model_or_path, backend, device)
    shape = model_input_shape(model)
    results, images, slots = [], [], []
    for f in files:
        entry = {"file": str(f)}
        try:
            a = load_input(f)
        except ImageError as e:
            entry["error"] = str(e)
        except Exception as e:  # Pillow raises many kinds (SyntaxError, struct.error...)
            entry["error"] = f"cannot read image ({type(e).__name__}: {' '.join(str(e).split())})"
        else:
            if show:
                try:
                    dest = preview_path(f, show_dir)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    entry["preview"] = str(save_png(a, dest))
                    entry["preview_large"] = str(save_png(a, preview_path(f, show_dir, large=True),
                                                          scale=PREVIEW_SCALE))
                except OSError as e:
                    entry["preview_error"] = (f"cannot write preview {preview_path(f, show_dir)} "
                                              f"({e.strerror or e})")
            images.append(a)
            slots.append(len(results))
        results.append(entry)
    if images:
        x = np.stack(images).astype(np.float32).reshape(len(images), *shape)
        probs = predict_proba(model, x, batch_size)
        k = min(int(top), probs.shape[1])
        for slot, p in zip(slots, probs):
            order = np.argsort(-p, kind="stable")[:k]
            best = [(int(c), float(p[c])) for c in order]
            results[slot].update(prediction=best[0][0], probability=best[0][1], top=best)
    return results


def _percent(p: float) -> str:
    return f"{100 * p:.1f}%" if p >= 0.001 or p == 0 else f"{100 * p:.2g}%"


def format_result(r) -> str:
    if "error" in r:
        return f"{r['file']}: error: {r['error']}"
    best = ", ".join(f"{d} ({_percent(p)})" for d, p in r["top"])
    line = f"{r['file']}: {best}"
    if "preview" in r:
        line += f"   [28x28: {r['preview']}"
        line += f", enlarged: {r['preview_large']}]" if "preview_large" in r else "]"
    return line


def build_parser() -> argparse.ArgumentParser:
    from .backends import BACKENDS
    from .threads import add_threads_option

    p = argparse.ArgumentParser(
        prog="python -m nnx.predict",
        description="Classify pictures of handwritten digits (PNG/JPEG of any size, or .npy\n"
                    "28x28 arrays) with a trained nnx model. Pictures are preprocessed like\n"
                    "MNIST: grayscale, inverted if the paper is light, cropped to the ink,\n"
                    "scaled to 20 px and centred by centre of mass in 28x28 (docs/evaluate.md).",
        epilog="examples:\n"
               "  python -m nnx.predict runs/20260101-120000 seven.jpg three.png\n"
               "  python -m nnx.predict model.safetensors photo.jpg --show   # photo.nnx28.png, photo.nnx28-large.png\n"
               "  python -m nnx.predict runs/20260101-120000 digits/*.png --json\n"
               "exit code: 0 if every file was classified, 1 if any failed",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="run folder, checkpoint folder or nnx .safetensors file")
    p.add_argument("files", metavar="FILE", nargs="+", help="PNG/JPEG/... picture or .npy array")
    p.add_argument("--top", type=int, default=3, help="how many classes to list (default: 3)")
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    p.add_argument("--show", action="store_true",
                   help="save what the model sees (the preprocessed 28x28) as <name>.nnx28.png, "
                        "and enlarged 10x (280x280) as <name>.nnx28-large.png")
    p.add_argument("--show-dir", default=None,
                   help="folder for the --show pictures (default: beside each input)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: auto")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    add_threads_option(p)
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error (also: NNX_DEBUG=1)")
    return p


@_cli_main
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be >= 1, got {args.top}")
    if args.show_dir is not None:
        from .errors import check_out_dir

        if not args.show_dir.strip():
            parser.error("--show-dir is empty; give a folder (it is created if needed)")
        args.show_dir = str(Path(args.show_dir).expanduser())  # checked where it is written
        check_out_dir(Path(args.show_dir), parser, "--show-dir")
    from .threads import set_threads

    set_threads(args.threads)
    from .backends import BackendError
    from .checkpoint import CheckpointError

    try:
        results = predict(args.checkpoint, args.files, backend=args.backend, device=args.device,
                          top=args.top, show=args.show or bool(args.show_dir),
                          show_dir=args.show_dir)
    except (CheckpointError, PredictError, BackendError, ValueError, OSError) as e:
        if _debug_requested(argv):
            raise
        msg = " ".join(str(e).split())
        if args.json:
            print(json.dumps({"error": msg}))
        print(f"error: {msg}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            stream = sys.stderr if "error" in r else sys.stdout
            print(format_result(r), file=stream, flush=True)
            if "preview_error" in r:
                print(f"{r['file']}: warning: {r['preview_error']}", file=sys.stderr, flush=True)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
