"""Identify a teacher checkpoint and check it against its tokenizer and the requested windows.

`describe_teacher` returns the manifest's `teacher` object without loading any weights:

- `config_sha256`: sha256 of the canonical JSON (sorted keys, no spaces) of `config.json` as
  stored, minus fields that say nothing about the function the model computes
  (`transformers_version`, `_name_or_path`, `_commit_hash`, attention-implementation and output
  flags). The stored file is hashed rather than `config.to_dict()`, whose defaults change with the
  transformers version, so upgrading transformers does not move the cache key.
- `weights_fingerprint`: sha256 over, for each weight file in name order, its name, its size and
  the sha256 of its first and of its last MiB. It reads at most 2 MiB per file, so it takes
  milliseconds on a 100 GB checkpoint, and it changes when weights are retrained (the data in the
  last MiB changes; a safetensors header at the front changes with any shape or dtype). An edit
  confined to the middle of a file that keeps its size is not caught: the fingerprint names a
  checkpoint, it does not authenticate one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from logitcache.errors import SettingError, UserError
from logitcache.format.key import canonical_json

CONFIG_NAME = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
VOLATILE_CONFIG_FIELDS = frozenset({
    "transformers_version", "_name_or_path", "_commit_hash", "_attn_implementation",
    "_attn_implementation_autoset", "attn_implementation", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript",
})
DTYPES = ("float32", "bfloat16", "float16")
_MIB = 1 << 20


def resolve_teacher(name_or_path: str, revision: str | None = None) -> tuple[Path, str | None]:
    """A local folder as is, or a hub model id downloaded once; returns (folder, revision).

    For hub models the returned revision is the resolved commit hash, so `main` moving on later
    gives a new cache key instead of silently mixing two checkpoints under one.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise SettingError("teacher", name_or_path, f"folder has no {CONFIG_NAME}")
        return path, revision
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise SettingError("teacher", name_or_path, "no such model folder")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(name_or_path), revision=revision))
    except Exception as exc:  # offline, unknown id, gated repo: say which teacher
        raise SettingError("teacher", name_or_path, f"not a local folder and not fetchable from the hub "
                        f"({type(exc).__name__})") from None
    if not (folder / CONFIG_NAME).is_file():
        raise SettingError("teacher", name_or_path, f"the hub repository has no {CONFIG_NAME}")
    return folder, folder.name


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((Path(folder) / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder / CONFIG_NAME}: unreadable ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise UserError(f"{folder / CONFIG_NAME}: not a JSON object")
    return config


def config_sha256(config: dict) -> str:
    kept = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_FIELDS}
    return hashlib.sha256(canonical_json(kept).encode()).hexdigest()


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                  and not p.name.startswith(("optimizer", "scheduler", "training_args", "rng_state")))


def weights_fingerprint(files: list[Path]) -> str:
    """sha256 over each file's name, size, sha256(first MiB) and sha256(last MiB); see module doc."""
    h = hashlib.sha256(b"logitcache-weights-v1")
    for path in files:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = hashlib.sha256(f.read(_MIB)).hexdigest()
            f.seek(max(0, size - _MIB))
            tail = hashlib.sha256(f.read(_MIB)).hexdigest()
        h.update(canonical_json([path.name, size, head, tail]).encode())
    return h.hexdigest()


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (no tensor data read).

    A safetensors file is an 8-byte little-endian header length n, n bytes of JSON giving each
    tensor's `data_offsets` into the data that follows, and exactly that data. A file cut short
    anywhere (inside the length, the header or the data: an interrupted download) or padded is a
    UserError naming it, not a struct, JSON or safetensors error from deeper down.
    """
    path = Path(path)
    size = path.stat().st_size

    def corrupt(detail: str) -> UserError:
        return UserError(f"{path}: {detail}; the file looks truncated or corrupt (an interrupted "
                         "download?): re-download it")

    if size < 8:
        raise corrupt(f"{size} bytes, shorter than the 8-byte header length of a safetensors file")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise corrupt(f"{size} bytes, but its header alone is {n} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(f"its {n}-byte header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not isinstance(shape, list) or not all(isinstance(d, int) for d in shape)):
            raise corrupt(f"its header entry {name!r:.60} has no valid shape and data_offsets")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise corrupt(f"{size} bytes, but its header describes {8 + n + end} bytes")
    return header


def check_weight_files(folder: Path) -> None:
    """Every safetensors weight file in `folder` is whole (see read_safetensors_header)."""
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            read_safetensors_header(path)


def _safetensors_parameters(files: list[Path]) -> int | None:
    """Parameter count from safetensors headers (no tensor data read); None for other formats.

    Every safetensors file's header is read and checked against its size first, so a truncated
    download is refused here, the first place the producer reads a weight file's contents.
    """
    headers = [read_safetensors_header(path) for path in files if path.suffix == ".safetensors"]
    if len(headers) != len(files):
        return None
    total = 0
    for header in headers:
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for d in meta["shape"]:
                    count *= d
                total += count
    return total


def _text_config(config: dict) -> dict:
    return config.get("text_config") if isinstance(config.get("text_config"), dict) else config


def resolve_dtype(dtype: str, config: dict) -> str:
    """`auto` means the checkpoint's stored dtype (float32 when the config names none)."""
    if dtype == "auto":
        stored = _text_config(config).get("torch_dtype") or config.get("torch_dtype") or config.get("dtype")
        return stored if stored in DTYPES else "float32"
    if dtype not in DTYPES:
        raise SettingError("dtype", dtype, f"must be one of {', '.join(DTYPES)} or auto")
    return dtype


