"""FlowTransform: a few gradient-flow steps toward a reference dataset, as a torchvision v2 batch transform.

It follows the contract of ``torchvision.transforms.v2.MixUp``/``CutMix``: it is called on a *batch*,
``images, labels = t(images, labels)`` (or a dict/tuple batch, with ``labels_getter``), and returns the
same structure with the images moved and, when labels flow, new labels. Where to put it:

* **after the DataLoader** (``for x, y in loader: x, y = t(x.cuda(), y.cuda())``, or via
  :class:`~flowaug.FlowAnnealing` on the device): the main process, the GPU, KeOps. Use this on GPU.
* **in a collate_fn** (``collate_fn=lambda b: t(*default_collate(b))``): inside CPU workers, overlapped
  with training. Use this for CPU dense flows; keep KeOps and CUDA out of forked workers.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torchvision import tv_tensors
from torchvision.transforms.v2 import Transform

from . import backends
from ._checks import check_choice, check_int, check_real, describe
from ._shared import ProcessGenerator, SharedValue, strength_property
from .flow import DECODERS, LABEL_MODES, flow
from .labels import ClassStats
from .objectives import as_objective
from .reference import Reference

__all__ = ["FlowTransform", "batch_to_float", "float_to_like"]


def batch_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] (torchvision's ``ToDtype(scale=True)``); floats pass through."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255)
    return images


def float_to_like(moved: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Back to the caller's dtype (uint8: rounded and clamped) and tv_tensor type."""
    if like.dtype == torch.uint8:
        moved = moved.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    else:
        moved = moved.to(like.dtype)
    if isinstance(like, tv_tensors.TVTensor):
        return tv_tensors.wrap(moved, like=like)
    return moved


def _default_labels(inputs):
    """torchvision's heuristic: the second item of a tuple, or a 'labels'-like key of a dict."""
    from torchvision.transforms.v2._utils import _find_labels_default_heuristic

    return _find_labels_default_heuristic(inputs)


