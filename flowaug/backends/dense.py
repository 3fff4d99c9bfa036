"""Dense (tensorized) evaluation: the N x M cost matrix is materialised once per flow step.

This is the layout of geomloss's ``backend="tensorized"``, with two changes that measured large on CPU
(``benchmarks/speed.py``):

* scores are clamped at -80 before ``exp``: on x86 CPUs ``exp`` of arguments below about -88 (which
  underflow) runs a slow path, 13x slower at 256 x 4096 (13.5 ms vs 1.0 ms); ``exp(-80) = 1.8e-35`` is
  below float32 resolution relative to the row maximum (which contributes ``exp(0) = 1``), so results
  do not change;
* the cost matrix and the score buffer live in a reusable :class:`Workspace`: a fresh 4 MiB tensor per
  Sinkhorn half-iteration costs page faults that were several milliseconds per call here.
"""

from __future__ import annotations

import torch

__all__ = ["DensePair", "Workspace", "NAME"]

NAME = "tensorized"
_EXP_FLOOR = -80.0
# The cached kernel (see DensePair) and its weights stay clear of float32 denormals, whose arithmetic runs a
# slow path on x86 (a product K_ij * w_j below 1e-38 made each matrix-vector product 10x slower): kernel
# entries are floored at exp(-50), weights exp(h - h0 - max) are >= exp(-_SPAN_LIMIT), so products stay above
# exp(-70). The floor overstates entries below it by at most M exp(-50 + _SPAN_LIMIT) of the row sum, which
# is at least exp(-_SPAN_LIMIT): a relative error below 1e-9 for M up to 10^4.
_SPAN_LIMIT = 20.0  # nats of drift of h from the kernel's h0 before the kernel is rebuilt
_KERNEL_FLOOR = -50.0


class Workspace:
    """Named scratch buffers reused across calls (per flow, never shared between threads)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(name)
        numel = 1
        for s in shape:
            numel *= s
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


def half_sqnorms(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N,) values ||x_i||^2 / 2."""
    return (x * x).sum(1).mul_(0.5)


def cost_into(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, x_half: torch.Tensor, y_half: torch.Tensor,
              diagonal: int | None = None) -> torch.Tensor:
    """``C_ij = ||x_i - y_j||^2 / 2 = x_half_i + y_half_j - <x_i, y_j>`` into ``out`` (n, m), clamped at 0.

    ``diagonal``: the offset of the entries where a point meets itself (x-x problems), set to exactly 0: the
    expansion leaves float32 round-off (~1e-5 ||x||^2) there."""
    torch.addmm(y_half[None, :], x, y.T, beta=1, alpha=-1, out=out)
    out.add_(x_half[:, None]).clamp_(min=0)
    if diagonal is not None:
        out.diagonal(offset=diagonal).fill_(0)
    return out


