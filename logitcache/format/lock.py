"""The cache folder's lock: writers of one cache take it to change the manifest or create a shard's temporary file."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".lock"


@contextlib.contextmanager
def manifest_lock(cache_dir: Path) -> Iterator[None]:
    """Exclusive advisory lock on `<cache_dir>/.lock` for the duration of the block."""
    fd = os.open(Path(cache_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # closing releases the flock
