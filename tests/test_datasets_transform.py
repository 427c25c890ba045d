"""`datasets.load_dataset("parquet", ...)` plus `cache_transform` gives the arrays `CacheReader` gives,
for every encoding and both payloads."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from test_produce import SMALL, one_thread, produce  # noqa: F401  (fixture)

from logitcache import CacheReader
from logitcache.errors import UserError
from logitcache.integrations.datasets import cache_transform

ENCODINGS = {
    "fp32": [],
    "fp16": ["--encoding", "fp16"],
    "compact": ["--encoding", "compact"],
    "adaptive": ["--encoding", "adaptive", "--encoding-param", "p=0.5"],
    "sampled": ["--encoding", "sampled", "--encoding-param", "S=8", "--backend", "hf"],   # S is SMALL's --k
}


def load_with_datasets(cache: Path, tmp_path: Path) -> datasets.Dataset:
    files = sorted(str(p) for p in cache.glob("shard-*.parquet"))
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_transform_equals_the_reader(capsys, tmp_path, tiny_teachers, corpus_dir, encoding):
    rc, (cache,), err = produce(capsys, "--teacher", str(tiny_teachers["llama"]), "--data", str(corpus_dir),
                                "--out", str(tmp_path / "caches"), *SMALL, "--max-windows", "10",
                                *ENCODINGS[encoding])
    assert rc == 0, err
    reader = CacheReader(cache)
    expected = [reader.read_shard(e.index) for e in reader.shards]
    expected = {key: np.concatenate([part[key] for part in expected]) for key in expected[0]}
    ds = load_with_datasets(cache, tmp_path).with_transform(cache_transform(cache))
    rows = ds[:]                                   # one batch of every row
    assert set(rows) == set(expected)
    for key, want in expected.items():
        np.testing.assert_array_equal(np.asarray(rows[key]), want, err_msg=f"{encoding}: {key}")
    one = ds[3]                                    # a single row: [T, k] arrays
    np.testing.assert_array_equal(one["input_ids"], expected["input_ids"][3])
    payload_key = "sample_ids" if reader.sampled else "topk_ids"
    np.testing.assert_array_equal(one[payload_key], expected[payload_key][3])


def test_the_fixture_of_format_1_0_decodes_too(tmp_path):
    cache = Path(__file__).parent / "fixtures" / "format_v1" / "compact-k8"
    ds = load_with_datasets(cache, tmp_path).with_transform(cache_transform(cache))
    reader = CacheReader(cache)
    np.testing.assert_array_equal(ds[:4]["topk_logprobs"], reader.read_shard(0)["topk_logprobs"])


def test_a_renamed_column_is_one_line(tmp_path):
    cache = Path(__file__).parent / "fixtures" / "format_v1" / "compact-k8"
    ds = load_with_datasets(cache, tmp_path).rename_column("input_ids", "ids")
    with pytest.raises(UserError, match="missing cache columns input_ids"):
        ds.with_transform(cache_transform(cache))[0]
