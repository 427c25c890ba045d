"""`adaptive`: per position only the most probable tokens that reach mass `p` (at most k), compact-coded.

A confident position needs one or two tokens to reach, say, 95% of the mass; a flat one needs all
k. Each position keeps the smallest prefix of its top-k (by probability) whose full-vocabulary mass
is at least `p` (all k when the top-k mass is below `p`, always at least one), and the dropped
tokens' mass is added to the stored tail exactly (a log-sum-exp in float64 before quantising), so
the (kept + tail) distribution stays a proper distribution: a coarser view of the same teacher.
Kept tokens are coded exactly as in `compact` (frequency-rank gaps, sqrt(p) codes, tail log-odds)
plus one length per position.

Decoding gives dense [B, T, k] arrays, most probable first. Slots past a position's length are
padding: log-prob -inf and distinct ids outside the kept set, the rarest tokens of the corpus (the
top of the rank order: V-1, V-2, ...), so every row keeps k distinct ids as the losses require. A
padding slot says "teacher probability 0" for a token whose true mass, if any, was folded into the
tail; taking the corpus's rarest tokens keeps that error at the student's (tiny) mass on them. With
a student that gives them no mass, forward KL on the padded rows equals forward KL on the kept
tokens alone (tested). Losses that sum over the student's side of every slot (reverse KL, JSD) pay
`q log q` for each padding slot; mask slots whose log-prob is -inf for those. Needs `vocab_size`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from logitcache.encodings import kernels
from logitcache.encodings.bytes import (
    frame_fields,
    gaps_from_sorted,
    get_frames,
    get_planes,
    get_stream,
    nbytes_for,
    put_frames,
    put_stream,
    sorted_from_gaps,
    stream_fields,
)
from logitcache.encodings.compact import _logsumexp_rows, _SetCodec
from logitcache.encodings.registry import register
from logitcache.errors import UserError


@register
class AdaptiveEncoding(_SetCodec):
    """Variable-length top-p prefix of the top-k, compact-coded, with the rest folded into the tail."""

    name = "adaptive"
    payload = "topk"

    def __init__(self, p: float = 0.95, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(p, (int, float)) and 0.0 < p <= 1.0):
            raise UserError(f"encoding adaptive: p must lie in (0, 1], got {p!r}")
        self.p = float(p)

    def params(self) -> dict:
        return {**super().params(), "p": self.p}

    def arrow_fields(self, k: int, seq_len: int) -> list[pa.Field]:
        return (stream_fields("ad_len", nbytes_for(max(k - 1, 0))) + stream_fields("ad_gap", self.gap_bytes)
                + frame_fields("ad_val") + stream_fields("ad_min", self.code_bytes) + stream_fields("ad_tail", 2))

    def keep_counts(self, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, k] log-probs -> (tokens kept per position, [N, k] bool: dropped) by descending probability."""
        n, k = logprobs.shape
        order = np.argsort(-logprobs, axis=1, kind="stable")
        desc = np.take_along_axis(logprobs, order, axis=1).astype(np.float64)
        cum = np.cumsum(np.exp(desc), axis=1)
        # tokens strictly before the one that reaches p, plus that one; p = 1 keeps all k
        keep = np.minimum(1 + (cum < self.p).sum(axis=1), k) if self.p < 1.0 else np.full(n, k)
        dropped_sorted = np.arange(k)[None, :] >= keep[:, None]
        dropped = np.empty_like(dropped_sorted)
        np.put_along_axis(dropped, order, dropped_sorted, axis=1)
        return keep, dropped

    def encode(self, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
               tail_logmass: np.ndarray) -> dict[str, pa.Array]:
        if self.vocab_size is None:
            raise ValueError("adaptive: needs vocab_size (fit() sets it) to choose padding ids at decoding")
        b, t, k = topk_ids.shape
        n = b * t
        ids = topk_ids.reshape(n, k)
        lp = topk_logprobs.reshape(n, k).astype(np.float64)
        if np.isnan(lp).any():
            raise ValueError("adaptive: log-probs hold NaN")
        keep, dropped = self.keep_counts(lp)
        kept_lp = np.where(dropped, -np.inf, lp)
        dropped_lp = np.where(dropped, lp, -np.inf)
        tail = np.logaddexp(tail_logmass.reshape(n).astype(np.float64), _logsumexp_rows(dropped_lp))
        tail_code = self.tail_codes(_logsumexp_rows(kept_lp), tail)
        ranks, codes = self.sort_by_rank(ids, self.value_codes(lp), drop=dropped)
        slots = np.arange(k)[None, :] < keep[:, None]
        low = np.where(slots, codes, np.iinfo(np.int64).max).min(axis=1)
        ranks, codes = ranks[slots], (codes - low[:, None])[slots]
        starts = np.zeros(len(ranks), dtype=bool)
        starts[(np.cumsum(keep) - keep)[keep > 0]] = True
        gaps = gaps_from_sorted(ranks, starts)
        per_row = keep.reshape(b, t).sum(axis=1)
        out: dict[str, pa.Array] = {}
        t_rows = np.full(b, t, dtype=np.int64)
        put_stream(out, "ad_len", keep - 1, t_rows, nbytes_for(max(k - 1, 0)))
        put_stream(out, "ad_gap", gaps, per_row, self.gap_bytes)
        put_frames(out, "ad_val", codes, per_row, self.code_bytes)
        put_stream(out, "ad_min", low, t_rows, self.code_bytes)
        put_stream(out, "ad_tail", tail_code, t_rows, 2)
        return out

    def decode(self, columns: dict[str, pa.Array], k: int, seq_len: int,
               compiled: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Columns of b windows -> ids [b, T, k], log-probs [b, T, k] (descending, padded with -inf),
        log tail [b, T]. `compiled`: as for compact (kernels.py; None: when numba is there)."""
        if compiled is None:
            compiled = kernels.enabled()
        lens, l_rows = get_stream(columns, "ad_len", nbytes_for(max(k - 1, 0)))
        if compiled:
            gaps, g_rows = get_planes(columns, "ad_gap", self.gap_bytes)
        else:
            gaps, g_rows = get_stream(columns, "ad_gap", self.gap_bytes)
        low, m_rows = get_stream(columns, "ad_min", self.code_bytes)
        tail_code, t_rows = get_stream(columns, "ad_tail", 2)
        b = len(t_rows)
        sizes = lens.astype(np.int64) + 1
        if not (np.all(l_rows == seq_len) and np.all(m_rows == seq_len) and np.all(t_rows == seq_len)) \
                or (sizes > k).any():
            raise ValueError(f"adaptive: stream lengths do not match seq_len={seq_len}, k={k}")
        per_row = sizes.reshape(b, seq_len).sum(axis=1)
        if not np.array_equal(per_row, g_rows):
            raise ValueError("adaptive: the id stream does not match the stored lengths")
        delta = get_frames(columns, "ad_val", self.code_bytes, per_row)
        log_topk, log_tail = self.split_mass(tail_code)
        if compiled:
            n = b * seq_len
            ids = np.empty((n, k), dtype=np.int64)
            logprobs = np.empty((n, k), dtype=np.float32)
            self.decode_compiled(gaps, delta, low, log_topk, k, ids, logprobs, sizes=sizes)
        else:
            codes = np.add(delta, np.repeat(low, sizes), dtype=np.int32)
            if codes.size and codes.max() > self.max_code:
                raise ValueError("adaptive: value code out of range")
            ranks = sorted_from_gaps(gaps, sizes)
            self.check_ranks(ranks)
            ids, logprobs = self.dense_from_sets(ranks, codes, sizes, k, log_topk)
        return (ids.reshape(b, seq_len, k), logprobs.reshape(b, seq_len, k),
                log_tail.astype(np.float32).reshape(b, seq_len))
