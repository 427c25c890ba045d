"""Glue: corpus -> windows -> teacher backend -> CacheWriter, with writing overlapped with compute.

For each teacher, in order:

1. cheap checks for every teacher first (checkpoint and tokenizer present, tokenizer fits the
   model's vocabulary, 1 <= k <= vocabulary, seq_len within the context), so a bad ladder fails
   before anything is written;
2. windows: tokenized and packed once per tokenizer and saved under `out/windows/` (teachers of one
   tokenizer share them);
3. the header and key (docs/FORMAT.md); the cache folder is `out/<teacher>-k<k>-<key[:16]>`;
4. shards already listed complete are skipped, so a re-run resumes; with `num_workers` > 1 this
   process takes the shards `i` with `i % num_workers == worker_index`;
5. the model is loaded only if something is left to do; it runs batch by batch within a shard,
   and each finished shard goes through a queue of two to a writer thread, which encodes,
   compresses and writes it while the next shard's forward passes run.

A shard is only ever renamed into place complete, so Ctrl-C or a kill leaves complete shards and
the next run resumes. Batches never straddle shards, so a shard's numbers do not depend on which
run, worker or resume wrote it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import re
import sys
from pathlib import Path

import numpy as np

from logitcache import format as fmt
from logitcache.backends import make_backend, quiet_libraries, resolve_backend_name
from logitcache.backends.teacher import (
    check_k,
    check_seq_len,
    check_tokenizer_fits,
    describe_teacher,
    load_tokenizer,
    resolve_teacher,
    usable_vocab_size,
)
from logitcache.data import Windows, prepare_windows
from logitcache.encodings import DEFAULT_ENCODING, get_encoding
from logitcache.errors import UserError
from logitcache.produce.run import run_shards
from logitcache.produce.writer import CacheWriter


def produce(teachers: list[str], data: str, out: Path, k: int = 64, seq_len: int = 512, device: str = "cpu",
            dtype: str = "auto", batch_size: int = 8, rows_per_shard: int = 256, encoding: str = DEFAULT_ENCODING,
            num_workers: int = 1, worker_index: int = 0, text_column: str = "text",
            max_windows: int | None = None, backend: str = "auto", *, revision: str | None = None,
            trust_remote_code: bool = False, logits_chunk: int | None = None,
            progress: bool = True, backend_options: dict | None = None,
            encoding_params: dict | None = None, engine: str = "local",
            engine_options: dict | None = None) -> list[Path]:
    """Write one cache per teacher under `out` and return their folders (see the module doc).

    `engine` "ray" runs the teacher on Ray actors (`logitcache.produce.engines.ray`, options such as
    `actors` and `address` in `engine_options`); the cache is the same as a local run's."""
    out = Path(out)
    _check_arguments(teachers, k, seq_len, batch_size, rows_per_shard, num_workers, worker_index,
                     max_windows, logits_chunk)
    if (out / fmt.MANIFEST_NAME).exists():
        raise UserError(f"--out {out}: is a cache folder itself; pass the folder that holds caches")
    backend_name = resolve_backend_name(backend)
    base_encoding = make_encoding(encoding, encoding_params)
    sample = base_encoding.S if encoding == "sampled" else 0
    if sample and backend_name != "hf":
        raise UserError(f"--encoding sampled: needs --backend hf (the {backend_name} backend only returns "
                        "top log-probs, not draws from the full distribution)")
    if sample:
        k = sample          # a sampled cache's k is its S: S slots (distinct ids + counts) per position
    quiet_libraries()

    # 1. Every teacher's cheap checks before anything is written.
    plans = []
    for name in teachers:
        folder, rev = resolve_teacher(name, revision)
        teacher = describe_teacher(name, rev, dtype, folder=folder)
        tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
        check_tokenizer_fits(tokenizer, teacher)
        teacher["usable_vocab_size"] = usable = usable_vocab_size(tokenizer, teacher)
        if usable < teacher["vocab_size"]:
            print(f"{teacher['name_or_path']}: model has {teacher['vocab_size']} logit columns, tokenizer "
                  f"{usable} tokens: columns {usable}..{teacher['vocab_size'] - 1} masked out (their mass "
                  "excluded)", file=sys.stderr)
        check_k(k, teacher)
        check_seq_len(seq_len, teacher)
        plans.append((name, rev, teacher, tokenizer))

    caches = []
    windows_by_tokenizer: dict[str, Windows] = {}
    for position, (name, rev, teacher, tokenizer) in enumerate(plans):
        # 2. Windows, once per tokenizer.
        with _workers_lock(out, num_workers):
            windows = _windows(windows_by_tokenizer, data, tokenizer, seq_len, out, text_column, max_windows)
        # 3. Encoding (fitted on this teacher's windows and vocabulary if it needs corpus statistics),
        #    header, key, folder.
        encoding_info = fit_encoding(base_encoding, windows, teacher["vocab_size"])
        header = build_header(teacher, tokenizer, windows, k, encoding_info, rows_per_shard, text_column,
                              backend_name)
        cache_dir = out / fmt.cache_dir_name(teacher["name_or_path"], k, header["key"])
        # 4. What is left for this worker (a writer is opened early only on an existing cache).
        mine = [i for i in range(header["num_shards"]) if i % num_workers == worker_index]
        writer = CacheWriter(cache_dir, header) if (cache_dir / fmt.MANIFEST_NAME).exists() else None
        todo = [i for i in mine if i not in writer.completed()] if writer is not None else mine
        # 5. Load and run only when there is work.
        backend_args = dict(k=k, device=device, dtype=dtype, revision=rev, trust_remote_code=trust_remote_code,
                            chunk_size=logits_chunk, seq_len=seq_len,
                            usable_vocab=header["teacher"]["usable_vocab_size"], **(backend_options or {}))
        if todo and engine != "local":   # teacher replicas elsewhere, writing through CacheWriter here
            from logitcache.produce.engines import run_engine

            writer = run_engine(engine, backend_name, name, backend_args, header, cache_dir, windows.tokens, todo,
                                batch_size, sample=sample, progress=progress, **(engine_options or {}))
        elif todo:
            model = make_backend(backend_name, name, **backend_args)
            try:
                loaded = model.describe()
                if loaded["vocab_size"] != teacher["vocab_size"]:
                    raise UserError(f"--teacher {name}: config.json says vocab_size {teacher['vocab_size']} "
                                    f"but the LM head has {loaded['vocab_size']} rows")
                header["producer"]["versions"].update(model.versions())
                if header["teacher"]["num_parameters"] is None:   # not safetensors: count after loading
                    header["teacher"]["num_parameters"] = loaded["num_parameters"]
                if writer is None:
                    writer = CacheWriter(cache_dir, header)
                todo = [i for i in todo if i not in writer.completed()]
                run_shards(model, writer, windows.tokens, todo, batch_size,
                           desc=cache_dir.name, progress=progress, sample=sample)
            finally:
                model.close()
                del model
                if position + 1 < len(plans):   # free the weights (cycles too) before the next teacher
                    gc.collect()
        if writer is not None:
            writer.finish()
        caches.append(cache_dir)
    for cache_dir in caches:
        print(cache_dir)
    return caches


