"""Parameter counts, exact and in closed form, and the search for a shape that hits a target size."""

from __future__ import annotations

import math

from torch import nn

from trainer.prune.arch import bias_flags, check_supported, dims, resolve_heads


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
    h0, nq0, nkv0, hd, i0, l0 = dims(config)
    h = hidden_size or h0
    nkv, per_group = resolve_heads(nq0, nkv0, num_heads, num_key_value_heads)
    nq = nkv * per_group
    inter = intermediate_size or i0
    n_layers = l0 if num_layers is None else num_layers
    qkv_b, o_b, mlp_b = bias_flags(config)
    vocab = config.vocab_size
    attn = h * hd * (nq + 2 * nkv) + nq * hd * h
    attn += (nq + 2 * nkv) * hd * qkv_b + h * o_b
    mlp = 3 * h * inter + (2 * inter + h) * mlp_b
    per_layer = attn + mlp + 2 * h
    emb = vocab * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return emb + n_layers * per_layer + h


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
    h0, nq0, nkv0, _, i0, l0 = dims(config)
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
    if not 1 <= mh <= h0:
        raise ValueError(f"hidden_multiple={mh} leaves no hidden size in [1, {h0}]")
    head_opts = _head_options(nq0, nkv0)
    best, best_key = None, None
    for h in range(mh, h0 + 1, mh):
        for nq, nkv in head_opts.items():
            if h % nq:
                # Some transformers versions reject hidden_size % num_attention_heads != 0
                # even with head_dim set explicitly (possible once the multiple falls to 1).
                continue
            shape = {"hidden_size": h, "num_heads": nq, "num_key_value_heads": nkv, "num_layers": n_layers}
            c0 = estimate_parameters(config, intermediate_size=1, **shape)
            c1 = estimate_parameters(config, intermediate_size=2, **shape) - c0
            ideal = 1 + (target - c0) / c1
            for inter in {math.floor(ideal / mf) * mf, math.ceil(ideal / mf) * mf}:
                inter = min(max(inter, mf), i0)
                total = estimate_parameters(config, intermediate_size=inter, **shape)
                err = abs(total - target) / target
                ratios = [math.log(h / h0), math.log(nq / nq0), math.log(inter / i0)]
                mean = sum(ratios) / 3
                spread = sum((r - mean) ** 2 for r in ratios)
                tier = 0 if err <= 0.01 else (1 if err <= 0.02 else 2)
                key = (tier, spread if tier < 2 else err, err)
                if best_key is None or key < best_key:
                    best_key = key
                    best = dict(shape, intermediate_size=inter)
    if best_key[0] == 2:  # best is set: h = mh with one query head is always a candidate
        got = estimate_parameters(config, **best)
        raise ValueError(
            f"cannot reach target_params={target} within 2% (closest {got}); the target is "
            f"probably below what the embeddings alone need"
        )
    return best
