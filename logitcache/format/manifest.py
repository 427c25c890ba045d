"""The manifest: the only code that reads, validates, seals and writes `manifest.json`.

docs/FORMAT.md is the normative description and this module its executable form.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from logitcache.errors import UserError
from logitcache.format.atomic import fsync_path
from logitcache.format.schema import SHARD_PATTERN

FORMAT_NAME = "logitcache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


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


def expected_rows(manifest: dict, index: int) -> int:
    """Windows held by shard `index`: `rows_per_shard`, fewer for the last one."""
    rps, n = manifest["rows_per_shard"], manifest["data"]["num_windows"]
    return max(0, min(rps, n - index * rps))


def entry_problem(m: dict, e: dict) -> str | None:
    """What is wrong with a (format-valid) shard entry against the manifest's plan, if anything."""
    if e["index"] >= m["num_shards"]:
        return f"index {e['index']} beyond num_shards {m['num_shards']}"
    if e["first_window"] != e["index"] * m["rows_per_shard"]:
        return f"first_window {e['first_window']} != index * rows_per_shard"
    if e["rows"] != expected_rows(m, e["index"]):
        return f"rows {e['rows']} != {expected_rows(m, e['index'])} planned"
    return None
