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
        self._scores = ws.get(tag + ".scores", (n, m), x)  # (N, M)
        cost = ws.get(tag + ".cost", (n, m), x)  # (N, M)
        x_half = half_sqnorms(x) if x_half is None else x_half  # (N,)
        y_half = half_sqnorms(y) if y_half is None else y_half  # (M,)
        torch.addmm(y_half[None, :], x, y.T, beta=1, alpha=-1, out=cost)
        cost.add_(x_half[:, None]).clamp_(min=0)
        if x is y:  # the expansion leaves float32 round-off (~1e-5 ||x||^2) where it must be exactly 0
            cost.fill_diagonal_(0)
        self.cost = cost  # (N, M)

    # ---------------------------------------------------------------- Sinkhorn primitives
    def _scores_rows(self, eps: float, h: torch.Tensor) -> torch.Tensor:
        """S_ij = h_j - C_ij / eps, shifted by the row maximum and clamped; returns (S, max)."""
        s = torch.add(h[None, :], self.cost, alpha=-1.0 / eps, out=self._scores)  # (N, M)
        top = s.amax(1, keepdim=True)  # (N, 1)
        s.sub_(top).clamp_(min=_EXP_FLOOR)
        return s, top.squeeze(1)

    def softmin(self, eps: float, h: torch.Tensor) -> torch.Tensor:
        """(M,) log-weights + potentials/eps -> (N,) ``-eps log sum_j exp(h_j - C_ij / eps)``."""
        s, top = self._scores_rows(eps, h)
        return (s.exp_().sum(1).log_() + top).mul_(-eps)

    def softmin_t(self, eps: float, h: torch.Tensor) -> torch.Tensor:
        """(N,) -> (M,) ``-eps log sum_i exp(h_i - C_ij / eps)`` (the transposed C-transform)."""
        s = torch.add(h[:, None], self.cost, alpha=-1.0 / eps, out=self._scores)  # (N, M)
        top = s.amax(0, keepdim=True)  # (1, M)
        s.sub_(top).clamp_(min=_EXP_FLOOR)
        return (s.exp_().sum(0).log_() + top.squeeze(0)).mul_(-eps)

    def soft_average(self, eps: float, h: torch.Tensor, values: torch.Tensor):
        """Softmin (N,) and ``sum_j softmax_j(h_j - C_ij / eps) values_j`` (N, k) from one pass."""
        s, top = self._scores_rows(eps, h)
        s.exp_()
        total = s.sum(1)  # (N,)
        avg = (s @ values).div_(total[:, None])  # (N, k)
        return (total.log() + top).mul_(-eps), avg

    # ---------------------------------------------------------------- kernel primitives
    def kernel_terms(self, kernel, w: torch.Tensor):
        """For MMD: with ``k_ij = k(x_i, y_j)`` and ``grad_x k(x_i, y_j) = phi_ij (x_i - y_j)``, returns
        ``sum_j w_j k_ij`` (N,), ``sum_j w_j phi_ij`` (N,) and ``sum_j w_j phi_ij y_j`` (N, D).
        Consumes the pair: its cost matrix is overwritten."""
        return kernel.dense_terms(self.cost, self._scores, w, self.y)
