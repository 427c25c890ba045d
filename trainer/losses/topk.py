"""KD losses against a top-k cache: exact divergences over the (k+1)-way top-k + tail buckets."""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from trainer.losses.buckets import _student_buckets, fold_zero_slots_into_tail, teacher_buckets
from trainer.losses.common import (
    LossKind,
    check_labels,
    check_options,
    check_teacher,
    compute_dtype,
    log1mexp,
)
from trainer.losses.divergence import divergence_rows


def _sanitize_teacher(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    mask: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace masked-out rows by a uniform (k+1)-way teacher on id 0.

    Masked rows are dropped from the mean, but their arithmetic still runs and
    a NaN there would poison the backward pass through ``where``.
    """
    k = topk_ids.shape[1]
    fill = -math.log(k + 1)
    ids = torch.where(mask[:, None], topk_ids.long(), torch.zeros_like(topk_ids, dtype=torch.long))
    t = topk_logprobs.to(dtype)
    t = torch.where(mask[:, None], t, torch.full_like(t, fill))
    tail = tail_logmass.to(dtype)
    tail = torch.where(mask, tail, torch.full_like(tail, fill))
    return ids, t, tail


def _chunk_sums(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    t: torch.Tensor,
    tail: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    kind: str,
    beta: float,
    temperature: float,
    renormalize_topk: bool,
    ce_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked sums over one chunk: (kd, ce, teacher tail mass, student tail mass).

    Inputs must already be sanitised.  ``kd`` includes the T^2 factor.  ``ce`` is
    at temperature 1 and built without a graph unless ``ce_grad``.  The two tail
    masses are detached metrics.  Everything float32+ lives only inside this call,
    which is what lets :func:`distill_loss` checkpoint it per chunk.
    """
    dtype = compute_dtype(student_logits)
    zero = torch.zeros((), dtype=dtype, device=student_logits.device)

    if renormalize_topk:
        z1 = student_logits.to(dtype)
        z = z1 / temperature if temperature != 1.0 else z1
        a = teacher_buckets(t, None, temperature)
        b = torch.log_softmax(z.gather(1, ids), dim=-1)
        with torch.no_grad():
            lse = torch.logsumexp(z, dim=-1)
            # metric only: cancellation for tiny tails is harmless here
            s_tail = log1mexp(torch.logsumexp(z.gather(1, ids), dim=-1) - lse)
    else:
        s_topk, s_tail, lse = _student_buckets(student_logits, ids, temperature)
        if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
            s_topk, s_tail = fold_zero_slots_into_tail(s_topk, s_tail, t)
        a = teacher_buckets(t, tail, temperature)
        b = torch.cat([s_topk, s_tail[:, None]], dim=-1)

    kd_rows = divergence_rows(a, b, kind, beta)
    if temperature != 1.0:
        kd_rows = kd_rows * (temperature * temperature)
    kd = torch.where(mask, kd_rows, zero).sum()

    if labels is None:
        ce = zero
    else:
        with torch.set_grad_enabled(ce_grad and torch.is_grad_enabled()):
            # reuse the KD logsumexp only when it is at T = 1 and carries a graph
            reuse = temperature == 1.0 and not renormalize_topk
            lse1 = lse if reuse else torch.logsumexp(student_logits.to(dtype), dim=-1)
            ce_rows = lse1 - student_logits.gather(1, labels[:, None]).squeeze(1).to(dtype)
            ce = torch.where(mask, ce_rows, zero).sum()

    with torch.no_grad():
        t_tail_mass = torch.where(mask, tail.exp(), zero).sum()
        s_tail_mass = torch.where(mask, s_tail.detach().exp(), zero).sum()
    return kd, ce, t_tail_mass, s_tail_mass


def _kd_mean(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str,
    beta: float,
    temperature: float,
    renormalize_topk: bool,
) -> torch.Tensor:
    check_teacher(student_logits, topk_ids, topk_logprobs, tail_logmass, mask)
    check_options(kind, temperature, beta)
    ids, t, tail = _sanitize_teacher(topk_ids, topk_logprobs, tail_logmass, mask, compute_dtype(student_logits))
    kd, _, _, _ = _chunk_sums(
        student_logits, ids, t, tail, None, mask,
        kind=kind, beta=beta, temperature=temperature, renormalize_topk=renormalize_topk, ce_grad=False,
    )
    return kd / mask.sum().clamp_min(1).to(kd.dtype)


_TEMPERATURE_DOC = """
    Temperature: the student logits are divided by ``temperature`` (exact, the
    student has its full logits).  The teacher is re-tempered with *bucket
    temperature*: ``p'_i ∝ exp(t_i / T)``, ``p'_tail ∝ exp(tail_logmass / T)``.
    Exact: everything at T = 1; at any T the ratios among the k cached tokens
    (``t_i / T`` equals the tempered logit up to a shared constant).  Approximate:
    the tempered tail mass, because the true tempered tail sums ``exp(t_j / T)``
    over the individual tail tokens while the bucket uses ``(sum_j exp(t_j))^(1/T)``;
    for T > 1 this under-estimates the tail (and over-estimates it for T < 1),
    and it is exact when the tail holds a single token (k = V - 1) or is empty.
    Consequently at T != 1 even a student identical to the teacher has a small
    non-zero loss when the tail has several tokens.  The loss is multiplied by
    T^2 so gradient magnitudes stay comparable across temperatures (Hinton et al.).

    ``renormalize_topk=True`` drops the tail bucket and renormalises teacher and
    student over the k cached ids.  This is biased: it ignores how much mass the
    student puts outside the teacher's top-k, so it is not a lower bound on the
    full-vocabulary divergence and a student can lower it while moving mass into
    the tail.  It coincides with the tail-exact loss only when k == V.
"""


def forward_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    renormalize_topk: bool = False,
) -> torch.Tensor:
    """KL(teacher || student) over the (k+1)-way top-k + tail distribution.

    ``sum_i p_i (t_i - s_i) + P_tail (log P_tail - log S_tail)``; p = 0 terms are
    exactly 0.  Mean over masked positions.
    """
    return _kd_mean(
        student_logits, topk_ids, topk_logprobs, tail_logmass, mask,
        kind="forward_kl", beta=0.0, temperature=temperature, renormalize_topk=renormalize_topk,
    )


