"""The benchmark suite (``python -m benchmarks``): a quick run produces valid JSON and
Markdown, and its peers compute what nnx computes (same loss, same update) from the same
weights and batch. Timing targets are measured by the suite, never asserted here."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from mnist_location import SKIP_REASON, mnist_dir

from benchmarks import impls
from benchmarks.timing import summarize
from nnx.backends import get_backend


def _batch(kind, n=16, seed=0):
    rng = np.random.default_rng(seed)
    data = {"train": (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, n).astype(np.uint8))}
    return impls.step_batches(data, kind, n, 1, "float64")[0]


MLP_FWD = 2 * (784 * 128 + 128 * 64 + 64 * 10)  # FLOP per sample, counted by hand
MLP_STEP = 3 * MLP_FWD - 2 * 784 * 128            # the first layer's dx is skipped


def _check_rates(res):
    """Every row's rates follow from its own numbers and the stated FLOP count, and no row is
    above the peak: each fraction is its rate over the (possibly raised) measured peak."""
    peak = res["peaks"]["best"]["cpu/float32"]["flop_per_s"]
    matmuls = max(m["best_flop_per_s"] for m in res["peaks"]["measurements"]
                  if m["device"] == "cpu" and m["dtype"] == "float32")
    rates = [c["flop_per_s"] for c in res["cases"] if c.get("flop_per_s")]
    assert peak == pytest.approx(max(matmuls, *rates), rel=1e-12)
    for c in res["cases"]:
        if c.get("flop_per_s"):
            assert c["frac_measured_peak"] == pytest.approx(c["flop_per_s"] / peak, rel=1e-12)
            assert 0 < c["frac_measured_peak"] <= 1.0


def test_quick_run_writes_json_markdown_and_charts(tmp_path):
    import statistics

    from benchmarks.cli import main

    rc = main(["--quick", "--backends", "numpy,strict", "--refs", "numpy", "--skip-accuracy",
               "--repeats", "2", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["machine"]["cpu"]["model"] and "OPENBLAS_CORETYPE" in res["machine"]["env"]
    assert {(m["library"], m["size"]) for m in res["peaks"]["measurements"]} >= {
        ("numpy", 256), ("numpy", 512)}
    timed = [c for c in res["cases"] if c["kind"] in ("train_step", "inference", "epoch")]
    assert {c["kind"] for c in timed} == {"train_step", "inference", "epoch"}
    assert {c["impl"] for c in timed} == {"nnx-numpy", "nnx-strict", "plain-numpy"}
    md = (tmp_path / "results.md").read_text()
    for c in timed:
        assert len(c["samples"]) == c["n"] == (1 if c["kind"] == "epoch" else 2)
        assert c["median_s"] == statistics.median(c["samples"])
        n = c["train_samples"] if c["kind"] == "epoch" else c["batch_size"]
        assert c["samples_per_s"] == pytest.approx(n / c["median_s"], rel=1e-12)
        assert c["flops"] == n * (MLP_FWD if c["kind"] == "inference" else MLP_STEP)
        assert c["flop_per_s"] == pytest.approx(c["flops"] / c["median_s"], rel=1e-12)
        mem = c["memory"]
        if mem.get("rss_peak_extra_bytes") is not None:
            assert mem["rss_peak_extra_bytes"] == max(0, mem["rss_peak_bytes"] - mem["rss_before_bytes"])
        if c["kind"] != "epoch":  # the table shows the row's own numbers
            assert (f"| cpu | {c['batch_size']} | {c['impl']} | {1e3 * c['median_s']:.3f} | "
                    f"{1e3 * c['iqr_s']:.3f} |") in md
    _check_rates(res)
    epochs = [c for c in timed if c["kind"] == "epoch"]
    assert {c["train_samples"] for c in epochs} == {1024}  # quick: 6,024 images minus 5,000
    steps = [c for c in timed if c["kind"] == "train_step"]
    assert sorted({c["batch_size"] for c in steps}) == [8, 64]
    for name in res["charts"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res["charts"]) == {"step_time_mlp.png", "epoch_time_mlp.png"}
    assert res["config"]["nnx_step_first_layer_input_grad"] is False


def test_results_go_under_runs_bench_of_the_current_folder(tmp_path, monkeypatch):
    from benchmarks.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["--quick", "--backends", "numpy", "--refs", "none", "--batch-sizes", "8",
                 "--skip-epoch", "--skip-accuracy", "--repeats", "1", "--no-charts"]) == 0
    (run,) = (tmp_path / "runs" / "bench").iterdir()
    assert sorted(f.name for f in run.iterdir()) == ["results.json", "results.md"]


def test_measure_interleaved_on_a_known_clock(monkeypatch):
    """With a clock that advances exactly 2^-9 s per call of A and 2^-7 s per call of B (exact
    in binary), every sample is exactly that, ``inner`` is what makes a sample last
    ``min_time``, the calls are counted exactly and the repeats go round-robin."""
    import types

    from benchmarks import timing

    now, calls = [0.0], []

    def case(key, dt):
        def fn():
            now[0] += dt
            calls.append(key)
        return fn

    clock = lambda: now[0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=clock, process_time=clock))
    a, b = 2.0 ** -9, 2.0 ** -7
    res = timing.measure_interleaved({"A": (case("A", a), lambda: None),
                                      "B": (case("B", b), lambda: None)},
                                     warmup=3, repeats=4, min_time=2.0 ** -5)
    assert (res["A"]["inner"], res["B"]["inner"]) == (16, 4)
    assert res["A"]["samples"] == [a] * 4 and res["A"]["median_s"] == a
    assert res["B"]["cpu_samples"] == [b] * 4 and res["B"]["iqr_s"] == 0
    # warm-up 3 + calibration 1 + 8 (A) / 4 (B), then 4 repeats of inner calls each
    assert calls.count("A") == 3 + 1 + 8 + 4 * 16 and calls.count("B") == 3 + 1 + 4 + 4 * 4
    assert calls[3 + 1 + 8 + 3 + 1 + 4:] == (["A"] * 16 + ["B"] * 4) * 4


def test_peak_is_raised_to_a_faster_row():
    from benchmarks.cases import apply_peaks

    peaks = {"best": {"cpu/float32": {"flop_per_s": 100e9, "source": "numpy 2048x2048 matmul"}}}
    rows = [{"kind": "train_step", "model": "mlp", "batch_size": 8, "impl": "a", "device": "cpu",
             "dtype": "float32", "flop_per_s": 50e9},
            {"kind": "train_step", "model": "mlp", "batch_size": 8, "impl": "b", "device": "cpu",
             "dtype": "float32", "flop_per_s": 125e9},
            {"kind": "layer", "impl": "c", "device": "cpu", "dtype": "float32", "flop_per_s": None}]
    notes = []
    apply_peaks(rows, peaks, log=notes.append)
    assert peaks["best"]["cpu/float32"]["flop_per_s"] == 125e9
    assert "raised to the rate of mlp train_step batch 8 b@cpu" in peaks["best"]["cpu/float32"]["source"]
    assert [r.get("frac_measured_peak") for r in rows] == [0.4, 1.0, None]
    assert len(notes) == 1 and "100.0" in notes[0]


def test_tables_show_the_numbers_put_in():
    from benchmarks.report import accuracy_table, epoch_table, step_table

    def step(impl, ms, frac):
        return {"kind": "train_step", "model": "mlp", "impl": impl, "device": "cpu",
                "dtype": "float32", "batch_size": 128, "n": 7, "median_s": ms / 1e3,
                "iqr_s": 1e-4, "cpu_median_s": 1.4e-3, "samples_per_s": 128 / (ms / 1e3),
                "flop_per_s": 128 * MLP_STEP / (ms / 1e3), "frac_measured_peak": frac,
                "memory": {"rss_peak_extra_bytes": 2 * 2 ** 20}}

    res = {"cases": [step("nnx-numpy", 1.5, 0.5), step("torch-ref", 3.0, 0.25)]}
    lines = step_table(res, "train_step", "mlp")
    assert "| cpu | 128 | nnx-numpy | 1.500 | 0.100 | 1.400 | 85,333 | 38.78 | 50.0 | 0.50 | 2.0 |" in lines
    assert "| cpu | 128 | torch-ref | 3.000 | 0.100 | 1.400 | 42,667 | 19.39 | 25.0 | 1.00 | 2.0 |" in lines
    ep = {"kind": "epoch", "model": "mlp", "impl": "plain-numpy", "device": "cpu", "batch_size": 128,
          "train_samples": 55000, "n": 3, "median_s": 0.5, "min_s": 0.45, "max_s": 0.6,
          "cpu_median_s": 0.51, "samples_per_s": 110000, "flop_per_s": 5e10,
          "frac_measured_peak": 0.625, "memory": {}}
    assert ("| cpu | plain-numpy | 0.500 | 0.450–0.600 | 0.510 | 110,000 | 50.00 | 62.5 | – | "
            "1.00 | – |") in epoch_table({"cases": [ep]}, "mlp")
    acc = {"kind": "time_to_accuracy", "model": "mlp", "impl": "nnx-numpy", "device": "cpu",
           "history": [{"test_acc": 0.975}, {"test_acc": 0.9812}], "final_test_acc": 0.9812,
           "thresholds": {"0.97": {"epochs": 1, "train_s": 0.61}, "0.98": None},
           "train_clock_s": 1.35, "samples_per_s": 90000.0, "flop_per_s": 4.1e10,
           "frac_measured_peak": 0.5}
    assert ("| cpu | nnx-numpy | 1 | 0.61 | – | – | 98.12% | 2 | 1.35 | 90,000 | 41.00 | 50.0 |"
            in accuracy_table({"cases": [acc]}, "mlp"))
    fast = dict(acc, model="cnn-fast", thresholds={"0.99": {"epochs": 2, "train_s": 24.5}},
                settings=impls.settings("cnn-fast"))
    table = accuracy_table({"cases": [fast]}, "cnn-fast")
    assert "Adam lr 0.003, wd 0, cosine over 3 epochs, batch 64, seed 0" in table[0]
    assert "| cpu | nnx-numpy | 2 | 24.50 | 98.12% | 2 | 1.35 | 90,000 | 41.00 | 50.0 |" in table


def test_accuracy_axis_follows_the_data():
    """A quick run's 62-88% must be on the chart (a fixed 94-99% axis hid it)."""
    from benchmarks.report import accuracy_ylim

    quick = [{"history": [{"test_acc": a} for a in (0.6245, 0.80, 0.8809)]}]
    lo, hi = accuracy_ylim(quick)
    assert 55 < lo < 62.45 and 88.09 < hi < 95
    lo, hi = accuracy_ylim([{"history": [{"test_acc": a} for a in (0.9602, 0.9802, 0.9999)]}])
    assert 95 < lo < 96.02 and hi == 100.0


