"""Glue: corpus -> windows -> teacher backend -> CacheWriter, with writing overlapped with compute.

For each teacher, in order:

1. cheap checks for every teacher first (checkpoint and tokenizer present, tokenizer fits the
   model's vocabulary, 1 <= k <= vocabulary, seq_len within the context), so a bad ladder fails
   before anything is written;
2. windows: tokenized and packed once per tokenizer and saved under `out/windows/` (teachers of one
   tokenizer share them); for chat data (rows of conversations, `data.sequences.is_chat_source`)
   one sequence per conversation instead, rendered with the teacher tokenizer's chat template (or
   `config.chat_template`), once per tokenizer and template, making a `sequences` cache whose
   rows store the payload at their loss positions only (producer.sequences); with `config.packing`
   consecutive conversations share rows (data.packing), each still computed alone;
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
import logging
import os
from pathlib import Path

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
from logitcache.data import (
    Sequences,
    Windows,
    is_chat_source,
    pack_sequences,
    prepare_sequences,
    prepare_windows,
    resolve_template,
    tokenizer_fingerprint,
)
from logitcache.errors import SettingError, UserError
from logitcache.producer.config import ProduceConfig
from logitcache.producer.header import (
    build_header,
    fit_encoding,
    make_encoding,
    with_loaded_model,
)
from logitcache.producer.run import run_shards
from logitcache.producer.sequences import run_sequence_shards
from logitcache.producer.writer import CacheWriter

log = logging.getLogger(__name__)


def produce(config: ProduceConfig) -> list[Path]:
    """Write one cache per teacher under `config.out` and return their folders (see the module doc).

    Messages go to the `logitcache` logger (the CLI prints them on stderr); the progress bar to
    stderr when `config.progress`. With `config.engine` "ray" the teacher runs on Ray actors
    (`logitcache.producer.engines.ray`); the cache is the same as a local run's."""
    out = config.out
    if (out / fmt.MANIFEST_NAME).exists():
        raise SettingError("out", out, "is a cache folder itself; give the folder that holds caches")
    backend_name = resolve_backend_name(config.backend)
    base_encoding = make_encoding(config.encoding, config.encoding_params)
    draws = base_encoding.S if base_encoding.payload == fmt.PAYLOAD_SAMPLES else 0
    if draws and backend_name != "hf":
        raise SettingError("encoding", config.encoding, f"needs --backend hf (the {backend_name} backend only "
                           "returns top log-probs, not draws from the full distribution)")
    values_per_position = draws or config.k     # top-k, or the S draws of a samples payload
    chat = is_chat_source(config.data, config.format)
    template = _chat_settings(config, chat)
    quiet_libraries()

    # 1. Every teacher's cheap checks before anything is written.
    plans = [_check_teacher(name, config, values_per_position, chat, template) for name in config.teachers]

    caches = []
    # windows by tokenizer, sequences by (tokenizer, template)
    data_by_tokenizer: dict[str | tuple, Windows | Sequences] = {}
    for position, (name, rev, teacher, tokenizer) in enumerate(plans):
        # 2. Windows (or a chat corpus's sequences), once per tokenizer (and chat template).
        with _workers_lock(out, config.num_workers):
            if chat:
                windows = _sequences(data_by_tokenizer, tokenizer, config, template)
            else:
                windows = _windows(data_by_tokenizer, tokenizer, config)
        # 3. Encoding (fitted on this teacher's windows and vocabulary if it needs corpus statistics),
        #    header, key, folder.
        encoding_info = fit_encoding(base_encoding, windows, teacher["vocab_size"])
        layout = {"loss_tokens": windows.loss_tokens, "chat": windows.chat, "packing": windows.packing} if chat else {}
        header = build_header(teacher, tokenizer, windows, values_per_position, encoding_info,
                              config.rows_per_shard, None if chat else config.text_column, backend_name,
                              base_encoding.payload, **layout)
        cache_dir = out / fmt.cache_dir_name(teacher["name_or_path"], values_per_position, header.key)
        # 4. What is left for this worker (a writer is opened early only on an existing cache).
        mine = [i for i in range(header.num_shards) if i % config.num_workers == config.worker_index]
        writer = CacheWriter(cache_dir, header) if (cache_dir / fmt.MANIFEST_NAME).exists() else None
        todo = [i for i in mine if i not in writer.completed()] if writer is not None else mine
        # 5. Load and run only when there is work.
        backend_args = dict(k=values_per_position, device=config.device, dtype=config.dtype, revision=rev,
                            trust_remote_code=config.trust_remote_code, chunk_size=config.logits_chunk,
                            seq_len=config.seq_len, usable_vocab=header.teacher.usable_vocab_size,
                            **config.backend_options)
        if todo and config.engine != "local":   # teacher replicas elsewhere, writing through CacheWriter here
            from logitcache.producer.engines import run_engine

            writer = run_engine(config.engine, backend_name, name, backend_args, header, cache_dir, windows.tokens,
                                todo, config.batch_size, sample=draws, progress=config.progress,
                                **config.engine_options)
        elif todo:
            model = make_backend(backend_name, name, **backend_args)
            try:
                header = with_loaded_model(header, model.describe(), model.versions())
                if writer is None:
                    writer = CacheWriter(cache_dir, header)
                todo = [i for i in todo if i not in writer.completed()]
                if chat:
                    run_sequence_shards(model, writer, windows, todo, config.batch_size,
                                        desc=cache_dir.name, progress=config.progress, sample=draws)
                else:
                    run_shards(model, writer, windows.tokens, todo, config.batch_size,
                               desc=cache_dir.name, progress=config.progress, sample=draws)
            finally:
                model.close()
                del model
                if position + 1 < len(plans):   # free the weights (cycles too) before the next teacher
                    gc.collect()
        if writer is not None:
            writer.finish()
        caches.append(cache_dir)
    return caches


