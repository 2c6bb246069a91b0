"""Options that would be silently ignored are refused; notes and single error lines where a
user trial found surprises (a second user-trial pass)."""
from __future__ import annotations

import pytest

import nnx.datasets as ds
from nnx.backends import BackendError, get_backend
from nnx.train import main
from tests_helpers_train import synthetic_digits

QUICK = ["--epochs", "1", "--batch-size", "100", "--val-size", "100", "--quiet", "--no-plots"]


@pytest.fixture
def synthetic(monkeypatch):
    data = synthetic_digits(n_train=600, n_test=120)
    monkeypatch.setattr(ds, "load", lambda *a, **k: data)


@pytest.mark.parametrize("argv,message", [
    (["--model", "cnn", "--arch", "conv:8,flatten,dense:10"], "both name a network"),
    (["--arch", "conv:8,flatten,dense:10", "--dropout", "0.3"], "--dropout shapes the MLP only"),
    (["--model", "cnn", "--layers", "784,10", "--activation", "tanh"],
     "--layers, --activation shape the MLP only; --model cnn"),
])
def test_options_that_would_be_ignored_are_refused(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_mlp_options_with_the_mlp_are_fine(synthetic, tmp_path):
    assert main(["--model", "mlp", "--layers", "784,16,10", "--dropout", "0.1",
                 "--out", str(tmp_path / "r"), *QUICK]) == 0


def test_a_diverging_run_prints_one_line(synthetic, tmp_path, capfd):
    """NumPy's overflow warnings stay quiet (a warning raised here would fail the run): the
    Trainer's NaN message is the one line."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        code = main(["--optimizer", "sgd", "--lr", "1e30", "--weight-decay", "0", "--schedule",
                     "constant", "--layers", "784,16,10", "--out", str(tmp_path / "r"), *QUICK])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: loss became nan"), err


def test_sync_bn_in_one_process_gets_a_note(synthetic, tmp_path, capsys):
    assert main(["--sync-bn", "--layers", "784,16,10", "--out", str(tmp_path / "r"), *QUICK]) == 0
    assert "--sync-bn changes nothing in a one-process run" in capsys.readouterr().err


def test_numpy_on_cuda_names_the_backend_to_use():
    with pytest.raises(BackendError, match="use --backend cupy"):
        get_backend("numpy", "cuda")
