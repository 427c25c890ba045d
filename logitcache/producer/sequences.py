"""Run one teacher over the missing shards of a sequences cache: one row per conversation, the
payload kept at its loss positions only.

A shard's rows are taken `batch_size` at a time in order and right-padded with token 0 to the
longest row of the batch, then run as fixed windows by the backend (`run(windows [B, T+1])`, or
`sample(windows, S, uniforms)` for a samples cache). The padding changes nothing at a row's real
positions: the teacher is causal, so position p attends to tokens 0..p only, and for p < n - 1
(the row's last position) those are all the row's own tokens; the padding sits after them and is
never seen. Only the per-position outputs at padded positions are garbage, and none of them is a
loss position. (No attention mask is passed: none is needed, and both backends take plain
windows. Results equal the row run alone up to float rounding, which can differ with the batch's
shape.)

The outputs are then gathered at each row's loss positions (position p is index p of the [B, T]
outputs), joined over the shard in row order and handed to `CacheWriter.write_sequences`.
Draws of a samples cache come from `window_uniforms(key, row ids, seq_len, S)` cut to the batch's
T positions, so a row's draws depend on its id only, never on the rows batched with it.

Packed rows (`Sequences.packing`, data.packing) are computed the same way, one document at a time:
a shard's rows are expanded into their documents, the documents are batched, padded and run as
above (draws keyed by the document's index), and their payloads, already in row order, are written
under the packed rows with each row's `doc_lengths`. The teacher therefore never attends across a
boundary, and neither backend needs to know about packing (the vLLM backend included).

Claims, the writer thread and progress (in stored positions) are run.py's `run_shard_work`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from logitcache.data.packing import row_documents, unpacked
from logitcache.data.sequences import Sequences
from logitcache.format.payloads import Samples, TopK, concat
from logitcache.producer.run import run_shard_work
from logitcache.producer.writer import CacheWriter

PAD_ID = 0


def pad_rows(rows: list[np.ndarray], pad_id: int = PAD_ID) -> np.ndarray:
    """Rows of token ids right-padded with `pad_id` to the longest: [B, max n] int32."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def gather_positions(payload: TopK | Samples, positions: list[np.ndarray]) -> TopK | Samples:
    """The batch's [B, T, ...] outputs at each row's positions, flat over rows in order: [P, ...]."""
    rows = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(positions)])
    cols = np.concatenate(positions).astype(np.int64)
    return type(payload)(*(np.ascontiguousarray(a[rows, cols]) for a in payload))


def run_batch(model, rows: list[np.ndarray], positions: list[np.ndarray], *, sample: int = 0, key: str = "",
              row_ids: range | None = None, seq_len: int = 0) -> TopK | Samples:
    """One batch of rows through the model (padded, see the module doc), gathered at `positions`.

    With `sample` = S > 0, `key`, the rows' ids and the cache's `seq_len` fix the draws."""
    windows = pad_rows(rows)
    if sample:
        from logitcache.encodings.sampled import window_uniforms

        T = windows.shape[1] - 1
        uniforms = window_uniforms(key, row_ids, seq_len, sample).reshape(len(rows), seq_len, sample)
        out = model.sample(windows, sample, uniforms[:, :T].reshape(len(rows) * T, sample))
    else:
        out = model.run(windows)
    return gather_positions(out, positions)


def run_sequence_shards(model, writer: CacheWriter, sequences: Sequences, todo: list[int], batch_size: int, *,
                        desc: str = "", progress: bool = True, overlap: bool = True, sample: int = 0) -> None:
    """Compute the sequence shards `todo` (see the module doc) and write them as they finish."""
    plan = writer.manifest
    rps, seq_len = plan.rows_per_shard, writer.seq_len
    documents = unpacked(sequences)
    packed = sequences.documents is not None

    def compute(index: int, advance: Callable[[int], None]) -> Callable[[], object]:
        first, count = index * rps, plan.expected_rows(index)
        docs = row_documents(sequences, first, count)
        ids = [documents.row(j)[0] for j in docs]
        positions = [documents.loss_positions(j) for j in docs]
        parts = []
        for s in range(0, len(docs), batch_size):
            e = min(len(docs), s + batch_size)
            parts.append(run_batch(model, ids[s:e], positions[s:e], sample=sample, key=writer.key,
                                   row_ids=docs[s:e], seq_len=seq_len))
            advance(sum(len(p) for p in positions[s:e]))
        payload = concat(parts)
        rows = range(first, first + count)
        if not packed:
            return lambda: writer.write_sequences(index, input_ids=ids, loss_positions=positions, payload=payload)
        return lambda: writer.write_sequences(index, input_ids=[sequences.row(i)[0] for i in rows],
                                              loss_positions=[sequences.loss_positions(i) for i in rows],
                                              doc_lengths=[sequences.doc_lengths(i) for i in rows], payload=payload)

    total = sum(len(sequences.loss_positions(i)) for index in todo
                for i in range(index * rps, index * rps + plan.expected_rows(index)))
    run_shard_work(writer, todo, compute, total, desc=desc, progress=progress, overlap=overlap)
