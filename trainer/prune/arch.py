"""The architectures pruning supports: recognising them, their dimensions, biases and valid head layouts."""

from __future__ import annotations

from torch import nn

# model_type -> class name.  All share model.embed_tokens, model.layers[i].{self_attn.{q,k,v,o}_proj,
# mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}, model.norm and lm_head.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}


def check_supported(model_or_config) -> None:
    """Raise ``ValueError`` unless this is one of the supported Llama-family causal LMs.

    Pruning rewrites weights by module name, so an architecture with a different layout
    (extra norms, fused projections, scaled embeddings) would be pruned silently wrong.
    """
    if isinstance(model_or_config, nn.Module):
        name = type(model_or_config).__name__
        if name not in SUPPORTED_ARCHITECTURES.values():
            raise ValueError(
                f"structured pruning does not support {name}; supported architectures: "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES.values()))}"
            )
        return
    model_type = getattr(model_or_config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        archs = getattr(model_or_config, "architectures", None) or [model_type]
        raise ValueError(
            f"structured pruning does not support {archs[0]} (model_type={model_type!r}); supported "
            f"architectures: {', '.join(sorted(SUPPORTED_ARCHITECTURES.values()))}"
        )


def dims(config) -> tuple[int, int, int, int, int, int]:
    """(hidden, query heads, KV heads, head_dim, intermediate, layers) of a config."""
    h = config.hidden_size
    nq = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nq
    hd = getattr(config, "head_dim", None) or h // nq
    return h, nq, nkv, hd, config.intermediate_size, config.num_hidden_layers


def bias_flags(config) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o_proj bias, mlp bias) as the modeling code builds them."""
    mt = config.model_type
    if mt == "llama":
        ab = bool(getattr(config, "attention_bias", False))
        return ab, ab, bool(getattr(config, "mlp_bias", False))
    if mt == "qwen2":
        return True, False, False
    return False, False, False  # mistral


def resolve_heads(
    nq0: int, nkv0: int, num_heads: int | None, num_key_value_heads: int | None
) -> tuple[int, int]:
    """(KV heads kept, query heads per KV head) for a requested head count.

    A query head is kept only with the KV head it reads: ``num_heads`` a multiple of the KV
    heads keeps every group and prunes inside each; a multiple of the group size drops whole
    groups.  ``num_key_value_heads`` chooses explicitly.
    """
    group = nq0 // nkv0
    if num_key_value_heads is not None:
        nq = num_heads if num_heads is not None else num_key_value_heads * group
        k = num_key_value_heads
        if not 1 <= k <= nkv0 or nq % k or not 1 <= nq // k <= group:
            raise ValueError(
                f"cannot keep {nq} query heads over {k} KV heads: the model has {nkv0} KV heads "
                f"with {group} query heads each"
            )
        return k, nq // k
    if num_heads is None:
        return nkv0, group
    nq = num_heads
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
