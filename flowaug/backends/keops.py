"""KeOps (online) evaluation: costs are recomputed on the fly inside each reduction, memory O(N + M).

This is the layout of geomloss's ``backend="online"``, written against pykeops' ``LazyTensor`` directly
because the flow engine needs reductions geomloss does not expose (the soft barycentre
``sumsoftmaxweight`` and the kernel-gradient sums) and its own warm-started Sinkhorn loop.

pykeops is imported lazily, never at ``import flowaug``: importing it probes CUDA, which must not happen
in the parent of forked DataLoader workers. It JIT-compiles every (formula, dimension, dtype) on first
use and caches the binary in its build folder. Two processes compiling the same formula at once have
been reported to collide (keops issue #168), so the first use of each signature in a process holds an
exclusive file lock in the build folder: concurrent first uses are serialised and the second one finds
the binary already built. Set ``FLOWAUG_KEOPS_BUILD`` to give a process its own build folder instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading

import torch

__all__ = ["KeOpsPair", "NAME", "import_keops"]

NAME = "keops"
_compiled: set = set()
_lock = threading.Lock()


def import_keops():
    """Import ``pykeops.torch`` (quietly), honouring ``FLOWAUG_KEOPS_BUILD``; raises ImportError."""
    with contextlib.redirect_stdout(sys.stderr):  # pykeops prints its CUDA notice on stdout at first import
        import pykeops  # noqa: F401  (ImportError propagates: the caller falls back to dense)

    build = os.environ.get("FLOWAUG_KEOPS_BUILD")
    if build:
        os.makedirs(build, exist_ok=True)
        if pykeops.get_build_folder() != build:
            pykeops.set_build_folder(build)
    pykeops.set_verbose(False)
    from pykeops import torch as pkt

    return pkt


@contextlib.contextmanager
def _first_use_lock(signature):
    """Hold an inter-process lock the first time this process uses ``signature`` (it may compile)."""
    if signature in _compiled:
        yield
        return
    import pykeops

    with _lock:
        folder = pykeops.get_build_folder()
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "flowaug.lock"), "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        _compiled.add(signature)


class KeOpsPair:
    """Cost ``C_ij = ||x_i - y_j||^2 / 2`` between ``x`` (N, D) and ``y`` (M, D), never materialised."""

    name = NAME

    def __init__(self, x, y, **_ignored):
        pkt = import_keops()
        self._lt = pkt.LazyTensor
        self.x, self.y = x.contiguous(), y.contiguous()
        self._dtype = str(x.dtype)

    def _cost(self, transpose: bool = False):
        a, b = (self.y, self.x) if transpose else (self.x, self.y)
        a_i = self._lt(a[:, None, :])  # (N, 1, D)
        b_j = self._lt(b[None, :, :])  # (1, M, D)
        return a_i.sqdist(b_j) / 2  # (N, M) symbolic

    def _param(self, value: float):
        return self._lt(torch.tensor([value], dtype=self.x.dtype, device=self.x.device))

    def _run(self, kind: str, width: int, fn):
        signature = (kind, self.x.shape[1], width, self._dtype, self.x.device.type)
        with _first_use_lock(signature):
            return fn()

    # ---------------------------------------------------------------- Sinkhorn primitives
    def softmin(self, eps: float, h: torch.Tensor) -> torch.Tensor:
        h_j = self._lt(h.contiguous()[None, :, None])  # (1, M, 1)
        scores = h_j - self._cost() * self._param(1.0 / eps)
        return self._run("lse", 1, lambda: scores.logsumexp(dim=1).view(-1)).mul_(-eps)  # (N,)

    def softmin_t(self, eps: float, h: torch.Tensor) -> torch.Tensor:
        h_j = self._lt(h.contiguous()[None, :, None])  # (1, N, 1)
        scores = h_j - self._cost(transpose=True) * self._param(1.0 / eps)
        return self._run("lse", 1, lambda: scores.logsumexp(dim=1).view(-1)).mul_(-eps)  # (M,)

    def soft_average(self, eps: float, h: torch.Tensor, values: torch.Tensor):
        h_j = self._lt(h.contiguous()[None, :, None])  # (1, M, 1)
        scores = h_j - self._cost() * self._param(1.0 / eps)
        v_j = self._lt(values.contiguous()[None, :, :])  # (1, M, k)
        f = self._run("lse", 1, lambda: scores.logsumexp(dim=1).view(-1)).mul_(-eps)  # (N,)
        avg = self._run("ssw", values.shape[1], lambda: scores.sumsoftmaxweight(v_j, dim=1))  # (N, k)
        return f, avg

    # ---------------------------------------------------------------- kernel primitives
    def kernel_terms(self, kernel, w: torch.Tensor):
        """Same contract as :meth:`DensePair.kernel_terms`, with one KeOps reduction of width D + 2."""
        w_j = self._lt(w.contiguous()[None, :, None])  # (1, M, 1)
        y1 = torch.cat([self.y, torch.ones_like(self.y[:, :1])], 1)  # (M, D + 1)
        y_j = self._lt(y1.contiguous()[None, :, :])  # (1, M, D + 1)
        k_ij, phi_ij = kernel.keops_terms(self._cost(), self._param)
        terms = (w_j * k_ij).concat(w_j * phi_ij * y_j)  # (N, M, D + 2) symbolic
        out = self._run(f"kernel:{kernel.name}", y1.shape[1] + 1, lambda: terms.sum(dim=1))  # (N, D + 2)
        return out[:, 0], out[:, -1], out[:, 1:-1]
