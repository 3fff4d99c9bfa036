"""The flow engine: ``flow`` = prepare -> integrate -> assemble, on tensors only.

    z_{t+1} = z_t - tau * v(z_t),      v(z_i) = N * grad_{z_i} F(rho_z)       (+ Langevin noise)

``z = [x; lambda * e_y]`` carries the label embedding (see :mod:`flowaug.labels`); with
``labels="fixed"`` only the features move, with ``labels="flow"`` the label part moves too and is decoded
back to reference classes.

Where things happen (one place each):

* options and their validation: :class:`flowaug.FlowConfig` (:mod:`flowaug.config`);
* the step rule (Euler, momentum, Langevin noise, clamp, the halving guard): :mod:`flowaug.integrate`;
* class-wise flows (``class_map``): the :class:`~flowaug.classwise.ClassWise` objective;
* this module: checks the tensors, builds the problem (label embedding, prepared reference, backend),
  runs the integrator and assembles the :class:`FlowResult` (decoding labels).

No DataLoader, no Lightning, no global state beyond the KeOps fallback flag: adapters
(:class:`~flowaug.FlowTransform`, :class:`~flowaug.FlowDataset`) call :func:`run` with their config.
"""

from __future__ import annotations


from dataclasses import dataclass, field
from typing import Any

import torch

from . import backends
from ._checks import check_finite_tensor, check_labels, check_same_device, describe, warn_user
from .classwise import ClassWise, class_mapping
from .config import DECODERS, LABEL_MODES, FlowConfig, build_config
from .integrate import Dynamics, Path, integrate
from .labels import ClassStats, LabelEmbedding, assign_classes, decode_labels
from .objectives import Context, Evaluation, Objective
from .policy import LabelPlan, label_plan
from .reference import Reference, ReferenceLike

__all__ = ["FlowResult", "flow", "run", "LABEL_MODES", "DECODERS"]


@dataclass
class FlowResult:
    """What :func:`flow` returns.

    Attributes:
        x: moved points, with the caller's shape, dtype, device and memory format.
        labels: hard labels: the input labels (``labels="fixed"``) or decoded reference classes.
        soft_labels: (B, K') probabilities over reference classes (``labels="flow"``), else None.
        objective: (T,) float64 objective values along the flow (None if not tracked).
        times: (T,) flow times of those values (sum of the step sizes actually taken).
        trajectory: snapshots of ``x`` at the requested steps (caller's shape/dtype); ``trajectory_times``
            and ``trajectory_labels`` (hard labels, or None) go with them.
        step_size: the step size at the end (smaller than asked if the divergence guard halved it).
        backend: the backend that ran.
        iterations: solver iterations per evaluation (Sinkhorn: (x-y, x-x) pairs), for diagnostics.
        class_map: ``decode="class"`` or class-wise flows: (K,) reference class of each source class.
        warm: the objective's solver state; pass ``warm=result.warm`` to start the next flow toward the
            same reference from it.
    """

    x: torch.Tensor
    labels: torch.Tensor | None
    soft_labels: torch.Tensor | None = None
    objective: torch.Tensor | None = None
    times: torch.Tensor | None = None
    trajectory: list = field(default_factory=list)
    trajectory_times: list = field(default_factory=list)
    trajectory_labels: list = field(default_factory=list)
    step_size: float = 0.0
    backend: str = ""
    iterations: list = field(default_factory=list)
    class_map: torch.Tensor | None = None
    warm: Any = field(default=None, repr=False)


#: against a reference of [0, 1] pixels, a batch reaching below -UNITS_SLACK x (reference span), or above its
#: range by a whole span, looks normalized (v2.Normalize) against a raw reference: the engine warns
UNITS_SLACK = 0.25


