"""Argument validation shared by every public entry point.

Every check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, wrong value)
with a message that names the argument, says what was expected and what was received. None of them
modifies its input.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import sys
import threading
import warnings
from numbers import Integral, Real
from typing import Sequence

import torch

__all__ = [
    "check_choice",
    "check_finite_tensor",
    "check_int",
    "check_labels",
    "check_real",
    "check_same_device",
    "describe",
]


def describe(value) -> str:
    """Short description of a received value for error messages (never dumps a whole tensor)."""
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device})"
    if type(value).__module__ == "numpy" and hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"numpy array(shape={tuple(value.shape)}, dtype={value.dtype})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {describe(value)}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is True or False (not 0/1, not a string), else a TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {describe(value)}")
    return value


def check_int(name: str, value, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_real(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in the interval given by ``low``/``high`` (closed unless ``*_open``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    value = float(value)
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return value


def check_finite_tensor(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(bad.sum()) - n_nan
            first = int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0]) if t.ndim >= 1 and t.shape[0] else 0
            raise ValueError(
                f"{name} must be finite, got {n_nan} NaN and {n_inf} Inf values "
                f"in a tensor of shape {tuple(t.shape)} (the first in sample {first})"
            )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on the same device, got {where}; move them with .to(device)")


def check_labels(
    name: str,
    labels: torch.Tensor,
    n: int,
    *,
    num_classes: int | None = None,
    allow_soft: bool = True,
    atol: float = 1e-3,
) -> str:
    """Validate hard (N,) integer labels or soft (N, K) probability labels; returns "hard"/"soft"."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({n},) or ({n}, K), got {describe(labels)}")
    if labels.ndim == 1:
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"{name} with shape ({n},) must hold integer class ids, got dtype {labels.dtype}")
        if labels.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},) to match the batch, got {tuple(labels.shape)}")
        if n and int(labels.min()) < 0:
            raise ValueError(f"{name} must hold class ids >= 0, got minimum {int(labels.min())}")
        if num_classes is not None and n and int(labels.max()) >= num_classes:
            raise ValueError(
                f"{name} must hold class ids < {num_classes} (the number of classes), got {int(labels.max())}"
            )
        return "hard"
    if labels.ndim == 2 and allow_soft:
        if not labels.is_floating_point():
            raise TypeError(f"{name} with shape (N, K) must be soft labels of a float dtype, got {labels.dtype}")
        if labels.shape[0] != n:
            raise ValueError(f"{name} must have {n} rows to match the batch, got shape {tuple(labels.shape)}")
        if num_classes is not None and labels.shape[1] != num_classes:
            raise ValueError(f"{name} must have {num_classes} columns (classes), got shape {tuple(labels.shape)}")
        check_finite_tensor(name, labels)
        if n and float(labels.min()) < -atol:
            raise ValueError(f"{name} soft labels must be >= 0, got minimum {float(labels.min()):.4g}")
        sums = labels.double().sum(1)
        worst = float((sums - 1).abs().max()) if n else 0.0
        if worst > atol:
            raise ValueError(f"{name} soft labels must sum to 1 along dim 1, got a row summing to 1 {worst:+.4g}")
        return "soft"
    expected = f"({n},) class ids" + (" or (N, K) soft labels" if allow_soft else "")
    raise ValueError(f"{name} must have shape {expected}, got shape {tuple(labels.shape)}")



_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))  # nn.Module.__call__ sits between user and forward
#: where a DataLoader worker's stack starts (no user code below the library there)
_PROCESS_HOSTS = (os.path.dirname(os.path.abspath(multiprocessing.__file__)), os.path.abspath(threading.__file__))
#: the kinds of :class:`FlowWarning`; a :class:`WarnOnce` shares which of them it has shown with the DataLoader
#: workers that hold a copy of it (shared memory), so each is said once across processes and epochs
#: (another kind is said once per process)
WARNING_KINDS = ("units", "guard-halved", "guard-stopped", "sinkhorn-convergence", "class-names", "missing-class",
                 "untrained-source")


class FlowWarning(RuntimeWarning):
    """A diagnosis of flowaug's; ``kind`` names what it is about (an adapter shows each kind of
    :data:`WARNING_KINDS` once, its DataLoader workers included; see :class:`WarnOnce`)."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind


def warn_user(message: str, category: type[Warning] = RuntimeWarning, *, kind: str | None = None) -> None:
    """``warnings.warn`` attributed to the first caller outside flowaug (the user's line), however deep the
    library's call stack is (what ``skip_file_prefixes`` does from Python 3.12). In a DataLoader worker, whose
    stack holds no user code below the library (torch's worker loop, then multiprocessing), it is attributed
    to the library's outermost frame (e.g. the ``FlowCollate`` or dataset item that flowed), not to
    ``multiprocessing/process.py``. With ``kind``, a :class:`FlowWarning` of that kind."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the caller of warn_user
    outermost = None  # stacklevel of the outermost flowaug frame
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith((_PACKAGE_DIR, _TORCH_DIR)):
        if os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
            outermost = level
        frame, level = frame.f_back, level + 1
    if frame is None or os.path.abspath(frame.f_code.co_filename).startswith(_PROCESS_HOSTS):
        level = outermost or 2
    if kind is not None:
        warnings.warn(FlowWarning(message, kind), stacklevel=level)
    else:
        warnings.warn(message, category, stacklevel=level)


class WarnOnce:
    """Shows each kind of warning once for its owner (an adapter): a transform that flows every batch would
    otherwise repeat one diagnosis per batch, with numbers that differ (so Python's own once-per-line
    filter does not merge them). The kinds of :data:`WARNING_KINDS` are marked in shared memory, which the
    owner's copies in DataLoader workers (fork or spawn) share: each is said once in all, not once per worker
    and epoch (two workers meeting it at the same instant may both say it). Warnings without a ``kind`` are
    merged by their text, once per process: once per worker, and again each epoch unless the workers are
    persistent."""

    def __init__(self, drop=()):
        self.seen: set = set(drop)  # kinds never shown, or already shown in this process
        self.shown = torch.zeros(len(WARNING_KINDS), dtype=torch.uint8)  # (kinds,) 1: shown by some process
        try:
            self.shown.share_memory_()
        except RuntimeError:  # pragma: no cover - platforms without shared memory: once per process
            pass

    @contextlib.contextmanager
    def __call__(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            kind = getattr(w.message, "kind", None)
            key = kind or (w.category.__name__, str(w.message))
            if key in self.seen:
                continue
            self.seen.add(key)
            if kind in WARNING_KINDS:
                flag = self.shown[WARNING_KINDS.index(kind)]
                if bool(flag):
                    continue
                flag.fill_(1)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
