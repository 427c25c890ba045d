"""Export a top-k cache as another trainer's distillation dataset: `logitcache export --to FORMAT CACHE OUT`.

axolotl: OUT becomes a folder with `train.parquet` (one pre-tokenized row per window: input_ids,
attention_mask, labels, and per position target_token_ids, target_logprobs, target_mask, the layout
axolotl's KD plugin trains on) and `axolotl_kd.yaml` (the config lines axolotl needs, and where the
data came from).

distillkit: OUT becomes a folder of `data_<i>.parquet` files (256 rows each: input_ids,
attention_mask, labels, and per position compressed_logprobs and bytepacked_indices, DistillKit's
compressed layout), `compression_config.yaml` (the config used, as DistillKit's capture writes it)
and `distillkit_kd.yaml` (the lines of a DistillKit training config that read it: prepacked rows,
teacher kind dataset). --config picks DistillKit's recommended or budget configuration (cut to the
cache's k) or a config file.

OUT must not exist; it appears only once complete. Neither tool keeps the tail mass, so the
probability outside the top-k is lost (docs/interop.md). Prints OUT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("axolotl", "distillkit")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, choices=FORMATS, help="the dataset layout to write")
    p.add_argument("cache", metavar="CACHE", help="cache folder (the one holding manifest.json); a top-k cache")
    p.add_argument("out", metavar="OUT", type=Path, help="folder to create")
    p.add_argument("--renormalize", action="store_true",
                   help="axolotl: shift each position's top-k log-probs to sum to 1 over the top-k, as axolotl's own "
                        "KD datasets are (default: the teacher's exact log-probs, which an import turns back into "
                        "the same cache, tail included)")
    p.add_argument("--config", default="recommended", metavar="recommended|budget|FILE",
                   help="distillkit: the compression config: DistillKit's recommended (k=128, exact_k=16 bf16, "
                        "terms 0-4 + sqrt in fp32) or budget (k=50, exact_k=1, terms 0, 1, sqrt) configuration, cut "
                        "to the cache's k, or a YAML file (its compression_config.yaml form); d defaults to the "
                        "teacher's vocabulary (default recommended)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    from logitcache.errors import SettingError

    if args.to == "distillkit":
        from logitcache.interop import ExportSettings, export_distillkit

        if args.renormalize:
            raise SettingError("renormalize", True, "is for --to axolotl (DistillKit renormalises at training "
                               "time with missing_probability_handling: zero)")
        info = export_distillkit(ExportSettings(cache=args.cache, out=args.out, config=args.config,
                                                progress=not args.no_progress))
    else:
        from logitcache.interop import export_axolotl

        info = export_axolotl(args.cache, args.out, renormalize=args.renormalize, progress=not args.no_progress)
    print(info["path"])
    return 0
