"""Annealing schedules: ``progress`` in [0, 1] -> strength, pure functions (no Lightning here).

``value = start_value + (end_value - start_value) * shape(progress)`` with

* ``"linear"``: ``p``
* ``"cosine"``: ``(1 - cos(pi p)) / 2`` (slow at both ends); ``"cos"`` is an alias (Lightning's
  ``StochasticWeightAveraging`` name), normalised to ``"cosine"`` by :func:`resolve_schedule`
* ``"step"``: ``floor(p * stairs) / stairs`` (a staircase of ``stairs`` equal steps, 1 at the end)
* ``"exponential"``: ``(exp(rate p) - 1) / (exp(rate) - 1)`` (slow start for ``rate > 0``, fast start
  for ``rate < 0``; linear as ``rate -> 0``)

or any callable ``progress -> strength`` (then ``start_value``/``end_value`` are not used). Either direction
works: ``start_value > end_value`` anneals away from the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ._checks import check_choice, check_int, check_real

__all__ = ["ALIASES", "SCHEDULES", "resolve_schedule", "schedule_value"]

SCHEDULES = ("linear", "cosine", "step", "exponential")
ALIASES = {"cos": "cosine"}  # StochasticWeightAveraging(annealing_strategy="cos") spells cosine annealing so


def resolve_schedule(schedule: str | Callable[[float], float]) -> str | Callable[[float], float]:
    """A callable as is; a name checked and normalised (``"cos"`` -> ``"cosine"``).

    Example:
        >>> resolve_schedule("cos"), resolve_schedule("linear")
        ('cosine', 'linear')
    """
    if callable(schedule):
        return schedule
    if isinstance(schedule, str) and schedule in ALIASES:
        return ALIASES[schedule]
    return check_choice("schedule", schedule, SCHEDULES + tuple(ALIASES))


def _shape(name: str, p: float, stairs: int, rate: float) -> float:
    if name == "linear":
        return p
    if name == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * p))
    if name == "step":
        return min(1.0, math.floor(p * stairs + 1e-9) / stairs)
    if abs(rate) < 1e-9:
        return p
    return math.expm1(rate * p) / math.expm1(rate)


def schedule_value(schedule: str | Callable[[float], float], progress: float, start_value: float = 0.0,
                   end_value: float = 1.0, *, stairs: int = 4, rate: float = 5.0) -> float:
    """Strength at ``progress`` in [0, 1].

    Example:
        >>> [round(schedule_value("cosine", p), 3) for p in (0, 0.25, 0.5, 1)]
        [0.0, 0.146, 0.5, 1.0]
        >>> schedule_value("step", 0.6, stairs=4)
        0.5
        >>> schedule_value("linear", 0.25, start_value=1.0, end_value=0.0)  # away from the reference
        0.75
    """
    p = check_real("progress", progress, low=0, high=1)
    if callable(schedule):
        return check_real("schedule(progress)", schedule(p), low=0, high=1)
    schedule = resolve_schedule(schedule)
    stairs = check_int("stairs", stairs, minimum=1)
    rate = check_real("rate", rate)
    return start_value + (end_value - start_value) * _shape(schedule, p, stairs, rate)