def _warn_on_scale_mismatch(x: torch.Tensor, ref: Reference) -> None:
    """Warn (with the fix) when batch and reference live on scales 20x apart, e.g. 0..255 vs 0..1."""
    lo, hi = ref.value_range()
    ref_size = max(abs(lo), abs(hi))
    size = float(x.detach().abs().amax()) if x.numel() else 0.0
    if ref_size > 0 and size > 20 * ref_size:
        warn_user(
            f"x reaches {size:.4g} but the reference lies in [{lo:.4g}, {hi:.4g}]: they look like different "
            "units (pixels 0..255 vs 0..1?); scale x (x / 255, or v2.ToDtype(torch.float32, scale=True))",
            kind="units")
    elif size > 0 and ref_size > 20 * size:
        warn_user(
            f"the reference reaches {ref_size:.4g} but x lies within {size:.4g}: they look like different units "
            "(pixels 0..255 vs 0..1?); scale the reference the same way as x", kind="units")
    else:
        x_lo, x_hi = float(x.detach().amin()), float(x.detach().amax())
        span = hi - lo
        pixels = 0 <= lo and hi <= 1  # the reference looks like float images in [0, 1] (ToDtype(scale=True))
        if pixels and span > 0 and (x_lo < -UNITS_SLACK * span or x_hi > hi + span):
            warn_user(
                f"x lies in [{x_lo:.4g}, {x_hi:.4g}] but the reference in [{lo:.4g}, {hi:.4g}]: if x was normalized "
                "(v2.Normalize) and the reference was not, normalize the reference the same way, or the flow will "
                "move x toward other units", kind="units")


def _check_batch(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, ...), got {describe(x)}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch of shape (B, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"x must be a floating-point tensor, got {x.dtype}; convert images with "
            "flowaug.data.as_float_images (uint8 -> [0, 1]) or use FlowTransform, which does it"
        )



def flow(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    reference: ReferenceLike | None = None,
    config: FlowConfig | None = None,
    *,
    source_stats: ClassStats | None = None,
    reference_index: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    warm=None,
    progress: bool = False,
    **options,
) -> FlowResult:
    """Flow a batch toward a reference dataset along the Wasserstein gradient flow of ``objective``.

    Args:
        x: (B, ...) float batch (any float dtype; computed in ``dtype``, returned in the caller's).
        y: (B,) class ids or (B, K) soft labels of the batch, or None (unlabeled flow).
        reference: a :class:`~flowaug.Reference`, a ``(features, labels)`` pair, a features tensor or a
            Dataset. Optional only for objectives without a reference term (potentials, custom).
        config: a :class:`~flowaug.FlowConfig` holding the options below; keyword options are applied over
            it (``flow(x, y, ref, cfg, steps=3)``). Without one, the keywords alone (defaults as listed).

    Options (keywords, or fields of ``config``):
        objective: an :class:`~flowaug.Objective` or a name (:data:`flowaug.objectives.OBJECTIVES`:
            ``"sinkhorn"`` or its alias ``"otdd"``, ``"mmd"`` or ``"gaussian"`` (Gaussian MMD), ``"energy"``,
            ``"laplacian"``, ``"linear"`` (mean matching), ``"sliced"``). Compose with ``+`` and ``*``.
        steps: number of Euler steps; total flow time is ``steps * step_size``.
        step_size: tau. For Sinkhorn, tau = 1 moves a point by its full barycentric displacement.
        labels: ``"fixed"`` (only features move; labels returned unchanged) or ``"flow"`` (the label
            part moves and is decoded to reference classes).
        label_weight: lambda in ``z = [x; lambda * e_y]``; 1 weighs feature and label distances equally
            as in OTDD; 0 flows features only.
        decode: ``"point"`` (each point to its nearest reference class in label space) or ``"class"``
            (each source class to one reference class, by OT between the class distributions).
        soft_temperature: temperature of the soft labels (None: derived from the reference classes).
        momentum: heavy-ball coefficient in [0, 1).
        clamp: ``(low, high)`` to clamp the features after every step (e.g. ``(0, 1)`` for pixels), or
            ``"auto"``: the reference's value range.
        backend: ``"auto"``, ``"tensorized"`` (dense torch), ``"chunked"`` (dense arithmetic on row blocks,
            memory bounded) or ``"keops"``.
        dtype: computation dtype, ``torch.float32`` or ``torch.float64``.
        snapshots: steps at which to keep ``x``: a list of step indices, a count of evenly spaced
            snapshots, or ``"all"``.
        source_stats: class statistics of the source dataset (:class:`~flowaug.ClassStats`); default:
            estimated from this batch.
        reference_index: (M',) indices of the reference points to use for this flow (a sample).
        generator: random generator for noise and sliced projections.
        track_objective: compute the objective at every step including the last and its reference
            constant (costs one extra evaluation and, once per reference, the reference self-term).
        guard: detect divergence (objective increase or non-finite values) and halve the step size.
        warm: solver state (``result.warm``) of a previous flow toward the same reference.
        progress: show a progress bar over steps.
        class_map: class-wise flows instead of one joint label-aware flow: ``"same"`` (source class k
            flows toward reference class k: same label set), ``"ot"`` (classes paired by
            :func:`~flowaug.assign_classes`), or a (K,) tensor of reference classes. Each class flows
            on its own, features only; ``labels="flow"`` returns the paired reference classes. Use it
            when the label correspondence is known: OTDD's class distances across a domain shift can
            pair the wrong classes (MNIST -> USPS: most MNIST classes are nearest to USPS class 4).

    Which flow runs is decided by one rule (:func:`flowaug.policy.label_plan`, shared with the adapters):
    labels on both sides and ``label_weight > 0`` give the label-aware flow, else features only;
    ``labels="flow"`` and ``class_map`` refuse data without labels on both sides.

    Returns:
        a :class:`FlowResult`.

    Example:
        >>> import torch, flowaug
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(128, 2, generator=g)
        >>> ref = torch.randn(256, 2, generator=g) + torch.tensor([4.0, 0.0])
        >>> out = flowaug.flow(x, reference=ref, steps=10)
        >>> bool((out.x.mean(0) - ref.mean(0)).norm() < 0.05)  # the batch now sits on the reference
        True
    """
    config = build_config(config, {}, options, "flow")
    return run(x, y, reference, config, source_stats=source_stats, reference_index=reference_index,
               generator=generator, warm=warm, progress=progress)


