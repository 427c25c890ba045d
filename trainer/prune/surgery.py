"""Structural surgery: a new, smaller model of the same class holding exact slices of the original.

Kept units stay in their original order and keep their values.  When hidden channels are
removed, every RMSNorm weight is multiplied by ``sqrt(h / h')`` and ``rms_norm_eps`` by
``h / h'`` so that ``RMSNorm`` over the ``h'`` kept channels computes exactly what the
original norm computed with the removed channels set to zero.  Hence a model whose removed
units carry no signal gives the same logits after pruning.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from trainer.prune.arch import check_supported, dims, resolve_heads
from trainer.prune.importance import Importance


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in original order (ties broken by position)."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return torch.sort(order[:k]).values


def _select_heads(scores: torch.Tensor, nkv0: int, keep_kv: int, per_group: int):
    """Kept KV heads and query heads (original indices, grouped so new head j uses KV j // per_group)."""
    group = scores.numel() // nkv0
    by_group = scores.float().reshape(nkv0, group)
    kv = topk_sorted(by_group.sum(1), keep_kv)
    q = [int(g) * group + int(j) for g in kv for j in topk_sorted(by_group[g], per_group)]
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
    h0, nq0, nkv0, hd, i0, l0 = dims(cfg0)
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
    keep_kv, per_group = resolve_heads(nq0, nkv0, num_heads, num_key_value_heads)

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
        kept_layers = topk_sorted(importance.layers, n_layers).tolist()
    if not kept_layers:
        raise ValueError("cannot drop every layer")

    hid = topk_sorted(importance.hidden, h)
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
        neurons = topk_sorted(importance.ffn[old_i], inter)
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
