"""Positions per second of the vllm and hf backends on the same teacher and windows, in one run.

    python scripts/bench_vllm.py --quick              # tiny Llama from a config, < 1 min on a CPU
    python scripts/bench_vllm.py --teacher PATH --k 64 --seq-len 1024 --windows 512 --batch-size 64

The hf backend runs first in this process, vllm then in a child process (the vLLM CPU worker pins
its process's threads, which would slow a transformers run that followed it): load, one warm-up
batch, then the timed batches. For vllm the time is split into the engine call (`LLM.generate`, which includes
vLLM's own conversion of its tensors to Python lists) and ours (`flat_to_topk`: flat lists -> numpy,
tail); `conversion_fraction` is ours over the total, and `vllm_pythonize_fraction` is vLLM's own
tensor-to-list step (inside the engine call; measurable when the engine runs in-process, as on a
CPU). A prefill-only pass (no prompt log-probs) gives
the ceiling the log-prob path is measured against. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Measured on this repository's 2-core CPU machine with the guide's 7.4M-parameter Llama, vocab 8192,
# k = 64 (docs/vllm.md): reference points, not pass/fail thresholds.
GUIDE_CPU_POSITIONS_PER_S = {"vllm": 7500, "hf": 9500}
CONVERSION_FRACTION_TARGET = 0.10   # our numpy conversion should stay a small share of a vllm run


TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "demo-teacher"   # 8192 tokens


def build_teacher(folder: Path, vocab: int, hidden: int, layers: int, context: int) -> Path:
    """A random Llama saved like a checkpoint, with the demo teacher's tokenizer (vLLM loads one);
    head size 32, the smallest vLLM's CPU attention takes. `vocab` may exceed the tokenizer's."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    if vocab < len(tokenizer):
        raise SystemExit(f"--vocab {vocab}: must be at least the tokenizer's {len(tokenizer)}")

    heads = max(1, hidden // 32)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=context, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _time_vllm_pythonize() -> list[float] | None:
    """Accumulate the seconds vLLM spends turning its prompt log-prob tensors into Python lists
    (`LogprobsProcessor._update_prompt_logprobs`, a Python loop per position); seen only when the
    engine runs in this process. Returns the one-element accumulator, or None if not found."""
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        return None
    original = getattr(LogprobsProcessor, "_update_prompt_logprobs", None)
    if original is None:
        return None
    spent = [0.0]

    def timed(self, *a, **kw):
        t = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            spent[0] += time.perf_counter() - t

    LogprobsProcessor._update_prompt_logprobs = timed
    return spent


def worker(args: argparse.Namespace) -> dict:
    """One backend in this process: load, warm up, time; results go to args.out as .npy + JSON."""
    windows = np.load(args.windows_file)
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.worker == "hf":
        from logitcache.backends.hf import HFBackend

        backend = HFBackend(args.teacher, args.k, "cpu" if not args.device else args.device, args.dtype)
    else:
        from logitcache.backends.vllm import VLLMBackend

        backend = VLLMBackend(args.teacher, args.k, args.dtype, max_model_len=windows.shape[1] + 1,
                              max_num_batched_tokens=args.max_num_batched_tokens)
    load_s = time.perf_counter() - t0
    pythonize = _time_vllm_pythonize() if args.worker == "vllm" else None
    bs = args.batch_size
    batches = [windows[s:s + bs] for s in range(0, len(windows), bs)]
    backend.run(batches[0])                                                     # warm-up
    pythonize_warm = pythonize[0] if pythonize is not None else 0.0
    result = {"load_s": round(load_s, 2)}
    parts = []
    if args.worker == "hf":
        t = time.perf_counter()
        parts = [backend.run(b) for b in batches]
        total = time.perf_counter() - t
    else:
        from logitcache.backends.vllm import flat_to_topk

        engine_s = convert_s = 0.0
        for b in batches:
            t = time.perf_counter()
            outputs = backend.llm.generate([{"prompt_token_ids": row} for row in b.tolist()], backend.params,
                                           use_tqdm=False)
            t2 = time.perf_counter()
            parts.append(flat_to_topk([o.prompt_logprobs for o in outputs], b, backend.k,
                                      backend.describe()["vocab_size"]))
            engine_s += t2 - t
            convert_s += time.perf_counter() - t2
        total = engine_s + convert_s
        result.update(engine_s=round(engine_s, 3), convert_s=round(convert_s, 4),
                      conversion_fraction=round(convert_s / total, 4))
        if pythonize is not None and pythonize[0] > 0:   # in-process engines only (the CPU default)
            result["vllm_pythonize_fraction"] = round((pythonize[0] - pythonize_warm) / total, 4)
        if not args.skip_prefill_only:
            from vllm import SamplingParams

            plain = SamplingParams(max_tokens=1, detokenize=False)
            t = time.perf_counter()
            for b in batches:
                backend.llm.generate([{"prompt_token_ids": row} for row in b.tolist()], plain, use_tqdm=False)
            result["prefill_only_positions_per_s"] = round(windows.shape[0] * (windows.shape[1] - 1)
                                                           / (time.perf_counter() - t), 1)
    positions = windows.shape[0] * (windows.shape[1] - 1)
    result.update(seconds=round(total, 3), positions=positions, positions_per_s=round(positions / total, 1))
    np.save(out / f"{args.worker}_logprobs.npy", np.concatenate([p.logprobs for p in parts]))
    np.save(out / f"{args.worker}_ids.npy", np.concatenate([p.ids for p in parts]))
    backend.close()
    (out / f"{args.worker}.json").write_text(json.dumps(result))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few windows: under a minute on a CPU")
    p.add_argument("--teacher", default=None, help="checkpoint folder (default: a random Llama built here)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary of the built Llama (default 8192)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the built Llama (default 256)")
    p.add_argument("--layers", type=int, default=4, help="layers of the built Llama (default 4)")
    p.add_argument("--k", type=int, default=64, help="top-k (default 64)")
    p.add_argument("--seq-len", type=int, default=511, help="positions per window (default 511)")
    p.add_argument("--windows", type=int, default=64, help="windows timed (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per backend.run call (default 16)")
    p.add_argument("--dtype", default="float32", help="teacher dtype for both backends (default float32)")
    p.add_argument("--device", default=None, help="torch device of the hf backend (default cpu)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="vLLM chunked-prefill budget per step (default: vLLM's)")
    p.add_argument("--skip-prefill-only", action="store_true", help="skip the prefill-only vLLM pass")
    p.add_argument("--worker", choices=("hf", "vllm"), help=argparse.SUPPRESS)
    p.add_argument("--windows-file", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.hidden, args.layers, args.seq_len, args.windows, args.batch_size = 128, 2, 255, 32, 16

    with tempfile.TemporaryDirectory(prefix="bench_vllm_") as tmp:
        tmp = Path(tmp)
        teacher = args.teacher or str(build_teacher(tmp / "teacher", args.vocab, args.hidden, args.layers,
                                                    2 * (args.seq_len + 1)))
        vocab = json.loads((Path(teacher) / "config.json").read_text())["vocab_size"]
        windows = np.random.default_rng(0).integers(0, vocab, size=(args.windows, args.seq_len + 1),
                                                    dtype=np.int32)
        np.save(tmp / "windows.npy", windows)
        results = {}
        # hf here (torch and transformers are already imported), then vllm in a child process
        t = time.perf_counter()
        worker(argparse.Namespace(**{**vars(args), "worker": "hf", "teacher": teacher,
                                     "windows_file": str(tmp / "windows.npy"), "out": str(tmp)}))
        results["hf"] = json.loads((tmp / "hf.json").read_text())
        results["hf"]["process_s"] = round(time.perf_counter() - t, 1)
        print(f"hf    {results['hf']}", flush=True)
        for name in ("vllm",):
            cmd = [sys.executable, __file__, "--worker", name, "--teacher", teacher, "--windows-file",
                   str(tmp / "windows.npy"), "--out", str(tmp), "--k", str(args.k), "--batch-size",
                   str(args.batch_size), "--dtype", args.dtype]
            cmd += ["--device", args.device] if args.device else []
            cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)] if args.max_num_batched_tokens else []
            cmd += ["--skip-prefill-only"] if args.skip_prefill_only or args.quick else []
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
            t = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{name} worker failed (exit {proc.returncode})")
            results[name] = json.loads((tmp / f"{name}.json").read_text())
            results[name]["process_s"] = round(time.perf_counter() - t, 1)
            print(f"{name:5s} {results[name]}", flush=True)
        lp_h, lp_v = np.load(tmp / "hf_logprobs.npy"), np.load(tmp / "vllm_logprobs.npy")
        ids_h, ids_v = np.load(tmp / "hf_ids.npy"), np.load(tmp / "vllm_ids.npy")

    v, h = results["vllm"], results["hf"]
    summary = {
        "vllm_positions_per_s": v["positions_per_s"],
        "hf_positions_per_s": h["positions_per_s"],
        "vllm_over_hf": round(v["positions_per_s"] / h["positions_per_s"], 3),
        "guide_cpu_positions_per_s": GUIDE_CPU_POSITIONS_PER_S,
        "conversion_fraction": v["conversion_fraction"],
        "conversion_fraction_target": CONVERSION_FRACTION_TARGET,
        "vllm_pythonize_fraction": v.get("vllm_pythonize_fraction"),
        "vllm_prefill_only_positions_per_s": v.get("prefill_only_positions_per_s"),
        "load_s": {"vllm": v["load_s"], "hf": h["load_s"]},
        "max_abs_logprob_diff": float(np.abs(lp_h - lp_v).max()),
        "id_mismatch_fraction": float((ids_h != ids_v).mean()),
        "config": {"teacher": args.teacher or f"llama vocab {args.vocab} hidden {args.hidden} layers {args.layers}",
                   "k": args.k, "seq_len": args.seq_len, "windows": args.windows, "batch_size": args.batch_size,
                   "dtype": args.dtype, "max_num_batched_tokens": args.max_num_batched_tokens},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
