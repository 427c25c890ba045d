"""`trainer pretrain` on chat data: supervised fine-tuning with the loss on the trained turns only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from conftest import save_tiny_teacher

from logitcache.data.sequences import prepare_sequences
from logitcache.data.templates import render
from trainer.cli import main as trainer_main
from trainer.data import SequenceBatches

TEMPLATE = Path(__file__).resolve().parents[1] / "assets" / "chat_templates" / "demo.jinja"
WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at".split()


def chat_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)

    def line() -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))

    return [{"messages": [{"role": "user", "content": line()}, {"role": "assistant", "content": line()},
                          {"role": "user", "content": line()}, {"role": "assistant", "content": line()}]}
            for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_batches_carry_the_rendered_masks(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    rows = chat_rows(6, 0)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    seqs = prepare_sequences(str(data), tok, 200, tmp_path / "work", chat_template=TEMPLATE.read_text())
    batch = SequenceBatches(seqs, 3, seed=0)[0]
    for b, i in enumerate(batch["window_id"].tolist()):
        want = render(tok, rows[i]["messages"], chat_template=TEMPLATE.read_text())
        n = len(want.input_ids)
        assert batch["attention_mask"][b].sum() == n - 1
        assert torch.equal(batch["labels"][b, :n - 1], torch.as_tensor(want.input_ids[1:], dtype=torch.long))
        assert torch.equal(batch["loss_mask"][b, :n - 1], torch.as_tensor(want.loss_mask[1:]))
        assert not batch["loss_mask"][b, n - 1:].any()


def test_pretrain_on_chat_data_trains_and_evaluates_assistant_tokens(tmp_path, tiny_tokenizer_dir, capsys):
    model = save_tiny_teacher(tmp_path / "student", "llama", tiny_tokenizer_dir)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(24, 1))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", chat_rows(6, 2))
    code = trainer_main(["pretrain", "--model", str(model), "--data", str(train), "--eval-data", str(heldout),
                         "--chat-template", str(TEMPLATE), "--seq-len", "63", "--out", str(tmp_path / "sft"),
                         "--work", str(tmp_path / "w"), "--steps", "4", "--batch-size", "4", "--lr", "3e-3",
                         "--eval-every", "4", "--truncation", "right", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["finished"] and np.isfinite(summary["eval"]["ce"])
    from transformers import AutoTokenizer

    expected = prepare_sequences(str(heldout), AutoTokenizer.from_pretrained(model), 63, tmp_path / "w2",
                                 chat_template=TEMPLATE.read_text(), truncation="right")
    assert 0 < summary["eval"]["tokens"] == expected.loss_tokens     # assistant tokens only
    assert expected.loss_tokens < expected.num_tokens


def test_evaluate_on_chat_data_measures_assistant_tokens(tmp_path, tiny_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    model = save_tiny_teacher(tmp_path / "m", "llama", tiny_tokenizer_dir)
    data = write_jsonl(tmp_path / "heldout.jsonl", chat_rows(5, 3))
    code = trainer_main(["evaluate", "--model", str(model), "--data", str(data), "--chat-template", str(TEMPLATE),
                         "--seq-len", "63", "--truncation", "right", "--work", str(tmp_path / "w"), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out.strip().splitlines()[-1])
    expected = prepare_sequences(str(data), AutoTokenizer.from_pretrained(model), 63, tmp_path / "w2",
                                 chat_template=TEMPLATE.read_text(), truncation="right")
    assert result["tokens"] == expected.loss_tokens and np.isfinite(result["ce"])
