"""Data-parallel training on K processes: a thin communicator over MPI (and NCCL on GPUs).

The ChainerMN pattern: ``mpirun -n K python -m nnx.train ...`` starts one process per CPU
socket or GPU; every process builds the same model from the same seed, takes its part of
each global batch of the same seeded permutation, and between backward and update the
gradients are summed over all processes with ONE allreduce of the flat gradient array
(``average_gradients``). Every process then applies the same update to the same weights, so
the weights stay identical without ever being sent. See docs/distributed.md.

What carries the allreduce:

- NumPy, array-api-strict and PyTorch CPU tensors: MPI (mpi4py's in-place ``Allreduce`` on
  the array's own memory: the NumPy array, strict's wrapped NumPy array, ``tensor.numpy()``).
- CuPy: NCCL (``cupy.cuda.nccl``), bootstrapped over MPI (rank 0's unique id is broadcast),
  one GPU per local rank. Written to the NCCL API but not run here (no GPU in CI).
- PyTorch CUDA tensors: staged through host memory and summed by MPI (correct, not fast).
"""
from __future__ import annotations

import functools
import os
import sys

#: environment variables that MPI launchers set in the processes they start
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE",  # Open MPI
                      "PMI_SIZE",               # MPICH / Intel MPI (Hydra), Slurm PMI
                      "PMIX_SIZE",              # PMIx launchers
                      "MV2_COMM_WORLD_SIZE",    # MVAPICH2
                      "MPI_LOCALNRANKS")        # MPICH (Hydra), per node
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                   "SLURM_LOCALID", "PMI_LOCAL_RANK")
INSTALL_HINT = 'pip install "nnx[mpi]" (mpi4py and Open MPI, mpirun included)'

_ACTIVE = None  # the communicator of this process, once created (abort_on_failure reads it)
_AGREED_STOP = False  # set by agreed_stop(): this process's exit is a stop all ranks agreed on


class DistributedError(ValueError):
    """Distributed training cannot run as asked (no mpi4py, a batch that does not divide)."""


def detect() -> bool:
    """Whether this process was started by an MPI launcher (mpirun/mpiexec/srun with PMI)."""
    return any(os.environ.get(v) for v in LAUNCHER_SIZE_VARS) or bool(os.environ.get("PMIX_RANK"))


