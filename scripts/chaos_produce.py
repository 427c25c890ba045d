"""Crash harness: SIGKILL `logitcache produce`, `trainer pretrain` and `trainer distill` at many
moments, resume each time, and check the end result equals an uninterrupted run's.

    python scripts/chaos_produce.py --quick          # 20 producer kills + 3 per trainer command
    python scripts/chaos_produce.py --kills 60       # more

Setup (in a temporary folder): a byte-level BPE tokenizer trained on a Shakespeare slice, a tiny
Llama teacher and student built from configs, `shakespeare:train` cut to a few dozen windows. The
producer is killed at moments chosen in turn by: a random delay (mostly mid-forward); the moment a
temporary shard file appears (mid-write); the moment a shard file appears that the manifest does not
list yet (between rename and manifest update); the moment a manifest temporary appears (mid-manifest);
the moment a shard claim appears (a shard just started). Polling for files needs no hooks in the
product. When a cache is complete before enough kills, a new round starts from scratch. Each
round's cache must equal the reference: every shard's bytes and decoded arrays, the manifest's
bytes, `verify` clean, no leftover temporary or claim file. The trainers are killed at random
delays and when a checkpoint temporary appears, and resumed with `--resume`; the final
`model.safetensors` tensors must equal the uninterrupted run's.

The last line is JSON: kills survived per command and mismatches (target 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRODUCE_ARGS = ["--k", "8", "--seq-len", "32", "--rows-per-shard", "4", "--batch-size", "2", "--max-windows", "96",
                "--no-progress"]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def setup(work: Path) -> dict[str, Path]:
    """Tokenizer, teacher and student folders, and a pretraining config, built from configs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from logitcache.data import iter_documents, train_bpe_tokenizer

    texts = []
    for doc in iter_documents("shakespeare:train"):
        texts.append(doc)
        if sum(map(len, texts)) > 200_000:
            break
    tok_dir = work / "tokenizer"
    train_bpe_tokenizer(texts, tok_dir, vocab_size=512)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    folders = {}
    for name, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id, tie_word_embeddings=False, initializer_range=0.1)
        folders[name] = work / name
        LlamaForCausalLM(config).save_pretrained(folders[name], safe_serialization=True)
        tok.save_pretrained(folders[name])
    folders["tokenizer"] = tok_dir
    folders["config"] = work / "student.json"
    folders["config"].write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                             "num_hidden_layers": 2, "num_attention_heads": 4,
                                             "num_key_value_heads": 2, "max_position_embeddings": 128,
                                             "tie_word_embeddings": False}))
    return folders


# -- killing --------------------------------------------------------------------------------------


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _listed(cache: Path) -> set[str]:
    try:
        return {e["name"] for e in json.loads((cache / "manifest.json").read_text())["shards"]}
    except (OSError, ValueError, KeyError):
        return set()


def _entries(folder: Path, prefix: str) -> set[tuple[str, int]]:
    """(name, inode) of the files in `folder` whose name starts with `prefix`."""
    try:
        with os.scandir(folder) as it:
            return {(e.name, e.inode()) for e in it if e.name.startswith(prefix)}
    except FileNotFoundError:
        return set()


def produce_trigger(kind: str, cache: Path, rng: random.Random, span: float):
    """A function polled every millisecond; True means: kill now.

    File triggers fire on a file that was not there when the run started (name and inode), so
    leftovers of the previous kill (which the new run cleans up or takes over) do not count.
    """
    start = time.monotonic()
    if kind == "delay":
        at = rng.uniform(0.3, span)
        return lambda: time.monotonic() - start >= at
    if kind == "renamed-unlisted":
        shards = _entries(cache, "shard-")
        return lambda: bool({n for n, _ in _entries(cache, "shard-") - shards} - _listed(cache))
    prefix = {"tmp-shard": ".shard-", "tmp-manifest": ".manifest.json.tmp-", "claim": ".claim-"}[kind]
    before = _entries(cache, prefix)
    return lambda: bool(_entries(cache, prefix) - before)


def run_and_kill(cmd: list[str], trigger, timeout: float = 300) -> tuple[bool, subprocess.Popen]:
    """Start `cmd`, poll `trigger`, SIGKILL when it fires; (killed, process)."""
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if trigger():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True, proc
        time.sleep(0.001)
    proc.wait()
    return False, proc


