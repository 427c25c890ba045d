"""The transformers backend: run the model body once per batch, then the LM head in chunks.

`model.base_model(...)` returns `last_hidden_state` already through the final norm for Llama,
Qwen2, Mistral, GPT-2 and GPT-NeoX; the LM head (`model.get_output_embeddings()`) is then applied
to `chunk_size` positions at a time and reduced to top-k at once (logitcache.backends.topk), so a
[B * T, V] float32 logits tensor never exists for a whole batch. On load, the body + head path is
checked against `model(input_ids).logits` on a few tokens; a model whose head does more than a
plain projection (logit soft-capping, scaling) is refused rather than cached wrong.
"""

from __future__ import annotations

import numpy as np
import torch

from logitcache.backends.teacher import (
    check_k,
    check_weight_files,
    describe_teacher,
    resolve_teacher,
)
from logitcache.backends.topk import topk_from_logits
from logitcache.errors import SettingError
from logitcache.format.payloads import Samples, TopK

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOGITS_CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 16 << 20}


def default_logits_chunk(vocab_size: int, device: str) -> int:
    """Positions per LM-head chunk: ~256 MB of float32 logits on a GPU; ~16 MB on a CPU, where
    a chunk that stays in cache makes the top-k passes after the matmul nearly free."""
    budget = LOGITS_CHUNK_BYTES["cpu" if torch.device(device).type == "cpu" else "cuda"]
    return max(1, budget // (4 * vocab_size))


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SettingError("device", device, "not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", device, "CUDA is not available on this machine")
    return dev


class HFBackend:
    """A transformers causal LM as a top-k producer (see logitcache.backends for the API)."""

    name = "hf"

    def __init__(self, name_or_path: str, k: int, device: str = "cpu", dtype: str = "auto",
                 revision: str | None = None, chunk_size: int | None = None,
                 trust_remote_code: bool = False, usable_vocab: int | None = None):
        from transformers import AutoModelForCausalLM

        self.device = _check_device(device)
        folder, revision = resolve_teacher(name_or_path, revision)
        self.teacher = describe_teacher(name_or_path, revision, dtype, folder=folder)
        torch_dtype = TORCH_DTYPES[self.teacher["dtype"]]
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                                         **_dtype_kwarg(torch_dtype))
        except Exception as exc:
            check_weight_files(folder)   # a truncated safetensors file is named, not reported as a load error
            raise SettingError("teacher", name_or_path, f"could not be loaded as a causal LM "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        self.model = model.eval().to(self.device)
        self.body = self.model.base_model
        self.head = self.model.get_output_embeddings()
        if self.body is self.model or self.head is None:
            raise SettingError("teacher", name_or_path, f"{type(model).__name__} has no separate body and "
                            "LM head; the hf backend cannot chunk it")
        self.teacher["vocab_size"] = int(self.head.weight.shape[0])
        self.usable = _usable_vocab(usable_vocab, self.teacher["vocab_size"])
        self.teacher["usable_vocab_size"] = self.usable
        if self.teacher["num_parameters"] is None:
            self.teacher["num_parameters"] = sum(p.numel() for p in self.model.parameters())
        check_k(k, self.teacher)
        self.k = k
        self.chunk_size = int(chunk_size or default_logits_chunk(self.teacher["vocab_size"], device))
        if self.chunk_size < 1:
            raise SettingError("logits_chunk", chunk_size, "must be at least 1")
        self._self_check(name_or_path)

    def describe(self) -> dict:
        """The manifest's `teacher` object, `vocab_size` being the LM head's width (padding included)
        and `usable_vocab_size` the columns results are computed over."""
        return dict(self.teacher)

    def versions(self) -> dict[str, str]:
        import transformers

        return {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, H), normed, in the model's dtype."""
        return self.body(input_ids=input_ids, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (n, H) -> logits (n, usable_vocab): columns past the tokenizer's ids (a padded
        vocabulary) are left out, which is the same as masking them to -inf before the softmax."""
        logits = self.head(hidden)
        return logits if logits.shape[-1] == self.usable else logits[:, :self.usable]

    @torch.inference_mode()
    def run(self, windows: np.ndarray) -> TopK:
        x = torch.from_numpy(np.array(windows, dtype=np.int64)).to(self.device)     # (B, T+1)
        B, T = x.shape[0], x.shape[1] - 1
        hidden = self.hidden_states(x[:, :-1]).reshape(B * T, -1)                   # (B*T, H)
        targets = x[:, 1:].reshape(-1)                                               # (B*T,)
        n, k, c = B * T, self.k, self.chunk_size
        ids = torch.empty(n, k, dtype=torch.int32, device=self.device)
        lp = torch.empty(n, k, dtype=torch.float32, device=self.device)
        tail = torch.empty(n, dtype=torch.float32, device=self.device)
        tgt = torch.empty(n, dtype=torch.float32, device=self.device)
        s = 0
        while s < n:
            e = min(n, s + c)
            try:
                logits = self.logits(hidden[s:e])                                    # (c, usable V)
                ids[s:e], lp[s:e], tail[s:e], tgt[s:e] = topk_from_logits(logits, targets[s:e], k, chunk_size=c,
                                                                          overwrite=True)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                logits = None
                c = self._smaller_chunk(exc, c)
                continue
            s = e
        if not bool(torch.isfinite(lp[:, 0]).all()):
            raise SettingError("teacher", self.teacher['name_or_path'], f"non-finite logits in "
                            f"{self.teacher['dtype']}; try --dtype float32 or bfloat16")
        return TopK(ids.reshape(B, T, k).cpu().numpy(), lp.reshape(B, T, k).cpu().numpy(),
                    tail.reshape(B, T).cpu().numpy(), tgt.reshape(B, T).cpu().numpy())

    @torch.inference_mode()
    def sample(self, windows: np.ndarray, S: int, uniforms: torch.Tensor) -> Samples:
        """S draws per position from the float32 softmax of each LM-head chunk (temperature 1), over
        the usable vocabulary (no padding column is ever drawn).

        `uniforms` [B * T, S] (logitcache.encodings.sampled.window_uniforms) fix the draws up to the
        logits' float32 rounding, which can change with the batch or chunk size and the device. The
        top-k path (`run`) is untouched: sampling costs nothing when it is off.
        """
        from logitcache.encodings.sampled import draw_samples_at

        x = torch.from_numpy(np.array(windows, dtype=np.int64)).to(self.device)     # (B, T+1)
        B, T = x.shape[0], x.shape[1] - 1
        n, c = B * T, self.chunk_size
        if tuple(uniforms.shape) != (n, S):
            raise ValueError(f"uniforms must be [{n}, {S}], got {tuple(uniforms.shape)}")
        hidden = self.hidden_states(x[:, :-1]).reshape(n, -1)
        targets = x[:, 1:].reshape(-1)
        ids = torch.empty(n, S, dtype=torch.int64, device=self.device)
        counts = torch.empty(n, S, dtype=torch.int32, device=self.device)
        tgt = torch.empty(n, dtype=torch.float32, device=self.device)
        for s in range(0, n, c):
            e = min(n, s + c)
            logits = self.logits(hidden[s:e]).float()                               # (c, usable V)
            if not bool(torch.isfinite(logits).all()):
                raise SettingError("teacher", self.teacher['name_or_path'], f"non-finite logits in "
                                f"{self.teacher['dtype']}; try --dtype float32 or bfloat16")
            tgt[s:e] = logits.gather(1, targets[s:e, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
            ids[s:e], counts[s:e] = draw_samples_at(logits, uniforms[s:e])
        return Samples(ids.reshape(B, T, S).cpu().numpy(), counts.reshape(B, T, S).cpu().numpy(),
                       tgt.reshape(B, T).cpu().numpy())

    def _smaller_chunk(self, exc: BaseException, chunk: int) -> int:
        """After an out-of-memory error in the LM head, halve the chunk (kept for later batches) and
        retry, down to one position; anything else, or no memory even for one position, is raised."""
        if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc).lower():
            raise exc
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if chunk <= 1:
            raise SettingError("teacher", self.teacher['name_or_path'], f"out of memory in the LM head even for one "
                            f"position on {self.device}; free memory, use a smaller --batch-size or another "
                            "--device") from None
        self.chunk_size = max(1, chunk // 2)
        return self.chunk_size

    @torch.inference_mode()
    def _self_check(self, name_or_path: str) -> None:
        """The chunked path must reproduce the model's own logits (a few tokens, once)."""
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, self.teacher["vocab_size"], (1, 8), generator=g).to(self.device)
        full = self.model(input_ids=x, use_cache=False).logits.float()
        ours = self.head(self.hidden_states(x)).float()
        scale = full.abs().max().clamp_min(1.0)
        tol = 1e-4 if self.teacher["dtype"] == "float32" else 2e-2
        if full.shape != ours.shape or (full - ours).abs().max() > tol * scale:
            raise SettingError("teacher", name_or_path, f"{type(self.model).__name__}'s logits are not a plain "
                            "projection of its last hidden state; not supported by the hf backend")

    def close(self) -> None:
        self.model = self.body = self.head = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _usable_vocab(usable: int | None, vocab_size: int) -> int:
    """The columns to keep: all of them by default; a value above the model's width is an error."""
    if usable is None:
        return vocab_size
    if not 1 <= usable <= vocab_size:
        raise ValueError(f"usable_vocab {usable} must be in 1..{vocab_size} (the LM head's width)")
    return int(usable)


def _dtype_kwarg(torch_dtype: torch.dtype) -> dict:
    """transformers >= 4.56 names it `dtype`; older releases `torch_dtype`."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": torch_dtype} if (major, minor) >= (4, 56) else {"torch_dtype": torch_dtype}
