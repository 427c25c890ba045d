"""End to end: load a checkpoint, score it, plan the target shape, cut it and save the student folder."""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from trainer.prune.arch import check_supported, dims
from trainer.prune.importance import compute_importance
from trainer.prune.plan import count_parameters, plan_for_target
from trainer.prune.surgery import prune_model, topk_sorted

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def _config_dtype(config) -> torch.dtype:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else torch.float32


def _save(model: PreTrainedModel, out_dir: Path) -> None:
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        model.save_pretrained(out_dir, safe_serialization=True)
    else:  # transformers >= 5 always writes safetensors
        model.save_pretrained(out_dir)


def prune_to_dir(
    model_path: str | Path,
    out_dir: str | Path,
    calib_batches: Iterable[torch.Tensor],
    *,
    target_params: int | None = None,
    sparsity: float | None = None,
    method: str = "activation",
    layers_to_drop: int | Sequence[int] | None = None,
) -> dict:
    """Load a checkpoint, score it, prune it and save the student checkpoint to ``out_dir``.

    Scoring and surgery run in float32; the result is saved as safetensors in the checkpoint's
    original dtype, with its config, generation config and any tokenizer files copied along,
    plus ``pruning.json`` (the returned summary).  ``layers_to_drop`` is a count (lowest
    1 - cos first) or explicit layer indices; the width search then targets the rest.
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    config = AutoConfig.from_pretrained(model_path)
    check_supported(config)
    save_dtype = _config_dtype(config)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    l0 = model.config.num_hidden_layers

    drop: list[int] | None = None
    num_layers = None
    if isinstance(layers_to_drop, int):
        num_layers = l0 - layers_to_drop
    elif layers_to_drop is not None:
        drop = sorted({int(i) for i in layers_to_drop})
        num_layers = l0 - len(drop)

    importance = compute_importance(model, calib_batches, method)
    plan = plan_for_target(model.config, target_params, sparsity, num_layers=num_layers)
    pruned = prune_model(model, importance, **plan, drop_layers=drop)
    kept_layers = (
        [i for i in range(l0) if i not in drop]
        if drop is not None
        else topk_sorted(importance.layers, plan["num_layers"]).tolist()
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    pruned.to(save_dtype)
    _save(pruned, out_dir)
    for name in TOKENIZER_FILES:
        src = model_path / name
        if src.is_file() and not (out_dir / name).exists():
            shutil.copy2(src, out_dir / name)

    h0, nq0, nkv0, _, i0, _ = dims(model.config)
    summary = {
        "source": str(model_path),
        "method": method,
        "params_before": count_parameters(model),
        "params_after": count_parameters(pruned),
        "non_embedding_params_before": count_parameters(model, non_embedding=True),
        "non_embedding_params_after": count_parameters(pruned, non_embedding=True),
        "target_params": target_params,
        "sparsity": sparsity,
        "dims_before": {
            "hidden_size": h0,
            "num_heads": nq0,
            "num_key_value_heads": nkv0,
            "intermediate_size": i0,
            "num_layers": l0,
        },
        "dims_after": plan,
        "kept_layers": kept_layers,
        "calibration_tokens": importance.num_tokens,
    }
    (out_dir / "pruning.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
