"""Corpus loading, tokenizer training, packing and fingerprints (logitcache.data)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache.data import (
    iter_documents,
    pack_windows,
    prepare_windows,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
    windows_fingerprint,
)
from logitcache.errors import UserError

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
        "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. ") * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer([TEXT, TEXT.upper()], tmp_path_factory.mktemp("tok"), vocab_size=300)


def test_pack_windows_overlap_by_one_and_eos_after_each_doc():
    windows = pack_windows([[1, 2, 3], [4, 5]], eos_id=0, seq_len=3)
    # stream: 1 2 3 0 4 5 0 -> (7 - 1) // 3 = 2 windows of 4 tokens sharing one token
    assert windows.tolist() == [[1, 2, 3, 0], [0, 4, 5, 0]]
    assert windows.dtype == np.int32


def test_pack_windows_too_short_gives_none():
    assert pack_windows([[1]], eos_id=0, seq_len=8).shape == (0, 9)
    assert pack_windows([], eos_id=0, seq_len=8).shape == (0, 9)


def test_windows_fingerprint_sensitive_to_content_and_shape():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert windows_fingerprint(a) == windows_fingerprint(a.copy())
    b = a.copy()
    b[2, 3] += 1
    assert windows_fingerprint(a) != windows_fingerprint(b)
    assert windows_fingerprint(a) != windows_fingerprint(a.reshape(4, 3))


def test_tokenizer_training_is_deterministic(tmp_path, tokenizer):
    again = train_bpe_tokenizer([TEXT, TEXT.upper()], tmp_path, vocab_size=300)
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tokenizer)
    assert len(tokenizer) == 300 and tokenizer.eos_token_id is not None
    ids = tokenizer("Thou art more lovely", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "Thou art more lovely"


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_local_sources_give_the_same_windows(tmp_path, tokenizer, fmt):
    root, tmp_path = tmp_path / "root", tmp_path / "src"
    tmp_path.mkdir()
    docs = [TEXT[:900], TEXT[900:1800], TEXT[1800:]]
    if fmt == "txt":
        for i, d in enumerate(docs):
            (tmp_path / f"doc{i}.txt").write_text(d)
        source = str(tmp_path)
    elif fmt == "jsonl":
        (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
        source = str(tmp_path / "docs.jsonl")
    else:
        pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet")
        source = str(tmp_path / "docs.parquet")
    column = "text" if fmt == "txt" else "body"
    assert list(iter_documents(source, text_column=column)) == docs
    w = prepare_windows(source, tokenizer, 16, root, text_column=column)
    expected = pack_windows([tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs],
                            tokenizer.eos_token_id, 16)
    np.testing.assert_array_equal(w.tokens, expected)
    assert w.fingerprint == windows_fingerprint(expected)
    # A second call loads the saved windows instead of tokenizing again.
    again = prepare_windows(source, tokenizer, 16, root, text_column=column)
    assert again.path == w.path and again.fingerprint == w.fingerprint


def test_missing_column_names_the_columns(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="no column 'text'.*body"):
        list(iter_documents(str(tmp_path / "d.jsonl")))


def test_missing_path_is_a_user_error():
    with pytest.raises(UserError, match="no such file"):
        list(iter_documents("./does/not/exist"))


def test_non_utf8_text_is_a_user_error(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 \xff\xfe broken")
    with pytest.raises(UserError, match="bad.txt"):
        list(iter_documents(str(tmp_path / "bad.txt")))


def test_corpus_shorter_than_a_window_is_a_user_error(tmp_path, tokenizer):
    (tmp_path / "tiny.txt").write_text("Thou")
    with pytest.raises(UserError, match="shorter than one window"):
        prepare_windows(str(tmp_path / "tiny.txt"), tokenizer, 64, tmp_path / "root")
    assert not (tmp_path / "root" / "windows").exists() or not any((tmp_path / "root" / "windows").iterdir())


def test_empty_documents_are_skipped(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text(TEXT)
    assert list(iter_documents(str(tmp_path))) == [TEXT]


def test_max_windows_stops_early_with_the_same_prefix():
    docs = [[i + 1] * 5 for i in range(10)]
    full = pack_windows(docs, eos_id=0, seq_len=4)
    consumed = []

    def tracking():
        for d in docs:
            consumed.append(d)
            yield d

    first = pack_windows(tracking(), eos_id=0, seq_len=4, max_windows=2)
    np.testing.assert_array_equal(first, full[:2])
    assert len(consumed) < len(docs)
