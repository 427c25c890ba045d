"""Benchmark the producer against a bare forward pass of the same teacher over the same windows.

    python scripts/bench_producer.py --quick        # < 1 min on 2 idle CPU cores
    python scripts/bench_producer.py                # more windows, best of 3
    python scripts/bench_producer.py --teacher PATH --device cuda --dtype bfloat16

Teacher (default): `assets/demo-teacher` when it holds `model.safetensors`, else a 7.4M-parameter
Llama built from config with random weights (hidden 256, 4 layers, 4 heads, FFN 688, vocabulary
8192, the demo teacher's shape) saved beside the demo tokenizer. Windows: Shakespeare (train split).

Measured, best of `--repeats` runs each, alternating so both see the same machine load:

- forward: `model(input_ids).logits` in inference mode over the same batches (a plain
  transformers forward, full [B, T, V] logits, nothing reduced or written);
- produce: `logitcache.producer.produce` end to end into a fresh folder (windows already
  tokenized; model load, top-k + exact tail, encoding, zstd, sha256, fsync and manifest included);
- compute: the backend alone (`HFBackend.run` over the same batches, model already loaded): body,
  chunked LM head, top-k and tail, without writing, to tell compute overhead from I/O and setup;
- fixed costs: a one-batch produce less that batch's compute (checks, tokenizer and model load,
  opening the cache), paid once per run whatever its size.

The last line is JSON: `overhead_ratio` = produce / forward (target <= 1.10),
`steady_state_ratio` = (produce - fixed costs) / forward (what a long run converges to),
`compute_ratio` = compute / forward, `bytes_per_token` of the written shards, and the timings
behind them. Timings are wall-clock; on a shared machine take them from an idle moment (the best of
the repeats is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from logitcache.backends.hf import HFBackend
from logitcache.data import prepare_windows
from logitcache.producer import produce
from logitcache.teacher import load_tokenizer

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo-teacher"
TARGET = 1.10


def random_demo_shaped_teacher(folder: Path) -> Path:
    """The demo teacher's architecture with random weights, beside the demo tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(DEMO)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@torch.inference_mode()
def bare_forward(model, tokens, batch_size: int, device: str) -> float:
    start = time.perf_counter()
    for s in range(0, len(tokens), batch_size):
        x = torch.as_tensor(tokens[s:s + batch_size, :-1], dtype=torch.long, device=device)
        logits = model(input_ids=x).logits
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        del logits
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="48 windows, two timed runs of each (< 1 min)")
    ap.add_argument("--teacher", default=None, help="teacher folder (default: the demo teacher, see above)")
    ap.add_argument("--data", default="shakespeare:train", help="corpus (default shakespeare:train)")
    ap.add_argument("--windows", type=int, default=None, help="windows to run (default 512; 48 with --quick)")
    ap.add_argument("--seq-len", type=int, default=256, help="window length (default 256)")
    ap.add_argument("--k", type=int, default=64, help="top-k (default 64)")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    ap.add_argument("--rows-per-shard", type=int, default=16, help="windows per shard (default 16)")
    ap.add_argument("--encoding", default="fp16", help="cache encoding (default fp16)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default="float32", help="teacher dtype for both runs (default float32)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice, one per core); 1 gives steadier figures "
                         "on a busy machine")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs of each, best kept (default 3; 2 with --quick)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_windows = args.windows or (48 if args.quick else 512)
    repeats = args.repeats or (2 if args.quick else 3)

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="bench-producer-"))
    try:
        if args.teacher:
            teacher, label = Path(args.teacher), args.teacher
        elif (DEMO / "model.safetensors").is_file():
            teacher, label = DEMO, "assets/demo-teacher"
        else:
            teacher, label = random_demo_shaped_teacher(work / "teacher"), "random 7.4M Llama (demo shape)"
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

        def run_producer(name: str, windows: int) -> tuple[float, Path]:
            out = work / name
            shutil.copytree(work / "windows-root", out)          # windows ready, as on a re-run
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):       # it prints the cache's path
                (cache,) = produce([str(teacher)], args.data, out, k=args.k, seq_len=args.seq_len,
                                   device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                                   rows_per_shard=args.rows_per_shard, encoding=args.encoding,
                                   max_windows=windows, progress=False)
            return time.perf_counter() - start, cache

        def run_backend(windows) -> float:
            start = time.perf_counter()
            for s in range(0, len(windows), args.batch_size):
                backend.run(windows[s:s + args.batch_size])
            return time.perf_counter() - start

        forward_s, produce_s, compute_s, setup_s, cache = [], [], [], [], None
        for i in range(repeats):      # interleaved, so every measurement sees the same machine load
            forward_s.append(bare_forward(model, tokens, args.batch_size, args.device))
            seconds, cache = run_producer(f"out{i}", n_windows)
            produce_s.append(seconds)
            compute_s.append(run_backend(tokens))
            # fixed costs: a one-batch produce (checks, tokenizer, model load, writer) less its compute
            one, _ = run_producer(f"one{i}", args.batch_size)
            setup_s.append(one - run_backend(tokens[:args.batch_size]))
            print(f"repeat {i}: forward {forward_s[-1]:.2f} s, produce {produce_s[-1]:.2f} s, "
                  f"compute {compute_s[-1]:.2f} s, fixed costs {setup_s[-1]:.2f} s", file=sys.stderr)

        manifest = json.loads((cache / "manifest.json").read_text())
        shard_bytes = sum(e["bytes"] for e in manifest["shards"])
        n_tokens = manifest["data"]["num_tokens"]
        fwd, prod, comp, setup = min(forward_s), min(produce_s), min(compute_s), min(setup_s)
        result = {"overhead_ratio": round(prod / fwd, 3), "target": TARGET,
                  "bytes_per_token": round(shard_bytes / n_tokens, 1),
                  "steady_state_ratio": round((prod - setup) / fwd, 3), "compute_ratio": round(comp / fwd, 3),
                  "produce_s": round(prod, 3), "forward_s": round(fwd, 3), "compute_s": round(comp, 3),
                  "fixed_costs_s": round(setup, 3),
                  "produce_tokens_per_s": round(n_tokens / prod), "forward_tokens_per_s": round(n_tokens / fwd),
                  "tokens": n_tokens, "teacher": label, "k": args.k, "seq_len": args.seq_len,
                  "batch_size": args.batch_size, "encoding": args.encoding, "device": args.device,
                  "dtype": args.dtype, "threads": torch.get_num_threads(), "repeats": repeats}
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
