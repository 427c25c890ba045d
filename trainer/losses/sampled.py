"""Random-sampling KD from a sampled cache: an importance-weighted estimator of full-vocabulary KL."""

from __future__ import annotations

import torch

from trainer.losses.common import LossInputError, check_logits_ids, check_mask, compute_dtype, masked_mean


def sampled_kd_loss(
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_counts: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Random-sampling KD (Anshumann et al., ACL 2025) from a ``sampled`` cache.

    The cache holds, per position, the distinct ids among S tokens drawn from the
    teacher's full distribution at temperature 1 (``sample_ids [N, S]``) and how
    often each was drawn (``sample_counts [N, S]``; 0 marks padding, whose id is
    ignored).  With ``w_j = c_j / sum_j c_j`` the loss is the cross-entropy of the
    student against that sparse target, ``-sum_j w_j log q(id_j)``, mean over the
    masked positions.  Since ``E[w_j] = p(id_j)``, its gradient w.r.t. the logits,
    ``softmax(z) - w`` (scattered over the whole vocabulary), equals the gradient
    of full-vocabulary forward KL(teacher || student) in expectation -- unbiased,
    unlike any top-k loss.  The *value* estimates ``KL + H(teacher)`` (the
    teacher's entropy, a constant for the student), not KL itself.

    Only temperature 1 keeps it unbiased, so there is no temperature option.  The
    student is upcast to float32+ (a bf16 logsumexp over a large vocabulary loses
    the small probabilities); the ``[N, V]`` upcast is the only large buffer.
    """
    check_logits_ids(student_logits, sample_ids, "sample_ids")
    n = student_logits.shape[0]
    if sample_counts.shape != sample_ids.shape:
        raise LossInputError(
            f"sample_counts {tuple(sample_counts.shape)} must match sample_ids {tuple(sample_ids.shape)}"
        )
    check_mask(mask, n)
    dtype = compute_dtype(student_logits)
    counts = torch.where(mask[:, None], sample_counts.to(dtype), torch.zeros((), dtype=dtype, device=mask.device))
    used = counts > 0
    ids = torch.where(used, sample_ids.long(), torch.zeros_like(sample_ids, dtype=torch.long))
    total = counts.sum(dim=-1, keepdim=True)
    w = counts / total.clamp_min(1.0)  # rows without draws (masked out) have w = 0
    z = student_logits.to(dtype)
    log_q = z.gather(1, ids) - torch.logsumexp(z, dim=-1, keepdim=True)
    rows = -(w * torch.where(used, log_q, torch.zeros_like(log_q))).sum(dim=-1)
    return masked_mean(rows, mask)