def reverse_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    renormalize_topk: bool = False,
) -> torch.Tensor:
    """KL(student || teacher) over the (k+1)-way top-k + tail distribution.

    A teacher p = 0 where the student has mass would make this +inf; such teacher
    log-probs are floored at :data:`NEG_INF_LOGPROB_FLOOR` so the loss stays finite
    and keeps pushing that student mass down.  Mean over masked positions.
    """
    return _kd_mean(
        student_logits, topk_ids, topk_logprobs, tail_logmass, mask,
        kind="reverse_kl", beta=1.0, temperature=temperature, renormalize_topk=renormalize_topk,
    )


def generalized_jsd(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    renormalize_topk: bool = False,
) -> torch.Tensor:
    """Generalized JSD over the (k+1)-way distribution, TRL's convention.

    ``beta * KL(P || M) + (1 - beta) * KL(Q || M)`` with ``M = beta P + (1 - beta) Q``
    (P teacher, Q student).  ``beta = 0`` returns forward KL(P || Q) and
    ``beta = 1`` reverse KL(Q || P) exactly, as TRL's GKD does; note the mixture
    expression itself tends to 0 at both ends (~ beta * KL(P||Q) as beta -> 0), so
    the value is discontinuous at the endpoints.  ``beta = 0.5`` is the ordinary
    Jensen-Shannon divergence.  Mean over masked positions.
    """
    return _kd_mean(
        student_logits, topk_ids, topk_logprobs, tail_logmass, mask,
        kind="jsd", beta=beta, temperature=temperature, renormalize_topk=renormalize_topk,
    )


forward_kl.__doc__ = (forward_kl.__doc__ or "") + _TEMPERATURE_DOC
reverse_kl.__doc__ = (reverse_kl.__doc__ or "") + _TEMPERATURE_DOC
generalized_jsd.__doc__ = (generalized_jsd.__doc__ or "") + _TEMPERATURE_DOC


