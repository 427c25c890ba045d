"""The cache key (a hash over what determines a cache's content) and the folder name made from it."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from logitcache.format.manifest import LAYOUT_SEQUENCES, format_version_of


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def cache_key(teacher: dict, tokenizer: dict, data: dict, k: int, encoding: dict) -> str:
    """sha256 over what determines a cache's content, and nothing else.

    The producer backend and library versions are left out on purpose: the same teacher run by
    vLLM or by transformers over the same windows must land in the same cache. The teacher's
    `usable_vocab_size` enters only when it is below `vocab_size` (padding columns masked out, which
    changes every value), so the keys of unpadded teachers' caches are what they always were.
    """
    identity = {
        "format_version": format_version_of(data),
        "teacher": {f: teacher.get(f) for f in ("name_or_path", "revision", "config_sha256",
                                                 "weights_fingerprint", "dtype")},
        "tokenizer": tokenizer["fingerprint"],
        "data": data["fingerprint"],
        "seq_len": data["seq_len"],
        "k": k,
        "encoding": {"name": encoding["name"], "params": encoding.get("params", {})},
    }
    if data.get("layout") == LAYOUT_SEQUENCES:    # how the rows were made (template, masks policy)
        identity["chat"] = data.get("chat")
    if data.get("packing") is not None:           # rows grouping several documents (and how)
        identity["packing"] = data["packing"]
    usable = teacher.get("usable_vocab_size")
    if usable is not None and usable != teacher.get("vocab_size"):
        identity["teacher"]["usable_vocab_size"] = usable
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def cache_dir_name(teacher_name: str, k: int, key: str) -> str:
    """Readable and unique: `<teacher>-k<k>-<key prefix>`; the teacher part is sanitised."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(teacher_name).rstrip("/")).name or "teacher")[:48]
    return f"{slug}-k{k}-{key[:16]}"
