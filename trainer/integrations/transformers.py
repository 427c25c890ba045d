"""Distilling from a cache inside `transformers.Trainer`: the KD loss, normalised as `trainer distill` does.

    from transformers import AutoModelForCausalLM, TrainingArguments
    from logitcache.integrations.transformers import DistillDataset
    from trainer.config import LossConfig
    from trainer.integrations.transformers import DistillTrainer

    args = TrainingArguments("out", per_device_train_batch_size=8, gradient_accumulation_steps=4, max_steps=1000)
    trainer = DistillTrainer(model=AutoModelForCausalLM.from_pretrained("student"), args=args,
                             train_dataset=DistillDataset("caches/<cache>", batch_size=8, seed=args.seed),
                             loss=LossConfig(loss="forward_kl", alpha_ce=0.5))
    trainer.train()

The loss is trainer.losses' (tail-exact forward KL, reverse KL, JSD, or sampled KD for a cache of
draws, mixed with CE by `alpha_ce`) and its gradient is that of `trainer distill` (trainer/loop.py):
the sum of the per-token losses over every loss token of the optimizer step -- all micro-batches of
the gradient accumulation, all ranks -- divided by their number. A mean per micro-batch would weigh a
token of a micro-batch with few loss tokens more than one of a micro-batch with many.
`DistillTrainer.get_batch_samples` counts that number from the batches' `loss_mask` (summed over the
ranks) and passes it as `num_items_in_batch`; `distill_compute_loss` turns each micro-batch's mean
into its share of the whole, so the Trainer neither divides by the accumulation steps again
(`loss_is_scaled_for_ga`) nor averages means. The logged `loss` is then the mean over the step's
loss tokens, as in `trainer distill`'s metrics.jsonl, beside `kd`, `ce` and the tail masses.

With a `loss_mask` (a cache of conversations) the LM head runs at the loss positions only, as the
loop's trainer.logits.LogitsAt does, through a hook on the model's own forward, so whatever wraps the
model (DDP, accelerate's autocast) sees the forward that runs; a model whose logits are more than a
projection of its last hidden state gets its full logits, gathered (trainer.logits.split_head_problem).
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import Trainer
from transformers.trainer_utils import SchedulerType

from logitcache.data import tokenizer_fingerprint
from logitcache.errors import UserError
from logitcache.integrations.transformers import BATCH_FIELDS, DistillCollator, DistillDataset
from trainer.config import LossConfig
from trainer.logits import split_head_problem
from trainer.loop import MODEL_INPUTS, at_loss_positions, loss_tokens, lr_at
from trainer.losses import batch_distill_loss

_SPLITS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP / DeepSpeed wrappers (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@contextmanager
def lm_head_at(model: nn.Module, index: torch.Tensor | None) -> Iterator[None]:
    """Within the block, `model`'s LM head sees the hidden states at `index` only (int64 [n] into the
    B * T positions, row-major): its forward then returns logits [n, V] instead of [B, T, V]."""
    if index is None:
        yield
        return

    def pick(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]                                                              # (B, T, H)
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), *args[1:])   # (n, H)

    handle = model.get_output_embeddings().register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


def _splits(model: nn.Module) -> bool:
    """Whether `model`'s logits are head(body(x)), so that the head may run at some positions only."""
    if model not in _SPLITS:
        _SPLITS[model] = split_head_problem(model) is None
    return _SPLITS[model]


