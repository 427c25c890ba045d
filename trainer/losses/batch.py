"""One cache batch -> its KD loss, with the estimator chosen by what the batch carries.

A top-k cache yields ``topk_ids``/``topk_logprobs``/``tail_logmass`` and is scored by
:func:`distill_loss`; a sampled cache yields ``sample_ids``/``sample_counts`` and is
scored by :func:`sampled_kd_loss`.  The choice follows the payload, not the name of the
encoding that stored it, so a new encoding needs no change here as long as it yields one
of the two payloads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from trainer.losses.full import cross_entropy
from trainer.losses.sampled import sampled_kd_loss
from trainer.losses.topk import distill_loss

Payload = Literal["topk", "samples"]
PAYLOAD_KEYS: dict[str, tuple[str, ...]] = {
    "topk": ("topk_ids", "topk_logprobs", "tail_logmass"),
    "samples": ("sample_ids", "sample_counts"),
}


def payload_of(batch: Mapping[str, object]) -> Payload:
    """``"topk"`` or ``"samples"``: which teacher payload a cache batch carries.

    Raises ``ValueError`` for a batch with neither payload complete, or with both.
    """
    found = [name for name, keys in PAYLOAD_KEYS.items() if all(k in batch for k in keys)]
    if len(found) != 1:
        expected = " or ".join("/".join(keys) for keys in PAYLOAD_KEYS.values())
        raise ValueError(f"a cache batch carries {expected}; this one has keys {sorted(batch)}")
    return found[0]


def batch_distill_loss(
    logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    *,
    vocab: int,
    kind: str = "forward_kl",
    alpha_ce: float = 0.0,
    temperature: float = 1.0,
    renormalize_topk: bool = False,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, metrics)`` of a student's ``logits [B, T, V']`` on one cache batch.

    Means over the positions of ``batch["loss_mask"]`` (bool, ``labels``' shape), or over every
    position when the batch has none; ``metrics["n_tokens"]`` is their number. ``logits`` may
    have any leading dims that match ``labels`` (``[n, V']`` for a batch of n positions).
    Only the first ``vocab`` logit columns are used (a student may pad its output layer).
    Top-k payload: :func:`distill_loss` with ``kind`` (``forward_kl``, ``reverse_kl`` or
    ``jsd``) and the other options, CE on ``batch["labels"]`` always passed so it is logged.
    Samples payload: ``kind`` must be ``"sampled"``; ``(1 - alpha_ce) * sampled_kd_loss +
    alpha_ce * CE``, the CE without a graph when ``alpha_ce == 0``.  A ``kind`` that does not
    fit the payload raises ``ValueError``.
    """
    payload = payload_of(batch)
    if (payload == "samples") != (kind == "sampled"):
        raise ValueError(f"kind={kind!r} does not fit a batch of {payload}: "
                         + ("draws are trained with kind='sampled'" if payload == "samples"
                            else "kind='sampled' needs draws (sample_ids/sample_counts)"))
    labels = batch["labels"].reshape(-1)
    n = labels.shape[0]
    flat = logits[..., :vocab] if logits.shape[-1] > vocab else logits
    flat = flat.reshape(n, flat.shape[-1])            # an explicit width: n may be 0
    mask = (batch["loss_mask"].reshape(n) if "loss_mask" in batch
            else torch.ones(n, dtype=torch.bool, device=labels.device))
    if payload == "topk":
        k = batch["topk_ids"].shape[-1]
        return distill_loss(flat, batch["topk_ids"].reshape(n, k), batch["topk_logprobs"].reshape(n, k),
                            batch["tail_logmass"].reshape(n), labels, mask,
                            kind=kind, alpha_ce=alpha_ce, temperature=temperature,
                            renormalize_topk=renormalize_topk, beta=beta, chunk_size=chunk_size)
    s = batch["sample_ids"].shape[-1]
    kd = sampled_kd_loss(flat, batch["sample_ids"].reshape(n, s), batch["sample_counts"].reshape(n, s), mask)
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha_ce > 0):
        ce = cross_entropy(flat, labels, mask)
    loss = kd if alpha_ce == 0.0 else (1.0 - alpha_ce) * kd + alpha_ce * ce
    return loss, {"loss": loss.detach(), "kd": kd.detach(), "ce": ce.detach(), "n_tokens": mask.sum()}
