"""Device-resident splits: each split is converted once (float32 in [0, 1], flattened) and
moved to the backend's device, so training steps only gather batches there."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Split:
    """Images ``x`` (N, 784) and integer labels ``y`` (N,), both on the backend's device."""

    x: object
    y: object

    def __len__(self) -> int:
        return int(self.y.shape[0])


class LabelError(ValueError):
    """Labels that are not integers in 0..num_classes-1."""


def check_labels(y, num_classes: int, where: str = "labels") -> None:
    """Refuse labels outside 0..num_classes-1 (or not integers), naming the first bad one.

    The cross-entropy loss indexes the logits with the labels; an out-of-range label would
    silently give a finite, wrong loss on some backends. Checking once, when the data is
    loaded (host NumPy, no per-step device read), costs nothing during training."""
    y = np.asarray(y)
    if y.size == 0:
        return
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise LabelError(f"{where} must be integer class indices, got dtype {y.dtype}")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise LabelError(f"{where}: {int(bad.sum())} label(s) outside 0..{num_classes - 1}, "
                         f"the first is {y.reshape(-1)[i]} at index {i}; the model has "
                         f"{num_classes} outputs")


def to_split(images: np.ndarray, labels: np.ndarray, backend, dtype, flatten: bool = True) -> Split:
    """uint8 images → float32/64 in [0, 1] on the device; labels → int64 on the device."""
    x = images.reshape(images.shape[0], -1) if flatten else images[:, None, :, :]
    x = x.astype(np.float32) * np.float32(1.0 / 255.0)
    return Split(backend.from_numpy(x, dtype=dtype),
                 backend.from_numpy(labels.astype(np.int64)))


def make_splits(data: dict, backend, dtype, val_size: int = 5000, seed: int = 0,
                limit: int | None = None, flatten: bool = True,
                num_classes: int | None = 10) -> dict:
    """{"train", "val", "test"} Splits from ``nnx.datasets.load`` output.

    The validation split is a fixed random subset of the training set (seeded); ``limit``
    keeps only the first N training (and N//6 test) samples, for quick runs and tests.
    Labels are checked to lie in 0..num_classes-1 (``check_labels``; None skips the check).
    """
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    if num_classes is not None:
        check_labels(y_train, num_classes, "training labels")
        check_labels(y_test, num_classes, "test labels")
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
        n_test = max(1, limit // 6)
        x_test, y_test = x_test[:n_test], y_test[:n_test]
    n = len(y_train)
    if not 0 <= val_size < n:
        raise ValueError(f"--val-size must be between 0 and {n - 1} (training set has {n} samples)")
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(order[:val_size]), np.sort(order[val_size:])
    splits = {"train": to_split(x_train[train_idx], y_train[train_idx], backend, dtype, flatten),
              "test": to_split(x_test, y_test, backend, dtype, flatten)}
    if val_size:
        splits["val"] = to_split(x_train[val_idx], y_train[val_idx], backend, dtype, flatten)
    return splits
