"""Train a student from a teacher's cache with tail-exact KD losses (the teacher never runs here).

    trainer distill --student runs/student --cache work_dir/teacher-k64-0123abcd --out runs/kd \
        --steps 2000 --eval-cache work_dir/teacher-heldout-k64-4567 --loss forward_kl

The cache stores, per position, the teacher's top-k log-probs and the exact log-mass of the rest;
the loss compares the student with it over those k + 1 outcomes (`--loss forward_kl`, `reverse_kl`
or `jsd` with `--beta`), at `--temperature`, mixed with next-token CE by `--alpha-ce`. A `sampled`
cache (S draws per position from the full softmax) is trained with `--loss sampled`, random-sampling
KD (chosen automatically; top-k losses are refused on it, and it on top-k caches).
`--renormalize-topk` drops the tail bucket (biased; for comparison only). The student's float32
log-softmax is computed `--logits-chunk` positions at a time.

Before training, the student's tokenizer (saved in its folder) must have the cache's tokenizer
fingerprint, its vocabulary must cover the tokenizer (padding columns are ignored with a warning),
and --eval-cache / --eval-data must agree with each other and with the student's tokenizer.
Everything else (schedule, checkpoints, --resume, torchrun DDP, OUT layout) is as in pretrain.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from logitcache.errors import UserError
from trainer.config import LOSS_KINDS, LossConfig, RunConfig, add_train_arguments, train_config_from_args

# torch, transformers, the reader and the loop are imported in run(): `trainer --help` stays fast.


def add_arguments(p) -> None:
    p.add_argument("--student", required=True, help="student checkpoint folder (weights, config, tokenizer)")
    p.add_argument("--cache", required=True, help="teacher cache folder (logitcache produce)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seq-len", type=int, help="optional: must equal the cache's window length")
    p.add_argument("--chat-template", metavar="FILE",
                   help="a cache of conversations: the chat template it was rendered with, when the student's "
                        "tokenizer has none of its own (it must be the cache's; checked by its sha256)")
    g = p.add_argument_group("loss")
    d = LossConfig()
    g.add_argument("--loss", choices=LOSS_KINDS, default=None,
                   help=f"divergence (default: sampled for a sampled cache, else {d.loss}); sampled = "
                        "random-sampling KD, unbiased for full-vocabulary forward KL, sampled caches only")
    g.add_argument("--beta", type=float, default=d.beta, help="JSD mixture weight (default %(default)s)")
    g.add_argument("--temperature", type=float, default=d.temperature, help="KD temperature (default %(default)s)")
    g.add_argument("--alpha-ce", type=float, default=d.alpha_ce,
                   help="weight of next-token CE: (1-a) KD + a CE (default %(default)s)")
    g.add_argument("--renormalize-topk", action="store_true",
                   help="drop the tail bucket and renormalise over the top-k (biased, for comparison)")
    g.add_argument("--logits-chunk", type=int, default=d.logits_chunk,
                   help="positions per float32 log-softmax chunk, 0 = all at once (default %(default)s)")
    g = p.add_argument_group("held-out data")
    g.add_argument("--eval-cache", help="held-out cache: CE and KL to the teacher every --eval-every steps")
    g.add_argument("--eval-data", help="held-out corpus for CE (must be the --eval-cache's data if both given)")
    g.add_argument("--work", default="work_dir", help="folder for packed --eval-data windows (default %(default)s)")
    g.add_argument("--text-column", default="text", help="text column of jsonl/parquet --eval-data")
    add_train_arguments(p)


def _short(fp: str | None) -> str:
    return (fp or "none")[:12]


def check_cache(reader, student_fp: str, flag: str) -> None:
    """The cache must come from the student's tokenizer: same ids for the same text."""
    cache_fp = reader.manifest.tokenizer.fingerprint
    if cache_fp != student_fp:
        raise UserError(f"{flag} {reader.path}: made with tokenizer {_short(cache_fp)}..., the student's "
                        f"tokenizer is {_short(student_fp)}...; distillation needs the same tokenizer")


