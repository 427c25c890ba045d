"""Chat rows in, one token sequence per conversation (with its loss mask) out, cut to a length and saved.

The chat layer (`chat.render_rows`) renders each conversation with the teacher tokenizer's chat
template (or another one) into `input_ids` and `loss_mask`, where `loss_mask[i]` says token i is a
training target. Here those sequences are fitted to a cache's `seq_len` and kept together:

- a sequence of n tokens has n - 1 positions (position p predicts token p + 1); the loss
  positions are the p with `loss_mask[p + 1]`;
- truncation (`TRUNCATIONS`), for a sequence longer than `seq_len + 1` tokens: `drop` it (counted),
  cut it to its first `seq_len + 1` tokens (`right`), or `split` it into pieces that start every
  `seq_len` tokens and hold up to `seq_len + 1`, overlapping by one token as packed windows do,
  so every target keeps exactly one position that predicts it (the first token of a piece is no
  target there: it is the previous piece's last);
- a sequence left with no loss position (a trained turn cut away, say) is dropped and counted.

The result, `Sequences`, holds every row's tokens end to end with their offsets and masks, and a
fingerprint over the tokens, masks, the template's hash, the `train_on` policy, the truncation and
`seq_len`. It is saved under `root/windows/chat-<key>/` (three .npy files, then `meta.json` last,
each written atomically), keyed by the source, its files' sizes and times, the tokenizer, the
template and the settings, so every teacher of a tokenizer (a ladder) and every re-run loads it
instead of rendering again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from logitcache.data.chat import ChatCounts, render_rows
from logitcache.data.chat_corpus import iter_chat_rows
from logitcache.data.conversations import detect_format
from logitcache.data.corpus import EMBEDDED_SOURCES, SHAKESPEARE_CHAT_SOURCES, resolve_source
from logitcache.data.templates import TRAIN_ON, resolve_template
from logitcache.data.tokenizer import tokenizer_fingerprint
from logitcache.errors import SettingError, UserError
from logitcache.format.atomic import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

TRUNCATIONS = ("drop", "right", "split")
_ROW_SUFFIXES = (".jsonl", ".json", ".parquet")
_FILES = ("input_ids", "offsets", "loss_mask")


@dataclass
class SequenceCounts:
    """What `prepare_sequences` did with the rows it read (saved with the sequences)."""

    rows: int = 0
    """Rows read (all of them, or until `max_rows` sequences were kept)."""
    skipped_no_assistant: int = 0
    """Rows with no assistant turn to train on (an error under `strict`)."""
    too_long: int = 0
    """Sequences longer than seq_len + 1 tokens: dropped, cut or split, as `truncation` says."""
    pieces: int = 0
    """Rows the split sequences became (`split` only)."""
    no_loss: int = 0
    """Rows dropped for having no loss position (after truncation)."""
    sequences: int = 0
    """Rows kept."""
    positions: int = 0
    loss_positions: int = 0


@dataclass(frozen=True)
class Sequences:
    """Tokenized conversations, one row each, with the masks of their training targets.

    `input_ids` (N,) int32 and `loss_mask` (N,) bool hold every row end to end; row i is
    `[offsets[i], offsets[i + 1])`. `loss_mask[j]` says token j is a target (never a row's first).
    `tokens` is `input_ids` (what encodings fit their corpus statistics on, as for `Windows`).
    """

    input_ids: np.ndarray
    offsets: np.ndarray
    loss_mask: np.ndarray
    limit: int
    """The `seq_len` setting the rows were fitted to: at most `limit + 1` tokens each."""
    fingerprint: str
    source: str
    tokenizer_fingerprint: str
    chat: dict[str, Any]
    """The manifest's `data.chat`: format, template_sha256, train_on, truncation."""
    counts: SequenceCounts = field(default_factory=SequenceCounts)
    path: Path | None = None
    documents: np.ndarray | None = None
    """Packed rows (data.packing): the documents' token offsets (D + 1,); each row spans whole ones.
    None: every row is one document."""
    packing: dict[str, Any] | None = None
    """The manifest's `data.packing` when rows are packed (data.packing.pack_sequences), else None."""

    @property
    def tokens(self) -> np.ndarray:
        return self.input_ids

    @property
    def seq_len(self) -> int:
        """The longest row's positions (tokens - 1), at most `limit`: the manifest's `data.seq_len`."""
        return int(self.lengths.max()) - 1 if self.num_windows else 0

    @property
    def num_windows(self) -> int:
        """Rows (conversations or their pieces); the manifest's `data.num_windows`."""
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per row."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        """Positions: n - 1 for a row of n tokens."""
        return int(len(self.input_ids) - self.num_windows)

    @property
    def loss_tokens(self) -> int:
        """Positions whose next token carries a loss: the positions a cache stores."""
        return int(self.loss_mask.sum())

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row i's (input_ids, loss_mask)."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[start:end], self.loss_mask[start:end]

    def doc_lengths(self, i: int) -> np.ndarray:
        """Tokens of each document of row i, in order (one entry, the row's length, when unpacked)."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        if self.documents is None:
            return np.array([end - start], dtype=np.int64)
        first, last = np.searchsorted(self.documents, [start, end])
        return np.diff(self.documents[first:last + 1])

    def loss_positions(self, i: int) -> np.ndarray:
        """Row i's loss positions, ascending: p in 0..n-2 with loss_mask[p + 1] (position p predicts token p + 1)."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.flatnonzero(self.loss_mask[start + 1:end]).astype(np.int32)


def sequences_fingerprint(input_ids: np.ndarray, offsets: np.ndarray, loss_mask: np.ndarray,
                          chat: dict[str, Any], seq_len: int) -> str:
    """sha256 over the rows' tokens, boundaries and masks and how they were made (template hash,
    train_on, truncation, format) and seq_len: equal iff a cache would hold the same rows."""
    how = json.dumps({"chat": chat, "seq_len": int(seq_len)}, sort_keys=True, separators=(",", ":"))
    h = hashlib.sha256(f"sequences{len(offsets) - 1},{len(input_ids)}|{how}|".encode())
    h.update(np.ascontiguousarray(input_ids, dtype="<i4").tobytes())
    h.update(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    h.update(np.packbits(np.asarray(loss_mask, dtype=bool)).tobytes())
    return h.hexdigest()


def cut_sequence(ids: np.ndarray, mask: np.ndarray, seq_len: int,
                 truncation: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """One sequence fitted to `seq_len + 1` tokens: itself, nothing (`drop`), its head (`right`) or
    its pieces (`split`, see the module doc). Each piece's first token is no target."""
    n = seq_len + 1
    if len(ids) <= n:
        return [(ids, mask)]
    if truncation == "drop":
        return []
    if truncation == "right":
        starts = [0]
    elif truncation == "split":
        starts = list(range(0, len(ids) - 1, seq_len))   # a last piece of one token would have no position
    else:
        raise SettingError("truncation", truncation, f"unknown (known: {', '.join(TRUNCATIONS)})")
    pieces = []
    for s in starts:
        piece_mask = mask[s:s + n].copy()
        piece_mask[0] = False
        pieces.append((ids[s:s + n], piece_mask))
    return pieces


def is_chat_source(source: str, format: str | None = None, home: Path | None = None) -> bool:
    """Whether `source` holds conversations: `format` given, the embedded chat corpus, or rows whose
    first one's columns a chat format other than plain `text` fits (messages, conversations,
    prompt + completion). Plain text files and the embedded plays are documents, never chat."""
    if format is not None or source in SHAKESPEARE_CHAT_SOURCES:
        return True
    if source in EMBEDDED_SOURCES:
        return False
    files, _ = resolve_source(source, home)
    if files is not None:
        rows = [f for f in files if f.suffix in _ROW_SUFFIXES]
        if not rows:
            return False
        columns = _first_columns(rows[0])
    else:   # a hub dataset: its first row (datasets keeps the download for the run that follows)
        try:
            columns = list(next(iter_chat_rows(source, home=home), {}))
        except UserError:
            return False    # the plain-text path reports the source's problem in its own words
    try:
        return detect_format(columns) != "text"
    except UserError:
        return False        # no chat format: documents in a --text-column


def _first_columns(path: Path) -> list[str]:
    """The first row's column names of a .jsonl/.json/.parquet file, reading as little as it can."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                line = next((line for line in f if line.strip()), "{}")
            row = json.loads(line)
        else:
            row = next(iter_chat_rows(str(path)), {})
    except (OSError, ValueError, UserError):
        return []          # unreadable here: the plain-text path says why
    return list(row) if isinstance(row, dict) else []


def prepare_sequences(source: str, tokenizer: Any, seq_len: int, root: Path | None = None, *,
                      format: str | None = None, chat_template: str | None = None, train_on: str = "assistant",
                      truncation: str = "drop", strict: bool = False, max_rows: int | None = None,
                      home: Path | None = None) -> Sequences:
    """Render `source`'s chat rows, fit them to `seq_len`, or load what an earlier run saved under `root`.

    `chat_template` is the template's text (None: the tokenizer's own). `max_rows` stops once that
    many rows are kept. Bad rows are one-line UserErrors naming the row (chat.render_rows).
    """
    if seq_len < 1:
        raise SettingError("seq_len", seq_len, "must be at least 1")
    if train_on not in TRAIN_ON:
        raise SettingError("train_on", train_on, f"unknown (known: {', '.join(TRAIN_ON)})")
    if truncation not in TRUNCATIONS:
        raise SettingError("truncation", truncation, f"unknown (known: {', '.join(TRUNCATIONS)})")
    template = resolve_template(tokenizer, chat_template)
    template_sha = hashlib.sha256(template.encode()).hexdigest()
    tok_fp = tokenizer_fingerprint(tokenizer)
    files, canonical = resolve_source(source, home)
    spec = {"source": canonical, "tokenizer": tok_fp, "template_sha256": template_sha, "format": format,
            "train_on": train_on, "truncation": truncation, "strict": strict, "seq_len": seq_len,
            "max_rows": max_rows,
            "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files] if files else None}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(root) / "windows" / f"chat-{key}" if root is not None else None
    if folder is not None and (folder / "meta.json").exists():
        return _load(folder, canonical, tok_fp)

    rows = iter(iter_chat_rows(source, home=home))
    first = next(rows, None)
    if first is None:
        raise SettingError("data", source, "holds no rows")
    if not isinstance(first, dict):
        raise UserError(f"row 0: not a mapping of columns ({type(first).__name__})")
    format = detect_format(first.keys(), format)
    chat = {"format": format, "template_sha256": template_sha, "train_on": train_on, "truncation": truncation}
    counts = SequenceCounts()
    kept = list(itertools.islice(_fitted(itertools.chain([first], rows), tokenizer, format, template, train_on,
                                         strict, seq_len, truncation, counts), max_rows))
    if not kept:
        raise SettingError("data", source, "no conversation has a position to train on "
                           f"({_summary(counts, seq_len, truncation)})")
    lengths = np.array([len(ids) for ids, _ in kept], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    input_ids = np.concatenate([ids for ids, _ in kept]).astype(np.int32)
    loss_mask = np.concatenate([mask for _, mask in kept]).astype(bool)
    fp = sequences_fingerprint(input_ids, offsets, loss_mask, chat, seq_len)
    seqs = Sequences(input_ids, offsets, loss_mask, seq_len, fp, canonical, tok_fp, chat, counts, folder)
    log.info("%s: %s", canonical, _summary(counts, seq_len, truncation))
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, arr in zip(_FILES, (input_ids, offsets, loss_mask)):
            with atomic_write(folder / f"{name}.npy") as f:
                np.save(f, arr, allow_pickle=False)
        # written last: a folder without it is an interrupted one, rebuilt by the next run
        atomic_write_json(folder / "meta.json", {"fingerprint": fp, "source": canonical,
                                                 "tokenizer_fingerprint": tok_fp, "seq_len": seq_len, "chat": chat,
                                                 "counts": asdict(counts)})
    return seqs


def _fitted(rows: Iterable[dict], tokenizer: Any, format: str, template: str, train_on: str, strict: bool,
            seq_len: int, truncation: str, counts: SequenceCounts) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rendered rows cut to seq_len + 1 tokens, those without a loss position dropped; counted as they go."""
    chat_counts = ChatCounts()
    for _, sequence in render_rows(rows, tokenizer, format=format, chat_template=template, train_on=train_on,
                                   strict=strict, counts=chat_counts):
        counts.rows, counts.skipped_no_assistant = chat_counts.rows, chat_counts.skipped_no_assistant
        pieces = cut_sequence(sequence.input_ids, sequence.loss_mask, seq_len, truncation)
        if len(sequence) > seq_len + 1:
            counts.too_long += 1
            counts.pieces += len(pieces) if truncation == "split" else 0
        for ids, mask in pieces:
            if not mask[1:].any():
                counts.no_loss += 1
                continue
            counts.sequences += 1
            counts.positions += len(ids) - 1
            counts.loss_positions += int(mask[1:].sum())
            yield ids, mask
    counts.rows, counts.skipped_no_assistant = chat_counts.rows, chat_counts.skipped_no_assistant


