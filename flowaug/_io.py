"""Atomic file writes: every file flowaug (or its benchmarks) writes goes through ``atomic_path``."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator

__all__ = ["atomic_path"]


def _create_temp(folder: str, suffix: str, mode: int) -> str:
    """Create an empty, new file ``folder/.tmp-XXXX<suffix>`` with ``mode`` (the umask applies) and return it.

    ``tempfile.mkstemp`` is not used: it creates files 0600 whatever the umask, so shared caches and outputs
    would be unreadable to the group and others.
    """
    for _ in range(100):
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(6)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", os.path.join(folder, ".tmp-*"))


@contextlib.contextmanager
def atomic_path(path: str, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary file is removed and the exception re-raised, so
    ``path`` is either the old file or the complete new one, never half-written. ``suffix`` (default: the
    extension of ``path``) matters to writers that choose a format by extension (matplotlib, numpy).

    Permissions are those ``open(path, "w")`` would give: a new file gets ``0o666 & ~umask``; a file that is
    replaced keeps its permission bits.

    >>> import os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "out.txt")
    >>> with atomic_path(target) as tmp:
    ...     _ = open(tmp, "w").write("done")
    >>> open(target).read(), sorted(os.listdir(os.path.dirname(target)))
    ('done', ['out.txt'])
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        keep = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        keep = None
    tmp = _create_temp(folder, os.path.splitext(path)[1] if suffix is None else suffix, 0o666)
    try:
        yield tmp
        if keep is not None:  # after the write, so that a read-only file's bits do not block the writer
            os.chmod(tmp, keep)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
