"""One training step as one function: forward, loss, hand-written backward, update.

``TrainStep`` holds no Python state that depends on array values and never reads from the
device: per-step values (learning rate, Adam's bias corrections) arrive as 0-D device arrays
from the optimizer's ``hyper_table``, targets as rows of a one-hot table. That is what lets
``torch.compile`` take the whole step once per run (``compile_step``) — the math stays
nnx's hand-written backprop, no autograd — and what keeps a GPU from waiting on the host.
"""
from __future__ import annotations

from .backends.base import CompileError  # noqa: F401  (raised here, and re-exported)


class TrainStep:
    """``step(xb, targets, hyper) -> (Σ log p(target), correct)``: one update of the model.

    ``targets`` is the batch's one-hot (or probability) matrix; the two results are 0-D
    arrays the caller sums over an epoch (the training loss is −Σ/seen).

    With a communicator ``comm`` (data-parallel, nnx.distributed), ``xb`` is this process's
    part of the global batch, ``weight`` its share of the rows, and the gradients are
    summed over the processes (one allreduce) between backward and update.
    """

    def __init__(self, model, loss, optimizer, comm=None):
        from .losses import bind_namespace

        self.model, self.loss, self.optimizer, self.comm = model, loss, optimizer, comm
        bind_namespace(loss, model.parameters()[0].value if model.parameters() else None, model.xp)

    def __call__(self, xb, targets, hyper, weight=1.0):
        logits = self.model.forward(xb, train=True)
        picked, correct = self.loss.train_forward(logits, targets)
        self.model.backward(self.loss.backward(), input_grad=False)
        if self.comm is not None:  # data-parallel: Σ over ranks of weight·gradient
            from .distributed import average_gradients

            average_gradients(self.comm, self.model, weight)
        self.optimizer.apply(hyper)
        return picked, correct


def check_compilable(backend, compiler: str = "inductor", model=None) -> None:
    """Raise CompileError, saying what to do, unless ``compile_step`` can work here.

    The model must keep one array per parameter (``flat=False``): torch.compile (2.13)
    mis-replays views of views of one flat buffer in conv nets and fails, and it fuses the
    per-parameter updates into few kernels by itself."""
    if model is not None and model.flat is not None:
        raise CompileError("compile a model built with flat=False (torch.compile cannot replay "
                           "parameters that are views of one flat array)")
    backend.check_compile(compiler)


def compile_step(step: TrainStep, backend, mode: str | None = None, compiler: str = "inductor"):
    """``step`` compiled by the backend (``Backend.compile``: torch.compile on the torch
    backend), the first call run eagerly."""
    check_compilable(backend, compiler, step.model)
    return _EagerFirst(step, backend.compile(step, mode, compiler))


class _EagerFirst:
    """Run the first call eagerly, every later one compiled: the first step creates the
    layers' caches (ReLU's zeros, the loss's namespace), so the compiler traces the steady
    state once instead of tracing the first step and re-tracing the second."""

    def __init__(self, eager, compiled):
        self.eager, self.compiled, self.calls = eager, compiled, 0

    def __call__(self, *args):
        self.calls += 1
        return (self.eager if self.calls == 1 else self.compiled)(*args)
