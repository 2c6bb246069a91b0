"""nnx.data.Split: uint8 training images converted per batch give the float split's batches,
bit for bit, on every backend that asks for them (``Backend.compact_images``)."""
from __future__ import annotations

import numpy as np
import pytest

import nnx
from nnx.data import PIXEL_SCALE, Split, make_splits, to_split
from nnx.trainer import Trainer
from nnx.optim import make_optimizer
from nnx.schedules import make_schedule

from tests_helpers_train import synthetic_digits


def pixels(n=300, seed=0):
    g = np.random.default_rng(seed)
    images = g.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[0] = 255  # both ends of the range
    images[1] = 0
    return images, g.integers(0, 10, n)


@pytest.mark.parametrize("flatten", [True, False])
def test_compact_batches_are_the_float_batches_bit_for_bit(backend, flatten):
    images, labels = pixels()
    f32 = backend.dtype("float32")
    full = to_split(images, labels, backend, f32, flatten)
    compact = to_split(images, labels, backend, f32, flatten, compact=True)
    assert full.pixels is None and compact.pixels is not None
    # independent of nnx: the float32 product the dataset conversion has always made
    expected = images.reshape(len(images), -1) if flatten else images[:, None]
    expected = expected.astype(np.float32) * np.float32(1.0 / 255.0)
    index = backend.from_numpy(np.array([5, 0, 1, 299, 5, 17]))
    for split in (full, compact):
        batch = backend.to_numpy(split.rows(backend, index))
        assert batch.dtype == np.float32 and batch.shape == (6,) + expected.shape[1:]
        np.testing.assert_array_equal(batch, expected[[5, 0, 1, 299, 5, 17]])
        np.testing.assert_array_equal(backend.to_numpy(split.x), expected)  # x on demand
        np.testing.assert_array_equal(backend.to_numpy(split.y), labels)
        assert len(split) == len(images)
    assert float(backend.to_numpy(compact.x).max()) == 1.0 and PIXEL_SCALE == 1 / 255


def test_float64_splits_keep_float_images(backend):
    if not backend.supports_float64():
        pytest.skip("no float64 on this device")
    images, labels = pixels(20)
    split = to_split(images, labels, backend, backend.dtype("float64"), compact=True)
    assert split.pixels is None  # a float64 split holds float32 values widened
    expected = (images.reshape(20, -1).astype(np.float32) * np.float32(1 / 255)).astype(np.float64)
    np.testing.assert_array_equal(backend.to_numpy(split.x), expected)


def test_make_splits_compacts_the_training_split_where_the_backend_asks(backend):
    splits = make_splits(synthetic_digits(n_train=400, n_test=60), backend, backend.float32,
                         val_size=100)
    assert (splits["train"].pixels is not None) == backend.compact_images
    assert splits["val"].pixels is None and splits["test"].pixels is None


def test_numpy_asks_for_compact_images_and_a_split_needs_images():
    assert nnx.get_backend("numpy").compact_images
    with pytest.raises(ValueError, match="either images x or uint8 pixels"):
        Split(None, np.zeros(3))


def test_compact_and_float_training_splits_train_to_the_same_weights():
    """The Trainer's gather through the compact split changes nothing: same weights, bit for
    bit, as the float split and as a plain (x, y) object."""
    b = nnx.get_backend("numpy")
    images, labels = pixels(200)
    full = to_split(images, labels, b, b.float32)
    compact = to_split(images, labels, b, b.float32, compact=True)
    results = []
    for split in (full, compact, _Sized(full)):
        model = nnx.mlp([784, 16, 10], backend=b, seed=1)
        opt = make_optimizer("nesterov", model.named_parameters(), 0.05, weight_decay=1e-4)
        t = Trainer(model, opt, make_schedule("constant", 0.05, 1, 4), batch_size=64, epochs=1,
                    seed=0, progress=False, log=lambda *a: None)
        t.fit(split)
        results.append(model.state_dict())
    for other in results[1:]:
        for k in results[0]:
            np.testing.assert_array_equal(results[0][k], other[k], err_msg=k)


class _Sized:
    """An (x, y) pair with a length, as a user's own split might be."""

    def __init__(self, split):
        self.x, self.y = split.x, split.y

    def __len__(self):
        return int(self.y.shape[0])


def test_an_empty_training_split_is_one_clear_error():
    import nnx
    from nnx.data import to_split
    from nnx.optim import SGD
    from nnx.schedules import make_schedule
    from nnx.trainer import Trainer

    b = nnx.get_backend("numpy")
    empty = to_split(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64), b, b.float32)
    assert len(empty) == 0 and tuple(empty.x.shape) == (0, 784)
    m = nnx.mlp([784, 10], seed=0, backend=b)
    t = Trainer(m, SGD(m.named_parameters(), 0.1), make_schedule("constant", 0.1, 1, 1),
                batch_size=4, epochs=1, progress=False, log=lambda *a, **k: None)
    with pytest.raises(ValueError, match="training split is empty"):
        t.fit(empty)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        to_split(np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.int64), b, b.float32)
