"""Tokenizers: train a byte-level BPE on a corpus, and fingerprint any tokenizer by what it does."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable


def train_bpe_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 8192):
    """Train a byte-level BPE tokenizer and save it as a transformers tokenizer.

    Byte-level so any UTF-8 text encodes without unknown tokens; one special token serves as
    EOS, BOS and padding, which is all causal-LM training needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the tokenizer's serialised vocabulary and merges, plus its EOS id and length.

    Two tokenizers with the same fingerprint map text to the same ids, which is what a cache and a
    student must agree on; file names, paths and timestamps do not enter it.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"|eos={tokenizer.eos_token_id}|len={len(tokenizer)}".encode())
    return h.hexdigest()
