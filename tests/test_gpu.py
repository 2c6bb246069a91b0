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
