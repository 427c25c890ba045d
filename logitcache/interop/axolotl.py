"""Export a top-k cache as a dataset axolotl's KD plugin trains on (pre-tokenized rows, one per window).

The layout is the one axolotl's KD trainer reads (src/axolotl/integrations/kd/ in its repository:
`collator.py`, `trainer.py`, `kernels/liger.py`, `chat_template.py`). One row per window of
N = seq_len + 1 tokens:

| column | type | shape | meaning |
|---|---|---|---|
| `input_ids` | list<int32> | N | the window's tokens |
| `attention_mask` | list<int8> | N | all 1 (fixed windows have no padding) |
| `labels` | list<int32> | N | `input_ids`, with `labels[0] = -100` (nothing predicts token 0) |
| `target_token_ids` | list<list<int32>> | N x k | position t: the teacher's top-k for token t + 1 |
| `target_logprobs` | list<list<float32>> | N x k | their log-probs (the cache's, exact) |
| `target_mask` | list<list<int8>> | N x k | 1 at t < N - 1; 0 at the last position (nothing to predict) |

Alignment: axolotl's trainer feeds hidden state t and `target_*[t]` to one loss row, and shifts
`labels` by one for its cross-entropy (`true_labels[:, 1:]`), so `target_*[t]` is the distribution of
the *next* token, as a cache's position t is. The last position gets axolotl's collator padding (ids
0, log-prob -1e9, mask 0), so every target list is as long as `input_ids`, which axolotl's packing
collator needs (it concatenates targets of packed rows). A row with `input_ids`, `attention_mask` and
`labels` counts as already tokenized in axolotl (`_is_dataset_already_tokenized`) and is used as is.

A `sequences` cache (rows of their own length, teacher data at loss positions only) exports row by
row at its own length: positions it does not store get that padding with `target_mask` 0, and the
token they would predict gets `labels` -100, which is how axolotl itself masks prompt tokens.

Beside the data, `axolotl_kd.yaml` holds the config axolotl needs (the plugin, `kd_trainer`,
`kd_temperature` 1.0, `sequence_len` N, the dataset's `logprobs_field` and `temperature`) and where the
data came from. docs/interop.md says what the conversion loses (the tail mass).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.errors import UserError
from logitcache.interop.staging import discard, pid_tag, publish, refuse_existing, remove_stale, staging_dir
from logitcache.read.reader import CacheReader

LOG = logging.getLogger(__name__)

DATA_FILE = "train.parquet"          # `datasets` names the split after the file: "train"
CONFIG_FILE = "axolotl_kd.yaml"      # YAML, not JSON: `load_dataset(folder)` would read a .json as data
LOGPROBS_FIELD = "target_logprobs"   # the column axolotl's KD trainer reads; a dataset declares it as logprobs_field
IGNORE_INDEX = -100                  # labels that take no loss (Hugging Face and axolotl convention)
PAD_ID, PAD_LOGPROB = 0, -1e9        # axolotl's collator pads targets this way (it avoids -inf)
COLUMNS = ("input_ids", "attention_mask", "labels", "target_token_ids", LOGPROBS_FIELD, "target_mask")
# Rows per row group: about 4M top-k entries (~36 MB of arrays) whatever seq_len and k, at most 64.
_ENTRIES_PER_GROUP = 1 << 22

SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("attention_mask", pa.list_(pa.int8())),
    ("labels", pa.list_(pa.int32())),
    ("target_token_ids", pa.list_(pa.list_(pa.int32()))),
    (LOGPROBS_FIELD, pa.list_(pa.list_(pa.float32()))),
    ("target_mask", pa.list_(pa.list_(pa.int8()))),
])


def _lists(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """One list per entry of `lengths`, cut from the flat `values` in order."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values if isinstance(values, pa.Array) else pa.array(values))


