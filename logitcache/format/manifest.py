"""The manifest: the only code that reads, validates, seals and writes `manifest.json`.

docs/FORMAT.md is the normative description and this module its executable form.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from logitcache.errors import UserError
from logitcache.format.records import KINDS, Fields, is_count, kind_field, parse_record, record_dict
from logitcache.format.schema import MANIFEST_NAME, SHARD_PATTERN
from logitcache.format.seal import write_manifest

FORMAT_NAME = "logitcache"
FORMAT_VERSION = 3          # the newest major version read and written; readers MUST reject a newer one
FORMAT_MINOR_VERSION = 1    # minor: additive fields only; 1.0 manifests have no `payload`
WINDOWS_FORMAT_VERSION = 1  # fixed-window caches are still written as 1.x, so 1.x readers open them
SEQUENCES_FORMAT_VERSION = 2  # rows of one sequence each are still written as 2.x, so 2.x readers open them
# Rows packing several documents are 3.x: a 2.x reader would ignore their boundaries (unknown fields
# are ignored) and let attention cross them, so it must refuse them instead.
PACKED_FORMAT_VERSION = 3

LAYOUT_WINDOWS = "windows"      # every row a window of seq_len positions, every position stored
LAYOUT_SEQUENCES = "sequences"  # rows of their own length (2.x); only loss positions stored
LAYOUTS = (LAYOUT_WINDOWS, LAYOUT_SEQUENCES)

PAYLOAD_TOPK = "topk"           # top-k ids + log-probs + the tail mass per position
PAYLOAD_SAMPLES = "samples"     # distinct ids + counts of S draws per position
PAYLOADS = (PAYLOAD_TOPK, PAYLOAD_SAMPLES)


def _rows_of_shard(rows_per_shard: int, num_windows: int, index: int) -> int:
    return max(0, min(rows_per_shard, num_windows - index * rows_per_shard))


def expected_rows(manifest: "Manifest | dict", index: int) -> int:
    """Windows held by shard `index` of a manifest (or a header dict): `rows_per_shard`, fewer for the last."""
    return _rows_of_shard(manifest["rows_per_shard"], manifest["data"]["num_windows"], index)


@dataclass(frozen=True)
class TeacherInfo(Fields):
    """Which model made the cache; `usable_vocab_size` < `vocab_size` when logit columns beyond the
    tokenizer's tokens were masked out (a padded vocabulary)."""

    name_or_path: str = kind_field("str")
    revision: str | None = kind_field("str?")
    architecture: str | None = kind_field("str?")
    dtype: str | None = kind_field("str?")
    num_parameters: int | None = kind_field("count?")
    config_sha256: str | None = kind_field("str?")
    weights_fingerprint: str | None = kind_field("str?")
    vocab_size: int | None = kind_field("count?")
    max_position_embeddings: int | None = kind_field("count?")
    usable_vocab_size: int | None = kind_field("count?")

    _omit_when_none = ("usable_vocab_size",)

    @property
    def token_limit(self) -> int | None:
        """Ids a cache of this teacher may hold are below this."""
        return self.usable_vocab_size if self.usable_vocab_size is not None else self.vocab_size


@dataclass(frozen=True)
class TokenizerInfo(Fields):
    fingerprint: str = kind_field("str")
    vocab_size: int | None = kind_field("count?")
    eos_token_id: int | None = kind_field("int?")


@dataclass(frozen=True)
class DataInfo(Fields):
    """The rows a cache covers. `windows` layout: `num_windows` windows of `seq_len` positions each.
    `sequences` layout: `num_windows` rows (conversations or documents) of at most `seq_len`
    positions, of which `loss_tokens` carry a loss and are stored; `chat` says how they were made."""

    fingerprint: str = kind_field("str")
    seq_len: int = kind_field("count")
    num_windows: int = kind_field("count")
    source: str | None = kind_field("str?")
    text_column: str | None = kind_field("str?")
    num_tokens: int | None = kind_field("count?")
    layout: str | None = kind_field("str?")
    loss_tokens: int | None = kind_field("count?")
    chat: dict | None = kind_field("dict?")
    packing: dict | None = kind_field("dict?")
    """Packed rows (3.x): how documents were grouped into rows (`method`, `max_tokens`, `documents`)."""

    _omit_when_none = ("layout", "loss_tokens", "chat", "packing")

    @property
    def sequences(self) -> bool:
        return self.layout == LAYOUT_SEQUENCES

    @property
    def packed(self) -> bool:
        """Rows hold several documents each, with their boundaries (`doc_lengths`)."""
        return self.packing is not None