class DensePair:
    """Cost ``C_ij = ||x_i - y_j||^2 / 2`` between queries ``x`` (N, D) and sources ``y`` (M, D).

    Args:
        x, y: point clouds (no gradient needed: gradients are closed-form, see the objectives).
        x_half, y_half: cached ``||.||^2 / 2`` (reused across calls for the fixed reference).
        workspace: buffers to reuse; ``tag`` distinguishes pairs sharing one workspace.
    """

    name = NAME

    def __init__(self, x, y, *, x_half=None, y_half=None, workspace: Workspace | None = None, tag: str = "xy"):
        self.x, self.y = x, y
        ws = workspace if workspace is not None else Workspace()
        n, m = x.shape[0], y.shape[0]
        self._scores = ws.get(tag + ".scores", (n, m), x)  # (N, M): the row kernel, or scratch for kernels
        self._ws, self._tag = ws, tag  # the column kernel's buffer is taken on first use (x-x pairs never do)
        self._row_kernel = self._col_kernel = None  # (eps, K, h0, m) of the last build
        x_half = half_sqnorms(x) if x_half is None else x_half  # (N,)
        y_half = half_sqnorms(y) if y_half is None else y_half  # (M,)
        self.cost = cost_into(ws.get(tag + ".cost", (n, m), x), x, y, x_half, y_half,
                              diagonal=0 if x is y else None)  # (N, M)

    # ---------------------------------------------------------------- Sinkhorn primitives
    # A Sinkhorn solve calls softmin / softmin_t dozens of times with the same cost and eps and slowly
    # changing h. The log-domain pass costs six sweeps over the N x M scores (add, max, subtract, clamp, exp,
    # sum); instead the pair keeps K_ij = exp(h0_j - C_ij / eps - m_i) for a reference h0 (m_i: the row
    # maximum, so every row of K peaks at 1) and evaluates
    #     sum_j exp(h_j - C_ij / eps) = exp(m_i + s) sum_j K_ij exp(h_j - h0_j - s),   s = max_j (h_j - h0_j),
    # one matrix-vector product. Exact up to round-off while the terms that matter stay representable: the
    # row's dominant term is at least exp(-(span of h - h0)) of the K_ij = 1 term, so while that span stays
    # below _SPAN_LIMIT nats the floor below keeps it exact to ~1e-9; beyond it, K is rebuilt at the new h (one
    # log-domain pass, what every call cost before). Measured: see benchmarks/README.md (overhead).
    def _kernel(self, eps: float, h: torch.Tensor, rows: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(K, h0, m)`` for reductions over columns (``rows=True``: softmin) or over rows (softmin_t)."""
        cache = self._row_kernel if rows else self._col_kernel
        if cache is not None and cache[0] == eps:
            shift = h - cache[2]
            if float(shift.max() - shift.min()) < _SPAN_LIMIT:
                return cache[1], cache[2], cache[3]
        buf = self._scores if rows else self._ws.get(self._tag + ".scores_t", self.cost.shape, self.cost)
        if rows:
            s = torch.add(h[None, :], self.cost, alpha=-1.0 / eps, out=buf)  # (N, M)
            top = s.amax(1, keepdim=True)  # (N, 1)
        else:
            s = torch.add(h[:, None], self.cost, alpha=-1.0 / eps, out=buf)  # (N, M)
            top = s.amax(0, keepdim=True)  # (1, M)
        s.sub_(top).clamp_(min=_KERNEL_FLOOR).exp_()
        entry = (eps, s, h.clone(), top.flatten())
        if rows:
            self._row_kernel = entry
        else:
            self._col_kernel = entry
        return entry[1], entry[2], entry[3]

    def _log_sum(self, eps: float, h: torch.Tensor, rows: bool, values: torch.Tensor | None = None):
        """``log sum exp(h - C / eps)`` along the reduced axis, and the soft average of ``values`` (rows only)."""
        k, h0, top = self._kernel(eps, h, rows)
        shift = h - h0
        s = shift.max()
        w = (shift - s).exp_()  # (M,) or (N,), in (0, 1]
        if rows:
            total = k @ w  # (N,)
            avg = None if values is None else (k @ (w[:, None] * values)).div_(total[:, None])  # (N, k)
        else:
            total, avg = w @ k, None  # (M,)
        return total.log_().add_(top).add_(s), avg

    def softmin(self, eps: float, h: torch.Tensor) -> torch.Tensor:
        """(M,) log-weights + potentials/eps -> (N,) ``-eps log sum_j exp(h_j - C_ij / eps)``."""
        return self._log_sum(eps, h, rows=True)[0].mul_(-eps)

    def softmin_t(self, eps: float, h: torch.Tensor) -> torch.Tensor:
        """(N,) -> (M,) ``-eps log sum_i exp(h_i - C_ij / eps)`` (the transposed C-transform)."""
        return self._log_sum(eps, h, rows=False)[0].mul_(-eps)

    def soft_average(self, eps: float, h: torch.Tensor, values: torch.Tensor):
        """Softmin (N,) and ``sum_j softmax_j(h_j - C_ij / eps) values_j`` (N, k) from the same kernel."""
        lse, avg = self._log_sum(eps, h, rows=True, values=values)
        return lse.mul_(-eps), avg

    # ---------------------------------------------------------------- kernel primitives
    def kernel_terms(self, kernel, w: torch.Tensor):
        """For MMD: with ``k_ij = k(x_i, y_j)`` and ``grad_x k(x_i, y_j) = phi_ij (x_i - y_j)``, returns
        ``sum_j w_j k_ij`` (N,), ``sum_j w_j phi_ij`` (N,) and ``sum_j w_j phi_ij y_j`` (N, D).
        Consumes the pair: its cost matrix and kernels are overwritten."""
        self._row_kernel = self._col_kernel = None
        return kernel.dense_terms(self.cost, self._scores, w, self.y)
