"""topk_from_logits against a float64 reference: ids, log-probs, exact tail, target, chunking.

Tolerances: results are float32 computed from float32 logits, so log-probs carry about one ulp of
|lse| (~1e-6 for |lse| ~ 10): compared at atol 2e-5. The tail is compared in the log domain at
atol 2e-5 however small it is (that is what computing it from the non-top-k logits buys; a
`log1mexp` of the top-k mass would be off by orders of magnitude on confident rows, checked below).
"""

from __future__ import annotations

import math

import pytest
import torch

from logitcache.backends.topk import topk_from_logits


def reference(logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor):
    """float64: full log_softmax, the log-probs at `ids`, the log-mass outside `ids`, the target's."""
    x = logits.double()
    logp = torch.log_softmax(x, -1)
    at_ids = logp.gather(1, ids.long())
    rest = x.clone().scatter_(1, ids.long(), float("-inf"))
    tail = torch.logsumexp(rest, -1) - torch.logsumexp(x, -1)
    return logp, at_ids, tail, logp.gather(1, targets[:, None]).squeeze(1)


def check(logits: torch.Tensor, k: int, chunk: int = 4096, atol: float = 2e-5, rtol: float = 0.0):
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=g)
    ids, lp, tail, tgt = topk_from_logits(logits, targets, k, chunk)
    assert ids.dtype == torch.int32 and lp.dtype == tail.dtype == tgt.dtype == torch.float32
    assert ids.shape == lp.shape == (logits.shape[0], k) and tail.shape == tgt.shape == (logits.shape[0],)
    logp, at_ids, ref_tail, ref_tgt = reference(logits.float(), ids, targets)
    # the ids are a top-k: their values equal the k largest (as multisets; ties may pick either id)
    top_vals = torch.topk(logp, k, dim=1).values
    torch.testing.assert_close(at_ids, top_vals, atol=atol, rtol=0)
    assert (lp[:, :-1] >= lp[:, 1:]).all(), "log-probs must be sorted descending"
    assert all(len(set(row.tolist())) == k for row in ids), "ids repeat"
    torch.testing.assert_close(lp.double(), at_ids, atol=atol, rtol=0)
    torch.testing.assert_close(tail.double(), ref_tail, atol=atol, rtol=0)
    torch.testing.assert_close(tgt.double(), ref_tgt, atol=atol, rtol=rtol)
    total = lp.double().exp().sum(1) + tail.double().exp()   # an error in lse shifts every log-prob alike
    torch.testing.assert_close(total, torch.ones_like(total), atol=max(1e-5, atol), rtol=0)
    return ids, lp, tail, tgt


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
@pytest.mark.parametrize("k", [1, 8, 63])
def test_matches_float64_reference(scale, k):
    g = torch.Generator().manual_seed(0)
    check(torch.randn(200, 500, generator=g) * scale, k)


