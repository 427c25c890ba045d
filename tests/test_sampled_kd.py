"""sampled_kd_loss: hand values, padding and masking, and unbiasedness of its gradient."""

import math

import numpy as np
import pytest
import torch

from logitcache.encodings.sampled import draw_samples
from trainer.losses import full_kl, sampled_kd_loss


def test_hand_value_and_padding():
    z = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    ids = torch.tensor([[3, 1, 0]])
    counts = torch.tensor([[3, 1, 0]])            # last slot is padding (id ignored)
    mask = torch.tensor([True])
    log_q = torch.log_softmax(z, dim=-1)[0]
    expect = -(0.75 * log_q[3] + 0.25 * log_q[1])
    assert torch.allclose(sampled_kd_loss(z, ids, counts, mask), expect)


def test_masked_rows_and_bad_padding_ids_are_ignored():
    torch.manual_seed(0)
    z = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 2, -100], [5, -100, -100], [4000, 0, 0]])   # garbage outside count > 0 / mask
    counts = torch.tensor([[2, 2, 0], [4, 0, 0], [1, 1, 2]])
    mask = torch.tensor([True, True, False])
    loss = sampled_kd_loss(z, ids, counts, mask)
    log_q = torch.log_softmax(z.detach(), dim=-1)
    expect = (-(0.5 * log_q[0, 1] + 0.5 * log_q[0, 2]) - log_q[1, 5]) / 2
    assert torch.allclose(loss, expect)
    loss.backward()
    assert torch.isfinite(z.grad).all() and torch.all(z.grad[2] == 0)


def test_all_masked_gives_zero_with_zero_grad():
    z = torch.randn(2, 5, requires_grad=True)
    loss = sampled_kd_loss(z, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long),
                           torch.zeros(2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(z.grad == 0)


def test_bf16_logits_are_upcast():
    z = torch.randn(4, 300) * 3
    ids, counts = draw_samples(z, 16, torch.Generator().manual_seed(1))
    mask = torch.ones(4, dtype=torch.bool)
    a = sampled_kd_loss(z.bfloat16(), ids, counts, mask)
    b = sampled_kd_loss(z.bfloat16().float(), ids, counts, mask)
    assert a.dtype == torch.float32 and torch.allclose(a, b)


@pytest.mark.parametrize("S", [1, 16])
def test_expected_gradient_equals_full_kl_gradient(S):
    """Mean of M independent sampled-loss gradients -> full forward-KL gradient.

    For one position, d loss / d z = softmax(z) - w with w = counts / S, and the full KL gradient
    is softmax(z) - p. Each coordinate of the mean of M draws deviates from it by a Monte-Carlo
    error with standard deviation sqrt(p_j (1 - p_j) / (S M)); we require every coordinate within
    5 such standard deviations (plus 1e-12), which a biased estimator (e.g. top-k renormalised, or
    w = 1/unique) fails by orders of magnitude.
    """
    gen = torch.Generator().manual_seed(1234)
    V, P, M = 40, 3, 20000
    teacher = torch.randn(P, V, generator=gen, dtype=torch.float64) * 2.0
    student = torch.randn(P, V, generator=gen, dtype=torch.float64)
    p = torch.softmax(teacher, dim=-1)

    z_full = student.clone().requires_grad_(True)
    full_kl(z_full, teacher, torch.ones(P, dtype=torch.bool)).backward()
    g_full = z_full.grad * P                       # per-position gradient (full_kl is a mean)

    # M independent sample sets per position, as M rows each; a mean over P*M rows scales by 1/(P*M)
    rows = teacher.repeat_interleave(M, dim=0)
    ids, counts = draw_samples(rows, S, gen)
    z = student.repeat_interleave(M, dim=0).clone().requires_grad_(True)
    sampled_kd_loss(z, ids, counts, torch.ones(P * M, dtype=torch.bool)).backward()
    g_mean = (z.grad * (P * M)).view(P, M, V).mean(dim=1)

    sigma = torch.sqrt(p * (1 - p) / (S * M))
    err = (g_mean - g_full).abs()
    assert torch.all(err <= 5 * sigma + 1e-12), float((err / (sigma + 1e-30)).max())
    # and the estimator is not trivially exact: single draws do deviate
    assert err.max() > 0


def test_draw_samples_counts_and_layout():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 1000, generator=gen) * 4
    logits[0] = -math.inf
    logits[0, 7] = 0.0                              # all mass on one token
    ids, counts = draw_samples(logits, 16, gen)
    assert ids.shape == counts.shape == (50, 16) and ids.dtype == torch.int64 and counts.dtype == torch.int32
    assert torch.all(counts.sum(dim=1) == 16)
    assert ids[0, 0] == 7 and counts[0, 0] == 16 and torch.all(counts[0, 1:] == 0) and torch.all(ids[0, 1:] == 0)
    used = counts > 0
    for r in range(50):                             # unique, ascending, left-aligned
        u = ids[r][used[r]]
        assert torch.all(u[1:] > u[:-1]) and used[r].sum() == used[r][: int(used[r].sum())].sum()
    np_ids, np_counts = draw_samples(logits.numpy(), 16, torch.Generator().manual_seed(0))
    assert isinstance(np_ids, np.ndarray) and np.all(np_counts.sum(1) == 16)


def test_draw_samples_follows_the_distribution():
    gen = torch.Generator().manual_seed(5)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20000, 1)
    ids, counts = draw_samples(logits, 4, gen)
    freq = torch.zeros(4, dtype=torch.float64).scatter_add_(0, ids.reshape(-1), counts.reshape(-1).double())
    freq /= freq.sum()
    p = torch.softmax(logits[0].double(), dim=0)
    assert torch.allclose(freq, p, atol=5 * torch.sqrt(p * (1 - p) / 80000).max().item())
