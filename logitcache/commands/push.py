"""Upload a cache to a URL: resumable, verified, manifest last.

    logitcache push caches/Qwen2.5-3B-k64-<key> s3://bucket/caches/Qwen2.5-3B-k64-<key>
    logitcache push caches/Qwen2.5-3B-k64-<key> s3://bucket/c --endpoint-url http://127.0.0.1:9000
    logitcache push caches/Qwen2.5-3B-k64-<key> hf://datasets/me/qwen3b-k64   # after `hf auth login`

Each local shard is re-hashed against the manifest first; shards already on the remote side with the
right size and sha256 are skipped, so an interrupted push resumes where it stopped. Others are
uploaded under a temporary name, re-hashed there and moved into place (on the Hub each upload is an
atomic commit). A dataset card (README.md, readable by `datasets.load_dataset`) and then the manifest
are written last, so a half-pushed cache never looks complete.
"""

from __future__ import annotations

import argparse
import json

from logitcache.errors import UserError


def add_storage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", default=None, metavar="URL",
                   help="S3-compatible server for s3:// URLs (MinIO, moto, ...); default: AWS or the "
                        "AWS_ENDPOINT_URL environment variable")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an fsspec option for the URL's file system, repeatable; VALUE is read as JSON if it "
                        "parses, e.g. anon=true or client_kwargs='{\"region_name\": \"eu-west-1\"}'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def storage_options(args: argparse.Namespace, url: str) -> dict:
    from logitcache.read.urls import storage_options_for

    options = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--storage-option {item!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return storage_options_for(url, args.endpoint_url, options)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", metavar="CACHE", help="local cache folder (the one holding manifest.json)")
    p.add_argument("url", metavar="URL", help="destination folder URL: s3://bucket/prefix, "
                                              "hf://datasets/user/repo[/folder], file:///abs/path, ...")
    p.add_argument("--no-card", action="store_true",
                   help="do not write the README.md dataset card next to the shards")
    add_storage_arguments(p)


def run(args: argparse.Namespace) -> int:
    from logitcache.share.push import push

    r = push(args.cache, args.url, storage_options=storage_options(args, args.url), card=not args.no_card,
             progress=not args.no_progress)
    print(f"pushed {r['shards']} shards to {r['url']}: {r['uploaded']} uploaded "
          f"({r['bytes_uploaded']} bytes), {r['skipped']} already there")
    return 0
