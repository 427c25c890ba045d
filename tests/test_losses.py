"""Tests for trainer.losses: tail-exact KD over the (k+1)-way top-k + tail distribution.

Tolerance rationale (used throughout):
* float32 implementation vs float64 reference: ``1e-5`` absolute.  Losses here are
  O(0.01 - 1); each is a sum of <= V products of float32 log-probs (relative error
  ~1e-7 each, magnitude <= ~10), so accumulated error is ~1e-6.  1e-5 leaves
  headroom while still catching any real modelling difference (those are >= 1e-3).
* "should be exactly zero" in float32: ``1e-6`` -- the teacher bucket is
  renormalised in float32, which moves each log-prob by a few ulps (~1e-7).
* float64 computations: ``1e-10``.
"""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import rel_entr

from trainer.losses import (
    NEG_INF_LOGPROB_FLOOR,
    cross_entropy,
    distill_loss,
    forward_kl,
    full_divergence,
    full_kl,
    generalized_jsd,
    log1mexp,
    reverse_kl,
    student_topk_and_tail,
)

KINDS = ("forward_kl", "reverse_kl", "jsd")
F32_TOL = 1e-5
ZERO_TOL = 1e-6


def kd(kind: str, *args, beta: float = 0.5, **kw) -> torch.Tensor:
    if kind == "forward_kl":
        return forward_kl(*args, **kw)
    if kind == "reverse_kl":
        return reverse_kl(*args, **kw)
    return generalized_jsd(*args, beta=beta, **kw)


