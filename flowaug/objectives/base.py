"""The objective protocol, its evaluation context and weighted sums.

An objective term maps a cloud of moving points ``z`` (N, D) to a value and to its *Wasserstein
gradient*: the per-point vector ``N * grad_{z_i} F`` (the N turns the gradient of the empirical loss
into the velocity field of the flow). Terms are evaluated against a prepared reference side held in a
:class:`Context`; everything that depends on the reference alone (norms, scales, the reference's self
term) is computed once and cached there, never per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..backends import PAIR, PairOps, Workspace

__all__ = ["Context", "Evaluation", "Objective", "WeightedSum", "median_distance"]


def median_distance(z: torch.Tensor, max_points: int = 1024) -> float:
    """Median of the pairwise distances among (an evenly strided subset of) the rows of ``z`` (M, D)."""
    m = z.shape[0]
    if m < 2:
        raise ValueError(f"need at least 2 reference points to derive a length scale, got {m}")
    sub = z[:: max(1, m // max_points)][:max_points].double()  # (<= max_points, D)
    d = torch.cdist(sub, sub)  # (P, P)
    iu = torch.triu_indices(sub.shape[0], sub.shape[0], offset=1, device=z.device)
    vals = d[iu[0], iu[1]]
    med = float(vals.median())
    if med <= 0:  # many duplicates: fall back on the mean, then on 1
        med = float(vals.mean()) or 1.0
    return med


@dataclass
class Context:
    """Everything a term needs besides the moving points. Built by :func:`flowaug.flow`.

    Attributes:
        z_ref: (M, D) reference points in the same (augmented) space as the moving points.
        ref_half: (M,) cached ``||z_ref||^2 / 2``.
        backend: ``"tensorized"``, ``"chunked"`` or ``"keops"`` (already resolved).
        feature_dim: d, the number of leading coordinates of ``z`` that are features; the remaining
            ``D - d`` coordinates are the label embedding.
        feature_shape: per-sample shape of the features, e.g. (1, 28, 28), for user callables.
        labels: current source labels (hard (N,) or soft (N, K)), or None.
        cache: dict owned by the prepared reference: terms store reference-only results here
            (resolved scales, self terms) under their own keys; it survives across calls.
        workspace: scratch buffers reused across steps.
        generator: random generator for stochastic terms.
    """

    z_ref: torch.Tensor
    ref_half: torch.Tensor
    backend: str
    feature_dim: int
    feature_shape: tuple = ()
    labels: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)
    workspace: Workspace = field(default_factory=Workspace)
    generator: torch.Generator | None = None
    ref_subset: torch.Tensor | None = None  # indices into the full reference when z_ref is a subset

    def ref_weights_log(self, like: torch.Tensor) -> torch.Tensor:
        """(M,) log-weights of the reference points (uniform)."""
        m = self.z_ref.shape[0]
        return like.new_full((m,), -math.log(m))

    def median_distance(self) -> float:
        """Median pairwise distance between reference points (on at most 1024 of them), cached.

        The data-derived length scale behind ``blur="auto"`` and ``bandwidth="auto"``. The flow engine
        fills it from the full reference before a subset is used, so every batch gets the same scale.
        """
        if "median_distance" not in self.cache:
            self.cache["median_distance"] = median_distance(self.z_ref)
        return self.cache["median_distance"]

    def pair(self, x: torch.Tensor, y: torch.Tensor | None = None, *, x_half=None, tag: str = "xy") -> PairOps:
        """Cost operator between ``x`` and ``y``: the moving points and the reference (``y=None``), the moving
        points with themselves (``y is x``), or the reference with itself (``x is y is z_ref``)."""
        if y is None:
            return PAIR[self.backend](x, self.z_ref, x_half=x_half, y_half=self.ref_half, workspace=self.workspace,
                                      tag=tag)
        return PAIR[self.backend](x, y, x_half=x_half, y_half=x_half if y is x else None, workspace=self.workspace,
                                  tag=tag)


class Evaluation(NamedTuple):
    """What :meth:`Objective.evaluate` returns.

    Attributes:
        value: 0-dim tensor, the objective without its reference-only constant.
        grad: (N, D) Wasserstein gradient ``N * grad_{z_i} F``.
        state: solver state to pass to the next evaluation toward the same reference (warm start), or
            None. Opaque to the engine; each term defines its own type.
        iterations: solver iterations of this evaluation (diagnostics), or None.
    """

    value: torch.Tensor
    grad: torch.Tensor
    state: Any = None
    iterations: Any = None


class Objective:
    """Base class of objective terms. Terms compose: ``Sinkhorn() + 0.1 * MMD()``.

    Subclasses implement :meth:`evaluate` and, when the objective has a term that depends on the
    reference alone, :meth:`constant`, and declare what they need and do with the class attributes
    below (the engine reads only these, never class names). ``evaluate`` is reentrant: everything that
    changes during a flow travels in the returned ``state``, never on ``self``.
    """

    #: the term compares the moving points with a reference (a flow without one is refused)
    needs_reference: bool = False
    #: temperature of the Langevin noise this term adds (only :class:`Entropy` sets it)
    temperature: float = 0.0
    #: True when the term draws random numbers (sliced projections): its value is not monotone
    stochastic: bool = False

    def evaluate(self, z: torch.Tensor, ctx: Context, state: Any = None) -> Evaluation:
        """Value and Wasserstein gradient at the points ``z`` (N, D); ``state`` is what the previous
        evaluation returned (None at a cold start)."""
        raise NotImplementedError

    def constant(self, ctx: Context) -> float:
        """Part of the value that depends on the reference alone (added lazily for reporting)."""
        return 0.0

    def terms(self) -> list[tuple[float, "Objective"]]:
        return [(1.0, self)]

    # composition -----------------------------------------------------------------------------
    def __add__(self, other):
        if not isinstance(other, Objective):
            return NotImplemented
        return WeightedSum(self.terms() + other.terms())

    def __mul__(self, weight):
        from .._checks import check_real

        w = check_real("objective weight", weight, low=0)
        return WeightedSum([(w * v, t) for v, t in self.terms()])

    __rmul__ = __mul__

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))

    # value semantics: two objectives with the same type and settings are equal (configs compare by value)
    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if type(self) is not type(other):
            return False
        try:
            return bool(vars(self) == vars(other))
        except (RuntimeError, ValueError, TypeError):  # attributes without a plain == (tensors): by identity
            return False

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class WeightedSum(Objective):
    """``sum_k w_k F_k``: values and Wasserstein gradients add with their weights."""

    def __init__(self, terms: list[tuple[float, Objective]]):
        self._terms = list(terms)

    def terms(self):
        return list(self._terms)

    @property
    def temperature(self) -> float:  # type: ignore[override]
        return sum(w * t.temperature for w, t in self._terms)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return any(t.stochastic for _, t in self._terms)

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return any(t.needs_reference for _, t in self._terms)

    def evaluate(self, z, ctx, state=None):
        """Weighted sum of the terms' evaluations; ``state`` is the tuple of the terms' states."""
        value = z.new_zeros(())
        grad = torch.zeros_like(z)
        states = list(state) if isinstance(state, tuple) and len(state) == len(self._terms) else [None] * len(self._terms)
        iterations = []
        for i, (w, term) in enumerate(self._terms):
            if w == 0:
                continue
            ev = term.evaluate(z, ctx, states[i])
            value = value + w * ev.value
            grad.add_(ev.grad, alpha=w)
            states[i] = ev.state
            if ev.iterations is not None:
                iterations.append(ev.iterations)
        its = None if not iterations else iterations[0] if len(iterations) == 1 else tuple(iterations)
        return Evaluation(value, grad, tuple(states), its)

    def constant(self, ctx):
        return sum(w * t.constant(ctx) for w, t in self._terms if w != 0)

    def __repr__(self) -> str:
        return " + ".join(f"{w:g} * {t!r}" for w, t in self._terms)