# -- comparing ------------------------------------------------------------------------------------


def compare_caches(got: Path, ref: Path) -> list[str]:
    """Every difference between two caches: files, bytes, decoded arrays, verify, leftovers."""
    import numpy as np

    from logitcache.read.reader import CacheReader
    from logitcache.verify import verify_cache

    problems = []
    files = lambda p: {n for n in os.listdir(p) if n != ".lock"}
    if files(got) != files(ref):
        problems.append(f"files differ: {sorted(files(got) ^ files(ref))}")
    for name in sorted(files(ref) & files(got)):
        if (got / name).read_bytes() != (ref / name).read_bytes():
            problems.append(f"{name}: bytes differ")
    problems += [f"verify: {n}: {r}" for n, r in verify_cache(got)]
    if not problems:
        a, b = CacheReader(got), CacheReader(ref)
        for e in b.shards:
            x, y = a.read_shard(e["index"]), b.read_shard(e["index"])
            if any(not np.array_equal(x[k], y[k]) for k in y):
                problems.append(f"{e['name']}: decoded arrays differ")
    return problems


def compare_weights(got: Path, ref: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    if not (got / "model.safetensors").exists():
        return [f"{got}: no model.safetensors"]
    a, b = load_file(str(got / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    if a.keys() != b.keys():
        return ["weight names differ"]
    return [f"{k}: weights differ" for k in b if not torch.equal(a[k], b[k])]


# -- the three jobs -------------------------------------------------------------------------------


def chaos_produce(work: Path, teacher: Path, kills: int, rng: random.Random) -> dict:
    cli = [sys.executable, "-m", "logitcache.cli", "produce", "--teacher", str(teacher), "--data",
           "shakespeare:train", *PRODUCE_ARGS]
    t0 = time.monotonic()
    ref = subprocess.run([*cli, "--out", str(work / "ref")], env=env(), cwd=REPO, capture_output=True, text=True)
    if ref.returncode:
        raise SystemExit(f"reference run failed: {ref.stderr[-2000:]}")
    span = time.monotonic() - t0
    reference = Path(ref.stdout.strip().splitlines()[-1])
    kinds = ["delay", "tmp-shard", "renamed-unlisted", "tmp-manifest", "claim"]
    survived, mismatches, rounds, by_kind, problems = 0, 0, 0, {k: 0 for k in kinds}, []
    while survived < kills:
        rounds += 1
        root = work / f"round{rounds}"
        cache = root / reference.name
        while survived < kills:
            kind = kinds[(survived + rounds) % len(kinds)]
            killed, proc = run_and_kill([*cli, "--out", str(root)], produce_trigger(kind, cache, rng, span))
            if not killed:
                if proc.returncode != 0:
                    problems.append(f"round {rounds}: run failed: {proc.stderr.read()[-500:]}")
                    mismatches += 1
                break                                   # finished before the trigger fired
            survived += 1
            by_kind[kind] += 1
        # finish the round uninterrupted, then compare with the reference
        done = subprocess.run([*cli, "--out", str(root)], env=env(), cwd=REPO, capture_output=True, text=True)
        diff = compare_caches(cache, reference) if done.returncode == 0 else [f"resume failed: {done.stderr[-500:]}"]
        if diff:
            mismatches += 1
            problems += [f"round {rounds}: {d}" for d in diff]
        shutil.rmtree(root, ignore_errors=True)
    return {"kills": survived, "rounds": rounds, "mismatches": mismatches, "kills_by_moment": by_kind,
            "problems": problems[:10], "reference": str(reference)}


def chaos_trainer(work: Path, command: str, args: list[str], kills: int, rng: random.Random) -> dict:
    cli = [sys.executable, "-m", "trainer.cli", command, *args]
    t0 = time.monotonic()
    ref = subprocess.run([*cli, "--out", str(work / f"{command}-ref")], env=env(), cwd=REPO, capture_output=True,
                         text=True)
    if ref.returncode:
        raise SystemExit(f"reference {command} failed: {ref.stderr[-2000:]}")
    span = time.monotonic() - t0
    out = work / f"{command}-killed"
    survived, attempts, finished = 0, 0, False
    by_kind = {"delay": 0, "checkpoint-write": 0}
    while survived < kills and attempts < 4 * kills:
        attempts += 1
        kind = "checkpoint-write" if attempts % 2 == 0 else "delay"
        if kind == "delay":
            start, at = time.monotonic(), rng.uniform(0.3, span)
            trigger = lambda start=start, at=at: time.monotonic() - start >= at
        else:
            trigger = lambda: any(n.startswith((".checkpoint.tmp-", ".checkpoint.old-")) for n in _names(out))
        killed, proc = run_and_kill([*cli, "--out", str(out), "--resume"], trigger)
        if killed:
            survived += 1
            by_kind[kind] += 1
        else:
            finished = proc.returncode == 0
            if finished and survived < kills:    # done before the trigger fired: a new round from scratch,
                shutil.rmtree(out)               # as the producer's rounds do
                finished = False
            elif finished:
                break
    if not finished:
        done = subprocess.run([*cli, "--out", str(out), "--resume"], env=env(), cwd=REPO, capture_output=True,
                              text=True)
        if done.returncode:
            return {"kills": survived, "mismatches": 1, "problems": [done.stderr[-500:]]}
    diff = compare_weights(out, work / f"{command}-ref")
    return {"kills": survived, "mismatches": int(bool(diff)), "kills_by_moment": by_kind, "problems": diff[:10]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="20 producer kills and 3 per trainer command (~2 min)")
    p.add_argument("--kills", type=int, default=40, help="SIGKILLs of the producer (default 40; --quick: 20)")
    p.add_argument("--train-kills", type=int, default=6,
                   help="SIGKILLs of each of trainer pretrain and distill (default 6; --quick: 3)")
    p.add_argument("--no-train", action="store_true", help="only the producer")
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill delays (default 0)")
    p.add_argument("--work", type=Path, default=None, help="folder for everything (default: a temporary one)")
    args = p.parse_args(argv)
    if args.quick:
        args.kills, args.train_kills = min(args.kills, 20), min(args.train_kills, 3)
    os.environ.setdefault("LOGITCACHE_HOME", str(REPO / "data" / "home"))
    rng = random.Random(args.seed)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="chaos-")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    folders = setup(args.work)
    result = {"produce": chaos_produce(args.work, folders["teacher"], args.kills, rng)}
    print(f"produce: {result['produce']['kills']} kills survived in {result['produce']['rounds']} rounds, "
          f"{result['produce']['mismatches']} mismatches {result['produce']['kills_by_moment']}", file=sys.stderr)
    if not args.no_train:
        common = ["--steps", "24", "--batch-size", "4", "--lr", "3e-3", "--warmup", "2", "--save-every", "2",
                  "--log-every", "4", "--seed", "0", "--no-progress"]
        cache = result["produce"]["reference"]
        result["pretrain"] = chaos_trainer(args.work, "pretrain", [
            "--model", str(folders["config"]), "--tokenizer", str(folders["tokenizer"]), "--data", "shakespeare:train",
            "--seq-len", "32", "--max-windows", "96", "--work", str(args.work / "windows"), *common],
            args.train_kills, rng)
        result["distill"] = chaos_trainer(args.work, "distill", [
            "--student", str(folders["student"]), "--cache", cache, "--alpha-ce", "0.5", *common],
            args.train_kills, rng)
        for c in ("pretrain", "distill"):
            print(f"{c}: {result[c]['kills']} kills survived, {result[c]['mismatches']} mismatches", file=sys.stderr)
    for name, r in result.items():
        for problem in r.get("problems", []):
            print(f"{name}: {problem}", file=sys.stderr)
    kills = sum(r["kills"] for r in result.values())
    mismatches = sum(r["mismatches"] for r in result.values())
    summary = {"kills_survived": kills, "mismatches": mismatches, "target_mismatches": 0,
               "produce_kills": result["produce"]["kills"], "target_produce_kills": args.kills,
               "produce_kills_by_moment": result["produce"]["kills_by_moment"],
               **{f"{c}_kills": result[c]["kills"] for c in ("pretrain", "distill") if c in result},
               "seconds": round(time.monotonic() - t0, 1)}
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(summary))
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
