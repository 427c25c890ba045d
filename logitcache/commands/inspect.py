"""Summarise a cache: teacher, k, encoding, windows, bytes per token, and how peaked the teacher is.

Sizes cover every listed shard. The top-k mass, tail mass, teacher NLL and the entropy lower bound
(the entropy of the (k+1)-way top-k + tail distribution, which can only be lower than the teacher's
true entropy) are means over the positions of at most --sample-windows windows spread evenly over
the shards.
"""

from __future__ import annotations

import argparse
import json

from logitcache.read.summary import inspect_cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="cache folder (the one holding manifest.json)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of a table (with the encoding's full parameters)")
    parser.add_argument("--sample-windows", type=int, default=1024, metavar="N",
                        help="windows read for the distribution statistics (default: 1024; 0 = none)")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True) if value else "-"
    return str(value)


def _nats(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f} nats"


def run(args: argparse.Namespace) -> int:
    if args.sample_windows < 0:
        from logitcache.errors import UserError
        raise UserError(f"--sample-windows must be >= 0, not {args.sample_windows}")
    info = inspect_cache(args.path, sample_windows=args.sample_windows)
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    rows = [
        ("cache", info["path"]),
        ("key", info["key"][:16]),
        ("teacher", f"{_fmt(info['teacher'])} ({_fmt(info['teacher_dtype'])}, vocab {_fmt(info['vocab_size'])})"),
        ("payload", info["payload"]),
        ("k" if info["payload"] == "topk" else "draws (S)", _fmt(info["k"])),
        ("encoding", info["encoding"]),
        *((f"  {name}", str(value)) for name, value in sorted(info["encoding_summary"].items())),
        ("seq_len", _fmt(info["seq_len"])),
        ("data", _fmt(info["data_source"])),
        ("windows", f"{_fmt(info['windows'])} of {_fmt(info['planned_windows'])}"),
        *((("packing", f"{_fmt(p.get('documents'))} sequences in {_fmt(info['planned_windows'])} rows of at most "
                       f"{_fmt(p.get('max_tokens'))} tokens"),) if (p := info.get("packing")) else ()),
        ("tokens", _fmt(info["tokens"])),
        ("shards", f"{_fmt(info['shards'])} of {_fmt(info['planned_shards'])}"),
        ("complete", _fmt(info["complete"])),
        ("bytes", _fmt(info["bytes"])),
        ("bytes/token", "-" if info["bytes_per_token"] is None else f"{info['bytes_per_token']:.1f}"),
        ("sampled windows", _fmt(info["sampled_windows"])),
        ("mean top-k mass", _fmt(info["mean_topk_mass"])),
        ("mean tail mass", _fmt(info["mean_tail_mass"])),
        ("entropy lower bound", _nats(info["mean_entropy_lower_bound"])),
        ("teacher NLL", _nats(info["teacher_nll"])),
        ("backend", _fmt(info["backend"])),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
