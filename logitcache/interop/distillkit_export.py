"""Export a top-k cache as a DistillKit offline-distillation dataset (its compressed layout).

OUT/ holds `data_0.parquet`, `data_1.parquet`, ... (256 rows each, the capture writer's `file_max_rows`;
pyarrow's default codec, snappy, as DistillKit writes them), `compression_config.yaml` (the
`DistributionQuantizationConfig` used, as DistillKit's capture writes it) and `distillkit_kd.yaml`
(what to put in a DistillKit training config, and where the data came from). One row per cache row,
N = seq_len + 1 tokens wide, the shape DistillKit's trainer takes with `prepacked: true` (every list
as long as `input_ids`, so rows stack into batches):

| column | type | per row | content |
|---|---|---|---|
| `input_ids` | list<uint64> | N | the row's tokens (0 after a sequences row's end) |
| `attention_mask` | list<int64> | N | 1 on tokens, 0 on padding |
| `labels` | list<int64> | N | `input_ids[t]` where position t is stored, else -100 (the last always) |
| `compressed_logprobs` | list<list<uint8>> | N x logprob_bytes | position t's log-probs (distillkit_codec) |
| `bytepacked_indices` | list<list<uint8>> | N x index_bytes | position t's ids at ceil(log2 d) bits |

Position t holds the distribution of token t + 1, as in DistillKit's captures after packing. The last
position has none (zero bytes, `labels` -100): DistillKit distils position t where `labels[t] >= 0`, so
it is skipped, and `logitcache import --from distillkit` reads these rows back as the same cache.
docs/interop.md says what the conversion loses (the tail; values past the config's k; precision).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.errors import SettingError, UserError
from logitcache.interop import distillkit_codec as codec
from logitcache.interop.distillkit_config import (
    CONFIG_FILE,
    PRESETS,
    CompressionConfig,
    fit_preset,
    read_config_file,
    yaml_text,
)
from logitcache.interop.staging import discard, pid_tag, publish, refuse_existing, remove_stale, staging_dir
from logitcache.read.reader import CacheReader

LOG = logging.getLogger(__name__)

ROWS_PER_FILE = 256
TRAIN_FILE = "distillkit_kd.yaml"
IGNORE_INDEX = -100
LOGPROB_FLOOR = -1e4    # -inf (a probability that underflowed) would make the polynomial fit NaN
_GROUP_BYTES = 32 << 20

SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.uint64())),
    ("attention_mask", pa.list_(pa.int64())),
    ("labels", pa.list_(pa.int64())),
    ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
    ("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
])


@dataclass(frozen=True)
class ExportSettings:
    """`config`: `recommended`, `budget` (DistillKit's README presets, cut to the cache's k) or a YAML file."""

    cache: str | os.PathLike
    out: Path
    config: str = "recommended"
    progress: bool = True


def resolve_config(name: str, reader: CacheReader) -> CompressionConfig:
    """The compression config for this cache; d defaults to the teacher's vocabulary (logit width)."""
    m = reader.manifest
    limit = m.teacher.token_limit
    d = m.teacher.vocab_size or limit
    if name in PRESETS:
        cfg = fit_preset(PRESETS[name](d), reader.k)
        if cfg.k < PRESETS[name](d).k:
            LOG.info("%s config cut to the cache's k = %d (it asks for %d)", name, cfg.k, PRESETS[name](d).k)
        return cfg
    if not Path(name).is_file():
        raise SettingError("config", name, f"neither {' nor '.join(PRESETS)} nor a config file")
    cfg = read_config_file(name)
    if not isinstance(cfg, CompressionConfig):
        raise UserError(f"{name}: a legacy config; export writes DistillKit's current (compressed) layout")
    if cfg.k > reader.k:
        raise UserError(f"{name}: k = {cfg.k}, but the cache holds top-{reader.k}; values past it cannot be made up")
    if limit is not None and cfg.d < limit:
        raise UserError(f"{name}: d = {cfg.d}, but the cache's ids go up to {limit - 1}; d must be >= {limit}")
    return cfg


