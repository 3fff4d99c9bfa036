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

__all__ = ["SharedValue", "ProcessGenerator", "mix_seed", "strength_property"]


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
    """The ``strength`` attribute of adapters, backed by their ``_strength`` :class:`SharedValue`."""

    def get(self) -> float:
        return self._strength.get()

    def set(self, value: float) -> None:
        self._strength.set(value)

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
