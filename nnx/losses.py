"""Losses: ``forward(output, target)`` returns a 0-D array on the device (no host sync);
``backward()`` returns d loss / d output, already divided by the batch size."""
from __future__ import annotations

from .errors import ShapeError
from .layers.softmax import log_softmax


def bind_namespace(loss, example, xp) -> None:
    """Give ``loss`` the model's namespace up front (a compiled step then never sees the
    look-up below change state)."""
    if example is not None:
        loss._ns_type, loss.xp = type(example), xp


def _namespace(loss, x):
    """The Array API namespace of ``x``, looked up once per array type and cached on ``loss``
    (the look-up costs more than a small array operation)."""
    t = type(x)
    if t is not loss._ns_type:
        import array_api_compat

        loss.xp = array_api_compat.array_namespace(x)
        loss._ns_type = t
    return loss.xp


def _same_library(loss, output, target):
    """A clear error for targets of another array library than the model's output (a NumPy
    label array with a torch model, say) instead of the library's own confusing one."""
    if type(target) is not type(output):
        import array_api_compat

        try:
            array_api_compat.array_namespace(output, target)
        except TypeError:
            raise TypeError(f"{type(loss).__name__}: the output is a {_kind(output)} but the "
                            f"target is a {_kind(target)}; put the target on the model's "
                            "backend first (backend.from_numpy(y))") from None


def _kind(a) -> str:
    return f"{type(a).__module__.split('.')[0]}.{type(a).__name__}"


class SoftmaxCrossEntropy:
    """Softmax followed by cross-entropy, fused: L = −mean_i Σ_c y_ic log softmax(z)_ic.

    Fusing keeps it stable (log-softmax subtracts the row max) and the gradient collapses to
    (softmax(z) − y) / N (docs/backprop.md). ``target`` is integer class labels (N,) or a
    probability matrix (N, C).

    ``check_labels=True`` makes ``forward`` refuse labels outside 0..C−1 (a ValueError, as
    torch raises) at the cost of one host read per call; by default labels are trusted (the
    trainer's data are checked once when loaded) and an out-of-range label matches no class.
    """

    def __init__(self, check_labels: bool = False):
        self._classes = None
        self._ns_type = self.xp = None
        self.check_labels = bool(check_labels)

    def one_hot(self, y, num_classes, dtype):
        xp = self.xp
        cached = self._classes
        if (cached is None or cached.shape[1] != num_classes or cached.dtype != y.dtype
                or cached.device != y.device):
            self._classes = xp.reshape(xp.arange(num_classes, dtype=y.dtype, device=y.device),
                                       (1, num_classes))
        return xp.astype(xp.reshape(y, (-1, 1)) == self._classes, dtype)

    def forward(self, logits, target):
        xp = _namespace(self, logits)
        _same_library(self, logits, target)
        if logits.ndim != 2:
            raise ShapeError(f"SoftmaxCrossEntropy: expected logits (batch, classes), got {tuple(logits.shape)}")
        n, c = logits.shape
        if target.ndim == 1:
            if target.shape[0] != n:
                raise ShapeError(f"SoftmaxCrossEntropy: {n} logits rows but {target.shape[0]} labels")
            if self.check_labels and n and bool(xp.any((target < 0) | (target >= c))):
                raise ValueError(f"SoftmaxCrossEntropy: labels must be in 0..{c - 1} for {c} "
                                 "classes; some are outside")
            target = self.one_hot(target, c, logits.dtype)
        elif tuple(target.shape) != (n, c):
            raise ShapeError(f"SoftmaxCrossEntropy: target shape {tuple(target.shape)} does not "
                             f"match logits {(n, c)}")
        logp = log_softmax(xp, logits)
        self.probs, self.target, self.n, self._grad = xp.exp(logp), target, n, None
        # the mean over no rows is NaN (as torch's and NumPy's means of nothing are)
        return xp.sum(logp * target) * ((-1.0 / n) if n else float("nan"))

    def train_forward(self, logits, target):
        """The training step's loss: ``(Σ log p(target), correct)`` as 0-D arrays for a batch
        with a one-hot (or probability) ``target``; caches what ``backward`` needs.

        The negated sum is what an epoch accumulates (loss = −Σ / seen). A row counts as
        correct when its target's logit is the row maximum (z − max z == 0 there); exact
        ties, which argmax would resolve to the first index, count as correct.
        """
        fused = self._fused
        if fused is None or fused[0] is not type(logits):
            fused = self._bind_fused(logits)
        picked, correct, self._grad = fused[1](self, logits, target)
        return picked, correct

    def _softmax_xent(self, logits, target):
        """The standard path of ``train_forward`` + ``backward``: (Σ log p(target), correct,
        d loss / d logits); a backend may fuse it into one kernel ("softmax_xent")."""
        xp = _namespace(self, logits)
        shifted = logits - xp.max(logits, axis=1, keepdims=True)
        logp = shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
        self.probs, self.target, self.n = xp.exp(logp), target, logits.shape[0]
        correct = xp.sum(xp.astype(shifted == 0.0, logits.dtype) * target)
        self._grad = None
        return xp.sum(logp * target), correct, self.backward()

    #: the model's backend (set by the Trainer; found from the logits otherwise)
    backend = None
    _fused = _grad = None

    def _bind_fused(self, logits):
        backend = self.backend
        if backend is None or not isinstance(logits, backend.array_type):
            from .backends import backend_of

            backend = self.backend = backend_of(logits)
        self._fused = (type(logits), backend.op("softmax_xent", SoftmaxCrossEntropy._softmax_xent))
        return self._fused

    def backward(self):
        g = self._grad
        if g is not None:  # computed by train_forward
            self._grad = None
            return g
        if getattr(self, "probs", None) is None:
            raise RuntimeError("SoftmaxCrossEntropy: backward needs a forward first")
        g = self.probs - self.target  # a new array: scale it in place
        g *= 1.0 / max(self.n, 1)  # (an empty batch: a process's empty share of a last batch)
        return g


class MSE:
    """Mean squared error over all elements: L = mean((ŷ − y)²); dL/dŷ = 2(ŷ − y)/size."""

    _ns_type = xp = None

    def forward(self, output, target):
        if tuple(output.shape) != tuple(target.shape):
            raise ShapeError(f"MSE: output shape {tuple(output.shape)} != target shape "
                             f"{tuple(target.shape)}")
        xp = _namespace(self, output)
        _same_library(self, output, target)
        self.diff = output - target
        self.size = 1
        for d in output.shape:
            self.size *= d
        return xp.sum(self.diff * self.diff) * ((1.0 / self.size) if self.size else float("nan"))

    def backward(self):
        if getattr(self, "diff", None) is None:
            raise RuntimeError("MSE: backward needs a forward first")
        return self.diff * (2.0 / max(self.size, 1))  # (no elements: an empty gradient)


LOSSES = {"cross_entropy": SoftmaxCrossEntropy, "mse": MSE}
