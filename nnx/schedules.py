"""Learning-rate schedules: pure functions of the global step, so a resumed run continues
exactly where it stopped (only the step count is saved)."""
from __future__ import annotations

import math


def _positive(value, what: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):  # a negative factor: a complex rate
        raise ValueError(f"{what} must be a finite number > 0, got {value}")
    return value


class Schedule:
    """``lr(step)`` for step = 0, 1, ... (the step about to be taken)."""

    def __init__(self, base_lr: float, total_steps: int, steps_per_epoch: int, warmup_steps: int = 0):
        self.base_lr, self.total_steps = float(base_lr), max(1, int(total_steps))
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        if int(warmup_steps) < 0:
            raise ValueError(f"warm-up steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        return self.decayed(step)

    def decayed(self, step: int) -> float:
        return self.base_lr


class Constant(Schedule):
    pass


class StepDecay(Schedule):
    """Multiply by ``gamma`` every ``every_epochs`` epochs."""

    def __init__(self, *args, gamma: float = 0.1, every_epochs: int = 3, **kw):
        super().__init__(*args, **kw)
        if isinstance(every_epochs, bool) or int(every_epochs) != every_epochs or every_epochs < 1:
            raise ValueError(f"StepDecay every_epochs must be an integer >= 1, got {every_epochs!r}")
        self.gamma, self.every = _positive(gamma, "StepDecay gamma"), int(every_epochs)

    def decayed(self, step):
        return self.base_lr * self.gamma ** ((step // self.steps_per_epoch) // self.every)


class Exponential(Schedule):
    """Multiply by ``gamma`` once per epoch, smoothly (gamma ** (step / steps_per_epoch))."""

    def __init__(self, *args, gamma: float = 0.9, **kw):
        super().__init__(*args, **kw)
        self.gamma = _positive(gamma, "Exponential gamma")

    def decayed(self, step):
        return self.base_lr * self.gamma ** (step / self.steps_per_epoch)


class Cosine(Schedule):
    """Linear warm-up, then half a cosine from base_lr down to ``min_lr`` at the last step."""

    def __init__(self, *args, min_lr: float = 0.0, **kw):
        super().__init__(*args, **kw)
        self.min_lr = float(min_lr)
        if not 0.0 <= self.min_lr <= self.base_lr:  # (nan fails too)
            raise ValueError(f"Cosine min_lr must be between 0 and the base rate "
                             f"{self.base_lr:g}, got {min_lr}")

    def decayed(self, step):
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * t))


SCHEDULES = {"constant": Constant, "step": StepDecay, "exponential": Exponential, "cosine": Cosine}


def make_schedule(name: str, base_lr: float, epochs: int, steps_per_epoch: int,
                  warmup_epochs: float = 0.0, **kw) -> Schedule:
    try:
        cls = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}") from None
    return cls(base_lr, epochs * steps_per_epoch, steps_per_epoch,
               warmup_steps=round(warmup_epochs * steps_per_epoch), **kw)
