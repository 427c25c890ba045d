"""The same teacher outputs in DistillKit's, axolotl's and our layouts: bytes per token and the KL each
decoded distribution keeps from the exact one.

    python scripts/interop_sizes.py --quick        # 96 windows of 256 tokens (~1 min on one core)
    python scripts/interop_sizes.py                # 384 windows (the figures in docs/encodings.md)
    python scripts/interop_sizes.py --distillkit-src ~/src/DistillKit   # adds DistillKit's own encoder

The demo teacher (assets/demo-teacher, a 7.4M Llama, vocabulary 8192) is cached exactly over windows of
`shakespeare:heldout` (`logitcache produce --encoding fp32`, top-64). That cache is then written as:
DistillKit's recommended configuration cut to k = 64 (exact_k 16 in bf16, terms 0-4 + sqrt in fp32) and
its budget configuration (k = 50, exact_k 1, terms 0, 1, sqrt), by `logitcache export --to distillkit`;
axolotl's KD layout (`logitcache export --to axolotl`, exact fp32 log-probs); and our caches: `compact`
(the default) and `fp16` (plain int32 ids + fp16 log-probs), by `logitcache produce` again over the same
windows. Each dataset is imported back (`logitcache import ... --encoding fp32`, which computes the tail
where the layout keeps none) or read as it is, and compared position by position with the exact cache:
KL(exact || decoded) over the decoded k + 1 buckets (the exact top-64 + tail is coarse-grained to the
decoded ids + the rest), in float64. Bytes per token are whole files (every column, input ids included)
over the stored positions. With --distillkit-src, DistillKit's own compressor (its float32 fit) encodes the
same top-k too, and our importer decodes its bytes. Every step is a command printed before it runs;
rerunning skips finished steps. The last line is JSON with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "assets" / "demo-teacher"
K, SEQ_LEN = 64, 256


def run(cmd: list) -> None:
    print("$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")     # one core: the machine is shared
    if subprocess.run([str(c) for c in cmd], env=env).returncode != 0:
        sys.exit(f"interop_sizes: step failed: {' '.join(str(c) for c in cmd[:5])}")


def logitcache(*args) -> list:
    return [sys.executable, "-m", "logitcache.cli", *args, "--no-progress"]


def produce(work: Path, windows: int, encoding: str) -> Path:
    root = work / f"caches-{encoding}"
    found = [p.parent for p in root.glob("*/manifest.json")]
    if not found:
        run(logitcache("produce", "--teacher", TEACHER, "--data", "shakespeare:heldout", "--out", root, "--k", K,
                       "--seq-len", SEQ_LEN, "--max-windows", windows, "--encoding", encoding, "--dtype", "float32"))
        found = [p.parent for p in root.glob("*/manifest.json")]
    return found[0]


def exported(cache: Path, out: Path, *args) -> Path:
    if not out.exists():
        run(logitcache("export", *args, cache, out))
    return out


def imported(src: Path, out: Path, *args) -> Path:
    if not out.exists():
        run(logitcache("import", *args, src, out, "--encoding", "fp32"))
    return out


def kl_to_exact(exact: Path, decoded: Path, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """KL(exact || decoded) per position over the decoded ids + the rest (module docstring), and whether the
    decoded tail sits at the floor (a position the import scaled down to fit)."""
    from logitcache import CacheReader
    from logitcache.backends.vllm import TAIL_FLOOR

    out, floored = [], []
    for a, b in zip(CacheReader(exact).iter_arrays(batch), CacheReader(decoded).iter_arrays(batch)):
        assert np.array_equal(a["input_ids"], b["input_ids"]), "the two caches hold other windows"
        p_top = np.exp(a["topk_logprobs"].astype(np.float64))                    # [B, T, 64]
        ids = b["topk_ids"]                                                      # [B, T, k']
        match = ids[..., :, None] == a["topk_ids"][..., None, :]                 # [B, T, k', 64]
        P = np.where(match, p_top[..., None, :], 0.0).sum(-1)                    # exact mass of each decoded id
        P = np.concatenate([P, np.maximum(1.0 - P.sum(-1), 0.0)[..., None]], -1)
        Q = np.concatenate([np.exp(b["topk_logprobs"].astype(np.float64)),
                            np.exp(b["tail_logmass"].astype(np.float64))[..., None]], -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(P > 0, P * (np.log(P) - np.log(Q)), 0.0)
        out.append(terms.sum(-1).reshape(-1))
        floored.append((b["tail_logmass"] <= np.log(TAIL_FLOOR) + 1e-3).reshape(-1))
    return np.concatenate(out), np.concatenate(floored)


def file_bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def cache_bytes(cache: Path) -> tuple[int, int]:
    m = json.loads((cache / "manifest.json").read_text())
    return sum(e["bytes"] for e in m["shards"]), sum(e["tokens"] for e in m["shards"])


def their_encoder(exact: Path, out: Path, preset: str, src: Path) -> Path:
    """A DistillKit dataset whose log-prob bytes DistillKit's own compressor wrote (ids and the rest of the
    row as `export --to distillkit` writes them, which DistillKit's packer matches bit for bit)."""
    if out.exists():
        return out
    sys.path.insert(0, str(src))
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import yaml
    from distillkit.compression import DistributionQuantizationConfig, LogprobCompressor

    from logitcache import CacheReader
    from logitcache.interop.distillkit_config import load_config
    from logitcache.interop.distillkit_export import distillkit_rows

    cfg_text = (exported(exact, out.parent / f"ours-{preset}", "--to", "distillkit", "--config", preset)
                / "compression_config.yaml").read_text()
    cfg = load_config(cfg_text, "compression_config.yaml")
    compressor = LogprobCompressor(config=DistributionQuantizationConfig.model_validate(yaml.safe_load(cfg_text)))
    print(f"# DistillKit's compressor ({src}) encodes the exact top-{cfg.k}", flush=True)
    tmp = out.parent / f".{out.name}.tmp"
    tmp.mkdir(exist_ok=True)
    for i, batch in enumerate(CacheReader(exact).iter_arrays(256)):
        table = distillkit_rows(batch, cfg)
        ids = torch.as_tensor(batch["topk_ids"][..., :cfg.k].astype(np.int64))
        coded = compressor.compress_from_sparse(ids, torch.as_tensor(batch["topk_logprobs"][..., :cfg.k]))
        theirs = coded["compressed_logprobs"].numpy()                           # [B, T, bytes]
        B, T, L = theirs.shape
        full = np.zeros((B, T + 1, L), dtype=np.uint8)                          # + the empty last position
        full[:, :T] = theirs
        inner = pa.ListArray.from_arrays(pa.array(np.arange(B * (T + 1) + 1, dtype=np.int32) * L),
                                         pa.array(full.reshape(-1), pa.uint8()))
        column = pa.ListArray.from_arrays(pa.array(np.arange(B + 1, dtype=np.int32) * (T + 1)), inner)
        table = table.set_column(table.schema.get_field_index("compressed_logprobs"), "compressed_logprobs", column)
        pq.write_table(table, tmp / f"data_{i}.parquet")
    (tmp / "compression_config.yaml").write_text(cfg_text)
    tmp.rename(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="96 windows instead of 384")
    p.add_argument("--windows", type=int, default=None, help="windows of 256 tokens to cache (default 384)")
    p.add_argument("--work", type=Path, default=ROOT / "work_dir" / "interop-sizes", help="working folder")
    p.add_argument("--distillkit-src", type=Path, default=None,
                   help="a DistillKit checkout: also encode with its own compressor (needs its dependencies)")
    args = p.parse_args()
    windows = args.windows or (96 if args.quick else 384)
    work = args.work / f"w{windows}"
    work.mkdir(parents=True, exist_ok=True)

    exact = produce(work, windows, "fp32")
    rows = {}

    def add(name: str, k: int, size: int, positions: int, decoded: Path, note: str = "") -> None:
        kl, floored = kl_to_exact(exact, decoded)
        rows[name] = {"k": k, "bytes_per_token": size / positions, "mean_kl": float(kl.mean()),
                      "max_kl": float(kl.max()), "floored": float(floored.mean()), "note": note}
        if floored.any() and "DistillKit" in name:
            rows[name]["mean_kl_elsewhere"] = float(kl[~floored].mean())
            rows[name]["max_kl_elsewhere"] = float(kl[~floored].max())
            rows[name]["note"] += (f"; elsewhere mean {kl[~floored].mean():.2e}, max {kl[~floored].max():.2e}")

    for enc in ("fp32", "compact", "fp16"):
        cache = produce(work, windows, enc) if enc != "fp32" else exact
        size, positions = cache_bytes(cache)
        add(f"logitcache {enc}", K, size, positions, cache)
    positions = cache_bytes(exact)[1]
    ax = exported(exact, work / "axolotl", "--to", "axolotl")
    add("axolotl (exact fp32 log-probs, no tail)", K, file_bytes([ax / "train.parquet"]), positions,
        imported(ax, work / "axolotl-back", "--from", "axolotl", "--tokenizer", TEACHER))
    sets = [("recommended", "ours")] + [("budget", "ours")]
    if args.distillkit_src is not None:
        sets += [("recommended", "theirs"), ("budget", "theirs")]
    for preset, encoder in sets:
        dk = (exported(exact, work / f"ours-{preset}", "--to", "distillkit", "--config", preset) if encoder == "ours"
              else their_encoder(exact, work / f"theirs-{preset}", preset, args.distillkit_src))
        back = imported(dk, work / f"{encoder}-{preset}-back", "--from", "distillkit", "--tokenizer", TEACHER)
        m = json.loads((back / "manifest.json").read_text())
        over = m["producer"]["source"]["rows"]["renormalised"] / positions
        k = m["k"]
        add(f"DistillKit {preset} k={k} ({encoder} encoder)", k, file_bytes(dk.glob("data_*.parquet")), positions,
            back, f"{100 * over:.2f}% of positions decode to a mass > 1 (scaled down, tail at the floor)"
            if over else "")

    print(f"\n{windows} windows x {SEQ_LEN} positions of shakespeare:heldout, demo teacher, exact top-{K} as reference")
    print("| layout | k | B/token (files) | mean KL | max KL | note |")
    print("|---|---|---|---|---|---|")
    def kl(x: float) -> str:      # float32 rounding of the exact tail makes exact layouts read +-1e-7
        return "~0 (< 1e-6)" if abs(x) < 1e-6 else f"{x:.2e}"

    for name, r in rows.items():
        print(f"| {name} | {r['k']} | {r['bytes_per_token']:.1f} | {kl(r['mean_kl'])} | {kl(r['max_kl'])} | "
              f"{r['note']} |")
    print(json.dumps({"windows": windows, "positions": positions, "rows": rows}))


if __name__ == "__main__":
    main()
