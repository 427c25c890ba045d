"""Output folders that appear whole or not at all: built under a hidden name beside the target, then
renamed into place.

An export or import that fails (bad input, a full disk, Ctrl-C) must leave no half-written folder where
its user asked for one. Both build `.<name>.<tag>` in the target's parent folder and rename it to
`<name>` once everything in it is written and fsynced; a rename within one file system is atomic.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from logitcache.errors import UserError
from logitcache.format.atomic import fsync_path


def staging_dir(out: Path, tag: str) -> Path:
    """The hidden working folder for `out`: `.<name>.<tag>` beside it (same file system, so the
    final rename is atomic)."""
    return out.parent / f".{out.name}.{tag}"


def pid_tag() -> str:
    """A tag owned by this process (`tmp-<pid>`): a crashed run's folder is recognisable as stale."""
    return f"tmp-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's live process
        return True
    return True


def remove_stale(out: Path) -> None:
    """Remove `.<name>.tmp-<pid>` folders of `out` whose process is gone (a killed earlier run);
    a live process's folder is left alone."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.tmp-(\d+)$")
    for entry in out.parent.iterdir():
        match = pattern.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def refuse_existing(out: Path, what: str) -> None:
    """`out` must not exist yet: nothing is ever written over a user's folder."""
    if out.exists() or out.is_symlink():
        raise UserError(f"{out}: already exists; {what} writes a new folder (remove it or choose another name)")


def publish(staging: Path, out: Path) -> None:
    """fsync every file in `staging`, rename it to `out`, fsync the parent (making the rename durable)."""
    for path in staging.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fsync_path(path)
    fsync_path(staging)
    if out.exists() or out.is_symlink():     # appeared while we worked: never replace it
        raise UserError(f"{out}: appeared while this ran; nothing was written over it")
    os.rename(staging, out)
    fsync_path(out.parent)


def discard(staging: Path) -> None:
    """Remove a working folder (after a failure); missing is fine."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(staging)
