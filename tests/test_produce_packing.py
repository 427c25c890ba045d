"""`produce --packing` and the trainer on its cache: several conversations a row, each computed alone.

The packed cache (format 3) holds the same conversations, loss positions and teacher values as the
unpacked one (fp32 encoding, within 1e-5: the documents are batched differently, so float rounding
of other padded shapes), in fewer rows; its batches carry position ids restarting at each
conversation. `trainer evaluate` measures the same KL and CE on both caches (within 1e-5), so the
student sees each conversation in a packed row as it would alone; `trainer distill` and
`trainer pretrain --packing` train on packed rows. Refusals are one line and write nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import save_tiny_teacher
from test_produce import one_thread  # noqa: F401  (fixture)
from test_produce_chat import CONTEXT, SMALL, chat_data, chat_teacher, manifest, produce, read_rows, rows  # noqa: F401
from test_produce_chat_data import chat_tokenizer_dir  # noqa: F401  (fixture)

from logitcache import format as fmt
from logitcache.read.reader import CacheReader
from logitcache.verify import verify_cache
from trainer.cli import main as trainer_main

TOL = 1e-5
STEPS = ["--steps", "2", "--batch-size", "2", "--lr", "3e-3", "--no-progress"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, chat_teacher, chat_data):
    """The chat data cached unpacked and packed (fp32 values), in one folder."""

    from logitcache.cli import main

    out = tmp_path_factory.mktemp("packing_caches")
    made = {}
    for name, extra in (("plain", []), ("packed", ["--packing"])):
        before = set(out.iterdir())
        assert main(["produce", "--teacher", str(chat_teacher), "--data", str(chat_data), "--out", str(out),
                     "--encoding", "fp32", *SMALL, *extra]) == 0
        (made[name],) = [p for p in set(out.iterdir()) - before if (p / fmt.MANIFEST_NAME).exists()]
    return made


def test_a_packed_cache_holds_each_conversation_as_computed_alone(capsys, caches, chat_teacher, chat_data):
    plain, packed = manifest(caches["plain"]), manifest(caches["packed"])
    p, d = plain["data"], packed["data"]
    assert packed["format_version"] == 3 and plain["format_version"] == 2 and packed["key"] != plain["key"]
    assert d["packing"] == {"method": "greedy", "max_tokens": 128, "documents": p["num_windows"]}
    assert d["num_windows"] < p["num_windows"] and d["loss_tokens"] == p["loss_tokens"]
    assert d["seq_len"] <= 127 and d["chat"] == p["chat"] and d["fingerprint"] != p["fingerprint"]
    assert verify_cache(caches["packed"]) == []
    a, b = read_rows(caches["plain"]), read_rows(caches["packed"])
    # walk the packed rows' documents (position ids restart at 0) against the plain rows, in order
    j = 0
    for r in range(d["num_windows"]):
        n_pos = int(b["lengths"][r]) - 1
        starts = np.flatnonzero(b["position_ids"][r, :n_pos] == 0).tolist() + [n_pos + 1]
        assert b["document_ids"][r, :n_pos].tolist() == np.repeat(np.arange(len(starts) - 1),
                                                                  np.diff(starts))[:n_pos].tolist()
        assert (b["document_ids"][r, n_pos:] == -1).all()
        for s, e in zip(starts[:-1], starts[1:]):
            n = int(a["lengths"][j])
            assert e - s == n and np.array_equal(b["input_ids"][r, s:e], a["input_ids"][j, :n])
            pos = np.flatnonzero(a["loss_mask"][j])
            assert np.flatnonzero(b["loss_mask"][r, s:e]).tolist() == pos.tolist()
            for name in ("topk_logprobs", "tail_logmass", "target_logprob"):
                np.testing.assert_allclose(b[name][r, s + pos], a[name][j, pos], rtol=0, atol=TOL, err_msg=name)
            j += 1
    assert j == p["num_windows"]
    batch = next(CacheReader(caches["packed"]).iter_batches(4))
    assert batch["position_ids"].shape == batch["input_ids"].shape == batch["document_ids"].shape
    # the same command finds the same cache and writes nothing
    files = {f: f.stat().st_mtime_ns for f in caches["packed"].iterdir()}
    rc, made, err = produce(capsys, "--teacher", str(chat_teacher), "--data", str(chat_data),
                            "--out", str(caches["packed"].parent), "--encoding", "fp32", *SMALL, "--packing")
    assert rc == 0 and made == [caches["packed"]], err
    assert {f: f.stat().st_mtime_ns for f in caches["packed"].iterdir()} == files


def test_the_trainer_sees_packed_rows_as_conversations_alone(capsys, tmp_path, caches, chat_tokenizer_dir):
    student = save_tiny_teacher(tmp_path / "student", "llama", chat_tokenizer_dir, seed=3, context=CONTEXT)
    results = {}
    for name, cache in caches.items():
        assert trainer_main(["evaluate", "--model", str(student), "--cache", str(cache), "--json",
                             "--batch-size", "3", "--device", "cpu"]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["packed"]["tokens"] == results["plain"]["tokens"] == manifest(caches["plain"])["data"]["loss_tokens"]
    for key in ("kl", "ce", "teacher_tail_mass", "student_tail_mass"):
        assert results["packed"][key] == pytest.approx(results["plain"][key], abs=TOL), key
    code = trainer_main(["distill", "--student", str(student), "--cache", str(caches["packed"]),
                         "--out", str(tmp_path / "kd"), *STEPS])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert np.isfinite(json.loads(out.out.strip().splitlines()[-1])["train"]["loss"])


def test_pretrain_packing_trains_on_packed_conversations(capsys, tmp_path, chat_data, chat_tokenizer_dir):
    model = save_tiny_teacher(tmp_path / "model", "llama", chat_tokenizer_dir, seed=4, context=CONTEXT)
    code = trainer_main(["pretrain", "--model", str(model), "--data", str(chat_data), "--seq-len", "127",
                         "--packing", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "sft"), *STEPS])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert np.isfinite(json.loads(out.out.strip().splitlines()[-1])["train"]["loss"])


def test_packing_refusals_are_one_line_and_write_nothing(capsys, tmp_path, caches, corpus_dir, tiny_teachers,
                                                         chat_tokenizer_dir):
    from logitcache.cli import main

    rc, made, err = produce(capsys, "--teacher", str(tiny_teachers["llama"]), "--data", str(corpus_dir),
                            "--out", str(tmp_path / "caches"), "--packing", *SMALL)
    assert rc == 2 and not made and len(err.strip().splitlines()) == 1 and "--packing" in err
    assert "applies to chat data only" in err and not (tmp_path / "caches").exists()
    # a student whose attention implementation cannot keep documents apart
    student = save_tiny_teacher(tmp_path / "flex", "llama", chat_tokenizer_dir, seed=3, context=CONTEXT)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "attn_implementation": "flex_attention"}))
    capsys.readouterr()
    assert trainer_main(["distill", "--student", str(student), "--cache", str(caches["packed"]),
                         "--out", str(tmp_path / "kd"), *STEPS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "uses flex_attention" in err and not (tmp_path / "kd").exists()
    # axolotl's and DistillKit's rows have no document boundaries
    for tool in ("axolotl", "distillkit"):
        assert main(["export", "--to", tool, str(caches["packed"]), str(tmp_path / tool)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "without --packing" in err and not (tmp_path / tool).exists()


def test_packed_rows_are_checked_when_written_and_read(tmp_path, caches):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from logitcache.errors import UserError
    from logitcache.format.payloads import TopK
    from logitcache.producer.rows import sequences_table

    reader = CacheReader(caches["packed"])
    table = pq.read_table(caches["packed"] / "shard-00000.parquet")
    docs = table.column(fmt.COL_DOC_LENGTHS).to_pylist()
    r = next(i for i, d in enumerate(docs) if len(d) > 1)        # a row of two conversations or more
    # reading: lengths that do not add up to the row, or a loss position on a conversation's last token
    positions = table.column(fmt.COL_LOSS_POSITIONS).to_pylist()
    for bad, why in (([docs[r][0] + 1] + docs[r][1:], "do not cover its"),
                     (None, "a loss position at a document's last token")):
        rows = [list(d) for d in docs]
        pos = [list(p) for p in positions]
        if bad is not None:
            rows[r] = bad
        else:
            pos[r] = sorted(set(pos[r]) | {docs[r][0] - 1})[:len(pos[r])]   # same count: the payload still fits
        t = table.set_column(table.schema.get_field_index(fmt.COL_DOC_LENGTHS), fmt.COL_DOC_LENGTHS,
                             pa.array(rows, pa.list_(pa.int32())))
        t = t.set_column(t.schema.get_field_index(fmt.COL_LOSS_POSITIONS), fmt.COL_LOSS_POSITIONS,
                         pa.array(pos, pa.list_(pa.int32())))
        with pytest.raises(UserError, match=f"malformed shard data .*{why}"):
            reader.decode(t, "shard-00000")
    # writing: the same checks before anything is stored
    n = sum(docs[r])
    ids = [np.zeros(n, np.int32)]
    payload = TopK(np.zeros((1, reader.k), np.int64), np.full((1, reader.k), -3.0, np.float32),
                   np.full(1, -0.1, np.float32), np.full(1, -2.0, np.float32))
    with pytest.raises(ValueError, match="document's last token"):
        sequences_table(reader.schema, reader.encoding, payload, ids, [np.array([docs[r][0] - 1])], first_row=0,
                        rows=1, seq_len=reader.seq_len, k=reader.k, token_limit=None, doc_lengths=[docs[r]])
    with pytest.raises(ValueError, match="do not cover its"):
        sequences_table(reader.schema, reader.encoding, payload, ids, [np.array([0])], first_row=0, rows=1,
                        seq_len=reader.seq_len, k=reader.k, token_limit=None, doc_lengths=[[n - 1]])
    # a manifest claiming packed rows under format 2 (which readers of 2 would misread) is invalid
    m = json.loads((caches["packed"] / fmt.MANIFEST_NAME).read_text())
    with pytest.raises(UserError, match="data.packing and format_version 3 go together"):
        fmt.Manifest.from_dict({**m, "format_version": 2}, "manifest.json")


def test_a_packed_samples_cache(capsys, tmp_path, chat_teacher, chat_data):
    rc, (cache,), err = produce(capsys, "--teacher", str(chat_teacher), "--data", str(chat_data),
                                "--out", str(tmp_path), "--encoding", "sampled", *SMALL, "--k", "4", "--packing")
    assert rc == 0, err
    got = read_rows(cache)
    counts = got["sample_counts"].sum(-1)
    assert (counts[got["loss_mask"]] == 4).all() and (counts[~got["loss_mask"]] == 0).all()
    assert manifest(cache)["data"]["packing"]["documents"] == 16 and "position_ids" in got
