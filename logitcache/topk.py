"""Per-position top-k log-probs, exact tail mass and target log-prob, straight from logits.

No full `log_softmax` tensor is built. For a chunk of rows `x` (float32, [n, V]):

1. `torch.topk(x, k + 1)` gives the top-k logits and `m2`, the largest logit *outside* the top-k.
2. `rest = sum(exp(x - m2))` over the non-top-k columns only: the top-k slots of the exp buffer are
   overwritten with 0 before summing (an overflowed `inf` there is harmless, it is overwritten).
   Every term is <= 1 and the (k+1)-th is exactly 1, so the sum never underflows or overflows.
3. `lse = logsumexp([top-k logits, m2 + log(rest)])` over k + 1 numbers.
4. `tail_logmass = m2 + log(rest) - lse`, `topk_logprobs = topk_logits - lse`.

Why not `log1mexp(logsumexp(topk_logprobs))`: when the top-k holds nearly all the mass, `1 - p_topk`
cancels catastrophically in float32 (a tail below ~1e-6 comes out as noise, zero or NaN), and a
confident teacher makes exactly those positions. Summing only the non-top-k terms keeps the tail's
*relative* error at float32 rounding (~1e-6) however small it is, and the cost is one `exp` pass
over the chunk, the same as a plain logsumexp.

Every logit column counts: padded vocabulary columns (a model whose embedding matrix is larger than
its tokenizer) are part of the model's softmax, so they are in the normaliser and may appear in the
top-k; the cache describes the model's distribution, not a renormalised one. With k == V the tail is
empty and `tail_logmass` is -inf.
"""

from __future__ import annotations

import torch


def topk_from_logits(logits: torch.Tensor, targets: torch.Tensor, k: int, chunk_size: int = 4096
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] (any float dtype), targets [N] int -> float32 results on logits' device.

    Returns (topk_ids int32 [N, k] in descending log-prob order, topk_logprobs float32 [N, k],
    tail_logmass float32 [N], target_logprob float32 [N]); rows are processed `chunk_size` at a
    time so the float32 working copies stay at chunk_size x V.
    """
    assert logits.dim() == 2 and targets.shape == logits.shape[:1], (logits.shape, targets.shape)
    n, vocab = logits.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} must be in 1..{vocab}")
    dev = logits.device
    ids_out = torch.empty(n, k, dtype=torch.int32, device=dev)
    lp_out = torch.empty(n, k, dtype=torch.float32, device=dev)
    tail_out = torch.empty(n, dtype=torch.float32, device=dev)
    tgt_out = torch.empty(n, dtype=torch.float32, device=dev)
    targets = targets.to(device=dev, dtype=torch.long)
    for s in range(0, n, max(1, chunk_size)):
        e = min(n, s + max(1, chunk_size))
        ids, lp, tail, tgt = _chunk(logits[s:e].float(), targets[s:e], k)
        ids_out[s:e], lp_out[s:e], tail_out[s:e], tgt_out[s:e] = ids, lp, tail, tgt
    return ids_out, lp_out, tail_out, tgt_out


def _chunk(x: torch.Tensor, targets: torch.Tensor, k: int):
    """x [n, V] float32 (may alias the caller's tensor: never written)."""
    vocab = x.shape[1]
    if k == vocab:
        vals, ids = torch.sort(x, dim=1, descending=True)
        lse = torch.logsumexp(vals, dim=1)                                     # (n,)
        tail = torch.full_like(lse, float("-inf"))
    else:
        vals, ids = torch.topk(x, k + 1, dim=1, sorted=True)                   # (n, k+1)
        m2 = vals[:, k:]                                                      # (n, 1) max outside top-k
        m2 = torch.where(torch.isfinite(m2), m2, torch.zeros_like(m2))        # all -inf outside: tail -inf
        ids, vals = ids[:, :k], vals[:, :k]
        buf = torch.sub(x, m2).exp_()                                         # (n, V), <= 1 off the top-k
        buf.scatter_(1, ids, 0.0)                                             # drop the top-k terms
        tail_lse = m2.squeeze(1) + buf.sum(dim=1).log_()                      # (n,) log sum_{not top-k} e^x
        lse = torch.logsumexp(torch.cat([vals, tail_lse[:, None]], dim=1), dim=1)
        tail = tail_lse - lse
    logprobs = vals - lse[:, None]
    target = x.gather(1, targets[:, None]).squeeze(1) - lse
    return ids.to(torch.int32), logprobs, tail, target
