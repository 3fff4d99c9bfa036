"""Gradual domain adaptation along flows: domains generated between consecutive unlabelled ones, then
self-training through the whole sequence.

Self-training a source model directly on a far-shifted target fails; self-training through a sequence of
intermediate domains works (gradual self-training, Kumar, Ma & Liang, ICML 2020), but in practice only a
few unlabelled snapshots of a drifting distribution exist. This module fills the gaps between consecutive
snapshots with flows in the model's feature space:

* :func:`flow_domains` flows the features of domain ``A`` toward those of domain ``B`` and returns the domains
  met on the way: ``x_t = (1 - t) x + t T(x)``, with ``T(x)`` each particle's end point. For the Sinkhorn
  divergence at ``step_size=1`` the first step is the (entropic) barycentric OT map, so this is the flow's
  displacement interpolation. Unlike GOAT's exact plan (He et al. 2023) it needs no one-to-one pairing:
  ``A`` and ``B`` may differ in size, and each particle goes to a blurred average of its matches rather than
  to one matched point. With labels on both sides the flow is class-wise (class ``k`` of ``A`` toward what
  the current model calls class ``k`` in ``B``). The times ``t`` follow a schedule of
  :mod:`flowaug.schedules`, the shapes ``FlowAnnealing`` uses to anneal a ``FlowTransform``'s strength (``t``
  is that strength).
* :func:`self_train` is one step of gradual self-training: a student copied from the teacher is trained on
  the teacher's confident pseudo-labels (or on labels carried along a generated path).
* :func:`adapt` is the recipe: for each consecutive pair (the labelled source first) ``generated`` domains
  are made by a flow in the current encoder's features, the head self-trains through them, then the whole
  model self-trains on the real domain ``B``. ``benchmarks/gradual_select.py`` chose its defaults
  (features-only flow, pseudo-labels, 20 domains per gap, encoder self-trained on the real domains) on
  development shifts; ``benchmarks/gradual.py`` measures it against GOAT, gradual self-training and the
  all-real-intermediates oracle.

Nothing here mutates its inputs: models are copied before training.

Example:
    >>> import torch
    >>> from flowaug.gradual import flow_domains
    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = torch.randn(64, 2, generator=g), torch.randn(80, 2, generator=g) + torch.tensor([6.0, 0.0])
    >>> path = flow_domains(a, b, 3, steps=3)
    >>> [round(float(d[:, 0].mean()), 1) for d in path]  # a quarter, half and three quarters of the way
    [1.5, 3.0, 4.5]
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ._checks import check_int, check_labels, check_real, describe, warn_user
from .config import FlowConfig, build_config
from .flow import flow
from .reference import Reference
from .schedules import resolve_schedule, schedule_value

__all__ = ["adapt", "domain_times", "flow_domains", "pseudo_labels", "self_train"]

#: what :func:`flow_domains` uses unless told: a few full Sinkhorn steps (each moves a point most of the way
#: to its barycentric target), features only
PATH_DEFAULTS = {"objective": "sinkhorn", "steps": 3, "step_size": 1.0, "labels": "fixed"}
#: generated domains per gap in :func:`adapt`: the choice of ``benchmarks/gradual_select.py`` on development
#: shifts (rotation to 45 degrees, colour +0.75), with ``train_encoder=True``; 10 scored 0.6 points less
DEFAULT_GENERATED = 20


def domain_times(n_domains: int, schedule="linear") -> list[float]:
    """The ``n_domains`` interior times in (0, 1) at which :func:`flow_domains` places its domains.

    Example:
        >>> domain_times(3)
        [0.25, 0.5, 0.75]
    """
    n = check_int("n_domains", n_domains, minimum=1)
    shape = resolve_schedule(schedule)
    return [float(schedule_value(shape, i / (n + 1))) for i in range(1, n + 1)]


def _check_pair(x_from: torch.Tensor, x_to: torch.Tensor) -> None:
    for name, x in (("x_from", x_from), ("x_to", x_to)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or len(x) < 2:
            raise ValueError(f"{name} must be a float tensor of shape (N, ...) with N >= 2, got {describe(x)}")
    if x_from.shape[1:] != x_to.shape[1:]:
        raise ValueError(f"x_from and x_to must have the same sample shape, got {tuple(x_from.shape[1:])} and "
                         f"{tuple(x_to.shape[1:])}")


def flow_domains(x_from: torch.Tensor, x_to: torch.Tensor, n_domains: int, *, y_from: torch.Tensor | None = None,
                 y_to: torch.Tensor | None = None, schedule="linear", config: FlowConfig | None = None,
                 generator: torch.Generator | None = None, **options) -> list[torch.Tensor]:
    """Domains between ``x_from`` and ``x_to`` along a flow (see the module docstring).

    Args:
        x_from: (N, ...) features of the domain the path starts from.
        x_to: (M, ...) features of the domain it goes to.
        n_domains: how many domains to generate strictly between the two.
        y_from, y_to: (N,) and (M,) class ids; with both, each class flows toward the same class of
            ``x_to`` (``class_map="same"``; a class ``y_to`` lacks flows toward all of ``x_to``, with a
            ``RuntimeWarning``); ``y_to`` is typically the current model's pseudo-labels. Pass
            ``label_weight=w`` and ``class_map=None`` for OTDD's joint label-aware flow instead.
        schedule: a :mod:`flowaug.schedules` name or callable giving the times (:func:`domain_times`).
        config, options: the flow's options (:func:`flowaug.flow`); defaults :data:`PATH_DEFAULTS`.

    Returns:
        ``n_domains`` tensors shaped like ``x_from``, in order from ``x_from`` to ``x_to``; sample ``i`` of
        each is the same particle (labels carried from ``y_from`` stay valid along the path).
    """
    _check_pair(x_from, x_to)
    times = domain_times(n_domains, schedule)
    if (y_from is None) != (y_to is None):
        raise ValueError("y_from and y_to must be given together (class-wise flow) or both left out")
    for name, y, x in (("y_from", y_from, x_from), ("y_to", y_to, x_to)):
        if y is not None:
            check_labels(name, y, len(x), allow_soft=False)
    classwise = y_from is not None and (config is None or "class_map" not in config.given) \
        and "class_map" not in options and options.get("labels", "fixed") == "fixed"
    cfg = build_config(config, dict(PATH_DEFAULTS), options, "flow_domains")
    if not classwise:
        end = flow(x_from, y_from, Reference(x_to, y_to) if y_to is not None else x_to, cfg, generator=generator).x
        return [torch.lerp(x_from, end, t) for t in times]
    # class k flows toward the samples y_to calls k; a class y_to never names (a model's pseudo-labels can
    # miss one) flows toward all of x_to, and the caller is told
    present = torch.isin(y_from, torch.unique(y_to))  # (N,)
    end = x_from.clone()
    if present.any():
        end[present] = flow(x_from[present], y_from[present], Reference(x_to, y_to), cfg.replace(class_map="same"),
                            generator=generator).x
    if not present.all():
        missing = sorted(set(y_from[~present].tolist()))
        warn_user(f"flow_domains: y_to has no samples of class(es) {missing}; their {int((~present).sum())} "
                  "particles flow toward all of x_to (features only)", kind="missing-class")
        end[~present] = flow(x_from[~present], None, x_to, cfg, generator=generator).x
    return [torch.lerp(x_from, end, t) for t in times]  # each (N, ...)


def pseudo_labels(model: nn.Module, x: torch.Tensor, *, confidence: float = 0.1,
                  batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's predicted classes on ``x`` and a mask keeping all but the ``confidence`` fraction of
    least confident predictions (by softmax probability), as in gradual self-training.

    The model is evaluated in eval mode and left in the mode it was in.
    """
    q = check_real("confidence", confidence, low=0, high=1, high_open=True)
    if not isinstance(x, torch.Tensor) or len(x) == 0:
        raise ValueError(f"x must be a non-empty tensor of inputs, got {describe(x)}")
    probs = _encode(model, x, batch_size).softmax(1)  # (N, K)
    if not torch.isfinite(probs).all():
        raise FloatingPointError("the model's outputs on x are not finite: cannot pseudo-label")
    score, labels = probs.max(1)  # (N,), (N,)
    keep = score >= torch.quantile(score, q) if q > 0 else torch.ones_like(labels, dtype=torch.bool)
    return labels, keep


