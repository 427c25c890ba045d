"""The student's logits for the loop: at every position, or only where a position carries a loss.

On chat data most positions are prompt and carry no loss, yet the LM head at every position costs a
[B * T, V] logits tensor (and its float32 copy and gradient in the loss). `LogitsAt` runs the body
(`model.base_model`, whose `last_hidden_state` is already through the final norm for Llama, Qwen2,
GPT-NeoX and GPT-2), keeps the hidden states at the loss positions and applies the LM head
(`model.get_output_embeddings()`) to those rows only. It is an `nn.Module` so that the loop can wrap
it in DistributedDataParallel: DDP's hooks then see the forward that actually runs.

That split is only right when the logits are a plain projection of the final hidden state. A model
that soft-caps or scales its logits after the head (Gemma 2's `final_logit_softcapping`, Cohere's
`logit_scale`, Granite's `logits_scaling`) is checked once on a few tokens, as
logitcache.backends.hf does for teachers, and falls back to its full logits, gathered afterwards:
the same values, without the saving.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trainer.attention import forward_kwargs

# Config fields that change the logits after the LM head: a cap (any value) and scales (other than 1).
LOGIT_CAPS = ("final_logit_softcapping",)
LOGIT_SCALES = ("logit_scale", "logits_scaling")


def split_head_problem(model: nn.Module) -> str | None:
    """Why `model`'s logits cannot be computed as head(body(x)) at a subset of positions; None if they can.

    Checks that the model has a separate body and LM head, that its config sets no logit
    post-processing, and that head(body(x)) reproduces `model(x).logits` on 8 tokens (eval mode,
    no gradient, a private generator: the training RNG and mode are left as they were).
    """
    name = type(model).__name__
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None:
        return f"{name} has no separate body and LM head"
    config = getattr(model, "config", None)
    for field in LOGIT_CAPS + LOGIT_SCALES:
        value = getattr(config, field, None)
        if value is not None and (field in LOGIT_CAPS or value != 1):
            return f"{name} sets {field}={value}: its logits are not a plain projection of the last hidden state"
    device = next(model.parameters()).device
    vocab = int(head.weight.shape[0])
    x = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=x, use_cache=False).logits.float()
            ours = head(body(input_ids=x, use_cache=False).last_hidden_state).float()
    except Exception as exc:  # noqa: BLE001  (a body that cannot run alone only costs the saving, not the run)
        return f"{name}'s body and head could not be run apart ({type(exc).__name__})"
    finally:
        model.train(was_training)
    tol = 1e-4 * float(full.abs().max().clamp_min(1.0))
    if full.shape != ours.shape or float((full - ours).abs().max()) > tol:
        return f"{name}'s logits are not a plain projection of its last hidden state"
    return None


class LogitsAt(nn.Module):
    """`model`'s logits at every position, or at the positions `index` picks, as one DDP-wrappable forward.

    `forward(input_ids, attention_mask=None, position_ids=None, index=None)`:

    - `index` None: `model(...).logits` [B, T, V], the model's own call;
    - `index` int64 [n] (indices into the B * T positions, row-major): the logits at those positions
      [n, V], computed as head(body(...)[index]) when the model allows it (`split` True), else as
      the full logits gathered at `index`.

    `attention_mask` goes to the model when given. `position_ids` mark packed rows (restarting at 0
    at each document): attention is then kept inside each document (trainer.attention).
    """

    def __init__(self, model: nn.Module, note: Callable[[str], None] | None = None):
        super().__init__()
        self.model = model
        problem = split_head_problem(model)
        self.split = problem is None
        self._note = None if problem is None else (
            f"trainer: note: {problem}; batches with a loss_mask compute the LM head at every position")
        self._print = note

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        kwargs, unflatten = forward_kwargs(self.model, input_ids, attention_mask, position_ids)
        if index is None:
            return unflatten(self.model(**kwargs).logits)                               # (B, T, V)
        if not self.split:
            if self._note is not None and self._print is not None:
                self._print(self._note)
                self._note = None        # said once
            logits = self.model(**kwargs).logits
            return logits.reshape(-1, logits.shape[-1]).index_select(0, index)         # (n, V)
        hidden = self.model.base_model(**kwargs).last_hidden_state                    # (B, T, H)
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)          # (n, H)
        return self.model.get_output_embeddings()(picked)                              # (n, V)
