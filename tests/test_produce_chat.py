"""`logitcache produce` on chat data: one cache row per conversation, the teacher's top-k (or draws)
stored only at the loss positions, held against the teacher run on each conversation alone.

The teacher is a tiny Llama whose tokenizer (test_produce_chat_data.chat_tokenizer_dir) carries
ChatML's special tokens and a ChatML template with generation markers, so the producer renders
with the teacher's own template. One torch thread, as in test_produce.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_teacher
from test_backend_vllm import LP_TOL, needs_vllm
from test_produce import one_thread  # noqa: F401  (fixture)
from test_produce_chat_data import TEMPLATES, chat_rows, chat_tokenizer, chat_tokenizer_dir, write_jsonl  # noqa: F401  (fixtures)

from logitcache import format as fmt
from logitcache.backends.hf import HFBackend
from logitcache.cli import main
from logitcache.data import render
from logitcache.read.reader import CacheReader

CONTEXT = 128
DEMO_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "demo-teacher"
SMALL = ["--k", "8", "--seq-len", "127", "--rows-per-shard", "8", "--batch-size", "4", "--no-progress",
         "--backend", "hf"]
TOL = 1e-5


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory, chat_tokenizer_dir) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("chat_teacher") / "llama", "llama", chat_tokenizer_dir,
                             context=CONTEXT)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """20 conversations of 40..118 tokens, every 5th with no assistant turn (skipped and counted)."""
    return chat_rows(20, no_assistant_every=5, words=(1, 5))


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, rows) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chat_data") / "chat.jsonl", rows)


@pytest.fixture(scope="module")
def backend(chat_teacher):
    return HFBackend(str(chat_teacher), 8, usable_vocab=None)


def produce(capsys, *args: str) -> tuple[int, list[Path], str]:
    capsys.readouterr()
    rc = main(["produce", *args])
    out, err = capsys.readouterr()
    # the cache folders, one a line (a vLLM engine prints lines of its own on stdout too)
    return rc, [Path(line) for line in out.splitlines() if line.startswith("/") and Path(line).is_dir()], err


def read_rows(cache_dir: Path) -> dict[str, np.ndarray]:
    """Every shard decoded and joined: rows padded to seq_len, with lengths and loss_mask."""
    reader = CacheReader(cache_dir)
    shards = [reader.read_shard(e.index) for e in reader.shards]
    return {key: np.concatenate([s[key] for s in shards]) for key in shards[0]}


def manifest(cache_dir: Path) -> dict:
    return json.loads((cache_dir / fmt.MANIFEST_NAME).read_text())


def alone(backend, ids: np.ndarray):
    """The backend's arrays for one conversation run alone, unpadded: [n - 1, ...]."""
    out = backend.run(np.asarray(ids, dtype=np.int32)[None])
    return type(out)(*(a[0] for a in out))


