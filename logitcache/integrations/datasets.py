"""Read a cache with Hugging Face `datasets` alone: a transform that decodes any encoding.

Shards are plain Parquet, so `datasets.load_dataset("parquet", ...)` opens them, but coded columns
(`compact`'s byte planes, `sampled`'s gaps and counts) are opaque bytes. `cache_transform` turns them
back into the arrays `CacheReader.read_shard` gives, using the parameters in the manifest::

    ds = datasets.load_dataset("parquet", data_files=sorted(glob.glob(f"{cache}/shard-*.parquet")),
                               split="train")
    ds = ds.with_transform(cache_transform(cache))
    ds[0]["topk_ids"]          # [T, k]; also topk_logprobs [T, k], tail_logmass [T], input_ids [T+1], ...

It decodes exactly as the reader does (logitcache.read.decode), one batch of rows at a time.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from logitcache import format as fmt
from logitcache.encodings import get_encoding
from logitcache.errors import UserError
from logitcache.format.manifest import Manifest
from logitcache.read.decode import decode_rows


def cache_transform(cache: str | os.PathLike | Manifest) -> Callable[[Any], dict[str, np.ndarray]]:
    """A `datasets` transform (for `with_transform` / `set_transform`, or `map(batched=True)`)
    decoding a cache's shard rows; `cache` is the cache folder or its `Manifest`
    (`Manifest.parse(raw_bytes, url)` for a manifest fetched from elsewhere).

    The returned function takes a batch as `datasets` gives it (a dict of column lists) or an Arrow
    table/record batch, and returns numpy arrays, one row per input row: `window_id`, `input_ids`
    [T+1], `target_logprob` [T], and `topk_ids` / `topk_logprobs` [T, k] + `tail_logmass` [T] for a
    top-k cache, or `sample_ids` / `sample_counts` [T, S] for a samples cache.
    """
    manifest = cache if isinstance(cache, Manifest) else Manifest.load(cache)
    try:
        encoding = get_encoding(manifest.encoding.name, manifest.encoding.params)
    except TypeError:
        raise UserError(f"encoding {manifest.encoding.name}: invalid parameters "
                        f"{sorted(manifest.encoding.params)} in the manifest") from None
    schema = pa.schema(fmt.base_schema(manifest.sequences, manifest.packed)
                       + encoding.arrow_fields(manifest.k, manifest.seq_len))

    def transform(batch: Any) -> dict[str, np.ndarray]:
        if isinstance(batch, (pa.Table, pa.RecordBatch)):
            table = batch
        else:
            missing = [f.name for f in schema if f.name not in batch]
            if missing:
                raise UserError(f"datasets batch: missing cache columns {', '.join(missing)} "
                                "(load the shards without selecting or renaming columns)")
            table = pa.Table.from_arrays([pa.array(batch[f.name], type=f.type) for f in schema], schema=schema)
        return decode_rows(table, encoding, manifest.k, manifest.seq_len, f"key {manifest.key[:16]}",
                           manifest.sequences, manifest.packed)

    return transform
