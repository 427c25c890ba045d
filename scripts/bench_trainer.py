"""Step time of distillation from a cache against CE-only training of the same student on the same windows.

    python scripts/bench_trainer.py --quick          # under a minute on 2 CPU cores
    python scripts/bench_trainer.py --device cuda    # a bigger student, on a GPU

A random teacher's top-k (k=64, fp16 encoding, as `logitcache produce` writes by default) over
random-token windows is written with CacheWriter; a student is then trained twice through
`trainer.loop.train`, the loop behind `trainer pretrain` / `trainer distill`:

- CE:  the cache's windows held in memory (`WindowBatches`), next-token CE;
- KD:  the same windows read back from the cache by `CacheReader` through a DataLoader with
       `--workers` processes (`CacheBatches`), tail-exact forward KL (`trainer distill`'s loss).

The cache holds more windows than the runs consume, so no run crosses an epoch (each epoch starts a
new DataLoader, whose worker start-up would count as reader stall). Reported per run: the median
step time over the steps after warm-up, read from metrics.jsonl (log every step), and for KD the
fraction of step time spent waiting for the next batch from the reader (`data_wait_fraction`). Runs
alternate (CE, KD, KD without workers) `--repeats` times and the ratio is the median over pairs,
since a shared machine's load drifts. `cpu_ratio` is the same ratio in CPU time of the training
process over whole runs (saving included, the reader's workers not): on a CPU shared with other jobs
it is steadier than wall time. The ratio KD/CE measures what distillation from a cache costs over
plain training; the target is <= 1.10.

Loss positions: KD is run twice more on the same cache batches with a synthetic `loss_mask` (one
contiguous span of ~30% of each window, as an assistant reply in a conversation would be): with the
LM head and the loss at the masked positions only (what `train` does with a loss_mask) and with
them computed everywhere and masked afterwards (`head_at_loss_positions=False`).
`masked_head_ratio` is the first step time over the second (median over repeats). The last line is
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from logitcache import format as fmt  # noqa: E402
from logitcache.backends.topk import topk_from_logits  # noqa: E402
from logitcache.producer.writer import CacheWriter  # noqa: E402
from logitcache.read.reader import CacheReader  # noqa: E402
from trainer.commands.distill import make_kd_loss  # noqa: E402
from trainer.commands.pretrain import make_ce_loss  # noqa: E402
from trainer.config import LossConfig, RunConfig, TrainConfig  # noqa: E402
from trainer.data import CacheBatches, WindowBatches  # noqa: E402
from trainer.loop import DistEnv, train  # noqa: E402

TARGET = 1.10
MASKED_FRACTION = 0.3     # positions carrying a loss in the masked runs


class MaskedBatches:
    """A cache batch source whose batches carry a `loss_mask`: per window, one contiguous span of
    `fraction` of its positions, at an offset drawn from the window id (the same in every run)."""

    def __init__(self, inner: CacheBatches, fraction: float):
        self.inner, self.fraction = inner, fraction

    @property
    def seq_len(self) -> int:
        return self.inner.seq_len

    def stream(self, start: int, count: int, workers: int = 0, pin_memory: bool = False):
        t = self.seq_len
        span = max(1, round(self.fraction * t))
        for batch in self.inner.stream(start, count, workers=workers, pin_memory=pin_memory):
            offsets = torch.as_tensor([np.random.default_rng(int(w)).integers(0, t - span + 1)
                                       for w in batch["window_id"]])
            pos = torch.arange(t)
            batch["loss_mask"] = (pos >= offsets[:, None]) & (pos < offsets[:, None] + span)
            yield batch


def llama(vocab: int, hidden: int, layers: int, heads: int, ffn: int, seq_len: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq_len,
                      tie_word_embeddings=False, initializer_range=0.1, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg)


def make_cache(path: Path, windows: np.ndarray, teacher, k: int, encoding: str, rows_per_shard: int) -> CacheReader:
    """The teacher's top-k over `windows`, written shard by shard exactly as the producer would."""
    n, t1 = windows.shape
    seq_len, vocab = t1 - 1, teacher.config.vocab_size
    teacher_d = {"name_or_path": "bench/random-teacher", "revision": None, "architecture": "LlamaForCausalLM",
                 "dtype": "float32", "num_parameters": sum(p.numel() for p in teacher.parameters()),
                 "config_sha256": "0" * 64, "weights_fingerprint": "0" * 64, "vocab_size": vocab,
                 "max_position_embeddings": seq_len}
    tokenizer_d = {"fingerprint": "1" * 64, "vocab_size": vocab, "eos_token_id": 0}
    data_d = {"source": "bench:random", "text_column": "text", "fingerprint": "2" * 64, "seq_len": seq_len,
              "num_windows": n, "num_tokens": n * seq_len}
    enc = {"name": encoding, "params": {}}
    header = {"key": fmt.cache_key(teacher_d, tokenizer_d, data_d, k, enc), "teacher": teacher_d,
              "tokenizer": tokenizer_d, "data": data_d, "k": k, "encoding": enc,
              "producer": {"backend": "bench", "versions": {}}, "rows_per_shard": rows_per_shard,
              "num_shards": -(-n // rows_per_shard)}
    writer = CacheWriter(path, header)
    teacher.eval()
    with torch.no_grad():
        for i in range(header["num_shards"]):
            rows = windows[i * rows_per_shard:(i + 1) * rows_per_shard]
            x = torch.as_tensor(rows, dtype=torch.long)
            parts = []
            for s in range(0, len(x), 16):
                xb = x[s:s + 16]
                logits = teacher(input_ids=xb[:, :-1]).logits.reshape(-1, vocab)
                parts.append(topk_from_logits(logits, xb[:, 1:].reshape(-1), k))
            ids, lp, tail, tgt = (torch.cat(p) for p in zip(*parts))
            r = len(rows)
            writer.write_shard(i, input_ids=rows, target_logprob=tgt.reshape(r, seq_len).numpy(),
                               topk_ids=ids.reshape(r, seq_len, k).numpy(),
                               topk_logprobs=lp.reshape(r, seq_len, k).numpy(),
                               tail_logmass=tail.reshape(r, seq_len).numpy())
    writer.finish()
    return CacheReader(path)


def timed_run(name: str, student_state: dict, make_student, source, loss_fn, out: Path, cfg: TrainConfig,
              device: torch.device, skip: int, head_at_loss_positions: bool = True) -> dict:
    model = make_student()
    model.load_state_dict(student_state)
    run = RunConfig(command="pretrain" if name == "ce" else "distill", model="bench", out=str(out), train=cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    train(model, run=run, env=DistEnv(0, 1, 0, device), source=source, loss_fn=loss_fn, evaluate=None,
          tokenizer=None, head_at_loss_positions=head_at_loss_positions)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    entries = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in entries if e["kind"] == "train"][skip:]
    times = [e["step_time_s"] for e in steps]
    waits = [e["step_time_s"] * e["data_wait_fraction"] for e in steps]
    return {"median_step_s": statistics.median(times), "mean_step_s": statistics.fmean(times),
            "wait_fraction": sum(waits) / sum(times), "tokens_per_s": statistics.median(
                e["tokens_per_s"] for e in steps), "wall_s": wall, "last_loss": steps[-1]["loss"],
            "cpu_per_step_s": cpu / cfg.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, under a minute on 2 CPU cores")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers feeding KD (default %(default)s)")
    ap.add_argument("--encoding", default="compact", help="cache encoding (default %(default)s, the producer's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in the training process (default %(default)s: on a shared CPU, more "
                         "threads spin against each other and the reader's workers; 0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="alternating CE/KD run pairs; the ratio is the median over pairs "
                         "(default 1 with --quick, else 3)")
    ap.add_argument("--logits-chunk", type=int, default=LossConfig().logits_chunk,
                    help="KD loss positions per float32 chunk (trainer distill --logits-chunk; default %(default)s)")
    ap.add_argument("--work", type=Path, default=None, help="keep the cache and runs here (default: a temp dir)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        size = dict(vocab=8192, hidden=256, layers=2, heads=4, ffn=688, seq_len=128)
        batch, steps, skip, n_windows, k = 4, 9, 3, 40, 64
    elif device.type == "cuda":
        size = dict(vocab=32768, hidden=512, layers=8, heads=8, ffn=1376, seq_len=512)
        batch, steps, skip, n_windows, k = 16, 60, 10, 1088, 64
    else:
        size = dict(vocab=8192, hidden=256, layers=4, heads=4, ffn=688, seq_len=256)
        batch, steps, skip, n_windows, k = 8, 20, 4, 176, 64

    repeats = args.repeats or (1 if args.quick else 3)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_trainer_")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # Zipf-like token frequencies, so the windows look a little like text to the embedding lookups.
    p = 1.0 / np.arange(1, size["vocab"] + 1) ** 1.1
    windows = rng.choice(size["vocab"], size=(n_windows, size["seq_len"] + 1), p=p / p.sum()).astype(np.int32)

    t0 = time.perf_counter()
    # The teacher's size only changes how long the cache takes to build: keep it small.
    teacher = llama(size["vocab"], 64, 1, 4, 128, size["seq_len"], seed=1)
    reader = make_cache(work / "cache", windows, teacher, k, args.encoding, rows_per_shard=64)
    del teacher
    setup_s = time.perf_counter() - t0
    print(f"cache: {reader.num_windows} windows x {reader.seq_len} positions, k={k}, {args.encoding}, "
          f"{reader.num_bytes / reader.num_tokens:.1f} bytes/token ({setup_s:.1f}s to build)", flush=True)

    make_student = lambda: llama(size["vocab"], size["hidden"], size["layers"], size["heads"], size["ffn"],
                                 size["seq_len"], seed=2)
    state = make_student().state_dict()
    n_params = sum(t.numel() for t in state.values())
    cfg = dict(steps=steps, batch_size=batch, lr=1e-3, warmup=2, eval_every=0, save_every=0, log_every=1,
               progress=False, device=str(device))
    vocab = size["vocab"]
    kd_loss = make_kd_loss(LossConfig(logits_chunk=args.logits_chunk), vocab)

    # The losses alone (forward + backward on one step's float32 logits): what KD costs over CE
    # before any model compute, which explains most of the ratio for small students.
    n_pos = batch * size["seq_len"]
    probe = next(CacheBatches(reader, batch, seed=0).stream(0, 1))
    logits = torch.randn(batch, size["seq_len"], vocab, device=device, requires_grad=True)
    probe = {key: v.to(device) for key, v in probe.items()}
    loss_ms = {}
    for name, fn in (("ce", make_ce_loss(vocab)), ("kd", kd_loss)) * 2:   # second pass is measured
        t = time.perf_counter()
        for _ in range(3):
            fn(logits, probe)[0].backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        loss_ms[name] = (time.perf_counter() - t) / 3 * 1e3
    del logits
    print(f"loss only ({n_pos} positions x {vocab}): CE {loss_ms['ce']:.1f} ms, KD {loss_ms['kd']:.1f} ms "
          "(forward + backward)", flush=True)

    # The reader alone: how long one batch takes to decode, with nothing else running.
    t = time.perf_counter()
    n_read = 0
    for _ in CacheBatches(reader, batch, seed=0).stream(0, 2 * steps):
        n_read += 1
    reader_batch_s = (time.perf_counter() - t) / n_read

    masked = lambda: MaskedBatches(CacheBatches(reader, batch, seed=0), MASKED_FRACTION)
    sources = {"ce": (lambda: WindowBatches(windows, batch, seed=0), make_ce_loss(vocab), 0, True),
               "kd": (lambda: CacheBatches(reader, batch, seed=0), kd_loss, args.workers, True),
               "kd_workers0": (lambda: CacheBatches(reader, batch, seed=0), kd_loss, 0, True),
               "kd_masked_head": (masked, kd_loss, args.workers, True),     # head + loss at loss positions
               "kd_masked_full": (masked, kd_loss, args.workers, False)}    # everywhere, then masked
    runs: dict[str, list[dict]] = {name: [] for name in sources}
    for rep in range(repeats):          # alternate the runs, so load changes hit all of them alike
        for name, (make_source, loss_fn, workers, head) in sources.items():
            r = timed_run(name, state, make_student, make_source(), loss_fn, work / f"{name}-{rep}",
                          TrainConfig(**cfg, workers=workers), device, skip, head_at_loss_positions=head)
            runs[name].append(r)
            print(f"{name:>12}: median step {r['median_step_s'] * 1e3:8.1f} ms, {r['tokens_per_s']:9.0f} "
                  f"tokens/s, waiting for data {r['wait_fraction']:.1%} (workers={workers})", flush=True)

    def ratio_of(name: str, base: str = "ce") -> float:
        return statistics.median(k_["median_step_s"] / c["median_step_s"] for k_, c in zip(runs[name], runs[base]))

    def step_ms(name: str) -> float:
        return statistics.median(r["median_step_s"] for r in runs[name]) * 1e3

    def stall(name: str) -> float:
        return statistics.fmean(r["wait_fraction"] for r in runs[name])

    ratio = ratio_of("kd")
    cpu_ratio = statistics.median(k_["cpu_per_step_s"] / c["cpu_per_step_s"] for k_, c in zip(runs["kd"], runs["ce"]))
    result = {
        "ratio": round(ratio, 4), "target": TARGET, "meets_target": ratio <= TARGET,
        "reader_stall_fraction": round(stall("kd"), 4),
        "cpu_ratio": round(cpu_ratio, 4),
        "ratio_workers0": round(ratio_of("kd_workers0"), 4),
        "reader_stall_fraction_workers0": round(stall("kd_workers0"), 4),
        "ce_step_ms": round(step_ms("ce"), 2), "kd_step_ms": round(step_ms("kd"), 2),
        "reader_batch_ms": round(reader_batch_s * 1e3, 2),
        "loss_only_ce_ms": round(loss_ms["ce"], 2), "loss_only_kd_ms": round(loss_ms["kd"], 2),
        "masked_loss_fraction": MASKED_FRACTION,
        "masked_head_ratio": round(ratio_of("kd_masked_head", "kd_masked_full"), 4),
        "masked_head_step_ms": round(step_ms("kd_masked_head"), 2),
        "masked_full_step_ms": round(step_ms("kd_masked_full"), 2),
        "tokens_per_step": batch * size["seq_len"], "student_params": n_params, "k": k,
        "encoding": args.encoding, "workers": args.workers, "logits_chunk": args.logits_chunk,
        "device": str(device), "quick": args.quick, "repeats": repeats, "measured_steps": steps - skip,
        "threads": torch.get_num_threads(), **{f"student_{k_}": v for k_, v in size.items()},
    }
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
