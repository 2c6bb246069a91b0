"""GPU backends, one test each: the only GPU skips on a machine without them.

Every test taking the ``backend`` fixture also runs on CuPy and torch-CUDA when they are
usable (conftest.py probes them once); where they are not, those cases are not generated at
all and these two tests stay as the visible skips, with what to install.
"""
from __future__ import annotations

import numpy as np
import pytest

import nnx
from conftest import GPU_BACKENDS, backend_problem


@pytest.mark.gpu
@pytest.mark.parametrize("name,device", GPU_BACKENDS, ids=[f"{n}-{d}" for n, d in GPU_BACKENDS])
def test_gpu_backend_matches_numpy(name, device):
    problem = backend_problem(name, device)
    if problem is not None:
        pytest.skip(f"{name} on {device} not usable here: {problem}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 6))
    y = np.array([0, 1, 2, 1, 0, 2, 1, 0])
    results = []
    for b in (nnx.get_backend("numpy"), nnx.get_backend(name, device)):
        model = nnx.mlp([6, 5, 3], backend=b, dtype="float64", seed=0)
        loss_fn = nnx.SoftmaxCrossEntropy()
        loss = loss_fn.forward(model.forward(b.from_numpy(x), train=True), b.from_numpy(y))
        grad_in = model.backward(loss_fn.backward())
        results.append((float(loss), b.to_numpy(grad_in)))
    (loss_np, g_np), (loss_gpu, g_gpu) = results
    assert loss_gpu == pytest.approx(loss_np, rel=1e-12)
    np.testing.assert_allclose(g_gpu, g_np, rtol=1e-10, atol=1e-14)


# --- CuPy's fused kernels (backends/cupy_kernels.py) against the standard path ---------------
def _cupy_or_skip(device="cuda"):
    problem = backend_problem("cupy", device)
    if problem is not None:
        pytest.skip(f"cupy on {device} not usable here: {problem}")
    return nnx.get_backend("cupy", device)


def _op_cases(b, dtype):
    """(op name, reference, arguments) for every CuPy override, on real-sized inputs."""
    from nnx.layers.activations import ReLU
    from nnx.layers.base import Parameter
    from nnx.losses import SoftmaxCrossEntropy
    from nnx.optim import make_optimizer

    rng = np.random.default_rng(1)
    a = lambda *shape: b.from_numpy(rng.standard_normal(shape), dtype=b.dtype(dtype))
    relu = ReLU()
    relu.build(b, b.dtype(dtype), None, (300,))
    x = a(257, 300)
    x[0, :3] = 0.0
    cases = [("relu_forward", relu._train_forward, (x,)),
             ("relu_backward", relu._backward, (a(257, 300), relu._train_forward(x)))]
    conv = ReLU()
    conv.build(b, b.dtype(dtype), None, (3, 5, 5))
    cases.append(("relu_forward", conv._train_forward, (a(4, 3, 5, 5)[:, :, 1:, :],)))  # strided
    # the softmax kernel is one 256-thread block striding over rows, each thread looping
    # over its rows' classes: fewer rows than threads, not a multiple of 256, >1024 of each
    for n, c in ((1000, 10), (1, 10), (3, 1500), (1025, 1025), (300, 1)):
        logits = a(n, c) * 4
        logits[0, 1 % c] = logits[0, 0]  # a tie: both count, as on the standard path
        onehot = b.from_numpy(np.eye(c)[rng.integers(0, c, n)], dtype=b.dtype(dtype))
        cases.append(("softmax_xent", SoftmaxCrossEntropy._softmax_xent,
                      (SoftmaxCrossEntropy(), logits, onehot)))
    soft = b.from_numpy(rng.dirichlet(np.ones(10), 50), dtype=b.dtype(dtype))  # soft targets
    cases.append(("softmax_xent", SoftmaxCrossEntropy._softmax_xent,
                  (SoftmaxCrossEntropy(), a(50, 10), soft)))
    for name, wd in (("nesterov", 0.0), ("nesterov", 5e-4), ("adam", 0.0), ("adam", 0.01),
                     ("adamw", 0.01)):
        p = Parameter("w", a(10_007))
        opt = make_optimizer(name, [p], lr=0.05, momentum=0.9, weight_decay=wd)
        slots = [b.xp.abs(a(10_007)) for _ in opt.slot_names]
        hyper = opt.hyper_table(41, [0.05], b, b.dtype(dtype))  # 0-D device arrays, as trained
        cases.append((opt.fused_op, type(opt).update,
                      (opt, p.value, a(10_007), slots, tuple(h[0] for h in hyper))))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cupy_kernels_match_the_standard_path(dtype):
    b = _cupy_or_skip()
    from nnx.backends import cupy_kernels, overrides

    rtol, atol = {"float32": (1e-5, 1e-6), "float64": (1e-12, 1e-14)}[dtype]
    copy = lambda args: overrides._copy(b, args)
    seen = set()
    with b.activate():
        for name, reference, args in _op_cases(b, dtype):
            impl = overrides.REGISTRY["cupy"][name]
            ref_in, new_in = copy(args), copy(args)
            want = [b.to_numpy(v) for v in overrides._arrays((reference(*ref_in), ref_in))]
            got = [b.to_numpy(v) for v in overrides._arrays((impl(*new_in), new_in))]
            assert len(got) == len(want), name
            shape = [tuple(v.shape) for v in overrides._arrays(args)]
            for g, w in zip(got, want):
                assert g.dtype == w.dtype, (name, shape)
                np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{name} {shape}")
            seen.add(name)
    # the pairs: test_cupy_pairs_match_the_standard_pairs below
    assert seen == set(overrides.listed("cupy")) - set(overrides.PAIRS) and cupy_kernels


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cupy_pairs_match_the_standard_pairs(dtype, monkeypatch):
    """The conv2d, maxpool and batchnorm kernels on the GPU: tests/test_cupy_pairs.py's
    cases (configurations, layouts, ties) with CuPy arrays instead of NumPy ones."""
    b = _cupy_or_skip()
    import test_cupy_pairs as T

    cupy = b._cupy
    real_close = T._close
    monkeypatch.setattr(T, "_layout", lambda a, cm: cupy.asarray(np.ascontiguousarray(
        a.transpose(1, 0, 2, 3))).transpose(1, 0, 2, 3) if cm else cupy.asarray(a))
    monkeypatch.setattr(T, "_close", lambda got, want, dt: real_close(
        [None if g is None else cupy.asnumpy(g) for g in got],
        [None if w is None else cupy.asnumpy(w) for w in want], dt))
    to_gpu = lambda a: a if a is None or isinstance(a, cupy.ndarray) else cupy.asarray(a)
    with b.activate():
        from conftest import CONV_PAIR_CASES

        for c, o, k, s, p, hw in CONV_PAIR_CASES + [(32, 64, 3, 1, 1, (14, 14))]:
            for cm in (False, True):
                rng = np.random.default_rng(11)
                x = T._layout(rng.standard_normal((3, c, *hw)).astype(dtype), cm)
                w = to_gpu(rng.standard_normal((o, c, k, k)).astype(dtype) / (c * k * k) ** 0.5)
                bias = to_gpu(rng.standard_normal(o).astype(dtype))
                g = to_gpu(rng.standard_normal((3, o, T.out_size(hw[0], k, s, p),
                                                T.out_size(hw[1], k, s, p))).astype(dtype))
                for input_grad in (True, False):
                    want_y, want_saved = T.Im2colPair.forward(x, w, bias, s, p)
                    got_y, got_saved = T.cupy_pairs.CupyConv2D.forward(x, w, bias, s, p)
                    T._close([got_y], [want_y], dtype)
                    T._close(T.cupy_pairs.CupyConv2D.backward(got_saved, g, input_grad),
                             T.Im2colPair.backward(want_saved, g, input_grad), dtype)
        for k, s, p, hw in [(2, 2, 0, (8, 6)), (2, 2, 0, (7, 5)), (3, 2, 1, (7, 8)),
                            (3, 1, 1, (5, 5)), (2, 1, 0, (4, 6))]:
            for cm in (False, True):
                rng = np.random.default_rng(14)
                xh = np.round(rng.standard_normal((2, 3, *hw)), 1).astype(dtype)
                xh[0, 0] = 1.0
                x = T._layout(xh, cm)
                want_out, want_saved = T.MaxPoolPair.forward(x, k, s, p, True)
                got_out, got_saved = T.cupy_pairs.CupyMaxPool.forward(x, k, s, p, True)
                np.testing.assert_array_equal(cupy.asnumpy(got_out), cupy.asnumpy(want_out))
                g = to_gpu(rng.standard_normal(tuple(want_out.shape)).astype(dtype))
                T._close([T.cupy_pairs.CupyMaxPool.backward(got_saved, g, True)],
                         [T.MaxPoolPair.backward(want_saved, g, True)], dtype)
        for shape in [(6, 4), (5, 3, 4, 7), (128, 32, 28, 28)]:
            rng = np.random.default_rng(12)
            x = T._layout((rng.standard_normal(shape) * 3 + 1).astype(dtype), len(shape) == 4) \
                if len(shape) == 4 else to_gpu((rng.standard_normal(shape) * 3 + 1).astype(dtype))
            weight = to_gpu(rng.standard_normal(shape[1]).astype(dtype))
            bias = to_gpu(rng.standard_normal(shape[1]).astype(dtype))
            g = to_gpu(rng.standard_normal(shape).astype(dtype))
            for input_grad in (True, False):
                want, want_saved = T.BatchNormPair.forward(x, weight, bias, 1e-5)
                got, got_saved = T.cupy_pairs.CupyBatchNorm.forward(x, weight, bias, 1e-5)
                T._close(list(got), list(want), dtype)
                T._close(T.cupy_pairs.CupyBatchNorm.backward(got_saved, g, input_grad),
                         T.BatchNormPair.backward(want_saved, g, input_grad), dtype)


@pytest.mark.gpu
def test_cupy_cnn_training_runs_the_pairs_and_matches_the_standard_path():
    """A conv/batch-norm/max-pool net on CuPy, float64: with the pairs (no self-check may
    fail: warnings are errors) and with overrides off, the same weights after a few steps."""
    import warnings

    from nnx.architectures import build_layers
    from nnx.backends import overrides
    from nnx.optim import make_optimizer

    b = _cupy_or_skip()

    def train(enabled):
        overrides.set_enabled(enabled)
        try:
            model = nnx.Sequential(build_layers("conv:6,bn,relu,maxpool:2,conv:8:3:2,bn,relu,"
                                                "maxpool:2,flatten,dense:10", (1, 16, 16)),
                                   input_shape=(1, 16, 16), backend=b, dtype="float64", seed=3)
            opt = make_optimizer("adam", model.named_parameters(), 1e-2, xp=model.xp)
            rng = np.random.default_rng(0)
            x = b.from_numpy(rng.standard_normal((16, 1, 16, 16)))
            y = b.from_numpy(rng.integers(0, 10, 16))
            loss = nnx.SoftmaxCrossEntropy()
            for _ in range(4):
                loss.forward(model.forward(x, train=True), y)
                model.backward(loss.backward())
                opt.step()
            return [b.to_numpy(p.value) for p in model.parameters()]
        finally:
            overrides.set_enabled(True)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = train(True)
    # the pairs really ran: every self-check of a CuPy pair (this test's or an earlier one's,
    # cached per configuration) passed
    checks = [(k[2], ok) for k, ok in overrides._CHECKED.items()
              if k[0] == "cupy" and k[2] in overrides.PAIRS]
    assert {name for name, _ in checks} == set(overrides.PAIRS) and all(ok for _, ok in checks)
    want = train(False)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.gpu
def test_cupy_rng_draws_on_its_device_and_restarts():
    """Philox through cupy.random.Generator: shapes and dtypes asked for, a true
    permutation, the same numbers after reseed with the same seed."""
    b = _cupy_or_skip()
    cupy = b._cupy
    rng = b.device_rng(7)
    u = rng.uniform((1000,), 2.0, 3.0, dtype=cupy.float64)
    z = rng.normal((4, 5), std=2.0)
    m = rng.bernoulli((3, 1000), 0.25, dtype=cupy.float64)
    perm = rng.permutation(1001)
    assert u.dtype == cupy.float64 and z.dtype == cupy.float32 and z.shape == (4, 5)
    assert m.dtype == cupy.float64 and m.shape == (3, 1000)
    assert perm.dtype == cupy.int64 and u.device.id == b.device.id
    assert 2.0 <= float(u.min()) and float(u.max()) <= 3.0
    assert 0.15 < float(m.mean()) < 0.35
    np.testing.assert_array_equal(np.sort(b.to_numpy(perm)), np.arange(1001))
    rng.reseed(7)
    np.testing.assert_array_equal(b.to_numpy(rng.uniform((1000,), 2.0, 3.0,
                                                         dtype=cupy.float64)), b.to_numpy(u))
    assert str(b.device_of(u)) == str(b.device)


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["nesterov", "adamw"])
def test_cupy_fused_training_matches_numpy_and_unfused(optimizer):
    """Same seed, a few steps with clipping and weight decay: CuPy fused = CuPy unfused =
    NumPy (float64), and no override falls back."""
    import warnings

    from nnx.backends import overrides
    from tests_helpers_train import train_steps

    b = _cupy_or_skip()
    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed self-check would warn
        runs["numpy"] = train_steps(nnx.get_backend("numpy"), optimizer)[0]
        runs["fused"] = train_steps(b, optimizer)[0]
        overrides.set_enabled(False)
        try:
            runs["unfused"] = train_steps(b, optimizer)[0]
        finally:
            overrides.set_enabled(True)
    for k in ("fused", "unfused"):
        np.testing.assert_allclose(runs[k], runs["numpy"], rtol=1e-9, atol=1e-12, err_msg=k)


