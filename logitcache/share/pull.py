"""Download a cache from a URL: validated like a local read, every shard hashed, the manifest written last."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from logitcache import format as fmt
from logitcache.errors import UserError
from logitcache.format.atomic import atomic_write, sha256_file
from logitcache.format.manifest import Manifest
from logitcache.read.reader import RemoteCacheReader
from logitcache.read.urls import CHUNK
from logitcache.share.push import TMP_RE, ProgressHook
from logitcache.verify import verify_cache

# -- pull --------------------------------------------------------------------------------------


def pull(url: str, dest: str | os.PathLike, *, storage_options: dict | None = None, progress: bool = True,
         on_file: ProgressHook | None = None) -> dict:
    """Download the cache at `url` into the folder `dest` (see the module doc); returns counts."""
    from tqdm import tqdm

    remote = RemoteCacheReader(url, storage_options=storage_options, readahead=0)
    m, raw = remote.manifest, remote.manifest_bytes
    dest = Path(dest)
    if (dest / fmt.MANIFEST_NAME).exists() or (dest / fmt.MANIFEST_NAME).is_symlink():
        mine = Manifest.load(dest)
        if mine.key != m.key:
            raise UserError(f"{dest}: holds a cache with key {mine.key[:16]}, not {m.key[:16]}; "
                            "pull into another folder")
    elif dest.exists() and not dest.is_dir():
        raise UserError(f"{dest}: exists and is not a folder")
    dest.mkdir(parents=True, exist_ok=True)
    for p in dest.iterdir():
        if TMP_RE.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()
    counts = {"downloaded": 0, "skipped": 0, "bytes_downloaded": 0}
    bar = tqdm(total=remote.num_bytes, unit="B", unit_scale=True, desc=f"pull {dest.name}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    try:
        for e in remote.shards:
            final = fmt.shard_path(dest, e)
            if final.is_file() and final.stat().st_size == e.bytes and sha256_file(final) == e.sha256:
                counts["skipped"] += 1
                status = "skipped"
            else:
                _download_verified(remote, e, final)
                counts["downloaded"] += 1
                counts["bytes_downloaded"] += e.bytes
                status = "downloaded"
            bar.update(e.bytes)
            if on_file is not None:
                on_file(e.name, status)
    finally:
        bar.close()
    with atomic_write(dest / fmt.MANIFEST_NAME) as f:     # last: the folder is now a cache
        f.write(raw)
    problems = verify_cache(dest)
    if problems:
        name, reason = problems[0]
        raise UserError(f"{dest / name}: {reason} (after pulling {url})")
    return dict(counts, shards=len(remote.shards), dest=str(dest))


def _download_verified(remote: "RemoteCacheReader", e: dict, final: Path) -> None:
    h, n = hashlib.sha256(), 0
    with remote.fs.open(remote.remote_path(e), "rb", block_size=CHUNK) as src, atomic_write(final) as out:
        while n <= e.bytes and (chunk := src.read(min(CHUNK, e.bytes + 1 - n))):
            h.update(chunk)
            out.write(chunk)
            n += len(chunk)
        remote.check_bytes(e, n, h.hexdigest())     # raising here removes the temporary file
