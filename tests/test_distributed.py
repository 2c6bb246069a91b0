"""Data-parallel training (nnx.distributed) under ``mpirun -n 2 --oversubscribe``: the same
global batch gives the same weights as one process (BatchNorm networks too, with
``--sync-bn``), rank 0 alone writes, and a batch that does not divide among the processes is
one clear error. Skipped without mpi4py or mpirun; the synchronised-BatchNorm layer tests
(threads standing in for processes) run without them."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mnist_location import mnist_dir
from nnx.checkpoint import list_checkpoints

MPIRUN = shutil.which("mpirun") or shutil.which(str(Path(sys.executable).parent / "mpirun"))
needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIRUN is None,
    reason="distributed training needs mpi4py and mpirun: pip install 'nnx[mpi]'")

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


def driver(tmp_path, backend, dtype, flat, k=None, run_dir=None, rows=405):
    out = tmp_path / f"{backend}-{dtype}-{int(flat)}-{k or 1}.npz"
    cmd = [sys.executable, str(DRIVER), str(out), backend, dtype, "1" if flat else "0",
           str(run_dir) if run_dir else "-", str(rows)]
    r = run(cmd, k=k)
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(np.load(out))


@needs_mpi
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


@needs_mpi
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_last_batch_smaller_than_the_process_count(tmp_path, backend):
    """385 training rows, batch 48: the last batch has one row, so with three processes two
    of them hold no rows of it; they still join its allreduce with a zero share, and the
    weights match one process."""
    if backend == "torch":
        pytest.importorskip("torch")
    one = driver(tmp_path, backend, "float64", True, rows=385)
    three = driver(tmp_path, backend, "float64", True, k=3, rows=385)
    for name in one:
        assert relative(one[name], three[name]) <= 1e-10, name


@needs_mpi
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


@needs_mpi
def test_resume_under_mpirun_reaches_the_one_process_weights(tmp_path):
    """Two processes train one epoch in float64 (constant learning rate: a cosine schedule
    would be stretched by the resume), and resume for a second from rank 0's checkpoint: the
    weights equal one process trained for two epochs straight."""
    data = mnist_dir()
    if data is None:
        pytest.skip("MNIST not found (set NNX_DATA_DIR; see tests/mnist_location.py)")
    common = ["--limit", "1024", "--val-size", "128", "--layers", "784,16,10", "--batch-size",
              "64", "--dtype", "float64", "--schedule", "constant", "--quiet", "--no-plots",
              "--no-download",
              "--data-dir", str(data)]
    train = [sys.executable, "-m", "nnx.train"]
    r1 = run(train + common + ["--epochs", "2", "--out", str(tmp_path / "one")])
    r2 = run(train + common + ["--epochs", "1", "--out", str(tmp_path / "two")], k=2)
    r3 = run(train + ["--resume", str(tmp_path / "two"), "--epochs", "2", "--quiet",
                      "--no-plots", "--data-dir", str(data)], k=2)
    for r in (r1, r2, r3):
        assert r.returncode == 0, r.stdout + r.stderr
    from safetensors.numpy import load_file

    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    for name in a:
        assert relative(a[name], b[name]) <= 1e-10, name


@needs_mpi
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


@needs_mpi
def test_resuming_on_a_process_count_that_does_not_divide_the_batch_says_what_to_do(tmp_path):
    data = mnist_dir()
    if data is None:
        pytest.skip("MNIST not found (set NNX_DATA_DIR; see tests/mnist_location.py)")
    common = ["--limit", "300", "--val-size", "50", "--layers", "784,8,10", "--quiet",
              "--no-plots", "--no-download", "--data-dir", str(data)]
    r1 = run([sys.executable, "-m", "nnx.train", *common, "--batch-size", "20", "--epochs", "1",
              "--out", str(tmp_path / "run")])
    r2 = run([sys.executable, "-m", "nnx.train", "--resume", str(tmp_path / "run"), "--epochs",
              "2"], k=3)
    assert r1.returncode == 0 and r2.returncode != 0
    assert "resume it with a number of processes that divides 20" in r2.stderr


@needs_mpi
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


# --- synchronised BatchNorm (--sync-bn) ----------------------------------------------------
#: the MLP puts BatchNorm after the ReLU: a bias right before BatchNorm has a zero gradient
#: (rounding noise, which Adam's normalisation blows up to ±lr steps) and would not compare
SYNC_BN_ARCHS = {"mlp": "dense:16,relu,bn,dense:10",
                 "conv": "conv:4,bn,relu,maxpool:2,flatten,dense:10"}


@needs_mpi
@pytest.mark.parametrize("backend,arch", [("numpy", "mlp"), ("numpy", "conv"), ("torch", "mlp")])
def test_sync_bn_two_processes_reach_the_weights_and_statistics_of_one(tmp_path, backend, arch):
    """--sync-bn: a BatchNorm network on 2 processes ends with one process's weights AND
    running statistics (float64, <= 1e-10; a last batch split unevenly: 10/11 rows for the
    MLP, 4/5 for the CNN). Without --sync-bn (statistics per process) they differ."""
    if backend == "torch":
        pytest.importorskip("torch")
    data = mnist_dir()
    if data is None:
        pytest.skip("MNIST not found (set NNX_DATA_DIR; see tests/mnist_location.py)")
    limit = "601" if arch == "mlp" else "301"  # 501 / 201 training rows, batch 48
    args = [sys.executable, "-m", "nnx.train", "--backend", backend, "--dtype", "float64",
            "--arch", SYNC_BN_ARCHS[arch], "--limit", limit, "--val-size", "100",
            "--batch-size", "48", "--epochs", "2", "--quiet", "--no-plots", "--no-download",
            "--data-dir", str(data)]
    runs = {"one": ([], None), "sync": (["--sync-bn"], 2)}
    if backend == "numpy":
        runs["per-rank"] = ([], 2)
    from safetensors.numpy import load_file

    weights = {}
    for name, (extra, k) in runs.items():
        r = run(args + extra + ["--out", str(tmp_path / name)], k=k)
        assert r.returncode == 0, r.stdout + r.stderr
        weights[name] = load_file(str(tmp_path / name / "model.safetensors"))
    one, sync = weights["one"], weights["sync"]
    assert set(one) == set(sync) and any("running_var" in n for n in one)
    for name in one:
        assert relative(one[name], sync[name]) <= 1e-10, name
    if "per-rank" in weights:  # the comparison can fail: per-rank statistics move everything
        stats = [n for n in one if n.endswith(("running_mean", "running_var"))]
        assert min(relative(one[n], weights["per-rank"][n]) for n in stats) > 1e-6


class FakeOneRank:
    """A reducer for one process: the sum over processes is the array itself."""

    size = 1

    def allreduce_sum_(self, x):
        return x


class ThreadRanks:
    """K threads standing in for K processes: ``allreduce_sum_`` sums the threads' arrays
    (NumPy) in place, with barriers, as MPI's in-place Allreduce does."""

    def __init__(self, k):
        self.size, self.barrier, self.lock, self.total = k, threading.Barrier(k), threading.Lock(), None

    def allreduce_sum_(self, x):
        with self.lock:
            self.total = np.array(x, copy=True) if self.total is None else self.total + x
        self.barrier.wait()
        total = self.total.copy()
        self.barrier.wait()
        self.total = None
        self.barrier.wait()
        x[...] = total
        return x


