"""Held-out evaluation: next-token CE on windows, and KL to a teacher on a cache.

`KL` is the tail-bucket forward KL(teacher || student) over the (k+1)-way distribution the cache
defines (top-k tokens plus one bucket for the rest): exact for what the cache stores, and a lower
bound on the full-vocabulary KL. CE is over the actual next token. Both are means over positions.

Under DDP (`torch.distributed` initialised) each rank evaluates every `world`-th window and the
sums are all-reduced, so every rank returns the same numbers.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from trainer.attention import forward_kwargs
from trainer.losses import distill_loss


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA only; CPU runs in float32 (CPU bf16 is slow and not what we test)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce(sums: list[float], device: torch.device) -> list[float]:
    _, world = _rank_world()
    if world == 1:
        return sums
    t = torch.tensor(sums, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _logits(model, window: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """Logits at every position of windows [B, T + 1] (the last token is only a target)."""
    with autocast_for(window.device):
        logits = model(input_ids=window[:, :-1], use_cache=False).logits
    if vocab is not None and logits.shape[-1] > vocab:
        logits = logits[..., :vocab]
    return logits


@torch.no_grad()
def evaluate_windows(model, tokens: np.ndarray, *, batch_size: int = 8, device: torch.device | str = "cpu",
                     vocab: int | None = None, max_windows: int | None = None,
                     chunk_size: int = 4096) -> dict[str, float]:
    """Mean next-token CE (nats/token) and perplexity over `tokens` [n, seq_len + 1]."""
    device = torch.device(device)
    rank, world = _rank_world()
    n = len(tokens) if max_windows is None else min(len(tokens), max_windows)
    mine = np.arange(rank, n, world)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for s in range(0, len(mine), batch_size):
            x = torch.as_tensor(tokens[mine[s:s + batch_size]], dtype=torch.long, device=device)
            logits = _logits(model, x, vocab)
            flat, labels = logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
            for c in range(0, len(labels), chunk_size):   # float32 copies of one chunk at a time
                z = flat[c:c + chunk_size].float()
                total += (torch.logsumexp(z, -1) - z.gather(1, labels[c:c + chunk_size, None]).squeeze(1)).sum().item()
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    total, count = _reduce([total, float(count)], device)
    ce = total / max(count, 1)
    return {"ce": ce, "ppl": math.exp(min(ce, 50.0)), "tokens": int(count)}


@torch.no_grad()
def evaluate_sequences(model, sequences, *, batch_size: int = 8, device: torch.device | str = "cpu",
                       vocab: int | None = None, max_windows: int | None = None) -> dict[str, float]:
    """Mean CE (nats/token) over the trained tokens of `sequences` (logitcache.data.Sequences: chat
    rows with loss masks), e.g. held-out assistant-token CE; rows in order, every world-th to a rank."""
    device = torch.device(device)
    rank, world = _rank_world()
    n = sequences.num_windows if max_windows is None else min(sequences.num_windows, max_windows)
    mine = np.arange(rank, n, world)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for s in range(0, len(mine), batch_size):
            rows = [sequences.row(int(i)) for i in mine[s:s + batch_size]]
            t = max(len(tokens) for tokens, _ in rows)
            window = torch.zeros((len(rows), t), dtype=torch.long)
            targets = torch.zeros((len(rows), t), dtype=torch.bool)
            for b, (tokens, mask) in enumerate(rows):
                window[b, :len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
                targets[b, :len(tokens)] = torch.as_tensor(mask)
            window, targets = window.to(device), targets[:, 1:].to(device)
            logits = _logits(model, window, vocab)[targets].float()          # (P, V): trained positions
            labels = window[:, 1:][targets]
            total += (torch.logsumexp(logits, -1) - logits.gather(1, labels[:, None]).squeeze(1)).sum().item()
            count += int(targets.sum())
    finally:
        model.train(was_training)
    total, count = _reduce([total, float(count)], device)
    ce = total / max(count, 1)
    return {"ce": ce, "ppl": math.exp(min(ce, 50.0)), "tokens": int(count)}


@torch.no_grad()
def evaluate_cache(model, reader, *, batch_size: int = 8, device: torch.device | str = "cpu",
                   vocab: int | None = None, max_windows: int | None = None,
                   chunk_size: int | None = 4096) -> dict[str, float]:
    """CE on the cache's windows and forward KL(teacher || student) over the (k+1)-way buckets.

    Reads the first `max_windows` windows of the cache in window order; under DDP rank r takes
    every world-th batch. A batch with a `loss_mask` is measured at its positions only (`tokens`
    counts them), and its `attention_mask` goes to the model; packed rows (`position_ids`) are kept
    apart as in training (trainer.attention).
    """
    device = torch.device(device)
    rank, world = _rank_world()
    limit = reader.num_windows if max_windows is None else min(reader.num_windows, max_windows)
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)   # kl, ce, teacher tail, student tail, positions
    seen = 0
    try:
        for j, batch in enumerate(reader.iter_batches(batch_size)):
            if seen >= limit:
                break
            take = min(len(batch["window_id"]), limit - seen)
            seen += take
            if j % world != rank:
                continue
            b = {k: v[:take].to(device) for k, v in batch.items()}
            kwargs, unflatten = forward_kwargs(model, b["input_ids"], b.get("attention_mask"), b.get("position_ids"))
            with autocast_for(device):
                logits = unflatten(model(**kwargs).logits)
            if vocab is not None and logits.shape[-1] > vocab:
                logits = logits[..., :vocab]
            n_pos = b["labels"].numel()
            k = b["topk_ids"].shape[-1]
            # positions without a loss (a conversation's prompt, padding) are not measured either
            mask = (b["loss_mask"].reshape(n_pos) if "loss_mask" in b
                    else torch.ones(n_pos, dtype=torch.bool, device=device))
            _, m = distill_loss(logits.reshape(n_pos, -1), b["topk_ids"].reshape(n_pos, k),
                                b["topk_logprobs"].reshape(n_pos, k), b["tail_logmass"].reshape(n_pos),
                                b["labels"].reshape(n_pos), mask, kind="forward_kl", chunk_size=chunk_size)
            sums += torch.tensor([m["kd"].item(), m["ce"].item(), m["teacher_tail_mass"].item(),
                                  m["student_tail_mass"].item(), 1.0], dtype=torch.float64) * m["n_tokens"].item()
    finally:
        model.train(was_training)
    kl, ce, tail_t, tail_s, count = _reduce(sums.tolist(), device)
    c = max(count, 1)
    return {"kl": kl / c, "ce": ce / c, "ppl": math.exp(min(ce / c, 50.0)),
            "teacher_tail_mass": tail_t / c, "student_tail_mass": tail_s / c, "tokens": int(count)}
