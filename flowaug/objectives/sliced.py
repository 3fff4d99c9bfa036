"""Sliced Wasserstein distance: 1-D optimal transport along random directions.

    SW^2(a, b) = E_theta W2^2(theta # a, theta # b) / 2,

estimated with ``projections`` directions drawn from the flow's generator at every step. In 1-D the
optimal plan matches quantiles: the point of rank ``r`` among N is sent to the reference quantile at level
``(r + 1/2) / N`` (linear interpolation between the M sorted reference projections), exact when N = M.
The Wasserstein gradient of a point is the mean over directions of ``(<x, theta> - target) theta``.
Cost per step: two (N + M) x D x P products and sorts, no N x M matrix, so it scales to any reference.
geomloss has no sliced loss, hence this module.
"""

from __future__ import annotations

import torch

from .._checks import check_int
from .base import Evaluation, Objective

__all__ = ["SlicedWasserstein"]


class SlicedWasserstein(Objective):
    """Monte-Carlo sliced Wasserstein distance to the reference.

    Args:
        projections: number of random directions per step.

    Example:
        >>> import torch, flowaug
        >>> g = torch.Generator().manual_seed(0)
        >>> x, ref = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) + 2
        >>> out = flowaug.flow(x, reference=ref, objective=flowaug.SlicedWasserstein(), steps=20,
        ...                    generator=torch.Generator().manual_seed(1))
        >>> bool((out.x.mean(0) - ref.mean(0)).norm() < 0.2)
        True
    """

    stochastic = True
    needs_reference = True

    def __init__(self, projections: int = 64):
        self.projections = check_int("projections", projections, minimum=1)

    def evaluate(self, z, ctx, state=None):
        n, dim = z.shape
        m = ctx.z_ref.shape[0]
        theta = torch.randn(self.projections, dim, generator=ctx.generator, dtype=z.dtype)  # (P, D)
        theta = (theta / theta.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(z.device)
        xp = z @ theta.T  # (N, P)
        yq = (ctx.z_ref @ theta.T).sort(0).values  # (M, P)
        ranks = xp.argsort(0).argsort(0).to(z.dtype)  # (N, P)
        pos = ((ranks + 0.5) * (m / n) - 0.5).clamp_(0, m - 1)  # (N, P) fractional index into yq
        lo = pos.floor().long()
        hi = (lo + 1).clamp_(max=m - 1)
        frac = pos - lo.to(z.dtype)
        target = yq.gather(0, lo) * (1 - frac) + yq.gather(0, hi) * frac  # (N, P)
        diff = xp - target  # (N, P)
        value = 0.5 * (diff * diff).mean()
        grad = diff @ theta / self.projections  # (N, D)
        return Evaluation(value, grad)
