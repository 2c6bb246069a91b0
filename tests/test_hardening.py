"""Every bad input gets one clear message and a non-zero exit code, and a crash leaves nothing
behind (issue 14): CLI values, run folders as found on disk, tampered weights files, damaged
data, and faults (disk full, signals, kill -9, a mirror that never answers).

Most CLI cases call ``main(argv)`` in-process on synthetic digits (``datasets.load`` is
patched); a few run the real CLI in a subprocess (tests/hardening_driver.py)."""
import errno
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import nnx
import nnx.checkpoint as ck
import nnx.datasets as ds
from nnx.checkpoint import CheckpointError, list_checkpoints
from test_training import make_trainer
from tests_helpers_train import synthetic_digits

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "hardening_driver.py"
QUICK = ["--epochs", "2", "--layers", "784,16,10", "--batch-size", "100", "--val-size", "100",
         "--quiet", "--no-plots"]


@pytest.fixture
def synthetic(monkeypatch):
    """nnx.train sees 600 synthetic training digits instead of MNIST."""
    data = synthetic_digits(n_train=600, n_test=120)
    monkeypatch.setattr(ds, "load", lambda *a, **k: data)
    return data


def train(argv):
    from nnx.train import main

    return main([str(a) for a in argv])


def one_error_line(err: str) -> str:
    """The stderr of a failed CLI call: exactly one ``error:`` line and no traceback."""
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("error:") or "error:" in l]
    assert len(lines) == 1, err
    return lines[0]


# --- CLI values ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--layers", "784,64,9"], "must start at 784"),
    (["--layers", "100,64,10"], "must start at 784"),
    (["--backend", "nope"], "invalid choice"),
    (["--dropout", "1.5"], "--dropout must be in"),
    (["--arch", "conv:8,flatten,dense:7"], "must end with 10 outputs"),
    (["--arch", "conv:8,wat"], "unknown layer token"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay: must be a finite number"),
    (["--clip-norm", "nan"], "--clip-norm: must be a finite number"),
    (["--momentum=-inf"], "--momentum: must be a finite number"),
    (["--warmup-epochs", "nan"], "--warmup-epochs: must be a finite number"),
    (["--dropout", "nan"], "--dropout: must be a finite number"),
    (["--seed", "-1"], "--seed: must be between 0 and 4294967295"),
    (["--seed", str(2**40)], "--seed: must be between 0"),
    (["--limit", "0"], "--limit: must be a positive integer"),
    (["--limit", "100", "--val-size", "500"], "pass a smaller --val-size (e.g. --val-size 10)"),
    (["--arch", ""], "--arch is empty"),
    (["--arch", "  "], "--arch is empty"),
    (["--arch", "conv:8,,relu,flatten,dense:10"], "empty item"),
    (["--arch", "conv:8,relu,flatten,dense:10,"], "empty item"),
    (["--arch", "relu:3,flatten,dense:10"], "relu takes no arguments"),
    (["--arch", "conv:8,bn:4,flatten,dense:10"], "bn takes no arguments"),
    (["--arch", "flatten:1,dense:10"], "flatten takes no arguments"),
    (["--arch", "res[conv:8],flatten,dense:10"], "residual branch 'res[conv:8]' maps shape (1, 28, 28) to (8, 28, 28)"),
    (["--arch", "conv:4,res[maxpool:2],flatten,dense:10"], "must keep its input's shape"),
    (["--arch", "conv:8,dropout:nan,flatten,dense:10"], "dropout takes one finite number"),
    (["--arch", "conv:8,leaky_relu:x,flatten,dense:10"], "leaky_relu takes one finite number"),
    (["--arch", "conv:8,res[],flatten,dense:10"], "--arch"),
    (["--arch", "conv:8,maxpool:64,flatten,dense:10"], "--arch"),
    (["--layers", "784,100000000000,10"], "needs about"),
    (["--arch", "conv:100000000,flatten,dense:10"], "needs about"),
])
def test_cli_rejects_bad_values_with_one_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        train(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.count("error:") == 1


def test_memory_check_says_how_much(capsys):
    with pytest.raises(SystemExit):
        train(["--layers", "784,100000000000,10"])
    err = capsys.readouterr().err
    assert "GiB of memory" in err and "is available" in err and "smaller layers" in err


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\0\0\0binary", "is a binary file"),
    (b"\xff\xfe\xfd not utf-8", "is a binary file"),
    (b"conv:8\n\n# a comment\nflatten,dense:10\n", None),  # blank lines and comments are fine
    (b"x" * (70 * 1024), "larger than 64 KiB"),
    (b"", "holds no layers"),
    (b"# only a comment\n\n  \n", "holds no layers"),
])
def test_arch_file(tmp_path, content, message, capsys, synthetic):
    spec = tmp_path / "spec.txt"
    spec.write_bytes(content)
    if message is None:
        assert train(["--arch", spec, "--out", tmp_path / "run", *QUICK[:2], "--limit", "300",
                      "--val-size", "50", "--quiet", "--no-plots"]) == 0
        saved = json.loads((tmp_path / "run" / "config.json").read_text())["settings"]["arch"]
        assert saved == "conv:8,flatten,dense:10"
        return
    with pytest.raises(SystemExit) as info:
        train(["--arch", spec])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_out_must_be_a_writable_folder(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, message in [(a_file, "is a file"), (a_file / "run", f"lies inside {a_file}, which is a file")]:
        with pytest.raises(SystemExit) as info:
            train(["--out", out])
        assert info.value.code == 2 and message in capsys.readouterr().err
    real_access = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != locked and real_access(p, mode))
    with pytest.raises(SystemExit):
        train(["--out", locked / "run"])
    assert "cannot write in" in capsys.readouterr().err
    assert not (locked / "run").exists()


