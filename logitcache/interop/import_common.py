"""What every import of another tool's dataset shares: the vocabulary to check ids against, the
teacher it cannot know, the tail and target log-probs computed from a top-k, the encoding fitted
from token counts, and the working folder that makes an import resumable and appear whole.

An import writes its shards through `CacheWriter` into `.<out>.importing` beside `out` (so running
it again resumes, like `produce`) and renames that folder to `out` once every shard is there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from logitcache import format as fmt
from logitcache.backends.teacher import load_tokenizer
from logitcache.backends.vllm import tail_from_topk
from logitcache.data.tokenizer import tokenizer_fingerprint
from logitcache.encodings.bytes import RANK_TABLE_MAX, pack_rank_order
from logitcache.errors import SettingError, UserError
from logitcache.format.manifest import Manifest
from logitcache.interop.staging import discard, publish, staging_dir
from logitcache.producer.writer import CacheWriter

LOG = logging.getLogger(__name__)

UNKNOWN = "unknown"


def vocabulary(vocab_size: int | None, tokenizer: str | os.PathLike | None, default: int | None = None
               ) -> tuple[int, int, dict]:
    """(logit width, usable vocabulary, the manifest's tokenizer entry) from the user's vocabulary size
    and tokenizer; `default` (a format's own vocabulary setting) is the width when neither gives one."""
    if vocab_size is None and tokenizer is None and default is None:
        raise SettingError("vocab_size", None, "give the vocabulary (or --tokenizer PATH): every id read is checked "
                           "against it")
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 1):
        raise SettingError("vocab_size", vocab_size, "must be a positive integer")
    if tokenizer is None:
        width = vocab_size if vocab_size is not None else default
        return width, width, {"fingerprint": UNKNOWN, "vocab_size": width, "eos_token_id": None}
    tok = load_tokenizer(tokenizer)
    n = len(tok)
    if vocab_size is not None and n > vocab_size:
        raise SettingError("vocab_size", vocab_size, f"the tokenizer {tokenizer} has {n} tokens, more than that")
    width = vocab_size if vocab_size is not None else max(n, default or 0)
    return width, min(width, n), {"fingerprint": tokenizer_fingerprint(tok), "vocab_size": n,
                                  "eos_token_id": tok.eos_token_id}


def unknown_teacher(name: str | None, content_sha256: str, width: int, usable: int) -> dict:
    """The manifest's teacher entry of an import: only a name (if given) and the vocabulary are known.
    `weights_fingerprint` is a sha256 of the imported top-k instead, so two imports of different teachers
    over the same tokens never share a cache key."""
    teacher = {"name_or_path": name or UNKNOWN, "revision": None, "architecture": None, "dtype": None,
               "num_parameters": None, "config_sha256": None,
               "weights_fingerprint": f"imported-topk-sha256:{content_sha256}",
               "vocab_size": width, "max_position_embeddings": None}
    if usable < width:
        teacher["usable_vocab_size"] = usable
    return teacher


def versions() -> dict[str, str]:
    import pyarrow

    from logitcache import __version__

    return {"logitcache": __version__, "numpy": np.__version__, "pyarrow": pyarrow.__version__}


def topk_arrays(next_tokens: np.ndarray, ids: np.ndarray, lp64: np.ndarray, vocab: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-probs float32, tail float32, target log-prob float32) of top-k sets [..., k] whose next tokens
    are `next_tokens` [...]. The tail is log(1 - sum exp) in float64 floored at 2^-24, as the vLLM backend
    computes it. The target is exact when the next token is in the top-k; otherwise its log-prob is below
    the last top-k value and below the whole tail, so the smaller of the two bounds it."""
    tail = tail_from_topk(lp64, vocab)
    lps = lp64.astype(np.float32)
    hit = ids == next_tokens[..., None]
    bound = np.minimum(lps[..., -1], tail)
    target = np.where(hit.any(-1), np.where(hit, lps, -np.inf).max(-1), bound).astype(np.float32)
    return lps, tail, target


def fitted_encoding(enc, counts: np.ndarray, vocab: int) -> dict:
    """The manifest's encoding entry. An encoding with a rank table gets the one `enc.fit(tokens)` would
    compute (ids by descending count, ties by id: encodings.bytes.fit_rank_order), built from token
    counts so the tokens never have to be in memory at once."""
    if not hasattr(enc, "fit"):
        return {"name": enc.name, "params": enc.params()}
    params = dict(enc.fit(np.zeros(0, dtype=np.int64), vocab))
    seen = int((counts > 0).sum())
    params["rank_table"] = pack_rank_order(np.argsort(-counts, kind="stable")[:min(seen, RANK_TABLE_MAX)])
    return {"name": enc.name, "params": params}


def check_out(out: Path) -> None:
    """`out` must be new (or an earlier import's finished cache) inside an existing folder."""
    if out.exists() and not (out / fmt.MANIFEST_NAME).is_file():
        raise UserError(f"{out}: already exists and is not a cache; import writes a new folder")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such folder")


def _staged_key(staging: Path) -> str | None:
    """The key of an earlier import's working folder; None when it holds no readable manifest."""
    try:
        return Manifest.load(staging).key
    except UserError:
        return None


def write_staged(out: Path, header: Manifest, fill: Callable[[CacheWriter], None]) -> Manifest:
    """Write the cache `header` describes to `out` through its working folder: `fill(writer)` writes the
    shards the writer lacks (`writer.completed()`). A finished import of the same key is returned as it
    is; a UserError from `fill` (the input changed, say) removes the working folder."""
    if out.exists():
        existing = Manifest.load(out)
        if existing.key == header.key and existing.complete:
            LOG.info("%s: already holds this import (key %s)", out, header.key[:16])
            return existing
        raise UserError(f"{out}: already holds another cache (key {existing.key[:16]}); import writes a new folder")
    staging = staging_dir(out, "importing")
    if staging.exists() and _staged_key(staging) != header.key:
        LOG.info("%s: left by an import of other data; starting over", staging)
        discard(staging)
    writer = CacheWriter(staging, header)
    try:
        fill(writer)
    except UserError:
        discard(staging)    # the input is not what was checked: nothing of it is kept
        raise
    manifest = writer.finish()
    if not manifest.complete:    # cannot happen unless shards vanished under us; never publish a partial cache
        raise UserError(f"{staging}: incomplete after the import; run it again")
    publish(staging, out)
    return Manifest.load(out)
