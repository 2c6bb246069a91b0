"""Batch normalisation for (N, F) features and (N, C, H, W) feature maps, PyTorch conventions.

Training: normalise with the batch mean and the BIASED batch variance (divide by m, the
number of values per feature), then scale by ``weight`` (γ) and shift by ``bias`` (β).
The running statistics are exponential moving averages,
running = (1 − momentum)·running + momentum·batch, with the UNBIASED variance
(divide by m − 1) — what ``torch.nn.BatchNorm1d/2d`` keep. Evaluation normalises with the
running statistics. Buffers are named like torch's: ``running_mean``, ``running_var``,
``num_batches_tracked`` (int64).

Backward in training (x̂ = (x − μ)/σ, σ = √(var + eps), g = dL/dy, ĝ = γ·g; sums over the
m values of each feature):
    dx = (m·ĝ − Σĝ − x̂·Σ(ĝ·x̂)) / (m·σ),   dγ = Σ g·x̂,   dβ = Σ g
(docs/cnn.md derives it). In evaluation μ and σ are constants: dx = ĝ / σ.

γ is constant per feature, so Σĝ = γ·dβ and Σ(ĝ·x̂) = γ·dγ: the code reuses the two
parameter-gradient sums instead of summing again, and with xc = x − μ writes
    dx = g·(γ/σ) − xc·(γ·dγ/(m·σ²)) − γ·dβ/(m·σ)
— per-feature constants times the two big arrays, so the count of passes over them is the
cost. The layer works on an (F, m) view with one row per feature (free for a Conv2D's
channel-major output): the sums run along contiguous rows, and Σ(x − μ)² and Σ g·(x − μ)
are ``vecdot``s, one pass each without a temporary (docs/cnn.md has the pass counts).

Synchronised (data-parallel, ``--sync-bn``): with a reducer in ``self.sync`` (the trainer's
communicator, ``nnx.distributed.sync_batchnorm``; None by default) the statistics are those
of the GLOBAL batch, all processes' rows together, as torch's ``SyncBatchNorm`` computes
them. Sums over the m local values become sums over the M values of all processes, each an
in-place ``sync.allreduce_sum_`` of a small per-feature array:
    forward   [Σx, m] → μ = Σx/M, M;   then Σ(x − μ)² → var = Σ(x − μ)²/M   (two passes, as
              alone: no Σx² − M·μ² cancellation; the same numbers as one process, to rounding)
    backward  w·[Σg, Σg·x̂] with w = m/M
Each process's g is the gradient of ITS mean loss over its m/(values per row) rows; the
trainer weights its parameter gradients by w = local rows/global rows and sums them
(``nnx.distributed.average_gradients``). So the global gradient is G = w·g, the global sums
are Σ_ranks w·Σg, and dx = (1/w)·(dx of the global batch) — the formula above with m local
and the two sums replaced by the w-weighted sums over ranks (for even shards, w = 1/K:
the ranks' mean, torch's SyncBatchNorm with DDP). dγ and dβ stay the LOCAL sums: the
trainer's weighted allreduce turns them into Σ G·x̂ and Σ G. Running statistics use the
global μ and var (unbiased: M/(M − 1)), so they are the same on every process.
"""
from __future__ import annotations

import math

from ..errors import ShapeError
from .base import Layer


