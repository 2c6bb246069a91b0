"""Reading what a run folder holds: per-epoch metrics, settings, results, and the test images
its plots and evaluation are drawn from. Drawing lives in ``nnx.plots``; writing in
``nnx.checkpoint``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_metrics(run_dir) -> list[dict]:
    """The per-epoch rows of ``metrics.jsonl`` ([] when absent); unreadable lines are skipped
    and an epoch logged twice keeps its newest row."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "epoch" in row:
                # a restarted or re-used folder: the newer rows replace those of the same
                # and later epochs
                rows = [r for r in rows if r["epoch"] < row["epoch"]]
                rows.append(row)
    return rows


def read_json(path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def run_settings(run_dir) -> dict:
    """``config.json``'s settings ({} when the folder has none)."""
    return read_json(Path(run_dir) / "config.json").get("settings", {}) or {}


def load_test_images(dataset: str = "mnist", data_dir=None, download: bool = True,
                     limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The test split on the host: float32 (N, 28, 28) in [0, 1] and int64 labels."""
    from . import datasets
    from .data import limited_test_size, pixels_to_float32

    data = datasets.load(dataset, data_dir=data_dir, download=download, progress=False)
    x, y = data["test"]
    if limit:  # what nnx.data.make_splits keeps with --limit
        n = limited_test_size(limit)
        x, y = x[:n], y[:n]
    return pixels_to_float32(x), y.astype(np.int64)


def settings_data_dir(settings: dict, run_dir=None):
    """The run's --data-dir if it still holds the test images. config.json records it as
    typed, so a relative path is tried from here, then from beside the run's ``runs/``
    folder and the run folder; None falls back to the usual search ($NNX_DATA_DIR...)."""
    d = settings.get("data_dir")
    if not d:
        return None
    d = Path(d).expanduser()
    bases = [Path.cwd()]
    if run_dir is not None and not d.is_absolute():
        run_dir = Path(run_dir).resolve()
        bases += [run_dir.parent.parent, run_dir.parent, run_dir]
    for base in bases:
        folder = base / d
        if any((folder / f"t10k-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")):
            return folder
    return None
