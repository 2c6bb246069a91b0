"""Optimizers: in-place Array-API updates of ``Parameter.value`` from ``Parameter.grad``.

Hyperparameters are Python floats (they keep float32 arrays float32 and never touch the
device). Conventions follow ``torch.optim`` so results can be compared step for step:

- SGD:        p ← p − lr·g
- momentum:   v ← μv + g;            p ← p − lr·v
- Nesterov:   v ← μv + g;            p ← p − lr·(g + μv)
- Adam:       m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  p ← p − lr·m̂ / (√v̂ + ε)
- AdamW:      p ← p·(1 − lr·λ) first (decoupled decay), then the Adam step

``weight_decay`` on SGD/momentum/Nesterov/Adam is L2: g ← g + λp (applied to every
parameter, biases included, as torch does).
"""
from __future__ import annotations

import math


class Optimizer:
    #: names of per-parameter state arrays ("slots"), saved in checkpoints
    slot_names: tuple = ()

    def __init__(self, params, lr: float = 0.01, weight_decay: float = 0.0,
                 clip_norm: float | None = None):
        """``params``: a model's ``named_parameters()`` dict (or a list of Parameters)."""
        if not isinstance(params, dict):
            params = {str(i): p for i, p in enumerate(params)}
        if not params:
            raise ValueError("optimizer got no parameters")
        if lr <= 0 or not math.isfinite(lr):
            raise ValueError(f"learning rate must be a positive number, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
        if clip_norm is not None and clip_norm <= 0:
            raise ValueError(f"clip norm must be positive, got {clip_norm}")
        self.params = params
        self.lr, self.weight_decay, self.clip_norm = float(lr), float(weight_decay), clip_norm
        self.steps = 0
        first = next(iter(params.values())).value
        import array_api_compat

        self.xp = array_api_compat.array_namespace(first)
        self.slots = {name: {k: self.xp.zeros_like(p.value) for k, p in params.items()}
                      for name in self.slot_names}

    def step(self, lr: float | None = None) -> None:
        """Apply one update with ``lr`` (the schedule's value) or the base learning rate."""
        lr = self.lr if lr is None else float(lr)
        missing = [key for key, p in self.params.items() if p.grad is None]
        if missing:
            raise RuntimeError(f"parameters {missing} have no gradient: call backward() before step()")
        self.steps += 1
        if self.clip_norm is not None:
            clip_grad_norm(self.params.values(), self.clip_norm, self.xp)
        for key, p in self.params.items():
            self.update(key, p, p.grad, lr)

    def update(self, key, p, g, lr):
        raise NotImplementedError

    def state_dict(self) -> dict:
        """``(scalars, arrays)``: JSON-able scalars and ``{"slot/param": array}`` for safetensors."""
        arrays = {f"{slot}/{k}": a for slot, per in self.slots.items() for k, a in per.items()}
        return {"type": type(self).__name__, "steps": self.steps}, arrays

    def load_state_dict(self, scalars: dict, arrays: dict, backend, dtype) -> None:
        if scalars.get("type") != type(self).__name__:
            raise ValueError(f"checkpoint optimizer is {scalars.get('type')}, not {type(self).__name__}")
        self.steps = int(scalars["steps"])
        for slot, per in self.slots.items():
            for k in per:
                per[k] = backend.from_numpy(arrays[f"{slot}/{k}"], dtype=dtype)


def clip_grad_norm(params, max_norm: float, xp):
    """Scale all gradients so their global L2 norm is at most ``max_norm``.

    The scale stays a 0-D device array (no host synchronisation): max_norm / max(norm, max_norm).
    Returns the norm before clipping (a 0-D array).
    """
    params = list(params)
    total = xp.sqrt(sum(xp.sum(p.grad * p.grad) for p in params))
    scale = max_norm / xp.maximum(total, xp.asarray(max_norm, dtype=total.dtype, device=total.device))
    for p in params:
        p.grad = p.grad * scale
    return total


def _decayed(g, p, weight_decay):
    """g + λ·p as a NEW array (``p.grad`` itself is never modified), or ``g`` when λ = 0."""
    if not weight_decay:
        return g
    d = p.value * weight_decay
    d += g
    return d


class SGD(Optimizer):
    def update(self, key, p, g, lr):
        d = _decayed(g, p, self.weight_decay)
        if d is g:
            d = g * lr
        else:
            d *= lr
        p.value -= d


class Momentum(Optimizer):
    slot_names = ("velocity",)

    def __init__(self, params, lr=0.01, momentum=0.9, nesterov=False, **kw):
        super().__init__(params, lr, **kw)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def update(self, key, p, g, lr):
        # the same arithmetic, in the same order, as lr·(g + μv): one temporary array, the rest
        # in place (each temporary of a 784x128 weight is another pass over 400 KB)
        d = _decayed(g, p, self.weight_decay)
        v = self.slots["velocity"][key]
        v *= self.momentum
        v += d
        if self.nesterov:  # p ← p − lr·(d + μv)
            t = v * self.momentum
            t += d
            t *= lr
        else:              # p ← p − lr·v
            t = v * lr
        p.value -= t


class Nesterov(Momentum):
    def __init__(self, params, lr=0.01, momentum=0.9, **kw):
        super().__init__(params, lr, momentum=momentum, nesterov=True, **kw)


class Adam(Optimizer):
    slot_names = ("m", "v")
    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **kw):
        super().__init__(params, lr, **kw)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self._one_minus_b1, self._one_minus_b2 = 1.0 - self.beta1, 1.0 - self.beta2

    def step(self, lr=None):
        # bias corrections depend only on the step count: compute them once per step, as the
        # two Python floats the per-parameter updates use
        t = self.steps + 1
        self._c1 = 1.0 - self.beta1 ** t
        self._c2 = 1.0 - self.beta2 ** t
        self._inv_sqrt_c2 = 1.0 / math.sqrt(self._c2)
        lr_value = self.lr if lr is None else float(lr)
        self._step_size = lr_value / self._c1
        super().step(lr)

    def update(self, key, p, g, lr):
        # same arithmetic and order as m̂/(√v̂ + ε) written out, with in-place updates and the
        # fewest temporaries
        if self.weight_decay:
            if self.decoupled:
                p.value *= 1.0 - lr * self.weight_decay
            else:
                g = _decayed(g, p, self.weight_decay)
        m, v = self.slots["m"][key], self.slots["v"][key]
        t = g * self._one_minus_b1
        m *= self.beta1
        m += t
        t = g * g
        t *= self._one_minus_b2
        v *= self.beta2
        v += t
        denom = self.xp.sqrt(v)
        denom *= self._inv_sqrt_c2
        denom += self.eps
        u = m / denom
        u *= self._step_size
        p.value -= u


class AdamW(Adam):
    decoupled = True

    def __init__(self, params, lr=1e-3, weight_decay=0.01, **kw):
        super().__init__(params, lr, weight_decay=weight_decay, **kw)


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "nesterov": Nesterov, "adam": Adam, "adamw": AdamW}


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0, clip_norm: float | None = None) -> Optimizer:
    """Build an optimizer by its CLI name."""
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}") from None
    kw = {"weight_decay": weight_decay, "clip_norm": clip_norm}
    if cls in (Momentum, Nesterov):
        kw["momentum"] = momentum
    return cls(params, lr=lr, **kw)
