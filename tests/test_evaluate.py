"""nnx.evaluate: numbers that agree with the trainer, files, CLI output and one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nnx
from nnx.evaluate import class_report, evaluate, main, most_confused

from mnist_location import SKIP_REASON, mnist_dir

PLOTS = ["loss_curves.png", "first_layer_weights.png", "confusion_matrix.png",
         "confident_mistakes.png", "confidence_histogram.png"]


# --- pure functions ------------------------------------------------------------------------
def test_class_report_and_most_confused():
    counts = np.array([[8, 2, 0], [1, 9, 0], [0, 5, 5]])
    rows, macro = class_report(counts)
    assert [r["support"] for r in rows] == [10, 10, 10]
    assert rows[0]["precision"] == pytest.approx(8 / 9) and rows[0]["recall"] == pytest.approx(0.8)
    assert rows[2]["precision"] == 1.0 and rows[2]["recall"] == 0.5
    assert rows[2]["f1"] == pytest.approx(2 * 0.5 / 1.5)
    assert macro["recall"] == pytest.approx((0.8 + 0.9 + 0.5) / 3) and macro["support"] == 30
    pairs = most_confused(counts, top=10)
    assert pairs == [{"true": 2, "pred": 1, "count": 5}, {"true": 0, "pred": 1, "count": 2},
                     {"true": 1, "pred": 0, "count": 1}]
    never = class_report(np.array([[3, 0], [2, 0]]))[0][1]  # class 1 never predicted
    assert never["precision"] == 0.0 and never["f1"] == 0.0


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    for target, words in ((tmp_path / "missing", "no such file"),
                          (tmp_path / "notes.txt", "not a readable safetensors"),
                          (tmp_path / "empty", "not a run folder, a checkpoint folder")):
        assert main([str(target), "--no-download"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def test_cli_error_for_a_model_that_is_not_for_28x28(tmp_path, capsys):
    from nnx.checkpoint import save_weights

    save_weights(tmp_path / "m.safetensors", nnx.mlp((100, 10)))
    assert main([str(tmp_path / "m.safetensors"), "--no-download", "--no-plots"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "(100,)" in err


# --- a real (small) run --------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder made by the library: default MLP, 3 epochs on 10k MNIST images."""
    folder = mnist_dir()
    if folder is None:
        pytest.skip(SKIP_REASON)
    from nnx import datasets
    from nnx.data import make_splits
    from nnx.optim import make_optimizer
    from nnx.schedules import make_schedule
    from nnx.trainer import Trainer

    data = datasets.load("mnist", data_dir=folder, download=False, progress=False)
    backend = nnx.get_backend("numpy", "cpu")
    splits = make_splits(data, backend, backend.float32, val_size=1000, limit=11000)
    full_test = make_splits(data, backend, backend.float32, val_size=0)["test"]
    model = nnx.mlp((784, 128, 64, 10), backend=backend, seed=0)
    opt = make_optimizer("nesterov", model.named_parameters(), 0.1, weight_decay=5e-4)
    steps = -(-len(splits["train"]) // 128)
    run_dir = tmp_path_factory.mktemp("run")
    trainer = Trainer(model, opt, make_schedule("cosine", 0.1, 3, steps), batch_size=128,
                      epochs=3, run_dir=run_dir, progress=False, log=lambda *a, **k: None)
    trainer.fit(splits["train"], splits["val"])
    (run_dir / "config.json").write_text(json.dumps(
        {"settings": {"dataset": "mnist", "data_dir": str(folder)}}))
    _, test_acc = trainer.evaluate(full_test)
    return {"dir": run_dir, "model": model, "test_acc": test_acc, "data_dir": folder}


def test_evaluate_numbers_files_and_report(run):
    result = evaluate(run["dir"])
    counts = np.array(result["confusion_matrix"])
    assert counts.shape == (10, 10) and counts.sum() == result["samples"] == 10000
    assert np.trace(counts) / counts.sum() == pytest.approx(result["accuracy"])
    assert result["accuracy"] == pytest.approx(run["test_acc"], abs=2e-4)
    assert result["errors"] == 10000 - np.trace(counts)
    assert sum(r["support"] for r in result["per_class"]) == 10000
    assert [r["class"] for r in result["per_class"]] == list(range(10))
    pairs = result["most_confused"]
    assert 0 < len(pairs) <= 10 and all(p["true"] != p["pred"] for p in pairs)
    assert [p["count"] for p in pairs] == sorted((p["count"] for p in pairs), reverse=True)
    assert pairs[0]["count"] == (counts - np.diag(np.diag(counts))).max()
    json.dumps(result)  # JSON-able
    names = [Path(f).name for f in result["files"]]
    assert names == PLOTS + ["report.md", "evaluation.json"]
    for f in result["files"]:
        assert Path(f).parent == run["dir"]
    for png in PLOTS:
        with Image.open(run["dir"] / png) as im:
            assert im.format == "PNG" and im.size[0] >= 300
    report = (run["dir"] / "report.md").read_text()
    assert f"{100 * result['accuracy']:.2f}%" in report
    for png in PLOTS:
        assert f"]({png})" in report  # relative links that resolve beside report.md


def test_evaluate_in_memory_model_writes_nothing_without_out_dir(run, tmp_path):
    result = evaluate(run["model"], data_dir=run["data_dir"])
    assert result["files"] == [] and result["accuracy"] == pytest.approx(run["test_acc"], abs=2e-4)


def test_an_in_memory_model_is_evaluated_where_it_was_built(run):
    model = run["model"]
    for kw in ({"backend": "numpy", "device": "cpu"}, {"device": "cpu"}, {"backend": "auto"},
               {"backend": nnx.get_backend("numpy")}):  # its own place, named
        same = evaluate(model, data_dir=run["data_dir"], plots=False, **kw)
        assert same["accuracy"] == pytest.approx(run["test_acc"], abs=2e-4)
    # backend/device choose where a LOADED model runs; for this one they would be ignored
    from nnx.evaluate import EvaluateError

    for kw in ({"backend": "torch"}, {"device": "cuda"}, {"backend": "strict"},
               {"backend": "auto", "device": "cuda:0"}):
        with pytest.raises(EvaluateError, match="built on numpy"):
            evaluate(model, data_dir=run["data_dir"], plots=False, **kw)


def test_cli_json_is_the_only_stdout(run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main([str(run["dir"]), "--json", "--no-plots", "--out", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["samples"] == 10000 and 0.85 < data["accuracy"] <= 1
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "report.md"]
    assert "![" not in (out / "report.md").read_text()


def test_cli_text_output_and_checkpoint_folder(run, tmp_path, capsys):
    ckpt = sorted((run["dir"] / "checkpoints").iterdir())[-1]
    assert main([str(ckpt), "--no-plots", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text and "precision" in text and "most confused" in text
    assert len([l for l in text.splitlines() if l.strip()[:1].isdigit()]) >= 10  # class rows


def test_cli_refuses_an_out_folder_inside_a_file_before_evaluating(run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as info:
        main([str(run["dir"]), "--no-plots", "--out", str(a_file / "eval")])
    assert info.value.code == 2 and "which is a file" in capsys.readouterr().err
    assert not (a_file.parent / "eval").exists()


def test_cli_missing_data(run, tmp_path, capsys):
    empty = tmp_path / "nodata"
    empty.mkdir()
    assert main([str(run["dir"]), "--data-dir", str(empty), "--no-plots"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nodata" in err


def test_a_limit_run_is_scored_on_its_own_test_images(tmp_path, capsys):
    """A run trained with --limit: nnx.evaluate scores the test images its training scored
    (results.json and the evaluation agree), and --full-test all of them."""
    folder = mnist_dir()
    if folder is None:
        pytest.skip(SKIP_REASON)
    from nnx.train import main as train

    run = tmp_path / "run"
    assert train(["--limit", "1200", "--val-size", "100", "--epochs", "1", "--layers",
                  "784,16,10", "--quiet", "--no-plots", "--no-download", "--data-dir",
                  str(folder), "--out", str(run)]) == 0
    trained = json.loads((run / "results.json").read_text())
    result = evaluate(run, plots=False)
    assert result["samples"] == 200 and "--limit 1,200" in result["subset"]
    assert result["accuracy"] == pytest.approx(trained["test_acc"], abs=1e-9)
    assert evaluate(run, plots=False, full_test=True)["samples"] == 10000
    capsys.readouterr()
    assert main([str(run), "--no-plots"]) == 0
    assert "the first 200 test images" in capsys.readouterr().out
