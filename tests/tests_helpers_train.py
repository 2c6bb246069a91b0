"""Shared by several test files: synthetic digits (MNIST-shaped data that trains in seconds)
and a few training steps of a small MLP through the lean TrainStep (as the Trainer runs
them)."""
from __future__ import annotations

import numpy as np

import nnx
from nnx.losses import SoftmaxCrossEntropy
from nnx.optim import make_optimizer
from nnx.step import TrainStep


def train_steps(backend, optimizer, steps=6, dtype="float64"):
    """Final weights (flat, on the host) after ``steps`` steps with clipping and decay, and
    each step's (Σ log p, correct)."""
    with backend.activate():
        rng = np.random.default_rng(0)
        x = backend.from_numpy(rng.standard_normal((32, 12)), dtype=backend.dtype(dtype))
        t = backend.from_numpy(np.eye(4)[rng.integers(0, 4, 32)], dtype=backend.dtype(dtype))
        model = nnx.mlp([12, 16, 8, 4], backend=backend, dtype=dtype, seed=3)
        opt = make_optimizer(optimizer, model.named_parameters(), lr=0.05, weight_decay=0.01,
                             clip_norm=1.0, xp=model.xp)
        loss = SoftmaxCrossEntropy()
        opt.backend = loss.backend = backend  # what the Trainer does
        step = TrainStep(model, loss, opt)
        stats = []
        for k in range(steps):
            lo = (8 * k) % 32
            opt.steps += 1
            p, c = step(x[lo:lo + 8], t[lo:lo + 8], opt.hyper(opt.steps, opt.lr))
            stats.append((float(p), float(c)))
        weights = [backend.to_numpy(p.value).ravel() for p in model.parameters()]
        return np.concatenate(weights), stats


def synthetic_digits(n_train=1200, n_test=300, seed=0):
    """28x28 uint8 images where class c lights a 7x7 block at a fixed spot, plus noise."""
    g = np.random.default_rng(seed)

    def make(n):
        y = g.integers(0, 10, n).astype(np.uint8)
        x = g.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for c in range(10):
            r, col = 7 * (c // 4), 7 * (c % 4)
            x[y == c, r:r + 7, col:col + 7] = 255
        return x, y

    return {"train": make(n_train), "test": make(n_test)}
