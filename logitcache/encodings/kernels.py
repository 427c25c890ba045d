"""Compiled inner loops of the `compact` and `adaptive` decoders; their numpy code is the reference.

Why: the reader decodes in DataLoader workers, once per window per epoch. In numpy the decoder makes
about a dozen full passes over the [positions, k] arrays (gap sums, keys, shifts, masks, three table
lookups, the mass sum, the rescale); these two numba loops fuse them into two passes around numpy's
SIMD row sort, 2-3x faster (`scripts/bench_codec.py`). They give the same bytes as the numpy path
and the same errors on corrupt shards (`tests/test_decode_kernels.py`).

Compiled on first use in each process (~2 s) and not cached on disk: numba's cache files are pickles.
`LOGITCACHE_NUMBA=0` (or numba missing) selects the numpy path.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

# error codes returned by the loops (>= 0 means OK); the caller turns them into ValueErrors
OK = 0
BAD_RANK = 1        # a decoded token rank at or above the vocabulary size
BAD_CODE = 2        # a value code above max_code (or below 0)
BAD_PAD = 3         # fewer free ranks than padding slots (vocab_size < k)


def check(err: int, name: str) -> None:
    """Turn a loop's error code into the ValueError the numpy decoders raise for the same data."""
    if err != OK:
        raise ValueError(f"{name}: " + {BAD_RANK: "decoded token id outside the vocabulary",
                                        BAD_CODE: "value code out of range",
                                        BAD_PAD: "padding needs vocab_size >= k"}[err])


def enabled() -> bool:
    """Whether the compiled loops can be used in this process."""
    return _loops() is not None


@lru_cache(maxsize=1)
def _loops():
    if os.environ.get("LOGITCACHE_NUMBA", "1") == "0":
        return None
    try:
        import numba
    except ImportError:
        return None

    # Indices are uint64 on purpose: with signed ones numba wraps negatives around (index + length) at
    # every array access (docs/encodings.md, "Implementation notes"); there are no bounds checks either
    # way, since the callers size every array (see decode_rows).
    @numba.njit(nogil=True, boundscheck=False, cache=False)
    def sort_keys(g0, g1, g2, g3, nbytes, delta, low, starts, sizes, ragged, max_code, rank_bits, vocab,
                  key, r0, r1, k):
        """Gap planes + value deltas of rows [r0, r1) -> key = (max_code - code) << rank_bits | rank.

        An ascending sort of a row's keys then puts the largest value first, ties by rank. With
        `ragged`, row r holds sizes[r] entries from starts[r] on and its other k - sizes[r] slots
        become padding: code "below 0" (inverted max_code + 1, sorted last) and the rarest ranks
        the row does not hold, V-1, V-2, ... (see _SetCodec._fill_padding)."""
        ku = np.uint64(k)
        mask = (np.int64(1) << rank_bits) - 1
        for r in range(r0, r1):
            ru = np.uint64(r)
            src = np.uint64(starts[ru]) if ragged else ru * ku
            m = np.int64(sizes[ru]) if ragged else np.int64(k)
            dst = np.uint64(r - r0) * ku
            rank = np.int64(-1)
            top = np.int64(max_code) - np.int64(low[ru])     # inverted code of delta 0
            if top < 0:
                return BAD_CODE
            bad = False
            for j in range(m):
                i = src + np.uint64(j)
                g = np.int64(g0[i])
                if nbytes > 1:
                    g |= np.int64(g1[i]) << 8
                    if nbytes > 2:
                        g |= np.int64(g2[i]) << 16
                        if nbytes > 3:
                            g |= np.int64(g3[i]) << 24
                rank += g + 1
                inv = top - np.int64(delta[i])
                bad |= inv < 0
                key[dst + np.uint64(j)] = (inv << rank_bits) | rank
            if bad:
                return BAD_CODE
            if rank >= vocab:       # ranks increase within a row: the last is the largest
                return BAD_RANK
            free = np.int64(vocab) - 1
            p = m - 1               # the row's ranks, largest first, to step over
            for j in range(m, k):
                while p >= 0:
                    held = np.int64(key[dst + np.uint64(p)]) & mask
                    if held < free:
                        break
                    if held == free:
                        free -= 1
                    p -= 1
                if free < 0:
                    return BAD_PAD
                key[dst + np.uint64(j)] = ((np.int64(max_code) + 1) << rank_bits) | free
                free -= 1
        return OK

    @numba.njit(nogil=True, boundscheck=False, cache=False)
    def keys_to_dense(key, rank_bits, log_topk, id_of, identity, logp_of_inv, units_of_inv, unit_p, ids,
                      logprobs, sizes, ragged, r0, r1, k):
        """Sorted keys of rows [r0, r1) -> ids and log-probs rescaled to sum to exp(log_topk)."""
        shift_bits = np.uint64(rank_bits)
        mask = (np.uint64(1) << shift_bits) - np.uint64(1)
        ku = np.uint64(k)
        for r in range(r0, r1):
            src = np.uint64(r - r0) * ku
            dst = np.uint64(r) * ku
            units = np.int64(0)            # the row's mass in units of step^2 / 12: an exact sum
            for j in range(k):
                kv = np.uint64(key[src + np.uint64(j)])
                inv = kv >> shift_bits
                rank = kv & mask
                ids[dst + np.uint64(j)] = np.int64(rank) if identity else id_of[rank]
                logprobs[dst + np.uint64(j)] = logp_of_inv[inv]
                units += units_of_inv[inv]
            if ragged:              # padding sorts by ascending rank; slots take the rarest first
                lo = dst + np.uint64(sizes[np.uint64(r)])
                hi = dst + ku - np.uint64(1)
                while lo < hi:
                    ids[lo], ids[hi] = ids[hi], ids[lo]
                    lo += np.uint64(1)
                    hi -= np.uint64(1)
            if units > 0:
                shift = np.float32(log_topk[np.uint64(r)] - np.log(np.float64(units) * unit_p))
                for j in range(k):
                    logprobs[dst + np.uint64(j)] += shift
            if k and logprobs[dst] > 0:     # rounding must not give p > 1; only the first can
                logprobs[dst] = 0.0
        return OK

    return sort_keys, keys_to_dense


