"""The flow engine: explicit Euler steps of a Wasserstein gradient flow, on tensors only.

    z_{t+1} = z_t - tau * v(z_t),      v(z_i) = N * grad_{z_i} F(rho_z)       (+ Langevin noise)

``z = [x; lambda * e_y]`` carries the label embedding (see :mod:`flowaug.labels`); with
``labels="fixed"`` only the features move, with ``labels="flow"`` the label part moves too and is decoded
back to reference classes. No DataLoader, no Lightning, no global state beyond the KeOps fallback flag:
adapters (:class:`~flowaug.FlowTransform`, :class:`~flowaug.FlowDataset`) call :func:`flow`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from . import backends
from ._checks import (
    check_choice,
    check_finite_tensor,
    check_int,
    check_labels,
    check_real,
    check_same_device,
    describe,
)
from .labels import ClassStats, LabelEmbedding, assign_classes, decode_labels
from .objectives import Context, as_objective
from .reference import Reference

__all__ = ["FlowResult", "flow", "LABEL_MODES", "DECODERS"]

LABEL_MODES = ("fixed", "flow")
DECODERS = ("point", "class")
MAX_HALVINGS = 8
_NEEDS_REFERENCE = ("Sinkhorn", "MMD", "SlicedWasserstein")


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
        class_map: ``decode="class"``: (K,) reference class of each source class.
        warm: solver state; pass ``warm=result.warm`` to start the next flow toward the same reference
            from it.
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
    warm: dict = field(default_factory=dict, repr=False)


def _warn_on_scale_mismatch(x: torch.Tensor, ref: Reference) -> None:
    """Warn (with the fix) when batch and reference live on scales 20x apart, e.g. 0..255 vs 0..1."""
    lo, hi = ref.value_range()
    ref_size = max(abs(lo), abs(hi))
    size = float(x.detach().abs().amax()) if x.numel() else 0.0
    if ref_size > 0 and size > 20 * ref_size:
        warnings.warn(
            f"x reaches {size:.4g} but the reference lies in [{lo:.4g}, {hi:.4g}]: they look like different "
            "units (pixels 0..255 vs 0..1?); scale x (x / 255, or v2.ToDtype(torch.float32, scale=True))",
            RuntimeWarning, stacklevel=3,
        )
    elif size > 0 and ref_size > 20 * size:
        warnings.warn(
            f"the reference reaches {ref_size:.4g} but x lies within {size:.4g}: they look like different units "
            "(pixels 0..255 vs 0..1?); scale the reference the same way as x", RuntimeWarning, stacklevel=3,
        )


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


def _snapshot_steps(snapshots, steps: int) -> set[int]:
    if snapshots is None:
        return set()
    if isinstance(snapshots, str) and snapshots == "all":
        return set(range(steps + 1))
    if isinstance(snapshots, int) and not isinstance(snapshots, bool):
        k = check_int("snapshots", snapshots, minimum=1)
        return {round(i * steps / max(k - 1, 1)) for i in range(k)} if k > 1 else {steps}
    out = set()
    for s in snapshots:
        s = check_int("snapshots entry", s)
        if s > steps:
            raise ValueError(f"snapshots must be steps in [0, {steps}], got {s}")
        out.add(s)
    return out


def _restore(z: torch.Tensor, like: torch.Tensor, d: int) -> torch.Tensor:
    """(N, D) computation -> caller's shape, dtype, device and memory format."""
    out = torch.empty_like(like)
    out.copy_(z[:, :d].reshape(like.shape))
    return out


