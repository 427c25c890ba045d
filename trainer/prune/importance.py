"""Importance scores for structured pruning of decoder-only language models.

Two estimators, both computed from a handful of calibration batches:

* ``"activation"`` (Minitron, Muralidharan et al. 2024): forward passes only.
  Hidden channels are scored by the mean |output| of every RMSNorm (the
  per-layer input/post-attention norms and the final norm, summed), attention
  heads by the mean L2 norm of their per-head output (the input of ``o_proj``),
  FFN neurons by the mean |act_fn(gate) * up| (the input of ``down_proj``).
* ``"gradient"`` (MiniMA / CoFi-style masks): a mask of ones is multiplied into
  each head's output, each FFN neuron and, for hidden channels, everything
  written to the residual stream (embeddings, ``o_proj`` and ``down_proj``
  outputs, one shared mask).  The score is the mean over batches of
  |d loss / d mask| with loss = next-token cross-entropy, i.e. the first-order
  estimate of how much the loss changes when a unit is removed.

Layer importance is the same for both methods: the mean over tokens of
``1 - cos(layer input, layer output)`` (ShortGPT / Minitron depth scoring).  A
layer that barely rotates the residual stream is the cheapest to drop.

Supported architectures: those of ``trainer.prune.arch`` (identical module layout).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.prune.arch import check_supported, dims

METHODS = ("activation", "gradient")


@dataclass
class Importance:
    """Per-unit importance scores (higher = more important), all float32 on CPU.

    ``heads`` is per *query* head; grouped-query structure is applied at pruning time.
    """

    hidden: torch.Tensor  # [hidden_size]
    heads: torch.Tensor  # [num_layers, num_attention_heads]
    ffn: torch.Tensor  # [num_layers, intermediate_size]
    layers: torch.Tensor  # [num_layers], mean (1 - cos(layer input, layer output))
    method: str
    num_tokens: int

    def save(self, path: str | Path) -> None:
        """Store as safetensors so scores can be reused for several pruning targets."""
        from safetensors.torch import save_file

        tensors = {k: getattr(self, k).contiguous() for k in ("hidden", "heads", "ffn", "layers")}
        save_file(tensors, str(path), metadata={"method": self.method, "num_tokens": str(self.num_tokens)})

    @classmethod
    def load(cls, path: str | Path) -> Importance:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in ("hidden", "heads", "ffn", "layers")}
        return cls(method=meta.get("method", "unknown"), num_tokens=int(meta.get("num_tokens", 0)), **t)


def _layer_io(args: tuple, kwargs: dict, output) -> tuple[torch.Tensor, torch.Tensor]:
    x = args[0] if args else kwargs["hidden_states"]
    y = output[0] if isinstance(output, (tuple, list)) else output
    return x, y


def compute_importance(
    model: nn.Module, calib_batches: Iterable[torch.Tensor], method: str = "activation"
) -> Importance:
    """Score hidden channels, query heads, FFN neurons and layers of ``model`` on calibration data.

    ``calib_batches`` yields ``input_ids`` LongTensors of shape [B, T] (no padding).  See the
    module docstring for the two methods.  The model is left unchanged (training mode and
    ``requires_grad`` flags are restored).
    """
    check_supported(model)
    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r}; expected one of {METHODS}")
    h, nq, _, hd, inter, n_layers = dims(model.config)
    device = next(model.parameters()).device

    hidden = torch.zeros(h, dtype=torch.float32)
    heads = torch.zeros(n_layers, nq, dtype=torch.float32)
    ffn = torch.zeros(n_layers, inter, dtype=torch.float32)
    layers = torch.zeros(n_layers, dtype=torch.float32)
    state = {"tokens": 0, "batches": 0}

    base = model.model
    handles: list = []

    def layer_hook(i: int):
        def hook(_mod, args, kwargs, output):
            x, y = _layer_io(args, kwargs, output)
            cos = F.cosine_similarity(x.detach().float(), y.detach().float(), dim=-1)
            layers[i] += (1.0 - cos).sum().cpu()

        return hook

    for i, layer in enumerate(base.layers):
        handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))

    was_training = model.training
    model.eval()
    try:
        if method == "activation":
            _activation_hooks(base, hidden, heads, ffn, hd, handles)
            with torch.no_grad():
                for ids in calib_batches:
                    ids = ids.to(device)
                    base(input_ids=ids, use_cache=False)
                    state["tokens"] += ids.numel()
                    state["batches"] += 1
            denom = max(state["tokens"], 1)
            hidden /= denom
            heads /= denom
            ffn /= denom
        else:
            _gradient_pass(model, base, calib_batches, device, hidden, heads, ffn, hd, handles, state)
            nb = max(state["batches"], 1)
            hidden /= nb
            heads /= nb
            ffn /= nb
        layers /= max(state["tokens"], 1)
    finally:
        for hnd in handles:
            hnd.remove()
        model.train(was_training)
    if state["batches"] == 0:
        raise ValueError("calib_batches yielded no batches")
    return Importance(hidden, heads, ffn, layers, method, state["tokens"])


def _activation_hooks(base, hidden, heads, ffn, hd, handles) -> None:
    def norm_hook(_mod, _args, out):
        hidden.add_(out.detach().float().abs().reshape(-1, out.shape[-1]).sum(0).cpu())

    def head_hook(i: int):
        def hook(_mod, args):
            x = args[0].detach().float()
            per_head = x.reshape(-1, x.shape[-1] // hd, hd).norm(dim=-1)
            heads[i] += per_head.sum(0).cpu()

        return hook

    def ffn_hook(i: int):
        def hook(_mod, args):
            x = args[0].detach().float()
            ffn[i] += x.abs().reshape(-1, x.shape[-1]).sum(0).cpu()

        return hook

    for i, layer in enumerate(base.layers):
        handles.append(layer.input_layernorm.register_forward_hook(norm_hook))
        handles.append(layer.post_attention_layernorm.register_forward_hook(norm_hook))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(ffn_hook(i)))
    handles.append(base.norm.register_forward_hook(norm_hook))


def _gradient_pass(model, base, calib_batches, device, hidden, heads, ffn, hd, handles, state) -> None:
    n_layers, nq = heads.shape
    m_hidden = torch.ones(hidden.shape[0], device=device, requires_grad=True)
    m_heads = torch.ones(n_layers, nq, device=device, requires_grad=True)
    m_ffn = torch.ones(ffn.shape, device=device, requires_grad=True)

    def scale_out(_mod, _args, out):
        return out * m_hidden.to(out.dtype)

    def head_mask(i: int):
        def hook(_mod, args):
            x = args[0]
            mask = m_heads[i].repeat_interleave(hd).to(x.dtype)
            return (x * mask,) + tuple(args[1:])

        return hook

    def ffn_mask(i: int):
        def hook(_mod, args):
            x = args[0]
            return (x * m_ffn[i].to(x.dtype),) + tuple(args[1:])

        return hook

    handles.append(base.embed_tokens.register_forward_hook(scale_out))
    for i, layer in enumerate(base.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_mask(i)))
        handles.append(layer.self_attn.o_proj.register_forward_hook(scale_out))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(ffn_mask(i)))
        handles.append(layer.mlp.down_proj.register_forward_hook(scale_out))

    # Only the masks need gradients; freezing the weights avoids storing weight grads.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        for ids in calib_batches:
            ids = ids.to(device)
            if ids.shape[1] < 2:
                raise ValueError("gradient importance needs sequences of at least 2 tokens")
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
            )
            g_hidden, g_heads, g_ffn = torch.autograd.grad(loss, [m_hidden, m_heads, m_ffn])
            hidden += g_hidden.abs().float().cpu()
            heads += g_heads.abs().float().cpu()
            ffn += g_ffn.abs().float().cpu()
            state["tokens"] += ids.numel()
            state["batches"] += 1
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