def max_context(config: dict) -> int | None:
    """The teacher's longest input: max_position_embeddings, or n_positions/n_ctx (GPT-2 style)."""
    cfg = _text_config(config)
    for field in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        if isinstance(cfg.get(field), int):
            return cfg[field]
    return None


def describe_teacher(name_or_path: str, revision: str | None = None, dtype: str = "auto", *,
                     folder: Path | None = None) -> dict:
    """The manifest's `teacher` object; resolves hub ids, reads config and weight-file edges only.

    Local paths are recorded normalised (`a/b/` and `./a/b` are `a/b`) but not made absolute, so a
    command re-run from the same place finds the same cache. Pass `folder` when the checkpoint was
    already resolved with `resolve_teacher` (then `revision` must be the resolved one).
    """
    if folder is None:
        folder, revision = resolve_teacher(name_or_path, revision)
    folder = Path(folder)
    if Path(name_or_path).expanduser().is_dir():
        name_or_path = os.path.normpath(name_or_path)
    config = read_config(folder)
    files = weight_files(folder)
    if not files:
        raise SettingError("teacher", name_or_path, f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    cfg = _text_config(config)
    vocab = cfg.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise SettingError("teacher", name_or_path, f"{CONFIG_NAME} has no vocab_size")
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return {
        "name_or_path": str(name_or_path),
        "revision": revision,
        "architecture": archs[0],
        "dtype": resolve_dtype(dtype, config),
        "num_parameters": _safetensors_parameters(files),
        "config_sha256": config_sha256(config),
        "weights_fingerprint": weights_fingerprint(files),
        "vocab_size": vocab,
        "max_position_embeddings": max_context(config),
    }


def load_tokenizer(path_or_name: str | os.PathLike, trust_remote_code: bool = False):
    """The teacher's tokenizer (fast if available); any failure is a one-line UserError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path_or_name), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UserError(f"{path_or_name}: no usable tokenizer ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def usable_vocab_size(tokenizer, teacher: dict) -> int:
    """Logit columns a cache covers: the tokenizer's ids. A model padded past its tokenizer (Qwen's
    152,064 columns for 151,936 tokens) has columns no text can hold; the backends mask them out,
    so log-probs, tails and draws are over the first `usable_vocab_size` columns only."""
    return min(len(tokenizer), teacher["vocab_size"])


def check_tokenizer_fits(tokenizer, teacher: dict) -> None:
    """Every tokenizer id must be a logit column; a model padded to a larger vocabulary is fine."""
    n = len(tokenizer)
    if n > teacher["vocab_size"]:
        raise SettingError("teacher", teacher['name_or_path'], f"tokenizer has {n} tokens but the model's "
                        f"vocabulary is {teacher['vocab_size']}; they do not belong together")


def check_seq_len(seq_len: int, teacher: dict) -> None:
    """A whole window, `seq_len + 1` tokens, must fit the teacher's context.

    The hf backend feeds only the first `seq_len` tokens, but a prompt-log-prob engine (vLLM) feeds
    the whole window, and one cache key must be producible by either backend.
    """
    ctx = teacher.get("max_position_embeddings")
    if ctx is not None and seq_len + 1 > ctx:
        raise SettingError("seq_len", seq_len, f"a window of seq_len + 1 = {seq_len + 1} tokens is longer "
                        f"than the context of --teacher {teacher['name_or_path']} ({ctx} positions)")


def check_k(k: int, teacher: dict) -> None:
    """1 <= k <= the vocabulary the cache covers (`usable_vocab_size` when known, else `vocab_size`)."""
    vocab = teacher.get("usable_vocab_size") or teacher["vocab_size"]
    if not 1 <= k <= vocab:
        raise SettingError("k", k, f"must be between 1 and the vocabulary size of --teacher "
                        f"{teacher['name_or_path']} ({vocab})")
