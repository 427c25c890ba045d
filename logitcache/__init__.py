"""Offline teacher caches for knowledge distillation: top-k log-probs plus the exact tail mass.

The public API, importable from the package itself::

    from logitcache import CacheReader, produce, ProduceConfig, TopK, Samples

Names load on first use, so `import logitcache` stays cheap (no torch, no transformers).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

# Messages go to the `logitcache` logger; embedded, the library prints nothing unless its user
# configures logging (the CLIs print them on stderr).
logging.getLogger(__name__).addHandler(logging.NullHandler())

_EXPORTS = {
    # reading
    "CacheReader": "logitcache.read.reader",
    "RemoteCacheReader": "logitcache.read.reader",
    "open_cache": "logitcache.read.reader",
    "CacheDataset": "logitcache.read.dataset",
    "inspect_cache": "logitcache.read.summary",
    "verify_cache": "logitcache.verify",
    # producing
    "produce": "logitcache.producer.pipeline",
    "ProduceConfig": "logitcache.producer.config",
    "CacheWriter": "logitcache.producer.writer",
    # the format
    "Manifest": "logitcache.format.manifest",
    "TopK": "logitcache.format.payloads",
    "Samples": "logitcache.format.payloads",
    # sharing
    "push": "logitcache.share.push",
    "pull": "logitcache.share.pull",
    # errors
    "UserError": "logitcache.errors",
    "SettingError": "logitcache.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'logitcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
