"""What a cache costs in quality: one pruned student distilled from the demo teacher in every way the
tool offers (and online, as the reference), the same batches, steps and seeds for each.

    python scripts/kd_quality.py --work work_dir/kd_quality                 # ~1.5 h on 2 CPU cores
    python scripts/kd_quality.py --work work_dir/kd_quality --part 0/2 &    # the runs split over two
    python scripts/kd_quality.py --work work_dir/kd_quality --part 1/2 &    #   processes, one per core
    python scripts/kd_quality.py --work work_dir/kd_quality --report docs/results/kd_quality
    python scripts/kd_quality.py --quick                                    # a smoke run, ~2 min

Variants (pure distillation, alpha_ce 0, T = 1, except `ce`):
  ce            CE on the true next token only (the student alone)
  online        full-vocabulary forward KL to the teacher run in the loop (the reference)
  fp32-k8/16/64 cached top-k with the tail bucket, values in fp32
  compact-k64   the shipped default encoding (top-64, sqrt-quantised, tail stored)
  renorm-k64    cached top-64 renormalised without the tail (what DistillKit and axolotl do by default)
  sampled-s16/64 S draws per position from the teacher's full softmax, random-sampling KD

Every run reads the batches of the same cache order (CacheBatches over caches of the same windows
and shard size), so the variants differ only in what the teacher's distribution is replaced by.
Each finished run writes RUNS/<variant>-s<seed>.json; rerunning skips those, so an interrupted
experiment resumes. `--report` builds the table, the plot and the page from them.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import TEACHER, prune_student  # noqa: E402

VARIANTS = ("ce", "online", "fp32-k8", "fp32-k16", "fp32-k64", "compact-k64", "renorm-k64", "sampled-s16",
            "sampled-s64")
# variant -> (encoding, k or S) of the cache it reads; ce and online read fp32-k64's batches
CACHES = {"fp32-k8": ("fp32", 8), "fp32-k16": ("fp32", 16), "fp32-k64": ("fp32", 64), "compact-k64": ("compact", 64),
          "sampled-s16": ("sampled", 16), "sampled-s64": ("sampled", 64)}
BATCHES_OF = {"ce": "fp32-k64", "online": "fp32-k64", "renorm-k64": "fp32-k64"}


def run_cli(cmd: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"kd_quality: step failed: {' '.join(cmd[:4])}")


def make_cache(name: str, teacher: Path, work: Path, windows: int) -> Path:
    encoding, k = CACHES[name]
    out = work / "caches" / name
    run_cli([sys.executable, "-m", "logitcache.cli", "produce", "--teacher", str(teacher), "--data",
             "shakespeare:train", "--out", str(out), "--k", str(k), "--encoding", encoding, "--seq-len", "256",
             "--max-windows", str(windows), "--batch-size", "16", "--rows-per-shard", "256", "--dtype", "float32",
             "--no-progress"])
    return next(p for p in sorted(out.iterdir()) if (p / "manifest.json").exists())


def heldout_windows(tokenizer, source: str, work: Path, count: int) -> np.ndarray:
    from logitcache.data import prepare_windows

    return prepare_windows(source, tokenizer, 256, work).tokens[:count]


def teacher_student_kl(teacher, student, tokens: np.ndarray, vocab: int, batch: int = 8) -> float:
    """Mean full-vocabulary KL(teacher || student) over every position of `tokens`' windows."""
    import torch

    from trainer.losses import full_kl

    student.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens), batch):
            x = torch.as_tensor(tokens[s:s + batch, :-1], dtype=torch.long)
            t = teacher(input_ids=x).logits[..., :vocab].float().reshape(-1, vocab)
            q = student(input_ids=x).logits[..., :vocab].float().reshape(-1, vocab)
            total += full_kl(q, t, torch.ones(len(t), dtype=torch.bool)).item() * len(t)
            count += len(t)
    return total / count


