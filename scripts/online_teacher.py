"""The teacher in the loop, for experiments that compare caching with online distillation.

The trainer never runs a teacher; the experiments in scripts/ (kd_quality.py, bench_reuse.py) need
one as the reference that a cache approximates. `OnlineTeacherBatches` wraps any batch source of
trainer.data (so the online run sees exactly the batches of the cached runs it is compared with)
and adds the teacher's full-vocabulary log-probs to each batch; `full_vocabulary_kd_loss` scores
them with trainer.losses.full_kl, the value the cached runs' top-k + tail loss takes at k = V
(tests/test_losses.py checks that identity). It is called directly rather than as the top-k loss
with V "cached" ids: the same number, computed without gathering a [positions, V] index.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from trainer.losses import cross_entropy, full_kl


class OnlineTeacherBatches:
    """`source`'s batches plus `teacher_logprobs` float32 [B, T, V]: the teacher's log-softmax over
    its first `vocab` columns at every position, computed when the batch is drawn."""

    def __init__(self, source, teacher: torch.nn.Module, vocab: int):
        self.source, self.teacher, self.vocab = source, teacher.eval(), vocab

    @property
    def seq_len(self) -> int:
        return self.source.seq_len

    def stream(self, start: int, count: int, workers: int = 0, pin_memory: bool = False) -> Iterator[dict]:
        for batch in self.source.stream(start, count, workers=workers, pin_memory=pin_memory):
            with torch.no_grad():
                logits = self.teacher(input_ids=batch["input_ids"]).logits[..., :self.vocab].float()
            keep = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "window_id", "loss_mask",
                                                            "attention_mask")}
            yield {**keep, "teacher_logprobs": torch.log_softmax(logits, dim=-1)}


def full_vocabulary_kd_loss(vocab: int, alpha_ce: float = 0.0):
    """A loop loss (trainer.loop.LossFn): (1 - alpha_ce) forward KL to the teacher over all `vocab`
    tokens + alpha_ce CE, means over the loss positions; CE is logged either way."""

    def loss_fn(logits: torch.Tensor, batch: dict):
        labels = batch["labels"].reshape(-1)
        n = labels.shape[0]
        flat = logits[..., :vocab].reshape(n, vocab)
        mask = batch["loss_mask"].reshape(n) if "loss_mask" in batch else torch.ones(n, dtype=torch.bool)
        kd = full_kl(flat, batch["teacher_logprobs"].reshape(n, vocab), mask)
        with torch.set_grad_enabled(torch.is_grad_enabled() and alpha_ce > 0):
            ce = cross_entropy(flat, labels, mask)
        loss = kd if alpha_ce == 0 else (1 - alpha_ce) * kd + alpha_ce * ce
        return loss, {"loss": loss.detach(), "kd": kd.detach(), "ce": ce.detach(), "n_tokens": mask.sum()}

    return loss_fn


def cross_entropy_loss(vocab: int):
    """A loop loss: next-token CE only (the student trained alone on the same batches)."""

    def loss_fn(logits: torch.Tensor, batch: dict):
        labels = batch["labels"].reshape(-1)
        n = labels.shape[0]
        mask = batch["loss_mask"].reshape(n) if "loss_mask" in batch else torch.ones(n, dtype=torch.bool)
        ce = cross_entropy(logits[..., :vocab].reshape(n, -1), labels, mask)
        return ce, {"loss": ce.detach(), "ce": ce.detach(), "n_tokens": mask.sum()}

    return loss_fn
