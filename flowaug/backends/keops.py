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

On a machine without CUDA, keopscore prints ``[KeOps] Warning : CUDA libraries not found or could not be
loaded; Switching to CPU only.`` on stdout when it is first imported, whoever imports it (this module, or
geomloss in :mod:`flowaug.distance`). That line is dropped here (:func:`_install_notice_filter`); every other
line keopscore prints, and every error it raises, goes through unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import sys
import threading

import torch

__all__ = ["CUDA_NOTICE", "NAME", "KeOpsPair", "import_keops"]

NAME = "keops"
_compiled: set = set()
_lock = threading.Lock()


# keopscore's import-time notice on CPU-only machines (keopscore/config/cuda.py). It is a print() on stdout,
# not a warning, so warnings filters do not catch it, and it cannot be turned off before keopscore is imported
# except by KEOPS_VERBOSE=0, which would also silence every later KeOps warning. Here it says nothing a CPU
# user can act on (flowaug only picks KeOps on CPU when asked to, and then it runs on CPU as intended), and it
# broke stdout-as-data uses (the CLI's JSON), hence the filter below.
CUDA_NOTICE = "CUDA libraries not found or could not be loaded; Switching to CPU only."


class _WithoutNotice(io.TextIOBase):
    """A stdout proxy that forwards every line except the ones holding :data:`CUDA_NOTICE`."""

    def __init__(self, stream):
        super().__init__()
        self.stream, self.pending = stream, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if CUDA_NOTICE not in line:
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def finish(self) -> None:
        if self.pending and CUDA_NOTICE not in self.pending:
            self.stream.write(self.pending)
        self.pending = ""
        self.stream.flush()


class _QuietLoader:
    """keopscore's own loader, run with the notice filtered out of stdout."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        if sys.stdout is None:  # pythonw: nothing is printed anyway
            self._loader.exec_module(module)
            return
        quiet = _WithoutNotice(sys.stdout)
        try:
            with contextlib.redirect_stdout(quiet):
                self._loader.exec_module(module)
        finally:
            quiet.finish()

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: keopscore's loader answers
        if name == "_loader":
            raise AttributeError(name)
        return getattr(self._loader, name)


class _KeOpsNoticeFilter:
    """A ``sys.meta_path`` finder that only ever answers for ``keopscore`` (pykeops and geomloss import it):
    it finds keopscore as the other finders would and runs its import through :class:`_QuietLoader`. A hook,
    because the first import of keopscore may happen anywhere (geomloss, the user's code), and the notice is
    printed by that first import only."""

    flowaug_keops_notice = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keopscore":
            return None
        for finder in sys.meta_path:
            if getattr(finder, "flowaug_keops_notice", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def _install_notice_filter() -> None:
    """Put :class:`_KeOpsNoticeFilter` first on ``sys.meta_path`` (once; it imports nothing itself)."""
    if "keopscore" not in sys.modules and not any(getattr(f, "flowaug_keops_notice", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _KeOpsNoticeFilter())


_install_notice_filter()


def import_keops():
    """Import ``pykeops.torch`` (without its CPU-only CUDA notice, see :data:`CUDA_NOTICE`), honouring
    ``FLOWAUG_KEOPS_BUILD``; raises ImportError."""
    import pykeops  # ImportError propagates: the caller falls back to dense

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
