"""flowaug: data augmentation along Wasserstein gradient flows in dataset space.

Moves a labeled batch toward a reference dataset by a few explicit-Euler steps of the Wasserstein gradient
flow of an objective (the debiased Sinkhorn divergence in OTDD's label-aware space, MMD, sliced
Wasserstein, potentials, interactions, entropy), after Alvarez-Melis & Fusi, "Dataset Dynamics via
Gradient Flows in Probability Space" (ICML 2021).

Nothing heavy is imported here: pykeops and geomloss load on first use (they probe CUDA at import,
which must not happen in the parent of forked DataLoader workers), Lightning only with
:class:`FlowAnnealing` or :class:`GradualWalk`.
"""

from __future__ import annotations

from .backends import DenseMemoryError
from .config import FlowConfig
from .flow import FlowResult, flow
from .labels import ClassStats, LabelEmbedding, assign_classes, decode_labels
from .objectives import (
    MMD,
    ClassifierPotential,
    Custom,
    Embedded,
    Entropy,
    Interaction,
    LabelPotential,
    Objective,
    Potential,
    Sinkhorn,
    SlicedWasserstein,
)
from .condense import Condensed, condense
from .datasets import FlowDataset
from .reference import Reference
from .transforms import FlowCollate, FlowTransform

from ._version import __version__

__all__ = [
    "ClassStats",
    "ClassifierPotential",
    "Condensed",
    "Custom",
    "DenseMemoryError",
    "Embedded",
    "Entropy",
    "FlowAnnealing",
    "FlowCollate",
    "FlowConfig",
    "FlowDataset",
    "FlowResult",
    "FlowTransform",
    "GradualWalk",
    "Interaction",
    "LabelEmbedding",
    "LabelPotential",
    "MMD",
    "Objective",
    "Potential",
    "Reference",
    "Sinkhorn",
    "SlicedWasserstein",
    "assign_classes",
    "condense",
    "decode_labels",
    "flow",
]


#: submodules reachable as attributes (``flowaug.gradual.adapt``) without an import of their own; loaded on first
#: use. (``flowaug.condense`` is the function; its module is ``importlib.import_module("flowaug.condense")``.)
_SUBMODULES = ("callbacks", "cli", "data", "datasets", "demo", "demo_gradual", "distance", "dsa", "gradual",
               "gradual_lightning", "networks", "paths", "plotting", "policy", "schedules")


def __getattr__(name):
    # Lightning is imported only when the callback or the Lightning walk is asked for (it is slow to import).
    if name == "FlowAnnealing":
        from .callbacks import FlowAnnealing

        return FlowAnnealing
    if name == "GradualWalk":
        from .gradual_lightning import GradualWalk

        return GradualWalk
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'flowaug' has no attribute {name!r}")


def __dir__():
    # The lazy names (FlowAnnealing, GradualWalk, the submodules) are not in globals() until first use: list them too.
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
