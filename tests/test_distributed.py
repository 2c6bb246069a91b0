"""Data-parallel training (nnx.distributed) under ``mpirun -n 2 --oversubscribe``: the same
global batch gives the same weights as one process, rank 0 alone writes, and a batch that
does not divide among the processes is one clear error. Skipped without mpi4py or mpirun."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_location import mnist_dir

pytest.importorskip("mpi4py", reason="distributed training needs mpi4py: pip install 'nnx[mpi]'")
MPIRUN = shutil.which("mpirun") or shutil.which(str(Path(sys.executable).parent / "mpirun"))
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="no mpirun on PATH (pip install 'nnx[mpi]')")

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("distributed_driver.py")
#: float32 sums in another order (half batches, then the allreduce): rounding differs at the
#: last bit each step and grows over two epochs of Adam; measured ~1e-6, asserted 1e-4
FLOAT32_RTOL = 1e-4


def env():
    e = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             OMPI_MCA_rmaps_base_oversubscribe="1", MPLBACKEND="Agg",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMIX_SIZE"):
        e.pop(var, None)  # the single-process reference must not look launched by MPI
    return e


def run(cmd, k=None, cwd=None, timeout=240):
    if k:
        cmd = [MPIRUN, "-n", str(k), "--oversubscribe", *cmd]
    return subprocess.run(cmd, cwd=cwd or ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def relative(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def driver(tmp_path, backend, dtype, flat, k=None, run_dir=None):
    out = tmp_path / f"{backend}-{dtype}-{int(flat)}-{k or 1}.npz"
    cmd = [sys.executable, str(DRIVER), str(out), backend, dtype, "1" if flat else "0"]
    r = run(cmd + ([str(run_dir)] if run_dir else []), k=k)
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(np.load(out))


@pytest.mark.parametrize("backend,flat", [("numpy", True), ("numpy", False), ("strict", True),
                                          ("torch", True)])
def test_two_processes_reach_the_weights_of_one_float64(tmp_path, backend, flat):
    """Adam, weight decay, gradient clipping, a last batch of 21 rows (10 and 11): after
    two epochs the weights and the reduced metrics match one process to 1e-10."""
    if backend == "torch":
        pytest.importorskip("torch")
    one = driver(tmp_path, backend, "float64", flat)
    two = driver(tmp_path, backend, "float64", flat, k=2,
                 run_dir=tmp_path / "run" if backend == "numpy" and flat else None)
    assert set(one) == set(two)
    for name in one:
        assert relative(one[name], two[name]) <= 1e-10, name
    if backend == "numpy" and flat:  # rank 0 alone wrote its run folder
        assert (tmp_path / "run-0" / "metrics.jsonl").is_file()
        assert not (tmp_path / "run-1").exists()


def test_float32_within_tolerance_and_only_rank_0_writes(tmp_path):
    """The CLI under mpirun: float32 weights within FLOAT32_RTOL of one process, one run
    folder (rank 0 chose its name and broadcast it), config.json says world_size 2."""
    args = [sys.executable, "-m", "nnx.train", "--limit", "2048", "--val-size", "256",
            "--layers", "784,32,10", "--batch-size", "96", "--epochs", "2", "--quiet",
            "--no-plots", "--no-download"]
    data = mnist_dir()
    if data is None:
        pytest.skip("MNIST not found (set NNX_DATA_DIR; see tests/mnist_location.py)")
    args += ["--data-dir", str(data)]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    r1 = run(args, cwd=tmp_path / "one")
    r2 = run(args, k=2, cwd=tmp_path / "two")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert r2.stdout.count("test accuracy") == 1  # rank 0 alone reports
    folders = list((tmp_path / "two" / "runs").iterdir())
    assert len(folders) == 1
    (one,), (two,) = list((tmp_path / "one" / "runs").iterdir()), folders
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert json.loads((one / "config.json").read_text())["world_size"] == 1
    from safetensors.numpy import load_file

    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for name in a:
        assert relative(a[name], b[name]) <= FLOAT32_RTOL, name
    rows = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2


def test_batch_that_does_not_divide_is_one_clear_error(tmp_path):
    """Every rank fails the same way: one message (rank 0's; the others' are held back),
    every process stops, nothing is left running."""
    data = mnist_dir()
    if data is None:
        pytest.skip("MNIST not found (set NNX_DATA_DIR; see tests/mnist_location.py)")
    r = run([sys.executable, "-m", "nnx.train", "--limit", "1024", "--layers", "784,8,10",
             "--batch-size", "95", "--epochs", "1", "--quiet", "--no-plots", "--no-download",
             "--data-dir", str(data), "--out", str(tmp_path / "run")], k=2, timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("does not divide") == 1, r.stderr
    assert ("error: --batch-size 95 (the global batch) does not divide among 2 processes; use "
            "a multiple of 2") in r.stderr


def test_distributed_without_mpi4py_says_how_to_install(tmp_path):
    """--distributed where mpi4py cannot be imported: one line naming the pip extra."""
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text("raise ImportError('no MPI here')\n")
    e = env()
    e["PYTHONPATH"] = os.pathsep.join([str(tmp_path), e["PYTHONPATH"]])
    r = subprocess.run([sys.executable, "-c", "from nnx.distributed import create_communicator; "
                        "create_communicator()"], env=e, capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode != 0 and 'pip install "nnx[mpi]"' in r.stderr
