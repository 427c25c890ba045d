"""Codecs for a cache's payload columns, registered by name; the manifest records the name and
parameters, and the reader decodes with exactly those, so a cache always describes itself.

`topk` payloads: `fp32`, `fp16` (plain lists), `compact` and `adaptive` (docs/encodings.md).
`samples` payloads: `sampled`.
"""

from logitcache.encodings import adaptive, compact, plain, sampled  # noqa: F401  (each registers its codecs)
from logitcache.encodings.registry import (
                                           DEFAULT_ENCODING,
                                           Encoding,
                                           available_encodings,
                                           get_encoding,
                                           register,
)

__all__ = ["DEFAULT_ENCODING", "Encoding", "available_encodings", "get_encoding", "register"]
