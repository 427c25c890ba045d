"""The gradient of a step is normalised by the loss tokens of the whole step, not per micro-batch.

Eight right-padded rows with different numbers of loss tokens give, in float64, the same first-step
gradient of `trainer.loop.train` as one batch of 8, as 4 accumulated micro-batches of 2, and as 2
gloo ranks x 2 micro-batches of 2 -- within 1e-6. The pitfall it guards against is shown too: the
mean of per-micro-batch means gives a visibly different gradient on the same rows.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_loss_masks import (
    VOCAB,
    at_loss_positions,
    first_step_grads,
    kd_loss,
    masked_rows,
    max_diff,
    split_batch,
    student,
)

from trainer.commands.pretrain import make_ce_loss
from trainer.logits import LogitsAt
from trainer.loop import MODEL_INPUTS, loss_tokens

# loss tokens per row: 9, 1, 4, 2 | 10, 1, 3, 6 (36) -- micro-batches of 2 rows hold 10, 6, 11 and 9
LENGTHS = [12, 4, 9, 5, 12, 3, 7, 10]
PROMPTS = [3, 3, 5, 3, 2, 2, 4, 4]
LOSSES = {"ce": lambda: make_ce_loss(VOCAB, 5), "kd": kd_loss}


def rows() -> dict[str, torch.Tensor]:
    return masked_rows(LENGTHS, PROMPTS, seed=11)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_accumulated_micro_batches_give_the_gradient_of_one_batch(monkeypatch, tmp_path, loss):
    batch = rows()
    one, m_one = first_step_grads(monkeypatch, tmp_path / "one", student(), [batch], LOSSES[loss](), grad_accum=1)
    four, m_four = first_step_grads(monkeypatch, tmp_path / "four", student(), split_batch(batch, [2, 2, 2, 2]),
                                    LOSSES[loss](), grad_accum=4)
    assert max_diff(one, four) <= 1e-6
    # the logged metrics are per-token means over the step, whatever the accumulation
    assert m_four[0]["loss"] == pytest.approx(m_one[0]["loss"], abs=1e-9)
    assert m_four[0]["loss_tokens_per_step"] == m_one[0]["loss_tokens_per_step"] == loss_tokens(batch) == 36


def test_a_mean_per_micro_batch_would_not_match():
    """The pitfall: averaging each micro-batch's mean weighs a token by 1 / its micro-batch's count."""
    batch = rows()
    micro = split_batch(batch, [2, 2, 2, 2])
    assert len({loss_tokens(b) for b in micro}) > 1
    loss_fn = make_ce_loss(VOCAB, 5)

    def grads(batches: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
        model = student()
        for b, w in zip(batches, weights):
            index, loss_batch = at_loss_positions(b)
            logits = LogitsAt(model)(**{k: b[k] for k in MODEL_INPUTS if k in b}, index=index)
            (loss_fn(logits, loss_batch)[0] * w).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    whole = grads([batch], [1.0])
    total = sum(loss_tokens(b) for b in micro)
    by_tokens = grads(micro, [loss_tokens(b) / total for b in micro])     # what the loop does
    per_micro_mean = grads(micro, [1.0 / len(micro)] * len(micro))         # the biased shortcut
    scale = max(float(g.abs().max()) for g in whole.values())
    assert max_diff(whole, by_tokens) <= 1e-6
    assert max_diff(whole, per_micro_mean) > 1e-3 * scale


# ---------------------------------------------------------------------------------------------
# two gloo ranks against one process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, loss: str, out: str) -> None:
    """One rank of `train` on its half of the rows; rank 0 writes the first step's gradients."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from trainer.loop import init_distributed

    env = init_distributed("cpu")
    mine = split_batch(rows(), [2, 2, 2, 2])[2 * rank:2 * rank + 2]     # rank 0: rows 0-3, rank 1: rows 4-7

    class Patch:            # first_step_grads wants pytest's monkeypatch; a process of our own needs none back
        @staticmethod
        def setattr(obj, name, value):
            setattr(obj, name, value)

    grads, entries = first_step_grads(Patch, Path(out) / "run", student(), mine, LOSSES[loss](), grad_accum=2,
                                      env=env)
    if rank == 0:
        torch.save(grads, Path(out) / "grads.pt")
        (Path(out) / "entries.json").write_text(json.dumps(entries))


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_two_ranks_give_the_gradient_of_one_process(monkeypatch, tmp_path, loss):
    mp.spawn(_rank_main, args=(2, _free_port(), loss, str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "grads.pt", weights_only=True)
    entries = json.loads((tmp_path / "entries.json").read_text())
    one, m_one = first_step_grads(monkeypatch, tmp_path / "one", student(), [rows()], LOSSES[loss](), grad_accum=1)
    assert max_diff(one, ddp) <= 1e-6
    assert entries[0]["loss"] == pytest.approx(m_one[0]["loss"], abs=1e-9)
    assert entries[0]["loss_tokens_per_step"] == 36
