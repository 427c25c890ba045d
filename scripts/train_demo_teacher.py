"""Train the demo teacher once and store it in `assets/demo-teacher/` (bf16 safetensors, ~15 MB).

    python scripts/train_demo_teacher.py --out assets/demo-teacher            # ~30-40 min on 2 CPU cores
    python scripts/train_demo_teacher.py --out assets/demo-teacher --device cuda   # minutes on a GPU

`make demo` uses the stored checkpoint and only runs this when it is missing. A teacher must be
clearly stronger than what its pruned student reaches alone, else distillation teaches nothing; a
7.4M-parameter Llama trained on ~2M tokens of the Shakespeare split is, against a student trained on ~0.5M.
The tokenizer is trained here too and saved beside the weights, since the weights depend on it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from logitcache.data import iter_documents, prepare_windows, train_bpe_tokenizer


def demo_teacher_config(vocab_size: int) -> LlamaConfig:
    """7.4M parameters: hidden 256, 4 layers, 4 heads of 64, FFN 688, untied 8k embeddings."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                       pad_token_id=0)


@torch.no_grad()
def heldout_ce(model: LlamaForCausalLM, tokens: np.ndarray, device: str, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch):
        x = torch.as_tensor(tokens[i:i + batch], dtype=torch.long, device=device)
        logits = model(x[:, :-1]).logits.float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("assets/demo-teacher"), help="checkpoint folder to write")
    ap.add_argument("--work", type=Path, default=Path("work_dir"), help="folder for token windows")
    ap.add_argument("--seq-len", type=int, default=256, help="training window length in tokens")
    ap.add_argument("--batch-size", type=int, default=24, help="windows per step")
    ap.add_argument("--steps", type=int, default=320, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    ap.add_argument("--warmup", type=int, default=30, help="linear warmup steps")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=0, help="seed for init and batch order")
    ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer instead of training one")
    ap.add_argument("--vocab-size", type=int, default=8192,
                    help="size of the BPE vocabulary trained when --tokenizer is not given")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 is faster than 2 when other work shares the cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is None:
        train_bpe_tokenizer(iter_documents("shakespeare:train"), args.out, vocab_size=args.vocab_size)
        tok = AutoTokenizer.from_pretrained(args.out)
    else:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        tok.save_pretrained(args.out)
    train = prepare_windows("shakespeare:train", tok, args.seq_len, args.work).tokens
    heldout = prepare_windows("shakespeare:heldout", tok, args.seq_len, args.work).tokens

    model = LlamaForCausalLM(demo_teacher_config(len(tok))).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    rng = np.random.default_rng(args.seed)
    order = np.concatenate([rng.permutation(len(train)) for _ in range(
        math.ceil(args.steps * args.batch_size / len(train)) + 1)])
    log = []
    t0 = time.time()
    for step in range(args.steps):
        idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        x = torch.as_tensor(train[idx], dtype=torch.long, device=args.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
            logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            tps = (step + 1) * x[:, 1:].numel() / (time.time() - t0)
            entry = {"step": step, "loss": round(loss.item(), 4), "tokens_per_s": round(tps)}
            if step == args.steps - 1:
                entry["heldout_ce"] = round(heldout_ce(model, heldout, args.device), 4)
            log.append(entry)
            print(json.dumps(entry), flush=True)

    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    info = {"params": n_params, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "tokens_seen": args.steps * args.batch_size * args.seq_len, "seed": args.seed,
            "final": log[-1], "minutes": round((time.time() - t0) / 60, 1), "device": args.device}
    (args.out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
