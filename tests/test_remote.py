"""push / pull / streaming reads over a real S3-compatible server (moto in server mode on 127.0.0.1,
reached by s3fs over HTTP through `endpoint_url`) and over file:// URLs.

Comparisons are exact: a pulled cache must equal the original byte for byte, and streamed batches
must equal local ones bit for bit (the same shard bytes are decoded by the same code).

The Hub (hf://) cannot be reached from the test machine: only its offline code paths are tested
(URL resolution to HfFileSystem, direct uploads instead of renames); the dataset card it would get is
tested on a file:// push, including `datasets.load_dataset` reading the pushed folder through the card.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from moto_s3 import moto_s3, new_bucket
from test_writer import make_header, write_cache

from logitcache import format as fmt
from logitcache.cli import main
from logitcache.errors import UserError
from logitcache.read.reader import CacheReader, RemoteCacheReader
from logitcache.read.urls import atomic_renames, filesystem, storage_options_for
from logitcache.share.pull import pull
from logitcache.share.push import push
from logitcache.verify import verify_cache

pytest.importorskip("s3fs")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        yield server


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """130 windows of T=16, k=8, fp32, in shards of 32 rows (5 shards, the last of 2)."""
    path = tmp_path_factory.mktemp("c") / "synthetic-k8-cache"
    write_cache(path, make_header(num_windows=130, rows_per_shard=32))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def _url(s3, name: str = "caches/one") -> tuple[str, dict]:
    _, options = s3
    return f"s3://{new_bucket(options)}/{name}", options


def test_push_pull_round_trip_is_byte_identical_and_resumes_as_noop(s3, cache, tmp_path):
    url, opts = _url(s3)
    r = push(cache, url, storage_options=opts, progress=False)
    assert (r["uploaded"], r["skipped"], r["shards"]) == (5, 0, 5)
    fs, root = filesystem(url, opts)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root))
    assert names == ["README.md", "manifest.json"] + [fmt.shard_name(i) for i in range(5)]   # no temporaries
    dest = tmp_path / "pulled"
    got = pull(url, dest, storage_options=opts, progress=False)
    assert (got["downloaded"], got["skipped"]) == (5, 0)
    assert _files(dest) == _files(cache)          # manifest + shards, byte for byte
    assert verify_cache(dest) == []
    # running either again transfers nothing
    assert push(cache, url, storage_options=opts, progress=False)["skipped"] == 5
    assert pull(url, dest, storage_options=opts, progress=False)["skipped"] == 5


def test_interrupted_push_is_invisible_then_resumes(s3, cache, tmp_path):
    url, opts = _url(s3)
    fs, root = filesystem(url, opts)
    fs.pipe_file(f"{root}/.shard-00004.parquet.tmp-dead-beef", b"left by a killed push")
    seen = []

    def fail_after_two(name: str, status: str) -> None:
        seen.append(name)
        if len(seen) == 2:
            raise KeyboardInterrupt   # what Ctrl-C or a kill between files leaves

    with pytest.raises(KeyboardInterrupt):
        push(cache, url, storage_options=opts, progress=False, on_file=fail_after_two)
    fs, root = filesystem(url, opts)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root)) == ["shard-00000.parquet", "shard-00001.parquet"]
    with pytest.raises(UserError, match="not a cache"):   # no manifest: nobody sees a half-pushed cache
        RemoteCacheReader(url, storage_options=opts)
    r = push(cache, url, storage_options=opts, progress=False)
    assert (r["skipped"], r["uploaded"]) == (2, 3)
    dest = tmp_path / "pulled"
    pull(url, dest, storage_options=opts, progress=False)
    assert _files(dest) == _files(cache)


def test_pull_refuses_corrupted_remote_shard_by_name(s3, cache, tmp_path, capsys):
    url, opts = _url(s3)
    push(cache, url, storage_options=opts, progress=False)
    fs, root = filesystem(url, opts)
    data = bytearray(fs.cat_file(f"{root}/shard-00002.parquet"))
    data[len(data) // 2] ^= 0xFF                       # same size, one flipped byte
    fs.pipe_file(f"{root}/shard-00002.parquet", bytes(data))
    dest = tmp_path / "pulled"
    with pytest.raises(UserError, match=r"shard-00002\.parquet: sha256 mismatch"):
        pull(url, dest, storage_options=opts, progress=False)
    assert not (dest / fmt.MANIFEST_NAME).exists()     # never declared a cache
    assert not (dest / "shard-00002.parquet").exists() and not [p for p in dest.iterdir() if ".tmp-" in p.name]
    # the CLI: exit 2, one line naming the shard
    code = main(["pull", url, str(tmp_path / "cli"), "--endpoint-url", opts["endpoint_url"],
                 "--storage-option", "key=testing", "--storage-option", "secret=testing", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "shard-00002.parquet: sha256 mismatch" in err[0]
    # a truncated remote shard is refused on open, like a local one
    fs.pipe_file(f"{root}/shard-00002.parquet", bytes(data[:-10]))
    with pytest.raises(UserError, match=r"shard-00002\.parquet: \d+ bytes, manifest says"):
        RemoteCacheReader(url, storage_options=opts)
    # and the streaming reader refuses the corrupt one when it reaches it
    fs.pipe_file(f"{root}/shard-00002.parquet", bytes(data))
    reader = RemoteCacheReader(url, storage_options=opts)
    with pytest.raises(UserError, match=r"shard-00002\.parquet: sha256 mismatch"):
        list(reader.iter_batches(32))
    assert [name for name, _ in reader.verify()] == ["shard-00002.parquet"]


def test_streaming_from_s3_equals_local(s3, cache):
    url, opts = _url(s3)
    push(cache, url, storage_options=opts, progress=False)
    local = CacheReader(cache)
    remote = CacheReader.open(url, storage_options=opts, readahead=2)
    assert isinstance(remote, RemoteCacheReader)
    assert (remote.key, remote.num_windows, remote.num_bytes) == (local.key, local.num_windows, local.num_bytes)
    for bs, shards in ((7, None), (64, [3, 1])):
        a, b = list(local.iter_batches(bs, shards)), list(remote.iter_batches(bs, shards))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # the DDP/worker dataset reads the same windows in the same order
    ds_l = local.dataset(5, shuffle=True, seed=1, rank=1, world_size=2)
    ds_r = remote.dataset(5, shuffle=True, seed=1, rank=1, world_size=2)
    loader = torch.utils.data.DataLoader(ds_r, batch_size=None, num_workers=2)
    for x, y in zip(ds_l, loader, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert np.array_equal(remote.read_shard(4)["topk_ids"], local.read_shard(4)["topk_ids"])


def test_hostile_remote_manifest_is_refused(tmp_path, cache):
    bad = tmp_path / "bad"
    bad.mkdir()
    m = fmt.load_manifest(cache)
    m["shards"][0] = dict(m["shards"][0], name="../shard-00000.parquet")
    fmt.atomic_write_json(bad / fmt.MANIFEST_NAME, m)
    with pytest.raises(UserError, match="not shard-NNNNN.parquet"):
        pull(f"file://{bad}", tmp_path / "out", progress=False)
    m = fmt.load_manifest(cache)
    fmt.atomic_write_json(bad / fmt.MANIFEST_NAME, m)     # lists shards that are not there
    with pytest.raises(UserError, match=r"shard-00000\.parquet: shard listed in the manifest is missing"):
        pull(f"file://{bad}", tmp_path / "out", progress=False)
    other = tmp_path / "other"
    write_cache(other, make_header(num_windows=10, rows_per_shard=8, data_fp="e" * 64))
    push(other, f"file://{tmp_path / 'pushed'}", progress=False)
    with pytest.raises(UserError, match="holds a cache with key"):
        push(cache, f"file://{tmp_path / 'pushed'}", progress=False)


def test_dataset_card_and_datasets_read_the_pushed_files(tmp_path, cache):
    import datasets

    target = tmp_path / "hub-like"
    push(cache, f"file://{target}", progress=False)
    text = (target / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    m = fmt.load_manifest(cache)
    assert front["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": [e["name"] for e in m["shards"]]}]}]
    for fact in (m["key"], m["teacher"]["name_or_path"], "| k | 8 |", "| seq_len | 16 |", "| windows | 130 of 130 |",
                 "| shards | 5 of 5 |", f"| bytes | {sum(e['bytes'] for e in m['shards'])} |"):
        assert fact in text, fact
    files = sorted(str(p) for p in target.glob("shard-*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.num_rows == 130 and ds[129]["window_id"] == 129 and len(ds[0]["topk_ids"]) == 16 * 8
    via_card = datasets.load_dataset(str(target), split="train")   # the card's configs pick the shards
    assert via_card.num_rows == 130 and via_card["window_id"] == list(range(130))


def test_hub_paths_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fs, root = filesystem("hf://datasets/someone/cache-repo/sub")
    assert type(fs).__name__ == "HfFileSystem" and root == "datasets/someone/cache-repo/sub"
    assert not atomic_renames(fs)            # each Hub upload is an atomic commit: no temporary names
    with pytest.raises(UserError, match="endpoint_url: only for s3"):
        storage_options_for("hf://datasets/a/b", "http://127.0.0.1:1")
    with pytest.raises(UserError, match="not a URL"):
        filesystem("relative/folder")


def test_cli_push_pull_over_s3(s3, cache, tmp_path, capsys):
    url, opts = _url(s3, "cli")
    flags = ["--endpoint-url", opts["endpoint_url"], "--storage-option", "key=testing",
             "--storage-option", "secret=testing", "--no-progress"]
    assert main(["push", str(cache), url] + flags) == 0
    assert "5 uploaded" in capsys.readouterr().out
    assert main(["pull", url, str(tmp_path / "p")] + flags) == 0
    assert "verified" in capsys.readouterr().out
    assert _files(tmp_path / "p") == _files(cache)
    assert main(["push", str(tmp_path / "nope"), url] + flags) == 2
