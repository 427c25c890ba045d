"""The whole pipeline on the embedded Shakespeare corpus, in under 15 minutes on 2 CPU cores.

    make demo                      # or: python scripts/demo.py --work work_dir

corpus -> tokenizer -> teacher (stored in assets/demo-teacher; trained only when missing) ->
top-64 cache -> student pruned to ~40% of the teacher -> the student trained twice for the same
steps, once with CE only and once distilled from the cache -> a table of held-out CE.
Each step is a `logitcache`/`trainer` command, printed before it runs; rerunning skips finished steps.
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

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "assets" / "demo-teacher"


def run(cmd: list[str], *, capture: bool = False) -> str:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    result = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if result.returncode != 0:
        sys.exit(f"demo: step failed (exit {result.returncode}): {cmd[0]} {cmd[1] if len(cmd) > 1 else ''}")
    return result.stdout or ""


def tool(name: str) -> list[str]:
    return [sys.executable, "-m", f"{name}.cli"]


def evaluate(model: Path, data: str, work: Path, windows: int) -> float:
    out = run(tool("trainer") + ["evaluate", "--model", str(model), "--data", data, "--seq-len", "256",
                                 "--max-windows", str(windows), "--work", str(work), "--json"], capture=True)
    return json.loads(out.strip().splitlines()[-1])["ce"]


def prune_student(teacher: Path, work: Path, fraction: float) -> Path:
    """`trainer prune` of the teacher to `fraction` of its parameters, into WORK/student-init (once)."""
    from safetensors import safe_open
    with safe_open(str(teacher / "model.safetensors"), "pt") as f:
        teacher_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    student_init = work / "student-init"
    if not (student_init / "config.json").exists():
        run(tool("trainer") + ["prune", "--model", str(teacher), "--out", str(student_init),
                               "--target-params", str(int(teacher_params * fraction)),
                               "--calib", "shakespeare:train", "--calib-windows", "64", "--seq-len", "256"])
    return student_init


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=TEACHER,
                    help="teacher checkpoint folder (Llama/Qwen2/Mistral, with its tokenizer); default: the stored one")
    ap.add_argument("--work", type=Path, default=Path("work_dir"), help="folder for caches, students and logs")
    ap.add_argument("--windows", type=int, default=2048,
                    help="training windows of 256 tokens cached and used by each student (one epoch)")
    ap.add_argument("--batch-size", type=int, default=16, help="windows per student step")
    ap.add_argument("--eval-windows", type=int, default=200, help="held-out windows per evaluation")
    ap.add_argument("--target-fraction", type=float, default=0.4, help="student size / teacher size")
    ap.add_argument("--alpha-ce", type=float, default=0.5,
                    help="weight of CE on the true token in the distilled run (MiniMA uses 0.5)")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    # 1. teacher: stored in the repo; trained here only when missing (~1 h on 2 cores).
    teacher = args.teacher.resolve()
    if not (teacher / "model.safetensors").exists():
        run([sys.executable, str(ROOT / "scripts" / "train_demo_teacher.py"), "--out", str(teacher),
             "--work", str(work)])

    # 2. cache the teacher's top-64 over the training windows.
    caches = work / "caches"
    run(tool("logitcache") + ["produce", "--teacher", str(teacher), "--data", "shakespeare:train",
                              "--out", str(caches), "--k", "64", "--seq-len", "256",
                              "--max-windows", str(args.windows), "--batch-size", "16",
                              "--dtype", "float32"])   # stored in bf16 to stay small; bf16 is slow on CPUs
    cache = next(p for p in sorted(caches.iterdir()) if (p / "manifest.json").exists())
    run(tool("logitcache") + ["inspect", str(cache)])

    # 3. prune the teacher to ~40% of its parameters (activation importance, as Minitron).
    student_init = prune_student(teacher, work, args.target_fraction)

    # 4. the same student trained twice on the same windows for the same steps.
    steps = args.windows // args.batch_size
    common = ["--steps", str(steps), "--batch-size", str(args.batch_size), "--lr", "2e-3", "--warmup", "10",
              "--seq-len", "256", "--work", str(work), "--seed", "0"]
    ce_out, kd_out = work / "student-ce", work / "student-kd"
    if not (ce_out / "model.safetensors").exists():
        run(tool("trainer") + ["pretrain", "--model", str(student_init), "--data", "shakespeare:train",
                               "--max-windows", str(args.windows), "--out", str(ce_out)] + common)
    if not (kd_out / "model.safetensors").exists():
        run(tool("trainer") + ["distill", "--student", str(student_init), "--cache", str(cache),
                               "--alpha-ce", str(args.alpha_ce), "--out", str(kd_out)] + common)

    # 5. held-out CE: in-domain (plays never trained on) and out-of-domain (Milton).
    rows = []
    for name, model in [("teacher", teacher), ("student, pruned, untrained", student_init),
                        ("student, CE only", ce_out), ("student, distilled from cache", kd_out)]:
        rows.append((name, evaluate(model, "shakespeare:heldout", work, args.eval_windows),
                     evaluate(model, "milton", work, args.eval_windows)))
    print()
    print(f"{'model':<32} {'held-out CE (plays)':>20} {'held-out CE (Milton)':>21}")
    for name, ce_in, ce_out_dom in rows:
        print(f"{name:<32} {ce_in:>20.4f} {ce_out_dom:>21.4f}")
    kd_gain = rows[2][1] - rows[3][1]
    print(f"\ndistillation vs CE only (plays): {kd_gain:+.4f} nats "
          f"({'distillation wins' if kd_gain > 0 else 'CE only wins'})")
    print(f"artifacts: teacher {teacher}\n           cache {cache}\n           students {ce_out}, {kd_out}")
    print(f"demo finished in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
