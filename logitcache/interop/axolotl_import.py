"""Import a pre-tokenized axolotl KD dataset as a logitcache top-k cache.

Two passes over the dataset, constant memory: the first checks every row (axolotl_read) and hashes
what the cache key needs, the second writes the shards. Nothing appears at the output until the whole
cache is written: shards go to `.<out>.importing` beside it through `CacheWriter` (so an interrupted
import resumes where it stopped, like `produce`) and the folder is renamed into place at the end. Bad
input is found in the first pass, before anything is written.

What comes from the dataset: the token windows, the top-k ids and their log-probs (stored as float32).
What is computed: the tail, `log(1 - sum exp(top-k))` in float64 floored at 2^-24 exactly as the vLLM
backend does (docs/FORMAT.md), and `target_logprob`, the log-prob of the actual next token, which is
exact when that token is in the top-k and otherwise the bound `min(last top-k log-prob, tail)`.
What is unknown is recorded as such (docs/interop.md): the teacher (`--teacher-name`, else "unknown";
no revision, dtype, config or weights), and the tokenizer unless `--tokenizer` gives it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from logitcache import format as fmt
from logitcache.errors import SettingError, UserError
from logitcache.format.manifest import Manifest
from logitcache.interop.axolotl import LOGPROBS_FIELD
from logitcache.interop.axolotl_read import Expect, Rows, check_rows, count_rows, iter_tables, source_files
from logitcache.interop.import_common import (
    check_out,
    fitted_encoding,
    topk_arrays,
    unknown_teacher,
    versions,
    vocabulary,
    write_staged,
)
from logitcache.producer.header import make_encoding
from logitcache.producer.writer import CacheWriter

LOG = logging.getLogger(__name__)

BACKEND = "import:axolotl"
_OPTIONAL = ("labels", "attention_mask", "target_mask")


@dataclass
class Scan:
    """What one pass over the dataset found: the row count, the windows' fingerprint (as
    `data.windows_fingerprint` computes it), a sha256 of the top-k read, token counts (for the
    encodings' rank tables) and how often each position's top-k holds its next / its own token."""

    rows: int = 0
    windows: "hashlib._Hash | None" = None
    # ids and log-probs hashed apart, so the digest does not depend on how the rows were batched
    ids_hash: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    logprobs_hash: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    counts: np.ndarray | None = None
    hits_next: int = 0
    hits_same: int = 0

    def add(self, rows: Rows, total: int, vocab: int) -> None:
        inp, ids = rows.input_ids, rows.topk_ids
        if self.windows is None:   # data.windows_fingerprint's prefix: the shape of all windows
            self.windows = hashlib.sha256(f"windows{(total, inp.shape[1])}".encode())
            self.counts = np.zeros(vocab, dtype=np.int64)
        self.windows.update(np.ascontiguousarray(inp, dtype="<i4").tobytes())
        self.ids_hash.update(np.ascontiguousarray(ids, dtype="<i4").tobytes())
        self.logprobs_hash.update(np.ascontiguousarray(rows.topk_logprobs, dtype="<f8").tobytes())
        self.counts += np.bincount(inp.reshape(-1), minlength=vocab)
        self.hits_next += int((ids == inp[:, 1:, None]).any(-1).sum())
        self.hits_same += int((ids == inp[:, :-1, None]).any(-1).sum())
        self.rows += len(inp)

    def content(self) -> str:
        """sha256 of the top-k read: ids (int32) and log-probs (float64, as read), in row order."""
        return hashlib.sha256(b"axolotl-topk" + self.ids_hash.digest() + self.logprobs_hash.digest()).hexdigest()


def payload(rows: Rows, vocab: int) -> dict[str, np.ndarray]:
    """`CacheWriter.write_shard` arrays for checked rows; `vocab` is the usable vocabulary."""
    lps, tail, target = topk_arrays(rows.input_ids[:, 1:], rows.topk_ids, rows.topk_logprobs, vocab)
    return {"input_ids": rows.input_ids, "target_logprob": target, "topk_ids": rows.topk_ids, "topk_logprobs": lps,
            "tail_logmass": tail}


class _Source:
    """The dataset: its files, its row count, and checked batches in order."""

    def __init__(self, src: str | os.PathLike, logprobs_field: str, vocab: int, most_rows: int):
        self.src = str(src)
        self.files = source_files(src)
        self.total = count_rows(self.files)
        if self.total == 0:
            raise UserError(f"{src}: no rows")
        self.logprobs_field, self.vocab, self.most_rows = logprobs_field, vocab, most_rows
        self.columns = ["input_ids", "target_token_ids", logprobs_field, *_OPTIONAL]
        self.expect = Expect(vocab=vocab, logprobs_field=logprobs_field)

    def batches(self) -> Iterator[Rows]:
        for path, first, table in iter_tables(self.files, self.columns, self.most_rows):
            rows = check_rows(table, path, first, self.expect)
            if rows is not None:
                yield rows

    def scan(self, progress: bool, desc: str, each=None) -> Scan:
        """One pass: every row checked and hashed; `each(rows)` sees each batch."""
        from tqdm import tqdm

        found = Scan()
        with tqdm(total=self.total, unit="row", desc=desc, file=sys.stderr, disable=not progress, leave=False) as bar:
            for rows in self.batches():
                found.add(rows, self.total, self.vocab)
                if each is not None:
                    each(rows)
                bar.update(len(rows.input_ids))
        if found.rows != self.total:   # a JSON Lines file changed between counting and reading
            raise UserError(f"{self.src}: {found.rows} rows read, {self.total} counted; was it changed meanwhile?")
        return found


def _warn_if_shifted(scan: Scan, positions: int, src: str) -> None:
    """A dataset made with position t holding token t's own distribution (vLLM's prompt_logprobs
    indexing) would train the student one token late; real teachers put the next token in their top-k
    far more often than the current one, so the opposite pattern is worth a warning."""
    same, nxt = scan.hits_same / positions, scan.hits_next / positions
    if same > 0.3 and same > 2 * nxt:
        LOG.warning("%s: position t's top-k holds token t (%.0f%% of positions) far more often than token t+1 "
                    "(%.0f%%); axolotl's position t is the distribution of token t+1, so this dataset looks shifted "
                    "by one position", src, 100 * same, 100 * nxt)


def build_header(source: _Source, scan: Scan, *, width: int, usable: int, tok: dict, teacher_name: str | None,
                 encoding: dict, rows_per_shard: int) -> Manifest:
    """The manifest before any shard. The teacher is unknown, so its `weights_fingerprint` is a sha256
    of the imported top-k instead: the key still changes with the content (docs/interop.md)."""
    N, k = source.expect.tokens, source.expect.k
    teacher = unknown_teacher(teacher_name, scan.content(), width, usable)
    data = {"source": f"axolotl:{source.src}", "text_column": None, "fingerprint": scan.windows.hexdigest(),
            "seq_len": N - 1, "num_windows": scan.rows, "num_tokens": scan.rows * (N - 1)}
    return Manifest.header(key=fmt.cache_key(teacher, tok, data, k, encoding), k=k, rows_per_shard=rows_per_shard,
                           num_shards=-(-scan.rows // rows_per_shard), teacher=teacher, tokenizer=tok, data=data,
                           encoding=encoding, producer={"backend": BACKEND, "versions": versions()})


class _ShardFiller:
    """Collects checked batches into shards and writes the ones the staging cache lacks."""

    def __init__(self, writer: CacheWriter, header: Manifest, vocab: int):
        self.writer, self.header, self.vocab = writer, header, vocab
        self.done = writer.completed()
        self.pending: list[dict[str, np.ndarray]] = []
        self.have, self.shard = 0, 0

    def __call__(self, rows: Rows) -> None:
        self.pending.append(payload(rows, self.vocab))
        self.have += len(rows.input_ids)
        while self.shard < self.header.num_shards and self.have >= self.header.expected_rows(self.shard):
            need = self.header.expected_rows(self.shard)
            merged = {name: np.concatenate([p[name] for p in self.pending]) for name in self.pending[0]}
            if self.shard not in self.done:
                self.writer.write_shard(self.shard, **{name: a[:need] for name, a in merged.items()})
            self.pending = [{name: a[need:] for name, a in merged.items()}] if self.have > need else []
            self.have -= need
            self.shard += 1


def import_axolotl(src: str | os.PathLike, out: str | os.PathLike, *, vocab_size: int | None = None,
                   tokenizer: str | os.PathLike | None = None, teacher_name: str | None = None,
                   logprobs_field: str = LOGPROBS_FIELD, encoding: str = "compact",
                   encoding_params: dict | None = None, rows_per_shard: int = 256, batch_rows: int = 1024,
                   progress: bool = True) -> Manifest:
    """Write the axolotl KD dataset `src` (a Parquet / JSON Lines file or a folder of them) as the cache
    folder `out`; return its manifest (module docstring). The same call again returns the finished
    cache unchanged, or resumes an interrupted one."""
    out = Path(out)
    if rows_per_shard < 1:
        raise SettingError("rows_per_shard", rows_per_shard, "must be >= 1")
    check_out(out)
    width, usable, tok = vocabulary(vocab_size, tokenizer)
    enc = make_encoding(encoding, encoding_params)
    if enc.payload != fmt.PAYLOAD_TOPK:
        raise SettingError("encoding", encoding, "stores draws (a samples payload); an axolotl dataset holds top-k "
                           "log-probs")
    source = _Source(src, logprobs_field, usable, batch_rows)   # batches also stop at ~32 MB of input
    first = source.scan(progress, f"check {Path(src).name}")
    _warn_if_shifted(first, first.rows * (source.expect.tokens - 1), source.src)
    header = build_header(source, first, width=width, usable=usable, tok=tok, teacher_name=teacher_name,
                          encoding=fitted_encoding(enc, first.counts, width), rows_per_shard=rows_per_shard)

    def fill(writer: CacheWriter) -> None:
        second = source.scan(progress, f"import {out.name}", each=_ShardFiller(writer, header, usable))
        if (second.windows.hexdigest(), second.content()) != (first.windows.hexdigest(), first.content()):
            raise UserError(f"{src}: changed while it was imported; run the import again")

    manifest = write_staged(out, header, fill)
    LOG.info("%s: %d windows of %d tokens, top-%d, from %s (%s)", out, first.rows, source.expect.tokens - 1,
             source.expect.k, source.src, header.encoding.name)
    return manifest
