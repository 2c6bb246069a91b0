"""nnx.gradcheck on whole models, and gradcheck itself: it must catch wrong backward passes,
refuse float32, leave the model untouched, and behave like a central difference (O(eps^2))."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from nnx import (MSE, Dense, Dropout, Flatten, LeakyReLU, ReLU, Reshape, Sequential, Sigmoid,
                 Softmax, SoftmaxCrossEntropy, Tanh, get_backend, gradcheck, mlp)

TOL = 1e-6
HAS_TORCH = importlib.util.find_spec("torch") is not None


def f64(backend, a):
    return backend.from_numpy(np.asarray(a), dtype=backend.float64)


def batch(n=4, d=5, classes=3, seed=0):
    g = np.random.default_rng(seed)
    t = g.random((n, classes))
    return g.standard_normal((n, d)), g.integers(0, classes, size=n), t / t.sum(axis=1, keepdims=True)


def assert_small(errors, tol=TOL):
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


# --- whole models on every backend ----------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid"])
def test_mlp_with_cross_entropy_labels(backend, activation):
    model = mlp((5, 6, 4, 3), activation=activation, backend=backend, dtype="float64", seed=1)
    x, y, _ = batch()
    errors = gradcheck(model, f64(backend, x), backend.from_numpy(y))
    assert set(errors) == {"input", "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert_small(errors)


def test_mlp_with_cross_entropy_probability_targets(backend):
    model = mlp((5, 6, 3), activation="tanh", backend=backend, dtype="float64", seed=2)
    x, _, t = batch()
    assert_small(gradcheck(model, f64(backend, x), f64(backend, t), loss=SoftmaxCrossEntropy()))


def test_mlp_with_mse(backend):
    model = mlp((5, 6, 3), activation="tanh", backend=backend, dtype="float64", seed=3)
    x, _, t = batch()
    assert_small(gradcheck(model, f64(backend, x), f64(backend, t), loss=MSE()))


def test_mlp_with_dropout_in_train_mode(backend):
    model = mlp((5, 8, 3), backend=backend, dtype="float64", dropout=0.5, seed=4)
    x, y, _ = batch()
    errors = gradcheck(model, f64(backend, x), backend.from_numpy(y), train=True, seed=3)
    assert_small(errors)
    # the re-seeded mask does drop units, so this is not the eval-mode check in disguise
    model.rng.reseed(3)
    h = backend.to_numpy(model.layers[2].forward(model.layers[1].forward(
        model.layers[0].forward(f64(backend, x)), True), True))
    assert 0 < (h == 0).sum()


def test_shape_layers_and_softmax_output_with_mse(backend):
    model = Sequential([Flatten(), Dense(6, 5), Sigmoid(), Dense(5, 4), LeakyReLU(0.2),
                        Reshape((2, 2)), Flatten(), Softmax()],
                       input_shape=(2, 3), backend=backend, dtype="float64", seed=5)
    g = np.random.default_rng(5)
    x = g.standard_normal((3, 2, 3))
    t = g.random((3, 4))
    assert_small(gradcheck(model, f64(backend, x), f64(backend, t), loss=MSE()))


def test_model_without_loss_uses_random_projection(backend):
    model = Sequential([Dense(4, 3), Tanh(), Dense(3, 2), ReLU()], input_shape=(4,),
                       backend=backend, dtype="float64", seed=6)
    x, _, _ = batch(n=3, d=4)
    assert_small(gradcheck(model, f64(backend, x)))


# --- gradcheck catches wrong backward passes ------------------------------------------------
class _DenseTwiceGrad(Dense):
    """Every gradient doubled."""

    def backward(self, grad, input_grad=True):
        return super().backward(grad * 2.0)


class _DenseForgotTranspose(Dense):
    """dW computed as xᵀ g (shape (in, out)) instead of gᵀ x; square layers hide the shape bug."""

    def backward(self, grad, input_grad=True):
        x = self.x  # (backward lets go of it)
        dx = super().backward(grad)
        self.weight.grad = x.T @ grad
        return dx


class _DenseInputGradTransposed(Dense):
    """dx = g Wᵀ instead of g W (again only square layers run at all)."""

    def backward(self, grad, input_grad=True):
        super().backward(grad)
        return grad @ self.weight.value.T


class _DenseMeanBias(Dense):
    """db = mean over the batch instead of the sum."""

    def backward(self, grad, input_grad=True):
        dx = super().backward(grad)
        self.bias.grad = self.xp.mean(grad, axis=0)
        return dx


class _SigmoidMissingFactor(Sigmoid):
    """f' = y instead of y(1 - y)."""

    def backward(self, grad, input_grad=True):
        return grad * self.y


@pytest.mark.parametrize("broken,wrong", [
    (_DenseTwiceGrad, {"input", "0.weight", "0.bias"}),
    (_DenseForgotTranspose, {"0.weight"}),
    (_DenseInputGradTransposed, {"input"}),
    (_DenseMeanBias, {"0.bias"}),
])
def test_detects_broken_dense(broken, wrong):
    b = get_backend("numpy")
    model = Sequential([broken(4, 4), Tanh(), Dense(4, 3)], input_shape=(4,), backend=b,
                       dtype="float64", seed=0)
    x, y, _ = batch(n=5, d=4)
    errors = gradcheck(model, x, y)
    for name, err in errors.items():
        if name in wrong:
            assert err > 1e-3, f"{name}: broken gradient passed with error {err:.2e}"
        else:
            assert err < TOL, f"{name}: correct gradient failed with error {err:.2e}"