def run(x: torch.Tensor, y: torch.Tensor | None, reference, config: FlowConfig, *,
        source_stats: ClassStats | None = None, reference_index: torch.Tensor | None = None,
        generator: torch.Generator | None = None, warm: Any = None, progress: bool = False) -> FlowResult:
    """:func:`flow` with a ready :class:`~flowaug.FlowConfig` (what the adapters call): prepare, integrate,
    assemble. Nothing is mutated: ``x``, ``y``, ``reference`` and ``warm`` are read only."""
    if not isinstance(config, FlowConfig):
        raise TypeError(f"config must be a FlowConfig, got {describe(config)}")
    ref, label_kind, plan = _check_inputs(x, y, reference, config, source_stats, reference_index)
    if isinstance(warm, dict) and not warm:  # flowaug <= 0.1 passed an empty dict for "no state yet"
        warm = None
    with torch.autocast(device_type=x.device.type, enabled=False), torch.no_grad():
        problem = _prepare(x, y, ref, config, plan, source_stats, reference_index, generator)
        problem.label_kind = label_kind
        evaluator = _Evaluator(problem, x.device)
        path = integrate(problem.z, evaluator, _dynamics(problem, config), state=warm,
                         snapshot_steps=config.snapshot_steps(), generator=generator, progress=progress)
        return _assemble(path, problem, x, y, config)


# ---------------------------------------------------------------------- prepare
def _check_inputs(x, y, reference, config: FlowConfig, source_stats, reference_index):
    """Every check on the tensors (the options were checked by the config); returns (Reference, label kind,
    label plan)."""
    _check_batch(x)
    ref = None if reference is None else Reference.coerce(reference)
    if ref is None:
        if config.objective.needs_reference:
            raise ValueError(f"reference is required by the objective {config.objective!r}, got None")
        if config.clamp == "auto":
            raise ValueError("clamp='auto' means the reference's value range, but reference is None")
    else:
        check_same_device(x=x, reference=ref.features)
        if x[0].numel() != ref.dim:
            raise ValueError(
                f"x samples have {x[0].numel()} features (shape {tuple(x.shape[1:])}) but reference samples "
                f"have {ref.dim} (shape {ref.sample_shape}); they must match"
            )
    check_finite_tensor("x", x)
    if ref is not None:
        _warn_on_scale_mismatch(x, ref)
    if reference_index is not None:
        _check_reference_index(reference_index, ref)
    label_kind = None
    if y is not None:
        check_same_device(x=x, y=y)
        k_src = None if source_stats is None else source_stats.counts.shape[0]
        label_kind = check_labels("y", y, x.shape[0], num_classes=k_src if (y.ndim == 2 or k_src) else None)
    plan = label_plan(config, y, ref)
    return ref, label_kind, plan


