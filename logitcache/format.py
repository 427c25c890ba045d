"""The cache format: column names, the manifest, its validation, and the cache key.

Nothing else in the package spells a column name or a manifest field; docs/FORMAT.md is the
normative description and this module is its executable form.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa

from logitcache.errors import UserError

FORMAT_NAME = "logitcache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
SHARD_PATTERN = re.compile(r"^shard-(\d{5,9})\.parquet$")

# Columns every shard has, whatever the encoding.
COL_WINDOW_ID = "window_id"          # int64: index of the window in the data's packed windows
COL_INPUT_IDS = "input_ids"          # list<int32>, seq_len + 1 tokens (the last is the final target)
COL_TARGET_LOGPROB = "target_logprob"  # list<float32>, seq_len: teacher log p(actual next token)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def base_schema() -> list[pa.Field]:
    return [pa.field(COL_WINDOW_ID, pa.int64()),
            pa.field(COL_INPUT_IDS, pa.list_(pa.int32())),
            pa.field(COL_TARGET_LOGPROB, pa.list_(pa.float32()))]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def cache_key(teacher: dict, tokenizer: dict, data: dict, k: int, encoding: dict) -> str:
    """sha256 over what determines a cache's content, and nothing else.

    The producer backend and library versions are left out on purpose: the same teacher run by
    vLLM or by transformers over the same windows must land in the same cache.
    """
    identity = {
        "format_version": FORMAT_VERSION,
        "teacher": {f: teacher.get(f) for f in ("name_or_path", "revision", "config_sha256",
                                                 "weights_fingerprint", "dtype")},
        "tokenizer": tokenizer["fingerprint"],
        "data": data["fingerprint"],
        "seq_len": data["seq_len"],
        "k": k,
        "encoding": {"name": encoding["name"], "params": encoding.get("params", {})},
    }
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def cache_dir_name(teacher_name: str, k: int, key: str) -> str:
    """Readable and unique: `<teacher>-k<k>-<key prefix>`; the teacher part is sanitised."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(teacher_name).rstrip("/")).name or "teacher")[:48]
    return f"{slug}-k{k}-{key[:16]}"


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write to a temporary name, fsync, rename, fsync the folder: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


CHECKSUM_FIELD = "manifest_sha256"
_CHECKSUM_PLACEHOLDER = "0" * 64
MANIFEST_FIELDS = frozenset({"format", "format_version", "key", "complete", "k", "rows_per_shard", "num_shards",
                             "teacher", "tokenizer", "data", "encoding", "producer", "shards", CHECKSUM_FIELD})


def _checksum_span(value: str) -> str:
    return f'"{CHECKSUM_FIELD}": "{value}"'


def manifest_bytes(manifest: dict) -> bytes:
    """The manifest's file bytes, sealed: `manifest_sha256` is the sha256 of these very bytes with
    its own 64 hex digits read as zeros, so any changed byte of the file, whitespace included, is
    detectable (a JSON-level hash would miss edits that parse to the same object)."""
    m = dict(manifest)
    m[CHECKSUM_FIELD] = _CHECKSUM_PLACEHOLDER
    text = json.dumps(m, indent=1, sort_keys=True) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    return text.replace(_checksum_span(_CHECKSUM_PLACEHOLDER), _checksum_span(digest), 1).encode()


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    """Seal and atomically replace `cache_dir/manifest.json` (call with the cache's `.lock` held)."""
    path = Path(cache_dir) / MANIFEST_NAME
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(manifest_bytes(manifest))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def manifest_checksum_problem(cache_dir: Path) -> str | None:
    """Why the manifest's bytes do not match its own `manifest_sha256`, or None when they do.

    A manifest without the field (written before it existed) passes only if it holds no unknown
    top-level field, so a flipped byte in the field's own name cannot pass as an old manifest.
    """
    raw = (Path(cache_dir) / MANIFEST_NAME).read_bytes()
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return f"unreadable manifest ({exc.__class__.__name__})"
    if not isinstance(m, dict):
        return "not a JSON object"
    value = m.get(CHECKSUM_FIELD)
    if value is None:
        unknown = sorted(set(m) - MANIFEST_FIELDS)
        return f"unknown field {unknown[0]!r} and no {CHECKSUM_FIELD}" if unknown else None
    if not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
        return f"{CHECKSUM_FIELD} is not 64 hex digits"
    text = raw.decode("utf-8", errors="surrogateescape")
    span = _checksum_span(value)
    if text.count(span) != 1:
        return f"{CHECKSUM_FIELD} mismatch (the file was edited or corrupted)"
    digest = hashlib.sha256(text.replace(span, _checksum_span(_CHECKSUM_PLACEHOLDER))
                            .encode("utf-8", errors="surrogateescape")).hexdigest()
    if digest != value:
        return f"{CHECKSUM_FIELD} mismatch (the file was edited or corrupted)"
    return None


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _require(cond: bool, where: Path, what: str) -> None:
    if not cond:
        raise UserError(f"{where}: invalid manifest: {what}")


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**53


