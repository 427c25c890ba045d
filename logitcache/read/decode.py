"""Arrow rows of a shard -> numpy arrays: the one decoder behind `CacheReader` and the `datasets`
transform (logitcache.integrations.datasets)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from logitcache import format as fmt
from logitcache.encodings.plain import list_values
from logitcache.encodings.registry import Encoding
from logitcache.errors import UserError


def decode_rows(batch: pa.RecordBatch | pa.Table, encoding: Encoding, k: int, seq_len: int,
                where: str) -> dict[str, np.ndarray]:
    """Rows of a shard -> numpy arrays in the stored layout (vectorised, no row loops).

    Every cache gives `window_id` [R] int64, `input_ids` [R, T+1] int32 and `target_logprob` [R, T]
    float32; a `topk` payload adds `topk_ids` [R, T, k] int64, `topk_logprobs` [R, T, k] float32 and
    `tail_logmass` [R, T] float32, a `samples` payload `sample_ids` / `sample_counts` [R, T, S].
    Rows of the wrong length are a UserError naming `where`.
    """
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