def format_version_of(data: dict) -> int:
    """The major version a cache of this `data` record is written as: the oldest that reads it."""
    if data.get("packing") is not None:
        return PACKED_FORMAT_VERSION
    return SEQUENCES_FORMAT_VERSION if data.get("layout") == LAYOUT_SEQUENCES else WINDOWS_FORMAT_VERSION


@dataclass(frozen=True)
class EncodingSpec(Fields):
    """The codec of the payload columns, with every parameter its decoder needs."""

    name: str = kind_field("str")
    params: dict = kind_field("dict")


@dataclass(frozen=True)
class ProducerInfo(Fields):
    """What wrote the cache. `source` (imports only) records what was read: the other tool's format,
    layout and settings, what became of its rows, and what it could not tell (docs/interop.md)."""

    backend: str | None = kind_field("str?")
    versions: dict = kind_field("dict")
    source: dict | None = kind_field("dict?")

    _omit_when_none = ("source",)


@dataclass(frozen=True)
class ShardEntry(Fields):
    """One listed shard: its file, its rows (windows first_window..first_window + rows - 1), and
    the size and sha256 its file must have."""

    name: str = kind_field("str")
    index: int = kind_field("count")
    first_window: int = kind_field("count")
    rows: int = kind_field("count")
    tokens: int = kind_field("count")
    bytes: int = kind_field("count")
    sha256: str = kind_field("sha256")

    def to_dict(self) -> dict:
        return record_dict(self)

    @classmethod
    def parse(cls, d: Any, where: Path | str, seq_len: int, sequences: bool = False) -> "ShardEntry":
        if not isinstance(d, dict):
            raise UserError(f"{where}: invalid manifest: shard entry must be an object")
        name = d.get("name")
        match = SHARD_PATTERN.match(name) if isinstance(name, str) else None
        _require(match is not None, where, f"shard name {name!r} is not shard-NNNNN.parquet")
        _require(int(match.group(1)) == d.get("index"), where, f"{name}: index disagrees with name")
        for f in ("index", "first_window", "rows", "tokens", "bytes"):
            _require(is_count(d.get(f)), where, f"{name}: {f} must be a non-negative integer")
        if sequences:   # tokens counts the stored (loss) positions: at most seq_len a row
            _require(d["tokens"] <= d["rows"] * seq_len, where, f"{name}: tokens > rows * seq_len")
        else:
            _require(d["tokens"] == d["rows"] * seq_len, where, f"{name}: tokens != rows * seq_len")
        _require(KINDS["sha256"](d.get("sha256")), where, f"{name}: sha256 must be 64 hex digits")
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def payload_of_encoding(name: str) -> str:
    """The payload a 1.0 manifest implies: its encoding's name was the only sign of sampled draws."""
    return PAYLOAD_SAMPLES if name == "sampled" else PAYLOAD_TOPK