def load_manifest(cache_dir: Path) -> dict:
    """Read and validate a manifest; every path and number in it is checked before use.

    Shards come from strangers: names must match `shard-NNNNN.parquet` (no folders, no `..`, no
    absolute paths) and must not be symbolic links, so a manifest can never make the reader open a
    file outside the cache folder.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST_NAME
    if path.is_symlink():
        raise UserError(f"{path}: manifest is a symbolic link; refusing to follow it")
    if not path.is_file():
        raise UserError(f"{cache_dir}: not a cache (no {MANIFEST_NAME})")
    return parse_manifest(path.read_bytes(), path)


def parse_manifest(data: bytes, path: Path | str) -> dict:
    """Parse and validate manifest bytes read from anywhere (a folder, an object store); `path`
    only names the source in errors. Remote copies go through exactly the local checks."""
    try:
        m = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc.__class__.__name__})") from None
    _require(isinstance(m, dict) and m.get("format") == FORMAT_NAME, path, "not a logitcache manifest")
    version = m.get("format_version")
    _require(isinstance(version, int), path, "format_version missing")
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: format_version {version} is newer than this reader supports "
                        f"({FORMAT_VERSION}); upgrade logitcache")
    _require(version == FORMAT_VERSION, path, f"unsupported format_version {version}")
    for field in ("key", "teacher", "tokenizer", "data", "k", "encoding", "producer", "shards",
                  "rows_per_shard", "num_shards", "complete"):
        _require(field in m, path, f"missing field '{field}'")
    _require(_is_count(m["k"]) and m["k"] >= 1, path, "k must be a positive integer")
    data = m["data"]
    _require(isinstance(data, dict) and _is_count(data.get("seq_len")) and data["seq_len"] >= 1,
             path, "data.seq_len must be a positive integer")
    _require(_is_count(data.get("num_windows")), path, "data.num_windows must be a count")
    _require(_is_count(m["rows_per_shard"]) and m["rows_per_shard"] >= 1, path, "rows_per_shard")
    _require(_is_count(m["num_shards"]), path, "num_shards")
    _require(isinstance(m["encoding"], dict) and isinstance(m["encoding"].get("name"), str),
             path, "encoding.name")
    _require(isinstance(m["shards"], list), path, "shards must be a list")
    seen = set()
    for entry in m["shards"]:
        _require(isinstance(entry, dict), path, "shard entry must be an object")
        name = entry.get("name")
        match = SHARD_PATTERN.match(name) if isinstance(name, str) else None
        _require(match is not None, path, f"shard name {name!r} is not shard-NNNNN.parquet")
        _require(int(match.group(1)) == entry.get("index"), path, f"{name}: index disagrees with name")
        _require(name not in seen, path, f"{name} listed twice")
        seen.add(name)
        for f in ("index", "first_window", "rows", "tokens", "bytes"):
            _require(_is_count(entry.get(f)), path, f"{name}: {f} must be a non-negative integer")
        _require(entry["tokens"] == entry["rows"] * data["seq_len"], path, f"{name}: tokens != rows * seq_len")
        _require(isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]),
                 path, f"{name}: sha256 must be 64 hex digits")
    return m


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

