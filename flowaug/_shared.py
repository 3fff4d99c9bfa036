"""State shared by an adapter and its copies in DataLoader workers, and per-process randomness.

``strength`` lives in a one-element tensor in shared memory: a forked worker inherits the mapping and a
spawned worker receives it through torch.multiprocessing's tensor pickling (file descriptors), so a value
written in the main process (by :class:`~flowaug.FlowAnnealing`) is read by persistent workers at their
next batch. A plain ``pickle`` copy (e.g. ``copy.deepcopy`` or saving) gets its own tensor.
"""

from __future__ import annotations

import hashlib
import os

import torch

from ._checks import check_real

__all__ = ["AdapterState", "SharedValue", "ProcessGenerator", "mix_seed", "strength_property"]


class SharedValue:
    """A float in shared memory, validated on write."""

    def __init__(self, value: float, name: str, low: float = 0.0, high: float = 1.0):
        self.name, self.low, self.high = name, low, high
        self._t = torch.zeros((), dtype=torch.float64)
        try:
            self._t.share_memory_()
        except RuntimeError:  # pragma: no cover - platforms without shared memory: per-process value
            pass
        self.set(value)

    def get(self) -> float:
        return float(self._t)

    def set(self, value) -> None:
        self._t.fill_(check_real(self.name, value, low=self.low, high=self.high))


def strength_property(doc: str) -> property:
    """The ``strength`` attribute of adapters, backed by their :class:`AdapterState` (``self.state``)."""

    def get(self) -> float:
        return self.state.strength.get()

    def set(self, value: float) -> None:
        self.state.strength.set(value)

    return property(get, set, doc=doc)


class ProcessGenerator:
    """The random stream of an adapter with a ``seed``, private to the current process and DataLoader worker.

    The stream is seeded from ``seed`` and where it runs:

    * with an epoch published (``epoch >= 0``, by ``set_epoch``, which :class:`~flowaug.FlowAnnealing`
      calls): from ``(seed, worker id, epoch)``. The stream restarts at every epoch, so a run resumed from
      a checkpoint at an epoch boundary draws exactly what the uninterrupted run drew (given the same batch
      order);
    * otherwise: the main process uses ``seed``; a worker mixes in the DataLoader's per-worker seed
      (``base_seed + worker_id``, drawn anew every epoch from the main process RNG), so workers differ from
      each other and from one epoch to the next.

    Without a seed, :meth:`get` returns None: draws then come from torch's global RNG (torch's and
    torchvision's convention: ``torch.manual_seed`` repeats them, DataLoader seeds it per worker).
    """

    def __init__(self, seed: int | None, epoch: SharedValue | None = None):
        self.seed = seed
        self.epoch = epoch if epoch is not None else SharedValue(-1, "epoch", low=-1, high=2**62)
        self._gen: torch.Generator | None = None
        self._owner = None

    def _identity(self):
        info = torch.utils.data.get_worker_info()
        return os.getpid(), None if info is None else (info.id, info.seed), int(self.epoch.get())

    def get(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        owner = self._identity()
        if self._gen is None or owner != self._owner:
            _, worker, epoch = owner
            if epoch >= 0:
                seed = mix_seed(self.seed, "main" if worker is None else worker[0], epoch)
            elif worker is None:
                seed = self.seed
            else:
                seed = mix_seed(self.seed, worker[1])
            self._gen = torch.Generator().manual_seed(seed % (2**63))
            self._owner = owner
        return self._gen

    def __getstate__(self):
        return {"seed": self.seed, "epoch": self.epoch, "_gen": None, "_owner": None}


def mix_seed(*parts) -> int:
    """A 64-bit seed from any parts (stable across processes and runs)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class AdapterState:
    """What :class:`~flowaug.FlowTransform` and :class:`~flowaug.FlowDataset` share, in one place: the
    ``strength`` and the epoch (shared memory, seen by DataLoader workers), the per-process random stream
    (:class:`ProcessGenerator`) and every draw of a reference sample.

    An online ``FlowDataset`` hands its state to the ``FlowTransform`` it flows with, so both read and
    write the same values (``strength``, ``set_epoch``) without reaching into each other.

    Args:
        strength: initial strength in [0, 1].
        seed: seed of the random stream (None: torch's global RNG).
        reference_size: reference points per sample (None: the whole reference).
    """

    def __init__(self, strength: float = 1.0, seed: int | None = None, reference_size: int | None = None):
        self.strength = SharedValue(strength, "strength")
        self.epoch = SharedValue(-1, "epoch", low=-1, high=2**62)
        self.seed, self.reference_size = seed, reference_size
        self.rng = ProcessGenerator(seed, self.epoch)
        self._sample: tuple[int, torch.Tensor] | None = None  # (epoch, index) of the per-epoch sample

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def current_epoch(self) -> int:
        return int(self.epoch.get())

    def samples(self, num_samples: int) -> bool:
        """A reference of ``num_samples`` points is sampled (``reference_size`` is smaller)."""
        return self.reference_size is not None and self.reference_size < num_samples

    def batch_sample(self, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
        """A fresh sample for one batch, from the call's stream."""
        return torch.randperm(num_samples, generator=generator)[: self.reference_size]

    def epoch_sample(self, num_samples: int) -> torch.Tensor:
        """The sample of the current epoch in this process, drawn at its first batch: from ``(seed, epoch)``
        alone when seeded (every worker uses the same sample), else from torch's global RNG."""
        epoch = self.current_epoch()
        if self._sample is None or self._sample[0] != epoch:
            if self.seed is None:
                index = torch.randperm(num_samples)[: self.reference_size]
            else:
                gen = torch.Generator().manual_seed(mix_seed(self.seed, "reference sample", epoch) % (2**63))
                index = torch.randperm(num_samples, generator=gen)[: self.reference_size]
            self._sample = (epoch, index)
        return self._sample[1]

    def chunk_sample(self, chunk: int, num_samples: int) -> torch.Tensor | None:
        """The sample of a precompute chunk: the same on every rank and in every run (None: no sampling)."""
        if not self.samples(num_samples):
            return None
        gen = torch.Generator().manual_seed(((self.seed or 0) + 1) * 1_000_033 + chunk)
        return torch.randperm(num_samples, generator=gen)[: self.reference_size]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_sample"] = None  # drawn anew per process
        return state
