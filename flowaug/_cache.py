"""Atomic, self-checking cache files.

A cache file is ``MAGIC`` + one JSON header line (format, key, payload size, blake2b digest) + the payload
(``torch.save`` bytes). It is written to a temporary file in the same folder, flushed and fsynced, then
renamed over the target: a run killed mid-write leaves at most a temporary file, never a truncated cache
under the real name. On load the key, size and digest are checked; anything else (foreign file, other
configuration, truncated or corrupted bytes) is reported as a miss with the reason, and the caller rebuilds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import torch

from ._io import atomic_path

__all__ = ["read_cache", "write_cache"]

MAGIC = b"FLOWAUG-CACHE\n"
FORMAT = 1


def write_cache(path: str, key: str, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    header = json.dumps({"format": FORMAT, "key": key, "size": len(data),
                         "blake2b": hashlib.blake2b(data, digest_size=32).hexdigest()}).encode() + b"\n"
    with atomic_path(path, suffix=".flowaug") as tmp, open(tmp, "wb") as handle:
        handle.write(MAGIC)
        handle.write(header)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def read_cache(path: str, key: str) -> tuple[dict | None, str]:
    """Returns ``(payload, "hit")`` or ``(None, reason)``."""
    if not os.path.isfile(path):
        return None, "no cache file"
    try:
        with open(path, "rb") as handle:
            if handle.read(len(MAGIC)) != MAGIC:
                return None, "not a flowaug cache file"
            header = json.loads(handle.readline().decode())
            if header.get("format") != FORMAT:
                return None, f"cache format {header.get('format')} is not {FORMAT}"
            if header.get("key") != key:
                return None, "cache was built for other data or settings"
            data = handle.read()
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return None, f"unreadable cache ({type(err).__name__})"
    if len(data) != header.get("size"):
        return None, f"truncated cache ({len(data)} of {header.get('size')} bytes)"
    if hashlib.blake2b(data, digest_size=32).hexdigest() != header.get("blake2b"):
        return None, "corrupted cache (checksum mismatch)"
    return torch.load(io.BytesIO(data), weights_only=True), "hit"
