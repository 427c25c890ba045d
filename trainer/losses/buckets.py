"""The (k+1)-way buckets both sides are compared on: k cached ids plus one tail bucket.

The student's side is a fused ``autograd.Function`` over its full logits; the teacher's
side renormalises the cached log-probs and tail.  docs/losses.md derives the backward pass
and says what the fusion saves.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from trainer.losses.common import check_logits_ids, compute_dtype, log_normalize


class _TopkTail(torch.autograd.Function):
    """Fused student buckets: ``(s_topk [N,k], s_tail [N], lse [N])`` of ``z = x / T``.

    Forward, in the compute dtype (float32+): ``m = max(x)``, ``e = exp((x - m) / T)``
    with the top-k slots zeroed in place after gathering them (``e_ids``),
    ``rest = sum(e)`` -- the complement summed directly, so no cancellation --
    and ``S = rest + sum(e_ids)``.  Then ``lse = m / T + log S``,
    ``s_topk = z[ids] - lse`` and ``s_tail = log(rest) - log S``.

    Rows whose ``rest`` is under ``V * tiny / eps`` (tails below about ``e^-58`` of
    the max in float32, including empty complements) may have lost their tail to
    underflow in ``e``; they are recomputed exactly with the complement's own
    maximum as the shift, and their tail softmax ``r`` is kept for backward.

    Backward with ``p = e / S``: ``d s_topk_i / dz_j = [j == id_i] - p_j``,
    ``d s_tail / dz_j = [j not in ids] e_j / rest - p_j`` (``r_j - p_j`` for the
    recomputed rows; 0 where the tail is -inf, as for a constant), and
    ``d lse / dz_j = p_j``; all times ``1 / T`` for ``x``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, ids: torch.Tensor, temperature: float):
        dtype = compute_dtype(x)
        inv_t = 1.0 / temperature
        m = x.amax(dim=-1, keepdim=True).to(dtype)  # exact in any dtype
        e = torch.sub(x, m)  # promotes to ``dtype``: one fresh buffer, reused in place below
        if temperature != 1.0:
            e.mul_(inv_t)
        e.exp_()
        e_ids = e.gather(1, ids)
        e.scatter_(1, ids, 0.0)
        rest = e.sum(dim=-1)
        total = rest + e_ids.sum(dim=-1)
        log_total = total.log()
        m = m.squeeze(1) * inv_t
        lse = m + log_total
        s_topk = x.gather(1, ids).to(dtype) * inv_t - lse[:, None]
        s_tail = rest.log() - log_total
        tail_coef = 1.0 / rest  # times e_j: d s_tail / dz_j beyond -p_j (inf where rest == 0: replaced below)

        # Each of V underflowed terms loses at most ``tiny``; below this bound that
        # loss could exceed float rounding of ``rest``.
        finfo = torch.finfo(dtype)
        low = rest < x.shape[1] * finfo.tiny / finfo.eps
        rows = low.nonzero().squeeze(1) if bool(low.any()) else None
        r = None
        if rows is not None:
            zr = x[rows].to(dtype)
            if temperature != 1.0:
                zr = zr * inv_t
            zr.scatter_(1, ids[rows], -math.inf)
            mt = zr.amax(dim=-1, keepdim=True)
            empty = torch.isneginf(mt)
            er = torch.exp(zr - torch.where(empty, torch.zeros_like(mt), mt))  # empty rows: all 0
            rest_r = er.sum(dim=-1, keepdim=True)
            r = torch.where(empty, torch.zeros_like(er), er / rest_r)
            tail_r = torch.where(empty, torch.full_like(mt, -math.inf), mt + rest_r.log()).squeeze(1)
            s_tail = s_tail.index_copy(0, rows, tail_r - lse[rows])
            tail_coef = tail_coef.index_fill(0, rows, 0.0)
        ctx.temperature = temperature
        ctx.in_dtype = x.dtype
        ctx.has_rows = rows is not None
        extra = (rows, r) if rows is not None else ()
        ctx.save_for_backward(e, ids, e_ids, total, tail_coef, torch.isfinite(s_tail), *extra)
        return s_topk, s_tail, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, g_topk, g_tail, g_lse):
        e, ids, e_ids, total, tail_coef, tail_finite, *extra = ctx.saved_tensors
        dtype = e.dtype
        n = e.shape[0]
        zeros = torch.zeros(n, dtype=dtype, device=e.device)
        g_topk = torch.zeros_like(e_ids) if g_topk is None else g_topk.to(dtype)
        g_tail = zeros if g_tail is None else torch.where(tail_finite, g_tail.to(dtype), zeros)
        g_lse = zeros if g_lse is None else g_lse.to(dtype)
        inv_t = 1.0 / ctx.temperature
        # coefficient of p_j = e_j / S, shared by every column
        coef = (g_lse - g_topk.sum(dim=-1) - g_tail) / total
        row = (coef + g_tail * tail_coef) * inv_t
        dz = e * row[:, None]  # top-k slots of e are 0
        dz.scatter_(1, ids, (e_ids * coef[:, None] + g_topk) * inv_t)
        if ctx.has_rows:
            rows, r = extra
            dz.index_add_(0, rows, r * (g_tail[rows] * inv_t)[:, None])
        return dz.to(ctx.in_dtype), None, None


