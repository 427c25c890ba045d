"""Knowledge-distillation losses against a cached, truncated teacher distribution.

A cache stores, per position, the teacher's top-k token ids, their log-probs
(normalised over the *full* vocabulary) and ``tail_logmass = log(1 - sum_i p_i)``,
the exact log of the probability mass outside the top-k.  Together these define a
proper (k+1)-way distribution: the k cached tokens plus one "tail" bucket.  The
student's full softmax collapses onto the same k+1 outcomes (its log-probs at the
cached ids, plus its own mass outside them), so every divergence here is an exact
divergence between two (k+1)-way distributions.  By the data-processing
inequality it lower-bounds the full-vocabulary divergence, equals it when
k == V, and -- unlike the common "renormalise over the top-k" shortcut -- it
penalises a student that puts too much (or too little) mass outside the teacher's
top-k.

Conventions shared by every function:

* ``student_logits`` is ``[N, V]`` (a flattened batch of positions) in any float
  dtype; it is upcast to at least float32 before any softmax / logsumexp so that
  bf16 logits do not lose the tail.  float64 input stays float64 (gradcheck).
* ``topk_ids`` ``[N, k]`` integer, distinct within a row; ``topk_logprobs``
  ``[N, k]`` and ``tail_logmass`` ``[N]`` may contain ``-inf`` (probability 0).
* ``mask`` ``[N]`` bool selects the positions that count.  Losses are means over
  the masked positions; an all-masked batch gives exactly 0 with a (zero)
  gradient.  Rows outside the mask may hold padding (ids -100, NaN log-probs):
  they are replaced by a harmless dummy row before any arithmetic, so they can
  neither crash ``gather`` nor leak NaN into gradients.
* KL terms with zero probability on the "from" side contribute exactly 0, never
  ``0 * inf = NaN``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = [
    "LossKind",
    "NEG_INF_LOGPROB_FLOOR",
    "log1mexp",
    "student_topk_and_tail",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "cross_entropy",
    "distill_loss",
    "full_divergence",
    "full_kl",
    "sampled_kd_loss",
]

LossKind = Literal["forward_kl", "reverse_kl", "jsd"]
_KINDS = ("forward_kl", "reverse_kl", "jsd")

# Log-probability substituted for an exact zero where it would otherwise make the
# loss infinite: a teacher p = 0 under reverse KL (true value: +inf) or a student
# q = 0 where the teacher has mass under forward KL.  e^-100 ~ 4e-44 is far below
# anything a float32 softmax assigns on purpose, so finite log-probs are never
# touched; only exact -inf is replaced (keeping gradients of finite entries).
NEG_INF_LOGPROB_FLOOR = -100.0

_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------
# small numerics helpers
# ---------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32: bf16/fp16 softmax loses all but the largest few probabilities."""
    return torch.promote_types(x.dtype, torch.float32)


def _safe_logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """logsumexp that returns -inf for all--inf rows with a zero (not NaN) gradient.

    ``torch.logsumexp`` backward computes ``exp(x - lse)`` which is
    ``exp(-inf + inf) = NaN`` when a whole row is -inf, even if the upstream
    gradient is zero.
    """
    empty = torch.isneginf(x).all(dim=dim, keepdim=True)
    lse = torch.logsumexp(torch.where(empty, torch.zeros_like(x), x), dim=dim, keepdim=True)
    lse = torch.where(empty, torch.full_like(lse, -math.inf), lse)
    return lse if keepdim else lse.squeeze(dim)


