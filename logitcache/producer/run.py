"""Run one teacher over a cache's missing shards, batch by batch, with a writer thread writing finished shards.

`run_shard_work` is the machinery (claims, the writer thread, progress, errors) for any layout;
`run_shards` computes fixed windows with it, `producer.sequences.run_sequence_shards` conversations."""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from typing import Callable

import numpy as np

from logitcache.errors import UserError
from logitcache.format.payloads import concat
from logitcache.producer.writer import CacheWriter

log = logging.getLogger(__name__)

QUEUE_SIZE = 2


def run_shards(model, writer: CacheWriter, tokens: np.ndarray, todo: list[int], batch_size: int, *,
               desc: str = "", progress: bool = True, overlap: bool = True, sample: int = 0) -> None:
    """Compute the window shards `todo` batch by batch; a writer thread writes them as they finish.

    `tokens` [num_windows, seq_len + 1] are the cache's windows. With `sample` = S > 0 the model's
    `sample` is called instead of `run` (a `sampled` cache), its draws fixed by the cache key and
    the window ids (see encodings.sampled.window_uniforms). The queue, claims, progress and errors
    are `run_shard_work`'s.
    """
    plan = writer.manifest
    rps, seq_len = plan.rows_per_shard, writer.seq_len

    def compute(index: int, advance: Callable[[int], None]) -> Callable[[], object]:
        first, rows = index * rps, plan.expected_rows(index)
        shard = tokens[first:first + rows]                                         # (rows, T+1)
        parts = []
        for s in range(0, rows, batch_size):
            batch = shard[s:s + batch_size]
            if sample:
                from logitcache.encodings.sampled import window_uniforms

                uniforms = window_uniforms(writer.key, range(first + s, first + s + len(batch)), seq_len, sample)
                parts.append(model.sample(batch, sample, uniforms))
            else:
                parts.append(model.run(batch))
            advance(len(batch) * seq_len)
        arrays = writer.payload_arrays(concat(parts), input_ids=shard)
        return lambda: writer.write_shard(index, **arrays)

    total = sum(plan.expected_rows(i) for i in todo) * seq_len
    run_shard_work(writer, todo, compute, total, desc=desc, progress=progress, overlap=overlap)


ShardCompute = Callable[[int, Callable[[int], None]], Callable[[], object]]
"""`compute(index, advance)`: computes shard `index` in the calling thread, calling `advance(n)` as
n tokens of the progress bar are done, and returns the call that writes the shard (run by the
writer thread)."""


def run_shard_work(writer: CacheWriter, todo: list[int], compute: ShardCompute, total_tokens: int, *,
                   desc: str = "", progress: bool = True, overlap: bool = True) -> None:
    """Compute the shards `todo` with `compute` (any layout, see ShardCompute); a writer thread
    writes them as they finish.

    The queue holds at most QUEUE_SIZE finished shards, so memory stays bounded when writing is
    slower than computing. An error in the writer thread stops the run and is raised here; on
    Ctrl-C the thread finishes the shard it is writing (it lands complete) and drops the rest.
    With `overlap` off, shards are written in this thread instead. Another
    producer of the same cache shares the shards through claims (producer.claims).
    """
    from tqdm import tqdm

    from logitcache.producer.claims import ShardClaims

    jobs: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
    failure: list[BaseException] = []
    stop = threading.Event()

    def write_loop() -> None:
        while True:
            item = jobs.get()
            if item is None or stop.is_set():
                return
            index, write = item
            try:
                write()
                claims.release(index)
            except BaseException as exc:   # handed to the main thread, which raises it
                failure.append(exc)
                stop.set()
                return

    def put(item) -> None:
        if not overlap:
            if item is not None:
                item[1]()
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

    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0)
    start = time.perf_counter()

    def advance(n: int) -> None:
        """The progress bar after a batch, tokens/s in its postfix."""
        bar.update(n)
        elapsed = time.perf_counter() - start
        if elapsed > 0:
            bar.set_postfix(tok_s=f"{bar.n / elapsed:,.0f}", refresh=False)

    thread = threading.Thread(target=write_loop, name="logitcache-writer", daemon=True)
    if overlap:
        thread.start()
    ok = False
    # another producer on this cache (same command started twice, say) shares the shards: each is
    # claimed before it is computed, and claimed ones are waited for, not computed twice
    claims = ShardClaims(writer.cache_dir)
    try:
        for index in claims.take(todo, writer.completed):
            put((index, compute(index, advance)))
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


def _writer_error(writer: CacheWriter, exc: BaseException) -> BaseException:
    if isinstance(exc, OSError):
        return UserError(f"{writer.cache_dir}: writing a shard failed: {exc.strerror or exc}")
    return exc