@dataclass(frozen=True)
class Manifest(Fields):
    """A cache's `manifest.json`, validated: what made the cache, what it covers, and its shards.

    `k` is the number of values stored per position: the top-k size for a `topk` payload, the
    number of draws S for a `samples` payload (`topk` and `samples` name it for each). Build one
    with `Manifest.header(...)` (no shards yet), read one with `Manifest.load` / `Manifest.parse`,
    and change one only through `with_shard` / `write`: instances are immutable.
    """

    key: str
    k: int
    rows_per_shard: int
    num_shards: int
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    data: DataInfo
    encoding: EncodingSpec
    producer: ProducerInfo
    payload: str = PAYLOAD_TOPK
    shards: tuple[ShardEntry, ...] = ()
    complete: bool = False
    format_version: int = FORMAT_VERSION
    format_minor_version: int = FORMAT_MINOR_VERSION

    # -- derived ---------------------------------------------------------------------------------

    @property
    def seq_len(self) -> int:
        return self.data.seq_len

    @property
    def sequences(self) -> bool:
        """Rows of their own length with only loss positions stored (layout `sequences`)."""
        return self.data.sequences

    @property
    def packed(self) -> bool:
        """Sequences rows holding several documents each (`doc_lengths`; format 3)."""
        return self.data.packed

    @property
    def num_windows(self) -> int:
        """Windows planned (all of the data's windows)."""
        return self.data.num_windows

    @property
    def topk(self) -> int | None:
        """k of a `topk` payload, else None."""
        return self.k if self.payload == PAYLOAD_TOPK else None

    @property
    def samples(self) -> int | None:
        """S, the draws per position, of a `samples` payload, else None."""
        return self.k if self.payload == PAYLOAD_SAMPLES else None

    def expected_rows(self, index: int) -> int:
        """Windows held by shard `index`: `rows_per_shard`, fewer for the last one."""
        return _rows_of_shard(self.rows_per_shard, self.num_windows, index)

    def entry_problem(self, e: ShardEntry) -> str | None:
        """What is wrong with a (format-valid) shard entry against the plan, if anything."""
        if e.index >= self.num_shards:
            return f"index {e.index} beyond num_shards {self.num_shards}"
        if e.first_window != e.index * self.rows_per_shard:
            return f"first_window {e.first_window} != index * rows_per_shard"
        if e.rows != self.expected_rows(e.index):
            return f"rows {e.rows} != {self.expected_rows(e.index)} planned"
        return None

    def listed(self) -> list[int]:
        return [e.index for e in self.shards]

    def with_shard(self, entry: ShardEntry) -> "Manifest":
        """This manifest with `entry` listed (replacing one of the same index), `complete` updated."""
        shards = sorted([e for e in self.shards if e.index != entry.index] + [entry], key=lambda e: e.index)
        return replace(self, shards=tuple(shards), complete=[e.index for e in shards] == list(range(self.num_shards)))

    def with_completeness(self) -> "Manifest":
        return replace(self, complete=self.listed() == list(range(self.num_shards)))

    def same_plan(self, other: "Manifest") -> bool:
        return (self.key, self.rows_per_shard) == (other.key, other.rows_per_shard)

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON object of the manifest file (without its checksum, added when sealed)."""
        return {"format": FORMAT_NAME, "format_version": self.format_version,
                "format_minor_version": self.format_minor_version, "key": self.key, "k": self.k,
                "payload": self.payload, "rows_per_shard": self.rows_per_shard, "num_shards": self.num_shards,
                "teacher": record_dict(self.teacher), "tokenizer": record_dict(self.tokenizer),
                "data": record_dict(self.data), "encoding": record_dict(self.encoding),
                "producer": record_dict(self.producer), "shards": [e.to_dict() for e in self.shards],
                "complete": self.complete}

    @classmethod
    def from_dict(cls, m: Any, where: Path | str) -> "Manifest":
        """Validate a manifest object field by field; `where` names its source in errors."""
        _require(isinstance(m, dict) and m.get("format") == FORMAT_NAME, where, "not a logitcache manifest")
        version = m.get("format_version")
        _require(isinstance(version, int) and not isinstance(version, bool), where, "format_version missing")
        if version > FORMAT_VERSION:
            raise UserError(f"{where}: format_version {version} is newer than this reader supports "
                            f"({FORMAT_VERSION}); upgrade logitcache")
        _require(version in (WINDOWS_FORMAT_VERSION, SEQUENCES_FORMAT_VERSION, PACKED_FORMAT_VERSION), where,
                 f"unsupported format_version {version}")
        minor = m.get("format_minor_version", 0)
        _require(is_count(minor), where, "format_minor_version must be a count")
        for name in ("key", "teacher", "tokenizer", "data", "k", "encoding", "producer", "shards",
                     "rows_per_shard", "num_shards", "complete"):
            _require(name in m, where, f"missing field '{name}'")
        _require(isinstance(m["key"], str), where, "key must be a string")
        _require(is_count(m["k"]) and m["k"] >= 1, where, "k must be a positive integer")
        data = m["data"]
        _require(isinstance(data, dict) and is_count(data.get("seq_len")) and data["seq_len"] >= 1,
                 where, "data.seq_len must be a positive integer")
        _require(is_count(data.get("num_windows")), where, "data.num_windows must be a count")
        _require(is_count(m["rows_per_shard"]) and m["rows_per_shard"] >= 1, where, "rows_per_shard")
        _require(is_count(m["num_shards"]), where, "num_shards")
        _require(isinstance(m["encoding"], dict) and isinstance(m["encoding"].get("name"), str),
                 where, "encoding.name")
        _require(isinstance(m["complete"], bool), where, "complete must be true or false")
        layout = data.get("layout") or LAYOUT_WINDOWS
        _require(layout in LAYOUTS, where, f"data.layout {layout!r:.40} is not one of {', '.join(LAYOUTS)}")
        _require((layout == LAYOUT_SEQUENCES) == (version >= SEQUENCES_FORMAT_VERSION), where,
                 f"data.layout {layout} needs format_version {2 if layout == LAYOUT_SEQUENCES else 1}")
        packing = data.get("packing")
        _require(packing is None or (isinstance(packing, dict) and layout == LAYOUT_SEQUENCES), where,
                 "data.packing must be an object, of a sequences cache")
        _require((packing is not None) == (version == PACKED_FORMAT_VERSION), where,
                 "data.packing and format_version 3 go together")
        payload = m.get("payload", payload_of_encoding(m["encoding"]["name"]))
        _require(payload in PAYLOADS, where, f"payload {payload!r:.40} is not one of {', '.join(PAYLOADS)}")
        _require(isinstance(m["shards"], list), where, "shards must be a list")
        shards = [ShardEntry.parse(e, where, data["seq_len"], layout == LAYOUT_SEQUENCES) for e in m["shards"]]
        names = [e.name for e in shards]
        for name in names:
            _require(names.count(name) == 1, where, f"{name} listed twice")
        return cls(key=m["key"], k=m["k"], rows_per_shard=m["rows_per_shard"], num_shards=m["num_shards"],
                   teacher=parse_record(TeacherInfo, m["teacher"], where, "teacher"),
                   tokenizer=parse_record(TokenizerInfo, m["tokenizer"], where, "tokenizer"),
                   data=parse_record(DataInfo, data, where, "data"),
                   encoding=parse_record(EncodingSpec, m["encoding"], where, "encoding"),
                   producer=parse_record(ProducerInfo, m["producer"], where, "producer"),
                   payload=payload, shards=tuple(shards), complete=m["complete"],
                   format_version=version, format_minor_version=minor)

    @classmethod
    def parse(cls, raw: bytes, where: Path | str) -> "Manifest":
        """Parse and validate manifest bytes read from anywhere (a folder, an object store); remote
        copies go through exactly the local checks."""
        try:
            m = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise UserError(f"{where}: unreadable manifest ({exc.__class__.__name__})") from None
        return cls.from_dict(m, where)

    @classmethod
    def load(cls, cache_dir: Path | str) -> "Manifest":
        """Read and validate `cache_dir/manifest.json`; every path and number in it is checked.

        Shards come from strangers: names must match `shard-NNNNN.parquet` (no folders, no `..`,
        no absolute paths) and must not be symbolic links, so a manifest can never make a reader
        open a file outside the cache folder.
        """
        cache_dir = Path(cache_dir)
        path = cache_dir / MANIFEST_NAME
        if path.is_symlink():
            raise UserError(f"{path}: manifest is a symbolic link; refusing to follow it")
        if not path.is_file():
            raise UserError(f"{cache_dir}: not a cache (no {MANIFEST_NAME})")
        return cls.parse(path.read_bytes(), path)

    def write(self, cache_dir: Path | str) -> None:
        """Seal and atomically replace `cache_dir/manifest.json` (call with the cache's lock held)."""
        write_manifest(cache_dir, self.to_dict())

    @classmethod
    def header(cls, *, key: str, k: int, rows_per_shard: int, num_shards: int, teacher: dict, tokenizer: dict,
               data: dict, encoding: dict, producer: dict, payload: str = PAYLOAD_TOPK) -> "Manifest":
        """A manifest with no shards yet, from the producer's descriptions (validated as if read)."""
        return cls.from_dict({"format": FORMAT_NAME, "format_version": format_version_of(data),
                              "format_minor_version": FORMAT_MINOR_VERSION, "key": key, "k": k,
                              "payload": payload, "rows_per_shard": rows_per_shard, "num_shards": num_shards,
                              "teacher": teacher, "tokenizer": tokenizer, "data": data, "encoding": encoding,
                              "producer": producer, "shards": [], "complete": num_shards == 0}, "header")


HEADER_FIELDS = ("key", "k", "rows_per_shard", "num_shards", "teacher", "tokenizer", "data", "encoding", "producer",
                 "payload")


def _require(cond: bool, where: Path | str, what: str) -> None:
    if not cond:
        raise UserError(f"{where}: invalid manifest: {what}")


def load_manifest(cache_dir: Path | str) -> dict:
    """The validated manifest of a cache folder as its JSON object (`Manifest.load(...).to_dict()`)."""
    return Manifest.load(cache_dir).to_dict()


def parse_manifest(data: bytes, path: Path | str) -> dict:
    """Validated manifest bytes as a JSON object (`Manifest.parse(...).to_dict()`)."""
    return Manifest.parse(data, path).to_dict()