def train_one(variant: str, seed: int, args, caches: dict[str, Path], student_init: Path, teacher_model,
              heldout: dict[str, np.ndarray]) -> dict:
    """Train and evaluate one (variant, seed); returns its record."""
    import torch
    from online_teacher import OnlineTeacherBatches, cross_entropy_loss, full_vocabulary_kd_loss

    from logitcache.read.reader import CacheReader
    from trainer.commands.distill import make_kd_loss
    from trainer.config import LossConfig, RunConfig, TrainConfig
    from trainer.data import CacheBatches, load_causal_lm, load_tokenizer
    from trainer.evaluate import evaluate_windows
    from trainer.loop import init_distributed, train

    tokenizer = load_tokenizer(student_init, "--student")
    vocab = len(tokenizer)
    reader = CacheReader(caches[BATCHES_OF.get(variant, variant)])
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=2e-3, warmup=10, seed=seed, eval_every=0,
                      save_every=0, log_every=max(1, args.steps // 8), device="cpu", progress=False)
    source = CacheBatches(reader, cfg.batch_size, seed, vocab_limit=vocab)
    if variant == "ce":
        loss_fn = cross_entropy_loss(vocab)
    elif variant == "online":
        source = OnlineTeacherBatches(source, teacher_model, vocab)
        loss_fn = full_vocabulary_kd_loss(vocab)
    else:
        loss_cfg = LossConfig(loss="sampled" if variant.startswith("sampled") else "forward_kl",
                              renormalize_topk=variant.startswith("renorm"))
        loss_fn = make_kd_loss(loss_cfg, vocab)
    out = args.work / "runs" / f"{variant}-s{seed}"
    run_cfg = RunConfig(command="distill", model=str(student_init), out=str(out), cache=str(reader.path),
                        seq_len=reader.seq_len, train=cfg, loss=LossConfig())
    torch.manual_seed(seed)
    model = load_causal_lm(student_init, "--student")
    t0 = time.perf_counter()
    summary = train(model, run=run_cfg, env=init_distributed("cpu"), source=source, loss_fn=loss_fn,
                    evaluate=None, tokenizer=tokenizer, resume=False)
    seconds = time.perf_counter() - t0
    record = {"variant": variant, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
              "train_seconds": round(seconds, 1), "final_train_loss": summary["train"].get("loss")}
    for name, tokens in heldout.items():
        record[f"ce_{name}"] = evaluate_windows(model, tokens, batch_size=8, vocab=vocab)["ce"]
    record["kl_plays"] = teacher_student_kl(teacher_model, model, heldout["plays"], vocab)
    return record


def experiment(args) -> None:
    import torch

    from trainer.data import load_causal_lm, load_tokenizer

    torch.set_num_threads(args.threads)
    work = args.work
    (work / "results").mkdir(parents=True, exist_ok=True)
    teacher = args.teacher.resolve()
    caches = {name: make_cache(name, teacher, work, args.windows) for name in CACHES}
    student_init = prune_student(teacher, work, 0.4)
    tokenizer = load_tokenizer(student_init, "--student")
    heldout = {"plays": heldout_windows(tokenizer, "shakespeare:heldout", work, args.eval_windows),
               "milton": heldout_windows(tokenizer, "milton", work, args.eval_windows)}
    teacher_model = load_causal_lm(teacher, "--teacher").eval()
    jobs = [(v, s) for s in range(args.seeds) for v in VARIANTS]
    part, parts = args.part
    for i, (variant, seed) in enumerate(jobs):
        path = work / "results" / f"{variant}-s{seed}.json"
        if i % parts != part or path.exists():
            continue
        print(f"kd_quality: {variant} seed {seed} ({i + 1}/{len(jobs)})", flush=True)
        record = train_one(variant, seed, args, caches, student_init, teacher_model, heldout)
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(record), flush=True)
    teacher_record = work / "results" / "teacher.json"
    if part == 0 and not teacher_record.exists():
        from trainer.evaluate import evaluate_windows

        record = {name: evaluate_windows(teacher_model, tokens, batch_size=8, vocab=len(tokenizer))["ce"]
                  for name, tokens in heldout.items()}
        teacher_record.write_text(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# the page


def summarise(results: Path) -> tuple[dict, dict]:
    rows: dict[str, dict[str, list[float]]] = {}
    for path in sorted(results.glob("*-s*.json")):
        r = json.loads(path.read_text())
        for key in ("ce_plays", "ce_milton", "kl_plays", "train_seconds"):
            rows.setdefault(r["variant"], {}).setdefault(key, []).append(r[key])
    teacher = json.loads((results / "teacher.json").read_text()) if (results / "teacher.json").exists() else {}
    return rows, teacher


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def beyond_spread(a: list[float], b: list[float]) -> bool:
    """|mean difference| larger than twice its standard error from the seeds' spread."""
    if len(a) < 2 or len(b) < 2:
        return False
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    return abs(ma - mb) > 2 * math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))