def make_cache(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the cache stores: top-k of the float32 log_softmax, tail = lse(rest) - lse(all)."""
    z = teacher_logits.float()
    lp = torch.log_softmax(z, dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    rest = z.scatter(1, ids, -math.inf)
    tail = torch.logsumexp(rest, dim=-1) - torch.logsumexp(z, dim=-1)
    return ids, vals, tail


def np_div(p: np.ndarray, q: np.ndarray, kind: str, beta: float = 0.5) -> np.ndarray:
    """Independent float64 reference on probability rows (scipy handles 0 log 0 = 0)."""
    if kind == "forward_kl":
        return rel_entr(p, q).sum(-1)
    if kind == "reverse_kl":
        return rel_entr(q, p).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * rel_entr(p, m).sum(-1) + (1 - beta) * rel_entr(q, m).sum(-1)


def np_bucket(logits: torch.Tensor, ids: torch.Tensor, renormalize: bool = False) -> np.ndarray:
    """(k+1)-way distribution straight from full logits, in float64 numpy."""
    full = torch.softmax(logits.double(), dim=-1).numpy()
    idx = ids.numpy()
    top = np.take_along_axis(full, idx, axis=1)
    if renormalize:
        return top / top.sum(-1, keepdims=True)
    rest = full.copy()
    np.put_along_axis(rest, idx, 0.0, axis=1)
    return np.concatenate([top, rest.sum(-1, keepdims=True)], axis=1)


def setup(n: int = 8, v: int = 50, k: int = 5, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, v, generator=g) * scale
    student = torch.randn(n, v, generator=g) * scale
    ids, lps, tail = make_cache(teacher, k)
    return teacher, student, ids, lps, tail


# ---------------------------------------------------------------------------
# agreement with independent references
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_k_equals_vocab_matches_full_vocabulary(kind: str) -> None:
    teacher, student, ids, lps, tail = setup(n=6, v=11, k=11)
    assert torch.isneginf(tail).all()
    mask = torch.ones(6, dtype=torch.bool)
    got = kd(kind, student, ids, lps, tail, mask)
    ref = full_divergence(student, teacher, mask, kind=kind)
    assert abs(got.item() - ref.item()) < F32_TOL
    p = torch.softmax(teacher.double(), -1).numpy()
    q = torch.softmax(student.double(), -1).numpy()
    assert abs(got.item() - np_div(p, q, kind).mean()) < F32_TOL
    if kind == "forward_kl":
        assert abs(got.item() - full_kl(student, teacher, mask).item()) < F32_TOL


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_topk_matches_direct_bucket_distribution(kind: str, renormalize: bool) -> None:
    teacher, student, ids, lps, tail = setup()
    mask = torch.ones(8, dtype=torch.bool)
    got = kd(kind, student, ids, lps, tail, mask, renormalize_topk=renormalize)
    p = np_bucket(teacher, ids, renormalize)
    q = np_bucket(student, ids, renormalize)
    assert abs(got.item() - np_div(p, q, kind).mean()) < F32_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_bucket_loss_lower_bounds_full_vocabulary(kind: str) -> None:
    # Data-processing inequality: merging outcomes can only shrink an f-divergence.
    teacher, student, ids, lps, tail = setup(seed=1)
    mask = torch.ones(8, dtype=torch.bool)
    assert kd(kind, student, ids, lps, tail, mask) <= full_divergence(student, teacher, mask, kind=kind) + F32_TOL


def test_hand_computed_values() -> None:
    # V = 3, teacher p = (.5, .3, .2), student q = (.25, .25, .5), cached ids (0, 1).
    # Buckets: P = (.5, .3 | tail .2), Q = (.25, .25 | tail .5).
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    student = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    ids, lps, tail = make_cache(teacher, 2)
    assert ids.tolist() == [[0, 1]] and abs(tail.exp().item() - 0.2) < 1e-7
    mask = torch.ones(1, dtype=torch.bool)
    ln = math.log

    # .5 ln2 + .3 ln1.2 + .2 ln.4 = .3465736 + .0546965 - .1832581 = .2180120
    fwd = 0.5 * ln(0.5 / 0.25) + 0.3 * ln(0.3 / 0.25) + 0.2 * ln(0.2 / 0.5)
    assert abs(fwd - 0.2180120) < 1e-6
    # .25 ln.5 + .25 ln(.25/.3) + .5 ln2.5 = -.1732868 - .0455804 + .4581454 = .2392782
    rev = 0.25 * ln(0.25 / 0.5) + 0.25 * ln(0.25 / 0.3) + 0.5 * ln(0.5 / 0.2)
    assert abs(rev - 0.2392782) < 1e-6
    # beta = .5: M = (.375, .275, .35)
    m = (0.375, 0.275, 0.35)
    jsd = 0.5 * sum(p * ln(p / mi) for p, mi in zip((0.5, 0.3, 0.2), m)) + 0.5 * sum(
        q * ln(q / mi) for q, mi in zip((0.25, 0.25, 0.5), m)
    )
    # renormalised over the 2 ids: P = (.625, .375), Q = (.5, .5)
    fwd_renorm = 0.625 * ln(0.625 / 0.5) + 0.375 * ln(0.375 / 0.5)

    assert abs(forward_kl(student, ids, lps, tail, mask).item() - fwd) < F32_TOL
    assert abs(reverse_kl(student, ids, lps, tail, mask).item() - rev) < F32_TOL
    assert abs(generalized_jsd(student, ids, lps, tail, mask).item() - jsd) < F32_TOL
    assert abs(forward_kl(student, ids, lps, tail, mask, renormalize_topk=True).item() - fwd_renorm) < F32_TOL


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,opts",
    [
        ("forward_kl", {}),
        ("reverse_kl", {}),
        ("jsd", {}),
        ("jsd", {"beta": 0.2}),
        ("forward_kl", {"renormalize_topk": True}),
        ("reverse_kl", {"temperature": 2.0}),
    ],
)
def test_gradcheck_float64(kind: str, opts: dict) -> None:
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(3, 7, generator=g, dtype=torch.float64)
    ids, lps, tail = make_cache(teacher, 3)
    lps, tail = lps.double(), tail.double()
    mask = torch.tensor([True, False, True])
    student = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    opts = dict(opts)
    beta = opts.pop("beta", 0.5)
    assert torch.autograd.gradcheck(lambda s: kd(kind, s, ids, lps, tail, mask, beta=beta, **opts), (student,))
    # distill_loss with CE mixed in, chunked (3 rows in chunks of 2) and hence checkpointed
    assert torch.autograd.gradcheck(
        lambda s: distill_loss(s, ids, lps, tail, torch.tensor([1, 2, 3]), mask,
                               kind=kind, beta=beta, alpha_ce=0.3, chunk_size=2, **opts)[0],
        (student,),
    )


def test_jsd_endpoints_follow_trl_convention() -> None:
    teacher, student, ids, lps, tail = setup(seed=2)
    mask = torch.ones(8, dtype=torch.bool)
    args = (student, ids, lps, tail, mask)
    assert abs(generalized_jsd(*args, beta=0.0).item() - forward_kl(*args).item()) < 1e-7
    assert abs(generalized_jsd(*args, beta=1.0).item() - reverse_kl(*args).item()) < 1e-7
    # Mixture form near the ends: JSD_beta / beta -> KL(P||Q) and JSD_beta / (1-beta) -> KL(Q||P),
    # with an O(beta * chi^2) error, so use a nearby student, beta = 1e-6 and float64
    # (no cancellation); 1e-3 relative is then loose.
    near = teacher.double() + 0.3 * torch.randn(8, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    args64 = (near, ids, lps.double(), tail.double(), mask)
    eps = 1e-6
    f, r = forward_kl(*args64).item(), reverse_kl(*args64).item()
    assert abs(generalized_jsd(*args64, beta=eps).item() / eps - f) < 1e-3 * f
    assert abs(generalized_jsd(*args64, beta=1 - eps).item() / eps - r) < 1e-3 * r


# ---------------------------------------------------------------------------
# invariants
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_student_equal_to_teacher_gives_zero(kind: str, renormalize: bool) -> None:
    teacher, _, ids, lps, tail = setup(k=5)
    assert (tail > -10).all()  # a real tail, k < V
    mask = torch.ones(8, dtype=torch.bool)
    loss = kd(kind, teacher.clone(), ids, lps, tail, mask, renormalize_topk=renormalize)
    assert abs(loss.item()) < ZERO_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind: str) -> None:
    teacher, student, ids, lps, tail = setup(n=13, v=40, k=6, seed=4)
    labels = torch.randint(0, 40, (13,), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(13, dtype=torch.bool)
    mask[[2, 7, 12]] = False
    labels[2] = -100  # padding label at a masked position
    opts = dict(kind=kind, alpha_ce=0.25, temperature=1.5, beta=0.3)

    s1 = student.clone().requires_grad_()
    loss1, met1 = distill_loss(s1, ids, lps, tail, labels, mask, **opts)
    loss1.backward()
    for chunk in (1, 4, 5, 13, 100):
        s2 = student.clone().requires_grad_()
        loss2, met2 = distill_loss(s2, ids, lps, tail, labels, mask, chunk_size=chunk, **opts)
        loss2.backward()
        # only the summation order differs: a few float32 ulps
        torch.testing.assert_close(loss2, loss1, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-8)
        for key in met1:
            torch.testing.assert_close(met2[key], met1[key], rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunking_keeps_no_full_float32_buffers_for_backward(temperature: float) -> None:
    # What autograd keeps between forward and backward: without chunking the float32
    # [N, V] upcast/complement buffers; with chunking + checkpointing only the
    # (bf16) input slices, the float32 buffers being recomputed chunk by chunk.
    n, v = 32, 300
    student = torch.randn(n, v).bfloat16().requires_grad_()
    _, _, ids, lps, tail = setup(n=n, v=v, k=4, seed=15)
    mask = torch.ones(n, dtype=torch.bool)
    labels = torch.zeros(n, dtype=torch.long)

    def saved_f32_vocab_bytes(chunk_size: int | None) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] == v:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = distill_loss(student, ids, lps, tail, labels, mask,
                                   alpha_ce=0.5, temperature=temperature, chunk_size=chunk_size)
        loss.backward()
        return sum(seen.values())

    assert saved_f32_vocab_bytes(None) >= n * v * 4  # sanity: the hook sees them
    assert saved_f32_vocab_bytes(8) == 0


def test_distill_loss_mixes_kd_and_ce() -> None:
    teacher, student, ids, lps, tail = setup(seed=6)
    labels = torch.arange(8)
    mask = torch.tensor([True] * 6 + [False] * 2)
    loss, met = distill_loss(student, ids, lps, tail, labels, mask, kind="jsd", alpha_ce=0.4, temperature=2.0)
    k = generalized_jsd(student, ids, lps, tail, mask, temperature=2.0)
    ce = cross_entropy(student, labels, mask)
    assert abs(loss.item() - (0.6 * k.item() + 0.4 * ce.item())) < 1e-6
    assert abs(met["kd"].item() - k.item()) < 1e-6 and abs(met["ce"].item() - ce.item()) < 1e-6
    assert met["n_tokens"].item() == 6
    assert abs(met["teacher_tail_mass"].item() - tail[:6].exp().mean().item()) < 1e-6
    s_tail = student_topk_and_tail(student / 2.0, ids)[1]
    assert abs(met["student_tail_mass"].item() - s_tail[:6].exp().mean().item()) < 1e-6
    # kd-only needs no labels
    loss_kd, met_kd = distill_loss(student, ids, lps, tail, None, mask, kind="jsd", temperature=2.0)
    assert abs(loss_kd.item() - k.item()) < 1e-6 and math.isnan(met_kd["ce"].item())
    with pytest.raises(ValueError):
        distill_loss(student, ids, lps, tail, None, mask, alpha_ce=0.5)
    with pytest.raises(ValueError):
        distill_loss(student, ids, lps, tail, labels, mask, kind="kl")


def test_cross_entropy_matches_torch_in_float32() -> None:
    _, student, _, _, _ = setup(seed=7)
    labels = torch.arange(8) * 3
    mask = torch.tensor([True, True, False, True, True, True, False, True])
    labels[2] = -100
    ref = F.cross_entropy(student, torch.where(mask, labels, -100), ignore_index=-100)
    assert abs(cross_entropy(student, labels, mask).item() - ref.item()) < 1e-6
    # bf16 logits are upcast: result equals the float32 CE of the bf16 values
    sb = student.bfloat16()
    ref_b = F.cross_entropy(sb.float(), torch.where(mask, labels, -100), ignore_index=-100)
    out_b = cross_entropy(sb, labels, mask)
    assert out_b.dtype == torch.float32 and abs(out_b.item() - ref_b.item()) < 1e-6


# ---------------------------------------------------------------------------
# degenerate inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_batch_gives_zero_and_finite_grads(kind: str) -> None:
    _, student, ids, lps, tail = setup(n=4, seed=8)
    # masked rows hold padding that would crash gather / produce NaN if touched
    ids = ids.clone()
    ids[1] = -100
    lps = lps.clone()
    lps[2] = math.nan
    tail = tail.clone()
    tail[3] = math.nan
    mask = torch.zeros(4, dtype=torch.bool)
    s = student.clone().requires_grad_()
    loss, met = distill_loss(s, ids, lps, tail, torch.full((4,), -100), mask, kind=kind, alpha_ce=0.5, chunk_size=2)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s.grad))
    assert all(torch.isfinite(v) for key, v in met.items() if key != "ce")
    s = student.clone().requires_grad_()
    kd(kind, s, ids, lps, tail, mask).backward()
    assert torch.equal(s.grad, torch.zeros_like(s.grad))


@pytest.mark.parametrize("k", [4, 12])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_probability_teacher_entries(kind: str, k: int) -> None:
    g = torch.Generator().manual_seed(9)
    teacher = torch.randn(5, 12, generator=g)
    teacher[:, 8:] = -math.inf  # tokens the teacher can never emit
    teacher[0, 2:] = -math.inf  # a row with only two live tokens
    student = torch.randn(5, 12, generator=g).requires_grad_()
    ids, lps, tail = make_cache(teacher, k)
    assert torch.isneginf(lps).any()
    mask = torch.ones(5, dtype=torch.bool)
    loss = kd(kind, student, ids, lps, tail, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    if k == 12:
        # Same conventions as the full-vocabulary version, including the floor
        # that keeps reverse KL finite where the teacher has p = 0.
        ref = full_divergence(student.detach(), teacher, mask, kind=kind)
        assert abs(loss.item() - ref.item()) < F32_TOL
    if kind != "reverse_kl":  # finite exactly: p = 0 terms vanish (reverse KL is +inf, floored)
        p = np_bucket(teacher, ids)
        q = np_bucket(student.detach(), ids)
        assert abs(loss.item() - np_div(p, q, kind).mean()) < F32_TOL


def test_reverse_kl_floor_value() -> None:
    # One teacher zero in the top-k: its reverse-KL term is q (log q - FLOOR).
    teacher = torch.tensor([[0.0, 0.0, -math.inf]])
    student = torch.zeros(1, 3)  # q = 1/3 each
    ids = torch.tensor([[0, 1, 2]])
    lps = torch.log_softmax(teacher, -1)
    tail = torch.tensor([-math.inf])
    q = 1 / 3
    expected = 2 * q * math.log(q / 0.5) + q * (math.log(q) - NEG_INF_LOGPROB_FLOOR)
    got = reverse_kl(student, ids, lps, tail, torch.ones(1, dtype=torch.bool))
    assert abs(got.item() - expected) < F32_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_very_confident_teacher_is_finite_and_exact(kind: str) -> None:
    v = 20
    teacher = torch.zeros(2, v)
    teacher[:, 0] = 75.0  # tail mass = 19 e^-75 / (e^0 + ...) ~ 5e-32
    ids, lps, tail = make_cache(teacher, 1)
    assert -75.0 < tail[0].item() < -70.0 and torch.isfinite(tail).all()
    mask = torch.ones(2, dtype=torch.bool)
    for student in (teacher.clone(), teacher * 0.5, torch.randn(2, v)):
        s = student.clone().requires_grad_()
        loss = kd(kind, s, ids, lps, tail, mask)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # identical confident student: zero (its tail is resolved exactly, not rounded to 0)
    assert abs(kd(kind, teacher.clone(), ids, lps, tail, mask).item()) < ZERO_TOL


def test_renormalized_differs_iff_tail_nonempty() -> None:
    teacher, student, ids, lps, tail = setup(seed=10)
    mask = torch.ones(8, dtype=torch.bool)
    for kind in KINDS:
        exact = kd(kind, student, ids, lps, tail, mask)
        renorm = kd(kind, student, ids, lps, tail, mask, renormalize_topk=True)
        assert abs(exact.item() - renorm.item()) > 1e-3
    teacher, student, ids, lps, tail = setup(n=5, v=9, k=9, seed=11)
    mask = torch.ones(5, dtype=torch.bool)
    for kind in KINDS:
        exact = kd(kind, student, ids, lps, tail, mask)
        renorm = kd(kind, student, ids, lps, tail, mask, renormalize_topk=True)
        assert abs(exact.item() - renorm.item()) < ZERO_TOL


# ---------------------------------------------------------------------------
# temperature
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_exact_when_tail_is_one_token(kind: str) -> None:
    # k = V - 1: the tail bucket is a single token, so bucket temperature is exact
    # and the loss equals the full-vocabulary divergence at T (times T^2).
    teacher, student, ids, lps, tail = setup(n=6, v=10, k=9, seed=12)
    mask = torch.ones(6, dtype=torch.bool)
    for temp in (0.5, 2.0):
        got = kd(kind, student, ids, lps, tail, mask, temperature=temp)
        ref = full_divergence(student, teacher, mask, kind=kind, temperature=temp)
        assert abs(got.item() - ref.item()) < F32_TOL * temp**2


def test_temperature_bucket_approximation_direction() -> None:
    # With a multi-token tail, T > 1 under-estimates the tempered tail mass: the
    # student (tempered exactly) then looks "too spread" and an identical student
    # gets a small positive forward KL instead of 0.
    teacher, _, ids, lps, tail = setup(k=5, seed=13)
    mask = torch.ones(8, dtype=torch.bool)
    s_tail = student_topk_and_tail(teacher / 2.0, ids)[1]
    bucket_tail = torch.log_softmax(torch.cat([lps, tail[:, None]], -1) / 2.0, -1)[:, -1]
    assert (bucket_tail < s_tail).all()
    loss = forward_kl(teacher.clone(), ids, lps, tail, mask, temperature=2.0)
    assert 0.0 < loss.item() < 1.0
    assert abs(forward_kl(teacher.clone(), ids, lps, tail, mask, temperature=1.0).item()) < ZERO_TOL


# ---------------------------------------------------------------------------
# student buckets and helpers
# ---------------------------------------------------------------------------


def test_student_topk_and_tail_accuracy() -> None:
    teacher, student, ids, _, _ = setup(seed=14)
    s_topk, s_tail = student_topk_and_tail(student.bfloat16(), ids)
    assert s_topk.dtype == torch.float32 and s_tail.dtype == torch.float32
    q = np_bucket(student.bfloat16().float(), ids)
    np.testing.assert_allclose(s_topk.numpy(), np.log(q[:, :-1]), atol=F32_TOL)
    np.testing.assert_allclose(s_tail.numpy(), np.log(q[:, -1]), atol=F32_TOL)
    # agrees with the log1mexp formulation while the tail is not tiny
    alt = log1mexp(torch.logsumexp(s_topk, -1))
    np.testing.assert_allclose(s_tail.numpy(), alt.numpy(), atol=F32_TOL)
    # tiny tail: complement sum keeps it exact where log1mexp in float32 cannot
    confident = torch.zeros(1, 20)
    confident[0, 0] = 80.0
    _, tiny = student_topk_and_tail(confident, torch.tensor([[0]]))
    assert abs(tiny.item() - (math.log(19) - 80.0)) < 1e-4  # float32 rounding of ~-77
    assert torch.isneginf(log1mexp(torch.logsumexp(confident, -1) - torch.logsumexp(confident, -1)))


def test_student_tail_empty_has_zero_gradient() -> None:
    s = torch.randn(2, 5, requires_grad=True)
    ids = torch.stack([torch.randperm(5), torch.randperm(5)])
    s_topk, s_tail = student_topk_and_tail(s, ids)
    assert torch.isneginf(s_tail).all()
    (s_topk.sum() + torch.where(torch.isfinite(s_tail), s_tail, 0.0).sum()).backward()
    assert torch.isfinite(s.grad).all()


def test_log1mexp_stable_and_gradient_safe() -> None:
    x = torch.tensor([-1e-20, -1e-5, -0.5, -math.log(2), -1.0, -30.0, -math.inf, 0.0, 1e-7], dtype=torch.float64)
    out = log1mexp(x.requires_grad_())
    # 50-digit reference for log(1 - e^x); the naive float64 formula itself is off
    # by up to 1e-4 relative at x = -30, which is the point of the two branches.
    getcontext().prec = 50
    ref = [float((1 - Decimal(v).exp()).ln()) for v in x.tolist()[:6]] + [0.0]
    np.testing.assert_allclose(out.detach().numpy()[:7], ref, rtol=1e-14)
    assert torch.isneginf(out[7:]).all()
    torch.where(torch.isfinite(out), out, 0.0).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[6] == 0 and (x.grad[7:] == 0).all()


def test_shape_checks() -> None:
    _, student, ids, lps, tail = setup()
    mask = torch.ones(8, dtype=torch.bool)
    with pytest.raises(AssertionError):
        forward_kl(student[None], ids, lps, tail, mask)
    with pytest.raises(AssertionError):
        forward_kl(student, ids[:, :3], lps, tail, mask)
    with pytest.raises(AssertionError):
        forward_kl(student, ids, lps, tail[:4], mask)
    with pytest.raises(AssertionError):
        forward_kl(student, ids, lps, tail, mask.float())
    with pytest.raises(AssertionError):
        forward_kl(student, ids.float(), lps, tail, mask)


def reference_buckets(z: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The straightforward (unfused) computation: two logsumexps over upcast logits."""
    lse = torch.logsumexp(z, dim=-1)
    s_topk = z.gather(1, ids) - lse[:, None]
    z_rest = z.scatter(1, ids, -math.inf)
    empty = torch.isneginf(z_rest.amax(dim=-1)).detach()
    rest = torch.logsumexp(z_rest.masked_fill(empty[:, None], 0.0), dim=-1)
    return s_topk, torch.where(empty, torch.full_like(rest, -math.inf), rest - lse), lse


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_buckets_match_straightforward_computation(temperature: float, dtype: torch.dtype) -> None:
    # Values and gradients (through s_topk, s_tail and lse with random upstream
    # gradients) of the fused autograd.Function against the plain autograd
    # composition on the same upcast logits, both in float32: they differ only in
    # summation order and shift, so 1e-5 absolute on log-probs (magnitude <= ~30)
    # and 1e-6 absolute + 1e-5 relative on gradients (O(1), up to ~5 where upstream
    # gradients add up) -- a few float32 ulps of headroom; bf16 gradients are
    # compared after their own rounding (2^-8 relative).
    from trainer.losses import _student_buckets

    g = torch.Generator().manual_seed(21)
    n, v, k = 16, 300, 7
    x = (torch.randn(n, v, generator=g) * 4.0).to(dtype)
    x[3, 10] = -math.inf  # a vocabulary entry the student rules out
    x[5, 50] = 60.0  # a very confident row: tail ~e^-55, still inside float32's range
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    ids[3, 0] = 10  # ... and is one of the cached ids
    gt, gs, gl = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)

    xa = x.clone().requires_grad_()
    fa = _student_buckets(xa, ids, temperature)
    xb = x.clone().requires_grad_()
    fb = reference_buckets(xb.float() / temperature, ids)
    for a, b in zip(fa, fb):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert torch.isneginf(fa[0][3, 0])

    def upstream(out):
        s_topk, s_tail, lse = out
        return (torch.where(torch.isfinite(s_topk), s_topk, 0.0) * gt).sum() + (s_tail * gs).sum() + (lse * gl).sum()

    upstream(fa).backward()
    upstream(fb).backward()
    assert xa.grad.dtype == dtype
    torch.testing.assert_close(xa.grad.float(), xb.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-6)


