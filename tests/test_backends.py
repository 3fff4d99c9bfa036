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


class TestDenseKernelCache:
    """DensePair reuses exp(h0 - C / eps) across calls while h drifts less than its span limit; every call must
    still equal the log-domain reduction, whatever the drift (small: cached; large: rebuilt)."""

    @staticmethod
    def reference(cost, eps, h, dim):
        scores = h[None, :] - cost / eps if dim == 1 else h[:, None] - cost / eps
        return -eps * torch.logsumexp(scores.double(), dim=dim)

    @pytest.mark.parametrize("drift", [0.0, 0.5, 5.0, 80.0])
    def test_softmins_equal_the_log_domain_along_a_drift(self, drift):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(50, 3, generator=g), torch.randn(70, 3, generator=g) * 2
        pair = backends.DensePair(x, y)
        eps = 0.3
        hy, hx = torch.randn(70, generator=g), torch.randn(50, generator=g)
        for step in range(6):  # h moves a little each call, as along Sinkhorn iterations
            hy_t = hy + drift * step * torch.linspace(-1, 1, 70)
            hx_t = hx + drift * step * torch.linspace(1, -1, 50)
            assert torch.allclose(pair.softmin(eps, hy_t).double(), self.reference(pair.cost, eps, hy_t, 1),
                                  rtol=1e-4, atol=1e-4)
            assert torch.allclose(pair.softmin_t(eps, hx_t).double(), self.reference(pair.cost, eps, hx_t, 0),
                                  rtol=1e-4, atol=1e-4)
            f, avg = pair.soft_average(eps, hy_t, y)
            weights = torch.softmax((hy_t[None, :] - pair.cost / eps).double(), dim=1)
            assert torch.allclose(avg.double(), weights @ y.double(), atol=1e-4)
            assert torch.allclose(f.double(), self.reference(pair.cost, eps, hy_t, 1), rtol=1e-4, atol=1e-4)

    def test_kernel_is_reused_while_h_drifts_little_and_rebuilt_beyond(self):
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(20, 2, generator=g), torch.randn(30, 2, generator=g)
        pair = backends.DensePair(x, y)
        h = torch.zeros(30)
        pair.softmin(0.5, h)
        first = pair._row_kernel[2]
        pair.softmin(0.5, h + 0.1 * torch.arange(30.0) / 30)
        assert pair._row_kernel[2] is first  # reused
        pair.softmin(0.5, h + 100 * torch.arange(30.0) / 30)
        assert pair._row_kernel[2] is not first  # rebuilt at the new h
        pair.softmin(0.25, h)
        assert pair._row_kernel[0] == 0.25  # another eps: rebuilt


@pytest.mark.parametrize("name", ["tensorized", "chunked"])
def test_pairs_offer_the_declared_operators(name):
    """Every backend pair implements the PairOps protocol the objectives are written against."""
    x, y = torch.rand(5, 3), torch.rand(7, 3)
    pair = backends.PAIR[name](x, y)
    assert isinstance(pair, backends.PairOps) and pair.name == name
    assert all(callable(getattr(backends.KeOpsPair, op)) for op in ("softmin", "softmin_t", "soft_average",
                                                                    "kernel_terms"))
