"""verify: every corruption of a shard or the manifest is found and named; the CLI's exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_writer import make_header, write_cache

from logitcache import cli
from logitcache import format as fmt
from logitcache.read.reader import CacheReader
from logitcache.read.summary import inspect_cache
from logitcache.verify import verify_cache


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "cache"
    write_cache(path, make_header(num_windows=50, rows_per_shard=16))
    return path


def _main(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_intact_cache_verifies(cache, capsys):
    assert verify_cache(cache) == []
    assert CacheReader(cache).verify() == []
    rc, out, err = _main(capsys, "verify", str(cache))
    assert (rc, out, err) == (0, "ok: 4 shards\n", "")


def test_flipped_byte_anywhere_is_detected_and_named(cache):
    shard = cache / fmt.shard_name(2)
    original = shard.read_bytes()
    offsets = np.unique(np.linspace(0, len(original) - 1, 50).round().astype(int))
    assert len(offsets) == 50
    for off in offsets:
        data = bytearray(original)
        data[off] ^= 0x5A
        shard.write_bytes(bytes(data))
        problems = verify_cache(cache)
        assert len(problems) == 1, off
        assert problems[0][0] == "shard-00002.parquet" and "sha256 mismatch" in problems[0][1], off
    shard.write_bytes(original)
    assert verify_cache(cache) == []


def test_truncated_missing_and_extended_shards_are_named(cache, capsys):
    s0, s1, s3 = (cache / fmt.shard_name(i) for i in (0, 1, 3))
    s0.write_bytes(s0.read_bytes()[:-100])
    s1.unlink()
    s3.write_bytes(s3.read_bytes() + b"\0")
    problems = dict(verify_cache(cache))
    assert set(problems) == {"shard-00000.parquet", "shard-00001.parquet", "shard-00003.parquet"}
    assert problems["shard-00000.parquet"].startswith("truncated")
    assert problems["shard-00001.parquet"] == "missing"
    assert "size" in problems["shard-00003.parquet"]
    rc, out, err = _main(capsys, "verify", str(cache))
    assert rc == 1
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{cache / 'shard-00000.parquet'}: truncated")
    assert lines[1] == f"{cache / 'shard-00001.parquet'}: missing"
    assert "3 bad files" in err


def test_corrupted_manifest_is_detected(cache, capsys):
    mpath = cache / "manifest.json"
    good = mpath.read_text()
    mpath.write_text(good[: len(good) // 2])                       # cut JSON
    problems = verify_cache(cache)
    assert problems[0][0] == "manifest.json" and "unreadable manifest" in problems[0][1]
    rc, out, err = _main(capsys, "verify", str(cache))
    assert rc == 1 and out.startswith(f"{mpath}: ") and len(out.splitlines()) == 1

    m = json.loads(good)
    m["shards"][1]["sha256"] = "0" * 64                            # edited sha, manifest resealed
    fmt.write_manifest(cache, m)
    assert [p[0] for p in verify_cache(cache)] == ["shard-00001.parquet"]
    assert "sha256 mismatch" in verify_cache(cache)[0][1]

    m = json.loads(good)
    m["shards"][1]["rows"] = 15                                    # invalid: tokens != rows*seq_len
    mpath.write_text(json.dumps(m))
    assert verify_cache(cache)[0][0] == "manifest.json"

    m = json.loads(good)
    del m["shards"][2]                                              # complete but a shard unlisted
    fmt.write_manifest(cache, m)
    assert verify_cache(cache) == [("manifest.json", "marked complete but lists 3 of 4 planned shards")]

    m = json.loads(good)
    m["encoding"]["name"] = "no-such-codec"
    mpath.write_text(json.dumps(m))
    assert verify_cache(cache)[0][0] == "manifest.json"

    mpath.unlink()
    assert verify_cache(cache)[0][0] == "manifest.json"


def test_wrong_rows_or_columns_with_matching_hash_are_detected(cache, tmp_path):
    # a shard replaced by another valid shard (rehashed in the manifest) is still caught
    other = tmp_path / "other"
    write_cache(other, make_header(num_windows=50, rows_per_shard=16, k=4))
    m = json.loads((cache / "manifest.json").read_text())
    om = json.loads((other / "manifest.json").read_text())
    (cache / fmt.shard_name(0)).write_bytes((other / fmt.shard_name(1)).read_bytes())
    m["shards"][0].update(bytes=om["shards"][1]["bytes"], sha256=om["shards"][1]["sha256"])
    fmt.write_manifest(cache, m)
    problems = verify_cache(cache)
    assert len(problems) == 1 and problems[0][0] == "shard-00000.parquet"


def test_cli_errors(tmp_path, capsys):
    rc, out, err = _main(capsys, "verify", str(tmp_path / "nope"))
    assert rc == 2 and err.startswith("logitcache: error: ") and len(err.splitlines()) == 1
    rc, out, err = _main(capsys, "inspect", str(tmp_path / "nope"))
    assert rc == 2 and "no such cache folder" in err


def test_cli_inspect(cache, capsys):
    rc, out, err = _main(capsys, "inspect", str(cache), "--json", "--sample-windows", "100")
    assert rc == 0
    assert json.loads(out) == json.loads(json.dumps(inspect_cache(cache, sample_windows=100)))
    rc, out, err = _main(capsys, "inspect", str(cache))
    assert rc == 0
    table = dict(line.split(None, 1) if " " in line else (line, "") for line in out.splitlines())
    assert "bytes/token" in out and "entropy lower bound" in out and "mean top-k mass" in out
    assert table["k"] == "8" and table["complete"] == "yes"


def _corruptions(data: bytes, n: int):
    """Single-byte flips at `n` offsets spread over the file (first and last byte included), each
    flip xor-ing one of several masks, then truncations at `n` lengths (empty file included)."""
    offsets = np.unique(np.linspace(0, len(data) - 1, n).round().astype(int))
    for j, off in enumerate(offsets):
        mask = (0x01, 0x20, 0x5A, 0x80, 0xFF)[j % 5]
        b = bytearray(data)
        b[off] ^= mask
        yield f"flip {mask:#x} at {off}", bytes(b)
    for cut in np.unique(np.linspace(0, len(data) - 1, n).round().astype(int)):
        yield f"truncate to {cut}", data[:cut]


def test_every_flip_and_truncation_of_every_file_is_named(cache, capsys):
    """Every shard and the manifest, 60 flips and 60 truncations each: verify names exactly that file.

    The manifest carries `manifest_sha256` over its own bytes, so even flips that keep the JSON
    valid and its values plausible (a digit of a count, a letter of the teacher's name, whitespace)
    are caught; the CLI exits 1 and prints the file's path.
    """
    names = sorted(p.name for p in cache.iterdir() if p.name.endswith(".parquet")) + [fmt.MANIFEST_NAME]
    assert len(names) == 5
    tried = 0
    for name in names:
        path = cache / name
        original = path.read_bytes()
        for what, corrupted in _corruptions(original, 60):
            path.write_bytes(corrupted)
            problems = verify_cache(cache)
            # a flip inside a shard's listed sha256 also makes that shard mismatch the (corrupt)
            # manifest; the manifest is always named, first
            assert problems and problems[0][0] == name, (name, what, problems)
            if name != fmt.MANIFEST_NAME:
                assert {p[0] for p in problems} == {name}, (name, what, problems)
            tried += 1
        path.write_bytes(original)
        rc, out, _ = _main(capsys, "verify", str(cache))
        assert rc == 0, out
    assert tried == 5 * 120
    # and through the CLI, once per file
    for name in names:
        path = cache / name
        original = path.read_bytes()
        path.write_bytes(original[:-1])
        rc, out, err = _main(capsys, "verify", str(cache))
        assert rc == 1 and out.splitlines()[0].startswith(f"{path}: "), out
        path.write_bytes(original)
