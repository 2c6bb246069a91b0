"""``python -m benchmarks.before_after``: the per-step optimisations of issue #5, A/B in ONE
process.

On a shared machine two separate runs can differ by 2x from load alone, so the old and the
new code run side by side here, interleaved sample by sample (``measure_interleaved``)
and epoch by epoch. "before" is the code of commit c171776, pasted below as subclasses that
override only the changed methods:

* ``Dense.forward`` made a second (N, out) array for the bias (``y = y + b``);
* ``ReLU`` used ``where(mask, x, zeros_like(x))`` forward and backward;
* ``SoftmaxCrossEntropy.forward`` looked the namespace up with ``array_namespace`` per call;
* ``Momentum.update`` (Nesterov) made four temporaries per parameter.

The old ``Dense.backward`` always returned the input gradient, and the old Trainer called
``model.backward(grad)``: "before" computes the first layer's dx, as training did then.

"after" is the library as it is now, stepped as ``nnx.trainer.Trainer`` steps it:
``model.backward(grad, input_grad=False)`` (the first layer skips its input gradient) and,
for epochs, ``Trainer._train_epoch`` itself. "after+dx0" is the current code with the old
call ``model.backward(grad)`` (``input_grad=True``; for epochs a Sequential whose backward
always asks for it): it separates the per-step optimisations from the skipped dx.
"plain-numpy" (NumPy backend only) is the hand-written loop of ``benchmarks.impls``: what
the abstraction costs.
"""
from __future__ import annotations

import argparse
import sys
import time

from . import impls
from .timing import measure_interleaved, summarize


def _old_classes():
    from nnx.layers import Dense, ReLU
    from nnx.losses import SoftmaxCrossEntropy
    from nnx.optim import Nesterov
    from nnx.layers.softmax import log_softmax

    class OldDense(Dense):
        def forward(self, x, train=False):
            if x.ndim != 2 or x.shape[1] != self.in_features:
                self.check_features(x, (self.in_features,))
            self.x = x
            y = x @ self.weight.value.T
            if self.use_bias:
                y = y + self.bias.value
            return y

        def backward(self, grad):
            xp = self.xp
            self.weight.grad = grad.T @ self.x
            if self.use_bias:
                self.bias.grad = xp.sum(grad, axis=0)
            return grad @ self.weight.value

    class OldReLU(ReLU):
        def forward(self, x, train=False):
            self.mask = x > 0
            return self.xp.where(self.mask, x, self.xp.zeros_like(x))

        def backward(self, grad):
            return self.xp.where(self.mask, grad, self.xp.zeros_like(grad))

    class OldLoss(SoftmaxCrossEntropy):
        def forward(self, logits, target):
            import array_api_compat

            self.xp = xp = array_api_compat.array_namespace(logits)
            n, c = logits.shape
            if target.ndim == 1:
                target = self.one_hot(target, c, logits.dtype)
            logp = log_softmax(xp, logits)
            self.probs, self.target, self.n = xp.exp(logp), target, n
            return -xp.sum(logp * target) / n

        def backward(self):
            return (self.probs - self.target) * (1.0 / self.n)

    class OldNesterov(Nesterov):
        def update(self, key, p, g, lr):
            if self.weight_decay:
                g = g + self.weight_decay * p.value
            v = self.slots["velocity"][key]
            v *= self.momentum
            v += g
            p.value -= lr * (g + self.momentum * v) if self.nesterov else lr * v

    return OldDense, OldReLU, OldLoss, OldNesterov


#: name -> (code version, first layer's input gradient computed in training)
VERSIONS = {"before": ("before", True), "after": ("after", False), "after+dx0": ("after", True)}


def _full_backward_sequential():
    """Sequential whose backward always computes every input gradient, whatever its caller
    (the Trainer) asks: the call nnx training made before ``input_grad`` existed."""
    from nnx.model import Sequential

    class FullBackward(Sequential):
        def backward(self, grad, input_grad=True):
            return super().backward(grad, input_grad=True)

    return FullBackward


