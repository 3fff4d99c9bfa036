"""Backends: dense and KeOps agree; auto choice, memory refusal, fallback."""

from __future__ import annotations

import pytest
import torch

import flowaug
from flowaug import MMD, Sinkhorn, backends
from flowaug.objectives import Context

from .conftest import blobs


def step(objective, backend, x, y):
    ctx = Context(z_ref=y, ref_half=(y * y).sum(1) / 2, backend=backend, feature_dim=x.shape[1])
    value, grad = objective.evaluate(x, ctx)[:2]
    return float(value), x - 0.5 * grad


@pytest.mark.keops
@pytest.mark.parametrize("objective", [Sinkhorn(blur=0.7, tol=1e-4), MMD("gaussian"), MMD("laplacian"), MMD("energy")],
                         ids=["sinkhorn", "gaussian", "laplacian", "energy"])
def test_keops_and_dense_give_the_same_step(objective):
    if not backends.keops_available():
        pytest.skip("pykeops cannot compile here")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 3, generator=g), torch.randn(80, 3, generator=g) + 1
    vk, xk = step(objective, "keops", x, y)
    vd, xd = step(objective, "tensorized", x, y)
    assert (xk - xd).norm() / xd.norm() < 1e-4
    assert vk == pytest.approx(vd, rel=1e-4)


@pytest.mark.keops
def test_keops_flow_end_to_end_with_labels():
    if not backends.keops_available():
        pytest.skip("pykeops cannot compile here")
    x, y = blobs(40, [[0.0, 0.0], [4.0, 0.0]], seed=1)
    rx, ry = blobs(40, [[0.0, 3.0], [4.0, 3.0]], seed=2)
    a = flowaug.flow(x, y, (rx, ry), steps=3, backend="keops", objective=Sinkhorn(blur=0.7, tol=1e-4))
    b = flowaug.flow(x, y, (rx, ry), steps=3, backend="tensorized", objective=Sinkhorn(blur=0.7, tol=1e-4))
    assert a.backend == "keops" and b.backend == "tensorized"
    assert (a.x - b.x).norm() / b.x.norm() < 1e-4


class TestSelect:
    def test_auto_is_dense_on_cpu_when_it_fits(self):
        assert backends.select("auto", torch.device("cpu"), 256, 4096, 784) == "tensorized"

    def test_dense_refuses_what_does_not_fit_and_names_keops(self, monkeypatch):
        monkeypatch.setenv("FLOWAUG_MEMORY_LIMIT", str(10 * 2**20))  # 10 MiB
        with pytest.raises(backends.DenseMemoryError, match="backend='keops'"):
            backends.select("tensorized", torch.device("cpu"), 4096, 4096, 64)
        x = torch.zeros(4096, 2)
        with pytest.raises(MemoryError, match="keops"):
            flowaug.flow(x, reference=x + 1, steps=1, backend="tensorized")

    def test_unknown_backend_is_named(self):
        with pytest.raises(ValueError, match="backend must be one of"):
            flowaug.flow(torch.zeros(3, 2), reference=torch.ones(3, 2), backend="cuda")
