"""Durable writes: temporary name, fsync, rename, fsync of the folder; and streaming sha256 of files."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any, ContextManager, Iterator


def temporary_path(path: Path | str) -> Path:
    """The one temporary-name convention of every writer: `.<name>.tmp-<pid>` beside the target, so
    leftovers of a crash are recognisable and never mistaken for the file itself."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: Path | str, *, text: bool = False, lock: bool = False,
                 creating: ContextManager | None = None) -> Iterator[IO]:
    """Write `path` so that readers see the old file or the whole new one, never part of it.

    Yields a file open on `temporary_path(path)`; on a clean exit it is flushed, fsynced and renamed
    to `path`, and the folder is fsynced (making the rename durable). On an exception the temporary
    file is removed. `lock` holds an exclusive flock on the temporary file until it is renamed (so
    another process can tell a live write from a crash leftover); `creating` is a context held
    while the file is created (the cache's lock, for the same reason). The file is opened for
    reading too, so a caller may hash what it wrote before the rename.
    """
    path = Path(path)
    tmp = temporary_path(path)
    with creating if creating is not None else contextlib.nullcontext():
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        if lock:
            fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with os.fdopen(fd, "w+" if text else "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)     # while the file is still open: its flock lasts until here
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """`obj` as indented, key-sorted JSON, written atomically."""
    with atomic_write(path, text=True) as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")


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
