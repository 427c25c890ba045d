"""Durable writes: temporary name, fsync, rename, fsync of the folder; and streaming sha256 of files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write to a temporary name, fsync, rename, fsync the folder: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_HASH_CHUNK = 1 << 20


def sha256_file(path: Path | int) -> str:
    """Streaming sha256 of a file (a path or an open descriptor, read from its start)."""
    h = hashlib.sha256()
    if isinstance(path, int):
        os.lseek(path, 0, os.SEEK_SET)
        while chunk := os.read(path, _HASH_CHUNK):
            h.update(chunk)
        return h.hexdigest()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
