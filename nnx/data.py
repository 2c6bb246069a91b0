"""Device-resident splits: each split is converted once (float32 in [0, 1], flattened) and
moved to the backend's device, so training steps only gather batches there (on the CPU the
training split stays uint8 and each batch is converted after its gather: ``Split``)."""
from __future__ import annotations

import math

import array_api_compat
import numpy as np


#: pixel value → intensity in [0, 1]: uint8 · (1/255) in float32 (a float32 product, the
#: same bits whether a whole split or one batch is converted)
PIXEL_SCALE = 1.0 / 255.0


def pixels_to_float32(images: np.ndarray) -> np.ndarray:
    """uint8 pixels → float32 intensities in [0, 1], as training sees them (host NumPy)."""
    return images.astype(np.float32) * np.float32(PIXEL_SCALE)


class Split:
    """Images ``x`` (N, 784) or (N, 1, H, W) and integer labels ``y`` (N,), on the device.

    A training split may instead keep the dataset's uint8 ``pixels`` on the device (where the
    backend asks for it, ``Backend.compact_images``) and convert batch by batch in ``rows``:
    a step's gather then reads a quarter of the bytes, and the batch is the same float32, bit
    for bit. ``x`` stays available either way (made from the pixels on first use).
    """

    def __init__(self, x=None, y=None, *, pixels=None, dtype=None):
        if (x is None) == (pixels is None):
            raise ValueError("a Split needs either images x or uint8 pixels (and a dtype)")
        self._x, self.y, self.pixels, self.dtype = x, y, pixels, dtype
        self._xp = None if pixels is None else array_api_compat.array_namespace(pixels)

    @property
    def x(self):
        if self._x is None:
            self._x = self._converted(self.pixels)
        return self._x

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def rows(self, backend, index):
        """The images at ``index`` (1-D, non-negative): a batch's gather."""
        if self.pixels is None:
            return backend.take_rows(self._x, index)
        return self._converted(backend.take_rows(self.pixels, index))

    def _converted(self, pixels):
        x = self._xp.astype(pixels, self.dtype)
        x *= PIXEL_SCALE  # in place on the fresh array (float32 · weak scalar: float32 product)
        return x


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


def to_split(images: np.ndarray, labels: np.ndarray, backend, dtype, flatten: bool = True,
             compact: bool = False) -> Split:
    """uint8 images → float32/64 in [0, 1] on the device; labels → int64 on the device.

    ``compact``: keep uint8 pixels and convert per batch (``Split``), for float32 only (a
    float64 split holds float32 values widened, which a batch conversion would not match)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    features = math.prod(images.shape[1:])  # (not -1: an empty split has no size to infer from)
    x = images.reshape(images.shape[0], features) if flatten else images[:, None, :, :]
    y = backend.from_numpy(labels.astype(np.int64))
    if compact and x.dtype == np.uint8 and backend.dtype_name(dtype) == "float32":
        return Split(y=y, pixels=backend.from_numpy(x), dtype=dtype)
    return Split(backend.from_numpy(pixels_to_float32(x), dtype=dtype), y)


def limited_test_size(limit: int) -> int:
    """How many test images (the first ones) a ``--limit`` run uses: about the training
    part's share, N // 6 (MNIST: 60,000 training and 10,000 test images)."""
    return max(1, int(limit) // 6)


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
        n_test = limited_test_size(limit)
        x_test, y_test = x_test[:n_test], y_test[:n_test]
    n = len(y_train)
    if not 0 <= val_size < n:
        raise ValueError(f"--val-size must be between 0 and {n - 1} (training set has {n} samples)")
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(order[:val_size]), np.sort(order[val_size:])
    splits = {"train": to_split(x_train[train_idx], y_train[train_idx], backend, dtype, flatten,
                                compact=backend.compact_images),
              "test": to_split(x_test, y_test, backend, dtype, flatten)}
    if val_size:
        splits["val"] = to_split(x_train[val_idx], y_train[val_idx], backend, dtype, flatten)
    return splits
