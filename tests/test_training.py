"""Trainer, checkpoints, resume and the CLI, on synthetic data (always) and real MNIST
(when ../shared/data/mnist or NNX_DATA_DIR is present)."""
import json
import math
import os
import signal

import numpy as np
import pytest

import nnx
from nnx.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from nnx.data import make_splits
from nnx.optim import make_optimizer
from nnx.schedules import make_schedule
from nnx.trainer import Trainer, TrainingDiverged, TrainingInterrupted

from mnist_location import SKIP_REASON, mnist_dir
from tests_helpers_train import synthetic_digits


def make_trainer(backend, run_dir=None, epochs=3, dropout=0.0, seed=0, data=None, sizes=(784, 32, 10),
                 optimizer="nesterov", lr=0.05, patience=0, schedule="cosine"):
    data = data or synthetic_digits()
    splits = make_splits(data, backend, backend.float32, val_size=200, seed=seed)
    model = nnx.mlp(list(sizes), dropout=dropout, backend=backend, seed=seed)
    opt = make_optimizer(optimizer, model.named_parameters(), lr, weight_decay=1e-4)
    steps = math.ceil(len(splits["train"]) / 64)
    sched = make_schedule(schedule, lr, epochs, steps)
    t = Trainer(model, opt, sched, batch_size=64, epochs=epochs, seed=seed, early_stopping=patience,
                run_dir=run_dir, progress=False, log=lambda *a: None)
    return t, splits


def weights(model):
    return model.state_dict()


def test_trains_synthetic_to_high_accuracy(backend):
    t, s = make_trainer(backend, epochs=2)
    history = t.fit(s["train"], s["val"], s["test"])
    assert len(history) == 2
    assert history[-1]["val_acc"] > 0.95 and t.result["test_acc"] > 0.95
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_partial_last_batch_is_used():
    b = nnx.get_backend("numpy")
    data = synthetic_digits(n_train=200 + 130)  # 130 training samples: 64 + 64 + 2
    t, s = make_trainer(b, data=data, epochs=1)
    t.fit(s["train"])
    assert t.global_step == 3


