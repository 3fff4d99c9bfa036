"""Gradual domain adaptation along generated paths: domains generated between consecutive unlabelled ones, then
self-training through the whole sequence.

Self-training a source model directly on a far-shifted target fails; self-training through a sequence of
intermediate domains works (gradual self-training, Kumar, Ma & Liang, ICML 2020), but in practice only a
few unlabelled snapshots of a drifting distribution exist. This module fills the gaps between consecutive
snapshots with generated domains in the model's feature space:

* :func:`flow_domains` returns the domains met on a flow from ``A``'s features toward ``B``'s:
  ``x_t = (1 - t) x + t T(x)``, ``T(x)`` each particle's end point (:class:`flowaug.paths.FlowPath`). With the
  debiased Sinkhorn divergence the first unit step moves a point by ``T_ab(x) - T_aa(x)``, not to the entropic
  barycentric map ``T_ab(x)`` (that map is :func:`flowaug.paths.entropic_path`, a control). Unlike GOAT's exact
  plan (:class:`flowaug.paths.PlanPath`) it needs no one-to-one pairing: ``A`` and ``B`` may differ in size.
  The times follow a schedule of :mod:`flowaug.schedules`, the shapes ``FlowAnnealing`` anneals with.
* :func:`self_train` is one step of gradual self-training: a student copied from the teacher is trained on
  the teacher's confident pseudo-labels (or on labels carried along a generated path).
* :func:`adapt` is the recipe, and :func:`walk` its one implementation (the Lightning face,
  :class:`flowaug.gradual_lightning.GradualWalk`, runs the same walk with a ``Trainer``): for each
  consecutive pair (the labelled source first) ``generated`` domains are made by a path function in the current
  encoder's features, the head self-trains through them, then the whole model self-trains on the real domain
  ``B``. ``benchmarks/gradual_select.py`` chose its defaults on development shifts; ``benchmarks/gradual.py``
  measures it against GOAT, the plain entropic map, gradual self-training and the all-real oracle.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_bool, check_finite_tensor, check_int, check_labels, check_real, describe, warn_user
from .config import FlowConfig
from .paths import PATH_DEFAULTS, FlowPath, Path, PlanPath, entropic_path
from .schedules import resolve_schedule, schedule_value

__all__ = [
    "PATH_DEFAULTS",
    "FlowPath",
    "Path",
    "PlanPath",
    "WalkOptions",
    "adapt",
    "domain_times",
    "entropic_path",
    "flow_domains",
    "pseudo_labels",
    "self_train",
    "walk",
]

#: generated domains per gap in :func:`adapt`: the choice of ``benchmarks/gradual_select.py`` on development
#: shifts (see ``benchmarks/README.md``)
DEFAULT_GENERATED = 20


def domain_times(n_domains: int, schedule="linear") -> list[float]:
    """The ``n_domains`` interior times in (0, 1) at which generated domains are placed.

    Example:
        >>> domain_times(3)
        [0.25, 0.5, 0.75]
    """
    n = check_int("n_domains", n_domains, minimum=1)
    shape = resolve_schedule(schedule)
    return [float(schedule_value(shape, i / (n + 1))) for i in range(1, n + 1)]


def flow_domains(x_from: torch.Tensor, x_to: torch.Tensor, n_domains: int, *, y_from: torch.Tensor | None = None,
                 y_to: torch.Tensor | None = None, schedule="linear", config: FlowConfig | None = None,
                 generator: torch.Generator | None = None, **options) -> list[torch.Tensor]:
    """Domains between ``x_from`` and ``x_to`` along a flow (:class:`flowaug.paths.FlowPath`).

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
    times = domain_times(n_domains, schedule)
    if (y_from is None) != (y_to is None):
        raise ValueError("y_from and y_to must be given together (class-wise flow) or both left out")
    path = FlowPath(config=config, **options)
    return path(x_from, x_to, times, y_from=y_from, y_to=y_to, generator=generator).domains


