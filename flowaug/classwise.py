"""Class-wise flows: every source class flows toward its paired reference class.

A class-wise flow is an ordinary flow of one objective, so it runs through the same integrator and the
same result assembly as a joint flow. The objective is :class:`ClassWise`: for a term that needs a
reference it is

    F(z) = sum_c (n_c / N) F_c(z_c),          F_c: the term between class c's points and its reference class,

whose Wasserstein gradient at a point of class c, ``N grad_{z_i} F = n_c grad_{z_i} F_c``, is exactly the
velocity of class c's own flow (features only: the label part of each class is constant). Terms without a
reference (potentials, interactions, custom functions, entropy) are evaluated once on the whole batch.
The guard sees the summed objective, so a halved step is halved for every class and the reported times
are the same for all.

Pairing (``class_map``): ``"same"`` (source class k -> reference class k, the label sets correspond),
``"ot"`` (classes paired by OT between class Gaussians, :func:`~flowaug.assign_classes`) or an explicit
(K,) tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .labels import ClassStats, assign_classes
from .objectives import Context, Evaluation, Objective

__all__ = ["ClassWise", "class_mapping"]


def class_mapping(class_map, hard: torch.Tensor, feats: torch.Tensor, ref, source_stats: ClassStats | None,
                  explicit: torch.Tensor | None = None) -> torch.Tensor:
    """(K,) reference class of every source class, from ``"same"``, ``"ot"`` or an explicit tensor.

    Args:
        class_map: ``"same"``, ``"ot"`` or a tuple (then ``explicit`` is its tensor).
        hard: (N,) hard source labels; feats: (N, d) features (for ``"ot"`` without ``source_stats``).
    """
    k_src = int(hard.max()) + 1
    if class_map == "same":
        mapping = torch.arange(k_src, device=hard.device)
    elif class_map == "ot":
        stats = source_stats or ClassStats(single_sample=ref.stats.single_sample).update(feats.double(), hard)
        mapping = assign_classes(stats, ref.stats)[0].to(hard.device)
    else:
        mapping = explicit.to(hard.device)
    if mapping.numel() < k_src:
        raise ValueError(f"class_map must map {k_src} source classes, got {mapping.numel()} entries")
    return mapping


@dataclass(frozen=True)
class _Group:
    rows: torch.Tensor  # (n_c,) rows of the batch in this class
    weight: float  # n_c / N
    ctx: Context  # the class's own reference points


class ClassWise(Objective):
    """``objective`` evaluated class by class against paired reference classes (see the module docstring).

    Built by the engine with :meth:`build`; its state is a tuple over the objective's terms, each a tuple
    over classes for reference terms.
    """

    def __init__(self, objective: Objective, groups: list[_Group]):
        self.objective, self.groups = objective, groups
        self._terms_list = objective.terms()

    needs_reference = True

    @property
    def temperature(self) -> float:  # type: ignore[override]
        return self.objective.temperature

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.objective.stochastic

    @classmethod
    def build(cls, objective: Objective, ctx: Context, hard: torch.Tensor, mapping: torch.Tensor, ref, *,
              dtype: torch.dtype, reference_index: torch.Tensor | None, select_backend) -> "ClassWise":
        """One group per source class present in ``hard`` (N,), with its paired reference points."""
        allowed = None
        if reference_index is not None:
            allowed = torch.zeros(ref.num_samples, dtype=torch.bool, device=ref.device)
            allowed[reference_index] = True
        groups, n = [], hard.shape[0]
        for c in torch.unique(hard).tolist():
            rows = torch.nonzero(hard == c).flatten()
            target = int(mapping[c])
            in_class = ref.labels == target
            if allowed is not None:
                in_class &= allowed
            ref_idx = torch.nonzero(in_class).flatten()
            if ref_idx.numel() == 0:
                raise ValueError(f"reference has no samples of class {target}, paired with source class {c}")
            z_ref, ref_half, cache = ref.prepared(None, 0.0, dtype, ref_idx)  # cache: the full reference's scales
            sub = replace(ctx, z_ref=z_ref, ref_half=ref_half, cache=cache, labels=None, ref_subset=ref_idx,
                          backend=select_backend(len(rows), len(ref_idx)))
            groups.append(_Group(rows=rows.to(ctx.z_ref.device), weight=len(rows) / n, ctx=sub))
        return cls(objective, groups)

    def evaluate(self, z, ctx, state=None):
        value, grad = z.new_zeros(()), torch.zeros_like(z)  # (), (N, D)
        k = len(self._terms_list)
        states = state if isinstance(state, tuple) and len(state) == k else (None,) * k
        new_states, iterations = [], []
        for (w, term), term_state in zip(self._terms_list, states):
            if w == 0:
                new_states.append(term_state)
                continue
            if not term.needs_reference:
                ev = term.evaluate(z, ctx, term_state)
                value, s = value + w * ev.value, ev.state
                grad.add_(ev.grad, alpha=w)
            else:
                per_class = term_state if isinstance(term_state, tuple) else (None,) * len(self.groups)
                s, its = [], []
                for group, cs in zip(self.groups, per_class):
                    ev = term.evaluate(z[group.rows], group.ctx, cs)
                    value = value + w * group.weight * ev.value
                    grad[group.rows] += w * ev.grad  # n_c grad F_c: class c's own velocity
                    s.append(ev.state)
                    its.append(ev.iterations)
                s = tuple(s)
                if any(i is not None for i in its):
                    iterations.append(tuple(its))
            new_states.append(s)
        its = iterations[0] if len(iterations) == 1 else tuple(iterations) or None
        return Evaluation(value, grad, tuple(new_states), its)

    def constant(self, ctx) -> float:
        total = 0.0
        for w, term in self._terms_list:
            if w == 0:
                continue
            if term.needs_reference:
                total += w * sum(g.weight * term.constant(g.ctx) for g in self.groups)
            else:
                total += w * term.constant(ctx)
        return total

    def __repr__(self) -> str:
        return f"ClassWise({self.objective!r}, classes={len(self.groups)})"