def _batchnorm(shape, gamma, beta, sync=None):
    from nnx.backends import get_backend
    from nnx.layers.batchnorm import BatchNorm

    layer = BatchNorm(shape[1])
    layer.build(get_backend("numpy"), np.float64, None, shape[1:])
    layer.weight.value, layer.bias.value, layer.sync = gamma.copy(), beta.copy(), sync
    return layer


@pytest.mark.parametrize("shape", [(7, 5), (6, 3, 4, 4)])
def test_sync_bn_with_a_one_process_reducer_is_the_plain_layer(shape):
    """The synchronised code path with a 1-process reducer gives bit-identical output,
    input gradient, parameter gradients and running statistics (two steps, then eval)."""
    rng = np.random.default_rng(1)
    gamma, beta = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    plain, synced = _batchnorm(shape, gamma, beta), _batchnorm(shape, gamma, beta, FakeOneRank())
    for _ in range(2):
        x, g = rng.normal(size=shape) * 2 + 0.5, rng.normal(size=shape)
        for a, b in ((plain.forward(x, train=True), synced.forward(x, train=True)),
                     (plain.backward(g), synced.backward(g)),
                     (plain.weight.grad, synced.weight.grad), (plain.bias.grad, synced.bias.grad)):
            np.testing.assert_array_equal(a, b)
    for name in plain.buffers:
        np.testing.assert_array_equal(plain.buffers[name], synced.buffers[name])
    np.testing.assert_array_equal(plain.forward(x), synced.forward(x))


