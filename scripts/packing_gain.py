"""What `--packing` saves: positions a student computes per epoch, one conversation a row vs packed.

    python scripts/packing_gain.py                      # shakespeare-chat:train, demo teacher's tokenizer
    python scripts/packing_gain.py --seq-len 1024 2048 --time 10

For each --seq-len: rows, real positions, the positions computed in shuffled batches of --batch-size
rows padded to their longest (what the student's forward pays for), the fill (real / computed) and
the loss tokens (the same either way). With --time N it also times N training micro-batches
(forward + backward through trainer.logits.LogitsAt, the LM head at the loss positions, sdpa) of
the demo teacher as a student on each, and reports seconds per loss token. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def computed_positions(lengths: np.ndarray, batch_size: int, seed: int = 0) -> int:
    """Positions of shuffled batches of rows right-padded to their longest row."""
    pos = lengths - 1
    order = np.random.default_rng(seed).permutation(len(pos))
    return int(sum(int(pos[order[i:i + batch_size]].max()) * len(order[i:i + batch_size])
                   for i in range(0, len(order), batch_size)))


def seconds_per_loss_token(sequences, batch_size: int, batches: int, model) -> float:
    import torch

    from trainer.data import SequenceBatches
    from trainer.logits import LogitsAt
    from trainer.loop import MODEL_INPUTS, at_loss_positions

    source, student = SequenceBatches(sequences, batch_size, seed=0), LogitsAt(model)
    tokens, elapsed = 0, 0.0
    for i in range(batches):
        batch = source[i]
        index, picked = at_loss_positions(batch)
        t0 = time.perf_counter()
        logits = student(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, index=index)
        torch.nn.functional.cross_entropy(logits.float(), picked["labels"]).backward()
        elapsed += time.perf_counter() - t0
        tokens += len(index)
    model.zero_grad(set_to_none=True)
    return elapsed / max(tokens, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="shakespeare-chat:train", help="chat data (default %(default)s)")
    p.add_argument("--tokenizer", default=str(ROOT / "assets" / "demo-teacher"),
                   help="tokenizer folder, also the timed student with --time (default: the demo teacher)")
    p.add_argument("--chat-template", default=str(ROOT / "assets" / "chat_templates" / "demo.jinja"),
                   help="Jinja chat template (default %(default)s)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[256, 1024], help="settings to compare")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (default %(default)s)")
    p.add_argument("--truncation", default="split", choices=("drop", "right", "split"),
                   help="conversations longer than --seq-len + 1 tokens (default %(default)s)")
    p.add_argument("--time", type=int, default=0, metavar="N", help="also time N micro-batches of each (default 0)")
    p.add_argument("--work", default="work_dir", help="folder for the rendered conversations (default %(default)s)")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from logitcache.data import pack_sequences, prepare_sequences

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    template = Path(args.chat_template).read_text()
    model = None
    if args.time:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.tokenizer, dtype=torch.float32).train()
    result = {}
    for seq_len in args.seq_len:
        rows = prepare_sequences(args.data, tokenizer, seq_len, Path(args.work), chat_template=template,
                                 truncation=args.truncation)
        for name, s in (("one_per_row", rows), ("packed", pack_sequences(rows))):
            computed = computed_positions(s.lengths, args.batch_size)
            entry = {"rows": s.num_windows, "real_positions": int((s.lengths - 1).sum()),
                     "computed_positions": computed, "fill": round(int((s.lengths - 1).sum()) / computed, 3),
                     "loss_tokens": s.loss_tokens}
            if model is not None:
                entry["s_per_loss_token"] = seconds_per_loss_token(s, args.batch_size, args.time, model)
            result[f"seq_len_{seq_len}_{name}"] = entry
            print(f"seq_len {seq_len:>5} {name:>12}: {entry}", flush=True)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