def test_run_folder_contents_and_torch_loadable_weights(tmp_path):
    b = nnx.get_backend("numpy")
    t, s = make_trainer(b, run_dir=tmp_path, epochs=3)
    t.fit(s["train"], s["val"], s["test"])
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert {"train_loss", "val_loss", "val_acc", "epoch_time_s", "samples_per_s", "lr"} <= set(lines[0])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0002", "epoch-0003"]  # keeps 2
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test_acc"] == pytest.approx(t.result["test_acc"])
    # nnx.load rebuilds the model on another backend with identical predictions
    x = s["test"].x[:50, ...]
    for other in (nnx.get_backend("strict", "device1"),):
        m2 = nnx.load(tmp_path, backend=other)
        p1 = b.to_numpy(t.model.probabilities(x))
        p2 = other.to_numpy(m2.probabilities(other.from_numpy(b.to_numpy(x))))
        np.testing.assert_allclose(p1, p2, rtol=1e-5, atol=1e-6)
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    net = torch.nn.Sequential(torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    net.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    with torch.no_grad():
        out = net(torch.from_numpy(b.to_numpy(x))).numpy()
    np.testing.assert_allclose(out, b.to_numpy(t.model.forward(x)), rtol=1e-5, atol=1e-5)


def _interrupt_at(trainer, global_step):
    """Wrap the training step so a real SIGINT arrives while step ``global_step`` runs."""
    base, fired = trainer.step, []

    def step(*args):
        if trainer.global_step == global_step and not fired:
            fired.append(global_step)
            os.kill(os.getpid(), signal.SIGINT)
        return base(*args)

    trainer.step = step


@pytest.mark.parametrize("stop_step, dropout", [(15, 0.0), (15, 0.3), (7, 0.0), (19, 0.0),
                                               (7, 0.3), (19, 0.3)])
def test_resume_reaches_the_same_weights(tmp_path, stop_step, dropout):
    """Ctrl-C (a real SIGINT) at an epoch end (step 15 is the last of 16) or mid-epoch, then
    resume: bit-identical final weights — with dropout too, since the resumed epoch replays
    the masks of the steps already done (``Sequential.skip_steps``)."""
    b = nnx.get_backend("numpy")
    ref, s = make_trainer(b, run_dir=tmp_path / "ref", epochs=3, dropout=dropout)  # 16 steps/epoch
    ref.fit(s["train"], s["val"])

    run = tmp_path / "run"
    first, s1 = make_trainer(b, run_dir=run, epochs=3, dropout=dropout)
    _interrupt_at(first, stop_step)
    with pytest.raises(TrainingInterrupted) as info:
        first.fit(s1["train"], s1["val"])
    assert info.value.checkpoint == latest_checkpoint(run)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    second, s2 = make_trainer(b, run_dir=run, epochs=3, dropout=dropout)
    second.resume(latest_checkpoint(run))
    assert second.global_step == stop_step + 1 or second.step_in_epoch == 0
    second.fit(s2["train"], s2["val"])
    w_ref, w_res = weights(ref.model), weights(second.model)
    for k in w_ref:
        np.testing.assert_array_equal(w_ref[k], w_res[k], err_msg=k)
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert lines[-1]["train_loss"] == pytest.approx(ref.history[-1]["train_loss"], rel=1e-6)


def test_resume_rejects_other_architecture(tmp_path):
    b = nnx.get_backend("numpy")
    t, s = make_trainer(b, run_dir=tmp_path, epochs=1)
    t.fit(s["train"])
    other, _ = make_trainer(b, epochs=1, sizes=(784, 16, 10))
    with pytest.raises(CheckpointError, match="architecture does not match") as info:
        other.resume(latest_checkpoint(tmp_path))
    assert "784→32" in str(info.value) and "784→16" in str(info.value)


def test_interrupted_write_leaves_last_good_checkpoint(tmp_path, monkeypatch):
    """A crash while writing a checkpoint leaves the previous one complete and loadable."""
    b = nnx.get_backend("numpy")
    t, s = make_trainer(b, run_dir=tmp_path, epochs=2)
    t.fit(s["train"])
    import nnx.checkpoint as ck

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck, "atomic_write_json", crash)
    t.epoch = 2
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, t.model, t.optimizer, {**t.state(), "epoch": 3})
    assert latest_checkpoint(tmp_path).name == "epoch-0002"
    nnx.load(tmp_path)  # still loads


def test_nan_loss_stops_with_clear_message(tmp_path):
    b = nnx.get_backend("numpy")
    t, s = make_trainer(b, run_dir=tmp_path, epochs=3, optimizer="sgd", lr=1e6, schedule="constant")
    with pytest.raises(TrainingDiverged, match="smaller --lr"):
        with np.errstate(all="ignore"):
            t.fit(s["train"], s["val"])


def test_early_stopping_restores_best_weights():
    b = nnx.get_backend("numpy")
    data = synthetic_digits()
    x, y = data["train"]
    y = np.random.default_rng(5).permutation(y)  # noisy labels: memorising them hurts validation
    data["train"] = (x, y)
    t, s = make_trainer(b, data=data, epochs=30, patience=2, optimizer="adam", lr=3e-3,
                        schedule="constant", sizes=(784, 128, 10))
    t.fit(s["train"], s["val"])
    assert len(t.history) < 30
    best = min(t.history, key=lambda r: r["val_loss"])
    val_loss, _ = t.evaluate(s["val"])
    assert val_loss == pytest.approx(best["val_loss"], rel=1e-5)


def test_trainer_rejects_bad_settings():
    b = nnx.get_backend("numpy")
    with pytest.raises(ValueError, match="batch size"):
        Trainer(nnx.mlp([4, 2], backend=b), None, None, batch_size=0)


# --- the CLI ------------------------------------------------------------------------------
def run_cli(args):
    from nnx.train import main

    return main(args)


def test_cli_help_explains_options(capsys):
    with pytest.raises(SystemExit):
        run_cli(["--help"])
    out = capsys.readouterr().out
    for option in ("--device", "--backend", "--resume", "--early-stopping", "--arch", "examples"):
        assert option in out


