"""What N students from one teacher cost offline (one cache, N cached distillations), online (the
teacher in every student's loop), and at the floor no method can go below.

    python scripts/bench_reuse.py --quick        # under a minute on 2 CPU cores
    python scripts/bench_reuse.py                # the full run: the demo teacher, 4 students, 512 windows

One teacher (the demo teacher by default) and N students of 30-50% of its parameters (random
initialisations of Llamas with narrower hidden and FFN widths: the cost of a step does not depend
on the weights) train for one epoch over the same W windows of 256 tokens, with the same batches,
through `trainer.loop.train`, the loop behind `trainer distill` and `trainer pretrain`:

- offline: `produce` (teacher forward, log-softmax, top-64 + tail, compact encoding, zstd, write,
  manifest) once, then each student distilled from the cache (reader, tail-exact forward KL);
- online:  each student distilled with the teacher run on every batch (full-vocabulary forward KL,
  scripts/online_teacher.py);
- floor:   one bare teacher forward over the windows (logits only: no top-k, nothing written), then
  each student trained with CE on the true tokens alone: the compute that distillation by any
  method cannot avoid.

`offline_over_floor` is what the caching machinery costs on top of that (selection, encoding,
writing, reading and the KD loss; target <= 1.10); `online_over_offline` what caching saves.
A FLOP model (forward 2 N + 2 V d per token, training 3x forward) predicts both ratios from the
models' sizes; it is checked here against the measured CPU ratios and then projected to GPU-scale
students with teachers of 2.5x and 10x their size. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import TEACHER  # noqa: E402
from online_teacher import OnlineTeacherBatches, full_vocabulary_kd_loss  # noqa: E402

from logitcache import ProduceConfig, produce  # noqa: E402
from logitcache.data import prepare_windows  # noqa: E402
from logitcache.read.reader import CacheReader  # noqa: E402
from trainer.commands.distill import make_kd_loss  # noqa: E402
from trainer.commands.pretrain import make_ce_loss  # noqa: E402
from trainer.config import LossConfig, RunConfig, TrainConfig  # noqa: E402
from trainer.data import CacheBatches, WindowBatches, load_causal_lm, load_tokenizer  # noqa: E402
from trainer.loop import init_distributed, train  # noqa: E402

TARGET_OFFLINE_OVER_FLOOR = 1.10


def non_embedding_params(config) -> int:
    h, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return n * (4 * h * h + 3 * h * f + 2 * h) + h


def student_config(teacher_config, fraction: float):
    """A narrower Llama of about `fraction` of the teacher's parameters (same vocabulary and depth)."""
    from transformers import LlamaConfig

    total = sum_params(teacher_config)
    best = None
    head_dim = teacher_config.hidden_size // teacher_config.num_attention_heads
    for heads in range(1, teacher_config.num_attention_heads + 1):
        h = heads * head_dim
        for f in range(64, 2 * teacher_config.intermediate_size + 1, 8):
            cfg = LlamaConfig(**{**teacher_config.to_dict(), "hidden_size": h, "intermediate_size": f,
                                 "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": head_dim})
            gap = abs(sum_params(cfg) / total - fraction)
            if best is None or gap < best[0]:
                best = (gap, cfg)
    return best[1]


def sum_params(config) -> int:
    h, v = config.hidden_size, config.vocab_size
    return non_embedding_params(config) + v * h * (1 if config.tie_word_embeddings else 2)


def train_seconds(model, source, loss_fn, steps: int, batch_size: int, out: Path, tokenizer) -> float:
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-3, warmup=2, eval_every=0, save_every=0,
                      log_every=steps, device="cpu", progress=False)
    run = RunConfig(command="distill", model="bench", out=str(out), seq_len=source.seq_len, train=cfg,
                    loss=LossConfig())
    t0 = time.perf_counter()
    train(model, run=run, env=init_distributed("cpu"), source=source, loss_fn=loss_fn, evaluate=None,
          tokenizer=tokenizer, resume=False)
    return time.perf_counter() - t0


@torch.no_grad()
def bare_forward_seconds(teacher, tokens: np.ndarray, batch_size: int) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(tokens), batch_size):
        _ = teacher(input_ids=torch.as_tensor(tokens[s:s + batch_size, :-1], dtype=torch.long)).logits
    return time.perf_counter() - t0


