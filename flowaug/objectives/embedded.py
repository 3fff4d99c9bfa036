"""Ground costs in an embedding: any objective measured between ``phi(x)`` and ``phi(y)``.

    F(x) = G(phi_# rho_x, phi_# rho_ref),      N grad_{x_i} F = J_phi(x_i)^T [N grad_{u_i} G](phi(x_i))

``G`` is any objective (Sinkhorn divergence, MMD with any kernel, class-wise or label-aware through the
engine) evaluated on the embedded points ``u = phi(x)``; its Wasserstein gradient in the embedding is
pulled back to the moving points by one vector-Jacobian product (autograd), so only the points that move
are differentiated, never the reference. The label coordinates of a label-aware flow (``z = [x; lambda
e_y]``) are passed through unchanged: the cost becomes ``||phi(x) - phi(x')||^2 + lambda^2 W2^2(y, y')``.

``phi`` is one of

* a fixed map (a frozen ``nn.Module`` in eval mode, or any callable on ``(N, *sample_shape)`` batches):
  the reference is embedded once per reference (and sample) and kept in the reference's cache;
* a ``factory``: a fresh random network drawn at every evaluation (distribution matching's trick, Zhao &
  Bilen 2023), seeded from the flow's generator so that flows repeat exactly. The reference is embedded
  anew each time (on ``reference_size`` points), the objective is stochastic (the guard does not read a
  rise as divergence) and solver warm starts are not carried (another network is another cost).

Scales: ``blur="auto"`` and ``bandwidth="auto"`` are measured in the embedding, on the embedded reference
points an evaluation sees (a class's points in a class-wise flow), label coordinates excluded.

geomloss's ``SamplesLoss`` accepts a custom cost but needs the embedded points as its inputs and returns
gradients with respect to them; the pull-back through ``phi`` and the caching per reference are what this
module adds.

Example:
    >>> import torch, flowaug
    >>> g = torch.Generator().manual_seed(0)
    >>> x, ref = torch.randn(64, 3, generator=g), torch.randn(80, 3, generator=g) + 2
    >>> phi = torch.nn.Linear(3, 2)  # any differentiable map
    >>> obj = flowaug.Embedded(flowaug.MMD("linear"), phi)
    >>> out = flowaug.flow(x, reference=ref, objective=obj, steps=20, step_size=0.5)
    >>> bool(out.objective[-1] < 0.05 * out.objective[0])
    True
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from .base import Context, Evaluation, Objective, median_distance

__all__ = ["Embedded"]


def _subset_key(index: torch.Tensor | None) -> str | None:
    """A stable key of a reference subset (class-wise groups and samples are embedded separately)."""
    if index is None:
        return None
    return hashlib.blake2b(index.detach().cpu().numpy().tobytes(), digest_size=8).hexdigest()


class Embedded(Objective):
    """``objective`` measured in an embedding ``phi`` (see the module docstring).

    Args:
        objective: the objective in the embedding (e.g. ``Sinkhorn()``, ``MMD("gaussian")``,
            ``MMD("linear")``: mean embedding matching), a name, or a sum of terms.
        phi: a fixed embedding: an ``nn.Module`` (used as it is: put it in eval mode) or a callable mapping
            ``(N, *sample_shape)`` to ``(N, ...)``. Its output is flattened per sample.
        factory: instead of ``phi``, a callable with no arguments returning a fresh embedding; it is called
            at every evaluation under a seed drawn from the flow's generator (so torch's default
            initialisation of a new network is reproducible).
        reference_size: reference points drawn per evaluation (None: all); with a factory, the number of
            real points embedded per step (per class in class-wise flows).
    """

    needs_reference = True

    def __init__(self, objective, phi: Callable | None = None, *, factory: Callable[[], Callable] | None = None,
                 reference_size: int | None = None):
        from . import as_objective
        from .._checks import check_int

        if (phi is None) == (factory is None):
            raise ValueError("Embedded needs exactly one of phi (a fixed embedding) and factory (a fresh one per "
                             f"evaluation), got phi={phi!r} and factory={factory!r}")
        for name, fn in (("phi", phi), ("factory", factory)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable (an nn.Module or a function), got {type(fn).__name__}")
        self.objective = as_objective(objective)
        self.phi, self.factory = phi, factory
        self.reference_size = None if reference_size is None else check_int("reference_size", reference_size,
                                                                             minimum=2)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.factory is not None or self.reference_size is not None or self.objective.stochastic

    @property
    def temperature(self) -> float:  # type: ignore[override]
        return self.objective.temperature

    # ------------------------------------------------------------------ embedding
    @staticmethod
    def _apply(phi, x: torch.Tensor) -> torch.Tensor:
        """``phi(x)`` flattened to (N, E), computed in phi's parameter dtype and returned in x's."""
        params = next(iter(phi.parameters()), None) if isinstance(phi, torch.nn.Module) else None
        inner = x if params is None or not params.is_floating_point() else x.to(params.dtype)
        u = phi(inner)
        if not isinstance(u, torch.Tensor) or u.shape[0] != x.shape[0]:
            raise ValueError(f"phi must map a batch of {x.shape[0]} samples to a tensor with {x.shape[0]} rows, "
                             f"got {type(u).__name__ if not isinstance(u, torch.Tensor) else tuple(u.shape)}")
        return u.reshape(x.shape[0], -1).to(x.dtype)

    def _draw(self, ctx: Context):
        """The embedding of this evaluation, and the reference rows it sees (None: all)."""
        gen = ctx.generator
        index = None
        m = ctx.z_ref.shape[0]
        if self.reference_size is not None and self.reference_size < m:
            index = torch.randperm(m, generator=gen)[: self.reference_size].to(ctx.z_ref.device)
        if self.factory is None:
            return self.phi, index
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        devices = [ctx.z_ref.device] if ctx.z_ref.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.factory(), index

    def _reference(self, phi, index, ctx: Context) -> tuple[torch.Tensor, dict]:
        """Embedded reference (M', E + r) and the cache dict of the embedded problem."""
        d = ctx.feature_dim
        rows = ctx.z_ref if index is None else ctx.z_ref[index]
        fixed = self.factory is None and index is None
        key = ("embedded", id(phi), _subset_key(ctx.ref_subset))
        entry = ctx.cache.get(key) if fixed else None
        if entry is None or entry["phi"] is not phi:
            feats = rows[:, :d].reshape(rows.shape[0], *ctx.feature_shape)
            with torch.no_grad():
                u = torch.cat([self._apply(phi, feats), rows[:, d:]], 1)  # (M', E + r)
            # the data-derived scale ("auto" blur / bandwidth): median distance of the embedded features the
            # evaluation sees (label coordinates excluded, as in pixel space; a class's points when class-wise)
            entry = {"phi": phi, "u": u, "cache": {"median_distance": median_distance(u[:, : u.shape[1] - rows.shape[1] + d])}}
            if fixed:
                ctx.cache[key] = entry
        return entry["u"], entry["cache"]

    # ------------------------------------------------------------------ objective
    def evaluate(self, z, ctx, state=None):
        n, d = z.shape[0], ctx.feature_dim
        phi, index = self._draw(ctx)
        u_ref, cache = self._reference(phi, index, ctx)
        with torch.enable_grad():
            x = z[:, :d].detach().reshape(n, *ctx.feature_shape).requires_grad_(True)
            u = self._apply(phi, x)  # (N, E)
            e = u.shape[1]
            inner = self._inner_context(ctx, u_ref, cache)
            if inner.feature_dim != e:
                raise ValueError(f"phi embeds the batch in {e} dimensions but the reference in {inner.feature_dim}")
            carried = state if self.factory is None and index is None else None
            ev = self.objective.evaluate(torch.cat([u.detach(), z[:, d:]], 1), inner, carried)
            (gx,) = torch.autograd.grad(u, x, grad_outputs=ev.grad[:, :e].to(u.dtype))
        grad = torch.cat([gx.reshape(n, d).to(z.dtype), ev.grad[:, e:]], 1)  # (N, D)
        return Evaluation(ev.value.detach(), grad, ev.state, ev.iterations)

    def constant(self, ctx):
        """The reference-only part of the value in the embedding (fixed ``phi`` and the whole reference: the
        objective's own constant; with a fresh embedding per evaluation there is no single constant: 0)."""
        if self.factory is not None or self.reference_size is not None:
            return 0.0
        u_ref, cache = self._reference(self.phi, None, ctx)
        return self.objective.constant(self._inner_context(ctx, u_ref, cache))

    @staticmethod
    def _inner_context(ctx: Context, u_ref: torch.Tensor, cache: dict) -> Context:
        """The embedded problem's context: the embedded reference ``u_ref`` (M', E + r), whose last r coordinates
        are the label part passed through, with the outer flow's backend, labels, workspace and generator."""
        e = u_ref.shape[1] - (ctx.z_ref.shape[1] - ctx.feature_dim)
        return Context(z_ref=u_ref, ref_half=(u_ref * u_ref).sum(1).mul_(0.5), backend=ctx.backend,
                       feature_dim=e, feature_shape=(e,), labels=ctx.labels, cache=cache,
                       workspace=ctx.workspace, generator=ctx.generator)

    def extra_repr(self) -> str:
        what = f"phi={type(self.phi).__name__}" if self.factory is None else \
            f"factory={getattr(self.factory, '__qualname__', type(self.factory).__name__)}"
        return f"{self.objective!r}, {what}, reference_size={self.reference_size}"
