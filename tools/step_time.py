"""Time whole training steps (forward, loss, backward, Adam) of layer specs, interleaved,
one thread, NumPy, float32; per-sample cost lets batch sizes be compared:

    python tools/step_time.py --arch cnn-fast --batch 128,256 [--repeats 20]
    python tools/step_time.py --arch cnn,cnn-fast --torch   # also torch eager, same layers
    python tools/step_time.py --arch cnn --conv-method gather,fast --torch --infer
    python tools/step_time.py --arch cnn --torch --without maxpool,batchnorm  # NumPy pairs A/B
    python tools/step_time.py --arch cnn --infer --without reorder  # ReLU after max pool A/B
    python tools/step_time.py --arch cnn --torch --without batchnorm_maxpool --data mnist
    python tools/step_time.py --arch cnn --torch --without conv_batchnorm_maxpool --data mnist
    python tools/step_time.py --arch cnn --torch --data mnist   # real digits, not random inputs

Prints the median step time, ms per 1000 samples, and (with --torch) the same step in
PyTorch eager (torch.nn modules with the same weights, autograd, torch.optim.Adam) and the
nnx/torch ratio from the same run. ``--conv-method`` builds one model per Conv2D method (an
A/B of the convolution inside whole steps); ``--infer`` also times inference forwards.
``--without NAMES`` adds, for every nnx run, a twin run with those NumPy pairs
(backends/numpy_ops.py: ``maxpool``, ``batchnorm``, ...) taken out of the registry during its
steps, so that those layers run the standard pairs: an interleaved A/B. ``--without all``
turns every override off in the twin (``overrides.set_enabled(False)``, as ``--no-fused``);
``--without reorder`` runs the twin's layers in their own order (``Chain.reorder``: no
ReLU moved after its max pool, so no batch norm directly before a max pool either).
``batchnorm`` or ``maxpool`` also takes out ``batchnorm_maxpool`` (the two-layer pair that a
batch norm before a max pool runs instead of them) and ``conv_batchnorm_maxpool`` (the
three-layer pair with the convolution before them), and ``batchnorm_maxpool`` the latter.
``--data mnist`` feeds the first training images and labels of MNIST (``NNX_DATA_DIR`` or
``--data-dir``) instead of uniform random inputs: torch's max-pool forward branches on the
data and runs ~35% faster on digit images (docs/cnn.md), so the nnx/torch ratio depends on it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _mnist_batch(b, data_dir):
    """The first ``b`` MNIST training images in [0, 1] (as nnx.data converts them) and labels."""
    import numpy as np

    from nnx import datasets

    images, labels = datasets.load("mnist", data_dir, download=False)["train"]
    x = np.asarray(images[:b]).astype(np.float32) * np.float32(1.0 / 255.0)
    return x.reshape(b, 1, 28, 28), np.asarray(labels[:b]).astype(np.int64)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="cnn-fast", help="comma-separated preset names (or one spec)")
    ap.add_argument("--batch", default="128")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--torch", action="store_true")
    ap.add_argument("--conv-method", default="", help="comma-separated Conv2D methods to compare")
    ap.add_argument("--infer", action="store_true", help="also time inference forwards")
    ap.add_argument("--without", default="", help="comma-separated NumPy pairs, 'all' or "
                    "'reorder': also run every nnx model with these off (the standard path, or "
                    "the layers' own order), interleaved")
    ap.add_argument("--data", choices=("random", "mnist"), default="random",
                    help="inputs: uniform random (default) or MNIST training images")
    ap.add_argument("--data-dir", default=None, help="MNIST folder (default: NNX_DATA_DIR)")
    args = ap.parse_args(argv)
    import numpy as np

    if args.torch:
        import torch
    from nnx.threads import set_threads

    set_threads(1)
    from nnx import Sequential
    from nnx.architectures import PRESETS, build_layers
    from nnx.backends import get_backend
    from nnx.losses import SoftmaxCrossEntropy
    from nnx.optim import make_optimizer

    from nnx.backends import overrides

    registry = overrides._load("numpy")
    off = [n for n in args.without.split(",") if n]
    pairs = [n for n in overrides.PAIRS + overrides.BLOCK_PAIRS if n in registry]
    unknown = [n for n in off if n not in pairs + ["all", "reorder"]]
    if unknown:
        raise SystemExit(f"--without: {', '.join(unknown)} is not a NumPy pair (NumPy has "
                         f"{', '.join(pairs) or 'none'}; or 'all', or 'reorder')")
    if {"batchnorm", "maxpool"} & set(off):
        # a batch norm before a max pool runs the two-layer pair (after a convolution, the
        # three-layer one), whatever the one-layer pairs are: the twin must not run them
        off += [n for n in ("batchnorm_maxpool", "conv_batchnorm_maxpool") if n not in off]
    elif "batchnorm_maxpool" in off and "conv_batchnorm_maxpool" not in off:
        off.append("conv_batchnorm_maxpool")  # (it contains that pair)

    def without(fn):
        """``fn`` with the NumPy pairs in ``off`` out of the registry while it runs (a layer
        asks ``backend.offers`` on every call), or with every override off for 'all'. (For
        'reorder' the twin is a model of its own, built with ``Chain.reorder`` off: one model
        alternating between the two orders re-sizes its caches every step.)"""
        def run():
            saved = {n: registry.pop(n) for n in off if n in registry}
            overrides.set_enabled("all" not in off)
            try:
                return fn()
            finally:
                registry.update(saved)
                overrides.set_enabled(True)
        return run

    archs = args.arch.split(",") if all(a in PRESETS for a in args.arch.split(",")) else [args.arch]
    rng = np.random.default_rng(0)
    runs = {}
    for arch in archs:
        spec = PRESETS.get(arch, arch)
        for b in (int(v) for v in args.batch.split(",")):
            if args.data == "mnist":
                x, y = _mnist_batch(b, args.data_dir)
            else:
                x = rng.random((b, 1, 28, 28), dtype=np.float32)
                y = rng.integers(0, 10, b)
            for meth in args.conv_method.split(",") if args.conv_method else [None]:
                def make(reorder=True, meth=meth, x=x, y=y, spec=spec):
                    model = Sequential(build_layers(spec, (1, 28, 28)), (1, 28, 28),
                                       backend=get_backend("numpy"), dtype="float32", seed=0)
                    for layer in model.walk():
                        if meth and type(layer).__name__ == "Conv2D":
                            layer.method = meth
                        if hasattr(layer, "reorder"):  # a chain (nnx.layers.chain.run_order)
                            layer.reorder = reorder
                    opt = make_optimizer("adam", model.named_parameters(), 1e-3)
                    loss = SoftmaxCrossEntropy()

                    def step():
                        loss.forward(model.forward(x, train=True), y)
                        model.backward(loss.backward(), input_grad=False)
                        opt.step(1e-3)
                    return model, step, lambda: model.forward(x)

                model, step, infer = make()
                tag = f" {meth}" if meth else ""
                runs[f"nnx {arch} b{b}{tag}"] = (step, b)
                if off:
                    _, tstep, tinfer = make(reorder="reorder" not in off) if "reorder" in off \
                        else (model, step, infer)
                    runs[f"nnx {arch} b{b}{tag} -{'-'.join(off)}"] = (without(tstep), b)
                if args.infer:
                    runs[f"nnx {arch} b{b}{tag} infer"] = (infer, b)
                    if off:
                        runs[f"nnx {arch} b{b}{tag} -{'-'.join(off)} infer"] = (without(tinfer), b)
            if args.torch:
                from profile_cnn import torch_module

                net = torch.nn.Sequential(*[torch_module(la, torch.nn) for la in model.layers])
                net.train()
                topt = torch.optim.Adam(net.parameters(), 1e-3)
                xt, yt = torch.from_numpy(x), torch.from_numpy(y)

                def tstep(net=net, topt=topt, xt=xt, yt=yt):
                    topt.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(net(xt), yt).backward()
                    topt.step()
                runs[f"torch {arch} b{b}"] = (tstep, b)
                if args.infer:
                    def tinfer(net=net, xt=xt):
                        net.eval()
                        with torch.inference_mode():
                            net(xt)
                        net.train()
                    runs[f"torch {arch} b{b} infer"] = (tinfer, b)
    times = {k: [] for k in runs}
    keys = list(runs)
    for r in range(args.repeats + 3):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            runs[k][0]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    print(f"median of {args.repeats} interleaved steps, 1 thread, float32")
    print("| run | step ms | ms per 1000 samples | nnx / torch |")
    print("|---|---:|---:|---:|")
    med = {k: statistics.median(v[3:]) for k, v in times.items()}
    for k in keys:
        words = k.split()
        twin = f"torch {words[1]} {words[2]}" + (" infer" if words[-1] == "infer" else "")
        ratio = f"{med[k] / med[twin]:.2f}" if twin in med else ""
        print(f"| {k} | {med[k]:.1f} | {1000 * med[k] / runs[k][1]:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