def _log_normalize(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim; an all--inf row stays all--inf (no NaN)."""
    lse = _safe_logsumexp(x, dim=-1, keepdim=True)
    return x - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def _replace_neg_inf(x: torch.Tensor, floor: float = NEG_INF_LOGPROB_FLOOR) -> torch.Tensor:
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


# ---------------------------------------------------------------------------
# (k+1)-way distributions
# ---------------------------------------------------------------------------


class _TopkTail(torch.autograd.Function):
    """Fused student buckets: ``(s_topk [N,k], s_tail [N], lse [N])`` of ``z = x / T``.

    Forward, in the compute dtype (float32+): ``m = max(x)``, ``e = exp((x - m) / T)``
    with the top-k slots zeroed in place after gathering them (``e_ids``),
    ``rest = sum(e)`` -- the complement summed directly, so no cancellation --
    and ``S = rest + sum(e_ids)``.  Then ``lse = m / T + log S``,
    ``s_topk = z[ids] - lse`` and ``s_tail = log(rest) - log S``.  That is one
    ``[N, V]`` buffer (``e``) and four passes over it, against two logsumexps,
    a scatter copy and an amax before.

    A tail far below the row's maximum underflows in ``e`` (float32 exp flushes
    below ~1e-38, and ``V`` such losses bound the absolute error of ``rest`` by
    ``V * tiny``).  Rows whose ``rest`` is under ``V * tiny / eps`` -- tails below
    about ``e^-58`` of the max in float32, including empty complements -- are
    recomputed exactly with the complement's own maximum as the shift; their
    tail softmax ``r`` (``[rows, V]``) is kept for backward.  Detecting them is
    one host sync on accelerators.

    Backward with ``p = e / S``: ``d s_topk_i / dz_j = [j == id_i] - p_j``,
    ``d s_tail / dz_j = [j not in ids] e_j / rest - p_j`` (``r_j - p_j`` for the
    recomputed rows; 0 where the tail is -inf, as for a constant), and
    ``d lse / dz_j = p_j``; all times ``1 / T`` for ``x``.  Only ``e`` (top-k
    slots zeroed), ``e_ids`` and per-row scalars are saved.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, ids: torch.Tensor, temperature: float):
        dtype = _compute_dtype(x)
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
    _check_logits_ids(student_logits, topk_ids)
    s_topk, s_tail, _ = _student_buckets(student_logits, topk_ids.long())
    return s_topk, s_tail