def test_confident_rows_keep_a_tiny_tail_exact():
    """Top-1 holds all but ~1e-30 of the mass: the tail must still be right in the log domain."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=g)
    logits[:, 0] += 80.0
    ids, lp, tail, _ = check(logits, 4)
    assert (tail < -60).all() and torch.isfinite(tail).all()
    naive = torch.log1p(-lp.double().exp().sum(1).clamp(max=1))   # what cancellation gives
    assert not torch.isfinite(naive).all() or (naive - tail.double()).abs().max() > 1.0


def test_huge_logits_do_not_overflow():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 300, generator=g) * 1e4
    check(logits, 5, atol=1e-3, rtol=1e-6)   # targets sit ~1e4 below the top: float32 ulp ~1e-3


def test_k_equal_to_vocabulary_has_empty_tail():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 50, generator=g)
    targets = torch.randint(0, 50, (20,), generator=g)
    ids, lp, tail, _ = topk_from_logits(logits, targets, 50)
    assert torch.isneginf(tail).all()
    torch.testing.assert_close(lp.exp().double().sum(1), torch.ones(20, dtype=torch.float64), atol=1e-5, rtol=0)
    assert sorted(ids[0].tolist()) == list(range(50))


def test_ties_pick_a_valid_top_k():
    logits = torch.zeros(4, 40)
    logits[:, :3] = 5.0                      # three tied leaders, then 37 tied zeros
    ids, lp, tail, _ = check(logits, 5)
    assert all({0, 1, 2} <= set(row.tolist()) for row in ids)


def test_masked_columns_and_all_masked_tail():
    logits = torch.full((3, 30), float("-inf"))
    logits[:, :4] = torch.tensor([3.0, 2.0, 1.0, 0.0])
    ids, lp, tail, _ = topk_from_logits(logits, torch.zeros(3, dtype=torch.long), 4)
    assert torch.isneginf(tail).all()
    ids, lp, tail, _ = topk_from_logits(logits, torch.zeros(3, dtype=torch.long), 2)
    expected = math.log((math.exp(1) + math.exp(0)) / sum(math.exp(v) for v in (3, 2, 1, 0)))
    torch.testing.assert_close(tail, torch.full((3,), expected), atol=1e-6, rtol=0)


def test_chunking_gives_the_same_result():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(301, 257, generator=g) * 4
    targets = torch.randint(0, 257, (301,), generator=g)
    a = topk_from_logits(logits, targets, 16, chunk_size=10_000)
    b = topk_from_logits(logits, targets, 16, chunk_size=7)
    assert torch.equal(a[0], b[0])
    for x, y in zip(a[1:], b[1:]):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_bfloat16_logits_are_reduced_in_float32():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(50, 400, generator=g) * 5).to(torch.bfloat16)
    ids, lp, tail, tgt = check(logits, 10)   # reference built from the same bf16 values upcast


def test_input_is_not_modified():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 100, generator=g)
    before = logits.clone()
    topk_from_logits(logits, torch.zeros(10, dtype=torch.long), 7)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("k", [0, 101])
def test_k_out_of_range_is_refused(k):
    with pytest.raises(ValueError):
        topk_from_logits(torch.zeros(2, 100), torch.zeros(2, dtype=torch.long), k)


def test_overwrite_mode_gives_the_same_result():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 300, generator=g) * 3
    targets = torch.randint(0, 300, (40,), generator=g)
    a = topk_from_logits(logits, targets, 9)
    b = topk_from_logits(logits.clone(), targets, 9, overwrite=True)
    assert torch.equal(a[0], b[0])
    for x, y in zip(a[1:], b[1:]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("offset", [-200.0, -55.0, 65.0, 500.0])
def test_shifted_and_unshifted_paths_agree(offset):
    """Logits far from zero take the shifted path; log-probs do not depend on a constant offset."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 400, generator=g) * 4
    targets = torch.randint(0, 400, (30,), generator=g)
    a = topk_from_logits(logits, targets, 12)
    b = topk_from_logits(logits + offset, targets, 12)
    assert torch.equal(a[0], b[0])
    tol = 2e-5 + abs(offset) * 2.4e-7      # the offset logits themselves round at ~1 ulp of |offset|
    for x, y in zip(a[1:], b[1:]):
        torch.testing.assert_close(x, y, atol=tol, rtol=0)
    check(logits + offset, 12, atol=tol)


@pytest.mark.parametrize("vocab,k", [(8192, 64), (8197, 64), (4100, 16), (3000, 1)])
def test_prefiltered_topk_equals_torch_topk(vocab, k):
    """The CPU block-max prefilter is exact: same values as torch.topk and the same columns
    (continuous random logits have no ties), for widths divisible by the block and not."""
    from logitcache.backends.topk import _prefiltered_topk

    g = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(64, vocab, generator=g) * 3
    x[0, :] = -1e9                                   # a row whose top sits in one place
    x[0, vocab - 1] = 5.0
    x[1, ::7] = float("-inf")                        # masked columns
    vals, ids = _prefiltered_topk(x, k + 1)
    ref_vals, ref_ids = torch.topk(x, k + 1, dim=1)
    assert torch.equal(vals, ref_vals)
    assert torch.equal(ids[2:], ref_ids[2:])
    assert torch.equal(x.gather(1, ids), ref_vals)   # rows 0-1 have ties: any column of equal value


def test_prefiltered_topk_with_ties_gives_the_top_values():
    """Heavily tied logits (a quantised model): the values are the true top k + 1 values."""
    from logitcache.backends.topk import _prefiltered_topk

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 20, (32, 4096), generator=g).float()
    vals, ids = _prefiltered_topk(x, 65)
    assert torch.equal(vals, torch.topk(x, 65, dim=1).values)
    assert torch.equal(x.gather(1, ids), vals)
    assert all(len(set(row.tolist())) == 65 for row in ids)   # distinct columns


def test_wide_vocabulary_rows_match_the_reference():
    """The full path with the prefilter on (V = 8192 >> 32 (k + 1)) against float64."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(40, 8192, generator=g) * 4
    targets = torch.randint(0, 8192, (40,), generator=g)
    ids, lp, tail, tgt = topk_from_logits(logits, targets, 64)
    ref = torch.log_softmax(logits.double(), dim=1)
    ref_vals, ref_ids = torch.topk(ref, 64, dim=1)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(lp.double(), ref_vals, atol=2e-5, rtol=0)
    mass = lp.double().exp().sum(1) + tail.double().exp()
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=0)
    torch.testing.assert_close(tgt.double(), ref.gather(1, targets[:, None]).squeeze(1), atol=2e-5, rtol=0)
