"""Train the demo teacher once and store it in `assets/demo-teacher/` (bf16 safetensors, ~15 MB).

    python scripts/train_demo_teacher.py --out assets/demo-teacher --threads 1   # ~1 h on one CPU core
    python scripts/train_demo_teacher.py --out assets/demo-teacher --device cuda  # minutes on a GPU

A run saves its state (weights, AdamW moments, step) every `--save-every` steps to
`<out>/.resume/` as safetensors; run the same command again after an interruption and it goes on
from there, so the result is the same as an uninterrupted run's (batch i and the learning rate are
pure functions of the seed and the step).

`make demo` uses the stored checkpoint and only runs this when it is missing. A teacher must be
clearly stronger than what its pruned student reaches alone, else distillation teaches nothing; a
7.4M-parameter Llama trained on ~10M tokens (several epochs of the Shakespeare split) is, against a
student trained on ~0.5M.
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
from safetensors.torch import load_file, save_file
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


def save_state(folder: Path, model: LlamaForCausalLM, opt: torch.optim.Optimizer, step: int,
               log: list[dict]) -> None:
    """Weights and AdamW moments as safetensors (no pickle), the step and log as JSON; renamed into place."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model.{n}": p.detach().contiguous() for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"{key}.{names[id(p)]}"] = opt.state[p][key].contiguous()
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "progress.json").write_text(json.dumps({"step": step, "log": log}))
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    tmp.rename(folder)


def load_state(folder: Path, model: LlamaForCausalLM, opt: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Restore what `save_state` wrote; returns the next step and the log so far."""
    progress = json.loads((folder / "progress.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(tensors[f"model.{n}"])
    step = int(progress["step"])
    for n, p in model.named_parameters():
        opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": tensors[f"exp_avg.{n}"].clone(),
                        "exp_avg_sq": tensors[f"exp_avg_sq.{n}"].clone()}
    return step, list(progress["log"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("assets/demo-teacher"), help="checkpoint folder to write")
    ap.add_argument("--work", type=Path, default=Path("work_dir"), help="folder for token windows")
    ap.add_argument("--seq-len", type=int, default=256, help="training window length in tokens")
    ap.add_argument("--batch-size", type=int, default=24, help="windows per step")
    ap.add_argument("--steps", type=int, default=1600, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    ap.add_argument("--warmup", type=int, default=30, help="linear warmup steps")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=0, help="seed for init and batch order")
    ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer instead of training one")
    ap.add_argument("--vocab-size", type=int, default=8192,
                    help="size of the BPE vocabulary trained when --tokenizer is not given")
    ap.add_argument("--save-every", type=int, default=100, help="steps between resumable saves")
    ap.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 is faster than 2 when other work shares the cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    resume = args.out / ".resume"
    if resume.exists():
        tok = AutoTokenizer.from_pretrained(args.out)
    elif args.tokenizer is None:
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
    log: list[dict] = []
    start = 0
    if resume.exists():
        start, log = load_state(resume, model, opt)
        for _ in range(start):
            sched.step()
        print(json.dumps({"resumed_at_step": start}), flush=True)
    t0 = time.time()
    for step in range(start, args.steps):
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
        evaluate_now = step == args.steps - 1 or (step + 1) % args.eval_every == 0
        if step % 10 == 0 or evaluate_now:
            tps = (step + 1 - start) * x[:, 1:].numel() / (time.time() - t0)
            entry = {"step": step, "loss": round(loss.item(), 4), "tokens_per_s": round(tps)}
            if evaluate_now:
                entry["heldout_ce"] = round(heldout_ce(model, heldout, args.device), 4)
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if (step + 1) % args.save_every == 0 and step != args.steps - 1:
            save_state(resume, model, opt, step + 1, log)

    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    if resume.exists():
        for f in resume.iterdir():
            f.unlink()
        resume.rmdir()
    info = {"params": n_params, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "tokens_seen": args.steps * args.batch_size * args.seq_len, "seed": args.seed,
            "final": log[-1],
            "heldout_curve": [{"step": e["step"], "heldout_ce": e["heldout_ce"]} for e in log if "heldout_ce" in e],
            "minutes": round((time.time() - t0) / 60, 1), "device": args.device}
    (args.out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
