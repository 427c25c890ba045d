"""Run configuration of `trainer pretrain` / `trainer distill`: dataclasses, JSON round trip, resume checks.

A run's configuration is written to `OUT/run_config.json` (`OUT/config.json` is the saved model's
Hugging Face config) and into every checkpoint. Loading rejects unknown keys at every level, so a
typo in a hand-edited file fails loudly instead of being ignored. `--resume` refuses to continue a
checkpoint whose training-relevant settings differ from the command line's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logitcache.errors import UserError
from trainer.tracking import REPORT_TO
from trainer.tracking import require as require_tracker

RUN_CONFIG_NAME = "run_config.json"
LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd", "sampled")   # sampled: for sampled caches only


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping shared by every training command."""

    steps: int = 1000
    batch_size: int = 8            # windows per micro-batch (per rank)
    grad_accum: int = 1            # micro-batches per optimizer step
    lr: float = 1e-3               # peak learning rate (AdamW)
    warmup: int = 50               # linear warmup steps
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.1      # applied to matrices only (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0              # max global grad norm; 0 disables clipping
    seed: int = 0
    eval_every: int = 100          # steps between held-out evaluations; 0: only at the end
    eval_windows: int = 64         # held-out windows per evaluation
    eval_batch_size: int = 0       # 0: same as batch_size
    save_every: int = 200          # steps between checkpoints; 0: only at the end
    log_every: int = 10            # steps between metrics.jsonl entries
    stop_at: int = 0               # stop after this step with a checkpoint (as if interrupted); 0: never
    device: str = "auto"           # auto, cpu, cuda, cuda:N
    workers: int = 0               # DataLoader worker processes feeding batches
    progress: bool = True          # tqdm bar on rank 0
    report_to: str = "none"        # none, tensorboard, wandb (trainer.tracking); metrics.jsonl always

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, "--steps must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.warmup >= 0, "--warmup must be >= 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, "--min-lr-ratio must be in [0, 1]"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.clip >= 0, "--clip must be >= 0 (0 disables clipping)"),
            (self.eval_every >= 0 and self.save_every >= 0, "--eval-every/--save-every must be >= 0"),
            (self.eval_windows >= 1, "--eval-windows must be >= 1"),
            (self.log_every >= 1, "--log-every must be >= 1"),
            (0 <= self.stop_at, "--stop-at must be >= 0"),
            (self.workers >= 0, "--workers must be >= 0"),
            (self.report_to in REPORT_TO, f"--report-to must be one of {', '.join(REPORT_TO)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)


@dataclass
class LossConfig:
    """The KD objective of `trainer distill` (see trainer.losses.distill_loss)."""

    loss: str = "forward_kl"
    beta: float = 0.5              # JSD mixture weight
    temperature: float = 1.0
    alpha_ce: float = 0.0          # weight of next-token CE mixed into the loss
    renormalize_topk: bool = False
    logits_chunk: int = 1024       # positions per float32 log-softmax chunk; 0: all at once

    def validate(self) -> None:
        if self.loss not in LOSS_KINDS:
            raise UserError(f"--loss {self.loss}: expected one of {', '.join(LOSS_KINDS)}")
        if not 0.0 <= self.beta <= 1.0:
            raise UserError(f"--beta {self.beta}: must be in [0, 1]")
        if not self.temperature > 0:
            raise UserError(f"--temperature {self.temperature}: must be > 0")
        if not 0.0 <= self.alpha_ce <= 1.0:
            raise UserError(f"--alpha-ce {self.alpha_ce}: must be in [0, 1]")
        if self.logits_chunk < 0:
            raise UserError(f"--logits-chunk {self.logits_chunk}: must be >= 0")
        if self.loss == "sampled" and (self.temperature != 1.0 or self.renormalize_topk):
            raise UserError("--loss sampled: the draws are unbiased only at --temperature 1 and have no top-k "
                            "to renormalise")


@dataclass
class RunConfig:
    """Everything that defines a run: inputs, training settings and (for distill) the loss."""

    command: str                   # pretrain | distill
    model: str                     # pretrain: config JSON or checkpoint dir; distill: student dir
    out: str
    tokenizer: str | None = None
    data: str | None = None        # pretrain corpus
    cache: str | None = None       # distill teacher cache
    seq_len: int | None = None
    max_windows: int | None = None
    work: str | None = None        # folder for packed windows
    eval_data: str | None = None
    eval_cache: str | None = None
    save_dtype: str = "float32"
    logits_chunk: int | None = None      # pretrain's CE chunking (distill: loss.logits_chunk)
    data_fingerprint: str | None = None  # pretrain: training windows; distill: the cache key
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig | None = None

    def validate(self) -> None:
        self.train.validate()
        if self.loss is not None:
            self.loss.validate()
        if self.logits_chunk is not None and self.logits_chunk < 0:
            raise UserError(f"--logits-chunk {self.logits_chunk}: must be >= 0")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"--save-dtype {self.save_dtype}: expected float32, bfloat16 or float16")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> RunConfig:
        d = dict(d)
        train = _build(TrainConfig, d.pop("train", {}) or {}, f"{where}.train")
        loss_d = d.pop("loss", None)
        loss = None if loss_d is None else _build(LossConfig, loss_d, f"{where}.loss")
        run = _build(cls, d, where, train=train, loss=loss)
        return run

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: unreadable run configuration ({type(exc).__name__})") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}: run configuration must be a JSON object")
        return cls.from_dict(d, str(path))


