"""Reading a cache at a URL (any fsspec file system): whole shards fetched by a background thread
pool `readahead` shards ahead of the one being decoded, each checked against the manifest's size and
sha256 before it is parsed, so batches equal those of a local read.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.errors import UserError
from logitcache.format.schema import MANIFEST_NAME, SHARD_PATTERN
from logitcache.read.urls import (
    CHUNK,
    MAX_MANIFEST_BYTES,
    URLPath,
    filesystem,
    is_missing,
    list_folder,
    read_limited,
)


class RemoteShards:
    """The shards of a cache at a URL, for `RemoteCacheReader`: one listing, whole-shard fetches
    checked against the manifest's size and sha256, and a read-ahead pool.

    On open, the manifest is read (at most MAX_MANIFEST_BYTES); it is validated by the reader.
    """

    def __init__(self, url: str, *, storage_options: dict | None = None, readahead: int = 2):
        if readahead < 0:
            raise ValueError("readahead must be >= 0")
        self.url = str(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.url, self.storage_options)
        self._pid = os.getpid()
        self.path = URLPath(self.url)
        self.readahead = int(readahead)
        raw = read_limited(self.fs, f"{self.root}/{MANIFEST_NAME}", MAX_MANIFEST_BYTES, self.path / MANIFEST_NAME)
        if raw is None:
            raise UserError(f"{self.url}: not a cache (no {MANIFEST_NAME})")
        self.manifest_bytes = raw
        self._files = list_folder(self.fs, self.root)
        self._fetcher: _Prefetcher | None = None

    def __getstate__(self) -> dict:        # DataLoader workers started by spawn get a fresh pool
        state = dict(self.__dict__)
        state["_fetcher"], state["_pid"] = None, -1
        return state

    def remote_path(self, entry: dict) -> str:
        if not SHARD_PATTERN.match(entry.name):   # validated already; never build another path
            raise UserError(f"{self.url}: shard name {entry.name!r} is not allowed")
        return f"{self.root}/{entry.name}"

    def size(self, entry: dict) -> int:
        """The listed size of a shard; UserError if it is missing or a symbolic link."""
        info = self._files.get(entry.name)
        if info is None:
            raise UserError(f"{self.path / entry.name}: shard listed in the manifest is missing")
        if info.get("islink"):
            raise UserError(f"{self.path / entry.name}: shard is a symbolic link; refusing to follow it")
        return int(info.get("size") or 0)

    def check_bytes(self, entry: dict, size: int, digest: str) -> None:
        """UserError naming the shard unless (size, sha256) is what the manifest lists."""
        if size != entry.bytes:
            shown = size if size <= entry.bytes else f"more than {entry.bytes}"
            raise UserError(f"{self.path / entry.name}: {shown} bytes, manifest says {entry.bytes} "
                            "(truncated or replaced)")
        if digest != entry.sha256:
            raise UserError(f"{self.path / entry.name}: sha256 mismatch ({digest[:16]}..., manifest says "
                            f"{entry.sha256[:16]}...): the remote copy is corrupt")

    def fetch(self, entry: dict) -> bytes:
        """The whole shard, checked against its manifest size and sha256."""
        try:
            with self.fs.open(self.remote_path(entry), "rb", block_size=CHUNK) as f:
                data = f.read(entry.bytes + 1)
        except UserError:
            raise
        except Exception as exc:   # noqa: BLE001
            if is_missing(exc):
                raise UserError(f"{self.path / entry.name}: shard listed in the manifest is missing") from None
            raise UserError(f"{self.path / entry.name}: cannot read ({exc.__class__.__name__}: {exc})") from None
        self.check_bytes(entry, len(data), hashlib.sha256(data).hexdigest())
        return data

    def _prefetcher(self) -> "_Prefetcher":
        if self._pid != os.getpid():   # a forked DataLoader worker: clients (s3fs) are not fork-safe
            self.fs, _ = filesystem(self.url, dict(self.storage_options, skip_instance_cache=True))
            self._pid, self._fetcher = os.getpid(), None
        if self._fetcher is None:      # threads do not survive fork either
            self._fetcher = _Prefetcher(self.fetch, self.readahead)
        return self._fetcher

    def plan(self, entries: list[dict]) -> None:
        """The shards about to be read, in order: fetch them `readahead` ahead."""
        self._prefetcher().plan(entries)

    def parquet(self, entry: dict) -> pq.ParquetFile:
        buf = pa.BufferReader(self._prefetcher().get(entry))
        try:
            pf = pq.ParquetFile(buf)
        except Exception as exc:   # noqa: BLE001
            raise UserError(f"{self.path / entry.name}: unreadable Parquet ({exc.__class__.__name__})") from None
        if pf.metadata.num_rows != entry.rows:
            raise UserError(f"{self.path / entry.name}: {pf.metadata.num_rows} rows, manifest says {entry.rows}")
        pf._logitcache_file = buf
        return pf

    def verify(self, entries: list[dict]) -> list[tuple[str, str]]:
        """Re-hash every remote shard: `(shard name, reason)` per problem, empty when intact."""
        problems = []
        for e in entries:
            try:
                self.fetch(e)
            except UserError as exc:
                problems.append((e.name, str(exc).split(": ", 1)[-1]))
        return problems


class _Prefetcher:
    """Fetches shards on a small thread pool, `readahead` ahead of the one asked for in a plan."""

    def __init__(self, fetch: Callable[[dict], bytes], readahead: int):
        self.pid = os.getpid()
        self.fetch = fetch
        self.readahead = readahead
        self.pool = ThreadPoolExecutor(max_workers=max(1, readahead), thread_name_prefix="logitcache-fetch")
        self.lock = threading.Lock()
        self.futures: OrderedDict[int, Future] = OrderedDict()
        self.order: list[dict] = []
        self.position: dict[int, int] = {}

    def plan(self, entries: list[dict]) -> None:
        """The shards about to be read, in order; forgets fetches for an earlier plan."""
        with self.lock:
            for f in self.futures.values():
                f.cancel()
            self.futures.clear()
            self.order = list(entries)
            self.position = {e.index: p for p, e in enumerate(self.order)}

    def _submit(self, entry: dict) -> None:
        if entry.index not in self.futures:
            self.futures[entry.index] = self.pool.submit(self.fetch, entry)

    def get(self, entry: dict) -> bytes:
        with self.lock:
            self._submit(entry)
            fut = self.futures.pop(entry.index)
            p = self.position.get(entry.index)
            if p is not None:
                for later in self.order[p + 1:p + 1 + self.readahead]:
                    self._submit(later)
        return fut.result()
