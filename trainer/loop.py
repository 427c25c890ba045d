"""The one training loop behind `trainer pretrain` and `trainer distill`.

The two commands differ only in the batch source (packed windows vs a teacher cache) and the loss
function they pass in; everything else -- AdamW with warmup + cosine decay, gradient accumulation
and clipping, bf16 autocast on CUDA, DDP, periodic evaluation, atomic checkpoints, exact resume,
metrics.jsonl and the final Hugging Face checkpoint -- lives in `train` below, one function whose
sections always run in the same order: lr, eval/checkpoint, forward/backward, step, log.

Loss positions: a batch may carry `loss_mask` (bool [B, T], True where the prediction of
`labels[:, t]` carries a loss; absent = every position), `attention_mask` and `position_ids` (both
[B, T], passed to the model when present). The gradient of a step is the sum of the per-token losses
over all its loss tokens -- every micro-batch of the accumulation, every rank -- divided by their
number, as one large batch would give; a mean per micro-batch would weigh a token of a micro-batch
with few loss tokens more than one of a micro-batch with many. With a `loss_mask` the LM head runs
at the loss positions only (trainer.logits.LogitsAt) and the loss function sees those positions.

Exact resume: batch `i` is a pure function of (seed, i), the learning rate a pure function of the
step, and a checkpoint stores the float32 weights, the full optimizer state and the RNG states, so
N steps and N/2 + resume + N/2 give bit-identical weights on CPU.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from logitcache.errors import UserError
from trainer.checkpoint import find_checkpoint, load_checkpoint, local_rng_tensors, read_state, save_checkpoint
from trainer.config import RUN_CONFIG_NAME, RunConfig, resume_differences
from trainer.evaluate import autocast_for
from trainer.logits import LogitsAt
from trainer.tracking import Tracker, open_tracker

METRICS_NAME = "metrics.jsonl"
LossFn = Callable[[torch.Tensor, dict], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")   # batch fields the model reads
EvalFn = Callable[[nn.Module], "dict[str, float]"]


# ---------------------------------------------------------------------------------------------
# helpers: distributed setup, schedule, optimizer, metrics file


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_flag: str = "auto") -> DistEnv:
    """Read torchrun's environment; with WORLD_SIZE > 1 start the process group (gloo/nccl)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag == "auto":
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    if device_flag.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device_flag}: CUDA is not available on this machine")
    if device_flag == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    else:
        device = torch.device(device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, device)


