"""nnx.plots: every figure draws and saves as a decodable PNG of the expected size; the
confusion matrix counts are right; plot_run works on a run folder and at the end of training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nnx
import nnx.plots as plots
import nnx.runs as runs
from nnx.checkpoint import save_weights
from nnx.data import to_split

from conftest import shared_mnist_dir

EXPECTED = ["loss_curves.png", "first_layer_weights.png", "confusion_matrix.png",
            "confident_mistakes.png", "confidence_histogram.png"]


def assert_png(path, fig=None):
    path = Path(path)
    assert path.is_file() and path.suffix == ".png"
    assert not list(path.parent.glob(f".{path.name}.tmp-*")), "temp file left behind"
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        w, h = im.size
    assert w >= 300 and h >= 200
    if fig is not None:
        fw, fh = fig.get_size_inches() * fig.dpi
        assert abs(w - fw) <= 1 and abs(h - fh) <= 1


@pytest.fixture
def fake_test():
    """200 random 'images', labels and probabilities with a known number of mistakes."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (200, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 200)
    logits = rng.normal(0, 1, (200, 10))
    logits[np.arange(200), labels] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return images, labels, probs


METRICS = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 1 - 0.1 / e, "val_loss": 1.2 / e,
            "val_acc": 1 - 0.12 / e, "lr": 0.1} for e in range(1, 6)]


def test_confusion_matrix_counts():
    counts = plots.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], num_classes=3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 10, 1000), rng.integers(0, 10, 1000)
    counts = plots.confusion_matrix(y, p)
    assert counts.sum() == 1000
    assert np.trace(counts) / counts.sum() == pytest.approx((y == p).mean())
    assert counts.sum(axis=1).tolist() == np.bincount(y, minlength=10).tolist()
    with pytest.raises(ValueError, match="outside"):
        plots.confusion_matrix([0, 10], [0, 1])


def test_every_figure_saves_as_png(tmp_path, fake_test):
    images, labels, probs = fake_test
    model = nnx.mlp((784, 16, 10), seed=0)
    counts = plots.confusion_matrix(labels, probs.argmax(1))
    figures = {
        "loss": plots.loss_curves(METRICS, {"test_loss": 0.3, "test_acc": 0.95}),
        "weights": plots.first_layer_weights(model),
        "confusion": plots.plot_confusion(counts),
        "mistakes": plots.confident_mistakes(images, labels, probs, k=16),
        "histogram": plots.confidence_histogram(probs, labels),
    }
    for name, fig in figures.items():
        assert_png(plots.save(fig, tmp_path / f"{name}.png"), fig)
    assert "per tile" in figures["weights"].axes[0].get_title()
    shared = plots.first_layer_weights(model, scale="shared")
    assert "shared" in shared.axes[0].get_title()
    no_val = plots.loss_curves([{k: v for k, v in m.items() if "val" not in k} for m in METRICS])
    assert [l.get_label() for l in no_val.axes[0].lines] == ["train"]
    flat = plots.confident_mistakes(images.reshape(200, 784), labels, probs, k=5)
    assert sum(1 for ax in flat.axes if ax.images) == 5
    wrong = int((probs.argmax(1) != labels).sum())
    assert f"of {wrong} wrong" in figures["mistakes"]._suptitle.get_text()


def test_first_layer_weights_shows_conv_filters():
    cnn = nnx.Sequential([nnx.Conv2D(1, 6, 5), nnx.ReLU(), nnx.Flatten(),
                          nnx.Dense(6 * 24 * 24, 10)], input_shape=(1, 28, 28))
    fig = plots.first_layer_weights(cnn)
    title = fig.axes[0].get_title()
    assert "Conv2D" in title and "6 filters of 5x5" in title
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (2 * 5 + 1, 4 * 5 + 3)  # 6 tiles of 5x5 in a 2x4 grid, 1-px gaps
    with pytest.raises(ValueError, match="no Dense or Conv2D"):
        plots.first_layer_weights(nnx.Sequential([nnx.Flatten()], input_shape=(28, 28)))


def test_no_mistakes_still_draws(tmp_path):
    labels = np.arange(10)
    probs = np.eye(10)
    fig = plots.confident_mistakes(np.zeros((10, 28, 28)), labels, probs)
    assert_png(plots.save(fig, tmp_path / "m.png"), fig)


def _record_saves(monkeypatch) -> dict:
    """Replace plots.save by a recorder {path: figure} (skips the slow PNG rendering)."""
    drawn = {}

    def save(fig, path):
        drawn[Path(path)] = fig
        return Path(path)

    monkeypatch.setattr(plots, "save", save)
    return drawn


def _fake_run(folder: Path, model) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / "model.safetensors", model)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS))
    (folder / "results.json").write_text(json.dumps({"test_loss": 0.3, "test_acc": 0.9}))
    (folder / "config.json").write_text(json.dumps({"settings": {"dataset": "mnist"}}))
    return folder


def test_plot_run_with_host_and_device_test_data(tmp_path, fake_test, monkeypatch):
    # rendering is checked above and in test_evaluate; here only what gets drawn where
    drawn = _record_saves(monkeypatch)
    images, labels, _ = fake_test
    model = nnx.mlp((784, 16, 10), seed=0)
    run = _fake_run(tmp_path / "run", model)
    written = plots.plot_run(run, test=(images, labels))  # model loaded from the folder
    assert written == [run / name for name in EXPECTED]
    assert "test 90.00%" in drawn[run / "loss_curves.png"]._suptitle.get_text()  # results.json
    # a device-resident Split, as nnx.train passes it
    split = to_split((images * 255).astype(np.uint8), labels, model.backend, model.dtype)
    written = plots.plot_run(run, model=model, test=split, out_dir=tmp_path / "out")
    assert written == [tmp_path / "out" / name for name in EXPECTED]
    mistakes = drawn[tmp_path / "out" / "confident_mistakes.png"]
    assert sum(1 for ax in mistakes.axes if ax.images) == 16


