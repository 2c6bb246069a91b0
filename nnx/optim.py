"""Optimizers: in-place Array-API updates of the parameters from their gradients.

Conventions follow ``torch.optim`` so results can be compared step for step:

- SGD:        p ← p − lr·g
- momentum:   v ← μv + g;            p ← p − lr·v
- Nesterov:   v ← μv + g;            p ← p − lr·(g + μv)
- Adam:       m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  p ← p − lr·m̂ / (√v̂ + ε)
- AdamW:      p ← p·(1 − lr·λ) first (decoupled decay), then the Adam step

``weight_decay`` on SGD/momentum/Nesterov/Adam is L2: g ← g + λp (applied to every
parameter, biases included, as torch does). ``clip_norm`` C scales all gradients by
min(1, C / (‖g‖ + 1e-6)) first, ‖g‖ the global L2 norm — ``torch.nn.utils.clip_grad_norm_``.

Multi-tensor: when the parameters live in one flat array (``nnx.flat``), each update is ONE
short chain of operations over the flat value, gradient and slot arrays, whatever the number
of parameters; otherwise the same ``update`` runs once per parameter. Per-step values (the
learning rate, Adam's bias corrections) come in as ``hyper``: Python floats from ``step``,
or 0-D device arrays from a table (``hyper_table``), so that a compiled training step sees
arrays, not constants that change every step.
"""
from __future__ import annotations

import math


