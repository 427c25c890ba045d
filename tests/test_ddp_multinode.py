"""Several nodes' worth of ranks read disjoint parts of a cache.

Fast: 4 ranks (explicit rank/world) through the trainer's `CacheBatches`, as `trainer distill` builds
it. Slow: two real `torchrun` launchers (`--nnodes 2 --nproc-per-node 2`, one per simulated node,
static rendezvous on 127.0.0.1), gloo, each rank streaming its batches; ranks must read disjoint
windows made of whole 64-row units, and with 64-row shards that means disjoint shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from moto_s3 import free_port
from test_writer import make_header, write_cache

from logitcache.read.reader import CacheReader
from trainer.data import CacheBatches

WORLD, STEPS, BATCH = 4, 6, 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """512 windows in 8 shards of 64 rows (one reading unit each)."""
    path = tmp_path_factory.mktemp("ddp") / "cache"
    write_cache(path, make_header(num_windows=512, rows_per_shard=64))
    return path


def _check_disjoint_shards(per_rank: list[list[int]]) -> None:
    assert all(len(w) == STEPS * BATCH for w in per_rank)          # equal steps on every rank
    shards = [{w // 64 for w in ws} for ws in per_rank]
    for a in range(len(per_rank)):
        for b in range(a + 1, len(per_rank)):
            assert not set(per_rank[a]) & set(per_rank[b]), (a, b)
            assert not shards[a] & shards[b], f"ranks {a} and {b} share a shard"


def test_four_ranks_read_disjoint_shards(cache):
    reader = CacheReader(cache)
    per_rank = [[w for b in CacheBatches(reader, BATCH, seed=5, rank=r, world=WORLD, shuffle_buffer=128)
                 .stream(0, STEPS) for w in b["window_id"].tolist()] for r in range(WORLD)]
    _check_disjoint_shards(per_rank)
    assert set().union(*map(set, per_rank)) <= set(range(512))


@pytest.mark.slow   # four Python processes importing torch; the split itself is covered above
def test_torchrun_two_nodes_two_ranks_each(cache, tmp_path):
    port, out = free_port(), tmp_path / "gathered.json"
    worker = Path(__file__).with_name("ddp_read_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent.parent), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                               "--nproc-per-node", "2", "--node-rank", str(node), "--master-addr", "127.0.0.1",
                               "--master-port", str(port), str(worker), str(cache), str(out), str(STEPS)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs
    ranks = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    assert [(r["rank"], r["node"], r["local_rank"]) for r in ranks] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    _check_disjoint_shards([r["windows"] for r in ranks])
    # the same windows as the in-process split: ranks depend on (rank, world), not on the launcher
    reader = CacheReader(cache)
    for r in ranks:
        expect = [w for b in CacheBatches(reader, BATCH, seed=5, rank=r["rank"], world=WORLD, shuffle_buffer=128)
                  .stream(0, STEPS) for w in b["window_id"].tolist()]
        assert r["windows"] == expect
