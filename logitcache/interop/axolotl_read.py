"""Read the rows of a pre-tokenized axolotl KD dataset (Parquet or JSON Lines) and check every value a
cache needs; anything wrong is one UserError naming the file, the row and the position.

A row (see logitcache/interop/axolotl.py for the layout) must have `input_ids` (N tokens),
`target_token_ids` and the log-probs column (N lists of k each; position t is the distribution of
token t + 1, the last position is not read). `labels`, `attention_mask` and `target_mask` are checked
when present. Rows are read a batch at a time, so memory does not grow with the dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.errors import UserError
from logitcache.interop.row_checks import RowChecks, is_list

IGNORE_INDEX = -100
# Positive log-probs up to this are float rounding of a log-prob of 0 (renormalised in float32, say)
# and read as 0; above it the values are not log-probabilities.
POSITIVE_SLACK = 1e-6
# A top-k whose probabilities sum past 1 + this is not part of one distribution.
MASS_SLACK = 1e-4
_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
# A batch holds about this much input (Parquet's uncompressed bytes, or JSON text): a few such batches of
# numpy arrays at a time, whatever seq_len and k are.
BATCH_BYTES = 32 << 20


def source_files(src: str | Path) -> list[Path]:
    """The dataset's files: `src` itself, or the .parquet / .jsonl / .json files under the folder
    `src` (sorted by path, hidden files skipped)."""
    src = Path(src)
    if src.is_file():
        if src.suffix not in _SUFFIXES:
            raise UserError(f"{src}: not a .parquet, .jsonl or .json file")
        return [src]
    if not src.is_dir():
        raise UserError(f"{src}: no such file or folder")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in _SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(src).parts))
    if not files:
        raise UserError(f"{src}: no .parquet, .jsonl or .json files")
    return files


def _json_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def count_rows(files: list[Path]) -> int:
    """Rows in all files, without decoding them (Parquet metadata; JSON Lines: non-blank lines)."""
    total = 0
    for path in files:
        if _SUFFIXES[path.suffix] == "parquet":
            try:
                with pq.ParquetFile(path) as pf:
                    total += pf.metadata.num_rows
            except Exception as exc:
                raise UserError(f"{path}: unreadable Parquet ({type(exc).__name__})") from None
        else:
            total += sum(1 for _ in _json_lines(path))
    return total


def _parquet_batch_rows(pf: pq.ParquetFile, most: int) -> int:
    """Rows per batch for about BATCH_BYTES of uncompressed data, from the file's metadata."""
    meta = pf.metadata
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    per_row = max(1, size // max(1, meta.num_rows))
    return int(min(most, max(1, BATCH_BYTES // per_row)))


def iter_tables(files: list[Path], columns: list[str], most_rows: int = 1024
                ) -> Iterator[tuple[Path, int, pa.Table]]:
    """(file, index in the file of the first row, rows) batches of the wanted columns that exist;
    a batch is at most `most_rows` rows and about BATCH_BYTES of input."""
    for path in files:
        if _SUFFIXES[path.suffix] == "parquet":
            with pq.ParquetFile(path) as pf:
                present = [c for c in columns if c in pf.schema_arrow.names]
                first = 0
                for rb in pf.iter_batches(batch_size=_parquet_batch_rows(pf, most_rows), columns=present,
                                          use_threads=False):
                    yield path, first, pa.Table.from_batches([rb])
                    first += rb.num_rows
                if first == 0:
                    yield path, 0, pf.schema_arrow.empty_table().select(present)
            continue
        pending: list[dict] = []
        first = chars = 0
        for number, line in _json_lines(path):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: a row must be a JSON object, not {type(row).__name__} "
                                "(JSON Lines: one object per line)")
            pending.append({c: row[c] for c in columns if c in row})
            chars += len(line)
            if len(pending) == most_rows or chars >= BATCH_BYTES:
                yield path, first, _json_table(pending, path, first)
                first += len(pending)
                pending, chars = [], 0
        if pending or first == 0:
            yield path, first, _json_table(pending, path, first)


def _json_table(rows: list[dict], path: Path, first: int) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        line = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"{path} rows {first}..{first + len(rows) - 1}: values of mixed or unusable types "
                        f"({line})") from None


@dataclass
class Expect:
    """What every row must agree on: `tokens` (N) and `k` are fixed by the first row read."""

    vocab: int
    logprobs_field: str
    tokens: int | None = None
    k: int | None = None


@dataclass(frozen=True)
class Rows:
    """Checked rows: `input_ids` [n, N] int32, `topk_ids` [n, N-1, k] int32 and `topk_logprobs`
    [n, N-1, k] float64 (values as read, sorted descending per position)."""

    input_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray


class _Checker(RowChecks):
    """The checks of one batch; `where` is the file, rows are numbered within it from `first`."""

    def __init__(self, table: pa.Table, where: Path, first: int, expect: Expect):
        super().__init__(table, where, first)
        self.expect = expect

    def numbers(self, values: pa.Array, name: str, integer: bool) -> np.ndarray:
        t = values.type
        if pa.types.is_struct(t) or pa.types.is_map(t):
            raise self.fail(f"{name} holds {t}; only numbers are read (axolotl's legacy "
                            "{token, logprob} entries need its chat_template strategy, not this import)")
        return super().numbers(values, name, integer, integers="integer ids")

    def tokens(self) -> np.ndarray:
        lengths, values = self.lists(self.column("input_ids"), "input_ids")
        if self.expect.tokens is None and self.n:
            self.expect.tokens = int(lengths[0])
            if self.expect.tokens < 2:
                raise self.fail(f"{self.expect.tokens} tokens; a window needs at least 2", 0)
        N = self.expect.tokens
        bad = np.flatnonzero(lengths != N)
        if bad.size:
            r = int(bad[0])
            raise self.fail(f"{lengths[r]} tokens, but the rows before have {N}; every row must be one window "
                            f"of seq_len + 1 = {N} tokens (rows of their own length need the sequences layout, "
                            "which import does not write yet)", r)
        ids = self.numbers(values, "input_ids", integer=True).astype(np.int64).reshape(self.n, N)
        self.in_vocab(ids, "input_ids", per_position=False)
        return ids

    def in_vocab(self, ids: np.ndarray, name: str, per_position: bool) -> None:
        bad = (ids < 0) | (ids >= self.expect.vocab)
        if bad.any():
            where = np.argwhere(bad)[0]
            value = ids[tuple(where)]
            raise self.fail(f"{name} holds id {value}, outside the vocabulary 0..{self.expect.vocab - 1} "
                            "(set by --vocab-size or --tokenizer)", int(where[0]),
                            int(where[1]) if per_position else None)

    def positions(self, name: str, integer: bool) -> np.ndarray:
        """[n, N-1, k] entries of a per-position list column (the last position is not read)."""
        N = self.expect.tokens
        lengths, inner = self.lists(self.column(name), name)
        bad = np.flatnonzero(lengths != N)
        if bad.size:
            r = int(bad[0])
            raise self.fail(f"{name} has {lengths[r]} positions, input_ids has {N} tokens; axolotl keeps one "
                            "target list per input token", r)
        inner_lengths, values = self.lists(inner, name) if is_list(inner.type) else (None, None)
        if inner_lengths is None:
            raise self.fail(f"column {name} holds lists of {inner.type}, not lists of lists (one per position)")
        L = inner_lengths.reshape(self.n, N)[:, :N - 1]
        if self.expect.k is None and L.size:
            self.expect.k = int(L[0, 0])
            if not 1 <= self.expect.k <= self.expect.vocab:
                raise self.fail(f"{name} has {self.expect.k} entries per position; k must be in "
                                f"1..{self.expect.vocab}", 0, 0)
        k = self.expect.k
        bad_pos = np.argwhere(L != k)
        if bad_pos.size:
            r, t = (int(x) for x in bad_pos[0])
            raise self.fail(f"{name} has {L[r, t]} entries, earlier positions have k = {k}; every position "
                            "must hold the same k", r, t)
        flat = self.numbers(values, name, integer)
        starts = np.concatenate([[0], np.cumsum(inner_lengths)])[:-1].reshape(self.n, N)[:, :N - 1]
        return flat[starts[..., None] + np.arange(k)]

    def optional_masks(self, ids: np.ndarray) -> None:
        """labels must be unshifted (`input_ids` or -100), attention_mask all 1, target_mask 1 wherever
        a position is read: a windows cache has a distribution at every position and no loss mask."""
        N = self.expect.tokens
        for name in ("labels", "attention_mask"):
            col = self.column(name)
            if col is None:
                continue
            lengths, values = self.lists(col, name)
            bad = np.flatnonzero(lengths != N)
            if bad.size:
                raise self.fail(f"{name} has {lengths[bad[0]]} entries, input_ids has {N}", int(bad[0]))
            arr = self.numbers(values, name, integer=True).reshape(self.n, N)
            if name == "labels":
                wrong = (arr[:, 1:] != ids[:, 1:]) & (arr[:, 1:] != IGNORE_INDEX)
                if wrong.any():
                    r, t = (int(x) for x in np.argwhere(wrong)[0])
                    raise self.fail(f"labels[{t + 1}] is {arr[r, t + 1]}, input_ids[{t + 1}] is {ids[r, t + 1]}; "
                                    "axolotl's labels are the input ids (or -100), unshifted", r)
            elif (arr != 1).any():
                r = int(np.argwhere(arr != 1)[0][0])
                raise self.fail("attention_mask has zeros (padding); rows must be whole windows", r)
        if self.column("target_mask") is not None:
            mask = self.positions("target_mask", integer=True)
            off = np.argwhere((mask != 1).any(-1))
            if off.size:
                r, t = (int(x) for x in off[0])
                raise self.fail("target_mask is 0 (a masked position); import writes windows caches, which "
                                "hold a teacher distribution at every position (masked rows need the sequences "
                                "layout, not written by import yet)", r, t)

    def rows(self) -> Rows | None:
        for name in ("input_ids", "target_token_ids", self.expect.logprobs_field):
            if name not in self.table.column_names:
                raise self.fail(f"no column {name!r} (has: {', '.join(self.table.column_names) or 'none'}); an "
                                f"axolotl KD dataset has input_ids, target_token_ids and {self.expect.logprobs_field} "
                                "per position (pre-tokenized; docs/interop.md)")
        if self.n == 0:
            return None
        inp = self.tokens()
        ids = self.positions("target_token_ids", integer=True).astype(np.int64)
        lps = self.positions(self.expect.logprobs_field, integer=False).astype(np.float64)
        self.in_vocab(ids, "target_token_ids", per_position=True)
        self.optional_masks(inp)
        srt = np.sort(ids, axis=-1)
        dup = np.argwhere((srt[..., 1:] == srt[..., :-1]).any(-1))
        if dup.size:
            raise self.fail("target_token_ids repeats an id; a top-k holds distinct tokens", *(int(x) for x in dup[0]))
        field = self.expect.logprobs_field
        for test, what in ((~np.isfinite(lps), "is not finite (NaN or infinite: padding?)"),
                           (lps > POSITIVE_SLACK, "is positive; log-probabilities are <= 0")):
            if test.any():
                r, t, j = (int(x) for x in np.argwhere(test)[0])
                raise self.fail(f"{field} {float(lps[r, t, j])!r} {what}", r, t)
        lps = np.minimum(lps, 0.0)
        mass = np.exp(lps).sum(-1)
        if (mass > 1.0 + MASS_SLACK).any():
            r, t = (int(x) for x in np.argwhere(mass > 1.0 + MASS_SLACK)[0])
            raise self.fail(f"the top-k probabilities sum to {mass[r, t]:.6f} > 1; {field} must be log-probs "
                            "of one distribution", r, t)
        if (np.diff(lps, axis=-1) > 0).any():   # caches keep the top-k by descending log-prob
            order = np.argsort(-lps, axis=-1, kind="stable")
            ids, lps = np.take_along_axis(ids, order, -1), np.take_along_axis(lps, order, -1)
        return Rows(inp.astype(np.int32), ids.astype(np.int32), lps)


def check_rows(table: pa.Table, where: Path, first: int, expect: Expect) -> Rows | None:
    """Check one batch of rows (numbered from `first` in file `where`) against `expect`, which the
    first rows read fix (N, k); return its arrays (None for no rows) or raise a one-line UserError."""
    return _Checker(table, where, first, expect).rows()
