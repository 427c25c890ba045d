"""Caches written by an earlier format version read back exactly as that version read them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from logitcache.read.reader import CacheReader
from logitcache.verify import verify_cache

FIXTURES = Path(__file__).parent / "fixtures" / "format_v1"
FIXTURES_V2 = Path(__file__).parent / "fixtures" / "format_v2"    # sequences, before packed rows (format 3)


@pytest.mark.parametrize("name", ["compact-k8", "sampled-s4"])
def test_version_1_0_cache_reads_back_identically(name, tmp_path):
    cache = tmp_path / name
    shutil.copytree(FIXTURES / name, cache)      # the reader takes a lock-free look, but never write into the repo
    expected = load_file(str(FIXTURES / f"{name}.expected.safetensors"))
    reader = CacheReader(cache)
    got = [reader.read_shard(e["index"]) for e in reader.shards]
    assert set(got[0]) == set(expected)
    for field, want in expected.items():
        np.testing.assert_array_equal(np.concatenate([g[field] for g in got]), want, err_msg=field)
    assert verify_cache(cache) == []


def test_version_2_sequences_cache_reads_back_identically(tmp_path):
    cache = tmp_path / "chat-compact-k8"
    shutil.copytree(FIXTURES_V2 / "chat-compact-k8", cache)
    expected = load_file(str(FIXTURES_V2 / "chat-compact-k8.expected.safetensors"))
    reader = CacheReader(cache)
    assert reader.manifest.format_version == 2 and reader.manifest.sequences and not reader.manifest.packed
    got = [reader.read_shard(e.index) for e in reader.shards]
    assert set(got[0]) == set(expected)          # no position_ids: one conversation a row
    for field, want in expected.items():
        np.testing.assert_array_equal(np.concatenate([g[field] for g in got]), want, err_msg=field)
    assert verify_cache(cache) == []