def test_detects_broken_activation_on_every_backend(backend):
    model = Sequential([Dense(4, 3), _SigmoidMissingFactor()], input_shape=(4,),
                       backend=backend, dtype="float64", seed=0)
    x, _, _ = batch(n=3, d=4)
    errors = gradcheck(model, f64(backend, x))
    assert errors["input"] > 1e-3 and errors["0.weight"] > 1e-3


def test_detects_dropout_backward_ignoring_the_mask():
    class _DropoutNoMask(Dropout):
        def backward(self, grad, input_grad=True):
            return grad

    b = get_backend("numpy")
    model = Sequential([Dense(4, 6), _DropoutNoMask(0.5), Dense(6, 3)], input_shape=(4,),
                       backend=b, dtype="float64", seed=0)
    x, y, _ = batch(n=4, d=4)
    errors = gradcheck(model, x, y, train=True)
    assert errors["input"] > 1e-3 and errors["0.weight"] > 1e-3
    assert errors["2.weight"] < TOL  # layers above the bug are still right


# --- gradcheck's own contract ---------------------------------------------------------------
def test_rejects_float32_input(backend):
    model = mlp((5, 3), backend=backend, dtype="float64")
    x = backend.from_numpy(batch()[0], dtype=backend.float32)
    with pytest.raises(TypeError, match="float64"):
        gradcheck(model, x)


def test_rejects_float32_model(backend):
    model = mlp((5, 3), backend=backend, dtype="float32")
    with pytest.raises(TypeError, match="float64"):
        gradcheck(model, f64(backend, batch()[0]))


def test_leaves_parameters_and_input_untouched(backend):
    model = mlp((5, 4, 3), backend=backend, dtype="float64", seed=8)
    before = model.state_dict()
    x_np, y_np, _ = batch()
    x = f64(backend, x_np)
    gradcheck(model, x, backend.from_numpy(y_np))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    np.testing.assert_array_equal(backend.to_numpy(x), x_np)


def test_analytic_grads_stay_on_the_parameters():
    """After gradcheck each Parameter.grad holds the analytic gradient, checked here against
    the closed form of the last layer: dW = gᵀh with g = (softmax(z) − Y)/n."""
    model = mlp((5, 4, 3), dtype="float64", seed=8)
    x, y, _ = batch()
    gradcheck(model, x, y)
    w0, b0 = model.layers[0].weight.value, model.layers[0].bias.value
    w1, b1 = model.layers[2].weight.value, model.layers[2].bias.value
    h = np.maximum(x @ w0.T + b0, 0.0)
    z = h @ w1.T + b1
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = (p - np.eye(3)[y]) / len(y)
    np.testing.assert_allclose(model.layers[2].weight.grad, g.T @ h, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(model.layers[2].bias.grad, g.sum(axis=0), rtol=1e-10, atol=1e-14)
    assert all(layer.retain is False for layer in model.walk())  # gradcheck cleans up


def test_central_difference_error_is_second_order():
    """Truncation error shrinks 100x when eps shrinks 10x; tiny eps is ruined by rounding."""
    model = mlp((3, 4, 2), activation="tanh", dtype="float64", seed=9)
    x, y, _ = batch(n=3, d=3, classes=2)
    err = {eps: max(gradcheck(model, x, y, eps=eps).values()) for eps in (1e-2, 1e-3, 1e-6, 1e-12)}
    ratio = err[1e-2] / err[1e-3]
    assert 30 < ratio < 300, f"error ratio {ratio:.1f} for a 10x smaller eps (expected ~100)"
    assert err[1e-6] < TOL
    assert err[1e-12] > 10 * err[1e-6]  # rounding: the right arm of the V


def test_a_parameter_whose_gradient_is_zero_is_not_flagged_and_running_stats_stay(backend):
    """A bias before batch norm has a zero gradient (the normalisation removes any constant):
    its difference quotients are rounding noise, and the check measures them against the
    model's gradient scale, not against zero. The training forwards of the check leave
    BatchNorm's running statistics as they were."""
    from nnx.layers import BatchNorm

    model = Sequential([Dense(5, 4), BatchNorm(4), Tanh(), Dense(4, 3)], input_shape=(5,),
                       backend=backend, dtype="float64", seed=2)
    g = np.random.default_rng(2)
    x, y = f64(backend, g.standard_normal((6, 5))), backend.from_numpy(g.integers(0, 3, 6))
    before = {k: backend.to_numpy(v).copy() for k, v in model.named_buffers().items()}
    errors = gradcheck(model, x, y, train=True)
    assert max(errors.values()) < 1e-6, errors
    for k, v in model.named_buffers().items():
        np.testing.assert_array_equal(backend.to_numpy(v), before[k], err_msg=k)


def test_gradcheck_refuses_what_it_cannot_check():
    import nnx

    b = nnx.get_backend("numpy")
    model = nnx.mlp([3, 2], backend=b, dtype="float64", seed=0)
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="at least one value"):
        gradcheck(model, np.ones((0, 3)))
    with pytest.raises(ValueError, match="eps must be"):
        gradcheck(model, x, eps=0.0)
    with pytest.raises(TypeError, match="built model or layer"):
        gradcheck(Dense(3, 2), x)
