"""Typed JSON records: dataclass fields whose JSON values are checked by kind when read."""

from __future__ import annotations

import re
from dataclasses import field, fields
from pathlib import Path
from typing import Any

from logitcache.errors import UserError


def is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**53


KINDS = {
    "str": lambda v: isinstance(v, str),
    "str?": lambda v: v is None or isinstance(v, str),
    "count": is_count,
    "count?": lambda v: v is None or is_count(v),
    "int?": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "dict?": lambda v: v is None or isinstance(v, dict),
    "sha256": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
}


def kind_field(k: str):
    """A dataclass field whose JSON value must be of kind `k` (see KINDS); optional kinds default
    to None, objects to {}."""
    if k == "dict":
        return field(default_factory=dict, metadata={"kind": k})
    if k.endswith("?"):
        return field(default=None, metadata={"kind": k})
    return field(metadata={"kind": k})


def parse_record(cls, d: Any, where: Path | str, name: str):
    """Build a record from a JSON object, checking each known field's kind; unknown keys (written
    by a newer minor version) are ignored."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: invalid manifest: {name} must be an object")
    values = {}
    for f in fields(cls):
        kind = f.metadata["kind"]
        if f.name not in d and kind.endswith("?"):
            continue
        if f.name not in d and kind == "dict":
            continue
        value = d.get(f.name)
        if not KINDS[kind](value):
            raise UserError(f"{where}: invalid manifest: {name}.{f.name} {value!r:.40} is not a valid "
                            f"{kind.rstrip('?')}")
        values[f.name] = value
    return cls(**values)


class Fields:
    """Read-only `record["field"]` access, for code written against the manifest as a plain dict."""

    def __getitem__(self, name: str) -> Any:
        if name not in {f.name for f in fields(self)}:
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default


def record_dict(record) -> dict:
    return {f.name: getattr(record, f.name) for f in fields(record)
            if not (getattr(record, f.name) is None and f.name in getattr(record, "_omit_when_none", ()))}