def test_tail_below_float32_range_relative_to_max() -> None:
    # Tail e^-150 relative to the max: exp(z - max) underflows to 0 in float32 for
    # every tail token, yet the tail log-mass must come out exact (float32 rounding
    # of a ~-147 value: 1e-4) with the right gradient, checked against float64.
    v = 40
    x = torch.zeros(2, v)
    x[0, 0], x[0, 1] = 150.0, 149.0  # row 0: cached ids 0 and 1 hold all but ~e^-150
    x[1] = torch.linspace(-3, 3, v)  # row 1: an ordinary row next to it
    ids = torch.tensor([[0, 1], [5, 7]])
    xs = x.clone().requires_grad_()
    s_topk, s_tail = student_topk_and_tail(xs, ids)
    exact = math.log(v - 2) - (150.0 + math.log1p(math.exp(-1.0)))
    assert torch.isfinite(s_tail).all()
    assert abs(s_tail[0].item() - exact) < 1e-4
    (s_tail.sum() + s_topk.sum()).backward()

    x64 = x.double().requires_grad_()
    r_topk, r_tail, _ = reference_buckets(x64, ids)
    torch.testing.assert_close(s_tail.double(), r_tail.detach(), rtol=0, atol=1e-4)
    torch.testing.assert_close(s_topk.double(), r_topk.detach(), rtol=0, atol=1e-5)
    (r_tail.sum() + r_topk.sum()).backward()
    # d s_tail / dz_j = 1/38 on each tail token of row 0 (all underflowed in exp(z - max))
    torch.testing.assert_close(xs.grad.double(), x64.grad, rtol=0, atol=1e-6)
    assert abs(xs.grad[0, 2].item() - 1.0 / (v - 2)) < 1e-6
