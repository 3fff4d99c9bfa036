"""Paths between two feature sets: the domains a gradual walk trains through (:mod:`flowaug.gradual`).

A path function takes the features of two consecutive domains and the times ``t`` in (0, 1) at which to place
generated domains, and returns a :class:`Path`: one tensor per time, and for every particle the row of
``x_from`` it started from. Three kinds, one walk (:func:`flowaug.gradual.adapt` takes any of them):

* :class:`FlowPath` (flowaug's): ``x_t = (1 - t) x + t T(x)``, ``T(x)`` the end point of a flow of the debiased
  Sinkhorn divergence toward ``x_to`` (a few full steps). Its first step is *not* the entropic barycentric map:
  the debiased gradient moves a point by ``T_ab(x) - T_aa(x)``, which keeps the cloud's spread where the map
  alone contracts it toward blurred averages. Optional terms: a classifier potential
  (``classifier_weight``: ``+ w * CE(head(x), y)`` at each particle's label, GGF's term) and class-wise flows.
* :func:`entropic_path`: the plain entropic barycentric map ``x + t (T_ab(x) - x)`` (one Sinkhorn solve, no
  debiasing): the simpler map a flow must beat. It is a :class:`FlowPath` with one unit step of the
  non-debiased divergence, so it shares every option and code path.
* :class:`PlanPath`: GOAT's (He et al. 2023) interpolation along the exact OT plan (POT's ``emd``, squared
  Euclidean cost) between the two sets; a particle per non-zero entry of the plan.

Every path is pure: tensors in, tensors out; inputs are not changed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_labels, check_real, describe, warn_user
from .config import FlowConfig, build_config
from .flow import flow
from .objectives import ClassifierPotential, Sinkhorn
from .reference import Reference

__all__ = ["PATH_DEFAULTS", "FlowPath", "Path", "PlanPath", "entropic_path"]

#: what :class:`FlowPath` uses unless told: a few full Sinkhorn steps (each moves a point most of the way
#: to its barycentric target), features only
PATH_DEFAULTS = {"objective": "sinkhorn", "steps": 3, "step_size": 1.0, "labels": "fixed"}


class Path(NamedTuple):
    """Generated domains: ``domains[k]`` (N', D) at time ``times[k]``; ``rows`` (N',) the ``x_from`` row each
    particle started from (``arange(N)`` for flows; the plan's pairs for :class:`PlanPath`)."""

    domains: list[torch.Tensor]
    rows: torch.Tensor


def check_pair(x_from: torch.Tensor, x_to: torch.Tensor) -> None:
    for name, x in (("x_from", x_from), ("x_to", x_to)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or len(x) < 2:
            raise ValueError(f"{name} must be a float tensor of shape (N, ...) with N >= 2, got {describe(x)}")
    if x_from.shape[1:] != x_to.shape[1:]:
        raise ValueError(f"x_from and x_to must have the same sample shape, got {tuple(x_from.shape[1:])} and "
                         f"{tuple(x_to.shape[1:])}")


class FlowPath:
    """The displacement interpolation of a flow (see the module docstring).

    Args:
        classifier_weight: weight ``w`` of the classifier potential ``w * CE(classifier(x), y_from)`` added to the
            flow's objective (0: none). The walk passes its current head as the classifier and the labels of
            the pair's first domain (true on the source, the model's pseudo-labels after).
        config, options: the flow's options (:func:`flowaug.flow`); defaults :data:`PATH_DEFAULTS`.
    """

    def __init__(self, *, classifier_weight: float = 0.0, config: FlowConfig | None = None, **options):
        self.classifier_weight = check_real("classifier_weight", classifier_weight, low=0)
        self.config = build_config(config, dict(PATH_DEFAULTS), options, type(self).__name__)
        self._classwise_allowed = "class_map" not in self.config.given and self.config.labels == "fixed"

    def __call__(self, x_from: torch.Tensor, x_to: torch.Tensor, times: list[float], *,
                 y_from: torch.Tensor | None = None, y_to: torch.Tensor | None = None,
                 classifier: torch.nn.Module | None = None, generator: torch.Generator | None = None) -> Path:
        """``times`` (K,) in (0, 1); with ``y_from`` and ``y_to`` class ``k`` flows toward what ``y_to`` calls
        ``k`` (a class ``y_to`` lacks flows toward all of ``x_to``, with a warning); ``classifier`` is needed
        when ``classifier_weight > 0`` (it then reads ``y_from``)."""
        check_pair(x_from, x_to)
        for name, y, x in (("y_from", y_from, x_from), ("y_to", y_to, x_to)):
            if y is not None:
                check_labels(name, y, len(x), allow_soft=False)
        cfg = self._config(classifier, y_from)
        end = self._end_points(x_from, x_to, y_from, y_to, cfg, generator)  # (N, ...)
        rows = torch.arange(len(x_from), device=x_from.device)
        return Path([torch.lerp(x_from, end, t) for t in times], rows)

    def _config(self, classifier, y_from) -> FlowConfig:
        if not self.classifier_weight:
            return self.config
        if classifier is None or y_from is None:
            raise ValueError("FlowPath(classifier_weight > 0) needs a classifier and y_from (the particles' labels)")
        return self.config.replace(objective=self.config.objective + self.classifier_weight *
                                   ClassifierPotential(classifier))

    def _end_points(self, x_from, x_to, y_from, y_to, cfg, generator) -> torch.Tensor:
        if y_to is None or y_from is None or not self._classwise_allowed:  # features only, or OTDD's joint flow
            reference = x_to if y_to is None or y_from is None else Reference(x_to, y_to)
            return flow(x_from, y_from, reference, cfg, generator=generator).x
        # class k flows toward the samples y_to calls k; a class y_to never names (a model's pseudo-labels can
        # miss one) flows toward all of x_to, and the caller is told
        present = torch.isin(y_from, torch.unique(y_to))  # (N,)
        end = x_from.clone()
        if present.any():
            end[present] = flow(x_from[present], y_from[present], Reference(x_to, y_to),
                                cfg.replace(class_map="same"), generator=generator).x
        if not present.all():
            missing = sorted(set(y_from[~present].tolist()))
            warn_user(f"FlowPath: y_to has no samples of class(es) {missing}; their {int((~present).sum())} "
                      "particles flow toward all of x_to (features only)", kind="missing-class")
            end[~present] = flow(x_from[~present], y_from[~present], x_to, cfg, generator=generator).x
        return end

    def __repr__(self) -> str:
        extra = f", classifier_weight={self.classifier_weight:g}" if self.classifier_weight else ""
        return f"{type(self).__name__}({self.config.objective!r}, steps={self.config.steps}, " \
               f"step_size={self.config.step_size:g}{extra})"


def entropic_path(blur="auto", **options) -> FlowPath:
    """The plain entropic barycentric map ``x + t (T_ab(x) - x)``: one unit step of the non-debiased Sinkhorn
    divergence at ``blur`` (its gradient is ``x - T_ab(x)``)."""
    return FlowPath(objective=Sinkhorn(blur, debias=False), steps=1, step_size=1.0, **options)


class PlanPath:
    """GOAT's path: points interpolated along the exact OT plan (POT's ``emd``, squared Euclidean cost).

    A particle per non-zero entry of the plan (about ``N + M`` of them), ``rows`` says where each started.
    Labels and classifiers are ignored (the plan is label-free, as in GOAT).
    """

    def __init__(self, max_iter: int = 10**7):
        self.max_iter = max_iter

    def __call__(self, x_from, x_to, times, *, y_from=None, y_to=None, classifier=None, generator=None) -> Path:
        import ot  # POT: the exact solver GOAT uses

        check_pair(x_from, x_to)
        a, b = x_from.flatten(1).double(), x_to.flatten(1).double()  # (N, d), (M, d)
        cost = torch.cdist(a, b).square()  # (N, M)
        plan = torch.as_tensor(ot.emd(torch.full((len(a),), 1 / len(a), dtype=torch.float64).numpy(),
                                      torch.full((len(b),), 1 / len(b), dtype=torch.float64).numpy(),
                                      cost.cpu().numpy(), numItermax=self.max_iter))  # (N, M)
        i, j = torch.nonzero(plan > 0, as_tuple=True)
        i, j = i.to(x_from.device), j.to(x_from.device)
        return Path([torch.lerp(x_from[i], x_to[j], t) for t in times], i)

    def __repr__(self) -> str:
        return "PlanPath()"
