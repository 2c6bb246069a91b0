"""Where the time of a CNN training step goes: nnx on NumPy against the same layers in
PyTorch eager, layer by layer, forward and backward, on one thread.

    python tools/profile_cnn.py                       # the --model cnn preset, batch 128
    python tools/profile_cnn.py --arch cnn-fast --repeats 30
    python tools/profile_cnn.py --conv-method im2col  # the reference convolution
    python tools/profile_cnn.py --without maxpool     # NumPy's max-pool pair off

Every layer gets the input the previous layer really produces and the upstream gradient a
real backward pass hands it (so memory layouts are the ones a training step sees). Each repeat runs, for every
layer, nnx's training forward, backward and inference forward and then torch's — so the two
columns are interleaved and share the machine's noise; the table shows medians in ms.
torch's backward is ``autograd.backward`` of that one module's output. The first layer's
backward skips the input gradient (as a training step does) on both sides.

``--passes`` adds the memory passes inside nnx's Conv2D, BatchNorm and MaxPool2D (each
stage timed on its own, mirroring what the layer code does) so that the cost of the
layout changes, im2col/col2im copies and reductions can be read off; where NumPy's own
pair replaces a layer's passes (backends/numpy_ops.py) its forward and backward are timed
as wholes too. ``--without NAMES`` takes those NumPy pairs out (``all``: every override off).
Layers are run one by one here, so the two-layer ``batchnorm_maxpool`` pair of a training
step (a batch norm and the max pool after it) and the three-layer ``conv_batchnorm_maxpool``
(a convolution before them) never run: tools/step_time.py measures them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def torch_module(layer, nn):
    """The torch.nn module matching one nnx layer (weights copied)."""
    import torch

    from nnx import layers as L

    name = type(layer).__name__
    if name == "Conv2D":
        m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                      layer.padding, bias=layer.use_bias)
    elif name == "BatchNorm":
        m = (nn.BatchNorm1d if len(layer.in_shape) == 1 else nn.BatchNorm2d)(layer.num_features)
    elif name == "MaxPool2D":
        m = nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
    elif name == "Dense":
        m = nn.Linear(layer.weight.shape[1], layer.weight.shape[0])
    elif name == "Flatten":
        m = nn.Flatten()
    elif name == "Dropout":
        m = nn.Dropout(layer.p)
    elif isinstance(layer, L.ACTIVATIONS.get("relu", ())):
        m = nn.ReLU()
    else:
        raise SystemExit(f"no torch twin for {layer.describe()}")
    with torch.no_grad():
        for p in layer.params:
            getattr(m, p.name).copy_(torch.from_numpy(layer.backend.to_numpy(p.value)))
    return m


def layer_traffic(model, tmods, x, xt, upstream):
    """The input each layer really sees (nnx's and its torch twin's, from ``x`` and ``xt``)
    and the gradient a real backward pass hands each nnx layer (from ``upstream(shape)``, a
    gradient of the logits): values, shapes AND memory layouts, as in a training step in
    the layers' own order. (A real step runs a ReLU after the max pool that follows it,
    nnx.layers.chain.run_order, on the pooled map, and on NumPy a batch norm and that max
    pool as one "batchnorm_maxpool" pair: whole-step timings, tools/step_time.py, show
    those.)"""
    import torch

    ins, tins, h, ht = [], [], x, xt
    for layer, m in zip(model.layers, tmods):
        ins.append(h)
        tins.append(ht)
        h = layer.forward(h, train=True)
        with torch.no_grad():
            ht = m(ht)
    grads = [None] * len(model.layers)
    for i, layer in enumerate(model.layers):
        def spy(grad, input_grad=True, i=i, real=layer.backward):
            grads[i] = grad
            return real(grad, input_grad)
        layer.backward = spy
    model.backward(upstream(tuple(h.shape)))
    for layer in model.layers:
        del layer.backward  # the class's method again
    return ins, tins, grads


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="cnn", help="a preset name or a layer spec (default: cnn)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--conv-method", default=None, help="Conv2D method to use (default: the layer's)")
    ap.add_argument("--passes", action="store_true", help="also time the passes inside the layers")
    ap.add_argument("--without", default="", help="comma-separated NumPy pairs to turn off "
                    "(maxpool, batchnorm), or 'all' for every override")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from nnx.threads import set_threads

    set_threads(1)  # threadpoolctl for NumPy's BLAS, torch.set_num_threads(1)
    from nnx.backends import overrides

    registry = overrides._load("numpy")
    for name in (n for n in args.without.split(",") if n):
        if name == "all":
            overrides.set_enabled(False)
        elif name in overrides.PAIRS and name in registry:
            registry.pop(name)
        else:
            raise SystemExit(f"--without: {name} is not a NumPy pair (or 'all')")
    from nnx import Sequential
    from nnx.architectures import PRESETS, build_layers
    from nnx.backends import get_backend

    spec = PRESETS.get(args.arch, args.arch)
    model = Sequential(build_layers(spec, (1, 28, 28)), (1, 28, 28), backend=get_backend("numpy"),
                       dtype="float32", seed=0)
    if args.conv_method:
        for layer in model.layers:
            if type(layer).__name__ == "Conv2D":
                layer.method = args.conv_method
    tmods = [torch_module(layer, torch.nn) for layer in model.layers]
    for m in tmods:
        m.train()
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 1, 28, 28), dtype=np.float32)

    ins_n, ins_t, grads = layer_traffic(
        model, tmods, x, torch.from_numpy(x),
        lambda shape: rng.standard_normal(shape, dtype=np.float32))
    tgrads = [torch.from_numpy(np.ascontiguousarray(g)) for g in grads]  # autograd's layout
    names = [layer.describe() for layer in model.layers]
    cols = ("fwd", "bwd", "inf")
    res = {(i, side, c): [] for i in range(len(names)) for side in "nt" for c in cols}

    def run_nnx(i):
        layer = model.layers[i]
        t, _ = timed(lambda: layer.forward(ins_n[i], train=True))
        res[i, "n", "fwd"].append(t)
        t, _ = timed(lambda: layer.backward(grads[i], i > 0))
        res[i, "n", "bwd"].append(t)
        t, _ = timed(lambda: layer.forward(ins_n[i], train=False))
        res[i, "n", "inf"].append(t)

    def run_torch(i):
        m, xin, g = tmods[i], ins_t[i].detach().requires_grad_(i > 0), tgrads[i]
        t, out = timed(lambda: m(xin))
        res[i, "t", "fwd"].append(t)
        t, _ = timed(lambda: torch.autograd.backward(out, g))
        res[i, "t", "bwd"].append(t)
        m.eval()
        with torch.inference_mode():
            t, _ = timed(lambda: m(ins_t[i]))
        m.train()
        res[i, "t", "inf"].append(t)

    for r in range(args.repeats + 2):  # two warm-up rounds, dropped
        for i in range(len(names)):
            (run_nnx if r % 2 == 0 else run_torch)(i)
            (run_torch if r % 2 == 0 else run_nnx)(i)
    med = {k: statistics.median(v[2:]) for k, v in res.items()}

    print(f"# {args.arch}, batch {args.batch}, float32, 1 thread, median of {args.repeats} "
          f"interleaved repeats, ms")
    print("| layer | nnx fwd | torch fwd | nnx bwd | torch bwd | nnx fwd+bwd | torch fwd+bwd "
          "| ratio | nnx infer | torch infer |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    tot = dict.fromkeys(("nf", "tf", "nb", "tb", "ni", "ti"), 0.0)
    for i, name in enumerate(names):
        v = [med[i, s, c] for c, s in (("fwd", "n"), ("fwd", "t"), ("bwd", "n"), ("bwd", "t"),
                                       ("inf", "n"), ("inf", "t"))]
        for key, val in zip(tot, v):
            tot[key] += val
        print(f"| {i} {name} | {v[0]:.2f} | {v[1]:.2f} | {v[2]:.2f} | {v[3]:.2f} | "
              f"{v[0] + v[2]:.2f} | {v[1] + v[3]:.2f} | {(v[0] + v[2]) / (v[1] + v[3]):.2f} | "
              f"{v[4]:.2f} | {v[5]:.2f} |")
    n_tr, t_tr = tot["nf"] + tot["nb"], tot["tf"] + tot["tb"]
    print(f"| **sum** | {tot['nf']:.1f} | {tot['tf']:.1f} | {tot['nb']:.1f} | {tot['tb']:.1f} | "
          f"{n_tr:.1f} | {t_tr:.1f} | {n_tr / t_tr:.2f} | {tot['ni']:.1f} | {tot['ti']:.1f} |")
    if args.passes:
        print()
        passes(model, ins_n, grads, args.repeats)


def rows_passes(xp, layer, x, g, i, tag, stage):
    """The stages of Conv2D's row-split path (``method="rows"``), as the layer runs them."""
    from nnx.layers.conv import shifted, unshifted_sum

    n, c, h, w = x.shape
    k, p, o = layer.kernel_size, layer.padding, layer.out_channels
    xf = xp.reshape(xp.permute_dims(x, (1, 0, 2, 3)), (c, n, h * w))
    cols = stage(f"{tag}: im2col over the kernel's columns (k shifted copies)", lambda: xp.reshape(
        shifted(xp, xf, w, [(0, j - p) for j in range(k)]), (k * c, n * h * w)))
    wr = xp.reshape(xp.permute_dims(layer.weight.value, (2, 0, 3, 1)), (k * o, k * c))
    z = stage(f"{tag}: matmul Z = W_r·cols (k row-partial outputs)",
              lambda: xp.reshape(wr @ cols, (k, o, n, h * w)))
    stage(f"{tag}: sum of the row-shifted Z (k − 1 contiguous +=)",
          lambda: unshifted_sum(xp, z, w, [(p - r, 0) for r in range(k)]))
    gf = xp.reshape(xp.permute_dims(g, (1, 0, 2, 3)), (o, n, h * w))
    dz = stage(f"{tag}: backward dZ = g row-shifted (k copies)", lambda: xp.reshape(
        shifted(xp, gf, w, [(p - r, 0) for r in range(k)]), (k * o, n * h * w)))
    stage(f"{tag}: matmul dW_r = dZ·colsᵀ", lambda: dz @ cols.T)
    if i == 0:
        return
    dcols = stage(f"{tag}: matmul dcols = W_rᵀ·dZ",
                  lambda: xp.reshape(wr.T @ dz, (k, c, n, h * w)))
    stage(f"{tag}: col2im over the kernel's columns (k − 1 contiguous +=)",
          lambda: unshifted_sum(xp, dcols, w, [(0, j - p) for j in range(k)]))


