"""Plain next-token training on packed token windows (a teacher from scratch, or more training).

    trainer pretrain --model configs/tiny.json --tokenizer tok/ --data shakespeare:train \
        --seq-len 256 --out runs/teacher --steps 2000 --eval-data shakespeare:heldout

--model is a config JSON (a Hugging Face config with `model_type`; `vocab_size` defaults to the
tokenizer's length) for a fresh model initialised from --seed, or a checkpoint folder to continue.
Windows are tokenized once and kept under --work. OUT receives metrics.jsonl, run_config.json,
checkpoint/ (every --save-every steps; --resume continues exactly) and, at the end, the model as a
Hugging Face checkpoint with its tokenizer. Under torchrun every rank trains on its own windows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from logitcache.errors import UserError
from trainer.config import RunConfig, add_train_arguments, train_config_from_args

# torch, transformers and the loop are imported inside the functions: `trainer --help` stays fast.


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="config JSON (fresh model) or checkpoint folder (continue)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one in the --model folder)")
    p.add_argument("--data", required=True, help="training corpus: file, folder, glob, embedded name or hub id")
    p.add_argument("--seq-len", type=int, default=256, help="positions per window (default %(default)s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--work", default="work_dir", help="folder for packed windows (default %(default)s)")
    p.add_argument("--max-windows", type=int, help="use at most this many training windows")
    p.add_argument("--text-column", default="text", help="text column of jsonl/parquet data (default %(default)s)")
    p.add_argument("--eval-data", help="held-out corpus for periodic CE (packed like --data)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="chat data: a Jinja chat template (default: the tokenizer's own)")
    p.add_argument("--train-on", default="assistant", choices=("assistant", "last-assistant", "completion", "all"),
                   help="chat data: which tokens carry the loss (default %(default)s); plain text trains on all")
    p.add_argument("--truncation", default="drop", choices=("drop", "right", "split"),
                   help="chat data: conversations longer than --seq-len + 1 tokens are dropped, cut, or split "
                        "(default %(default)s)")
    p.add_argument("--packing", action="store_true",
                   help="chat data: pack consecutive conversations into rows of at most --seq-len + 1 tokens; "
                        "positions restart and attention stays inside each (eager, sdpa, flash_attention_2/3)")
    p.add_argument("--logits-chunk", type=int, default=1024,
                   help="positions per float32 log-softmax chunk, 0 = all at once (default %(default)s)")
    add_train_arguments(p)


def build_model(spec: str, tokenizer, seed: int):
    """A fresh model from a config JSON (seeded init) or a checkpoint loaded in float32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.data import load_causal_lm

    path = Path(spec)
    if path.is_dir():
        if any(path.glob("*.safetensors")) or any(path.glob("*.bin")):
            return load_causal_lm(path, "--model")
        config = AutoConfig.from_pretrained(path)
    elif path.is_file():
        try:
            d = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"--model {spec}: not a JSON config ({type(exc).__name__})") from None
        if not isinstance(d, dict) or "model_type" not in d:
            raise UserError(f"--model {spec}: config JSON needs a 'model_type' (e.g. \"llama\")")
        d.setdefault("vocab_size", len(tokenizer))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            d.setdefault(key, tokenizer.eos_token_id)
        try:
            config = AutoConfig.for_model(d.pop("model_type"), **d)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--model {spec}: invalid config ({exc})") from None
    else:
        raise UserError(f"--model {spec}: no such config file or checkpoint folder")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def make_ce_loss(vocab: int, chunk_size: int | None = 1024):
    """Next-token CE over the first `vocab` logit columns, as a loop loss.

    `loss_fn(logits, batch)` returns the mean CE over the positions of `batch["loss_mask"]` (bool,
    `labels`' shape; every position when absent; 0 with a zero gradient when none is set) and the
    metrics `loss`, `ce` and `n_tokens` (the number of those positions). The float32 log-softmax is
    taken `chunk_size` positions at a time, each chunk under activation checkpointing (as
    trainer.losses.distill_loss does), so a large vocabulary never needs a float32 copy of all
    the logits at once.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    from trainer.losses import cross_entropy

    def chunk_sum(flat, labels, mask):
        return cross_entropy(flat, labels, mask) * mask.sum()    # the mean over the chunk's positions, summed

    def loss_fn(logits, batch: dict):
        labels = batch["labels"].reshape(-1)
        n = labels.shape[0]
        mask = (batch["loss_mask"].reshape(-1) if "loss_mask" in batch
                else torch.ones_like(labels, dtype=torch.bool))
        flat = logits[..., :vocab] if logits.shape[-1] > vocab else logits
        flat = flat.reshape(n, flat.shape[-1])
        count = mask.sum()
        if chunk_size is None or n <= chunk_size:
            loss = chunk_sum(flat, labels, mask) / count.clamp_min(1)
        else:
            grad = torch.is_grad_enabled() and flat.requires_grad
            chunks = [(flat[s:s + chunk_size], labels[s:s + chunk_size], mask[s:s + chunk_size])
                      for s in range(0, n, chunk_size)]
            total = sum(checkpoint(chunk_sum, *c, use_reentrant=False) if grad else chunk_sum(*c) for c in chunks)
            loss = total / count.clamp_min(1)
        return loss, {"loss": loss.detach(), "ce": loss.detach(), "n_tokens": count}

    return loss_fn


def run(args) -> int:
    import torch

    from logitcache.data import pack_sequences, prepare_windows, tokenizer_fingerprint
    from logitcache.data.sequences import is_chat_source, prepare_sequences
    from trainer.attention import check_packing_support
    from trainer.data import SequenceBatches, WindowBatches, load_tokenizer, logits_vocab
    from trainer.evaluate import evaluate_sequences, evaluate_windows
    from trainer.loop import init_distributed, preflight, train

    cfg = train_config_from_args(args)
    if args.tokenizer is None and not Path(args.model).is_dir():
        raise UserError("--tokenizer is required when --model is a config file")
    tokenizer = load_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    if args.tokenizer and Path(args.model).is_dir() and (Path(args.model) / "tokenizer_config.json").is_file():
        own = load_tokenizer(args.model, "--model")
        if tokenizer_fingerprint(own) != tokenizer_fingerprint(tokenizer):
            raise UserError(f"--tokenizer {args.tokenizer} differs from the tokenizer saved in --model {args.model}")

    env = init_distributed(cfg.device)
    warn = (lambda m: print(m, file=sys.stderr, flush=True)) if env.is_main else (lambda m: None)
    # Rank 0 tokenizes first so the others load its windows instead of racing to write them.
    windows = eval_windows = None
    chat = is_chat_source(args.data)
    if args.packing and not chat:
        raise UserError(f"--packing: {args.data} reads as plain text, whose windows are already packed end to end; "
                        "it packs conversations")
    template = Path(args.chat_template).read_text() if args.chat_template else None
    for turn in ((0,) if env.world == 1 else (0, 1)):
        if (turn == 0) == env.is_main:
            if chat:    # conversations: one row each, the loss on the trained turns only (SFT)
                windows = prepare_sequences(args.data, tokenizer, args.seq_len, Path(args.work),
                                            chat_template=template, train_on=args.train_on,
                                            truncation=args.truncation, max_rows=args.max_windows)
                windows = pack_sequences(windows) if args.packing else windows
            else:
                windows = prepare_windows(args.data, tokenizer, args.seq_len, Path(args.work),
                                          text_column=args.text_column, max_windows=args.max_windows)
            if args.eval_data and chat:
                eval_windows = prepare_sequences(args.eval_data, tokenizer, args.seq_len, Path(args.work),
                                                 chat_template=template, train_on=args.train_on,
                                                 truncation=args.truncation)
            elif args.eval_data:
                eval_windows = prepare_windows(args.eval_data, tokenizer, args.seq_len, Path(args.work),
                                               text_column=args.text_column)
        if env.world > 1:
            torch.distributed.barrier()
    if eval_windows is not None and eval_windows.fingerprint == windows.fingerprint:
        warn("trainer: warning: --eval-data gives the same windows as --data; the held-out CE is training CE")

    run_cfg = RunConfig(command="pretrain", model=args.model, out=args.out, tokenizer=args.tokenizer,
                        data=args.data, seq_len=args.seq_len, max_windows=args.max_windows, work=args.work,
                        eval_data=args.eval_data, save_dtype=args.save_dtype, logits_chunk=args.logits_chunk,
                        data_fingerprint=windows.fingerprint, train=cfg)
    run_cfg.validate()
    preflight(run_cfg, args.resume, env.world)

    model = build_model(args.model, tokenizer, cfg.seed)
    vocab = logits_vocab(model, tokenizer, "--model", warn)
    if args.packing:
        check_packing_support(model, f"--model {args.model}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and args.seq_len > max_pos:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings {max_pos}")

    source = (SequenceBatches(windows, cfg.batch_size, cfg.seed, env.rank, env.world) if chat
              else WindowBatches(windows.tokens, cfg.batch_size, cfg.seed, env.rank, env.world))

    loss_fn = make_ce_loss(vocab, args.logits_chunk or None)

    evaluate = None
    if eval_windows is not None:
        def evaluate(m):
            if chat:
                return evaluate_sequences(m, eval_windows, batch_size=cfg.eval_batch_size or cfg.batch_size,
                                          device=env.device, vocab=vocab, max_windows=cfg.eval_windows)
            return evaluate_windows(m, eval_windows.tokens, batch_size=cfg.eval_batch_size or cfg.batch_size,
                                    device=env.device, vocab=vocab, max_windows=cfg.eval_windows)

    if env.is_main:
        print(f"trainer: pretraining {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} "
              f"parameters) on {windows.num_windows} {'conversations' if chat else 'windows'} of up to {args.seq_len} "
              f"positions "
              f"for {cfg.steps} steps", file=sys.stderr, flush=True)
    summary = train(model, run=run_cfg, env=env, source=source, loss_fn=loss_fn, evaluate=evaluate,
                    tokenizer=tokenizer, resume=args.resume)
    if env.is_main:
        print(json.dumps({k: summary[k] for k in ("step", "finished", "train", "eval") if k in summary}))
    return 0