def _nested(flat: np.ndarray, per_row: int) -> pa.ListArray:
    """[rows * per_row, width] uint8 -> list<list<uint8>>: rows of `per_row` lists of `width` bytes."""
    n, width = flat.shape
    inner = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * width),
                                     pa.array(flat.reshape(-1), pa.uint8()))
    return pa.ListArray.from_arrays(pa.array(np.arange(n // per_row + 1, dtype=np.int32) * per_row), inner)


def _lists(values: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
    B, N = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(B + 1, dtype=np.int32) * N),
                                    pa.array(values.reshape(-1), arrow_type))


def distillkit_rows(batch: dict[str, np.ndarray], cfg: CompressionConfig) -> pa.Table:
    """One batch of `CacheReader.iter_arrays` -> DistillKit rows (module docstring)."""
    inp = np.asarray(batch["input_ids"], dtype=np.int64)                       # [B, N]
    B, N = inp.shape
    T = N - 1
    stored = np.zeros((B, N), dtype=bool)
    stored[:, :T] = batch.get("loss_mask", True)
    real = np.arange(N) < np.asarray(batch.get("lengths", np.full(B, N)))[:, None]
    ids = np.asarray(batch["topk_ids"])[..., :cfg.k]                            # [B, T, k]
    lps = np.asarray(batch["topk_logprobs"], dtype=np.float32)[..., :cfg.k]
    at = stored[:, :T]
    lp_bytes = np.zeros((B, N, cfg.logprob_bytes), dtype=np.uint8)
    ix_bytes = np.zeros((B, N, cfg.index_bytes), dtype=np.uint8)
    lp_bytes[:, :T][at] = codec.encode_logprobs(np.maximum(lps[at], LOGPROB_FLOOR), cfg)
    ix_bytes[:, :T][at] = codec.encode_ids(ids[at], cfg)
    labels = np.where(stored, inp, IGNORE_INDEX)
    columns = [_lists(np.where(real, inp, 0).astype(np.uint64), pa.uint64()),
               _lists(real.astype(np.int64), pa.int64()), _lists(labels, pa.int64()),
               _nested(lp_bytes.reshape(B * N, -1), N), _nested(ix_bytes.reshape(B * N, -1), N)]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def train_config_text(out: Path, reader: CacheReader, cfg: CompressionConfig, rows: int, files: int) -> str:
    """`distillkit_kd.yaml`: the part of a DistillKit training config this dataset needs, and its provenance."""
    import yaml

    m = reader.manifest
    body = {
        "distillkit": {
            "sequence_length": m.seq_len + 1,
            "dataset": {"train_dataset": {"repo_id": str(out.resolve()), "split": "train"}, "prepacked": True},
            "teacher": {"kind": "dataset", "logprob_compressor": cfg.to_dict()},
        },
        "logitcache": {
            "cache": str(reader.path.resolve()), "key": m.key, "teacher": m.teacher.name_or_path,
            "vocab_size": m.teacher.token_limit, "tokenizer_fingerprint": m.tokenizer.fingerprint,
            "cache_k": m.k, "k": cfg.k, "seq_len": m.seq_len, "layout": m.data.layout or "windows", "rows": rows,
            "files": files, "encoding": m.encoding.name, "temperature": 1.0,
            "lost": "the tail mass (probability outside the top-k), ranks past k, exact values past exact_k "
                    "(polynomial fit), target_logprob",
        },
    }
    head = ("# A DistillKit offline-distillation dataset written by `logitcache export --to distillkit`.\n"
            "# Merge `distillkit:` into a DistillKit training config (it needs the model, output_path and\n"
            "# loss_functions too); `logitcache:` records where the data came from. See docs/interop.md.\n")
    return head + yaml.safe_dump(body, sort_keys=False)


def export_distillkit(settings: ExportSettings) -> dict:
    """Write the top-k cache `settings.cache` as a DistillKit dataset folder `settings.out` (module
    docstring). `out` must not exist; it appears whole or not at all. Constant memory: a batch of about
    32 MB of rows at a time. Returns a summary: path, rows, files, seq_len, k, the config."""
    out = Path(settings.out)
    reader = CacheReader(settings.cache)
    if reader.sampled:
        raise UserError(f"{reader.path}: a samples cache (draws and counts, no top-k log-probs) has nothing "
                        "DistillKit's offline teacher reads; export a top-k cache")
    if reader.manifest.packed:   # DistillKit's rows would carry no boundaries: attention would cross them
        raise UserError(f"{reader.path}: packed rows (several conversations a row) have no boundaries in "
                        "DistillKit's rows; export a cache made without --packing")
    cfg = resolve_config(settings.config, reader)
    refuse_existing(out, "export")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such folder")
    if not reader.complete:
        LOG.warning("%s: incomplete cache; exporting the %d rows of its %d listed shards", reader.path,
                    reader.num_windows, len(reader.shards))
    remove_stale(out)
    staging = staging_dir(out, pid_tag())
    N = reader.seq_len + 1
    per_row = N * (cfg.logprob_bytes + cfg.index_bytes + 40)
    group = 1 << int(np.clip(np.log2(max(1, _GROUP_BYTES // per_row)), 0, 6))   # a power of two: files stay whole
    rows = files = 0
    writer = None
    from tqdm import tqdm

    bar = tqdm(total=reader.num_windows, unit="row", desc=f"export {out.name}", file=sys.stderr,
               disable=not settings.progress, leave=False)
    try:
        staging.mkdir()
        for batch in reader.iter_arrays(group):
            if writer is None:
                writer = pq.ParquetWriter(staging / f"data_{files}.parquet", SCHEMA)
                files += 1
            table = distillkit_rows(batch, cfg)
            writer.write_table(table)
            rows += table.num_rows
            bar.update(table.num_rows)
            if rows % ROWS_PER_FILE == 0:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()
            writer = None
        (staging / CONFIG_FILE).write_text(yaml_text(cfg))
        (staging / TRAIN_FILE).write_text(train_config_text(out, reader, cfg, rows, files))
        publish(staging, out)
    except BaseException:
        if writer is not None:
            writer.close()
        discard(staging)
        raise
    finally:
        bar.close()
    LOG.info("%s: %d rows of %d tokens in %d files for DistillKit (%s; config %s)", out, rows, N, files,
             cfg.describe(), out / CONFIG_FILE)
    return {"path": str(out), "rows": rows, "files": files, "seq_len": reader.seq_len, "k": cfg.k,
            "config": cfg.to_dict()}