def test_cached_topk_at_loss_positions_equals_each_conversation_alone(capsys, tmp_path, chat_teacher, chat_data,
                                                                      rows, chat_tokenizer, backend):
    rc, (cache,), err = produce(capsys, "--teacher", str(chat_teacher), "--data", str(chat_data),
                                "--out", str(tmp_path), "--encoding", "fp32", *SMALL)
    assert rc == 0, err
    expected = [render(chat_tokenizer, r["messages"]) for i, r in enumerate(rows) if i % 5 != 4]
    m = manifest(cache)
    d = m["data"]
    assert m["format_version"] == 2 and d["layout"] == "sequences" and d["num_windows"] == len(expected) == 16
    assert d["seq_len"] == max(len(s) for s in expected) - 1 and d["text_column"] is None
    assert d["num_tokens"] == sum(len(s) - 1 for s in expected)
    assert d["loss_tokens"] == sum(s.num_targets for s in expected) == sum(e["tokens"] for e in m["shards"])
    assert d["chat"]["format"] == "messages" and d["chat"]["train_on"] == "assistant"
    assert d["chat"]["truncation"] == "drop"
    template = json.loads((chat_teacher / "tokenizer_config.json").read_text()).get("chat_template") \
        or (TEMPLATES / "chatml_generation.jinja").read_text()
    assert d["chat"]["template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    # one line of counts on stderr (the chat layer adds its own line about the skipped rows)
    assert "20 rows read, 4 skipped (no assistant turn); 16 sequences" in err and "with a loss (" in err
    got = read_rows(cache)
    for r, seq in enumerate(expected):
        n, pos = len(seq), np.flatnonzero(seq.loss_mask) - 1
        assert got["lengths"][r] == n and np.array_equal(got["input_ids"][r, :n], seq.input_ids)
        assert np.flatnonzero(got["loss_mask"][r]).tolist() == pos.tolist()
        ref = alone(backend, seq.input_ids)
        np.testing.assert_allclose(got["topk_logprobs"][r, pos], ref.logprobs[pos], rtol=0, atol=TOL)
        np.testing.assert_allclose(got["tail_logmass"][r, pos], ref.tail_logmass[pos], rtol=0, atol=TOL)
        np.testing.assert_allclose(got["target_logprob"][r, pos], ref.target_logprob[pos], rtol=0, atol=TOL)
        # ids agree except where two log-probs tie within the tolerance
        lp = ref.logprobs[pos]
        gaps = np.minimum(np.diff(lp, prepend=np.inf), -np.diff(lp, append=-np.inf))
        assert np.array_equal(got["topk_ids"][r, pos][gaps > 2 * TOL], ref.ids[pos][gaps > 2 * TOL])


def test_a_rerun_writes_nothing_and_a_ladder_renders_once(capsys, tmp_path, chat_teacher, chat_data,
                                                          chat_tokenizer_dir):
    second = save_tiny_teacher(tmp_path / "teachers" / "llama_b", "llama", chat_tokenizer_dir, seed=1,
                               context=CONTEXT)
    args = ["--teacher", str(chat_teacher), "--teacher", str(second), "--data", str(chat_data),
            "--out", str(tmp_path / "out"), *SMALL]
    rc, caches, err = produce(capsys, *args)
    assert rc == 0, err
    assert len(caches) == 2
    assert len(list((tmp_path / "out" / "windows").iterdir())) == 1      # one tokenizer + template: rendered once
    assert manifest(caches[0])["data"] == manifest(caches[1])["data"]
    before = {p: p.read_bytes() for c in caches for p in sorted(c.iterdir())}
    rc, again, err = produce(capsys, *args)
    assert rc == 0 and again == caches
    assert {p: p.read_bytes() for c in caches for p in sorted(c.iterdir())} == before
    assert "(saved in " in err                                            # the counts, from the saved sequences


def test_a_samples_cache_draws_at_loss_positions_whatever_the_batching(capsys, tmp_path, chat_teacher, chat_data,
                                                                       backend):
    draws = {}
    for batch in ("1", "4"):
        rc, (cache,), err = produce(capsys, "--teacher", str(chat_teacher), "--data", str(chat_data),
                                    "--out", str(tmp_path / batch), "--encoding", "sampled", "--encoding-param", "S=8",
                                    *SMALL[:6], "--batch-size", batch, "--no-progress", "--backend", "hf")
        assert rc == 0, err
        assert manifest(cache)["payload"] == "samples"
        draws[batch] = read_rows(cache)
    one, four = draws["1"], draws["4"]
    assert np.array_equal(one["loss_mask"], four["loss_mask"]) and np.array_equal(one["input_ids"], four["input_ids"])
    mask = one["loss_mask"]
    assert (one["sample_counts"][mask].sum(-1) == 8).all() and not one["sample_counts"][~mask].any()
    # the same uniforms per row (keyed by its id): the same draws, bar a float32 rounding at a boundary
    same = (one["sample_ids"][mask] == four["sample_ids"][mask]).all(-1)
    assert same.mean() > 0.99
    for r in range(len(one["lengths"])):
        ref, pos = alone(backend, one["input_ids"][r, :one["lengths"][r]]), np.flatnonzero(mask[r])
        np.testing.assert_allclose(one["target_logprob"][r, pos], ref.target_logprob[pos], rtol=0, atol=TOL)


@pytest.mark.parametrize("truncation", ["drop", "right", "split"])
def test_truncation_is_counted_and_the_rows_cut(capsys, tmp_path, chat_teacher, chat_tokenizer, truncation):
    rows = chat_rows(12, seed=3, words=(4, 16))
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    full = [render(chat_tokenizer, r["messages"]) for r in rows]
    seq_len = 60
    long = sum(len(s) > seq_len + 1 for s in full)
    assert 0 < long < len(full)
    rc, (cache,), err = produce(capsys, "--teacher", str(chat_teacher), "--data", str(data), "--out", str(tmp_path),
                                "--truncation", truncation, "--encoding", "fp32", *SMALL[:2], "--seq-len", str(seq_len),
                                *SMALL[4:])
    assert rc == 0, err
    words = {"drop": f"{long} dropped (longer than seq_len + 1 = 61 tokens)",
             "right": f"{long} cut to seq_len + 1 = 61 tokens", "split": f"{long} split into "}[truncation]
    assert words in err
    got = read_rows(cache)
    assert got["lengths"].max() <= seq_len + 1
    # pieces: the first seq_len + 1 tokens, or every seq_len tokens on (overlapping by one); kept if a
    # target other than their first token is left
    starts = {"drop": lambda n: [0] if n <= seq_len + 1 else [], "right": lambda n: [0],
              "split": lambda n: range(0, n - 1, seq_len)}[truncation]
    kept = [(s.input_ids[i:i + seq_len + 1], s.loss_mask[i + 1:i + seq_len + 1]) for s in full
            for i in starts(len(s))]
    kept = [ids for ids, targets in kept if targets.any()]
    assert [got["input_ids"][r, :n].tolist() for r, n in enumerate(got["lengths"])] == [k.tolist() for k in kept]
    if truncation == "split":   # every target of every conversation stored, exactly once
        assert got["loss_mask"].sum() == sum(s.num_targets for s in full)


def test_masked_cache_size_follows_the_loss_token_fraction(capsys, tmp_path):
    """The demo teacher on 64 conversations of shakespeare-chat:train: the cache trained on the
    assistant's turns stores exactly its loss positions (a third of all), and its bytes over the
    all-positions cache's (--train-on all) follow that fraction, from above.

    Measured (k 64, compact, one shard): fraction 0.333, size ratio 0.418. Not within 0.05: the
    positions left out are the cheapest to store. Their next tokens are the template's markers, the
    system line and the speakers' names, which the teacher predicts alike in every conversation, so
    their top-k repeat and compress well (compact: 19.5 + 29.5 bytes of ids + values a loss position,
    11.1 + 26.1 elsewhere); the rows' tokens are stored in both. fp16 and fp32 give 0.39.
    """
    sizes, data = {}, {}
    for train_on in ("assistant", "all"):
        rc, (cache,), err = produce(capsys, "--teacher", str(DEMO_TEACHER), "--data", "shakespeare-chat:train",
                                    "--out", str(tmp_path / train_on), "--chat-template", str(TEMPLATES / "demo.jinja"),
                                    "--train-on", train_on, "--seq-len", "512", "--max-windows", "64",
                                    "--rows-per-shard", "64", "--batch-size", "8", "--no-progress", "--backend", "hf")
        assert rc == 0, err
        m = manifest(cache)
        sizes[train_on], data[train_on] = sum(e["bytes"] for e in m["shards"]), m["data"]
        assert sum(e["tokens"] for e in m["shards"]) == m["data"]["loss_tokens"]
    assert data["all"]["num_tokens"] == data["all"]["loss_tokens"] == data["assistant"]["num_tokens"]
    fraction = data["assistant"]["loss_tokens"] / data["assistant"]["num_tokens"]
    ratio = sizes["assistant"] / sizes["all"]
    assert 0.25 < fraction < 0.45
    assert fraction <= ratio <= fraction + 0.1, (fraction, ratio, sizes)


def test_format_decides_chat_for_rows_that_pass_for_text(capsys, tmp_path, chat_teacher):
    """Rows of `text` are documents (a windows cache, as before), or with --format text one
    assistant message each (a sequences cache); prompt-completion rows train on the completion."""
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": " ".join(["the man of the world"] * 4)}] * 6)
    rc, (windows,), err = produce(capsys, "--teacher", str(chat_teacher), "--data", str(data), "--out",
                                  str(tmp_path / "plain"), *SMALL[:2], "--seq-len", "16", *SMALL[4:])
    assert rc == 0, err
    assert "layout" not in manifest(windows)["data"] and manifest(windows)["format_version"] == 1
    rc, (chat,), err = produce(capsys, "--teacher", str(chat_teacher), "--data", str(data), "--out",
                               str(tmp_path / "chat"), "--format", "text", *SMALL)
    assert rc == 0, err
    d = manifest(chat)["data"]
    assert d["layout"] == "sequences" and d["chat"]["format"] == "text" and d["num_windows"] == 6
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "the man", "completion": "of the world"}] * 3)
    rc, (cache,), err = produce(capsys, "--teacher", str(chat_teacher), "--data", str(pc), "--out",
                                str(tmp_path / "pc"), "--train-on", "completion", *SMALL)
    assert rc == 0, err
    d = manifest(cache)["data"]
    assert d["chat"]["format"] == "prompt-completion" and d["chat"]["train_on"] == "completion"
    assert 0 < d["loss_tokens"] < d["num_tokens"]