class Optimizer:
    #: names of per-parameter state arrays ("slots"), saved in checkpoints
    slot_names: tuple = ()

    def __init__(self, params, lr: float = 0.01, weight_decay: float = 0.0,
                 clip_norm: float | None = None, xp=None):
        """``params``: a model's ``named_parameters()`` dict (or a list of Parameters);
        ``xp``: their namespace (``model.xp``; looked up from the first parameter if omitted)."""
        if not isinstance(params, dict):
            params = {str(i): p for i, p in enumerate(params)}
        if not params:
            raise ValueError("optimizer got no parameters")
        for what, v in (("learning rate", lr), ("weight decay", weight_decay),
                        ("clip norm", clip_norm)):
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{what} must be a finite number, got {v}")
        if lr <= 0:
            raise ValueError(f"learning rate must be a positive number, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
        if clip_norm is not None and clip_norm <= 0:
            raise ValueError(f"clip norm must be positive, got {clip_norm}")
        self.params = params
        self.lr, self.weight_decay, self.clip_norm = float(lr), float(weight_decay), clip_norm
        self.steps = 0
        plist = list(params.values())
        if xp is None:
            import array_api_compat

            xp = array_api_compat.array_namespace(plist[0].value)
        self.xp = xp
        store = plist[0].store
        #: the FlatStore when it holds exactly these parameters in order: one update chain
        self.store = store if store is not None and store.params == plist else None
        self.slots = {}
        for name in self.slot_names:
            if self.store is not None:
                self.slots[name] = [self.xp.zeros_like(self.store.value)]
            else:
                self.slots[name] = [self.xp.zeros_like(p.value) for p in plist]

    # --- per-step values ----------------------------------------------------------------
    def hyper(self, t: int, lr: float) -> tuple:
        """The per-step values the update of step ``t`` (1-based) reads, as Python floats."""
        return (float(lr),)

    def hyper_table(self, first_step: int, lrs, backend, dtype) -> tuple:
        """``hyper`` for steps first_step+1, first_step+2, ... with learning rates ``lrs``,
        one device array per value (index it with the step's position): made once per
        epoch, so steps neither copy from the host nor see changing Python constants."""
        rows = [self.hyper(first_step + 1 + i, lr) for i, lr in enumerate(lrs)]
        return tuple(backend.xp.asarray([row[j] for row in rows], dtype=dtype,
                                        device=backend.device) for j in range(len(rows[0])))

    # --- the update ---------------------------------------------------------------------
    def step(self, lr: float | None = None) -> None:
        """Apply one update with ``lr`` (the schedule's value) or the base learning rate."""
        if lr is not None and not (math.isfinite(float(lr)) and float(lr) >= 0):
            raise ValueError(f"step(lr=...) needs a finite learning rate >= 0, got {lr!r}")
        missing = [key for key, p in self.params.items() if p.grad is None]
        if missing:
            raise RuntimeError(f"parameters {missing} have no gradient: call backward() before step()")
        self.steps += 1
        self.apply(self.hyper(self.steps, self.lr if lr is None else lr))

    def apply(self, hyper) -> None:
        """One update from the current gradients with per-step values ``hyper`` (does not
        count the step: ``step`` does, or the caller that made the hyper table)."""
        if self.store is not None:
            values, grads = [self.store.value], [self.store.grad]
        else:
            plist = list(self.params.values())
            values, grads = [p.value for p in plist], [p.grad for p in plist]
        if self.clip_norm is not None:
            grads = clip_grad_norm(grads, self.clip_norm, self.xp)
        update = self._update or self._bind_update(values[0])
        for i, (p, g) in enumerate(zip(values, grads)):
            update(self, p, g, [self.slots[name][i] for name in self.slot_names], hyper)

    #: the backend operation that may replace ``update`` (backends/overrides.py), or None
    fused_op: str | None = None
    #: the model's backend (set by the Trainer; found from the parameters otherwise)
    backend = None
    _update = None

    def _bind_update(self, example):
        """``type(self).update``, or the backend's fused version of it (``fused_op``)."""
        update = type(self).update
        if self.fused_op is not None:
            if self.backend is None:
                from .backends import backend_of

                self.backend = backend_of(example)
            update = self.backend.op(self.fused_op, update)
        self._update = update
        return update

    def update(self, p, g, slots, hyper):
        """Update ``p`` in place from ``g`` and the state arrays ``slots``."""
        raise NotImplementedError

    # --- checkpoints --------------------------------------------------------------------
    def _slot_arrays(self, name) -> list:
        """Per-parameter arrays of one slot (views into the flat slot in flat mode)."""
        slot = self.slots[name]
        return self.store.views(slot[0]) if self.store is not None else slot

    def state_dict(self) -> tuple:
        """``(scalars, arrays)``: JSON-able scalars and ``{"slot/param": array}`` for safetensors."""
        arrays = {f"{name}/{k}": a for name in self.slot_names
                  for k, a in zip(self.params, self._slot_arrays(name))}
        return {"type": type(self).__name__, "steps": self.steps}, arrays

    def load_state_dict(self, scalars: dict, arrays: dict, backend, dtype) -> None:
        if scalars.get("type") != type(self).__name__:
            raise ValueError(f"checkpoint optimizer is {scalars.get('type')}, not {type(self).__name__}")
        self.steps = int(scalars["steps"])
        for name in self.slot_names:
            targets = self._slot_arrays(name)
            for i, k in enumerate(self.params):
                value = backend.from_numpy(arrays[f"{name}/{k}"], dtype=dtype)
                if tuple(value.shape) != tuple(targets[i].shape):
                    raise ValueError(f"optimizer state {name}/{k} has shape "
                                     f"{tuple(value.shape)}, expected {tuple(targets[i].shape)}")
                if self.store is not None:
                    targets[i][...] = value
                else:
                    self.slots[name][i] = value


def clip_grad_norm(grads, max_norm: float, xp) -> list:
    """``grads`` scaled by min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ their global L2 norm, as
    ``torch.nn.utils.clip_grad_norm_`` does. The scale stays a 0-D device array (no host
    synchronisation); the gradients given are not modified."""
    total = xp.sqrt(sum(xp.sum(g * g) for g in grads))
    scale = max_norm / (total + 1e-6)
    scale = xp.where(scale > 1.0, xp.ones_like(scale), scale)  # min(1, ·) on the device
    return [g * scale for g in grads]


def _decayed(g, p, weight_decay):
    """g + λ·p as a NEW array (the gradient itself is never modified), or ``g`` when λ = 0."""
    if not weight_decay:
        return g
    d = p * weight_decay
    d += g
    return d


class SGD(Optimizer):
    def update(self, p, g, slots, hyper):
        lr = hyper[0]
        d = _decayed(g, p, self.weight_decay)
        if d is g:
            d = g * lr
        else:
            d *= lr
        p -= d


class Momentum(Optimizer):
    slot_names = ("velocity",)

    def __init__(self, params, lr=0.01, momentum=0.9, nesterov=False, **kw):
        super().__init__(params, lr, **kw)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.fused_op = "nesterov_update" if self.nesterov else None

    def update(self, p, g, slots, hyper):
        # the same arithmetic, in the same order, as lr·(g + μv): one temporary array, the rest
        # in place
        lr, (v,) = hyper[0], slots
        d = _decayed(g, p, self.weight_decay)
        v *= self.momentum
        v += d
        if self.nesterov:  # p ← p − lr·(d + μv)
            t = v * self.momentum
            t += d
            t *= lr
        else:              # p ← p − lr·v
            t = v * lr
        p -= t


class Nesterov(Momentum):
    def __init__(self, params, lr=0.01, momentum=0.9, **kw):
        super().__init__(params, lr, momentum=momentum, nesterov=True, **kw)


class Adam(Optimizer):
    slot_names = ("m", "v")
    decoupled = False
    fused_op = "adam_update"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **kw):
        super().__init__(params, lr, **kw)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        for i, b in enumerate((self.beta1, self.beta2)):
            if not 0.0 <= b < 1.0:  # 1 would divide by 1 − βᵗ = 0 in the bias correction
                raise ValueError(f"Adam betas[{i}] must be in [0, 1), got {b}")
        if not (math.isfinite(self.eps) and self.eps >= 0.0):
            raise ValueError(f"Adam eps must be a finite number >= 0, got {self.eps}")

    def hyper(self, t, lr):
        """(lr, lr / (1 − β₁ᵗ), 1 / √(1 − β₂ᵗ)): the bias corrections depend only on t."""
        lr = float(lr)
        return (lr, lr / (1.0 - self.beta1 ** t), 1.0 / math.sqrt(1.0 - self.beta2 ** t))

    def update(self, p, g, slots, hyper):
        # same arithmetic and order as m̂/(√v̂ + ε) written out, with in-place updates and the
        # fewest temporaries
        lr, step_size, inv_sqrt_c2 = hyper[:3]
        m, v = slots
        if self.weight_decay:
            if self.decoupled:
                p *= hyper[3]
            else:
                g = _decayed(g, p, self.weight_decay)
        t = g * (1.0 - self.beta1)
        m *= self.beta1
        m += t
        t = g * g
        t *= 1.0 - self.beta2
        v *= self.beta2
        v += t
        denom = self.xp.sqrt(v)
        denom *= inv_sqrt_c2
        denom += self.eps
        u = m / denom
        u *= step_size
        p -= u


class AdamW(Adam):
    decoupled = True

    def __init__(self, params, lr=1e-3, weight_decay=0.01, **kw):
        super().__init__(params, lr, weight_decay=weight_decay, **kw)

    def hyper(self, t, lr):
        """Adam's values and the decoupled decay factor 1 − lr·λ."""
        return (*super().hyper(t, lr), 1.0 - float(lr) * self.weight_decay)


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "nesterov": Nesterov, "adam": Adam, "adamw": AdamW}


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0, clip_norm: float | None = None,
                   xp=None) -> Optimizer:
    """Build an optimizer by its CLI name."""
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}") from None
    kw = {"weight_decay": weight_decay, "clip_norm": clip_norm, "xp": xp}
    if cls in (Momentum, Nesterov):
        kw["momentum"] = momentum
    return cls(params, lr=lr, **kw)
