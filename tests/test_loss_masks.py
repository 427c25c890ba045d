"""Batches where only some positions carry a loss: `loss_mask`, `attention_mask`, `position_ids`.

The LM head at the loss positions only (trainer.logits.LogitsAt + trainer.loop.at_loss_positions)
must give the loss and gradients of full logits then masking, within 1e-6 in float64, for every
architecture the trainer supports; a model whose logits are not a plain projection of its last
hidden state falls back to full logits. Batches without a loss_mask keep today's losses, and
`trainer pretrain`'s CE counts only masked positions. The token normalisation over accumulated
micro-batches and DDP ranks is tested in test_token_normalisation.py, with the helpers below.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model

from trainer.commands.distill import make_kd_loss
from trainer.commands.pretrain import make_ce_loss
from trainer.config import LossConfig, RunConfig, TrainConfig
from trainer.logits import LogitsAt, split_head_problem
from trainer.loop import MODEL_INPUTS, DistEnv, at_loss_positions, loss_tokens, train
from trainer.losses import cross_entropy, distill_loss

MODEL_VOCAB, VOCAB, K, T = 64, 60, 6, 12     # the loss uses the first 60 of 64 logit columns
ARCHS = ["llama", "qwen2", "gpt_neox", "gpt2"]


# ---------------------------------------------------------------------------------------------
# helpers shared with test_token_normalisation.py


def masked_rows(lengths: list[int], prompts: list[int], *, seed: int = 0, kd: bool = True,
                position_restart: int | None = None) -> dict[str, torch.Tensor]:
    """One batch of right-padded rows: row i has `lengths[i]` real positions, of which those from
    `prompts[i]` on carry a loss. Padded positions have attention 0, label -100 and (KD) teacher
    ids -100 and NaN log-probs, so anything leaking from them shows. `position_restart` packs a
    second sequence into every row from that position on (position_ids restart at 0)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    pos = torch.arange(T).expand(b, T)
    real = pos < torch.tensor(lengths)[:, None]
    loss_mask = real & (pos >= torch.tensor(prompts)[:, None])
    input_ids = torch.where(real, torch.randint(1, VOCAB, (b, T), generator=g), 0)
    labels = torch.where(real, torch.randint(0, VOCAB, (b, T), generator=g), -100)
    batch = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "attention_mask": real.long(),
             "window_id": torch.arange(b)}
    if position_restart is not None:
        batch["position_ids"] = torch.where(pos < position_restart, pos, pos - position_restart).contiguous()
    if kd:
        lp = torch.log_softmax(torch.randn(b, T, VOCAB, generator=g) * 2.0, dim=-1)
        top = lp.topk(K, dim=-1)
        tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
        batch["topk_ids"] = torch.where(real[..., None], top.indices, -100)
        batch["topk_logprobs"] = torch.where(real[..., None], top.values, torch.nan)
        batch["tail_logmass"] = torch.where(real, tail, torch.nan)
    return batch


def split_batch(batch: dict, sizes: list[int]) -> list[dict]:
    """The batch's rows cut into consecutive micro-batches of `sizes` rows."""
    out, start = [], 0
    for n in sizes:
        out.append({k: v[start:start + n] for k, v in batch.items()})
        start += n
    return out


