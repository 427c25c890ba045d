"""Shared fixtures: a tiny corpus, a tiny byte-level BPE tokenizer and tiny teachers saved to disk.

Everything is session-scoped and built in seconds: the tokenizer is trained on a few KB of
generated text, and the models (Llama, Qwen2, GPT-NeoX, GPT-2) are built from configs with random
weights (a larger initializer range than usual, so their distributions are far from uniform) and
saved with `save_pretrained` next to the tokenizer, like a real checkpoint folder.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

TINY_VOCAB = 320
TINY_CONTEXT = 64

_WORDS = ("the of and to in a is that for it as was with be by on not he i this are or his from at "
          "which but have an they you were her she there been one all we their has would when if "
          "will what so no out up said about into them can more some could time these two may then "
          "do first any my now such like our over man me even most made after also did many before "
          "must through back years where much your way well down should because each just those "
          "people how too little state good very make world still own see men work long get here "
          "between both life being under never day same another know while last might us great old "
          "year off come since against go came right used take three").split()


def tiny_corpus_text(n_docs: int = 24, words_per_doc: int = 180, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English documents (~1 KB each)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(_WORDS) for _ in range(words_per_doc)]
        for i in range(0, len(words), rng.randint(6, 14)):
            words[i] = words[i].capitalize()
        docs.append(" ".join(words).replace(" The", ". The") + ".")
    return docs


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder of .txt files, one document each (~24 KB in all)."""
    folder = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(tiny_corpus_text()):
        (folder / f"doc{i:02d}.txt").write_text(doc)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer of TINY_VOCAB tokens trained on the tiny corpus."""
    from logitcache.data import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(tiny_corpus_text(), folder, vocab_size=TINY_VOCAB)
    return folder


def build_tiny_model(arch: str, vocab_size: int, *, seed: int = 0, context: int = TINY_CONTEXT):
    """A randomly initialised causal LM of the given family, hidden 32, 2 layers, 4 heads."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=context, initializer_range=0.2,
                             tie_word_embeddings=False, **common)
        cls = LlamaForCausalLM
    elif arch == "qwen2":
        config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=context, initializer_range=0.2,
                             tie_word_embeddings=True, **common)
        cls = Qwen2ForCausalLM
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=context, initializer_range=0.2, rotary_pct=0.5,
                               tie_word_embeddings=False, **common)
        cls = GPTNeoXForCausalLM
    elif arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=context, initializer_range=0.2, **common)
        cls = GPT2LMHeadModel
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).eval()
    if arch == "qwen2":  # q/k/v biases start at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.2)
    return model


def save_tiny_teacher(folder: Path, arch: str, tokenizer_dir: Path, *, vocab_size: int | None = None,
                      seed: int = 0, context: int = TINY_CONTEXT) -> Path:
    """A checkpoint folder: model (safetensors) + config + the tokenizer's files."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_tiny_model(arch, vocab_size or len(tok), seed=seed, context=context)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """Tiny teachers sharing the tiny tokenizer.

    `qwen2` has a padded vocabulary (a multiple of 64 above the tokenizer's size), as real Qwen2
    checkpoints do; `llama_b` is a second Llama (another seed) for ladder runs.
    """
    root = tmp_path_factory.mktemp("teachers")
    padded = -(-TINY_VOCAB // 64) * 64 + 64
    return {
        "llama": save_tiny_teacher(root / "llama", "llama", tiny_tokenizer_dir),
        "llama_b": save_tiny_teacher(root / "llama_b", "llama", tiny_tokenizer_dir, seed=1),
        "qwen2": save_tiny_teacher(root / "qwen2", "qwen2", tiny_tokenizer_dir, vocab_size=padded),
        "gpt_neox": save_tiny_teacher(root / "gpt_neox", "gpt_neox", tiny_tokenizer_dir),
        "gpt2": save_tiny_teacher(root / "gpt2", "gpt2", tiny_tokenizer_dir),
    }