def pseudo_labels(model: nn.Module, x: torch.Tensor, *, confidence: float = 0.1,
                  batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's predicted classes on ``x`` and a mask keeping all but the ``confidence`` fraction of
    least confident predictions (by softmax probability), as in gradual self-training.

    The model is evaluated in eval mode and left in the mode it was in.
    """
    q = check_real("confidence", confidence, low=0, high=1, high_open=True)
    if not isinstance(x, torch.Tensor) or len(x) == 0:
        raise ValueError(f"x must be a non-empty tensor of inputs, got {describe(x)}")
    logits = _encode(model, x, batch_size)
    _check_logits(logits, "the model")
    probs = logits.softmax(1)  # (N, K)
    if not torch.isfinite(probs).all():
        raise FloatingPointError("the model's outputs on x are not finite: cannot pseudo-label")
    score, labels = probs.max(1)  # (N,), (N,)
    keep = score >= torch.quantile(score, q) if q > 0 else torch.ones_like(labels, dtype=torch.bool)
    return labels, keep


def _check_logits(logits: torch.Tensor, who: str) -> int:
    """The class count K of (N, K) logits; refuse one-logit (binary BCE) heads and (N,) outputs clearly."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"{who} must output (N, K) class logits with K >= 2 (softmax / cross-entropy), got shape "
                         f"{tuple(logits.shape)}; for a one-logit binary head (BCE) use nn.Linear(d, 2) instead")
    return int(logits.shape[1])


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
    x, labels = training_set(model, x, labels, confidence)
    student = copy.deepcopy(model).train()
    with seeded(generator):
        _fit(student, x, labels, epochs, batch_size, lr, weight_decay, generator)
    return student.eval()