@pytest.mark.parametrize("shape", [(7, 5), (7, 3, 4, 4)])
def test_sync_bn_on_uneven_shards_is_the_global_batch(shape):
    """Two "processes" (threads) hold 3 and 4 of 7 rows, each backpropagating its LOCAL mean
    loss, as the trainer does. The layer reproduces one process on all 7 rows: outputs and
    running statistics equal; dx is the global one divided by the process's weight
    w = local/global rows; dγ, dβ summed with weights w (the trainer's allreduce) are the
    global ones."""
    rng = np.random.default_rng(2)
    gamma, beta = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    x, up = rng.normal(size=shape) * 3 + 1, rng.normal(size=shape)  # up: d(Σ loss)/dy
    n, cuts = shape[0], [(0, 3), (3, 7)]
    one = _batchnorm(shape, gamma, beta)
    y_one, dx_one = one.forward(x, train=True), one.backward(up / n)  # mean loss over n rows
    ranks, results = ThreadRanks(2), [None, None]

    def process(r):
        a, b = cuts[r]
        layer = _batchnorm(shape, gamma, beta, ranks)
        y = layer.forward(x[a:b], train=True)
        dx = layer.backward(up[a:b] / (b - a))                       # its local mean loss
        results[r] = (y, dx, layer.weight.grad, layer.bias.grad, layer.buffers, (b - a) / n)

    threads = [threading.Thread(target=process, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(res is not None for res in results)
    tol = 1e-12
    assert relative(y_one, np.concatenate([res[0] for res in results])) <= tol
    assert relative(dx_one, np.concatenate([res[1] * res[5] for res in results])) <= tol
    assert relative(one.weight.grad, sum(res[2] * res[5] for res in results)) <= tol
    assert relative(one.bias.grad, sum(res[3] * res[5] for res in results)) <= tol
    for res in results:
        for name in ("running_mean", "running_var"):
            assert relative(one.buffers[name], res[4][name]) <= tol, name
    # and without synchronisation the shards' statistics are not the global batch's
    alone = _batchnorm(shape, gamma, beta)
    assert relative(y_one[:3], alone.forward(x[:3], train=True)) > 1e-3


def test_sync_batchnorm_reaches_every_batchnorm_and_is_off_for_one_process():
    """``sync_batchnorm`` sets the reducer on each BatchNorm, those in residual blocks too;
    with no communicator or a 1-process one it leaves them unsynchronised."""
    from nnx.distributed import sync_batchnorm
    from nnx.layers import BatchNorm, Conv2D, Dense, Flatten, ReLU, Residual
    from nnx.model import Sequential

    model = Sequential([Conv2D(1, 2, 3, padding=1), BatchNorm(2), ReLU(),
                        Residual([Conv2D(2, 2, 3, padding=1), BatchNorm(2)]), Flatten(),
                        Dense(2 * 4 * 4, 3)], input_shape=(1, 4, 4), dtype="float64")
    bns = [layer for layer in model.walk() if isinstance(layer, BatchNorm)]
    ranks = ThreadRanks(2)
    assert sync_batchnorm(model, ranks) == 2 and all(b.sync is ranks for b in bns)
    sync_batchnorm(model, FakeOneRank())
    assert all(b.sync is None for b in bns)
    sync_batchnorm(model, ranks)
    sync_batchnorm(model, None)
    assert all(b.sync is None for b in bns)


class ThreadComm:
    """Rank ``rank`` of K threads standing in for K processes, as much of a communicator as
    the Trainer uses (sums over the threads' values, with barriers)."""

    def __init__(self, rank, ranks: ThreadRanks):
        self.rank, self.size, self.ranks = rank, ranks.size, ranks

    def allreduce_sum_(self, x):
        return self.ranks.allreduce_sum_(x)

    def allreduce_scalars(self, values):
        return [float(v) for v in self.ranks.allreduce_sum_(np.asarray([float(v) for v in values]))]

    def barrier(self):
        self.ranks.barrier.wait()

    def bcast(self, obj, root=0):
        if self.rank == root:
            self.ranks.sent = obj
        self.ranks.barrier.wait()
        obj = self.ranks.sent
        self.ranks.barrier.wait()
        return obj


@pytest.mark.parametrize("sync", [True, False], ids=["sync-bn", "local-bn"])
def test_batchnorm_cnn_with_more_processes_than_rows_in_the_last_batch(sync):
    """128 rows at batch 63: the last batch has 2 rows and 3 processes share it, so one holds
    none. Every process trains on (no division by zero, no NaN statistics), the processes keep
    the same weights, and with --sync-bn they are one process's weights. The validation
    metrics are those of the model rank 0 saves (its running statistics, on every shard)."""
    import nnx
    from nnx.data import Split
    from nnx.distributed import sync_batchnorm
    from nnx.optim import make_optimizer
    from nnx.schedules import make_schedule
    from nnx.trainer import Trainer

    b = nnx.get_backend("numpy")
    g = np.random.default_rng(0)
    x, y = g.random((128, 1, 6, 6)), g.integers(0, 3, 128)
    val = Split(b.from_numpy(g.random((30, 1, 6, 6))), b.from_numpy(g.integers(0, 3, 30)))

    def train(comm=None):
        model = nnx.Sequential([nnx.Conv2D(1, 4, 3, padding=1, bias=False), nnx.MaxPool2D(2, 2),
                                nnx.BatchNorm(4), nnx.ReLU(), nnx.Flatten(), nnx.Dense(36, 3)],
                               (1, 6, 6), backend=b,
                               dtype="float64", seed=1)
        if sync:
            sync_batchnorm(model, comm)
        opt = make_optimizer("sgd", model.named_parameters(), 0.1)
        t = Trainer(model, opt, make_schedule("constant", 0.1, 2, 3), batch_size=63, epochs=2,
                    seed=0, progress=False, log=lambda *a: None, comm=comm)
        t.fit(Split(b.from_numpy(x), b.from_numpy(y)), val)
        return {**model.state_dict(), "val": np.asarray(t.history[-1]["val_loss"])}

    ranks, out = ThreadRanks(3), [None] * 3

    def run_rank(r):
        try:
            out[r] = train(ThreadComm(r, ranks))
        except BaseException as e:  # the others would wait at the barrier for ever
            out[r] = e
            ranks.barrier.abort()

    threads = [threading.Thread(target=run_rank, args=(r,), daemon=True) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    errors = [o for o in out if not isinstance(o, dict)]
    assert not errors, f"a rank failed: {errors}"
    one = train()
    for name in one:
        assert np.all(np.isfinite(out[0][name])), name
        # the same everywhere: weights always, running statistics since the last evaluation
        assert relative(out[0][name], out[1][name]) == 0.0, name
        assert relative(out[0][name], out[2][name]) == 0.0, name
        if sync:
            assert relative(one[name], out[0][name]) <= 1e-10, name
    # the reported validation loss is rank 0's model's, evaluated alone
    model = nnx.Sequential([nnx.Conv2D(1, 4, 3, padding=1, bias=False), nnx.MaxPool2D(2, 2),
                            nnx.BatchNorm(4), nnx.ReLU(), nnx.Flatten(), nnx.Dense(36, 3)],
                           (1, 6, 6), backend=b, dtype="float64")
    model.load_state_dict({k: v for k, v in out[0].items() if k != "val"})
    alone = Trainer(model, make_optimizer("sgd", model.named_parameters(), 0.1),
                    make_schedule("constant", 0.1, 1, 1), batch_size=63, epochs=1,
                    progress=False, log=lambda *a: None)
    assert abs(alone.evaluate(val)[0] - float(out[0]["val"])) <= 1e-12


def _rank_pids(out_dir, k, deadline):
    """The pids of the K ranks training into ``out_dir`` (Linux /proc: their environment
    names their rank), once all have started."""
    found = {}
    while len(found) < k and time.time() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                if str(out_dir).encode() not in cmd or b"nnx.train" not in cmd:
                    continue
                env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0")
                           if b"=" in v)
            except OSError:
                continue
            rank = env.get(b"OMPI_COMM_WORLD_RANK")
            if rank is not None:
                found[int(rank)] = int(proc.name)
        time.sleep(0.05)
    return found


def _launch(tmp_path, out, k=2):
    data = mnist_dir()
    if data is None:
        pytest.skip("MNIST not found (set NNX_DATA_DIR; see tests/mnist_location.py)")
    cmd = [MPIRUN, "-n", str(k), "--oversubscribe", sys.executable, "-m", "nnx.train",
           "--distributed", "--limit", "2000", "--layers", "784,16,10", "--batch-size", "20",
           "--epochs", "300", "--quiet", "--no-plots", "--no-download", "--data-dir", str(data),
           "--out", str(out)]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_sigterm_to_one_follower_stops_every_rank_with_143(tmp_path):
    """A scheduler's SIGTERM reaching one process only: the ranks agree to stop at the next
    read point, rank 0 saves the checkpoint, and every rank exits 143 (the stop's kind is
    shared with the agreement)."""
    out = tmp_path / "run"
    p = _launch(tmp_path, out)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(out) and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        pids = _rank_pids(out, 2, deadline)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert "interrupted: saved checkpoint" in err and "MPI_ABORT" not in err
    assert not [f for f in out.rglob(".*")]  # no temporary files left


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_ctrl_c_to_one_rank_before_training_ends_the_job(tmp_path):
    """Ctrl-C to one rank while the run starts (after MPI is up, around the time the run
    folder appears): whether it lands before the training loop takes signals (then the job
    is aborted) or in it (then the ranks agree to stop), no rank is left waiting in a
    collective for ever."""
    out = tmp_path / "run"
    p = _launch(tmp_path, out)
    try:
        deadline = time.time() + 60
        while not out.exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.002)
        pids = _rank_pids(out, 2, deadline)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGINT)
        p.communicate(timeout=120)  # a hang raises TimeoutExpired
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0


