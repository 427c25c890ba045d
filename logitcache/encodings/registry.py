"""The encoding registry: what a codec provides, and the codecs by name.

Each codec module registers its classes with `register` when imported; `logitcache.encodings`
imports them all, so a name is known as soon as the package is.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa

from logitcache.errors import UserError


class Encoding(Protocol):
    """What every codec provides. Arrays are position-major: [B, T, k] per position sets, [B, T] for tails."""

    name: str
    payload: str      # what it stores: "topk" (ids, log-probs, tail) or "samples" (ids, counts)

    def params(self) -> dict:
        """JSON-serialisable settings written to the manifest; decode must need nothing else."""

    def arrow_fields(self, k: int, seq_len: int) -> list[pa.Field]:
        """The columns this encoding adds to each shard."""

    def encode(self, *arrays: np.ndarray) -> dict[str, pa.Array]:
        """The payload's arrays -> columns: for `topk`, ids [B,T,k] int, logprobs [B,T,k] float32
        (descending), tail [B,T] float32; for `samples`, ids and counts [B,T,S]."""

    def decode(self, columns: dict[str, pa.Array], k: int, seq_len: int) -> tuple[np.ndarray, ...]:
        """Columns of B rows -> the payload's arrays: for `topk` (ids [B,T,k] int64, logprobs
        [B,T,k] float32, tail [B,T] float32); for `samples` (ids [B,T,S] int64, counts int32)."""


# The producer's default, chosen by scripts/bench_codec.py: ~0.29x the bytes of fp16 at mean KL
# ~9e-4 nats to the exact (k+1)-way distribution, and decoding faster than training reads.
DEFAULT_ENCODING = "compact"

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make an encoding selectable by its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def get_encoding(name: str, params: dict | None = None) -> Encoding:
    """Build the named encoding with the manifest's parameters; unknown names are a user error."""
    if name not in _REGISTRY:
        raise UserError(f"unknown encoding '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name](**(params or {}))


def available_encodings(payload: str | None = None) -> list[str]:
    """Registered encoding names, of one payload type if given."""
    return sorted(name for name, cls in _REGISTRY.items() if payload is None or cls.payload == payload)
