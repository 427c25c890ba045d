"""A cache as a `transformers.Trainer` dataset: rows in `trainer distill`'s order, and their collator.

    from logitcache.integrations.transformers import DistillCollator, DistillDataset
    dataset = DistillDataset("caches/<cache>", batch_size=8, seed=0)    # = per_device_train_batch_size
    # Trainer(..., train_dataset=dataset, data_collator=DistillCollator()); trainer.integrations.transformers
    # has the Trainer (DistillTrainer) and the loss (distill_compute_loss).

Order: item j of the dataset is a row (a window, or a conversation of a `sequences` cache) of one
stream: rank 0's micro-batch 0, rank 1's micro-batch 0, ..., rank 0's micro-batch 1, ..., each
`batch_size` rows, where rank r's micro-batch i is exactly the one `trainer distill` (trainer.data.
CacheBatches) trains on at that point: the reader's `CacheDataset` order (64-row units permuted by
seed and epoch, shuffle buffer, ranks equalised, no partial batch), epoch after epoch. Read with a
sequential sampler, `batch_size` rows per device, the Trainer's data-parallel sharding (accelerate
gives rank r the batches r, r + world, ...) hands every rank its own micro-batches in order, so
batch i is a pure function of (seed, i) and a run matches `trainer distill` batch for batch.

`len(dataset)` covers `epochs` of the cache's epochs; the Trainer's epoch e (`set_epoch`, which it
calls) continues the stream at row e * len(dataset).

Batches (`DistillCollator`, rows right-padded to the longest, as the reader pads a `sequences`
batch): `input_ids`, `attention_mask` int64 [B, T]; `labels` int64 [B, T], the next token, -100
where no loss is taken; `loss_mask` bool [B, T] (all True for a window cache); `shift_labels` (the
same tensor, the name under which transformers counts loss tokens); `window_id` [B]; the payload:
`target_logprob`, `topk_ids`, `topk_logprobs`, `tail_logmass` (top-k) or `sample_ids`,
`sample_counts` (samples) as the reader gives them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from logitcache.errors import UserError
from logitcache.read.dataset import CacheDataset
from logitcache.read.reader import CacheReader

IGNORE_INDEX = -100      # transformers' "no loss here" label
PAD = {"labels": IGNORE_INDEX, "loss_mask": False, "attention_mask": 0}     # other fields pad with 0
PAYLOAD_FIELDS = ("target_logprob", "topk_ids", "topk_logprobs", "tail_logmass", "sample_ids", "sample_counts")
BATCH_FIELDS = ("input_ids", "attention_mask", "labels", "loss_mask", "shift_labels", "window_id", *PAYLOAD_FIELDS)


def _world_size() -> int:
    """torch.distributed's world size once started, else the launcher's WORLD_SIZE (torchrun, accelerate)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