def report(results: Path, out: Path, command: str) -> dict:
    rows, teacher = summarise(results)
    out.mkdir(parents=True, exist_ok=True)
    ref = rows.get("online", {})
    lines = ["| variant | seeds | held-out CE, plays | held-out CE, Milton | KL(teacher ‖ student), plays | "
             "vs online (plays CE) | train s/run |", "|---|---|---|---|---|---|---|"]
    figures = {}
    for v in VARIANTS:
        if v not in rows:
            continue
        r = rows[v]
        cells = []
        for key in ("ce_plays", "ce_milton", "kl_plays"):
            m, s = mean_std(r[key])
            cells.append(f"{m:.4f} ± {s:.4f}")
            figures[f"{v}.{key}"] = round(m, 5)
        if ref and v != "online":
            d = mean_std(r["ce_plays"])[0] - mean_std(ref["ce_plays"])[0]
            rel = d / mean_std(ref["ce_plays"])[0]
            mark = "beyond seed spread" if beyond_spread(r["ce_plays"], ref["ce_plays"]) else "within spread"
            versus = f"{d:+.4f} ({100 * rel:+.2f}%, {mark})"
            figures[f"{v}.vs_online_rel"] = round(rel, 5)
        else:
            versus = "reference" if v == "online" else ""
        lines.append(f"| {v} | {len(r['ce_plays'])} | " + " | ".join(cells) + f" | {versus} | "
                     f"{mean_std(r['train_seconds'])[0]:.0f} |")
    table = "\n".join(lines)
    if teacher:
        table += (f"\n\nThe teacher: held-out CE {teacher['plays']:.4f} on the plays, {teacher['milton']:.4f} "
                  "on Milton.")
    (out / "table.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"figures": figures, "teacher": teacher,
                                                  "runs": {v: rows[v] for v in rows}}, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("kd_quality: no plot (pip install 'logitcache[laws]' for matplotlib)")
    else:
        names = [v for v in VARIANTS if v in rows]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, label in ((axes[0], "ce_plays", "held-out CE, plays (nats)"),
                               (axes[1], "kl_plays", "KL(teacher || student), plays (nats)")):
            ms = [mean_std(rows[v][key]) for v in names]
            ax.errorbar(range(len(names)), [m for m, _ in ms], yerr=[s for _, s in ms], fmt="o", capsize=4)
            for i, v in enumerate(names):
                ax.scatter([i] * len(rows[v][key]), rows[v][key], s=8, color="grey", alpha=0.6)
            ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle("One pruned student, the demo teacher: mean ± std over seeds (dots: each seed)")
        fig.tight_layout()
        fig.savefig(out / "kd_quality.png", dpi=120)
    print(table)
    print(json.dumps({"command": command, **figures}))
    return figures


def parse_part(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    part, parts = int(i), int(n or 1)
    if not 0 <= part < parts:
        raise argparse.ArgumentTypeError(f"--part {text}: expected I/N with 0 <= I < N")
    return part, parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=TEACHER, help="teacher checkpoint folder (default: the demo's)")
    ap.add_argument("--work", type=Path, default=Path("work_dir/kd_quality"), help="caches, runs and results")
    ap.add_argument("--windows", type=int, default=2048, help="training windows of 256 tokens (one epoch)")
    ap.add_argument("--batch-size", type=int, default=16, help="windows per step")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: one epoch)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per variant")
    ap.add_argument("--eval-windows", type=int, default=200, help="held-out windows per corpus")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one per process with --part)")
    ap.add_argument("--part", type=parse_part, default=(0, 1), help="run every N-th job from the I-th: I/N")
    ap.add_argument("--report", type=Path, default=None, metavar="DIR",
                    help="build the table, plot and figures in DIR from the finished runs and stop")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 64 windows, 4 steps, 1 seed")
    args = ap.parse_args()
    if args.quick:
        args.windows, args.steps, args.seeds, args.eval_windows = 64, 4, 1, 8
        args.work = args.work.with_name(args.work.name + "-quick")
    args.steps = args.steps or args.windows // args.batch_size
    args.work = args.work.resolve()
    command = "python scripts/kd_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.report is None:
        experiment(args)
        if args.part[1] > 1:
            return
    report(args.work / "results", args.report or args.work / "report", command)


if __name__ == "__main__":
    main()
