"""Check a cache completely: the manifest's seal, every shard's size, sha256, rows, columns and window ids."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache import format as fmt
from logitcache.encodings import get_encoding
from logitcache.errors import UserError
from logitcache.format.atomic import sha256_file
from logitcache.format.manifest import Manifest

# -- verify ------------------------------------------------------------------------------------


def verify_cache(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Check a cache completely; return `(shard name or "manifest.json", reason)` per problem.

    The manifest must parse and validate; every listed shard must be a regular file (not a
    symbolic link) in the folder with the listed size and sha256 (recomputed, streaming), parse as
    Parquet with the listed row count and the encoding's columns, and hold the window ids its
    entry says. A `complete` manifest must list every planned shard. An empty list means intact.
    Only a folder that does not exist raises (UserError).
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such cache folder")
    try:
        m = Manifest.load(path)
        enc = get_encoding(m.encoding.name, m.encoding.params)
        reader_schema = pa.schema(fmt.base_schema(m.sequences, m.packed) + enc.arrow_fields(m.k, m.seq_len))
    except (UserError, TypeError) as exc:
        return [(fmt.MANIFEST_NAME, str(exc))]
    problems: list[tuple[str, str]] = []
    sealed = fmt.manifest_checksum_problem(path)      # any changed byte of the manifest itself
    if sealed:
        problems.append((fmt.MANIFEST_NAME, sealed))
    listed = sorted(e.index for e in m.shards)
    if m.complete and listed != list(range(m.num_shards)):
        problems.append((fmt.MANIFEST_NAME, f"marked complete but lists {len(listed)} of "
                                            f"{m.num_shards} planned shards"))
    for e in sorted(m.shards, key=lambda e: e.index):
        name = e.name
        problem = m.entry_problem(e)
        if problem:
            problems.append((fmt.MANIFEST_NAME, f"{name}: {problem}"))
            continue
        try:
            fd = fmt.open_shard_fd(path, e)
        except UserError as exc:
            reason = str(exc)
            problems.append((name, "missing" if "missing" in reason else reason.split(": ", 1)[-1]))
            continue
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            if size != e.bytes:
                what = "truncated" if size < e.bytes else "size mismatch"
                problems.append((name, f"{what}: {size} bytes, manifest says {e.bytes}"))
                continue
            digest = sha256_file(fd)
            if digest != e.sha256:
                problems.append((name, f"sha256 mismatch: {digest[:16]}..., manifest says {e.sha256[:16]}..."))
                continue
            try:
                f.seek(0)
                pf = pq.ParquetFile(f)
                if pf.metadata.num_rows != e.rows:
                    problems.append((name, f"{pf.metadata.num_rows} rows, manifest says {e.rows}"))
                    continue
                schema = pf.schema_arrow
                missing = [fld.name for fld in reader_schema if schema.get_field_index(fld.name) < 0
                           or schema.field(fld.name).type != fld.type]
                if missing:
                    problems.append((name, f"missing or mistyped columns: {', '.join(missing)}"))
                    continue
                ids = pf.read(columns=[fmt.COL_WINDOW_ID]).column(0).to_numpy()
                if not np.array_equal(ids, np.arange(e.first_window, e.first_window + e.rows)):
                    problems.append((name, "window ids differ from the manifest's range"))
            except (pa.ArrowException, OSError, ValueError) as exc:
                problems.append((name, f"unreadable Parquet ({exc.__class__.__name__})"))
    return problems
