"""What a cache stores per position, as the arrays a backend returns and a writer takes.

Two payload types, each named in the manifest (`payload`) and each with its own encodings:

- `TopK` (`topk`): the teacher's k most likely token ids with their log-probs (normalised over the
  whole usable vocabulary, descending) and the log of the mass outside them, so the k + 1 outcomes
  describe the teacher's distribution exactly up to how the tail is split.
- `Samples` (`samples`): S tokens drawn from the teacher's full distribution, stored as distinct
  ids with counts; `counts / S` is an unbiased estimate of the distribution (sparse-logit KD).

Both carry `target_logprob`, the teacher's log-prob of the actual next token. Arrays are numpy,
B windows x T positions.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from logitcache.format.manifest import PAYLOAD_SAMPLES, PAYLOAD_TOPK


class TopK(NamedTuple):
    """A batch of top-k sets."""

    ids: np.ndarray             # (B, T, k) int, by descending log-prob
    logprobs: np.ndarray        # (B, T, k) float32
    tail_logmass: np.ndarray    # (B, T) float32, log(1 - sum exp(logprobs)), -inf when k covers the vocabulary
    target_logprob: np.ndarray  # (B, T) float32, log p(window[t + 1])

    kind = PAYLOAD_TOPK

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def columns(self) -> dict[str, np.ndarray]:
        """The arrays under the names shards and batches use."""
        return {"topk_ids": self.ids, "topk_logprobs": self.logprobs, "tail_logmass": self.tail_logmass}


class Samples(NamedTuple):
    """A batch of draws."""

    sample_ids: np.ndarray      # (B, T, S) int64, distinct drawn ids, ascending, 0-padded
    sample_counts: np.ndarray   # (B, T, S) int32, draws of each id (0 on padding), summing to S
    target_logprob: np.ndarray  # (B, T) float32, log p(window[t + 1])

    kind = PAYLOAD_SAMPLES

    @property
    def S(self) -> int:
        return self.sample_ids.shape[-1]

    def columns(self) -> dict[str, np.ndarray]:
        return {"sample_ids": self.sample_ids, "sample_counts": self.sample_counts}


Payload = TopK | Samples


def concat(parts: list[Payload]) -> Payload:
    """Batches of one payload type joined along the window axis."""
    cls = type(parts[0])
    return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls._fields))
