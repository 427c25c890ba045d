"""The checks every import applies to a batch of another tool's rows: list columns without nulls,
numbers of the right kind, and errors that name the file, the row and the position in one line."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from logitcache.errors import UserError


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


class RowChecks:
    """One batch of rows; `where` is its file, its rows are numbered within it from `first`."""

    def __init__(self, table: pa.Table, where, first: int):
        self.table, self.where, self.first = table, where, first
        self.n = table.num_rows

    def fail(self, what: str, row: int | None = None, position: int | None = None) -> UserError:
        at = "" if row is None else f" row {self.first + row}" + ("" if position is None else f" position {position}")
        return UserError(f"{self.where}{at}: {what}")

    def column(self, name: str) -> pa.Array | None:
        return self.table.column(name).combine_chunks() if name in self.table.column_names else None

    def lists(self, col: pa.Array, name: str) -> tuple[np.ndarray, pa.Array]:
        """Per-row list lengths and the flattened values of a list column without nulls."""
        if not is_list(col.type):
            raise self.fail(f"column {name} holds {col.type}, not lists")
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise self.fail(f"{name} is missing (null)", row)
        return pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64), col.flatten()

    def numbers(self, values: pa.Array, name: str, integer: bool, integers: str = "integers") -> np.ndarray:
        """The values as numpy: integers (or any numbers), no nulls."""
        t = values.type
        if pa.types.is_null(t) and len(values) == 0:     # lists that are all empty: no type to infer
            return np.zeros(0, dtype=np.int64 if integer else np.float64)
        if not (pa.types.is_integer(t) or (not integer and pa.types.is_floating(t))):
            raise self.fail(f"{name} holds {t}, not {integers if integer else 'numbers'}")
        if values.null_count:
            raise self.fail(f"{name} holds null entries")
        return values.to_numpy(zero_copy_only=False)
