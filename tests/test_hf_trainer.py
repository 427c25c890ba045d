"""Distilling inside `transformers.Trainer` (logitcache.integrations.transformers + trainer.integrations):
the same batches, normalisation and schedule as `trainer distill`, hence the same losses step for step.

Parity tolerance: both runs do the same float32 arithmetic on CPU in the same order (same batches,
same logits, same loss code, same AdamW, same clipping); they differ only in how the step's loss is
summed for logging (the Trainer adds float32 micro-batch shares, the loop float64 token sums), a
few float32 ulps of a loss near 3 (~1e-7). 1e-5 leaves room for that and nothing else: one
different batch, a mean per micro-batch or a shifted learning rate moves the loss by > 1e-3.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import save_tiny_teacher
from test_loop import caches, heldout_file  # noqa: F401  (fixtures)
from test_produce import one_thread  # noqa: F401  (fixture: one torch thread)
from test_produce_chat import SMALL, chat_data, chat_teacher, produce, rows  # noqa: F401  (fixtures)
from test_produce_chat_data import chat_tokenizer_dir  # noqa: F401  (fixture)
from test_sampled_cache import sampled_cache  # noqa: F401  (fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from logitcache.errors import UserError
from logitcache.integrations.transformers import IGNORE_INDEX, DistillCollator, DistillDataset
from logitcache.read.reader import CacheReader
from trainer.cli import main as trainer_main
from trainer.config import LossConfig
from trainer.data import CacheBatches
from trainer.integrations.transformers import DistillTrainer, distill_compute_loss

STEPS, BATCH, ACCUM, LR, WARMUP, MIN_LR = 10, 4, 2, 3e-3, 3, 0.1
TOL = 1e-5
DDP_STEPS = 5


@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory, chat_teacher, chat_data) -> Path:
    """A sequences cache: 16 conversations, the teacher's top-8 at the assistant tokens only."""
    root = tmp_path_factory.mktemp("chat_caches")
    from logitcache.cli import main

    assert main(["produce", "--teacher", str(chat_teacher), "--data", str(chat_data), "--out", str(root),
                 *SMALL]) == 0
    (cache,) = [p.parent for p in root.glob("*/manifest.json")]
    return cache


def cache_and_student(layout: str, request, tmp_path: Path) -> tuple[Path, Path]:
    if layout == "sequences":
        tok = request.getfixturevalue("chat_tokenizer_dir")
        cache = request.getfixturevalue("chat_cache")
        return cache, save_tiny_teacher(tmp_path / "student", "llama", tok, seed=3, context=128)
    cache = request.getfixturevalue("caches")["train"] if layout == "windows" else request.getfixturevalue(
        "sampled_cache")
    tok = request.getfixturevalue("tiny_tokenizer_dir")
    return cache, save_tiny_teacher(tmp_path / "student", "llama", tok, seed=3)


def hf_arguments(out: Path, **overrides) -> TrainingArguments:
    """`trainer distill`'s defaults spelled as ordinary TrainingArguments."""
    settings = dict(max_steps=STEPS, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                    learning_rate=LR, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
                    max_grad_norm=1.0, warmup_steps=WARMUP, lr_scheduler_type="cosine_with_min_lr",
                    lr_scheduler_kwargs={"min_lr_rate": MIN_LR}, logging_steps=1, save_strategy="no",
                    report_to="none", use_cpu=True, seed=0, optim="adamw_torch", disable_tqdm=True)
    return TrainingArguments(str(out), **{**settings, **overrides})


def hf_trainer(student: Path, cache: Path, out: Path, loss: LossConfig, loop_schedule: bool = True,
               **overrides) -> DistillTrainer:
    args = hf_arguments(out, **overrides)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    dataset = DistillDataset(cache, args.per_device_train_batch_size, seed=args.seed)
    return DistillTrainer(model=model, args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(student), loss=loss,
                          loop_schedule=loop_schedule)