def distill_compute_loss(model: nn.Module, inputs: dict[str, torch.Tensor], loss: LossConfig | None = None, *,
                         vocab: int | None = None, num_items_in_batch: int | torch.Tensor | None = None,
                         num_processes: int = 1, head_at_loss_positions: bool = True,
                         return_outputs: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """The KD loss of one collated cache micro-batch (logitcache.integrations.transformers), for a
    Trainer's `compute_loss`.

    `model` is what the Trainer calls (possibly wrapped); `loss` the objective (default
    `LossConfig()`: tail-exact forward KL); `vocab` the logit columns that count (the cache's
    tokenizer length; default all). With `num_items_in_batch` (the loss tokens of the whole
    optimizer step over all `num_processes` ranks) the result is this micro-batch's share of the
    step's token mean, to be backpropagated as is (the Trainer's `loss_is_scaled_for_ga = True`;
    DDP's mean over ranks completes the sum); without it, the micro-batch's own token mean.
    `return_outputs` adds a dict of `logits` and the detached per-token metrics (`loss`, `kd`, `ce`,
    `n_tokens`, ...) of trainer.losses.batch_distill_loss.
    """
    cfg = loss or LossConfig()
    if "document_ids" in inputs:    # packed rows need attention kept inside each document, not wired here yet
        raise UserError("distill_compute_loss: batches of packed rows (document_ids) are not supported in the "
                        "Trainer yet; use trainer distill for packed caches")
    core = unwrap(model)
    index, loss_batch = None, inputs
    mask = inputs.get("loss_mask")
    if head_at_loss_positions and mask is not None and not bool(mask.all()):
        index, loss_batch = at_loss_positions(inputs)
    split = index is not None and _splits(core)
    with lm_head_at(core, index if split else None):
        logits = model(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs}, use_cache=False).logits
    if index is not None and not split:
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, index)          # (n, V)
    value, metrics = batch_distill_loss(
        logits, loss_batch, vocab=vocab or logits.shape[-1], kind=cfg.loss, alpha_ce=cfg.alpha_ce,
        temperature=cfg.temperature, renormalize_topk=cfg.renormalize_topk, beta=cfg.beta,
        chunk_size=cfg.logits_chunk or None)
    if num_items_in_batch is not None:
        # the mean over n_loss tokens times n_loss * ranks / total: written as trainer.loop writes it, so
        # that both give the same float32 value; a micro-batch without loss tokens still backpropagates
        total, n_loss = int(num_items_in_batch), loss_tokens(inputs)
        value = value / (total / (n_loss * num_processes)) if n_loss else value * 0.0
    return (value, {**metrics, "logits": logits}) if return_outputs else value


