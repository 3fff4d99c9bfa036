"""Objective terms of a flow and their composition (``Sinkhorn() + 0.1 * MMD()``)."""

from __future__ import annotations

from .base import Context, Evaluation, Objective, WeightedSum
from .custom import Custom
from .embedded import Embedded
from .energies import ClassifierPotential, Entropy, Interaction, LabelPotential, Potential
from .mmd import MMD
from .sinkhorn import Sinkhorn
from .sliced import SlicedWasserstein

__all__ = [
    "ClassifierPotential",
    "Context",
    "Custom",
    "Embedded",
    "Evaluation",
    "Entropy",
    "Interaction",
    "LabelPotential",
    "MMD",
    "OBJECTIVES",
    "Objective",
    "Potential",
    "Sinkhorn",
    "SlicedWasserstein",
    "WeightedSum",
    "as_objective",
]

#: names accepted wherever an objective is expected
OBJECTIVES = {
    "sinkhorn": Sinkhorn,
    "otdd": Sinkhorn,
    "mmd": MMD,
    "gaussian": lambda: MMD("gaussian"),
    "laplacian": lambda: MMD("laplacian"),
    "energy": lambda: MMD("energy"),
    "linear": lambda: MMD("linear"),
    "sliced": SlicedWasserstein,
}


def as_objective(objective) -> Objective:
    """An :class:`Objective`, a name from :data:`OBJECTIVES`, or raise naming what was received."""
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVES)} or an Objective, got {objective!r}")
        return OBJECTIVES[objective]()
    raise TypeError(f"objective must be a name {sorted(OBJECTIVES)} or an Objective, got {type(objective).__name__}")
