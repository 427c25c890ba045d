"""Find and stream the Parquet shards of a DistillKit capture: a folder, a glob, or a URL (`hf://`,
`s3://`, `file://`, any fsspec file system), read a row group at a time in about BATCH_BYTES batches.

The layout is told by the columns, in the order DistillKit's `LogprobCompressor.decompress_to_sparse`
tries them: `token_ids` + `top_values` (raw), `packed_indices` + `exact_values` + `coeffs` (legacy),
`compressed_logprobs` + `bytepacked_indices` (compressed). Every file must have the same layout.
The compression config is `--config FILE`, else `compression_config.yaml` beside the shards (in SRC or
in the folder holding them), which is where DistillKit's capture writes it.
"""

from __future__ import annotations

import contextlib
import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.errors import UserError
from logitcache.interop.axolotl_read import BATCH_BYTES
from logitcache.interop.distillkit_config import CONFIG_FILE, Config, load_config, read_config_file
from logitcache.read.urls import filesystem, is_url

RAW, LEGACY, COMPRESSED = "raw", "legacy", "compressed"
LAYOUT_COLUMNS = {RAW: ("token_ids", "top_values"), LEGACY: ("packed_indices", "exact_values", "coeffs"),
                  COMPRESSED: ("compressed_logprobs", "bytepacked_indices")}
OPTIONAL = ("attention_mask", "labels")
MAX_CONFIG_BYTES = 1 << 20
_GLOB = re.compile(r"[*?\[]")


def natural_key(path: str) -> list:
    """Sort `data_2` before `data_10`, as DistillKit numbers its files."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def layout_of(names: list[str]) -> str | None:
    for layout, cols in LAYOUT_COLUMNS.items():
        if all(c in names for c in cols):
            return layout
    return None


@dataclass
class Shards:
    """The capture's files (sorted), the file system they are on (None: local) and where to look for
    its config."""

    src: str
    files: list[str]
    fs: object | None
    folders: list[str]

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[pq.ParquetFile]:
        """The file as a ParquetFile, closed (with its remote handle) on exit."""
        with contextlib.ExitStack() as stack:
            try:
                handle = stack.enter_context(self.fs.open(path, "rb")) if self.fs is not None else path
                pf = stack.enter_context(contextlib.closing(pq.ParquetFile(handle)))
            except Exception as exc:   # noqa: BLE001  an unreadable file is the user's input, not our bug
                raise UserError(f"{path}: unreadable Parquet ({type(exc).__name__}: {str(exc)[:120]})") from None
            yield pf

    def read_text(self, path: str) -> str | None:
        """A small text file next to the shards, or None when it does not exist."""
        try:
            if self.fs is not None:
                if not self.fs.isfile(path):
                    return None
                with self.fs.open(path, "rb") as f:
                    data = f.read(MAX_CONFIG_BYTES + 1)
            else:
                if not Path(path).is_file():
                    return None
                data = Path(path).read_bytes()[:MAX_CONFIG_BYTES + 1]
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc})") from None
        if len(data) > MAX_CONFIG_BYTES:
            raise UserError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a compression config")
        return data.decode("utf-8", errors="replace")


def _glob_folder(pattern: str) -> str:
    """The folder a glob starts from: `dir/data_*.parquet` -> `dir`."""
    prefix = pattern[:_GLOB.search(pattern).start()]
    return prefix.rsplit("/", 1)[0] if "/" in prefix else "."


def find_shards(src: str) -> Shards:
    """The .parquet files of `src` (a file, a folder searched recursively with hidden entries skipped,
    or a glob), local or at a URL, in natural order."""
    src = str(src)
    fs = None
    if is_url(src):
        fs, root = filesystem(src)
        try:
            if _GLOB.search(root):
                files = [p for p in fs.glob(root) if p.endswith(".parquet")]
                folders = [_glob_folder(root)]
            elif fs.isdir(root):
                files = [p for p in fs.find(root) if p.endswith(".parquet") and "/." not in p[len(root):]]
                folders = [root]
            else:
                files, folders = ([root], [root.rsplit("/", 1)[0]]) if fs.isfile(root) else ([], [])
        except Exception as exc:   # noqa: BLE001  every file system has its own errors
            raise UserError(f"{src}: cannot list ({type(exc).__name__}: {str(exc)[:160]})") from None
    else:
        path = Path(src)
        if _GLOB.search(src):
            files = [p for p in glob.glob(src, recursive=True) if p.endswith(".parquet") and Path(p).is_file()]
            folders = [_glob_folder(src)]
        elif path.is_dir():
            files = [str(p) for p in path.rglob("*.parquet") if p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(path).parts)]
            folders = [str(path)]
        elif path.is_file():
            files, folders = [str(path)], [str(path.parent)]
        else:
            raise UserError(f"{src}: no such file, folder or glob")
    if not files:
        raise UserError(f"{src}: no .parquet files")
    files.sort(key=natural_key)
    parents = sorted({f.rsplit("/", 1)[0] if "/" in f else "." for f in files})
    return Shards(src, files, fs, folders + [p for p in parents if p not in folders])


def find_config(shards: Shards, config: str | None) -> tuple[Config | None, str | None]:
    """(config, where it came from): `config` (a file), else compression_config.yaml in SRC or beside the
    shards, else (None, None)."""
    if config is not None:
        return read_config_file(config), str(config)
    for folder in shards.folders:
        path = f"{folder}/{CONFIG_FILE}"
        text = shards.read_text(path)
        if text is not None:
            return load_config(text, path), path
    return None, None


def detect_layout(shards: Shards) -> tuple[str, int]:
    """(the layout every file shares, total rows), from the files' metadata."""
    layout, total = None, 0
    for path in shards.files:
        with shards.open(path) as pf:
            names = pf.schema_arrow.names
            found = layout_of(names)
            if found is None or "input_ids" not in names:
                raise UserError(f"{path}: not a DistillKit capture (columns: {', '.join(names) or 'none'}); expected "
                                "input_ids with compressed_logprobs + bytepacked_indices, packed_indices + "
                                "exact_values + coeffs (legacy), or token_ids + top_values (raw)")
            if layout is not None and found != layout:
                raise UserError(f"{path}: {found} layout, but the files before are {layout}")
            layout = found
            total += pf.metadata.num_rows
    return layout, total


def _batch_rows(pf: pq.ParquetFile, most: int) -> int:
    meta = pf.metadata
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    per_row = max(1, size // max(1, meta.num_rows))
    return int(min(most, max(1, BATCH_BYTES // per_row)))


def iter_batches(shards: Shards, layout: str, most_rows: int = 1024) -> Iterator[tuple[str, int, pa.Table]]:
    """(file, index in the file of the first row, rows) in order, a row group's worth or ~BATCH_BYTES at a
    time, with the columns the layout needs and the optional ones present."""
    wanted = ["input_ids", *LAYOUT_COLUMNS[layout], *OPTIONAL]
    for path in shards.files:
        with shards.open(path) as pf:
            present = [c for c in wanted if c in pf.schema_arrow.names]
            first = 0
            for rb in pf.iter_batches(batch_size=_batch_rows(pf, most_rows), columns=present, use_threads=False):
                yield path, first, pa.Table.from_batches([rb])
                first += rb.num_rows
