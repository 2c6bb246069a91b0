"""The implementations a benchmark compares, behind one small interface.

``Runner`` (one implementation of one model on one device, with its optimizer):

* ``load_batches([(x, y), ...])`` copies host NumPy batches to the device once;
* ``train_step()`` runs forward, loss, backward and the Nesterov update on the next batch
  (cycling through the loaded ones); ``infer()`` runs the forward pass only;
* ``sync()`` waits for the device; ``gpu_reset()``/``gpu_bytes()`` probe GPU memory.

Epoch runners (the same, over a whole training split): ``train_epoch(epoch)`` and
``test_accuracy()``. nnx's runs through ``nnx.trainer.Trainer`` itself; the two references
copy its loop step for step (``MirrorEpochRunner``: same shuffling, same schedule, same
running loss and accuracy with a few host reads per epoch).

Every implementation starts from the SAME initial weights (nnx's ``state_dict`` copied in)
and, for the references, sees the same batches as nnx on NumPy. Models: ``mlp``, ``cnn`` (the
``--model cnn`` preset's layers, without its dropout) and ``cnn-fast`` (the ``--model cnn-fast``
preset, trained with that preset's CLI defaults: ``settings``).
"""
from __future__ import annotations

import functools
import math

import numpy as np

MLP_SIZES = (784, 128, 64, 10)
#: the CLI's default optimisation settings (nnx/train.py DEFAULTS)
LR, MOMENTUM, WEIGHT_DECAY, BATCH, EPOCHS, VAL_SIZE, SEED = 0.1, 0.9, 5e-4, 128, 10, 5000, 0
MODELS = ("mlp", "cnn", "cnn-fast")


def settings(kind: str) -> dict:
    """How ``kind`` is trained: the MLP and the suite's CNN with the CLI's MLP defaults
    (Nesterov lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, cosine over 10 epochs);
    ``cnn-fast`` with what ``python -m nnx.train --model cnn-fast`` uses (nnx/train.py
    ``MODEL_DEFAULTS``: Adam 3e-3, batch 64, cosine over 3 epochs)."""
    s = {"optimizer": "nesterov", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
         "batch_size": BATCH, "epochs": EPOCHS, "schedule": "cosine", "warmup_epochs": 0.0}
    if kind == "cnn-fast":
        from nnx.train import DEFAULT_LR, DEFAULTS, MODEL_DEFAULTS

        cli = {**DEFAULTS, **MODEL_DEFAULTS[kind]}
        s = {k: cli[k] for k in s}
        s["lr"] = cli["lr"] if cli["lr"] is not None else DEFAULT_LR[cli["optimizer"]]
    return s


# --- models ------------------------------------------------------------------------------
def cnn_layers():
    """conv(1→32,k3,p1)→BN→ReLU→MaxPool2→conv(32→64,k3,p1)→BN→ReLU→MaxPool2→Flatten→
    Dense(3136→128)→ReLU→Dense(128→10): the ``--model cnn`` preset without its dropout; the
    convolutions have no bias, as in the preset (batch norm follows them)."""
    from nnx.layers import BatchNorm, Conv2D, Dense, Flatten, MaxPool2D, ReLU

    return [Conv2D(1, 32, 3, padding=1, bias=False), BatchNorm(32), ReLU(), MaxPool2D(2),
            Conv2D(32, 64, 3, padding=1, bias=False), BatchNorm(64), ReLU(), MaxPool2D(2),
            Flatten(), Dense(3136, 128), ReLU(), Dense(128, 10)]


def build_nnx(kind: str, backend, dtype="float32", seed: int = SEED):
    from nnx.model import Sequential, mlp

    if kind == "mlp":
        return mlp(MLP_SIZES, backend=backend, dtype=dtype, seed=seed)
    if kind == "cnn":
        return Sequential(cnn_layers(), input_shape=(1, 28, 28), backend=backend, dtype=dtype,
                          seed=seed)
    if kind == "cnn-fast":  # the preset itself, as nnx.train builds it
        from nnx.architectures import PRESETS, build_layers

        return Sequential(build_layers(PRESETS[kind], (1, 28, 28)), input_shape=(1, 28, 28),
                          backend=backend, dtype=dtype, seed=seed)
    raise ValueError(f"unknown model {kind!r}: use {', '.join(MODELS)}")


