"""What `logitcache inspect` reports: sizes, and what the teacher's distributions look like on a sample."""

from __future__ import annotations

import os

import numpy as np

from logitcache import format as fmt
from logitcache.read.batches import UNIT_ROWS
from logitcache.read.reader import CacheReader

# -- inspect -----------------------------------------------------------------------------------


def sample_units(reader: CacheReader, max_windows: int) -> list[tuple[dict, int, int]]:
    """(entry, start, stop) row ranges of at most `max_windows` windows, evenly spread over the
    listed shards (all of them when the cache is small enough)."""
    units = [(e, s, min(s + UNIT_ROWS, e.rows)) for e in reader.shards
             for s in range(0, e.rows, UNIT_ROWS)]
    total = sum(b - a for _, a, b in units)
    if total <= max_windows:
        return units
    want = max(1, max_windows // UNIT_ROWS)
    picks = np.unique(np.linspace(0, len(units) - 1, want).round().astype(int))
    chosen, n = [], 0
    for i in picks:
        e, a, b = units[i]
        b = min(b, a + max_windows - n)
        if b > a:
            chosen.append((e, a, b))
            n += b - a
    return chosen


def topk_stats(topk_logprobs: np.ndarray, tail_logmass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: top-k mass sum_i exp(l_i) and the entropy of the (k+1)-way distribution.

    The (k+1)-way distribution puts each top-k token's probability on its own outcome and the
    tail mass T on one more. It is a coarsening of the teacher's full distribution (the tail
    tokens merged into one outcome), and merging outcomes never increases entropy: by the chain
    rule, H(full) = H(coarse) + T * H(tail tokens | tail) >= H(coarse). So this entropy is a lower
    bound of the teacher's entropy, tight when the tail is small or concentrated on one token.
    """
    floor = np.finfo(np.float64).min                 # -inf -> a finite floor: p = 0, p * log p = 0
    lp = np.maximum(topk_logprobs.astype(np.float64), floor)
    p = np.exp(lp)
    mass = p.sum(-1)
    p_term = np.einsum("...k,...k->...", p, lp)
    tail = np.maximum(tail_logmass.astype(np.float64), floor)
    t_term = np.exp(tail) * tail
    return mass, -(p_term + t_term)


def describe_encoding(encoding) -> dict:
    """An encoding's parameters as a person reads them: what a large table holds, not its bytes."""
    describe = getattr(encoding, "describe", None)
    return describe() if describe is not None else encoding.params()


def inspect_cache(path: str | os.PathLike, sample_windows: int = 1024) -> dict:
    """Summary of a cache: identity, size and what the teacher's distributions look like.

    Sizes (windows, tokens, shards, bytes, bytes_per_token) cover every listed shard; the
    distribution statistics are means over all positions of at most `sample_windows` windows
    spread evenly over the shards (`sampled_windows` says how many): `mean_topk_mass` (mean of
    sum exp(top-k log-probs)), `mean_entropy_lower_bound` (nats; see `topk_stats` for why it is
    a lower bound), `mean_tail_mass` and `teacher_nll` (mean -log p(next token), the teacher's
    cross-entropy on the data).
    """
    reader = CacheReader(path)
    m = reader.manifest
    n_pos = 0
    sums = {"mass": 0.0, "entropy": 0.0, "tail": 0.0, "nll": 0.0}
    sampled = 0
    for entry, a, b in sample_units(reader, max(0, int(sample_windows))) if sample_windows > 0 else []:
        d = reader.read_unit(entry, a, b)
        if "loss_mask" in d:        # a sequences cache: its stored positions only
            d = {key: d[key][d["loss_mask"]] for key in ("topk_logprobs", "tail_logmass", "target_logprob")
                 if key in d}
        if not reader.sampled:      # draws carry no top-k mass or entropy bound
            mass, ent = topk_stats(d["topk_logprobs"], d["tail_logmass"])
            sums["mass"] += float(mass.sum())
            sums["entropy"] += float(ent.sum())
            sums["tail"] += float(np.exp(d["tail_logmass"].astype(np.float64)).sum())
        sums["nll"] += float(-d["target_logprob"].astype(np.float64).sum())
        n_pos += d["target_logprob"].size
        sampled += b - a

    def mean(x: float) -> float | None:
        return x / n_pos if n_pos else None

    tokens = reader.num_tokens
    return {
        "path": str(reader.path),
        "key": m.key,
        "teacher": m.teacher.name_or_path,
        "teacher_dtype": m.teacher.dtype,
        "vocab_size": m.teacher.vocab_size,
        "k": reader.k,
        "encoding": m.encoding.name,
        "layout": m.data.layout or fmt.LAYOUT_WINDOWS,
        "packing": m.data.packing,
        "encoding_params": m.encoding.params,
        "encoding_summary": describe_encoding(reader.encoding),
        "payload": m.payload,
        "seq_len": reader.seq_len,
        "data_source": m.data.source,
        "windows": reader.num_windows,
        "planned_windows": m.data.num_windows,
        "tokens": tokens,
        "shards": len(reader.shards),
        "planned_shards": m.num_shards,
        "bytes": reader.num_bytes,
        "bytes_per_token": reader.num_bytes / tokens if tokens else None,
        "complete": reader.complete,
        "sampled_windows": sampled,
        "mean_topk_mass": None if reader.sampled else mean(sums["mass"]),
        "mean_tail_mass": None if reader.sampled else mean(sums["tail"]),
        "mean_entropy_lower_bound": None if reader.sampled else mean(sums["entropy"]),
        "teacher_nll": mean(sums["nll"]),
        "backend": m.producer.backend,
    }
