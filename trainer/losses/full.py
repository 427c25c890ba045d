"""Losses over the student's full softmax: next-token CE, and full-vocabulary divergences to a live teacher."""

from __future__ import annotations

import torch

from trainer.losses.common import (
    LossInputError,
    LossKind,
    check_labels,
    check_mask,
    check_options,
    compute_dtype,
    log_normalize,
    masked_mean,
)
from trainer.losses.divergence import divergence_rows


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32+ (bf16 logsumexp over a large vocab is lossy).

    Mean over masked positions; labels at masked positions may be padding (-100).
    """
    if student_logits.dim() != 2:
        raise LossInputError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    n = student_logits.shape[0]
    check_labels(labels, n)
    check_mask(mask, n)
    z = student_logits.to(compute_dtype(student_logits))
    safe = torch.where(mask, labels.long(), torch.zeros_like(labels, dtype=torch.long))
    rows = torch.logsumexp(z, dim=-1) - z.gather(1, safe[:, None]).squeeze(1)
    return masked_mean(rows, mask)


def full_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: LossKind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Divergence between full-vocabulary softmaxes (both logits divided by T), times T^2.

    The ground truth that the (k+1)-way losses approximate from below; same
    conventions for ``kind``/``beta`` and for zero probabilities.  Materialises
    two float32 ``[N, V]`` log-softmaxes, so chunk the call for large N.
    """
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
        raise LossInputError(
            f"logits must both be [N, V], got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    check_mask(mask, student_logits.shape[0])
    check_options(kind, temperature, beta)
    dtype = compute_dtype(student_logits)
    b = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    a = log_normalize(teacher_logits.to(dtype) / temperature)
    rows = divergence_rows(a, b, kind, beta) * (temperature * temperature)
    return masked_mean(rows, mask)


def full_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Full-vocabulary forward KL(teacher || student), mean over masked positions."""
    return full_divergence(student_logits, teacher_logits, mask, kind="forward_kl", temperature=temperature)