def _nested(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """[P, k] entries of P positions -> list<list<...>>: one row per entry of `lengths` (positions)."""
    P, k = values.shape
    return _lists(_lists(values.reshape(-1), np.full(P, k)), lengths)


def _renormalized(lps: np.ndarray) -> np.ndarray:
    """What axolotl's chat_template strategy does to teacher log-probs: sum to 1 over the top-k."""
    lp64 = lps.astype(np.float64)
    with np.errstate(invalid="ignore"):   # positions a sequences cache does not store are all -inf
        m = lp64.max(-1, keepdims=True)
        return (lp64 - (m + np.log(np.exp(lp64 - m).sum(-1, keepdims=True)))).astype(np.float32)


def axolotl_rows(batch: dict[str, np.ndarray], renormalize: bool = False) -> pa.Table:
    """One batch of `CacheReader.iter_arrays` -> the rows of the axolotl dataset (module docstring).

    A `sequences` cache's rows keep their own length (`lengths`), and positions it does not store
    (outside `loss_mask`) become axolotl's masked padding with `labels` -100 on the token they predict,
    the way axolotl masks prompts; a windows cache is the case of full lengths and every position."""
    inp = np.asarray(batch["input_ids"], dtype=np.int32)                       # [B, T+1]
    B, N = inp.shape
    lengths = np.asarray(batch.get("lengths", np.full(B, N)), dtype=np.int64)
    stored = np.zeros((B, N), dtype=bool)                                       # position t has a teacher top-k
    stored[:, :-1] = batch.get("loss_mask", True)
    ids = np.asarray(batch["topk_ids"]).astype(np.int32)                       # [B, T, k]
    lps = np.asarray(batch["topk_logprobs"], dtype=np.float32)
    if renormalize:
        lps = _renormalized(lps)
    k = ids.shape[-1]
    pad = np.zeros((B, 1, k))
    ids = np.where(stored[..., None], np.concatenate([ids, pad.astype(np.int32)], axis=1), PAD_ID).astype(np.int32)
    lps = np.where(stored[..., None], np.concatenate([lps, pad.astype(np.float32)], axis=1),
                   np.float32(PAD_LOGPROB)).astype(np.float32)
    labels = np.full((B, N), IGNORE_INDEX, dtype=np.int32)
    # token t + 1 takes a loss when position t is stored; labels[0] stays -100, so axolotl's
    # num_items_in_batch (labels != -100) counts exactly the predicted tokens
    labels[:, 1:] = np.where(stored[:, :-1], inp[:, 1:], IGNORE_INDEX)
    real = np.arange(N) < lengths[:, None]                                      # the row's own tokens
    columns = [
        _lists(inp[real], lengths),
        _lists(np.ones(int(lengths.sum()), dtype=np.int8), lengths),
        _lists(labels[real], lengths),
        _nested(ids[real], lengths),
        _nested(lps[real], lengths),
        _nested(np.repeat(stored[real][:, None], k, axis=1).astype(np.int8), lengths),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _yaml_value(value) -> str:
    """A scalar as YAML: JSON's spelling of strings, numbers, booleans and null is valid YAML."""
    return json.dumps(value)


def config_text(*, out: Path, reader: CacheReader, rows: int, renormalize: bool) -> str:
    """`axolotl_kd.yaml`: the part to merge into an axolotl config, and the provenance."""
    m = reader.manifest
    N = m.seq_len + 1
    lines = [
        "# An axolotl knowledge-distillation dataset written by `logitcache export --to axolotl`.",
        "# Merge `axolotl:` into your axolotl config; `logitcache:` records where the data came from.",
        "# The rows are pre-tokenized (input_ids, attention_mask, labels), so axolotl uses them as they",
        "# are and needs no dataset `type`; logprobs_field and temperature are what axolotl's KD",
        "# chat_template strategy would read, given for completeness. See docs/interop.md.",
        "axolotl:",
        "  plugins:",
        "    - axolotl.integrations.kd.KDPlugin",
        "  kd_trainer: true",
        "  kd_temperature: 1.0",
        # raw log-probs: the top-k terms of the teacher's KL; renormalised: KL between renormalised top-k sets
        f"  kd_normalize_topk: {_yaml_value(renormalize)}",
        f"  sequence_len: {N}",
        "  datasets:",
        f"    - path: {_yaml_value(str(out.resolve()))}",
        "      type: null",
        f"      logprobs_field: {_yaml_value(LOGPROBS_FIELD)}",
        "      temperature: 1.0",
        "logitcache:",
        f"  cache: {_yaml_value(str(reader.path.resolve()))}",
        f"  key: {_yaml_value(m.key)}",
        f"  teacher: {_yaml_value(m.teacher.name_or_path)}",
        f"  vocab_size: {_yaml_value(m.teacher.token_limit)}",
        f"  tokenizer_fingerprint: {_yaml_value(m.tokenizer.fingerprint)}",
        f"  k: {m.k}",
        f"  seq_len: {m.seq_len}",
        f"  layout: {_yaml_value(m.data.layout or 'windows')}",
        f"  rows: {rows}",
        f"  windows_planned: {m.num_windows}",
        f"  encoding: {_yaml_value(m.encoding.name)}",
        f"  logprobs: {_yaml_value('renormalized over the top-k' if renormalize else 'exact (teacher softmax)')}",
        "  temperature: 1.0",
        f"  columns: {_yaml_value(list(COLUMNS))}",
        "  lost: " + _yaml_value("the tail mass (probability outside the top-k), and target_logprob where the "
                                 "next token is outside it"),
    ]
    return "\n".join(lines) + "\n"


def export_axolotl(cache: str | os.PathLike, out: str | os.PathLike, *, renormalize: bool = False,
                   progress: bool = True) -> dict:
    """Write the top-k cache `cache` as an axolotl KD dataset folder `out` (module docstring).

    `out` must not exist; it appears whole or not at all (built as `.<out>.tmp-<pid>` and renamed).
    Constant memory: one row group at a time. `renormalize` shifts each position's top-k log-probs to
    sum to 1 over the top-k (as axolotl's own KD datasets are), which loses the tail for good.
    A `samples` cache has no top-k and is refused. Returns a summary: path, rows, seq_len, k.
    """
    out = Path(out)
    reader = CacheReader(cache)
    if reader.sampled:
        raise UserError(f"{reader.path}: a samples cache (draws and counts, no top-k log-probs) has nothing "
                        "axolotl's KD reads; export a top-k cache")
    if reader.manifest.packed:   # its rows would carry no boundaries there: attention would cross them
        raise UserError(f"{reader.path}: packed rows (several conversations a row) have no boundaries in axolotl's "
                        "rows; export a cache made without --packing (axolotl packs itself)")
    refuse_existing(out, "export")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such folder")
    if not reader.complete:
        LOG.warning("%s: incomplete cache; exporting the %d windows of its %d listed shards (rows follow "
                    "window order, with gaps where shards are missing)", reader.path, reader.num_windows,
                    len(reader.shards))
    remove_stale(out)
    staging = staging_dir(out, pid_tag())
    T, k = reader.seq_len, reader.k
    group = int(np.clip(_ENTRIES_PER_GROUP // max(1, (T + 1) * k), 1, 64))
    rows = 0
    from tqdm import tqdm

    bar = tqdm(total=reader.num_windows, unit="row", desc=f"export {out.name}", file=sys.stderr,
               disable=not progress, leave=False)
    try:
        staging.mkdir()
        with pq.ParquetWriter(staging / DATA_FILE, SCHEMA, compression="zstd", compression_level=3,
                              use_dictionary=False) as writer:
            for batch in reader.iter_arrays(group):
                table = axolotl_rows(batch, renormalize=renormalize)
                writer.write_table(table, row_group_size=table.num_rows)
                rows += table.num_rows
                bar.update(table.num_rows)
        (staging / CONFIG_FILE).write_text(config_text(out=out, reader=reader, rows=rows, renormalize=renormalize))
        publish(staging, out)
    except BaseException:
        discard(staging)
        raise
    finally:
        bar.close()
    LOG.info("%s: %d rows of up to %d tokens, top-%d, for axolotl (config: %s)", out, rows, T + 1, k,
             out / CONFIG_FILE)
    return {"path": str(out), "rows": rows, "seq_len": T, "k": k, "renormalized": renormalize}
