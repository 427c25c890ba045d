"""Decoded rows -> batches: joining and cutting row ranges, and the torch tensors a batch holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

UNIT_ROWS = 64   # rows per reading unit of `dataset` and `inspect` (the writer's row group size)


def to_tensor(x: np.ndarray, dtype) -> torch.Tensor:
    import torch  # on first use: `verify` and `inspect` never need it

    x = np.ascontiguousarray(x, dtype=dtype)
    if not x.flags.writeable:          # zero-copy views of Arrow buffers are read-only
        x = x.copy()
    return torch.from_numpy(x)


def torch_batch(a: dict[str, np.ndarray]) -> dict:
    """Decoded rows -> the tensors of a batch (see logitcache.read.reader). Rows of a `sequences`
    cache are cut to the batch's longest row and carry `attention_mask` and `loss_mask` [B, T];
    packed rows also `position_ids` and `document_ids` [B, T] (read.decode)."""
    if "lengths" in a:
        positions = a["lengths"] - 1                                   # (B,) positions of each row
        t = int(positions.max()) if len(positions) else 0
        a = {key: (v[:, :t + 1] if key == "input_ids" else v[:, :t] if v.ndim > 1 else v) for key, v in a.items()}
    win = a["input_ids"]
    out = {"window_id": to_tensor(a["window_id"], np.int64),
           "input_ids": to_tensor(win[:, :-1], np.int64),
           "labels": to_tensor(win[:, 1:], np.int64),
           "target_logprob": to_tensor(a["target_logprob"], np.float32)}
    if "sample_ids" in a:
        out.update(sample_ids=to_tensor(a["sample_ids"], np.int64),
                   sample_counts=to_tensor(a["sample_counts"], np.int32))
    else:
        out.update(topk_ids=to_tensor(a["topk_ids"], np.int64), topk_logprobs=to_tensor(a["topk_logprobs"], np.float32),
                   tail_logmass=to_tensor(a["tail_logmass"], np.float32))
    if "lengths" in a:
        out["attention_mask"] = to_tensor(np.arange(win.shape[1] - 1)[None, :] < positions[:, None], np.int64)
        out["loss_mask"] = to_tensor(a["loss_mask"], bool)
    if "position_ids" in a:
        out["position_ids"] = to_tensor(a["position_ids"], np.int64)
        out["document_ids"] = to_tensor(a["document_ids"], np.int64)
    return out


def concat_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def slice_rows(a: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {key: v[start:stop] for key, v in a.items()}