def _build(cls, d: Any, where: str, **extra):
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected an object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}")
    try:
        return cls(**d, **extra)
    except TypeError as exc:  # a required key is missing
        raise UserError(f"{where}: {exc}") from None


# Settings that may change between a checkpoint and the command that resumes it: they do not
# change what the optimizer sees (where to run, how often to report, where to stop).
RESUMABLE_CHANGES = {
    "train.device", "train.workers", "train.progress", "train.log_every", "train.eval_every",
    "train.eval_windows", "train.eval_batch_size", "train.save_every", "train.stop_at",
    "eval_data", "eval_cache", "work", "save_dtype", "out", "train.report_to",
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_differences(saved: RunConfig, current: RunConfig) -> list[str]:
    """Training-relevant settings that differ, as `name: saved -> current` strings."""
    a, b = _flatten(saved.to_dict()), _flatten(current.to_dict())
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


# ---------------------------------------------------------------------------------------------
# command-line flags shared by pretrain and distill


def add_train_arguments(p) -> None:
    """The training flags of `trainer pretrain` and `trainer distill` (defaults: TrainConfig)."""
    d = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="windows per micro-batch and rank (default %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-batches per optimizer step (default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate, AdamW (default %(default)s)")
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps (default %(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="cosine decay ends at lr * this (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay on matrices (default %(default)s)")
    g.add_argument("--clip", type=float, default=d.clip, help="max gradient norm, 0 = off (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for init and batch order (default %(default)s)")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default %(default)s)")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="DataLoader worker processes decoding batches (default %(default)s)")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between held-out evaluations, 0 = only at the end (default %(default)s)")
    g.add_argument("--eval-windows", type=int, default=d.eval_windows,
                   help="held-out windows per evaluation (default %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="windows per evaluation batch, 0 = --batch-size (default %(default)s)")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help="steps between checkpoints in OUT/checkpoint, 0 = only at the end (default %(default)s)")
    g.add_argument("--log-every", type=int, default=d.log_every,
                   help="steps between OUT/metrics.jsonl entries (default %(default)s)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint (exactly: same weights as an uninterrupted run)")
    g.add_argument("--stop-at", type=int, default=d.stop_at,
                   help="stop after this step with a checkpoint, as if interrupted; --resume continues "
                        "(e.g. to split a run over time-limited jobs)")
    g.add_argument("--save-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the final checkpoint's weights (default %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--report-to", default=d.report_to, choices=REPORT_TO,
                   help="also send the metrics to TensorBoard (OUT/tensorboard) or Weights & Biases (files in "
                        "OUT/wandb; WANDB_MODE=offline needs no network); OUT/metrics.jsonl is always written "
                        "(default %(default)s)")


def train_config_from_args(args) -> TrainConfig:
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                      warmup=args.warmup, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                      clip=args.clip, seed=args.seed, eval_every=args.eval_every,
                      eval_windows=args.eval_windows, eval_batch_size=args.eval_batch_size,
                      save_every=args.save_every, log_every=args.log_every, stop_at=args.stop_at,
                      device=args.device, workers=args.workers, progress=not args.no_progress,
                      report_to=args.report_to)
    cfg.validate()
    require_tracker(cfg.report_to)      # a missing library is refused before anything is written
    return cfg
