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

__all__ = ["SharedValue", "ProcessGenerator", "strength_property"]


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
    """A ``torch.Generator`` private to the current process and DataLoader worker.

    With a ``seed`` the stream is reproducible: the main process uses the seed itself; a worker mixes in
    the DataLoader's per-worker seed (``base_seed + worker_id``, drawn anew every epoch from the main
    process RNG), so workers differ from each other and from one epoch to the next. Without a seed, the
    process's ``torch.initial_seed()`` is used (what DataLoader sets per worker).
    """

    def __init__(self, seed: int | None):
        self.seed = seed
        self._gen: torch.Generator | None = None
        self._owner = None

    def _identity(self):
        info = torch.utils.data.get_worker_info()
        return os.getpid(), None if info is None else (info.id, info.seed)

    def get(self) -> torch.Generator:
        owner = self._identity()
        if self._gen is None or owner != self._owner:
            worker = owner[1]
            if self.seed is None:
                seed = torch.initial_seed()
            elif worker is None:
                seed = self.seed
            else:
                digest = hashlib.blake2b(f"{self.seed}:{worker[1]}".encode(), digest_size=8).digest()
                seed = int.from_bytes(digest, "little")
            self._gen = torch.Generator().manual_seed(seed % (2**63))
            self._owner = owner
        return self._gen

    def __getstate__(self):
        return {"seed": self.seed, "_gen": None, "_owner": None}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "state": None if self._gen is None else self._gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self._gen, self._owner = None, None
        if state["state"] is not None:
            self.get().set_state(state["state"])
