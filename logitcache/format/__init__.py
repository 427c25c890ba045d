"""The cache format's executable form: the manifest, the shard schema, the cache key, durable writes.

docs/FORMAT.md is the normative description. Nothing outside this package spells a manifest field
or a column name.
"""

from logitcache.format.atomic import (
    atomic_write,
    atomic_write_json,
    fsync_path,
    sha256_file,
)
from logitcache.format.key import cache_dir_name, cache_key, canonical_json
from logitcache.format.lock import LOCK_NAME, manifest_lock
from logitcache.format.manifest import (
    FORMAT_MINOR_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYOUT_SEQUENCES,
    LAYOUT_WINDOWS,
    PAYLOAD_SAMPLES,
    PAYLOAD_TOPK,
    PAYLOADS,
    DataInfo,
    EncodingSpec,
    Manifest,
    ProducerInfo,
    ShardEntry,
    TeacherInfo,
    TokenizerInfo,
    expected_rows,
    format_version_of,
    load_manifest,
    parse_manifest,
)
from logitcache.format.schema import (
    BASE_COLUMNS,
    COL_DOC_LENGTHS,
    COL_INPUT_IDS,
    COL_LOSS_POSITIONS,
    COL_TARGET_LOGPROB,
    COL_WINDOW_ID,
    MANIFEST_NAME,
    SHARD_PATTERN,
    base_schema,
    open_shard_fd,
    packed_row_problem,
    shard_name,
    shard_path,
)
from logitcache.format.seal import (
    CHECKSUM_FIELD,
    MANIFEST_FIELDS,
    manifest_bytes,
    manifest_checksum_problem,
    write_manifest,
)

__all__ = [
    "atomic_write", "atomic_write_json", "fsync_path", "sha256_file", "cache_dir_name", "cache_key",
    "canonical_json", "LOCK_NAME", "manifest_lock", "CHECKSUM_FIELD", "FORMAT_MINOR_VERSION", "FORMAT_NAME",
    "FORMAT_VERSION", "MANIFEST_FIELDS", "MANIFEST_NAME", "PAYLOAD_SAMPLES", "PAYLOAD_TOPK", "PAYLOADS", "DataInfo",
    "EncodingSpec", "Manifest", "ProducerInfo", "ShardEntry", "TeacherInfo", "TokenizerInfo", "expected_rows",
    "load_manifest", "manifest_bytes", "manifest_checksum_problem", "parse_manifest", "write_manifest",
    "BASE_COLUMNS", "COL_DOC_LENGTHS", "format_version_of",
    "COL_INPUT_IDS", "COL_LOSS_POSITIONS", "LAYOUT_SEQUENCES", "LAYOUT_WINDOWS", "COL_TARGET_LOGPROB",
    "COL_WINDOW_ID", "SHARD_PATTERN", "base_schema", "open_shard_fd", "packed_row_problem",
    "shard_name", "shard_path",
]
