"""Download a cache from a URL into a local folder, verifying every shard.

    logitcache pull s3://bucket/caches/Qwen2.5-3B-k64-<key> caches/Qwen2.5-3B-k64-<key>
    logitcache pull hf://datasets/me/qwen3b-k64 caches/qwen3b-k64

The remote manifest is validated exactly as a local one (shard names, plan, sizes). Shards already in
DIR with the right size and sha256 are skipped, so an interrupted pull resumes. Each download is
hashed as it arrives and refused, with one line naming the shard, if it differs from the manifest;
the manifest is written last and the whole folder is verified before success is reported.
"""

from __future__ import annotations

import argparse

from logitcache.commands.push import add_storage_arguments, storage_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", help="cache folder URL: s3://bucket/prefix, hf://datasets/user/repo, "
                                              "file:///abs/path, ...")
    p.add_argument("dir", metavar="DIR", help="local folder to hold the cache (created if needed)")
    add_storage_arguments(p)


def run(args: argparse.Namespace) -> int:
    from logitcache.share.pull import pull

    r = pull(args.url, args.dir, storage_options=storage_options(args, args.url), progress=not args.no_progress)
    print(f"pulled {r['shards']} shards into {r['dest']}: {r['downloaded']} downloaded "
          f"({r['bytes_downloaded']} bytes), {r['skipped']} already there; verified")
    return 0