def flow(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    reference=None,
    *,
    objective="sinkhorn",
    steps: int = 10,
    step_size: float = 1.0,
    labels: str = "fixed",
    label_weight: float = 1.0,
    decode: str = "point",
    soft_temperature: float | None = None,
    momentum: float = 0.0,
    clamp: tuple[float, float] | None = None,
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    snapshots=None,
    source_stats: ClassStats | None = None,
    reference_index: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    track_objective: bool = True,
    guard: bool = True,
    warm: dict | None = None,
    progress: bool = False,
    class_map=None,
) -> FlowResult:
    """Flow a batch toward a reference dataset along the Wasserstein gradient flow of ``objective``.

    Args:
        x: (B, ...) float batch (any float dtype; computed in ``dtype``, returned in the caller's).
        y: (B,) class ids or (B, K) soft labels of the batch, or None (unlabeled flow).
        reference: a :class:`~flowaug.Reference`, a ``(features, labels)`` pair, a features tensor or a
            Dataset. Optional only for objectives without a reference term (potentials, custom).
        objective: an :class:`~flowaug.Objective` or a name (``"sinkhorn"``, ``"mmd"``, ``"energy"``,
            ``"laplacian"``, ``"sliced"``). Compose with ``+`` and ``*``.
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
        clamp: ``(low, high)`` to clamp the features after every step (e.g. ``(0, 1)`` for pixels).
        backend: ``"auto"``, ``"tensorized"`` (dense torch) or ``"keops"``.
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
        warm: solver state from a previous :class:`FlowResult` toward the same reference.
        progress: show a progress bar over steps.
        class_map: class-wise flows instead of one joint label-aware flow: ``"same"`` (source class k
            flows toward reference class k: same label set), ``"ot"`` (classes paired by
            :func:`~flowaug.assign_classes`), or a (K,) tensor of reference classes. Each class flows
            on its own, features only; ``labels="flow"`` returns the paired reference classes. Use it
            when the label correspondence is known: OTDD's class distances across a domain shift can
            pair the wrong classes (MNIST -> USPS: most MNIST classes are nearest to USPS class 4).

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
    # ---------------------------------------------------------------- validation (nothing mutated)
    _check_batch(x)
    steps = check_int("steps", steps)
    tau = check_real("step_size", step_size, low=0, low_open=True)
    labels = check_choice("labels", labels, LABEL_MODES)
    label_weight = check_real("label_weight", label_weight, low=0)
    decode = check_choice("decode", decode, DECODERS)
    momentum = check_real("momentum", momentum, low=0, high=1, high_open=True)
    backend = check_choice("backend", backend, backends.BACKENDS)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if clamp is not None:
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise TypeError(f"clamp must be a (low, high) pair, got {describe(clamp)}")
        lo = check_real("clamp[0]", clamp[0])
        hi = check_real("clamp[1]", clamp[1], low=lo)
        clamp = (lo, hi)
    obj = as_objective(objective)
    n = x.shape[0]
    ref = None if reference is None else Reference.coerce(reference)
    if ref is None:
        needs = [type(t).__name__ for _, t in obj.terms() if type(t).__name__ in _NEEDS_REFERENCE]
        if needs:
            raise ValueError(f"reference is required by the objective terms {needs}, got None")
    else:
        check_same_device(x=x, reference=ref.features)
        d_ref = ref.dim
        if x[0].numel() != d_ref:
            raise ValueError(
                f"x samples have {x[0].numel()} features (shape {tuple(x.shape[1:])}) but reference samples "
                f"have {d_ref} (shape {ref.sample_shape}); they must match"
            )
    check_finite_tensor("x", x)
    if ref is not None:
        _warn_on_scale_mismatch(x, ref)
    if reference_index is not None:
        if ref is None:
            raise ValueError("reference_index needs a reference")
        if not isinstance(reference_index, torch.Tensor) or reference_index.ndim != 1 or reference_index.is_floating_point():
            raise TypeError(f"reference_index must be a 1-D integer tensor, got {describe(reference_index)}")
        if reference_index.numel() == 0 or int(reference_index.max()) >= ref.num_samples or int(reference_index.min()) < 0:
            raise ValueError(f"reference_index must hold indices in [0, {ref.num_samples}), got {describe(reference_index)}")
    label_kind = None
    if y is not None:
        check_same_device(x=x, y=y)
        k_src = None if source_stats is None else source_stats.counts.shape[0]
        label_kind = check_labels("y", y, n, num_classes=k_src if (y.ndim == 2 or k_src) else None)
    use_labels = y is not None and label_weight > 0 and ref is not None and ref.labels is not None
    if labels == "flow" and not use_labels:
        missing = "y is None" if y is None else "reference has no labels" if (ref is None or ref.labels is None) else "label_weight is 0"
        raise ValueError(f"labels='flow' needs source labels, reference labels and label_weight > 0, but {missing}")
    if use_labels and ref.num_classes < 2:
        raise ValueError(
            f"reference must have at least 2 classes for a label-aware flow, got {ref.num_classes}; "
            "pass label_weight=0 to flow features only"
        )
    shots = _snapshot_steps(snapshots, steps)
    mask = None  # class-wise flows run as one problem: (codes, ref codes, penalty, ref log-weights, labels)
    if class_map is not None:
        if y is None or ref is None or ref.labels is None:
            raise ValueError("class_map needs source labels y and a labeled reference")
        mapping = _class_mapping(class_map, x, y, ref, source_stats)
        # One masked problem costs N x M per step, a loop over classes about N x M / K plus K calls' overhead:
        # the masked problem wins on small batches (a FlowTransform batch), the loop on large chunks.
        masked_cost = n * (ref.num_samples if reference_index is None else len(reference_index))
        if not obj.class_mask or masked_cost > CLASS_LOOP_ABOVE:  # sliced, energy, or large: per class
            return _classwise(
                x, y, ref, mapping, labels=labels, reference_index=reference_index,
                warm={} if warm is None else warm, progress=progress,
                kwargs=dict(objective=obj, steps=steps, step_size=tau, momentum=momentum, clamp=clamp,
                            backend=backend, dtype=dtype, snapshots=sorted(shots), generator=generator,
                            track_objective=track_objective, guard=guard),
            )
        mask, reference_index = _class_mask(x, y, ref, mapping, reference_index)
        use_labels = False

    # ---------------------------------------------------------------- set-up (compute dtype, no autocast)
    with torch.autocast(device_type=x.device.type, enabled=False), torch.no_grad():
        feats = x.detach().reshape(n, -1).to(dtype=dtype, copy=True)  # (N, d), a copy: never alias x
        d = feats.shape[1]
        emb = None
        if use_labels:
            if source_stats is None:
                source_stats = ClassStats(single_sample=ref.stats.single_sample).update(feats, y)
            emb = LabelEmbedding.fit(source_stats, ref.stats)
            part = emb.embed(y.to(feats.device), side="source").to(dtype) * label_weight  # (N, r)
            z = torch.cat([feats, part], 1)  # (N, d + r)
        else:
            z = feats
        if ref is not None:
            z_ref, ref_half, cache = ref.prepared(emb, label_weight, dtype, reference_index)
        else:
            z_ref, ref_half, cache = z.new_zeros(0, z.shape[1]), z.new_zeros(0), {}
        chosen = backends.select(backend, x.device, n, max(z_ref.shape[0], 1), z.shape[1], z.element_size())
        ctx = Context(
            z_ref=z_ref, ref_half=ref_half, backend=chosen, feature_dim=d, feature_shape=tuple(x.shape[1:]),
            labels=y, cache=cache, generator=generator, ref_subset=reference_index,
        )
        if mask is not None:
            ctx.codes, ctx.ref_codes = mask["codes"].to(dtype), mask["ref_codes"].to(dtype)
            ctx.penalty, ctx.ref_log_weights = mask["penalty"], mask["ref_log_weights"].to(dtype)
        warm = {} if warm is None else warm
        run = _Runner(obj, ctx, warm, x.device, z_ref.shape[0])
        moving = slice(None) if labels == "flow" else slice(0, d)
        noise_t = obj.temperature
        check_monotone = guard and momentum == 0 and noise_t == 0 and not obj.stochastic

        # ---------------------------------------------------------------- Euler loop
        from tqdm.auto import tqdm

        value, grad = run(z)
        values, times = [float(value)], [0.0]
        traj, traj_t, traj_y = [], [], []

        def snap(zz, t):
            traj.append(_restore(zz, x, d))
            traj_t.append(t)
            if labels != "flow":
                traj_y.append(None)
            elif mask is not None:
                traj_y.append(mask["labels"])
            else:
                traj_y.append(_decode(zz, y, emb, label_weight, d, soft_temperature)[0] if decode == "point" else None)

        if 0 in shots:
            snap(z, 0.0)
        velocity = torch.zeros_like(z) if momentum > 0 else None
        halvings, t_now, warned = 0, 0.0, False
        bar = tqdm(range(steps), desc="flow", disable=not progress, leave=False)
        for step in bar:
            last = step == steps - 1
            need_eval = not last or track_objective
            while True:
                upd = grad if velocity is None else velocity * momentum + grad
                z_new = z.clone()
                z_new[:, moving] -= tau * upd[:, moving]
                if noise_t > 0:
                    noise = torch.randn(z.shape[0], d, generator=generator, dtype=z.dtype).to(z.device)
                    z_new[:, :d] += math.sqrt(2 * tau * noise_t) * noise
                if clamp is not None:
                    z_new[:, :d].clamp_(clamp[0], clamp[1])
                if need_eval:
                    v_new, g_new = run(z_new)
                    finite = math.isfinite(float(v_new)) and bool(torch.isfinite(g_new).all())
                    slack = 1e-3 * (abs(values[-1]) + abs(values[0])) + 1e-12
                    rises = check_monotone and float(v_new) > values[-1] + slack
                else:
                    finite, rises = bool(torch.isfinite(z_new).all()), False
                if finite and not rises:
                    break
                if not guard:
                    raise FloatingPointError(
                        f"the flow produced non-finite values at step {step} with guard=False; "
                        "lower step_size or enable guard"
                    )
                if halvings >= MAX_HALVINGS:
                    what = "non-finite values" if not finite else "an increasing objective"
                    warnings.warn(
                        f"flow stopped at step {step}: {what} after {halvings} step-size halvings "
                        f"(step_size {tau:g}); returning the last accepted state",
                        RuntimeWarning, stacklevel=2,
                    )
                    z_new = None
                    break
                tau /= 2
                halvings += 1
                if velocity is not None:
                    velocity.zero_()
                if not warned:
                    what = "produced non-finite values" if not finite else "increased the objective"
                    warnings.warn(
                        f"the flow {what} at step {step}: halving step_size to {tau:g} "
                        "(pass a smaller step_size to avoid this)",
                        RuntimeWarning, stacklevel=2,
                    )
                    warned = True
            if z_new is None:
                break
            if velocity is not None:
                velocity = upd
            z = z_new
            t_now += tau
            if need_eval:
                value, grad = v_new, g_new
                values.append(float(value))
                times.append(t_now)
            if step + 1 in shots:
                snap(z, t_now)

        # ---------------------------------------------------------------- outputs
        out_x = _restore(z, x, d)
        hard, soft, class_map = y, None, None
        if mask is not None:
            class_map = mapping
            if labels == "flow":
                hard = mask["labels"]
                soft = torch.nn.functional.one_hot(hard, int(mapping.max()) + 1).float()
        elif labels == "flow":
            if decode == "point":
                hard, soft = _decode(z, y, emb, label_weight, d, soft_temperature)
            else:
                flowed = ClassStats(single_sample="zero").update(z[:, :d], y)
                class_map, soft_map = assign_classes(flowed, ref.stats)
                if label_kind == "hard":
                    hard, soft = class_map[y.long()], soft_map[y.long()]
                else:
                    soft = y.double() @ soft_map
                    hard = soft.argmax(1)
                soft = soft.float()
        objective_values = None
        if track_objective:
            constant = obj.constant(ctx) if ref is not None else 0.0
            objective_values = torch.tensor(values, dtype=torch.float64) + constant
        return FlowResult(
            x=out_x,
            labels=hard,
            soft_labels=None if soft is None else soft.to(torch.float32),
            objective=objective_values,
            times=torch.tensor(times, dtype=torch.float64),
            trajectory=traj,
            trajectory_times=traj_t,
            trajectory_labels=traj_y,
            step_size=tau,
            backend=ctx.backend,
            iterations=run.iterations,
            class_map=class_map,
            warm=warm,
        )


def _class_mapping(class_map, x, y, ref, source_stats) -> torch.Tensor:
    """(K,) reference class of every source class, from ``"same"``, ``"ot"`` or a tensor."""
    hard = y if y.ndim == 1 else y.argmax(1)
    k_src = int(hard.max()) + 1
    if isinstance(class_map, str):
        check_choice("class_map", class_map, ("same", "ot"))
        if class_map == "same":
            mapping = torch.arange(k_src, device=x.device)
        else:
            stats = source_stats or ClassStats(single_sample=ref.stats.single_sample).update(x.reshape(len(x), -1).float(), y)
            mapping = assign_classes(stats, ref.stats)[0].to(x.device)
    elif isinstance(class_map, torch.Tensor) and class_map.ndim == 1 and not class_map.is_floating_point():
        mapping = class_map.to(x.device).long()
    else:
        raise TypeError(f"class_map must be 'same', 'ot' or a 1-D integer tensor, got {describe(class_map)}")
    if mapping.numel() < k_src:
        raise ValueError(f"class_map must map {k_src} source classes, got {mapping.numel()} entries")
    return mapping


#: above this many point pairs, class-wise flows loop over classes instead of one masked problem (2**21: an
#: N x M float32 buffer of 8 MB, where the masked problem's K-fold extra work starts to outweigh K calls'
#: overhead; reasoned, not yet measured -- a crossover benchmark should set it)
CLASS_LOOP_ABOVE = 2**21

#: the class-mask penalty, in units of the reference's squared median distance: cross-class costs are
#: then >= 1e4 times typical costs, so their kernel/plan entries are exactly 0 after the -80 clamp
CLASS_PENALTY = 1e4


def _class_mask(x, y, ref, mapping, reference_index):
    """Codes and weights that make one flow equal to independent class-wise flows.

    A cost penalty ``P/2 (c_i - c_j)^2`` forbids transport between different class codes; reference
    points of class c get weight ``(n_c / N) / m_c`` so that each class carries the same mass on both
    sides, i.e. every class flows toward its own reference class as a normalised measure.
    """
    hard = y if y.ndim == 1 else y.argmax(1)
    codes = mapping[hard.long()]  # (N,) target class of every moving point
    needed = torch.unique(codes)
    keep = torch.isin(ref.labels, needed)
    if reference_index is not None:
        allowed = torch.zeros_like(keep)
        allowed[reference_index] = True
        keep &= allowed
    index = torch.nonzero(keep).flatten()
    ref_codes = ref.labels[index]
    counts_src = torch.bincount(codes, minlength=int(needed.max()) + 1).double()
    counts_ref = torch.bincount(ref_codes, minlength=int(needed.max()) + 1).double()
    missing = [int(c) for c in needed if counts_ref[c] == 0]
    if missing:
        raise ValueError(f"reference has no samples of class {missing[0]}, paired with source classes "
                         f"{torch.nonzero(mapping == missing[0]).flatten().tolist()}")
    weights = (counts_src / len(codes))[ref_codes] / counts_ref[ref_codes]  # (M,) sums to 1
    penalty = CLASS_PENALTY * ref.median_distance() ** 2
    return {"codes": codes.double(), "ref_codes": ref_codes.double(), "penalty": penalty,
            "ref_log_weights": weights.log(), "labels": codes}, index


def _classwise(x, y, ref, mapping, *, labels, reference_index, warm, progress, kwargs) -> FlowResult:
    """One flow per source class toward its paired reference class (features only), reassembled.
    The fallback for objectives that cannot run class-wise as one problem (see ``Objective.class_mask``)."""
    hard = y if y.ndim == 1 else y.argmax(1)
    allowed = None
    if reference_index is not None:
        allowed = torch.zeros(ref.num_samples, dtype=torch.bool, device=ref.device)
        allowed[reference_index] = True
    out_x = torch.empty_like(x)
    parts, traj, traj_y = [], None, None
    iterations, tau_end, backend = [], kwargs["step_size"], ""
    from tqdm.auto import tqdm

    classes = torch.unique(hard).tolist()
    for c in tqdm(classes, desc="class-wise flow", disable=not progress, leave=False):
        idx = torch.nonzero(hard == c).flatten()
        target = int(mapping[c])
        in_class = ref.labels == target
        if allowed is not None:
            in_class &= allowed
        ref_idx = torch.nonzero(in_class).flatten()
        if ref_idx.numel() == 0:
            raise ValueError(f"reference has no samples of class {target}, paired with source class {c}")
        sub = flow(x[idx], None, ref, label_weight=0.0, reference_index=ref_idx,
                   warm=warm.setdefault(("class", c), {}), **kwargs)
        out_x[idx] = sub.x
        parts.append((len(idx) / len(x), sub.objective))
        if traj is None:
            traj = [torch.empty_like(x) for _ in sub.trajectory]
        for t_all, t_sub in zip(traj, sub.trajectory):
            t_all[idx] = t_sub
        iterations.extend(sub.iterations)
        tau_end, backend = min(tau_end, sub.step_size), sub.backend
    objective = None
    if kwargs["track_objective"]:
        length = max(len(v) for _, v in parts)
        pad = [torch.cat([v, v[-1:].expand(length - len(v))]) for _, v in parts]
        objective = sum(w * v for (w, _), v in zip(parts, pad))
    new_labels = y if labels == "fixed" else mapping[hard]
    soft = None if labels == "fixed" else torch.nn.functional.one_hot(new_labels, int(mapping.max()) + 1).float()
    steps = kwargs["steps"]
    times = torch.arange(steps + 1, dtype=torch.float64) * kwargs["step_size"]
    return FlowResult(
        x=out_x, labels=new_labels, soft_labels=soft, objective=objective,
        times=times[: len(objective)] if objective is not None else times,
        trajectory=traj or [], trajectory_times=[float(times[s]) for s in kwargs["snapshots"]][: len(traj or [])],
        trajectory_labels=[None if labels == "fixed" else new_labels] * len(traj or []),
        step_size=tau_end, backend=backend, iterations=iterations, class_map=mapping, warm=warm,
    )


def _decode(z, y, emb, weight, d, temperature):
    hard, soft = decode_labels(z[:, d:], emb, weight, temperature)
    return hard, soft


class _Runner:
    """Evaluates the objective; on a KeOps failure, switches the context to dense and retries once."""

    def __init__(self, obj, ctx, warm, device, m):
        self.obj, self.ctx, self.warm, self.device, self.m = obj, ctx, warm, device, m
        self.iterations = []

    def __call__(self, z):
        try:
            value, grad = self.obj.evaluate(z, self.ctx, self.warm)
        except (KeyboardInterrupt, FloatingPointError):
            raise
        except Exception as err:  # noqa: BLE001 - only KeOps failures are retried, see below
            if self.ctx.backend != "keops":
                raise
            backends.disable_keops(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            self.ctx.backend = backends.select("tensorized", self.device, z.shape[0], max(self.m, 1), z.shape[1], z.element_size())
            value, grad = self.obj.evaluate(z, self.ctx, self.warm)
        its = _iterations(self.warm)
        if its:
            self.iterations.append(its)
        return value, grad


def _iterations(warm: dict):
    if "iterations" in warm:
        return warm["iterations"]
    found = [v["iterations"] for v in warm.values() if isinstance(v, dict) and "iterations" in v]
    return found[0] if len(found) == 1 else tuple(found)
