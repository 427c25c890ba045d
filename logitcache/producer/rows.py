"""Shard tables of the `sequences` layout: rows of their own length, payload at loss positions only."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from logitcache import format as fmt
from logitcache.encodings.registry import Encoding
from logitcache.format.payloads import Samples, TopK


def _lists(values: list[np.ndarray], dtype, arrow_type) -> pa.ListArray:
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = np.concatenate(values).astype(dtype, copy=False) if values else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, arrow_type))


def sequences_table(schema: pa.Schema, encoding: Encoding, payload: TopK | Samples, input_ids: list[np.ndarray],
                    loss_positions: list[np.ndarray], *, first_row: int, rows: int, seq_len: int, k: int,
                    token_limit: int | None, doc_lengths: list[np.ndarray] | None = None) -> pa.Table:
    """Check one shard's rows and build its table (see `CacheWriter.write_sequences`).

    `doc_lengths` (a packed cache's, else None) lists each row's documents' tokens: at least 2 each,
    summing to the row's, and no loss position may be a document's last token (its target would be
    the next document's first).

    The codecs are applied row by row, each row being one of their windows of `len(loss_positions[r])`
    positions, so every encoding works unchanged on rows of any length.
    """
    if len(input_ids) != rows or len(loss_positions) != rows:
        raise ValueError(f"rows {first_row}..: {len(input_ids)} sequences and {len(loss_positions)} position "
                         f"lists, expected {rows}")
    ids_name, _ = next(iter(payload.columns().items()))
    flat_ids = np.asarray(payload.columns()[ids_name])
    total = sum(len(p) for p in loss_positions)
    if len(payload.target_logprob) != total or flat_ids.shape != (total, k):
        raise ValueError(f"rows {first_row}..: the payload holds {len(payload.target_logprob)} positions of "
                         f"{flat_ids.shape[1:]}, the rows list {total} loss positions of ({k},)")
    if flat_ids.size and (flat_ids.min() < 0 or (token_limit is not None and flat_ids.max() >= token_limit)):
        raise ValueError(f"rows {first_row}..: {ids_name} outside 0..{token_limit}")
    for r, (tokens, positions) in enumerate(zip(input_ids, loss_positions)):
        n = len(tokens)
        if not 2 <= n <= seq_len + 1:
            raise ValueError(f"row {first_row + r}: {n} tokens, expected 2..{seq_len + 1}")
        if len(positions) == 0 or positions[0] < 0 or positions[-1] > n - 2 or np.any(np.diff(positions) <= 0):
            raise ValueError(f"row {first_row + r}: loss positions must be ascending, in 0..{n - 2}, at least one")
        problem = None if doc_lengths is None else fmt.packed_row_problem(doc_lengths[r], n, positions)
        if problem:
            raise ValueError(f"row {first_row + r}: {problem}")
    if np.isnan(payload.target_logprob).any() or (isinstance(payload, TopK) and (
            np.isnan(payload.logprobs).any() or np.isnan(payload.tail_logmass).any())):
        raise ValueError(f"rows {first_row}..: NaN in the payload")
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in loss_positions])]).astype(np.int64)
    arrays = [np.asarray(a) for a in payload.columns().values()]
    coded: dict[str, list[pa.Array]] = {}
    for r in range(rows):
        a, b = bounds[r], bounds[r + 1]
        for name, column in encoding.encode(*(x[None, a:b] for x in arrays)).items():
            coded.setdefault(name, []).append(column)
    columns = {
        fmt.COL_WINDOW_ID: pa.array(np.arange(first_row, first_row + rows, dtype=np.int64)),
        fmt.COL_INPUT_IDS: _lists(list(input_ids), np.int32, pa.int32()),
        fmt.COL_TARGET_LOGPROB: _lists([payload.target_logprob[bounds[r]:bounds[r + 1]] for r in range(rows)],
                                       np.float32, pa.float32()),
        fmt.COL_LOSS_POSITIONS: _lists(list(loss_positions), np.int32, pa.int32()),
        **({fmt.COL_DOC_LENGTHS: _lists(list(doc_lengths), np.int32, pa.int32())} if doc_lengths is not None else {}),
        **{name: pa.concat_arrays(parts) for name, parts in coded.items()},
    }
    return pa.Table.from_arrays([columns[f.name].cast(f.type) if columns[f.name].type != f.type else columns[f.name]
                                 for f in schema], schema=schema)