@pytest.mark.parametrize("layout, loss", [
    ("windows", LossConfig(loss="forward_kl", alpha_ce=0.5)),
    ("sequences", LossConfig(loss="jsd", beta=0.3, alpha_ce=0.2)),
    ("samples", LossConfig(loss="sampled", alpha_ce=0.5)),
])
def test_hf_trainer_matches_trainer_distill_step_for_step(layout, loss, request, tmp_path):
    cache, student = cache_and_student(layout, request, tmp_path)
    argv = ["distill", "--student", student, "--cache", cache, "--out", tmp_path / "ours", "--steps", STEPS,
            "--batch-size", BATCH, "--grad-accum", ACCUM, "--lr", LR, "--warmup", WARMUP, "--min-lr-ratio", MIN_LR,
            "--loss", loss.loss, "--beta", loss.beta, "--alpha-ce", loss.alpha_ce, "--log-every", 1,
            "--save-every", 0, "--eval-every", 0, "--no-progress"]
    assert trainer_main([str(a) for a in argv]) == 0
    ours = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]

    trainer = hf_trainer(student, cache, tmp_path / "hf", loss)
    model = trainer.model
    # Hugging Face's decay groups are the loop's (matrices decay, norms do not) for this model
    assert set(trainer.get_decay_parameter_names(model)) == {n for n, p in model.named_parameters() if p.dim() >= 2}
    trainer.train()
    hf = [entry for entry in trainer.state.log_history if "loss" in entry]

    assert [e["step"] for e in ours] == [e["step"] for e in hf] == list(range(1, STEPS + 1))
    for a, b in zip(ours, hf):
        assert abs(a["loss"] - b["loss"]) <= TOL, (a["step"], a["loss"], b["loss"])
        assert abs(a["kd"] - b["kd"]) <= TOL and abs(a["ce"] - b["ce"]) <= TOL
        assert b["learning_rate"] == pytest.approx(a["lr"], rel=1e-12)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert ours[WARMUP - 1]["lr"] == pytest.approx(LR)           # the peak at the warmup's last step
    assert ours[-1]["loss"] < ours[0]["loss"] + 0.5               # a sane run (tiny models, 10 steps)