def _mpi():
    import signal

    # MPI starts while mpi4py's module is imported (about a second): a Ctrl-C or SIGTERM
    # arriving then would abandon the import with MPI already running, and no way left to
    # abort the job (abort_on_failure needs the module). Held until the import is done.
    block = getattr(signal, "pthread_sigmask", None)
    held = block(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if block else None
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DistributedError(f"--distributed needs mpi4py and an MPI library: {INSTALL_HINT}; "
                               f"then launch with mpirun -n K python -m nnx.train ... "
                               f"({e})") from None
    finally:
        if held is not None:
            block(signal.SIG_SETMASK, held)
    return MPI


class Communicator:
    """``rank``/``size`` of this process among the K, and the collectives training needs.

    ``allreduce_sum_(x)`` sums ``x`` over all processes in place; ``allreduce_scalars``
    sums a few Python numbers (one message); ``bcast`` sends a Python object from rank 0.
    """

    name = "mpi"

    def __init__(self, mpi_comm=None, backend=None):
        MPI = _mpi()
        self.backend = backend  # the arrays' backend: how to reach their memory (host_view)
        self.MPI = MPI
        self.comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)  # the processes on this machine
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()

    def allreduce_sum_(self, x):
        """Sum ``x`` over all processes, in place; returns ``x``."""
        if self.size == 1:
            return x
        backend = self._backend_of(x)
        buf = backend.host_view(x)
        if buf is None:  # a GPU array without NCCL (torch CUDA): stage through the host
            host = backend.to_numpy(x)
            self.comm.Allreduce(self.MPI.IN_PLACE, host)
            x[...] = backend.from_numpy(host, dtype=x.dtype)
            return x
        if buf.flags.c_contiguous:
            self.comm.Allreduce(self.MPI.IN_PLACE, buf)
        else:  # a strided view: sum a contiguous copy and write it back
            import numpy as np

            tmp = np.ascontiguousarray(buf)
            self.comm.Allreduce(self.MPI.IN_PLACE, tmp)
            buf[...] = tmp
        return x

    def _backend_of(self, x):
        if self.backend is None or not isinstance(x, self.backend.array_type):
            from .backends import backend_of

            self.backend = backend_of(x)
        return self.backend

    def allreduce_scalars(self, values) -> list[float]:
        """Sums over all processes of a few numbers (0-D arrays are read from the device)."""
        import numpy as np

        local = np.asarray([float(v) for v in values], dtype=np.float64)
        if self.size > 1:
            self.comm.Allreduce(self.MPI.IN_PLACE, local)
        return [float(v) for v in local]

    def bcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root) if self.size > 1 else obj

    def barrier(self) -> None:
        if self.size > 1:
            self.comm.Barrier()

    def quiet_follower(self) -> None:
        """On ranks other than 0: no stdout (rank 0 reports for all), and stderr held back:
        ``abort_on_failure`` shows it only when this rank failed alone."""
        if self.rank:
            sys.stdout = open(os.devnull, "w")
            sys.stderr = _Held(sys.stderr, f"[rank {self.rank}] ")

    def abort(self, code: int = 1) -> None:
        """Stop every process of the job now (MPI_Abort): what a failure on one rank does,
        so the others never wait forever in an allreduce."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        self.comm.Abort(int(code) or 1)

    def __repr__(self):
        return f"{type(self).__name__}(rank {self.rank} of {self.size})"


class NCCLCommunicator(Communicator):
    """CuPy arrays summed on the GPUs by NCCL; MPI only bootstraps it (the unique id) and
    carries the scalar reductions. NCCL runs on the backend's GPU (``cuda:<local rank>``
    unless ``--device cuda:N`` named one), so arrays and communicator never disagree.

    UNVERIFIED: written against ``cupy.cuda.nccl`` but never run (no GPU where it was made);
    docs/distributed.md says how to check it.
    """

    name = "nccl"

    def __init__(self, mpi_comm=None, device_id=None, backend=None):
        super().__init__(mpi_comm, backend)
        import cupy
        from cupy.cuda import nccl

        if not getattr(nccl, "available", True):  # CuPy without NCCL: no names to call
            raise DistributedError("CuPy cannot load NCCL (cupy.cuda.nccl.available is False): "
                                   "install NCCL where CuPy finds it (CuPy's installation "
                                   "guide, 'Optional libraries'), or train with --device cpu")
        self.cupy, self.nccl = cupy, nccl
        if device_id is None:
            device_id = self.local_rank % cupy.cuda.runtime.getDeviceCount()
        self.device_id = int(device_id)
        # CuPy 14: get_unique_id() -> bytes, NcclCommunicator(ndev, commId: bytes, rank);
        # older CuPy used a tuple for both: passed through unchanged, either works. The
        # communicator belongs to the device current when it is made: this one, which also
        # stays the process's current device (create_communicator's promise).
        self.device = cupy.cuda.Device(self.device_id)
        self.device.use()
        with self.device:
            uid = nccl.get_unique_id() if self.rank == 0 else None
            uid = self.comm.bcast(uid, root=0)
            self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._kinds = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64,
                       "float16": nccl.NCCL_FLOAT16}

    def allreduce_sum_(self, x):
        if self.size == 1 or self._backend_of(x).host_view(x) is not None:
            return super().allreduce_sum_(x)
        kind = self._kinds.get(str(x.dtype))
        if kind is None:
            raise DistributedError(f"NCCL allreduce: no NCCL type for {x.dtype} here "
                                   f"(use {', '.join(self._kinds)})")
        if x.data.device_id != self.device_id:
            raise DistributedError(f"NCCL allreduce: array on cuda:{x.data.device_id}, "
                                   f"communicator on cuda:{self.device_id}")
        if x.size == 0:
            return x
        with self.device:  # the stream of the communicator's device, whatever is current
            buf = x if x.flags.c_contiguous else self.cupy.ascontiguousarray(x)
            stream = self.cupy.cuda.get_current_stream()
            # allReduce(sendbuf, recvbuf, count, datatype, op, stream): in place is allowed
            self.nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, kind,
                                     self.nccl.NCCL_SUM, stream.ptr)
            if buf is not x:  # a strided view: write the sum back
                x[...] = buf
        return x


def create_communicator(backend=None) -> Communicator:
    """The communicator for ``backend``: NCCL for CuPy, MPI otherwise. Also puts the process
    on its GPU: the backend's (the caller picks ``cuda:<local rank>`` for plain ``cuda``)."""
    global _ACTIVE
    if backend is not None and getattr(backend, "name", "") == "cupy":
        comm = NCCLCommunicator(device_id=getattr(backend.device, "id", None), backend=backend)
    else:
        comm = Communicator(backend=backend)
    _ACTIVE = comm
    return comm