class DistillTrainer(Trainer):
    """`transformers.Trainer` training a student from a cache (module docstring).

    Beyond Trainer's own arguments: `loss` (trainer.config.LossConfig, default tail-exact forward
    KL), `head_at_loss_positions` (default True) and `loop_schedule`: False uses the
    TrainingArguments' scheduler as it is; True gives `trainer distill`'s (trainer.loop.lr_at), which
    warms up to the peak at step `warmup_steps - 1` (Hugging Face's warmup starts at lr 0) and then
    follows the same cosine; it needs `lr_scheduler_type="cosine_with_min_lr"` with
    `lr_scheduler_kwargs={"min_lr_rate": r}` (`trainer distill --min-lr-ratio r`).

    With a `DistillDataset` it reads rows in order (a sequential sampler; the dataset holds the
    shuffle), checks the dataset's batch size and world size against the TrainingArguments and the
    student's tokenizer (`processing_class`, when given) against the cache's, and defaults the
    collator to `DistillCollator`.
    """

    loss_is_scaled_for_ga = True      # distill_compute_loss normalises over the accumulated batch itself

    def __init__(self, *args: Any, loss: LossConfig | None = None, head_at_loss_positions: bool = True,
                 loop_schedule: bool = False, **kwargs: Any):
        if len(args) < 3:
            kwargs.setdefault("data_collator", DistillCollator())
        super().__init__(*args, **kwargs)
        self.loss_config = loss or LossConfig()
        self.loss_config.validate()
        self.head_at_loss_positions = head_at_loss_positions
        # transformers before `loss_is_scaled_for_ga` skipped its division by the accumulation steps on this
        self.model_accepts_loss_kwargs = True
        self._sums: dict[str, torch.Tensor] = {}
        self._tokens = 0
        self._min_lr_ratio = self._check_schedule() if loop_schedule else None
        if self.args.n_gpu > 1:
            raise UserError(f"DistillTrainer: {self.args.n_gpu} GPUs in one process (torch DataParallel); "
                            "launch one process per GPU with torchrun or accelerate launch")
        self.vocab = self._check_data()

    def _check_schedule(self) -> float:
        kwargs = self.args.lr_scheduler_kwargs or {}
        cosine = SchedulerType(self.args.lr_scheduler_type) == SchedulerType.COSINE_WITH_MIN_LR
        if not cosine or "min_lr_rate" not in kwargs:
            raise UserError("DistillTrainer(loop_schedule=True): set lr_scheduler_type='cosine_with_min_lr' and "
                            "lr_scheduler_kwargs={'min_lr_rate': r}, the schedule trainer distill follows")
        return float(kwargs["min_lr_rate"])

    def _check_data(self) -> int | None:
        """The logit columns the loss uses: the cache's tokenizer length (else the tokenizer's, else all)."""
        ds, tok = self.train_dataset, self.processing_class
        width = int(unwrap(self.model).get_output_embeddings().weight.shape[0])
        if not isinstance(ds, DistillDataset):
            return len(tok) if tok is not None and hasattr(tok, "__len__") else None
        a = self.args
        if ds.batch_size != a.per_device_train_batch_size or ds.world_size != a.world_size:
            raise UserError(f"DistillDataset(batch_size={ds.batch_size}, world_size={ds.world_size}) does not match "
                            f"per_device_train_batch_size={a.per_device_train_batch_size} on {a.world_size} "
                            "process(es): the batches would not be trainer distill's")
        want = ds.reader.manifest.tokenizer.fingerprint
        if tok is not None and hasattr(tok, "get_vocab") and tokenizer_fingerprint(tok) != want:
            raise UserError(f"{ds.reader.path}: made with tokenizer {want[:12]}..., the student's is "
                            f"{tokenizer_fingerprint(tok)[:12]}...; distillation needs the same tokenizer")
        if ds.vocab_size > width:
            raise UserError(f"{ds.reader.path}: the cache's tokenizer has {ds.vocab_size} ids, the student only "
                            f"{width} logit columns")
        return ds.vocab_size

    # ---- data: our order, our fields, our count of loss tokens

    def _get_train_sampler(self, *args: Any, **kwargs: Any):
        dataset = (args[0] if args else kwargs.get("train_dataset")) or self.train_dataset
        if isinstance(dataset, DistillDataset):
            return SequentialSampler(dataset)
        return super()._get_train_sampler(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()       # keep the payload when remove_unused_columns is on
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *BATCH_FIELDS]))

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, *args: Any, **kwargs: Any):
        """The step's micro-batches and their loss tokens summed over all ranks (`num_items_in_batch`)."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        count = torch.tensor(sum(loss_tokens(b) for b in batches), device=self.args.device)
        return batches, self.accelerator.reduce(count, "sum")

    # ---- loss and its metrics

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: int | torch.Tensor | None = None):
        value, outputs = distill_compute_loss(
            model, inputs, self.loss_config, vocab=self.vocab, num_items_in_batch=num_items_in_batch,
            num_processes=self.accelerator.num_processes, head_at_loss_positions=self.head_at_loss_positions,
            return_outputs=True)
        if model.training:       # per-token means of the logging window, like trainer distill's metrics.jsonl
            n = outputs["n_tokens"].double()
            for k, v in outputs.items():
                if k not in ("loss", "n_tokens", "logits"):
                    self._sums[k] = self._sums.get(k, 0.0) + v.double() * n
            self._tokens = self._tokens + n
        return (value, outputs) if return_outputs else value

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._sums and "loss" in logs:          # a training entry: add the window's metrics
            keys = sorted(self._sums)
            totals = self.accelerator.reduce(torch.stack([self._sums[k] for k in keys] + [self._tokens]), "sum")
            logs.update({k: float(v) / max(float(totals[-1]), 1.0) for k, v in zip(keys, totals[:-1])})
            self._sums, self._tokens = {}, 0
        super().log(logs, *args, **kwargs)

    # ---- schedule

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self._min_lr_ratio is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        factor = functools.partial(lr_at, lr=1.0, warmup=self.args.get_warmup_steps(num_training_steps),
                                   total=num_training_steps, min_lr_ratio=self._min_lr_ratio)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler
