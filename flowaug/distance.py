"""The optimal transport dataset distance (OTDD, Alvarez-Melis & Fusi 2020) between labeled datasets.

    OTDD(D1, D2) = S_eps over (x, y) with ground cost  ||x - x'||^2 / 2 + lambda^2 W2^2(y, y') / 2

(geomloss's halved squared cost; ``sqrt(2 S)`` is in data units). With diagonal class Gaussians the label
term embeds isometrically (:class:`~flowaug.LabelEmbedding`) and the distance is a plain debiased Sinkhorn
divergence in the augmented space, computed by ``geomloss.SamplesLoss``. With full covariances the label
term is the Bures-Wasserstein distance, which has no flat embedding; the cost is then a custom dense cost
(geomloss's tensorized backend): features plus a looked-up class-pair table.

The distance is symmetric: ``otdd(x1, y1, x2, y2) == otdd(x2, y2, x1, y1)`` up to the Sinkhorn solver's
precision. Every data-dependent choice treats the two datasets alike: each is subsampled by its own
generator seeded from ``seed`` alone (a dataset's sample does not depend on its position), and
``blur="auto"`` is computed from both datasets (:func:`auto_blur`).
"""

from __future__ import annotations

import torch

from ._checks import check_choice, check_finite_tensor, check_int, check_labels, check_real, describe
from .labels import ClassStats, LabelEmbedding

__all__ = ["auto_blur", "bures_class_costs", "otdd"]


def auto_blur(x1: torch.Tensor, x2: torch.Tensor) -> float:
    """The blur of ``otdd(..., blur="auto")``: ``AUTO_BLUR`` (0.2) times the mean of the two datasets' median
    pairwise distances (each on an evenly strided subset of at most 1024 of its rows, features flattened).

    Symmetric in its arguments, and equal to the single-dataset rule when both datasets have the same spread.
    Within-dataset medians rather than the median over the union: the union's median grows with the shift
    between the datasets, so the blur would grow with the very distance being measured.
    """
    from .objectives.base import median_distance
    from .objectives.sinkhorn import AUTO_BLUR

    m1 = median_distance(x1.reshape(len(x1), -1))
    m2 = median_distance(x2.reshape(len(x2), -1))
    return AUTO_BLUR * (m1 + m2) / 2


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def bures_class_costs(x1, y1, x2, y2) -> torch.Tensor:
    """(K1, K2) squared W2 between full-covariance class Gaussians (float64)."""
    def moments(x, y):
        out = {}
        for c in torch.unique(y).tolist():
            xc = x[y == c].double()
            mu = xc.mean(0)
            cov = (xc - mu).T @ (xc - mu) / max(len(xc), 1)
            out[c] = (mu, cov)
        return out

    m1, m2 = moments(x1, y1), moments(x2, y2)
    k1, k2 = max(m1) + 1, max(m2) + 1
    cost = torch.full((k1, k2), float("inf"), dtype=torch.float64)
    roots = {c: _sqrtm_psd(cov) for c, (_, cov) in m1.items()}
    for a, (mu_a, cov_a) in m1.items():
        for b, (mu_b, cov_b) in m2.items():
            cross = _sqrtm_psd(roots[a] @ cov_b @ roots[a])
            bures = torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross)
            cost[a, b] = (mu_a - mu_b).square().sum() + bures.clamp_min(0)
    return cost


def otdd(
    x1: torch.Tensor,
    y1: torch.Tensor,
    x2: torch.Tensor,
    y2: torch.Tensor,
    *,
    blur="auto",
    label_weight: float = 1.0,
    covariance: str = "diag",
    max_samples: int | None = 4000,
    seed: int = 0,
    scaling: float = 0.95,
) -> float:
    """OTDD between ``(x1, y1)`` and ``(x2, y2)`` (debiased Sinkhorn divergence, geomloss conventions).

    Args:
        x1, x2: (N, ...) float features (uint8 images are scaled to [0, 1]); y1, y2: (N,) class ids.
        blur: entropic blur in data units, or ``"auto"``: 0.2 times the mean of the two datasets' median
            pairwise distances (:func:`auto_blur`; symmetric in the two datasets).
        label_weight: lambda on the label term (0: plain Sinkhorn divergence between the features).
        covariance: ``"diag"`` (isometric embedding) or ``"full"`` (Bures-Wasserstein class costs).
        max_samples: subsample each dataset to at most this many points, None for all. Each dataset is
            drawn by its own generator seeded with ``seed``, so its sample does not depend on which
            argument it is.
        seed: seed of the subsampling.
        scaling: geomloss's epsilon-scaling ratio (0.95: accurate; its default 0.5 is not, see README).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(200, 2, generator=g), torch.arange(200) % 2
        >>> round(otdd(x, y, x, y), 6)
        0.0
        >>> otdd(x, y, x + 3, y) > otdd(x, y, x + 1, y)
        True
    """
    from geomloss import SamplesLoss  # lazy: geomloss imports pykeops

    from .data import as_float_images

    check_choice("covariance", covariance, ("diag", "full"))
    label_weight = check_real("label_weight", label_weight, low=0)
    if max_samples is not None:
        check_int("max_samples", max_samples, minimum=2)
    seed = check_int("seed", seed, minimum=0)

    def prep(x, y, xname, yname):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{xname} must be a torch.Tensor (N, ...), got {describe(x)}")
        if x.ndim < 1 or len(x) < 2:
            raise ValueError(f"{xname} must hold N >= 2 samples (N, ...), got shape {tuple(x.shape)}")
        check_labels(yname, y, len(x), allow_soft=False)
        x = as_float_images(x).reshape(len(x), -1).double()
        check_finite_tensor(xname, x)
        if max_samples is not None and len(x) > max_samples:
            g = torch.Generator().manual_seed(seed)  # one generator per dataset: its sample ignores its position
            idx = torch.randperm(len(x), generator=g)[:max_samples]
            x, y = x[idx], y[idx]
        return x, y.long()

    a, ya = prep(x1, y1, "x1", "y1")
    b, yb = prep(x2, y2, "x2", "y2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x1 and x2 must have the same number of features, got {a.shape[1]} and {b.shape[1]}")
    eps_blur = auto_blur(a, b) if blur == "auto" else check_real("blur", blur, low=0, low_open=True)
    if label_weight == 0:
        return float(SamplesLoss("sinkhorn", p=2, blur=eps_blur, scaling=scaling, debias=True)(a, b))
    if covariance == "diag":
        emb = LabelEmbedding.fit(ClassStats().update(a, ya), ClassStats().update(b, yb))
        za = torch.cat([a, label_weight * emb.embed(ya, "source")], 1)
        zb = torch.cat([b, label_weight * emb.embed(yb, "reference")], 1)
        return float(SamplesLoss("sinkhorn", p=2, blur=eps_blur, scaling=scaling, debias=True)(za, zb))
    table = bures_class_costs(a, ya, b, yb)  # (K1, K2)
    k = max(table.shape)
    full = torch.zeros(2 * k, 2 * k, dtype=torch.float64)  # one table for all four problems (xy, yx, xx, yy)
    full[:k, k:][: table.shape[0], : table.shape[1]] = table
    full[k:, :k] = full[:k, k:].T
    full[:k, :k][: table.shape[0], : table.shape[0]] = bures_class_costs(a, ya, a, ya)
    full[k:, k:][: table.shape[1], : table.shape[1]] = bures_class_costs(b, yb, b, yb)
    za = torch.cat([a, ya[:, None].double()], 1)  # last column: the class id (0..k-1)
    zb = torch.cat([b, (yb[:, None] + k).double()], 1)  # reference classes are k..2k-1

    def cost(u, v):  # (B, N, D+1), (B, M, D+1) -> (B, N, M)
        feats = torch.cdist(u[..., :-1], v[..., :-1]).square()
        pair = full[u[..., -1].long()[..., :, None], v[..., -1].long()[..., None, :]]
        return (feats + label_weight**2 * pair) / 2

    loss = SamplesLoss("sinkhorn", p=2, blur=eps_blur, scaling=scaling, debias=True, cost=cost, backend="tensorized")
    return float(loss(za, zb))
