"""Experiment tracking for `trainer pretrain|distill --report-to`: TensorBoard or Weights & Biases.

OUT/metrics.jsonl is always written; a tracker gets the same entries as it grows (trainer.loop's
MetricsLog hands them on, on the main rank only). Each entry becomes scalars named by its kind,
`train/loss`, `train/kd`, `train/lr`, ..., `eval/ce`, ..., at its step.

- `tensorboard`: event files under OUT/tensorboard (`tensorboard --logdir OUT/tensorboard`).
- `wandb`: a W&B run in project `$WANDB_PROJECT` (default `logitcache`) with the run configuration,
  its files under OUT/wandb. `WANDB_MODE=offline` needs no network (`wandb sync OUT/wandb/offline-run-*`
  uploads it later). `--resume` continues the same run (its id is kept in OUT/wandb_run_id).

The libraries are optional (`pip install 'logitcache[track]'`); `require` says so in one line
before anything is written.
"""

from __future__ import annotations

import importlib
import os
import secrets
from pathlib import Path
from typing import Protocol

from logitcache.errors import UserError

REPORT_TO = ("none", "tensorboard", "wandb")
WANDB_ID_NAME = "wandb_run_id"


class Tracker(Protocol):
    def log(self, entry: dict) -> None: ...

    def close(self) -> None: ...


def require(kind: str) -> None:
    """A one-line UserError unless `kind` is known and its library imports."""
    if kind not in REPORT_TO:
        raise UserError(f"--report-to {kind}: expected one of {', '.join(REPORT_TO)}")
    if kind == "none":
        return
    try:
        importlib.import_module(kind)
    except ImportError:
        raise UserError(f"--report-to {kind}: the {kind} package is not installed; "
                        f"pip install 'logitcache[track]' (or pip install {kind})") from None


def scalars(entry: dict) -> tuple[int, dict[str, float]]:
    """(step, {"<kind>/<metric>": value}) of a metrics.jsonl entry: its numbers, `eval_` prefixes dropped."""
    kind = entry.get("kind", "train")
    values = {}
    for key, v in entry.items():
        if key in ("kind", "step") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        name = key[len("eval_"):] if kind == "eval" and key.startswith("eval_") else key
        values[f"{kind}/{name}"] = float(v)
    return int(entry["step"]), values


class TensorBoardTracker:
    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, entry: dict) -> None:
        step, values = scalars(entry)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()        # entries are rare (every --log-every steps): a killed run keeps them

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out: Path, config: dict, resumed: bool):
        import wandb

        id_file = out / WANDB_ID_NAME
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        # console="off": wandb leaves stdout and stderr alone (the commands' last stdout line is their JSON)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "logitcache"), name=out.name, id=run_id,
                              dir=str(out), config=config, resume="allow", settings=wandb.Settings(console="off"))

    def log(self, entry: dict) -> None:
        step, values = scalars(entry)
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(kind: str, out: Path, config: dict, resumed: bool) -> Tracker | None:
    """The tracker `kind` names writing under `out` (None for `none`); `config` is the run's settings."""
    require(kind)
    if kind == "tensorboard":
        return TensorBoardTracker(Path(out))
    if kind == "wandb":
        return WandbTracker(Path(out), config, resumed)
    return None