needs_mnist = pytest.mark.skipif(shared_mnist_dir() is None,
                                 reason="MNIST not found: set NNX_DATA_DIR or put it in "
                                        "../shared/data/mnist")


@needs_mnist
def test_plot_run_loads_the_test_split_from_config(tmp_path, monkeypatch):
    model = nnx.mlp((784, 16, 10), seed=0)
    run = _fake_run(tmp_path / "run", model)
    (run / "config.json").write_text(json.dumps({"settings": {
        "dataset": "mnist", "data_dir": str(shared_mnist_dir()), "limit": 1200}}))
    drawn = _record_saves(monkeypatch)
    plots.plot_run(run)
    assert [p.name for p in drawn] == EXPECTED
    title = drawn[run / "confusion_matrix.png"].axes[0].get_title()
    assert "200 test images" in title  # limit 1200 -> the first 1200 // 6 test images


@needs_mnist
def test_training_cli_draws_the_plots(tmp_path, capsys):
    from nnx.train import main

    run = tmp_path / "run"
    assert main(["--data-dir", str(shared_mnist_dir()), "--limit", "1500", "--val-size", "300",
                 "--epochs", "1", "--layers", "784,32,10", "--out", str(run), "--quiet"]) == 0
    for name in EXPECTED:
        assert_png(run / name)
    assert "warning: plotting failed" not in capsys.readouterr().err


def test_predict_proba_batches_on_a_strict_device(fake_test):
    """Batches never slice past the end (array-api-strict rejects out-of-bounds stops), and
    the model's own device is used."""
    from conftest import make_backend

    images, labels, _ = fake_test
    backend = make_backend("strict", "device1")
    model = nnx.mlp((784, 16, 10), backend=backend, seed=0)
    pixels = (images * 255).astype(np.uint8)
    split = to_split(pixels, labels, backend, model.dtype)
    probs = plots.predict_proba(model, split.x, batch_size=64)  # 200 = 3 x 64 + 8
    assert probs.shape == (200, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    host = plots.predict_proba(model, pixels.reshape(200, 784) / np.float32(255), batch_size=2048)
    assert np.allclose(probs, host, atol=1e-6)


def test_read_metrics_keeps_the_newest_rows(tmp_path):
    rows = [{"epoch": 1, "train_loss": 9.0}, {"epoch": 2, "train_loss": 8.0},
            {"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    assert runs.read_metrics(tmp_path) == rows[2:]
    assert runs.read_metrics(tmp_path / "missing") == []


def test_run_settings_and_results_of_a_folder(tmp_path):
    model = nnx.mlp((784, 16, 10), seed=0)
    run = _fake_run(tmp_path / "run", model)
    assert runs.run_settings(run) == {"dataset": "mnist"}
    assert runs.read_json(run / "results.json") == {"test_loss": 0.3, "test_acc": 0.9}
    assert runs.run_settings(tmp_path / "missing") == {} and runs.read_json(tmp_path) == {}
    data = tmp_path / "data"
    data.mkdir()
    (data / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    assert runs.settings_data_dir({"data_dir": str(data)}, run) == data
    assert runs.settings_data_dir({"data_dir": "data"}, run) == run.parent / "data"  # beside runs/
    assert runs.settings_data_dir({"data_dir": str(tmp_path / "gone")}, run) is None


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]


def test_class_names_name_fashion_mnist_and_leave_digits_as_numbers():
    assert plots.class_names("fashion-mnist") == FASHION
    assert plots.class_names("fashion_mnist") == FASHION
    assert plots.class_names("mnist") is None and plots.class_names(None) is None


def test_plot_run_of_a_fashion_mnist_run_names_its_classes(tmp_path, fake_test, monkeypatch):
    drawn = _record_saves(monkeypatch)
    images, labels, _ = fake_test
    model = nnx.mlp((784, 16, 10), seed=0)
    run = _fake_run(tmp_path / "run", model)
    (run / "config.json").write_text(json.dumps({"settings": {"dataset": "fashion-mnist"}}))
    plots.plot_run(run, test=(images, labels))
    ax = drawn[run / "confusion_matrix.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == FASHION
    assert [t.get_text() for t in ax.get_yticklabels()] == FASHION
    titles = [a.get_title() for a in drawn[run / "confident_mistakes.png"].axes if a.images]
    assert titles and all(any(name in t for name in FASHION) for t in titles)
    # an MNIST run keeps the digits
    (run / "config.json").write_text(json.dumps({"settings": {"dataset": "mnist"}}))
    plots.plot_run(run, test=(images, labels))
    ax = drawn[run / "confusion_matrix.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(d) for d in range(10)]


def test_fashion_names_render(tmp_path, fake_test):
    images, labels, probs = fake_test
    fig = plots.confident_mistakes(images, labels, probs, 16, class_names=FASHION)
    assert_png(plots.save(fig, tmp_path / "m.png"), fig)
    counts = plots.confusion_matrix(labels, probs.argmax(axis=1))
    fig = plots.plot_confusion(counts, FASHION)
    assert_png(plots.save(fig, tmp_path / "c.png"), fig)