class ListSource:
    """Micro-batches from a list (cycled), with `stream` and `seq_len` like trainer.data's sources."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    @property
    def seq_len(self) -> int:
        return int(self.batches[0]["labels"].shape[1])

    def stream(self, start: int, count: int, workers: int = 0, pin_memory: bool = False):
        return iter([self.batches[i % len(self.batches)] for i in range(start, start + count)])


def student(arch: str = "llama", seed: int = 3) -> torch.nn.Module:
    """A tiny float64 model in train mode, without dropout (so gradients are deterministic)."""
    model = build_tiny_model(arch, MODEL_VOCAB, seed=seed).double().train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def kd_loss():
    return make_kd_loss(LossConfig(alpha_ce=0.3, logits_chunk=5), VOCAB)


def first_step_grads(monkeypatch, tmp_path: Path, model, batches: list[dict], loss_fn, *, grad_accum: int,
                     env: DistEnv | None = None, head_at_loss_positions: bool = True,
                     steps: int = 1) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The gradients `train` takes its first optimizer step with, and the metrics it logged."""
    import trainer.loop as loop

    recorded: dict[str, torch.Tensor] = {}
    make = loop.make_optimizer

    def recording_optimizer(m, *args):
        opt = make(m, *args)
        names = {p: n for n, p in m.named_parameters()}
        step = opt.step

        def record_then_step(*a, **kw):
            if not recorded:
                recorded.update({names[p]: p.grad.detach().clone() for p in names if p.grad is not None})
            return step(*a, **kw)

        opt.step = record_then_step
        return opt

    monkeypatch.setattr(loop, "make_optimizer", recording_optimizer)
    cfg = TrainConfig(steps=steps, batch_size=int(batches[0]["labels"].shape[0]), grad_accum=grad_accum, lr=1e-3,
                      warmup=0, clip=0.0, eval_every=0, save_every=0, log_every=1, progress=False, device="cpu")
    run = RunConfig(command="distill", model="tiny", out=str(tmp_path), train=cfg)
    train(model, run=run, env=env or DistEnv(0, 1, 0, torch.device("cpu")), source=ListSource(batches),
          loss_fn=loss_fn, evaluate=None, tokenizer=None, head_at_loss_positions=head_at_loss_positions)
    entries = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] if \
        (tmp_path / "metrics.jsonl").exists() else []
    return recorded, entries


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def loss_and_grads(model, batch: dict, loss_fn, *, gather: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward through LogitsAt: at the loss positions only, or full logits + loss_mask."""
    model.zero_grad(set_to_none=True)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if gather:
        index, loss_batch = at_loss_positions(batch)
        logits = LogitsAt(model)(**inputs, index=index)
    else:
        loss_batch = batch
        logits = LogitsAt(model)(**inputs)
    loss, _ = loss_fn(logits, loss_batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# the head at the loss positions only


@pytest.mark.parametrize("arch", ARCHS)
def test_head_at_loss_positions_equals_full_logits_then_masking(arch):
    model = student(arch)
    assert split_head_problem(model) is None, "the body + head split must hold for this architecture"
    batch = masked_rows([12, 7, 10, 4], [3, 2, 9, 0], position_restart=8)
    for loss_fn in (kd_loss(), make_ce_loss(VOCAB, 5)):
        full, g_full = loss_and_grads(model, batch, loss_fn, gather=False)
        part, g_part = loss_and_grads(model, batch, loss_fn, gather=True)
        assert torch.isfinite(full) and full > 0
        assert abs(float(full - part)) <= 1e-6
        assert max_diff(g_full, g_part) <= 1e-6
        assert all(torch.isfinite(g).all() for g in g_part.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_mask_and_position_ids_reach_the_model(arch):
    """With right padding, the logits at the loss positions equal those of each row run alone,
    unpadded. Position ids that restart mark a packed row (trainer.attention): each part then equals
    itself run alone -- its own positions, attention kept inside it -- and not the model's output for
    the whole row with renumbered positions, where attention crosses the restart."""
    model = student(arch).eval()
    restart = 6
    batch = masked_rows([12, 5, 9], [2, 1, 4], kd=False, position_restart=restart)
    index, _ = at_loss_positions(batch)
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    with torch.no_grad():
        ours = LogitsAt(model)(**inputs, index=index)
        crossing = model(**inputs).logits.reshape(-1, MODEL_VOCAB)[index]
        rows = []
        for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            parts = [(0, min(n, restart))] + ([(restart, n)] if n > restart else [])
            alone = torch.cat([model(input_ids=batch["input_ids"][i:i + 1, s:e]).logits[0] for s, e in parts])
            rows.append(alone[batch["loss_mask"][i, :n]])
    assert (ours - torch.cat(rows)).abs().max() <= 1e-8
    assert (ours - crossing).abs().max() > 1e-4      # the restart was kept apart, not just renumbered


def test_all_masked_micro_batch_is_zero_and_finite():
    model = student()
    batch = masked_rows([9, 6], [9, 6])          # no position carries a loss
    assert loss_tokens(batch) == 0
    for loss_fn in (kd_loss(), make_ce_loss(VOCAB, 5)):
        for gather in (True, False):
            loss, grads = loss_and_grads(model, batch, loss_fn, gather=gather)
            assert float(loss) == 0.0
            assert all(torch.isfinite(g).all() and not g.any() for g in grads.values())


def test_all_masked_micro_batch_contributes_nothing_to_a_step(monkeypatch, tmp_path):
    """A step of [A, all-masked] has the gradient of a step of [A] alone, and no NaN."""
    a = masked_rows([12, 8], [3, 2], seed=1)
    empty = masked_rows([10, 12], [10, 12], seed=2)
    for i, loss_fn in enumerate((kd_loss(), make_ce_loss(VOCAB, 5))):
        for head in (True, False):
            g_two, m_two = first_step_grads(monkeypatch, tmp_path / f"two{i}{head}", student(), [a, empty], loss_fn,
                                            grad_accum=2, head_at_loss_positions=head)
            g_one, m_one = first_step_grads(monkeypatch, tmp_path / f"one{i}{head}", student(), [a], loss_fn,
                                            grad_accum=1, head_at_loss_positions=head)
            assert max_diff(g_two, g_one) <= 1e-12
            assert m_two[0]["loss"] == pytest.approx(m_one[0]["loss"], rel=1e-12)
            assert m_two[0]["loss_tokens_per_step"] == m_one[0]["loss_tokens_per_step"] == 9 + 6


def test_loop_head_at_loss_positions_matches_full_logits(monkeypatch, tmp_path):
    batches = split_batch(masked_rows([12, 5, 9, 11], [1, 2, 7, 3], seed=4), [2, 2])
    got = {head: first_step_grads(monkeypatch, tmp_path / str(head), student(), batches, kd_loss(), grad_accum=2,
                                  head_at_loss_positions=head) for head in (True, False)}
    assert max_diff(got[True][0], got[False][0]) <= 1e-6
    assert got[True][1][0]["loss"] == pytest.approx(got[False][1][0]["loss"], abs=1e-6)
    assert got[True][1][0]["kd"] == pytest.approx(got[False][1][0]["kd"], abs=1e-6)


class _ScaledLogits(torch.nn.Module):
    """A model whose forward scales the logits after the head (as Cohere's logit_scale does)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    @property
    def base_model(self):
        return self.inner.base_model

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits * 2.0
        return out


def test_logits_that_are_not_a_plain_projection_fall_back_to_full_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=MODEL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                          final_logit_softcapping=1.0, initializer_range=0.5, pad_token_id=0)
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(config).double().eval()
    scaled = _ScaledLogits(student())
    assert "final_logit_softcapping" in split_head_problem(gemma)
    assert "not a plain projection" in split_head_problem(scaled)
    batch = masked_rows([12, 6], [4, 1], kd=False)
    index, _ = at_loss_positions(batch)
    for model in (gemma, scaled):
        notes: list[str] = []
        wrapper = LogitsAt(model, notes.append)
        assert not wrapper.split
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        with torch.no_grad():
            for _ in range(2):
                got = wrapper(**inputs, index=index)
            want = model(**inputs, use_cache=False).logits.reshape(-1, MODEL_VOCAB)[index]
        assert torch.equal(got, want)
        assert len(notes) == 1 and "every position" in notes[0]


# ---------------------------------------------------------------------------------------------
# batches without a loss_mask, and pretrain's CE with one


def test_batches_without_loss_mask_keep_the_public_losses():
    torch.manual_seed(0)
    batch = masked_rows([T] * 3, [0] * 3, seed=5)
    for key in ("loss_mask", "attention_mask"):
        del batch[key]
    logits = torch.randn(3, T, MODEL_VOCAB, dtype=torch.float64)
    n = 3 * T
    flat, labels = logits[..., :VOCAB].reshape(n, VOCAB), batch["labels"].reshape(n)
    ones = torch.ones(n, dtype=torch.bool)

    ce, m = make_ce_loss(VOCAB, None)(logits, batch)
    assert torch.equal(ce, cross_entropy(flat, labels, ones))
    assert int(m["n_tokens"]) == n
    kd, m = kd_loss()(logits, batch)
    ref, _ = distill_loss(flat, batch["topk_ids"].reshape(n, K), batch["topk_logprobs"].reshape(n, K),
                          batch["tail_logmass"].reshape(n), labels, ones, alpha_ce=0.3, chunk_size=5)
    assert torch.equal(kd, ref)
    # an all-True loss_mask is the same as none
    every = {**batch, "loss_mask": torch.ones(3, T, dtype=torch.bool)}
    assert torch.equal(make_ce_loss(VOCAB, None)(logits, every)[0], ce)
    assert torch.equal(kd_loss()(logits, every)[0], kd)


@pytest.mark.parametrize("chunk", [None, 4])
def test_pretrain_ce_counts_only_masked_positions(chunk):
    batch = masked_rows([12, 9, 3], [5, 0, 1], kd=False, seed=6)
    logits = torch.randn(3, T, MODEL_VOCAB, dtype=torch.float64, requires_grad=True)
    loss, m = make_ce_loss(VOCAB, chunk)(logits, batch)
    mask = batch["loss_mask"]
    ref = torch.nn.functional.cross_entropy(logits[..., :VOCAB][mask], batch["labels"][mask])
    assert abs(float(loss.detach() - ref.detach())) <= 1e-12 and int(m["n_tokens"]) == int(mask.sum())
    (grad,) = torch.autograd.grad(loss, logits)
    assert not grad[~mask].any() and grad[mask].abs().sum() > 0     # nothing flows from unmasked positions
    assert torch.isfinite(grad).all()


def test_pretrain_loop_with_masks_trains_on_masked_positions_only(monkeypatch, tmp_path):
    """The loss `train` logs for its first step is the initial model's CE at the masked positions."""
    batch = masked_rows([12, 10, 7, 12], [6, 2, 5, 11], kd=False, seed=7)
    model = student()
    mask = batch["loss_mask"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = torch.nn.functional.cross_entropy(logits[..., :VOCAB][mask], batch["labels"][mask]).item()
    grads, entries = first_step_grads(monkeypatch, tmp_path, model, split_batch(batch, [2, 2]),
                                      make_ce_loss(VOCAB, 5), grad_accum=2)
    assert entries[0]["loss"] == pytest.approx(ref, abs=1e-9)
    assert entries[0]["loss_tokens_per_step"] == int(mask.sum())
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_evaluate_cache_measures_masked_positions_only():
    from trainer.evaluate import evaluate_cache

    batch = masked_rows([12, 9, 5], [4, 0, 2], seed=8)

    class Reader:       # what evaluate_cache reads of a CacheReader
        num_windows = 3

        @staticmethod
        def iter_batches(batch_size):
            yield batch

    model = student().eval()
    got = evaluate_cache(model, Reader, vocab=VOCAB)
    mask = batch["loss_mask"]
    n = int(mask.sum())
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :VOCAB]
    _, ref = distill_loss(logits[mask], batch["topk_ids"][mask], batch["topk_logprobs"][mask],
                          batch["tail_logmass"][mask], batch["labels"][mask], torch.ones(n, dtype=torch.bool))
    assert got["tokens"] == n
    assert got["kl"] == pytest.approx(float(ref["kd"]), abs=1e-9)
    assert got["ce"] == pytest.approx(float(ref["ce"]), abs=1e-9)


def test_a_loss_mask_that_is_not_bool_like_labels_is_refused():
    batch = masked_rows([12, 6], [4, 1], kd=False)
    with pytest.raises(ValueError, match="loss_mask must be bool"):
        loss_tokens({**batch, "loss_mask": batch["loss_mask"].long()})
    with pytest.raises(ValueError, match="loss_mask must be bool"):
        loss_tokens({**batch, "loss_mask": batch["loss_mask"][:, :-1]})
