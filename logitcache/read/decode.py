"""Arrow rows of a shard -> numpy arrays: the one decoder behind `CacheReader` and the `datasets`
transform (logitcache.integrations.datasets)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from logitcache import format as fmt
from logitcache.data.packing import packed_positions
from logitcache.encodings.plain import list_values
from logitcache.encodings.registry import Encoding
from logitcache.errors import UserError


def decode_rows(batch: pa.RecordBatch | pa.Table, encoding: Encoding, k: int, seq_len: int,
                where: str, sequences: bool = False, packed: bool = False) -> dict[str, np.ndarray]:
    """Rows of a shard -> numpy arrays in the stored layout (vectorised, no row loops).

    Every cache gives `window_id` [R] int64, `input_ids` [R, T+1] int32 and `target_logprob` [R, T]
    float32; a `topk` payload adds `topk_ids` [R, T, k] int64, `topk_logprobs` [R, T, k] float32 and
    `tail_logmass` [R, T] float32, a `samples` payload `sample_ids` / `sample_counts` [R, T, S].
    Rows of the wrong length are a UserError naming `where`.

    A `sequences` cache decodes to the same dense arrays, each row padded to `seq_len` positions:
    `input_ids` is 0 past the row's `lengths` [R] tokens, `loss_mask` [R, T] marks the stored
    positions, and elsewhere the payload says nothing (ids 0; log-probs -inf and the whole mass in
    the tail; no draws; target log-prob 0).

    A packed cache (`packed`, format 3) adds `position_ids` and `document_ids` [R, T] int64: positions
    counted from 0 at each document's first token, and each position's document in its row (-1 on the
    padding, whose position ids start from 0 again); see data.packing.packed_positions.
    """
    if sequences:
        return _decode_sequences(batch, encoding, k, seq_len, where, packed)
    T, rows = seq_len, batch.num_rows
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
        if encoding.payload == fmt.PAYLOAD_SAMPLES:
            ids, counts = encoding.decode(columns, k, T)
            if ids.shape != (rows, T, k) or counts.shape != (rows, T, k):
                raise ValueError("sample columns have the wrong length")
            out.update(sample_ids=ids, sample_counts=counts)
            return out
        ids, values, tail = encoding.decode(columns, k, T)
        if ids.shape != (rows, T, k) or values.shape != (rows, T, k) or tail.shape != (rows, T):
            raise ValueError("top-k columns have the wrong length")
    except (KeyError, ValueError, pa.ArrowException) as exc:
        raise UserError(f"{where}: malformed shard data ({exc})") from None
    out.update(topk_ids=ids, topk_logprobs=values, tail_logmass=tail)
    return out


def _decode_sequences(batch: pa.RecordBatch | pa.Table, encoding: Encoding, k: int, seq_len: int,
                      where: str, packed: bool = False) -> dict[str, np.ndarray]:
    T, rows = seq_len, batch.num_rows
    samples = encoding.payload == fmt.PAYLOAD_SAMPLES
    out = {"window_id": np.empty(rows, np.int64), "input_ids": np.zeros((rows, T + 1), np.int32),
           "lengths": np.zeros(rows, np.int64), "loss_mask": np.zeros((rows, T), bool),
           "target_logprob": np.zeros((rows, T), np.float32)}
    if samples:
        out.update(sample_ids=np.zeros((rows, T, k), np.int64), sample_counts=np.zeros((rows, T, k), np.int32))
    else:
        out.update(topk_ids=np.zeros((rows, T, k), np.int64), topk_logprobs=np.full((rows, T, k), -np.inf, np.float32),
                   tail_logmass=np.zeros((rows, T), np.float32))
    try:
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        out["window_id"][:] = table.column(fmt.COL_WINDOW_ID).to_numpy()
        tokens = table.column(fmt.COL_INPUT_IDS).to_pylist()
        positions = table.column(fmt.COL_LOSS_POSITIONS).to_pylist()
        targets = table.column(fmt.COL_TARGET_LOGPROB).to_pylist()
        documents = table.column(fmt.COL_DOC_LENGTHS).to_pylist() if packed else None
        payload_names = [name for name in table.schema.names if name not in fmt.BASE_COLUMNS]
        for r in range(rows):
            n, pos = len(tokens[r]), np.asarray(positions[r], dtype=np.int64)
            if not 2 <= n <= T + 1 or len(pos) == 0 or pos[0] < 0 or pos[-1] > n - 2 or np.any(np.diff(pos) <= 0):
                raise ValueError(f"row {r}: {n} tokens with loss positions outside 0..{n - 2} or unordered")
            if len(targets[r]) != len(pos):
                raise ValueError(f"row {r}: {len(targets[r])} target log-probs for {len(pos)} loss positions")
            problem = None if documents is None else fmt.packed_row_problem(documents[r], n, pos)
            if problem:
                raise ValueError(f"row {r}: {problem}")
            out["input_ids"][r, :n] = tokens[r]
            out["lengths"][r] = n
            out["loss_mask"][r, pos] = True
            out["target_logprob"][r, pos] = targets[r]
            decoded = encoding.decode({name: table.column(name).slice(r, 1) for name in payload_names}, k, len(pos))
            if any(a.shape[:2] != (1, len(pos)) for a in decoded):
                raise ValueError(f"row {r}: payload columns have the wrong length")
            names = ("sample_ids", "sample_counts") if samples else ("topk_ids", "topk_logprobs", "tail_logmass")
            for name, values in zip(names, decoded):
                out[name][r, pos] = values[0]
    except (KeyError, ValueError, TypeError, pa.ArrowException) as exc:
        raise UserError(f"{where}: malformed shard data ({exc})") from None
    if documents is not None:
        out["position_ids"], out["document_ids"] = packed_positions(documents, T)
    return out
