"""trainer's public names, loaded lazily, and the choice of KD estimator from a batch's payload."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer
from trainer.losses import LossInputError, batch_distill_loss, forward_kl, payload_of

ROOT = Path(__file__).resolve().parents[1]


def test_import_trainer_loads_no_torch_and_every_public_name_resolves():
    r = subprocess.run([sys.executable, "-c", "import sys, trainer; print('torch' in sys.modules)"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    for name in trainer.__all__:
        assert getattr(trainer, name) is not None
    assert trainer.forward_kl is forward_kl
    with pytest.raises(AttributeError):
        trainer.no_such_name  # noqa: B018


def batches(n_pos: int = 6, k: int = 3):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 20, (1, n_pos), generator=g)
    ids = torch.stack([torch.randperm(20, generator=g)[:k] for _ in range(n_pos)])[None]
    topk = {"labels": labels, "topk_ids": ids, "topk_logprobs": torch.full((1, n_pos, k), -2.0),
            "tail_logmass": torch.full((1, n_pos), -0.5)}
    samples = {"labels": labels, "sample_ids": ids, "sample_counts": torch.ones(1, n_pos, k, dtype=torch.int32)}
    return topk, samples


def test_payload_names_what_the_batch_carries():
    topk, samples = batches()
    assert payload_of(topk) == "topk"
    assert payload_of(samples) == "samples"
    with pytest.raises(ValueError, match="this one has keys"):
        payload_of({**topk, **samples})
    with pytest.raises(ValueError, match="this one has keys"):
        payload_of({"labels": topk["labels"], "topk_ids": topk["topk_ids"]})


def test_batch_loss_follows_the_payload_and_refuses_a_kind_that_does_not_fit():
    topk, samples = batches()
    logits = torch.randn(1, 6, 22)
    _, m = batch_distill_loss(logits, topk, vocab=20, kind="forward_kl")
    assert "teacher_tail_mass" in m                  # the top-k estimator
    _, m = batch_distill_loss(logits, samples, vocab=20, kind="sampled")
    assert "teacher_tail_mass" not in m              # random-sampling KD
    with pytest.raises(ValueError, match="kind='sampled'"):
        batch_distill_loss(logits, topk, vocab=20, kind="sampled")
    with pytest.raises(ValueError, match="kind='sampled'"):
        batch_distill_loss(logits, samples, vocab=20, kind="reverse_kl")


def test_shape_errors_are_value_errors_naming_the_shape():
    topk, _ = batches()
    ids = topk["topk_ids"][0]
    with pytest.raises(ValueError, match=r"tail_logmass must be \[6\], got \(4,\)"):
        forward_kl(torch.randn(6, 20), ids, topk["topk_logprobs"][0], torch.zeros(4), torch.ones(6, dtype=torch.bool))
    assert issubclass(LossInputError, ValueError)
