"""Helpers shared by the benchmark scripts: machine facts, timing, atomic JSON, markdown tables."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a clone without installing

from flowaug._io import atomic_path  # noqa: E402


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": _git(),
    }


def _git() -> str | None:
    """Commit of the code that produced a result (with '+dirty' if the tree had changes)."""
    root = os.path.join(os.path.dirname(__file__), "..")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def median_time(fn, repeats: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def write_json(path: str, payload) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1)


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def run_parallel(fn, args, units: list[tuple]) -> None:
    """``fn(args, *unit)`` for every unit, in ``args.jobs`` spawned processes (each sets one thread) or here."""
    if args.jobs > 1 and len(units) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            for fut in [pool.submit(fn, args, *u) for u in units]:
                fut.result()
    else:
        for u in units:
            fn(args, *u)


def t_interval(d: list[float]) -> list[float] | None:
    from scipy import stats

    if len(d) < 2:
        return None
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return [statistics.mean(d) - half, statistics.mean(d) + half]


def paired(a: dict, b: dict) -> dict:
    """Mean of a - b over the (draw, seed) keys both have, with a 95 % t-interval over those runs (the issue's
    statistic) and, more conservative, over the per-draw means (seeds of one draw share its shots, source sample
    and flow, so they are not independent draws of the data: df = draws - 1)."""
    keys = [key for key in a if key in b]
    d = [a[key] - b[key] for key in keys]
    if not d:
        return {"mean_diff": None, "ci95": None, "pairs": 0}
    draws = sorted({key[0] for key in keys})
    per_draw = [statistics.mean(a[key] - b[key] for key in keys if key[0] == dr) for dr in draws]
    return {"mean_diff": statistics.mean(d), "ci95": t_interval(d), "pairs": len(d),
            "ci95_over_draw_means": t_interval(per_draw), "draws": len(draws)}


def read_cells(path: str) -> list[dict]:
    """The records :func:`append` wrote to ``path`` (none when it does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def append(path: str, record: dict) -> None:
    """One finished record, one line, one write: parallel jobs append to the same file safely (O_APPEND)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
