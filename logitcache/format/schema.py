"""The shard files: their names, the columns every shard has, and opening one safely inside its folder."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from logitcache.errors import UserError

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = re.compile(r"^shard-(\d{5,9})\.parquet$")

# Columns every shard has, whatever the encoding.
COL_WINDOW_ID = "window_id"          # int64: index of the window in the data's packed windows
COL_INPUT_IDS = "input_ids"          # list<int32>, seq_len + 1 tokens (the last is the final target)
COL_TARGET_LOGPROB = "target_logprob"  # list<float32>, seq_len: teacher log p(actual next token)
# sequences layout (2.x): input_ids holds the row's own n tokens; the payload and target_logprob are
# stored at its loss positions only, listed here (ascending, each in 0..n-2)
COL_LOSS_POSITIONS = "loss_positions"  # list<int32>
# packed sequences (3.x): the tokens of each document a row holds, in order (they sum to the row's n)
COL_DOC_LENGTHS = "doc_lengths"  # list<int32>


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


BASE_COLUMNS = (COL_WINDOW_ID, COL_INPUT_IDS, COL_TARGET_LOGPROB, COL_LOSS_POSITIONS, COL_DOC_LENGTHS)


def base_schema(sequences: bool = False, packed: bool = False) -> list[pa.Field]:
    """The columns every shard has, before the encoding's payload columns (`packed`: a sequences
    cache whose rows hold several documents)."""
    fields = [pa.field(COL_WINDOW_ID, pa.int64()),
              pa.field(COL_INPUT_IDS, pa.list_(pa.int32())),
              pa.field(COL_TARGET_LOGPROB, pa.list_(pa.float32()))]
    if sequences:
        fields.append(pa.field(COL_LOSS_POSITIONS, pa.list_(pa.int32())))
    if packed:
        fields.append(pa.field(COL_DOC_LENGTHS, pa.list_(pa.int32())))
    return fields


def packed_row_problem(doc_lengths, tokens: int, loss_positions) -> str | None:
    """What is wrong with a packed row (format 3) of `tokens` tokens, if anything: its documents
    must be of 2 or more tokens and cover it, and no loss position may be a document's last token
    (whose target is the next document's first)."""
    docs = np.asarray(doc_lengths, dtype=np.int64)
    if len(docs) == 0 or docs.min() < 2 or docs.sum() != tokens:
        return f"document lengths {docs.tolist()[:8]} do not cover its {tokens} tokens in pieces of 2 or more"
    if np.isin(np.cumsum(docs)[:-1] - 1, np.asarray(loss_positions)).any():
        return "a loss position at a document's last token"
    return None


def shard_path(cache_dir: Path, entry: dict) -> Path:
    """The file of a validated shard entry, refusing symlinks and anything resolving outside."""
    cache_dir = Path(cache_dir)
    name = entry["name"]
    if not SHARD_PATTERN.match(name):
        raise UserError(f"{cache_dir}: shard name {name!r} is not allowed")
    path = cache_dir / name
    if path.is_symlink():
        raise UserError(f"{path}: shard is a symbolic link; refusing to follow it")
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(cache_dir):
        raise UserError(f"{path}: shard resolves outside the cache folder")
    return path


def open_shard_fd(cache_dir: Path, entry: dict) -> int:
    """Open a shard read-only, never through a symbolic link; UserError if refused or missing."""
    path = shard_path(cache_dir, entry)
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise UserError(f"{path}: shard listed in the manifest is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path}: shard is a symbolic link; refusing to follow it") from None
        raise UserError(f"{path}: cannot open shard ({exc.strerror})") from None