def build(name, backend, state):
    """(model, loss, optimizer) for a name of ``VERSIONS``, from the same initial weights."""
    from nnx.layers import Dense, ReLU
    from nnx.losses import SoftmaxCrossEntropy
    from nnx.model import Sequential
    from nnx.optim import Nesterov

    version, input_grad = VERSIONS[name]
    if version == "before":
        D, R, L, O = _old_classes()
    else:
        D, R, L, O = Dense, ReLU, SoftmaxCrossEntropy, Nesterov
    sizes = impls.MLP_SIZES
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(D(a, b))
        if i < len(sizes) - 2:
            layers.append(R())
    seq = _full_backward_sequential() if input_grad else Sequential
    model = seq(layers, input_shape=(sizes[0],), backend=backend)
    model.load_state_dict(state)
    opt = O(model.named_parameters(), lr=impls.LR, momentum=impls.MOMENTUM,
            weight_decay=impls.WEIGHT_DECAY)
    return model, L(), opt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.before_after", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--batch-sizes", default="32,128,2048")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per version (0: none)")
    p.add_argument("--threads", type=int, help="limit BLAS/torch threads (threadpoolctl)")
    p.add_argument("--data-dir")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    from .cli import _limit_threads
    from .machine import load_snapshot
    from nnx.backends import get_backend
    from nnx.data import make_splits
    from nnx.schedules import make_schedule
    from nnx.trainer import Trainer

    keep = _limit_threads(args.threads, print) if args.threads else None  # noqa: F841
    backend = get_backend(args.backend, "cpu")
    state = impls.reference_state("mlp")
    data = impls.load_mnist(args.data_dir) or impls.synthetic_mnist(60000, 10000)
    out = {"command": " ".join(["python -m benchmarks.before_after", *(argv or sys.argv[1:])]),
           "load_start": load_snapshot(), "steps": {}, "epochs": {}}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        batches = impls.step_batches(data, "mlp", bs, 4)
        cases = {}
        for name, (_, input_grad) in VERSIONS.items():
            model, loss, opt = build(name, backend, state)
            xb = [(backend.from_numpy(x), backend.from_numpy(y)) for x, y in batches]
            it = {"k": 0}

            def step(model=model, loss=loss, opt=opt, xb=xb, it=it, input_grad=input_grad):
                x, y = xb[it["k"] % len(xb)]
                it["k"] += 1
                out_ = model.forward(x, train=True)
                loss.forward(out_, y)
                model.backward(loss.backward(), input_grad=input_grad)  # the Trainer's call, then or now
                opt.step(impls.LR)

            cases[name] = (step, backend.synchronize)
        if backend.name == "numpy":
            plain = impls.PlainNumpyRunner("mlp", state)
            plain.load_batches(batches)
            cases["plain-numpy"] = (plain.train_step, backend.synchronize)
        res = measure_interleaved(cases, warmup=5, repeats=args.repeats, min_time=0.05)
        out["steps"][bs] = {k: {"median_s": v["median_s"], "iqr_s": v["iqr_s"],
                                "cpu_median_s": v["cpu_median_s"], "samples": v["samples"]}
                            for k, v in res.items()}
        b0 = res["before"]["median_s"]
        for k, v in res.items():
            print(f"step bs {bs:>5} {k:<12} {1e3 * v['median_s']:8.3f} ms (IQR {1e3 * v['iqr_s']:.3f}, "
                  f"CPU {1e3 * v['cpu_median_s']:.3f})  {v['median_s'] / b0:5.2f}x before")
    if args.epochs:
        splits = make_splits(data, backend, backend.float32, val_size=impls.VAL_SIZE, seed=impls.SEED)
        trainers = {}
        for name in VERSIONS:
            model, loss, opt = build(name, backend, state)
            steps = -(-len(splits["train"]) // impls.BATCH)
            sched = make_schedule("cosine", impls.LR, 1 + args.epochs, steps)
            trainers[name] = Trainer(model, opt, sched, batch_size=impls.BATCH, epochs=1 + args.epochs,
                                     progress=False, log=lambda *a, **k: None, loss=loss)
            trainers[name]._train_epoch(splits["train"], 0)  # warm-up
        if backend.name == "numpy":
            plain = impls.PlainNumpyEpochRunner("mlp", data, state, epochs=1 + args.epochs)
            plain.train_epoch(0)
            trainers["plain-numpy"] = plain
        wall = {k: [] for k in trainers}
        cpu = {k: [] for k in trainers}
        for e in range(args.epochs):
            for name, tr in trainers.items():
                c0, t0 = time.process_time(), time.perf_counter()
                if name == "plain-numpy":
                    tr.train_epoch(1 + e)
                else:
                    tr._train_epoch(splits["train"], 1 + e)
                backend.synchronize()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        b0 = summarize(wall["before"])["median_s"]
        for name in trainers:
            s, c = summarize(wall[name]), summarize(cpu[name])
            out["epochs"][name] = {"median_s": s["median_s"], "min_s": s["min_s"], "max_s": s["max_s"],
                                   "cpu_median_s": c["median_s"], "samples": wall[name]}
            print(f"epoch {name:<12} {s['median_s']:.3f} s (min {s['min_s']:.3f}, max {s['max_s']:.3f}; "
                  f"CPU {c['median_s']:.3f})  {s['median_s'] / b0:5.2f}x before")
    out["load_end"] = load_snapshot()
    if args.json:
        from .report import write_json

        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
