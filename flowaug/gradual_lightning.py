"""GradualWalk: the gradual walk of :func:`flowaug.gradual.adapt` run as Lightning fits of the user's module.

One algorithm, two faces: :class:`GradualWalk` hands :func:`flowaug.gradual.walk` (the implementation behind
``adapt``) a ``train`` function that trains each stage with a Lightning ``Trainer`` of the user's making, instead
of the plain PyTorch loop of :func:`flowaug.gradual.self_train`. A stage trains exactly what ``self_train`` trains:
Adam(lr, weight_decay) on the cross-entropy of the (pseudo-)labels, the same batches in the same order (a batch
sampler drawing :func:`flowaug.gradual.batch_order` from the walk's generator every epoch), the same dropout seeds
(:class:`flowaug.gradual.seeded` around the fit). With the same options and seed it reproduces ``adapt()``'s
weights (to float rounding on one CPU; a GPU or another precision changes the arithmetic, not the algorithm).

The paths between domains, the pseudo-labels and the encoding of the domains run in the calling process, on the
device the data lie on; the ``Trainer`` (its accelerator, devices, precision, loggers, callbacks) trains the
stages. After every stage the walk's state is written atomically to ``dirpath/walk_state.pt``; a ``fit`` that
finds that file continues after the last finished stage, exactly (the generator's state is in the file).

Devices: verified on one device. A multi-device Trainer launched by ``torchrun`` (``strategy="ddp"``) runs the
whole walk on every rank with the same batches (the walk sets ``use_distributed_sampler=False``): the same
algorithm, without a speed-up. A strategy that trains in spawned processes (``"ddp_spawn"``, notebooks) cannot
advance the walk's generator in the calling process and is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from collections.abc import Callable, Mapping

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ._checks import check_int, describe
from ._io import atomic_path
from .config import fingerprint
from .gradual import WalkOptions, batch_order, check_walk_inputs, seeded, training_set, walk

__all__ = ["GradualWalk"]

#: the file a walk with ``dirpath`` writes after every stage
STATE_FILE = "walk_state.pt"
_FORMAT = "flowaug.GradualWalk/1"
#: the Trainer options the walk sets for every stage (the user's factory receives them as keywords)
WALK_TRAINER_KEYS = ("max_epochs", "use_distributed_sampler")
#: what ``trainer=None`` adds: a quiet Trainer (no logs, checkpoints, progress bars or summaries per stage)
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


class GradualWalk:
    """Adapt a ``LightningModule`` (or any ``nn.Module``) from a labelled source through unlabelled domains, each
    stage a ``Trainer.fit``: :func:`flowaug.gradual.adapt`'s walk with the user's Trainer settings.

    The user marks the two parts of their module by **attribute names**: ``encoder`` (inputs (N, ...) -> features
    (N, D)) and ``head`` (features (N, D) -> class logits (N, K), K >= 2), with the module's prediction being
    ``head(encoder(x))``; dotted names reach nested modules (``"backbone.body"``). The model must already be trained
    on the source. The module's own ``training_step`` and ``configure_optimizers`` are **not** used: the head-only
    stages train on generated *features*, which the module's step (written for inputs) cannot take, so every stage
    trains an internal LightningModule wrapping the stage's part (the head, or encoder and head) with the walk's
    Adam and cross-entropy.

    Args:
        source: ``(x, y)`` (or a ``TensorDataset`` of them): labelled source inputs (N, ...) and class ids (N,).
        domains: unlabelled inputs (N_i, ...), in order from the source to the target (the last).
        encoder, head: attribute names of the two parts on the module given to :meth:`fit`.
        options: a :class:`flowaug.gradual.WalkOptions`; or give its fields as keywords (``generated=20,
            epochs=10, schedule="cosine", ...``; not both). ``schedule`` is a :mod:`flowaug.schedules` name or
            callable, the shapes ``FlowAnnealing`` anneals with, and sets the generated domains' times.
        seed: seeds the walk's generator (shuffling, dropout, stochastic paths), as ``adapt(generator=
            torch.Generator().manual_seed(seed))``; torch's global random stream is left as it was.
        dirpath: a folder for the walk's state (``walk_state.pt``), written after every stage; a later ``fit``
            with the same walk (options, seed, names, data and starting weights) resumes from it, and refuses a
            different one saying which setting differs. None: no state is kept.
        progress: a progress bar over the walk's stages.

    Example::

        walk = GradualWalk((x_src, y_src), [x_20deg, x_40deg, x_60deg], generated=20, epochs=3, dirpath="runs/walk")
        adapted = walk.fit(model, trainer=lambda **kw: L.Trainer(**kw, accelerator="gpu", precision="bf16-mixed"))
    """

    def __init__(self, source, domains, *, encoder: str = "encoder", head: str = "head",
                 options: WalkOptions | None = None, seed: int = 0, dirpath: str | os.PathLike | None = None,
                 progress: bool = False, **walk_options):
        for name, value in (("encoder", encoder), ("head", head)):
            if not isinstance(value, str) or not value or any(not part.isidentifier() for part in value.split(".")):
                raise TypeError(f"{name} must be the name of an attribute of your module (a str such as "
                                f"{name!r} or 'backbone.body'), got {describe(value)}")
        if encoder == head:
            raise ValueError(f"encoder and head must name two different attributes, both are {encoder!r}")
        self.options = _options(options, walk_options)
        self.seed = check_int("seed", seed)
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise TypeError(f"dirpath must be a folder path (str or os.PathLike) or None, got {describe(dirpath)}")
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        if self.dirpath is not None and os.path.isfile(self.dirpath):
            raise ValueError(f"dirpath must be a folder (the walk writes {STATE_FILE} in it), got the file "
                             f"{self.dirpath!r}")
        self.source, self.domains = source, domains
        self.encoder_name, self.head_name, self.progress = encoder, head, bool(progress)

    @property
    def state_path(self) -> str | None:
        """Where the walk's state is written (None without ``dirpath``)."""
        return None if self.dirpath is None else os.path.join(self.dirpath, STATE_FILE)

    def fit(self, module: nn.Module, trainer: Callable[..., pl.Trainer] | Mapping | None = None) -> nn.Module:
        """Walk ``module`` through the domains; return an adapted copy (``module`` itself is not changed).

        Args:
            module: the source-trained model, holding the parts named ``encoder`` and ``head``.
            trainer: how each stage's Trainer is made: a factory called as ``trainer(max_epochs=...,
                use_distributed_sampler=False)`` that returns a ``lightning.pytorch.Trainer`` with the user's
                settings (pass the keywords on: ``lambda **kw: L.Trainer(**kw, accelerator="gpu")``); or a dict of
                Trainer keywords; or None, a quiet ``Trainer`` (no logger, checkpoints, progress bar or summary).
                A fresh Trainer per stage; anything that changes how many optimizer steps a stage makes
                (``max_steps``, ``limit_train_batches``, ``accumulate_grad_batches``, early stopping) is refused.

        Returns:
            a deep copy of ``module`` in eval mode whose ``encoder`` and ``head`` are the adapted parts (every
            reference to them inside the module points at the adapted ones), detached from any Trainer.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be your LightningModule (a torch.nn.Module), got {describe(module)}")
        parts = [_submodule(module, name, arg) for arg, name in (("encoder", self.encoder_name),
                                                                  ("head", self.head_name))]
        if parts[0] is parts[1]:
            raise ValueError(f"encoder={self.encoder_name!r} and head={self.head_name!r} are the same module")
        data = check_walk_inputs(*parts, self.source, self.domains)  # every input refused before any training
        make_trainer = _trainer_factory(trainer)
        settings = self._settings(parts, *data) if self.state_path else None
        state = _load_state(self.state_path, settings) if self.state_path else None
        generator = torch.Generator().manual_seed(self.seed)
        stage_train = _StageTrainer(self.options, make_trainer)
        save = None if self.state_path is None else (lambda s: _save_state(self.state_path, settings, s))
        adapted = walk(*parts, self.source, self.domains, self.options, train=stage_train, generator=generator,
                       state=state, on_stage=save, progress=self.progress)
        return _adapted_copy(module, parts, adapted)

    def _settings(self, parts: list[nn.Module], x: torch.Tensor, y: torch.Tensor, domains: list) -> dict[str, str]:
        """What makes a walk this walk, each as a short readable value (digests for data and weights)."""
        out = {f.name: _shown(getattr(self.options, f.name)) for f in dataclasses.fields(self.options)}
        out.update(seed=repr(self.seed), encoder=repr(self.encoder_name), head=repr(self.head_name),
                   source_size=repr(len(x)), domain_sizes=repr([len(d) for d in domains]),
                   data=f"content {fingerprint([x, y, *domains])[:16]}",
                   weights=f"content {fingerprint([p.state_dict() for p in parts])[:16]}")
        return out


def _options(options, walk_options: dict) -> WalkOptions:
    if options is not None and walk_options:
        raise TypeError(f"give options=WalkOptions(...) or its fields as keywords, not both (got options and "
                        f"{sorted(walk_options)})")
    if options is None:
        known = [f.name for f in dataclasses.fields(WalkOptions)]
        unknown = sorted(set(walk_options) - set(known))
        if unknown:
            raise TypeError(f"GradualWalk got unknown keyword(s) {unknown}; the walk's options are {known}")
        return WalkOptions(**walk_options)
    if not isinstance(options, WalkOptions):
        raise TypeError(f"options must be a flowaug.gradual.WalkOptions, got {describe(options)}")
    return options


def _submodule(module: nn.Module, name: str, arg: str) -> nn.Module:
    """``module.<name>`` (dotted names walk down), refused clearly when missing or not a module."""
    found = module
    for part in name.split("."):
        if not hasattr(found, part):
            children = sorted(n for n, _ in module.named_children())
            raise ValueError(f"{arg}={name!r}: {type(module).__name__} has no attribute {name!r} (its submodules: "
                             f"{children}); pass {arg}='<attribute name>' naming the {arg} of your module")
        found = getattr(found, part)
    if not isinstance(found, nn.Module):
        raise TypeError(f"{arg}={name!r}: {type(module).__name__}.{name} must be a torch.nn.Module, got "
                        f"{describe(found)}")
    return found


def _trainer_factory(trainer) -> Callable[..., pl.Trainer]:
    if trainer is None:
        return lambda **kw: pl.Trainer(**kw, **QUIET)
    if isinstance(trainer, Mapping):
        taken = sorted(set(trainer) & set(WALK_TRAINER_KEYS))
        if taken:
            raise ValueError(f"trainer: {taken} are set by the walk (each stage trains for options.epochs), leave "
                             "them out")
        kwargs = dict(trainer)
        return lambda **kw: pl.Trainer(**kw, **kwargs)
    if not callable(trainer):
        raise TypeError(f"trainer must be a factory (**kw) -> lightning.pytorch.Trainer, a dict of Trainer "
                        f"keywords or None, got {describe(trainer)}")
    return trainer


def _shown(value) -> str:
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    try:
        return f"{type(value).__name__} {fingerprint(value)[:16]}"
    except ValueError:  # an object fingerprint cannot read: its type is all a resumed walk can compare
        return type(value).__name__


# ---------------------------------------------------------------------- one stage as a Lightning fit
class _Stage(pl.LightningModule):
    """The stage's part (``net``: the head, or ``nn.Sequential(encoder, head)``) trained as ``self_train`` trains
    it: Adam(lr, weight_decay) on the cross-entropy of (x (B, ...), labels (B,)) batches."""

    def __init__(self, net: nn.Module, lr: float, weight_decay: float):
        super().__init__()
        self.net, self.lr, self.weight_decay = net, lr, weight_decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if not torch.isfinite(loss):
            raise FloatingPointError("self-training loss is not finite (check the learning rate and the inputs)")
        self.log("gradual/loss", loss, batch_size=len(y))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class _Rows(Dataset):
    """Whole batches: item ``idx`` (B,) is ``(x[idx], labels[idx])``, as ``self_train`` indexes them."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor):
        self.x, self.labels = x, labels

    def __len__(self):
        return len(self.x)

    def __getitem__(self, idx):
        return self.x[idx], self.labels[idx]


