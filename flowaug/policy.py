"""The label policy: one rule decides which flow runs, for the engine and every adapter alike.

From the config, the batch's labels and the reference, :func:`label_plan` decides

* ``"features"``: only the features take part (no labels on one side, or ``label_weight=0``); labels pass
  through unchanged;
* ``"joint"``: one flow in OTDD's label-aware space ``z = [x; lambda e_y]``, labels fixed or flowing;
* ``"classwise"``: every source class flows toward its paired reference class (``class_map``);

and refuses what cannot run (a class map or flowing labels without labels on both sides) with one
message. :func:`flowaug.flow`, :class:`~flowaug.FlowTransform` and :class:`~flowaug.FlowDataset` all call
it, so they accept and refuse the same inputs in the same words.

:func:`pair_classes_by_name` is the one rule for ``class_map="same"`` when both sides name their classes
(``Dataset.classes``): classes are paired by name, not by index (``ImageFolder`` sorts names
alphabetically, so index 0 can be "eight" on one side and "zero" on the other).

Example:
    >>> import torch
    >>> from flowaug import FlowConfig, Reference
    >>> ref = Reference(torch.rand(20, 4), torch.arange(20) % 2)
    >>> label_plan(FlowConfig(), torch.arange(8) % 2, ref)
    LabelPlan(kind='joint', labels_move=False)
    >>> label_plan(FlowConfig(), None, ref).kind
    'features'
    >>> label_plan(FlowConfig(labels="flow"), torch.arange(8) % 2, Reference(torch.rand(20, 4)))
    Traceback (most recent call last):
    ...
    ValueError: labels='flow' needs labels on the batch (y), a labeled reference and label_weight > 0, but the reference has no labels; give the reference as (features, labels), or use labels='fixed'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import warn_user
from .config import FlowConfig

__all__ = ["KINDS", "LabelPlan", "label_plan", "pair_classes_by_name"]

KINDS = ("features", "joint", "classwise")


@dataclass(frozen=True)
class LabelPlan:
    """What a flow does with labels: ``kind`` (one of :data:`KINDS`) and whether labels move."""

    kind: str
    labels_move: bool

    @property
    def uses_labels(self) -> bool:
        """The flow reads the batch's labels (a label term or a class-wise pairing)."""
        return self.kind != "features"


def label_plan(config: FlowConfig, y: torch.Tensor | None, reference) -> LabelPlan:
    """The flow that ``config`` runs on a batch with labels ``y`` toward ``reference`` (a
    :class:`~flowaug.Reference` or None); raises ValueError for a combination that cannot run.

    Only whether ``y`` is None is read (adapters pass ``True`` to check a configuration before any batch)."""
    has_y = y is not None
    ref_labeled = reference is not None and reference.labels is not None
    missing = _missing(has_y, ref_labeled, reference)
    if config.class_map is not None:
        if missing:
            raise ValueError(f"class_map={_show(config.class_map)} pairs source classes with reference classes and "
                             f"needs labels on the batch (y) and a labeled reference, but {missing}; "
                             f"{_fix(has_y, reference)}, or use class_map=None")
        return LabelPlan("classwise", config.labels == "flow")
    if config.labels == "flow":
        if missing or config.label_weight == 0:
            why = missing or "label_weight is 0"
            raise ValueError("labels='flow' needs labels on the batch (y), a labeled reference and label_weight > 0, "
                             f"but {why}; {_fix(has_y, reference) if missing else 'set label_weight > 0'}, or use "
                             "labels='fixed'")
        return LabelPlan("joint", True)
    if missing or config.label_weight == 0:
        return LabelPlan("features", False)
    return LabelPlan("joint", False)


def _missing(has_y: bool, ref_labeled: bool, reference) -> str:
    if not has_y:
        return "the batch has no labels (y is None)"
    if reference is None:
        return "there is no reference"
    return "" if ref_labeled else "the reference has no labels"


def _fix(has_y: bool, reference) -> str:
    if not has_y:
        return "pass the batch's labels (an adapter finds them with labels_getter)"
    return "give the reference as (features, labels)" if reference is not None else "give a labeled reference"


def _show(class_map) -> str:
    return repr(class_map) if isinstance(class_map, str) else "<tensor>"


def pair_classes_by_name(config: FlowConfig, source_classes, reference_classes) -> FlowConfig:
    """``config`` with ``class_map="same"`` made explicit by class *names* when both sides have them.

    Args:
        source_classes, reference_classes: sequences of class names (index = class id), or None.

    Returns the config unchanged for any other class map or when a side has no names (then indices are
    paired, as documented). Raises ValueError when a source name has no match in the reference.
    """
    if config.class_map != "same":
        return config
    if (source_classes is None) != (reference_classes is None):
        named = "the reference" if source_classes is None else "the source"
        warn_user(f"class_map='same' pairs classes by index: only {named} names its classes; give the other side's "
                  "names (FlowTransform(..., classes=...), Reference(..., classes=...), a Dataset's .classes) to "
                  "pair them by name", kind="class-names")
    if source_classes is None or reference_classes is None:
        return config
    source, target = [str(c) for c in source_classes], [str(c) for c in reference_classes]
    if source == target[: len(source)]:
        return config  # names and indices agree: "same" as it is
    where = {name: j for j, name in enumerate(target)}
    absent = [name for name in source if name not in where]
    if absent:
        raise ValueError(
            f"class_map='same' pairs classes by name when both sides name them, but the reference has no class named "
            f"{absent[:5]} (source classes {source[:10]}, reference classes {target[:10]}); pass an explicit "
            "class_map tensor (class_map[source id] = reference id), e.g. torch.arange(K) to pair by index")
    return config.replace(class_map=tuple(where[name] for name in source))