class BatchNorm(Layer):
    """``BatchNorm(num_features, eps=1e-5, momentum=0.1)``.

    Input (N, F) normalises each of the F features over the batch (like BatchNorm1d);
    input (N, C, H, W) normalises each channel over N·H·W values (like BatchNorm2d). Which
    one is decided at ``build`` from the input shape. ``momentum=None`` keeps a cumulative
    average instead (factor 1/num_batches_tracked), as in PyTorch.

    ``sync``: None (statistics of this process's batch), or a reducer with
    ``allreduce_sum_(array)`` (in place, over all processes) for global-batch statistics in
    training: see the module docstring; ``nnx.distributed.sync_batchnorm`` sets it.
    """

    sync = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__()
        if isinstance(num_features, bool) or int(num_features) != num_features or num_features < 1:
            raise ValueError(f"BatchNorm num_features must be a positive integer, got {num_features!r}")
        if not eps > 0:
            raise ValueError(f"BatchNorm eps must be positive, got {eps!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm momentum must be in [0, 1] or None, got {momentum!r}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)

    # --- life cycle ---------------------------------------------------------------------
    def build(self, backend, dtype, rng, input_shape):
        out = super().build(backend, dtype, rng, input_shape)
        xp, dev, f = self.xp, backend.device, self.num_features
        self.in_shape = tuple(input_shape)
        self.axes = (0,) if len(self.in_shape) == 1 else (0, 2, 3)  # what a statistic sums over
        self.weight = self.add_param("weight", xp.ones((f,), dtype=dtype, device=dev))
        self.bias = self.add_param("bias", xp.zeros((f,), dtype=dtype, device=dev))
        self.buffers["running_mean"] = xp.zeros((f,), dtype=dtype, device=dev)
        self.buffers["running_var"] = xp.ones((f,), dtype=dtype, device=dev)
        self.buffers["num_batches_tracked"] = xp.zeros((), dtype=xp.int64, device=dev)
        return out

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) not in (1, 3) or input_shape[0] != self.num_features:
            f = self.num_features
            raise ShapeError(f"layer {self.name or 'BatchNorm'}: expects input of shape ({f},) "
                             f"or ({f}, H, W), but the previous layer gives shape {input_shape}")
        return input_shape

    # --- passes -------------------------------------------------------------------------
    def forward(self, x, train=False):
        xp = self.xp
        if tuple(x.shape[1:]) != self.in_shape:
            self.check_features(x, self.in_shape)
        m = 1
        for a in self.axes:  # (a loop, not math.prod: torch.compile traces it)
            m *= x.shape[a]
        self.train_mode, self.shape, self.saved, self.xc = bool(train), tuple(x.shape), None, None
        if train and m == 0 and self.sync is None:  # see _EmptyBatch
            self.saved = (_EmptyBatch, (xp, self.weight.value, self.bias.value))
            return x
        if train and m < 2 and self.sync is None:
            raise ValueError(f"layer {self.name or 'BatchNorm'}: training needs more than one "
                             f"value per feature, got input of shape {tuple(x.shape)}")
        if train and self.sync is None:  # the batch's own statistics: a pair a backend may replace
            pair = self.pair("batchnorm", BatchNormPair)
            (y, mean, var), saved = pair.forward(x, self.weight.value, self.bias.value, self.eps)
            self._update_running(mean, var, m)
            self.saved = (pair, saved)
            return y
        x2 = rows(xp, x)                                               # (F, m)
        if train:  # synchronised: the global batch's statistics (module docstring)
            total, mean = self._global_mean(x2, m)
            xc = x2 - mean[:, None]
            var = self.sync.allreduce_sum_(xp.vecdot(xc, xc, axis=-1)) / total
            self._update_running(mean, var, total)
            self.share = m / total                                      # w = m/M (0-D array)
        else:  # running statistics: y = x·(γ/σ) + (β − μ·γ/σ), two passes over x
            mean, var = self.buffers["running_mean"], self.buffers["running_var"]
        inv_std = 1.0 / xp.sqrt(var + self.eps)                         # (F,)
        scale = self.weight.value * inv_std
        if train:
            y = xc * scale[:, None]
            y += self.bias.value[:, None]
        else:
            y = x2 * scale[:, None]
            y += (self.bias.value - mean * scale)[:, None]
        if self.keeps(train):  # backward needs x − μ (kept instead of x̂: one array fewer)
            self.xc = xc if train else x2 - mean[:, None]
            self.inv_std, self.m = inv_std, m
        return unrows(xp, y, x.shape)

    def fuses_with(self, pool, x) -> bool:
        """Whether a training forward of this layer on ``x`` and the MaxPool2D ``pool`` right
        after it may run as one step, ``forward_pooled``: the backend offers the
        "batchnorm_maxpool" pair, the statistics are this process's own, and ``x`` is a
        batch of feature maps with at least two values per channel."""
        return (self.sync is None and x.ndim == 4 and x.shape[0] * x.shape[2] * x.shape[3] > 1
                and self.backend is not None and self.backend.offers("batchnorm_maxpool"))

    def forward_pooled(self, x, pool):
        """A training forward of this layer followed by ``pool`` (a MaxPool2D), as one
        "batchnorm_maxpool" pair (``BatchNormMaxPoolPair``; the chain calls it where
        ``fuses_with``): the pooled output, this layer's running statistics updated, and
        this layer's ``backward`` takes the POOLED map's gradient and returns the gradient
        of this layer's input (``pool`` keeps nothing)."""
        if tuple(x.shape[1:]) != self.in_shape:
            self.check_features(x, self.in_shape)
        pool._check(x)
        n, _, h, w = x.shape
        m = n * h * w
        self.train_mode, self.shape, self.xc = True, tuple(x.shape), None
        pool.saved = (_RanInPair, self.name or "BatchNorm")  # its backward is this layer's
        pair = self.pair("batchnorm_maxpool", BatchNormMaxPoolPair)
        (y, mean, var), saved = pair.forward(x, self.weight.value, self.bias.value, self.eps,
                                             pool.kernel_size, pool.stride, pool.padding)
        self._update_running(mean, var, m)
        self.saved = (pair, saved)
        return y

    def _global_mean(self, x2, m):
        """Synchronised: (M, μ) of the global batch from this process's (F, m) rows; M is a
        0-D array (no host read)."""
        xp = self.xp
        sums = xp.concat([xp.sum(x2, axis=-1),
                          xp.asarray([m], dtype=x2.dtype, device=x2.device)])
        sums = self.sync.allreduce_sum_(sums)                          # [Σx, M] over processes
        total = sums[-1]
        return total, sums[:-1] / total

    def _update_running(self, mean, var, m):
        xp, b = self.xp, self.buffers
        b["num_batches_tracked"] = b["num_batches_tracked"] + 1
        if self.momentum is None:
            # a 0-D device array: no host read of the counter inside the training step
            factor = 1.0 / xp.astype(b["num_batches_tracked"], mean.dtype)
        else:
            factor = self.momentum
        unbiased = var * (m / (m - 1.0))
        b["running_mean"] = (1.0 - factor) * b["running_mean"] + factor * mean
        b["running_var"] = (1.0 - factor) * b["running_var"] + factor * unbiased

    def backward(self, grad, input_grad=True):
        if getattr(self, "saved", None) is not None:  # batch statistics: the pair's backward
            (pair, saved), self.saved = self.saved, None
            dx, self.weight.grad, self.bias.grad = pair.backward(saved, grad, input_grad)
            return dx
        xp, xc = self.xp, getattr(self, "xc", None)
        if xc is None:
            raise self.no_forward()
        inv_std = self.inv_std
        g = rows(xp, grad)                                             # (F, m)
        dbeta = xp.sum(g, axis=-1)
        dgamma = xp.vecdot(g, xc, axis=-1) * inv_std                    # Σ g·x̂
        self.weight.grad, self.bias.grad = dgamma, dbeta
        self.xc = None
        if not input_grad:
            return None
        a = self.weight.value * inv_std                                # γ/σ
        if not self.train_mode:                                        # μ, σ constants: ĝ/σ
            return unrows(xp, g * a[:, None], self.shape)
        # synchronised: the w-weighted sums over processes (module docstring)
        sums = self.sync.allreduce_sum_(xp.stack([dgamma, dbeta]) * self.share)
        # (max: a process's empty share of a last batch has m = 0 and an empty dx)
        return unrows(xp, _dx(g, xc, inv_std, a, sums[0, :], sums[1, :], max(self.m, 1)), self.shape)

    def load_buffer(self, name: str, value) -> None:
        if name not in self.buffers:
            raise KeyError(f"layer {self.name or 'BatchNorm'}: no buffer named {name!r}")
        current = self.buffers[name]
        if tuple(value.shape) != tuple(current.shape):
            # e.g. a 0-D num_batches_tracked that came back 1-D from a host copy
            if math.prod(value.shape) != math.prod(current.shape):
                raise ValueError(f"layer {self.name or 'BatchNorm'}: buffer {name} has shape "
                                 f"{tuple(current.shape)}, got {tuple(value.shape)}")
            value = self.xp.reshape(value, tuple(current.shape))
        self.buffers[name] = value

    # --- description --------------------------------------------------------------------
    def config(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum}

    def describe(self):
        return f"BatchNorm({self.num_features})"