def make_encoding(name: str, params: dict | None = None):
    """The named encoding with user parameters; an unknown parameter is a one-line UserError."""
    try:
        return get_encoding(name, params or {})
    except TypeError as exc:   # the constructor's "unexpected keyword argument 'x'"
        found = re.search(r"argument '([^']+)'", str(exc))
        what = found.group(1) if found else ", ".join(sorted(params or {}))
        raise UserError(f"--encoding-param {what}: not a parameter of encoding {name}") from None


def fit_encoding(enc, windows: Windows, vocab_size: int) -> dict:
    """The manifest's `encoding` entry: encodings with `fit` take their corpus statistics (the rank
    table) from the cache's own windows, so the parameters, hence the key, depend on them."""
    if hasattr(enc, "fit"):
        enc = get_encoding(enc.name, enc.fit(windows.tokens, vocab_size))
    return {"name": enc.name, "params": enc.params()}


def build_header(teacher: dict, tokenizer, windows: Windows, k: int, encoding: dict, rows_per_shard: int,
                 text_column: str, backend: str) -> dict:
    """The manifest without `shards`/`complete` (docs/FORMAT.md), with its key."""
    tok = {"fingerprint": windows.tokenizer_fingerprint, "vocab_size": len(tokenizer),
           "eos_token_id": tokenizer.eos_token_id}
    data = {"source": windows.source, "text_column": text_column, "fingerprint": windows.fingerprint,
            "seq_len": windows.seq_len, "num_windows": windows.num_windows, "num_tokens": windows.num_tokens}
    teacher = {**{f: teacher[f] for f in ("name_or_path", "revision", "architecture", "dtype", "num_parameters",
                                          "config_sha256", "weights_fingerprint", "vocab_size",
                                          "max_position_embeddings")},
               "usable_vocab_size": usable_vocab_size(tokenizer, teacher)}   # < vocab_size: padding masked
    return {"key": fmt.cache_key(teacher, tok, data, k, encoding), "k": k, "rows_per_shard": rows_per_shard,
            "num_shards": -(-windows.num_windows // rows_per_shard), "teacher": teacher, "tokenizer": tok,
            "data": data, "encoding": dict(encoding), "producer": {"backend": backend, "versions": _versions()}}


def _windows(memo: dict, data: str, tokenizer, seq_len: int, out: Path, text_column: str,
             max_windows: int | None) -> Windows:
    from logitcache.data import tokenizer_fingerprint

    fp = tokenizer_fingerprint(tokenizer)
    if fp not in memo:
        memo[fp] = prepare_windows(data, tokenizer, seq_len, root=out, text_column=text_column,
                                   max_windows=max_windows)
    return memo[fp]


@contextlib.contextmanager
def _workers_lock(out: Path, num_workers: int):
    """Workers started together must not both tokenize into one windows file: lock `out` itself."""
    if num_workers == 1:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _check_arguments(teachers, k, seq_len, batch_size, rows_per_shard, num_workers, worker_index,
                     max_windows, logits_chunk) -> None:
    if not teachers:
        raise UserError("--teacher: give at least one")
    if len(set(teachers)) != len(teachers):
        raise UserError("--teacher: the same teacher is given twice")
    for flag, value in (("--k", k), ("--seq-len", seq_len), ("--batch-size", batch_size),
                        ("--rows-per-shard", rows_per_shard), ("--num-workers", num_workers)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if not 0 <= worker_index < num_workers:
        raise UserError(f"--worker-index {worker_index}: must be in 0..{num_workers - 1}")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"--max-windows {max_windows}: must be at least 1")
    if logits_chunk is not None and logits_chunk < 1:
        raise UserError(f"--logits-chunk {logits_chunk}: must be at least 1")


def _versions() -> dict[str, str]:
    import pyarrow

    from logitcache import __version__

    return {"logitcache": __version__, "numpy": np.__version__, "pyarrow": pyarrow.__version__}
