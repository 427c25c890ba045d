"""Structured pruning of Llama-family causal LMs into smaller students (Minitron / MiniMA style).

Width pruning removes hidden channels, attention heads and FFN neurons; depth pruning drops
whole decoder layers.  The result is a fresh model of the same class with a smaller config,
holding exact slices of the original weights, so it saves and loads as an ordinary Hugging
Face checkpoint.

Supported: LlamaForCausalLM, Qwen2ForCausalLM (q/k/v biases), MistralForCausalLM, with
multi-head or grouped-query attention and tied or untied embeddings.  Anything else raises
``ValueError`` naming the architecture.

Grouped-query attention: a query head is kept only together with the KV head it reads.
Heads are pruned either uniformly inside every KV group (all KV heads kept, the same number
of query heads per group) or by dropping whole KV groups (a KV head with all its query
heads); see ``prune_model``.  ``head_dim`` never changes.

Exactness: kept channels keep their original order and values.  When hidden channels are
removed, every RMSNorm weight is multiplied by ``sqrt(h / h')`` and ``rms_norm_eps`` by
``h / h'`` so that ``RMSNorm`` over the ``h'`` kept channels computes exactly what the
original norm computed with the removed channels set to zero.  Hence a model whose removed
units carry no signal gives the same logits after pruning.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from trainer.importance import (
    SUPPORTED_ARCHITECTURES,
    Importance,
    _dims,
    check_supported,
    compute_importance,
)

__all__ = [
    "Importance",
    "SUPPORTED_ARCHITECTURES",
    "compute_importance",
    "count_parameters",
    "estimate_parameters",
    "plan_for_target",
    "prune_model",
    "prune_to_dir",
]

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


# ---------------------------------------------------------------------------------------------
# parameter counting


def count_parameters(model: nn.Module, non_embedding: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once).

    ``non_embedding=True`` excludes the input embedding and the output projection (lm_head),
    the usual convention when comparing model sizes across vocabularies.
    """
    skip: set[int] = set()
    if non_embedding:
        for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
            if mod is not None:
                skip.update(id(p) for p in mod.parameters())
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _bias_flags(config) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o_proj bias, mlp bias) as the modeling code builds them."""
    mt = config.model_type
    if mt == "llama":
        ab = bool(getattr(config, "attention_bias", False))
        return ab, ab, bool(getattr(config, "mlp_bias", False))
    if mt == "qwen2":
        return True, False, False
    return False, False, False  # mistral


def estimate_parameters(
    config,
    *,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
    num_layers: int | None = None,
) -> int:
    """Exact parameter count of a model built from ``config`` with the given dims overridden.

    Closed form (no model is instantiated), so ``plan_for_target`` can search thousands of
    shapes for a large model quickly.
    """
    check_supported(config)
    h0, nq0, nkv0, hd, i0, l0 = _dims(config)
    h = hidden_size or h0
    nkv, per_group = _resolve_heads(nq0, nkv0, num_heads, num_key_value_heads)
    nq = nkv * per_group
    inter = intermediate_size or i0
    n_layers = l0 if num_layers is None else num_layers
    qkv_b, o_b, mlp_b = _bias_flags(config)
    vocab = config.vocab_size
    attn = h * hd * (nq + 2 * nkv) + nq * hd * h
    attn += (nq + 2 * nkv) * hd * qkv_b + h * o_b
    mlp = 3 * h * inter + (2 * inter + h) * mlp_b
    per_layer = attn + mlp + 2 * h
    emb = vocab * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return emb + n_layers * per_layer + h


# ---------------------------------------------------------------------------------------------
# planning


def _default_multiple(dim: int) -> int:
    """Largest power of two (<=128) dividing ``dim`` that still leaves >=32 size steps."""
    for m in (128, 64, 32, 16, 8, 4, 2):
        if dim % m == 0 and dim // m >= 32:
            return m
    return 1


def _head_options(nq0: int, nkv0: int) -> dict[int, int]:
    """Valid query-head counts -> KV heads to keep (keeping as many KV heads as possible)."""
    group = nq0 // nkv0
    options: dict[int, int] = {}
    for k in range(1, nkv0 + 1):
        for g in range(1, group + 1):
            nq = k * g
            options[nq] = max(options.get(nq, 0), k)
    return options


def plan_for_target(
    config,
    target_params: int | None = None,
    sparsity: float | None = None,
    *,
    num_layers: int | None = None,
    hidden_multiple: int | None = None,
    ffn_multiple: int | None = None,
) -> dict:
    """Choose ``hidden_size``, heads and ``intermediate_size`` to reach a total parameter count.

    Give either ``target_params`` or ``sparsity`` (fraction of all parameters removed).  The
    layer count is kept unless ``num_layers`` is given (then width makes up the rest).  The
    search starts from MiniMA's uniform width factor (each module keeps ``sqrt(1 - p)`` of
    its channels, since weight matrices shrink quadratically), but rounding hidden size to a
    multiple (128..2, leaving >=32 steps) and heads to valid GQA counts makes a single shared
    factor miss the target, so it enumerates every (hidden, heads) pair, solves the FFN size
    exactly for each (parameters are linear in it) and keeps, among shapes within 1% of the
    target (2% at worst), the one whose per-module keep ratios are most uniform.  Only hidden
    sizes divisible by the number of query heads are considered, since some transformers
    versions reject any other config even though ``head_dim`` is kept explicitly.

    Returns the keyword arguments for ``prune_model``: hidden_size, num_heads,
    num_key_value_heads, intermediate_size, num_layers.
    """
    check_supported(config)
    h0, nq0, nkv0, _, i0, l0 = _dims(config)
    n_layers = l0 if num_layers is None else num_layers
    if not 1 <= n_layers <= l0:
        raise ValueError(f"num_layers must be in [1, {l0}], got {n_layers}")
    full = {
        "hidden_size": h0,
        "num_heads": nq0,
        "num_key_value_heads": nkv0,
        "intermediate_size": i0,
        "num_layers": n_layers,
    }
    if target_params is not None and sparsity is not None:
        raise ValueError("give target_params or sparsity, not both")
    if target_params is None and sparsity is None:
        return full
    if sparsity is not None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        target = round(estimate_parameters(config) * (1.0 - sparsity))
    else:
        target = int(target_params)
    ceiling = estimate_parameters(config, num_layers=n_layers)
    if target >= ceiling:
        if target > ceiling * 1.02:
            raise ValueError(f"target_params={target} exceeds the unpruned size {ceiling}")
        return full

    mh = hidden_multiple or _default_multiple(h0)
    mf = ffn_multiple or _default_multiple(i0)
    head_opts = _head_options(nq0, nkv0)
    best, best_key = None, None
    for h in range(mh, h0 + 1, mh):
        for nq, nkv in head_opts.items():
            if h % nq:
                # Some transformers versions reject hidden_size % num_attention_heads != 0
                # even with head_dim set explicitly (possible once the multiple falls to 1).
                continue
            dims = dict(hidden_size=h, num_heads=nq, num_key_value_heads=nkv, num_layers=n_layers)
            c0 = estimate_parameters(config, intermediate_size=1, **dims)
            c1 = estimate_parameters(config, intermediate_size=2, **dims) - c0
            ideal = 1 + (target - c0) / c1
            for inter in {math.floor(ideal / mf) * mf, math.ceil(ideal / mf) * mf}:
                inter = min(max(inter, mf), i0)
                total = estimate_parameters(config, intermediate_size=inter, **dims)
                err = abs(total - target) / target
                ratios = [math.log(h / h0), math.log(nq / nq0), math.log(inter / i0)]
                mean = sum(ratios) / 3
                spread = sum((r - mean) ** 2 for r in ratios)
                tier = 0 if err <= 0.01 else (1 if err <= 0.02 else 2)
                key = (tier, spread if tier < 2 else err, err)
                if best_key is None or key < best_key:
                    best_key = key
                    best = dict(dims, intermediate_size=inter)
    assert best is not None and best_key is not None
    if best_key[0] == 2:
        got = estimate_parameters(config, **best)
        raise ValueError(
            f"cannot reach target_params={target} within 2% (closest {got}); the target is "
            f"probably below what the embeddings alone need"
        )
    return best


# ---------------------------------------------------------------------------------------------
# surgery


def _topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in original order (ties broken by position)."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return torch.sort(order[:k]).values


def _resolve_heads(
    nq0: int, nkv0: int, num_heads: int | None, num_key_value_heads: int | None
) -> tuple[int, int]:
    """(KV heads kept, query heads per KV head)."""
    group = nq0 // nkv0
    if num_heads is None and num_key_value_heads is None:
        return nkv0, group
    if num_key_value_heads is not None:
        nq = num_heads if num_heads is not None else num_key_value_heads * group
        k = num_key_value_heads
        if not 1 <= k <= nkv0 or nq % k or not 1 <= nq // k <= group:
            raise ValueError(
                f"cannot keep {nq} query heads over {k} KV heads: the model has {nkv0} KV heads "
                f"with {group} query heads each"
            )
        return k, nq // k
    nq = num_heads
    assert nq is not None
    if not 1 <= nq <= nq0:
        raise ValueError(f"num_heads must be in [1, {nq0}], got {nq}")
    if nq % nkv0 == 0:
        return nkv0, nq // nkv0
    if nq % group == 0:
        return nq // group, group
    raise ValueError(
        f"num_heads={nq} is not valid for {nq0} query heads in {nkv0} KV groups: it must be a "
        f"multiple of {nkv0} (prune inside every group) or of {group} (drop whole groups), or "
        f"pass num_key_value_heads"
    )


def _select_heads(scores: torch.Tensor, nkv0: int, keep_kv: int, per_group: int):
    """Kept KV heads and query heads (original indices, grouped so new head j uses KV j // per_group)."""
    group = scores.numel() // nkv0
    by_group = scores.float().reshape(nkv0, group)
    kv = _topk_sorted(by_group.sum(1), keep_kv)
    q = [int(g) * group + int(j) for g in kv for j in _topk_sorted(by_group[g], per_group)]
    return kv, torch.tensor(q, dtype=torch.long)


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _linear(sd: dict, name: str, lin: nn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> None:
    sd[name + ".weight"] = lin.weight.detach()[rows][:, cols].clone()
    if lin.bias is not None:
        sd[name + ".bias"] = lin.bias.detach()[rows].clone()


def prune_model(
    model: PreTrainedModel,
    importance: Importance,
    *,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    num_layers: int | None = None,
    num_key_value_heads: int | None = None,
    drop_layers: Sequence[int] | None = None,
) -> PreTrainedModel:
    """Build a new, smaller model of the same class keeping the most important units.

    ``None`` keeps a dimension unchanged.  ``num_heads`` counts query heads per layer and is
    resolved against the KV groups: a multiple of ``num_key_value_heads`` keeps every KV head
    and the best ``num_heads / kv`` query heads inside each group; otherwise a multiple of the
    group size drops the weakest whole groups (KV head plus its query heads, ranked by the
    summed query-head scores).  Pass ``num_key_value_heads`` to choose explicitly.
    ``num_layers`` drops the layers with the lowest ``importance.layers`` (1 - cos); or name
    them with ``drop_layers``.  Heads and FFN neurons are chosen per layer; hidden channels
    globally.  Kept units stay in their original order and the copied weights are exact
    (RMSNorm weights and eps rescaled as described in the module docstring).
    """
    check_supported(model)
    cfg0 = model.config
    h0, nq0, nkv0, hd, i0, l0 = _dims(cfg0)
    if importance.heads.shape != (l0, nq0) or importance.ffn.shape != (l0, i0):
        raise ValueError("importance scores were computed for a model of a different shape")
    if importance.hidden.shape != (h0,) or importance.layers.shape != (l0,):
        raise ValueError("importance scores were computed for a model of a different shape")

    h = h0 if hidden_size is None else hidden_size
    inter = i0 if intermediate_size is None else intermediate_size
    if not 1 <= h <= h0:
        raise ValueError(f"hidden_size must be in [1, {h0}], got {h}")
    if not 1 <= inter <= i0:
        raise ValueError(f"intermediate_size must be in [1, {i0}], got {inter}")
    keep_kv, per_group = _resolve_heads(nq0, nkv0, num_heads, num_key_value_heads)

    if drop_layers is not None:
        dropped = sorted({int(i) for i in drop_layers})
        if any(not 0 <= i < l0 for i in dropped):
            raise ValueError(f"drop_layers must index layers 0..{l0 - 1}, got {list(drop_layers)}")
        kept_layers = [i for i in range(l0) if i not in dropped]
        if num_layers is not None and num_layers != len(kept_layers):
            raise ValueError(f"num_layers={num_layers} disagrees with drop_layers={dropped}")
    else:
        n_layers = l0 if num_layers is None else num_layers
        if not 1 <= n_layers <= l0:
            raise ValueError(f"num_layers must be in [1, {l0}], got {n_layers}")
        kept_layers = _topk_sorted(importance.layers, n_layers).tolist()
    if not kept_layers:
        raise ValueError("cannot drop every layer")

    hid = _topk_sorted(importance.hidden, h)
    base = model.model
    sd: dict[str, torch.Tensor] = {}

    # Norm rescaling keeps RMSNorm over the kept channels equal to the original norm with the
    # removed channels zeroed: mean over h' of x^2 + eps*h/h' == (h/h') * (mean over h + eps).
    norm_scale = math.sqrt(h0 / h) if h < h0 else 1.0

    def norm(name: str, mod: nn.Module) -> None:
        w = mod.weight.detach().float()[hid]
        if norm_scale != 1.0:
            w = w * norm_scale
        sd[name + ".weight"] = w.to(mod.weight.dtype)

    sd["model.embed_tokens.weight"] = base.embed_tokens.weight.detach()[:, hid].clone()
    for new_i, old_i in enumerate(kept_layers):
        layer = base.layers[old_i]
        p = f"model.layers.{new_i}."
        kv, q = _select_heads(importance.heads[old_i], nkv0, keep_kv, per_group)
        q_rows, kv_rows = _rows(q, hd), _rows(kv, hd)
        attn, mlp = layer.self_attn, layer.mlp
        _linear(sd, p + "self_attn.q_proj", attn.q_proj, q_rows, hid)
        _linear(sd, p + "self_attn.k_proj", attn.k_proj, kv_rows, hid)
        _linear(sd, p + "self_attn.v_proj", attn.v_proj, kv_rows, hid)
        _linear(sd, p + "self_attn.o_proj", attn.o_proj, hid, q_rows)
        neurons = _topk_sorted(importance.ffn[old_i], inter)
        _linear(sd, p + "mlp.gate_proj", mlp.gate_proj, neurons, hid)
        _linear(sd, p + "mlp.up_proj", mlp.up_proj, neurons, hid)
        _linear(sd, p + "mlp.down_proj", mlp.down_proj, hid, neurons)
        norm(p + "input_layernorm", layer.input_layernorm)
        norm(p + "post_attention_layernorm", layer.post_attention_layernorm)
    norm("model.norm", base.norm)
    vocab_rows = torch.arange(model.lm_head.weight.shape[0])
    _linear(sd, "lm_head", model.lm_head, vocab_rows, hid)

    cfg = copy.deepcopy(cfg0)
    cfg.hidden_size = h
    cfg.num_attention_heads = keep_kv * per_group
    cfg.num_key_value_heads = keep_kv
    cfg.intermediate_size = inter
    cfg.num_hidden_layers = len(kept_layers)
    cfg.head_dim = hd  # stays fixed; hidden_size // heads would change it otherwise
    if h < h0:
        cfg.rms_norm_eps = cfg0.rms_norm_eps * h0 / h
    layer_types = getattr(cfg0, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == l0:
        cfg.layer_types = [layer_types[i] for i in kept_layers]

    dtype = model.lm_head.weight.dtype
    new = type(model)(cfg).to(dtype=dtype, device=model.lm_head.weight.device)
    new.load_state_dict(sd, strict=True)
    if getattr(cfg, "tie_word_embeddings", False):
        new.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


# ---------------------------------------------------------------------------------------------
# end to end


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
        else _topk_sorted(importance.layers, plan["num_layers"]).tolist()
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    pruned.to(save_dtype)
    _save(pruned, out_dir)
    for name in TOKENIZER_FILES:
        src = model_path / name
        if src.is_file() and not (out_dir / name).exists():
            shutil.copy2(src, out_dir / name)

    h0, nq0, nkv0, _, i0, _ = _dims(model.config)
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
