"""Export a top-k cache as another trainer's distillation dataset: `logitcache export --to axolotl CACHE OUT`.

axolotl: OUT becomes a folder with `train.parquet` (one pre-tokenized row per window: input_ids,
attention_mask, labels, and per position target_token_ids, target_logprobs, target_mask, the layout
axolotl's KD plugin trains on) and `axolotl_kd.yaml` (the config lines axolotl needs, and where the
data came from). OUT must not exist; it appears only once complete. axolotl has no tail mass, so the
probability outside the top-k is lost (docs/interop.md). Prints OUT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("axolotl",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, choices=FORMATS, help="the dataset layout to write")
    p.add_argument("cache", metavar="CACHE", help="cache folder (the one holding manifest.json); a top-k cache")
    p.add_argument("out", metavar="OUT", type=Path, help="folder to create")
    p.add_argument("--renormalize", action="store_true",
                   help="shift each position's top-k log-probs to sum to 1 over the top-k, as axolotl's own KD "
                        "datasets are (default: the teacher's exact log-probs, which an import turns back into "
                        "the same cache, tail included)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    from logitcache.interop import export_axolotl

    info = export_axolotl(args.cache, args.out, renormalize=args.renormalize, progress=not args.no_progress)
    print(info["path"])
    return 0
