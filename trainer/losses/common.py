"""Numerics and argument checks shared by every loss: dtype, safe logsumexp, log1mexp, masked means."""

from __future__ import annotations

import math
from typing import Literal

import torch

LossKind = Literal["forward_kl", "reverse_kl", "jsd"]
KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")

# Log-probability substituted for an exact zero where it would otherwise make the
# loss infinite: a teacher p = 0 under reverse KL (true value: +inf) or a student
# q = 0 where the teacher has mass under forward KL.  e^-100 ~ 4e-44 is far below
# anything a float32 softmax assigns on purpose, so finite log-probs are never
# touched; only exact -inf is replaced (keeping gradients of finite entries).
NEG_INF_LOGPROB_FLOOR = -100.0

_LN2 = math.log(2.0)


class LossInputError(ValueError, AssertionError):
    """A loss was given a tensor of the wrong shape, dtype or kind.

    A ``ValueError``; also an ``AssertionError`` because these checks were asserts
    before, and callers may still catch that.
    """


def _shape(x: torch.Tensor) -> str:
    return f"{x.dtype} {tuple(x.shape)}"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32: bf16/fp16 softmax loses all but the largest few probabilities."""
    return torch.promote_types(x.dtype, torch.float32)


def safe_logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """logsumexp that returns -inf for all--inf rows with a zero (not NaN) gradient.

    ``torch.logsumexp`` backward computes ``exp(x - lse)`` which is
    ``exp(-inf + inf) = NaN`` when a whole row is -inf, even if the upstream
    gradient is zero.
    """
    empty = torch.isneginf(x).all(dim=dim, keepdim=True)
    lse = torch.logsumexp(torch.where(empty, torch.zeros_like(x), x), dim=dim, keepdim=True)
    lse = torch.where(empty, torch.full_like(lse, -math.inf), lse)
    return lse if keepdim else lse.squeeze(dim)


def log_normalize(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim; an all--inf row stays all--inf (no NaN)."""
    lse = safe_logsumexp(x, dim=-1, keepdim=True)
    return x - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def replace_neg_inf(x: torch.Tensor, floor: float = NEG_INF_LOGPROB_FLOOR) -> torch.Tensor:
    return torch.where(torch.isneginf(x), torch.full_like(x, floor), x)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable across the whole range.

    Uses ``log(-expm1(x))`` for ``x > -ln 2`` and ``log1p(-exp(x))`` otherwise
    (Maechler 2012).  Inputs slightly above 0 (rounding in a logsumexp of
    log-probs) are treated as 0 and give -inf; the gradient there is 0 rather
    than NaN/inf, so a downstream mask can discard it safely.

    Useful where only top-k log-probs are available (e.g. deriving a cache's tail).
    Note it cannot recover a tail smaller than the float eps of ``1 - exp(x)``
    (~6e-8 in float32); :func:`student_topk_and_tail` therefore sums the
    complement directly instead.
    """
    # Each branch only sees inputs from its own range (others replaced by -1), so
    # neither can produce an inf whose gradient, masked by ``where``, turns to NaN.
    at_or_above_zero = x >= 0
    near = (x > -_LN2) & ~at_or_above_zero
    minus_one = torch.full_like(x, -1.0)
    near_val = torch.log(-torch.expm1(torch.where(near, x, minus_one)))
    far_val = torch.log1p(-torch.exp(torch.where(near | at_or_above_zero, minus_one, x)))
    out = torch.where(near, near_val, far_val)
    return torch.where(at_or_above_zero, torch.full_like(out, -math.inf), out)


def masked_mean(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked rows; 0 (still attached to the graph) when nothing is masked in."""
    total = torch.where(mask, rows, torch.zeros_like(rows)).sum()
    return total / mask.sum().clamp_min(1).to(total.dtype)


def check_logits_ids(student_logits: torch.Tensor, ids: torch.Tensor, name: str = "topk_ids") -> None:
    """``student_logits`` float ``[N, V]`` and ``ids`` integer ``[N, k]`` with ``1 <= k <= V``."""
    if student_logits.dim() != 2:
        raise LossInputError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    if not student_logits.is_floating_point():
        raise LossInputError(f"student_logits must be a float tensor, got {student_logits.dtype}")
    n, v = student_logits.shape
    if ids.dim() != 2 or ids.shape[0] != n:
        raise LossInputError(f"{name} must be [N, k] with N={n}, got {tuple(ids.shape)}")
    if ids.is_floating_point():
        raise LossInputError(f"{name} must be an integer tensor, got {ids.dtype}")
    if not 1 <= ids.shape[1] <= v:
        raise LossInputError(f"{name}: need 1 <= k <= V, got k={ids.shape[1]}, V={v}")


def check_mask(mask: torch.Tensor, n: int) -> None:
    if mask.shape != (n,) or mask.dtype != torch.bool:
        raise LossInputError(f"mask must be bool [{n}], got {_shape(mask)}")


def check_labels(labels: torch.Tensor, n: int) -> None:
    if labels.shape != (n,) or labels.is_floating_point():
        raise LossInputError(f"labels must be integer [{n}], got {_shape(labels)}")


def check_teacher(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    check_logits_ids(student_logits, topk_ids)
    n = student_logits.shape[0]
    if topk_logprobs.shape != topk_ids.shape:
        raise LossInputError(
            f"topk_logprobs {tuple(topk_logprobs.shape)} must match topk_ids {tuple(topk_ids.shape)}"
        )
    if not topk_logprobs.is_floating_point():
        raise LossInputError(f"topk_logprobs must be a float tensor, got {topk_logprobs.dtype}")
    if tail_logmass.shape != (n,):
        raise LossInputError(f"tail_logmass must be [{n}], got {tuple(tail_logmass.shape)}")
    check_mask(mask, n)


def check_options(kind: str, temperature: float, beta: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