def passes(model, ins, grads, repeats):
    """Time the stages of nnx's Conv2D / BatchNorm / MaxPool2D one by one (NumPy)."""

    from nnx.layers.conv import gather, out_size, scatter

    xp = model.xp
    stages: dict[str, list] = {}

    def stage(label, fn):
        t, out = timed(fn)
        stages.setdefault(label, []).append(t)
        return out

    for _ in range(repeats):
        for i, layer in enumerate(model.layers):
            kind, x, g, tag = type(layer).__name__, ins[i], grads[i], f"{i} {layer.describe()}"
            if kind == "Conv2D" and layer._rows():  # the row-split method's stages
                rows_passes(xp, layer, x, g, i, tag, stage)
            elif kind == "Conv2D":  # the "gather" method's stages
                n, c, hh, ww = x.shape
                k, s, p, o = layer.kernel_size, layer.stride, layer.padding, layer.out_channels
                ho, wo = out_size(hh, k, s, p), out_size(ww, k, s, p)
                cols = stage(f"{tag}: im2col from the unpadded input (gather)", lambda: xp.reshape(
                    gather(xp, xp.permute_dims(x, (1, 0, 2, 3)), k, s, p, ho, wo),
                    (k * k * c, n * ho * wo)))
                w2 = xp.reshape(xp.permute_dims(layer.weight.value, (0, 2, 3, 1)), (o, k * k * c))
                stage(f"{tag}: matmul W·cols", lambda: w2 @ cols)
                g2 = stage(f"{tag}: grad to (O, N·L) (a view when channel-major)",
                           lambda: xp.reshape(xp.permute_dims(g, (1, 0, 2, 3)), (o, n * ho * wo)))
                stage(f"{tag}: matmul dW = g·colsᵀ", lambda: g2 @ cols.T)
                if i == 0:
                    continue
                dcols = stage(f"{tag}: matmul dcols = Wᵀ·g", lambda: xp.reshape(
                    w2.T @ g2, (k * k, c, n, ho, wo)))
                stage(f"{tag}: col2im (k·k − 1 strided += into the centre block)",
                      lambda: scatter(xp, dcols, k, s, p, hh, ww))
            elif kind == "BatchNorm":  # the layer's own operations on its (F, m) view
                from nnx.layers.batchnorm import rows

                x2, g2 = rows(xp, x), rows(xp, g)
                mean = stage(f"{tag}: Σx (row sums)", lambda: xp.sum(x2, axis=-1) / x2.shape[1])
                xc = stage(f"{tag}: x − μ", lambda: x2 - mean[:, None])
                stage(f"{tag}: Σ(x − μ)² (vecdot)", lambda: xp.vecdot(xc, xc, axis=-1))
                stage(f"{tag}: scale and shift (2 passes)", lambda: xc * mean[:, None] + mean[:, None])
                stage(f"{tag}: backward Σg (row sums)", lambda: xp.sum(g2, axis=-1))
                stage(f"{tag}: backward Σg·(x − μ) (vecdot)", lambda: xp.vecdot(g2, xc, axis=-1))

                def dx():
                    t = xc * mean[:, None]
                    t -= g2
                    t += mean[:, None]
                    t *= mean[:, None]
                    return t
                stage(f"{tag}: backward dx (1 product + 3 in place)", dx)
                if layer.backend.offers("batchnorm"):  # NumPy's pair, as the layer runs it
                    from nnx.layers.batchnorm import BatchNormPair

                    pair = layer.pair("batchnorm", BatchNormPair)
                    w, b = layer.weight.value, layer.bias.value
                    _, saved = stage(f"{tag}: NumPy pair forward (the standard operations)",
                                     lambda: pair.forward(x, w, b, layer.eps))
                    stage(f"{tag}: NumPy pair backward (blocks of rows)",
                          lambda: pair.backward(saved, g, True))
            elif kind == "MaxPool2D":
                from nnx.layers.conv import set_window, window

                from nnx.layers.pool import MaxPoolPair

                k, s, p = layer.kernel_size, layer.stride, layer.padding
                ho, wo = g.shape[2], g.shape[3]
                out = stage(f"{tag}: standard forward ({k * k - 1} maximum)",
                            lambda: MaxPoolPair.forward(x, k, s, p, False)[0])
                stage(f"{tag}: standard, one mask (== and astype)",
                      lambda: xp.astype(window(x, 0, 0, s, ho, wo) == out, g.dtype))
                stage(f"{tag}: standard, one strided assignment into dx",
                      lambda: set_window(xp.empty_like(x), 0, 0, s, ho, wo, g))
                if layer.backend.offers("maxpool"):  # NumPy's pair, as the layer runs it
                    pair = layer.pair("maxpool", MaxPoolPair)
                    stage(f"{tag}: NumPy pair inference forward (2 maximum)",
                          lambda: pair.forward(x, k, s, p, False))
                    _, saved = stage(f"{tag}: NumPy pair training forward (+ 2 comparisons)",
                                     lambda: pair.forward(x, k, s, p, True))
                    stage(f"{tag}: NumPy pair backward (2 × (multiply, subtract))",
                          lambda: pair.backward(saved, g, True))
    print("| nnx pass (NumPy) | median ms |")
    print("|---|---:|")
    for label, ts in stages.items():
        print(f"| {label} | {statistics.median(ts):.2f} |")


if __name__ == "__main__":
    main()
