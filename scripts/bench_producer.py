"""Benchmark the producer against a bare forward pass of the same teacher over the same windows.

    python scripts/bench_producer.py --quick                 # < 1 min on 2 idle CPU cores
    python scripts/bench_producer.py                         # more windows, best of 3
    python scripts/bench_producer.py --shape demo --quick    # the demo teacher (hidden 256)
    python scripts/bench_producer.py --teacher PATH --device cuda --dtype bfloat16

Why the teacher's width matters: beyond the forward, the producer selects the top-k and sums the
tail over all V logits of every position, ~3.5 ns per logit here, while the LM head costs 2d FLOPs
per logit. So the overhead is about (head share of the forward) x (70 / d) on this CPU: ~3% for
d = 512, but ~15% for the demo teacher (d = 256, its head 57% of its parameters), a shape no real
teacher has. The default is therefore a Pythia-70m-shaped Llama (hidden 512, 6 layers, 8 heads,
FFN 1376, i.e. Pythia-70m's width, depth and FFN parameter count; the demo vocabulary of 8192;
random weights, 23M parameters), the narrowest teacher in common use; `--shape demo` measures the
demo teacher (`assets/demo-teacher`, trained weights) instead. Windows: Shakespeare (train split).

Measured, best of `--repeats` runs each, alternating so both see the same machine load:

- forward: `model(input_ids).logits` in inference mode over the same batches (a plain
  transformers forward, full [B, T, V] logits, nothing reduced or written);
- produce: `logitcache.producer` end to end into a fresh folder (windows already
  tokenized; model load, top-k + exact tail, encoding, zstd, sha256, fsync and manifest included);
- compute: the backend alone (`HFBackend.run` over the same batches, model already loaded): body,
  chunked LM head, top-k and tail, without writing, to tell compute overhead from I/O and setup;
- fixed costs: a one-batch produce less that batch's compute (checks, tokenizer and model load,
  opening the cache), paid once per run whatever its size.

The last line is JSON: `overhead_ratio` = produce / forward (target <= 1.10),
`steady_state_ratio` = (produce - fixed costs) / forward (what a long run converges to),
`compute_ratio` = compute / forward, and the same three in process CPU seconds (`cpu_*`, writer
thread included; with `--threads 1` they are the steadiest figures on a busy machine),
`bytes_per_token` of the written shards, and the timings behind them. Other timings are wall-clock,
best of the repeats; on a shared machine take them from an idle moment.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from logitcache import ProduceConfig, produce
from logitcache.backends.hf import HFBackend
from logitcache.backends.teacher import load_tokenizer
from logitcache.data import prepare_windows

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo-teacher"
TARGET = 1.10


SHAPES = {  # name -> (hidden, layers, heads, FFN)
    "pythia-70m": (512, 6, 8, 1376),
    "demo": (256, 4, 4, 688),
}


def random_teacher(folder: Path, shape: str) -> Path:
    """A Llama of `shape` with random weights, beside the demo tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, ffn = SHAPES[shape]
    tok = load_tokenizer(DEMO)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


