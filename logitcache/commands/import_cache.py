"""Import another trainer's distillation dataset as a cache: `logitcache import --from FORMAT SRC OUT`.

axolotl: SRC is a pre-tokenized KD dataset (a .parquet / .jsonl file or a folder of them; what
`logitcache export --to axolotl` writes is one): rows of input_ids (all seq_len + 1 tokens long),
target_token_ids and log-probs per position (position t = the distribution of token t + 1), and
optionally labels, attention_mask, target_mask.

distillkit: SRC is a DistillKit capture: a folder, a glob or a URL (hf://datasets/..., s3://, file://)
of its Parquet shards (compressed, legacy or raw layout), with its compression config beside them
(compression_config.yaml, as its capture writes it) or given by --config. Rows of one length with every
position stored become a windows cache; rows of their own length, packed segments or labels-masked
positions a sequences cache.

OUT becomes a cache folder: the ids and log-probs as read (decoded), the tail computed as
log(1 - sum exp(top-k)), the teacher recorded as --teacher-name or "unknown" (docs/interop.md). Every
value is checked first and bad input is one error line with nothing written; an interrupted import
resumes when run again. Prints OUT.

    logitcache import --from distillkit captures/qwen-k128/ caches/qwen-k128 --tokenizer Qwen/Qwen3-8B
    logitcache import --from distillkit 'hf://datasets/arcee-ai/some-capture/data/*.parquet' caches/x --config cc.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from logitcache.commands.produce import parse_encoding_params
from logitcache.encodings import DEFAULT_ENCODING, available_encodings

FORMATS = ("axolotl", "distillkit")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source_format", required=True, choices=FORMATS, help="the dataset layout to read")
    p.add_argument("src", metavar="SRC", help="axolotl: a .parquet / .jsonl / .json file or a folder of them; "
                   "distillkit: a folder, a glob or a URL (hf://, s3://, file://) of Parquet shards")
    p.add_argument("out", metavar="OUT", type=Path, help="cache folder to create")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="distillkit: the compression config the capture was made with (its compression_config.yaml, "
                        "or a DistillKit training config with teacher.logprob_compressor); default: "
                        "compression_config.yaml beside the shards")
    p.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="the teacher's vocabulary (logit width); every id must be below it. axolotl: required unless "
                        "--tokenizer gives it; distillkit: default the config's d")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="the tokenizer the dataset was made with: its length bounds the ids, and its fingerprint "
                        "goes in the manifest (so `trainer distill` accepts the cache for a student with it)")
    p.add_argument("--teacher-name", default=None, metavar="NAME",
                   help="the teacher that made the log-probs, recorded in the manifest (default: unknown)")
    p.add_argument("--logprobs-field", default="target_logprobs", metavar="COLUMN",
                   help="axolotl: the column of per-position log-probs (its logprobs_field; default target_logprobs)")
    p.add_argument("--encoding", default=DEFAULT_ENCODING, choices=available_encodings("topk"),
                   help=f"how the cache stores the top-k (default {DEFAULT_ENCODING}; fp32 keeps the values exactly)")
    p.add_argument("--encoding-param", action="append", default=[], metavar="KEY=VALUE",
                   help="an encoding parameter, repeatable (see docs/encodings.md)")
    p.add_argument("--rows-per-shard", type=int, default=None,
                   help="rows per shard (default: axolotl 256; distillkit about 2^18 stored positions per shard)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    from logitcache.errors import SettingError

    params = parse_encoding_params(args.encoding_param)
    if args.source_format == "distillkit":
        from logitcache.interop import ImportSettings, import_distillkit

        import_distillkit(ImportSettings(src=args.src, out=args.out, config=args.config, vocab_size=args.vocab_size,
                                         tokenizer=args.tokenizer, teacher_name=args.teacher_name,
                                         encoding=args.encoding, encoding_params=params,
                                         rows_per_shard=args.rows_per_shard, progress=not args.no_progress))
    else:
        from logitcache.interop import import_axolotl

        if args.config is not None:
            raise SettingError("config", args.config, "is for --from distillkit")
        import_axolotl(args.src, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                       teacher_name=args.teacher_name, logprobs_field=args.logprobs_field, encoding=args.encoding,
                       encoding_params=params, rows_per_shard=args.rows_per_shard or 256,
                       progress=not args.no_progress)
    print(args.out)
    return 0