def _check_reference_index(index, ref) -> None:
    if ref is None:
        raise ValueError("reference_index needs a reference")
    if not isinstance(index, torch.Tensor) or index.ndim != 1 or index.is_floating_point():
        raise TypeError(f"reference_index must be a 1-D integer tensor, got {describe(index)}")
    if index.numel() == 0 or int(index.max()) >= ref.num_samples or int(index.min()) < 0:
        raise ValueError(f"reference_index must hold indices in [0, {ref.num_samples}), got {describe(index)}")


@dataclass
class _Problem:
    """A flow ready to integrate: the points in the flow's space and the objective that moves them."""

    z: torch.Tensor  # (N, D) = [features (N, d); label part (N, D - d)]
    d: int
    objective: Objective
    ctx: Context
    contexts: list  # every Context a KeOps failure must switch to dense
    ref: Reference | None
    emb: LabelEmbedding | None = None
    mapping: torch.Tensor | None = None  # class-wise: (K,) reference class of each source class
    label_kind: str | None = None


def _prepare(x, y, ref, config: FlowConfig, plan: LabelPlan, source_stats, reference_index, generator) -> _Problem:
    n, dtype = x.shape[0], config.dtype
    feats = x.detach().reshape(n, -1).to(dtype=dtype, copy=True)  # (N, d), a copy: never alias x
    classwise = plan.kind == "classwise"
    emb, z = None, feats
    if plan.kind == "joint":
        stats = source_stats or ClassStats(single_sample=ref.stats.single_sample).update(feats, y)
        emb = LabelEmbedding.fit(stats, ref.stats)
        part = emb.embed(y.to(feats.device), side="source").to(dtype) * config.label_weight  # (N, r)
        z = torch.cat([feats, part], 1)  # (N, d + r)

    def select(rows: int, cols: int) -> str:
        return backends.select(config.backend, x.device, rows, max(cols, 1), z.shape[1], z.element_size())

    if ref is not None and not classwise:
        z_ref, ref_half, cache = ref.prepared(emb, config.label_weight, dtype, reference_index)  # (M, D), (M,)
    else:  # no reference, or class-wise: the reference terms get their own contexts per class
        z_ref, ref_half, cache = z.new_zeros(0, z.shape[1]), z.new_zeros(0), {}
    ctx = Context(z_ref=z_ref, ref_half=ref_half, backend=select(n, z_ref.shape[0]), feature_dim=feats.shape[1],
                  feature_shape=tuple(x.shape[1:]), labels=y, cache=cache, generator=generator,
                  ref_subset=reference_index)
    problem = _Problem(z=z, d=feats.shape[1], objective=config.objective, ctx=ctx, contexts=[ctx], ref=ref, emb=emb)
    if classwise:
        hard = y if y.ndim == 1 else y.argmax(1)
        problem.mapping = class_mapping(config.class_map, hard, feats, ref, source_stats,
                                        config.class_map_tensor())
        problem.objective = ClassWise.build(config.objective, ctx, hard, problem.mapping, ref, dtype=dtype,
                                            reference_index=reference_index, select_backend=select)
        problem.contexts += [g.ctx for g in problem.objective.groups]
    return problem


