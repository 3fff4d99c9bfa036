"""The chunked backend: agreement with dense (primitives, values, moved points), its memory bound, its choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowaug
from flowaug import MMD, Sinkhorn, backends
from flowaug.backends import ChunkedPair, DensePair, Workspace, chunk_rows
from flowaug.backends.chunked import BLOCK_ROWS, DEFAULT_CHUNK_BYTES
from flowaug.objectives.mmd import _Energy, _Gaussian, _Laplacian

from .conftest import blobs

TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
KERNELS = [_Gaussian(1.3), _Laplacian(0.7), _Energy()]


def clouds(n, m, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    y = (torch.randn(m, d, generator=g, dtype=torch.float64) + 1).to(dtype)
    return x, y, g


def close(a, b, dtype):
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= TOL[dtype] * scale


# ------------------------------------------------------------------------------------------ primitives
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("self_pair", [False, True], ids=["x-y", "x-x"])
@pytest.mark.parametrize("block", [1, 4, 7, 100], ids=lambda b: f"rows{b}")
def test_sinkhorn_primitives_match_dense(dtype, self_pair, block):
    """37 rows in blocks of 4 or 7: several blocks and a ragged last one; 1 row per block; one block."""
    x, y, g = clouds(37, 23, 5, dtype)
    if self_pair:
        y = x
    dense, chunked = DensePair(x, y), ChunkedPair(x, y, block_rows=block)
    h_y = torch.randn(y.shape[0], generator=g, dtype=torch.float64).to(dtype)
    h_x = torch.randn(x.shape[0], generator=g, dtype=torch.float64).to(dtype)
    for eps in (0.01, 0.3, 5.0):  # 0.01: most scores hit the -80 floor
        assert close(chunked.softmin(eps, h_y), dense.softmin(eps, h_y), dtype)
        assert close(chunked.softmin_t(eps, h_x), dense.softmin_t(eps, h_x), dtype)
        f_c, avg_c = chunked.soft_average(eps, h_y, y)
        f_d, avg_d = dense.soft_average(eps, h_y, y)
        assert close(f_c, f_d, dtype) and close(avg_c, avg_d, dtype)


def test_softmin_t_online_rescaling_when_the_maximum_moves_late():
    """Column maxima in the last block, far above the first blocks' (the running sum must be rescaled)."""
    x, y, _ = clouds(30, 11, 3, torch.float64)
    h = torch.linspace(-200.0, 50.0, 30, dtype=torch.float64)  # the largest scores come last
    dense, chunked = DensePair(x, y), ChunkedPair(x, y, block_rows=4)
    assert close(chunked.softmin_t(0.5, h), dense.softmin_t(0.5, h), torch.float64)
    assert close(chunked.softmin_t(0.5, h.flip(0)), dense.softmin_t(0.5, h.flip(0)), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("self_pair", [False, True], ids=["x-y", "x-x"])
def test_kernel_terms_match_dense(dtype, kernel, self_pair):
    x, y, g = clouds(37, 23, 5, dtype, seed=1)
    if self_pair:  # r = 0 on the diagonal: the Laplacian and energy gradients must treat it as 0
        y = x
    w = torch.rand(y.shape[0], generator=g, dtype=torch.float64).to(dtype)
    got = ChunkedPair(x, y, block_rows=5).kernel_terms(kernel, w)
    want = DensePair(x, y).kernel_terms(kernel, w)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.isfinite(a).all() and close(a, b, dtype)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 30), d=st.integers(1, 6), block=st.integers(1, 45),
       eps=st.floats(0.05, 10.0), seed=st.integers(0, 2**16))
