"""Check a cache against its manifest: every listed shard's sha256 (recomputed), size, row count
and columns, and the manifest itself.

Prints `ok: N shards` and exits 0 when everything matches; otherwise prints one line per problem,
`PATH/shard-NNNNN.parquet: reason` (or `PATH/manifest.json: reason`), and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from logitcache.format.manifest import Manifest
from logitcache.verify import verify_cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="cache folder (the one holding manifest.json)")


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    problems = verify_cache(path)
    if problems:
        for name, reason in problems:
            print(f"{path / name}: {reason}")
        bad = len({name for name, _ in problems})
        print(f"verify: {bad} bad file{'s' if bad != 1 else ''} in {path}", file=sys.stderr)
        return 1
    shards = len(Manifest.load(path).shards)
    print(f"ok: {shards} shards")
    return 0
