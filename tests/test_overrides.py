"""Backend overrides (backends/overrides.py) on the CPU: a NumPy backend under another name
registers correct and deliberately wrong versions of every named operation; wrong ones fall
back to the standard path after one warning each, correct ones are used, ``--no-fused``
turns them all off. The CuPy kernels themselves are compared in tests/test_gpu.py."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import nnx
from nnx.backends import overrides
from nnx.backends.numpy_backend import NumpyBackend
from nnx.losses import SoftmaxCrossEntropy


class FakeBackend(NumpyBackend):
    """NumPy under another name, so that overrides can be registered for it alone."""

    def __init__(self, name):
        self.name = name


def _right(calls):
    """Correct NumPy versions of every op (same arithmetic as the standard path), counting
    their calls."""

    def count(name, f):
        def g(*args):
            calls[name] = calls.get(name, 0) + 1
            return f(*args)
        return g

    def relu_forward(x):
        return np.maximum(x, np.zeros_like(x))

    def softmax_xent(loss, logits, target):
        return SoftmaxCrossEntropy._softmax_xent(loss, logits, target)

    def update(opt, p, g, slots, hyper):
        type(opt).update(opt, p, g, slots, hyper)

    return {"relu_forward": count("relu_forward", relu_forward),
            "relu_backward": count("relu_backward", lambda g, y: g * (y > 0)),
            "softmax_xent": count("softmax_xent", softmax_xent),
            "nesterov_update": count("nesterov_update", update),
            "adam_update": count("adam_update", update)}


def _wrong(calls):
    """Every op off by a little (but by more than the tolerance)."""
    right = _right(calls)

    def relu_forward(x):
        return right["relu_forward"](x) * 1.01

    def softmax_xent(loss, logits, target):
        picked, correct, grad = right["softmax_xent"](loss, logits, target)
        return picked, correct, grad * 1.5

    def update(opt, p, g, slots, hyper):
        type(opt).update(opt, p, g, slots, hyper)
        p += 1e-3

    return {"relu_forward": relu_forward, "relu_backward": lambda g, y: g * (y > 0) + 1.0,
            "softmax_xent": softmax_xent, "nesterov_update": update, "adam_update": update}


@pytest.fixture
def fresh():
    """A clean registry state: nothing checked yet, overrides on; fake backends removed."""
    for name in overrides.PROVIDERS:  # registered before the copy, so the copy keeps them
        overrides._load(name)
    saved = {name: dict(ops) for name, ops in overrides.REGISTRY.items()}
    overrides._CHECKED.clear()
    overrides.set_enabled(True)
    yield
    overrides.REGISTRY.clear()
    overrides.REGISTRY.update(saved)
    overrides._CHECKED.clear()
    overrides.set_enabled(True)


def _register(name, ops):
    for op, f in ops.items():
        overrides.register(name, op, f)
    return FakeBackend(name)


def _train(backend, optimizer, steps=6, dtype="float64"):
    """A few steps of a small MLP (the lean TrainStep, as the Trainer runs it): the final
    flat weights and the per-step (Σ log p, correct)."""
    from tests_helpers_train import train_steps

    return train_steps(backend, optimizer, steps, dtype)


@pytest.mark.parametrize("optimizer", ["nesterov", "adam", "adamw"])
def test_wrong_override_falls_back_with_one_warning_each(fresh, optimizer):
    reference = _train(NumpyBackend(), optimizer)
    fake = _register("fake-wrong", _wrong({}))
    with pytest.warns(RuntimeWarning) as record:
        got = _train(fake, optimizer)
    messages = [str(w.message) for w in record if "override" in str(w.message)]
    used = {"nesterov": "nesterov_update", "adam": "adam_update", "adamw": "adam_update"}
    expected = {"relu_forward", "relu_backward", "softmax_xent", used[optimizer]}
    assert len(messages) == len(expected), messages  # one per op, not one per call
    for op in expected:
        assert any(f"'{op}'" in m and "standard path" in m for m in messages)
    np.testing.assert_array_equal(got[0], reference[0])  # exactly the standard path
    assert got[1] == reference[1]
    with warnings.catch_warnings():  # the rest of the run stays quiet
        warnings.simplefilter("error")
        _train(fake, optimizer, steps=2)


def test_correct_override_is_used(fresh):
    calls = {}
    fake = _register("fake-right", _right(calls))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _train(fake, "adamw", steps=6)
    reference = _train(NumpyBackend(), "adamw", steps=6)
    np.testing.assert_allclose(got[0], reference[0], rtol=1e-12, atol=1e-15)
    # the self-check calls each once, then every real call goes through it
    assert calls["softmax_xent"] == 1 + 6 and calls["adam_update"] == 1 + 6
    assert calls["relu_forward"] == 1 + 2 * 6 and calls["relu_backward"] == 1 + 2 * 6


def test_an_override_that_raises_falls_back(fresh):
    def broken(x):
        raise RuntimeError("nvrtc: compilation failed")

    fake = _register("fake-raises", {"relu_forward": broken})
    with pytest.warns(RuntimeWarning, match="relu_forward.*compilation failed"):
        got = _train(fake, "nesterov", steps=2)
    np.testing.assert_array_equal(got[0], _train(NumpyBackend(), "nesterov", steps=2)[0])


def test_registry_lists_what_each_backend_replaces(fresh):
    from conftest import make_backend

    strict = make_backend("strict", "device1")
    assert strict.overrides() == []  # the standard path only
    # importable without CuPy: every operation and pair
    assert overrides.listed("cupy") == list(overrides.OPS) + list(overrides.PAIRS)
    fake = _register("fake-some", {"softmax_xent": _right({})["softmax_xent"]})
    assert fake.overrides() == ["softmax_xent"]
    with pytest.raises(ValueError, match="unknown op"):
        overrides.register("fake-some", "gelu", lambda x: x)
    # backends without overrides get the reference itself back: no wrapper, no cost
    ref = SoftmaxCrossEntropy._softmax_xent
    assert strict.op("softmax_xent", ref) is ref
    assert not strict.offers("conv2d")


class _WrongConvPair:
    """The standard im2col pair with its weight gradient off by 1%: a wrong override."""

    calls = 0

    @staticmethod
    def forward(x, w, b, s, p):
        from nnx.layers.conv import Im2colPair

        _WrongConvPair.calls += 1
        return Im2colPair.forward(x, w, b, s, p)

    @staticmethod
    def backward(saved, grad, input_grad):
        from nnx.layers.conv import Im2colPair

        dx, dw, db = Im2colPair.backward(saved, grad, input_grad)
        return dx, dw * 1.01, db


def _conv_bn_steps(backend, steps=3):
    """Final weights of a few training steps of a small conv + batch-norm net."""
    from nnx.architectures import build_layers
    from nnx.optim import make_optimizer

    model = nnx.Sequential(build_layers("conv:3,bn,relu,flatten,dense:4", (2, 5, 5)),
                           input_shape=(2, 5, 5), backend=backend, dtype="float64", seed=1)
    opt = make_optimizer("nesterov", model.named_parameters(), 0.05, xp=model.xp)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((8, 2, 5, 5)), rng.integers(0, 4, 8)
    loss = SoftmaxCrossEntropy()
    for _ in range(steps):
        loss.forward(model.forward(x, train=True), y)
        model.backward(loss.backward())
        opt.step()
    return [np.array(p.value) for p in model.parameters()]


def test_wrong_pair_falls_back_to_the_standard_pair_with_one_warning(fresh):
    """A pair whose backward is wrong: one warning, then the standard pair for forward AND
    backward, so the run equals a run without the override."""
    fake = _register("fake-pair", {"conv2d": _WrongConvPair})
    _WrongConvPair.calls = 0
    with pytest.warns(RuntimeWarning) as record:
        got = _conv_bn_steps(fake)
    messages = [str(w.message) for w in record if "override" in str(w.message)]
    assert len(messages) == 1 and "'conv2d'" in messages[0]
    assert _WrongConvPair.calls == 2  # the self-check only (backward with and without dx)
    for g, w in zip(got, _conv_bn_steps(NumpyBackend())):  # im2col against NumPy's "rows"
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)


def test_correct_pair_is_used(fresh):
    from nnx.layers.batchnorm import BatchNormPair
    from nnx.layers.conv import Im2colPair

    class Counting:
        calls = 0

        def __init__(self, inner):
            self.inner = inner

        def forward(self, *args):
            Counting.calls += 1
            return self.inner.forward(*args)

        def backward(self, *args):
            return self.inner.backward(*args)

    fake = _register("fake-pair-ok", {"conv2d": Counting(Im2colPair),
                                      "batchnorm": Counting(BatchNormPair)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _conv_bn_steps(fake)
    # two pairs: the self-check (two forwards: backward with and without dx), then each step
    assert Counting.calls == 2 * (2 + 3)
    for g, w in zip(got, _conv_bn_steps(NumpyBackend())):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)


def test_disabled_overrides_are_not_called(fresh):
    calls = {}
    fake = _register("fake-off", _wrong(calls))
    overrides.set_enabled(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even checked
        got = _train(fake, "adam")
    np.testing.assert_array_equal(got[0], _train(NumpyBackend(), "adam")[0])
    assert not overrides._CHECKED


@pytest.fixture
def synthetic(monkeypatch):
    """The CLI sees synthetic digits (no MNIST needed)."""
    import nnx.datasets as ds
    from tests_helpers_train import synthetic_digits

    data = synthetic_digits(n_train=700, n_test=120)
    monkeypatch.setattr(ds, "load", lambda *a, **k: data)


def test_no_fused_option_turns_overrides_off(fresh, tmp_path, monkeypatch, synthetic):
    """Through the CLI: a backend's counting override runs in a normal run and not under
    --no-fused."""
    import nnx.backends
    from nnx import train

    calls = {}
    fake = _register("fake-cli", _right(calls))
    monkeypatch.setattr(nnx.backends, "get_backend", lambda *a, **k: fake)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    args = ["--limit", "600", "--val-size", "100", "--epochs", "1", "--quiet", "--no-plots",
            "--layers", "784,16,10"]
    assert train.main(args + ["--out", str(tmp_path / "a"), "--no-fused"]) == 0
    assert not overrides.enabled() and not calls
    assert train.main(args + ["--out", str(tmp_path / "b")]) == 0
    assert overrides.enabled() and calls


def test_checkpoint_every(tmp_path, monkeypatch, synthetic):
    """Checkpoints are written after epochs 2 and 4 (every 2nd) and 5 (the last) only —
    counted as they are written (the folder keeps just the newest two)."""
    import nnx.checkpoint as checkpoint
    from nnx import train

    written = []
    real = checkpoint.save_trainer
    monkeypatch.setattr(checkpoint, "save_trainer",
                        lambda trainer: written.append(trainer.epoch) or real(trainer))
    args = ["--limit", "600", "--val-size", "100", "--epochs", "5", "--quiet", "--no-plots",
            "--layers", "784,16,10", "--checkpoint-every", "2", "--out", str(tmp_path / "r")]
    assert train.main(args) == 0
    assert written == [2, 4, 5]


def test_each_pair_configuration_is_checked(fresh):
    """A conv pair wrong only at stride 2 passes the check of a stride-1 layer but not that
    of a stride-2 layer (each configuration is its own case), and one wrong only without
    the input gradient fails too (the check runs backward both ways)."""
    from nnx.layers.conv import Im2colPair

    class WrongAtStride2:
        forward = staticmethod(Im2colPair.forward)

        @staticmethod
        def backward(saved, grad, input_grad):
            dx, dw, db = Im2colPair.backward(saved, grad, input_grad)
            return dx, (dw * 1.5 if saved[5] == 2 else dw), db

    class WrongWithoutInputGrad(WrongAtStride2):
        @staticmethod
        def backward(saved, grad, input_grad):
            dx, dw, db = Im2colPair.backward(saved, grad, input_grad)
            return dx, (dw if input_grad else dw * 1.5), db

    for name, impl, bad in (("fake-s2", WrongAtStride2, 1), ("fake-ig", WrongWithoutInputGrad, 2)):
        fake = _register(name, {"conv2d": impl})
        layers = [nnx.Conv2D(2, 3, 3, padding=1), nnx.Conv2D(3, 3, 3, stride=2)]
        model = nnx.Sequential(layers, input_shape=(2, 7, 7), backend=fake, dtype="float64")
        x = np.random.default_rng(0).standard_normal((2, 2, 7, 7))
        with pytest.warns(RuntimeWarning) as record:
            model.forward(x, train=True)
        failed = [str(w.message) for w in record if "'conv2d'" in str(w.message)]
        assert len(failed) == bad, failed  # fake-ig: both layers' checks fail


def test_torch_conv_pair_passes_its_check_on_wide_layers(fresh):
    """Float32 rounding of sums over C·k² products grows with them: the check's tolerance is
    relative to the values, so torch's convolution is not rejected on wide layers."""
    pytest.importorskip("torch")
    from conftest import make_backend

    b = make_backend("torch", "cpu")
    model = nnx.Sequential([nnx.Conv2D(512, 256, 3, padding=1)], input_shape=(512, 4, 4),
                           backend=b, dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.forward(b.from_numpy(np.ones((1, 512, 4, 4)), dtype=b.float32), train=True)
    assert all(overrides._CHECKED.values()) and overrides._CHECKED