def check_chat_template(reader, tokenizer, template_file: str | None) -> None:
    """A cache of conversations was rendered with one chat template; the student must speak the same
    one (its tokenizer's own, or `template_file`), else it learns turns it will not be prompted with."""
    chat = reader.manifest.data.chat or {}
    want = chat.get("template_sha256")
    if not want:
        return
    if template_file is not None:
        text, where = Path(template_file).read_text(), f"--chat-template {template_file}"
    elif getattr(tokenizer, "chat_template", None):
        text, where = tokenizer.get_chat_template(), "the student's tokenizer's chat template"
    else:
        raise UserError(f"--cache {reader.path}: conversations rendered with chat template {_short(want)}..., and "
                        "the student's tokenizer has none; give the cache's template with --chat-template FILE")
    have = hashlib.sha256(text.encode()).hexdigest()
    if have != want:
        raise UserError(f"--cache {reader.path}: conversations rendered with chat template {_short(want)}..., "
                        f"{where} is {_short(have)}...; distil with the template the cache was made with")


def pick_loss(requested: str | None, reader, flag: str = "--cache") -> str:
    """The loss for this cache's payload: `sampled` for draws, a top-k loss for top-k sets."""
    draws = reader.payload == "samples"
    if requested is None:
        return "sampled" if draws else LossConfig().loss
    if draws and requested != "sampled":
        raise UserError(f"--loss {requested}: {flag} {reader.path} is a sampled cache (draws, no top-k); "
                        "use --loss sampled")
    if not draws and requested == "sampled":
        raise UserError(f"--loss sampled: {flag} {reader.path} is a top-k cache ({reader.encoding.name}); "
                        "use forward_kl, reverse_kl or jsd")
    return requested


def make_kd_loss(loss_cfg: LossConfig, vocab: int):
    """The cache KD objective over the first `vocab` logit columns, as a loop loss.

    Each batch's payload picks the estimator (trainer.losses.batch_distill_loss): top-k sets
    get `loss_cfg.loss` over the k + 1 buckets, draws get random-sampling KD. CE on the true
    next token is always computed, so it is logged even when `alpha_ce` is 0 (it then carries
    no graph). Means over the batch's `loss_mask` positions (every position without one).
    """
    from trainer.losses import batch_distill_loss

    chunk = loss_cfg.logits_chunk or None

    def loss_fn(logits, batch: dict):
        return batch_distill_loss(logits, batch, vocab=vocab, kind=loss_cfg.loss, alpha_ce=loss_cfg.alpha_ce,
                                  temperature=loss_cfg.temperature, renormalize_topk=loss_cfg.renormalize_topk,
                                  beta=loss_cfg.beta, chunk_size=chunk)

    return loss_fn