def decode_rows(gap_planes: list[np.ndarray], delta: np.ndarray, low: np.ndarray, log_topk: np.ndarray,
                k: int, max_code: int, rank_bits: int, vocab: int, key_dtype, id_of: np.ndarray | None,
                logp_of_inv: np.ndarray, units_of_inv: np.ndarray, unit_p: float, ids: np.ndarray,
                logprobs: np.ndarray, chunk_rows: int, sizes: np.ndarray | None = None) -> int:
    """Decode every row into the flat `ids` (int64) and `logprobs` (float32); returns an error code.

    Without `sizes` every row holds k entries; with it, row r holds sizes[r] (stored back to back)
    and is padded to k. Rows go through in chunks of `chunk_rows` so the keys stay in cache
    between the passes."""
    sort_keys, keys_to_dense = _loops()
    n = len(low)
    planes = list(gap_planes) + [gap_planes[0]] * (4 - len(gap_planes))
    identity = id_of is None
    table = np.zeros(1, dtype=np.int64) if identity else id_of
    ragged = sizes is not None
    if ragged:
        sizes = np.ascontiguousarray(sizes, dtype=np.int64)
        starts = np.cumsum(sizes) - sizes
    else:
        sizes = starts = np.zeros(1, dtype=np.int64)
    key = np.empty(min(n, chunk_rows) * k, dtype=key_dtype)
    for a in range(0, n, chunk_rows):
        e = min(n, a + chunk_rows)
        part = key[:(e - a) * k]
        err = sort_keys(planes[0], planes[1], planes[2], planes[3], len(gap_planes), delta, low, starts, sizes,
                        ragged, max_code, rank_bits, vocab, part, a, e, k)
        if err != OK:
            return err
        part.reshape(e - a, k).sort(axis=1)
        keys_to_dense(part, rank_bits, log_topk, table, identity, logp_of_inv, units_of_inv, unit_p, ids,
                      logprobs, sizes, ragged, a, e, k)
    return OK