def test_any_shape_and_block_matches_dense(n, m, d, block, eps, seed):
    x, y, g = clouds(n, m, d, torch.float64, seed)
    h_y, h_x = torch.randn(m, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    dense, chunked = DensePair(x, y), ChunkedPair(x, y, block_rows=block)
    assert close(chunked.softmin(eps, h_y), dense.softmin(eps, h_y), torch.float64)
    assert close(chunked.softmin_t(eps, h_x), dense.softmin_t(eps, h_x), torch.float64)
    k = _Gaussian(eps)
    for a, b in zip(ChunkedPair(x, y, block_rows=block).kernel_terms(k, h_y.exp()), dense.kernel_terms(k, h_y.exp())):
        assert close(a, b, torch.float64)


def test_bad_block_rows_and_budget_are_named(monkeypatch):
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="block_rows"):
        ChunkedPair(x, x, block_rows=0)
    with pytest.raises(TypeError, match="block_rows"):
        ChunkedPair(x, x, block_rows=2.5)
    for bad in ("-1", "lots", "inf", "0"):
        monkeypatch.setenv("FLOWAUG_CHUNK_BYTES", bad)
        with pytest.raises(ValueError, match="FLOWAUG_CHUNK_BYTES"):
            ChunkedPair(x, x)


# ------------------------------------------------------------------------------------------ memory bound
@pytest.mark.parametrize("m", [10, 1000, 65536, 10**6, 10**8])
@pytest.mark.parametrize("budget", [1, 4096, 2**20, DEFAULT_CHUNK_BYTES])
@pytest.mark.parametrize("itemsize", [4, 8])
def test_block_rows_respect_the_budget(m, budget, itemsize):
    rows = chunk_rows(50_000, m, itemsize, budget)
    assert 1 <= rows <= BLOCK_ROWS[1]
    if rows > 1:  # one row is the floor even when a row alone exceeds the budget
        assert 2 * rows * m * itemsize <= budget


def test_workspace_holds_two_shared_blocks_within_the_budget(monkeypatch):
    """x-y and x-x pairs (what a Sinkhorn or MMD step builds) share two (rows, M) buffers, within the budget."""
    monkeypatch.setenv("FLOWAUG_CHUNK_BYTES", str(2 * 8 * 300 * 4))  # 8 rows of 300 columns, float32
    x, y, _ = clouds(100, 300, 3, torch.float32)
    ws = Workspace()
    for a, b, tag in ((x, y, "xy"), (x, x, "xx"), (y, y, "yy")):
        pair = ChunkedPair(a, b, workspace=ws, tag=tag)
        assert pair.block == chunk_rows(a.shape[0], b.shape[0], 4)
        pair.softmin(1.0, torch.zeros(b.shape[0]))
        pair.kernel_terms(_Gaussian(1.0), torch.ones(b.shape[0]))
    assert len(ws._buffers) == 2
    assert sum(buf.numel() * buf.element_size() for buf in ws._buffers.values()) <= 2 * 8 * 300 * 4


PEAK_PROBE = """
import json, resource, sys, torch, flowaug
torch.set_num_threads(1)
n, backend = int(sys.argv[1]), sys.argv[2]
g = torch.Generator().manual_seed(0)
x, y = torch.rand(n, 8, generator=g), torch.rand(n, 8, generator=g) + 0.1
flowaug.flow(x[:64], reference=y[:64], objective=flowaug.MMD(), steps=1, backend=backend)  # warm the allocator
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = flowaug.flow(x, reference=y, objective=flowaug.MMD(), steps=1, backend=backend, track_objective=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mb": (peak - base) / 1024, "backend": out.backend, "finite": bool(out.x.isfinite().all())}))
"""


def peak_extra_mb(n, backend, env):
    res = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(n), backend], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_peak_memory_of_a_step_is_bounded_by_the_block_budget():
    """N = M = 6,000: dense buffers of 2 x (N M + N N) x 4 bytes = 549 MiB; the chunked step with a 16 MiB
    budget stays within a small multiple of the budget (plus O((N + M) D) vectors); dense is far above it."""
    n = 6_000
    chunked = peak_extra_mb(n, "chunked", {"FLOWAUG_CHUNK_BYTES": str(16 * 2**20)})
    assert chunked["backend"] == "chunked" and chunked["finite"]
    assert chunked["extra_mb"] < 64, chunked
    dense = peak_extra_mb(n, "tensorized", {})
    assert dense["extra_mb"] > 10 * max(chunked["extra_mb"], 16), (dense, chunked)