def local_rank_from_env() -> int:
    """This process's rank on its machine, from the launcher's environment (0 if unknown):
    known before MPI starts, so the GPU can be chosen before the backend loads."""
    for var in LOCAL_RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def shard(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of ``n`` that ``rank`` of ``size`` takes: contiguous, sizes differ by
    at most one (a last partial batch, an evaluation split)."""
    return n * rank // size, n * (rank + 1) // size


def average_gradients(comm, model, weight) -> None:
    """Between backward and update: every gradient becomes Σ over ranks of
    ``weight_r`` · (local gradient), ``weight_r`` = local rows / global rows, i.e. the
    gradient of the mean loss over the whole global batch (exact for an uneven last batch
    too). One allreduce over the flat gradient array; one per parameter without one."""
    if model.flat is not None:
        grads = [model.flat.grad]
    else:
        grads = [p.grad for p in model.parameters()]
    for g in grads:
        g *= weight
        comm.allreduce_sum_(g)


def broadcast_buffers(comm, model) -> None:
    """Every process takes rank 0's buffers (BatchNorm's running statistics). Without
    --sync-bn each process's running statistics follow its own shares of the batches, and
    rank 0's are the ones saved: evaluating with them on every process's shard of a split
    measures the saved model (torch DDP's ``broadcast_buffers`` does the same). Small
    arrays, one message, at evaluation time only."""
    if comm is None or comm.size == 1:
        return
    backend, buffers = model.backend, model.named_buffers()
    if not buffers:
        return
    host = {k: backend.to_numpy(v) for k, v in buffers.items()} if comm.rank == 0 else None
    host = comm.bcast(host, root=0)
    for k, b in buffers.items():
        model.load_buffer(k, backend.from_numpy(host[k], dtype=b.dtype))


def sync_batchnorm(model, comm) -> int:
    """``--sync-bn``: every BatchNorm of ``model`` computes its training statistics over the
    global batch (all processes' rows, as torch's SyncBatchNorm), summing its small
    per-feature arrays with ``comm.allreduce_sum_``: two allreduces in forward, one in
    backward per layer. ``comm`` None (or one process) turns it off. Returns how many layers
    it reached."""
    from .layers.batchnorm import BatchNorm

    reducer = comm if comm is not None and comm.size > 1 else None
    layers = [layer for layer in model.walk() if isinstance(layer, BatchNorm)]
    for layer in layers:
        layer.sync = reducer
    return len(layers)


class _Held:
    """A stderr that keeps what is written (a follower rank's messages) until ``release``."""

    def __init__(self, stream, prefix):
        self.stream, self.prefix, self.parts = stream, prefix, []

    def write(self, text):
        self.parts.append(text)
        return len(text)

    def flush(self):
        pass

    def release(self):
        text = "".join(self.parts)
        self.parts = []
        lines = [self.prefix + line for line in text.splitlines() if line.strip()]
        if lines:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()


#: seconds a failed follower rank waits before stopping the job: when rank 0 failed the
#: same way (a collective error: divergence, Ctrl-C), rank 0 reports it and ends the job first
FOLLOWER_GRACE_S = 3.0


def _started_world():
    """A ``Communicator`` over MPI's world when mpi4py has started MPI in this process but
    ``create_communicator`` has not run (a failure or Ctrl-C on the way): the other ranks may
    already wait for this one in a collective, so it must abort the job too. None otherwise."""
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
            return None
        world = Communicator.__new__(Communicator)
        world.MPI, world.comm, world.backend = mpi, mpi.COMM_WORLD, None
        world.rank, world.size = world.comm.Get_rank(), world.comm.Get_size()
        return world
    except Exception:  # noqa: BLE001 — best effort on the way out
        return None


def agreed_stop() -> None:
    """Say that this process is exiting because every rank agreed to stop (Ctrl-C/SIGTERM
    acted on at a read point, checkpoint saved): ``abort_on_failure`` then lets it exit
    without MPI_Abort. Any other exit code but 0, an interrupt before or outside that
    agreement included, aborts the job: the other ranks might wait for this one for ever."""
    global _AGREED_STOP
    _AGREED_STOP = True


def abort_on_failure(main):
    """Wrap a CLI ``main`` (outside ``cli_main``) so that a failure on any process of a
    distributed run stops all of them (MPI_Abort), with one message: rank 0's own, or,
    when a follower failed alone, the follower's held-back error (after a short grace)."""
    @functools.wraps(main)
    def wrapped(argv=None):
        global _AGREED_STOP
        code, _AGREED_STOP = 1, False
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
            raise
        finally:
            comm = _ACTIVE
            # 130/143 after agreed_stop(): Ctrl-C or SIGTERM, which the ranks agreed on and
            # stopped at together (checkpoint saved): an orderly exit, not a failure to abort
            orderly = code in (0, None) or (code in (130, 143) and _AGREED_STOP)
            if comm is None and not orderly:  # failed before its communicator was made
                comm = _started_world()
            if not orderly and comm is not None and comm.size > 1:
                error = sys.exc_info()[1]
                if error is not None and not isinstance(error, SystemExit):  # --debug
                    import traceback

                    traceback.print_exc()
                if comm.rank:
                    import time

                    time.sleep(FOLLOWER_GRACE_S)  # rank 0 ends the job first if it failed too
                    if isinstance(sys.stderr, _Held):
                        sys.stderr.release()
                comm.abort(code if isinstance(code, int) else 1)
        return code
    return wrapped


def device_for_rank(device: str) -> str:
    """``cuda`` becomes ``cuda:<local rank>`` (one GPU per process); anything else stays."""
    return f"cuda:{local_rank_from_env()}" if str(device) == "cuda" else device