def lr_at(step: int, lr: float, warmup: int, total: int, min_lr_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from `lr` down to `lr * min_lr_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (embeddings and projections), none on norms/biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


class MetricsLog:
    """Append-only JSONL; on resume, drop entries past the checkpoint's step (they are redone).
    Each entry also goes to `tracker` (TensorBoard, W&B: trainer.tracking) when there is one."""

    def __init__(self, path: Path, resume_step: int | None, tracker: Tracker | None = None):
        self.path = Path(path)
        self.tracker = tracker
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None:
            self.path.write_text("")

    def write(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
        if self.tracker is not None:
            self.tracker.log(entry)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def _sum_over_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """`values` summed over the ranks (on the process group's device; unchanged with one rank)."""
    if env.world == 1:
        return values
    t = values.to(env.device if env.device.type == "cuda" else torch.device("cpu"))
    dist.all_reduce(t)
    return t


def _gather_rng(env: DistEnv) -> list[dict[str, torch.Tensor]]:
    """Every rank's torch RNG states, gathered on all ranks (tensors only, no pickled objects)."""
    mine = local_rng_tensors()
    if env.world == 1:
        return [mine]
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(env.world)]
    comm_device = env.device if env.device.type == "cuda" else torch.device("cpu")
    for key in sorted(mine):
        local = mine[key].to(comm_device)
        bufs = [torch.empty_like(local) for _ in range(env.world)]
        dist.all_gather(bufs, local)
        for r, b in enumerate(bufs):
            out[r][key] = b.cpu()
    return out


def preflight(run: RunConfig, resume: bool, world: int) -> Path | None:
    """The checkpoint to resume (or None), refusing what cannot continue exactly; cheap, call early."""
    out = Path(run.out)
    ckpt = find_checkpoint(out)
    if ckpt is not None and not resume:
        raise UserError(f"--out {out} already holds a checkpoint; pass --resume to continue it "
                        "or choose another --out")
    if ckpt is None:
        return None
    state = read_state(ckpt)
    diffs = resume_differences(RunConfig.from_dict(state["run"], f"{ckpt}/trainer_state.json"), run)
    if diffs:
        raise UserError(f"--resume: settings differ from the checkpoint in {out}: {'; '.join(diffs)}")
    if state["world_size"] != world:
        raise UserError(f"--resume: the checkpoint was written by {state['world_size']} rank(s), this run has "
                        f"{world}; the batch order would differ")
    return ckpt


def save_final(model: nn.Module, tokenizer, out_dir: Path, run: RunConfig) -> None:
    """The trained model as an ordinary Hugging Face checkpoint (safetensors) plus its tokenizer."""
    dtype = getattr(torch, run.save_dtype)
    model = model.to(dtype)
    model.save_pretrained(out_dir)  # safetensors is the only format transformers >= 5 writes
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    run.save(out_dir / RUN_CONFIG_NAME)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def loss_tokens(batch: dict) -> int:
    """How many positions of a (CPU) micro-batch carry a loss: its `loss_mask`'s, else all of them."""
    labels = batch["labels"]
    mask = batch.get("loss_mask")
    if mask is None:
        return labels.numel()
    if mask.dtype != torch.bool or mask.shape != labels.shape:
        raise ValueError(f"loss_mask must be bool {tuple(labels.shape)} like labels, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return int(mask.sum())


def at_loss_positions(batch: dict) -> tuple[torch.Tensor, dict]:
    """(index, loss batch) of a micro-batch with a `loss_mask` [B, T].

    `index` int64 [n] lists the loss positions of the flattened B * T in row-major order (the
    order LogitsAt returns their logits in); the loss batch holds every per-position field other
    than the model's inputs (labels, the teacher's top-k or draws, ...) at those positions,
    [n, ...], and no loss_mask: all n positions count. Per-row fields (window_id) are left out.
    """
    mask = batch["loss_mask"]
    b, t = mask.shape
    index = mask.reshape(-1).nonzero().squeeze(1)
    picked = {k: v.reshape(b * t, *v.shape[2:]).index_select(0, index) for k, v in batch.items()
              if k not in MODEL_INPUTS and k != "loss_mask" and tuple(v.shape[:2]) == (b, t)}
    return index, picked


# ---------------------------------------------------------------------------------------------
# the loop


def train(model: nn.Module, *, run: RunConfig, env: DistEnv, source, loss_fn: LossFn,
          evaluate: EvalFn | None, tokenizer, resume: bool = False, head_at_loss_positions: bool = True) -> dict:
    """Train `model` (float32, on CPU or `env.device`) on `source`'s batches; return a summary.

    `source.stream(start, count, ...)` yields this rank's micro-batches from `start` on (see
    trainer.data) and `source.seq_len` is their length; `evaluate(model)` returns held-out
    metrics (collective under DDP).

    `loss_fn(logits, batch)` returns (loss, detached metrics), `loss` being the MEAN over the
    batch's loss positions (its `loss_mask`, or every position without one) and each metric a
    mean over them too. `logits` has `batch["labels"]`'s leading dims plus V: [B, T, V] for a full
    batch, or [n, V] with every per-position field at the same n positions when the head ran at
    the loss positions only (a batch with a `loss_mask` and `head_at_loss_positions`; False
    computes the logits everywhere and leaves the mask to `loss_fn`).
    """
    cfg = run.train
    out = Path(run.out)
    device = env.device
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))

    # ---- resume or start fresh
    step = 0
    ckpt = preflight(run, resume, env.world)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer, rank=env.rank)
        step = int(state["step"])
    else:
        torch.manual_seed(cfg.seed + env.rank)
        if resume and env.is_main:
            print(f"trainer: no checkpoint in {out}; starting from step 0", flush=True)
    start_step = step
    last_step = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    if env.is_main:
        run.save(out / RUN_CONFIG_NAME)
    log = MetricsLog(out / METRICS_NAME, start_step if ckpt is not None else None,
                     open_tracker(cfg.report_to, out, run.to_dict(), resumed=ckpt is not None)) if env.is_main else None

    # DDP wraps the forward that runs: the model's logits, at the loss positions only for masked batches
    student = LogitsAt(model, (lambda m: print(m, file=sys.stderr, flush=True)) if env.is_main else None)
    ddp_model = nn.parallel.DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None) if env.world > 1 else student
    micro_batches = (last_step - step) * cfg.grad_accum
    loader = source.stream(step * cfg.grad_accum, micro_batches, workers=cfg.workers,
                           pin_memory=device.type == "cuda")
    tokens_per_step = cfg.batch_size * source.seq_len * cfg.grad_accum * env.world
    bar = tqdm(total=cfg.steps, initial=step, desc=run.command, dynamic_ncols=True,
               disable=not (env.is_main and cfg.progress))
    sums: dict[str, torch.Tensor | float] = {}  # metric * loss tokens since the last log
    window_tokens, grad_norms = 0, 0.0
    window_steps, t_window, wait_window, paused = 0, time.perf_counter(), 0.0, 0.0
    summary: dict = {"start_step": start_step}

    while True:
        # ---- lr: warmup then cosine, a pure function of the step
        lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- eval / checkpoint (before the step: step 0 gives the baseline; skipped at the
        # resumed step, which the interrupted run already evaluated and saved)
        t_pause = time.perf_counter()
        done = step >= last_step
        resumed_here = ckpt is not None and step == start_step
        if evaluate is not None and not resumed_here and ((cfg.eval_every and step % cfg.eval_every == 0) or done):
            result = evaluate(model)
            summary["eval"] = result
            if log is not None:
                log.write({"kind": "eval", "step": step, **{f"eval_{k}": v for k, v in result.items()}})
                bar.write(f"step {step}: " + ", ".join(f"eval_{k} {v:.4f}" for k, v in result.items()
                                                     if isinstance(v, float)))
        if step != start_step and ((cfg.save_every and step % cfg.save_every == 0) or done):
            rng = _gather_rng(env)
            if env.is_main:
                save_checkpoint(out, model=model, optimizer=optimizer, rng_by_rank=rng, state={
                    "step": step, "batch_position": step * cfg.grad_accum, "run": run.to_dict(),
                    "scheduler": {"kind": "warmup_cosine", "step": step, "lr": lr},
                    "tokens_seen": step * tokens_per_step})
        if done:
            break
        paused += time.perf_counter() - t_pause     # evaluation and saving do not count as step time

        # ---- forward / backward: grad_accum micro-batches, gradients synced on the last one. All of
        # the step's micro-batches are fetched first: the gradient is the loss SUMMED over the step's
        # loss tokens (every micro-batch, every rank) over their number, which must be known before
        # the first backward.
        t_step = time.perf_counter()
        t_wait = time.perf_counter()
        step_batches = [next(loader) for _ in range(cfg.grad_accum)]
        wait_window += time.perf_counter() - t_wait
        counts = [loss_tokens(b) for b in step_batches]                 # on the CPU: no device sync
        total = int(_sum_over_ranks(torch.tensor([sum(counts)]), env).item())
        for micro, (batch, n_loss) in enumerate(zip(step_batches, counts)):
            index, loss_batch = (at_loss_positions(batch) if head_at_loss_positions and "loss_mask" in batch
                                 else (None, batch))
            inputs = _to_device({k: batch[k] for k in MODEL_INPUTS if k in batch}, device)
            loss_batch = _to_device(loss_batch, device)
            sync = micro == cfg.grad_accum - 1
            with ddp_model.no_sync() if env.world > 1 and not sync else nullcontext():
                with autocast_for(device):
                    logits = ddp_model(**inputs, index=None if index is None else index.to(device))
                loss, metrics = loss_fn(logits, loss_batch)
                # `loss` is the mean over n_loss tokens; times n_loss * world / total it is their sum
                # over the step's tokens per rank, and DDP's mean over the ranks then gives the sum
                # over all of them / total. Written as one division so that equal micro-batches (no
                # loss_mask) divide by exactly grad_accum, as before masks existed. A micro-batch
                # without loss tokens still runs backward (DDP's hooks expect one) with zero weight.
                (loss / (total / (n_loss * env.world)) if n_loss else loss * 0.0).backward()
            for k, v in metrics.items():
                if k != "n_tokens":     # logged: per-token means over the window, so weighted by tokens
                    sums[k] = sums.get(k, 0.0) + (v.detach().double() * n_loss if n_loss else 0.0)
            window_tokens += n_loss
            del logits, loss

        # ---- step: clip, update, zero
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        grad_norms += grad_norm.detach().float()       # the same on every rank (DDP synced the gradients)
        step += 1
        window_steps += 1
        bar.update(1)

        # ---- log: means since the last entry, reduced over ranks
        if step % cfg.log_every == 0 or step == last_step:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            keys = sorted(sums)
            totals = _sum_over_ranks(torch.tensor([float(sums[k]) for k in keys] + [float(window_tokens)],
                                                  dtype=torch.float64), env).tolist()
            means = {k: v / max(totals[-1], 1.0) for k, v in zip(keys, totals)}
            elapsed = time.perf_counter() - t_window - paused
            entry = {"kind": "train", "step": step, "lr": lr, **means, "grad_norm": float(grad_norms) / window_steps,
                     "loss_tokens_per_step": totals[-1] / window_steps,
                     "tokens": step * tokens_per_step,
                     "tokens_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9),
                     "step_time_s": elapsed / window_steps,
                     "data_wait_fraction": wait_window / max(elapsed, 1e-9),
                     "last_step_s": time.perf_counter() - t_step}
            if not math.isfinite(entry.get("loss", 0.0)):
                raise UserError(f"loss is {entry['loss']} at step {step}; lower --lr or check the data")
            if log is not None:
                log.write(entry)
            bar.set_postfix(loss=f"{entry.get('loss', float('nan')):.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            summary["train"] = entry
            sums, window_tokens, grad_norms = {}, 0, 0.0
            window_steps, t_window, wait_window, paused = 0, time.perf_counter(), 0.0, 0.0

    bar.close()
    if log is not None:
        log.close()
    if hasattr(loader, "close"):
        loader.close()          # stop DataLoader workers now, not at garbage collection
    del loader
    summary["step"] = step
    summary["finished"] = step >= cfg.steps
    if summary["finished"] and env.is_main:
        save_final(model, tokenizer, out, run)
    if env.world > 1:
        del ddp_model           # DDP's reducer must die before its process group, else gloo hangs
        dist.barrier()
        dist.destroy_process_group()
    return summary
