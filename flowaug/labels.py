"""Labels as Gaussians: class statistics, the augmented (OTDD) representation and decoding.

Following Alvarez-Melis & Fusi (2020), a label ``y`` stands for the class-conditional feature
distribution, approximated by a Gaussian with mean ``mu_y`` and diagonal std ``sigma_y``. The OTDD ground
cost between labeled points

    ||x - x'||^2 + W2^2(N(mu_y, diag sigma_y^2), N(mu_y', diag sigma_y'^2))
  = ||x - x'||^2 + ||mu_y - mu_y'||^2 + ||sigma_y - sigma_y'||^2

is a squared Euclidean distance between augmented vectors ``[x; mu_y; sigma_y]``. Those vectors have
``3 d`` coordinates, but the ``K + K'`` class vectors ``[mu; sigma]`` of a source and a reference dataset
span an affine subspace of dimension at most ``K + K' - 1``. :class:`LabelEmbedding` maps them
isometrically onto that subspace, so an augmented point is ``z = [x; lambda * e_y]`` with ``e_y`` of
dimension ``r <= K + K' - 1`` (19 for two 10-class datasets instead of ``2 d = 1568`` at 28x28): the same
costs, the same gradients, a fraction of the arithmetic. A label part that flows stays inside that
subspace (gradients are combinations of differences of its points), so decoding by nearest class is exact.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable

import torch

from ._checks import check_choice, check_finite_tensor, check_labels, check_real, describe

__all__ = ["ClassStats", "LabelEmbedding", "assign_classes", "decode_labels", "one_hot"]

SINGLE_SAMPLE_POLICIES = ("pooled", "zero", "error")


def one_hot(labels: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """(N,) class ids -> (N, K) one-hot rows; (N, K) soft labels pass through (cast to ``dtype``)."""
    if labels.ndim == 2:
        return labels.to(dtype)
    out = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)  # (N, K)
    out.scatter_(1, labels.long().view(-1, 1), 1.0)
    return out


class ClassStats:
    """Streaming class-conditional means and diagonal standard deviations.

    Accumulates, per class, the total weight, the mean and the sum of squared deviations in float64 with
    Chan's parallel update, so a dataset that does not fit in memory can be fed batch by batch and two
    partial statistics can be merged. Soft labels weight each sample by its class probabilities.

    Args:
        num_classes: number of classes, or ``None`` to grow with the largest class id seen.
        single_sample: std of a class seen once (its variance is undefined): ``"pooled"`` (default) uses
            the pooled within-class std of the classes seen at least twice, ``"zero"`` uses 0, ``"error"``
            raises. ``"pooled"`` keeps one-shot reference sets (k = 1) usable.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(100, 3, generator=g), torch.arange(100) % 2
        >>> stats = ClassStats().update(x[:50], y[:50]).update(x[50:], y[50:])
        >>> torch.allclose(stats.means[1], x[y == 1].double().mean(0))
        True
    """

    def __init__(self, num_classes: int | None = None, single_sample: str = "pooled"):
        self.num_classes = num_classes
        self.single_sample = check_choice("single_sample", single_sample, SINGLE_SAMPLE_POLICIES)
        self.dim: int | None = None
        self._weight: torch.Tensor | None = None  # (K,) float64
        self._mean: torch.Tensor | None = None  # (K, d) float64
        self._m2: torch.Tensor | None = None  # (K, d) float64
        self.version = 0  # bumped at every update: caches key on it

    # ------------------------------------------------------------------ accumulation
    def update(self, x: torch.Tensor, y: torch.Tensor) -> "ClassStats":
        """Add a batch: ``x`` (N, ...) features, ``y`` (N,) class ids or (N, K) soft labels."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (N, ...), got {describe(x)}")
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
        x = x.reshape(x.shape[0], -1).double()  # (N, d)
        check_finite_tensor("x", x)
        kind = check_labels("y", y, x.shape[0], num_classes=self.num_classes)
        k = self.num_classes
        if kind == "hard":
            k = max(int(y.max()) + 1, k or 0, 0 if self._weight is None else self._weight.shape[0])
        else:
            k = y.shape[1]
        p = one_hot(y.to(x.device), k, dtype=torch.float64)  # (N, K)
        self._grow(k, x.shape[1], x.device)
        w = p.sum(0)  # (K,)
        safe = w.clamp_min(1e-300)[:, None]
        shift = x.mean(0, keepdim=True)  # (1, d): centring keeps the float64 sums well conditioned
        xc = x - shift  # (N, d)
        mean_c = (p.T @ xc) / safe  # (K, d)
        m2 = (p.T @ (xc * xc) - w[:, None] * mean_c * mean_c).clamp_min(0)  # (K, d)
        self._merge(w, mean_c + shift, m2)
        return self

    def _grow(self, k: int, d: int, device) -> None:
        if self.dim is None:
            self.dim = d
        elif self.dim != d:
            raise ValueError(f"x must have {self.dim} features per sample (as earlier batches), got {d}")
        if self._weight is None:
            self._weight = torch.zeros(k, dtype=torch.float64, device=device)
            self._mean = torch.zeros(k, d, dtype=torch.float64, device=device)
            self._m2 = torch.zeros(k, d, dtype=torch.float64, device=device)
        elif self._weight.shape[0] < k:
            extra = k - self._weight.shape[0]
            self._weight = torch.cat([self._weight, self._weight.new_zeros(extra)])
            self._mean = torch.cat([self._mean, self._mean.new_zeros(extra, d)])
            self._m2 = torch.cat([self._m2, self._m2.new_zeros(extra, d)])

    def _merge(self, w: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        k = w.shape[0]
        w0, mean0, m20 = self._weight[:k], self._mean[:k], self._m2[:k]
        total = w0 + w  # (K,)
        safe = total.clamp_min(1e-300)[:, None]
        delta = mean - mean0  # (K, d)
        self._mean[:k] = mean0 + delta * (w[:, None] / safe)
        self._m2[:k] = m20 + m2 + delta * delta * (w0 * w)[:, None] / safe
        self._weight[:k] = total
        self.version += 1

    def merge(self, other: "ClassStats") -> "ClassStats":
        """Fold another partial statistic into this one (e.g. from another worker or rank)."""
        if other._weight is None:
            return self
        self._grow(other._weight.shape[0], other.dim, other._weight.device)
        self._merge(other._weight, other._mean, other._m2)
        return self

    @classmethod
    def from_tensors(cls, x: torch.Tensor, y: torch.Tensor, **kwargs) -> "ClassStats":
        return cls(**kwargs).update(x, y)

    @classmethod
    def from_batches(cls, batches: Iterable, **kwargs) -> "ClassStats":
        """Fit from an iterable of ``(x, y)`` batches (e.g. a DataLoader): streaming, constant memory."""
        stats = cls(**kwargs)
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError(f"batches must yield (x, y) pairs, got {describe(batch)}")
            stats.update(batch[0], batch[1])
        return stats

    # ------------------------------------------------------------------ results
    def _require(self) -> None:
        if self._weight is None:
            raise ValueError("ClassStats has seen no data: call update(x, y) or fit it from a dataset first")

    @property
    def counts(self) -> torch.Tensor:
        """(K,) total weight (number of samples for hard labels) per class."""
        self._require()
        return self._weight.clone()

    @property
    def present(self) -> torch.Tensor:
        """(K,) bool, classes that have at least one sample."""
        self._require()
        return self._weight > 0

    @property
    def means(self) -> torch.Tensor:
        """(K, d) float64 class means (zeros for absent classes)."""
        self._require()
        return self._mean.clone()

    @property
    def stds(self) -> torch.Tensor:
        """(K, d) float64 diagonal class standard deviations, with the single-sample policy applied."""
        self._require()
        w = self._weight
        var = self._m2 / w.clamp_min(1e-300)[:, None]  # (K, d)
        single = (w > 0) & (w < 1.5)
        if bool(single.any()):
            which = torch.nonzero(single).flatten().tolist()
            if self.single_sample == "error":
                raise ValueError(
                    f"classes {which} have a single sample, so their std is undefined; pass "
                    "single_sample='pooled' or 'zero' to ClassStats, or give more samples per class"
                )
            many = w >= 1.5
            if self.single_sample == "pooled" and bool(many.any()):
                pooled = self._m2[many].sum(0) / w[many].sum()  # (d,)
                var[single] = pooled
            else:
                if self.single_sample == "pooled":
                    warnings.warn(
                        "every class has a single sample: no within-class variance to pool, using std 0",
                        stacklevel=2,
                    )
                var[single] = 0.0
        return var.clamp_min(0).sqrt()

    def __repr__(self) -> str:
        if self._weight is None:
            return f"ClassStats(num_classes={self.num_classes}, empty)"
        return f"ClassStats(classes={int(self.present.sum())}, dim={self.dim}, samples={float(self._weight.sum()):g})"

    def state_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "single_sample": self.single_sample,
            "weight": self._weight,
            "mean": self._mean,
            "m2": self._m2,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "ClassStats":
        stats = cls(state["num_classes"], state["single_sample"])
        if state["weight"] is not None:
            stats._weight, stats._mean, stats._m2 = state["weight"], state["mean"], state["m2"]
            stats.dim = stats._mean.shape[1]
        return stats


@dataclass(frozen=True)
class LabelEmbedding:
    """Isometric coordinates of source and reference class Gaussians (see module docstring).

    ``source[k]`` and ``reference[k]`` are ``r``-vectors with
    ``||source[k] - reference[l]||^2 = ||mu_k - mu_l||^2 + ||sigma_k - sigma_l||^2`` (float64).
    Rows of absent classes are NaN, so using one is loud.
    """

    source: torch.Tensor  # (K, r) float64
    reference: torch.Tensor  # (K', r) float64
    reference_present: torch.Tensor  # (K',) bool

    @classmethod
    def fit(cls, source: ClassStats, reference: ClassStats) -> "LabelEmbedding":
        if source.dim != reference.dim:
            raise ValueError(
                f"source and reference class statistics must have the same feature dimension, "
                f"got {source.dim} and {reference.dim}"
            )
        sp, rp = source.present, reference.present
        device = source.means.device
        vs = torch.cat([source.means, source.stds], 1)[sp]  # (Ks, 2d)
        vr = torch.cat([reference.means, reference.stds], 1)[rp].to(device)  # (Kr, 2d)
        v = torch.cat([vs, vr], 0)  # (Ks + Kr, 2d)
        v = v - v.mean(0, keepdim=True)
        u, s, _ = torch.linalg.svd(v, full_matrices=False)  # u: (Ks + Kr, q)
        keep = s > s.max().clamp_min(1e-300) * 1e-10
        coords = (u * s)[:, keep]  # (Ks + Kr, r)
        if coords.shape[1] == 0:  # every class identical: one zero coordinate keeps shapes valid
            coords = v.new_zeros(v.shape[0], 1)
        src = coords.new_full((sp.shape[0], coords.shape[1]), float("nan"))
        ref = coords.new_full((rp.shape[0], coords.shape[1]), float("nan"))
        src[sp] = coords[: int(sp.sum())]
        ref[rp.to(device)] = coords[int(sp.sum()) :]
        return cls(src, ref, rp.to(device))

    @property
    def dim(self) -> int:
        return self.source.shape[1]

    def class_costs(self) -> torch.Tensor:
        """(K, K') squared W2 distances between source and reference class Gaussians."""
        return torch.cdist(self.source, self.reference).square()

    def embed(self, labels: torch.Tensor, side: str = "source") -> torch.Tensor:
        """(N,) class ids or (N, K) soft labels -> (N, r) float64 coordinates (soft: the mixture's)."""
        table = self.source if side == "source" else self.reference
        if labels.ndim == 1:
            if int(labels.max()) >= table.shape[0]:
                raise ValueError(f"labels hold class {int(labels.max())}, the {side} statistics know {table.shape[0]} classes")
            out = table[labels.long()]
        else:
            if labels.shape[1] != table.shape[0]:
                raise ValueError(f"soft labels have {labels.shape[1]} columns, the {side} statistics know {table.shape[0]} classes")
            used = labels.abs().sum(0) > 0
            out = labels.double() @ torch.nan_to_num(table, nan=0.0)
            if bool((used & torch.isnan(table[:, 0])).any()):
                out = out + float("nan")
        if bool(torch.isnan(out).any()):
            raise ValueError(f"labels use a class that has no samples in the {side} class statistics")
        return out


def decode_labels(
    label_part: torch.Tensor,
    embedding: LabelEmbedding,
    weight: float,
    temperature: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest reference class of each moved label part, and soft labels over the reference classes.

    Args:
        label_part: (N, r) label coordinates of moved points (already multiplied by ``weight``).
        embedding: the :class:`LabelEmbedding` used to build them.
        weight: the label weight lambda.
        temperature: soft labels are ``softmax(-||l - lambda e_k||^2 / (2 T))``; ``None`` derives ``T``
            from the data: a tenth of the median half squared distance between reference classes.

    Returns:
        hard (N,) int64 reference class ids and soft (N, K') float probabilities (0 on absent classes).
    """
    ref = embedding.reference.to(label_part.device) * weight  # (K', r)
    present = embedding.reference_present.to(label_part.device)
    d2 = torch.cdist(label_part.double(), torch.nan_to_num(ref, nan=0.0)).square()  # (N, K')
    d2[:, ~present] = float("inf")
    if temperature is None:
        rp = ref[present]
        pair = torch.pdist(rp).square() / 2 if rp.shape[0] > 1 else rp.new_ones(1)
        temperature = float(pair.median().clamp_min(1e-12)) / 10
    check_real("temperature", temperature, low=0, low_open=True)
    soft = torch.softmax(-d2 / (2 * temperature), dim=1)  # (N, K')
    return d2.argmin(1), soft


def assign_classes(
    source_stats: ClassStats,
    reference_stats: ClassStats,
    extra_cost: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every source class to a reference class by OT between the class distributions.

    The cost between source class ``k`` and reference class ``l`` is ``W2^2`` between their diagonal
    Gaussians (plus ``extra_cost[k, l]`` if given, e.g. a label-space term); the class masses are the
    class frequencies. The transport plan (from :func:`geomloss.ot.solve` at a small regularisation) is
    normalised per row into soft assignments; the hard assignment is each row's argmax. This is what
    relabels a source whose label set differs from the reference (digits toward clothing).

    Returns:
        mapping (K,) int64 (-1 for absent source classes) and soft (K, K') row-stochastic assignments.
    """
    from geomloss import ot  # lazy: geomloss imports pykeops, which must not load at import time

    emb = LabelEmbedding.fit(source_stats, reference_stats)
    cost = emb.class_costs()  # (K, K')
    if extra_cost is not None:
        cost = cost + extra_cost.to(cost)
    sp, rp = source_stats.present, reference_stats.present.to(cost.device)
    c = cost[sp][:, rp]  # (Ks, Kr)
    a = source_stats.counts[sp].to(c)
    b = reference_stats.counts.to(c.device)[rp].to(c)
    a, b = a / a.sum(), b / b.sum()
    scale = float(c.max() - c.min()) or 1.0
    plan = ot.solve((c - c.min()) / scale, a=a, b=b, reg=1e-3, max_iter=5000).plan  # (Ks, Kr)
    rows = plan / plan.sum(1, keepdim=True).clamp_min(1e-300)
    soft = cost.new_zeros(cost.shape)
    soft[torch.nonzero(sp).flatten()[:, None], torch.nonzero(rp).flatten()[None, :]] = rows
    mapping = torch.full((cost.shape[0],), -1, dtype=torch.long, device=cost.device)
    mapping[sp] = torch.nonzero(rp).flatten()[rows.argmax(1)]
    return mapping, soft