def test_bench_extra_does_not_pull_torch():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    bench = meta["project"]["optional-dependencies"]["bench"]
    assert "threadpoolctl>=3" in bench and not any(d.startswith("torch") for d in bench)


def test_with_input_grad_option():
    from benchmarks.cli import _resolve, build_parser

    p = build_parser()
    assert _resolve(p.parse_args([]), p).input_grad is False
    # cnn-fast's step cases run at its training batch unless batch sizes are given
    assert _resolve(p.parse_args(["--models", "cnn-fast"]), p).cnn_fast_batch_sizes == [64]
    assert _resolve(p.parse_args(["--models", "cnn-fast", "--cnn-batch-sizes", "32"]),
                    p).cnn_fast_batch_sizes == [32]
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


def test_cnn_fast_is_the_preset_with_its_cli_defaults():
    """The suite's cnn-fast is ``--model cnn-fast`` as nnx.train builds and trains it."""
    from nnx.architectures import PRESETS, build_layers
    from nnx.train import MODEL_DEFAULTS

    model = impls.build_nnx("cnn-fast", get_backend("numpy", "cpu"))
    preset = build_layers(PRESETS["cnn-fast"], (1, 28, 28))
    assert [la.config() for la in model.layers] == [la.config() for la in preset]
    assert "0.bias" not in model.state_dict() and "4.bias" not in model.state_dict()
    s = impls.settings("cnn-fast")
    assert {k: s[k] for k in MODEL_DEFAULTS["cnn-fast"]} == MODEL_DEFAULTS["cnn-fast"]
    assert (s["schedule"], s["warmup_epochs"]) == ("cosine", 0.0)
    conv1, conv2 = 2 * 16 * 28 * 28 * 9, 2 * 32 * 14 * 14 * 16 * 9
    dense = 2 * (1568 * 128 + 128 * 10)
    assert impls.train_step_flops(model, 2) == 2 * (3 * (conv1 + conv2 + dense) - conv1)


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