def training_set(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
                 confidence: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What one self-training step trains on: ``(x, labels)``, or the teacher's confident pseudo-labels."""
    if labels is None:
        labels, keep = pseudo_labels(model, x, confidence=confidence)
        return x[keep], labels[keep]
    check_labels("labels", labels, len(x), allow_soft=False)
    k = _check_logits(_encode(model, x[:2]), "the model")  # a forward in eval mode: no random number drawn
    if len(labels) and int(labels.max()) >= k:
        raise ValueError(f"labels go up to {int(labels.max())} but the model outputs {k} classes (0..{k - 1})")
    return x, labels


class seeded:
    """Within the block, the global streams (dropout) are seeded from ``generator`` (one draw) and the caller's
    CPU and CUDA streams are restored after; without a generator, nothing is done."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator

    def __enter__(self):
        if self.generator is None:
            return self
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        self._fork = torch.random.fork_rng(devices=cuda)  # manual_seed reseeds every CUDA device too
        self._fork.__enter__()
        torch.manual_seed(seed)
        return self

    def __exit__(self, *exc):
        if self.generator is not None:
            return self._fork.__exit__(*exc)
        return False


def batch_order(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """One epoch's batches of indices: a fresh permutation from ``generator``, batches of one dropped (batch
    norm cannot train on one sample)."""
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size) if len(order[i:i + batch_size]) >= 2]


def _fit(student: nn.Module, x, labels, epochs: int, batch_size: int, lr: float, weight_decay: float,
         generator: torch.Generator | None) -> None:
    opt = torch.optim.Adam(student.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        for idx in batch_order(len(x), batch_size, generator):
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


# ---------------------------------------------------------------------- the walk
@dataclass(frozen=True)
class WalkOptions:
    """Every option of a gradual walk, validated once (:func:`adapt` and the Lightning face share them).

    Attributes:
        generated: domains generated between each consecutive pair (0: plain gradual self-training).
        path: a path function (:class:`~flowaug.paths.FlowPath`, :func:`~flowaug.paths.entropic_path`,
            :class:`~flowaug.paths.PlanPath` or any callable with their signature); None: ``FlowPath()`` with
            ``flow_options``.
        label_aware: flow class-wise: the pair's first domain with its labels (true for the source, the model's
            after that) toward the second with the current model's pseudo-labels.
        carry_labels: train on the generated domains with the labels of the pair's first domain, else (default)
            with the teacher's confident pseudo-labels, as on real domains.
        train_encoder: True: each pair is encoded by the current encoder, the head walks the generated domains
            and the whole model self-trains on each real domain; False: every domain is encoded once by the
            source encoder and only the head self-trains (GOAT's schedule).
        epochs, batch_size, lr, weight_decay, confidence: of every self-training step (:func:`self_train`).
        schedule: the times of the generated domains (:func:`domain_times`).
    """

    generated: int = DEFAULT_GENERATED
    path: Callable | None = None
    label_aware: bool = False
    carry_labels: bool = False
    train_encoder: bool = True
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    confidence: float = 0.1
    schedule: object = "linear"
    flow_options: dict | None = None

    def __post_init__(self):
        set_ = object.__setattr__.__get__(self)
        set_("generated", check_int("generated", self.generated))
        for name in ("label_aware", "carry_labels", "train_encoder"):
            check_bool(name, getattr(self, name))
        set_("epochs", check_int("epochs", self.epochs, minimum=1))
        set_("batch_size", check_int("batch_size", self.batch_size, minimum=2))
        set_("lr", check_real("lr", self.lr, low=0, low_open=True))
        set_("weight_decay", check_real("weight_decay", self.weight_decay, low=0))
        set_("confidence", check_real("confidence", self.confidence, low=0, high=1, high_open=True))
        resolve_schedule(self.schedule)
        if self.path is not None and self.flow_options:
            raise ValueError("give flow_options or path, not both (a path function carries its own options)")
        if self.path is None:
            set_("path", FlowPath(**(self.flow_options or {})))
        elif not callable(self.path):
            raise TypeError(f"path must be a path function (FlowPath, entropic_path(), PlanPath or a callable), got "
                            f"{describe(self.path)}")

    def train_step(self, module: nn.Module, x: torch.Tensor, labels, generator) -> nn.Module:
        return self_train(module, x, labels, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                          weight_decay=self.weight_decay, confidence=self.confidence, generator=generator)

    def steps_per_gap(self) -> int:
        """Self-training steps (stages) of one gap: the generated domains, then the real one."""
        return self.generated + 1


def check_walk_inputs(encoder: nn.Module, head: nn.Module, source, domains) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   list[torch.Tensor]]:
    """``(x_source, y_source, domains)`` after refusing clearly what the walk cannot use."""
    for name, m in (("encoder", encoder), ("head", head)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {describe(m)}")
    if isinstance(source, torch.utils.data.TensorDataset) and len(source.tensors) == 2:
        source = source.tensors
    if not isinstance(source, (tuple, list)) or len(source) != 2:
        raise TypeError(f"source must be an (x, y) pair of tensors or a TensorDataset of (x, y), got {describe(source)}")
    x_a, y_a = source
    if not isinstance(domains, (list, tuple)) or not domains:
        raise ValueError(f"domains must be a non-empty list of input tensors (the last is the target), got "
                         f"{describe(domains)}")
    dtype = next((p.dtype for p in encoder.parameters()), torch.float32)
    for name, x in [("source x", x_a)] + [(f"domains[{i}]", d) for i, d in enumerate(domains)]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or len(x) < 2:
            raise ValueError(f"{name} must be a float tensor of inputs (N, ...) with N >= 2, got {describe(x)}")
        if x.dtype != dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the model computes in {dtype}: convert the inputs "
                            f"(e.g. .to({dtype})) or the model; adapt does not change either silently")
        if x.shape[1:] != x_a.shape[1:]:
            raise ValueError(f"{name} must have the source's sample shape {tuple(x_a.shape[1:])}, got "
                             f"{tuple(x.shape[1:])}")
        check_finite_tensor(name, x)
    check_labels("source labels", y_a, len(x_a), allow_soft=False)
    return x_a, y_a, list(domains)


def _check_source_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Refuse labels the head cannot output; warn when the model is at chance on its own source."""
    logits = _encode(model, x)  # (N, K)
    k = _check_logits(logits, "nn.Sequential(encoder, head)")
    if int(y.max()) >= k:
        raise ValueError(f"source labels go up to {int(y.max())} but the head outputs {k} classes (0..{k - 1})")
    accuracy, chance = float((logits.argmax(1) == y).float().mean()), 1.0 / k
    if accuracy < chance + 0.25 * (1 - chance):
        warn_user(f"adapt: the source model scores {100 * accuracy:.1f} % on its own source data (chance "
                  f"{100 * chance:.0f} %): train it on the source first; self-training only spreads what it "
                  "already knows", kind="untrained-source")


def walk(encoder: nn.Module, head: nn.Module, source, domains: Sequence[torch.Tensor], options: WalkOptions, *,
         train: Callable | None = None, generator: torch.Generator | None = None, state: dict | None = None,
         on_stage: Callable | None = None, on_path: Callable | None = None, progress: bool = False) -> nn.Sequential:
    """The gradual walk (the one implementation behind :func:`adapt` and the Lightning face).

    Args:
        train: ``train(module, x, labels, generator) -> trained copy`` for one stage (default: :func:`self_train`
            with ``options``); ``labels`` None means the module's own confident pseudo-labels.
        state: a state :func:`walk` passed to ``on_stage`` earlier: the walk resumes after that stage, exactly
            (it needs the ``generator`` it started with, restored from the state).
        on_stage: called as ``on_stage(state)`` after every stage (``state`` is a dict of tensors and ints).
        on_path: called as ``on_path(gap, encoder, f_from, f_to, path)`` with every generated path.
    """
    from tqdm.auto import tqdm

    x_src, y_src, domains = check_walk_inputs(encoder, head, source, domains)
    if state is not None and generator is None:
        raise ValueError("state: resuming a walk exactly needs the generator it ran with (got generator=None)")
    train = train or options.train_step
    encoder, head = copy.deepcopy(encoder).eval(), copy.deepcopy(head).eval()
    _check_source_model(nn.Sequential(encoder, head), x_src, y_src)
    chain, per_gap = [x_src, *domains], options.steps_per_gap()
    fixed = None if options.train_encoder else [_encode(encoder, x) for x in chain]  # (N_i, D) each
    first, skip = (0, 0) if state is None else (int(state["gap"]), int(state["stage"]))
    if state is not None:  # the path of the gap being resumed is rebuilt from that gap's start
        _restore(state["gap_start"] if first < len(domains) else state["current"], encoder, head, generator)
    bar = tqdm(total=len(domains) * per_gap, initial=first * per_gap + skip, desc="gradual self-training",
               disable=not progress)
    for gap in range(first, len(domains)):
        gap_start = _snapshot(encoder, head, generator) if on_stage is not None else None
        stages = _gap_stages(encoder, head, chain, gap, y_src, fixed, options, generator, on_path)
        if gap == first and skip:
            _restore(state["current"], encoder, head, generator)
        for k in range(skip if gap == first else 0, len(stages)):
            kind, inputs, labels = stages[k]
            encoder, head = _run_stage(kind, inputs, labels, encoder, head, train, generator)
            bar.update(1)
            if on_stage is not None:
                now = _snapshot(encoder, head, generator)
                last = k + 1 == len(stages)
                on_stage({"gap": gap + last, "stage": 0 if last else k + 1, "current": now,
                          "gap_start": now if last else gap_start})
    bar.close()
    return nn.Sequential(encoder, head).eval()


def _gap_stages(encoder, head, chain, gap, y_src, fixed, options: WalkOptions, generator, on_path):
    """The stages of one gap, in order: ``(kind, inputs, labels)`` per generated domain ("head"), then the real
    domain ("head" on fixed features, "whole" on inputs). The path is made here, from the current model."""
    x_a, x_b = chain[gap], chain[gap + 1]
    f_a, f_b = (fixed[gap], fixed[gap + 1]) if fixed else (_encode(encoder, x_a), _encode(encoder, x_b))
    stages = []
    if options.generated:
        reads_labels = options.label_aware or options.carry_labels or _reads_labels(options.path)
        y_a = None  # the pair's first domain's labels: true on the source, the model's after; computed when read
        if reads_labels:
            y_a = y_src if gap == 0 else pseudo_labels(nn.Sequential(encoder, head), x_a, confidence=0.0)[0]
        y_b = pseudo_labels(head, f_b, confidence=0.0)[0] if options.label_aware else None
        path = options.path(f_a, f_b, domain_times(options.generated, options.schedule),
                            y_from=y_a if options.label_aware or _reads_labels(options.path) else None,
                            y_to=y_b, classifier=head, generator=generator)
        if on_path is not None:
            on_path(gap, encoder, f_a, f_b, path)
        carried = y_a[path.rows] if options.carry_labels else None
        stages += [("head", f_t, carried) for f_t in path.domains]
    stages.append(("head", f_b, None) if fixed else ("whole", x_b, None))
    return stages


def _reads_labels(path) -> bool:
    return bool(getattr(path, "classifier_weight", 0))


def _run_stage(kind: str, inputs, labels, encoder, head, train, generator):
    if kind == "head":
        return encoder, train(head, inputs, labels, generator)
    whole = train(nn.Sequential(encoder, head), inputs, labels, generator)
    return whole[0], whole[1]


def _snapshot(encoder, head, generator) -> dict:
    """What a resumed walk needs to continue exactly: both modules' states and the generator's."""
    return {"encoder": copy.deepcopy(encoder.state_dict()), "head": copy.deepcopy(head.state_dict()),
            "generator": None if generator is None else generator.get_state()}


def _restore(snap: dict, encoder, head, generator) -> None:
    encoder.load_state_dict(snap["encoder"])
    head.load_state_dict(snap["head"])
    if generator is not None and snap["generator"] is not None:
        generator.set_state(snap["generator"])


def adapt(encoder: nn.Module, head: nn.Module, source, domains: Sequence[torch.Tensor], *,
          generated: int = DEFAULT_GENERATED, path=None, label_aware: bool = False, carry_labels: bool = False,
          train_encoder: bool = True, epochs: int = 10, batch_size: int = 64, lr: float = 1e-3,
          weight_decay: float = 1e-4, confidence: float = 0.1, schedule="linear", flow_options: dict | None = None,
          generator: torch.Generator | None = None, on_path=None, progress: bool = False) -> nn.Sequential:
    """Gradual self-training from a labelled source through unlabelled ``domains`` (the last is the target),
    with ``generated`` domains on a path between each consecutive pair.

    The model ``nn.Sequential(encoder, head)`` must already be trained on ``source`` (a warning says so when
    it scores near chance there); the head must output (N, K) logits, K >= 2.

    Args:
        encoder, head: the source model is ``nn.Sequential(encoder, head)``.
        source: ``(x, y)`` (or a ``TensorDataset`` of them), the labelled source inputs.
        domains: unlabelled inputs, in order from the source to the target.
        path: the path function (default: :class:`~flowaug.paths.FlowPath` with ``flow_options``); see
            :class:`WalkOptions` for it and every other option.
        generator: seeds the walk (shuffling, dropout, stochastic flows); the global random stream is untouched.
        on_path: called as ``on_path(gap, encoder, f_from, f_to, path)`` with every generated path (diagnostics).

    Returns:
        the adapted ``nn.Sequential(encoder, head)`` (copies; the arguments are not changed), in eval mode.
    """
    options = WalkOptions(generated=generated, path=path, label_aware=label_aware, carry_labels=carry_labels,
                          train_encoder=train_encoder, epochs=epochs, batch_size=batch_size, lr=lr,
                          weight_decay=weight_decay, confidence=confidence, schedule=schedule,
                          flow_options=flow_options)
    return walk(encoder, head, source, domains, options, generator=generator, on_path=on_path, progress=progress)