def test_cli_unusable_gpu_is_one_clear_error(capsys):
    """cuda:99 exists nowhere: without CuPy the error says what to install, with CuPy it says
    how many GPUs are visible; either way one line and exit code 2, never a traceback."""
    code = run_cli(["--device", "cuda:99", "--backend", "cupy", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "pip install 'nnx[cuda12]'" in err or "CUDA device(s) visible" in err


needs_mnist = pytest.mark.skipif(mnist_dir() is None,
                                 reason=SKIP_REASON)


@needs_mnist
def test_cli_small_run_then_resume(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--data-dir", str(mnist_dir()), "--limit", "3000", "--val-size", "500",
            "--epochs", "1", "--out", str(run), "--quiet", "--no-plots", "--seed", "3"]
    assert run_cli(args) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["seed"] == 3 and config["backend"] == "numpy"
    assert "numpy" in config["versions"] and config["nnx_version"] == nnx.__version__
    assert run_cli(["--resume", str(run), "--epochs", "2", "--quiet", "--no-plots"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
    assert "test accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # settings of a resumed run cannot change
        run_cli(["--resume", str(run), "--lr", "0.5"])
    assert run_cli(["--resume", str(run), "--epochs", "1", "--quiet"]) == 2  # cannot shrink
    assert "fewer than the 2 epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a finished run folder is not silently reused
        run_cli(args)


@needs_mnist
def test_full_mnist_two_epochs_reaches_97_percent(tmp_path):
    from nnx import datasets

    b = nnx.get_backend("numpy")
    data = datasets.load("mnist", data_dir=mnist_dir(), progress=False)
    splits = make_splits(data, b, b.float32, val_size=5000, seed=0)
    model = nnx.mlp([784, 128, 64, 10], backend=b, seed=0)
    opt = make_optimizer("nesterov", model.named_parameters(), 0.1, weight_decay=5e-4)
    sched = make_schedule("cosine", 0.1, 2, math.ceil(55000 / 128))
    t = Trainer(model, opt, sched, batch_size=128, epochs=2, progress=False, log=lambda *a: None)
    t.fit(splits["train"], splits["val"], splits["test"])
    assert t.result["test_acc"] >= 0.97


def test_cnn_checkpoint_resume_and_load(tmp_path):
    """CNNs (conv, batch norm with its running buffers, residual) checkpoint and resume exactly."""
    from nnx.architectures import build_layers

    b = nnx.get_backend("numpy")
    spec = "conv:4,bn,relu,maxpool:2,res[conv:4,bn,relu],maxpool:2,flatten,dense:10"
    data = synthetic_digits(n_train=456, n_test=64)

    def trainer(run_dir):
        splits = make_splits(data, b, b.float32, val_size=200, seed=0, flatten=False)
        model = nnx.Sequential(build_layers(spec, (1, 28, 28)), (1, 28, 28), backend=b, seed=0)
        opt = make_optimizer("adam", model.named_parameters(), 3e-3)
        sched = make_schedule("cosine", 3e-3, 2, 4)
        return Trainer(model, opt, sched, batch_size=64, epochs=2, run_dir=run_dir,
                       progress=False, log=lambda *a: None), splits

    ref, s = trainer(tmp_path / "ref")
    ref.fit(s["train"], s["val"], s["test"])
    first, s1 = trainer(tmp_path / "run")
    _interrupt_at(first, 3)  # last step of epoch 1
    with pytest.raises(TrainingInterrupted):
        first.fit(s1["train"], s1["val"])
    second, s2 = trainer(tmp_path / "run")
    second.resume(latest_checkpoint(tmp_path / "run"))
    second.fit(s2["train"], s2["val"], s2["test"])
    w_ref, w_res = weights(ref.model), weights(second.model)
    assert "1.running_mean" in w_ref and "4.fn.1.running_var" in w_ref
    for k in w_ref:
        np.testing.assert_array_equal(w_ref[k], w_res[k], err_msg=k)
    loaded = nnx.load(tmp_path / "ref", backend=nnx.get_backend("strict", "device1"))
    x = s["test"].x[:8, ...]
    np.testing.assert_allclose(loaded.backend.to_numpy(loaded.probabilities(loaded.backend.from_numpy(b.to_numpy(x)))),
                               b.to_numpy(ref.model.probabilities(x)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec, shape", [("dense:16,relu,dense:10", (784,)),
                                         ("conv:3,relu,maxpool:2,flatten,dense:10", (1, 28, 28))])
def test_backward_without_input_grad_gives_the_same_parameter_grads(spec, shape):
    """The trainer skips d loss / d input (input_grad=False); parameter gradients must not change."""
    from nnx.architectures import build_layers

    b = nnx.get_backend("numpy")
    m = nnx.Sequential(build_layers(spec, shape), shape, backend=b, dtype="float64")
    x = b.from_numpy(np.random.default_rng(0).random((4, *shape)))
    y = b.from_numpy(np.array([1, 2, 3, 4]))
    loss = nnx.SoftmaxCrossEntropy()
    loss.forward(m.forward(x, train=True), y)
    dx = m.backward(loss.backward())
    full = {k: p.grad.copy() for k, p in m.named_parameters().items()}
    loss.forward(m.forward(x, train=True), y)
    assert m.backward(loss.backward(), input_grad=False) is None
    for k, p in m.named_parameters().items():
        np.testing.assert_array_equal(p.grad, full[k], err_msg=k)
    loss.forward(m.forward(x, train=True), y)
    np.testing.assert_array_equal(m.backward(loss.backward()), dx)  # default computes it again


def test_input_grad_flag_is_restored_when_first_layer_has_no_parameters():
    b = nnx.get_backend("numpy")
    m = nnx.Sequential([nnx.Flatten(), nnx.Dense(4, 2)], (2, 2), backend=b, dtype="float64")
    x = b.from_numpy(np.ones((3, 2, 2)))
    m.forward(x, train=True)
    assert m.backward(b.from_numpy(np.ones((3, 2))), input_grad=False) is None
    m.forward(x, train=True)
    dx = m.backward(b.from_numpy(np.ones((3, 2))))
    assert dx.shape == (3, 2, 2)


def test_resume_with_early_stopping_and_batchnorm_on_strict(tmp_path):
    """best.safetensors holds int64 BatchNorm counters: they must come back with their dtype."""
    b = nnx.get_backend("strict", "device1")
    data = synthetic_digits(n_train=328, n_test=32)

    def trainer():
        splits = make_splits(data, b, b.float32, val_size=200, seed=0)
        layers = [nnx.Dense(784, 8), nnx.BatchNorm(8), nnx.ReLU(), nnx.Dense(8, 10)]
        model = nnx.Sequential(layers, (784,), backend=b, seed=0)
        opt = make_optimizer("adam", model.named_parameters(), 1e-3)
        return Trainer(model, opt, make_schedule("constant", 1e-3, 2, 2), batch_size=64, epochs=2,
                       early_stopping=5, run_dir=tmp_path, progress=False, log=lambda *a: None), splits

    t, s = trainer()
    t.fit(s["train"], s["val"])
    again, _ = trainer()
    again.resume(latest_checkpoint(tmp_path))
    assert again.best_weights["1.num_batches_tracked"].dtype == b.int64
    again.restore_best()


def test_cli_rejects_too_large_validation_split(capsys):
    with pytest.raises(SystemExit):
        run_cli(["--val-size", "60000"])
    assert "--val-size must be between 0 and 49999" in capsys.readouterr().err


def test_the_first_steps_are_timed_apart_from_the_epoch():
    """A slow first step (as a compilation is) lands in warmup_s of epoch 1, not in its
    epoch time or samples/s; later epochs have no warm-up."""
    import time as _time

    t, s = make_trainer(nnx.get_backend("numpy"), epochs=2)
    base, calls = t.step, []

    def slow_first(*args):
        calls.append(1)
        if len(calls) == 1:
            _time.sleep(0.5)
        return base(*args)

    t.step = slow_first
    history = t.fit(s["train"], s["val"])
    assert history[0]["warmup_s"] >= 0.5
    assert "warmup_s" not in history[1]
    steps = math.ceil(len(s["train"]) / 64)
    rows = len(s["train"]) - 2 * 64
    sps, secs = history[0]["samples_per_s"], history[0]["epoch_time_s"]  # (times are rounded)
    assert abs(sps - rows / secs) < abs(sps - (rows + 2 * 64) / secs)  # warm-up rows left out
    assert len(calls) == 2 * steps


def test_a_resume_rebuilds_the_model_its_checkpoint_was_trained_as():
    """A checkpoint's own layer specs rebuild the model, also when the spec builder changed
    since (the CNN presets' convolutions had a bias before batch norm, and Conv2D had no
    ``method`` argument): architecture checks compare with today's defaults filled in."""
    from nnx.checkpoint import check_architecture
    from nnx.train import DEFAULTS, build_model

    old_specs = [{"type": "Conv2D", "in_channels": 1, "out_channels": 4, "kernel_size": 3,
                  "stride": 1, "padding": 1, "bias": True, "init": "he_normal"},
                 {"type": "BatchNorm", "num_features": 4, "eps": 1e-5, "momentum": 0.1},
                 {"type": "Flatten"}, {"type": "Dense", "in_features": 3136, "out_features": 10,
                                       "init": "he_normal", "bias": True}]
    cfg = dict(DEFAULTS, arch="conv:4,bn,flatten,dense:10")
    b = nnx.get_backend("numpy")
    model = build_model(cfg, b, saved=(old_specs, (1, 28, 28)))
    assert model.layers[0].use_bias  # as trained, not as today's builder would make it
    check_architecture(model, {"architecture": old_specs, "input_shape": [1, 28, 28]}, "ckpt")
    today = build_model(cfg, b)
    assert not today.layers[0].use_bias
    with pytest.raises(CheckpointError, match="first difference, layer 0"):
        check_architecture(today, {"architecture": old_specs, "input_shape": [1, 28, 28]}, "ckpt")


def test_batchnorm_over_features_with_a_one_row_step_is_refused_before_training():
    """A Dense → BatchNorm network whose last batch (or a process's share of a batch) would
    hold one row: a clear error up front, not a crash at the end of the first epoch; a
    convolution's batch norm, an empty share and --sync-bn's global statistics are fine."""
    from nnx.architectures import build_layers
    from nnx.trainer import batchnorm_rows_problem

    b = nnx.get_backend("numpy")
    dense_bn = nnx.Sequential(build_layers("dense:8,bn,relu,dense:3", (12,)), (12,), backend=b)
    conv_bn = nnx.Sequential(build_layers("conv:2,bn,relu,flatten,dense:3", (1, 4, 4)),
                             (1, 4, 4), backend=b)
    assert "last batch of each epoch holds 1 row" in batchnorm_rows_problem(dense_bn, 129, 64)
    assert batchnorm_rows_problem(dense_bn, 130, 64) is None
    assert batchnorm_rows_problem(conv_bn, 129, 64) is None  # 1 row × 16 positions
    pooled_to_1x1 = nnx.Sequential(build_layers("conv:2,maxpool:2,maxpool:2,bn,relu,flatten,dense:3",
                                                (1, 4, 4)), (1, 4, 4), backend=b)
    assert "holds 1 row" in batchnorm_rows_problem(pooled_to_1x1, 129, 64)  # 1×1 maps
    # 4 processes: a last batch of 5 rows gives shares 1, 1, 1, 2; of 2 rows, 0, 1, 0, 1
    assert "use --sync-bn" in batchnorm_rows_problem(dense_bn, 128 + 5, 64, world=4)
    assert batchnorm_rows_problem(dense_bn, 128 + 5, 64, world=4, sync=True) is None
    assert batchnorm_rows_problem(dense_bn, 128 + 1, 64, world=4, sync=True) is not None
    assert batchnorm_rows_problem(dense_bn, 128 + 8, 64, world=4) is None  # shares of 2
    assert batchnorm_rows_problem(dense_bn, 128, 4, world=4) is not None  # every step: 1 row
    # the Trainer refuses it too (library use), before any step
    model = nnx.Sequential(build_layers("flatten,dense:16,bn,relu,dense:10", (784,)), (784,),
                           backend=b)
    opt = make_optimizer("sgd", model.named_parameters(), 0.1)
    t = Trainer(model, opt, make_schedule("constant", 0.1, 1, 3), batch_size=64, epochs=1,
                progress=False, log=lambda *a: None)
    data = synthetic_digits(n_train=129 + 200, n_test=20)
    splits = make_splits(data, b, b.float32, val_size=200)
    with pytest.raises(ValueError, match="holds 1 row"):
        t.fit(splits["train"])
    assert t.global_step == 0
