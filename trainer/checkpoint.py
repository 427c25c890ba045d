"""Training checkpoints without pickle: safetensors tensors plus JSON, written atomically.

`OUT/checkpoint/` holds

- `model.safetensors`      the weights (float32 master copy; tied weights stored once)
- `optimizer.safetensors`  every tensor of the optimizer state, keyed `state.<param index>.<name>`
- `optimizer.json`         the optimizer's param groups and its non-tensor per-parameter state
- `rng.safetensors`        torch CPU and CUDA generator states (one set per rank under DDP)
- `trainer_state.json`     step, batch position, scheduler state, numpy/python RNG, run config

A checkpoint is written to a temporary folder beside it, fsynced, and renamed into place, so a
crash leaves either the previous checkpoint or the new one, never a mixture. Loading never uses
pickle: `torch.load` is not called at all.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from logitcache.errors import UserError
from logitcache.format.atomic import fsync_path, temporary_path

CHECKPOINT_DIR = "checkpoint"
STATE_NAME = "trainer_state.json"
MODEL_NAME = "model.safetensors"
OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_JSON = "optimizer.json"
RNG_NAME = "rng.safetensors"
FORMAT = "trainer-checkpoint"
VERSION = 1


# ---------------------------------------------------------------------------------------------
# optimizer state <-> (tensors, JSON)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------
# RNG states


def local_rng_tensors() -> dict[str, torch.Tensor]:
    """This process's torch generator states as uint8 tensors."""
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda.{i}"] = s
    return out


def host_rng_json() -> dict:
    """numpy's and Python's global generator states as JSON (neither is pickled)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {"numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": version, "state": list(internal), "gauss": py_gauss}}


def restore_host_rng(d: dict) -> None:
    n = d["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = d["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def restore_local_rng(tensors: dict[str, torch.Tensor], rank: int = 0) -> None:
    prefix = f"rank{rank}."
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if "torch_cpu" in mine:
        torch.set_rng_state(mine["torch_cpu"])
    cuda = sorted((int(k.split(".")[1]), v) for k, v in mine.items() if k.startswith("torch_cuda."))
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        torch.cuda.set_rng_state_all([v for i, v in cuda if i < n])


# ---------------------------------------------------------------------------------------------
# save / load


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def save_checkpoint(out_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rng_by_rank: list[dict[str, torch.Tensor]], state: dict) -> Path:
    """Write OUT/checkpoint atomically. `model` must be the unwrapped module (not DDP)."""
    out_dir = Path(out_dir)
    final = out_dir / CHECKPOINT_DIR
    tmp = temporary_path(final)          # the whole folder is the unit written atomically
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / MODEL_NAME))
    tensors, meta = optimizer_to_flat(optimizer)
    save_file(tensors, str(tmp / OPTIM_TENSORS))
    _write_json(tmp / OPTIM_JSON, meta)
    rng = {f"rank{r}.{k}": v.contiguous() for r, d in enumerate(rng_by_rank) for k, v in d.items()}
    save_file(rng, str(tmp / RNG_NAME))
    _write_json(tmp / STATE_NAME, {"format": FORMAT, "version": VERSION, "world_size": len(rng_by_rank),
                                   "host_rng": host_rng_json(), **state})
    for f in tmp.iterdir():
        fsync_path(f)
    fsync_path(tmp)
    old = out_dir / f".{CHECKPOINT_DIR}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(out_dir)
    if old.exists():
        shutil.rmtree(old)
    return final


def find_checkpoint(out_dir: Path) -> Path | None:
    """OUT/checkpoint, or the previous one if a crash hit between the two renames of a save."""
    out_dir = Path(out_dir)
    final = out_dir / CHECKPOINT_DIR
    if (final / STATE_NAME).is_file():
        return final
    olds = sorted(out_dir.glob(f".{CHECKPOINT_DIR}.old-*"))
    olds = [p for p in olds if (p / STATE_NAME).is_file()]
    return olds[-1] if olds else None


def read_state(ckpt: Path) -> dict:
    try:
        state = json.loads((ckpt / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{ckpt}: unreadable checkpoint state ({type(exc).__name__})") from None
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise UserError(f"{ckpt}: not a trainer checkpoint of version {VERSION}")
    return state


def load_checkpoint(ckpt: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int = 0) -> dict:
    """Restore weights, optimizer and RNG states in place; return the trainer state."""
    state = read_state(ckpt)
    missing, unexpected = load_model(model, str(ckpt / MODEL_NAME), strict=False)
    if missing or unexpected:
        raise UserError(f"{ckpt}: checkpoint weights do not fit the model "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    # CPU on purpose: load_state_dict moves moments to each parameter's device and keeps `step`
    # where the optimizer expects it (a CUDA `step` breaks non-capturable AdamW).
    tensors = load_file(str(ckpt / OPTIM_TENSORS), device="cpu")
    meta = json.loads((ckpt / OPTIM_JSON).read_text())
    try:
        optimizer.load_state_dict(optimizer_from_flat(tensors, meta))
    except (ValueError, KeyError) as exc:
        raise UserError(f"{ckpt}: optimizer state does not fit this model ({exc})") from None
    restore_local_rng(load_file(str(ckpt / RNG_NAME)), rank)
    restore_host_rng(state["host_rng"])
    return state