def _teacher_buckets(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Teacher (k+1)-way (or k-way if ``tail_logmass`` is None) log-probs at ``temperature``.

    Bucket temperature: ``p'_i ∝ exp(t_i / T)`` and ``p'_tail ∝ exp(tail / T)``,
    i.e. the tail bucket is tempered as if it were one token.  The renormalisation
    is a no-op up to rounding at T = 1 and absorbs small inconsistencies of the
    cache (top-k mass + tail mass != 1 by a few ulps).
    """
    x = topk_logprobs if tail_logmass is None else torch.cat([topk_logprobs, tail_logmass[:, None]], dim=-1)
    if temperature != 1.0:
        x = x / temperature
    return _log_normalize(x)


# ---------------------------------------------------------------------------
# divergences between two distributions given as log-probs over the last dim
# ---------------------------------------------------------------------------


def _kl_rows(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """``sum_j p_j (log p_j - log q_j)`` per row, with ``p_j = 0`` terms exactly 0.

    A ``q_j = 0`` where ``p_j > 0`` is floored at :data:`NEG_INF_LOGPROB_FLOOR`
    (the true value is +inf).  The double ``where`` keeps -inf out of the
    selected branch so no ``0 * inf`` reaches the forward or backward pass.
    """
    p = torch.exp(lp)
    support = p > 0
    zero = torch.zeros_like(lp)
    diff = torch.where(support, lp, zero) - torch.where(support, _replace_neg_inf(lq), zero)
    return (p * diff).sum(dim=-1)


def _divergence_rows(a: torch.Tensor, b: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
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
        return _kl_rows(a, b)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl_rows(b, a)
    if kind != "jsd":
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {_KINDS}")
    # Where both are -inf, M is -inf too and both KL terms skip the entry; make the
    # mixture inputs finite there so logaddexp's backward is 0, not NaN.
    both = torch.isneginf(a) & torch.isneginf(b)
    zero = torch.zeros_like(a)
    m = torch.logaddexp(
        torch.where(both, zero, a) + math.log(beta),
        torch.where(both, zero, b) + math.log1p(-beta),
    )
    return beta * _kl_rows(a, m) + (1.0 - beta) * _kl_rows(b, m)


def _masked_mean(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked rows; 0 (still attached to the graph) when nothing is masked in."""
    total = torch.where(mask, rows, torch.zeros_like(rows)).sum()
    return total / mask.sum().clamp_min(1).to(total.dtype)


# ---------------------------------------------------------------------------
# input checking / sanitising
# ---------------------------------------------------------------------------


def _check_logits_ids(student_logits: torch.Tensor, topk_ids: torch.Tensor) -> None:
    assert student_logits.dim() == 2, f"student_logits must be [N, V], got {tuple(student_logits.shape)}"
    assert student_logits.is_floating_point(), "student_logits must be a float tensor"
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == student_logits.shape[0], (
        f"topk_ids must be [N, k] with N={student_logits.shape[0]}, got {tuple(topk_ids.shape)}"
    )
    assert not topk_ids.is_floating_point(), "topk_ids must be an integer tensor"
    assert 1 <= topk_ids.shape[1] <= student_logits.shape[1], (
        f"need 1 <= k <= V, got k={topk_ids.shape[1]}, V={student_logits.shape[1]}"
    )


def _check_teacher(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    _check_logits_ids(student_logits, topk_ids)
    n = student_logits.shape[0]
    assert topk_logprobs.shape == topk_ids.shape, (
        f"topk_logprobs {tuple(topk_logprobs.shape)} must match topk_ids {tuple(topk_ids.shape)}"
    )
    assert topk_logprobs.is_floating_point(), "topk_logprobs must be a float tensor"
    assert tail_logmass.shape == (n,), f"tail_logmass must be [{n}], got {tuple(tail_logmass.shape)}"
    assert mask.shape == (n,) and mask.dtype == torch.bool, f"mask must be bool [{n}]"


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


def _check_options(kind: str, temperature: float, beta: float) -> None:
    if kind not in _KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {_KINDS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


# ---------------------------------------------------------------------------
# per-chunk worker shared by the public losses and distill_loss
# ---------------------------------------------------------------------------


def _fold_zero_slots_into_tail(
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
    if not bool(pad.any()):  # the common case: nothing to fold
        return s_topk, s_tail
    has_pad = pad.any(dim=-1)
    # A finite fill (not -inf) keeps logsumexp's backward free of NaN on rows without padding.
    pad_lse = torch.logsumexp(s_topk.masked_fill(~pad, -1e30), dim=-1)
    s_tail = torch.where(has_pad, torch.logaddexp(s_tail, pad_lse), s_tail)
    return s_topk.masked_fill(pad, float("-inf")), s_tail


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
    dtype = _compute_dtype(student_logits)
    zero = torch.zeros((), dtype=dtype, device=student_logits.device)

    if renormalize_topk:
        z1 = student_logits.to(dtype)
        z = z1 / temperature if temperature != 1.0 else z1
        a = _teacher_buckets(t, None, temperature)
        b = torch.log_softmax(z.gather(1, ids), dim=-1)
        with torch.no_grad():
            lse = torch.logsumexp(z, dim=-1)
            # metric only: cancellation for tiny tails is harmless here
            s_tail = log1mexp(torch.logsumexp(z.gather(1, ids), dim=-1) - lse)
    else:
        s_topk, s_tail, lse = _student_buckets(student_logits, ids, temperature)
        if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
            s_topk, s_tail = _fold_zero_slots_into_tail(s_topk, s_tail, t)
        a = _teacher_buckets(t, tail, temperature)
        b = torch.cat([s_topk, s_tail[:, None]], dim=-1)

    kd_rows = _divergence_rows(a, b, kind, beta)
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
    _check_teacher(student_logits, topk_ids, topk_logprobs, tail_logmass, mask)
    _check_options(kind, temperature, beta)
    ids, t, tail = _sanitize_teacher(topk_ids, topk_logprobs, tail_logmass, mask, _compute_dtype(student_logits))
    kd, _, _, _ = _chunk_sums(
        student_logits, ids, t, tail, None, mask,
        kind=kind, beta=beta, temperature=temperature, renormalize_topk=renormalize_topk, ce_grad=False,
    )
    return kd / mask.sum().clamp_min(1).to(kd.dtype)


# ---------------------------------------------------------------------------
# public losses
# ---------------------------------------------------------------------------

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


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32+ (bf16 logsumexp over a large vocab is lossy).

    Mean over masked positions; labels at masked positions may be padding (-100).
    """
    assert student_logits.dim() == 2, f"student_logits must be [N, V], got {tuple(student_logits.shape)}"
    n = student_logits.shape[0]
    assert labels.shape == (n,) and not labels.is_floating_point(), f"labels must be integer [{n}]"
    assert mask.shape == (n,) and mask.dtype == torch.bool, f"mask must be bool [{n}]"
    z = student_logits.to(_compute_dtype(student_logits))
    safe = torch.where(mask, labels.long(), torch.zeros_like(labels, dtype=torch.long))
    rows = torch.logsumexp(z, dim=-1) - z.gather(1, safe[:, None]).squeeze(1)
    return _masked_mean(rows, mask)


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
    _check_teacher(student_logits, topk_ids, topk_logprobs, tail_logmass, mask)
    _check_options(kind, temperature, beta)
    if not 0.0 <= alpha_ce <= 1.0:
        raise ValueError(f"alpha_ce must be in [0, 1], got {alpha_ce}")
    if labels is None and alpha_ce > 0.0:
        raise ValueError("alpha_ce > 0 needs labels")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = student_logits.shape[0]
    dtype = _compute_dtype(student_logits)

    ids, t, tail = _sanitize_teacher(topk_ids, topk_logprobs, tail_logmass, mask, dtype)
    safe_labels = None
    if labels is not None:
        assert labels.shape == (n,) and not labels.is_floating_point(), f"labels must be integer [{n}]"
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


# ---------------------------------------------------------------------------
# full-vocabulary references (tests, evaluation with a live teacher)
# ---------------------------------------------------------------------------


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
    assert student_logits.dim() == 2 and teacher_logits.shape == student_logits.shape, (
        f"logits must both be [N, V], got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
    )
    assert mask.shape == student_logits.shape[:1] and mask.dtype == torch.bool, "mask must be bool [N]"
    _check_options(kind, temperature, beta)
    dtype = _compute_dtype(student_logits)
    b = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    a = _log_normalize(teacher_logits.to(dtype) / temperature)
    rows = _divergence_rows(a, b, kind, beta) * (temperature * temperature)
    return _masked_mean(rows, mask)


def full_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Full-vocabulary forward KL(teacher || student), mean over masked positions."""
    return full_divergence(student_logits, teacher_logits, mask, kind="forward_kl", temperature=temperature)


# ---------------------------------------------------------------------------
# random-sampling KD (sampled caches)
# ---------------------------------------------------------------------------


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
    _check_logits_ids(student_logits, sample_ids)
    n = student_logits.shape[0]
    assert sample_counts.shape == sample_ids.shape, (
        f"sample_counts {tuple(sample_counts.shape)} must match sample_ids {tuple(sample_ids.shape)}"
    )
    assert mask.shape == (n,) and mask.dtype == torch.bool, f"mask must be bool [{n}]"
    dtype = _compute_dtype(student_logits)
    counts = torch.where(mask[:, None], sample_counts.to(dtype), torch.zeros((), dtype=dtype, device=mask.device))
    used = counts > 0
    ids = torch.where(used, sample_ids.long(), torch.zeros_like(sample_ids, dtype=torch.long))
    total = counts.sum(dim=-1, keepdim=True)
    w = counts / total.clamp_min(1.0)  # rows without draws (masked out) have w = 0
    z = student_logits.to(dtype)
    log_q = z.gather(1, ids) - torch.logsumexp(z, dim=-1, keepdim=True)
    rows = -(w * torch.where(used, log_q, torch.zeros_like(log_q))).sum(dim=-1)
    return _masked_mean(rows, mask)
