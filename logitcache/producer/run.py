"""Run one teacher over a cache's missing shards, batch by batch, with a writer thread writing finished shards."""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time

import numpy as np

from logitcache.errors import UserError
from logitcache.format.payloads import concat
from logitcache.producer.writer import CacheWriter

log = logging.getLogger(__name__)

QUEUE_SIZE = 2


def run_shards(model, writer: CacheWriter, tokens: np.ndarray, todo: list[int], batch_size: int, *,
               desc: str = "", progress: bool = True, overlap: bool = True, sample: int = 0) -> None:
    """Compute the shards `todo` batch by batch; a writer thread writes them as they finish.

    The queue holds at most QUEUE_SIZE finished shards, so memory stays bounded when writing is
    slower than computing. An error in the writer thread stops the run and is raised here; on
    Ctrl-C the thread finishes the shard it is writing (it lands complete) and drops the rest.
    With `overlap` off, shards are written in this thread instead (see `_spare_cpu`). With
    `sample` = S > 0 the model's `sample` is called instead of `run` (a `sampled` cache), its
    draws fixed by the cache key and the window ids (see encodings.sampled.window_uniforms).
    """
    from tqdm import tqdm

    from logitcache.producer.claims import ShardClaims

    plan = writer.manifest              # the writer thread replaces writer.manifest as shards land
    rps, seq_len = plan.rows_per_shard, writer.seq_len
    jobs: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
    failure: list[BaseException] = []
    stop = threading.Event()

    def write_loop() -> None:
        while True:
            item = jobs.get()
            if item is None or stop.is_set():
                return
            index, arrays = item
            try:
                writer.write_shard(index, **arrays)
                claims.release(index)
            except BaseException as exc:   # handed to the main thread, which raises it
                failure.append(exc)
                stop.set()
                return

    def put(item) -> None:
        if not overlap:
            if item is not None:
                writer.write_shard(item[0], **item[1])
                claims.release(item[0])
            return
        while True:
            if failure:
                raise _writer_error(writer, failure[0])
            try:
                jobs.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    total = sum(plan.expected_rows(i) for i in todo) * seq_len
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0)
    thread = threading.Thread(target=write_loop, name="logitcache-writer", daemon=True)
    if overlap:
        thread.start()
    start, ok = time.perf_counter(), False
    # another producer on this cache (same command started twice, say) shares the shards: each is
    # claimed before it is computed, and claimed ones are waited for, not computed twice
    claims = ShardClaims(writer.cache_dir)
    try:
        for index in claims.take(todo, writer.completed):
            first, rows = index * rps, plan.expected_rows(index)
            shard = tokens[first:first + rows]                                     # (rows, T+1)
            if sample:
                from logitcache.encodings.sampled import window_uniforms

                parts = [model.sample(shard[s:s + batch_size], sample,
                                      window_uniforms(writer.key, range(first + s, first + min(rows, s + batch_size)),
                                                      seq_len, sample))
                         for s in _batches(rows, batch_size, bar, seq_len, start)]
            else:
                parts = [model.run(shard[s:s + batch_size]) for s in _batches(rows, batch_size, bar, seq_len, start)]
            arrays = writer.payload_arrays(concat(parts), input_ids=shard)
            put((index, arrays))
        put(None)
        if overlap:
            thread.join()
        ok = True
    finally:
        if not ok and overlap:   # interrupted or failed: let the current write land, drop the queued ones
            stop.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    jobs.get_nowait()
            with contextlib.suppress(queue.Full):
                jobs.put_nowait(None)
            thread.join()
        bar.close()
        claims.close()
    if failure:
        raise _writer_error(writer, failure[0])
    claims.sweep(writer.completed())        # claims left on finished shards by killed producers
    if len(claims.written) < len(todo):
        log.warning("%s: %d of %d shards written by this process, the others by another producer of this cache",
                    desc or writer.cache_dir, len(claims.written), len(todo))


def _batches(rows: int, batch_size: int, bar, seq_len: int, start: float):
    """Batch offsets of a shard, advancing the progress bar (tokens/s in the postfix) after each."""
    for s in range(0, rows, batch_size):
        yield s
        bar.update(min(batch_size, rows - s) * seq_len)
        elapsed = time.perf_counter() - start
        if elapsed > 0:
            bar.set_postfix(tok_s=f"{bar.n / elapsed:,.0f}", refresh=False)


def _writer_error(writer: CacheWriter, exc: BaseException) -> BaseException:
    if isinstance(exc, OSError):
        return UserError(f"{writer.cache_dir}: writing a shard failed: {exc.strerror or exc}")
    return exc