# ------------------------------------------------------------------------------------------ whole flows
@pytest.mark.parametrize("objective", [Sinkhorn(blur=0.7, tol=1e-4), MMD("gaussian"), MMD("laplacian"), MMD("energy")],
                         ids=["sinkhorn", "gaussian", "laplacian", "energy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flow_on_chunked_matches_dense(objective, dtype, monkeypatch):
    monkeypatch.setenv("FLOWAUG_CHUNK_BYTES", str(2 * 7 * 90 * 8))  # 7 rows: 9 blocks for 60 points, ragged
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 3, generator=g), torch.randn(90, 3, generator=g) + 1
    runs = {b: flowaug.flow(x, reference=y, objective=objective, steps=3, step_size=0.5, backend=b, dtype=dtype)
            for b in ("chunked", "tensorized")}
    c, d = runs["chunked"], runs["tensorized"]
    assert c.backend == "chunked" and d.backend == "tensorized"
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert float((c.x - d.x).norm() / d.x.norm()) < tol
    assert c.objective == pytest.approx(d.objective, rel=tol, abs=tol)


def test_labelled_flow_on_chunked_matches_dense():
    x, y = blobs(40, [[0.0, 0.0], [4.0, 0.0]], seed=1)
    rx, ry = blobs(40, [[0.0, 3.0], [4.0, 3.0]], seed=2)
    a = flowaug.flow(x, y, (rx, ry), steps=3, backend="chunked", objective=Sinkhorn(blur=0.7, tol=1e-4))
    b = flowaug.flow(x, y, (rx, ry), steps=3, backend="tensorized", objective=Sinkhorn(blur=0.7, tol=1e-4))
    assert a.backend == "chunked"
    assert float((a.x - b.x).norm() / b.x.norm()) < 1e-4
    assert torch.equal(a.labels, b.labels)


# ------------------------------------------------------------------------------------------ choice
class TestSelect:
    cpu = torch.device("cpu")

    def test_auto_is_dense_when_it_fits_and_chunked_when_not(self, monkeypatch):
        assert backends.select("auto", self.cpu, 256, 4096, 784) == "tensorized"
        monkeypatch.setenv("FLOWAUG_MEMORY_LIMIT", str(10 * 2**20))
        assert backends.select("auto", self.cpu, 4096, 4096, 64) == "chunked"
        x = torch.zeros(4096, 2)
        assert flowaug.flow(x, reference=x + 1, steps=1, objective=MMD()).backend == "chunked"

    def test_explicit_chunked_is_honoured_even_when_dense_fits(self):
        assert backends.select("chunked", self.cpu, 8, 8, 2) == "chunked"

    def test_dense_refusal_names_chunked_and_keops(self, monkeypatch):
        monkeypatch.setenv("FLOWAUG_MEMORY_LIMIT", str(10 * 2**20))
        with pytest.raises(backends.DenseMemoryError, match="backend='chunked'") as info:
            backends.select("tensorized", self.cpu, 4096, 4096, 64)
        assert "backend='keops'" in str(info.value)

    def test_keops_unavailable_falls_back_to_chunked_when_dense_does_not_fit(self, monkeypatch):
        monkeypatch.setitem(backends._keops_state, "ok", False)
        monkeypatch.setenv("FLOWAUG_MEMORY_LIMIT", str(10 * 2**20))
        assert backends.select("keops", self.cpu, 4096, 4096, 64) == "chunked"
        assert backends.select("keops", self.cpu, 16, 16, 64) == "tensorized"

    def test_cuda_rule_prefers_chunked_to_refusing(self, monkeypatch):
        cuda = torch.device("cuda")
        monkeypatch.setenv("FLOWAUG_MEMORY_LIMIT", str(10 * 2**20))
        monkeypatch.setitem(backends._keops_state, "ok", False)
        assert backends.select("auto", cuda, 4096, 4096, 64) == "chunked"
        monkeypatch.setitem(backends._keops_state, "ok", True)
        assert backends.select("auto", cuda, 4096, 4096, 64) == "keops"
        assert backends.select("auto", cuda, 16, 16, 64) == "tensorized"