def flop_ratios(n_teacher: float, n_students: list[float], vocab: int, d_teacher: int, d_students: list[int],
                loss_overhead: float = 0.0) -> dict:
    """(offline / floor, online / offline) predicted from FLOPs per token.

    Forward = 2 N + 2 V d (the LM head at every position); training = 3 x forward. Offline adds
    `loss_overhead` (a fraction of each student's training) for the KD loss and reading; online's
    full-vocabulary KD loss is counted as free (FLOPs ~V per token, small next to the head's V d)."""
    teacher_fwd = 2 * n_teacher + 2 * vocab * d_teacher
    students = [3 * (2 * n + 2 * vocab * d) for n, d in zip(n_students, d_students)]
    floor = teacher_fwd + sum(students)
    offline = teacher_fwd + sum(students) * (1 + loss_overhead)
    online = len(students) * teacher_fwd + sum(students)
    return {"offline_over_floor": offline / floor, "online_over_offline": online / offline}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=TEACHER, help="teacher checkpoint folder (default: the demo's)")
    ap.add_argument("--students", type=int, default=4, help="students, evenly 30-50%% of the teacher's size")
    ap.add_argument("--windows", type=int, default=512, help="training windows of 256 tokens (one epoch each)")
    ap.add_argument("--batch-size", type=int, default=16, help="windows per step")
    ap.add_argument("--work", type=Path, default=Path("work_dir/bench_reuse"),
                    help="folder for the token windows (kept) and the cache (rebuilt each run)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="2 students, 24 windows (under a minute)")
    args = ap.parse_args()
    if args.quick:
        args.students, args.windows, args.batch_size = 2, 24, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="bench_reuse-"))
    caches = args.work.resolve() / "caches"
    tokenizer = load_tokenizer(args.teacher, "--teacher")
    # Tokenized once into the folder produce reads windows from: tokenizing is no method's cost.
    tokens = prepare_windows("shakespeare:train", tokenizer, 256, caches, max_windows=args.windows).tokens
    steps = len(tokens) // args.batch_size
    teacher_cfg = AutoConfig.from_pretrained(args.teacher)
    fractions = np.linspace(0.3, 0.5, args.students)
    configs = [student_config(teacher_cfg, float(f)) for f in fractions]
    vocab = len(tokenizer)

    def student(i: int):
        torch.manual_seed(i)
        return LlamaForCausalLM(configs[i]).float()

    # ---- the teacher's part: one produce run (offline), one bare forward pass (floor)
    for old in caches.iterdir():        # an earlier run's cache would be found complete and not rebuilt
        if old.name != "windows":
            shutil.rmtree(old)
    t0 = time.perf_counter()
    (cache,) = produce(ProduceConfig(teachers=(str(args.teacher),), data="shakespeare:train", out=caches,
                                     k=64, seq_len=256, dtype="float32", batch_size=args.batch_size,
                                     max_windows=args.windows, progress=False))
    produce_s = time.perf_counter() - t0
    teacher = load_causal_lm(args.teacher, "--teacher").eval()
    forward_s = bare_forward_seconds(teacher, tokens, args.batch_size)

    # ---- each student three ways, interleaved so that a shared machine's drifting load hits all three alike
    reader = CacheReader(cache)
    windows = WindowBatches(tokens, args.batch_size, seed=0)
    kd, ce = make_kd_loss(LossConfig(), vocab), make_ce_loss(vocab)
    offline_students, online_students, floor_students = [], [], []
    for i in range(args.students):
        offline_students.append(train_seconds(student(i), CacheBatches(reader, args.batch_size, 0, vocab_limit=vocab),
                                              kd, steps, args.batch_size, tmp / f"offline-{i}", tokenizer))
        online_students.append(train_seconds(student(i), OnlineTeacherBatches(windows, teacher, vocab),
                                             full_vocabulary_kd_loss(vocab), steps, args.batch_size,
                                             tmp / f"online-{i}", tokenizer))
        floor_students.append(train_seconds(student(i), windows, ce, steps, args.batch_size, tmp / f"ce-{i}",
                                            tokenizer))

    offline = produce_s + sum(offline_students)
    online = sum(online_students)
    floor = forward_s + sum(floor_students)
    measured = {"offline_over_floor": offline / floor, "online_over_offline": online / offline}
    n_t = non_embedding_params(teacher_cfg)
    n_s = [non_embedding_params(c) for c in configs]
    loss_overhead = sum(offline_students) / sum(floor_students) - 1
    model_here = flop_ratios(n_t, n_s, vocab, teacher_cfg.hidden_size, [c.hidden_size for c in configs])
    # GPU scale: a 1B-non-embedding student (d 2048) with 152k vocabulary, teachers 2.5x and 10x,
    # the KD loss overhead measured here carried over.
    projections = {}
    for ratio, d_t in ((2.5, 3072), (10.0, 5120)):
        p = flop_ratios(ratio * 1e9, [1e9] * args.students, 151_936, d_t, [2048] * args.students,
                        loss_overhead=max(loss_overhead, 0.0))
        projections[f"teacher_{ratio:g}x"] = {k: round(v, 3) for k, v in p.items()}
    result = {
        "offline_over_floor": round(measured["offline_over_floor"], 4),
        "offline_over_floor_target": f"<= {TARGET_OFFLINE_OVER_FLOOR}",
        "meets_target": measured["offline_over_floor"] <= TARGET_OFFLINE_OVER_FLOOR,
        "online_over_offline": round(measured["online_over_offline"], 4),
        "flop_model_here": {k: round(v, 4) for k, v in model_here.items()},
        "flop_model_projected_gpu": projections,
        "seconds": {"produce": round(produce_s, 2), "offline_students": [round(s, 2) for s in offline_students],
                    "online_students": [round(s, 2) for s in online_students],
                    "bare_teacher_forward": round(forward_s, 2),
                    "ce_students": [round(s, 2) for s in floor_students]},
        "kd_loss_and_reading_overhead": round(loss_overhead, 4),
        "students": len(configs), "student_fractions": [round(sum_params(c) / sum_params(teacher_cfg), 3)
                                                        for c in configs],
        "windows": len(tokens), "tokens_per_student": int(tokens[:, 1:].size), "steps": steps,
        "threads": torch.get_num_threads(), "quick": args.quick,
    }
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"offline (produce + {len(configs)} cached distillations): {offline:.1f} s")
    print(f"online  ({len(configs)} distillations, teacher in the loop): {online:.1f} s")
    print(f"floor   (bare teacher forward + {len(configs)} CE-only trainings): {floor:.1f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
