"""The training loop shared by the library API and ``python -m nnx.train``.

Everything in a step stays on the device: batches are gathered from device-resident splits,
running loss and accuracy are 0-D device arrays, and the host reads them only a few times
per epoch (progress bar, NaN check) — never once per step.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from .checkpoint import atomic_write_json, save_weights
from .data import Split
from .losses import SoftmaxCrossEntropy
from .step import TrainStep, compile_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``checkpoint`` is where the state was saved."""

    def __init__(self, checkpoint):
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


def derived_seed(seed: int, *parts: int) -> int:
    """A reproducible seed per (run seed, epoch, purpose): resuming re-creates the same streams."""
    h = int(seed) & 0xFFFFFFFF
    for p in parts:
        h = (h * 1_000_003 + int(p) * 7_919 + 12_345) % (2**31 - 1)
    return h


class Trainer:
    """Mini-batch training with validation, early stopping, checkpoints and metrics.

    ``run_dir`` (optional) receives ``metrics.jsonl`` and a checkpoint after every epoch.
    ``early_stopping`` is the patience in epochs on validation loss (0 disables it); when it
    stops the run, the best weights are restored.

    ``comm`` (``nnx.distributed.create_communicator``) trains data-parallel: each process
    takes its part of every global batch of ``batch_size`` rows, gradients are summed once
    per step, evaluation is sharded, and only rank 0 writes ``run_dir`` or logs.
    ``sync_bn`` makes BatchNorm layers normalise with the statistics of the global batch
    (``nnx.distributed.sync_batchnorm``); by default each process uses its own rows'.
    """

    READS_PER_EPOCH = 5  # host reads of the running loss per epoch (progress + NaN check)
    #: the first steps of a run, timed apart (torch.compile traces, CuPy compiles its kernels
    #: and backend overrides check themselves there): the epoch's time leaves them out
    WARMUP_STEPS = 2
    #: checkpoint every N epochs (and always at the last one, on stopping or Ctrl-C):
    #: ``--checkpoint-every``; a per-epoch fsync would dominate ~20 ms GPU epochs
    checkpoint_every = 1

    def __init__(self, model, optimizer, schedule, batch_size: int = 128, epochs: int = 10,
                 seed: int = 0, early_stopping: int = 0, run_dir=None, progress: bool = True,
                 log=print, loss=None, compile: bool = False, comm=None,
                 sync_bn: bool = False):
        from .distributed import DistributedError

        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.comm = comm if comm is not None and comm.size > 1 else None
        self.rank, self.world = (comm.rank, comm.size) if self.comm else (0, 1)
        if batch_size % self.world:
            raise DistributedError(f"--batch-size {batch_size} (the global batch) does not divide among "
                             f"{self.world} processes; use a multiple of {self.world}")
        if compile and self.comm:
            raise DistributedError("--compile is not supported with --distributed (the allreduce "
                             "would split the compiled step)")
        if sync_bn:  # (one process: its statistics are the global batch's already)
            from .distributed import sync_batchnorm

            sync_batchnorm(model, self.comm)
        if self.rank:  # rank 0 alone writes files and logs
            run_dir, progress, log = None, False, (lambda *a, **k: None)
        if epochs <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.loss = loss or SoftmaxCrossEntropy()
        if not hasattr(self.loss, "train_forward"):
            raise TypeError(f"{type(self.loss).__name__} has no train_forward(logits, targets): "
                            "the Trainer trains classifiers with SoftmaxCrossEntropy")
        self.batch_size, self.epochs, self.seed = int(batch_size), int(epochs), int(seed)
        self.patience = int(early_stopping)
        self.run_dir = Path(run_dir) if run_dir else None
        if self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress, self.log = progress, log
        self.xp, self.backend = model.xp, model.backend
        #: forward, loss, backward and update as one function (nnx.step); ``compile=True``
        #: runs full batches through torch.compile, a smaller last batch eagerly
        self.step = TrainStep(model, self.loss, optimizer, self.comm)
        self.compiled_step = compile_step(self.step, self.backend) if compile else None
        self._targets_of = {}  # id(split) -> (split, one-hot targets on the device)
        # position, restored by resume()
        self.epoch = 0            # completed epochs
        self.step_in_epoch = 0    # steps done inside the current epoch (after an interrupt)
        self.global_step = 0
        self.partial = {"loss_sum": 0.0, "correct": 0.0, "seen": 0}
        self.best_val_loss = math.inf
        self.bad_epochs = 0
        self.best_weights = None
        self.history: list[dict] = []
        self._stop_requested = False
        self._stop_signal = self._stop_kind = None  # (set while fit runs: _graceful_sigint)
        self._warmup_left = self.WARMUP_STEPS
        self._warmup = [0.0, 0]  # this epoch's warm-up: seconds, rows

    # --- evaluation ---------------------------------------------------------------------
    def evaluate(self, split, batch_size: int = 2048) -> tuple[float, float]:
        """(mean loss, accuracy) over a split, in eval mode; one host read at the end (and
        one reduction: distributed, each process evaluates its shard of the split)."""
        with self.backend.activate():  # cuda:N: the work stays on GPU N
            if self.comm:  # every process evaluates the model rank 0 saves
                from .distributed import broadcast_buffers

                broadcast_buffers(self.comm, self.model)
            return self._evaluate(split, batch_size)

    def _evaluate(self, split, batch_size):
        xp, n = self.xp, len(split)
        loss_sum = correct = 0.0
        first, last = (0, n) if not self.comm else ((n * self.rank) // self.world,
                                                      (n * (self.rank + 1)) // self.world)
        for start in range(first, last, batch_size):
            stop = min(start + batch_size, last)  # the standard leaves out-of-range stops undefined
            xb, yb = split.x[start:stop, ...], split.y[start:stop]
            logits = self.model.forward(xb, train=False)
            loss_sum = loss_sum + self.loss.forward(logits, yb) * yb.shape[0]
            correct = correct + xp.sum(xp.astype(xp.argmax(logits, axis=1) == yb, logits.dtype))
        if self.comm:
            loss_sum, correct = self.comm.allreduce_scalars([loss_sum, correct])
        return float(loss_sum) / n, float(correct) / n

    # --- one epoch ----------------------------------------------------------------------
    def targets(self, split):
        """The split's labels as a one-hot matrix in the model's dtype, made once per split."""
        cached = self._targets_of.get(id(split))
        if cached is None or cached[0] is not split:
            xp, y = self.xp, split.y
            classes = xp.arange(self.model.output_shape[-1], dtype=y.dtype, device=y.device)
            onehot = xp.astype(xp.reshape(y, (-1, 1)) == xp.reshape(classes, (1, -1)),
                               self.model.dtype)
            cached = self._targets_of[id(split)] = (split, onehot)
        return cached[1]

    def _train_epoch(self, split, epoch: int):
        model, opt = self.model, self.optimizer
        n, bs = len(split), self.batch_size
        steps = math.ceil(n / bs)
        perm = self._shuffler(derived_seed(self.seed, epoch, 1)).permutation(n)
        start = self.step_in_epoch
        model.rng.reseed(derived_seed(self.seed, epoch, 2, self.rank))  # dropout: one stream per rank
        if start:  # resumed mid-epoch: replay the dropout draws of the steps already done
            model.skip_steps(start, bs // self.world)
        # global rows [lo, hi) of each step, and this process's rows [a, b) of its epoch order
        bounds = [(k * bs, min((k + 1) * bs, n)) for k in range(steps)]
        local = [0]
        if self.comm:  # its part of every global batch (sizes differ by <= 1 in a last one)
            perm, local = self._local_rows(perm, bounds)
        else:
            local += [hi for _, hi in bounds]
        # each batch is gathered when its step comes (on a CPU the rows are then still in
        # cache for the forward pass; one gather of the whole epoch up front was slower)
        onehot, take = self.targets(split), self.backend.take_rows
        rows = split.rows if isinstance(split, Split) else (lambda _, idx: take(split.x, idx))
        # per-step values for the whole epoch, one host-to-device copy (no per-step copies)
        hyper = opt.hyper_table(opt.steps, [self.schedule(self.global_step + i)
                                            for i in range(steps - start)],
                                self.backend, model.dtype)
        # Σ log p(target) (the loss sum is its negative) and correct rows; distributed, these
        # are this rank's, summed over ranks only at the read points (rank 0 holds the resumed part)
        picked = -self.partial["loss_sum"] if self.rank == 0 else 0.0
        correct = self.partial["correct"] if self.rank == 0 else 0.0
        total_picked, total_correct = picked, correct
        seen = self.partial["seen"]
        read_every = max(1, steps // self.READS_PER_EPOCH)
        bar = self._bar(steps, epoch, start)
        try:
            for k in range(start, steps):
                (lo, hi), a, b = bounds[k], local[k], local[k + 1]
                step = self.compiled_step if self.compiled_step and hi - lo == bs else self.step
                share = ((b - a) / (hi - lo),) if self.comm else ()  # this rank's gradient weight
                idx = perm[a:b]
                warming = self._warmup_left > 0
                if warming:
                    t = time.perf_counter()
                p, c = step(rows(self.backend, idx), take(onehot, idx),
                            tuple(col[k - start] for col in hyper), *share)
                if warming:  # (a host synchronisation on a run's first steps only)
                    self.backend.synchronize()
                    self._warmup_left -= 1
                    self._warmup[0] += time.perf_counter() - t
                    self._warmup[1] += hi - lo
                opt.steps += 1
                self.global_step += 1
                seen += hi - lo
                picked, correct = picked + p, correct + c
                stop = self._stop_requested
                if (k + 1) % read_every == 0 or k + 1 == steps:
                    total_picked, total_correct, stop = self._reduce(picked, correct, stop)
                    mean = -total_picked / seen  # the only host read: a few per epoch
                    if not math.isfinite(mean):
                        raise TrainingDiverged(
                            f"loss became {mean} in epoch {epoch + 1} by step {k + 1} "
                            f"(global step {self.global_step}); {self._kept()}. Try a smaller "
                            "--lr, gradient clipping (--clip-norm 1.0), or float64")
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{self.schedule(self.global_step - 1):.2e}")
                        bar.update(k + 1 - bar.n)
                elif self.comm:
                    stop = False  # ranks stop together, at a read point
                if stop and k + 1 < steps:  # Ctrl-C: stop between two steps
                    if not self.comm:  # (distributed, the totals were just reduced)
                        total_picked, total_correct, _ = self._reduce(picked, correct, stop)
                    raise _Interrupt(epoch, k + 1, -total_picked, total_correct, seen)
        finally:
            if bar is not None:
                bar.close()
        self.step_in_epoch = 0
        self.partial = {"loss_sum": 0.0, "correct": 0.0, "seen": 0}
        return -total_picked / seen, total_correct / seen

    def _local_rows(self, perm, bounds):
        """This rank's rows of the epoch order ``perm`` (its shard of every global batch, in
        step order) and where each step's rows start in them."""
        from .distributed import shard

        rows, local = [], [0]
        for lo, hi in bounds:
            a, b = shard(hi - lo, self.rank, self.world)
            rows.extend(range(lo + a, lo + b))
            local.append(local[-1] + b - a)
        index = self.xp.asarray(rows, dtype=self.xp.int64, device=self.backend.device)
        return self.xp.take(perm, index, axis=0), local

    def _reduce(self, picked, correct, stop):
        """The running sums (and whether any rank was asked to stop) over all ranks: one
        host read, and one small allreduce when distributed."""
        if not self.comm:
            return float(picked), float(correct), stop
        return self._agree_on_stop(stop, picked, correct)

    def _agree_on_stop(self, stop, *sums):
        """Distributed: whether any rank was asked to stop (and the sums of ``sums``), in one
        small allreduce. A stop makes every rank stop; if any rank's came from SIGTERM, every
        rank's exit code says so (143)."""
        import signal

        *totals, stops, terms = self.comm.allreduce_scalars(
            [*sums, float(stop), float(self._stop_kind == signal.SIGTERM)])
        if stops:
            self._stop_requested = True  # (not this rank's own signal: _stop_signal stays)
            if terms:
                self._stop_kind = signal.SIGTERM
        return (*totals, bool(stops)) if sums else bool(stops)

    def _shuffler(self, seed):
        """The run's one device stream for epoch orders, restarted from ``seed`` (the same
        numbers as a new generator; no new generator object per epoch)."""
        rng = getattr(self, "_perm_rng", None)
        if rng is None:
            rng = self._perm_rng = self.backend.device_rng(seed)
        else:
            rng.reseed(seed)
        return rng

    def _bar(self, steps, epoch, start):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.epochs}", unit="step",
                   leave=False, dynamic_ncols=True, disable=None)  # off when not a terminal
        bar.update(start)
        return bar

    # --- the loop -----------------------------------------------------------------------
    def fit(self, train, val=None, test=None) -> list[dict]:
        """Train for the remaining epochs; returns the per-epoch metrics (also in metrics.jsonl).

        Ctrl-C finishes the current step, saves a checkpoint (with a run folder) and raises
        ``TrainingInterrupted``; a second Ctrl-C aborts at once.
        """
        for part in (self.optimizer, self.loss):  # their fused ops (backends/overrides.py)
            if getattr(part, "backend", False) is None:
                part.backend = self.backend
        with _graceful_sigint(self), self.backend.activate():  # cuda:N: work stays on GPU N
            return self._fit(train, val, test)

    def _fit(self, train, val, test):
        if len(train) == 0:
            raise ValueError("the training split is empty: nothing to train on")
        problem = batchnorm_rows_problem(self.model, len(train), self.batch_size, self.world)
        if problem:
            raise ValueError(problem)
        while self.epoch < self.epochs:
            epoch = self.epoch
            t0 = time.perf_counter()
            seen_before = self.partial["seen"]
            self._warmup = [0.0, 0]
            try:
                train_loss, train_acc = self._train_epoch(train, epoch)
            except _Interrupt as it:
                self.step_in_epoch = it.step
                self.global_step = epoch * math.ceil(len(train) / self.batch_size) + it.step
                self.partial = {"loss_sum": float(it.loss_sum), "correct": float(it.correct),
                                "seen": it.seen}
                path = self.save() if self.run_dir else None
                if self.comm:  # rank 0's checkpoint is complete before any rank exits
                    self.comm.barrier()
                raise TrainingInterrupted(path) from None
            self.backend.synchronize()
            warmup_s, warmup_rows = self._warmup
            elapsed = time.perf_counter() - t0 - warmup_s
            row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                   "lr": self.schedule(max(0, self.global_step - 1)),
                   "epoch_time_s": round(elapsed, 4),
                   "samples_per_s": round((len(train) - seen_before - warmup_rows) / elapsed, 1)}
            if warmup_rows:
                row["warmup_s"] = round(warmup_s, 4)
            if val is not None:
                row["val_loss"], row["val_acc"] = self.evaluate(val)
            self.epoch += 1
            stop = self._early_stopping(row)
            stop_now = self._stop_requested and self.epoch < self.epochs  # Ctrl-C at epoch end
            if self.comm:  # every rank stops, or none (and with 143 if a SIGTERM asked)
                stop_now = self._agree_on_stop(stop_now)
            self.history.append(row)
            self._log_epoch(row)
            path = None
            if self.run_dir:
                self._append_metrics(row)
                if (self.epoch % max(1, self.checkpoint_every) == 0 or stop or stop_now
                        or self.epoch >= self.epochs):
                    path = self.save()
            if stop:
                self.log(f"early stopping: validation loss has not improved for {self.patience} "
                         f"epochs")
                break
            if stop_now:
                if self.comm:
                    self.comm.barrier()
                raise TrainingInterrupted(path)
        result = {}
        if self.patience and self.best_weights is not None:
            # with early stopping on, the run ends with its best-validation weights
            self.log(f"restoring the weights of epoch {self.best_epoch} (best validation loss "
                     f"{self.best_val_loss:.4f})")
            self.restore_best()
            result["best_epoch"] = self.best_epoch
        if test is not None:
            result["test_loss"], result["test_acc"] = self.evaluate(test)
            self.log(f"test: loss {result['test_loss']:.4f}  accuracy {100 * result['test_acc']:.2f}%")
        if self.run_dir:
            save_weights(self.run_dir / "model.safetensors", self.model)
            atomic_write_json(self.run_dir / "results.json",
                              {"epochs_completed": self.epoch, **result,
                               "final": self.history[-1] if self.history else None})
        self.result = result
        return self.history

    # --- early stopping -----------------------------------------------------------------
    def _early_stopping(self, row) -> bool:
        if not self.patience or "val_loss" not in row:
            return False
        if row["val_loss"] < self.best_val_loss:
            self.best_val_loss, self.bad_epochs, self.best_epoch = row["val_loss"], 0, row["epoch"]
            xp = self.xp
            self.best_weights = {k: xp.asarray(p.value, copy=True)
                                 for k, p in self.model.named_parameters().items()}
            self.best_weights.update({k: xp.asarray(b, copy=True)
                                      for k, b in self.model.named_buffers().items()})
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def restore_best(self) -> None:
        if self.best_weights is None:
            return
        self.model.load_state_dict({k: self.backend.to_numpy(v) for k, v in self.best_weights.items()})

    # --- persistence --------------------------------------------------------------------
    def state(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "partial": self.partial,
                "rng": {"seed": self.seed, "scheme": "derived per (seed, epoch); mid-epoch "
                        "resume replays the steps done (Sequential.skip_steps)"},
                "early_stopping": {"patience": self.patience,
                                   "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
                                   "bad_epochs": self.bad_epochs,
                                   "best_epoch": getattr(self, "best_epoch", None)},
                "history": self.history}

    def _kept(self) -> str:
        """What a failure leaves behind, for messages."""
        from .checkpoint import list_checkpoints

        found = list_checkpoints(self.run_dir) if self.run_dir else []
        return (f"the last checkpoint, {found[-1].name}, is kept" if found
                else "no checkpoint was written yet")

    def save(self):
        """A checkpoint of this exact position in the run folder (``nnx.checkpoint.save_trainer``)."""
        from .checkpoint import save_trainer

        return save_trainer(self)

    def resume(self, ckpt_dir) -> None:
        """Restore weights, optimizer, position and early-stopping state from a checkpoint
        (``nnx.checkpoint.resume_trainer``); any inconsistency is a CheckpointError."""
        from .checkpoint import resume_trainer

        resume_trainer(self, ckpt_dir)

    def _append_metrics(self, row) -> None:
        from .checkpoint import append_metrics

        append_metrics(self.run_dir, row)

    def _log_epoch(self, row) -> None:
        parts = [f"epoch {row['epoch']:>3}/{self.epochs}",
                 f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%"]
        if "val_loss" in row:
            parts.append(f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%")
        parts.append(f"{row['epoch_time_s']:.1f}s ({row['samples_per_s']:,.0f} samples/s)")
        self.log("  ".join(parts))


class _graceful_sigint:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM — what cluster schedulers send — into a stop
    request checked between steps (main thread only). A second one aborts at once, except
    while a checkpoint is being written: then it waits until the checkpoint is complete
    (``nnx.checkpoint.save_trainer``), so no signal can leave a half-written checkpoint."""

    def __init__(self, trainer):
        self.trainer = trainer

    def __enter__(self):
        import signal
        import sys
        import threading

        self.previous = {}
        trainer = self.trainer
        trainer._stop_requested = False
        trainer._abort_pending = False
        trainer._stop_signal = trainer._stop_kind = None  # this rank's signal; the stop's kind
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                # a second signal to this process (a stop the ranks agreed on after another
                # rank's signal is not one: this process's own first signal joins it)
                if trainer._stop_signal is not None:
                    if getattr(trainer, "_saving", False):
                        trainer._abort_pending = True
                        print(f"\n{name}: a checkpoint is being written; stopping as soon as "
                              "it is complete", file=sys.stderr, flush=True)
                        return
                    raise KeyboardInterrupt
                trainer._stop_requested = True
                trainer._stop_signal = signum
                trainer._stop_kind = trainer._stop_kind or signum
                print(f"\n{name}: finishing this step and saving a checkpoint (press Ctrl-C "
                      "again to abort without saving)", file=sys.stderr, flush=True)

            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        return False


class _Interrupt(Exception):
    def __init__(self, epoch, step, loss_sum, correct, seen):
        super().__init__()
        self.epoch, self.step, self.loss_sum, self.correct, self.seen = epoch, step, loss_sum, correct, seen


def batchnorm_rows_problem(model, n: int, batch_size: int, world: int = 1,
                           sync: bool | None = None) -> str | None:
    """Why some training step would hand a BatchNorm a single value per feature — one row,
    after a Dense layer or on 1×1 maps — whose variance is 0 (torch refuses such a batch
    too), or None. Checked before training: otherwise the run would stop at the last batch of
    its first epoch. Each process normalises its own share of a global batch unless ``sync``
    (--sync-bn); an empty share is fine (nnx.layers.batchnorm), and larger maps give ≥ 2
    values per feature from one row."""
    from .distributed import shard
    from .layers.batchnorm import BatchNorm

    # layers where one row gives one value per feature: after a Dense layer, or on 1×1 maps
    layers = [layer for layer in model.walk()
              if isinstance(layer, BatchNorm) and math.prod(layer.in_shape[1:]) == 1]
    if not layers or n <= 0:
        return None
    if sync is None:  # as the layers are set up (nnx.distributed.sync_batchnorm)
        sync = layers[0].sync is not None
    sizes = sorted({min(batch_size, n)} | ({n % batch_size} if n % batch_size else set()))
    for rows in sizes:
        shares = [rows] if sync or world == 1 else [b - a for a, b in
                                                   (shard(rows, r, world) for r in range(world))]
        if 1 not in shares:
            continue
        name = layers[0].name or "BatchNorm"
        where = (f"the last batch of each epoch holds 1 row ({n:,} training rows, batch "
                 f"{batch_size})" if rows == 1 else
                 f"a batch of {rows} rows shared by {world} processes gives some process 1 row")
        fix = ("change --batch-size, --limit or --val-size" if rows == 1 else
               "use --sync-bn (statistics over the global batch), or change --batch-size, "
               "--limit or --val-size")
        return (f"layer {name}: {where}, and this batch norm needs at least 2 rows per step "
                f"(it sees one value per feature in each row: one row has variance 0); {fix}")
    return None