def test_a_sigterm_at_the_end_of_an_epoch_gives_every_rank_143():
    """SIGTERM reaching one rank during validation: the ranks agree at the epoch's end to
    stop, and the stop's kind travels with the agreement (every rank's CLI exits 143)."""
    import nnx
    from nnx.data import Split
    from nnx.optim import make_optimizer
    from nnx.schedules import make_schedule
    from nnx.trainer import Trainer, TrainingInterrupted

    b = nnx.get_backend("numpy")
    g = np.random.default_rng(0)
    data = Split(b.from_numpy(g.random((40, 8))), b.from_numpy(g.integers(0, 3, 40)))
    ranks, kinds = ThreadRanks(2), {}

    def train(r):
        model = nnx.Sequential([nnx.Dense(8, 3)], (8,), backend=b, dtype="float64", seed=1)
        t = Trainer(model, make_optimizer("sgd", model.named_parameters(), 0.1),
                    make_schedule("constant", 0.1, 3, 2), batch_size=20, epochs=3,
                    progress=False, log=lambda *a: None, comm=ThreadComm(r, ranks))
        if r == 1:  # (the main thread: the one that takes signals)
            evaluate = t.evaluate

            def signalled(split, batch_size=2048):
                os.kill(os.getpid(), signal.SIGTERM)
                return evaluate(split, batch_size)

            t.evaluate = signalled
        try:
            t.fit(data, data)
            kinds[r] = "finished"
        except TrainingInterrupted:
            kinds[r] = t._stop_kind
        except BaseException as e:
            kinds[r] = e
            ranks.barrier.abort()

    other = threading.Thread(target=train, args=(0,), daemon=True)
    other.start()
    train(1)
    other.join(timeout=60)
    assert kinds == {0: signal.SIGTERM, 1: signal.SIGTERM}, kinds


@needs_mpi
def test_a_rank_failing_before_its_communicator_exists_aborts_the_job(tmp_path):
    """MPI is up (mpi4py imported) but the communicator not made yet when rank 1 is
    interrupted: the job is aborted instead of rank 0 waiting in a collective for ever."""
    script = tmp_path / "early.py"
    script.write_text(
        "import sys\n"
        "from nnx.distributed import _mpi, abort_on_failure\n"
        "from nnx.errors import cli_main\n"
        "@abort_on_failure\n"
        "@cli_main\n"
        "def main(argv=None):\n"
        "    MPI = _mpi()\n"
        "    if MPI.COMM_WORLD.Get_rank() == 1:\n"
        "        raise KeyboardInterrupt\n"
        "    MPI.COMM_WORLD.Barrier()\n"
        "    return 0\n"
        "sys.exit(main())\n")
    r = run([sys.executable, str(script)], k=2, timeout=60)  # a hang: TimeoutExpired
    assert r.returncode != 0 and "MPI_ABORT" in r.stdout + r.stderr, r.stdout + r.stderr

