"""--threads: parsed by every CLI, applied to BLAS/OpenMP and torch, shown in the banner."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import shared_mnist_dir
from nnx import evaluate, predict, train
from nnx.threads import DEFAULT_THREADS, set_threads

CLI_ARGS = {train: [], evaluate: ["run"], predict: ["run", "a.png"]}


@pytest.mark.parametrize("cli", list(CLI_ARGS), ids=lambda m: m.__name__)
def test_every_cli_takes_threads(cli, capsys):
    parser = cli.build_parser()
    assert parser.parse_args(CLI_ARGS[cli] + ["--threads", "3"]).threads == 3
    assert parser.parse_args(CLI_ARGS[cli]).threads is None  # None: DEFAULT_THREADS
    for bad in ("-1", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(CLI_ARGS[cli] + ["--threads", bad])
        assert "--threads" in capsys.readouterr().err


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (thread limits are process-wide); it prints JSON."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


PROBE = """
import json, sys
from nnx.threads import set_threads
applied = set_threads({n})
import numpy, nnx
from threadpoolctl import threadpool_info
try:
    import torch
    t = torch.get_num_threads()
except ImportError:
    t = None
print(json.dumps({{"applied": applied, "torch": t, "describe": nnx.get_backend("numpy").describe(),
                  "pools": sorted({{i["num_threads"] for i in threadpool_info()}})}}))
"""


@pytest.mark.parametrize("n", [None, 1, 2])
def test_set_threads_limits_blas_openmp_and_torch(n):
    got = _run(PROBE.format(n=n))
    want = DEFAULT_THREADS if n is None else n
    assert got["applied"] == want
    assert got["pools"] == [want]  # OpenBLAS, and torch's OpenMP when torch is there
    assert got["torch"] in (None, want)  # torch imported after set_threads still obeys it
    assert f"{want} thread" in got["describe"]


def test_threads_zero_leaves_the_libraries_alone():
    got = _run(PROBE.format(n=0))
    assert got["applied"] is None


@pytest.mark.skipif(shared_mnist_dir() is None, reason="MNIST not found where the CLI looks")
def test_train_banner_shows_threads_and_config_does_not_store_them(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--data-dir", str(shared_mnist_dir()), "--limit", "1200", "--val-size", "200",
            "--epochs", "1", "--out", str(run), "--no-plots", "--threads", "1"]
    assert train.main(args) == 0
    banner = capsys.readouterr().out.splitlines()[0]
    assert banner.startswith("nnx: numpy") and "1 thread)" in banner
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert "threads" not in settings  # a machine setting: a resumed run may use another


def test_more_threads_than_cores_is_allowed_with_a_note():
    import os

    n = (os.cpu_count() or 1) + 1
    out = subprocess.run([sys.executable, "-c", f"from nnx.threads import set_threads; "
                          f"print(set_threads({n}))"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(n)
    assert f"note: {n} threads per array library" in out.stderr and "CPU core" in out.stderr


@pytest.mark.parametrize("count", ["4097", "4294967297", "99999999999999999999"])
def test_absurd_thread_counts_are_refused(count, capsys):
    import argparse

    from nnx.threads import MAX_THREADS, add_threads_option

    parser = argparse.ArgumentParser()
    add_threads_option(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--threads", count])
    assert f"must be at most {MAX_THREADS}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="thread count must be in"):
        set_threads(int(count))  # refused before anything is set
