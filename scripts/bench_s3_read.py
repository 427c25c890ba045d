"""Reading a cache over S3 against reading it from local disk: tokens/s through `CacheReader`.

    python scripts/bench_s3_read.py --quick               # < 1 min: 128 windows x 256 positions
    python scripts/bench_s3_read.py --cache caches/X      # any existing cache

The S3 side is a real S3-compatible server on loopback: moto in server mode, started as a separate
process (so its HTTP handling does not share this process's GIL with decoding), reached by s3fs
over HTTP. The cache is pushed with `logitcache push`, then read end to end (fetch, sha256 check,
Parquet + encoding decode to numpy) with `CacheReader.open(s3://..., readahead=2)`; the local read
is `CacheReader(path)` over the same bytes, warm in the page cache. Each side is read `--repeats`
times, alternating, and the best pass of each is kept (the least disturbed by other load).

Target: S3 at >= 0.5 of local. With read-ahead, fetching shard i+1 overlaps decoding shard i, so
the streamed rate is min(decode, fetch) less the hashing and copying of the fetched bytes; on
loopback fetch is far faster than decode, so anything under half of local would mean the read-ahead
is not overlapping. Over a real network the same holds while the link delivers more than
bytes/token x decode tokens/s (see docs/scaling.md).

By default the cache is a random Llama teacher's top-64 (vocab 8192, compact encoding) over
Zipf-distributed windows, built by scripts/bench_trainer.py's `make_cache`. The last line of
output is JSON with the figures and the target.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from logitcache.read.reader import CacheReader  # noqa: E402
from logitcache.share.push import push  # noqa: E402

TARGET = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, dict]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("moto server did not start (pip install 'moto[server]')") from None
            time.sleep(0.2)
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench",
               "client_kwargs": {"region_name": "us-east-1"}}
    return proc, options


def make_bucket(options: dict) -> str:
    import boto3

    name = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id=options["key"],
                 aws_secret_access_key=options["secret"], region_name="us-east-1").create_bucket(Bucket=name)
    return name


def read_all(reader: CacheReader, batch: int) -> tuple[float, int]:
    """Seconds to stream every window as numpy, and the number of tokens read."""
    t0 = time.perf_counter()
    tokens = 0
    for a in reader.iter_arrays(batch):
        tokens += a["target_logprob"].size
    return time.perf_counter() - t0, tokens


def build_cache(path: Path, quick: bool) -> CacheReader:
    from bench_trainer import llama, make_cache

    n_windows, seq_len, vocab = (128, 256, 8192) if quick else (512, 256, 8192)
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    windows = rng.choice(vocab, size=(n_windows, seq_len + 1), p=p / p.sum()).astype(np.int32)
    teacher = llama(vocab, 64, 1, 4, 128, seq_len, seed=1)
    return make_cache(path, windows, teacher, 64, "compact", rows_per_shard=32 if quick else 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small cache, under a minute on 2 CPU cores")
    ap.add_argument("--cache", type=Path, default=None, help="bench this existing cache instead of building one")
    ap.add_argument("--batch-size", type=int, default=32, help="windows per batch read (default %(default)s)")
    ap.add_argument("--readahead", type=int, default=2, help="shards fetched ahead over S3 (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=None, help="passes per side (default 2 with --quick, else 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 4)
    with tempfile.TemporaryDirectory(prefix="bench_s3_") as tmp:
        t0 = time.perf_counter()
        local = CacheReader(args.cache) if args.cache else build_cache(Path(tmp) / "cache", args.quick)
        print(f"cache: {local.num_windows} windows x {local.seq_len}, k={local.k}, {local.encoding.name}, "
              f"{len(local.shards)} shards, {local.num_bytes / 1e6:.1f} MB, "
              f"{local.num_bytes / local.num_tokens:.1f} B/token ({time.perf_counter() - t0:.1f}s)", flush=True)
        proc, options = start_moto()
        try:
            url = f"s3://{make_bucket(options)}/cache"
            t0 = time.perf_counter()
            push(local.path, url, storage_options=options, progress=False)
            push_s = time.perf_counter() - t0
            remote = CacheReader.open(url, storage_options=options, readahead=args.readahead)
            t0 = time.perf_counter()
            for e in remote.shards:
                remote.fetch(e)
            fetch_s = time.perf_counter() - t0
            best = {"local": float("inf"), "s3": float("inf")}
            tokens = 0
            for r in range(repeats):
                for name, reader in (("local", local), ("s3", remote)):
                    s, tokens = read_all(reader, args.batch_size)
                    best[name] = min(best[name], s)
                    print(f"pass {r}: {name:5s} {tokens / s:12,.0f} tok/s  ({s:.2f}s)", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    mb = local.num_bytes / 1e6
    out = {"local_tok_s": round(tokens / best["local"]), "s3_tok_s": round(tokens / best["s3"]),
           "ratio": round(best["local"] / best["s3"], 3), "target": TARGET,
           "s3_fetch_MB_s": round(mb / fetch_s, 1), "push_MB_s": round(mb / push_s, 1),
           "local_read_MB_s": round(mb / best["local"], 1), "bytes_per_token": round(local.num_bytes / tokens, 1),
           "tokens": tokens, "readahead": args.readahead}
    out["pass"] = out["ratio"] >= TARGET
    print(f"S3/local read throughput: {out['ratio']:.2f} (target >= {TARGET}); fetch alone "
          f"{out['s3_fetch_MB_s']} MB/s, push {out['push_MB_s']} MB/s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