class _BatchOrder(Sampler):
    """Each epoch's batches of indices, drawn from the walk's generator when the epoch starts (``batch_order``)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None):
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __len__(self):  # batches of one are dropped
        return self.n // self.batch_size + (self.n % self.batch_size >= 2)

    def __iter__(self):  # a generator function: nothing is drawn until Lightning asks for the first batch
        yield from batch_order(self.n, self.batch_size, self.generator)


class _StageTrainer:
    """The walk's ``train(module, x, labels, generator)``: ``self_train``'s stage as a ``Trainer.fit``."""

    def __init__(self, options: WalkOptions, make_trainer: Callable[..., pl.Trainer]):
        self.options, self.make_trainer = options, make_trainer

    def __call__(self, module: nn.Module, x: torch.Tensor, labels, generator) -> nn.Module:
        o = self.options
        x, labels = training_set(module, x, labels, o.confidence)
        student = copy.deepcopy(module).train()
        dtype = next((p.dtype for p in student.parameters()), None)
        sampler = _BatchOrder(len(x), o.batch_size, generator)
        # a generator of its own: the loader's base seed must not come from the (seeded) global stream
        loader = DataLoader(_Rows(x, labels), sampler=sampler, batch_size=None, generator=torch.Generator())
        trainer = self._trainer()
        with seeded(generator), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # in-memory tensors
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning vs newer torch
            before = None if generator is None else generator.get_state()
            trainer.fit(_Stage(student, o.lr, o.weight_decay), train_dataloaders=loader)
        if len(sampler) and before is not None and torch.equal(before, generator.get_state()):
            raise RuntimeError("the stage's Trainer trained in other processes (a spawning strategy such as "
                               "'ddp_spawn'), so the walk's generator did not advance here: use one device, or "
                               "launch every rank with torchrun and strategy='ddp'")
        expected = o.epochs * len(sampler)
        if trainer.global_step != expected:
            raise RuntimeError(f"a stage's Trainer made {trainer.global_step} optimizer steps where the walk makes "
                               f"{expected} ({o.epochs} epochs x {len(sampler)} batches): leave max_steps, "
                               "limit_train_batches, accumulate_grad_batches and early stopping out of the Trainer")
        return _returned(student, x.device, dtype).eval()

    def _trainer(self) -> pl.Trainer:
        made = self.make_trainer(max_epochs=self.options.epochs, use_distributed_sampler=False)
        if not isinstance(made, pl.Trainer):
            raise TypeError(f"trainer must return a lightning.pytorch.Trainer, got {describe(made)}")
        if made.max_epochs != self.options.epochs:
            raise ValueError(f"trainer: the Trainer has max_epochs={made.max_epochs} but the walk trains every stage "
                             f"for epochs={self.options.epochs}; pass the walk's keywords on (lambda **kw: "
                             "L.Trainer(**kw, ...))")
        return made


def _returned(student: nn.Module, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """``student`` back on the walk's device and in its dtype, where the Trainer (its teardown moves modules to
    the CPU; a "-true" precision converts them) left it elsewhere."""
    now = next(student.parameters(), None)
    if now is not None and (now.device != device or now.dtype != dtype):
        student.to(device=device, dtype=dtype)
    return student


# ---------------------------------------------------------------------- state and result
def _save_state(path: str, settings: dict, state: dict) -> None:
    with atomic_path(path, ".pt") as tmp:
        torch.save({"format": _FORMAT, "settings": settings, "state": state}, tmp)


def _load_state(path: str, settings: dict) -> dict | None:
    """The walk state in ``path`` when it belongs to this walk; None without a file; an error naming what differs."""
    if not os.path.exists(path):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling, zip and truncation errors all mean "not ours"
        raise ValueError(f"dirpath: {path!r} cannot be read as a GradualWalk state ({type(err).__name__}); delete it "
                         "or pass another dirpath") from None
    if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
        raise ValueError(f"dirpath: {path!r} is not a GradualWalk state of this version; delete it or pass another "
                         "dirpath")
    theirs = saved["settings"]
    differ = [f"{k}: {theirs.get(k, 'unset')} there, {settings.get(k, 'unset')} here"
              for k in sorted(set(settings) | set(theirs)) if theirs.get(k) != settings.get(k)]
    if differ:
        raise ValueError(f"dirpath: {path!r} holds the state of another walk ({'; '.join(differ)}); resume with the "
                         "same settings, or delete the file or pass another dirpath to start a new walk")
    return saved["state"]


def _adapted_copy(module: nn.Module, parts: list[nn.Module], adapted: nn.Sequential) -> nn.Module:
    """A deep copy of ``module`` in which every reference to the original parts is the adapted part and the
    Trainer the module may be attached to is left out (deepcopy's memo maps each original to its replacement)."""
    memo = {id(parts[0]): adapted[0], id(parts[1]): adapted[1]}
    attached = getattr(module, "_trainer", None)
    if attached is not None:
        memo[id(attached)] = None
    return copy.deepcopy(module, memo).eval()
