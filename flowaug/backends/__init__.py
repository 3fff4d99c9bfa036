"""Backend choice: dense torch (``"tensorized"``), chunked dense (``"chunked"``) or KeOps (``"keops"``), one
place decides.

``backend="auto"`` follows the crossover measured by ``benchmarks/speed.py`` (tables in
``benchmarks/README.md``). On this project's 2-core CPU the dense backend was faster than KeOps in every case that
fit in memory: one MMD step at 256 x 1024, d = 784 took 14 ms dense and 557 ms with KeOps; N = M = 4096 at
d = 64, 1.3 s against 5.5 s; N = M = 16384 at d = 64, 18 s against 80 s. Where dense does not fit, the chunked
backend (dense arithmetic in row blocks, memory bounded by a block budget) replaces KeOps on the CPU: one MMD
step at N = M = 65,536, d = 64 took 57 s with chunked (one thread, 152 MB above the
process baseline) against 1,171 s with KeOps (133 MB); dense would need 64 GiB. Where dense fits it stays the
CPU choice: it computes the cost once per step while chunked recomputes it at every Sinkhorn half-iteration
(see the side-by-side table in ``benchmarks/README.md``). On CUDA no crossover has been measured by this project
(no GPU was available); ``auto`` follows geomloss's rule (dense up to 5000^2 point pairs, KeOps above) and
memory, and uses chunked where KeOps is unavailable and dense does not fit.

A KeOps failure (pykeops missing, no compiler, unwritable build folder) turns KeOps off for the process
with one warning; the flow then continues on the dense backend.
"""

from __future__ import annotations

import os
import warnings

import torch

from .chunked import ChunkedPair, chunk_bytes, chunk_rows
from .dense import DensePair, Workspace
from .keops import KeOpsPair
from .protocol import PairOps

__all__ = [
    "PairOps",
    "BACKENDS",
    "ChunkedPair",
    "DenseMemoryError",
    "DensePair",
    "KeOpsPair",
    "Workspace",
    "available_memory",
    "chunk_bytes",
    "chunk_rows",
    "dense_bytes",
    "disable_keops",
    "keops_available",
    "select",
]

BACKENDS = ("auto", "chunked", "keops", "tensorized")
PAIR: dict[str, type[PairOps]] = {"tensorized": DensePair, "chunked": ChunkedPair, "keops": KeOpsPair}
CUDA_DENSE_PAIRS = 5000**2  # geomloss's tensorized/online switch (unmeasured here: no GPU)
MEMORY_FRACTION = 0.7  # share of the available memory the dense buffers may take

_keops_state: dict = {"ok": None, "reason": None}


class DenseMemoryError(MemoryError):
    """The dense backend would not fit in memory; the message names the fixes (``backend="chunked"`` or
    ``"keops"``)."""


def disable_keops(reason: str) -> None:
    """Turn KeOps off for this process after a failure, warning once."""
    if _keops_state["ok"] is not False:
        warnings.warn(
            f"KeOps is unavailable ({reason}); flowaug falls back to the dense backend "
            "(backend='tensorized', or 'chunked' where the dense buffers do not fit) for the rest of this process",
            RuntimeWarning,
            stacklevel=3,
        )
    _keops_state.update(ok=False, reason=reason)


def keops_available() -> bool:
    """True when pykeops imports and compiles a tiny reduction (cached after the first call)."""
    if _keops_state["ok"] is None:
        try:
            from .keops import import_keops

            pkt = import_keops()
            x = torch.zeros(2, 1)
            pkt.LazyTensor(x[:, None, :]).sqdist(pkt.LazyTensor(x[None, :, :])).sum(dim=1)
            _keops_state["ok"] = True
        except Exception as err:  # noqa: BLE001 - any failure means "do not use KeOps"
            disable_keops(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return bool(_keops_state["ok"])


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (``FLOWAUG_MEMORY_LIMIT`` overrides, in bytes)."""
    limit = os.environ.get("FLOWAUG_MEMORY_LIMIT")
    if limit:
        return int(float(limit))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3  # unknown platform: assume a modest machine


def dense_bytes(n: int, m: int, itemsize: int = 4) -> int:
    """Peak bytes of the dense buffers of one flow step: cost, row-kernel and column-kernel matrices for x-y,
    cost and row kernel for x-x."""
    return (3 * n * m + 2 * n * n) * itemsize


def select(name: str, device: torch.device, n: int, m: int, dim: int, itemsize: int = 4) -> str:
    """Resolve ``"auto"`` and check feasibility; returns ``"tensorized"``, ``"chunked"`` or ``"keops"``.

    ``"auto"``: on CPU dense when its buffers fit, else chunked (faster than KeOps on CPU); on CUDA KeOps
    above ``CUDA_DENSE_PAIRS`` pairs or when dense does not fit, and chunked where KeOps is unavailable and
    dense does not fit. An explicit ``"keops"`` that cannot run falls back the same way (dense if it fits,
    else chunked). An explicit ``"tensorized"`` that does not fit raises :class:`DenseMemoryError`.
    """
    need = dense_bytes(n, max(m, n), itemsize)
    budget = int(available_memory(device) * MEMORY_FRACTION)
    fits = need <= budget
    if name == "chunked":
        return name
    if name == "auto":
        if device.type == "cuda":
            want_keops = (not fits) or n * m > CUDA_DENSE_PAIRS
        else:
            want_keops = False  # KeOps was slower than chunked on this project's CPU (module docstring)
        if want_keops and keops_available():
            return "keops"
        return "tensorized" if fits else "chunked"
    if name == "keops":
        if keops_available():
            return "keops"
        return "tensorized" if fits else "chunked"
    if not fits:
        raise DenseMemoryError(
            f"the dense backend needs {need / 2**30:.1f} GiB for {n} x {m} points "
            f"but {budget / 2**30:.1f} GiB are available on {device}; use backend='chunked' (the same dense "
            "arithmetic in row blocks, memory bounded by FLOWAUG_CHUNK_BYTES) or backend='auto', or "
            "backend='keops' (memory linear in N + M; needs pykeops and a C++ compiler), or flow smaller batches"
        )
    return name
