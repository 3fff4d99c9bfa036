"""Atomic file writes: every file flowaug (or its benchmarks) writes goes through ``atomic_path``."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary file is removed and the exception re-raised, so
    ``path`` is either the old file or the complete new one, never half-written. ``suffix`` (default: the
    extension of ``path``) matters to writers that choose a format by extension (matplotlib, numpy).

    >>> import os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "out.txt")
    >>> with atomic_path(target) as tmp:
    ...     _ = open(tmp, "w").write("done")
    >>> open(target).read(), sorted(os.listdir(os.path.dirname(target)))
    ('done', ['out.txt'])
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1] if suffix is None else suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