def test_rows_follow_trainer_distills_batches_on_every_rank(caches):
    """Row j of the dataset is rank (j // B) % W's next micro-batch, as CacheBatches gives it, across epochs."""
    reader = CacheReader(caches["train"])
    world, b = 2, 8
    ds = DistillDataset(reader, b, seed=5, world_size=world)
    per_epoch = ds.batches_in_epoch(0)
    assert len(ds) == per_epoch * b * world
    for rank in range(world):
        stream = CacheBatches(reader, b, seed=5, rank=rank, world=world).stream(per_epoch - 2, 4)
        for i, batch in zip(range(per_epoch - 2, per_epoch + 2), stream):   # the last two and the next epoch's first
            ds.set_epoch(i // per_epoch)
            rows = [ds[((i % per_epoch) * world + rank) * b + p] for p in range(b)]
            assert [int(r["window_id"]) for r in rows] == batch["window_id"].tolist()
            got = DistillCollator()(rows)
            for key in ("input_ids", "labels", "topk_ids", "topk_logprobs", "tail_logmass"):
                assert torch.equal(got[key], batch[key]), key
            assert got["loss_mask"].all() and got["attention_mask"].eq(1).all()


def test_collated_conversations_are_the_readers_batch_with_labels_masked(chat_cache):
    reader = CacheReader(chat_cache)
    ds = DistillDataset(reader, 4, seed=0, world_size=1)
    (batch,) = CacheBatches(reader, 4, seed=0).stream(0, 1)
    rows = [ds[p] for p in range(4)]
    assert [len(r["labels"]) for r in rows] == batch["attention_mask"].sum(1).tolist()   # each row its own length
    got = DistillCollator()(rows)
    mask = batch["loss_mask"]
    assert 0 < int(mask.sum()) < mask.numel()
    for key in ("attention_mask", "loss_mask", "topk_ids", "tail_logmass"):
        assert torch.equal(got[key], batch[key]), key
    seen = batch["attention_mask"].bool()      # the reader leaves a row's last token past its positions
    assert torch.equal(got["input_ids"][seen], batch["input_ids"][seen]) and (got["input_ids"][~seen] == 0).all()
    assert torch.equal(got["labels"][mask], batch["labels"][mask])
    assert (got["labels"][~mask] == IGNORE_INDEX).all() and got["shift_labels"] is got["labels"]


def test_the_head_runs_at_the_loss_positions_only_with_the_full_heads_values(request, tmp_path):
    """On conversations the logits are [n loss positions, V], through the model's own forward (a hook
    on its LM head), and the loss and its gradient are those of the head at every position."""
    cache, student = cache_and_student("sequences", request, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    ds = DistillDataset(cache, 4, world_size=1)
    batch = DistillCollator()([ds[p] for p in range(4)])
    results = []
    for at in (True, False):
        model.zero_grad()
        value, out = distill_compute_loss(model, batch, LossConfig(alpha_ce=0.3), vocab=ds.vocab_size,
                                          head_at_loss_positions=at, return_outputs=True)
        value.backward()
        results.append((out["logits"].shape[:-1], float(value.detach()), model.lm_head.weight.grad.clone()))
    (shape_at, loss_at, grad_at), (shape_all, loss_all, grad_all) = results
    assert tuple(shape_at) == (int(batch["loss_mask"].sum()),) and tuple(shape_all) == tuple(batch["labels"].shape)
    assert model.lm_head._forward_pre_hooks == {}                   # the hook lives for one forward only
    assert abs(loss_at - loss_all) <= 1e-6 and torch.allclose(grad_at, grad_all, rtol=1e-5, atol=1e-8)


def test_the_step_is_normalised_over_the_whole_accumulated_batch(request, tmp_path):
    """4 conversations as one micro-batch or as 2 x 2 with accumulation: one step, the same loss and
    gradient (the micro-batches carry different numbers of loss tokens, where a mean of means differs)."""
    cache, student = cache_and_student("sequences", request, tmp_path)
    def counts(seed: int) -> list[int]:        # loss tokens of the two micro-batches of 2
        ds = DistillDataset(cache, 2, seed=seed, world_size=1)
        return [int(DistillCollator()([ds[2 * m + p] for p in range(2)])["loss_mask"].sum()) for m in range(2)]

    seed = next(s for s in range(20) if len(set(counts(s))) == 2)
    loss = LossConfig(alpha_ce=0.5)
    one = hf_trainer(student, cache, tmp_path / "one", loss, max_steps=1, warmup_steps=0, seed=seed,
                     gradient_accumulation_steps=1)
    two = hf_trainer(student, cache, tmp_path / "two", loss, max_steps=1, warmup_steps=0, seed=seed,
                     per_device_train_batch_size=2, gradient_accumulation_steps=2)
    one.train()
    two.train()
    (a,), (b,) = ([e for e in t.state.log_history if "loss" in e] for t in (one, two))
    assert abs(a["loss"] - b["loss"]) <= TOL and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_resuming_a_checkpoint_continues_with_the_same_batches(caches, tiny_tokenizer_dir, tmp_path):
    """The Trainer's own resume (skip_first_batches over our sequential order) takes the steps an
    uninterrupted run takes: the same losses, to the bit, after the checkpoint."""
    student = save_tiny_teacher(tmp_path / "student", "llama", tiny_tokenizer_dir, seed=3)

    def run(out: Path, resume: str | None = None) -> list[tuple[int, float]]:
        trainer = hf_trainer(student, caches["train"], out, LossConfig(alpha_ce=0.5), max_steps=6,
                             save_strategy="steps", save_steps=3)
        trainer.train(resume_from_checkpoint=resume)
        return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]

    full = run(tmp_path / "full")
    run(tmp_path / "split")
    resumed = run(tmp_path / "split", resume=str(tmp_path / "split" / "checkpoint-3"))
    assert resumed == full and len(full) == 6


class PlainKDTrainer(Trainer):
    """What the README shows for one's own Trainer subclass (or TRL's): only compute_loss changes."""

    loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return distill_compute_loss(model, inputs, LossConfig(alpha_ce=0.5), vocab=self.train_dataset.vocab_size,
                                    num_items_in_batch=num_items_in_batch,
                                    num_processes=self.accelerator.num_processes, return_outputs=return_outputs)


def test_a_plain_trainer_with_distill_compute_loss_takes_the_same_steps(request, tmp_path):
    """transformers counts the step's loss tokens itself, from `shift_labels`: the same normalisation."""
    cache, student = cache_and_student("sequences", request, tmp_path)
    ours = hf_trainer(student, cache, tmp_path / "ours", LossConfig(alpha_ce=0.5), False, max_steps=4)
    ours.train()
    args = hf_arguments(tmp_path / "plain", max_steps=4, remove_unused_columns=False,
                        train_sampling_strategy="sequential")
    plain = PlainKDTrainer(model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32), args=args,
                           train_dataset=DistillDataset(cache, BATCH, seed=0), data_collator=DistillCollator())
    plain.train()
    a, b = ([e for e in t.state.log_history if "loss" in e] for t in (ours, plain))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= TOL and y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)


