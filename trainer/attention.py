"""Attention that stays inside each document of a packed row.

A packed batch (a format-3 cache, or `trainer pretrain --packing`) carries `position_ids` [B, T]
that restart at 0 at each document's first token, and where a row's padding starts
(logitcache.data.packing.packed_positions). A position must then see only the earlier positions
of its own document, and be placed as if its document were alone. The position ids go to the
model as they are (rotary and learned positions read them); how attention is kept inside a
segment depends on the attention implementation (`model.config._attn_implementation`):

- `eager`, `sdpa`: an explicit 4D mask [B, 1, T, T], causal and block-diagonal (query q sees key
  k iff k <= q and both are in one segment; a segment starts where the position ids are 0).
  Additive float in the model's dtype for eager (0 or the dtype's minimum, as transformers'
  `eager_mask` builds it), boolean for sdpa (True = attend, what `sdpa_mask` gives). transformers
  passes a 4D mask through untouched (masking_utils: "If the mask is already 4D, simply return
  as-is"), so every layer uses it, whatever the library would infer from the position ids.
- `flash_attention_2`, `flash_attention_3`: the batch is flattened to one row [1, B * T] and given
  the segments' cumulative lengths (`cu_seq_lens_q/k`, `max_length_q/k`), as transformers'
  `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` does; the varlen kernel attends
  within each segment. Outputs are reshaped back to [B, T, ...].

Every query sees at least itself, so no row of a mask is empty (padding is a segment of its own).
Any other implementation (flex_attention, paged or hub-kernel variants) is refused in one line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from logitcache.errors import UserError

MASKED = ("eager", "sdpa")                              # an explicit block-diagonal 4D mask
VARLEN = ("flash_attention_2", "flash_attention_3")     # flattened, with the segments' lengths
COVERED = MASKED + VARLEN


def implementation(model) -> str:
    """The attention implementation `model` runs (transformers' `config._attn_implementation`)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def check_packing_support(model, where: str) -> None:
    """A one-line UserError unless packed rows can be kept apart under `model`'s attention."""
    name = implementation(model)
    if name not in COVERED:
        raise UserError(f"{where}: packed rows need one of the attention implementations {', '.join(COVERED)}; "
                        f"the model uses {name} (set attn_implementation in its config.json)")


def segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment number of each position [B, T]: a segment starts wherever the position id is 0."""
    return (position_ids == 0).long().cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask [B, 1, T, T] of segments `position_ids` for implementation `name` (module doc)."""
    seg = segments(position_ids)                                                 # (B, T)
    t = seg.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal                      # (B, T, T)
    if name == "sdpa":
        return allowed[:, None]
    zero = torch.zeros((), dtype=dtype, device=seg.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def forward_kwargs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None
                   ) -> tuple[dict, Callable[[torch.Tensor], torch.Tensor]]:
    """(keyword arguments for `model(...)` or its body, a function putting outputs back to [B, T, ...]).

    Without `position_ids` the batch is an ordinary one: `attention_mask` (if any) goes as it is.
    With them the rows are packed (module doc); their 2D `attention_mask` is then not passed: the
    segments say everything, and the padding after a row is a segment no real position sees.
    """
    kwargs: dict = {"input_ids": input_ids, "use_cache": False}
    if position_ids is None:
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return kwargs, _same
    name = implementation(model)
    check_packing_support(model, type(model).__name__)
    position_ids = position_ids.to(input_ids.device)
    if name in MASKED:
        dtype = next(model.parameters()).dtype
        kwargs.update(position_ids=position_ids, attention_mask=block_causal_mask(position_ids, name, dtype))
        return kwargs, _same
    b, t = input_ids.shape
    flat = position_ids.reshape(1, b * t)
    starts = (flat[0] == 0).nonzero().squeeze(1)            # position 0 of every row is one: rows never merge
    cu = torch.cat([starts, torch.tensor([b * t], device=flat.device)]).to(torch.int32)
    longest = int(cu.diff().max())
    kwargs.update(input_ids=input_ids.reshape(1, b * t), position_ids=flat, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=longest, max_length_k=longest)
    return kwargs, lambda out: out.reshape(b, t, *out.shape[2:])


def _same(out: torch.Tensor) -> torch.Tensor:
    return out
