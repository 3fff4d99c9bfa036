"""FlowAnnealing: a Lightning callback that anneals the strength of flows during training.

The strength is a pure function of the trainer's position (epoch or global step), so a run resumed from
a checkpoint and every DDP rank compute the same value. A resumed run flows the same batches with the same
strengths as the uninterrupted one with ``interval="epoch"`` (resumed at an epoch boundary) or with
``apply_to_batches=True``; not with ``interval="step"`` and DataLoader workers, whose batches get strengths that
lag by a timing-dependent amount (below), in a resumed run as in any rerun. It is written into the targets' shared-memory
``strength``; DataLoader workers, persistent ones included, read it at their next batch. Lightning creates
the epoch's DataLoader iterator (which makes workers prefetch) after ``on_train_epoch_start`` from the
second epoch on, and after ``on_fit_start`` for the first, so each epoch's batches are flowed with that
epoch's strength. With ``interval="step"`` workers lag by their prefetch depth
(``num_workers * prefetch_factor`` batches, by an amount that depends on timing, so such runs are not
reproducible and the callback warns); flows applied on the device (``apply_to_batches=True``) do not lag.
(Deciding the strength from the batch's own index inside workers would need the sampler position of every
batch, which DataLoader does not give a collate_fn; ``apply_to_batches`` is the reproducible way.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch

from ._checks import check_choice, check_int, check_real, describe, warn_user
from .schedules import resolve_schedule, schedule_value
from .transforms import FlowTransform

__all__ = ["Annealable", "FlowAnnealing"]

INTERVALS = ("epoch", "step")


@runtime_checkable
class Annealable(Protocol):
    """What :class:`FlowAnnealing` drives: a settable ``strength`` in [0, 1] and ``set_epoch(epoch)`` (the
    ``DistributedSampler`` convention: restart per-epoch randomness). FlowTransform and FlowDataset are
    annealable; so is any object of yours with these two members."""

    strength: float

    def set_epoch(self, epoch: int) -> None: ...


def _check_position(name: str, value, allow_none: bool):
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int (an epoch or step) or a float fraction in [0, 1], got {value!r}")
    if isinstance(value, int):
        return check_int(name, value)
    return check_real(name, value, low=0, high=1)


class FlowAnnealing(pl.Callback):
    """Anneal ``strength`` of FlowTransform/FlowDataset objects over training.

    Args:
        targets: one :class:`Annealable` (FlowTransform, FlowDataset, or any object with a settable
            ``strength`` and ``set_epoch(epoch)``) or a list of them.
        schedule: ``"linear"``, ``"cosine"`` (or ``"cos"``, as ``StochasticWeightAveraging`` names it; stored,
            shown and checkpointed as ``"cosine"``), ``"step"``, ``"exponential"`` or a callable
            ``progress -> strength`` (see :mod:`flowaug.schedules`).
        start_value, end_value: strength at the start and at the end of the schedule (either order).
        start: where the schedule starts: an epoch/step index (int) or a fraction of training (float),
            like ``StochasticWeightAveraging``'s ``swa_epoch_start``. Before it, ``start_value`` holds.
        end: where it ends (same conventions); default the last epoch/step of training.
        interval: ``"epoch"`` or ``"step"`` (with DataLoader workers, ``"step"`` is not reproducible and a
            resumed run does not continue the schedule batch for batch, unless ``apply_to_batches=True``).
        stairs, rate: parameters of the ``"step"`` and ``"exponential"`` schedules.
        apply_to_batches: apply the FlowTransform targets to training batches after they reach the device
            (main process, ``on_train_batch_start``; training batches only). The batch tensors are updated
            in place, so the labels must keep their shape and dtype.
        log: log ``flowaug/strength`` through the LightningModule's logger, and ``flowaug/objective`` (the
            last value of the flow of the batch) for FlowTransform targets applied with
            ``apply_to_batches`` and built with ``track_objective=True``.

    Example:
        >>> import torch
        >>> from flowaug import FlowAnnealing, FlowTransform
        >>> t = FlowTransform((torch.rand(20, 4), torch.arange(20) % 2))
        >>> cb = FlowAnnealing(t, "cosine", start_value=0.0, end_value=1.0)
        >>> round(cb.value_at(position=5, total=11), 6)  # epoch 5 of 0..10: half way
        0.5
    """

    def __init__(
        self,
        targets,
        schedule: str | Callable[[float], float] = "linear",
        *,
        start_value: float = 0.0,
        end_value: float = 1.0,
        start: int | float = 0,  # noqa: PYI041 - an int is an epoch/step, a float a fraction
        end: int | float | None = None,  # noqa: PYI041
        interval: str = "epoch",
        stairs: int = 4,
        rate: float = 5.0,
        apply_to_batches: bool = False,
        log: bool = True,
    ):
        super().__init__()
        self.targets = list(targets) if isinstance(targets, Sequence) and not isinstance(targets, str) else [targets]
        if not self.targets:
            raise ValueError("targets must hold at least one FlowTransform or FlowDataset")
        for i, t in enumerate(self.targets):
            if not isinstance(t, Annealable):
                raise TypeError(
                    f"targets[{i}] must be annealable (a 'strength' attribute and a set_epoch(epoch) method, as "
                    f"FlowTransform and FlowDataset), got {describe(t)}"
                )
        self.schedule = resolve_schedule(schedule)  # "cos" (StochasticWeightAveraging's name) -> "cosine"
        self.start_value = check_real("start_value", start_value, low=0, high=1)
        self.end_value = check_real("end_value", end_value, low=0, high=1)
        self.start = _check_position("start", start, allow_none=False)
        self.end = _check_position("end", end, allow_none=True)
        self.interval = check_choice("interval", interval, INTERVALS)
        self.stairs = check_int("stairs", stairs, minimum=1)
        self.rate = check_real("rate", rate)
        self.apply_to_batches = bool(apply_to_batches)
        self.log = bool(log)
        self.current: float | None = None
        self.position: int | None = None
        self._resume: dict | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=repr(self.schedule) if isinstance(self.schedule, str) else "callable",
                                        interval=self.interval, start=self.start, end=self.end)

    # ------------------------------------------------------------------ the schedule
    def value_at(self, position: int, total: int) -> float:
        """Strength at ``position`` (epoch or step index) of a run with ``total`` epochs or steps."""
        last = max(total - 1, 0)
        lo = self.start if isinstance(self.start, int) else round(self.start * last)
        hi = last if self.end is None else (self.end if isinstance(self.end, int) else round(self.end * last))
        if hi <= lo:
            progress = 1.0 if position >= lo else 0.0
        else:
            progress = min(max((position - lo) / (hi - lo), 0.0), 1.0)
        return schedule_value(self.schedule, progress, self.start_value, self.end_value,
                              stairs=self.stairs, rate=self.rate)

    def _total(self, trainer: pl.Trainer) -> int:
        if self.interval == "epoch":
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                if self.end is None or isinstance(self.end, float) or not isinstance(self.start, int):
                    raise ValueError(
                        "FlowAnnealing with interval='epoch' needs Trainer(max_epochs=...) or an int 'end' epoch"
                    )
                return self.end + 1
            return trainer.max_epochs
        return int(trainer.estimated_stepping_batches)

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None = None) -> float:
        if self._resume is not None:  # the trainer's loop counters are not restored yet (see on_fit_start)
            epoch, step = self._resume["epoch"], self._resume["step"]
        else:
            epoch, step = trainer.current_epoch, trainer.global_step
        position = epoch if self.interval == "epoch" else step
        value = self.value_at(position, self._total(trainer))
        for t in self.targets:
            t.strength = value
            t.set_epoch(epoch)  # restarts the targets' random streams per epoch (exact resume)
        self.current, self.position = value, position
        return value

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        # Lightning creates the first DataLoader iterator (workers start prefetching) after on_fit_start,
        # and restores its loop counters only after this hook: on a resume the position comes from the
        # checkpoint (on_load_checkpoint), or the first batches would be flowed with epoch 0's strength.
        self._update(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._resume = None  # loop counters are restored from here on
        loader = getattr(trainer, "train_dataloader", None)
        if self.interval == "step" and not self.apply_to_batches and getattr(loader, "num_workers", 0) > 0:
            warn_user(
                "FlowAnnealing(interval='step') sets strength in the main process, and DataLoader workers read it "
                "when they prepare a batch, up to num_workers * prefetch_factor batches ahead: which strength a "
                "batch gets depends on timing, so runs are not reproducible. Use apply_to_batches=True (the flow "
                "runs on the device, at the step's exact strength) or interval='epoch'"
            )

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
        epoch = progress.get("processed", checkpoint.get("epoch", 0))  # the epoch the resumed run starts in
        self._resume = {"epoch": int(epoch), "step": int(checkpoint.get("global_step", 0))}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        value = self._update(trainer)
        if self.log and self.interval == "epoch":
            pl_module.log("flowaug/strength", value, on_step=False, on_epoch=True, sync_dist=False)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self.interval == "step":
            value = self._update(trainer)
            if self.log:
                pl_module.log("flowaug/strength", value, on_step=True, on_epoch=False)
        if self.apply_to_batches:
            for t in self.targets:
                if isinstance(t, FlowTransform):
                    self._apply_in_place(t, batch)
            objective = next((t.last_objective for t in self.targets
                              if isinstance(t, FlowTransform) and t.last_objective is not None), None)
            if self.log and objective is not None:
                pl_module.log("flowaug/objective", float(objective[-1]), on_step=True, on_epoch=False)

    @staticmethod
    def _apply_in_place(transform: FlowTransform, batch) -> None:
        out = transform(batch)
        if out is batch:
            return
        src, _ = torch.utils._pytree.tree_flatten(batch)
        dst, _ = torch.utils._pytree.tree_flatten(out)
        for a, b in zip(src, dst):
            if a is b or not isinstance(a, torch.Tensor):
                continue
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(
                    "apply_to_batches updates the batch in place, so the flow must keep shapes and dtypes; got "
                    f"{tuple(a.shape)}/{a.dtype} -> {tuple(b.shape)}/{b.dtype} (soft labels?). Apply the "
                    "FlowTransform in LightningModule.on_after_batch_transfer instead"
                )
            with torch.no_grad():
                a.copy_(b)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"current": self.current, "position": self.position, "interval": self.interval}

    def load_state_dict(self, state_dict: dict) -> None:
        self.current, self.position = state_dict["current"], state_dict["position"]
        if self.current is not None:  # in effect at once, before any worker starts
            for t in self.targets:
                t.strength = self.current

    def __repr__(self) -> str:
        sched = self.schedule if isinstance(self.schedule, str) else getattr(self.schedule, "__name__", "callable")
        return (
            f"FlowAnnealing(schedule={sched!r}, start_value={self.start_value}, end_value={self.end_value}, "
            f"start={self.start}, end={self.end}, interval={self.interval!r}, targets={len(self.targets)})"
        )