class DistillDataset(Dataset):
    """The rows of a cache in `trainer distill`'s batch order (module docstring), map-style.

    `batch_size` is the rows per micro-batch and device (TrainingArguments.per_device_train_batch_size);
    `world_size` the number of data-parallel processes (default: the launcher's); `seed` and
    `shuffle_buffer` as `trainer distill --seed` and its reader. `cache` is a cache folder or an
    open `CacheReader`.
    """

    def __init__(self, cache: str | os.PathLike | CacheReader, batch_size: int, *, seed: int = 0,
                 world_size: int | None = None, shuffle_buffer: int = 1024, epochs: int = 1):
        self.reader = cache if isinstance(cache, CacheReader) else CacheReader(Path(cache))
        self.batch_size, self.seed, self.shuffle_buffer = int(batch_size), int(seed), int(shuffle_buffer)
        self.world_size = _world_size() if world_size is None else int(world_size)
        if self.batch_size < 1 or self.world_size < 1 or epochs < 1:
            raise UserError(f"DistillDataset: batch_size {batch_size}, world_size {world_size} and epochs {epochs} "
                            "must be >= 1")
        self._ranks: dict[int, CacheDataset] = {}
        self._counts: dict[int, int] = {}       # micro-batches per rank in each epoch of the cache
        self._last: tuple[tuple[int, int, int], dict] | None = None
        self.offset = 0
        if self.batches_in_epoch(0) == 0:
            raise UserError(f"{self.reader.path}: {self.reader.num_windows} cached rows are too few for batches of "
                            f"{self.batch_size} on {self.world_size} rank(s)")
        self.length = sum(self.batches_in_epoch(e) for e in range(epochs)) * self.batch_size * self.world_size

    @property
    def vocab_size(self) -> int:
        """The tokenizer's length the cache was made with: the logit columns the loss uses."""
        return int(self.reader.manifest.tokenizer.vocab_size)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """The Trainer's epoch `epoch` reads the stream from row epoch * len(self) on."""
        self.offset = int(epoch) * self.length

    def rank_dataset(self, rank: int, epoch: int) -> CacheDataset:
        """Rank `rank`'s `CacheDataset` of the cache's epoch `epoch`: the reader's settings of trainer.data."""
        ds = self._ranks.get(rank)
        if ds is None:
            ds = self._ranks[rank] = self.reader.dataset(
                self.batch_size, shuffle=True, seed=self.seed, shuffle_buffer=self.shuffle_buffer, rank=rank,
                world_size=self.world_size, equalize_ranks=True, drop_last=True, epoch=epoch)
        if ds.epoch != epoch:
            ds.set_epoch(epoch)
        return ds

    def batches_in_epoch(self, epoch: int) -> int:
        if epoch not in self._counts:     # the same on every rank (equalised)
            self._counts[epoch] = self.rank_dataset(0, epoch).batches_in_epoch(epoch)
        return self._counts[epoch]

    def locate(self, row: int) -> tuple[int, int, int, int]:
        """(rank, cache epoch, batch within that epoch, row within that batch) of row `row` of the stream."""
        micro, within = divmod(row, self.batch_size)
        index, rank = divmod(micro, self.world_size)        # rank `rank`'s micro-batch `index`
        epoch = 0
        while index >= self.batches_in_epoch(epoch):
            index -= self.batches_in_epoch(epoch)
            epoch += 1
        return rank, epoch, index, within

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        if not 0 <= j < self.length:
            raise IndexError(f"row {j} of {self.length}")
        rank, epoch, index, within = self.locate(self.offset + j)
        where = (rank, epoch, index)
        if self._last is None or self._last[0] != where:     # consecutive rows share their batch: read it once
            self._last = (where, self.rank_dataset(rank, epoch).batch(index))
        batch = self._last[1]
        n = int(batch["attention_mask"][within].sum()) if "attention_mask" in batch else batch["labels"].shape[1]
        return {k: v[within] if v.dim() == 1 else v[within, :n] for k, v in batch.items()}


class DistillCollator:
    """Rows of `DistillDataset` -> a batch (module docstring): right-padded to the longest row."""

    def __call__(self, rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        t = max(int(r["labels"].shape[0]) for r in rows)
        out: dict[str, torch.Tensor] = {}
        for key, first in rows[0].items():
            if first.dim() == 0:
                out[key] = torch.stack([r[key] for r in rows])
                continue
            padded = torch.full((len(rows), t, *first.shape[1:]), PAD.get(key, 0), dtype=first.dtype)
            for b, r in enumerate(rows):
                padded[b, :r[key].shape[0]] = r[key]
            out[key] = padded
        lengths = torch.tensor([int(r["labels"].shape[0]) for r in rows])
        inside = torch.arange(t)[None, :] < lengths[:, None]               # (B, T) real positions
        out.setdefault("attention_mask", inside.long())
        out.setdefault("loss_mask", inside)                                 # a window cache: every position
        out["labels"] = out["labels"].masked_fill(~out["loss_mask"], IGNORE_INDEX)
        out["shift_labels"] = out["labels"]
        return out
