"""A prepared reference dataset: built once, reused by every flow toward it.

A :class:`Reference` holds the flattened reference features (M, d), labels (M,), class statistics and a
cache of everything flows derive from the reference alone: its points in the augmented label-aware space,
their norms, the data-derived length scale, and objective self-terms. Building one from a Dataset reads
it once; a flow, a :class:`~flowaug.FlowTransform` or a :class:`~flowaug.FlowDataset` then reuses it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Union

import numpy as np
import torch

from ._checks import check_finite_tensor, check_labels, describe
from .data import as_float_images, dataset_to_tensors
from .labels import ClassStats, LabelEmbedding

__all__ = ["Reference", "ReferenceLike"]

_PREPARED_SLOTS = 4  # label embeddings kept per reference (online source statistics change per batch)


class Reference:
    """Reference features and labels, with cached preparation.

    Args:
        features: (M, ...) float tensor, or uint8 images (scaled to [0, 1] float32).
        labels: (M,) int class ids, or None for an unlabeled reference.
        stats: precomputed :class:`~flowaug.ClassStats` (else fitted from ``features``/``labels``).
        single_sample: policy for classes with one sample (see :class:`~flowaug.ClassStats`).
        classes: names of the classes (index = class id), e.g. a torchvision dataset's ``.classes``; with
            ``class_map="same"``, adapters whose source names its classes pair them by name.

    The reference keeps (does not copy) float32 features it is given: do not modify them in place.

    Example:
        >>> import torch
        >>> ref = Reference(torch.rand(100, 1, 8, 8), torch.arange(100) % 10)
        >>> ref
        Reference(samples=100, sample_shape=(1, 8, 8), classes=10)
    """

    def __init__(self, features, labels=None, *, stats: ClassStats | None = None, single_sample: str = "pooled",
                 classes=None):
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"reference features must be a torch.Tensor of shape (M, ...), got {describe(features)}")
        if features.ndim < 2:
            raise ValueError(f"reference features must have shape (M, ...) with one row per sample, got {tuple(features.shape)}")
        if features.shape[0] == 0:
            raise ValueError("reference must have at least one sample, got 0")
        feats = as_float_images(features)
        if feats.dtype not in (torch.float32, torch.float64):
            feats = feats.to(torch.float32)
        check_finite_tensor("reference features", feats)
        self.sample_shape = tuple(features.shape[1:])
        self.features = feats.reshape(feats.shape[0], -1).contiguous()  # (M, d)
        if labels is not None:
            check_labels("reference labels", labels, self.features.shape[0], allow_soft=False)
            labels = labels.to(self.features.device).long()
        self.labels = labels
        if classes is not None:
            if labels is None:
                raise ValueError("classes names the classes of labels, but labels is None")
            if isinstance(classes, str) or not hasattr(classes, "__len__"):
                raise TypeError(f"classes must be a sequence of class names or None, got {describe(classes)}")
            classes = [str(c) for c in classes]
            if len(classes) <= int(labels.max()):
                raise ValueError(f"classes must name every class id up to {int(labels.max())}, got {len(classes)} names")
        self.classes = classes
        self.single_sample = single_sample
        self._stats = stats
        self._stats_given = stats is not None  # user statistics are part of the reference's identity
        self._prepared: OrderedDict = OrderedDict()
        self._moved: dict = {}
        self._fingerprint: str | None = None
        self._median: float | None = None
        self._range: tuple[float, float] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dataset(cls, dataset, *, progress: bool = True, **kwargs) -> "Reference":
        """Read a map-style Dataset of (input, label) items once."""
        x, y = dataset_to_tensors(dataset, progress=progress, name="reference")
        names = getattr(dataset, "classes", None) if y.ndim == 1 else None
        if names is not None and "classes" not in kwargs and len(names) > int(y.max()):
            kwargs["classes"] = list(names)
        return cls(x, y if y.ndim == 1 else None, **kwargs)

    @classmethod
    def coerce(cls, obj, name: str = "reference") -> "Reference":
        """A Reference, a ``(features, labels)`` pair, a features tensor, or a Dataset."""
        if isinstance(obj, Reference):
            return obj
        if isinstance(obj, torch.Tensor):
            return cls(obj)
        if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], torch.Tensor):
            return cls(obj[0], obj[1])
        if hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, (tuple, list, str)):
            return cls.from_dataset(obj)
        raise TypeError(
            f"{name} must be a Reference, a (features, labels) pair, a features tensor or a Dataset, got {describe(obj)}"
        )

    # ------------------------------------------------------------------ properties
    @property
    def num_samples(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def device(self) -> torch.device:
        return self.features.device

    @property
    def stats(self) -> ClassStats:
        """Class statistics (fitted on first use)."""
        if self.labels is None:
            raise ValueError("this reference has no labels, so it has no class statistics")
        if self._stats is None:
            self._stats = ClassStats(single_sample=self.single_sample).update(self.features, self.labels)
        return self._stats

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.stats.present.sum())

    def to(self, device=None, dtype=None) -> "Reference":
        """This reference on another device/dtype (cached, statistics shared)."""
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.features.dtype
        if device == self.device and dtype == self.features.dtype:
            return self
        key = (str(device), dtype)
        if key not in self._moved:
            moved = Reference.__new__(Reference)
            moved.__dict__.update(self.__dict__)
            moved.features = self.features.to(device=device, dtype=dtype)
            moved.labels = None if self.labels is None else self.labels.to(device)
            moved._prepared, moved._moved = OrderedDict(), {}
            self._moved[key] = moved
        return self._moved[key]

    def fingerprint(self) -> str:
        """Content hash of everything a flow reads from the reference: features, labels, the single-sample
        policy and user-given class statistics (for on-disk cache keys)."""
        if self._fingerprint is None:
            from .config import fingerprint

            h = hashlib.blake2b(digest_size=16)
            h.update(str((tuple(self.features.shape), str(self.features.dtype), self.single_sample)).encode())
            h.update(np.ascontiguousarray(self.features.detach().cpu().numpy()).tobytes())
            if self.labels is not None:
                h.update(self.labels.cpu().numpy().tobytes())
            if getattr(self, "_stats_given", False):
                h.update(fingerprint(self._stats.state_dict()).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # ------------------------------------------------------------------ preparation
    def value_range(self) -> tuple[float, float]:
        """(min, max) of the reference features, cached: the default clamp range of flowed data."""
        if self._range is None:
            self._range = (float(self.features.min()), float(self.features.max()))
        return self._range

    def median_distance(self) -> float:
        """Median pairwise feature distance (on at most 1024 evenly strided samples), cached.

        The length scale behind ``blur="auto"`` and ``bandwidth="auto"``: computed once per reference
        from its features, so every batch and every label embedding see the same scale.
        """
        if self._median is None:
            from .objectives.base import median_distance

            self._median = median_distance(self.features)
        return self._median

    def prepared(self, embedding: LabelEmbedding | None, label_weight: float, dtype: torch.dtype,
                 index: torch.Tensor | None = None):
        """Reference points in the flow's space: ``(z (M, D), ||z||^2 / 2 (M,), cache dict)``.

        ``z = [features, label_weight * e_label]``, built once per (embedding, weight, dtype) and kept
        for the last few embeddings. With ``index``, only those rows (a per-batch reference sample); the
        cache dict is the full reference's either way, for reference-only results of objectives.
        """
        key = (id(embedding), label_weight, dtype)
        entry = self._prepared.get(key)
        if entry is None or entry["embedding"] is not embedding:
            entry = {"embedding": embedding, "cache": {"median_distance": self.median_distance()}}
            self._prepared[key] = entry
            while len(self._prepared) > _PREPARED_SLOTS:
                self._prepared.popitem(last=False)
        self._prepared.move_to_end(key)
        if index is not None and "z" not in entry:  # build the sampled rows only
            z = self._build(embedding, label_weight, dtype, index)
            return z, (z * z).sum(1).mul_(0.5), entry["cache"]
        if "z" not in entry:
            entry["z"] = self._build(embedding, label_weight, dtype, None)
            entry["half"] = (entry["z"] * entry["z"]).sum(1).mul_(0.5)
        if index is None:
            return entry["z"], entry["half"], entry["cache"]
        return entry["z"][index], entry["half"][index], entry["cache"]

    def _build(self, embedding, label_weight, dtype, index):
        feats = self.features if index is None else self.features[index]
        feats = feats.to(dtype)
        if embedding is None:
            return feats.contiguous()
        labels = self.labels if index is None else self.labels[index]
        part = embedding.embed(labels, side="reference").to(device=feats.device, dtype=dtype)
        return torch.cat([feats, part * label_weight], 1)  # (M, d + r)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_prepared"], state["_moved"] = OrderedDict(), {}  # caches are rebuilt where unpickled
        return state

    def __repr__(self) -> str:
        classes = f", classes={self.num_classes}" if self.labels is not None else ""
        return f"Reference(samples={self.num_samples}, sample_shape={self.sample_shape}{classes})"


#: what every ``reference`` argument accepts: a Reference, a features tensor (M, ...), a (features, labels)
#: pair, or a map-style Dataset of (input, label) items
ReferenceLike = Union[Reference, torch.Tensor, "tuple[torch.Tensor, torch.Tensor]", torch.utils.data.Dataset]
