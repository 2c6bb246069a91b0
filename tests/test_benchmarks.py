"""The benchmark suite (``python -m benchmarks``): a quick run produces valid JSON and
Markdown, and its peers compute what nnx computes (same loss, same update) from the same
weights and batch. Timing targets are measured by the suite, never asserted here."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import impls
from benchmarks.timing import summarize
from nnx.backends import get_backend


def _batch(kind, n=16, seed=0):
    rng = np.random.default_rng(seed)
    data = {"train": (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, n).astype(np.uint8))}
    return impls.step_batches(data, kind, n, 1, "float64")[0]


def test_quick_run_writes_json_markdown_and_charts(tmp_path):
    from benchmarks.cli import main

    rc = main(["--quick", "--backends", "numpy,strict", "--refs", "numpy", "--skip-accuracy",
               "--repeats", "2", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("command", "created", "config", "machine", "peaks", "cases", "load_start",
                "load_end", "flops_per_sample"):
        assert key in res
    assert res["machine"]["cpu"]["model"]
    assert "OPENBLAS_CORETYPE" in res["machine"]["env"]
    assert res["peaks"]["cpu"]["best_flop_per_s"] > 0
    timed = [c for c in res["cases"] if c["kind"] in ("train_step", "inference", "epoch")]
    assert {c["kind"] for c in timed} == {"train_step", "inference", "epoch"}
    assert {c["impl"] for c in timed} >= {"nnx-numpy", "nnx-strict", "plain-numpy"}
    for c in timed:
        assert c["median_s"] > 0 and c["min_s"] > 0 and len(c["samples"]) == c["n"]
        assert c["samples_per_s"] > 0 and c["flops"] > 0 and c["flop_per_s"] > 0
        assert c["frac_measured_peak"] > 0
        assert c["memory"]["ru_maxrss_bytes"] > 0
    steps = [c for c in timed if c["kind"] == "train_step"]
    assert sorted({c["batch_size"] for c in steps}) == [8, 64]
    md = (tmp_path / "results.md").read_text()
    assert "| device | batch | impl | median ms |" in md
    assert "| device | impl | median s |" in md
    for name in res["charts"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "step_time_mlp.png" in res["charts"]
    assert res["config"]["nnx_step_first_layer_input_grad"] is False


def test_with_input_grad_option():
    from benchmarks.cli import _resolve, build_parser

    p = build_parser()
    assert _resolve(p.parse_args([]), p).input_grad is False
    assert _resolve(p.parse_args(["--with-input-grad"]), p).input_grad is True
    with pytest.raises(SystemExit):
        p.parse_args(["--skip-input-grad"])


def test_flop_count_of_the_default_mlp():
    model = impls.build_nnx("mlp", get_backend("numpy", "cpu"))
    fwd = 2 * (784 * 128 + 128 * 64 + 64 * 10)
    assert impls.forward_flops(model, 1) == fwd
    # training skips the first layer's dx (2·784·128 per sample), as the Trainer does
    assert impls.train_step_flops(model, 32) == 32 * (3 * fwd - 2 * 784 * 128)
    assert impls.train_step_flops(model, 32, input_grad=True) == 3 * 32 * fwd


def test_cnn_flop_count():
    model = impls.build_nnx("cnn", get_backend("numpy", "cpu"))
    conv1 = 2 * 32 * 28 * 28 * 1 * 9
    conv2 = 2 * 64 * 14 * 14 * 32 * 9
    dense = 2 * (3136 * 128 + 128 * 10)
    assert impls.forward_flops(model, 2) == 2 * (conv1 + conv2 + dense)
    assert impls.train_step_flops(model, 2) == 2 * (3 * (conv1 + conv2 + dense) - conv1)


def test_summarize_quartiles():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median_s"], s["q1_s"], s["q3_s"], s["min_s"], s["max_s"]) == (3.0, 2.0, 4.0, 1.0, 5.0)
    assert s["n"] == 5 and s["iqr_s"] == 2.0


def _nnx_runner(kind, dtype="float64", input_grad=False):
    state = impls.reference_state(kind, dtype)
    r = impls.NnxRunner(get_backend("numpy", "cpu"), kind, state, dtype, input_grad)
    return r, state


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_torch_reference_matches_nnx(kind):
    torch = pytest.importorskip("torch")
    x, y = _batch(kind, n=8)
    nnx_r, state = _nnx_runner(kind)
    ref = impls.TorchRefRunner("cpu", kind, state, "float64")
    # same initial weights
    for k, v in ref.net.state_dict().items():
        np.testing.assert_array_equal(v.numpy().reshape(state[k].shape), state[k])
    nnx_r.load_batches([(x, y)])
    ref.load_batches([(x, y)])
    loss_nnx = float(nnx_r.train_step())
    loss_ref = float(ref.train_step())
    assert math.isclose(loss_nnx, loss_ref, rel_tol=1e-12)
    after = nnx_r.model.state_dict()
    for k, v in ref.net.state_dict().items():
        if v.dtype == torch.int64:
            assert int(v) == int(after[k])
            continue
        np.testing.assert_allclose(after[k], v.numpy().reshape(after[k].shape), rtol=1e-10,
                                   atol=1e-12, err_msg=k)
        if k.endswith("weight") and "running" not in k:
            assert not np.array_equal(after[k], state[k]), f"{k} did not move"


def test_torch_reference_matches_nnx_float32():
    pytest.importorskip("torch")
    x, y = _batch("mlp", n=32, seed=3)
    nnx_r, state = _nnx_runner("mlp", "float32")
    ref = impls.TorchRefRunner("cpu", "mlp", state, "float32")
    nnx_r.load_batches([(x.astype(np.float32), y)])
    ref.load_batches([(x.astype(np.float32), y)])
    for _ in range(3):
        assert math.isclose(float(nnx_r.train_step()), float(ref.train_step()), rel_tol=1e-5)
    after = nnx_r.model.state_dict()
    for k, v in ref.net.state_dict().items():
        np.testing.assert_allclose(after[k], v.numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


def test_plain_numpy_loop_matches_nnx():
    x, y = _batch("mlp", n=16, seed=1)
    nnx_r, state = _nnx_runner("mlp")
    plain = impls.PlainNumpyRunner("mlp", state, "float64")
    nnx_r.load_batches([(x, y)])
    plain.load_batches([(x, y)])
    for _ in range(2):
        assert math.isclose(float(nnx_r.train_step()), float(plain.train_step()), rel_tol=1e-12)
    after = nnx_r.model.state_dict()
    for i in range(3):
        np.testing.assert_allclose(plain.net.W[i], after[f"{2 * i}.weight"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(plain.net.b[i], after[f"{2 * i}.bias"], rtol=1e-10, atol=1e-12)


def test_floor_numpy_loop_matches_nnx():
    """benchmarks.numpy_floor's fastest loop (flat parameters, out= buffers) does nnx's
    arithmetic: same loss, same accuracy count and same parameters after two steps, and its
    flat buffer really is what the layer views show."""
    x, y = _batch("mlp", n=16, seed=1)
    nnx_r, state = _nnx_runner("mlp")
    floor = impls.FloorNumpyMLP(state, "float64")
    nnx_r.load_batches([(x, y)])
    for lr in (impls.LR, 0.03):
        logits = nnx_r.model.forward(nnx_r.backend.from_numpy(x))
        expected_correct = int(np.count_nonzero(np.argmax(logits, axis=1) == y))
        loss, correct = floor.step(x, y, lr=lr)
        ref = nnx_r.model.forward(nnx_r.backend.from_numpy(x), train=True)
        ref_loss = nnx_r.loss.forward(ref, nnx_r.backend.from_numpy(y))
        nnx_r.model.backward(nnx_r.loss.backward(), input_grad=False)
        nnx_r.opt.step(lr)
        assert math.isclose(loss, float(ref_loss), rel_tol=1e-12)
        assert correct == expected_correct
    after = nnx_r.model.state_dict()
    for i in range(3):
        np.testing.assert_allclose(floor.W[i], after[f"{2 * i}.weight"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(floor.b[i], after[f"{2 * i}.bias"], rtol=1e-10, atol=1e-12)
        assert np.shares_memory(floor.W[i], floor.p) and np.shares_memory(floor.b[i], floor.p)
    assert not np.allclose(floor.W[0], state["0.weight"])  # it did train

@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_with_input_grad_changes_no_parameter(kind):
    """The default step skips the first layer's dx as the Trainer does; ``--with-input-grad``
    (impl ``+dx0``) computes it through ``backward(..., input_grad=True)``; both end with the
    same parameters."""
    x, y = _batch(kind, n=8, seed=2)
    skip, _ = _nnx_runner(kind)
    full, _ = _nnx_runner(kind, input_grad=True)
    assert (skip.impl, full.impl) == ("nnx-numpy", "nnx-numpy+dx0")
    for r in (skip, full):
        r.load_batches([(x, y)])
        r.train_step()
    assert skip.model.layers[0].input_grad is False
    assert full.model.layers[0].input_grad is True
    a, b = skip.model.state_dict(), full.model.state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the +dx0 runner's backward really returns d loss / d input
    logits = full.model.forward(full.batches[0][0], train=True)
    full.loss.forward(logits, full.batches[0][1])
    dx = full.model.backward(full.loss.backward(), input_grad=full.input_grad)
    assert dx.shape == x.shape


def test_before_after_versions_compute_the_same_step():
    """before_after's three versions (old code, current Trainer step, current code with the
    old full backward) move the weights alike from the same start."""
    from benchmarks import before_after

    b = get_backend("numpy", "cpu")
    state = impls.reference_state("mlp")
    x, y = _batch("mlp", n=16, seed=4)
    x = x.astype(np.float32)
    after = {}
    for name, (_, input_grad) in before_after.VERSIONS.items():
        model, loss, opt = before_after.build(name, b, state)
        loss.forward(model.forward(x, train=True), y)
        out = model.backward(loss.backward(), input_grad=False)  # what the Trainer asks
        assert (out is None) == (not input_grad)
        opt.step(impls.LR)
        after[name] = model.state_dict()
    for name in ("after", "after+dx0"):
        for k, v in after["before"].items():
            np.testing.assert_allclose(after[name][k], v, rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")


def test_epoch_runners_share_batches_and_learn():
    """One short epoch of each peer over the same shuffled batches ends with the same weights."""
    rng = np.random.default_rng(5)
    n = impls.VAL_SIZE + 256
    data = {"train": (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, n).astype(np.uint8)),
            "test": (rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
                     rng.integers(0, 10, 64).astype(np.uint8))}
    state = impls.reference_state("mlp", "float64")
    nnx_e = impls.NnxEpochRunner(get_backend("numpy", "cpu"), "mlp", data, "float64", epochs=2)
    plain = impls.PlainNumpyEpochRunner("mlp", data, state, "float64", epochs=2)
    loss_a, _ = nnx_e.train_epoch(0)
    loss_b, _ = plain.train_epoch(0)
    assert math.isclose(loss_a, loss_b, rel_tol=1e-9)
    after = nnx_e.model.state_dict()
    np.testing.assert_allclose(plain.net.W[0], after["0.weight"], rtol=1e-8, atol=1e-10)
    assert 0.0 <= nnx_e.test_accuracy() <= 1.0 and 0.0 <= plain.test_accuracy() <= 1.0


def test_numpy_floor_tool_runs_and_writes_json(tmp_path, capsys):
    """``python -m benchmarks.numpy_floor`` (tiny settings): every row present, the loops that
    train end where nnx ends, and the JSON has every sample."""
    from conftest import shared_mnist_dir

    data_dir = shared_mnist_dir()
    if data_dir is None:
        pytest.skip("MNIST not found: set NNX_DATA_DIR to the folder with the four IDX files")
    from benchmarks.numpy_floor import main

    out = tmp_path / "floor.json"
    assert main(["--epochs", "1", "--step-repeats", "1", "--threads", "1",
                 "--data-dir", str(data_dir), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    impls_ = {"nnx-numpy", "plain-numpy", "floor-numpy", "gather+matmuls"}
    assert impls_ <= set(res["epochs"])
    assert {"nnx-numpy", "plain-numpy", "floor-numpy", "matmuls"} <= set(res["steps"])
    for k in impls_:
        assert len(res["epochs"][k]["samples"]) == 1 and res["epochs"][k]["median_s"] > 0
    nnx_acc = res["epochs"]["nnx-numpy"]["last_train_acc"]
    assert 0.85 < nnx_acc < 1.0  # one epoch of the default MLP
    assert abs(res["epochs"]["floor-numpy"]["last_train_acc"] - nnx_acc) < 0.005
    assert "full epoch" in capsys.readouterr().out


def test_results_name_the_commit_they_measured():
    import re
    import shutil
    from pathlib import Path

    from benchmarks.machine import library_versions, nnx_commit

    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    commit = nnx_commit()
    assert commit is not None and re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", commit)
    assert library_versions()["nnx_commit"] == commit


def test_accuracy_and_layer_rows_carry_rates(tmp_path):
    """Time-to-accuracy and CNN-layer results carry samples/s, FLOP/s and % of peak like the
    step and epoch rows; FLOPs follow the stated count (conv/Dense only, fwd+bwd = 3 × fwd)."""
    pytest.importorskip("torch")
    from benchmarks.cli import main

    assert main(["--quick", "--backends", "numpy", "--refs", "torch", "--models", "mlp,cnn",
                 "--skip-steps", "--skip-epoch", "--repeats", "2", "--threads", "1",
                 "--no-charts", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    acc = [c for c in res["cases"] if c["kind"] == "time_to_accuracy"]
    assert {c["impl"] for c in acc} == {"nnx-numpy", "torch-ref"}
    for c in acc:
        assert c["samples_per_s"] > 0 and c["flop_per_s"] > 0 and 0 < c["frac_measured_peak"]
        # the stated count: 454,400 FLOP per sample per epoch (no first-layer dx), every
        # training sample once per epoch — the quick run trains on 1,024 images minus validation
        n_train = round(c["samples_per_s"] * c["train_clock_s"] / c["epochs_run"])
        assert c["flops"] == c["epochs_run"] * n_train * 454_400
    layers = {(c["layer"], c["mode"], c["impl"]): c for c in res["cases"] if c["kind"] == "layer"}
    n = 8  # --quick's CNN batch
    conv2 = layers[("conv 32→64 k3 p1", "fwd", "nnx-numpy")]
    assert conv2["flops"] == 2 * n * 64 * 14 * 14 * 32 * 9 and conv2["flop_per_s"] > 0
    assert layers[("conv 32→64 k3 p1", "fwd+bwd", "torch-ref")]["flops"] == 3 * conv2["flops"]
    assert layers[("dense 3136→128", "fwd", "torch-ref")]["flops"] == 2 * n * 3136 * 128
    bn = layers[("batchnorm 32", "fwd+bwd", "nnx-numpy")]
    assert bn["flops"] == 0 and bn["flop_per_s"] is None and bn["samples_per_s"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| final test acc | epochs run | samples/s | GFLOP/s | % peak |" in md


def test_noise_line_names_rows_with_a_wide_spread():
    from benchmarks.report import noise_lines, noisy_rows

    quiet = {"kind": "train_step", "model": "mlp", "batch_size": 128, "impl": "nnx-numpy",
             "device": "cpu", "median_s": 1.0, "iqr_s": 0.05}
    loud = dict(quiet, impl="torch-ref", iqr_s=0.3)
    assert noisy_rows([quiet]) == []
    assert [n["row"] for n in noisy_rows([quiet, loud])] == ["mlp train_step batch 128 torch-ref@cpu"]
    assert "within 10%" in noise_lines({"cases": [quiet]})[0]
    line = noise_lines({"cases": [quiet, loud, {"kind": "skipped"}]})[0]
    assert "1 of 2 timed rows" in line and "torch-ref@cpu 30%" in line


def test_ab_layers_loads_a_past_version_from_git(tmp_path, capsys):
    """``python -m benchmarks.ab_layers``: the old side is read from git and must compute
    what the new side computes (HEAD against itself here), then both are timed."""
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    from benchmarks.ab_layers import main, old_module

    from nnx.layers import BatchNorm
    from nnx.layers.base import LAYER_TYPES

    old = old_module("HEAD", "batchnorm")
    assert old.BatchNorm.__module__.startswith("old_batchnorm") and hasattr(old.BatchNorm, "backward")
    assert LAYER_TYPES["BatchNorm"] is BatchNorm  # the old class did not take over the registry
    out = tmp_path / "ab.json"
    assert main(["--rev", "HEAD", "--cases", "relu,batchnorm", "--repeats", "1",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert "relu fwd (128,128) numpy" in res and "batchnorm eval fwd (128, 64, 14, 14)" in res
    assert all(v["old"]["median_ms"] > 0 and v["new"]["median_ms"] > 0 for v in res.values())
    assert "x old" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        old_module("no-such-revision", "batchnorm")
