"""Held-out CE of a model on a corpus, and KL to a teacher on a cache.

    trainer evaluate --model runs/kd --data shakespeare:heldout --seq-len 256
    trainer evaluate --model runs/kd --cache work_dir/teacher-heldout-k64-4567 --json

CE is the mean next-token cross-entropy (nats per token; perplexity = exp(CE)). With --cache, KL is
the forward KL(teacher || model) over the cache's (k+1)-way distribution (top-k tokens plus one
tail bucket), a lower bound on the full-vocabulary KL, and CE is measured on the cache's windows;
--data is then optional and, if given, must be the cache's data. The model's tokenizer must be the
cache's. --json prints one JSON object instead of the table.
"""

from __future__ import annotations

import json
from pathlib import Path

from logitcache.errors import UserError


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (weights, config, tokenizer)")
    p.add_argument("--data", help="held-out corpus (file, folder, glob, embedded name or hub id)")
    p.add_argument("--cache", help="held-out teacher cache: adds KL to its teacher")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one in --model)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="window length for --data (default: the cache's, else 256)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--work", default="work_dir", help="folder for packed windows (default %(default)s)")
    p.add_argument("--text-column", default="text", help="text column of jsonl/parquet data")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--chat-template", metavar="FILE",
                   help="chat --data: a Jinja chat template (default: the tokenizer's own)")
    p.add_argument("--train-on", default="assistant", choices=("assistant", "last-assistant", "completion", "all"),
                   help="chat --data: the tokens CE is measured on (default %(default)s)")
    p.add_argument("--truncation", default="drop", choices=("drop", "right", "split"),
                   help="chat --data: conversations longer than --seq-len + 1 tokens (default %(default)s)")


def run(args) -> int:
    import torch

    from logitcache.data import prepare_windows, tokenizer_fingerprint
    from logitcache.data.sequences import is_chat_source, prepare_sequences
    from logitcache.read.reader import CacheReader
    from trainer.attention import check_packing_support
    from trainer.commands.distill import check_cache
    from trainer.data import load_causal_lm, load_tokenizer, logits_vocab
    from trainer.evaluate import evaluate_cache, evaluate_sequences, evaluate_windows
    from trainer.loop import init_distributed

    if not args.data and not args.cache:
        raise UserError("give --data, --cache or both")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    tokenizer = load_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    reader = None
    if args.cache:
        reader = CacheReader(args.cache)
        if reader.payload != "topk":
            raise UserError(f"--cache {args.cache}: a sampled cache has no top-k to measure KL on; "
                            "use a top-k cache, or --data alone")
        check_cache(reader, tokenizer_fingerprint(tokenizer), "--cache")
        if args.seq_len is not None and args.seq_len != reader.seq_len:
            raise UserError(f"--seq-len {args.seq_len}: the cache's windows have {reader.seq_len} positions")
    seq_len = reader.seq_len if reader is not None else (args.seq_len or 256)
    windows = None
    chat = bool(args.data) and reader is None and is_chat_source(args.data)
    if chat:     # conversations: CE over the trained turns' tokens
        template = Path(args.chat_template).read_text() if args.chat_template else None
        windows = prepare_sequences(args.data, tokenizer, seq_len, Path(args.work), chat_template=template,
                                    train_on=args.train_on, truncation=args.truncation)
    elif args.data:
        windows = prepare_windows(args.data, tokenizer, seq_len, Path(args.work), text_column=args.text_column)
        if reader is not None and windows.fingerprint != reader.manifest.data.fingerprint:
            raise UserError(f"--data {args.data}: its windows are not the data of --cache {args.cache} "
                            f"(fingerprints {windows.fingerprint[:12]}... vs "
                            f"{reader.manifest.data.fingerprint[:12]}...)")
    env = init_distributed(args.device)
    model = load_causal_lm(args.model, "--model").to(env.device)
    vocab = logits_vocab(model, tokenizer, "--model")
    if reader is not None and reader.manifest.packed:
        check_packing_support(model, f"--model {args.model}")

    result: dict = {"model": str(args.model), "seq_len": seq_len}
    if reader is not None:
        r = evaluate_cache(model, reader, batch_size=args.batch_size, device=env.device, vocab=vocab,
                           max_windows=args.max_windows)
        result.update(cache=str(reader.path), teacher=reader.teacher.name_or_path, k=reader.k, **r)
    elif chat:
        result.update(data=args.data, **evaluate_sequences(model, windows, batch_size=args.batch_size,
                                                           device=env.device, vocab=vocab,
                                                           max_windows=args.max_windows))
    else:
        result.update(data=args.data, **evaluate_windows(model, windows.tokens, batch_size=args.batch_size,
                                                         device=env.device, vocab=vocab,
                                                         max_windows=args.max_windows))
    if env.rank == 0:
        if args.json:
            print(json.dumps(result))
        else:
            for key in ("ce", "ppl", "kl", "teacher_tail_mass", "student_tail_mass", "tokens"):
                if key in result:
                    v = result[key]
                    print(f"{key:>18}  {v:.6f}" if isinstance(v, float) else f"{key:>18}  {v}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
