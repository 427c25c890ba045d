"""Read a cache: validated open, integrity check, streaming batches and a DDP/worker-aware dataset.

Nothing in a cache is trusted: the manifest is validated field by field (`format.Manifest.load`),
every shard is opened through `format.shard_path` (names must be `shard-NNNNN.parquet`, no symbolic
links, nothing outside the folder) and with `O_NOFOLLOW`, and every listed shard must exist with its
listed size before any is read.

Batches (from `iter_batches` and `dataset`) are dicts of CPU tensors; B windows, T = seq_len:

- `window_id`      int64   [B]
- `input_ids`      int64   [B, T]     the window's tokens `[:, :-1]` (what the student reads)
- `labels`         int64   [B, T]     the window's tokens `[:, 1:]`  (the next token at each position)
- `target_logprob` float32 [B, T]     teacher log p(labels)
- `topk_ids`       int64   [B, T, k]  teacher top-k token ids, by descending log-prob
- `topk_logprobs`  float32 [B, T, k]  their log-probs (normalised over the usable vocabulary)
- `tail_logmass`   float32 [B, T]     log of the probability mass outside the top-k

A `samples` payload (`reader.payload == "samples"`; its k is S) gives, instead of the three top-k entries:

- `sample_ids`     int64   [B, T, S]  distinct ids among S draws from the teacher's full softmax
- `sample_counts`  int32   [B, T, S]  how often each was drawn (sum S per position; 0 = padding)

A `sequences` cache's batches are cut to their longest row and add `attention_mask` int64 and
`loss_mask` bool [B, T]; a packed one (format 3) also `position_ids` int64 [B, T] (from 0 at each
document's first token) and `document_ids` int64 [B, T] (the document's index in its row, -1 on
padding): a model must keep attention inside each document (docs/FORMAT.md).

`read_shard(index)` returns the stored layout as numpy instead (`input_ids` is the whole window,
[rows, T + 1], int32).

Reading with `datasets` alone: `logitcache.integrations.datasets.cache_transform`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache import format as fmt
from logitcache.encodings import get_encoding
from logitcache.errors import UserError
from logitcache.format.manifest import Manifest, ShardEntry, TeacherInfo
from logitcache.read.batches import concat_rows, slice_rows, torch_batch
from logitcache.read.dataset import CacheDataset
from logitcache.read.decode import decode_rows
from logitcache.read.remote import RemoteShards
from logitcache.read.urls import is_url
from logitcache.verify import verify_cache


class CacheReader:
    """An open, validated cache folder.

    On open: the manifest is validated, each listed shard's entry must agree with the plan
    (`first_window`, `rows`), and each listed shard file must exist (not as a symbolic link) with
    exactly the manifest's `bytes`. Anything else is a one-line UserError. An incomplete cache
    (`complete: false`) is readable: it holds the shards listed so far.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path}: no such cache folder")
        self._load(Manifest.load(self.path))

    @classmethod
    def open(cls, path: "str | os.PathLike", **options) -> "CacheReader":
        """A local folder, or a URL (`s3://`, `hf://`, `file://`, ...) streamed through fsspec with
        read-ahead (`RemoteCacheReader`; `options` go to it)."""
        return RemoteCacheReader(str(path), **options) if is_url(path) else cls(path)

    def _load(self, m: Manifest) -> None:
        """Check a validated manifest against the plan and every listed shard's size (local or remote)."""
        self.manifest = m
        try:
            self.encoding = get_encoding(m.encoding.name, m.encoding.params)
        except TypeError:
            raise UserError(f"{self.path / fmt.MANIFEST_NAME}: invalid parameters for encoding "
                            f"'{m.encoding.name}': {sorted(m.encoding.params)}") from None
        if self.encoding.payload != m.payload:
            raise UserError(f"{self.path / fmt.MANIFEST_NAME}: invalid manifest: encoding {m.encoding.name} "
                            f"stores {self.encoding.payload}, not the manifest's payload {m.payload}")
        self.k: int = m.k
        self.seq_len: int = m.seq_len
        self.payload: str = m.payload
        if self.sampled and self.k != self.encoding.S:
            raise UserError(f"{self.path / fmt.MANIFEST_NAME}: invalid manifest: a samples cache's k ({self.k}) "
                            f"must be its S ({self.encoding.S})")
        self.shards: list[ShardEntry] = sorted(m.shards, key=lambda e: e.index)
        self._by_index = {e.index: e for e in self.shards}
        for e in self.shards:
            problem = m.entry_problem(e)
            if problem:
                raise UserError(f"{self.path / fmt.MANIFEST_NAME}: invalid manifest: {e.name}: {problem}")
            size = self._shard_size(e)
            if size != e.bytes:
                raise UserError(f"{self.path / e.name}: {size} bytes, manifest says {e.bytes} "
                                f"(truncated or replaced); run `logitcache verify {self.path}`")
        self.schema = pa.schema(fmt.base_schema(m.sequences, m.packed)
                                + self.encoding.arrow_fields(self.k, self.seq_len))

    @property
    def sampled(self) -> bool:
        """Whether the cache holds draws (`samples` payload) rather than top-k sets."""
        return self.payload == fmt.PAYLOAD_SAMPLES

    def _shard_size(self, entry: ShardEntry) -> int:
        fd = fmt.open_shard_fd(self.path, entry)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    # -- description ---------------------------------------------------------------------------

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def teacher(self) -> TeacherInfo:
        return self.manifest.teacher

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    @property
    def rows_per_shard(self) -> int:
        return self.manifest.rows_per_shard

    @property
    def num_windows(self) -> int:
        """Windows in the listed shards (all of the data's windows once the cache is complete)."""
        return sum(e.rows for e in self.shards)

    @property
    def num_tokens(self) -> int:
        """Positions stored in the listed shards (a `sequences` cache stores its loss positions only)."""
        return sum(e.tokens for e in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(e.bytes for e in self.shards)

    def __repr__(self) -> str:
        return (f"CacheReader({str(self.path)!r}, k={self.k}, encoding={self.encoding.name}, "
                f"windows={self.num_windows}, shards={len(self.shards)}, complete={self.complete})")

    # -- integrity -----------------------------------------------------------------------------

    def verify(self) -> list[tuple[str, str]]:
        """Re-hash every shard and check its row count; see `verify_cache`."""
        return verify_cache(self.path)

    # -- decoding ------------------------------------------------------------------------------

    def _entry(self, shard: int | str) -> dict:
        if isinstance(shard, str):
            match = fmt.SHARD_PATTERN.match(shard)
            shard = int(match.group(1)) if match else -1
        if shard not in self._by_index:
            raise UserError(f"{self.path}: shard {shard} is not listed in the manifest")
        return self._by_index[shard]

    def open_parquet(self, entry: ShardEntry) -> pq.ParquetFile:
        f = os.fdopen(fmt.open_shard_fd(self.path, entry), "rb")
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:
            f.close()
            raise UserError(f"{self.path / entry.name}: unreadable Parquet ({exc.__class__.__name__})") from None
        if pf.metadata.num_rows != entry.rows:
            f.close()
            raise UserError(f"{self.path / entry.name}: {pf.metadata.num_rows} rows, manifest says {entry.rows}")
        pf._logitcache_file = f   # closed by close_parquet
        return pf

    def _plan(self, entries: list[dict]) -> None:
        """The shards about to be read, in order (a remote reader fetches ahead)."""

    @staticmethod
    def close_parquet(pf: pq.ParquetFile) -> None:
        pf.close()
        pf._logitcache_file.close()

    def decode(self, batch: pa.RecordBatch | pa.Table, where: str = "") -> dict[str, np.ndarray]:
        """Arrow rows of a shard -> numpy arrays in the stored layout (see `read.decode.decode_rows`)."""
        return decode_rows(batch, self.encoding, self.k, self.seq_len, where or str(self.path),
                           self.manifest.sequences, self.manifest.packed)

    def read_shard(self, index: int | str) -> dict[str, np.ndarray]:
        """All rows of one shard as numpy, stored layout: window_id [R] int64, input_ids [R, T+1]
        int32, target_logprob [R, T] float32, topk_ids [R, T, k] int64, topk_logprobs [R, T, k]
        float32, tail_logmass [R, T] float32."""
        entry = self._entry(index)
        pf = self.open_parquet(entry)
        try:
            return self.decode(pf.read(), self.path / entry.name)
        finally:
            self.close_parquet(pf)

    def iter_arrays(self, batch_size: int, shards: Iterable[int | str] | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
        """Like `iter_batches`, as numpy in the stored layout (input_ids is the whole window)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        entries = self.shards if shards is None else [self._entry(s) for s in shards]
        self._plan(entries)
        pending: list[dict[str, np.ndarray]] = []
        have = 0
        for entry in entries:
            pf = self.open_parquet(entry)
            try:
                for rb in pf.iter_batches(batch_size=min(batch_size, 1024), use_threads=False):
                    part = self.decode(rb, self.path / entry.name)
                    pending.append(part)
                    have += rb.num_rows
                    while have >= batch_size:
                        merged = concat_rows(pending)
                        yield slice_rows(merged, 0, batch_size)
                        rest = slice_rows(merged, batch_size, have)
                        have -= batch_size
                        pending = [rest] if have else []
            finally:
                self.close_parquet(pf)
        if have:
            yield concat_rows(pending)

    def iter_batches(self, batch_size: int, shards: Iterable[int | str] | None = None) -> Iterator[dict]:
        """Stream batches of `batch_size` windows (the last may be smaller) in window order.

        `shards` (indexes or names) restricts and orders the shards read; batches run across shard
        boundaries. Only a few row groups are decoded at a time. Tensors as in the module docstring.
        """
        for a in self.iter_arrays(batch_size, shards):
            yield torch_batch(a)

    def dataset(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                shuffle_buffer: int = 1024, rank: int | None = None, world_size: int | None = None,
                equalize_ranks: bool = True, drop_last: bool = False, epoch: int = 0,
                start_batch: int = 0, shards: Iterable[int | str] | None = None,
                cached_units: int | None = None) -> "CacheDataset":
        """A `torch.utils.data.IterableDataset` of this rank's batches for one epoch; see CacheDataset.

        Compiles the encoding's decode loops here first, if it has any: DataLoader workers forked
        afterwards inherit them instead of each compiling its own (~2 s and ~140 MB per worker)."""
        warm_up = getattr(self.encoding, "warm_up", None)
        if warm_up is not None:
            warm_up()
        entries = self.shards if shards is None else [self._entry(s) for s in shards]
        return CacheDataset(self, entries, batch_size, shuffle=shuffle, seed=seed,
                            shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size,
                            equalize_ranks=equalize_ranks, drop_last=drop_last, epoch=epoch,
                            start_batch=start_batch, cached_units=cached_units)

    def read_unit(self, entry: ShardEntry, start: int, stop: int, pf: pq.ParquetFile | None = None
                  ) -> dict[str, np.ndarray]:
        """Rows [start, stop) of one shard, reading only the row groups that hold them."""
        own = pf is None
        pf = self.open_parquet(entry) if own else pf
        try:
            md = pf.metadata
            groups, first, pos = [], None, 0
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                if pos < stop and pos + n > start:
                    groups.append(g)
                    first = pos if first is None else first
                pos += n
            table = pf.read_row_groups(groups, use_threads=False).slice(start - first, stop - start)
            return self.decode(table, self.path / entry.name)
        finally:
            if own:
                self.close_parquet(pf)


open_cache = CacheReader


class RemoteCacheReader(CacheReader):
    """A `CacheReader` over a URL: the same validation, the same batches, shards fetched ahead.

    On open, the manifest is read and validated as the local reader does, and every listed shard
    must appear in one listing of the folder with exactly its `bytes`. Reading fetches whole
    shards, each checked against its manifest size and sha256 before it is parsed;
    `iter_batches`/`iter_arrays` keep `readahead` shards in flight on background threads while the
    current one is decoded. `dataset()` works too (shards fetched on demand, per DataLoader worker).
    Memory: about `readahead + 1` shards' bytes.
    """

    def __init__(self, url: str, *, storage_options: dict | None = None, readahead: int = 2):
        self.remote = RemoteShards(url, storage_options=storage_options, readahead=readahead)
        self.url, self.path, self.manifest_bytes = self.remote.url, self.remote.path, self.remote.manifest_bytes
        self._load(Manifest.parse(self.manifest_bytes, self.path / fmt.MANIFEST_NAME))

    @property
    def fs(self):
        """The fsspec file system (re-created in a forked worker)."""
        return self.remote.fs

    def remote_path(self, entry: ShardEntry) -> str:
        return self.remote.remote_path(entry)

    def check_bytes(self, entry: ShardEntry, size: int, digest: str) -> None:
        self.remote.check_bytes(entry, size, digest)

    def fetch(self, entry: ShardEntry) -> bytes:
        return self.remote.fetch(entry)

    def _shard_size(self, entry: ShardEntry) -> int:
        return self.remote.size(entry)

    def open_parquet(self, entry: ShardEntry) -> pq.ParquetFile:
        return self.remote.parquet(entry)

    def _plan(self, entries: list[dict]) -> None:
        self.remote.plan(entries)

    def verify(self) -> list[tuple[str, str]]:
        """Re-hash every remote shard: `(shard name, reason)` per problem, empty when intact."""
        return self.remote.verify(self.shards)
