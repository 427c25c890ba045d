"""Upload a local cache to a URL: resumable, every shard re-hashed before and after, the manifest last."""

from __future__ import annotations

import os
import re
import secrets
import sys
from pathlib import Path
from typing import Callable

from logitcache import format as fmt
from logitcache.errors import UserError
from logitcache.format.atomic import sha256_file
from logitcache.format.manifest import Manifest
from logitcache.read.reader import CacheReader
from logitcache.read.urls import (
    MAX_MANIFEST_BYTES,
    atomic_renames,
    filesystem,
    list_folder,
    read_limited,
    remote_digest,
    suppress_missing,
)
from logitcache.share.card import CARD_NAME, dataset_card

TMP_RE = re.compile(r"^\.(shard-\d{5,9}\.parquet|manifest\.json|README\.md)\.tmp-[0-9a-f-]+$")


ProgressHook = Callable[[str, str], None]   # (file name, "uploaded" | "skipped" | "downloaded")


def push(cache: str | os.PathLike, url: str, *, storage_options: dict | None = None, card: bool = True,
         progress: bool = True, on_file: ProgressHook | None = None) -> dict:
    """Upload a local cache to `url` (see the module doc); returns counts of what was done."""
    from tqdm import tqdm

    cache = Path(cache)
    reader = CacheReader(cache)             # the local cache is validated like any read
    m = reader.manifest
    raw = (cache / fmt.MANIFEST_NAME).read_bytes()
    if Manifest.parse(raw, cache / fmt.MANIFEST_NAME) != m:
        raise UserError(f"{cache / fmt.MANIFEST_NAME}: changed while pushing; try again")
    fs, root = filesystem(url, storage_options)
    remote = read_limited(fs, f"{root}/{fmt.MANIFEST_NAME}", MAX_MANIFEST_BYTES, f"{url}/{fmt.MANIFEST_NAME}")
    if remote is not None:
        other = Manifest.parse(remote, f"{url}/{fmt.MANIFEST_NAME}")
        if other.key != m.key:
            raise UserError(f"{url}: holds a cache with key {other.key[:16]}, not {m.key[:16]}; "
                            "push to another URL")
    fs.makedirs(root, exist_ok=True)
    listing = list_folder(fs, root)
    for name in listing:
        if TMP_RE.match(name):   # left by an interrupted push
            with suppress_missing():
                fs.rm_file(f"{root}/{name}")
    counts = {"uploaded": 0, "skipped": 0, "bytes_uploaded": 0}
    bar = tqdm(total=reader.num_bytes, unit="B", unit_scale=True, desc=f"push {cache.name}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    try:
        for e in reader.shards:
            local = fmt.shard_path(cache, e)
            if os.path.getsize(local) != e.bytes or sha256_file(local) != e.sha256:
                raise UserError(f"{local}: does not match its manifest (size or sha256); "
                                f"run `logitcache verify {cache}` and re-produce it before pushing")
            target = f"{root}/{e.name}"
            info = listing.get(e.name)
            if info is not None and info.get("size") == e.bytes and \
                    remote_digest(fs, target, e.bytes) == (e.bytes, e.sha256):
                counts["skipped"] += 1
                status = "skipped"
            else:
                _upload_verified(fs, str(local), target, e.bytes, e.sha256, url)
                counts["uploaded"] += 1
                counts["bytes_uploaded"] += e.bytes
                status = "uploaded"
            bar.update(e.bytes)
            if on_file is not None:
                on_file(e.name, status)
        if card:
            text = dataset_card(m, f"{m.teacher.name_or_path} top-{m.k} logit cache").encode()
            _upload_bytes(fs, text, f"{root}/{CARD_NAME}", url)
        _upload_bytes(fs, raw, f"{root}/{fmt.MANIFEST_NAME}", url)     # last: the push is now visible
    finally:
        bar.close()
    return dict(counts, shards=len(reader.shards), url=url)


def _tmp_name(target: str) -> str:
    folder, name = target.rsplit("/", 1)
    return f"{folder}/.{name}.tmp-{os.getpid():x}-{secrets.token_hex(4)}"


def _upload_verified(fs, local: str, target: str, size: int, digest: str, url: str) -> None:
    """Upload, re-hash the uploaded bytes, then move into place (or upload in place on the Hub)."""
    where = target if atomic_renames(fs) else None
    tmp = _tmp_name(target) if where else target
    try:
        fs.put_file(local, tmp)
        fs.invalidate_cache(tmp)
        got = remote_digest(fs, tmp, size)
        if got != (size, digest):
            raise UserError(f"{url}/{target.rsplit('/', 1)[-1]}: uploaded copy differs from the local shard "
                            f"({got[0]} bytes, sha256 {got[1][:16]}...); push again")
        if where:
            fs.mv(tmp, target)
    except BaseException:
        if where:
            with suppress_missing():
                fs.rm_file(tmp)
        raise


def _upload_bytes(fs, data: bytes, target: str, url: str) -> None:
    tmp = _tmp_name(target) if atomic_renames(fs) else target
    try:
        fs.pipe_file(tmp, data)
        if tmp != target:
            fs.mv(tmp, target)
    except BaseException:
        if tmp != target:
            with suppress_missing():
                fs.rm_file(tmp)
        raise
    fs.invalidate_cache(target)
