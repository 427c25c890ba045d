"""Per-row divergences between two distributions given as log-probs over the last dim."""

from __future__ import annotations

import math

import torch

from trainer.losses.common import KINDS, replace_neg_inf


def kl_rows(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """``sum_j p_j (log p_j - log q_j)`` per row, with ``p_j = 0`` terms exactly 0.

    A ``q_j = 0`` where ``p_j > 0`` is floored at :data:`NEG_INF_LOGPROB_FLOOR`
    (the true value is +inf).  The double ``where`` keeps -inf out of the
    selected branch so no ``0 * inf`` reaches the forward or backward pass.
    """
    p = torch.exp(lp)
    support = p > 0
    zero = torch.zeros_like(lp)
    diff = torch.where(support, lp, zero) - torch.where(support, replace_neg_inf(lq), zero)
    return (p * diff).sum(dim=-1)


def divergence_rows(a: torch.Tensor, b: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-row divergence between teacher log-probs ``a`` and student log-probs ``b``.

    * ``forward_kl``: KL(P || Q) -- mode-covering, the classic KD objective.
    * ``reverse_kl``: KL(Q || P) -- mode-seeking.  Where the teacher has p = 0
      and the student q > 0 the exact value is +inf; the teacher's log-prob is
      floored at :data:`NEG_INF_LOGPROB_FLOOR` instead.
    * ``jsd``: TRL's generalized JSD, ``beta * KL(P || M) + (1 - beta) * KL(Q || M)``
      with ``M = beta * P + (1 - beta) * Q``; ``beta == 0`` / ``beta == 1`` are
      special-cased to forward / reverse KL (the mixture form itself vanishes at
      both ends, like ``beta * KL(P||Q)`` near 0 and ``(1-beta) * KL(Q||P)`` near 1).
      Always finite: M >= beta * P and M >= (1 - beta) * Q.
    """
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return kl_rows(a, b)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return kl_rows(b, a)
    if kind != "jsd":
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    # Where both are -inf, M is -inf too and both KL terms skip the entry; make the
    # mixture inputs finite there so logaddexp's backward is 0, not NaN.
    both = torch.isneginf(a) & torch.isneginf(b)
    zero = torch.zeros_like(a)
    m = torch.logaddexp(
        torch.where(both, zero, a) + math.log(beta),
        torch.where(both, zero, b) + math.log1p(-beta),
    )
    return beta * kl_rows(a, m) + (1.0 - beta) * kl_rows(b, m)
