"""`sampled`: S tokens drawn per position from the teacher's full distribution, stored as unique ids + counts.

Random-sampling KD (Anshumann et al., ACL 2025): with `c_j` draws of token `j` out of S, the sparse
target `c_j / S` is an unbiased estimate of the teacher's distribution, so the cross-entropy of the
student against it (`trainer.losses.sampled_kd_loss`) has, in expectation, exactly the gradient of
full-vocabulary forward-KL distillation; top-k caches cannot offer that. The draws must come from the
full softmax at temperature 1, so they are made where the logits exist: a producer backend calls
:func:`draw_samples` on each chunk of logits and hands the result to :meth:`SampledEncoding.encode`.

Per position the unique ids are coded like `compact` ids (frequency-rank gaps); then one count per
id, less one, except the last, which is implied by the counts summing to S. Decoding gives
`sample_ids [B, T, S]` (unique ids in rank order, padded with id 0) and `sample_counts [B, T, S]`
(int32, 0 on padding).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from logitcache.encodings.bytes import (
    RANK_TABLE_MAX,
    check_vocab_and_table,
    describe_rank_table,
    fit_rank_order,
    gaps_from_sorted,
    get_stream,
    nbytes_for,
    pack_rank_order,
    put_stream,
    sorted_from_gaps,
    stream_fields,
)
from logitcache.encodings.registry import register
from logitcache.errors import UserError

if TYPE_CHECKING:  # torch is imported where samples are drawn, not by readers of the format
    import torch


def draw_samples(logits: torch.Tensor | np.ndarray, S: int, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor] | tuple[np.ndarray, np.ndarray]:
    """Draw S tokens per row from softmax(logits) at temperature 1; return unique ids and counts.

    `logits` is [N, V] (float32 or wider; lower precision is upcast first). Returns
    `(ids [N, S] int64, counts [N, S] int32)`: each row's distinct drawn ids in ascending id order,
    left-aligned, then padding (id 0, count 0); counts sum to S per row. Torch in, torch out on the
    same device (pass a `generator` on that device for reproducible draws); numpy in, numpy out.
    """
    import torch

    if not (isinstance(S, int) and 1 <= S <= 65535):
        raise ValueError(f"S must be an integer in [1, 65535], got {S!r}")
    as_numpy = isinstance(logits, np.ndarray)
    x = torch.from_numpy(logits) if as_numpy else logits
    if x.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(x.shape)}")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    n = x.shape[0]
    if n == 0:
        ids = torch.zeros((0, S), dtype=torch.int64, device=x.device)
        counts = torch.zeros((0, S), dtype=torch.int32, device=x.device)
    else:
        probs = torch.softmax(x, dim=-1)
        draws = torch.multinomial(probs, S, replacement=True, generator=generator)   # (N, S)
        ids, counts = unique_counts(draws)
    if as_numpy:
        return ids.numpy(), counts.numpy()
    return ids, counts


def unique_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws [N, S] -> (distinct ids [N, S] int64 ascending, left-aligned, 0-padded; counts int32)."""
    import torch

    n, S = draws.shape
    draws, _ = draws.long().sort(dim=1)
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = new.cumsum(dim=1) - 1                                                 # unique index per draw
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)
    counts = torch.zeros((n, S), dtype=torch.int32, device=draws.device)
    counts.scatter_add_(1, slot, torch.ones_like(counts))
    return ids, counts


