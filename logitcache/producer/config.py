"""ProduceConfig: everything one `produce` run needs, validated once, then passed whole."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from logitcache.data.conversations import FORMATS
from logitcache.data.sequences import TRUNCATIONS
from logitcache.data.templates import TRAIN_ON
from logitcache.encodings import DEFAULT_ENCODING
from logitcache.errors import SettingError

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class ProduceConfig:
    """One producer run: which teachers, over which data, into which folder, and how.

    Errors name the field and the value (`k 0: must be at least 1`); the CLI relabels them with
    its flags. Unknown fields are refused by the constructor, as for any dataclass.
    """

    teachers: tuple[str, ...]
    """Teacher checkpoint folders or hub ids; several make a ladder over the same windows."""
    data: str
    """Corpus: a .txt/.jsonl/.parquet file or folder, a hub dataset, or an embedded corpus."""
    out: Path
    """Folder holding the caches (one per teacher) and the shared token windows."""
    k: int = 64
    """Top-k kept per position (for a `topk` payload; a `samples` payload stores S draws instead)."""
    seq_len: int = 512
    """Positions per window."""
    device: str = "cpu"
    dtype: str = "auto"
    """Teacher weights' dtype; log-probs are computed in float32 whatever it is."""
    batch_size: int = 8
    """Windows per forward pass."""
    rows_per_shard: int = 256
    """Windows per Parquet shard."""
    encoding: str = DEFAULT_ENCODING
    encoding_params: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 1
    """Processes splitting each cache's shards; this one takes those with index % num_workers == worker_index."""
    worker_index: int = 0
    text_column: str = "text"
    max_windows: int | None = None
    """Use only the first N windows of the corpus (of chat data: the first N rows cached, after truncation)."""
    backend: str = "auto"
    """hf, vllm, or auto (vllm when installed with CUDA present, else hf)."""
    revision: str | None = None
    trust_remote_code: bool = False
    logits_chunk: int | None = None
    """Positions per LM-head chunk (hf backend); None sizes it from the vocabulary and device."""
    backend_options: dict[str, Any] = field(default_factory=dict)
    """Engine settings of the vllm backend (max_num_batched_tokens, tensor_parallel_size, ...)."""
    engine: str = "local"
    """Where the teacher runs: local, or ray (actors writing into the same cache)."""
    engine_options: dict[str, Any] = field(default_factory=dict)
    """Settings of a non-local engine (ray: actors, address, cpus_per_actor)."""
    progress: bool = True
    """Show a progress bar on stderr."""
    # Chat data (rows of conversations, see logitcache.data.sequences): one row per conversation,
    # top-k stored only at the positions whose next token carries a loss.
    format: str | None = None
    """Chat format of the rows (messages, sharegpt, prompt-completion, text); None detects it.
    Given, the data is read as chat rows even if it would pass for plain text."""
    chat_template: str | None = None
    """A Jinja file (or the template's text itself) rendering the conversations; None: the teacher
    tokenizer's own."""
    train_on: str = "assistant"
    """Which tokens carry a loss: assistant, last-assistant, completion or all (data.templates)."""
    truncation: str = "drop"
    """A conversation longer than seq_len + 1 tokens: drop it, cut it (right), or split it into pieces."""
    strict: bool = False
    """A conversation with no assistant turn to train on is an error instead of skipped and counted."""
    packing: bool = False
    """Chat data: pack consecutive conversations into rows of at most seq_len + 1 tokens, their
    boundaries recorded (data.packing); each is still computed alone."""

    def __post_init__(self) -> None:
        teachers = (self.teachers,) if isinstance(self.teachers, (str, Path)) else tuple(self.teachers)
        object.__setattr__(self, "teachers", tuple(str(t) for t in teachers))
        object.__setattr__(self, "data", str(self.data))
        object.__setattr__(self, "out", Path(self.out))
        if not self.teachers:
            raise SettingError("teacher", None, "give at least one")
        if len(set(self.teachers)) != len(self.teachers):
            raise SettingError("teacher", None, "the same teacher is given twice")
        for name in ("k", "seq_len", "batch_size", "rows_per_shard", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SettingError(name, value, "must be at least 1")
        if not 0 <= self.worker_index < self.num_workers:
            raise SettingError("worker_index", self.worker_index, f"must be in 0..{self.num_workers - 1}")
        for name in ("max_windows", "logits_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingError(name, value, "must be at least 1")
        if self.engine not in ENGINES:
            raise SettingError("engine", self.engine, f"unknown (known: {', '.join(ENGINES)})")
        if self.format is not None and self.format not in FORMATS:
            raise SettingError("format", self.format, f"unknown (known: {', '.join(FORMATS)})")
        if self.train_on not in TRAIN_ON:
            raise SettingError("train_on", self.train_on, f"unknown (known: {', '.join(TRAIN_ON)})")
        if self.truncation not in TRUNCATIONS:
            raise SettingError("truncation", self.truncation, f"unknown (known: {', '.join(TRUNCATIONS)})")
        if self.chat_template is not None:
            object.__setattr__(self, "chat_template", str(self.chat_template))
            if not self.chat_template.strip():
                raise SettingError("chat_template", None, "is empty")

    def replace(self, **changes: Any) -> "ProduceConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return ProduceConfig(**{**values, **changes})
