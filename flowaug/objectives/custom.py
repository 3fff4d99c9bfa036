"""A user objective on (features, labels), differentiated by autograd.

``Custom(fn)`` calls ``fn(x, y)`` with the moving features in their sample shape, (N, *shape), and the
current labels (hard (N,), soft (N, K), or None), and expects a scalar. Typical use: steer a flow with a
frozen classifier, ``Custom(lambda x, y: F.cross_entropy(model(x), y))`` (the flow then lowers that
loss). The Wasserstein gradient is ``N * grad_x fn``; label coordinates get no gradient.
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import Objective
from .energies import _require_callable, feature_gradient

__all__ = ["Custom"]


class Custom(Objective):
    """Any differentiable scalar ``fn(x, y)`` of the features (and labels) of the moving points.

    Example:
        >>> import torch, flowaug
        >>> x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
        >>> norm = flowaug.Custom(lambda x, y: x.square().sum(1).mean() / 2)
        >>> out = flowaug.flow(x, objective=norm, steps=10, step_size=0.5)
        >>> bool(out.x.norm() < 0.01 * x.norm())
        True
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]):
        self.fn = _require_callable("fn", fn)

    def evaluate(self, z, ctx, state=None):
        def scalar(x):
            value = self.fn(x, ctx.labels)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ValueError(f"Custom fn must return a scalar tensor, got {type(value).__name__}")
            return value.reshape(())

        return feature_gradient(z, ctx, scalar, "Custom fn")