def distill_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    kind: LossKind = "forward_kl",
    alpha_ce: float = 0.0,
    temperature: float = 1.0,
    renormalize_topk: bool = False,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(1 - alpha_ce) * KD + alpha_ce * CE``, optionally computed in chunks of positions.

    ``kind`` picks :func:`forward_kl`, :func:`reverse_kl` or :func:`generalized_jsd`
    (with ``beta``); ``temperature`` and ``renormalize_topk`` mean the same as
    there (KD includes the T^2 factor; CE is always at T = 1 on the raw logits).
    ``labels`` may be None when ``alpha_ce == 0``; when given, CE is also reported
    as a metric.

    With ``chunk_size`` set, positions are processed ``chunk_size`` rows at a
    time and each chunk is wrapped in non-reentrant activation checkpointing, so
    the float32 ``[chunk, V]`` buffers (upcast logits, complement for the tail)
    exist for one chunk at a time in both forward and backward instead of for all
    N; the price is recomputing each chunk's forward once during backward.
    Chunking only reorders a sum: value and gradients match the unchunked path up
    to float rounding.  The ``[N, V]`` gradient w.r.t. ``student_logits`` (in its
    own dtype) is still materialised.

    Returns ``(loss, metrics)``; metrics are detached 0-dim tensors (no host sync
    here -- call ``.item()`` when logging): ``loss``, ``kd``, ``ce`` (NaN when
    ``labels`` is None), ``n_tokens``, ``teacher_tail_mass`` and
    ``student_tail_mass`` (means over masked positions; the student's is at the
    distillation temperature).
    """
    check_teacher(student_logits, topk_ids, topk_logprobs, tail_logmass, mask)
    check_options(kind, temperature, beta)
    if not 0.0 <= alpha_ce <= 1.0:
        raise ValueError(f"alpha_ce must be in [0, 1], got {alpha_ce}")
    if labels is None and alpha_ce > 0.0:
        raise ValueError("alpha_ce > 0 needs labels")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = student_logits.shape[0]
    dtype = compute_dtype(student_logits)

    ids, t, tail = _sanitize_teacher(topk_ids, topk_logprobs, tail_logmass, mask, dtype)
    safe_labels = None
    if labels is not None:
        check_labels(labels, n)
        safe_labels = torch.where(mask, labels.long(), torch.zeros_like(labels, dtype=torch.long))

    def run(lg: torch.Tensor, i: torch.Tensor, tt: torch.Tensor, tl: torch.Tensor,
            lb: torch.Tensor | None, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _chunk_sums(
            lg, i, tt, tl, lb, m,
            kind=kind, beta=beta, temperature=temperature,
            renormalize_topk=renormalize_topk, ce_grad=alpha_ce > 0.0,
        )

    step = max(n, 1) if chunk_size is None else min(chunk_size, max(n, 1))
    # Checkpointing only pays off with several chunks: with one, its buffers would
    # be alive at the start of backward either way.
    use_ckpt = step < n and torch.is_grad_enabled() and student_logits.requires_grad
    sums = [torch.zeros((), dtype=dtype, device=student_logits.device) for _ in range(4)]
    for start in range(0, max(n, 1), step):
        sl = slice(start, start + step)
        args = (student_logits[sl], ids[sl], t[sl], tail[sl],
                None if safe_labels is None else safe_labels[sl], mask[sl])
        out = checkpoint(run, *args, use_reentrant=False) if use_ckpt else run(*args)
        sums = [acc + part for acc, part in zip(sums, out)]
    kd_sum, ce_sum, t_tail_sum, s_tail_sum = sums

    count = mask.sum().clamp_min(1).to(dtype)
    kd = kd_sum / count
    ce = ce_sum / count
    loss = kd if alpha_ce == 0.0 else (1.0 - alpha_ce) * kd + alpha_ce * ce

    metrics = {
        "loss": loss.detach(),
        "kd": kd.detach(),
        "ce": ce.detach() if labels is not None else torch.full((), math.nan, dtype=dtype, device=ce.device),
        "n_tokens": mask.sum().detach(),
        "teacher_tail_mass": (t_tail_sum / count).detach(),
        "student_tail_mass": (s_tail_sum / count).detach(),
    }
    return loss, metrics
