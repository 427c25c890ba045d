"""Chat data for `produce`: conversations rendered, fitted to seq_len, counted, saved and reused
(logitcache.data.sequences), which data is chat, and ProduceConfig's chat settings.

`chat_tokenizer_dir` (the tiny BPE with ChatML's two special tokens and a ChatML template with
generation markers) and `chat_rows` are shared with test_produce_chat.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from logitcache import ProduceConfig, SettingError
from logitcache.data import is_chat_source, prepare_sequences, render
from logitcache.data.sequences import cut_sequence
from logitcache.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "assets" / "chat_templates"
WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at".split()


def make_chat_tokenizer(tokenizer_dir: Path, out: Path) -> Path:
    """The tiny tokenizer plus <|im_start|>/<|im_end|> as special tokens and a ChatML template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (TEMPLATES / "chatml_generation.jinja").read_text()
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return make_chat_tokenizer(tiny_tokenizer_dir, tmp_path_factory.mktemp("chat_tokenizer"))


@pytest.fixture(scope="session")
def chat_tokenizer(chat_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_tokenizer_dir)


def chat_rows(n: int = 24, seed: int = 0, *, words: tuple[int, int] = (2, 9), no_assistant_every: int = 0,
              system: bool = True) -> list[dict]:
    """`n` messages rows of 1-3 user/assistant exchanges of a few words; every `no_assistant_every`-th
    row (if set) is a lone user message. A system message keeps the template's default one out."""
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))

    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if system else []
        if no_assistant_every and i % no_assistant_every == no_assistant_every - 1:
            messages.append({"role": "user", "content": text()})
        else:
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# truncation
# ---------------------------------------------------------------------------------------------


def test_cut_sequence_drop_right_split():
    ids = np.arange(10, dtype=np.int32)
    mask = np.array([0, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=bool)
    assert cut_sequence(ids, mask, 9, "drop")[0][0] is ids                 # 10 tokens fit seq_len 9
    assert cut_sequence(ids, mask, 4, "drop") == []
    (head,) = cut_sequence(ids, mask, 4, "right")
    assert head[0].tolist() == [0, 1, 2, 3, 4] and head[1].tolist() == mask[:5].tolist()
    pieces = cut_sequence(ids, mask, 4, "split")
    # pieces start every seq_len tokens and overlap by one: each target is predicted exactly once
    assert [p[0].tolist() for p in pieces] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    assert [p[1].tolist() for p in pieces] == [[False, False, True, True, False], [False, True, True, True, False],
                                               [False, True]]
    targets = [int(i) for p in pieces for i in p[0][1:][p[1][1:]]]
    assert targets == np.flatnonzero(mask).tolist()
    # a last piece of a single token would have no position: none is made
    assert [len(p[0]) for p in cut_sequence(np.arange(9), np.ones(9, bool), 4, "split")] == [5, 5]


# ---------------------------------------------------------------------------------------------
# prepare_sequences
# ---------------------------------------------------------------------------------------------


def test_sequences_are_the_rendered_conversations_with_skips_counted(tmp_path, chat_tokenizer, caplog):
    rows = chat_rows(12, no_assistant_every=4)
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    with caplog.at_level("INFO", logger="logitcache"):
        seqs = prepare_sequences(str(source), chat_tokenizer, 512, tmp_path / "out")
    usable = [r for i, r in enumerate(rows) if i % 4 != 3]
    assert seqs.num_windows == len(usable) == 9 and seqs.counts.skipped_no_assistant == 3
    assert seqs.counts.rows == 12 and seqs.counts.too_long == 0
    for i, row in enumerate(usable):
        expected = render(chat_tokenizer, row["messages"])
        ids, mask = seqs.row(i)
        assert np.array_equal(ids, expected.input_ids) and np.array_equal(mask, expected.loss_mask)
        assert np.array_equal(seqs.loss_positions(i), np.flatnonzero(expected.loss_mask) - 1)
    assert seqs.num_tokens == sum(len(seqs.row(i)[0]) - 1 for i in range(9))
    assert seqs.loss_tokens == sum(len(seqs.loss_positions(i)) for i in range(9)) > 0
    assert seqs.chat["format"] == "messages" and seqs.chat["train_on"] == "assistant"
    assert seqs.chat["truncation"] == "drop" and len(seqs.chat["template_sha256"]) == 64
    line = next(r.getMessage() for r in caplog.records if r.name == "logitcache.data.sequences")
    assert "12 rows read, 3 skipped (no assistant turn); 9 sequences" in line and "with a loss (" in line


def test_sequences_are_saved_and_loaded_not_rendered_again(tmp_path, chat_tokenizer, monkeypatch):
    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(10))
    first = prepare_sequences(str(source), chat_tokenizer, 512, tmp_path / "out")
    (folder,) = (tmp_path / "out" / "windows").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["input_ids.npy", "loss_mask.npy", "meta.json", "offsets.npy"]
    import logitcache.data.sequences as sequences

    monkeypatch.setattr(sequences, "render_rows", lambda *a, **k: pytest.fail("rendered again"))
    again = prepare_sequences(str(source), chat_tokenizer, 512, tmp_path / "out")
    assert again.fingerprint == first.fingerprint and again.counts == first.counts
    assert np.array_equal(again.input_ids, first.input_ids) and np.array_equal(again.loss_mask, first.loss_mask)
    # a saved file that no longer matches its fingerprint is refused, not used
    mask = np.load(folder / "loss_mask.npy")
    mask[np.flatnonzero(mask)[0]] = False
    np.save(folder / "loss_mask.npy", mask)
    with pytest.raises(UserError, match="do not match their fingerprint; delete the folder"):
        prepare_sequences(str(source), chat_tokenizer, 512, tmp_path / "out")


