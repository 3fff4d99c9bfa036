"""Potential, interaction and entropy terms of the free energy (Ambrosio, Gigli & Savare; Santambrogio).

    F(rho) = int V d rho + 1/2 int int W(z, z') d rho d rho + T int rho log rho

* ``Potential(V)``: ``V`` maps (N, D) points to (N,) energies; Wasserstein gradient ``grad V(z_i)``.
* ``Interaction(W)``: ``W`` maps two broadcastable point sets (N, 1, D), (1, N, D) to (N, N) energies;
  Wasserstein gradient ``sum_k a_k grad_1 W(z_i, z_k)`` (for symmetric ``W``).
* ``Entropy(T)``: the entropy's Wasserstein gradient is ``T grad log rho``, which has no particle
  estimate; its flow is simulated exactly by Langevin noise ``sqrt(2 tau T) xi`` added to the features at
  every step (its value is not tracked, so the per-step objective excludes it).

Potential and interaction gradients come from autograd, enabled locally (flows work under
``torch.no_grad()``).
"""

from __future__ import annotations

from typing import Callable

import torch

from .._checks import check_real
from .base import Evaluation, Objective

__all__ = ["Entropy", "Interaction", "Potential"]


def _require_callable(name, fn):
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    return fn


def _finite_or_raise(name, value, grad):
    if not bool(torch.isfinite(value)) or not bool(torch.isfinite(grad).all()):
        raise FloatingPointError(f"{name} returned a non-finite value or gradient")


class Potential(Objective):
    """Potential energy ``mean_i V(z_i)``.

    Example:
        >>> import torch, flowaug
        >>> x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
        >>> pull = flowaug.Potential(lambda z: 0.5 * (z - 3).square().sum(1))  # toward (3, 3)
        >>> out = flowaug.flow(x, objective=pull, steps=30, step_size=0.2)
        >>> bool((out.x.mean(0) - 3).abs().max() < 0.01)
        True
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = _require_callable("fn", fn)

    def evaluate(self, z, ctx, state=None):
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            energies = self.fn(zz)
            if energies.shape != (z.shape[0],):
                raise ValueError(f"Potential fn must return shape ({z.shape[0]},), got {tuple(energies.shape)}")
            (grad,) = torch.autograd.grad(energies.sum(), zz)
        value = energies.detach().mean()
        _finite_or_raise("Potential fn", value, grad)
        return Evaluation(value, grad)


class Interaction(Objective):
    """Interaction energy ``1/2 mean_{i,k} W(z_i, z_k)`` (``W`` symmetric)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn = _require_callable("fn", fn)

    def evaluate(self, z, ctx, state=None):
        n = z.shape[0]
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            pairwise = self.fn(zz[:, None, :], zz[None, :, :])
            if pairwise.shape != (n, n):
                raise ValueError(f"Interaction fn must return shape ({n}, {n}), got {tuple(pairwise.shape)}")
            value = 0.5 * pairwise.mean()
            (grad,) = torch.autograd.grad(value, zz)
        grad = grad * n
        _finite_or_raise("Interaction fn", value, grad)
        return Evaluation(value.detach(), grad)


class Entropy(Objective):
    """Entropy at temperature ``T``: Langevin noise of variance ``2 tau T`` per step on the features."""

    def __init__(self, temperature: float):
        self.temperature = check_real("temperature", temperature, low=0)

    def evaluate(self, z, ctx, state=None):
        return Evaluation(z.new_zeros(()), torch.zeros_like(z))
