"""Batches for training: packed windows (pretrain) or a teacher cache (distill), resumable by index.

Every batch source is a deterministic function of the batch number: micro-batch `i` of a rank is
the same whether the run went straight through or was resumed, so a checkpoint only needs to
remember how many micro-batches were consumed (`stream(start=...)` picks up there). Under DDP every
rank gets a disjoint part of the data and all ranks take the same number of batches.

Batches are dicts of CPU tensors, the cache reader's convention (B windows, T = seq_len):

- `input_ids`  int64 [B, T]   what the model reads (`window[:, :-1]`)
- `labels`     int64 [B, T]   the next token at each position (`window[:, 1:]`)
- `window_id`  int64 [B]
- rows of their own length (chat data, `sequences` caches) add `attention_mask` int64 [B, T] and
  `loss_mask` bool [B, T], padded to the batch's longest row; packed rows (several documents a
  row) add `position_ids` and `document_ids` int64 [B, T] (logitcache.data.packing.packed_positions),
  which make the model keep attention inside each document (trainer.attention)
- cache batches add `topk_ids` int64 [B, T, k], `topk_logprobs` float32 [B, T, k],
  `tail_logmass` float32 [B, T] and `target_logprob` float32 [B, T]; a sampled cache gives
  `sample_ids` int64 [B, T, S] and `sample_counts` int32 [B, T, S] instead of the top-k three.

Both sources feed the model through a `torch.utils.data.DataLoader` (`--workers` processes decode
batches while the model trains) whose order never depends on the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from logitcache.data.packing import packed_positions
from logitcache.errors import UserError


class WindowBatches(Dataset):
    """Shuffled batches of packed windows: every epoch is a new permutation of this rank's windows.

    Rank r of w owns windows r, r + w, r + 2w, ... A partial batch at the end of an epoch is
    dropped, so every batch has exactly `batch_size` windows. Map-style: item `i` is micro-batch i.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.tokens = tokens
        self.batch_size = batch_size
        self.seed = seed
        n_min = len(tokens) // world           # every rank gets the same number of windows
        self.ids = np.arange(rank, len(tokens), world, dtype=np.int64)[:n_min]
        if len(self.ids) < batch_size:
            raise UserError(f"only {len(self.ids)} training windows per rank for --batch-size {batch_size}; "
                            "use more data, a shorter --seq-len or a smaller --batch-size")
        self.batches_per_epoch = len(self.ids) // batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1]) - 1

    def __len__(self) -> int:  # an unbounded stream; the DataLoader only sees the sampler's indices
        return 2**62

    def window_ids(self, index: int) -> np.ndarray:
        epoch, j = divmod(index, self.batches_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
            self._perm = (epoch, self.ids[perm])
        return self._perm[1][j * self.batch_size:(j + 1) * self.batch_size]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.window_ids(index)
        w = torch.from_numpy(self.tokens[ids].astype(np.int64))
        return {"input_ids": w[:, :-1], "labels": w[:, 1:], "window_id": torch.from_numpy(ids)}

    def stream(self, start: int, count: int, workers: int = 0, pin_memory: bool = False) -> Iterator[dict]:
        """Micro-batches start .. start + count - 1, in order."""
        kwargs = {"prefetch_factor": 4} if workers > 0 else {}
        return iter(DataLoader(self, batch_size=None, sampler=range(start, start + count),
                               num_workers=workers, pin_memory=pin_memory, **kwargs))


class SequenceBatches(WindowBatches):
    """Shuffled batches of rows of their own length (`logitcache.data.Sequences`: conversations with
    loss masks), for supervised fine-tuning on the trained turns only.

    Rows are assigned to ranks and shuffled exactly as `WindowBatches` does with windows. A batch is
    right-padded to its longest row and carries `attention_mask` and `loss_mask` [B, T]: position t
    carries a loss when token t + 1 is a trained token of its row. Packed sequences
    (`logitcache.data.pack_sequences`) add `position_ids` and `document_ids` [B, T].
    """

    def __init__(self, sequences, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        super().__init__(np.zeros((sequences.num_windows, 1), np.int32), batch_size, seed, rank, world)
        self.sequences = sequences

    @property
    def seq_len(self) -> int:
        return self.sequences.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows_batch(self.window_ids(index))

    def rows_batch(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of rows `ids` (int64 [B]), right-padded to the longest."""
        rows = [self.sequences.row(int(i)) for i in ids]
        t = max(len(tokens) for tokens, _ in rows) - 1
        window = np.zeros((len(rows), t + 1), np.int64)
        targets = np.zeros((len(rows), t + 1), bool)
        attention = np.zeros((len(rows), t), np.int64)
        for b, (tokens, mask) in enumerate(rows):
            window[b, :len(tokens)] = tokens
            targets[b, :len(tokens)] = mask
            attention[b, :len(tokens) - 1] = 1
        w = torch.from_numpy(window)
        batch = {"input_ids": w[:, :-1], "labels": w[:, 1:], "window_id": torch.from_numpy(np.asarray(ids, np.int64)),
                 "attention_mask": torch.from_numpy(attention), "loss_mask": torch.from_numpy(targets[:, 1:])}
        if self.sequences.documents is not None:
            pos, doc = packed_positions([self.sequences.doc_lengths(int(i)) for i in ids], t)
            batch.update(position_ids=torch.from_numpy(pos), document_ids=torch.from_numpy(doc))
        return batch


class CacheBatches:
    """Endless shuffled batches of a teacher cache, epoch after epoch, via `CacheReader.dataset`.

    Each epoch is the reader's `CacheDataset` with shuffle (64-row units permuted, then windows
    permuted within a shuffle buffer), this rank's disjoint units, equal batch counts on every
    rank and no partial batch. Micro-batch `i` of the stream is found by walking the epochs'
    batch counts, and the reader's `start_batch` skips straight to it, so a resumed run reads
    exactly the batches an uninterrupted one would have. A DataLoader is started per epoch (the
    reader requires `set_epoch` before each epoch's iterator).
    """

    def __init__(self, reader, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle_buffer: int = 1024, vocab_limit: int | None = None):
        self.reader = reader
        self.vocab_limit = vocab_limit
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.shuffle_buffer = shuffle_buffer
        self._counts: dict[int, int] = {}
        if self.batches_in_epoch(0) == 0:
            raise UserError(f"--cache {reader.path}: {reader.num_windows} cached windows are too few for "
                            f"--batch-size {batch_size} on {world} rank(s)")

    @property
    def seq_len(self) -> int:
        return int(self.reader.seq_len)

    def dataset(self, epoch: int, start_batch: int = 0):
        return self.reader.dataset(self.batch_size, shuffle=True, seed=self.seed,
                                   shuffle_buffer=self.shuffle_buffer, rank=self.rank, world_size=self.world,
                                   equalize_ranks=True, drop_last=True, epoch=epoch, start_batch=start_batch)

    def batches_in_epoch(self, epoch: int) -> int:
        if epoch not in self._counts:
            self._counts[epoch] = self.dataset(epoch).batches_in_epoch(epoch)
        return self._counts[epoch]

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, batch within epoch) of micro-batch `index` of the stream."""
        epoch = 0
        while index >= self.batches_in_epoch(epoch):
            index -= self.batches_in_epoch(epoch)
            epoch += 1
        return epoch, index

    def stream(self, start: int, count: int, workers: int = 0, pin_memory: bool = False) -> Iterator[dict]:
        epoch, offset = self.locate(start)
        left = count
        kwargs = {"prefetch_factor": 4} if workers > 0 else {}
        while left > 0:
            ds = self.dataset(epoch, offset)
            loader = DataLoader(ds, batch_size=None, num_workers=min(workers, max(len(ds), 1)),
                                pin_memory=pin_memory, **kwargs)
            for batch in loader:
                ids = batch["sample_ids"] if "sample_ids" in batch else batch["topk_ids"]
                if self.vocab_limit is not None and int(ids.max()) >= self.vocab_limit:
                    raise UserError(f"--cache {self.reader.path}: a cached teacher id is >= the student's "
                                    f"{self.vocab_limit} usable vocabulary entries")
                yield batch
                left -= 1
                if left == 0:
                    return
            epoch, offset = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# models and tokenizers: loading and compatibility checks shared by the commands


def load_tokenizer(path, flag: str):
    """The tokenizer saved in a folder, or a one-line UserError naming the flag."""
    from pathlib import Path

    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir() or not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json",
                                                             "tokenizer.model", "vocab.json")):
        raise UserError(f"{flag} {path}: no tokenizer saved in this folder")
    try:
        return AutoTokenizer.from_pretrained(p)
    except Exception as exc:  # noqa: BLE001  (whatever breaks the load, the folder is at fault: one line)
        raise UserError(f"{flag} {path}: tokenizer could not be loaded ({type(exc).__name__})") from None


def load_causal_lm(path, flag: str):
    """A Hugging Face causal LM checkpoint loaded in float32 (the training master copy)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"{flag} {path}: not a model folder (no config.json)")
    try:
        return AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001  (whatever breaks the load, the folder is at fault: one line)
        raise UserError(f"{flag} {path}: model could not be loaded ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]})") from None


def logits_vocab(model, tokenizer, flag: str, warn=None) -> int:
    """How many logit columns count: len(tokenizer). Padding columns beyond it are ignored.

    A model whose embedding is padded (e.g. 152,064 rows for a 151,936-token tokenizer) gets a
    warning; a model narrower than its tokenizer cannot represent every id and is refused.
    """
    width = int(model.get_output_embeddings().weight.shape[0])
    n = len(tokenizer)
    if width < n:
        raise UserError(f"{flag}: the model's vocabulary ({width}) is smaller than its tokenizer's ({n})")
    if width > n:
        (warn or _stderr)(f"trainer: warning: {flag}: the model has {width} logit columns for a {n}-token tokenizer; "
             f"the {width - n} padding columns are ignored (softmax over the tokenizer's ids)")
    return n


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)