def test_fingerprint_covers_masks_template_policy_truncation_and_seq_len(tmp_path, chat_tokenizer):
    source = str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(10)))
    base = prepare_sequences(source, chat_tokenizer, 512)
    last = prepare_sequences(source, chat_tokenizer, 512, train_on="last-assistant")
    assert np.array_equal(base.input_ids, last.input_ids) and last.loss_tokens < base.loss_tokens
    other_template = (TEMPLATES / "chatml.jinja").read_text()     # same text, masks derived instead
    fps = {base.fingerprint, last.fingerprint,
           prepare_sequences(source, chat_tokenizer, 512, chat_template=other_template).fingerprint,
           prepare_sequences(source, chat_tokenizer, 512, truncation="split").fingerprint,
           prepare_sequences(source, chat_tokenizer, 500).fingerprint}
    assert len(fps) == 5


@pytest.mark.parametrize("truncation", ["drop", "right", "split"])
def test_truncation_modes_are_counted_and_cut(tmp_path, chat_tokenizer, truncation):
    rows = chat_rows(16, words=(3, 14))
    source = str(write_jsonl(tmp_path / "chat.jsonl", rows))
    full = [render(chat_tokenizer, r["messages"]) for r in rows]
    seq_len = int(np.median([len(s) for s in full]))
    long = [s for s in full if len(s) > seq_len + 1]
    assert 0 < len(long) < len(full)
    seqs = prepare_sequences(source, chat_tokenizer, seq_len, truncation=truncation)
    assert seqs.counts.too_long == len(long) and seqs.lengths.max() <= seq_len + 1
    expected = [piece for s in full for piece in cut_sequence(s.input_ids, s.loss_mask, seq_len, truncation)
                if piece[1][1:].any()]
    assert seqs.num_windows == len(expected) == seqs.counts.sequences
    for i, (ids, mask) in enumerate(expected):
        got_ids, got_mask = seqs.row(i)
        assert np.array_equal(got_ids, ids) and np.array_equal(got_mask, mask)
    if truncation == "drop":
        assert seqs.num_windows == len(full) - len(long)
    elif truncation == "right":
        assert seqs.num_windows + seqs.counts.no_loss == len(full)
    else:   # every target of every conversation is kept, exactly once
        assert seqs.loss_tokens == sum(int(s.loss_mask.sum()) for s in full)
        assert seqs.counts.pieces > len(long)


def test_max_rows_keeps_the_first_rows(tmp_path, chat_tokenizer):
    source = str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(20)))
    some = prepare_sequences(source, chat_tokenizer, 512, max_rows=5)
    every = prepare_sequences(source, chat_tokenizer, 512)
    assert some.num_windows == 5 and some.counts.rows == 5
    assert np.array_equal(some.input_ids, every.input_ids[:some.offsets[-1]])


def test_no_usable_conversation_is_one_line(tmp_path, chat_tokenizer):
    source = str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(4, no_assistant_every=1)))
    with pytest.raises(SettingError, match=r"no conversation has a position to train on \(4 rows read, 4 skipped"):
        prepare_sequences(source, chat_tokenizer, 512, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# which data is chat
# ---------------------------------------------------------------------------------------------


def test_chat_sources_are_told_from_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = write_jsonl(tmp_path / "m.jsonl", chat_rows(2))
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "a document"}])
    body = write_jsonl(tmp_path / "b.jsonl", [{"body": "a document in another column"}])
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    sharegpt = tmp_path / "s.parquet"
    pq.write_table(pa.table({"conversations": [[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]]}),
                   sharegpt)
    (tmp_path / "plain.txt").write_text("a plain document")
    assert is_chat_source(str(messages)) and is_chat_source(str(pc)) and is_chat_source(str(sharegpt))
    assert not is_chat_source(str(text)) and not is_chat_source(str(body))
    assert not is_chat_source(str(tmp_path / "plain.txt"))
    assert is_chat_source(str(text), format="text")      # --format reads any rows as conversations
    assert is_chat_source("shakespeare-chat:train") and not is_chat_source("shakespeare:train")


# ---------------------------------------------------------------------------------------------
# ProduceConfig
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"format": "chatml"}, "format chatml: unknown (known: messages, sharegpt, prompt-completion, text)"),
    ({"train_on": "user"}, "train_on user: unknown (known: assistant, last-assistant, completion, all)"),
    ({"truncation": "left"}, "truncation left: unknown (known: drop, right, split)"),
    ({"chat_template": " "}, "chat_template: is empty"),
])
def test_bad_chat_settings_name_the_setting_and_value(changes, message):
    with pytest.raises(SettingError) as info:
        ProduceConfig(**{"teachers": ("t",), "data": "d", "out": "o", **changes})
    assert str(info.value) == message


def test_chat_settings_default_to_detection_and_assistant_turns():
    config = ProduceConfig(teachers=("t",), data="d", out="o", chat_template=Path("x.jinja"))
    assert (config.format, config.train_on, config.truncation, config.strict) == (None, "assistant", "drop", False)
    assert config.chat_template == "x.jinja"
