"""nnx.imageprep (MNIST-style preprocessing of pictures) and nnx.predict (library and CLI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import nnx
from nnx.checkpoint import save_weights
from nnx.imageprep import (EmptyImageError, ImageError, centre_of_mass, load_array, preprocess,
                           stroke_width)
from nnx.predict import format_result, PredictError, main, predict

from mnist_location import SKIP_REASON, mnist_dir


def draw_seven(size=(400, 300), box=(230, 40, 380, 280), width=18, ink=40, paper=215,
               noise=0.0, mode="L", seed=0):
    """A thick hand-drawn-looking 7 (dark ink on light paper by default) inside ``box``."""
    x0, y0, x1, y1 = box
    img = Image.new("L", size, paper)
    d = ImageDraw.Draw(img)
    d.line([(x0, y0 + 10), (x1, y0), (x0 + (x1 - x0) * 0.35, y1)], fill=ink, width=width,
           joint="curve")
    d.line([(x0 + 30, (y0 + y1) / 2), (x1 - 20, (y0 + y1) / 2)], fill=ink, width=width)
    a = np.asarray(img, dtype=np.float64)
    if noise:
        a = a + np.random.default_rng(seed).normal(0, noise, a.shape)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    return img.convert(mode) if mode != "L" else img


def ink_bbox(a, threshold=0.1):
    rows = np.flatnonzero((a > threshold).any(axis=1))
    cols = np.flatnonzero((a > threshold).any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


# --- preprocessing -------------------------------------------------------------------------
def test_preprocess_centres_an_off_centre_inverted_oversized_digit():
    img = draw_seven(noise=6.0)  # 400x300, dark ink on light noisy paper, far right
    out = preprocess(img)
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() == pytest.approx(1.0)
    cy, cx = centre_of_mass(out)
    assert abs(cy - 14) <= 1.0 and abs(cx - 14) <= 1.0
    h, w = ink_bbox(out)
    assert 19 <= max(h, w) <= 21
    assert w < h  # aspect ratio kept: the 7 is taller than wide
    # MNIST style: white ink on a black (exactly zero) background
    assert out[0].max() == 0 and out[-1].max() == 0 and out[:, 0].max() == 0
    assert out.mean() < 0.35


def test_preprocess_same_result_for_dark_on_light_light_on_dark_colour_and_alpha():
    ref = preprocess(draw_seven())
    inverted = Image.fromarray(255 - np.asarray(draw_seven()), "L")
    colour = draw_seven(mode="RGB")
    rgba = Image.new("RGBA", (400, 300), (0, 0, 0, 0))  # black ink on a transparent canvas
    alpha = 255 - np.asarray(draw_seven(ink=0, paper=255))
    rgba.putalpha(Image.fromarray(alpha.astype(np.uint8)))
    for variant in (inverted, colour, rgba, np.asarray(colour)):
        out = preprocess(variant)
        assert np.abs(out - ref).mean() < 0.03, type(variant)


def test_preprocess_thickens_a_thin_pen_on_a_big_image():
    thin = draw_seven(size=(1200, 900), box=(500, 100, 900, 800), width=4)
    out = preprocess(thin)
    assert stroke_width(out) >= 1.5
    assert abs(centre_of_mass(out)[0] - 14) <= 1 and abs(centre_of_mass(out)[1] - 14) <= 1


def test_preprocess_ignores_shadows_and_lighting_gradients():
    clean = preprocess(draw_seven(noise=4.0))
    paper = np.asarray(draw_seven(noise=4.0), dtype=np.float64)
    gradient = paper * np.linspace(0.5, 1.0, paper.shape[1])[None, :]  # dim on the left
    shadow = paper.copy()
    shadow[:, :150] *= 0.6  # a hard-edged shadow over the left half (beside the digit)
    for lit in (gradient, shadow):
        out = preprocess(Image.fromarray(lit.astype(np.uint8), "L"))
        assert np.abs(out - clean).mean() < 0.03


def test_preprocess_keeps_mnist_digits_almost_unchanged():
    rng = np.random.default_rng(0)
    digit = np.zeros((28, 28))
    digit[4:24, 11:18] = rng.uniform(0.6, 1.0, (20, 7))  # a 20-px-tall bar, centred
    out = preprocess((digit * 255).astype(np.uint8))
    assert np.abs(out - digit).mean() < 0.02


@pytest.mark.parametrize("image", [np.full((50, 40), 255, np.uint8), np.zeros((28, 28)),
                                   np.full((300, 300), 128, np.uint8)])
def test_preprocess_rejects_empty_images(image):
    with pytest.raises(EmptyImageError, match="no ink"):
        preprocess(image)


def test_load_array_scales_and_checks_size(tmp_path):
    a = np.zeros((28, 28), np.uint8)
    a[5:20, 12:15] = 255
    np.save(tmp_path / "a.npy", a.reshape(784))
    out = load_array(tmp_path / "a.npy")
    assert out.shape == (28, 28) and out.dtype == np.float32 and out.max() == 1.0
    np.save(tmp_path / "b.npy", np.zeros((10, 10)))
    with pytest.raises(ImageError, match="784"):
        load_array(tmp_path / "b.npy")


# --- predict: per-file errors, exit codes, CNN input shapes --------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    draw_seven().save(d / "seven.png")
    draw_seven(mode="RGB").save(d / "seven.jpg", quality=90)
    digit = np.zeros((28, 28), np.float32)
    digit[4:24, 12:16] = 1.0
    np.save(d / "one.npy", digit)
    (d / "broken.png").write_bytes(b"this is not a PNG at all")
    Image.new("L", (64, 64), 255).save(d / "blank.png")
    np.save(d / "wrong.npy", np.ones((5, 5)))
    return d


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "mlp.safetensors"
    save_weights(path, nnx.mlp((784, 32, 10), seed=1))
    return path


def test_predict_reports_bad_files_and_classifies_the_rest(files, mlp_file):
    names = ["seven.png", "broken.png", "one.npy", "blank.png", "wrong.npy", "missing.png",
             "seven.jpg"]
    results = predict(mlp_file, [files / n for n in names], top=3)
    assert [Path(r["file"]).name for r in results] == names
    good = {Path(r["file"]).name: r for r in results if "error" not in r}
    bad = {Path(r["file"]).name: r["error"] for r in results if "error" in r}
    assert set(good) == {"seven.png", "one.npy", "seven.jpg"}
    assert "not a readable image" in bad["broken.png"]
    assert "no ink" in bad["blank.png"]
    assert "784" in bad["wrong.npy"]
    assert "no such file" in bad["missing.png"]
    for r in good.values():
        assert len(r["top"]) == 3
        probs = [p for _, p in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert r["prediction"] == r["top"][0][0] and 0 <= r["prediction"] <= 9


def test_predict_supports_cnn_inputs_and_rejects_other_sizes(files, tmp_path):
    cnn = nnx.Sequential([nnx.Conv2D(1, 4, 3), nnx.ReLU(), nnx.MaxPool2D(2), nnx.Flatten(),
                          nnx.Dense(4 * 13 * 13, 10)], input_shape=(1, 28, 28))
    (r,) = predict(cnn, [files / "seven.png"], top=2)
    assert len(r["top"]) == 2
    with pytest.raises(PredictError, match="784"):
        predict(nnx.mlp((100, 10)), [files / "seven.png"])


def test_show_writes_the_28x28_the_model_sees(files, mlp_file, tmp_path):
    (r,) = predict(mlp_file, [files / "seven.jpg"], show=True, show_dir=tmp_path)
    assert Path(r["preview"]) == tmp_path / "seven.nnx28.png"
    from PIL import Image

    large = Image.open(r["preview_large"])  # enlarged copy to look at, same pixels
    assert Path(r["preview_large"]) == tmp_path / "seven.nnx28-large.png"
    assert large.size == (280, 280)
    small = np.asarray(Image.open(r["preview"]))
    np.testing.assert_array_equal(np.asarray(large)[::10, ::10], small)
    assert "enlarged: " in format_result(r)
    with Image.open(r["preview"]) as im:
        assert im.size == (28, 28) and im.mode == "L"


def test_cli_exit_codes_and_json(files, mlp_file, capsys):
    assert main([str(mlp_file), str(files / "seven.png"), str(files / "one.npy")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith(str(files / "seven.png") + ": ")
    assert out[0].count("%") == 3
    assert main([str(mlp_file), str(files / "seven.png"), str(files / "broken.png"), "--json",
                 "--top", "2"]) == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert len(data) == 2 and len(data[0]["top"]) == 2 and "error" in data[1]
    bad = files / "not_a_model.safetensors"
    bad.write_bytes(b"nope")
    assert main([str(bad), str(files / "seven.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_cli_subprocess(files, mlp_file):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    ok = subprocess.run([sys.executable, "-m", "nnx.predict", str(mlp_file), str(files / "one.npy")],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(str(files / "one.npy"))
    bad = subprocess.run([sys.executable, "-m", "nnx.predict", str(mlp_file),
                          str(files / "blank.png")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "no ink" in bad.stderr


# --- on real MNIST digits: pictures classify like the arrays -------------------------------
def _train_small_mlp(data):
    from nnx.data import make_splits
    from nnx.optim import make_optimizer
    from nnx.schedules import make_schedule
    from nnx.trainer import Trainer

    backend = nnx.get_backend("numpy", "cpu")
    splits = make_splits(data, backend, backend.float32, val_size=0, limit=10000)
    model = nnx.mlp((784, 128, 64, 10), backend=backend, seed=0)
    opt = make_optimizer("nesterov", model.named_parameters(), 0.1, weight_decay=5e-4)
    steps = -(-len(splits["train"]) // 128)
    trainer = Trainer(model, opt, make_schedule("cosine", 0.1, 3, steps), batch_size=128,
                      epochs=3, progress=False, log=lambda *a, **k: None)
    trainer.fit(splits["train"])
    return model


@pytest.fixture(scope="module")
def mnist():
    folder = mnist_dir()
    if folder is None:
        pytest.skip(SKIP_REASON)
    from nnx import datasets

    return datasets.load("mnist", data_dir=folder, download=False, progress=False)


def test_png_digits_classify_like_arrays(mnist, tmp_path):
    model = _train_small_mlp(mnist)
    x, y = mnist["test"]
    idx = np.random.default_rng(0).choice(len(y), 200, replace=False)
    paths = []
    for i in idx:
        p = tmp_path / f"{i}.png"
        Image.fromarray(x[i], "L").save(p)
        paths.append(p)
    results = predict(model, paths, top=1)
    from_png = np.array([r["prediction"] for r in results])
    arrays = (x[idx].reshape(-1, 784) / 255).astype(np.float32)
    from_array = model.backend.to_numpy(model.predict(model.backend.from_numpy(arrays)))
    acc_png, acc_array = (from_png == y[idx]).mean(), (from_array == y[idx]).mean()
    assert acc_array > 0.85
    assert acc_png >= acc_array - 0.01
    assert (from_png == from_array).mean() >= 0.97


def test_show_dir_that_is_a_file_is_refused_before_any_work(files, mlp_file, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as info:
        main([str(mlp_file), str(files / "seven.png"), "--show-dir", str(blocker)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"--show-dir {blocker} is a file" in err
    assert blocker.read_text() == "x"


def test_a_huge_picture_is_refused_before_it_is_decoded(tmp_path):
    from PIL import Image

    from nnx.imageprep import MAX_PIXELS, load_input

    path = tmp_path / "huge.png"
    Image.new("L", (MAX_PIXELS // 4000 + 1, 4000), 255).save(path)  # a few KB on disk
    with pytest.raises(ImageError, match="megapixels are read"):
        load_input(path)
