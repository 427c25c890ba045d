"""`compact`: frequency-ranked, gap-coded id sets and sqrt(p) quantised values, in byte-plane columns.

Per position the top-k ids are mapped to their corpus-frequency rank (a table fitted once per cache
from the windows' token counts, stored in the manifest), sorted by rank and written as gaps; the
values follow in that same order, so no order information is stored: decoding sorts by value.
Each value is `round(sqrt(p) / step)` (+1, code 0 is reserved for p = 0), whose KL cost is about
`(k+1) step^2 / 6` nats on average and bounded for every position. The tail is stored separately as
the log-odds `log(T) - log(1 - T)` with a fixed step, which keeps both the tail and the top-k mass
to a relative precision of `tail_step` even when one of them is 1e-9. Decoding rescales the k
values so that they sum to exactly `1 - T`: `sum(exp(topk)) + exp(tail) = 1` up to float32
rounding. See docs/encodings.md for the byte layout.

The module is one codec family and stays whole: the set codec that `adaptive` extends, with its
compiled decode call and its numpy reference decoder side by side, so the two cannot drift apart.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from logitcache.encodings import kernels
from logitcache.encodings.bytes import (
    RANK_TABLE_MAX,
    check_vocab_and_table,
    describe_rank_table,
    fit_rank_order,
    frame_fields,
    get_frames,
    get_planes,
    get_stream,
    nbytes_for,
    pack_rank_order,
    put_frames,
    put_stream,
    stream_fields,
)
from logitcache.encodings.registry import register
from logitcache.errors import UserError

TAIL_ZERO = 0           # stored code: the tail is exactly 0 (log T = -inf), e.g. k == vocab
TAIL_ALL = 0xFFFF       # stored code: the top-k mass is exactly 0 (every top-k log-prob is -inf)
_TAIL_BIAS = 0x8000     # stored = round(logodds / tail_step) + bias, within [1, 0xFFFE]


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """Row-wise logsumexp in float64; -inf for rows that are all -inf."""
    m = x.max(axis=1)
    finite = np.isfinite(m)
    safe_m = np.where(finite, m, 0.0)
    with np.errstate(divide="ignore"):
        s = np.log(np.exp(x - safe_m[:, None]).sum(axis=1))
    return np.where(finite, s + safe_m, m)


# zstd level writers SHOULD use for these encodings' columns (Parquet's per-column level). The
# gap planes are where the level matters (repeated runs of frequent-token ranks, found by a deeper
# match search): 55.1 -> 51.7 B/token from level 3 to 9 on the demo teacher, writing ~3x slower
# (still >250k tokens/s on one core). Value frames are compressed by the encoding itself.
PARQUET_LEVEL = 9
DECODE_CHUNK = 1 << 18       # entries (positions x k) decoded at a time


class _SetCodec:
    """What compact, adaptive and sampled share: the rank map, value codes and the tail code."""

    parquet_level = PARQUET_LEVEL

    def __init__(self, step: float = 0.009, tail_step: float = 1 / 32, vocab_size: int | None = None,
                 rank_table: str | None = None):
        if not (isinstance(step, (int, float)) and 1e-5 <= step <= 0.5):
            raise UserError(f"encoding {self.name}: step must lie in [1e-5, 0.5], got {step!r}")
        if not (isinstance(tail_step, (int, float)) and 1e-4 <= tail_step <= 1.0):
            raise UserError(f"encoding {self.name}: tail_step must lie in [1e-4, 1], got {tail_step!r}")
        self.step = float(step)
        self.tail_step = float(tail_step)
        self.vocab_size, self.rank_table, self.ranks = check_vocab_and_table(self.name, vocab_size, rank_table)
        self.gap_bytes = nbytes_for(vocab_size - 1) if vocab_size is not None else 4
        self.rank_bits = max(1, (vocab_size - 1).bit_length()) if vocab_size is not None else 31
        # value codes: 0 -> p = 0; 1 -> sqrt(p) < step/2; c >= 2 -> sqrt(p) ~ (c - 1) * step
        self.max_code = 1 + int(math.floor(1.0 / self.step + 0.5))
        self.code_bytes = nbytes_for(self.max_code)
        self.code_bits = self.max_code.bit_length()
        p = ((np.arange(self.max_code + 1, dtype=np.float64) - 1.0) * self.step) ** 2
        p[0] = 0.0
        p[1] = self.step ** 2 / 12.0    # mean of p when sqrt(p) is uniform on [0, step/2)
        # decoding indexes by the inverted code max_code - c (sort key), plus one pad slot (p = 0)
        p_inv = np.concatenate([p[::-1], [0.0]])
        with np.errstate(divide="ignore"):
            self._logp_of_inv = np.log(p_inv).astype(np.float32)
        # p in integer units of step^2 / 12 (12 (c-1)^2, 1 for code 1, 0 for code 0 and the pad):
        # a row's mass is then an exact integer sum, the same whatever order it is added in
        units = 12 * (np.arange(self.max_code + 1, dtype=np.int64) - 1) ** 2
        units[0], units[1] = 0, 1
        self._units_of_inv = np.concatenate([units[::-1], [0]]).astype(np.int64)
        self._unit_p = self.step ** 2 / 12.0
        key_bits = self.rank_bits + (self.max_code + 1).bit_length()
        self._key_dtype = np.int32 if key_bits <= 31 else np.int64

    # -- parameters -----------------------------------------------------------

    def describe(self) -> dict:
        """The parameters in a form to print: the rank table summarised (see `params` for all)."""
        return describe_rank_table(self.params(), self.ranks)

    def params(self) -> dict:
        return {"step": self.step, "tail_step": self.tail_step, "vocab_size": self.vocab_size,
                "rank_table": self.rank_table}

    def fit(self, tokens: np.ndarray, vocab_size: int) -> dict:
        """Parameters with a rank table fitted on the corpus `tokens` (any shape) for ids < `vocab_size`.

        `vocab_size` must be the teacher's logit width (padding included), since every top-k id
        must have a rank. Deterministic: the same tokens give the same table, hence the same key.
        """
        order = fit_rank_order(tokens, vocab_size, RANK_TABLE_MAX)
        return {**self.params(), "vocab_size": int(vocab_size), "rank_table": pack_rank_order(order)}

    # -- value and tail codes ---------------------------------------------------

    def value_codes(self, logprobs: np.ndarray) -> np.ndarray:
        if np.isnan(logprobs).any():
            raise ValueError(f"{self.name}: log-probs hold NaN")
        with np.errstate(over="ignore"):
            root = np.exp(logprobs.astype(np.float64) * 0.5)
        codes = np.floor(root * (1.0 / self.step) + 0.5) + 1.0
        codes = np.minimum(codes, self.max_code)
        codes[np.isneginf(logprobs)] = 0
        return codes.astype(np.int64)

    def tail_codes(self, topk_logmass: np.ndarray, tail_logmass: np.ndarray) -> np.ndarray:
        """Log-odds of the tail against the kept mass, quantised; sentinels for exact 0 or 1."""
        tail = tail_logmass.astype(np.float64)
        if np.isnan(tail).any() or (tail > 1e-4).any():
            raise ValueError(f"{self.name}: tail_logmass must be <= 0 (or -inf), not NaN")
        no_tail = np.isneginf(tail)
        no_topk = np.isneginf(topk_logmass)
        if (no_tail & no_topk).any():
            raise ValueError(f"{self.name}: a position has neither top-k mass nor tail mass")
        with np.errstate(invalid="ignore"):
            odds = np.where(no_tail | no_topk, 0.0, tail - topk_logmass)
        code = np.clip(np.rint(odds / self.tail_step), 1 - _TAIL_BIAS, 0xFFFE - _TAIL_BIAS) + _TAIL_BIAS
        code = np.where(no_tail, TAIL_ZERO, np.where(no_topk, TAIL_ALL, code))
        return code.astype(np.uint16)

    def split_mass(self, tail_code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored tail codes -> (log top-k mass, log tail mass) in float64, summing to 1 exactly."""
        odds = (tail_code.astype(np.float64) - _TAIL_BIAS) * self.tail_step
        log_topk = -np.logaddexp(0.0, odds)
        log_tail = log_topk + odds
        zero = tail_code == TAIL_ZERO
        full = tail_code == TAIL_ALL
        log_topk[zero], log_tail[zero] = 0.0, -np.inf
        log_topk[full], log_tail[full] = -np.inf, 0.0
        return log_topk, log_tail

    def warm_up(self) -> None:
        """Compile the decode loops (kernels.py) for this encoding's array types now, on one
        synthetic position (cheap once compiled): processes forked afterwards, such as DataLoader
        workers, inherit them instead of compiling their own."""
        if not kernels.enabled():
            return
        lp = np.log(np.full((1, 1, 1), 0.8, dtype=np.float32))
        try:
            cols = self.encode(np.zeros((1, 1, 1), dtype=np.int64), lp, np.log(np.full((1, 1), 0.2, np.float32)))
        except ValueError:      # parameters this codec cannot work with: decoding will say so
            return
        self.decode(cols, 1, 1)

    def decode_compiled(self, gap_planes: list[np.ndarray], delta: np.ndarray, low: np.ndarray,
                        log_topk: np.ndarray, k: int, ids: np.ndarray, logprobs: np.ndarray,
                        sizes: np.ndarray | None = None) -> None:
        """Sets (k each, or `sizes`) -> `ids` [N, k] and `logprobs` [N, k] through the compiled loops."""
        err = kernels.decode_rows(gap_planes, delta, low, log_topk, k, self.max_code, self.rank_bits,
                                  self.vocab_size or 2**31 - 1, self._key_dtype, self.ranks.id_of,
                                  self._logp_of_inv, self._units_of_inv, self._unit_p, ids.reshape(-1),
                                  logprobs.reshape(-1), max(1, DECODE_CHUNK // max(k, 1)), sizes=sizes)
        kernels.check(err, self.name)

    # -- sorting helpers ------------------------------------------------------

    def check_ranks(self, ranks: np.ndarray) -> None:
        if ranks.size and int(ranks.max()) >= (self.vocab_size or 2**31 - 1):
            raise ValueError(f"{self.name}: decoded token id outside the vocabulary")

    def sort_by_rank(self, ids: np.ndarray, codes: np.ndarray, drop: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """[N, n] ids and codes -> (ranks, codes) sorted by ascending rank per row; `drop`ped last."""
        ranks = self.ranks.ranks(ids)
        key = (ranks << self.code_bits) | codes
        if drop is not None:
            key[drop] = np.iinfo(np.int64).max
        key.sort(axis=1)
        return key >> self.code_bits, key & ((1 << self.code_bits) - 1)

    def _fill_padding(self, rank: np.ndarray, pad: np.ndarray, sizes: np.ndarray) -> None:
        """Give the padding slots of each row distinct ranks outside the row's set, taken from the
        top of the rank order down (V-1, V-2, ...: the rarest tokens of the corpus), in place."""
        if not pad.any():
            return
        top = self.vocab_size
        if top is None or top < rank.shape[1]:
            raise ValueError(f"{self.name}: padding needs vocab_size >= k")
        col = np.arange(rank.shape[1])[None, :]
        rank[pad] = (top - 1 - (col - sizes[:, None]))[pad]
        # A kept token among those rarest ranks would collide: redo such rows one by one (rare).
        lowest_pad = top - (rank.shape[1] - sizes)
        clash = np.nonzero(((rank >= lowest_pad[:, None]) & ~pad).any(axis=1))[0]
        for r in clash.tolist():
            kept = set(rank[r, ~pad[r]].tolist())
            free = [c for c in range(top - 1, -1, -1) if c not in kept][:int(pad[r].sum())]
            rank[r, pad[r]] = free

    def dense_from_sets(self, ranks: np.ndarray, codes: np.ndarray, sizes: np.ndarray | None, n: int,
                        log_topk: np.ndarray, inverted: bool = False,
                        out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Flat per-position sets -> ([N, n] int64 ids, [N, n] float32 log-probs), descending by value.

        `ranks` (checked by the caller to lie below V) and `codes` (or, with `inverted`, max_code - code
        in the key dtype, consumed) are flat, set after set; `sizes` gives each set's
        length (None: all n). Values are rescaled so that each row's probabilities sum to
        exp(log_topk). Slots past a set's size are padding: log-prob -inf and distinct ids outside
        the set, the rarest of the rank order (see :meth:`_fill_padding`).
        Ties keep rank order (the more frequent token first). A negative code (corrupt data) is a
        ValueError. `out` ([N, n] int64, [N, n] float32) receives the result without a copy.
        """
        rows = len(log_topk)
        # inverted code max_code - c in the high bits: an ascending sort puts large values first
        key = codes if inverted else np.subtract(self.max_code, codes, dtype=self._key_dtype)
        key <<= self.rank_bits
        same_width = ranks.dtype == np.uint32 and self._key_dtype == np.int32
        key |= ranks.view(self._key_dtype) if same_width else ranks.astype(self._key_dtype)
        if sizes is None:
            dense = key.reshape(rows, n)
        else:
            pad_key = (self.max_code + 1) << self.rank_bits
            dense = np.full((rows, n), pad_key, dtype=self._key_dtype)
            dense[np.arange(n)[None, :] < sizes[:, None]] = key
        dense.sort(axis=1)
        # a negative inverted code makes a negative key, which sorts first: one column to check
        if n and rows and dense[:, 0].min() < 0:
            raise ValueError(f"{self.name}: value code out of range")
        # intp outputs straight from the key: np.take would otherwise convert its indices each call
        inv = np.right_shift(dense, self.rank_bits, dtype=np.intp)
        rank = np.bitwise_and(dense, (1 << self.rank_bits) - 1, dtype=np.intp)
        del dense
        if sizes is not None:
            self._fill_padding(rank, inv > self.max_code, sizes)
        if out is None:
            ids = self.ranks.ids(rank)
            logprobs = np.take(self._logp_of_inv, inv)
        else:
            ids, logprobs = out
            # mode="clip": with mode="raise" (the default) numpy buffers `out`, a copy we came to avoid;
            # the indices are in range already (ranks checked against V, codes by the sort key)
            if self.ranks.id_of is None:
                ids[...] = rank
            else:
                np.take(self.ranks.id_of, rank, out=ids, mode="clip")
            np.take(self._logp_of_inv, inv, out=logprobs, mode="clip")
        mass = np.take(self._units_of_inv, inv).sum(axis=1) * self._unit_p
        some = mass > 0
        shift = np.where(some, log_topk - np.log(np.where(some, mass, 1.0)), 0.0)
        logprobs += shift.astype(np.float32)[:, None]
        if n:                                # rounding must not give p > 1; only the first can
            np.minimum(logprobs[:, 0], 0.0, out=logprobs[:, 0])
        return ids, logprobs


@register
class CompactEncoding(_SetCodec):
    """Top-k sets as frequency-rank gaps + sqrt(p) codes + tail log-odds, byte-plane columns."""

    name = "compact"
    payload = "topk"

    def arrow_fields(self, k: int, seq_len: int) -> list[pa.Field]:
        return (stream_fields("cz_gap", self.gap_bytes) + frame_fields("cz_val")
                + stream_fields("cz_min", self.code_bytes) + stream_fields("cz_tail", 2))

    def encode(self, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
               tail_logmass: np.ndarray) -> dict[str, pa.Array]:
        b, t, k = topk_ids.shape
        n = b * t
        ids = topk_ids.reshape(n, k)
        lp = topk_logprobs.reshape(n, k)
        codes = self.value_codes(lp)
        tail_code = self.tail_codes(_logsumexp_rows(lp.astype(np.float64)), tail_logmass.reshape(n))
        ranks, codes = self.sort_by_rank(ids, codes)
        gaps = ranks.copy()
        gaps[:, 1:] = np.diff(ranks, axis=1) - 1
        if k > 1 and gaps[:, 1:].min(initial=0) < 0:
            raise ValueError(f"{self.name}: token ids within a position must be distinct")
        low = codes.min(axis=1)
        out: dict[str, pa.Array] = {}
        per_row = np.full(b, t * k, dtype=np.int64)
        per_pos = np.full(b, t, dtype=np.int64)
        put_stream(out, "cz_gap", gaps.reshape(-1), per_row, self.gap_bytes)
        put_frames(out, "cz_val", (codes - low[:, None]).reshape(-1), per_row, self.code_bytes)
        put_stream(out, "cz_min", low, per_pos, self.code_bytes)
        put_stream(out, "cz_tail", tail_code, per_pos, 2)
        return out

    def decode(self, columns: dict[str, pa.Array], k: int, seq_len: int,
               compiled: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Columns of b windows -> ids [b, T, k], log-probs [b, T, k] (descending), log tail [b, T].

        `compiled` picks the numba loops (True) or the numpy reference (False); None: the loops
        when numba is there (see kernels.py)."""
        if compiled is None:
            compiled = kernels.enabled()
        if compiled:
            gaps, g_rows = get_planes(columns, "cz_gap", self.gap_bytes)
        else:
            gaps, g_rows = get_stream(columns, "cz_gap", self.gap_bytes, wide=True)
        low, m_rows = get_stream(columns, "cz_min", self.code_bytes)
        tail_code, t_rows = get_stream(columns, "cz_tail", 2)
        b = len(t_rows)
        if not (np.all(g_rows == seq_len * k) and np.all(m_rows == seq_len) and np.all(t_rows == seq_len)):
            raise ValueError(f"{self.name}: stream lengths do not match seq_len={seq_len}, k={k}")
        n = b * seq_len
        delta = get_frames(columns, "cz_val", self.code_bytes, g_rows)
        if low.size and low.max() > self.max_code:
            raise ValueError(f"{self.name}: value code out of range")
        log_topk, log_tail = self.split_mass(tail_code)
        ids = np.empty((n, k), dtype=np.int64)
        logprobs = np.empty((n, k), dtype=np.float32)
        if compiled:
            self.decode_compiled(gaps, delta, low, log_topk, k, ids, logprobs)
        else:
            self._decode_reference(gaps.reshape(n, k), delta.reshape(n, k), low, log_topk, k, ids, logprobs)
        return (ids.reshape(b, seq_len, k), logprobs.reshape(b, seq_len, k),
                log_tail.astype(np.float32).reshape(b, seq_len))

    def _decode_reference(self, gaps: np.ndarray, delta: np.ndarray, low: np.ndarray, log_topk: np.ndarray,
                          k: int, ids: np.ndarray, logprobs: np.ndarray) -> None:
        """The numpy decoder ([N, k] gaps and code deltas -> `ids`, `logprobs`): the compiled
        loops' reference, and the path without numba."""
        n = len(low)
        top_low = (self.max_code - low.astype(np.int32))[:, None]
        # Row chunks bound the temporaries whatever seq_len and the row group size (docs/encodings.md,
        # "Implementation notes", for the chunk size).
        step = max(1, DECODE_CHUNK // max(k, 1))
        for a in range(0, n, step):
            e = min(n, a + step)
            ranks = ranks_from_fixed_gaps(gaps[a:e].reshape(-1), e - a, k)
            # with gaps below 2**16 no set can wrap: ranks increase within a set, its last is its largest
            self.check_ranks(ranks.reshape(e - a, k)[:, -1] if self.gap_bytes <= 2 else ranks)
            # inverted codes max_code - (low + delta), the sort key's high part; negative = corrupt
            inv = np.subtract(top_low[a:e], delta[a:e], dtype=self._key_dtype)
            self.dense_from_sets(ranks, inv.reshape(-1), None, k, log_topk[a:e], inverted=True,
                                 out=(ids[a:e], logprobs[a:e]))


def ranks_from_fixed_gaps(gaps: np.ndarray, n: int, k: int) -> np.ndarray:
    """Gaps of n sets of k -> flat ranks, with one flat cumulative sum.

    rank_j = sum_{i<=j} gap_i + j within a set. The running sum is taken over all sets at once in
    uint32 and the previous sets' total subtracted: modular arithmetic makes that exact even when
    the running sum wraps, since every rank is below 2**31.
    """
    if gaps.size == 0:
        return np.zeros(0, dtype=np.uint32)
    cs = (np.cumsum(gaps, out=gaps) if gaps.dtype == np.uint32 else np.cumsum(gaps, dtype=np.uint32)).reshape(n, k)
    base = np.empty(n, dtype=np.uint32)
    base[0] = 0
    base[1:] = cs[:-1, -1]
    cs -= base[:, None]
    cs += np.arange(k, dtype=np.uint32)[None, :]
    return cs.reshape(-1)


def coarse_kl(exact_ids: np.ndarray, exact_logprobs: np.ndarray, exact_tail: np.ndarray,
              ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Per-position KL(exact || decoded) in nats over the decoded (kept + tail) buckets, float64.

    The exact top-k + tail distribution is first coarsened to the decoded buckets: its mass on ids
    the decoded position does not keep moves to its tail. For `compact` (all k kept) this is the
    KL between the exact and decoded (k+1)-way distributions; for `adaptive` it isolates the
    quantisation error from the (exact) folding of dropped tokens into the tail. Decoded slots
    with log-prob -inf are padding or zeros and are skipped; a kept id missing from the exact set
    gives +inf. Arrays are [N, k] / [N] (any leading shape is flattened).
    """
    k = exact_ids.shape[-1]
    ea, la = exact_ids.reshape(-1, k).astype(np.int64), exact_logprobs.reshape(-1, k).astype(np.float64)
    kb = ids.shape[-1]
    eb, lb = ids.reshape(-1, kb).astype(np.int64), logprobs.reshape(-1, kb).astype(np.float64)
    n = ea.shape[0]
    big = int(max(ea.max(initial=0), eb.max(initial=0))) + 1
    order = np.argsort(ea, axis=1)
    key_a = (np.take_along_axis(ea, order, 1) + np.arange(n)[:, None] * big).reshape(-1)
    la_sorted = np.take_along_axis(la, order, 1).reshape(-1)
    valid = ~np.isneginf(lb)
    key_b = (eb + np.arange(n)[:, None] * big)[valid]
    pos = np.minimum(np.searchsorted(key_a, key_b), len(key_a) - 1)
    found = key_a[pos] == key_b
    pa = np.where(found, np.exp(la_sorted[pos]), 0.0)
    lqb = lb[valid]
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(pa > 0, pa * (np.log(np.where(pa > 0, pa, 1.0)) - lqb), 0.0)
    term = np.where(found, term, np.inf)
    rows = np.nonzero(valid)[0]
    kl = np.bincount(rows, weights=term, minlength=n)
    matched = np.zeros(len(key_a), dtype=bool)
    matched[pos[found]] = True
    dropped = np.where(matched, 0.0, np.exp(la_sorted)).reshape(n, k).sum(axis=1)
    ta = np.exp(exact_tail.reshape(-1).astype(np.float64)) + dropped
    tb = tail.reshape(-1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail_term = np.where(ta > 0, ta * (np.log(np.where(ta > 0, ta, 1.0)) - tb), 0.0)
    return kl + tail_term


__all__ = ["CompactEncoding", "coarse_kl"]