def run(args) -> int:
    import torch

    from logitcache.data import prepare_windows, tokenizer_fingerprint
    from logitcache.read.reader import CacheReader
    from trainer.attention import check_packing_support
    from trainer.data import CacheBatches, load_causal_lm, load_tokenizer, logits_vocab
    from trainer.evaluate import evaluate_cache, evaluate_windows
    from trainer.loop import init_distributed, preflight, train

    cfg = train_config_from_args(args)
    reader = CacheReader(args.cache)
    if args.chat_template is not None and not Path(args.chat_template).is_file():
        raise UserError(f"--chat-template {args.chat_template}: no such file")
    loss_cfg = LossConfig(loss=pick_loss(args.loss, reader), beta=args.beta, temperature=args.temperature,
                          alpha_ce=args.alpha_ce,
                          renormalize_topk=args.renormalize_topk, logits_chunk=args.logits_chunk)
    loss_cfg.validate()

    # ---- everything that can refuse the run, before any model is loaded
    tokenizer = load_tokenizer(args.student, "--student")
    student_fp = tokenizer_fingerprint(tokenizer)
    check_cache(reader, student_fp, "--cache")
    check_chat_template(reader, tokenizer, args.chat_template)
    if args.seq_len is not None and args.seq_len != reader.seq_len:
        raise UserError(f"--seq-len {args.seq_len}: the cache {args.cache} has windows of {reader.seq_len} positions")
    eval_reader = None
    if args.eval_cache:
        eval_reader = CacheReader(args.eval_cache)
        if eval_reader.payload != "topk":
            raise UserError(f"--eval-cache {args.eval_cache}: a sampled cache has no top-k to measure KL on; "
                            "use a top-k cache or --eval-data")
        check_cache(eval_reader, student_fp, "--eval-cache")
        if eval_reader.seq_len != reader.seq_len:
            print(f"trainer: note: --eval-cache has seq_len {eval_reader.seq_len}, --cache {reader.seq_len}",
                  file=sys.stderr)
    env = init_distributed(cfg.device)
    warn = (lambda m: print(m, file=sys.stderr, flush=True)) if env.is_main else (lambda m: None)
    if eval_reader is not None:
        same_teacher = all(eval_reader.teacher.get(f) == reader.teacher.get(f)
                           for f in ("config_sha256", "weights_fingerprint"))
        if not same_teacher:
            warn(f"trainer: warning: --eval-cache comes from teacher {eval_reader.teacher.name_or_path}, "
                 f"--cache from {reader.teacher.name_or_path}; eval KL is to the former")
        if eval_reader.manifest.data.fingerprint == reader.manifest.data.fingerprint:
            warn("trainer: warning: --eval-cache holds the training windows; eval metrics are not held out")
    eval_windows = None
    if args.eval_data:
        seq_len = eval_reader.seq_len if eval_reader is not None else reader.seq_len
        for turn in ((0,) if env.world == 1 else (0, 1)):   # rank 0 tokenizes, the others load
            if (turn == 0) == env.is_main:
                eval_windows = prepare_windows(args.eval_data, tokenizer, seq_len, Path(args.work),
                                               text_column=args.text_column)
            if env.world > 1:
                torch.distributed.barrier()
        if eval_reader is not None:
            want = eval_reader.manifest.data.fingerprint
            if eval_windows.fingerprint != want:
                raise UserError(f"--eval-data {args.eval_data}: its windows (fingerprint "
                                f"{_short(eval_windows.fingerprint)}...) are not the data of --eval-cache "
                                f"{args.eval_cache} ({_short(want)}...)")
            eval_windows = None   # the eval cache holds the same windows: CE comes from it
        elif eval_windows.fingerprint == reader.manifest.data.fingerprint:
            warn("trainer: warning: --eval-data gives the training windows; eval CE is not held out")

    run_cfg = RunConfig(command="distill", model=args.student, out=args.out, cache=args.cache,
                        seq_len=reader.seq_len, work=args.work, eval_data=args.eval_data,
                        eval_cache=args.eval_cache, save_dtype=args.save_dtype, data_fingerprint=reader.key,
                        train=cfg, loss=loss_cfg)
    run_cfg.validate()
    preflight(run_cfg, args.resume, env.world)

    model = load_causal_lm(args.student, "--student")
    vocab = logits_vocab(model, tokenizer, "--student", warn)
    if any(r is not None and r.manifest.packed for r in (reader, eval_reader)):
        check_packing_support(model, f"--student {args.student}")
    teacher_vocab = reader.teacher.vocab_size
    if isinstance(teacher_vocab, int) and teacher_vocab > vocab:
        warn(f"trainer: note: the teacher has {teacher_vocab} logit columns for a {vocab}-token tokenizer; "
             "its ids are expected below the tokenizer's length")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and reader.seq_len > max_pos:
        raise UserError(f"--cache seq_len {reader.seq_len} exceeds the student's max_position_embeddings {max_pos}")

    source = CacheBatches(reader, cfg.batch_size, cfg.seed, env.rank, env.world, vocab_limit=vocab)
    chunk = loss_cfg.logits_chunk or None
    loss_fn = make_kd_loss(loss_cfg, vocab)

    evaluate = None
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    if eval_reader is not None:
        def evaluate(m):
            return evaluate_cache(m, eval_reader, batch_size=eval_bs, device=env.device, vocab=vocab,
                                  max_windows=cfg.eval_windows, chunk_size=chunk)
    elif eval_windows is not None:
        def evaluate(m):
            return evaluate_windows(m, eval_windows.tokens, batch_size=eval_bs, device=env.device, vocab=vocab,
                                    max_windows=cfg.eval_windows)

    if env.is_main:
        print(f"trainer: distilling {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} "
              f"parameters) from {reader.teacher.name_or_path} (k={reader.k}, {reader.num_windows} "
              f"windows of {reader.seq_len}) with {loss_cfg.loss} for {cfg.steps} steps", file=sys.stderr,
              flush=True)
    summary = train(model, run=run_cfg, env=env, source=source, loss_fn=loss_fn, evaluate=evaluate,
                    tokenizer=tokenizer, resume=args.resume)
    if env.is_main:
        print(json.dumps({k: summary[k] for k in ("step", "finished", "train", "eval") if k in summary}))
    return 0
