"""Text in, token windows out: corpora (local files, hub datasets, the embedded plays), tokenizers, packing."""

from logitcache.data.corpus import (
           EMBEDDED_SOURCES,
           default_data_home,
           fetch_shakespeare,
           iter_documents,
           resolve_source,
)
from logitcache.data.tokenizer import tokenizer_fingerprint, train_bpe_tokenizer
from logitcache.data.windows import (
           Windows,
           pack_windows,
           prepare_windows,
           windows_fingerprint,
)

__all__ = ["EMBEDDED_SOURCES", "default_data_home", "fetch_shakespeare", "iter_documents", "resolve_source",
           "tokenizer_fingerprint", "train_bpe_tokenizer", "Windows", "pack_windows", "prepare_windows",
           "windows_fingerprint"]