def test_limit_below_default_val_size_shrinks_it(tmp_path, synthetic, capsys):
    assert train(["--limit", "300", "--epochs", "1", "--layers", "784,16,10", "--out",
                  tmp_path / "run", "--quiet", "--no-plots"]) == 0
    assert "validation split shrunk to 30 images" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["settings"]["val_size"] == 30


def test_help_matches_docs_and_promises_98_only_for_mnist(capsys):
    with pytest.raises(SystemExit):
        train(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    docs = (HERE.parent / "docs" / "data.md").read_text()
    order = ["--data-dir", "$NNX_DATA_DIR/<dataset>", "$NNX_DATA_DIR,", "~/.cache/nnx/<dataset>",
             "/usr/share/datasets/<dataset>", "downloaded"]
    positions = [out.find(o) for o in order]
    assert -1 not in positions and positions == sorted(positions), positions
    assert "/usr/share/datasets/" in docs and "$XDG_CACHE_HOME" in docs
    assert "On MNIST the defaults train" in out and "--debug" in out


def test_missing_data_message_names_the_cli_option(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("NNX_DATA_DIR", raising=False)
    monkeypatch.setattr(ds, "SYSTEM_DIRS", {d: () for d in ds.DATASETS})
    with pytest.raises(ds.DatasetError, match="pass --data-dir DIR"):
        ds.load("mnist", download=False)
    with pytest.raises(ds.DatasetError, match=r"--data-dir \S+ does not hold mnist"):
        ds.load("mnist", data_dir=tmp_path, download=False)


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, tmp_path, synthetic, capsys):
    import nnx.optim

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(nnx.optim, "make_optimizer", boom)
    args = [*QUICK, "--out", tmp_path / "run"]
    assert train(args) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "RuntimeError: boom" in line and "--debug" in line
    with pytest.raises(RuntimeError, match="boom"):
        train([*args, "--debug"])
    monkeypatch.setenv("NNX_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        train(args)


# --- run folders -----------------------------------------------------------------------------
@pytest.fixture
def finished_run(tmp_path, synthetic):
    run = tmp_path / "run"
    assert train([*QUICK, "--out", run]) == 0
    return run


def test_damaged_config_json(finished_run, capsys):
    for text in ("{not json", '{"settings": 3}', '{"other": {}}', '{"settings": {"lr": 0.1, "wat": 1}}'):
        (finished_run / "config.json").write_text(text)
        with pytest.raises(SystemExit) as info:
            train(["--resume", finished_run, "--epochs", "3"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "config.json is damaged" in err and "restore it" in err


def test_config_json_with_impossible_settings(finished_run, capsys):
    config = json.loads((finished_run / "config.json").read_text())
    for key, value, message in [("optimizer", "bogus", "--optimizer must be one of"),
                                ("lr", "fast", "--lr must be a finite number"),
                                ("batch_size", 2.5, "--batch-size must be an integer"),
                                ("weight_decay", None, "--weight-decay must be a finite number")]:
        broken = json.loads(json.dumps(config))
        broken["settings"][key] = value
        (finished_run / "config.json").write_text(json.dumps(broken))
        with pytest.raises(SystemExit) as info:
            train(["--resume", finished_run, "--epochs", "3"])
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_damaged_state_json_points_to_the_previous_checkpoint(finished_run, capsys):
    before = {p.name: p.read_bytes() for p in finished_run.rglob("*.safetensors")}
    state = finished_run / "checkpoints" / "epoch-0002" / "state.json"
    for text in ("{half", json.dumps({"format": ck.FORMAT, "epoch": "two"})):
        state.write_text(text)
        assert train(["--resume", finished_run, "--epochs", "3"]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert "epoch-0002" in line and "continue from epoch-0001" in line
    assert {p.name: p.read_bytes() for p in finished_run.rglob("*.safetensors")} == before


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_damaged_checkpoint_weights_point_to_the_previous_checkpoint(finished_run, capsys, name):
    path = finished_run / "checkpoints" / "epoch-0002" / name
    path.write_bytes(path.read_bytes()[:100])
    assert train(["--resume", finished_run, "--epochs", "3"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert name in line and "continue from epoch-0001" in line


def test_half_written_metrics_line_is_repaired_on_resume(finished_run):
    metrics = finished_run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 3, "train_lo')
    assert train(["--resume", finished_run, "--epochs", "3", "--quiet", "--no-plots"]) == 0
    assert [json.loads(l)["epoch"] for l in metrics.read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("edit", [
    {"step_in_epoch": 10**9, "global_step": 2 * 5 + 10**9},     # far past the data: once a hang
    {"step_in_epoch": 7, "global_step": 17},                    # 5 steps per epoch: step 7 does not exist
    {"global_step": 3},                                         # disagrees with epoch 2
])
def test_state_pointing_past_the_data_is_refused_at_once(finished_run, capsys, edit):
    state_file = finished_run / "checkpoints" / "epoch-0002" / "state.json"
    state = json.loads(state_file.read_text())
    state.update(edit)
    state_file.write_text(json.dumps(state))
    t0 = time.perf_counter()
    assert train(["--resume", finished_run, "--epochs", "3"]) == 1
    assert time.perf_counter() - t0 < 20
    line = one_error_line(capsys.readouterr().err)
    assert "does not fit" in line or "disagree" in line


def test_run_that_died_before_its_first_checkpoint(tmp_path, synthetic, capsys):
    run = tmp_path / "run"
    ref = tmp_path / "ref"
    assert train([*QUICK, "--out", ref]) == 0
    assert train([*QUICK, "--out", run]) == 0
    import shutil

    shutil.rmtree(run / "checkpoints")  # what a run killed in its first epoch leaves
    (run / "model.safetensors").unlink()
    (run / "results.json").unlink()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"ep')
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train([*QUICK, "--out", run])
    assert f"--resume {run} starts it over" in capsys.readouterr().err
    assert train(["--resume", run, "--quiet", "--no-plots"]) == 0
    assert "starting it over from epoch 1" in capsys.readouterr().err
    a, _ = ck.load_safetensors(ref / "model.safetensors")
    b, _ = ck.load_safetensors(run / "model.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_leftover_temp_files_are_cleaned_and_swaps_restored(finished_run, capsys):
    root = finished_run / "checkpoints"
    dead = 2**22 + 12345  # no such process
    (root / f".epoch-0003.tmp-{dead}").mkdir()
    (root / f".epoch-0003.tmp-{dead}" / "model.safetensors").write_bytes(b"half")
    (finished_run / f".config.json.tmp-{dead}").write_text("{")
    os.replace(root / "epoch-0002", root / f".epoch-0002.old-{dead}")  # killed mid-swap
    assert train(["--resume", finished_run, "--epochs", "3", "--quiet", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "removed checkpoints/.epoch-0003.tmp" in err and "restored epoch-0002" in err
    hidden = [p.name for p in finished_run.rglob(".*")]
    assert hidden == []
    assert [p.name for p in list_checkpoints(finished_run)] == ["epoch-0002", "epoch-0003"]


def test_resume_removes_stale_evaluation_and_explains_cosine_restart(finished_run, capsys):
    (finished_run / "evaluation.json").write_text(json.dumps(
        {"files": [str(finished_run / "confusion_matrix.png")]}))
    (finished_run / "report.md").write_text("# old")
    (finished_run / "confusion_matrix.png").write_bytes(b"png")
    assert train(["--resume", finished_run, "--epochs", "4", "--quiet", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert not (finished_run / "evaluation.json").exists()
    assert not (finished_run / "report.md").exists()
    assert not (finished_run / "confusion_matrix.png").exists()
    assert "evaluated the weights from before this resume" in err
    assert "--epochs 4 (was 2) stretches the cosine schedule" in err and "restarts at" in err
    assert train(["--resume", finished_run, "--quiet", "--no-plots"]) == 0  # nothing to do
    assert "already finished its 4 epochs" in capsys.readouterr().err


# --- tampered weights files ------------------------------------------------------------------
@pytest.fixture
def weights_file(tmp_path):
    model = nnx.mlp([784, 16, 10], backend=nnx.get_backend("numpy"))
    path = tmp_path / "good.safetensors"
    ck.save_weights(path, model)
    return path


def tamper(src, dest, meta_edit=None, array_edit=None):
    from safetensors.numpy import save

    arrays, meta = ck.load_safetensors(src)
    if meta_edit:
        meta_edit(meta)
    if array_edit:
        array_edit(arrays)
    dest.write_bytes(save(arrays, metadata=meta))
    return dest


def _arch_edit(fn):
    def edit(meta):
        arch = json.loads(meta["architecture"])
        fn(arch)
        meta["architecture"] = json.dumps(arch)
    return edit


TAMPERED = [
    ("bad-json", dict(meta_edit=lambda m: m.update(architecture="[{'type': 'Dense'")), "not valid JSON"),
    ("arch-not-list", dict(meta_edit=lambda m: m.update(architecture='{"a": 1}')), "expected a list"),
    ("no-input-shape", dict(meta_edit=lambda m: m.pop("input_shape")), "no 'input_shape'"),
    ("bad-input-shape", dict(meta_edit=lambda m: m.update(input_shape="[-3]")), "positive sizes"),
    ("unknown-type", dict(meta_edit=_arch_edit(lambda a: a[1].update(type="Evil"))), "unknown layer type 'Evil'"),
    ("unexpected-arg", dict(meta_edit=_arch_edit(lambda a: a[1].update(power=3))), "does not take the arguments"),
    ("huge-size", dict(meta_edit=_arch_edit(lambda a: a[0].update(out_features=10**9))),
     "needs (1000000000, 784)"),
    ("size-not-int", dict(meta_edit=_arch_edit(lambda a: a[0].update(in_features="784"))),
     "must be a positive integer"),
    ("int32-tensors", dict(array_edit=lambda a: a.update({k: v.astype(np.int32) for k, v in a.items()})),
     "is int32 but the metadata says the model is float32"),
    ("extra-tensor", dict(array_edit=lambda a: a.update({"9.weight": np.zeros(3, np.float32)})),
     "unexpected ['9.weight']"),
    ("bad-dtype-meta", dict(meta_edit=lambda m: m.update(dtype="int8")), "expected float32 or float64"),
]


@pytest.mark.parametrize("name, edit, message", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_tampered_weights_in_load_evaluate_and_predict(weights_file, tmp_path, name, edit, message,
                                                       monkeypatch, capsys):
    bad = tamper(weights_file, tmp_path / f"{name}.safetensors", **edit)
    import nnx.model

    built = []
    real_init = nnx.model.Sequential.__init__
    monkeypatch.setattr(nnx.model.Sequential, "__init__",
                        lambda self, *a, **k: (built.append(1), real_init(self, *a, **k))[1])
    with pytest.raises(CheckpointError) as info:
        nnx.load(bad)
    assert message in str(info.value) and str(bad) in str(info.value)
    if name in ("huge-size", "int32-tensors", "extra-tensor", "size-not-int"):
        assert built == []  # refused before anything was allocated
    from nnx.evaluate import main as evaluate_main
    from nnx.predict import main as predict_main

    assert evaluate_main([str(bad), "--no-plots", "--out", str(tmp_path / "ev")]) == 1
    assert message in one_error_line(capsys.readouterr().err)
    digit = tmp_path / "digit.npy"
    np.save(digit, np.zeros((28, 28), np.float32))
    assert predict_main([str(bad), str(digit)]) == 1
    assert message in one_error_line(capsys.readouterr().err)


# --- data ------------------------------------------------------------------------------------
def _idx_header(dims):
    return bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)


@pytest.mark.parametrize("expected_shape", [(2, 28, 28), None])
def test_decompression_bomb_stops_early(tmp_path, expected_shape):
    path = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(_idx_header((2, 28, 28)))
        zeros = bytes(1 << 20)
        for _ in range(64):  # 64 MiB inflated from ~64 KiB
            f.write(zeros)
    assert path.stat().st_size < 1 << 20
    t0 = time.perf_counter()
    with pytest.raises(ds.DatasetError, match="decompression bomb") as info:
        ds.read_idx(path, expected_shape=expected_shape)
    assert str(path) in str(info.value)
    assert time.perf_counter() - t0 < 5


def test_idx_header_dims_that_overflow(tmp_path):
    path = tmp_path / "overflow-idx3-ubyte"
    path.write_bytes(_idx_header((2**32 - 1,) * 3) + bytes(100))
    with pytest.raises(ds.DatasetError, match="truncated") as info:
        ds.read_idx(path)
    assert str(path) in str(info.value)
    gz = tmp_path / "overflow-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(ds.DatasetError, match="truncated"):
        ds.read_idx(gz)


def test_multi_member_gzip_still_reads(tmp_path):
    payload = _idx_header((2, 3)) + bytes(range(6))
    path = tmp_path / "x-idx2-ubyte.gz"
    path.write_bytes(gzip.compress(payload[:7]) + gzip.compress(payload[7:]))
    assert ds.read_idx(path).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_unreadable_folder_is_reported(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    real = os.listdir

    def listdir(p="."):
        if Path(p) == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real(p)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(ds.DatasetError, match="folder cannot be read \\(Permission denied\\)"):
        ds.load("mnist", data_dir=folder, download=False)


def test_labels_outside_the_classes_are_refused():
    from nnx.data import LabelError, check_labels, make_splits

    b = nnx.get_backend("numpy")
    data = synthetic_digits(n_train=100, n_test=20)
    y = data["train"][1].copy()
    y[37] = 12
    data["train"] = (data["train"][0], y)
    with pytest.raises(LabelError, match=r"1 label\(s\) outside 0..9, the first is 12 at index 37"):
        make_splits(data, b, b.float32, val_size=10)
    with pytest.raises(LabelError, match="-1"):
        check_labels(np.array([0, -1, 3]), 10)
    with pytest.raises(LabelError, match="integer class indices"):
        check_labels(np.array([0.5, 1.0]), 10)
    check_labels(np.array([0, 9]), 10)


# --- faults ----------------------------------------------------------------------------------
def test_disk_full_while_saving(tmp_path, synthetic, monkeypatch, capsys):
    run = tmp_path / "run"
    real, calls = ck.save_safetensors, []

    def full(path, *a, **k):
        calls.append(path)
        if "epoch-0002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(ck, "save_safetensors", full)
    assert train([*QUICK, "--out", run]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "epoch-0001, is unchanged" in line
    assert f"--resume {run}" in line
    assert [p.name for p in list_checkpoints(run)] == ["epoch-0001"]
    assert [p.name for p in run.rglob(".*")] == []  # no temporary files or folders
    nnx.load(run / "checkpoints" / "epoch-0001")
    monkeypatch.setattr(ck, "save_safetensors", real)
    assert train(["--resume", run, "--quiet", "--no-plots"]) == 0


def test_disk_full_on_the_first_checkpoint_and_final_weights(tmp_path, synthetic, monkeypatch, capsys):
    real = ck.atomic_write_bytes

    def full(path, data):
        if Path(path).name == "model.safetensors" and "checkpoints" not in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ck, "atomic_write_bytes", full)
    run = tmp_path / "run"
    assert train([*QUICK, "--out", run]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "epoch-0002, is unchanged" in line
    assert [p.name for p in run.rglob(".*")] == []


def test_divergence_in_epoch_one_does_not_claim_a_checkpoint(tmp_path, synthetic, capsys):
    with np.errstate(all="ignore"):
        code = train([*QUICK, "--out", tmp_path / "run", "--optimizer", "sgd", "--lr", "1e30",
                      "--weight-decay", "0", "--schedule", "constant"])
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no checkpoint was written" in line and "last good checkpoint is kept" not in line


def _signal_at(trainer, global_step, signals):
    """Wrap the training step so the signals arrive while step ``global_step`` runs."""
    base, fired = trainer.step, []

    def step(*args):
        if trainer.global_step == global_step and not fired:
            fired.append(global_step)
            for sig in signals:
                os.kill(os.getpid(), sig)
        return base(*args)

    trainer.step = step


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    from nnx.trainer import TrainingInterrupted

    b = nnx.get_backend("numpy")
    t, s = make_trainer(b, run_dir=tmp_path, epochs=2)
    _signal_at(t, 5, [signal.SIGTERM])
    with pytest.raises(TrainingInterrupted) as info:
        t.fit(s["train"], s["val"])
    assert info.value.checkpoint.name.startswith("epoch-0000-step-")
    assert t._stop_signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored


def test_second_ctrl_c_while_writing_a_checkpoint_waits_for_it(tmp_path, monkeypatch, capsys):
    b = nnx.get_backend("numpy")
    t, s = make_trainer(b, run_dir=tmp_path, epochs=2)
    _signal_at(t, 5, [signal.SIGINT])
    real = ck.save_safetensors

    def interrupted_write(path, *a, **k):  # the second Ctrl-C lands inside the checkpoint write
        os.kill(os.getpid(), signal.SIGINT)
        return real(path, *a, **k)

    monkeypatch.setattr(ck, "save_safetensors", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        t.fit(s["train"], s["val"])
    assert "stopping as soon as it is complete" in capsys.readouterr().err
    (ckpt,) = list_checkpoints(tmp_path)
    assert ckpt.name.startswith("epoch-0000-step-")
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                      "state.json"]
    t2, _ = make_trainer(b, run_dir=tmp_path, epochs=2)
    t2.resume(ckpt)
    assert t2.global_step == int(ckpt.name.rsplit("-", 1)[1])
    assert [p.name for p in tmp_path.rglob(".*")] == []


def _driver(args, env_extra=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), **(env_extra or {})}
    env.pop("NNX_DEBUG", None)
    return subprocess.Popen([sys.executable, str(DRIVER), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _kill_at_write(args, nth_match, match):
    """Run the driver with slow writes and SIGKILL it inside the nth write whose path contains
    ``match``; returns the paths written before."""
    p = _driver(args, {"NNX_TEST_SLOW_WRITES": "1"})
    seen, n = [], 0
    for line in p.stdout:
        if line.startswith("WRITE "):
            seen.append(line[6:].strip())
            if match in seen[-1]:
                n += 1
                if n == nth_match:
                    p.kill()
                    break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, (p.returncode, seen, p.stderr.read())
    return seen


def test_kill_9_during_first_checkpoint_and_during_resume(tmp_path):
    """SIGKILL inside the first checkpoint write, then inside the resume (while it rewrites
    config.json), then a clean resume: the final weights are bit-identical to a run that was
    never interrupted, and no temporary file is left."""
    args = ["--epochs", "2", "--layers", "784,16,10", "--batch-size", "100", "--val-size", "100",
            "--quiet", "--no-plots"]
    ref = tmp_path / "ref"
    p = _driver([*args, "--out", ref])
    assert p.wait(timeout=120) == 0, p.stderr.read()

    run = tmp_path / "run"
    _kill_at_write([*args, "--out", run], 1, "checkpoints")  # inside the first checkpoint
    assert list_checkpoints(run) == []
    assert any(p.name.startswith(".epoch-0001.tmp-") for p in (run / "checkpoints").iterdir())
    _kill_at_write(["--resume", run], 1, "config.json")  # inside the resume
    p = _driver(["--resume", run])
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "starting it over from epoch 1" in err and "left by a process that was killed" in err
    a, _ = ck.load_safetensors(ref / "model.safetensors")
    b, _ = ck.load_safetensors(run / "model.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [p.name for p in run.rglob(".*")] == []


def test_sigterm_to_the_cli_saves_and_exits_143(tmp_path):
    run = tmp_path / "run"
    p = _driver(["--epochs", "50", "--layers", "784,16,10", "--batch-size", "100", "--val-size",
                 "100", "--quiet", "--no-plots", "--out", run])
    deadline = time.time() + 60
    while not list_checkpoints(run) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "SIGTERM: finishing this step" in err and f"--resume {run}" in err
    assert "Traceback" not in err


# --- a mirror that accepts the connection but never answers -----------------------------------
@pytest.fixture
def silent_server():
    """Accepts connections (and reads the request) but never sends a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns, stop = [], threading.Event()

    def serve():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}/"
    stop.set()
    thread.join()
    for c in conns:
        c.close()
    srv.close()


def test_download_from_a_silent_mirror_times_out_with_progress_lines(tmp_path, silent_server,
                                                                      monkeypatch, capsys):
    monkeypatch.setattr(ds, "HEARTBEAT", 0.2)
    monkeypatch.setattr(ds, "RETRY_BACKOFF", 0.0)
    t0 = time.perf_counter()
    with pytest.raises(ds.DatasetError) as info:
        ds.download("mnist", tmp_path / "dl", mirrors=[silent_server, silent_server + "b/"],
                    timeout=(0.7, 0.7), retries=2, progress=True, budget=30)
    elapsed = time.perf_counter() - t0
    msg = str(info.value)
    assert "no answer before the timeout" in msg
    assert elapsed < 5, elapsed  # one attempt per silent mirror, not three
    err = capsys.readouterr().err
    assert "nnx: waiting for 127.0.0.1" in err and "to answer the request for" in err
    assert list((tmp_path / "dl").iterdir()) == []  # no partial files


def test_download_budget_bounds_the_whole_download(tmp_path, silent_server, monkeypatch):
    monkeypatch.setattr(ds, "RETRY_BACKOFF", 0.0)
    mirrors = [f"{silent_server}{i}/" for i in range(20)]
    t0 = time.perf_counter()
    with pytest.raises(ds.DatasetError, match="time budget of 1.5 s is spent"):
        ds.download("mnist", tmp_path / "dl", mirrors=mirrors, timeout=(0.5, 0.5), progress=False,
                    budget=1.5)
    assert time.perf_counter() - t0 < 4


# --- the real command lines, in subprocesses ---------------------------------------------------
@pytest.mark.parametrize("module, args, code, message", [
    ("nnx.train", ["--lr", "inf"], 2, "--lr: must be a finite number"),
    ("nnx.train", ["--arch", "{binary}"], 2, "is a binary file"),
    ("nnx.evaluate", ["{tampered}"], 1, "is int32 but the metadata says the model is float32"),
    ("nnx.predict", ["{tampered}", "{digit}"], 1, "is int32 but the metadata says"),
    ("nnx.predict", ["{missing}", "{digit}"], 1, "no such file or folder"),
])
def test_real_cli_errors_are_one_line(tmp_path, weights_file, module, args, code, message):
    binary = tmp_path / "spec.bin"
    binary.write_bytes(bytes(range(256)))
    tampered = tamper(weights_file, tmp_path / "t.safetensors",
                      array_edit=lambda a: a.update({k: v.astype(np.int32) for k, v in a.items()}))
    digit = tmp_path / "digit.npy"
    np.save(digit, np.zeros((28, 28), np.float32))
    names = {"binary": binary, "tampered": tampered, "digit": digit, "missing": tmp_path / "nope"}
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    env.pop("NNX_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", module, *[a.format(**names) for a in args]],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == code, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    if code == 1:
        assert one_error_line(p.stderr)
    debug = subprocess.run([sys.executable, "-m", module, *[a.format(**names) for a in args]],
                           capture_output=True, text=True, env={**env, "NNX_DEBUG": "1"},
                           cwd=tmp_path, timeout=120)
    if code == 1:  # argparse errors stay usage errors; the others show their traceback
        assert "Traceback" in debug.stderr


def test_batchnorm_over_features_with_a_one_row_last_batch_is_an_error_up_front(tmp_path, synthetic,
                                                                                capsys):
    """600 digits, 99 held out: 501 training rows at batch 100 leave a last batch of 1 row,
    which a Dense → BatchNorm net cannot normalise; nothing is written."""
    assert train(["--arch", "dense:16,bn,relu,dense:10", "--val-size", "99", "--batch-size",
                  "100", "--epochs", "1", "--quiet", "--no-plots", "--out", tmp_path / "run"]) == 2
    assert "holds 1 row" in capsys.readouterr().err and not (tmp_path / "run").exists()



# --- run folders: nothing overwritten by a new run or a resume (a hostile trial's findings) ---
def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_out_through_a_missing_folder_and_dotdot_is_still_the_run(finished_run, capsys, monkeypatch):
    """``--out missing/../run`` reaches the existing run: refused, and no ``missing`` made."""
    monkeypatch.chdir(finished_run.parent)
    before = _snapshot(finished_run)
    with pytest.raises(SystemExit) as info:
        train([*QUICK, "--out", "missing/../run"])
    assert info.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert not (finished_run.parent / "missing").exists() and _snapshot(finished_run) == before


@pytest.mark.parametrize("where", ["checkpoints/epoch-0002", "checkpoints", "copy"])
def test_out_is_not_a_checkpoint_or_a_folder_of_run_files(finished_run, capsys, where):
    import shutil

    target = finished_run / where if where != "copy" else finished_run.parent / "copy"
    if where == "copy":  # a run's files without its config.json
        shutil.copytree(finished_run / "checkpoints" / "epoch-0002", target)
    before = _snapshot(finished_run.parent)
    with pytest.raises(SystemExit) as info:
        train([*QUICK, "--out", target])
    err = capsys.readouterr().err
    assert info.value.code == 2 and ("inside the checkpoints" in err or "already holds" in err)
    assert _snapshot(finished_run.parent) == before


def test_default_run_folders_never_collide(tmp_path, monkeypatch):
    import datetime

    import nnx.train as t

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 30, 12, 0, 0)

    monkeypatch.setattr(t._dt, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    assert t._default_run_dir() == Path("runs/20261130-120000")
    (tmp_path / "runs" / "20261130-120000").mkdir(parents=True)
    (tmp_path / "runs" / "20261130-120000-2").mkdir()
    assert t._default_run_dir() == Path("runs/20261130-120000-3")


def test_resume_of_a_finished_run_without_checkpoints_refuses(finished_run, capsys):
    import shutil

    shutil.rmtree(finished_run / "checkpoints")
    before = _snapshot(finished_run)
    assert train(["--resume", finished_run, "--epochs", "3", "--quiet", "--no-plots"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no complete checkpoint is left" in line and "model.safetensors" in line
    assert _snapshot(finished_run) == before


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("lr"), "missing settings ['lr']"),
    (lambda s: s.update(dtype="float64"), "dtype float64, its checkpoint holds float32"),
    (lambda s: s.update(layers="784,32,10"), "another network than its checkpoint"),
])
def test_resume_refuses_a_config_json_that_is_not_the_checkpoints(finished_run, capsys, edit,
                                                                    message):
    config = json.loads((finished_run / "config.json").read_text())
    edit(config["settings"])
    (finished_run / "config.json").write_text(json.dumps(config))
    before = _snapshot(finished_run)
    try:  # a damaged config.json is the argument parser's error; a contradiction main's
        code = train(["--resume", finished_run, "--epochs", "3", "--quiet", "--no-plots"])
    except SystemExit as e:
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert _snapshot(finished_run) == before


def test_an_incomplete_newest_checkpoint_is_named(finished_run, capsys):
    (finished_run / "checkpoints" / "epoch-0002" / "state.json").unlink()
    assert train(["--resume", finished_run, "--epochs", "3", "--quiet", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "epoch-0002 is incomplete (no state.json)" in err and "resuming from epoch-0001" in err


@pytest.mark.parametrize("argv", [["--optimizer", "adam", "--momentum", "0.5"],
                                  ["--model", "cnn", "--momentum", "0.5"],
                                  ["--optimizer", "sgd", "--momentum", "0.5"]])
def test_momentum_for_an_optimizer_without_it_is_an_error(tmp_path, capsys, argv, synthetic):
    with pytest.raises(SystemExit) as info:
        train([*argv, "--out", tmp_path / "run"])
    assert info.value.code == 2 and "--momentum applies to --optimizer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_to_fewer_epochs_says_the_schedule_shortens():
    from types import SimpleNamespace

    from nnx.schedules import make_schedule
    from nnx.train import _explain_resume

    notes = []
    for epochs, previous, step in ((3, 6, 20), (8, 6, 20), (11, 10, 1)):
        cfg = {"_previous_epochs": previous, "epochs": epochs, "schedule": "cosine", "lr": 0.1,
               "warmup_epochs": 0.0}
        trainer = SimpleNamespace(epoch=step // 10, global_step=step)
        _explain_resume(cfg, trainer, make_schedule("cosine", 0.1, epochs, 10), 10, notes.append)
    assert "(was 6) shortens the cosine schedule" in notes[0] and "drops to" in notes[0]
    assert "(was 6) stretches the cosine schedule" in notes[1] and "restarts at" in notes[1]
    assert "(was 10) stretches" in notes[2]  # early in a run: the rate still falls a little


def test_dense_backward_needs_its_own_training_forward():
    b = nnx.get_backend("numpy")
    model = nnx.mlp([4, 3, 2], backend=b, seed=0)
    x = np.ones((2, 4), np.float32)
    dense = model.layers[0]
    with pytest.raises(RuntimeError, match="backward needs a training forward"):
        dense.backward(np.ones((2, 3), np.float32))  # no forward at all
    dense.forward(x, train=False)
    with pytest.raises(RuntimeError, match="backward needs a training forward"):
        dense.backward(np.ones((2, 3), np.float32))
    dense.forward(x, train=True)
    dense.backward(np.ones((2, 3), np.float32))
    with pytest.raises(RuntimeError, match="backward needs a training forward"):
        dense.backward(np.ones((2, 3), np.float32))  # once per forward


def test_losses_of_an_empty_batch_are_nan_not_a_crash():
    ce, mse = nnx.SoftmaxCrossEntropy(), nnx.losses.MSE()
    assert np.isnan(float(ce.forward(np.zeros((0, 10), np.float32), np.zeros(0, np.int64))))
    assert ce.backward().shape == (0, 10)
    assert np.isnan(float(mse.forward(np.zeros((0, 3)), np.zeros((0, 3)))))
    assert mse.backward().shape == (0, 3)


def test_resume_of_a_checkpoint_folder_names_its_run(finished_run, capsys):
    with pytest.raises(SystemExit) as info:
        train(["--resume", finished_run / "checkpoints" / "epoch-0002"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"--resume {finished_run.resolve()}" in err


def test_nnx_save_then_load_on_another_backend(tmp_path):
    from nnx.architectures import build_layers

    b = nnx.get_backend("numpy")
    model = nnx.Sequential(build_layers("conv:4,bn,relu,maxpool:2,flatten,dense:10", (1, 28, 28)),
                           (1, 28, 28), backend=b, seed=1)
    x = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    model.forward(x, train=True)  # running statistics move away from their initial values
    path = nnx.save(model, tmp_path / "new" / "deeper")  # a folder, created
    assert path == tmp_path / "new" / "deeper" / "model.safetensors"
    assert nnx.save(model, tmp_path / "m.safetensors") == tmp_path / "m.safetensors"
    want = b.to_numpy(model.probabilities(x))
    for where in (path, tmp_path / "m.safetensors", path.parent):
        back = nnx.load(where, backend="strict", device="device1")
        got = back.backend.to_numpy(back.probabilities(back.backend.from_numpy(x)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary file left


def test_nnx_save_errors_are_clear(tmp_path):
    model = nnx.mlp([4, 3], seed=0)
    with pytest.raises(TypeError, match="nnx Sequential"):
        nnx.save(model.layers[0], tmp_path / "x.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(ck.SaveError, match="is a folder"):
        nnx.save(model, tmp_path / "folder.safetensors")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ck.SaveError, match="cannot save the model"):
        nnx.save(model, tmp_path / "file" / "m.safetensors")  # inside a file


def test_a_file_squatting_on_a_checkpoint_name_is_not_left_behind(finished_run, capsys):
    import shutil

    shutil.rmtree(finished_run / "checkpoints" / "epoch-0002")
    (finished_run / "checkpoints" / "epoch-0002").write_text("squatter")
    assert train(["--resume", finished_run, "--epochs", "3", "--quiet", "--no-plots"]) == 0
    assert [p.name for p in finished_run.rglob(".*")] == []
    assert [p.name for p in list_checkpoints(finished_run)] == ["epoch-0002", "epoch-0003"]


def test_labels_of_another_library_are_a_clear_error():
    pytest.importorskip("torch")
    b = nnx.get_backend("torch", "cpu")
    out = nnx.mlp([4, 3], backend=b, seed=0).forward(b.from_numpy(np.ones((2, 4), np.float32)))
    for loss, target in ((nnx.SoftmaxCrossEntropy(), np.array([0, 1])),
                         (nnx.MSE(), np.zeros((2, 3), np.float32))):
        with pytest.raises(TypeError, match="put the target on the model's backend"):
            loss.forward(out, target)


# --- the Python API's argument checks (a second hostile trial) --------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda p: nnx.optim.Adam(p, betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\)"),
    (lambda p: nnx.optim.Adam(p, betas=(0.9, -0.1)), r"betas\[1\] must be in \[0, 1\)"),
    (lambda p: nnx.optim.Adam(p, eps=-1e-8), "eps must be a finite number >= 0"),
    (lambda p: nnx.Dense(4.5, 3), "positive integers"),
    (lambda p: nnx.LeakyReLU(float("nan")), "slope must be a finite number"),
    (lambda p: nnx.schedules.Exponential(0.1, 100, 10, gamma=-1.0), "gamma must be a finite number > 0"),
    (lambda p: nnx.schedules.StepDecay(0.1, 100, 10, gamma=0.0), "gamma must be a finite number > 0"),
])
def test_bad_constructor_arguments_are_refused(make, message):
    import nnx.optim  # noqa: F401
    import nnx.schedules  # noqa: F401

    params = nnx.mlp([3, 2], seed=0).named_parameters()
    with pytest.raises(ValueError, match=message):
        make(params)


@pytest.mark.parametrize("lr", [-1.0, float("nan"), float("inf")])
def test_optimizer_step_refuses_a_bad_learning_rate(lr):
    from nnx.optim import SGD

    model = nnx.mlp([3, 2], seed=0)
    model.forward(np.ones((2, 3), np.float32), train=True)
    model.backward(np.ones((2, 2), np.float32))
    opt = SGD(model.named_parameters(), lr=0.1)
    before = [np.array(p.value) for p in model.parameters()]
    with pytest.raises(ValueError, match="finite learning rate"):
        opt.step(lr)
    for a, p in zip(before, model.parameters()):
        np.testing.assert_array_equal(a, p.value)


def test_loss_backward_before_forward_is_a_clear_error():
    for loss in (nnx.SoftmaxCrossEntropy(), nnx.MSE()):
        with pytest.raises(RuntimeError, match="backward needs a forward first"):
            loss.backward()


@pytest.mark.parametrize("tamper, message", [
    ("_Pool2D", "unknown layer type '_Pool2D'"),
    ("Sequential", "unknown layer type 'Sequential'"),
    ("deep", "nests"),
    ("negative var", "negative or NaN variances"),
])
def test_tampered_architectures_and_buffers_are_refused(tmp_path, tamper, message):
    from nnx.architectures import build_layers

    model = nnx.Sequential(build_layers("dense:4,bn,relu,dense:3", (5,)), (5,), seed=0)
    path = nnx.save(model, tmp_path / "m.safetensors")
    arrays, meta = ck.load_safetensors(path)
    arch = json.loads(meta["architecture"])
    if tamper in ("_Pool2D", "Sequential"):
        arch[2] = {"type": tamper}
    elif tamper == "negative var":
        arrays["1.running_var"] = -np.abs(arrays["1.running_var"]) - 1.0
    meta["architecture"] = json.dumps(arch)
    if tamper == "deep":  # written as text: json.dumps itself would recurse too deeply
        deep = '{"type": "Residual", "layers": [' * 5000 + '{"type": "ReLU"}' + "]}" * 5000
        meta["architecture"] = json.dumps(arch[:2])[:-1] + ", " + deep + "]"
    ck.save_safetensors(path, arrays, meta)
    with pytest.raises(CheckpointError, match=message):
        nnx.load(path)


def test_no_sync_bn_turns_a_runs_setting_off_on_resume(finished_run, capsys):
    config = json.loads((finished_run / "config.json").read_text())
    config["settings"]["sync_bn"] = True
    (finished_run / "config.json").write_text(json.dumps(config))
    assert train(["--resume", finished_run, "--epochs", "3", "--no-sync-bn", "--quiet",
                  "--no-plots"]) == 0
    assert json.loads((finished_run / "config.json").read_text())["settings"]["sync_bn"] is False



def test_out_with_a_tilde_is_checked_where_it_is_written(tmp_path, monkeypatch, capsys, synthetic):
    """``--out=~/run`` (no shell expansion): the folder checked is the folder written, so a
    second run into it is refused instead of overwriting it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert train([*QUICK, "--out", "~/run"]) == 0
    assert (tmp_path / "home" / "run" / "model.safetensors").is_file()
    assert not (tmp_path / "~").exists()
    with pytest.raises(SystemExit) as info:
        train([*QUICK, "--out", "~/run"])
    assert info.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert nnx.load("~/run").num_parameters() > 0  # nnx.load expands ~ too


def test_a_default_folder_taken_meanwhile_gets_the_next_name(tmp_path):
    from nnx.train import _reserve

    base = tmp_path / "runs" / "20261130-120000"
    assert _reserve(base) == base and base.is_dir()
    assert _reserve(base) == tmp_path / "runs" / "20261130-120000-2"
    assert _reserve(base) == tmp_path / "runs" / "20261130-120000-3"


def test_a_run_from_before_newer_settings_still_resumes(finished_run):
    """Settings added after the first config.json ("arch", "sync_bn") take their defaults."""
    config = json.loads((finished_run / "config.json").read_text())
    for key in ("arch", "sync_bn"):
        config["settings"].pop(key, None)
    (finished_run / "config.json").write_text(json.dumps(config))
    assert train(["--resume", finished_run, "--epochs", "3", "--quiet", "--no-plots"]) == 0


def test_checkpoints_folders_of_other_projects_are_not_runs(tmp_path, synthetic):
    project = tmp_path / "proj"
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.json").write_text('{"not": "nnx"}')
    assert train([*QUICK, "--out", project / "checkpoints" / "nnx-run"]) == 0


@pytest.mark.parametrize("make, message", [
    (lambda s: s.StepDecay(0.1, 10, 1, every_epochs=0), "every_epochs must be an integer >= 1"),
    (lambda s: s.Cosine(0.1, 10, 1, min_lr=0.2), "min_lr must be between 0 and the base rate"),
    (lambda s: s.make_schedule("cosine", 0.1, 1, 10, warmup_epochs=-1), "warm-up steps must be >= 0"),
])
def test_bad_schedule_arguments_are_refused(make, message):
    import nnx.schedules as s

    with pytest.raises(ValueError, match=message):
        make(s)


def test_an_empty_device_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train(["--device", "", "--out", tmp_path / "run"])
    assert info.value.code == 2 and "--device is empty" in capsys.readouterr().err


def test_evaluate_says_when_it_cannot_create_its_output_folder(tmp_path):
    from nnx.evaluate import EvaluateError, evaluate

    (tmp_path / "file").write_text("x")
    model = nnx.mlp([784, 10], seed=0)
    from mnist_location import SKIP_REASON, mnist_dir

    if mnist_dir() is None:
        pytest.skip(SKIP_REASON)
    with pytest.raises(EvaluateError, match="cannot create the output folder"):
        evaluate(model, out_dir=tmp_path / "file" / "sub", plots=False, data_dir=mnist_dir())
