"""Text in, packed token windows out, with a fingerprint every cache and student can check.

Documents come through `datasets` (local text/jsonl/parquet files or a hub name), are tokenized with
the teacher's tokenizer, joined with EOS in a fixed order and cut into windows of `seq_len + 1`
tokens that overlap by one token, so every one of the `seq_len` positions has its next token.
The windows are written once per (source, tokenizer, seq_len) and shared by every teacher.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from logitcache.data.corpus import iter_documents, resolve_source
from logitcache.data.tokenizer import tokenizer_fingerprint
from logitcache.errors import SettingError, UserError
from logitcache.format.atomic import atomic_write, atomic_write_json


def pack_windows(docs: Iterable[list[int]], eos_id: int, seq_len: int,
                 max_windows: int | None = None) -> np.ndarray:
    """Join documents with EOS after each and cut the stream into [n, seq_len + 1] windows.

    Window i holds stream[i*seq_len : i*seq_len + seq_len + 1]: consecutive windows share one
    token, so no position lacks its target. The partial window at the end is dropped. With
    `max_windows`, documents stop being consumed once that many windows are full.
    """
    pieces, length = [], 0
    needed = None if max_windows is None else max_windows * seq_len + 1
    for ids in docs:
        if ids:
            pieces.append(np.asarray(ids, dtype=np.int32))
            pieces.append(np.asarray([eos_id], dtype=np.int32))
            length += len(ids) + 1
            if needed is not None and length >= needed:
                break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    n = (len(stream) - 1) // seq_len if len(stream) > 1 else 0
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        return np.zeros((0, seq_len + 1), dtype=np.int32)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx]


def _tokenize_in_batches(tokenizer, texts: Iterable[str], batch: int = 64) -> Iterator[list[int]]:
    """Tokenize documents a batch at a time: fast tokenizers run a batch on all cores."""
    pending: list[str] = []
    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            yield from tokenizer(pending, add_special_tokens=False)["input_ids"]
            pending = []
    if pending:
        yield from tokenizer(pending, add_special_tokens=False)["input_ids"]


def windows_fingerprint(windows: np.ndarray) -> str:
    """sha256 of the windows' int32 little-endian bytes and shape: equal iff the token data is equal."""
    arr = np.ascontiguousarray(windows, dtype="<i4")
    h = hashlib.sha256(f"windows{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Windows:
    """Packed token windows: `tokens` [n, seq_len + 1] int32, shared by every teacher of a tokenizer."""

    tokens: np.ndarray
    seq_len: int
    fingerprint: str
    source: str
    tokenizer_fingerprint: str
    path: Path | None = None

    @property
    def num_windows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tokens(self) -> int:
        """Predicted positions: seq_len per window."""
        return self.num_windows * self.seq_len


def prepare_windows(source: str, tokenizer, seq_len: int, root: Path | None = None, *,
                    text_column: str = "text", max_windows: int | None = None,
                    home: Path | None = None) -> Windows:
    """Tokenize and pack `source`, or load the windows an earlier run saved under `root/windows`.

    The saved file's name comes from the source, its file contents' sizes, the tokenizer and
    seq_len, so any teacher of the same tokenizer reuses it instead of tokenizing again.
    """
    if seq_len < 1:
        raise SettingError("seq_len", seq_len, "must be at least 1")
    tok_fp = tokenizer_fingerprint(tokenizer)
    files, canonical = resolve_source(source, home)
    spec = {"source": canonical, "text_column": text_column, "tokenizer": tok_fp, "seq_len": seq_len,
            "max_windows": max_windows,
            "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files] if files else None}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    target = Path(root) / "windows" / f"{key}.npy" if root is not None else None
    if target is not None and target.exists():
        meta = json.loads(target.with_suffix(".json").read_text())
        tokens = np.load(target, allow_pickle=False)
        if windows_fingerprint(tokens) != meta["fingerprint"]:
            raise UserError(f"{target}: windows file does not match its fingerprint; delete it to rebuild")
        return Windows(tokens, seq_len, meta["fingerprint"], canonical, tok_fp, target)

    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; documents cannot be joined")
    docs = _tokenize_in_batches(tokenizer, iter_documents(source, text_column, home=home),
                                batch=1 if max_windows is not None else 64)
    tokens = pack_windows(docs, tokenizer.eos_token_id, seq_len, max_windows)
    if len(tokens) == 0:
        raise SettingError("data", source, f"corpus is empty or shorter than one window of "
                        f"{seq_len + 1} tokens")
    fp = windows_fingerprint(tokens)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as f:
            np.save(f, tokens, allow_pickle=False)
        meta = {"fingerprint": fp, "source": canonical, "tokenizer_fingerprint": tok_fp,
                "seq_len": seq_len, "num_windows": int(len(tokens))}
        atomic_write_json(target.with_suffix(".json"), meta)
    return Windows(tokens, seq_len, fp, canonical, tok_fp, target)
