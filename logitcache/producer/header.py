"""A cache's manifest before its first shard: the encoding fitted to the windows, the key, and what
the loaded teacher adds."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from logitcache import format as fmt
from logitcache.backends.teacher import usable_vocab_size
from logitcache.data import Windows
from logitcache.encodings import get_encoding
from logitcache.errors import SettingError
from logitcache.format.manifest import Manifest


def with_loaded_model(header: Manifest, loaded: dict, versions: dict[str, str]) -> Manifest:
    """The header completed by what only the loaded model tells (`loaded`: its `describe()`): library
    versions, and the parameter count when the checkpoint's files did not give it; a head of another
    width is refused."""
    if loaded["vocab_size"] != header.teacher.vocab_size:
        raise SettingError("teacher", header.teacher.name_or_path, f"config.json says vocab_size "
                           f"{header.teacher.vocab_size} but the LM head has {loaded['vocab_size']} rows")
    producer = replace(header.producer, versions={**header.producer.versions, **versions})
    teacher = header.teacher
    if teacher.num_parameters is None:
        teacher = replace(teacher, num_parameters=loaded["num_parameters"])
    return replace(header, producer=producer, teacher=teacher)


def make_encoding(name: str, params: dict | None = None):
    """The named encoding with user parameters; an unknown parameter is a one-line SettingError."""
    try:
        return get_encoding(name, params or {})
    except TypeError as exc:   # the constructor's "unexpected keyword argument 'x'"
        found = re.search(r"argument '([^']+)'", str(exc))
        what = found.group(1) if found else ", ".join(sorted(params or {}))
        raise SettingError("encoding_param", what, f"not a parameter of encoding {name}") from None


def fit_encoding(enc, windows: Windows, vocab_size: int) -> dict:
    """The manifest's `encoding` entry: encodings with `fit` take their corpus statistics (the rank
    table) from the cache's own windows, so the parameters, hence the key, depend on them."""
    if hasattr(enc, "fit"):
        enc = get_encoding(enc.name, enc.fit(windows.tokens, vocab_size))
    return {"name": enc.name, "params": enc.params()}


def build_header(teacher: dict, tokenizer, windows: Windows, k: int, encoding: dict, rows_per_shard: int,
                 text_column: str, backend: str, payload: str = fmt.PAYLOAD_TOPK, *,
                 loss_tokens: int | None = None, chat: dict | None = None, packing: dict | None = None) -> Manifest:
    """The cache's manifest before any shard (docs/FORMAT.md), with its key.

    `windows` is anything with the fields of `logitcache.data.Windows` (source, fingerprint,
    tokenizer_fingerprint, seq_len, num_windows, num_tokens). Giving `loss_tokens` (and `chat`, how
    the rows were made) makes a `sequences` cache: rows of their own length, only the loss
    positions stored; `num_windows` is then its number of rows and `seq_len` its longest row's
    positions. `packing` (data.packing.packing_record) makes those rows packed ones (format 3)."""
    tok = {"fingerprint": windows.tokenizer_fingerprint, "vocab_size": len(tokenizer),
           "eos_token_id": tokenizer.eos_token_id}
    data = {"source": windows.source, "text_column": text_column, "fingerprint": windows.fingerprint,
            "seq_len": windows.seq_len, "num_windows": windows.num_windows, "num_tokens": windows.num_tokens}
    if loss_tokens is not None:
        data.update(layout=fmt.LAYOUT_SEQUENCES, loss_tokens=int(loss_tokens), chat=dict(chat or {}))
        if packing is not None:
            data["packing"] = dict(packing)
    teacher = {**{f: teacher[f] for f in ("name_or_path", "revision", "architecture", "dtype", "num_parameters",
                                          "config_sha256", "weights_fingerprint", "vocab_size",
                                          "max_position_embeddings")},
               "usable_vocab_size": usable_vocab_size(tokenizer, teacher)}   # < vocab_size: padding masked
    return Manifest.header(key=fmt.cache_key(teacher, tok, data, k, encoding), k=k, rows_per_shard=rows_per_shard,
                           num_shards=-(-windows.num_windows // rows_per_shard), teacher=teacher, tokenizer=tok,
                           data=data, encoding=dict(encoding), producer={"backend": backend, "versions": _versions()},
                           payload=payload)


def _versions() -> dict[str, str]:
    import pyarrow

    from logitcache import __version__

    return {"logitcache": __version__, "numpy": np.__version__, "pyarrow": pyarrow.__version__}
