"""One training step as one function: forward, loss, hand-written backward, update.

``TrainStep`` holds no Python state that depends on array values and never reads from the
device: per-step values (learning rate, Adam's bias corrections) arrive as 0-D device arrays
from the optimizer's ``hyper_table``, targets as rows of a one-hot table. That is what lets
``torch.compile`` take the whole step once per run (``compile_step``) — the math stays
nnx's hand-written backprop, no autograd — and what keeps a GPU from waiting on the host.
"""
from __future__ import annotations

import os
import shutil


class CompileError(RuntimeError):
    """``--compile`` cannot work here (wrong backend, no C++ compiler), with what to do."""


class TrainStep:
    """``step(xb, targets, hyper) -> (Σ log p(target), correct)``: one update of the model.

    ``targets`` is the batch's one-hot (or probability) matrix; the two results are 0-D
    arrays the caller sums over an epoch (the training loss is −Σ/seen).
    """

    def __init__(self, model, loss, optimizer):
        self.model, self.loss, self.optimizer = model, loss, optimizer

    def __call__(self, xb, targets, hyper):
        logits = self.model.forward(xb, train=True)
        picked, correct = self.loss.train_forward(logits, targets)
        self.model.backward(self.loss.backward(), input_grad=False)
        self.optimizer.apply(hyper)
        return picked, correct


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU code generation would use, if any."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_step(step: TrainStep, backend, mode: str | None = None):
    """``step`` compiled with ``torch.compile`` (C++/OpenMP kernels on the CPU; Triton
    kernels and CUDA graphs, ``mode="reduce-overhead"``, on CUDA). Only the torch backend
    compiles; CuPy's equivalent is its fused kernels."""
    if backend.name != "torch":
        raise CompileError(f"--compile needs the torch backend (this run uses {backend.name}); "
                           "add --backend torch")
    import torch

    on_cuda = str(backend.device).startswith("cuda")
    if not on_cuda and cxx_compiler() is None:
        raise CompileError("--compile on the CPU needs a C++ compiler for torch.compile's "
                           "generated code: install g++ (e.g. apt install g++, or conda install "
                           "gxx) or set CXX, or train without --compile")
    if mode is None:
        mode = "reduce-overhead" if on_cuda else "default"
    return torch.compile(step, mode=mode, dynamic=False)
