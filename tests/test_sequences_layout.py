"""Format 2.0's sequences layout: rows of their own length, payload stored at loss positions only."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from test_writer import VOCAB, make_header, synthetic_windows

from logitcache import CacheReader, Samples, TopK
from logitcache import format as fmt
from logitcache.cli import main
from logitcache.encodings.sampled import draw_samples
from logitcache.integrations.datasets import cache_transform
from logitcache.producer.writer import CacheWriter
from logitcache.verify import verify_cache

SEQ_LEN, K, ROWS, RPS = 24, 8, 10, 4


def make_rows(seed: int = 0):
    """ROWS rows of 5..SEQ_LEN+1 tokens, each with a few loss positions, and their full top-k arrays."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(ROWS):
        n = int(rng.integers(5, SEQ_LEN + 2))
        full = synthetic_windows(r, 1, n - 1, K, seed=seed)        # every position of the row
        positions = np.sort(rng.choice(n - 1, size=int(rng.integers(1, n - 1)), replace=False))
        rows.append((full["input_ids"][0], positions, full))
    return rows


def sequences_header(encoding: str = "fp32", k: int = K) -> dict:
    h = make_header(k=k, seq_len=SEQ_LEN, num_windows=ROWS, rows_per_shard=RPS, encoding=encoding)
    h["data"] = dict(h["data"], layout="sequences", loss_tokens=0, chat={"train_on": "assistant"},
                     num_tokens=0)
    h["key"] = fmt.cache_key(h["teacher"], h["tokenizer"], h["data"], k, h["encoding"])
    return h


