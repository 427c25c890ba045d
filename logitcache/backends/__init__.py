"""Teacher backends: token windows in, per-position top-k arrays out. A backend never writes files.

Every backend provides:

    backend.name            "hf", "vllm": recorded as the manifest's producer.backend
    backend.k               top-k size
    backend.describe()      the manifest's `teacher` object (logitcache.backends.teacher.describe_teacher),
                            with `vocab_size` the loaded model's logit width and `usable_vocab_size`
                            the columns results cover
    backend.versions()      {library: version} for the manifest's producer.versions
    backend.run(windows)    windows int32 [B, seq_len + 1] (positions read [:, :-1], targets are
                            [:, 1:]) -> TopK(ids, logprobs, tail_logmass, target_logprob), a named
                            tuple of numpy arrays
    backend.close()         free the model

The hf backend also provides `backend.sample(windows, S, uniforms)` -> Samples: S draws per
position from the full softmax at temperature 1 (vLLM only exposes top logprobs, so it cannot).

Results must not depend on which backend made them beyond float32 rounding: log-probs are
normalised in float32 over the usable vocabulary, with the tail computed as in
logitcache.backends.topk. The usable vocabulary is `usable_vocab` (the producer passes the
tokenizer's length; default: every column): a model padded past its tokenizer (Qwen-style) has
logit columns no token can be, and they are masked out before the softmax, so no padding id is
cached or drawn and their mass is in neither the top-k nor the tail.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from logitcache.errors import SettingError
from logitcache.format.payloads import Samples, TopK  # noqa: F401  (the types backends return)

BACKENDS = ("hf", "vllm")
BACKEND_CHOICES = ("auto",) + BACKENDS


class Backend(Protocol):
    name: str
    k: int

    def describe(self) -> dict: ...

    def versions(self) -> dict[str, str]: ...

    def run(self, windows: np.ndarray) -> TopK: ...

    def close(self) -> None: ...


def resolve_backend_name(name: str) -> str:
    """`auto` is `vllm` when it is installed and CUDA is present, else `hf` (runs anywhere)."""
    if name == "auto":
        from logitcache.backends.vllm import cuda_available, vllm_available

        return "vllm" if vllm_available() and cuda_available() else "hf"
    if name not in BACKENDS:
        raise SettingError("backend", name, f"unknown (known: {', '.join(BACKEND_CHOICES)})")
    return name


def make_backend(name: str, teacher: str, *, k: int, device: str = "cpu", dtype: str = "auto",
                 revision: str | None = None, trust_remote_code: bool = False,
                 chunk_size: int | None = None, seq_len: int | None = None, usable_vocab: int | None = None,
                 **vllm_options) -> Backend:
    """Load `teacher` with the named backend (`hf`, `vllm`, or `auto`); `vllm_options` are
    VLLMBackend's engine settings (tensor_parallel_size, max_num_batched_tokens, ...), unused by hf.
    With `seq_len` given, vLLM's context is sized to one window (seq_len + 1 tokens + 1 generated).
    `usable_vocab` (the tokenizer's length) masks out logit columns at or past it (see above)."""
    name = resolve_backend_name(name)
    if name == "hf":
        from logitcache.backends.hf import HFBackend

        return HFBackend(teacher, k, device, dtype, revision=revision, chunk_size=chunk_size,
                         trust_remote_code=trust_remote_code, usable_vocab=usable_vocab)
    if name == "vllm":
        from logitcache.backends.vllm import VLLMBackend

        options = {"max_model_len": seq_len + 2 if seq_len else None, **vllm_options}
        return VLLMBackend(teacher, k, dtype, revision=revision, trust_remote_code=trust_remote_code,
                           usable_vocab=usable_vocab, **{key: v for key, v in options.items() if v is not None})
    raise AssertionError(name)




def quiet_libraries() -> None:
    """Library progress bars and advice would bury the one line a user needs on stderr."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