def self_train(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None = None, *, epochs: int = 10,
               batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4, confidence: float = 0.1,
               generator: torch.Generator | None = None) -> nn.Module:
    """One self-training step: a copy of ``model`` trained on ``x`` with ``labels`` (carried labels) or,
    without them, the model's own confident pseudo-labels. ``model`` itself is not changed.

    Returns the trained copy (in eval mode). ``epochs * ceil(kept / batch_size)`` optimizer steps (Adam). With a
    ``generator`` the run repeats exactly (shuffling and dropout both come from it; the global random stream is
    left as it was).
    """
    # batch norm cannot train on one sample: batches of 1 would be skipped, leaving the model untrained
    epochs, batch_size = check_int("epochs", epochs), check_int("batch_size", batch_size, minimum=2)
    if labels is None:
        labels, keep = pseudo_labels(model, x, confidence=confidence)
        x, labels = x[keep], labels[keep]
    else:
        check_labels("labels", labels, len(x), allow_soft=False)
    student = copy.deepcopy(model).train()
    if generator is None:
        _fit(student, x, labels, epochs, batch_size, lr, weight_decay, None)
    else:  # dropout draws from the global streams: seed them from the generator, leave the caller's untouched
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):  # manual_seed reseeds every CUDA device too
            torch.manual_seed(seed)
            _fit(student, x, labels, epochs, batch_size, lr, weight_decay, generator)
    return student.eval()