def draw_samples_at(logits: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draws from softmax(logits) at given uniforms; the producer's exact, seedable sampler.

    `logits` [N, V] (upcast to float32: the softmax is the float32 one every backend computes),
    `uniforms` [N, S] in [0, 1) (float64). Draw j of row i is the first token whose cumulative
    probability exceeds `u_ij * total`; the cumulative sum is taken in float64, so each token is
    drawn with its float32 probability up to ~1e-16, and a token of probability 0 never is. Since
    the uniforms are given, the draws do not depend on how positions were grouped into chunks or
    on the device for the same logits. Returns what :func:`draw_samples` returns (torch, on the logits' device).
    """
    import torch

    if logits.dim() != 2 or uniforms.dim() != 2 or uniforms.shape[0] != logits.shape[0]:
        raise ValueError(f"logits [N, V] and uniforms [N, S] expected, got {tuple(logits.shape)} and "
                         f"{tuple(uniforms.shape)}")
    probs = torch.softmax(logits.float(), dim=-1)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    u = uniforms.to(device=cdf.device, dtype=torch.float64) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, u, right=True).clamp_(max=logits.shape[1] - 1)
    return unique_counts(draws)


def window_uniforms(key: str, window_ids, seq_len: int, S: int) -> torch.Tensor:
    """Uniforms [len(window_ids) * seq_len, S] (float64, CPU) for the producer's draws.

    Each window's block comes from its own generator, seeded with sha256(cache key, window id), so
    the uniforms are the same whichever run, worker, batch size or device makes a shard (the draws
    also, up to the logits' float32 rounding, which can differ with the matmul shapes).
    """
    import torch

    blocks = []
    for w in window_ids:
        seed = int.from_bytes(hashlib.sha256(f"{key}:{int(w)}".encode()).digest()[:8], "little") >> 1
        g = torch.Generator().manual_seed(seed)
        blocks.append(torch.rand((seq_len, S), generator=g, dtype=torch.float64))
    return torch.cat(blocks) if blocks else torch.zeros((0, S), dtype=torch.float64)


@register
class SampledEncoding:
    """Unique sampled ids (frequency-rank gaps) + counts; decodes to sample_ids / sample_counts."""

    name = "sampled"
    payload = "samples"
    parquet_level = 9          # zstd level writers SHOULD use for these columns (see compact.PARQUET_LEVEL)
    # what decode() returns, in order; top-k encodings return topk_ids, topk_logprobs, tail_logmass

    def __init__(self, S: int = 16, vocab_size: int | None = None, rank_table: str | None = None):
        if not (isinstance(S, int) and not isinstance(S, bool) and 1 <= S <= 65535):
            raise UserError(f"encoding sampled: S must be an integer in [1, 65535], got {S!r}")
        self.S = S
        self.vocab_size, self.rank_table, self.ranks = check_vocab_and_table(self.name, vocab_size, rank_table)
        self.gap_bytes = nbytes_for(vocab_size - 1) if vocab_size is not None else 4
        self.len_bytes = nbytes_for(S - 1)

    def describe(self) -> dict:
        """The parameters in a form to print: the rank table summarised (see `params` for all)."""
        return describe_rank_table(self.params(), self.ranks)

    def params(self) -> dict:
        return {"S": self.S, "vocab_size": self.vocab_size, "rank_table": self.rank_table}

    def fit(self, tokens: np.ndarray, vocab_size: int) -> dict:
        """Parameters with a corpus-frequency rank table (see CompactEncoding.fit)."""
        order = fit_rank_order(tokens, vocab_size, RANK_TABLE_MAX)
        return {**self.params(), "vocab_size": int(vocab_size), "rank_table": pack_rank_order(order)}

    def arrow_fields(self, k: int, seq_len: int) -> list[pa.Field]:
        return (stream_fields("sm_len", self.len_bytes) + stream_fields("sm_gap", self.gap_bytes)
                + stream_fields("sm_cnt", self.len_bytes))

    def encode(self, sample_ids: np.ndarray, sample_counts: np.ndarray, tail_logmass=None) -> dict[str, pa.Array]:
        """ids [B,T,S] and counts [B,T,S] as :func:`draw_samples` returns them (any order, count 0 = unused).

        The third argument is accepted and ignored, so a producer can call every encoding alike.
        """
        if hasattr(sample_ids, "cpu"):          # torch tensors from draw_samples
            sample_ids = sample_ids.cpu().numpy()
        if hasattr(sample_counts, "cpu"):
            sample_counts = sample_counts.cpu().numpy()
        b, t, s = sample_ids.shape
        if s != self.S or sample_counts.shape != sample_ids.shape:
            raise ValueError(f"sampled: expected ids and counts of shape [B, T, {self.S}]")
        n = b * t
        ids = sample_ids.reshape(n, s).astype(np.int64)
        counts = sample_counts.reshape(n, s).astype(np.int64)
        if counts.min(initial=0) < 0 or not np.all(counts.sum(axis=1) == self.S):
            raise ValueError(f"sampled: counts must be >= 0 and sum to S={self.S} at every position")
        used = counts > 0
        ranks = self.ranks.ranks(np.where(used, ids, 0))
        key = (ranks << 17) | counts                   # counts <= 65535 < 2**17
        key[~used] = np.iinfo(np.int64).max
        key.sort(axis=1)
        size = used.sum(axis=1)
        slots = np.arange(s)[None, :] < size[:, None]
        ranks, counts = key[slots] >> 17, key[slots] & ((1 << 17) - 1)
        ends = np.cumsum(size)
        starts = np.zeros(len(ranks), dtype=bool)
        starts[ends - size] = True
        gaps = gaps_from_sorted(ranks, starts)
        last = np.zeros(len(ranks), dtype=bool)
        last[ends - 1] = True
        per_row_ids = size.reshape(b, t).sum(axis=1)
        out: dict[str, pa.Array] = {}
        put_stream(out, "sm_len", size - 1, np.full(b, t, dtype=np.int64), self.len_bytes)
        put_stream(out, "sm_gap", gaps, per_row_ids, self.gap_bytes)
        put_stream(out, "sm_cnt", counts[~last] - 1, per_row_ids - t, self.len_bytes)
        return out

    def decode(self, columns: dict[str, pa.Array], k: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (sample_ids [B, T, S] int64, sample_counts [B, T, S] int32). `k` is ignored (S is a param)."""
        lens, l_rows = get_stream(columns, "sm_len", self.len_bytes)
        gaps, g_rows = get_stream(columns, "sm_gap", self.gap_bytes)
        cnt, c_rows = get_stream(columns, "sm_cnt", self.len_bytes)
        b = len(l_rows)
        size = lens.astype(np.int64) + 1
        if not np.all(l_rows == seq_len) or (size > self.S).any():
            raise ValueError(f"sampled: stream lengths do not match seq_len={seq_len}, S={self.S}")
        per_row = size.reshape(b, seq_len).sum(axis=1)
        if not (np.array_equal(per_row, g_rows) and np.array_equal(per_row - seq_len, c_rows)):
            raise ValueError("sampled: id and count streams do not match the stored lengths")
        n = b * seq_len
        ranks = sorted_from_gaps(gaps, size)
        if self.vocab_size is not None and ranks.size and ranks.max() >= self.vocab_size:
            raise ValueError("sampled: decoded id outside the vocabulary")
        ids_flat = self.ranks.ids(ranks)
        m = len(ranks)
        ends = np.cumsum(size)
        starts = ends - size
        stored = np.ones(m, dtype=bool)              # every count but each position's last is stored
        stored[ends - 1] = False
        counts_flat = np.zeros(m, dtype=np.int64)
        counts_flat[stored] = cnt
        counts_flat[stored] += 1
        # the last count is S minus the position's others (every position holds >= 1 id)
        last = self.S - np.add.reduceat(counts_flat, starts) if m else np.zeros(0, dtype=np.int64)
        if m and last.min() < 1:
            raise ValueError("sampled: stored counts exceed S")
        counts_flat[ends - 1] = last
        # element j of position r goes to slot r * S + (j - start_r): one repeat, then a scatter
        dest = np.repeat(np.arange(n, dtype=np.int64) * self.S - starts, size)
        dest += np.arange(m, dtype=np.int64)
        ids = np.zeros(n * self.S, dtype=np.int64)
        counts = np.zeros(n * self.S, dtype=np.int32)
        ids[dest] = ids_flat
        counts[dest] = counts_flat
        return ids.reshape(b, seq_len, self.S), counts.reshape(b, seq_len, self.S)
