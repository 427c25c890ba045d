"""`logitcache repair`: bad shards quarantined and unlisted, the printed produce command re-creates
exactly them (byte for byte, good shards untouched), and a manifest beyond repair is one line.

Determinism: one torch thread (test_produce's fixture), so re-created shards are byte-identical.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from test_produce import SMALL, one_thread  # noqa: F401  (fixture)

from logitcache import format as fmt
from logitcache.cli import main
from logitcache.verify import verify_cache


def cache_bytes(cache_dir: Path) -> dict[str, bytes]:
    """The manifest and every shard file, by name (not the lock, not .quarantine/)."""
    return {p.name: p.read_bytes() for p in sorted(cache_dir.iterdir())
            if p.is_file() and p.name != fmt.LOCK_NAME}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def produced(capsys, tmp_path, tiny_teachers, corpus_dir) -> Path:
    rc, out, err = _run(capsys, "produce", "--teacher", str(tiny_teachers["llama"]), "--data", str(corpus_dir),
                        "--out", str(tmp_path / "root"), "--max-windows", "14", *SMALL,
                        "--encoding-param", "step=0.02")
    assert rc == 0, err
    return Path(out.strip().splitlines()[-1])


def test_repair_quarantines_then_produce_recreates_only_those(capsys, produced):
    cache = produced
    original = cache_bytes(cache)
    assert fmt.load_manifest(cache)["num_shards"] == 4
    s1, s3 = cache / fmt.shard_name(1), cache / fmt.shard_name(3)
    data = bytearray(s1.read_bytes())
    data[len(data) // 2] ^= 0x10
    s1.write_bytes(bytes(data))
    s3.write_bytes(s3.read_bytes()[:-7])
    good = {n: (cache / n).stat().st_mtime_ns for n in (fmt.shard_name(0), fmt.shard_name(2))}

    rc, out, err = _run(capsys, "repair", str(cache), "--dry-run")
    assert rc == 0 and cache_bytes(cache)[fmt.shard_name(1)] == bytes(data)     # dry run: nothing moved
    rc, out, err = _run(capsys, "repair", str(cache))
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"quarantined {s1}: sha256 mismatch")
    assert lines[1].startswith(f"quarantined {s3}: truncated")
    assert "2 shards dropped from the manifest" in err
    m = fmt.load_manifest(cache)
    assert [e["index"] for e in m["shards"]] == [0, 2] and not m["complete"]
    assert sorted(p.name for p in (cache / ".quarantine").iterdir()) == ["shard-00001.parquet.0",
                                                                       "shard-00003.parquet.0"]
    assert not s1.exists() and not s3.exists()
    assert verify_cache(cache) == []                                            # intact, if incomplete
    rc, out, _ = _run(capsys, "repair", str(cache))
    assert rc == 0 and out.startswith("ok: nothing to repair")

    # the printed command, run as printed (plus --no-progress), makes the cache whole again
    command = shlex.split(lines[-1])
    assert command[:2] == ["logitcache", "produce"] and "--encoding-param" in command
    assert command[command.index("--encoding-param") + 1] == "step=0.02"
    rc, out, err = _run(capsys, *command[1:], "--no-progress")
    assert rc == 0, err
    assert out.strip().splitlines() == [str(cache)]
    now = cache_bytes(cache)
    assert {n: now[n] for n in original} == original                           # manifest included
    assert {n: (cache / n).stat().st_mtime_ns for n in good} == good            # good shards never rewritten
    assert verify_cache(cache) == []


def test_manifest_beyond_repair_is_one_line(capsys, produced):
    cache = produced
    mpath = cache / fmt.MANIFEST_NAME
    good = mpath.read_bytes()
    before = cache_bytes(cache)
    mpath.write_bytes(good[:100])
    rc, out, err = _run(capsys, "repair", str(cache))
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "unreadable manifest" in err and "corrupt beyond repair" in err
    # parses, but its own checksum fails: the shard list cannot be trusted either
    m = json.loads(good)
    m["shards"][0]["rows"] = m["shards"][0]["rows"]          # same content, different bytes
    mpath.write_text(json.dumps(m))
    rc, out, err = _run(capsys, "repair", str(cache))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "manifest_sha256 mismatch" in err
    assert {n: b for n, b in cache_bytes(cache).items() if n != fmt.MANIFEST_NAME} == \
        {n: b for n, b in before.items() if n != fmt.MANIFEST_NAME}
    assert not (cache / ".quarantine").exists()
    rc, _, err = _run(capsys, "repair", str(cache.parent / "nope"))
    assert rc == 2 and "no such cache folder" in err