def build_torch(kind: str, device, dtype: str = "float32"):
    """The same network as ``torch.nn.Sequential``; layer indices (and so state_dict names)
    match nnx's."""
    import torch.nn as nn

    if kind == "mlp":
        mods = [m for a, b in zip(MLP_SIZES[:-1], MLP_SIZES[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        net = nn.Sequential(*mods[:-1])  # no ReLU after the last layer
    elif kind == "cnn":
        net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
                            nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1, bias=False),
                            nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10))
    elif kind == "cnn-fast":  # each block pools before batch norm and ReLU, as the preset
        net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.MaxPool2d(2),
                            nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, bias=False),
                            nn.MaxPool2d(2), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(),
                            nn.Linear(1568, 128), nn.ReLU(), nn.Linear(128, 10))
    else:
        raise ValueError(f"unknown model {kind!r}")
    import torch

    return net.to(device=device, dtype=getattr(torch, dtype))


def reference_state(kind: str, dtype: str = "float32", seed: int = SEED) -> dict:
    """nnx's initial weights (and BatchNorm buffers) as host NumPy arrays: every
    implementation starts from these."""
    from nnx.backends import get_backend

    return build_nnx(kind, get_backend("numpy", "cpu"), dtype, seed).state_dict()


def load_torch_state(net, state: dict, device, dtype: str = "float32"):
    import torch

    sd = {}
    for k, v in state.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if t.is_floating_point():
            t = t.to(getattr(torch, dtype))
        sd[k] = t.reshape(net.state_dict()[k].shape).to(device)
    net.load_state_dict(sd)
    return net


# --- FLOPs -------------------------------------------------------------------------------
def layer_flops(layer, out_shape, batch: int) -> int:
    """Forward FLOPs of one layer: Dense 2·N·in·out; Conv2D 2·N·O·Ho·Wo·C·k²; 0 for the
    element-wise layers (ReLU, batch norm, pooling, ...), which are not counted."""
    from nnx.layers import Conv2D, Dense

    if isinstance(layer, Dense):
        return 2 * batch * layer.in_features * layer.out_features
    if isinstance(layer, Conv2D):
        o, ho, wo = out_shape
        return 2 * batch * o * ho * wo * layer.in_channels * layer.kernel_size ** 2
    return 0


def forward_flops(model, batch: int) -> int:
    """Multiply-add FLOPs of one forward pass (matmuls and convolutions only, 2 per MAC):
    Dense 2·N·in·out; Conv2D 2·N·O·Ho·Wo·C·k². Element-wise work (ReLU, bias, softmax,
    batch norm, pooling, the optimizer) is not counted: for the default MLP it is ~1% of
    the total."""
    return sum(layer_flops(layer, out, batch) for layer, out in zip(model.layers, model.shapes))


def train_step_flops(model, batch: int, input_grad: bool = False) -> int:
    """Forward + backward. Backward is two matmuls per layer (dW and dx: 4·N·in·out for
    Dense), so a step with every input gradient is 3 × the forward FLOPs. Training needs no
    gradient with respect to the data: nnx's Trainer (``Sequential.backward(...,
    input_grad=False)``), autograd and the plain loop all skip the first parameterised
    layer's dx, so by default that layer's forward FLOPs (the size of its dx) are taken off.
    ``input_grad=True``: the count for ``--with-input-grad``."""
    per_layer = [layer_flops(la, out, batch) for la, out in zip(model.layers, model.shapes)]
    return 3 * sum(per_layer) - (0 if input_grad else next(f for f in per_layer if f))


@functools.lru_cache(maxsize=None)
def flops_model(kind: str):
    """The model FLOPs are counted on (NumPy; the counts depend on the shapes only)."""
    from nnx.backends import get_backend

    return build_nnx(kind, get_backend("numpy", "cpu"))


def epoch_flops(model, n_train: int, batch: int = BATCH) -> int:
    """Training FLOPs of one epoch of ``n_train`` samples in batches of ``batch`` (the last
    one smaller)."""
    steps = -(-n_train // batch)
    return sum(train_step_flops(model, min(batch, n_train - k * batch)) for k in range(steps))


# --- data --------------------------------------------------------------------------------
def load_mnist(data_dir=None):
    """nnx.datasets.load("mnist") without downloading; None when the files are not there."""
    from pathlib import Path

    from nnx import datasets

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"  # beside the repo
    for d in [data_dir] if data_dir else [None, shared]:
        try:
            return datasets.load("mnist", data_dir=d, download=False, progress=False)
        except Exception:
            continue
    return None


def synthetic_mnist(n_train: int = 2048, n_test: int = 512, seed: int = 0) -> dict:
    """uint8 images and labels shaped like MNIST (when the real files are absent)."""
    rng = np.random.default_rng(seed)
    mk = lambda n: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                    rng.integers(0, 10, n).astype(np.uint8))
    return {"train": mk(n_train), "test": mk(n_test)}