def test_mismatched_settings_are_one_line_errors(caches, tiny_tokenizer_dir, tmp_path):
    student = save_tiny_teacher(tmp_path / "student", "llama", tiny_tokenizer_dir, seed=3)
    with pytest.raises(UserError, match="does not match per_device_train_batch_size=4"):
        DistillTrainer(model=AutoModelForCausalLM.from_pretrained(student), args=hf_arguments(tmp_path / "a"),
                       train_dataset=DistillDataset(caches["train"], 2, world_size=1))
    with pytest.raises(UserError, match="cosine_with_min_lr"):
        hf_trainer(student, caches["train"], tmp_path / "c", LossConfig(), lr_scheduler_type="linear",
                   lr_scheduler_kwargs={})
    with pytest.raises(UserError, match="too few"):
        DistillDataset(caches["train"], 10_000)


# ---------------------------------------------------------------------------------------------
# two gloo ranks, started like torchrun: the same parity under DDP


def _hf_rank(rank: int, world: int, port: int, student: str, cache: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    trainer = hf_trainer(Path(student), Path(cache), Path(out), LossConfig(alpha_ce=0.5), max_steps=DDP_STEPS,
                         per_device_train_batch_size=2)
    trainer.train()
    if rank == 0:
        Path(out, "log.json").write_text(json.dumps(trainer.state.log_history))


@pytest.mark.slow
def test_hf_trainer_matches_trainer_distill_under_ddp(request, tmp_path):
    from test_ddp import _free_port, _run_ddp

    cache, student = cache_and_student("sequences", request, tmp_path)
    _run_ddp(["distill", "--student", student, "--cache", cache, "--out", tmp_path / "ours", "--steps", DDP_STEPS,
              "--batch-size", 2, "--grad-accum", ACCUM, "--lr", LR, "--warmup", WARMUP, "--min-lr-ratio", MIN_LR,
              "--alpha-ce", 0.5, "--log-every", 1, "--save-every", 0, "--device", "cpu", "--no-progress"],
             tmp_path / "rec")
    ours = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    mp.spawn(_hf_rank, args=(2, _free_port(), str(student), str(cache), str(tmp_path / "hf")), nprocs=2, join=True)
    hf = [e for e in json.loads((tmp_path / "hf" / "log.json").read_text()) if "loss" in e]
    assert len(ours) == len(hf) == DDP_STEPS
    for a, b in zip(ours, hf):
        assert abs(a["loss"] - b["loss"]) <= TOL and abs(a["kd"] - b["kd"]) <= TOL, (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
