"""Does the cache encoding change the distilled student? One pruned student, one recipe, one cache per encoding.

    python scripts/codec_quality.py --quick         # 512 windows x 256 tokens, 100 steps of 4 (see docs/encodings.md)
    python scripts/codec_quality.py                 # 2048 windows, 256 steps of 8

The demo teacher (`assets/demo-teacher`) is cached over the same Shakespeare training windows with
every encoding: exact top-64 (`fp32`, by `logitcache produce`; `fp16`, `compact` (the default) and
`adaptive` are that cache's arrays encoded again, which is what produce would write), and `sampled`
with S chosen so that its bytes/token are about those of `compact` (compared at equal bytes: S is
picked by encoding draws of a few windows for several S and taking the one closest to compact's
measured bytes/token). The teacher is pruned once to `--target-fraction` of its parameters
(`trainer prune`, as scripts/demo.py does) and that student is trained for the same steps, on the
same windows, with the same seed and the demo's flags (lr 2e-3, warmup 10, `--alpha-ce` 0.5): once
per cache with `trainer distill` (the loss the cache calls for: forward KL on top-k caches,
random-sampling KD on the sampled one) and once with CE only (`trainer pretrain`). Each student's
held-out CE on `shakespeare:heldout` (plays never trained on) and `milton` is printed in a table;
the last line is JSON with `compact_vs_exact_rel_diff` = |CE(compact) - CE(fp32)| / CE(fp32) on the
plays beside its target. One seed: differences of a few 1e-3 nats are within run-to-run noise.
Every step is a `logitcache`/`trainer` command printed before it runs; rerunning skips finished steps.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "assets" / "demo-teacher"
TARGET_REL_DIFF = 0.002
ENCODINGS = ("fp32", "fp16", "compact", "adaptive", "sampled")
S_CANDIDATES = (16, 24, 32, 48, 64, 96, 128, 192, 256)


def run(cmd: list[str], *, capture: bool = False) -> str:
    print("$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    result = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE if capture else None, text=True)
    if result.returncode != 0:
        sys.exit(f"codec_quality: step failed (exit {result.returncode}): {cmd[2] if len(cmd) > 2 else cmd}")
    return result.stdout or ""


def tool(name: str) -> list[str]:
    return [sys.executable, "-m", f"{name}.cli"]


def find_cache(root: Path) -> Path:
    found = [p.parent for p in root.glob("*/manifest.json")]
    if len(found) != 1:
        sys.exit(f"codec_quality: expected one cache under {root}, found {len(found)}")
    return found[0]


def bytes_per_token(cache: Path) -> float:
    m = json.loads((cache / "manifest.json").read_text())
    return sum(e["bytes"] for e in m["shards"]) / sum(e["tokens"] for e in m["shards"])


def choose_S(teacher: Path, work: Path, seq_len: int, target: float, windows: int = 16) -> tuple[int, dict]:
    """The S whose sampled columns cost about what compact's do, per token (measured, not modelled).

    Draws S tokens per position for `windows` training windows (the producer's sampler), encodes them
    as the writer does (rank table fitted on the same windows, 64-row groups, the encoding's zstd
    level) and returns the candidate closest to `target` (compact's encoding bytes/token).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from logitcache.backends.hf import HFBackend
    from logitcache.data import prepare_windows
    from logitcache.encodings import get_encoding
    from logitcache.encodings.sampled import draw_samples_at, window_uniforms

    backend = HFBackend(str(teacher), k=1, dtype="float32")
    tok = prepare_windows("shakespeare:train", _tokenizer(teacher), seq_len, work, max_windows=windows).tokens
    with torch.inference_mode():         # the logits once; each S draws from them as the producer does
        hidden = backend.hidden_states(torch.as_tensor(tok[:, :-1], dtype=torch.long))
        hidden = hidden.reshape(-1, backend.head.in_features)
        logits = [backend.head(hidden[a:a + 512]).float() for a in range(0, len(hidden), 512)]
    sizes = {}
    for S in S_CANDIDATES:
        enc = get_encoding("sampled", {"S": S})
        enc = get_encoding("sampled", enc.fit(tok, backend.describe()["vocab_size"]))
        u = window_uniforms("choose-S", range(len(tok)), seq_len, S)
        draws = [draw_samples_at(chunk, u[512 * i:512 * i + len(chunk)]) for i, chunk in enumerate(logits)]
        ids = torch.cat([d[0] for d in draws]).reshape(len(tok), seq_len, S).numpy()
        counts = torch.cat([d[1] for d in draws]).reshape(len(tok), seq_len, S).numpy()
        cols = enc.encode(ids, counts)
        table = pa.table(cols, schema=pa.schema(enc.arrow_fields(S, seq_len)))
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=64, compression="zstd", compression_level=enc.parquet_level,
                       use_dictionary=False, version="2.6")
        sizes[S] = len(buf.getvalue()) / tok[:, 1:].size
    backend.close()
    best = min(sizes, key=lambda s: abs(sizes[s] - target))
    return best, sizes


def encoding_bytes(cache: Path) -> float:
    """Bytes/token of the encoding's own columns in a cache (the rest is the same for every cache)."""
    import pyarrow.parquet as pq

    m = json.loads((cache / "manifest.json").read_text())
    base = {"window_id", "input_ids", "target_logprob"}
    total = 0
    for e in m["shards"]:
        md = pq.ParquetFile(cache / e["name"]).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            total += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)
                         if rg.column(c).path_in_schema.split(".")[0] not in base)
    return total / sum(e["tokens"] for e in m["shards"])