@pytest.mark.parametrize("kind", ["mlp", "cnn", "cnn-fast"])
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
    a, b = skip.model.state_dict(), full.model.state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the +dx0 runner's backward really returns d loss / d input
    logits = full.model.forward(full.batches[0][0], train=True)
    full.loss.forward(logits, full.batches[0][1])
    dx = full.model.backward(full.loss.backward(), input_grad=full.input_grad)
    assert dx.shape == x.shape
    full.model.forward(full.batches[0][0], train=True)
    assert full.model.backward(full.loss.backward(), input_grad=skip.input_grad) is None


@pytest.mark.parametrize("kind", ["mlp", "cnn-fast"])
def test_epoch_runners_share_batches_and_learn(kind):
    """One short epoch of each peer over the same shuffled batches ends with the same weights
    (cnn-fast: Adam, batch 64, BatchNorm, as its CLI defaults)."""
    rng = np.random.default_rng(5)
    n = impls.VAL_SIZE + 256
    data = {"train": (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, n).astype(np.uint8)),
            "test": (rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
                     rng.integers(0, 10, 64).astype(np.uint8))}
    state = impls.reference_state(kind, "float64")
    nnx_e = impls.NnxRunner(get_backend("numpy", "cpu"), kind, state, "float64").load_data(data, 2)
    peers = [impls.PlainNumpyRunner(kind, state, "float64").load_data(data, 2)] if kind == "mlp" else []
    if importlib.util.find_spec("torch"):
        peers.append(impls.TorchRefRunner("cpu", kind, state, "float64").load_data(data, 2))
    elif not peers:
        pytest.skip("torch not installed")
    assert nnx_e.trainer.batch_size == impls.settings(kind)["batch_size"]
    loss, acc = nnx_e.train_epoch(0)
    after = nnx_e.model.state_dict()
    # test accuracy, computed here from nnx's weights
    x = data["test"][0].reshape(64, *((784,) if kind == "mlp" else (1, 28, 28))) / 255.0
    expected = np.mean(np.argmax(np.asarray(nnx_e.model.forward(x, train=False)), axis=1)
                       == data["test"][1])
    assert nnx_e.test_accuracy() == expected
    for peer in peers:
        loss_p, acc_p = peer.train_epoch(0)
        assert math.isclose(loss, loss_p, rel_tol=1e-9) and math.isclose(acc, acc_p, rel_tol=1e-12)
        got = ({"0.weight": peer.net.W[0]} if peer.impl == "plain-numpy" else
               {k: v.detach().numpy() for k, v in peer.net.state_dict().items()})
        for k, w in got.items():  # torch: every parameter and batch-norm buffer
            np.testing.assert_allclose(w.reshape(np.shape(after[k])), after[k], rtol=1e-8,
                                       atol=1e-10, err_msg=f"{peer.impl} {k}")
        assert peer.test_accuracy() == expected, peer.impl


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
    torch = pytest.importorskip("torch")
    from benchmarks.cli import main

    if mnist_dir() is None:  # the suite skips accuracy on synthetic data
        pytest.skip(SKIP_REASON)
    threads_before = torch.get_num_threads()
    assert main(["--quick", "--backends", "numpy", "--refs", "torch", "--models", "mlp,cnn,cnn-fast",
                 "--skip-steps", "--skip-epoch", "--repeats", "2", "--threads", "1",
                 "--no-charts", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    fast = [c for c in res["cases"] if c["kind"] == "time_to_accuracy" and c["model"] == "cnn-fast"]
    # cnn-fast: its CLI defaults, the whole 3-epoch schedule (no early stop), time to 99%
    conv1, conv2, dense = 2 * 16 * 28 * 28 * 9, 2 * 32 * 14 * 14 * 16 * 9, 2 * (1568 * 128 + 1280)
    assert {c["impl"] for c in fast} == {"nnx-numpy", "torch-ref"}
    for c in fast:
        assert c["epochs_run"] == 3 and list(c["thresholds"]) == ["0.99"]
        assert c["batch_size"] == 64 and c["settings"]["optimizer"] == "adam"
        assert c["flops"] == 3 * 1024 * (3 * (conv1 + conv2 + dense) - conv1)
        assert c["train_clock_s"] == pytest.approx(sum(h["epoch_s"] for h in c["history"]))
        assert c["final_test_acc"] == c["history"][-1]["test_acc"] > 0.5  # it learns
    assert res["config"]["settings"]["cnn-fast"]["lr"] == 3e-3
    assert not [c for c in res["cases"] if c["kind"] == "time_to_accuracy" and c["model"] == "cnn"]
    acc = [c for c in res["cases"] if c["kind"] == "time_to_accuracy" and c["model"] == "mlp"]
    assert {c["impl"] for c in acc} == {"nnx-numpy", "torch-ref"}
    for c in acc:
        # the stated count: 454,400 FLOP per sample per epoch (no first-layer dx), every one
        # of the quick run's 1,024 training images once per epoch, on the training clock
        assert c["train_samples"] == 1024 and c["epochs_run"] == len(c["history"])
        assert c["flops"] == c["epochs_run"] * 1024 * MLP_STEP
        assert c["train_clock_s"] == pytest.approx(sum(h["epoch_s"] for h in c["history"]))
        assert c["samples_per_s"] == pytest.approx(c["epochs_run"] * 1024 / c["train_clock_s"])
        assert c["flop_per_s"] == pytest.approx(c["flops"] / c["train_clock_s"])
    assert acc[0]["history"] and [h["test_acc"] for h in acc[0]["history"]] == [
        h["test_acc"] for h in acc[1]["history"]]  # same weights, same batches
    # --threads 1 held for the whole run (threadpoolctl and torch), and was undone after it
    assert res["threads_after"]["blas_threads"] == 1 and res["threads_after"]["torch_num_threads"] == 1
    assert torch.get_num_threads() == threads_before
    _check_rates(res)
    layers = {(c["layer"], c["mode"], c["impl"]): c for c in res["cases"] if c["kind"] == "layer"}
    n = 8  # --quick's CNN batch
    conv2 = layers[("conv 32→64 k3 p1", "fwd", "nnx-numpy")]
    assert conv2["flops"] == 2 * n * 64 * 14 * 14 * 32 * 9 and conv2["flop_per_s"] > 0
    assert layers[("conv 32→64 k3 p1", "fwd+bwd", "torch-ref")]["flops"] == 3 * conv2["flops"]
    assert layers[("dense 3136→128", "fwd", "torch-ref")]["flops"] == 2 * n * 3136 * 128
    bn = layers[("batchnorm 32", "fwd+bwd", "nnx-numpy")]
    assert bn["flops"] == 0 and bn["flop_per_s"] is None
    assert bn["samples_per_s"] == pytest.approx(n / bn["median_s"])
    md = (tmp_path / "results.md").read_text()
    assert "| final test acc | epochs run | train s | samples/s | GFLOP/s | % peak |" in md
    assert "### Time to accuracy: cnn-fast preset" in md


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


@pytest.mark.parametrize("argv, message", [
    (["--min-time", "nan"], "--min-time a finite number"),
    (["--min-time", "inf"], "--min-time a finite number"),
    (["--repeats", "0"], "--repeats/--epoch-repeats must be positive"),
    (["--models", ""], "--models is empty"),
    (["--out", "FILE"], "is a file"),
])
def test_bad_options_are_one_line_errors(argv, message, tmp_path, capsys):
    from benchmarks.cli import _resolve, build_parser

    (tmp_path / "file").write_text("x")
    argv = [str(tmp_path / "file") if a == "FILE" else a for a in argv]
    p = build_parser()
    with pytest.raises(SystemExit) as info:
        _resolve(p.parse_args(["--quick", *argv]), p)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_listed_items_run_once():
    from benchmarks.cli import _resolve, build_parser

    p = build_parser()
    cfg = _resolve(p.parse_args(["--quick", "--backends", "numpy,numpy", "--models", "mlp,mlp"]), p)
    assert cfg.backends == ["numpy"] and cfg.models == ["mlp"]
