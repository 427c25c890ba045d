"""The DDP- and worker-aware dataset of a cache: shuffled units of rows, resumable at any batch."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterator, Protocol

import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset

from logitcache.errors import UserError
from logitcache.read.batches import UNIT_ROWS, torch_batch


class ShardReader(Protocol):
    """What the dataset needs of a reader (`CacheReader` provides it)."""

    key: str

    def open_parquet(self, entry: dict) -> pq.ParquetFile: ...

    def close_parquet(self, pf: pq.ParquetFile) -> None: ...

    def read_unit(self, entry: dict, start: int, stop: int, pf: pq.ParquetFile | None = None
                  ) -> dict[str, np.ndarray]: ...


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


class CacheDataset(IterableDataset):
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

    def __init__(self, reader: ShardReader, entries: list[dict], batch_size: int, *, shuffle: bool,
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
        self.units = np.array([(p, s, min(s + UNIT_ROWS, e.rows))
                               for p, e in enumerate(self.entries)
                               for s in range(0, e.rows, UNIT_ROWS)], dtype=np.int64).reshape(-1, 3)
        self.set_epoch(epoch, start_batch)
        self._random_access: tuple | None = None   # see batch()

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
                yield torch_batch(self._gather(unit_col[sl], row_col[sl], cache, files))
        finally:
            for pf in files.values():
                self.reader.close_parquet(pf)

    def batch(self, j: int) -> dict:
        """Batch `j` of the current epoch, the same tensors iteration yields as its j-th, by index (for a
        map-style dataset over this order). The decoded units and open files of recent calls are kept
        for the next ones, per process and epoch: a forked DataLoader worker starts its own."""
        state = self._random_access
        if state is None or state[0] != (os.getpid(), self.epoch):
            state = self._random_access = ((os.getpid(), self.epoch), self.order(), self.batches_in_epoch(),
                                           OrderedDict(), OrderedDict())
        _, (unit_col, row_col), nb, cache, files = state
        if not 0 <= j < nb:
            raise IndexError(f"batch {j} of an epoch of {nb} batches")
        sl = slice(j * self.batch_size, (j + 1) * self.batch_size)
        return torch_batch(self._gather(unit_col[sl], row_col[sl], cache, files))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_random_access": None}    # open files stay in their process

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
            files[p] = self.reader.open_parquet(self.entries[p])
            while len(files) > 4:
                self.reader.close_parquet(files.popitem(last=False)[1])
        else:
            files.move_to_end(p)
        data = self.reader.read_unit(self.entries[p], start, stop, files[p])
        cache[u] = data
        while len(cache) > self.cached_units:
            cache.popitem(last=False)
        return data
