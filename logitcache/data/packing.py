"""Packing: several short sequences (conversations, documents) in one row, their boundaries kept.

A row of `sequences` holds one conversation, so a batch of short ones is mostly padding. Packing
groups consecutive sequences into rows of at most `limit + 1` tokens (the `seq_len` setting's
budget; positions = tokens - 1, so a row never has more positions than an unpacked one may), greedily
in order: a sequence goes into the current row if it fits, else it starts the next row (next-fit).
Order is kept, so row r holds the documents `row_starts[r] .. row_starts[r + 1] - 1` and the
grouping is a pure function of the documents' lengths and the limit.

Nothing about a document changes: its tokens and loss mask are where they were in the flat arrays,
only the row boundaries are coarser (`Sequences.offsets` = the documents' offsets at the row starts,
`Sequences.documents` = every document's). A document's first token is never a target (loss_mask
False), so the position before it, the previous document's last token, is never a loss position:
nothing is learnt across a boundary. What a model must add is that attention and position ids do
not cross it either: `packed_positions` gives the position ids (restarting at 0 at each document)
and document ids of a batch of rows for that.

The teacher never sees a packed row: the producer runs each document alone and writes the rows
packed (producer.sequences), so a packed cache's values are exactly its documents' own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from logitcache.data.sequences import Sequences
from logitcache.errors import SettingError

METHOD = "greedy"      # next-fit in document order


def pack_rows(lengths: np.ndarray, max_tokens: int) -> np.ndarray:
    """Row boundaries in documents, (R + 1,) int64: documents of `lengths` tokens grouped in order,
    each row at most `max_tokens` tokens (a longer document is a row of its own)."""
    if max_tokens < 2:
        raise SettingError("seq_len", max_tokens - 1, "must be at least 1 to pack")
    starts, fill = [0], 0
    for j, n in enumerate(np.asarray(lengths, dtype=np.int64).tolist()):
        if fill and fill + n > max_tokens:
            starts.append(j)
            fill = 0
        fill += n
    if len(lengths):
        starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)


def packing_record(max_tokens: int, documents: int) -> dict[str, Any]:
    """The manifest's `data.packing`: how rows were made (part of the cache key)."""
    return {"method": METHOD, "max_tokens": int(max_tokens), "documents": int(documents)}


def pack_sequences(sequences: Sequences) -> Sequences:
    """`sequences` (one document a row) packed into rows of at most `limit + 1` tokens (module doc).

    The fingerprint covers the documents' own and the packing record, so it is equal iff the rows are."""
    if sequences.documents is not None:
        return sequences
    max_tokens = sequences.limit + 1
    row_starts = pack_rows(sequences.lengths, max_tokens)
    record = packing_record(max_tokens, sequences.num_windows)
    h = hashlib.sha256(f"packed|{sequences.fingerprint}|".encode())
    h.update(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
    return replace(sequences, offsets=sequences.offsets[row_starts], documents=sequences.offsets,
                   packing=record, fingerprint=h.hexdigest())


def unpacked(sequences: Sequences) -> Sequences:
    """The documents of packed `sequences` as rows of their own (itself when not packed); document j is
    row j, and its loss positions are the packed ones less the document's start in its row."""
    if sequences.documents is None:
        return sequences
    return replace(sequences, offsets=sequences.documents, documents=None, packing=None)


def row_documents(sequences: Sequences, first: int, count: int) -> range:
    """The documents of rows `first .. first + count - 1`, in order."""
    if sequences.documents is None:
        return range(first, first + count)
    lo, hi = np.searchsorted(sequences.documents, sequences.offsets[[first, first + count]])
    return range(int(lo), int(hi))


def packed_positions(doc_lengths: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Position ids and document ids [R, width] int64 of rows padded to `width` positions.

    Row r's documents have `doc_lengths[r]` tokens each; its positions are its tokens but the last
    (position p reads token p). Position ids count from 0 at each document's first token; document
    ids number the documents 0, 1, ... in the row. The padding after a row's last position is a
    segment of its own: position ids from 0 again (so that a position-ids boundary also marks where
    padding starts) and document id -1.
    """
    pos = np.zeros((len(doc_lengths), width), np.int64)
    doc = np.full((len(doc_lengths), width), -1, np.int64)
    for r, lengths in enumerate(doc_lengths):
        lengths = np.asarray(lengths, dtype=np.int64)
        n = int(lengths.sum()) - 1                                  # positions of the row
        if n > width:
            raise ValueError(f"row {r}: {n} positions do not fit in {width}")
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)[:n]
        pos[r, :n] = np.arange(n) - starts
        doc[r, :n] = np.repeat(np.arange(len(lengths)), lengths)[:n]
        pos[r, n:] = np.arange(width - n)
    return pos, doc
