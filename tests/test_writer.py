"""CacheWriter: deterministic shards, concurrent writers, key refusal, crash leftovers, resume.

The helpers here (`make_header`, `synthetic_shard`, `write_cache`) build small but realistic caches
without a teacher: top-k of a float32 log_softmax over a small random vocabulary. The reader and
verify tests import them.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from logitcache import format as fmt
from logitcache.errors import UserError
from logitcache.format.atomic import sha256_file
from logitcache.format.manifest import expected_rows
from logitcache.producer.writer import CacheWriter

VOCAB = 97


def make_header(*, k: int = 8, seq_len: int = 16, num_windows: int = 50, rows_per_shard: int = 16,
                encoding: str = "fp32", data_fp: str = "d" * 64) -> dict:
    teacher = {"name_or_path": "synthetic/teacher", "revision": "0", "architecture": "None",
               "dtype": "float32", "num_parameters": 0, "config_sha256": "c" * 64,
               "weights_fingerprint": "w" * 64, "vocab_size": VOCAB, "max_position_embeddings": 1024}
    tokenizer = {"fingerprint": "t" * 64, "vocab_size": VOCAB, "eos_token_id": 0}
    data = {"source": "synthetic", "text_column": "text", "fingerprint": data_fp, "seq_len": seq_len,
            "num_windows": num_windows, "num_tokens": num_windows * seq_len}
    enc = {"name": encoding, "params": {}}
    return {"key": fmt.cache_key(teacher, tokenizer, data, k, enc), "teacher": teacher,
            "tokenizer": tokenizer, "data": data, "k": k, "encoding": enc,
            "producer": {"backend": "synthetic", "versions": {}},
            "rows_per_shard": rows_per_shard, "num_shards": -(-num_windows // rows_per_shard)}


def synthetic_windows(first: int, rows: int, seq_len: int, k: int, seed: int = 0,
                      full: bool = False) -> dict:
    """Arrays of windows first..first+rows-1; each window's content depends only on its id.

    With `full`, the result also has `full_logprobs` [rows, seq_len, VOCAB] (not a shard column).
    """
    names = ("input_ids", "target_logprob", "topk_ids", "topk_logprobs", "tail_logmass")
    out = {n: [] for n in names + (("full_logprobs",) if full else ())}
    for w in range(first, first + rows):
        rng = np.random.default_rng([seed, w])
        ids = rng.integers(0, VOCAB, seq_len + 1)
        logits = (rng.standard_normal((seq_len, VOCAB)) * 2.5).astype(np.float32)
        m = logits.max(-1, keepdims=True)
        lse = m + np.log(np.exp(logits - m).sum(-1, keepdims=True, dtype=np.float32))
        logp = (logits - lse).astype(np.float32)
        order = np.argsort(-logp, axis=-1, kind="stable")
        top, rest = order[:, :k], order[:, k:]
        topv = np.take_along_axis(logp, top, -1)
        restv = np.take_along_axis(logits, rest, -1)
        if rest.shape[1]:
            rm = restv.max(-1, keepdims=True)
            tail = (rm[:, 0] + np.log(np.exp(restv - rm).sum(-1, dtype=np.float32)) - lse[:, 0]).astype(np.float32)
        else:                                   # k == vocabulary: nothing outside the top-k
            tail = np.full(seq_len, -np.inf, dtype=np.float32)
        out["input_ids"].append(ids.astype(np.int32))
        out["target_logprob"].append(logp[np.arange(seq_len), ids[1:]])
        out["topk_ids"].append(top.astype(np.int64))
        out["topk_logprobs"].append(topv)
        out["tail_logmass"].append(tail)
        if full:
            out["full_logprobs"].append(logp)
    return {n: np.stack(v) for n, v in out.items()}


def synthetic_shard(header: dict, index: int, seed: int = 0) -> dict:
    first = index * header["rows_per_shard"]
    return synthetic_windows(first, expected_rows(header, index), header["data"]["seq_len"],
                             header["k"], seed)


def write_cache(cache_dir: Path, header: dict, indexes=None, seed: int = 0) -> CacheWriter:
    w = CacheWriter(cache_dir, header)
    for i in (range(header["num_shards"]) if indexes is None else indexes):
        w.write_shard(i, **synthetic_shard(header, i, seed))
    w.finish()
    return w


# --------------------------------------------------------------------------------------------


def test_shards_are_byte_identical_for_identical_input(tmp_path):
    h = make_header()
    a = write_cache(tmp_path / "a", h)
    b = write_cache(tmp_path / "b", h)
    for i in range(h["num_shards"]):
        name = fmt.shard_name(i)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    # written in another order (as a resumed run would), still the same manifest bytes
    c = CacheWriter(tmp_path / "c", h)
    for i in reversed(range(h["num_shards"])):
        c.write_shard(i, **synthetic_shard(h, i))
    c.finish()
    assert (tmp_path / "c" / "manifest.json").read_bytes() == (tmp_path / "a" / "manifest.json").read_bytes()
    assert a.finish()["complete"] and b.finish()["complete"]


def test_shard_layout_and_entry(tmp_path):
    h = make_header(num_windows=150, rows_per_shard=100)
    w = CacheWriter(tmp_path, h)
    arrays = synthetic_shard(h, 0)
    entry = w.write_shard(0, **arrays)
    path = tmp_path / entry["name"]
    assert entry == {"name": "shard-00000.parquet", "index": 0, "first_window": 0, "rows": 100,
                     "tokens": 100 * 16, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    pf = pq.ParquetFile(path)
    md = pf.metadata
    assert md.num_rows == 100 and md.num_row_groups == 2
    assert max(md.row_group(i).num_rows for i in range(md.num_row_groups)) <= 64
    assert md.created_by.startswith("parquet-cpp-arrow version")
    assert set(md.metadata) == {b"ARROW:schema"}
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    for rg in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(rg).column(c)
            assert col.compression == "ZSTD"
            assert col.is_stats_set == (names[c] == "window_id")
    t = pf.read()
    assert t.column_names == ["window_id", "input_ids", "target_logprob", "topk_ids",
                              "topk_logprobs", "tail_logmass"]
    assert t["window_id"].to_pylist() == list(range(100))
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["shards"] == [entry] and m["complete"] is False
    # the last shard is shorter; wrong shapes are refused
    with pytest.raises(ValueError, match="shape"):
        w.write_shard(1, **arrays)
    w.write_shard(1, **synthetic_shard(h, 1))
    assert w.finish()["complete"] is True
    assert fmt.load_manifest(tmp_path)["shards"][1]["rows"] == 50


def _write_some(cache_dir, header, indexes):
    w = CacheWriter(cache_dir, header)
    for i in indexes:
        w.write_shard(i, **synthetic_shard(header, i))


def test_concurrent_writers_from_two_processes(tmp_path):
    h = make_header(num_windows=16 * 12, rows_per_shard=16, seq_len=8, k=4)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_some, args=(tmp_path, h, list(range(r, 12, 2)))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    m = fmt.load_manifest(tmp_path)
    assert [e["index"] for e in m["shards"]] == list(range(12))
    assert m["complete"] is True
    for e in m["shards"]:
        assert sha256_file(tmp_path / e["name"]) == e["sha256"]
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_refuses_another_key(tmp_path):
    write_cache(tmp_path, make_header(), indexes=[0])
    other = make_header(data_fp="e" * 64)
    with pytest.raises(UserError) as exc:
        CacheWriter(tmp_path, other)
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path) in msg
    assert make_header()["key"][:16] in msg and other["key"][:16] in msg
    with pytest.raises(UserError, match="rows_per_shard"):
        CacheWriter(tmp_path, make_header(rows_per_shard=8))


def test_stale_tmp_removed_on_open_but_not_a_live_one(tmp_path):
    import fcntl
    h = make_header()
    write_cache(tmp_path, h, indexes=[0])
    stale = tmp_path / ".shard-00001.parquet.tmp-999999"
    stale.write_bytes(b"half a shard")
    stale_manifest = tmp_path / ".manifest.json.tmp-999999"
    stale_manifest.write_text("{")
    live = tmp_path / ".shard-00002.parquet.tmp-123"
    live.write_bytes(b"being written")
    fd = os.open(live, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        CacheWriter(tmp_path, h)
        assert not stale.exists() and not stale_manifest.exists()
        assert live.exists()
    finally:
        os.close(fd)
    CacheWriter(tmp_path, h)
    assert not live.exists()


def test_completed_ignores_truncated_missing_and_corrupt(tmp_path):
    h = make_header()
    w = write_cache(tmp_path, h)
    assert w.completed() == set(range(h["num_shards"]))
    p1 = tmp_path / fmt.shard_name(1)
    p1.write_bytes(p1.read_bytes()[:-10])                       # truncated
    (tmp_path / fmt.shard_name(2)).unlink()                      # missing
    p3 = tmp_path / fmt.shard_name(3)
    data = bytearray(p3.read_bytes())
    data[100] ^= 0xFF
    p3.write_bytes(bytes(data))                                  # same size, wrong content
    assert w.completed() == {0, 3}
    assert w.completed(verify_hashes=True) == {0}
    # resuming rewrites exactly what is missing, and gives the same bytes
    w2 = CacheWriter(tmp_path, h)
    for i in set(range(h["num_shards"])) - w2.completed(verify_hashes=True):
        w2.write_shard(i, **synthetic_shard(h, i))
    assert w2.finish()["complete"]
    ref = write_cache(tmp_path / "ref", h)
    for i in range(h["num_shards"]):
        assert (tmp_path / fmt.shard_name(i)).read_bytes() == (tmp_path / "ref" / fmt.shard_name(i)).read_bytes()
    assert ref.finish()["shards"] == w2.finish()["shards"]


def test_bad_values_are_refused(tmp_path):
    h = make_header()
    w = CacheWriter(tmp_path, h)
    arrays = synthetic_shard(h, 0)
    bad = dict(arrays, topk_logprobs=arrays["topk_logprobs"].copy())
    bad["topk_logprobs"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        w.write_shard(0, **bad)
    bad = dict(arrays, topk_ids=arrays["topk_ids"].copy())
    bad["topk_ids"][0, 0, 0] = VOCAB
    with pytest.raises(ValueError, match="topk_ids"):
        w.write_shard(0, **bad)
    with pytest.raises(ValueError, match="window_ids"):
        w.write_shard(0, **arrays, window_ids=np.arange(1, 17))
    with pytest.raises(ValueError, match="index"):
        w.write_shard(h["num_shards"], **arrays)
    assert fmt.load_manifest(tmp_path)["shards"] == []
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".parquet") or ".tmp-" in n]


def _write_forever(cache_dir, header):
    w = CacheWriter(cache_dir, header)
    while True:                                   # rewrites every shard until killed
        for i in range(header["num_shards"]):
            w.write_shard(i, **synthetic_shard(header, i))


def test_killed_writer_then_resume_equals_uninterrupted(tmp_path):
    import signal
    import time
    h = make_header(num_windows=16 * 6, rows_per_shard=16)
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_write_forever, args=(tmp_path / "c", h))
    p.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        if (tmp_path / "c" / "manifest.json").exists() and len(fmt.load_manifest(tmp_path / "c")["shards"]) >= 2:
            break
        time.sleep(0.01)
    time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    w = CacheWriter(tmp_path / "c", h)
    assert not [n for n in os.listdir(tmp_path / "c") if ".tmp-" in n]
    for i in set(range(h["num_shards"])) - w.completed():
        w.write_shard(i, **synthetic_shard(h, i))
    assert w.finish()["complete"]
    write_cache(tmp_path / "ref", h)
    for name in ["manifest.json"] + [fmt.shard_name(i) for i in range(h["num_shards"])]:
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
