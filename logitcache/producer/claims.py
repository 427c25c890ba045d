"""Per-shard claims, so producers pointed at one cache share its work instead of doing it twice.

Before computing shard `i`, a producer creates `CACHE/.claim-shard-0000i.parquet` with `O_EXCL`
(holding its host, pid, a random token and the time) while holding the cache's `.lock`. A
heartbeat thread refreshes the file's modification time while the shard is being computed and
written; the claim is removed once the shard is listed in the manifest. Another producer skips a
claimed shard, goes on with the others, and at the end waits for the claimed ones: either they get
listed, or their claim goes stale and it takes them over. A claim is stale when its holder runs on
this host and its pid is gone (a killed producer: taken over at once), or when it has not been
refreshed for `stale_after` seconds (a holder on another machine that died). Takeover happens
under `.lock`, so two waiting producers never both take one shard.

Even if a frozen holder wakes up after its claim was taken over, nothing tears: shards are renamed
into place whole and a shard's bytes depend only on its windows, so the second rename puts the
same bytes in place and the manifest entry is the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from logitcache import format as fmt

CLAIM_PREFIX = ".claim-"
DEFAULT_STALE_AFTER = 120.0      # seconds without a heartbeat before a claim from another host is taken over


def claim_name(index: int) -> str:
    return f"{CLAIM_PREFIX}{fmt.shard_name(index)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process
        return True
    return True


class ShardClaims:
    """Claims of one producer process on the shards of one cache (see the module doc)."""

    def __init__(self, cache_dir: str | os.PathLike, *, stale_after: float = DEFAULT_STALE_AFTER,
                 poll: float = 0.25):
        self.cache_dir = Path(cache_dir)
        self.stale_after = float(stale_after)
        self.poll = float(poll)
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex
        self.held: set[int] = set()
        self.written: set[int] = set()        # shards this process wrote (released after listing)
        self.by_others: set[int] = set()      # shards another process finished while this one waited
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="logitcache-claims", daemon=True)
        self._beat.start()

    # -- one claim -----------------------------------------------------------------------------

    def _path(self, index: int) -> Path:
        return self.cache_dir / claim_name(index)

    def _read(self, path: Path) -> dict | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                info = json.loads(f.read(4096) or b"null")
        except (OSError, ValueError):
            info = None
        return info if isinstance(info, dict) else {}

    def _stale(self, path: Path, info: dict | None) -> bool:
        """Whether a claim may be taken over: its holder is gone, or silent for too long."""
        try:
            age = time.time() - os.lstat(path).st_mtime
        except FileNotFoundError:
            return True
        if info and info.get("host") == self.host and isinstance(info.get("pid"), int) \
                and info.get("token") != self.token and not _pid_alive(info["pid"]):
            return True
        return age > self.stale_after or not info    # an empty or garbled claim: its writer died mid-write

    def try_claim(self, index: int) -> bool:
        """Claim shard `index` if nobody live holds it (under the cache's lock)."""
        from logitcache.format.lock import manifest_lock

        path = self._path(index)
        with manifest_lock(self.cache_dir):
            if os.path.lexists(path):
                info = self._read(path)
                if info and info.get("token") == self.token:
                    return True
                if not self._stale(path, info):
                    return False
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            # held before the file exists: a Ctrl-C anywhere from here on still finds it at close()
            with self._mutex:
                self.held.add(index)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except BaseException:
                with self._mutex:
                    self.held.discard(index)
                raise
            with os.fdopen(fd, "w") as f:
                json.dump({"host": self.host, "pid": os.getpid(), "token": self.token, "time": time.time()}, f)
        return True

    def release(self, index: int, written: bool = True) -> None:
        """Drop the claim on `index` (after its shard is listed in the manifest), if still ours."""
        with self._mutex:
            self.held.discard(index)
            if written:
                self.written.add(index)
        path = self._path(index)
        info = self._read(path)
        if info and info.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        elif not info and os.path.lexists(path):
            # unreadable: our own write cut short (claims are written whole under the lock, so
            # with the lock held nobody else is writing one)
            from logitcache.format.lock import manifest_lock

            with manifest_lock(self.cache_dir):
                if not self._read(path):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)

    # -- the work loop -------------------------------------------------------------------------

    def take(self, todo: Iterable[int], done: Callable[[], set[int]]) -> Iterator[int]:
        """Yield the shards of `todo` this process should compute now, each claimed.

        Shards listed in `done()` are skipped; shards claimed by a live producer are deferred and
        waited for at the end, until they are listed (by their holder) or their claim goes stale
        (then they are yielded here).
        """
        pending = list(todo)
        waited: set[int] = set()
        while pending:
            finished = done()
            deferred = []
            for index in pending:
                if index in finished:
                    if index in waited:
                        self.by_others.add(index)
                    continue
                if not self.try_claim(index):
                    deferred.append(index)
                    waited.add(index)
                    continue
                if index in done():          # listed between our look and our claim
                    self.release(index, written=False)
                    if index in waited:
                        self.by_others.add(index)
                    continue
                yield index
            pending = deferred
            if pending:
                time.sleep(self.poll)

    def sweep(self, done: set[int]) -> None:
        """Remove claims left behind on listed shards by processes that are gone."""
        from logitcache.format.lock import manifest_lock

        with manifest_lock(self.cache_dir):
            for name in os.listdir(self.cache_dir):
                if not name.startswith(CLAIM_PREFIX):
                    continue
                match = fmt.SHARD_PATTERN.match(name[len(CLAIM_PREFIX):])
                path = self.cache_dir / name
                info = self._read(path)
                if match is None or (int(match.group(1)) in done and self._stale(path, info)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)

    def close(self) -> None:
        """Stop the heartbeat and drop every claim still held (on an error or Ctrl-C)."""
        self._stop.set()
        self._beat.join()
        for index in list(self.held):
            self.release(index, written=False)

    def __enter__(self) -> "ShardClaims":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.05, self.stale_after / 4)):
            with self._mutex:
                held = list(self.held)
            for index in held:
                with contextlib.suppress(OSError):
                    os.utime(self._path(index), follow_symlinks=False)