def _check_teacher(name: str, config: ProduceConfig, values_per_position: int, chat: bool = False,
                   template: str | None = None) -> tuple:
    """(name, revision, description, tokenizer) of a teacher whose checkpoint, tokenizer, k and
    seq_len can work (and, for chat data, that has a chat template or is given one); the model
    itself is not loaded."""
    folder, rev = resolve_teacher(name, config.revision)
    teacher = describe_teacher(name, rev, config.dtype, folder=folder)
    tokenizer = load_tokenizer(folder, trust_remote_code=config.trust_remote_code)
    check_tokenizer_fits(tokenizer, teacher)
    teacher["usable_vocab_size"] = usable = usable_vocab_size(tokenizer, teacher)
    if usable < teacher["vocab_size"]:
        log.warning("%s: model has %d logit columns, tokenizer %d tokens: columns %d..%d masked out (their mass "
                    "excluded)", teacher["name_or_path"], teacher["vocab_size"], usable, usable,
                    teacher["vocab_size"] - 1)
    check_k(values_per_position, teacher)
    check_seq_len(config.seq_len, teacher)
    if chat and template is None:
        try:
            resolve_template(tokenizer)
        except UserError:
            raise SettingError("chat_template", None, f"the tokenizer of --teacher {name} has none; give a Jinja "
                               "file") from None
    return name, rev, teacher, tokenizer


def _chat_settings(config: ProduceConfig, chat: bool) -> str | None:
    """The chat template's text (None: each teacher tokenizer's own); chat settings on plain text are
    refused, and chat data runs on the local engine only."""
    if not chat:
        given = [(name, getattr(config, name)) for name, default in
                 (("chat_template", None), ("train_on", "assistant"), ("truncation", "drop"), ("strict", False),
                  ("packing", False))
                 if getattr(config, name) != default]
        if given:
            raise SettingError(given[0][0], None if given[0][1] is True else given[0][1],
                               f"applies to chat data only ({config.data} reads as plain documents; --format "
                               "reads rows as conversations)")
        return None
    if config.engine != "local":
        raise SettingError("engine", config.engine, "runs window caches only; chat data needs --engine local")
    if config.chat_template is None:
        return None
    if "{{" in config.chat_template or "{%" in config.chat_template:   # the template's text itself
        return config.chat_template
    try:
        return Path(config.chat_template).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError("chat_template", config.chat_template,
                           f"cannot be read ({getattr(exc, 'strerror', None) or exc})") from None


def _sequences(memo: dict, tokenizer, config: ProduceConfig, template: str | None) -> Sequences:
    """Sequences once per (tokenizer, template): a ladder sharing both renders the corpus once."""
    memo_key = (tokenizer_fingerprint(tokenizer), resolve_template(tokenizer, template))
    if memo_key not in memo:
        memo[memo_key] = prepare_sequences(config.data, tokenizer, config.seq_len, root=config.out,
                                           format=config.format, chat_template=template, train_on=config.train_on,
                                           truncation=config.truncation, strict=config.strict,
                                           max_rows=config.max_windows)
    return pack_sequences(memo[memo_key]) if config.packing else memo[memo_key]


def _windows(memo: dict, tokenizer, config: ProduceConfig) -> Windows:
    fp = tokenizer_fingerprint(tokenizer)
    if fp not in memo:
        memo[fp] = prepare_windows(config.data, tokenizer, config.seq_len, root=config.out,
                                   text_column=config.text_column, max_windows=config.max_windows)
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