def _fit(student: nn.Module, x, labels, epochs: int, batch_size: int, lr: float, weight_decay: float,
         generator: torch.Generator | None) -> None:
    opt = torch.optim.Adam(student.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # batch norm cannot train on one sample
                continue
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(student(x[idx]), labels[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError("self-training loss is not finite (check the learning rate and the inputs)")
            loss.backward()
            opt.step()


def _encode(module: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``module(x)`` in eval mode, without gradients, in batches; the module is left in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return torch.cat([module(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])  # (N, D)
    finally:
        module.train(was_training)


def adapt(encoder: nn.Module, head: nn.Module, source: tuple[torch.Tensor, torch.Tensor],
          domains: Sequence[torch.Tensor], *, generated: int = DEFAULT_GENERATED, label_aware: bool = False,
          carry_labels: bool = False, train_encoder: bool = True, epochs: int = 10, batch_size: int = 64,
          lr: float = 1e-3, confidence: float = 0.1, schedule="linear", flow_options: dict | None = None,
          generator: torch.Generator | None = None, on_path=None, progress: bool = False) -> nn.Sequential:
    """Gradual self-training from a labelled source through unlabelled ``domains`` (the last is the target),
    with ``generated`` flow domains between each consecutive pair.

    Args:
        encoder, head: the source model is ``nn.Sequential(encoder, head)``, trained on ``source``.
        source: ``(x, y)``, the labelled source inputs.
        domains: unlabelled inputs, in order from the source to the target.
        generated: domains generated between each consecutive pair (0: plain gradual self-training).
        label_aware: flow class-wise: the pair's first domain with its labels (true for the source, the
            model's after that) toward the second with the current model's pseudo-labels. Off by default:
            where the model's pseudo-labels on the next domain are poor this pairs the wrong classes
            (``benchmarks/gradual.py``: colour shift).
        carry_labels: train the head on the generated domains with the labels of the pair's first domain,
            else (default) with the teacher's confident pseudo-labels, as on real domains.
        train_encoder: True (default): each pair is encoded by the current encoder, the head walks the
            generated domains and the whole model self-trains on each real domain; False: every domain is
            encoded once by the source encoder and only the head self-trains, through generated and real
            domains alike (GOAT's schedule; cheaper, and 1.4 points lower on the development shifts).
        epochs, batch_size, lr, confidence: of every self-training step (:func:`self_train`).
        schedule, flow_options: the times and the flow of :func:`flow_domains`.
        on_path: called as ``on_path(pair, f_from, f_to, path)`` with every generated path (diagnostics).

    Returns:
        the adapted ``nn.Sequential(encoder, head)`` (copies; the arguments are not changed).
    """
    from tqdm.auto import tqdm

    check_int("generated", generated)
    if not isinstance(domains, (list, tuple)) or not domains or not all(isinstance(d, torch.Tensor) for d in domains):
        raise ValueError(f"domains must be a non-empty list of input tensors (the last is the target), got "
                         f"{describe(domains)}")
    x_a, y_a = source
    check_labels("source labels", y_a, len(x_a), allow_soft=False)
    step = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "confidence": confidence, "generator": generator}
    path_options = dict(schedule=schedule, generator=generator, **(flow_options or {}))
    encoder, head = copy.deepcopy(encoder).eval(), copy.deepcopy(head).eval()
    needs_labels = generated > 0 and (label_aware or carry_labels)  # else the walk never reads y_a again
    fixed = None if train_encoder else [_encode(encoder, x) for x in [x_a, *domains]]  # (N_i, D) each
    for pair, x_b in enumerate(tqdm(domains, desc="gradual self-training", disable=not progress)):
        f_a, f_b = (fixed[pair], fixed[pair + 1]) if fixed else (_encode(encoder, x_a), _encode(encoder, x_b))
        if generated:
            labels = {"y_from": y_a, "y_to": pseudo_labels(head, f_b, confidence=0.0)[0]} if label_aware else {}
            path = flow_domains(f_a, f_b, generated, **labels, **path_options)
            if on_path is not None:
                on_path(pair, f_a, f_b, path)
            for f_t in path:
                head = self_train(head, f_t, y_a if carry_labels else None, **step)
        if fixed:
            head = self_train(head, f_b, **step)
        else:
            encoder, head = self_train(nn.Sequential(encoder, head), x_b, **step)
        if needs_labels:
            y_a = pseudo_labels(head, f_b, confidence=0.0)[0] if fixed else \
                pseudo_labels(nn.Sequential(encoder, head), x_b, confidence=0.0)[0]
        x_a = x_b
    return nn.Sequential(encoder, head).eval()
