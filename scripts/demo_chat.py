"""The chat pipeline on the embedded plays' dialogue, in under 10 minutes on 2 CPU cores.

    make demo-chat                 # or: python scripts/demo_chat.py --work work_dir/chat

conversations (shakespeare-chat: scenes cut into alternating turns, one speaker as the assistant) ->
the demo teacher fine-tuned on them (loss on the assistant's turns) -> its top-64 cache stored at
the assistant's tokens only -> a student pruned from it -> the student trained twice for the same
steps on the same conversations, CE only and distilled from the cache -> held-out assistant-token CE
of each, and the bytes the mask saved against caching every position.
Each step is a `logitcache`/`trainer` command, printed before it runs; rerunning skips finished steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from demo import ROOT, TEACHER, prune_student, run, tool  # scripts/demo.py: the same steps' runner

TEMPLATE = ROOT / "assets" / "chat_templates" / "demo.jinja"
SEQ_LEN = "256"


def produce(teacher: Path, out: Path, rows: int, *extra: str) -> Path:
    printed = run(tool("logitcache") + ["produce", "--teacher", str(teacher), "--data", "shakespeare-chat:train",
                                        "--chat-template", str(TEMPLATE), "--seq-len", SEQ_LEN,
                                        "--truncation", "right", "--out", str(out), "--k", "64",
                                        "--max-windows", str(rows), "--batch-size", "16", "--dtype", "float32",
                                        *extra], capture=True)
    return Path(printed.strip().splitlines()[-1])


def heldout_ce(model: Path, work: Path, rows: int) -> float:
    out = run(tool("trainer") + ["evaluate", "--model", str(model), "--data", "shakespeare-chat:heldout",
                                 "--chat-template", str(TEMPLATE), "--seq-len", SEQ_LEN, "--truncation", "right",
                                 "--max-windows", str(rows), "--work", str(work), "--json"], capture=True)
    return json.loads(out.strip().splitlines()[-1])["ce"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("work_dir/chat"), help="folder for caches, models and logs")
    ap.add_argument("--rows", type=int, default=1024, help="training conversations (cut to 257 tokens)")
    ap.add_argument("--batch-size", type=int, default=16, help="conversations per step")
    ap.add_argument("--teacher-steps", type=int, default=120, help="fine-tuning steps of the teacher on the chats")
    ap.add_argument("--eval-rows", type=int, default=200, help="held-out conversations per evaluation")
    ap.add_argument("--target-fraction", type=float, default=0.4, help="student size / teacher size")
    ap.add_argument("--alpha-ce", type=float, default=0.5, help="weight of CE on the true token when distilling")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    chat = ["--chat-template", str(TEMPLATE), "--truncation", "right"]

    # 1. the demo teacher fine-tuned on the conversations, the loss on the assistant's turns only.
    teacher = work / "chat-teacher"
    if not (teacher / "model.safetensors").exists():
        run(tool("trainer") + ["pretrain", "--model", str(TEACHER), "--data", "shakespeare-chat:train", *chat,
                               "--seq-len", SEQ_LEN, "--max-windows", str(4 * args.rows), "--out", str(teacher),
                               "--steps", str(args.teacher_steps), "--batch-size", str(args.batch_size),
                               "--lr", "1e-3", "--warmup", "10", "--work", str(work), "--seed", "0",
                               "--save-dtype", "float32"])

    # 2. its top-64 at the assistant's tokens only, and (for the size) at every position.
    cache = produce(teacher, work / "caches", args.rows)
    every = produce(teacher, work / "caches-all", args.rows, "--train-on", "all")
    run(tool("logitcache") + ["inspect", str(cache)])

    # 3. prune the teacher to ~40% of its parameters.
    student_init = prune_student(teacher, work, args.target_fraction)

    # 4. the same student trained twice on the same conversations for the same steps.
    steps = args.rows // args.batch_size
    common = ["--steps", str(steps), "--batch-size", str(args.batch_size), "--lr", "2e-3", "--warmup", "10",
              "--work", str(work), "--seed", "0"]
    ce_out, kd_out = work / "student-ce", work / "student-kd"
    if not (ce_out / "model.safetensors").exists():
        run(tool("trainer") + ["pretrain", "--model", str(student_init), "--data", "shakespeare-chat:train", *chat,
                               "--seq-len", SEQ_LEN, "--max-windows", str(args.rows), "--out", str(ce_out)] + common)
    if not (kd_out / "model.safetensors").exists():
        run(tool("trainer") + ["distill", "--student", str(student_init), "--cache", str(cache), "--chat-template",
                               str(TEMPLATE),
                               "--alpha-ce", str(args.alpha_ce), "--out", str(kd_out)] + common)

    # 5. held-out assistant-token CE (plays never trained on) and what the mask saved.
    rows = [(name, heldout_ce(model, work, args.eval_rows)) for name, model in
            [("teacher, chat fine-tuned", teacher), ("student, pruned, untrained", student_init),
             ("student, CE only", ce_out), ("student, distilled from cache", kd_out)]]
    print()
    print(f"{'model':<32} {'held-out assistant-token CE':>28}")
    for name, ce in rows:
        print(f"{name:<32} {ce:>28.4f}")
    gain = rows[2][1] - rows[3][1]
    print(f"\ndistillation vs CE only: {gain:+.4f} nats ({'distillation wins' if gain > 0 else 'CE only wins'})")
    masked, full = (sum(p.stat().st_size for p in c.glob("shard-*.parquet")) for c in (cache, every))
    m = json.loads((cache / "manifest.json").read_text())["data"]
    print(f"cache at assistant tokens: {masked / 1e6:.2f} MB, every position: {full / 1e6:.2f} MB "
          f"({masked / full:.2f}x; assistant tokens are {m['loss_tokens'] / m['num_tokens']:.2f} of the positions)")
    print(f"demo-chat finished in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