def reencode(exact: Path, encoding: str, root: Path) -> Path:
    """The cache `logitcache produce --encoding <encoding>` would write, made from the exact fp32 cache.

    The producer's top-k arrays are what the fp32 cache stores bit for bit, so encoding them again
    gives the same cache (same key, folder and shards) without running the teacher again: header
    and rank table are built as the producer builds them (`build_header`'s key, `fit_encoding` on
    the cache's own windows).
    """
    import numpy as np

    from logitcache import format as fmt
    from logitcache.encodings import get_encoding
    from logitcache.producer.header import fit_encoding
    from logitcache.producer.writer import CacheWriter
    from logitcache.read.reader import CacheReader

    src = CacheReader(exact)
    m = src.manifest
    windows = np.concatenate([src.read_shard(e["index"])["input_ids"] for e in src.shards])

    class _W:        # what fit_encoding reads of a Windows
        tokens = windows

    info = fit_encoding(get_encoding(encoding), _W, m["teacher"]["vocab_size"])
    header = {f: m[f] for f in ("k", "rows_per_shard", "num_shards", "teacher", "tokenizer", "data", "producer")}
    header["encoding"] = info
    header["key"] = fmt.cache_key(m["teacher"], m["tokenizer"], m["data"], m["k"], info)
    out = root / fmt.cache_dir_name(m["teacher"]["name_or_path"], m["k"], header["key"])
    writer = CacheWriter(out, header)
    done = writer.completed()
    for e in src.shards:
        if e["index"] not in done:
            a = src.read_shard(e["index"])
            writer.write_shard(e["index"], input_ids=a["input_ids"], target_logprob=a["target_logprob"],
                               topk_ids=a["topk_ids"], topk_logprobs=a["topk_logprobs"],
                               tail_logmass=a["tail_logmass"])
    writer.finish()
    print(f"encoded {exact.name} as {encoding}: {out}", flush=True)
    return out


def _tokenizer(teacher: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher)