class FlowTransform(Transform):
    """Move a batch toward a reference dataset along a Wasserstein gradient flow.

    Args:
        reference: the target: a :class:`~flowaug.Reference`, a ``(features, labels)`` pair, a features
            tensor, or a Dataset of (input, label) items. Prepared once (class statistics, norms, scales).
        objective: an :class:`~flowaug.Objective` or a name (``"sinkhorn"``, ``"mmd"``, ``"sliced"``...).
        steps: Euler steps at ``strength=1``.
        step_size: tau per step (total flow time ``steps * step_size`` at ``strength=1``).
        labels: ``"fixed"`` (only images move, labels unchanged) or ``"flow"`` (labels move too and come
            back as reference classes).
        label_weight: lambda of the OTDD label term (0: features only).
        decode: ``"point"`` or ``"class"`` (see :func:`~flowaug.flow`).
        class_map: class-wise flows (``"same"``, ``"ot"`` or a tensor; see :func:`~flowaug.flow`).
        soft: with ``labels="flow"``, return soft labels (B, K') instead of class ids.
        backend: ``"auto"``, ``"tensorized"`` or ``"keops"``.
        reference_size: number of reference points drawn per batch (None: the whole reference).
        p: probability of flowing a given batch.
        strength: in [0, 1]: the fraction of the configured flow time applied (0 is the identity). This
            is what :class:`~flowaug.FlowAnnealing` moves; it lives in shared memory so DataLoader
            workers see changes.
        clamp: ``"auto"`` (the reference's value range), a ``(low, high)`` pair, or None.
        momentum: heavy-ball coefficient of the flow.
        seed: seed of this transform's random stream (per-batch decisions and reference samples).
        labels_getter: how to find labels in the batch: ``"default"`` (torchvision's heuristic), a
            callable, or None (unlabeled batches).
        source_stats: class statistics of the source dataset; else call :meth:`fit`, else they are
            estimated online from the batches seen so far (in each process). Online estimates depend on
            the batches seen: fit them for exactly reproducible or resumable runs.
        warm_start: reuse the solver's reference-side potentials from the previous batch.

    Example:
        >>> import torch
        >>> from flowaug import FlowTransform
        >>> g = torch.Generator().manual_seed(0)
        >>> ref_x, ref_y = torch.rand(64, 1, 8, 8, generator=g), torch.arange(64) % 4
        >>> t = FlowTransform((ref_x, ref_y), steps=3, seed=0)
        >>> x, y = torch.rand(16, 1, 8, 8, generator=g), torch.arange(16) % 4
        >>> x2, y2 = t(x, y)
        >>> x2.shape, bool(torch.equal(y2, y))
        (torch.Size([16, 1, 8, 8]), True)
        >>> t.strength = 0.0
        >>> bool(torch.equal(t(x, y)[0], x))
        True
    """

    def __init__(
        self,
        reference,
        *,
        objective="sinkhorn",
        steps: int = 5,
        step_size: float = 1.0,
        labels: str = "fixed",
        label_weight: float = 1.0,
        decode: str = "point",
        class_map=None,
        soft: bool = False,
        backend: str = "auto",
        reference_size: int | None = None,
        p: float = 1.0,
        strength: float = 1.0,
        clamp="auto",
        momentum: float = 0.0,
        seed: int | None = None,
        labels_getter="default",
        source_stats: ClassStats | None = None,
        warm_start: bool = True,
    ):
        super().__init__()
        self.reference = Reference.coerce(reference)
        self.objective = as_objective(objective)
        self.steps = check_int("steps", steps)
        self.step_size = check_real("step_size", step_size, low=0, low_open=True)
        self.labels = check_choice("labels", labels, LABEL_MODES)
        self.label_weight = check_real("label_weight", label_weight, low=0)
        self.decode = check_choice("decode", decode, DECODERS)
        if class_map is not None and not isinstance(class_map, torch.Tensor):
            check_choice("class_map", class_map, ("same", "ot"))
        self.class_map = class_map
        self.soft = bool(soft)
        self.backend = check_choice("backend", backend, backends.BACKENDS)
        if reference_size is not None:
            reference_size = check_int("reference_size", reference_size, minimum=2)
        self.reference_size = reference_size
        self.p = check_real("p", p, low=0, high=1)
        self._strength = SharedValue(strength, "strength")
        if isinstance(clamp, str):
            check_choice("clamp", clamp, ("auto",))
        elif clamp is not None:
            if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
                raise TypeError(f"clamp must be 'auto', None or a (low, high) pair, got {describe(clamp)}")
            clamp = (check_real("clamp[0]", clamp[0]), check_real("clamp[1]", clamp[1], low=float(clamp[0])))
        self.clamp = clamp
        self.momentum = check_real("momentum", momentum, low=0, high=1, high_open=True)
        if seed is not None:
            seed = check_int("seed", seed)
        self.seed = seed
        if labels_getter != "default" and labels_getter is not None and not callable(labels_getter):
            raise ValueError(f"labels_getter must be 'default', a callable or None, got {describe(labels_getter)}")
        self.labels_getter = labels_getter
        self.source_stats = source_stats
        self._online_stats = source_stats is None
        self.warm_start = bool(warm_start)
        self._epoch = SharedValue(-1, "epoch", low=-1, high=2**62)  # published by FlowAnnealing
        self._rng = ProcessGenerator(seed, self._epoch)
        self._warm: dict = {}
        self.last_objective: float | None = None

    # ------------------------------------------------------------------ public state
    strength = strength_property("Fraction of the configured flow applied, in [0, 1] (shared with DataLoader workers).")

    def fit(self, data, batch_size: int = 1024) -> "FlowTransform":
        """Fit the source class statistics from a Dataset, a DataLoader of (x, y) batches or an (x, y) pair."""
        if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
            stats = ClassStats().update(batch_to_float(data[0]), data[1])
        elif isinstance(data, torch.utils.data.DataLoader):
            stats = ClassStats()
            for batch in data:
                stats.update(batch_to_float(batch[0]), batch[1])
        else:
            from .data import dataset_to_tensors

            x, y = dataset_to_tensors(data, batch_size=batch_size, name="data")
            stats = ClassStats().update(batch_to_float(x), y)
        self.source_stats, self._online_stats = stats, False
        return self

    # ------------------------------------------------------------------ torchvision contract
    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """All randomness of one call, drawn in one place from this transform's process-local stream."""
        gen = self._rng.get()
        apply = bool(torch.rand((), generator=gen) < self.p) if self.p < 1 else self.p > 0
        index = None
        if self.reference_size is not None and self.reference_size < self.reference.num_samples:
            index = torch.randperm(self.reference.num_samples, generator=gen)[: self.reference_size]
        flow_seed = int(torch.randint(0, 2**62, (), generator=gen))
        return {"apply": apply, "reference_index": index, "flow_seed": flow_seed}

    def forward(self, *inputs: Any) -> Any:
        """Do not override: flows the batch once and maps the images and labels leaves."""
        inputs = inputs if len(inputs) > 1 else inputs[0]
        flat_inputs, spec = tree_flatten(inputs)
        labels = None
        if self.labels_getter is not None:
            getter = _default_labels if self.labels_getter == "default" else self.labels_getter
            labels = getter(inputs)
            if labels is not None and not isinstance(labels, torch.Tensor):
                raise TypeError(f"labels must be a torch.Tensor, got {describe(labels)}")
        image_pos = self._find_images(flat_inputs, labels)
        params = self.make_params(flat_inputs)
        strength = self.strength
        if not params["apply"] or strength == 0 or self.steps == 0:
            return inputs  # the identity, bitwise: the very same objects
        images = flat_inputs[image_pos]
        params.update(self._flow(images, labels, params, strength))
        flat_outputs = []
        for i, inpt in enumerate(flat_inputs):
            if i == image_pos or (labels is not None and inpt is labels):
                flat_outputs.append(self.transform(inpt, params))
            else:
                flat_outputs.append(inpt)
        return tree_unflatten(flat_outputs, spec)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return params["labels"] if inpt is params["labels_in"] else params["images"]

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _find_images(flat_inputs, labels) -> int:
        for i, inpt in enumerate(flat_inputs):
            if isinstance(inpt, (tv_tensors.Image, tv_tensors.Video)):
                return i
        for i, inpt in enumerate(flat_inputs):
            if isinstance(inpt, torch.Tensor) and inpt is not labels and not isinstance(inpt, tv_tensors.TVTensor):
                return i
        raise TypeError("FlowTransform found no image tensor in its input; pass (images, labels) or a dict batch")

    def _flow(self, images: torch.Tensor, labels, params, strength: float) -> dict:
        if images.ndim < 2:
            raise ValueError(f"images must be a batch (B, C, H, W) or (B, D), got shape {tuple(images.shape)}")
        x = batch_to_float(images.as_subclass(torch.Tensor))
        ref = self.reference.to(x.device)
        stats = self.source_stats
        use_labels = labels is not None and self.label_weight > 0 and ref.labels is not None
        if use_labels and self._online_stats:
            if self.source_stats is None:
                self.source_stats = ClassStats(single_sample=ref.single_sample)
            self.source_stats.update(x, labels)  # online estimate: all batches seen in this process
            stats = self.source_stats
        n = max(1, math.ceil(strength * self.steps - 1e-9))
        tau = self.step_size * strength * self.steps / n
        result = flow(
            x, labels if use_labels else None, ref,
            objective=self.objective, steps=n, step_size=tau, labels=self.labels if use_labels else "fixed",
            label_weight=self.label_weight, decode=self.decode, class_map=self.class_map if use_labels else None,
            momentum=self.momentum,
            clamp=self._clamp_range(ref), backend=self.backend, source_stats=stats if use_labels else None,
            reference_index=params["reference_index"],
            generator=torch.Generator().manual_seed(params["flow_seed"]),
            track_objective=False, warm=self._warm_state(x.device, params["reference_index"]),
        )
        self.last_objective = result.objective  # None unless tracked (kept cheap per batch)
        new_labels = labels
        if labels is not None and use_labels and self.labels == "flow":
            if self.soft or labels.ndim == 2:
                new_labels = result.soft_labels.to(labels.dtype if labels.is_floating_point() else torch.float32)
            else:
                new_labels = result.labels.to(labels.dtype)
        return {"images": float_to_like(result.x, images), "labels": new_labels, "labels_in": labels}

    def _warm_state(self, device, index):
        """Solver potentials carried from batch to batch (only for the full reference: a new sample per
        batch would make the previous potentials describe other points)."""
        if not self.warm_start or index is not None:
            return None
        return self._warm.setdefault(str(device), {})

    def _clamp_range(self, ref: Reference):
        return ref.value_range() if self.clamp == "auto" else self.clamp

    def extra_repr(self) -> str:
        fields = [
            f"reference={self.reference!r}",
            f"objective={self.objective!r}",
            f"steps={self.steps}",
            f"step_size={self.step_size}",
            f"labels={self.labels!r}",
            f"label_weight={self.label_weight}",
            f"decode={self.decode!r}",
            f"class_map={self.class_map!r}",
            f"soft={self.soft}",
            f"backend={self.backend!r}",
            f"reference_size={self.reference_size}",
            f"p={self.p}",
            f"strength={self.strength}",
            f"clamp={self.clamp!r}",
            f"momentum={self.momentum}",
            f"seed={self.seed}",
        ]
        return ", ".join(fields)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_warm"] = {}
        return state
