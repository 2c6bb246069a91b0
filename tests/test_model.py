"""Sequential and mlp: cross-backend agreement, training to 100% on a tiny batch, dtypes,
predictions, parameter counts, summaries, state dicts (and loading them into PyTorch),
and the errors users see."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import nnx
from nnx import (MSE, Dense, Dropout, Flatten, ReLU, Sequential, SoftmaxCrossEntropy, Tanh,
                 get_backend, mlp)

HAS_TORCH = importlib.util.find_spec("torch") is not None


def host(backend, x):
    return backend.to_numpy(x)


def data(n=8, d=6, classes=3, seed=0):
    g = np.random.default_rng(seed)
    return g.standard_normal((n, d)), g.integers(0, classes, size=n)


def step(model, x, y, loss):
    """One forward + backward; returns the loss as a Python float."""
    out = model.forward(x, train=True)
    value = loss.forward(out, y)
    model.backward(loss.backward())
    return out, value


# --- the same numbers on every backend ------------------------------------------------------
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 2e-5)])
def test_same_weights_outputs_loss_and_grads_as_numpy(backend, dtype, rtol):
    ref_b = get_backend("numpy")
    x_np, y_np = data()
    results = []
    for b in (ref_b, backend):
        model = mlp((6, 5, 4, 3), activation="tanh", backend=b, dtype=dtype, seed=7)
        x = b.from_numpy(x_np, dtype=model.dtype)
        y = b.from_numpy(y_np)
        out, loss = step(model, x, y, SoftmaxCrossEntropy())
        results.append({
            "weights": {k: host(b, p.value) for k, p in model.named_parameters().items()},
            "grads": {k: host(b, p.grad) for k, p in model.named_parameters().items()},
            "out": host(b, out), "loss": float(loss),
            "dtype": b.dtype_name(out.dtype),
        })
    ref, got = results
    assert got["dtype"] == dtype
    assert list(got["weights"]) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    for k in ref["weights"]:
        np.testing.assert_array_equal(got["weights"][k], ref["weights"][k])  # identical init
        np.testing.assert_allclose(got["grads"][k], ref["grads"][k], rtol=rtol, atol=rtol * 1e-2)
    np.testing.assert_allclose(got["out"], ref["out"], rtol=rtol, atol=rtol * 1e-2)
    assert got["loss"] == pytest.approx(ref["loss"], rel=rtol)


def test_seed_changes_weights():
    a = mlp((4, 3), seed=0).state_dict()["0.weight"]
    b = mlp((4, 3), seed=0).state_dict()["0.weight"]
    c = mlp((4, 3), seed=1).state_dict()["0.weight"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --- training -------------------------------------------------------------------------------
def test_overfits_a_tiny_batch_with_plain_sgd(backend):
    x_np, y_np = data(n=32, d=10, classes=4, seed=3)
    model = mlp((10, 32, 4), backend=backend, dtype="float32", seed=0)
    x, y = backend.from_numpy(x_np, dtype=model.dtype), backend.from_numpy(y_np)
    loss, lr = SoftmaxCrossEntropy(), 0.5
    first = None
    for _ in range(150):
        _, value = step(model, x, y, loss)
        first = float(value) if first is None else first
        for p in model.parameters():
            p.value -= lr * p.grad
    final = float(loss.forward(model(x), y))
    accuracy = float(np.mean(host(backend, model.predict(x)) == y_np))
    assert accuracy == 1.0, f"accuracy {accuracy}, loss {first:.3f} -> {final:.3f}"
    assert final < 0.1 * first


def test_mse_regression_decreases(backend):
    g = np.random.default_rng(4)
    x_np = g.standard_normal((16, 3))
    t_np = np.tanh(x_np @ g.standard_normal((3, 2)))
    model = mlp((3, 16, 2), activation="tanh", backend=backend, dtype="float64", seed=1)
    x, t = backend.from_numpy(x_np), backend.from_numpy(t_np)
    loss = MSE()
    values = []
    for _ in range(60):
        _, value = step(model, x, t, loss)
        values.append(float(value))
        for p in model.parameters():
            p.value -= 0.2 * p.grad
    assert values[-1] < 0.3 * values[0]


# --- dtypes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_flows_through_forward_backward_and_update(backend, dtype):
    x_np, y_np = data()
    model = mlp((6, 5, 3), backend=backend, dtype=dtype, dropout=0.2)
    dt = backend.dtype(dtype)
    x = backend.from_numpy(x_np, dtype=dt)
    out, loss = step(model, x, backend.from_numpy(y_np), SoftmaxCrossEntropy())
    assert out.dtype == dt and loss.dtype == dt and tuple(loss.shape) == ()
    for p in model.parameters():
        assert p.value.dtype == dt and p.grad.dtype == dt
        assert backend.device_of(p.grad) == backend.device
        p.value -= 0.1 * p.grad
        assert p.value.dtype == dt
    assert model.probabilities(x).dtype == dt


def test_input_of_another_dtype_is_cast_to_the_model_dtype(backend):
    model = mlp((6, 3), backend=backend, dtype="float32")
    out = model(backend.from_numpy(data()[0], dtype=backend.float64))
    assert out.dtype == backend.float32


def test_float32_only_device_trains_and_refuses_float64(float32_only_backend):
    b = float32_only_backend
    with pytest.raises(nnx.BackendError, match="float64"):
        mlp((6, 3), backend=b, dtype="float64")
    x_np, y_np = data(n=16, d=6, classes=3, seed=5)
    model = mlp((6, 16, 3), backend=b, dtype="float32", dropout=0.1)
    x, y = b.from_numpy(x_np), b.from_numpy(y_np)  # float64 host data arrives as float32
    assert x.dtype == b.float32
    loss = SoftmaxCrossEntropy()
    values = []
    for _ in range(40):
        _, value = step(model, x, y, loss)
        values.append(float(value))
        for p in model.parameters():
            p.value -= 0.5 * p.grad
    assert all(p.value.dtype == b.float32 for p in model.parameters())
    assert values[-1] < 0.5 * values[0]


def test_float64_weights_on_a_float32_only_device_say_what_to_do(float32_only_backend, tmp_path):
    from nnx.checkpoint import CheckpointError, save_weights

    model = mlp((6, 4, 3), backend=nnx.get_backend("numpy"), dtype="float64", seed=2)
    save_weights(tmp_path / "m.safetensors", model)
    with pytest.raises(CheckpointError, match="float64 and .* has no float64.*dtype='float32'"):
        nnx.load(tmp_path / "m.safetensors", backend=float32_only_backend)
    again = nnx.load(tmp_path / "m.safetensors", backend=float32_only_backend, dtype="float32")
    np.testing.assert_allclose(float32_only_backend.to_numpy(again.layers[0].weight.value),
                               model.layers[0].weight.value, rtol=1e-7)


def test_unknown_dtype_is_rejected():
    with pytest.raises(ValueError, match="float16"):
        mlp((3, 2), dtype="float16")


# --- predictions ----------------------------------------------------------------------------
def test_predict_proba_and_predict(backend):
    x_np, _ = data(n=10)
    model = mlp((6, 8, 3), backend=backend, dtype="float64", seed=2)
    x = backend.from_numpy(x_np)
    logits = host(backend, model(x))
    proba = host(backend, model.probabilities(x))
    assert proba.shape == (10, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(proba, e / e.sum(axis=1, keepdims=True), rtol=1e-12)
    pred = host(backend, model.predict(x))
    np.testing.assert_array_equal(pred, logits.argmax(axis=1))
    np.testing.assert_array_equal(pred, proba.argmax(axis=1))


def test_eval_is_deterministic_with_dropout(backend):
    model = mlp((6, 8, 3), backend=backend, dtype="float64", dropout=0.5)
    x = backend.from_numpy(data()[0])
    a, b = host(backend, model(x)), host(backend, model(x))
    np.testing.assert_array_equal(a, b)
    t1, t2 = host(backend, model(x, train=True)), host(backend, model(x, train=True))
    assert not np.array_equal(t1, t2)


# --- parameters, summary, architecture ------------------------------------------------------
def test_num_parameters_of_the_mnist_mlp():
    model = mlp((784, 128, 64, 10))
    assert model.num_parameters() == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10 == 109386
    assert [p.shape for p in model.parameters()] == [(128, 784), (128,), (64, 128), (64,),
                                                     (10, 64), (10,)]
    assert model.output_shape == (10,)


def test_summary_lists_layers_and_total():
    model = mlp((784, 128, 64, 10), dropout=0.2)
    text = model.summary()
    for item in ("Dense(784, 128)", "ReLU()", "Dropout(0.2)", "Dense(128, 64)",
                 "Dense(64, 10)", "100,480", "8,256", "650", "109,386", "(batch, 128)",
                 "(batch, 10)", "numpy", "float32"):
        assert item in text, item
    assert text.count("Dense(") == 3
    assert "Sequential(Dense(784, 128), ReLU(), Dropout(0.2)" in repr(model)


def test_mlp_layers_and_init():
    model = mlp((4, 5, 5, 2), activation="tanh", dropout=0.3)
    kinds = [type(l).__name__ for l in model.layers]
    assert kinds == ["Dense", "Tanh", "Dropout", "Dense", "Tanh", "Dropout", "Dense"]
    assert {l.init for l in model.layers if isinstance(l, Dense)} == {"xavier_normal"}
    assert {l.init for l in mlp((4, 5, 2)).layers if isinstance(l, Dense)} == {"he_normal"}
    assert [l.name for l in model.layers][:2] == ["0:Dense", "1:Tanh"]
    with pytest.raises(ValueError, match="unknown activation"):
        mlp((4, 2), activation="swish")
    with pytest.raises(ValueError, match="at least"):
        mlp((4,))


def test_architecture_rebuilds_the_model():
    from nnx.spec import layer_from_spec

    model = Sequential([Flatten(), Dense(12, 5, init="he_uniform"), Tanh(), Dropout(0.25),
                        Dense(5, 2, bias=False), nnx.LeakyReLU(0.3), nnx.Reshape((2, 1))],
                       input_shape=(3, 4))
    spec = model.architecture()
    assert spec[1] == {"type": "Dense", "in_features": 12, "out_features": 5,
                       "init": "he_uniform", "bias": True}
    rebuilt = Sequential([layer_from_spec(s) for s in spec], input_shape=(3, 4))
    assert rebuilt.architecture() == spec
    assert rebuilt.num_parameters() == model.num_parameters() == 12 * 5 + 5 + 5 * 2
    with pytest.raises(ValueError, match="unknown layer type 'Nope'"):
        layer_from_spec({"type": "Nope"})


# --- state dicts ----------------------------------------------------------------------------
def test_state_dict_round_trip(backend):
    x = backend.from_numpy(data()[0])
    a = mlp((6, 5, 3), backend=backend, dtype="float64", seed=0)
    b = mlp((6, 5, 3), backend=backend, dtype="float64", seed=1)
    assert not np.allclose(host(backend, a(x)), host(backend, b(x)))
    state = a.state_dict()
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert all(isinstance(v, np.ndarray) for v in state.values())
    b.load_state_dict(state)
    np.testing.assert_array_equal(host(backend, b(x)), host(backend, a(x)))
    assert all(p.value.dtype == backend.float64 for p in b.parameters())


def test_state_dict_is_a_snapshot(backend):
    """Training after state_dict()/load_state_dict() must change neither the saved dict nor
    another model loaded from it."""
    x_np, y_np = data()
    x, y = backend.from_numpy(x_np), backend.from_numpy(y_np)
    a = mlp((6, 5, 3), backend=backend, dtype="float64", seed=0)
    b = mlp((6, 5, 3), backend=backend, dtype="float64", seed=1)
    state = a.state_dict()
    saved = {k: v.copy() for k, v in state.items()}
    b.load_state_dict(state)
    step(a, x, y, SoftmaxCrossEntropy())
    for p in a.parameters():
        p.value -= 1.0 * p.grad
    for k in saved:
        np.testing.assert_array_equal(state[k], saved[k])
        np.testing.assert_array_equal(host(backend, b.named_parameters()[k].value), saved[k])
    a.load_state_dict(state)
    np.testing.assert_array_equal(host(backend, a(x)), host(backend, b(x)))


def test_load_state_dict_rejects_wrong_names_and_shapes():
    model = mlp((6, 5, 3))
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"missing \['2.bias'\]"):
        model.load_state_dict({k: v for k, v in state.items() if k != "2.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['9.weight'\]"):
        model.load_state_dict({**state, "9.weight": np.zeros((1, 1))})
    with pytest.raises(ValueError, match=r"0.weight: checkpoint shape \(5, 7\) != model shape \(5, 6\)"):
        model.load_state_dict({**state, "0.weight": np.zeros((5, 7))})
    # a refused load leaves the model untouched
    after = model.state_dict()
    for k in state:
        np.testing.assert_array_equal(after[k], state[k])


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_state_dict_loads_into_torch_sequential():
    import torch

    model = mlp((6, 8, 5, 3), backend=get_backend("numpy"), dtype="float64", seed=3)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5),
                              torch.nn.ReLU(), torch.nn.Linear(5, 3)).double()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    x_np = data(n=7)[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x_np)).numpy()
    np.testing.assert_allclose(model(x_np), ref, rtol=1e-12, atol=1e-12)
    # and back: torch's weights loaded into nnx give torch's outputs
    other = mlp((6, 8, 5, 3), dtype="float64", seed=99)
    other.load_state_dict({k: v.detach().numpy() for k, v in net.state_dict().items()})
    np.testing.assert_allclose(other(x_np), ref, rtol=1e-12, atol=1e-12)


# --- errors ---------------------------------------------------------------------------------
def test_wrong_input_shape_names_expected_and_actual(backend):
    model = mlp((6, 5, 3), backend=backend, dtype="float64")
    with pytest.raises(nnx.ShapeError) as info:
        model(backend.from_numpy(np.ones((4, 7))))
    msg = str(info.value)
    assert "(batch, 6)" in msg and "(4, 7)" in msg
    # a layer called directly names itself
    with pytest.raises(nnx.ShapeError) as info:
        model.layers[2].forward(backend.from_numpy(np.ones((4, 4))))
    msg = str(info.value)
    assert "2:Dense" in msg and "(batch, 5)" in msg and "(4, 4)" in msg


def test_mismatched_layer_sizes_fail_at_construction():
    with pytest.raises(nnx.ShapeError) as info:
        Sequential([Dense(6, 5), ReLU(), Dense(4, 3)], input_shape=(6,))
    msg = str(info.value)
    assert "2:Dense" in msg and "4 input features" in msg and "(5,)" in msg
    with pytest.raises(nnx.ShapeError, match="0:Dense"):
        Sequential([Dense(6, 5)], input_shape=(7,))


def test_loss_shape_errors():
    model = mlp((6, 3), dtype="float64")
    out = model(data()[0])
    with pytest.raises(nnx.ShapeError, match="8 logits rows but 5 labels"):
        SoftmaxCrossEntropy().forward(out, np.zeros(5, dtype=np.int64))
    with pytest.raises(nnx.ShapeError, match=r"target shape \(8, 4\)"):
        SoftmaxCrossEntropy().forward(out, np.zeros((8, 4)))
    with pytest.raises(nnx.ShapeError, match="MSE"):
        MSE().forward(out, np.zeros((8, 2)))


def test_layers_cannot_be_shared_between_models():
    layer = Dense(3, 2)
    Sequential([layer], input_shape=(3,))
    with pytest.raises(ValueError, match="already belongs to a model"):
        Sequential([layer], input_shape=(3,))
    with pytest.raises(TypeError, match="not an nnx Layer"):
        Sequential([lambda x: x], input_shape=(3,))


def test_skip_random_replays_exactly_the_training_draws(backend):
    """Skipping k steps draws what k training forward passes draw, nested blocks included:
    the next step's dropout masks (hence outputs) are identical (resume mid-epoch relies on it)."""
    def build():
        layers = [Dense(6, 8), Dropout(0.3), nnx.Residual([Dense(8, 8), Dropout(0.5)]), Dense(8, 3)]
        return Sequential(layers, input_shape=(6,), backend=backend, dtype="float32", seed=3)

    x = backend.from_numpy(np.random.default_rng(0).standard_normal((5, 6)), dtype=backend.float32)
    stepped, skipped = build(), build()
    for m in (stepped, skipped):
        m.rng.reseed(11)
    for _ in range(3):
        stepped.forward(x, train=True)
    skipped.skip_steps(3, 5)
    a = backend.to_numpy(stepped.forward(x, train=True))
    b = backend.to_numpy(skipped.forward(x, train=True))
    np.testing.assert_array_equal(a, b)
    fresh = build()
    fresh.rng.reseed(11)  # without the replay the masks differ
    assert not np.array_equal(backend.to_numpy(fresh.forward(x, train=True)), a)


def test_a_random_layer_without_skip_random_warns():
    """A custom layer that draws from the model's stream but cannot replay it would make a
    mid-epoch resume silently inexact: skipping says so."""
    from nnx.layers.base import LAYER_TYPES

    class Noisy(ReLU):
        rng = None

    LAYER_TYPES.pop("Noisy")  # a throwaway class: keep the registry as it was
    m = Sequential([Dense(3, 3), Noisy()], input_shape=(3,), backend=nnx.get_backend("numpy"))
    with pytest.warns(RuntimeWarning, match="Noisy .* skip_random"):
        m.skip_steps(1, 4)
    plain = Sequential([Dense(3, 3), ReLU(), Dropout(0.5)], input_shape=(3,),
                       backend=nnx.get_backend("numpy"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.skip_steps(2, 4)  # Dropout replays, ReLU draws nothing: no warning
