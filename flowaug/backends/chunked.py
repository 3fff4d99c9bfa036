"""Chunked (online) dense evaluation: the N x M cost is streamed in row blocks, never materialised.

Why it exists: the dense backend (:mod:`.dense`) holds the N x M cost and score matrices, 2 N M x 4 bytes in
float32 (64 GiB at N = M = 65,536), and refuses what does not fit; KeOps needs memory linear in N + M but
was 13-100x slower than dense on this project's CPU (one MMD step at N = M = 65,536, d = 64: 1,171 s). This
backend does dense's arithmetic (the same ``torch.addmm`` expansion of the cost, clamped at 0, the same -80
floor before ``exp``) on blocks of rows of ``x``, so its memory is one block's cost and score buffers
(64-256 rows, :data:`BLOCK_ROWS`, fewer where ``FLOWAUG_CHUNK_BYTES``, default :data:`DEFAULT_CHUNK_BYTES`, would
be exceeded) plus O((N + M) D), at matmul speed. Measured
figures are in :mod:`flowaug.backends` and ``benchmarks/README.md``.

What is streamed:

* ``softmin`` and ``soft_average`` reduce over the columns (the ``y`` side) of each row: every block gives
  its rows' results exactly as dense does;
* ``softmin_t`` reduces over the rows: an online log-sum-exp per column, a running maximum and a sum of
  ``exp`` rescaled whenever the maximum grows;
* ``kernel_terms`` calls each kernel's own ``dense_terms`` on each block (the kernels are not rewritten).

Unlike a :class:`~.dense.DensePair`, a pair holds no N x M state between calls (each call recomputes the
block costs, one ``addmm`` per block), so every chunked pair of a flow shares the same two block buffers
of the workspace: the x-y and x-x problems of a step together stay within one block budget.
"""

from __future__ import annotations

import os

import torch

from .._checks import check_int
from .dense import _EXP_FLOOR, Workspace, cost_into, half_sqnorms

__all__ = ["BLOCK_ROWS", "ChunkedPair", "DEFAULT_CHUNK_BYTES", "NAME", "chunk_bytes", "chunk_rows"]

NAME = "chunked"
#: upper bound on one block's cost + score buffers (``FLOWAUG_CHUNK_BYTES`` overrides)
DEFAULT_CHUNK_BYTES = 256 * 2**20
#: rows per block when the budget allows more: about 2^20 scores per block, between 64 and 256 rows. Measured
#: (one thread, Gaussian kernel terms): at N = 2048, M = 65,536, d = 64, 32-64 rows were the fastest (0.75 s;
#: 128 rows 0.80 s, 512 rows 0.92 s, 8 rows 1.22 s: small blocks re-read y too often, large ones leave the
#: cache); at N = M = 1024, d = 64, 128-256 rows (4.4 ms; 64 rows 6.4 ms, dense 4.6 ms); at N = M = 4096,
#: 256 rows (78 ms; dense 121 ms).
BLOCK_ROWS = (64, 256)
BLOCK_SCORES = 2**20
_BUFFERS = ("chunked.cost", "chunked.scores")  # shared by every chunked pair of a workspace (see above)


def chunk_bytes() -> int:
    """The block budget in bytes: ``FLOWAUG_CHUNK_BYTES`` if set (a positive number), else the default."""
    raw = os.environ.get("FLOWAUG_CHUNK_BYTES")
    if raw is None or raw == "":
        return DEFAULT_CHUNK_BYTES
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 1 or value == float("inf"):
        raise ValueError(f"FLOWAUG_CHUNK_BYTES must be a positive number of bytes, got {raw!r}")
    return int(value)