def write_cache(path, encoding="fp32"):
    rows = make_rows()
    w = CacheWriter(path, sequences_header(encoding))
    for index in range(-(-ROWS // RPS)):
        part = rows[index * RPS:(index + 1) * RPS]
        flat = [{key: f[key][0][pos] for key in ("target_logprob", "topk_ids", "topk_logprobs", "tail_logmass")}
                for _, pos, f in part]
        payload = TopK(*(np.concatenate([f[key] for f in flat])
                         for key in ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprob")))
        w.write_sequences(index, input_ids=[ids for ids, _, _ in part], loss_positions=[p for _, p, _ in part],
                          payload=payload)
    w.finish()
    return rows


@pytest.mark.parametrize("encoding", ["fp32", "compact"])
def test_rows_read_back_at_their_loss_positions(tmp_path, encoding):
    rows = write_cache(tmp_path, encoding)
    reader = CacheReader(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["data"]["layout"] == "sequences"
    assert reader.manifest.sequences and reader.num_tokens == sum(len(p) for _, p, _ in rows)
    got = [reader.read_shard(e.index) for e in reader.shards]
    got = {key: np.concatenate([g[key] for g in got]) for key in got[0]}
    for r, (ids, pos, full) in enumerate(rows):
        n = len(ids)
        assert got["lengths"][r] == n and np.array_equal(got["input_ids"][r, :n], ids)
        assert not got["input_ids"][r, n:].any()
        assert np.flatnonzero(got["loss_mask"][r]).tolist() == pos.tolist()
        if encoding == "fp32":
            assert np.array_equal(got["topk_ids"][r, pos], full["topk_ids"][0][pos])
            assert np.array_equal(got["topk_logprobs"][r, pos], full["topk_logprobs"][0][pos])
        else:   # compact keeps the set; near-equal values may swap order after quantisation
            assert np.array_equal(np.sort(got["topk_ids"][r, pos]), np.sort(full["topk_ids"][0][pos]))
            # sqrt(p) quantised in steps of 0.009 (docs/encodings.md): p within ~0.02 here
            np.testing.assert_allclose(np.sort(np.exp(got["topk_logprobs"][r, pos])),
                                       np.sort(np.exp(full["topk_logprobs"][0][pos])), atol=0.02)
        np.testing.assert_array_equal(got["target_logprob"][r, pos], full["target_logprob"][0][pos])
        off = np.setdiff1d(np.arange(SEQ_LEN), pos)      # positions that say nothing
        assert np.isneginf(got["topk_logprobs"][r, off]).all() and not got["tail_logmass"][r, off].any()
    assert verify_cache(tmp_path) == []


def test_batches_are_cut_to_the_longest_row_with_masks(tmp_path):
    rows = write_cache(tmp_path)
    reader = CacheReader(tmp_path)
    for batch, part in zip(reader.iter_batches(3), [rows[i:i + 3] for i in range(0, ROWS, 3)]):
        t = max(len(ids) for ids, _, _ in part) - 1
        assert batch["input_ids"].shape == (len(part), t) and batch["loss_mask"].shape == (len(part), t)
        for b, (ids, pos, full) in enumerate(part):
            n = len(ids)
            assert batch["attention_mask"][b].tolist() == [1] * (n - 1) + [0] * (t - n + 1)
            assert torch.nonzero(batch["loss_mask"][b]).flatten().tolist() == pos.tolist()
            assert torch.equal(batch["labels"][b, :n - 1], torch.as_tensor(ids[1:], dtype=torch.int64))
            assert torch.equal(batch["topk_ids"][b, pos], torch.as_tensor(full["topk_ids"][0][pos]))
    # two ranks of the shuffled dataset see every row once
    seen = []
    for rank in (0, 1):
        for batch in reader.dataset(2, shuffle=True, seed=3, rank=rank, world_size=2, equalize_ranks=False):
            seen += batch["window_id"].tolist()
            assert batch["loss_mask"].shape == batch["input_ids"].shape
    assert sorted(seen) == list(range(ROWS))


def test_datasets_transform_and_inspect_read_sequences(tmp_path, capsys):
    write_cache(tmp_path / "c", "compact")
    reader = CacheReader(tmp_path / "c")
    files = sorted(str(p) for p in (tmp_path / "c").glob("shard-*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    rows = ds.with_transform(cache_transform(tmp_path / "c"))[:]
    want = np.concatenate([reader.read_shard(e.index)["topk_logprobs"] for e in reader.shards])
    np.testing.assert_array_equal(np.asarray(rows["topk_logprobs"]), want)
    assert main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "sequences" and info["tokens"] == reader.num_tokens
    assert 0 < info["mean_topk_mass"] < 1 and np.isfinite(info["teacher_nll"])


def test_samples_payload_in_sequences(tmp_path):
    S, n = 6, 12
    h = sequences_header("sampled", k=S)
    h["encoding"] = {"name": "sampled", "params": {"S": S}}
    h["key"] = fmt.cache_key(h["teacher"], h["tokenizer"], h["data"], S, h["encoding"])
    h["data"] = dict(h["data"], num_windows=1)
    h["num_shards"] = 1
    w = CacheWriter(tmp_path, h)
    ids, counts = draw_samples(torch.randn(3, VOCAB), S, torch.Generator().manual_seed(0))
    pos = np.array([2, 5, 10])
    w.write_sequences(0, input_ids=[np.arange(n, dtype=np.int32)], loss_positions=[pos],
                      payload=Samples(ids.numpy(), counts.numpy(), np.full(3, -1.0, np.float32)))
    got = CacheReader(tmp_path).read_shard(0)
    assert np.array_equal(got["sample_ids"][0, pos], ids.numpy()) and got["sample_counts"][0].sum() == 3 * S


def test_bad_rows_are_refused(tmp_path):
    w = CacheWriter(tmp_path, sequences_header())
    ids = np.arange(6, dtype=np.int32)
    payload = TopK(np.zeros((1, K), np.int64), np.full((1, K), -3.0, np.float32), np.full(1, -0.1, np.float32),
                   np.full(1, -1.0, np.float32))
    others = [ids] * (RPS - 1)
    with pytest.raises(ValueError, match="loss positions must be ascending"):
        w.write_sequences(0, input_ids=[ids] + others, loss_positions=[np.array([5])] + [np.array([0])] * 3,
                          payload=TopK(*(np.concatenate([a] * RPS) for a in payload)))
    with pytest.raises(ValueError, match="the payload holds"):
        w.write_sequences(0, input_ids=[ids] * RPS, loss_positions=[np.array([0, 1])] * RPS, payload=payload)
    with pytest.raises(ValueError, match="written with write_sequences"):
        w.write_shard(0, input_ids=np.zeros((RPS, SEQ_LEN + 1)), target_logprob=np.zeros((RPS, SEQ_LEN)))
    assert fmt.load_manifest(tmp_path)["shards"] == []


def test_windows_caches_stay_format_1(tmp_path):
    w = CacheWriter(tmp_path, make_header())
    assert w.manifest.format_version == 1 and not w.manifest.sequences
