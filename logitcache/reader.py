"""Read a cache: validated open, integrity check, streaming batches and a DDP/worker-aware dataset.

Nothing in a cache is trusted: the manifest is validated field by field (`format.load_manifest`),
every shard is opened through `format.shard_path` (names must be `shard-NNNNN.parquet`, no symbolic
links, nothing outside the folder) and with `O_NOFOLLOW`, and every listed shard must exist with its
listed size before any is read.

Batches (from `iter_batches` and `dataset`) are dicts of CPU tensors; B windows, T = seq_len:

- `window_id`      int64   [B]
- `input_ids`      int64   [B, T]     the window's tokens `[:, :-1]` (what the student reads)
- `labels`         int64   [B, T]     the window's tokens `[:, 1:]`  (the next token at each position)
- `target_logprob` float32 [B, T]     teacher log p(labels)
- `topk_ids`       int64   [B, T, k]  teacher top-k token ids, by descending log-prob
- `topk_logprobs`  float32 [B, T, k]  their log-probs (normalised over the whole vocabulary)
- `tail_logmass`   float32 [B, T]     log of the probability mass outside the top-k

A `sampled` cache (`reader.sampled`; its k is S) gives, instead of the three top-k entries:

- `sample_ids`     int64   [B, T, S]  distinct ids among S draws from the teacher's full softmax
- `sample_counts`  int32   [B, T, S]  how often each was drawn (sum S per position; 0 = padding)

`read_shard(index)` returns the stored layout as numpy instead (`input_ids` is the whole window,
[rows, T + 1], int32).

Reading with `datasets` (shards are plain Parquet; the flat top-k lists reshape to [T, k])::

    import datasets, glob
    ds = datasets.load_dataset("parquet", data_files=sorted(glob.glob("CACHE/shard-*.parquet")),
                               split="train")
    row = ds[0]   # window_id, input_ids (T + 1), target_logprob (T), topk_ids (T * k), ...
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache import format as fmt
from logitcache.encodings import get_encoding
from logitcache.encodings.plain import list_values
from logitcache.errors import UserError
from logitcache.writer import expected_rows, is_sampled, sha256_file

UNIT_ROWS = 64   # rows per reading unit of `dataset` (the writer's row group size)


# -- opening -----------------------------------------------------------------------------------


def _entry_problem(m: dict, e: dict) -> str | None:
    """What is wrong with a (format-valid) shard entry against the manifest's plan, if anything."""
    if e["index"] >= m["num_shards"]:
        return f"index {e['index']} beyond num_shards {m['num_shards']}"
    if e["first_window"] != e["index"] * m["rows_per_shard"]:
        return f"first_window {e['first_window']} != index * rows_per_shard"
    if e["rows"] != expected_rows(m, e["index"]):
        return f"rows {e['rows']} != {expected_rows(m, e['index'])} planned"
    return None


def _open_shard_fd(cache_dir: Path, entry: dict) -> int:
    """Open a shard read-only, never through a symbolic link; UserError if refused or missing."""
    path = fmt.shard_path(cache_dir, entry)
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise UserError(f"{path}: shard listed in the manifest is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path}: shard is a symbolic link; refusing to follow it") from None
        raise UserError(f"{path}: cannot open shard ({exc.strerror})") from None


def _tensor(x: np.ndarray, dtype) -> "torch.Tensor":
    import torch
    x = np.ascontiguousarray(x, dtype=dtype)
    if not x.flags.writeable:          # zero-copy views of Arrow buffers are read-only
        x = x.copy()
    return torch.from_numpy(x)


