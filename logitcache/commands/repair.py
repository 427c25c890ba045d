"""Put a damaged cache back on the path to intact: verify it, move bad shards aside into
CACHE/.quarantine/, drop them from the manifest (atomically, under the cache's lock), and print the
`logitcache produce` command that re-creates exactly them.

    logitcache repair caches/llama-k64-0123456789abcdef
    logitcache produce ...            # the printed command: writes only the dropped shards

Good shards are not touched (their files and modification times stay as they are). A manifest that
no longer parses, or whose own checksum fails, cannot say which shards are good: repair then
changes nothing and says so in one line (exit 2).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from logitcache import format as fmt
from logitcache.errors import UserError
from logitcache.format.manifest import Manifest

QUARANTINE = ".quarantine"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="cache folder (the one holding manifest.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="only report what would be quarantined and the produce command; change nothing")


def produce_command(cache_dir: Path, manifest: Manifest) -> list[str]:
    """The `logitcache produce` arguments whose cache key is this manifest's key.

    Everything the key depends on is in the manifest: the teacher (name, revision, dtype), the data
    (source, text column, seq_len, number of windows), k and the encoding's user parameters (the
    fitted ones, such as compact's rank table, are fitted again from the same windows).
    """
    from logitcache.encodings import get_encoding

    t, d, enc = manifest.teacher, manifest.data, manifest.encoding
    cmd = ["logitcache", "produce", "--teacher", str(t.name_or_path), "--data", str(d.source),
           "--out", str(cache_dir.parent), "--k", str(manifest.k), "--seq-len", str(d.seq_len),
           "--rows-per-shard", str(manifest.rows_per_shard), "--max-windows", str(d.num_windows)]
    if t.revision:
        cmd += ["--revision", str(t.revision)]
    if t.dtype:
        cmd += ["--dtype", str(t.dtype)]
    if (d.text_column or "text") != "text":
        cmd += ["--text-column", str(d.text_column)]
    cmd += ["--encoding", enc.name]
    try:
        defaults = get_encoding(enc.name, {}).params()
    except Exception:   # an encoding this version cannot build without its parameters
        defaults = {}
    for key in sorted(enc.params):
        if key in ("vocab_size", "rank_table") or defaults.get(key) == enc.params[key]:
            continue                       # fitted from the windows, or the default
        cmd += ["--encoding-param", f"{key}={enc.params[key]}"]
    if manifest.producer.backend in ("hf", "vllm"):
        cmd += ["--backend", manifest.producer.backend]
    return cmd


def _bad_shards(cache_dir: Path, manifest: Manifest) -> dict[str, str]:
    """Shard name -> reason, for every listed shard that verify (or the plan) finds wrong."""
    from logitcache.verify import verify_cache

    bad: dict[str, str] = {}
    listed = {e.name for e in manifest.shards}
    for name, reason in verify_cache(cache_dir):
        if name in listed:
            bad.setdefault(name, reason)
        elif name == fmt.MANIFEST_NAME:
            # entry-level problems name their shard first ("shard-00003.parquet: rows ..."); the
            # `complete` flag is recomputed below; anything else means the manifest is wrong
            found = re.match(r"(shard-\d{5,9}\.parquet): (.*)", reason)
            if found and found.group(1) in listed:
                bad.setdefault(found.group(1), found.group(2))
            elif not reason.startswith("marked complete"):
                raise UserError(f"{cache_dir / fmt.MANIFEST_NAME}: {reason}; repair changes nothing: move the "
                                "folder aside and run the same produce command again")
    return bad


def _quarantine(cache_dir: Path, name: str) -> Path | None:
    """Move a shard (or a symbolic link named like one, never followed) into .quarantine/."""
    src = cache_dir / name
    if not os.path.lexists(src):
        return None
    qdir = cache_dir / QUARANTINE
    qdir.mkdir(exist_ok=True)
    n = 0
    while os.path.lexists(qdir / f"{name}.{n}"):
        n += 1
    dst = qdir / f"{name}.{n}"
    os.rename(src, dst)                   # same folder tree: atomic, and a link moves as a link
    return dst


def repair_cache(cache_dir: str | os.PathLike, dry_run: bool = False) -> tuple[dict[str, str], list[str]]:
    """Quarantine and unlist the bad shards; return ({name: reason}, produce command)."""
    from logitcache.format.lock import manifest_lock

    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise UserError(f"{cache_dir}: no such cache folder")
    mpath = cache_dir / fmt.MANIFEST_NAME
    try:
        manifest = Manifest.load(cache_dir)
    except UserError as exc:
        raise UserError(f"{exc}; the manifest is corrupt beyond repair: move {cache_dir} aside and run the "
                        "same produce command again") from None
    sealed = fmt.manifest_checksum_problem(cache_dir)
    if sealed:
        raise UserError(f"{mpath}: {sealed}; its shard list cannot be trusted, so repair changes nothing: "
                        f"move {cache_dir} aside and run the same produce command again")
    bad = _bad_shards(cache_dir, manifest)
    command = produce_command(cache_dir.resolve(), manifest)
    if dry_run:
        return bad, command
    with manifest_lock(cache_dir):
        current = Manifest.load(cache_dir)
        if current.key != manifest.key:
            raise UserError(f"{mpath}: the cache changed while it was being checked; run repair again")
        repaired = replace(current, shards=tuple(e for e in current.shards if e.name not in bad)).with_completeness()
        if repaired != current:
            # unlist first: a crash between the two steps leaves an unlisted file, which produce overwrites
            repaired.write(cache_dir)
        for name in sorted(bad):
            _quarantine(cache_dir, name)
    return bad, command


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    bad, command = repair_cache(path, dry_run=args.dry_run)
    if not bad:
        print(f"ok: nothing to repair in {path}")
        return 0
    verb = "would quarantine" if args.dry_run else "quarantined"
    for name, reason in sorted(bad.items()):
        print(f"{verb} {path / name}: {reason}")
    print(f"{len(bad)} shard{'s' if len(bad) != 1 else ''} {'would be ' if args.dry_run else ''}dropped from the "
          f"manifest; re-create {'them' if len(bad) != 1 else 'it'} with:", file=sys.stderr)
    print(shlex.join(command))
    return 0