def step_batches(data: dict, kind: str, batch: int, count: int, dtype: str = "float32"):
    """``count`` distinct host batches (x float in [0, 1], y int64) from the training images."""
    x, y = data["train"]
    need = batch * count
    idx = np.arange(need) % len(y)  # wraps around when the data has fewer images
    xs = x[idx].astype(dtype) * (1.0 / 255.0)
    xs = xs.reshape(need, 784) if kind == "mlp" else xs.reshape(need, 1, 28, 28)
    ys = y[idx].astype(np.int64)
    return [(np.ascontiguousarray(xs[i * batch:(i + 1) * batch]), ys[i * batch:(i + 1) * batch])
            for i in range(count)]


# --- runners -----------------------------------------------------------------------------
def device_label(backend) -> str:
    """'cpu', 'cuda:0', ...: array-api-strict's CPU_DEVICE is reported as 'cpu'."""
    if backend.name == "strict":
        return "cpu" if backend.device._device == "CPU_DEVICE" else f"strict:{backend.device._device}"
    return str(backend.device)


class Runner:
    """One implementation of one model on one device, from the SAME initial weights.

    Step cases: ``load_batches`` then ``train_step()`` / ``infer()``. Epoch cases:
    ``load_data`` then ``train_epoch(epoch)`` / ``test_accuracy()``. Peers implement
    ``to_device``, ``step(x, y, lr) -> (logits, loss)`` and ``predict(x)``; the epoch loop is
    ``Trainer._train_epoch`` copied step for step: the Trainer's shuffle on the NumPy backend,
    the same cosine schedule, running loss and accuracy kept where the data is, with a few
    host reads per epoch.
    """

    impl, device, backend_name = "?", "cpu", None

    def sync(self):
        pass

    def gpu_reset(self):
        pass

    def gpu_bytes(self) -> dict:
        return {}

    def load_batches(self, batches):
        self.batches, self.k = [(self.to_device(x), self.to_device(y)) for x, y in batches], 0

    def next_batch(self):
        self.k += 1
        return self.batches[(self.k - 1) % len(self.batches)]

    def train_step(self):
        return self.step(*self.next_batch(), self.settings["lr"])[1]

    def infer(self):
        return self.predict(self.next_batch()[0])

    def load_data(self, data, epochs=None):
        """Epochs of ``settings(kind)``'s batch size; ``epochs``: the schedule's length
        (default: the settings' epochs)."""
        sp = _host_splits(data, self.kind, self.dtype_name)
        self.x, self.y = self.to_device(sp["train"].x), self.to_device(sp["train"].y)
        self.xt, self.yt = self.to_device(sp["test"].x), self.to_device(sp["test"].y)
        self.n_train = len(sp["train"].y)
        self.schedule = _schedule(self.settings, epochs, self.n_train)
        self.global_step = 0
        return self

    def train_epoch(self, epoch):
        n, bs = self.n_train, self.settings["batch_size"]
        steps = math.ceil(n / bs)
        perm = self.to_device(_derived_perm(SEED, epoch, n))
        read_every = max(1, steps // 5)
        loss_sum = correct = 0.0
        for k in range(steps):
            idx = perm[k * bs:(k + 1) * bs]
            yb = self.y[idx]
            logits, loss = self.step(self.x[idx], yb, self.schedule(self.global_step))
            self.global_step += 1
            loss_sum, correct = loss_sum + loss * len(idx), correct + (logits.argmax(1) == yb).sum()
            if ((k + 1) % read_every == 0 or k + 1 == steps) and not math.isfinite(float(loss_sum)):
                raise RuntimeError(f"{self.impl} diverged")
        return float(loss_sum) / n, float(correct) / n

    def test_accuracy(self):
        n = len(self.yt)
        return sum(int((self.predict(self.xt[s:s + 2048]).argmax(1) == self.yt[s:s + 2048]).sum())
                   for s in range(0, n, 2048)) / n


class NnxRunner(Runner):
    """nnx's Sequential + SoftmaxCrossEntropy + the optimizer of ``settings(kind)`` (Nesterov;
    Adam for cnn-fast) on one backend: the Trainer's step,
    ``model.backward(loss.backward(), input_grad=False)``. ``input_grad=True`` (the CLI's
    ``--with-input-grad``, impl ``nnx-<backend>+dx0``) also computes the first layer's input
    gradient, as nnx's training did before ``Sequential.backward`` grew the flag. Epochs are
    ``nnx.trainer.Trainer``'s own (``_train_epoch``), which always skips it."""

    def __init__(self, backend, kind: str, state: dict, dtype: str = "float32",
                 input_grad: bool = False):
        from nnx.losses import SoftmaxCrossEntropy
        from nnx.optim import make_optimizer

        self.backend, self.kind, self.dtype_name = backend, kind, dtype
        self.settings = s = settings(kind)
        self.backend_name, self.device = backend.name, device_label(backend)
        self.input_grad = bool(input_grad)
        self.impl = f"nnx-{backend.name}" + ("+dx0" if self.input_grad else "")
        self.model = build_nnx(kind, backend, dtype)
        self.model.load_state_dict(state)
        self.opt = make_optimizer(s["optimizer"], self.model.named_parameters(), s["lr"],
                                  momentum=s["momentum"], weight_decay=s["weight_decay"])
        self.loss = SoftmaxCrossEntropy()

    def to_device(self, a):
        return self.backend.from_numpy(a, dtype=self.model.dtype if a.dtype.kind == "f" else None)

    def step(self, x, y, lr):
        logits = self.model.forward(x, train=True)
        loss = self.loss.forward(logits, y)
        self.model.backward(self.loss.backward(), input_grad=self.input_grad)
        self.opt.step(lr)
        return logits, loss

    def predict(self, x):
        return self.model.forward(x, train=False)

    def load_data(self, data, epochs=None):
        from nnx.data import make_splits
        from nnx.trainer import Trainer

        b = self.backend
        self.splits = make_splits(data, b, b.dtype(self.dtype_name), val_size=VAL_SIZE, seed=SEED,
                                  flatten=(self.kind == "mlp"))
        self.n_train = len(self.splits["train"])
        sched = _schedule(self.settings, epochs, self.n_train)
        self.trainer = Trainer(self.model, self.opt, sched, batch_size=self.settings["batch_size"],
                               epochs=epochs or self.settings["epochs"], seed=SEED, progress=False,
                               log=lambda *a, **k: None)
        return self

    def train_epoch(self, epoch):
        out = self.trainer._train_epoch(self.splits["train"], epoch)
        self.trainer.epoch = epoch + 1
        return out

    def test_accuracy(self):
        return self.trainer.evaluate(self.splits["test"])[1]

    def sync(self):
        self.backend.synchronize()

    def gpu_reset(self):
        if self.backend.name == "torch" and self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(self.backend.device)

    def gpu_bytes(self):
        if self.backend.name == "cupy":
            import cupy

            return {"gpu_pool_used_bytes": self.backend.memory_pool_bytes(),
                    "gpu_pool_total_bytes": cupy.get_default_memory_pool().total_bytes()}
        return _torch_cuda_bytes(self.backend.device) if self.device.startswith("cuda") else {}


def _torch_cuda_bytes(device) -> dict:
    import torch

    return {"gpu_allocated_bytes": torch.cuda.memory_allocated(device),
            "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "gpu_reserved_bytes": torch.cuda.memory_reserved(device)}


class TorchRefRunner(Runner):
    """torch.nn.Sequential + autograd + torch.optim.SGD(nesterov=True) (``torch.optim.Adam``
    for cnn-fast, as ``settings``): PyTorch eager."""

    impl, backend_name = "torch-ref", "torch"

    def __init__(self, device: str, kind: str, state: dict, dtype: str = "float32"):
        import torch

        self.torch, self.kind, self.dtype_name = torch, kind, dtype
        self.settings = s = settings(kind)
        self.dev = torch.device(device)
        if self.dev.type == "cuda" and self.dev.index is None:  # one label everywhere: cuda:N
            self.dev = torch.device("cuda", torch.cuda.current_device())
        self.device = str(self.dev)
        self.net = load_torch_state(build_torch(kind, self.dev, dtype), state, self.dev, dtype)
        self.net.train()
        if s["optimizer"] == "nesterov":
            self.opt = torch.optim.SGD(self.net.parameters(), lr=s["lr"], momentum=s["momentum"],
                                       nesterov=True, weight_decay=s["weight_decay"])
        elif s["optimizer"] == "adam":  # betas (0.9, 0.999), eps 1e-8: nnx's Adam defaults
            self.opt = torch.optim.Adam(self.net.parameters(), lr=s["lr"],
                                        weight_decay=s["weight_decay"])
        else:
            raise ValueError(f"no torch optimizer for {s['optimizer']!r}")

    def to_device(self, a):
        t = self.torch.from_numpy(a).to(self.dev)
        return t.to(getattr(self.torch, self.dtype_name)) if t.is_floating_point() else t

    def step(self, x, y, lr):
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        logits = self.net(x)
        loss = self.torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        self.opt.step()
        return logits.detach(), loss.detach()

    def predict(self, x):
        self.net.eval()
        with self.torch.inference_mode():
            out = self.net(x)
        self.net.train()
        return out

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize(self.dev)

    def gpu_reset(self):
        if self.dev.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.dev)

    def gpu_bytes(self):
        return _torch_cuda_bytes(self.dev) if self.dev.type == "cuda" else {}


class PlainNumpyMLP:
    """The MLP written directly in NumPy: no layers, no Array API namespace, no checks.

    What a careful hand-written loop does: ``out=`` buffers for the element-wise work, ReLU
    via ``np.maximum``, the softmax gradient by subtracting 1 at the labels, no input
    gradient for the first layer, and torch's Nesterov update in place.
    """

    def __init__(self, state: dict, dtype="float32"):
        n = len(MLP_SIZES) - 1
        self.W = [np.array(state[f"{2 * i}.weight"], dtype=dtype) for i in range(n)]
        self.b = [np.array(state[f"{2 * i}.bias"], dtype=dtype) for i in range(n)]
        self.vW = [np.zeros_like(w) for w in self.W]
        self.vb = [np.zeros_like(b) for b in self.b]

    def forward(self, x):
        acts = [x]
        h = x
        last = len(self.W) - 1
        for i, (w, b) in enumerate(zip(self.W, self.b)):
            z = h @ w.T
            z += b
            if i < last:
                np.maximum(z, 0, out=z)
            acts.append(z)
            h = z
        return acts

    def loss_and_grad(self, logits, y):
        n = logits.shape[0]
        z = logits - logits.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        s = z.sum(axis=1, keepdims=True)
        z /= s
        rows = np.arange(n)
        loss = -np.log(z[rows, y]).mean()
        z[rows, y] -= 1.0
        z *= 1.0 / n
        return loss, z

    def step(self, x, y, lr=LR, mu=MOMENTUM, wd=WEIGHT_DECAY):
        acts = self.forward(x)
        loss, g = self.loss_and_grad(acts[-1], y)
        for i in range(len(self.W) - 1, -1, -1):
            gw = g.T @ acts[i]
            gb = g.sum(axis=0)
            if i > 0:
                g = g @ self.W[i]
                g *= acts[i] > 0  # ReLU mask from the layer's output
            for p, d, v in ((self.W[i], gw, self.vW[i]), (self.b[i], gb, self.vb[i])):
                d += wd * p          # L2, as torch: d = g + wd·p
                v *= mu
                v += d               # v = mu·v + d
                d += mu * v          # Nesterov: d + mu·v
                d *= lr
                p -= d
        return acts[-1], loss


class PlainNumpyRunner(Runner):
    """The plain NumPy MLP, on the same batches as nnx on NumPy."""

    impl, backend_name = "plain-numpy", "numpy"

    def __init__(self, kind: str, state: dict, dtype: str = "float32"):
        if kind != "mlp":
            raise ValueError("the plain NumPy loop exists for the MLP only")
        self.kind, self.dtype_name, self.settings = kind, dtype, settings(kind)
        self.net = PlainNumpyMLP(state, dtype)

    def to_device(self, a):
        return np.asarray(a)

    def step(self, x, y, lr):
        return self.net.step(x, y, lr=lr)

    def predict(self, x):
        return self.net.forward(x)[-1]


def _schedule(s, epochs, n_train):
    """The learning rate per global step, as nnx.train builds it from the settings ``s``."""
    from nnx.schedules import make_schedule

    return make_schedule(s["schedule"], s["lr"], epochs or s["epochs"],
                         -(-n_train // s["batch_size"]), warmup_epochs=s["warmup_epochs"])


def _derived_perm(seed, epoch, n):
    """The shuffle nnx's Trainer uses on the NumPy backend for this epoch."""
    from nnx.trainer import derived_seed

    return np.random.default_rng(derived_seed(seed, epoch, 1)).permutation(n).astype(np.int64)


def _host_splits(data, kind, dtype):
    from nnx.backends import get_backend
    from nnx.data import make_splits

    return make_splits(data, get_backend("numpy", "cpu"), np.dtype(dtype), val_size=VAL_SIZE,
                       seed=SEED, flatten=(kind == "mlp"))