def _dynamics(problem: _Problem, config: FlowConfig) -> Dynamics:
    obj = problem.objective
    clamp = config.clamp
    if clamp == "auto":  # the reference's range, widened to the batch's: never moves what the flow did not
        lo, hi = problem.ref.value_range()
        feats = problem.z[:, :problem.d]
        clamp = (min(lo, float(feats.min())), max(hi, float(feats.max())))
    return Dynamics(
        steps=config.steps, step_size=config.step_size,
        moving=slice(None) if config.labels == "flow" else slice(0, problem.d), feature_dim=problem.d,
        momentum=config.momentum, temperature=obj.temperature, clamp=clamp, guard=config.guard,
        monotone=config.momentum == 0 and obj.temperature == 0 and not obj.stochastic,
        track_last=config.track_objective,
    )


class _Evaluator:
    """Evaluates the objective; on a KeOps failure, switches every context to dense and retries once."""

    def __init__(self, problem: _Problem, device: torch.device):
        self.problem, self.device = problem, device

    def __call__(self, z: torch.Tensor, state) -> Evaluation:
        p = self.problem
        try:
            return p.objective.evaluate(z, p.ctx, state)
        except (KeyboardInterrupt, FloatingPointError):
            raise
        except Exception as err:  # noqa: BLE001 - only KeOps failures are retried, see below
            if not any(c.backend == "keops" for c in p.contexts):
                raise
            backends.disable_keops(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            for c in p.contexts:
                if c.backend == "keops":
                    c.backend = backends.select("auto", self.device, z.shape[0], max(c.z_ref.shape[0], 1),
                                                z.shape[1], z.element_size())
            return p.objective.evaluate(z, p.ctx, state)


# ---------------------------------------------------------------------- assemble
def _restore(z: torch.Tensor, like: torch.Tensor, d: int) -> torch.Tensor:
    """(N, D) computation -> caller's shape, dtype, device and memory format."""
    out = torch.empty_like(like)
    out.copy_(z[:, :d].reshape(like.shape))
    return out


def _assemble(path: Path, problem: _Problem, x, y, config: FlowConfig) -> FlowResult:
    """The same for joint and class-wise flows: restore shapes, decode labels, add the reference constant."""
    hard, soft, class_map = _labels_at(path.z, problem, y, config, final=True)
    if problem.mapping is not None:
        class_map = problem.mapping
    objective = None
    if config.track_objective:
        constant = problem.objective.constant(problem.ctx) if problem.ref is not None else 0.0
        objective = torch.tensor(path.values, dtype=torch.float64) + constant
    return FlowResult(
        x=_restore(path.z, x, problem.d),
        labels=hard,
        soft_labels=None if soft is None else soft.to(torch.float32),
        objective=objective,
        times=torch.tensor(path.times, dtype=torch.float64),
        trajectory=[_restore(zz, x, problem.d) for _, _, zz in path.snapshots],
        trajectory_times=[t for _, t, _ in path.snapshots],
        trajectory_labels=[_labels_at(zz, problem, y, config, final=False)[0] for _, _, zz in path.snapshots],
        step_size=path.step_size,
        backend=problem.ctx.backend if problem.mapping is None else problem.contexts[-1].backend,
        iterations=path.iterations,
        class_map=class_map,
        warm=path.state,
    )


def _labels_at(z, problem: _Problem, y, config: FlowConfig, *, final: bool):
    """(hard, soft, class map) of the points ``z``: the input labels unless labels flow. Snapshots
    (``final=False``) get hard labels only, and none for class-level decoding (decided at the end)."""
    if config.labels != "flow":
        return (y if final else None), None, None
    if problem.mapping is not None:  # class-wise: each class becomes its paired reference class
        hard = problem.mapping[(y if y.ndim == 1 else y.argmax(1)).long()]
        k = max(problem.ref.num_classes, int(problem.mapping.max()) + 1)
        return hard, torch.nn.functional.one_hot(hard, k).float(), problem.mapping
    if config.decode == "point":
        hard, soft = decode_labels(z[:, problem.d:], problem.emb, config.label_weight, config.soft_temperature)
        return hard, soft, None
    if not final:
        return None, None, None
    flowed = ClassStats(single_sample="zero").update(z[:, :problem.d], y)
    class_map, soft_map = assign_classes(flowed, problem.ref.stats)
    if problem.label_kind == "hard":
        return class_map[y.long()], soft_map[y.long()].float(), class_map
    soft = y.double() @ soft_map
    return soft.argmax(1), soft.float(), class_map