@pytest.mark.gpu
def test_cuda_1_never_touches_gpu_0():
    cupy = pytest.importorskip("cupy")
    if backend_problem("cupy", "cuda:1") is not None:
        pytest.skip("needs two GPUs")
    from tests_helpers_train import train_steps

    with cupy.cuda.Device(0):
        pool0 = cupy.get_default_memory_pool().used_bytes()
    b1 = nnx.get_backend("cupy", "cuda:1")
    nnx.get_backend("cupy", "cuda:0")  # a later construction makes GPU 0 current again
    train_steps(b1, "adam")
    with cupy.cuda.Device(0):
        assert cupy.get_default_memory_pool().used_bytes() == pool0
    assert str(b1.device) == "cuda:1" and "cuda:1" in b1.describe()


@pytest.mark.gpu
def test_resume_on_gpu(tmp_path):
    """Two epochs straight = one epoch, then resume for the second (same seed, on CuPy):
    the same weights. Constant learning rate: a resume to more epochs stretches a cosine
    schedule (the note it prints says so)."""
    _cupy_or_skip()
    from nnx import train

    args = ["--device", "cuda", "--limit", "2000", "--val-size", "200", "--quiet",
            "--no-plots", "--dtype", "float64", "--schedule", "constant"]
    assert train.main(args + ["--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert train.main(args + ["--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert train.main(["--resume", str(tmp_path / "b"), "--epochs", "2", "--quiet",
                       "--no-plots"]) == 0
    import json

    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "results.json").read_text())
    assert rb["test_acc"] == pytest.approx(ra["test_acc"], abs=1e-9)
    from safetensors.numpy import load_file

    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(wa) == set(wb)
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], rtol=1e-10, atol=1e-12, err_msg=name)
