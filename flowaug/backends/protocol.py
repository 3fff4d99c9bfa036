"""What a backend pair offers: the operators every objective is written against.

A pair is built for two point clouds, queries ``x`` (N, D) and sources ``y`` (M, D), with the cost
``C_ij = ||x_i - y_j||^2 / 2``; objectives never see how (or whether) the N x M cost is stored. Dense
(:mod:`.dense`), chunked (:mod:`.chunked`) and KeOps (:mod:`.keops`) pairs implement it; ``Context.pair``
builds the one the flow selected.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["PairOps"]


@runtime_checkable
class PairOps(Protocol):
    """The reductions of the cost between ``x`` (N, D) and ``y`` (M, D)."""

    name: str

    def softmin(self, eps: float, h: torch.Tensor) -> torch.Tensor:
        """(M,) -> (N,) ``-eps log sum_j exp(h_j - C_ij / eps)``."""
        ...

    def softmin_t(self, eps: float, h: torch.Tensor) -> torch.Tensor:
        """(N,) -> (M,) ``-eps log sum_i exp(h_i - C_ij / eps)``."""
        ...

    def soft_average(self, eps: float, h: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmin (N,) and the softmax-weighted average of ``values`` (M, k) per row, (N, k)."""
        ...

    def kernel_terms(self, kernel, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sum_j w_j k_ij`` (N,), ``sum_j w_j phi_ij`` (N,), ``sum_j w_j phi_ij y_j`` (N, D) for a kernel with
        ``grad_x k(x, y) = phi(x, y) (x - y)``."""
        ...
