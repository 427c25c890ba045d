"""Text in, token windows out: corpora (local files, hub datasets, the embedded plays), tokenizers, packing;
and chat rows in, masked token sequences out (formats, chat templates, the embedded conversations,
one sequence per conversation fitted to a cache's length)."""

from logitcache.data.chat import ChatCounts, render_rows
from logitcache.data.chat_corpus import iter_chat_rows, iter_shakespeare_chat
from logitcache.data.conversations import FORMATS, ROLES, Conversation, detect_format, normalize_row
from logitcache.data.corpus import (
           EMBEDDED_SOURCES,
           SHAKESPEARE_CHAT_SOURCES,
           default_data_home,
           fetch_shakespeare,
           iter_documents,
           resolve_source,
)
from logitcache.data.packing import pack_rows, pack_sequences, packed_positions, unpacked
from logitcache.data.sequences import (
           TRUNCATIONS,
           SequenceCounts,
           Sequences,
           is_chat_source,
           prepare_sequences,
           sequences_fingerprint,
)
from logitcache.data.templates import (
           TRAIN_ON,
           NoAssistantTurn,
           Sequence,
           render,
           resolve_template,
           template_fingerprint,
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
           "windows_fingerprint",
           # chat
           "SHAKESPEARE_CHAT_SOURCES", "FORMATS", "ROLES", "TRAIN_ON", "Conversation", "ChatCounts",
           "NoAssistantTurn", "Sequence", "detect_format", "normalize_row", "render", "render_rows",
           "resolve_template", "template_fingerprint", "iter_chat_rows", "iter_shakespeare_chat",
           # one cache row per conversation
           "TRUNCATIONS", "SequenceCounts", "Sequences", "is_chat_source", "prepare_sequences",
           "sequences_fingerprint",
           # several sequences in one row, their boundaries kept
           "pack_rows", "pack_sequences", "packed_positions", "unpacked"]