def _torch_batch(a: dict[str, np.ndarray]) -> dict:
    win = a["input_ids"]
    out = {"window_id": _tensor(a["window_id"], np.int64),
           "input_ids": _tensor(win[:, :-1], np.int64),
           "labels": _tensor(win[:, 1:], np.int64),
           "target_logprob": _tensor(a["target_logprob"], np.float32)}
    if "sample_ids" in a:
        out.update(sample_ids=_tensor(a["sample_ids"], np.int64), sample_counts=_tensor(a["sample_counts"], np.int32))
    else:
        out.update(topk_ids=_tensor(a["topk_ids"], np.int64), topk_logprobs=_tensor(a["topk_logprobs"], np.float32),
                   tail_logmass=_tensor(a["tail_logmass"], np.float32))
    return out


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _slice(a: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {key: v[start:stop] for key, v in a.items()}


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
        self._load(fmt.load_manifest(self.path))

    @classmethod
    def open(cls, path: "str | os.PathLike", **options) -> "CacheReader":
        """A local folder, or a URL (`s3://`, `hf://`, `file://`, ...) streamed through fsspec with
        read-ahead (`logitcache.remote.RemoteCacheReader`; `options` go to it)."""
        from logitcache.remote import RemoteCacheReader, is_url
        return RemoteCacheReader(str(path), **options) if is_url(path) else cls(path)

    def _load(self, m: dict) -> None:
        """Check a validated manifest against the plan and every listed shard's size (local or remote)."""
        self.manifest = m
        for field in ("teacher", "tokenizer", "producer"):
            if not isinstance(m[field], dict):
                raise UserError(f"{self.path / fmt.MANIFEST_NAME}: invalid manifest: {field} must be an object")
        params = m["encoding"].get("params", {})
        if not isinstance(params, dict):
            raise UserError(f"{self.path / fmt.MANIFEST_NAME}: invalid manifest: encoding.params must be an object")
        try:
            self.encoding = get_encoding(m["encoding"]["name"], params)
        except TypeError:
            raise UserError(f"{self.path / fmt.MANIFEST_NAME}: invalid parameters for encoding "
                            f"'{m['encoding']['name']}': {sorted(params)}") from None
        self.k: int = m["k"]
        self.seq_len: int = m["data"]["seq_len"]
        self.sampled = is_sampled(self.encoding)
        if self.sampled and self.k != self.encoding.S:
            raise UserError(f"{self.path / fmt.MANIFEST_NAME}: invalid manifest: a sampled cache's k ({self.k}) "
                            f"must be its S ({self.encoding.S})")
        self.shards: list[dict] = sorted(m["shards"], key=lambda e: e["index"])
        self._by_index = {e["index"]: e for e in self.shards}
        for e in self.shards:
            problem = _entry_problem(m, e)
            if problem:
                raise UserError(f"{self.path / fmt.MANIFEST_NAME}: invalid manifest: {e['name']}: {problem}")
            size = self._shard_size(e)
            if size != e["bytes"]:
                raise UserError(f"{self.path / e['name']}: {size} bytes, manifest says {e['bytes']} "
                                f"(truncated or replaced); run `logitcache verify {self.path}`")
        self.schema = pa.schema(fmt.base_schema() + self.encoding.arrow_fields(self.k, self.seq_len))

    def _shard_size(self, entry: dict) -> int:
        fd = _open_shard_fd(self.path, entry)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    # -- description ---------------------------------------------------------------------------

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def teacher(self) -> dict:
        return self.manifest["teacher"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def rows_per_shard(self) -> int:
        return self.manifest["rows_per_shard"]

    @property
    def num_windows(self) -> int:
        """Windows in the listed shards (all of the data's windows once the cache is complete)."""
        return sum(e["rows"] for e in self.shards)

    @property
    def num_tokens(self) -> int:
        return self.num_windows * self.seq_len

    @property
    def num_bytes(self) -> int:
        return sum(e["bytes"] for e in self.shards)

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

    def _parquet(self, entry: dict) -> pq.ParquetFile:
        f = os.fdopen(_open_shard_fd(self.path, entry), "rb")
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:
            f.close()
            raise UserError(f"{self.path / entry['name']}: unreadable Parquet ({exc.__class__.__name__})") from None
        if pf.metadata.num_rows != entry["rows"]:
            f.close()
            raise UserError(f"{self.path / entry['name']}: {pf.metadata.num_rows} rows, manifest says {entry['rows']}")
        pf._logitcache_file = f   # closed by _close
        return pf

    @staticmethod
    def _close(pf: pq.ParquetFile) -> None:
        pf.close()
        pf._logitcache_file.close()

    def decode(self, batch: pa.RecordBatch | pa.Table, where: str = "") -> dict[str, np.ndarray]:
        """Arrow rows of a shard -> numpy arrays in the stored layout (vectorised, no row loops)."""
        T, k = self.seq_len, self.k
        rows = batch.num_rows
        columns = {name: batch.column(name) for name in batch.schema.names}
        try:
            for name, width in ((fmt.COL_INPUT_IDS, T + 1), (fmt.COL_TARGET_LOGPROB, T)):
                col = columns[name]
                col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
                offsets = col.offsets.to_numpy()
                if col.null_count or not np.array_equal(offsets - offsets[0],
                                                        np.arange(rows + 1, dtype=offsets.dtype) * width):
                    raise ValueError(f"{name} rows are not all {width} long")
            out = {"window_id": columns[fmt.COL_WINDOW_ID].to_numpy().astype(np.int64, copy=False),
                   "input_ids": list_values(columns[fmt.COL_INPUT_IDS], np.int32).reshape(rows, T + 1),
                   "target_logprob": list_values(columns[fmt.COL_TARGET_LOGPROB], np.float32).reshape(rows, T)}
            if self.sampled:
                ids, counts = self.encoding.decode(columns, k, T)
                if ids.shape != (rows, T, k) or counts.shape != (rows, T, k):
                    raise ValueError("sample columns have the wrong length")
                out.update(sample_ids=ids, sample_counts=counts)
                return out
            ids, values, tail = self.encoding.decode(columns, k, T)
            if ids.shape != (rows, T, k) or values.shape != (rows, T, k) or tail.shape != (rows, T):
                raise ValueError("top-k columns have the wrong length")
        except (KeyError, ValueError, pa.ArrowException) as exc:
            raise UserError(f"{where or self.path}: malformed shard data ({exc})") from None
        out.update(topk_ids=ids, topk_logprobs=values, tail_logmass=tail)
        return out

    def read_shard(self, index: int | str) -> dict[str, np.ndarray]:
        """All rows of one shard as numpy, stored layout: window_id [R] int64, input_ids [R, T+1]
        int32, target_logprob [R, T] float32, topk_ids [R, T, k] int64, topk_logprobs [R, T, k]
        float32, tail_logmass [R, T] float32."""
        entry = self._entry(index)
        pf = self._parquet(entry)
        try:
            return self.decode(pf.read(), self.path / entry["name"])
        finally:
            self._close(pf)

    def iter_arrays(self, batch_size: int, shards: Iterable[int | str] | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
        """Like `iter_batches`, as numpy in the stored layout (input_ids is the whole window)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        entries = self.shards if shards is None else [self._entry(s) for s in shards]
        pending: list[dict[str, np.ndarray]] = []
        have = 0
        for entry in entries:
            pf = self._parquet(entry)
            try:
                for rb in pf.iter_batches(batch_size=min(batch_size, 1024), use_threads=False):
                    part = self.decode(rb, self.path / entry["name"])
                    pending.append(part)
                    have += rb.num_rows
                    while have >= batch_size:
                        merged = _concat(pending)
                        yield _slice(merged, 0, batch_size)
                        rest = _slice(merged, batch_size, have)
                        have -= batch_size
                        pending = [rest] if have else []
            finally:
                self._close(pf)
        if have:
            yield _concat(pending)

    def iter_batches(self, batch_size: int, shards: Iterable[int | str] | None = None) -> Iterator[dict]:
        """Stream batches of `batch_size` windows (the last may be smaller) in window order.

        `shards` (indexes or names) restricts and orders the shards read; batches run across shard
        boundaries. Only a few row groups are decoded at a time. Tensors as in the module docstring.
        """
        for a in self.iter_arrays(batch_size, shards):
            yield _torch_batch(a)

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

    def read_unit(self, entry: dict, start: int, stop: int, pf: pq.ParquetFile | None = None
                  ) -> dict[str, np.ndarray]:
        """Rows [start, stop) of one shard, reading only the row groups that hold them."""
        own = pf is None
        pf = self._parquet(entry) if own else pf
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
            return self.decode(table, self.path / entry["name"])
        finally:
            if own:
                self._close(pf)


open_cache = CacheReader


# -- the dataset -------------------------------------------------------------------------------


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither")
        return int(rank), int(world_size)
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:   # pragma: no cover
        pass
    return 0, 1


try:
    from torch.utils.data import IterableDataset as _IterableDataset
except ImportError:   # pragma: no cover
    _IterableDataset = object


class CacheDataset(_IterableDataset):
    """This rank's batches of a cache for one epoch, split across DataLoader workers.

    Use it with `DataLoader(ds, batch_size=None, num_workers=W)`: the dataset yields whole batches
    (dicts of tensors, see the module docstring), so the DataLoader must not batch again.

    The order is a function of (seed, epoch, rank, world_size, batch_size) only, never of the
    number of workers:

    1. The listed shards are cut into units of 64 rows (the writer's row groups).
    2. With `shuffle`, the units are permuted with `default_rng([seed, epoch])` (the same on every
       rank), and unit `j` of that order goes to rank `j % world_size`; so each epoch visits the
       shards in a new order and the ranks get disjoint units that together cover every window.
    3. With `shuffle`, the rank's windows are permuted within consecutive blocks of
       `shuffle_buffer // 64` units (a seeded shuffle buffer of `shuffle_buffer` windows, seeded
       by seed, epoch, rank and block).
    4. With `equalize_ranks` (and world_size > 1), every rank keeps only as many windows as the
       smallest rank has, so all ranks take the same number of steps (DDP needs that).
    5. The windows are cut into batches of `batch_size` (the last one smaller, or dropped with
       `drop_last`). Batch `j` is made by worker `j % num_workers`; PyTorch's DataLoader takes
       batches from its workers in turn, so the loader yields batches 0, 1, 2, ... in order.

    Exact resume: the position is (epoch, batches already taken this epoch). Save them in the
    training checkpoint and, on restart, call `set_epoch(epoch, start_batch=batches_taken)` (or
    pass `epoch=`/`start_batch=` to `CacheReader.dataset`) before creating the DataLoader
    iterator: the loader then yields exactly the batches that were still to come, reading only the
    units they need. `state_dict(batches_taken)` / `load_state_dict(state)` wrap the same two numbers
    plus the settings that must not change (seed, batch size, world size, shuffle); the number of
    workers may change between runs.

    `set_epoch` must be called before each epoch's iterator is created; with
    `persistent_workers=True` the workers keep their copy of the dataset, so leave it off.
    Each worker decodes the units its batches touch (with shuffle, those of the current block),
    so decoding work grows with the number of workers while memory stays about `cached_units`
    units per worker (default: two shuffle blocks plus one batch).
    """

    def __init__(self, reader: CacheReader, entries: list[dict], batch_size: int, *, shuffle: bool,
                 seed: int, shuffle_buffer: int, rank: int | None, world_size: int | None,
                 equalize_ranks: bool, drop_last: bool, epoch: int, start_batch: int,
                 cached_units: int | None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.reader = reader
        self.entries = list(entries)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.block_units = max(1, int(shuffle_buffer) // UNIT_ROWS)
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world_size {self.world_size}")
        self.equalize_ranks = bool(equalize_ranks)
        self.drop_last = bool(drop_last)
        self.cached_units = cached_units or (2 * self.block_units + -(-self.batch_size // UNIT_ROWS) + 1)
        # units: (position in entries, first row, stop row)
        self.units = np.array([(p, s, min(s + UNIT_ROWS, e["rows"]))
                               for p, e in enumerate(self.entries)
                               for s in range(0, e["rows"], UNIT_ROWS)], dtype=np.int64).reshape(-1, 3)
        self.set_epoch(epoch, start_batch)

    # -- position ------------------------------------------------------------------------------

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (new shuffle) and the first batch to yield in it (0 = from the start)."""
        if start_batch < 0:
            raise ValueError("start_batch must be >= 0")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def state_dict(self, batches_taken: int) -> dict:
        """The position after `batches_taken` batches of the current epoch, for a checkpoint."""
        return {"epoch": self.epoch, "batches_taken": int(batches_taken) + self.start_batch,
                "seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "shuffle": self.shuffle, "key": self.reader.key}

    def load_state_dict(self, state: dict) -> None:
        for f in ("seed", "batch_size", "world_size", "shuffle"):
            if state[f] != getattr(self, f):
                raise UserError(f"cannot resume: {f} was {state[f]}, now {getattr(self, f)}")
        if state.get("key", self.reader.key) != self.reader.key:
            raise UserError(f"cannot resume: checkpoint is for cache {state['key'][:16]}, "
                            f"not {self.reader.key[:16]}")
        self.set_epoch(state["epoch"], state["batches_taken"])

    # -- order ---------------------------------------------------------------------------------

    def _rank_units(self, epoch: int) -> list[np.ndarray]:
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        return [order[r::self.world_size] for r in range(self.world_size)]

    def _num_windows(self, epoch: int) -> int:
        sizes = self.units[:, 2] - self.units[:, 1]
        per_rank = [int(sizes[u].sum()) for u in self._rank_units(epoch)]
        if self.equalize_ranks and self.world_size > 1:
            return min(per_rank)
        return per_rank[self.rank]

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        n = self._num_windows(self.epoch if epoch is None else epoch)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        """Batches left in this epoch from `start_batch` on (what the loader will yield)."""
        return max(0, self.batches_in_epoch() - self.start_batch)

    def order(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(unit index, row within unit) of every window of this rank's epoch, in order."""
        epoch = self.epoch if epoch is None else epoch
        units = self._rank_units(epoch)[self.rank]
        sizes = self.units[units, 2] - self.units[units, 1]
        unit_col = np.repeat(units, sizes)
        row_col = np.arange(len(unit_col)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        if self.shuffle:
            bounds = np.cumsum(sizes)[self.block_units - 1::self.block_units]
            starts = np.concatenate([[0], bounds])
            for b, (lo, hi) in enumerate(zip(starts, np.append(bounds, len(unit_col)))):
                if hi > lo:
                    perm = lo + np.random.default_rng([self.seed, epoch, self.rank, b, 1]).permutation(hi - lo)
                    unit_col[lo:hi], row_col[lo:hi] = unit_col[perm], row_col[perm]
        n = self._num_windows(epoch)
        return unit_col[:n], row_col[:n]

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        from torch.utils.data import get_worker_info
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        unit_col, row_col = self.order()
        nb = self.batches_in_epoch()
        cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        try:
            for j in range(self.start_batch + worker, nb, workers):
                sl = slice(j * self.batch_size, (j + 1) * self.batch_size)
                yield _torch_batch(self._gather(unit_col[sl], row_col[sl], cache, files))
        finally:
            for pf in files.values():
                CacheReader._close(pf)

    def _gather(self, units: np.ndarray, rows: np.ndarray, cache: OrderedDict, files: OrderedDict
                ) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] | None = None
        for u in dict.fromkeys(units.tolist()):
            data = self._unit(u, cache, files)
            mask = units == u
            if out is None:
                out = {key: np.empty((len(units),) + v.shape[1:], v.dtype) for key, v in data.items()}
            for key, v in data.items():
                out[key][mask] = v[rows[mask]]
        return out

    def _unit(self, u: int, cache: OrderedDict, files: OrderedDict) -> dict[str, np.ndarray]:
        if u in cache:
            cache.move_to_end(u)
            return cache[u]
        p, start, stop = (int(x) for x in self.units[u])
        if p not in files:
            files[p] = self.reader._parquet(self.entries[p])
            while len(files) > 4:
                CacheReader._close(files.popitem(last=False)[1])
        else:
            files.move_to_end(p)
        data = self.reader.read_unit(self.entries[p], start, stop, files[p])
        cache[u] = data
        while len(cache) > self.cached_units:
            cache.popitem(last=False)
        return data


# -- verify ------------------------------------------------------------------------------------


def verify_cache(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Check a cache completely; return `(shard name or "manifest.json", reason)` per problem.

    The manifest must parse and validate; every listed shard must be a regular file (not a
    symbolic link) in the folder with the listed size and sha256 (recomputed, streaming), parse as
    Parquet with the listed row count and the encoding's columns, and hold the window ids its
    entry says. A `complete` manifest must list every planned shard. An empty list means intact.
    Only a folder that does not exist raises (UserError).
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such cache folder")
    try:
        m = fmt.load_manifest(path)
        reader_schema = None
        params = m["encoding"].get("params", {})
        enc = get_encoding(m["encoding"]["name"], params if isinstance(params, dict) else {})
        reader_schema = pa.schema(fmt.base_schema() + enc.arrow_fields(m["k"], m["data"]["seq_len"]))
    except (UserError, TypeError) as exc:
        return [(fmt.MANIFEST_NAME, str(exc))]
    problems: list[tuple[str, str]] = []
    sealed = fmt.manifest_checksum_problem(path)      # any changed byte of the manifest itself
    if sealed:
        problems.append((fmt.MANIFEST_NAME, sealed))
    listed = sorted(e["index"] for e in m["shards"])
    if m["complete"] and listed != list(range(m["num_shards"])):
        problems.append((fmt.MANIFEST_NAME, f"marked complete but lists {len(listed)} of "
                                            f"{m['num_shards']} planned shards"))
    for e in sorted(m["shards"], key=lambda e: e["index"]):
        name = e["name"]
        problem = _entry_problem(m, e)
        if problem:
            problems.append((fmt.MANIFEST_NAME, f"{name}: {problem}"))
            continue
        try:
            fd = _open_shard_fd(path, e)
        except UserError as exc:
            reason = str(exc)
            problems.append((name, "missing" if "missing" in reason else reason.split(": ", 1)[-1]))
            continue
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            if size != e["bytes"]:
                what = "truncated" if size < e["bytes"] else "size mismatch"
                problems.append((name, f"{what}: {size} bytes, manifest says {e['bytes']}"))
                continue
            digest = sha256_file(fd)
            if digest != e["sha256"]:
                problems.append((name, f"sha256 mismatch: {digest[:16]}..., manifest says {e['sha256'][:16]}..."))
                continue
            try:
                f.seek(0)
                pf = pq.ParquetFile(f)
                if pf.metadata.num_rows != e["rows"]:
                    problems.append((name, f"{pf.metadata.num_rows} rows, manifest says {e['rows']}"))
                    continue
                schema = pf.schema_arrow
                missing = [fld.name for fld in reader_schema if schema.get_field_index(fld.name) < 0
                           or schema.field(fld.name).type != fld.type]
                if missing:
                    problems.append((name, f"missing or mistyped columns: {', '.join(missing)}"))
                    continue
                ids = pf.read(columns=[fmt.COL_WINDOW_ID]).column(0).to_numpy()
                if not np.array_equal(ids, np.arange(e["first_window"], e["first_window"] + e["rows"])):
                    problems.append((name, "window ids differ from the manifest's range"))
            except (pa.ArrowException, OSError, ValueError) as exc:
                problems.append((name, f"unreadable Parquet ({exc.__class__.__name__})"))
    return problems


# -- inspect -----------------------------------------------------------------------------------


def sample_units(reader: CacheReader, max_windows: int) -> list[tuple[dict, int, int]]:
    """(entry, start, stop) row ranges of at most `max_windows` windows, evenly spread over the
    listed shards (all of them when the cache is small enough)."""
    units = [(e, s, min(s + UNIT_ROWS, e["rows"])) for e in reader.shards
             for s in range(0, e["rows"], UNIT_ROWS)]
    total = sum(b - a for _, a, b in units)
    if total <= max_windows:
        return units
    want = max(1, max_windows // UNIT_ROWS)
    picks = np.unique(np.linspace(0, len(units) - 1, want).round().astype(int))
    chosen, n = [], 0
    for i in picks:
        e, a, b = units[i]
        b = min(b, a + max_windows - n)
        if b > a:
            chosen.append((e, a, b))
            n += b - a
    return chosen


def topk_stats(topk_logprobs: np.ndarray, tail_logmass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: top-k mass sum_i exp(l_i) and the entropy of the (k+1)-way distribution.

    The (k+1)-way distribution puts each top-k token's probability on its own outcome and the
    tail mass T on one more. It is a coarsening of the teacher's full distribution (the tail
    tokens merged into one outcome), and merging outcomes never increases entropy: by the chain
    rule, H(full) = H(coarse) + T * H(tail tokens | tail) >= H(coarse). So this entropy is a lower
    bound of the teacher's entropy, tight when the tail is small or concentrated on one token.
    """
    floor = np.finfo(np.float64).min                 # -inf -> a finite floor: p = 0, p * log p = 0
    lp = np.maximum(topk_logprobs.astype(np.float64), floor)
    p = np.exp(lp)
    mass = p.sum(-1)
    p_term = np.einsum("...k,...k->...", p, lp)
    tail = np.maximum(tail_logmass.astype(np.float64), floor)
    t_term = np.exp(tail) * tail
    return mass, -(p_term + t_term)


def inspect_cache(path: str | os.PathLike, sample_windows: int = 1024) -> dict:
    """Summary of a cache: identity, size and what the teacher's distributions look like.

    Sizes (windows, tokens, shards, bytes, bytes_per_token) cover every listed shard; the
    distribution statistics are means over all positions of at most `sample_windows` windows
    spread evenly over the shards (`sampled_windows` says how many): `mean_topk_mass` (mean of
    sum exp(top-k log-probs)), `mean_entropy_lower_bound` (nats; see `topk_stats` for why it is
    a lower bound), `mean_tail_mass` and `teacher_nll` (mean -log p(next token), the teacher's
    cross-entropy on the data).
    """
    reader = CacheReader(path)
    m = reader.manifest
    n_pos = 0
    sums = {"mass": 0.0, "entropy": 0.0, "tail": 0.0, "nll": 0.0}
    sampled = 0
    for entry, a, b in sample_units(reader, max(0, int(sample_windows))) if sample_windows > 0 else []:
        d = reader.read_unit(entry, a, b)
        if not reader.sampled:      # draws carry no top-k mass or entropy bound
            mass, ent = topk_stats(d["topk_logprobs"], d["tail_logmass"])
            sums["mass"] += float(mass.sum())
            sums["entropy"] += float(ent.sum())
            sums["tail"] += float(np.exp(d["tail_logmass"].astype(np.float64)).sum())
        sums["nll"] += float(-d["target_logprob"].astype(np.float64).sum())
        n_pos += d["target_logprob"].size
        sampled += b - a

    def mean(x: float) -> float | None:
        return x / n_pos if n_pos else None

    tokens = reader.num_tokens
    return {
        "path": str(reader.path),
        "key": m["key"],
        "teacher": m["teacher"].get("name_or_path"),
        "teacher_dtype": m["teacher"].get("dtype"),
        "vocab_size": m["teacher"].get("vocab_size"),
        "k": reader.k,
        "encoding": m["encoding"]["name"],
        "encoding_params": m["encoding"].get("params", {}),
        "seq_len": reader.seq_len,
        "data_source": m["data"].get("source"),
        "windows": reader.num_windows,
        "planned_windows": m["data"]["num_windows"],
        "tokens": tokens,
        "shards": len(reader.shards),
        "planned_shards": m["num_shards"],
        "bytes": reader.num_bytes,
        "bytes_per_token": reader.num_bytes / tokens if tokens else None,
        "complete": reader.complete,
        "sampled_windows": sampled,
        "mean_topk_mass": None if reader.sampled else mean(sums["mass"]),
        "mean_tail_mass": None if reader.sampled else mean(sums["tail"]),
        "mean_entropy_lower_bound": None if reader.sampled else mean(sums["entropy"]),
        "teacher_nll": mean(sums["nll"]),
        "backend": m["producer"].get("backend"),
    }
