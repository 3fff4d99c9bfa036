"""Potential, interaction and entropy terms of the free energy (Ambrosio, Gigli & Savare; Santambrogio).

    F(rho) = int V d rho + 1/2 int int W(z, z') d rho d rho + T int rho log rho

* ``Potential(V)``: ``V`` maps (N, D) points to (N,) energies; Wasserstein gradient ``grad V(z_i)``.
* ``LabelPotential(V)``: a potential that sees each particle's label, ``V(x, y)`` on the features in their
  sample shape and the current labels; ``ClassifierPotential(model)`` is ``V(x, y) = CE(model(x), y)``, the
  free energy ``D(rho, target) + lambda int CE(f(x), y) d rho`` of classifier-guided flows (GGF, Zhuang et
  al. 2024; IDM's cross-entropy term in dataset condensation).
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

from .._checks import check_real, describe
from .base import Evaluation, Objective

__all__ = ["ClassifierPotential", "Entropy", "Interaction", "LabelPotential", "Potential"]


def _require_callable(name, fn):
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    return fn


def _finite_or_raise(name, value, grad):
    if not bool(torch.isfinite(value)) or not bool(torch.isfinite(grad).all()):
        raise FloatingPointError(f"{name} returned a non-finite value or gradient")


def feature_gradient(z: torch.Tensor, ctx, scalar, name: str) -> Evaluation:
    """Value and Wasserstein gradient of ``scalar(x)``, a differentiable mean over the particles of their features
    ``x`` (N, *feature_shape): ``N * grad_x scalar`` on the feature coordinates, none on the label coordinates.
    The one autograd path of :class:`Custom` and the label-conditional potentials."""
    n, d = z.shape[0], ctx.feature_dim
    with torch.enable_grad():
        x = z[:, :d].detach().reshape(n, *ctx.feature_shape).requires_grad_(True)  # (N, *shape)
        value = scalar(x)  # ()
        (gx,) = torch.autograd.grad(value, x)
    grad = torch.zeros_like(z)  # (N, D)
    grad[:, :d] = gx.reshape(n, d) * n
    value = value.detach().to(z.dtype)
    _finite_or_raise(name, value, grad)
    return Evaluation(value, grad)


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


class LabelPotential(Objective):
    """Label-conditional potential energy ``mean_i V(x_i, y_i)``: ``fn(x, y)`` maps the features in their
    sample shape (N, *shape) and the current labels (hard (N,) or soft (N, K)) to (N,) energies.

    Its Wasserstein gradient is ``grad_x V(x_i, y_i)`` on the features; label coordinates get none. It needs
    labels (a flow given ``y``); in a class-wise flow it is evaluated once on the whole batch with every
    particle's own label, so class-wise and joint flows see the same term.

    Example:
        >>> import torch, flowaug
        >>> x, y = torch.zeros(4, 1), torch.tensor([0, 0, 1, 1])
        >>> pull = flowaug.LabelPotential(lambda x, y: (x[:, 0] - 2.0 * y).square() / 2)  # class k toward 2k
        >>> flowaug.flow(x, y, objective=pull, steps=40, step_size=0.2).x[:, 0].round().tolist()
        [0.0, 0.0, 2.0, 2.0]
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn = _require_callable("fn", fn)

    def energies(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,) energies of the particles ``x`` (N, *shape) with labels ``y``."""
        return self.fn(x, y)

    def evaluate(self, z, ctx, state=None):
        if ctx.labels is None:
            raise ValueError(f"{type(self).__name__} needs each particle's label: pass y to the flow (got none)")
        name = type(self).__name__

        def mean_energy(x):
            energies = self.energies(x, ctx.labels)
            if not isinstance(energies, torch.Tensor) or energies.shape != (x.shape[0],):
                raise ValueError(f"{name} fn must return shape ({x.shape[0]},), got {describe(energies)}")
            return energies.mean()

        return feature_gradient(z, ctx, mean_energy, f"{name} fn")


class ClassifierPotential(LabelPotential):
    """``V(x, y) = CE(model(x), y)``: the cross-entropy of a fixed classifier at each particle's label.

    Added to a distribution term it keeps particles inside their class while they move (GGF's classifier
    potential). ``model`` is evaluated in eval mode (its mode is restored after) and is never trained: only
    the particles receive gradients, and no ``.grad`` of its parameters is written. Hard or soft labels.
    """

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module classifier, got {describe(model)}")
        self.model = model

    def energies(self, x, y):
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(x.to(next(self.model.parameters(), x).dtype))  # (N, K)
        finally:
            self.model.train(was_training)
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(f"ClassifierPotential model must return (N, K) logits with K >= 2, got "
                             f"{describe(logits)}")
        return torch.nn.functional.cross_entropy(logits, y if y.dim() == 1 else y.to(logits.dtype), reduction="none")

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.model is other.model

    __hash__ = Objective.__hash__

    def extra_repr(self) -> str:
        return type(self.model).__name__


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
