"""A DistillKit capture read as checked sequences with their top-k, and what a pass over it finds.

`Capture` resolves the source (distillkit_read), its layout, config and vocabulary; `Capture.scan` reads
every batch (distillkit_rows), decodes it unless no shard still needs it, and returns a `Scan`: counts,
lengths, token counts and the hashes the cache key needs. docs/interop.md describes the rows.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from logitcache.encodings import DEFAULT_ENCODING
from logitcache.errors import UserError
from logitcache.format.payloads import TopK
from logitcache.interop.distillkit_config import CONFIG_FILE, CompressionConfig, LegacyConfig
from logitcache.interop.distillkit_read import RAW, detect_layout, find_config, find_shards, iter_batches
from logitcache.interop.distillkit_rows import Counts, Expect, RowBatch, Sequences
from logitcache.interop.import_common import topk_arrays, vocabulary

Wanted = Callable[[int, int], bool]


@dataclass(frozen=True)
class ImportSettings:
    """What `import_distillkit` reads and writes. `config`: a compression config file (default: the
    capture's compression_config.yaml); `vocab_size` / `tokenizer`: the vocabulary ids are checked against
    (default: the config's d); `rows_per_shard`: None picks ~2^18 stored positions per shard."""

    src: str
    out: Path
    config: str | None = None
    vocab_size: int | None = None
    tokenizer: str | None = None
    teacher_name: str | None = None
    encoding: str = DEFAULT_ENCODING
    encoding_params: dict | None = None
    rows_per_shard: int | None = None
    progress: bool = True
    batch_rows: int = 1024


@dataclass
class Scan:
    """What one pass found: counts, the longest sequence, token counts, and hashes of the structure
    (tokens + positions; also as `data.windows_fingerprint` would hash them) and of the top-k read."""

    total_rows: int
    vocab: int
    counts: Counts = field(default_factory=Counts)
    length: int | None = None         # tokens of the first sequence
    same_length: bool = True
    longest: int = 0
    all_positions: int = 0            # the sequences' positions, stored or not
    token_counts: np.ndarray | None = None
    windows: "hashlib._Hash | None" = None
    rows_hash: "hashlib._Hash" = field(default_factory=lambda: hashlib.sha256(b"distillkit-sequences"))
    ids_hash: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    logprobs_hash: "hashlib._Hash" = field(default_factory=hashlib.sha256)

    def add_rows(self, seqs: Sequences) -> None:
        if self.token_counts is None:
            self.token_counts = np.zeros(self.vocab, dtype=np.int64)
        for tokens, positions in zip(seqs.tokens, seqs.positions):
            n = len(tokens)
            if self.length is None:   # data.windows_fingerprint's prefix, valid if the cache is a windows one
                self.length = n
                self.windows = hashlib.sha256(f"windows{(self.total_rows, n)}".encode())
            self.same_length &= n == self.length
            self.longest = max(self.longest, n)
            self.all_positions += n - 1
            raw = np.ascontiguousarray(tokens, dtype="<i4")
            self.windows.update(raw.tobytes())
            self.rows_hash.update(np.array([n, len(positions)], dtype="<i8").tobytes() + raw.tobytes()
                                  + np.ascontiguousarray(positions, dtype="<i4").tobytes())
            self.token_counts += np.bincount(tokens, minlength=self.vocab)

    def add_topk(self, ids: np.ndarray, lps: np.ndarray) -> None:
        self.ids_hash.update(np.ascontiguousarray(ids, dtype="<i4").tobytes())
        self.logprobs_hash.update(np.ascontiguousarray(lps, dtype="<f8").tobytes())

    @property
    def windows_layout(self) -> bool:
        return self.counts.whole_rows and self.same_length and self.counts.sequences == self.total_rows

    def content(self) -> str:
        return hashlib.sha256(b"distillkit-topk" + self.ids_hash.digest() + self.logprobs_hash.digest()).hexdigest()

    def fingerprint(self) -> str:
        return self.windows.hexdigest() if self.windows_layout else self.rows_hash.hexdigest()


def _next_tokens(seqs: Sequences) -> np.ndarray:
    """The token each stored position predicts, flat in order."""
    if not seqs.tokens:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([t[p + 1] for t, p in zip(seqs.tokens, seqs.positions)]).astype(np.int64)


class Capture:
    """The capture: its shards, layout, config and vocabulary, read as checked sequences."""

    def __init__(self, s: ImportSettings):
        self.settings = s
        self.shards = find_shards(s.src)
        self.layout, self.total_rows = detect_layout(self.shards)
        self.config, self.config_where = find_config(self.shards, s.config)
        if self.layout != RAW and self.config is None:
            raise UserError(f"{s.src}: no {CONFIG_FILE} beside the shards; give DistillKit's compression "
                            "config with --config FILE (the one the capture was made with)")
        want = LegacyConfig if self.layout == "legacy" else CompressionConfig
        if self.config is not None and self.layout != RAW and not isinstance(self.config, want):
            raise UserError(f"{self.config_where}: a {'legacy' if want is CompressionConfig else 'compression'} "
                            f"config, but the shards have the {self.layout} layout")
        d = self.config.d if self.config is not None else None
        self.width, self.usable, self.tokenizer = vocabulary(s.vocab_size, s.tokenizer, d)
        self.expect = Expect(self.layout, self.config, self.usable,
                             self.config.k if self.config is not None and self.layout != RAW else None)
        if self.total_rows == 0:
            raise UserError(f"{s.src}: no rows")

    def batches(self, counts: Counts, wanted: Wanted | None = None) -> Iterator[tuple[Sequences, TopK | None, int]]:
        """(sequences, their top-k or None when `wanted(first, count)` says no shard needs them, rows read)."""
        seen = 0
        for path, first, table in iter_batches(self.shards, self.layout, self.settings.batch_rows):
            rows = RowBatch(table, path, first, self.expect)
            seqs = rows.sequences(counts)
            topk = None
            if wanted is None or wanted(seen, len(seqs.tokens)):
                ids, lps = rows.decode(seqs.take)
                ids, lps = rows.settle(seqs.take, ids, lps, counts)
                lp32, tail, target = topk_arrays(_next_tokens(seqs), ids, lps, self.usable)
                topk = TopK(ids, lp32, tail, target)
            seen += len(seqs.tokens)
            yield seqs, topk, table.num_rows

    def scan(self, desc: str, each: Callable[[Sequences, TopK | None], None] | None = None,
             wanted: Wanted | None = None) -> Scan:
        """One pass over every row: `each(sequences, top-k)` sees each batch; `wanted(first, count)` says
        whether sequences first..first + count - 1 need decoding (else their top-k is None)."""
        from tqdm import tqdm

        found = Scan(self.total_rows, self.width)
        with tqdm(total=self.total_rows, unit="row", desc=desc, file=sys.stderr,
                  disable=not self.settings.progress, leave=False) as bar:
            for seqs, topk, n in self.batches(found.counts, wanted):
                found.add_rows(seqs)
                if topk is not None:
                    found.add_topk(topk.ids, topk.logprobs)
                if each is not None:
                    each(seqs, topk)
                bar.update(n)
        if found.counts.rows != self.total_rows:
            raise UserError(f"{self.settings.src}: {found.counts.rows} rows read, {self.total_rows} counted; was it "
                            "changed meanwhile?")
        if found.counts.sequences == 0:
            raise UserError(f"{self.settings.src}: no position to store (every row empty, masked or one token long)")
        return found