def _student_buckets(
    x: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student log-probs at ``ids`` and log-mass outside them, for logits ``x / temperature``.

    Returns ``(s_topk [N,k], s_tail [N], lse [N])`` in the compute dtype; ``x``
    may be in any float dtype (the upcast happens inside, see :class:`_TopkTail`).
    The tail is the complement summed directly rather than
    ``log1mexp(logsumexp(s_topk))``, which cancels catastrophically once the tail
    drops below float eps and would hand the KL a wrong (or -inf) student tail
    exactly when the student is confident.  It is -inf with a zero gradient when
    nothing lies outside ``ids``.
    """
    return _TopkTail.apply(x, ids, float(temperature))


def student_topk_and_tail(student_logits: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probs at the teacher's top-k ids and its log mass outside them.

    Returns ``(s_topk [N, k], s_tail [N])`` in float32 (float64 for float64 input).
    ``s_tail`` equals ``log1mexp(logsumexp(s_topk))`` mathematically but is
    computed by summing the complement, which is accurate for tails far below
    float eps (and below float32's range relative to the max); it is -inf (with
    zero gradient) when the ids cover the vocab.
    """
    check_logits_ids(student_logits, topk_ids)
    s_topk, s_tail, _ = _student_buckets(student_logits, topk_ids.long())
    return s_topk, s_tail


def teacher_buckets(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Teacher (k+1)-way (or k-way if ``tail_logmass`` is None) log-probs at ``temperature``.

    Bucket temperature: ``p'_i ∝ exp(t_i / T)`` and ``p'_tail ∝ exp(tail / T)``,
    i.e. the tail bucket is tempered as if it were one token.  The renormalisation
    is a no-op up to rounding at T = 1 and absorbs small inconsistencies of the
    cache (top-k mass + tail mass != 1 by a few ulps).
    """
    x = topk_logprobs if tail_logmass is None else torch.cat([topk_logprobs, tail_logmass[:, None]], dim=-1)
    if temperature != 1.0:
        x = x / temperature
    return log_normalize(x)


def fold_zero_slots_into_tail(
    s_topk: torch.Tensor, s_tail: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the student's mass at slots where the teacher has p = 0 into the tail bucket.

    A cached slot with teacher log-prob -inf (a variable-k encoding's padding, or a token the
    teacher masks out) carries no teacher mass, so it belongs with the tail: the (k+1)-way
    partition stays a coarsening of the full vocabulary whichever ids pad the row, and padding
    neither adds teacher mass nor hides student mass. The slot then reads -inf on both sides and
    the divergence skips it. Applied to forward KL only, where it is exact; reverse KL and JSD keep
    their floor convention for p = 0 slots (their value there is +inf in truth), so caches with
    padded rows (`adaptive`) should be distilled with forward KL.
    """
    pad = torch.isneginf(t)
    if not bool(pad.any()):  # skips the work below for the usual unpadded batch
        return s_topk, s_tail
    has_pad = pad.any(dim=-1)
    # A finite fill (not -inf) keeps logsumexp's backward free of NaN on rows without padding.
    pad_lse = torch.logsumexp(s_topk.masked_fill(~pad, -1e30), dim=-1)
    s_tail = torch.where(has_pad, torch.logaddexp(s_tail, pad_lse), s_tail)
    return s_topk.masked_fill(pad, float("-inf")), s_tail