def _summary(counts: SequenceCounts, seq_len: int, truncation: str) -> str:
    """One line: what was read, skipped, dropped or cut, and what is kept."""
    parts = [f"{counts.rows:,} rows read"]
    if counts.skipped_no_assistant:
        parts.append(f"{counts.skipped_no_assistant:,} skipped (no assistant turn)")
    if counts.too_long:
        limit = f"seq_len + 1 = {seq_len + 1:,} tokens"
        parts.append({"drop": f"{counts.too_long:,} dropped (longer than {limit})",
                      "right": f"{counts.too_long:,} cut to {limit}",
                      "split": f"{counts.too_long:,} split into {counts.pieces:,} pieces of at most {limit}",
                      }[truncation])
    if counts.no_loss:
        parts.append(f"{counts.no_loss:,} dropped with no loss position left")
    share = counts.loss_positions / counts.positions if counts.positions else 0.0
    return (", ".join(parts) + f"; {counts.sequences:,} sequences, {counts.positions:,} positions, "
            f"{counts.loss_positions:,} with a loss ({share:.1%})")


def _load(folder: Path, source: str, tok_fp: str) -> Sequences:
    meta = json.loads((folder / "meta.json").read_text())
    try:
        arrays = [np.load(folder / f"{name}.npy", allow_pickle=False) for name in _FILES]
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder}: saved sequences unreadable ({exc}); delete the folder to rebuild") from None
    fp = sequences_fingerprint(*arrays, meta["chat"], meta["seq_len"])
    if fp != meta["fingerprint"]:
        raise UserError(f"{folder}: saved sequences do not match their fingerprint; delete the folder to rebuild")
    counts = SequenceCounts(**meta.get("counts", {}))
    # meta["seq_len"] is the limit the rows were fitted to (the setting), not their longest row
    log.info("%s: %s (saved in %s)", source, _summary(counts, meta["seq_len"], meta["chat"]["truncation"]), folder)
    return Sequences(*arrays, meta["seq_len"], fp, source, tok_fp, meta["chat"], counts, folder)