# ---------------------------------------------------------------------------------------------
# bad input: one line, nothing written
# ---------------------------------------------------------------------------------------------


UPPER = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"


@pytest.mark.parametrize("bad_rows, extra, message", [
    ([{"messages": [{"role": "user", "content": "the"}]}], ["--strict"],
     "error: row 0: no assistant turn to train on (train_on assistant)"),
    ([{"messages": [{"role": "narrator", "content": "the"}]}], [],
     "error: row 0: message 0 has role 'narrator', not one of system, user, assistant, tool"),
    ([{"messages": []}], [], "error: row 0: empty message list"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "the man"}]}],
     ["--chat-template", "UPPER"],
     "error: row 0: message 1 (assistant): its content is not in the rendered conversation"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], ["--seq-len", "128"],
     "error: --seq-len 128: a window of seq_len + 1 = 129 tokens is longer than the context of --teacher"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
     ["--chat-template", "missing.jinja"], "error: --chat-template missing.jinja: cannot be read (No such file"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
     ["--engine", "ray"], "error: --engine ray: runs window caches only; chat data needs --engine local"),
])
def test_bad_chat_input_is_one_line_and_writes_nothing(capsys, tmp_path, chat_teacher, bad_rows, extra, message):
    data = write_jsonl(tmp_path / "bad.jsonl", bad_rows)
    extra = [str(tmp_path / "upper.jinja") if e == "UPPER" else e for e in extra]
    (tmp_path / "upper.jinja").write_text(UPPER)
    rc, out, err = produce(capsys, "--teacher", str(chat_teacher), "--data", str(data), "--out",
                           str(tmp_path / "out"), *SMALL, *extra)
    assert rc == 2 and not out
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_teacher_without_a_chat_template_needs_one(capsys, tmp_path, tiny_teachers, tiny_tokenizer_dir, chat_data):
    rc, _, err = produce(capsys, "--teacher", str(tiny_teachers["llama"]), "--data", str(chat_data),
                         "--out", str(tmp_path / "out"), *SMALL[:2], "--seq-len", "48", *SMALL[4:])
    assert rc == 2
    assert err.strip() == (f"logitcache: error: --chat-template: the tokenizer of --teacher {tiny_teachers['llama']} "
                           "has none; give a Jinja file")
    assert not (tmp_path / "out").exists()
    # given one, a plain tokenizer renders text markers (demo.jinja) as ordinary tokens
    plain = save_tiny_teacher(tmp_path / "plain", "llama", tiny_tokenizer_dir, context=CONTEXT)
    rc, (cache,), err = produce(capsys, "--teacher", str(plain), "--data", str(chat_data), "--out",
                                str(tmp_path / "out"), "--chat-template", str(TEMPLATES / "demo.jinja"),
                                "--truncation", "right", *SMALL)
    assert rc == 0, err
    assert manifest(cache)["data"]["loss_tokens"] > 0


