"""`produce --engine ray` on a local Ray cluster (2 CPUs, 2 CPU actors, each a real tiny teacher).

The cache must equal the single-process one byte for byte: every shard file and the manifest. That
holds because a shard's bytes depend only on its windows' arrays (fixed batches inside the shard,
deterministic zstd/Parquet writing) and both runs compute them with the same code on one torch
thread (Ray gives each 1-CPU actor OMP_NUM_THREADS=1; the local run is set to 1 thread here), so the
float32 reductions run in the same order. On GPUs or with other thread counts the last bits of the
log-probs may differ; then compare decoded content instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from logitcache import ProduceConfig, produce
from logitcache import format as fmt
from logitcache.cli import main
from logitcache.verify import verify_cache

ray = pytest.importorskip("ray")

SEQ, K, RPS, WINDOWS = 16, 8, 8, 40     # 5 shards of 8 windows


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _files(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir()) if not p.name.startswith(".")}


def _produce(teacher: Path, corpus: Path, out: Path, **kw) -> Path:
    return produce(ProduceConfig(teachers=(str(teacher),), data=str(corpus), out=out, k=K, seq_len=SEQ, batch_size=4,
                                 rows_per_shard=RPS, max_windows=WINDOWS, backend="hf", progress=False, **kw))[0]


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, tiny_teachers, corpus_dir) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _produce(tiny_teachers["llama"], corpus_dir, tmp_path_factory.mktemp("local"))
    finally:
        torch.set_num_threads(threads)


def test_ray_cache_equals_single_process_byte_for_byte(ray_cluster, local_cache, tiny_teachers, corpus_dir, tmp_path):
    cache = _produce(tiny_teachers["llama"], corpus_dir, tmp_path, engine="ray", engine_options={"actors": 2})
    assert cache.name == local_cache.name
    assert verify_cache(cache) == []
    files = _files(cache)
    assert sorted(files) == ["manifest.json"] + [fmt.shard_name(i) for i in range(5)]
    assert files == _files(local_cache)      # shards and manifest (sha256s included), byte for byte


@pytest.mark.slow   # ~20 s; the fast path of the engine is covered by the byte-for-byte test above
def test_ray_resumes_a_local_partial_cache(ray_cluster, local_cache, tiny_teachers, corpus_dir, tmp_path, capsys):
    # a local worker wrote shards 0, 2, 4 (as if the other half was killed); ray finishes the rest
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = _produce(tiny_teachers["llama"], corpus_dir, tmp_path, num_workers=2, worker_index=0)
    finally:
        torch.set_num_threads(threads)
    assert sorted(e["index"] for e in fmt.load_manifest(cache)["shards"]) == [0, 2, 4]
    code = main(["produce", "--teacher", str(tiny_teachers["llama"]), "--data", str(corpus_dir), "--out", str(tmp_path),
                 "--k", str(K), "--seq-len", str(SEQ), "--batch-size", "4", "--rows-per-shard", str(RPS),
                 "--max-windows", str(WINDOWS), "--backend", "hf", "--engine", "ray", "--ray-actors", "2",
                 "--no-progress"])
    assert code == 0 and capsys.readouterr().out.strip().endswith(cache.name)
    assert _files(cache) == _files(local_cache)


def test_ray_flags_are_checked(tiny_teachers, corpus_dir, tmp_path, capsys):
    base = ["produce", "--teacher", str(tiny_teachers["llama"]), "--data", str(corpus_dir), "--out", str(tmp_path)]
    assert main(base + ["--ray-actors", "2"]) == 2
    assert "only with --engine ray" in capsys.readouterr().err
    assert main(base + ["--engine", "ray", "--ray-actors", "0"]) == 2
    assert "--ray-actors 0: must be at least 1" in capsys.readouterr().err
