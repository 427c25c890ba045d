"""The manifest's seal: `manifest_sha256` covers every byte of the file, and the file is written atomically."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from logitcache.format.atomic import atomic_write
from logitcache.format.schema import MANIFEST_NAME

CHECKSUM_FIELD = "manifest_sha256"
_CHECKSUM_PLACEHOLDER = "0" * 64
# The top-level fields of a 1.0 manifest, the only kind written without a checksum.
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


def write_manifest(cache_dir: Path | str, manifest: dict) -> None:
    """Seal a manifest object and atomically replace `cache_dir/manifest.json` (with the cache's lock held)."""
    with atomic_write(Path(cache_dir) / MANIFEST_NAME) as f:
        f.write(manifest_bytes(manifest))


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