def chunk_rows(n: int, m: int, itemsize: int = 4, budget: int | None = None) -> int:
    """Rows per block: ``BLOCK_SCORES / m`` within :data:`BLOCK_ROWS`, fewer where the block's cost and score
    buffers, ``2 * rows * m * itemsize`` bytes, would exceed ``budget`` (default :func:`chunk_bytes`); at least 1
    and at most ``n``."""
    budget = chunk_bytes() if budget is None else check_int("budget", budget, minimum=1)
    m = max(m, 1)
    want = min(max(BLOCK_SCORES // m, BLOCK_ROWS[0]), BLOCK_ROWS[1])
    return max(1, min(max(n, 1), want, budget // (2 * m * itemsize)))


class ChunkedPair:
    """Cost ``C_ij = ||x_i - y_j||^2 / 2`` between ``x`` (N, D) and ``y`` (M, D), in row blocks of ``x``.

    Same methods and results as :class:`~.dense.DensePair` (up to float round-off in the order of sums).

    Args:
        x, y: point clouds (no gradient needed: gradients are closed-form, see the objectives).
        x_half, y_half: cached ``||.||^2 / 2``.
        workspace: holds the two block buffers (shared by all chunked pairs of the workspace).
        block_rows: rows per block; default from the byte budget (:func:`chunk_rows`).
    """

    name = NAME

    def __init__(self, x, y, *, x_half=None, y_half=None, workspace: Workspace | None = None, tag: str = "xy",
                 block_rows: int | None = None, **_ignored):
        self.x, self.y = x, y  # (N, D), (M, D)
        self._self = x is y  # the x-x / y-y problems: the cost diagonal is exactly 0
        n, m = x.shape[0], y.shape[0]
        if block_rows is None:
            block_rows = chunk_rows(n, m, x.element_size())
        self.block = min(check_int("block_rows", block_rows, minimum=1), max(n, 1))
        self._x_half = half_sqnorms(x) if x_half is None else x_half  # (N,)
        self._y_half = half_sqnorms(y) if y_half is None else y_half  # (M,)
        ws = workspace if workspace is not None else Workspace()
        self._cost_buf = ws.get(_BUFFERS[0], (self.block, m), x)  # (B, M)
        self._score_buf = ws.get(_BUFFERS[1], (self.block, m), x)  # (B, M)

    # ---------------------------------------------------------------- blocks
    def _blocks(self):
        """Yields ``(rows, cost)`` per block: a slice of x's rows and its (b, M) cost, computed as dense does.
        The cost buffer is reused: consume it before asking for the next block."""
        n = self.x.shape[0]
        for r0 in range(0, n, self.block):
            rows = slice(r0, min(r0 + self.block, n))
            # x-x: the diagonal runs through this block at column offset r0
            cost = cost_into(self._cost_buf[: rows.stop - r0], self.x[rows], self.y, self._x_half[rows],
                             self._y_half, diagonal=r0 if self._self else None)  # (b, M)
            yield rows, cost

    def _scores_rows(self, eps: float, h: torch.Tensor, cost: torch.Tensor):
        """Block scores ``h_j - C_ij / eps`` shifted by the row maximum and clamped; returns (S, max)."""
        s = torch.add(h[None, :], cost, alpha=-1.0 / eps, out=self._score_buf[: cost.shape[0]])  # (b, M)
        top = s.amax(1, keepdim=True)  # (b, 1)
        s.sub_(top).clamp_(min=_EXP_FLOOR)
        return s, top.squeeze(1)

    # ---------------------------------------------------------------- Sinkhorn primitives
    def softmin(self, eps: float, h: torch.Tensor) -> torch.Tensor:
        """(M,) log-weights + potentials/eps -> (N,) ``-eps log sum_j exp(h_j - C_ij / eps)``."""
        out = h.new_empty(self.x.shape[0])  # (N,)
        for rows, cost in self._blocks():
            s, top = self._scores_rows(eps, h, cost)
            torch.add(s.exp_().sum(1).log_(), top, out=out[rows])
        return out.mul_(-eps)

    def softmin_t(self, eps: float, h: torch.Tensor) -> torch.Tensor:
        """(N,) -> (M,) ``-eps log sum_i exp(h_i - C_ij / eps)``: an online log-sum-exp over row blocks."""
        top = total = None  # (M,) running column maximum and sum of exp(s - top)
        for rows, cost in self._blocks():
            s = torch.add(h[rows, None], cost, alpha=-1.0 / eps, out=self._score_buf[: cost.shape[0]])  # (b, M)
            block_top = s.amax(0)  # (M,)
            if top is None:
                top = block_top
                s.sub_(top[None, :]).clamp_(min=_EXP_FLOOR)
                total = s.exp_().sum(0)
                continue
            new_top = torch.maximum(top, block_top)
            # the sum so far was relative to the old maximum: rescale it (same floor: a factor below e^-80 only
            # scales terms that are already negligible against the new maximum's exp(0) = 1)
            total.mul_(top.sub_(new_top).clamp_(min=_EXP_FLOOR).exp_())
            top = new_top
            s.sub_(top[None, :]).clamp_(min=_EXP_FLOOR)
            total.add_(s.exp_().sum(0))
        return (total.log_() + top).mul_(-eps)

    def soft_average(self, eps: float, h: torch.Tensor, values: torch.Tensor):
        """Softmin (N,) and ``sum_j softmax_j(h_j - C_ij / eps) values_j`` (N, k) from one pass per block."""
        n = self.x.shape[0]
        f = h.new_empty(n)  # (N,)
        avg = values.new_empty(n, values.shape[1])  # (N, k)
        for rows, cost in self._blocks():
            s, top = self._scores_rows(eps, h, cost)
            s.exp_()
            total = s.sum(1)  # (b,)
            torch.mm(s, values, out=avg[rows]).div_(total[:, None])
            torch.add(total.log_(), top, out=f[rows])
        return f.mul_(-eps), avg

    # ---------------------------------------------------------------- kernel primitives
    def kernel_terms(self, kernel, w: torch.Tensor):
        """Same contract as :meth:`DensePair.kernel_terms`: ``sum_j w_j k_ij`` (N,), ``sum_j w_j phi_ij`` (N,)
        and ``sum_j w_j phi_ij y_j`` (N, D), from the kernel's ``dense_terms`` on each row block."""
        n = self.x.shape[0]
        ksum, phisum = w.new_empty(n), w.new_empty(n)  # (N,), (N,)
        phiy = self.y.new_empty(n, self.y.shape[1])  # (N, D)
        for rows, cost in self._blocks():
            k, p, py = kernel.dense_terms(cost, self._score_buf[: cost.shape[0]], w, self.y)
            ksum[rows], phisum[rows], phiy[rows] = k, p, py
        return ksum, phisum, phiy