class Timer:
    """Wall-clock and process CPU seconds (all threads, the writer's included) of a block."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


@torch.inference_mode()
def bare_forward(model, tokens, batch_size: int, device: str) -> Timer:
    with Timer() as t:
        for s in range(0, len(tokens), batch_size):
            x = torch.as_tensor(tokens[s:s + batch_size, :-1], dtype=torch.long, device=device)
            logits = model(input_ids=x).logits
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            del logits
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer windows, two timed runs of each (< 1 min)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="pythia-70m",
                    help="teacher when no --teacher is given: pythia-70m (default, random weights) or demo "
                         "(assets/demo-teacher; random weights of its shape if the file is missing)")
    ap.add_argument("--teacher", default=None, help="teacher folder (overrides --shape)")
    ap.add_argument("--data", default="shakespeare:train", help="corpus (default shakespeare:train)")
    ap.add_argument("--windows", type=int, default=None,
                    help="windows to run (default 256; 32 with --quick; x4 with --shape demo)")
    ap.add_argument("--seq-len", type=int, default=256, help="window length (default 256)")
    ap.add_argument("--k", type=int, default=64, help="top-k (default 64)")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    ap.add_argument("--rows-per-shard", type=int, default=16, help="windows per shard (default 16)")
    ap.add_argument("--encoding", default="compact", help="cache encoding (default compact, the producer's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default="float32", help="teacher dtype for both runs (default float32)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice, one per core); 1 gives steadier figures "
                         "on a busy machine")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs of each, best kept (default 3; 2 with --quick)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_windows = args.windows or (32 if args.quick else 256) * (4 if args.shape == "demo" else 1)
    repeats = args.repeats or (2 if args.quick else 3)

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="bench-producer-"))
    try:
        if args.teacher:
            teacher, label = Path(args.teacher), args.teacher
        elif args.shape == "demo" and (DEMO / "model.safetensors").is_file():
            teacher, label = DEMO, "assets/demo-teacher"
        else:
            teacher, label = random_teacher(work / "teacher", args.shape), f"random Llama ({args.shape} shape)"
        tok = load_tokenizer(teacher)
        # windows for the full run and for a one-batch run (fixed costs), tokenized once, untimed
        tokens = prepare_windows(args.data, tok, args.seq_len, root=work / "windows-root",
                                 max_windows=n_windows).tokens
        prepare_windows(args.data, tok, args.seq_len, root=work / "windows-root", max_windows=args.batch_size)

        from transformers import AutoModelForCausalLM

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype).eval().to(args.device)
        backend = HFBackend(str(teacher), args.k, args.device, args.dtype)
        bare_forward(model, tokens[:args.batch_size], args.batch_size, args.device)   # warm-up

        def run_producer(name: str, windows: int) -> tuple[Timer, Path]:
            out = work / name
            shutil.copytree(work / "windows-root", out)          # windows ready, as on a re-run
            config = ProduceConfig(teachers=(str(teacher),), data=args.data, out=out, k=args.k,
                                   seq_len=args.seq_len, device=args.device, dtype=args.dtype,
                                   batch_size=args.batch_size, rows_per_shard=args.rows_per_shard,
                                   encoding=args.encoding, max_windows=windows, progress=False)
            with Timer() as t:
                (cache,) = produce(config)
            return t, cache

        def run_backend(windows) -> Timer:
            with Timer() as t:
                for s in range(0, len(windows), args.batch_size):
                    backend.run(windows[s:s + args.batch_size])
            return t

        forward, produced, compute, setup, cache = [], [], [], [], None
        for i in range(repeats):      # interleaved, so every measurement sees the same machine load
            forward.append(bare_forward(model, tokens, args.batch_size, args.device))
            t, cache = run_producer(f"out{i}", n_windows)
            produced.append(t)
            compute.append(run_backend(tokens))
            # fixed costs: a one-batch produce (checks, tokenizer, model load, writer) less its compute
            one, _ = run_producer(f"one{i}", args.batch_size)
            batch = run_backend(tokens[:args.batch_size])
            setup.append((one.wall - batch.wall, one.cpu - batch.cpu))
            print(f"repeat {i}: forward {forward[-1].wall:.2f} s, produce {produced[-1].wall:.2f} s, "
                  f"compute {compute[-1].wall:.2f} s, fixed costs {setup[-1][0]:.2f} s (wall)", file=sys.stderr)

        manifest = json.loads((cache / "manifest.json").read_text())
        shard_bytes = sum(e["bytes"] for e in manifest["shards"])
        n_tokens = manifest["data"]["num_tokens"]
        fwd, prod = min(t.wall for t in forward), min(t.wall for t in produced)
        comp, fixed = min(t.wall for t in compute), min(w for w, _ in setup)
        fwd_cpu, prod_cpu = min(t.cpu for t in forward), min(t.cpu for t in produced)
        fixed_cpu = min(c for _, c in setup)
        result = {"overhead_ratio": round(prod / fwd, 3), "target": TARGET,
                  "bytes_per_token": round(shard_bytes / n_tokens, 1),
                  "steady_state_ratio": round((prod - fixed) / fwd, 3), "compute_ratio": round(comp / fwd, 3),
                  "cpu_time_ratio": round(prod_cpu / fwd_cpu, 3),
                  "cpu_steady_state_ratio": round((prod_cpu - fixed_cpu) / fwd_cpu, 3),
                  "cpu_compute_ratio": round(min(t.cpu for t in compute) / fwd_cpu, 3),
                  "produce_s": round(prod, 3), "forward_s": round(fwd, 3), "compute_s": round(comp, 3),
                  "fixed_costs_s": round(fixed, 3), "fixed_costs_cpu_s": round(fixed_cpu, 3),
                  "produce_tokens_per_s": round(n_tokens / prod), "forward_tokens_per_s": round(n_tokens / fwd),
                  "tokens": n_tokens, "teacher": label,
                  "teacher_parameters": sum(p.numel() for p in model.parameters()), "k": args.k,
                  "seq_len": args.seq_len, "batch_size": args.batch_size, "encoding": args.encoding,
                  "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(), "repeats": repeats}
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