def test_chat_settings_on_plain_text_are_refused(capsys, tmp_path, tiny_teachers, corpus_dir):
    rc, _, err = produce(capsys, "--teacher", str(tiny_teachers["llama"]), "--data", str(corpus_dir),
                         "--out", str(tmp_path / "out"), "--train-on", "last-assistant", *SMALL[:2], "--seq-len", "16",
                         *SMALL[4:])
    assert rc == 2
    assert "error: --train-on last-assistant: applies to chat data only" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# vLLM: the same padded windows, the same cache
# ---------------------------------------------------------------------------------------------


def _save_vllm_teacher(folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny Llama vLLM's CPU kernels can run (head size 32, as in test_backend_vllm), with the chat
    tokenizer and a context of CONTEXT positions."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CONTEXT,
                         initializer_range=0.2, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@needs_vllm
def test_vllm_makes_the_chat_cache_the_hf_backend_makes(capsys, tmp_path, chat_tokenizer_dir, chat_data):
    teacher = _save_vllm_teacher(tmp_path / "teacher", chat_tokenizer_dir)
    caches = {}
    for backend in ("hf", "vllm"):   # hf first: the vLLM CPU worker pins this process's threads
        rc, (cache,), err = produce(capsys, "--teacher", str(teacher), "--data", str(chat_data), "--out",
                                    str(tmp_path / backend), "--encoding", "fp32", *SMALL[:-2], "--backend", backend)
        assert rc == 0, err
        caches[backend] = cache
    assert caches["hf"].name == caches["vllm"].name                       # same key
    assert manifest(caches["hf"])["data"] == manifest(caches["vllm"])["data"]
    h, v = read_rows(caches["hf"]), read_rows(caches["vllm"])
    assert np.array_equal(h["input_ids"], v["input_ids"]) and np.array_equal(h["loss_mask"], v["loss_mask"])
    mask = h["loss_mask"]
    assert np.abs(h["topk_logprobs"][mask] - v["topk_logprobs"][mask]).max() <= LP_TOL
    assert np.abs(h["target_logprob"][mask] - v["target_logprob"][mask]).max() <= LP_TOL
    assert (h["topk_ids"][mask][:, 0] == v["topk_ids"][mask][:, 0]).mean() > 0.99
