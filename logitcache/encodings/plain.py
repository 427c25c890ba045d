"""Plain encodings: int32 ids and float32 or float16 log-probs, flat per window.

`fp32` is exact (the reference every other codec is measured against); `fp16` halves the values'
bytes at a relative error of ~5e-4 on log-probs. Both store the tail as float32: it is one number
per position and confident positions need it exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from logitcache.encodings.registry import register


def _flat_list(values: np.ndarray, rows: int, arrow_type: pa.DataType) -> pa.Array:
    """[B, ...] -> a list<type> array of B rows without a Python loop."""
    flat = np.ascontiguousarray(values).reshape(rows, -1)
    offsets = np.arange(rows + 1, dtype=np.int32) * flat.shape[1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.reshape(-1), type=arrow_type))


def list_values(column: pa.Array, dtype) -> np.ndarray:
    """Flat values of a list column (chunked or not) as numpy, zero-copy where Arrow allows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)


@dataclass
class _Plain:
    name = "plain"
    payload = "topk"
    value_type = pa.float32()

    def params(self) -> dict:
        return {}

    def arrow_fields(self, k: int, seq_len: int) -> list[pa.Field]:
        return [pa.field("topk_ids", pa.list_(pa.int32())),
                pa.field("topk_logprobs", pa.list_(self.value_type)),
                pa.field("tail_logmass", pa.list_(pa.float32()))]

    def encode(self, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
               tail_logmass: np.ndarray) -> dict[str, pa.Array]:
        rows = topk_ids.shape[0]
        values = topk_logprobs.astype(self.value_type.to_pandas_dtype(), copy=False)
        return {"topk_ids": _flat_list(topk_ids.astype(np.int32, copy=False), rows, pa.int32()),
                "topk_logprobs": _flat_list(values, rows, self.value_type),
                "tail_logmass": _flat_list(tail_logmass.astype(np.float32, copy=False), rows, pa.float32())}

    def decode(self, columns: dict[str, pa.Array], k: int, seq_len: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = list_values(columns["topk_ids"], np.int64).reshape(-1, seq_len, k)
        values = list_values(columns["topk_logprobs"], np.float32).reshape(-1, seq_len, k)
        tail = list_values(columns["tail_logmass"], np.float32).reshape(-1, seq_len)
        return ids, values, tail


@register
class Float32Encoding(_Plain):
    """Exact: int32 ids, float32 log-probs."""

    name = "fp32"
    value_type = pa.float32()


@register
class Float16Encoding(_Plain):
    """int32 ids, float16 log-probs (|error| <= ~5e-4 x |logprob|); float32 tail."""

    name = "fp16"
    value_type = pa.float16()
