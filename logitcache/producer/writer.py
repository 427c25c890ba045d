"""Write the shards of one cache and keep its manifest, safely under crashes and concurrency.

A `CacheWriter` owns nothing but a folder: every shard is written under a temporary name in that
folder, fsynced and renamed into place, and only then listed in `manifest.json`, which is rewritten
atomically while holding an exclusive `flock` on `.lock`. Several processes (one per GPU, say) may
therefore write disjoint shards of one cache at the same time, and a crash at any point leaves a
folder that the next run resumes: listed shards with the right size are skipped (`completed()`),
anything else is written again, and stale temporary files are removed on open.

Shard bytes depend only on the arrays (zstd level, row groups and Parquet options are fixed, and
Parquet's `created_by` is the pyarrow version string, not a timestamp), so a resumed run writes the
same files as an uninterrupted one with the same pyarrow.

    writer = CacheWriter(cache_dir, header)          # header: the manifest without shards/complete
    done = writer.completed()                       # indexes already written
    for i in range(header["num_shards"]):
        if i not in done:
            writer.write_shard(i, input_ids=..., target_logprob=..., topk_ids=...,
                               topk_logprobs=..., tail_logmass=...)
    manifest = writer.finish()
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache import format as fmt
from logitcache.encodings import get_encoding
from logitcache.errors import UserError
from logitcache.format.atomic import atomic_write, sha256_file
from logitcache.format.lock import manifest_lock
from logitcache.format.manifest import (
    HEADER_FIELDS,
    Manifest,
    ShardEntry,
    payload_of_encoding,
)
from logitcache.format.payloads import Samples, TopK
from logitcache.producer.rows import sequences_table

ROW_GROUP_SIZE = 64
DEFAULT_COMPRESSION_LEVEL = 3
_SHARD_TMP_PREFIX = ".shard-"          # .shard-00003.parquet.tmp-<pid>
_MANIFEST_TMP_PREFIX = f".{fmt.MANIFEST_NAME}.tmp-"   # written by format.write_manifest


class CacheWriter:
    """Writer for one cache folder.

    `header` is the cache's `Manifest` before any shard (`Manifest.header(...)`), or the same as a
    JSON object (docs/FORMAT.md) without `shards` and `complete`. On open the folder is created if
    needed, stale temporary files are removed and the manifest is created if absent. An existing
    manifest with another key (or another `rows_per_shard`) is refused with a UserError; with the
    same key, its header is kept and its shards are resumed.
    """

    def __init__(self, cache_dir: str | os.PathLike, header: Manifest | dict, *,
                 compression_level: int = DEFAULT_COMPRESSION_LEVEL,
                 row_group_size: int = ROW_GROUP_SIZE):
        self.cache_dir = Path(cache_dir)
        self.compression_level = int(compression_level)
        self.row_group_size = min(int(row_group_size), ROW_GROUP_SIZE)
        if self.row_group_size < 1:
            raise ValueError("row_group_size must be >= 1")
        if not isinstance(header, Manifest):
            fields = {f: header[f] for f in HEADER_FIELDS if f in header}
            fields.setdefault("payload", payload_of_encoding(header["encoding"]["name"]))
            header = Manifest.header(**fields)
        self.key = header.key
        self.encoding = get_encoding(header.encoding.name, header.encoding.params)
        if self.encoding.payload != header.payload:
            raise ValueError(f"encoding {self.encoding.name} stores a {self.encoding.payload} payload, "
                             f"not {header.payload}")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with manifest_lock(self.cache_dir):
            self._remove_stale_tmp()
            if (self.cache_dir / fmt.MANIFEST_NAME).exists():
                existing = Manifest.load(self.cache_dir)
                if existing.key != self.key:
                    raise UserError(f"{self.cache_dir}: holds a cache with key {existing.key[:16]}, "
                                    f"not {self.key[:16]}; use another folder")
                if existing.rows_per_shard != header.rows_per_shard:
                    raise UserError(f"{self.cache_dir}: existing cache has rows_per_shard "
                                    f"{existing.rows_per_shard}, not {header.rows_per_shard}")
                if existing.format_minor_version > fmt.FORMAT_MINOR_VERSION:
                    raise UserError(f"{self.cache_dir}: written by a newer logitcache (format "
                                    f"{existing.format_version}.{existing.format_minor_version}); upgrade to resume it")
            else:
                Manifest.from_dict(header.to_dict(), "header").write(self.cache_dir)
        self.manifest = Manifest.load(self.cache_dir)
        self.k = self.manifest.k
        self.seq_len = self.manifest.seq_len
        self.payload = self.manifest.payload
        if self.payload == fmt.PAYLOAD_SAMPLES and self.k != self.encoding.S:
            raise ValueError(f"a samples cache's k must be its S ({self.encoding.S}), not {self.k}")
        self.schema = pa.schema(fmt.base_schema(self.manifest.sequences, self.manifest.packed)
                                + self.encoding.arrow_fields(self.k, self.seq_len))
        self._levels: dict[str, int] | None = None     # per-column zstd levels, see _column_levels

    # -- resume --------------------------------------------------------------------------------

    def completed(self, verify_hashes: bool = False) -> set[int]:
        """Indexes of the shards listed in the manifest whose file exists with the listed size.

        With `verify_hashes`, each such file is also re-hashed and must match its sha256. A file
        that is missing, truncated, a symbolic link or corrupt is not counted: it will be
        written again.
        """
        self.manifest = Manifest.load(self.cache_dir)
        done = set()
        for entry in self.manifest.shards:
            try:
                path = fmt.shard_path(self.cache_dir, entry)
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except (UserError, OSError):
                continue
            try:
                if os.fstat(fd).st_size != entry.bytes:
                    continue
                if verify_hashes and sha256_file(fd) != entry.sha256:
                    continue
            finally:
                os.close(fd)
            done.add(entry.index)
        return done

    # -- writing -------------------------------------------------------------------------------

    def table(self, index: int, *, input_ids: np.ndarray, target_logprob: np.ndarray,
              topk_ids: np.ndarray | None = None, topk_logprobs: np.ndarray | None = None,
              tail_logmass: np.ndarray | None = None, window_ids: np.ndarray | None = None,
              sample_ids: np.ndarray | None = None, sample_counts: np.ndarray | None = None) -> pa.Table:
        """Check the arrays of shard `index` and build its Arrow table (see `write_shard`)."""
        m = self.manifest
        if not (0 <= index < m.num_shards):
            raise ValueError(f"shard index {index} outside 0..{m.num_shards - 1}")
        rows, T, k = m.expected_rows(index), self.seq_len, self.k
        first = index * m.rows_per_shard
        shapes = {"input_ids": (input_ids, (rows, T + 1)), "target_logprob": (target_logprob, (rows, T))}
        sampled = self.payload == fmt.PAYLOAD_SAMPLES
        if sampled:
            payload = {"sample_ids": sample_ids, "sample_counts": sample_counts}
            shapes.update(sample_ids=(sample_ids, (rows, T, k)), sample_counts=(sample_counts, (rows, T, k)))
        else:
            payload = {"topk_ids": topk_ids, "topk_logprobs": topk_logprobs, "tail_logmass": tail_logmass}
            shapes.update(topk_ids=(topk_ids, (rows, T, k)), topk_logprobs=(topk_logprobs, (rows, T, k)),
                          tail_logmass=(tail_logmass, (rows, T)))
        for arr in payload.values():
            if arr is None:
                raise ValueError(f"shard {index}: encoding {self.encoding.name} needs {', '.join(payload)}")
        for name, (arr, shape) in shapes.items():
            if tuple(np.shape(arr)) != shape:
                raise ValueError(f"shard {index}: {name} has shape {tuple(np.shape(arr))}, expected {shape}")
        vocab = m.teacher.token_limit
        id_name = "sample_ids" if sampled else "topk_ids"
        ids = np.asarray(payload[id_name])
        if ids.size and (ids.min() < 0 or (isinstance(vocab, int) and ids.max() >= vocab)):
            raise ValueError(f"shard {index}: {id_name} outside 0..{vocab}")
        for name in ("target_logprob",) + (() if sampled else ("topk_logprobs", "tail_logmass")):
            if np.isnan(shapes[name][0]).any():
                raise ValueError(f"shard {index}: {name} contains NaN")
        if window_ids is None:
            window_ids = np.arange(first, first + rows, dtype=np.int64)
        elif not np.array_equal(np.asarray(window_ids), np.arange(first, first + rows)):
            raise ValueError(f"shard {index}: window_ids must be {first}..{first + rows - 1}")
        inp = np.ascontiguousarray(input_ids, dtype=np.int32).reshape(rows, T + 1)
        tgt = np.ascontiguousarray(target_logprob, dtype=np.float32).reshape(rows, T)
        offs_in = pa.array(np.arange(rows + 1, dtype=np.int32) * (T + 1))
        offs_t = pa.array(np.arange(rows + 1, dtype=np.int32) * T)
        columns = {
            fmt.COL_WINDOW_ID: pa.array(np.asarray(window_ids, dtype=np.int64)),
            fmt.COL_INPUT_IDS: pa.ListArray.from_arrays(offs_in, pa.array(inp.reshape(-1), pa.int32())),
            fmt.COL_TARGET_LOGPROB: pa.ListArray.from_arrays(offs_t, pa.array(tgt.reshape(-1), pa.float32())),
        }
        columns.update(self.encoding.encode(*(np.asarray(a) for a in payload.values())))
        arrays = [columns[f.name].cast(f.type) if columns[f.name].type != f.type else columns[f.name]
                  for f in self.schema]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def payload_arrays(self, payload: TopK | Samples, *, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """`write_shard`'s arrays for one shard's windows and the backend's payload, which must be
        the kind this cache stores."""
        if payload.kind != self.payload:
            raise ValueError(f"{self.cache_dir}: a {self.payload} cache cannot store a {payload.kind} payload")
        return {"input_ids": input_ids, "target_logprob": payload.target_logprob, **payload.columns()}

    def write_shard(self, index: int, *, input_ids: np.ndarray, target_logprob: np.ndarray,
                    topk_ids: np.ndarray | None = None, topk_logprobs: np.ndarray | None = None,
                    tail_logmass: np.ndarray | None = None, window_ids: np.ndarray | None = None,
                    sample_ids: np.ndarray | None = None, sample_counts: np.ndarray | None = None) -> dict:
        """Write shard `index` atomically and list it in the manifest; return its manifest entry.

        Arrays (rows = the shard's window count, T = seq_len): `input_ids` [rows, T+1] int,
        `target_logprob` [rows, T] float32, `topk_ids` [rows, T, k] int, `topk_logprobs`
        [rows, T, k] float32 sorted descending, `tail_logmass` [rows, T] float32. `window_ids`
        defaults to the shard's own range and must equal it if given. A `samples` payload takes
        `sample_ids` / `sample_counts` [rows, T, S] instead of the three top-k arrays.
        Returns the shard's manifest entry as its JSON object.
        """
        if self.manifest.sequences:
            raise ValueError(f"{self.cache_dir}: a sequences cache is written with write_sequences")
        table = self.table(index, input_ids=input_ids, target_logprob=target_logprob,
                           topk_ids=topk_ids, topk_logprobs=topk_logprobs,
                           tail_logmass=tail_logmass, window_ids=window_ids,
                           sample_ids=sample_ids, sample_counts=sample_counts)
        return self._store(index, table, table.num_rows * self.seq_len)

    def write_sequences(self, index: int, *, input_ids: list[np.ndarray], loss_positions: list[np.ndarray],
                        payload: TopK | Samples, doc_lengths: list[np.ndarray] | None = None) -> dict:
        """Write shard `index` of a `sequences` cache atomically and list it; return its entry.

        `input_ids[r]`: row r's own n_r tokens; `loss_positions[r]`: its positions (ascending, in
        0..n_r-2, at least one) whose target token input_ids[r][p + 1] carries a loss; `payload`:
        the backend's arrays at those positions, flat over the rows in order (TopK: ids and
        log-probs [P, k], tail and target log-probs [P]; Samples: ids and counts [P, S], target [P]).
        A packed cache (`data.packing`) also takes `doc_lengths[r]`: the tokens of each document of row r.
        """
        if not self.manifest.sequences:
            raise ValueError(f"{self.cache_dir}: a windows cache is written with write_shard")
        if payload.kind != self.payload:
            raise ValueError(f"{self.cache_dir}: a {self.payload} cache cannot store a {payload.kind} payload")
        m = self.manifest
        if not (0 <= index < m.num_shards):
            raise ValueError(f"shard index {index} outside 0..{m.num_shards - 1}")
        if (doc_lengths is not None) != m.packed:
            raise ValueError(f"{self.cache_dir}: doc_lengths are given exactly for a packed cache")
        table = sequences_table(self.schema, self.encoding, payload, input_ids, loss_positions,
                                first_row=index * m.rows_per_shard, rows=m.expected_rows(index),
                                seq_len=self.seq_len, k=self.k, token_limit=m.teacher.token_limit,
                                doc_lengths=doc_lengths)
        return self._store(index, table, sum(len(p) for p in loss_positions))

    def _store(self, index: int, table: pa.Table, tokens: int) -> dict:
        name = fmt.shard_name(index)
        # the temporary file is created under .lock and flocked until renamed, so a writer opening
        # the folder meanwhile cannot mistake it for a crash leftover
        with atomic_write(self.cache_dir / name, lock=True, creating=manifest_lock(self.cache_dir)) as f:
            self._write_parquet(table, f)
            f.flush()
            size, digest = os.fstat(f.fileno()).st_size, sha256_file(f.fileno())
        entry = ShardEntry(name=name, index=index, first_window=index * self.manifest.rows_per_shard,
                           rows=table.num_rows, tokens=tokens, bytes=size, sha256=digest)
        self._add_entry(entry)
        return entry.to_dict()

    def _write_parquet(self, table: pa.Table, sink) -> None:
        list_columns = [f.name for f in self.schema if pa.types.is_list(f.type)]
        scalar_columns = [f.name for f in self.schema if f.name not in list_columns]
        pq.write_table(table, sink, row_group_size=self.row_group_size, compression="zstd",
                       compression_level=self._column_levels(), use_dictionary=False,
                       write_statistics=scalar_columns, version="2.6")

    def _column_levels(self) -> int | dict[str, int]:
        """zstd level: one for all columns, or per Parquet leaf column when the encoding asks for its
        own (`parquet_level`, docs/encodings.md) on its columns; the base columns keep ours."""
        lvl = getattr(self.encoding, "parquet_level", None)
        if not lvl:
            return self.compression_level
        if self._levels is None:
            enc_cols = {f.name for f in self.encoding.arrow_fields(self.k, self.seq_len)}
            # keys are leaf paths ("input_ids.list.element"): an unlisted leaf would get zstd's default
            buf = pa.BufferOutputStream()
            pq.write_table(self.schema.empty_table(), buf, version="2.6")
            leaves = pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema
            self._levels = {leaves.column(i).path: lvl if leaves.column(i).path.split(".")[0] in enc_cols
                            else self.compression_level for i in range(len(leaves))}
        return self._levels

    def _add_entry(self, entry: ShardEntry) -> None:
        with manifest_lock(self.cache_dir):
            m = Manifest.load(self.cache_dir)
            if m.key != self.key:
                raise UserError(f"{self.cache_dir}: manifest key changed to {m.key[:16]} while "
                                f"writing {self.key[:16]}")
            m = m.with_shard(entry)
            m.write(self.cache_dir)
            self.manifest = m

    def finish(self) -> Manifest:
        """Re-read and return the manifest; `complete` tells whether every planned shard is there."""
        with manifest_lock(self.cache_dir):
            m = Manifest.load(self.cache_dir)
            if m.with_completeness().complete != m.complete:
                m = m.with_completeness()
                m.write(self.cache_dir)
        self.manifest = m
        return m

    # -- crash leftovers -----------------------------------------------------------------------

    def _remove_stale_tmp(self) -> None:
        """Remove temporary files of crashed writers (call with .lock held).

        A live writer holds an exclusive flock on its shard's temporary file from creation (made
        under .lock) to rename, so a file whose lock can be taken has no writer. Manifest
        temporaries are only written under .lock, so any that exist now are stale.
        """
        for name in os.listdir(self.cache_dir):
            path = self.cache_dir / name
            if name.startswith(_MANIFEST_TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            elif name.startswith(_SHARD_TMP_PREFIX) and ".parquet.tmp-" in name:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                except OSError as exc:
                    if exc.errno == errno.ELOOP:   # a symlink named like a temporary: just drop it
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                except BlockingIOError:
                    pass                           # a live writer is still on it
                finally:
                    os.close(fd)