def rows(xp, x):
    """x as (F, m): one row per feature. A view when the features are the slowest axis in
    memory — what a Conv2D output (channel-major) is; a copy otherwise."""
    if x.ndim == 2:
        return xp.permute_dims(x, (1, 0))
    return xp.reshape(xp.permute_dims(x, (1, 0, 2, 3)), (x.shape[1], -1))


def unrows(xp, y2, shape):
    """Undo ``rows`` for an (F, m) result: the input's shape, features in their place."""
    if len(shape) == 2:
        return xp.permute_dims(y2, (1, 0))
    n, f, h, w = shape
    return xp.permute_dims(xp.reshape(y2, (f, n, h, w)), (1, 0, 2, 3))


def _dx(g, xc, inv_std, a, dgamma, dbeta, m):
    """dx = (γ/σ)·(g − xc·dγ/(m·σ) − dβ/m) on (F, m) rows, with a = γ/σ, written as
    t = xc·k₁ − g + k₂; t *= −γ/σ: one new array and three in-place passes."""
    t = xc * (dgamma * inv_std / m)[:, None]
    t -= g
    t += (dbeta / m)[:, None]
    t *= -a[:, None]
    return t


class BatchNormPair:
    """The standard path of the "batchnorm" pair (backends/overrides.py): training with the
    batch's own statistics. ``forward(x, γ, β, eps) -> ((y, μ, biased var), saved)`` (the
    layer updates its running statistics from μ and var); ``backward(saved, grad,
    input_grad) -> (dx or None, dγ, dβ)``. The sums run along the (F, m) rows; Σ(x − μ)²
    and Σ g·(x − μ) are ``vecdot``s, one pass each without a temporary."""

    @staticmethod
    def forward(x, weight, bias, eps):
        from array_api_compat import array_namespace

        xp = array_namespace(x)
        x2 = rows(xp, x)                                               # (F, m)
        m = x2.shape[1]
        mean = xp.sum(x2, axis=-1) / m
        xc = x2 - mean[:, None]
        var = xp.vecdot(xc, xc, axis=-1) / m                           # biased: / m
        inv_std = 1.0 / xp.sqrt(var + eps)                             # (F,)
        y = xc * (weight * inv_std)[:, None]
        y += bias[:, None]
        # backward needs x − μ (kept instead of x̂: one array fewer)
        return (unrows(xp, y, x.shape), mean, var), (xp, xc, inv_std, weight, tuple(x.shape))

    @staticmethod
    def backward(saved, grad, input_grad):
        xp, xc, inv_std, weight, shape = saved
        g = rows(xp, grad)                                             # (F, m)
        dbeta = xp.sum(g, axis=-1)
        dgamma = xp.vecdot(g, xc, axis=-1) * inv_std                    # Σ g·x̂
        if not input_grad:
            return None, dgamma, dbeta
        dx = _dx(g, xc, inv_std, weight * inv_std, dgamma, dbeta, xc.shape[1])
        return unrows(xp, dx, shape), dgamma, dbeta


