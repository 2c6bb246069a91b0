"""Optimizers and schedules against closed-form first steps and against torch.optim."""

import numpy as np
import pytest

from nnx.layers import Parameter
from nnx.optim import SGD, Adam, AdamW, Momentum, Nesterov, clip_grad_norm, make_optimizer
from nnx.schedules import make_schedule


def one_param(backend, value, grad, dtype="float64"):
    dt = backend.dtype(dtype)
    p = Parameter("w", backend.from_numpy(np.asarray(value, dtype=np.float64), dtype=dt))
    p.grad = backend.from_numpy(np.asarray(grad, dtype=np.float64), dtype=dt)
    return p


def host(backend, x):
    return backend.to_numpy(x)


def host_arr(backend, values):
    return backend.from_numpy(np.asarray(values, dtype=np.float64), dtype=backend.float64)


W0, G = [1.0, -2.0, 0.5], [0.1, 0.2, -0.4]


def test_sgd_step(backend):
    p = one_param(backend, W0, G)
    SGD([p], lr=0.5).step()
    np.testing.assert_allclose(host(backend, p.value), np.array(W0) - 0.5 * np.array(G))


def test_sgd_l2_weight_decay(backend):
    p = one_param(backend, W0, G)
    SGD([p], lr=0.5, weight_decay=0.1).step()
    w, g = np.array(W0), np.array(G)
    np.testing.assert_allclose(host(backend, p.value), w - 0.5 * (g + 0.1 * w))


def test_momentum_two_steps(backend):
    p = one_param(backend, W0, G)
    opt = Momentum([p], lr=0.1, momentum=0.9)
    opt.step()
    opt.step()  # same gradient twice: v1 = g, v2 = 0.9 g + g
    w, g = np.array(W0), np.array(G)
    np.testing.assert_allclose(host(backend, p.value), w - 0.1 * g - 0.1 * 1.9 * g)


def test_nesterov_first_step(backend):
    p = one_param(backend, W0, G)
    Nesterov([p], lr=0.1, momentum=0.9).step()  # v = g; update = g + 0.9 v = 1.9 g
    np.testing.assert_allclose(host(backend, p.value), np.array(W0) - 0.1 * 1.9 * np.array(G))


def test_adam_first_step_is_lr_times_sign(backend):
    """With bias correction, Adam's first step is lr·g/(|g| + ε) ≈ lr·sign(g)."""
    p = one_param(backend, W0, G)
    Adam([p], lr=0.01).step()
    g = np.array(G)
    np.testing.assert_allclose(host(backend, p.value), np.array(W0) - 0.01 * g / (np.abs(g) + 1e-8),
                               rtol=1e-12)


def test_adamw_decays_weights_decoupled(backend):
    p = one_param(backend, W0, [0.0, 0.0, 0.0])
    AdamW([p], lr=0.1, weight_decay=0.5).step()  # zero gradient: only the decay acts
    np.testing.assert_allclose(host(backend, p.value), np.array(W0) * (1 - 0.1 * 0.5))


def test_clip_grad_norm(backend):
    """torch's convention: scale by min(1, C / (‖g‖ + 1e-6)); the inputs stay as they were."""
    g1, g2 = host_arr(backend, [3.0, 0.0]), host_arr(backend, [4.0])
    c1, c2 = clip_grad_norm([g1, g2], 1.0, backend.xp)
    scale = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(host(backend, c1), [3.0 * scale, 0.0], rtol=1e-12)
    np.testing.assert_allclose(host(backend, c2), [4.0 * scale], rtol=1e-12)
    np.testing.assert_array_equal(host(backend, g1), [3.0, 0.0])
    (small,) = clip_grad_norm([host_arr(backend, [0.5])], 1.0, backend.xp)  # under the limit
    np.testing.assert_array_equal(host(backend, small), [0.5])


def test_float32_stays_float32(backend):
    p = one_param(backend, W0, G, dtype="float32")
    for name in ("sgd", "momentum", "nesterov", "adam", "adamw"):
        make_optimizer(name, [p], lr=0.01, weight_decay=0.01, clip_norm=1.0).step()
        assert p.value.dtype == backend.float32


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_matches_torch_optim_over_steps(name, clip, rng):
    torch = pytest.importorskip("torch")
    w0 = rng.standard_normal((4, 3))
    grads = [rng.standard_normal((4, 3)) for _ in range(5)]
    p = Parameter("w", w0.copy())
    opt = make_optimizer(name, [p], lr=0.05, momentum=0.8, weight_decay=0.01, clip_norm=clip)
    t = torch.tensor(w0.copy(), requires_grad=True)
    kw = {"lr": 0.05, "weight_decay": 0.01}
    topt = {"sgd": lambda: torch.optim.SGD([t], **kw),
            "momentum": lambda: torch.optim.SGD([t], momentum=0.8, **kw),
            "nesterov": lambda: torch.optim.SGD([t], momentum=0.8, nesterov=True, **kw),
            "adam": lambda: torch.optim.Adam([t], **kw),
            "adamw": lambda: torch.optim.AdamW([t], **kw)}[name]()
    for g in grads:
        p.grad = g.copy()
        opt.step()
        t.grad = torch.tensor(g)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([t], clip)
        topt.step()
    np.testing.assert_allclose(p.value, t.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_optimizer_rejects_bad_settings():
    p = Parameter("w", np.zeros(2))
    for bad in (dict(lr=0.0), dict(lr=-1.0), dict(lr=float("nan")), dict(lr=0.1, weight_decay=-1)):
        with pytest.raises(ValueError):
            SGD([p], **bad)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("rmsprop", [p], 0.1)
    with pytest.raises(RuntimeError, match="no gradient"):
        SGD([p], lr=0.1).step()
    with pytest.raises(RuntimeError, match="no gradient"):  # also with clipping on
        SGD([p], lr=0.1, clip_norm=1.0).step()


# --- schedules --------------------------------------------------------------------------
def test_constant_schedule():
    s = make_schedule("constant", 0.1, epochs=3, steps_per_epoch=10)
    assert [s(k) for k in (0, 15, 29)] == [0.1, 0.1, 0.1]


def test_step_schedule_drops_every_n_epochs():
    s = make_schedule("step", 1.0, epochs=9, steps_per_epoch=10, gamma=0.5, every_epochs=3)
    assert s(0) == 1.0 and s(29) == 1.0 and s(30) == 0.5 and s(60) == 0.25


def test_exponential_schedule_per_epoch():
    s = make_schedule("exponential", 1.0, epochs=5, steps_per_epoch=10, gamma=0.9)
    assert s(20) == pytest.approx(0.81) and s(5) == pytest.approx(0.9 ** 0.5)


def test_cosine_with_warmup():
    s = make_schedule("cosine", 1.0, epochs=10, steps_per_epoch=10, warmup_epochs=1)
    assert s(0) == pytest.approx(0.1)         # linear warm-up: (k+1)/10
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)        # cosine starts at the peak
    assert s(55) == pytest.approx(0.5)        # half-way through the decay
    assert s(100) == pytest.approx(0.0, abs=1e-12)
    values = [s(k) for k in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("linear", 0.1, 1, 1)
