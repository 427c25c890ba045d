"""CacheReader: round trips, streaming across shards, DataLoader/DDP splitting, shuffle, resume,
reading with `datasets`, refusal of hostile manifests, and the `inspect` statistics.

Tolerances: fp32 is compared exactly. fp16 stores log-probs as IEEE half: round-to-nearest with a
10-bit mantissa gives a relative error of at most 2**-11 (~4.9e-4) for normal numbers, and an
absolute error of at most 2**-25 (~3e-8, half the smallest subnormal step) near zero; the test
allows rtol 2**-11 plus atol 6e-8. Statistics computed by `inspect` in float64 must equal a
float64 computation on the arrays to 1e-12 relative.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter

import numpy as np
import pytest
import torch
from test_writer import make_header, synthetic_windows, write_cache
from torch.utils.data import DataLoader

from logitcache import format as fmt
from logitcache.errors import UserError
from logitcache.producer.writer import CacheWriter
from logitcache.read.reader import CacheReader, open_cache
from logitcache.read.summary import inspect_cache
from logitcache.verify import verify_cache

COLUMNS = ("input_ids", "target_logprob", "topk_ids", "topk_logprobs", "tail_logmass")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """150 windows of T=16, k=8 in shards of 40 rows (4 shards, the last of 30)."""
    path = tmp_path_factory.mktemp("cache")
    h = make_header(num_windows=150, rows_per_shard=40)
    write_cache(path, h)
    return path, h, synthetic_windows(0, 150, 16, 8, full=True)


def _cat(batches, key="window_id"):
    return torch.cat([b[key] for b in batches]).tolist()


# -- round trips --------------------------------------------------------------------------------


def test_round_trip_fp32_exact_with_documented_shapes(cache):
    path, h, ref = cache
    r = CacheReader(path)
    assert (r.k, r.seq_len, r.num_windows, r.num_tokens, r.complete) == (8, 16, 150, 2400, True)
    assert [e["index"] for e in r.shards] == [0, 1, 2, 3]
    batches = list(r.iter_batches(150))
    assert len(batches) == 1
    b = batches[0]
    expect = {"window_id": ((150,), torch.int64), "input_ids": ((150, 16), torch.int64),
              "labels": ((150, 16), torch.int64), "target_logprob": ((150, 16), torch.float32),
              "topk_ids": ((150, 16, 8), torch.int64), "topk_logprobs": ((150, 16, 8), torch.float32),
              "tail_logmass": ((150, 16), torch.float32)}
    assert {k: (tuple(v.shape), v.dtype) for k, v in b.items()} == expect
    assert b["window_id"].tolist() == list(range(150))
    assert np.array_equal(b["input_ids"].numpy(), ref["input_ids"][:, :-1])
    assert np.array_equal(b["labels"].numpy(), ref["input_ids"][:, 1:])
    for key in ("target_logprob", "topk_ids", "topk_logprobs", "tail_logmass"):
        assert np.array_equal(b[key].numpy(), ref[key]), key
    # read_shard: the stored layout, numpy
    s = r.read_shard(3)
    assert s["input_ids"].shape == (30, 17) and s["input_ids"].dtype == np.int32
    assert np.array_equal(s["input_ids"], ref["input_ids"][120:])
    assert np.array_equal(s["topk_logprobs"], ref["topk_logprobs"][120:])
    assert np.array_equal(r.read_shard("shard-00001.parquet")["window_id"], np.arange(40, 80))
    assert open_cache is CacheReader


def test_round_trip_fp16_within_half_precision(tmp_path):
    h = make_header(num_windows=40, rows_per_shard=16, encoding="fp16")
    write_cache(tmp_path, h)
    ref = synthetic_windows(0, 40, 16, 8)
    got = next(CacheReader(tmp_path).iter_batches(40))
    assert got["topk_logprobs"].dtype == torch.float32
    np.testing.assert_allclose(got["topk_logprobs"].numpy(), ref["topk_logprobs"], rtol=2**-11, atol=6e-8)
    assert not np.array_equal(got["topk_logprobs"].numpy(), ref["topk_logprobs"])   # really fp16
    for key in ("tail_logmass", "target_logprob", "topk_ids"):                     # stored exactly
        assert np.array_equal(got[key].numpy(), ref[key])


def test_iter_batches_across_shard_boundaries(cache):
    path, h, ref = cache
    r = CacheReader(path)
    batches = list(r.iter_batches(7))
    assert [len(b["window_id"]) for b in batches] == [7] * 21 + [3]
    assert _cat(batches) == list(range(150))
    assert np.array_equal(torch.cat([b["topk_ids"] for b in batches]).numpy(), ref["topk_ids"])
    # a chosen subset and order of shards
    sub = list(r.iter_batches(32, shards=[2, 0]))
    assert [len(b["window_id"]) for b in sub] == [32, 32, 16]
    assert _cat(sub) == list(range(80, 120)) + list(range(40))


# -- the dataset ----------------------------------------------------------------------------------


def test_dataloader_two_workers_every_window_once_in_order(cache):
    path, _, _ = cache
    r = CacheReader(path)
    ds = r.dataset(6)
    single = list(DataLoader(ds, batch_size=None, num_workers=0))
    multi = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(multi) == len(ds) == 25
    assert _cat(multi) == _cat(single) == list(range(150))
    for a, b in zip(single, multi):
        for key in a:
            assert torch.equal(a[key], b[key])


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_times_workers_cover_every_window_once(cache, shuffle):
    path, _, _ = cache
    r = CacheReader(path)
    seen = []
    for rank in range(2):
        ds = r.dataset(5, rank=rank, world_size=2, shuffle=shuffle, seed=3, equalize_ranks=False)
        seen += _cat(DataLoader(ds, batch_size=None, num_workers=2))
    assert Counter(seen) == Counter(range(150))
    # equalised (the default): both ranks take the same number of steps, all windows distinct
    lens, seen = [], []
    for rank in range(2):
        ds = r.dataset(5, rank=rank, world_size=2, shuffle=shuffle, seed=3)
        got = list(DataLoader(ds, batch_size=None, num_workers=2))
        lens.append((len(got), len(ds)))
        seen += _cat(got)
    assert lens[0] == lens[1] and lens[0][0] == lens[0][1]
    assert len(seen) == len(set(seen)) >= 150 - 64


def test_shuffle_reproducible_and_new_each_epoch(cache):
    path, _, _ = cache
    r = CacheReader(path)

    def epoch_order(seed, epoch, workers=0):
        ds = r.dataset(8, shuffle=True, seed=seed, shuffle_buffer=128)
        ds.set_epoch(epoch)
        return _cat(DataLoader(ds, batch_size=None, num_workers=workers))

    e0 = epoch_order(1, 0)
    assert sorted(e0) == list(range(150)) and e0 != list(range(150))
    assert epoch_order(1, 0, workers=2) == e0
    assert epoch_order(1, 1) != e0 and sorted(epoch_order(1, 1)) == list(range(150))
    assert epoch_order(2, 0) != e0
    # shard (unit) order changes across epochs: the first window comes from another place
    firsts = {epoch_order(1, e)[0] // 64 for e in range(6)}
    assert len(firsts) > 1


@pytest.mark.parametrize("workers_before,workers_after", [(2, 2), (0, 2), (2, 0)])
def test_resume_position_is_exact(cache, workers_before, workers_after):
    path, _, _ = cache
    r = CacheReader(path)
    ds = r.dataset(4, shuffle=True, seed=7, rank=1, world_size=2)
    ds.set_epoch(2)
    full = list(DataLoader(ds, batch_size=None, num_workers=workers_before))
    taken = 5
    state = ds.state_dict(taken)
    assert state["epoch"] == 2 and state["batches_taken"] == 5
    ds2 = r.dataset(4, shuffle=True, seed=7, rank=1, world_size=2)
    ds2.load_state_dict(json.loads(json.dumps(state)))
    assert len(ds2) == len(full) - taken
    rest = list(DataLoader(ds2, batch_size=None, num_workers=workers_after))
    assert len(rest) == len(full) - taken
    for a, b in zip(full[taken:], rest):
        for key in a:
            assert torch.equal(a[key], b[key])
    # the same through set_epoch(epoch, start_batch) and the dataset() arguments
    ds3 = r.dataset(4, shuffle=True, seed=7, rank=1, world_size=2, epoch=2, start_batch=taken)
    assert _cat(DataLoader(ds3, batch_size=None)) == _cat(full[taken:])
    with pytest.raises(UserError, match="batch_size"):
        r.dataset(8, shuffle=True, seed=7, rank=1, world_size=2).load_state_dict(state)


def test_dataset_uses_torch_distributed_when_initialised(cache, tmp_path, monkeypatch):
    import torch.distributed as dist
    path, _, _ = cache
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    ds = CacheReader(path).dataset(4)
    assert (ds.rank, ds.world_size) == (1, 2)


# -- datasets -------------------------------------------------------------------------------------


def test_load_with_hf_datasets(cache, tmp_path):
    import glob

    import datasets
    path, h, ref = cache
    ds = datasets.load_dataset("parquet", data_files=sorted(glob.glob(f"{path}/shard-*.parquet")),
                               split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 150
    assert ds.column_names == ["window_id", "input_ids", "target_logprob", "topk_ids",
                               "topk_logprobs", "tail_logmass"]
    ds = ds.with_format("numpy")
    assert np.array_equal(np.asarray(ds["window_id"]), np.arange(150))
    assert np.array_equal(np.stack(ds["input_ids"]), ref["input_ids"])
    assert np.array_equal(np.stack(ds["topk_ids"]).reshape(150, 16, 8), ref["topk_ids"])
    assert np.array_equal(np.stack(ds["topk_logprobs"]).reshape(150, 16, 8), ref["topk_logprobs"])
    assert np.array_equal(np.stack(ds["tail_logmass"]), ref["tail_logmass"])
    assert np.array_equal(np.stack(ds["target_logprob"]), ref["target_logprob"])


# -- refusals -------------------------------------------------------------------------------------


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("name", ["../x.parquet", "/etc/passwd", "sub/shard-00000.parquet",
                                  "shard-00000.parquet/../../x.parquet", "shard-0.parquet"])
def test_manifest_paths_outside_are_refused(tmp_path, name):
    write_cache(tmp_path / "c", make_header())
    (tmp_path / "x.parquet").write_bytes(b"outside")
    _edit_manifest(tmp_path / "c", lambda m: m["shards"][0].update(name=name))
    with pytest.raises(UserError) as exc:
        CacheReader(tmp_path / "c")
    assert "\n" not in str(exc.value)
    assert verify_cache(tmp_path / "c")[0][0] == "manifest.json"
    with pytest.raises(UserError):
        CacheWriter(tmp_path / "c", make_header())


@pytest.fixture
def never_read(tmp_path):
    """A FIFO outside the cache: opening it for reading would block, so the alarm would fire."""
    fifo = tmp_path / "outside.fifo"
    os.mkfifo(fifo)

    def boom(*_):
        raise AssertionError("a file outside the cache was opened")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield fifo
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_symlinked_shard_is_refused_and_never_opened(tmp_path, never_read):
    h = make_header()
    w = write_cache(tmp_path / "c", h)
    shard = tmp_path / "c" / fmt.shard_name(1)
    shard.unlink()
    shard.symlink_to(never_read)
    with pytest.raises(UserError, match="symbolic link"):
        CacheReader(tmp_path / "c")
    problems = verify_cache(tmp_path / "c")
    assert [p[0] for p in problems] == ["shard-00001.parquet"] and "symbolic link" in problems[0][1]
    assert 1 not in w.completed(verify_hashes=True)
    with pytest.raises(UserError):
        inspect_cache(tmp_path / "c")


def test_shard_symlink_to_a_sibling_shard_is_refused(tmp_path):
    write_cache(tmp_path / "c", make_header())
    s0, s1 = (tmp_path / "c" / fmt.shard_name(i) for i in (0, 1))
    s1.unlink()
    s1.symlink_to(s0.name)
    with pytest.raises(UserError, match="symbolic link"):
        CacheReader(tmp_path / "c")


def test_newer_format_version_is_one_line_error(tmp_path):
    write_cache(tmp_path, make_header())
    _edit_manifest(tmp_path, lambda m: m.update(format_version=fmt.FORMAT_VERSION + 1))
    with pytest.raises(UserError, match="newer") as exc:
        CacheReader(tmp_path)
    assert "\n" not in str(exc.value) and str(tmp_path) in str(exc.value)


def test_open_refuses_truncated_or_inconsistent_shards(tmp_path):
    h = make_header()
    write_cache(tmp_path, h)
    p = tmp_path / fmt.shard_name(0)
    data = p.read_bytes()
    p.write_bytes(data[:-1])
    with pytest.raises(UserError, match="shard-00000.parquet.*bytes"):
        CacheReader(tmp_path)
    p.write_bytes(data)
    _edit_manifest(tmp_path, lambda m: m["shards"][1].update(first_window=0))
    with pytest.raises(UserError, match="first_window"):
        CacheReader(tmp_path)


def test_incomplete_cache_is_readable(tmp_path):
    h = make_header()
    write_cache(tmp_path, h, indexes=[0, 2])
    r = CacheReader(tmp_path)
    assert not r.complete and r.num_windows == 32
    assert _cat(r.iter_batches(10)) == list(range(16)) + list(range(32, 48))


# -- inspect ----------------------------------------------------------------------------------------


def _direct_stats(ref):
    p = np.exp(ref["topk_logprobs"].astype(np.float64))
    t = np.exp(ref["tail_logmass"].astype(np.float64))
    ent = -((p * ref["topk_logprobs"]).sum(-1) + t * ref["tail_logmass"])
    return p.sum(-1).mean(), ent.mean(), t.mean(), -ref["target_logprob"].astype(np.float64).mean()


def test_inspect_numbers_match_direct_computation(cache):
    path, h, ref = cache
    info = inspect_cache(path, sample_windows=10_000)
    mass, ent, tail, nll = _direct_stats(ref)
    assert info["sampled_windows"] == 150
    assert info["mean_topk_mass"] == pytest.approx(mass, rel=1e-12)
    assert info["mean_entropy_lower_bound"] == pytest.approx(ent, rel=1e-12)
    assert info["mean_tail_mass"] == pytest.approx(tail, rel=1e-12)
    assert info["teacher_nll"] == pytest.approx(nll, rel=1e-12)
    size = sum((path / fmt.shard_name(i)).stat().st_size for i in range(4))
    assert info["bytes"] == size and info["bytes_per_token"] == pytest.approx(size / 2400, rel=1e-15)
    assert (info["k"], info["encoding"], info["windows"], info["tokens"], info["shards"],
            info["complete"], info["teacher"]) == (8, "fp32", 150, 2400, 4, True, "synthetic/teacher")
    # the bound really is below the teacher's full entropy, position by position
    full = ref["full_logprobs"].astype(np.float64)
    h_full = -(np.exp(full) * full).sum(-1)
    p = np.exp(ref["topk_logprobs"].astype(np.float64))
    t = np.exp(ref["tail_logmass"].astype(np.float64))
    h_bound = -((p * ref["topk_logprobs"]).sum(-1) + t * ref["tail_logmass"])
    assert np.all(h_bound <= h_full + 1e-6) and h_bound.mean() < h_full.mean()


def test_inspect_samples_at_most_n_windows(cache):
    path, h, ref = cache
    info = inspect_cache(path, sample_windows=64)
    assert 0 < info["sampled_windows"] <= 64
    assert info["windows"] == 150
    none = inspect_cache(path, sample_windows=0)
    assert none["sampled_windows"] == 0 and none["mean_topk_mass"] is None
    # exactly the first 64 windows when they are one whole unit at the start
    info = inspect_cache(path, sample_windows=1)
    assert info["sampled_windows"] == 1
    mass, ent, _, _ = _direct_stats({k: v[:1] for k, v in ref.items()})
    assert info["mean_topk_mass"] == pytest.approx(mass, rel=1e-12)


def test_inspect_k_equals_vocab_has_no_tail(tmp_path):
    from test_writer import VOCAB
    h = make_header(k=VOCAB, num_windows=4, seq_len=4, rows_per_shard=4)
    arrays = synthetic_windows(0, 4, 4, VOCAB)
    arrays["tail_logmass"][:] = -np.inf
    w = CacheWriter(tmp_path, h)
    w.write_shard(0, **arrays)
    info = inspect_cache(tmp_path)
    assert info["mean_topk_mass"] == pytest.approx(1.0, abs=1e-5)
    assert info["mean_tail_mass"] == 0.0 and np.isfinite(info["mean_entropy_lower_bound"])


def test_hostile_manifest_files_are_one_line_errors(tmp_path, never_read):
    write_cache(tmp_path / "c", make_header())
    mpath = tmp_path / "c" / "manifest.json"
    good = mpath.read_text()
    mpath.unlink()
    mpath.symlink_to(never_read)                                  # a manifest link is not followed
    with pytest.raises(UserError, match="symbolic link"):
        CacheReader(tmp_path / "c")
    mpath.unlink()
    mpath.write_text("[" * 100_000 + "]" * 100_000)               # deeply nested JSON
    with pytest.raises(UserError, match="unreadable manifest"):
        CacheReader(tmp_path / "c")
    m = json.loads(good)
    m["encoding"]["name"] = "no-such-codec"
    mpath.write_text(json.dumps(m))
    with pytest.raises(UserError, match="unknown encoding"):
        CacheReader(tmp_path / "c")
    m["encoding"] = {"name": "fp32", "params": {"bogus": 1}}
    mpath.write_text(json.dumps(m))
    with pytest.raises(UserError, match="invalid parameters"):
        CacheReader(tmp_path / "c")