def evaluate(model: Path, data: str, work: Path, windows: int) -> float:
    out = run(tool("trainer") + ["evaluate", "--model", model, "--data", data, "--seq-len", "256",
                                 "--max-windows", windows, "--work", work, "--json"], capture=True)
    return json.loads(out.strip().splitlines()[-1])["ce"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="512 cached windows, 100 steps of 4 windows, 48 eval windows")
    ap.add_argument("--teacher", type=Path, default=TEACHER, help="teacher checkpoint folder (default: the demo's)")
    ap.add_argument("--work", type=Path, default=Path("work_dir") / "codec_quality",
                    help="folder for caches, students and windows (reruns skip what is there)")
    ap.add_argument("--windows", type=int, default=None, help="training windows cached (default 2048; 512 quick)")
    ap.add_argument("--steps", type=int, default=None, help="student steps (default 256; 100 quick)")
    ap.add_argument("--batch-size", type=int, default=None, help="windows per student step (default 8; 4 quick)")
    ap.add_argument("--eval-windows", type=int, default=None,
                    help="held-out windows per corpus (default 200; 48 quick)")
    ap.add_argument("--k", type=int, default=64, help="top-k of the top-k caches (default %(default)s)")
    ap.add_argument("--S", type=int, default=None, help="draws per position of the sampled cache "
                    "(default: chosen so its bytes/token match compact's)")
    ap.add_argument("--alpha-ce", type=float, default=0.5, help="CE weight in distillation (default: the demo's 0.5)")
    ap.add_argument("--target-fraction", type=float, default=0.4, help="student size / teacher size")
    args = ap.parse_args()
    args.windows = args.windows or (512 if args.quick else 2048)
    args.steps = args.steps or (100 if args.quick else 256)
    args.batch_size = args.batch_size or (4 if args.quick else 8)
    args.eval_windows = args.eval_windows or (48 if args.quick else 200)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher.resolve()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.time()
    timings: dict[str, float] = {}

    def produce(encoding: str, *extra: str) -> Path:
        root = work / f"cache-{encoding}"
        t = time.time()
        run(tool("logitcache") + ["produce", "--teacher", teacher, "--data", "shakespeare:train", "--out", root,
                                  "--k", args.k, "--seq-len", "256", "--max-windows", args.windows,
                                  "--batch-size", "16", "--dtype", "float32", "--encoding", encoding, *extra])
        timings[f"produce {encoding}"] = time.time() - t
        return find_cache(root)

    # 1. one cache per encoding over the same windows: the teacher runs once for the top-k caches
    caches = {"fp32": produce("fp32")}
    for name in ("fp16", "compact", "adaptive"):
        t = time.time()
        caches[name] = reencode(caches["fp32"], name, work / f"cache-{name}")
        timings[f"encode {name}"] = time.time() - t
    compact_enc_bytes = encoding_bytes(caches["compact"])
    sizes = {}
    if args.S is None:
        t = time.time()
        args.S, sizes = choose_S(teacher, work, 256, compact_enc_bytes)
        timings["choose S"] = time.time() - t
    caches["sampled"] = produce("sampled", "--encoding-param", f"S={args.S}")

    # 2. the student: the teacher pruned once
    from safetensors import safe_open
    with safe_open(str(teacher / "model.safetensors"), "pt") as f:
        teacher_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    student_init = work / "student-init"
    if not (student_init / "config.json").exists():
        run(tool("trainer") + ["prune", "--model", teacher, "--out", student_init,
                               "--target-params", int(teacher_params * args.target_fraction),
                               "--calib", "shakespeare:train", "--calib-windows", "64", "--seq-len", "256",
                               "--work", work])

    # 3. the same student, same steps, seed and windows: CE only, then one distillation per cache
    common = ["--steps", args.steps, "--batch-size", args.batch_size, "--lr", "2e-3", "--warmup", "10",
              "--seq-len", "256", "--work", work, "--seed", "0", "--eval-every", "0", "--save-every", "0",
              "--no-progress"]
    students = {"CE only": work / "student-ce"}
    if not (students["CE only"] / "model.safetensors").exists():
        t = time.time()
        run(tool("trainer") + ["pretrain", "--model", student_init, "--data", "shakespeare:train",
                               "--max-windows", args.windows, "--out", students["CE only"]] + common)
        timings["train CE only"] = time.time() - t
    for name, cache in caches.items():
        out = students[name] = work / f"student-{name}"
        if not (out / "model.safetensors").exists():
            t = time.time()
            run(tool("trainer") + ["distill", "--student", student_init, "--cache", cache,
                                   "--alpha-ce", args.alpha_ce, "--out", out] + common)
            timings[f"train {name}"] = time.time() - t

    # 4. held-out CE
    labels = {"fp32": f"exact top-{args.k} (fp32)", "fp16": f"top-{args.k} fp16", "compact": "compact (default)",
              "adaptive": "adaptive (p=0.95)", "sampled": f"sampled S={args.S}", "CE only": "CE only (no teacher)"}
    rows = []
    t = time.time()
    for name in [*ENCODINGS, "CE only"]:
        cache = caches.get(name)
        rows.append({"name": name, "label": labels[name],
                     "bytes_per_token": bytes_per_token(cache) if cache else None,
                     "encoding_bytes_per_token": encoding_bytes(cache) if cache else None,
                     "plays": evaluate(students[name], "shakespeare:heldout", work, args.eval_windows),
                     "milton": evaluate(students[name], "milton", work, args.eval_windows)})
    timings["evaluate"] = time.time() - t
    by = {r["name"]: r for r in rows}
    exact = by["fp32"]["plays"]

    print()
    print(f"{args.windows} windows x 256 tokens cached, {args.steps} steps x {args.batch_size} windows, "
          f"alpha_ce {args.alpha_ce}, eval {args.eval_windows} windows per corpus")
    if sizes:
        print("sampled bytes/token (encoding columns) by S: "
              + ", ".join(f"S={s}: {b:.1f}" for s, b in sizes.items())
              + f"; compact: {compact_enc_bytes:.1f} -> S={args.S}")
    print("| student trained from | cache B/token (all columns) | encoding B/token | held-out CE plays "
          "| vs exact | held-out CE Milton | vs exact |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b = "-" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.1f}"
        eb = "-" if r["encoding_bytes_per_token"] is None else f"{r['encoding_bytes_per_token']:.1f}"
        print(f"| {r['label']} | {b} | {eb} | {r['plays']:.4f} | {r['plays'] - exact:+.4f} "
              f"| {r['milton']:.4f} | {r['milton'] - by['fp32']['milton']:+.4f} |")
    total = time.time() - t0
    print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total / 60:.1f} min")
    rel = abs(by["compact"]["plays"] - exact) / exact
    summary = {"compact_vs_exact_rel_diff": {"value": float(f"{rel:.4g}"), "target": f"<= {TARGET_REL_DIFF}",
                                             "met": bool(rel <= TARGET_REL_DIFF)},
               "sampled_S": args.S, "windows": args.windows, "steps": args.steps,
               "ce_plays": {r["name"]: round(r["plays"], 4) for r in rows},
               "ce_milton": {r["name"]: round(r["milton"], 4) for r in rows},
               "bytes_per_token": {r["name"]: round(r["bytes_per_token"], 2) for r in rows if r["bytes_per_token"]},
               "minutes": round(total / 60, 1)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