class BatchNormMaxPoolPair:
    """The standard path of the "batchnorm_maxpool" pair (backends/overrides.py): a training
    BatchNorm and the MaxPool2D right after it, composed — ``BatchNormPair``, then
    ``MaxPoolPair`` on its output. ``forward(x, γ, β, eps, k, s, p) -> ((pooled y, μ,
    biased var), saved)``; ``backward(saved, pooled grad, input_grad) -> (dx or None, dγ,
    dβ)``. A backend's version may pool first: per channel the normalisation is a monotone
    map, so the max of its outputs over a window is the map of the window's max of x where
    γ > 0, of its min where γ < 0 (docs/cnn.md, "Batch norm after max pool")."""

    @staticmethod
    def forward(x, weight, bias, eps, k, s, p):
        from .pool import MaxPoolPair

        (y, mean, var), bn = BatchNormPair.forward(x, weight, bias, eps)
        out, pool = MaxPoolPair.forward(y, k, s, p, True)
        return (out, mean, var), (bn, pool)

    @staticmethod
    def backward(saved, grad, input_grad):
        from .pool import MaxPoolPair

        bn, pool = saved
        return BatchNormPair.backward(bn, MaxPoolPair.backward(pool, grad, True), input_grad)


class _RanInPair:
    """What a layer keeps after its chain ran it inside one pair with the layer before it
    (a MaxPool2D after its BatchNorm: ``BatchNorm.forward_pooled``; a BatchNorm and MaxPool2D
    after their Conv2D: ``Conv2D.forward_block``): nothing to go back through on its own."""

    @staticmethod
    def backward(owner, grad, input_grad=True):
        raise RuntimeError(f"this layer ran inside one pair with {owner} before it, in a "
                           "training forward of their chain: that chain's backward goes back "
                           "through them (model.backward), or run the layers one by one, "
                           "forward and backward")


class _EmptyBatch:
    """A training batch with no rows: a process's empty share of a data-parallel last batch
    (fewer rows than processes). Nothing to normalise and nothing learnt: γ and β get zero
    gradients (the process's share of the step is 0), the running statistics stay as they
    are, and the empty gradient passes through."""

    @staticmethod
    def backward(saved, grad, input_grad):
        xp, weight, bias = saved
        return (grad if input_grad else None), xp.zeros_like(weight), xp.zeros_like(bias)

